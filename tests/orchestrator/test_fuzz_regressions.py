"""Regressions found by tests/fuzz in the orchestrator.

A RunRequest whose fields pass the service's own checks but not the agent model they are turned
into (a tool name outside ^[a-zA-Z0-9_-]{1,64}$, a `transfer_to_` tool, a model name over 256
characters, max_tokens over 1,000,000) used to end the Run with INTERNAL (a pydantic
ValidationError escaping ``_resolve``); it must be INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import grpc
import pytest

from agentmesh.agent.v1 import agent_pb2
from tests.orchestrator.conftest import collect, tenant_md

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tools": ["calculator", "ü,L"]}, "tools[1]: String should match pattern"),
        ({"tools": [""]}, "tools[0]: String should match pattern"),
        ({"tools": ["transfer_to_writer"]}, "reserved for handoffs"),
        ({"model": "m" * 300}, "model: String should have at most 256 characters"),
        ({"max_tokens": 2**32 - 1}, "max_tokens: Input should be less than or equal to 1000000"),
    ],
    ids=["bad-tool-name", "empty-tool-name", "handoff-tool", "long-model", "huge-max-tokens"],
)
async def test_a_request_the_agent_model_refuses_is_invalid_argument(agent_stub, fields, expected):
    request = agent_pb2.RunRequest(session_id="fuzz-regression", input="hi", **fields)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(agent_stub.Run(request, metadata=tenant_md(), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert expected in info.value.details()
