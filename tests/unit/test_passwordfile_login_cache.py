"""The verified-password memory of ``PasswordFile`` (``auth.login_cache``, issue 17): a
password scrypt verified is accepted again without scrypt for the TTL; a wrong password, a
changed or removed password, an expired entry and ``login_cache = 0`` all run scrypt (so a
guess costs what it always cost and a change is seen at once); the memory is bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3coexist.config import parse_config
from pop3coexist.identity import passwordfile
from pop3coexist.identity.factory import make_password_file
from pop3coexist.identity.passwordfile import PasswordFile

ADDRESS = "ted@pop.contoso.test"
SECRET = "S3cret-pässword"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def scrypts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts scrypt runs (each one is a log-in's real cost)."""
    calls: list[int] = []
    real = passwordfile._scrypt

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(passwordfile, "_scrypt", counting)
    return calls


def make(tmp_path: Path, ttl: float, clock: Clock) -> PasswordFile:
    pw = PasswordFile(tmp_path / "passwords.json", tmp_path / "passwords.key", False,
                      scrypt_n=2**4, monotonic=clock, verified_ttl=ttl)
    pw.set_password(ADDRESS, SECRET)
    return pw


def test_a_verified_password_skips_scrypt_until_the_ttl_ends(tmp_path: Path, scrypts: list[int]) -> None:
    """The first log-in runs scrypt, the next ones within the TTL do not; after the TTL the
    next one runs it again (and is remembered again)."""
    clock = Clock()
    pw = make(tmp_path, 300, clock)
    scrypts.clear()
    assert pw.verify(ADDRESS, SECRET) and len(scrypts) == 1
    assert pw.verify(ADDRESS, SECRET) and pw.verify(ADDRESS.upper(), SECRET.encode())
    assert len(scrypts) == 1
    clock.now += 301
    assert pw.verify(ADDRESS, SECRET) and len(scrypts) == 2
    assert pw.verify(ADDRESS, SECRET) and len(scrypts) == 2


def test_wrong_changed_and_removed_passwords_still_run_scrypt(tmp_path: Path,
                                                              scrypts: list[int]) -> None:
    """A wrong password for a remembered account runs scrypt and fails; after a password
    change the old one fails and the new one verifies; after removal nothing verifies."""
    clock = Clock()
    pw = make(tmp_path, 300, clock)
    assert pw.verify(ADDRESS, SECRET)
    scrypts.clear()
    assert not pw.verify(ADDRESS, SECRET + "x")
    assert len(scrypts) >= 1
    assert not pw.verify(ADDRESS, "")
    pw.set_password(ADDRESS, "a new one")
    assert not pw.verify(ADDRESS, SECRET)
    assert pw.verify(ADDRESS, "a new one")
    pw.remove(ADDRESS)
    assert not pw.verify(ADDRESS, "a new one")


def test_off_and_bounded(tmp_path: Path, scrypts: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """verified_ttl 0 runs scrypt every time; the memory never holds more than VERIFIED_MAX
    addresses (it starts afresh)."""
    clock = Clock()
    pw = make(tmp_path, 0, clock)
    scrypts.clear()
    assert pw.verify(ADDRESS, SECRET) and pw.verify(ADDRESS, SECRET)
    assert len(scrypts) == 2
    monkeypatch.setattr(passwordfile, "VERIFIED_MAX", 2)
    (tmp_path / "b").mkdir()
    pw = make(tmp_path / "b", 60, clock)
    for name in ("a", "b", "c"):
        pw.set_password(f"{name}@pop.contoso.test", SECRET)
        assert pw.verify(f"{name}@pop.contoso.test", SECRET)
    assert len(pw._verified) <= 2


def test_config_key_reaches_the_password_file(tmp_path: Path) -> None:
    """auth.login_cache defaults to 5 minutes and 0 turns the memory off."""
    base = f'[server]\nhostname = "pop.contoso.test"\nstate_dir = "{tmp_path}"\n'
    assert make_password_file(parse_config(base, tmp_path / "c.toml")).verified_ttl == 300
    off = parse_config(base + '[auth]\nlogin_cache = 0\n', tmp_path / "c.toml")
    assert make_password_file(off).verified_ttl == 0
