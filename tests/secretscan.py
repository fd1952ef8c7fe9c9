"""A run-wide check that no secret the tests use ever reaches a log line.

Fixtures and helpers that create a secret (HMAC keys, API keys, admin keys,
JWTs from tests/jwtissuer.py, passwords in DSNs) pass it to
:func:`register_secret`. Every log record of the whole session goes through a
root handler that formats it with the gateway's :class:`JsonFormatter` (so
what is checked is what an operator would read, after redaction), and tests
that capture a subprocess's stderr hand it to :func:`observe_output`.

After each test the lines it produced are scanned: a leak fails that test's
teardown, naming the secret's label and where the line came from (never the
secret itself). Lines logged outside any test are scanned at session end,
which then fails the run.

Scanning is a window index, not N substring searches per line: each secret
is indexed by its last ``MIN_LENGTH`` characters, and each run of
non-separator characters in a line is slid over once.

(PYTEST_DONT_REWRITE: conftest imports this plugin before pytest registers it.)
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Final

import pytest

from gateway.logs import JsonFormatter

__all__ = [
    "MIN_LENGTH",
    "SCANNER",
    "Leak",
    "SecretScanner",
    "observe_output",
    "register_secret",
]

#: Shorter values cannot be told apart from ordinary text.
MIN_LENGTH: Final = 10
# What a secret can appear in: anything between JSON and whitespace separators.
_RUN: Final = re.compile(r'[^\s"\\,{}\[\]]{' + str(MIN_LENGTH) + ",}")
_SEPARATORS: Final = re.compile(r'[\s"\\,{}\[\]]')


@dataclass(frozen=True, slots=True)
class Leak:
    label: str
    source: str
    line_no: int


class SecretScanner:
    """Registered secrets, the lines not scanned yet, and the leaks found."""

    def __init__(self) -> None:
        self._by_tail: dict[str, list[tuple[str, str]]] = {}
        #: Secrets containing separator characters: checked by plain search.
        self._odd: list[tuple[str, str]] = []
        self._known: set[str] = set()
        self._pending: list[tuple[str, str]] = []
        self.lines_seen = 0

    def register(self, value: str | bytes, label: str) -> None:
        """Watch for ``value`` (and, for bytes, its base64 and hex forms)."""
        for form in _forms(value):
            if len(form) < MIN_LENGTH:
                raise ValueError(f"secret {label!r} is shorter than {MIN_LENGTH} characters")
            if form in self._known:
                continue
            self._known.add(form)
            if _SEPARATORS.search(form):
                self._odd.append((form, label))
            else:
                self._by_tail.setdefault(form[-MIN_LENGTH:], []).append((form, label))

    def observe(self, line: str, source: str) -> None:
        self._pending.append((line, source))
        self.lines_seen += 1

    def scan(self) -> list[Leak]:
        """Scan the lines observed since the last scan; forget them."""
        pending, self._pending = self._pending, []
        leaks: list[Leak] = []
        for number, (line, source) in enumerate(pending):
            for label in sorted(set(self._labels_in(line))):
                leaks.append(Leak(label, source, number))
        return leaks

    def _labels_in(self, line: str) -> Iterator[str]:
        index = self._by_tail
        for run in _RUN.findall(line):
            for end in range(MIN_LENGTH, len(run) + 1):
                candidates = index.get(run[end - MIN_LENGTH : end])
                if candidates is None:
                    continue
                for secret, label in candidates:
                    start = end - len(secret)
                    if start >= 0 and run[start:end] == secret:
                        yield label
        for secret, label in self._odd:
            if secret in line:
                yield label


def _forms(value: str | bytes) -> list[str]:
    if isinstance(value, str):
        return [value]
    forms = [
        base64.b64encode(value).decode(),
        base64.urlsafe_b64encode(value).decode().rstrip("="),
        value.hex(),
    ]
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return forms
    if text.isprintable():
        forms.append(text)
    return forms


class _Handler(logging.Handler):
    """Formats every record as the gateway would and hands it to the scanner."""

    def __init__(self, scanner: SecretScanner) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self._scanner = scanner

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is still checked raw
            line = f"{record.msg!r} {record.args!r}"
        self._scanner.observe(line, f"log {record.name}")


#: The session's scanner; module-level so plain helpers (jwtissuer) can register.
SCANNER: Final = SecretScanner()
_HANDLER: Final = _Handler(SCANNER)
#: Our own packages log at DEBUG during tests, so DEBUG lines are checked too.
_PACKAGES: Final = ("gateway", "bus", "registry", "audit", "egress")


def register_secret(value: str | bytes, label: str) -> None:
    """Fail the run if ``value`` ever shows up in a log line."""
    SCANNER.register(value, label)


def observe_output(text: str | bytes, source: str) -> None:
    """Check a subprocess's captured output (stderr) line by line."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    for line in text.splitlines():
        SCANNER.observe(line, source)


def _install() -> None:
    # SECURITY: re-installed before each test, as `configure_logging` replaces root handlers.
    root = logging.getLogger()
    if _HANDLER not in root.handlers:
        root.addHandler(_HANDLER)
    for name in _PACKAGES:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level > logging.DEBUG:
            logger.setLevel(logging.DEBUG)


def _describe(leaks: list[Leak]) -> str:
    seen = sorted({(leak.label, leak.source) for leak in leaks})
    return "secrets in log lines:\n" + "\n".join(f"  {label!r} in {src}" for label, src in seen)


# -- pytest hooks (this module is listed in conftest's pytest_plugins) --------------


def pytest_configure(config: pytest.Config) -> None:
    _install()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _install()


_SESSION_LEAKS: list[Leak] = []
_TEST_LEAKS: list[Leak] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.when == "teardown":
        leaks = SCANNER.scan()
        if leaks and report.passed:
            # The test that leaked fails (at teardown), by the secret's label.
            report.outcome = "failed"
            report.longrepr = _describe(leaks)
            _TEST_LEAKS.extend(leaks)
        elif leaks:
            _SESSION_LEAKS.extend(leaks)  # the test failed anyway: fail the run too
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SESSION_LEAKS.extend(SCANNER.scan())
    if _SESSION_LEAKS:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_sep("-", "secrets check")
    leaks = len(_TEST_LEAKS) + len(_SESSION_LEAKS)
    summary = f"{leaks} leak{'s' * (leaks != 1)} found in {SCANNER.lines_seen} log lines"
    terminalreporter.write_line(summary, red=bool(leaks))
    if _SESSION_LEAKS:
        terminalreporter.write_line(_describe(_SESSION_LEAKS), red=True)
