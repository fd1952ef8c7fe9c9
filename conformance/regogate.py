"""The embedded engine's gate on the Rego unit tests (issue #10).

Every ``test_*`` rule of every ``*_test.rego`` is compiled to WebAssembly as
an entrypoint of its own (``opa build -t wasm -e <package>/<rule>``, by the
embedded engine's own :func:`~gateway.policy.embedded.compile_policy`) and
evaluated in-process with ``input`` undefined, as ``opa test`` evaluates it.
Its verdict (``pass``: the result is ``true``; ``fail``: undefined or any
other value; ``error``: the evaluation aborted) must be the one ``opa test``
reports for it. The gate fails when a verdict differs, when a test cannot be
evaluated (it does not compile to wasm, it needs a built-in the host would
have to provide, its name is not a plain rule name), and when ``opa test``
skipped it (nothing to compare).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import orjson

from gateway.policy.embedded import EmbeddedPolicyError, compile_policy
from gateway.policy.supervisor import PolicySnapshot
from gateway.policy.wasm import WasmPolicyError
from tests.conftest import OPA_BINARY

__all__ = ["GateReport", "Verdict", "compare", "embedded_verdicts", "opa_test_verdicts", "run_gate"]

Verdict = Literal["pass", "fail", "error", "skip"]

_RULE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PASS: Final = [{"result": True}]


@dataclass(frozen=True, slots=True)
class GateReport:
    """Both verdicts of every test, by entrypoint path, and what stops the gate."""

    opa: dict[str, Verdict]
    embedded: dict[str, Verdict]
    problems: list[str] = field(default_factory=list)


def opa_test_verdicts(policy_dir: Path) -> dict[str, Verdict]:
    """``opa test``'s verdict of each test, keyed ``<package path>/<rule>``."""
    completed = subprocess.run(
        [str(OPA_BINARY), "test", "--format", "json", str(policy_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode not in (0, 2):  # 2: some test failed or errored
        raise RuntimeError(f"opa test could not run: {completed.stderr.strip()[:2000]}")
    verdicts: dict[str, Verdict] = {}
    for row in json.loads(completed.stdout):
        key = row["package"].removeprefix("data.").replace(".", "/") + "/" + row["name"]
        verdict: Verdict = (
            "error" if row.get("error") else
            "skip" if row.get("skip") else
            "fail" if row.get("fail") else
            "pass"
        )  # fmt: skip
        verdicts[key] = verdict
    return verdicts


async def embedded_verdicts(policy_dir: Path, tests: Iterable[str]) -> dict[str, Verdict]:
    """Each test rule evaluated in-process; raises EmbeddedPolicyError when it cannot compile."""
    names = tuple(tests)
    files = await asyncio.to_thread(_with_tests, policy_dir)
    compiled = await compile_policy(
        OPA_BINARY, names, PolicySnapshot(files=files, revision="rego-tests")
    )
    verdicts: dict[str, Verdict] = {}
    for name in names:
        try:
            results = orjson.loads(compiled.module.evaluate(compiled.entrypoint(name), None))
        except WasmPolicyError:
            verdicts[name] = "error"
            continue
        verdicts[name] = "pass" if results == _PASS else "fail"
    return verdicts


def _with_tests(policy_dir: Path) -> tuple[tuple[str, bytes], ...]:
    """Every file under ``policy_dir``, tests included (dot files left out)."""
    return tuple(
        (path.relative_to(policy_dir).as_posix(), path.read_bytes())
        for path in sorted(policy_dir.rglob("*"))
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(policy_dir).parts)
    )


def compare(opa: dict[str, Verdict], embedded: dict[str, Verdict]) -> list[str]:
    """What keeps the gate shut: every difference, and every test not compared."""
    problems = []
    for name in sorted(opa.keys() | embedded.keys()):
        want, got = opa.get(name), embedded.get(name)
        if want == "skip":
            problems.append(f"{name}: skipped by opa test, nothing to compare")
        elif got is None:
            problems.append(f"{name}: not evaluated by the embedded engine")
        elif want != got:
            problems.append(f"{name}: opa test says {want}, the embedded engine {got}")
    return problems


async def run_gate(policy_dir: Path) -> GateReport:
    """Both verdicts of every test under ``policy_dir``, and the problems found."""
    opa = opa_test_verdicts(policy_dir)
    unnamed = [n for n in opa if not _RULE.fullmatch(n.rsplit("/", 1)[-1])]
    runnable = [n for n in opa if n not in unnamed and opa[n] != "skip"]
    problems = [f"{n}: not a plain rule name, cannot be an entrypoint" for n in unnamed]
    try:
        embedded = await embedded_verdicts(policy_dir, runnable) if runnable else {}
    except EmbeddedPolicyError as exc:
        return GateReport(opa, {}, [*problems, f"the tests do not compile to wasm: {exc}"])
    problems += [p for p in compare(opa, embedded) if p.split(":", 1)[0] not in unnamed]
    return GateReport(opa, embedded, problems)
