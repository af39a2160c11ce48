"""Web mail's pieces without a server: the HTML sanitiser, reading MIME messages, composing
replies and forwards, the Sieve the settings page writes, and the submission's dot-stuffing."""

from __future__ import annotations

import email
import email.policy

import pytest

from pop3coexist.policy.sieve import parse
from pop3coexist.smtp.submit import dot_stuff
from pop3coexist.web import compose, mailrules, mailview
from pop3coexist.web.sanitize import clean_html, frame_csp


@pytest.mark.parametrize("html,gone", [
    ("<p>x<script>document.title='pwned'</script></p>", ["<script", "pwned"]),
    ('<img src="x" onerror="alert(1)">', ["onerror", "alert"]),
    ('<a href="javascript:alert(1)">j</a>', ["javascript:"]),
    ('<a href=" JaVaScRiPt:alert(1)">j</a>', ["alert"]),
    ('<a href="vbscript:msgbox(1)">v</a>', ["vbscript"]),
    ('<p style="background:url(http://evil.test/t.png)">c</p>', ["url(", "evil.test"]),
    ('<div style="width:expression(alert(1))">e</div>', ["expression"]),
    ('<svg><script>alert(1)</script><circle onload="alert(2)"/></svg>', ["svg", "alert"]),
    ('<form action="http://evil.test/"><input name="p"><button>go</button></form>',
     ["<form", "<input", "evil.test"]),
    ('<meta http-equiv="refresh" content="0;url=http://evil.test/">', ["refresh", "evil"]),
    ('<base href="http://evil.test/"><a href="x">x</a>', ["<base", "evil"]),
    ('<iframe src="http://evil.test/"></iframe>', ["iframe", "evil"]),
    ('<object data="x.swf"></object><embed src="x.swf">', ["object", "embed"]),
    ('<style>body{background:url(http://evil.test/)}</style>t', ["<style", "evil"]),
    ('<link rel="stylesheet" href="http://evil.test/s.css">', ["<link", "evil"]),
    ('<a href="data:text/html,<script>alert(1)</script>">d</a>', ["data:", "alert"]),
    ('<p onmouseover="alert(1)" onclick="x()">p</p>', ["onmouseover", "onclick"]),
])
def test_sanitiser_removes_active_content(html, gone):
    """Script, event handlers, javascript:/vbscript:/data: links, CSS url() and
    expression(), SVG script, forms, meta refresh, base, frames, plugins, style sheets: none
    survives the sanitiser."""
    out = clean_html(html).html.lower()
    for g in gone:
        assert g.lower() not in out, out


def test_remote_images_blocked_until_asked():
    """A remote <img> loses its src (and is counted) unless remote images were asked for;
    cid: images become this message's part URL; safe data: images stay."""
    html = ('<img src="http://img.test/a.png"><img src="https://img.test/b.png">'
            '<img src="//img.test/c.png"><img src="cid:logo@x">'
            '<img src="data:image/png;base64,iVBORw0KGgo=">'
            '<img src="data:image/svg+xml;base64,PHN2Zz4=">')
    c = clean_html(html, cid_url=lambda cid: f"/part/{cid}")
    assert "img.test" not in c.html and c.blocked == 3
    assert 'src="/part/logo@x"' in c.html and "image/png" in c.html and "svg" not in c.html
    shown = clean_html(html, remote_images=True)
    assert "http://img.test/a.png" in shown.html and shown.blocked == 1  # // stays blocked


def test_links_open_outside_without_referrer():
    """Links keep http/https/mailto, open in a new browsing context, with noopener and
    noreferrer."""
    out = clean_html('<a href="https://example.org/">e</a>').html
    assert 'href="https://example.org/"' in out and 'rel="noopener noreferrer"' in out
    assert 'target="_blank"' in out


def test_frame_csp_is_a_sandbox_without_script():
    """The message frame's CSP sandboxes it (no allow-scripts), loads nothing but images
    (remote ones only when asked) and inline styles."""
    for images in (False, True):
        csp = frame_csp(images)
        assert csp.startswith("sandbox ") and "allow-scripts" not in csp
        assert "default-src 'none'" in csp and "script-src" not in csp
        assert ("http:" in csp) is images


MIME = (b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.org>\r\nTo: ted@pop.contoso.test\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <m1@example.org>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
        b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n"
        b"--b2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n.dot line\r\n"
        b"--b2\r\nContent-Type: text/html\r\n\r\n<p>Hello</p>\r\n--b2--\r\n"
        b"--b1\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename=\"../r\xc3\xa9port.pdf\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n"
        b"--b1\r\nContent-Type: message/rfc822\r\n\r\nFrom: a@b\r\nSubject: inner\r\n\r\nbody\r\n"
        b"--b1--\r\n")


def test_mailview_reads_parts_and_attachments():
    """Decoded header fields; the text and HTML alternatives; the PDF and the attached
    message are downloadable, with a file name that cannot name a path."""
    v = mailview.parse_message(MIME)
    assert v.subject == "Grüße" and v.from_.startswith("Jürgen")
    assert v.text.startswith("Hello") and v.html.strip() == "<p>Hello</p>"
    names = [(p.content_type, p.filename) for p in v.attachments]
    assert ("application/pdf", ".._réport.pdf") in names
    assert ("message/rfc822", "message.eml") in names
    pdf = next(p for p in v.attachments if p.content_type == "application/pdf")
    assert mailview.part(MIME, pdf.index)[0] == b"%PDF-"
    inner = next(p for p in v.attachments if p.content_type == "message/rfc822")
    assert b"Subject: inner" in mailview.part(MIME, inner.index)[0]
    assert mailview.part(MIME, 999) is None


def test_reply_and_forward_fields():
    """A reply quotes the text, says Re:, and carries In-Reply-To and References; reply-all
    copies the other recipients but not the user; a forward says Fwd:."""
    v = mailview.parse_message(MIME)
    r = compose.reply_fields(v, "ted@pop.contoso.test", reply_all=True)
    assert r["subject"] == "Re: Grüße" and "> Hello" in r["body"]
    assert r["in_reply_to"] == "<m1@example.org>" and "<m1@example.org>" in r["references"]
    assert "ted@pop.contoso.test" not in r["cc"]
    assert compose.forward_fields(v, True)["subject"] == "Fwd: Grüße"
    assert "Forwarded message" in compose.forward_fields(v, True)["body"]


def test_build_message_with_attachments_and_forward():
    """The built message has From, To, no Bcc, a Message-ID in our host name, the threading
    fields, a UTF-8 text part, the uploaded file and the forwarded message/rfc822."""
    msg = compose.build_message(
        sender="ted@pop.contoso.test", to="Amy <amy@pop.contoso.test>", cc="", subject="Hi ü",
        body="Grüße\n", hostname="pop.contoso.test", in_reply_to="<m1@example.org>",
        references="<m1@example.org>", attachments=[("a.bin", "", b"\x00\x01")],
        forwarded=MIME)
    data = msg.as_bytes()
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Message-ID"].endswith("@pop.contoso.test>") and "Bcc" not in parsed
    assert parsed["In-Reply-To"] == "<m1@example.org>"
    kinds = [p.get_content_type() for p in parsed.iter_parts()]
    assert kinds == ["text/plain", "application/octet-stream", "message/rfc822"]
    assert compose.parse_recipients("Amy <amy@pop.contoso.test>", "", "x@example.org, "
                                    "amy@pop.contoso.test") == ["amy@pop.contoso.test",
                                                                "x@example.org"]
    with pytest.raises(compose.ComposeError):
        compose.parse_recipients("not an address")


def test_settings_become_valid_sieve():
    """Rules and the out-of-office reply make a script the server's own Sieve parser takes,
    with the settings read back from its first line; quotes and dot lines are escaped."""
    s = mailrules.Settings(vacation=True, subject='Away "now"', text="Back Monday.\n.hidden",
                           days=3, rules=[
                               mailrules.Rule("from", 'boss"', "fileinto", "Work"),
                               mailrules.Rule("subject", "spam", "discard"),
                               mailrules.Rule("to", "list", "redirect_copy", "a@example.org")])
    text = mailrules.script_text(s)
    parse(text)
    assert 'fileinto "Work"' in text and "redirect :copy" in text and ":days 3" in text
    problems = mailrules.validate(s, lambda name: name == "Work", lambda a: "@" in a)
    assert problems == []
    bad = mailrules.Settings(vacation=True, text=" ", rules=[
        mailrules.Rule("from", "x", "fileinto", "Nope")])
    assert len(mailrules.validate(bad, lambda n: False, lambda a: True)) == 2


def test_dot_stuffing():
    """The submission feeds DATA's form: CRLF, leading dots doubled, the end marker."""
    assert dot_stuff(b"a\n.b\n") == b"a\r\n..b\r\n.\r\n"
    assert dot_stuff(b"a\r\n") == b"a\r\n.\r\n"
