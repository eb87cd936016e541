"""ToolService through gRPC: ListTools, ExecuteTool streaming, statuses and limits."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import jsonschema
import pytest
from google.protobuf import json_format, struct_pb2

from agentmesh.services.cli.processes import free_port
from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.settings import MeshSettings
from agentmesh.services.tools.builtin import Calculator, RecallMemory, SearchDocuments
from agentmesh.services.tools.http_fetch import HttpFetch
from agentmesh.services.tools.registry import Tool, ToolError, ToolLimits, ToolOutput, ToolRegistry
from agentmesh.services.tools.sandbox import PythonTool
from agentmesh.services.tools.service import ToolsService, ToolsSettings
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.support import running_service


class Steps(Tool):
    """Reports ``steps`` progress events, then returns their count."""

    name = "steps"
    description = "Counts up, reporting progress."
    parameters_schema = {
        "type": "object",
        "properties": {"steps": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["steps"],
        "additionalProperties": False,
    }

    async def run(self, arguments, progress):
        steps = int(arguments["steps"])
        for i in range(steps):
            await progress(f"step {i + 1} of {steps}", (i + 1) / steps)
        return ToolOutput(output={"counted": steps})


class Sleeper(Tool):
    """Reports that it started, then sleeps; records whether it was cancelled."""

    name = "sleeper"
    description = "Sleeps."
    parameters_schema = {"type": "object", "properties": {"seconds": {"type": "number"}}, "required": ["seconds"]}

    def __init__(self):
        self.cancelled = asyncio.Event()

    async def run(self, arguments, progress):
        await progress("sleeping", None)
        try:
            await asyncio.sleep(arguments["seconds"])
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return ToolOutput(output="woke up")


class Orders(Tool):
    """A nested schema, to check the error location in messages."""

    name = "orders"
    description = "Takes a list of order lines."
    parameters_schema = {
        "type": "object",
        "properties": {
            "lines": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                    "required": ["sku", "qty"],
                },
            }
        },
        "required": ["lines"],
    }

    async def run(self, arguments, progress):
        return ToolOutput(output={"lines": len(arguments["lines"])})


class NotJson(Tool):
    name = "not_json"
    description = "Returns something that is not JSON (a tool bug)."
    parameters_schema = {"type": "object"}

    async def run(self, arguments, progress):
        return ToolOutput(output={"when": object()})


class Typed(Tool):
    """Declares an output schema; returns whatever it is asked to (to break it on purpose)."""

    name = "typed"
    description = "Echoes `value` as its output."
    parameters_schema = {"type": "object", "properties": {"value": {}}, "required": ["value"]}
    output_schema = {
        "type": "object",
        "properties": {"total": {"type": "number"}},
        "required": ["total"],
        "additionalProperties": False,
    }

    async def run(self, arguments, progress):
        return ToolOutput(output=arguments["value"])


class Failing(Tool):
    """Fails with an output, like a program that exits non-zero with a traceback."""

    name = "failing"
    description = "Fails."
    parameters_schema = {"type": "object"}
    output_schema = {"type": "object", "required": ["never"]}  # not applied to error results

    async def run(self, arguments, progress):
        raise ToolError("the program exited with status 1", {"stderr": "Traceback ..."})


class Solo(Sleeper):
    """A sleeper that allows one call at a time."""

    name = "solo"
    max_concurrent_calls = 1


def struct(**kw: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(kw)
    return s


async def execute(stub, name: str, timeout: float = 10, **arguments) -> list[tools_pb2.ExecuteToolResponse]:
    call = stub.ExecuteTool(
        tools_pb2.ExecuteToolRequest(name=name, arguments=struct(**arguments), tool_call_id="call_1"), timeout=timeout
    )
    return [item async for item in call]


@pytest.fixture(scope="module")
def sleeper() -> Sleeper:
    return Sleeper()


@pytest.fixture(scope="module")
async def tools_stub(sleeper):
    # The retrieval address points at a port nobody listens on: search_documents must fail cleanly.
    downstream = Downstream(MeshSettings(retrieval_address=f"127.0.0.1:{free_port()}"))
    tools = [
        Calculator(), SearchDocuments(downstream, timeout_s=3), Steps(), sleeper, Orders(), NotJson(), Typed(),
        Failing(), Solo(),
    ]
    settings = ToolsSettings(max_runtime_s=0.5, max_concurrent_calls=2, tool_limits={"solo": {"max_runtime_s": 5}})
    try:
        async with running_service(ToolsService(settings, tools=tools)) as address:
            async with grpc.aio.insecure_channel(address) as channel:
                yield tools_pb2_grpc.ToolServiceStub(channel)
    finally:
        await downstream.close()


async def test_default_service_lists_the_builtin_tools_with_their_schemas():
    # A uid range of its own: a mesh running on this machine uses the default one.
    service = ToolsService(ToolsSettings(python_uid_base=750_000))
    async with running_service(service) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await tools_pb2_grpc.ToolServiceStub(channel).ListTools(tools_pb2.ListToolsRequest(), timeout=5)
    assert [t.name for t in reply.tools] == ["calculator", "search_documents", "recall_memory", "python"]
    assert [d.name for d in reply.details] == [t.name for t in reply.tools]
    for definition, details, tool in zip(
        reply.tools, reply.details, (Calculator, SearchDocuments, RecallMemory, PythonTool), strict=True
    ):
        schema = json_format.MessageToDict(definition.parameters_schema)
        assert schema == tool.parameters_schema  # Struct numbers are doubles: 1000.0 == 1000
        jsonschema.Draft202012Validator.check_schema(schema)
        output_schema = json_format.MessageToDict(details.output_schema)
        assert output_schema == tool.output_schema
        jsonschema.Draft202012Validator.check_schema(output_schema)
        assert details.origin == "builtin"
    python = reply.details[3]
    assert python.max_concurrent_calls == 4 and python.max_runtime_ms == 35_000  # wall limit + 5 s
    assert reply.tools[3].description.startswith("Run a Python 3.")


async def test_http_fetch_is_offered_only_with_an_allowlist():
    settings = ToolsSettings(python_enabled=False, http_allowed_hosts="docs.python.org, *.example.com")
    assert settings.http_allowed_hosts == ["docs.python.org", "*.example.com"]
    async with running_service(ToolsService(settings)) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await tools_pb2_grpc.ToolServiceStub(channel).ListTools(tools_pb2.ListToolsRequest(), timeout=5)
    assert [t.name for t in reply.tools] == ["calculator", "search_documents", "recall_memory", "http_fetch"]
    assert "docs.python.org, *.example.com" in reply.tools[-1].description
    assert json_format.MessageToDict(reply.details[-1].output_schema) == HttpFetch.output_schema


async def test_progress_events_then_exactly_one_result(tools_stub):
    items = await execute(tools_stub, "steps", steps=3)
    kinds = [item.WhichOneof("event") for item in items]
    assert kinds == ["progress", "progress", "progress", "result"]
    assert [i.progress.message for i in items[:3]] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
    assert [round(i.progress.fraction, 3) for i in items[:3]] == [0.333, 0.667, 1.0]
    result = items[-1].result
    assert not result.is_error
    assert json_format.MessageToDict(result.output) == {"counted": 3}


async def test_progress_without_fraction_leaves_it_unset(tools_stub):
    items = await execute(tools_stub, "sleeper", seconds=0.01)
    assert items[0].progress.message == "sleeping"
    assert not items[0].progress.HasField("fraction")
    assert json_format.MessageToDict(items[-1].result.output) == "woke up"


async def test_calculator_through_the_service(tools_stub):
    items = await execute(tools_stub, "calculator", expression="(2 + 3) * 2 ** 10")
    assert [i.WhichOneof("event") for i in items] == ["result"]
    result = items[0].result
    assert not result.is_error
    output = json_format.MessageToDict(result.output)
    assert output == {"expression": "(2 + 3) * 2 ** 10", "result": 5120, "text": "5120"}


async def test_big_integers_keep_their_exact_text(tools_stub):
    result = (await execute(tools_stub, "calculator", expression="2 ** 100"))[-1].result
    output = json_format.MessageToDict(result.output)
    assert output["text"] == str(2**100)
    assert output["result"] == float(2**100)
    result = (await execute(tools_stub, "calculator", expression="2 ** 2000"))[-1].result
    output = json_format.MessageToDict(result.output)
    assert output["result"] is None and output["text"] == str(2**2000)


@pytest.mark.parametrize(
    ("expression", "message"),
    [("1 / 0", "division by zero"), ("__import__('os')", "unknown function '__import__'"), ("9**9**9", "refused")],
)
async def test_calculator_failures_are_error_results_not_statuses(tools_stub, expression, message):
    items = await execute(tools_stub, "calculator", expression=expression)
    result = items[-1].result
    assert result.is_error
    assert message in result.error_message
    assert not result.HasField("output")


async def test_unknown_tool_is_not_found_and_lists_the_known_ones(tools_stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(tools_stub, "rm_rf", path="/")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown tool 'rm_rf'" in err.value.details()
    assert "calculator, search_documents, steps" in err.value.details()


async def test_empty_tool_name_is_invalid(tools_stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(tools_stub, "")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("calculator", {}, "invalid at $: 'expression' is a required property"),
        ("calculator", {"expression": 5}, "invalid at $.expression: 5.0 is not of type 'string'"),
        ("calculator", {"expression": "1" * 1001}, "invalid at $.expression: "),
        ("calculator", {"expression": "1", "extra": True}, "not allowed ('extra' was unexpected)"),
        ("search_documents", {"query": "x", "top_k": 0}, "invalid at $.top_k: 0.0 is less than the minimum of 1"),
        ("search_documents", {"query": "x", "top_k": 2.5}, "invalid at $.top_k: 2.5 is not of type 'integer'"),
        ("orders", {"lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 0}]}, "invalid at $.lines[1].qty"),
        ("orders", {"lines": [{"sku": "a"}]}, "invalid at $.lines[0]: 'qty' is a required property"),
    ],
)
async def test_arguments_failing_the_schema_are_invalid_argument_naming_the_path(tools_stub, name, arguments, expected):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(tools_stub, name, **arguments)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"arguments of tool {name!r} are" in err.value.details()
    assert expected in err.value.details()
    assert len(err.value.details()) < 600  # a 1001-character argument is not echoed in full


async def test_a_tool_over_its_runtime_limit_is_cancelled(tools_stub, sleeper):
    sleeper.cancelled.clear()
    call = tools_stub.ExecuteTool(
        tools_pb2.ExecuteToolRequest(name="sleeper", arguments=struct(seconds=30)), timeout=10
    )
    first = await call.read()
    assert first.progress.message == "sleeping"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "limit of 0.5 s" in err.value.details()
    await asyncio.wait_for(sleeper.cancelled.wait(), 1)


async def test_a_cancelled_call_cancels_its_tool(tools_stub, sleeper):
    sleeper.cancelled.clear()
    request = tools_pb2.ExecuteToolRequest(name="sleeper", arguments=struct(seconds=30))
    call = tools_stub.ExecuteTool(request, timeout=10)
    assert (await call.read()).progress.message == "sleeping"
    call.cancel()
    await asyncio.wait_for(sleeper.cancelled.wait(), 2)


async def test_too_many_concurrent_calls_are_refused(tools_stub, sleeper):
    calls = [
        tools_stub.ExecuteTool(tools_pb2.ExecuteToolRequest(name="sleeper", arguments=struct(seconds=30)), timeout=10)
        for _ in range(2)
    ]
    for call in calls:
        assert (await call.read()).progress.message == "sleeping"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(tools_stub, "calculator", expression="1+1")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit 2" in err.value.details()
    for call in calls:
        call.cancel()
    await asyncio.sleep(0.2)
    assert (await execute(tools_stub, "calculator", expression="1+1"))[-1].result.output.struct_value


async def test_search_documents_without_retrieval_is_unavailable(tools_stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(tools_stub, "search_documents", query="what is asyncio?")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details().startswith("retrieval service:")


async def test_a_tool_returning_non_json_is_an_internal_error(tools_stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(tools_stub, "not_json")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "not_json" in err.value.details()


async def test_output_is_checked_against_the_output_schema(tools_stub):
    result = (await execute(tools_stub, "typed", value={"total": 3}))[-1].result
    assert json_format.MessageToDict(result.output) == {"total": 3}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(tools_stub, "typed", value={"total": "three"})
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == (
        "tool 'typed' returned output that fails its output schema at $.total: 'three' is not of type 'number'"
    )


async def test_an_error_result_carries_the_tools_output(tools_stub):
    result = (await execute(tools_stub, "failing"))[-1].result
    assert result.is_error and result.error_message == "the program exited with status 1"
    assert json_format.MessageToDict(result.output) == {"stderr": "Traceback ..."}


async def test_a_tool_with_its_own_concurrency_limit_refuses_the_next_call(tools_stub):
    first = tools_stub.ExecuteTool(tools_pb2.ExecuteToolRequest(name="solo", arguments=struct(seconds=30)), timeout=10)
    assert (await first.read()).progress.message == "sleeping"
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await execute(tools_stub, "solo", seconds=0.01)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 calls of tool 'solo' are already running (its limit is 1)" in err.value.details()
        # Other tools are not affected by solo's limit.
        assert not (await execute(tools_stub, "calculator", expression="1+1"))[-1].result.is_error
    finally:
        first.cancel()
    await asyncio.sleep(0.1)
    assert json_format.MessageToDict((await execute(tools_stub, "solo", seconds=0.01))[-1].result.output) == "woke up"


async def test_a_per_tool_runtime_limit_overrides_the_service_limit(tools_stub):
    # The service limit is 0.5 s; solo's override (tool_limits) is 5 s.
    result = (await execute(tools_stub, "solo", seconds=0.8))[-1].result
    assert json_format.MessageToDict(result.output) == "woke up"
    reply = await tools_stub.ListTools(tools_pb2.ListToolsRequest(), timeout=5)
    details = {d.name: d for d in reply.details}
    assert details["solo"].max_runtime_ms == 5000 and details["solo"].max_concurrent_calls == 1
    assert details["calculator"].max_runtime_ms == 500 and details["calculator"].max_concurrent_calls == 0


async def test_duration_is_measured(tools_stub):
    result = (await execute(tools_stub, "sleeper", seconds=0.2))[-1].result
    assert 190 <= result.duration_ms < 450


# -- registry -----------------------------------------------------------------------------------


def tool_with(name: str, schema: dict) -> Tool:
    class T(Tool):
        description = "t"
        parameters_schema = schema

        async def run(self, arguments, progress):
            return ToolOutput(output=None)

    T.name = name
    return T()


def test_registry_checks_schemas_and_names_at_registration():
    with pytest.raises(ValueError, match=r"invalid parameters_schema at \$\.properties\.n\.type"):
        ToolRegistry([tool_with("bad", {"type": "object", "properties": {"n": {"type": "integer-ish"}}})])
    with pytest.raises(ValueError, match="must describe an object"):
        ToolRegistry([tool_with("arr", {"type": "array"})])
    with pytest.raises(ValueError, match="must match"):
        ToolRegistry([tool_with("has space", {"type": "object"})])
    with pytest.raises(ValueError, match="already registered"):
        ToolRegistry([tool_with("twice", {"type": "object"}), tool_with("twice", {"type": "object"})])
    registry = ToolRegistry([tool_with("ok", {"type": "object"})])
    assert registry.names == ["ok"] and len(registry.definitions()) == 1
    broken_output = tool_with("out", {"type": "object"})
    broken_output.output_schema = {"type": "objekt"}
    with pytest.raises(ValueError, match=r"tool 'out': invalid output_schema at \$\.type"):
        ToolRegistry([broken_output])


def test_registry_replaces_the_tools_of_one_origin_at_once():
    builtin = tool_with("calc", {"type": "object"})
    remote_a, remote_b, clash, bad = (tool_with(n, {"type": "object"}) for n in ("srv__a", "srv__b", "calc", "x y"))
    for tool in (remote_a, remote_b, clash, bad):
        tool.origin = "mcp:srv"
    registry = ToolRegistry([builtin], limits={"srv__a": ToolLimits(max_concurrent_calls=3)})
    problems = registry.replace("mcp:srv", [remote_a, remote_b, clash, bad])
    assert registry.names == ["calc", "srv__a", "srv__b"]
    assert problems == ["a tool named 'calc' is already registered", "tool name 'x y' must match ^[a-zA-Z0-9_-]{1,64}$"]
    assert registry.limits("srv__a") == ToolLimits(max_concurrent_calls=3, max_runtime_s=None)
    registry.replace("mcp:srv", [])
    assert registry.names == ["calc"]
