"""The gateway against its OpenAPI document, live: real HTTP, real OPA, a real upstream.

Every request is signed (RFC 9421, a tenant key) and carries a credential:
the admin key on ``/_admin/``, an agent API key elsewhere, so cases reach
the admin handlers and, through the whole pipeline, the upstream. Valid
and invalid cases must get documented answers, never a 5xx; every answer
of the gateway's own is problem+json.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import requests
import schemathesis
from aiohttp import web
from schemathesis import GenerationMode
from schemathesis.specs.openapi.schemas import OpenApiSchema

from gateway.admin import hash_secret as admin_hash
from gateway.apikeys import hash_secret as api_key_hash
from gateway.app import create_app
from gateway.client import sign_request
from gateway.echo import create_echo_app
from gateway.server import GatewayRunner
from tests.conftest import TEST_SECRETS, OpaProcess, gateway_config
from tests.contractkit import CHECKS, GATEWAY_DOC, SETTINGS
from tests.livethread import LiveServer

if TYPE_CHECKING:
    # schemathesis names the type of an OpenAPI case for type checkers only.
    from schemathesis.specs.openapi.schemas import OpenApiCase

ADMIN_SECRET = "contract-admin-secret-0123456789"
API_KEY_SECRET = "contract-agent-secret-0123456789"
#: ``echo`` is anonymous; ``bus`` (a route the policy data knows: GET and POST for
#: any credentialed caller) needs a signature and an API key, and leads to the echo
#: upstream here.
ROUTES = ["echo", "bus"]


def _schema(mode: GenerationMode) -> OpenApiSchema:
    """The gateway's document, with the route names of this test's config."""
    document = json.loads(GATEWAY_DOC.read_text())
    route = document["paths"]["/{route}/{path}"]["parameters"][0]
    route["schema"] = {"type": "string", "enum": ROUTES}
    schema = schemathesis.openapi.from_dict(document)
    schema.config.generation.update(modes=[mode])
    return schema


positive = _schema(GenerationMode.POSITIVE)
negative = _schema(GenerationMode.NEGATIVE).exclude(path=["/health", "/_readyz"])


class SignAndAuthenticate(requests.auth.AuthBase):
    """Sign the request as sent (acme-k1); with ``credential``, add the one its path needs."""

    def __init__(self, *, credential: bool) -> None:
        self.credential = credential

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        assert request.url is not None
        assert request.method is not None
        if self.credential and request.path_url.startswith("/_admin"):
            request.headers["Authorization"] = f"Bearer contract.{ADMIN_SECRET}"
        elif self.credential:
            request.headers["Authorization"] = f"ApiKey contract-agent.{API_KEY_SECRET}"
        raw = request.body or b""
        body = raw.encode() if isinstance(raw, str) else raw
        assert isinstance(body, bytes), "schemathesis sends whole bodies, never streams"
        headers = [
            (name, value if isinstance(value, str) else value.decode("latin-1"))
            for name, value in request.headers.items()
        ]
        request.headers.update(
            sign_request(
                request.method,
                request.url,
                headers,
                body,
                keyid="acme-k1",
                secret=TEST_SECRETS["acme-k1"],
            )
        )
        return request


@pytest.fixture(scope="module")
def live_gateway(opa: OpaProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A gateway (and its echo upstream) served from a thread, on the session OPA."""
    audit = tmp_path_factory.mktemp("contract-audit")

    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[web.Application]:
        echo = web.AppRunner(create_echo_app())
        await echo.setup()
        site = web.TCPSite(echo, "127.0.0.1", 0)
        await site.start()
        port = echo.addresses[0][1]
        upstream = f"http://127.0.0.1:{port}"
        config = gateway_config(
            opa.url,
            upstream,
            admin={
                "keys": [
                    {"id": "contract", "role": "SUPER_ADMIN", "hash": admin_hash(ADMIN_SECRET)}
                ]
            },
            api_keys=[
                {"id": "contract-agent", "tenant": "acme", "hash": api_key_hash(API_KEY_SECRET)}
            ],
            routes=[
                {
                    "name": "echo",
                    "prefix": "/echo/",
                    "upstream": upstream,
                    "require_signature": False,
                    "auth": "none",
                },
                {"name": "bus", "prefix": "/bus/", "upstream": upstream, "auth": "api_key"},
            ],
            audit={"path": str(audit / "audit.jsonl"), "spool_path": str(audit / "spool.jsonl")},
        )
        try:
            yield create_app(config)
        finally:
            await echo.cleanup()

    server = LiveServer(serve, runner=GatewayRunner).start()
    yield server
    server.stop()


@positive.parametrize()
@SETTINGS
def test_valid_requests(case: OpenApiCase, live_gateway: LiveServer) -> None:
    """Signed, credentialed valid requests get documented answers, never a 5xx."""
    auth = SignAndAuthenticate(credential=True)
    case.call_and_validate(base_url=live_gateway.url, checks=CHECKS, auth=auth)


@negative.parametrize()
@SETTINGS
def test_invalid_requests(case: OpenApiCase, live_gateway: LiveServer) -> None:
    """Invalid requests are refused with a documented 4xx problem, never a 5xx.

    Signed, but with only the credentials the case itself carries: a case
    that leaves the credential out must be refused for it.
    """
    auth = SignAndAuthenticate(credential=False)
    case.call_and_validate(base_url=live_gateway.url, checks=CHECKS, auth=auth)


@pytest.mark.parametrize(
    ("method", "body"),
    [pytest.param("GET", None, id="get"), pytest.param("POST", {"x": [1, 2]}, id="post-body")],
)
def test_signed_cases_reach_the_upstream(live_gateway: LiveServer, method: str, body: Any) -> None:
    """The signing hook signs what schemathesis sends: a case passes the whole pipeline."""
    operation = positive["/{route}/{path}"][method]
    kwargs: dict[str, Any] = {"path_parameters": {"route": "bus", "path": "contract"}}
    if body is not None:
        kwargs.update(body=body, media_type="application/json")
    case = operation.Case(**kwargs)
    response = case.call(base_url=live_gateway.url, auth=SignAndAuthenticate(credential=True))
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["method"] == method
    assert echoed["path"] == "/bus/contract"
    assert echoed["headers"]["x-nops-tenant"] == "acme"  # the API key's verified tenant


def test_unsigned_case_is_refused(live_gateway: LiveServer) -> None:
    """Without the hook the same case is a 401 problem: the signature is what let it through."""
    case = positive["/{route}/{path}"]["GET"].Case(
        path_parameters={"route": "bus", "path": "contract"}
    )
    response = case.call(base_url=live_gateway.url)
    assert response.status_code == 401
    assert response.json()["type"] == "urn:nops:gateway:problem:missing-signature"
