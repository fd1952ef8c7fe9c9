"""The signature stage: RFC 9421 vectors, the signature base, and the attack table end to end."""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from http_sfv.item import Item

from gateway.app import METRICS
from gateway.client import new_secret, sign_request, signing_middleware
from gateway.httpsig import (
    ComponentError,
    MalformedFields,
    Message,
    content_digest,
    hmac_sha256,
    parse_signature,
    signature_base,
)
from tests.conftest import TEST_SECRETS, GatewayFactory, PinnedClock, Signer
from tests.jwtissuer import AUDIENCE, FakeIssuer
from tests.problems import assert_problem
from tests.rawhttp import raw_request

Client = TestClient[Any, Any]

# RFC 9421 Appendix B.1.4: the example shared secret "test-shared-secret".
RFC_SHARED_SECRET = base64.b64decode(
    "uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ=="
)
# RFC 9421 Appendix B.2: the test request.
RFC_HEADERS = [
    ("Host", "example.com"),
    ("Date", "Tue, 20 Apr 2021 02:07:55 GMT"),
    ("Content-Type", "application/json"),
    (
        "Content-Digest",
        "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
    ),
    ("Content-Length", "18"),
]
RFC_BODY = b'{"hello": "world"}'
# RFC 9421 Appendix B.2.5: signing the test request with hmac-sha256.
B25_INPUT = (
    'sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret"'
)
B25_SIGNATURE = "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:"
B25_BASE = (
    '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
    '"@authority": example.com\n'
    '"content-type": application/json\n'
    '"@signature-params": ("date" "@authority" "content-type")'
    ';created=1618884473;keyid="test-shared-secret"'
)
NOW = 1_800_000_000.0


def rfc_message() -> Message:
    return Message.from_url("POST", "https://example.com/foo?param=Value&Pet=dog", RFC_HEADERS)


def component(identifier: str, /, **params: Any) -> Item:
    item = Item(identifier)
    for key, value in params.items():
        item.params[key] = value
    return item


def base_line(message: Message, item: Item) -> str:
    """The signature base line of one component."""
    return signature_base(message, [item], "()").decode().split("\n")[0]


class TestRfc9421Vectors:
    def test_b25_signature_base_and_hmac(self) -> None:
        """The B.2.5 signature base is rebuilt byte for byte and its HMAC is the RFC's."""
        entry = parse_signature([B25_INPUT], [B25_SIGNATURE])
        base = signature_base(rfc_message(), entry.components, entry.params_value)
        assert base.decode() == B25_BASE
        assert hmac_sha256(RFC_SHARED_SECRET, base) == entry.signature
        assert entry.label == "sig-b25"
        assert entry.params == {"created": 1618884473, "keyid": "test-shared-secret"}

    def test_b25_client_helper_produces_the_rfc_fields(self) -> None:
        """gateway.client signs the test request exactly as RFC 9421 B.2.5 shows."""
        headers = sign_request(
            "POST",
            "https://example.com/foo?param=Value&Pet=dog",
            RFC_HEADERS,
            RFC_BODY,
            keyid="test-shared-secret",
            secret=RFC_SHARED_SECRET,
            created=1618884473,
            nonce=False,
            components=("date", "@authority", "content-type"),
            label="sig-b25",
        )
        assert headers == {"Signature-Input": B25_INPUT, "Signature": B25_SIGNATURE}

    def test_b2_content_digest(self) -> None:
        """The B.2 test request's sha-512 Content-Digest is computed the same."""
        assert content_digest(RFC_BODY, ["sha-512"]) == RFC_HEADERS[3][1]

    async def test_b25_request_verifies_in_the_gateway(
        self, make_gateway: GatewayFactory, upstream: TestServer
    ) -> None:
        """The B.2.5 request, sent raw, passes the signature stage and stops only for its nonce."""
        client = await make_gateway(
            clock=PinnedClock(1618884473),
            signature={"required_components": []},
            routes=[{"name": "foo", "prefix": "/foo/", "upstream": str(upstream.make_url("/"))}],
            tenants=[
                {
                    "id": "rfc",
                    "keys": [
                        {
                            "keyid": "test-shared-secret",
                            "secret": base64.b64encode(RFC_SHARED_SECRET).decode(),
                        }
                    ],
                }
            ],
            server={"trusted_proxies": ["127.0.0.1"]},
        )
        head = "".join(f"{name}: {value}\r\n" for name, value in RFC_HEADERS)
        raw = (
            "POST /foo?param=Value&Pet=dog HTTP/1.1\r\n"
            f"{head}X-Forwarded-Proto: https\r\n"
            f"Signature-Input: {B25_INPUT}\r\nSignature: {B25_SIGNATURE}\r\n\r\n"
        ).encode() + RFC_BODY
        status, _, body = await raw_request(client, raw)
        assert status == 400, body
        assert b"nonce_missing" in body
        metrics = client.app[METRICS]
        assert metrics.denial_reasons[("freshness", "nonce_missing")] == 1


class TestSignatureBase:
    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            pytest.param("@method", '"@method": POST', id="method"),
            pytest.param(
                "@target-uri",
                '"@target-uri": https://example.com/foo?param=Value&Pet=dog',
                id="uri",
            ),
            pytest.param("@authority", '"@authority": example.com', id="authority"),
            pytest.param("@scheme", '"@scheme": https', id="scheme"),
            pytest.param(
                "@request-target", '"@request-target": /foo?param=Value&Pet=dog', id="target"
            ),
            pytest.param("@path", '"@path": /foo', id="path"),
            pytest.param("@query", '"@query": ?param=Value&Pet=dog', id="query"),
            pytest.param("content-length", '"content-length": 18', id="field"),
        ],
    )
    def test_derived_components(self, name: str, expected: str) -> None:
        """Each derived component has the value RFC 9421 §2.2 defines for the test request."""
        assert base_line(rfc_message(), component(name)) == expected

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            pytest.param("http://example.com:80/p", '"@authority": example.com', id="default-port"),
            pytest.param(
                "http://EXAMPLE.com:8080/p", '"@authority": example.com:8080', id="other-port"
            ),
            pytest.param("https://[::1]:443/p", '"@authority": [::1]', id="ipv6"),
        ],
    )
    def test_authority_is_normalized(self, url: str, expected: str) -> None:
        """@authority is lower-case without the scheme's default port."""
        assert base_line(Message.from_url("GET", url), component("@authority")) == expected

    def test_query_absent_is_a_lone_question_mark(self) -> None:
        """@query of a request without a query is '?' (RFC 9421 §2.2.7)."""
        message = Message.from_url("GET", "https://example.com/p")
        assert base_line(message, component("@query")) == '"@query": ?'

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            pytest.param("var", "this%20is%20a%20big%0Amultiline%20value", id="encoded"),
            pytest.param("bar", "with%20plus%20whitespace", id="plus-is-space"),
            pytest.param("fa%C3%A7ade%22%3A%20", "something", id="encoded-name"),
        ],
    )
    def test_query_param(self, name: str, expected: str) -> None:
        """@query-param decodes then re-encodes names and values (RFC 9421 §2.2.8 example)."""
        message = Message.from_url(
            "GET",
            "https://example.com/parameters?var=this%20is%20a%20big%0Amultiline%20value"
            "&bar=with+plus+whitespace&fa%C3%A7ade%22%3A%20=something",
        )
        line = base_line(message, component("@query-param", name=name))
        assert line == f'"@query-param";name="{name}": {expected}'

    def test_multiple_field_lines_are_joined(self) -> None:
        """Field lines are stripped and joined with ', ' (RFC 9421 §2.1 example)."""
        message = Message.from_url(
            "GET",
            "https://example.com/",
            [("Example-Header", "value, with, lots "), ("Example-Header", " of, commas")],
        )
        assert base_line(message, component("example-header")) == (
            '"example-header": value, with, lots, of, commas'
        )
        assert base_line(message, component("example-header", bs=True)) == (
            '"example-header";bs: :dmFsdWUsIHdpdGgsIGxvdHM=:, :b2YsIGNvbW1hcw==:'
        )

    def test_dictionary_member_by_key(self) -> None:
        """;key selects one member of a Dictionary field, re-serialized."""
        digest = content_digest(b"x", ["sha-256", "sha-512"])
        message = Message.from_url("GET", "https://example.com/", [("Content-Digest", digest)])
        line = base_line(message, component("content-digest", key="sha-256"))
        assert line == '"content-digest";key="sha-256": ' + digest.split(", ")[0].split("=", 1)[1]

    @pytest.mark.parametrize(
        ("item", "reason"),
        [
            pytest.param(component("x-absent"), "component_unavailable", id="absent-field"),
            pytest.param(
                component("@query-param", name="nope"), "component_unavailable", id="absent-param"
            ),
            pytest.param(component("@status"), "component_unsupported", id="status"),
            pytest.param(
                component("@signature-params"), "component_unsupported", id="signature-params"
            ),
            pytest.param(component("@method", req=True), "component_unsupported", id="req"),
            pytest.param(component("date", tr=True), "component_unsupported", id="trailer"),
            pytest.param(component("date", sf=True), "component_unsupported", id="sf-unknown"),
        ],
    )
    def test_unusable_components_fail(self, item: Item, reason: str) -> None:
        """A covered component the gateway cannot produce fails verification with a reason."""
        with pytest.raises(ComponentError) as caught:
            signature_base(rfc_message(), [item], "()")
        assert caught.value.reason == reason


class TestParse:
    @pytest.mark.parametrize(
        ("inputs", "signatures", "label", "reason"),
        [
            pytest.param(["sig1=("], ["sig1=:AA==:"], "", "signature_input_unparseable",
                         id="input"),
            pytest.param(['sig1=("@method")'], ["sig1=AA=="], "", "signature_unparseable",
                         id="sig"),
            pytest.param(['sig1="@method"'], ["sig1=:AA==:"], "", "signature_input_unparseable",
                         id="not-inner-list"),
            pytest.param(['sig1=("@method")'], ['sig1="AA=="'], "", "signature_unparseable",
                         id="not-bytes"),
            pytest.param(['sig1=("@method"), sig2=("@path")'], ["sig1=:AA==:, sig2=:AA==:"], "",
                         "multiple_signatures", id="two-signatures"),
            pytest.param(['sig1=("@method")'], ["sig2=:AA==:"], "", "signature_label_mismatch",
                         id="label-mismatch"),
            pytest.param(['sig1=("@method")'], ["sig1=:AA==:"], "gw", "label_not_found",
                         id="configured-label-absent"),
            pytest.param(['sig1=("@METHOD")'], ["sig1=:AA==:"], "", "signature_input_unparseable",
                         id="upper-case"),
            pytest.param(["sig1=(date)"], ["sig1=:AA==:"], "", "signature_input_unparseable",
                         id="token-not-string"),
            pytest.param(['sig1=("date" "date")'], ["sig1=:AA==:"], "", "duplicate_component",
                         id="duplicate"),
            pytest.param(["sig1=()"], ["sig1=:AA==:, sig1=:AA==:x"], "", "signature_unparseable",
                         id="trailing-garbage"),
        ],
    )  # fmt: skip
    def test_malformed_fields(
        self, inputs: list[str], signatures: list[str], label: str, reason: str
    ) -> None:
        """Fields that are not RFC 9421 / RFC 8941 are refused with a reason."""
        with pytest.raises(MalformedFields) as caught:
            parse_signature(inputs, signatures, label)
        assert caught.value.reason == reason

    def test_configured_label_picks_one_of_several(self) -> None:
        """With a configured label, other signatures (e.g. a proxy's) are ignored."""
        entry = parse_signature(
            ['proxy=("@path");keyid="p", gw=("@method");keyid="k"'],
            ["proxy=:AA==:, gw=:AQ==:"],
            "gw",
        )
        assert entry.label == "gw"
        assert entry.signature == b"\x01"

    def test_field_lines_are_combined(self) -> None:
        """Signature-Input split over two field lines is one dictionary."""
        entry = parse_signature(['a=("@path")', 'b=("@method")'], ["b=:AQ==:"], "b")
        assert entry.params_value == '("@method")'


def signed_echo(**extra: Any) -> dict[str, Any]:
    """Routes where echo requires a signature (and the policy lets anyone through)."""
    return {
        "routes": [
            {
                "name": "echo",
                "prefix": "/echo/",
                "upstream": extra["upstream"],
                "auth": "none",
                "require_signature": True,
            },
            {
                "name": "readonly",
                "prefix": "/readonly/",
                "upstream": extra["upstream"],
                "auth": "none",
                "require_signature": False,
            },
        ]
    }


@pytest.fixture
async def signed_gateway(
    make_gateway: GatewayFactory, upstream: TestServer
) -> tuple[Client, PinnedClock]:
    """A gateway whose echo route requires signatures, on a pinned clock."""
    clock = PinnedClock(NOW)
    client = await make_gateway(
        clock=clock, **signed_echo(upstream=str(upstream.make_url("/")).rstrip("/"))
    )
    return client, clock


BODY = b'{"task": "summarise", "items": [1, 2, 3]}'


async def attack(client: Client, clock: PinnedClock, case: str) -> Any:
    """Send one request of the attack table and return the response."""
    signer = Signer(client, clock=clock)
    path = "/echo/tasks?x=1"
    if case == "valid":
        return await signer.request("POST", path, data=BODY)
    if case == "tampered-body":
        headers = signer.sign("POST", path, BODY)
        return await client.post(path, data=BODY.replace(b"1", b"9"), headers=headers)
    if case == "tampered-digest":
        headers = signer.sign("POST", path, BODY)
        forged = BODY + b" "
        headers["Content-Digest"] = content_digest(forged)
        return await client.post(path, data=forged, headers=headers)
    if case == "tampered-path":
        headers = signer.sign("POST", path, BODY)
        return await client.post("/echo/admin?x=1", data=BODY, headers=headers)
    if case == "tampered-query":
        headers = signer.sign("POST", path, BODY)
        return await client.post("/echo/tasks?x=2", data=BODY, headers=headers)
    if case == "tampered-method":
        headers = signer.sign("POST", path, BODY)
        return await client.put(path, data=BODY, headers=headers)
    if case == "dropped-digest":
        return await signer.request("POST", path, data=BODY, components=("@method", "@target-uri"))
    if case == "dropped-method":
        return await signer.request(
            "POST", path, data=BODY, components=("@target-uri", "content-digest")
        )
    if case == "wrong-key":
        return await Signer(client, secret=TEST_SECRETS["globex-k1"], clock=clock).request(
            "POST", path, data=BODY
        )
    if case == "unknown-keyid":
        return await Signer(client, "nobody-k1", secret=b"k" * 32, clock=clock).request(
            "POST", path, data=BODY
        )
    if case == "alg-mismatch":
        return await signer.request("POST", path, data=BODY, alg="rsa-pss-sha512")
    if case == "alg-none":
        return await signer.request("POST", path, data=BODY, alg="none")
    if case == "created-future":
        return await signer.request("POST", path, data=BODY, created=NOW + 301)
    if case == "created-old":
        return await signer.request("POST", path, data=BODY, created=NOW - 301)
    if case == "created-missing":
        return await signer.request("POST", path, data=BODY, created=False)
    if case == "expires-passed":
        return await signer.request("POST", path, data=BODY, expires=NOW - 1)
    if case == "nonce-missing":
        return await signer.request("POST", path, data=BODY, nonce=False)
    if case == "nonce-too-long":
        return await signer.request("POST", path, data=BODY, nonce="n" * 129)
    if case == "replayed-nonce":
        headers = signer.sign("POST", path, BODY)
        first = await client.post(path, data=BODY, headers=headers)
        assert first.status == 200
        return await client.post(path, data=BODY, headers=headers)
    if case == "unsigned":
        return await client.post(path, data=BODY)
    if case == "signature-without-input":
        headers = signer.sign("POST", path, BODY)
        del headers["Signature-Input"]
        return await client.post(path, data=BODY, headers=headers)
    if case == "garbage-input":
        headers = signer.sign("POST", path, BODY)
        headers["Signature-Input"] = "sig1=(@method"
        return await client.post(path, data=BODY, headers=headers)
    if case == "keyid-missing":
        headers = signer.sign("POST", path, BODY)
        headers["Signature-Input"] = headers["Signature-Input"].replace('keyid="acme-k1";', "")
        return await client.post(path, data=BODY, headers=headers)
    if case == "created-not-integer":
        headers = signer.sign("POST", path, BODY)
        headers["Signature-Input"] = headers["Signature-Input"].replace(
            f"created={int(NOW)}", f'created="{int(NOW)}"'
        )
        return await client.post(path, data=BODY, headers=headers)
    if case == "digest-unsupported":
        md5_only = {"Content-Digest": "md5=:AAAA:"}
        headers = signer.sign("POST", path, BODY, headers=md5_only)
        return await client.post(path, data=BODY, headers={**md5_only, **headers})
    raise AssertionError(case)


ATTACKS = [
    pytest.param("tampered-body", 401, "bad-signature", "digest_mismatch", id="tampered-body"),
    pytest.param("tampered-digest", 401, "bad-signature", "mac_mismatch", id="tampered-digest"),
    pytest.param("tampered-path", 401, "bad-signature", "mac_mismatch", id="tampered-path"),
    pytest.param("tampered-query", 401, "bad-signature", "mac_mismatch", id="tampered-query"),
    pytest.param("tampered-method", 401, "bad-signature", "mac_mismatch", id="tampered-method"),
    pytest.param("dropped-digest", 401, "bad-signature", "component_missing", id="dropped-digest"),
    pytest.param("dropped-method", 401, "bad-signature", "component_missing", id="dropped-method"),
    pytest.param("wrong-key", 401, "bad-signature", "mac_mismatch", id="wrong-key"),
    pytest.param("unknown-keyid", 401, "bad-signature", "unknown_key", id="unknown-keyid"),
    pytest.param("alg-mismatch", 401, "bad-signature", "alg_mismatch", id="alg-mismatch"),
    pytest.param("alg-none", 401, "bad-signature", "alg_mismatch", id="alg-none"),
    pytest.param("created-future", 401, "stale-request", "created_in_future", id="created-future"),
    pytest.param("created-old", 401, "stale-request", "created_too_old", id="created-old"),
    pytest.param("created-missing", 401, "stale-request", "created_missing", id="created-missing"),
    pytest.param("expires-passed", 401, "stale-request", "expired", id="expires-passed"),
    pytest.param("nonce-missing", 400, "malformed-signature", "nonce_missing", id="nonce-missing"),
    pytest.param("nonce-too-long", 400, "malformed-signature", "nonce_invalid", id="nonce-long"),
    pytest.param("replayed-nonce", 409, "replayed-nonce", "nonce_reused", id="replayed-nonce"),
    pytest.param("unsigned", 401, "missing-signature", "signature_missing", id="unsigned"),
    pytest.param(
        "signature-without-input",
        400,
        "malformed-signature",
        "signature_incomplete",
        id="signature-without-input",
    ),
    pytest.param(
        "garbage-input", 400, "malformed-signature", "signature_input_unparseable", id="garbage"
    ),
    pytest.param("keyid-missing", 400, "malformed-signature", "keyid_missing", id="no-keyid"),
    pytest.param(
        "created-not-integer", 400, "malformed-signature", "created_invalid", id="created-type"
    ),
    pytest.param(
        "digest-unsupported",
        400,
        "malformed-signature",
        "content_digest_unsupported",
        id="digest-md5",
    ),
]


class TestAttackTable:
    async def test_valid_request_reaches_upstream_with_its_body(
        self, signed_gateway: tuple[Client, PinnedClock]
    ) -> None:
        """A correctly signed request passes, and the upstream gets the verified bytes."""
        client, clock = signed_gateway
        response = await attack(client, clock, "valid")
        assert response.status == 200
        echoed = await response.json()
        assert echoed["body_sha256"] == hashlib.sha256(BODY).hexdigest()
        assert echoed["raw_path"] == "/echo/tasks?x=1"
        # The signature is the caller's proof to the gateway: consumed, not forwarded;
        # the upstream learns the verified tenant instead.
        assert "signature-input" not in echoed["headers"]
        assert "signature" not in echoed["headers"]
        assert echoed["headers"]["x-nops-tenant"] == "acme"

    @pytest.mark.parametrize(("case", "status", "code", "reason"), ATTACKS)
    async def test_attack_is_refused(
        self,
        signed_gateway: tuple[Client, PinnedClock],
        case: str,
        status: int,
        code: str,
        reason: str,
    ) -> None:
        """Each attack ends with its own problem type and reason, counted in metrics."""
        client, clock = signed_gateway
        response = await attack(client, clock, case)
        body = await assert_problem(response, status, code, [reason])
        assert "decision_id" not in body  # refused before the policy was asked
        stage = "freshness" if code in ("stale-request", "replayed-nonce") else "signature"
        if reason in ("nonce_missing", "nonce_invalid"):
            stage = "freshness"
        assert client.app[METRICS].denial_reasons[(stage, reason)] == 1
        if status == 401:
            assert response.headers["Accept-Signature"].startswith('sig1=("@method"')

    async def test_problem_never_echoes_signature_or_secret(
        self, signed_gateway: tuple[Client, PinnedClock], caplog: pytest.LogCaptureFixture
    ) -> None:
        """Neither the response nor a log line carries the signature value or the key."""
        client, clock = signed_gateway
        signer = Signer(client, secret=TEST_SECRETS["globex-k1"], clock=clock)
        headers = signer.sign("POST", "/echo/x", BODY)
        caplog.set_level(logging.DEBUG)
        response = await client.post("/echo/x", data=BODY, headers=headers)
        text = await response.text()
        mac = headers["Signature"].split("=", 1)[1].strip(":")
        for secret in (mac, base64.b64encode(TEST_SECRETS["acme-k1"]).decode()):
            assert secret not in text
            assert secret not in caplog.text

    @pytest.mark.parametrize(
        ("components", "status"),
        [
            pytest.param(
                ("@method", "@authority", "@path", "@query", "content-digest"), 200, id="parts"
            ),
            pytest.param(("@method", "@authority", "@path", "content-digest"), 401, id="no-query"),
        ],
    )
    async def test_target_uri_parts_stand_in_for_target_uri(
        self, signed_gateway: tuple[Client, PinnedClock], components: tuple[str, ...], status: int
    ) -> None:
        """@authority + @path + @query together satisfy the @target-uri requirement."""
        client, clock = signed_gateway
        signer = Signer(client, clock=clock)
        response = await signer.request("POST", "/echo/x?y=1", data=BODY, components=components)
        assert response.status == status

    @pytest.mark.parametrize(
        "options",
        [
            pytest.param({"alg": "hmac-sha256"}, id="explicit-alg"),
            pytest.param({"digest_algorithms": ("sha-512",)}, id="sha-512-digest"),
            pytest.param({"digest_algorithms": ("sha-256", "sha-512")}, id="both-digests"),
            pytest.param({"created": NOW + 299}, id="created-within-skew"),
            pytest.param({"created": NOW - 299}, id="created-within-age"),
            pytest.param({"expires": NOW + 10}, id="expires-ahead"),
            pytest.param(
                {"components": ("@method", "@target-uri", "content-digest", "content-type")},
                id="extra-component",
            ),
        ],
    )
    async def test_valid_variants_pass(
        self, signed_gateway: tuple[Client, PinnedClock], options: dict[str, Any]
    ) -> None:
        """Signatures that meet the requirements in other ways pass."""
        client, clock = signed_gateway
        signer = Signer(client, clock=clock)
        response = await signer.request(
            "POST", "/echo/x", data=BODY, headers={"Content-Type": "application/json"}, **options
        )
        assert response.status == 200, await response.text()

    async def test_body_over_cap_is_413(
        self, make_gateway: GatewayFactory, upstream: TestServer
    ) -> None:
        """The signature stage reads the body within server.max_body_bytes, even when chunked."""
        client = await make_gateway(
            server={"max_body_bytes": 1024},
            **signed_echo(upstream=str(upstream.make_url("/")).rstrip("/")),
        )
        body = b"z" * 4096
        headers = Signer(client).sign("POST", "/echo/x", body)

        async def chunks() -> Any:
            for start in range(0, len(body), 512):
                yield body[start : start + 512]

        response = await client.post("/echo/x", data=chunks(), headers=headers)
        await assert_problem(response, 413, "payload-too-large")

    async def test_get_without_body_needs_no_digest(
        self, signed_gateway: tuple[Client, PinnedClock]
    ) -> None:
        """content-digest is required only when the request has a body."""
        client, clock = signed_gateway
        response = await Signer(client, clock=clock).request("GET", "/echo/x")
        assert response.status == 200
        assert (await response.json())["body_bytes"] == 0


class TestKeys:
    @pytest.mark.parametrize(
        ("key", "grace_s", "status", "reason"),
        [
            pytest.param({"not_after": "2027-01-15T07:59:50Z"}, None, 401, "key_expired",
                         id="expired"),
            pytest.param({"not_after": "2027-01-15T07:59:50Z"}, 60, 200, None, id="in-grace"),
            pytest.param({"not_after": "2027-01-15T07:58:00Z"}, 60, 401, "key_expired",
                         id="past-grace"),
            pytest.param({"not_before": "2027-01-15T08:01:40Z"}, None, 401, "key_not_yet_valid",
                         id="not-yet-valid"),
            pytest.param({"not_before": "2027-01-15T07:00:00Z",
                          "not_after": "2027-01-15T09:00:00+01:00"}, None, 200, None,
                         id="inside-validity"),
        ],
    )  # fmt: skip
    async def test_key_validity_and_grace(
        self,
        make_gateway: GatewayFactory,
        key: dict[str, str],
        grace_s: int | None,
        status: int,
        reason: str | None,
    ) -> None:
        """A key verifies from not_before to not_after plus the tenant's grace period."""
        assert NOW == 1_800_000_000.0  # 2027-01-15T08:00:00Z
        secret = base64.b64encode(TEST_SECRETS["acme-k1"]).decode()
        tenant: dict[str, Any] = {
            "id": "acme",
            "keys": [{"keyid": "acme-k1", "secret": secret, **key}],
        }
        if grace_s is not None:
            tenant["grace_s"] = grace_s
        clock = PinnedClock(NOW)
        client = await make_gateway(clock=clock, tenants=[tenant])
        response = await Signer(client, clock=clock).request("POST", "/echo/x", data=BODY)
        if reason is None:
            assert response.status == status
        else:
            await assert_problem(response, status, "bad-signature", [reason])

    async def test_global_grace_applies_without_tenant_override(
        self, make_gateway: GatewayFactory
    ) -> None:
        """signature.grace_s is the grace of tenants that set none."""
        secret = base64.b64encode(TEST_SECRETS["acme-k1"]).decode()
        tenant = {
            "id": "acme",
            "keys": [{"keyid": "acme-k1", "secret": secret, "not_after": "2027-01-15T07:59:00Z"}],
        }
        clock = PinnedClock(NOW)
        client = await make_gateway(clock=clock, tenants=[tenant], signature={"grace_s": 120})
        response = await Signer(client, clock=clock).request("POST", "/echo/x", data=BODY)
        assert response.status == 200

    async def test_rotation_old_and_new_keys_both_verify(self, gateway: Client) -> None:
        """During rotation a tenant's old and new keys verify side by side."""
        for keyid in ("acme-k0", "acme-k1"):
            response = await Signer(gateway, keyid).request("POST", "/echo/x", data=BODY)
            assert response.status == 200


class TestAnonymousRoutes:
    async def test_unsigned_request_passes(self, gateway: Client) -> None:
        """A route with require_signature = false accepts an unsigned request."""
        response = await gateway.post("/echo/x", data=BODY)
        assert response.status == 200

    async def test_present_signature_must_verify(self, gateway: Client) -> None:
        """On such a route a signature that is present but wrong is still refused."""
        signer = Signer(gateway, secret=TEST_SECRETS["globex-k1"])
        response = await signer.request("POST", "/echo/x", data=BODY)
        await assert_problem(response, 401, "bad-signature", ["mac_mismatch"])

    async def test_signed_request_names_its_tenant(
        self, gateway: Client, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A verified signature sets the tenant, seen in the canonical log line."""
        caplog.set_level(logging.INFO, logger="gateway.request")
        response = await Signer(gateway, "globex-k1").request("GET", "/readonly/x")
        assert response.status == 200
        tenants = [getattr(r, "tenant", "-") for r in caplog.records if r.msg == "request"]
        assert tenants == ["globex"]


class TestPolicyInput:
    @pytest.mark.parametrize(
        ("keyid", "reason"),
        [
            pytest.param(
                "acme-k1",
                "tenant_acme_tier_professional_keyid_acme_k1_alg_hmac_sha256_created_1800000000",
                id="acme",
            ),
            pytest.param(
                "globex-k1",
                "tenant_globex_tier_free_keyid_globex_k1_alg_hmac_sha256_created_1800000000",
                id="globex",
            ),
            pytest.param(None, "tenant_null_tier_null_keyid_null_alg_null_created_null", id="anon"),
        ],
    )
    async def test_policy_sees_tenant_and_signature(
        self, make_gateway: GatewayFactory, keyid: str | None, reason: str
    ) -> None:
        """The policy input carries the signer's tenant, tier, keyid, alg and created."""
        clock = PinnedClock(NOW)
        # tests/fixtures/rego/test/echo_input.rego denies with the input as its reason.
        client = await make_gateway(clock=clock, policy={"decision_path": "test/echo/decision"})
        if keyid is None:
            response = await client.get("/echo/x")
        else:
            response = await Signer(client, keyid, clock=clock).request("GET", "/echo/x")
        await assert_problem(response, 403, "policy-denied", [reason])


class TestSignerAndToken:
    """The signature proves the tenant; the identity stage binds the token to it."""

    @pytest.mark.parametrize(
        ("keyid", "status", "code"),
        [
            pytest.param("acme-k1", 200, None, id="same-tenant"),
            pytest.param("globex-k1", 403, "tenant-mismatch", id="other-tenant"),
        ],
    )
    async def test_token_tenant_must_equal_signer(
        self,
        make_gateway: GatewayFactory,
        jwt_issuer: FakeIssuer,
        keyid: str,
        status: int,
        code: str | None,
    ) -> None:
        """An acme token on a request signed by globex is refused; signed by acme it passes."""
        issuer = {
            "issuer": jwt_issuer.issuer,
            "audiences": [AUDIENCE],
            "jwks_url": jwt_issuer.jwks_url,
        }
        client = await make_gateway(identity={"issuers": [issuer]})
        token = jwt_issuer.token()  # tenant acme, scope locked:read
        response = await Signer(client, keyid).request(
            "GET", "/locked/x", headers={"Authorization": f"Bearer {token}"}
        )
        if code is None:
            assert response.status == status
            assert (await response.json())["path"] == "/locked/x"
        else:
            await assert_problem(response, status, code, ["tenant_mismatch"])

    async def test_token_without_signature_is_refused_first(
        self, make_gateway: GatewayFactory, jwt_issuer: FakeIssuer
    ) -> None:
        """A valid token alone does not open a route that requires a signature."""
        issuer = {
            "issuer": jwt_issuer.issuer,
            "audiences": [AUDIENCE],
            "jwks_url": jwt_issuer.jwks_url,
        }
        client = await make_gateway(identity={"issuers": [issuer]})
        response = await client.get(
            "/locked/x", headers={"Authorization": f"Bearer {jwt_issuer.token()}"}
        )
        await assert_problem(response, 401, "missing-signature", ["signature_missing"])


class TestClientHelper:
    async def test_signing_middleware_signs_every_request(self, gateway: Client) -> None:
        """An aiohttp session with the signing middleware passes signature and freshness."""
        middleware = signing_middleware(keyid="acme-k1", secret=TEST_SECRETS["acme-k1"])
        for _ in range(3):  # a fresh nonce each time
            response = await gateway.get(
                "/locked/x", json={"hello": "world"}, middlewares=(middleware,)
            )
            # Signed and fresh: only the identity stage (no token) says no.
            await assert_problem(response, 401, "missing-credentials")

    def test_new_secret_is_32_random_bytes(self) -> None:
        """new_secret gives a base64 key of the size the keyring requires."""
        first, second = new_secret(), new_secret()
        assert len(base64.b64decode(first)) == 32
        assert first != second

    def test_body_changes_the_digest_only(self) -> None:
        """Without a body no Content-Digest is added; with one it is covered."""
        common: dict[str, Any] = {"keyid": "k", "secret": b"s" * 32, "created": 1, "nonce": "n"}
        without = sign_request("GET", "https://h/p", **common)
        with_body = sign_request("POST", "https://h/p", body=b"x", **common)
        assert "Content-Digest" not in without
        assert '"content-digest"' in with_body["Signature-Input"]
        assert with_body["Content-Digest"] == content_digest(b"x")
