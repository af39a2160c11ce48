"""Writing messages in web mail: new messages, replies and forwards, as RFC 5322 bytes.

``build_message(...)`` makes an ``email.message.EmailMessage`` (policy SMTP: CRLF, header
fields folded and RFC 2047-encoded as needed): From the user's address, To/Cc as typed,
no Bcc field (the Bcc addresses are envelope recipients only), Subject, Date, a Message-ID
in the server's host name, In-Reply-To/References for a reply (RFC 5322 section 3.6.4), a
text/plain UTF-8 body (quoted-printable when needed), and the uploaded files and a forwarded
message (message/rfc822) as attachments. ``recipients(...)`` gives the envelope addresses;
``reply_fields`` and ``forward_fields`` pre-fill the compose form from the original
(``mailview.MessageView``).
"""

from __future__ import annotations

import email.policy
import email.utils
import mimetypes
import time
from email.message import EmailMessage
from typing import Any

from pop3coexist.address import AddressError, parse_address


class ComposeError(ValueError):
    """The form cannot make a message (a bad address, no recipient); for the user."""


def parse_recipients(*fields: str) -> list[str]:
    """The addresses of To/Cc/Bcc fields (``Name <a@b>, c@d``), each once, checked; raises
    ComposeError naming the first bad one."""
    out: list[str] = []
    seen: set[str] = set()
    for name, addr in email.utils.getaddresses([f for f in fields if f.strip()]):
        if not addr and not name:
            continue
        try:
            a = parse_address(addr)
        except (AddressError, ValueError):
            raise ComposeError(f"{(addr or name)!r} is not a mail address") from None
        if a.key not in seen:
            seen.add(a.key)
            out.append(str(a))
    return out


def _subject_with(prefix: str, subject: str) -> str:
    s = subject.strip()
    if s.lower().startswith(prefix.lower()):
        return s
    return f"{prefix} {s}".strip()


def quote(text: str) -> str:
    """``text`` quoted for a reply: each line prefixed with ``> ``."""
    return "\n".join(("> " + ln) if ln else ">" for ln in text.splitlines())


def reply_fields(view: Any, user: str, reply_all: bool) -> dict[str, str]:
    """The compose form of a reply: To the Reply-To or From, with Cc the other recipients
    for reply-all (the user's own address left out), ``Re:`` subject, quoted text, and
    In-Reply-To/References (hidden fields)."""
    to = view.reply_to or view.from_
    cc = ""
    if reply_all:
        others = [f"{n} <{a}>" if n else a
                  for n, a in email.utils.getaddresses([view.to, view.cc])
                  if a and a.lower() != user.lower()]
        cc = ", ".join(others)
    body = f"\n\nOn {view.date}, {view.from_} wrote:\n{quote(view.text or '')}\n"
    refs = " ".join(x for x in (view.references, view.message_id) if x).strip()
    return {"to": to, "cc": cc, "subject": _subject_with("Re:", view.subject), "body": body,
            "in_reply_to": view.message_id, "references": refs[-900:]}


def forward_fields(view: Any, inline: bool) -> dict[str, str]:
    """The compose form of a forward: ``Fwd:`` subject, and the original's text quoted in
    the body when ``inline`` (else it is attached whole, as message/rfc822)."""
    body = ""
    if inline:
        body = ("\n\n---------- Forwarded message ----------\n"
                f"From: {view.from_}\nDate: {view.date}\nSubject: {view.subject}\n"
                f"To: {view.to}\n\n{view.text or ''}\n")
    return {"to": "", "cc": "", "subject": _subject_with("Fwd:", view.subject), "body": body,
            "in_reply_to": "", "references": ""}


def build_message(*, sender: str, to: str, cc: str, subject: str, body: str, hostname: str,
                  in_reply_to: str = "", references: str = "",
                  attachments: list[tuple[str, str, bytes]] = (),  # type: ignore[assignment]
                  forwarded: bytes | None = None, when: float | None = None) -> EmailMessage:
    """The message (see the module docstring). ``attachments``: (file name, media type or
    "", content); ``forwarded``: a whole message to attach as message/rfc822."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    if to.strip():
        msg["To"] = to.strip()
    if cc.strip():
        msg["Cc"] = cc.strip()
    msg["Subject"] = " ".join(subject.split())
    msg["Date"] = email.utils.formatdate(when if when is not None else time.time(),
                                         localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    if in_reply_to.strip():
        msg["In-Reply-To"] = in_reply_to.strip()
    if references.strip():
        msg["References"] = " ".join(references.split())
    msg["MIME-Version"] = "1.0"
    msg["User-Agent"] = "pop3coexist web mail"
    text = body.replace("\r\n", "\n")
    msg.set_content(text if text.endswith("\n") else text + "\n", subtype="plain",
                    charset="utf-8", cte="quoted-printable" if not text.isascii() else "7bit")
    for filename, ctype, data in attachments:
        kind = ctype if ctype and "/" in ctype else (
            mimetypes.guess_type(filename)[0] or "application/octet-stream")
        main, _, sub = kind.partition("/")
        if main == "text":
            msg.add_attachment(data, maintype="application", subtype="octet-stream",
                               filename=filename) if not _utf8(data) else \
                msg.add_attachment(data.decode("utf-8"), subtype=sub, filename=filename)
        elif main == "message" or main == "multipart":
            msg.add_attachment(data, maintype="application", subtype="octet-stream",
                               filename=filename)
        else:
            msg.add_attachment(data, maintype=main, subtype=sub, filename=filename)
    if forwarded is not None:
        inner = email.message_from_bytes(forwarded, policy=email.policy.SMTP)
        msg.add_attachment(inner, filename="forwarded.eml")
    return msg


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
