"""The byte-level fuzz harnesses: one function per parser, ``HARNESSES[name](data)``, each
checking invariants (not only "no crash") and raising AssertionError (or the unexpected
exception) when one breaks. They run under atheris (``tests/fuzz/run.py``, coverage-guided),
under hypothesis (``tests/fuzz/test_harness_properties.py``) and on the seed and regression
corpus (``tests/fuzz/corpus/<name>/``, ``tests/fuzz/test_fuzz_campaign.py``).

The first octets of an input are often options (how the rest is cut into chunks, which
variant of the parser); ``chunked`` documents the rule. The oracles are test-side
(``tests/fuzz/oracles.py``).
"""

from __future__ import annotations

import base64
import email
import email.policy
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path

from tests.fuzz import oracles

Harness = Callable[[bytes], None]
HARNESSES: dict[str, Harness] = {}


def harness(name: str) -> Callable[[Harness], Harness]:
    def register(fn: Harness) -> Harness:
        HARNESSES[name] = fn
        return fn
    return register


def chunked(data: bytes, key: int) -> list[bytes]:
    """Cut ``data`` into chunks: ``key`` 0 is one chunk; otherwise sizes come from a small
    linear congruential sequence seeded by ``key`` (1 to 1 + key % 64 octets each), so the
    same input always gives the same cuts and the fuzzer can explore both."""
    if key == 0 or not data:
        return [data] if data else []
    out = []
    state = key
    pos = 0
    while pos < len(data):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        size = 1 + state % (1 + key % 64)
        out.append(data[pos : pos + size])
        pos += size
    return out


# --------------------------------------------------------------------------- address.py


@harness("address")
def fuzz_address(data: bytes) -> None:
    """address.py: parse_address / parse_path / strip_source_route / normalise_domain /
    normalise_literal / login_to_address on any text. Invariants: only AddressError (or a
    subclass) is raised; a parsed address is ASCII, free of controls, at most 254 octets, and
    its canonical form parses back to the same Address (idempotent); a domain name is lower
    case; a literal is a valid IP; the path form agrees with the mailbox form."""
    from pop3coexist import address as A

    text = data.decode("latin-1")
    try:
        a = A.parse_address(text)
    except A.AddressError:
        a = None
    if a is not None:
        s = str(a)
        assert s.isascii() and not re.search(r"[\x00-\x1f\x7f]", s), s
        assert len(s) <= A.MAX_MAILBOX, s
        again = A.parse_address(s)
        assert again == a, (text, s, again)
        assert a.key == again.key
        if a.domain.startswith("["):
            assert a.literal is not None, a
        else:
            assert a.domain == a.domain.lower() and a.literal is None, a
        if text.startswith("@") is False:
            assert A.parse_path("<" + text + ">") == a
    try:
        inner = A.strip_source_route(text)
    except A.AddressError:
        inner = None
    if inner is not None and inner is not text:
        assert text.endswith(inner) and text.startswith("@")
    try:
        A.parse_path(text)
    except A.AddressError:
        pass
    for fn in (A.normalise_domain, A.normalise_literal):
        try:
            d = fn(text)
        except A.AddressError:
            continue
        assert fn(d) == d, (text, d)
        if fn is A.normalise_literal:
            ip = A.literal_ip(d)
            assert isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address), d
    mapped = A.login_to_address(text, ("pop.contoso.test",))
    if mapped is not None:
        local, domain = mapped
        assert local == local.lower() and domain == domain.lower()
        assert A.is_valid_mailbox_name(local), mapped


# --------------------------------------------------------------------------- smtp/params.py


@harness("smtp_params")
def fuzz_smtp_params(data: bytes) -> None:
    """smtp/params.py: split_path, parse_params, xtext_decode on any MAIL/RCPT argument.
    Invariants: only MailError 501 5.5.4 is raised; the path is what lay between the
    brackets; parameter keys are upper case keywords, each once; decoded xtext re-encodes
    (dsn.xtext_encode) and decodes back to itself."""
    from pop3coexist.errors import MailError
    from pop3coexist.smtp import dsn
    from pop3coexist.smtp.params import KEYWORD_RE, split_path, xtext_decode

    text = data.decode("utf-8", "surrogateescape")
    for keyword in ("FROM:", "TO:"):
        try:
            path, params = split_path(text, keyword)
        except MailError as e:
            assert (e.code, e.enhanced) == (501, "5.5.4"), e
            continue
        assert "<" + path + ">" in text, (text, path)
        for key in params:
            assert key == key.upper() and KEYWORD_RE.match(key), key
    try:
        decoded = xtext_decode(text)
    except MailError as e:
        assert (e.code, e.enhanced) == (501, "5.5.4"), e
    else:
        if decoded.isascii():
            assert xtext_decode(dsn.xtext_encode(decoded)) == decoded, (text, decoded)


# --------------------------------------------------------------------------- SMTP framing


class _SmtpRig:
    """One factory over the unit-tier fakes, reused across inputs (a fresh store each time
    would cost a temporary folder per input)."""

    def __init__(self) -> None:
        from tests.support.smtp_fakes import make_factory, smtp_config

        self.factories = {}
        for bare in ("normalize", "reject"):
            for mode in ("mx", "submission"):
                for tls_auth in (False, True):
                    self.factories[bare, mode, tls_auth] = make_factory(
                        smtp_config(bare_newline=bare, require_tls_for_auth=tls_auth), mode=mode)

    def session(self, variant: tuple[str, str, bool]):
        from tests.support.smtp_fakes import open_session

        factory, store, _checker, queue, clock = self.factories[variant]
        for boxes in store.mail.values():
            for box in boxes.values():
                box.clear()
        queue.items.clear()
        factory.throttle._entries.clear()
        proto, transport = open_session(factory, peer="203.0.113.5")
        return proto, transport, clock


_smtp_rig: _SmtpRig | None = None


def settle(clock, busy: Callable[[], bool], step: float = 31.0, limit: int = 400) -> None:
    """Advance ``clock`` until ``busy()`` is false (failed log-in delays), at most ``limit``
    steps."""
    for _ in range(limit):
        if not busy():
            return
        clock.advance(step)


@harness("smtp_session")
def fuzz_smtp_session(data: bytes) -> None:
    """The ESMTP session (smtp/session.py framing and the command loop, every verb, AUTH
    exchanges, STARTTLS over a TLS-capable StringTransport, DATA) fed any bytes in any cuts.
    Octet 0: the cuts (``chunked``); octet 1: bit 0 ``smtp.bare_newline = "reject"``, bit 1
    the submission mode (AUTH before MAIL), bit 2 ``require_tls_for_auth``, bit 3 the idle
    timeout passes at the end (a 421 then).
    Invariants: nothing is logged as a failure; every reply is well-formed with one code and
    a matching enhanced-code class; every complete command line gets exactly one reply, in
    order, with a code its verb may get (``oracles.smtp_expected_replies``)."""
    global _smtp_rig
    if len(data) < 2:
        return
    if _smtp_rig is None:
        _smtp_rig = _SmtpRig()
    variant = ("reject" if data[1] & 1 else "normalize", "submission" if data[1] & 2 else "mx",
               bool(data[1] & 4))
    chunks = chunked(data[2:], data[0])
    with oracles.no_logged_failures():
        proto, transport, clock = _smtp_rig.session(variant)
        greeting = transport.value()
        transport.clear()
        assert greeting == b"220 pop.contoso.test ESMTP pop3coexist\r\n", greeting
        for chunk in chunks:
            if transport.disconnecting:
                break
            proto.dataReceived(chunk)
            settle(clock, lambda: proto._busy)
        if data[1] & 8 and not transport.disconnecting:
            clock.advance(proto.timeout + 1)
            assert transport.disconnecting and transport.value().endswith(
                b"421 4.4.2 pop.contoso.test Error: timeout exceeded\r\n"), transport.value()[-80:]
        output = transport.value()
        proto.connectionLost(None)
    oracles.smtp_expected_replies(chunks, oracles.split_smtp_replies(output))


# --------------------------------------------------------------------------- DATA reader


class _Sink:
    """A SpoolWriter stand-in that keeps the bytes in memory."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.aborted, "written after abort"
        self.data += data

    def abort(self) -> None:
        self.aborted = True


_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def expected_store(content: bytes, bare_lf: bool) -> bytes:
    """What the DATA reader must store for unstuffed ``content`` (CRLF text, bare LFs
    allowed when ``bare_lf``): LF line ends; in the header section, ``Return-Path`` fields
    (with their folded lines) left out and an empty line put before the first line that is
    neither a field nor a fold (RFC 5322 section 2.1)."""
    text = content.replace(b"\r\n", b"\n")
    lines = text.split(b"\n")[:-1]
    out = []
    fields = 0
    dropping = False
    for i, line in enumerate(lines):
        if line == b"":
            out.extend(lines[i:])
            break
        if line[:1] in (b" ", b"\t") and fields:
            if not dropping:
                out.append(line)
            continue
        if not _FIELD.match(line):
            out.append(b"")
            out.extend(lines[i:])
            break
        fields += 1
        dropping = line.split(b":", 1)[0].rstrip(b" \t").lower() == b"return-path"
        if not dropping:
            out.append(line)
    return b"".join(line + b"\n" for line in out)


@harness("smtp_data")
def fuzz_smtp_data(data: bytes) -> None:
    """smtp/incoming.py MessageReader: the DATA stream in any cuts. Octet 0: cuts; octet 1:
    bit 0 refuses bare LF, bits 1-7 the line limit (8 to 134 octets, small so that the limit
    is reached); octet 2: the size limit (0: none, else 64 octets per step). Invariants: the
    message ends exactly after the first CRLF.CRLF (a dot line first included); the refusals
    (bare CR, bare LF when refused, a long line, too big, too many hops) happen exactly when
    the input has them; otherwise the stored bytes are the unstuffed content with LF line
    ends and the header rules of ``expected_store``, byte for byte, and ``size`` is the
    unstuffed size with CRLF line ends."""
    from pop3coexist.smtp.incoming import MessageReader

    if len(data) < 3:
        return
    allow_bare_lf = not data[1] & 1
    max_line = 8 + (data[1] >> 1)
    max_size = 64 * data[2]
    stream = data[3:]
    sink = _Sink()
    reader = MessageReader(sink, max_size, 3, max_line=max_line, allow_bare_lf=allow_bare_lf)
    consumed = 0
    end = None
    for chunk in chunked(stream, data[0]):
        n = reader.feed(chunk)
        if n is None:
            consumed += len(chunk)
            continue
        assert 0 <= n <= len(chunk), (n, len(chunk))
        end = consumed + n
        break
    k = (b"\r\n" + stream).find(b"\r\n.\r\n")
    if k < 0:
        assert end is None, "the message ended without CRLF.CRLF"
        return
    assert end == k + 3, f"ended at {end}, CRLF.CRLF at {k + 3}"
    assert reader.done
    raw = stream[:k]  # the content lines with their line ends, before the dot line
    lines = re.split(rb"(?<=\n)", raw)
    if lines and lines[-1] == b"":
        lines.pop()
    unstuffed = b"".join(
        line[1:] if line.startswith(b".") and (i == 0 or lines[i - 1].endswith(b"\r\n")) else line
        for i, line in enumerate(lines))
    # every refusal the content deserves; the first one met in the stream is the reply
    conds = set()
    if unstuffed.count(b"\r") != unstuffed.count(b"\r\n"):
        conds |= {(550, "5.5.2"), (550, "5.6.0")}  # a bare CR may also make a line look long
    if unstuffed.count(b"\n") != unstuffed.count(b"\r\n") and not allow_bare_lf:
        conds |= {(550, "5.5.2"), (550, "5.6.0")}  # lines cut only at CRLF may grow long
    if any(len(line.rstrip(b"\r")) > max_line for line in unstuffed.split(b"\n")):
        conds.add((550, "5.6.0"))
    if max_size and len(unstuffed) > max_size:
        conds.add((552, "5.3.4"))
    stored = expected_store(unstuffed, allow_bare_lf)
    header = stored.split(b"\n\n", 1)[0] if not stored.startswith(b"\n") else b""
    received = sum(1 for line in header.split(b"\n")
                   if _FIELD.match(line) and line.split(b":", 1)[0].rstrip(b" \t").lower() == b"received")
    if received + 1 > 3:
        conds.add((554, "5.4.6"))
    error = reader.error
    if error is not None:
        assert (error.code, error.enhanced) in conds, (error, conds)
        assert sink.aborted
        return
    assert not conds, f"no refusal, but the content deserves {conds}"
    assert not sink.aborted
    assert reader.size == len(unstuffed), (reader.size, len(unstuffed))
    assert bytes(sink.data) == stored, (bytes(sink.data), stored)


# --------------------------------------------------------------------------- POP3 stream


@harness("pop3_stream")
def fuzz_pop3_stream(data: bytes) -> None:
    """pop3/stream.py DotStuffer and canonical.py on any stored bytes in any cuts. Octet 0:
    cuts; octet 1: TOP's line count (255: RETR). Invariants: the output is a valid
    dot-stuffed multi-line body ending in ``.CRLF`` whose unstuffed content is the canonical
    form of the stored bytes (``oracles.canonical``: RETR) or its TOP prefix; ``octets``, the
    store's ``crlf_size`` and ``canonical_size`` equal the unstuffed length; any cuts give the
    same bytes as one chunk."""
    from pop3coexist.canonical import LineEnds, canonical_size
    from pop3coexist.pop3.stream import DotStuffer
    from pop3coexist.store.maildir import crlf_size

    if len(data) < 2:
        return
    top = None if data[1] == 255 else data[1]
    stored = data[2:]
    cuts = chunked(stored, data[0])
    stuffer = DotStuffer(top)
    out = b"".join(stuffer.feed(c) for c in cuts) + stuffer.finish()
    body = oracles.unstuff_multiline(out)
    canon = oracles.canonical(stored)
    if top is None:
        assert body == canon, (stored, body, canon)
        assert stuffer.octets == len(canon), (stuffer.octets, len(canon))
        assert canonical_size(cuts) == len(canon)
        assert crlf_size(__import__("io").BytesIO(stored)) == len(canon)
    else:
        assert body == oracles.top_of(canon, top), (stored, top, body)
    whole = DotStuffer(top)
    assert whole.feed(stored) + whole.finish() == out
    ends = LineEnds()
    lf_text = b"".join(ends.feed(c) for c in cuts) + ends.finish()
    expected_lf = canon.replace(b"\r\n", b"\n")
    # an unended last line gets its line end from DotStuffer/canonical_size, not LineEnds
    assert lf_text == expected_lf or lf_text + b"\n" == expected_lf, (lf_text, expected_lf)


# --------------------------------------------------------------------------- DSN


def _pieces(data: bytes, n: int) -> list[bytes]:
    parts = data.split(b"\x00")
    parts += [b""] * (n - len(parts))
    return parts[: n - 1] + [b"\x00".join(parts[n - 1 :])]


@harness("dsn")
def fuzz_dsn(data: bytes) -> None:
    """smtp/dsn.py (bounce.py builds its reports with it): the report for a queued message
    whose sender, recipients, replies, ORCPT, ENVID and original message come from the input
    (NUL-separated). Invariants: build_report, read_original's header cut and CRLF form,
    enhanced_of, split_orcpt and xtext never raise; the report is ASCII-headed, uses CRLF only,
    and parses (email package) as a multipart/report of delivery-status with three parts, one
    per-recipient block per recipient, and every Status a valid RFC 3463 code of the kind's
    class."""
    from pop3coexist.smtp import dsn
    from pop3coexist.store.envelope import Envelope, Recipient

    if len(data) < 1:
        return
    kinds = ("failed", "delayed", "relayed", "delivered")
    kind = kinds[data[0] % 4]
    sender, rcpts, reply, orcpt, envid, original = (
        p.decode("utf-8", "replace") if i < 5 else p for i, p in enumerate(_pieces(data[1:], 6)))
    recipients = []
    for i, addr in enumerate((rcpts or "x@y.test").split(",")[:5]):
        r = Recipient(addr, orcpt=orcpt or None, notify=None)
        r.last_reply = reply or None
        r.status = reply[:7] if i % 2 else None
        r.diagnostic = reply[::-1] or None if i % 3 == 2 else None
        r.remote_mta = envid[:20] or None if i % 2 else None
        r.last_attempt = 1_700_000_000.0
        recipients.append(r)
    env = Envelope(id="q1", sender=sender, recipients=recipients, ret=None,
                   envid=envid or None, arrival=1_700_000_000.0, received_from=reply or None)
    assert dsn.enhanced_of(reply, "5.0.0")[0] in "245"
    dsn.split_orcpt(orcpt)
    dsn.orcpt_param(orcpt)
    dsn.xtext_decode(dsn.xtext_encode(orcpt))
    headers = dsn._crlf(dsn._headers(original))
    full = dsn._crlf(original)
    for text in (headers, full):
        assert text == b"" or text.endswith(b"\r\n")
        assert text.count(b"\n") == text.count(b"\r\n"), text  # no bare LF
    report = dsn.build_report(kind, env, recipients, "pop.contoso.test", full, 1_700_000_100.0)
    head, sep, rest = report.partition(b"\r\n\r\n")
    assert sep and head.isascii(), head
    for i, line in enumerate(head.split(b"\r\n")):
        assert b"\r" not in line and b"\n" not in line, line
        assert line[:1] not in (b" ", b"\t") or i > 0, line  # a fold follows a field
        assert not re.search(rb"[\x00-\x1f\x7f]", line), line  # RFC 5322 section 2.2
    msg = email.message_from_bytes(report, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) == 3, len(parts) if isinstance(parts, list) else parts
    assert parts[1].get_content_type() == "message/delivery-status"
    status = parts[1].get_payload()
    blocks = status[1:] if isinstance(status, list) else []
    assert len(blocks) == len(recipients), (len(blocks), len(recipients))
    # the report's own parts (not the returned message) are ASCII lines of at most 998 octets
    status_part = report.find(b"Content-Type: message/delivery-status")
    own = report[: report.find(b"\r\n--=_report_", status_part)]
    assert own.isascii() and not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", own), own
    assert all(len(line) <= 998 for line in own.split(b"\r\n")), own
    assert own.count(b"\n") == own.count(b"\r\n"), own
    for block, r in zip(blocks, recipients, strict=True):
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", block["Status"] or ""), block["Status"]
        assert block["Action"] == kind, (block["Action"], kind)
        final = block["Final-Recipient"]
        if len(final) < 900:  # unfolded: the address comes back exactly (RFC 6533 xtext)
            assert _final_recipient(final) == r.address, (final, r.address)
    envid_field = status[0]["Original-Envelope-Id"] if isinstance(status, list) else None
    if envid:  # as it was, or RFC 3461 xtext of its UTF-8 octets (folds aside)
        got = envid_field or ""
        xtext = re.sub(r"\s", "", got)
        assert got == envid or dsn.xtext_decode(xtext).encode("latin-1") == envid.encode(), (
            got, envid)


def _final_recipient(value: str) -> str:
    """The address of a Final-Recipient value: ``rfc822; a`` or RFC 6533 ``utf-8; xtext``."""
    kind, _, addr = value.partition(";")
    addr = addr[1:] if addr.startswith(" ") else addr
    if kind == "utf-8":
        return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m.group(1), 16)), addr)
    assert kind == "rfc822", value
    return addr


# --------------------------------------------------------------------------- config.py


_CONFIG_PATH = "/nonexistent/fuzz/pop3coexist.toml"
_CONFIG_ERROR_RE = re.compile(re.escape(_CONFIG_PATH) + r"(?::\d+)?: (.*)", re.S)


@harness("config")
def fuzz_config(data: bytes) -> None:
    """config.py parse_config on any text. Invariants: it returns a Config or raises
    ConfigError, never another exception; the error names the file (``<config>`` here) and
    either the line of invalid TOML or a ``[section.key]`` (with the line when the key is
    written in the file)."""
    from pop3coexist.config import Config, parse_config
    from pop3coexist.errors import ConfigError

    text = data.decode("utf-8", "replace")
    try:
        cfg = parse_config(text, Path(_CONFIG_PATH))
    except ConfigError as e:
        message = str(e)
        m = _CONFIG_ERROR_RE.match(message)
        assert m, message
        rest = m.group(1)
        assert rest.startswith(("not valid TOML", "[")), message
        return
    assert isinstance(cfg, Config)


# --------------------------------------------------------------------------- ldapfilter.py


@harness("ldapfilter")
def fuzz_ldapfilter(data: bytes) -> None:
    """ldapfilter.py: escape_value, equals and parse_filter. Invariants: an escaped value is
    printable ASCII without ``* ( ) \\`` or NUL unescaped, and ``(uid=<escaped>)`` parses to an
    equality match whose value is exactly the input octets (no injection); any text either
    parses (and encodes to BER) or raises FilterError, never another exception."""
    from ldaptor.protocols import pureldap

    from pop3coexist import ldapfilter as L

    escaped = L.escape_value(data)
    assert re.fullmatch(r"(?:[\x20-\x7e]|\\[0-9a-f]{2})*", escaped), escaped
    assert not re.search(r"[*()\x00]", escaped)
    parsed = L.parse_filter(L.equals("uid", data))
    assert isinstance(parsed, pureldap.LDAPFilter_equalityMatch), parsed
    assert parsed.assertionValue.value == data, (parsed.assertionValue.value, data)
    both = L.parse_filter(L.all_of("(objectClass=user)", L.any_of(L.equals("mail", data),
                                                                  L.equals("uid", data))))
    assert isinstance(both, pureldap.LDAPFilter_and)
    text = data.decode("utf-8", "replace")
    try:
        f = L.parse_filter(text)
    except L.FilterError:
        return
    f.toWire()


# --------------------------------------------------------------------------- POP3 session


class _Pop3Rig:
    """POP3 factories on the unit-tier fakes with two more messages for ted (an mbox line, a
    lone dot, CR CR LF, a bare CR; an empty file), reused across inputs: the mailbox and the
    log-in failures are reset before each input."""

    def __init__(self) -> None:
        from tests.unit.pop3_env import Env

        self.envs = {}
        for secure in (False, True):
            for implicit in (False, True):
                env = Env(tls=True, implicit_tls=implicit, require_secure_auth=secure)
                env.store.add("ted@pop.contoso.test", b"From x\r\n.\r\nFrom: a\r\r\n\n..\r", b"")
                self.envs[secure, implicit] = (env, list(env.store.mail["pop.contoso.test"]["ted"]))

    def env(self, secure: bool, implicit: bool):
        """The Env of this variant, its mailbox as at the start, no failures remembered."""
        env, messages = self.envs[secure, implicit]
        env.store.mail["pop.contoso.test"]["ted"][:] = messages
        env.throttle._entries.clear()
        return env


_pop3_rig: _Pop3Rig | None = None


@harness("pop3_session")
def fuzz_pop3_session(data: bytes) -> None:
    """The POP3 session (pop3/server.py framing, states, SASL, STLS, RETR/TOP through the
    stream) fed any bytes in any cuts. Octet 0: the cuts; octet 1: bit 0
    ``require_secure_auth``, bit 1 implicit TLS (POP3S), bit 2 the idle timeout passes at the
    end. Invariants: nothing is logged as a failure; one well-formed response per complete
    line, in order; multi-line responses dot-stuffed; RETR's unstuffed size is what +OK and
    LIST said (``oracles.Pop3Transcript``); an idle session is closed and deletes nothing."""
    global _pop3_rig
    if len(data) < 2:
        return
    if _pop3_rig is None:
        _pop3_rig = _Pop3Rig()
    env = _pop3_rig.env(bool(data[1] & 1), bool(data[1] & 2))
    before = list(env.store.mail["pop.contoso.test"]["ted"])
    chunks = chunked(data[2:], data[0])
    with oracles.no_logged_failures():
        proto, transport, greeting = env.connect()
        assert greeting.startswith(b"+OK pop.contoso.test POP3 server ready"), greeting
        for chunk in chunks:
            if transport.disconnecting:
                break
            proto.dataReceived(chunk)
            settle(env.clock, lambda: proto._waiting is not None)
        idle = data[1] & 4 and not transport.disconnecting
        if idle:
            sent = transport.value()
            env.clock.advance(601)
            assert transport.disconnecting, "an idle POP3 session stays open"
            assert transport.value() == sent, "autologout sends nothing (RFC 1939 section 3)"
        output = transport.value()
        proto.connectionLost(None)
        settle(env.clock, lambda: False)
    if idle:
        assert env.store.mail["pop.contoso.test"]["ted"] == before, "an idle session deleted"
    oracles.Pop3Transcript().check(chunks, output)


# --------------------------------------------------------------------------- SMTP client


_CLIENT_BODY = b"Subject: t\n\n.leading dot\nline\r\n..two\nno newline at end"
_client_body_path: Path | None = None


@harness("smtp_client")
def fuzz_smtp_client(data: bytes) -> None:
    """smtp/client.py: the outbound ESMTP client fed any server bytes (a hostile or broken
    next hop) in any cuts. Octet 0: the cuts; octet 1: bits 0-1 the TLS policy (none,
    opportunistic, required), bit 2 a smart-host log-in, bit 3 DSN parameters. Each reply
    line is read after the client sent what the line before asked for. Invariants:
    nothing is logged as a failure; the client writes only CRLF lines; the result comes exactly
    once, with one reply per recipient whose code is 200-599 and whose text is one printable
    line (it goes into a DSN); a recipient is delivered only after the server's 250 to the
    end of data; the message sent after a 354 is the body dot-stuffed with CRLF line ends; no
    password is sent outside TLS unless the policy is none."""
    global _client_body_path
    import tempfile

    from twisted.internet import error
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from pop3coexist.smtp import client as c
    from tests.support.smtp_fakes import TLSStringTransport

    if len(data) < 2:
        return
    if _client_body_path is None:
        _client_body_path = Path(tempfile.mkdtemp(prefix="client-fuzz-")) / "body"
        _client_body_path.write_bytes(_CLIENT_BODY)
    tls = ("none", "opportunistic", "required", "opportunistic")[data[1] & 3]
    login = bool(data[1] & 4)
    dsn = bool(data[1] & 8)
    settings = c.ClientSettings(helo="pop.contoso.test", tls=tls, tls_name="mx.example.net",
                                username="relay" if login else "",
                                password=c.Secret("s3cret-pw") if login else None)
    rcpts = ["b@example.net", "c@example.net"]
    txn = c.Transaction(sender="a@example.org",
                        recipients=[{"address": r, "notify": ["SUCCESS"] if dsn else None,
                                     "orcpt": "rfc822;x@y.test" if dsn else None} for r in rcpts],
                        body_path=_client_body_path, size=len(_CLIENT_BODY),
                        ret="HDRS" if dsn else None, envid="e1" if dsn else None)
    results: list = []
    with oracles.no_logged_failures():
        proto = c.OutboundESMTP(settings, txn, results.append)
        clock = Clock()
        proto.callLater = clock.callLater
        transport = TLSStringTransport()
        proto.makeConnection(transport)
        # a server answers what it has read: the body goes out before the next reply line
        pieces = [p for chunk in chunked(data[2:], data[0])
                  for p in re.split(rb"(?<=\n)", chunk) if p]
        for chunk in pieces:
            if transport.disconnecting or results:
                break
            proto.dataReceived(chunk)
            while transport.producer is not None and not transport.disconnecting:
                transport.producer.resumeProducing()
        proto.connectionLost(Failure(error.ConnectionDone()))
        clock.advance(1000)
    assert len(results) == 1, results
    result = results[0]
    assert [r.address for r in result.replies] == rcpts
    for r in result.replies:
        assert 200 <= r.code < 600, r
        assert not re.search(r"[\x00-\x1f\x7f]", r.reply), r  # one printable line
        assert r.enhanced[0] in "245", r
    sent = transport.value()
    assert sent == b"" or sent.endswith(b"\r\n") or transport.disconnecting, sent[-40:]
    if tls != "none" and not transport.tls_started:
        assert b"s3cret" not in sent and base64.b64encode(b"s3cret-pw")[:8] not in sent, sent
    if any(r.delivered for r in result.replies):
        body_start = sent.find(b"DATA\r\n")
        assert body_start >= 0, sent
        assert _stuffed(_CLIENT_BODY) in sent[body_start:], sent[body_start:]


def _stuffed(body: bytes) -> bytes:
    """``body`` as it must go out after DATA: CRLF line ends, dot-stuffed, the end marker."""
    lines = body.replace(b"\r\n", b"\n").split(b"\n")
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines) + b".\r\n"


def b64(text: bytes) -> bytes:
    return base64.b64encode(text)


# --------------------------------------------------------------------------- policy/sieve.py


def _sieve_shape(commands: list) -> tuple:
    """A parsed script without its line numbers: what a round trip must keep."""
    from pop3coexist.policy import sieve as S

    def arg(a):
        if isinstance(a, S.StringList):
            return ("strings", tuple(a.values), a.single)
        if isinstance(a, S.Tag):
            return ("tag", a.name)
        return ("number", a.value)

    def cmd(c):
        return (c.name, tuple(arg(a) for a in c.arguments), tuple(cmd(t) for t in c.tests),
                None if c.block is None else tuple(cmd(b) for b in c.block),
                tuple((k, None if v is None else arg(v)) for k, v in c.tags.items()),
                tuple(arg(a) for a in c.positional))

    return tuple(cmd(c) for c in commands)


def sieve_text(commands: list) -> str:
    """A parsed script written back as Sieve (RFC 5228 section 8): quoted strings with ``"``
    and ``\\`` escaped, numbers in octets, one command per line."""
    from pop3coexist.policy import sieve as S

    def arg(a) -> str:
        if isinstance(a, S.StringList):
            quoted = ['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in a.values]
            return quoted[0] if a.single else "[" + ", ".join(quoted) + "]"
        if isinstance(a, S.Tag):
            return a.name
        return str(a.value)

    def test(c) -> str:
        out = " ".join([c.name, *(arg(a) for a in c.arguments)])
        if len(c.tests) == 1 and not S.SPECS.get(c.name, S.Spec("test")).tests == "list":
            return out + " " + test(c.tests[0])
        if c.tests:
            return out + " (" + ", ".join(test(t) for t in c.tests) + ")"
        return out

    def block(cs, indent: str) -> str:
        lines = []
        for c in cs:
            head = indent + test(c)
            if c.block is None:
                lines.append(head + ";\n")
            else:
                lines.append(head + " {\n" + block(c.block, indent + "  ") + indent + "}\n")
        return "".join(lines)

    return block(commands, "")


_SIEVE_MAIL = (b"Return-Path: <a@example.org>\r\nFrom: Ann <ann@example.org>\r\n"
               b"To: ted@pop.contoso.test, =?utf-8?q?J=C3=BCrgen?= <j@x.test>\r\n"
               b"Subject: [list] Re: hello 42\r\nX-Spam-Score: 7\r\n"
               b"Content-Type: text/plain\r\n\r\nbody text with money\r\n")


@harness("sieve")
def fuzz_sieve(data: bytes) -> None:
    """policy/sieve.py parse (the lexer, parser and validator ManageSieve, the admin tool and
    the rules stage share) on any octets, and policy/sieve_run.py over a parsed script.
    Invariants: parse returns commands or raises SieveSyntaxError (never another exception),
    with a line between 1 and the script's last line and a message on one line; ``check``
    agrees; the same octets give the same result; a parsed script written back as Sieve
    (``sieve_text``) parses to the same tree (round trip); run over a fixed message it returns
    a Result or raises SieveRuntimeError, never another exception, within its step limit."""
    from pop3coexist.policy import sieve as S
    from pop3coexist.policy import sieve_run as R

    try:
        commands = S.parse(data)
    except S.SieveSyntaxError as e:
        assert 1 <= e.line <= data.count(b"\n") + 1, (e.line, data.count(b"\n"))
        assert e.message and "\n" not in e.message and "\r" not in e.message, e.message
        assert S.check(data) == str(e)
        return
    assert S.check(data) is None
    shape = _sieve_shape(commands)
    assert _sieve_shape(S.parse(data)) == shape, "parse is not deterministic"
    text = sieve_text(commands)
    try:
        again = S.parse(text)
    except S.SieveSyntaxError as e:
        raise AssertionError(f"the script written back does not parse: {e}\n{text}") from None
    assert _sieve_shape(again) == shape, (text, _sieve_shape(again), shape)
    mail = R.MailContext.from_bytes("a@example.org", "ted@pop.contoso.test", _SIEVE_MAIL)
    try:
        result = R.run(commands, mail, R.Limits(steps=5000, seconds=5.0))
    except R.SieveRuntimeError as e:
        assert e.message, e
        return
    assert isinstance(result, R.Result)
    assert len(result.actions) <= 32, len(result.actions)


# --------------------------------------------------------------------------- milter/codec.py


def _milter_reference(stream: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The packets in ``stream`` by the protocol's own rule (4-octet length, then that many
    octets; 0 or over MAX_PACKET is an error), and whether an error ends it."""
    from pop3coexist.milter import codec

    out, pos = [], 0
    while len(stream) - pos >= 4:
        length = int.from_bytes(stream[pos:pos + 4], "big")
        if length == 0 or length > codec.MAX_PACKET:
            return out, True
        if len(stream) - pos - 4 < length:
            break
        packet = stream[pos + 4:pos + 4 + length]
        out.append((packet[:1], packet[1:]))
        pos += 4 + length
    return out, False


def milter_reply_bytes(reply) -> bytes:
    """A filter's packet for ``reply`` (codec.Reply) as libmilter writes it (test side)."""
    import struct

    from pop3coexist.milter import codec

    strings = codec.cstrings(*reply.args) if reply.args else b""
    if reply.code == codec.REPLBODY:
        data = reply.body
    elif reply.code in (codec.CHGHEADER, codec.INSHEADER, codec.SETSYMLIST):
        data = struct.pack("!I", reply.index) + strings
    else:
        data = strings
    return codec.encode(reply.code, data)


@harness("milter")
def fuzz_milter(data: bytes) -> None:
    """milter/codec.py: a filter's byte stream (octets 1...) cut as octet 0 says, through
    ``Decoder`` and ``parse_reply``; and the MTA-side encoders on strings from the input.
    Invariants: decoding raises only ProtocolError; any cuts give the packets of the
    protocol's own framing rule (``_milter_reference``) and the error exactly when it has
    one; every packet either parses to a Reply or raises ProtocolError; a Reply written back
    (``milter_reply_bytes``) decodes and parses to the same Reply; every packet the MTA side
    encodes (connect, macros, OPTNEG, any command) decodes to its command and data, with each
    string as given less its NULs."""
    import struct

    from pop3coexist.milter import codec

    if len(data) < 1:
        return
    stream = data[1:]
    reference, broken = _milter_reference(stream)
    decoder = codec.Decoder()
    packets: list[tuple[bytes, bytes]] = []
    failed = False
    for chunk in chunked(stream, data[0]):
        try:
            packets += decoder.feed(chunk)
        except codec.ProtocolError:
            failed = True
            break
    assert failed == broken, (failed, broken)
    assert packets == reference[: len(packets)], (packets, reference)
    if not broken:
        assert packets == reference, (packets, reference)
    for code, payload in packets:
        try:
            reply = codec.parse_reply(code, payload)
        except codec.ProtocolError as e:
            assert str(e), e
            continue
        assert isinstance(reply, codec.Reply) and reply.code == code
        again = codec.Decoder().feed(milter_reply_bytes(reply))
        assert len(again) == 1 and again[0][0] == code, again
        assert codec.parse_reply(*again[0]) == reply, (reply, again)
        if len(payload) >= 12:
            assert len(codec.parse_optneg(payload)) == 3
    # the MTA side: what we send decodes to what we meant
    text = stream.decode("utf-8", "surrogateescape")
    parts = text.split("\x01")[:6] + [""] * 6
    port = int.from_bytes(data[:2].ljust(2, b"\0"), "big")
    for family in (codec.FAMILY_INET, codec.FAMILY_INET6, codec.FAMILY_UNIX,
                   codec.FAMILY_UNKNOWN):
        [(code, payload)] = codec.Decoder().feed(codec.connect(parts[0], family, port, parts[1]))
        assert code == codec.CONNECT
        host, _, rest = payload.partition(b"\0")
        assert host == parts[0].encode("utf-8", "surrogateescape").replace(b"\0", b"")
        assert rest[:1] == family
        if family != codec.FAMILY_UNKNOWN:
            assert struct.unpack("!H", rest[1:3])[0] == port
            assert rest[3:] == codec.cstrings(parts[1])
    macros = {parts[2]: parts[3], parts[4]: parts[5]}
    [(code, payload)] = codec.Decoder().feed(codec.macros(codec.MAIL, macros))
    assert code == codec.MACRO and payload[:1] == codec.MAIL
    expected = [x for k, v in macros.items() if v for x in (k, v)]
    assert payload[1:] == codec.cstrings(*expected), (payload, expected)
    assert codec._split(payload[1:]) == [
        s.encode("utf-8", "surrogateescape").replace(b"\0", b"").decode("utf-8", "surrogateescape")
        for s in expected]
    command = data[:1] or b"B"
    [(code, payload)] = codec.Decoder().feed(codec.encode(command, stream[: codec.MAX_PACKET - 1]))
    assert (code, payload) == (command, stream[: codec.MAX_PACKET - 1])
    version, actions, protocol = codec.parse_optneg(codec.optneg()[5:])
    assert (version, actions, protocol) == (codec.VERSION, codec.ACTIONS_OFFERED,
                                            codec.PROTOCOL_OFFERED)
# --------------------------------------------------------------------------- IMAP


class _ImapRig:
    """The IMAP factory (imap/factory.py) over the real Maildir store in a temporary folder
    (ted with three messages in new/: plain, multipart, a bare-CR one; a ``Sent`` folder and
    the special-use folders a first log-in makes), the unit tier's fake checker and a
    synchronous ``run_blocking``, in /dev/shm where it exists; made once per process and
    reused across inputs.

    Between inputs ted's Maildir is put back as the template was, cheaply: ``changed`` compares
    the mtimes of the mailbox's folders (every create, rename and unlink the store does changes
    one; the store never rewrites a file in place) with those recorded after the last reset,
    and ``reset`` removes what the template lacks and hard-links back what it has (message
    files are never written in place, so a link shares the template's octets safely). So every
    input starts from the same mailbox, whatever the input before it did (a SELECT that moved
    messages from new/ to cur/, an APPEND, a RENAME), and no input pays for a copy. The
    template's folders and files are stamped an hour old, and ``reset`` stamps every folder it
    touched back to that time: each input meets a mailbox that did not change lately, as a
    server mostly does (the store reads a folder changed within its ``RACY_WINDOW`` again on
    every command; with fresh stamps every input paid that on every command and the store's
    cached path was never fuzzed). The store's shared snapshots are dropped before each input
    (a new process's view), so no input reuses what the one before read.

    A folder's mtime only shows a change made in a later clock tick than the one recorded:
    Linux stamps files with a coarse clock (one jiffy, up to 10 ms) unless the file system
    has fine-grained timestamps (tmpfs since 6.13), and a whole input can run within one
    tick. So a folder whose recorded mtime is less than ``racy_window_ns`` before the moment
    it was recorded is "racy": it is compared entry by entry after every input until it is
    older (as the store's own ``RACY_WINDOW``). The factory's failed-log-in throttle is
    emptied and the clock's pending calls are run out after each input, so nothing of one
    session (a success that marks the source trusted, a timer) reaches the next."""

    racy_window_ns = 50_000_000  # 50 ms: five ticks of the coarsest kernel clock (HZ=100)

    def __init__(self) -> None:
        import atexit
        import os
        import shutil
        import tempfile
        import time

        from twisted.internet import task

        from pop3coexist.config import Config, DomainsConfig, ImapConfig, ServerConfig
        from pop3coexist.imap.factory import IMAPServerFactory
        from pop3coexist.store.folders import MaildirFolders
        from pop3coexist.store.maildir import MaildirStore
        from tests.support.fakes import FakeChecker, sync_run_blocking

        # on tmpfs where there is one: the store fsyncs, and a million inputs on a disk crawl
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.tmp = Path(tempfile.mkdtemp(prefix="imap-fuzz-", dir=shm))
        atexit.register(shutil.rmtree, self.tmp, True)
        host = "pop.contoso.test"
        self.clock = task.Clock()
        store = MaildirStore(self.tmp / "mailroot")
        store.add_domain(host)
        store.add_mailbox(host, "ted")
        self.box = self.tmp / "mailroot" / host / "ted"
        messages = (b"From: a@b.test\nSubject: one\n\nbody\n.dot\n",
                    b"Subject: two\nContent-Type: multipart/mixed; boundary=b\n\n"
                    b"--b\nContent-Type: text/plain\n\nx\n--b--\n",
                    b"Subject: three\r\rbare CR\r")
        for i, data in enumerate(messages):
            (self.box / "new" / f"170000000{i}.M{i}P1.fuzz").write_bytes(data)
        # what BODY[] of each must be: LF -> CRLF; a lone CR is a line end too (canonical.py)
        self.stored = [messages[0].replace(b"\n", b"\r\n"), messages[1].replace(b"\n", b"\r\n"),
                       b"Subject: three\r\n\r\nbare CR\r\n"]
        for sub in ("cur", "new", "tmp"):
            (self.box / ".Sent" / sub).mkdir(parents=True)
        # what the first log-in makes (Sent, Drafts, Trash, Junk, subscriptions): in the template
        account = MaildirFolders(store).open_account(host, "ted")
        account.ensure_special_folders()
        account.open_folder("INBOX").sync()  # the uid list; the messages stay in new/ (\\Recent)
        self.template = self.tmp / "template"
        shutil.copytree(self.box, self.template)
        self.manifest = self._walk(self.template)
        # every folder and file an hour old, as a mailbox nobody changed lately
        self.stamp = time.time_ns() - 3600 * 10**9
        for rel, entries in self.manifest.items():
            for name in [*entries, ""]:
                os.utime(self.template / rel / name, ns=(self.stamp, self.stamp))
        self.inodes = {f"{rel}/{name}": os.lstat(self.template / rel / name).st_ino
                       for rel, entries in self.manifest.items()
                       for name, is_dir in entries.items() if not is_dir}
        shutil.rmtree(self.box)
        self._fill("")
        self._clean: tuple = ()
        self._racy: frozenset[str] = frozenset()
        self.reset()
        checker = FakeChecker({f"ted@{host}": "pw"}, local_domains=(host,), offers_secrets=False)
        config = Config(server=ServerConfig(host, self.tmp), domains=DomainsConfig(local=(host,)),
                        imap=ImapConfig(max_literal=4096, auth_failure_delay=0.0))
        self.factory = IMAPServerFactory(config, store, checker, reactor=self.clock,
                                         run_blocking=sync_run_blocking, tls_options=None)

    _WHOLE_BODY = re.compile(rb"\* \d+ FETCH \((?:UID \d+ )?BODY\[\] \{(\d+)\}\r\n")
    _LITERAL = re.compile(rb"\{(\d{1,5})\+?\}\r\n")

    def check_bodies(self, body: bytes, output: bytes) -> None:
        """Every whole ``BODY[]`` that opens a FETCH answer is a stored message or one of the
        literals of ``body`` (an APPEND), in CRLF form (see ``fuzz_imap_session``)."""
        from pop3coexist.imap.fetch import canonical_bytes
        from tests.fuzz import imap_oracles

        found = [r for r in imap_oracles.split_responses(output) if r.startswith(b"* ")]
        wanted = []
        for resp in found:
            m = self._WHOLE_BODY.match(resp)
            if m:
                wanted.append(resp[m.end():m.end() + int(m.group(1))])
        if not wanted:
            return
        known = set(self.stored)
        for m in self._LITERAL.finditer(body):
            known.add(canonical_bytes(body[m.end():m.end() + int(m.group(1))]))
        for got in wanted:
            assert got in known, f"BODY[] is no stored message: {got[:200]!r}"

    @staticmethod
    def _walk(root: Path) -> dict[str, dict[str, bool]]:
        """Every folder under ``root`` (relative path, "" for root) -> its entries (name ->
        True for a folder)."""
        import os

        out: dict[str, dict[str, bool]] = {}
        todo = [""]
        while todo:
            rel = todo.pop()
            entries = out[rel] = {}
            with os.scandir(root / rel if rel else root) as it:
                for e in it:
                    entries[e.name] = d = e.is_dir(follow_symlinks=False)
                    if d:
                        todo.append(f"{rel}/{e.name}" if rel else e.name)
        return out

    def changed(self) -> bool:
        """True when the last input may have changed ted's Maildir: one of its folders has
        another mtime or is gone (a folder made inside one changes that one's mtime), or one
        is racy (see the class docstring)."""
        import os

        if self._racy:
            return True
        try:
            return any(os.stat(p).st_mtime_ns != m for p, m in self._clean)
        except FileNotFoundError:
            return True

    def _fill(self, rel: str) -> None:
        """Make folder ``rel`` of the mailbox as the template has it (links for files)."""
        import os

        box, tpl = str(self.box), str(self.template)
        os.mkdir(f"{box}/{rel}" if rel else box)
        for name, is_dir in self.manifest[rel].items():
            r = f"{rel}/{name}" if rel else name
            if is_dir:
                self._fill(r)
            else:
                os.link(f"{tpl}/{r}", f"{box}/{r}")

    def reset(self) -> None:
        """Put ted's Maildir back as the template is (see the class docstring): only the
        folders whose mtime changed, and the racy ones, are compared with the template."""
        import os
        import shutil
        import time

        box, tpl = str(self.box), str(self.template)
        before = dict(self._clean)
        clean = []
        for rel, want in self.manifest.items():
            path = f"{box}/{rel}" if rel else box
            try:
                mtime = os.stat(path).st_mtime_ns
            except FileNotFoundError:
                continue  # its parent changed too: made again there
            if before.get(path) != mtime or path in self._racy:
                with os.scandir(path) as it:
                    have = {e.name: e for e in it}
                for name, e in have.items():
                    is_dir = e.is_dir(follow_symlinks=False)
                    if want.get(name) is None or want[name] != is_dir:
                        (shutil.rmtree if is_dir else os.unlink)(e.path)
                    elif not is_dir and e.inode() != self.inodes[f"{rel}/{name}"]:
                        os.unlink(e.path)
                        os.link(f"{tpl}/{rel}/{name}", e.path)
                for name, is_dir in want.items():
                    if name not in have:
                        r = f"{rel}/{name}" if rel else name
                        if is_dir:
                            self._fill(r)
                        else:
                            os.link(f"{tpl}/{r}", f"{box}/{r}")
        racy = []
        for rel in self.manifest:
            path = f"{box}/{rel}" if rel else box
            st = os.stat(path)
            mtime = st.st_mtime_ns
            if mtime != self.stamp:
                os.utime(path, ns=(st.st_atime_ns, self.stamp))
                mtime = os.stat(path).st_mtime_ns
            clean.append((path, mtime))
            if time.time_ns() - mtime < self.racy_window_ns:
                racy.append(path)
        self._clean = tuple(clean)
        self._racy = frozenset(racy)

    @staticmethod
    def fresh_process() -> None:
        """Drop the store's snapshots shared between sessions (``store.folders``): what the
        input before read is not reused."""
        from pop3coexist.store import folders

        with folders._SHARED_LOCK:
            folders._SNAPSHOTS.clear()

    def end_session(self) -> None:
        """After an input's session closed: run the clock's pending calls out, then forget
        the session's log-ins and failures (the throttle). A call still pending after 400
        steps of 31 s (over three hours of fake time) is a timer the closed session left
        running."""
        settle(self.clock, lambda: bool(self.clock.getDelayedCalls()))
        self.factory.throttle._entries.clear()
        left = self.clock.getDelayedCalls()
        assert not left, f"a closed IMAP session left timers running: {left!r}"


_imap_rig: _ImapRig | None = None


@harness("imap_session")
def fuzz_imap_session(data: bytes) -> None:
    """The IMAP session (imap/server.py line and literal framing, states, every command,
    AUTHENTICATE, IDLE, over the real Maildir store) fed any bytes in any cuts. Octet 0: the
    cuts; octet 1: bit 0 a ``LOGIN`` line goes first (the fuzzer reaches the authenticated
    states at once), bit 1 a ``SELECT INBOX`` after it, bit 2 the idle timeout passes at the
    end. Invariants (tests/fuzz/imap_oracles.py): nothing is logged as a failure; every output
    line ends in CRLF and is an untagged, continuation or tagged response; the tagged replies
    come in the order of the commands (line + literals) that carried them, at most one each;
    the session ends with a BYE or stays open; an idle session is closed; a ``FETCH`` answer
    whose first item (after UID) is the whole ``BODY[]`` carries the octets of a stored message
    or of a message the input appended (their CRLF form), never anything else."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from pop3coexist.imap.common import MAX_LITERALS
    from tests.fuzz import imap_oracles

    global _imap_rig
    if len(data) < 2:
        return
    if _imap_rig is None:
        _imap_rig = _ImapRig()
    rig = _imap_rig
    rig.fresh_process()
    prefix = b""
    if data[1] & 1:
        prefix += b"L1 LOGIN ted@pop.contoso.test pw\r\n"
        if data[1] & 2:
            prefix += b"S1 SELECT INBOX\r\n"
    body = prefix + data[2:]
    chunks = chunked(body, data[0])
    try:
        with oracles.no_logged_failures():
            proto = rig.factory.buildProtocol(None)
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                                        hostAddress=IPv4Address("TCP", "127.0.0.1", 143))
            proto.makeConnection(transport)
            greeting = transport.value()
            assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1"), greeting
            for chunk in chunks:
                if transport.disconnecting:
                    break
                proto.dataReceived(chunk)
                settle(rig.clock, lambda: proto._busy)
            if data[1] & 4 and not transport.disconnecting:
                rig.clock.advance(rig.factory.config.imap.idle_timeout + 1)
                assert transport.disconnecting, "an idle IMAP session stays open"
            output = transport.value()[len(greeting):]
            proto.connectionLost(None)
            rig.end_session()
        if not transport.disconnecting:
            imap_oracles.check_any(body, rig.factory.max_literal, output, MAX_LITERALS)
        else:
            imap_oracles.split_responses(output)  # still well framed up to the end
        rig.check_bodies(body, output)
    finally:
        if rig.changed():
            rig.reset()


@harness("imap_parse")
def fuzz_imap_parse(data: bytes) -> None:
    """imap/parse.py on any octets: ``tokenize`` raises only BadSyntax and gives atoms (str,
    printable, no space), strings (bytes) and lists; ``parse_seqset`` over the text (largest
    from octet 0) raises only BadSyntax or gives sorted, merged ranges within 1..largest (a
    number typed past ``largest`` is in ``highest``, the caller's to refuse), and
    ``format_seqset`` of them parses back to the same numbers; ``parse_date`` and
    ``parse_datetime`` raise only BadSyntax/ValueError."""
    from pop3coexist.imap import parse as P

    if not data:
        return
    largest = data[0]
    text = data[1:]

    def walk(tokens: list) -> None:
        for t in tokens:
            if isinstance(t, list):
                walk(t)
            elif isinstance(t, P.Atom):
                assert t and " " not in t.split("[", 1)[0], repr(t)
            else:
                assert isinstance(t, bytes), repr(t)

    try:
        walk(P.tokenize(text))
    except P.BadSyntax:
        pass
    seq = text.decode("latin-1")
    try:
        numbers = P.parse_seqset(seq, largest)
    except P.BadSyntax:
        numbers = None
    if numbers is not None:  # ranges: sorted, apart, within 1..largest (never expanded)
        flat = [n for r in numbers.ranges for n in r]
        assert flat == sorted(flat) and all(1 <= n <= largest for n in flat), numbers
        assert all(b[0] > a[1] + 1 for a, b in zip(numbers.ranges, numbers.ranges[1:],
                                                        strict=False)), numbers
        listed = list(numbers)
        if listed:
            assert P.parse_seqset(P.format_seqset(listed), largest) == numbers
    for fn in (P.parse_date, P.parse_datetime):
        try:
            fn(text)
        except (P.BadSyntax, ValueError):
            pass
