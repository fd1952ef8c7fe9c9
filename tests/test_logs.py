"""JSON logs: structure, request ids and redaction."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

from gateway.logs import REDACTED, REQUEST_ID, JsonFormatter, configure_logging, redact


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

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            pytest.param("token_hint", 42, id="sensitive-key-number"),
            pytest.param("client_secret", "s", id="sensitive-key-string"),
            pytest.param("upstream", "https://u:p@up.example/x", id="url-credentials"),
            pytest.param("upstream_user", "a@b", id="at-sign-no-url"),
            pytest.param("route", "echo", id="plain-string"),
            pytest.param("status", 200, id="int"),
            pytest.param("duration_ms", 1.25, id="float"),
            pytest.param("spooled", True, id="bool"),
            pytest.param("tenant", None, id="none"),
            pytest.param("reasons", ["a", "redis://:pw@h/0"], id="list"),
            pytest.param("pair", ("x", 1), id="tuple"),
            pytest.param("headers", {"Cookie": "c", "Accept": "x"}, id="mapping"),
        ],
    )
    def test_extra_fields_are_redacted_like_redact(self, key: str, value: Any) -> None:
        """Each extra field reaches the line as redact() gives it, whatever its type."""
        line = self._capture(lambda log: log.info("m", extra={key: value}))
        assert line[key] == json.loads(json.dumps(redact(key, value)))

    def test_timestamps_within_and_across_seconds(self) -> None:
        """The cached second never leaks into a record of another second."""
        formatter = JsonFormatter()
        stamps = []
        for created in (1700000000.125, 1700000000.875, 1700000001.5, 1699999999.25):
            record = logging.LogRecord("t", logging.INFO, "f", 1, "m", None, None)
            record.created = created
            record.msecs = (created - int(created)) * 1000
            stamps.append(json.loads(formatter.format(record))["ts"])
        assert stamps == [
            "2023-11-14T22:13:20.125Z",
            "2023-11-14T22:13:20.875Z",
            "2023-11-14T22:13:21.500Z",
            "2023-11-14T22:13:19.250Z",
        ]
