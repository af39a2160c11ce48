"""End to end: both seed scenarios with two real twistd processes (gateway and POP3 server),
started from etc/examples/ (ports templated with OS-picked ones), slapd as the directory
(loaded from the example LDIF), an aiosmtpd "Internet" peer, and real clients (smtplib as the
Internet sender, swaks for POP3 users sending with AUTH, poplib and curl for reading).

Nothing sleeps for a fixed time: every wait polls with a deadline.
"""

from __future__ import annotations

import os
import poplib
import re
import smtplib
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.programs import free_port, require_program
from tests.support.server import admin_path
from tests.support.slapd import ADMIN_DN, BASE_DN, SERVICE_DN, SERVICE_PASSWORD, Slapd, ssha
from tests.support.smarthost import SmartHost, wait_until
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "etc" / "examples"
ADMIN_PASSWORD = "admin-secret"  # the slapd fixture's rootpw
PASSWORDS = {
    SERVICE_DN: SERVICE_PASSWORD,
    f"cn=Alice Ciccu,ou=people,{BASE_DN}": "alice-Secret-1",
    f"cn=POP3 Relay,ou=service,{BASE_DN}": "relay-Secret-2 (never expires)",
    f"cn=Ted Bremer,ou=people,{BASE_DN}": "Ted's p@ss (1)*",
    f"cn=Kim Akers,ou=people,{BASE_DN}": "kim-Secret-3",
    f"cn=Mail Admin,ou=people,{BASE_DN}": "admin-Secret-4",
}
TED_PW = PASSWORDS[f"cn=Ted Bremer,ou=people,{BASE_DN}"]
KIM_PW = PASSWORDS[f"cn=Kim Akers,ou=people,{BASE_DN}"]
ALICE_PW = PASSWORDS[f"cn=Alice Ciccu,ou=people,{BASE_DN}"]
INTERNET_SENDER = "carol@example.org"


@dataclass(frozen=True)
class Scenario:
    name: str
    gw_domain: str  # the gateway's (shared or Exchange) domain
    pop_domain: str  # the POP3 server's domain
    masquerade: bool  # POP3 users leave as user@gw_domain


SCENARIOS = [
    Scenario("shared-domain", "northwindtraders.test", "pop.northwindtraders.test", True),
    Scenario("different-domains", "exchange.northwindtraders.test", "pop.contoso.test", False),
]


class ExampleSlapd(Slapd):
    """slapd loaded from an example LDIF, with the test passwords set on its accounts."""

    def __init__(self, workdir: Path, ldif: Path) -> None:
        self.example_ldif = ldif
        super().__init__(workdir, users={})

    def _load(self) -> None:
        out = []
        for line in self.example_ldif.read_text().splitlines():
            if line.startswith("userPassword:"):
                continue
            out.append(line)
            if line.startswith("dn: ") and line[4:] in PASSWORDS:
                out.append(f"userPassword: {ssha(PASSWORDS[line[4:]])}")
        path = self.workdir / "data.ldif"
        path.write_text("\n".join(out) + "\n")
        subprocess.run([self.slapadd, "-q", "-f", str(self.conf), "-l", str(path)],
                       check=True, capture_output=True, timeout=60)


def template(text: str, replacements: dict[str, str]) -> str:
    """Replace each exact string (it must be there: the examples and this test stay in step)."""
    for old, new in replacements.items():
        assert old in text, f"the example no longer contains {old!r}"
        text = text.replace(old, new)
    return text


class Pair:
    """The running set-up of one scenario."""

    def __init__(self, sc: Scenario, root: Path) -> None:
        self.sc = sc
        self.root = root
        (root / "slapd").mkdir()
        self.slapd = ExampleSlapd(root / "slapd", EXAMPLES / sc.name / "directory.ldif")
        self.internet = SmartHost(hostname="mx.example.org").start()
        self.gw_port = free_port()
        self.pop_port = free_port()
        self.gateway = make_server(root / "gateway", tls=False)
        self.pop3 = make_server(root / "pop3", tls=False)

    def write_configs(self) -> None:
        sc = self.sc
        loop_a, loop_b = f"loop-a.{sc.pop_domain}", f"loop-b.{sc.pop_domain}"
        gw_text = template((EXAMPLES / sc.name / "gateway.toml").read_text(), {
            'state_dir = "var/gateway"': 'state_dir = "../var"',
            '"var/gateway/tls/cert.pem"': '"../var/tls/cert.pem"',
            '"var/gateway/tls/key.pem"': '"../var/tls/key.pem"',
            '"tcp:1111:interface=127.0.0.1"': '"tcp:0:interface=127.0.0.1"',
            '"tcp:2526:interface=127.0.0.1"': f'"tcp:{self.gw_port}:interface=127.0.0.1"',
            'url = "ldap://127.0.0.1:3389"': f'url = "{self.slapd.url}"',
            '"[127.0.0.1]:2525"': f'"[127.0.0.1]:{self.pop_port}"',
            'host = ""': f'host = "{self.internet.hop}"',
        })
        # a deliberately looping pair: loop-a is caught by the "came from" rule at RCPT,
        # loop-b (the peer's name is wrong) only by hop counting; loop-self points at
        # the gateway itself
        gw_text += f"""
[[gateway.connectors]]
name = "loop A"
address_spaces = ["{loop_a}"]
next_hops = ["[127.0.0.1]:{self.pop_port}"]
allow_relay = true
peer_hostname = "{sc.pop_domain}"

[[gateway.connectors]]
name = "loop B"
address_spaces = ["{loop_b}"]
next_hops = ["[127.0.0.1]:{self.pop_port}"]
allow_relay = true
peer_hostname = "not-the-pop3-server.test"

[[gateway.connectors]]
name = "myself"
address_spaces = ["loop-self.{sc.gw_domain}"]
next_hops = ["[127.0.0.1]:{self.gw_port}"]
allow_relay = true
peer_hostname = "gw.{sc.gw_domain}"
"""
        pop_text = template((EXAMPLES / sc.name / "mailbox.toml").read_text(), {
            'state_dir = "var/pop3"': 'state_dir = "../var"',
            '"tcp:1110:interface=127.0.0.1"': '"tcp:0:interface=127.0.0.1"',
            '"tcp:2525:interface=127.0.0.1"': f'"tcp:{self.pop_port}:interface=127.0.0.1"',
            '"tcp:2587:interface=127.0.0.1"': '"tcp:0:interface=127.0.0.1"',
            'url = "ldap://127.0.0.1:3389"': f'url = "{self.slapd.url}"',
            '"[127.0.0.1]:2526"': f'"[127.0.0.1]:{self.gw_port}"',
        })
        pop_text = pop_text.replace("[relay]", f"""[[domains.remote]]
name = "{loop_a}"
relay = true
route = "[127.0.0.1]:{self.gw_port}"

[[domains.remote]]
name = "{loop_b}"
relay = true
route = "[127.0.0.1]:{self.gw_port}"

[relay]""", 1)
        for server, text in ((self.gateway, gw_text), (self.pop3, pop_text)):
            etc = server.config_path.parent
            etc.mkdir(parents=True, exist_ok=True)
            server.config_path.write_text(text)
            (etc / "ldap-bind.secret").write_text(SERVICE_PASSWORD + "\n")
        (self.gateway.config_path.parent / "ldap-update.secret").write_text(ADMIN_PASSWORD + "\n")
        (self.pop3.config_path.parent / "smarthost.secret").write_text(
            PASSWORDS[f"cn=POP3 Relay,ou=service,{BASE_DN}"] + "\n")

    def start(self) -> None:
        self.slapd.start()
        self.write_configs()
        self.policy_output = self.gateway.admin("policy", "apply").stdout
        # Only the Exchange user has a mailbox on the gateway: the relay account is "a valid
        # Active Directory user account" and nothing more (it logs in without a mailbox).
        self.gateway.admin("mailbox", "add", f"alice@{self.sc.gw_domain}")
        for user in ("ted", "kim"):
            self.pop3.admin("mailbox", "add", f"{user}@{self.sc.pop_domain}")
        for attempt in range(3):
            try:
                self.gateway.start()
                self.pop3.start()
                return
            except AssertionError:
                # a port picked for the SMTP listeners was taken meanwhile: pick others
                self.gateway.stop()
                self.pop3.stop()
                if attempt == 2:
                    raise
                self.gw_port, self.pop_port = free_port(), free_port()
                self.write_configs()

    def stop(self) -> None:
        for part in (self.pop3, self.gateway):
            part.stop()
        self.internet.stop()
        self.slapd.stop()

    # -- clients
    def internet_send(self, rcpt: str, subject: str, port: int | None = None) -> dict:
        """The Internet sends one message to the gateway (anonymous, as an MX would)."""
        msg = (f"From: {INTERNET_SENDER}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n"
               f"Hello from the Internet ({subject}).\r\n")
        with smtplib.SMTP("127.0.0.1", port or self.gw_port, local_hostname="mx.example.org",
                          timeout=30) as s:
            return s.sendmail(INTERNET_SENDER, [rcpt], msg)

    def pop3_messages(self, user: str, password: str, server=None, role: str = "pop3") -> list[bytes]:
        server = server or self.pop3
        p = poplib.POP3("127.0.0.1", server.port(role), timeout=30)
        try:
            p.user(user)
            p.pass_(password)
            count, _ = p.stat()
            return [b"\n".join(p.retr(i)[1]) for i in range(1, count + 1)]
        finally:
            p.quit()

    def wait_pop3(self, user: str, password: str, needle: str, server=None,
                  timeout: float = 30.0) -> bytes:
        def find():
            for m in self.pop3_messages(user, password, server):
                if needle.encode() in m:
                    return m
            return None

        return wait_until(find, timeout, f"{needle!r} in the mailbox of {user}")

    def wait_internet(self, predicate, what: str, timeout: float = 30.0):
        try:
            return wait_until(
                lambda: next((r for r in list(self.internet.received) if predicate(r)), None),
                timeout, what)
        except AssertionError:
            for r in self.internet.received:
                print("at the Internet peer:", r.mail_from, r.rcpt_tos, r.content[:300])
            raise

    def swaks(self, user: str, password: str, to: str, subject: str,
              port: int | None = None, sender: str | None = None,
              tls: bool = False) -> subprocess.CompletedProcess:
        """swaks with AUTH LOGIN to the POP3 server's submission port (or ``port``)."""
        swaks = require_program("swaks")
        return subprocess.run(
            [swaks, "--server", f"127.0.0.1:{port or self.pop3.port('submission')}",
             *(["--tls"] if tls else []), "--auth", "LOGIN",
             "--auth-user", user, "--from", sender or user, "--to", to,
             "--h-Subject", subject, "--body", f"Sent by {user} ({subject}).",
             "--helo", "client.example.test", "--timeout", "30"],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, SWAKS_OPT_auth_password=password),  # never in argv
        )


@pytest.fixture(scope="module", params=SCENARIOS, ids=[s.name for s in SCENARIOS])
def pair(request, tmp_path_factory):
    require_program("slapd", "/usr/sbin/slapd")
    sc = request.param
    p = Pair(sc, tmp_path_factory.mktemp(sc.name))
    try:
        p.start()
        yield p
    except Exception:
        for part in (p.gateway, p.pop3):
            print(f"--- {part.root.name} log\n{part.log_tail(60)}")
        raise
    finally:
        p.stop()


def test_internet_to_pop3_user_read_by_poplib_and_curl(pair) -> None:
    """Internet -> gateway (targetAddress in the directory) -> connector -> POP3 server; the
    message is read by poplib and by curl. Prints the end-to-end latency."""
    sc = pair.sc
    rcpt = f"ted@{sc.gw_domain}" if sc.masquerade else f"ted@{sc.pop_domain}"
    t0 = time.monotonic()
    assert pair.internet_send(rcpt, "inbound-1") == {}
    msg = pair.wait_pop3(f"ted@{sc.pop_domain}", TED_PW, "inbound-1")
    latency = time.monotonic() - t0
    print(f"\n[{sc.name}] Internet -> gateway -> POP3 server -> poplib RETR: {latency * 1000:.0f} ms")
    assert msg.count(b"Received: from") >= 2  # the gateway's and the POP3 server's
    curl = require_program("curl")
    with tempfile.TemporaryDirectory() as tmp:
        netrc = Path(tmp) / "netrc"  # the password reaches curl through a file, not argv
        netrc.write_text(f"machine 127.0.0.1 login ted@{sc.pop_domain} password \"{TED_PW}\"\n")
        netrc.chmod(0o600)
        out = subprocess.run(
            [curl, "-s", "--max-time", "30", "--netrc-file", str(netrc),
             f"pop3://127.0.0.1:{pair.pop3.port('pop3')}/1"],
            capture_output=True, timeout=60,
        )
    assert out.returncode == 0 and b"inbound-1" in out.stdout


def test_pop3_user_sends_to_the_internet_through_the_gateway(pair) -> None:
    """A POP3 user sends with swaks (AUTH) to the POP3 server, which relays through the gateway
    (AUTH as the relay account) to the Internet; in the shared-domain scenario the sender
    arrives masqueraded as user@northwindtraders.test (envelope and From:)."""
    sc = pair.sc
    r = pair.swaks(f"ted@{sc.pop_domain}", TED_PW, "bob@example.org", "outbound-1")
    assert r.returncode == 0, r.stdout + r.stderr
    got = pair.wait_internet(lambda m: b"outbound-1" in m.content, "the message at the Internet peer")
    expected = f"ted@{sc.gw_domain}" if sc.masquerade else f"ted@{sc.pop_domain}"
    assert got.mail_from == expected
    assert got.rcpt_tos == ["bob@example.org"]
    if sc.masquerade:
        assert re.search(rb"(?m)^From: ted@northwindtraders\.test", got.content)
    # the POP3 server relayed through the gateway as its directory account, over STARTTLS
    assert f"SMTP AUTH ok for pop3relay@{sc.gw_domain}" in pair.gateway.log_text()
    logs = pair.pop3.log_text() + pair.gateway.log_text()
    assert TED_PW not in logs and PASSWORDS[f"cn=POP3 Relay,ou=service,{BASE_DN}"] not in logs


def test_pop3_user_sends_through_the_gateway_with_own_login(pair) -> None:
    """The seed's optional step 3: a POP3 user's client uses the gateway as its SMTP server,
    with the same log-in as for POP3 (full address, directory password). The user has no
    mailbox on the gateway, and in the different-domains scenario no address in its domains:
    AUTH still succeeds (235, no 454, no 535), the message reaches the Internet, and the
    gateway logs nothing as critical. POP3 at the gateway refuses the user (no mailbox)."""
    sc = pair.sc
    r = pair.swaks(f"ted@{sc.pop_domain}", TED_PW, "dave@example.org", "via-gateway-1",
                   port=pair.gw_port, tls=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0" in r.stdout
    got = pair.wait_internet(lambda m: b"via-gateway-1" in m.content, "the message at the Internet peer")
    assert got.mail_from == f"ted@{sc.pop_domain}"
    assert got.rcpt_tos == ["dave@example.org"]
    with pytest.raises(poplib.error_proto) as e:
        pair.pop3_messages(f"ted@{sc.pop_domain}", TED_PW, server=pair.gateway)
    assert b"[AUTH]" in e.value.args[0]
    log = pair.gateway.log_text()
    assert "#critical]" not in log and "NoSuchMailbox" not in log
    assert TED_PW not in log


def test_pop3_user_writes_to_a_gateway_user(pair) -> None:
    """A POP3 user writes to a gateway (Exchange) user: POP3 server -> gateway -> the gateway's
    own Maildir, read there by POP3."""
    sc = pair.sc
    r = pair.swaks(f"kim@{sc.pop_domain}", KIM_PW, f"alice@{sc.gw_domain}", "to-alice-1")
    assert r.returncode == 0, r.stdout + r.stderr
    pair.wait_pop3(f"alice@{sc.gw_domain}", ALICE_PW, "to-alice-1", server=pair.gateway)


def test_unknown_user_of_gateway_domain_is_550_511(pair) -> None:
    """The gateway is authoritative for its domain: an unknown user gets 550 5.1.1 at RCPT."""
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        pair.internet_send(f"nobody@{pair.sc.gw_domain}", "unknown-1")
    code, text = e.value.recipients[f"nobody@{pair.sc.gw_domain}"]
    assert code == 550 and text.startswith(b"5.1.1")


def test_unknown_user_of_pop3_domain_gets_a_dsn(pair) -> None:
    """Mail for an unknown user of the POP3 domain is accepted by the gateway, refused by the
    POP3 server, and the Internet sender gets one delivery status notification (5.1.1)."""
    assert pair.internet_send(f"nobody@{pair.sc.pop_domain}", "unknown-2") == {}
    dsn = pair.wait_internet(lambda m: m.mail_from in ("", "<>") and b"unknown-2" in m.content,
                             "a DSN at the Internet peer")
    assert dsn.rcpt_tos == [INTERNET_SENDER]
    assert b"Status: 5.1.1" in dsn.content


def test_looping_pair_ends_with_a_dsn_not_a_storm(pair) -> None:
    """A looping pair of configs (each side routes the domain to the other) ends with one DSN
    (5.4.6) to the sender: caught by the "came from" rule, by hop counting, or (a connector to
    the gateway itself) by "loops back to myself"."""
    sc = pair.sc
    for i, domain in enumerate((f"loop-a.{sc.pop_domain}", f"loop-b.{sc.pop_domain}",
                                f"loop-self.{sc.gw_domain}")):
        subject = f"loop-{i}"
        before = len(pair.internet.received)
        assert pair.internet_send(f"x@{domain}", subject) == {}
        dsn = pair.wait_internet(lambda m, s=subject: m.mail_from in ("", "<>") and s.encode() in m.content,
                                 f"the DSN for {domain}", timeout=60)
        assert b"Status: 5.4.6" in dsn.content, dsn.content.decode(errors="replace")[:2000]
        # exactly one report, nothing else for this message
        related = [m for m in pair.internet.received[before:] if subject.encode() in m.content]
        assert len(related) == 1


def test_policy_apply_stamps_addresses_and_mail_to_the_new_one_arrives(pair) -> None:
    """policy apply (run at set-up) stamped the policies' addresses; a new POP3 user added to
    the directory gets its addresses from `policy apply` (--dry-run first writes nothing), and
    mail to the new secondary address then arrives at the POP3 server."""
    sc = pair.sc
    if not sc.masquerade:
        # the different-domains example has the default policy only: the Exchange users
        # already have its address, so nothing changes, and a dry run says so
        assert "changed 0 of" in pair.policy_output
        assert "would change 0 of" in pair.gateway.admin("policy", "apply", "--dry-run").stdout
        return
    # set-up stamped ted and kim with the shared secondary address: mail to it arrives
    assert "+smtp:ted@northwindtraders.test" in pair.policy_output
    assert pair.internet_send("kim@northwindtraders.test", "policy-1") == {}
    pair.wait_pop3(f"kim@{sc.pop_domain}", KIM_PW, "policy-1")

    newbie = f"cn=New Bie,ou=people,{BASE_DN}"
    pair.slapd.modify(
        f"dn: {newbie}\nchangetype: add\nobjectClass: top\nobjectClass: person\n"
        "objectClass: organizationalPerson\nobjectClass: user\ncn: New Bie\nsn: Bie\n"
        "givenName: New\nsAMAccountName: newbie\nuserAccountControl: 512\n"
        f"targetAddress: SMTP:newbie@{sc.pop_domain}\n"
    )
    # before apply the directory does not know newbie@ either domain
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        pair.internet_send("newbie@northwindtraders.test", "policy-early")
    dry = pair.gateway.admin("policy", "apply", "--dry-run").stdout
    assert f"{newbie} (policy 'POP User Addresses'): +SMTP:newbie@{sc.pop_domain} " \
           "+smtp:newbie@northwindtraders.test" in dry
    assert "would change 1 of" in dry
    again = pair.gateway.admin("policy", "apply", "--dry-run").stdout
    assert again == dry  # a dry run wrote nothing
    done = pair.gateway.admin("policy", "apply").stdout
    assert "changed 1 of" in done
    ldapsearch = require_program("ldapsearch")
    found = subprocess.run(
        [ldapsearch, "-x", "-LLL", "-H", pair.slapd.url, "-D", ADMIN_DN,
         "-y", str(pair.slapd.admin_secret_file),
         "-b", newbie, "-s", "base", "proxyAddresses"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert sorted(re.findall(r"(?m)^proxyAddresses: (.*)$", found)) == [
        f"SMTP:newbie@{sc.pop_domain}", "smtp:newbie@northwindtraders.test"]
    assert "changed 0 of" in pair.gateway.admin("policy", "apply").stdout  # idempotent
    pair.pop3.admin("mailbox", "add", f"newbie@{sc.pop_domain}")
    assert pair.internet_send("newbie@northwindtraders.test", "policy-2") == {}
    wait_until(
        lambda: any((pair.pop3.state_dir / "mailroot" / sc.pop_domain / "newbie" / "new").iterdir()),
        30, "the message in newbie's Maildir",
    )


def test_check_config_peer_refuses_a_shared_local_domain(pair, tmp_path) -> None:
    """check-config --peer accepts the example pair and refuses a POP3 server whose local
    domain is the gateway's authoritative shared domain, naming the seed's rule."""
    gw_cfg = str(pair.gateway.config_path)
    ok = pair.pop3.admin("check-config", "--peer", gw_cfg)
    assert ok.returncode == 0
    bad = pair.pop3.config_path.read_text().replace(
        f'local = ["{pair.sc.pop_domain}"]', f'local = ["{pair.sc.gw_domain}"]')
    bad = bad.replace(f'name = "{pair.sc.gw_domain}"\nrelay = true', 'name = "elsewhere.test"\nrelay = true')
    bad_path = pair.pop3.config_path.parent / "bad.toml"
    bad_path.write_text(bad.replace("[masquerade]\ndomain", "[masquerade]\n#domain").replace(
        "header_from = true", ""))
    r = subprocess.run([*admin_path(), "-c", str(bad_path), "check-config", "--peer", gw_cfg],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "must not share a mail domain" in r.stderr and pair.sc.gw_domain in r.stderr


def test_postmaster_mail_reaches_an_account_that_can_read_it(pair) -> None:
    """Known gap of the examples (issue 11 re-run, faults 1 and 14): followed to the letter,
    postmaster mail of both servers lands where a directory account reads it. The Internet
    writes to postmaster@ the POP3 domain (through the gateway's connector) and to
    <Postmaster> at the gateway (relayed by `domains.postmaster`); the mail administrator
    logs in to the POP3 server with the directory password and finds both; check-config on
    both example configs says where postmaster mail lands and warns about nothing."""
    sc = pair.sc
    admin_pw = PASSWORDS[f"cn=Mail Admin,ou=people,{BASE_DN}"]
    assert pair.internet_send(f"postmaster@{sc.pop_domain}", "pm-pop-1") == {}
    assert pair.internet_send("Postmaster", "pm-gw-1") == {}
    for needle in ("pm-pop-1", "pm-gw-1"):
        pair.wait_pop3(f"mailadmin@{sc.pop_domain}", admin_pw, needle)
    # the gateway's config without the deliberate loop connectors this module adds
    gw_text = pair.gateway.config_path.read_text()
    gw_cfg = pair.gateway.config_path.parent / "as-in-the-example.toml"
    gw_cfg.write_text(gw_text[:gw_text.index('[[gateway.connectors]]\nname = "loop A"')])
    for server, cfg in ((pair.pop3, pair.pop3.config_path), (pair.gateway, gw_cfg)):
        r = subprocess.run([*server.admin_command(), "-c", str(cfg), "check-config"],
                           capture_output=True, text=True, timeout=120, env=server.env())
        assert r.returncode == 0, r.stderr
        assert f"lands in <mailadmin@{sc.pop_domain}>" in r.stdout
        assert "warning" not in r.stderr, r.stderr


def test_check_config_warns_when_nobody_can_read_postmaster_mail(pair, tmp_path) -> None:
    """Issue 11 re-run: with auth.method = "directory", the built-in postmaster@ box (the
    default `domains.postmaster`) or an address no directory account owns can receive but
    never be read: check-config says so on stderr, naming the key and a fix; an address
    that belongs to another account names that account's mailbox. The exit status stays 0."""
    sc = pair.sc
    text = pair.pop3.config_path.read_text()
    cases = {
        "": f"postmaster mail lands in <postmaster@{sc.pop_domain}>, which no directory "
            f"account owns: it is kept, but nobody can log in to read it (auth.method = "
            f"\"directory\"). Point [domains] postmaster at an account that exists, for "
            f"example postmaster = \"admin@{sc.pop_domain}\"",
        f"nobody@{sc.pop_domain}": f"postmaster mail lands in <nobody@{sc.pop_domain}>, which "
                                   f"no directory account owns",
    }
    for value, expected in cases.items():
        cfg = pair.pop3.config_path.parent / f"check-{len(value)}.toml"
        cfg.write_text(text.replace(f'postmaster = "mailadmin@{sc.pop_domain}"',
                                    f'postmaster = "{value}"'))
        r = subprocess.run([*pair.pop3.admin_command(), "-c", str(cfg), "check-config"],
                           capture_output=True, text=True, timeout=120, env=pair.pop3.env())
        assert r.returncode == 0, r.stderr
        assert expected in r.stderr, r.stderr
