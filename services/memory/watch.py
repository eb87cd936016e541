"""Change notifications of sessions, over ONE Redis pub/sub connection per service process.

Every write script publishes on the session's channel (``v<version>`` after an append, ``d`` when
the session is deleted). Notifications are only a wake-up signal: pub/sub delivers at most once
and drops messages while a connection is down, so a waiter always re-reads the session from its
list after waking, and also wakes on its own every ``poll_s`` seconds and whenever the pub/sub
connection is re-established. Nothing is therefore lost, only possibly delayed by ``poll_s``.

:class:`SessionEvents` keeps one subscription per channel that at least one local waiter wants
(reference-counted) and fans notifications out to those waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

log = logging.getLogger("agentmesh.memory")

#: Seconds between reconnection attempts of the pub/sub connection.
RECONNECT_DELAY_S = 0.5


class Waiter:
    """A local subscriber of one channel: :meth:`wait` returns at the next notification."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.deleted = False

    def notify(self, payload: str) -> None:
        if payload == "d":
            self.deleted = True
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        """Wait for a notification (or a reconnection) for at most ``timeout_s`` seconds; True
        when one came. Notifications that arrived since the last wait count."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._event.wait()
        except TimeoutError:
            return False
        finally:
            self._event.clear()
        return True


class SessionEvents:
    """Fans out session notifications from one pub/sub connection (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis):
        self._redis = redis
        self._waiters: dict[str, set[Waiter]] = {}
        self._pubsub = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        #: Channels whose SUBSCRIBE Redis has confirmed on the current connection.
        self._confirmed: dict[str, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str, confirm_s: float = 1.0) -> AsyncIterator[Waiter]:
        """A :class:`Waiter` on ``channel`` for the duration of the block. When Redis is
        reachable the block starts once Redis has confirmed the subscription (at most
        ``confirm_s`` seconds), so every later publish reaches the waiter; otherwise the waiter
        relies on its own polling until the connection is back."""
        waiter = Waiter()
        first = channel not in self._waiters
        self._waiters.setdefault(channel, set()).add(waiter)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_loop(), name="memory-session-events")
        if first:
            self._confirmed[channel] = asyncio.Event()
            async with self._lock:
                if self._pubsub is not None:
                    with contextlib.suppress(redis_errors.RedisError, OSError):
                        await self._pubsub.subscribe(channel)
            self._changed.set()
        confirmed = self._confirmed.get(channel)
        if confirmed is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(confirm_s):
                    await confirmed.wait()
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(channel)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[channel]
                    self._confirmed.pop(channel, None)
                    async with self._lock:
                        if self._pubsub is not None:
                            with contextlib.suppress(redis_errors.RedisError, OSError):
                                await self._pubsub.unsubscribe(channel)

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.notify("")

    async def _connect(self) -> None:
        async with self._lock:
            pubsub = self._redis.pubsub()
            channels = list(self._waiters)
            for event in self._confirmed.values():
                event.clear()
            if channels:
                await pubsub.subscribe(*channels)
            self._pubsub = pubsub

    async def _drop(self) -> None:
        async with self._lock:
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()
                self._pubsub = None

    async def _read_loop(self) -> None:
        while True:
            if not self._waiters:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                if self._pubsub is None:
                    await self._connect()
                    self._wake_all()  # anything published while we were away is re-read
                message = await self._pubsub.get_message(timeout=1.0)
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("session notifications interrupted; reconnecting", extra={"fields": {"error": str(exc)}})
                await self._drop()
                self._wake_all()
                await asyncio.sleep(RECONNECT_DELAY_S)
                continue
            if message is None:
                continue
            channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            if message.get("type") == "subscribe":
                if (event := self._confirmed.get(channel)) is not None:
                    event.set()
                continue
            if message.get("type") != "message":
                continue
            data = message["data"].decode() if isinstance(message["data"], bytes) else str(message["data"])
            for waiter in list(self._waiters.get(channel, ())):
                waiter.notify(data)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self._drop()
