"""The embedded engine's gate on the Rego unit tests: every test, in-process, as opa test says.

The gate itself is conformance/regogate.py. The first class runs it on the
shipped policies (all must pass, and agree); the second shows it is not
vacuous: on policies made to fail, error, skip or need a host built-in it
reports exactly what ``opa test`` reports, or refuses.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conformance.regogate import Verdict, compare, run_gate
from tests.bundles import copy_policies, deny_echo_get
from tests.conftest import POLICY_DIR


def count_test_rules() -> int:
    """How many test rules the *_test.rego files define (a cross-check of discovery)."""
    pattern = re.compile(r"^test_[A-Za-z0-9_]*\b", re.MULTILINE)
    return sum(len(pattern.findall(p.read_text())) for p in POLICY_DIR.rglob("*_test.rego"))


class TestShippedPolicies:
    async def test_every_rego_test_passes_in_process_as_in_opa_test(self) -> None:
        """Every test_* rule of policies/rego gives opa test's verdict (pass) through wasm."""
        report = await run_gate(POLICY_DIR)
        assert report.problems == []
        assert report.embedded == report.opa
        assert set(report.opa.values()) == {"pass"}
        assert len(report.opa) == count_test_rules() > 0
        assert {name.rsplit("/", 2)[0] for name in report.opa} == {"nops"}


#: Rego added to a copy of the policies, and what the gate must then say.
_FAILING = """package nops.gate_test

test_fails if {
\t1 == 2
}
"""
_ERRORING = """package nops.gate_test

_x := 1 if input.a

_x := 2 if input.b

test_conflict_is_an_error if {
\t_x == 1 with input as {"a": true, "b": true}
}
"""
_SKIPPED = """package nops.gate_test

todo_test_later if {
\ttrue
}
"""
_HOST_BUILTIN = """package nops.gate_test

test_needs_a_host_builtin if {
\tsemver.compare("1.0.0", "1.0.1") == -1
}
"""


class TestTheGateCanFail:
    @pytest.mark.parametrize(
        ("extra", "verdict", "problem"),
        [
            pytest.param(_FAILING, "fail", None, id="failing-test-fails-in-both"),
            pytest.param(_ERRORING, "error", None, id="conflict-errors-in-both"),
            pytest.param(_SKIPPED, "skip", "skipped by opa test", id="skipped-is-not-compared"),
            pytest.param(
                _HOST_BUILTIN, "pass", "needs built-ins the host does not provide: semver.compare",
                id="host-builtin-is-refused",
            ),
        ],
    )  # fmt: skip
    async def test_gate_verdicts(
        self, tmp_path: Path, extra: str, verdict: str, problem: str | None
    ) -> None:
        """opa test's verdict on an added test is found in-process too, or the gate says why not."""
        policies = copy_policies(tmp_path)
        (policies / "nops" / "gate").mkdir()
        (policies / "nops" / "gate" / "gate_test.rego").write_text(extra)
        report = await run_gate(policies)
        [added] = [name for name in report.opa if name.startswith("nops/gate_test/")]
        assert report.opa[added] == verdict
        if problem is None:
            assert report.problems == []
            assert report.embedded[added] == verdict
        else:
            assert len(report.problems) == 1
            assert problem in report.problems[0]

    async def test_edited_policy_fails_the_same_tests(self, tmp_path: Path) -> None:
        """With GET removed from the echo route, the same tests fail in-process as in opa test."""
        policies = copy_policies(tmp_path)
        deny_echo_get(policies)
        report = await run_gate(policies)
        assert report.problems == []
        failed = sorted(name for name, v in report.opa.items() if v == "fail")
        assert failed, "the edit must break some test"
        assert sorted(name for name, v in report.embedded.items() if v == "fail") == failed

    @pytest.mark.parametrize(
        ("opa", "embedded", "problem"),
        [
            pytest.param("pass", "fail", "opa test says pass, the embedded engine fail", id="p-f"),
            pytest.param("fail", "pass", "opa test says fail, the embedded engine pass", id="f-p"),
            pytest.param("error", "fail", "opa test says error, the embedded engine fail", id="ef"),
            pytest.param("pass", None, "not evaluated by the embedded engine", id="missing"),
        ],
    )  # fmt: skip
    def test_compare_reports_every_difference(
        self, opa: Verdict, embedded: Verdict | None, problem: str
    ) -> None:
        """A verdict that differs, or a test left out, is a problem; agreement is none."""
        assert compare({"t": opa}, {"t": embedded} if embedded else {}) == [f"t: {problem}"]
        assert compare({"t": opa}, {"t": opa}) == []
