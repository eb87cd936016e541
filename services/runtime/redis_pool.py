"""One Redis connection pool policy for every service that talks to Redis.

redis-py's default asyncio pool holds at most 100 connections and *refuses* the 101st concurrent
command ("Too many connections"): under load (500 concurrent runs) half the calls failed with
UNAVAILABLE although Redis itself was idle. :class:`DeadlinePool` is a
``BlockingConnectionPool`` instead: a command that finds every connection in use waits for one,
for at most ``pool_timeout_s`` and never past the current gRPC call's deadline.
:class:`RedisPoolSettings` adds the two knobs to a service's settings
(``AGENTMESH_<KIND>_REDIS_MAX_CONNECTIONS``, ``AGENTMESH_<KIND>_REDIS_POOL_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.exceptions import ConnectionError as RedisConnectionError

from agentmesh.services.runtime.context import remaining_s


class RedisPoolSettings(BaseModel):
    """Mixin for a service's settings: the size of its Redis pool and the longest wait for it."""

    redis_max_connections: int = Field(
        256, ge=1, description="Connections to Redis this replica opens at most; a command finding all in use waits "
        "for one (see redis_pool_timeout_s) instead of failing.",
    )
    redis_pool_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for a free Redis connection, in seconds (never past the call's deadline).",
    )


class DeadlinePool(aioredis.BlockingConnectionPool):
    """At most ``max_connections`` Redis connections; a command that finds them all in use waits
    for one to be released for at most ``timeout`` seconds and never past the current gRPC call's
    deadline. Raises redis ``ConnectionError`` (which the services answer as UNAVAILABLE) when
    none came free in time."""

    async def get_connection(self, *args: Any, **kwargs: Any):
        left = remaining_s()
        if left is None or (self.timeout is not None and left >= self.timeout):
            return await super().get_connection()
        try:
            async with asyncio.timeout(max(left, 0.001)):
                return await super().get_connection()
        except TimeoutError as exc:
            raise RedisConnectionError(
                f"no Redis connection came free before the call's deadline (all {self.max_connections} in use)"
            ) from exc


def pooled_redis(url: str, *, max_connections: int = 256, pool_timeout_s: float = 10.0, **options: Any) -> aioredis.Redis:
    """An asyncio Redis client on a :class:`DeadlinePool` for ``url``; ``options`` are the
    connection options of ``redis.asyncio.Redis.from_url`` (``socket_timeout``, ``retry``...).
    Closing the client closes the pool."""
    pool = DeadlinePool.from_url(url, max_connections=max_connections, timeout=pool_timeout_s, **options)
    return aioredis.Redis.from_pool(pool)
