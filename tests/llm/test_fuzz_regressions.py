"""Regressions found by tests/fuzz in the router: a tool call's arguments or a tool's parameter
schema holding NaN or Infinity (valid in a protobuf Struct, impossible in JSON) used to end
CountTokens, and a cached Generate, with INTERNAL (json_format raising ValueError while counting
or building the cache key); on an LLM provider the request body could not be built either. They
must be INVALID_ARGUMENT naming the field, with nothing sent upstream."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import struct_pb2

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from tests.llm.support import ASSISTANT, TOOL, router, stream, user

pytestmark = pytest.mark.timeout(60)


def _number(value: float) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.fields["x"].number_value = value
    return s


def _tool_turn(value: float) -> list[common_pb2.Message]:
    call = common_pb2.ToolCall(id="call_1", name="calc", arguments=_number(value))
    return [user("hi"), common_pb2.Message(role=ASSISTANT, tool_calls=[call]),
            common_pb2.Message(role=TOOL, tool_call_id="call_1", content="1")]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
async def test_non_json_numbers_in_tool_calls_and_schemas_are_invalid_argument(openai_fake, redis_settings, value):
    schema_tool = common_pb2.ToolDefinition(name="calc", parameters_schema=_number(value))
    async with router(provider="openai", openai_base_url=openai_fake.base_url, openai_api_key="sk-test",
                      **redis_settings) as stub:
        for fields, where in [({"messages": _tool_turn(value)}, "messages[1].tool_calls[0].arguments"),
                              ({"messages": [user("hi")], "tools": [schema_tool]}, "tools[0].parameters_schema")]:
            streamed = await stream(stub, llm_pb2.StreamGenerateRequest(**fields))
            assert streamed.error is not None and streamed.error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert where in streamed.error.details() and "JSON" in streamed.error.details()
            cached = llm_pb2.GenerateRequest(**fields, routing=llm_pb2.RoutingOptions(cache=True))
            with pytest.raises(grpc.aio.AioRpcError) as generate:
                await stub.Generate(cached, timeout=10)
            assert generate.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as count:
                await stub.CountTokens(llm_pb2.CountTokensRequest(**fields), timeout=10)
            assert count.value.code() == grpc.StatusCode.INVALID_ARGUMENT and where in count.value.details()
    assert openai_fake.requests == []
