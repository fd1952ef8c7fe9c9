"""The chain: sequence numbers, hash links, group commit, spooling and checkpoints.

:meth:`AuditLog.append` queues an entry and resolves only once its record is
durable (in the store, or in the spool while the store is down). One writer
task takes everything queued since its last write, seals it (sequence number,
``prev_hash``, ``hash``) and writes it as one batch: one fsync for the file
store, one transaction for PostgreSQL. Concurrent appends therefore share a
durable write (group commit) without any waiting added on purpose; under load
the batch grows to ``batch_max``.

The chain's head is derived, never guessed: it is the spool's tail while the
spool holds records, else the store's tail. After a write whose outcome is
unknown, the store re-reads its tail before anything new is sealed, so a
crash or a lost COMMIT can never fork the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from audit.checkpoint import Checkpoint, Checkpointer, CheckpointError
from audit.record import Entry, Record, genesis_hash, rfc3339
from audit.spool import Spool
from audit.stores import Head, Store, StoreError

__all__ = ["AppendFailed", "AuditError", "AuditLog", "AuditStats", "ChainConflict"]

_log = logging.getLogger("audit.chain")

_DRAIN_RETRY_MIN_S: Final = 0.05
_DRAIN_RETRY_MAX_S: Final = 5.0


class AuditError(Exception):
    """Base of the audit package's errors."""


class AppendFailed(AuditError):
    """The record could not be made durable: the caller must not go on."""


class ChainConflict(AuditError):
    """The store and the spool disagree about the chain; draining stops."""


@dataclass(slots=True)
class AuditStats:
    appends: int = 0
    #: Durable writes of new records (store or spool): one per group commit.
    batches: int = 0
    records: int = 0
    spooled: int = 0
    drained: int = 0
    checkpoints: int = 0
    failed_batches: int = 0


_Pending = tuple[Entry, str, "asyncio.Future[Record]"]


class AuditLog:
    """One hash chain, written by one process; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        chain_id: str,
        spool: Spool | None = None,
        checkpointer: Checkpointer | None = None,
        clock: Callable[[], float] = time.time,
        batch_max: int = 512,
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        self.chain_id = chain_id
        self.store = store
        self.spool = spool
        self.checkpointer = checkpointer
        self.stats = AuditStats()
        self._clock = clock
        self._batch_max = batch_max
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._drain_wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._io_lock = asyncio.Lock()
        self._drain_offset = 0
        self._checkpoints_resumed = False
        self._closing = False
        self._stopping = False
        self._writer: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self.conflict: ChainConflict | None = None
        self._last_batch_failed = False

    # -- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        """Recover the store (and a spool left by a previous run), then start writing."""
        try:
            await self._recover()
        except BaseException:
            await self.store.close()
            if self.spool is not None:
                await self.spool.close()
            raise
        head = self.head
        _log.info(
            "audit log open",
            extra={
                "store": self.store.kind,
                "chain_id": self.chain_id,
                "audit_seq": head.seq if head else 0,
                "spooled": bool(self.spool and self.spool.pending),
            },
        )
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")
        self._drainer = asyncio.create_task(self._drain_loop(), name="audit-drainer")
        self._drain_wakeup.set()

    async def _recover(self) -> None:
        if self.spool is not None:
            await self.spool.open()
        try:
            await self.store.open()
        except StoreError:
            if self.spool is None or not self.spool.pending:
                raise
            _log.warning(
                "audit store unavailable at start; continuing on the spool",
                extra={"store": self.store.kind},
            )
        else:
            await self._resume_checkpoints()

    async def close(self) -> None:
        """Write what is queued, a final checkpoint, and release the store."""
        if self._writer is None:
            return
        self._closing = True
        self._wakeup.set()
        await self._writer
        await self._checkpoint(force=True)
        self._stopping = True
        self._drain_wakeup.set()
        if self._drainer is not None:
            await self._drainer
        self._writer = self._drainer = None
        await self.store.close()
        if self.spool is not None:
            await self.spool.close()
        _log.info("audit log closed", extra={"chain_id": self.chain_id})

    # -- appending -----------------------------------------------------------

    @property
    def head(self) -> Head | None:
        """The last durable record (in the spool while it holds records)."""
        if self.spool is not None and self.spool.pending:
            return self.spool.head
        return self.store.head

    @property
    def spooling(self) -> bool:
        return self.spool is not None and self.spool.pending

    @property
    def queue_depth(self) -> int:
        """Records appended and waiting for the writer's next group commit."""
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        """False while records cannot be made durable, or the spool cannot drain."""
        return self._writer is not None and not self._last_batch_failed and self.conflict is None

    async def probe(self) -> bool:
        """Readiness: could a record be made durable now?

        A failed batch keeps :attr:`healthy` false until a batch succeeds, but
        a node that reports itself unavailable gets no traffic, hence no
        batch. So after a failure this asks the store (re-reading its tail)
        without writing anything: once it answers, the node offers to serve
        again. Still fail closed: a batch that fails again is a 503.
        """
        if self._writer is None or self.conflict is not None:
            return False
        if not self._last_batch_failed:
            return True
        async with self._io_lock:
            try:
                await self.store.open()
            except StoreError:
                return False
        return True

    async def append(self, entry: Entry) -> Record:
        """Queue ``entry``; return its record once it is durable.

        Raises :class:`AppendFailed` when neither the store nor the spool
        could take it: the caller must refuse whatever the record was for.
        """
        if self._closing or self._writer is None:
            raise AppendFailed("the audit log is closed")
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, rfc3339(self._clock()), future))
        self.stats.appends += 1
        self._wakeup.set()
        return await future

    async def wait_drained(self) -> None:
        """Return once the spool is empty (everything is in the store)."""
        while self.spooling:
            self._drained.clear()
            await self._drained.wait()

    # -- the writer ----------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            if not self._pending and not self._closing:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._checkpoint_timeout())
            # Let appends already scheduled in this loop iteration join the batch.
            await asyncio.sleep(0)
            while self._pending:
                batch = self._pending[: self._batch_max]
                del self._pending[: self._batch_max]
                await self._commit(batch)
            try:
                await self._checkpoint()
            except Exception:  # noqa: BLE001 - never let a checkpoint stop the writer
                _log.exception("audit checkpoint failed")
            if self._closing and not self._pending:
                return

    async def _commit(self, batch: list[_Pending]) -> None:
        records: list[Record] = []
        try:
            async with self._io_lock:
                head = await self._current_head()
                records = self._seal(batch, head)
                await self._persist(records)
        except (StoreError, CheckpointError) as exc:
            self._fail(batch, f"audit record not durable: {exc}")
            return
        except Exception:  # noqa: BLE001 - a bug must fail the batch, never hang its callers
            _log.exception("audit writer failed")
            self._fail(batch, "audit writer failed")
            return
        self._last_batch_failed = False
        self.stats.batches += 1
        self.stats.records += len(records)
        for (_, _, future), record in zip(batch, records, strict=True):
            if not future.done():
                future.set_result(record)

    def _fail(self, batch: list[_Pending], message: str) -> None:
        self._last_batch_failed = True
        self.stats.failed_batches += 1
        _log.error("audit batch failed", extra={"records": len(batch), "error": message})
        for _, _, future in batch:
            if not future.done():
                future.set_exception(AppendFailed(message))

    async def _current_head(self) -> Head | None:
        spool = self.spool
        if spool is not None:
            if spool.dirty:
                await spool.open()
            if spool.pending:
                return spool.head
        if self.store.dirty or not self.store.opened:
            # SECURITY: a write of unknown outcome: learn the real tail first,
            # or the next records would fork the chain.
            await self.store.open()
        return self.store.head

    def _seal(self, batch: list[_Pending], head: Head | None) -> list[Record]:
        seq = head.seq if head is not None else 0
        prev = head.hash if head is not None else genesis_hash(self.chain_id)
        records = []
        for entry, ts, _ in batch:
            seq += 1
            record = Record.seal(entry, seq=seq, chain_id=self.chain_id, ts=ts, prev_hash=prev)
            records.append(record)
            prev = record.hash
        return records

    async def _persist(self, records: list[Record]) -> None:
        spool = self.spool
        if spool is None or not spool.pending:
            try:
                await self.store.write(records)
            except StoreError as exc:
                if spool is None:
                    raise
                _log.warning(
                    "audit store failed; spooling",
                    extra={"store": self.store.kind, "error": str(exc)},
                )
            else:
                return
        await spool.append(records)
        self.stats.spooled += len(records)
        self._drain_wakeup.set()

    # -- checkpoints ---------------------------------------------------------

    def _checkpoint_timeout(self) -> float | None:
        checkpointer = self.checkpointer
        head = self.store.head
        if checkpointer is None or head is None or head.seq <= checkpointer.last_seq:
            return None
        return max(checkpointer.seconds_until_due(), 0.01)

    async def _resume_checkpoints(self) -> None:
        checkpointer = self.checkpointer
        if checkpointer is None or self._checkpoints_resumed:
            return
        document = await self.store.last_checkpoint()
        last = None if document is None else Checkpoint.from_document(document)
        head = self.store.head
        if last is not None and (head is None or head.seq < last.seq):
            # SECURITY: the log is shorter than a signed checkpoint says it was.
            raise StoreError(
                f"the audit log ends at seq {head.seq if head else 0} but checkpoint "
                f"{last.seq} was signed: it was truncated; run audit verify"
            )
        checkpointer.resume(last)
        self._checkpoints_resumed = True

    async def _checkpoint(self, *, force: bool = False) -> None:
        checkpointer = self.checkpointer
        if checkpointer is None:
            return
        async with self._io_lock:
            head = self.store.head
            if self.spooling or not self.store.opened or head is None:
                checkpointer.postpone()
                return
            if not (checkpointer.due(head.seq) or (force and head.seq > checkpointer.last_seq)):
                return
            try:
                await self._resume_checkpoints()
                checkpoint = checkpointer.make(head.seq, head.hash)
                await self.store.write_checkpoint(checkpoint.to_document())
            except (StoreError, CheckpointError) as exc:
                _log.warning("audit checkpoint not written", extra={"error": str(exc)})
                checkpointer.postpone()
                return
            checkpointer.committed(checkpoint)
            self.stats.checkpoints += 1

    # -- draining the spool --------------------------------------------------

    async def _drain_loop(self) -> None:
        delay = _DRAIN_RETRY_MIN_S
        failing = False
        while not self._stopping:
            if not self.spooling:
                self._drained.set()
                self._drain_wakeup.clear()
                await self._drain_wakeup.wait()
                continue
            try:
                await self._drain_step()
            except ChainConflict as exc:
                _log.critical("audit spool cannot be drained", extra={"error": str(exc)})
                self.conflict = exc
                return
            except StoreError as exc:
                if not failing:
                    _log.warning("audit spool drain waiting", extra={"error": str(exc)})
                failing = True
                self._drain_wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drain_wakeup.wait(), delay)
                delay = min(delay * 2, _DRAIN_RETRY_MAX_S)
            except Exception:  # noqa: BLE001 - keep retrying; the spool keeps every record
                _log.exception("audit drainer failed")
                await asyncio.sleep(_DRAIN_RETRY_MAX_S)
            else:
                failing = False
                delay = _DRAIN_RETRY_MIN_S
        self._drained.set()

    async def _drain_step(self) -> None:
        """Move one batch of spooled records into the store, in order."""
        spool = self.spool
        assert spool is not None  # noqa: S101 - only called while spooling
        async with self._io_lock:
            if self.store.dirty or not self.store.opened:
                await self.store.open()
                await self._resume_checkpoints()
            records, next_offset = await spool.read(self._drain_offset, self._batch_max)
            base = self.store.head
            fresh = []
            for record in records:
                if base is not None and record.seq <= base.seq:
                    # Already in the store (a write whose answer was lost, or a
                    # drain cut short): it must be the very same record.
                    if record.seq == base.seq and record.hash != base.hash:
                        raise ChainConflict(
                            f"seq {record.seq} differs between the store and the spool"
                        )
                    continue
                fresh.append(record)
            if fresh:
                expected_seq = (base.seq if base else 0) + 1
                expected_prev = base.hash if base else genesis_hash(self.chain_id)
                if fresh[0].seq != expected_seq or fresh[0].prev_hash != expected_prev:
                    raise ChainConflict(
                        f"spooled seq {fresh[0].seq} does not continue the store "
                        f"(store ends at {expected_seq - 1})"
                    )
                await self.store.write(fresh)
                self.stats.drained += len(fresh)
            self._drain_offset = next_offset
            if next_offset >= spool.size:
                await spool.reset()
                self._drain_offset = 0
                _log.info(
                    "audit spool drained",
                    extra={
                        "store": self.store.kind,
                        "audit_seq": self.store.head.seq if self.store.head else 0,
                    },
                )
