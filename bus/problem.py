"""RFC 9457 problem details for the bus, in the gateway's shape.

``{"type": "urn:nops:bus:problem:<code>", "title", "status", "detail",
"request_id", ["reasons"], ...extra}`` with ``application/problem+json``.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from aiohttp import web

from bus.errors import BusError

__all__ = ["PROBLEM_CONTENT_TYPE", "PROBLEM_TYPE_BASE", "problem_response", "problem_type"]

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
#: ``type`` URIs are stable identifiers, one per error code.
PROBLEM_TYPE_BASE: Final = "urn:nops:bus:problem:"


def problem_type(code: str) -> str:
    return PROBLEM_TYPE_BASE + code


def problem_response(error: BusError, *, request_id: str) -> web.Response:
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
    return web.Response(
        status=error.status,
        body=orjson.dumps(body),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=error.headers,
    )
