"""The ManageSieve server (RFC 5804) byte for byte over StringTransport: greeting and
capabilities, STARTTLS (capabilities again, nothing before the handshake kept), SASL PLAIN and
LOGIN (with and without an initial response, cancel), the POP3 throttle on a wrong password
(task.Clock), literals, every script command and its response codes, and bad input that
gets NO with the session still alive."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from twisted.internet import task

from pop3coexist.config import Config, DomainsConfig, ManageSieveConfig, ServerConfig
from pop3coexist.managesieve.server import ManageSieveFactory
from pop3coexist.policy.sieve import EXTENSIONS
from pop3coexist.policy.throttle import AuthThrottle
from pop3coexist.store.maildir import MaildirStore
from pop3coexist.store.sievestore import SieveScripts
from tests.support.dialogue import connect, run_dialogue, take
from tests.support.fakes import FakeChecker, sync_run_blocking
from tests.unit.pop3_env import TLSTransport

HOST = "pop.contoso.test"
TED, TED_PW = "ted@pop.contoso.test", "ted pw"
SIEVE = " ".join(EXTENSIONS).encode()


def caps(sasl: bytes, starttls: bool) -> bytes:
    return (b'"IMPLEMENTATION" "pop3coexist"\r\n"SIEVE" "' + SIEVE + b'"\r\n"SASL" "' + sasl +
            b'"\r\n' + (b'"STARTTLS"\r\n' if starttls else b"") +
            b'"MAXREDIRECTS" "4"\r\n"VERSION" "1.0"\r\n')


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


class Env:
    def __init__(self, tmp: Path, require_tls: bool = False, tls: bool = False,
                 max_size: int = 200, max_scripts: int = 2) -> None:
        self.clock = task.Clock()
        self.store = MaildirStore(tmp / "mailroot")
        self.store.add_domain(HOST)
        self.store.add_mailbox(HOST, "ted")
        self.store.add_mailbox(HOST, "locked")
        self.store.set_mailbox_locked(HOST, "locked", True)
        self.checker = FakeChecker({TED: TED_PW, "locked@pop.contoso.test": "pw",
                                    "nobox@pop.contoso.test": "pw"}, local_domains=(HOST,))
        self.throttle = AuthThrottle(self.clock, base=2.0, maximum=30.0)
        self.scripts = SieveScripts(self.store)
        config = Config(server=ServerConfig(HOST, tmp), domains=DomainsConfig(local=(HOST,)),
                        managesieve=ManageSieveConfig(require_tls=require_tls,
                                                      max_script_size=max_size,
                                                      max_scripts=max_scripts))
        self.factory = ManageSieveFactory(config, self.store, self.checker, self.scripts,
                                          self.throttle, tls_options=object() if tls else None,
                                          reactor=self.clock, run_blocking=sync_run_blocking)

    def session(self, transport=None):  # noqa: ANN001, ANN201
        proto = self.factory.buildProtocol(None)
        if transport is None:
            return proto, connect(proto)
        proto.makeConnection(transport)
        return proto, transport

    def logged_in(self):  # noqa: ANN201
        proto, t = self.session()
        take(t)
        proto.dataReceived(b'AUTHENTICATE "PLAIN" "' + plain(TED, TED_PW) + b'"\r\n')
        assert take(t) == b'OK "Logged in"\r\n'
        return proto, t


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_greeting_capability_noop_logout(env: Env) -> None:
    """The greeting is the capability list then OK; CAPABILITY repeats it; NOOP echoes a tag;
    LOGOUT answers OK and closes."""
    proto, t = env.session()
    assert take(t) == caps(b"PLAIN LOGIN", False) + b'OK "pop3coexist ManageSieve ready"\r\n'
    run_dialogue(proto, [
        (b"CAPABILITY\r\n", caps(b"PLAIN LOGIN", False) + b'OK "Capability completed"\r\n'),
        (b'NOOP "t1"\r\n', b'OK (TAG "t1") "Done"\r\n'),
        (b"LISTSCRIPTS\r\n", b'NO "log in first (AUTHENTICATE)"\r\n'),
        (b"FROB\r\n", b'NO "unknown command FROB"\r\n'),
        (b'NOOP "unterminated\r\n', b'NO "cannot read the command line"\r\n'),
        (b"LOGOUT\r\n", b'OK "Logout completed"\r\n'),
    ], transport=t)
    assert t.disconnecting


def test_starttls_then_sasl_is_offered(tmp_path: Path) -> None:
    """require_tls: no mechanism before STARTTLS (AUTHENTICATE gets ENCRYPT-NEEDED); after
    it the capabilities come again, unasked, with PLAIN LOGIN and without STARTTLS."""
    env = Env(tmp_path, require_tls=True, tls=True)
    t = TLSTransport()
    proto, t = env.session(t)
    assert take(t) == caps(b"", True) + b'OK "pop3coexist ManageSieve ready"\r\n'
    run_dialogue(proto, [
        (b'AUTHENTICATE "PLAIN" "' + plain(TED, TED_PW) + b'"\r\n',
         b'NO (ENCRYPT-NEEDED) "use STARTTLS first: no clear-text password on this '
         b'connection"\r\n'),
        (b"STARTTLS\r\n", b'OK "Begin TLS negotiation now"\r\n' + caps(b"PLAIN LOGIN", False)
         + b'OK "TLS negotiation successful"\r\n'),
        (b'AUTHENTICATE "PLAIN" "' + plain(TED, TED_PW) + b'"\r\n', b'OK "Logged in"\r\n'),
    ], transport=t)
    assert t.tls_options is not None
    assert t.written_before_tls.endswith(b'OK "Begin TLS negotiation now"\r\n')


def test_sasl_login_and_plain_without_initial_response(env: Env) -> None:
    """LOGIN asks Username: and Password: as quoted base64; PLAIN without an initial
    response sends an empty challenge; "*" cancels."""
    proto, t = env.session()
    take(t)
    user64 = base64.b64encode(TED.encode())
    run_dialogue(proto, [
        (b'AUTHENTICATE "LOGIN"\r\n', b'"VXNlcm5hbWU6"\r\n'),
        (b'"*"\r\n', b'NO "authentication cancelled"\r\n'),
        (b'AUTHENTICATE "PLAIN"\r\n', b'""\r\n'),
        (b'"' + plain(TED, TED_PW) + b'"\r\n', b'OK "Logged in"\r\n'),
    ], transport=t)
    proto, t = env.session()
    take(t)
    run_dialogue(proto, [
        (b'AUTHENTICATE "LOGIN"\r\n', b'"VXNlcm5hbWU6"\r\n'),
        (b'"' + user64 + b'"\r\n', b'"UGFzc3dvcmQ6"\r\n'),
        (b'{%d+}\r\n' % len(base64.b64encode(TED_PW.encode())) +
         base64.b64encode(TED_PW.encode()) + b"\r\n", b'OK "Logged in"\r\n'),
    ], transport=t)


def test_wrong_password_waits_for_the_throttle(env: Env) -> None:
    """A refused log-in answers only after POP3's throttle delay (2 s here, on the clock); a
    locked mailbox, an account with no mailbox and a proxy authzid are refused the same way."""
    proto, t = env.session()
    take(t)
    proto.dataReceived(b'AUTHENTICATE "PLAIN" "' + plain(TED, "wrong") + b'"\r\n')
    assert take(t) == b""
    env.clock.advance(2.0)
    assert take(t) == b'NO "Authentication failed"\r\n'
    for user, pw, authz in (("locked@pop.contoso.test", "pw", ""),
                            ("nobox@pop.contoso.test", "pw", ""),
                            (TED, TED_PW, "locked@pop.contoso.test")):
        proto.dataReceived(b'AUTHENTICATE "PLAIN" "' + plain(user, pw, authz) + b'"\r\n')
        env.clock.advance(60)
        assert take(t) == b'NO "Authentication failed"\r\n'
    assert env.checker.attempts[0] == (TED, "bad")
    assert TED_PW not in repr(env.checker.attempts)


def test_putscript_checkscript_and_errors_with_lines(env: Env) -> None:
    """PUTSCRIPT takes a literal, validates with the delivery's parser (NO with the line);
    CHECKSCRIPT the same without storing; the quota answers QUOTA/MAXSIZE and
    QUOTA/MAXSCRIPTS, HAVESPACE too."""
    proto, t = env.logged_in()
    good = b'require "fileinto";\r\nfileinto "x";\r\n'
    bad = b'keep;\r\n\r\nfileinto "x";\r\n'
    run_dialogue(proto, [
        (b'PUTSCRIPT "one" {%d+}\r\n' % len(good) + good + b"\r\n", b'OK "Script stored"\r\n'),
        (b'PUTSCRIPT "two" {%d+}\r\n' % len(bad) + bad + b"\r\n",
         b'NO "line 3: fileinto needs require \\"fileinto\\""\r\n'),
        (b'CHECKSCRIPT {%d+}\r\n' % len(bad) + bad + b"\r\n",
         b'NO "line 3: fileinto needs require \\"fileinto\\""\r\n'),
        (b'CHECKSCRIPT "keep;"\r\n', b'OK "Script is valid"\r\n'),
        (b'HAVESPACE "two" 500\r\n', b'NO (QUOTA/MAXSIZE) "a script may have 200 octets at '
         b'most"\r\n'),
        (b'HAVESPACE "two" 50\r\n', b'OK "Putscript would succeed"\r\n'),
        (b'PUTSCRIPT "two" "keep;"\r\n', b'OK "Script stored"\r\n'),
        (b'PUTSCRIPT "three" "keep;"\r\n', b'NO (QUOTA/MAXSCRIPTS) "2 scripts at most"\r\n'),
        (b'PUTSCRIPT "two" "discard;"\r\n', b'OK "Script stored"\r\n'),  # replacing: no quota
        (b'PUTSCRIPT "a/b" "keep;"\r\n',
         b'NO "a script name neither starts with \'.\' nor holds \'/\'"\r\n'),
        (b"LISTSCRIPTS\r\n", b'"one"\r\n"two"\r\nOK "Listscripts completed"\r\n'),
    ], transport=t)
    assert env.scripts.get_script(HOST, "ted", "one") == good.decode()


def test_setactive_get_rename_delete_and_their_codes(env: Env) -> None:
    """SETACTIVE marks ACTIVE in LISTSCRIPTS; GETSCRIPT answers a literal; the active script
    cannot be deleted (ACTIVE); unknown ones are NONEXISTENT; a rename onto an existing name
    is ALREADYEXISTS; SETACTIVE "" deactivates."""
    env.scripts.put_script(HOST, "ted", "a", "keep;\n")
    env.scripts.put_script(HOST, "ted", "b", "discard;\n")
    proto, t = env.logged_in()
    run_dialogue(proto, [
        (b'SETACTIVE "a"\r\n', b'OK "Setactive completed"\r\n'),
        (b"LISTSCRIPTS\r\n", b'"a" ACTIVE\r\n"b"\r\nOK "Listscripts completed"\r\n'),
        (b'GETSCRIPT "a"\r\n', b'{6}\r\nkeep;\n\r\nOK "Getscript completed"\r\n'),
        (b'GETSCRIPT "zz"\r\n', b'NO (NONEXISTENT) "there is no script \'zz\'"\r\n'),
        (b'SETACTIVE "zz"\r\n', b'NO (NONEXISTENT) "there is no script \'zz\'"\r\n'),
        (b'DELETESCRIPT "a"\r\n', b'NO (ACTIVE) "\'a\' is the active script; deactivate it '
         b'first"\r\n'),
        (b'RENAMESCRIPT "a" "b"\r\n', b'NO (ALREADYEXISTS) "a script \'b\' exists already"\r\n'),
        (b'RENAMESCRIPT "a" "c"\r\n', b'OK "Renamescript completed"\r\n'),
        (b"LISTSCRIPTS\r\n", b'"b"\r\n"c" ACTIVE\r\nOK "Listscripts completed"\r\n'),
        (b'SETACTIVE ""\r\n', b'OK "No script is active now"\r\n'),
        (b'DELETESCRIPT "c"\r\n', b'OK "Deletescript completed"\r\n'),
        (b'DELETESCRIPT "c"\r\n', b'NO (NONEXISTENT) "there is no script \'c\'"\r\n'),
        (b'RENAMESCRIPT "b"\r\n', b'NO "wrong number of arguments for RENAMESCRIPT"\r\n'),
        (b"UNAUTHENTICATE\r\n", b'OK "Unauthenticate completed"\r\n'),
        (b"LISTSCRIPTS\r\n", b'NO "log in first (AUTHENTICATE)"\r\n'),
    ], transport=t)


def test_a_literal_over_the_limit_ends_the_session(env: Env) -> None:
    """A literal larger than the script quota allows is not read: BYE and the connection
    closes (nothing is buffered)."""
    proto, t = env.logged_in()
    proto.dataReceived(b'PUTSCRIPT "big" {99999999+}\r\n')
    assert take(t) == b'BYE "literal too large"\r\n' and t.disconnecting


def test_idle_session_is_closed(env: Env) -> None:
    """idle_timeout (10 minutes by default) ends a silent session with BYE."""
    proto, t = env.session()
    take(t)
    env.clock.advance(601)
    assert take(t) == b'BYE "idle for too long"\r\n' and t.disconnecting


def test_too_many_sessions_from_one_address_get_bye(tmp_path: Path) -> None:
    """Past max_connections_per_client a new session gets BYE at once and is closed; when one
    ends, a new one is served again."""
    env = Env(tmp_path)
    env.factory.limiter.per_client = 1
    first, t1 = env.session()
    assert take(t1).endswith(b'OK "pop3coexist ManageSieve ready"\r\n')
    second, t2 = env.session()
    assert take(t2) == b'BYE "too many connections, try again later"\r\n' and t2.disconnecting
    second.dataReceived(b"CAPABILITY\r\n")
    assert take(t2) == b""
    second.connectionLost()
    first.connectionLost()
    third, t3 = env.session()
    assert take(t3).endswith(b'OK "pop3coexist ManageSieve ready"\r\n')


def test_password_checks_pass_the_log_in_gate(env: Env) -> None:
    """ManageSieve checks a password only when the gate it shares with POP3 lets it: a source
    with a failure is not checked again before its delay, however many sessions it opens (a
    guesser cannot use port 4190 to check passwords in parallel)."""
    proto, t = env.session()
    take(t)
    proto.dataReceived(b'AUTHENTICATE "PLAIN" "' + plain(TED, "wrong") + b'"\r\n')
    second, t2 = env.session()
    take(t2)
    second.dataReceived(b'AUTHENTICATE "PLAIN" "' + plain(TED, TED_PW) + b'"\r\n')
    env.clock.advance(1.9)  # the failure delay (2 s) has not passed: no check, no answer yet
    assert take(t) == b""
    assert take(t2) == b""  # (without the gate a right password answers OK at once)
    env.clock.advance(0.2)
    assert take(t) == b'NO "Authentication failed"\r\n'
    assert take(t2) == b'OK "Logged in"\r\n'
