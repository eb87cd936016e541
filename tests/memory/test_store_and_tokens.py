"""SessionStore details (TTL, key layout) against a real Redis, and the token counter."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
from google.protobuf import struct_pb2

from agentmesh.common.v1 import common_pb2
from agentmesh.services.memory.store import Retention, SessionStore, redis_location
from agentmesh.services.runtime.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    NAME_OVERHEAD_TOKENS,
    default_token_counter,
)
from agentmesh.services.runtime.errors import ServiceError


def user(text: str) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, content=text)


async def test_ttl_is_set_on_every_key_and_refreshed_on_append(raw_redis: aioredis.Redis):
    store = SessionStore(raw_redis, default_token_counter(), location="test", retention=Retention(ttl_s=300))
    session = f"ttl-{uuid.uuid4().hex[:8]}"
    ref = store.ref("acme", "ann", session)
    assert store.key("acme", session, "ann") == f"agentmesh:acme:ann:{{{session}}}:messages"

    await store.append(ref, [user("one")], idempotency_key="k1")
    await store.set_pinned(ref, [common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief.")])
    existing = [k for k in ref.keys if await raw_redis.exists(k)]
    assert len(existing) == 6  # meta, messages, tokens, pinned, idem, idem_at (no lock)
    for k in existing:
        assert 295 <= await raw_redis.ttl(k) <= 300, k
    await raw_redis.expire(ref.keys[1], 5)
    await store.append(ref, [user("two")])
    assert 295 <= await raw_redis.ttl(ref.keys[1]) <= 300  # refreshed by the append


async def test_no_ttl_when_disabled(raw_redis: aioredis.Redis):
    store = SessionStore(raw_redis, default_token_counter(), location="test")
    ref = store.ref("acme", "", f"keep-{uuid.uuid4().hex[:8]}")
    await store.append(ref, [user("kept")])
    assert await raw_redis.ttl(ref.keys[1]) == -1  # exists, no expiry
    assert ref.user == "default"


async def test_store_refuses_bad_scope_parts(raw_redis: aioredis.Redis):
    store = SessionStore(raw_redis, default_token_counter(), location="test")
    for tenant, user_id, session, word in (("a:b", "", "s", "tenant"), ("t", "a{b}", "s", "user_id"),
                                           ("t", "a/b", "s", "user_id"), ("t", "u", "s}", "session_id")):
        with pytest.raises(ServiceError) as err:
            store.ref(tenant, user_id, session)
        assert word in err.value.message


def test_redis_location_hides_credentials():
    assert redis_location("redis://user:s3cret@cache.internal:6380/2") == "cache.internal:6380/2"
    assert redis_location("redis://localhost") == "localhost:6379/0"


def test_word_piece_counts_without_special_tokens_or_truncation():
    counter = default_token_counter()
    assert counter.count_texts(["hello world", ""]) == [2, 0]
    long_text = "tokenization " * 500  # "token", "##ization" per word; far beyond the file's 128
    assert counter.count_texts([long_text]) == [1000]


def test_message_counts_include_overhead_name_and_tool_calls():
    counter = default_token_counter()
    plain = user("hello world")
    named = common_pb2.Message(role=common_pb2.ROLE_USER, content="hello world", name="ann")
    args = struct_pb2.Struct()
    args.update({"expression": "1 + 2"})
    call = common_pb2.Message(
        role=common_pb2.ROLE_ASSISTANT,
        tool_calls=[common_pb2.ToolCall(id="c1", name="calculator", arguments=args)],
    )
    n_plain, n_named, n_call = counter.count_messages([plain, named, call])
    assert n_plain == 2 + MESSAGE_OVERHEAD_TOKENS
    assert n_named == n_plain + NAME_OVERHEAD_TOKENS + counter.count_texts(["ann"])[0]
    expected_call = counter.count_texts(['c1\ncalculator\n{"expression":"1 + 2"}'])[0]
    assert n_call == expected_call + MESSAGE_OVERHEAD_TOKENS
    assert n_call > MESSAGE_OVERHEAD_TOKENS + 5  # the arguments are really counted
