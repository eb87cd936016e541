"""Health and failure behaviour of the memory service when its Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.cli.processes import free_port, start_redis
from agentmesh.services.memory.service import MemoryService, MemorySettings
from agentmesh.services.runtime.settings import SERVICE_NAMES
from tests.memory.conftest import RedisServer
from tests.support import running_service

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def wait_for_status(health: health_pb2_grpc.HealthStub, wanted: int, within_s: float) -> float:
    """Poll Health/Check until it answers ``wanted``; return the seconds it took."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < within_s:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAMES["memory"]), timeout=2)
        last = reply.status
        if last == wanted:
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"health stayed {health_pb2.HealthCheckResponse.ServingStatus.Name(last)} for {within_s} s")


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A Redis only this test stops and restarts."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


async def test_health_follows_redis_down_and_back(own_redis: RedisServer):
    settings = MemorySettings(
        redis_url=own_redis.url, readiness_interval_s=0.2, redis_timeout_s=0.5, facts_enabled=False
    )
    session = f"s-{uuid.uuid4().hex[:8]}"
    request = memory_pb2.AppendMessagesRequest(
        session_id=session, messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="before")]
    )
    async with running_service(MemoryService(settings)) as address, grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        memory = memory_pb2_grpc.MemoryServiceStub(channel)
        await wait_for_status(health, SERVING, within_s=5)
        assert (await memory.AppendMessages(request, timeout=5)).version == 1
        # Concurrent reads fill the client's connection pool with several connections.
        read = memory_pb2.GetContextRequest(session_id=session)
        await asyncio.gather(*(memory.GetContext(read, timeout=5) for _ in range(8)))

        own_redis.stop()
        took = await wait_for_status(health, NOT_SERVING, within_s=5)
        assert took < 3

        # While Redis is down a call fails fast with UNAVAILABLE naming the store.
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await memory.GetContext(memory_pb2.GetContextRequest(session_id=session), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"Redis at 127.0.0.1:{own_redis.port}/0" in err.value.details()
        assert "unreachable" in err.value.details()
        assert time.monotonic() - start < 3
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await memory.AppendMessages(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        own_redis.restart()  # same port, same data dir (AOF on)
        await wait_for_status(health, SERVING, within_s=10)

        # The first calls after the outage work (no connection left over from before it is
        # used; writes are not retried, so one would fail) and see the data from before.
        replies = await asyncio.gather(*(memory.AppendMessages(request, timeout=5) for _ in range(8)))
        assert sorted(r.version for r in replies) == list(range(2, 10))
        reply = await memory.GetContext(read, timeout=5)
        assert [m.content for m in reply.messages] == ["before"] * 9


async def test_starts_not_serving_when_redis_is_absent_and_turns_serving_when_it_appears(tmp_path):
    port = free_port()
    settings = MemorySettings(
        redis_url=f"redis://127.0.0.1:{port}/0", readiness_interval_s=0.2, redis_timeout_s=0.5, facts_enabled=False
    )
    async with running_service(MemoryService(settings), wait_serving=False) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await asyncio.sleep(1.0)  # several probe rounds against nothing
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAMES["memory"]), timeout=2)
            assert reply.status == NOT_SERVING
            proc = start_redis(port, tmp_path / "data", tmp_path / "logs")
            try:
                await wait_for_status(health, SERVING, within_s=10)
            finally:
                proc.stop()
