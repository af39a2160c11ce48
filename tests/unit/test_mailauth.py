"""Mail authentication in the unit tier (issue 13 items 4 to 6): the Authentication-Results
writer, DMARC record parsing and evaluation, SPF/DKIM/DMARC through a ``BlockingDNS`` whose
``query`` answers from a table (the libraries' DNS functions still run), the sender-
authentication stage over a fake ``ISenderVerifier``, DKIM signing and the signing queue, the
config keys and ``dkim keygen``."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pop3coexist.config import DkimConfig, DnsConfig, parse_config
from pop3coexist.errors import ConfigError
from pop3coexist.interfaces import (
    ISenderVerifier,
    MethodResult,
    SenderAuthentication,
    SMTPSession,
)
from pop3coexist.mailauth.resolver import BlockingDNS, DNSTemporaryError, spf_dns
from pop3coexist.mailauth.verify import SenderVerifier, from_domain, parse_dmarc
from pop3coexist.policy import authresults
from pop3coexist.policy.dkimsign import DkimSigner, SigningError, SigningQueue
from pop3coexist.policy.stages import CheckAuthentication, Message, Outcome

# --------------------------------------------------------------------------- helpers


class TableDNS(BlockingDNS):
    """The real BlockingDNS with its one network call, ``query``, answered from a table:
    ``{(name, type): [rdata text, ...] or "TEMP"}``."""

    def __init__(self, records: dict) -> None:
        super().__init__(DnsConfig(servers=("192.0.2.53",)))
        self.records = records
        self.asked: list[tuple[str, str]] = []

    def query(self, name: str, qtype: str, timeout: float | None = None) -> list:
        name = name.rstrip(".").lower()
        self.asked.append((name, qtype))
        found = self.records.get((name, qtype), [])
        if found == "TEMP":
            raise DNSTemporaryError(f"{qtype} {name}: Timeout")
        rdtype = dns.rdatatype.from_text(qtype)
        return [dns.rdata.from_text(dns.rdataclass.IN, rdtype, t) for t in found]


def _txt(value: str) -> str:
    return " ".join(f'"{value[i:i + 200]}"' for i in range(0, len(value), 200))


def _key(tmp_path: Path, name: str = "k.pem") -> tuple[Path, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / name
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def _verifier(records: dict, sample: float = 0.0) -> SenderVerifier:
    return SenderVerifier(TableDNS(records), lambda f, *a: defer.maybeDeferred(f, *a),
                          sample=lambda: sample)


MSG = (b"From: Ann <ann@fabrikam.test>\nTo: ted@pop.contoso.test\nSubject: hi\n"
       b"Date: Mon, 30 Nov 2026 12:00:00 +0000\n\nhello\n")


def _run(coro) -> object:
    box: list = []
    defer.ensureDeferred(coro).addBoth(box.append)
    return box[0]


# --------------------------------------------------------------------------- the field


def test_field_quotes_values_and_escapes_comments() -> None:
    """Property values are tokens or addr-specs as they are, anything else a quoted-string;
    comments have their parentheses escaped; one resinfo per folded line; dkim=none when
    there is no signature (RFC 8601 section 2.2)."""
    assert authresults.quote_value("ann@fabrikam.test") == "ann@fabrikam.test"
    assert authresults.quote_value('"a b"@x.test') == '"\\"a b\\"@x.test"'
    assert authresults.quote_value("") == '""'
    found = SenderAuthentication(
        MethodResult("spf", "pass", (("smtp.mailfrom", "ann@fabrikam.test"),), "ok (really)"),
        (), MethodResult("dmarc", "pass", (("header.from", "fabrikam.test"),)))
    assert authresults.format_value("mx.test", found) == (
        "mx.test;\n\tspf=pass (ok \\(really\\)) smtp.mailfrom=ann@fabrikam.test;"
        "\n\tdkim=none;\n\tdmarc=pass header.from=fabrikam.test")


@pytest.mark.parametrize(("value", "ours"), [
    ("mx.test; spf=pass", True),
    ("MX.Test; spf=pass", True),
    ("mx.test 1; dkim=pass", True),  # with a version
    ("(forged) mx.test; none", True),
    ("mx.test.evil; spf=pass", False),
    ("other.test; spf=pass smtp.mailfrom=mx.test", False),
])
def test_names_us_reads_the_authserv_id(value: str, ours: bool) -> None:
    """RFC 8601 section 5: a field is ours by its authserv-id alone (comments and version
    skipped, case ignored), never by a mention elsewhere."""
    assert authresults.names_us(value, "mx.test") is ours


# --------------------------------------------------------------------------- DMARC records


@pytest.mark.parametrize(("text", "expected"), [
    ("v=DMARC1; p=reject", ("reject", "reject", "r", "r", 100)),
    ("v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=20", ("quarantine", "none", "s", "s", 20)),
    ("v=DMARC1; p=bogus; rua=mailto:a@b.test", ("none", "none", "r", "r", 100)),
    ("v=DMARC1; p=bogus", None),
    ("v=spf1 -all", None),
    ("v=DMARC1; p=reject; pct=x", ("reject", "reject", "r", "r", 100)),
])
def test_parse_dmarc(text: str, expected) -> None:
    """RFC 7489 section 6.3 tags; an invalid p= makes the record unusable unless rua= is
    there (p=none then, section 6.6.3); a bad pct= is 100."""
    record = parse_dmarc(text)
    got = None if record is None else (record.p, record.sp, record.adkim, record.aspf, record.pct)
    assert got == expected


def test_from_domain_needs_exactly_one_author() -> None:
    """RFC 7489 section 6.6.1: one From: field with one address, or no DMARC domain."""
    assert from_domain(MSG) == "fabrikam.test"
    assert from_domain(b"From: a@x.test, b@y.test\n\nb\n") is None
    assert from_domain(b"From: a@x.test\nFrom: b@y.test\n\nb\n") is None
    assert from_domain(b"Subject: none\n\nb\n") is None


# --------------------------------------------------------------------------- the verifier


def test_verifier_is_an_isenderverifier() -> None:
    """The real verifier provides the interface the stage is given."""
    verifyObject(ISenderVerifier, _verifier({}))


def test_spf_results_through_the_configured_dns() -> None:
    """pyspf's look-ups go to the BlockingDNS of the check (mailauth.resolver.spf_dns):
    pass, softfail, fail; a DNS timeout is temperror; the null sender checks the HELO."""
    records = {("fabrikam.test", "TXT"): [_txt("v=spf1 ip4:192.0.2.5 ~all")],
               ("strict.test", "TXT"): [_txt("v=spf1 a:mx.strict.test -all")],
               ("mx.strict.test", "A"): ["192.0.2.7"],
               ("helo.test", "TXT"): [_txt("v=spf1 ip4:192.0.2.9 -all")],
               ("slow.test", "TXT"): "TEMP"}
    v = _verifier(records)
    assert v.check_spf("192.0.2.5", "h.test", "a@fabrikam.test")[0].result == "pass"
    assert v.check_spf("192.0.2.6", "h.test", "a@fabrikam.test")[0].result == "softfail"
    assert v.check_spf("192.0.2.7", "h.test", "b@strict.test")[0].result == "pass"
    assert v.check_spf("192.0.2.8", "h.test", "b@strict.test")[0].result == "fail"
    assert v.check_spf("192.0.2.8", "h.test", "c@slow.test")[0].result == "temperror"
    result, domain = v.check_spf("192.0.2.9", "helo.test", "")
    assert (result.result, result.properties, domain) == (
        "pass", (("smtp.helo", "helo.test"),), "helo.test")
    assert ("fabrikam.test", "TXT") in v.dns.asked


def test_dkim_pass_fail_permerror_temperror(tmp_path: Path) -> None:
    """Each DKIM-Signature is verified against the key in DNS: a good one passes, a changed
    body fails, a selector with no key is permerror, a key look-up timeout temperror."""
    key, published = _key(tmp_path)
    signer = DkimSigner([DkimConfig("fabrikam.test", "s1", key)])
    signed = signer.sign(MSG)
    assert signed is not None
    records = {("s1._domainkey.fabrikam.test", "TXT"): [_txt(published)]}
    v = _verifier(records)
    [ok] = v.check_dkim(signed)
    assert (ok.result.result, ok.domain) == ("pass", "fabrikam.test")
    assert ("header.s", "s1") in ok.result.properties
    [bad] = v.check_dkim(signed.replace(b"hello", b"hullo"))
    assert bad.result.result == "fail"
    [nokey] = _verifier({}).check_dkim(signed)
    assert nokey.result.result == "permerror"
    [temp] = _verifier({("s1._domainkey.fabrikam.test", "TXT"): "TEMP"}).check_dkim(signed)
    assert temp.result.result == "temperror"
    assert v.check_dkim(MSG) == []


def _dmarc_case(records: dict, author: str, spf: str, spf_domain: str,
                dkim_domains: tuple[str, ...] = (), sample: float = 0.0):
    from pop3coexist.mailauth.verify import DkimOutcome

    v = _verifier(records, sample)
    message = MSG.replace(b"ann@fabrikam.test", f"ann@{author}".encode())
    dkim = [DkimOutcome(MethodResult("dkim", "pass"), d) for d in dkim_domains]
    return v.check_dmarc(message, MethodResult("spf", spf), spf_domain, dkim)


def test_dmarc_alignment_organisational_domain_and_sampling() -> None:
    """RFC 7489: relaxed alignment accepts the same organisational domain, strict only the
    same domain; a subdomain without its own record uses the organisational domain's, with
    sp=; pct= outside the sample applies reject as quarantine; a policy look-up timeout is
    temperror; no record is none."""
    org = {("_dmarc.fabrikam.test", "TXT"): [_txt("v=DMARC1; p=none; sp=reject")]}
    result, domain, policy = _dmarc_case(org, "news.fabrikam.test", "pass", "fabrikam.test")
    assert (result.result, domain, policy) == ("pass", "news.fabrikam.test", "reject")
    result, _, policy = _dmarc_case(org, "news.fabrikam.test", "fail", "fabrikam.test")
    assert (result.result, policy) == ("fail", "reject")  # sp= for the subdomain
    result, _, policy = _dmarc_case(org, "fabrikam.test", "fail", "fabrikam.test")
    assert (result.result, policy) == ("fail", "none")  # p= for the domain itself

    strict = {("_dmarc.fabrikam.test", "TXT"): [_txt("v=DMARC1; p=reject; adkim=s; aspf=s")]}
    result, _, _ = _dmarc_case(strict, "fabrikam.test", "pass", "mail.fabrikam.test",
                               ("mail.fabrikam.test",))
    assert result.result == "fail"
    result, _, _ = _dmarc_case(strict, "fabrikam.test", "fail", "x.test", ("fabrikam.test",))
    assert result.result == "pass"

    sampled = {("_dmarc.fabrikam.test", "TXT"): [_txt("v=DMARC1; p=reject; pct=10")]}
    result, _, policy = _dmarc_case(sampled, "fabrikam.test", "fail", "", sample=0.5)
    assert (result.result, policy, result.comment) == (
        "fail", "quarantine", "p=reject sp=reject dis=quarantine")
    _, _, policy = _dmarc_case(sampled, "fabrikam.test", "fail", "", sample=0.05)
    assert policy == "reject"

    temp = {("_dmarc.fabrikam.test", "TXT"): "TEMP"}
    assert _dmarc_case(temp, "fabrikam.test", "pass", "fabrikam.test")[0].result == "temperror"
    assert _dmarc_case({}, "fabrikam.test", "pass", "fabrikam.test")[0].result == "none"
    two = {("_dmarc.fabrikam.test", "TXT"): [_txt("v=DMARC1; p=reject"),
                                             _txt("v=DMARC1; p=none")]}
    assert _dmarc_case(two, "fabrikam.test", "fail", "")[0].result == "none"


def test_spf_dns_sends_pyspf_to_the_check_of_this_thread() -> None:
    """Outside ``spf_dns`` pyspf's look-up function refuses to guess a resolver."""
    import spf

    dns_a = TableDNS({("a.test", "A"): ["192.0.2.1"]})
    with spf_dns(dns_a):
        assert spf.DNSLookup("a.test", "A", True, 5) == [(("a.test", "A"), "192.0.2.1")]
    with pytest.raises(RuntimeError):
        spf.DNSLookup("a.test", "A", True, 5)


# --------------------------------------------------------------------------- the stage


class Spool:
    """An in-memory ISpool."""

    queue_id = "q1"

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.aborted = False

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self) -> bytes:
        return self.data

    def replace(self, data: bytes) -> None:
        self.data = data

    def abort(self) -> None:
        self.aborted = True


@implementer(ISenderVerifier)
class FakeVerifier:
    """Gives the same SenderAuthentication for every message; records the calls."""

    def __init__(self, found: SenderAuthentication) -> None:
        self.found = found
        self.calls: list[tuple] = []

    def verify(self, message: bytes, client_ip: str, helo: str | None,
               mail_from: str) -> defer.Deferred:
        self.calls.append((message, client_ip, helo, mail_from))
        return defer.succeed(self.found)


def _found(dmarc: str, policy: str) -> SenderAuthentication:
    return SenderAuthentication(
        MethodResult("spf", "fail", (("smtp.mailfrom", "ann@fabrikam.test"),)), (),
        MethodResult("dmarc", dmarc, (("header.from", "fabrikam.test"),)),
        "fabrikam.test", policy)


FORGED = (b"Authentication-Results: mx.test; spf=pass\n"
          b"Authentication-Results: other.test; dkim=pass\n")


def _stage_message(user: str | None = None, ip: str = "198.51.100.7") -> Message:
    return Message("q1", Spool(FORGED + MSG), "ann@fabrikam.test", [],
                   session=SMTPSession(ip, "mail.fabrikam.test"), user=user)


@pytest.mark.parametrize(("dmarc", "policy", "knob", "outcome"), [
    ("fail", "reject", "reject", Outcome.REFUSE),
    ("fail", "reject", "mark", Outcome.CONTINUE),
    ("fail", "quarantine", "reject", Outcome.CONTINUE),
    ("pass", "reject", "reject", Outcome.CONTINUE),
])
def test_stage_marks_and_refuses_by_the_knob(dmarc: str, policy: str, knob: str,
                                             outcome: Outcome) -> None:
    """Mail from outside: our forged field is removed, another host's stays, ours goes on
    top; dmarc=fail under p=reject is refused 550 5.7.1 only with dmarc_reject = "reject"."""
    verifier = FakeVerifier(_found(dmarc, policy))
    verifyObject(ISenderVerifier, verifier)
    stage = CheckAuthentication(verifier, lambda ip: ip == "192.0.2.1", "mx.test", knob)
    msg = _stage_message()
    verdict = _run(stage(msg))
    assert verdict.outcome is outcome
    if outcome is Outcome.REFUSE:
        assert (verdict.error.code, verdict.error.enhanced) == (550, "5.7.1")
        assert "fabrikam.test" in str(verdict.error)
    [(seen, ip, helo, sender)] = verifier.calls
    assert (seen, ip, helo, sender) == (FORGED + MSG, "198.51.100.7", "mail.fabrikam.test",
                                        "ann@fabrikam.test")
    data = msg.spool.data
    assert data.startswith(b"Authentication-Results: mx.test;\n\tspf=fail")
    assert data.count(b"Authentication-Results: mx.test") == 1
    assert b"Authentication-Results: other.test; dkim=pass\n" in data
    assert data.endswith(MSG)


@pytest.mark.parametrize(("user", "ip"), [("ted@pop.contoso.test", "198.51.100.7"),
                                          (None, "192.0.2.1")])
def test_stage_leaves_mail_from_inside_alone(user: str | None, ip: str) -> None:
    """A logged-in client or one of relay.networks: no check, no edit."""
    verifier = FakeVerifier(_found("fail", "reject"))
    stage = CheckAuthentication(verifier, lambda a: a == "192.0.2.1", "mx.test")
    msg = _stage_message(user, ip)
    assert _run(stage(msg)).outcome is Outcome.CONTINUE
    assert verifier.calls == [] and msg.spool.data == FORGED + MSG


# --------------------------------------------------------------------------- signing


def test_signer_picks_the_domain_signs_present_fields_and_oversigns_from(tmp_path: Path) -> None:
    """The From: domain or its nearest parent with a key signs; h= has the usual fields the
    message has (each as often as it occurs), never Received, and From once more; no key for
    the domain, or not exactly one From address: not signed."""
    key, _ = _key(tmp_path)
    signer = DkimSigner([DkimConfig("contoso.test", "s1", key),
                         DkimConfig("pop.contoso.test", "s2", key)])
    assert signer.key_for("a.b.contoso.test").selector == "s1"
    assert signer.key_for("pop.contoso.test").selector == "s2"
    assert signer.key_for("contoso.test.evil") is None
    msg = (b"Received: from x\nFrom: ted@mail.contoso.test\nTo: a@b.test\nTo: c@d.test\n"
           b"Subject: s\nX-Other: 1\n\nbody\n")
    signed = signer.sign(msg)
    assert signed is not None and signed.endswith(msg)
    field = signed.split(b"\nReceived:", 1)[0].decode()
    flat = "".join(field.split())
    assert "d=contoso.test;" in flat and "s=s1;" in flat and "c=relaxed/relaxed;" in flat
    h = flat.split("h=", 1)[1].split(";", 1)[0]
    assert h.split(":") == ["from", "to", "to", "subject", "from"]
    assert b"\r" not in signed  # the queue keeps LF line ends
    assert signer.sign(msg.replace(b"contoso.test", b"fabrikam.test")) is None
    assert signer.sign(b"From: a@contoso.test, b@contoso.test\n\nx\n") is None


def test_signer_headers_setting_and_unreadable_key(tmp_path: Path) -> None:
    """``headers`` replaces the usual set (From still oversigned); a key that cannot be read
    is a SigningError naming the file, at check() and at sign()."""
    key, _ = _key(tmp_path)
    signer = DkimSigner([DkimConfig("contoso.test", "s1", key, ("from", "subject"))])
    signed = signer.sign(b"From: a@contoso.test\nTo: b@x.test\nSubject: s\n\nb\n")
    flat = "".join(signed.split(b"\nFrom:", 1)[0].decode().split())
    assert flat.split("h=", 1)[1].split(";", 1)[0] == "from:subject:from"
    missing = DkimSigner([DkimConfig("contoso.test", "s1", tmp_path / "nope.pem")])
    with pytest.raises(SigningError, match="nope.pem"):
        missing.check()
    (tmp_path / "bad.pem").write_text("not a key\n")
    with pytest.raises(SigningError, match="bad.pem"):
        DkimSigner([DkimConfig("contoso.test", "s1", tmp_path / "bad.pem")]).check()


class RecordingQueue:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, dict]] = []

    def enqueue(self, source: object, envelope: dict) -> str:
        self.calls.append((Path(str(source)).read_bytes(), envelope))
        return "qid"

    def wake(self) -> None:
        pass


def test_signing_queue_signs_only_mail_from_inside(tmp_path: Path) -> None:
    """The envelope's "inside" decides; it is not passed on; the signed copy is removed after
    it is queued; mail from outside and mail without a key go as they are."""
    key, _ = _key(tmp_path)
    inner = RecordingQueue()
    queue = SigningQueue(inner, DkimSigner([DkimConfig("contoso.test", "s1", key)]))
    src = tmp_path / "spool"
    src.write_bytes(b"From: a@contoso.test\nSubject: s\n\nb\n")
    env = {"sender": "a@contoso.test", "recipients": [{"address": "b@x.test"}]}
    queue.enqueue(src, {**env, "inside": True})
    queue.enqueue(src, {**env, "inside": False})
    queue.enqueue(src, env)
    (signed, e1), (plain, e2), (plain2, e3) = inner.calls
    assert signed.startswith(b"DKIM-Signature: ") and signed.endswith(src.read_bytes())
    assert plain == plain2 == src.read_bytes()
    assert "inside" not in e1 and "inside" not in e2 and e3 == env
    assert sorted(os.listdir(tmp_path)) == ["k.pem", "spool"]


# --------------------------------------------------------------------------- config, admin


BASE = '[server]\nhostname = "pop.contoso.test"\nstate_dir = "/tmp/x"\n'


@pytest.mark.parametrize(("text", "message"), [
    ('[dns]\nservers = ["dns.example"]\n', "[dns.servers]"),
    ("[dns]\nport = 70000\n", "[dns.port]"),
    ('[[dkim]]\ndomain = "contoso.test"\nselector = "s1"\n', "[dkim.key_file] is required"),
    ('[[dkim]]\ndomain = "contoso.test"\nselector = "a b"\nkey_file = "k"\n', "[dkim.selector]"),
    ('[[dkim]]\ndomain = "contoso.test"\nselector = "s1"\nkey_file = "k"\nheaders = ["to"]\n',
     "must name From"),
    ('[[dkim]]\ndomain = "contoso.test"\nselector = "s1"\nkey_file = "k"\n'
     'headers = ["from", "received"]\n', "must not be signed"),
    ('[[dkim]]\ndomain = "a.test"\nselector = "s1"\nkey_file = "k"\n'
     '[[dkim]]\ndomain = "a.test"\nselector = "s2"\nkey_file = "k"\n', "two [[dkim]] entries"),
    ('[sender_authentication]\ndmarc_reject = "bounce"\n', "[sender_authentication.dmarc_reject]"),
])
def test_config_errors_name_the_key(text: str, message: str) -> None:
    """Each wrong setting is a ConfigError naming its key."""
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + text)
    assert message in str(e.value)


def test_config_defaults_and_section_presence() -> None:
    """No [dns] servers: resolv.conf's; [sender_authentication] present turns the checks on,
    absent leaves them off."""
    cfg = parse_config(BASE)
    assert (cfg.dns.servers, cfg.dns.port, cfg.dkim, cfg.sender_authentication.enabled) == (
        (), 53, (), False)
    cfg = parse_config(BASE + '[dns]\nservers = ["::1", "127.0.0.1"]\n[sender_authentication]\n')
    assert cfg.dns.servers == ("::1", "127.0.0.1") and cfg.sender_authentication.enabled


def test_keygen_writes_a_private_key_and_prints_a_record_that_verifies(tmp_path: Path) -> None:
    """``dkim keygen``: mode 0600, the TXT value printed is the key's public half, a second
    run with the same selector is refused (exit 1, one line), a bad --bits too."""
    from pop3coexist.admin.cli import run

    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nhostname = "pop.contoso.test"\nstate_dir = "{tmp_path}/var"\n')
    out = io.StringIO()
    assert run(["-c", str(config), "dkim", "keygen", "Contoso.Test", "mail2026",
                "--bits", "1024"], out) == 0
    path = tmp_path / "var" / "dkim" / "contoso.test.mail2026.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    text = out.getvalue()
    record = "".join(text.split("IN TXT (", 1)[1].split(")", 1)[0].split('"')[1::2])
    assert text.count("mail2026._domainkey.contoso.test. 3600 IN TXT") == 1
    signer = DkimSigner([DkimConfig("contoso.test", "mail2026", path)])
    signed = signer.sign(MSG.replace(b"fabrikam.test", b"contoso.test"))
    v = _verifier({("mail2026._domainkey.contoso.test", "TXT"): [_txt(record)]})
    assert [d.result.result for d in v.check_dkim(signed)] == ["pass"]
    assert run(["-c", str(config), "dkim", "keygen", "contoso.test", "mail2026"], out) == 1
    assert run(["-c", str(config), "dkim", "keygen", "contoso.test", "s9", "--bits", "512"],
               out) == 1


def test_check_config_names_an_unreadable_dkim_key(tmp_path: Path, capsys) -> None:
    """``check-config`` (and the server's start) refuse a [[dkim]] key that cannot be read,
    with one line naming the config's dkim.key_file and the file."""
    from pop3coexist.admin.cli import run

    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nhostname = "pop.contoso.test"\nstate_dir = "{tmp_path}/var"\n'
                      '[[dkim]]\ndomain = "contoso.test"\nselector = "s1"\n'
                      'key_file = "missing.pem"\n')
    assert run(["-c", str(config), "check-config"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "[dkim.key_file]" in err and "missing.pem" in err


def test_both_resolvers_ask_the_configured_servers() -> None:
    """[dns] servers and port reach the twisted.names resolver of the MX look-ups (after
    /etc/hosts) and the dnspython resolver of the checks; the timeout bounds each query."""
    from twisted.internet.task import Clock
    from twisted.names import client, hosts

    from pop3coexist.mailauth.resolver import twisted_resolver

    cfg = DnsConfig(servers=("192.0.2.53", "2001:db8::53"), port=5353, timeout=4.0)
    chain = twisted_resolver(cfg, Clock())
    assert isinstance(chain.resolvers[0], hosts.Resolver)
    upstream = chain.resolvers[-1]
    assert isinstance(upstream, client.Resolver)
    assert upstream.servers == [("192.0.2.53", 5353), ("2001:db8::53", 5353)]
    assert sum(upstream.timeout) == pytest.approx(4.0)
    blocking = BlockingDNS(cfg)
    assert blocking.resolver.nameservers == ["192.0.2.53", "2001:db8::53"]
    assert (blocking.resolver.port, blocking.resolver.lifetime) == (5353, 4.0)
