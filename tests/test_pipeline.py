"""The pipeline's shape, the policy input contract and the public API."""

from __future__ import annotations

import importlib
from typing import Any

import jsonschema
import pytest
from aiohttp.test_utils import make_mocked_request

import gateway
from gateway.config import RouteConfig
from gateway.context import RequestContext, Subject, Tenant
from gateway.pipeline import STAGE_ORDER, Pipeline
from gateway.policy.input import build_input
from gateway.policy.result import interpret, load_schema


class TestOrder:
    def test_stage_order_is_the_design(self) -> None:
        """Stages run in the order DESIGN.md gives, and only that order."""
        assert STAGE_ORDER == (
            "intake",
            "signature",
            "freshness",
            "ratelimit",
            "identity",
            "decision",
            "audit",
            "route",
        )

    def test_out_of_order_pipeline_is_refused(self) -> None:
        """A pipeline built in another order cannot exist."""

        class Named:
            def __init__(self, name: str) -> None:
                self.name = name

            async def run(self, ctx: RequestContext) -> None:
                return None

        with pytest.raises(ValueError, match="out of order"):
            Pipeline([Named(n) for n in reversed(STAGE_ORDER)])

    @pytest.mark.parametrize("name", STAGE_ORDER)
    def test_each_stage_is_its_own_module(self, name: str) -> None:
        """One module per stage, each with a build() factory."""
        module = importlib.import_module(f"gateway.pipeline.{name}")
        assert callable(module.build)


def _ctx(**changes: Any) -> RequestContext:
    request = make_mocked_request("POST", "/echo/a?x=1&x=2&y=")
    ctx = RequestContext(request=request, request_id="r", client_ip="203.0.113.7")
    for key, value in changes.items():
        setattr(ctx, key, value)
    return ctx


ROUTE = RouteConfig(name="echo", prefix="/echo/", upstream="http://127.0.0.1:1")


class TestPolicyInput:
    @pytest.mark.parametrize(
        "ctx",
        [
            pytest.param(_ctx(), id="anonymous-no-route"),
            pytest.param(_ctx(route=ROUTE), id="anonymous"),
            pytest.param(
                _ctx(
                    route=ROUTE,
                    tenant=Tenant("acme", "professional"),
                    subject=Subject("svc-42", ("agents:write",), ("OPERATOR",), "a1"),
                    signature={"keyid": "acme-k1", "alg": "hmac-sha256", "created": 1763800000},
                ),
                id="full",
            ),
        ],
    )
    def test_input_matches_the_versioned_schema(self, ctx: RequestContext) -> None:
        """What the gateway sends OPA always validates against policy-input.v1.json."""
        document = build_input(ctx)
        jsonschema.validate(document, load_schema("policy-input.v1.json"))
        assert document["request"]["query"] == {
            "x": ["1", "2"],
            "y": [""],
        }

    def test_input_carries_no_headers(self) -> None:
        """Headers (tokens, signatures) never reach the policy input."""
        assert "headers" not in build_input(_ctx(route=ROUTE))["request"]


class TestInterpret:
    @pytest.mark.parametrize(
        ("result", "allow", "reasons"),
        [
            pytest.param(
                {"allow": True, "reasons": ["allowed"], "obligations": {}},
                True,
                ("allowed",),
                id="allow",
            ),
            pytest.param(
                {"allow": False, "reasons": ["b", "a"], "obligations": {}},
                False,
                ("b", "a"),
                id="deny",
            ),
            pytest.param(None, False, ("decision_undefined",), id="undefined"),
            pytest.param(True, False, ("decision_ill_typed",), id="bare-bool"),
            pytest.param(
                {"allow": "true", "reasons": ["x"], "obligations": {}},
                False,
                ("decision_ill_typed",),
                id="string-allow",
            ),
            pytest.param(
                {"allow": True, "reasons": ["x"]},
                False,
                ("decision_ill_typed",),
                id="missing-obligations",
            ),
            pytest.param(
                {"allow": True, "reasons": ["x"], "obligations": {}, "extra": 1},
                False,
                ("decision_ill_typed",),
                id="extra-key",
            ),
            pytest.param(
                {"allow": True, "reasons": ["Bad Reason"], "obligations": {}},
                False,
                ("decision_ill_typed",),
                id="reason-format",
            ),
        ],
    )
    def test_only_a_well_typed_allow_allows(
        self, result: Any, allow: bool, reasons: tuple[str, ...]
    ) -> None:
        """Anything but a schema-valid decision is a deny with a reason."""
        decision = interpret(result, decision_id="d")
        assert decision.allow is allow
        assert decision.reasons == reasons


class TestPublicApi:
    @pytest.mark.parametrize(
        "module",
        [
            "gateway",
            "gateway.config",
            "gateway.errors",
            "gateway.problem",
            "gateway.proxy",
            "gateway.middleware",
            "gateway.app",
            "gateway.server",
            "gateway.logs",
            "gateway.policy",
            "gateway.pipeline",
        ],
    )
    def test_all_names_exist(self, module: str) -> None:
        """Every name in __all__ is defined; __all__ is the public API."""
        imported = importlib.import_module(module)
        for name in imported.__all__:
            assert hasattr(imported, name), f"{module}.{name}"

    def test_version(self) -> None:
        assert gateway.__all__ == ["__version__"]


class TestDecisionSchemaAgreement:
    @pytest.mark.parametrize(
        "result",
        [
            {"allow": True, "reasons": ["allowed"], "obligations": {}},
            {"allow": False, "reasons": ["a", "b_2"], "obligations": {"x": [1]}},
            {"allow": True, "reasons": [], "obligations": {}},
            {"allow": True, "reasons": ["ok"], "obligations": []},
            {"allow": 1, "reasons": ["ok"], "obligations": {}},
            {"allow": True, "reasons": ["9x"], "obligations": {}},
            {"allow": True, "reasons": ["ok", 3], "obligations": {}},
            {"allow": True, "reasons": "ok", "obligations": {}},
            {"allow": True, "reasons": ["ok"], "obligations": {}, "more": 1},
            {"allow": True, "reasons": ["ok"]},
            [],
            None,
            "allow",
        ],
    )
    def test_fast_check_agrees_with_the_schema(self, result: Any) -> None:
        """The hand-written check accepts exactly what decision.v1.json accepts."""
        from gateway.policy.result import is_well_typed

        schema_ok = jsonschema.Draft202012Validator(load_schema("decision.v1.json")).is_valid(
            result
        )
        assert is_well_typed(result) is schema_ok
