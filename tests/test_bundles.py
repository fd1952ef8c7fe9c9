"""Signed bundles: built by scripts/build-bundle, verified by OPA, revision in every decision."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import subprocess
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.policy.engine import PolicyEngineError
from gateway.policy.opa import OpaEngine
from gateway.policy.stack import POLICY_STACK
from gateway.policy.supervisor import LocalBundle, LocalOpa, LocalOpaError
from tests.bundles import (  # noqa: F401 - the *_fixture names are fixtures
    KeyPair,
    build_bundle,
    bundle_fixture,
    copy_policies,
    deny_echo_get,
    keys_fixture,
    manifest,
    other_keys_fixture,
    rewrite_bundle,
    wait_healthy,
)
from tests.conftest import ECHO_GET_INPUT, OPA_BINARY, ROOT, GatewayFactory, free_port

SIDECAR_CONFIG = ROOT / "deploy" / "opa" / "config.yaml"

ECHO_GET = ECHO_GET_INPUT


class TestBuildBundle:
    def test_revision_is_a_content_hash(self, tmp_path: Path, keys: KeyPair) -> None:
        """The same policy gives the same revision; a changed one a new revision."""
        policies = copy_policies(tmp_path)
        first = build_bundle(tmp_path / "a.tar.gz", keys, policy_dir=policies)
        again = build_bundle(tmp_path / "b.tar.gz", keys, policy_dir=policies)
        deny_echo_get(policies)
        changed = build_bundle(tmp_path / "c.tar.gz", keys, policy_dir=policies)
        assert first.startswith("sha256-")
        assert len(first) == len("sha256-") + 16
        assert first == again
        assert changed != first

    def test_explicit_revision(self, tmp_path: Path, keys: KeyPair) -> None:
        """--revision names the bundle (for a release tag)."""
        assert build_bundle(tmp_path / "b.tar.gz", keys, revision="v1.2.3") == "v1.2.3"

    def test_bundle_holds_policy_and_data_but_no_tests(self, bundle: Path) -> None:
        """Only policies, merged data, the manifest and the signature ship."""
        with tarfile.open(bundle) as archive:
            names = sorted(archive.getnames())
        assert names == [
            "/.manifest",
            "/.signatures.json",
            "/data.json",
            "/nops/authz/authz.rego",
            "/nops/egress/egress.rego",
        ]


def copy_file(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def tamper_echo_methods(name: str, data: bytes) -> bytes:
    """Change the bundle's data (echo accepts only POST) without re-signing."""
    if name != "/data.json":
        return data
    document = json.loads(data)
    document["nops"]["routes"]["echo"]["methods"] = ["POST"]
    return json.dumps(document).encode()


class TestSignedBundleOpa:
    """The supervised local OPA on a signed bundle (policy.bundle_file)."""

    @pytest.fixture
    async def served(
        self, tmp_path: Path, bundle: Path, keys: KeyPair
    ) -> AsyncIterator[tuple[LocalOpa, OpaEngine]]:
        live = copy_file(bundle, tmp_path / "live.tar.gz")
        opa = LocalOpa(OPA_BINARY, tmp_path, bundle=LocalBundle(live, keys.public))
        await opa.start()
        engine = OpaEngine(opa.url, decision_path="nops/authz/decision", timeout_s=2)
        yield opa, engine
        await engine.close()
        await opa.stop()

    async def test_decisions_carry_the_bundle_revision(
        self, served: tuple[LocalOpa, OpaEngine], bundle: Path
    ) -> None:
        """Each decision names the activated bundle and its revision; so does the probe."""
        _, engine = served
        decision = await engine.decide(ECHO_GET, "d-1")
        assert decision.allow is True
        assert decision.revision == f"nops={manifest(bundle)['revision']}"
        assert await engine.revision() == decision.revision

    async def test_replaced_bundle_takes_effect_without_restart(
        self, served: tuple[LocalOpa, OpaEngine], tmp_path: Path, keys: KeyPair
    ) -> None:
        """A new signed bundle written over the file changes the next decisions."""
        opa, engine = served
        assert opa.bundle is not None
        policies = copy_policies(tmp_path)
        deny_echo_get(policies)
        assert (await engine.decide(ECHO_GET, "d-1")).allow is True
        revision = build_bundle(opa.bundle.file, keys, policy_dir=policies)
        await wait_revision(engine, lambda r: r == f"nops={revision}")
        decision = await engine.decide(ECHO_GET, "d-2")
        assert (decision.allow, decision.reasons) == (False, ("method_not_allowed",))
        assert decision.revision == f"nops={revision}"

    @pytest.mark.parametrize("attack", ["tampered", "unsigned", "foreign-key"])
    async def test_bad_replacement_is_refused(
        self,
        served: tuple[LocalOpa, OpaEngine],
        bundle: Path,
        tmp_path: Path,
        other_keys: KeyPair,
        attack: str,
    ) -> None:
        """A replacement that does not verify is never activated; the last good one serves."""
        opa, engine = served
        assert opa.bundle is not None
        before = await engine.revision()
        bad = tmp_path / "bad.tar.gz"
        if attack == "tampered":
            rewrite_bundle(bundle, bad, tamper_echo_methods)
        elif attack == "unsigned":
            rewrite_bundle(
                bundle,
                bad,
                lambda name, data: (
                    None if name == "/.signatures.json" else tamper_echo_methods(name, data)
                ),
            )
        else:
            policies = copy_policies(tmp_path)
            deny_echo_get(policies)
            build_bundle(bad, other_keys, policy_dir=policies)
        bad.replace(opa.bundle.file)
        await asyncio.sleep(3.0)  # more than one poll (1-2 s)
        assert await engine.revision() == before
        assert (await engine.decide(ECHO_GET, "d-1")).allow is True


class TestSupervisedBundle:
    async def test_gateway_runs_on_a_signed_bundle(
        self,
        make_gateway: GatewayFactory,
        bundle: Path,
        keys: KeyPair,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """policy.bundle_file: the supervised OPA verifies it; decisions log its revision."""
        client = await make_gateway(
            policy={
                "url": "",
                "opa_binary": str(OPA_BINARY),
                "bundle_file": str(bundle),
                "verification_key_file": str(keys.public),
            }
        )
        with caplog.at_level(logging.INFO, logger="gateway.request"):
            response = await client.get("/echo/x")
        assert response.status == 200
        lines = [r for r in caplog.records if r.name == "gateway.request"]
        revision: str = lines[-1].__dict__["policy_revision"]
        assert revision == f"nops={manifest(bundle)['revision']}"
        stack = client.app[POLICY_STACK]
        assert stack.cache is not None
        assert stack.cache.revision == revision

    @pytest.mark.parametrize("attack", ["tampered", "foreign-key"])
    async def test_refuses_to_start_on_a_bad_bundle(
        self, bundle: Path, tmp_path: Path, other_keys: KeyPair, keys: KeyPair, attack: str
    ) -> None:
        """A bundle that does not verify keeps the local OPA from starting at all."""
        bad = tmp_path / "bad.tar.gz"
        if attack == "tampered":
            rewrite_bundle(bundle, bad, tamper_echo_methods)
        else:
            build_bundle(bad, other_keys)
        opa = LocalOpa(
            OPA_BINARY, tmp_path, bundle=LocalBundle(bad, keys.public), start_timeout_s=3
        )
        with pytest.raises(LocalOpaError, match="verified bundle"):
            await opa.start()
        await opa.stop()


class TestSidecarConfig:
    """deploy/opa/config.yaml, as shipped, against a local bundle server."""

    @pytest.fixture
    async def bundle_server(self, tmp_path: Path) -> AsyncIterator[tuple[TestServer, Path]]:
        served = tmp_path / "served.tar.gz"

        async def handler(request: web.Request) -> web.StreamResponse:
            if not served.exists():
                raise web.HTTPNotFound()
            return web.Response(body=served.read_bytes(), content_type="application/gzip")

        app = web.Application()
        app.router.add_get("/bundles/nops/bundle.tar.gz", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        yield server, served
        await server.close()

    @pytest.fixture
    def sidecar(
        self, bundle_server: tuple[TestServer, Path], bundle: Path, keys: KeyPair
    ) -> Iterator[tuple[str, Path]]:
        server, served = bundle_server
        served.write_bytes(bundle.read_bytes())
        with _run_sidecar(server, keys) as url:
            yield url, served

    async def test_no_bundle_yet_is_an_outage_when_a_bundle_is_required(
        self, bundle_server: tuple[TestServer, Path], bundle: Path, keys: KeyPair
    ) -> None:
        """OPA answers before its bundle is active: require_bundle reads that as an
        outage (PolicyEngineError -> 503), not as the policy's deny; then decides."""
        server, served = bundle_server
        with _run_sidecar(server, keys) as url:
            strict = OpaEngine(
                url, decision_path="nops/authz/decision", timeout_s=2, require_bundle=True
            )
            lenient = OpaEngine(url, decision_path="nops/authz/decision", timeout_s=2)
            try:
                assert await strict.revision() == ""
                with pytest.raises(PolicyEngineError, match="NoBundleActivated"):
                    await strict.decide(ECHO_GET, "d-1")
                decision = await lenient.decide(ECHO_GET, "d-1")
                assert (decision.allow, decision.reasons) == (False, ("decision_undefined",))

                shutil.copyfile(bundle, served)
                revision = await wait_revision(strict, lambda r: r.startswith("nops=sha256-"))
                decision = await strict.decide(ECHO_GET, "d-2")
                assert (decision.allow, decision.revision) == (True, revision)
            finally:
                await strict.close()
                await lenient.close()

    async def test_polls_verifies_and_reports_revisions(
        self, sidecar: tuple[str, Path], tmp_path: Path, keys: KeyPair, other_keys: KeyPair
    ) -> None:
        """Signed bundles activate by polling; a foreign-key bundle is refused."""
        url, served = sidecar
        engine = OpaEngine(url, decision_path="nops/authz/decision", timeout_s=2)
        try:
            first = await wait_revision(engine, lambda r: r.startswith("nops=sha256-"))
            decision = await engine.decide(ECHO_GET, "d-1")
            assert (decision.allow, decision.revision) == (True, first)

            policies = copy_policies(tmp_path)
            deny_echo_get(policies)
            second = build_bundle(tmp_path / "next.tar.gz", keys, policy_dir=policies)
            (tmp_path / "next.tar.gz").replace(served)
            await wait_revision(engine, lambda r: r == f"nops={second}")
            decision = await engine.decide(ECHO_GET, "d-2")
            assert (decision.allow, decision.revision) == (False, f"nops={second}")

            build_bundle(tmp_path / "foreign.tar.gz", other_keys, revision="evil")
            (tmp_path / "foreign.tar.gz").replace(served)
            await asyncio.sleep(2.5)  # at least two polls
            assert await engine.revision() == f"nops={second}"
        finally:
            await engine.close()


@contextlib.contextmanager
def _run_sidecar(server: TestServer, keys: KeyPair) -> Iterator[str]:
    """The OPA sidecar as deploy/opa/config.yaml configures it, polling ``server`` each second."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args: list[Any] = [
        OPA_BINARY,
        *("run", "--server", "--addr", f"127.0.0.1:{port}", "--skip-version-check"),
        *("--log-level", "error", "--config-file", SIDECAR_CONFIG),
        *("--set", f"services.bundles.url={str(server.make_url('')).rstrip('/')}"),
        *("--set", "bundles.nops.polling.min_delay_seconds=1"),
        *("--set", "bundles.nops.polling.max_delay_seconds=1"),
        *("--set-file", f"keys.nops-bundle.key={keys.public}"),
    ]
    process = subprocess.Popen(
        [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


async def wait_revision(engine: OpaEngine, ok: Any, timeout_s: float = 15.0) -> str:
    """Poll OPA until its activated revision satisfies ``ok``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        revision = await engine.revision()
        if ok(revision):
            return revision
        if loop.time() > deadline:
            raise AssertionError(f"revision is {revision!r}")
        await asyncio.sleep(0.1)
