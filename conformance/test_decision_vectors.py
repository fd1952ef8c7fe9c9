"""Decision vectors: each input's expected decision, from every engine, identically.

Every ``conformance/vectors/*.json`` holds a decision path, an input document
and the decision the policies must give. Each vector is replayed through

- ``opa eval`` (a subprocess, ``--format json``) on policies/rego,
- the gateway's :class:`~gateway.policy.opa.OpaEngine` against a real OPA
  server loaded from policies/rego (``opa-dir``), and
- the same engine against the supervised OPA on the signed bundle built by
  scripts/build-bundle (``opa-bundle``),
- the in-process :class:`~gateway.policy.embedded.EmbeddedEngine` (the
  policy compiled to WebAssembly) on policies/rego (``embedded-dir``) and on
  the same signed bundle (``embedded-bundle``),

and all five answers must equal the expected decision: the embedded engine's
conformance gate (issue #10), with conformance/test_embedded_rego_tests.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_asyncio

from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.engine import Decision
from gateway.policy.opa import OpaEngine
from gateway.policy.result import load_schema
from gateway.policy.supervisor import LocalBundle, LocalOpa
from tests.bundles import KeyPair, build_bundle
from tests.conftest import OPA_BINARY, POLICY_DIR, OpaProcess

VECTORS = sorted((Path(__file__).parent / "vectors").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    vector: dict[str, Any] = json.loads(path.read_text())
    return vector


def decision_of(value: Any) -> dict[str, Any]:
    """The contract's three fields, reasons as a list (order matters: sorted by contract)."""
    return {
        "allow": value["allow"],
        "reasons": list(value["reasons"]),
        "obligations": dict(value["obligations"]),
    }


def opa_eval(vector: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """What ``opa eval`` says for the vector."""
    input_file = tmp_path / "input.json"
    input_file.write_text(json.dumps(vector["input"]))
    query = "data." + vector["decision_path"].replace("/", ".")
    completed = subprocess.run(
        [
            *(str(OPA_BINARY), "eval", "--format", "json", "--data", str(POLICY_DIR)),
            *("--input", str(input_file), query),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    [result] = json.loads(completed.stdout)["result"]
    [expression] = result["expressions"]
    return decision_of(expression["value"])


@pytest.fixture(scope="module")
def opa_dir() -> Iterator[OpaProcess]:
    server = OpaProcess(POLICY_DIR)
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def opa_bundle(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[LocalOpa]:
    directory = tmp_path_factory.mktemp("conformance-bundle")
    keys = KeyPair(directory / "keys")
    bundle = directory / "bundle.tar.gz"
    build_bundle(bundle, keys)
    opa = LocalOpa(OPA_BINARY, directory, bundle=LocalBundle(bundle, keys.public))
    await opa.start()
    yield opa
    await opa.stop()


DECISION_PATHS = ("nops/authz/decision", "nops/egress/decision")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embedded(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[dict[tuple[str, str], EmbeddedEngine]]:
    """Embedded engines by (source, decision path): the directory, and a signed bundle."""
    directory = tmp_path_factory.mktemp("conformance-embedded")
    keys = KeyPair(directory / "keys")
    bundle = directory / "bundle.tar.gz"
    build_bundle(bundle, keys)
    engines: dict[tuple[str, str], EmbeddedEngine] = {}
    for path in DECISION_PATHS:
        engines["dir", path] = EmbeddedEngine(OPA_BINARY, POLICY_DIR, decision_path=path)
        engines["bundle", path] = EmbeddedEngine(
            OPA_BINARY, directory, decision_path=path, bundle=LocalBundle(bundle, keys.public)
        )
    try:
        for engine in engines.values():
            await engine.start()
        yield engines
    finally:
        for engine in engines.values():
            await engine.close()


def as_vector_answer(decision: Decision) -> dict[str, Any]:
    return {
        "allow": decision.allow,
        "reasons": list(decision.reasons),
        "obligations": dict(decision.obligations),
    }


async def engine_decide(url: str, vector: dict[str, Any]) -> dict[str, Any]:
    engine = OpaEngine(url, decision_path=vector["decision_path"], timeout_s=5)
    try:
        decision = await engine.decide(vector["input"], "conformance")
    finally:
        await engine.close()
    return as_vector_answer(decision)


class TestVectorSet:
    def test_enough_vectors_spanning_both_packages(self) -> None:
        """At least 30 vectors, covering authz and egress, allows and denials."""
        vectors = [load(p) for p in VECTORS]
        assert len(vectors) >= 30
        paths = {v["decision_path"] for v in vectors}
        assert paths == {"nops/authz/decision", "nops/egress/decision"}
        assert {v["expected"]["allow"] for v in vectors} == {True, False}

    def test_every_reason_code_is_exercised(self) -> None:
        """Each reason code the policies document appears in some vector."""
        seen = {r for p in VECTORS for r in load(p)["expected"]["reasons"]}
        assert seen >= {
            "allowed",
            "unsupported_input_version",
            "unknown_route",
            "method_not_allowed",
            "authentication_required",
            "missing_scope",
            "unknown_classification",
            "d4_never_leaves",
            "unknown_destination",
            "unknown_tenant",
            "class_above_destination_ceiling",
            "class_above_tenant_ceiling",
        }

    @pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
    def test_vector_matches_the_contract(self, path: Path) -> None:
        """Expected decisions match decision.v1.json; inputs marked valid match the input schema."""
        vector = load(path)
        assert set(vector) == {
            "description",
            "decision_path",
            "input_matches_schema",
            "input",
            "expected",
        }
        jsonschema.validate(vector["expected"], load_schema("decision.v1.json"))
        errors = list(
            jsonschema.Draft202012Validator(load_schema("policy-input.v1.json")).iter_errors(
                vector["input"]
            )
        )
        assert (not errors) is vector["input_matches_schema"], [e.message for e in errors]


@pytest.mark.asyncio(loop_scope="module")  # the bundle OPA's file server lives in this loop
@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
class TestReplay:
    async def test_every_engine_gives_the_expected_decision(
        self,
        path: Path,
        tmp_path: Path,
        opa_dir: OpaProcess,
        opa_bundle: LocalOpa,
        embedded: dict[tuple[str, str], EmbeddedEngine],
    ) -> None:
        """opa eval, OPA (directory, signed bundle) and the embedded engine (both) agree."""
        vector = load(path)
        decision_path = vector["decision_path"]
        answers = {
            "opa-eval": opa_eval(vector, tmp_path),
            "opa-dir": await engine_decide(opa_dir.url, vector),
            "opa-bundle": await engine_decide(opa_bundle.url, vector),
        }
        for source in ("dir", "bundle"):
            decision = await embedded[source, decision_path].decide(vector["input"], "conformance")
            answers[f"embedded-{source}"] = as_vector_answer(decision)
        assert answers == dict.fromkeys(answers, vector["expected"])


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("decision_path", DECISION_PATHS)
async def test_embedded_revision_is_the_one_opa_reports(
    decision_path: str, embedded: dict[tuple[str, str], EmbeddedEngine], opa_bundle: LocalOpa
) -> None:
    """An embedded decision on a signed bundle carries nops=<revision>, as OPA reports it."""
    vector = load(VECTORS[0])
    decision = await embedded["bundle", decision_path].decide(vector["input"], "conformance")
    opa = OpaEngine(opa_bundle.url, decision_path=decision_path, timeout_s=5)
    try:
        assert decision.revision == await opa.revision()
        assert decision.revision.startswith("nops=sha256-")
    finally:
        await opa.close()


def test_opa_binary_is_the_pinned_one() -> None:
    """The conformance run uses the repository's pinned OPA, not one from PATH."""
    assert OPA_BINARY.is_file()
    assert shutil.which(str(OPA_BINARY)) is not None
