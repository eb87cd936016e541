"""GetContext counted in the target model's tokens (GetContextRequest.model): tiktoken for
OpenAI-family models and router aliases, WordPiece (approximate) otherwise, against a real Redis,
the real LLM router and the memory service; and the counters themselves."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
import redis.asyncio as aioredis
import tiktoken
from google.protobuf import struct_pb2
from pydantic import ValidationError

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.memory.cache import ContextCache
from agentmesh.services.memory.service import MemorySettings
from agentmesh.services.memory.store import SessionStore, render_summary
from agentmesh.services.runtime.errors import ServiceError
from agentmesh.services.runtime.tokens import (
    REPLY_PRIMING_TOKENS,
    CounterChoice,
    TiktokenCounter,
    TokenCounter,
    counter_for,
    default_token_counter,
    tiktoken_encoding,
    tokenizer_for,
)
from tests.llm.support import write_catalogue
from tests.memory.conftest import PAGE, RedisServer, llm_router, memory_service

pytestmark = pytest.mark.timeout(120)

U, A, S, T = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_SYSTEM, common_pb2.ROLE_TOOL
ROLE = {S: "system", U: "user", A: "assistant", T: "tool"}

#: English, Russian, Japanese, code and Greek with an emoji: WordPiece and o200k disagree a lot.
CONVERSATION = [
    common_pb2.Message(role=r, content=c) for r, c in (
        (U, "How should I keep chat history in Redis?"),
        (A, "Use one list per session and a Lua script so that every append is atomic."),
        (U, "Привет! Как настроить Redis для хранения истории чата?"),
        (A, "Используйте список на сессию и скрипт Lua для атомарной записи."),
        (U, "日本語でも説明してください。"),
        (A, "セッションごとにリストを使い、Luaスクリプトで原子的に追加します。"),
        (U, 'Show me the append: await redis.rpush(f"{prefix}:messages", *blobs)'),
        (A, "Γεια σου! Ευχαριστώ πολύ για την ερώτηση 🙏"),
    )
]


def expected(encoding: str, messages: Sequence[common_pb2.Message]) -> list[int]:
    """Tokens of each message as OpenAI's cookbook renders it, with tiktoken's own encoder: 3 of
    framing, the role, the content, and 1 + the name when there is one."""
    assert tiktoken_encoding(encoding) is not None  # puts the bundled file where tiktoken looks
    enc = tiktoken.get_encoding(encoding)
    out = []
    for m in messages:
        n = 3 + len(enc.encode(ROLE[m.role])) + len(enc.encode(m.content))
        if m.name:
            n += 1 + len(enc.encode(m.name))
        out.append(n)
    return out


def wordpiece(messages: Sequence[common_pb2.Message]) -> list[int]:
    return default_token_counter().count_messages(messages)


def deployment(name: str, provider: str, model: str) -> dict:
    # Never called: ListModels and CountTokens do not reach the provider.
    return {"name": name, "provider": provider, "model": model, "base_url": "http://127.0.0.1:9/v1",
            "api_key_env": "FAKE_OPENAI_KEY" if provider == "openai" else "FAKE_ANTHROPIC_KEY"}


@pytest.fixture(scope="module")
async def router_address(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The real router with aliases of each kind."""
    os.environ.setdefault("FAKE_OPENAI_KEY", "sk-test")
    os.environ.setdefault("FAKE_ANTHROPIC_KEY", "sk-ant-test")
    catalogue = write_catalogue(tmp_path_factory.mktemp("router") / "catalogue.yaml", {"models": {
        "chat": {"deployments": [deployment("chat-gpt", "openai", "gpt-4o")]},
        "legacy": {"deployments": [deployment("legacy-gpt", "openai", "gpt-4")]},
        "house": {"deployments": [deployment("house-llama", "openai", "house-llama-70b")]},
        "claude": {"deployments": [deployment("claude", "anthropic", "claude-sonnet-4-5")]},
    }})
    async with llm_router(catalogue=catalogue) as address:
        yield address


@pytest.fixture(scope="module")
async def memory_stub(redis_server: RedisServer,
                      router_address: str) -> AsyncIterator[memory_pb2_grpc.MemoryServiceStub]:
    """A sessions-only memory service (stored counts in WordPiece, the default) using that router."""
    async with memory_service(redis_server.url, router=router_address, context_page_messages=PAGE,
                              compaction_trigger_tokens=0, read_wait_s=1.0) as (_, address):
        async with grpc.aio.insecure_channel(address) as channel:
            yield memory_pb2_grpc.MemoryServiceStub(channel)


async def new_session(memory, messages: Sequence[common_pb2.Message]) -> tuple[str, int]:
    session = f"mt-{uuid.uuid4().hex[:10]}"
    reply = await memory.AppendMessages(memory_pb2.AppendMessagesRequest(session_id=session, messages=messages),
                                        timeout=10)
    return session, reply.version


async def context(memory, session: str, budget: int, model: str = "", **kw) -> memory_pb2.GetContextResponse:
    return await memory.GetContext(
        memory_pb2.GetContextRequest(session_id=session, token_budget=budget, model=model, **kw), timeout=10
    )


def fitting(counts: list[int], budget: int) -> int:
    """How many of the newest messages fit ``budget``, walking back from the newest."""
    used = n = 0
    for c in reversed(counts):
        if used + c > budget:
            break
        used, n = used + c, n + 1
    return n


# -- the counters -------------------------------------------------------------------------------


def test_counter_for_models_and_encodings():
    for name, tokenizer, approximate in (
        ("gpt-4o", "o200k_base", False), ("gpt-4o-mini-2024-07-18", "o200k_base", False), ("o3", "o200k_base", False),
        ("gpt-4", "cl100k_base", False), ("gpt-3.5-turbo", "cl100k_base", False),
        ("o200k_base", "o200k_base", False), ("cl100k_base", "cl100k_base", False), ("wordpiece", "wordpiece", True),
        ("claude-sonnet-4-5", "wordpiece", True), ("llama-3-70b", "wordpiece", True),
        ("text-davinci-003", "wordpiece", True),  # p50k_base: no file for it here
    ):
        choice = counter_for(name)
        assert (choice.tokenizer, choice.approximate) == (tokenizer, approximate), name
        assert tokenizer_for(name) == (tokenizer, approximate)
    assert isinstance(counter_for("gpt-4o").counter, TiktokenCounter)
    for name in ("p50k_base", "r50k_base", "o200k_harmony", "foo_base"):
        with pytest.raises(ValueError, match="is not available"):
            counter_for(name)


def test_tiktoken_counter_follows_the_cookbook_rendering():
    counter = counter_for("gpt-4o").counter
    named = common_pb2.Message(role=U, content="Hello there", name="ann")
    tool = common_pb2.Message(role=T, content='{"result": 3}', tool_call_id="call_1")
    args = struct_pb2.Struct()
    args.update({"expression": "1 + 2"})
    call = common_pb2.Message(role=A, tool_calls=[common_pb2.ToolCall(id="call_1", name="calculator", arguments=args)])
    enc = tiktoken.get_encoding("o200k_base")
    n = [len(enc.encode(t)) for t in ("user", "Hello there", "ann", "tool", '{"result": 3}', "call_1", "assistant",
                                       "calculator", '{"expression":"1 + 2"}')]
    assert counter.count_messages([named, tool, call]) == [
        3 + n[0] + n[1] + 1 + n[2],
        3 + n[3] + n[4] + n[5],
        3 + n[6] + n[5] + n[7] + n[8],  # tool call: id, name and compact JSON arguments
    ]
    assert counter.count_messages(CONVERSATION) == expected("o200k_base", CONVERSATION)
    # Special-token text in content is ordinary text (tiktoken's encode would refuse it).
    assert counter.count_texts(["<|endoftext|>", ""]) == [len(enc.encode_ordinary("<|endoftext|>")), 0]


def test_the_stored_tokenizer_setting_is_validated():
    assert MemorySettings(tokenizer="gpt-4o", facts_enabled=False).tokenizer == "gpt-4o"
    assert MemorySettings(tokenizer="cl100k_base", facts_enabled=False).tokenizer == "cl100k_base"
    for bad in ("llama-3-70b", "p50k_base"):
        with pytest.raises(ValidationError, match="tokenizer"):
            MemorySettings(tokenizer=bad, facts_enabled=False)


# -- GetContext through the service -----------------------------------------------------------------


async def test_the_same_context_counts_exactly_in_each_models_tokens(memory_stub):
    session, _ = await new_session(memory_stub, CONVERSATION)
    o200k, cl100k, wp = expected("o200k_base", CONVERSATION), expected("cl100k_base", CONVERSATION), wordpiece(
        CONVERSATION)
    assert len({sum(o200k), sum(cl100k), sum(wp)}) == 3  # three really different counts
    for model, counts, tokenizer, approximate in (
        ("gpt-4o", o200k, "o200k_base", False), ("o200k_base", o200k, "o200k_base", False),
        ("gpt-4", cl100k, "cl100k_base", False), ("", wp, "wordpiece", True), ("wordpiece", wp, "wordpiece", True),
    ):
        reply = await context(memory_stub, session, 10_000, model)
        assert list(reply.messages) == CONVERSATION, model
        assert (reply.tokenizer, reply.tokens_approximate) == (tokenizer, approximate), model
        assert reply.tokens_used == sum(counts), model
        assert reply.messages_omitted == 0 and reply.first_sequence == 1


async def test_a_budget_that_fits_more_messages_in_o200k_than_in_wordpiece(memory_stub):
    session, _ = await new_session(memory_stub, CONVERSATION)
    o200k, wp = expected("o200k_base", CONVERSATION), wordpiece(CONVERSATION)
    budget = sum(o200k[-4:])  # exactly the newest four in o200k
    assert sum(wp[-4:]) > budget  # ... which do not all fit in WordPiece
    gpt = await context(memory_stub, session, budget, "gpt-4o")
    approx = await context(memory_stub, session, budget)
    assert list(gpt.messages) == CONVERSATION[-4:] and gpt.tokens_used == budget
    n = fitting(wp, budget)
    assert n < 4 and list(approx.messages) == CONVERSATION[len(CONVERSATION) - n:]
    # tokens_used is the sum of the returned messages' counts with each model's counter.
    assert gpt.tokens_used == sum(counter_for("gpt-4o").counter.count_messages(gpt.messages))
    assert approx.tokens_used == sum(wordpiece(approx.messages))
    assert (gpt.first_sequence, gpt.messages_omitted) == (5, 4)
    assert (approx.first_sequence, approx.messages_omitted) == (9 - n, 8 - n)
    assert list(gpt.message_ids) == [f"{gpt.message_ids[0].rsplit('-', 1)[0]}-{s}" for s in range(5, 9)]
    # One token less: the oldest of the four no longer fits.
    fewer = await context(memory_stub, session, budget - 1, "gpt-4o")
    assert list(fewer.messages) == CONVERSATION[-3:] and fewer.tokens_used == sum(o200k[-3:])


async def test_router_aliases_count_as_the_router_does(memory_stub, router_address):
    session, _ = await new_session(memory_stub, CONVERSATION)
    o200k, cl100k, wp = expected("o200k_base", CONVERSATION), expected("cl100k_base", CONVERSATION), wordpiece(
        CONVERSATION)
    replies = {alias: await context(memory_stub, session, 10_000, alias)
               for alias in ("chat", "legacy", "house", "claude")}
    assert {a: (r.tokenizer, r.tokens_approximate, r.tokens_used) for a, r in replies.items()} == {
        "chat": ("o200k_base", False, sum(o200k)),
        "legacy": ("cl100k_base", False, sum(cl100k)),
        "house": ("o200k_base", True, sum(o200k)),  # an upstream tiktoken does not know: as the router counts it
        "claude": ("wordpiece", True, sum(wp)),
    }
    # The router's own count of the same messages as a prompt: the same, plus the reply priming.
    async with grpc.aio.insecure_channel(router_address) as channel:
        router = llm_pb2_grpc.LLMServiceStub(channel)
        for alias in ("chat", "legacy"):
            counted = await router.CountTokens(
                llm_pb2.CountTokensRequest(model=alias, messages=replies[alias].messages), timeout=10
            )
            assert counted.input_tokens == replies[alias].tokens_used + REPLY_PRIMING_TOKENS, alias


async def test_unknown_encoding_is_invalid_and_unknown_model_is_approximate(memory_stub):
    session, _ = await new_session(memory_stub, CONVERSATION[:2])
    for model in ("p50k_base", "o201k_base", "x" * 257, "gpt-4o\n"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await context(memory_stub, session, 1000, model)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, model
        assert "model" in err.value.details()
    reply = await context(memory_stub, session, 1000, "llama-3-70b-instruct")
    assert (reply.tokenizer, reply.tokens_approximate) == ("wordpiece", True)
    assert reply.tokens_used == sum(wordpiece(CONVERSATION[:2])) and len(reply.messages) == 2
    # A session that does not exist still says how it would have counted.
    empty = await context(memory_stub, f"none-{uuid.uuid4().hex[:8]}", 1000, "gpt-4")
    assert (empty.version, len(empty.messages), empty.tokenizer, empty.tokens_approximate) == (0, 0, "cl100k_base",
                                                                                               False)


async def test_read_your_writes_in_another_tokenizer(memory_stub):
    session, version = await new_session(memory_stub, CONVERSATION[:3])
    waiting = asyncio.create_task(context(memory_stub, session, 10_000, "gpt-4o", min_version=version + 1))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await memory_stub.AppendMessages(memory_pb2.AppendMessagesRequest(session_id=session, messages=CONVERSATION[3:4]),
                                     timeout=10)
    reply = await waiting
    assert list(reply.messages) == CONVERSATION[:4] and reply.version == version + 1
    assert reply.tokens_used == sum(expected("o200k_base", CONVERSATION[:4]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await context(memory_stub, session, 10_000, "gpt-4o", min_version=version + 5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- the store: pins, summary, cache, mixed sessions --------------------------------------------------


class Tally(TokenCounter):
    """o200k_base, remembering how many messages it counted."""

    approximate = False

    def __init__(self) -> None:
        self.inner = counter_for("o200k_base").counter
        self.name = self.inner.name
        self.messages = 0

    def count_texts(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_texts(texts)

    def count_messages(self, messages: Sequence[common_pb2.Message]) -> list[int]:
        self.messages += len(messages)
        return self.inner.count_messages(messages)


def parse(blob: bytes) -> memory_pb2.GetContextResponse:
    return memory_pb2.GetContextResponse.FromString(blob)


async def test_pins_and_summary_are_counted_in_the_requested_tokenizer(raw_redis: aioredis.Redis):
    store = SessionStore(raw_redis, default_token_counter(), location="test", page_size=3)
    gpt = counter_for("gpt-4o")
    ref = store.ref("acme", "ann", f"ps-{uuid.uuid4().hex[:8]}")
    await store.append(ref, CONVERSATION)
    # Emoji are one [UNK] per word in WordPiece and several tokens in o200k.
    pin = common_pb2.Message(role=S, content="Sign with 🎉🎉🎉🎉 🎊🎊🎊🎊 🥳🥳🥳🥳.")
    await store.set_pinned(ref, [pin])
    (pin_o200k,), (pin_wp,) = expected("o200k_base", [pin]), wordpiece([pin])
    assert pin_o200k > pin_wp
    summary = memory_pb2.SessionSummary(text="Ann asked how to store chat history in Redis; lists and Lua scripts.",
                                        from_sequence=1, through_sequence=2)
    assert await store.write_summary(ref, await store.incarnation(ref), 0, summary, 0) == 1
    (sum_o200k,) = expected("o200k_base", [render_summary(summary)])
    o200k = expected("o200k_base", CONVERSATION)

    # Pins that fit in WordPiece but not in o200k: only the o200k read refuses.
    assert parse(await store.get_context(ref, pin_wp)).pinned_messages == 1
    with pytest.raises(ServiceError) as err:
        await store.get_context(ref, pin_o200k - 1, choice=gpt)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "o200k_base" in err.value.message

    # Pins + summary + the newest two messages, exactly.
    budget = pin_o200k + sum_o200k + sum(o200k[-2:])
    reply = parse(await store.get_context(ref, budget, choice=gpt))
    assert list(reply.messages) == [pin, render_summary(summary), *CONVERSATION[-2:]]
    assert (reply.summary_included, reply.summary_through_sequence, reply.tokens_used) == (True, 2, budget)
    assert (reply.first_sequence, reply.messages_omitted) == (7, 4)  # 3..6 did not fit, 1..2 are summarized
    # The whole session: the messages the summary covers are not repeated.
    everything = parse(await store.get_context(ref, 10_000, choice=gpt))
    assert list(everything.messages[2:]) == CONVERSATION[2:]
    assert everything.tokens_used == pin_o200k + sum_o200k + sum(o200k[2:]) and everything.messages_omitted == 0
    # A summary that does not fit is left out: the messages take its place, back to the oldest stored.
    room = sum_o200k - 1
    left_out = parse(await store.get_context(ref, pin_o200k + room, choice=gpt))
    assert not left_out.summary_included and left_out.pinned_messages == 1
    assert len(left_out.messages) - 1 == fitting(o200k, room)
    assert left_out.tokens_used == pin_o200k + sum(o200k[len(o200k) - fitting(o200k, room):])


async def test_a_recounted_read_equals_an_uncached_one_and_counts_each_message_once(raw_redis: aioredis.Redis):
    wp = default_token_counter()
    cached = SessionStore(raw_redis, wp, location="test", page_size=3)
    fresh = SessionStore(raw_redis, wp, location="test", page_size=3, cache=ContextCache(0))
    tally = Tally()
    mine, theirs = CounterChoice(tally, False), counter_for("gpt-4o")
    ref = cached.ref("acme", "ann", f"rc-{uuid.uuid4().hex[:8]}")

    async def same(budget: int) -> memory_pb2.GetContextResponse:
        a = parse(await cached.get_context(ref, budget, choice=mine))
        b = parse(await fresh.get_context(ref, budget, choice=theirs))
        assert a == b
        return a

    history = [common_pb2.Message(role=U if i % 2 else A, content=f"{i}: {CONVERSATION[i % 8].content}")
               for i in range(1, 21)]
    await cached.append(ref, history)
    first = await same(90)
    assert 0 < len(first.messages) < 20 and first.tokens_used == sum(expected("o200k_base", first.messages))
    counted = tally.messages
    assert counted <= len(first.messages) + 1  # the walk counts what it returns and the one that did not fit
    assert await same(90) == first and tally.messages == counted  # nothing counted again

    # Two new messages: exactly those are counted; the window slides.
    await cached.append(ref, [common_pb2.Message(role=U, content="И ещё один вопрос?"),
                              common_pb2.Message(role=A, content="もちろんです。")])
    grown = await same(90)
    assert grown.messages[-1].content == "もちろんです。" and tally.messages == counted + 2
    # A larger budget reaches past what is held (read a page at a time), then nothing is counted twice.
    assert len((await same(10_000)).messages) == 22
    total = tally.messages
    assert total == 22 and len((await same(10_000)).messages) == 22 and tally.messages == total
    # Pins (counted once), trimming, deletion and a new incarnation.
    await cached.set_pinned(ref, [common_pb2.Message(role=S, content="Réponds en français.")])
    assert (await same(60)).pinned_messages == 1
    pinned_counted = tally.messages
    await same(60)
    assert tally.messages == pinned_counted
    await cached.set_retention(ref, None, 5)
    trimmed = await same(10_000)
    assert trimmed.first_sequence == 18 and trimmed.messages_omitted == 17
    await fresh.delete(ref)
    await fresh.append(ref, [common_pb2.Message(role=U, content="after the deletion")])
    reborn = await same(10_000)
    assert [m.content for m in reborn.messages] == ["after the deletion"]  # the pins went with the session
    assert reborn.message_ids[0].endswith("-1") and reborn.message_ids[0] not in first.message_ids


async def test_recounting_matches_the_redis_walk_and_mixed_sessions_are_recounted(raw_redis: aioredis.Redis):
    wp_store = SessionStore(raw_redis, default_token_counter(), location="test", page_size=3)
    o200k_store = SessionStore(raw_redis, counter_for("gpt-4o").counter, location="test", page_size=3)
    gpt = counter_for("gpt-4o")
    o200k = expected("o200k_base", CONVERSATION)

    # A session stored in o200k: the Redis walk over the stored counts (fast path) and a WordPiece
    # replica's own count give the same answer for every budget.
    native = o200k_store.ref("acme", "ann", f"nt-{uuid.uuid4().hex[:8]}")
    await o200k_store.append(native, CONVERSATION)
    assert await raw_redis.hget(native.keys[0], "enc") == b"o200k_base"
    for budget in (10, sum(o200k[-3:]), sum(o200k[-3:]) + 1, 10_000):
        walked = parse(await o200k_store.get_context(native, budget))
        recounted = parse(await wp_store.get_context(native, budget, choice=gpt))
        assert walked == recounted, budget
        assert walked.tokenizer == "o200k_base" and not walked.tokens_approximate
    assert o200k_store.cache.get(native.base) is not None  # the fast path's window: it walked in Redis

    # A session a WordPiece replica started and an o200k replica continued: its stored counts mix
    # two tokenizers, so even the o200k replica counts again.
    mixed = wp_store.ref("acme", "ann", f"mx-{uuid.uuid4().hex[:8]}")
    await wp_store.append(mixed, CONVERSATION[:5])
    await o200k_store.append(mixed, CONVERSATION[5:])
    assert await raw_redis.hget(mixed.keys[0], "enc") == b"mixed"
    reply = parse(await o200k_store.get_context(mixed, 10_000))
    assert reply.tokens_used == sum(o200k) and list(reply.messages) == CONVERSATION
    assert o200k_store.cache.get(mixed.base) is None and o200k_store.cache.get(f"{mixed.base}|o200k_base")
    assert parse(await wp_store.get_context(mixed, 10_000)).tokens_used == sum(wordpiece(CONVERSATION))


async def test_a_recounted_walk_survives_trimming_and_recreation_between_its_reads(raw_redis: aioredis.Redis):
    """The walk reads older pages after its snapshot: messages retention deleted meanwhile are
    omitted, and a session deleted and created again meanwhile is read again from the start."""
    store = SessionStore(raw_redis, default_token_counter(), location="test", page_size=3, cache=ContextCache(0))
    other = SessionStore(raw_redis, default_token_counter(), location="test")
    gpt = counter_for("gpt-4o")
    history = [common_pb2.Message(role=U, content=f"message {i}") for i in range(1, 21)]
    list_page = store._list
    meanwhile: list = []

    async def interleaved(keys, args):
        while meanwhile:
            await meanwhile.pop(0)()
        return await list_page(keys=keys, args=args)

    store._list = interleaved
    ref = store.ref("acme", "ann", f"tw-{uuid.uuid4().hex[:8]}")
    await store.append(ref, history)
    # Snapshot at version 20 with 18..20 read; before the next page, retention keeps the newest 5.
    meanwhile.append(lambda: other.set_retention(ref, None, 5))
    trimmed = parse(await store.get_context(ref, 10_000, choice=gpt))
    assert list(trimmed.messages) == history[15:] and trimmed.first_sequence == 16
    assert trimmed.messages_omitted == 15 and trimmed.tokens_used == sum(expected("o200k_base", history[15:]))

    await other.set_retention(ref, None, 0)
    await store.append(ref, history)  # 25 messages now

    async def recreate() -> None:
        await other.delete(ref)
        await other.append(ref, history[:2])

    meanwhile.append(recreate)
    reborn = parse(await store.get_context(ref, 10_000, choice=gpt))
    assert list(reborn.messages) == history[:2] and reborn.version == 2
    assert reborn.tokens_used == sum(expected("o200k_base", history[:2]))
