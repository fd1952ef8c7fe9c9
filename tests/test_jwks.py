"""JWK Sets: parsing into bound keys, the per-issuer cache, and the fetchers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gateway.jwks import (
    FileJwksFetcher,
    HttpJwksFetcher,
    JwksCache,
    JwksError,
    JwksUnavailable,
    parse_jwks,
)
from tests.conftest import PinnedClock as Clock
from tests.conftest import free_port
from tests.jwtissuer import FakeIssuer

DEFAULT_ALGS = ("RS256", "ES256", "EdDSA")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def clock() -> Clock:
    return Clock()


CacheFactory = Callable[..., JwksCache]


@pytest.fixture
async def make_cache(
    jwt_issuer: FakeIssuer, session: aiohttp.ClientSession, clock: Clock
) -> AsyncIterator[CacheFactory]:
    caches: list[JwksCache] = []

    def factory(url: str | None = None, **kwargs: Any) -> JwksCache:
        fetch = HttpJwksFetcher(
            session, url or jwt_issuer.jwks_url, timeout_s=2.0, max_bytes=65_536
        )
        options: dict[str, Any] = {"min_refresh_s": 30.0, "max_age_s": 600.0, **kwargs}
        cache = JwksCache(jwt_issuer.issuer, fetch, algorithms=DEFAULT_ALGS, clock=clock, **options)
        caches.append(cache)
        return cache

    yield factory
    for cache in caches:
        await cache.close()


def _jwks(*jwks: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(jwks)}).encode()


def _key(alg: str, kid: str = "k") -> dict[str, Any]:
    return FakeIssuer().add_key(alg, kid).jwk


def _without(jwk: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k not in names}


def _weak_rsa() -> dict[str, Any]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - under test
    return {**RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "k"}


def _private_rsa() -> dict[str, Any]:
    private = FakeIssuer().add_key("RS256").private
    return {**RSAAlgorithm.to_jwk(private, as_dict=True), "kid": "k", "alg": "RS256"}


class TestParseJwks:
    @pytest.mark.parametrize(
        ("make_jwk", "algorithms", "bound"),
        [
            pytest.param(lambda: _key("RS256"), DEFAULT_ALGS, ["RS256"], id="rsa-alg-rs256"),
            pytest.param(
                lambda: _without(_key("RS256"), "alg"),
                ("RS256", "PS256", "ES256"),
                ["PS256", "RS256"],
                id="rsa-without-alg-binds-every-rsa-alg",
            ),
            pytest.param(
                lambda: _key("RS256"), ("RS256", "PS256"), ["RS256"], id="jwk-alg-narrows"
            ),
            pytest.param(lambda: _key("ES256"), DEFAULT_ALGS, ["ES256"], id="ec-p256"),
            pytest.param(lambda: _key("EdDSA"), DEFAULT_ALGS, ["EdDSA"], id="okp-ed25519"),
            pytest.param(
                lambda: {**_key("ES384"), "alg": "ES256"}, DEFAULT_ALGS, [], id="p384-claims-es256"
            ),
            pytest.param(
                lambda: _without(_key("ES384"), "alg"), DEFAULT_ALGS, [], id="p384-not-allowed"
            ),
            pytest.param(lambda: _key("RS256"), ("ES256",), [], id="rsa-not-in-allow-list"),
            pytest.param(_private_rsa, DEFAULT_ALGS, [], id="private-members"),
            pytest.param(
                lambda: {"kty": "oct", "k": "c2VjcmV0", "kid": "k"}, DEFAULT_ALGS, [], id="oct"
            ),
            pytest.param(lambda: {**_key("RS256"), "use": "enc"}, DEFAULT_ALGS, [], id="use-enc"),
            pytest.param(
                lambda: {**_key("RS256"), "key_ops": ["encrypt"]}, DEFAULT_ALGS, [], id="key-ops"
            ),
            pytest.param(_weak_rsa, DEFAULT_ALGS, [], id="rsa-1024"),
            pytest.param(lambda: {**_key("RS256"), "n": "AQAB!"}, DEFAULT_ALGS, [], id="garbage"),
            pytest.param(lambda: {**_key("RS256"), "kid": 7}, DEFAULT_ALGS, [], id="kid-not-str"),
            pytest.param(lambda: {"kty": "XYZ", "kid": "k"}, DEFAULT_ALGS, [], id="unknown-kty"),
        ],
    )
    def test_keys_bind_only_to_matching_allowed_algorithms(
        self, make_jwk: Callable[[], dict[str, Any]], algorithms: tuple[str, ...], bound: list[str]
    ) -> None:
        """A key verifies only allowed algorithms of its own type, curve and alg."""
        good = _key(algorithms[0], "good")  # so the document always has a usable key
        keys = parse_jwks(_jwks(good, make_jwk()), algorithms, issuer="i")
        assert sorted(keys.get("k", {})) == bound

    @pytest.mark.parametrize(
        ("document", "message"),
        [
            pytest.param(b"<html>", "not JSON", id="not-json"),
            pytest.param(b"[]", "not a JWK Set", id="array"),
            pytest.param(b'{"keys": {}}', "not a JWK Set", id="keys-not-array"),
            pytest.param(_jwks(), "no usable key", id="empty"),
            pytest.param(_jwks({"kty": "oct", "k": "eA"}), "no usable key", id="only-unusable"),
            pytest.param(_jwks(*[{"kty": "RSA"}] * 101), "more than 100", id="too-many"),
        ],
    )
    def test_unusable_documents_are_errors(self, document: bytes, message: str) -> None:
        """A document that yields no key is a failed fetch, not an empty key set."""
        with pytest.raises(JwksError, match=message):
            parse_jwks(document, DEFAULT_ALGS, issuer="i")


class TestJwksCache:
    async def test_concurrent_first_use_shares_one_fetch(
        self, jwt_issuer: FakeIssuer, make_cache: CacheFactory
    ) -> None:
        """100 callers before anything is loaded cause exactly one fetch."""
        kid = next(iter(jwt_issuer.keys))
        cache = make_cache()
        entries = await asyncio.gather(*(cache.entry(kid) for _ in range(100)))
        assert all(entry is not None and "RS256" in entry for entry in entries)
        assert jwt_issuer.fetches == 1

    async def test_random_kids_fetch_at_most_once_per_interval(
        self, jwt_issuer: FakeIssuer, make_cache: CacheFactory, clock: Clock
    ) -> None:
        """Unknown kids refetch once per jwks_min_refresh_s, however many arrive."""
        cache = make_cache()
        await cache.entry(next(iter(jwt_issuer.keys)))
        randoms = [f"random-{i}" for i in range(100)]
        assert await asyncio.gather(*(cache.entry(k) for k in randoms)) == [None] * 100
        assert jwt_issuer.fetches == 1  # the load just now counts as the refresh
        clock.advance(30)
        assert await asyncio.gather(*(cache.entry(k) for k in randoms)) == [None] * 100
        assert jwt_issuer.fetches == 2
        clock.advance(29)
        assert await cache.entry("random-again") is None
        assert jwt_issuer.fetches == 2

    async def test_new_kid_is_picked_up_after_min_refresh(
        self, jwt_issuer: FakeIssuer, make_cache: CacheFactory, clock: Clock
    ) -> None:
        """Rotation: a kid added at the issuer is found once the interval has passed."""
        old = next(iter(jwt_issuer.keys))
        cache = make_cache()
        await cache.entry(old)
        new = jwt_issuer.add_key("ES256").kid
        jwt_issuer.remove_key(old)
        clock.advance(1)
        assert await cache.entry(new) is None
        clock.advance(30)
        assert await cache.entry(new) is not None
        assert await cache.entry(old) is None  # gone from the issuer, gone here
        assert jwt_issuer.fetches == 2

    async def test_old_keys_refresh_in_the_background(
        self, jwt_issuer: FakeIssuer, make_cache: CacheFactory, clock: Clock
    ) -> None:
        """Past max age a known kid answers at once while a refresh runs behind it."""
        kid = next(iter(jwt_issuer.keys))
        cache = make_cache()
        await cache.entry(kid)
        added = jwt_issuer.add_key("EdDSA").kid
        jwt_issuer.delay_s = 0.5
        clock.advance(600)
        started = time.monotonic()
        assert await cache.entry(kid) is not None
        assert time.monotonic() - started < 0.25
        # An unknown kid joins the refresh in flight instead of starting another.
        assert await cache.entry(added) is not None
        assert jwt_issuer.fetches == 2

    @pytest.mark.parametrize("outage", ["http-503", "server-gone"])
    async def test_failed_refresh_serves_stale_keys(
        self,
        jwt_issuer: FakeIssuer,
        make_cache: CacheFactory,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
        outage: str,
    ) -> None:
        """An issuer that is down leaves the keys we have in service, with a warning."""
        kid = next(iter(jwt_issuer.keys))
        cache = make_cache()
        await cache.entry(kid)
        if outage == "http-503":
            jwt_issuer.failing_status = 503
        else:
            await jwt_issuer.close()
        clock.advance(600)
        with caplog.at_level(logging.WARNING, logger="gateway.jwks"):
            assert await cache.entry(kid) is not None
            assert await cache.entry("unknown") is None  # waits for the failing refresh
        assert await cache.entry(kid) is not None
        warning = next(r for r in caplog.records if "keeping the keys" in r.getMessage())
        assert warning.__dict__["issuer"] == jwt_issuer.issuer
        assert warning.__dict__["stale"] is True

    async def test_issuer_never_reached_is_unavailable_without_a_storm(
        self, jwt_issuer: FakeIssuer, make_cache: CacheFactory, clock: Clock
    ) -> None:
        """No keys ever loaded: callers fail closed, and retries keep to the interval."""
        jwt_issuer.failing_status = 500
        kid = next(iter(jwt_issuer.keys))
        cache = make_cache()
        for _ in range(20):
            with pytest.raises(JwksUnavailable):
                await cache.entry(kid)
        assert jwt_issuer.fetches == 1
        jwt_issuer.failing_status = None
        clock.advance(30)
        assert await cache.entry(kid) is not None
        assert jwt_issuer.fetches == 2

    async def test_a_caller_going_away_does_not_cancel_the_shared_fetch(
        self, jwt_issuer: FakeIssuer, make_cache: CacheFactory
    ) -> None:
        """The fetch is shielded: cancelling one waiter leaves the others their answer."""
        kid = next(iter(jwt_issuer.keys))
        jwt_issuer.delay_s = 0.2
        cache = make_cache()
        first = asyncio.create_task(cache.entry(kid))
        second = asyncio.create_task(cache.entry(kid))
        await asyncio.sleep(0.05)
        first.cancel()
        assert await second is not None
        assert jwt_issuer.fetches == 1

    async def test_close_stops_a_refresh_in_flight(
        self, jwt_issuer: FakeIssuer, make_cache: CacheFactory
    ) -> None:
        """Shutdown does not wait for, or leak, a pending fetch."""
        jwt_issuer.delay_s = 5
        cache = make_cache()
        waiter = asyncio.create_task(cache.entry("k"))
        await asyncio.sleep(0.05)
        await cache.close()
        with pytest.raises(JwksUnavailable):
            await waiter


class TestHttpJwksFetcher:
    @pytest.mark.parametrize(
        ("path", "setup", "max_bytes", "message"),
        [
            pytest.param(
                "/jwks.json", {"failing_status": 503}, 65_536, "HTTP status 503", id="503"
            ),
            pytest.param("/jwks.json", {}, 100, "larger than 100", id="content-length-cap"),
            pytest.param("/big", {}, 65_536, "larger than 65536", id="streamed-cap"),
            pytest.param("/jwks.json", {"delay_s": 1.0}, 65_536, "no answer within", id="timeout"),
            pytest.param("/redirect", {"redirect_to": "/redirect"}, 65_536, "redirects", id="loop"),
            pytest.param(
                "/redirect",
                {"redirect_to": "https://127.0.0.1/jwks.json"},
                65_536,
                "another origin",
                id="redirect-to-https-same-host",
            ),
        ],
    )
    async def test_bad_answers_are_errors(
        self,
        jwt_issuer: FakeIssuer,
        session: aiohttp.ClientSession,
        path: str,
        setup: dict[str, Any],
        max_bytes: int,
        message: str,
    ) -> None:
        """Non-200, oversized, slow and looping answers fail the fetch with a reason."""
        for name, value in setup.items():
            setattr(jwt_issuer, name, value)
        fetch = HttpJwksFetcher(session, jwt_issuer.url(path), timeout_s=0.3, max_bytes=max_bytes)
        with pytest.raises(JwksError, match=message):
            await fetch()

    async def test_same_origin_redirect_is_followed(
        self, jwt_issuer: FakeIssuer, session: aiohttp.ClientSession
    ) -> None:
        """A redirect within the configured origin is followed."""
        fetch = HttpJwksFetcher(
            session, jwt_issuer.url("/redirect"), timeout_s=2.0, max_bytes=65_536
        )
        assert json.loads(await fetch()) == jwt_issuer.jwks()

    async def test_redirect_to_another_host_is_refused_unfetched(
        self, jwt_issuer: FakeIssuer, session: aiohttp.ClientSession
    ) -> None:
        """A redirect to another origin is not followed: its keys are never read."""
        attacker = await FakeIssuer("https://attacker.test/").start()
        attacker.add_key("RS256")
        try:
            jwt_issuer.redirect_to = attacker.jwks_url
            fetch = HttpJwksFetcher(
                session, jwt_issuer.url("/redirect"), timeout_s=2.0, max_bytes=65_536
            )
            with pytest.raises(JwksError, match="another origin"):
                await fetch()
            assert attacker.fetches == 0
        finally:
            await attacker.close()

    async def test_refused_connection_is_an_error(self, session: aiohttp.ClientSession) -> None:
        """Nothing listening: a fetch error, not an exception escaping the cache."""
        url = f"http://127.0.0.1:{free_port()}/jwks.json"
        fetch = HttpJwksFetcher(session, url, timeout_s=2.0, max_bytes=65_536)
        with pytest.raises(JwksError, match="fetch failed"):
            await fetch()


class TestFileJwksFetcher:
    async def test_reads_and_rereads_the_file(self, tmp_path: Path, clock: Clock) -> None:
        """A local JWKS file serves keys, and a replaced file rotates them."""
        path = tmp_path / "jwks.json"
        path.write_bytes(_jwks(_key("RS256", "one")))
        cache = JwksCache(
            "i",
            FileJwksFetcher(path, max_bytes=65_536),
            algorithms=DEFAULT_ALGS,
            clock=clock,
            min_refresh_s=30,
            max_age_s=600,
        )
        assert await cache.entry("one") is not None
        path.write_bytes(_jwks(_key("ES256", "two")))
        clock.advance(30)
        assert await cache.entry("two") is not None
        await cache.close()

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            pytest.param(None, "cannot read", id="missing"),
            pytest.param(b"x" * 200, "larger than 100", id="too-large"),
        ],
    )
    async def test_unreadable_files_are_errors(
        self, tmp_path: Path, content: bytes | None, message: str
    ) -> None:
        """A missing or oversized file fails the fetch."""
        path = tmp_path / "jwks.json"
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(JwksError, match=message):
            await FileJwksFetcher(path, max_bytes=100)()
