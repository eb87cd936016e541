"""The main job, end to end through the real Envoy with real Redis, Milvus Lite and embeddings:
ingest real documents, stream a grounded answer with citations, remember the session, refuse bad
input without writing anything, and follow the health of a dependency. No API key: the router
answers with its extractive provider."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import struct_pb2

from agentmesh.agent.v1 import agent_pb2
from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.services.cli.processes import start_redis
from agentmesh.services.cli.runner import health_status
from agentmesh.services.retrieval.corpus import stdlib_documents
from agentmesh.tools.v1 import tools_pb2
from tests.e2e.mesh import E2E_MODULES, Stubs, ingest, local_mesh, run_events, tenant_md

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

QUESTION = "How do I parse a JSON string into a Python object?"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    env = {"AGENTMESH_LLM_PROVIDER": "extractive", "OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": ""}
    with local_mesh(tmp_path_factory.mktemp("mesh"), env) as m:
        yield m


@pytest.fixture(scope="module")
def documents():
    return list(stdlib_documents(modules=E2E_MODULES))


@pytest.fixture()
async def stubs(mesh):
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        yield Stubs(channel)


async def test_ingest_is_idempotent(stubs, documents):
    first = await ingest(stubs, documents)
    assert first.documents_received == len(documents)
    assert first.documents_written + first.documents_unchanged == len(documents)
    again = await ingest(stubs, documents)
    assert again.documents_unchanged == len(documents)
    assert again.documents_written == 0 and again.chunks_written == 0


async def test_streamed_grounded_answer_with_citations_and_memory(stubs, documents):
    await ingest(stubs, documents)
    doc_ids = {d.id for d in documents}
    events = await run_events(stubs, agent_pb2.RunRequest(session_id="e2e-main", input=QUESTION))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "final"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert "memory_loaded" in kinds and "retrieval" in kinds and "step_started" in kinds

    retrieval = next(e.retrieval for e in events if e.WhichOneof("event") == "retrieval")
    assert retrieval.chunks and retrieval.chunks[0].document_id == "python-stdlib:json"
    step = next(e.step_started for e in events if e.WhichOneof("event") == "step_started")
    assert step.provider == "extractive" and not step.is_llm and step.notice

    deltas = [e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta"]
    assert len(deltas) >= 3, "the answer must arrive as several stream messages"
    assert kinds.index("final") > max(i for i, k in enumerate(kinds) if k == "text_delta")
    final = events[-1].final
    assert final.status == agent_pb2.RUN_STATUS_COMPLETED
    assert final.output == "".join(deltas) and final.output.strip()
    assert final.citations, "a grounded answer cites its sources"
    for citation in final.citations:
        assert citation.chunk.document_id in doc_ids
        assert f"[{citation.index}]" in final.output
    assert any(c.chunk.document_id == "python-stdlib:json" for c in final.citations)
    assert final.usage.output_tokens > 0
    assert final.session_version == 2  # the user message and the answer

    follow_up = await run_events(
        stubs, agent_pb2.RunRequest(session_id="e2e-main", input="And how do I write one back to a file?")
    )
    memory = next(e.memory_loaded for e in follow_up if e.WhichOneof("event") == "memory_loaded")
    assert memory.messages == 2 and memory.tokens > 0, "the follow-up sees the first turn"
    assert follow_up[-1].final.session_version == 4

    history = await stubs.memory.GetContext(
        memory_pb2.GetContextRequest(session_id="e2e-main"), metadata=tenant_md(), timeout=10
    )
    assert [m.content for m in history.messages][:2] == [QUESTION, final.output]


async def test_sessions_are_per_tenant(stubs, documents):
    await ingest(stubs, documents)
    await run_events(stubs, agent_pb2.RunRequest(session_id="shared-name", input=QUESTION))
    other = await run_events(stubs, agent_pb2.RunRequest(session_id="shared-name", input=QUESTION), tenant="other")
    memory = next(e.memory_loaded for e in other if e.WhichOneof("event") == "memory_loaded")
    assert memory.messages == 0
    retrieval = next(e.retrieval for e in other if e.WhichOneof("event") == "retrieval")
    assert not retrieval.chunks, "tenant 'other' ingested nothing, so it retrieves nothing"


async def _assert_nothing_written(stubs, session_id: str) -> None:
    history = await stubs.memory.GetContext(
        memory_pb2.GetContextRequest(session_id=session_id), metadata=tenant_md(), timeout=10
    )
    assert history.version == 0 and not history.messages


@pytest.mark.parametrize(
    ("request_kwargs", "code", "words"),
    [
        ({"input": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "input is empty"),
        ({"input": "x" * 16_385}, grpc.StatusCode.INVALID_ARGUMENT, "16385 characters"),
        ({"input": QUESTION, "tools": ["no_such_tool"]}, grpc.StatusCode.INVALID_ARGUMENT, "no_such_tool"),
        ({"input": QUESTION, "max_steps": 99}, grpc.StatusCode.INVALID_ARGUMENT, "max_steps"),
        ({"input": "x" * (5 * 1024 * 1024)}, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ],
    ids=["empty", "too-long", "unknown-tool", "max-steps", "over-message-limit"],
)
async def test_bad_run_requests_are_refused_and_write_nothing(stubs, request_kwargs, code, words):
    session = f"bad-{code.name.lower()}-{abs(hash(words)) % 10_000}"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(stubs, agent_pb2.RunRequest(session_id=session, **request_kwargs))
    assert info.value.code() == code, info.value.details()
    assert words in info.value.details()
    await _assert_nothing_written(stubs, session)


async def test_run_without_deadline_margin_is_refused_before_any_work(stubs):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(stubs, agent_pb2.RunRequest(session_id="short-deadline", input=QUESTION), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "needs at least" in info.value.details()
    await _assert_nothing_written(stubs, "short-deadline")


async def test_tool_errors_have_their_status(stubs):
    def args(**kwargs):
        s = struct_pb2.Struct()
        s.update(kwargs)
        return s

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stubs.tools.ExecuteTool(
            tools_pb2.ExecuteToolRequest(name="no_such_tool", arguments=args()), metadata=tenant_md(), timeout=10
        ):
            pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "calculator" in info.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stubs.tools.ExecuteTool(
            tools_pb2.ExecuteToolRequest(name="calculator", arguments=args(expression=5)),
            metadata=tenant_md(),
            timeout=10,
        ):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expression" in info.value.details()

    results = [
        r async for r in stubs.tools.ExecuteTool(
            tools_pb2.ExecuteToolRequest(name="calculator", arguments=args(expression="6*7")),
            metadata=tenant_md(),
            timeout=10,
        )
    ]
    assert results[-1].result.output.struct_value["result"] == 42


async def _wait_health(address: str, want: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(health_status, address)
        if status == want:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{address} health is {status}, expected {want}")


async def test_health_follows_redis_and_acknowledged_writes_survive(mesh, stubs):
    """Last in this module: it restarts Redis under the running mesh."""
    before = await stubs.memory.AppendMessages(
        memory_pb2.AppendMessagesRequest(
            session_id="durable", messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="remember me")]
        ),
        metadata=tenant_md(),
        timeout=10,
    )
    await _wait_health(mesh.address("memory"), "SERVING")
    redis = mesh.record("redis").process()
    assert redis is not None, "the mesh's Redis is not running"
    redis.terminate()
    redis.wait(10)
    await _wait_health(mesh.address("memory"), "NOT_SERVING")
    await _wait_health(mesh.address("orchestrator"), "NOT_SERVING")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.memory.GetContext(memory_pb2.GetContextRequest(session_id="durable"), metadata=tenant_md(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    restarted = start_redis(mesh.ports.redis, mesh.paths.redis_data, mesh.paths.logs)
    try:
        await _wait_health(mesh.address("memory"), "SERVING")
        await _wait_health(mesh.address("orchestrator"), "SERVING")
        history = await stubs.memory.GetContext(
            memory_pb2.GetContextRequest(session_id="durable"), metadata=tenant_md(), timeout=10
        )
        assert history.version == before.version
        assert history.messages[-1].content == "remember me"
    finally:
        restarted.stop()
