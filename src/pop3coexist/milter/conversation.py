"""The milter conversation of one SMTP session (``interfaces.IContentFilter``), and the factory
that makes one per session for a listener (``interfaces.IContentFilterFactory``).

Each configured milter (``[[milter]]``, in config order) gets its own connection per SMTP
session, opened when the client connects. The session's steps go to each milter in order,
with the macros of that step: connect, HELO, MAIL, RCPT (from the delivery avatar, so a
refusal answers that command), then, once the message has arrived, DATA, each header, end of
headers, the body in chunks and end of message (from the content-check stage). A milter is
not sent a step it asked not to get (``SMFIP_NO*``), and not waited for where it said it will
not answer (``SMFIP_NR_*``); ``SMFIR_SKIP`` ends its body. Replies:

- continue: the next milter, then the next step;
- accept: this milter is done with the session (at connect or HELO) or the message (later);
- reject / tempfail / a reply code (``SMFIR_REPLYCODE``, the milter's own text): the step is
  refused (a RCPT: that recipient only); the remaining milters are not asked;
- discard (at MAIL, RCPT or the message): the message is taken and dropped;
- quarantine, header and body changes, recipient changes at end of message: see
  ``policy.content`` (each milter sees the message as the milters before it left it).

A milter that cannot be reached, times out or breaks the protocol is closed for the session and
its ``default_action`` applies (Postfix's ``milter_default_action``): ``tempfail``: MAIL, RCPT
and the end of DATA get ``451 4.7.1`` for the rest of the session (the client retries later,
nothing is lost); ``accept``: the session goes on without it and each message it did not scan
is logged. The next session tries it again.

Macros (name: value), sent at the step named, or at the steps a milter asked for with
``SMFIR_SETSYMLIST`` / its option negotiation reply (then any macro of the list below):
connect: ``j`` (server.hostname), ``{daemon_name}`` (the listener kind: smtp, submission,
smtps), ``{daemon_addr}``, ``v``, ``_``, ``{client_addr}``, ``{client_port}``,
``{client_name}`` and ``{client_ptr}`` (``unknown``: no reverse look-up); HELO:
``{tls_version}``, ``{client_addr}``; MAIL: ``{auth_type}``, ``{auth_authen}``, ``{mail_addr}``,
``{mail_host}``, ``{mail_mailer}``; RCPT: ``{rcpt_addr}``, ``{rcpt_host}``, ``{rcpt_mailer}``;
DATA, end of headers and end of message: ``i`` (the queue id).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pop3coexist import headers
from pop3coexist.errors import MailError
from pop3coexist.interfaces import IContentFilter, IContentFilterFactory, SMTPSession
from pop3coexist.milter import codec
from pop3coexist.milter.client import MilterConnection, MilterUnavailable
from pop3coexist.policy.content import (
    DISCARD,
    QUARANTINE,
    REJECT,
    TEMPFAIL,
    FilterResult,
)

log = Logger(namespace="pop3coexist.milter")

VERSION = "pop3coexist"
UNAVAILABLE = MailError(451, "4.7.1", "Service unavailable - try again later")
DEFAULT_TEXT = {"connect": "Service unavailable", "helo": "Command rejected",
                "mail": "Command rejected", "rcpt": "Command rejected",
                "message": "Message content rejected"}
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")

# the macros each step sends when the milter asked for no list of its own (Postfix's defaults)
STEP_MACROS: dict[bytes, tuple[str, ...]] = {
    codec.CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "v", "_", "{client_addr}",
                    "{client_port}", "{client_name}", "{client_ptr}"),
    codec.HELO: ("{tls_version}", "{client_addr}"),
    codec.MAIL: ("i", "{auth_type}", "{auth_authen}", "{mail_addr}", "{mail_host}",
                 "{mail_mailer}"),
    codec.RCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    codec.DATA: ("i",),
    codec.EOH: ("i",),
    codec.BODYEOB: ("i",),
}


def reply_error(text: str, step: str) -> MailError:
    """The MailError of a ``SMFIR_REPLYCODE`` text (``550 5.7.1 Virus found``, perhaps several
    lines ``550-5.7.1 a\\r\\n550 5.7.1 b``); a missing or mismatched enhanced code becomes
    x.7.1 of the reply's class."""
    lines = [line for line in re.split(r"\r?\n", text) if line]
    code = int(lines[0][:3])
    enhanced = None
    out = []
    for line in lines:
        rest = line[4:] if len(line) > 3 and line[:3].isascii() and line[:3].isdigit() else line
        m = _ENHANCED.match(rest)
        if m:
            enhanced = enhanced or ".".join(m.groups())
            rest = rest[m.end():]
        out.append(rest.strip())
    klass = str(code)[0]
    if enhanced is None or enhanced[0] != klass:
        enhanced = f"{klass}.7.1"
    body = "\n".join(t for t in out if t) or DEFAULT_TEXT[step]
    return MailError(code, enhanced, body)


def _address_parts(address: str) -> tuple[str, str]:
    """(``local@domain``, ``domain``) of an address (either may be empty)."""
    address = address.strip("<>")
    return address, address.rpartition("@")[2] if "@" in address else ""


@dataclass
class _Filter:
    """One milter in one session: its config, connection and state."""

    cfg: Any
    conn: MilterConnection | None = None
    session_done: bool = False  # accepted the session, or unusable: never asked again
    message_done: bool = False  # accepted the message in progress
    in_message: bool = False  # got MAIL for the transaction in progress
    unscanned: bool = False  # unavailable with default_action "accept"


@dataclass
class _Step:
    """The outcome of one step across the milters."""

    error: MailError | None = None
    discard: str | None = None  # the milter that asked to discard the message
    replies: list[codec.Reply] = field(default_factory=list)


@implementer(IContentFilterFactory)
class MilterSet:
    """See IContentFilterFactory: the milters of one listener (``config.MilterConfig``s, in
    order). ``daemon_name``: the listener kind (``{daemon_name}``)."""

    def __init__(self, milters: Sequence[Any], reactor: Any, hostname: str,
                 daemon_name: str, opener: Any = None) -> None:
        self.opener = opener
        self.milters = list(milters)
        self.reactor = reactor
        self.hostname = hostname
        self.daemon_name = daemon_name
        self.virus_scanners = {m.name for m in self.milters if m.virus_scanner}

    def open(self) -> MilterConversation:
        """See IContentFilterFactory."""
        return MilterConversation(self.milters, self.reactor, self.hostname, self.daemon_name,
                                  self.opener)


@implementer(IContentFilter)
class MilterConversation:
    """See IContentFilter and the module docstring."""

    def __init__(self, milters: Sequence[Any], reactor: Any, hostname: str,
                 daemon_name: str, opener: Any = None) -> None:
        # opener(reactor, name, socket, connect_timeout, command_timeout): an open, negotiated
        # MilterConnection (tests give one over an in-memory transport)
        self.opener = opener or MilterConnection.open
        self.filters = [_Filter(cfg) for cfg in milters]
        self.reactor = reactor
        self.hostname = hostname
        self.macros: dict[str, str] = {"j": hostname, "{daemon_name}": daemon_name,
                                       "v": VERSION}
        self.tempfailed: str | None = None  # the milter whose default_action holds the session
        self._discard: str | None = None
        self._closed = False

    # -- session steps (IContentFilter)

    def connect(self, session: SMTPSession) -> defer.Deferred:
        """See IContentFilter."""
        return defer.ensureDeferred(self._connect(session))

    async def _connect(self, session: SMTPSession) -> None:
        self._session_macros(session)
        ip = session.client_ip
        try:
            family = codec.FAMILY_INET6 if ipaddress.ip_address(ip).version == 6 else codec.FAMILY_INET
        except ValueError:
            family = codec.FAMILY_UNIX
        packet = codec.connect("unknown", family, session.client_port,
                               ip if family != codec.FAMILY_UNIX else "")
        for f in self.filters:
            try:
                f.conn = await self.opener(self.reactor, f.cfg.name, f.cfg.socket,
                                           f.cfg.connect_timeout, f.cfg.command_timeout)
            except MilterUnavailable as e:
                self._unavailable(f, str(e))
                continue
        step = await self._step(codec.CONNECT, packet, "connect", session_step=True)
        if step.error is not None:
            raise step.error

    def helo(self, session: SMTPSession) -> defer.Deferred:
        """See IContentFilter."""
        return defer.ensureDeferred(self._helo(session))

    async def _helo(self, session: SMTPSession) -> None:
        self._session_macros(session)
        step = await self._step(codec.HELO, codec.encode(codec.HELO,
                                codec.cstrings(session.helo or "")), "helo", session_step=True)
        if step.error is not None:
            raise step.error

    def mail(self, session: SMTPSession, sender: str, user: str | None,
             args: list[str]) -> defer.Deferred:
        """See IContentFilter."""
        return defer.ensureDeferred(self._mail(session, sender, user, args))

    async def _mail(self, session: SMTPSession, sender: str, user: str | None,
                    args: list[str]) -> None:
        self.abort()  # a new transaction: forget any earlier one
        if self.tempfailed:
            raise UNAVAILABLE
        self._session_macros(session)
        address, host = _address_parts(sender)
        self.macros.update({"{mail_addr}": address, "{mail_host}": host,
                            "{mail_mailer}": "smtp" if address else "",
                            "{auth_authen}": user or "", "{auth_type}": session.auth_type or "",
                            "i": ""})
        for f in self.filters:
            f.message_done = False
            f.in_message = f.conn is not None and not f.session_done
        packet = codec.encode(codec.MAIL, codec.cstrings(f"<{address}>", *args))
        step = await self._step(codec.MAIL, packet, "mail")
        if step.discard:
            self._discard = step.discard
        if step.error is not None:
            self.abort()
            raise step.error

    def rcpt(self, session: SMTPSession, recipient: str, local: bool) -> defer.Deferred:
        """See IContentFilter."""
        return defer.ensureDeferred(self._rcpt(session, recipient, local))

    async def _rcpt(self, session: SMTPSession, recipient: str, local: bool) -> None:
        if self.tempfailed:
            raise UNAVAILABLE
        address, host = _address_parts(recipient)
        self.macros.update({"{rcpt_addr}": address, "{rcpt_host}": host,
                            "{rcpt_mailer}": "local" if local else "smtp"})
        packet = codec.encode(codec.RCPT, codec.cstrings(f"<{address}>"))
        step = await self._step(codec.RCPT, packet, "rcpt")
        if step.discard:
            self._discard = step.discard
        if step.error is not None:
            raise step.error

    def abort(self) -> None:
        """See IContentFilter."""
        self._discard = None
        for f in self.filters:
            if f.in_message and f.conn is not None and not f.conn.closed:
                try:
                    f.conn.tell([codec.encode(codec.ABORT)])
                except MilterUnavailable:
                    pass
            f.in_message = False
            f.message_done = False

    def close(self) -> None:
        """See IContentFilter."""
        self._closed = True
        for f in self.filters:
            if f.conn is not None:
                f.conn.close()
            f.session_done = True

    # -- the message (IContentFilter.check)

    def check(self, message: Any) -> defer.Deferred:
        """See IContentFilter."""
        return defer.ensureDeferred(self._check(message))

    async def _check(self, message: Any) -> FilterResult:
        result = FilterResult()
        self.macros["i"] = message.queue_id
        try:
            if self.tempfailed:
                return FilterResult(TEMPFAIL, UNAVAILABLE, self.tempfailed,
                                    "milter unavailable")
            if self._discard:
                return FilterResult(DISCARD, None, self._discard, "discarded at MAIL or RCPT",
                                    self._virus(self._discard))
            data = await message.content()
            original = data
            for f in self.filters:
                if f.unscanned and f.cfg.name not in result.unscanned:
                    result.unscanned.append(f.cfg.name)
                if f.session_done or f.message_done or f.conn is None:
                    continue
                try:
                    replies, eom = await self._message_steps(f, data)
                except MilterUnavailable as e:
                    self._unavailable(f, str(e))
                    if self.tempfailed:
                        return FilterResult(TEMPFAIL, UNAVAILABLE, f.cfg.name,
                                            "milter unavailable")
                    result.unscanned.append(f.cfg.name)
                    continue
                if eom:
                    f.in_message = False  # the message is over for it: no SMFIC_ABORT
                if not replies:
                    continue
                final = replies[-1]
                verdict = self._final(final, "message", f.cfg.name)
                if verdict is not None:
                    verdict.virus = f.cfg.virus_scanner
                    return verdict
                data = self._edits(f, replies[:-1], data, result)
            if data != original:
                await message.replace_content(data)
            return result
        finally:
            self.abort()  # SMFIC_ABORT to the milters whose message ended before its EOM

    def _virus(self, name: str) -> bool:
        return any(f.cfg.name == name and f.cfg.virus_scanner for f in self.filters)

    def _final(self, reply: codec.Reply, step: str, name: str) -> FilterResult | None:
        """A FilterResult for a final message reply that ends the check, or None (go on)."""
        if reply.code == codec.REJECT:
            return FilterResult(REJECT, MailError(550, "5.7.1", DEFAULT_TEXT[step]), name,
                                DEFAULT_TEXT[step])
        if reply.code == codec.TEMPFAIL:
            return FilterResult(TEMPFAIL, UNAVAILABLE, name, UNAVAILABLE.text)
        if reply.code == codec.REPLYCODE:
            error = reply_error(reply.args[0], step)
            return FilterResult(TEMPFAIL if error.temporary else REJECT, error, name, error.text)
        if reply.code == codec.DISCARD:
            return FilterResult(DISCARD, None, name, "discarded")
        return None

    async def _message_steps(self, f: _Filter, data: bytes) -> tuple[list[codec.Reply], bool]:
        """DATA, headers, EOH, body and EOM to one milter: (the EOM replies, the final one
        last; True), or ([the reply that ended the message early] or [] when it accepted;
        False)."""
        conn = f.conn
        assert conn is not None
        timeout = f.cfg.command_timeout
        content = f.cfg.content_timeout
        reply = await self._send(conn, codec.DATA, codec.encode(codec.DATA), timeout)
        if reply is not None and reply.code not in (codec.CONTINUE, codec.SKIP):
            return ([] if reply.code == codec.ACCEPT else [reply]), False
        fields, rest = headers.split(data)
        if conn.sends(codec.HEADER):
            leadspc = bool(conn.protocol & codec.P_HDR_LEADSPC)
            for fld in fields:
                name, _, value = fld.partition(b":")
                value = value.rstrip(b"\r\n").replace(b"\r\n", b"\n")
                if not leadspc:
                    value = value.lstrip(b" \t")
                packet = codec.encode(codec.HEADER, name + b"\0" + value + b"\0")
                reply = await self._send(conn, codec.HEADER, packet, content)
                if reply is not None and reply.code not in (codec.CONTINUE, codec.SKIP):
                    return ([] if reply.code == codec.ACCEPT else [reply]), False
        reply = await self._send(conn, codec.EOH, codec.encode(codec.EOH), content)
        if reply is not None and reply.code not in (codec.CONTINUE, codec.SKIP):
            return ([] if reply.code == codec.ACCEPT else [reply]), False
        if conn.sends(codec.BODY):
            body = rest[2:] if rest.startswith(b"\r\n") else rest[1:] if rest.startswith(b"\n") else rest
            body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            for start in range(0, len(body), codec.CHUNK):
                packet = codec.encode(codec.BODY, body[start:start + codec.CHUNK])
                reply = await self._send(conn, codec.BODY, packet, content)
                if reply is None or reply.code == codec.CONTINUE:
                    continue
                if reply.code == codec.SKIP:
                    break
                return ([] if reply.code == codec.ACCEPT else [reply]), False
        packets = self._macro_packets(conn, codec.BODYEOB)
        return await conn.ask([*packets, codec.encode(codec.BODYEOB)], content), True

    def _edits(self, f: _Filter, replies: list[codec.Reply], data: bytes,
               result: FilterResult) -> bytes:
        """Apply one milter's end-of-message actions to ``data`` (those it negotiated)."""
        conn = f.conn
        assert conn is not None
        body: list[bytes] = []
        need = {codec.ADDHEADER: codec.F_ADDHDRS, codec.INSHEADER: codec.F_ADDHDRS,
                codec.CHGHEADER: codec.F_CHGHDRS, codec.REPLBODY: codec.F_CHGBODY,
                codec.ADDRCPT: codec.F_ADDRCPT, codec.ADDRCPT_PAR: codec.F_ADDRCPT_PAR,
                codec.DELRCPT: codec.F_DELRCPT, codec.QUARANTINE: codec.F_QUARANTINE}
        for r in replies:
            flag = need.get(r.code)
            if flag is None or not conn.may(flag):
                log.warn("milter {name}: action {code!r} not negotiated; ignored",
                         name=f.cfg.name, code=r.code.decode("latin-1"))
                continue
            try:
                if r.code == codec.ADDHEADER:
                    data = headers.add_header(data, r.args[0], r.args[1])
                elif r.code == codec.INSHEADER:
                    data = headers.insert_header(data, r.index, r.args[0], r.args[1])
                elif r.code == codec.CHGHEADER:
                    data = headers.change_header(data, r.args[0], max(1, r.index),
                                                 r.args[1] or None)
                elif r.code == codec.REPLBODY:
                    body.append(r.body)
                elif r.code in (codec.ADDRCPT, codec.ADDRCPT_PAR):
                    result.added.append(r.args[0].strip().strip("<>"))
                elif r.code == codec.DELRCPT:
                    result.removed.append(r.args[0].strip().strip("<>"))
                elif r.code == codec.QUARANTINE:
                    result.action = QUARANTINE
                    result.milter = f.cfg.name
                    result.reason = r.args[0] if r.args else "quarantined"
                    result.virus = f.cfg.virus_scanner
            except (ValueError, IndexError) as e:
                log.warn("milter {name}: bad action {code!r} ignored: {e}", name=f.cfg.name,
                         code=r.code.decode("latin-1"), e=str(e))
        if body:
            data = headers.replace_body(data, b"".join(body))
        return data

    # -- plumbing

    def _session_macros(self, session: SMTPSession) -> None:
        ip = session.client_ip
        self.macros.update({
            "{daemon_addr}": session.listener_ip or "", "{client_addr}": ip,
            "{client_port}": str(session.client_port) if session.client_port else "",
            "{client_name}": "unknown", "{client_ptr}": "unknown",
            "_": f"unknown [{ip}]", "{tls_version}": session.tls_version or "",
        })

    def _macro_packets(self, conn: MilterConnection, command: bytes) -> list[bytes]:
        names = conn.symlists.get(command, STEP_MACROS.get(command, ()))
        values = {n: self.macros.get(n, "") for n in names}
        if not any(values.values()):
            return []
        return [codec.macros(command, values)]

    async def _send(self, conn: MilterConnection, command: bytes, packet: bytes,
                    timeout: float) -> codec.Reply | None:
        """Send one step with its macros; its final reply, or None when the step is not sent
        or not answered."""
        if not conn.sends(command):
            return None
        packets = [*self._macro_packets(conn, command), packet]
        if not conn.replies(command):
            conn.tell(packets)
            return None
        replies = await conn.ask(packets, timeout)
        return replies[-1]

    async def _step(self, command: bytes, packet: bytes, step: str,
                    session_step: bool = False) -> _Step:
        """One session step to every milter still in it, in order; stops at a refusal."""
        out = _Step()
        for f in self.filters:
            if f.conn is None or f.session_done or (
                    not session_step and (f.message_done or not f.in_message)):
                continue
            try:
                reply = await self._send(f.conn, command, packet, f.cfg.command_timeout)
            except MilterUnavailable as e:
                self._unavailable(f, str(e))
                if self.tempfailed and not session_step:
                    out.error = UNAVAILABLE
                    return out
                continue
            if reply is None or reply.code in (codec.CONTINUE, codec.SKIP):
                continue
            if reply.code == codec.ACCEPT:
                if session_step:
                    f.session_done = True
                    f.conn.close()
                else:
                    f.message_done = True
                continue
            if reply.code == codec.DISCARD:
                if not session_step:
                    out.discard = out.discard or f.cfg.name
                continue
            if reply.code == codec.REJECT:
                code = 554 if step == "connect" else 550
                out.error = MailError(code, "5.7.1", DEFAULT_TEXT[step])
            elif reply.code == codec.TEMPFAIL:
                out.error = MailError(421 if step == "connect" else 451, "4.7.1",
                                      "Service unavailable - try again later")
            elif reply.code == codec.REPLYCODE:
                out.error = reply_error(reply.args[0], step)
            else:  # SHUTDOWN, CONN_FAIL or an action out of place: treat as unavailable
                self._unavailable(f, f"unexpected reply {reply.code!r} to {step}")
                continue
            log.info("milter {name}: {step} refused: {reply}", name=f.cfg.name, step=step,
                     reply=out.error.reply(), mail_event="milter_verdict",
                     milter=f.cfg.name, verdict=REJECT if not out.error.temporary else TEMPFAIL,
                     queue_id="", virus=False)
            return out
        return out

    def _unavailable(self, f: _Filter, why: str) -> None:
        """The milter failed: close it for this session and apply its default_action."""
        if f.conn is not None:
            f.conn.close()
        f.session_done = True
        if self._closed:
            return
        if f.cfg.default_action == "tempfail":
            self.tempfailed = self.tempfailed or f.cfg.name
            log.error("milter {name} unavailable ({why}): default_action tempfail, mail in this "
                      "session is deferred (451 4.7.1)", name=f.cfg.name, why=why)
        else:
            f.unscanned = True
            log.error("milter {name} unavailable ({why}): default_action accept, mail in this "
                      "session is delivered without it", name=f.cfg.name, why=why)
