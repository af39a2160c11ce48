"""AUTH exchanges at the credential-checker seam: credentials made by the real SASL mechanisms
of both front-ends (smtp.auth PLAIN/LOGIN, pop3.sasl PLAIN/LOGIN) from generated client bytes,
checked by every real checker (password file, directory over a fake LDAP server, local
accounts over a fake PAM). Whatever the bytes (non-UTF-8, NULs, controls, long), a checker
answers with an account or UnauthorizedLogin (535 / -ERR [AUTH], with the failure delay),
never another exception and nothing logged as a failure: a stranger's bytes must not reach
the log as a traceback nor turn into a "try again later"."""

from __future__ import annotations

import base64
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.python.failure import Failure

from pop3coexist.identity.passwordfile import PasswordFile, PasswordFileChecker, _run_now
from pop3coexist.pop3 import sasl as pop3_sasl
from pop3coexist.smtp import auth as smtp_sasl
from tests.fuzz import oracles
from tests.unit import test_directory as td
from tests.unit import test_directory_local as tl

pytestmark = pytest.mark.timeout(600)

names = st.one_of(st.sampled_from([b"ted", b"ted@pop.contoso.test", b"Ted", b"kim", b"root"]),
                  st.binary(max_size=30))
passwords = st.one_of(st.sampled_from([b"ted-pw", b"ted secret", b"pw\xff", b"\xc3", b"\xed\xa0\x80",
                                       b"caf\xc3\xa9", b"a\x00b", b""]),
                      st.binary(max_size=40))


def _credentials(front: str, mech: str, name: bytes, password: bytes):
    """Run one exchange through a real mechanism; None when it refuses the bytes."""
    try:
        if mech == "CRAM-MD5":
            digest = (password.hex() * 32)[:32].encode() if password else b"0" * 32
            if front == "smtp":
                m = smtp_sasl.make_mechanism(mech, "pop.contoso.test", True)
                m.start(None)
                return m.step(name + b" " + digest)
            m = pop3_sasl.CramMD5Mechanism(b"<1.2@pop.contoso.test>", "pop.contoso.test")
            m.start(None)
            step = m.step(name + b" " + digest)
            return step.credentials if isinstance(step, pop3_sasl.Done) else None
        if mech == "APOP":
            from pop3coexist.pop3.sasl import APOPCredentials

            return APOPCredentials(b"<1.2@pop.contoso.test>", name, (password.hex() * 32)[:32].encode())
        if front == "smtp":
            m = smtp_sasl.make_mechanism(mech, "pop.contoso.test", False)
            if mech == "PLAIN":
                return m.start(b"\0" + name + b"\0" + password)
            m.start(None)
            m.step(name)
            return m.step(password)
        m = pop3_sasl.PlainMechanism() if mech == "PLAIN" else pop3_sasl.LoginMechanism()
        if mech == "PLAIN":
            step = m.start(b"\0" + name + b"\0" + password)
        else:
            m.start(None)
            step = m.step(name)
            if isinstance(step, pop3_sasl.Challenge):
                step = m.step(password)
        return step.credentials if isinstance(step, pop3_sasl.Done) else None
    except (smtp_sasl.SaslSyntaxError, UnicodeDecodeError, ValueError):
        return None


class _Checkers:
    """The three real checkers, each over its fake back end, in a temporary folder."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="checker-fuzz-"))
        pw = PasswordFile(self.tmp / "passwords.json", self.tmp / "passwords.key", True, scrypt_n=2**4)
        pw.set_password("ted@pop.contoso.test", "ted-pw")
        self.clock = task.Clock()
        directory = td.directory.__wrapped__()
        (self.tmp / "d").mkdir()
        (self.tmp / "l").mkdir()
        self.all = {
            "passwordfile": PasswordFileChecker(pw, lambda: ["pop.contoso.test"], run_blocking=_run_now),
            "directory": td.DirectoryChecker(td.make_config(self.tmp / "d"), self.clock,
                                             connector=directory.connect),
            "local": tl.LocalChecker(tl.cfg(self.tmp / "l"), None, authenticate=tl.FakePam(),
                                     getpwnam=tl.getpwnam, uid_range=(1000, 60000),
                                     run_blocking=tl.run_now),
        }

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def checkers():
    c = _Checkers()
    yield c
    c.close()


@pytest.mark.parametrize("which", ["passwordfile", "directory", "local"])
def test_any_auth_bytes_give_an_account_or_unauthorized(checkers, which: str) -> None:
    """Credentials from any client bytes, through either front-end's PLAIN or LOGIN, get an
    account or UnauthorizedLogin from the real checker; nothing else, nothing logged."""
    checker = checkers.all[which]

    @given(front=st.sampled_from(["smtp", "pop3"]),
           mech=st.sampled_from(["PLAIN", "LOGIN", "CRAM-MD5", "APOP"]),
           name=names, password=passwords)
    def check(front: str, mech: str, name: bytes, password: bytes) -> None:
        creds = _credentials(front, mech, name, password)
        if creds is None:
            return
        box: list = []
        with oracles.no_logged_failures():
            d = checker.requestAvatarId(creds)
            d.addBoth(box.append)
            for _ in range(20):
                if box:
                    break
                checkers.clock.advance(1)
        assert box, "the check never answered"
        if isinstance(box[0], Failure):
            assert box[0].check(UnauthorizedLogin), box[0].getTraceback()

    check()


@pytest.mark.parametrize("which", ["passwordfile", "directory", "local"])
def test_any_parsed_address_resolves_or_not(checkers, which: str) -> None:
    """RCPT TO and MAIL FROM addresses that the path parser accepts (quoted local parts, odd
    atext, literals) get an account or None from every real checker's resolve_recipient and
    sender_owner; no exception, nothing logged (an LDAP filter stays well-formed)."""
    from pop3coexist.address import AddressError, parse_address

    checker = checkers.all[which]
    atext = st.sampled_from(list("ted.!#$%&'*+/=?^_`{|}~-") + ['"', "\\", " ", "(", ")", "*", "@"])
    local = st.lists(atext, min_size=1, max_size=12).map("".join)
    domain = st.sampled_from(["pop.contoso.test", "Pop.Contoso.Test", "[192.0.2.1]",
                              "northwindtraders.test", "x.test"])

    @given(local=local, quoted=st.booleans(), domain=domain)
    def check(local: str, quoted: bool, domain: str) -> None:
        text = f'"{local}"@{domain}' if quoted else f"{local}@{domain}"
        try:
            address = str(parse_address(text))
        except AddressError:
            return
        for method in (checker.resolve_recipient, checker.sender_owner):
            box: list = []
            with oracles.no_logged_failures():
                method(address).addBoth(box.append)
                for _ in range(20):
                    if box:
                        break
                    checkers.clock.advance(1)
            assert box and not isinstance(box[0], Failure), box and box[0].getTraceback()
            assert box[0] is None or isinstance(box[0], str), box[0]

    check()


def test_smtp_auth_with_a_password_that_is_not_utf8_is_refused_535() -> None:
    """Regression (fuzz): AUTH PLAIN whose password octets are not UTF-8 got 454 4.7.0 "try
    again later" and a logged traceback from the local-account and directory checkers
    (UnicodeEncodeError escaped requestAvatarId); it is a wrong password: 535 5.7.8 after the
    failure delay."""
    from tests.support.smtp_fakes import make_factory, open_session

    tmp = Path(tempfile.mkdtemp(prefix="checker-fuzz-"))
    try:
        checker = tl.LocalChecker(tl.cfg(tmp), None, authenticate=tl.FakePam(), getpwnam=tl.getpwnam,
                                  uid_range=(1000, 60000), run_blocking=tl.run_now)
        factory, _store, _c, _q, clock = make_factory(checker=checker)
        with oracles.no_logged_failures():
            proto, transport = open_session(factory)
            transport.clear()
            proto.dataReceived(b"EHLO c.test\r\nAUTH PLAIN "
                               + base64.b64encode(b"\0ted@pop.contoso.test\0pw\xff") + b"\r\n")
            clock.advance(60)
        assert transport.value().endswith(b"535 5.7.8 Authentication credentials invalid\r\n"), \
            transport.value()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
