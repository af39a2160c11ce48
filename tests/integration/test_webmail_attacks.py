"""Web mail under attack, against the real server (twistd, [web] listen on loopback): an
outside tester's cases with plain HTTP (http.client) and, where only a browser can tell
whether a script runs, Debian's Chromium via Selenium.

Two users: VIC (the victim, whose mail holds a secret marker) and EVE (a logged-in attacker
trying to reach it). The server's log must hold no password, session id or CSRF token and no
traceback at the end (``stop_cleanly``).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.integration.test_webmail import Http, artifacts, smtp_deliver
from tests.support.browser import headless_chrome, wait_for
from tests.support.server import ServerProcess, require_installed_plugin
from tests.support.smarthost import SmartHost

# one server for the module, tests in order (the browser test reads the hostile message)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180),
              pytest.mark.xdist_group("webmail_attacks")]

DOMAIN = "pop.contoso.test"
VIC, VIC_PW = f"vic@{DOMAIN}", "vic-web-Secret-7"
EVE, EVE_PW = f"eve@{DOMAIN}", "eve-web-Secret-8"
SECRET = "VICTIM-SECRET-4711"
XSS = {
    "subject": "<script>document.title='pwned-subject'</script>",
    "name": "<img src=x onerror=document.title='pwned-from'>",
    "file": "<svg onload=document.title='pwned-file'>.html",
    "text": "<script>document.title='pwned-text'</script>",
    "folder": "<b onmouseover=alert(5)>",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_installed_plugin()
    smarthost = SmartHost().start()
    srv = ServerProcess(tmp_path_factory.mktemp("webattacks"), tls=False, extra_config=(
        '[web]\nlisten = ["tcp:0:interface=127.0.0.1"]\npage_size = 200\nmax_upload = "2MB"\n'
        f'[smarthost]\nhost = "[127.0.0.1]:{smarthost.port}"\ntls = "none"\n'))
    srv.write_config()
    for addr, pw in ((VIC, VIC_PW), (EVE, EVE_PW)):
        srv.add_mailbox(addr, pw)
    srv.start()
    state = {"srv": srv, "smarthost": smarthost, "secrets": [VIC_PW, EVE_PW]}
    smtp_deliver(state, "x@example.org", VIC,
                 f"From: x@example.org\r\nTo: {VIC}\r\nSubject: private\r\n\r\n{SECRET}\r\n"
                 .encode())
    yield state
    try:
        srv.stop_cleanly(*state["secrets"])
    finally:
        smarthost.stop()


class Client(Http):
    """Http that also keeps every CSRF token it saw (none may reach the log)."""

    def token(self, page: str) -> str:
        token = super().token(page)
        if token not in self.seen_ids:
            self.seen_ids.append(token)
        return token

    def logged_in(self, user: str, password: str) -> Client:
        resp, _ = self.login(user, password)
        assert resp.status == 303, resp.status
        return self

    def form_token(self) -> str:
        _, page = self.request("GET", "/compose")
        return self.token(page)


def _bytes_read(pid: int) -> int:
    """Bytes the server process and its children have read so far (``rchar`` of
    /proc/PID/io: files and sockets), to count what a request made it read."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        pids += [int(child) for child in children]
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/io").read_text().splitlines():
                if line.startswith("rchar:"):
                    total += int(line.split()[1])
        except OSError:
            pass  # a child gone meanwhile
    return total


def maildir(world, box: str) -> os.PathLike:
    return world["srv"].state_dir / "mailroot" / DOMAIN / box


def first_uid(c: Client, folder: str = "INBOX", subject: str | None = None) -> int:
    _, page = c.request("GET", f"/folder/{folder}")
    rows = re.findall(r'href="/msg/[^/"]+/(\d+)">(?:[^<]*?)([^<]*)</a>', page)
    for uid, text in rows:
        if subject is None or subject in text:
            return int(uid)
    raise AssertionError(f"no message {subject!r} in {folder}")


# --------------------------------------------------------------------------- paths and ids


def test_paths_and_ids_never_leave_the_account(world):
    """EVE, logged in, tries VIC's mail through every id a URL or form carries: folder names
    with .., /, NUL, Maildir++ dots; another folder's or account's message ids; part numbers
    out of range; reply/forward/attach references; move targets. Every answer is 404 or a
    refusal, none holds VIC's secret, and nothing is sent with it."""
    vic = Client(world).logged_in(VIC, VIC_PW)
    vic_uid = first_uid(vic, subject="private")
    eve = Client(world).logged_in(EVE, EVE_PW)
    q = urllib.parse.quote
    paths = [f"/folder/{q('../vic', safe='')}", "/folder/..", "/folder/%2E%2E",
             "/folder/%00", "/folder/INBOX%00", "/folder/.Sent", "/folder/Sent.",
             f"/folder/{q('../../vic/cur', safe='')}", "/folder/%2Fetc%2Fpasswd",
             f"/msg/INBOX/{vic_uid}", f"/msg/{q('../vic', safe='')}/{vic_uid}",
             f"/msg/INBOX/{vic_uid}/body", f"/msg/INBOX/{vic_uid}/part/0",
             "/msg/INBOX/1/part/9999", "/msg/INBOX/9999999999",
             f"/compose?reply={q('../vic/INBOX', safe='')}/{vic_uid}",
             f"/compose?forward=../../vic/{vic_uid}", f"/compose?reply=INBOX/{vic_uid}",
             f"/compose?forward=%00/{vic_uid}"]
    for path in paths:
        resp, page = eve.request("GET", path)
        assert resp.status == 404, (path, resp.status)
        assert SECRET not in page and "private" not in page, path
    token = eve.form_token()
    before = len(world["smarthost"].received)
    resp, page = eve.request("POST", "/compose", {
        "csrf_token": token, "to": "out@example.org", "subject": "steal", "body": "x",
        "attach_source": f"../../vic/INBOX/{vic_uid}", "reply_source": f"../vic/{vic_uid}",
        "send": "send"})
    assert resp.status == 303
    got = world["smarthost"].wait_for(before + 1)[-1]
    assert SECRET.encode() not in got.content
    for target in ("../vic", "../../vic/.Trash", "\x00", ".Sent"):
        resp, _ = eve.request("POST", "/folder/INBOX/action",
                              {"csrf_token": token, "action": "move", "target": target,
                               "uid": "1"})
        assert resp.status == 303
    _, page = vic.request("GET", f"/msg/INBOX/{vic_uid}")
    assert SECRET in page  # still VIC's, still there


# --------------------------------------------------------------------------- XSS


def _deliver_hostile(world) -> None:
    """Deliver the hostile message and make its folder, once per module (each test that needs
    them calls this: the tests must not depend on their order)."""
    import twisted.mail.imap4  # noqa: F401 - the imap4-utf-7 codec

    if world.get("hostile"):
        return
    world["hostile"] = True
    msg = (f'From: "{XSS["name"]}" <x@example.org>\r\nTo: {VIC}\r\nSubject: {XSS["subject"]}'
           f'\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n'
           f'--zz\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{XSS["text"]}\r\n'
           f'--zz\r\nContent-Type: text/html\r\nContent-Disposition: attachment; '
           f'filename="{XSS["file"]}"\r\n\r\n<script>alert(1)</script>\r\n--zz--\r\n')
    smtp_deliver(world, "x@example.org", VIC, msg.encode())
    folder = maildir(world, "vic") / ("." + XSS["folder"].encode("imap4-utf-7").decode())
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)


def test_message_data_reaches_pages_only_as_text(world):
    """A subject, display name, attachment name, text/plain body and folder name that are
    HTML, and a compose error naming a hostile address, all come back escaped: the raw
    markup is on no page (list, message, compose error, folder list)."""
    import twisted.mail.imap4  # noqa: F401 - the imap4-utf-7 codec

    _deliver_hostile(world)
    vic = Client(world).logged_in(VIC, VIC_PW)
    _, listing = vic.request("GET", "/folder/INBOX")
    uid = first_uid(vic, subject="pwned-subject")
    _, page = vic.request("GET", f"/msg/INBOX/{uid}")
    token = vic.token(page)
    _, error = vic.request("POST", "/compose", {"csrf_token": token, "to": XSS["text"],
                                                "subject": "s", "body": "b", "send": "send"})
    for text in (listing, page, error):
        for raw in XSS.values():
            assert raw not in text
    assert "&lt;script&gt;document.title=&#39;pwned-subject&#39;" in page
    assert "&lt;b onmouseover=alert(5)&gt;" in listing


def test_browser_runs_no_script_from_message_data(world):
    """In Chromium: the list and the message page of the hostile message, with its folder
    name, run nothing: no alert, the title stays ours, the text/plain body is shown as
    text. The inline (cid:) image of an HTML message shows in the sandboxed frame (a part URL
from that opaque-origin frame went without the SameSite=Strict cookie: the log-in page)."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    _deliver_hostile(world)
    drv = headless_chrome(1100, 760)
    png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00"
           b"\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05"
           b"\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")
    import base64

    smtp_deliver(world, "x@example.org", VIC, (
        f"From: x@example.org\r\nTo: {VIC}\r\nSubject: with logo\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/related; boundary=rr\r\n\r\n--rr\r\nContent-Type: text/html"
        '\r\n\r\n<p>logo:</p><img id="logo" src="cid:logo@x">\r\n--rr\r\nContent-Type: '
        "image/png\r\nContent-ID: <logo@x>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(png).decode() + "\r\n--rr--\r\n").encode())
    base = f"http://127.0.0.1:{world['srv'].port('web')}"
    try:
        drv.get(base + "/login")
        drv.find_element(By.ID, "username").send_keys(VIC)
        drv.find_element(By.ID, "password").send_keys(VIC_PW)
        drv.find_element(By.ID, "login").click()
        wait_for(drv, lambda: "/folder/INBOX" in drv.current_url, 20, "the inbox")
        world["secrets"].extend(c["value"] for c in drv.get_cookies())

        def no_alert() -> None:
            with pytest.raises(NoAlertPresentException):
                drv.switch_to.alert.text  # noqa: B018 - reading it is the probe

        no_alert()
        assert "pwned" not in drv.title
        # the URL changes when the navigation commits, before the list is rendered: wait for it
        wait_for(drv, lambda: drv.find_elements(By.PARTIAL_LINK_TEXT, "pwned-subject"), 20,
                   "the hostile message in the list")[0].click()
        wait_for(drv, lambda: drv.find_elements(By.ID, "textbody"), 20, "the message")
        no_alert()
        assert drv.title.startswith("<script>") and "pwned" not in drv.title.split("-")[-1]
        assert drv.find_element(By.ID, "textbody").text == XSS["text"]
        assert not drv.find_elements(By.CSS_SELECTOR, "main script, main svg, main img")
        drv.save_screenshot(str(artifacts() / "webmail-attack-xss.png"))
        drv.get(base + "/folder/INBOX")
        drv.find_element(By.LINK_TEXT, "with logo").click()
        wait_for(drv, lambda: drv.find_elements(By.ID, "htmlbody"), 20, "the HTML frame")
        drv.switch_to.frame(drv.find_element(By.ID, "htmlbody"))
        logo = wait_for(drv, lambda: drv.find_elements(By.TAG_NAME, "img"), 20, "the logo")[0]
        assert logo.get_attribute("src").startswith("data:image/png;base64,")
        wait_for(drv, lambda: logo.get_attribute("naturalWidth") == "1", 20, "the logo shown")
        drv.switch_to.default_content()
        no_alert()
    finally:
        drv.quit()


# --------------------------------------------------------------------------- CSRF, sessions


def test_state_changes_need_post_and_token(world):
    """GET /logout changes nothing (405, still logged in); a notice in the URL is not shown
    (a link cannot make our page say an attacker's words); an action's notice shows once;
    a password in the log-in URL's query is not read."""
    c = Client(world).logged_in(EVE, EVE_PW)
    resp, _ = c.request("GET", "/logout")
    assert resp.status == 405 and "POST" in resp.getheader("Allow")
    resp, page = c.request("GET", "/folder/INBOX?notice=Your+password+expired%2C+call+555")
    assert resp.status == 200 and "password expired" not in page
    token = c.token(page)
    resp, _ = c.request("POST", "/folder/INBOX/action", {"csrf_token": token, "action": "read"})
    assert resp.status == 303 and "notice" not in resp.getheader("Location")
    _, page = c.request("GET", resp.getheader("Location"))
    assert "0 messages marked read" in page
    _, page = c.request("GET", "/folder/INBOX")
    assert "marked read" not in page
    anon = Client(world)
    _, page = anon.request("GET", "/login")
    q = urllib.parse.urlencode({"username": EVE, "password": EVE_PW})
    resp, _ = anon.request("POST", "/login?" + q, {"csrf_token": anon.token(page)})
    assert resp.status == 403


def test_sender_cannot_be_forged_through_form_fields(world):
    """From, Sender, Reply-To and header-looking fields added to the compose form change
    nothing: the smart host gets MAIL FROM and From of the logged-in user only."""
    c = Client(world).logged_in(EVE, EVE_PW)
    before = len(world["smarthost"].received)
    resp, _ = c.request("POST", "/compose", {
        "csrf_token": c.form_token(), "to": "out@example.org", "subject": "hi\r\nFrom: "
        f"{VIC}", "body": "x", "from": VIC, "sender": VIC, "reply_to": VIC,
        "in_reply_to": f"<a@b>\r\nReply-To: {VIC}", "send": "send"})
    assert resp.status == 303
    got = world["smarthost"].wait_for(before + 1)[-1]
    head = got.content.split(b"\r\n\r\n")[0]
    assert got.mail_from == EVE
    assert re.findall(rb"(?m)^From: ([^\r\n]*)", head) == [EVE.encode()]
    assert b"\r\nReply-To" not in head and b"\r\nSender" not in head


def test_unknown_user_and_wrong_password_look_the_same(world):
    """An unknown user and a wrong password (each from its own address, so neither waits on
    the other's throttle row) get the same status and page. That both cost the same scrypt
    work is proved by counting in tests/unit/test_passwordfile.py (timings here would be
    machine load, not a property; they are printed only)."""
    results = []
    for source, user in (("127.0.0.3", f"nobody@{DOMAIN}"), ("127.0.0.4", EVE)):
        c = Client(world, source)
        started = time.monotonic()
        resp, page = c.login(user, "wrong-password-1")
        results.append((resp.status, re.sub(r'value="[^"]*"', "", page).replace(user, ""),
                        time.monotonic() - started))
    assert results[0][0] == results[1][0] == 403
    assert results[0][1] == results[1][1]
    print(f"unknown user {results[0][2]:.3f} s, wrong password {results[1][2]:.3f} s")


# --------------------------------------------------------------------------- headers, methods


def _raw(world, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", world["srv"].port("web")), timeout=15) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return out


def test_every_kind_of_response_has_the_security_headers(world):
    """Pages, 404, 405, 400, 413, static files, the message frame and an attachment all
    carry nosniff, a CSP with frame-ancestors and X-Frame-Options (SAMEORIGIN only for the
    frame and an inline image); authenticated ones and attachments are no-store."""
    _deliver_hostile(world)
    c = Client(world).logged_in(VIC, VIC_PW)
    uid = first_uid(c, subject="pwned-subject")
    _, page = c.request("GET", f"/msg/INBOX/{uid}")
    part = re.search(r'href="(/msg/INBOX/\d+/part/\d+)"', page).group(1)
    checks = {"/folder/INBOX": "DENY", "/nope": "DENY", "/static/style.css": "DENY",
              f"/msg/INBOX/{uid}/body": "SAMEORIGIN", part: "DENY"}
    for path, xfo in checks.items():
        resp, _ = c.request("GET", path)
        assert resp.getheader("X-Content-Type-Options") == "nosniff", path
        assert resp.getheader("X-Frame-Options") == xfo, path
        assert "frame-ancestors" in resp.getheader("Content-Security-Policy"), path
        if path != "/static/style.css":
            assert resp.getheader("Cache-Control") == "no-store", path
    resp, _ = c.request("DELETE", "/folder/INBOX")
    assert resp.status == 405 and resp.getheader("X-Frame-Options") == "DENY"
    port = world["srv"].port("web")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("POST", "/login", body=b"\xff", headers={"Content-Type": "text/plain"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 400 and resp.getheader("X-Frame-Options") == "DENY"
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("POST", "/login", body=b"a=" + b"x" * (3 * 1024 * 1024),
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 413 and resp.getheader("X-Frame-Options") == "DENY"
    conn.close()


def test_malformed_and_oversized_requests_leave_the_server_serving(world):
    """A 100 KB header, a thousand header lines, a 64 KB request line, a multipart body
    without boundary: each is refused (4xx) or dropped, and the log-in page still answers
    (within the client's 30 s timeout: a server left busy or hung fails it)."""
    for data in (b"GET /login HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
                 b"GET /login HTTP/1.1\r\n" + b"X-A: b\r\n" * 1000 + b"\r\n",
                 b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data\r\n"
                 b"Content-Length: 10\r\nConnection: close\r\n\r\n--x\r\n\r\n--x"):
        out = _raw(world, data)
        assert not out or re.match(rb"HTTP/1.1 4\d\d", out), out[:100]
    resp, _ = Client(world).request("GET", "/login")
    assert resp.status == 200


def test_huge_and_many_part_messages_stay_bounded(world):
    """A 50 MB message in the folder does not cost the list its size (only its head is read:
    the server reads under 5 MB, counted in /proc/PID/io, not timed); a message of 10,000
    parts opens, listing the first parts and saying there are more, and while it is parsed
    (in the thread pool) the server answers another request first (ordering, not seconds);
    forwarded as an attachment it leaves whole; an HTML part of 100,000 nested <div> (minutes
    of html5ever's tree building) is shown as text. Each request is bounded by the client's
    30 s timeout; the bounded work itself is counted in tests/unit/test_web_attacks.py."""
    cur = maildir(world, "vic") / "cur"
    big = cur / "1700000000.M1P1.bigmsg:2,S"
    with open(big, "wb") as f:
        f.write(b"From: big@example.org\r\nSubject: fifty megabytes\r\n\r\n")
        line = b"x" * 998 + b"\r\n"
        for _ in range(50 * 1024):
            f.write(line)
    parts = b"".join(b"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: "
                     b"attachment; filename=f%d\r\n\r\nx\r\n" % i for i in range(10000))
    (cur / "1700000001.M2P1.manyparts:2,S").write_bytes(
        b"From: many@example.org\r\nSubject: ten thousand parts\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n")
    (cur / "1700000002.M3P1.deepdivs:2,S").write_bytes(
        b"From: deep@example.org\r\nSubject: deep divs\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html\r\n\r\n" + b"<div>" * 100_000 + b"DEEP-TEXT"
        + b"</div>" * 100_000 + b"\r\n")
    c = Client(world).logged_in(VIC, VIC_PW)
    first_uid(c)  # the folder's index is built (it reads each new message's head once)
    read_before = _bytes_read(world["srv"].proc.pid)
    resp, page = c.request("GET", "/folder/INBOX")
    read = _bytes_read(world["srv"].proc.pid) - read_before
    assert resp.status == 200 and "fifty megabytes" in page and "48.8 MB" in page
    # heads only, once the sizes are known (it read the 50 MB message whole at every listing)
    assert read < 5 * 1024 * 1024, f"the folder list read {read} bytes"
    uid = first_uid(c, subject="ten thousand parts")
    done: dict = {}
    sent, answered = threading.Event(), threading.Event()

    def open_it() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=30)
        conn.request("GET", f"/msg/INBOX/{uid}", headers={"Cookie": c.cookie})
        sent.set()  # the big request is in the server's socket before the other one connects
        r = conn.getresponse()
        done["resp"] = (r, r.read().decode("utf-8", "replace"))
        done["other answered first"] = other_done.is_set()
        answered.set()
        conn.close()

    other_done = threading.Event()
    reader = threading.Thread(target=open_it)
    reader.start()
    assert sent.wait(30)
    big_finished_before = answered.is_set()
    other, _ = Client(world).request("GET", "/static/style.css")
    other_done.set()
    reader.join(60)
    resp, page = done["resp"]
    assert resp.status == 200 and 'id="truncated"' in page
    assert other.status == 200
    # the page came after the style sheet: the parse (in the thread pool) kept nobody waiting
    assert big_finished_before or done["other answered first"], done
    before = len(world["smarthost"].received)
    resp, _ = c.request("POST", "/compose", {
        "csrf_token": c.token(page), "to": "out@example.org", "subject": "Fwd: many",
        "body": "see attached", "attach_source": f"INBOX/{uid}", "send": "send"})
    assert resp.status == 303
    got = world["smarthost"].wait_for(before + 1)[-1]
    assert b"Subject: ten thousand parts" in got.content and b"filename=f9999" in got.content
    deep = first_uid(c, subject="deep divs")
    resp, body = c.request("GET", f"/msg/INBOX/{deep}/body")
    assert resp.status == 200 and "DEEP-TEXT" in body and "<div>" not in body
    big.unlink()


def test_secrets_never_in_urls(world):
    """No page links or redirects to a URL with a session id, CSRF token or password: the
    tokens appear only in hidden form fields."""
    c = Client(world).logged_in(VIC, VIC_PW)
    sid = c.cookie.split("=", 1)[1]
    _, page = c.request("GET", "/folder/INBOX")
    token = c.token(page)
    for url in re.findall(r'(?:href|src|action)="([^"]*)"', page):
        assert sid not in url and token not in url and VIC_PW not in url
    log = world["srv"].log_text()  # the access log lines carry paths only
    assert token not in log and sid not in log


def test_locking_a_mailbox_ends_its_web_session(world):
    """A logged-in session of a mailbox that the administrator then locks is logged out at
    its next request (not only new log-ins refused). The module's last test: EVE stays
    locked."""
    c = Client(world).logged_in(EVE, EVE_PW)
    assert c.request("GET", "/folder/INBOX")[0].status == 200
    world["srv"].admin("mailbox", "lock", EVE)
    resp, _ = c.request("GET", "/folder/INBOX")
    assert resp.status == 303 and resp.getheader("Location") == "/login"
    assert c.cookie is None  # the cookie was cleared, the session destroyed
