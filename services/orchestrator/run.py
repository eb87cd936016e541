"""One agent turn: memory → retrieval → generation ⇄ tool calls → memory.

:class:`AgentTurn` drives the turn and yields ``agent.v1.RunResponse`` events as they happen:

1. ``started``; the session history (``MemoryService.GetContext``) → ``memory_loaded``;
2. the question's context chunks (``RetrievalService.Search``) → ``retrieval``;
3. up to ``max_steps`` model calls (``LLMService.StreamGenerate``): each → ``step_started``, then
   its ``text_delta`` events as the router streams them; when the model asks for tool calls they
   run concurrently (``ToolService.ExecuteTool``, at most ``tool_parallelism`` at once) →
   ``tool_call`` / ``tool_progress`` / ``tool_result``, and their results go back to the model;
4. the whole turn (user message, tool calls and results, answer) is appended to memory in ONE
   ``AppendMessages`` call, so a failed turn writes nothing → ``final``.

Every downstream call carries the request id and tenant and a deadline derived from the caller's.
A downstream failure ends the stream with the status :func:`from_downstream` gives it.

Tracing (OpenTelemetry GenAI semantic conventions): inside the RPC's SERVER span the turn is one
``invoke_agent`` span, parent of a ``chat`` span per model call, an ``execute_tool`` span per tool
call, a ``retrieval`` span and ``memory load`` / ``memory append`` spans; the gRPC CLIENT span of
each downstream call (and the downstream service's own spans) nest under them.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format, struct_pb2
from opentelemetry import trace

from agentmesh.agent.v1 import agent_pb2
from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.context import current_request_id, downstream_timeout, outgoing_metadata
from agentmesh.services.runtime.errors import from_downstream
from agentmesh.tools.v1 import tools_pb2

#: `[n]` citation markers in answer text (the router numbers context chunks [1]..[n]).
_MARKER = re.compile(r"\[(\d{1,3})\]")
_tracer = trace.get_tracer("agentmesh.orchestrator")


@dataclass
class TurnLimits:
    """Resolved limits of one turn (request values with defaults applied)."""

    max_steps: int
    top_k: int
    memory_token_budget: int
    tool_parallelism: int
    llm_timeout_s: float
    tool_timeout_s: float
    call_timeout_s: float
    #: Seconds kept back from each downstream deadline so a failure reaches our caller in time.
    reserve_s: float = 0.05


@dataclass
class _ToolCallAccumulator:
    """Reassembles one streamed tool call from its ``ToolCallDelta`` fragments."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class AgentTurn:
    """Runs one ``AgentService.Run`` request; iterate :meth:`events` for the stream."""

    def __init__(
        self,
        request: agent_pb2.RunRequest,
        tools: list[common_pb2.ToolDefinition],
        limits: TurnLimits,
        downstream: Downstream,
    ):
        self.request = request
        self.tools = tools
        self.limits = limits
        self.downstream = downstream
        self.run_id = uuid.uuid4().hex
        self._sequence = 0
        self.usage = common_pb2.Usage()
        self.context_chunks: list[common_pb2.Chunk] = []
        self.output: list[str] = []

    def _event(self, **kwargs) -> agent_pb2.RunResponse:
        self._sequence += 1
        return agent_pb2.RunResponse(sequence=self._sequence, **kwargs)

    async def events(self) -> AsyncIterator[agent_pb2.RunResponse]:
        """The turn's events, inside one ``invoke_agent`` span."""
        attributes = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": "agentmesh",
            "gen_ai.conversation.id": self.request.session_id,
            "agentmesh.run_id": self.run_id,
        }
        with _tracer.start_as_current_span("invoke_agent agentmesh", attributes=attributes) as span:
            async for event in self._turn():
                if event.WhichOneof("event") == "final":
                    span.set_attributes(
                        {
                            "agentmesh.run.status": agent_pb2.RunStatus.Name(event.final.status),
                            "agentmesh.run.steps": event.final.steps,
                            "gen_ai.usage.input_tokens": event.final.usage.input_tokens,
                            "gen_ai.usage.output_tokens": event.final.usage.output_tokens,
                        }
                    )
                yield event

    async def _turn(self) -> AsyncIterator[agent_pb2.RunResponse]:
        req = self.request
        yield self._event(
            started=agent_pb2.RunStarted(
                run_id=self.run_id, session_id=req.session_id, request_id=current_request_id()
            )
        )

        history = await self._load_memory()
        yield self._event(
            memory_loaded=agent_pb2.MemoryLoaded(
                messages=len(history.messages), tokens=history.tokens_used, messages_omitted=history.messages_omitted
            )
        )

        if not req.disable_retrieval and self.limits.top_k > 0:
            self.context_chunks = await self._retrieve()
            yield self._event(retrieval=agent_pb2.RetrievalCompleted(chunks=self.context_chunks))

        user = common_pb2.Message(role=common_pb2.ROLE_USER, content=req.input)
        conversation = _drop_orphan_tool_messages(list(history.messages)) + [user]
        new_messages = [user]  # what this turn appends to memory
        status = agent_pb2.RUN_STATUS_MAX_STEPS
        steps = 0
        while steps < self.limits.max_steps:
            steps += 1
            tool_calls: list[common_pb2.ToolCall] = []
            step_text: list[str] = []
            async for event in self._generate(steps, conversation, step_text, tool_calls):
                yield event
            assistant = common_pb2.Message(
                role=common_pb2.ROLE_ASSISTANT, content="".join(step_text), tool_calls=tool_calls
            )
            conversation.append(assistant)
            new_messages.append(assistant)
            if not tool_calls:
                status = agent_pb2.RUN_STATUS_COMPLETED
                break
            results: list[common_pb2.Message] = []
            async for event in self._run_tools(tool_calls, results):
                yield event
            conversation.extend(results)
            new_messages.extend(results)

        output = "".join(self.output)
        version = await self._append_memory(new_messages)
        yield self._event(
            final=agent_pb2.RunCompleted(
                status=status,
                output=output,
                usage=self.usage,
                citations=_citations(output, self.context_chunks),
                steps=steps,
                session_version=version,
            )
        )

    # -- memory and retrieval ------------------------------------------------------------------

    async def _load_memory(self) -> memory_pb2.GetContextResponse:
        attributes = {"gen_ai.conversation.id": self.request.session_id}
        with _tracer.start_as_current_span("memory load", attributes=attributes) as span:
            try:
                reply = await self.downstream.memory.GetContext(
                    memory_pb2.GetContextRequest(
                        session_id=self.request.session_id, token_budget=self.limits.memory_token_budget
                    ),
                    metadata=outgoing_metadata(),
                    timeout=downstream_timeout(self.limits.call_timeout_s, self.limits.reserve_s),
                )
            except grpc.aio.AioRpcError as err:
                raise from_downstream("memory", err) from err
            span.set_attributes(
                {"agentmesh.memory.messages": len(reply.messages), "agentmesh.memory.tokens": reply.tokens_used}
            )
            return reply

    async def _retrieve(self) -> list[common_pb2.Chunk]:
        collection = self.request.collection or "default"
        attributes = {
            "gen_ai.operation.name": "retrieval",
            "gen_ai.data_source.id": collection,
            "gen_ai.request.top_k": self.limits.top_k,
        }
        with _tracer.start_as_current_span(f"retrieval {collection}", attributes=attributes) as span:
            try:
                reply = await self.downstream.retrieval.Search(
                    retrieval_pb2.SearchRequest(
                        collection=self.request.collection, query=self.request.input, top_k=self.limits.top_k
                    ),
                    metadata=outgoing_metadata(),
                    timeout=downstream_timeout(self.limits.call_timeout_s, self.limits.reserve_s),
                )
            except grpc.aio.AioRpcError as err:
                raise from_downstream("retrieval", err) from err
            span.set_attribute("agentmesh.retrieval.chunks", len(reply.chunks))
            return list(reply.chunks)

    async def _append_memory(self, messages: list[common_pb2.Message]) -> int:
        attributes = {"gen_ai.conversation.id": self.request.session_id, "agentmesh.memory.messages": len(messages)}
        with _tracer.start_as_current_span("memory append", attributes=attributes):
            try:
                reply = await self.downstream.memory.AppendMessages(
                    memory_pb2.AppendMessagesRequest(session_id=self.request.session_id, messages=messages),
                    metadata=outgoing_metadata(),
                    timeout=downstream_timeout(self.limits.call_timeout_s, self.limits.reserve_s),
                )
            except grpc.aio.AioRpcError as err:
                raise from_downstream("memory", err) from err
            return reply.version

    # -- generation ----------------------------------------------------------------------------

    async def _generate(
        self,
        step: int,
        conversation: list[common_pb2.Message],
        step_text: list[str],
        tool_calls: list[common_pb2.ToolCall],
    ) -> AsyncIterator[agent_pb2.RunResponse]:
        """One model call inside a ``chat`` span; see :meth:`_stream_generation`."""
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": self.request.model or "default",
            "gen_ai.request.max_tokens": self.request.max_tokens,
            "agentmesh.step": step,
        }
        with _tracer.start_as_current_span(f"chat {self.request.model or 'default'}", attributes=attributes) as span:
            async for event in self._stream_generation(step, conversation, step_text, tool_calls):
                if event.WhichOneof("event") == "step_started":
                    started = event.step_started
                    span.set_attributes(
                        {"gen_ai.provider.name": started.provider, "gen_ai.response.model": started.model}
                    )
                yield event
            span.set_attribute("agentmesh.tool_calls", len(tool_calls))

    async def _stream_generation(
        self,
        step: int,
        conversation: list[common_pb2.Message],
        step_text: list[str],
        tool_calls: list[common_pb2.ToolCall],
    ) -> AsyncIterator[agent_pb2.RunResponse]:
        """Stream one model call; fills ``step_text`` and ``tool_calls`` as side results."""
        request = llm_pb2.StreamGenerateRequest(
            model=self.request.model,
            messages=conversation,
            tools=self.tools,
            context=self.context_chunks,
            options=llm_pb2.GenerationOptions(max_tokens=self.request.max_tokens),
        )
        call = self.downstream.llm.StreamGenerate(
            request,
            metadata=outgoing_metadata(),
            timeout=downstream_timeout(self.limits.llm_timeout_s, self.limits.reserve_s),
        )
        partial: dict[int, _ToolCallAccumulator] = {}
        try:
            async for item in call:
                kind = item.WhichOneof("event")
                if kind == "metadata":
                    md = item.metadata
                    yield self._event(
                        step_started=agent_pb2.StepStarted(
                            step=step, provider=md.provider, model=md.model, is_llm=md.is_llm, notice=md.notice
                        )
                    )
                elif kind == "text_delta":
                    step_text.append(item.text_delta.text)
                    self.output.append(item.text_delta.text)
                    yield self._event(text_delta=agent_pb2.TextDelta(text=item.text_delta.text))
                elif kind == "tool_call_delta":
                    delta = item.tool_call_delta
                    acc = partial.setdefault(delta.index, _ToolCallAccumulator())
                    acc.id = acc.id or delta.id
                    acc.name = acc.name or delta.name
                    acc.arguments.append(delta.arguments_delta)
                elif kind == "finish":
                    _add_usage(self.usage, item.finish.usage)
                    trace.get_current_span().set_attributes(  # the `chat` span of _generate
                        {
                            "gen_ai.usage.input_tokens": item.finish.usage.input_tokens,
                            "gen_ai.usage.output_tokens": item.finish.usage.output_tokens,
                            "gen_ai.response.finish_reasons": [common_pb2.FinishReason.Name(item.finish.reason)],
                        }
                    )
        except grpc.aio.AioRpcError as err:
            raise from_downstream("llm", err) from err
        finally:
            call.cancel()  # no-op when finished; stops the provider stream when we are cancelled
        for index in sorted(partial):
            tool_calls.append(_complete_tool_call(partial[index], step, index))

    # -- tools ---------------------------------------------------------------------------------

    async def _run_tools(
        self, tool_calls: list[common_pb2.ToolCall], results: list[common_pb2.Message]
    ) -> AsyncIterator[agent_pb2.RunResponse]:
        """Run ``tool_calls`` concurrently; stream their progress and each result as it completes;
        fill ``results`` (the tool messages for the model) in call order."""
        for call in tool_calls:
            yield self._event(tool_call=agent_pb2.ToolCallStarted(tool_call=call))
        queue: asyncio.Queue[agent_pb2.RunResponse | None] = asyncio.Queue()
        semaphore = asyncio.Semaphore(self.limits.tool_parallelism)
        outcomes: dict[str, agent_pb2.ToolCallCompleted] = {}

        async def run_one(call: common_pb2.ToolCall) -> None:
            async with semaphore:
                outcomes[call.id] = await self._execute_tool(call, queue)
            await queue.put(self._event(tool_result=outcomes[call.id]))  # as soon as it is known

        tasks = [asyncio.create_task(run_one(call)) for call in tool_calls]
        waiter = asyncio.create_task(_finish_queue(tasks, queue))
        try:
            while (event := await queue.get()) is not None:
                yield event
            await waiter  # re-raises a failure of our own (not a tool's, those are results)
        finally:
            for task in (*tasks, waiter):
                task.cancel()
        for call in tool_calls:
            outcome = outcomes[call.id]
            results.append(
                common_pb2.Message(
                    role=common_pb2.ROLE_TOOL,
                    tool_call_id=call.id,
                    name=call.name,
                    content=_tool_message_content(outcome),
                )
            )

    async def _execute_tool(
        self, call: common_pb2.ToolCall, queue: asyncio.Queue[agent_pb2.RunResponse | None]
    ) -> agent_pb2.ToolCallCompleted:
        """:meth:`_call_tool` inside an ``execute_tool`` span (ERROR status for an error result)."""
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": call.name,
            "gen_ai.tool.call.id": call.id,
            "gen_ai.tool.type": "function",
        }
        with _tracer.start_as_current_span(f"execute_tool {call.name}", attributes=attributes) as span:
            outcome = await self._call_tool(call, queue)
            if outcome.is_error:
                span.set_status(trace.StatusCode.ERROR, outcome.error_message[:256])
            return outcome

    async def _call_tool(
        self, call: common_pb2.ToolCall, queue: asyncio.Queue[agent_pb2.RunResponse | None]
    ) -> agent_pb2.ToolCallCompleted:
        """One ExecuteTool stream. A failure the model caused or can work around (unknown tool,
        bad arguments, the tool's own error or time-out) becomes an error result the model sees."""
        outcome = agent_pb2.ToolCallCompleted(tool_call_id=call.id, name=call.name)
        if call.name not in {tool.name for tool in self.tools}:
            outcome.is_error = True
            outcome.error_message = f"unknown tool {call.name!r}; available: {', '.join(t.name for t in self.tools)}"
            return outcome
        stream = self.downstream.tools.ExecuteTool(
            tools_pb2.ExecuteToolRequest(name=call.name, arguments=call.arguments, tool_call_id=call.id),
            metadata=outgoing_metadata(),
            timeout=downstream_timeout(self.limits.tool_timeout_s, self.limits.reserve_s),
        )
        try:
            async for item in stream:
                if item.WhichOneof("event") == "progress":
                    p = item.progress
                    await queue.put(
                        self._event(
                            tool_progress=agent_pb2.ToolCallProgress(
                                tool_call_id=call.id,
                                message=p.message,
                                fraction=p.fraction if p.HasField("fraction") else None,
                            )
                        )
                    )
                else:
                    r = item.result
                    outcome.output.CopyFrom(r.output)
                    outcome.is_error = r.is_error
                    outcome.error_message = r.error_message
                    outcome.duration_ms = r.duration_ms
                    self._add_context_chunks(r.chunks)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise from_downstream("tools", err) from err
            outcome.is_error = True
            outcome.error_message = f"{err.code().name}: {err.details()}"
        finally:
            stream.cancel()
        return outcome

    def _add_context_chunks(self, chunks) -> None:
        """Chunks a tool retrieved join the context so the next model call can cite them."""
        known = {c.chunk_id for c in self.context_chunks}
        self.context_chunks.extend(c for c in chunks if c.chunk_id not in known)


async def _finish_queue(tasks: list[asyncio.Task], queue: asyncio.Queue) -> None:
    """Close ``queue`` (put None) once every task is done; re-raise the first failure."""
    try:
        await asyncio.gather(*tasks)
    finally:
        await queue.put(None)


def _complete_tool_call(acc: _ToolCallAccumulator, step: int, index: int) -> common_pb2.ToolCall:
    """Parse reassembled argument JSON. Unparseable arguments keep the raw text under
    ``_raw_arguments`` so the tool service rejects them with a message the model can read."""
    text = "".join(acc.arguments).strip() or "{}"
    arguments = struct_pb2.Struct()
    try:
        parsed = json.loads(text)
        if not isinstance(parsed, dict):
            raise ValueError("arguments are not a JSON object")
        arguments.update(parsed)
    except ValueError:
        arguments.update({"_raw_arguments": text[:4096]})
    return common_pb2.ToolCall(id=acc.id or f"call_{step}_{index}", name=acc.name, arguments=arguments)


def _tool_message_content(outcome: agent_pb2.ToolCallCompleted) -> str:
    if outcome.is_error:
        return json.dumps({"error": outcome.error_message})
    return json.dumps(json_format.MessageToDict(outcome.output), ensure_ascii=False)


def _drop_orphan_tool_messages(messages: list[common_pb2.Message]) -> list[common_pb2.Message]:
    """The token budget may cut history between a tool call and its result; providers reject a
    tool result whose call they never saw, so leading tool messages are dropped."""
    while messages and messages[0].role == common_pb2.ROLE_TOOL:
        messages.pop(0)
    return messages


def _add_usage(total: common_pb2.Usage, usage: common_pb2.Usage) -> None:
    total.input_tokens += usage.input_tokens
    total.output_tokens += usage.output_tokens
    total.total_tokens += usage.total_tokens


def _citations(output: str, chunks: list[common_pb2.Chunk]) -> list[common_pb2.Citation]:
    """Citations for the ``[n]`` markers in ``output`` that point at a context chunk, by n."""
    cited = sorted({int(m) for m in _MARKER.findall(output) if 1 <= int(m) <= len(chunks)})
    return [common_pb2.Citation(index=n, chunk=chunks[n - 1]) for n in cited]
