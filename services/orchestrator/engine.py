"""Runs an agent or a workflow from its checkpoint until it finishes or pauses.

:class:`RunExecution` drives the invocations of one run (see ``state.py``) and emits the run's
events through its :class:`~agentmesh.services.orchestrator.store.Journal`:

- an invocation loads the session history (``memory_loaded``) and retrieves context
  (``retrieval``) as its agent's settings say, then makes model calls (``step_started``,
  ``text_delta``...). When the model asks for tools, the calls run concurrently (at most
  ``tool_parallelism`` at once; ``tool_call``, ``tool_progress``, ``tool_result`` as each
  completes) and their results go back to the model. It stops at a final answer (COMPLETED), at
  ``max_steps`` model calls (MAX_STEPS), or when the run's or the agent's budget is spent before
  the next model call (BUDGET_EXHAUSTED). A step's tool calls always run, so the conversation
  never ends on an unanswered call;
- a tool marked ``requires_approval`` does not run until a person decided: the run goes on with
  whatever else can run, then pauses (``interrupt``, then ``final`` with status INTERRUPTED);
- workflows: *sequential* stages each get the run's input and the previous stage's answer (a
  stage that does not complete ends the run with its status); *parallel* branches run at once and
  the aggregator gets every answer; a *supervisor* hands tasks to specialists with
  ``transfer_to_<name>`` tool calls, each specialist's answer being that call's result;
- the run's turn is appended to the session in ONE memory call when it finishes (the messages of
  a single agent's turn; the input and the final answer of a workflow), never for a cancelled or
  failed run; everything memory-related (history, facts, the append) is in the scope of the
  run's user;
- tool calls outlive a replica that dies (``continue_on_disconnect``; the replica taking the run
  over repeats the call with the same idempotency key and receives its result); a cancelled or
  failed run stops the calls it left running (``CancelToolCall``).

A checkpoint is taken when an invocation starts, after each model call and after each step's
tool calls, at a pause and at the end. The run waits only for those that precede side effects or
end it (the first one, the one after a model call that asked for tools — before the tools run —,
a pause, the end); the others are snapshots written with the next write (``checkpoint_behind``).
:class:`RunManager` owns the runs this replica executes: one task per run, a lease renewed by a
heartbeat (which also picks up CancelRun requests), and the local subscribers of each run's
events. A subscriber (the caller's stream) holds at most about :data:`SUBSCRIBER_BUFFER` events:
when it is that far behind, the run stops reading its model stream until the subscriber catches
up, so a slow client pauses the generation (through HTTP/2 flow control, back to the provider)
instead of growing this replica's memory. Every event is journalled as before, so followers
(``ResumeRun``) and durability are unaffected; a cancellation interrupts the wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import grpc
from google.protobuf import struct_pb2
from redis.exceptions import RedisError

from agentmesh.agent.v1 import agent_pb2
from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.orchestrator.agents import HANDOFF_PREFIX, AgentSpec, RunDefinition
from agentmesh.services.orchestrator.run import (
    Calls,
    agent_span,
    citations,
    drop_orphan_tool_messages,
    tool_message_content,
    tool_span,
)
from agentmesh.services.orchestrator.state import Invocation, Interrupt, PendingApproval, RunState
from agentmesh.services.orchestrator.store import Journal, LeaseLost, RunKeys, RunStore
from agentmesh.services.runtime.errors import ServiceError

log = logging.getLogger("agentmesh.orchestrator")

PAUSED, DONE = "paused", "done"
Role = agent_pb2.AgentRole
COMPLETED, MAX_STEPS, BUDGET = (
    agent_pb2.RUN_STATUS_COMPLETED,
    agent_pb2.RUN_STATUS_MAX_STEPS,
    agent_pb2.RUN_STATUS_BUDGET_EXHAUSTED,
)
#: Statuses whose turn is appended to the session.
_REMEMBERED = {COMPLETED, MAX_STEPS, BUDGET}
#: Longest rejection reason kept, in characters.
MAX_REASON_CHARS = 1000
#: Largest reviewer-edited arguments of an approved tool call, serialized, in bytes.
MAX_EDITED_ARGUMENTS_BYTES = 64 * 1024
#: Longest wait for the tool service to confirm it stops a cancelled run's tool calls, in seconds.
CANCEL_TOOLS_TIMEOUT_S = 2.0
#: How recalled facts are introduced to the model (a system message after the instructions).
#: Events a run's subscriber may have queued before the run waits for it to read (text deltas
#: are up to a few KiB each, so a slow client costs this replica at most a few MiB per run). A
#: bound, not a tuning point: larger only buffers more, the client's reading speed sets the pace.
SUBSCRIBER_BUFFER = 256
FACTS_HEADER = "What you know about the user from earlier conversations (long-term memory; it may be out of date):"


class _StepClock:
    """Where a step's wall-clock time goes, in seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.model_s = 0.0
        self.tools_s = 0.0

    def event(self, tool_calls: int) -> agent_pb2.StepCompleted:
        total = time.perf_counter() - self.start
        return agent_pb2.StepCompleted(
            duration_ms=total * 1000,
            model_ms=self.model_s * 1000,
            tools_ms=self.tools_s * 1000,
            overhead_ms=max(0.0, total - self.model_s - self.tools_s) * 1000,
            tool_calls=tool_calls,
        )


def handoff_tool(name: str, spec: AgentSpec) -> common_pb2.ToolDefinition:
    """The tool a supervisor calls to hand a task to specialist ``name``."""
    schema = struct_pb2.Struct()
    schema.update(
        {
            "type": "object",
            "properties": {
                "task": {
                    "type": "string",
                    "description": "The task for the specialist, with everything it needs to know.",
                }
            },
            "required": ["task"],
            "additionalProperties": False,
        }
    )
    about = spec.description or f"the {name} agent"
    return common_pb2.ToolDefinition(
        name=f"{HANDOFF_PREFIX}{name}",
        description=f"Hand a task to the specialist {name!r} ({about}). Returns its answer.",
        parameters_schema=schema,
    )


def tool_key(run_id: str, invocation: str, call_id: str) -> str:
    """The idempotency key of a tool call of a run: the same for every attempt of the call (a
    step repeated after a take-over), different for every other call."""
    digest = hashlib.sha256(f"{invocation}/{call_id}".encode()).hexdigest()[:24]
    return f"agentmesh-run:{run_id}:{digest}"


def _stage_input(task: str, previous: Invocation) -> str:
    return f"{task}\n\n--- Output of the previous stage ({previous.agent}) ---\n{previous.output}"


def _aggregate_input(task: str, branches: list[Invocation]) -> str:
    parts = [task, "", "--- Answers of the parallel agents ---"]
    for b in branches:
        status = agent_pb2.RunStatus.Name(b.status).removeprefix("RUN_STATUS_")
        parts.append(f"### {b.agent} ({status})\n{b.output}")
    return "\n".join(parts)


async def _nothing() -> None:
    """Stands for a fetch that is switched off, in :func:`_all`."""
    return None


async def _all(coros: Iterable[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Run ``coros`` concurrently; the first failure cancels the others and is raised as is."""
    tasks: list[asyncio.Task] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as failures:
        first = failures.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [t.result() for t in tasks]


class RunExecution:
    """Drives one run on this replica (see the module docstring)."""

    def __init__(
        self,
        state: RunState,
        definition: RunDefinition,
        tools: dict[str, common_pb2.ToolDefinition],
        calls: Calls,
        journal: Journal,
        tool_parallelism: int,
        pace: Callable[[], Awaitable[None]] | None = None,
    ):
        self.state = state
        #: Awaited before each read from the model stream: returns once the run's subscribers
        #: have room for more events (back-pressure; see :class:`LocalRun`).
        self.pace = pace
        self.definition = definition
        self.tools = tools
        self.calls = calls
        self.journal = journal
        self.tool_parallelism = tool_parallelism
        self.request = agent_pb2.RunRequest.FromString(state.request)
        self._messages: dict[str, list[common_pb2.Message]] = {}
        self._context: dict[str, list[common_pb2.Chunk]] = {}

    # -- events and checkpoints ----------------------------------------------------------------

    def emit(self, inv: Invocation | None, step: int = 0, **event: Any) -> agent_pb2.RunResponse:
        return self.journal.emit(
            agent_pb2.RunResponse(
                agent=inv.agent if inv else self.state.target,
                invocation_id=inv.id if inv else "",
                step=step,
                **event,
            )
        )

    async def checkpoint(self, release: bool = False) -> None:
        await self.journal.checkpoint(self.state, release=release)

    def checkpoint_behind(self) -> None:
        """A checkpoint the run does not wait for: a snapshot written with the journal's next
        write (at most its flush interval later). Only where losing it (the replica dies before
        it is stored) means repeating work without side effects: memory and retrieval, a model
        call, or tool calls the next take-over repeats with the same idempotency keys (and so
        gets their first results)."""
        self.journal.checkpoint_behind(self.state)

    # -- the run ---------------------------------------------------------------------------------

    async def execute(
        self, *, started: bool = False, resumed: agent_pb2.RunResumed | None = None,
        resolved: agent_pb2.InterruptResolved | None = None,
    ) -> None:
        """Run until the end or a pause; the last checkpoint releases the run's lease."""
        st = self.state
        attributes = {"agentmesh.workflow.type": self.definition.workflow.type} if self.definition.workflow else {}
        with agent_span(st.target, st.session_id, st.run_id, **attributes) as span:
            if started:
                self.emit(
                    None,
                    started=agent_pb2.RunStarted(
                        run_id=st.run_id, session_id=st.session_id, request_id=st.request_id, agent=st.target
                    ),
                )
            if resumed is not None:
                self.emit(None, resumed=resumed)
            if resolved is not None:
                self.emit(None, interrupt_resolved=resolved)
            if started:
                self.checkpoint_behind()  # RunStore.start stored the run already
            else:
                await self.checkpoint()  # the new owner, and decisions, before anything runs
            status = await self._run_target()
            if status is None:
                await self._pause()
            else:
                await self._finish(status)
            span.set_attributes(
                {
                    "agentmesh.run.status": agent_pb2.RunStatus.Name(st.status),
                    "agentmesh.run.steps": st.steps,
                    "gen_ai.usage.input_tokens": st.usage.input_tokens,
                    "gen_ai.usage.output_tokens": st.usage.output_tokens,
                }
            )

    async def _run_target(self) -> int | None:
        """The run's status, or None when it paused."""
        wf, task = self.definition.workflow, self.request.input
        if wf is None:
            inv = self._slot("single", self.definition.target, Role.AGENT_ROLE_SINGLE, task)
            return None if await self._drive(inv) == PAUSED else inv.status
        if wf.type == "sequential":
            previous: Invocation | None = None
            for i, name in enumerate(wf.agents):
                stage = self._slot(
                    f"stage:{i}", name, Role.AGENT_ROLE_STAGE, task if previous is None else _stage_input(task, previous)
                )
                if await self._drive(stage) == PAUSED:
                    return None
                if stage.status != COMPLETED:
                    return stage.status
                previous = stage
            return COMPLETED
        if wf.type == "parallel":
            branches = [self._slot(f"branch:{i}", n, Role.AGENT_ROLE_BRANCH, task) for i, n in enumerate(wf.agents)]
            if PAUSED in await _all(self._drive(b) for b in branches):
                return None
            aggregator = self._slot("aggregator", wf.aggregator, Role.AGENT_ROLE_AGGREGATOR, _aggregate_input(task, branches))
            return None if await self._drive(aggregator) == PAUSED else aggregator.status
        supervisor = self._slot("supervisor", wf.supervisor, Role.AGENT_ROLE_SUPERVISOR, task)
        return None if await self._drive(supervisor) == PAUSED else supervisor.status

    def _slot(self, slot: str, agent: str, role: int, task: str, parent: str = "") -> Invocation:
        """The invocation of a workflow slot, created on first use (a resumed run finds it)."""
        st = self.state
        if slot in st.slots:
            return st.invocations[st.slots[slot]]
        inv = Invocation(id=st.new_invocation_id(agent), agent=agent, parent=parent, role=role, task=task)
        st.invocations[inv.id] = inv
        st.slots[slot] = inv.id
        return inv

    def _final_invocation(self) -> Invocation | None:
        st, wf = self.state, self.definition.workflow
        if wf is None:
            slot = "single"
        elif wf.type == "sequential":
            slot = max((s for s in st.slots if s.startswith("stage:")), key=lambda s: int(s[6:]), default="")
        else:
            slot = "aggregator" if wf.type == "parallel" else "supervisor"
        return st.invocations.get(st.slots.get(slot, ""))

    async def _finish(self, status: int) -> None:
        st = self.state
        inv = self._final_invocation()
        output = inv.output if inv else ""
        remember = self.definition.workflow.memory.enabled if self.definition.workflow else (
            self.definition.agents[self.definition.target].memory.enabled
        )
        if remember and status in _REMEMBERED:
            if self.definition.workflow is None and inv is not None:
                messages = self._conversation(inv)[inv.turn_start:]
            else:
                messages = [
                    common_pb2.Message(role=common_pb2.ROLE_USER, content=self.request.input),
                    common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=output, name=st.target),
                ]
            st.session_version = await self.calls.append_memory(
                st.session_id, st.user_id, messages, idempotency_key=f"agentmesh-run:{st.run_id}"
            )
        st.output, st.status, st.phase = output, status, "finished"
        if status == BUDGET and inv is not None:
            st.error_message = inv.stop_reason
        self.emit(
            None,
            final=agent_pb2.RunCompleted(
                status=status,
                output=output,
                usage=st.usage.proto(),
                citations=citations(output, self._chunks(inv)) if inv else [],
                steps=st.steps,
                session_version=st.session_version,
                cost_usd=st.usage.cost_usd,
            ),
        )
        await self.checkpoint(release=True)

    async def _pause(self) -> None:
        st = self.state
        approvals, pending = [], []
        for inv in st.invocations.values():
            if inv.phase != "tools":
                continue
            spec = self.definition.agents[inv.agent]
            for call in (common_pb2.ToolCall.FromString(b) for b in inv.calls):
                if call.id not in inv.results and call.id not in inv.decisions and spec.approval_required(call.name):
                    pending.append(PendingApproval(invocation=inv.id, tool_call_id=call.id))
                    approvals.append(
                        agent_pb2.ApprovalRequest(invocation_id=inv.id, agent=inv.agent, step=inv.step, tool_call=call)
                    )
        if not pending:  # an invocation paused without a call to decide on: a bug
            raise ServiceError(grpc.StatusCode.INTERNAL, "the run paused with no tool call waiting for approval")
        st.interrupt = Interrupt(id=uuid.uuid4().hex[:20], approvals=pending)
        st.phase, st.status = "interrupted", agent_pb2.RUN_STATUS_INTERRUPTED
        self.emit(None, interrupt=agent_pb2.RunInterrupted(interrupt_id=st.interrupt.id, approvals=approvals))
        inv = self._final_invocation()
        self.emit(
            None,
            final=agent_pb2.RunCompleted(
                status=st.status,
                output=inv.output if inv else "",
                usage=st.usage.proto(),
                steps=st.steps,
                cost_usd=st.usage.cost_usd,
            ),
        )
        await self.checkpoint(release=True)

    async def stop_tools(self) -> None:
        """Stop the tool calls of the current steps that have no result yet (``CancelToolCall``;
        they may run on, detached, after this replica's calls were cancelled or died)."""
        pending = []
        for inv in self.state.invocations.values():
            if inv.phase != "tools":
                continue
            spec = self.definition.agents[inv.agent]
            for call in (common_pb2.ToolCall.FromString(b) for b in inv.calls):
                never_started = spec.approval_required(call.name) and call.id not in inv.decisions
                if call.id not in inv.results and not never_started and not call.name.startswith(HANDOFF_PREFIX):
                    pending.append((call.name, tool_key(self.state.run_id, inv.id, call.id)))
        if pending:
            await asyncio.gather(*(self.calls.cancel_tool(n, k, CANCEL_TOOLS_TIMEOUT_S) for n, k in pending))

    async def finish_cancelled(self, reason: str) -> None:
        """End the run as CANCELLED (``final`` event, checkpoint, lease released), after
        stopping its running tool calls."""
        st = self.state
        await self.stop_tools()
        st.phase, st.status, st.error_message = "finished", agent_pb2.RUN_STATUS_CANCELLED, reason[:MAX_REASON_CHARS]
        st.interrupt = None
        inv = self._final_invocation()
        self.emit(
            None,
            final=agent_pb2.RunCompleted(
                status=st.status,
                output=inv.output if inv else "",
                usage=st.usage.proto(),
                steps=st.steps,
                cost_usd=st.usage.cost_usd,
            ),
        )
        await self.checkpoint(release=True)

    async def finish_failed(self, code: grpc.StatusCode, message: str) -> None:
        """Record the run as FAILED (no ``final`` event: the stream ends with the status), after
        stopping its running tool calls."""
        st = self.state
        await self.stop_tools()
        st.phase, st.status = "finished", agent_pb2.RUN_STATUS_FAILED
        st.error_code, st.error_message = code.name, message
        await self.checkpoint(release=True)

    # -- one invocation --------------------------------------------------------------------------

    async def _drive(self, inv: Invocation) -> str:
        if inv.phase == "done":
            return DONE
        if inv.role == Role.AGENT_ROLE_SINGLE:  # the run's span is the agent's
            return await self._loop(inv)
        with agent_span(
            inv.agent, self.state.session_id, self.state.run_id,
            **{"agentmesh.invocation_id": inv.id, "agentmesh.agent.role": Role.Name(inv.role)},
        ):
            return await self._loop(inv)

    async def _loop(self, inv: Invocation) -> str:
        spec = self.definition.agents[inv.agent]
        if inv.phase == "start":
            await self._start(inv, spec)
            self.checkpoint_behind()
        clock: _StepClock | None = None
        while True:
            if inv.phase == "model":
                if inv.step >= spec.max_steps:
                    return await self._stop(inv, MAX_STEPS)
                if reason := self._budget_spent(inv, spec):
                    inv.stop_reason = reason
                    return await self._stop(inv, BUDGET)
                clock = _StepClock()
                tool_calls = await self._model_step(inv, spec, clock)
                if not tool_calls:
                    inv.phase, inv.status = "done", COMPLETED
                    self.checkpoint_behind()
                    self.emit(inv, inv.step, step_completed=clock.event(0))
                    self._agent_completed(inv)
                    return DONE
                inv.calls = [c.SerializeToString() for c in tool_calls]
                inv.results, inv.decisions = {}, {}
                inv.phase = "tools"
                # Stored before any tool runs: a take-over then repeats these calls (same ids and
                # idempotency keys), never a model call that could ask for other ones.
                await self.checkpoint()
            if inv.phase == "tools":
                clock = clock or _StepClock()  # resumed in the middle of the step: timed from here
                if await self._tools_step(inv, spec, clock) == PAUSED:
                    return PAUSED
                calls = [common_pb2.ToolCall.FromString(b) for b in inv.calls]
                for call in calls:
                    outcome = agent_pb2.ToolCallCompleted.FromString(inv.results[call.id])
                    self._append(
                        inv,
                        common_pb2.Message(
                            role=common_pb2.ROLE_TOOL,
                            tool_call_id=call.id,
                            name=call.name,
                            content=tool_message_content(outcome),
                        ),
                    )
                inv.calls, inv.results, inv.decisions = [], {}, {}
                inv.phase = "model"
                self.checkpoint_behind()  # goes with the next write, during the next model call
                self.emit(inv, inv.step, step_completed=clock.event(len(calls)))
                clock = None

    async def _stop(self, inv: Invocation, status: int) -> str:
        inv.phase, inv.status = "done", status
        self._agent_completed(inv)
        self.checkpoint_behind()
        return DONE

    def _agent_completed(self, inv: Invocation) -> None:
        if inv.role == Role.AGENT_ROLE_SINGLE:
            return  # `final` says it all
        self.emit(
            inv,
            inv.step,
            agent_completed=agent_pb2.AgentCompleted(
                agent=inv.agent,
                invocation_id=inv.id,
                status=inv.status,
                output=inv.output,
                usage=inv.usage.proto(),
                cost_usd=inv.usage.cost_usd,
                steps=inv.step,
            ),
        )

    def _budget_spent(self, inv: Invocation, spec: AgentSpec) -> str:
        st = self.state
        run = self.definition.budget.exhausted(st.usage.total_tokens, st.usage.cost_usd)
        if run:
            return f"run budget: {run}"
        own = spec.budget.exhausted(inv.usage.total_tokens, inv.usage.cost_usd)
        return f"{inv.agent} budget: {own}" if own else ""

    async def _start(self, inv: Invocation, spec: AgentSpec) -> None:
        """Instructions, session history and retrieved context, then the input."""
        if inv.role != Role.AGENT_ROLE_SINGLE:
            self.emit(
                inv,
                agent_started=agent_pb2.AgentStarted(
                    agent=inv.agent, invocation_id=inv.id, parent_invocation_id=inv.parent, role=inv.role, input=inv.task
                ),
            )
        messages: list[common_pb2.Message] = []
        if spec.instructions:
            messages.append(common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=spec.instructions))
        # Facts, history and retrieval do not depend on each other: fetch them concurrently (the
        # search would otherwise wait for the memory hop), then emit in the documented order.
        # A specialist searches for its task; the others for the run's question.
        query = inv.task if inv.role in (Role.AGENT_ROLE_SINGLE, Role.AGENT_ROLE_SPECIALIST) else self.request.input
        facts, history, found = await _all((
            self.calls.recall_facts(
                self.state.user_id, inv.task, spec.memory.facts.top_k, spec.memory.facts.min_similarity
            ) if spec.memory.facts.enabled else _nothing(),
            self.calls.load_memory(self.state.session_id, self.state.user_id, spec.memory.token_budget, model=spec.model)
            if spec.memory.enabled else _nothing(),
            self.calls.retrieve(spec.retrieval.collection, query, spec.retrieval.top_k)
            if spec.retrieval.enabled else _nothing(),
        ))
        loaded = agent_pb2.MemoryLoaded()
        if facts is not None:
            loaded.facts, loaded.notice = len(facts.facts), facts.notice
            if facts.facts:
                lines = "\n".join(f"- {f.fact.text}" for f in facts.facts)
                messages.append(common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=f"{FACTS_HEADER}\n{lines}"))
        if history is not None:
            loaded.messages, loaded.tokens = len(history.messages), history.tokens_used
            loaded.messages_omitted = history.messages_omitted
            messages.extend(drop_orphan_tool_messages(list(history.messages)))
        if spec.memory.enabled or spec.memory.facts.enabled:
            self.emit(inv, memory_loaded=loaded)
        chunks: list[common_pb2.Chunk] = found if found is not None else []
        if spec.retrieval.enabled:
            self.emit(inv, retrieval=agent_pb2.RetrievalCompleted(chunks=chunks))
        inv.context = [c.SerializeToString() for c in chunks]
        self._context[inv.id] = chunks
        inv.turn_start = len(messages)
        messages.append(common_pb2.Message(role=common_pb2.ROLE_USER, content=inv.task))
        inv.messages = [m.SerializeToString() for m in messages]
        self._messages[inv.id] = messages
        inv.phase = "model"

    def _conversation(self, inv: Invocation) -> list[common_pb2.Message]:
        if inv.id not in self._messages:
            self._messages[inv.id] = [common_pb2.Message.FromString(b) for b in inv.messages]
        return self._messages[inv.id]

    def _chunks(self, inv: Invocation) -> list[common_pb2.Chunk]:
        if inv.id not in self._context:
            self._context[inv.id] = [common_pb2.Chunk.FromString(b) for b in inv.context]
        return self._context[inv.id]

    def _append(self, inv: Invocation, message: common_pb2.Message) -> None:
        self._conversation(inv).append(message)
        inv.messages.append(message.SerializeToString())

    def _offered(self, inv: Invocation, spec: AgentSpec) -> list[common_pb2.ToolDefinition]:
        if spec.all_tools:
            offered = list(self.tools.values())
        else:
            offered = [self.tools[t.name] for t in spec.tools if t.name in self.tools]
        wf = self.definition.workflow
        if inv.role == Role.AGENT_ROLE_SUPERVISOR and wf is not None and wf.type == "supervisor":
            offered += [handoff_tool(n, self.definition.agents[n]) for n in dict.fromkeys(wf.specialists)]
        return offered

    async def _model_step(self, inv: Invocation, spec: AgentSpec, clock: _StepClock) -> list[common_pb2.ToolCall]:
        inv.step += 1
        self.state.steps += 1
        step = inv.step
        options = llm_pb2.GenerationOptions(max_tokens=spec.max_tokens)
        if spec.temperature is not None:
            options.temperature = spec.temperature
        request = llm_pb2.StreamGenerateRequest(
            model=spec.model,
            messages=self._conversation(inv),
            tools=self._offered(inv, spec),
            context=self._chunks(inv),
            options=options,
        )

        def on_metadata(md: llm_pb2.ResponseMetadata) -> None:
            self.emit(
                inv,
                step,
                step_started=agent_pb2.StepStarted(
                    step=step, provider=md.provider, model=md.model, is_llm=md.is_llm, notice=md.notice
                ),
            )

        def on_text(text: str) -> None:
            self.emit(inv, step, text_delta=agent_pb2.TextDelta(text=text))

        result = await self.calls.generate(request, step, on_metadata, on_text, pace=self.pace)
        clock.model_s += result.wait_s
        inv.usage.add(result.usage, result.cost_usd)
        self.state.usage.add(result.usage, result.cost_usd)
        inv.output += result.text
        self._append(
            inv, common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=result.text, tool_calls=result.tool_calls)
        )
        return result.tool_calls

    async def _tools_step(self, inv: Invocation, spec: AgentSpec, clock: _StepClock) -> str:
        """Run the step's calls that may run; PAUSED when some still wait for a decision."""
        runnable: list[common_pb2.ToolCall] = []
        waiting = 0
        for call in (common_pb2.ToolCall.FromString(b) for b in inv.calls):
            if call.id in inv.results:
                continue
            if spec.approval_required(call.name):
                decision = inv.decisions.get(call.id)
                if decision is None:
                    waiting += 1
                    continue
                if not decision.approved:
                    reason = f": {decision.reason}" if decision.reason else ""
                    self._record(
                        inv,
                        agent_pb2.ToolCallCompleted(
                            tool_call_id=call.id,
                            name=call.name,
                            is_error=True,
                            error_message=f"a reviewer rejected this call{reason}; it did not run",
                        ),
                    )
                    continue
                if decision.arguments is not None:
                    call = self._edit_call(inv, call, decision.arguments)
            runnable.append(call)
        if runnable:
            for call in runnable:
                if f"handoff:{inv.id}:{call.id}" not in self.state.slots:  # a resumed handoff was announced
                    self.emit(inv, inv.step, tool_call=agent_pb2.ToolCallStarted(tool_call=call))
            semaphore = asyncio.Semaphore(self.tool_parallelism)
            offered = {t.name for t in self._offered(inv, spec)}

            async def run_one(call: common_pb2.ToolCall) -> str:
                async with semaphore:
                    outcome = await self._run_call(inv, call, offered)
                if outcome is None:
                    return PAUSED  # a specialist paused
                self._record(inv, outcome)
                return DONE

            started = time.perf_counter()
            outcomes = await _all(run_one(call) for call in runnable)
            clock.tools_s += time.perf_counter() - started
            if PAUSED in outcomes:
                return PAUSED
        return PAUSED if waiting else DONE

    def _edit_call(self, inv: Invocation, call: common_pb2.ToolCall, arguments: bytes) -> common_pb2.ToolCall:
        """``call`` with a reviewer's ``arguments`` (a serialized Struct), also in the step's
        pending calls and in the assistant message that asked for it, so the model reads the call
        that ran. Applying it again (a take-over repeats the step) changes nothing."""
        edited = common_pb2.ToolCall()
        edited.CopyFrom(call)
        edited.arguments.Clear()
        edited.arguments.MergeFromString(arguments)
        inv.calls = [
            edited.SerializeToString() if common_pb2.ToolCall.FromString(raw).id == call.id else raw for raw in inv.calls
        ]
        conversation = self._conversation(inv)
        for index in range(len(conversation) - 1, -1, -1):
            message = conversation[index]
            asked = [c for c in message.tool_calls if c.id == call.id]
            if message.role == common_pb2.ROLE_ASSISTANT and asked:
                asked[0].arguments.CopyFrom(edited.arguments)
                inv.messages[index] = message.SerializeToString()
                break
        return edited

    def _record(self, inv: Invocation, outcome: agent_pb2.ToolCallCompleted) -> None:
        inv.results[outcome.tool_call_id] = outcome.SerializeToString()
        self.emit(inv, inv.step, tool_result=outcome)

    async def _run_call(
        self, inv: Invocation, call: common_pb2.ToolCall, offered: set[str]
    ) -> agent_pb2.ToolCallCompleted | None:
        if call.name not in offered:
            return agent_pb2.ToolCallCompleted(
                tool_call_id=call.id,
                name=call.name,
                is_error=True,
                error_message=f"unknown tool {call.name!r}; available: {', '.join(sorted(offered)) or 'none'}",
            )
        if (specialist := self.definition.handoff_agent(call.name)) is not None and inv.role == Role.AGENT_ROLE_SUPERVISOR:
            return await self._handoff(inv, call, specialist)
        step = inv.step

        def on_progress(progress: agent_pb2.ToolCallProgress) -> None:
            self.emit(inv, step, tool_progress=progress)

        outcome, chunks = await self.calls.execute_tool(
            call,
            idempotency_key=tool_key(self.state.run_id, inv.id, call.id),
            session_id=self.state.session_id,
            user_id=self.state.user_id,
            on_progress=on_progress,
        )
        if chunks:  # chunks a tool retrieved join the context so the next model call can cite them
            known = {c.chunk_id for c in self._chunks(inv)}
            for chunk in chunks:
                if chunk.chunk_id not in known:
                    self._chunks(inv).append(chunk)
                    inv.context.append(chunk.SerializeToString())
        return outcome

    async def _handoff(
        self, inv: Invocation, call: common_pb2.ToolCall, specialist: str
    ) -> agent_pb2.ToolCallCompleted | None:
        outcome = agent_pb2.ToolCallCompleted(tool_call_id=call.id, name=call.name)
        task = call.arguments.fields["task"].string_value if "task" in call.arguments.fields else ""
        if not task.strip():
            outcome.is_error = True
            outcome.error_message = f"{call.name} needs a non-empty `task` string: what {specialist} should do"
            return outcome
        slot = f"handoff:{inv.id}:{call.id}"
        new = slot not in self.state.slots
        child = self._slot(slot, specialist, Role.AGENT_ROLE_SPECIALIST, task, parent=inv.id)
        if new:
            self.emit(
                inv,
                inv.step,
                handoff=agent_pb2.Handoff(
                    from_agent=inv.agent, from_invocation_id=inv.id, to_agent=specialist,
                    to_invocation_id=child.id, tool_call_id=call.id, task=task,
                ),
            )
        started = time.perf_counter()
        with tool_span(call):
            if await self._drive(child) == PAUSED:
                return None
        status = agent_pb2.RunStatus.Name(child.status).removeprefix("RUN_STATUS_")
        outcome.output.struct_value.update({"agent": specialist, "status": status, "output": child.output})
        outcome.duration_ms = int((time.perf_counter() - started) * 1000)
        if child.status != COMPLETED:
            outcome.is_error = True
            why = f": {child.stop_reason}" if child.stop_reason else ""
            outcome.error_message = f"{specialist} stopped before finishing ({status}{why})"
        return outcome


# --- runs on this replica ---------------------------------------------------------------------

_END = object()


class LocalRun:
    """A run executing on this replica: its task, lease keys and local event subscribers.

    Subscriber queues are bounded softly: :meth:`publish` never blocks (events are emitted from
    synchronous code, and the end of a run must always get through), but once a queue holds
    :data:`SUBSCRIBER_BUFFER` events :meth:`wait_for_room` blocks the run's model stream until
    that subscriber has read below the bound or went away. A queue therefore exceeds the bound
    by at most the few events a step emits besides its text (tool calls, results, progress).
    """

    def __init__(self, keys: RunKeys, state: RunState):
        self.keys = keys
        self.state = state
        self.execution: RunExecution | None = None
        self.task: asyncio.Task | None = None
        self.cancel_kind = ""
        self.cancel_reason = ""
        self.closed = asyncio.Event()
        self._queues: list[asyncio.Queue] = []
        #: Set while every subscriber has room (below SUBSCRIBER_BUFFER queued events).
        self._room = asyncio.Event()
        self._room.set()

    @property
    def releasing(self) -> bool:
        """True once the checkpoint that releases the lease is being written (the heartbeat then
        leaves the run alone)."""
        return self.execution is not None and self.execution.journal.releasing

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with contextlib.suppress(ValueError):
            self._queues.remove(queue)
        self.taken()

    def publish(self, item: Any) -> None:
        for queue in self._queues:
            queue.put_nowait(item)
            if queue.qsize() >= SUBSCRIBER_BUFFER:
                self._room.clear()

    def taken(self) -> None:
        """A subscriber read an event (or left): let the run go on once all have room."""
        if not self._room.is_set() and all(q.qsize() < SUBSCRIBER_BUFFER for q in self._queues):
            self._room.set()

    async def wait_for_room(self) -> None:
        """Return once every subscriber holds fewer than SUBSCRIBER_BUFFER events (at once
        when they do; no timeout: a cancellation of the run interrupts it)."""
        await self._room.wait()

    def cancel(self, kind: str, reason: str) -> None:
        """Stop the run: ``client`` (its caller went away), ``request`` (CancelRun), ``draining``
        (this replica shuts down: the run stays resumable), ``lease_lost`` (another replica owns it)."""
        if self.task is None or self.task.done() or self.cancel_kind:
            return
        self.cancel_kind, self.cancel_reason = kind, reason
        self.task.cancel()


class RunManager:
    """The runs this replica executes (see the module docstring)."""

    def __init__(
        self,
        store: RunStore,
        calls: Calls,
        *,
        tool_parallelism: int,
        heartbeat_s: float,
        flush_interval_s: float,
    ):
        self.store = store
        self.calls = calls
        self.tool_parallelism = tool_parallelism
        self.heartbeat_s = heartbeat_s
        self.flush_interval_s = flush_interval_s
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.runs: dict[str, LocalRun] = {}
        self.draining = False
        self._heartbeat: asyncio.Task | None = None

    def start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(), name="orchestrator-heartbeat")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            runs = [r for r in self.runs.values() if not r.releasing and not r.cancel_kind]
            if not runs:
                continue
            try:
                replies = await self.store.heartbeat(self.replica, [r.keys for r in runs])
            except (RedisError, OSError) as exc:
                log.warning("run heartbeat failed", extra={"fields": {"error": str(exc), "runs": len(runs)}})
                continue
            except Exception:  # a bug must not stop the heartbeat (and with it every lease)
                log.exception("run heartbeat failed")
                continue
            for run, (ours, cancel) in zip(runs, replies, strict=True):
                if run.releasing:
                    continue
                if not ours:
                    run.cancel("lease_lost", "another replica took the run over")
                elif cancel is not None:
                    run.cancel("request", cancel)

    async def stream(self, run: LocalRun, queue: asyncio.Queue, cancel_on_disconnect: bool):
        """The events of ``run`` from ``queue`` until it ends; raises its failure as a status.
        When the caller goes away first, the run is cancelled if ``cancel_on_disconnect`` (but
        only left for another replica when this one is shutting down)."""
        finished = False
        try:
            while True:
                item = await queue.get()
                run.taken()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, ServiceError):
                    finished = True
                    raise item
                yield item
        finally:
            run.unsubscribe(queue)
            if not finished and (cancel_on_disconnect or self.draining):
                if self.draining:
                    run.cancel("draining", "the orchestrator is shutting down")
                else:
                    run.cancel("client", "the client went away")

    def prepare(self, state: RunState, definition: RunDefinition, tools: dict[str, common_pb2.ToolDefinition],
                sequence: int) -> tuple[LocalRun, asyncio.Queue]:
        """A run ready to :meth:`launch`, with one subscriber queue (subscribed before any event)."""
        keys = self.store.keys(state.tenant, state.run_id)
        state.replica = self.replica
        run = LocalRun(keys, state)
        journal = Journal(self.store, keys, self.replica, sequence, self.flush_interval_s, on_event=run.publish)
        run.execution = RunExecution(
            state, definition, tools, self.calls, journal, self.tool_parallelism, pace=run.wait_for_room
        )
        return run, run.subscribe()

    def launch(self, run: LocalRun, **execute: Any) -> None:
        key = run.keys.state
        self.runs[key] = run
        run.task = asyncio.create_task(self._guard(run, execute), name=f"run:{run.state.run_id}")

    async def _guard(self, run: LocalRun, execute: dict[str, Any]) -> None:
        execution = run.execution
        assert execution is not None
        outcome: Any = ServiceError(grpc.StatusCode.UNAVAILABLE, "the run stopped unexpectedly; resume it with ResumeRun")
        try:
            await execution.execute(**execute)
            outcome = _END
        except asyncio.CancelledError:
            outcome = await asyncio.shield(self._cancelled(run))
        except LeaseLost:
            outcome = ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"run {run.state.run_id} was taken over by another replica; follow it with ResumeRun",
            )
        except ServiceError as exc:
            outcome = exc
            await asyncio.shield(self._failed(run, exc.code, exc.message))
        except Exception as exc:  # noqa: BLE001 - a bug: record it, answer INTERNAL
            log.exception("run failed", extra={"fields": {"run_id": run.state.run_id}})
            outcome = ServiceError(grpc.StatusCode.INTERNAL, f"the orchestrator failed running this run: {exc!r}")
            await asyncio.shield(self._failed(run, grpc.StatusCode.INTERNAL, str(exc)))
        finally:
            execution.journal.close()
            self.runs.pop(run.keys.state, None)
            run.closed.set()
            run.publish(outcome)

    async def _cancelled(self, run: LocalRun) -> Any:
        execution = run.execution
        assert execution is not None
        kind = run.cancel_kind or ("draining" if self.draining else "client")
        try:
            if kind in ("client", "request"):
                await execution.finish_cancelled(run.cancel_reason or "cancelled")
                log.info("run cancelled", extra={"fields": {"run_id": run.state.run_id, "reason": run.cancel_reason}})
                return _END
            if kind == "draining":
                # Store what was emitted and let another replica take over from the checkpoint.
                await execution.journal.flush()
                await self.store.release(run.keys, self.replica)
                return ServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the orchestrator is shutting down; continue run {run.state.run_id} with ResumeRun",
                )
        except (LeaseLost, ServiceError) as exc:
            log.warning("could not record the end of a run", extra={"fields": {"run_id": run.state.run_id, "error": str(exc)}})
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"run {run.state.run_id} was taken over by another replica; follow it with ResumeRun",
        )

    async def _failed(self, run: LocalRun, code: grpc.StatusCode, message: str) -> None:
        execution = run.execution
        assert execution is not None
        try:
            await execution.finish_failed(code, message)
        except (LeaseLost, ServiceError) as exc:
            log.warning("could not record a failed run", extra={"fields": {"run_id": run.state.run_id, "error": str(exc)}})

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop every local run, leaving each resumable elsewhere; stop the heartbeat."""
        self.draining = True
        runs = list(self.runs.values())
        for run in runs:
            run.cancel("draining", "the orchestrator is shutting down")
        if runs:
            await asyncio.wait([asyncio.ensure_future(r.closed.wait()) for r in runs], timeout=timeout_s)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
