"""Unit tests for masquerading (policy/masquerade.py): envelope sender and From: rewriting of
mail that leaves, through the queue wrapper, durable and leaving nothing behind."""

from __future__ import annotations

from pathlib import Path

from zope.interface.verify import verifyObject

from pop3coexist.config import MasqueradeConfig, parse_config
from pop3coexist.interfaces import IOutboundQueue
from pop3coexist.policy.masquerade import Masquerader, MasqueradingQueue, wrap_queue
from tests.support.smtp_fakes import FakeQueue

POP = "pop.northwindtraders.test"
SHARED = "northwindtraders.test"
M = Masquerader(MasqueradeConfig(domain=SHARED, from_domains=(POP,), header_from=True))


def test_sender_rewrite() -> None:
    """Only senders in the masqueraded domains change, only their domain; <> stays <>."""
    assert M.rewrite_sender(f"Ted@{POP}") == f"Ted@{SHARED}"
    assert M.rewrite_sender("Ted@POP.Northwindtraders.TEST") == f"Ted@{SHARED}"
    assert M.rewrite_sender("someone@example.org") == "someone@example.org"
    assert M.rewrite_sender(f"x@sub.{POP}") == f"x@sub.{POP}"  # exact domains only
    assert M.rewrite_sender("") == ""


def test_from_header_rewrite_keeps_everything_else() -> None:
    """From: (with display name and folded continuation) is rewritten; To:, Reply-To: and the
    body are not."""
    head = (f"Received: from x by {POP}\n"
            f"From: \"Ted Bremer\" <ted@{POP}>,\n\tkim@{POP}\n"
            f"To: bob@example.org, ann@{POP}\nSubject: about ted@{POP}").encode()
    out = M.rewrite_from_header(head)
    assert out == (f"Received: from x by {POP}\n"
                   f"From: \"Ted Bremer\" <ted@{SHARED}>,\n\tkim@{SHARED}\n"
                   f"To: bob@example.org, ann@{POP}\nSubject: about ted@{POP}").encode()


def test_queue_wrapper_rewrites_envelope_and_a_copy(tmp_path: Path) -> None:
    """The wrapper queues a rewritten, separate copy (the local copy keeps the original From:),
    and removes its copy afterwards; verifyObject(IOutboundQueue)."""
    inner = FakeQueue()
    q = MasqueradingQueue(inner, M)
    verifyObject(IOutboundQueue, q)
    src = tmp_path / "spool"
    body = f"From: ted@{POP}\r\nTo: bob@example.org\r\n\r\nbody from ted@{POP}\r\n".encode()
    src.write_bytes(body)
    q.enqueue(src, {"sender": f"ted@{POP}", "recipients": [{"address": "bob@example.org"}]})
    [(data, env)] = inner.items
    assert env["sender"] == f"ted@{SHARED}"
    assert data == body.replace(f"From: ted@{POP}".encode(), f"From: ted@{SHARED}".encode())
    assert src.read_bytes() == body  # the original is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]  # no copy left behind


def test_queue_wrapper_without_header_rewrite_and_foreign_sender(tmp_path: Path) -> None:
    """Without header_from only the envelope changes; a foreign sender passes unchanged."""
    inner = FakeQueue()
    q = MasqueradingQueue(inner, Masquerader(MasqueradeConfig(SHARED, (POP,), False)))
    src = tmp_path / "spool"
    src.write_bytes(f"From: ted@{POP}\n\nx\n".encode())
    q.enqueue(src, {"sender": f"ted@{POP}", "recipients": []})
    q.enqueue(src, {"sender": "a@example.org", "recipients": []})
    assert [e["sender"] for _, e in inner.items] == [f"ted@{SHARED}", "a@example.org"]
    assert all(d == src.read_bytes() for d, _ in inner.items)
    q.wake()
    assert inner.woken == 1


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    """[masquerade] defaults from_domains to the local domains; the masquerade domain must not
    be local, and from_domains must be local; no section: wrap_queue returns the queue."""
    import pytest

    from pop3coexist.errors import ConfigError

    base = f'[server]\nhostname = "{POP}"\nstate_dir = "{tmp_path}"\n[domains]\nlocal = ["{POP}"]\n'
    cfg = parse_config(base + f'[masquerade]\ndomain = "{SHARED}"\n')
    assert cfg.masquerade.from_domains == (POP,) and cfg.masquerade.enabled
    queue = FakeQueue()
    assert isinstance(wrap_queue(queue, cfg), MasqueradingQueue)
    assert wrap_queue(queue, parse_config(base)) is queue
    for bad, words in ((f'[masquerade]\ndomain = "{POP}"\n', "is a local domain"),
                       (f'[masquerade]\ndomain = "{SHARED}"\nfrom_domains = ["x.test"]\n', "not a local"),
                       ('[masquerade]\nheader_from = true\n', "is required"),
                       (f'[masquerade]\ndomain = "{SHARED}"\nextra = 1\n', "unknown key")):
        with pytest.raises(ConfigError) as e:
            parse_config(base + bad)
        assert words in str(e.value)
