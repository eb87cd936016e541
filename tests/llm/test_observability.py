"""CountTokens, Prometheus metrics and OpenTelemetry spans of the router."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import httpx
import pytest
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.cli.processes import free_port
from agentmesh.services.llm.counting import tiktoken_encoding
from agentmesh.services.llm.service import LLMService, LLMSettings
from agentmesh.services.runtime.server import serve
from tests.fakes.openai_server import FakeOpenAIServer
from tests.llm.support import CALCULATOR, SYSTEM, anthropic_deployment, catalogue_router, chunk, openai_deployment, stream, user


def _two_ports() -> tuple[int, int]:
    ports: set[int] = set()
    while len(ports) < 2:
        ports.add(free_port())
    return tuple(ports)  # type: ignore[return-value]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_count_tokens_is_exact_with_tiktoken_for_openai_and_approximate_elsewhere(tmp_path, openai_fake,
                                                                                         anthropic_fake):
    catalogue = {"models": {
        "gpt": {"deployments": [openai_deployment("gpt", openai_fake, model="gpt-4o", context_window=128000)]},
        "legacy": {"deployments": [openai_deployment("legacy", openai_fake, model="gpt-4")]},
        "claude": {"deployments": [anthropic_deployment("claude", anthropic_fake, model="claude-sonnet-4-5")]},
    }}
    messages = [common_pb2.Message(role=SYSTEM, content="Be brief."), user("What does json.dumps do?")]
    context = [chunk(1, "json", "json.dumps(obj) serializes obj to a JSON formatted str.")]
    async with catalogue_router(tmp_path / "c.yaml", catalogue) as stub:
        gpt = await stub.CountTokens(llm_pb2.CountTokensRequest(model="gpt", messages=messages, context=context), timeout=5)
        legacy = await stub.CountTokens(llm_pb2.CountTokensRequest(model="legacy", messages=messages), timeout=5)
        tools = await stub.CountTokens(llm_pb2.CountTokensRequest(model="gpt", messages=messages, tools=[CALCULATOR]),
                                       timeout=5)
        claude = await stub.CountTokens(llm_pb2.CountTokensRequest(model="claude", messages=messages), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.CountTokens(llm_pb2.CountTokensRequest(model="nope", messages=messages), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.CountTokens(llm_pb2.CountTokensRequest(model="gpt"), timeout=5)

    from agentmesh.services.llm import prompt

    def expected(encoding: str, with_context: bool) -> int:
        enc = tiktoken_encoding(encoding)
        rendered = prompt.openai_messages(messages, context if with_context else [])
        # OpenAI cookbook: 3 tokens per message + the tokens of each value, + 3 priming the reply.
        return sum(3 + sum(len(enc.encode(v)) for v in m.values()) for m in rendered) + 3

    assert (gpt.tokenizer, gpt.approximate, gpt.deployment, gpt.upstream_model) == ("o200k_base", False, "gpt", "gpt-4o")
    assert gpt.input_tokens == expected("o200k_base", True) and gpt.context_window_tokens == 128000
    assert (legacy.tokenizer, legacy.approximate) == ("cl100k_base", False)
    assert legacy.input_tokens == expected("cl100k_base", False)
    assert tools.approximate and tools.input_tokens > expected("o200k_base", False)
    assert (claude.tokenizer, claude.approximate) == ("wordpiece", True) and claude.input_tokens > 5
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_metrics_and_gen_ai_spans_of_a_failover(tmp_path, span_exporter):
    primary, secondary = f"p{uuid.uuid4().hex[:8]}", f"s{uuid.uuid4().hex[:8]}"
    with FakeOpenAIServer(api_key="sk-test") as a, FakeOpenAIServer(api_key="sk-test") as b:
        a.enqueue({"status": 500}, {"status": 503})
        b.enqueue({"text": "one two three four", "text_chunks": 4, "chunk_delay_s": 0.01,
                   "usage": {"input_tokens": 30, "output_tokens": 4}})
        catalogue = {"models": {"assistant": {"deployments": [
            openai_deployment(primary, a, model="gpt-4o", max_retries=1),
            openai_deployment(secondary, b, model="gpt-4o-mini", input_usd_per_mtok=1000.0, output_usd_per_mtok=2000.0),
        ]}}}
        span_exporter.clear()
        async with catalogue_router(tmp_path / "c.yaml", catalogue, retry_base_s=0.01) as stub:
            result = await stream(stub, llm_pb2.StreamGenerateRequest(
                model="assistant", messages=[user("count")], options=llm_pb2.GenerationOptions(max_tokens=50)))
    assert result.error is None and result.metadata.attempts == 3
    # The metrics endpoint (AGENTMESH_LLM_METRICS_PORT) serves the default registry.
    grpc_port, port = _two_ports()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(LLMService(LLMSettings(port=grpc_port, metrics_port=port)), stop_event=stop,
                                     handle_signals=False))
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                try:
                    exposition = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    assert metric("agentmesh_llm_requests_total", deployment=secondary, code="OK") == 1
    assert metric("agentmesh_llm_attempts_total", deployment=primary, outcome="server") == 2
    assert metric("agentmesh_llm_retries_total", deployment=primary, reason="server") == 1
    assert metric("agentmesh_llm_failovers_total", deployment=primary, reason="server") == 1
    assert metric("agentmesh_llm_time_to_first_token_seconds_count", deployment=secondary) == 1
    assert metric("agentmesh_llm_inter_token_latency_seconds_count", deployment=secondary) == 1
    assert 0.005 < metric("agentmesh_llm_inter_token_latency_seconds_sum", deployment=secondary) < 0.5
    assert metric("agentmesh_llm_tokens_total", deployment=secondary, type="input") == 30
    assert metric("agentmesh_llm_tokens_total", deployment=secondary, type="output") == 4
    assert metric("agentmesh_llm_cost_usd_total", deployment=secondary) == pytest.approx((30 * 1000 + 4 * 2000) / 1e6)
    assert metric("agentmesh_llm_circuit_state", deployment=primary) == 0
    assert metric("agentmesh_llm_in_flight", deployment=secondary) == 0
    assert f'agentmesh_llm_requests_total{{code="OK",deployment="{secondary}"}} 1.0' in exposition

    spans = span_exporter.get_finished_spans()
    (parent,) = [s for s in spans if s.name == "chat assistant"]
    (rpc,) = [s for s in spans if s.name == "/agentmesh.llm.v1.LLMService/StreamGenerate"
              and s.context.trace_id == parent.context.trace_id] or [None]
    if rpc is not None:  # the runtime's gRPC instrumentation: the generation span is its child
        assert parent.parent.span_id == rpc.context.span_id
    attempts = sorted((s for s in spans if s.parent and s.parent.span_id == parent.context.span_id),
                      key=lambda s: s.start_time)
    assert parent.kind == SpanKind.INTERNAL
    assert [(s.name, s.kind) for s in attempts] == [("chat gpt-4o", SpanKind.CLIENT)] * 2 + [
        ("chat gpt-4o-mini", SpanKind.CLIENT)]
    assert [s.status.status_code for s in attempts] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    assert attempts[0].attributes["error.type"] == "server"
    ok = attempts[2].attributes
    assert ok["gen_ai.system"] == "openai" and ok["gen_ai.request.model"] == "gpt-4o-mini"
    assert ok["gen_ai.operation.name"] == "chat" and ok["gen_ai.request.max_tokens"] == 50
    assert (ok["gen_ai.usage.input_tokens"], ok["gen_ai.usage.output_tokens"]) == (30, 4)
    assert ok["gen_ai.response.finish_reasons"] == ("stop",) and ok["server.address"] == "127.0.0.1"
    top = parent.attributes
    assert top["gen_ai.request.model"] == "assistant" and top["gen_ai.response.model"] == "gpt-4o-mini"
    assert top["agentmesh.llm.deployment"] == secondary and top["agentmesh.llm.attempts"] == 3
    assert top["agentmesh.llm.cost_usd"] == pytest.approx(0.038) and top["agentmesh.tenant"] == "default"


async def test_refused_requests_are_counted_and_their_span_is_an_error(tmp_path, openai_fake, span_exporter):
    name = f"d{uuid.uuid4().hex[:8]}"
    catalogue = {"models": {"chat": {"deployments": [openai_deployment(name, openai_fake)]}}}
    before = metric("agentmesh_llm_requests_total", deployment="none", code="NOT_FOUND")
    span_exporter.clear()
    async with catalogue_router(tmp_path / "c.yaml", catalogue) as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(model="missing", messages=[user("hi")]))
    assert result.error.code() == grpc.StatusCode.NOT_FOUND
    assert metric("agentmesh_llm_requests_total", deployment="none", code="NOT_FOUND") == before + 1
    (span,) = [s for s in span_exporter.get_finished_spans() if s.instrumentation_scope.name == "agentmesh.llm"]
    assert span.status.status_code == StatusCode.ERROR and span.attributes["error.type"] == "NOT_FOUND"
