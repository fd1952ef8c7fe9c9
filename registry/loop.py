"""One background task per object: the registry's sweeper and outbox relay."""

from __future__ import annotations

import abc
import asyncio
import contextlib
from typing import ClassVar

__all__ = ["BackgroundLoop"]


class BackgroundLoop(abc.ABC):
    """Runs :meth:`_run` as one task; :meth:`start` is idempotent, :meth:`close` cancels it."""

    #: The asyncio task's name.
    task_name: ClassVar[str]

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @abc.abstractmethod
    async def _run(self) -> None:
        """The loop; runs until cancelled."""
