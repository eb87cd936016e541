"""The fakes speak the real wire formats: the official SDKs' own parsers and stream accumulators
(not the router) read them back exactly as scripted."""

from __future__ import annotations

import anthropic
import httpx
import openai

from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.openai_server import FakeOpenAIServer

CALL = {"id": "call_1", "name": "calculator", "arguments": {"expression": "6*7"}, "fragments": 4}
TOOLS = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "what is 6*7?"}]


async def test_openai_sdk_accumulates_the_fake_stream_and_parses_the_json_answer():
    with FakeOpenAIServer([{"text": "Calling the tool.", "text_chunks": 2, "tool_calls": [CALL]}] * 2) as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="k", max_retries=0)
        async with client.chat.completions.stream(model="m", messages=MESSAGES, tools=TOOLS,
                                                  stream_options={"include_usage": True}) as events:
            streamed = await events.get_final_completion()
        whole = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        await client.close()
    for completion in (streamed, whole):
        choice = completion.choices[0]
        assert choice.message.content == "Calling the tool."
        (call,) = choice.message.tool_calls
        assert (call.id, call.function.name, call.function.arguments) == ("call_1", "calculator", '{"expression": "6*7"}')
        assert choice.finish_reason == "tool_calls"
    assert streamed.usage.completion_tokens == 1 + 1 + 4 + 1  # 2 text pieces, opening + 4 fragments


async def test_openai_sdk_retries_a_429_after_retry_after():
    with FakeOpenAIServer([{"status": 429, "retry_after": 0}, {"text": "ok"}]) as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="k", max_retries=1)
        answer = await client.chat.completions.create(model="m", messages=MESSAGES)
        await client.close()
    assert answer.choices[0].message.content == "ok"
    assert [r["outcome"] for r in fake.requests] == ["failed", "completed"]


async def test_anthropic_sdk_accumulates_the_fake_stream_and_parses_the_json_answer():
    turn = {"text": "Calling the tool.", "tool_calls": [{**CALL, "id": "toolu_1"}],
            "usage": {"input_tokens": 12, "output_tokens": 9}}
    with FakeAnthropicServer([turn, turn]) as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="k", max_retries=0)
        async with client.messages.stream(model="m", max_tokens=64, messages=MESSAGES) as events:
            streamed = await events.get_final_message()
        whole = await client.messages.create(model="m", max_tokens=64, messages=MESSAGES)
        await client.close()
    for message in (streamed, whole):
        text, tool = message.content
        assert text.text == "Calling the tool."
        assert (tool.id, tool.name, tool.input) == ("toolu_1", "calculator", {"expression": "6*7"})
        assert message.stop_reason == "tool_use"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 9)


async def test_fake_control_endpoints():
    with FakeAnthropicServer() as fake:
        async with httpx.AsyncClient(base_url=fake.url) as http:
            added = await http.post("/_fake/turns", json={"turns": [{"text": "queued over HTTP"}]})
            assert added.json() == {"pending_turns": 1}
            refused = await http.post("/v1/messages", headers={"anthropic-version": "2023-06-01"},
                                      json={"model": "m", "max_tokens": 5,
                                            "messages": [{"role": "system", "content": "no"}]})
            assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
            recorded = (await http.get("/_fake/requests")).json()
    assert fake.pending_turns == 1  # a refused request consumes no turn
    assert recorded[0]["body"]["messages"][0]["role"] == "system" and recorded[0]["outcome"] == "failed"


async def test_the_fast_benchmark_fake_speaks_the_same_wire_format():
    from tests.fakes.streaming_server import FastOpenAIServer

    fake = await FastOpenAIServer(tokens=7).start()
    try:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="k", max_retries=0)
        async with client.chat.completions.stream(model="m", messages=MESSAGES,
                                                  stream_options={"include_usage": True}) as events:
            completion = await events.get_final_completion()
        await client.close()
        async with httpx.AsyncClient() as http:
            missing = await http.post(f"http://127.0.0.1:{fake.port}/v1/embeddings", json={})
    finally:
        await fake.stop()
    assert completion.choices[0].message.content == "w0 w1 w2 w3 w4 w5 w6"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 7)  # "what is 6*7?"
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
