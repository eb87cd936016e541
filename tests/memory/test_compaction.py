"""Compaction through the REAL LLM router in-process: its extractive provider when no LLM is
configured, and its OpenAI provider talking to the protocol-faithful fake (tests/fakes)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.memory.service import MemoryService
from agentmesh.services.runtime.tokens import default_token_counter
from tests.fakes.openai_server import FakeOpenAIServer
from tests.memory.conftest import RedisServer, llm_router, memory_service

U, A, T = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_TOOL
MD = (("x-tenant-id", "t1"),)
CITIES = ["Lisbon", "Porto", "Madrid", "Seville", "Paris", "Lyon", "Rome", "Turin", "Vienna", "Prague", "Berlin",
          "Munich", "Krakow", "Oslo", "Bergen", "Dublin"]
#: Small limits, so a few turns pass them.
LIMITS = {"compaction_trigger_tokens": 300, "compaction_keep_recent_tokens": 100, "compaction_window_tokens": 200,
          "summary_max_tokens": 120}
#: The same, compacting only when asked (CompactSession).
MANUAL = {**LIMITS, "compaction_trigger_tokens": 0}


def turn(i: int) -> list[common_pb2.Message]:
    city = CITIES[i % len(CITIES)]
    return [
        common_pb2.Message(role=U, content=f"On day {i} I visited {city} and loved the old {city} cathedral."),
        common_pb2.Message(role=A, content=f"The {city} cathedral is famous for its towers. Noted for day {i}."),
    ]


async def append(stub, session, messages) -> memory_pb2.AppendMessagesResponse:
    return await stub.AppendMessages(memory_pb2.AppendMessagesRequest(session_id=session, messages=messages),
                                     metadata=MD, timeout=10)


async def all_messages(stub, session) -> list[memory_pb2.SessionMessage]:
    reply = await stub.ListMessages(memory_pb2.ListMessagesRequest(session_id=session, limit=1000), metadata=MD,
                                    timeout=10)
    return list(reply.messages)


@pytest.fixture(scope="module")
async def extractive_memory(
    redis_server: RedisServer, extractive_router: str
) -> AsyncIterator[tuple[MemoryService, str]]:
    async with memory_service(redis_server.url, router=extractive_router, **LIMITS) as pair:
        yield pair


@pytest.fixture
async def stub(extractive_memory) -> AsyncIterator[memory_pb2_grpc.MemoryServiceStub]:
    async with grpc.aio.insecure_channel(extractive_memory[1]) as channel:
        yield memory_pb2_grpc.MemoryServiceStub(channel)


async def test_a_long_session_is_compacted_in_the_background_and_loses_nothing(extractive_memory, stub, raw_redis):
    service, _ = extractive_memory
    session = f"c-{uuid.uuid4().hex[:8]}"
    history: list[common_pb2.Message] = []
    for i in range(16):
        history += turn(i)
        await append(stub, session, turn(i))  # each append returns at once; compaction runs behind it
    await service.compactions.idle()

    info = await stub.GetSession(memory_pb2.GetSessionRequest(session_id=session), metadata=MD, timeout=10)
    summary = info.summary
    assert summary.text and (summary.provider, summary.is_llm) == ("extractive", False)
    assert summary.from_sequence == 1 and summary.through_sequence >= 10
    assert not re.search(r"\[\d+\]", summary.text)  # citation markers removed
    originals = " ".join(m.content for m in history)
    for sentence in re.split(r"(?<=[.!?])\s+", summary.text):  # an excerpt: every sentence was said
        assert sentence.removeprefix("User: ").removeprefix("Assistant: ") in originals, sentence

    # Compaction never deletes: every original is still stored and listed, in order, and the
    # messages the summary covers are retrievable by their id range.
    stored = await all_messages(stub, session)
    assert [m.message for m in stored] == history
    covered = await stub.ListMessages(memory_pb2.ListMessagesRequest(
        session_id=session, from_message_id=stored[0].id, to_message_id=stored[summary.through_sequence - 1].id,
        limit=1000), metadata=MD, timeout=10)
    assert [m.message for m in covered.messages] == history[: summary.through_sequence]
    assert await raw_redis.llen(f"agentmesh:t1:default:{{{session}}}:messages") == len(history)

    ctx = await stub.GetContext(memory_pb2.GetContextRequest(session_id=session, token_budget=4000), metadata=MD,
                                timeout=10)
    through = ctx.summary_through_sequence
    assert ctx.summary_included and through == summary.through_sequence
    assert ctx.messages[0].role == common_pb2.ROLE_SYSTEM and summary.text in ctx.messages[0].content
    recent = list(ctx.messages[1:])
    assert recent == history[through:]  # everything after the summary, verbatim
    assert recent[0].role == U  # the summary ends at a turn boundary
    counter = default_token_counter()
    assert ctx.tokens_used == summary.tokens + sum(counter.count_messages(recent))
    assert summary.tokens == counter.count_messages([ctx.messages[0]])[0]
    assert ctx.messages_omitted == 0 and ctx.first_sequence == through + 1
    # What is left unsummarized is below the trigger again.
    assert sum(counter.count_messages(recent)) <= LIMITS["compaction_trigger_tokens"]

    # A small budget still gets the summary first, then as many recent messages as fit.
    small = summary.tokens + counter.count_messages(history[-1:])[0]
    ctx = await stub.GetContext(memory_pb2.GetContextRequest(session_id=session, token_budget=small), metadata=MD,
                                timeout=10)
    assert ctx.summary_included and list(ctx.messages[1:]) == history[-1:]
    assert ctx.messages_omitted == len(history) - through - 1


async def test_compact_session_on_demand(stub):
    session = f"c-{uuid.uuid4().hex[:8]}"
    await append(stub, session, turn(0))  # below keep_recent: nothing old enough
    reply = await stub.CompactSession(memory_pb2.CompactSessionRequest(session_id=session), metadata=MD, timeout=30)
    assert not reply.compacted and reply.messages_summarized == 0
    for i in range(1, 4):  # ~140 tokens: below the trigger, so no background compaction
        await append(stub, session, turn(i))
    reply = await stub.CompactSession(memory_pb2.CompactSessionRequest(session_id=session), metadata=MD, timeout=30)
    assert reply.compacted and reply.summary.through_sequence == reply.messages_summarized
    assert reply.summary.through_sequence % 2 == 0  # whole turns
    assert len(await all_messages(stub, session)) == 8


async def test_a_tool_call_is_never_split_from_its_result(stub):
    session = f"c-{uuid.uuid4().hex[:8]}"
    call = common_pb2.ToolCall(id="call_1", name="calculator")
    call.arguments.update({"expression": "6*7"})
    messages = [
        common_pb2.Message(role=U, content="What is six times seven, and remember that I like round numbers."),
        common_pb2.Message(role=A, tool_calls=[call]),
        common_pb2.Message(role=T, tool_call_id="call_1", name="calculator", content='{"result": 42}'),
        common_pb2.Message(role=A, content="Six times seven is 42, which is not a round number."),
    ] * 3
    await append(stub, session, messages)
    reply = await stub.CompactSession(memory_pb2.CompactSessionRequest(session_id=session), metadata=MD, timeout=30)
    assert reply.compacted
    ctx = await stub.GetContext(memory_pb2.GetContextRequest(session_id=session, token_budget=4000), metadata=MD,
                                timeout=10)
    assert ctx.messages[1].role == U  # recent part starts with a whole turn
    assert reply.summary.through_sequence % 4 == 0


@pytest.fixture
def openai_fake():
    with FakeOpenAIServer(api_key="sk-test") as fake:
        yield fake


async def test_llm_summaries_are_chained_over_bounded_windows(redis_server, openai_fake):
    """A backlog bigger than one window is summarized in several calls, each within the window
    size, each given the summary so far: no summarizer ever sees an unbounded input."""
    counter = default_token_counter()
    openai_fake.enqueue(*({"text": f"Summary version {k}: the user toured {k} cities."} for k in range(1, 9)))
    async with llm_router(provider="openai", openai_base_url=openai_fake.base_url, openai_api_key="sk-test",
                          model="gpt-test") as router, \
            memory_service(redis_server.url, router=router, **MANUAL) as (_, addr), \
            grpc.aio.insecure_channel(addr) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        session = f"c-{uuid.uuid4().hex[:8]}"
        history = [m for i in range(16) for m in turn(i)]  # ~700 tokens
        await append(stub, session, history)
        # One message far bigger than a window: the summarizer gets it shortened.
        diary = "I also wrote a very long travel diary. " + "Walked and walked. " * 300
        giant = common_pb2.Message(role=U, content=diary)
        await append(stub, session, [giant, *turn(99)])
        reply = await stub.CompactSession(memory_pb2.CompactSessionRequest(session_id=session), metadata=MD,
                                          timeout=60)

    bodies = openai_fake.bodies
    assert len(bodies) >= 4
    assert reply.compacted and reply.summary.is_llm and reply.summary.provider == "openai"
    assert reply.summary.text == f"Summary version {len(bodies)}: the user toured {len(bodies)} cities."
    previous = "(none yet)"
    for body in bodies:
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        assert "running summary" in system
        assert user.startswith(f"Summary so far:\n{previous}\n\nNew messages:\n")
        window = user.split("New messages:\n", 1)[1]
        # The window's messages (as rendered for the summarizer) stay within the window size,
        # with some slack for the role labels and the shortened giant message.
        assert counter.count_texts([window])[0] <= LIMITS["compaction_window_tokens"] * 1.3
        previous = f"Summary version {bodies.index(body) + 1}: the user toured {bodies.index(body) + 1} cities."
    assert any("Walked and walked." in b["messages"][1]["content"] and " …" in b["messages"][1]["content"]
               for b in bodies)
    assert reply.summary.through_sequence == len(history) + 1  # up to the giant message, turn-aligned


async def test_router_falling_back_to_extractive_gives_an_extractive_summary(redis_server, openai_fake):
    openai_fake.enqueue({"status": 500, "error_message": "The server had an error"})
    async with llm_router(provider="openai", openai_base_url=openai_fake.base_url, openai_api_key="sk-test",
                          model="gpt-test") as router, \
            memory_service(redis_server.url, router=router, **MANUAL) as (_, addr), \
            grpc.aio.insecure_channel(addr) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        session = f"c-{uuid.uuid4().hex[:8]}"
        await append(stub, session, [m for i in range(4) for m in turn(i)])
        reply = await stub.CompactSession(memory_pb2.CompactSessionRequest(session_id=session), metadata=MD,
                                          timeout=60)
    assert reply.compacted and not reply.summary.is_llm and reply.summary.provider == "extractive"
    assert "cathedral" in reply.summary.text
    assert len(openai_fake.bodies) == 1


async def test_a_session_deleted_during_compaction_is_not_resurrected(redis_server, openai_fake, raw_redis):
    openai_fake.enqueue({"text": "A summary that arrives too late.", "first_token_delay_s": 1.0})
    async with llm_router(provider="openai", openai_base_url=openai_fake.base_url, openai_api_key="sk-test",
                          model="gpt-test") as router, \
            memory_service(redis_server.url, router=router, **MANUAL) as (_, addr), \
            grpc.aio.insecure_channel(addr) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        session = f"c-{uuid.uuid4().hex[:8]}"
        await append(stub, session, [m for i in range(4) for m in turn(i)])
        compaction = asyncio.ensure_future(
            stub.CompactSession(memory_pb2.CompactSessionRequest(session_id=session), metadata=MD, timeout=60)
        )
        deadline = time.monotonic() + 10
        while not openai_fake.requests:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        deleted = await stub.DeleteSession(memory_pb2.DeleteSessionRequest(session_id=session), metadata=MD,
                                           timeout=10)
        assert deleted.existed
        reply = await compaction
    assert not reply.compacted
    assert [k async for k in raw_redis.scan_iter(match=f"*{{{session}}}*")] == []
