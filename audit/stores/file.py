"""The single-node store: an append-only JSONL file, fsync'd once per batch.

Each line is the RFC 8785 canonical JSON of one record. One process writes a
file at a time (an exclusive ``flock``). Blocking I/O runs in a worker thread.

Recovery on open: a crash can leave at most a torn last line, the tail of a
batch whose fsync never returned, so no caller was told it was durable. That
line is cut off and the chain continues from the last complete record. A
complete line that does not parse, or whose hash does not match, is not crash
damage: the store refuses to open and names it (run ``audit verify``).

Checkpoints live beside the log in ``<log>.checkpoints.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from audit.record import Record, RecordFormatError, canonical, record_hash
from audit.stores import Head, StoreError

__all__ = ["FileStore", "JsonlFile", "checkpoints_path", "iter_lines"]

_log = logging.getLogger("audit.file")

_FILE_MODE: Final = 0o640
_DIR_MODE: Final = 0o750
_TAIL_CHUNK: Final = 64 * 1024


def checkpoints_path(path: Path) -> Path:
    """Where the checkpoints of the log at ``path`` are kept."""
    return path.with_name(path.name + ".checkpoints.jsonl")


def iter_lines(path: Path) -> Iterator[tuple[bytes, bool]]:
    """Each line of ``path`` without its newline, and whether it was complete."""
    with path.open("rb") as handle:
        for line in handle:
            if line.endswith(b"\n"):
                yield line[:-1], True
            else:
                yield line, False


class JsonlFile:
    """An append-only file of lines with one writer; every append is fsync'd.

    Synchronous: callers run it in a thread. ``size`` is the durable length;
    after a failed append the file is cut back to it, and if even that fails
    the file is :attr:`dirty` until :meth:`open` recovers it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.dirty = False
        self.syncs = 0
        self._fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> bytes | None:
        """Open (creating it), lock, cut a torn last line; return the last complete line."""
        self.close()
        created = not self.path.exists()
        try:
            self.path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, _FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"{self.path} is locked by another writer") from None
            if created:
                _fsync_dir(self.path.parent)
            last, size = _recover_tail(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.size = size
        self.dirty = False
        return last

    def append(self, data: bytes) -> None:
        """Write ``data`` at the end and fsync; on failure nothing of it remains."""
        fd = self._require_open()
        before = self.size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, before)
                os.fsync(fd)
            except OSError:
                self.dirty = True
            raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.size = before + len(data)
        self.syncs += 1

    def read_lines(self, offset: int, limit: int) -> tuple[list[bytes], int]:
        """Up to ``limit`` complete lines from ``offset``; and the offset after them."""
        fd = self._require_open()
        lines: list[bytes] = []
        buffer = b""
        position = offset
        while len(lines) < limit and position < self.size:
            chunk = os.pread(fd, min(_TAIL_CHUNK, self.size - position), position)
            if not chunk:
                break
            position += len(chunk)
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines.extend(complete)
        lines = lines[:limit]
        consumed = sum(len(line) + 1 for line in lines)
        return lines, offset + consumed

    def reset(self) -> None:
        """Empty the file (durably)."""
        fd = self._require_open()
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        except OSError as exc:
            self.dirty = True
            raise StoreError(f"cannot truncate {self.path}: {exc.strerror or exc}") from None
        self.size = 0

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # also releases the flock

    def _require_open(self) -> int:
        if self._fd is None or self.dirty:
            raise StoreError(f"{self.path} is not open")
        return self._fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover_tail(fd: int, path: Path) -> tuple[bytes | None, int]:
    """Cut a torn last line off; return the last complete line and the new size."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None, 0
    buffer = b""
    position = size
    chunk = _TAIL_CHUNK
    while position > 0:
        start = max(0, position - chunk)
        buffer = os.pread(fd, position - start, start) + buffer
        position = start
        last = buffer.rfind(b"\n")
        if last != -1 and (buffer.rfind(b"\n", 0, last) != -1 or position == 0):
            break
        chunk *= 2
    last = buffer.rfind(b"\n")
    end = position + last + 1 if last != -1 else 0
    if end < size:
        # SECURITY: only an unterminated last line is cut: it is the tail of a
        # batch whose fsync never returned, so no request was released on it.
        _log.warning(
            "cutting a torn last line left by a crash",
            extra={"path": str(path), "bytes": size - end},
        )
        os.ftruncate(fd, end)
        os.fsync(fd)
    if end == 0:
        return None, 0
    previous = buffer.rfind(b"\n", 0, last)
    return buffer[previous + 1 : last], end


def head_from_line(line: bytes, *, chain_id: str, path: Path) -> Head:
    """The head a stored last line describes, after checking it is intact."""
    try:
        document = orjson.loads(line)
        record = Record.from_document(document)
    except (orjson.JSONDecodeError, RecordFormatError) as exc:
        raise StoreError(f"{path}: the last record is damaged ({exc}); run audit verify") from None
    if record_hash(document) != record.hash:
        raise StoreError(f"{path}: the last record (seq {record.seq}) fails its hash check")
    if record.chain_id != chain_id:
        raise StoreError(
            f"{path} holds chain {record.chain_id!r}, not {chain_id!r}; one file holds one chain"
        )
    return Head(record.seq, record.hash)


class FileStore:
    """A chain in a local JSONL file; checkpoints in a sibling JSONL file."""

    kind = "file"

    def __init__(self, path: Path, *, chain_id: str) -> None:
        self.path = path
        self.chain_id = chain_id
        self.head: Head | None = None
        self.opened = False
        self._records = JsonlFile(path)
        self._checkpoints = JsonlFile(checkpoints_path(path))
        self._last_checkpoint: dict[str, Any] | None = None

    @property
    def dirty(self) -> bool:
        return self._records.dirty

    @property
    def syncs(self) -> int:
        return self._records.syncs

    async def open(self) -> Head | None:
        await asyncio.to_thread(self._open)
        return self.head

    def _open(self) -> None:
        self.opened = False
        last = self._records.open()
        self.head = (
            None if last is None else head_from_line(last, chain_id=self.chain_id, path=self.path)
        )
        checkpoint = self._checkpoints.open()
        self._last_checkpoint = None if checkpoint is None else orjson.loads(checkpoint)
        self.opened = True

    async def write(self, records: Sequence[Record]) -> None:
        if not records:
            return
        data = b"".join(record.to_line() for record in records)
        await asyncio.to_thread(self._records.append, data)
        self.head = Head(records[-1].seq, records[-1].hash)

    async def write_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        await asyncio.to_thread(self._checkpoints.append, canonical(checkpoint) + b"\n")
        self._last_checkpoint = checkpoint

    async def last_checkpoint(self) -> dict[str, Any] | None:
        return self._last_checkpoint

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self._records.close()
            self._checkpoints.close()
        self.opened = False
