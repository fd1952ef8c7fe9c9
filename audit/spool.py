"""The spool: a local durable file that keeps the chain going while the store is down.

When a batch cannot be written to the store, the same sealed records are
appended here (fsync'd, in order) and the requests go on. From then on every
batch goes to the spool until a background task (:mod:`audit.chain`) has
drained it back into the store, in order; then the spool is emptied and
batches go to the store again. If the spool cannot be written either, the
append fails and the caller must refuse the request.

The spool has the same line format as the file store. It is created on first
use; one that is not empty at start-up is drained before anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import orjson

from audit.record import Record, RecordFormatError, record_hash
from audit.stores import Head, StoreError
from audit.stores.file import JsonlFile, head_from_line

__all__ = ["Spool", "SpoolError"]


class SpoolError(StoreError):
    """The spool could not be opened, read or written."""


class Spool:
    def __init__(self, path: Path, *, chain_id: str) -> None:
        self.path = path
        self.chain_id = chain_id
        self.head: Head | None = None
        self._file = JsonlFile(path)

    @property
    def pending(self) -> bool:
        """True while the spool holds records not yet known to be in the store."""
        return self._file.is_open and self._file.size > 0

    @property
    def dirty(self) -> bool:
        return self._file.dirty

    @property
    def size(self) -> int:
        return self._file.size

    @property
    def syncs(self) -> int:
        return self._file.syncs

    async def open(self) -> Head | None:
        """Open an existing spool (recovering a torn tail); a missing one stays closed."""
        try:
            exists = await asyncio.to_thread(self.path.exists)
            if exists or self._file.is_open:
                await asyncio.to_thread(self._open)
        except StoreError as exc:
            raise SpoolError(str(exc)) from None
        return self.head

    def _open(self) -> None:
        last = self._file.open()
        self.head = (
            None if last is None else head_from_line(last, chain_id=self.chain_id, path=self.path)
        )

    async def append(self, records: Sequence[Record]) -> None:
        if not records:
            return
        data = b"".join(record.to_line() for record in records)
        try:
            if not self._file.is_open or self._file.dirty:
                await asyncio.to_thread(self._open)
            await asyncio.to_thread(self._file.append, data)
        except StoreError as exc:
            raise SpoolError(str(exc)) from None
        self.head = Head(records[-1].seq, records[-1].hash)

    async def read(self, offset: int, limit: int) -> tuple[list[Record], int]:
        """Up to ``limit`` records from byte ``offset``, each checked; and the next offset."""
        try:
            lines, next_offset = await asyncio.to_thread(self._file.read_lines, offset, limit)
        except StoreError as exc:
            raise SpoolError(str(exc)) from None
        records: list[Record] = []
        for line in lines:
            try:
                document = orjson.loads(line)
                record = Record.from_document(document)
            except (orjson.JSONDecodeError, RecordFormatError) as exc:
                raise SpoolError(f"{self.path}: damaged record in the spool: {exc}") from None
            if record_hash(document) != record.hash or record.chain_id != self.chain_id:
                raise SpoolError(f"{self.path}: spooled record {record.seq} fails its check")
            records.append(record)
        return records, next_offset

    async def reset(self) -> None:
        """Empty the spool once everything in it is in the store."""
        try:
            await asyncio.to_thread(self._file.reset)
        except StoreError as exc:
            raise SpoolError(str(exc)) from None
        self.head = None

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
