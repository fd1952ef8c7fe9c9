"""``python -m registry``: where the DSN comes from (flag, variable, or a secret file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.__main__ import main


class TestDsnSources:
    def test_dsn_file_reaches_the_database(
        self, registry_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--dsn-file names a file holding the DSN (a mounted secret); it is used as is."""
        secret = tmp_path / "postgres_dsn"
        secret.write_text(registry_dsn + "\n")
        assert main(["migrate", "status", "--dsn-file", str(secret)]) == 0
        assert "pending: [" in capsys.readouterr().out

    def test_dsn_file_from_the_environment(
        self,
        registry_dsn: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """NOPS_REGISTRY_DSN_FILE works like --dsn-file."""
        secret = tmp_path / "postgres_dsn"
        secret.write_text(registry_dsn)
        monkeypatch.setenv("NOPS_REGISTRY_DSN_FILE", str(secret))
        monkeypatch.delenv("NOPS_REGISTRY_DSN", raising=False)
        assert main(["migrate", "status"]) == 0
        assert "applied: [" in capsys.readouterr().out

    @pytest.mark.parametrize(
        ("setup", "reason"),
        [
            pytest.param("missing", "cannot read the DSN file", id="missing"),
            pytest.param("empty", "is empty", id="empty"),
            pytest.param("both", "not both", id="both"),
        ],
    )
    def test_unusable_dsn_file_is_refused_without_the_secret(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, reason: str
    ) -> None:
        """A missing, empty or doubly given DSN stops with exit 2, never printing a password."""
        secret = tmp_path / "postgres_dsn"
        argv = ["migrate", "status", "--dsn-file", str(secret)]
        if setup == "empty":
            secret.write_text("\n")
        if setup == "both":
            secret.write_text("postgresql://nops:s3cret@db/nops")
            argv += ["--dsn", "postgresql://nops:s3cret@db/nops"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert reason in err
        assert "s3cret" not in err
