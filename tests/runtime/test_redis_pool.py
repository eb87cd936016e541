"""The shared Redis pool waits for a free connection, within the pool timeout and the call's
deadline, instead of refusing the command (runtime/redis_pool.py), against a real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from agentmesh.services.cli.processes import free_port, start_redis
from agentmesh.services.runtime.context import deadline_var
from agentmesh.services.runtime.redis_pool import pooled_redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("redis-pool")
    port = free_port()
    proc = start_redis(port, folder / "data", folder / "logs")
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


async def test_commands_beyond_the_pool_wait_for_a_connection_instead_of_failing(redis_url):
    client = pooled_redis(redis_url, max_connections=2, pool_timeout_s=10, client_name="pool-test")
    observer = pooled_redis(redis_url)
    try:
        # 20 commands that each hold their connection 0.1 s, on 2 connections: all succeed.
        commands = asyncio.gather(*(client.execute_command("DEBUG", "SLEEP", "0.1") for _ in range(20)))
        await asyncio.sleep(0.3)
        opened = [c for c in await observer.client_list() if c["name"] == "pool-test"]
        assert len(await commands) == 20
        assert 1 <= len(opened) <= 2, opened
    finally:
        await client.aclose()
        await observer.aclose()


async def test_the_wait_ends_at_the_calls_deadline_with_a_connection_error(redis_url):
    client = pooled_redis(redis_url, max_connections=1, pool_timeout_s=10)
    try:
        busy = asyncio.create_task(client.execute_command("DEBUG", "SLEEP", "1.5"))
        await asyncio.sleep(0.2)  # the only connection is now taken

        async def within_deadline():
            deadline_var.set(time.monotonic() + 0.3)
            return await client.ping()

        started = time.monotonic()
        with pytest.raises(RedisConnectionError, match="deadline"):
            await asyncio.create_task(within_deadline())
        assert time.monotonic() - started < 1.0, "waited past the call's deadline"
        await busy
        assert await client.ping()  # the pool is usable again
    finally:
        await client.aclose()
