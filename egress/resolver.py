"""Resolve a destination's host and check every address before anything is dialled.

:class:`AddressGuard` asks a :class:`Resolver` (the system's ``getaddrinfo``
by default; tests plug in their own) for the host's addresses, classifies
**every** one (:mod:`egress.addresses`), and refuses the host if any address
is denied: a name that answers with one public and one private address is a
rebinding attempt, not a choice. The result is the one address to dial;
:mod:`egress.connector` then connects to exactly that address, so a second
resolution that could answer differently never happens.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from egress.addresses import IPAddress, Reason, classify, parse_address

__all__ = [
    "AddressDenied",
    "AddressGuard",
    "CheckedAddress",
    "Resolver",
    "SystemResolver",
]

#: The reason when a host has no usable address.
DNS_FAILURE = "dns_failure"


class AddressDenied(Exception):
    """The host may not be dialled; ``reasons`` are stable snake_case codes."""

    def __init__(self, host: str, reasons: Iterable[str]) -> None:
        self.host = host
        self.reasons = tuple(dict.fromkeys(reasons))
        super().__init__(f"{host}: {', '.join(self.reasons)}")


class Resolver(Protocol):
    """Turns a host name into address strings (any order, duplicates allowed)."""

    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """``getaddrinfo`` on the event loop's executor."""

    async def resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(info[4][0]) for info in infos]


@dataclass(frozen=True, slots=True)
class CheckedAddress:
    """A host, and the checked address to dial for it."""

    host: str
    port: int
    address: IPAddress

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET if self.address.version == 4 else socket.AF_INET6


class AddressGuard:
    """Resolves and checks hosts; ``own`` are the gateway's own addresses."""

    def __init__(
        self, resolver: Resolver | None = None, *, own: frozenset[IPAddress] = frozenset()
    ) -> None:
        self._resolver = resolver or SystemResolver()
        self._own = own

    async def check(self, host: str, port: int, *, internal: bool = False) -> CheckedAddress:
        """The address to dial for ``host``; raise :class:`AddressDenied` if any is denied.

        ``internal``: the destination is explicitly allowed to resolve to private
        addresses (but never to the gateway itself, nor to metadata services).
        """
        literal = parse_address(host)
        if literal is not None:
            answers: list[IPAddress] = [literal]
        else:
            answers = await self._resolve(host, port)
        reasons: list[str] = []
        for address in answers:
            found = classify(address, own=self._own)
            if internal:
                # SECURITY: internal destinations still never reach the gateway or metadata.
                found = tuple(r for r in found if r in (Reason.SELF, Reason.METADATA))
            reasons.extend(found)
        if reasons:
            raise AddressDenied(host, reasons)
        return CheckedAddress(host, port, answers[0])

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            raw = await self._resolver.resolve(host, port)
        except OSError:
            raise AddressDenied(host, [DNS_FAILURE]) from None
        answers: list[IPAddress] = []
        for text in raw:
            address = parse_address(text)
            if address is None:
                raise AddressDenied(host, [DNS_FAILURE])
            answers.append(address)
        if not answers:
            raise AddressDenied(host, [DNS_FAILURE])
        return answers
