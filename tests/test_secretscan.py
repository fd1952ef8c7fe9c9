"""The run-wide secrets check (tests/secretscan.py) finds what it must, and only that."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.secretscan import MIN_LENGTH, SecretScanner, _Handler

SECRET = "leak-me-not-0123456789abcdef"
KEY = bytes(range(7, 39))


def scanner_with_secrets() -> SecretScanner:
    scanner = SecretScanner()
    scanner.register(SECRET, "test secret")
    scanner.register(KEY, "test HMAC key")
    return scanner


def log_through(scanner: SecretScanner, message: str, **extra: object) -> None:
    """Log one record through the checker's own handler (JsonFormatter, as in the gateway)."""
    logger = logging.getLogger("tests.secretscan.probe")
    handler = _Handler(scanner)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(message, extra=extra)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


CASES = [
    ("plain", f"token {SECRET} seen", {}, ["test secret"]),
    ("inside-json-value", "x", {"detail": f"Bearer {SECRET}"}, ["test secret"]),
    ("in-a-url", f"GET https://h/p?k={SECRET}&z=1", {}, ["test secret"]),
    (
        "key-base64",
        "x",
        {"header": "hmac " + __import__("base64").b64encode(KEY).decode()},
        ["test HMAC key"],
    ),
    ("key-hex", f"key={KEY.hex()}", {}, ["test HMAC key"]),
    ("redacted-by-key-name", "x", {"api_key": SECRET}, []),
    ("only-a-prefix", f"{SECRET[:-1]}", {}, []),
    ("nothing", "an ordinary line", {}, []),
]


class TestScanner:
    @pytest.mark.parametrize(
        ("message", "extra", "labels"),
        [case[1:] for case in CASES],
        ids=[case[0] for case in CASES],
    )
    def test_finds_registered_secrets_in_formatted_lines(
        self, message: str, extra: dict[str, object], labels: list[str]
    ) -> None:
        """A registered secret in a JSON log line is flagged by label; redacted ones are not."""
        scanner = scanner_with_secrets()
        log_through(scanner, message, **extra)
        assert [leak.label for leak in scanner.scan()] == labels

    def test_scan_forgets_what_it_scanned(self) -> None:
        """Each line is judged once: a second scan has nothing left."""
        scanner = scanner_with_secrets()
        scanner.observe(f"x {SECRET}", "stderr")
        [leak] = scanner.scan()
        assert leak.source == "stderr"
        assert scanner.scan() == []

    def test_short_values_are_refused(self) -> None:
        """A value too short to tell from text cannot be registered silently."""
        with pytest.raises(ValueError, match="shorter"):
            SecretScanner().register("x" * (MIN_LENGTH - 1), "short")

    def test_secret_with_separators_still_found(self) -> None:
        """A secret with spaces is found by plain search."""
        scanner = SecretScanner()
        scanner.register("pass phrase with spaces", "phrase")
        scanner.observe('{"msg":"pass phrase with spaces"}', "log")
        assert [leak.label for leak in scanner.scan()] == ["phrase"]


class TestSessionFails:
    def test_a_leaking_test_fails_the_run(self, tmp_path: Path) -> None:
        """A test that logs a registered secret fails, by label, and the run exits non-zero."""
        (tmp_path / "test_leak.py").write_text(
            textwrap.dedent(
                """
                import logging
                from tests.secretscan import register_secret

                def test_leaks():
                    register_secret("inner-secret-0123456789", "inner secret")
                    logging.getLogger("gateway.probe").info("oops inner-secret-0123456789")

                def test_clean():
                    logging.getLogger("gateway.probe").info("nothing to see")
                """
            )
        )
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "tests.secretscan",
                "-q",
                "-p",
                "no:cacheprovider",
                str(tmp_path / "test_leak.py"),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=120,
            check=False,
        )
        assert result.returncode == 1, result.stdout
        # The leaking test errors at teardown, by label; the clean one passes.
        assert "ERROR test_leak.py::test_leaks - secrets in log lines" in result.stdout
        assert "'inner secret' in log gateway.probe" in result.stdout
        assert "2 passed, 1 error" in result.stdout
        assert "1 leak found in 2 log lines" in result.stdout
