"""The orchestrator: ``AgentService``, the mesh's public entry point behind the gateway.

``Run`` validates the request, resolves what runs (an agent or workflow of the agents YAML, or
one agent built from the request's own fields), records the run in Redis and streams its events
while :class:`~agentmesh.services.orchestrator.engine.RunManager` executes it. The other RPCs
work on runs by id, from any replica: ``ResumeRun`` (replay and follow a run's events; take over
a run whose replica died), ``ResolveInterrupt`` (approve or reject tool calls a paused run waits
for, and continue it), ``CancelRun``, ``GetRun``, ``ListAgents``. Runs are scoped to the
caller's tenant: another tenant's run id is NOT_FOUND.

Readiness follows the dependencies: the orchestrator is SERVING only while its Redis answers and
the LLM router, retrieval, memory and tool services all are, so a gateway or Kubernetes stops
sending it runs it cannot complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import SettingsConfigDict

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.services.orchestrator.agents import (
    ADHOC_AGENT,
    AgentSpec,
    Catalog,
    MemorySpec,
    RetrievalSpec,
    RunDefinition,
    load_catalog,
)
from agentmesh.services.orchestrator.engine import (
    MAX_EDITED_ARGUMENTS_BYTES,
    MAX_REASON_CHARS,
    LocalRun,
    RunExecution,
    RunManager,
)
from agentmesh.services.orchestrator.run import CallLimits, Calls
from agentmesh.services.orchestrator.state import Decision, RunState
from agentmesh.services.orchestrator.store import Journal, LeaseLost, RunKeys, RunStore
from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.context import (
    current_request_id,
    current_subject,
    current_tenant,
    downstream_timeout,
    outgoing_metadata,
)
from agentmesh.services.runtime.errors import ServiceError, from_downstream, invalid_argument, not_found
from agentmesh.services.runtime.redis_pool import RedisPoolSettings
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import MeshSettings, ServiceSettings
from agentmesh.tools.v1 import tools_pb2

log = logging.getLogger("agentmesh.orchestrator")

_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_COLLECTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
#: The memory service's user ids.
_USER_ID = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")
DEPENDENCIES = ("llm", "retrieval", "memory", "tools")
#: RunRequest fields an agent definition decides (they must be unset when `agent` is given).
_AGENT_DECIDES = ("model", "tools", "max_steps", "max_tokens", "collection", "top_k", "disable_retrieval")
_PHASES = {
    "running": agent_pb2.RUN_PHASE_RUNNING,
    "interrupted": agent_pb2.RUN_PHASE_INTERRUPTED,
    "finished": agent_pb2.RUN_PHASE_FINISHED,
}


class OrchestratorSettings(ServiceSettings, RedisPoolSettings):
    """Environment: ``AGENTMESH_ORCHESTRATOR_*`` (the Redis URL also from ``REDIS_URL``, then from
    ``AGENTMESH_MEMORY_REDIS_URL``, which the local runner gives every service)."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_ORCHESTRATOR_", extra="ignore", populate_by_name=True)

    # A run needs several downstream calls and at least one model call: refuse budgets that
    # cannot fit them up front instead of failing half-way.
    min_deadline_ms: int = Field(500, ge=0)
    max_input_chars: int = Field(16_384, ge=1, description="Longest accepted `input`, in characters.")
    default_max_steps: int = Field(4, ge=1, description="Model calls per run when the request says 0.")
    max_steps_limit: int = Field(16, ge=1, description="Largest `max_steps` a request or an agent may ask for.")
    default_top_k: int = Field(4, ge=0, description="Chunks retrieved per run when the request says 0.")
    max_top_k: int = Field(20, ge=1)
    memory_token_budget: int = Field(1500, ge=0, description="Tokens of session history loaded per run.")
    tool_parallelism: int = Field(4, ge=1, description="Tool calls of one step run at once, at most.")
    llm_timeout_s: float = Field(120.0, gt=0, description="Longest model call, in seconds.")
    tool_timeout_s: float = Field(60.0, gt=0, description="Longest tool call, in seconds.")
    call_timeout_s: float = Field(10.0, gt=0, description="Longest memory or retrieval call, in seconds.")
    tools_cache_s: float = Field(30.0, ge=0, description="How long the tool list is cached, in seconds.")
    agents_path: str = Field(
        "", description="Agents/workflows YAML file, or a folder of them; empty = only runs without `agent`."
    )
    # Durable runs.
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices(
            "AGENTMESH_ORCHESTRATOR_REDIS_URL", "REDIS_URL", "AGENTMESH_MEMORY_REDIS_URL", "redis_url"
        ),
        description="Redis holding run checkpoints, event streams and leases.",
    )
    redis_prefix: str = Field("agentmesh:orchestrator", min_length=1, description="Prefix of the run keys.")
    lease_ttl_s: float = Field(
        10.0, ge=0.5, description="A run whose replica stopped renewing its lease this long can be taken over."
    )
    heartbeat_s: float = Field(
        0.5, gt=0, description="How often leases are renewed and CancelRun requests picked up, in seconds."
    )
    run_ttl_s: int = Field(7 * 86_400, ge=60, description="A run's keys expire this long after its last write.")
    max_events_per_run: int = Field(10_000, ge=100, description="Events kept per run (older ones are trimmed).")
    max_runs_per_tenant: int = Field(1_000, ge=1, description="Finished runs kept per tenant (older ones deleted).")
    event_flush_ms: float = Field(
        100.0, gt=0, description="Longest an event (or a background checkpoint) waits before it is written to Redis: "
        "how far a follower on another replica may lag. Lower = fresher followers, more Redis writes per step.",
    )
    follow_poll_ms: int = Field(
        500, ge=10, description="ResumeRun: how long one read waits for new events before the run's lease is checked."
    )
    cancel_wait_s: float = Field(5.0, ge=0, description="How long CancelRun waits for the run to stop, in seconds.")


def _tool_names_used(definition: RunDefinition) -> set[str]:
    return {t.name for spec in definition.agents.values() for t in spec.tools}


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, service: OrchestratorService):
        self.service = service
        self.settings = service.settings
        self.downstream = service.downstream
        self.store = service.store
        self.manager = service.manager
        self._tools: dict[str, common_pb2.ToolDefinition] = {}
        self._tools_at = float("-inf")
        self._tools_lock = asyncio.Lock()

    @property
    def catalog(self) -> Catalog:
        return self.service.catalog

    # -- Run ---------------------------------------------------------------------------------

    async def Run(self, request: agent_pb2.RunRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[agent_pb2.RunResponse]:
        definition, snapshot = await self._resolve(request)
        tools = await self.tools()
        self._check_tools(definition, tools, adhoc=not request.agent)
        now = int(time.time() * 1000)
        on_disconnect = request.on_disconnect or agent_pb2.ON_DISCONNECT_CANCEL
        state = RunState(
            run_id=uuid.uuid4().hex,
            tenant=current_tenant(),
            session_id=request.session_id,
            user_id=run_user(request.user_id),
            request_id=current_request_id(),
            target=definition.target,
            snapshot=snapshot,
            request=request.SerializeToString(),
            on_disconnect=on_disconnect,
            created_at_ms=now,
            updated_at_ms=now,
        )
        keys = self.store.keys(state.tenant, state.run_id)
        if not await self.store.start(keys, self.manager.replica, state):
            raise ServiceError(grpc.StatusCode.ABORTED, "run id collision; retry the call")
        run, queue = self.manager.prepare(state, definition, tools, sequence=0)
        self.manager.launch(run, started=True)
        async for event in self.manager.stream(run, queue, on_disconnect == agent_pb2.ON_DISCONNECT_CANCEL):
            yield event

    async def _resolve(self, request: agent_pb2.RunRequest) -> tuple[RunDefinition, dict]:
        """What the request runs; INVALID_ARGUMENT / NOT_FOUND (ServiceError) when it is off."""
        s = self.settings
        if not _SESSION_ID.match(request.session_id):
            raise invalid_argument("session_id must be 1..128 characters of [A-Za-z0-9._:-]")
        if not request.input.strip():
            raise invalid_argument("input is empty: send the question or instruction for the agent")
        if len(request.input) > s.max_input_chars:
            raise invalid_argument(f"input has {len(request.input)} characters; the limit is {s.max_input_chars}")
        if request.on_disconnect not in agent_pb2.OnDisconnect.values():
            raise invalid_argument(f"on_disconnect {request.on_disconnect} is not an OnDisconnect value")
        if request.user_id and not _USER_ID.match(request.user_id):
            raise invalid_argument(
                "user_id must be 1..128 characters of letters, digits, '.', '_', ':', '@', '+' or '-' "
                "(or empty: the caller's subject, else the default user)"
            )
        if request.agent:
            set_fields = [f for f in _AGENT_DECIDES if _is_set(request, f)]
            if set_fields:
                raise invalid_argument(
                    f"agent {request.agent!r} decides {', '.join(set_fields)}: leave these fields unset "
                    "(change the agent's YAML definition instead)"
                )
            if request.agent not in self.catalog.agents and request.agent not in self.catalog.workflows:
                known = ", ".join(self.catalog.names()) or "none are defined (AGENTMESH_ORCHESTRATOR_AGENTS_PATH)"
                raise not_found(f"unknown agent {request.agent!r}; agents and workflows: {known}")
            snapshot = self.catalog.snapshot(request.agent)
            return RunDefinition.from_snapshot(request.agent, snapshot), snapshot
        if request.max_steps > s.max_steps_limit:
            raise invalid_argument(f"max_steps must be 1..{s.max_steps_limit} (0 = {s.default_max_steps})")
        if request.top_k > s.max_top_k:
            raise invalid_argument(f"top_k must be 0..{s.max_top_k}")
        if request.collection and not _COLLECTION.match(request.collection):
            raise invalid_argument("collection must match ^[A-Za-z_][A-Za-z0-9_]{0,254}$")
        if len(set(request.tools)) != len(request.tools):
            raise invalid_argument("tools lists a name more than once")
        top_k = request.top_k or s.default_top_k
        try:
            spec = AgentSpec(
                name=ADHOC_AGENT,
                model=request.model,
                tools=tuple({"name": n} for n in request.tools),
                all_tools=not request.tools,
                retrieval=RetrievalSpec(
                    enabled=not request.disable_retrieval and top_k > 0,
                    collection=request.collection,
                    top_k=max(1, top_k),
                ),
                memory=MemorySpec(enabled=True, token_budget=s.memory_token_budget),
                max_steps=request.max_steps or s.default_max_steps,
                max_tokens=request.max_tokens,
            )
        except ValidationError as exc:  # a tool name, model or max_tokens the agent model refuses
            problems = "; ".join(
                f"{_request_field(err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors(include_url=False)
            )
            raise invalid_argument(f"the request does not make a valid agent: {problems}") from None
        snapshot = {"workflow": None, "agents": {ADHOC_AGENT: spec.model_dump(mode="json")}}
        return RunDefinition(ADHOC_AGENT, None, {ADHOC_AGENT: spec}), snapshot

    def _check_tools(
        self, definition: RunDefinition, tools: dict[str, common_pb2.ToolDefinition], adhoc: bool
    ) -> None:
        missing = sorted(_tool_names_used(definition) - set(tools))
        if not missing:
            return
        available = ", ".join(sorted(tools)) or "none"
        if adhoc:  # the client named the tools
            raise invalid_argument(f"unknown tool(s) {', '.join(repr(n) for n in missing)}; available: {available}")
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{definition.target!r} uses tool(s) the tool service does not list: {', '.join(missing)} "
            f"(available: {available}); fix the agents YAML or the tool service",
        )

    async def tools(self) -> dict[str, common_pb2.ToolDefinition]:
        """The registered tools by name (ListTools, cached ``tools_cache_s``)."""
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
                self._tools, self._tools_at = {t.name: t for t in reply.tools}, time.monotonic()
            return self._tools

    # -- runs by id ----------------------------------------------------------------------------

    def _keys(self, run_id: str) -> RunKeys:
        if not _RUN_ID.match(run_id):
            raise invalid_argument("run_id must be the 32 hexadecimal characters of a `started` event's run_id")
        return self.store.keys(current_tenant(), run_id)

    async def _load(self, keys: RunKeys, run_id: str) -> RunState:
        state = await self.store.load(keys)
        if state is None:
            raise not_found(f"no run {run_id} (unknown, of another tenant, or expired)")
        return state

    async def ResumeRun(self, request: agent_pb2.ResumeRunRequest, context) -> AsyncIterator[agent_pb2.ResumeRunResponse]:
        keys = self._keys(request.run_id)
        state = await self._load(keys, request.run_id)
        first, _ = await self.store.event_bounds(keys)
        trimmed_to = first - 1 if first else state.sequence
        if trimmed_to > request.after_sequence:
            raise ServiceError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"events {request.after_sequence + 1}..{trimmed_to} of run {request.run_id} are no longer stored (a run "
                f"keeps its last {self.settings.max_events_per_run}); resume after {trimmed_to} or read the result "
                "with GetRun",
            )
        async for event in self._follow(keys, request.after_sequence):
            yield agent_pb2.ResumeRunResponse(event=event)

    async def _follow(self, keys: RunKeys, after: int) -> AsyncIterator[agent_pb2.RunResponse]:
        """Stored events after ``after``, then new ones, until ``final``; takes the run over when
        its replica's lease expired."""
        cursor = after
        block: int | None = None  # the first reads return what is stored at once
        while True:
            batch = await self.store.read_events(keys, cursor, block_ms=block)
            for sequence, event in batch:
                cursor = sequence
                yield event
                if _ends_run(event):
                    return
            if batch:
                continue
            state = await self.store.load(keys)
            if state is None:
                raise not_found("the run expired while it was being followed")
            if state.phase != "running":
                # Paused or over: send what was written with that state, then stop.
                while batch := await self.store.read_events(keys, cursor):
                    for sequence, event in batch:
                        cursor = sequence
                        yield event
                        if _ends_run(event):
                            return
                if state.status == agent_pb2.RUN_STATUS_FAILED:
                    code = getattr(grpc.StatusCode, state.error_code, grpc.StatusCode.UNAVAILABLE)
                    raise ServiceError(code, state.error_message)
                return
            block = self.settings.follow_poll_ms
            if await self.store.acquire(keys, self.manager.replica):  # its replica is gone
                state = await self.store.load(keys)
                if state is None or state.phase != "running":  # it just paused or ended: drain it above
                    await self.store.release(keys, self.manager.replica)
                    block = None
                    continue
                async for event in self._take_over(keys, state, cursor):
                    yield event
                return

    async def _take_over(self, keys: RunKeys, state: RunState, cursor: int) -> AsyncIterator[agent_pb2.RunResponse]:
        """Run ``state`` here from its checkpoint (we hold its lease)."""
        try:
            _, last = await self.store.event_bounds(keys)
            definition = RunDefinition.from_snapshot(state.target, state.snapshot)
            tools = await self.tools()
        except BaseException:
            await self.store.release(keys, self.manager.replica)
            raise
        previous = state.replica
        run, queue = self.manager.prepare(state, definition, tools, sequence=max(last, cursor, state.sequence))
        resumed = agent_pb2.RunResumed(
            replica=self.manager.replica,
            discarded_after_sequence=state.sequence,
            reason=f"replica {previous or '?'} stopped renewing the run's lease",
        )
        log.info("run taken over", extra={"fields": {"run_id": state.run_id, "from": previous}})
        self.manager.launch(run, resumed=resumed)
        async for event in self.manager.stream(run, queue, state.on_disconnect == agent_pb2.ON_DISCONNECT_CANCEL):
            yield event

    async def ResolveInterrupt(
        self, request: agent_pb2.ResolveInterruptRequest, context
    ) -> AsyncIterator[agent_pb2.ResolveInterruptResponse]:
        keys = self._keys(request.run_id)
        state = await self._load(keys, request.run_id)
        decisions = self._decisions(state, request)
        if not await self.store.acquire(keys, self.manager.replica):
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"run {request.run_id} is running; it waits for no decision")
        try:
            state = await self._load(keys, request.run_id)  # under the lease: nobody else resolves it now
            decisions = self._decisions(state, request)
            for (invocation, call_id), decision in decisions.items():
                state.invocations[invocation].decisions[call_id] = decision
            state.phase, state.status, state.interrupt = "running", 0, None
            _, last = await self.store.event_bounds(keys)
            definition = RunDefinition.from_snapshot(state.target, state.snapshot)
            tools = await self.tools()
        except BaseException:
            await self.store.release(keys, self.manager.replica)
            raise
        resolved = agent_pb2.InterruptResolved(interrupt_id=request.interrupt_id, decisions=request.decisions)
        run, queue = self.manager.prepare(state, definition, tools, sequence=max(last, state.sequence))
        self.manager.launch(run, resolved=resolved)
        async for event in self.manager.stream(run, queue, state.on_disconnect == agent_pb2.ON_DISCONNECT_CANCEL):
            yield agent_pb2.ResolveInterruptResponse(event=event)

    def _decisions(
        self, state: RunState, request: agent_pb2.ResolveInterruptRequest
    ) -> dict[tuple[str, str], Decision]:
        """Decisions keyed by (invocation, tool call id); INVALID_ARGUMENT / FAILED_PRECONDITION."""
        if state.phase != "interrupted" or state.interrupt is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {state.run_id} is {state.phase}, not waiting for a decision",
            )
        if request.interrupt_id != state.interrupt.id:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {state.run_id} waits for interrupt {state.interrupt.id}, not {request.interrupt_id!r}",
            )
        pending = [(p.invocation, p.tool_call_id) for p in state.interrupt.approvals]
        out: dict[tuple[str, str], Decision] = {}
        for d in request.decisions:
            matches = [p for p in pending if p[1] == d.tool_call_id and (not d.invocation_id or p[0] == d.invocation_id)]
            if not matches:
                raise invalid_argument(f"tool call {d.tool_call_id!r} does not wait for approval in this interrupt")
            if len(matches) > 1:
                raise invalid_argument(
                    f"tool call id {d.tool_call_id!r} is pending in several agents "
                    f"({', '.join(m[0] for m in matches)}): set invocation_id"
                )
            if matches[0] in out:
                raise invalid_argument(f"tool call {d.tool_call_id!r} has more than one decision")
            if len(d.reason) > MAX_REASON_CHARS:
                raise invalid_argument(f"reason has {len(d.reason)} characters; the limit is {MAX_REASON_CHARS}")
            arguments = None
            if d.HasField("arguments"):
                if not d.approved:
                    raise invalid_argument(
                        f"tool call {d.tool_call_id!r} is rejected: arguments go only with an approval (a rejected call does not run)"
                    )
                arguments = d.arguments.SerializeToString()
                if len(arguments) > MAX_EDITED_ARGUMENTS_BYTES:
                    raise invalid_argument(
                        f"arguments of tool call {d.tool_call_id!r} are {len(arguments)} bytes; the limit is {MAX_EDITED_ARGUMENTS_BYTES}"
                    )
            out[matches[0]] = Decision(approved=d.approved, reason=d.reason, arguments=arguments)
        if missing := [p for p in pending if p not in out]:
            raise invalid_argument(
                "every pending tool call needs a decision; missing: " + ", ".join(f"{c} ({i})" for i, c in missing)
            )
        return out

    async def CancelRun(self, request: agent_pb2.CancelRunRequest, context) -> agent_pb2.CancelRunResponse:
        keys = self._keys(request.run_id)
        state = await self._load(keys, request.run_id)
        if len(request.reason) > MAX_REASON_CHARS:
            raise invalid_argument(f"reason has {len(request.reason)} characters; the limit is {MAX_REASON_CHARS}")
        reason = request.reason or "cancelled with CancelRun"
        if state.phase == "finished":
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {request.run_id} already finished ({agent_pb2.RunStatus.Name(state.status)})",
            )
        local: LocalRun | None = self.manager.runs.get(keys.state)
        if local is not None:
            local.cancel("request", reason)
        elif await self.store.acquire(keys, self.manager.replica):
            await self._cancel_here(keys, request.run_id, reason)  # paused, or its replica is gone
        else:
            await self.store.request_cancel(keys, reason)  # the replica running it stops it
        deadline = time.monotonic() + self.settings.cancel_wait_s
        while (state := await self._load(keys, request.run_id)).phase != "finished" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return agent_pb2.CancelRunResponse(run=await self._info(keys, state))

    async def _cancel_here(self, keys: RunKeys, run_id: str, reason: str) -> None:
        """End a run nobody runs (we hold its lease) as CANCELLED."""
        try:
            state = await self._load(keys, run_id)
            if state.phase == "finished":
                return
            _, last = await self.store.event_bounds(keys)
            journal = Journal(self.store, keys, self.manager.replica, max(last, state.sequence))
            definition = RunDefinition.from_snapshot(state.target, state.snapshot)
            execution = RunExecution(state, definition, {}, self.manager.calls, journal, 1)
            await execution.finish_cancelled(reason)
        except LeaseLost:
            pass
        finally:
            await self.store.release(keys, self.manager.replica)

    async def GetRun(self, request: agent_pb2.GetRunRequest, context) -> agent_pb2.GetRunResponse:
        keys = self._keys(request.run_id)
        return agent_pb2.GetRunResponse(run=await self._info(keys, await self._load(keys, request.run_id)))

    async def _info(self, keys: RunKeys, state: RunState) -> agent_pb2.RunInfo:
        first, last = await self.store.event_bounds(keys)
        info = agent_pb2.RunInfo(
            run_id=state.run_id,
            session_id=state.session_id,
            agent=state.target,
            phase=_PHASES[state.phase],
            status=state.status,
            last_sequence=max(last, state.sequence),
            first_sequence=first,
            steps=state.steps,
            usage=state.usage.proto(),
            cost_usd=state.usage.cost_usd,
            output=state.output,
            created_at_ms=state.created_at_ms,
            updated_at_ms=state.updated_at_ms,
            error_message=state.error_message,
            replica=await self.store.lease_owner(keys) if state.phase == "running" else "",
            user_id=state.user_id,
        )
        if state.interrupt is not None:
            info.interrupt.interrupt_id = state.interrupt.id
            for p in state.interrupt.approvals:
                inv = state.invocations[p.invocation]
                call = next(
                    c for c in (common_pb2.ToolCall.FromString(b) for b in inv.calls) if c.id == p.tool_call_id
                )
                info.interrupt.approvals.add(invocation_id=inv.id, agent=inv.agent, step=inv.step, tool_call=call)
        return info

    async def ListAgents(self, request: agent_pb2.ListAgentsRequest, context) -> agent_pb2.ListAgentsResponse:
        reply = agent_pb2.ListAgentsResponse()
        for name in self.catalog.names():
            if name in self.catalog.agents:
                reply.agents.add(name=name, kind="agent", description=self.catalog.agents[name].description)
            else:
                wf = self.catalog.workflows[name]
                reply.agents.add(name=name, kind=wf.type, description=wf.description, members=list(wf.members))
        return reply


def run_user(requested: str) -> str:
    """The user a new run acts for: ``requested`` (already validated), else the caller's verified
    subject (``x-subject``) — as is when it is a valid user id, else ``sub-`` and 32 hex digits of
    its SHA-256, so any subject maps to one stable user —, else "" (the memory service's
    ``default`` user)."""
    if requested:
        return requested
    subject = current_subject()
    if not subject or _USER_ID.match(subject):
        return subject
    return "sub-" + hashlib.sha256(subject.encode()).hexdigest()[:32]


def _ends_run(event: agent_pb2.RunResponse) -> bool:
    """A `final` event other than a pause (after which a resolved run goes on)."""
    return event.WhichOneof("event") == "final" and event.final.status != agent_pb2.RUN_STATUS_INTERRUPTED


def _request_field(loc: tuple) -> str:
    """The RunRequest field an AgentSpec validation error location stands for (``tools[2]``)."""
    if loc[:1] == ("tools",) and len(loc) > 1 and isinstance(loc[1], int):
        return f"tools[{loc[1]}]"
    return str(loc[0]) if loc else "request"


def _is_set(request: agent_pb2.RunRequest, name: str) -> bool:
    value = getattr(request, name)
    return bool(len(value)) if name == "tools" else bool(value)


class OrchestratorService(Service):
    kind = "orchestrator"
    settings: OrchestratorSettings

    def __init__(self, settings: OrchestratorSettings, mesh: MeshSettings | None = None, catalog: Catalog | None = None):
        super().__init__(settings)
        self.downstream = Downstream(mesh, settings.max_message_bytes)
        self.store = RunStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            lease_ms=int(settings.lease_ttl_s * 1000),
            run_ttl_s=settings.run_ttl_s,
            max_events=settings.max_events_per_run,
            max_runs=settings.max_runs_per_tenant,
            max_connections=settings.redis_max_connections,
            pool_timeout_s=settings.redis_pool_timeout_s,
        )
        calls = Calls(
            self.downstream,
            CallLimits(
                llm_timeout_s=settings.llm_timeout_s,
                tool_timeout_s=settings.tool_timeout_s,
                call_timeout_s=settings.call_timeout_s,
            ),
        )
        self.catalog = catalog or Catalog()
        self._catalog_given = catalog is not None
        self.manager = RunManager(
            self.store,
            calls,
            tool_parallelism=settings.tool_parallelism,
            heartbeat_s=settings.heartbeat_s,
            flush_interval_s=settings.event_flush_ms / 1000,
        )
        self.servicer = AgentServicer(self)

    def register(self, server: grpc.aio.Server) -> None:
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self.servicer, server)
        # The runtime stops the server before calling stop(); runs it cancels then must stay
        # resumable (not end CANCELLED as when a client goes away), so note the shutdown first.
        stop = server.stop

        async def draining_stop(grace: float | None) -> None:
            self.manager.draining = True
            await stop(grace)

        server.stop = draining_stop  # type: ignore[method-assign]

    async def start(self) -> None:
        """Load the agents YAML (an invalid file stops start-up, listing every problem with its
        file and line) and start the lease heartbeat."""
        if self.settings.agents_path and not self._catalog_given:
            self.catalog = load_catalog(self.settings.agents_path, self.settings.max_steps_limit)
            log.info("agents loaded", extra={"fields": {"path": self.settings.agents_path, "names": self.catalog.names()}})
        self.manager.start_heartbeat()

    async def ready(self) -> tuple[bool, str]:
        redis_ok, *serving = await asyncio.gather(
            self.store.ping(), *(self.downstream.is_serving(name) for name in DEPENDENCIES)
        )
        down = [name for name, ok in zip(DEPENDENCIES, serving, strict=True) if not ok]
        if not redis_ok:
            down.insert(0, "redis (run store)")
        return (not down, f"not serving: {', '.join(down)}" if down else "ok")

    async def stop(self) -> None:
        await self.manager.shutdown()
        await self.store.close()
        await self.downstream.close()


def create() -> Service:
    return OrchestratorService(OrchestratorSettings())


