"""Regressions found by tests/fuzz in the memory service: an assistant message whose tool call
arguments hold NaN or Infinity (valid in a protobuf Struct, impossible in JSON) used to end
AppendMessages with INTERNAL (the token count writes the arguments as JSON); it must be
INVALID_ARGUMENT naming the field, with nothing written."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import struct_pb2

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
async def test_tool_call_arguments_without_a_json_form_are_invalid_argument(memory, value):
    arguments = struct_pb2.Struct()
    arguments.fields["x"].number_value = value
    session = f"fuzz-regression-{'nan' if math.isnan(value) else 'inf'}"
    call = common_pb2.ToolCall(id="call_1", name="calc", arguments=arguments)
    messages = [common_pb2.Message(role=common_pb2.ROLE_USER, content="hi"),
                common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, tool_calls=[call])]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.AppendMessages(memory_pb2.AppendMessagesRequest(session_id=session, messages=messages), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[1].tool_calls[0].arguments" in info.value.details()
    stored = await memory.GetSession(memory_pb2.GetSessionRequest(session_id=session), timeout=10)
    assert not stored.exists
