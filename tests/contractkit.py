"""Shared parts of the contract tests (schemathesis against the live services).

The documents are the files the services serve (``*/openapi/*.json``).
Every case is checked for: no 5xx, a documented status code, a documented
content type and a body that matches the documented schema; cases made
from invalid data must also be refused with a 4xx. Example counts are
small and generation is derandomized, so a run is reproducible and takes
seconds.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import hypothesis
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

if TYPE_CHECKING:
    # schemathesis names the type of an OpenAPI case for type checkers only.
    from schemathesis.specs.openapi.schemas import OpenApiCase

ROOT: Final = Path(__file__).resolve().parents[1]
GATEWAY_DOC: Final = ROOT / "gateway" / "openapi" / "gateway.json"
REGISTRY_DOC: Final = ROOT / "registry" / "openapi" / "registry.json"
BUS_DOC: Final = ROOT / "bus" / "openapi" / "bus.json"

CHECKS: Final = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

#: Cases per API operation and generation mode: 25 keeps each service's run to
#: seconds; CONTRACT_EXAMPLES=500 (say) searches deeper by hand.
EXAMPLES: Final = int(os.environ.get("CONTRACT_EXAMPLES", "25"))
SETTINGS: Final = hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
#: For the state machines built from the documents' links.
STATEFUL_SETTINGS: Final = hypothesis.settings(
    max_examples=max(15, EXAMPLES // 2),
    stateful_step_count=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.generate],
)


def load(path: Path, *modes: GenerationMode) -> OpenApiSchema:
    """The document at ``path``, generating cases in ``modes`` only."""
    schema = schemathesis.openapi.from_path(path)
    schema.config.generation.update(modes=list(modes))
    return schema


def doc_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """Every (METHOD, path template) the document describes."""
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in methods
    }


@dataclass(frozen=True, slots=True)
class Step:
    """One call the state machine made: which operation, the status, the JSON body if any."""

    operation: str
    status: int
    body: Any
    #: What was sent: path parameters and JSON body (for a failure's message).
    sent: Any = None


def run_stateful(schema: OpenApiSchema, base_url: str) -> list[Step]:
    """Run the state machine built from ``schema``'s links against ``base_url``.

    Each scenario acts for a fresh tenant (``X-Nops-Tenant``), so the links
    stay within one tenant and a replayed scenario meets the same empty
    state as its first run. Returns every step, for the caller to check that
    the links were followed.
    """
    machine: Any = schema.as_state_machine()
    steps: list[Step] = []

    class Machine(machine):  # type: ignore[misc]  # schemathesis builds the base at run time
        def setup(self) -> None:
            self.tenant = "c" + uuid.uuid4().hex[:16]

        def get_call_kwargs(self, case: OpenApiCase) -> dict[str, Any]:
            return {"base_url": base_url, "headers": {"X-Nops-Tenant": self.tenant}}

        def after_call(self, response: Any, case: OpenApiCase) -> None:
            super().after_call(response, case)
            try:
                body = response.json()
            except ValueError:
                body = None
            operation = case.operation.definition.raw["operationId"]
            sent = {"path": case.path_parameters, "body": case.body}
            steps.append(Step(operation, response.status_code, body, sent))

        def validate_response(self, response: Any, case: OpenApiCase, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Machine.run(settings=STATEFUL_SETTINGS)
    return steps
