"""Regressions found by tests/fuzz in the tool service: arguments holding NaN or Infinity (valid
in a protobuf Struct, impossible in JSON) used to end ExecuteTool with INTERNAL (json_format
raising ValueError before the schema check); they must be INVALID_ARGUMENT, the tool not run."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import struct_pb2

from agentmesh.services.tools.service import ToolsService, ToolsSettings
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.support import running_service

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
async def test_arguments_without_a_json_form_are_invalid_argument(value):
    arguments = struct_pb2.Struct()
    arguments.fields["expression"].string_value = "1+1"
    arguments.fields["precision"].list_value.values.add().number_value = value
    async with running_service(ToolsService(ToolsSettings(python_enabled=False))) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            call = tools_pb2_grpc.ToolServiceStub(channel).ExecuteTool(
                tools_pb2.ExecuteToolRequest(name="calculator", arguments=arguments), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                events = [event async for event in call]
                raise AssertionError(f"the call ran: {events}")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "arguments cannot be written as JSON" in info.value.details()
