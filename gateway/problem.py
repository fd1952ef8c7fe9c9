"""RFC 9457 problem details: the only place errors become HTTP responses.

The body and the base class are shared with the bus and the registry
(:mod:`gateway.rfc9457`); the gateway's ``type`` is ``urn:nops:gateway:problem:<code>``.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from gateway import rfc9457
from gateway.errors import GatewayError
from gateway.rfc9457 import PROBLEM_CONTENT_TYPE

__all__ = ["PROBLEM_CONTENT_TYPE", "PROBLEM_TYPE_BASE", "problem_response", "problem_type"]

#: ``type`` URIs are stable identifiers, one per error code.
PROBLEM_TYPE_BASE: Final = "urn:nops:gateway:problem:"


def problem_type(code: str) -> str:
    return PROBLEM_TYPE_BASE + code


def problem_response(error: GatewayError, *, request_id: str) -> web.Response:
    return rfc9457.problem_response(error, request_id=request_id, type_base=PROBLEM_TYPE_BASE)
