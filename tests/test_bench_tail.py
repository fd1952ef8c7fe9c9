"""bench.tail's readers: the stage histograms and the gateway's request lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.tail import _durations, _stage_tails

METRICS = "\n".join(
    [
        "# TYPE nops_gateway_stage_duration_seconds histogram",
        'nops_gateway_stage_duration_seconds_bucket{le="0.001",stage="audit"} 10.0',
        'nops_gateway_stage_duration_seconds_bucket{le="0.005",stage="audit"} 90.0',
        'nops_gateway_stage_duration_seconds_bucket{le="0.01",stage="audit"} 95.0',
        'nops_gateway_stage_duration_seconds_bucket{le="+Inf",stage="audit"} 100.0',
        'nops_gateway_stage_duration_seconds_bucket{le="0.005",stage="route"} 50.0',
        'nops_gateway_stage_duration_seconds_bucket{le="+Inf",stage="route"} 50.0',
        'nops_gateway_stage_duration_seconds_bucket{le="0.005",stage="idle"} 0.0',
        'nops_gateway_stage_duration_seconds_bucket{le="+Inf",stage="idle"} 0.0',
        'nops_gateway_stage_duration_seconds_count{stage="audit"} 100.0',
        'nops_gateway_upstream_duration_seconds_bucket{le="0.005",route="echo"} 1.0',
    ]
)


@pytest.mark.parametrize(
    ("threshold_s", "expected"),
    [
        pytest.param(0.005, {"audit": 0.10, "idle": 0.0, "route": 0.0}, id="at-a-bound"),
        pytest.param(0.001, {"audit": 0.90, "idle": 0.0, "route": 1.0}, id="below-route's-first"),
        pytest.param(0.01, {"audit": 0.05, "idle": 0.0, "route": 0.0}, id="upper"),
    ],
)
def test_stage_tails_share_over_a_bound(threshold_s: float, expected: dict[str, float]) -> None:
    """Share of observations above the largest bucket bound <= threshold; other metrics ignored."""
    assert _stage_tails(METRICS, threshold_s) == pytest.approx(expected)


def test_durations_keep_only_full_pipeline_request_lines(tmp_path: Path) -> None:
    since = datetime(2026, 12, 4, 17, 0, 0, tzinfo=UTC)
    lines = [
        {"ts": "2026-12-04T17:00:01.500Z", "msg": "request", "route": "locked", "duration_ms": 2.5},
        {"ts": "2026-12-04T17:00:02.000Z", "msg": "request", "route": "echo", "duration_ms": 9.0},
        {"ts": "2026-12-04T17:00:03.000Z", "msg": "listening", "route": "locked"},
    ]
    log = tmp_path / "gateway.log"
    log.write_text("\n".join([*map(json.dumps, lines), "not json"]) + "\n")
    assert _durations(log, since) == [(1.5, 2.5)]
