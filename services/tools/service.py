"""Tool service: lists the tools agents may call and executes them, streaming progress.

``ToolService.ListTools`` returns every registered tool as a ``ToolDefinition`` (what a model is
shown, usable with any provider) and its ``ToolDetails`` (output schema, origin, limits).

``ToolService.ExecuteTool`` checks the call (NOT_FOUND for an unknown tool, INVALID_ARGUMENT for
arguments that fail its schema or a malformed idempotency key), replays the stored result when
the idempotency key was seen before (see ``idempotency.py``), refuses with RESOURCE_EXHAUSTED
when ``max_concurrent_calls`` calls in all or the tool's own limit of calls are already running,
runs the tool as its own task, streams its progress events and then exactly one result, checked
against the tool's output schema (INTERNAL when it fails: a bug of the tool). A tool that runs
longer than its runtime limit (the tool's own, else ``max_runtime_s``) is cancelled and the call
ends with DEADLINE_EXCEEDED; a caller that cancels (or whose deadline passes) cancels the tool
too — for ``python`` that kills the sandbox's whole process tree — unless the call asked for
``continue_on_disconnect``: then the tool runs on, detached from the RPC, and its result is stored
under the call's idempotency key for the caller's retry; ``ToolService.CancelToolCall`` stops such
a call on whichever replica runs it.

Tools: ``calculator``, ``search_documents`` (retrieval), ``recall_memory`` (memory), ``python``
(sandbox; unless ``python_enabled`` is false), ``http_fetch`` (only when ``http_allowed_hosts``
is set), and the tools of the MCP servers in ``mcp_config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
from google.protobuf import json_format
from pydantic import AliasChoices, BaseModel, Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.context import current_tenant, remaining_s
from agentmesh.services.runtime.errors import ServiceError, invalid_argument
from agentmesh.services.runtime.redis_pool import RedisPoolSettings
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import MeshSettings, ServiceSettings
from agentmesh.services.tools import idempotency
from agentmesh.services.tools.builtin import builtin_tools
from agentmesh.services.tools.http_fetch import HttpFetch
from agentmesh.services.tools.mcp_tools import McpTools, load_config
from agentmesh.services.tools.registry import (
    MAX_PROGRESS_CHARS,
    CallContext,
    Tool,
    ToolError,
    ToolLimits,
    ToolOutput,
    ToolRegistry,
    set_current_call,
    to_value,
)
from agentmesh.services.tools.sandbox import PythonTool, Sandbox, SandboxLimits
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc

log = logging.getLogger("agentmesh.tools")

#: Progress events buffered per call before a chatty tool waits for the caller to read them.
PROGRESS_BUFFER = 64
#: An idempotency key: 1..128 printable ASCII characters.
IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,128}$")
#: How much longer than the tool's runtime limit a running claim is kept, in seconds.
CLAIM_MARGIN_S = 30.0
#: How often a call that may run detached looks for a CancelToolCall made on another replica, in s.
CANCEL_POLL_S = 0.25
_END = object()


class ToolLimitSetting(BaseModel):
    """An operator's override of one tool's limits (``tool_limits``)."""

    max_concurrent_calls: int = Field(0, ge=0)
    max_runtime_s: float | None = Field(None, gt=0)


class ToolsSettings(ServiceSettings, RedisPoolSettings):
    """Settings of the tool service (env prefix ``AGENTMESH_TOOLS_``)."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_TOOLS_", extra="ignore", populate_by_name=True)

    max_runtime_s: float = Field(30.0, gt=0, description="Longest one tool call may run, in seconds.")
    max_concurrent_calls: int = Field(
        64, ge=1, description="Tool calls running at once in this process; more are refused with RESOURCE_EXHAUSTED."
    )
    tool_limits: dict[str, ToolLimitSetting] = Field(
        default_factory=dict,
        description='Per-tool overrides as JSON, e.g. {"python": {"max_concurrent_calls": 2, "max_runtime_s": 20}}.',
    )
    search_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of search_documents' call to the retrieval service, in seconds."
    )
    search_collection: str = Field("", description="Collection search_documents searches; empty = retrieval's default.")
    memory_timeout_s: float = Field(10.0, gt=0, description="Deadline of recall_memory's call to memory, in seconds.")
    recall_token_budget: int = Field(
        0, ge=0, description="Tokens of session history recall_memory reads; 0 = the memory service's default."
    )
    # Idempotency keys.
    redis_url: str = Field(
        "",
        # Also the mesh's Redis as the chart and the local runner hand it to every service: with
        # several replicas only a shared store makes a repeated key return the first result.
        validation_alias=AliasChoices(
            "AGENTMESH_TOOLS_REDIS_URL", "REDIS_URL", "AGENTMESH_MEMORY_REDIS_URL", "redis_url"
        ),
        description="Redis for idempotency records (shared by replicas); also read from REDIS_URL, then "
        "AGENTMESH_MEMORY_REDIS_URL; empty = an in-process LRU.",
    )
    idempotency_ttl_s: int = Field(86_400, ge=1, description="How long a result is kept for its key, in seconds.")
    idempotency_cache_entries: int = Field(10_000, ge=1, description="Size of the in-process LRU (without Redis).")
    cancel_poll_s: float = Field(
        CANCEL_POLL_S, gt=0, description="How often a continue_on_disconnect call checks the idempotency store for a "
        "CancelToolCall made on another replica, in seconds.",
    )
    # http_fetch.
    http_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts http_fetch may fetch from, comma-separated ('docs.python.org,*.example.com'); "
        "empty = no http_fetch tool.",
    )
    http_max_bytes: int = Field(1_000_000, ge=1, description="Most body bytes http_fetch returns.")
    http_timeout_s: float = Field(10.0, gt=0, description="Longest one fetch may take, redirects included, in seconds.")
    http_max_redirects: int = Field(5, ge=0, le=20, description="Most redirects http_fetch follows.")
    # python (see sandbox.py).
    python_enabled: bool = Field(True, description="Offer the python tool.")
    python_executable: str = Field("", description="Interpreter of the sandbox; empty = find one (see sandbox.py).")
    python_slots: int = Field(4, ge=1, le=1024, description="Sandboxed runs at once (one uid each).")
    python_uid_base: int = Field(
        700_000, ge=1000, description="First uid of the range reserved for sandboxed runs (python_slots uids)."
    )
    python_cpu_s: int = Field(10, ge=1, description="CPU time of one run, in seconds.")
    python_wall_s: float = Field(30.0, gt=0, description="Wall-clock time of one run, in seconds.")
    python_memory_bytes: int = Field(512 * 2**20, ge=64 * 2**20, description="Address space of one process.")
    python_file_bytes: int = Field(16 * 2**20, ge=0, description="Largest file a run may write, in bytes.")
    python_tmp_bytes: int = Field(64 * 2**20, ge=2**20, description="Size of the run's private /tmp, in bytes.")
    python_max_processes: int = Field(16, ge=1, description="Processes (threads) of one run.")
    python_open_files: int = Field(128, ge=16, description="Open files per process.")
    python_output_bytes: int = Field(256 * 2**10, ge=1024, description="Output kept and streamed, in bytes.")
    # MCP.
    mcp_config: str = Field("", description="Path of the MCP servers file (YAML or JSON); empty = none.")

    @field_validator("http_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [h.strip() for h in value.split(",") if h.strip()]
        return value

    def sandbox_limits(self) -> SandboxLimits:
        return SandboxLimits(
            cpu_s=self.python_cpu_s,
            memory_bytes=self.python_memory_bytes,
            file_bytes=self.python_file_bytes,
            tmp_bytes=self.python_tmp_bytes,
            processes=self.python_max_processes,
            open_files=self.python_open_files,
            wall_s=self.python_wall_s,
            output_bytes=self.python_output_bytes,
        )


class ToolServicer(tools_pb2_grpc.ToolServiceServicer):
    def __init__(self, service: ToolsService):
        self._service = service
        self._running = 0
        self._running_by_tool: dict[str, int] = {}
        #: Calls made with continue_on_disconnect, by scoped idempotency key: the task that runs each.
        self._detachable: dict[str, asyncio.Task] = {}

    async def ListTools(self, request: tools_pb2.ListToolsRequest, context) -> tools_pb2.ListToolsResponse:
        registry = self._service.registry()
        details = registry.details(self._service.settings.max_runtime_s)
        return tools_pb2.ListToolsResponse(tools=registry.definitions(), details=details)

    async def ExecuteTool(
        self, request: tools_pb2.ExecuteToolRequest, context
    ) -> AsyncIterator[tools_pb2.ExecuteToolResponse]:
        """Progress events, then one result. Statuses: INVALID_ARGUMENT (no name, arguments
        failing the schema, a malformed idempotency key), NOT_FOUND (unknown tool),
        FAILED_PRECONDITION (idempotency key reused for another call), ABORTED (the first call
        with the key is still running), RESOURCE_EXHAUSTED (too many running), DEADLINE_EXCEEDED
        (over the runtime limit), INTERNAL (output failing the tool's output schema), or what
        the tool raised (e.g. UNAVAILABLE)."""
        registry = self._service.registry()
        if not request.name:
            raise invalid_argument(f"name is empty; known tools: {', '.join(registry.names)}")
        if request.continue_on_disconnect and not request.idempotency_key:
            raise invalid_argument(
                "continue_on_disconnect needs an idempotency_key: the result of a call that outlives its caller "
                "is only given to a retry with the same key"
            )
        tool = registry.get(request.name)
        try:
            arguments = json_format.MessageToDict(request.arguments)
        except ValueError as exc:  # NaN or Infinity: no JSON form for the schema or the tool
            raise invalid_argument(f"arguments cannot be written as JSON ({exc}): use finite numbers") from None
        registry.validate(tool.name, arguments)
        limits = registry.limits(tool.name)
        runtime_s = limits.max_runtime_s or self._service.settings.max_runtime_s
        call = CallContext(request.tool_call_id, request.session_id, request.user_id)

        claim: idempotency.Claim | None = None
        if request.idempotency_key:
            replay = await self._claim(request, tool, arguments, runtime_s)
            if isinstance(replay, tools_pb2.ToolResult):
                yield tools_pb2.ExecuteToolResponse(result=replay)
                return
            claim = replay
        if request.continue_on_disconnect and claim is not None:
            try:
                self._admit(tool.name, limits)
            except BaseException:
                await asyncio.shield(self._service.idempotency.release(claim))
                raise
            async for item in self._detached(tool, arguments, call, runtime_s, claim):
                yield item
            return
        try:
            self._admit(tool.name, limits)
            try:
                async for item in self._run(tool, arguments, call, runtime_s):
                    if claim is not None and item.WhichOneof("event") == "result":
                        await self._service.idempotency.complete(
                            claim, item.result.SerializeToString(), self._service.settings.idempotency_ttl_s
                        )
                        claim = None
                    yield item
            finally:
                self._running -= 1
                self._running_by_tool[tool.name] -= 1
        finally:
            if claim is not None:  # no result: let a retry with the same key run the tool
                await asyncio.shield(self._service.idempotency.release(claim))

    async def _detached(
        self, tool: Tool, arguments: dict[str, Any], call: CallContext, runtime_s: float, claim: idempotency.Claim
    ) -> AsyncIterator[tools_pb2.ExecuteToolResponse]:
        """Run the call in a task of its own that outlives this RPC: progress and the result are
        forwarded while the caller listens; the result is stored under ``claim`` either way. The
        task is counted in until it ends, and stops on CancelToolCall or its runtime limit."""
        listener: asyncio.Queue = asyncio.Queue(PROGRESS_BUFFER)
        state: dict[str, Any] = {"listener": listener, "stored": False}

        async def forward(item: Any) -> None:
            if (queue := state["listener"]) is not None:
                await queue.put(item)

        async def execute() -> None:
            store = self._service.idempotency
            pending: idempotency.Claim | None = claim
            outcome: Any = _END
            try:
                async for item in self._run(tool, arguments, call, runtime_s):
                    if item.WhichOneof("event") == "result":
                        state["stored"] = True  # from here on a changed record is not a cancellation
                        await store.complete(pending, item.result.SerializeToString(),
                                             self._service.settings.idempotency_ttl_s)
                        pending = None
                    await forward(item)
            except asyncio.CancelledError:
                outcome = ServiceError(grpc.StatusCode.CANCELLED, f"the call of tool {tool.name!r} was cancelled "
                                       "(CancelToolCall, or the tool service is shutting down)")
                raise
            except Exception as exc:  # noqa: BLE001 - the caller's status, if it still listens
                outcome = exc
            finally:
                watcher.cancel()
                if pending is not None:  # no result: a retry with the key runs the tool
                    await asyncio.shield(store.release(pending))
                self._running -= 1
                self._running_by_tool[tool.name] -= 1
                if self._detachable.get(claim.key) is task:
                    del self._detachable[claim.key]
                await forward(outcome)

        async def watch() -> None:
            # A CancelToolCall on another replica marks the record; this replica stops the call.
            while True:
                await asyncio.sleep(self._service.settings.cancel_poll_s)
                if not state["stored"] and await self._service.idempotency.cancel_requested(claim):
                    log.info("tool call cancelled by CancelToolCall",
                             extra={"fields": {"tool": tool.name, "tool_call_id": call.tool_call_id}})
                    task.cancel()
                    return

        task = asyncio.create_task(execute(), name=f"tool-call:{tool.name}:{call.tool_call_id}")
        # Only a shared store can carry a cancellation from another replica; this one's come direct.
        watcher = asyncio.create_task(
            watch() if self._service.idempotency.kind == "redis" else asyncio.sleep(0), name=f"tool-call-watch:{tool.name}"
        )
        self._detachable[claim.key] = task
        finished = False
        try:
            while True:
                item = await listener.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            state["listener"] = None
            while not listener.empty():  # unblock a forward() waiting for room
                listener.get_nowait()
            if not finished and not task.done():
                log.info("caller went away; the tool call goes on", extra={"fields": {
                    "tool": tool.name, "tool_call_id": call.tool_call_id}})

    async def CancelToolCall(
        self, request: tools_pb2.CancelToolCallRequest, context
    ) -> tools_pb2.CancelToolCallResponse:
        """Stop the call running under (tenant, tool, key) here or, through the idempotency
        store, on another replica. INVALID_ARGUMENT for an empty name or a malformed key."""
        if not request.name:
            raise invalid_argument("name is empty: give the tool of the call to cancel")
        if not IDEMPOTENCY_KEY.match(request.idempotency_key):
            raise invalid_argument("idempotency_key must be 1..128 printable ASCII characters")
        key = idempotency.scoped_key(current_tenant(), request.name, request.idempotency_key)
        marked = await self._service.idempotency.request_cancel(key)
        task = self._detachable.get(key)
        if task is not None and not task.done():
            task.cancel()
        log.info("tool call cancel requested", extra={"fields": {"tool": request.name, "running": marked}})
        return tools_pb2.CancelToolCallResponse(cancelled=marked or task is not None)

    async def _claim(
        self, request: tools_pb2.ExecuteToolRequest, tool: Tool, arguments: dict[str, Any], runtime_s: float
    ) -> idempotency.Claim | tools_pb2.ToolResult:
        """A claim to run the call, or the stored result of the first call with the key."""
        if not IDEMPOTENCY_KEY.match(request.idempotency_key):
            raise invalid_argument("idempotency_key must be 1..128 printable ASCII characters")
        key = idempotency.scoped_key(current_tenant(), tool.name, request.idempotency_key)
        fp = idempotency.fingerprint(tool.name, arguments, request.session_id, request.user_id)
        wait_s = runtime_s + 5
        if (left := remaining_s()) is not None:
            wait_s = min(wait_s, max(0.0, left - 0.1))
        outcome = await idempotency.acquire(
            self._service.idempotency, key, fp, running_ttl_s=runtime_s + CLAIM_MARGIN_S, wait_s=wait_s
        )
        if isinstance(outcome, idempotency.Claim):
            return outcome
        result = tools_pb2.ToolResult.FromString(outcome)
        result.replayed = True
        log.info("tool result replayed", extra={"fields": {"tool": tool.name, "tool_call_id": request.tool_call_id}})
        return result

    def _admit(self, name: str, limits: ToolLimits) -> None:
        """Count the call in, or RESOURCE_EXHAUSTED when the service or the tool is at its limit."""
        settings = self._service.settings
        if self._running >= settings.max_concurrent_calls:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._running} tool calls are already running (limit {settings.max_concurrent_calls}); retry shortly",
            )
        running = self._running_by_tool.get(name, 0)
        if limits.max_concurrent_calls and running >= limits.max_concurrent_calls:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{running} calls of tool {name!r} are already running (its limit is "
                f"{limits.max_concurrent_calls}); retry shortly",
            )
        self._running += 1
        self._running_by_tool[name] = running + 1

    async def _run(
        self, tool: Tool, arguments: dict[str, Any], call: CallContext, runtime_s: float
    ) -> AsyncIterator[tools_pb2.ExecuteToolResponse]:
        queue: asyncio.Queue[tools_pb2.ToolProgress] = asyncio.Queue(PROGRESS_BUFFER)

        async def progress(message: str, fraction: float | None = None, *, stream: int = 0) -> None:
            event = tools_pb2.ToolProgress(message=message[:MAX_PROGRESS_CHARS], stream=stream)
            if fraction is not None:
                event.fraction = min(1.0, max(0.0, float(fraction)))
            await queue.put(event)

        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        deadline = loop.time() + runtime_s
        # A task of its own, so the runtime limit and a cancelled call can stop it at any await.
        # The task copies the current context, call included.
        token = set_current_call(call)
        try:
            task = asyncio.create_task(tool.run(arguments, progress), name=f"tool:{tool.name}:{call.tool_call_id}")
        finally:
            token.var.reset(token)
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
                        f"tool {tool.name!r} ran longer than its limit of {runtime_s:g} s and was stopped",
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
                log.info("tool cancelled", extra={"fields": {"tool": tool.name, "tool_call_id": call.tool_call_id}})

    def _result(self, tool: Tool, task: asyncio.Task[ToolOutput], duration_ms: int) -> tools_pb2.ToolResult:
        try:
            outcome = task.result()
        except ToolError as exc:
            result = tools_pb2.ToolResult(is_error=True, error_message=str(exc), duration_ms=duration_ms)
            if exc.output is not None:
                result.output.CopyFrom(self._value(tool, exc.output))
            return self._bounded(tool, result)
        output = self._value(tool, outcome.output)
        if problem := self._service.registry().check_output(tool.name, outcome.output):
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"tool {tool.name!r} returned output that fails its output schema at {problem}"
            )
        return self._bounded(tool, tools_pb2.ToolResult(output=output, chunks=outcome.chunks, duration_ms=duration_ms))

    @staticmethod
    def _value(tool: Tool, output: Any):
        try:
            return to_value(output)
        except ValueError as exc:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"tool {tool.name!r} returned output that is {exc}") from exc

    def _bounded(self, tool: Tool, result: tools_pb2.ToolResult) -> tools_pb2.ToolResult:
        limit = self._service.settings.max_message_bytes
        if result.ByteSize() > limit - 1024:  # leave room for the stream framing
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tool {tool.name!r} produced a result of {result.ByteSize()} bytes; the limit is {limit} bytes",
            )
        return result


class ToolsService(Service):
    """The tool service. ``tools`` replaces the built-in set (tests, embedding applications);
    MCP servers from ``mcp_config`` are added either way.

    Readiness is "the registry is loaded" only. Retrieval, memory, the MCP servers and the
    idempotency Redis are deliberately not part of it: each serves only some tools or calls, and
    an outage of one should not take the calculator (and every other tool) out of the load
    balancer with it. Those calls report UNAVAILABLE instead, which the orchestrator turns into
    a tool error; the readiness reason still names what is down.
    """

    kind = "tools"
    settings: ToolsSettings

    def __init__(self, settings: ToolsSettings, tools: list[Tool] | None = None, mesh: MeshSettings | None = None):
        super().__init__(settings)
        self._tools = tools
        self._downstream = Downstream(mesh, max_message_bytes=settings.max_message_bytes)
        self._registry: ToolRegistry | None = None
        self._servicer: ToolServicer | None = None
        self.sandbox: Sandbox | None = None
        self.mcp: McpTools | None = None
        self.idempotency: idempotency.IdempotencyStore = idempotency.MemoryIdempotencyStore(
            settings.idempotency_cache_entries
        )

    def register(self, server: grpc.aio.Server) -> None:
        self._servicer = ToolServicer(self)
        tools_pb2_grpc.add_ToolServiceServicer_to_server(self._servicer, server)

    async def start(self) -> None:
        """Build the registry and connect the MCP servers. A tool with an invalid schema or an
        invalid MCP config file stops start-up with ValueError."""
        s = self.settings
        mcp_config = load_config(s.mcp_config) if s.mcp_config else None
        if s.redis_url:
            self.idempotency = idempotency.RedisIdempotencyStore(
                s.redis_url, max_connections=s.redis_max_connections, pool_timeout_s=s.redis_pool_timeout_s
            )
        tools = self._tools
        if tools is None:
            tools = await self._builtin_tools()
        limits = {name: ToolLimits(o.max_concurrent_calls, o.max_runtime_s) for name, o in s.tool_limits.items()}
        registry = ToolRegistry(tools, limits=limits)
        if mcp_config is not None and mcp_config.servers:
            self.mcp = McpTools(mcp_config, registry.replace)
            await self.mcp.start()
        self._registry = registry
        log.info(
            "tools registered",
            extra={"fields": {"tools": registry.names, "idempotency": self.idempotency.kind}},
        )

    async def _builtin_tools(self) -> list[Tool]:
        s = self.settings
        tools = builtin_tools(
            self._downstream,
            search_timeout_s=s.search_timeout_s,
            search_collection=s.search_collection,
            memory_timeout_s=s.memory_timeout_s,
            recall_token_budget=s.recall_token_budget,
        )
        if s.python_enabled:
            self.sandbox = Sandbox(
                s.sandbox_limits(), python=s.python_executable, uid_base=s.python_uid_base, slots=s.python_slots
            )
            await self.sandbox.probe()
            tools.append(PythonTool(self.sandbox))
        if s.http_allowed_hosts:
            tools.append(
                HttpFetch(
                    s.http_allowed_hosts,
                    max_bytes=s.http_max_bytes,
                    timeout_s=s.http_timeout_s,
                    max_redirects=s.http_max_redirects,
                )
            )
        return tools

    def registry(self) -> ToolRegistry:
        if self._registry is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "tool service is still starting; retry shortly")
        return self._registry

    async def ready(self) -> tuple[bool, str]:
        if self._registry is None or not len(self._registry):
            return False, "no tools registered yet"
        notes = [f"{len(self._registry)} tools registered"]
        if self.sandbox is not None and self.sandbox.unavailable:
            notes.append(f"python sandbox unavailable: {self.sandbox.unavailable}")
        if self.mcp is not None:
            notes.append(f"MCP servers: {self.mcp.status()}")
        if not await self.idempotency.ping():
            notes.append(f"idempotency store ({self.idempotency.kind}) unreachable")
        return True, "; ".join(notes)

    async def stop(self) -> None:
        if self._servicer is not None:  # calls that outlived their callers: stopped, claims released
            running = [t for t in self._servicer._detachable.values() if not t.done()]
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=5)
        if self.mcp is not None:
            await self.mcp.stop()
        await self.idempotency.close()
        await self._downstream.close()


def create() -> Service:
    """The tool service configured from the environment."""
    return ToolsService(ToolsSettings())
