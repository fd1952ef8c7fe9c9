"""The embedded engine (``[policy] engine = "embedded"``) through the whole gateway.

The same table of outcomes as with OPA (allow; deny with the reason), the
decision cache and admin plane on top of it, failing closed with the same 503
as an unreachable OPA, signed bundles verified by OPA's own code, policy
changes picked up, and wasmtime left unimported unless the engine is chosen.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.config import ConfigError, parse_config
from gateway.policy.embedded import (
    DECISION_FUEL,
    EmbeddedEngine,
    EmbeddedPolicyError,
    compile_policy,
)
from gateway.policy.stack import POLICY_STACK
from gateway.policy.supervisor import LocalBundle, PolicySnapshot
from gateway.policy.wasm import WasmPolicy, WasmPolicyError
from tests.bundles import (
    KeyPair,
    bundle_fixture,  # noqa: F401 - fixture
    copy_policies,
    deny_echo_get,
    keys_fixture,  # noqa: F401 - fixture
    other_keys_fixture,  # noqa: F401 - fixture
    rewrite_bundle,
)
from tests.conftest import OPA_BINARY, POLICY_DIR, TEST_POLICY_DIR, GatewayFactory
from tests.problems import assert_problem
from tests.test_admin import ADMIN_KEYS, bearer

Client = TestClient[Any, Any]


def embedded(bundle_dir: Path = POLICY_DIR, **policy: Any) -> dict[str, Any]:
    """The ``[policy]`` table of a gateway on the embedded engine."""
    return {
        "engine": "embedded",
        "url": "",
        "opa_binary": str(OPA_BINARY),
        "bundle_dir": str(bundle_dir),
        **policy,
    }


class TestDecisions:
    @pytest.mark.parametrize(
        ("method", "path", "status", "reasons"),
        [
            pytest.param("GET", "/echo/x", 200, None, id="allow-echo-get"),
            pytest.param("POST", "/echo/x", 200, None, id="allow-echo-post"),
            pytest.param("HEAD", "/readonly/x", 200, None, id="allow-readonly-head"),
            pytest.param("DELETE", "/readonly/x", 403, ["method_not_allowed"], id="deny-delete"),
            pytest.param("POST", "/readonly/x", 403, ["method_not_allowed"], id="deny-post"),
        ],
    )
    async def test_outcome_and_reason(
        self,
        make_gateway: GatewayFactory,
        method: str,
        path: str,
        status: int,
        reasons: list[str] | None,
    ) -> None:
        """The embedded engine allows and denies as OPA does, with the policy's reasons."""
        client = await make_gateway(policy=embedded())
        response = await client.request(method, path)
        if reasons is None:
            assert response.status == status
        else:
            body = await assert_problem(response, status, "policy-denied", reasons)
            assert len(body["decision_id"]) == 36

    @pytest.mark.parametrize(
        ("decision_path", "reason"),
        [
            pytest.param("test/broken/illtyped", "decision_ill_typed", id="ill-typed"),
            pytest.param("test/broken/noreason", "decision_ill_typed", id="allow-without-reason"),
        ],
    )
    async def test_unusable_decision_denies(
        self, make_gateway: GatewayFactory, tmp_path: Path, decision_path: str, reason: str
    ) -> None:
        """An ill-typed answer is a deny, never an allow, as with OPA."""
        policies = copy_policies(tmp_path)
        shutil.copytree(TEST_POLICY_DIR / "test", policies / "test")
        client = await make_gateway(policy=embedded(policies, decision_path=decision_path))
        await assert_problem(await client.get("/echo/x"), 403, "policy-denied", [reason])

    async def test_evaluation_error_fails_closed(
        self, make_gateway: GatewayFactory, tmp_path: Path
    ) -> None:
        """A decision that aborts (two values in conflict) is the 503 of an unreachable OPA."""
        policies = copy_policies(tmp_path)
        (policies / "conflict").mkdir()
        (policies / "conflict" / "conflict.rego").write_text(
            "package conflict\n\n"
            'decision := {"allow": true, "reasons": ["allowed"], "obligations": {}}\n\n'
            'decision := {"allow": false, "reasons": ["no"], "obligations": {}} '
            'if input.request.method == "DELETE"\n'
        )
        client = await make_gateway(policy=embedded(policies, decision_path="conflict/decision"))
        assert (await client.get("/readonly/x")).status == 200
        response = await client.delete("/readonly/x")
        body = await assert_problem(response, 503, "policy-unavailable", ["policy_engine_error"])
        assert len(body["decision_id"]) == 36

    async def test_runaway_evaluation_is_stopped_and_fails_closed(
        self, make_gateway: GatewayFactory, tmp_path: Path
    ) -> None:
        """A decision past its fuel (4e8 iterations here) stops: 503, and the next one works."""
        policies = copy_policies(tmp_path)
        (policies / "runaway").mkdir()
        (policies / "runaway" / "runaway.rego").write_text(
            "package runaway\n\n"
            'decision := {"allow": true, "reasons": ["allowed"], "obligations": {}} '
            'if input.request.method != "DELETE"\n\n'
            'decision := {"allow": _spin > 0, "reasons": ["allowed"], "obligations": {}} '
            'if input.request.method == "DELETE"\n\n'
            "_spin := count([1 | some _ in numbers.range(1, 20000); "
            "some _ in numbers.range(1, 20000)])\n"
        )
        client = await make_gateway(policy=embedded(policies, decision_path="runaway/decision"))
        response = await client.delete("/readonly/x")
        await assert_problem(response, 503, "policy-unavailable", ["policy_engine_error"])
        assert (await client.get("/readonly/x")).status == 200

    async def test_cache_and_admin_see_the_revision(self, make_gateway: GatewayFactory) -> None:
        """Decisions carry nops=<revision>; the cache serves repeats; admin shows the engine."""
        client = await make_gateway(policy=embedded(), admin={"keys": ADMIN_KEYS})
        for _ in range(2):
            assert (await client.get("/echo/x")).status == 200
        stack = client.app[POLICY_STACK]
        assert stack.cache is not None
        stats = stack.cache.stats()
        assert (stats.hits, stats.entries) == (1, 1)
        status = await (await client.get("/_admin/policy", headers=bearer("VIEWER"))).json()
        assert status["engine"] == "embedded"
        assert status["opa"]["url"] == "in-process"
        assert status["opa"]["revision"] == stats.revision
        assert stats.revision.startswith("nops=sha256-")
        tenants = await (await client.get("/_admin/tenants", headers=bearer("VIEWER"))).json()
        assert tenants["policy_data"] == "ok"
        assert tenants["tenants"][0]["egress_ceiling"] == "D3"

    async def test_policy_change_is_picked_up(
        self, make_gateway: GatewayFactory, tmp_path: Path
    ) -> None:
        """An edited policy directory is recompiled and enforced, under a new revision."""
        policies = copy_policies(tmp_path)
        client = await make_gateway(policy=embedded(policies, cache={"enabled": False}))
        assert (await client.get("/echo/x")).status == 200
        before = await client.app[POLICY_STACK].opa.revision()
        deny_echo_get(policies)
        for _ in range(200):  # bounded: the watcher looks every 0.5 s
            if await client.app[POLICY_STACK].opa.revision() != before:
                break
            await asyncio.sleep(0.05)
        await assert_problem(await client.get("/echo/x"), 403, "policy-denied")
        assert (await client.post("/echo/x")).status == 200


class TestSignedBundles:
    async def test_signed_bundle_is_enforced(
        self, make_gateway: GatewayFactory, bundle: Path, keys: KeyPair
    ) -> None:
        """A verified bundle decides; its revision is the bundle's."""
        client = await make_gateway(
            policy=embedded(bundle_file=str(bundle), verification_key_file=str(keys.public))
        )
        assert (await client.get("/echo/x")).status == 200
        await assert_problem(await client.delete("/readonly/x"), 403, "policy-denied")
        assert (await client.app[POLICY_STACK].opa.revision()).startswith("nops=sha256-")

    @pytest.mark.parametrize(
        ("tamper", "message"),
        [
            pytest.param("data", "digest mismatch", id="edited-data"),
            pytest.param("unsigned", "missing .signatures.json", id="signature-removed"),
            pytest.param("other-key", "invalid ECDSA signature", id="other-key"),
        ],
    )
    async def test_unverified_bundle_is_refused(
        self,
        tmp_path: Path,
        bundle: Path,
        keys: KeyPair,
        other_keys: KeyPair,
        tamper: str,
        message: str,
    ) -> None:
        """A bundle that does not verify is never compiled: the engine does not start."""
        target = tmp_path / "bundle.tar.gz"
        key = keys.public
        if tamper == "data":
            rewrite_bundle(
                bundle, target, lambda n, b: b.replace(b'"POST"', b'"PUT"') if "data" in n else b
            )
        elif tamper == "unsigned":
            rewrite_bundle(bundle, target, lambda n, b: None if "signatures" in n else b)
        else:
            shutil.copy(bundle, target)
            key = other_keys.public
        engine = EmbeddedEngine(
            OPA_BINARY,
            tmp_path,
            decision_path="nops/authz/decision",
            bundle=LocalBundle(target, key),
        )
        with pytest.raises(EmbeddedPolicyError, match=message):
            await engine.start()
        assert engine.policy is None


def write_policy(directory: Path, rego: str) -> Path:
    """A one-file policy directory, package ``t``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "t.rego").write_text("package t\n\n" + rego + "\n")
    return directory


class TestWasmPolicy:
    async def test_out_of_fuel_stops_the_evaluation_not_the_engine(self, tmp_path: Path) -> None:
        """A long evaluation stops at its fuel budget; the next, short one still answers."""
        policy = write_policy(tmp_path, "n := count([x | some x in numbers.range(1, input.n)])")
        compiled = await compile_policy(
            OPA_BINARY, ("t/n",), PolicySnapshot.read(policy), fuel=DECISION_FUEL
        )
        entrypoint = compiled.entrypoint("t/n")
        with pytest.raises(WasmPolicyError, match="ran out of fuel"):
            compiled.module.evaluate(entrypoint, b'{"n": 100000000}')
        assert compiled.module.evaluate(entrypoint, b'{"n": 1000}') == b'[{"result":1000}]'

    async def test_host_builtins_are_refused_by_name(self, tmp_path: Path) -> None:
        """A policy needing built-ins the host would provide does not load; they are named."""
        policy = write_policy(
            tmp_path, 'd := semver.compare(input.v, "1.0.0")\n\nr := opa.runtime()'
        )
        with pytest.raises(
            EmbeddedPolicyError, match=r"host does not provide: opa\.runtime, semver"
        ):
            await compile_policy(OPA_BINARY, ("t/d", "t/r"), PolicySnapshot.read(policy))

    @pytest.mark.parametrize(
        ("module", "message"),
        [
            pytest.param(b"", "not a WebAssembly module", id="empty"),
            pytest.param(b"\0asm\1\0\0\0", "imports no memory", id="no-opa-abi"),
        ],
    )
    def test_not_an_opa_module(self, module: bytes, message: str) -> None:
        """Anything but an OPA policy module is refused before it runs."""
        with pytest.raises(WasmPolicyError, match=message):
            WasmPolicy(module, b"{}")

    @pytest.mark.parametrize(
        ("document", "result"),
        [
            pytest.param(None, b"[]", id="undefined-input"),
            pytest.param(b"null", b'[{"result":null}]', id="null-input"),
            pytest.param(b'{"a":[1,"x"]}', b'[{"result":{"a":[1,"x"]}}]', id="object"),
            pytest.param(
                b'{"a":"' + b"x" * 10_000 + b'"}',
                b'[{"result":{"a":"' + b"x" * 10_000 + b'"}}]',
                id="result-longer-than-a-read-chunk",
            ),
        ],
    )
    async def test_input_reaches_the_policy(
        self, tmp_path: Path, document: bytes | None, result: bytes
    ) -> None:
        """Input None is undefined (as in opa test), anything else is parsed as given."""
        policy = write_policy(tmp_path, "z := input")
        compiled = await compile_policy(OPA_BINARY, ("t/z",), PolicySnapshot.read(policy))
        assert compiled.module.evaluate(compiled.entrypoint("t/z"), document) == result


class TestConfiguration:
    @pytest.mark.parametrize(
        ("policy", "key"),
        [
            pytest.param({"url": "http://127.0.0.1:8181"}, "policy.url", id="url"),
            pytest.param({"shadow": {"enabled": True}}, "policy.shadow.url", id="shadow-url"),
        ],
    )
    def test_embedded_refuses(self, policy: dict[str, Any], key: str) -> None:
        """An OPA address means nothing to the embedded engine; its shadow needs one."""
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config({"version": 1, "policy": {"engine": "embedded", **policy}})

    def test_embedded_with_an_opa_shadow_is_accepted(self) -> None:
        """The rollout path: the embedded engine enforces, an OPA server shadows it."""
        config = parse_config(
            {
                "version": 1,
                "policy": {
                    "engine": "embedded",
                    "shadow": {"enabled": True, "url": "http://127.0.0.1:8181"},
                },
            }
        )
        assert config.policy.engine == "embedded"

    def test_wasmtime_is_not_imported_for_opa(self) -> None:
        """An OPA gateway never loads wasmtime: the engine is imported only when chosen."""
        code = (
            "import sys, gateway.app, gateway.cli, gateway.server, gateway.policy.stack\n"
            "from gateway.config import parse_config\n"
            "gateway.app.create_app(parse_config({'version': 1}))\n"
            "print('wasmtime' in sys.modules, 'gateway.policy.embedded' in sys.modules)\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert completed.stdout.split() == ["False", "False"]
