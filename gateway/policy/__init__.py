"""Policy engines: build the input document, ask the engine, interpret the answer.

Like opa-envoy-plugin, the three steps live apart: :mod:`.input` builds the
versioned input document, an engine (:mod:`.opa`) evaluates it, and
:mod:`.result` turns the raw answer into a :class:`~.engine.Decision` (an
undefined or ill-typed answer denies).
"""

from gateway.policy.engine import Decision, PolicyEngine, PolicyEngineError

__all__ = ["Decision", "PolicyEngine", "PolicyEngineError"]
