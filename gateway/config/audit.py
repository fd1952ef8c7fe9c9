"""``[audit]``: the hash-chained audit log."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import yarl

from gateway.config.checks import _require

_CHAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The hash-chained audit log (docs/audit.md)."""

    enabled: bool = True
    #: "file": a local fsync'd JSONL file (one node); "postgres": a table (a cluster).
    store: Literal["file", "postgres"] = "file"
    #: The JSONL log (file store). Its directory is the audit data directory
    #: for either store: chain id, signing key and public key live there.
    path: str = ".run/audit/audit.jsonl"
    #: PostgreSQL DSN (postgres store); empty: dependencies.postgres_dsn.
    dsn: str = ""
    #: This instance's chain; empty: generated once, kept in <data dir>/chain-id.
    chain_id: str = ""
    #: Where records wait, fsync'd, while the store is down.
    spool_path: str = ".run/audit/spool.jsonl"
    #: A signed checkpoint every this many records ...
    checkpoint_every: int = 1000
    #: ... or this many seconds (when there are new records).
    checkpoint_interval_s: float = 60.0
    #: Ed25519 private key (PEM, mode 0600); empty: generated into the data directory.
    signing_key_file: str = ""
    #: Seconds per summary record of rejections anyone can cause (flood control).
    summary_window_s: float = 10.0
    #: Most records per group commit (one fsync or transaction).
    batch_max: int = 512

    def validate(self, key: str) -> None:
        _require(bool(self.path), f"{key}.path", "must not be empty")
        _require(bool(self.spool_path), f"{key}.spool_path", "must not be empty")
        _require(
            not self.chain_id or _CHAIN_ID.fullmatch(self.chain_id) is not None,
            f"{key}.chain_id",
            "must be letters, digits, '.', '_', ':' or '-' (at most 128)",
        )
        if self.dsn:
            _require(
                yarl.URL(self.dsn).scheme in ("postgres", "postgresql"),
                f"{key}.dsn",
                "must be a postgresql:// URL",
            )
        _require(self.checkpoint_every > 0, f"{key}.checkpoint_every", "must be > 0")
        _require(self.checkpoint_interval_s > 0, f"{key}.checkpoint_interval_s", "must be > 0")
        _require(self.summary_window_s > 0, f"{key}.summary_window_s", "must be > 0")
        _require(0 < self.batch_max <= 10_000, f"{key}.batch_max", "must be between 1 and 10000")
