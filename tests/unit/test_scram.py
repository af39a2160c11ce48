"""SCRAM-SHA-256 (RFC 5802, RFC 7677): the password file's stored keys, the checker, and the
exchange over the real POP3 (RFC 5034) and SMTP (RFC 4954) protocol objects on a
StringTransport, driven by scramp's client (the library the server uses, as a client)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from scramp import ScramClient
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.internet.address import IPv4Address
from zope.interface.verify import verifyObject

from pop3coexist.identity.passwordfile import PasswordFile, PasswordFileChecker
from pop3coexist.identity.scram import ScramCredentials, derive_keys
from pop3coexist.interfaces import IAccountChecker, IScramKeyStore
from pop3coexist.policy.throttle import AuthThrottle
from pop3coexist.pop3.factory import POP3ServerFactory
from tests.support.dialogue import take
from tests.support.fakes import FakeMailStore, sync_run_blocking
from tests.support.smtp_fakes import TLSStringTransport, make_factory, smtp_config
from tests.unit.pop3_env import TLSTransport, make_config

HOST = "pop.contoso.test"
TED = f"ted@{HOST}"
PW = "Scram pass, 1 = ok"
MECHS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")


def pwfile(tmp_path: Path, keep_secrets: bool = True) -> PasswordFile:
    return PasswordFile(tmp_path / "passwords.json", tmp_path / "passwords.key", keep_secrets,
                        scrypt_n=2)


def checker_for(pf: PasswordFile) -> PasswordFileChecker:
    c = PasswordFileChecker(pf, lambda: [HOST], run_blocking=sync_run_blocking)
    c.check()
    return c


def old_style_entry(pf: PasswordFile, address: str, password: str) -> None:
    """Write ``address`` as a password file from before SCRAM keys existed has it."""
    pf.set_password(address, password)
    doc = json.loads(pf.path.read_text())
    del doc["users"][address]["scram"]
    pf.path.write_text(json.dumps(doc))


def test_password_file_keeps_scram_keys_never_the_password(tmp_path):
    """set_password stores salt, iteration count (4096), StoredKey and ServerKey; a scramp
    client with the password proves itself against exactly those keys, and the file holds no
    form of the clear password outside the encrypted secret."""
    pf = pwfile(tmp_path, keep_secrets=False)
    pf.set_password(TED, PW)
    entry = json.loads(pf.path.read_text())["users"][TED]
    assert entry["scram"]["alg"] == "SCRAM-SHA-256" and entry["scram"]["i"] == 4096
    assert PW not in pf.path.read_text() and "secret" not in entry
    keys = pf.scram_keys(TED)
    assert keys is not None and keys.iterations == 4096
    again = derive_keys(PW, keys.iterations, keys.salt)
    assert (again.stored_key, again.server_key) == (keys.stored_key, keys.server_key)
    assert "stored" not in repr(keys) and str(keys.stored_key) not in repr(keys)


def test_old_password_files_keep_working_and_gain_keys(tmp_path):
    """An entry written before SCRAM keys existed loads and logs in; SCRAM is not offered
    while an account lacks keys; a clear-text log-in adds them (compare-and-set); the admin
    path (keys_from_secrets) makes them from the stored secret; then SCRAM is offered."""
    pf = pwfile(tmp_path)
    old_style_entry(pf, TED, PW)
    old_style_entry(pf, f"amy@{HOST}", "amy pw")
    checker = checker_for(pf)
    assert verifyObject(IScramKeyStore, checker) and verifyObject(IAccountChecker, checker)
    assert not checker.offers_scram
    from pop3coexist.pop3.sasl import PasswordCredentials

    d = checker.requestAvatarId(PasswordCredentials(TED, PW))
    assert d.result == TED
    assert pf.scram_keys(TED) is not None
    assert not pf.all_have_scram()
    made, missing = pf.keys_from_secrets()
    assert made == [f"amy@{HOST}"] and missing == []
    assert pf.all_have_scram() and checker.offers_scram


def test_keys_from_secrets_names_accounts_it_cannot_help(tmp_path):
    """Without stored secrets (auth.apop = false) an old entry cannot get keys from the
    admin verb: it is reported as still missing, and nothing is written."""
    pf = pwfile(tmp_path, keep_secrets=False)
    old_style_entry(pf, TED, PW)
    before = pf.path.read_bytes()
    assert pf.keys_from_secrets() == ([], [TED])
    assert pf.path.read_bytes() == before


def test_checker_accepts_only_the_current_stored_key(tmp_path):
    """ScramCredentials log in only while the StoredKey they proved is the account's: a
    password changed since (other keys) or an unknown user is UnauthorizedLogin."""
    pf = pwfile(tmp_path)
    pf.set_password(TED, PW)
    checker = checker_for(pf)
    keys = pf.scram_keys(TED)
    assert checker.requestAvatarId(ScramCredentials(TED, keys.stored_key)).result == TED
    pf.set_password(TED, "another password")
    d = checker.requestAvatarId(ScramCredentials(TED, keys.stored_key))
    assert d.result.check(UnauthorizedLogin)
    d.addErrback(lambda f: None)
    d = checker.requestAvatarId(ScramCredentials(f"nobody@{HOST}", keys.stored_key))
    assert d.result.check(UnauthorizedLogin)
    d.addErrback(lambda f: None)


# ---------------------------------------------------------------------- POP3


def pop3_session(tmp_path: Path, password_for_file: str = PW):
    pf = pwfile(tmp_path)
    pf.set_password(TED, password_for_file)
    store = FakeMailStore()
    store.add(TED, b"Subject: hi\n\nbody\n")
    clock = task.Clock()
    factory = POP3ServerFactory(make_config(sasl_mechanisms=MECHS), store, checker_for(pf),
                                reactor=clock, run_blocking=sync_run_blocking,
                                throttle=AuthThrottle(clock, base=2.0, maximum=30.0))
    proto = factory.buildProtocol(None)
    transport = TLSTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000),
                             hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    proto.makeConnection(transport)
    take(transport)
    return proto, transport, clock


def b64(data: str) -> bytes:
    return base64.b64encode(data.encode())


def unb64(reply: bytes, prefix: bytes) -> str:
    assert reply.startswith(prefix) and reply.endswith(b"\r\n"), reply
    return base64.b64decode(reply[len(prefix):-2]).decode()


def test_pop3_capa_offers_scram_with_the_password_file(tmp_path):
    """CAPA's SASL line ends with SCRAM-SHA-256 when the checker keeps SCRAM keys for every
    account."""
    proto, transport, _ = pop3_session(tmp_path)
    proto.dataReceived(b"CAPA\r\n")
    assert b"SASL PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256\r\n" in take(transport)


@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "empty-challenge"])
def test_pop3_scram_exchange_logs_in(tmp_path, initial):
    """The whole RFC 5034 exchange: client-first (as initial response or after '+ '),
    server-first, client-final, server-final as a '+' challenge whose signature the client
    verifies, an empty response, then +OK and the maildrop."""
    proto, transport, _ = pop3_session(tmp_path)
    client = ScramClient(["SCRAM-SHA-256"], TED, PW)
    first = client.get_client_first()
    if initial:
        proto.dataReceived(b"AUTH SCRAM-SHA-256 " + b64(first) + b"\r\n")
    else:
        proto.dataReceived(b"AUTH SCRAM-SHA-256\r\n")
        assert take(transport) == b"+ \r\n"
        proto.dataReceived(b64(first) + b"\r\n")
    client.set_server_first(unb64(take(transport), b"+ "))
    proto.dataReceived(b64(client.get_client_final()) + b"\r\n")
    client.set_server_final(unb64(take(transport), b"+ "))  # raises on a bad signature
    proto.dataReceived(b"\r\n")
    assert take(transport).startswith(b"+OK ted@pop.contoso.test has 1 messages")


def test_pop3_scram_wrong_password_is_a_delayed_auth_refusal(tmp_path):
    """A wrong proof gets -ERR [AUTH] after the failure delay (the throttle), never a
    server-final message; the session then takes another log-in."""
    proto, transport, clock = pop3_session(tmp_path)
    client = ScramClient(["SCRAM-SHA-256"], TED, "wrong password")
    proto.dataReceived(b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first()) + b"\r\n")
    client.set_server_first(unb64(take(transport), b"+ "))
    proto.dataReceived(b64(client.get_client_final()) + b"\r\n")
    assert take(transport) == b""
    clock.advance(2.0)
    assert take(transport).startswith(b"-ERR [AUTH]")
    proto.dataReceived(f"USER {TED}\r\nPASS {PW}\r\n".encode())
    assert b"+OK ted@pop.contoso.test has 1 messages" in take(transport)


def test_pop3_scram_unknown_user_looks_like_a_known_one(tmp_path):
    """An unknown user gets a server-first message of the same shape (a salt and 4096
    iterations; the same salt each time), and the proof then fails as a wrong password."""
    salts = []
    for _ in range(2):
        proto, transport, clock = pop3_session(tmp_path / str(len(salts)))
        client = ScramClient(["SCRAM-SHA-256"], f"nobody@{HOST}", PW)
        proto.dataReceived(b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first()) + b"\r\n")
        server_first = unb64(take(transport), b"+ ")
        fields = dict(f.split("=", 1) for f in server_first.split(","))
        assert fields["i"] == "4096" and len(base64.b64decode(fields["s"])) == 16
        salts.append(fields["s"])
        client.set_server_first(server_first)
        proto.dataReceived(b64(client.get_client_final()) + b"\r\n")
        clock.advance(2.0)
        assert take(transport).startswith(b"-ERR [AUTH]")
    assert salts[0] == salts[1]


def test_pop3_scram_malformed_messages_end_the_exchange_cleanly(tmp_path):
    """A client-first message that is not SCRAM, or a channel-binding demand the server does
    not offer (p=), is a refused log-in; the session goes on."""
    for bad in ("hello", "p=tls-unique,,n=ted,r=abc", "n,a=amy@pop.contoso.test,n=ted,r=abc"):
        proto, transport, clock = pop3_session(tmp_path / str(abs(hash(bad))))
        proto.dataReceived(b"AUTH SCRAM-SHA-256 " + b64(bad) + b"\r\n")
        clock.advance(2.0)
        assert take(transport).startswith(b"-ERR [AUTH]"), bad
        proto.dataReceived(b"NOOP\r\n")
        assert take(transport).startswith(b"-ERR"), bad  # NOOP before log-in: a live session


# ---------------------------------------------------------------------- SMTP


def smtp_session(tmp_path: Path):
    pf = pwfile(tmp_path)
    pf.set_password(TED, PW)
    store = FakeMailStore()
    store.add(TED)
    factory, _store, _checker, _queue, clock = make_factory(
        smtp_config(), store=store, checker=checker_for(pf), tls=False)
    proto = factory.buildProtocol(None)
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "203.0.113.5", 40000),
                                   hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO client.example.test\r\n")
    return proto, transport, clock


def test_smtp_ehlo_offers_scram_and_the_exchange_logs_in(tmp_path):
    """EHLO advertises SCRAM-SHA-256; the RFC 4954 exchange (334 challenges, the
    server-final message as a 334 the client verifies, an empty line) ends in 235 2.7.0."""
    proto, transport, _ = smtp_session(tmp_path)
    assert b"250 AUTH PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256\r\n" in take(transport)
    client = ScramClient(["SCRAM-SHA-256"], TED, PW)
    proto.dataReceived(b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first()) + b"\r\n")
    client.set_server_first(unb64(take(transport), b"334 "))
    proto.dataReceived(b64(client.get_client_final()) + b"\r\n")
    client.set_server_final(unb64(take(transport), b"334 "))
    proto.dataReceived(b"\r\n")
    assert take(transport) == b"235 2.7.0 Authentication successful\r\n"


def test_smtp_scram_wrong_password_is_535_after_the_delay(tmp_path):
    """A wrong proof is 535 5.7.8 after the throttle's delay, as a wrong password is."""
    proto, transport, clock = smtp_session(tmp_path)
    take(transport)
    client = ScramClient(["SCRAM-SHA-256"], TED, "not it")
    proto.dataReceived(b"AUTH SCRAM-SHA-256\r\n")
    assert take(transport) == b"334 \r\n"
    proto.dataReceived(b64(client.get_client_first()) + b"\r\n")
    client.set_server_first(unb64(take(transport), b"334 "))
    proto.dataReceived(b64(client.get_client_final()) + b"\r\n")
    assert take(transport) == b""
    clock.advance(60)
    assert take(transport).startswith(b"535 5.7.8")
