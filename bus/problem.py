"""RFC 9457 problem details for the bus, in the gateway's shape.

``{"type": "urn:nops:bus:problem:<code>", "title", "status", "detail",
"request_id", ["reasons"], ...extra}`` with ``application/problem+json``,
built by the services' shared :mod:`problemjson`.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

import problemjson
from bus.errors import BusError
from problemjson import PROBLEM_CONTENT_TYPE

__all__ = ["PROBLEM_CONTENT_TYPE", "PROBLEM_TYPE_BASE", "problem_response", "problem_type"]

#: ``type`` URIs are stable identifiers, one per error code.
PROBLEM_TYPE_BASE: Final = "urn:nops:bus:problem:"


def problem_type(code: str) -> str:
    return PROBLEM_TYPE_BASE + code


def problem_response(error: BusError, *, request_id: str) -> web.Response:
    return problemjson.problem_response(error, request_id=request_id, type_base=PROBLEM_TYPE_BASE)
