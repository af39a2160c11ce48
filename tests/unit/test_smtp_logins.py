"""Byte-exact ESMTP dialogues for who may log in and what sender an authenticated client may
use (issue 11 faults 6, 14 and 15):

- the null reverse-path ``MAIL FROM:<>`` after AUTH is accepted (read receipts, RFC 8098
  section 2.1; auto-replies), while a forged address stays ``553 5.7.1``;
- SMTP AUTH needs an account, not a mailbox: an account with no Maildir here, or in a domain
  that is not local at all, logs in (``235``), never ``454`` and never a critical log line; a
  locked domain or mailbox still refuses (``535 5.7.8``);
- the sender-matches-login rule asks the checker's ``sender_owner``, so an account's
  addresses in other domains (a directory's proxyAddresses) are its own.

Replies are written out here, not imported from the server.
"""

from __future__ import annotations

import base64

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from pop3coexist.errors import AuthUnavailable, StoreError
from tests.support.dialogue import run_dialogue, take
from tests.support.fakes import FakeChecker, FakeMailStore
from tests.support.smtp_fakes import HOST, make_factory, open_session, smtp_config
from tests.support.smtp_replies import GREETING

AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
AUTH_BAD = b"535 5.7.8 Authentication credentials invalid\r\n"
AUTH_TEMP = b"454 4.7.0 Temporary authentication failure\r\n"


def refused_553(got: bytes) -> bool:
    """One reply: 553 5.7.1 (the sender is not the user's)."""
    return got.startswith(b"553 5.7.1 ") and got.count(b"\r\n") == 1


def auth_plain(login: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode()) + b"\r\n"


def session(factory, peer: str = "203.0.113.5"):
    """A session after the greeting and EHLO (the EHLO reply is not checked here)."""
    proto, t = open_session(factory, peer)
    assert take(t) == GREETING
    proto.dataReceived(b"EHLO client.test\r\n")
    assert take(t).startswith(b"250-pop.contoso.test Hello")
    return proto, t


class LogEvents:
    """Collects every Twisted log event while in the ``with`` block."""

    def __enter__(self) -> list[dict]:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        return self.events

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self.events.append)


def worst_level(events: list[dict]) -> LogLevel:
    order = [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical]
    levels = [e.get("log_level", LogLevel.info) for e in events]
    return max(levels, key=order.index, default=LogLevel.debug)


# ---------------------------------------------------------------------- fault 6: MAIL FROM:<>


@pytest.mark.parametrize("mode", ["mx", "submission"])
def test_null_sender_after_auth_is_accepted_and_relayed(mode) -> None:
    """After AUTH, MAIL FROM:<> (a read receipt, RFC 8098 section 2.1) gets 250, may relay
    like any authenticated mail, and is queued with the null sender."""
    factory, _, _, queue, _ = make_factory(mode=mode)
    proto, t = session(factory)
    run_dialogue(proto, [
        (auth_plain(f"ted@{HOST}", "secret1"), AUTH_OK),
        (b"MAIL FROM:<> SIZE=200\r\n", b"250 2.1.0 Sender <> OK\r\n"),
        (b"RCPT TO:<alice@example.org>\r\n", b"250 2.1.5 Recipient <alice@example.org> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: Read: hello\r\n\r\nYour message was displayed.\r\n.\r\n",
         lambda got: got.startswith(b"250 2.0.0 ")),
    ], transport=t)
    [(_, envelope)] = queue.items
    assert envelope["sender"] == ""
    assert [r["address"] for r in envelope["recipients"]] == ["alice@example.org"]


@pytest.mark.parametrize("forged", [
    "ann@pop.contoso.test",             # another local user
    "Ann@POP.contoso.test",             # the same, in another case
    "postmaster@pop.contoso.test",      # nobody's
    "ted@example.org",                  # the user's name in a foreign domain
    "ted@exchange.northwindtraders.test",
    "mailer-daemon@pop.contoso.test",
])
def test_only_the_null_sender_passes_the_rule(forged) -> None:
    """The sender-matches-login rule lets only <> through: every other address that is not
    the user's stays 553 5.7.1, and the session goes on (RSET, then <> works)."""
    factory, *_ = make_factory(mode="submission")
    proto, t = session(factory)
    run_dialogue(proto, [
        (auth_plain(f"ted@{HOST}", "secret1"), AUTH_OK),
        (f"MAIL FROM:<{forged}>\r\n".encode(), refused_553),
        (b"RSET\r\n", b"250 2.0.0 OK\r\n"),
        (b"MAIL FROM:<>\r\n", b"250 2.1.0 Sender <> OK\r\n"),
    ], transport=t)


def test_null_sender_without_auth_is_unchanged() -> None:
    """Anonymous MX mail with <> (bounces) is accepted as before; submission without AUTH is
    still 530 5.7.0, null sender or not."""
    factory, *_ = make_factory()
    proto, t = session(factory)
    run_dialogue(proto, [(b"MAIL FROM:<>\r\n", b"250 2.1.0 Sender <> OK\r\n")], transport=t)
    factory, *_ = make_factory(mode="submission")
    proto, t = session(factory)
    run_dialogue(proto, [(b"MAIL FROM:<>\r\n", b"530 5.7.0 Authentication required\r\n")],
                 transport=t)


@pytest.mark.parametrize(("mode", "requires_auth", "reply"), [
    ("smtps", True, b"530 5.7.0 Authentication required\r\n"),  # the default: RFC 8314 3.3
    ("smtps", False, b"250 2.1.0 Sender <a@example.org> OK\r\n"),
    ("submission", False, b"530 5.7.0 Authentication required\r\n"),  # the key is SMTPS's
    ("mx", True, b"250 2.1.0 Sender <a@example.org> OK\r\n"),
])
def test_smtps_is_a_submission_port(mode: str, requires_auth: bool, reply: bytes) -> None:
    """SMTPS (implicit TLS, port 465) is a submission port (RFC 8314 section 3.3): MAIL
    without AUTH is 530 5.7.0 there, as on the submission port, unless
    smtp.tls_listen_requires_auth = false; the key changes no other listener."""
    factory, *_ = make_factory(smtp_config(tls_listen_requires_auth=requires_auth), mode=mode)
    proto, t = session(factory)
    run_dialogue(proto, [(b"MAIL FROM:<a@example.org>\r\n", reply)], transport=t)


def test_smtps_after_auth_takes_mail() -> None:
    """On SMTPS, once logged in, MAIL is accepted (the default requires AUTH, nothing more)."""
    factory, *_ = make_factory(mode="smtps")
    proto, t = session(factory)
    run_dialogue(proto, [
        (auth_plain(f"ted@{HOST}", "secret1"), AUTH_OK),
        (f"MAIL FROM:<ted@{HOST}>\r\n".encode(), f"250 2.1.0 Sender <ted@{HOST}> OK\r\n".encode()),
    ], transport=t)


# ---------------------------------------------------------------------- fault 14: no mailbox


NO_MAILBOX_ACCOUNTS = [
    "pop3relay@pop.contoso.test",               # a local domain, no Maildir
    "pop3relay@exchange.northwindtraders.test",  # a relay domain: never a mailbox here
    "svc-scanner@elsewhere.test",               # a domain this server knows nothing of
]


@pytest.mark.parametrize("account", NO_MAILBOX_ACCOUNTS)
def test_account_without_mailbox_logs_in_and_relays(account) -> None:
    """SMTP AUTH needs an account, not a mailbox: an account with no Maildir here gets 235 and
    may relay; nothing is logged above info (a missing mailbox is no server fault)."""
    checker = FakeChecker({f"ted@{HOST}": "secret1", account: "relay-pw"})
    factory, store, *_ = make_factory(mode="submission", checker=checker)
    with LogEvents() as events:
        proto, t = session(factory)
        run_dialogue(proto, [
            (auth_plain(account.upper(), "relay-pw"), AUTH_OK),
            (f"MAIL FROM:<{account}>\r\n".encode(), f"250 2.1.0 Sender <{account}> OK\r\n".encode()),
            (b"RCPT TO:<bob@example.org>\r\n", b"250 2.1.5 Recipient <bob@example.org> OK\r\n"),
        ], transport=t)
    assert proto.user == account
    assert worst_level(events) in (LogLevel.debug, LogLevel.info), [formatEvent(e) for e in events]
    assert not any("relay-pw" in formatEvent(e) for e in events)


def test_locked_domain_still_refuses_an_account_without_mailbox() -> None:
    """A locked domain refuses every log-in of its accounts, with or without a Maildir (535);
    an account in another domain is not touched by that lock."""
    checker = FakeChecker({f"ted@{HOST}": "secret1", f"relay@{HOST}": "relay-pw",
                           "relay@elsewhere.test": "other-pw"})
    factory, store, _, _, clock = make_factory(checker=checker)
    store.locked_domains.add(HOST)
    for login, password, reply in (
        (f"relay@{HOST}", "relay-pw", AUTH_BAD),
        (f"ted@{HOST}", "secret1", AUTH_BAD),
        ("relay@elsewhere.test", "other-pw", AUTH_OK),
    ):
        proto, t = session(factory)
        proto.dataReceived(auth_plain(login, password))
        clock.advance(30)
        assert take(t) == reply, login


def test_locked_mailbox_with_maildir_still_refused() -> None:
    """A locked mailbox (its Maildir exists) refuses its owner's AUTH as before (535), while
    an account without a Maildir in the same, unlocked domain logs in."""
    checker = FakeChecker({f"ted@{HOST}": "secret1", f"relay@{HOST}": "relay-pw"})
    factory, store, _, _, clock = make_factory(checker=checker)
    store.locked_mailboxes.add((HOST, "ted"))
    proto, t = session(factory)
    proto.dataReceived(auth_plain(f"ted@{HOST}", "secret1"))
    clock.advance(30)
    assert take(t) == AUTH_BAD
    proto, t = session(factory)
    run_dialogue(proto, [(auth_plain(f"relay@{HOST}", "relay-pw"), AUTH_OK)], transport=t)


def test_unreadable_lock_state_is_temporary_and_not_critical() -> None:
    """A store that cannot be read at log-in gives 454 4.7.0 (never a success), logged as an
    error with the reason, not as a critical traceback."""
    store = FakeMailStore()
    store.add(f"ted@{HOST}")
    store.fail["is_mailbox_locked"] = StoreError("cannot read the lock of ted: I/O error")
    factory, *_ = make_factory(store=store)
    with LogEvents() as events:
        proto, t = session(factory)
        run_dialogue(proto, [(auth_plain(f"ted@{HOST}", "secret1"), AUTH_TEMP)], transport=t)
    assert proto.user is None
    assert worst_level(events) == LogLevel.error
    assert any("I/O error" in formatEvent(e) for e in events)


# ---------------------------------------------------------------------- fault 15: proxyAddresses


def test_sender_rule_checks_every_address_of_the_account() -> None:
    """The sender-matches-login rule accepts the account's addresses in any domain (the
    checker's sender_owner: a directory's proxyAddresses), refuses another account's, and a
    directory that cannot answer gives 451 4.4.3, not 553."""
    checker = FakeChecker({f"ted@{HOST}": "secret1", f"ann@{HOST}": "secret2"},
                          aliases={f"theodore@{HOST}": f"ted@{HOST}"})
    checker.sender_aliases = {
        "ted@pop.northwindtraders.test": f"ted@{HOST}",
        "t.bremer@fabrikam.test": f"ted@{HOST}",
        "ann@fabrikam.test": f"ann@{HOST}",
    }
    factory, *_ = make_factory(smtp_config(sender_must_match_login=True), checker=checker)
    proto, t = session(factory)
    rows = [(auth_plain(f"ted@{HOST}", "secret1"), AUTH_OK)]
    for sender, ok in (
        ("ted@pop.northwindtraders.test", True),
        ("T.Bremer@fabrikam.test", True),
        (f"theodore@{HOST}", True),
        ("ann@fabrikam.test", False),
        ("nobody@fabrikam.test", False),
    ):
        domain_lower = sender.rpartition("@")[0] + "@" + sender.rpartition("@")[2].lower()
        reply = f"250 2.1.0 Sender <{domain_lower}> OK\r\n".encode() if ok else refused_553
        rows.append((f"MAIL FROM:<{sender}>\r\n".encode(), reply))
        if ok:
            rows.append((b"RSET\r\n", b"250 2.0.0 OK\r\n"))
    run_dialogue(proto, rows, transport=t)
    checker.fail = AuthUnavailable("directory down")
    run_dialogue(proto, [
        (b"MAIL FROM:<ted@pop.northwindtraders.test>\r\n",
         b"451 4.4.3 Directory lookup failed, try again later\r\n"),
        (b"MAIL FROM:<>\r\n", b"250 2.1.0 Sender <> OK\r\n"),
    ], transport=t)


NULL_SENDER_FORMS = [
    (b"MAIL FROM:<>\r\n", b"250 2.1.0 Sender <> OK\r\n"),
    (b"mail from:<>\r\n", b"250 2.1.0 Sender <> OK\r\n"),
    (b"MAIL FROM: <>\r\n", b"250 2.1.0 Sender <> OK\r\n"),
    (b"MAIL FROM:<>\n", b"250 2.1.0 Sender <> OK\r\n"),
    (b"MAIL FROM:<> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=mdn1 AUTH=<>\r\n",
     b"250 2.1.0 Sender <> OK\r\n"),
    (b"MAIL FROM:<@a.example:ted@pop.contoso.test>\r\n",  # a source route is ignored
     b"250 2.1.0 Sender <ted@pop.contoso.test> OK\r\n"),
    (b'MAIL FROM:<"TED"@POP.contoso.test>\r\n', b"250 2.1.0 Sender <TED@pop.contoso.test> OK\r\n"),
    (b'MAIL FROM:<"">\r\n', b"501 5.1.7 Bad sender address syntax: address has no domain\r\n"),
    (b'MAIL FROM:<""@pop.contoso.test>\r\n', refused_553),
    (b"MAIL FROM:<@pop.contoso.test:ann@pop.contoso.test>\r\n", refused_553),
    (b"MAIL FROM:<postmaster@pop.contoso.test>\r\n", refused_553),
    (b"MAIL FROM:<MAILER-DAEMON@pop.contoso.test>\r\n", refused_553),
    (b"MAIL FROM:<ted@[127.0.0.1]>\r\n", refused_553),
]


@pytest.mark.parametrize("mode", ["mx", "submission", "smtps"])
@pytest.mark.parametrize(("line", "reply"), NULL_SENDER_FORMS)
def test_null_sender_forms_after_auth(mode: str, line: bytes, reply) -> None:
    """After AUTH on every listener kind, with sender_must_match_login (the default): the null
    reverse-path in any spelling the grammar (or Postfix-style leniency) allows is accepted;
    only the null sender and the user's own address pass, every other address is 553 5.7.1."""
    factory, *_ = make_factory(mode=mode)
    proto, t = session(factory)
    run_dialogue(proto, [(auth_plain(f"ted@{HOST}", "secret1"), AUTH_OK), (line, reply)], transport=t)


def test_null_sender_without_the_sender_rule() -> None:
    """sender_must_match_login = false: the null sender and any address pass after AUTH."""
    factory, *_ = make_factory(smtp_config(sender_must_match_login=False), mode="submission")
    proto, t = session(factory)
    run_dialogue(proto, [
        (auth_plain(f"ted@{HOST}", "secret1"), AUTH_OK),
        (b"MAIL FROM:<>\r\n", b"250 2.1.0 Sender <> OK\r\n"),
        (b"RSET\r\n", b"250 2.0.0 OK\r\n"),
        (b"MAIL FROM:<ann@pop.contoso.test>\r\n", b"250 2.1.0 Sender <ann@pop.contoso.test> OK\r\n"),
    ], transport=t)
