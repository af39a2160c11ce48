"""Fault 12: listener descriptions. The kind: every server endpoint string a user may write.
tcp:, tcp6:, unix: and systemd: (socket activation) are taken, each with the options Twisted
gives it; anything else is refused with a message naming the accepted set. The systemd sockets
are looked up and checked (count, name, family, listening) before anything starts."""

from __future__ import annotations

import os
import socket

import pytest

from pop3coexist.config import parse_config, parse_endpoint
from pop3coexist.errors import ConfigError
from pop3coexist.service import SystemdSockets

BASE = '[server]\nhostname = "pop.contoso.test"\nstate_dir = "var"\n'


@pytest.mark.parametrize("description", [
    "tcp:2525", "tcp:2525:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=50",
    "tcp6:2525:interface=\\:\\:1", "unix:/run/pop3coexist/smtp.sock",
    "unix:/run/p.sock:mode=660:lockfile=1", "systemd:domain=INET:index=0",
    "systemd:domain=INET6:index=3", "systemd:domain=UNIX:name=smtp",
    "unix:/run/p.sock:mode=0600:lockfile=0", "tcp:2525:interface=\\:\\:1",
    "tcp:2525:interface=0.0.0.0",
])
def test_accepted_descriptions(description):
    """Every accepted form parses in the config, in every listener key."""
    for section, key in (("pop3", "listen"), ("pop3", "tls_listen"), ("smtp", "listen"),
                         ("smtp", "submission_listen"), ("smtp", "tls_listen")):
        tls = '[tls]\ncertificate = "c.pem"\nprivate_key = "k.pem"\nself_signed = true\n'
        c = parse_config(BASE + f"[{section}]\n{key} = ['{description}']\n" + tls)
        assert getattr(getattr(c, section), key) == (description,)


@pytest.mark.parametrize("description,words", [
    ("ssl:2465:privateKey=key.pem", "put a tcp: description in tls_listen"),
    ("stdio:", "listeners take tcp:PORT, tcp6:PORT, unix:PATH or systemd:domain=INET:index=N"),
    ("onion:25", "listeners take tcp:PORT"),
    ("haproxy:tcp:25", "listeners take tcp:PORT"),
    ("2525", "listeners take tcp:PORT"),
    ("tcp:smtp", "has no port number"),
    ("tcp:70000", "port out of range"),
    ("tcp:25:interfce=127.0.0.1", "takes no option 'interfce' (it takes interface, backlog)"),
    ("tcp:25:backlog=many", "backlog must be a whole number"),
    ("unix:", "has no socket path"),
    ("systemd:index=0", "needs domain=INET, INET6, UNIX"),
    ("systemd:domain=INET", "needs index=N or name=NAME"),
    ("systemd:domain=INET:index=0:name=smtp", "needs index=N or name=NAME"),
    ("systemd:domain=INET:index=x", "index must be a whole number"),
    ("systemd:domain=PACKET:index=0", "needs domain="),
    # issue 11 re-run (fault 12): what Twisted would refuse or misread only at start-up
    ("unix:/run/p.sock:mode=abc", "mode is the socket file's permissions in octal"),
    ("unix:/run/p.sock:mode=999", "mode is the socket file's permissions in octal"),
    ("unix:/run/p.sock:lockfile=yes", "lockfile is 1"),
    ("tcp:25:interface=not-an-address", "interface= takes an IP address"),
    ("tcp:25:interface=", "leave it out to listen on every address"),
    ("tcp6:25:interface=127.0.0.1", "tcp6: listens on an IPv6 address"),
    ("tcp:25:interface=::1", "the colons of an IPv6 address are escaped"),
])
def test_refused_descriptions_name_key_and_accepted_set(description, words):
    """A form this server does not take: the key named, and what to write instead."""
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + f'[smtp]\nlisten = ["{description}"]\n')
    assert "[smtp.listen]" in str(info.value) and words in str(info.value)


def test_parse_endpoint_handles_escapes():
    """Twisted's escape rule: a backslash makes the next colon part of the value."""
    assert parse_endpoint("tcp6:25:interface=\\:\\:1") == ("tcp6", ["25"], {"interface": "::1"})


class _Sockets(SystemdSockets):
    pass


@pytest.fixture
def passed(tmp_path):
    """Two listening sockets (TCP, then UNIX) at consecutive descriptors, as systemd passes
    them, and the SystemdSockets that reads LISTEN_* naming them."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "s.sock"))
    unix.listen()
    first = 900  # far above anything the test process holds
    os.dup2(tcp.fileno(), first)
    os.dup2(unix.fileno(), first + 1)
    _Sockets.START = first
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "smtp:local"}
    yield _Sockets(env, pid=42), first, first + 1
    for fd in (first, first + 1):
        os.close(fd)
    tcp.close()
    unix.close()


def test_lookup_by_index_and_name(passed):
    """index=N is the Nth socket, name= the one LISTEN_FDNAMES calls so; family is checked."""
    sockets, first, second = passed
    assert sockets.lookup("systemd:domain=INET:index=0") == (first, socket.AF_INET)
    assert sockets.lookup("systemd:domain=UNIX:name=local") == (second, socket.AF_UNIX)


@pytest.mark.parametrize("description,words", [
    ("systemd:domain=INET:index=2", "systemd passed 2 socket(s) (index 0 to 1)"),
    ("systemd:domain=INET:name=pop3", "no socket named 'pop3' (names: smtp, local)"),
    ("systemd:domain=INET6:index=0", "is a listening INET stream socket, not a listening INET6"),
    ("systemd:domain=INET:index=1", "is a listening UNIX stream socket, not a listening INET"),
])
def test_lookup_mistakes(passed, description, words):
    """A socket that is not there, or not of the family the description says: a clear error."""
    sockets, _, _ = passed
    with pytest.raises(ValueError) as info:
        sockets.lookup(description)
    assert words in str(info.value)


@pytest.mark.parametrize("env,words", [
    ({}, "LISTEN_PID and LISTEN_FDS are not set"),
    ({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, "LISTEN_PID is 1, not this process"),
])
def test_nothing_passed(env, words):
    """Started without socket activation (or the variables were meant for another process):
    the error says so and how to start the server."""
    with pytest.raises(ValueError) as info:
        SystemdSockets(env, pid=42).lookup("systemd:domain=INET:index=0")
    assert words in str(info.value) and "systemd-socket-activate" in str(info.value)


def test_names_default_to_unknown():
    """Without LISTEN_FDNAMES (systemd-socket-activate without --fdname) every socket is named
    "unknown", as sd_listen_fds_with_names(3) says; index= still works."""
    s = SystemdSockets({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, pid=42)
    assert s.fds == [3, 4] and s.names == ["unknown", "unknown"]


def test_a_relative_unix_path_is_relative_to_the_config_folder(tmp_path):
    """Fault 12 (README: relative paths are relative to the config file's folder): a
    ``unix:`` socket path too, with its options kept and its colons escaped."""
    path = tmp_path / "pop3coexist.toml"
    path.write_text(BASE + '[smtp]\nsubmission_listen = ["unix:run/sub\\\\:1.sock:mode=660"]\n')
    from pop3coexist.config import load_config

    (desc,) = load_config(path).smtp.submission_listen
    assert parse_endpoint(desc) == ("unix", [f"{tmp_path}/run/sub:1.sock"], {"mode": "660"})
