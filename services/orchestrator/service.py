"""The orchestrator: ``AgentService.Run``, the mesh's public entry point behind the gateway.

It validates the request, then hands it to :class:`~agentmesh.services.orchestrator.run.AgentTurn`
which streams the turn's events. Its readiness follows its dependencies: the orchestrator is
SERVING only while the LLM router, retrieval, memory and tool services all are, so a gateway or
Kubernetes stops sending it runs it cannot complete.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.services.orchestrator.run import AgentTurn, TurnLimits
from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.context import downstream_timeout, outgoing_metadata
from agentmesh.services.runtime.errors import from_downstream, invalid_argument
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import MeshSettings, ServiceSettings
from agentmesh.tools.v1 import tools_pb2

_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_COLLECTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
DEPENDENCIES = ("llm", "retrieval", "memory", "tools")


class OrchestratorSettings(ServiceSettings):
    """Environment: ``AGENTMESH_ORCHESTRATOR_*``."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_ORCHESTRATOR_", extra="ignore")

    # A run needs several downstream calls and at least one model call: refuse budgets that
    # cannot fit them up front instead of failing half-way.
    min_deadline_ms: int = Field(500, ge=0)
    max_input_chars: int = Field(16_384, ge=1, description="Longest accepted `input`, in characters.")
    default_max_steps: int = Field(4, ge=1, description="Model calls per run when the request says 0.")
    max_steps_limit: int = Field(16, ge=1, description="Largest `max_steps` a request may ask for.")
    default_top_k: int = Field(4, ge=0, description="Chunks retrieved per run when the request says 0.")
    max_top_k: int = Field(20, ge=1)
    memory_token_budget: int = Field(1500, ge=0, description="Tokens of session history loaded per run.")
    tool_parallelism: int = Field(4, ge=1, description="Tool calls of one step run at once, at most.")
    llm_timeout_s: float = Field(120.0, gt=0, description="Longest model call, in seconds.")
    tool_timeout_s: float = Field(60.0, gt=0, description="Longest tool call, in seconds.")
    call_timeout_s: float = Field(10.0, gt=0, description="Longest memory or retrieval call, in seconds.")
    tools_cache_s: float = Field(30.0, ge=0, description="How long the tool list is cached, in seconds.")


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, settings: OrchestratorSettings, downstream: Downstream):
        self.settings = settings
        self.downstream = downstream
        self._tools: list[common_pb2.ToolDefinition] = []
        self._tools_at = float("-inf")
        self._tools_lock = asyncio.Lock()

    async def Run(self, request: agent_pb2.RunRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[agent_pb2.RunResponse]:
        limits = self._validate(request)
        tools = await self._allowed_tools(request)
        turn = AgentTurn(request, tools, limits, self.downstream)
        async for event in turn.events():
            yield event

    def _validate(self, request: agent_pb2.RunRequest) -> TurnLimits:
        """Check the request; INVALID_ARGUMENT (ServiceError) with the field named when it is off."""
        s = self.settings
        if not _SESSION_ID.match(request.session_id):
            raise invalid_argument("session_id must be 1..128 characters of [A-Za-z0-9._:-]")
        if not request.input.strip():
            raise invalid_argument("input is empty: send the question or instruction for the agent")
        if len(request.input) > s.max_input_chars:
            raise invalid_argument(
                f"input has {len(request.input)} characters; the limit is {s.max_input_chars}"
            )
        if request.max_steps > s.max_steps_limit:
            raise invalid_argument(f"max_steps must be 1..{s.max_steps_limit} (0 = {s.default_max_steps})")
        if request.top_k > s.max_top_k:
            raise invalid_argument(f"top_k must be 0..{s.max_top_k}")
        if request.collection and not _COLLECTION.match(request.collection):
            raise invalid_argument("collection must match ^[A-Za-z_][A-Za-z0-9_]{0,254}$")
        if len(set(request.tools)) != len(request.tools):
            raise invalid_argument("tools lists a name more than once")
        return TurnLimits(
            max_steps=request.max_steps or s.default_max_steps,
            top_k=request.top_k or s.default_top_k,
            memory_token_budget=s.memory_token_budget,
            tool_parallelism=s.tool_parallelism,
            llm_timeout_s=s.llm_timeout_s,
            tool_timeout_s=s.tool_timeout_s,
            call_timeout_s=s.call_timeout_s,
        )

    async def _allowed_tools(self, request: agent_pb2.RunRequest) -> list[common_pb2.ToolDefinition]:
        """The tools this run may offer the model; INVALID_ARGUMENT for names that do not exist."""
        registered = await self._list_tools()
        if not request.tools:
            return registered
        by_name = {tool.name: tool for tool in registered}
        unknown = [name for name in request.tools if name not in by_name]
        if unknown:
            raise invalid_argument(
                f"unknown tool(s) {', '.join(repr(n) for n in unknown)}; available: {', '.join(sorted(by_name))}"
            )
        return [by_name[name] for name in request.tools]

    async def _list_tools(self) -> list[common_pb2.ToolDefinition]:
        async with self._tools_lock:
            if time.monotonic() - self._tools_at > self.settings.tools_cache_s:
                try:
                    reply = await self.downstream.tools.ListTools(
                        tools_pb2.ListToolsRequest(),
                        metadata=outgoing_metadata(),
                        timeout=downstream_timeout(self.settings.call_timeout_s, 0.05),
                    )
                except grpc.aio.AioRpcError as err:
                    raise from_downstream("tools", err) from err
                self._tools, self._tools_at = list(reply.tools), time.monotonic()
            return self._tools


class OrchestratorService(Service):
    kind = "orchestrator"

    def __init__(self, settings: OrchestratorSettings, mesh: MeshSettings | None = None):
        super().__init__(settings)
        self.downstream = Downstream(mesh, settings.max_message_bytes)
        self.servicer = AgentServicer(settings, self.downstream)

    def register(self, server: grpc.aio.Server) -> None:
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self.servicer, server)

    async def ready(self) -> tuple[bool, str]:
        serving = await asyncio.gather(*(self.downstream.is_serving(name) for name in DEPENDENCIES))
        down = [name for name, ok in zip(DEPENDENCIES, serving, strict=True) if not ok]
        return (not down, f"not serving: {', '.join(down)}" if down else "ok")

    async def stop(self) -> None:
        await self.downstream.close()


def create() -> Service:
    return OrchestratorService(OrchestratorSettings())
