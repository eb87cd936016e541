"""Provider adapters: the SSE parser, and streamed tool calls normalized both ways — an OpenAI
tool call sent back to Anthropic and an Anthropic tool call sent back to OpenAI, through the
router, each fake refusing (HTTP 400) what its real API would refuse."""

from __future__ import annotations

import json

import pytest

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm.providers.base import SSEParser
from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.openai_server import FakeOpenAIServer
from tests.llm.support import CALCULATOR, TOOL, anthropic_deployment, catalogue_router, openai_deployment, user

TOOL_CALLS = common_pb2.FINISH_REASON_TOOL_CALLS


def test_sse_parser_handles_split_reads_crlf_multiline_data_and_comments():
    parser = SSEParser()
    wire = (b": keep-alive comment\r\n"
            b"event: message_start\r\ndata: {\"a\":\r\n"
            b"data: 1}\r\n\r\n"
            b"data:no-space\n\n"
            b"id: 7\nretry: 100\n\n"  # no data: not dispatched
            b"data: last\r\r"  # CR-only line ends
            b"data: next\n\n")
    events = []
    for i in range(len(wire)):  # one byte per read: every split point, including inside CRLF
        events += parser.feed(wire[i:i + 1])
    assert events == [("message_start", '{"a":\n1}'), ("", "no-space"), ("", "last"), ("", "next")]
    assert parser.feed(b"data: x\n") == [] and parser.feed(b"\n") == [("", "x")]


@pytest.fixture(params=["lean", "httpx", "sdk"])
def client(request, monkeypatch):
    monkeypatch.setenv("AGENTMESH_LLM_CLIENT", request.param)
    return request.param


async def _events(stub, request):
    return [e async for e in stub.StreamGenerate(request, timeout=20)]


async def test_openai_tool_call_round_trips_into_anthropic(tmp_path, client):
    with FakeOpenAIServer(api_key="sk-test") as oai, FakeAnthropicServer(api_key="sk-ant-test") as ant:
        oai.enqueue({"text": "I will use the calculator.", "text_chunks": 2, "tool_calls": [
            {"id": "call_a", "name": "calculator", "arguments": {"expression": "6*7"}, "fragments": 4},
            {"id": "call_b", "name": "calculator", "arguments": {"expression": "2+3"}, "fragments": 2}]})
        ant.enqueue({"text": "6*7 is 42 and 2+3 is 5."})
        catalogue = {"models": {"gpt": {"deployments": [openai_deployment("gpt", oai)]},
                                "claude": {"deployments": [anthropic_deployment("claude", ant)]}}}
        async with catalogue_router(tmp_path / "c.yaml", catalogue) as stub:
            first = await stub.Generate(llm_pb2.GenerateRequest(
                model="gpt", messages=[user("Compute 6*7 and 2+3.")], tools=[CALCULATOR]), timeout=20)
            results = [common_pb2.Message(role=TOOL, tool_call_id=c.id, name=c.name, content=answer)
                       for c, answer in zip(first.message.tool_calls, ("42", "5"), strict=True)]
            second = await stub.Generate(llm_pb2.GenerateRequest(
                model="claude", messages=[user("Compute 6*7 and 2+3."), first.message, *results], tools=[CALCULATOR]),
                timeout=20)
    assert first.finish_reason == TOOL_CALLS and first.message.content == "I will use the calculator."
    assert [(c.id, c.name, dict(c.arguments)) for c in first.message.tool_calls] == [
        ("call_a", "calculator", {"expression": "6*7"}), ("call_b", "calculator", {"expression": "2+3"})]
    assert second.message.content == "6*7 is 42 and 2+3 is 5."
    # The Anthropic fake answers 400 unless tool_use blocks are answered by tool_result blocks.
    assert ant.bodies[0]["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "text", "text": "I will use the calculator."},
            {"type": "tool_use", "id": "call_a", "name": "calculator", "input": {"expression": "6*7"}},
            {"type": "tool_use", "id": "call_b", "name": "calculator", "input": {"expression": "2+3"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": "42"},
            {"type": "tool_result", "tool_use_id": "call_b", "content": "5"}]},
    ]


async def test_anthropic_tool_use_streams_as_the_same_deltas_and_round_trips_into_openai(tmp_path, client):
    with FakeOpenAIServer(api_key="sk-test") as oai, FakeAnthropicServer(api_key="sk-ant-test") as ant:
        turn = {"text": "Checking.", "text_chunks": 1, "tool_calls": [
            {"id": "toolu_1", "name": "calculator", "arguments": {"expression": "6*7", "precision": 2}, "fragments": 5},
            {"id": "toolu_2", "name": "calculator", "arguments": {}, "fragments": 1}]}
        ant.enqueue(turn)
        oai.enqueue({"text": "Done: 42."})
        catalogue = {"models": {"gpt": {"deployments": [openai_deployment("gpt", oai)]},
                                "claude": {"deployments": [anthropic_deployment("claude", ant)]}}}
        async with catalogue_router(tmp_path / "c.yaml", catalogue) as stub:
            events = await _events(stub, llm_pb2.StreamGenerateRequest(
                model="claude", messages=[user("6*7?")], tools=[CALCULATOR]))
            kinds = [e.WhichOneof("event") for e in events]
            deltas = [e.tool_call_delta for e in events if e.HasField("tool_call_delta")]
            calls: dict[int, dict] = {}
            for d in deltas:
                call = calls.setdefault(d.index, {"id": d.id, "name": d.name, "args": ""})
                call["args"] += d.arguments_delta
            assistant = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="Checking.")
            for index in sorted(calls):
                call = assistant.tool_calls.add(id=calls[index]["id"], name=calls[index]["name"])
                call.arguments.update(json.loads(calls[index]["args"]))
            results = [common_pb2.Message(role=TOOL, tool_call_id=c.id, content="42") for c in assistant.tool_calls]
            answer = await stub.Generate(llm_pb2.GenerateRequest(
                model="gpt", messages=[user("6*7?"), assistant, *results], tools=[CALCULATOR]), timeout=20)
    # Text first, then each call: an opening delta with id + name, then its argument fragments.
    assert kinds == ["metadata", "text_delta"] + ["tool_call_delta"] * (1 + 5 + 1 + 1) + ["usage", "finish"]
    assert [(d.index, d.id, d.name) for d in deltas if d.id] == [(0, "toolu_1", "calculator"), (1, "toolu_2", "calculator")]
    assert json.loads(calls[0]["args"]) == {"expression": "6*7", "precision": 2}
    assert calls[1]["args"] == "{}"  # a call whose input streamed nothing still gets a JSON object
    assert events[-1].finish.reason == TOOL_CALLS
    assert answer.message.content == "Done: 42."
    sent = oai.bodies[0]["messages"]
    assert sent[1]["tool_calls"] == [
        {"id": "toolu_1", "type": "function",
         "function": {"name": "calculator", "arguments": '{"expression": "6*7", "precision": 2}'}},
        {"id": "toolu_2", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]
    assert sent[2:] == [{"role": "tool", "tool_call_id": "toolu_1", "content": "42"},
                        {"role": "tool", "tool_call_id": "toolu_2", "content": "42"}]


def test_merge_deltas_joins_runs_and_keeps_the_text():
    from agentmesh.services.llm.pipeline import merge_deltas
    from agentmesh.services.llm.providers.base import text_event, tool_event

    events = [text_event("a"), text_event("b"), tool_event(0, id="c1", name="calc"), tool_event(0, arguments='{"x"'),
              tool_event(0, arguments=": 1}"), tool_event(1, id="c2", name="calc"), tool_event(1, arguments="{}"),
              text_event("c"), llm_pb2.StreamGenerateResponse(usage=common_pb2.Usage(input_tokens=1))]
    merged = merge_deltas(events)
    assert [e.WhichOneof("event") for e in merged] == ["text_delta", "tool_call_delta", "tool_call_delta",
                                                       "text_delta", "usage"]
    assert merged[0].text_delta.text == "ab"
    # Argument fragments join their call's opening delta (id and name stay on it).
    first, second = merged[1].tool_call_delta, merged[2].tool_call_delta
    assert (first.index, first.id, first.name, first.arguments_delta) == (0, "c1", "calc", '{"x": 1}')
    assert (second.index, second.id, second.arguments_delta) == (1, "c2", "{}")
    assert merged[3].text_delta.text == "c"


async def test_deltas_are_merged_only_when_more_than_the_backlog_wait_at_once():
    from tests.fakes.streaming_server import FastOpenAIServer
    from tests.llm.support import router

    # Both fakes write the whole answer at once: its deltas reach the router together.
    long, short = await FastOpenAIServer(tokens=300).start(), await FastOpenAIServer(tokens=20).start()
    request = llm_pb2.StreamGenerateRequest(messages=[user("go")])
    deltas: dict[tuple[int, int], int] = {}
    try:
        for backlog in (0, 8, 32):
            for fake in (long, short):
                async with router(provider="openai", openai_base_url=fake.base_url, coalesce_backlog=backlog) as stub:
                    events = await _events(stub, request)
                text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
                assert text == " ".join(f"w{i}" for i in range(fake.tokens))  # merged or not, the same text
                assert events[-1].finish.usage.output_tokens == fake.tokens
                deltas[backlog, fake.tokens] = sum(e.HasField("text_delta") for e in events)
    finally:
        await long.stop()
        await short.stop()
    assert deltas[0, 300] == 300 and deltas[0, 20] == 20  # 0: never merged
    assert deltas[32, 20] == 20  # an answer of at most `backlog` deltas is never merged, however fast it came
    assert deltas[32, 300] < 300 and deltas[8, 20] < 20  # more than `backlog` waiting: merged
