"""PasswordFile (identity/passwordfile.py): format, secrets, safety checks, atomic writes,
locking, reloads, and PasswordFileChecker details beyond the conformance suite."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface.verify import verifyObject

from pop3coexist.address import AddressError
from pop3coexist.config import Config, parse_config
from pop3coexist.errors import AdminError, AuthUnavailable, StoreError
from pop3coexist.identity.credentials import APOPCredentials, apop_digest
from pop3coexist.identity.factory import make_checker, make_password_file
from pop3coexist.identity.passwordfile import (
    FORMAT_NAME,
    FORMAT_VERSION,
    RECHECK_INTERVAL,
    BadPassword,
    PasswordFile,
    PasswordFileChecker,
    _run_now,
)
from pop3coexist.interfaces import IAccountChecker
from tests.support.conformance import run_sync

FAST_N = 2**4
SECRET = "S3cret-pässword"


def make(tmp_path: Path, keep: bool = True, **kw) -> PasswordFile:
    return PasswordFile(tmp_path / "passwords.json", tmp_path / "passwords.key", keep, scrypt_n=FAST_N, **kw)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- basics


def test_missing_file_is_empty(tmp_path: Path) -> None:
    """No file yet: no addresses, check() passes, verify is False, nothing is created."""
    pw = make(tmp_path)
    assert pw.addresses() == []
    assert not pw.exists("ted@pop.contoso.test")
    assert not pw.verify("ted@pop.contoso.test", SECRET)
    pw.check()
    assert list(tmp_path.iterdir()) == []


def test_set_verify_exists(tmp_path: Path) -> None:
    """A password set for an address verifies; another password does not; keys are lower case."""
    pw = make(tmp_path)
    assert pw.set_password("Ted@Pop.Contoso.Test", SECRET) is True
    assert pw.exists("TED@pop.contoso.test")
    assert pw.addresses() == ["ted@pop.contoso.test"]
    assert pw.verify("ted@POP.contoso.test", SECRET)
    assert pw.verify("ted@pop.contoso.test", SECRET.encode("utf-8"))
    assert not pw.verify("ted@pop.contoso.test", SECRET.upper())
    assert not pw.verify("ted@pop.contoso.test", "")
    assert not pw.verify("ted@pop.contoso.test", SECRET + "\0")
    assert not pw.verify("bob@pop.contoso.test", SECRET)
    assert not pw.verify("not an address", SECRET)


def test_replace_password(tmp_path: Path) -> None:
    """Setting again replaces the password (returns False: not new) and the secret."""
    pw = make(tmp_path)
    pw.set_password("ted@pop.contoso.test", SECRET)
    assert pw.set_password("ted@pop.contoso.test", "new one") is False
    assert not pw.verify("ted@pop.contoso.test", SECRET)
    assert pw.verify("ted@pop.contoso.test", "new one")
    assert pw.secret("ted@pop.contoso.test") == "new one"


def test_same_name_two_domains(tmp_path: Path) -> None:
    """The same mailbox name in two domains are two entries with their own passwords."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "one")
    pw.set_password("ted@b.test", "two")
    assert pw.addresses() == ["ted@a.test", "ted@b.test"]
    assert pw.verify("ted@a.test", "one") and not pw.verify("ted@a.test", "two")
    assert pw.secret("ted@b.test") == "two"


def test_remove_and_remove_domain(tmp_path: Path) -> None:
    """remove() says whether the address was there; remove_domain() drops a whole domain."""
    pw = make(tmp_path)
    for a in ("ted@a.test", "bob@a.test", "ted@b.test", "ted@xa.test"):
        pw.set_password(a, "pw")
    assert pw.remove("TED@a.test") is True
    assert pw.remove("ted@a.test") is False
    assert pw.remove_domain("A.test") == 1
    assert pw.addresses() == ["ted@b.test", "ted@xa.test"]


@pytest.mark.parametrize("password", ["", "a\nb", "a\rb", "a\0b", "x" * 1025])
def test_bad_passwords_refused(tmp_path: Path, password: str) -> None:
    """Empty passwords, NUL/CR/LF, and over-long ones are refused with a clear ValueError
    that does not repeat the password; nothing is written."""
    pw = make(tmp_path)
    with pytest.raises(ValueError) as info:
        pw.set_password("ted@pop.contoso.test", password)
    if password:
        assert password not in str(info.value)
    assert not pw.path.exists()


def test_non_str_password_refused(tmp_path: Path) -> None:
    """Passwords are str; bytes are a TypeError (callers decode first)."""
    with pytest.raises(TypeError):
        make(tmp_path).set_password("ted@pop.contoso.test", b"pw")  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["ted", "@pop.contoso.test", "ted@localhost", "te d@a.test", "ted@a.test."])
def test_bad_addresses_refused(tmp_path: Path, address: str) -> None:
    """Only mailbox@fully.qualified.domain addresses are stored."""
    pw = make(tmp_path)
    with pytest.raises(AddressError):
        pw.set_password(address, "pw")
    with pytest.raises(AddressError):
        pw.remove(address)
    assert not pw.exists(address)


def test_scrypt_n_must_be_power_of_two(tmp_path: Path) -> None:
    """A bad scrypt cost is refused when the object is made."""
    with pytest.raises(ValueError):
        PasswordFile(tmp_path / "p", tmp_path / "k", True, scrypt_n=1000)


# ---------------------------------------------------------------- format and modes


def test_file_format_and_modes(tmp_path: Path) -> None:
    """The file is versioned JSON, mode 0600, with scrypt parameters and an AES-GCM secret;
    neither the password nor the key appears in it; the key file is 0600 base64 of 32 bytes."""
    pw = make(tmp_path, clock=lambda: 1700000000.5)
    pw.set_password("ted@pop.contoso.test", SECRET)
    raw = pw.path.read_bytes()
    doc = json.loads(raw)
    assert doc["format"] == FORMAT_NAME and doc["version"] == FORMAT_VERSION
    entry = doc["users"]["ted@pop.contoso.test"]
    assert entry["hash"]["alg"] == "scrypt"
    assert (entry["hash"]["n"], entry["hash"]["r"], entry["hash"]["p"]) == (FAST_N, 8, 1)
    assert len(base64.b64decode(entry["hash"]["salt"])) == 16
    assert len(base64.b64decode(entry["hash"]["dk"])) == 32
    assert entry["secret"]["alg"] == "AES-256-GCM"
    assert len(base64.b64decode(entry["secret"]["nonce"])) == 12
    assert entry["changed"] == 1700000000
    assert SECRET.encode() not in raw and "pässword".encode() not in raw
    key_text = pw.key_path.read_bytes()
    assert len(base64.b64decode(key_text.strip())) == 32
    assert base64.b64decode(key_text.strip()) not in raw
    assert mode(pw.path) == 0o600 and mode(pw.key_path) == 0o600
    assert mode(pw.lock_path) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_default_scrypt_cost(tmp_path: Path) -> None:
    """Without a test override, new hashes use n=2**14, r=8, p=1."""
    pw = PasswordFile(tmp_path / "p.json", tmp_path / "p.key", False)
    pw.set_password("ted@a.test", "pw")
    h = json.loads(pw.path.read_text())["users"]["ted@a.test"]["hash"]
    assert (h["n"], h["r"], h["p"]) == (2**14, 8, 1)
    assert pw.verify("ted@a.test", "pw")


def test_stored_parameters_are_used(tmp_path: Path) -> None:
    """A hash made with other parameters still verifies (parameters come from the entry)."""
    old = make(tmp_path)
    old.set_password("ted@a.test", "pw")
    new = PasswordFile(old.path, old.key_path, True, scrypt_n=2**5)
    assert new.verify("ted@a.test", "pw")


def test_no_secrets_without_keep_secrets(tmp_path: Path) -> None:
    """keep_secrets false: no key file, no secret stored, secret() is None; setting a password
    again drops a secret stored earlier."""
    with_secrets = make(tmp_path, keep=True)
    with_secrets.set_password("ted@a.test", "pw")
    pw = make(tmp_path, keep=False)
    assert pw.secret("ted@a.test") is None
    pw.set_password("ted@a.test", "pw2")
    assert "secret" not in json.loads(pw.path.read_text())["users"]["ted@a.test"]
    assert not with_secrets.has_secret("ted@a.test")
    other = tmp_path / "other"
    other.mkdir()
    plain = make(other, keep=False)
    plain.set_password("bob@a.test", "pw")
    assert not plain.key_path.exists()


def test_drop_secrets(tmp_path: Path) -> None:
    """drop_secrets() removes every stored secret and keeps the hashes."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    pw.set_password("bob@a.test", "pw2")
    assert pw.drop_secrets() == 2
    assert pw.secret("ted@a.test") is None
    assert pw.verify("bob@a.test", "pw2")
    assert pw.drop_secrets() == 0


def test_secret_bound_to_address(tmp_path: Path) -> None:
    """A secret copied to another address's entry does not decrypt (the address is the
    associated data): a clear StoreError, not the other user's password."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "ted-pw")
    pw.set_password("bob@a.test", "bob-pw")
    doc = json.loads(pw.path.read_text())
    doc["users"]["bob@a.test"]["secret"] = doc["users"]["ted@a.test"]["secret"]
    pw.path.write_text(json.dumps(doc))
    with pytest.raises(StoreError) as info:
        pw.secret("bob@a.test")
    assert "ted-pw" not in str(info.value)


# ---------------------------------------------------------------- check()


def test_check_refuses_readable_password_file(tmp_path: Path) -> None:
    """A password file the group or others can read is refused at start-up, naming the fix."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    pw.path.chmod(0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        pw.check()


def test_key_file_readable_by_others_refused(tmp_path: Path) -> None:
    """A key file the group or others can read is refused by check() and by secret()."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    pw.key_path.chmod(0o640)
    fresh = make(tmp_path)
    with pytest.raises(StoreError, match="readable by group or others"):
        fresh.check()
    with pytest.raises(StoreError, match="readable by group or others"):
        make(tmp_path).secret("ted@a.test")
    with pytest.raises(StoreError):
        make(tmp_path).set_password("bob@a.test", "pw")


def test_check_missing_key_with_secrets(tmp_path: Path) -> None:
    """Secrets stored but the key file gone: check() and set_password() say so, and no new
    key is made (it could never decrypt the old secrets)."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    pw.key_path.unlink()
    fresh = make(tmp_path)
    with pytest.raises(StoreError, match="missing"):
        fresh.check()
    with pytest.raises(StoreError, match="missing"):
        fresh.secret("ted@a.test")
    with pytest.raises(StoreError, match="missing"):
        fresh.set_password("bob@a.test", "pw")
    assert not pw.key_path.exists()
    # Setting the only secret-holding entry again is fine: nothing old to decrypt.
    fresh.set_password("ted@a.test", "pw2")
    assert fresh.secret("ted@a.test") == "pw2"
    # Without keep_secrets, a missing key is no problem.
    make(tmp_path, keep=False).check()


def test_check_wrong_key(tmp_path: Path) -> None:
    """A key file that is not the one the secrets were made with is reported at start-up."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    pw.key_path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    with pytest.raises(StoreError, match="not the key"):
        make(tmp_path).check()


def test_check_corrupt_key(tmp_path: Path) -> None:
    """A key file that is not base64 of 32 bytes is corrupt, and the message does not quote it."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    pw.key_path.write_bytes(b"tooshort\n")
    with pytest.raises(StoreError, match="corrupt") as info:
        make(tmp_path).check()
    assert "tooshort" not in str(info.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{ nope", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not a pop3coexist password file"),
        (json.dumps({"format": FORMAT_NAME, "version": 99, "users": {}}).encode(), "newer"),
        (json.dumps({"format": FORMAT_NAME, "version": 1}).encode(), "no users"),
        (json.dumps({"format": FORMAT_NAME, "version": 1, "users": {"Ted@a.test": {}}}).encode(), "bad address"),
        (json.dumps({"format": FORMAT_NAME, "version": 1, "users": {"ted@a.test": {}}}).encode(), "no scrypt"),
        (
            json.dumps(
                {"format": FORMAT_NAME, "version": 1, "users": {"ted@a.test": {"hash": {
                    "alg": "scrypt", "n": 2**30, "r": 8, "p": 1, "salt": "AAAAAAAAAAAAAAAAAAAAAA==",
                    "dk": "A" * 44}}}}
            ).encode(),
            "scrypt parameter n",
        ),
    ],
)
def test_check_corrupt_file(tmp_path: Path, content: bytes, message: str) -> None:
    """A corrupt password file gives a StoreError naming the file and what is wrong."""
    pw = make(tmp_path)
    pw.path.write_bytes(content)
    pw.path.chmod(0o600)
    with pytest.raises(StoreError, match=message) as info:
        pw.check()
    assert str(pw.path) in str(info.value)


def test_corrupt_file_blocks_writes(tmp_path: Path) -> None:
    """An admin change never overwrites a corrupt file (that would lose every account)."""
    pw = make(tmp_path)
    pw.path.write_bytes(b"{ nope")
    with pytest.raises(StoreError):
        pw.set_password("ted@a.test", "pw")
    assert pw.path.read_bytes() == b"{ nope"


def test_repr_hides_everything(tmp_path: Path) -> None:
    """repr of the file and the checker names the path only."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", SECRET)
    checker = PasswordFileChecker(pw, lambda: ["a.test"], _run_now)
    for text in (repr(pw), repr(checker)):
        assert SECRET not in text and "ted@a.test" not in text


# ---------------------------------------------------------------- concurrency and reloads


def test_reload_sees_other_writer(tmp_path: Path) -> None:
    """A reader sees another instance's (another process's) changes without a restart."""
    reader = make(tmp_path)
    writer = make(tmp_path)
    assert not reader.exists("ted@a.test")
    writer.set_password("ted@a.test", "pw")
    assert reader.exists("ted@a.test") and reader.verify("ted@a.test", "pw")
    assert reader.secret("ted@a.test") == "pw"
    writer.set_password("ted@a.test", "pw2")
    assert reader.verify("ted@a.test", "pw2") and not reader.verify("ted@a.test", "pw")
    writer.remove("ted@a.test")
    assert not reader.exists("ted@a.test")


def test_writer_keeps_other_writers_changes(tmp_path: Path) -> None:
    """Each write re-reads the file under the lock, so two instances never undo each other."""
    a = make(tmp_path)
    b = make(tmp_path)
    assert a.addresses() == []
    b.set_password("bob@a.test", "pw")
    a.set_password("ted@a.test", "pw")  # a's cache is stale; it must not drop bob
    assert make(tmp_path).addresses() == ["bob@a.test", "ted@a.test"]


def _add_many(folder: str, prefix: str, count: int) -> None:
    pw = PasswordFile(Path(folder) / "passwords.json", Path(folder) / "passwords.key", True, scrypt_n=FAST_N)
    for i in range(count):
        pw.set_password(f"{prefix}{i}@a.test", f"pw{i}")


def test_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    """Four processes adding addresses at once: every address is there at the end, with one
    key file that decrypts every secret."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_many, args=(str(tmp_path), f"u{n}x", 8)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    pw = make(tmp_path)
    assert len(pw.addresses()) == 32
    pw.check()
    assert pw.secret("u3x7@a.test") == "pw7"


def test_failed_write_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the rename fails, the old file is intact and no temporary file is left behind."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    before = pw.path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(StoreError, match="No space left"):
        pw.set_password("bob@a.test", "pw")
    monkeypatch.undo()
    assert pw.path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- the checker


def checker_for(pw: PasswordFile, domains: list[str]) -> PasswordFileChecker:
    return PasswordFileChecker(pw, lambda: list(domains), run_blocking=_run_now)


def test_checker_runs_work_through_run_blocking(tmp_path: Path) -> None:
    """Every check goes through run_blocking (deferToThread in the server): nothing blocking
    runs in the caller's thread."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    calls: list[object] = []
    pending: list[defer.Deferred] = []

    def run_later(f, *args):
        calls.append(f)
        d: defer.Deferred = defer.Deferred()
        pending.append(d)
        d.addCallback(lambda _: f(*args))
        return d

    checker = PasswordFileChecker(pw, lambda: ["a.test"], run_blocking=run_later)
    d = checker.requestAvatarId(UsernamePassword(b"ted@a.test", b"pw"))
    r = checker.resolve_recipient("ted@a.test")
    assert len(calls) == 2
    results: list[object] = []
    d.addCallback(results.append)
    r.addCallback(results.append)
    for p in pending:
        p.callback(None)
    assert results == ["ted@a.test", "ted@a.test"]


def test_checker_sees_domain_changes(tmp_path: Path) -> None:
    """The domains callable is asked on each check: a removed domain stops logging in, an
    added one starts, and the short form follows the number of domains."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    domains = ["a.test"]
    checker = PasswordFileChecker(pw, lambda: domains, run_blocking=_run_now)
    assert run_sync(checker.requestAvatarId(UsernamePassword(b"ted", b"pw"))) == "ted@a.test"
    domains.append("b.test")
    with pytest.raises(UnauthorizedLogin):
        run_sync(checker.requestAvatarId(UsernamePassword(b"ted", b"pw")))
    domains[:] = ["b.test"]
    with pytest.raises(UnauthorizedLogin):
        run_sync(checker.requestAvatarId(UsernamePassword(b"ted@a.test", b"pw")))
    assert run_sync(checker.resolve_recipient("ted@a.test")) is None


def test_checker_without_secrets_refuses_apop(tmp_path: Path) -> None:
    """A checker over a file without secrets does not take APOP, even if handed one."""
    pw = make(tmp_path, keep=False)
    pw.set_password("ted@a.test", "pw")
    checker = checker_for(pw, ["a.test"])
    magic = b"<1.2@a.test>"
    with pytest.raises(UnauthorizedLogin):
        run_sync(checker.requestAvatarId(APOPCredentials(magic, b"ted@a.test", apop_digest(magic, "pw"))))


def test_checker_broken_file_is_temporary(tmp_path: Path) -> None:
    """A corrupt file makes log-ins fail with AuthUnavailable (POP3 [SYS/TEMP]); fixing the
    file makes them work again without a restart."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    good = pw.path.read_bytes()
    checker = checker_for(pw, ["a.test"])
    pw.path.write_bytes(b"garbage")
    with pytest.raises(AuthUnavailable):
        run_sync(checker.requestAvatarId(UsernamePassword(b"ted@a.test", b"pw")))
    pw.path.write_bytes(good)
    assert run_sync(checker.requestAvatarId(UsernamePassword(b"ted@a.test", b"pw"))) == "ted@a.test"


# ---------------------------------------------------------------- later additions


def test_bad_password_is_admin_error(tmp_path: Path) -> None:
    """A refused password is a BadPassword: both a ValueError and an AdminError, so the admin
    command prints its one line instead of a traceback."""
    with pytest.raises(BadPassword) as info:
        make(tmp_path).set_password("ted@a.test", "")
    assert isinstance(info.value, AdminError) and isinstance(info.value, ValueError)
    assert str(info.value) == "the password is empty"


def test_restored_key_file_is_picked_up(tmp_path: Path) -> None:
    """A running reader whose key file was wrong picks up the restored one without a restart."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    good = pw.key_path.read_bytes()
    pw.key_path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    reader = make(tmp_path)
    with pytest.raises(StoreError, match="cannot be decrypted"):
        reader.secret("ted@a.test")
    pw.key_path.write_bytes(good)
    assert reader.secret("ted@a.test") == "pw"


def _config(tmp_path: Path, auth: str) -> Config:
    text = f'[server]\nhostname = "pop.contoso.test"\nstate_dir = "{tmp_path}"\n{auth}'
    return parse_config(text, tmp_path / "pop3coexist.toml")


class _FakeStore:
    def list_domains(self) -> list[str]:
        return ["pop.contoso.test"]


def test_make_password_file_follows_config(tmp_path: Path) -> None:
    """make_password_file uses <state_dir>/passwords.json and .key, keeping secrets exactly
    when auth.apop is true."""
    pw = make_password_file(_config(tmp_path, "[auth]\napop = true\n"), scrypt_n=FAST_N)
    assert pw.path == tmp_path / "passwords.json" and pw.key_path == tmp_path / "passwords.key"
    assert pw.keep_secrets is True
    assert make_password_file(_config(tmp_path, "[auth]\napop = false\n")).keep_secrets is False


def test_make_checker_passwordfile(tmp_path: Path) -> None:
    """make_checker gives a working PasswordFileChecker over the store's domains, offering
    secrets when auth.apop is true; with a reactor it runs checks in that reactor's pool."""
    config = _config(tmp_path, "")
    make_password_file(config, scrypt_n=FAST_N).set_password("ted@pop.contoso.test", "pw")
    checker = make_checker(config, _FakeStore())
    assert isinstance(checker, PasswordFileChecker) and checker.offers_secrets is True
    assert verifyObject(IAccountChecker, checker)
    plain = make_checker(_config(tmp_path, "[auth]\napop = false\n"), _FakeStore())
    assert plain.offers_secrets is False

    pools: list[object] = []

    class FakeReactor:
        def getThreadPool(self) -> object:
            pools.append("asked")
            return object()

    with_reactor = make_checker(config, _FakeStore(), FakeReactor())
    assert isinstance(with_reactor, PasswordFileChecker) and pools == ["asked"]
    # The checker itself works (run synchronously here).
    sync = PasswordFileChecker(checker.pwfile, _FakeStore().list_domains, _run_now)
    assert run_sync(sync.requestAvatarId(UsernamePassword(b"ted", b"pw"))) == "ted@pop.contoso.test"


def test_make_checker_other_methods_import_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """directory and local are built by their own modules, imported only when chosen."""
    import sys
    import types

    made: list[tuple] = []
    for name, cls in (("directory", "DirectoryChecker"), ("local", "LocalChecker")):
        module = types.ModuleType(f"pop3coexist.identity.{name}")
        setattr(module, cls, lambda *args, _n=name, **kw: made.append((_n, *args, *kw)) or _n)
        monkeypatch.setitem(sys.modules, f"pop3coexist.identity.{name}", module)
    config = _config(tmp_path, "")
    store = _FakeStore()
    directory_config = type("C", (), {"auth": type("A", (), {"method": "directory"})()})()
    local_config = type("C", (), {"auth": type("A", (), {"method": "local"})()})()
    assert make_checker(directory_config, store, "reactor") == "directory"
    assert make_checker(local_config, store) == "local"
    assert made == [
        ("directory", directory_config, "reactor", "local_domains"),
        ("local", local_config, store),
    ]
    assert config.auth.method == "passwordfile"


def test_every_refusal_spends_the_hash_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown users, unknown domains, bad names, empty or NUL passwords each run scrypt once
    with the same cost as a real check, so timing does not tell which accounts exist."""
    import pop3coexist.identity.passwordfile as module

    pw = make(tmp_path)
    pw.set_password("ted@a.test", "pw")
    checker = checker_for(pw, ["a.test"])
    calls: list[int] = []
    real = module._scrypt

    def counting(password, salt, n, r, p, dklen):
        calls.append(n)
        return real(password, salt, n, r, p, dklen)

    monkeypatch.setattr(module, "_scrypt", counting)
    cases = [
        (b"ted@a.test", b"pw"),
        (b"ted@a.test", b"wrong"),
        (b"nobody@a.test", b"pw"),
        (b"ted@other.test", b"pw"),
        (b"\xff", b"pw"),
        (b"ted@a.test", b""),
        (b"ted@a.test", b"pw\x00"),
        (b"ted@a.test", b"\xff"),
    ]
    for name, password in cases:
        calls.clear()
        d = checker.requestAvatarId(UsernamePassword(name, password))
        d.addErrback(lambda f: f.trap(UnauthorizedLogin))
        assert calls == [FAST_N], name


def test_hash_upgraded_after_login(tmp_path: Path) -> None:
    """After the scrypt cost is raised, a good log-in re-hashes with the new cost; the secret
    is kept, and a wrong password or an upgrade-off checker changes nothing."""
    old = make(tmp_path)
    old.set_password("ted@a.test", "pw")
    old.set_password("bob@a.test", "pw2")
    stronger = PasswordFile(old.path, old.key_path, True, scrypt_n=2**5)
    assert stronger.needs_rehash("ted@a.test")
    checker = checker_for(stronger, ["a.test"])
    with pytest.raises(UnauthorizedLogin):
        run_sync(checker.requestAvatarId(UsernamePassword(b"ted@a.test", b"wrong")))
    assert stronger.needs_rehash("ted@a.test")
    assert run_sync(checker.requestAvatarId(UsernamePassword(b"ted@a.test", b"pw"))) == "ted@a.test"
    assert not stronger.needs_rehash("ted@a.test")
    assert json.loads(old.path.read_text())["users"]["ted@a.test"]["hash"]["n"] == 2**5
    assert stronger.verify("ted@a.test", "pw") and stronger.secret("ted@a.test") == "pw"
    off = PasswordFileChecker(stronger, lambda: ["a.test"], _run_now, upgrade_hashes=False)
    assert run_sync(off.requestAvatarId(UsernamePassword(b"bob@a.test", b"pw2"))) == "bob@a.test"
    assert stronger.needs_rehash("bob@a.test")


def test_rehash_is_compare_and_set(tmp_path: Path) -> None:
    """rehash never writes an old password back over one changed since it was verified."""
    pw = make(tmp_path)
    pw.set_password("ted@a.test", "old")
    stronger = PasswordFile(pw.path, pw.key_path, True, scrypt_n=2**5)
    assert stronger.rehash("ted@a.test", "wrong") is False
    pw.set_password("ted@a.test", "new")
    assert stronger.rehash("ted@a.test", "old") is False
    assert stronger.verify("ted@a.test", "new")
    assert stronger.rehash("ted@a.test", "new") is True
    assert stronger.rehash("ted@a.test", "new") is False


def test_logs_never_hold_passwords(tmp_path: Path) -> None:
    """What the checker logs (file unavailable, hash upgraded) names addresses and reasons,
    never a password or secret."""
    from twisted.logger import formatEvent, globalLogPublisher

    pw = make(tmp_path)
    pw.set_password("ted@a.test", SECRET)
    stronger = PasswordFile(pw.path, pw.key_path, True, scrypt_n=2**5)
    checker = checker_for(stronger, ["a.test"])
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        run_sync(checker.requestAvatarId(UsernamePassword(b"ted@a.test", SECRET.encode())))
        pw.path.write_bytes(b"{ broken")
        with pytest.raises(AuthUnavailable) as info:
            run_sync(checker.requestAvatarId(UsernamePassword(b"ted@a.test", SECRET.encode())))
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events] + [str(info.value), repr(info.value)]
    assert any("upgraded" in t for t in texts) and any("unavailable" in t for t in texts)
    for t in texts:
        assert SECRET not in t


class _Stale:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stale_attributes_do_not_hide_an_account_added_elsewhere(tmp_path: Path) -> None:
    """On a shared volume stat() may describe the old file after another node renamed a new
    one over it (NFS attribute cache, GlusterFS FUSE timeouts): with the signature frozen, an
    account added by another writer is still found, its password verified, its SCRAM keys
    and secret returned, and a changed password takes effect, because a miss is looked up
    again in a fresh read. Within RECHECK_INTERVAL of the last read the file is not read
    again (a stranger guessing names cannot make every attempt a read)."""
    clock = _Stale()
    reader = make(tmp_path, keep=True, monotonic=clock)
    writer = make(tmp_path, keep=True)
    writer.set_password("old@pop.contoso.test", "Old-password-1")
    assert reader.verify("old@pop.contoso.test", "Old-password-1")
    frozen = reader._signature()
    reader._signature = lambda: frozen  # the attribute cache keeps describing this version
    reads = []
    real_read = reader._read
    reader._read = lambda: reads.append(1) or real_read()

    writer.set_password("new@pop.contoso.test", "New-password-1")
    writer.set_password("old@pop.contoso.test", "Changed-password-1")
    # read less than RECHECK_INTERVAL ago: the cached view answers, nothing is read
    assert not reader.exists("new@pop.contoso.test")
    assert reads == []
    clock.now += RECHECK_INTERVAL
    assert reader.exists("new@pop.contoso.test")
    assert reads == [1]
    clock.now += RECHECK_INTERVAL
    assert reader.verify("old@pop.contoso.test", "Changed-password-1")
    assert not reader.verify("old@pop.contoso.test", "Old-password-1")
    assert reader.secret("new@pop.contoso.test") == "New-password-1"
    assert reader.scram_keys("new@pop.contoso.test") is not None
    # a stranger's misses, all within one interval: at most one read
    before = len(reads)
    clock.now += RECHECK_INTERVAL
    for n in range(50):
        assert not reader.exists(f"guess{n}@pop.contoso.test")
        assert not reader.verify(f"guess{n}@pop.contoso.test", "Guess-1")
    assert len(reads) - before == 1


# ---------------------------------------------------------------- credential stamps


def test_credential_stamp_changes_with_every_password_change(tmp_path: Path) -> None:
    """ICredentialStamp: the stamp stays while nothing changes, differs after each password
    change (two in the same second too: 'changed' grows by at least one), survives a
    re-hash at a higher scrypt cost (same password), and is None once the account is removed
    or for an address with no password."""
    from pop3coexist.interfaces import ICredentialStamp

    pw = make(tmp_path, clock=lambda: 1_700_000_000.0)
    pw.set_password("ted@a.test", SECRET)
    checker = PasswordFileChecker(pw, lambda: ["a.test"], _run_now)
    verifyObject(ICredentialStamp, checker)

    def stamp(account: str = "ted@a.test"):
        return run_sync(checker.credential_stamp(account))

    first = stamp()
    assert isinstance(first, bytes) and stamp() == first
    pw.set_password("ted@a.test", "other")
    second = stamp()
    pw.set_password("ted@a.test", "third")  # the same clock second
    third = stamp()
    assert len({first, second, third}) == 3
    stronger = PasswordFile(pw.path, pw.key_path, True, scrypt_n=FAST_N * 2)
    assert stronger.rehash("ted@a.test", "third")
    assert stamp() == third
    pw.remove("ted@a.test")
    assert stamp() is None and stamp("nobody@a.test") is None
