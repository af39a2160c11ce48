"""RFC 4515 filter escaping and parsing (ldapfilter.py): values cannot inject."""

from __future__ import annotations

import pytest
from ldaptor.protocols import pureldap

from pop3coexist.ldapfilter import (
    FilterError,
    all_of,
    any_of,
    equals,
    escape_value,
    negate,
    parse_filter,
)


def test_escape_specials() -> None:
    """The five characters RFC 4515 section 3 names are escaped as \\xx (lower-case hex)."""
    assert escape_value("a*b(c)d\\e\0f") == "a\\2ab\\28c\\29d\\5ce\\00f"


def test_escape_keeps_plain_text() -> None:
    """Addresses and names made of printable ASCII stay readable."""
    assert escape_value("Ted.Bremer+x@pop.contoso.test") == "Ted.Bremer+x@pop.contoso.test"


def test_escape_non_ascii_as_utf8_octets() -> None:
    """Non-ASCII is escaped octet by octet from UTF-8; bytes are taken as they are."""
    assert escape_value("café") == "caf\\c3\\a9"
    assert escape_value(b"\xff\n") == "\\ff\\0a"


def test_injection_stays_one_value() -> None:
    """A classic injection string parses back to one equality match holding it verbatim."""
    evil = "*)(|(objectClass=*"
    parsed = parse_filter(equals("mail", evil))
    assert isinstance(parsed, pureldap.LDAPFilter_equalityMatch)
    assert parsed.attributeDesc.value == "mail"
    assert parsed.assertionValue.value == evil.encode()


def test_builders() -> None:
    """any_of / all_of / negate build the usual prefix notation; one operand stays as is."""
    a, b = equals("mail", "a@b.test"), equals("cn", "x")
    assert any_of(a, b) == "(|(mail=a@b.test)(cn=x))"
    assert all_of(a, b) == "(&(mail=a@b.test)(cn=x))"
    assert any_of(a) == a
    assert negate(a) == "(!(mail=a@b.test))"
    with pytest.raises(FilterError):
        any_of()


def test_equals_refuses_bad_attribute() -> None:
    """An attribute name that is not an attribute description is an error, not a filter."""
    with pytest.raises(FilterError):
        equals("mail)(cn", "x")


def test_parse_round_trip_to_wire_octets() -> None:
    """Escapes decode to the exact octets on the wire, also for UTF-8 (ldaptor's own parser
    turns \\c3\\a9 into two characters and sends four octets)."""
    parsed = parse_filter("(&(objectClass=user)(cn=caf\\c3\\a9))")
    assert isinstance(parsed, pureldap.LDAPFilter_and)
    assert parsed[1].assertionValue.value == "café".encode()
    assert b"caf\xc3\xa9" in parsed.toWire()


@pytest.mark.parametrize(
    "text, cls",
    [
        ("(cn=*)", pureldap.LDAPFilter_present),
        ("(cn=ab*c*d)", pureldap.LDAPFilter_substrings),
        ("(uid>=3)", pureldap.LDAPFilter_greaterOrEqual),
        ("(uid<=3)", pureldap.LDAPFilter_lessOrEqual),
        ("(cn~=ted)", pureldap.LDAPFilter_approxMatch),
        ("(!(cn=x))", pureldap.LDAPFilter_not),
        ("(|(cn=x)(cn=y))", pureldap.LDAPFilter_or),
        ("(userAccountControl:1.2.840.113556.1.4.803:=2)", pureldap.LDAPFilter_extensibleMatch),
        ("(cn:dn:=x)", pureldap.LDAPFilter_extensibleMatch),
        ("objectClass=user", pureldap.LDAPFilter_equalityMatch),
    ],
)
def test_parse_kinds(text: str, cls: type) -> None:
    """Every RFC 4515 item kind parses (a user_filter may use any of them)."""
    assert isinstance(parse_filter(text), cls)


@pytest.mark.parametrize(
    "text",
    ["", "(", "(cn=x", "(cn=x))", "(&)", "(cn=a\\zz)", "(cn=a\\2)", "(=x)", "(c n=x)",
     "(cn=x)(cn=y)", "(cn=a(b)", "(cn=a**b)", "(cn=x\n)", "(:=x)"],
)
def test_parse_refuses_malformed(text: str) -> None:
    """Malformed filters raise FilterError (the config check names user_filter)."""
    with pytest.raises(FilterError):
        parse_filter(text)
