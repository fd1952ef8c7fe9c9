"""The Dockerfile passes BuildKit's own checks (`docker build --check`), offline.

`.tools/bin/dockerfile-lint` (tools/dockerfile-lint, built by scripts/tools)
runs BuildKit's parser and lint rules over every stage without an engine,
answering base images with a stub config instead of asking a registry.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Final

import pytest

from tests.conftest import ROOT, TOOLS_BIN

LINT: Final = TOOLS_BIN / "dockerfile-lint"


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    assert LINT.exists(), f"{LINT} is missing: run scripts/tools"
    return subprocess.run([str(LINT), str(path)], capture_output=True, text=True, timeout=60)


def test_the_dockerfile_passes_buildkit_checks() -> None:
    done = _lint(ROOT / "Dockerfile")
    assert (done.returncode, done.stdout) == (0, "")


@pytest.mark.parametrize(
    ("dockerfile", "finding"),
    [
        pytest.param("FROM python:3.11.14-slim-bookworm as build\nCMD [\"true\"]\n",
                     ":1: FromAsCasing:", id="from-as-casing"),
        pytest.param("FROM python:3.11.14-slim-bookworm\nCMD gateway serve\n",
                     ":2: JSONArgsRecommended:", id="shell-form-cmd"),
        pytest.param("FROM python:3.11.14-slim-bookworm\nRUNN true\n",
                     ":2: error: dockerfile parse error on line 2: unknown instruction: RUNN",
                     id="unknown-instruction"),
        pytest.param("FROM python:3.11.14-slim-bookworm AS Build\nCMD [\"true\"]\n",
                     ":1: StageNameCasing:", id="stage-name-casing"),
        pytest.param("FROM python:3.11.14-slim-bookworm\nCOPY --chmod=xyz a b\n",
                     ":2: error: invalid syntax", id="bad-chmod-value"),
    ],
)  # fmt: skip
def test_a_broken_dockerfile_is_reported(tmp_path: Path, dockerfile: str, finding: str) -> None:
    """The check can fail: each broken file exits 1 and names the rule and line."""
    path = tmp_path / "Dockerfile"
    path.write_text(dockerfile)
    done = _lint(path)
    assert done.returncode == 1
    assert f"{path}{finding}" in done.stdout
