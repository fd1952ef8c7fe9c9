"""Dial only the checked address: an aiohttp resolver pinned to one answer.

aiohttp resolves a URL's host through its connector's resolver. Here that
resolver is :class:`PinnedResolver`: it knows the one host the request is
for and the address :class:`~egress.resolver.AddressGuard` checked, answers
that address and nothing else, and refuses any other host. No second DNS
query is made, so a name that changes its answer between check and connect
(DNS rebinding) still reaches the checked address. The URL keeps the host
name, so the ``Host`` header and TLS SNI/certificate checks are the
destination's name, not the address.

:func:`pinned_session` builds a one-request session around it (no
connection pooling across requests: every request is checked and dialled
afresh, and no cookie is kept).
"""

from __future__ import annotations

import socket
import ssl

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from egress.resolver import CheckedAddress

__all__ = ["PinnedResolver", "pinned_session"]


class PinnedResolver(AbstractResolver):
    """Answers the checked address for the checked host, and refuses everything else."""

    def __init__(self, checked: CheckedAddress) -> None:
        self._checked = checked
        self.calls = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls += 1
        checked = self._checked
        if host.lower().rstrip(".") != checked.host.lower().rstrip("."):
            # SECURITY: only the host that was checked may be dialled.
            raise OSError(f"host {host!r} was not checked")
        return [
            ResolveResult(
                hostname=host,
                host=str(checked.address),
                port=port or checked.port,
                family=checked.family,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


def pinned_session(
    checked: CheckedAddress, *, ssl_context: ssl.SSLContext | None = None
) -> aiohttp.ClientSession:
    """A session whose only reachable address is ``checked``; close it after the request."""
    connector = aiohttp.TCPConnector(
        resolver=PinnedResolver(checked),
        use_dns_cache=False,
        force_close=True,
        ssl=ssl_context if ssl_context is not None else True,
    )
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
    )
