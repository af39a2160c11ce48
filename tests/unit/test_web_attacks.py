"""Adversarial cases for the web core and web mail's pieces (the outside tester's kept-back
cases, pinned): hostile MIME read in bounded time, header injection in compose, IDN
addresses, open redirects, request bodies that cost more to parse than to send, responses
that cannot be encoded, cache and method headers, and the session table under a flood of
anonymous sessions. HTTP goes through a real twisted.web Site over a StringTransport."""

from __future__ import annotations

import email
import email.headerregistry
import email.parser
import email.policy

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from pop3coexist.policy.throttle import AuthThrottle
from pop3coexist.web import compose, mailview
from pop3coexist.web.app import MAX_FIELDS, Response, make_site, redirect
from pop3coexist.web.login import WebLogin
from pop3coexist.web.sanitize import html_text
from pop3coexist.web.sessions import SessionStore
from tests.support import workcount
from tests.support.fakes import FakeChecker
from tests.unit.test_web_core import Client, EchoApp, _login

# --------------------------------------------------------------------------- hostile MIME


def _many_parts(n: int) -> bytes:
    parts = b"".join(b"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: "
                     b"attachment; filename=f%d\r\n\r\nx\r\n" % i for i in range(n))
    return (b"Subject: many\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
            b"boundary=b\r\n\r\n" + parts + b"--b--\r\n")


def _nested(depth: int) -> bytes:
    body = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                    for i in range(depth))
    return (b"Subject: deep\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
            b"boundary=b0\r\n\r\n" + body + b"--b%d\r\nContent-Type: text/plain\r\n\r\n"
            b"the leaf\r\n" % depth)


def test_ten_thousand_parts_read_in_bounded_time(monkeypatch):
    """A 600 KB message of 10,000 parts (19 s with the default policy's header objects) is
    read with bounded work, counted, not timed: parsed with compat32 (not one header object of
    the default policy is built), per-part work (media type, file name, size) done for at most
    MAX_PARTS leaves, and the view says there are more; the last listed part is downloaded
    with one more parse and the media type of that one part."""
    headers = workcount.calls(monkeypatch, email.headerregistry.HeaderRegistry, "__call__")
    parses = workcount.calls(monkeypatch, mailview, "_parse")
    per_part = [workcount.calls(monkeypatch, mailview, name)
                for name in ("content_type", "_filename", "_size")]
    data = _many_parts(10000)
    v = mailview.parse_message(data)
    assert len(v.parts) == mailview.MAX_PARTS and v.truncated
    assert [c.n for c in per_part] == [mailview.MAX_PARTS] * 3 and parses.n == 2
    last = v.parts[-1]
    assert mailview.part(data, last.index) == (b"x", "application/octet-stream", last.filename)
    assert per_part[0].n == mailview.MAX_PARTS + 1 and parses.n == 3 and headers.n == 0


def test_a_nesting_bomb_is_shown_as_text_not_a_crash():
    """3,000 nested multiparts (the parser recursed into RecursionError: a 500 page and a
    message nobody could open) give the header and the raw text, marked truncated; a
    50-level nesting is read normally, its leaf found."""
    v = mailview.parse_message(_nested(3000))
    assert v.subject == "deep" and v.truncated and "the leaf" in v.text
    assert mailview.part(_nested(3000), 1) is None
    v = mailview.parse_message(_nested(50))
    assert not v.truncated and v.parts


@pytest.mark.parametrize("charset", ["idna", "punycode", "rot13", "base64", "x-unknown",
                                     "utf-8\u00e9", "unicode_escape"])
def test_exotic_charsets_never_make_a_message_unreadable(charset):
    """A text part whose charset is not a text encoding, cannot decode with replacement
    (idna: UnicodeError, a 500 page), or is unknown, is shown (as Latin-1 when need be)."""
    data = (f"Subject: cs\r\nContent-Type: text/plain; charset={charset}\r\n\r\n".encode()
            + b"a" * 100 + b".example\r\n")
    assert "aaaa" in mailview.parse_message(data).text


def test_utf7_html_is_decoded_before_it_is_sanitised():
    """A UTF-7 HTML part (the old charset trick that hides "<script>") is decoded by us,
    so the sanitiser sees the script; the frame is then served as UTF-8."""
    data = (b"Subject: u7\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-7\r\n\r\n"
            b"+ADw-script+AD4-alert(1)+ADw-/script+AD4-hello\r\n")
    v = mailview.parse_message(data)
    assert "<script>" in v.html
    from pop3coexist.web.sanitize import clean_html

    assert "script" not in clean_html(v.html).html and "hello" in clean_html(v.html).html


def test_media_types_that_are_not_tokens_become_octet_stream():
    """A part's media type goes into our Content-Type header: a non-ASCII one (which hung
    the response: the encode failed after the handler) or one with odd characters is served
    as application/octet-stream."""
    for kind in ("image/p\u00f1g", 'text/html"x', "text/html\x7f", "a/b c"):
        data = ("Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b"
                f"\r\n\r\n--b\r\nContent-Type: {kind}\r\n\r\nxx\r\n--b--\r\n").encode()
        assert mailview.part(data, 1)[1] in ("application/octet-stream", "text/plain"), kind


def test_eight_bit_headers_and_names_are_read():
    """8-bit header fields and file names (no RFC 2047) are read as UTF-8, else as
    Windows-1252; nothing in the view is a lone surrogate (which failed the page's UTF-8)."""
    data = (b"From: J\xc3\xbcrgen <j@example.de>\r\nSubject: caf\xe9\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain"
            b"\r\n\r\nhi\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: "
            b"attachment; filename=\"r\xe9sum\xe9.pdf\"\r\n\r\nxx\r\n--b--\r\n")
    v = mailview.parse_message(data)
    assert v.from_ == "Jürgen <j@example.de>" and v.subject == "café"
    assert v.attachments[0].filename == "résumé.pdf"
    s = mailview.summary(data.split(b"\r\n\r\n")[0])
    assert s.from_ == "Jürgen" and s.subject == "café"
    for text in (v.from_, v.subject, v.attachments[0].filename):
        text.encode("utf-8")


def test_odd_messages_a_client_must_read_and_answer():
    """No Date, a broken Date, no From, an HTML-only alternative, an attached message: the
    view reads them, the list shows no date rather than failing, and a reply quotes the
    HTML part's text and says who wrote without an empty date."""
    data = (b"Subject: odd\r\nDate: Someday, 99 Foo 99999 99:99\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=m\r\n\r\n--m\r\nContent-Type: "
            b"multipart/alternative; boundary=a\r\n\r\n--a\r\nContent-Type: text/html\r\n\r\n"
            b"<p>Hello&amp;bye</p><script>x()</script><p>second</p>\r\n--a--\r\n--m\r\n"
            b"Content-Type: message/rfc822\r\n\r\nFrom: in@x\r\nSubject: inner\r\n\r\nbody\r\n"
            b"--m--\r\n")
    v = mailview.parse_message(data)
    assert v.text is None and "Hello" in v.html and v.from_ == ""
    assert mailview.summary(data.split(b"\r\n\r\n")[0]).timestamp is None
    assert [p.filename for p in v.attachments] == ["message.eml"]
    assert b"Subject: inner" in mailview.part(data, v.attachments[0].index)[0]
    r = compose.reply_fields(v, "ted@pop.contoso.test", False)
    assert "> Hello&bye" in r["body"] and "> second" in r["body"] and "x()" not in r["body"]
    nodate = mailview.parse_message(b"From: a@b.example\r\nSubject: s\r\n\r\nt\r\n")
    assert "a@b.example wrote:" in compose.reply_fields(nodate, "", False)["body"]
    assert "On ," not in compose.reply_fields(nodate, "", False)["body"]
    assert html_text("<div>a<br>b</div>") == "a\nb"


def test_deeply_nested_html_is_shown_as_text_in_bounded_time(monkeypatch):
    """100,000 nested block elements (html5ever's tree building is quadratic in that
    nesting: minutes) are never handed to the HTML parser (nh3 is not called: counted, not
    timed): the frame gets the text, escaped, in a <pre>, and a reply quotes it; ordinary
    nesting is sanitised by nh3 as before."""
    from pop3coexist.web import sanitize
    from pop3coexist.web.sanitize import clean_html, too_deep

    parser = workcount.calls(monkeypatch, sanitize.nh3, "clean")
    for tag in ("div", "blockquote", "ul"):
        html = f"<{tag}>" * 100_000 + "<b>x&amp;y</b><script>1</script>" + f"</{tag}>" * 100_000
        out = clean_html(html).html
        assert out.startswith("<pre>") and "x&amp;y" in out and "<b>" not in out
        assert "x&y" in html_text(html)
    assert parser.n == 0
    normal = "<table><tr><td>" * 40 + "<p>deep<br>ok" + "</td></tr></table>" * 40
    assert not too_deep(normal) and "<table>" in clean_html(normal).html
    assert parser.n == 1
    assert not too_deep("<p>x" * 10_000 + "<br><img src=x>" * 10_000)


# --------------------------------------------------------------------------- compose


def _built(**kw):
    args = dict(sender="ted@pop.contoso.test", to="a@example.org", cc="", subject="s",
                body="b", hostname="pop.contoso.test")
    args.update(kw)
    data = compose.build_message(**args).as_bytes()
    return data, email.message_from_bytes(data, policy=email.policy.default)


@pytest.mark.parametrize("field", ["subject", "in_reply_to", "references"])
@pytest.mark.parametrize("evil", ["x\r\nBcc: evil@example.net", "x\x00y", "x\nX-Evil: 1",
                                  "x\u2028Bcc: evil@example.net", "x\x85X-Evil: 1"])
def test_no_header_injection_through_text_fields(field, evil):
    """CR, LF, NUL, NEL or a line separator in Subject or the hidden threading fields never
    makes a new header field or puts a control character in one."""
    data, msg = _built(**{field: "<a@b.example> " + evil})
    head = data.split(b"\r\n\r\n")[0]
    assert b"\x00" not in head and b"\r\nBcc" not in head and b"\r\nX-Evil" not in head
    assert "Bcc" not in msg and "X-Evil" not in msg
    for line in head.split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line


def test_threading_fields_keep_message_ids_only():
    """In-Reply-To and References (hidden fields a browser can change) keep only ASCII
    msg-ids: a non-ASCII one or free text is dropped, never RFC 2047-encoded."""
    _, msg = _built(in_reply_to="<\u00e4@b> junk <ok@b.example>",
                    references="text <r1@x.example> <\u00e4@b> <r2@x.example>")
    assert msg["In-Reply-To"] == "<ok@b.example>"
    assert msg["References"] == "<r1@x.example> <r2@x.example>"


@pytest.mark.parametrize("to", ["a@example.org\r\nBcc: evil@example.net",
                                "a@example.org\x00", "a@example.org,\x00evil@example.net"])
def test_address_fields_cannot_inject(to):
    """A To field with CR/LF is read as a list of addresses (every one an envelope
    recipient, the header rebuilt from them, no Bcc field); with NUL it is refused."""
    if "\x00" in to:
        with pytest.raises(compose.ComposeError, match="control characters"):
            _built(to=to)
        return
    data, msg = _built(to=to)
    assert "Bcc" not in msg and msg["To"] == "a@example.org, evil@example.net"
    assert compose.parse_recipients(to) == ["a@example.org", "evil@example.net"]


def test_attachment_names_and_types_cannot_inject():
    """An upload's file name with CR/LF/NUL and a media type with CR/LF or spaces give a
    clean Content-Disposition / Content-Type (type from the name when the given one is not
    a token pair)."""
    _, msg = _built(attachments=[("evil\r\nX-Evil: 1\x00.txt", "text/plain\r\nX-Evil: 2",
                                  b"hello"),
                                 ("pic.png", "image/p ng", b"\x89PNG"),
                                 ("na\u00efve.pdf", "", b"%PDF")])
    atts = list(msg.iter_attachments())
    assert "X-Evil" not in msg and all("X-Evil" not in a for a in atts)
    assert atts[0].get_filename() == "evil X-Evil: 1 .txt"
    assert atts[0].get_content_type() == "text/plain"
    assert atts[1].get_content_type() == "image/png"
    assert atts[2].get_filename() == "na\u00efve.pdf"


def test_non_ascii_headers_are_rfc2047_and_idn_domains_a_labels():
    """A non-ASCII subject and display name are RFC 2047 words on the wire; an IDN domain
    becomes its A-label in header and envelope (RFC 5891); a non-ASCII local part, which
    needs SMTPUTF8 (RFC 6531, not offered), is refused with a message saying so."""
    data, msg = _built(to="J\u00fcrgen <j@b\u00fccher.example>", subject="Gr\u00fc\u00dfe")
    head = data.split(b"\r\n\r\n")[0]
    assert head.isascii() and b"=?utf-8?" in head
    assert msg["Subject"] == "Grüße" and "<j@xn--bcher-kva.example>" in msg["To"]
    assert compose.parse_recipients("j@b\u00fccher.example") == ["j@xn--bcher-kva.example"]
    with pytest.raises(compose.ComposeError, match="SMTPUTF8"):
        compose.parse_recipients("j\u00fcrgen@example.de")


@pytest.mark.parametrize("original", [
    _nested(3000), _many_parts(10000),
    b"From: J\xc3\xbcrgen <j@example.de>\r\nSubject: caf\xe9\r\n\r\nbody \xff\r\n",
    b"Subject: lf\n\nbare line feeds\n", b"no header at all\r\n"],
    ids=["nesting-bomb", "10000-parts", "8-bit", "bare-lf", "no-header"])
def test_forwarding_attaches_the_original_as_it_is(original):
    """Forwarding as an attachment keeps the original byte for byte (CRLF line ends), with
    bounded work: the original is never parsed, so building and writing the message executes
    about the lines (pop3coexist and email package, counted, not timed) that forwarding an
    18-byte message does, whatever the original holds (a nesting bomb raised RecursionError,
    a 500 page; 10,000 parts took 32 s), and 8-bit header fields failed to encode."""

    def forward(original: bytes) -> tuple[bytes, int]:
        with workcount.lines(("pop3coexist", "email")) as work:
            data = compose.build_message(sender="ted@pop.contoso.test", to="a@example.org",
                                         cc="", subject="s", body="b", hostname="h",
                                         forwarded=original).as_bytes()
        return data, work.lines

    _, small = forward(b"no header at all\r\n")
    data, lines = forward(original)
    assert lines <= small + 1000, (lines, small)
    crlf = original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert crlf in data
    outer = email.message_from_bytes(data.replace(crlf, b"X\r\n"), policy=email.policy.default)
    kinds = [p.get_content_type() for p in outer.iter_parts()]
    assert kinds == ["text/plain", "message/rfc822"]
    if not original.isascii():
        assert b"Content-Transfer-Encoding: 8bit" in data


def test_sender_is_always_the_user():
    """build_message takes From only from its sender argument: there is no form field for
    From or Reply-To, and the headers a form can reach never include them."""
    _, msg = _built(subject="x\r\nFrom: boss@example.org", to="Boss <boss@example.org>")
    assert msg.get_all("From") == ["ted@pop.contoso.test"] and "Reply-To" not in msg


# --------------------------------------------------------------------------- the web core


@pytest.mark.parametrize("target", ["//evil.example/", "/\\evil.example/", "/\\/evil.example",
                                    "https://evil.example/", "/ok\r\nSet-Cookie: x=1",
                                    "javascript:alert(1)", "/\t/evil.example", " /x",
                                    "/caf\u00e9"])
def test_redirect_never_leaves_the_site(target):
    """redirect() sends anything but a plain path of this site to "/": no scheme, no
    //host, no /\\host (browsers read it as //host), no white space or control characters."""
    assert redirect(target).headers[b"Location"] == b"/"


def test_redirect_keeps_plain_paths():
    """A plain path with a query stays as it is."""
    assert redirect("/folder/INBOX?page=2").headers[b"Location"] == b"/folder/INBOX?page=2"


class AttackApp(EchoApp):
    """EchoApp plus a page whose content type cannot be encoded, and a form."""

    def __init__(self, sessions, login):
        super().__init__(sessions, login)
        self.route("GET", "/badtype", self.badtype, auth=False)
        self.route("POST", "/form", self.form, auth=False)

    async def badtype(self, req):
        return Response(b"x", content_type="image/p\u00f1g")

    async def form(self, req):
        return Response(f"{len(req.form)} fields".encode())


@pytest.fixture
def aenv():
    clock = task.Clock()
    sessions = SessionStore(clock, idle_timeout=600, max_age=3600, cookie_name="s",
                            max_sessions=50)
    throttle = AuthThrottle(clock, base=1.0, maximum=8.0)
    app = AttackApp(sessions, WebLogin(FakeChecker({"ted@pop.contoso.test": "secret"}),
                                       throttle, clock))
    return clock, sessions, app, Client(make_site(app, 4 * 1024 * 1024), clock=clock)


def _raw(client, head: str, body: bytes = b""):
    """Send a raw request (head without the blank line) and return (status, headers, body)."""
    ch = client.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    t = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    ch.makeConnection(t)
    ch.dataReceived(head.encode("latin-1") + b"\r\n\r\n" + body)
    out = t.value()
    ch.connectionLost(None)
    if not out:
        return None, {}, b""
    top, _, content = out.partition(b"\r\n\r\n")
    hdrs = {}
    for line in top.split(b"\r\n")[1:]:
        k, _, v = line.partition(b": ")
        hdrs.setdefault(k.decode().lower(), []).append(v.decode())
    return int(top.split(b" ")[1]), hdrs, content


def _token(sessions, client) -> str:
    return sessions.get(client.cookie.split("=", 1)[1]).csrf


def test_a_response_that_cannot_be_encoded_still_ends(aenv):
    """A handler's content type that is not ASCII is served as application/octet-stream
    (before: an exception after the handler, and a connection left open forever)."""
    _, _, _, client = aenv
    status, hdrs, _ = client.request("GET", "/badtype")
    assert status == 200 and hdrs["content-type"] == ["application/octet-stream"]


def test_form_bodies_are_bounded_before_the_csrf_check(aenv, monkeypatch):
    """Anyone can POST before a token is checked: a body of more than MAX_FIELDS fields, a
    multipart body without a boundary, with too many parts or nested 5,000 deep, or not
    UTF-8, is refused with 400 with bounded work, counted, not timed: the bodies with too many
    fields or parts never reach the MIME parser (only the tiny boundary-less one is parsed)
    and all of them together run within a budget of executed lines (pop3coexist, email and
    urllib code) that parsing one of the big ones would exceed; a normal form passes."""
    _, sessions, _, client = aenv
    client.request("GET", "/login")
    token = _token(sessions, client)
    cookie = f"Cookie: {client.cookie}\r\n"

    def post(ctype: str, body: bytes):
        return _raw(client, f"POST /form HTTP/1.1\r\nHost: x\r\n{cookie}Content-Type: {ctype}\r\n"
                            f"Content-Length: {len(body)}", body)

    parses = workcount.calls(monkeypatch, email.parser.BytesParser, "parsebytes")
    with workcount.lines(("pop3coexist", "email", "urllib"), budget=FORM_BUDGET) as work:
        _refused_forms(post, token)
    assert parses.n == 1, parses.n
    print(f"{work.lines} lines for the refused bodies")
    ok = post("application/x-www-form-urlencoded", f"csrf_token={token}&a=1&b=2".encode())
    assert ok[0] == 200 and ok[2] == b"3 fields"


FORM_BUDGET = 20_000  # lines (the refused bodies take about 2,000; parsing a big one, far more)


def _refused_forms(post, token: str) -> None:
    many = f"csrf_token={token}".encode() + b"&a=1" * (MAX_FIELDS + 5)
    assert post("application/x-www-form-urlencoded", many)[0] == 400
    assert post("application/x-www-form-urlencoded", b"\xff\xfe")[0] == 400
    assert post("multipart/form-data", b"--x\r\n\r\n--x--\r\n")[0] == 400
    parts = b"".join(b"--x\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nv\r\n" % i
                     for i in range(MAX_FIELDS + 5))
    assert post("multipart/form-data; boundary=x", parts + b"--x--\r\n")[0] == 400
    nested = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                      for i in range(5000))
    assert post("multipart/form-data; boundary=b0", nested)[0] == 400


def test_every_dynamic_response_is_no_store(aenv):
    """The log-in page (it carries a CSRF token and a Set-Cookie), 404 and 403 pages are
    no-store like a logged-in page; only static files say they may be cached."""
    _, _, _, client = aenv
    for method, path in (("GET", "/login"), ("GET", "/nope"), ("POST", "/act")):
        _, hdrs, _ = client.request(method, path)
        assert hdrs["cache-control"] == ["no-store"], path
        assert hdrs["x-frame-options"] == ["DENY"]
    _, hdrs, _ = client.request("GET", "/static/style.css")
    assert hdrs["cache-control"] == ["public, max-age=3600"]


def test_methods(aenv):
    """HEAD of a page has its headers and no body; OPTIONS, TRACE or an unknown method on a
    page is 405 with Allow (RFC 9110 section 15.5.6) and the security headers; on no page,
    404."""
    _, _, _, client = aenv
    status, hdrs, body = _raw(client, "HEAD /login HTTP/1.1\r\nHost: x\r\nConnection: close")
    assert status == 200 and body == b"" and int(hdrs["content-length"][0]) > 0
    for method in ("OPTIONS", "TRACE", "FOO"):
        status, hdrs, _ = _raw(client, f"{method} /login HTTP/1.1\r\nHost: x")
        assert status == 405 and hdrs["allow"] == ["GET, HEAD, POST"], method
        assert "frame-ancestors 'none'" in hdrs["content-security-policy"][0]
    assert _raw(client, "OPTIONS /nope HTTP/1.1\r\nHost: x")[0] == 404


def test_anonymous_flood_never_logs_a_user_out(aenv):
    """max_sessions anonymous sessions made by a stranger (any GET makes one) push out
    other anonymous sessions, never a logged-in one: the user stays logged in."""
    clock, sessions, _, client = aenv
    assert _login(client)[0] == 303
    stranger = Client(client.site)
    for _ in range(sessions.max_sessions * 3):
        stranger.cookie = None
        stranger.request("GET", "/login")
        clock.advance(1)
    status, _, body = client.request("GET", "/")
    assert status == 200 and body == b"home ted@pop.contoso.test"
    assert len(sessions) <= sessions.max_sessions


def test_a_log_in_form_loaded_before_an_anonymous_flood_still_logs_in(aenv):
    """A stranger's flood of anonymous sessions (3x max_sessions) pushes out the anonymous
    session of a browser that has the log-in form open; its POST still logs in (the form's
    token is derived from the cookie's id, which revives the session), and the logged-in
    session gets a new id. A forged token or a malformed cookie id is still refused."""
    clock, sessions, _, client = aenv
    _, _, token = client.request("GET", "/login")
    before = client.cookie
    stranger = Client(client.site)
    for _ in range(sessions.max_sessions * 3):
        stranger.cookie = None
        stranger.request("GET", "/login")
        clock.advance(1)
    assert sessions.get(before.split("=", 1)[1]) is None  # pushed out
    forged = f"csrf_token={'A' * 43}&user=ted@pop.contoso.test&password=secret"
    assert client.request("POST", "/login", forged.encode())[0] == 403
    client.cookie = before
    body = f"csrf_token={token.decode()}&user=ted@pop.contoso.test&password=secret"
    status, _, _ = client.request("POST", "/login", body.encode())
    assert status == 303 and client.cookie != before
    assert client.request("GET", "/")[2] == b"home ted@pop.contoso.test"
    assert sessions.revive("not-an-id") is None and sessions.revive("x" * 500) is None


def test_trusted_proxy_names_the_client_for_the_throttle():
    """Behind a reverse proxy listed in web.trusted_proxies, a failed log-in counts for the
    address the proxy put last in X-Forwarded-For (not for the proxy, which every user
    shares); from a peer not listed the header is ignored, and a malformed value falls back
    to the peer."""
    import ipaddress

    clock = task.Clock()
    sessions = SessionStore(clock, cookie_name="s")
    throttle = AuthThrottle(clock, base=1.0, maximum=8.0)
    app = EchoApp(sessions, WebLogin(FakeChecker({"ted@pop.contoso.test": "secret"}),
                                     throttle, clock))
    cases = [((ipaddress.ip_network("127.0.0.0/8"),), "198.51.100.7, 203.0.113.9",
              "203.0.113.9"),
             ((), "203.0.113.9", "127.0.0.1"),
             ((ipaddress.ip_network("10.0.0.0/8"),), "203.0.113.9", "127.0.0.1"),
             ((ipaddress.ip_network("127.0.0.1/32"),), "not-an-address", "127.0.0.1")]
    for proxies, header, counted in cases:
        client = Client(make_site(app, 4096, proxies), clock=clock)
        _, _, token = client.request("GET", "/login")
        body = f"csrf_token={token.decode()}&user=ted@pop.contoso.test&password=wrong"
        status, _, _ = client.request("POST", "/login", body.encode(),
                                      headers={"X-Forwarded-For": header})
        assert status == 403
        assert throttle.failures(counted) == 1, (proxies, header)
        throttle.success(counted)


def test_access_log_lines_cannot_be_forged():
    """The access log line of a request whose path or method holds control characters, a
    quote or a terminal escape shows them as "?": one request, one line, no forged fields;
    the query string (where a token could be) is never shown."""
    from pop3coexist.web.app import _log_line

    class Raw:
        path = b'/x"\r\n127.0.0.1 - - "GET /admin" 200\x1b[2J\xff'
        uri = path + b"?csrf_token=SECRET"
        method = b"GE\nT"
        code = 404
        sentLength = 12

        def getClientAddress(self):  # noqa: N802 (Twisted's name)
            return IPv4Address("TCP", "192.0.2.1", 4000)

    line = _log_line("[ts]", Raw())
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.count('"') == 4 and "SECRET" not in line
    assert line.startswith('"192.0.2.1" - - [ts] "GE?T /x?')
