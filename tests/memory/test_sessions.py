"""Session features through gRPC against a real redis-server: user scope, ids and sequences,
idempotent appends, pinned messages, ListMessages, read-your-writes, WatchSession, retention."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
import redis.asyncio as aioredis

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.memory.service import MemoryService, MemorySettings
from agentmesh.services.runtime.tokens import default_token_counter
from tests.support import running_service

U = common_pb2.ROLE_USER
A = common_pb2.ROLE_ASSISTANT
S = common_pb2.ROLE_SYSTEM
MD = (("x-tenant-id", "t1"),)


def new_session() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def msg(role: int, content: str) -> common_pb2.Message:
    return common_pb2.Message(role=role, content=content)


def base(session: str, user: str = "default", tenant: str = "t1") -> str:
    return f"agentmesh:{tenant}:{user}:{{{session}}}"


async def append(stub, session, messages, *, user="", key="", timeout=10) -> memory_pb2.AppendMessagesResponse:
    return await stub.AppendMessages(
        memory_pb2.AppendMessagesRequest(session_id=session, user_id=user, messages=messages, idempotency_key=key),
        metadata=MD, timeout=timeout,
    )


async def list_all(stub, session, user="") -> memory_pb2.ListMessagesResponse:
    return await stub.ListMessages(
        memory_pb2.ListMessagesRequest(session_id=session, user_id=user, limit=1000), metadata=MD, timeout=10
    )


async def session_keys(raw: aioredis.Redis, session: str) -> list[bytes]:
    return [k async for k in raw.scan_iter(match=f"*{{{session}}}*")]


async def test_users_have_separate_sessions_and_no_user_means_default(memory, raw_redis):
    session = new_session()
    await append(memory, session, [msg(U, "ann's")], user="ann@example.com")
    await append(memory, session, [msg(U, "bob's 1"), msg(U, "bob's 2")], user="bob")
    await append(memory, session, [msg(U, "nobody's")])

    for user, expected in (("ann@example.com", ["ann's"]), ("bob", ["bob's 1", "bob's 2"]), ("", ["nobody's"]),
                           ("default", ["nobody's"]), ("carol", [])):
        reply = await memory.GetContext(memory_pb2.GetContextRequest(session_id=session, user_id=user), metadata=MD,
                                        timeout=10)
        assert [m.content for m in reply.messages] == expected, user
    assert await raw_redis.llen(f"{base(session, 'ann@example.com')}:messages") == 1
    assert await raw_redis.llen(f"{base(session, 'default')}:messages") == 1

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await append(memory, session, [msg(U, "x")], user="has space")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in err.value.details()


async def test_ids_and_sequences_are_assigned_by_the_server(memory):
    session = new_session()
    first = await append(memory, session, [msg(U, "a"), msg(A, "b")])
    second = await append(memory, session, [msg(U, "c")])
    assert (first.first_sequence, first.version, second.first_sequence, second.version) == (1, 2, 3, 3)
    ids = list(first.message_ids) + list(second.message_ids)
    assert len(set(ids)) == 3

    listed = await list_all(memory, session)
    expected = list(zip(ids, [1, 2, 3], "abc", strict=True))
    assert [(m.id, m.sequence, m.message.content) for m in listed.messages] == expected
    assert all(m.created_at_ms > 0 and m.tokens == default_token_counter().count_messages([m.message])[0]
               for m in listed.messages)
    context = await memory.GetContext(memory_pb2.GetContextRequest(session_id=session), metadata=MD, timeout=10)
    assert list(context.message_ids) == ids and context.first_sequence == 1

    # A range can be named by ids as well.
    by_ids = await memory.ListMessages(
        memory_pb2.ListMessagesRequest(session_id=session, from_message_id=ids[1], to_message_id=ids[2]),
        metadata=MD, timeout=10)
    assert [m.id for m in by_ids.messages] == ids[1:]
    for bad, code in ((memory_pb2.ListMessagesRequest(session_id=session, from_message_id="nonsense"),
                       grpc.StatusCode.INVALID_ARGUMENT),
                      (memory_pb2.ListMessagesRequest(session_id=session, from_sequence=1, from_message_id=ids[0]),
                       grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await memory.ListMessages(bad, metadata=MD, timeout=10)
        assert err.value.code() == code

    # A session deleted and created again never reuses an id, and old ids are not found.
    await memory.DeleteSession(memory_pb2.DeleteSessionRequest(session_id=session), metadata=MD, timeout=10)
    again = await append(memory, session, [msg(U, "a")])
    assert again.version == 1 and again.message_ids[0] not in ids
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await memory.ListMessages(memory_pb2.ListMessagesRequest(session_id=session, from_message_id=ids[0]),
                                  metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_idempotent_appends_are_written_once_under_concurrent_retries(memory, raw_redis):
    session = new_session()
    writers, attempts = 16, 4

    async def writer(w: int) -> list[memory_pb2.AppendMessagesResponse]:
        batch = [msg(U, f"w{w}#0"), msg(A, f"w{w}#1")]
        # The same request sent several times at once, as a client's retries would be.
        return await asyncio.gather(*(append(memory, session, batch, key=f"key-{w}") for _ in range(attempts)))

    results = await asyncio.gather(*(writer(w) for w in range(writers)))
    for replies in results:
        assert len({(r.version, tuple(r.message_ids)) for r in replies}) == 1  # every retry: the same answer
        assert sum(not r.replayed for r in replies) == 1  # exactly one of them wrote
    listed = await list_all(memory, session)
    assert listed.version == 2 * writers
    contents = [m.message.content for m in listed.messages]
    assert sorted(contents) == sorted(f"w{w}#{k}" for w in range(writers) for k in range(2))
    for replies in results:
        r = replies[0]
        w = contents[r.first_sequence - 1].split("#")[0]
        assert contents[r.first_sequence - 1 : r.version] == [f"{w}#0", f"{w}#1"]  # whole, in order

    # The same key with different messages is refused, and writes nothing.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await append(memory, session, [msg(U, "something else")], key="key-0")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "key-0" in err.value.details()
    assert await raw_redis.llen(f"{base(session)}:messages") == 2 * writers


async def test_a_retry_after_a_lost_reply_appends_exactly_once(redis_server):
    """The reply of a written append is lost (the service is slowed down right after the write,
    so the caller's deadline passes first). The retry with the same key finds the write, answers
    as the first call would have, and the session holds one copy."""
    service = MemoryService(MemorySettings(redis_url=redis_server.url, facts_enabled=False, readiness_interval_s=0.2))
    async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        store = service.store()
        write = store.append

        async def write_then_stall(*args, **kwargs):
            result = await write(*args, **kwargs)
            await asyncio.sleep(0.5)  # the reply is ready but the caller is gone by now
            return result

        session = new_session()
        for i in range(3):
            batch = [msg(U, f"turn {i}")]
            store.append = write_then_stall
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await append(stub, session, batch, key=f"turn-{i}", timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            store.append = write
            reply = await append(stub, session, batch, key=f"turn-{i}")
            assert (reply.version, reply.first_sequence, reply.replayed) == (i + 1, i + 1, True)
        listed = await list_all(stub, session)
        assert [m.message.content for m in listed.messages] == ["turn 0", "turn 1", "turn 2"]


async def test_pinned_messages_open_every_context_and_count_in_the_budget(memory):
    session = new_session()
    counter = default_token_counter()
    pinned = [msg(S, "You are a travel agent."), msg(S, "Answer in one sentence.")]
    reply = await memory.SetPinnedMessages(
        memory_pb2.SetPinnedMessagesRequest(session_id=session, messages=pinned), metadata=MD, timeout=10
    )
    pinned_tokens = sum(counter.count_messages(pinned))
    assert reply.pinned_tokens == pinned_tokens
    history = [msg(U if i % 2 == 0 else A, f"message number {i} " * 3) for i in range(10)]
    await append(memory, session, history)
    counts = counter.count_messages(history)

    budget = pinned_tokens + sum(counts[-3:])
    ctx = await memory.GetContext(memory_pb2.GetContextRequest(session_id=session, token_budget=budget), metadata=MD,
                                  timeout=10)
    assert list(ctx.messages) == pinned + history[-3:]
    assert (ctx.pinned_messages, ctx.tokens_used, ctx.messages_omitted, ctx.first_sequence) == (2, budget, 7, 8)
    assert not ctx.summary_included

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await memory.GetContext(memory_pb2.GetContextRequest(session_id=session, token_budget=pinned_tokens - 1),
                                metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "pinned" in err.value.details()

    for bad, words in (([msg(U, "not system")], "ROLE_SYSTEM"), ([msg(S, "long " * 5000)], "limit is 4000")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await memory.SetPinnedMessages(
                memory_pb2.SetPinnedMessagesRequest(session_id=session, messages=bad), metadata=MD, timeout=10
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()

    await memory.SetPinnedMessages(memory_pb2.SetPinnedMessagesRequest(session_id=session), metadata=MD, timeout=10)
    ctx = await memory.GetContext(memory_pb2.GetContextRequest(session_id=session), metadata=MD, timeout=10)
    assert ctx.pinned_messages == 0 and list(ctx.messages) == history


async def test_list_messages_pages_through_ranges(memory):
    session = new_session()
    await append(memory, session, [msg(U, f"m{i}") for i in range(1, 26)])
    seen, cursor = [], 0
    while True:
        page = await memory.ListMessages(
            memory_pb2.ListMessagesRequest(session_id=session, from_sequence=cursor, to_sequence=22, limit=10),
            metadata=MD, timeout=10,
        )
        seen.extend(m.sequence for m in page.messages)
        if not page.next_sequence:
            break
        cursor = page.next_sequence
    assert seen == list(range(1, 23))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await memory.ListMessages(memory_pb2.ListMessagesRequest(session_id=session, from_sequence=9, to_sequence=3),
                                  metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_read_naming_a_version_sees_at_least_that_version(memory):
    session = new_session()
    first = await append(memory, session, [msg(U, "one")])
    wanted = first.version + 1
    # The read starts before the write it names exists; it waits for it instead of answering stale.
    read = asyncio.ensure_future(memory.GetContext(
        memory_pb2.GetContextRequest(session_id=session, min_version=wanted), metadata=MD, timeout=10
    ))
    await asyncio.sleep(0.2)
    assert not read.done()
    second = await append(memory, session, [msg(A, "two")])
    assert second.version == wanted
    reply = await read
    assert reply.version >= wanted and [m.content for m in reply.messages] == ["one", "two"]

    listed = await memory.ListMessages(
        memory_pb2.ListMessagesRequest(session_id=session, min_version=wanted), metadata=MD, timeout=10
    )
    assert listed.version == wanted

    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await memory.GetContext(memory_pb2.GetContextRequest(session_id=session, min_version=99), metadata=MD,
                                timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "below min_version 99" in err.value.details()
    assert 0.9 < time.monotonic() - start < 3  # read_wait_s = 1 in this fixture


async def _watch(memory, session, events: list, **kwargs) -> None:
    async for event in memory.WatchSession(memory_pb2.WatchSessionRequest(session_id=session, **kwargs), metadata=MD,
                                           timeout=30):
        events.append(event)


async def _until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_watch_delivers_every_new_message_once_in_order(memory):
    session = new_session()
    await append(memory, session, [msg(U, "before the watch")])
    events: list[memory_pb2.WatchSessionResponse] = []
    watch = asyncio.create_task(_watch(memory, session, events))
    await _until(lambda: events)
    assert events[0].started.version == 1

    async def writer(w: int) -> None:
        for r in range(5):
            await append(memory, session, [msg(U, f"w{w}r{r}a"), msg(A, f"w{w}r{r}b")])

    await asyncio.gather(*(writer(w) for w in range(6)))
    await _until(lambda: len(events) == 1 + 60)
    delivered = [e.message for e in events[1:]]
    assert [m.sequence for m in delivered] == list(range(2, 62))  # each once, in order, nothing from before
    listed = await list_all(memory, session)
    assert [(m.id, m.message) for m in delivered] == [(m.id, m.message) for m in listed.messages[1:]]

    # Resuming from a sequence replays what follows it, then continues live.
    resumed: list[memory_pb2.WatchSessionResponse] = []
    second = asyncio.create_task(_watch(memory, session, resumed, after_sequence=58))
    await _until(lambda: len(resumed) == 1 + 3)
    await append(memory, session, [msg(U, "live")])
    await _until(lambda: len(resumed) == 5)
    assert [e.message.sequence for e in resumed[1:]] == [59, 60, 61, 62]

    # Deleting the session ends both streams with `deleted`.
    await memory.DeleteSession(memory_pb2.DeleteSessionRequest(session_id=session), metadata=MD, timeout=10)
    await asyncio.wait_for(asyncio.gather(watch, second), 10)
    assert events[-1].WhichOneof("event") == "deleted" and resumed[-1].WhichOneof("event") == "deleted"


async def test_watch_of_a_session_that_does_not_exist_yet(memory):
    session = new_session()
    events: list[memory_pb2.WatchSessionResponse] = []
    watch = asyncio.create_task(_watch(memory, session, events))
    await _until(lambda: events)
    assert events[0].started.version == 0
    await append(memory, session, [msg(U, "first ever")])
    await _until(lambda: len(events) == 2)
    assert events[1].message.message.content == "first ever" and events[1].message.sequence == 1
    watch.cancel()


async def test_keep_last_messages_deletes_older_ones_and_versions_keep_growing(memory, raw_redis):
    session = new_session()
    await append(memory, session, [msg(U, f"m{i}") for i in range(1, 11)])
    reply = await memory.SetRetention(
        memory_pb2.SetRetentionRequest(session_id=session, keep_last_messages=4), metadata=MD, timeout=10
    )
    assert (reply.keep_last_messages, reply.messages_deleted, reply.ttl_s) == (4, 6, 0)
    await append(memory, session, [msg(U, "m11"), msg(U, "m12")])

    listed = await list_all(memory, session)
    assert [m.message.content for m in listed.messages] == ["m9", "m10", "m11", "m12"]
    assert [m.sequence for m in listed.messages] == [9, 10, 11, 12]
    assert (listed.first_sequence, listed.version) == (9, 12)
    # Really gone from Redis: both per-message lists hold exactly the four kept messages.
    assert await raw_redis.llen(f"{base(session)}:messages") == 4
    assert await raw_redis.llen(f"{base(session)}:tokens") == 4
    stored = [memory_pb2.SessionMessage.FromString(b).message.content
              for b in await raw_redis.lrange(f"{base(session)}:messages", 0, -1)]
    assert stored == ["m9", "m10", "m11", "m12"]
    ctx = await memory.GetContext(memory_pb2.GetContextRequest(session_id=session), metadata=MD, timeout=10)
    assert [m.content for m in ctx.messages] == ["m9", "m10", "m11", "m12"]
    assert (ctx.version, ctx.messages_omitted) == (12, 8)
    info = await memory.GetSession(memory_pb2.GetSessionRequest(session_id=session), metadata=MD, timeout=10)
    assert (info.version, info.first_sequence, info.messages_stored, info.keep_last_messages) == (12, 9, 4, 4)


async def test_session_ttl_expires_every_key(memory, raw_redis):
    session = new_session()
    await append(memory, session, [msg(U, "short-lived")], key="k")
    await memory.SetPinnedMessages(memory_pb2.SetPinnedMessagesRequest(session_id=session, messages=[msg(S, "pin")]),
                                   metadata=MD, timeout=10)
    reply = await memory.SetRetention(memory_pb2.SetRetentionRequest(session_id=session, ttl_s=1), metadata=MD,
                                      timeout=10)
    assert reply.ttl_s == 1
    assert len(await session_keys(raw_redis, session)) == 6
    info = await memory.GetSession(memory_pb2.GetSessionRequest(session_id=session), metadata=MD, timeout=10)
    assert info.exists and 0 < info.expires_in_ms <= 1000 and info.ttl_s == 1
    await asyncio.sleep(1.3)
    assert await session_keys(raw_redis, session) == []
    info = await memory.GetSession(memory_pb2.GetSessionRequest(session_id=session), metadata=MD, timeout=10)
    assert not info.exists


async def test_delete_session_removes_every_key(memory, raw_redis):
    session = new_session()
    await append(memory, session, [msg(U, "secret")], key="k1")
    await memory.SetPinnedMessages(memory_pb2.SetPinnedMessagesRequest(session_id=session, messages=[msg(S, "pin")]),
                                   metadata=MD, timeout=10)
    assert await session_keys(raw_redis, session)
    reply = await memory.DeleteSession(memory_pb2.DeleteSessionRequest(session_id=session), metadata=MD, timeout=10)
    assert (reply.existed, reply.messages_deleted) == (True, 1)
    assert await session_keys(raw_redis, session) == []
    again = await memory.DeleteSession(memory_pb2.DeleteSessionRequest(session_id=session), metadata=MD, timeout=10)
    assert not again.existed


async def test_forget_user_deletes_all_of_the_users_sessions_and_nothing_else(memory, raw_redis):
    victim, other = f"u-{uuid.uuid4().hex[:8]}", f"u-{uuid.uuid4().hex[:8]}"
    sessions = [new_session() for _ in range(3)]
    for s in sessions:
        await append(memory, s, [msg(U, "mine")], user=victim, key="k")
        await append(memory, s, [msg(U, "theirs")], user=other)
    # A user whose id extends the victim's must not be touched either.
    await append(memory, sessions[0], [msg(U, "lookalike")], user=f"{victim}:x")
    reply = await memory.ForgetUser(memory_pb2.ForgetUserRequest(user_id=victim), metadata=MD, timeout=10)
    assert reply.sessions_deleted == 3 and reply.keys_deleted == 3 * 5  # meta, messages, tokens, idem, idem_at
    assert [k async for k in raw_redis.scan_iter(match=f"*{victim}:{{*")] == []
    for s in sessions:
        assert (await list_all(memory, s, other)).version == 1
    assert (await list_all(memory, sessions[0], f"{victim}:x")).version == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await memory.ForgetUser(memory_pb2.ForgetUserRequest(), metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_fact_rpcs_say_facts_are_disabled(memory):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await memory.RecallFacts(memory_pb2.RecallFactsRequest(query="anything"), metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "FACTS_ENABLED" in err.value.details()
