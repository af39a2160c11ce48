"""RCPT answered on the reactor thread from what is cached (issue 17): the password file's
snapshot checked against the kernel's cache (``ICachedRecipientLookup``), the Maildir's
folders and its absent quota file from the dentry cache (``ICachedMailboxCheck``, through
``fsutil.stat_cached`` / ``missing_cached``, which never wait for the disk). Every answer the
cache cannot give (a quota, an unknown address, a changed file) takes the blocking path."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from pop3coexist import fsutil
from pop3coexist.identity.passwordfile import PasswordFile
from pop3coexist.store.maildir import MaildirStore
from tests.support.fakes import FakeMailStore, FakePasswordFileChecker
from tests.support.smtp_fakes import make_factory, smtp_config
from tests.unit.test_relay_policy import decide

HOST = "pop.contoso.test"
needs_cache = pytest.mark.skipif(
    fsutil.stat_cached("/") is None, reason="this kernel has no openat2 RESOLVE_CACHED")


def factory_with(cached: bool, quota: bool = False):
    store = FakeMailStore()
    store.add(f"ted@{HOST}")
    store.add(f"postmaster@{HOST}")
    if quota:
        store.quotas[(HOST, "ted")] = 10**9
    checker = FakePasswordFileChecker({f"ted@{HOST}": "pw"})
    store.cached = checker.cached = cached
    config = smtp_config()
    config = replace(config, domains=replace(config.domains, abuse=""))
    factory, *_ = make_factory(config, store=store, checker=checker,
                               resolve_host=lambda name: [])
    return factory, store


def names(store: FakeMailStore) -> list[str]:
    return [name for name, _args in store.calls]


def test_rcpt_from_the_cache_takes_no_blocking_lookup() -> None:
    """A known recipient whose mailbox the cache shows (no quota) is accepted without the
    blocking mailbox check (the thread hop)."""
    factory, store = factory_with(cached=True)
    assert decide(factory, f"ted@{HOST}", "203.0.113.9", False) == "local"
    assert "mailbox_fits_cached" in names(store) and "mailbox_exists" not in names(store)


@pytest.mark.parametrize(("rcpt", "quota", "expected"), [
    (f"ted@{HOST}", True, "local"),  # a quota: the blocking path counts the usage
    (f"nobody@{HOST}", False, "550 5.1.1"),  # the cache never refuses
])
def test_what_the_cache_cannot_say_takes_the_blocking_path(rcpt: str, quota: bool,
                                                          expected: str) -> None:
    """A mailbox with a quota, or an unknown address: the same decision as without the cache,
    made by the blocking look-up."""
    factory, store = factory_with(cached=True, quota=quota)
    assert decide(factory, rcpt, "203.0.113.9", False) == expected
    plain, _ = factory_with(cached=False, quota=quota)
    assert decide(plain, rcpt, "203.0.113.9", False) == expected
    if quota:
        assert "mailbox_exists" in names(store)


@needs_cache
def test_rcpt_to_a_foreign_domain_reads_the_domains_from_the_cache() -> None:
    """A foreign recipient makes RCPT ask whether its domain was just added: with the store's
    domain list known unchanged from the cache (``ICachedDomainList``), no blocking
    ``list_domains`` (the thread hop) runs; without it, the list is read."""
    for cached, reads in ((True, 0), (False, 1)):
        factory, store = factory_with(cached=cached)
        store.calls.clear()
        decide(factory, "someone@relay.example", "203.0.113.9", False)
        assert names(store).count("list_domains") >= reads
        if cached:
            assert "list_domains" not in names(store)


@needs_cache
def test_maildir_domain_list_from_the_cache_follows_the_mail_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``list_domains_cached`` gives the list ``list_domains`` kept while the mail root is
    unchanged, and None before any listing or once a domain was added."""
    from pop3coexist.store import maildir

    monkeypatch.setattr(maildir, "ROOT_RACY_WINDOW", 0.0)  # every listing is settled
    store = MaildirStore(tmp_path / "mail", hostname="test")
    store.add_domain(HOST)
    assert store.list_domains_cached() is None
    assert store.list_domains() == [HOST]
    assert store.list_domains_cached() == [HOST]
    store.add_domain("fabrikam.test")
    assert store.list_domains_cached() is None
    assert store.list_domains() == ["fabrikam.test", HOST]


def test_stat_cached_and_missing_cached(tmp_path: Path) -> None:
    """``stat_cached`` gives ``os.stat``'s answer for a cached path and None for a missing one;
    ``missing_cached`` is True only for a path known not to exist."""
    f = tmp_path / "f"
    f.write_bytes(b"x")
    os.stat(f)
    st = fsutil.stat_cached(f)
    assert st is not None and st.st_ino == os.stat(f).st_ino
    assert not fsutil.missing_cached(f)
    gone = tmp_path / "gone"
    assert not gone.exists()  # the negative entry is now cached
    assert fsutil.stat_cached(gone) is None and fsutil.missing_cached(gone)


@needs_cache
def test_maildir_fits_cached(tmp_path: Path) -> None:
    """A Maildir with no quota file fits from the cache; a quota, or no such mailbox, needs
    the blocking check."""
    store = MaildirStore(tmp_path / "mail", hostname="test")
    store.add_domain(HOST)
    store.add_mailbox(HOST, "ted")
    assert store.would_exceed_quota(HOST, "ted", 0) is False  # looks (and caches) the paths
    assert store.mailbox_fits_cached(HOST, "ted")
    assert not store.mailbox_fits_cached(HOST, "nobody")
    store.set_quota(HOST, "ted", 1000)
    assert not store.mailbox_fits_cached(HOST, "ted")
    assert not store.mailbox_fits_cached(HOST, "not a name")


@needs_cache
def test_password_file_exists_cached_follows_the_file(tmp_path: Path) -> None:
    """The snapshot answers while the file is unchanged; once another process writes the file,
    only the blocking ``exists`` (which reads it again) may say."""
    path, key = tmp_path / "passwords.json", tmp_path / "key"
    mine = PasswordFile(path, key, True, scrypt_n=2)
    mine.set_password(f"ted@{HOST}", "secret-one")
    reader = PasswordFile(path, key, True, scrypt_n=2)
    assert not reader.exists_cached(f"ted@{HOST}")  # nothing read yet
    assert reader.exists(f"ted@{HOST}")
    assert reader.exists_cached(f"ted@{HOST}")
    assert not reader.exists_cached(f"ann@{HOST}")
    mine.set_password(f"ann@{HOST}", "secret-two")
    assert not reader.exists_cached(f"ted@{HOST}")
    assert reader.exists(f"ann@{HOST}") and reader.exists_cached(f"ann@{HOST}")


@needs_cache
def test_stat_cached_request_made_once_answers_each_path_alike(tmp_path: Path) -> None:
    """``stat_cached`` with its request made once (issue 17) answers every call on its own:
    a str and a Path of the same file give ``os.stat``'s inode, a missing path in between
    changes nothing for the next call, and a folder is followed like ``os.stat``."""
    f = tmp_path / "f"
    f.write_bytes(b"x")
    os.stat(f)
    want = os.stat(f).st_ino
    for _ in range(3):
        assert fsutil.stat_cached(str(f)).st_ino == want  # type: ignore[union-attr]
        assert fsutil.stat_cached(tmp_path / "missing") is None
        assert fsutil.stat_cached(f).st_ino == want  # type: ignore[union-attr]
    assert fsutil.stat_cached(str(tmp_path)).st_ino == os.stat(tmp_path).st_ino  # type: ignore[union-attr]
