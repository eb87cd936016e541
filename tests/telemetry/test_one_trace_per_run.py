"""One ``AgentService.Run`` is ONE trace, from the gateway through every service.

The five real services run in this process (their spans go to an in-memory exporter), behind a
real Envoy rendered from gateway/envoy.yaml whose OpenTelemetry tracer exports over OTLP/gRPC to
a receiver in this test. The model is the OpenAI fake (the real router's SDK speaks to it) and
asks for one calculator call, so the run has every kind of step: memory, retrieval, two model
calls, a tool call. Context crosses every hop only in ``traceparent`` metadata.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections import Counter

import grpc
import pytest
import pytest_asyncio
from opentelemetry.trace import SpanKind

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.cli.gateway import GatewayOptions
from agentmesh.services.runtime.logs import JsonFormatter
from agentmesh.services.runtime.settings import SERVICE_NAMES
from tests.fakes.openai_server import FakeOpenAIServer
from tests.gateway.conftest import envoy_in_front_of
from tests.telemetry.collector import otlp_receiver
from tests.telemetry.conftest import services_in_process

pytestmark = pytest.mark.timeout(300)

TURNS = [
    {
        "tool_calls": [{"id": "call_otel_1", "name": "calculator", "arguments": {"expression": "6*7"}, "fragments": 3}],
        "usage": {"input_tokens": 100, "output_tokens": 12},
    },
    {"text": "Six times seven is 42.", "text_chunks": 3, "usage": {"input_tokens": 140, "output_tokens": 6}},
]
TENANT = (("x-tenant-id", "otel"),)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def traced_mesh(tmp_path_factory, span_exporter):
    root = tmp_path_factory.mktemp("traced-mesh")
    with FakeOpenAIServer(TURNS, api_key="sk-otel") as fake:
        env = {
            "AGENTMESH_LLM_PROVIDER": "openai",
            "OPENAI_BASE_URL": fake.base_url,
            "OPENAI_API_KEY": "sk-otel",
            "AGENTMESH_LLM_MODEL": "gpt-4o-mini",
            "AGENTMESH_LLM_FALLBACK_TO_EXTRACTIVE": "false",
        }
        async with services_in_process(root, env) as ports, otlp_receiver() as (receiver, receiver_address):
            upstreams = {kind: f"127.0.0.1:{ports.service(kind)}" for kind in SERVICE_NAMES}
            options = GatewayOptions(otlp_address=receiver_address, trace_sampling_percent=100)
            async with envoy_in_front_of(upstreams, root / "envoy", options) as gw:
                yield gw, receiver


async def test_a_run_is_one_trace_across_gateway_and_services(traced_mesh, span_exporter):
    gw, receiver = traced_mesh
    async with grpc.aio.insecure_channel(gw.address) as channel:
        document = retrieval_pb2.Document(
            id="otel-doc", title="Arithmetic", text="Multiplication: six times seven equals forty-two."
        )

        async def documents():
            yield retrieval_pb2.IngestDocumentsRequest(document=document)

        await retrieval_pb2_grpc.RetrievalServiceStub(channel).IngestDocuments(documents(), metadata=TENANT, timeout=120)
        span_exporter.clear()

        # The client starts the trace; everything after must stay in it.
        trace_id, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        metadata = (*TENANT, ("traceparent", f"00-{trace_id}-{client_span}-01"))
        records = io.StringIO()
        handler = logging.StreamHandler(records)
        handler.setFormatter(JsonFormatter())
        rpc_log = logging.getLogger("agentmesh.rpc")
        rpc_log.addHandler(handler)
        level = rpc_log.level
        rpc_log.setLevel(logging.INFO)
        try:
            request = agent_pb2.RunRequest(session_id="otel-1", input="What is 6 times 7?", tools=["calculator"])
            events = [e async for e in agent_pb2_grpc.AgentServiceStub(channel).Run(request, metadata=metadata, timeout=120)]
        finally:
            rpc_log.removeHandler(handler)
            rpc_log.setLevel(level)
    assert events[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED and events[-1].final.steps == 2

    # -- the gateway's span (exported by Envoy over OTLP) continues the client's trace
    (gateway_span,) = await receiver.wait_for(lambda s: s.trace_id == trace_id)
    assert gateway_span.service == "agentmesh-gateway" and gateway_span.parent_span_id == client_span

    # -- every service span of the run, from the in-memory exporter
    spans = [s for s in span_exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
    # Background work has traces of its own and may overlap the run (memory's fact extraction
    # calls Generate, its alias cache refreshes with ListModels, other test modules' services may
    # still be up): what must never happen is a call the run makes landing in another trace.
    run_methods = ("/Run", "/GetContext", "/AppendMessages", "/Search", "/StreamGenerate", "/ExecuteTool", "/RecallFacts")
    broken_off = [
        (s.name, s.resource.attributes.get("service.name"))
        for s in span_exporter.get_finished_spans()
        if format(s.context.trace_id, "032x") != trace_id and s.kind == SpanKind.SERVER and s.name.endswith(run_methods)
    ]
    assert not broken_off, ("a call of the run started its own trace", broken_off)
    by_id = {s.context.span_id: s for s in spans}

    def parent(span):
        return by_id.get(span.parent.span_id) if span.parent else None

    def only(name: str, kind: SpanKind | None = None):  # exactly one span of that name
        found = [s for s in spans if s.name == name and (kind is None or s.kind == kind)]
        assert len(found) == 1, (name, [s.name for s in spans])
        return found[0]

    def operation(span) -> str:
        return span.attributes.get("gen_ai.operation.name", span.name)

    def descends_from(span, ancestor) -> bool:
        while (span := parent(span)) is not None:
            if span is ancestor:
                return True
        return False

    run = only("/agentmesh.agent.v1.AgentService/Run", SpanKind.SERVER)
    assert format(run.parent.span_id, "016x") == gateway_span.span_id and run.parent.is_remote
    (agent,) = [s for s in spans if operation(s) == "invoke_agent" and parent(s) is run]
    assert agent.name.startswith("invoke_agent ")
    assert agent.attributes["gen_ai.conversation.id"] == "otel-1"

    def served_by(span):  # the SERVER span of the RPC during which ``span`` was made
        while span is not None and span.kind != SpanKind.SERVER:
            span = parent(span)
        return span

    # The orchestrator's steps of the run, each inside the agent span (GenAI semantic
    # conventions); the services called may add spans of their own below their SERVER span.
    kinds = ("chat", "execute_tool", "retrieval", "memory load", "memory append")
    steps = [s for s in spans if operation(s) in kinds and s.kind == SpanKind.INTERNAL and served_by(s) is run]
    assert Counter(operation(s) for s in steps) == Counter(
        {"chat": 2, "execute_tool": 1, "retrieval": 1, "memory load": 1, "memory append": 1}
    ), [s.name for s in spans]
    assert all(descends_from(s, agent) for s in steps)
    chats = sorted((s for s in steps if operation(s) == "chat"), key=lambda s: s.start_time)
    assert all(c.attributes["gen_ai.provider.name"] == "openai" for c in chats)
    assert chats[0].attributes["gen_ai.response.finish_reasons"] == ("FINISH_REASON_TOOL_CALLS",)
    usage = [(c.attributes["gen_ai.usage.input_tokens"], c.attributes["gen_ai.usage.output_tokens"]) for c in chats]
    assert usage == [(100, 12), (140, 6)]
    (tool,) = [s for s in steps if operation(s) == "execute_tool"]
    assert (tool.name, tool.attributes["gen_ai.tool.name"]) == ("execute_tool calculator", "calculator")
    assert tool.attributes["gen_ai.tool.call.id"] == "call_otel_1"
    assert chats[0].end_time <= tool.start_time <= tool.end_time <= chats[1].start_time

    # The service that answered each step's downstream call continued the trace from the step's
    # span (the traceparent of outgoing_metadata; no CLIENT span in between).
    downstream = {
        "memory load": "/agentmesh.memory.v1.MemoryService/GetContext",
        "retrieval": "/agentmesh.retrieval.v1.RetrievalService/Search",
        "chat": "/agentmesh.llm.v1.LLMService/StreamGenerate",
        "execute_tool": "/agentmesh.tools.v1.ToolService/ExecuteTool",
        "memory append": "/agentmesh.memory.v1.MemoryService/AppendMessages",
    }
    for step in steps:
        (server,) = [s for s in spans if parent(s) is step and s.kind == SpanKind.SERVER]
        assert server.name == downstream[operation(step)]
        assert server.parent.is_remote  # it came through gRPC metadata, not this process's context
        assert server.attributes["agentmesh.tenant"] == "otel"
        assert server.attributes["rpc.grpc.status_code"] == 0

    # Nothing of the run hangs outside the tree below the gateway's span.
    assert all(parent(s) is not None for s in spans if s is not run)

    # -- the services' JSON logs carry the same trace, and the span of the call they describe
    lines = [json.loads(line) for line in records.getvalue().splitlines()]
    run_line = next(line for line in lines if line.get("method") == "/agentmesh.agent.v1.AgentService/Run")
    assert run_line["trace_id"] == trace_id and run_line["span_id"] == format(run.context.span_id, "016x")
    assert {line["trace_id"] for line in lines} == {trace_id}
