"""THREAT_MODEL.md stays true: every test it names exists, every stage has its STRIDE rows.

The criticality matrix in docs/operations.md ("Degraded modes") is held to
the same rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from gateway.pipeline import STAGE_ORDER

ROOT: Final = Path(__file__).resolve().parents[1]
THREAT_MODEL: Final = ROOT / "THREAT_MODEL.md"
OPERATIONS: Final = ROOT / "docs" / "operations.md"
TESTS: Final = {path.name: path.read_text() for path in (ROOT / "tests").glob("*.py")}
ALL_TESTS: Final = "\n".join(TESTS.values())
STRIDE: Final = (
    "Spoofing",
    "Tampering",
    "Repudiation",
    "Information disclosure",
    "Denial of service",
    "Elevation",
)
#: A "held by" cell that names no test must say why.
_NO_TEST_NEEDED: Final = ("*planned*", "deployment requirement")


@dataclass(frozen=True, slots=True)
class Row:
    section: str
    stride: str
    held_by: str


def _rows(text: str) -> list[Row]:
    rows: list[Row] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].split(" (", 1)[0].strip()
        elif line.startswith("| ") and section != "Pipeline stages":
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if cells[0] in ("STRIDE", "---") or len(cells) != 4:
                continue
            rows.append(Row(section, cells[0], cells[3]))
    return rows


def _stage_sections(text: str) -> dict[str, list[str]]:
    part = text.split("## Pipeline stages", 1)[1].split("\n## ", 1)[0]
    sections: dict[str, list[str]] = {}
    for line in part.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0] not in ("stage", "---"):
            sections[cells[0]] = [name.strip() for name in cells[1].split(",")]
    return sections


def _defined(kind: str, name: str, text: str) -> bool:
    pattern = rf"^\s*class {name}\b" if kind == "class" else rf"^\s*(async )?def {name}\b"
    return re.search(pattern, text, re.MULTILINE) is not None


def missing_references(held_by: str) -> list[str]:
    """The test references in a cell that name nothing in tests/."""
    missing = []
    for reference in re.findall(r"`([^`]+)`", held_by):
        parts = reference.split("::")
        text = ALL_TESTS
        if re.fullmatch(r"test_\w+\.py", parts[0]):
            if parts[0] not in TESTS:
                missing.append(reference)
                continue
            text = TESTS[parts[0]]
            parts = parts[1:]
        for part in parts:
            match = re.fullmatch(r"(Test\w+|test_\w+)(?:\[([^\]]+)\])?", part)
            if match is None:
                continue  # not a test reference (a config key, a reason code ...)
            name, param = match.groups()
            kind = "class" if name.startswith("Test") else "def"
            if not _defined(kind, name, text) or (param and f'"{param}"' not in text):
                missing.append(reference)
    return missing


def names_a_test(held_by: str) -> bool:
    """True if a backquoted reference in the cell is a test file, class or function."""
    part = re.compile(r"test_\w+\.py|(Test|test_)\w+(\[[^\]]+\])?")
    return any(
        all(part.fullmatch(piece) for piece in reference.split("::"))
        for reference in re.findall(r"`([^`]+)`", held_by)
    )


def _matrix_rows(text: str) -> list[tuple[str, str]]:
    """(dependency, held by) for each row of the Degraded modes criticality matrix."""
    part = text.split("## Degraded modes", 1)[1].split("\n## ", 1)[0]
    part = part.split("### The criticality matrix", 1)[1]
    rows = []
    for line in part.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 8 and cells[0] not in ("dependency", "---"):
            rows.append((cells[0], cells[7]))
    return rows


TEXT: Final = THREAT_MODEL.read_text()
ROWS: Final = _rows(TEXT)
MATRIX: Final = _matrix_rows(OPERATIONS.read_text())


class TestThreatModel:
    def test_it_has_rows(self) -> None:
        """The parser finds the tables (a parser that finds nothing proves nothing)."""
        assert len(ROWS) > 80
        assert {row.section for row in ROWS} >= {"Audit", "Decision", "Rate limits"}

    @pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{row.section}:{row.stride}")
    def test_every_named_test_exists(self, row: Row) -> None:
        """Each test a row names exists in tests/ (file, class, function, param id)."""
        assert missing_references(row.held_by) == []

    @pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{row.section}:{row.stride}")
    def test_every_row_is_held_by_a_test(self, row: Row) -> None:
        """A row names a test, or says it is planned or a deployment requirement."""
        assert names_a_test(row.held_by) or any(m in row.held_by for m in _NO_TEST_NEEDED)

    @pytest.mark.parametrize("stage", STAGE_ORDER)
    def test_every_stage_has_stride_rows(self, stage: str) -> None:
        """Each pipeline stage maps to sections whose rows cover all six STRIDE threats."""
        sections = _stage_sections(TEXT).get(stage)
        assert sections, f"{stage} is missing from the Pipeline stages table"
        covered = {
            category
            for row in ROWS
            if row.section in sections
            for category in STRIDE
            if category in row.stride
        }
        assert covered == set(STRIDE), f"{stage}: missing {set(STRIDE) - covered}"

    def test_the_matrix_has_rows(self) -> None:
        """The Degraded modes matrix is found, with a row per dependency."""
        assert len(MATRIX) >= 8

    @pytest.mark.parametrize(("dependency", "held_by"), MATRIX, ids=[d for d, _ in MATRIX])
    def test_every_degraded_mode_is_held_by_an_existing_test(
        self, dependency: str, held_by: str
    ) -> None:
        """Each row of the criticality matrix names tests, and they exist."""
        assert names_a_test(held_by)
        assert missing_references(held_by) == []

    @pytest.mark.parametrize(
        ("cell", "missing"),
        [
            pytest.param("`test_faults.py::TestFaultsUnderTraffic`", [], id="file-and-class"),
            pytest.param("`test_nothing_like_this`", ["test_nothing_like_this"], id="no-function"),
            pytest.param("`TestNoSuchClass`", ["TestNoSuchClass"], id="no-class"),
            pytest.param("`test_gone.py`", ["test_gone.py"], id="no-file"),
            pytest.param("`test_health.py::TestHealth`", [], id="right-file"),
            pytest.param(
                "`test_faults.py::TestReadiness`",
                ["test_faults.py::TestReadiness"],
                id="class-in-another-file",
            ),
            pytest.param(
                "`test_kill_and_restore_a_dependency_mid_stream[no-such-id]`",
                ["test_kill_and_restore_a_dependency_mid_stream[no-such-id]"],
                id="no-param-id",
            ),
            pytest.param("`circuit_open`, `proxy.py`", [], id="not-test-references"),
        ],
    )
    def test_the_checker_catches_rot(self, cell: str, missing: list[str]) -> None:
        """The checker itself: a renamed test, class, file or param id is caught."""
        assert missing_references(cell) == missing

    @pytest.mark.parametrize(
        ("cell", "held"),
        [
            pytest.param("`TestSpool`, `test_x.py`", True, id="class"),
            pytest.param("`test_audit_postgres.py::TestSpool::test_y[z]`", True, id="path"),
            pytest.param("docs/bus.md (deployment requirement)", False, id="prose"),
            pytest.param("`proxy.py` (`allow_redirects=False`)", False, id="code"),
        ],
    )
    def test_a_row_without_a_test_is_caught(self, cell: str, held: bool) -> None:
        """Only test files, classes and functions count as holding a row."""
        assert names_a_test(cell) is held
