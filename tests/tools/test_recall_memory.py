"""recall_memory against the real memory service (on a real redis-server), through the real tool
service, with the tenant carried across both hops."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.cli.processes import free_port, start_redis
from agentmesh.services.memory.service import MemoryService, MemorySettings
from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.settings import MeshSettings
from agentmesh.services.tools.builtin import RecallMemory
from agentmesh.services.tools.service import ToolsService, ToolsSettings
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.support import running_service

HISTORY = [
    (common_pb2.ROLE_USER, "Please ship my order to 12 Harbour Street, Lisbon."),
    (common_pb2.ROLE_ASSISTANT, "Noted: the order ships to Harbour Street in Lisbon."),
    (common_pb2.ROLE_USER, "Also, I am allergic to peanuts."),
    (common_pb2.ROLE_ASSISTANT, "Understood, no peanuts."),
]


def md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-tenant-id", tenant),)


@pytest.fixture(scope="module")
async def memory_address(tmp_path_factory) -> AsyncIterator[str]:
    root = tmp_path_factory.mktemp("recall-redis")
    port = free_port()
    redis = start_redis(port, root / "data", root / "logs", appendonly=False)
    try:
        # facts_enabled is ignored by memory services without long-term facts.
        settings = MemorySettings(redis_url=f"redis://127.0.0.1:{port}/0", facts_enabled=False)
        async with running_service(MemoryService(settings)) as address:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = memory_pb2_grpc.MemoryServiceStub(channel)
                messages = [common_pb2.Message(role=role, content=text) for role, text in HISTORY]
                await stub.AppendMessages(
                    memory_pb2.AppendMessagesRequest(session_id="s1", messages=messages), metadata=md("acme"), timeout=10
                )
                other = [common_pb2.Message(role=common_pb2.ROLE_USER, content="My address is 5 Elm Road, Leeds.")]
                await stub.AppendMessages(
                    memory_pb2.AppendMessagesRequest(session_id="s1", messages=other), metadata=md("globex"), timeout=10
                )
                ada = [common_pb2.Message(role=common_pb2.ROLE_USER, content="Ship my order to 3 Quay Lane, Porto.")]
                await stub.AppendMessages(
                    memory_pb2.AppendMessagesRequest(session_id="s1", user_id="ada", messages=ada),
                    metadata=md("acme"), timeout=10,
                )
            yield address
    finally:
        redis.stop()


@pytest.fixture(scope="module")
async def tools(memory_address) -> AsyncIterator[tools_pb2_grpc.ToolServiceStub]:
    service = ToolsService(ToolsSettings(python_enabled=False), mesh=MeshSettings(memory_address=memory_address))
    async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
        yield tools_pb2_grpc.ToolServiceStub(channel)


async def recall(stub, tenant: str, session_id: str, user_id: str = "", **arguments) -> tools_pb2.ToolResult:
    args = struct_pb2.Struct()
    args.update(arguments)
    request = tools_pb2.ExecuteToolRequest(
        name="recall_memory", arguments=args, session_id=session_id, user_id=user_id
    )
    items = [i async for i in stub.ExecuteTool(request, metadata=md(tenant), timeout=10)]
    return items[-1].result


async def test_matching_messages_of_the_session_best_first(tools):
    result = await recall(tools, "acme", "s1", query="where does the order ship? address street")
    assert not result.is_error, result.error_message
    output = json_format.MessageToDict(result.output)
    assert output["source"] == "session_history" and output["session_id"] == "s1"
    contents = [m["content"] for m in output["messages"]]
    # Query words (stop words left out): order, ship, address, street. The first message has
    # three of them, the second two ('ships' is not 'ship'), the others none.
    assert contents == [HISTORY[0][1], HISTORY[1][1]]
    assert [m["role"] for m in output["messages"]] == ["user", "assistant"]
    assert [m["score"] for m in output["messages"]] == [0.75, 0.5]


async def test_top_k_and_no_match(tools):
    output = json_format.MessageToDict((await recall(tools, "acme", "s1", query="peanuts")).output)
    assert [m["content"] for m in output["messages"]] == [HISTORY[3][1], HISTORY[2][1]]  # a tie: most recent first
    output = json_format.MessageToDict((await recall(tools, "acme", "s1", query="allergic peanuts", top_k=1)).output)
    assert [m["content"] for m in output["messages"]] == [HISTORY[2][1]]
    output = json_format.MessageToDict((await recall(tools, "acme", "s1", query="quantum chromodynamics")).output)
    assert output["messages"] == []


async def test_the_tenant_is_propagated_to_memory(tools):
    output = json_format.MessageToDict((await recall(tools, "globex", "s1", query="address")).output)
    assert [m["content"] for m in output["messages"]] == ["My address is 5 Elm Road, Leeds."]


async def test_the_user_of_the_call_picks_the_session(tools):
    """The same session id of another user (ExecuteToolRequest.user_id) is another session."""
    output = json_format.MessageToDict((await recall(tools, "acme", "s1", user_id="ada", query="ship order")).output)
    assert [m["content"] for m in output["messages"]] == ["Ship my order to 3 Quay Lane, Porto."]


async def test_a_call_without_a_session_is_an_error_result(tools):
    result = await recall(tools, "acme", "", query="address")
    assert result.is_error and "belongs to no session" in result.error_message


async def test_an_unreachable_memory_service_is_unavailable():
    downstream = Downstream(MeshSettings(memory_address=f"127.0.0.1:{free_port()}"))
    service = ToolsService(ToolsSettings(), tools=[RecallMemory(downstream, timeout_s=2)])
    try:
        async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await recall(tools_pb2_grpc.ToolServiceStub(channel), "acme", "s1", query="address")
    finally:
        await downstream.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details().startswith("memory service:")
