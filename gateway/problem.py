"""RFC 9457 problem details: the only place errors become HTTP responses."""

from __future__ import annotations

from typing import Any, Final

import orjson
from aiohttp import web

from gateway.errors import GatewayError

__all__ = ["PROBLEM_CONTENT_TYPE", "PROBLEM_TYPE_BASE", "problem_response", "problem_type"]

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
#: ``type`` URIs are stable identifiers, one per error code.
PROBLEM_TYPE_BASE: Final = "urn:nops:gateway:problem:"


def problem_type(code: str) -> str:
    return PROBLEM_TYPE_BASE + code


def problem_response(error: GatewayError, *, request_id: str) -> web.Response:
    body: dict[str, Any] = {
        "type": problem_type(error.code),
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "request_id": request_id,
    }
    if error.reasons:
        body["reasons"] = list(error.reasons)
    body.update(error.extra)
    response = web.Response(
        status=error.status,
        body=orjson.dumps(body),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=error.headers,
    )
    return response
