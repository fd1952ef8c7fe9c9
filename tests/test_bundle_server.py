"""The bundle service (python -m gateway.policy.bundle_server): the file, an ETag, /health."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from gateway.policy.bundle_server import BUNDLE_RESOURCE, create_app


class TestBundleService:
    async def test_health_follows_the_file(self, tmp_path: Path) -> None:
        """/health is 503 until the bundle file exists, then 200; the bundle is served
        with an ETag and a matching If-None-Match gets 304."""
        bundle = tmp_path / "bundle.tar.gz"
        async with TestClient(TestServer(create_app(bundle))) as client:
            before = await client.get("/health")
            missing = await client.get("/" + BUNDLE_RESOURCE)
            assert (before.status, missing.status) == (503, 404)
            assert (await before.json()) == {"status": "no bundle"}
            bundle.write_bytes(b"signed bundle bytes")
            after = await client.get("/health")
            served = await client.get("/" + BUNDLE_RESOURCE)
            assert (after.status, served.status) == (200, 200)
            assert await served.read() == b"signed bundle bytes"
            again = await client.get(
                "/" + BUNDLE_RESOURCE, headers={"If-None-Match": served.headers["ETag"]}
            )
            assert again.status == 304
