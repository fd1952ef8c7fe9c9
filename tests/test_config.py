"""Config: parsed once into frozen objects; every fault names its key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest

import gateway.config
from gateway.config import DEFAULT_CONFIG, Config, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]

ROUTE = {"name": "echo", "prefix": "/echo/", "upstream": "http://127.0.0.1:9"}


class TestParse:
    def test_defaults_are_valid(self) -> None:
        """An empty file is a valid single-node config."""
        assert parse_config({}) == DEFAULT_CONFIG

    def test_shipped_config_is_valid(self) -> None:
        """config/gateway.toml, used by the run command, parses."""
        config = load_config(ROOT / "config" / "gateway.toml", environ={})
        assert [r.name for r in config.routes] == [
            "echo",
            "readonly",
            "locked",
            "bus",
            "registry",
            "agents",
        ]

    def test_objects_are_frozen(self) -> None:
        """Config cannot change after start-up."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            DEFAULT_CONFIG.server.port = 1  # type: ignore[misc]

    def test_integers_widen_to_floats(self) -> None:
        """timeout_s = 1 is read as 1.0."""
        config = parse_config({"policy": {"timeout_s": 1}})
        assert config.policy.timeout_s == 1.0

    @pytest.mark.parametrize(
        ("table", "key", "message"),
        [
            pytest.param({"version": 2}, "version", "unsupported", id="version"),
            pytest.param({"sever": {}}, "sever", "unknown key", id="unknown-section"),
            pytest.param({"server": {"prot": 1}}, "server.prot", "unknown key", id="unknown-key"),
            pytest.param({"server": {"port": "80"}}, "server.port", "integer", id="port-type"),
            pytest.param({"server": {"port": True}}, "server.port", "integer", id="port-bool"),
            pytest.param({"server": {"port": 70000}}, "server.port", "between", id="port-range"),
            pytest.param({"server": 3}, "server", "table", id="section-type"),
            pytest.param(
                {"server": {"max_body_bytes": -1}}, "server.max_body_bytes", ">= 0", id="body"
            ),
            pytest.param({"policy": {"engine": "cedar"}}, "policy.engine", "one of", id="engine"),
            pytest.param({"policy": {"url": "ftp://x"}}, "policy.url", "http", id="opa-scheme"),
            pytest.param({"policy": {"timeout_s": 0}}, "policy.timeout_s", "> 0", id="timeout"),
            pytest.param(
                {"policy": {"decision_path": "data.x"}}, "policy.decision_path", "slash", id="path"
            ),
            pytest.param(
                {"dependencies": {"redis_url": "http://x"}},
                "dependencies.redis_url",
                "redis://",
                id="redis-scheme",
            ),
            pytest.param(
                {"dependencies": {"postgres_dsn": "mysql://x"}},
                "dependencies.postgres_dsn",
                "postgresql://",
                id="pg-scheme",
            ),
            pytest.param({"logging": {"level": "LOUD"}}, "logging.level", "one of", id="level"),
            pytest.param({"routes": {}}, "routes", "array", id="routes-type"),
            pytest.param({"routes": [{"name": "x"}]}, "routes[0].prefix", "required", id="missing"),
            pytest.param(
                {"routes": [{**ROUTE, "prefix": "echo"}]}, "routes[0].prefix", "'/'", id="prefix"
            ),
            pytest.param(
                {"routes": [{**ROUTE, "name": "Echo!"}]}, "routes[0].name", "lower-case", id="name"
            ),
            pytest.param(
                {"routes": [{**ROUTE, "upstream": "http://u:p@h"}]},
                "routes[0].upstream",
                "credentials",
                id="credentials-in-url",
            ),
            pytest.param(
                {"routes": [{**ROUTE, "upstream": "file:///etc"}]},
                "routes[0].upstream",
                "http",
                id="upstream-scheme",
            ),
            pytest.param(
                {"routes": [ROUTE, {**ROUTE, "prefix": "/other/"}]},
                "routes[1].name",
                "duplicate",
                id="duplicate-name",
            ),
            pytest.param(
                {"routes": [ROUTE, {**ROUTE, "name": "other"}]},
                "routes[1].prefix",
                "duplicate",
                id="duplicate-prefix",
            ),
            pytest.param(
                {"routes": [{**ROUTE, "circuit_failures": 0}]},
                "routes[0].circuit_failures",
                ">= 1",
                id="circuit-failures",
            ),
            pytest.param(
                {"routes": [{**ROUTE, "circuit_open_s": 0}]},
                "routes[0].circuit_open_s",
                "> 0",
                id="circuit-open-s",
            ),
            pytest.param(
                {"routes": [{**ROUTE, "circuit_half_open_max": 0}]},
                "routes[0].circuit_half_open_max",
                ">= 1",
                id="circuit-half-open-max",
            ),
        ],
    )
    def test_bad_values_name_the_key(self, table: dict[str, Any], key: str, message: str) -> None:
        """A bad value is refused with the dotted key at fault and why."""
        with pytest.raises(ConfigError) as caught:
            parse_config(table)
        assert caught.value.key == key
        assert message in caught.value.message


class TestLoad:
    def test_missing_file(self, tmp_path: Path) -> None:
        """A config path that does not exist is an error, not defaults."""
        with pytest.raises(ConfigError, match="does not exist"):
            load_config(tmp_path / "nope.toml", environ={})

    def test_invalid_toml(self, tmp_path: Path) -> None:
        """Broken TOML is reported as such."""
        path = tmp_path / "bad.toml"
        path.write_text("[server\nport = 1\n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_config(path, environ={})

    @pytest.mark.parametrize(
        ("environ", "check"),
        [
            pytest.param(
                {"NOPS_GATEWAY__SERVER__PORT": "9000"},
                lambda c: c.server.port == 9000,
                id="int",
            ),
            pytest.param(
                {"NOPS_GATEWAY__POLICY__URL": "http://opa:8181"},
                lambda c: c.policy.url == "http://opa:8181",
                id="bare-string",
            ),
            pytest.param(
                {"NOPS_GATEWAY__LOGGING__ACCESS_LOG": "false"},
                lambda c: c.logging.access_log is False,
                id="bool",
            ),
            pytest.param(
                {"NOPS_GATEWAY__SERVER__TRUSTED_PROXIES": '["10.0.0.1"]'},
                lambda c: c.server.trusted_proxies == ("10.0.0.1",),
                id="array",
            ),
            pytest.param({"OTHER_PORT": "1"}, lambda c: c.server.port == 8080, id="ignored"),
        ],
    )
    def test_environment_overrides(
        self, tmp_path: Path, environ: dict[str, str], check: Any
    ) -> None:
        """NOPS_GATEWAY__SECTION__KEY overrides the file."""
        path = tmp_path / "gateway.toml"
        path.write_text("version = 1\n[server]\nport = 8080\n")
        assert check(load_config(path, environ=environ))

    @pytest.mark.parametrize(
        ("environ", "key"),
        [
            pytest.param({"NOPS_GATEWAY__SERVER__PORT": "abc"}, "server.port", id="type"),
            pytest.param({"NOPS_GATEWAY__SERVER__NOPE": "1"}, "server.nope", id="unknown"),
            pytest.param({"NOPS_GATEWAY__SERVER____X": "1"}, "server..x", id="malformed"),
        ],
    )
    def test_bad_overrides_name_the_key(self, environ: dict[str, str], key: str) -> None:
        """An override is validated like the file, and named by its dotted key."""
        with pytest.raises(ConfigError) as caught:
            load_config(None, environ=environ)
        assert caught.value.key == key

    @pytest.mark.parametrize(
        ("content", "expected"),
        [
            pytest.param(
                "postgresql://nops:s3cret@db:5432/nops\n",
                "postgresql://nops:s3cret@db:5432/nops",
                id="trailing-newline-removed",
            ),
            pytest.param(
                "postgresql://nops:s3cret@db/nops\r\n",
                "postgresql://nops:s3cret@db/nops",
                id="crlf-removed",
            ),
            pytest.param(
                "postgresql://nops:9000@db/nops", "postgresql://nops:9000@db/nops", id="no-newline"
            ),
        ],
    )
    def test_file_overrides_read_the_value_from_a_file(
        self, tmp_path: Path, content: str, expected: str
    ) -> None:
        """NOPS_GATEWAY_FILE__SECTION__KEY sets the key to the named file's text."""
        secret = tmp_path / "postgres_dsn"
        secret.write_text(content, newline="")
        environ = {"NOPS_GATEWAY_FILE__DEPENDENCIES__POSTGRES_DSN": str(secret)}
        assert load_config(None, environ=environ).dependencies.postgres_dsn == expected

    def test_file_override_value_is_always_a_string(self, tmp_path: Path) -> None:
        """A file's text is never parsed as TOML: '9000' in a file stays a string."""
        secret = tmp_path / "port"
        secret.write_text("9000\n")
        with pytest.raises(ConfigError) as caught:
            load_config(None, environ={"NOPS_GATEWAY_FILE__SERVER__PORT": str(secret)})
        assert (caught.value.key, caught.value.message) == ("server.port", "must be an integer")

    @pytest.mark.parametrize(
        ("setup", "key", "reason"),
        [
            pytest.param("missing", "dependencies.redis_url", "No such file", id="missing"),
            pytest.param("empty", "dependencies.redis_url", "is empty", id="empty"),
            pytest.param("binary", "dependencies.redis_url", "not UTF-8", id="not-text"),
            pytest.param("both", "dependencies.redis_url", "set by both", id="both-forms"),
            pytest.param("bad-url", "dependencies.redis_url", "must be a redis://", id="invalid"),
        ],
    )
    def test_bad_file_overrides_name_the_key_not_the_secret(
        self, tmp_path: Path, setup: str, key: str, reason: str
    ) -> None:
        """A file override that cannot be used names the key and why, never the value."""
        secret = tmp_path / "redis_url"
        environ = {"NOPS_GATEWAY_FILE__DEPENDENCIES__REDIS_URL": str(secret)}
        content = {
            "empty": b"\n",
            "binary": b"\xff\xfe-s3cret",
            "both": b"redis://:s3cret@redis:6379/0",
            "bad-url": b"http://:s3cret@redis:6379/0",
        }
        if setup in content:
            secret.write_bytes(content[setup])
        if setup == "both":
            environ["NOPS_GATEWAY__DEPENDENCIES__REDIS_URL"] = "redis://redis:6379/0"
        with pytest.raises(ConfigError) as caught:
            load_config(None, environ=environ)
        assert caught.value.key == key
        assert reason in caught.value.message
        assert "s3cret" not in str(caught.value)

    def test_config_is_typed(self) -> None:
        """The loaded object is the frozen Config."""
        assert isinstance(load_config(None, environ={}), Config)


class TestTypes:
    def test_dict_and_optional_fields(self) -> None:
        """dict[str, X] becomes a read-only mapping; X | None takes X."""
        from dataclasses import dataclass

        from gateway.config.loader import _build

        @dataclass(frozen=True)
        class Section:
            limits: dict[str, int]
            note: str | None = None

        section = _build(Section, {"limits": {"a": 1}, "note": "n"}, "s")
        assert section.limits == {"a": 1}
        assert section.note == "n"
        with pytest.raises(TypeError):
            section.limits["b"] = 2
        with pytest.raises(ConfigError) as caught:
            _build(Section, {"limits": {"a": "x"}}, "s")
        assert caught.value.key == "s.limits.a"

    @pytest.mark.parametrize(
        "name",
        sorted(
            name
            for name in gateway.config.__all__
            if isinstance(getattr(gateway.config, name), type)
            and dataclasses.is_dataclass(getattr(gateway.config, name))
        ),
    )
    def test_every_section_resolves_its_annotations(self, name: str) -> None:
        """The loader reads field types with get_type_hints, in the section's own module.

        A section whose nested types are imported only for type checking
        would fail here, not at start-up.
        """
        section = getattr(gateway.config, name)
        hints = typing.get_type_hints(section)
        assert set(hints) == {spec.name for spec in dataclasses.fields(section)}

    def test_nested_sections_build_across_modules(self) -> None:
        """Tables nested in tables and arrays of tables become their section classes."""
        config = parse_config(
            {
                "policy": {"cache": {"ttl_s": 5}, "shadow": {"enabled": True}},
                "routes": [
                    {
                        "name": "agents",
                        "prefix": "/agents/",
                        "kind": "agent",
                        "agent": {"registry_url": "http://127.0.0.1:9"},
                    }
                ],
                "tenants": [{"id": "acme", "keys": [{"keyid": "k1", "secret_env": "K1"}]}],
                "ratelimit": {"tiers": {"free": {"tenant": "5/second"}}},
                "admin": {"keys": [{"id": "a", "role": "VIEWER", "hash": "sha256:" + "0" * 64}]},
            }
        )
        assert isinstance(config.policy.cache, gateway.config.PolicyCacheConfig)
        assert config.policy.cache.ttl_s == 5.0
        assert isinstance(config.policy.shadow, gateway.config.PolicyShadowConfig)
        assert isinstance(config.routes[0].agent, gateway.config.AgentRouteConfig)
        assert isinstance(config.tenants[0].keys[0], gateway.config.KeyConfig)
        assert isinstance(config.ratelimit.tiers["free"], gateway.config.RateLimitTierConfig)
        assert isinstance(config.admin.keys[0], gateway.config.AdminKeyConfig)
