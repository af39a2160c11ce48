"""A throw-away OpenLDAP ``slapd`` for the integration tier, with AD-style test users.

``Slapd(workdir)`` writes a slapd.conf (core, cosine, inetorgperson and the project's
``etc/ldap/pop3coexist-ad.schema``), an mdb database filled offline with ``slapadd`` from LDIF,
and a test CA with a server certificate (``tests/support/certs.py``). ``start()`` runs
``/usr/sbin/slapd`` in the foreground on OS-picked loopback ports, plain (``ldap://``, with
StartTLS) and ``ldaps://``; ``stop()`` ends it, ``restart()`` brings it back on the same ports
with the same data. ``modify(ldif)`` changes entries while it runs (``ldapmodify``).

The pytest fixture ``slapd`` (module scope) gives a running server with ``DIRECTORY_USERS``;
tests that stop it must start it again (``slapd.ensure_running()`` in their teardown).
Missing programs skip the test on a developer's machine and fail it in CI.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from zope.interface import implementer

from pop3coexist.interfaces import IAccountChecker
from tests.support.certs import make_ca_and_cert
from tests.support.programs import free_ports, require_program

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "etc" / "ldap" / "pop3coexist-ad.schema"
BASE_DN = "dc=northwindtraders,dc=test"
ADMIN_DN = f"cn=admin,{BASE_DN}"
SERVICE_DN = f"cn=pop3coexist,ou=service,{BASE_DN}"
GROUP_DN = f"cn=POP3 Users,ou=groups,{BASE_DN}"
LOCAL_DOMAINS = ("pop.contoso.test", "fabrikam.test")
SYSTEM_SCHEMA = Path("/etc/ldap/schema")


def ssha(password: str) -> str:
    """An OpenLDAP {SSHA} userPassword value."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


@dataclass
class DirectoryUser:
    """One test entry; ``kind`` is the AD object class (user or contact)."""

    cn: str
    password: str | None = None
    sam: str | None = None
    upn: str | None = None
    mail: str | None = None
    proxies: list[str] = field(default_factory=list)
    target: str | None = None
    uac: int | None = 512
    groups: list[str] = field(default_factory=list)
    kind: str = "user"
    ou: str = "people"

    @property
    def dn(self) -> str:
        return f"cn={self.cn},ou={self.ou},{BASE_DN}"

    def ldif(self) -> str:
        lines = [f"dn: {self.dn}", "objectClass: top", "objectClass: person",
                 "objectClass: organizationalPerson", f"objectClass: {self.kind}",
                 f"cn: {self.cn}", f"sn: {self.cn.split()[-1]}"]
        if self.password is not None:
            lines.append(f"userPassword: {ssha(self.password)}")
        for attr, value in (("sAMAccountName", self.sam), ("userPrincipalName", self.upn),
                            ("mail", self.mail), ("targetAddress", self.target)):
            if value is not None:
                lines.append(f"{attr}: {value}")
        if self.uac is not None and self.kind == "user":
            lines.append(f"userAccountControl: {self.uac}")
        lines += [f"proxyAddresses: {p}" for p in self.proxies]
        lines += [f"memberOf: {g}" for g in self.groups]
        return "\n".join(lines) + "\n"


SERVICE_PASSWORD = "svc-" + "Pa55w0rd!"
# Real-looking passwords with characters that often break quoting.
DIRECTORY_USERS: dict[str, DirectoryUser] = {
    # Ted: primary in pop.contoso.test, a secondary there, an address in the upstream domain.
    "ted": DirectoryUser(
        "Ted Bremer", "Ted's p@ss (1)*", sam="ted", upn="ted@northwindtraders.test",
        mail="ted@pop.contoso.test",
        proxies=["SMTP:Ted@pop.contoso.test", "smtp:theodore@pop.contoso.test",
                 "smtp:ted@northwindtraders.test", "X400:c=US;a= ;p=Northwind;o=Ex;s=Bremer;"],
        groups=[GROUP_DN],
    ),
    # A second "ted" in the other local domain: same name, different domain and account.
    "ted.f": DirectoryUser(
        "Ted Fabrikam", "fabrikam-Secret-2", sam="ted.f", upn="ted.f@northwindtraders.test",
        mail="ted@fabrikam.test", proxies=["SMTP:ted@fabrikam.test"], groups=[GROUP_DN],
    ),
    # Primary address differs from mail; log-in with the short name or any address.
    "kim": DirectoryUser(
        "Kim Akers", "kim-Secret-3", sam="kim", upn="kim.akers@northwindtraders.test",
        mail="kim.akers@northwindtraders.test",
        proxies=["SMTP:kim@pop.contoso.test", "smtp:kim.akers@pop.contoso.test"], groups=[GROUP_DN],
    ),
    "dora": DirectoryUser(  # disabled account (userAccountControl 514 = 512 | 0x2)
        "Dora Disabled", "dora-Secret-4", sam="dora", upn="dora@northwindtraders.test",
        mail="dora@pop.contoso.test", proxies=["SMTP:dora@pop.contoso.test"], uac=514, groups=[GROUP_DN],
    ),
    "lou": DirectoryUser(  # locked out (0x10)
        "Lou Locked", "lou-Secret-5", sam="lou", upn="lou@northwindtraders.test",
        mail="lou@pop.contoso.test", proxies=["SMTP:lou@pop.contoso.test"], uac=512 | 0x10, groups=[GROUP_DN],
    ),
    "nora": DirectoryUser(  # not in the required group
        "Nora Nogroup", "nora-Secret-6", sam="nora", upn="nora@northwindtraders.test",
        mail="nora@pop.contoso.test", proxies=["SMTP:nora@pop.contoso.test"],
    ),
    "far": DirectoryUser(  # no address in a local domain: no mailbox here
        "Far Away", "far-Secret-7", sam="far", upn="far@northwindtraders.test",
        mail="far@elsewhere.test", proxies=["SMTP:far@elsewhere.test"], groups=[GROUP_DN],
    ),
    "dup1": DirectoryUser(  # two entries claim dup@pop.contoso.test: ambiguous, refused
        "Dup One", "dup-Secret-8", sam="dup1", mail="dup@pop.contoso.test", groups=[GROUP_DN],
    ),
    "dup2": DirectoryUser(
        "Dup Two", "dup-Secret-8", sam="dup2", proxies=["smtp:dup@pop.contoso.test"], groups=[GROUP_DN],
    ),
    "contact": DirectoryUser(  # a contact: mail goes to targetAddress; cannot log in
        "Ext Contact", None, mail="ext@northwindtraders.test",
        proxies=["SMTP:ext@northwindtraders.test"], target="SMTP:ext.person@external.test",
        kind="contact", uac=None, ou="contacts",
    ),
}


def base_ldif(users: dict[str, DirectoryUser]) -> str:
    parts = [
        f"dn: {BASE_DN}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\n"
        "o: Northwind Traders\ndc: northwindtraders\n",
    ]
    for ou in ("service", "people", "contacts", "groups"):
        parts.append(f"dn: ou={ou},{BASE_DN}\nobjectClass: organizationalUnit\nou: {ou}\n")
    parts.append(
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: pop3coexist\nuserPassword: {ssha(SERVICE_PASSWORD)}\n"
    )
    parts.append(
        f"dn: {GROUP_DN}\nobjectClass: group\ncn: POP3 Users\n"
        + "".join(f"member: {u.dn}\n" for u in users.values() if GROUP_DN in u.groups)
    )
    parts += [u.ldif() for u in users.values()]
    return "\n".join(parts)


class Slapd:
    """One slapd instance in ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: Path, users: dict[str, DirectoryUser] | None = None) -> None:
        self.slapd = require_program("slapd", "/usr/sbin/slapd")
        self.slapadd = require_program("slapadd", "/usr/sbin/slapadd")
        if not SYSTEM_SCHEMA.joinpath("inetorgperson.schema").is_file():
            message = "OpenLDAP schema files missing (Debian package slapd)"
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(message)
            pytest.skip(message)
        self.workdir = workdir
        self.users = dict(DIRECTORY_USERS if users is None else users)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.ldaps_port = 0
        self.certs = make_ca_and_cert(workdir / "tls", hostname="localhost")
        self.secret_file = workdir / "ldap-bind.secret"
        self.secret_file.write_text(SERVICE_PASSWORD + "\n")
        self.secret_file.chmod(0o600)
        # the administrator's password for ldapmodify/ldapsearch -y (never in argv); no newline
        self.admin_secret_file = workdir / "ldap-admin.secret"
        self.admin_secret_file.write_text("admin-secret")
        self.admin_secret_file.chmod(0o600)
        self.log_file = workdir / "slapd.log"
        self._write_config()
        self._load()

    # -- addresses
    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def ca_file(self) -> Path:
        return self.certs.ca_cert

    def _write_config(self) -> None:
        (self.workdir / "db").mkdir(exist_ok=True)
        includes = "".join(
            f"include {SYSTEM_SCHEMA / name}\n" for name in ("core.schema", "cosine.schema", "inetorgperson.schema")
        )
        self.conf = self.workdir / "slapd.conf"
        self.conf.write_text(
            includes
            + f"include {SCHEMA}\n"
            + "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
            + f"pidfile {self.workdir / 'slapd.pid'}\n"
            + f"TLSCACertificateFile {self.certs.ca_cert}\n"
            + f"TLSCertificateFile {self.certs.cert}\n"
            + f"TLSCertificateKeyFile {self.certs.key}\n"
            + "sizelimit 500\n"
            + "database mdb\n"
            + f'suffix "{BASE_DN}"\n'
            + f'rootdn "{ADMIN_DN}"\n'
            + "rootpw admin-secret\n"
            + f"directory {self.workdir / 'db'}\n"
            + "maxsize 16777216\n"
            # Like AD: only the service account reads the directory; passwords only for binds.
            + "access to attrs=userPassword\n  by anonymous auth\n  by * none\n"
            + f'access to *\n  by dn.exact="{SERVICE_DN}" read\n  by self read\n  by * none\n'
        )

    def _load(self) -> None:
        ldif = self.workdir / "data.ldif"
        ldif.write_text(base_ldif(self.users))
        subprocess.run(
            [self.slapadd, "-q", "-f", str(self.conf), "-l", str(ldif)],
            check=True, capture_output=True, timeout=60,
        )

    # -- running
    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        for _attempt in range(5):
            if not self.port:
                self.port, self.ldaps_port = free_ports(2)
            urls = f"{self.url}/ {self.ldaps_url}/"
            log = open(self.log_file, "ab")
            self.proc = subprocess.Popen(
                [self.slapd, "-f", str(self.conf), "-h", urls, "-d", "0"],
                stdout=log, stderr=subprocess.STDOUT,
            )
            log.close()
            if self._wait_ready():
                return
            self.stop()
            self.port = self.ldaps_port = 0  # a port was taken meanwhile: pick others
        raise RuntimeError(f"slapd did not start; see {self.log_file}:\n{self.log_file.read_text()[-2000:]}")

    def _wait_ready(self, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            ok = 0
            for port in (self.port, self.ldaps_port):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        ok += 1
                except OSError:
                    pass
            if ok == 2:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def modify(self, ldif: str) -> None:
        """Apply an LDIF change as the directory administrator (``ldapmodify``)."""
        ldapmodify = require_program("ldapmodify")
        subprocess.run(
            [ldapmodify, "-x", "-H", self.url, "-D", ADMIN_DN, "-y", str(self.admin_secret_file)],
            input=ldif.encode("utf-8"), check=True, capture_output=True, timeout=30,
        )

    # -- config for the checker
    def config_toml(self, state_dir: Path, *, url: str | None = None, starttls: bool = False,
                    ca_file: bool | Path = False, extra: str = "", domains: tuple[str, ...] = LOCAL_DOMAINS,
                    timeout: str = "5s") -> str:
        """A pop3coexist config using this directory (``ca_file``: True for the test CA, or
        another CA file)."""
        dom = ", ".join(f'"{d}"' for d in domains)
        ca_path = ca_file if isinstance(ca_file, Path) else self.ca_file
        ca = f'ca_file = "{ca_path}"\n' if ca_file else ""
        return (
            f'[server]\nhostname = "pop.contoso.test"\nstate_dir = "{state_dir}"\n'
            '[auth]\nmethod = "directory"\napop = false\n'
            f'[auth.directory]\nurl = "{url or self.url}"\nstarttls = {"true" if starttls else "false"}\n'
            f'{ca}base_dn = "{BASE_DN}"\nbind_dn = "{SERVICE_DN}"\n'
            f'bind_password_file = "{self.secret_file}"\ntimeout = "{timeout}"\n{extra}'
            f"[domains]\nlocal = [{dom}]\n"
        )


# --------------------------------------------------------------------------- the reactor

_reactor_lock = threading.Lock()
_reactor_thread: threading.Thread | None = None


def start_reactor_thread() -> None:
    """Run Twisted's global reactor in a daemon thread (once per test process).

    Integration tests talk to real servers through code that returns Deferreds; they wait for
    the result with ``in_reactor``. The *global* reactor is needed: Twisted's TLS layer
    schedules its writes on it, so another reactor instance would stall on TLS.
    """
    global _reactor_thread
    from twisted.internet import reactor

    with _reactor_lock:
        if _reactor_thread is not None and _reactor_thread.is_alive():
            return
        if reactor.running:
            return
        _reactor_thread = threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False},
            name="twisted-reactor", daemon=True,
        )
        _reactor_thread.start()
        deadline = time.monotonic() + 10
        while not reactor.running and time.monotonic() < deadline:
            time.sleep(0.01)


def in_reactor(f, *args, timeout: float = 30.0, **kwargs):
    """Call ``f`` in the reactor thread and wait for its (Deferred) result; raises what it
    raises. ``timeout`` bounds the wait so a hung test fails instead of blocking."""
    from twisted.internet import defer, reactor

    start_reactor_thread()
    done = threading.Event()
    box: dict = {}

    def run() -> None:
        d = defer.maybeDeferred(f, *args, **kwargs)

        def finished(result):
            box["result"] = result
            done.set()

        d.addBoth(finished)

    reactor.callFromThread(run)
    if not done.wait(timeout):
        raise TimeoutError(f"no result from {getattr(f, '__name__', f)!r} within {timeout}s")
    result = box["result"]
    from twisted.python.failure import Failure

    if isinstance(result, Failure):
        result.raiseException()
    return result


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    """A running slapd with DIRECTORY_USERS, shared by the tests of one module."""
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@implementer(IAccountChecker)
class ReactorThreadChecker:
    """Wraps a checker so a test thread can call it: every call runs in the reactor thread
    (``in_reactor``) and comes back as an already-fired Deferred (use ``run_sync``)."""

    def __init__(self, checker, timeout: float = 30.0) -> None:
        self.checker = checker
        self.timeout = timeout
        self.credentialInterfaces = checker.credentialInterfaces
        self.offers_secrets = checker.offers_secrets

    def _call(self, name: str, *args):
        from twisted.internet import defer

        try:
            return defer.succeed(in_reactor(getattr(self.checker, name), *args, timeout=self.timeout))
        except Exception as e:  # the checker's failure, handed back as a failed Deferred
            return defer.fail(e)

    def requestAvatarId(self, credentials):
        return self._call("requestAvatarId", credentials)

    def resolve_recipient(self, address):
        return self._call("resolve_recipient", address)

    def sender_owner(self, address):
        return self._call("sender_owner", address)

    def lookup(self, address):
        return self._call("lookup", address)
