"""The reference engine: an OPA server over its REST Data API.

Talks through ``opa-python-client``'s :class:`AsyncOpaClient`, which keeps one
pooled aiohttp session (keep-alive connections, reused by every request).
Its own retries are switched off: a decision that cannot be had within
``timeout_s`` fails closed at once, and the caller may retry its
(idempotent) request.

Decisions, the hot path, are posted on that same session directly, to a URL
built once, with the input encoded and the answer decoded by orjson (the
client would use the standard library's json both ways).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
import orjson
import yarl
from opa_client.errors import PolicyNotFoundError
from opa_client.opa_async import AsyncOpaClient

from gateway.policy.engine import Decision, PolicyEngineError
from gateway.policy.result import interpret

__all__ = ["OpaEngine"]

_JSON: Final = {"Content-Type": "application/json"}


class OpaEngine:
    """Evaluates ``decision_path`` on the OPA server at ``url``."""

    def __init__(
        self, url: str, *, decision_path: str, timeout_s: float, require_bundle: bool = False
    ) -> None:
        parsed = yarl.URL(url)
        if parsed.host is None or parsed.port is None:
            raise ValueError(f"OPA URL needs a host and port: {url}")
        self.url = url
        package, _, rule = decision_path.rpartition("/")
        self._package = package
        self._rule = rule
        self._timeout_s = timeout_s
        #: An answer with no bundle revision is "no policy loaded", not a decision.
        self._require_bundle = require_bundle
        self._client = AsyncOpaClient(
            host=parsed.host,
            port=parsed.port,
            ssl=parsed.scheme == "https",
            retries=0,
            timeout=timeout_s,
        )
        self._started = False
        # The URL AsyncOpaClient.query_rule would build, once.
        path = f"/v1/data/{package.replace('.', '/')}/{rule}" if package else f"/v1/data/{rule}"
        self._decision_url = yarl.URL.build(
            scheme=parsed.scheme, host=parsed.host, port=parsed.port, path=path
        ).with_query({"provenance": "true"})

    async def start(self) -> None:
        await self._client._init_session()
        self._started = True

    async def decide(self, document: Mapping[str, Any], decision_id: str) -> Decision:
        if not self._started:
            await self.start()
        session: aiohttp.ClientSession = self._client._session
        body = orjson.dumps({"input": document})
        try:
            async with (
                asyncio.timeout(self._timeout_s),
                session.post(self._decision_url, data=body, headers=_JSON) as response,
            ):
                response.raise_for_status()
                answer = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # SECURITY: the engine could not answer; the caller fails closed.
            raise PolicyEngineError(type(exc).__name__) from None
        if not isinstance(answer, dict):
            raise PolicyEngineError("ValueError")
        revision = _revision(answer.get("provenance"))
        if self._require_bundle and not revision:
            # SECURITY: OPA answered before (or after losing) its bundle: every
            # rule is undefined there, which is an outage, not the policy's deny.
            raise PolicyEngineError("NoBundleActivated")
        return interpret(
            answer.get("result"),
            decision_id=decision_id,
            revision=revision,
            engine_decision_id=answer.get("decision_id"),
        )

    async def revision(self) -> str:
        """The revisions of the bundles OPA has activated now ("" when none).

        Read from ``data.system.bundles`` (each activated bundle's manifest),
        the same ``name=revision`` form as a decision's provenance.
        """
        if not self._started:
            await self.start()
        try:
            async with asyncio.timeout(self._timeout_s):
                answer: dict[str, Any] = await self._client.get_data("system/bundles")
        except PolicyNotFoundError:
            return ""  # no bundle activated: OPA loaded plain files
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PolicyEngineError(type(exc).__name__) from None
        bundles = answer.get("result")
        if not isinstance(bundles, Mapping):
            return ""
        return _revision(
            {
                "bundles": {
                    name: info.get("manifest", {}) if isinstance(info, Mapping) else {}
                    for name, info in bundles.items()
                }
            }
        )

    async def data(self, path: str) -> Any:
        """The document at ``data/<path>`` (None when undefined)."""
        if not self._started:
            await self.start()
        try:
            async with asyncio.timeout(self._timeout_s):
                answer: dict[str, Any] = await self._client.get_data(path)
        except PolicyNotFoundError:
            return None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PolicyEngineError(type(exc).__name__) from None
        return answer.get("result")

    async def healthy(self) -> bool:
        if not self._started:
            await self.start()
        result: bool = await self._client.check_health()
        return result

    async def close(self) -> None:
        await self._client.close_connection()


def _revision(provenance: Any) -> str:
    """``name=revision`` pairs of the bundles OPA reported, sorted; "" if none."""
    if not isinstance(provenance, Mapping):
        return ""
    bundles = provenance.get("bundles")
    if not isinstance(bundles, Mapping):
        return ""
    pairs = []
    for name, info in sorted(bundles.items()):
        revision = info.get("revision", "") if isinstance(info, Mapping) else ""
        pairs.append(f"{name}={revision}")
    return ",".join(pairs)
