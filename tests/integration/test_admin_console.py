"""The admin console against two real servers (twistd): server A serves the console (its
own admin accounts, [metrics] on for the graphs) and manages server B, a ``[[admin_web.peers]]``
entry, through B's admin API with a token. Driven in Debian's Chromium by Selenium (headless;
chromedriver from the chromium-driver package, nothing downloaded) and at the HTTP level for
the checks a browser hides. Each page is saved as a PNG in the artifacts folder (env
``POP3COEXIST_ARTIFACTS``, default ``test-artifacts/``): ``console-<page>.png``.
"""

from __future__ import annotations

import http.client
import os
import poplib
import re
import urllib.parse
from pathlib import Path

import pytest

from tests.support.adminweb import admin_here, admin_web_server, make_token
from tests.support.browser import element_text, headless_chrome, wait_for
from tests.support.server import HOSTNAME, require_installed_plugin
from tests.support.smarthost import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240),
              pytest.mark.xdist_group("admin_web")]

ROOT = Path(__file__).resolve().parents[2]
ALICE, ALICE_PW = "alice", "alice-Console-Pw-1"
DAVE, DAVE_PW = f"dave@{HOSTNAME}", "dave-Mail-Pw-2"
ERIN = f"erin@{HOSTNAME}"


def artifacts() -> Path:
    d = Path(os.environ.get("POP3COEXIST_ARTIFACTS") or ROOT / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Server B (API only) and server A (console, peer B with B's token), both running, an
    administrator ``alice`` on A."""
    require_installed_plugin()
    root = tmp_path_factory.mktemp("console")
    b = admin_web_server(root / "b")
    b.write_config()
    token = make_token(b, "console-a")
    b.start()
    a = admin_web_server(root / "a", extra=(
        f'\n[[admin_web.peers]]\nname = "server-b"\nurl = "http://127.0.0.1:'
        f'{b.port("admin_web")}"\ntoken_file = "{token}"\n\n'
        '[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'))
    a.write_config()
    admin_here(a, "admin", "add", ALICE, "--password-stdin", stdin=ALICE_PW + "\n")
    a.start()
    try:
        yield a, b
    finally:
        a.stop_cleanly(ALICE_PW, DAVE_PW, "carol-Console-Pw-5", "carol-Console-Pw-6",
                       token.read_text().strip())
        b.stop_cleanly(token.read_text().strip())


def base(server) -> str:
    return f"http://127.0.0.1:{server.port('admin_web')}"


class Http:
    """A cookie-keeping HTTP client for the console (the checks a browser hides)."""

    def __init__(self, server) -> None:
        self.port = server.port("admin_web")
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read().decode("utf-8", "replace")
        for value in resp.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        conn.close()
        return resp, data

    def token(self, page: str) -> str:
        return re.search(r'name="csrf_token" value="([^"]+)"', self.request("GET", page)[1])[1]


def test_console_refuses_mail_accounts_forms_without_csrf_and_anonymous_changes(pair):
    """A mail account cannot log in to the console (separate accounts); a change without a
    CSRF token is refused (403) and changes nothing; an anonymous change is refused; a GET
    without a session goes to the log-in page."""
    a, _ = pair
    admin_here(a, "mailbox", "add", ERIN, "--password-stdin", stdin="erin-Mail-Pw-3\n")
    client = Http(a)
    resp, _ = client.request("GET", "/mailboxes")
    assert resp.status == 303 and resp.headers["Location"] == "/login"
    resp, page = client.request("POST", "/login", {"csrf_token": client.token("/login"),
                                                   "username": ERIN,
                                                   "password": "erin-Mail-Pw-3"})
    assert resp.status == 200 and "Wrong administrator name or password" in page
    resp, _ = client.request("POST", "/do/mailbox.lock", {"csrf_token": client.token("/login"),
                                                          "address": ERIN})
    assert resp.status == 403
    resp, _ = client.request("POST", "/login", {"csrf_token": client.token("/login"),
                                                "username": ALICE, "password": ALICE_PW})
    assert resp.status == 303
    resp, _ = client.request("POST", "/do/mailbox.lock", {"address": ERIN, "back": "/mailboxes"})
    assert resp.status == 403
    assert f"{ERIN} (locked)" not in admin_here(a, "mailbox", "list")
    resp, page = client.request("GET", "/stat")
    assert resp.status == 200 and ERIN in page
    assert "script-src" in resp.headers["Content-Security-Policy"] \
        and "<script" not in page


def test_a_new_password_or_removal_ends_the_administrators_console_session(pair):
    """The console asks for the administrator's credential stamp at every page: after
    ``pop3coexist-admin admin passwd`` the session logged in with the old password goes to
    the log-in page, the new password logs in, and ``admin remove`` ends that session too."""
    a, _ = pair
    carol, old_pw, new_pw = "carol", "carol-Console-Pw-5", "carol-Console-Pw-6"
    admin_here(a, "admin", "add", carol, "--password-stdin", stdin=old_pw + "\n")
    client = Http(a)

    def log_in(password: str) -> int:
        return client.request("POST", "/login", {"csrf_token": client.token("/login"),
                                                 "username": carol,
                                                 "password": password})[0].status

    assert log_in(old_pw) == 303 and client.request("GET", "/stat")[0].status == 200
    admin_here(a, "admin", "passwd", carol, "--password-stdin", stdin=new_pw + "\n")
    resp, _ = client.request("GET", "/stat")
    assert resp.status == 303 and resp.headers["Location"] == "/login"
    assert log_in(old_pw) == 200  # the form again: wrong password
    assert log_in(new_pw) == 303 and client.request("GET", "/stat")[0].status == 200
    admin_here(a, "admin", "remove", carol)
    assert client.request("GET", "/stat")[0].status == 303


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser(pair):
    """Headless Chromium, logged in to server A's console as alice."""
    from selenium.webdriver.common.by import By

    drv = headless_chrome(1200, 800)
    a, _ = pair
    drv.get(base(a) + "/login")
    drv.find_element(By.ID, "username").send_keys(ALICE)
    drv.find_element(By.ID, "password").send_keys(ALICE_PW)
    shot(drv, "login")
    drv.find_element(By.ID, "login").click()
    wait_for(drv, lambda: drv.current_url.endswith("/stat"), 20, "the overview after log-in")
    yield drv
    drv.quit()


def shot(drv, name: str) -> Path:
    path = artifacts() / f"console-{name}.png"
    drv.save_screenshot(str(path))
    return path


def notice(drv) -> str:
    """The page's notice or error line; "" while there is none or while a click's navigation
    replaces the page (``element_text``: the caller's wait asks again)."""
    from selenium.webdriver.common.by import By

    return element_text(drv, By.CSS_SELECTOR, "p.notice, p.error")


def test_browser_add_a_mailbox_lock_it_and_pop3_refuses_it(pair, browser):
    """In the console: add a mailbox with a password (POP3 log-in works), lock it with its
    row's button (POP3 then answers -ERR [AUTH]); the audit log names alice and the console."""
    from selenium.webdriver.common.by import By

    a, _ = pair
    drv = browser
    drv.get(base(a) + "/mailboxes")
    drv.find_element(By.ID, "mb-address").send_keys(DAVE)
    drv.find_element(By.ID, "mb-password").send_keys(DAVE_PW)
    drv.find_element(By.ID, "mailbox-add").click()
    wait_for(drv, lambda: f"mailbox {DAVE} added" in notice(drv), 20, "the added notice")
    pop = poplib.POP3("127.0.0.1", a.port("pop3"), timeout=10)
    pop.user(DAVE)
    assert pop.pass_(DAVE_PW).startswith(b"+OK")
    pop.quit()
    row = drv.find_element(By.ID, f"mailbox-{DAVE}")
    row.find_element(By.CSS_SELECTOR, "button[value=lock]").click()
    wait_for(drv, lambda: f"mailbox {DAVE} locked" in notice(drv), 20, "the locked notice")
    shot(drv, "mailboxes")
    pop = poplib.POP3("127.0.0.1", a.port("pop3"), timeout=10)
    pop.user(DAVE)
    with pytest.raises(poplib.error_proto) as refused:
        pop.pass_(DAVE_PW)
    assert refused.value.args[0].startswith(b"-ERR [AUTH]")
    pop.close()
    audit = (a.state_dir / "admin-audit.log").read_text()
    assert f"admin=alice via=console action=mailbox.lock target={DAVE} ok" in audit


def test_browser_flush_the_queue(pair, browser):
    """The queue page's flush button makes the running server's delivery runner retry now."""
    from selenium.webdriver.common.by import By

    a, _ = pair
    drv = browser
    drv.get(base(a) + "/queue")
    drv.find_element(By.ID, "queue-flush").click()
    wait_for(drv, lambda: "queue flush requested" in notice(drv), 20, "the flush notice")
    shot(drv, "queue")
    wait_until(lambda: "queue flush requested: retrying every message now" in a.log_text(), 20,
               "the delivery runner's flush")


def test_browser_every_page_and_the_graphs(pair, browser):
    """Every page renders (screenshot each); the graphs page draws SVG charts from samples of
    the queue length and the metrics counters, with no script on the page."""
    from selenium.webdriver.common.by import By

    a, _ = pair
    drv = browser
    for page in ("stat", "domains", "aliases", "quarantine", "nodes"):
        drv.get(base(a) + "/" + page)
        assert drv.find_element(By.ID, "server-label").text.startswith("Server:"), page
        shot(drv, page)

    def charted() -> bool:
        drv.get(base(a) + "/graphs")
        return len(drv.find_elements(By.CSS_SELECTOR, "svg.chart polyline")) >= 2

    wait_for(drv, charted, 20, "two charts with samples")
    assert len(drv.find_elements(By.CSS_SELECTOR, "svg.chart")) == 4
    assert not drv.find_elements(By.TAG_NAME, "script")
    shot(drv, "graphs")


def test_browser_manages_the_peer_server_through_its_api(pair, browser):
    """Picking server B in the server list, the console adds a mailbox there (B's own command
    lists it, A's does not); B's audit log shows A's token acting for alice."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    a, b = pair
    drv = browser
    drv.get(base(a) + "/mailboxes")
    Select(drv.find_element(By.ID, "server")).select_by_value("server-b")
    drv.find_element(By.ID, "pick").click()
    wait_for(drv, lambda: "server-b" in element_text(drv, By.ID, "server-label"), 20,
             "server B picked")
    drv.find_element(By.ID, "mb-address").send_keys(f"frank@{HOSTNAME}")
    drv.find_element(By.ID, "mb-password").send_keys("frank-Mail-Pw-4")
    drv.find_element(By.ID, "mailbox-add").click()
    wait_for(drv, lambda: f"mailbox frank@{HOSTNAME} added" in notice(drv), 20, "added on B")
    shot(drv, "peer")
    assert f"frank@{HOSTNAME}" in admin_here(b, "mailbox", "list")
    assert f"frank@{HOSTNAME}" not in admin_here(a, "mailbox", "list")
    audit = (b.state_dir / "admin-audit.log").read_text()
    assert (f"admin=console-a(for_alice@{HOSTNAME}) via=api action=mailbox.add "
            f"target=frank@{HOSTNAME} ok") in audit
    Select(drv.find_element(By.ID, "server")).select_by_value("")
    drv.find_element(By.ID, "pick").click()
    wait_for(drv, lambda: "this server" in element_text(drv, By.ID, "server-label"), 20,
             "server A picked again")
