"""The configuration file (README "Configuration"): TOML in, a frozen and validated Config out.

Every key is declared here once, as a field of the dataclass of its section, with
``key(converter, default, doc)``: the converter that reads and checks the TOML value, the
default as it would be written in the TOML file, a one-line description, and a unit (bytes and
seconds are known from the converter). The parser reads the declarations (``_spec``), so a key
that is not declared is an unknown key, and ``declared_keys()`` lists them all for the test that
keeps README.md's Configuration tables and ``etc/pop3coexist.toml`` in step with the parser
(tests/unit/test_config_docs.py).

Adding a key is one line in the section's dataclass, e.g. in ``SmtpConfig``::

    max_line_length: int = key(_positive, 998, "octets per text line", unit="octets")

then a row in README.md's Configuration table and a commented line in etc/pop3coexist.toml
(the test names what is missing). Checks that involve several keys go in ``parse_config``.
A sub-table is ``table(Cls)``, an array of tables (``[[domains.remote]]``) ``tables(Cls)``.

An unknown key, a wrong type, a missing file or an unsafe combination raises ConfigError naming
the file, the key and the line where it can be found; a legal but unusual value (fewer than 100
recipients per message, an idle timeout under the RFC's minimum) is kept and listed in
``Config.warnings``, which the server logs and ``check-config`` prints. ``locate`` puts the
file and line in front of the errors of checks made after parsing (TLS files, state folder). No reactor, no sockets: only parsing and checking.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pop3coexist.address import AddressError, is_valid_mailbox_name, normalise_domain, parse_address
from pop3coexist.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

RFC5321_MIN_RECIPIENTS = 100  # RFC 5321 section 4.5.3.1.8
POP3_MIN_IDLE = 600  # seconds; RFC 1939 section 3 (the autologout timer)
SMTP_MIN_IDLE = 300  # seconds; RFC 5321 section 4.5.3.2.7 (server timeout)
# seconds: the log-in throttle forgets a source this long after its last failure
# (policy/throttle.py, policy/sharedthrottle.py), so a longer delay is never reached
THROTTLE_MEMORY = 900
# seconds: mail clients give up on a reply after about a minute (Outlook 60 s, Thunderbird's
# network.tcp timeouts, fetchmail's default 300 s for the whole session) and try again: each
# try is one more failure, so a longer delay locks the owner out instead of slowing a guesser
CLIENT_REPLY_PATIENCE = 60


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like ``"10MB"`` (KB/MB/GB are decimal, KiB/MiB binary)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as \"10MB\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").lower()
            if unit in _SIZE_UNITS:
                return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ValueError(f"{value!r} is not a size (bytes, or a string such as \"10MB\")")


@dataclass(frozen=True)
class QuotaGrace:
    """How far the last message may take a mailbox past its quota (``domains.quota_grace``):
    ``bytes`` octets, or ``percent`` of the quota (Dovecot's ``quota_grace``, default 10%)."""

    bytes: int = 0
    percent: float = 0.0

    def allowance(self, quota: int) -> int:
        """The grace in octets for a mailbox whose quota is ``quota`` octets."""
        return self.bytes + int(quota * self.percent / 100)


def parse_quota_grace(value: int | str) -> QuotaGrace:
    """A size (``"1MB"``, bytes) or a percentage of the quota (``"10%"``, 0 to 100)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip()[:-1].strip()
        try:
            percent = float(number)
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage (\"10%\") or a size (\"1MB\")") from None
        if not 0 <= percent <= 100:
            raise ValueError("a percentage must be between 0% and 100%")
        return QuotaGrace(percent=percent)
    return QuotaGrace(bytes=parse_size(value))


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number or a string like ``"30s"``, ``"15m"``, ``"12h"``, ``"2d"``, ``"1w"``
    (the units Postfix takes)."""
    if isinstance(value, bool):
        raise ValueError("a duration is seconds or a string such as \"15m\"")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):  # TOML has inf and nan
            raise ValueError(f"{value!r} is not a duration (a finite number of seconds)")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration (seconds, or \"30s\", \"15m\", \"12h\", \"2d\", \"1w\")")


# --------------------------------------------------------------------------- converters
# Each takes the TOML value and returns the stored value, or raises TypeError / ValueError
# with a message that the reader prefixes with file, line and key.


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, not {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, not {value!r}")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be a whole number, not {value!r}")
    if value < 0:
        raise ValueError("cannot be negative")
    return value


def _positive(value: Any) -> int:
    value = _integer(value)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _port(value: Any) -> int:
    value = _integer(value)
    if not 1 <= value <= 65535:
        raise ValueError("must be a port from 1 to 65535")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"must be a list of strings, not {value!r}")
    return tuple(value)


def _raw_list(value: Any) -> Any:
    """Any TOML value; the section's parser checks it (connector address spaces)."""
    return value


# Listener descriptions: the Twisted server endpoint types that make sense for a mail server.
# ssl: is left out on purpose: implicit TLS is a tcp: description in tls_listen, so that
# [tls] (one certificate, TLS 1.2 at least) holds for every listener and STLS/STARTTLS alike.
ENDPOINT_TYPES: dict[str, tuple[str, ...]] = {
    "tcp": ("interface", "backlog"),
    "tcp6": ("interface", "backlog"),
    "unix": ("mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
}
SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")
ENDPOINT_HELP = (
    "listeners take tcp:PORT, tcp6:PORT, unix:PATH or systemd:domain=INET:index=N "
    "(socket activation; also domain=INET6 or UNIX, and name=FileDescriptorName instead of index)"
)


def parse_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Split a Twisted endpoint description into (type, positional args, keyword args).

    Fields are separated by ``:``; a backslash escapes the next character (``\\:``); a field
    with ``=`` is a keyword argument. Raises ValueError when the type is not one of
    ENDPOINT_TYPES, a keyword is unknown to it, or a required argument is missing or malformed.
    """
    parts: list[str] = []
    current: list[str] = []
    it = iter(description)
    for ch in it:
        if ch == "\\":
            current.append(next(it, ""))
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    kind, args, kwargs = parts[0], [], {}
    if len(parts) == 1 or kind not in ENDPOINT_TYPES:
        raise ValueError(
            f"{description!r} is not a server endpoint description this server takes: "
            f"{ENDPOINT_HELP} (e.g. \"tcp:2525:interface=127.0.0.1\")"
            + ("; for TLS from the first byte put a tcp: description in tls_listen and set [tls]"
               if kind == "ssl" else "")
        )
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if eq:
            if name not in ENDPOINT_TYPES[kind]:
                raise ValueError(f"{description!r}: {kind}: takes no option {name!r} "
                                 f"(it takes {', '.join(ENDPOINT_TYPES[kind])})")
            kwargs[name] = value
        else:
            args.append(part)
    if kind in ("tcp", "tcp6"):
        if len(args) > 1 and "interface" in kwargs:
            raise ValueError(f"{description!r}: the colons of an IPv6 address are escaped "
                             f"({kind}:PORT:interface=\\:\\:1)")
        if len(args) != 1 or not re.match(r"^\d+$", args[0]):
            raise ValueError(f"{description!r} has no port number")
        if int(args[0]) > 65535:
            raise ValueError(f"{description!r}: port out of range")
        if "interface" in kwargs:
            # Twisted binds tcp: to an IPv4 or an IPv6 address, tcp6: to an IPv6 address only
            # (given an IPv4 one it would silently listen on IPv4)
            try:
                address = ipaddress.ip_address(kwargs["interface"])
            except ValueError:
                raise ValueError(f"{description!r}: interface= takes an IP address of this "
                                 f"host, not {kwargs['interface']!r} (leave it out to listen "
                                 "on every address)") from None
            if kind == "tcp6" and address.version != 6:
                raise ValueError(f"{description!r}: tcp6: listens on an IPv6 address; for "
                                 f"{address} write tcp:{args[0]}:interface={address}")
    elif kind == "unix":
        if len(args) != 1 or not args[0]:
            raise ValueError(f"{description!r} has no socket path (unix:PATH)")
        if "mode" in kwargs and not re.match(r"^0?[0-7]{1,3}$", kwargs["mode"]):
            raise ValueError(f"{description!r}: mode is the socket file's permissions in octal "
                             "(mode=660), not " + repr(kwargs["mode"]))
        if "lockfile" in kwargs and kwargs["lockfile"] not in ("0", "1"):
            raise ValueError(f"{description!r}: lockfile is 1 (the default: PATH.lock, and a "
                             "socket left by a killed server is removed) or 0")
    else:
        if args:
            raise ValueError(f"{description!r}: systemd: takes only domain= and index= or name=")
        if kwargs.get("domain") not in SYSTEMD_DOMAINS:
            raise ValueError(f"{description!r}: systemd: needs domain={', '.join(SYSTEMD_DOMAINS)}")
        if ("index" in kwargs) == ("name" in kwargs):
            raise ValueError(f"{description!r}: systemd: needs index=N or name=NAME (one of them)")
        if "index" in kwargs and not re.match(r"^\d+$", kwargs["index"]):
            raise ValueError(f"{description!r}: systemd: index must be a whole number")
    for number in ("backlog",):
        if number in kwargs and not re.match(r"^\d+$", kwargs[number]):
            raise ValueError(f"{description!r}: {number} must be a whole number")
    return kind, args, kwargs


def _escape_field(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:")


def resolve_unix_endpoint(description: str, base: Path) -> str:
    """A ``unix:`` description with its socket path (and ``lockfile``'s) made absolute, relative
    to ``base`` (the config file's folder); any other description unchanged."""
    kind, args, kwargs = parse_endpoint(description)
    if kind != "unix":
        return description
    path = Path(os.path.normpath(base / args[0]))
    return ":".join(["unix", _escape_field(str(path)),
                     *(f"{k}={_escape_field(v)}" for k, v in kwargs.items())])


def _endpoints(value: Any) -> tuple[str, ...]:
    items = _strings(value)
    for item in items:
        parse_endpoint(item)
    return items


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    items = _strings(value)
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network (\"192.0.2.0/24\")")
    return tuple(out)


def _size(value: Any) -> int:
    return parse_size(value)


def _duration(value: Any) -> float:
    return parse_duration(value)


def _period(value: Any) -> float:
    """A duration that must be longer than zero: a timeout, an interval, an age (zero would
    time out at once, run in a busy loop or count everything as too old)."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def _positive_size(value: Any) -> int:
    """A size that must be at least one byte (a limit of zero would refuse everything)."""
    size = parse_size(value)
    if size < 1:
        raise ValueError("must be at least 1 byte")
    return size


def _durations(value: Any) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError("must be a non-empty list of durations")
    out = tuple(parse_duration(v) for v in value)
    if any(v <= 0 for v in out):
        raise ValueError("every interval must be longer than zero")
    return out


def _domain_list(value: Any) -> tuple[str, ...]:
    items = _strings(value)
    out: list[str] = []
    for item in items:
        try:
            d = normalise_domain(item)
        except AddressError as e:
            raise ValueError(str(e))
        if d in out:
            raise ValueError(f"domain {item!r} is listed twice")
        out.append(d)
    return tuple(out)


def _not_a_file(path: Path) -> str:
    """Why ``path``, named by a key that takes a file, is not one: missing, or a folder."""
    if path.is_dir():
        return f"{path} is a folder, not a file"
    return f"file not found: {path}"


def _path(value: Any) -> Path | None:
    """A file or folder; "" is none. The reader makes a relative path relative to the config
    file's folder."""
    value = _string(value)
    return None if value == "" else Path(value)


_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def _node_id(value: Any) -> str:
    """A node's name among the servers sharing one state_dir: 1-63 of ``A-Z a-z 0-9 _ -``,
    starting with a letter or digit (it names files on the shared volume, and the queue's
    claim folders ``<node>.w<worker>.<boot>`` are split at dots); "" is the host name."""
    value = _string(value)
    if value and not _NODE_ID_RE.match(value):
        raise ValueError(f"must be 1 to 63 letters, digits, '_' or '-' starting with a "
                         f"letter or digit, not {value!r}")
    return value


def _machine_name() -> str:
    """The machine's host name in the form a node id takes (first label, unsafe characters
    replaced), for ``server.node_id`` = ""."""
    import socket

    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]) or "node"
    return (name if name[0].isalnum() else f"n{name}")[:63]


def _choice(*choices: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        value = _string(value)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    conv.choices = choices  # type: ignore[attr-defined]
    return conv


def _hostname(value: Any) -> str:
    value = _string(value)
    try:
        return normalise_domain(value)
    except AddressError as e:
        raise ValueError(str(e))


def _optional_hostname(value: Any) -> str:
    value = _string(value)
    return "" if value == "" else _hostname(value)


def _next_hop(value: Any) -> str:
    """``name[:port]`` or ``[address][:port]``; returns it unchanged after checking."""
    value = _string(value)
    if value == "":
        return value
    m = re.match(r"^\[([^\]]+)\](?::(\d+))?$", value)
    if m:
        try:
            ipaddress.ip_address(m.group(1))
        except ValueError:
            raise ValueError(f"{value!r}: brackets must hold an IP address")
        port = m.group(2)
    else:
        m = re.match(r"^([A-Za-z0-9.-]+)(?::(\d+))?$", value)
        if not m:
            raise ValueError(f"{value!r} is not name[:port] or [address][:port]")
        port = m.group(2)
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: port out of range")
    return value


def _optional_next_hop(value: Any) -> str | None:
    """A next hop, or None for "" (the smart host)."""
    return _next_hop(value) or None


def _next_hops(value: Any) -> tuple[str, ...]:
    return tuple(_next_hop(h) for h in _strings(value))


def _route_hops(value: Any) -> tuple[str, ...]:
    """``[[domains.remote]] route``: one next hop or a list of them (tried in order); ``""`` or
    ``[]``: none (the smart host or the MX)."""
    if isinstance(value, list):
        return tuple(_next_hop(v) for v in _strings(value))
    value = _next_hop(value)
    return (value,) if value else ()


def _role_address(value: Any) -> str:
    """``domains.postmaster`` / ``domains.abuse``: "" or one full address (user@domain), kept in
    canonical form (address.parse_address); a local part is stored in lower case."""
    value = _string(value).strip()
    if value == "":
        return ""
    try:
        address = parse_address(value)
    except AddressError as e:
        raise ValueError(f"{value!r} is not a full address (user@domain): {e}")
    if address.literal is not None:
        raise ValueError(f"{value!r}: name a domain, not an address literal")
    return f"{address.local.lower()}@{address.domain}"


MAX_WORKERS = 64


def _workers(value: Any) -> int:
    """A number of processes, 1 to MAX_WORKERS, or "auto" (one per CPU this process may use)."""
    if value == "auto":
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return max(1, min(MAX_WORKERS, cpus))
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'must be a whole number (1 to {MAX_WORKERS}) or "auto"')
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f'must be 1 to {MAX_WORKERS} or "auto", not {value}')
    return value


SASL_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")


def _sasl_mechanisms(value: Any) -> tuple[str, ...]:
    """A list of SASL mechanism names from SASL_MECHANISMS (any case); [] offers no AUTH."""
    items = _strings(value)
    out: list[str] = []
    for item in items:
        name = item.upper()
        if name not in SASL_MECHANISMS:
            raise ValueError(f"{item!r} is not one of {', '.join(SASL_MECHANISMS)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def _is_wildcard(name: str) -> bool:
    return "*" in name or name.strip(".") == ""


def _hostname_or_wild(value: Any) -> str:
    value = _string(value)
    if _is_wildcard(value):
        return value
    return _hostname(value)


def _ldap_filter(value: Any) -> str:
    value = _string(value)
    from pop3coexist import ldapfilter

    try:
        ldapfilter.parse_filter(value)
    except ldapfilter.FilterError as e:
        raise ValueError(f"{value!r} is not an LDAP filter: {e}")
    return value


def _address_template(value: Any) -> str:
    """``%m@domain``, ``%g.%s@domain`` or ``@domain`` (short for ``%m@domain``)."""
    value = _string(value)
    local, at, domain = value.rpartition("@")
    if not at:
        raise ValueError(f"{value!r} is not an address template (\"%m@domain\" or \"@domain\")")
    if _is_wildcard(domain):
        raise ValueError(f"{value!r}: the domain of an address template cannot be a wildcard")
    _hostname(domain)
    if re.search(r"%(?!%|\d*[mgs])", local):
        raise ValueError(f"{value!r}: only %m, %g, %s (optionally %Ng, %Ns) and %% are known")
    return value


def _address_templates(value: Any) -> tuple[str, ...]:
    return tuple(_address_template(x) for x in _strings(value))


# --------------------------------------------------------------------------- declarations


REQUIRED: Any = object()  # the default of a key that must be given


@dataclass(frozen=True)
class Key:
    """One config key as the parser reads it and the documentation shows it.

    ``default`` is written as in the TOML file (``"10MB"``, ``"15m"``, ``[]``), or REQUIRED;
    ``shown`` replaces it in the documentation where the real default depends on other keys.
    """

    convert: Callable[[Any], Any]
    default: Any
    doc: str
    unit: str = ""
    shown: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def toml_default(self) -> str:
        """The default as TOML text (``100``, ``"10MB"``, ``["15m", "30m"]``); "" if required."""
        return "" if self.required else toml_value(self.default)


def toml_value(value: Any) -> str:
    """A Python value as TOML writes it: ``true``, ``"text"``, ``[1, 2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


_UNITS = {_size: "bytes", _positive_size: "bytes", _duration: "seconds", _period: "seconds",
          _durations: "seconds"}


_CONVERTED: Any = object()


def key(convert: Callable[[Any], Any], default: Any, doc: str, *, unit: str = "",
        shown: str = "", stored: Any = _CONVERTED) -> Any:
    """Declare a key: a dataclass field whose default is ``convert(default)``, or ``stored``
    where the value left unset is one a user may not write (an empty address template)."""
    declared = Key(convert, default, doc, unit or _UNITS.get(convert, ""), shown)
    if declared.required:
        return field(metadata={"key": declared})
    value = convert(default) if stored is _CONVERTED else stored
    return field(default=value, metadata={"key": declared})


def table(cls: type, doc: str = "") -> Any:
    """Declare a sub-table (``[auth.directory]``) read into ``cls``."""
    return field(default_factory=cls, metadata={"table": cls, "doc": doc})


def tables(cls: type, doc: str = "") -> Any:
    """Declare an array of tables (``[[domains.remote]]``), each read into ``cls``."""
    return field(default=(), metadata={"tables": cls, "doc": doc})


def _spec(cls: type) -> dict[str, Callable[[Any], Any]]:
    """The converters of the keys of one section's dataclass, by key name."""
    return {f.name: f.metadata["key"].convert for f in fields(cls) if "key" in f.metadata}


def _subsections(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if "table" in f.metadata or "tables" in f.metadata)


def declared_keys(cls: type | None = None, prefix: str = "") -> Iterator[tuple[str, Key]]:
    """Every key the parser accepts, as ``("section.key", Key)``; arrays of tables are named
    without brackets (``domains.remote.name`` for ``name`` in ``[[domains.remote]]``)."""
    for f in fields(cls or Config):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if "key" in f.metadata:
            yield dotted, f.metadata["key"]
        elif "table" in f.metadata or "tables" in f.metadata:
            yield from declared_keys(f.metadata.get("table") or f.metadata["tables"], dotted)


def declared_arrays(cls: type | None = None, prefix: str = "") -> Iterator[str]:
    """The dotted names of the arrays of tables (``domains.remote``, ``gateway.connectors``)."""
    for f in fields(cls or Config):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if "tables" in f.metadata:
            yield dotted
        if "table" in f.metadata or "tables" in f.metadata:
            yield from declared_arrays(f.metadata.get("table") or f.metadata["tables"], dotted)


# --------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = key(_hostname, REQUIRED, "banner, EHLO name, Received, DSN Reporting-MTA")
    state_dir: Path = key(_path, REQUIRED, "mailroot/, queue/, passwords.json, passwords.key, run/")
    workers: int = key(_workers, 1, 'processes that serve POP3 and SMTP, 1 to 64, or "auto": one '
                       "per CPU", unit="processes")
    # -- several servers over one shared state_dir (README "Several servers")
    local_dir: Path | None = key(_path, "", "this node's own files, on local disk: run/ (the "
                                 "server lock, listeners.json, connection and log-in tables, "
                                 "metrics); empty: state_dir (one server alone)")
    node_id: str = key(_node_id, "", "this node's name among the servers that share state_dir "
                       "(its spool folder, its lock on the volume, health probe, queue claims); "
                       "empty: the machine's host name")

    @property
    def local_root(self) -> Path:
        """Where this node keeps its own files: ``local_dir``, or ``state_dir`` alone."""
        return self.local_dir if self.local_dir is not None else self.state_dir

    @property
    def run_dir(self) -> Path:
        """This node's run files (lock, listeners.json, tables, metrics): never shared."""
        return self.local_root / "run"

    @property
    def node(self) -> str:
        """This node's id: ``node_id``, or the machine's host name."""
        return self.node_id or _machine_name()

    @property
    def spool_node(self) -> str:
        """The name of this node's spool folder (``<mailroot>/.spool/<node>``) when several
        nodes share state_dir, else "" (``<mailroot>/.spool``)."""
        return self.node if self.shared else ""

    @property
    def shared(self) -> bool:
        """True when other nodes may share ``state_dir`` (``local_dir`` is set)."""
        return self.local_dir is not None

    @property
    def mailroot(self) -> Path:
        return self.state_dir / "mailroot"

    @property
    def queue_dir(self) -> Path:
        return self.state_dir / "queue"

    @property
    def password_file(self) -> Path:
        return self.state_dir / "passwords.json"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "passwords.key"


def _check_failure_delays(r: Any, section: str, cfg: Any) -> None:
    """``auth_failure_delay`` and ``auth_failure_delay_max`` of ``[section]`` make sense
    together: the maximum is at least the first delay and at most what the throttle
    remembers (``THROTTLE_MEMORY``); a maximum over ``CLIENT_REPLY_PATIENCE`` is a warning."""
    base, top = cfg.auth_failure_delay, cfg.auth_failure_delay_max
    if top < base:
        raise r.fail(section, "auth_failure_delay_max",
                     f"{top:g} seconds is shorter than auth_failure_delay ({base:g} seconds)")
    if top > THROTTLE_MEMORY:
        raise r.fail(section, "auth_failure_delay_max",
                     f"{top:g} seconds is over {THROTTLE_MEMORY // 60} minutes: the throttle "
                     "forgets a source that long after its last failure, so the delay would "
                     "never be reached")
    if top > CLIENT_REPLY_PATIENCE:
        r.warn(section, "auth_failure_delay_max",
               f"{top:g} seconds is over the minute mail clients wait for a reply: a client "
               "that gives up and tries again fails again, so its owner is locked out for "
               "as long as it keeps trying")


def _check_local_dir(r: Any, server: ServerConfig) -> None:
    """``server.local_dir`` must be a folder of its own, neither state_dir nor inside it (its
    run files would then be shared by every node), nor holding state_dir."""
    local = Path(os.path.abspath(server.local_root))
    state = Path(os.path.abspath(server.state_dir))
    if local == state or state in local.parents:
        raise r.fail("server", "local_dir", f"{server.local_root} is inside state_dir "
                     f"{server.state_dir}: each node's own files must stay out of the shared folder")
    if local in state.parents:
        raise r.fail("server", "local_dir", f"{server.local_root} holds state_dir "
                     f"{server.state_dir}: give each node a folder of its own beside it")


@dataclass(frozen=True)
class Pop3Config:
    listen: tuple[str, ...] = key(_endpoints, ["tcp:1110:interface=127.0.0.1"],
                                  "clear-text POP3 listeners (STLS offered when [tls] is set)")
    tls_listen: tuple[str, ...] = key(_endpoints, [], "POP3S listeners: TLS from the first byte")
    require_secure_auth: bool = key(_boolean, False,
                                    "USER/PASS, PLAIN, LOGIN only after STLS or on POP3S")
    idle_timeout: float = key(_period, "10m", "an idle session is closed; under 10 minutes "
                              "(RFC 1939 section 3) is a warning")
    auth_failure_delay: float = key(_duration, "2s", "delay after a failed log-in, doubling per "
                                    "source address")
    auth_failure_delay_max: float = key(_duration, "30s", "the longest log-in failure delay")
    max_connections: int = key(_positive, 1000, "concurrent sessions", unit="connections")
    max_connections_per_client: int = key(_positive, 50, "concurrent sessions from one address",
                                          unit="connections")
    sasl_mechanisms: tuple[str, ...] = key(_sasl_mechanisms, ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"],
                                           "what AUTH (RFC 5034) may offer")


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[str, ...] = key(_endpoints, ["tcp:2525:interface=127.0.0.1"],
                                  "SMTP listeners: mail for local and relay domains")
    submission_listen: tuple[str, ...] = key(_endpoints, [], "submission listeners: AUTH "
                                             "required before MAIL")
    tls_listen: tuple[str, ...] = key(_endpoints, [], "SMTPS listeners: TLS from the first byte")
    max_message_size: int = key(_size, "10MB", "SIZE limit; 552 5.3.4 past it; 0: no fixed "
                                "maximum (RFC 1870)")
    max_recipients: int = key(_positive, 100, "recipients per message; 452 4.5.3 past it; "
                              "under 100 (RFC 5321 section 4.5.3.1.8) is a warning",
                              unit="recipients")
    max_hop_count: int = key(_positive, 30, "Received lines; 554 5.4.6 past it", unit="hops")
    require_tls_for_auth: bool = key(_boolean, False, "AUTH in clear gets 538 5.7.11")
    max_messages_per_connection: int = key(_positive, 20, "messages per session; 421 4.7.0 past "
                                           "it", unit="messages")
    max_connections: int = key(_positive, 1000, "concurrent sessions", unit="connections")
    max_connections_per_client: int = key(_positive, 50, "concurrent sessions from one address",
                                          unit="connections")
    idle_timeout: float = key(_period, "10m", "an idle session is closed; under 5 minutes "
                              "(RFC 5321 section 4.5.3.2.7) is a warning")
    auth_failure_delay: float = key(_duration, "2s", "delay after a failed AUTH, doubling per "
                                    "source address")
    auth_failure_delay_max: float = key(_duration, "30s", "the longest AUTH failure delay")
    client_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = key(
        _networks, [], "connection control: only these addresses may connect")
    client_deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = key(
        _networks, [], "connection control: these addresses may not connect")
    sender_must_match_login: bool = key(_boolean, True, "authenticated MAIL FROM must be the "
                                        "user's own address")
    bare_newline: str = key(_choice("normalize", "reject"), "normalize",
                            'a bare LF in DATA: "normalize" (a line end) or "reject"')
    # clean-up of 2026-11-30: SMTPS is a submission port (RFC 8314 section 3.3)
    tls_listen_requires_auth: bool = key(_boolean, True, "SMTPS (tls_listen) is for submission "
                                         "(RFC 8314 section 3.3): AUTH required before MAIL, "
                                         "530 5.7.0; false: anonymous mail too, as on listen")


@dataclass(frozen=True)
class TlsConfig:
    certificate: Path | None = key(_path, "", "PEM certificate chain (server certificate first)")
    private_key: Path | None = key(_path, "", "PEM private key of the certificate")
    self_signed: bool = key(_boolean, False, "create a self-signed pair at those paths when both "
                            "are missing")

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class DirectoryAttributes:
    user_principal_name: str = key(_string, "userPrincipalName", "the log-in name attribute")
    account_name: str = key(_string, "sAMAccountName", "the pre-Windows 2000 account name")
    mail: str = key(_string, "mail", "the primary e-mail address")
    proxy_addresses: str = key(_string, "proxyAddresses", "all e-mail addresses (SMTP:/smtp:)")
    target_address: str = key(_string, "targetAddress", "where a mail-enabled user's mail goes")
    account_control: str = key(_string, "userAccountControl", "disabled-account flags")
    member_of: str = key(_string, "memberOf", "group membership (required_group)")


@dataclass(frozen=True)
class DirectoryConfig:
    url: str = key(_string, "ldap://127.0.0.1:3389", "ldap:// or ldaps:// URL of the directory")
    starttls: bool = key(_boolean, False, "StartTLS on an ldap:// URL")
    ca_file: Path | None = key(_path, "", "CA certificates for ldaps:// or StartTLS")
    base_dn: str = key(_string, "", "where accounts are searched (required)")
    bind_dn: str = key(_string, "", "the service account that searches (required)")
    bind_password_file: Path | None = key(_path, "", "its password (required)")
    user_filter: str = key(_string, "(objectClass=user)", "which objects are accounts")
    required_group: str = key(_string, "", "DN of a group an account must be in; empty: any")
    timeout: float = key(_period, "10s", "per directory request")
    attributes: DirectoryAttributes = table(DirectoryAttributes, "attribute names")


@dataclass(frozen=True)
class LocalConfig:
    pam_service: str = key(_string, "pop3coexist", "PAM service name")


@dataclass(frozen=True)
class AuthConfig:
    method: str = key(_choice("passwordfile", "directory", "local"), "passwordfile",
                      "where accounts live")
    apop: bool = key(_boolean, True, "keep secrets so APOP and CRAM-MD5 work",
                     shown="`true` for passwordfile, `false` otherwise")
    login_cache: float = key(_duration, "5m", "passwordfile: how long a process remembers a "
                             "password scrypt verified (a keyed hash of it; only successes), "
                             "so the next log-in with it skips scrypt; 0: off")
    directory: DirectoryConfig = table(DirectoryConfig, 'method = "directory"')
    local: LocalConfig = table(LocalConfig, 'method = "local"')


@dataclass(frozen=True)
class RemoteDomain:
    """A ``[[domains.remote]]`` entry. ``route`` is its primary next hop; ``routes`` all of
    them in order (``route = [...]`` in the file: the first is the primary, the rest are tried
    in order when it cannot be reached; policy/routing.py)."""

    name: str = key(_hostname_or_wild, REQUIRED, "the domain (never a wildcard)")
    relay: bool = key(_boolean, True, "accept mail for it from anyone and forward it")
    route: str | None = key(_route_hops, "", "next hop ([address]:port or name:port), or a list "
                            "of them tried in order; empty: the smart host or MX", stored=None)
    routes: tuple[str, ...] = ()  # not a key: every next hop of ``route``, in order


@dataclass(frozen=True)
class DomainsConfig:
    local: tuple[str, ...] = key(_domain_list, [], "mailbox domains, created at start")
    remote: tuple[RemoteDomain, ...] = tables(RemoteDomain, "domains mail is relayed to")
    # RFC 5321 section 4.5.1 / RFC 2142 role addresses (README "Postmaster and abuse")
    postmaster: str = key(_role_address, "", "where postmaster mail lands (a full address); "
                          "empty: postmaster@ the first local domain")
    abuse: str = key(_role_address, "", "where abuse@ every authoritative domain goes; "
                     "empty: off")
    quota_grace: QuotaGrace = key(parse_quota_grace, "10%", "how far the last message may take "
                                  "a mailbox past its quota: a size or a share of the quota")


@dataclass(frozen=True)
class RelayConfig:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = key(
        _networks, [], "addresses and networks that may relay")
    authenticated: bool = key(_boolean, True, "clients that AUTH may relay")


@dataclass(frozen=True)
class SmarthostConfig:
    host: str = key(_next_hop, "", "name[:port] (MX looked up) or [address][:port]; empty: "
                    "straight to the MX")
    tls: str = key(_choice("none", "opportunistic", "required"), "opportunistic",
                   "TLS for every outgoing connection (smart host, MX, routes)")
    ca_file: Path | None = key(_path, "", "CA certificates to verify outgoing TLS; empty: the "
                               "system's")
    username: str = key(_string, "", "AUTH name at the smart host")
    password_file: Path | None = key(_path, "", "AUTH password file (the secret alone)")
    connect_timeout: float = key(_period, "30s", "to open an outgoing connection")
    command_timeout: float = key(_period, "5m", "to wait for each reply of the next hop")
    max_connections: int = key(_positive, 100, "outgoing connections at once",
                               unit="connections")
    max_connections_per_host: int = key(_positive, 20, "outgoing connections to one host",
                                        unit="connections")
    # direct delivery's port (clean-up of 2026-11-30: tests and networks that block port 25)
    mx_port: int = key(_port, 25, "port of direct delivery: a recipient domain's MX hosts (or "
                       "its own address) and address literals, where no smart host or route "
                       "applies", unit="port")
    # outgoing connection reuse (smtp/client.py ConnectionCache; Postfix's connection cache)
    reuse_messages: int = key(_positive, 100, "messages sent over one outgoing connection "
                              "before it is closed; 1: no reuse", unit="messages")
    reuse_idle: float = key(_duration, "2s", "an outgoing connection waits this long, unused, "
                            "for the next message to the same next hop (Postfix: 2 s); 0: "
                            "closed at once")
    reuse_idle_per_host: int = key(_integer, 8, "idle outgoing connections kept per next hop; "
                                   "more are closed", unit="connections")


@dataclass(frozen=True)
class QueueConfig:
    retry_intervals: tuple[float, ...] = key(_durations, ["15m", "30m", "60m", "240m"],
                                             "waits between attempts; the last one repeats")
    delay_notification: float = key(_period, "12h", "a delay report to the sender after this")
    expiration: float = key(_period, "2d", "give up and send a failure report after this")
    claim_lease: float = key(_duration, "2m", "a delivery runner's claims on queued messages are "
                             "taken back by another when its lease is older than this (a dead "
                             "node); at least 20 s")
    recycle: int = key(_integer, 128, "spent queue files (delivered messages' bodies and "
                       "envelopes) kept per process for reuse by new messages; 0: off; at most "
                       "4096", unit="files")


@dataclass(frozen=True)
class AddressSpace:
    """One address space of a connector: a domain (exact, never a wildcard) and its cost."""

    domain: str
    cost: int = 1


@dataclass(frozen=True)
class ConnectorConfig:
    """A gateway connector (the Exchange SMTP connector): address spaces -> next hops.

    ``allow_relay``: accept mail for these domains from anyone ("allow messages to be relayed
    to these domains"). ``peer_hostname``: the EHLO name of the next hop when it connects to
    us; with the next hop's address it identifies mail that came from that server (loops).
    """

    name: str = key(_string, REQUIRED, 'the connector\'s name; default "connector N"',
                    shown='"connector N"')
    address_spaces: tuple[AddressSpace, ...] = key(
        _raw_list, REQUIRED, '"domain" or {domain, cost}; cost 1-100, lowest wins; * refused')
    next_hops: tuple[str, ...] = key(_next_hops, REQUIRED, "[address]:port or name:port, in order")
    allow_relay: bool = key(_boolean, False, "accept mail for these domains from anyone")
    peer_hostname: str = key(_optional_hostname, "", "the next hop's EHLO name (loop check)")
    cost: int = key(_positive, 1, "cost of the address spaces that name none, 1-100")


@dataclass(frozen=True)
class RecipientPolicyConfig:
    """A recipient policy: which directory objects (an LDAP filter) get which addresses."""

    name: str = key(_string, REQUIRED, "the policy's name")
    filter: str = key(_ldap_filter, "(|(mail=*)(proxyAddresses=*))", "LDAP filter of the objects")
    priority: int = key(_positive, 100, "lower first; one policy per object")
    primary: str = key(_address_template, "", "primary address template (%m@domain, "
                       "%g.%s@domain, @domain)", stored="")
    secondary: tuple[str, ...] = key(_address_templates, [], "secondary address templates")
    replace_primary: bool = key(_boolean, False, "false: an existing primary address stays")


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway role (``[gateway]``); ``enabled`` when the section is present."""

    enabled: bool = key(_boolean, False, "false turns the gateway role off",
                        shown="`true` when `[gateway]` is present")
    authoritative_domains: tuple[str, ...] = key(_domain_list, [], "unknown recipients get "
                                                 "550 5.1.1")
    non_authoritative_domains: tuple[str, ...] = key(_domain_list, [], "unknown recipients are "
                                                     "forwarded through a connector")
    connectors: tuple[ConnectorConfig, ...] = tables(ConnectorConfig, "SMTP connectors")
    recipient_policies: tuple[RecipientPolicyConfig, ...] = tables(RecipientPolicyConfig,
                                                                   "recipient policies")
    update_bind_dn: str = key(_string, "", "who policy apply writes proxyAddresses as",
                              shown="the service account")
    update_bind_password_file: Path | None = key(_path, "", "that account's password file")
    max_target_depth: int = key(_positive, 5, "targetAddress redirections followed",
                                unit="redirections")


@dataclass(frozen=True)
class MasqueradeConfig:
    """Rewrite the envelope sender (and with ``header_from`` the From: header) of mail leaving
    for other servers, from ``from_domains`` (default: the local domains) to ``domain``."""

    domain: str = key(_optional_hostname, "", "sender domain of mail leaving for other servers")
    from_domains: tuple[str, ...] = key(_domain_list, [], "which sender domains are rewritten",
                                        shown="the local domains")
    header_from: bool = key(_boolean, False, "rewrite the From: header too (the queued copy)")

    @property
    def enabled(self) -> bool:
        return bool(self.domain)


# --------------------------------------------------------------------------- mail authentication
# ([dns], [[dkim]], [sender_authentication]: issue 13 items 4 to 6)


def _dns_servers(value: Any) -> tuple[str, ...]:
    """Resolver addresses: IPv4 or IPv6 literals, never names (a resolver must be reachable
    without one)."""
    out: list[str] = []
    for item in _strings(value):
        try:
            out.append(str(ipaddress.ip_address(item.strip("[]"))))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address (a resolver is named by its "
                             "address)") from None
    return tuple(out)


def _selector(value: Any) -> str:
    """A DKIM selector (RFC 6376 section 3.1): dot-separated DNS labels."""
    value = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", value):
        raise ValueError(f"{value!r} is not a selector (letters, digits, '-', dot-separated)")
    return value.lower()


def _header_names(value: Any) -> tuple[str, ...]:
    """Header field names (RFC 5322 section 3.6.8 ftext), lower case, in order."""
    out = []
    for item in _strings(value):
        if not re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", item):
            raise ValueError(f"{item!r} is not a header field name")
        out.append(item.lower())
    return tuple(out)


@dataclass(frozen=True)
class DnsConfig:
    """The resolvers every DNS look-up uses: MX of the outbound queue, SPF, DKIM, DMARC."""

    servers: tuple[str, ...] = key(_dns_servers, [], "resolver addresses; empty: the "
                                   "nameservers of /etc/resolv.conf",
                                   shown="those of `/etc/resolv.conf`")
    port: int = key(_port, 53, "the resolvers' UDP and TCP port", unit="port")
    timeout: float = key(_period, "5s", "to wait for one answer, every resolver tried")


@dataclass(frozen=True)
class DkimConfig:
    """One ``[[dkim]]`` signing key: mail from inside whose From: domain is ``domain`` (or
    under it) leaves with a DKIM signature by this key (policy/dkimsign.py)."""

    domain: str = key(_hostname, REQUIRED, "the signing domain (d=)")
    selector: str = key(_selector, REQUIRED, "the selector (s=): the public key is at "
                        "SELECTOR._domainkey.DOMAIN")
    key_file: Path = key(_path, REQUIRED, "PEM RSA private key (`pop3coexist-admin dkim "
                         "keygen`)")
    headers: tuple[str, ...] = key(_header_names, [], "header fields to sign (From is "
                                   "always signed, and once more); empty: the usual set",
                                   shown="the usual set")


@dataclass(frozen=True)
class SenderAuthConfig:
    """``[sender_authentication]``: SPF, DKIM and DMARC of mail from outside, written as an
    RFC 8601 Authentication-Results field (policy/stages.py ``CheckAuthentication``)."""

    enabled: bool = key(_boolean, False, "false turns the checks off",
                        shown="`true` when `[sender_authentication]` is present")
    authserv_id: str = key(_optional_hostname, "", "the name in our Authentication-Results "
                           "fields", shown="`server.hostname`")
    dmarc_reject: str = key(_choice("reject", "mark"), "reject", "dmarc=fail under the "
                            "sender domain's p=reject: refuse with 550 5.7.1, or only mark")
    spf_timeout: float = key(_period, "20s", "for all look-ups of one SPF check (RFC 7208 "
                             "section 4.6.4)")


@dataclass(frozen=True)
class SieveConfig:
    """Per-mailbox Sieve rules (README "Rules and out-of-office"): run-time limits, the
    out-of-office reply period, forwarding loop protection and SRS."""

    max_run_time: float = key(_period, "1s", "wall time one script may run (then: keep)")
    max_actions: int = key(_positive, 32, "actions one script may take (then: keep)",
                           unit="actions")
    max_redirects: int = key(_positive, 4, "redirects one script may take (then: keep)",
                             unit="redirects")
    vacation_days: int = key(_positive, 7, "vacation period without :days", unit="days")
    vacation_min_days: int = key(_positive, 1, "the shortest :days honoured", unit="days")
    vacation_max_days: int = key(_positive, 30, "the longest :days honoured", unit="days")
    redirect_max_received: int = key(_positive, 20, "a message with more Received fields is "
                                     "kept, not redirected (loop)", unit="fields")
    srs: bool = key(_boolean, False, "rewrite the envelope sender of redirected mail with SRS "
                    "(SPF passes at the receiver)")
    srs_secret_file: Path | None = key(_path, "", "SRS key (the secret alone)",
                                       shown="`<state_dir>/srs.key`, made at start")
    srs_max_age: float = key(_period, "21d", "an SRS bounce address older than this is "
                             "refused")


@dataclass(frozen=True)
class ManageSieveConfig:
    """The ManageSieve server (RFC 5804): users upload and activate their Sieve scripts."""

    listen: tuple[str, ...] = key(_endpoints, [], "ManageSieve listeners (4190 by "
                                  "convention); STARTTLS offered when [tls] is set")
    require_tls: bool = key(_boolean, True, "SASL PLAIN/LOGIN only after STARTTLS")
    max_script_size: int = key(_positive_size, "64KB", "largest script", unit="bytes")
    max_scripts: int = key(_positive, 20, "scripts per mailbox", unit="scripts")
    idle_timeout: float = key(_period, "10m", "an idle session is closed")
    max_connections: int = key(_positive, 100, "concurrent sessions", unit="connections")
    max_connections_per_client: int = key(_positive, 10, "concurrent sessions from one "
                                          "address", unit="connections")
# --- [metrics] and [log] (issue 15: monitoring and the mail log) -----------------------


def _log_destination(value: Any) -> str:
    text = _string(value)
    if "\n" in text or "\0" in text:
        raise ValueError("must be a path, \"-\" (standard output) or \"\" (the server's log)")
    return text


@dataclass(frozen=True)
class MetricsConfig:
    """The monitoring HTTP listener: ``/metrics`` (Prometheus) and ``/healthz``."""

    listen: tuple[str, ...] = key(_endpoints, [], "HTTP listeners for /metrics and /healthz "
                                  '(e.g. "tcp:9154:interface=127.0.0.1"); none: off')
    store_refresh: float = key(_period, "5m", "mailbox figures per domain are counted again "
                               "at most this often (a scrape reads the last count)")

    @property
    def enabled(self) -> bool:
        return bool(self.listen)


@dataclass(frozen=True)
class LogConfig:
    """The mail log: one line per mail event (README "Mail log")."""

    mail_log: str = key(_log_destination, "", 'where mail events go: "" the server\'s own log '
                        '(twistd), "-" standard output, or a file path')
    format: str = key(_choice("text", "json"), "text", "text (Postfix-like lines) or json "
                      "(one object per line); json needs mail_log set")
# --- [[milter]]: content filters (issue 13) -------------------------------------------------

MILTER_LISTENERS = ("smtp", "submission", "smtps")


def _milter_socket(value: Any) -> str:
    """``inet:host:port`` (``inet6:`` too; Sendmail's ``inet:port@host`` is taken) or
    ``unix:/path``; a relative UNIX path is made relative to the config file by the reader."""
    value = _string(value)
    kind, _, rest = value.partition(":")
    if kind == "unix" and rest:
        return value
    if kind in ("inet", "inet6") and rest:
        if "@" in rest:
            port, _, host = rest.partition("@")
        else:
            host, _, port = rest.rpartition(":")
        if host.strip("[]") and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
            return value
    raise ValueError(f"{value!r} is not inet:host:port or unix:/path")


def _milter_listeners(value: Any) -> tuple[str, ...]:
    items = _strings(value)
    for item in items:
        if item not in MILTER_LISTENERS:
            raise ValueError(f"{item!r} is not one of {', '.join(MILTER_LISTENERS)}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class MilterConfig:
    """A ``[[milter]]`` entry: one content filter (README "Filtering and authentication")."""

    socket: str = key(_milter_socket, REQUIRED, "inet:host:port or unix:/path of the milter")
    name: str = key(_string, "", 'the milter\'s name in logs and notices; default "milter N"',
                    shown='"milter N"')
    listeners: tuple[str, ...] = key(_milter_listeners, list(MILTER_LISTENERS),
                                     "the SMTP listener kinds whose mail it scans (smtp, "
                                     "submission, smtps)")
    connect_timeout: float = key(_period, "30s", "to connect and negotiate")
    command_timeout: float = key(_period, "30s", "for each reply to a session step (connect, "
                                 "HELO, MAIL, RCPT, DATA)")
    content_timeout: float = key(_period, "5m", "for each reply to the message steps "
                                 "(headers, body, end of message)")
    default_action: str = key(_choice("tempfail", "accept"), "tempfail",
                              "when the milter cannot be used: 451 4.7.1, or go on without it")
    virus_scanner: bool = key(_boolean, False, "its rejects, discards and quarantines are "
                              "infected mail: the postmaster is told")


# --- [imap] (issue 18: IMAP4rev1 over the same mailboxes) ------------------------------


IMAP_MIN_IDLE = 1800  # seconds; RFC 3501 section 5.4 (the autologout timer: at least 30 minutes)


@dataclass(frozen=True)
class ImapConfig:
    """The IMAP4rev1 server (RFC 3501): the same mailboxes as POP3, with folders."""

    listen: tuple[str, ...] = key(_endpoints, [], "IMAP listeners (143 by convention); "
                                  "STARTTLS offered when [tls] is set; none: no IMAP")
    tls_listen: tuple[str, ...] = key(_endpoints, [], "IMAPS listeners (993 by convention): "
                                      "TLS from the first byte")
    require_secure_auth: bool = key(_boolean, False, "LOGIN, AUTHENTICATE PLAIN/LOGIN only "
                                    "after STARTTLS or on IMAPS (LOGINDISABLED before)")
    idle_timeout: float = key(_period, "30m", "an idle session is closed; under 30 minutes "
                              "(RFC 3501 section 5.4) is a warning")
    auth_failure_delay: float = key(_duration, "2s", "delay after a failed log-in, doubling per "
                                    "source address")
    auth_failure_delay_max: float = key(_duration, "30s", "the longest log-in failure delay")
    max_connections: int = key(_positive, 1000, "concurrent sessions", unit="connections")
    max_connections_per_client: int = key(_positive, 50, "concurrent sessions from one address",
                                          unit="connections")
    sasl_mechanisms: tuple[str, ...] = key(_sasl_mechanisms, ["PLAIN", "LOGIN", "CRAM-MD5",
                                                              "SCRAM-SHA-256"],
                                           "what AUTHENTICATE may offer")
    max_literal: int = key(_positive_size, "64MB", "largest APPEND literal (RFC 7888 LITERAL+ included); "
                           "past it the command gets NO [TOOBIG]", unit="bytes")


# --- [admin_web] (issue 19: the admin API and console) ---------------------------------


def _admin_peer_name(value: Any) -> str:
    text = _string(value)
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", text):
        raise ValueError(f"{text!r}: a peer's name is 1-63 letters, digits, '.', '_' or '-'")
    return text


def _admin_url(value: Any) -> str:
    text = _string(value)
    if not re.match(r"^https?://[^/\s?#]+/?$", text):
        raise ValueError(f"{text!r} is not a server URL (https://host:port/)")
    return text.rstrip("/")


@dataclass(frozen=True)
class AdminPeerConfig:
    """A ``[[admin_web.peers]]`` entry: another pop3coexist server the console manages through
    its admin API."""

    name: str = key(_admin_peer_name, REQUIRED, "the name the console's server picker shows")
    url: str = key(_admin_url, REQUIRED, "its admin API (https://host:port; http:// only to "
                   "a loopback address)")
    token_file: Path | None = key(_path, "", "a file with its API token (the token alone)")
    certificate: Path | None = key(_path, "", "a client certificate (PEM) instead of a token")
    private_key: Path | None = key(_path, "", "the client certificate's key (default: in "
                                   "certificate)")
    ca_file: Path | None = key(_path, "", "CA certificates (PEM) to verify it with; default: "
                               "the system's")


@dataclass(frozen=True)
class AdminWebConfig:
    """The admin API and console (README "Admin console"), in the main process only."""

    listen: tuple[str, ...] = key(_endpoints, [], "plain HTTP listeners, loopback or unix: "
                                  'only (e.g. "tcp:8025:interface=127.0.0.1"); none: off')
    tls_listen: tuple[str, ...] = key(_endpoints, [], "HTTPS listeners (the [tls] certificate); "
                                      "client certificates are asked for when client_ca is set")
    accounts_file: Path | None = key(_path, "", "administrator accounts (scrypt)",
                                     shown="`<state_dir>/admin/accounts.json`")
    tokens_file: Path | None = key(_path, "", "API tokens (SHA-256 of each)",
                                   shown="`<state_dir>/admin/tokens.json`")
    client_ca: Path | None = key(_path, "", "CA (PEM) of the client certificates that log in "
                                 "as the administrator named by their CN; none: tokens only")
    session_timeout: float = key(_period, "30m", "a console session idle this long ends")
    graph_interval: float = key(_period, "15s", "the graphs' sampling interval")
    graph_history: float = key(_period, "3h", "how far back the graphs go (kept in memory)")
    peers: tuple[AdminPeerConfig, ...] = tables(AdminPeerConfig, "servers the console manages")

    @property
    def enabled(self) -> bool:
        return bool(self.listen or self.tls_listen)

    def accounts_path(self, state_dir: Path) -> Path:
        return self.accounts_file or Path(state_dir) / "admin" / "accounts.json"

    def tokens_path(self, state_dir: Path) -> Path:
        return self.tokens_file or Path(state_dir) / "admin" / "tokens.json"


# --- [web] (issue 19: web mail over twisted.web) -------------------------------------------


def is_loopback_endpoint(description: str) -> bool:
    """True when a listener description can only be reached from this host: a ``tcp:`` or
    ``tcp6:`` listener whose ``interface=`` is a loopback address (127.0.0.0/8, ::1,
    ``localhost``), or a ``unix:`` socket (a reverse proxy on this host). Anything else (no
    ``interface=``: every address; ``systemd:``: unknown) is not. Raises ValueError for a
    malformed description (``parse_endpoint``)."""
    kind, _args, kw = parse_endpoint(description)
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6"):
        return False
    interface = kw.get("interface", "")
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def check_web_listeners(r: Any, section: str, listen: tuple[str, ...],
                        tls_listen: tuple[str, ...], tls_enabled: bool) -> None:
    """The rule of every HTTP front-end (``[web]``, and any console beside it): TLS is
    required except on loopback. A plain ``listen`` entry that is not loopback
    (``is_loopback_endpoint``) is a ConfigError naming file, line and key; ``tls_listen``
    needs ``[tls]``. ``r`` is the reader (its ``fail`` names where)."""
    for desc in listen:
        if not is_loopback_endpoint(desc):
            raise r.fail(section, "listen",
                         f"{desc!r} is not a loopback address: passwords and session cookies "
                         "would cross the network in clear text; put it in tls_listen, or "
                         "listen on 127.0.0.1, ::1 or a unix: socket behind a TLS proxy")
    if tls_listen and not tls_enabled:
        raise r.fail(section, "tls_listen", "needs [tls] certificate and private_key")


@dataclass(frozen=True)
class WebConfig:
    """Web mail (README "Web mail"): server-rendered pages over twisted.web, in the main
    process, over the same store, checker, throttle and submission path as POP3 and SMTP."""

    listen: tuple[str, ...] = key(_endpoints, [], "plain HTTP listeners: loopback or unix: "
                                  "only (TLS is required elsewhere); none: no web mail")
    tls_listen: tuple[str, ...] = key(_endpoints, [], "HTTPS listeners: TLS from the first "
                                      "byte, with [tls]")
    session_idle_timeout: float = key(_period, "30m", "a session unused this long is logged "
                                      "out")
    session_max_age: float = key(_period, "12h", "a session is logged out this long after "
                                 "its log-in, used or not")
    session_recheck: float = key(_duration, "10s", "a logged-in session is asked this often "
                                 "whether its account's password changed or the account "
                                 "was removed, disabled or locked (it then ends); 0: at "
                                 "every request")
    max_sessions: int = key(_positive, 10000, "sessions at once (the oldest idle one goes "
                            "first)", unit="sessions")
    max_upload: int = key(_positive_size, "25MB", "largest request body (a message with its "
                          "attachments)", unit="bytes")
    page_size: int = key(_positive, 50, "messages per page of a folder", unit="messages")
    parse_budget: int = key(_positive_size, "64MB", "message bytes parsed at once to show "
                            "a message or cut out an attachment (each parse holds several "
                            "times its message's size; more wait their turn, a larger "
                            "message runs alone)", unit="bytes")
    max_connections: int = key(_positive, 1000, "concurrent HTTP connections (past it: 503)",
                               unit="connections")
    max_connections_per_client: int = key(_positive, 50, "concurrent HTTP connections from "
                                          "one address (a reverse proxy in trusted_proxies "
                                          "counts only in the total)", unit="connections")
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = key(
        _networks, [], "reverse proxies (on a plain listener) whose X-Forwarded-For names the "
        "client: its address then counts for the log-in throttle, the log and Received")


@dataclass(frozen=True)
class Config:
    """The whole validated configuration. ``path`` is the file it came from (or None);
    ``warnings`` are legal but unusual settings (file, line and key named), for the log and
    ``check-config``."""

    server: ServerConfig = field(metadata={"table": ServerConfig})
    pop3: Pop3Config = table(Pop3Config)
    smtp: SmtpConfig = table(SmtpConfig)
    tls: TlsConfig = table(TlsConfig)
    auth: AuthConfig = table(AuthConfig)
    domains: DomainsConfig = table(DomainsConfig)
    relay: RelayConfig = table(RelayConfig)
    smarthost: SmarthostConfig = table(SmarthostConfig)
    queue: QueueConfig = table(QueueConfig)
    path: Path | None = None
    gateway: GatewayConfig = table(GatewayConfig)
    masquerade: MasqueradeConfig = table(MasqueradeConfig)
    dns: DnsConfig = table(DnsConfig)
    dkim: tuple[DkimConfig, ...] = tables(DkimConfig, "DKIM signing keys")
    sender_authentication: SenderAuthConfig = table(SenderAuthConfig)
    sieve: SieveConfig = table(SieveConfig)
    managesieve: ManageSieveConfig = table(ManageSieveConfig)
    imap: ImapConfig = table(ImapConfig)
    web: WebConfig = table(WebConfig)
    metrics: MetricsConfig = table(MetricsConfig)
    log: LogConfig = table(LogConfig)
    milter: tuple[MilterConfig, ...] = tables(MilterConfig, "content filters, in order")
    admin_web: AdminWebConfig = table(AdminWebConfig)
    warnings: tuple[str, ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()


# --------------------------------------------------------------------------- the reader


class _Reader:
    """Checks one TOML document against the declared keys and converts values."""

    def __init__(self, text: str, path: Path | None) -> None:
        self.text = text
        self.lines = text.splitlines()
        self.path = path
        self.base = path.parent if path else Path.cwd()
        self.warnings: list[str] = []

    # -- error reporting

    def where(self, section: str, key: str | None) -> str:
        name = str(self.path) if self.path else "<config>"
        line = self._find_line(section, key)
        return f"{name}:{line}" if line else name

    def _find_line(self, section: str, key: str | None) -> int | None:
        header = re.compile(r"^\s*\[\[?\s*" + re.escape(section) + r"\s*\]\]?\s*(#.*)?$")
        in_section = section == ""
        for number, line in enumerate(self.lines, 1):
            stripped = line.strip()
            if stripped.startswith("["):
                in_section = bool(header.match(line))
                if in_section and key is None:
                    return number
                continue
            if in_section and key is not None and re.match(
                r"^\s*" + re.escape(key) + r"\s*=", line
            ):
                return number
        return None

    def fail(self, section: str, key: str | None, message: str) -> ConfigError:
        dotted = f"{section}.{key}" if section and key else (section or key or "")
        return ConfigError(f"{self.where(section, key)}: [{dotted}] {message}")

    def warn(self, section: str, key: str | None, message: str) -> None:
        """Record a legal but unusual setting, named as an error would be."""
        dotted = f"{section}.{key}" if section and key else (section or key or "")
        self.warnings.append(f"{self.where(section, key)}: [{dotted}] {message}")

    # -- sections

    def section(
        self,
        data: Mapping[str, Any],
        name: str,
        spec: Mapping[str, Callable[[Any], Any]],
        subsections: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Convert the keys of one table; unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise self.fail(name, None, "must be a table")
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key in subsections:
                continue
            conv = spec.get(key)
            if conv is None:
                known = ", ".join(sorted(spec))
                raise self.fail(name, key, f"unknown key (known keys: {known})")
            try:
                out[key] = conv(value)
            except (ValueError, TypeError) as e:
                raise self.fail(name, key, str(e)) from None
            if isinstance(out[key], Path):  # relative to the config file's folder
                out[key] = Path(os.path.normpath(self.base / out[key]))
        return out

    def listeners(self, values: dict[str, Any], name: str) -> dict[str, Any]:
        """``values`` with every ``unix:`` listener's path made relative to the config file's
        folder (``resolve_unix_endpoint``)."""
        for key in ("listen", "tls_listen", "submission_listen"):
            if key in values:
                try:
                    values[key] = tuple(resolve_unix_endpoint(d, self.base) for d in values[key])
                except ValueError as e:
                    raise self.fail(name, key, str(e)) from None
        return values

    def keys(self, data: Any, name: str, cls: type) -> dict[str, Any]:
        """Convert one table by the keys declared in ``cls`` (its sub-tables are read apart)."""
        return self.section(data, name, _spec(cls), _subsections(cls))

    # -- the converters, under the names the section code has always used

    boolean = staticmethod(_boolean)
    string = staticmethod(_string)
    integer = staticmethod(_integer)
    positive = staticmethod(_positive)
    strings = staticmethod(_strings)
    endpoints = staticmethod(_endpoints)
    networks = staticmethod(_networks)
    size = staticmethod(_size)
    duration = staticmethod(_duration)
    durations = staticmethod(_durations)
    domain_list = staticmethod(_domain_list)
    path_or_none = staticmethod(_path)
    choice = staticmethod(_choice)


def locate(path: str | Path | None, message: str) -> str:
    """``message`` of a check made after parsing (``"[tls.private_key] ..."``: the TLS files,
    the state folder) with ``FILE:LINE: `` in front, as the parser's own errors have, where
    FILE is the config file and LINE the line of the key named in brackets (the file alone
    when the key is not written in it). Other messages are returned unchanged."""
    m = re.match(r"^\[([a-z0-9_.]+)\]", message)
    if path is None or not m:
        return message
    section, _, key = m.group(1).rpartition(".")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return f"{path}: {message}"
    reader = _Reader(text, Path(path))
    if section:
        return f"{reader.where(section, key)}: {message}"
    return f"{reader.where(key, None)}: {message}"


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError (naming the key) if it is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config file: {e}")
    return parse_config(text, p.resolve())


def parse_config(text: str, path: Path | None = None) -> Config:
    """Validate TOML text; relative paths are taken from ``path``'s folder."""
    r = _Reader(text, path)
    name = str(path) if path else "<config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{name}: not valid TOML: {e}")

    top_known = _subsections(Config)
    for key in data:
        if key not in top_known:
            raise r.fail("", key, f"unknown section or key (known: {', '.join(top_known)})")

    server = r.keys(data.get("server", {}), "server", ServerConfig)
    if "hostname" not in server:
        raise r.fail("server", "hostname", "is required")
    if server.get("state_dir") is None:
        raise r.fail("server", "state_dir", "is required")
    server_cfg = ServerConfig(
        hostname=server["hostname"], state_dir=server["state_dir"], workers=server.get("workers", 1),
        local_dir=server.get("local_dir"), node_id=server.get("node_id", ""),
    )
    if server_cfg.local_dir is not None:
        _check_local_dir(r, server_cfg)

    pop3_cfg = Pop3Config(**r.listeners(r.keys(data.get("pop3", {}), "pop3", Pop3Config), "pop3"))
    # RFC 1939 section 3 asks for at least 10 minutes, RFC 5321 section 4.5.3.2.7 for 5; a
    # shorter time is the administrator's choice (Postfix's smtpd_timeout, the Windows POP3
    # service's socket timeout take any): a warning, as for max_recipients
    _check_failure_delays(r, "pop3", pop3_cfg)
    if pop3_cfg.idle_timeout < POP3_MIN_IDLE:
        r.warn("pop3", "idle_timeout",
               f"{pop3_cfg.idle_timeout:g} seconds is under the 10 minutes RFC 1939 (section 3) "
               "asks for: a client that pauses longer is logged out")

    smtp_cfg = SmtpConfig(**r.listeners(r.keys(data.get("smtp", {}), "smtp", SmtpConfig), "smtp"))
    _check_failure_delays(r, "smtp", smtp_cfg)
    if smtp_cfg.max_recipients < RFC5321_MIN_RECIPIENTS:
        # RFC 5321 section 4.5.3.1.8: a server must be able to take 100 recipients; a lower
        # limit is the administrator's choice (clients get 452 4.5.3 and send the rest later).
        r.warn("smtp", "max_recipients",
               f"{smtp_cfg.max_recipients} is under the {RFC5321_MIN_RECIPIENTS} recipients a "
               "server must accept (RFC 5321 section 4.5.3.1.8): clients get 452 4.5.3 past "
               "it and must send to the others in another transaction")
    if smtp_cfg.idle_timeout < SMTP_MIN_IDLE:
        r.warn("smtp", "idle_timeout",
               f"{smtp_cfg.idle_timeout:g} seconds is under the 5 minutes RFC 5321 (section "
               "4.5.3.2.7) asks for: a client that waits longer between commands is cut off "
               "with 421 4.4.2")

    tls = r.keys(data.get("tls", {}), "tls", TlsConfig)
    tls_cfg = TlsConfig(**tls)
    if (tls_cfg.certificate is None) != (tls_cfg.private_key is None):
        missing = "private_key" if tls_cfg.private_key is None else "certificate"
        raise r.fail("tls", missing, "certificate and private_key go together")
    if tls_cfg.self_signed and not tls_cfg.enabled:
        raise r.fail("tls", "self_signed", "needs the certificate and private_key paths to write")
    for key in ("certificate", "private_key"):
        p = getattr(tls_cfg, key)
        if tls_cfg.self_signed and not (tls_cfg.certificate.exists() or tls_cfg.private_key.exists()):
            break
        if p is not None and not p.is_file():
            raise r.fail("tls", key, _not_a_file(p) + (
                " (self_signed creates the pair only when both files are missing)"
                if tls_cfg.self_signed and not p.is_dir() else ""))

    auth_data = data.get("auth", {})
    auth = r.keys(auth_data, "auth", AuthConfig)
    method = auth.get("method", "passwordfile")
    apop = auth.get("apop", method == "passwordfile")
    if apop and method != "passwordfile":
        raise r.fail(
            "auth", "apop",
            f"APOP needs the shared secret, which method {method!r} does not keep; set apop = false",
        )
    dir_data = auth_data.get("directory", {}) if isinstance(auth_data, Mapping) else {}
    attr_data = dir_data.get("attributes", {}) if isinstance(dir_data, Mapping) else {}
    attrs = r.keys(attr_data, "auth.directory.attributes", DirectoryAttributes)
    directory = r.keys(dir_data, "auth.directory", DirectoryConfig)
    dir_cfg = DirectoryConfig(**directory, attributes=DirectoryAttributes(**attrs))
    if not re.match(r"^ldaps?://[^/]+/?$", dir_cfg.url):
        raise r.fail("auth.directory", "url", f"{dir_cfg.url!r} is not an ldap:// or ldaps:// URL")
    if dir_cfg.starttls and dir_cfg.url.startswith("ldaps:"):
        raise r.fail("auth.directory", "starttls", "StartTLS and ldaps:// do not go together")
    local_cfg = LocalConfig(**r.keys(
        auth_data.get("local", {}) if isinstance(auth_data, Mapping) else {}, "auth.local",
        LocalConfig))
    auth_cfg = AuthConfig(method=method, apop=apop, directory=dir_cfg, local=local_cfg,
                          **({"login_cache": auth["login_cache"]} if "login_cache" in auth else {}))
    if method == "directory":
        for key in ("base_dn", "bind_dn"):
            if not getattr(dir_cfg, key):
                raise r.fail("auth.directory", key, "is required with auth.method = \"directory\"")
        if dir_cfg.bind_password_file is None:
            raise r.fail("auth.directory", "bind_password_file", "is required with auth.method = \"directory\"")
        if not dir_cfg.bind_password_file.is_file():
            raise r.fail("auth.directory", "bind_password_file", _not_a_file(dir_cfg.bind_password_file))
        for key in ("ca_file",):
            p = getattr(dir_cfg, key)
            if p is not None and not p.is_file():
                raise r.fail("auth.directory", key, _not_a_file(p))

    dom_data = data.get("domains", {})
    doms = r.keys(dom_data, "domains", DomainsConfig)
    remote_list = dom_data.get("remote", []) if isinstance(dom_data, Mapping) else []
    if not isinstance(remote_list, list):
        raise r.fail("domains", "remote", "must be an array of tables ([[domains.remote]])")
    remotes: list[RemoteDomain] = []
    for item in remote_list:
        rd = r.keys(item, "domains.remote", RemoteDomain)
        if "name" not in rd:
            raise r.fail("domains.remote", "name", "is required")
        if _is_wildcard(rd["name"]):
            raise r.fail("domains.remote", "name", f"{rd['name']!r} would make an open relay")
        routes = rd.pop("route", ())
        if "" in routes:
            raise r.fail("domains.remote", "route", "a next hop cannot be empty")
        rd["route"], rd["routes"] = (routes[0], routes) if routes else (None, ())
        remotes.append(RemoteDomain(**rd))
    local_domains = doms.get("local", ())
    names = [d.name for d in remotes]
    for d in names:
        if d in local_domains:
            raise r.fail("domains.remote", "name", f"{d!r} is also a local domain")
        if names.count(d) > 1:
            raise r.fail("domains.remote", "name", f"{d!r} is listed twice")
    domains_cfg = DomainsConfig(local=local_domains, remote=tuple(remotes),
                                postmaster=doms.get("postmaster", ""), abuse=doms.get("abuse", ""),
                                quota_grace=doms.get("quota_grace", QuotaGrace(percent=10.0)))
    for key in ("postmaster", "abuse"):
        target = doms.get(key, "")
        local_part, _, target_domain = target.rpartition("@")
        if target and target_domain in local_domains and not is_valid_mailbox_name(local_part):
            raise r.fail("domains", key, f"{target!r}: {local_part!r} is not a mailbox name this "
                         "server can create in a local domain")
    if method == "local" and len(local_domains) > 1:
        raise r.fail(
            "domains", "local",
            "auth.method = \"local\" allows one mail domain only (one address per account)",
        )

    relay_cfg = RelayConfig(**r.keys(data.get("relay", {}), "relay", RelayConfig))
    for net in relay_cfg.networks:
        if net.prefixlen == 0:
            raise r.fail("relay", "networks", f"{net} lets every address relay: an open relay")

    sh = r.keys(data.get("smarthost", {}), "smarthost", SmarthostConfig)
    sh_cfg = SmarthostConfig(**sh)
    if sh_cfg.username and sh_cfg.password_file is None:
        raise r.fail("smarthost", "password_file", "is required when smarthost.username is set")
    if sh_cfg.password_file is not None and not sh_cfg.password_file.is_file():
        raise r.fail("smarthost", "password_file", _not_a_file(sh_cfg.password_file))
    if sh_cfg.ca_file is not None and not sh_cfg.ca_file.is_file():
        raise r.fail("smarthost", "ca_file", _not_a_file(sh_cfg.ca_file))

    if sh_cfg.mx_port != 25:
        r.warn("smarthost", "mx_port", f"direct delivery goes to port {sh_cfg.mx_port}: MX hosts "
               "on the Internet listen on port 25 (RFC 5321 section 4.5.4.2)")
    queue_cfg = QueueConfig(**r.keys(data.get("queue", {}), "queue", QueueConfig))
    if queue_cfg.claim_lease < 20:
        raise r.fail("queue", "claim_lease", "must be at least 20 seconds (a runner renews its "
                     "lease every sixth of it)")
    if queue_cfg.recycle > 4096:
        raise r.fail("queue", "recycle", "must be at most 4096 (a pooled file holds a delivered "
                     "message until it is reused or a minute has passed)")

    if pop3_cfg.tls_listen and not tls_cfg.enabled:
        raise r.fail("pop3", "tls_listen", "needs [tls] certificate and private_key")
    if smtp_cfg.tls_listen and not tls_cfg.enabled:
        raise r.fail("smtp", "tls_listen", "needs [tls] certificate and private_key")
    if pop3_cfg.require_secure_auth and not tls_cfg.enabled:
        raise r.fail("pop3", "require_secure_auth", "needs [tls] certificate and private_key")
    if smtp_cfg.require_tls_for_auth and not tls_cfg.enabled:
        raise r.fail("smtp", "require_tls_for_auth", "needs [tls] certificate and private_key")

    gateway_cfg = _parse_gateway(r, data, auth_cfg, domains_cfg)
    masq_cfg = _parse_masquerade(r, data, domains_cfg, gateway_cfg)
    dns_cfg, dkim_cfg, sender_auth_cfg = _parse_mail_auth(r, data)

    sieve_cfg = SieveConfig(**r.keys(data.get("sieve", {}), "sieve", SieveConfig))
    if sieve_cfg.vacation_min_days > sieve_cfg.vacation_max_days:
        raise r.fail("sieve", "vacation_min_days", "is larger than sieve.vacation_max_days")
    if not sieve_cfg.vacation_min_days <= sieve_cfg.vacation_days <= sieve_cfg.vacation_max_days:
        raise r.fail("sieve", "vacation_days", f"{sieve_cfg.vacation_days} is outside "
                     f"sieve.vacation_min_days to sieve.vacation_max_days "
                     f"({sieve_cfg.vacation_min_days} to {sieve_cfg.vacation_max_days})")
    if sieve_cfg.srs_secret_file is not None and not sieve_cfg.srs_secret_file.is_file():
        raise r.fail("sieve", "srs_secret_file", _not_a_file(sieve_cfg.srs_secret_file))
    msieve_cfg = ManageSieveConfig(**r.listeners(
        r.keys(data.get("managesieve", {}), "managesieve", ManageSieveConfig), "managesieve"))
    if msieve_cfg.listen and msieve_cfg.require_tls and not tls_cfg.enabled:
        raise r.fail("managesieve", "require_tls", "needs [tls] certificate and private_key "
                     "(or require_tls = false)")
    metrics_cfg, log_cfg = _parse_monitoring(r, data)
    milters = _parse_milters(r, data)
    imap_cfg = ImapConfig(**r.listeners(r.keys(data.get("imap", {}), "imap", ImapConfig), "imap"))
    _check_failure_delays(r, "imap", imap_cfg)
    if imap_cfg.idle_timeout <= 0:
        raise r.fail("imap", "idle_timeout", "must be longer than zero")
    if imap_cfg.idle_timeout < IMAP_MIN_IDLE:
        r.warn("imap", "idle_timeout",
               f"{imap_cfg.idle_timeout:g} seconds is under the 30 minutes RFC 3501 (section "
               "5.4) asks for: an IDLE client that renews every 29 minutes is logged out")
    if imap_cfg.tls_listen and not tls_cfg.enabled:
        raise r.fail("imap", "tls_listen", "needs [tls] certificate and private_key")
    if imap_cfg.require_secure_auth and not tls_cfg.enabled:
        raise r.fail("imap", "require_secure_auth", "needs [tls] certificate and private_key")
    web_cfg = WebConfig(**r.listeners(r.keys(data.get("web", {}), "web", WebConfig), "web"))
    check_web_listeners(r, "web", web_cfg.listen, web_cfg.tls_listen, tls_cfg.enabled)

    return Config(
        web=web_cfg,
        dns=dns_cfg,
        dkim=dkim_cfg,
        sender_authentication=sender_auth_cfg,
        sieve=sieve_cfg,
        managesieve=msieve_cfg,
        imap=imap_cfg,
        milter=milters,
        gateway=gateway_cfg,
        masquerade=masq_cfg,
        metrics=metrics_cfg,
        log=log_cfg,
        server=server_cfg,
        pop3=pop3_cfg,
        smtp=smtp_cfg,
        tls=tls_cfg,
        auth=auth_cfg,
        domains=domains_cfg,
        relay=relay_cfg,
        smarthost=sh_cfg,
        queue=queue_cfg,
        path=path,
        admin_web=_parse_admin_web(r, data, tls_cfg),
        warnings=tuple(r.warnings),
    )


def read_secret(path: Path) -> str:
    """Read a secret file: the secret alone, a trailing newline ignored. Never logs the value."""
    data = path.read_text(encoding="utf-8")
    if data.endswith("\r\n"):
        data = data[:-2]
    elif data.endswith("\n"):
        data = data[:-1]
    return data


# --------------------------------------------------------------------------- coexistence


def _address_space(default_cost: int) -> Callable[[Any], AddressSpace]:
    """``"domain"`` (the connector's cost) or ``{domain = "...", cost = N}``; never a wildcard."""

    def conv(value: Any) -> AddressSpace:
        if isinstance(value, str):
            name, cost = value, default_cost
        elif isinstance(value, Mapping):
            unknown = set(value) - {"domain", "cost"}
            if unknown:
                raise ValueError(f"unknown key {sorted(unknown)[0]!r} in an address space "
                                 "(known: domain, cost)")
            name, cost = value.get("domain"), value.get("cost", default_cost)
            if not isinstance(name, str):
                raise TypeError("an address space needs domain = \"...\"")
        else:
            raise TypeError(f"an address space is a domain or {{domain, cost}}, not {value!r}")
        if _is_wildcard(name):
            raise ValueError(f"address space {name!r} would make an open relay "
                             "(name the domains, never *)")
        if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= 100:
            raise ValueError(f"cost {cost!r} must be a whole number from 1 to 100")
        return AddressSpace(_hostname(name), cost)

    return conv


def _parse_gateway(r: _Reader, data: Mapping[str, Any], auth: AuthConfig,
                   domains: DomainsConfig) -> GatewayConfig:
    if "gateway" not in data:
        return GatewayConfig()
    gw_data = data["gateway"]
    gw = r.keys(gw_data, "gateway", GatewayConfig)
    enabled = gw.pop("enabled", True)
    auth_doms = gw.get("authoritative_domains", ())
    nonauth = gw.get("non_authoritative_domains", ())
    if enabled and auth.method != "directory":
        raise r.fail("auth", "method", "the gateway role resolves recipients in the directory: "
                     "set auth.method = \"directory\"")
    for d in nonauth:
        if d in auth_doms:
            raise r.fail("gateway", "non_authoritative_domains",
                         f"{d!r} is also an authoritative domain")
        if d in domains.local:
            raise r.fail("gateway", "non_authoritative_domains",
                         f"{d!r} is a local domain; local domains are authoritative")
    connectors: list[ConnectorConfig] = []
    raw_conns = gw_data.get("connectors", [])
    if not isinstance(raw_conns, list):
        raise r.fail("gateway", "connectors", "must be an array of tables ([[gateway.connectors]])")
    for item in raw_conns:
        c = r.keys(item, "gateway.connectors", ConnectorConfig)
        name = c.get("name") or f"connector {len(connectors) + 1}"
        if any(x.name == name for x in connectors):
            raise r.fail("gateway.connectors", "name", f"{name!r} is used twice")
        cost = c.pop("cost", 1)
        if cost > 100:
            raise r.fail("gateway.connectors", "cost", "must be from 1 to 100")
        spaces_raw = c.get("address_spaces")
        if not isinstance(spaces_raw, list) or not spaces_raw:
            raise r.fail("gateway.connectors", "address_spaces",
                         f"connector {name!r} needs a non-empty list of domains")
        conv = _address_space(cost)
        try:
            spaces = tuple(conv(v) for v in spaces_raw)
        except (ValueError, TypeError) as e:
            raise r.fail("gateway.connectors", "address_spaces", f"connector {name!r}: {e}") from None
        for space in spaces:
            if space.domain in domains.local or space.domain in auth_doms:
                raise r.fail("gateway.connectors", "address_spaces",
                             f"connector {name!r}: {space.domain!r} is a domain this server is "
                             "authoritative for; mail for it would never leave (or loop)")
        hops = c.get("next_hops", ())
        if not hops:
            raise r.fail("gateway.connectors", "next_hops", f"connector {name!r} needs a next hop")
        try:
            hops = tuple(_next_hop(h) for h in hops)
        except ValueError as e:
            raise r.fail("gateway.connectors", "next_hops", str(e)) from None
        if "" in hops:
            raise r.fail("gateway.connectors", "next_hops", "a next hop cannot be empty")
        connectors.append(ConnectorConfig(
            name=name, address_spaces=spaces, next_hops=hops,
            allow_relay=c.get("allow_relay", False), peer_hostname=c.get("peer_hostname", ""),
            cost=cost,
        ))
    for rd in domains.remote:
        for c in connectors:
            if any(s.domain == rd.name for s in c.address_spaces):
                raise r.fail("domains.remote", "name",
                             f"{rd.name!r} is also an address space of connector {c.name!r}; "
                             "name it in one place")
    policies: list[RecipientPolicyConfig] = []
    raw_pols = gw_data.get("recipient_policies", [])
    if not isinstance(raw_pols, list):
        raise r.fail("gateway", "recipient_policies",
                     "must be an array of tables ([[gateway.recipient_policies]])")
    for item in raw_pols:
        p = r.keys(item, "gateway.recipient_policies", RecipientPolicyConfig)
        if not p.get("name"):
            raise r.fail("gateway.recipient_policies", "name", "is required")
        if any(x.name == p["name"] for x in policies):
            raise r.fail("gateway.recipient_policies", "name", f"{p['name']!r} is used twice")
        if not p.get("primary") and not p.get("secondary"):
            raise r.fail("gateway.recipient_policies", "primary",
                         f"policy {p['name']!r} gives no address (primary or secondary)")
        policies.append(RecipientPolicyConfig(**p))
    policies.sort(key=lambda x: x.priority)
    if gw.get("update_bind_password_file") is not None and not gw["update_bind_password_file"].is_file():
        raise r.fail("gateway", "update_bind_password_file",
                     _not_a_file(gw['update_bind_password_file']))
    return GatewayConfig(enabled=enabled, connectors=tuple(connectors),
                         recipient_policies=tuple(policies), **gw)


def _parse_masquerade(r: _Reader, data: Mapping[str, Any], domains: DomainsConfig,
                      gateway: GatewayConfig) -> MasqueradeConfig:
    m = r.keys(data.get("masquerade", {}), "masquerade", MasqueradeConfig)
    cfg = MasqueradeConfig(**m)
    if not cfg.domain:
        if cfg.from_domains or cfg.header_from:
            raise r.fail("masquerade", "domain", "is required when [masquerade] is used")
        return cfg
    if cfg.domain in domains.local:
        raise r.fail("masquerade", "domain",
                     f"{cfg.domain!r} is a local domain here: masquerade as the gateway's shared "
                     "domain, which must not be local on the POP3 server")
    for d in cfg.from_domains:
        if d not in domains.local:
            raise r.fail("masquerade", "from_domains", f"{d!r} is not a local domain")
    if not cfg.from_domains:
        cfg = MasqueradeConfig(cfg.domain, tuple(domains.local), cfg.header_from)
    return cfg


def _parse_mail_auth(r: _Reader, data: Mapping[str, Any]
                     ) -> tuple[DnsConfig, tuple[DkimConfig, ...], SenderAuthConfig]:
    """``[dns]``, ``[[dkim]]`` and ``[sender_authentication]``."""
    dns_cfg = DnsConfig(**r.keys(data.get("dns", {}), "dns", DnsConfig))
    raw = data.get("dkim", [])
    if not isinstance(raw, list):
        raise r.fail("dkim", None, "must be an array of tables ([[dkim]])")
    keys: list[DkimConfig] = []
    for item in raw:
        d = r.keys(item, "dkim", DkimConfig)
        for name in ("domain", "selector", "key_file"):
            if d.get(name) in (None, ""):
                raise r.fail("dkim", name, "is required in every [[dkim]] entry")
        if any(k.domain == d["domain"] for k in keys):
            raise r.fail("dkim", "domain", f"{d['domain']!r} has two [[dkim]] entries")
        headers = d.get("headers", ())
        if headers and "from" not in headers:
            raise r.fail("dkim", "headers", "must name From (RFC 6376 section 5.4)")
        for bad in ("dkim-signature", "received", "return-path", "bcc", "authentication-results"):
            if bad in headers:
                raise r.fail("dkim", "headers", f"{bad!r} must not be signed (it changes on "
                             "the way or must not be seen)")
        keys.append(DkimConfig(**d))
    sa_data = data.get("sender_authentication")
    sa = r.keys(sa_data if sa_data is not None else {}, "sender_authentication",
                SenderAuthConfig)
    sa.setdefault("enabled", sa_data is not None)
    return dns_cfg, tuple(keys), SenderAuthConfig(**sa)
def _parse_monitoring(r: _Reader, data: Mapping[str, Any]) -> tuple[MetricsConfig, LogConfig]:
    """[metrics] and [log]: a relative mail_log path is taken from the config file's folder."""
    metrics = MetricsConfig(**r.listeners(r.keys(data.get("metrics", {}), "metrics",
                                                 MetricsConfig), "metrics"))
    values = r.keys(data.get("log", {}), "log", LogConfig)
    dest = values.get("mail_log", "")
    if dest not in ("", "-"):
        values["mail_log"] = os.path.normpath(r.base / dest)
    log_cfg = LogConfig(**values)
    if log_cfg.format == "json" and not log_cfg.mail_log:
        raise r.fail("log", "format", 'json needs [log] mail_log (a file path or "-"): the '
                     "server's own log writes text")
    return metrics, log_cfg
def _parse_milters(r: _Reader, data: Mapping[str, Any]) -> tuple[MilterConfig, ...]:
    """The ``[[milter]]`` entries, in order; names are unique; a ``unix:`` path is made
    relative to the config file's folder."""
    raw = data.get("milter", [])
    if not isinstance(raw, list):
        raise r.fail("milter", None, "must be an array of tables ([[milter]])")
    out: list[MilterConfig] = []
    for item in raw:
        m = r.keys(item, "milter", MilterConfig)
        if "socket" not in m:
            raise r.fail("milter", "socket", "is required (inet:host:port or unix:/path)")
        name = m.pop("name", "") or f"milter {len(out) + 1}"
        if any(x.name == name for x in out):
            raise r.fail("milter", "name", f"{name!r} is used twice")
        sock = m["socket"]
        if sock.startswith("unix:"):
            m["socket"] = "unix:" + os.path.normpath(r.base / sock[5:])
        out.append(MilterConfig(name=name, **m))
    return tuple(out)


def _parse_admin_web(r: _Reader, data: Mapping[str, Any], tls_cfg: TlsConfig) -> AdminWebConfig:
    """``[admin_web]`` and its ``[[admin_web.peers]]``: plain listeners on loopback only, TLS
    listeners need [tls], the files named must exist, peer names are unique."""
    raw = data.get("admin_web", {})
    values = r.listeners(r.keys(raw, "admin_web", AdminWebConfig), "admin_web")
    check_web_listeners(r, "admin_web", values.get("listen", ()), values.get("tls_listen", ()),
                        tls_cfg.enabled)
    ca = values.get("client_ca")
    if ca is not None and not ca.is_file():
        raise r.fail("admin_web", "client_ca", _not_a_file(ca))
    peer_list = raw.get("peers", []) if isinstance(raw, Mapping) else []
    if not isinstance(peer_list, list):
        raise r.fail("admin_web", "peers", "must be an array of tables ([[admin_web.peers]])")
    peers: list[AdminPeerConfig] = []
    for item in peer_list:
        p = r.keys(item, "admin_web.peers", AdminPeerConfig)
        for required in ("name", "url"):
            if required not in p:
                raise r.fail("admin_web.peers", required, "is required")
        if any(x.name == p["name"] for x in peers):
            raise r.fail("admin_web.peers", "name", f"{p['name']!r} is used twice")
        if p.get("token_file") is None and p.get("certificate") is None:
            raise r.fail("admin_web.peers", "token_file", f"peer {p['name']!r} needs "
                         "token_file or certificate")
        for name in ("token_file", "certificate", "private_key", "ca_file"):
            if p.get(name) is not None and not p[name].is_file():
                raise r.fail("admin_web.peers", name, _not_a_file(p[name]))
        host = p["url"].split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
        if p["url"].startswith("http://") and host not in ("localhost", "127.0.0.1", "::1"):
            raise r.fail("admin_web.peers", "url", f"{p['url']!r}: plain http:// only to a "
                         "loopback address; use https://")
        peers.append(AdminPeerConfig(**p))
    return AdminWebConfig(**values, peers=tuple(peers))
