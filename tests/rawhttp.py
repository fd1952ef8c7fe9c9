"""Send bytes a normal client would refuse to send (dot segments, broken framing)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient


async def raw_request(
    client: TestClient[Any, Any], data: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Write ``data`` to the gateway and parse the status, headers and body it answers."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        return status, headers, body
    finally:
        writer.close()
