"""Long-term facts: real all-MiniLM-L6-v2 embeddings, real Milvus Lite, the real LLM router.

Covers RememberFacts deduplication (exact and near), RecallFacts (read-your-writes, minimum
similarity, recency weighting, isolation), ListFacts / DeleteFacts, and extraction from appended
messages in the background — heuristic with the extractive router, LLM with the OpenAI fake."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from pymilvus import MilvusClient

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.memory.facts import FactInput
from agentmesh.services.memory.service import MemoryService
from tests.fakes.openai_server import FakeOpenAIServer
from tests.memory.conftest import RedisServer, llm_router, memory_service

U, A = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
FACT, PREF = memory_pb2.FACT_KIND_FACT, memory_pb2.FACT_KIND_PREFERENCE
CREATED = memory_pb2.REMEMBER_OUTCOME_CREATED
EXACT = memory_pb2.REMEMBER_OUTCOME_EXACT_DUPLICATE
MERGED = memory_pb2.REMEMBER_OUTCOME_MERGED
COLLECTION = "agentmesh_memory_facts"


def md(tenant: str = "t1") -> tuple[tuple[str, str], ...]:
    return (("x-tenant-id", tenant),)


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


def fact(text: str, kind: int = FACT, *sources: tuple[str, str]) -> memory_pb2.FactInput:
    return memory_pb2.FactInput(text=text, kind=kind,
                                sources=[memory_pb2.FactSource(session_id=s, message_id=m) for s, m in sources])


async def remember(stub, user, *facts, tenant="t1") -> list[memory_pb2.RememberedFact]:
    reply = await stub.RememberFacts(memory_pb2.RememberFactsRequest(user_id=user, facts=facts), metadata=md(tenant),
                                     timeout=30)
    return list(reply.results)


async def recall(stub, user, query, tenant="t1", **kwargs) -> list[memory_pb2.RecalledFact]:
    reply = await stub.RecallFacts(memory_pb2.RecallFactsRequest(user_id=user, query=query, **kwargs),
                                   metadata=md(tenant), timeout=30)
    return list(reply.facts)


async def list_facts(stub, user, tenant="t1") -> list[memory_pb2.Fact]:
    reply = await stub.ListFacts(memory_pb2.ListFactsRequest(user_id=user, page_size=500), metadata=md(tenant),
                                 timeout=30)
    return list(reply.facts)


async def eventually(check, timeout_s: float = 30.0):
    """Poll ``check()`` (async) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def facts_memory(redis_server: RedisServer, extractive_router: str, embedder, tmp_path_factory
                       ) -> AsyncIterator[tuple[MemoryService, str]]:
    uri = str(tmp_path_factory.mktemp("milvus") / "memory.db")
    async with memory_service(redis_server.url, router=extractive_router, embedder=embedder, milvus_uri=uri,
                              compaction_trigger_tokens=0) as pair:
        yield pair


@pytest.fixture
async def stub(facts_memory) -> AsyncIterator[memory_pb2_grpc.MemoryServiceStub]:
    async with grpc.aio.insecure_channel(facts_memory[1]) as channel:
        yield memory_pb2_grpc.MemoryServiceStub(channel)


@pytest.fixture
def milvus(facts_memory) -> MilvusClient:
    """A separate client on the service's Milvus Lite file, to look at what is stored."""
    return MilvusClient(uri=facts_memory[0].settings.milvus_uri)


def stored_rows(milvus: MilvusClient, user: str, tenant: str = "t1") -> list[dict]:
    return milvus.query(COLLECTION, filter=f'tenant == "{tenant}" and user_id == "{user}"',
                        output_fields=["fact_id", "text", "session_ids", "sources"], consistency_level="Strong")


async def test_a_remembered_fact_is_recalled_right_away(stub):
    user = f"ann.o+{uuid.uuid4().hex[:6]}@example.com"  # punctuation reaches Milvus filters quoted
    [result] = await remember(stub, user, fact("I am allergic to peanuts.", FACT, ("s1", "abc-1")))
    assert result.outcome == CREATED and len(result.fact_id) == 32
    recalled = await recall(stub, user, "Is the user allergic to anything?")  # no wait: read-your-writes
    assert [r.fact.fact_id for r in recalled] == [result.fact_id]
    top = recalled[0]
    assert top.fact.text == "I am allergic to peanuts." and top.fact.kind == FACT and top.fact.mentions == 1
    assert [(s.session_id, s.message_id) for s in top.fact.sources] == [("s1", "abc-1")]
    assert 0.4 < top.similarity <= 1 and top.recency > 0.99
    assert top.score == pytest.approx(0.8 * top.similarity + 0.2 * top.recency, abs=1e-5)


async def test_exact_and_near_duplicates_are_merged_not_stored_twice(stub, milvus):
    user = new_user()
    [first] = await remember(stub, user, fact("I live in Lisbon.", FACT, ("s1", "a-1")))
    [exact] = await remember(stub, user, fact("  i LIVE in   lisbon!! ", FACT, ("s2", "b-4")))
    assert (exact.outcome, exact.fact_id, exact.similarity) == (EXACT, first.fact_id, 1.0)
    [near] = await remember(stub, user, fact("I am living in Lisbon.", FACT, ("s3", "c-2")))
    assert near.outcome == MERGED and near.fact_id == first.fact_id and near.similarity >= 0.88
    [other] = await remember(stub, user, fact("I live in Porto.", FACT, ("s3", "c-3")))
    assert other.outcome == CREATED and other.fact_id != first.fact_id

    # In one batch, a repeat of an earlier item is caught as well.
    batch = await remember(stub, user, fact("I have three kids.", FACT), fact("I have three kids", FACT))
    assert [r.outcome for r in batch] == [CREATED, EXACT] and batch[0].fact_id == batch[1].fact_id

    rows = {r["fact_id"]: r for r in stored_rows(milvus, user)}
    assert len(rows) == 3
    merged = rows[first.fact_id]
    assert merged["text"] == "I am living in Lisbon."  # the newest wording wins
    assert sorted(merged["session_ids"]) == ["s1", "s2", "s3"]
    listed = {f.fact_id: f for f in await list_facts(stub, user)}
    assert listed[first.fact_id].mentions == 3


async def test_recall_filters_by_similarity_weighs_recency_and_is_isolated(facts_memory, stub, embedder):
    service, _ = facts_memory
    user = new_user()
    now = int(time.time() * 1000)
    old, new = "I drink green tea every morning.", "I drink black coffee every morning."
    # Two facts about the same thing, one stated 90 days ago (written with that clock).
    vectors = await embedder.embed([old, new])
    await service.facts().remember("t1", user, [FactInput(old, PREF)], vectors[:1], now_ms=now - 90 * 86_400_000,
                                   max_facts=100)
    await service.facts().remember("t1", user, [FactInput(new, PREF)], vectors[1:], now_ms=now, max_facts=100)
    await remember(stub, user, fact("My dog is called Rex.", FACT))

    query = "What do I drink in the morning? Is it tea?"
    by_meaning = await recall(stub, user, query, recency_weight=0.0, top_k=2)
    assert by_meaning[0].fact.text == old  # "tea" makes the old one more similar
    by_recency = await recall(stub, user, query, recency_weight=0.6, top_k=2)
    assert by_recency[0].fact.text == new
    assert by_recency[1].recency == pytest.approx(0.5 ** 3, rel=0.01)  # 90 days = 3 half-lives of 30 days

    scored = await recall(stub, user, query, recency_weight=0.6, min_score=by_recency[0].score - 1e-4)
    assert [r.fact.text for r in scored] == [new]
    strict = await recall(stub, user, query, min_similarity=0.3)
    assert "My dog is called Rex." not in [r.fact.text for r in strict]
    assert all(r.similarity >= 0.3 for r in strict)
    assert len(await recall(stub, user, query, min_similarity=-1.0, top_k=1)) == 1

    assert await recall(stub, new_user(), query) == []
    assert await recall(stub, user, query, tenant="t2") == []


async def test_list_and_delete_facts(stub, milvus):
    user = new_user()
    results = await remember(stub, user, *(fact(f"I own {n} bicycles and {n} helmets.") for n in
                                           ("two", "a red and a blue", "seventeen vintage")))
    ids = [r.fact_id for r in results]
    assert len(set(ids)) == 3
    page = await stub.ListFacts(memory_pb2.ListFactsRequest(user_id=user, page_size=2), metadata=md(), timeout=10)
    rest = await stub.ListFacts(memory_pb2.ListFactsRequest(user_id=user, page_size=2, page_token=page.next_page_token),
                                metadata=md(), timeout=10)
    assert len(page.facts) == 2 and len(rest.facts) == 1 and not rest.next_page_token
    assert {f.fact_id for f in [*page.facts, *rest.facts]} == set(ids)
    reply = await stub.DeleteFacts(memory_pb2.DeleteFactsRequest(user_id=user, fact_ids=[ids[0], ids[0], "0" * 32]),
                                   metadata=md(), timeout=10)
    assert reply.facts_deleted == 1
    assert {r["fact_id"] for r in stored_rows(milvus, user)} == set(ids[1:])


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (memory_pb2.RememberFactsRequest(), "1..64 facts"),
        (memory_pb2.RememberFactsRequest(facts=[fact("   ")]), "facts[0].text is empty"),
        (memory_pb2.RememberFactsRequest(facts=[fact("x" * 1001)]), "at most 1000"),
        (memory_pb2.RememberFactsRequest(facts=[memory_pb2.FactInput(text="ok", kind=9)]), "not a FactKind"),
        (memory_pb2.RememberFactsRequest(facts=[fact("ok", FACT, ("bad session", "m"))]), "sources[0]"),
        (memory_pb2.RememberFactsRequest(user_id="a b", facts=[fact("ok")]), "user_id"),
        (memory_pb2.RecallFactsRequest(query=" "), "query is empty"),
        (memory_pb2.RecallFactsRequest(query="q", top_k=1000), "top_k 1000"),
        (memory_pb2.RecallFactsRequest(query="q", min_similarity=float("nan")), "min_similarity"),
        (memory_pb2.RecallFactsRequest(query="q", recency_weight=1.5), "recency_weight"),
        (memory_pb2.DeleteFactsRequest(fact_ids=["nope"]), "not a fact id"),
        (memory_pb2.ListFactsRequest(page_token="x"), "page_token"),
    ],
)
async def test_bad_fact_requests_are_refused(stub, request_, words):
    method = {"RememberFactsRequest": stub.RememberFacts, "RecallFactsRequest": stub.RecallFacts,
              "DeleteFactsRequest": stub.DeleteFacts, "ListFactsRequest": stub.ListFacts}[type(request_).__name__]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(request_, metadata=md(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


async def test_heuristic_extraction_runs_in_the_background(stub, facts_memory):
    service, _ = facts_memory
    user, session = new_user(), f"s-{uuid.uuid4().hex[:8]}"
    reply = await stub.AppendMessages(memory_pb2.AppendMessagesRequest(
        session_id=session, user_id=user, messages=[
            common_pb2.Message(role=U, content="Hi! I live in Lisbon and I work as a nurse. Can you plan a weekend?"),
            common_pb2.Message(role=A, content="I love planning weekends. I am a travel assistant."),
            common_pb2.Message(role=U, content="I really prefer quiet places. What would you suggest?"),
        ]), metadata=md(), timeout=10)
    await service.extractions.idle()
    facts = await list_facts(stub, user)
    by_text = {f.text: f for f in facts}
    assert set(by_text) == {"I live in Lisbon and I work as a nurse.", "I really prefer quiet places."}
    assert by_text["I really prefer quiet places."].kind == PREF
    assert by_text["I live in Lisbon and I work as a nurse."].kind == FACT
    assert [(s.session_id, s.message_id) for s in by_text["I really prefer quiet places."].sources] == [
        (session, reply.message_ids[2])
    ]
    # Calls without a user all share the user "default": nothing is extracted for it.
    await stub.AppendMessages(memory_pb2.AppendMessagesRequest(
        session_id=session, messages=[common_pb2.Message(role=U, content="I live in Oslo.")]), metadata=md(),
        timeout=10)
    await service.extractions.idle()
    assert await list_facts(stub, "") == []


async def test_delete_session_and_forget_user_remove_data_from_redis_and_milvus(stub, facts_memory, milvus,
                                                                                raw_redis):
    service, _ = facts_memory
    user, other = new_user(), new_user()
    s1, s2 = f"s-{uuid.uuid4().hex[:8]}", f"s-{uuid.uuid4().hex[:8]}"

    async def say(session: str, text: str, who: str = user) -> None:
        await stub.AppendMessages(memory_pb2.AppendMessagesRequest(
            session_id=session, user_id=who, messages=[common_pb2.Message(role=U, content=text)]),
            metadata=md(), timeout=10)

    await say(s1, "My name is Ana Duarte.")
    await say(s1, "I speak Portuguese and Spanish.")
    await say(s2, "I speak Portuguese and Spanish.")  # the same fact from a second session
    await say(s2, "I hate cold weather.")
    await say(s1, "My name is Zed.", who=other)
    await service.extractions.idle()
    assert len(stored_rows(milvus, user)) == 3

    # Deleting s1: the fact only s1 supports goes; the shared one keeps s2 as its source.
    reply = await stub.DeleteSession(memory_pb2.DeleteSessionRequest(session_id=s1, user_id=user), metadata=md(),
                                     timeout=30)
    assert (reply.existed, reply.facts_deleted, reply.facts_updated) == (True, 1, 1)
    rows = {r["text"]: r for r in stored_rows(milvus, user)}
    assert set(rows) == {"I speak Portuguese and Spanish.", "I hate cold weather."}
    assert rows["I speak Portuguese and Spanish."]["session_ids"] == [s2]
    assert [k async for k in raw_redis.scan_iter(match=f"*:{user}:{{{s1}}}*")] == []

    # keep_facts keeps them.
    await stub.DeleteSession(memory_pb2.DeleteSessionRequest(session_id=s2, user_id=user, keep_facts=True),
                             metadata=md(), timeout=30)
    assert len(stored_rows(milvus, user)) == 2
    await say(s2, "I own a collection of old maps.")
    await remember(stub, user, fact("I prefer answers in Portuguese.", PREF))
    await service.extractions.idle()

    forgotten = await stub.ForgetUser(memory_pb2.ForgetUserRequest(user_id=user), metadata=md(), timeout=30)
    assert (forgotten.sessions_deleted, forgotten.facts_deleted) == (1, 4)
    # Gone from Redis: no key names the user, and no value holds what they said.
    leftover = []
    async for key in raw_redis.scan_iter(count=1000):
        if user.encode() in key:
            leftover.append(key)
        elif await raw_redis.type(key) == b"list" and any(
            b"old maps" in v or b"Ana Duarte" in v for v in await raw_redis.lrange(key, 0, -1)
        ):
            leftover.append(key)
    assert leftover == []
    # Gone from Milvus, and the other user's data is untouched.
    assert stored_rows(milvus, user) == []
    assert milvus.query(COLLECTION, filter=f'user_id == "{user}"', output_fields=["count(*)"],
                        consistency_level="Strong")[0]["count(*)"] == 0
    assert [r["text"] for r in stored_rows(milvus, other)] == ["My name is Zed."]
    assert await recall(stub, user, "What is the user's name?") == []


@pytest.fixture
def openai_fake():
    with FakeOpenAIServer(api_key="sk-test") as fake:
        yield fake


async def test_llm_extraction_never_delays_the_append(redis_server, embedder, openai_fake, tmp_path):
    answer = ("fact [1]: The user lives in Lisbon.\n"
              "- preference [2]: The user prefers short answers.\n"
              "Note: nothing else.")
    openai_fake.enqueue({"text": answer, "first_token_delay_s": 2.0})
    async with llm_router(provider="openai", openai_base_url=openai_fake.base_url, openai_api_key="sk-test",
                          model="gpt-test") as router, \
            memory_service(redis_server.url, router=router, embedder=embedder, milvus_uri=str(tmp_path / "m.db"),
                           compaction_trigger_tokens=0) as (service, addr), \
            grpc.aio.insecure_channel(addr) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        user, session = new_user(), "s-llm"
        start = time.monotonic()
        reply = await stub.AppendMessages(memory_pb2.AppendMessagesRequest(
            session_id=session, user_id=user, messages=[
                common_pb2.Message(role=U, content="We moved to Lisbon last year."),
                common_pb2.Message(role=U, content="Keep it short, please."),
            ]), metadata=md(), timeout=10)
        took = time.monotonic() - start
        assert took < 1.0, f"the append waited for extraction ({took:.2f} s; the model takes 2 s)"
        assert await list_facts(stub, user) == []  # extraction still waiting for the model
        facts = await eventually(lambda: list_facts(stub, user))
        await service.extractions.idle()
        facts = await list_facts(stub, user)

    by_text = {f.text: f for f in facts}
    assert set(by_text) == {"The user lives in Lisbon.", "The user prefers short answers."}
    assert by_text["The user prefers short answers."].kind == PREF
    assert [s.message_id for s in by_text["The user lives in Lisbon."].sources] == [reply.message_ids[0]]
    assert [s.message_id for s in by_text["The user prefers short answers."].sources] == [reply.message_ids[1]]
    body = openai_fake.bodies[0]
    assert "long-term memories" in body["messages"][0]["content"]
    assert "[1] We moved to Lisbon last year.\n[2] Keep it short, please." in body["messages"][1]["content"]


async def test_facts_of_a_session_deleted_during_extraction_do_not_survive(redis_server, embedder, openai_fake,
                                                                           tmp_path):
    openai_fake.enqueue({"text": "fact [1]: The user owns a sailboat.", "first_token_delay_s": 1.0})
    uri = str(tmp_path / "m.db")
    async with llm_router(provider="openai", openai_base_url=openai_fake.base_url, openai_api_key="sk-test",
                          model="gpt-test") as router, \
            memory_service(redis_server.url, router=router, embedder=embedder, milvus_uri=uri,
                           compaction_trigger_tokens=0) as (service, addr), \
            grpc.aio.insecure_channel(addr) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        user = new_user()
        await stub.AppendMessages(memory_pb2.AppendMessagesRequest(
            session_id="s-boat", user_id=user, messages=[common_pb2.Message(role=U, content="I own a sailboat.")]),
            metadata=md(), timeout=10)
        deadline = time.monotonic() + 10
        while not openai_fake.requests:  # the extraction is waiting for the model now
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await stub.DeleteSession(memory_pb2.DeleteSessionRequest(session_id="s-boat", user_id=user), metadata=md(),
                                 timeout=30)
        await service.extractions.idle()
        assert await list_facts(stub, user) == []
        rows = MilvusClient(uri=uri).query(COLLECTION, filter=f'user_id == "{user}"', output_fields=["fact_id"],
                                           consistency_level="Strong")
        assert rows == []

