"""Config of the policy plane ([policy.cache], [policy.shadow], bundles) and its public API."""

from __future__ import annotations

import importlib

import pytest

from gateway.config import ConfigError, parse_config


class TestPolicyConfig:
    def test_defaults(self) -> None:
        """Cache on, shadow off, the watched directory as the development default."""
        policy = parse_config({}).policy
        assert (policy.cache.enabled, policy.shadow.enabled, policy.bundle_file) == (
            True,
            False,
            "",
        )

    @pytest.mark.parametrize(
        ("table", "key", "message"),
        [
            pytest.param(
                {"bundle_file": "b.tar.gz"},
                "policy.verification_key_file",
                "required with bundle_file",
                id="bundle-without-key",
            ),
            pytest.param({"signing_alg": "HS256"}, "policy.signing_alg", "one of", id="hmac"),
            pytest.param({"cache": {"ttl_s": 0}}, "policy.cache.ttl_s", "> 0", id="ttl"),
            pytest.param(
                {"cache": {"max_entries": 10, "max_entries_per_tenant": 11}},
                "policy.cache.max_entries_per_tenant",
                "<= max_entries",
                id="tenant-share",
            ),
            pytest.param(
                {"cache": {"revision_check_s": -1}},
                "policy.cache.revision_check_s",
                ">= 0",
                id="revision-check",
            ),
            pytest.param(
                {"cache": {"key_exclude": ["source..ip"]}},
                "policy.cache.key_exclude[0]",
                "dotted",
                id="exclude-path",
            ),
            pytest.param(
                {"shadow": {"sample_rate": 1.5}}, "policy.shadow.sample_rate", "between", id="rate"
            ),
            pytest.param(
                {"shadow": {"decision_path": "data.x.y"}},
                "policy.shadow.decision_path",
                "slash",
                id="shadow-path",
            ),
            pytest.param(
                {"shadow": {"url": "ftp://opa"}}, "policy.shadow.url", "http", id="shadow-url"
            ),
        ],
    )
    def test_bad_value_names_the_key(
        self, table: dict[str, object], key: str, message: str
    ) -> None:
        """Every fault in the policy plane's config names its dotted key."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"policy": table})
        assert caught.value.key == key
        assert message in caught.value.message


class TestPublicApi:
    @pytest.mark.parametrize(
        "module",
        [
            "gateway.admin",
            "gateway.admin.auth",
            "gateway.admin.rbac",
            "gateway.admin.routes",
            "gateway.policy.cache",
            "gateway.policy.shadow",
            "gateway.policy.stack",
            "gateway.policy.bundle_server",
            "gateway.policy.supervisor",
        ],
    )
    def test_all_names_exist(self, module: str) -> None:
        """Every name in __all__ is defined; __all__ is the public API."""
        imported = importlib.import_module(module)
        for name in imported.__all__:
            assert hasattr(imported, name), f"{module}.{name}"
