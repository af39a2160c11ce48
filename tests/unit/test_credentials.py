"""APOP and CRAM-MD5 credentials (identity/credentials.py) at byte level, with the RFC examples."""

from __future__ import annotations

import base64

import pytest
from twisted.cred.credentials import IUsernameHashedPassword
from twisted.mail import pop3
from zope.interface.verify import verifyObject

from pop3coexist.identity.credentials import (
    APOPCredentials,
    CramMD5Credentials,
    MalformedResponse,
    apop_digest,
    cram_md5_response,
)

# RFC 1939 section 7
RFC1939_MAGIC = b"<1896.697170952@dbc.mtview.ca.us>"
RFC1939_SECRET = "tanstaaf"  # "tan-staaf" in the RFC text
RFC1939_DIGEST = b"c4c9334bac560ecc979e58001b3e22fb"

# RFC 2195 section 2
RFC2195_CHALLENGE_B64 = b"PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_SECRET = "tanstaaftanstaaf"
RFC2195_RESPONSE_B64 = b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"


def test_twisted_apop_is_broken_on_python3() -> None:
    """Why this module exists: Twisted's APOPCredentials never accepts the RFC 1939 example."""
    creds = pop3.APOPCredentials(RFC1939_MAGIC, b"mrose", RFC1939_DIGEST)
    assert creds.checkPassword(RFC1939_SECRET.encode()) is False


def test_apop_rfc1939_example() -> None:
    """The RFC 1939 example digest matches its secret, given as str or bytes."""
    assert apop_digest(RFC1939_MAGIC, RFC1939_SECRET) == RFC1939_DIGEST
    creds = APOPCredentials(RFC1939_MAGIC, b"mrose", RFC1939_DIGEST)
    assert verifyObject(IUsernameHashedPassword, creds)
    assert creds.checkPassword(RFC1939_SECRET) is True
    assert creds.checkPassword(RFC1939_SECRET.encode()) is True


def test_apop_digest_in_upper_case_accepted() -> None:
    """Hex digits are compared without case (some clients send upper case)."""
    assert APOPCredentials(RFC1939_MAGIC, b"mrose", RFC1939_DIGEST.upper()).checkPassword(RFC1939_SECRET)


@pytest.mark.parametrize(
    "digest",
    [
        b"",
        RFC1939_DIGEST[:-1],
        RFC1939_DIGEST + b"0",
        b"z" * 32,
        b"c4c9334bac560ecc979e58001b3e22fa",
        "c4c9334bac560ecc979e58001b3e22fb\u00e9".encode(),
    ],
)
def test_apop_bad_digests(digest: bytes) -> None:
    """Wrong, short, long or non-hex digests are refused, never an exception."""
    assert APOPCredentials(RFC1939_MAGIC, b"mrose", digest).checkPassword(RFC1939_SECRET) is False


def test_apop_wrong_secret_and_magic() -> None:
    """Another secret, or the same digest under another greeting timestamp, is refused."""
    assert not APOPCredentials(RFC1939_MAGIC, b"mrose", RFC1939_DIGEST).checkPassword("tanstaafl")
    assert not APOPCredentials(b"<1897.697170952@dbc.mtview.ca.us>", b"mrose", RFC1939_DIGEST).checkPassword(
        RFC1939_SECRET
    )


def test_apop_utf8_secret() -> None:
    """A non-ASCII secret is hashed as UTF-8 bytes."""
    digest = apop_digest(RFC1939_MAGIC, "p\u00e4ss".encode())
    assert APOPCredentials(RFC1939_MAGIC, b"u", digest).checkPassword("p\u00e4ss")


def test_apop_repr_hides_digest() -> None:
    """The repr names the user only, not the digest."""
    text = repr(APOPCredentials(RFC1939_MAGIC, b"mrose", RFC1939_DIGEST))
    assert "mrose" in text and RFC1939_DIGEST.decode() not in text


def test_cram_md5_rfc2195_example() -> None:
    """The RFC 2195 example: the decoded challenge and response, checked with the secret."""
    assert base64.b64decode(RFC2195_CHALLENGE_B64) == RFC2195_CHALLENGE
    creds = CramMD5Credentials(b"postoffice.reston.mci.net")
    creds.challenge = RFC2195_CHALLENGE
    creds.setResponse(base64.b64decode(RFC2195_RESPONSE_B64))
    assert creds.username == b"tim"
    assert creds.response == b"b913a602c7eda7a495b4e6e7334d3890"
    assert cram_md5_response(RFC2195_CHALLENGE, RFC2195_SECRET) == creds.response
    assert verifyObject(IUsernameHashedPassword, creds)
    assert creds.checkPassword(RFC2195_SECRET) is True
    assert creds.checkPassword(RFC2195_SECRET.encode()) is True
    assert creds.checkPassword("tanstaaftanstaag") is False
    assert creds.moreChallenges() is False


def test_cram_md5_challenge_form() -> None:
    """The challenge is an RFC 822 msg-id <digits.digits@host>, stable per object, and
    different between objects (cryptographic random part)."""
    a = CramMD5Credentials(b"pop.contoso.test")
    first = a.getChallenge()
    assert first == a.getChallenge()
    assert first.startswith(b"<") and first.endswith(b"@pop.contoso.test>")
    left = first[1:].split(b"@")[0]
    random_part, _, stamp = left.partition(b".")
    assert random_part.isdigit() and stamp.isdigit()
    assert CramMD5Credentials(b"pop.contoso.test").getChallenge() != first
    assert CramMD5Credentials("pop.contoso.test").getChallenge().endswith(b"@pop.contoso.test>")
    assert b"None" not in CramMD5Credentials().getChallenge()


@pytest.mark.parametrize("response", [b"", b"tim", b" b913a602c7eda7a495b4e6e7334d3890", b"tim "])
def test_cram_md5_malformed_response(response: bytes) -> None:
    """A response without user name, space and digest is a clear MalformedResponse."""
    with pytest.raises(MalformedResponse):
        CramMD5Credentials(b"h.test").setResponse(response)


def test_cram_md5_name_with_space() -> None:
    """The digest is after the last space, so a user name with a space still parses."""
    creds = CramMD5Credentials(b"h.test")
    challenge = creds.getChallenge()
    creds.setResponse(b"tim smith " + cram_md5_response(challenge, "s"))
    assert creds.username == b"tim smith"
    assert creds.checkPassword("s")


def test_cram_md5_without_challenge_refuses() -> None:
    """checkPassword before any challenge was issued is False, not a match on an empty one."""
    creds = CramMD5Credentials(b"h.test")
    creds.setResponse(b"tim " + cram_md5_response(b"", "s"))
    assert creds.checkPassword("s") is False


def test_cram_md5_bad_digest_forms() -> None:
    """Non-hex or wrong-length digests are refused without an exception; upper case is fine."""
    creds = CramMD5Credentials(b"h.test")
    good = cram_md5_response(creds.getChallenge(), "s")
    for digest in (good[:-1], good + b"0", b"g" * 32):
        creds.setResponse(b"tim " + digest)
        assert creds.checkPassword("s") is False
    creds.setResponse(b"tim " + good.upper())
    assert creds.checkPassword("s") is True
