"""The downstream calls of a run, each in its OpenTelemetry span.

:class:`Calls` is what an agent invocation (see ``engine.py``) does to the other services:

- ``MemoryService.GetContext`` (span ``memory load``), ``RecallFacts`` (``memory recall``) and
  ``AppendMessages`` (``memory append``), all in the scope of the run's user;
- ``RetrievalService.Search`` (``retrieval <collection>``);
- ``LLMService.StreamGenerate`` (``chat <model>``): streamed text goes out as it arrives, streamed
  tool-call fragments are reassembled into complete calls;
- ``ToolService.ExecuteTool`` (``execute_tool <name>``): progress goes out as it arrives. Calls
  carry an idempotency key and ``continue_on_disconnect``, so a tool whose orchestrator died keeps
  running and the replica taking the run over receives its result; ``CancelToolCall`` stops them
  when the run itself is cancelled.

Every call carries the request id and tenant (``outgoing_metadata``) and a deadline derived from
the caller's (``downstream_timeout``). A failed call raises the status :func:`from_downstream`
gives it, except a tool's own failure, which becomes an error result the model reads.
Cancelling the calling task cancels the call: the router stops the provider stream; a tool call
is left running until :meth:`Calls.cancel_tool` (the engine sends it for a cancelled run; for
``python`` the tool service then kills the sandbox's processes).

Tracing (OpenTelemetry GenAI semantic conventions): inside the RPC's SERVER span a run is one
``invoke_agent <agent>`` span (``agent_span``), parent of a ``chat`` span per model call, an
``execute_tool`` span per tool call, a ``retrieval`` span and ``memory load`` / ``memory append``
spans; a workflow's agents are ``invoke_agent`` spans of their own below the workflow's, a
specialist's below the supervisor's ``execute_tool transfer_to_<name>``. The SERVER span of each
downstream call (and the downstream service's own spans) nest under them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from opentelemetry import trace

from agentmesh.agent.v1 import agent_pb2
from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.context import downstream_timeout, outgoing_metadata
from agentmesh.services.runtime.errors import from_downstream
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc

log = logging.getLogger("agentmesh.orchestrator")

#: `[n]` citation markers in answer text (the router numbers context chunks [1]..[n]).
_MARKER = re.compile(r"\[(\d{1,3})\]")
_tracer = trace.get_tracer("agentmesh.orchestrator")
#: Statuses of RecallFacts after which a run goes on without facts (they are an enhancement).
_FACTS_OPTIONAL = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED)
#: Longest RecallFacts query, in characters (the memory service's limit).
MAX_FACTS_QUERY_CHARS = 8192
_STUBS = {
    "llm": llm_pb2_grpc.LLMServiceStub,
    "retrieval": retrieval_pb2_grpc.RetrievalServiceStub,
    "memory": memory_pb2_grpc.MemoryServiceStub,
    "tools": tools_pb2_grpc.ToolServiceStub,
}


@dataclass
class CallLimits:
    """Deadlines of downstream calls, in seconds (each also bounded by the caller's deadline)."""

    llm_timeout_s: float
    tool_timeout_s: float
    call_timeout_s: float
    #: Seconds kept back from each downstream deadline so a failure reaches our caller in time.
    reserve_s: float = 0.05


@dataclass
class ModelResult:
    """What one model call produced."""

    text: str = ""
    tool_calls: list[common_pb2.ToolCall] = field(default_factory=list)
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    cost_usd: float = 0.0
    #: Seconds spent waiting for the stream's next item (the model's time, router included).
    wait_s: float = 0.0


@dataclass
class _ToolCallAccumulator:
    """Reassembles one streamed tool call from its ``ToolCallDelta`` fragments."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


def agent_span(agent: str, session_id: str, run_id: str, **attributes):
    """The ``invoke_agent <agent>`` span of a run or of one agent of a workflow."""
    attrs = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": agent,
        "gen_ai.conversation.id": session_id,
        "agentmesh.run_id": run_id,
        **attributes,
    }
    return _tracer.start_as_current_span(f"invoke_agent {agent}", attributes=attrs)


def tool_span(call: common_pb2.ToolCall):
    attributes = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": call.name,
        "gen_ai.tool.call.id": call.id,
        "gen_ai.tool.type": "function",
    }
    return _tracer.start_as_current_span(f"execute_tool {call.name}", attributes=attributes)


@dataclass
class FactsResult:
    """Facts recalled for an agent's context, or why none could be (``notice``)."""

    facts: list[memory_pb2.RecalledFact] = field(default_factory=list)
    notice: str = ""


class Calls:
    """The downstream calls of runs (stateless: one instance serves every run)."""

    def __init__(self, downstream: Downstream, limits: CallLimits):
        self.downstream = downstream
        self.limits = limits
        #: Stubs by service, with the channel they were made for (a stub per call costs CPU).
        self._stubs: dict[str, tuple[grpc.aio.Channel, Any]] = {}

    def _stub(self, name: str) -> Any:
        channel = self.downstream.channel(name)
        cached = self._stubs.get(name)
        if cached is None or cached[0] is not channel:
            cached = (channel, _STUBS[name](channel))
            self._stubs[name] = cached
        return cached[1]

    def _timeout(self, default_s: float) -> float:
        return downstream_timeout(default_s, self.limits.reserve_s)

    # -- memory and retrieval ------------------------------------------------------------------

    async def load_memory(
        self, session_id: str, user_id: str, token_budget: int, model: str = ""
    ) -> memory_pb2.GetContextResponse:
        """The session's most recent history within ``token_budget`` tokens (0 = the memory
        service's default), counted in the tokens of ``model`` (the agent's model or router
        alias; empty = the memory service's default tokenizer)."""
        attributes = {"gen_ai.conversation.id": session_id}
        with _tracer.start_as_current_span("memory load", attributes=attributes) as span:
            try:
                reply = await self._stub("memory").GetContext(
                    memory_pb2.GetContextRequest(
                        session_id=session_id, user_id=user_id, token_budget=token_budget, model=model
                    ),
                    metadata=outgoing_metadata(),
                    timeout=self._timeout(self.limits.call_timeout_s),
                )
            except grpc.aio.AioRpcError as err:
                raise from_downstream("memory", err) from err
            span.set_attributes(
                {"agentmesh.memory.messages": len(reply.messages), "agentmesh.memory.tokens": reply.tokens_used}
            )
            return reply

    async def recall_facts(self, user_id: str, query: str, top_k: int, min_similarity: float | None) -> FactsResult:
        """The user's ``top_k`` facts most related to ``query``. Facts are optional context: when
        the memory service cannot give them (facts off, its model or Milvus not ready, too slow)
        the result says why and the run goes on; other failures raise their status."""
        with _tracer.start_as_current_span("memory recall", attributes={"agentmesh.facts.top_k": top_k}) as span:
            request = memory_pb2.RecallFactsRequest(user_id=user_id, query=query[:MAX_FACTS_QUERY_CHARS], top_k=top_k)
            if min_similarity is not None:
                request.min_similarity = min_similarity
            try:
                reply = await self._stub("memory").RecallFacts(
                    request, metadata=outgoing_metadata(), timeout=self._timeout(self.limits.call_timeout_s)
                )
            except grpc.aio.AioRpcError as err:
                if err.code() not in _FACTS_OPTIONAL:
                    raise from_downstream("memory", err) from err
                notice = f"facts not recalled: {err.code().name}: {err.details()}"
                span.set_attribute("agentmesh.facts.notice", notice[:256])
                log.warning("facts not recalled", extra={"fields": {"code": err.code().name, "error": err.details()}})
                return FactsResult(notice=notice)
            span.set_attribute("agentmesh.facts", len(reply.facts))
            return FactsResult(facts=list(reply.facts))

    async def retrieve(self, collection: str, query: str, top_k: int) -> list[common_pb2.Chunk]:
        """The ``top_k`` chunks of ``collection`` ("" = the default one) closest to ``query``."""
        name = collection or "default"
        attributes = {
            "gen_ai.operation.name": "retrieval",
            "gen_ai.data_source.id": name,
            "gen_ai.request.top_k": top_k,
        }
        with _tracer.start_as_current_span(f"retrieval {name}", attributes=attributes) as span:
            try:
                reply = await self._stub("retrieval").Search(
                    retrieval_pb2.SearchRequest(collection=collection, query=query, top_k=top_k),
                    metadata=outgoing_metadata(),
                    timeout=self._timeout(self.limits.call_timeout_s),
                )
            except grpc.aio.AioRpcError as err:
                raise from_downstream("retrieval", err) from err
            span.set_attribute("agentmesh.retrieval.chunks", len(reply.chunks))
            return list(reply.chunks)

    async def append_memory(
        self, session_id: str, user_id: str, messages: list[common_pb2.Message], idempotency_key: str
    ) -> int:
        """Append a finished turn in one call (all messages or none); returns the session version.
        ``idempotency_key`` makes a repeat (a run taken over after its owner died between the
        append and its checkpoint) append nothing. With a ``user_id`` the memory service extracts
        the user's facts from the turn in the background."""
        attributes = {"gen_ai.conversation.id": session_id, "agentmesh.memory.messages": len(messages)}
        with _tracer.start_as_current_span("memory append", attributes=attributes):
            try:
                reply = await self._stub("memory").AppendMessages(
                    memory_pb2.AppendMessagesRequest(
                        session_id=session_id, user_id=user_id, messages=messages, idempotency_key=idempotency_key
                    ),
                    metadata=outgoing_metadata(),
                    timeout=self._timeout(self.limits.call_timeout_s),
                )
            except grpc.aio.AioRpcError as err:
                raise from_downstream("memory", err) from err
            return reply.version

    # -- generation ----------------------------------------------------------------------------

    async def generate(
        self,
        request: llm_pb2.StreamGenerateRequest,
        step: int,
        on_metadata: Callable[[llm_pb2.ResponseMetadata], None],
        on_text: Callable[[str], None],
        pace: Callable[[], Awaitable[None]] | None = None,
    ) -> ModelResult:
        """One streamed model call inside a ``chat`` span. ``on_metadata`` gets the router's first
        event, ``on_text`` each text fragment as it arrives; ``pace``, when given, is awaited
        before each read from the stream (back-pressure: while it waits, gRPC flow control stops
        the router, and through it the provider)."""
        model = request.model or "default"
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": request.options.max_tokens,
            "agentmesh.step": step,
        }
        with _tracer.start_as_current_span(f"chat {model}", attributes=attributes) as span:
            result = await self._stream_generation(request, step, span, on_metadata, on_text, pace)
            span.set_attribute("agentmesh.tool_calls", len(result.tool_calls))
            return result

    async def _stream_generation(self, request, step, span, on_metadata, on_text, pace=None) -> ModelResult:
        result = ModelResult()
        text: list[str] = []
        partial: dict[int, _ToolCallAccumulator] = {}
        call = self._stub("llm").StreamGenerate(
            request, metadata=outgoing_metadata(), timeout=self._timeout(self.limits.llm_timeout_s)
        )
        stream = call.__aiter__()
        clock = time.perf_counter
        try:
            while True:
                if pace is not None:
                    await pace()  # not model time: the run waits for its client
                waited = clock()
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    result.wait_s += clock() - waited
                    break
                result.wait_s += clock() - waited
                kind = item.WhichOneof("event")
                if kind == "text_delta":
                    text.append(item.text_delta.text)
                    on_text(item.text_delta.text)
                elif kind == "tool_call_delta":
                    delta = item.tool_call_delta
                    acc = partial.setdefault(delta.index, _ToolCallAccumulator())
                    acc.id = acc.id or delta.id
                    acc.name = acc.name or delta.name
                    acc.arguments.append(delta.arguments_delta)
                elif kind == "metadata":
                    md = item.metadata
                    span.set_attributes({"gen_ai.provider.name": md.provider, "gen_ai.response.model": md.model})
                    on_metadata(md)
                elif kind == "finish":
                    result.usage.CopyFrom(item.finish.usage)
                    result.cost_usd = item.finish.cost_usd
                    span.set_attributes(
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
        result.text = "".join(text)
        result.tool_calls = [complete_tool_call(partial[i], step, i) for i in sorted(partial)]
        return result

    # -- tools ---------------------------------------------------------------------------------

    async def execute_tool(
        self,
        call: common_pb2.ToolCall,
        *,
        idempotency_key: str,
        session_id: str,
        user_id: str,
        on_progress: Callable[[agent_pb2.ToolCallProgress], None],
    ) -> tuple[agent_pb2.ToolCallCompleted, list[common_pb2.Chunk]]:
        """One ExecuteTool stream inside an ``execute_tool`` span (ERROR status for an error
        result): the result and the chunks the tool retrieved (``search_documents``). A failure
        the model caused or can work around (bad arguments, the tool's own error or time-out)
        becomes an error result; UNAVAILABLE and CANCELLED raise. The call asks the tool service
        to ``continue_on_disconnect``: cancelling this coroutine leaves the tool running (stop it
        with :meth:`cancel_tool`)."""
        with tool_span(call) as span:
            outcome, chunks = await self._call_tool(call, idempotency_key, session_id, user_id, on_progress)
            if outcome.is_error:
                span.set_status(trace.StatusCode.ERROR, outcome.error_message[:256])
            if outcome.replayed:
                span.set_attribute("agentmesh.tool.replayed", True)
            return outcome, chunks

    async def cancel_tool(self, name: str, idempotency_key: str, timeout_s: float) -> bool:
        """Stop the tool call running under ``idempotency_key`` (``CancelToolCall``); False when
        none ran or the tool service could not be told (the call then ends at its runtime limit)."""
        try:
            reply = await self._stub("tools").CancelToolCall(
                tools_pb2.CancelToolCallRequest(name=name, idempotency_key=idempotency_key),
                metadata=outgoing_metadata(),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as err:
            log.warning("could not cancel a tool call", extra={"fields": {"tool": name, "error": err.details()}})
            return False
        return reply.cancelled

    async def _call_tool(self, call, idempotency_key, session_id, user_id, on_progress):
        outcome = agent_pb2.ToolCallCompleted(tool_call_id=call.id, name=call.name)
        chunks: list[common_pb2.Chunk] = []
        stream = self._stub("tools").ExecuteTool(
            tools_pb2.ExecuteToolRequest(
                name=call.name,
                arguments=call.arguments,
                tool_call_id=call.id,
                idempotency_key=idempotency_key,
                session_id=session_id,
                user_id=user_id,
                continue_on_disconnect=True,
            ),
            metadata=outgoing_metadata(),
            timeout=self._timeout(self.limits.tool_timeout_s),
        )
        try:
            async for item in stream:
                if item.WhichOneof("event") == "progress":
                    p = item.progress
                    on_progress(
                        agent_pb2.ToolCallProgress(
                            tool_call_id=call.id,
                            message=p.message,
                            fraction=p.fraction if p.HasField("fraction") else None,
                        )
                    )
                else:
                    r = item.result
                    outcome.output.CopyFrom(r.output)
                    outcome.is_error = r.is_error
                    outcome.error_message = r.error_message
                    outcome.duration_ms = r.duration_ms
                    outcome.replayed = r.replayed
                    chunks = list(r.chunks)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise from_downstream("tools", err) from err
            outcome.is_error = True
            outcome.error_message = f"{err.code().name}: {err.details()}"
        finally:
            stream.cancel()  # no-op when finished; the tool goes on (continue_on_disconnect)
        return outcome, chunks


def complete_tool_call(acc: _ToolCallAccumulator, step: int, index: int) -> common_pb2.ToolCall:
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


def tool_message_content(outcome: agent_pb2.ToolCallCompleted) -> str:
    """The tool message text the model reads: the output as JSON, or ``{"error": ...}``."""
    if outcome.is_error:
        payload = {"error": outcome.error_message}
        if outcome.HasField("output"):
            payload["output"] = json_format.MessageToDict(outcome.output)
        return json.dumps(payload, ensure_ascii=False)
    return json.dumps(json_format.MessageToDict(outcome.output), ensure_ascii=False)


def drop_orphan_tool_messages(messages: list[common_pb2.Message]) -> list[common_pb2.Message]:
    """The token budget may cut history between a tool call and its result (also right after the
    pinned messages and the summary); providers reject a tool result whose call they never saw,
    so such tool messages are dropped."""
    called: set[str] = set()
    kept = []
    for m in messages:
        if m.role == common_pb2.ROLE_ASSISTANT:
            called.update(c.id for c in m.tool_calls)
        elif m.role == common_pb2.ROLE_TOOL and m.tool_call_id not in called:
            continue
        kept.append(m)
    return kept


def citations(output: str, chunks: list[common_pb2.Chunk]) -> list[common_pb2.Citation]:
    """Citations for the ``[n]`` markers in ``output`` that point at a context chunk, by n."""
    cited = sorted({int(m) for m in _MARKER.findall(output) if 1 <= int(m) <= len(chunks)})
    return [common_pb2.Citation(index=n, chunk=chunks[n - 1]) for n in cited]
