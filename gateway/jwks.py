"""JWK Sets: fetched per issuer, parsed into verification keys, cached with rotation.

A :class:`JwksCache` holds one issuer's keys as ``kid -> alg -> key``. Each
key is bound at load time to the algorithms it may verify: those in the
issuer's allow-list that match its key type and curve (RSA for RS*/PS*, EC
P-256 for ES256, P-384 for ES384, OKP Ed25519 for EdDSA) and, when the JWK
names one, its own ``alg``. Symmetric (``oct``) keys, keys carrying private
members, keys not for signatures and RSA keys under 2048 bits are skipped.

Refreshing follows three rules (RFC 8725 §3.10, "no fetch storm"):

- single flight: one fetch at a time, shared by every caller that waits on it;
- an unknown ``kid`` triggers a fetch at most once per ``min_refresh_s``, so
  tokens with random ``kid`` values cannot make the gateway hammer the issuer;
- keys older than ``max_age_s`` are refreshed in the background while the
  current keys keep serving, and a failed fetch keeps the old keys (stale
  beats unavailable). A document with no usable key counts as a failed fetch.

The fetchers read from an https URL (redirects followed only within the same
origin, a time limit, a size cap) or from a local file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import aiohttp
import yarl
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt import PyJWK
from jwt.exceptions import PyJWTError

__all__ = [
    "FileJwksFetcher",
    "HttpJwksFetcher",
    "JwksCache",
    "JwksError",
    "JwksFetcher",
    "JwksUnavailable",
    "KeyEntry",
    "parse_jwks",
]

_log = logging.getLogger("gateway.jwks")

#: The keys of one ``kid``: the algorithms it may verify, each bound to the key.
KeyEntry = Mapping[str, PyJWK]
JwksFetcher = Callable[[], Awaitable[bytes]]

#: alg -> (kty, crv): the only key shape each algorithm may verify with.
KEY_SHAPES: Final[Mapping[str, tuple[str, str | None]]] = MappingProxyType(
    {
        "RS256": ("RSA", None),
        "RS384": ("RSA", None),
        "RS512": ("RSA", None),
        "PS256": ("RSA", None),
        "PS384": ("RSA", None),
        "PS512": ("RSA", None),
        "ES256": ("EC", "P-256"),
        "ES384": ("EC", "P-384"),
        "EdDSA": ("OKP", "Ed25519"),
    }
)
# SECURITY: a JWKS is public; one that carries private or symmetric key
# material is broken and none of its keys is trusted for that key.
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_MIN_RSA_BITS: Final = 2048
_MAX_KEYS: Final = 100
_MAX_KID_CHARS: Final = 256
_MAX_REDIRECTS: Final = 3
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


class JwksError(Exception):
    """A JWK Set could not be fetched or read; the message is safe to log."""


class JwksUnavailable(Exception):
    """No keys were ever loaded for an issuer and the last fetch failed."""


def parse_jwks(document: bytes, algorithms: Collection[str], *, issuer: str) -> dict[str, KeyEntry]:
    """Read a JWK Set into ``kid -> alg -> key`` for the allowed asymmetric ``algorithms``."""
    try:
        data = json.loads(document)
    except (ValueError, RecursionError):
        raise JwksError("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError('not a JWK Set (no "keys" array)')
    if len(data["keys"]) > _MAX_KEYS:
        raise JwksError(f"more than {_MAX_KEYS} keys")
    keys: dict[str, dict[str, PyJWK]] = {}
    for jwk in data["keys"]:
        kid, bound = _bind(jwk, algorithms, issuer=issuer)
        if bound:
            entry = keys.setdefault(kid, {})
            for alg, key in bound.items():
                entry.setdefault(alg, key)
    if not keys:
        raise JwksError("no usable key")
    return {kid: MappingProxyType(entry) for kid, entry in keys.items()}


def _bind(jwk: Any, algorithms: Collection[str], *, issuer: str) -> tuple[str, dict[str, PyJWK]]:
    """The ``kid`` of one JWK and the allowed algorithms it can verify, each bound to it."""
    if not isinstance(jwk, dict):
        return "", {}
    kid = jwk.get("kid", "")
    if not isinstance(kid, str) or len(kid) > _MAX_KID_CHARS:
        _log.warning("JWKS key skipped: bad kid", extra={"issuer": issuer})
        return "", {}
    skip = _unusable(jwk)
    if skip:
        _log.warning(f"JWKS key skipped: {skip}", extra={"issuer": issuer, "kid": kid})
        return kid, {}
    bound: dict[str, PyJWK] = {}
    for alg in algorithms:
        shape = KEY_SHAPES.get(alg)
        if shape is None or (jwk.get("kty"), jwk.get("crv")) != shape:
            continue
        if "alg" in jwk and jwk["alg"] != alg:
            continue  # SECURITY: a key that names its algorithm verifies only that one
        try:
            key = PyJWK(jwk, algorithm=alg)
        except PyJWTError:
            _log.warning("JWKS key skipped: invalid", extra={"issuer": issuer, "kid": kid})
            return kid, {}
        if isinstance(key.key, RSAPublicKey) and key.key.key_size < _MIN_RSA_BITS:
            _log.warning("JWKS key skipped: RSA too short", extra={"issuer": issuer, "kid": kid})
            return kid, {}
        bound[alg] = key
    return kid, bound


def _unusable(jwk: Mapping[str, Any]) -> str | None:
    if _PRIVATE_MEMBERS & jwk.keys():
        return "private or symmetric key material"
    if jwk.get("use", "sig") != "sig":
        return "not a signature key"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops does not allow verify"
    return None


class JwksCache:
    """One issuer's keys: single-flight refresh, rate-limited on unknown ``kid``, serve-stale."""

    def __init__(
        self,
        issuer: str,
        fetch: JwksFetcher,
        *,
        algorithms: Collection[str],
        clock: Callable[[], float],
        min_refresh_s: float,
        max_age_s: float,
    ) -> None:
        self.issuer = issuer
        self._fetch = fetch
        self._algorithms = tuple(algorithms)
        self._clock = clock
        self._min_refresh_s = min_refresh_s
        self._max_age_s = max_age_s
        self._keys: dict[str, KeyEntry] | None = None
        self._loaded_at = -math.inf
        self._last_attempt = -math.inf
        self._task: asyncio.Task[None] | None = None
        #: Fetch attempts so far (for metrics and tests).
        self.fetches = 0

    async def entry(self, kid: str) -> KeyEntry | None:
        """The keys published under ``kid``, or None when the issuer has no such key.

        Raises :class:`JwksUnavailable` when no key set was ever loaded.
        """
        now = self._clock()
        keys = self._keys
        if keys is not None and kid in keys:
            if now - self._loaded_at >= self._max_age_s:
                self._start_refresh(now)  # in the background; these keys serve meanwhile
            return keys[kid]
        self._start_refresh(now)
        if self._task is not None:
            # SECURITY: asyncio.wait, so a caller that goes away cannot cancel
            # the fetch every other waiter shares (and a shutdown that cancels
            # the fetch does not raise CancelledError into the waiters).
            await asyncio.wait((self._task,))
        if self._keys is None:
            raise JwksUnavailable(self.issuer)
        return self._keys.get(kid)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _start_refresh(self, now: float) -> None:
        # SECURITY: at most one fetch per min_refresh_s, whatever the tokens say.
        if self._task is None and now - self._last_attempt >= self._min_refresh_s:
            self._last_attempt = now
            self._task = asyncio.create_task(self._refresh(), name=f"jwks-refresh {self.issuer}")

    async def _refresh(self) -> None:
        self.fetches += 1
        try:
            keys = parse_jwks(await self._fetch(), self._algorithms, issuer=self.issuer)
        except JwksError as exc:
            _log.warning(
                "JWKS refresh failed; keeping the keys we have",
                extra={"issuer": self.issuer, "error": str(exc), "stale": self._keys is not None},
            )
        except Exception:  # noqa: BLE001 - a background refresh must never die unreported
            _log.exception("JWKS refresh failed unexpectedly", extra={"issuer": self.issuer})
        else:
            self._keys = keys
            self._loaded_at = self._clock()
            _log.info("JWKS loaded", extra={"issuer": self.issuer, "kids": sorted(keys)})
        finally:
            self._task = None


class HttpJwksFetcher:
    """GETs a JWK Set with a time limit and a size cap; redirects only within the origin."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, *, timeout_s: float, max_bytes: int
    ) -> None:
        self._session = session
        self._url = yarl.URL(url)
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes

    async def __call__(self) -> bytes:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._get()
        except TimeoutError:
            raise JwksError(f"no answer within {self._timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise JwksError(f"fetch failed ({type(exc).__name__})") from None

    async def _get(self) -> bytes:
        url = self._url
        for _ in range(_MAX_REDIRECTS + 1):
            async with self._session.get(
                url,
                allow_redirects=False,
                headers={"Accept": "application/jwk-set+json, application/json"},
            ) as response:
                if response.status in _REDIRECTS:
                    url = self._redirect_target(url, response.headers.get("Location", ""))
                    continue
                if response.status != 200:
                    raise JwksError(f"HTTP status {response.status}")
                if (response.content_length or 0) > self._max_bytes:
                    raise JwksError(f"larger than {self._max_bytes} bytes")
                body = bytearray()
                async for chunk in response.content.iter_chunked(16_384):
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise JwksError(f"larger than {self._max_bytes} bytes")
                return bytes(body)
        raise JwksError(f"more than {_MAX_REDIRECTS} redirects")

    def _redirect_target(self, current: yarl.URL, location: str) -> yarl.URL:
        try:
            target = current.join(yarl.URL(location))
        except ValueError:
            raise JwksError("redirect to an invalid URL") from None
        # SECURITY: keys come from the configured origin only; a redirect to
        # another host or scheme could hand the gateway an attacker's keys.
        if not location or target.origin() != self._url.origin():
            raise JwksError("redirected to another origin")
        return target


class FileJwksFetcher:
    """Reads a JWK Set from a local file (air-gapped installs); re-read on refresh."""

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self._path = path
        self._max_bytes = max_bytes

    async def __call__(self) -> bytes:
        try:
            data = await asyncio.to_thread(self._read)
        except OSError as exc:
            raise JwksError(f"cannot read the JWKS file ({type(exc).__name__})") from None
        return data

    def _read(self) -> bytes:
        with self._path.open("rb") as handle:
            data = handle.read(self._max_bytes + 1)
        if len(data) > self._max_bytes:
            raise JwksError(f"larger than {self._max_bytes} bytes")
        return data
