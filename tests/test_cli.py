"""The gateway command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import __version__
from gateway.cli import main


class TestCli:
    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--version prints the package version."""
        with pytest.raises(SystemExit) as caught:
            main(["--version"])
        assert caught.value.code == 0
        assert capsys.readouterr().out.strip() == f"nops-gateway {__version__}"

    def test_check_config_ok(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A valid file: exit 0 and a one-line summary."""
        path = tmp_path / "gateway.toml"
        path.write_text("version = 1\n")
        assert main(["check-config", str(path)]) == 0
        assert "config ok" in capsys.readouterr().out

    @pytest.mark.parametrize(
        ("text", "key"),
        [
            pytest.param("version = 1\n[server]\nport = -1\n", "server.port", id="range"),
            pytest.param("version = 1\n[policy]\ntimout_s = 1\n", "policy.timout_s", id="typo"),
            pytest.param("version = 1\n[[routes]]\nname = 'x'\n", "routes[0].prefix", id="route"),
        ],
    )
    def test_check_config_names_the_bad_key(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
    ) -> None:
        """A bad file: exit 2 and the dotted key on stderr."""
        path = tmp_path / "gateway.toml"
        path.write_text(text)
        assert main(["check-config", str(path)]) == 2
        assert capsys.readouterr().err.startswith(f"config error: {key}: ")

    def test_no_command_is_usage_error(self) -> None:
        """Bare `gateway` prints help and exits 2."""
        assert main([]) == 2
