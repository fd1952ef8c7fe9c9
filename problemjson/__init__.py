"""RFC 9457 problem details shared by the gateway, the bus and the registry.

One error base class and one response builder; each service keeps its own
error hierarchy and its own ``type`` URN prefix (``urn:nops:<service>:problem:``)
and passes that prefix in. The body is::

    {"type": <type_base><code>, "title", "status", "detail", "request_id",
     ...problem_members()}

with ``application/problem+json``. A package of its own, depending only on
aiohttp and orjson: the bus does not import the gateway (a test holds it to
that), and neither service should pull in another's modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

import orjson
from aiohttp import web

__all__ = ["PROBLEM_CONTENT_TYPE", "ProblemError", "problem_response"]

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"


class ProblemError(Exception):
    """Base of every error that ends a request with a problem response.

    ``code`` is stable (it becomes the problem ``type``), ``status`` the HTTP
    status and ``title`` a short summary. ``detail`` is sent to the client
    verbatim: never a secret, a token or a stack trace.
    """

    code: ClassVar[str] = "internal-error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        reasons: Sequence[str] = (),
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.reasons = tuple(reasons)
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})

    def problem_members(self) -> dict[str, Any]:
        """The members after ``request_id``, in order: ``reasons`` (if any), then ``extra``."""
        members: dict[str, Any] = {}
        if self.reasons:
            members["reasons"] = list(self.reasons)
        members.update(self.extra)
        return members


def problem_response(error: ProblemError, *, request_id: str, type_base: str) -> web.Response:
    """``error`` as an ``application/problem+json`` response; ``type`` is ``type_base + code``."""
    body: dict[str, Any] = {
        "type": type_base + error.code,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "request_id": request_id,
    }
    body.update(error.problem_members())
    return web.Response(
        status=error.status,
        body=orjson.dumps(body),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=error.headers,
    )
