"""The OpenAI provider path end to end: the real router's official `openai` client streams from a
local fake speaking OpenAI chat-completions SSE. The model asks for a tool call (streamed in
fragments), the mesh executes it in the tool service, feeds the result back, and the final answer
streams through Envoy with the usage of both model calls."""

from __future__ import annotations

import json

import grpc
import pytest

from agentmesh.agent.v1 import agent_pb2
from tests.e2e.mesh import Stubs, local_mesh, run_events
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TURNS = [
    {
        "tool_calls": [{"id": "call_calc_1", "name": "calculator", "arguments": {"expression": "6*7"}, "fragments": 4}],
        "usage": {"input_tokens": 120, "output_tokens": 18},
    },
    {"text": "Six times seven is 42.", "text_chunks": 5, "usage": {"input_tokens": 160, "output_tokens": 7}},
]


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAIServer(TURNS, api_key="sk-e2e") as server:
        yield server


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, fake):
    env = {
        "AGENTMESH_LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-e2e",
        "AGENTMESH_LLM_MODEL": "gpt-4o-mini",
        "AGENTMESH_LLM_FALLBACK_TO_EXTRACTIVE": "false",  # a fallback would hide a broken path
    }
    with local_mesh(tmp_path_factory.mktemp("mesh-openai"), env) as m:
        yield m


async def test_streamed_tool_call_is_executed_and_answer_streams_through_envoy(mesh, fake):
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        events = await run_events(
            Stubs(channel),
            agent_pb2.RunRequest(session_id="calc", input="What is 6 times 7?", tools=["calculator"]),
        )
    kinds = [e.WhichOneof("event") for e in events]
    steps = [e.step_started for e in events if e.WhichOneof("event") == "step_started"]
    assert [s.step for s in steps] == [1, 2]
    assert all(s.provider == "openai" and s.is_llm and s.model == "gpt-4o-mini" for s in steps)

    call = next(e.tool_call.tool_call for e in events if e.WhichOneof("event") == "tool_call")
    assert call.id == "call_calc_1" and call.name == "calculator"
    assert dict(call.arguments) == {"expression": "6*7"}, "argument fragments are reassembled"
    result = next(e.tool_result for e in events if e.WhichOneof("event") == "tool_result")
    assert result.tool_call_id == "call_calc_1" and not result.is_error
    assert result.output.struct_value["result"] == 42

    deltas = [e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta"]
    assert len(deltas) == 5 and kinds.index("tool_result") < kinds.index("text_delta")
    final = events[-1].final
    assert final.status == agent_pb2.RUN_STATUS_COMPLETED and final.steps == 2
    assert final.output == "Six times seven is 42."
    assert (final.usage.input_tokens, final.usage.output_tokens) == (280, 25)

    # What the provider received: the tool offered, then the tool result fed back for the answer.
    first, second = fake.bodies[-2:]
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator"]
    tool_message = second["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "call_calc_1"
    assert json.loads(tool_message["content"])["result"] == 42
    assistant = second["messages"][-2]
    assert assistant["tool_calls"][0]["function"]["name"] == "calculator"
