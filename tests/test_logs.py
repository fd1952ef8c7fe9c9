"""JSON logs: structure, request ids and redaction."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

from gateway.logs import REDACTED, REQUEST_ID, configure_logging, redact


class TestRedact:
    @pytest.mark.parametrize(
        ("key", "value", "expected"),
        [
            pytest.param("authorization", "Bearer abc", REDACTED, id="authorization"),
            pytest.param("api_key", "k", REDACTED, id="api-key"),
            pytest.param("x_signature", "sig", REDACTED, id="signature"),
            pytest.param("postgres_dsn", "postgresql://u:p@h/db", REDACTED, id="dsn-key"),
            pytest.param(
                "url",
                "redis://:pw@127.0.0.1:6379/0",
                "redis://[redacted]@127.0.0.1:6379/0",
                id="url-credentials",
            ),
            pytest.param("route", "echo", "echo", id="plain"),
            pytest.param("status", 200, 200, id="number"),
            pytest.param(
                "headers",
                {"Cookie": "c", "Accept": "x"},
                {"Cookie": REDACTED, "Accept": "x"},
                id="nested",
            ),
        ],
    )
    def test_values(self, key: str, value: Any, expected: Any) -> None:
        """Sensitive keys and URL credentials never reach a log line."""
        assert redact(key, value) == expected


class TestFormatter:
    def _capture(self, emit: Any) -> dict[str, Any]:
        stream = io.StringIO()
        configure_logging("DEBUG", stream)
        try:
            emit(logging.getLogger("test"))
        finally:
            configure_logging("WARNING")
        line: dict[str, Any] = json.loads(stream.getvalue().strip().splitlines()[-1])
        return line

    def test_request_id_and_extra_fields(self) -> None:
        """Context request id and extra fields appear as JSON keys."""
        token = REQUEST_ID.set("rid-1")
        try:
            line = self._capture(lambda log: log.info("hello", extra={"route": "echo"}))
        finally:
            REQUEST_ID.reset(token)
        assert line["msg"] == "hello"
        assert line["request_id"] == "rid-1"
        assert line["route"] == "echo"
        assert line["level"] == "info"

    def test_exceptions_have_no_stack_trace(self) -> None:
        """An exception is logged by type and place only."""

        def boom() -> None:
            raise ValueError("token=s3cret")

        def emit(log: logging.Logger) -> None:
            try:
                boom()
            except ValueError:
                log.exception("failed")

        line = self._capture(emit)
        assert line["error_type"] == "ValueError"
        assert "test_logs.py" in line["error_at"]
        assert "Traceback" not in json.dumps(line)
        assert "s3cret" not in json.dumps(line)
