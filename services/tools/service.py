"""Tool service: lists the tools agents may call and executes them, streaming progress.

``ToolService.ListTools`` returns every registered tool as a ``ToolDefinition``.
``ToolService.ExecuteTool`` checks the call (NOT_FOUND for an unknown tool, INVALID_ARGUMENT for
arguments that fail its schema, RESOURCE_EXHAUSTED when ``max_concurrent_calls`` tools are
already running), runs the tool as its own task, streams its progress events and then exactly
one result. A tool that runs longer than ``max_runtime_s`` is cancelled and the call ends with
DEADLINE_EXCEEDED; a caller that cancels (or whose deadline passes) cancels the tool too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.errors import ServiceError, invalid_argument
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import MeshSettings, ServiceSettings
from agentmesh.services.tools.builtin import builtin_tools
from agentmesh.services.tools.registry import Tool, ToolError, ToolOutput, ToolRegistry, to_value
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc

log = logging.getLogger("agentmesh.tools")

#: Progress events buffered per call before a chatty tool waits for the caller to read them.
PROGRESS_BUFFER = 64
#: Longest progress message sent, in characters.
MAX_PROGRESS_CHARS = 1000


class ToolsSettings(ServiceSettings):
    """Settings of the tool service (env prefix ``AGENTMESH_TOOLS_``)."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_TOOLS_", extra="ignore")

    max_runtime_s: float = Field(30.0, gt=0, description="Longest one tool call may run, in seconds.")
    max_concurrent_calls: int = Field(
        64, ge=1, description="Tool calls running at once in this process; more are refused with RESOURCE_EXHAUSTED."
    )
    search_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of search_documents' call to the retrieval service, in seconds."
    )
    search_collection: str = Field("", description="Collection search_documents searches; empty = retrieval's default.")


class ToolServicer(tools_pb2_grpc.ToolServiceServicer):
    def __init__(self, service: ToolsService):
        self._service = service
        self._running = 0

    async def ListTools(self, request: tools_pb2.ListToolsRequest, context) -> tools_pb2.ListToolsResponse:
        return tools_pb2.ListToolsResponse(tools=self._service.registry().definitions())

    async def ExecuteTool(
        self, request: tools_pb2.ExecuteToolRequest, context
    ) -> AsyncIterator[tools_pb2.ExecuteToolResponse]:
        """Progress events, then one result. Statuses: INVALID_ARGUMENT (no name, arguments
        failing the schema), NOT_FOUND (unknown tool), RESOURCE_EXHAUSTED (too many running),
        DEADLINE_EXCEEDED (over ``max_runtime_s``), or what the tool raised (e.g. UNAVAILABLE)."""
        registry = self._service.registry()
        if not request.name:
            raise invalid_argument(f"name is empty; known tools: {', '.join(registry.names)}")
        tool = registry.get(request.name)
        arguments = json_format.MessageToDict(request.arguments)
        registry.validate(tool.name, arguments)
        settings = self._service.settings
        if self._running >= settings.max_concurrent_calls:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._running} tool calls are already running "
                f"(limit {settings.max_concurrent_calls}); retry shortly",
            )
        self._running += 1
        try:
            async for item in self._run(tool, arguments, request.tool_call_id):
                yield item
        finally:
            self._running -= 1

    async def _run(
        self, tool: Tool, arguments: dict[str, Any], tool_call_id: str
    ) -> AsyncIterator[tools_pb2.ExecuteToolResponse]:
        settings = self._service.settings
        queue: asyncio.Queue[tools_pb2.ToolProgress] = asyncio.Queue(PROGRESS_BUFFER)

        async def progress(message: str, fraction: float | None = None) -> None:
            event = tools_pb2.ToolProgress(message=message[:MAX_PROGRESS_CHARS])
            if fraction is not None:
                event.fraction = min(1.0, max(0.0, float(fraction)))
            await queue.put(event)

        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        deadline = loop.time() + settings.max_runtime_s
        # A task of its own, so the runtime limit and a cancelled call can stop it at any await.
        task = asyncio.create_task(tool.run(arguments, progress), name=f"tool:{tool.name}:{tool_call_id}")
        getter: asyncio.Future[tools_pb2.ToolProgress] | None = None
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {task, getter}, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
                )
                if getter in done:
                    yield tools_pb2.ExecuteToolResponse(progress=getter.result())
                    continue
                getter.cancel()
                if not done:
                    raise ServiceError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"tool {tool.name!r} ran longer than its limit of {settings.max_runtime_s:g} s and was stopped",
                    )
            duration_ms = int((time.perf_counter() - started) * 1000)
            while not queue.empty():  # progress reported just before the tool returned
                yield tools_pb2.ExecuteToolResponse(progress=queue.get_nowait())
            yield tools_pb2.ExecuteToolResponse(result=self._result(tool, task, duration_ms))
        finally:
            if getter is not None:
                getter.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                log.info("tool cancelled", extra={"fields": {"tool": tool.name, "tool_call_id": tool_call_id}})

    def _result(self, tool: Tool, task: asyncio.Task[ToolOutput], duration_ms: int) -> tools_pb2.ToolResult:
        try:
            outcome = task.result()
        except ToolError as exc:
            return tools_pb2.ToolResult(is_error=True, error_message=str(exc), duration_ms=duration_ms)
        try:
            output = to_value(outcome.output)
        except ValueError as exc:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"tool {tool.name!r} returned output that is {exc}") from exc
        result = tools_pb2.ToolResult(output=output, chunks=outcome.chunks, duration_ms=duration_ms)
        limit = self._service.settings.max_message_bytes
        if result.ByteSize() > limit - 1024:  # leave room for the stream framing
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tool {tool.name!r} produced a result of {result.ByteSize()} bytes; the limit is {limit} bytes",
            )
        return result


class ToolsService(Service):
    """The tool service. ``tools`` replaces the built-in set (tests, embedding applications).

    Readiness is "the registry is loaded" only. The retrieval service is deliberately not part
    of it: only ``search_documents`` needs retrieval, and a retrieval outage should not take the
    calculator (and every other tool) out of the load balancer with it. ``search_documents``
    reports UNAVAILABLE per call instead, which the orchestrator turns into a tool error.
    """

    kind = "tools"
    settings: ToolsSettings

    def __init__(self, settings: ToolsSettings, tools: list[Tool] | None = None, mesh: MeshSettings | None = None):
        super().__init__(settings)
        self._tools = tools
        self._downstream = Downstream(mesh, max_message_bytes=settings.max_message_bytes)
        self._registry: ToolRegistry | None = None

    def register(self, server: grpc.aio.Server) -> None:
        tools_pb2_grpc.add_ToolServiceServicer_to_server(ToolServicer(self), server)

    async def start(self) -> None:
        """Build the registry; a tool with an invalid schema stops start-up with ValueError."""
        s = self.settings
        tools = self._tools
        if tools is None:
            tools = builtin_tools(
                self._downstream, search_timeout_s=s.search_timeout_s, search_collection=s.search_collection
            )
        self._registry = ToolRegistry(tools)
        log.info("tools registered", extra={"fields": {"tools": self._registry.names}})

    def registry(self) -> ToolRegistry:
        if self._registry is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "tool service is still starting; retry shortly")
        return self._registry

    async def ready(self) -> tuple[bool, str]:
        if self._registry is None or not len(self._registry):
            return False, "no tools registered yet"
        return True, f"{len(self._registry)} tools registered"

    async def stop(self) -> None:
        await self._downstream.close()


def create() -> Service:
    """The tool service configured from the environment."""
    return ToolsService(ToolsSettings())
