"""The outbound ESMTP client: one connection, one transaction, a reply for every recipient.

Built on Twisted's ``twisted.mail.smtp.ESMTPClient`` state machine (EHLO, STARTTLS, AUTH with
its CRAM-MD5 / LOGIN / PLAIN authenticators), with what a relaying MTA needs on top:

- TLS policy ``none | opportunistic | required``. ``required`` verifies the certificate with
  service_identity against the next hop's name (or ``[address]``) and ``ca_file`` (else the
  platform's trust store); a failed handshake or verification ends the attempt as a temporary
  failure and nothing more is sent, never falling back to clear text. ``opportunistic`` uses
  STARTTLS when offered, without verification; when its handshake fails the result says so
  (``tls_failed``) and the runner asks the same host again with ``starttls = False``. Bytes
  that arrive in clear text behind the 220 to STARTTLS are never read (a failed handshake).
- AUTH only when a user name is given (the smart host), with the strongest mechanism the server
  offers. PLAIN and LOGIN are sent only inside TLS unless the policy is ``none`` (as Postfix's
  ``noplaintext`` default). When no mechanism is usable the reply says why and what to change
  (e.g. a smart host that offers AUTH but no STARTTLS: give it a certificate, or allow clear
  text with ``tls = "none"``) and ``TransactionResult.advice`` carries the longer explanation for
  the log. The password never appears in logs, exceptions or reprs (the transcript log of the
  Twisted client is off).
- MAIL with SIZE, BODY, and the DSN parameters RET/ENVID; RCPT with NOTIFY/ORCPT when the
  server offers DSN (RFC 3461); the reply to each RCPT is kept.
- A connect timeout and a per-command timeout. No retries here: the queue owns retrying.
- ``RecipientReply.elsewhere``: nothing is known about that recipient because the host failed
  (no connection, no greeting, EHLO, TLS or AUTH impossible, ``530`` to MAIL FROM, a ``421``
  or a lost connection or timeout before the end of the message was sent): the delivery
  runner may take the next host or hop at once for it. ``TransactionResult.hop_failed``: every
  recipient is so.

``deliver(...)`` returns a Deferred that fires with a TransactionResult (it never errbacks for
SMTP or network trouble: a failure is a reply for each recipient).
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, protocol, ssl
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail._cred import CramMD5ClientAuthenticator, LOGINAuthenticator
from twisted.python.failure import Failure

from pop3coexist.netutil import send_now

log = Logger()

_ENHANCED_RE = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})(\s|$)")
_REPLY_LINE_RE = re.compile(rb"[2-5][0-9][0-9](?:[ \t-]|\Z)")
SMALL_BODY = 256 * 1024  # bytes: a body up to this size is read and sent in one write


class Secret:
    """A password that never shows itself in a repr or str."""

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes) -> None:
        self._value = value.encode("utf-8") if isinstance(value, str) else value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


@dataclass
class ClientSettings:
    """How to talk to one next hop."""

    helo: str
    tls: str = "opportunistic"  # none | opportunistic | required
    tls_name: str = ""  # the name (or IP) the certificate must match with tls=required
    ca_file: Path | None = None
    username: str = ""
    password: Secret | None = field(default=None, repr=False)
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    starttls: bool = True  # False: never STARTTLS (the clear-text retry after a failed handshake)
    tls_failure: str = ""  # why that handshake failed, for the replies of the retry


@dataclass
class Transaction:
    """One message to some recipients of the same next hop."""

    sender: str
    recipients: list[dict]  # {"address", "notify", "orcpt"}
    body_path: str | Path  # the queued body (a str from the queue: no Path per message)
    size: int | None = None
    ret: str | None = None
    envid: str | None = None
    body: str | None = None  # "8BITMIME" or "7BIT" from the original MAIL FROM


@dataclass
class RecipientReply:
    """The next hop's last word about one recipient."""

    address: str
    code: int  # SMTP code; 4xx also for network trouble
    reply: str  # "550 5.1.1 no such user" (one line)
    remote: bool = True  # False: no SMTP reply (connection refused, timeout, TLS failure)
    elsewhere: bool = False  # True: nothing is known about this recipient (the host failed:
    # 421, connection lost or timeout before the end of the message): another host may take it

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def enhanced(self) -> str:
        """The RFC 3463 code of the reply, or one derived from the basic code."""
        parts = self.reply.split()
        if len(parts) > 1 and _ENHANCED_RE.match(parts[1].encode()):
            return parts[1]
        # RFC 3463 classes are 2, 4 and 5 only: a 3xx (or other) final reply is a protocol
        # error of the next hop, temporary for us
        return f"{self.code // 100 if self.code // 100 in (2, 4, 5) else 4}.0.0"


@dataclass
class TransactionResult:
    """Per-recipient replies plus what we learnt about the next hop."""

    replies: list[RecipientReply]
    remote_mta: str = ""
    dsn: bool = False  # the next hop offered DSN (parameters were passed on)
    tls: bool = False
    connected: bool = False  # False: never got a greeting (try the next MX)
    hop_failed: bool = False  # True: ended before MAIL FROM (another next hop may do better)
    advice: str = ""  # for the administrator's log: why this hop cannot be used, and the fix
    tls_failed: bool = False  # the STARTTLS handshake failed (opportunistic: retry in clear)


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(code: int, resp: bytes | str) -> str:
    """A next hop's reply as one printable line: its control characters (NUL, escape
    sequences) become ``?`` before the text reaches the queue state, the logs and DSNs."""
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    text = _CONTROLS.sub("?", " ".join(resp.split()))
    return f"{code} {text}" if text else f"{code}"


class _BodyTransform:
    """Line ends to CRLF and dot-stuffing (RFC 5321 4.5.2), across chunk boundaries."""

    def __init__(self) -> None:
        self.carry = b""
        self.at_bol = True

    def __call__(self, chunk: bytes) -> bytes:
        data = self.carry + chunk
        self.carry = b""
        if data.endswith(b"\r"):
            self.carry = b"\r"
            data = data[:-1]
        if not data:
            return b""
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self.at_bol and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self.at_bol = data.endswith(b"\r\n")
        return data

    def tail(self) -> bytes:
        out = b""
        if self.carry:
            out = b"\r\n"
            self.at_bol = True
        if not self.at_bol:
            out += b"\r\n"
        return out + b".\r\n"


class OutboundESMTP(smtp.ESMTPClient):
    """ESMTPClient that relays one Transaction and keeps every recipient's reply."""

    debug = False  # the Twisted transcript would contain AUTH secrets
    # ESMTPClient's own __setattr__ (Python code on every attribute set, only to warn about
    # the deprecated ``tlsMode``, which this class never uses: it reads ``_tlsMode``) cost
    # about 2% of a relaying worker's CPU (issue 17): plain attribute setting instead
    __setattr__ = object.__setattr__

    def __init__(self, settings: ClientSettings, transaction: Transaction,
                 finished: Callable[[TransactionResult], None] | None,
                 on_idle: Callable[[OutboundESMTP], None] | None = None,
                 on_lost: Callable[[OutboundESMTP], None] | None = None,
                 max_messages: int = 1) -> None:
        secret = settings.password.reveal() if settings.password is not None else None
        context = _tls_context(settings)
        smtp.ESMTPClient.__init__(self, secret, context, settings.helo)
        self.settings = settings
        self.transaction = transaction
        self._finished_cb = finished
        self.timeout = settings.command_timeout
        self.heloFallback = settings.tls != "required" and not settings.username
        self.requireTransportSecurity = settings.tls == "required"
        self.requireAuthentication = bool(settings.username)
        if settings.username:
            user = settings.username.encode("utf-8")
            self.registerAuthenticator(CramMD5ClientAuthenticator(user))
            self.registerAuthenticator(LOGINAuthenticator(user))
            self.registerAuthenticator(smtp.PLAINAuthenticator(user))
        self.extensions: dict[bytes, bytes | None] = {}
        self.replies: dict[str, RecipientReply] = {}
        self.accepted: list[str] = []
        self.greeted = False
        self.done = False
        self.last_command = "connect"
        self._body_file: Any = None
        self._quitting = False
        self._lost = False
        self._mail_sent = False
        self._starttls_refusal = ""  # the reply to a refused STARTTLS (opportunistic)
        self._starttls_offered = False
        self._tls_greeted = False  # the EHLO inside TLS was answered (the handshake worked)
        self._dot_sent = False  # the end of the message was sent: from here a reply is final
        self._tls_failed = False
        self.advice = ""
        # connection reuse (ConnectionCache): after a transaction's final reply the session
        # waits for the next one instead of QUIT, when ``on_idle`` is given and fewer than
        # ``max_messages`` transactions went over it
        self.on_idle = on_idle
        self.on_lost = on_lost
        self.max_messages = max_messages
        self.messages = 0  # transactions ended on this connection
        self.parked = False  # waiting, with no transaction, in a ConnectionCache
        self.reused = False  # the current transaction is not the connection's first
        self._need_rset = False  # MAIL was accepted but the transaction had no DATA
        self._pipeline: deque[Any] = deque()
        self._pipe_mail: tuple[int, bytes] | None = None
        self._pipe_rset: tuple[int, bytes] | None = None

    def __repr__(self) -> str:
        return f"<OutboundESMTP to {self.settings.tls_name!r}>"

    # -- logging hooks

    def sendLine(self, line: bytes) -> None:
        word = line.split(b" ", 1)[0][:10].upper()
        if word in (b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"STARTTLS", b"AUTH", b"QUIT",
                    b"RSET"):
            self.last_command = word.decode()
        elif self.last_command.startswith("AUTH"):
            self.last_command = "AUTH"
        smtp.ESMTPClient.sendLine(self, line)

    def lineReceived(self, line: bytes) -> Any:
        if not _REPLY_LINE_RE.match(line):
            # RFC 5321 section 4.2: three digits, 2xx to 5xx, then SP, "-" or the end; Twisted
            # would read "25 x" as code 25 and " 250" as 250: a protocol error instead
            self.sendError(smtp.SMTPProtocolError(
                -1, b"invalid reply line from the server: " + line[:100]))
            return None
        if not self.greeted:
            self.greeted = True
        return smtp.ESMTPClient.lineReceived(self, line)

    # -- capabilities and TLS

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        items: dict[bytes, bytes | None] = {}
        for line in resp.splitlines()[1:]:
            e = line.split(None, 1)
            if e:
                items[e[0].upper()] = e[1] if len(e) > 1 else None
        for key in [k for k in items if k.startswith(b"AUTH=")]:
            # the pre-RFC 2554 form ("250-AUTH=LOGIN", Exchange and old Netscape servers):
            # its mechanisms count as offered, as Postfix reads them
            extra = key[len(b"AUTH="):] + b" " + (items.pop(key) or b"")
            items[b"AUTH"] = b" ".join((items.get(b"AUTH") or b"").split() + extra.split())
        if self._tlsMode:
            self._tls_greeted = True
        elif b"STARTTLS" in items:
            self._starttls_offered = True
        self.extensions = items
        self.tryTLS(code, resp, items)

    def tryTLS(self, code: int, resp: bytes, items: dict) -> None:
        if self.settings.tls == "none" or self._tlsMode or not self.settings.starttls:
            self.authenticate(code, resp, items)
            return
        if b"STARTTLS" in items:
            self._expected = [220]
            self._okresponse = self.esmtpState_starttls
            self._failresponse = self._starttlsRefused
            self.sendLine(b"STARTTLS")
        elif self.settings.tls == "required":
            self.advice = ("mail to this host waits in the queue: it offers no STARTTLS and "
                           "smarthost.tls = \"required\" sends nothing without verified TLS. "
                           "Give it a certificate (Exchange 2003: install one on the SMTP "
                           "virtual server), or set smarthost.tls = \"opportunistic\"")
            self._fail(454, "4.7.4 TLS required by policy but the server does not offer STARTTLS",
                       remote=False)
        else:
            self.authenticate(code, resp, items)

    def _starttlsRefused(self, code: int, resp: bytes) -> None:
        if self.settings.tls == "required":
            self._fail(code if 400 <= code < 500 else 454,
                       "4.7.4 STARTTLS refused (TLS required by policy): " + _one_line(code, resp))
        else:
            # opportunistic: carry on in clear text after a refused STARTTLS (RFC 3207 4.1)
            self._starttls_refusal = _one_line(code, resp)
            self.authenticate(code, resp, self.extensions)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        if self._buffer:
            # bytes after the 220 in clear text: nothing may be read from before the handshake
            # (an injected reply would be taken as the server's inside TLS; CVE-2011-0411 is
            # the server-side twin). A failed handshake: the opportunistic retry is in clear.
            self._buffer = b""
            self._tls_failed = True
            self._fail(454, f"4.7.5 TLS failure with {self.settings.tls_name}: the server sent "
                       f"data after its 220 to STARTTLS", remote=False, abort=True)
            return
        try:
            self.transport.startTLS(self.context)
            self._tlsMode = True
        except Exception as e:
            self._fail(454, f"4.7.5 cannot start TLS: {e.__class__.__name__}", remote=False)
            return
        self.esmtpState_ehlo(code, resp)

    # -- AUTH

    def authenticate(self, code: int, resp: bytes, items: dict) -> None:
        if self.settings.username:
            offered = set((items.get(b"AUTH") or b"").upper().split())
            allowed = offered
            if not self._tlsMode and self.settings.tls != "none":
                # never give a clear-text password away outside TLS (CRAM-MD5 sends none)
                allowed = offered & {b"CRAM-MD5"}
            usable = [a for a in self.authenticators if a.getName().upper() in allowed]
            if not usable:
                self._authImpossible(offered)
                return
            self.authenticators = usable
            self.auth_mechanism = usable[0].getName().decode()
        smtp.ESMTPClient.authenticate(self, code, resp, items)

    def _authImpossible(self, offered: set[bytes]) -> None:
        """No AUTH mechanism may be used: defer, with a reply that says why and what to change
        (fault 10), and the longer ``advice`` for the log. The mail waits; nothing is sent."""
        known = {a.getName().upper() for a in self.authenticators}
        names = " ".join(sorted(m.decode("ascii", "replace") for m in offered)) or "none"
        tls = self.settings.tls
        if self.settings.tls_failure:
            no_tls = f"STARTTLS failed ({self.settings.tls_failure})"
        elif self._starttls_refusal:
            no_tls = f"STARTTLS was refused ({self._starttls_refusal})"
        else:
            no_tls = "it offers no STARTTLS"
        if offered & known and not self._tlsMode:
            # clear-text mechanisms only, and no TLS: the case of a smart host without a
            # certificate (Exchange 2003 often has none)
            text = (f"5.7.0 cannot authenticate to the smart host: it offers AUTH {names} only "
                    f"in clear text ({no_tls}) and smarthost.tls = \"{tls}\" never sends the "
                    f"password without TLS; to change: give the smart host a certificate, or set "
                    f"smarthost.tls = \"none\" to allow clear-text AUTH")
            self.advice = (
                f"mail to this smart host waits in the queue: it offers AUTH {names} but "
                f"{no_tls.replace('it offers', 'offers')}, "
                f"and with smarthost.tls = \"{tls}\" the password is never sent in clear text "
                f"(as Postfix's noplaintext default). Better: give the smart host a certificate "
                f"so that it offers STARTTLS (Exchange 2003: install one on the SMTP virtual "
                f"server), then tls = \"opportunistic\" uses it. Else, on a network you trust, "
                f"set smarthost.tls = \"none\" to allow clear-text AUTH; or drop "
                f"smarthost.username and let the smart host relay for this server's address")
        elif not offered and not self._tlsMode and self._starttls_offered and tls == "none":
            # AUTH offered only after STARTTLS (aiosmtpd, Postfix smtpd_tls_auth_only), and
            # tls = "none" never starts TLS
            text = ("5.7.0 cannot authenticate to the smart host: it offers AUTH only after "
                    "STARTTLS and smarthost.tls = \"none\" never starts TLS; to change: set "
                    "smarthost.tls = \"opportunistic\" (or \"required\")")
            self.advice = ("mail to this smart host waits in the queue: it offers STARTTLS and "
                           "AUTH only inside TLS, but smarthost.tls = \"none\" never starts TLS. "
                           "Set smarthost.tls = \"opportunistic\" (the password then goes inside "
                           "TLS), or \"required\" with its CA in smarthost.ca_file")
        elif not offered and not self._tlsMode and self._starttls_offered:
            # STARTTLS offered, but it was refused or its handshake failed: AUTH would have
            # come after it
            text = (f"5.7.0 cannot authenticate to the smart host: it offers no AUTH without "
                    f"TLS and {no_tls}; to change: make STARTTLS work there (a valid "
                    f"certificate, TLS 1.2 or later)")
            self.advice = (f"mail to this smart host waits in the queue: it offers AUTH only "
                           f"inside TLS, but {no_tls}. Make STARTTLS work on the smart host "
                           f"(a certificate that loads, TLS 1.2 or later), or drop "
                           f"smarthost.username and let it relay for this server's address")
        elif not offered:
            where = "inside TLS" if self._tlsMode else "without TLS (no STARTTLS either)"
            text = (f"5.7.0 cannot authenticate to the smart host: it offers no AUTH {where}; "
                    f"to change: enable AUTH there, or drop smarthost.username if it relays for "
                    f"this server's address")
            self.advice = (f"mail to this smart host waits in the queue: smarthost.username is "
                           f"set but the smart host offers no AUTH {where}. Enable AUTH on the "
                           f"smart host, or drop smarthost.username and let it relay for this "
                           f"server's address")
        else:
            ours = " ".join(sorted(m.decode() for m in known))
            text = (f"5.7.0 cannot authenticate to the smart host: it offers AUTH {names}, none "
                    f"of which this server speaks ({ours}); to change: enable one of them there")
            self.advice = (f"mail to this smart host waits in the queue: it offers AUTH {names}, "
                           f"and this server speaks only {ours}. Enable one of those on the "
                           f"smart host (Exchange: basic authentication)")
        self._fail(530, text, remote=False, code4=True)

    # -- the transaction

    def smtpState_from(self, code: int, resp: bytes) -> None:
        if self._quitting:
            return
        t = self.transaction
        line = b"MAIL FROM:<" + t.sender.encode("utf-8") + b">"
        ext = self.extensions
        if b"SIZE" in ext and t.size is not None:
            line += b" SIZE=%d" % t.size
        if t.body in ("8BITMIME", "7BIT") and b"8BITMIME" in ext:
            line += b" BODY=" + t.body.encode()
        if b"DSN" in ext:
            if t.ret:
                line += b" RET=" + t.ret.encode()
            if t.envid:
                from pop3coexist.smtp.dsn import xtext_encode

                line += b" ENVID=" + xtext_encode(t.envid).encode("ascii")
        self._rcpt_iter = iter(t.recipients)
        self._current: dict | None = None
        if b"PIPELINING" in ext:
            self._sendPipelined(line)
            return
        if self._need_rset:  # the last transaction had MAIL accepted and no DATA
            self._need_rset = False
            self._expected = [250]
            self._okresponse = self.smtpState_from
            self._failresponse = self._rsetRefused
            self.sendLine(b"RSET")
            return
        self._expected = [250]
        self._okresponse = self._mailAccepted
        self._failresponse = self._mailRefused
        self._mail_sent = True
        self.sendLine(line)

    def _rsetRefused(self, code: int, resp: bytes) -> None:
        self._fail(code, "4.5.0 RSET refused: " + _one_line(code, resp), code4=True, site=True)

    # -- PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write, the replies in order

    def _sendPipelined(self, mail: bytes) -> None:
        lines = []
        kinds: deque[Any] = deque()
        if self._need_rset:
            self._need_rset = False
            lines.append(b"RSET")
            kinds.append("rset")
        lines.append(mail)
        kinds.append("mail")
        for r in self.transaction.recipients:
            lines.append(self._rcptLine(r))
            kinds.append(r)
        lines.append(b"DATA")
        kinds.append("data")
        self._pipeline = kinds
        self._pipe_mail = self._pipe_rset = None
        self._expected = range(0, 1000)
        self._okresponse = self._pipelineReply
        self._failresponse = self._pipelineReply
        self._mail_sent = True
        self._pipeLabel()
        # straight to the socket when nothing is queued (netutil.send_now): no reactor turn
        # and no two epoll_ctl calls per message for the write (issue 17, relay profile)
        send_now(self.transport, b"".join(x + b"\r\n" for x in lines))

    def _pipeLabel(self) -> None:
        """``last_command`` names the pipelined commands still unanswered ("MAIL/RCPT/DATA")."""
        names = []
        for kind in self._pipeline:
            name = kind.upper() if isinstance(kind, str) else "RCPT"
            if name not in names:
                names.append(name)
        self.last_command = "/".join(names)

    def _pipelineReply(self, code: int, resp: bytes) -> None:
        kind = self._pipeline.popleft()
        if code == 421:  # the server closes the session (RFC 5321 section 3.8)
            self._pipeline.clear()
            self._fail(code, _one_line(code, resp).split(" ", 1)[-1], site=True)
            return
        if kind == "rset":
            if code != 250:
                self._pipe_rset = (code, resp)
            self._pipeLabel()
            return
        if kind == "mail":
            self._pipeLabel()
            self._pipe_mail = (code, resp)
            return
        if kind != "data":  # a recipient
            if self._pipe_rset is None and self._pipe_mail is not None \
                    and self._pipe_mail[0] == 250:
                self._current = kind
                self._recordRcpt(code, resp)
            self._pipeLabel()
            return
        # the reply to DATA: every earlier reply is in
        self._current = None
        if self._pipe_rset is not None:
            if code == 354:  # never send a body after a refused RSET
                self._finish()
                self.accepted = []
            self._rsetRefused(*self._pipe_rset)
            return
        assert self._pipe_mail is not None
        if self._pipe_mail[0] != 250:
            if code == 354:  # a broken server: no body, no QUIT (it would be message text)
                self._fail(451, "4.5.0 protocol error: 354 to DATA after MAIL was refused",
                           remote=False, abort=True)
                return
            self._mailRefused(*self._pipe_mail)
            return
        if code == 354:
            if self.accepted:
                self._sendBody(code, resp)
            else:  # 354 with no recipient accepted: end without a message (RFC 2920 3.1)
                self._fail(451, "4.5.0 protocol error: 354 to DATA with no recipient",
                           remote=False, abort=True)
            return
        if self.accepted:
            self._dataRefused(code, resp)
        else:  # every RCPT refused, DATA refused as it must be: the transaction is left open
            self._need_rset = True
            self._endTransaction()

    def _rcptLine(self, r: dict) -> bytes:
        line = b"RCPT TO:<" + r["address"].encode("utf-8") + b">"
        if b"DSN" in self.extensions:
            from pop3coexist.smtp.dsn import orcpt_param

            if r.get("notify"):
                line += b" NOTIFY=" + ",".join(r["notify"]).encode()
            orcpt = orcpt_param(r.get("orcpt"))
            if orcpt:
                line += b" ORCPT=" + orcpt.encode("ascii")
        return line

    def _mailAccepted(self, code: int, resp: bytes) -> None:
        self._expected = range(0, 1000)
        self._okresponse = self._rcptReply
        self._failresponse = self._rcptReply
        self._nextRcpt()

    def _mailRefused(self, code: int, resp: bytes) -> None:
        text = _one_line(code, resp).split(" ", 1)[-1]
        if code == 530:
            # "authentication required" (RFC 4954 section 6) says nothing about the message:
            # the next hop wants a log-in we do not give it; defer, another hop may take it
            if self.settings.username:
                self.advice = ("mail waits in the queue: the smart host asks for AUTH again "
                               "after a successful log-in (530 at MAIL FROM)")
            else:
                self.advice = ("mail to this host waits in the queue: it requires AUTH before "
                               "MAIL FROM (530). Only the smart host gets smarthost.username "
                               "and password_file; let this host relay for this server's "
                               "address, or make it the smart host")
            self._fail(code, "4.7.0 the next hop requires AUTH: " + _one_line(code, resp),
                       code4=True, site=True)
            return
        self._fail(code, text, site=code == 421)

    def _nextRcpt(self) -> None:
        try:
            r = next(self._rcpt_iter)
        except StopIteration:
            self._current = None
            if self.accepted:
                self._expected = [354]
                self._okresponse = self._sendBody
                self._failresponse = self._dataRefused
                self.sendLine(b"DATA")
            else:
                self._need_rset = True  # MAIL accepted, no DATA: RSET before the next MAIL
                self._endTransaction()
            return
        self._current = r
        self.sendLine(self._rcptLine(r))

    def _rcptReply(self, code: int, resp: bytes) -> None:
        if code == 421:  # the server closes the session (RFC 5321 section 3.8): no answer
            self._fail(code, _one_line(code, resp).split(" ", 1)[-1], site=True)
            return
        self._recordRcpt(code, resp)
        self._nextRcpt()

    def _recordRcpt(self, code: int, resp: bytes) -> None:
        r = self._current
        assert r is not None
        addr = r["address"]
        if code in smtp.SUCCESS:
            self.accepted.append(addr)
        else:
            self.replies[addr] = RecipientReply(addr, code, _one_line(code, resp))

    def _sendBody(self, code: int, resp: bytes) -> None:
        try:
            # unbuffered: no isatty ioctl and no lseek per message (a buffered open makes
            # both); the body is read whole or in FileSender's large chunks (issue 17)
            self._body_file = open(self.transaction.body_path, "rb", buffering=0)
        except OSError as e:
            # the message vanished (deleted from the queue): end without a final dot
            self._fail(451, f"4.3.0 message file unreadable: {e.strerror}", remote=False, abort=True)
            return
        transform = _BodyTransform()
        self._transform = transform
        self._expected = smtp.SUCCESS
        self._okresponse = self._dataReply
        self._failresponse = self._dataReply
        self.last_command = "DATA (end of message)"
        try:
            small = os.fstat(self._body_file.fileno()).st_size <= SMALL_BODY
            data = self._body_file.read() if small else b""
        except OSError as e:
            self._bodyFailed(Failure(e))
            return
        if small:  # one write for the body and the final dot: no producer, no reactor turns
            self._closeBody()
            self._dot_sent = True
            send_now(self.transport, transform(data) + transform.tail())
            return

        def chunk(data: bytes) -> bytes:
            self.resetTimeout()
            return transform(data)

        sender = smtp.basic.FileSender()
        d = sender.beginFileTransfer(self._body_file, self.transport, chunk)
        d.addCallbacks(self._bodySent, self._bodyFailed)

    def _bodySent(self, _: Any) -> None:
        self._closeBody()
        self._dot_sent = True
        self.transport.write(self._transform.tail())

    def _bodyFailed(self, failure: Failure) -> None:
        self._closeBody()
        self._fail(451, f"4.3.0 reading the message failed: {failure.getErrorMessage()}",
                   remote=False, abort=True)

    def _closeBody(self) -> None:
        if self._body_file is not None:
            self._body_file.close()
            self._body_file = None

    def _dataRefused(self, code: int, resp: bytes) -> None:
        if not 400 <= code < 600:
            # DATA is answered 354, 4xx or 5xx (RFC 5321 section 4.3.2): any other reply (a
            # 250 from a broken or hostile next hop) came before the body was sent, so it
            # cannot be the message's final reply: a temporary protocol error, never delivery
            self._fail(451, "4.5.0 protocol error after DATA: " + _one_line(code, resp),
                       site=True)
            return
        self._dataReply(code, resp)

    def _dataReply(self, code: int, resp: bytes) -> None:
        line = _one_line(code, resp)
        for addr in self.accepted:
            # a 421 refuses the message for the whole session: nothing was accepted
            self.replies[addr] = RecipientReply(addr, code, line, elsewhere=code == 421)
        self.accepted = []
        if code == 421:
            self._quit()
        else:
            self._endTransaction()

    # -- connection reuse (ConnectionCache)

    def _endTransaction(self) -> None:
        """The transaction got its final reply: wait for the next one (``on_idle``) or QUIT."""
        self.messages += 1
        if self.on_idle is None or self.messages >= self.max_messages or self._lost:
            self._quit()
            return
        self._finish()
        self.parked = True
        self.setTimeout(None)
        self._expected = range(0, 1000)
        self._okresponse = self._spokeWhileIdle
        self._failresponse = self._spokeWhileIdle
        self.on_idle(self)  # into the cache first: the result's callbacks may reuse it
        cb, self._finished_cb = self._finished_cb, None
        if cb is not None:
            cb(self.result())

    def _spokeWhileIdle(self, code: int, resp: bytes) -> None:
        """A reply with no command (a 421 before the server's idle close): drop the session."""
        self.transport.loseConnection()

    def resume(self, transaction: Transaction,
               finished: Callable[[TransactionResult], None]) -> None:
        """Run ``transaction`` over this parked session (RFC 5321 section 4.1.1.5: MAIL right
        after the last transaction's final reply, RSET first when that one had no DATA);
        ``finished`` gets its result, as for a new connection."""
        assert self.parked and not self._lost
        self.parked = False
        self.reused = True
        self.done = False
        self.transaction = transaction
        self._finished_cb = finished
        self.replies = {}
        self.accepted = []
        self._mail_sent = False
        self._dot_sent = False
        self.advice = ""
        self.setTimeout(self.settings.command_timeout)
        self.smtpState_from(250, b"")

    def close_idle(self) -> None:
        """QUIT a parked session (its idle time is over, or the runner stops)."""
        if self.parked and not self._lost and not self._quitting:
            self._quitting = True
            self.setTimeout(self.settings.command_timeout)
            self._okresponse = self.smtpState_disconnect
            self._failresponse = self.smtpState_disconnect
            self.sendLine(b"QUIT")

    def _quit(self) -> None:
        self._finish()
        self._quitting = True
        self._expected = range(0, 1000)
        self._okresponse = self.smtpState_disconnect
        self._failresponse = self.smtpState_disconnect
        self.sendLine(b"QUIT")

    # -- failures

    def _fail(self, code: int, text: str, remote: bool = True, abort: bool = False,
              code4: bool = False, site: bool = False) -> None:
        """End the transaction: every recipient without a reply gets this one.

        ``code4``: whatever the server said, for us this is temporary (4xx). ``remote``: the
        reply came from the server (so a polite QUIT is possible). ``site``: the failure is
        the host's, not the message's (421, connection lost or timeout before the end of the
        message was sent): those recipients are marked ``elsewhere``. Before MAIL FROM every
        failure is the host's.
        """
        site = site or not self._mail_sent
        if self.done:
            if not self._lost:
                self.transport.loseConnection()
            return
        if code4 or not (400 <= code < 600):
            code = code if 400 <= code < 500 else 451
            if text[:1] == "5":
                text = "4" + text[1:]
        line = _one_line(code, text)
        for r in self.transaction.recipients:
            if r["address"] not in self.replies:
                self.replies[r["address"]] = RecipientReply(r["address"], code, line, remote,
                                                            elsewhere=site)
        self.accepted = []
        if self._lost:
            self._finish()
        elif abort or not remote:
            self._finish()
            self.transport.abortConnection()
        else:
            self._quit()

    def smtpConnectionFailed(self, code: int, resp: bytes) -> None:
        """A greeting other than 220: this host does not talk to us now (try the next MX)."""
        self.greeted = False
        self._fail(code, "4.4.2 refused to talk to us: " + _one_line(code, resp), code4=True)

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        """EHLO refused and nothing needs ESMTP: fall back to HELO (RFC 5321 3.2)."""
        smtp.ESMTPClient.smtpState_helo(self, code, resp)
        self._failresponse = self._heloRefused

    def _heloRefused(self, code: int, resp: bytes) -> None:
        self._fail(code, "4.5.0 HELO refused: " + _one_line(code, resp), code4=True)

    def _esmtpState_plainAuth(self, code: int, resp: bytes) -> None:
        """No second AUTH PLAIN try (Twisted's default): a refusal is a refusal."""
        self.esmtpAUTHDeclined(code, resp)

    def sendError(self, exc: Exception) -> None:
        """Twisted's hook for every failure it detects (EHLO refused, AUTH refused, timeouts,
        protocol errors)."""
        if self.done:
            if not self._lost:
                self.transport.abortConnection()
            return
        code = getattr(exc, "code", -1)
        resp = getattr(exc, "resp", b"")
        if isinstance(exc, smtp.SMTPTimeoutError):
            self._fail(451, f"4.4.2 timeout waiting for the reply to {self.last_command}",
                       remote=False, abort=True, site=not self._dot_sent)
            return
        if isinstance(exc, smtp.AUTHDeclinedError) or isinstance(exc, smtp.AuthenticationError):
            # a refused log-in to the smart host is our configuration problem: defer
            if not 400 <= code < 500:  # a 4xx is the smart host's own temporary trouble
                self.advice = (f"mail to this smart host waits in the queue: it refused the log-in "
                               f"of smarthost.username {self.settings.username!r} by "
                               f"{getattr(self, 'auth_mechanism', 'AUTH')} ({_one_line(code, resp)}). "
                               f"Check the user name and the password in smarthost.password_file "
                               f"(the account may also be locked or disabled there)")
            self._fail(454, "4.7.0 smart host refused AUTH " + getattr(self, "auth_mechanism", "")
                       + ": " + _one_line(code, resp), code4=True)
            return
        if isinstance(exc, (smtp.EHLORequiredError, smtp.TLSRequiredError, smtp.AUTHRequiredError)):
            self._fail(454, "4.7.0 " + _one_line(code, resp), remote=False, code4=True)
            return
        if 400 <= code < 600:
            self._fail(code, _one_line(code, resp).split(" ", 1)[-1])
        else:
            text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)
            self._fail(451, f"4.5.0 protocol error after {self.last_command}: {text}",
                       remote=False, abort=True)

    def timeoutConnection(self) -> None:
        self.sendError(smtp.SMTPTimeoutError(-1, b"timeout"))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        self._closeBody()
        if not self.done:
            why = reason.value
            if self._tlsMode and not isinstance(why, (error.ConnectionDone,)):
                text = f"4.7.5 TLS failure with {self.settings.tls_name}: {_reason_text(why)}"
                if not self._tls_greeted:
                    self._tls_failed = True
                    if self.settings.tls == "required" and not self.advice:
                        self.advice = (f"mail to this host waits in the queue: the TLS "
                                       f"handshake failed ({_reason_text(why)}) and "
                                       f"smarthost.tls = \"required\" sends nothing without "
                                       f"verified TLS. Check its certificate against "
                                       f"smarthost.ca_file (the name must match the next hop)")
            else:
                text = f"4.4.2 connection lost after {self.last_command}: {_reason_text(why)}"
            self._fail(421, text, remote=False, site=not self._dot_sent)
        smtp.ESMTPClient.connectionLost(self, reason)
        cb, self._finished_cb = self._finished_cb, None
        if cb is not None:
            cb(self.result())
        if self.on_lost is not None:
            self.on_lost(self)

    def _finish(self) -> None:
        self.done = True

    def result(self) -> TransactionResult:
        replies = []
        for r in self.transaction.recipients:
            rep = self.replies.get(r["address"])
            if rep is None:
                rep = RecipientReply(r["address"], 451, "451 4.4.2 no reply", remote=False)
            replies.append(rep)
        return TransactionResult(
            replies=replies,
            dsn=b"DSN" in self.extensions,
            tls=bool(self._tlsMode),
            connected=self.greeted,
            hop_failed=not self._mail_sent or all(r.elsewhere for r in replies),
            advice=self.advice,
            tls_failed=self._tls_failed,
        )


def _reason_text(why: BaseException) -> str:
    text = str(why) or why.__class__.__name__
    if "certificate verify failed" in text or "VerificationError" in text:
        return "certificate verification failed"
    text = " ".join(text.split())
    return text[:300]


def _tls_context(settings: ClientSettings) -> Any:
    if settings.tls == "none":
        return None
    if settings.tls == "required":
        if settings.ca_file is not None:
            pem = settings.ca_file.read_bytes()
            marker = b"-----BEGIN CERTIFICATE-----"
            certs = [ssl.Certificate.loadPEM(marker + p) for p in pem.split(marker)[1:]]
            trust = ssl.trustRootFromCertificates(certs)
        else:
            trust = ssl.platformTrust()
        return ssl.optionsForClientTLS(settings.tls_name, trustRoot=trust)
    return ssl.CertificateOptions(verify=False)


class OutboundClientFactory(protocol.ClientFactory):
    """Builds one OutboundESMTP and turns connection failures into replies. No retries."""

    noisy = False

    def __init__(self, settings: ClientSettings, transaction: Transaction, remote_mta: str) -> None:
        self.settings = settings
        self.transaction = transaction
        self.remote_mta = remote_mta
        self.deferred: defer.Deferred[TransactionResult] = defer.Deferred()
        self.proto: OutboundESMTP | None = None
        # ConnectionCache: (on_idle, on_lost, max_messages), or None: QUIT after the message
        self.keep: tuple[Callable, Callable, int] | None = None

    def buildProtocol(self, addr: Any) -> OutboundESMTP:
        if self.keep is not None:
            on_idle, on_lost, limit = self.keep
            p = OutboundESMTP(self.settings, self.transaction, self._done, on_idle, on_lost,
                              limit)
        else:
            p = OutboundESMTP(self.settings, self.transaction, self._done)
        p.factory = self
        self.proto = p
        return p

    def _done(self, result: TransactionResult) -> None:
        result.remote_mta = self.remote_mta
        if not self.deferred.called:
            self.deferred.callback(result)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        why = reason.value
        if isinstance(why, error.TimeoutError):
            text = "4.4.1 connection timed out"
        elif isinstance(why, error.ConnectionRefusedError):
            text = "4.4.1 connection refused"
        else:
            text = f"4.4.1 cannot connect: {_reason_text(why)}"
        replies = [
            RecipientReply(r["address"], 421, f"421 {text}", remote=False)
            for r in self.transaction.recipients
        ]
        self._done(TransactionResult(replies=replies, connected=False, hop_failed=True))

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        pass


def deliver(
    reactor: Any,
    host: str,
    port: int,
    settings: ClientSettings,
    transaction: Transaction,
    remote_mta: str | None = None,
) -> defer.Deferred[TransactionResult]:
    """Connect to ``host:port`` (an IP address) and relay ``transaction``; see the module doc."""
    factory = OutboundClientFactory(settings, transaction, remote_mta or host)
    reactor.connectTCP(host, port, factory, timeout=settings.connect_timeout)
    return factory.deferred


REUSE_MESSAGES = 100  # transactions over one connection before it is closed
REUSE_IDLE = 2.0  # seconds a connection waits, unused, for the next message (Postfix: 2 s)
REUSE_IDLE_PER_HOST = 8  # idle connections kept per host; more are closed


class ConnectionCache:
    """SMTP connection reuse for the delivery runner, as Postfix's ``smtp_connection_cache``.

    ``deliver(host, port, settings, transaction, remote_mta)`` is ``deliver`` above, but a
    session whose transaction ended with its final reply is kept, idle, for the next message
    to the same host, port and settings: at most ``max_messages`` transactions per
    connection, ``idle`` seconds unused, ``per_host`` idle connections per host (the others
    QUIT). The next transaction starts with MAIL at once (RFC 5321 section 4.1.1.5; RSET first
    when the last one ended before DATA). A reused session that fails before it says anything
    about the message (closed while idle, ``421`` or a refused RSET: ``hop_failed``) is
    retried once on a new connection, so reuse never changes a message's fate. A reply is
    final for its message only; a 4xx or 5xx to one message leaves the session for the next.
    """

    def __init__(self, reactor: Any, max_messages: int = REUSE_MESSAGES,
                 idle: float = REUSE_IDLE, per_host: int = REUSE_IDLE_PER_HOST) -> None:
        self.reactor = reactor
        self.max_messages = max(1, max_messages)
        self.idle = idle
        self.per_host = per_host
        self._idle: dict[tuple, list[tuple[OutboundESMTP, Any]]] = {}
        self._keys: dict[int, tuple] = {}  # id(proto) -> its key
        self.opened = 0  # connections opened (for tests and the log)
        self.closed = False

    @staticmethod
    def _key(host: str, port: int, settings: ClientSettings) -> tuple:
        return (host, port, settings.helo, settings.tls, settings.tls_name, settings.ca_file,
                settings.username, settings.starttls, settings.connect_timeout,
                settings.command_timeout)

    def deliver(self, host: str, port: int, settings: ClientSettings, transaction: Transaction,
                remote_mta: str | None = None) -> defer.Deferred[TransactionResult]:
        """Relay ``transaction`` to ``host:port`` over an idle session when there is one.

        The reused session's result is handed over by plain callbacks (no coroutine per
        message: issue 17's relay profile); only the fallback to a new connection after a
        reused session failed before saying anything (``hop_failed``) opens one."""
        remote_mta = remote_mta or host
        key = self._key(host, port, settings)
        proto = self._take(key)
        if proto is None:
            return self._connect(key, host, port, settings, transaction, remote_mta)
        d: defer.Deferred[TransactionResult] = defer.Deferred()

        def reused(result: TransactionResult) -> Any:
            result.remote_mta = remote_mta
            if not hop_failed_result(result):
                return result
            # the idle session was gone or refused the next message: a new connection decides
            return self._connect(key, host, port, settings, transaction, remote_mta)

        d.addCallback(reused)
        proto.resume(transaction, d.callback)
        return d

    def _connect(self, key: tuple, host: str, port: int, settings: ClientSettings,
                 transaction: Transaction, remote_mta: str) -> defer.Deferred[TransactionResult]:
        """A new connection for ``transaction``, kept for the next messages when it ends well."""
        factory = OutboundClientFactory(settings, transaction, remote_mta)
        if not self.closed and self.max_messages > 1:
            factory.keep = (lambda p: self._park(key, p), self._lost, self.max_messages)
        self.opened += 1
        self.reactor.connectTCP(host, port, factory, timeout=settings.connect_timeout)
        return factory.deferred

    def _take(self, key: tuple) -> OutboundESMTP | None:
        sessions = self._idle.get(key)
        while sessions:
            proto, timer = sessions.pop()
            if timer.active():
                timer.cancel()
            self._keys.pop(id(proto), None)
            if proto.parked and not proto._lost and not proto._quitting:
                return proto
        return None

    def _park(self, key: tuple, proto: OutboundESMTP) -> None:
        sessions = self._idle.setdefault(key, [])
        if self.closed or len(sessions) >= self.per_host:
            self.reactor.callLater(0, proto.close_idle)  # after the result is handed over
            return
        timer = self.reactor.callLater(self.idle, self._expire, key, proto)
        sessions.append((proto, timer))
        self._keys[id(proto)] = key

    def _expire(self, key: tuple, proto: OutboundESMTP) -> None:
        self._remove(proto)
        proto.close_idle()

    def _remove(self, proto: OutboundESMTP) -> None:
        key = self._keys.pop(id(proto), None)
        if key is None:
            return
        sessions = self._idle.get(key, [])
        for i, (p, timer) in enumerate(sessions):
            if p is proto:
                if timer.active():
                    timer.cancel()
                del sessions[i]
                break
        if not sessions:
            self._idle.pop(key, None)

    def _lost(self, proto: OutboundESMTP) -> None:
        self._remove(proto)

    def idle_count(self) -> int:
        """Idle sessions now kept."""
        return sum(len(v) for v in self._idle.values())

    def close_all(self) -> None:
        """QUIT every idle session and keep no more (the runner stops)."""
        self.closed = True
        for sessions in list(self._idle.values()):
            for proto, timer in list(sessions):
                if timer.active():
                    timer.cancel()
                proto.close_idle()
        self._idle.clear()
        self._keys.clear()


def hop_failed_result(result: TransactionResult) -> bool:
    """True when ``result`` says nothing about the message (as delivery.hop_failed)."""
    return not result.connected or result.hop_failed
