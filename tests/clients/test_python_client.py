"""The Python client (``agentmesh.client``), sync and async.

Against a real local mesh through the real Envoy gateway (one mesh for the module: Redis, Milvus
Lite, real embeddings, the extractive provider): streamed runs, resume by last sequence, run
state, sessions read-your-writes and watch, ingestion with progress and search, LLM streaming,
typed errors and deadlines. Against tiny in-process gRPC servers (the only way to make a server
fail on cue): gRPC's retry policy retrying UNAVAILABLE on idempotent methods only, RetryInfo in
errors, the credential metadata, and errors of the caller's own document iterator.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.client import (
    AgentMeshError,
    AlreadyExistsError,
    AsyncClient,
    Client,
    ClientConfig,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RetryPolicy,
    Timeouts,
    UnavailableError,
)
from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from tests.e2e.mesh import local_mesh

TENANT = "pyclient"
QUESTION = "How do I parse a JSON string into a Python object?"
MODULES = ["json", "csv"]


def user(text: str) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, content=text)


def assistant(text: str) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=text)


def system(text: str) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=text)


# ----------------------------------------------------------------------------- the real mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    env = {
        "AGENTMESH_LLM_PROVIDER": "extractive", "OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": "",
        # Collection management is an admin route (5 calls/s by default); these tests call it in
        # bursts, and the limit itself is tested in tests/gateway.
        "AGENTMESH_GATEWAY_RATE_LIMIT_ADMIN_RPS": "100",
    }
    with local_mesh(tmp_path_factory.mktemp("mesh"), env) as m:
        yield m


@pytest.fixture(scope="module")
def config(mesh) -> ClientConfig:
    return ClientConfig(address=mesh.gateway, tenant=TENANT)


@pytest.fixture(scope="module")
def ingested(config):
    """The demo documents ingested once with the sync client: (documents, reply, progress reports)."""
    from agentmesh.services.retrieval.corpus import stdlib_documents  # noqa: PLC0415 - imports modules

    documents = list(stdlib_documents(modules=MODULES))
    progress = []
    with Client(config) as client:
        reply = client.documents.ingest(iter(documents), on_progress=progress.append, timeout=600)
    return documents, reply, progress


@pytest.mark.timeout(600)
def test_ingestion_reports_progress_then_search_finds_the_documents(ingested, config):
    documents, reply, progress = ingested
    assert reply.documents_received == len(documents)
    assert reply.documents_written + reply.documents_unchanged == len(documents)
    assert [r.id for r in reply.documents] == [d.id for d in documents]
    assert [p.documents_sent for p in progress] == list(range(1, len(documents) + 1))
    assert all(a.bytes_sent < b.bytes_sent for a, b in zip(progress, progress[1:], strict=False))
    assert progress[-1].bytes_sent >= sum(d.ByteSize() for d in documents)

    with Client(config) as client:
        found = client.documents.search("parse a JSON document into a dict", top_k=3)
        assert found.chunks and found.chunks[0].document_id == "python-stdlib:json"
        assert found.mode == retrieval_pb2.SEARCH_MODE_HYBRID
        only_csv = client.documents.search(
            "parse a JSON document into a dict", top_k=3,
            filters=[retrieval_pb2.FilterCondition(
                document_field=retrieval_pb2.DOCUMENT_FIELD_ID, operator=retrieval_pb2.FILTER_OPERATOR_EQUAL,
                values=["python-stdlib:csv"],
            )],
        )
        assert only_csv.chunks and {c.document_id for c in only_csv.chunks} == {"python-stdlib:csv"}
        # Another tenant sees none of it.
        with Client(ClientConfig(address=config.address, tenant="pyclient-other")) as other:
            assert not other.documents.search("parse a JSON document into a dict", top_k=3).chunks


async def test_async_ingestion_of_unchanged_documents_writes_nothing(ingested, config):
    documents, _, _ = ingested

    async def stream():
        for document in documents:
            yield document

    seen = []
    async with AsyncClient(config) as client:
        reply = await client.documents.ingest(stream(), on_progress=seen.append, timeout=300)
    assert reply.documents_unchanged == len(documents) and reply.chunks_written == 0
    assert [p.documents_sent for p in seen] == list(range(1, len(documents) + 1))


@pytest.mark.timeout(300)
def test_sync_streamed_run_state_and_resume(ingested, config):
    with Client(config) as client:
        stream = client.agent.run(QUESTION, session_id="py-sync")
        events = list(stream)
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "started" and kinds[-1] == "final"
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert stream.run_id == events[0].started.run_id and len(stream.run_id) == 32
        assert stream.last_sequence == len(events)
        deltas = [e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta"]
        assert len(deltas) >= 3, "the answer arrives as several stream messages"
        assert stream.final is not None and stream.final.status == agent_pb2.RUN_STATUS_COMPLETED
        assert stream.final.output == "".join(deltas)
        assert any(c.chunk.document_id == "python-stdlib:json" for c in stream.final.citations)
        assert stream.result() == stream.final  # already drained: the same final event

        info = client.agent.get(stream.run_id)
        assert info.phase == agent_pb2.RUN_PHASE_FINISHED and info.status == agent_pb2.RUN_STATUS_COMPLETED
        assert info.last_sequence == stream.last_sequence and info.output == stream.final.output

        # A client that lost the stream after event 3 follows the same run from event 4.
        resumed = client.agent.resume(stream.run_id, after_sequence=3)
        assert list(resumed) == events[3:]
        assert resumed.run_id == stream.run_id and resumed.final == stream.final
        assert resumed.last_sequence == stream.last_sequence
        # Resuming the resumed stream starts after its last event: the finished run has no more.
        assert list(resumed.resume()) == []

        with pytest.raises(FailedPreconditionError) as failed:
            client.agent.cancel(stream.run_id, reason="too late")
        assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION and failed.value.message


@pytest.mark.timeout(300)
async def test_async_streamed_run_remembers_the_session(ingested, config):
    async with AsyncClient(config) as client:
        async with client.agent.run(QUESTION, session_id="py-async") as stream:
            kinds = [event.WhichOneof("event") async for event in stream]
        assert kinds[0] == "started" and kinds[-1] == "final" and "text_delta" in kinds
        final = stream.final
        assert final.status == agent_pb2.RUN_STATUS_COMPLETED and final.output.strip()

        # The turn went into the session's memory: read it (at least the version the run wrote).
        context = await client.sessions.context("py-async", min_version=final.session_version)
        assert context.version >= final.session_version
        assert [m.content for m in context.messages[-2:]] == [QUESTION, final.output]

        second = client.agent.run("And how do I write one back to a string?", session_id="py-async")
        result = await second.result()
        assert result.status == agent_pb2.RUN_STATUS_COMPLETED
        loaded = (await client.stubs.agent.ResumeRun(
            agent_pb2.ResumeRunRequest(run_id=second.run_id), **client.call_options("run")
        ).read()).event
        assert loaded.started.run_id == second.run_id  # raw stubs work with the client's options


@pytest.mark.timeout(120)
async def test_session_read_your_writes_watch_and_delete(mesh, config):
    session = f"py-session-{time.time_ns()}"
    async with AsyncClient(config) as client:
        watch = client.sessions.watch(session, timeout=60)
        events = aiter(watch)
        first = await anext(events)
        assert first.WhichOneof("event") == "started" and first.started.version == 0

        written = await client.sessions.append(session, [user("I use Python 3.11."), assistant("Noted.")])
        assert written.version == 2 and written.first_sequence == 1 and len(written.message_ids) == 2
        context = await client.sessions.context(session, min_version=written.version)
        assert [m.content for m in context.messages] == ["I use Python 3.11.", "Noted."]
        assert list(context.message_ids) == list(written.message_ids)

        watched = [await anext(events), await anext(events)]
        assert [e.message.sequence for e in watched] == [1, 2]
        assert [e.message.id for e in watched] == list(written.message_ids)

        # A retried append (same idempotency key) appends nothing.
        again = await client.sessions.append(session, [user("once")], idempotency_key="k-1")
        replay = await client.sessions.append(session, [user("once")], idempotency_key="k-1")
        assert again.version == 3 and replay.replayed and replay.version == 3
        assert (await anext(events)).message.message.content == "once"
        listed = await client.sessions.messages(session, from_sequence=2)
        assert [m.sequence for m in listed.messages] == [2, 3]

        deleted = await client.sessions.delete(session)
        assert deleted.existed and deleted.messages_deleted == 3
        assert (await anext(events)).WhichOneof("event") == "deleted"
        with pytest.raises(StopAsyncIteration):
            await anext(events)
        assert not (await client.sessions.get(session)).exists


@pytest.mark.timeout(120)
def test_sync_session_read_your_writes(mesh, config):
    with Client(config) as client:
        session = f"py-sync-session-{time.time_ns()}"
        written = client.sessions.append(session, [user("first")])
        written = client.sessions.append(session, [user("second")])
        context = client.sessions.context(session, min_version=written.version)
        assert [m.content for m in context.messages] == ["first", "second"] and context.version == 2
        with pytest.raises(FailedPreconditionError):
            client.sessions.context(session, min_version=written.version + 5, timeout=5)
        assert client.sessions.get(session).version == 2
        assert client.sessions.delete(session).existed


@pytest.mark.timeout(120)
async def test_session_pinned_messages_compaction_and_retention(mesh, config):
    session = f"py-session-admin-{time.time_ns()}"
    async with AsyncClient(config) as client:
        pinned = await client.sessions.set_pinned(session, [system("Answer in French.")])
        assert pinned.pinned_tokens > 0
        with pytest.raises(InvalidArgumentError, match="ROLE_SYSTEM"):
            await client.sessions.set_pinned(session, [user("Pin me.")])
        # Twelve messages of ~130 tokens: more than the ~1,000 newest tokens compaction leaves out.
        filler = " ".join(f"detail{i}" for i in range(60))
        written = await client.sessions.append(session, [user(f"Note {i}: {filler}") for i in range(12)])
        compacted = await client.sessions.compact(session)
        assert compacted.compacted and 0 < compacted.messages_summarized < 12
        assert compacted.summary.through_sequence == compacted.messages_summarized and compacted.summary.text
        context = await client.sessions.context(session, min_version=written.version)
        assert context.pinned_messages == 1 and context.messages[0].content == "Answer in French."
        assert context.summary_included and context.summary_through_sequence == compacted.messages_summarized

        retention = await client.sessions.set_retention(session, ttl_s=600, keep_last_messages=3)
        assert (retention.ttl_s, retention.keep_last_messages, retention.messages_deleted) == (600, 3, 9)
        # An unset bound is left as it is.
        again = await client.sessions.set_retention(session, ttl_s=900)
        assert (again.ttl_s, again.keep_last_messages, again.messages_deleted) == (900, 3, 0)
        described = await client.sessions.get(session)
        assert (described.first_sequence, described.messages_stored, described.ttl_s) == (10, 3, 900)
        assert 0 < described.expires_in_ms <= 900_000 and [m.content for m in described.pinned] == ["Answer in French."]
    with Client(config) as client:
        assert not client.sessions.compact(f"py-nothing-{time.time_ns()}").compacted
        assert client.sessions.set_pinned(session, []).pinned_tokens == 0
        assert not client.sessions.get(session).pinned
        assert client.sessions.set_retention(session, keep_last_messages=0).keep_last_messages == 0
        assert client.sessions.delete(session).existed


@pytest.mark.timeout(300)
def test_collections_create_describe_delete_documents_and_drop(ingested, config):
    collection = f"py_client_{time.time_ns()}"
    chunking = retrieval_pb2.ChunkingConfig(chunk_tokens=128, overlap_tokens=16)
    documents = [
        retrieval_pb2.Document(id=f"note-{i}", title=f"Note {i}", text=f"Note {i} is about the {topic} module.")
        for i, topic in enumerate(("json", "csv", "heapq"))
    ]
    with Client(config) as client:
        created = client.documents.create_collection(collection, chunking=chunking)
        assert created.created and created.collection.chunking.chunk_tokens == 128
        assert not client.documents.create_collection(collection, chunking=chunking).created
        with pytest.raises(AlreadyExistsError):
            client.documents.create_collection(collection, chunking=retrieval_pb2.ChunkingConfig(chunk_tokens=64))
        client.documents.ingest(documents, collection=collection)
        info = client.documents.describe_collection(collection)
        assert (info.name, info.documents, info.chunks) == (collection, 3, 3) and info.embedding_dimension > 0
        assert client.documents.describe_collection().documents == len(ingested[0])  # the default collection

        with pytest.raises(InvalidArgumentError, match="DropCollection"):
            client.documents.delete(collection=collection)
        deleted = client.documents.delete(["note-0", "no-such-note"], collection=collection)
        assert (deleted.documents_deleted, deleted.chunks_deleted) == (1, 1)
        assert client.documents.describe_collection(collection).documents == 2

    async def drop() -> retrieval_pb2.DropCollectionResponse:
        async with AsyncClient(config) as client:
            return await client.documents.drop_collection(collection)

    dropped = asyncio.run(drop())
    assert (dropped.documents_deleted, dropped.chunks_deleted, dropped.collection_removed) == (2, 2, True)
    with Client(config) as client, pytest.raises(NotFoundError):
        client.documents.describe_collection(collection)


@pytest.mark.timeout(120)
async def test_llm_token_count_models_and_spend(mesh, config):
    async with AsyncClient(config) as client:
        counted = await client.llm.count_tokens([user("How do I parse JSON?")])
        assert counted.input_tokens > 0 and counted.tokenizer and counted.deployment
        longer = await client.llm.count_tokens([user("How do I parse JSON? " * 20)])
        assert longer.input_tokens > counted.input_tokens
        models = await client.llm.list_models()
        assert models and any(m.is_default for m in models) and all(m.deployments for m in models)
        spends = await client.llm.spend()
        assert spends[0].scope == "tenant" and spends[0].id == TENANT and spends[0].spent_usd >= 0
        with pytest.raises(NotFoundError):
            await client.llm.count_tokens([user("Hi.")], model="no-such-model")
    with Client(config) as client:
        assert client.llm.count_tokens([user("How do I parse JSON?")]).input_tokens == counted.input_tokens
        assert [m.name for m in client.llm.list_models()] == [m.name for m in models]
        assert client.llm.spend()[0].id == TENANT


@pytest.mark.timeout(120)
async def test_facts_remember_recall_list_delete_and_forget(mesh, config):
    user_id = f"py-facts-{time.time_ns()}"
    preference = memory_pb2.FactInput(text="Wants replies in Portuguese.", kind=memory_pb2.FACT_KIND_PREFERENCE)
    async with AsyncClient(config) as client:
        results = await client.facts.remember(user_id, ["Lives in Lisbon.", preference, "Lives in Lisbon."])
        assert [r.outcome for r in results] == [
            memory_pb2.REMEMBER_OUTCOME_CREATED, memory_pb2.REMEMBER_OUTCOME_CREATED,
            memory_pb2.REMEMBER_OUTCOME_EXACT_DUPLICATE,
        ]
        lisbon, portuguese = results[0].fact_id, results[1].fact_id
        assert results[2].fact_id == lisbon
        (best,) = await client.facts.recall(user_id, "Which language should we answer in?", top_k=1)
        assert best.fact.fact_id == portuguese and best.fact.kind == memory_pb2.FACT_KIND_PREFERENCE
        assert {f.fact_id for f in (await client.facts.list(user_id)).facts} == {lisbon, portuguese}
        assert await client.facts.delete(user_id, [lisbon, "0" * 32]) == 1
        assert (await client.facts.forget_user(user_id)).facts_deleted == 1
        assert not (await client.facts.list(user_id)).facts
        with pytest.raises(InvalidArgumentError):
            await client.facts.remember(user_id, [""])


@pytest.mark.timeout(120)
def test_sync_tools_list_execute_and_errors(mesh, config):
    with Client(config) as client:
        listed = client.tools.list()
        assert "calculator" in {t.name for t in listed.tools} and len(listed.details) == len(listed.tools)
        with client.tools.execute("calculator", {"expression": "6 * 7"}) as events:
            (result,) = [e.result for e in events if e.WhichOneof("event") == "result"]
        assert not result.is_error and result.output.struct_value["result"] == 42
        with pytest.raises(NotFoundError), client.tools.execute("no_such_tool", {}) as events:
            list(events)
        with pytest.raises(InvalidArgumentError), client.tools.execute("calculator", {"expr": 1}) as events:
            list(events)
        # The sync facts resource speaks the same calls.
        assert client.facts.list(f"py-nobody-{time.time_ns()}").facts == []


@pytest.mark.timeout(120)
async def test_llm_completion_streams_through_the_gateway(mesh, config):
    chunk = common_pb2.Chunk(chunk_id="c#0", document_id="c", title="json",
                             text="json.loads parses a JSON string into a Python object.")
    async with AsyncClient(config) as client:
        kinds, text = [], []
        async for event in client.llm.stream([user("How do I parse JSON?")], context=[chunk], max_tokens=64):
            kinds.append(event.WhichOneof("event"))
            if kinds[-1] == "text_delta":
                text.append(event.text_delta.text)
        assert kinds[0] == "metadata" and kinds[-1] == "finish" and text
        whole = await client.llm.generate([user("How do I parse JSON?")], context=[chunk], max_tokens=64)
        assert whole.message.content == "".join(text)
        assert whole.metadata.provider == "extractive" and not whole.metadata.is_llm


@pytest.mark.timeout(120)
async def test_errors_are_typed_with_status_message_and_request_id(mesh, config):
    async with AsyncClient(config) as client:
        with pytest.raises(InvalidArgumentError) as empty:
            await client.agent.run("", session_id="py-errors").result()
        error = empty.value
        assert isinstance(error, AgentMeshError) and error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "input is empty" in error.message and str(error).startswith("INVALID_ARGUMENT: ")
        assert len(error.request_id) == 32 and error.retry_delay_s is None
        with pytest.raises(NotFoundError):
            await client.agent.get("0" * 32)
    with Client(config) as client, pytest.raises(InvalidArgumentError, match="session_id"):
        list(client.agent.run(QUESTION, session_id="bad session id!"))


@pytest.mark.timeout(120)
async def test_deadlines_from_the_call_and_from_the_config(mesh, config):
    async with AsyncClient(config) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await client.agent.run(QUESTION, session_id="py-deadline", timeout=0.001).result()
        assert time.monotonic() - start < 5

    # A watch has no deadline by default; one configured for watches ends it on time.
    short = ClientConfig(address=config.address, tenant=TENANT, timeouts=Timeouts(watch_s=1.0))
    with Client(short) as client:
        stream = client.sessions.watch(f"py-deadline-{time.time_ns()}")
        events = iter(stream)
        assert next(events).WhichOneof("event") == "started"
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            next(events)
        assert 0.3 < time.monotonic() - start < 5


# ------------------------------------------------------------ in-process servers that fail on cue


def _unavailable_then(reply, calls: list, failures: int = 1, delay_s: float = 0.0):
    async def handler(request, context):
        calls.append((request, dict(context.invocation_metadata())))
        await asyncio.sleep(delay_s)
        if len(calls) <= failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica shutting down")
        return reply

    return handler


class FlakyMemory(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(self, failures: int = 1, delay_s: float = 0.0) -> None:
        self.context_calls: list = []
        self.append_calls: list = []
        self.GetContext = _unavailable_then(
            memory_pb2.GetContextResponse(version=7), self.context_calls, failures, delay_s
        )
        self.AppendMessages = _unavailable_then(
            memory_pb2.AppendMessagesResponse(version=1), self.append_calls, failures
        )


class FlakyAgent(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self) -> None:
        self.cancel_calls: list = []
        self.run_calls: list = []
        self.get_calls: list = []
        self.CancelRun = _unavailable_then(agent_pb2.CancelRunResponse(), self.cancel_calls, failures=1)
        self.GetRun = _unavailable_then(agent_pb2.GetRunResponse(), self.get_calls, failures=99)

    async def Run(self, request, context):  # noqa: N802 - gRPC method name
        self.run_calls.append(request)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no provider")
        yield agent_pb2.RunResponse()  # never reached; makes this an async generator


class LimitedRetrieval(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Search refused by a rate limit with RetryInfo and QuotaFailure details, as the LLM router
    sends them; IngestDocuments counts what it received."""

    def __init__(self) -> None:
        self.metadata: list[dict] = []
        self.ingested: list[str] = []

    async def Search(self, request, context):  # noqa: N802
        self.metadata.append(dict(context.invocation_metadata()))
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="limit of 60 requests per minute")
        delay = duration_pb2.Duration(seconds=1, nanos=500_000_000)
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.add().Pack(error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject="tenant:pyclient", description="rpm")]
        ))
        grpc_status = rpc_status.to_status(status)
        await context.abort(grpc_status.code, grpc_status.details, trailing_metadata=grpc_status.trailing_metadata)

    async def IngestDocuments(self, request_iterator, context):  # noqa: N802
        async for request in request_iterator:
            self.ingested.append(request.document.id)
        return retrieval_pb2.IngestDocumentsResponse(documents_received=len(self.ingested))


@contextlib.asynccontextmanager
async def serving(*servicers) -> AsyncIterator[str]:
    server = grpc.aio.server()
    for servicer in servicers:
        if isinstance(servicer, memory_pb2_grpc.MemoryServiceServicer):
            memory_pb2_grpc.add_MemoryServiceServicer_to_server(servicer, server)
        elif isinstance(servicer, agent_pb2_grpc.AgentServiceServicer):
            agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
        else:
            retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


FAST_RETRIES = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.mark.timeout(30)
async def test_retry_policy_retries_unavailable_for_idempotent_calls():
    memory = FlakyMemory()
    async with serving(memory) as address:
        async with AsyncClient(ClientConfig(address=address, retry=FAST_RETRIES)) as client:
            reply = await client.sessions.context("s")
            assert reply.version == 7
            assert len(memory.context_calls) == 2, "one UNAVAILABLE, then the retry that succeeded"
            # AppendMessages is retried with the same idempotency key, so it cannot append twice.
            await client.sessions.append("s", [user("hi")])
            keys = [request.idempotency_key for request, _ in memory.append_calls]
            assert len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) == 32

        # The blocking client builds its channel from the same config: same policy.
        memory.context_calls.clear()
        with Client(ClientConfig(address=address, retry=FAST_RETRIES)) as client:
            reply = await asyncio.to_thread(client.sessions.context, "s")
        assert reply.version == 7 and len(memory.context_calls) == 2


@pytest.mark.timeout(30)
async def test_streams_and_writes_are_not_retried_and_retries_can_be_turned_off():
    agent, memory = FlakyAgent(), FlakyMemory()
    async with serving(agent, memory) as address:
        async with AsyncClient(ClientConfig(address=address, retry=FAST_RETRIES)) as client:
            with pytest.raises(UnavailableError, match="replica shutting down"):
                await client.agent.cancel("r" * 32)
            assert len(agent.cancel_calls) == 1
            with pytest.raises(UnavailableError, match="no provider"):
                await client.agent.run("hi", session_id="s").result()
            assert len(agent.run_calls) == 1
            with pytest.raises(UnavailableError):  # retried up to max_attempts, then the status
                await client.agent.get("r" * 32)
            assert len(agent.get_calls) == FAST_RETRIES.max_attempts

        async with AsyncClient(ClientConfig(address=address, retry=RetryPolicy.disabled())) as client:
            with pytest.raises(UnavailableError):
                await client.sessions.context("s")
        assert len(memory.context_calls) == 1


@pytest.mark.timeout(30)
async def test_status_details_and_credentials():
    retrieval = LimitedRetrieval()
    async with serving(retrieval) as address:
        config = ClientConfig(address=address, api_key="amk_" + "k" * 30, tenant="acme")
        async with AsyncClient(config) as client:
            with pytest.raises(ResourceExhaustedError) as limited:
                await client.documents.search("anything")
        error = limited.value
        assert error.retry_delay_s == 1.5
        assert error.detail(error_details_pb2.QuotaFailure).violations[0].subject == "tenant:pyclient"
        sent = retrieval.metadata[0]
        assert sent["x-api-key"] == config.api_key and sent["x-tenant-id"] == "acme"
        assert sent["x-request-id"] == error.request_id and "authorization" not in sent
        assert sent["user-agent"].startswith("agentmesh-python/")

        with Client(ClientConfig(address=address, token="eyJ.header.sig")) as client:
            with pytest.raises(ResourceExhaustedError):
                await asyncio.to_thread(client.documents.search, "anything")
        assert retrieval.metadata[1]["authorization"] == "Bearer eyJ.header.sig"
        assert "x-api-key" not in retrieval.metadata[1]


@pytest.mark.timeout(30)
async def test_a_failing_document_source_raises_its_own_error():
    def documents():
        yield retrieval_pb2.Document(id="a", text="first")
        raise OSError("corpus disk went away")

    retrieval = LimitedRetrieval()
    async with serving(retrieval) as address:
        with Client(ClientConfig(address=address)) as client:
            with pytest.raises(OSError, match="corpus disk went away"):
                await asyncio.to_thread(client.documents.ingest, documents())
        async with AsyncClient(ClientConfig(address=address)) as client:
            with pytest.raises(OSError, match="corpus disk went away"):
                await client.documents.ingest(documents())
            ok = await client.documents.ingest([retrieval_pb2.Document(id="b", text="x")])
        assert ok.documents_received >= 1 and "b" in retrieval.ingested


@pytest.mark.timeout(30)
async def test_deadline_bounds_every_retry_attempt():
    # Each attempt takes 0.3 s before UNAVAILABLE: with a 0.5 s deadline the second attempt is cut
    # by the deadline, where without one all five attempts would run (1.5 s).
    memory = FlakyMemory(failures=1000, delay_s=0.3)
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)
    async with serving(memory) as address:
        async with AsyncClient(ClientConfig(address=address, retry=policy, timeouts=Timeouts(unary_s=0.5))) as client:
            start = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                await client.sessions.context("s")
            assert time.monotonic() - start < 1.2
    assert len(memory.context_calls) == 2


@pytest.mark.timeout(30)
async def test_wait_ready():
    from agentmesh.services.cli.processes import free_port  # noqa: PLC0415

    async with serving(FlakyMemory()) as address:
        async with AsyncClient(ClientConfig(address=address)) as client:
            await client.wait_ready(5)
    async with AsyncClient(ClientConfig(address=f"127.0.0.1:{free_port()}")) as client:
        start = time.monotonic()
        with pytest.raises(UnavailableError, match="no connection"):
            await client.wait_ready(0.5)
        assert time.monotonic() - start < 3
    with Client(ClientConfig(address=f"127.0.0.1:{free_port()}")) as client:
        with pytest.raises(UnavailableError, match="no connection"):
            await asyncio.to_thread(client.wait_ready, 0.5)


def test_config_is_validated():
    with pytest.raises(ValueError, match="api_key or token"):
        ClientConfig(api_key="a" * 30, token="t")
    with pytest.raises(ValueError, match="1..5"):
        RetryPolicy(max_attempts=6)
    with pytest.raises(ValueError, match="tls"):
        ClientConfig(root_certificates=b"pem")
    with pytest.raises(ValueError, match="positive"):
        Timeouts(run_s=0)
    assert RetryPolicy.disabled().service_config() is None
