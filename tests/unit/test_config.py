"""The config file: defaults, units, strict validation that names the key, and unsafe combinations."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from pop3coexist.config import load_config, parse_config, parse_duration, parse_size
from pop3coexist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
[server]
hostname = "pop.contoso.test"
state_dir = "var"
"""


def cfg(extra: str = "", path: Path | None = None):
    return parse_config(textwrap.dedent(MINIMAL) + textwrap.dedent(extra), path)


def error_of(extra: str, path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        cfg(extra, path)
    return str(info.value)


def test_embedded_default_config_loads():
    """etc/pop3coexist.toml is valid, keeps state under var/ and listens on loopback high ports."""
    c = load_config(ROOT / "etc" / "pop3coexist.toml")
    assert c.server.state_dir == ROOT / "var"
    assert c.pop3.listen == ("tcp:1110:interface=127.0.0.1",)
    assert c.pop3.tls_listen == ("tcp:1995:interface=127.0.0.1",)
    assert c.smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert c.smtp.submission_listen == ("tcp:2587:interface=127.0.0.1",)
    assert c.smtp.tls_listen == ("tcp:2465:interface=127.0.0.1",)
    assert c.auth.method == "passwordfile" and c.auth.apop
    assert c.domains.local == ("pop.contoso.test",)


def test_defaults_mirror_the_reference():
    """Unset keys take the documented defaults (IIS-like retries, 10 MB, 100 recipients, 30 hops)."""
    c = cfg()
    assert c.smtp.max_message_size == 10_000_000
    assert c.smtp.max_recipients == 100
    assert c.smtp.max_hop_count == 30
    assert c.queue.retry_intervals == (900.0, 1800.0, 3600.0, 14400.0)
    assert c.queue.delay_notification == 12 * 3600
    assert c.queue.expiration == 2 * 86400
    assert c.relay.authenticated is True
    assert c.pop3.idle_timeout >= 600


@pytest.mark.parametrize(
    "text,value",
    [(0, 0), (2048, 2048), ("10MB", 10_000_000), ("10 mb", 10_000_000), ("2KiB", 2048), ("1GB", 10**9), ("512", 512)],
)
def test_sizes(text, value):
    """Sizes are bytes or strings with decimal (KB, MB) or binary (KiB, MiB) units."""
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text,value", [(30, 30.0), ("30s", 30.0), ("15m", 900.0), ("12h", 43200.0), ("2d", 172800.0), ("1.5", 1.5)]
)
def test_durations(text, value):
    """Durations are seconds or strings with s, m, h, d."""
    assert parse_duration(text) == value


@pytest.mark.parametrize("bad", ["ten", "-1", "5 parsecs", True])
def test_bad_sizes_are_refused(bad):
    """A size that is not a size is a ValueError (reported against its key)."""
    with pytest.raises(ValueError):
        parse_size(bad)


def test_unknown_key_names_key_file_and_line(tmp_path):
    """An unknown key is refused, naming the section.key, the file and the line."""
    p = tmp_path / "c.toml"
    text = textwrap.dedent(MINIMAL) + "\n[smtp]\nmax_message_size = 10\nmax_mesage_count = 3\n"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    message = str(info.value)
    assert "[smtp.max_mesage_count]" in message
    assert f"{p}:8:" in message
    assert "unknown key" in message


def test_unknown_section_is_refused():
    """A section nobody knows is an error, not silently ignored."""
    assert "[nntp]" in error_of("[nntp]\nlisten = []\n")


@pytest.mark.parametrize(
    "extra,key",
    [
        ("[pop3]\nrequire_secure_auth = \"yes\"\n", "pop3.require_secure_auth"),
        ("[smtp]\nmax_recipients = \"many\"\n", "smtp.max_recipients"),
        ("[smtp]\nmax_message_size = \"huge\"\n", "smtp.max_message_size"),
        ("[pop3]\nlisten = \"tcp:110\"\n", "pop3.listen"),
        ("[pop3]\nlisten = [\"110\"]\n", "pop3.listen"),
        ("[auth]\nmethod = \"kerberos\"\n", "auth.method"),
        ("[relay]\nnetworks = [\"not-a-net\"]\n", "relay.networks"),
        ("[smarthost]\ntls = \"sometimes\"\n", "smarthost.tls"),
        ("[smarthost]\nhost = \"[mail.example.com]:25\"\n", "smarthost.host"),
        ("[queue]\nretry_intervals = []\n", "queue.retry_intervals"),
        ("[domains]\nlocal = [\"localhost\"]\n", "domains.local"),
        ("[domains]\nlocal = [\"a.test\", \"A.test\"]\n", "domains.local"),
    ],
)
def test_wrong_types_and_values_name_the_key(extra, key):
    """Every wrong value is reported against its own key."""
    assert f"[{key}]" in error_of(extra)


def test_missing_server_keys():
    """hostname and state_dir are required."""
    with pytest.raises(ConfigError, match=r"\[server.hostname\] is required"):
        parse_config("[server]\nstate_dir = 'v'\n")
    with pytest.raises(ConfigError, match=r"\[server.state_dir\] is required"):
        parse_config("[server]\nhostname = 'a.test'\n")


def test_invalid_toml_is_reported():
    """A syntax error is one clear ConfigError."""
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[server\nhostname=")


def test_missing_file_is_reported(tmp_path):
    """A config file that does not exist is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "extra,key",
    [
        ("[[domains.remote]]\nname = \"*\"\n", "domains.remote.name"),
        ("[[domains.remote]]\nname = \"*.example.com\"\n", "domains.remote.name"),
        ("[relay]\nnetworks = [\"0.0.0.0/0\"]\n", "relay.networks"),
        ("[relay]\nnetworks = [\"::/0\"]\n", "relay.networks"),
    ],
)
def test_open_relay_configurations_are_refused(extra, key):
    """A relay domain of * or a relay network covering everything would be an open relay."""
    message = error_of(extra)
    assert f"[{key}]" in message and "open relay" in message


def test_apop_with_directory_is_refused(tmp_path):
    """auth.apop = true needs the shared secret, which the directory does not keep."""
    secret = tmp_path / "bind.secret"
    secret.write_text("s3cret\n")
    extra = f"""
    [auth]
    method = "directory"
    apop = true
    [auth.directory]
    base_dn = "dc=x,dc=test"
    bind_dn = "cn=svc,dc=x,dc=test"
    bind_password_file = "{secret}"
    """
    assert "[auth.apop]" in error_of(extra)


def test_apop_defaults_off_for_directory(tmp_path):
    """With method directory and no apop key, APOP is simply off."""
    secret = tmp_path / "bind.secret"
    secret.write_text("s3cret\n")
    c = cfg(f"""
    [auth]
    method = "directory"
    [auth.directory]
    base_dn = "dc=x,dc=test"
    bind_dn = "cn=svc,dc=x,dc=test"
    bind_password_file = "{secret}"
    """)
    assert c.auth.apop is False
    assert c.auth.directory.attributes.proxy_addresses == "proxyAddresses"


def test_directory_requires_its_keys():
    """method = directory without bind settings names the missing key."""
    assert "[auth.directory.base_dn]" in error_of("[auth]\nmethod = \"directory\"\n")


def test_local_accounts_allow_one_domain():
    """PAM accounts have one address each: a second local domain is refused."""
    message = error_of("[auth]\nmethod = \"local\"\n[domains]\nlocal = [\"a.test\", \"b.test\"]\n")
    assert "[domains.local]" in message


def test_tls_listeners_need_certificates():
    """An implicit-TLS listener without [tls] files is refused."""
    assert "[pop3.tls_listen]" in error_of("[pop3]\ntls_listen = [\"tcp:0\"]\n")
    assert "[smtp.require_tls_for_auth]" in error_of("[smtp]\nrequire_tls_for_auth = true\n")


def test_tls_files_must_exist(tmp_path):
    """A certificate path that does not exist is named."""
    p = tmp_path / "c.toml"
    p.write_text(MINIMAL + "[tls]\ncertificate = \"nope.pem\"\nprivate_key = \"nope.key\"\n")
    with pytest.raises(ConfigError, match=r"\[tls.certificate\] file not found"):
        load_config(p)


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    """state_dir and other paths are taken from the config file's folder."""
    p = tmp_path / "etc" / "c.toml"
    p.parent.mkdir()
    p.write_text(MINIMAL.replace('"var"', '"../state"'))
    assert load_config(p).server.state_dir == tmp_path / "state"


def test_remote_domains_and_routes():
    """Remote relay domains with optional [address]:port routes are parsed and checked."""
    c = cfg("""
    [[domains.remote]]
    name = "Exchange.Northwindtraders.test"
    route = "[127.0.0.1]:2526"
    [[domains.remote]]
    name = "other.test"
    relay = false
    """)
    assert c.domains.remote[0].name == "exchange.northwindtraders.test"
    assert c.domains.remote[0].route == "[127.0.0.1]:2526"
    assert c.domains.remote[1].relay is False and c.domains.remote[1].route is None


def test_remote_domain_cannot_be_local_too():
    """A domain cannot be both local and remote."""
    message = error_of("[domains]\nlocal = [\"a.test\"]\n[[domains.remote]]\nname = \"a.test\"\n")
    assert "also a local domain" in message


def test_smarthost_username_needs_password_file():
    """AUTH to the smart host needs a password file (never a password in the config)."""
    assert "[smarthost.password_file]" in error_of("[smarthost]\nusername = \"svc\"\n")


@pytest.mark.parametrize("section,value,seconds,line", [
    ("pop3", '"1m"', 60.0, "10 minutes RFC 1939"),
    ("pop3", '"9m"', 540.0, "10 minutes RFC 1939"),
    ("smtp", '"1m"', 60.0, "5 minutes RFC 5321"),
    ("smtp", "30", 30.0, "5 minutes RFC 5321"),
])
def test_idle_timeout_under_the_rfc_minimum_is_a_warning(tmp_path, section, value, seconds,
                                                         line):
    """Fault 8 (a limit a peer accepts): an idle timeout under RFC 1939's 10 minutes (POP3) or
    RFC 5321's 5 minutes (SMTP) is taken, as Postfix's smtpd_timeout and the Windows POP3
    service's socket timeout are, and reported as a warning naming file, line and key."""
    path = tmp_path / "pop3coexist.toml"
    path.write_text(textwrap.dedent(MINIMAL) + f"[{section}]\nidle_timeout = {value}\n")
    c = load_config(path)
    assert getattr(c, section).idle_timeout == seconds
    (warning,) = c.warnings
    assert warning.startswith(f"{path}:6: [{section}.idle_timeout]") and line in warning


@pytest.mark.parametrize("section", ["pop3", "smtp"])
def test_idle_timeout_of_zero_is_an_error(section):
    """An idle timeout of zero would close every session at once: an error naming the key."""
    assert f"[{section}.idle_timeout] must be longer than zero" in error_of(
        f"[{section}]\nidle_timeout = 0\n")


def test_idle_timeouts_at_the_rfc_minimum_give_no_warning():
    """10 minutes for POP3 and 5 for SMTP are quiet."""
    c = cfg('[pop3]\nidle_timeout = "10m"\n[smtp]\nidle_timeout = "5m"\n')
    assert c.warnings == ()


@pytest.mark.parametrize("value,seconds", [('"1w"', 604800.0), ('"2d"', 172800.0)])
def test_week_durations(value, seconds):
    """Durations take Postfix's units, weeks included."""
    assert cfg(f"[queue]\nexpiration = {value}\n").queue.expiration == seconds


def test_max_message_size_zero_means_no_fixed_maximum():
    """Fault 8: smtp.max_message_size = 0 is taken (as Postfix takes it) and means no fixed
    maximum, which is what EHLO's ``SIZE 0`` tells clients (RFC 1870 section 4)."""
    assert cfg("[smtp]\nmax_message_size = 0\n").smtp.max_message_size == 0


@pytest.mark.parametrize("value", [1, 10, 50, 99])
def test_max_recipients_below_100_is_a_warning(tmp_path, value):
    """Fault 8: any positive smtp.max_recipients is taken (the Windows SMTP service and Postfix
    allow lower limits); under RFC 5321's 100 it is kept and reported as a warning that names
    the file, the line and the key."""
    path = tmp_path / "pop3coexist.toml"
    path.write_text(textwrap.dedent(MINIMAL) + f"[smtp]\nmax_recipients = {value}\n")
    c = load_config(path)
    assert c.smtp.max_recipients == value
    assert len(c.warnings) == 1
    warning = c.warnings[0]
    assert warning.startswith(f"{path}:6: [smtp.max_recipients]")
    assert "RFC 5321" in warning and "100" in warning


@pytest.mark.parametrize("value", [100, 101, 1000])
def test_max_recipients_of_100_or_more_gives_no_warning(value):
    """No warning from 100 recipients up."""
    c = cfg(f"[smtp]\nmax_recipients = {value}\n")
    assert c.smtp.max_recipients == value and c.warnings == ()


@pytest.mark.parametrize("value", ["0", "-5", "\"ten\"", "true"])
def test_max_recipients_must_be_a_positive_number(value):
    """Zero, negative and non-numbers stay refused, naming the key."""
    assert "[smtp.max_recipients]" in error_of(f"[smtp]\nmax_recipients = {value}\n")


def test_pop3_sasl_mechanisms():
    """pop3.sasl_mechanisms takes known names in any case (duplicates folded); others are refused."""
    assert cfg('[pop3]\nsasl_mechanisms = ["plain", "CRAM-MD5", "PLAIN"]\n').pop3.sasl_mechanisms == (
        "PLAIN", "CRAM-MD5")
    assert cfg('[pop3]\nsasl_mechanisms = []\n').pop3.sasl_mechanisms == ()
    assert "[pop3.sasl_mechanisms]" in error_of('[pop3]\nsasl_mechanisms = ["NTLM"]\n')


@pytest.mark.parametrize("value,ok", [("1", 1), ("4", 4), ("64", 64)])
def test_workers_takes_a_number_of_processes(value, ok):
    """server.workers is a whole number of processes (default 1)."""
    text = MINIMAL.replace('state_dir = "var"', f'state_dir = "var"\nworkers = {value}')
    assert parse_config(text).server.workers == ok
    assert parse_config(MINIMAL).server.workers == 1


def test_workers_auto_is_one_per_usable_cpu():
    """workers = "auto" is the number of CPUs this process may run on (at least 1)."""
    text = MINIMAL.replace('state_dir = "var"', 'state_dir = "var"\nworkers = "auto"')
    assert parse_config(text).server.workers == max(1, min(64, len(os.sched_getaffinity(0))))


@pytest.mark.parametrize("value", ["0", "65", "-1", '"two"', "true", "1.5"])
def test_bad_workers_values_name_the_key(value):
    """Out-of-range or non-numbers for server.workers are refused against their key."""
    text = MINIMAL.replace('state_dir = "var"', f'state_dir = "var"\nworkers = {value}')
    with pytest.raises(ConfigError, match=r"\[server.workers\]"):
        parse_config(text)


def test_postmaster_and_abuse_keys():
    """domains.postmaster / domains.abuse: "" by default; a full address, kept in canonical
    form with the local part in lower case; anything else is an error naming the key."""
    assert (cfg().domains.postmaster, cfg().domains.abuse) == ("", "")
    c = cfg('[domains]\nlocal = ["pop.contoso.test"]\npostmaster = "Admin@Pop.Contoso.Test"\n'
            'abuse = "security@corp.example"\n')
    assert (c.domains.postmaster, c.domains.abuse) == ("admin@pop.contoso.test", "security@corp.example")
    for bad in ('postmaster = "admin"', 'postmaster = "admin@[127.0.0.1]"', 'abuse = "a b@x.test"',
                'abuse = 3'):
        assert f"[domains.{bad.split(' ')[0]}]" in error_of(f"[domains]\n{bad}\n")
    message = error_of('[domains]\nlocal = ["pop.contoso.test"]\npostmaster = "\\"a b\\"@pop.contoso.test"\n')
    assert "[domains.postmaster]" in message and "mailbox name" in message


# Numbers whose zero (or negative, infinite, NaN) value means nothing: refused at start-up,
# naming file, line and key. (section header as written, key, lines the section needs beside
# the key.) Clean-up of 2026-11-30: ``connect_timeout = 0`` was accepted.
MILTER = 'socket = "inet:127.0.0.1:1"\n'
MUST_BE_POSITIVE = [
    ("[pop3]", "idle_timeout", ""),
    ("[smtp]", "idle_timeout", ""),
    ("[auth.directory]", "timeout", ""),
    ("[smarthost]", "connect_timeout", ""),
    ("[smarthost]", "command_timeout", ""),
    ("[queue]", "delay_notification", ""),
    ("[queue]", "expiration", ""),
    ("[imap]", "idle_timeout", ""),
    ("[imap]", "max_literal", ""),
    ("[dns]", "timeout", ""),
    ("[sender_authentication]", "spf_timeout", ""),
    ("[sieve]", "max_run_time", ""),
    ("[sieve]", "srs_max_age", ""),
    ("[managesieve]", "idle_timeout", ""),
    ("[managesieve]", "max_script_size", ""),
    ("[metrics]", "store_refresh", ""),
    ("[admin_web]", "session_timeout", ""),
    ("[admin_web]", "graph_interval", ""),
    ("[admin_web]", "graph_history", ""),
    ("[[milter]]", "connect_timeout", MILTER),
    ("[[milter]]", "command_timeout", MILTER),
    ("[[milter]]", "content_timeout", MILTER),
    ("[web]", "session_idle_timeout", ""),
    ("[web]", "session_max_age", ""),
    ("[web]", "max_upload", ""),
    ("[web]", "parse_budget", ""),
]
ZERO_AND_WORSE = ['0', '0.0', '"0s"', '"0m"', '"0"', '-1', '-0.5', 'inf', 'nan', '"-1s"']


@pytest.mark.parametrize("value", ZERO_AND_WORSE)
@pytest.mark.parametrize(("header", "name", "extra"), MUST_BE_POSITIVE)
def test_meaningless_zero_values_are_refused(tmp_path, header, name, extra, value):
    """A timeout, interval, age or size limit of zero (or a negative, infinite or NaN one)
    would time out at once, loop or refuse everything: start-up fails with an error naming the
    file, the line and the key."""
    path = tmp_path / "pop3coexist.toml"
    text = textwrap.dedent(MINIMAL) + f"{header}\n{extra}{name} = {value}\n"
    path.write_text(text)
    line = text.splitlines().index(f"{name} = {value}") + 1
    with pytest.raises(ConfigError) as info:
        load_config(path)
    dotted = header.strip("[]") + "." + name
    assert str(info.value).startswith(f"{path}:{line}: [{dotted}] "), str(info.value)


@pytest.mark.parametrize(("header", "name", "extra"), MUST_BE_POSITIVE)
def test_the_smallest_positive_values_are_taken(header, name, extra):
    """The refusal is of zero only: one second (or one byte) is a legal, if unusual, value."""
    c = cfg(f"{header}\n{extra}{name} = 1\n")
    assert c is not None


def test_every_zero_refusing_key_is_in_the_table():
    """Every key declared with a must-be-positive duration or size converter is in the table
    above, so a new one gets a test row (and the table names no key that takes zero)."""
    from pop3coexist.config import _period, _positive_size, declared_keys
    declared = {k for k, spec in declared_keys() if spec.convert in (_period, _positive_size)}
    assert declared == {h.strip("[]") + "." + n for h, n, _ in MUST_BE_POSITIVE}


@pytest.mark.parametrize(("text", "message"), [
    ("[smarthost]\nmax_connections = 0\n", "[smarthost.max_connections] must be at least 1"),
    ('[queue]\nretry_intervals = ["15m", "0s"]\n',
     "[queue.retry_intervals] every interval must be longer than zero"),
    ("[sieve]\nvacation_days = 40\n", "[sieve.vacation_days] 40 is outside"),
    ("[sieve]\nvacation_days = 1\nvacation_min_days = 2\n", "[sieve.vacation_days] 1 is outside"),
    ("[dns]\nport = 0\n", "[dns.port] must be a port from 1 to 65535"),
    ("[pop3]\nauth_failure_delay = inf\n", "[pop3.auth_failure_delay] inf is not a duration"),
])
def test_counts_and_ranges_are_refused(text, message):
    """Counts below 1, a zero retry interval, a default vacation period outside the allowed
    range, a port of 0 and an infinite delay are refused naming the key."""
    assert message in error_of(text)


@pytest.mark.parametrize("text", ["[pop3]\nauth_failure_delay = 0\n",
                                  "[smtp]\nmax_message_size = 0\n",
                                  '[domains]\nquota_grace = 0\n'])
def test_zero_is_kept_where_it_means_off(text):
    """Where zero has a documented meaning (no log-in delay, no fixed message size, no quota
    grace) it is taken."""
    assert cfg(text) is not None


@pytest.mark.parametrize("section", ["pop3", "smtp", "imap"])
@pytest.mark.parametrize(("values", "message"), [
    ('auth_failure_delay = "10s"\nauth_failure_delay_max = "5s"\n',
     "5 seconds is shorter than auth_failure_delay (10 seconds)"),
    ('auth_failure_delay_max = "1h"\n', "3600 seconds is over 15 minutes: the throttle forgets"),
    ('auth_failure_delay_max = "901s"\n', "901 seconds is over 15 minutes"),
])
def test_failure_delay_maximum_out_of_its_range_is_refused(section, values, message):
    """The longest log-in failure delay must be at least the first delay and at most the 15
    minutes the throttle remembers a source (a longer one is never reached): an error naming
    the key, for each protocol's throttle."""
    assert f"[{section}.auth_failure_delay_max] {message}" in error_of(f"[{section}]\n{values}")


@pytest.mark.parametrize("section", ["pop3", "smtp", "imap"])
def test_failure_delay_maximum_over_a_minute_is_a_warning(tmp_path, section):
    """A maximum over a minute is taken, with a warning naming file, line and key: mail
    clients give up on a reply after about a minute and try again, each try one more failure,
    which locks the owner out; a minute exactly (and the default 30 s) gives none."""
    path = tmp_path / "pop3coexist.toml"
    path.write_text(textwrap.dedent(MINIMAL) + f'[{section}]\nauth_failure_delay_max = "2m"\n')
    c = load_config(path)
    assert getattr(c, section).auth_failure_delay_max == 120.0
    (warning,) = c.warnings
    assert warning.startswith(f"{path}:6: [{section}.auth_failure_delay_max]")
    assert "locked out" in warning
    path.write_text(textwrap.dedent(MINIMAL) + f'[{section}]\nauth_failure_delay_max = "1m"\n')
    assert load_config(path).warnings == ()
