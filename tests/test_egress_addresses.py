"""The SSRF guard's address table: every spelling of an address gets its deny reasons."""

from __future__ import annotations

import ipaddress

import pytest

from egress.addresses import Reason, classify, parse_address

# (spelling, expected reasons); () means a public address the guard lets through.
ADDRESSES = [
    ("127.0.0.1", ("loopback",)),
    ("127.255.255.254", ("loopback",)),
    ("2130706433", ("loopback",)),  # decimal
    ("0177.0.0.1", ("loopback",)),  # octal
    ("0x7f.0.0.1", ("loopback",)),  # hex
    ("0x7f000001", ("loopback",)),  # one hex number
    ("127.1", ("loopback",)),  # short form
    ("017700000001", ("loopback",)),  # one octal number
    ("0.0.0.0", ("unspecified",)),
    ("0", ("unspecified",)),
    ("10.0.0.1", ("private_address",)),
    ("012.0.0.1", ("private_address",)),  # octal 10.0.0.1
    ("172.16.0.1", ("private_address",)),
    ("172.31.255.255", ("private_address",)),
    ("192.168.1.1", ("private_address",)),
    ("0xc0.0xa8.1.1", ("private_address",)),
    ("169.254.169.254", ("metadata_address", "link_local")),
    ("2852039166", ("metadata_address", "link_local")),  # decimal 169.254.169.254
    ("0xa9.0xfe.0xa9.0xfe", ("metadata_address", "link_local")),
    ("169.254.1.1", ("link_local",)),
    ("100.64.0.1", ("cgnat",)),
    ("100.127.255.254", ("cgnat",)),
    ("224.0.0.1", ("multicast",)),
    ("239.255.255.250", ("multicast",)),
    ("240.0.0.1", ("reserved_address",)),
    ("255.255.255.255", ("reserved_address",)),
    ("198.18.0.1", ("reserved_address",)),
    ("::", ("unspecified",)),
    ("::1", ("loopback",)),
    ("[::1]", ("loopback",)),
    ("0:0:0:0:0:0:0:1", ("loopback",)),
    ("fe80::1", ("link_local",)),
    ("fe80::1%eth0", ("link_local",)),
    ("fc00::1", ("unique_local",)),
    ("fd12:3456::1", ("unique_local",)),
    ("fd00:ec2::254", ("metadata_address", "unique_local")),
    ("fec0::1", ("private_address",)),
    ("ff02::1", ("multicast",)),
    ("::ffff:127.0.0.1", ("ipv4_mapped", "loopback")),
    ("::ffff:7f00:1", ("ipv4_mapped", "loopback")),
    ("::ffff:10.0.0.1", ("ipv4_mapped", "private_address")),
    ("::ffff:169.254.169.254", ("ipv4_mapped", "metadata_address", "link_local")),
    ("::ffff:8.8.8.8", ("ipv4_mapped",)),
    ("::127.0.0.1", ("ipv4_compatible", "loopback")),
    ("64:ff9b::127.0.0.1", ("nat64", "loopback")),
    ("64:ff9b::a9fe:a9fe", ("nat64", "metadata_address", "link_local")),
    ("64:ff9b::8.8.8.8", ("nat64",)),
    ("64:ff9b:1:7f00:0:100::", ("nat64", "loopback")),  # RFC 8215 local-use /48
    ("2002:7f00:1::", ("6to4", "loopback")),
    ("2002:c0a8:101::1", ("6to4", "private_address")),
    ("2002:808:808::1", ("6to4",)),
    # Teredo: the client address is the last 32 bits inverted (here 127.0.0.1).
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", ("teredo", "loopback")),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", ("teredo", "private_address")),
    ("8.8.8.8", ()),
    ("1.1.1.1", ()),
    ("203.0.113.7", ()),  # documentation: routes nowhere; used as "public" in tests
    ("2606:4700:4700::1111", ()),
    ("2001:db8::1", ()),
]


class TestClassify:
    @pytest.mark.parametrize(("spelling", "reasons"), ADDRESSES, ids=[a for a, _ in ADDRESSES])
    def test_table(self, spelling: str, reasons: tuple[str, ...]) -> None:
        """Each spelling parses as the address it means and gets exactly these reasons."""
        address = parse_address(spelling)
        assert address is not None
        assert tuple(classify(address)) == reasons

    def test_self_address(self) -> None:
        """The gateway's own addresses are denied even when public."""
        own = frozenset({ipaddress.ip_address("198.51.100.10")})
        assert classify(ipaddress.ip_address("198.51.100.10"), own=own) == (Reason.SELF,)
        assert classify(ipaddress.ip_address("::ffff:198.51.100.10"), own=own) == (
            Reason.IPV4_MAPPED,
            Reason.SELF,
        )

    def test_reasons_are_snake_case_strings(self) -> None:
        """Reasons are the stable codes that reach problem bodies and metrics."""
        assert all(str(r) == r.value for r in Reason)


class TestParseAddress:
    @pytest.mark.parametrize(
        "text", ["example.com", "localhost", "", "127.0.0.1 x", "1.2.3.4.5", "::ffff:zz"]
    )
    def test_host_names_are_not_addresses(self, text: str) -> None:
        """Names and junk are not read as addresses (they go to the resolver)."""
        assert parse_address(text) is None
