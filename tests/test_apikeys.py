"""API keys: hashed storage, constant-time check, and the tiny CLI that makes them."""

from __future__ import annotations

import io
import re
import tomllib

import pytest

from gateway.apikeys import ApiKeyRejected, ApiKeyStore, hash_secret, main
from gateway.config import ApiKeyConfig, parse_config
from tests.secretscan import register_secret

SECRET = "Zq3-secret_value-0123456789abcdefghij"
register_secret(SECRET, "API key secret (apikeys)")


@pytest.fixture
def store() -> ApiKeyStore:
    return ApiKeyStore([ApiKeyConfig(id="agent-7", tenant="acme", hash=hash_secret(SECRET))])


class TestApiKeyStore:
    def test_valid_key_names_its_config(self, store: ApiKeyStore) -> None:
        """<id>.<secret> with the right secret returns the key's config."""
        assert store.verify(f"agent-7.{SECRET}").tenant == "acme"

    @pytest.mark.parametrize(
        ("credential", "reason", "key_id"),
        [
            pytest.param(f"agent-7.{SECRET}x", "api_key_invalid", "agent-7", id="wrong-secret"),
            pytest.param(f"agent-8.{SECRET}", "api_key_invalid", None, id="unknown-id"),
            pytest.param(SECRET, "api_key_malformed", None, id="no-id"),
            pytest.param("agent-7.", "api_key_malformed", None, id="empty-secret"),
            pytest.param(f"agent 7.{SECRET}", "api_key_malformed", None, id="space-in-id"),
            pytest.param(f"agent-7.{SECRET} x", "api_key_malformed", None, id="space-in-secret"),
            pytest.param("agent-7." + "x" * 513, "api_key_malformed", None, id="too-long"),
        ],
    )
    def test_bad_keys_are_refused(
        self, store: ApiKeyStore, credential: str, reason: str, key_id: str | None
    ) -> None:
        """Wrong, unknown or malformed keys are refused with a reason; only known ids are named."""
        with pytest.raises(ApiKeyRejected) as caught:
            store.verify(credential)
        assert (caught.value.reason, caught.value.key_id) == (reason, key_id)


class TestCli:
    def test_hash_reads_the_secret_from_stdin(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`hash` prints sha256:<hex> of stdin without its trailing newline."""
        monkeypatch.setattr("sys.stdin", io.StringIO(SECRET + "\n"))
        assert main(["hash"]) == 0
        assert capsys.readouterr().out.strip() == hash_secret(SECRET)

    def test_hash_refuses_an_empty_secret(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Nothing on stdin is an error, not the hash of the empty string."""
        monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
        assert main(["hash"]) == 2

    def test_new_key_round_trips_through_config(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`new` prints a key and a config entry that accepts exactly that key."""
        assert main(["new", "agent-7"]) == 0
        out = capsys.readouterr().out
        match = re.search(r"Authorization: ApiKey (\S+)", out)
        assert match is not None
        entry = out.split("\n", 1)[1].replace('"<tenant>"', '"acme"')
        config = parse_config(tomllib.loads(entry))
        assert ApiKeyStore(config.api_keys).verify(match.group(1)).id == "agent-7"

    @pytest.mark.parametrize("argv", [[], ["new"], ["new", "bad.id"], ["bogus"]])
    def test_usage_errors(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        """Anything else prints usage and exits 2."""
        assert main(argv) == 2
        assert "usage" in capsys.readouterr().err
