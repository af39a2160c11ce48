"""The RFC 5321 section 4.1.2 Mailbox parser (address.py) as tables: what each form parses
to (canonical local part, domain, quoted or not), what is a syntax error and what is valid
syntax refused as policy. Issue 11 fault 2."""

from __future__ import annotations

import pytest

from pop3coexist.address import (
    Address,
    AddressError,
    AddressNeedsUTF8,
    AddressRefused,
    login_to_address,
    normalise_literal,
    parse_address,
    parse_path,
    quote_local,
    strip_source_route,
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
    ('"' + "x" * 62 + '"@example.test', "x" * 62 + "@example.test", False),  # 64 octets written
    ('"' + "x" * 60 + '\\\\"@example.test', '"' + "x" * 60 + '\\\\"@example.test', True),
    ("x" * 64 + "@example.test", "x" * 64 + "@example.test", False),
    ("a@123.example", "a@123.example", False),  # digits-only labels other than the last
    ("a@[IPv6:::ffff:127.000.000.001]", "a@[IPv6:::ffff:7f00:1]", False),  # Snum leading zeros
    ("a@[IPv6:2001:db8::192.0.2.1]", "a@[IPv6:2001:db8::c000:201]", False),
    ("a@[IPv6:::]", "a@[IPv6:::]", False),
    ('"\\a"@example.test', "a@example.test", False),  # a quoted pair of a letter is the letter
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
    '"del\x7f"@example.test',
    "a@[IPv6:1::2::3]",
    "a@[IPv6:127.0.0.1]",
    "a@[IPv6:::ffff:1.2.3.256]",
    "a@[IPv6:00001::1]",
    "a@[IPv6:::1/128]",
    "a@[1.2.3.0004]",
    "a@[tag:]",
    "a@[tag-:x]",  # a Standardized-tag (Ldh-str) ends with a letter or digit
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
                                  "a@[x-tag:anything]", "a@[-tag:x]", "a@[tag:192.0.2.1]", "a@[IPv4:192.0.2.1]",
                                  "a@192.0.2.1", "a@127.0.0.1", "a@example.123"])
def test_valid_but_refused_forms_are_policy(text: str) -> None:
    """A one-label domain, a domain name that is an IP address without brackets (its last
    label all digits: RFC 1123 section 2.1) or a General-address-literal is valid syntax that
    this server refuses as policy (AddressRefused: the protocol answers 553 5.7.1, not 501)."""
    with pytest.raises(AddressRefused):
        parse_address(text)


@pytest.mark.parametrize("text", ['"caf\u00e9"@example.test', '"a\\\u00e9"@example.test',
                                  "t\u00e9d@example.test", "ted@b\u00fccher.example",
                                  "ted@example.test\udce9"])
def test_non_ascii_needs_smtputf8(text: str) -> None:
    """Non-ASCII characters (UTF-8, or octets that are not UTF-8, kept as surrogates) raise
    AddressNeedsUTF8: an internationalised address needs SMTPUTF8 (RFC 6531), not offered
    here; the protocol answers 553 5.6.7, not a syntax code."""
    with pytest.raises(AddressNeedsUTF8):
        parse_address(text)


@pytest.mark.parametrize(("path", "mailbox"), [
    ("@a.example:ted@pop.contoso.test", "ted@pop.contoso.test"),
    ("@a.example,@B.Example:ted@pop.contoso.test", "ted@pop.contoso.test"),
    ("@relay:ted@pop.contoso.test", "ted@pop.contoso.test"),  # one label: grammar allows it
    ('@a.example:"x:y"@pop.contoso.test', '"x:y"@pop.contoso.test'),
    ("ted@pop.contoso.test", "ted@pop.contoso.test"),
    ('"@a.example:ted"@pop.contoso.test', '"@a.example:ted"@pop.contoso.test'),  # quoted: no route
])
def test_source_route_is_dropped(path: str, mailbox: str) -> None:
    """RFC 5321 4.1.1.3 / appendix C: a source route (A-d-l) in front of the Mailbox is checked
    and ignored; only the Mailbox is left to decide where mail goes."""
    assert strip_source_route(path) == mailbox
    assert parse_path(f"<{path}>") == parse_address(mailbox)


@pytest.mark.parametrize("path", ["@a.example:", "@a.example", "@:ted@x.test", "@a..b:ted@x.test",
                                  "@a.example,ted@x.test", "@[192.0.2.1]:ted@x.test",
                                  "@a.example;@b.example:ted@x.test", "@a.example ,@b:ted@x.test",
                                  "@-a.example:ted@x.test", "@a.example:" + "x" * 250 + "@x.test"])
def test_malformed_source_routes_are_syntax_errors(path: str) -> None:
    """A route outside the A-d-l grammar, or a path over 256 octets, is a syntax error."""
    with pytest.raises(AddressError) as e:
        parse_address(strip_source_route(path))
    assert not isinstance(e.value, AddressRefused)


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


ONE = ("pop.contoso.test",)
TWO = ("pop.contoso.test", "second.test")

LOGINS = [
    # (log-in name, the server's local domains, what it maps to): the README's name rule
    ("ted", (), None),
    ("ted", ONE, ("ted", "pop.contoso.test")),
    ("TED", ONE, ("ted", "pop.contoso.test")),
    ("ted", TWO, None),
    ("ted", ("POP.Contoso.TEST",), ("ted", "pop.contoso.test")),
    ("ted@pop.contoso.test", (), ("ted", "pop.contoso.test")),  # the checker then asks the domain
    ("Ted@POP.Contoso.Test", ONE, ("ted", "pop.contoso.test")),
    ("ted@second.test", TWO, ("ted", "second.test")),
    ("ted@pop.contoso.test.", ONE, None),
    ("ted@", ONE, None),
    ("@pop.contoso.test", ONE, None),
    ("@", ONE, None),
    ('"ted"@pop.contoso.test', ONE, None),
    ("ted@[127.0.0.1]", ONE, None),
    ("ted@127.0.0.1", ONE, None),
    ("ted@localhost", ONE, None),
    ("t ed", ONE, None),
    (" ted", ONE, None),
    ("ted\n", ONE, None),
    ("ted\r", ONE, None),
    ("t\u00e9d", ONE, None),
    ("", ONE, None),
    ("a" * 65, ONE, None),
]


@pytest.mark.parametrize(("login", "domains", "expected"), LOGINS)
def test_login_name_rule(login: str, domains: tuple[str, ...], expected) -> None:
    """A log-in name is the full address (any case) or, while there is exactly one local
    domain, the bare local part; anything else (a domain literal, a trailing dot, a quoted or
    spaced name, control or non-ASCII characters) maps to nothing."""
    assert login_to_address(login, domains) == expected


@pytest.mark.parametrize("domains", [(), TWO, (*TWO, "third.test")])
def test_refused_bare_name_is_logged_with_the_reason(domains: tuple[str, ...]) -> None:
    """map_login logs one info line naming the bare name and the number of local domains
    (0, 2, 3: anything but one), never a password, so an administrator sees why it failed."""
    from twisted.logger import formatEvent, globalLogPublisher

    from pop3coexist.identity.logins import map_login

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert map_login("Ted", list(domains)) is None
    finally:
        globalLogPublisher.removeObserver(events.append)
    [line] = [formatEvent(e) for e in events if "bare name" in formatEvent(e)]
    assert "'Ted'" in line and f"it has {len(domains)} " in line


# RFC 5321 section 4.1.3 address literals, form by form: (as written, canonical form). Issue of
# the 2026-11-30 clean-up: ``[IPv6:1:2:3:4:5:6::7]`` was accepted (a general IP parser takes it;
# the grammar allows at most six groups beside ``::``).
VALID_LITERALS = [
    # IPv4-address-literal: Snum is 1*3DIGIT, 0-255, leading zeros allowed
    ("[0.0.0.0]", "[0.0.0.0]"),
    ("[255.255.255.255]", "[255.255.255.255]"),
    ("[010.001.000.099]", "[10.1.0.99]"),
    # IPv6-full: eight groups of 1-4 hex digits; the tag in any case
    ("[IPv6:2001:db8:0:0:0:0:0:1]", "[IPv6:2001:db8::1]"),
    ("[ipv6:1:2:3:4:5:6:7:8]", "[IPv6:1:2:3:4:5:6:7:8]"),
    ("[IPV6:ABCD:EF01:2345:6789:ABCD:EF01:2345:6789]",
     "[IPv6:abcd:ef01:2345:6789:abcd:ef01:2345:6789]"),
    ("[IPv6:1:2:3:4:5:6:0:7]", "[IPv6:1:2:3:4:5:6:0:7]"),
    # IPv6-comp: "::" and at most six groups beside it, on either side or split
    ("[IPv6:::]", "[IPv6:::]"),
    ("[IPv6:::1]", "[IPv6:::1]"),
    ("[IPv6:1::]", "[IPv6:1::]"),
    ("[IPv6:1:2:3:4:5:6::]", "[IPv6:1:2:3:4:5:6::]"),
    ("[IPv6:::1:2:3:4:5:6]", "[IPv6:::1:2:3:4:5:6]"),
    ("[IPv6:1:2:3::4:5:6]", "[IPv6:1:2:3::4:5:6]"),
    ("[IPv6:1::2:3:4:5:6]", "[IPv6:1::2:3:4:5:6]"),
    # IPv6v4-full: six groups, then an IPv4-address-literal
    ("[IPv6:1:2:3:4:5:6:192.0.2.1]", "[IPv6:1:2:3:4:5:6:c000:201]"),
    ("[IPv6:0:0:0:0:0:ffff:001.002.003.004]", "[IPv6:::ffff:102:304]"),
    # IPv6v4-comp: "::" and at most four groups beside it, then the IPv4 literal
    ("[IPv6:::192.0.2.1]", "[IPv6:::c000:201]"),
    ("[IPv6:::ffff:192.0.2.1]", "[IPv6:::ffff:c000:201]"),
    ("[IPv6:1:2:3:4::192.0.2.1]", "[IPv6:1:2:3:4::c000:201]"),
    ("[IPv6:1::2:3:4:192.0.2.1]", "[IPv6:1::2:3:4:c000:201]"),
    ("[IPv6:::1:2:3:4:192.0.2.1]", "[IPv6:::1:2:3:4:c000:201]"),
]

INVALID_LITERALS = [
    # IPv4: not four Snums, a value over 255, more than three digits
    "[]", "[1.2.3]", "[1.2.3.4.5]", "[1.2.3.256]", "[1.2.3.0004]", "[1..2.3]", "[1.2.3.4.]",
    "[+1.2.3.4]", "[1.2.3.-4]", "[ 1.2.3.4]", "[1.2.3.\u0664]",
    # IPv6-full: not eight groups, a group over four digits, not hex
    "[IPv6:1:2:3:4:5:6:7]", "[IPv6:1:2:3:4:5:6:7:8:9]", "[IPv6:00001:2:3:4:5:6:7:8]",
    "[IPv6:1:2:3:4:5:6:7:g]", "[IPv6:1:2:3:4:5:6:7:]", "[IPv6::1:2:3:4:5:6:7]",
    # IPv6-comp: more than six groups beside "::", two "::", ":::", a lone ":" at either end
    "[IPv6:1:2:3:4:5:6::7]", "[IPv6:1::2:3:4:5:6:7]", "[IPv6:::1:2:3:4:5:6:7]",
    "[IPv6:1:2:3:4:5:6:7::]", "[IPv6:1::2::3]", "[IPv6::::]", "[IPv6::::1]", "[IPv6:1:::2]",
    "[IPv6::1::]", "[IPv6:1::2:]", "[IPv6::]", "[IPv6:]",
    # IPv6v4-full / -comp: not six groups before the IPv4 part, more than four beside "::",
    # a bad IPv4 part, the IPv4 part not last
    "[IPv6:1:2:3:4:5:192.0.2.1]", "[IPv6:1:2:3:4:5:6:7:192.0.2.1]",
    "[IPv6:1:2:3:4:5::192.0.2.1]", "[IPv6:1::2:3:4:5:192.0.2.1]",
    "[IPv6:::1:2:3:4:5:192.0.2.1]", "[IPv6:::192.0.2.256]", "[IPv6:::192.0.2]",
    "[IPv6:::1.2.3.4:5]", "[IPv6:1.2.3.4::]", "[IPv6:192.0.2.1]", "[IPv6::::192.0.2.1]",
    "[IPv6::192.0.2.1]",
    # no zone index, no prefix length, no spaces
    "[IPv6:fe80::1%eth0]", "[IPv6:::1/128]", "[IPv6: ::1]",
    # General-address-literal: the tag an Ldh-str (ends with a letter or digit), then dcontent
    # (no "[", "\\", "]", space or control)
    "[tag-:x]", "[:x]", "[ta g:x]", "[tag:]", "[tag:a[b]", "[tag:a\\b]", "[tag:a b]",
    # not bracketed
    "1.2.3.4", "[1.2.3.4", "1.2.3.4]",
]

REFUSED_LITERALS = [
    # valid General-address-literals with a tag that is not IPv6: policy, not syntax
    "[x-tag:anything]", "[-tag:x]", "[IPv4:192.0.2.1]", "[tag:192.0.2.1]", "[9:~!]",
]


@pytest.mark.parametrize(("text", "canonical"), VALID_LITERALS)
def test_valid_address_literals(text: str, canonical: str) -> None:
    """Every form of RFC 5321 section 4.1.3's address-literal grammar is accepted and
    normalised; the canonical form is inside the grammar again (normalising it is a no-op) and
    an address with that domain has the literal's IP address."""
    assert normalise_literal(text) == canonical
    assert normalise_literal(canonical) == canonical
    assert parse_address(f"a@{text}").domain == canonical
    assert parse_address(f"a@{text}").literal is not None


@pytest.mark.parametrize("text", INVALID_LITERALS)
def test_invalid_address_literals_are_syntax_errors(text: str) -> None:
    """Anything outside RFC 5321 section 4.1.3's grammar is a syntax error (AddressError, not a
    policy refusal), also where a general IP parser would take it (``1:2:3:4:5:6::7``,
    ``1:2:3:4:5::1.2.3.4``)."""
    with pytest.raises(AddressError) as e:
        normalise_literal(text)
    assert not isinstance(e.value, AddressRefused)


@pytest.mark.parametrize("text", REFUSED_LITERALS)
def test_general_address_literals_are_refused_as_policy(text: str) -> None:
    """A General-address-literal (Standardized-tag ":" 1*dcontent) of a tag other than IPv6 is
    valid syntax, refused as policy (AddressRefused): no other tag is standardised."""
    with pytest.raises(AddressRefused):
        normalise_literal(text)
