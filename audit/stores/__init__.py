"""Where a chain is kept: the interface every store implements.

A store holds one chain. ``write`` returns only once the batch is durable;
when it raises, the batch was either not written at all, or the store marks
itself :attr:`Store.dirty` (it cannot tell, e.g. a COMMIT whose answer was
lost) and refuses further writes until :meth:`Store.open` has re-read its
real tail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from audit.record import Record

__all__ = ["Head", "Store", "StoreError"]


class StoreError(Exception):
    """The store could not be opened, read or written."""


@dataclass(frozen=True, slots=True)
class Head:
    """The last durable record of a chain: its sequence number and hash."""

    seq: int
    hash: str


class Store(Protocol):
    #: Short name for logs and metrics ("file", "postgres").
    kind: str

    @property
    def head(self) -> Head | None:
        """The tail as last read or written; None for an empty chain."""
        ...

    @property
    def dirty(self) -> bool:
        """True when a failed write may have left part of a batch behind."""
        ...

    @property
    def opened(self) -> bool:
        """True once :meth:`open` succeeded."""
        ...

    @property
    def syncs(self) -> int:
        """Durable writes done (fsyncs or commits), for group-commit accounting."""
        ...

    async def open(self) -> Head | None:
        """Connect or open, recover, and return the durable tail."""
        ...

    async def write(self, records: Sequence[Record]) -> None:
        """Append ``records`` (which continue :attr:`head`) durably, in one sync."""
        ...

    async def write_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store a signed checkpoint document durably."""
        ...

    async def last_checkpoint(self) -> dict[str, Any] | None:
        """The most recent checkpoint document, or None."""
        ...

    async def close(self) -> None: ...
