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

import email.generator
import email.policy
import email.utils
import io
import mimetypes
import re
import time
from email.message import EmailMessage
from typing import Any

import idna

from pop3coexist.address import AddressError, AddressNeedsUTF8, parse_address
from pop3coexist.web.sanitize import html_text


class ComposeError(ValueError):
    """The form cannot make a message (a bad address, no recipient); for the user."""


_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,100}\Z")
_MSG_ID = re.compile(r"<[!-;=?-~]{1,250}@[!-;=?-~]{1,250}>")


def header_text(text: str, limit: int = 998) -> str:
    """A form value fit for an unstructured header field (Subject, a file name): control
    characters (NUL, CR, LF, C1, line separators) become spaces, runs of white space one
    space; non-ASCII stays (RFC 2047 / RFC 2231 encode it when the message is written)."""
    return " ".join(_CONTROLS.sub(" ", text).split())[:limit]


def message_ids(text: str, limit: int = 30) -> str:
    """The RFC 5322 msg-ids of ``text`` (In-Reply-To, References: hidden form fields a
    browser can change), ASCII only, the last ``limit`` of them; anything else is dropped."""
    return " ".join(_MSG_ID.findall(text)[-limit:])


def _ascii_address(addr: str) -> str:
    """``addr`` checked (``parse_address``), its domain as A-labels (IDNA 2008, RFC 5891) when
    it is an IDN; ComposeError for anything else, e.g. a non-ASCII local part, which needs
    SMTPUTF8 (RFC 6531), an extension this server does not use."""
    try:
        return str(parse_address(addr))
    except AddressNeedsUTF8:
        local, at, domain = addr.rpartition("@")
        if not at or not local.isascii():
            raise ComposeError(f"{addr!r}: an address with non-ASCII characters before the @ "
                               "needs SMTPUTF8 (RFC 6531), which this server does not "
                               "offer") from None
        try:
            ace = idna.encode(domain, uts46=True).decode("ascii")
            return str(parse_address(f"{local}@{ace}"))
        except (idna.IDNAError, UnicodeError, AddressError, ValueError):
            raise ComposeError(f"{addr!r} is not a mail address") from None
    except (AddressError, ValueError):
        raise ComposeError(f"{addr!r} is not a mail address") from None


def address_list(*fields: str) -> list[tuple[str, str]]:
    """(display name, address) of each address of To/Cc/Bcc fields (``Name <a@b>, c@d``),
    each address once, checked and in ASCII form (``_ascii_address``); raises ComposeError
    naming the first bad one."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for field in fields:
        if _CONTROLS.search(field.replace("\r\n", " ").replace("\n", " ")):
            raise ComposeError("An address field has control characters.")
    for name, addr in email.utils.getaddresses([f for f in fields if f.strip()]):
        if not addr and not name:
            continue
        a = _ascii_address(addr or name)
        key = parse_address(a).key
        if key not in seen:
            seen.add(key)
            out.append((header_text(name, 200), a))
    return out


def parse_recipients(*fields: str) -> list[str]:
    """The addresses of To/Cc/Bcc fields (``Name <a@b>, c@d``), each once, checked; raises
    ComposeError naming the first bad one."""
    return [a for _, a in address_list(*fields)]


def _address_header(field: str) -> str:
    """A To/Cc field rebuilt from its checked addresses (what the envelope gets is what the
    header says; display names RFC 2047-encoded when not ASCII)."""
    return ", ".join(email.utils.formataddr((n, a)) if n else a for n, a in address_list(field))


def _subject_with(prefix: str, subject: str) -> str:
    s = subject.strip()
    if s.lower().startswith(prefix.lower()):
        return s
    return f"{prefix} {s}".strip()


def quote(text: str) -> str:
    """``text`` quoted for a reply: each line prefixed with ``> ``."""
    return "\n".join(("> " + ln) if ln else ">" for ln in text.splitlines())


def _text(view: Any) -> str:
    """The original's text to quote: its text/plain part, else the text of its HTML part."""
    if view.text is not None:
        return view.text
    return html_text(view.html) if view.html else ""


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
    who = view.from_ or "the sender"
    said = f"On {view.date}, {who} wrote:" if view.date else f"{who} wrote:"
    body = f"\n\n{said}\n{quote(_text(view))}\n"
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
                f"To: {view.to}\n\n{_text(view)}\n")
    return {"to": "", "cc": "", "subject": _subject_with("Fwd:", view.subject), "body": body,
            "in_reply_to": "", "references": ""}


def build_message(*, sender: str, to: str, cc: str, subject: str, body: str, hostname: str,
                  in_reply_to: str = "", references: str = "",
                  attachments: list[tuple[str, str, bytes]] = (),  # type: ignore[assignment]
                  forwarded: bytes | None = None, when: float | None = None) -> EmailMessage:
    """The message (see the module docstring). ``attachments``: (file name, media type or
    "", content); ``forwarded``: a whole message to attach as message/rfc822."""
    msg = OutgoingMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    if to.strip():
        msg["To"] = _address_header(to)
    if cc.strip():
        msg["Cc"] = _address_header(cc)
    msg["Subject"] = header_text(subject)
    msg["Date"] = email.utils.formatdate(when if when is not None else time.time(),
                                         localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    in_reply_to = message_ids(in_reply_to, 1)
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    references = message_ids(references)
    if references:
        msg["References"] = references
    msg["MIME-Version"] = "1.0"
    msg["User-Agent"] = "pop3coexist web mail"
    text = body.replace("\r\n", "\n")
    msg.set_content(text if text.endswith("\n") else text + "\n", subtype="plain",
                    charset="utf-8", cte="quoted-printable" if not text.isascii() else "7bit")
    for raw_name, ctype, data in attachments:
        filename = header_text(raw_name, 200).replace("/", "_").replace("\\", "_") or "file"
        ctype = ctype.strip().lower()
        kind = ctype if _MEDIA_TYPE.match(ctype) else (
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
        if msg.get_content_maintype() != "multipart":
            msg.make_mixed()
        msg.attach(forwarded_part(forwarded))
    return msg


class _Generator(email.generator.BytesGenerator):
    """BytesGenerator that writes a message/rfc822 part kept as text (``forwarded_part``)
    with its 8-bit octets as they were (surrogate escapes), where the stock one raises."""

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


class OutgoingMessage(EmailMessage):
    """The message web mail writes: an EmailMessage whose ``as_bytes`` uses ``_Generator``."""

    def as_bytes(self, unixfrom: bool = False, policy: Any = None) -> bytes:
        out = io.BytesIO()
        _Generator(out, mangle_from_=False, policy=policy or self.policy).flatten(
            self, unixfrom=unixfrom)
        return out.getvalue()

    def __bytes__(self) -> bytes:
        return self.as_bytes()


def forwarded_part(original: bytes) -> EmailMessage:
    """A message/rfc822 attachment holding ``original`` byte for byte (line ends made CRLF).

    Never parsed and written again: a forwarded message is whatever arrived, and parsing it
    with the email package cost 32 s for 10,000 parts and raised RecursionError for a MIME
    nesting bomb (a forward that failed with a 500 page)."""
    part = OutgoingMessage(policy=email.policy.SMTP)
    part["Content-Type"] = "message/rfc822"
    part["Content-Disposition"] = 'attachment; filename="forwarded.eml"'
    body = original.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not body.isascii():
        part["Content-Transfer-Encoding"] = "8bit"  # RFC 2046 section 5.2.1: 7bit/8bit only
    part.set_payload(body.decode("ascii", "surrogateescape"))
    return part


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
