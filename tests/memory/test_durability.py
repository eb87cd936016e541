"""Durability: a real redis-server started with the shipped local settings
(``agentmesh.services.cli.processes.start_redis``: AOF on, ``appendfsync`` left at Redis's
``everysec``) is stopped — gracefully, and by a crash (SIGKILL) — while appenders are running,
then restarted on the same data directory. Every append the service acknowledged is found, at
the version it was acknowledged with; appends that failed during the outage and are retried with
their idempotency key end up stored exactly once."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.memory.service import MemoryService, MemorySettings
from tests.memory.conftest import RedisServer
from tests.support import running_service

MD = (("x-tenant-id", "durable"),)


@pytest.mark.parametrize("stop", ["terminate", "kill"])
async def test_every_acknowledged_append_survives_a_redis_restart(tmp_path, stop):
    server = RedisServer(tmp_path)
    try:
        async with aioredis.Redis.from_url(server.url) as raw:
            config = await raw.config_get("append*")
        # The shipped settings: AOF on, fsync every second (Redis's default) or on every write.
        assert config["appendonly"] == "yes" and config["appendfsync"] in ("everysec", "always")

        settings = MemorySettings(redis_url=server.url, facts_enabled=False, compaction_trigger_tokens=0,
                                  readiness_interval_s=0.2, redis_timeout_s=0.5)
        async with running_service(MemoryService(settings)) as address, grpc.aio.insecure_channel(address) as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            acknowledged: dict[str, int] = {}
            failed: list[str] = []
            running = True

            async def writer(w: int) -> None:
                n = 0
                while running:
                    text = f"w{w}-{n}"
                    n += 1
                    request = memory_pb2.AppendMessagesRequest(
                        session_id="journal", idempotency_key=text,
                        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
                    )
                    try:
                        reply = await stub.AppendMessages(request, metadata=MD, timeout=2)
                        acknowledged[text] = reply.version
                    except grpc.aio.AioRpcError as err:
                        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                        failed.append(text)
                        await asyncio.sleep(0.05)

            writers = [asyncio.create_task(writer(w)) for w in range(8)]
            await asyncio.sleep(0.6)
            before = len(acknowledged)
            if stop == "kill":
                server.kill()
            else:
                server.stop()
            await asyncio.sleep(0.5)  # appends fail while Redis is away
            server.restart()
            await asyncio.sleep(0.8)
            running = False
            await asyncio.gather(*writers)
            assert before > 50 and failed and len(acknowledged) > before  # it ran before, during and after

            # Appends that failed are retried with their key: each lands exactly once.
            for text in failed:
                reply = await stub.AppendMessages(
                    memory_pb2.AppendMessagesRequest(
                        session_id="journal", idempotency_key=text,
                        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
                    ),
                    metadata=MD, timeout=5,
                )
                acknowledged.setdefault(text, reply.version)

            stored: list[str] = []
            cursor = 1
            while cursor:
                page = await stub.ListMessages(
                    memory_pb2.ListMessagesRequest(session_id="journal", from_sequence=cursor, limit=1000),
                    metadata=MD, timeout=10,
                )
                stored.extend(m.message.content for m in page.messages)
                cursor = page.next_sequence
    finally:
        server.stop()

    missing = [t for t, v in acknowledged.items() if v > len(stored) or stored[v - 1] != t]
    assert missing == [], f"{len(missing)} acknowledged appends are not where they were acknowledged"
    assert len(stored) == len(set(stored)) == len(acknowledged)  # nothing twice, nothing unaccounted for


async def test_watches_resume_after_a_redis_restart(tmp_path):
    """A watch cannot outlive its Redis: it ends with UNAVAILABLE, and a watch resumed with
    ``after_sequence`` once Redis is back gets everything it missed and then live messages — the
    process's one pub/sub connection has reconnected."""
    server = RedisServer(tmp_path)
    settings = MemorySettings(redis_url=server.url, facts_enabled=False, compaction_trigger_tokens=0,
                              readiness_interval_s=0.2, redis_timeout_s=0.5, watch_poll_s=30)
    try:
        async with running_service(MemoryService(settings)) as address, grpc.aio.insecure_channel(address) as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)

            async def say(text: str) -> int:
                reply = await stub.AppendMessages(memory_pb2.AppendMessagesRequest(
                    session_id="watched", messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)]),
                    metadata=MD, timeout=5)
                return reply.version

            await say("one")
            events: list[memory_pb2.WatchSessionResponse] = []
            call = stub.WatchSession(memory_pb2.WatchSessionRequest(session_id="watched", after_sequence=0),
                                     metadata=MD, timeout=60)

            async def read() -> None:
                async for event in call:
                    events.append(event)

            reader = asyncio.create_task(read())
            while len(events) < 2:
                await asyncio.sleep(0.02)
            server.stop()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(reader, 10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            server.restart()
            deadline = asyncio.get_running_loop().time() + 10
            while True:  # the first calls after the restart may still find Redis loading
                try:
                    await say("two")
                    break
                except grpc.aio.AioRpcError:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.2)
            last = events[-1].message.sequence
            resumed: list[memory_pb2.WatchSessionResponse] = []

            async def read_resumed() -> None:
                async for event in stub.WatchSession(
                    memory_pb2.WatchSessionRequest(session_id="watched", after_sequence=last), metadata=MD, timeout=60
                ):
                    resumed.append(event)

            second = asyncio.create_task(read_resumed())
            while len(resumed) < 2:
                await asyncio.sleep(0.02)
            await say("three")  # delivered live: within the poll interval (30 s) only by a notification
            async with asyncio.timeout(5):
                while len(resumed) < 3:
                    await asyncio.sleep(0.02)
            second.cancel()
            assert [e.message.message.content for e in resumed[1:]] == ["two", "three"]
    finally:
        server.stop()
