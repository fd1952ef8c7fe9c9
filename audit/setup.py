"""Build an :class:`~audit.chain.AuditLog` from settings: store, chain id, key, spool.

The data directory (the directory of ``path``) keeps what belongs to this
instance: the chain id (``chain-id``, generated once when none is configured)
and, unless ``signing_key_file`` is set, the Ed25519 signing key (0600) and its
public half for verifiers.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from audit.chain import AuditLog
from audit.checkpoint import Checkpointer, Signer, load_or_create_signing_key
from audit.spool import Spool
from audit.stores import Store
from audit.stores.file import FileStore
from audit.stores.postgres import PostgresStore

__all__ = [
    "CHAIN_ID_FILE",
    "CHAIN_ID_PATTERN",
    "AuditSettings",
    "open_audit_log",
    "resolve_chain_id",
]

CHAIN_ID_FILE: Final = "chain-id"
CHAIN_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True, slots=True)
class AuditSettings:
    store: Literal["file", "postgres"] = "file"
    path: Path = Path(".run/audit/audit.jsonl")
    dsn: str = ""
    chain_id: str = ""
    spool_path: Path = Path(".run/audit/spool.jsonl")
    checkpoint_every: int = 1000
    checkpoint_interval_s: float = 60.0
    signing_key_file: str = ""
    batch_max: int = 512

    @property
    def data_dir(self) -> Path:
        return self.path.parent


def resolve_chain_id(configured: str, data_dir: Path) -> str:
    """The configured chain id, or the one generated on this instance's first start."""
    if configured:
        return configured
    path = data_dir / CHAIN_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        existing = path.read_text().strip()
        if CHAIN_ID_PATTERN.fullmatch(existing):
            return existing
        raise ValueError(f"{path} does not hold a valid chain id")
    data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    chain_id = f"gw-{uuid.uuid4()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return resolve_chain_id("", data_dir)
    with os.fdopen(fd, "w") as handle:
        handle.write(chain_id + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return chain_id


async def open_audit_log(
    settings: AuditSettings, *, clock: Callable[[], float] = time.time
) -> AuditLog:
    """Create the log described by ``settings``, recover it and start its writer."""
    chain_id = resolve_chain_id(settings.chain_id, settings.data_dir)
    store: Store
    if settings.store == "postgres":
        store = PostgresStore(settings.dsn, chain_id=chain_id)
    else:
        store = FileStore(settings.path, chain_id=chain_id)
    key, _ = load_or_create_signing_key(settings.signing_key_file, settings.data_dir)
    checkpointer = Checkpointer(
        Signer(key),
        chain_id=chain_id,
        every=settings.checkpoint_every,
        interval_s=settings.checkpoint_interval_s,
        clock=clock,
    )
    log = AuditLog(
        store,
        chain_id=chain_id,
        spool=Spool(settings.spool_path, chain_id=chain_id),
        checkpointer=checkpointer,
        clock=clock,
        batch_max=settings.batch_max,
    )
    await log.open()
    return log
