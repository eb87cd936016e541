"""Bounded background job queues of the memory service (compaction and fact extraction).

Work that must never add latency to the chat path runs here: ``submit`` never waits — when the
queue is full the job is dropped (counted and logged) and the append that caused it succeeds
anyway. One worker per queue runs jobs one at a time, each in the contextvars of the request that
submitted it (tenant and request id travel to downstream calls), but without that request's
deadline. Pending jobs live in this process only: a restart loses them (compaction is triggered
again by the session's next append; extraction of those messages is skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from agentmesh.services.runtime.context import deadline_var

log = logging.getLogger("agentmesh.memory")


@dataclass
class _Entry:
    key: Hashable
    job: Any
    context: contextvars.Context
    cancelled: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class JobQueue:
    """A bounded FIFO of jobs for ``run(job)``, with one worker.

    Jobs with the same ``key`` coalesce while one is pending (compaction of a session is asked
    once, however many appends trigger it).
    """

    def __init__(self, name: str, maxsize: int, run: Callable[[Any], Awaitable[None]]):
        self.name = name
        self._run = run
        self._queue: asyncio.Queue[_Entry] = asyncio.Queue(maxsize)
        self._pending: dict[Hashable, _Entry] = {}
        self._current: _Entry | None = None
        self._worker: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        #: Jobs dropped because the queue was full, and jobs that failed.
        self.dropped = 0
        self.failed = 0
        self.completed = 0

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._loop(), name=f"memory-{self.name}")

    def submit(self, key: Hashable, job: Any) -> bool:
        """Queue ``job`` without waiting; False when it coalesced with a pending one or the queue
        is full (then it is dropped and counted)."""
        if key in self._pending:
            return False
        entry = _Entry(key, job, contextvars.copy_context())
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("background queue full; job dropped",
                        extra={"fields": {"queue": self.name, "dropped": self.dropped}})
            return False
        self._pending[key] = entry
        self._idle.clear()
        return True

    async def quiesce(self, matches: Callable[[Any], bool], timeout_s: float = 30.0) -> None:
        """Cancel pending jobs ``matches`` selects and wait (at most ``timeout_s``) for a
        running one it selects to finish."""
        for entry in list(self._pending.values()):
            if matches(entry.job):
                entry.cancelled = True
                self._pending.pop(entry.key, None)
        current = self._current
        if current is not None and matches(current.job):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await current.done.wait()

    async def idle(self, timeout_s: float = 60.0) -> None:
        """Wait until no job is pending or running (tests and graceful shutdown)."""
        async with asyncio.timeout(timeout_s):
            await self._idle.wait()

    @property
    def size(self) -> int:
        return self._queue.qsize()

    async def _loop(self) -> None:
        while True:
            entry = await self._queue.get()
            if self._pending.get(entry.key) is entry:
                del self._pending[entry.key]
            if not entry.cancelled:
                self._current = entry
                try:
                    await asyncio.create_task(self._one(entry), context=entry.context)
                    self.completed += 1
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - a failed job must not stop the worker
                    self.failed += 1
                    log.exception("background job failed", extra={"fields": {"queue": self.name}})
                finally:
                    self._current = None
                    entry.done.set()
            self._queue.task_done()
            if self._queue.empty() and not self._pending:
                self._idle.set()

    async def _one(self, entry: _Entry) -> None:
        deadline_var.set(None)  # the submitting request's deadline does not bind background work
        await self._run(entry.job)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
