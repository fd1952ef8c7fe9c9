"""The resolve-and-check guard, and the pinned connector that dials only the checked address."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from egress.addresses import parse_address
from egress.connector import PinnedResolver, pinned_session
from egress.resolver import AddressDenied, AddressGuard, CheckedAddress


class ScriptedResolver:
    """Answers each call with the next scripted answer (the last one repeats)."""

    def __init__(self, *answers: list[str] | OSError) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        if isinstance(answer, OSError):
            raise answer
        return answer


class TestAddressGuard:
    @pytest.mark.parametrize(
        ("answers", "reasons"),
        [
            (["127.0.0.1"], ("loopback",)),
            (["203.0.113.7", "10.0.0.5"], ("private_address",)),
            (["203.0.113.7", "::1"], ("loopback",)),
            (["169.254.169.254"], ("metadata_address", "link_local")),
            (["100.100.100.200"], ("cgnat",)),
            (["::ffff:192.168.0.1"], ("ipv4_mapped", "private_address")),
            (["64:ff9b::a00:1"], ("nat64", "private_address")),
            ([], ("dns_failure",)),
            (["not-an-address"], ("dns_failure",)),
        ],
        ids=[
            "loopback",
            "one-private",
            "one-v6-loopback",
            "metadata",
            "cgnat",
            "mapped",
            "nat64",
            "no-answer",
            "junk-answer",
        ],
    )
    async def test_any_denied_address_denies_the_host(
        self, answers: list[str], reasons: tuple[str, ...]
    ) -> None:
        """Every resolved address is checked; one denied address refuses the host."""
        guard = AddressGuard(ScriptedResolver(answers))
        with pytest.raises(AddressDenied) as caught:
            await guard.check("api.example", 443)
        assert caught.value.reasons == reasons

    async def test_resolver_failure_is_dns_failure(self) -> None:
        """A resolver error denies with dns_failure."""
        guard = AddressGuard(ScriptedResolver(OSError("NXDOMAIN")))
        with pytest.raises(AddressDenied) as caught:
            await guard.check("nowhere.example", 443)
        assert caught.value.reasons == ("dns_failure",)

    async def test_public_answer_is_the_address_to_dial(self) -> None:
        """A host with only public addresses yields the first one, checked."""
        guard = AddressGuard(ScriptedResolver(["203.0.113.7", "198.51.100.1"]))
        checked = await guard.check("api.example", 443)
        assert checked == CheckedAddress("api.example", 443, ipaddress.ip_address("203.0.113.7"))

    @pytest.mark.parametrize("host", ["127.1", "0x7f.0.0.1", "2130706433", "[::1]"])
    async def test_literal_hosts_are_checked_without_resolving(self, host: str) -> None:
        """An address written as the host is classified as the address it means."""
        resolver = ScriptedResolver(["203.0.113.7"])
        with pytest.raises(AddressDenied) as caught:
            await AddressGuard(resolver).check(host, 80)
        assert caught.value.reasons == ("loopback",)
        assert resolver.calls == []

    async def test_internal_destination_may_be_private_but_not_self_or_metadata(self) -> None:
        """internal = true admits private answers, never the gateway's own or metadata."""
        own = frozenset({ipaddress.ip_address("10.0.0.9")})
        guard = AddressGuard(ScriptedResolver(["10.0.0.5"]), own=own)
        assert str((await guard.check("svc.internal", 80, internal=True)).address) == "10.0.0.5"
        for answer, reason in (
            (["10.0.0.9"], "self_address"),
            (["169.254.169.254"], "metadata_address"),
        ):
            guard = AddressGuard(ScriptedResolver(answer), own=own)
            with pytest.raises(AddressDenied) as caught:
                await guard.check("svc.internal", 80, internal=True)
            assert caught.value.reasons == (reason,)


@pytest.fixture
async def hosts_server() -> AsyncIterator[TestServer]:
    """A loopback server answering with the Host header it got."""

    async def host(request: web.Request) -> web.Response:
        return web.json_response({"host": request.host, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", host)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


class TestPinnedConnector:
    async def test_rebinding_resolver_is_asked_once(self, hosts_server: TestServer) -> None:
        """Check-time answer is dialled; the second (rebound) answer is never asked for."""
        port = hosts_server.port
        assert port is not None
        # Check time: 127.0.0.1 (the test server); any later answer would be 10.0.0.1.
        resolver = ScriptedResolver(["127.0.0.1"], ["10.0.0.1"])
        checked = await AddressGuard(resolver).check("rebind.test", port, internal=True)
        async with pinned_session(checked) as session:
            for _ in range(3):
                async with session.get(f"http://rebind.test:{port}/x") as response:
                    assert response.status == 200
                    body = await response.json()
        assert resolver.calls == ["rebind.test"]
        # The Host header keeps the destination's name, not the address.
        assert body == {"host": f"rebind.test:{port}", "path": "/x"}

    async def test_other_hosts_are_refused(self) -> None:
        """The pinned resolver answers only the host that was checked."""
        address = parse_address("127.0.0.1")
        assert address is not None
        resolver = PinnedResolver(CheckedAddress("api.example", 443, address))
        [result] = await resolver.resolve("API.example.", 443)
        assert result["host"] == "127.0.0.1"
        with pytest.raises(OSError, match="not checked"):
            await resolver.resolve("evil.example", 443)
