"""The RFC 5321 section 4.1.2 Mailbox parser (address.py) as tables: what each form parses
to (canonical local part, domain, quoted or not), what is a syntax error and what is valid
syntax refused as policy. Issue 11 fault 2."""

from __future__ import annotations

import pytest

from pop3coexist.address import (
    Address,
    AddressError,
    AddressRefused,
    parse_address,
    parse_path,
    quote_local,
    unquote_local,
)

PARSED = [
    # (as written, str() of the result, quoted)
    ("ted@pop.contoso.test", "ted@pop.contoso.test", False),
    ("Ted@POP.Contoso.TEST", "Ted@pop.contoso.test", False),
    ('"ted"@pop.contoso.test', "ted@pop.contoso.test", False),  # a quoted dot-atom is the same
    ('"t.e.d"@pop.contoso.test', "t.e.d@pop.contoso.test", False),
    ('"\\t\\e\\d"@pop.contoso.test', "ted@pop.contoso.test", False),  # quoted pairs
    ('"odd sender"@example.test', '"odd sender"@example.test', True),
    ('"  two  spaces "@example.test', '"  two  spaces "@example.test', True),
    ('"a\\"b"@example.test', '"a\\"b"@example.test', True),
    ('"a\\\\b"@example.test', '"a\\\\b"@example.test', True),
    ('"a\\ b"@example.test', '"a b"@example.test', True),  # needless escape dropped
    ('"a@b"@example.test', '"a@b"@example.test', True),
    ('"a>b<c"@example.test', '"a>b<c"@example.test', True),
    ('"x..y"@example.test', '"x..y"@example.test', True),  # not a dot-atom: stays quoted
    ('".x"@example.test', '".x"@example.test', True),
    ('""@example.test', '""@example.test', True),
    ("a.b+tag@example.test", "a.b+tag@example.test", False),
    ("!#$%&'*+/=?^_`{|}~-@example.test", "!#$%&'*+/=?^_`{|}~-@example.test", False),
    ("a@[192.0.2.1]", "a@[192.0.2.1]", False),
    ("a@[192.000.002.001]", "a@[192.0.2.1]", False),
    ("a@[IPv6:2001:DB8:0:0::1]", "a@[IPv6:2001:db8::1]", False),
    ("a@[ipv6:::1]", "a@[IPv6:::1]", False),
    ("a@[IPv6:::ffff:192.0.2.1]", "a@[IPv6:::ffff:c000:201]", False),
    ('"a b"@[192.0.2.1]', '"a b"@[192.0.2.1]', True),
    ("a@x-1.example-2.test", "a@x-1.example-2.test", False),
]


@pytest.mark.parametrize(("text", "canonical", "quoted"), PARSED)
def test_valid_mailboxes_parse_to_their_canonical_form(text: str, canonical: str, quoted: bool) -> None:
    """Every form of the Mailbox grammar parses; str() gives the canonical, correctly quoted
    form (what goes into the queue envelope, Received and DSNs, and back out in MAIL FROM),
    which parses again to the same address."""
    address = parse_address(text)
    assert str(address) == canonical
    assert address.quoted is quoted
    assert parse_address(str(address)) == address


SYNTAX_ERRORS = [
    "",
    "ted",
    "@pop.contoso.test",
    "ted@",
    "@a.test:ted@pop.contoso.test",
    "a@b@pop.contoso.test",
    "a b@example.test",
    "ted@example.test ",
    " ted@example.test",
    "a..b@example.test",
    ".a@example.test",
    "a.@example.test",
    "a@example..test",
    "a@example.test.",
    "a@-example.test",
    "a@exam_ple.test",
    "a@example.test%other.test",
    "a@[192.0.2.1",
    "a@192.0.2.1]",
    "a@[192.0.2.256]",
    "a@[192.0.2]",
    "a@[1234.0.0.1]",
    "a@[IPv6:2001:db8::g]",
    "a@[IPv6:fe80::1%eth0]",
    "a@[IPv6:]",
    "a@[]",
    "a@[x y:z]",
    "a@[192.0.2.1].test",
    '"unterminated@example.test',
    '"a"b@example.test',
    '"a""b"@example.test',
    'a"b"@example.test',
    '"a"@',
    '"a"',
    '"tab\there"@example.test',
    '"nul\x00"@example.test',
    '"caf\u00e9"@example.test',
    '"a\\\u00e9"@example.test',
    "x" * 65 + "@example.test",
    '"' + "x" * 63 + '"@example.test',  # 65 octets as written (RFC 5321 4.5.3.1.1)
    "a@" + "x" * 250 + ".test",
]


@pytest.mark.parametrize("text", SYNTAX_ERRORS)
def test_malformed_mailboxes_are_syntax_errors(text: str) -> None:
    """Anything outside the grammar (or over the RFC 5321 4.5.3.1 lengths) is a syntax error,
    not a policy refusal."""
    with pytest.raises(AddressError) as e:
        parse_address(text)
    assert not isinstance(e.value, AddressRefused)


@pytest.mark.parametrize("text", ["a@localhost", "a@LOCALHOST", '"a b"@intranet',
                                  "a@[x-tag:anything]", "a@[tag:192.0.2.1]"])
def test_valid_but_refused_forms_are_policy(text: str) -> None:
    """A one-label domain or a General-address-literal is valid syntax that this server
    refuses as policy (AddressRefused: the protocol answers 553 5.7.1, not 501)."""
    with pytest.raises(AddressRefused):
        parse_address(text)


def test_quote_and_unquote_round_trip() -> None:
    """quote_local gives a Dot-string when it can, else escapes only quote and backslash."""
    assert quote_local("ted") == "ted"
    assert quote_local("a b") == '"a b"'
    assert quote_local('a"b\\c') == '"a\\"b\\\\c"'
    assert unquote_local('"a\\"b\\\\c\\ d"') == 'a"b\\c d'


def test_path_and_key() -> None:
    """<> is the null sender; the key folds the local part's case, quoted or not."""
    assert parse_path("<>") is None
    assert parse_path('<"A B"@Example.TEST>') == Address('"A B"', "example.test", True)
    assert parse_address('"A B"@example.test').key == '"a b"@example.test'
    assert parse_address("a@[IPv6:::1]").literal is not None
    assert parse_address("a@example.test").literal is None
