"""MemoryService against a real redis-server, through gRPC."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import struct_pb2

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.services.runtime.tokens import default_token_counter
from tests.memory.conftest import PAGE

U = common_pb2.ROLE_USER
A = common_pb2.ROLE_ASSISTANT


def md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-tenant-id", tenant),)


def new_session() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def msg(role: int, content: str, **kw) -> common_pb2.Message:
    return common_pb2.Message(role=role, content=content, **kw)


def key(tenant: str, session: str, user: str = "default") -> str:
    return f"agentmesh:{tenant}:{user}:{{{session}}}:messages"


async def append(stub, session, messages, tenant="t1") -> int:
    reply = await stub.AppendMessages(
        memory_pb2.AppendMessagesRequest(session_id=session, messages=messages), metadata=md(tenant), timeout=10
    )
    return reply.version


async def context(stub, session, budget=0, tenant="t1") -> memory_pb2.GetContextResponse:
    return await stub.GetContext(
        memory_pb2.GetContextRequest(session_id=session, token_budget=budget), metadata=md(tenant), timeout=10
    )


def conversation_turn() -> list[common_pb2.Message]:
    args = struct_pb2.Struct()
    args.update({"expression": "2**10", "nested": {"list": [1, "two", None, True]}})
    return [
        msg(common_pb2.ROLE_SYSTEM, "You are terse."),
        msg(U, "What is 2 to the 10th?"),
        msg(A, "", tool_calls=[common_pb2.ToolCall(id="call_1", name="calculator", arguments=args)]),
        msg(common_pb2.ROLE_TOOL, '{"result": 1024}', tool_call_id="call_1", name="calculator"),
        msg(A, "1024 — ünïcødé survives too ✓"),
    ]


async def test_append_then_read_back_in_order(memory):
    session = new_session()
    turn = conversation_turn()
    assert await append(memory, session, turn[:2]) == 2
    assert await append(memory, session, turn[2:]) == 5

    reply = await context(memory, session, budget=10_000)
    assert list(reply.messages) == turn  # field-by-field protobuf equality, Struct arguments included
    assert reply.version == 5
    assert reply.messages_omitted == 0
    assert reply.tokens_used == sum(default_token_counter().count_messages(turn))


async def test_versions_grow_with_every_append(memory):
    session = new_session()
    versions = [await append(memory, session, [msg(U, f"m{i}")] * (i + 1)) for i in range(4)]
    assert versions == [1, 3, 6, 10]
    assert (await context(memory, session)).version == 10


async def test_unknown_session_is_empty(memory):
    reply = await context(memory, new_session())
    assert (len(reply.messages), reply.version, reply.tokens_used, reply.messages_omitted) == (0, 0, 0, 0)


async def test_budget_keeps_the_newest_messages_that_fit(memory):
    session = new_session()
    # Messages of clearly different sizes, so the cut point depends on real token counts.
    history = [msg(U if i % 2 else A, " ".join(["word"] * (1 + (i * 7) % 23)) + f" #{i}") for i in range(30)]
    for i in range(0, 30, 10):
        await append(memory, session, history[i : i + 10])
    counts = default_token_counter().count_messages(history)

    for budget in (counts[-1], sum(counts[-3:]), sum(counts[-3:]) + counts[-4] - 1, sum(counts[-13:]) + 1):
        reply = await context(memory, session, budget=budget)
        n = len(reply.messages)
        assert n > 0
        assert list(reply.messages) == history[-n:]  # a contiguous tail, oldest first
        assert reply.tokens_used == sum(counts[-n:]) <= budget
        assert reply.tokens_used + counts[-n - 1] > budget  # the next older one would not fit
        assert reply.messages_omitted == 30 - n
        assert reply.version == 30


async def test_budget_smaller_than_newest_message_returns_nothing(memory):
    session = new_session()
    await append(memory, session, [msg(U, "short"), msg(A, "a much longer answer " * 20)])
    reply = await context(memory, session, budget=10)
    assert len(reply.messages) == 0
    assert reply.tokens_used == 0
    assert reply.messages_omitted == 2


async def test_zero_budget_means_the_default_and_too_large_is_refused(memory):
    session = new_session()
    big = msg(U, "token " * 600)  # ~600 tokens each; the default budget is 2000
    await append(memory, session, [big] * 5)
    reply = await context(memory, session, budget=0)
    assert len(reply.messages) == 3
    assert reply.tokens_used <= 2000

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await context(memory, session, budget=1_000_000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "128000" in err.value.details()


async def test_large_session_is_read_from_the_end_in_pages(memory, raw_redis: aioredis.Redis):
    session = new_session()
    for start in range(0, 1000, 250):
        await append(memory, session, [msg(U, f"message {i}") for i in range(start, start + 250)])
    history = [msg(U, f"message {i}") for i in range(1000)]
    counts = default_token_counter().count_messages(history)
    budget = sum(counts[-6:])  # exactly the six newest

    done = f"done-{uuid.uuid4().hex}"
    seen: list[str] = []
    async with raw_redis.monitor() as monitor:
        async def collect() -> None:
            while done not in (command := (await monitor.next_command())["command"]):
                seen.append(command)

        collector = asyncio.create_task(collect())
        await asyncio.sleep(0.1)  # let MONITOR start before the read
        reply = await context(memory, session, budget=budget)
        async with aioredis.Redis(port=raw_redis.connection_pool.connection_kwargs["port"]) as other:
            await other.echo(done)
        await asyncio.wait_for(collector, 10)

    assert [m.content for m in reply.messages] == [f"message {i}" for i in range(994, 1000)]
    assert (reply.version, reply.messages_omitted) == (1000, 994)
    # MONITOR shows the commands the read script runs: token counts walked back from the end in
    # pages of PAGE, then exactly the six messages that fit; never the whole list.
    lranges = [c.replace('"', "").split()[1:] for c in seen if c.startswith("LRANGE")]
    base = key("t1", session).removesuffix(":messages")
    assert lranges == [
        [f"{base}:tokens", f"{1000 - PAGE}", "999"],
        [f"{base}:tokens", f"{1000 - 2 * PAGE}", f"{1000 - PAGE - 1}"],
        [f"{base}:messages", "994", "999"],
    ]


async def test_tenants_are_isolated(memory, raw_redis: aioredis.Redis):
    session = new_session()
    await append(memory, session, [msg(U, "alpha secret")], tenant="alpha")
    await append(memory, session, [msg(U, "beta one"), msg(U, "beta two")], tenant="beta")

    alpha = await context(memory, session, tenant="alpha")
    beta = await context(memory, session, tenant="beta")
    other = await context(memory, session, tenant="gamma")
    assert [m.content for m in alpha.messages] == ["alpha secret"]
    assert [m.content for m in beta.messages] == ["beta one", "beta two"]
    assert other.version == 0 and len(other.messages) == 0
    assert await raw_redis.llen(key("alpha", session)) == 1
    assert await raw_redis.llen(key("beta", session)) == 2


async def test_calls_without_tenant_use_the_default_tenant(memory, raw_redis: aioredis.Redis):
    session = new_session()
    reply = await memory.AppendMessages(
        memory_pb2.AppendMessagesRequest(session_id=session, messages=[msg(U, "hi")]), timeout=10
    )
    assert reply.version == 1
    assert await raw_redis.llen(key("default", session)) == 1


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (msg(common_pb2.ROLE_UNSPECIFIED, "no role"), "messages[2].role is ROLE_UNSPECIFIED"),
        (msg(7, "unknown role number"), "messages[2].role is 7"),
        (msg(common_pb2.ROLE_TOOL, "result"), "without tool_call_id"),
        (msg(U, "x", tool_calls=[common_pb2.ToolCall(id="c", name="calculator")]), "only ROLE_ASSISTANT"),
        (msg(A, "", tool_calls=[common_pb2.ToolCall(name="calculator")]), "tool_calls[0] needs both an id"),
        (msg(U, "x" * (1024 * 1024 + 1)), "limit is 1048576 bytes"),
    ],
)
async def test_a_bad_message_writes_nothing(memory, raw_redis: aioredis.Redis, bad, expected):
    session = new_session()
    await append(memory, session, [msg(U, "existing")])
    batch = [msg(U, "good 1"), msg(A, "good 2"), bad, msg(U, "good 4")]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await append(memory, session, batch)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.value.details()
    stored = await raw_redis.lrange(key("t1", session), 0, -1)
    assert [memory_pb2.SessionMessage.FromString(b).message for b in stored] == [msg(U, "existing")]
    assert await raw_redis.hget(key("t1", session).replace(":messages", ":meta"), "version") == b"1"

    # A brand-new session stays absent: not even an empty key is created.
    fresh = new_session()
    with pytest.raises(grpc.aio.AioRpcError):
        await append(memory, fresh, batch)
    assert await raw_redis.exists(key("t1", fresh)) == 0


async def test_batch_size_limits(memory, raw_redis: aioredis.Redis):
    session = new_session()
    for batch, expected in (([], "messages is empty"), ([msg(U, "m")] * 257, "257 messages in one append")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await append(memory, session, batch)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in err.value.details()
    assert await raw_redis.exists(key("t1", session)) == 0
    assert await append(memory, session, [msg(U, "m")] * 256) == 256


@pytest.mark.parametrize("session", ["", "a" * 129, "has space", "slash/x", "brace{x}", "ünï"])
async def test_bad_session_ids_are_refused(memory, session):
    for call in (append(memory, session, [msg(U, "x")]), context(memory, session)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "session_id" in err.value.details()


async def test_session_id_edge_characters_are_accepted(memory):
    session = "A.z_0:9-" + "x" * 120  # 128 characters, every allowed punctuation mark
    assert await append(memory, session, [msg(U, "ok")]) == 1
    assert (await context(memory, session)).version == 1


async def test_bad_tenant_is_refused(memory):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await append(memory, new_session(), [msg(U, "x")], tenant="bad:tenant")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_appenders_lose_nothing_and_never_interleave(memory, raw_redis: aioredis.Redis):
    session = new_session()
    writers, rounds, batch = 16, 8, 3

    async def writer(w: int) -> list[tuple[int, str]]:
        out = []
        for r in range(rounds):
            tag = f"w{w}r{r}"
            version = await append(memory, session, [msg(U, f"{tag}#{k}") for k in range(batch)])
            out.append((version, tag))
        return out

    results = [item for chunk in await asyncio.gather(*(writer(w) for w in range(writers))) for item in chunk]
    total = writers * rounds * batch
    versions = sorted(v for v, _ in results)
    assert versions == list(range(batch, total + 1, batch))  # every append got its own version

    stored = await raw_redis.lrange(key("t1", session), 0, -1)
    assert len(stored) == total
    contents = [memory_pb2.SessionMessage.FromString(b).message.content for b in stored]
    for version, tag in results:  # each batch sits whole, in order, right below its version
        assert contents[version - batch : version] == [f"{tag}#{k}" for k in range(batch)]


async def test_corrupt_stored_data_is_reported_as_data_loss(memory, raw_redis: aioredis.Redis):
    session = new_session()
    await append(memory, session, [msg(U, "fine")])
    await append(memory, session, [msg(U, "also fine")])
    await raw_redis.lset(key("t1", session), 1, b"\xff\xff\xff not a protobuf")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await context(memory, session)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "stored message 2 is not a valid agentmesh.memory.v1.SessionMessage" in err.value.details()
