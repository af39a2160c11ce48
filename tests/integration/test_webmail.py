"""Web mail against the real server (twistd, [web] listen on loopback), in Debian's Chromium
driven by Selenium (headless, chromedriver from the chromium-driver package: nothing is
downloaded), and at the HTTP level for the security checks.

One server, one aiosmtpd smart host, one local HTTP server (the "remote image" host) and one
browser serve the whole module. Each browser page is saved as a PNG in the artifacts folder
(env ``POP3COEXIST_ARTIFACTS``, default ``test-artifacts/`` under the repository).
"""

from __future__ import annotations

import http.client
import http.server
import os
import poplib
import re
import smtplib
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.support.browser import headless_chrome, present, wait_for
from tests.support.server import ServerProcess, require_installed_plugin
from tests.support.smarthost import SmartHost, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
TED, TED_PW = "ted@pop.contoso.test", "ted-web-Secret-1"
AMY, AMY_PW = "amy@pop.contoso.test", "amy-web-Secret-2"
OTHER_SOURCE = "127.0.0.2"  # the throttle test's client address (its own throttle row)


def artifacts() -> Path:
    d = Path(os.environ.get("POP3COEXIST_ARTIFACTS") or ROOT / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


class ImageHost:
    """A local HTTP server standing for a remote image host: records every request."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits.append(self.path)
                body = (b"\x89PNG\r\n\x1a\n")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_installed_plugin()
    smarthost = SmartHost().start()
    images = ImageHost()
    srv = ServerProcess(tmp_path_factory.mktemp("webmail"), tls=False, extra_config=(
        '[web]\nlisten = ["tcp:0:interface=127.0.0.1"]\npage_size = 20\n'
        'session_recheck = "0s"\n'
        f'[smarthost]\nhost = "[127.0.0.1]:{smarthost.port}"\ntls = "none"\n'))
    srv.write_config()
    # POP3's failure delay long enough to see (the throttle test), short enough to be quick
    text = srv.config_path.read_text().replace('auth_failure_delay = "0.05s"',
                                               'auth_failure_delay = "0.3s"', 1)
    srv.config_path.write_text(text)
    srv.add_mailbox(TED, TED_PW)
    srv.add_mailbox(AMY, AMY_PW)
    srv.start()
    state = {"srv": srv, "smarthost": smarthost, "images": images, "secrets": [TED_PW, AMY_PW]}
    yield state
    try:
        srv.stop_cleanly(*state["secrets"])
    finally:
        images.stop()
        smarthost.stop()


def base(world) -> str:
    return f"http://127.0.0.1:{world['srv'].port('web')}"


def smtp_deliver(world, sender: str, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", world["srv"].port("smtp")) as c:
        c.sendmail(sender, [rcpt], data)


def inbox_count(world, box: str, folder: str = "") -> int:
    root = world["srv"].state_dir / "mailroot" / "pop.contoso.test" / box
    path = root / folder if folder else root
    return sum(len(os.listdir(path / sub)) for sub in ("new", "cur"))


# --------------------------------------------------------------------------- HTTP client


class Http:
    """A tiny HTTP client with one cookie (the session), from a chosen source address."""

    def __init__(self, world, source: str = "127.0.0.1") -> None:
        self.port = world["srv"].port("web")
        self.source = source
        self.cookie: str | None = None
        self.seen_ids: list[str] = world["secrets"]

    def request(self, method: str, path: str, form: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30,
                                          source_address=(self.source, 0))
        headers = {}
        body = None
        if self.cookie:
            headers["Cookie"] = self.cookie
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        content = resp.read()
        for value in resp.headers.get_all("Set-Cookie") or []:
            pair = value.split(";")[0]
            name, _, sid = pair.partition("=")
            self.cookie = pair if sid else None
            if sid:
                self.seen_ids.append(sid)
        conn.close()
        return resp, content.decode("utf-8", "replace")

    def token(self, page: str) -> str:
        return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)

    def login(self, user: str, password: str):
        _, page = self.request("GET", "/login")
        return self.request("POST", "/login", {"csrf_token": self.token(page),
                                               "username": user, "password": password})


# --------------------------------------------------------------------------- security, HTTP


def test_post_without_or_with_wrong_csrf_token_is_refused(world):
    """A logged-in POST to /compose with no CSRF token, a wrong one, or the token of another
    session is refused with 403 and nothing is sent; the log-in form needs one too."""
    c = Http(world)
    resp, _ = c.login(TED, TED_PW)
    assert resp.status == 303
    other = Http(world)
    _, page = other.request("GET", "/login")
    before = len(world["smarthost"].received)
    form = {"to": "someone@example.org", "subject": "csrf", "body": "x", "send": "send"}
    for token in (None, "forged", other.token(page)):
        data = dict(form, **({"csrf_token": token} if token else {}))
        resp, page2 = c.request("POST", "/compose", data)
        assert resp.status == 403 and "expired or did not come from this site" in page2
    resp, _ = Http(world).request("POST", "/login", {"username": TED, "password": TED_PW})
    assert resp.status == 403
    assert len(world["smarthost"].received) == before
    assert inbox_count(world, "ted", ".Sent") == 0


def test_session_fixation_is_impossible(world):
    """The session id a browser has before log-in (one an attacker could have planted) is
    not the one after it, and opens nothing afterwards; log-out destroys the new one."""
    c = Http(world)
    _, page = c.request("GET", "/login")
    planted = c.cookie
    resp, _ = c.request("POST", "/login", {"csrf_token": c.token(page), "username": TED,
                                           "password": TED_PW})
    assert resp.status == 303 and c.cookie and c.cookie != planted
    attacker = Http(world)
    attacker.cookie = planted
    resp, _ = attacker.request("GET", "/folder/INBOX")
    assert resp.status == 303 and resp.getheader("Location") == "/login"
    resp, page = c.request("GET", "/folder/INBOX")
    assert resp.status == 200
    assert resp.getheader("Cache-Control") == "no-store"
    csp = resp.getheader("Content-Security-Policy")
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    logged_in = c.cookie
    c.request("POST", "/logout", {"csrf_token": c.token(page)})
    stale = Http(world)
    stale.cookie = logged_in
    resp, _ = stale.request("GET", "/folder/INBOX")
    assert resp.status == 303


def test_password_change_and_lock_end_the_web_sessions(world):
    """OWASP ASVS 3.3.3 with the real server and the real admin tool (``web.session_recheck``
    0 here): after ``pop3coexist-admin mailbox passwd`` the session logged in with the old
    password is sent to the log-in page at its next request and the new password logs in;
    ``mailbox lock`` ends that session too, and ``unlock`` lets the user in again."""
    pat, old_pw, new_pw = "pat@pop.contoso.test", "pat-web-Secret-3", "pat-web-Secret-4"
    world["secrets"] += [old_pw, new_pw]
    world["srv"].add_mailbox(pat, old_pw)
    c = Http(world)
    assert c.login(pat, old_pw)[0].status == 303
    assert c.request("GET", "/folder/INBOX")[0].status == 200
    world["srv"].admin("mailbox", "passwd", pat, password=new_pw)
    resp, _ = c.request("GET", "/folder/INBOX")
    assert resp.status == 303 and resp.getheader("Location") == "/login"
    assert c.login(pat, old_pw)[0].status == 403
    assert c.login(pat, new_pw)[0].status == 303
    assert c.request("GET", "/folder/INBOX")[0].status == 200
    world["srv"].admin("mailbox", "lock", pat)
    try:
        assert c.request("GET", "/folder/INBOX")[0].status == 303
        assert c.login(pat, new_pw)[0].status == 403
    finally:
        world["srv"].admin("mailbox", "unlock", pat)
    assert c.login(pat, new_pw)[0].status == 303
    assert "session of pat@pop.contoso.test ended" in world["srv"].log_text()


def test_a_forward_rule_to_an_idn_domain_is_stored_as_a_labels(world):
    """A settings rule forwarding to ``user@bücher.example`` is stored in the Sieve script
    with the domain's A-labels (``xn--bcher-kva.example``, RFC 5890), the form the envelope
    and the smart host take, never as typed."""
    quinn, pw = "quinn@pop.contoso.test", "quinn-web-Secret-7"
    world["secrets"].append(pw)
    world["srv"].add_mailbox(quinn, pw)
    c = Http(world)
    assert c.login(quinn, pw)[0].status == 303
    _, page = c.request("GET", "/settings")
    resp, _ = c.request("POST", "/settings", {
        "csrf_token": c.token(page), "days": "7", "rule_field": "subject",
        "rule_text": "invoice", "rule_action": "redirect",
        "rule_target": "Kim <kim@b\u00fccher.example>"})
    assert resp.status == 303
    box = world["srv"].state_dir / "mailroot" / "pop.contoso.test" / "quinn"
    text = "".join(p.read_text("utf-8") for p in box.rglob("*.sieve"))
    assert 'redirect "kim@xn--bcher-kva.example";' in text and "b\u00fccher" not in text


def test_cookie_attributes_on_the_wire(world):
    """The session cookie is HttpOnly, SameSite=Strict, with a Path (no Secure on a plain
    loopback listener, where the browser would never send it back)."""
    conn = http.client.HTTPConnection("127.0.0.1", world["srv"].port("web"), timeout=30)
    conn.request("GET", "/login")
    resp = conn.getresponse()
    resp.read()
    cookie = resp.getheader("Set-Cookie")
    conn.close()
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie


class SourcePOP3(poplib.POP3):
    """poplib from a chosen loopback source address."""

    def _create_socket(self, timeout):  # noqa: N802 (poplib's name)
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(OTHER_SOURCE, 0))


def test_web_login_failures_count_in_pops_throttle(world):
    """Web log-in failures from an address go into POP3's failed-log-in table: after two of
    them (answered after 0.3 and 0.6 s, pop3.auth_failure_delay = 0.3s, doubling), a wrong
    POP3 password from that address is the third failure of the row and waits 1.2 s (a
    fresh address waits 0.3 s: a lower bound, the server's own delay, which load only
    lengthens); a POP3 success then lets the web log-in in (that a success clears the row is
    proved on a task.Clock in tests/unit; how long anything takes is for bench/)."""
    c = Http(world, OTHER_SOURCE)
    for _ in range(2):
        resp, page = c.login(TED, "wrong-password")
        assert resp.status == 403 and "not right" in page
    pop = SourcePOP3("127.0.0.1", world["srv"].port("pop3"), timeout=30)
    pop.user(TED)
    started = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop.pass_("wrong-password")
    waited = time.monotonic() - started
    pop.quit()
    assert waited >= 1.1, f"POP3 did not see the web failures ({waited:.2f}s)"
    pop = SourcePOP3("127.0.0.1", world["srv"].port("pop3"), timeout=30)
    pop.user(TED)
    pop.pass_(TED_PW)
    pop.quit()
    resp, _ = c.login(TED, TED_PW)  # the POP3 success cleared the row
    assert resp.status == 303


def test_attachment_download_headers(world):
    """An attachment is served as a download (Content-Disposition: attachment) with its
    type, nosniff and a CSP that runs nothing, even when it is HTML."""
    msg = (b"From: x@example.org\r\nTo: amy@pop.contoso.test\r\nSubject: attached\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\n"
           b"Content-Type: text/plain\r\n\r\nsee attached\r\n--zz\r\nContent-Type: text/html\r\n"
           b"Content-Disposition: attachment; filename=\"evil.html\"\r\n\r\n"
           b"<script>alert(1)</script>\r\n--zz--\r\n")
    smtp_deliver(world, "x@example.org", AMY, msg)
    c = Http(world)
    c.login(AMY, AMY_PW)
    _, page = c.request("GET", "/folder/INBOX")
    uid = re.search(r'/msg/INBOX/(\d+)"', page).group(1)
    _, page = c.request("GET", f"/msg/INBOX/{uid}")
    link = re.search(r'href="(/msg/INBOX/\d+/part/\d+)"', page).group(1)
    resp, body = c.request("GET", link)
    assert resp.status == 200 and "<script>" in body
    assert resp.getheader("Content-Disposition").startswith("attachment;")
    assert "evil.html" in resp.getheader("Content-Disposition")
    assert resp.getheader("Content-Type").startswith("text/html")
    assert resp.getheader("X-Content-Type-Options") == "nosniff"
    assert "sandbox" in resp.getheader("Content-Security-Policy")


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser(world):
    drv = headless_chrome(1100, 760)
    yield drv
    drv.quit()


def shot(drv, name: str) -> Path:
    path = artifacts() / f"webmail-{name}.png"
    drv.save_screenshot(str(path))
    return path


def browser_login(drv, world, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    drv.delete_all_cookies()
    drv.get(base(world) + "/login")
    drv.find_element(By.ID, "username").send_keys(user)
    drv.find_element(By.ID, "password").send_keys(password)
    shot(drv, "login")
    drv.find_element(By.ID, "login").click()
    wait_for(drv, lambda: "/folder/INBOX" in drv.current_url, 20, "the inbox after log-in")
    for c in drv.get_cookies():
        world["secrets"].append(c["value"])


def test_browser_login_and_read_a_message_delivered_by_smtp(world, browser):
    """A message delivered over SMTP shows in the inbox list as unread; the browser logs
    in, opens it, sees its text; the message is then \\Seen on disk (Maildir :2,S)."""
    from selenium.webdriver.common.by import By

    smtp_deliver(world, "carol@example.org", TED,
                 b"From: Carol <carol@example.org>\r\nTo: ted@pop.contoso.test\r\n"
                 b"Subject: Quarterly numbers\r\nDate: Mon, 30 Nov 2026 09:00:00 +0000\r\n\r\n"
                 b"Hello Ted,\r\nthe numbers are attached in spirit.\r\n")
    browser_login(browser, world, TED, TED_PW)
    row = browser.find_element(By.CSS_SELECTOR, "tr.unread td.subject a")
    assert row.text == "Quarterly numbers"
    shot(browser, "inbox")
    row.click()
    wait_for(browser, lambda: browser.find_elements(By.ID, "textbody"), 20, "the message page")
    assert "the numbers are attached in spirit." in browser.find_element(By.ID, "textbody").text
    shot(browser, "read")
    cur = world["srv"].state_dir / "mailroot" / "pop.contoso.test" / "ted" / "cur"
    assert any(n.endswith(":2,S") for n in os.listdir(cur))
    browser.set_window_size(360, 740)  # a phone
    try:
        browser.get(base(world) + "/folder/INBOX")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 360, f"the page is {width}px wide on a 360px screen"
        shot(browser, "phone")
    finally:
        browser.set_window_size(1100, 760)


def test_browser_html_message_runs_nothing_and_loads_no_remote_image(world, browser):
    """An HTML message with a script, event handlers and a remote image: the script does
    not run (the page and frame titles stay), no handler fires, the image host gets no
    request; after "show images" it gets one (so the check can see a request)."""
    from selenium.webdriver.common.by import By

    img = f"http://127.0.0.1:{world['images'].port}/track.png"
    html = (f'<html><head><title>mail</title></head><body><p id="p">Hello</p>'
            f'<script>document.title="pwned";parent.document.title="pwned"</script>'
            f'<img src="x" onerror="parent.document.title=\'pwned\'">'
            f'<img src="{img}">'
            f'<svg onload="parent.document.title=\'pwned\'"></svg>'
            f'<a href="javascript:parent.document.title=\'pwned\'" id="js">click</a>'
            f'</body></html>')
    smtp_deliver(world, "spam@example.org", TED,
                 ("From: spam@example.org\r\nTo: ted@pop.contoso.test\r\nSubject: Shiny\r\n"
                  "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
                  + html + "\r\n").encode())
    browser_login(browser, world, TED, TED_PW)
    browser.find_element(By.LINK_TEXT, "Shiny").click()
    wait_for(browser, lambda: browser.find_elements(By.ID, "htmlbody"), 20, "the HTML frame")
    title = browser.title
    frame = browser.find_element(By.ID, "htmlbody")
    browser.switch_to.frame(frame)
    wait_for(browser, lambda: browser.find_elements(By.ID, "p") or
               browser.find_elements(By.TAG_NAME, "p"), 20, "the frame's content")
    assert "Hello" in browser.find_element(By.TAG_NAME, "body").text
    assert not browser.find_elements(By.TAG_NAME, "script")
    assert not browser.find_elements(By.TAG_NAME, "svg")
    browser.switch_to.default_content()
    assert title == browser.title == "Shiny - Mail"
    assert browser.find_element(By.ID, "images-blocked").is_displayed()
    shot(browser, "html-blocked")
    assert world["images"].hits == []
    browser.find_element(By.ID, "show-images").click()
    wait_until(lambda: world["images"].hits, 20, "the image request after 'show images'")
    assert browser.title == "Shiny - Mail"


def test_browser_send_reaches_the_smart_host(world, browser):
    """Compose in the browser, with an attachment: the message leaves through the submission
    path to the aiosmtpd smart host, From the user, and a copy lands in Sent."""
    from selenium.webdriver.common.by import By

    upload = artifacts() / "webmail-upload.txt"
    upload.write_text("attached from the browser\n")
    before = len(world["smarthost"].received)
    browser_login(browser, world, TED, TED_PW)
    browser.find_element(By.ID, "nav-compose").click()
    present(browser, By.ID, "to").send_keys("Partner <partner@example.org>")
    browser.find_element(By.ID, "subject").send_keys("Web mail works")
    browser.find_element(By.ID, "body").send_keys("Sent from the browser.\n.leading dot\n")
    browser.find_element(By.ID, "attachments").send_keys(str(upload))
    shot(browser, "compose")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, lambda: "Message sent" in browser.page_source, 20, "the sent notice")
    got = world["smarthost"].wait_for(before + 1)[-1]
    assert got.mail_from == TED and got.rcpt_tos == ["partner@example.org"]
    assert b"Subject: Web mail works" in got.content
    assert b"attached from the browser" in got.content or b"YXR0YWNoZWQ" in got.content
    assert b"\r\n.leading dot" in got.content
    assert inbox_count(world, "ted", ".Sent") >= 1
    shot(browser, "sent")


def test_browser_out_of_office_answers(world, browser):
    """The settings page turns the out-of-office reply on (a Sieve vacation script); mail
    from outside then gets the reply, through the smart host, with the subject set."""
    from selenium.webdriver.common.by import By

    browser_login(browser, world, TED, TED_PW)
    browser.find_element(By.ID, "nav-settings").click()
    present(browser, By.ID, "vacation").click()
    browser.find_element(By.ID, "vsubject").send_keys("Away until Monday")
    browser.find_element(By.ID, "vtext").send_keys("I am out of the office.")
    shot(browser, "settings")
    browser.find_element(By.ID, "save-settings").click()
    wait_for(browser, lambda: "Settings saved" in browser.page_source, 20, "the saved notice")
    before = len(world["smarthost"].received)
    smtp_deliver(world, "client@example.org", TED,
                 b"From: client@example.org\r\nTo: ted@pop.contoso.test\r\n"
                 b"Subject: Are you there?\r\nMessage-ID: <q1@example.org>\r\n\r\nHello\r\n")
    reply = world["smarthost"].wait_for(before + 1, 30)[-1]
    assert reply.rcpt_tos == ["client@example.org"]
    assert b"Away until Monday" in reply.content and b"out of the office" in reply.content
    script = (world["srv"].state_dir / "mailroot" / "pop.contoso.test" / "ted")
    assert any("vacation" in p.read_text() for p in script.rglob("*.sieve"))
