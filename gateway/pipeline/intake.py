"""The ``intake`` stage: header sanity, body size cap, path hygiene, route match.

Request ids and security headers are set by the HTTP edge
(:mod:`gateway.middleware`) so that they cover every response, including the
gateway's own endpoints; this stage does the checks that need no secret state.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from aiohttp import hdrs, web

from gateway.agents import parse_agent_target
from gateway.config import RouteConfig
from gateway.context import RequestContext
from gateway.egress_route import EgressSettings, egress_settings, parse_egress_target
from gateway.errors import MalformedRequest, MethodNotAllowed, NoRoute, PayloadTooLarge

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["ALLOWED_METHODS", "Intake", "build"]

ALLOWED_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# SECURITY: encoded separators, NUL and backslashes let a path mean one thing
# to the gateway's prefix match and another to the upstream; refuse them.
_BAD_RAW_PATH: Final = re.compile(r"%(?:2f|5c|00|25)|\\|\x00", re.IGNORECASE)
_DOT_SEGMENT: Final = re.compile(r"(?:^|/)\.{1,2}(?:/|$)")


class Intake:
    name = "intake"

    def __init__(
        self,
        routes: tuple[RouteConfig, ...],
        *,
        max_body: int,
        max_headers: int,
        egress: EgressSettings | None = None,
    ):
        # Longest prefix first, so /api/v2/ wins over /api/.
        self._routes = tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))
        self._max_body = max_body
        self._max_headers = max_headers
        self._egress = egress

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        request = ctx.request
        if request.method not in ALLOWED_METHODS:
            raise MethodNotAllowed(
                f"method {request.method} is not accepted",
                headers={hdrs.ALLOW: ", ".join(sorted(ALLOWED_METHODS))},
            )
        if len(request.raw_headers) > self._max_headers:
            raise MalformedRequest(f"more than {self._max_headers} header fields")
        self._check_body_size(request)
        path = self._checked_path(request)
        ctx.route = self._match(path)
        if ctx.route.kind == "agent":
            ctx.agent_target = parse_agent_target(ctx.route, request.raw_path)
        elif ctx.route.kind == "egress" and self._egress is not None:
            ctx.egress_target = parse_egress_target(ctx.route, request, self._egress)
        return None

    def _check_body_size(self, request: web.Request) -> None:
        if request.headers.getall(hdrs.CONTENT_LENGTH, []).__len__() > 1:
            raise MalformedRequest("more than one Content-Length header")
        length = request.content_length
        if length is not None and length > self._max_body:
            raise PayloadTooLarge(f"request body exceeds {self._max_body} bytes")

    @staticmethod
    def _checked_path(request: web.Request) -> str:
        raw = request.raw_path.split("?", 1)[0]
        if not raw.startswith("/"):
            raise MalformedRequest("request target must be an absolute path")
        if _BAD_RAW_PATH.search(raw):
            raise MalformedRequest("encoded separators, NUL or backslashes in the path")
        path = request.path
        if _DOT_SEGMENT.search(path) or "//" in path:
            raise MalformedRequest("dot segments or empty segments in the path")
        return path

    def _match(self, path: str) -> RouteConfig:
        for candidate in self._routes:
            if path.startswith(candidate.prefix) or path == candidate.prefix[:-1]:
                return candidate
        raise NoRoute(f"no route for {path}")


def build(deps: PipelineDeps) -> Intake:
    server = deps.config.server
    egress = None
    if any(route.kind == "egress" for route in deps.config.routes):
        egress = egress_settings(deps.config)
    return Intake(
        deps.config.routes,
        max_body=server.max_body_bytes,
        max_headers=server.max_header_count,
        egress=egress,
    )
