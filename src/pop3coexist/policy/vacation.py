"""Out-of-office replies done right (RFC 3834, RFC 5230): when to answer, and the answer
(no I/O: ``policy.rules`` asks the store whether this sender got one already, and queues it).

``refusal(...)`` says why a reply must not go (None when it may), in this order:

1. the envelope sender is null ``<>`` (a bounce or another auto-reply: RFC 3834 section 2,
   RFC 5230 section 4.6);
2. ``Auto-Submitted`` is present with a value other than ``no`` (RFC 3834 section 5);
3. ``Precedence`` is ``bulk``, ``list`` or ``junk`` (long-standing practice, RFC 3834
   section 3.1.8 mentions it), or a ``List-Id`` / ``List-*`` field (RFC 2369, 2919) is present:
   mailing-list traffic gets no personal reply;
4. the sender is the mailbox itself or one of ``:addresses``, or a system sender
   (``MAILER-DAEMON``, ``LISTSERV``, ``majordomo``, ``owner-*``, ``*-request``, ``*-bounces``:
   RFC 5230 section 4.6's examples);
5. none of the mailbox's addresses (its own, the RCPT address, ``:addresses``) is in To, Cc,
   Bcc, Resent-To, Resent-Cc or Resent-Bcc (RFC 5230 section 4.5: a Bcc copy or list copy
   gets no reply).

The once-per-``:days`` rule is the store's ``vacation_due`` (durable, per mailbox, per
handle and sender); ``days`` is clamped to [``min_days``, ``max_days``] (RFC 5230 section
4.1).

``build_reply`` writes the reply (RFC 5230 section 5, RFC 3834 section 3): From the mailbox
(or ``:from``), To the sender, ``Subject: Auto: <original>`` unless ``:subject``,
``In-Reply-To`` and ``References`` from the original's Message-ID, ``Auto-Submitted:
auto-replied (vacation)``, its own Message-ID and Date, UTF-8 text (or the ``:mime`` body as
given). It goes out with the null envelope sender ``<>`` through the outbound queue.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
import secrets
from email.header import Header

from pop3coexist.policy.sieve_run import MailContext, decode_value

RECIPIENT_FIELDS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")
_SYSTEM_LOCALS = re.compile(
    r"^(mailer-daemon|postmaster|listserv|majordomo|mailman|owner-.*|.*-request|.*-owner|"
    r".*-bounces?|bounces?(\+.*)?|no-?reply|noreply-.*)$", re.I)


def refusal(mail: MailContext, own: list[str]) -> str | None:
    """Why no reply may go to this message (see the module docstring), or None. ``own``:
    the mailbox's addresses (its own, the RCPT address, ``:addresses``), any case."""
    sender = mail.sender.strip()
    if not sender:
        return "the envelope sender is <> (RFC 3834 section 2)"
    auto = [v.split(";")[0].strip().lower() for v in mail.header_values("auto-submitted")]
    if any(v != "no" for v in auto):
        return f"Auto-Submitted: {auto[0]} (RFC 3834 section 5)"
    precedence = [v.strip().lower() for v in mail.header_values("precedence")]
    if any(v in ("bulk", "list", "junk") for v in precedence):
        return f"Precedence: {precedence[0]}"
    for name in mail.headers.keys():
        if name.lower().startswith("list-"):
            return f"a {name} header field (mailing list)"
    mine = {a.lower() for a in own if a}
    if sender.lower() in mine:
        return "the sender is the mailbox itself"
    if _SYSTEM_LOCALS.match(sender.rpartition("@")[0]):
        return f"{sender} is a system sender (RFC 5230 section 4.6)"
    named = set()
    for field in RECIPIENT_FIELDS:
        for _, addr in email.utils.getaddresses(mail.header_values(field)):
            named.add(addr.lower())
    if not named & mine:
        return "the mailbox is not in To or Cc (RFC 5230 section 4.5)"
    return None


def period(days: int | None, default: int, low: int, high: int) -> float:
    """The reply period in seconds for ``:days`` (None: the default), clamped."""
    value = default if days is None else days
    return float(max(low, min(high, value)) * 86400)


def handle(reason: str, subject: str | None, from_: str | None, mime: bool,
           given: str | None) -> str:
    """The vacation handle (RFC 5230 section 4.2): ``:handle`` or one made from the rest."""
    if given:
        return "handle:" + given
    text = "\0".join([reason, subject or "", from_ or "", "mime" if mime else ""])
    return "auto:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def build_reply(mail: MailContext, reason: str, own_address: str, hostname: str,
                subject: str | None = None, from_: str | None = None,
                mime: bool = False, now: float | None = None) -> bytes:
    """The reply message (CRLF lines) to ``mail.sender``; see the module docstring."""
    original_subject = (mail.header_values("subject") or [""])[0]
    if subject is None:
        subject = "Auto: " + original_subject if original_subject else "Auto: (no subject)"
    message_ids = mail.header_values("message-id")
    references = mail.header_values("references")
    lines = [
        f"From: {_header('From', from_ or own_address)}",
        f"To: <{mail.sender}>",
        f"Subject: {_header('Subject', subject)}",
        f"Date: {email.utils.formatdate(now, localtime=False)}",
        f"Message-ID: <{secrets.token_hex(12)}.vacation@{hostname}>",
        "Auto-Submitted: auto-replied (vacation)",
        "Precedence: bulk",
    ]
    if message_ids:
        mid = message_ids[0].strip()
        lines.append(f"In-Reply-To: {mid}")
        refs = " ".join(r.strip() for r in references) + " " + mid if references else mid
        lines.append(f"References: {refs.strip()}")
    body = reason.replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    if mime:  # the reason is a MIME entity: its own header fields, then its body
        lines.append("MIME-Version: 1.0")
        return ("\r\n".join(lines) + "\r\n" + body).encode("utf-8")
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
              "Content-Transfer-Encoding: 8bit"]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


def _header(name: str, value: str) -> str:
    value = decode_value(value).replace("\r", " ").replace("\n", " ")
    if value.isascii():
        return value
    if name == "From":
        display, addr = email.utils.parseaddr(value)
        return email.utils.formataddr((display, addr), charset="utf-8")
    return Header(value, "utf-8").encode()
