"""Connection control for the SMTP listeners: client allow and deny lists (no sockets).

The IIS SMTP virtual server's "only the list below" is ``smtp.client_allow`` (when not empty,
only those networks may connect) and its "all except the list below" is ``smtp.client_deny``.
Both may be set: a client must be in the allow list (if any) and not in the deny list.
The protocol asks ``ConnectionPolicy.check(ip)`` once per connection and turns a refusal into
its greeting. ``ip_in_networks`` is shared with the relay policy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from pop3coexist.errors import PermanentFailure

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in ``text`` (an IPv4-mapped IPv6 address becomes IPv4), or None."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def ip_in_networks(text: str, networks: Iterable[Network]) -> bool:
    """True when the client address ``text`` lies in one of ``networks``.

    Anything that is not an IP address (a UNIX socket peer) is in no network.
    """
    ip = parse_ip(text)
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


class ConnectionPolicy:
    """Decides whether a client address may talk to an SMTP listener at all."""

    def __init__(self, allow: Iterable[Network] = (), deny: Iterable[Network] = ()) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)

    def check(self, client_ip: str) -> PermanentFailure | None:
        """None when ``client_ip`` may connect, else the failure to greet it with (554 5.7.1)."""
        if self.allow and not ip_in_networks(client_ip, self.allow):
            return PermanentFailure("Access denied: your address is not allowed here", "5.7.1", 554)
        if self.deny and ip_in_networks(client_ip, self.deny):
            return PermanentFailure("Access denied: your address is refused here", "5.7.1", 554)
        return None
