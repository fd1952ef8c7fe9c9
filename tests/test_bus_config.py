"""The bus's config: defaults, validation naming the key, environment overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bus.config import DEFAULT_BUS_CONFIG, BusConfig, BusConfigError, config_from_env


class TestBusConfig:
    def test_defaults_are_valid_and_frozen(self) -> None:
        """The defaults validate; the object cannot change."""
        DEFAULT_BUS_CONFIG.validate()
        with pytest.raises(dataclasses.FrozenInstanceError):
            DEFAULT_BUS_CONFIG.max_batch = 1  # type: ignore[misc]

    def test_default_stream_bound_is_large(self) -> None:
        """Trimming can drop unconsumed messages, so the default bound is generous."""
        assert DEFAULT_BUS_CONFIG.max_stream_len >= 1_000_000

    @pytest.mark.parametrize(
        ("changes", "key"),
        [
            pytest.param({"redis_url": "http://x"}, "redis_url", id="redis-scheme"),
            pytest.param({"redis_url": "redis"}, "redis_url", id="redis-no-scheme"),
            pytest.param({"max_stream_len": 999}, "max_stream_len", id="stream-len"),
            pytest.param({"visibility_timeout_s": 0}, "visibility_timeout_s", id="visibility"),
            pytest.param({"max_deliveries": 0}, "max_deliveries", id="deliveries"),
            pytest.param({"max_message_bytes": 10}, "max_message_bytes", id="message-bytes"),
            pytest.param({"max_poll_s": 301}, "max_poll_s", id="poll"),
            pytest.param({"max_batch": 0}, "max_batch", id="batch"),
            pytest.param({"idempotency_ttl_s": 0}, "idempotency_ttl_s", id="ttl"),
            pytest.param({"max_pollers": 0}, "max_pollers", id="pollers"),
        ],
    )
    def test_invalid_values_name_their_key(self, changes: dict[str, object], key: str) -> None:
        """Each bad value is refused with the name of its key."""
        with pytest.raises(BusConfigError) as caught:
            BusConfig(**changes).validate()  # type: ignore[arg-type]
        assert caught.value.key == key


class TestFromEnv:
    def test_environment_then_flags(self) -> None:
        """NOPS_BUS__* variables override defaults; explicit overrides win over both."""
        config = config_from_env(
            {"NOPS_BUS__MAX_BATCH": "7", "NOPS_BUS__VISIBILITY_TIMEOUT_S": "2.5", "OTHER": "x"},
            max_batch=9,
            redis_url=None,
        )
        assert (config.max_batch, config.visibility_timeout_s) == (9, 2.5)
        assert config.redis_url == DEFAULT_BUS_CONFIG.redis_url

    @pytest.mark.parametrize(
        ("environ", "key"),
        [
            pytest.param({"NOPS_BUS__NOPE": "1"}, "nope", id="unknown"),
            pytest.param({"NOPS_BUS__MAX_BATCH": "many"}, "max_batch", id="not-an-int"),
            pytest.param({"NOPS_BUS__MAX_BATCH": "0"}, "max_batch", id="out-of-range"),
        ],
    )
    def test_bad_environment_names_the_key(self, environ: dict[str, str], key: str) -> None:
        """A bad variable is a config error naming the setting."""
        with pytest.raises(BusConfigError) as caught:
            config_from_env(environ)
        assert caught.value.key == key

    def test_file_variables_read_the_value_from_a_file(self, tmp_path: Path) -> None:
        """NOPS_BUS_FILE__REDIS_URL names a file holding the URL (a mounted secret)."""
        secret = tmp_path / "redis_url"
        secret.write_text("redis://:s3cret@redis:6379/0\n")
        config = config_from_env({"NOPS_BUS_FILE__REDIS_URL": str(secret)})
        assert config.redis_url == "redis://:s3cret@redis:6379/0"

    @pytest.mark.parametrize(
        ("setup", "reason"),
        [
            pytest.param("missing", "cannot read", id="missing"),
            pytest.param("empty", "is empty", id="empty"),
            pytest.param("both", "set by both", id="both-forms"),
            pytest.param("bad-url", "must be a redis://", id="invalid"),
        ],
    )
    def test_bad_file_variables_name_the_key_not_the_secret(
        self, tmp_path: Path, setup: str, reason: str
    ) -> None:
        """A file variable that cannot be used names redis_url and why, never the value."""
        secret = tmp_path / "redis_url"
        environ = {"NOPS_BUS_FILE__REDIS_URL": str(secret)}
        content = {"empty": "\n", "both": "redis://:s3cret@r/0", "bad-url": "http://:s3cret@r/0"}
        if setup in content:
            secret.write_text(content[setup])
        if setup == "both":
            environ["NOPS_BUS__REDIS_URL"] = "redis://r/0"
        with pytest.raises(BusConfigError) as caught:
            config_from_env(environ)
        assert caught.value.key == "redis_url"
        assert reason in caught.value.message
        assert "s3cret" not in str(caught.value)
