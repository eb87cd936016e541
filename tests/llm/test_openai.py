"""The router with its real OpenAI SDK client against the fake chat-completions server."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from google.protobuf import struct_pb2

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from tests.llm.support import ASSISTANT, CALCULATOR, SYSTEM, TOOL, chunk, router, stream, user

STOP, TOOL_CALLS = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_TOOL_CALLS


@pytest.fixture(autouse=True, params=["lean", "httpx", "sdk"])
def client(request, _no_provider_env, monkeypatch):
    """Every test runs with each transport: lean (asyncio), httpx and the official SDK."""
    monkeypatch.setenv("AGENTMESH_LLM_CLIENT", request.param)
    return request.param


def openai_router(fake, **settings):
    return router(provider="openai", openai_base_url=fake.base_url, openai_api_key="sk-test", **settings)


async def test_text_stream_has_metadata_deltas_usage_and_finish(openai_fake):
    answer = "json.dumps turns a Python object into a JSON string [1]."
    openai_fake.enqueue({"text": answer, "text_chunks": 4, "usage": {"input_tokens": 57, "output_tokens": 13}})
    request = llm_pb2.StreamGenerateRequest(
        model="gpt-test",
        messages=[common_pb2.Message(role=SYSTEM, content="Be brief."), user("What does json.dumps do?")],
        context=[chunk(1, "json", "json.dumps(obj) serializes obj to a JSON formatted str.")],
        options=llm_pb2.GenerationOptions(max_tokens=200, temperature=0.2),
    )
    async with openai_router(openai_fake) as stub:
        result = await stream(stub, request)

    assert result.error is None
    assert result.kinds() == ["metadata"] + ["text_delta"] * 4 + ["usage", "finish"]
    meta = result.metadata
    assert (meta.provider, meta.model, meta.is_llm, meta.notice) == ("openai", "gpt-test", True, "")
    # No catalogue: one deployment named after the provider; any model name passes through to it.
    assert (meta.deployment, meta.requested_model, meta.attempts, meta.cached) == ("openai", "gpt-4.1-mini", 1, False)
    assert result.text == answer
    usage = common_pb2.Usage(input_tokens=57, output_tokens=13, total_tokens=70)
    assert result.of("usage") == [usage]
    assert result.of("finish") == [llm_pb2.Finish(reason=STOP, usage=usage)]

    # What went over the wire: streaming with usage, our limits, the context rendered as sources.
    (body,) = openai_fake.bodies
    assert body["model"] == "gpt-test" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 200  # an OpenAI-compatible server gets `max_tokens`
    assert body["temperature"] == pytest.approx(0.2)
    system, question = body["messages"]
    assert system["role"] == "system" and system["content"].startswith("Be brief.")
    assert "[1] json — python://stdlib/json\njson.dumps(obj) serializes obj" in system["content"]
    assert "[n]" not in system["content"] and "cite it with its number" in system["content"]
    assert question == {"role": "user", "content": "What does json.dumps do?"}
    assert openai_fake.requests[0]["headers"]["authorization"] == "Bearer sk-test"


async def test_streamed_tool_call_is_reassembled_from_fragments(openai_fake):
    openai_fake.enqueue(
        {"tool_calls": [{"id": "call_calc1", "name": "calculator", "arguments": {"expression": "6*7"}, "fragments": 5}],
         "usage": {"input_tokens": 40, "output_tokens": 18}}
    )
    request = llm_pb2.StreamGenerateRequest(messages=[user("What is 6 times 7?")], tools=[CALCULATOR])
    async with openai_router(openai_fake) as stub:
        result = await stream(stub, request)

    assert result.error is None
    deltas = result.of("tool_call_delta")
    assert len(deltas) == 6  # the opening fragment, then 5 argument fragments
    assert (deltas[0].index, deltas[0].id, deltas[0].name) == (0, "call_calc1", "calculator")
    assert all(d.index == 0 and not d.id and not d.name for d in deltas[1:])
    assert all(d.arguments_delta for d in deltas[1:])
    assert result.tool_arguments(0) == {"expression": "6*7"}
    assert result.of("finish")[0].reason == TOOL_CALLS
    assert result.kinds()[-2:] == ["usage", "finish"]

    (body,) = openai_fake.bodies
    assert body["tools"] == [{
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                           "required": ["expression"]},
        },
    }]


async def test_tool_round_trip_converts_assistant_tool_calls_and_tool_results(openai_fake):
    openai_fake.enqueue({"text": "6 times 7 is 42."})
    arguments = struct_pb2.Struct()
    arguments.update({"expression": "6*7", "precision": 2})
    request = llm_pb2.StreamGenerateRequest(
        messages=[
            user("What is 6 times 7?"),
            common_pb2.Message(role=ASSISTANT, tool_calls=[
                common_pb2.ToolCall(id="call_1", name="calculator", arguments=arguments)
            ]),
            common_pb2.Message(role=TOOL, tool_call_id="call_1", name="calculator", content="42"),
        ],
        tools=[CALCULATOR],
    )
    async with openai_router(openai_fake) as stub:
        result = await stream(stub, request)

    # The fake refuses (HTTP 400) tool messages that answer no preceding tool call, so a
    # successful stream already shows the conversion is what the API accepts.
    assert result.error is None and result.text == "6 times 7 is 42."
    messages = openai_fake.bodies[0]["messages"]
    assert messages[1] == {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "calculator", "arguments": '{"expression": "6*7", "precision": 2}'}}],
    }
    assert messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "42"}


async def test_generate_equals_the_concatenated_stream(openai_fake):
    turn = {"text": "Use json.loads to parse JSON text [1].", "text_chunks": 3,
            "tool_calls": [{"id": "call_x", "name": "calculator", "arguments": {"expression": "1+1"}, "fragments": 2}],
            "usage": {"input_tokens": 30, "output_tokens": 12}}
    openai_fake.enqueue(dict(turn), dict(turn))
    fields = dict(messages=[user("How do I parse JSON?")], tools=[CALCULATOR],
                  context=[chunk(1, "json", "json.loads(s) deserializes s to a Python object.")])
    async with openai_router(openai_fake) as stub:
        streamed = await stream(stub, llm_pb2.StreamGenerateRequest(**fields))
        whole = await stub.Generate(llm_pb2.GenerateRequest(**fields), timeout=20)

    assert streamed.error is None
    assert whole.metadata == streamed.metadata
    assert whole.message.role == ASSISTANT
    assert whole.message.content == streamed.text == turn["text"]
    assert whole.finish_reason == streamed.of("finish")[0].reason == TOOL_CALLS
    assert whole.usage == streamed.of("finish")[0].usage == common_pb2.Usage(
        input_tokens=30, output_tokens=12, total_tokens=42)
    (call,) = whole.message.tool_calls
    assert (call.id, call.name) == ("call_x", "calculator")
    assert dict(call.arguments) == streamed.tool_arguments(0) == {"expression": "1+1"}
    assert openai_fake.bodies[0] == openai_fake.bodies[1]  # same upstream request both ways


async def test_500_before_first_token_falls_back_to_extractive(openai_fake, caplog):
    openai_fake.enqueue({"status": 500, "error_message": "The server had an error"})
    request = llm_pb2.StreamGenerateRequest(
        messages=[user("How do I pretty-print JSON with indentation?")],
        context=[chunk(1, "json", "Use the indent parameter of json.dumps to pretty-print JSON with indentation. "
                                  "Separators control the item separators.")],
    )
    with caplog.at_level(logging.WARNING, logger="agentmesh.llm"):
        async with openai_router(openai_fake) as stub:
            result = await stream(stub, request)

    assert result.error is None
    meta = result.metadata
    assert (meta.provider, meta.is_llm) == ("extractive", False)
    assert "openai provider failed before answering" in meta.notice and "HTTP 500" in meta.notice
    assert "not written by a language model" in meta.notice
    assert result.of("citation")[0].index == 1
    assert "indent parameter" in result.text and "[1]" in result.text
    assert result.kinds()[-1] == "finish" and result.of("finish")[0].reason == STOP
    assert any("extractive" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert len(openai_fake.requests) == 1


async def test_429_without_fallback_is_resource_exhausted_with_retry_after(openai_fake):
    openai_fake.enqueue({"status": 429, "retry_after": 7, "error_message": "Rate limit reached for requests"})
    async with openai_router(openai_fake, fallback_to_extractive=False) as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("hi")]))
    assert result.events == []
    assert result.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate-limited" in result.error.details() and "retry after 7 s" in result.error.details()


async def test_slow_first_token_falls_back_or_times_out(openai_fake):
    openai_fake.enqueue({"text": "too late", "first_token_delay_s": 3}, {"text": "too late", "first_token_delay_s": 3})
    request = llm_pb2.StreamGenerateRequest(messages=[user("hi")], context=[chunk(1, "t", "hi there.")])
    loop = asyncio.get_running_loop()
    async with openai_router(openai_fake, first_token_timeout_s=0.5) as stub:
        start = loop.time()
        fell_back = await stream(stub, request)
        assert loop.time() - start < 2.5
    async with openai_router(openai_fake, first_token_timeout_s=0.5, fallback_to_extractive=False) as stub:
        failed = await stream(stub, request)

    assert fell_back.error is None and fell_back.metadata.provider == "extractive"
    assert "no first token within 0.5 s" in fell_back.metadata.notice
    assert failed.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no first token within 0.5 s" in failed.error.details()


async def test_stream_cut_after_first_tokens_ends_with_a_status(openai_fake):
    openai_fake.enqueue({"text": "one two three four five six", "text_chunks": 6, "cut_after": 2})
    async with openai_router(openai_fake) as stub:
        call = stub.StreamGenerate(llm_pb2.StreamGenerateRequest(messages=[user("count")]), timeout=20)
        events = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for event in call:
                events.append(event)
        trailers = dict(await call.trailing_metadata())

    # No usage, no finish: a final `interrupted` event with the partial usage, then the status.
    assert [e.WhichOneof("event") for e in events] == ["metadata", "text_delta", "text_delta", "interrupted"]
    interrupted = events[-1].interrupted
    assert interrupted.sent_deltas == 2 and interrupted.usage_estimated
    assert interrupted.partial_usage.output_tokens == 2  # "one", " two" in o200k_base
    assert interrupted.partial_usage.input_tokens > 0 and interrupted.reason == raised.value.details()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stream was cut after 2 deltas" in raised.value.details()
    assert trailers["agentmesh-sent-deltas"] == "2" and trailers["agentmesh-sent-tokens"] == "2"
    assert openai_fake.requests[0]["outcome"] == "cut"


async def test_error_object_in_a_200_stream_before_any_token_falls_back(openai_fake):
    openai_fake.enqueue({"text": "never shown", "error_after": 0, "error_message": "The model is overloaded"})
    request = llm_pb2.StreamGenerateRequest(messages=[user("csv reader?")],
                                            context=[chunk(1, "csv", "csv.reader returns a reader object.")])
    async with openai_router(openai_fake) as stub:
        result = await stream(stub, request)
    assert result.error is None and result.metadata.provider == "extractive"
    assert "openai stream error: The model is overloaded" in result.metadata.notice
    assert openai_fake.requests[0]["outcome"] == "error_event"


async def test_rejected_key_is_unavailable_and_names_the_variable(openai_fake):
    openai_fake.enqueue({"text": "never sent"})
    async with router(provider="openai", openai_base_url=openai_fake.base_url, openai_api_key="sk-wrong") as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("hi")]))
    # An auth failure is a configuration error: no silent fallback hides it.
    assert result.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "AGENTMESH_LLM_OPENAI_API_KEY" in result.error.details()


@pytest.mark.parametrize(
    ("turn", "code", "fragment"),
    [
        ({"status": 400, "error_message": "maximum context length is 8192 tokens"}, grpc.StatusCode.INVALID_ARGUMENT,
         "maximum context length"),
        ({"status": 404, "error_message": "The model `gpt-nope` does not exist"}, grpc.StatusCode.NOT_FOUND,
         "'gpt-nope'"),
    ],
)
async def test_provider_refusals_map_to_statuses(openai_fake, turn, code, fragment):
    openai_fake.enqueue(turn)
    async with openai_router(openai_fake) as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(model="gpt-nope", messages=[user("hi")]))
    assert result.error.code() == code and fragment in result.error.details()


async def test_caller_deadline_bounds_the_provider_call(openai_fake, client):
    openai_fake.enqueue({"text": "late", "first_token_delay_s": 5})
    async with openai_router(openai_fake, fallback_to_extractive=False) as stub:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("hi")]), timeout=1.5)
        elapsed = loop.time() - start
    assert result.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 3
    if client == "sdk":
        # The SDK announces its request timeout; it was derived from the 1.5 s deadline, not the 300 s default.
        assert float(openai_fake.requests[0]["headers"]["x-stainless-read-timeout"]) <= 1.5
    # Either way the upstream request was abandoned when the deadline passed.
    assert await asyncio.to_thread(openai_fake.wait_for_outcome, 0, 6.0) == "client_disconnected"


async def test_total_timeout_after_the_first_delta_cuts_the_stream_with_its_usage(openai_fake):
    openai_fake.enqueue({"text": "one two three four five six", "chunk_delay_s": 0.4})
    async with openai_router(openai_fake, total_timeout_s=1.0) as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("count")]))
    kinds = result.kinds()
    assert kinds[0] == "metadata" and kinds[-1] == "interrupted" and 2 <= kinds.count("text_delta") <= 4
    assert result.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not finish within 1 s" in result.error.details()
    assert result.events[-1].interrupted.sent_deltas == kinds.count("text_delta")
    assert await asyncio.to_thread(openai_fake.wait_for_outcome, 0, 6.0) == "client_disconnected"


async def test_cancelling_the_call_closes_the_provider_stream(openai_fake):
    words = " ".join(f"w{i}" for i in range(60))
    openai_fake.enqueue({"text": words, "chunk_delay_s": 0.1})
    async with openai_router(openai_fake) as stub:
        call = stub.StreamGenerate(llm_pb2.StreamGenerateRequest(messages=[user("go")]), timeout=30)
        async for event in call:
            if event.HasField("text_delta"):
                break
        call.cancel()
        outcome = await asyncio.to_thread(openai_fake.wait_for_outcome, 0, 5.0)
    # Without cancellation the fake would keep writing for ~6 s and record "completed".
    assert outcome == "client_disconnected"


async def test_fake_script_runs_as_a_subprocess_with_the_lead_e2e_script(tmp_path):
    """`python -m tests.fakes.openai_server --port N --script f` with a calculator turn then text."""
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    from agentmesh.services.cli.processes import free_port

    script = tmp_path / "script.json"
    script.write_text(json.dumps({"turns": [
        {"tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}]},
        {"text": "6 times 7 is 42."},
    ]}))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_server", "--port", str(port), "--script", str(script)],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True,
    )
    try:
        announced = json.loads(await asyncio.to_thread(proc.stdout.readline))
        assert announced["port"] == port
        async with router(provider="openai", openai_base_url=f"http://127.0.0.1:{port}/v1") as stub:
            first = await stub.Generate(llm_pb2.GenerateRequest(messages=[user("6*7?")], tools=[CALCULATOR]), timeout=20)
            (call,) = first.message.tool_calls
            assert call.name == "calculator" and dict(call.arguments) == {"expression": "6*7"}
            assert first.finish_reason == TOOL_CALLS
            second = await stub.Generate(llm_pb2.GenerateRequest(
                messages=[user("6*7?"), first.message,
                          common_pb2.Message(role=TOOL, tool_call_id=call.id, name="calculator", content="42")],
                tools=[CALCULATOR]), timeout=20)
            assert second.message.content == "6 times 7 is 42." and second.finish_reason == STOP
        async with httpx.AsyncClient() as client:
            recorded = (await client.get(f"http://127.0.0.1:{port}/_fake/requests")).json()
        assert [r["outcome"] for r in recorded] == ["completed", "completed"]
        assert recorded[1]["body"]["messages"][-1] == {"role": "tool", "tool_call_id": call.id, "content": "42"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
