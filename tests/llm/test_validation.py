"""Request validation (INVALID_ARGUMENT, nothing sent upstream) and settings resolution."""

from __future__ import annotations

import grpc
import pytest
from pydantic import ValidationError

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm.service import LLMService, LLMSettings, create
from tests.llm.support import ASSISTANT, TOOL, router, stream, user

BAD_REQUESTS = {
    "no messages": (llm_pb2.StreamGenerateRequest(), "messages is empty"),
    "role unset": (
        llm_pb2.StreamGenerateRequest(messages=[common_pb2.Message(content="hi")]),
        "messages[0].role is ROLE_UNSPECIFIED",
    ),
    "bad tool name": (
        llm_pb2.StreamGenerateRequest(messages=[user("hi")], tools=[common_pb2.ToolDefinition(name="my tool!")]),
        "tools[0].name 'my tool!' must match",
    ),
    "tool name too long": (
        llm_pb2.StreamGenerateRequest(messages=[user("hi")], tools=[common_pb2.ToolDefinition(name="x" * 65)]),
        "tools[0].name",
    ),
    "duplicate tool": (
        llm_pb2.StreamGenerateRequest(
            messages=[user("hi")],
            tools=[common_pb2.ToolDefinition(name="calc"), common_pb2.ToolDefinition(name="calc")],
        ),
        "listed twice",
    ),
    "max_tokens over limit": (
        llm_pb2.StreamGenerateRequest(messages=[user("hi")], options=llm_pb2.GenerationOptions(max_tokens=5000)),
        "exceeds this router's limit of 4096",
    ),
    "temperature out of range": (
        llm_pb2.StreamGenerateRequest(messages=[user("hi")], options=llm_pb2.GenerationOptions(temperature=2.5)),
        "temperature 2.5 must be between 0 and 2",
    ),
    "tool result without id": (
        llm_pb2.StreamGenerateRequest(messages=[user("hi"), common_pb2.Message(role=TOOL, content="42")]),
        "tool_call_id is empty",
    ),
    "tool result answering nothing": (
        llm_pb2.StreamGenerateRequest(
            messages=[user("hi"), common_pb2.Message(role=TOOL, tool_call_id="call_9", content="42")]
        ),
        "answers no tool call",
    ),
    "assistant tool call without id": (
        llm_pb2.StreamGenerateRequest(
            messages=[user("hi"), common_pb2.Message(role=ASSISTANT, tool_calls=[common_pb2.ToolCall(name="calc")])]
        ),
        "tool_calls[0].id is empty",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_invalid_requests_are_invalid_argument_and_reach_no_provider(openai_fake, case):
    request, message = BAD_REQUESTS[case]
    async with router(provider="openai", openai_base_url=openai_fake.base_url, openai_api_key="sk-test",
                      max_tokens_limit=4096) as stub:
        result = await stream(stub, request)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Generate(llm_pb2.GenerateRequest.FromString(request.SerializeToString()), timeout=10)
    assert result.events == []
    assert result.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in result.error.details()
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert openai_fake.requests == []


def test_auto_provider_follows_the_configured_credentials(monkeypatch):
    assert LLMSettings().resolved_provider() == "extractive"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    assert LLMSettings().resolved_provider() == "anthropic"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:11434/v1")  # e.g. Ollama, no key
    settings = LLMSettings()
    assert settings.resolved_provider() == "openai" and settings.openai_base_url == "http://localhost:11434/v1"
    monkeypatch.setenv("AGENTMESH_LLM_PROVIDER", "anthropic")
    assert LLMSettings().resolved_provider() == "anthropic"


def test_prefixed_variables_win_over_sdk_variables(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-sdk")
    monkeypatch.setenv("AGENTMESH_LLM_OPENAI_API_KEY", "sk-mesh")
    assert LLMSettings().openai_api_key.get_secret_value() == "sk-mesh"
    assert "sk-mesh" not in repr(LLMSettings())  # keys are secrets, never printed


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"AGENTMESH_LLM_PROVIDER": "openai"}, "AGENTMESH_LLM_OPENAI_API_KEY"),
        ({"AGENTMESH_LLM_PROVIDER": "anthropic"}, "AGENTMESH_LLM_ANTHROPIC_API_KEY"),
        ({"AGENTMESH_LLM_DEFAULT_MAX_TOKENS": "9000", "AGENTMESH_LLM_MAX_TOKENS_LIMIT": "4096"}, "exceeds"),
        ({"AGENTMESH_LLM_PROVIDER": "gemini"}, "provider"),
    ],
)
def test_bad_configuration_fails_at_start(monkeypatch, env, fragment):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=fragment):
        create()


async def test_readiness_needs_the_provider_constructed():
    service = LLMService(LLMSettings(provider="anthropic", anthropic_api_key="sk-ant", anthropic_base_url="http://127.0.0.1:9"))
    assert (await service.ready())[0] is False
    await service.start()  # builds the SDK client; no request is sent to the (absent) server
    ready, reason = await service.ready()
    assert ready and "anthropic" in reason and "claude-haiku-4-5" in reason
    await service.stop()
