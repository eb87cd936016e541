"""External tools from MCP servers, with the official ``mcp`` SDK (2.x).

The servers are listed in a settings file (``AGENTMESH_TOOLS_MCP_CONFIG``, YAML or JSON)::

    servers:
      docs:                         # server name: letters, digits, '-' and '_' (no '__'), 1..32
        transport: stdio            # the server is a child process speaking MCP on stdin/stdout
        command: python
        args: ["-m", "docs_server"]
        env: {DOCS_ROOT: /srv/docs} # added to the SDK's minimal default environment
        cwd: /srv
      weather:
        transport: streamable_http
        url: https://weather.example.com/mcp
        headers: {Authorization: "Bearer ..."}
        max_concurrent_calls: 4     # per tool of this server; 0 = only the service-wide limit
        timeout_s: 60               # per call (the service's max_runtime_s when unset)

Each server's tools join the registry as ``<server>__<tool>`` (characters other than
``[a-zA-Z0-9_-]`` in the tool's name become ``_``; a tool whose name cannot be made valid, or
whose input schema is not a valid JSON Schema, is left out and logged). The MCP input schema is
the argument schema, the MCP output schema (of ``structuredContent``) the output schema.

Each server has one long-lived connection owned by its own task (the SDK's transports are
context managers that must be entered and left in one task). The task connects, lists the tools
and re-lists them every ``refresh_interval_s``, which doubles as a liveness check; when the
connection fails its tools leave the registry and it reconnects with exponential back-off
(0.5 s doubling to 30 s). A server that is down never blocks start-up longer than
``connect_timeout_s``, nor makes the tool service unready.

A call maps onto ``tools/call``: MCP progress notifications become progress events (``message``,
and ``progress / total`` as the fraction when the server sends a total); cancelling the gRPC call
cancels the SDK call, which sends the server ``notifications/cancelled`` for that request. A
result with ``isError`` is an error result; ``structuredContent`` is the output when present,
otherwise the text content (one string) or, for other content, the content blocks as JSON. An
unreachable server is UNAVAILABLE; an error the server answers (invalid params...) an error
result the model can react to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx2
import mcp_types
import yaml
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp_types.jsonrpc import CONNECTION_CLOSED, REQUEST_TIMEOUT
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentmesh.services.runtime.errors import unavailable
from agentmesh.services.tools.registry import TOOL_NAME_PATTERN, ProgressCallback, Tool, ToolError, ToolOutput

log = logging.getLogger("agentmesh.tools")

SERVER_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,32}$")
#: Longest tool description passed on to models, in characters.
MAX_DESCRIPTION_CHARS = 2000
#: Most pages of tools/list read from one server.
MAX_LIST_PAGES = 50


class _ServerBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_concurrent_calls: int = Field(0, ge=0, description="Calls of each tool at once; 0 = service-wide limit only.")
    timeout_s: float | None = Field(None, gt=0, description="Longest one call may run, in seconds.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Longest a connection attempt may take, in seconds.")
    refresh_interval_s: float = Field(60.0, gt=0, description="How often the tool list is read again, in seconds.")


class StdioServer(_ServerBase):
    transport: Literal["stdio"]
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None


class HttpServer(_ServerBase):
    transport: Literal["streamable_http"]
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)


ServerConfig = Annotated[StdioServer | HttpServer, Field(discriminator="transport")]


class McpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    servers: dict[str, ServerConfig] = Field(default_factory=dict)

    @field_validator("servers")
    @classmethod
    def _names(cls, servers: dict[str, Any]) -> dict[str, Any]:
        for name in servers:
            if not SERVER_NAME.match(name) or "__" in name:
                raise ValueError(f"server name {name!r} must match {SERVER_NAME.pattern} without '__'")
        return servers


def load_config(path: str | Path) -> McpConfig:
    """Read and validate an MCP settings file (``.json``, else YAML). Raises ValueError naming
    the file and, for invalid content, each failing location (``servers.docs.command``)."""
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as exc:
        raise ValueError(f"MCP config {path}: cannot be read: {exc.strerror}") from exc
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"MCP config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    try:
        return McpConfig.model_validate(data or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"MCP config {path}: {problems}") from exc


def tool_name(server: str, remote: str) -> str:
    """``<server>__<remote>`` with characters outside ``[a-zA-Z0-9_-]`` replaced by ``_``."""
    return f"{server}__{re.sub(r'[^a-zA-Z0-9_-]', '_', remote)}"


def _unreachable(exc: BaseException) -> bool:
    """True for failures of the connection rather than answers of the server."""
    if isinstance(exc, MCPError):
        return exc.code in (CONNECTION_CLOSED, REQUEST_TIMEOUT)
    return True


class McpTool(Tool):
    """One tool of an MCP server, called through that server's connection."""

    def __init__(self, connection: McpConnection, remote: mcp_types.Tool):
        self.connection = connection
        self.remote_name = remote.name
        self.name = tool_name(connection.name, remote.name)
        self.description = (remote.description or remote.title or remote.name)[:MAX_DESCRIPTION_CHARS]
        self.parameters_schema = dict(remote.input_schema)
        self.output_schema = dict(remote.output_schema) if remote.output_schema else None
        self.origin = f"mcp:{connection.name}"
        self.max_concurrent_calls = connection.config.max_concurrent_calls
        self.max_runtime_s = connection.config.timeout_s

    async def run(self, arguments: dict[str, Any], progress: ProgressCallback) -> ToolOutput:
        return await self.connection.call(self.remote_name, arguments, progress)


class McpConnection:
    """The connection to one configured MCP server (see the module docstring)."""

    def __init__(self, name: str, config: StdioServer | HttpServer, publish: Callable[[str, list[Tool]], list[str]]):
        self.name = name
        self.config = config
        self.origin = f"mcp:{name}"
        self._publish = publish
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._attempted = asyncio.Event()
        self._broken = asyncio.Event()
        #: Why the server is not connected (None while it is).
        self.last_error: str | None = "not connected yet"
        self.tool_names: list[str] = []

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def start(self) -> None:
        """Start connecting; return after the first attempt (at most ``connect_timeout_s``)."""
        self._task = asyncio.create_task(self._run(), name=f"mcp:{self.name}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.connect_timeout_s + 1):
                await self._attempted.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _transport(self) -> Any:
        c = self.config
        if isinstance(c, StdioServer):
            return StdioServerParameters(command=c.command, args=c.args, env=c.env or None, cwd=c.cwd)
        # The SDK's own timeouts: a response stream may stay open for minutes.
        http = httpx2.AsyncClient(headers=c.headers, timeout=httpx2.Timeout(30.0, read=300.0))
        return streamable_http_client(c.url, http_client=http)

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    async with asyncio.timeout(self.config.connect_timeout_s):
                        client = await stack.enter_async_context(Client(self._transport()))
                        await self._list(client)
                    self._client, self.last_error, backoff = client, None, 0.5
                    self._attempted.set()
                    log.info("MCP server connected", extra={"fields": {"server": self.name, "tools": self.tool_names}})
                    while True:
                        self._broken.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.config.refresh_interval_s):
                                await self._broken.wait()
                        if self._broken.is_set():
                            raise ConnectionError("a call found the connection broken")
                        async with asyncio.timeout(self.config.connect_timeout_s):
                            await self._list(client)
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect later
                self.last_error = _describe(exc)
                log.warning("MCP server unavailable", extra={"fields": {"server": self.name, "error": self.last_error}})
            finally:
                self._client = None
                self.tool_names = []
                self._publish(self.origin, [])
            self._attempted.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _list(self, client: Client) -> None:
        remote: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            page = await client.list_tools(cursor=cursor, cache_mode="refresh")
            remote.extend(page.tools)
            cursor = page.next_cursor
            if cursor is None:
                break
        tools: list[Tool] = []
        for item in remote:
            tool = McpTool(self, item)
            if not TOOL_NAME_PATTERN.match(tool.name):
                log.warning("MCP tool left out", extra={"fields": {"tool": tool.name, "reason": "name too long"}})
                continue
            tools.append(tool)
        for problem in self._publish(self.origin, tools):
            log.warning("MCP tool left out", extra={"fields": {"server": self.name, "reason": problem}})
        self.tool_names = [t.name for t in tools]

    async def call(self, remote_name: str, arguments: dict[str, Any], progress: ProgressCallback) -> ToolOutput:
        client = self._client
        if client is None:
            raise unavailable(f"MCP server {self.name!r} is not connected ({self.last_error}); retry shortly")

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            fraction = done / total if total else None
            text = message or (f"{done:g} of {total:g}" if total else f"{done:g}")
            await progress(text, fraction)

        try:
            result = await client.call_tool(remote_name, arguments, progress_callback=on_progress)
        except asyncio.CancelledError:
            raise
        except MCPError as exc:
            if _unreachable(exc):
                self._broken.set()
                raise unavailable(f"MCP server {self.name!r}: {exc.message}") from exc
            raise ToolError(f"MCP server {self.name!r} refused the call: {exc.message}") from exc
        except Exception as exc:  # noqa: BLE001 - transport failures of any kind
            self._broken.set()
            raise unavailable(f"MCP server {self.name!r} failed: {_describe(exc)}") from exc
        texts = [block.text for block in result.content if isinstance(block, mcp_types.TextContent)]
        if result.is_error:
            raise ToolError("\n".join(texts) or f"MCP tool {remote_name!r} failed without a message")
        if result.structured_content is not None:
            return ToolOutput(output=result.structured_content)
        if len(texts) == len(result.content):
            return ToolOutput(output="\n".join(texts))
        return ToolOutput(output=[b.model_dump(mode="json", by_alias=True, exclude_none=True) for b in result.content])


def _describe(exc: BaseException) -> str:
    """One line for an exception, looking inside anyio's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:500]


class McpTools:
    """Every configured MCP server's connection."""

    def __init__(self, config: McpConfig, publish: Callable[[str, list[Tool]], list[str]]):
        self.connections = [McpConnection(name, server, publish) for name, server in config.servers.items()]

    async def start(self) -> None:
        await asyncio.gather(*(c.start() for c in self.connections))

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.connections))

    def status(self) -> str:
        """``name: N tools`` or ``name: down (reason)`` for each server."""
        return ", ".join(
            f"{c.name}: {len(c.tool_names)} tools" if c.connected else f"{c.name}: down ({c.last_error})"
            for c in self.connections
        )
