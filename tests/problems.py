"""Assertions on problem+json answers."""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway.problem import PROBLEM_CONTENT_TYPE, problem_type


async def assert_problem(
    response: aiohttp.ClientResponse, status: int, code: str, reasons: list[str] | None = None
) -> dict[str, Any]:
    """The response is problem+json with this status, type and (optionally) reasons."""
    assert response.status == status
    assert response.content_type == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = await response.json(content_type=PROBLEM_CONTENT_TYPE)
    assert body["type"] == problem_type(code)
    assert body["status"] == status
    assert body["request_id"] == response.headers["X-Request-Id"]
    if reasons is not None:
        assert body["reasons"] == reasons
    return body
