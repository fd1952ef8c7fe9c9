"""RFC 9457 problem details: the only place errors become HTTP responses.

The body and the base class are shared with the bus and the registry
(:mod:`problemjson`); the gateway's ``type`` is ``urn:nops:gateway:problem:<code>``.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

import problemjson
from gateway.errors import GatewayError
from problemjson import PROBLEM_CONTENT_TYPE

__all__ = ["PROBLEM_CONTENT_TYPE", "PROBLEM_TYPE_BASE", "problem_response", "problem_type"]

#: ``type`` URIs are stable identifiers, one per error code.
PROBLEM_TYPE_BASE: Final = "urn:nops:gateway:problem:"


def problem_type(code: str) -> str:
    return PROBLEM_TYPE_BASE + code


def problem_response(error: GatewayError, *, request_id: str) -> web.Response:
    return problemjson.problem_response(error, request_id=request_id, type_base=PROBLEM_TYPE_BASE)
