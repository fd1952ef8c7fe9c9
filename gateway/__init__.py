"""NOPS Gateway: a policy-as-code HTTP gateway for AI agents.

Every request passes one ordered pipeline of stages (see
:mod:`gateway.pipeline`); Open Policy Agent takes the decision, and only an
allowed request is proxied.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
