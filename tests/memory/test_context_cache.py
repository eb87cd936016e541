"""The GetContext message cache (cache.py): wire framing, bounds, and that a cached read is the
same as an uncached one whatever happens to the session (appends, trimming, deletion, pins and
corruption), against a real Redis."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
import redis.asyncio as aioredis

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.services.memory.cache import CachedWindow, ContextCache, frame
from agentmesh.services.memory.store import SessionStore
from agentmesh.services.runtime.errors import ServiceError
from agentmesh.services.runtime.tokens import default_token_counter

U, A, S = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_SYSTEM


def msg(role: int, text: str, **kw) -> common_pb2.Message:
    return common_pb2.Message(role=role, content=text, **kw)


def test_frames_concatenate_into_a_context_response():
    messages = [msg(U, "short"), msg(A, "é" * 300, name="bot"), msg(U, "")]  # 1- and 2-byte lengths, empty
    blobs = [memory_pb2.SessionMessage(message=m, created_at_ms=1_763_000_000_000, tokens=9).SerializeToString()
             for m in messages]
    # A blob whose fields come in another order (not how the store writes, still a SessionMessage).
    reordered = (memory_pb2.SessionMessage(created_at_ms=5).SerializeToString()
                 + memory_pb2.SessionMessage(message=msg(U, "reordered")).SerializeToString())
    ids = ["0123456789abcdef-1", "0123456789abcdef-2", "0123456789abcdef-3", "0123456789abcdef-4"]
    wire = b"".join(frame(b, i) for b, i in zip([*blobs, reordered], ids, strict=True))
    parsed = memory_pb2.GetContextResponse.FromString(wire)
    assert list(parsed.messages) == [*messages, msg(U, "reordered")]
    assert list(parsed.message_ids) == ids
    assert parsed.version == 0 and parsed.tokens_used == 0  # nothing of the stored extras leaks


def test_cache_is_bounded_by_bytes_and_idle_time():
    cache = ContextCache(max_bytes=100, idle_s=0.05)
    cache.put("a", CachedWindow("i", 1, (b"x" * 40,), 40))
    cache.put("b", CachedWindow("i", 1, (b"x" * 40,), 40))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", CachedWindow("i", 1, (b"x" * 40,), 40))
    assert (cache.get("b"), len(cache), cache.bytes) == (None, 2, 80)  # b was evicted
    cache.put("big", CachedWindow("i", 1, (b"x" * 101,), 101))
    assert cache.get("big") is None  # larger than the whole cache: not kept
    assert cache.drop_prefix("a") == 1 and cache.get("a") is None
    time.sleep(0.06)
    assert cache.expire() == 1 and len(cache) == 0 and cache.bytes == 0


async def test_a_cached_read_always_equals_an_uncached_one(raw_redis: aioredis.Redis):
    counter = default_token_counter()
    cached = SessionStore(raw_redis, counter, location="test", page_size=3)
    fresh = SessionStore(raw_redis, counter, location="test", page_size=3, cache=ContextCache(0))
    ref = cached.ref("acme", "ann", f"c-{uuid.uuid4().hex[:8]}")

    async def same(budget: int) -> memory_pb2.GetContextResponse:
        a = memory_pb2.GetContextResponse.FromString(await cached.get_context(ref, budget))
        b = memory_pb2.GetContextResponse.FromString(await fresh.get_context(ref, budget))
        assert a == b
        return a

    await cached.append(ref, [msg(U if i % 2 == 0 else A, f"message number {i}") for i in range(1, 21)])
    first = await same(60)
    assert 0 < len(first.messages) < 20
    hits = cached.cache.hits
    again = await same(60)
    assert again == first and cached.cache.hits == hits + 1  # served from the cache

    # The session grows: only the new messages come from Redis, the window slides.
    await cached.append(ref, [msg(U, "a new question"), msg(A, "a new answer")])
    grown = await same(60)
    assert grown.messages[-1].content == "a new answer" and grown.version == 22
    assert cached.cache.hits == hits + 2
    # A larger budget reaches before what is cached: read again from Redis.
    assert len((await same(10_000)).messages) == 22
    # Pins and a smaller budget.
    await cached.set_pinned(ref, [msg(S, "Answer in French.")])
    pinned = await same(40)
    assert pinned.pinned_messages == 1 and pinned.messages[0].content == "Answer in French."
    # Trimming: the window never reaches deleted messages.
    await cached.set_retention(ref, None, 5)
    trimmed = await same(10_000)
    assert [m.content for m in trimmed.messages[1:]][0] == "message number 18" and trimmed.messages_omitted == 17
    # Deleted and created again: a new incarnation, nothing of the old one.
    await fresh.delete(ref)
    await fresh.append(ref, [msg(U, "after the deletion")])
    reborn = await same(10_000)
    assert [m.content for m in reborn.messages] == ["after the deletion"]
    assert reborn.message_ids[0].endswith("-1") and reborn.message_ids[0] not in first.message_ids


async def test_a_corrupt_message_is_data_loss_even_next_to_cached_ones(raw_redis: aioredis.Redis):
    store = SessionStore(raw_redis, default_token_counter(), location="test")
    ref = store.ref("acme", "ann", f"x-{uuid.uuid4().hex[:8]}")
    await store.append(ref, [msg(U, "fine")])
    await store.get_context(ref, 1000)  # message 1 is cached now
    await store.append(ref, [msg(U, "also fine")])
    await raw_redis.lset(ref.keys[1], 1, b"\xff\xff\xff not a protobuf")
    with pytest.raises(ServiceError) as err:
        await store.get_context(ref, 1000)
    assert err.value.code == grpc.StatusCode.DATA_LOSS
    assert "stored message 2 is not a valid agentmesh.memory.v1.SessionMessage" in err.value.message
