"""Byte-exact POP3 dialogues: greeting, CAPA variants, log-in methods and outcomes, STLS,
TRANSACTION commands and their error paths, pipelining, throttling, timeouts, limits."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from pop3coexist.errors import AuthUnavailable, StoreError
from pop3coexist.policy.connlimit import ConnectionLimiter
from tests.support.dialogue import run_dialogue, take
from tests.unit.pop3_env import (
    AMY,
    MSG1,
    MSG2,
    TED,
    TED_PW,
    TLS_OPTIONS,
    Env,
    apop_digest,
    timestamp,
)

OK_TED = b"+OK ted@pop.contoso.test has 2 messages (85 octets)\r\n"
AUTH_FAILED = b"-ERR [AUTH] authentication failed\r\n"
BASE_CAPS = b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
IMPL = b"IMPLEMENTATION pop3coexist\r\n.\r\n"
CAPA_HEAD = b"+OK Capability list follows\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def dialogue(proto, transport, rows, clock=None):
    """Rows of (client line without CRLF | None, expected bytes)."""
    rows = [((c + b"\r\n") if c is not None else None, e) for c, e in rows]
    return run_dialogue(proto, rows, transport=transport)


# ---------------------------------------------------------------------- greeting


def test_greeting_has_rfc1939_timestamp_when_apop_is_offered():
    """With secrets the greeting ends with a unique <pid.counter.clock@host> of safe characters."""
    env = Env()
    _, _, g1 = env.connect()
    _, _, g2 = env.connect()
    assert g1.startswith(b"+OK pop.contoso.test POP3 server ready <")
    t1, t2 = timestamp(g1), timestamp(g2)
    assert t1 != t2
    assert re.fullmatch(rb"<[A-Za-z0-9.@_+/-]+>", t1)
    assert t1.endswith(b"@pop.contoso.test>")


def test_greeting_without_timestamp_when_no_secrets():
    """Without APOP (checker keeps no secrets) the greeting has no timestamp."""
    env = Env(secrets=False)
    _, _, greeting = env.connect()
    assert greeting == b"+OK pop.contoso.test POP3 server ready\r\n"


# ---------------------------------------------------------------------- CAPA


def capa(env: Env, before: bytes = b"") -> bytes:
    proto, transport, _ = env.connect()
    if before:
        proto.dataReceived(before)
        take(transport)
    proto.dataReceived(b"CAPA\r\n")
    return take(transport)


def test_capa_clear_text_without_tls():
    """No TLS configured: USER and SASL PLAIN LOGIN CRAM-MD5, no STLS, no joke tokens."""
    assert capa(Env()) == (CAPA_HEAD + BASE_CAPS + b"USER\r\nSASL PLAIN LOGIN CRAM-MD5\r\n" + IMPL)


def test_capa_offers_stls_when_tls_is_configured():
    """TLS configured and not yet active: STLS is listed."""
    assert capa(Env(tls=True)) == (
        CAPA_HEAD + BASE_CAPS + b"USER\r\nSASL PLAIN LOGIN CRAM-MD5\r\nSTLS\r\n" + IMPL)


def test_capa_after_stls_drops_stls():
    """After STLS the capability list no longer offers STLS."""
    env = Env(tls=True, require_secure_auth=True)
    assert capa(env, b"STLS\r\n") == (
        CAPA_HEAD + BASE_CAPS + b"USER\r\nSASL PLAIN LOGIN CRAM-MD5\r\n" + IMPL)


def test_capa_require_secure_auth_in_clear():
    """require_secure_auth in clear text: no USER, SASL only CRAM-MD5, STLS offered."""
    assert capa(Env(tls=True, require_secure_auth=True)) == (
        CAPA_HEAD + BASE_CAPS + b"SASL CRAM-MD5\r\nSTLS\r\n" + IMPL)


def test_capa_require_secure_auth_without_secrets_has_no_sasl():
    """require_secure_auth, no secrets, clear text: neither USER nor SASL, only STLS."""
    assert capa(Env(tls=True, require_secure_auth=True, secrets=False)) == (
        CAPA_HEAD + BASE_CAPS + b"STLS\r\n" + IMPL)


def test_capa_follows_the_configured_sasl_mechanisms():
    """pop3.sasl_mechanisms limits SASL; with none, CAPA has no SASL line and AUTH is refused
    (clients such as curl then log in with USER/PASS)."""
    assert capa(Env(sasl_mechanisms=("CRAM-MD5",))) == (
        CAPA_HEAD + BASE_CAPS + b"USER\r\nSASL CRAM-MD5\r\n" + IMPL)
    env = Env(sasl_mechanisms=())
    assert capa(env) == CAPA_HEAD + BASE_CAPS + b"USER\r\n" + IMPL
    proto, transport, _ = env.connect()
    proto.dataReceived(b"AUTH PLAIN\r\n")
    assert transport.value() == b"-ERR unsupported SASL mechanism\r\n"


def test_capa_without_secrets_has_no_cram():
    """Without secrets SASL lists PLAIN LOGIN only."""
    assert capa(Env(secrets=False)) == (
        CAPA_HEAD + BASE_CAPS + b"USER\r\nSASL PLAIN LOGIN\r\n" + IMPL)


def test_capa_on_implicit_tls_listener():
    """POP3S: secure from the first byte, so USER and PLAIN are offered and STLS is not."""
    assert capa(Env(implicit_tls=True, require_secure_auth=True)) == (
        CAPA_HEAD + BASE_CAPS + b"USER\r\nSASL PLAIN LOGIN CRAM-MD5\r\n" + IMPL)


def test_capa_after_login_omits_login_capabilities():
    """After log-in CAPA omits USER, SASL and STLS."""
    env = Env(tls=True)
    proto, transport = env.login()
    proto.dataReceived(b"CAPA\r\n")
    assert take(transport) == CAPA_HEAD + BASE_CAPS + IMPL


def test_capa_with_argument_is_an_error():
    """CAPA takes no argument."""
    proto, transport, _ = Env().connect()
    dialogue(proto, transport, [(b"CAPA x", b"-ERR syntax: CAPA\r\n")])


# ---------------------------------------------------------------------- USER / PASS


def test_user_pass_success_and_quit_in_authorization():
    """USER/PASS logs in with the RFC 1939 reply; QUIT before log-in just says goodbye."""
    env = Env()
    proto, transport, _ = env.connect()
    dialogue(proto, transport, [
        (b"USER " + TED.upper().encode(), b"+OK send PASS\r\n"),
        (b"PASS " + TED_PW.encode(), OK_TED),
    ])
    proto2, transport2, _ = env.connect("192.0.2.11")
    dialogue(proto2, transport2, [(b"QUIT", b"+OK pop.contoso.test POP3 server signing off\r\n")])
    assert transport2.disconnecting


def test_bare_local_part_logs_in_with_one_domain():
    """The bare local part is a valid log-in name when there is one local domain."""
    proto, transport, _ = Env().connect()
    dialogue(proto, transport, [(b"USER ted", b"+OK send PASS\r\n"),
                                (b"PASS " + TED_PW.encode(), OK_TED)])


def test_pass_errors():
    """PASS without USER, USER without a name or with two, PASS without a password: -ERR and
    the session goes on; wrong password and unknown user give the same [AUTH] reply."""
    env = Env()
    env.throttle.base = 0
    proto, transport, _ = env.connect()
    dialogue(proto, transport, [
        (b"PASS x", b"-ERR USER first\r\n"),
        (b"USER", b"-ERR syntax: USER name\r\n"),
        (b"USER a b", b"-ERR syntax: USER name\r\n"),
        (b"USER ted", b"+OK send PASS\r\n"),
        (b"PASS", b"-ERR syntax: PASS password\r\n"),
        (b"PASS again", b"-ERR USER first\r\n"),
        (b"USER ted", b"+OK send PASS\r\n"),
        (b"PASS wrong", AUTH_FAILED),
        (b"USER nobody", b"+OK send PASS\r\n"),
        (b"PASS " + TED_PW.encode(), AUTH_FAILED),
        (b"USER ted", b"+OK send PASS\r\n"),
        (b"PASS " + TED_PW.encode(), OK_TED),
    ])


def test_password_with_utf8_is_accepted():
    """A UTF-8 password in PASS reaches the checker intact."""
    env = Env()
    env.checker.accounts[AMY] = "pässwörd"
    proto, transport, _ = env.connect()
    dialogue(proto, transport, [
        (b"USER " + AMY.encode(), b"+OK send PASS\r\n"),
        ("PASS pässwörd".encode(), b"+OK amy@pop.contoso.test has 0 messages (0 octets)\r\n"),
    ])


# ---------------------------------------------------------------------- APOP


def test_apop_rfc1939_example_digest():
    """APOP succeeds with the RFC 1939 section 7 example (timestamp + tanstaaf -> c4c9...)."""
    env = Env()
    env.checker.accounts[TED] = "tanstaaf"
    env.factory.new_timestamp = lambda: b"<1896.697170952@dbc.mtview.ca.us>"
    proto, transport, greeting = env.connect()
    assert greeting.endswith(b" <1896.697170952@dbc.mtview.ca.us>\r\n")
    dialogue(proto, transport, [
        (b"APOP ted c4c9334bac560ecc979e58001b3e22fb", OK_TED),
    ])


def test_apop_with_live_timestamp_and_failures():
    """APOP with md5(timestamp+secret) logs in; a wrong digest is [AUTH]; bad syntax -ERR."""
    env = Env()
    env.throttle.base = 0
    proto, transport, greeting = env.connect()
    digest = apop_digest(timestamp(greeting), TED_PW)
    dialogue(proto, transport, [
        (b"APOP ted", b"-ERR syntax: APOP name digest\r\n"),
        (b"APOP ted xyz", b"-ERR syntax: APOP name digest\r\n"),
        (b"APOP ted " + b"0" * 32, AUTH_FAILED),
        (b"APOP ted " + digest.upper(), OK_TED),
    ])


def test_apop_not_offered_without_secrets():
    """Without secrets APOP is refused (no timestamp was given)."""
    proto, transport, _ = Env(secrets=False).connect()
    dialogue(proto, transport, [(b"APOP ted " + b"0" * 32, b"-ERR APOP is not available\r\n")])


# ---------------------------------------------------------------------- AUTH


def test_auth_without_mechanism_lists_mechanisms():
    """Bare AUTH lists the mechanisms offered now."""
    proto, transport, _ = Env().connect()
    dialogue(proto, transport, [
        (b"AUTH", b"+OK SASL mechanisms follow\r\nPLAIN\r\nLOGIN\r\nCRAM-MD5\r\n.\r\n"),
    ])


def test_auth_plain_initial_response_and_continuation():
    """AUTH PLAIN works with an initial response and with an empty challenge."""
    env = Env()
    proto, transport, _ = env.connect()
    dialogue(proto, transport, [
        (b"AUTH PLAIN " + b64(b"\0ted\0" + TED_PW.encode()), OK_TED),
    ])
    proto.connectionLost(None)
    proto2, transport2, _ = env.connect()
    dialogue(proto2, transport2, [
        (b"AUTH plain", b"+ \r\n"),
        (b64(b"ted@pop.contoso.test\0ted@pop.contoso.test\0" + TED_PW.encode()), OK_TED),
    ])


def test_auth_plain_failures():
    """Cancel, garbage base64, '=' (empty), wrong authzid, wrong password: each -ERR, session
    goes on."""
    env = Env()
    env.throttle.base = 0
    proto, transport, _ = env.connect()
    dialogue(proto, transport, [
        (b"AUTH PLAIN", b"+ \r\n"),
        (b"*", b"-ERR authentication cancelled\r\n"),
        (b"AUTH PLAIN", b"+ \r\n"),
        (b"!!not base64!!", b"-ERR invalid base64 in SASL response\r\n"),
        (b"AUTH PLAIN !!!!", b"-ERR invalid base64 in SASL response\r\n"),
        (b"AUTH PLAIN =", AUTH_FAILED),
        (b"AUTH PLAIN " + b64(b"amy\0ted\0" + TED_PW.encode()), AUTH_FAILED),
        (b"AUTH PLAIN " + b64(b"\0ted\0wrong"), AUTH_FAILED),
        (b"AUTH PLAIN a b c", b"-ERR syntax: AUTH mechanism [initial-response]\r\n"),
        (b"AUTH NTLM", b"-ERR unsupported SASL mechanism\r\n"),
        (b"NOOP", b"-ERR NOOP not valid in the AUTHORIZATION state\r\n"),
        (b"AUTH PLAIN " + b64(b"\0ted\0" + TED_PW.encode()), OK_TED),
    ])


def test_auth_login():
    """AUTH LOGIN asks Username: then Password: and logs in; an initial response is the name."""
    env = Env()
    proto, transport, _ = env.connect()
    dialogue(proto, transport, [
        (b"AUTH LOGIN", b"+ VXNlcm5hbWU6\r\n"),
        (b64(b"ted"), b"+ UGFzc3dvcmQ6\r\n"),
        (b64(TED_PW.encode()), OK_TED),
    ])
    proto.connectionLost(None)
    proto2, transport2, _ = env.connect()
    dialogue(proto2, transport2, [
        (b"AUTH LOGIN " + b64(b"ted"), b"+ UGFzc3dvcmQ6\r\n"),
        (b"*", b"-ERR authentication cancelled\r\n"),
    ])


def cram_exchange(env: Env, secret: str) -> tuple[object, object, bytes]:
    proto, transport, _ = env.connect()
    proto.dataReceived(b"AUTH CRAM-MD5\r\n")
    line = take(transport)
    assert line.startswith(b"+ ") and line.endswith(b"\r\n")
    challenge = base64.b64decode(line[2:-2])
    assert re.fullmatch(rb"<[A-Za-z0-9.@_+/-]+>", challenge)
    digest = hmac.new(secret.encode(), challenge, hashlib.md5).hexdigest().encode()
    proto.dataReceived(b64(b"ted " + digest) + b"\r\n")
    return proto, transport, take(transport)


def test_auth_cram_md5_success_and_failure():
    """CRAM-MD5 (RFC 2195) logs in with HMAC-MD5(secret, challenge); a wrong secret is [AUTH]."""
    env = Env()
    env.throttle.base = 0
    assert cram_exchange(env, TED_PW)[2] == OK_TED
    assert cram_exchange(env, "wrong")[2] == AUTH_FAILED


def test_auth_cram_md5_refuses_initial_response_and_bad_replies():
    """CRAM-MD5 takes no initial response; a reply without a digest fails; not offered
    without secrets."""
    env = Env()
    env.throttle.base = 0
    proto, transport, _ = env.connect()
    dialogue(proto, transport, [
        (b"AUTH CRAM-MD5 " + b64(b"ted 00"), AUTH_FAILED),
        (b"AUTH CRAM-MD5", lambda got: got.startswith(b"+ ")),
        (b64(b"ted"), AUTH_FAILED),
    ])
    proto2, transport2, _ = Env(secrets=False).connect()
    dialogue(proto2, transport2, [(b"AUTH CRAM-MD5", b"-ERR unsupported SASL mechanism\r\n")])


# ---------------------------------------------------------------------- STLS, secure auth


def test_stls_discards_pipelined_bytes():
    """Bytes pipelined after STLS in the same packet are discarded before the handshake
    (RFC 2595 command injection), and USER given before STLS is forgotten."""
    env = Env(tls=True)
    proto, transport, _ = env.connect()
    proto.dataReceived(b"USER ted\r\n")
    take(transport)
    proto.dataReceived(b"STLS\r\nPASS " + TED_PW.encode() + b"\r\nCAPA\r\nQUIT\r\n")
    assert transport.tls_options is TLS_OPTIONS
    assert transport.written_before_tls == b"+OK Begin TLS negotiation\r\n"
    assert take(transport) == b"+OK Begin TLS negotiation\r\n"
    assert not transport.disconnecting
    # now "inside TLS": the injected PASS did nothing, USER must be given again
    dialogue(proto, transport, [
        (b"PASS " + TED_PW.encode(), b"-ERR USER first\r\n"),
        (b"STLS", b"-ERR TLS is already active\r\n"),
        (b"USER ted", b"+OK send PASS\r\n"),
        (b"PASS " + TED_PW.encode(), OK_TED),
    ])


def test_stls_discards_partial_line_after_it():
    """A partial line after STLS (no CRLF yet) is discarded too."""
    env = Env(tls=True)
    proto, transport, _ = env.connect()
    proto.dataReceived(b"STLS\r\nUSER evi")
    take(transport)
    dialogue(proto, transport, [(b"l", b"-ERR unknown command\r\n")])


def test_stls_errors():
    """STLS without TLS configured, with an argument, and after log-in: -ERR."""
    proto, transport, _ = Env().connect()
    dialogue(proto, transport, [(b"STLS", b"-ERR STLS is not available\r\n")])
    env = Env(tls=True)
    proto, transport, _ = env.connect()
    dialogue(proto, transport, [(b"STLS now", b"-ERR syntax: STLS\r\n")])
    proto, transport = env.login()
    dialogue(proto, transport, [(b"STLS", b"-ERR STLS not valid in the TRANSACTION state\r\n")])
    assert transport.tls_options is None


def test_stls_on_implicit_tls_listener():
    """On POP3S, STLS is refused: TLS is already active."""
    proto, transport, _ = Env(implicit_tls=True).connect()
    dialogue(proto, transport, [(b"STLS", b"-ERR TLS is already active\r\n")])


def test_require_secure_auth_refuses_clear_text_until_stls():
    """require_secure_auth: USER, PASS, AUTH PLAIN/LOGIN refused in clear; APOP allowed;
    after STLS USER/PASS works."""
    env = Env(tls=True, require_secure_auth=True)
    proto, transport, greeting = env.connect()
    refused = b"-ERR [AUTH] clear-text log-in is not allowed here: use STLS first\r\n"
    sasl_refused = b"-ERR [AUTH] clear-text authentication is not allowed here: use STLS first\r\n"
    dialogue(proto, transport, [
        (b"USER ted", refused),
        (b"PASS x", refused),
        (b"AUTH PLAIN " + b64(b"\0ted\0" + TED_PW.encode()), sasl_refused),
        (b"AUTH LOGIN", sasl_refused),
        (b"AUTH", b"+OK SASL mechanisms follow\r\nCRAM-MD5\r\n.\r\n"),
        (b"STLS", b"+OK Begin TLS negotiation\r\n"),
        (b"USER ted", b"+OK send PASS\r\n"),
        (b"PASS " + TED_PW.encode(), OK_TED),
    ])
    proto2, transport2, greeting2 = env.connect()
    digest = apop_digest(timestamp(greeting2), TED_PW)
    env.store.sessions.clear()
    dialogue(proto2, transport2, [(b"APOP ted " + digest, OK_TED)])
    assert cram_exchange(Env(tls=True, require_secure_auth=True), TED_PW)[2] == OK_TED


def test_require_secure_auth_allows_clear_text_on_pop3s():
    """On the implicit-TLS listener USER/PASS is allowed under require_secure_auth."""
    proto, transport, _ = Env(implicit_tls=True, require_secure_auth=True).connect()
    dialogue(proto, transport, [(b"USER ted", b"+OK send PASS\r\n"),
                                (b"PASS " + TED_PW.encode(), OK_TED)])


# ---------------------------------------------------------------------- log-in outcomes


def login_reply(env: Env, peer: str = "192.0.2.10") -> bytes:
    proto, transport, _ = env.connect(peer)
    proto.dataReceived(b"USER ted\r\nPASS " + TED_PW.encode() + b"\r\n")
    env.clock.advance(60)
    return take(transport)


def test_locked_mailbox_and_domain_are_auth_errors():
    """A locked mailbox or domain refuses the log-in with [AUTH]."""
    env = Env()
    env.store.locked_mailboxes.add(("pop.contoso.test", "ted"))
    assert login_reply(env) == b"+OK send PASS\r\n-ERR [AUTH] mailbox is locked\r\n"
    env.store.locked_mailboxes.clear()
    env.store.locked_domains.add("pop.contoso.test")
    assert login_reply(env) == b"+OK send PASS\r\n-ERR [AUTH] mailbox is locked\r\n"
    assert env.store.sessions == set()


def test_second_session_gets_in_use():
    """While one session holds the mailbox, another log-in gets [IN-USE]."""
    env = Env()
    env.login()
    assert login_reply(env, "192.0.2.20") == (
        b"+OK send PASS\r\n-ERR [IN-USE] mailbox is in use by another session\r\n")


def test_auth_unavailable_and_store_failure_are_sys_temp():
    """Checker unavailable or a store failure at log-in: [SYS/TEMP], never a success."""
    env = Env()
    env.checker.fail = AuthUnavailable("directory down")
    assert login_reply(env) == (b"+OK send PASS\r\n-ERR [SYS/TEMP] authentication service "
                                b"unavailable, try again later\r\n")
    env.checker.fail = None
    env.store.fail["open_maildrop"] = StoreError("disk on fire")
    assert login_reply(env) == (b"+OK send PASS\r\n-ERR [SYS/TEMP] cannot open the mailbox "
                                b"now, try again later\r\n")


def test_checker_accepts_but_store_has_no_mailbox():
    """A user the checker knows but the store does not have: [AUTH], nothing opened."""
    env = Env()
    env.throttle.base = 0
    env.checker.accounts["zoe@pop.contoso.test"] = "zz"
    proto, transport, _ = env.connect()
    dialogue(proto, transport, [(b"USER zoe", b"+OK send PASS\r\n"), (b"PASS zz", AUTH_FAILED)])


@pytest.mark.parametrize("account", ["relay@pop.contoso.test", "relay@exchange.northwindtraders.test"])
def test_account_without_mailbox_is_refused_at_info_level(account):
    """Issue 11 fault 14: an account the checker accepts but that has no mailbox here (a
    relay account, in a local or a foreign domain) may SMTP AUTH, but POP3 needs the
    mailbox: [AUTH], the session goes on, and the log says why at info level, never as a
    warning or a critical traceback."""
    env = Env()
    env.throttle.base = 0
    env.checker.accounts[account] = "relay-pw"
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto, transport, _ = env.connect()
        dialogue(proto, transport, [
            (f"USER {account}".encode(), b"+OK send PASS\r\n"),
            (b"PASS relay-pw", AUTH_FAILED),
            (b"NOOP", b"-ERR NOOP not valid in the AUTHORIZATION state\r\n"),
        ])
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import LogLevel, formatEvent

    assert all(e.get("log_level") in (LogLevel.debug, LogLevel.info) for e in events), \
        [formatEvent(e) for e in events]
    assert any("no mailbox on this server" in formatEvent(e) for e in events)
    assert env.store.sessions == set()


def test_failed_login_is_delayed_by_throttle_and_commands_wait():
    """A failed log-in's -ERR waits throttle.failure_delay (2 s, then 4 s); a command
    pipelined behind it waits too; a success clears the record."""
    env = Env()
    proto, transport, _ = env.connect()
    proto.dataReceived(b"USER ted\r\nPASS bad\r\nUSER ted\r\nPASS bad\r\nQUIT\r\n")
    assert take(transport) == b"+OK send PASS\r\n"
    env.clock.advance(1.9)
    assert take(transport) == b""
    env.clock.advance(0.1)
    assert take(transport) == AUTH_FAILED + b"+OK send PASS\r\n"
    env.clock.advance(3.9)
    assert take(transport) == b""
    env.clock.advance(0.1)
    assert take(transport) == AUTH_FAILED + b"+OK pop.contoso.test POP3 server signing off\r\n"
    assert env.throttle.failures("192.0.2.10") == 2
    env.login()
    assert env.throttle.failures("192.0.2.10") == 0


def test_connection_lost_during_failure_delay_writes_nothing():
    """A client that disconnects while its failed log-in is being delayed gets nothing
    written after the loss, and the delayed call is spent."""
    env = Env()
    proto, transport, _ = env.connect()
    proto.dataReceived(b"USER ted\r\nPASS bad\r\nNOOP\r\n")
    take(transport)
    proto.connectionLost(None)
    env.clock.advance(10)
    assert take(transport) == b""
    assert not [c for c in env.clock.getDelayedCalls() if c.active()]


def test_pipelined_session_with_deferred_login_answers_in_order():
    """A whole session sent in one packet, with the log-in pending, is answered in order."""
    env = Env()
    env.checker.hold = True
    proto, transport, _ = env.connect()
    proto.dataReceived(b"CAPA\r\nUSER ted\r\nPASS " + TED_PW.encode()
                       + b"\r\nSTAT\r\nLIST 2\r\nDELE 1\r\nQUIT\r\n")
    first = take(transport)
    assert first.startswith(CAPA_HEAD) and first.endswith(b".\r\n+OK send PASS\r\n")
    env.checker.release()
    assert take(transport) == (OK_TED + b"+OK 2 85\r\n+OK 2 22\r\n+OK message 1 deleted\r\n"
                               b"+OK pop.contoso.test POP3 server signing off (1 messages left)\r\n")
    assert env.store.messages(TED) == [MSG2]


def test_connection_lost_during_pending_login_releases_mailbox():
    """If the client goes away while the log-in is pending, the maildrop is released."""
    env = Env()
    env.checker.hold = True
    proto, transport, _ = env.connect()
    proto.dataReceived(b"USER ted\r\nPASS " + TED_PW.encode() + b"\r\n")
    proto.connectionLost(None)
    env.checker.release()
    assert env.store.sessions == set()
    assert env.store.maildrops[0].closed


# ---------------------------------------------------------------------- TRANSACTION


def test_stat_list_uidl():
    """STAT, LIST, LIST n, UIDL, UIDL n with CRLF sizes; deleted messages are left out."""
    env = Env()
    proto, transport = env.login()
    dialogue(proto, transport, [
        (b"STAT", b"+OK 2 85\r\n"),
        (b"LIST", b"+OK 2 messages (85 octets)\r\n1 63\r\n2 22\r\n.\r\n"),
        (b"list 1", b"+OK 1 63\r\n"),
        (b"UIDL", b"+OK unique-id listing follows\r\n1 uid000001\r\n2 uid000002\r\n.\r\n"),
        (b"UIDL 2", b"+OK 2 uid000002\r\n"),
        (b"DELE 1", b"+OK message 1 deleted\r\n"),
        (b"STAT", b"+OK 1 22\r\n"),
        (b"LIST", b"+OK 1 messages (22 octets)\r\n2 22\r\n.\r\n"),
        (b"UIDL", b"+OK unique-id listing follows\r\n2 uid000002\r\n.\r\n"),
        (b"LIST 1", b"-ERR message 1 is deleted\r\n"),
        (b"UIDL 1", b"-ERR message 1 is deleted\r\n"),
        (b"RETR 1", b"-ERR message 1 is deleted\r\n"),
        (b"TOP 1 0", b"-ERR message 1 is deleted\r\n"),
        (b"DELE 1", b"-ERR message 1 is deleted\r\n"),
        (b"RSET", b"+OK maildrop has 2 messages (85 octets)\r\n"),
        (b"LIST 1", b"+OK 1 63\r\n"),
        (b"NOOP", b"+OK\r\n"),
    ])


@pytest.mark.parametrize("line, reply", [
    (b"LIST 0", b"-ERR no such message"),
    (b"LIST 3", b"-ERR no such message"),
    (b"LIST 99999999999", b"-ERR invalid message number"),
    (b"LIST -1", b"-ERR invalid message number"),
    (b"LIST +1", b"-ERR invalid message number"),
    (b"LIST 1.0", b"-ERR invalid message number"),
    (b"LIST x", b"-ERR invalid message number"),
    (b"LIST 1 2", b"-ERR syntax: LIST [message]"),
    (b"UIDL 1 2", b"-ERR syntax: UIDL [message]"),
    (b"UIDL 0", b"-ERR no such message"),
    (b"RETR", b"-ERR syntax: RETR message"),
    (b"RETR 1 2", b"-ERR syntax: RETR message"),
    (b"RETR x", b"-ERR invalid message number"),
    (b"DELE", b"-ERR syntax: DELE message"),
    (b"DELE x", b"-ERR invalid message number"),
    (b"DELE 3", b"-ERR no such message"),
    (b"TOP", b"-ERR syntax: TOP message lines"),
    (b"TOP 1", b"-ERR syntax: TOP message lines"),
    (b"TOP 1 2 3", b"-ERR syntax: TOP message lines"),
    (b"TOP 1 x", b"-ERR invalid number of lines"),
    (b"TOP 1 -1", b"-ERR invalid number of lines"),
    (b"TOP 9 1", b"-ERR no such message"),
    (b"STAT 1", b"-ERR syntax: STAT"),
    (b"NOOP 1", b"-ERR syntax: NOOP"),
    (b"RSET 1", b"-ERR syntax: RSET"),
    (b"QUIT 1", b"-ERR syntax: QUIT"),
    (b"USER ted", b"-ERR USER not valid in the TRANSACTION state"),
    (b"PASS x", b"-ERR PASS not valid in the TRANSACTION state"),
    (b"APOP ted x", b"-ERR APOP not valid in the TRANSACTION state"),
    (b"AUTH PLAIN", b"-ERR AUTH not valid in the TRANSACTION state"),
    (b"LAST", b"-ERR unknown command"),
    (b"XYZZY", b"-ERR unknown command"),
    (b"", b"-ERR unknown command"),
    (b" NOOP", b"-ERR unknown command"),
    (b"NO\x00OP", b"-ERR invalid characters in command"),
    ("LIST \u00e9".encode(), b"-ERR invalid characters in command"),
    (b"\xff\xfe", b"-ERR invalid characters in command"),
])
def test_transaction_errors_keep_the_session(line, reply):
    """Each bad command gets one -ERR line and the session still answers NOOP."""
    env = Env()
    proto, transport = env.login()
    dialogue(proto, transport, [(line, reply + b"\r\n"), (b"NOOP", b"+OK\r\n")])
    assert not transport.disconnecting


def test_retr_and_dele_short_dispatch_answers_as_the_general_path(monkeypatch):
    """RETR n and DELE n go straight to their handler (issue 17); every spelling, number and
    state gets the very replies the general path gives (the short cut turned off)."""
    from pop3coexist.pop3 import server as server_module

    script = [b"RETR 1", b"retr 2", b"RETR 01", b"RETR 0", b"RETR 3", b"RETR 999999999",
              b"RETR 4294967296", b"RETR  1", b"RETR 1 ", b"RETR +1", b"DELE 1", b"RETR 1",
              b"DELE 1", b"dele 000000002", b"DELE 0000000003", b"DELE 9", b"RSET", b"DELE 2",
              b"QUIT", b"RETR 2"]
    replies = []
    for table in (dict(server_module._ONE_NUMBER), {}):
        monkeypatch.setattr(server_module, "_ONE_NUMBER", table)
        proto, transport, _ = Env().connect()
        proto.dataReceived(b"RETR 1\r\nDELE 1\r\n")  # AUTHORIZATION: refused
        proto.dataReceived(f"USER {TED}\r\nPASS {TED_PW}\r\n".encode())
        proto.dataReceived(b"".join(line + b"\r\n" for line in script))
        replies.append(take(transport))
    assert replies[0] == replies[1]
    assert replies[0].startswith(b"-ERR RETR not valid in the AUTHORIZATION state\r\n")
    assert b"+OK message 2 deleted\r\n" in replies[0]


@pytest.mark.parametrize("line", [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET",
                                  b"TOP 1 1", b"UIDL"])
def test_transaction_commands_before_login(line):
    """TRANSACTION commands in the AUTHORIZATION state: -ERR, session goes on."""
    proto, transport, _ = Env().connect()
    name = line.split()[0].decode()
    dialogue(proto, transport, [
        (line, f"-ERR {name} not valid in the AUTHORIZATION state\r\n".encode()),
        (b"QUIT", b"+OK pop.contoso.test POP3 server signing off\r\n"),
    ])


def test_overlong_lines_are_discarded_not_fatal():
    """A 5000-octet line is discarded up to its line end with one -ERR; a command over 255
    octets is refused; the session goes on, even with the next command in the same packet."""
    proto, transport, _ = Env().connect()
    proto.dataReceived(b"USER " + b"a" * 3000)
    proto.dataReceived(b"b" * 2000)
    assert take(transport) == b""
    proto.dataReceived(b"c" * 10 + b"\r\nCAPA x\r\n")
    assert take(transport) == b"-ERR line too long\r\n-ERR syntax: CAPA\r\n"
    dialogue(proto, transport, [
        (b"USER " + b"a" * 260, b"-ERR line too long\r\n"),
        (b"X" * 5000, b"-ERR line too long\r\n"),
        (b"QUIT", b"+OK pop.contoso.test POP3 server signing off\r\n"),
    ])


def test_bare_lf_line_ends_are_accepted():
    """Commands ending in a bare LF work (lenient clients)."""
    proto, transport, _ = Env().connect()
    proto.dataReceived(b"USER ted\nPASS " + TED_PW.encode() + b"\n")
    assert take(transport) == b"+OK send PASS\r\n" + OK_TED


def test_dele_quit_deletes_and_rset_undeletes():
    """DELE marks, RSET unmarks, DELE + QUIT removes in UPDATE (commit with 0-based indexes)."""
    env = Env()
    proto, transport = env.login()
    dialogue(proto, transport, [
        (b"DELE 2", b"+OK message 2 deleted\r\n"),
        (b"RSET", b"+OK maildrop has 2 messages (85 octets)\r\n"),
        (b"DELE 1", b"+OK message 1 deleted\r\n"),
        (b"QUIT", b"+OK pop.contoso.test POP3 server signing off (1 messages left)\r\n"),
    ])
    assert transport.disconnecting
    assert env.store.maildrops[0].committed == {0}
    assert env.store.messages(TED) == [MSG2]
    proto.connectionLost(None)
    assert env.store.sessions == set()


def test_dropped_connection_deletes_nothing():
    """A connection lost in TRANSACTION closes the maildrop and deletes nothing."""
    env = Env()
    proto, transport = env.login()
    dialogue(proto, transport, [(b"DELE 1", b"+OK message 1 deleted\r\n")])
    proto.connectionLost(None)
    drop = env.store.maildrops[0]
    assert drop.committed is None and drop.closed
    assert env.store.messages(TED) == [MSG1, MSG2]


def test_commit_failure_is_sys_temp_and_releases():
    """If UPDATE fails the client hears [SYS/TEMP] and the maildrop is released."""
    env = Env()
    env.store.fail["commit"] = StoreError("read-only file system")
    proto, transport = env.login()
    dialogue(proto, transport, [
        (b"DELE 1", b"+OK message 1 deleted\r\n"),
        (b"QUIT", b"-ERR [SYS/TEMP] some deleted messages were not removed\r\n"),
    ])
    assert transport.disconnecting
    assert env.store.sessions == set()


def test_commands_after_quit_are_ignored():
    """Commands pipelined after QUIT get no reply."""
    env = Env()
    proto, transport = env.login()
    proto.dataReceived(b"QUIT\r\nNOOP\r\nSTAT\r\n")
    assert take(transport) == (
        b"+OK pop.contoso.test POP3 server signing off (2 messages left)\r\n")


# ---------------------------------------------------------------------- RETR / TOP


def test_retr_converts_line_ends_and_dot_stuffs():
    """RETR gives CRLF line ends, a doubled leading dot and the terminating dot line."""
    env = Env()
    proto, transport = env.login()
    dialogue(proto, transport, [
        (b"RETR 1", b"+OK 63 octets\r\nFrom: a@example.test\r\nSubject: one\r\n\r\nline 1\r\n"
                    b"..dotted\r\nline 3\r\n.\r\n"),
        (b"RETR 2", b"+OK 22 octets\r\n" + MSG2 + b".\r\n"),
    ])
    assert all(f.closed for f in env.store.maildrops[0].opened)


def test_retr_message_without_final_newline_and_tiny_chunks():
    """With 1-octet chunks, a message not ending in a newline still ends CRLF . CRLF, and the
    octet count includes the CRLF added to its last line (issue 11, fault 5)."""
    env = Env(chunk_size=1)
    env.store.add(TED, b".a\r\n.\r\nb\n\r\n.")
    proto, transport = env.login()
    dialogue(proto, transport, [
        (b"RETR 3", b"+OK 15 octets\r\n..a\r\n..\r\nb\r\n\r\n..\r\n.\r\n"),
    ])


def test_top_edge_cases():
    """TOP n 0 gives the header and the blank line; TOP n 2 two body lines; a big count
    the whole body; a message without a body gives its header."""
    env = Env()
    env.store.add(TED, b"Subject: only header\n")
    proto, transport = env.login()
    head = b"From: a@example.test\r\nSubject: one\r\n\r\n"
    dialogue(proto, transport, [
        (b"TOP 1 0", b"+OK top of message follows\r\n" + head + b".\r\n"),
        (b"TOP 1 2", b"+OK top of message follows\r\n" + head + b"line 1\r\n..dotted\r\n.\r\n"),
        (b"TOP 1 999", b"+OK top of message follows\r\n" + head
                       + b"line 1\r\n..dotted\r\nline 3\r\n.\r\n"),
        (b"TOP 3 5", b"+OK top of message follows\r\nSubject: only header\r\n.\r\n"),
    ])


def test_retr_open_failure_is_sys_temp():
    """If the message cannot be opened: [SYS/TEMP], the session goes on."""
    env = Env()
    env.store.fail["open_message"] = OSError("gone")
    proto, transport = env.login()
    dialogue(proto, transport, [
        (b"RETR 1", b"-ERR [SYS/TEMP] cannot read message 1 now\r\n"),
        (b"NOOP", b"+OK\r\n"),
    ])


def test_retr_read_failure_mid_message_drops_connection():
    """A read failure after +OK cannot be reported: the connection is dropped, no final dot,
    and nothing is deleted."""
    env = Env(chunk_size=10)
    env.store.fail["read"] = OSError("I/O error")
    env.store.read_fail_after = 10
    proto, transport = env.login()
    proto.dataReceived(b"DELE 2\r\nRETR 1\r\nNOOP\r\n")
    out = take(transport)
    assert out == b"+OK message 2 deleted\r\n+OK 63 octets\r\nFrom: a@ex"
    assert transport.disconnecting
    proto.connectionLost(None)
    assert env.store.messages(TED) == [MSG1, MSG2]


def test_retr_waits_for_backpressure():
    """The producer asks for no further chunk while the transport is paused, resumes when
    the transport drains, and commands pipelined behind RETR wait for the whole message; the
    +OK line goes out together with the first chunk."""
    env = Env(chunk_size=16)
    proto, transport = env.login()
    calls = []

    def manual(f, *args):
        d = defer.Deferred()
        calls.append((d, f, args))
        return d

    def run_next():
        d, f, args = calls.pop(0)
        d.callback(f(*args))

    env.factory.run_blocking = manual
    proto.dataReceived(b"RETR 1\r\nNOOP\r\n")
    run_next()  # open_message
    assert take(transport) == b""
    run_next()  # first chunk
    assert take(transport) == b"+OK 63 octets\r\nFrom: a@example."
    producer = transport.producer
    producer.pauseProducing()
    run_next()  # the read already asked for completes ...
    assert take(transport) == b"test\r\nSubject: on"
    assert calls == []  # ... but no new read while paused
    producer.resumeProducing()
    while calls:
        run_next()
    assert take(transport).endswith(b"line 3\r\n.\r\n+OK\r\n")
    assert transport.producer is None


# ---------------------------------------------------------------------- timeouts, limits


def test_idle_timeout_closes_without_update():
    """After idle_timeout without a command the connection closes with no reply and
    nothing is deleted; activity restarts the timer."""
    env = Env(idle_timeout=600)
    proto, transport = env.login()
    env.clock.advance(599)
    dialogue(proto, transport, [(b"DELE 1", b"+OK message 1 deleted\r\n")])
    env.clock.advance(599)
    assert not transport.disconnecting
    env.clock.advance(1)
    assert transport.disconnecting
    assert take(transport) == b""
    proto.connectionLost(None)
    assert env.store.messages(TED) == [MSG1, MSG2]
    assert env.store.maildrops[0].closed and env.store.maildrops[0].committed is None


def test_idle_timeout_counts_from_the_last_command_across_re_arms():
    """Commands only note the time (the timer is not moved per line): when the timer fires
    early it sets itself again for the rest, so the session still closes exactly
    idle_timeout after the last command, however many times the timer fired meanwhile."""
    env = Env(idle_timeout=600)
    proto, transport = env.login()
    env.clock.advance(100)
    dialogue(proto, transport, [(b"NOOP", b"+OK\r\n")])
    env.clock.advance(550)  # t=650: the timer fired at 600 and waits until 700
    dialogue(proto, transport, [(b"NOOP", b"+OK\r\n")])
    env.clock.advance(599)  # t=1249: fired again at 700, now waits until 1250
    assert not transport.disconnecting
    env.clock.advance(1)
    assert transport.disconnecting
    assert take(transport) == b""


def test_idle_timeout_in_authorization():
    """An idle client that never logs in is disconnected too."""
    env = Env(idle_timeout=600)
    proto, transport, _ = env.connect()
    env.clock.advance(600)
    assert transport.disconnecting
    assert env.clock.getDelayedCalls() == [] or all(
        not c.active() for c in env.clock.getDelayedCalls())


def test_connection_limit_refuses_and_releases():
    """Over the per-client limit: -ERR [SYS/TEMP] too many connections and close; a closed
    session frees its slot."""
    limiter = ConnectionLimiter(total=10, per_client=1)
    env = Env(limiter=limiter)
    proto, transport, greeting = env.connect()
    assert greeting.startswith(b"+OK")
    proto2, transport2, refused = env.connect()
    assert refused == b"-ERR [SYS/TEMP] too many connections\r\n"
    assert transport2.disconnecting
    proto2.dataReceived(b"USER ted\r\n")
    assert take(transport2) == b""
    proto2.connectionLost(None)
    assert limiter.open == 1
    proto.connectionLost(None)
    assert limiter.open == 0
    _, _, greeting3 = env.connect()
    assert greeting3.startswith(b"+OK")


# ---------------------------------------------------------------------- secrets in logs


def test_passwords_never_logged():
    """Neither passwords nor SASL payloads appear in any log event, success or failure."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        env = Env()
        env.throttle.base = 0
        proto, transport, _ = env.connect()
        plain = b64(b"\0ted\0" + TED_PW.encode())
        bad = b64(b"\0ted\0" + b"hunter2-wrong")
        proto.dataReceived(b"AUTH PLAIN " + bad + b"\r\nUSER ted\r\nPASS hunter2-wrong\r\n"
                           b"AUTH PLAIN " + plain + b"\r\n")
        assert take(transport).endswith(OK_TED)
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import formatEvent
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "log-in" in text
    for secret in (TED_PW, "hunter2-wrong", plain.decode(), bad.decode()):
        assert secret not in text
