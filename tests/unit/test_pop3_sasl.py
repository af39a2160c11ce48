"""POP3 credentials and SASL mechanisms: RFC 1939 APOP and RFC 2195 CRAM-MD5 examples,
PLAIN/LOGIN parsing rules, and no secret in any repr."""

from __future__ import annotations

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from zope.interface.verify import verifyObject

from pop3coexist.pop3 import sasl


def test_apop_rfc1939_example():
    """RFC 1939 section 7: <1896.697170952@dbc.mtview.ca.us> + tanstaaf -> c4c9334b..."""
    magic = b"<1896.697170952@dbc.mtview.ca.us>"
    digest = b"c4c9334bac560ecc979e58001b3e22fb"
    for cls in (sasl.APOPCredentials,):
        creds = cls(magic, b"mrose", digest)
        verifyObject(IUsernameHashedPassword, creds)
        assert creds.checkPassword("tanstaaf") and creds.checkPassword(b"tanstaaf")
        assert not creds.checkPassword("tanstaaF")
        assert "tanstaaf" not in repr(creds)


def test_cram_md5_rfc2195_example_through_mechanism():
    """RFC 2195 section 2: tim / tanstaaftanstaaf answers <1896.697170952@postoffice...>."""
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    mech = sasl.CramMD5Mechanism(challenge, "postoffice.reston.mci.net")
    step = mech.start(None)
    assert step == sasl.Challenge(challenge)
    done = mech.step(b"tim b913a602c7eda7a495b4e6e7334d3890")
    assert isinstance(done, sasl.Done) and done.username == "tim"
    assert done.credentials.checkPassword("tanstaaftanstaaf")
    assert not done.credentials.checkPassword("tanstaaf")
    local = sasl.CramMD5Credentials("x")
    local.challenge = challenge
    local.setResponse(b"tim B913A602C7EDA7A495B4E6E7334D3890")
    assert local.checkPassword(b"tanstaaftanstaaf")


def test_cram_md5_malformed():
    """CRAM-MD5: initial response, missing digest or non-hex digest fail cleanly."""
    mech = sasl.CramMD5Mechanism(b"<1.2@h>", "h")
    assert isinstance(mech.start(b"x"), sasl.Fail)
    for bad in (b"tim", b" " + b"0" * 32, b"tim xyz", b"tim " + b"g" * 32):
        assert isinstance(sasl.CramMD5Mechanism(b"<1.2@h>", "h").step(bad), sasl.Fail)


def test_plain_rules():
    """PLAIN: three fields, authzid empty or equal to authcid (any case), non-empty user and
    password, UTF-8."""
    ok = sasl.PlainMechanism().step(b"\0ted\0pw")
    assert isinstance(ok, sasl.Done) and ok.username == "ted"
    verifyObject(IUsernamePassword, ok.credentials)
    assert ok.credentials.checkPassword("pw") and ok.credentials.checkPassword(b"pw")
    assert isinstance(sasl.PlainMechanism().step(b"TED\0ted\0pw"), sasl.Done)
    for bad in (b"", b"ted\0pw", b"\0\0pw", b"\0ted\0", b"amy\0ted\0pw", b"\0t\xffd\0pw",
                b"\0a\0b\0c"):
        assert isinstance(sasl.PlainMechanism().step(bad), sasl.Fail), bad
    assert sasl.PlainMechanism().start(None) == sasl.Challenge(b"")


def test_login_steps():
    """LOGIN: Username: then Password:, empty answers fail."""
    mech = sasl.LoginMechanism()
    assert mech.start(None) == sasl.Challenge(b"Username:")
    assert mech.step(b"ted") == sasl.Challenge(b"Password:")
    done = mech.step("pässword".encode())
    assert isinstance(done, sasl.Done) and done.credentials.checkPassword("pässword")
    assert isinstance(sasl.LoginMechanism().start(b""), sasl.Fail)
    m2 = sasl.LoginMechanism()
    m2.step(b"ted")
    assert isinstance(m2.step(b""), sasl.Fail)


def test_no_secret_in_reprs():
    """Credential and step reprs never show the password."""
    creds = sasl.PasswordCredentials("ted", "s3cret-value")
    done = sasl.Done(creds, "ted")
    for text in (repr(creds), repr(done), str(done)):
        assert "s3cret-value" not in text


def test_one_password_credentials_class_for_every_front_end():
    """POP3, SMTP, IMAP, ManageSieve and the web log-in hand the same
    ``identity.credentials.PasswordCredentials`` to the checkers: str or UTF-8 bytes in, the
    stored secret as str or bytes, octets that are not UTF-8 compared exactly (surrogate
    escapes), and no password in its repr."""
    from pop3coexist.identity.credentials import PasswordCredentials
    from pop3coexist.imap import login as imap_login
    from pop3coexist.managesieve import server as sieve_server
    from pop3coexist.smtp import auth as smtp_auth
    from pop3coexist.web import login as web_login

    for module in (sasl, smtp_auth, imap_login, sieve_server, web_login):
        assert module.PasswordCredentials is PasswordCredentials
    creds = PasswordCredentials(b"ted", "s\u00e9cret")
    verifyObject(IUsernamePassword, creds)
    assert creds.username == "ted"
    assert creds.checkPassword("s\u00e9cret") and creds.checkPassword("s\u00e9cret".encode())
    assert not creds.checkPassword("secret") and "cret" not in repr(creds)
    raw = PasswordCredentials("ted", b"\xff\xfepw")
    assert raw.checkPassword(b"\xff\xfepw") and not raw.checkPassword("\u00ff\u00fepw")
