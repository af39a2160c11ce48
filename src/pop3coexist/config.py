"""The configuration file (CONTRACT section 3): TOML in, a frozen and validated Config out.

Every key is declared here once, with its type and default. An unknown key, a wrong type, a
missing file or an unsafe combination raises ConfigError naming the file, the key and the line
where it can be found. No reactor, no sockets: only parsing and checking.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pop3coexist.address import AddressError, normalise_domain
from pop3coexist.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


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
    """Seconds from a number or a string like ``"30s"``, ``"15m"``, ``"12h"``, ``"2d"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is seconds or a string such as \"15m\"")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration (seconds, or \"30s\", \"15m\", \"12h\", \"2d\")")


# --------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    state_dir: Path
    workers: int = 1  # processes that accept connections; "auto" = one per CPU

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


@dataclass(frozen=True)
class Pop3Config:
    listen: tuple[str, ...] = ("tcp:1110:interface=127.0.0.1",)
    tls_listen: tuple[str, ...] = ()
    require_secure_auth: bool = False
    idle_timeout: float = 600.0
    auth_failure_delay: float = 2.0
    auth_failure_delay_max: float = 30.0
    max_connections: int = 1000
    max_connections_per_client: int = 50
    sasl_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")  # AUTH (RFC 5034) offers


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    submission_listen: tuple[str, ...] = ()
    tls_listen: tuple[str, ...] = ()
    max_message_size: int = 10 * 1000 * 1000
    max_recipients: int = 100
    max_hop_count: int = 30
    require_tls_for_auth: bool = False
    max_messages_per_connection: int = 20
    max_connections: int = 1000
    max_connections_per_client: int = 50
    idle_timeout: float = 600.0
    auth_failure_delay: float = 2.0
    auth_failure_delay_max: float = 30.0
    client_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    client_deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    sender_must_match_login: bool = True
    bare_newline: str = "normalize"  # a bare LF in DATA: "normalize" (a line end) or "reject"


@dataclass(frozen=True)
class TlsConfig:
    certificate: Path | None = None
    private_key: Path | None = None
    self_signed: bool = False  # create a self-signed pair at those paths when both are missing

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class DirectoryAttributes:
    user_principal_name: str = "userPrincipalName"
    account_name: str = "sAMAccountName"
    mail: str = "mail"
    proxy_addresses: str = "proxyAddresses"
    target_address: str = "targetAddress"
    account_control: str = "userAccountControl"
    member_of: str = "memberOf"


@dataclass(frozen=True)
class DirectoryConfig:
    url: str = "ldap://127.0.0.1:3389"
    starttls: bool = False
    ca_file: Path | None = None
    base_dn: str = ""
    bind_dn: str = ""
    bind_password_file: Path | None = None
    user_filter: str = "(objectClass=user)"
    required_group: str = ""
    timeout: float = 10.0
    attributes: DirectoryAttributes = field(default_factory=DirectoryAttributes)


@dataclass(frozen=True)
class LocalConfig:
    pam_service: str = "pop3coexist"


@dataclass(frozen=True)
class AuthConfig:
    method: str = "passwordfile"
    apop: bool = True
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    local: LocalConfig = field(default_factory=LocalConfig)


@dataclass(frozen=True)
class RemoteDomain:
    name: str
    relay: bool = True
    route: str | None = None


@dataclass(frozen=True)
class DomainsConfig:
    local: tuple[str, ...] = ()
    remote: tuple[RemoteDomain, ...] = ()
    quota_grace: QuotaGrace = QuotaGrace(percent=10.0)


@dataclass(frozen=True)
class RelayConfig:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    authenticated: bool = True


@dataclass(frozen=True)
class SmarthostConfig:
    host: str = ""
    tls: str = "opportunistic"
    ca_file: Path | None = None
    username: str = ""
    password_file: Path | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    max_connections: int = 100
    max_connections_per_host: int = 20


@dataclass(frozen=True)
class QueueConfig:
    retry_intervals: tuple[float, ...] = (900.0, 1800.0, 3600.0, 14400.0)
    delay_notification: float = 12 * 3600.0
    expiration: float = 2 * 86400.0


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

    name: str
    address_spaces: tuple[AddressSpace, ...]
    next_hops: tuple[str, ...]
    allow_relay: bool = False
    peer_hostname: str = ""


@dataclass(frozen=True)
class RecipientPolicyConfig:
    """A recipient policy: which directory objects (an LDAP filter) get which addresses."""

    name: str
    filter: str = "(|(mail=*)(proxyAddresses=*))"
    priority: int = 100
    primary: str = ""
    secondary: tuple[str, ...] = ()
    replace_primary: bool = False


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway role (``[gateway]``); ``enabled`` when the section is present."""

    enabled: bool = False
    authoritative_domains: tuple[str, ...] = ()
    non_authoritative_domains: tuple[str, ...] = ()
    connectors: tuple[ConnectorConfig, ...] = ()
    recipient_policies: tuple[RecipientPolicyConfig, ...] = ()
    update_bind_dn: str = ""
    update_bind_password_file: Path | None = None
    max_target_depth: int = 5

    def connector_hops(self, domain: str) -> tuple[str, ...]:
        """The next hops of the lowest-cost connector(s) for ``domain`` (equal costs share),
        in connector order; () when no address space matches. Domains match exactly."""
        domain = domain.lower()
        best: int | None = None
        hops: list[str] = []
        for c in self.connectors:
            for space in c.address_spaces:
                if space.domain != domain:
                    continue
                if best is None or space.cost < best:
                    best, hops = space.cost, []
                if space.cost == best:
                    hops.extend(h for h in c.next_hops if h not in hops)
        return tuple(hops)

    def connector_for(self, domain: str) -> ConnectorConfig | None:
        """The first lowest-cost connector whose address space is ``domain``."""
        domain = domain.lower()
        found: tuple[int, ConnectorConfig] | None = None
        for c in self.connectors:
            for space in c.address_spaces:
                if space.domain == domain and (found is None or space.cost < found[0]):
                    found = (space.cost, c)
        return found[1] if found else None


@dataclass(frozen=True)
class MasqueradeConfig:
    """Rewrite the envelope sender (and with ``header_from`` the From: header) of mail leaving
    for other servers, from ``from_domains`` (default: the local domains) to ``domain``."""

    domain: str = ""
    from_domains: tuple[str, ...] = ()
    header_from: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.domain)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration. ``path`` is the file it came from (or None)."""

    server: ServerConfig
    pop3: Pop3Config = field(default_factory=Pop3Config)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    smarthost: SmarthostConfig = field(default_factory=SmarthostConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    path: Path | None = None
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    masquerade: MasqueradeConfig = field(default_factory=MasqueradeConfig)

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
        return out

    # -- converters

    @staticmethod
    def boolean(value: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, not {value!r}")
        return value

    @staticmethod
    def string(value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"must be a string, not {value!r}")
        return value

    @staticmethod
    def integer(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"must be a whole number, not {value!r}")
        if value < 0:
            raise ValueError("cannot be negative")
        return value

    @staticmethod
    def positive(value: Any) -> int:
        value = _Reader.integer(value)
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @staticmethod
    def strings(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"must be a list of strings, not {value!r}")
        return tuple(value)

    @staticmethod
    def endpoints(value: Any) -> tuple[str, ...]:
        items = _Reader.strings(value)
        for item in items:
            if not re.match(r"^(tcp|tcp6|unix):", item):
                raise ValueError(
                    f"{item!r} is not a server endpoint description (e.g. \"tcp:2525:interface=127.0.0.1\")"
                )
            if item.startswith(("tcp:", "tcp6:")) and not re.match(r"^tcp6?:\d+(:|$)", item):
                raise ValueError(f"{item!r} has no port number")
        return items

    @staticmethod
    def networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        items = _Reader.strings(value)
        out = []
        for item in items:
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an address or network (\"192.0.2.0/24\")")
        return tuple(out)

    @staticmethod
    def size(value: Any) -> int:
        return parse_size(value)

    @staticmethod
    def duration(value: Any) -> float:
        return parse_duration(value)

    @staticmethod
    def durations(value: Any) -> tuple[float, ...]:
        if not isinstance(value, list) or not value:
            raise TypeError("must be a non-empty list of durations")
        out = tuple(parse_duration(v) for v in value)
        if any(v <= 0 for v in out):
            raise ValueError("every interval must be longer than zero")
        return out

    @staticmethod
    def domain_list(value: Any) -> tuple[str, ...]:
        items = _Reader.strings(value)
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

    def path_or_none(self, value: Any) -> Path | None:
        value = self.string(value)
        if value == "":
            return None
        p = Path(value)
        return Path(os.path.normpath(p if p.is_absolute() else (self.base / p)))

    def choice(self, *choices: str) -> Callable[[Any], str]:
        def conv(value: Any) -> str:
            value = self.string(value)
            if value not in choices:
                raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
            return value

        return conv


def _hostname(value: Any) -> str:
    value = _Reader.string(value)
    try:
        return normalise_domain(value)
    except AddressError as e:
        raise ValueError(str(e))


def _next_hop(value: Any) -> str:
    """``name[:port]`` or ``[address][:port]``; returns it unchanged after checking."""
    value = _Reader.string(value)
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


SASL_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def _sasl_mechanisms(value: Any) -> tuple[str, ...]:
    """A list of SASL mechanism names from SASL_MECHANISMS (any case); [] offers no AUTH."""
    items = _Reader.strings(value)
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

    top_known = (
        "server", "pop3", "smtp", "tls", "auth", "domains", "relay", "smarthost", "queue",
        "gateway", "masquerade",
    )
    for key in data:
        if key not in top_known:
            raise r.fail("", key, f"unknown section or key (known: {', '.join(top_known)})")

    server = r.section(
        data.get("server", {}),
        "server",
        {"hostname": _hostname, "state_dir": r.path_or_none, "workers": _workers},
    )
    if "hostname" not in server:
        raise r.fail("server", "hostname", "is required")
    if server.get("state_dir") is None:
        raise r.fail("server", "state_dir", "is required")
    server_cfg = ServerConfig(
        hostname=server["hostname"], state_dir=server["state_dir"], workers=server.get("workers", 1)
    )

    pop3_cfg = Pop3Config(
        **r.section(
            data.get("pop3", {}),
            "pop3",
            {
                "listen": r.endpoints,
                "tls_listen": r.endpoints,
                "require_secure_auth": r.boolean,
                "idle_timeout": r.duration,
                "auth_failure_delay": r.duration,
                "auth_failure_delay_max": r.duration,
                "max_connections": r.positive,
                "max_connections_per_client": r.positive,
                "sasl_mechanisms": _sasl_mechanisms,
            },
        )
    )
    if pop3_cfg.idle_timeout < 600:
        raise r.fail("pop3", "idle_timeout", "must be at least 10 minutes (RFC 1939 section 3)")

    smtp_cfg = SmtpConfig(
        **r.section(
            data.get("smtp", {}),
            "smtp",
            {
                "listen": r.endpoints,
                "submission_listen": r.endpoints,
                "tls_listen": r.endpoints,
                "max_message_size": r.size,
                "max_recipients": r.positive,
                "max_hop_count": r.positive,
                "require_tls_for_auth": r.boolean,
                "max_messages_per_connection": r.positive,
                "max_connections": r.positive,
                "max_connections_per_client": r.positive,
                "idle_timeout": r.duration,
                "auth_failure_delay": r.duration,
                "auth_failure_delay_max": r.duration,
                "client_allow": r.networks,
                "client_deny": r.networks,
                "sender_must_match_login": r.boolean,
                "bare_newline": r.choice("normalize", "reject"),
            },
        )
    )
    if smtp_cfg.max_recipients < 100:
        # RFC 5321 section 4.5.3.1.8: a server must accept at least 100 recipients.
        raise r.fail("smtp", "max_recipients", "must be at least 100 (RFC 5321 section 4.5.3.1.8)")
    if smtp_cfg.idle_timeout < 300:
        raise r.fail("smtp", "idle_timeout", "must be at least 5 minutes (RFC 5321 section 4.5.3.2.7)")

    tls = r.section(
        data.get("tls", {}),
        "tls",
        {"certificate": r.path_or_none, "private_key": r.path_or_none, "self_signed": r.boolean},
    )
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
            raise r.fail("tls", key, f"file not found: {p}")

    auth_data = data.get("auth", {})
    auth = r.section(
        auth_data,
        "auth",
        {"method": r.choice("passwordfile", "directory", "local"), "apop": r.boolean},
        subsections=("directory", "local"),
    )
    method = auth.get("method", "passwordfile")
    apop = auth.get("apop", method == "passwordfile")
    if apop and method != "passwordfile":
        raise r.fail(
            "auth", "apop",
            f"APOP needs the shared secret, which method {method!r} does not keep; set apop = false",
        )
    dir_data = auth_data.get("directory", {}) if isinstance(auth_data, Mapping) else {}
    attr_data = dir_data.get("attributes", {}) if isinstance(dir_data, Mapping) else {}
    attrs = r.section(
        attr_data,
        "auth.directory.attributes",
        {k: r.string for k in DirectoryAttributes.__dataclass_fields__},
    )
    directory = r.section(
        dir_data,
        "auth.directory",
        {
            "url": r.string,
            "starttls": r.boolean,
            "ca_file": r.path_or_none,
            "base_dn": r.string,
            "bind_dn": r.string,
            "bind_password_file": r.path_or_none,
            "user_filter": r.string,
            "required_group": r.string,
            "timeout": r.duration,
        },
        subsections=("attributes",),
    )
    dir_cfg = DirectoryConfig(**directory, attributes=DirectoryAttributes(**attrs))
    if not re.match(r"^ldaps?://[^/]+/?$", dir_cfg.url):
        raise r.fail("auth.directory", "url", f"{dir_cfg.url!r} is not an ldap:// or ldaps:// URL")
    if dir_cfg.starttls and dir_cfg.url.startswith("ldaps:"):
        raise r.fail("auth.directory", "starttls", "StartTLS and ldaps:// do not go together")
    local_cfg = LocalConfig(
        **r.section(
            auth_data.get("local", {}) if isinstance(auth_data, Mapping) else {},
            "auth.local",
            {"pam_service": r.string},
        )
    )
    auth_cfg = AuthConfig(method=method, apop=apop, directory=dir_cfg, local=local_cfg)
    if method == "directory":
        for key in ("base_dn", "bind_dn"):
            if not getattr(dir_cfg, key):
                raise r.fail("auth.directory", key, "is required with auth.method = \"directory\"")
        if dir_cfg.bind_password_file is None:
            raise r.fail("auth.directory", "bind_password_file", "is required with auth.method = \"directory\"")
        if not dir_cfg.bind_password_file.is_file():
            raise r.fail("auth.directory", "bind_password_file", f"file not found: {dir_cfg.bind_password_file}")
        for key in ("ca_file",):
            p = getattr(dir_cfg, key)
            if p is not None and not p.is_file():
                raise r.fail("auth.directory", key, f"file not found: {p}")

    dom_data = data.get("domains", {})
    doms = r.section(dom_data, "domains", {"local": r.domain_list, "quota_grace": parse_quota_grace},
                     subsections=("remote",))
    remote_list = dom_data.get("remote", []) if isinstance(dom_data, Mapping) else []
    if not isinstance(remote_list, list):
        raise r.fail("domains", "remote", "must be an array of tables ([[domains.remote]])")
    remotes: list[RemoteDomain] = []
    for item in remote_list:
        rd = r.section(
            item, "domains.remote", {"name": _hostname_or_wild, "relay": r.boolean, "route": _next_hop}
        )
        if "name" not in rd:
            raise r.fail("domains.remote", "name", "is required")
        if _is_wildcard(rd["name"]):
            raise r.fail("domains.remote", "name", f"{rd['name']!r} would make an open relay")
        if rd.get("route") == "":
            rd["route"] = None
        remotes.append(RemoteDomain(**rd))
    local_domains = doms.get("local", ())
    names = [d.name for d in remotes]
    for d in names:
        if d in local_domains:
            raise r.fail("domains.remote", "name", f"{d!r} is also a local domain")
        if names.count(d) > 1:
            raise r.fail("domains.remote", "name", f"{d!r} is listed twice")
    domains_cfg = DomainsConfig(local=local_domains, remote=tuple(remotes),
                                quota_grace=doms.get("quota_grace", QuotaGrace(percent=10.0)))
    if method == "local" and len(local_domains) > 1:
        raise r.fail(
            "domains", "local",
            "auth.method = \"local\" allows one mail domain only (one address per account)",
        )

    relay_cfg = RelayConfig(
        **r.section(
            data.get("relay", {}),
            "relay",
            {"networks": r.networks, "authenticated": r.boolean},
        )
    )
    for net in relay_cfg.networks:
        if net.prefixlen == 0:
            raise r.fail("relay", "networks", f"{net} lets every address relay: an open relay")

    sh = r.section(
        data.get("smarthost", {}),
        "smarthost",
        {
            "host": _next_hop,
            "tls": r.choice("none", "opportunistic", "required"),
            "ca_file": r.path_or_none,
            "username": r.string,
            "password_file": r.path_or_none,
            "connect_timeout": r.duration,
            "command_timeout": r.duration,
            "max_connections": r.positive,
            "max_connections_per_host": r.positive,
        },
    )
    sh_cfg = SmarthostConfig(**sh)
    if sh_cfg.username and sh_cfg.password_file is None:
        raise r.fail("smarthost", "password_file", "is required when smarthost.username is set")
    if sh_cfg.password_file is not None and not sh_cfg.password_file.is_file():
        raise r.fail("smarthost", "password_file", f"file not found: {sh_cfg.password_file}")
    if sh_cfg.ca_file is not None and not sh_cfg.ca_file.is_file():
        raise r.fail("smarthost", "ca_file", f"file not found: {sh_cfg.ca_file}")

    queue_cfg = QueueConfig(
        **r.section(
            data.get("queue", {}),
            "queue",
            {
                "retry_intervals": r.durations,
                "delay_notification": r.duration,
                "expiration": r.duration,
            },
        )
    )

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

    return Config(
        gateway=gateway_cfg,
        masquerade=masq_cfg,
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
    )


def _hostname_or_wild(value: Any) -> str:
    value = _Reader.string(value)
    if _is_wildcard(value):
        return value
    return _hostname(value)


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


def _ldap_filter(value: Any) -> str:
    value = _Reader.string(value)
    from pop3coexist.identity import ldapfilter

    try:
        ldapfilter.parse_filter(value)
    except ldapfilter.FilterError as e:
        raise ValueError(f"{value!r} is not an LDAP filter: {e}")
    return value


def _address_template(value: Any) -> str:
    """``%m@domain``, ``%g.%s@domain`` or ``@domain`` (short for ``%m@domain``)."""
    value = _Reader.string(value)
    local, at, domain = value.rpartition("@")
    if not at:
        raise ValueError(f"{value!r} is not an address template (\"%m@domain\" or \"@domain\")")
    if _is_wildcard(domain):
        raise ValueError(f"{value!r}: the domain of an address template cannot be a wildcard")
    _hostname(domain)
    if re.search(r"%(?!%|\d*[mgs])", local):
        raise ValueError(f"{value!r}: only %m, %g, %s (optionally %Ng, %Ns) and %% are known")
    return value


def _parse_gateway(r: _Reader, data: Mapping[str, Any], auth: AuthConfig,
                   domains: DomainsConfig) -> GatewayConfig:
    if "gateway" not in data:
        return GatewayConfig()
    gw_data = data["gateway"]
    gw = r.section(
        gw_data,
        "gateway",
        {
            "enabled": r.boolean,
            "authoritative_domains": r.domain_list,
            "non_authoritative_domains": r.domain_list,
            "update_bind_dn": r.string,
            "update_bind_password_file": r.path_or_none,
            "max_target_depth": r.positive,
        },
        subsections=("connectors", "recipient_policies"),
    )
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
        c = r.section(
            item,
            "gateway.connectors",
            {
                "name": r.string,
                "address_spaces": lambda v: v,
                "cost": r.positive,
                "next_hops": r.strings,
                "allow_relay": r.boolean,
                "peer_hostname": _hostname,
            },
        )
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
        p = r.section(
            item,
            "gateway.recipient_policies",
            {
                "name": r.string,
                "filter": _ldap_filter,
                "priority": r.positive,
                "primary": _address_template,
                "secondary": lambda v: tuple(_address_template(x) for x in _Reader.strings(v)),
                "replace_primary": r.boolean,
            },
        )
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
                     f"file not found: {gw['update_bind_password_file']}")
    return GatewayConfig(enabled=enabled, connectors=tuple(connectors),
                         recipient_policies=tuple(policies), **gw)


def _parse_masquerade(r: _Reader, data: Mapping[str, Any], domains: DomainsConfig,
                      gateway: GatewayConfig) -> MasqueradeConfig:
    m = r.section(
        data.get("masquerade", {}),
        "masquerade",
        {"domain": _hostname, "from_domains": r.domain_list, "header_from": r.boolean},
    )
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
