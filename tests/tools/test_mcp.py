"""MCP servers' tools through the tool service: a real MCP server (tests/tools/mcp_server.py,
written with the official SDK) over stdio and over streamable HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from agentmesh.services.cli.processes import free_port, port_is_open
from agentmesh.services.tools.mcp_tools import load_config, tool_name
from agentmesh.services.tools.service import ToolsService, ToolsSettings
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.support import running_service

SERVER = Path(__file__).with_name("mcp_server.py")


def start_http_server(port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "http", str(port)], stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while not port_is_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the MCP test server did not start; see {log}")
        time.sleep(0.05)
    return proc


class HttpServer:
    def __init__(self, root: Path):
        self.port = free_port()
        self.log = root / "mcp-http.log"
        self.proc = start_http_server(self.port, self.log)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.proc = start_http_server(self.port, self.log)


@pytest.fixture(scope="module")
def http_server(tmp_path_factory) -> Iterator[HttpServer]:
    server = HttpServer(tmp_path_factory.mktemp("mcp-http"))
    try:
        yield server
    finally:
        server.stop()


def write_config(folder: Path, server: dict) -> Path:
    path = folder / "mcp.yaml"
    path.write_text(json.dumps({"servers": {"demo": {"refresh_interval_s": 0.5, **server}}}))  # JSON is YAML
    return path


@pytest.fixture(scope="module", params=["stdio", "streamable_http"])
async def mcp(request, tmp_path_factory, http_server) -> AsyncIterator[tuple[tools_pb2_grpc.ToolServiceStub, str]]:
    folder = tmp_path_factory.mktemp(f"mcp-{request.param}")
    if request.param == "stdio":
        server = {"transport": "stdio", "command": sys.executable, "args": [str(SERVER), "stdio"]}
    else:
        server = {"transport": "streamable_http", "url": f"http://127.0.0.1:{http_server.port}/mcp"}
    settings = ToolsSettings(mcp_config=str(write_config(folder, server)), max_runtime_s=10)
    async with running_service(ToolsService(settings, tools=[])) as address, grpc.aio.insecure_channel(address) as ch:
        yield tools_pb2_grpc.ToolServiceStub(ch), request.param


def args(**kw) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(kw)
    return s


async def execute(stub, name: str, **arguments) -> list[tools_pb2.ExecuteToolResponse]:
    call = stub.ExecuteTool(tools_pb2.ExecuteToolRequest(name=name, arguments=args(**arguments)), timeout=20)
    return [item async for item in call]


async def test_mcp_tools_are_listed_namespaced_with_their_schemas(mcp):
    stub, _ = mcp
    reply = await stub.ListTools(tools_pb2.ListToolsRequest(), timeout=5)
    names = [t.name for t in reply.tools]
    assert names == ["demo__add", "demo__count", "demo__sleep", "demo__tally", "demo__fail", "demo__text_upper"]
    add = reply.tools[0]
    assert add.description == "Add two numbers."
    schema = json_format.MessageToDict(add.parameters_schema)
    assert schema["properties"] == {"a": {"title": "A", "type": "number"}, "b": {"title": "B", "type": "number"}}
    details = {d.name: d for d in reply.details}
    assert details["demo__add"].origin == "mcp:demo"
    assert json_format.MessageToDict(details["demo__add"].output_schema)["required"] == ["total"]
    assert not details["demo__text_upper"].HasField("output_schema")


async def test_a_call_returns_the_structured_content(mcp):
    stub, _ = mcp
    items = await execute(stub, "demo__add", a=2, b=40.5)
    result = items[-1].result
    assert not result.is_error
    assert json_format.MessageToDict(result.output) == {"total": 42.5}
    upper = (await execute(stub, "demo__text_upper", text="shout"))[-1].result
    assert json_format.MessageToDict(upper.output) == "SHOUT"


async def test_mcp_progress_notifications_become_progress_events(mcp):
    stub, _ = mcp
    items = await execute(stub, "demo__count", steps=3)
    progress = [i.progress for i in items if i.WhichOneof("event") == "progress"]
    assert [p.message for p in progress] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
    assert [round(p.fraction, 3) for p in progress] == [0.333, 0.667, 1.0]
    assert json_format.MessageToDict(items[-1].result.output) == {"result": "counted to 3"}


async def test_cancelling_the_grpc_call_cancels_the_mcp_call(mcp, tmp_path):
    stub, _ = mcp
    marker = tmp_path / "cancelled"
    call = stub.ExecuteTool(
        tools_pb2.ExecuteToolRequest(name="demo__sleep", arguments=args(seconds=30, marker=str(marker))), timeout=20
    )
    await asyncio.sleep(0.5)  # the call reaches the server
    call.cancel()
    deadline = time.monotonic() + 3
    while not marker.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert marker.exists() and marker.read_text() == "cancelled"


async def test_a_tool_error_of_the_server_is_an_error_result(mcp):
    stub, _ = mcp
    result = (await execute(stub, "demo__fail", reason="the disk is full"))[-1].result
    assert result.is_error
    assert "the disk is full" in result.error_message


async def test_arguments_are_checked_against_the_mcp_schema_before_the_call(mcp):
    stub, _ = mcp
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, "demo__add", a="two", b=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "$.a: 'two' is not of type 'number'" in err.value.details()


async def test_a_server_that_goes_away_is_unavailable_and_comes_back(tmp_path, http_server):
    config = write_config(tmp_path, {"transport": "streamable_http", "url": f"http://127.0.0.1:{http_server.port}/mcp"})
    settings = ToolsSettings(mcp_config=str(config), max_runtime_s=10)
    async with running_service(ToolsService(settings, tools=[])) as address, grpc.aio.insecure_channel(address) as ch:
        stub = tools_pb2_grpc.ToolServiceStub(ch)
        assert (await execute(stub, "demo__add", a=1, b=1))[-1].result.output.struct_value["total"] == 2
        http_server.stop()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await execute(stub, "demo__add", a=1, b=1)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
            deadline = time.monotonic() + 10
            while (await stub.ListTools(tools_pb2.ListToolsRequest(), timeout=5)).tools:
                assert time.monotonic() < deadline, "the tools of a stopped server stayed listed"
                await asyncio.sleep(0.1)
        finally:
            http_server.restart()
        deadline = time.monotonic() + 20
        while not (await stub.ListTools(tools_pb2.ListToolsRequest(), timeout=5)).tools:
            assert time.monotonic() < deadline, "the tools did not come back after the server restarted"
            await asyncio.sleep(0.1)
        assert (await execute(stub, "demo__add", a=2, b=2))[-1].result.output.struct_value["total"] == 4


def test_config_errors_name_the_file_and_the_location(tmp_path):
    bad = tmp_path / "servers.yaml"
    bad.write_text("servers:\n  docs:\n    transport: stdio\n  web:\n    transport: carrier-pigeon\n")
    with pytest.raises(ValueError) as err:
        load_config(bad)
    message = str(err.value)
    assert message.startswith(f"MCP config {bad}: ")
    assert "servers.docs.stdio.command: Field required" in message
    assert "servers.web: Input tag 'carrier-pigeon' found using 'transport' does not match" in message
    named = tmp_path / "named.yaml"
    named.write_text("servers:\n  a__b:\n    transport: stdio\n    command: x\n")
    with pytest.raises(ValueError, match="server name 'a__b' must match .* without '__'"):
        load_config(named)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(broken)
    with pytest.raises(ValueError, match="cannot be read"):
        load_config(tmp_path / "missing.yaml")


def test_tool_names_are_namespaced_and_sanitized():
    assert tool_name("docs", "search") == "docs__search"
    assert tool_name("docs", "files/read.v2") == "docs__files_read_v2"
