"""Tenants, keys and the signature/freshness config: parsed, checked, secrets read once."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import ConfigError, parse_config
from gateway.keyring import KeyState, build_keyring

SECRET = base64.b64encode(bytes(range(32))).decode()
KEY = {"keyid": "acme-k1", "secret": SECRET}


def tenants(*keys: dict[str, Any], **tenant: Any) -> dict[str, Any]:
    return {"tenants": [{"id": "acme", **tenant, "keys": list(keys)}]}


class TestConfig:
    def test_defaults(self) -> None:
        """No tenants, the default required components and a 300 s window."""
        config = parse_config({})
        assert config.tenants == ()
        assert config.signature.required_components == ("@method", "@target-uri", "content-digest")
        assert (config.freshness.max_skew_s, config.freshness.max_age_s) == (300, 300)
        assert config.freshness.nonce_ttl_s == 600
        assert config.freshness.nonce_store == "auto"

    def test_secret_is_not_in_repr(self) -> None:
        """An inline secret never shows in a repr (and so in a log of the config)."""
        config = parse_config(tenants(KEY))
        assert SECRET not in repr(config)

    @pytest.mark.parametrize(
        ("table", "key", "message"),
        [
            pytest.param({"tenants": [{"id": "ac:me"}]}, "tenants[0].id", "letters",
                         id="tenant-id"),
            pytest.param(tenants(tier="Gold"), "tenants[0].tier", "lower-case", id="tier"),
            pytest.param(tenants(grace_s=-1), "tenants[0].grace_s", ">= 0", id="grace"),
            pytest.param(
                {"tenants": [{"id": "a"}, {"id": "a"}]}, "tenants[1].id", "duplicate", id="dup-id"
            ),
            pytest.param(
                tenants({"keyid": "k:1", "secret": SECRET}),
                "tenants[0].keys[0].keyid",
                "letters",
                id="keyid",
            ),
            pytest.param(
                tenants({"keyid": "k1"}), "tenants[0].keys[0]", "exactly one", id="no-secret"
            ),
            pytest.param(
                tenants({"keyid": "k1", "secret": SECRET, "secret_env": "K"}),
                "tenants[0].keys[0]",
                "exactly one",
                id="two-secrets",
            ),
            pytest.param(
                tenants({"keyid": "k1", "secret_env": "NOPS_GATEWAY__X"}),
                "tenants[0].keys[0].secret_env",
                "reserved",
                id="env-prefix",
            ),
            pytest.param(
                tenants({**KEY, "alg": "hs256"}), "tenants[0].keys[0].alg", "one of", id="alg"
            ),
            pytest.param(
                tenants({**KEY, "not_after": "tomorrow"}),
                "tenants[0].keys[0].not_after",
                "RFC 3339",
                id="date",
            ),
            pytest.param(
                tenants({**KEY, "not_after": "2027-01-01T00:00:00"}),
                "tenants[0].keys[0].not_after",
                "offset",
                id="naive-date",
            ),
            pytest.param(
                tenants(
                    {**KEY, "not_before": "2027-01-02T00:00:00Z", "not_after": "2027-01-01T00:00Z"}
                ),
                "tenants[0].keys[0].not_after",
                "later",
                id="inverted-validity",
            ),
            pytest.param(
                {
                    "tenants": [
                        {"id": "a", "keys": [KEY]},
                        {"id": "b", "keys": [KEY]},
                    ]
                },
                "tenants[1].keys[0].keyid",
                "global",
                id="keyid-not-unique",
            ),
            pytest.param(
                {"signature": {"required_components": ["@status"]}},
                "signature.required_components[0]",
                "one of",
                id="component",
            ),
            pytest.param(
                {"signature": {"required_components": ["Content-Digest"]}},
                "signature.required_components[0]",
                "lower-case",
                id="component-case",
            ),
            pytest.param(
                {"signature": {"required_components": ["@method", "@method"]}},
                "signature.required_components",
                "twice",
                id="component-twice",
            ),
            pytest.param({"signature": {"label": "Sig"}}, "signature.label", "key", id="label"),
            pytest.param({"signature": {"grace_s": -5}}, "signature.grace_s", ">= 0", id="g-grace"),
            pytest.param({"freshness": {"max_age_s": 0}}, "freshness.max_age_s", "> 0", id="age"),
            pytest.param({"freshness": {"max_skew_s": -1}}, "freshness.max_skew_s", ">=", id="sk"),
            pytest.param(
                {"freshness": {"nonce_store": "disk"}}, "freshness.nonce_store", "one of", id="st"
            ),
            pytest.param(
                {"freshness": {"memory_max_nonces": 0}},
                "freshness.memory_max_nonces",
                "> 0",
                id="cap",
            ),
            pytest.param(
                {"routes": [{"name": "r", "prefix": "/r/", "upstream": "http://u",
                             "require_signature": "no"}]},
                "routes[0].require_signature",
                "true or false",
                id="require-signature",
            ),
        ],
    )  # fmt: skip
    def test_bad_values_name_the_key(self, table: dict[str, Any], key: str, message: str) -> None:
        """A bad tenant, key, signature or freshness value is refused naming its key."""
        with pytest.raises(ConfigError) as caught:
            parse_config(table)
        assert caught.value.key == key
        assert message in caught.value.message


class TestSecrets:
    def test_inline_env_and_file(self, tmp_path: Path) -> None:
        """All three sources give the same key bytes from base64 (whitespace ignored)."""
        path = tmp_path / "k"
        path.write_text(SECRET[:20] + "\n" + SECRET[20:] + "\n")
        config = parse_config(
            {
                "tenants": [
                    {
                        "id": "acme",
                        "tier": "professional",
                        "keys": [
                            {"keyid": "inline", "secret": SECRET},
                            {"keyid": "env", "secret_env": "ACME_KEY"},
                            {"keyid": "file", "secret_file": str(path)},
                        ],
                    }
                ]
            }
        )
        keyring = build_keyring(config, {"ACME_KEY": SECRET.rstrip("=")})
        assert len(keyring) == 3
        for keyid in ("inline", "env", "file"):
            key = keyring.get(keyid)
            assert key is not None
            assert key.secret == bytes(range(32))
            assert (key.tenant_id, key.tier, key.alg) == ("acme", "professional", "hmac-sha256")
            assert SECRET not in repr(key)
        assert keyring.get("nope") is None

    @pytest.mark.parametrize(
        ("key", "environ", "bad_key", "message"),
        [
            pytest.param({"secret_env": "MISSING"}, {}, "secret_env", "not set", id="env-missing"),
            pytest.param({"secret_file": "/nonexistent/k"}, {}, "secret_file", "cannot read",
                         id="file-missing"),
            pytest.param({"secret": "not base64!"}, {}, "secret", "base64", id="not-base64"),
            pytest.param({"secret": base64.b64encode(b"short").decode()}, {}, "secret",
                         "at least 32", id="too-short"),
            pytest.param({"secret_env": "K"}, {"K": "%%%"}, "secret_env", "base64", id="env-bad"),
        ],
    )  # fmt: skip
    def test_bad_secrets_name_the_key(
        self, key: dict[str, str], environ: dict[str, str], bad_key: str, message: str
    ) -> None:
        """A secret that is missing, unreadable, not base64 or short is a ConfigError."""
        config = parse_config(tenants({"keyid": "k1", **key}))
        with pytest.raises(ConfigError) as caught:
            build_keyring(config, environ)
        assert caught.value.key == f"tenants[0].keys[0].{bad_key}"
        assert message in caught.value.message
        assert "%%%" not in str(caught.value)

    def test_check_config_reports_missing_secret(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """gateway check-config fails, naming the key whose secret cannot be read."""
        path = tmp_path / "gateway.toml"
        path.write_text(
            'version = 1\n[[tenants]]\nid = "acme"\n'
            '[[tenants.keys]]\nkeyid = "acme-k1"\nsecret_env = "NOPS_TEST_UNSET_KEY_1"\n'
        )
        assert main(["check-config", str(path)]) == 2
        assert "tenants[0].keys[0].secret_env" in capsys.readouterr().err


class TestValidity:
    @pytest.mark.parametrize(
        ("now", "state"),
        [
            pytest.param(99, KeyState.NOT_YET_VALID, id="before"),
            pytest.param(100, KeyState.VALID, id="from"),
            pytest.param(200, KeyState.VALID, id="until"),
            pytest.param(230, KeyState.VALID, id="grace-edge"),
            pytest.param(231, KeyState.EXPIRED, id="after-grace"),
        ],
    )
    def test_window_and_grace(self, now: float, state: KeyState) -> None:
        """A key is valid from not_before to not_after + grace_s, inclusive."""
        config = parse_config(
            tenants(
                {
                    **KEY,
                    "not_before": "1970-01-01T00:01:40Z",
                    "not_after": "1970-01-01T00:03:20Z",
                },
                grace_s=30,
            )
        )
        key = build_keyring(config, {}).get("acme-k1")
        assert key is not None
        assert key.state(now) is state
