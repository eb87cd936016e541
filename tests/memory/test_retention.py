"""Retention deletes derived data too: the facts extracted from messages that a session TTL or
keep-last trimming removed are pruned by the retention sweeper, in Milvus, and nothing of those
messages stays in Redis. Real Redis, real Milvus Lite, real embeddings, heuristic extraction."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from pymilvus import MilvusClient

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.memory.service import MemoryService
from tests.memory.conftest import RedisServer, memory_service

U = common_pb2.ROLE_USER
COLLECTION = "agentmesh_memory_facts"
INDEX = "agentmesh:retention"
MD = (("x-tenant-id", "t1"),)
SWEEP_S = 0.2

pytestmark = pytest.mark.timeout(120)


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def rows_of(milvus: MilvusClient, user: str) -> dict[str, dict]:
    """The user's stored facts by text, straight from Milvus."""
    rows = milvus.query(COLLECTION, filter=f'tenant == "t1" and user_id == "{user}"',
                        output_fields=["fact_id", "text", "session_ids", "sources"], consistency_level="Strong")
    return {r["text"]: r for r in rows}


async def until(check, timeout_s: float = 30.0):
    """Poll ``check()`` (sync or async) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def say(stub, user: str, session: str, *texts: str) -> list[str]:
    reply = await stub.AppendMessages(memory_pb2.AppendMessagesRequest(
        session_id=session, user_id=user, messages=[common_pb2.Message(role=U, content=t) for t in texts]),
        metadata=MD, timeout=10)
    return list(reply.message_ids)


async def index_members(redis: aioredis.Redis, user: str, index: str = INDEX) -> list[str]:
    return [m.decode() for m in await redis.zrange(index, 0, -1) if f"/{user}/".encode() in m]


async def keys_and_values_holding(redis: aioredis.Redis, needles: list[bytes]) -> list[bytes]:
    """Every key whose name or value (strings, lists, hashes, sorted sets) holds one of ``needles``."""
    found = []
    async for key in redis.scan_iter(count=1000):
        kind = await redis.type(key)
        if kind == b"list":
            values = await redis.lrange(key, 0, -1)
        elif kind == b"hash":
            values = list((await redis.hgetall(key)).values())
        elif kind == b"zset":
            values = await redis.zrange(key, 0, -1)
        elif kind == b"string":
            values = [await redis.get(key)]
        else:
            values = []
        if any(n in key or any(n in v for v in values) for n in needles):
            found.append(key)
    return found


@pytest.fixture(scope="module")
async def service(redis_server: RedisServer, extractive_router: str, embedder, tmp_path_factory
                  ) -> AsyncIterator[tuple[MemoryService, str]]:
    uri = str(tmp_path_factory.mktemp("milvus") / "memory.db")
    async with memory_service(redis_server.url, router=extractive_router, embedder=embedder, milvus_uri=uri,
                              compaction_trigger_tokens=0, extraction="heuristic",
                              retention_sweep_s=SWEEP_S) as pair:
        yield pair


@pytest.fixture
async def stub(service) -> AsyncIterator[memory_pb2_grpc.MemoryServiceStub]:
    async with grpc.aio.insecure_channel(service[1]) as channel:
        yield memory_pb2_grpc.MemoryServiceStub(channel)


@pytest.fixture
def milvus(service) -> MilvusClient:
    return MilvusClient(uri=service[0].settings.milvus_uri)


async def test_ttl_expiry_deletes_the_facts_only_the_expired_session_supported(service, stub, milvus, raw_redis):
    svc, _ = service
    user, short, lasting = new_id("u"), new_id("short"), new_id("long")
    name_id, speak_short = await say(stub, user, short, "My name is Ana Duarte.", "I speak Portuguese and Spanish.")
    speak_long, cold = await say(stub, user, lasting, "I speak Portuguese and Spanish.", "I hate cold weather.")
    # A fact given directly, naming the session but no message: not derived from a message.
    await stub.RememberFacts(memory_pb2.RememberFactsRequest(user_id=user, facts=[memory_pb2.FactInput(
        text="Prefers answers in Portuguese.", kind=memory_pb2.FACT_KIND_PREFERENCE,
        sources=[memory_pb2.FactSource(session_id=short)])]), metadata=MD, timeout=30)
    await svc.extractions.idle()
    before = rows_of(milvus, user)
    assert set(before) == {"My name is Ana Duarte.", "I speak Portuguese and Spanish.", "I hate cold weather.",
                           "Prefers answers in Portuguese."}
    assert sorted(before["I speak Portuguese and Spanish."]["session_ids"]) == sorted([short, lasting])

    reply = await stub.SetRetention(memory_pb2.SetRetentionRequest(session_id=short, user_id=user, ttl_s=1),
                                    metadata=MD, timeout=10)
    assert reply.ttl_s == 1
    # The expiry is indexed in the same script that set it, due when the keys expire.
    (member,) = await index_members(raw_redis, user)
    assert member.startswith(f"t1/{user}/{short}/")
    due_ms = await raw_redis.zscore(INDEX, member)
    assert 0 < due_ms - time.time() * 1000 <= 1000

    # Redis expires the keys on its own; the sweeper then prunes the facts and drops the entry.
    await until(lambda: _no_members(raw_redis, user), 15)
    rows = rows_of(milvus, user)
    assert set(rows) == {"I speak Portuguese and Spanish.", "I hate cold weather.", "Prefers answers in Portuguese."}
    shared = rows["I speak Portuguese and Spanish."]
    assert shared["session_ids"] == [lasting]
    assert shared["sources"] == [{"session_id": lasting, "message_id": speak_long}]
    assert rows["I hate cold weather."]["sources"] == [{"session_id": lasting, "message_id": cold}]
    assert rows["Prefers answers in Portuguese."]["session_ids"] == [short]  # named no message: kept
    assert name_id and speak_short
    # Gone from Redis: no key of the session, no index entry, nothing that held what was said only there.
    assert [k async for k in raw_redis.scan_iter(match=f"*:{user}:{{{short}}}*")] == []
    assert await index_members(raw_redis, user) == []
    assert await keys_and_values_holding(raw_redis, [b"Ana Duarte", short.encode()]) == []
    # And through the API: recall no longer finds the name.
    recalled = await stub.RecallFacts(memory_pb2.RecallFactsRequest(user_id=user, query="What is the user's name?"),
                                      metadata=MD, timeout=30)
    assert "My name is Ana Duarte." not in [f.fact.text for f in recalled.facts]
    assert svc.sweeper.total.facts_deleted >= 1 and svc.sweeper.total.facts_updated >= 1


async def test_keep_last_trimming_deletes_the_facts_of_trimmed_messages(service, stub, milvus, raw_redis):
    svc, _ = service
    user, session = new_id("u"), new_id("s")
    m1, m2, m3, m4 = await say(stub, user, session, "I live in Lisbon.", "I work as a nurse.", "I live in Lisbon.",
                               "Thanks for the help so far.")
    await svc.extractions.idle()
    before = rows_of(milvus, user)
    assert set(before) == {"I live in Lisbon.", "I work as a nurse."}
    assert [s["message_id"] for s in before["I live in Lisbon."]["sources"]] == [m1, m3]

    reply = await stub.SetRetention(memory_pb2.SetRetentionRequest(
        session_id=session, user_id=user, keep_last_messages=2), metadata=MD, timeout=10)
    assert reply.messages_deleted == 2  # m1 and m2
    # Pruned, then (no TTL, nothing left to prune) the session leaves the index.
    await until(lambda: _no_members(raw_redis, user), 15)
    rows = rows_of(milvus, user)
    # The nurse fact came from m2 only: deleted. Lisbon was said again in m3, which is kept.
    assert set(rows) == {"I live in Lisbon."}
    assert rows["I live in Lisbon."]["sources"] == [{"session_id": session, "message_id": m3}]
    assert rows["I live in Lisbon."]["fact_id"] == before["I live in Lisbon."]["fact_id"]

    # Trimming by an append works the same way: m3 goes, and with it the last source of Lisbon.
    (m5,) = await say(stub, user, session, "My dog is called Rex.")
    await svc.extractions.idle()
    await until(lambda: _no_members(raw_redis, user), 15)
    rows = rows_of(milvus, user)
    assert set(rows) == {"My dog is called Rex."}
    assert rows["My dog is called Rex."]["sources"] == [{"session_id": session, "message_id": m5}]
    # The trimmed messages are gone from Redis as well.
    assert await keys_and_values_holding(raw_redis, [b"work as a nurse", b"live in Lisbon"]) == []
    listed = await stub.ListMessages(memory_pb2.ListMessagesRequest(session_id=session, user_id=user), metadata=MD,
                                     timeout=10)
    assert [m.id for m in listed.messages] == [m4, m5]


async def _no_members(redis: aioredis.Redis, user: str, index: str = INDEX) -> bool:
    return await index_members(redis, user, index) == []


async def test_delete_with_keep_facts_and_forget_user_leave_no_index_entry(service, stub, milvus, raw_redis):
    svc, _ = service
    user, kept, other = new_id("u"), new_id("kept"), new_id("other")
    await say(stub, user, kept, "I own a sailboat.")
    await say(stub, user, other, "I grew up in Porto.")
    await svc.extractions.idle()
    for session in (kept, other):
        await stub.SetRetention(memory_pb2.SetRetentionRequest(session_id=session, user_id=user, ttl_s=60),
                                metadata=MD, timeout=10)
    assert len(await index_members(raw_redis, user)) == 2

    # keep_facts: the session leaves the index, so no later sweep takes its facts.
    await stub.DeleteSession(memory_pb2.DeleteSessionRequest(session_id=kept, user_id=user, keep_facts=True),
                             metadata=MD, timeout=30)
    assert [m.split("/")[2] for m in await index_members(raw_redis, user)] == [other]
    await asyncio.sleep(3 * SWEEP_S)
    assert set(rows_of(milvus, user)) == {"I own a sailboat.", "I grew up in Porto."}

    # ForgetUser: every index entry naming the user goes with the rest.
    await stub.ForgetUser(memory_pb2.ForgetUserRequest(user_id=user), metadata=MD, timeout=30)
    assert await index_members(raw_redis, user) == []
    assert await keys_and_values_holding(raw_redis, [user.encode()]) == []
    assert rows_of(milvus, user) == {}


async def test_an_expiry_while_no_replica_runs_is_swept_by_the_next_one(redis_server, extractive_router, embedder,
                                                                       tmp_path, raw_redis):
    uri = str(tmp_path / "memory.db")
    user, session = new_id("u"), new_id("s")
    # Its own key prefix: the module's service (another Milvus file) must not sweep this index.
    prefix = "restart"
    index = f"{prefix}:retention"
    settings = {"compaction_trigger_tokens": 0, "extraction": "heuristic", "retention_sweep_s": SWEEP_S,
                "key_prefix": prefix}
    async with memory_service(redis_server.url, router=extractive_router, embedder=embedder, milvus_uri=uri,
                              **settings) as (svc, address), grpc.aio.insecure_channel(address) as channel:
        milvus = MilvusClient(uri=uri)  # opened while the service holds the file: one Milvus Lite server
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        await say(stub, user, session, "I speak Finnish.")
        await svc.extractions.idle()
        await stub.SetRetention(memory_pb2.SetRetentionRequest(session_id=session, user_id=user, ttl_s=1),
                                metadata=MD, timeout=10)
    # No service runs while the session expires: nobody could have heard a notification.
    await until(lambda: _gone(raw_redis, user, session), 10)
    assert set(rows_of(milvus, user)) == {"I speak Finnish."}
    assert len(await index_members(raw_redis, user, index)) == 1
    async with memory_service(redis_server.url, router=extractive_router, embedder=embedder, milvus_uri=uri,
                              **settings):
        await until(lambda: _no_members(raw_redis, user, index), 15)
        assert rows_of(milvus, user) == {}


async def _gone(redis: aioredis.Redis, user: str, session: str) -> bool:
    return [k async for k in redis.scan_iter(match=f"*:{user}:{{{session}}}*")] == []


async def test_a_member_the_scripts_did_not_write_is_dropped_not_retried_forever(service, raw_redis):
    await raw_redis.zadd(INDEX, {"not/a member": 0, "t1/bad{user/s/0123": 0})
    await until(lambda: _absent(raw_redis, ["not/a member", "t1/bad{user/s/0123"]), 10)


async def _absent(redis: aioredis.Redis, members: list[str]) -> bool:
    return [await redis.zscore(INDEX, m) for m in members] == [None] * len(members)
