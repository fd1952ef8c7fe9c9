"""The decision cache: keyed by input and revision, bounded, never stale across a revision."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import shutil
import signal
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from aiohttp.test_utils import TestClient

from gateway.app import METRICS
from gateway.config import PolicyCacheConfig
from gateway.metrics import Metrics
from gateway.policy.cache import CachingEngine, DecisionCache, cache_key, canonical_json
from gateway.policy.engine import Decision, PolicyEngineError
from gateway.policy.opa import OpaEngine
from gateway.policy.result import REASON_UNDEFINED
from gateway.policy.supervisor import LocalBundle, LocalOpa, PolicySnapshot
from tests.bundles import (  # noqa: F401 - the *_fixture names are fixtures
    KeyPair,
    build_bundle,
    bundle_fixture,
    copy_policies,
    deny_echo_get,
    keys_fixture,
)
from tests.conftest import ECHO_GET_INPUT, OPA_BINARY, GatewayFactory, OpaProcess

Client = TestClient[Any, Any]

ECHO_GET: dict[str, Any] = {**ECHO_GET_INPUT, "tenant": {"id": "acme", "tier": None}}
ECHO_POST = {**ECHO_GET, "request": {**ECHO_GET["request"], "method": "POST"}}


def with_ip(ip: str) -> dict[str, Any]:
    return {**ECHO_GET, "source": {"ip": ip}}


def decision(revision: str = "r1", allow: bool = True) -> Decision:
    return Decision("d", allow, ("allowed",) if allow else ("denied",), {}, revision)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestCanonicalJson:
    @pytest.mark.parametrize(
        "value",
        [
            pytest.param(ECHO_GET, id="policy-input"),
            pytest.param({"b": 1, "a": [True, False, None, -5, ""]}, id="order-and-scalars"),
            pytest.param({"s": '\x00\x1f\x7f"\\\b\f\n\r\t\u2028'}, id="escapes"),
            pytest.param({"é": "ü€😀", "z": {"ß": "日本"}}, id="unicode"),
            pytest.param({"\ue000": 1, "😀": 2}, id="keys-where-utf16-order-differs"),
            pytest.param({"n": 2**53 - 1, "m": -(2**53 - 1)}, id="safe-integers"),
            pytest.param({"f": 1.5, "g": 1e21, "h": 0.1}, id="floats"),
            pytest.param([{"q": {"a": ["1", "2"]}}], id="nested"),
        ],
    )
    def test_matches_rfc8785(self, value: Any) -> None:
        """The fast path writes exactly the bytes of the rfc8785 reference."""
        assert canonical_json(value) == rfc8785.dumps(value)

    def test_unsafe_integers_are_refused_like_rfc8785(self) -> None:
        """An integer beyond 2**53 is not canonical JSON: no key, no caching."""
        with pytest.raises(rfc8785.IntegerDomainError):
            canonical_json({"n": 2**53})


class TestCacheKey:
    def test_key_ignores_member_order(self) -> None:
        """RFC 8785: the same document in another member order has the same key."""
        reordered = dict(reversed(list(copy.deepcopy(ECHO_GET).items())))
        assert cache_key(reordered, revision="r", scope="s") == cache_key(
            ECHO_GET, revision="r", scope="s"
        )

    @pytest.mark.parametrize(
        ("other", "kwargs"),
        [
            pytest.param(ECHO_POST, {}, id="input"),
            pytest.param(with_ip("10.0.0.1"), {}, id="source-ip-is-in-the-key"),
            pytest.param(ECHO_GET, {"revision": "r2"}, id="revision"),
            pytest.param(ECHO_GET, {"scope": "nops/other/decision"}, id="decision-path"),
        ],
    )
    def test_key_changes_with(self, other: Mapping[str, Any], kwargs: dict[str, str]) -> None:
        """Input, revision and decision path are all part of the key."""
        revision, scope = "r1", "nops/authz/decision"
        changed = {"revision": revision, "scope": scope, **kwargs}
        assert cache_key(ECHO_GET, revision=revision, scope=scope) != cache_key(
            other, revision=changed["revision"], scope=changed["scope"]
        )

    def test_excluded_path_leaves_the_key(self) -> None:
        """key_exclude drops a path (and only it) without changing the document."""
        document = with_ip("10.0.0.1")
        keep = cache_key(ECHO_GET, revision="r", scope="s", exclude=("source.ip",))
        assert cache_key(document, revision="r", scope="s", exclude=("source.ip",)) == keep
        assert document["source"] == {"ip": "10.0.0.1"}
        assert cache_key(document, revision="r", scope="s", exclude=("nope.deep",)) != keep


class TestDecisionCache:
    def test_ttl_expires_entries(self) -> None:
        """An entry is gone once ttl_s has passed."""
        clock = Clock()
        cache = DecisionCache(max_entries=10, max_entries_per_tenant=10, ttl_s=5, clock=clock)
        cache.put("acme", "k", decision())
        clock.now += 4.9
        assert cache.get("acme", "k") == decision()
        clock.now += 0.1
        assert cache.get("acme", "k") is None
        assert len(cache) == 0

    def test_per_tenant_bound_evicts_that_tenants_oldest(self) -> None:
        """A tenant over its share loses its own least recently used entry."""
        cache = DecisionCache(max_entries=100, max_entries_per_tenant=2, ttl_s=60)
        cache.put("acme", "a1", decision())
        cache.put("acme", "a2", decision())
        cache.get("acme", "a1")  # a1 is now the most recently used
        cache.put("acme", "a3", decision())
        assert [cache.get("acme", k) is not None for k in ("a1", "a2", "a3")] == [True, False, True]

    def test_noisy_tenant_cannot_evict_the_others(self) -> None:
        """At the global bound the fullest tenant gives up space, not the quiet ones."""
        cache = DecisionCache(max_entries=4, max_entries_per_tenant=3, ttl_s=60)
        cache.put("quiet", "q1", decision())
        for index in range(10):
            cache.put("noisy", f"n{index}", decision())
        cache.put("other", "o1", decision())
        assert cache.get("quiet", "q1") is not None
        assert cache.get("other", "o1") is not None
        assert len(cache) == 4
        assert cache.evictions == 8


class ScriptedEngine:
    """Answers with a chosen revision; POSTs wait for ``gate`` (to order answers)."""

    def __init__(self) -> None:
        self.revision = "r1"
        self.calls = 0
        self.gate = asyncio.Event()

    async def decide(self, document: Mapping[str, Any], decision_id: str) -> Decision:
        self.calls += 1
        revision = self.revision  # the policy that answers is the one loaded now
        if document["request"]["method"] == "POST":
            await self.gate.wait()
        return Decision(decision_id, True, ("allowed",), {}, revision)

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class RecordingEngine(ScriptedEngine):
    """Remembers the documents it was asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Mapping[str, Any]] = []

    async def decide(self, document: Mapping[str, Any], decision_id: str) -> Decision:
        self.seen.append(copy.deepcopy(dict(document)))
        return await super().decide(document, decision_id)


def signed_at(created: int) -> dict[str, Any]:
    return {**ECHO_GET, "signature": {"keyid": "k", "alg": "ed25519", "created": created}}


class TestKeyExclude:
    async def test_excluded_field_is_neither_keyed_nor_seen_by_the_policy(self) -> None:
        """key_exclude = signature.created: later signatures hit, and OPA never sees created."""
        inner = RecordingEngine()
        engine = CachingEngine(
            inner, PolicyCacheConfig(key_exclude=("signature.created",)), scope="s"
        )
        answers = [await engine.decide(signed_at(created), "d") for created in (1, 2, 3)]
        assert [answer.cached for answer in answers] == [False, True, True]
        assert inner.seen == [
            {**ECHO_GET, "signature": {"keyid": "k", "alg": "ed25519"}},
        ]

    async def test_without_exclusion_a_per_request_field_never_hits(self) -> None:
        """By default every input field is in the key: a new created is a new question."""
        inner = RecordingEngine()
        engine = CachingEngine(inner, PolicyCacheConfig(), scope="s")
        answers = [await engine.decide(signed_at(created), "d") for created in (1, 2, 2)]
        assert [answer.cached for answer in answers] == [False, False, True]
        assert [doc["signature"]["created"] for doc in inner.seen] == [1, 2]


class TestRecheck:
    async def test_recheck_serves_nothing_until_the_engine_confirms(self) -> None:
        """After recheck() a hit waits for the revision check; an engine down fails closed."""
        inner = ScriptedEngine()
        down = False

        async def probe() -> str:
            if down:
                raise PolicyEngineError("ClientConnectorError")
            return inner.revision

        engine = CachingEngine(
            inner, PolicyCacheConfig(revision_check_s=3600), scope="s", revision_probe=probe
        )
        await engine.decide(ECHO_GET, "d-1")
        assert (await engine.decide(ECHO_GET, "d-2")).cached is True  # checked: r1
        down = True
        assert (await engine.decide(ECHO_GET, "d-3")).cached is True  # no check due yet
        flushes = engine.stats().flushes
        engine.recheck()
        answer = await engine.decide(ECHO_GET, "d-4")  # the check fails: emptied, engine asked
        assert (answer.cached, inner.calls) == (False, 2)
        assert engine.stats().flushes > flushes
        down = False
        engine.recheck()
        assert (await engine.decide(ECHO_GET, "d-5")).cached is True  # same revision: kept


class TestCachingEngineRevisions:
    """How the cache follows revisions, with a scripted engine to order answers."""

    async def test_late_answer_from_old_revision_does_not_switch_back(self) -> None:
        """An answer computed before a seen change neither switches nor fills the cache."""
        inner = ScriptedEngine()
        engine = CachingEngine(inner, PolicyCacheConfig(), scope="s")
        await engine.decide(ECHO_GET, "d0")
        assert engine.revision == "r1"
        slow = asyncio.create_task(engine.decide(ECHO_POST, "d1"))
        await asyncio.sleep(0)  # the slow request is in flight, answered by r1
        inner.revision = "r2"
        await engine.decide(with_ip("10.0.0.2"), "d2")  # learns r2
        inner.gate.set()
        old = await slow  # an r1 answer arriving after r2 was seen
        assert (old.revision, engine.revision) == ("r1", "r2")
        assert engine.stats().entries == 1  # only the r2 answer
        assert (await engine.decide(with_ip("10.0.0.2"), "d3")).cached is True
        assert (await engine.decide(ECHO_POST, "d4")).cached is False

    async def test_unusable_decisions_are_never_cached(self) -> None:
        """decision_undefined / decision_ill_typed are asked again every time."""

        class Undefined(ScriptedEngine):
            async def decide(self, document: Mapping[str, Any], decision_id: str) -> Decision:
                self.calls += 1
                return Decision(decision_id, False, (REASON_UNDEFINED,), {}, "r1")

        inner = Undefined()
        engine = CachingEngine(inner, PolicyCacheConfig(), scope="s")
        for _ in range(3):
            assert (await engine.decide(ECHO_GET, "d")).cached is False
        assert inner.calls == 3


@pytest.fixture
async def bundle_opa(
    tmp_path: Path, bundle: Path, keys: KeyPair
) -> AsyncIterator[tuple[LocalOpa, OpaEngine]]:
    """A local OPA on a signed bundle file the test may replace."""
    live = tmp_path / "live.tar.gz"
    shutil.copyfile(bundle, live)
    opa = LocalOpa(OPA_BINARY, tmp_path, bundle=LocalBundle(live, keys.public))
    await opa.start()
    engine = OpaEngine(opa.url, decision_path="nops/authz/decision", timeout_s=2)
    yield opa, engine
    await engine.close()
    await opa.stop()


async def replace_policy(opa: LocalOpa, engine: OpaEngine, keys: KeyPair, tmp_path: Path) -> str:
    """Publish a bundle in which GET on echo is denied; wait until OPA activated it."""
    assert opa.bundle is not None
    policies = copy_policies(tmp_path)
    deny_echo_get(policies)
    revision = f"nops={build_bundle(opa.bundle.file, keys, policy_dir=policies)}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while await engine.revision() != revision:
        assert loop.time() < deadline, "OPA did not activate the new bundle"
        await asyncio.sleep(0.05)
    return revision


def caching(engine: OpaEngine, metrics: Metrics, **config: Any) -> CachingEngine:
    return CachingEngine(
        engine,
        PolicyCacheConfig(**config),
        scope="nops/authz/decision",
        revision_probe=engine.revision,
        metrics=metrics,
    )


class TestCachingEngineWithOpa:
    async def test_repeated_input_is_answered_from_the_cache(
        self, bundle_opa: tuple[LocalOpa, OpaEngine]
    ) -> None:
        """The second identical question is a hit, with its own decision id."""
        metrics = Metrics()
        engine = caching(bundle_opa[1], metrics)
        first = await engine.decide(ECHO_GET, "d-1")
        second = await engine.decide(ECHO_GET, "d-2")
        assert (first.cached, second.cached) == (False, True)
        assert (second.decision_id, second.allow, second.reasons) == ("d-2", True, ("allowed",))
        assert second.revision == first.revision != ""
        assert metrics.decision_cache["hit"] == 1
        assert metrics.decision_cache["miss"] == 1
        assert (await engine.decide(ECHO_POST, "d-3")).cached is False

    async def test_plain_files_without_revision_are_never_cached(self, opa: OpaProcess) -> None:
        """An OPA loaded from a directory reports no revision: nothing is cached."""
        metrics = Metrics()
        inner = OpaEngine(opa.url, decision_path="nops/authz/decision", timeout_s=2)
        engine = caching(inner, metrics)
        try:
            for index in range(3):
                answer = await engine.decide(ECHO_GET, f"d-{index}")
                assert (answer.allow, answer.cached, answer.revision) == (True, False, "")
            assert metrics.decision_cache["uncacheable"] == 3
            assert engine.stats().entries == 0
        finally:
            await engine.close()

    async def test_policy_change_is_never_served_from_a_stale_cache(
        self, bundle_opa: tuple[LocalOpa, OpaEngine], keys: KeyPair, tmp_path: Path
    ) -> None:
        """revision_check_s = 0: once OPA activated a new bundle, the next answer is new."""
        opa, inner = bundle_opa
        engine = caching(inner, Metrics(), revision_check_s=0)
        assert (await engine.decide(ECHO_GET, "d-1")).allow is True
        assert (await engine.decide(ECHO_GET, "d-2")).cached is True
        revision = await replace_policy(opa, inner, keys, tmp_path)
        after = await engine.decide(ECHO_GET, "d-3")
        assert (after.allow, after.reasons, after.cached) == (False, ("method_not_allowed",), False)
        assert after.revision == engine.revision == revision
        assert engine.stats().flushes >= 1

    async def test_revision_seen_in_any_answer_empties_the_cache(
        self, bundle_opa: tuple[LocalOpa, OpaEngine], keys: KeyPair, tmp_path: Path
    ) -> None:
        """Without a due revision check, a miss that reports the new revision empties the cache."""
        opa, inner = bundle_opa
        engine = caching(inner, Metrics(), revision_check_s=3600)
        await engine.decide(ECHO_GET, "d-1")
        assert (await engine.decide(ECHO_GET, "d-2")).cached is True
        revision = await replace_policy(opa, inner, keys, tmp_path)
        other = await engine.decide(ECHO_POST, "d-3")  # a miss, answered by the new bundle
        assert (other.revision, engine.revision, engine.stats().entries) == (
            revision,
            revision,
            1,
        )
        after = await engine.decide(ECHO_GET, "d-4")
        assert (after.allow, after.cached) == (False, False)

    async def test_revision_check_bounds_the_stale_window(
        self, bundle_opa: tuple[LocalOpa, OpaEngine], keys: KeyPair, tmp_path: Path
    ) -> None:
        """With revision_check_s = 0.2, a hit is re-checked once that much time has passed."""
        opa, inner = bundle_opa
        engine = caching(inner, Metrics(), revision_check_s=0.2)
        await engine.decide(ECHO_GET, "d-1")
        await replace_policy(opa, inner, keys, tmp_path)
        await asyncio.sleep(0.2)
        after = await engine.decide(ECHO_GET, "d-2")
        assert (after.allow, after.cached) == (False, False)

    async def test_failed_revision_check_serves_nothing_from_the_cache(
        self, bundle_opa: tuple[LocalOpa, OpaEngine]
    ) -> None:
        """OPA gone: the cache is emptied and the decision fails closed."""
        opa, inner = bundle_opa
        engine = caching(inner, Metrics(), revision_check_s=0)
        await engine.decide(ECHO_GET, "d-1")
        await opa.stop()
        with pytest.raises(PolicyEngineError):
            await engine.decide(ECHO_GET, "d-2")
        assert (engine.stats().entries, engine.revision) == (0, "")


class TestPolicySnapshot:
    @pytest.mark.parametrize(
        ("edit", "changes"),
        [
            pytest.param(lambda d: None, False, id="untouched"),
            pytest.param(deny_echo_get, True, id="data-edited"),
            pytest.param(
                lambda d: (d / "nops" / "authz" / "authz.rego").write_text(
                    (d / "nops" / "authz" / "authz.rego").read_text() + "\n# comment\n"
                ),
                True,
                id="rego-edited",
            ),
            pytest.param(
                lambda d: (d / "nops" / "extra.rego").write_text("package nops.extra\n"),
                True,
                id="file-added",
            ),
            pytest.param(
                lambda d: (d / "nops" / "routes" / "data.json").rename(d / "nops" / "routes.json"),
                True,
                id="file-moved",
            ),
            pytest.param(
                lambda d: (d / "nops" / "authz" / "authz_test.rego").write_text("package x\n"),
                False,
                id="test-edited",
            ),
            pytest.param(
                lambda d: (d / "nops" / ".authz.rego.swp").write_text("junk"),
                False,
                id="hidden-file",
            ),
        ],
    )
    def test_revision_names_the_contents(self, tmp_path: Path, edit: Any, changes: bool) -> None:
        """The same files give the same revision; any change to what OPA loads a new one."""
        policies = copy_policies(tmp_path)
        before = PolicySnapshot.read(policies)
        edit(policies)
        after = PolicySnapshot.read(policies)
        assert before.revision.startswith("sha256-")
        assert (before.revision != after.revision) is changes
        assert ("nops/authz/authz_test.rego" in dict(after.files)) is False


@pytest.fixture
async def dir_opa(tmp_path: Path) -> AsyncIterator[tuple[LocalOpa, OpaEngine, Path]]:
    """A supervised local OPA on a policy directory the test may edit."""
    policies = copy_policies(tmp_path)
    opa = LocalOpa(OPA_BINARY, policies, watch_s=0.05)
    await opa.start()
    engine = OpaEngine(opa.url, decision_path="nops/authz/decision", timeout_s=2)
    yield opa, engine, policies
    await engine.close()
    await opa.stop()


async def activated(engine: OpaEngine, policies: Path) -> str:
    """Wait until OPA serves the bundle built from the directory as it is now."""
    revision = f"nops={PolicySnapshot.read(policies).revision}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while await engine.revision() != revision:
        assert loop.time() < deadline, "OPA did not activate the edited policy"
        await asyncio.sleep(0.05)
    return revision


class TestSupervisedDirectory:
    async def test_decisions_carry_the_files_revision_and_hit(
        self, dir_opa: tuple[LocalOpa, OpaEngine, Path]
    ) -> None:
        """OPA reports the content revision with each answer, so repeats are hits."""
        opa, inner, policies = dir_opa
        metrics = Metrics()
        engine = caching(inner, metrics)
        answers = [await engine.decide(ECHO_GET, f"d-{index}") for index in range(3)]
        assert [answer.cached for answer in answers] == [False, True, True]
        assert answers[0].revision == f"nops={PolicySnapshot.read(policies).revision}"
        assert opa.revision == PolicySnapshot.read(policies).revision
        assert (metrics.decision_cache["miss"], metrics.decision_cache["hit"]) == (1, 2)

    @pytest.mark.parametrize("check_s", [0, 3600], ids=["checked", "learned-from-an-answer"])
    async def test_edited_policy_is_never_answered_from_the_cache(
        self, dir_opa: tuple[LocalOpa, OpaEngine, Path], check_s: float
    ) -> None:
        """Edit a file: once OPA loaded it, the next answer is the new policy's, not a hit."""
        _, inner, policies = dir_opa
        engine = caching(inner, Metrics(), revision_check_s=check_s)
        assert (await engine.decide(ECHO_GET, "d-1")).allow is True
        assert (await engine.decide(ECHO_GET, "d-2")).cached is True
        deny_echo_get(policies)
        revision = await activated(inner, policies)
        if check_s:
            # No check due: a miss answered by the new bundle teaches the revision.
            assert (await engine.decide(ECHO_POST, "d-3")).revision == revision
        after = await engine.decide(ECHO_GET, "d-4")
        assert (after.allow, after.reasons, after.cached) == (False, ("method_not_allowed",), False)
        assert after.revision == engine.revision == revision

    async def test_exit_is_reported_before_the_restart(
        self, dir_opa: tuple[LocalOpa, OpaEngine, Path]
    ) -> None:
        """on_exit runs when OPA dies (the gateway wires it to the cache's recheck)."""
        opa, inner, _ = dir_opa
        exited = asyncio.Event()
        opa.on_exit.append(exited.set)
        pid = opa.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(exited.wait(), 15)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:  # restarted with the same bundle
            with contextlib.suppress(PolicyEngineError):
                if (await inner.decide(ECHO_GET, "d")).allow:
                    break
            assert loop.time() < deadline, "not restarted"
            await asyncio.sleep(0.05)
        assert opa.pid not in (None, pid)

    async def test_a_broken_edit_keeps_the_last_good_policy(
        self, dir_opa: tuple[LocalOpa, OpaEngine, Path]
    ) -> None:
        """A file that does not compile is not loaded; a fix afterwards is."""
        opa, inner, policies = dir_opa
        good = opa.revision
        broken = policies / "nops" / "broken.rego"
        broken.write_text("package nops.broken\nallow if {\n")
        await asyncio.sleep(0.5)  # several watch periods: the build fails each time it is tried
        assert (opa.revision, await inner.revision()) == (good, f"nops={good}")
        broken.unlink()
        deny_echo_get(policies)
        await activated(inner, policies)
        assert (await inner.decide(ECHO_GET, "d")).allow is False


class TestGatewayCache:
    async def test_gateway_counts_hits_on_a_supervised_directory(
        self, make_gateway: GatewayFactory
    ) -> None:
        """make run's set-up (local OPA on policies/rego): repeats are decided from the cache."""
        client = await make_gateway(policy={"url": "", "opa_binary": str(OPA_BINARY)})
        statuses = [(await client.get("/echo/x")).status for _ in range(3)]
        assert statuses == [200, 200, 200]
        counts = client.app[METRICS].decision_cache
        assert (counts["miss"], counts["hit"]) == (1, 2)

    async def test_gateway_counts_hits_on_a_signed_bundle(
        self, make_gateway: GatewayFactory, bundle: Path, keys: KeyPair
    ) -> None:
        """End to end: repeated identical requests are decided once, then from the cache."""
        client = await make_gateway(
            policy={
                "url": "",
                "opa_binary": str(OPA_BINARY),
                "bundle_file": str(bundle),
                "verification_key_file": str(keys.public),
            }
        )
        statuses = [(await client.get("/echo/x")).status for _ in range(3)]
        assert statuses == [200, 200, 200]
        counts = client.app[METRICS].decision_cache
        assert (counts["miss"], counts["hit"]) == (1, 2)

    async def test_cache_can_be_disabled(self, make_gateway: GatewayFactory) -> None:
        """policy.cache.enabled = false: every request asks OPA."""
        client = await make_gateway(policy={"cache": {"enabled": False}})
        assert (await client.get("/echo/x")).status == 200
        assert client.app[METRICS].decision_cache == {}
