"""A real authoritative DNS server for the integration tests: twisted.names serving zone files
(``twisted.names.authority.PySourceAuthority``: one Python zone file per zone, the record
constructors ``SOA``, ``A``, ``MX``, ``TXT``, ``NS``, ``CNAME`` ... of twisted.names) on UDP and
TCP on one OS-picked loopback port, in a subprocess.

``DnsServer(tmp_path, zones).start()``: ``zones`` maps a zone name to its records as
``(owner, type, data...)`` tuples; ``.port`` is the port the server bound, ``.config()`` the
``[dns]`` section that points pop3coexist at it. Long TXT strings are cut into strings of 255
octets (RFC 1035 section 3.3.14), as a zone file would write them.

Run ``python -m tests.support.dnsserver ZONEFILE...`` to serve files by hand; it prints
``port N`` once both sockets listen.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _txt_strings(value: str) -> list[bytes]:
    raw = value.encode()
    return [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]


def zone_source(zone: str, records: list[tuple[Any, ...]]) -> str:
    """The Python zone file of ``zone`` with an SOA and ``records``."""
    lines = [
        "zone = [",
        f"    SOA({zone!r}, mname='ns.{zone}', rname='hostmaster.{zone}', serial=1,"
        " refresh=60, retry=60, expire=60, minimum=60, ttl=60),",
        f"    NS({zone!r}, 'ns.{zone}'),",
    ]
    for owner, rtype, *data in records:
        if rtype == "TXT":
            args = ", ".join(repr(s) for s in _txt_strings(str(data[0])))
            lines.append(f"    TXT({owner!r}, {args}, ttl=60),")
        elif rtype == "MX":
            lines.append(f"    MX({owner!r}, {int(data[0])}, {str(data[1])!r}, ttl=60),")
        else:
            args = ", ".join(repr(d) for d in data)
            lines.append(f"    {rtype}({owner!r}, {args}, ttl=60),")
    lines.append("]")
    return "\n".join(lines) + "\n"


class DnsServer:
    """The subprocess serving ``zones`` (see the module docstring)."""

    def __init__(self, directory: Path, zones: dict[str, list[tuple[Any, ...]]]) -> None:
        self.directory = directory
        self.zones = zones
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> DnsServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        files = []
        for zone, records in self.zones.items():
            path = self.directory / f"{zone}.zone.py"
            path.write_text(zone_source(zone, records))
            files.append(str(path))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.dnsserver", *files],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                     env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()  # the server prints it once listening
        if not line.startswith("port "):
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            self.stop()
            raise RuntimeError(f"the DNS server did not start: {line}{err}")
        self.port = int(line.split()[1])
        return self

    def config(self, timeout: str = "2s") -> str:
        """The ``[dns]`` section for pop3coexist."""
        return f'[dns]\nservers = ["127.0.0.1"]\nport = {self.port}\ntimeout = "{timeout}"\n'

    def resolver(self) -> Any:
        """A dnspython resolver asking this server (for the tests' own checks)."""
        import dns.resolver

        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        r.lifetime = 5
        return r

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def listen_both(reactor: object, factory: object, make_protocol: object,
                attempts: int = 20) -> int:
    """Listen for DNS on one loopback port for UDP and TCP: UDP on port 0 (the OS picks), then
    TCP on the same number; when TCP finds it taken, stop that UDP port and try again. Returns
    the port number; raises SystemExit after ``attempts`` tries.

    ``make_protocol()`` gives a new datagram protocol for each attempt: a stopped UDP port lets
    go of its protocol only at the next reactor turn, and a protocol takes one transport
    (Twisted asserts it; seen in a CI run when the TCP port was taken).
    """
    from twisted.internet.error import CannotListenError

    for _attempt in range(attempts):
        udp = reactor.listenUDP(0, make_protocol(), interface="127.0.0.1")  # type: ignore[attr-defined]
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        except CannotListenError:
            udp.stopListening()
            continue
        return port
    sys.exit("no port free for both UDP and TCP")


def _serve(files: list[str]) -> None:
    from twisted.internet import reactor
    from twisted.names import authority, dns, server

    authorities = [authority.PySourceAuthority(f) for f in files]
    factory = server.DNSServerFactory(authorities=authorities)
    port = listen_both(reactor, factory, lambda: dns.DNSDatagramProtocol(factory))
    sys.stdout.write(f"port {port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tests.support.dnsserver ZONEFILE...")
    _serve(sys.argv[1:])
