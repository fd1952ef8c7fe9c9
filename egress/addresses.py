"""Classify an IP address for the SSRF guard: which deny reasons apply to it.

:func:`classify` returns the typed reasons an address may not be dialled
(empty: a public address). IPv6 forms that carry an IPv4 address
(IPv4-mapped ``::ffff:0:0/96``, IPv4-compatible ``::/96``, NAT64
``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4 ``2002::/16``, Teredo
``2001::/32``) are always denied with the form's own reason, and the
embedded IPv4 address is unwrapped and classified too, so that
``::ffff:127.0.0.1`` reads ``("ipv4_mapped", "loopback")``.

:func:`parse_address` takes anything the C library would take as an
address: besides the canonical forms, the IPv4 spellings that
``inet_aton`` accepts (``2130706433``, ``0177.0.0.1``, ``0x7f.0.0.1``,
``127.1``). Whatever parses as an address *is* that address; the guard
never lets a spelling through that a resolver or a socket call would read
as a private address.

Documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32) are not denied: they route nowhere, and tests use them as
"public" answers that are checked but never dialled.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from typing import Final

__all__ = ["IPAddress", "Reason", "classify", "parse_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Reason(enum.StrEnum):
    """Why an address may not be dialled; the values are the 403 ``reasons``."""

    UNSPECIFIED = "unspecified"
    LOOPBACK = "loopback"
    LINK_LOCAL = "link_local"
    METADATA = "metadata_address"
    PRIVATE = "private_address"
    CGNAT = "cgnat"
    MULTICAST = "multicast"
    RESERVED = "reserved_address"
    UNIQUE_LOCAL = "unique_local"
    IPV4_MAPPED = "ipv4_mapped"
    IPV4_COMPATIBLE = "ipv4_compatible"
    NAT64 = "nat64"
    SIX_TO_FOUR = "6to4"
    TEREDO = "teredo"
    SELF = "self_address"


def _v4(*cidrs: str) -> tuple[ipaddress.IPv4Network, ...]:
    return tuple(ipaddress.IPv4Network(c) for c in cidrs)


def _v6(*cidrs: str) -> tuple[ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.IPv6Network(c) for c in cidrs)


# SECURITY: cloud instance metadata services (AWS, GCP, Azure, OpenStack; AWS IPv6).
_METADATA: Final = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_V4_RULES: Final[tuple[tuple[tuple[ipaddress.IPv4Network, ...], Reason], ...]] = (
    (_v4("0.0.0.0/8"), Reason.UNSPECIFIED),  # "this host": reaches loopback on Linux
    (_v4("127.0.0.0/8"), Reason.LOOPBACK),
    (_v4("169.254.0.0/16"), Reason.LINK_LOCAL),
    (_v4("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"), Reason.PRIVATE),
    (_v4("100.64.0.0/10"), Reason.CGNAT),
    (_v4("224.0.0.0/4"), Reason.MULTICAST),
    # IETF protocol assignments, benchmarking, 240/4 and the broadcast address.
    (_v4("192.0.0.0/24", "198.18.0.0/15", "240.0.0.0/4"), Reason.RESERVED),
)
_V6_RULES: Final[tuple[tuple[tuple[ipaddress.IPv6Network, ...], Reason], ...]] = (
    (_v6("::/128"), Reason.UNSPECIFIED),
    (_v6("::1/128"), Reason.LOOPBACK),
    (_v6("fe80::/10"), Reason.LINK_LOCAL),
    (_v6("fec0::/10"), Reason.PRIVATE),  # deprecated site-local
    (_v6("fc00::/7"), Reason.UNIQUE_LOCAL),
    (_v6("ff00::/8"), Reason.MULTICAST),
    (_v6("100::/64", "2001:2::/48", "2001:10::/28", "2001:20::/28"), Reason.RESERVED),
)
_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL: Final = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIX_TO_FOUR: Final = ipaddress.IPv6Network("2002::/16")
_TEREDO: Final = ipaddress.IPv6Network("2001::/32")


def parse_address(text: str) -> IPAddress | None:
    """``text`` as an IP address (brackets allowed), or None if it is a host name."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if any(ch.isspace() for ch in text) or ":" in text:
        return None
    try:
        # SECURITY: inet_aton reads 127.1, 0177.0.0.1, 0x7f.1 and 2130706433 as 127.0.0.1.
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def classify(address: IPAddress, *, own: frozenset[IPAddress] = frozenset()) -> tuple[Reason, ...]:
    """The reasons ``address`` may not be dialled, most specific first; () if none.

    ``own``: the gateway's own addresses (denied as ``self_address``).
    """
    reasons: list[Reason] = []
    if address in own:
        reasons.append(Reason.SELF)
    if address in _METADATA:
        reasons.append(Reason.METADATA)
    if isinstance(address, ipaddress.IPv4Address):
        reasons.extend(_first_rule(address, _V4_RULES))
        return tuple(dict.fromkeys(reasons))
    if address.scope_id:
        address = ipaddress.IPv6Address(address.compressed.partition("%")[0])
    embedded = _embedded(address)
    if embedded is not None:
        form, inner = embedded
        reasons.append(form)
        reasons.extend(classify(inner, own=own))
    else:
        reasons.extend(_first_rule(address, _V6_RULES))
    return tuple(dict.fromkeys(reasons))


def _first_rule(
    address: IPAddress,
    rules: tuple[
        tuple[tuple[ipaddress.IPv4Network, ...] | tuple[ipaddress.IPv6Network, ...], Reason], ...
    ],
) -> tuple[Reason, ...]:
    for networks, reason in rules:
        if any(address in network for network in networks):
            return (reason,)
    return ()


def _embedded(address: ipaddress.IPv6Address) -> tuple[Reason, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 form carries, and the form's reason."""
    packed = address.packed
    if address in _MAPPED:
        return Reason.IPV4_MAPPED, ipaddress.IPv4Address(packed[12:])
    if address in _COMPATIBLE and int(address) > 1:
        return Reason.IPV4_COMPATIBLE, ipaddress.IPv4Address(packed[12:])
    if address in _NAT64:
        return Reason.NAT64, ipaddress.IPv4Address(packed[12:])
    if address in _NAT64_LOCAL:
        # RFC 6052 §2.2, /48 prefix: the IPv4 address straddles the reserved octet 8.
        return Reason.NAT64, ipaddress.IPv4Address(packed[6:8] + packed[9:11])
    if address in _SIX_TO_FOUR:
        return Reason.SIX_TO_FOUR, ipaddress.IPv4Address(packed[2:6])
    if address in _TEREDO:
        # RFC 4380 §4: the client's IPv4 address is the last 32 bits, inverted.
        client = int.from_bytes(packed[12:], "big") ^ 0xFFFFFFFF
        return Reason.TEREDO, ipaddress.IPv4Address(client)
    return None
