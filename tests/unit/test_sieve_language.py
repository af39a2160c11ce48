"""Sieve (RFC 5228 and the supported extensions): the parser and validator
(``policy.sieve``) and the interpreter (``policy.sieve_run``), without I/O. The cases that
Pigeonhole can also run are compared with it in tests/integration/test_sieve_pigeonhole.py;
these cover the rest: errors and their lines, ereject, the null sender, limits, the
linear-time matcher, variables and flags."""

from __future__ import annotations

import pytest

from pop3coexist.policy.sieve import EXTENSIONS, REFUSED, SieveSyntaxError, check, parse
from pop3coexist.policy.sieve_run import Limits, MailContext, SieveRuntimeError, _glob, run
from tests.support import workcount

MSG = (b"From: Ann <ann@example.org>\r\nTo: ted@pop.contoso.test\r\n"
       b"Subject: Report 42\r\nX-Count: 17\r\n\r\nbody text\r\n")


def result(script: str, msg: bytes = MSG, sender: str = "ann@example.org",
           rcpt: str = "ted@pop.contoso.test", limits: Limits | None = None):
    return run(parse(script), MailContext.from_bytes(sender, rcpt, msg), limits)


def kinds(script: str, **kw) -> list[tuple[str, str]]:
    r = result(script, **kw)
    out = [(a.kind, a.argument) for a in r.actions]
    return out + ([("implicit keep", "")] if r.implicit_keep else [])


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("script,line,words", [
    ("keep", 1, "the script ends where ; or { is expected"),
    ('fileinto "x";', 1, 'fileinto needs require "fileinto"'),
    ('require "regex";', 1, "regular expressions"),
    ('require ["fileinto",\n  "nope"];', 2, 'unknown extension "nope"'),
    ('keep;\nrequire "fileinto";', 2, "require must come before any other command"),
    ('if true {\n keep;\n', 3, "the script ends where } is expected"),
    ('if true keep;', 1, "keep is not a test"),
    ('header "a" "b";', 1, "header is a test, not a command"),
    ('redirect "nobody";', 1, "is not an address"),
    ('if header :is :contains "a" "b" { keep; }', 1, ":contains and :is exclude each other"),
    ('if header :count "gt" "a" "1" { keep; }', 1, ':count needs require "relational"'),
    ('require "relational";\nif header :count "big" "a" "1" { keep; }', 2, "is not one of"),
    ('if header :comparator "i;ascii-numeric" "a" "1" { keep; }', 1,
     'needs require "comparator-i;ascii-numeric"'),
    ('require "comparator-i;ascii-numeric";\nif header :contains :comparator '
     '"i;ascii-numeric" "a" "1" { keep; }', 2, "does not do substring matches"),
    ('require "variables";\nset "1x" "v";', 2, "is not a variable name"),
    ('require "envelope";\nif envelope "auth" "x" { keep; }', 2, "envelope part"),
    ('/* never closed\nkeep;', 1, "unterminated /* comment"),
    ('require "vacation";\nvacation text:\nno end\n', 2, "without the closing '.' line"),
    ('keep;\n"x";', 2, "a string where identifier is expected"),
    ('if size 10 { keep; }', 1, "size needs :over or :under"),
    ('stop { keep; }', 1, "stop takes no block"),
    ('if true { keep; }\nelse false { keep; }', 2, "else takes no test"),
])
def test_errors_name_their_line(script: str, line: int, words: str) -> None:
    """Each invalid script raises SieveSyntaxError at the right line with a clear reason."""
    with pytest.raises(SieveSyntaxError) as e:
        parse(script)
    assert e.value.line == line
    assert words in str(e.value), str(e.value)
    assert check(script) == str(e.value) and str(e.value).startswith(f"line {line}: ")


def test_every_refused_extension_says_why_and_none_is_also_supported() -> None:
    """REFUSED and EXTENSIONS are disjoint, and require of a refused one gives its reason."""
    assert not set(REFUSED) & set(EXTENSIONS)
    for name, why in REFUSED.items():
        assert why in check(f'require "{name}";')


def test_strings_comments_and_multiline() -> None:
    """Escapes in quoted strings, both comment forms, text: with dot-stuffing, numbers with
    units."""
    cmds = parse('# a comment\nrequire ["vacation"]; /* a\nblock */\n'
                 'if size :over 1K { discard; }\n'
                 'vacation :subject "say \\"hi\\"" text:\nline one\n..dotted\n.\n;\n')
    vac = cmds[-1]
    assert vac.tag_strings(":subject") == ['say "hi"']
    assert vac.strings(0) == ["line one\r\n.dotted\r\n"]
    assert cmds[1].tests[0].positional[0].value == 1024


def test_a_script_that_is_not_utf8_is_refused() -> None:
    """RFC 5228 section 2.4.2: strings are UTF-8."""
    with pytest.raises(SieveSyntaxError, match="not UTF-8"):
        parse(b'require "fileinto";\nfileinto "\xff";')


# --------------------------------------------------------------------------- running


def test_implicit_keep_and_what_cancels_it() -> None:
    """RFC 5228 2.10.2: keep, fileinto, redirect, discard cancel it; :copy and vacation do
    not."""
    assert kinds("") == [("implicit keep", "")]
    assert kinds("discard;") == [("discard", "")]
    assert kinds('require "copy";\nredirect :copy "a@example.net";') == [
        ("redirect", "a@example.net"), ("implicit keep", "")]
    assert kinds('require "vacation";\nvacation "away";') == [
        ("vacation", "away"), ("implicit keep", "")]


def test_ereject_and_reject_conflicts_are_runtime_errors() -> None:
    """ereject is an action (RFC 5429); reject with keep or vacation is an error with its
    line, so the caller keeps the message."""
    assert kinds('require "ereject";\nereject "go away";') == [("ereject", "go away")]
    with pytest.raises(SieveRuntimeError) as e:
        result('require ["reject", "vacation"];\nvacation "away";\nreject "no";')
    assert e.value.line == 3
    with pytest.raises(SieveRuntimeError, match="second vacation"):
        result('require "vacation";\nvacation "a";\nvacation "b";')


def test_null_sender_is_the_empty_string_for_every_address_part() -> None:
    """RFC 5228 section 5.4: envelope "from" of <> matches "" whatever the address part."""
    script = 'require "envelope";\nif envelope :domain :is "from" "" { discard; }'
    assert kinds(script, sender="") == [("discard", "")]
    assert kinds(script) == [("implicit keep", "")]


def test_limits_stop_a_script_and_say_which() -> None:
    """Steps, wall time, actions and redirects each end the run with SieveRuntimeError."""
    many = 'require "variables";\n' + 'set "a" "b";\n' * 50
    with pytest.raises(SieveRuntimeError, match="limit of 20 steps"):
        result(many, limits=Limits(steps=20))
    with pytest.raises(SieveRuntimeError, match="more than 2 redirects"):
        result('redirect "a@x.example";\nredirect "b@x.example";\nredirect "c@x.example";',
               limits=Limits(redirects=2))
    with pytest.raises(SieveRuntimeError, match="more than 1 actions"):
        result('require "fileinto";\nfileinto "a";\nfileinto "b";', limits=Limits(actions=1))
    ticks = iter(range(100))
    from pop3coexist.policy.sieve_run import Interpreter
    slow = Interpreter(parse(many), Limits(seconds=3), clock=lambda: next(ticks))
    with pytest.raises(SieveRuntimeError, match="limit of 3 s"):
        slow.run(MailContext.from_bytes("", "t@x.example", MSG))


def test_matches_is_linear_on_crafted_input() -> None:
    """A pattern of many stars against a long string that almost matches costs work linear in
    the string (counted in executed lines, not seconds: ten times the text is at most about
    ten times the lines, and never more than len(pattern) * len(text)); a backtracking regex
    would take exponential time and run out of the line budget at once."""
    pattern = "*a" * 30 + "*b"
    work = {}
    for n in (500, 5000):
        with workcount.lines(budget=len(pattern) * n) as w:
            assert _glob(pattern, "a" * n, "i;octet") is None
        work[n] = w.lines
    assert 0 < work[5000] <= 11 * work[500], work
    assert _glob("f?o*\\*", "fxobar*", "i;octet") == ["x", "bar"]


def test_variables_and_match_variables() -> None:
    """${N} from :matches, set modifiers, unknown variables expand to ""."""
    script = ('require ["variables", "fileinto"];\n'
              'if header :matches "subject" "* *" { set :lower "w" "${1}"; }\n'
              'fileinto "${w}-${2}-${nothing}";')
    assert kinds(script) == [("fileinto", "report-42-")]


def test_relational_numeric_and_flags() -> None:
    """:value with i;ascii-numeric compares numbers, not strings; imap4flags' internal
    variable is what hasflag sees and what keep takes."""
    script = ('require ["relational", "comparator-i;ascii-numeric", "imap4flags"];\n'
              'if header :value "gt" :comparator "i;ascii-numeric" "x-count" "9" '
              '{ addflag "\\\\Flagged"; }\n'
              'if hasflag "\\\\flagged" { keep; }')
    r = result(script)
    assert [a.kind for a in r.actions] == ["keep"] and r.actions[0].flags == ("\\Flagged",)


def test_header_values_are_unfolded_and_decoded() -> None:
    """A folded, RFC 2047 encoded Subject is compared as one decoded line."""
    msg = b"Subject: =?utf-8?q?Caf=C3=A9?=\r\n and more\r\n\r\nx\r\n"
    assert kinds('if header :is "subject" "Café and more" { discard; }', msg=msg) == [
        ("discard", "")]
