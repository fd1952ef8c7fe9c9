"""Read a gateway's Prometheus ``/metrics`` (its separate listener) in tests."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import METRICS_LISTENER

__all__ = ["METRICS_ON", "Samples", "scrape", "value"]

#: The ``[metrics]`` section that turns the listener on, on any free port.
METRICS_ON = {"enabled": True, "port": 0}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: TestClient[Any, Any]) -> Samples:
    """Every sample on the gateway's /metrics, by (name, sorted labels)."""
    port = client.app[METRICS_LISTENER].port
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
