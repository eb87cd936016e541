"""The router with its real Anthropic SDK client against the fake Messages-API server."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from tests.llm.support import ASSISTANT, CALCULATOR, SYSTEM, TOOL, chunk, router, stream, user


@pytest.fixture(autouse=True, params=["lean", "httpx", "sdk"])
def client(request, _no_provider_env, monkeypatch):
    """Every test runs with each transport: lean (asyncio), httpx and the official SDK."""
    monkeypatch.setenv("AGENTMESH_LLM_CLIENT", request.param)
    return request.param


def anthropic_router(fake, **settings):
    return router(provider="anthropic", anthropic_base_url=fake.base_url, anthropic_api_key="sk-ant-test", **settings)


async def test_text_and_tool_use_stream(anthropic_fake):
    anthropic_fake.enqueue({
        "text": "Let me compute that with the calculator.", "text_chunks": 3,
        "tool_calls": [{"id": "toolu_01calc", "name": "calculator", "arguments": {"expression": "6*7"},
                        "fragments": 4}],
        "usage": {"input_tokens": 88, "output_tokens": 31},
    })
    request = llm_pb2.StreamGenerateRequest(
        messages=[common_pb2.Message(role=SYSTEM, content="You are terse."), user("What is 6 times 7?")],
        tools=[CALCULATOR],
        context=[chunk(1, "operator", "operator.mul(a, b) returns a * b.")],
        options=llm_pb2.GenerationOptions(max_tokens=300),
    )
    async with anthropic_router(anthropic_fake) as stub:
        result = await stream(stub, request)

    assert result.error is None
    assert result.kinds() == (["metadata"] + ["text_delta"] * 3 + ["tool_call_delta"] * 5 + ["usage", "finish"])
    meta = result.metadata
    assert (meta.provider, meta.model, meta.is_llm, meta.notice) == ("anthropic", "claude-haiku-4-5", True, "")
    assert (meta.deployment, meta.requested_model, meta.attempts, meta.cached) == (
        "anthropic", "claude-haiku-4-5", 1, False)
    assert result.text == "Let me compute that with the calculator."
    first, *rest = result.of("tool_call_delta")
    assert (first.index, first.id, first.name, first.arguments_delta) == (0, "toolu_01calc", "calculator", "")
    assert all(d.index == 0 and d.arguments_delta and not d.id for d in rest)
    assert result.tool_arguments(0) == {"expression": "6*7"}
    usage = common_pb2.Usage(input_tokens=88, output_tokens=31, total_tokens=119)
    assert result.of("finish") == [llm_pb2.Finish(reason=common_pb2.FINISH_REASON_TOOL_CALLS, usage=usage)]

    (body,) = anthropic_fake.bodies
    assert body["max_tokens"] == 300 and body["stream"] is True
    assert body["system"].startswith("You are terse.\n\n") and "[1] operator — python://stdlib/operator" in body["system"]
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "What is 6 times 7?"}]}]
    assert body["tools"] == [{
        "name": "calculator", "description": "Evaluate an arithmetic expression.",
        "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}},
                         "required": ["expression"]},
    }]
    headers = anthropic_fake.requests[0]["headers"]
    assert "sk-ant-test" in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))


async def test_parallel_tool_results_become_one_user_message(anthropic_fake):
    anthropic_fake.enqueue({"text": "Both are done: 42 and 5."})
    a, b = struct_pb2.Struct(), struct_pb2.Struct()
    a.update({"expression": "6*7"})
    b.update({"expression": "2+3"})
    request = llm_pb2.StreamGenerateRequest(
        messages=[
            user("Compute 6*7 and 2+3."),
            common_pb2.Message(role=ASSISTANT, content="Computing both.", tool_calls=[
                common_pb2.ToolCall(id="toolu_a", name="calculator", arguments=a),
                common_pb2.ToolCall(id="toolu_b", name="calculator", arguments=b),
            ]),
            common_pb2.Message(role=TOOL, tool_call_id="toolu_a", content="42"),
            common_pb2.Message(role=TOOL, tool_call_id="toolu_b", content="5"),
        ],
        tools=[CALCULATOR],
    )
    async with anthropic_router(anthropic_fake) as stub:
        whole = await stub.Generate(llm_pb2.GenerateRequest(
            messages=request.messages, tools=request.tools), timeout=20)

    # The fake answers 400 unless every tool_use is answered at the start of the next user message.
    assert whole.message.content == "Both are done: 42 and 5."
    assert whole.finish_reason == common_pb2.FINISH_REASON_STOP
    assert anthropic_fake.bodies[0]["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "text", "text": "Computing both."},
            {"type": "tool_use", "id": "toolu_a", "name": "calculator", "input": {"expression": "6*7"}},
            {"type": "tool_use", "id": "toolu_b", "name": "calculator", "input": {"expression": "2+3"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": "42"},
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": "5"},
        ]},
    ]


async def test_error_event_after_first_delta_ends_with_unavailable(anthropic_fake):
    anthropic_fake.enqueue({"text": "one two three four", "text_chunks": 4, "error_after": 1})
    async with anthropic_router(anthropic_fake) as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("count")]))
    assert result.kinds() == ["metadata", "text_delta", "interrupted"]  # never a silent end
    assert result.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "cut after 1 delta (about 1 token," in result.error.details() and "overloaded_error" in result.error.details()
    (interrupted,) = result.of("interrupted")
    assert interrupted.reason == result.error.details()
    assert interrupted.sent_deltas == 1 and interrupted.usage_estimated
    assert interrupted.partial_usage.output_tokens == 1 and interrupted.partial_usage.input_tokens > 0
    assert interrupted.partial_usage.total_tokens == interrupted.partial_usage.input_tokens + 1


async def test_cut_before_first_delta_falls_back_to_extractive(anthropic_fake):
    anthropic_fake.enqueue({"text": "never arrives", "cut_after": 0})
    request = llm_pb2.StreamGenerateRequest(
        messages=[user("Which function sorts a list in place?")],
        context=[chunk(1, "stdtypes", "list.sort() sorts the list in place. It returns None."),
                 chunk(2, "functions", "sorted() returns a new sorted list from the items in iterable.")],
    )
    async with anthropic_router(anthropic_fake) as stub:
        result = await stream(stub, request)
    assert result.error is None
    assert result.metadata.provider == "extractive" and "anthropic provider failed" in result.metadata.notice
    assert "connection to anthropic failed" in result.metadata.notice
    assert "list.sort() sorts the list in place [1]." in result.text


async def test_overloaded_529_without_fallback_is_unavailable(anthropic_fake):
    anthropic_fake.enqueue({"status": 529, "error_message": "Overloaded"})
    async with anthropic_router(anthropic_fake, fallback_to_extractive=False) as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("hi")]))
    assert result.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "anthropic failed before answering" in result.error.details() and "529" in result.error.details()
