"""What the sync and the async client share: stubs, per-call metadata and deadlines."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.client.config import REQUEST_ID_HEADER, CallKind, ClientConfig
from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.retrieval.v1 import retrieval_pb2_grpc
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc


class Stubs:
    """The generated stubs of every AgentMesh service, on one channel to the gateway. For methods
    the client does not wrap, call them with ``**client.call_options()`` and turn errors into typed
    ones with :func:`~agentmesh.client.error_from_rpc`."""

    def __init__(self, channel: Any) -> None:
        self.agent = agent_pb2_grpc.AgentServiceStub(channel)
        self.memory = memory_pb2_grpc.MemoryServiceStub(channel)
        self.retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        self.llm = llm_pb2_grpc.LLMServiceStub(channel)
        self.tools = tools_pb2_grpc.ToolServiceStub(channel)


@dataclass(frozen=True)
class IngestProgress:
    """Progress of an ingestion upload, reported after each document has been handed to gRPC.

    Attributes:
        documents_sent: documents sent so far.
        bytes_sent: serialized size of the messages sent so far, in bytes.
    """

    documents_sent: int
    bytes_sent: int


def new_request_id() -> str:
    """A fresh ``x-request-id`` (32 hex characters); the gateway keeps a client's own id."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class CallInfo:
    """One call's ``x-request-id`` and deadline (a ``time.monotonic()`` value; None for none)."""

    request_id: str
    deadline: float | None


class CallSettings:
    """Deadline and metadata of each call, from one :class:`ClientConfig`."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._metadata = config.metadata()

    def timeout(self, kind: CallKind, override: float | None) -> float | None:
        if override is not None:
            if not override > 0:
                raise ValueError(f"timeout must be a positive number of seconds, got {override!r}")
            return override
        return self.config.timeouts.for_kind(kind)

    def prepare(self, kind: CallKind, timeout: float | None) -> tuple[dict[str, Any], CallInfo]:
        """The ``timeout`` and ``metadata`` keyword arguments of one call, and what errors need."""
        seconds = self.timeout(kind, timeout)
        info = CallInfo(new_request_id(), None if seconds is None else time.monotonic() + seconds)
        return {"timeout": seconds, "metadata": (*self._metadata, (REQUEST_ID_HEADER, info.request_id))}, info


def fact_input(fact: str | memory_pb2.FactInput) -> memory_pb2.FactInput:
    """A ``FactInput`` as given, or a plain string as a ``FACT_KIND_FACT`` without sources."""
    return memory_pb2.FactInput(text=fact, kind=memory_pb2.FACT_KIND_FACT) if isinstance(fact, str) else fact


def recall_request(
    user_id: str, query: str, top_k: int, min_similarity: float | None, recency_weight: float | None,
    min_score: float | None,
) -> memory_pb2.RecallFactsRequest:
    """A RecallFactsRequest; the optional fields left unset (service defaults) when None."""
    request = memory_pb2.RecallFactsRequest(user_id=user_id, query=query, top_k=top_k)
    for field, value in (("min_similarity", min_similarity), ("recency_weight", recency_weight), ("min_score", min_score)):
        if value is not None:
            setattr(request, field, value)
    return request


def execute_tool_request(
    name: str, arguments: Mapping[str, Any] | None, idempotency_key: str, session_id: str, user_id: str
) -> tools_pb2.ExecuteToolRequest:
    """An ExecuteToolRequest with ``arguments`` as its Struct."""
    request = tools_pb2.ExecuteToolRequest(name=name, idempotency_key=idempotency_key, session_id=session_id,
                                           user_id=user_id)
    request.arguments.update(dict(arguments or {}))
    return request


def retention_request(
    session_id: str, ttl_s: int | None, keep_last_messages: int | None, user_id: str
) -> memory_pb2.SetRetentionRequest:
    """A SetRetentionRequest; a bound left unset (kept as it is) when None."""
    request = memory_pb2.SetRetentionRequest(session_id=session_id, user_id=user_id)
    if ttl_s is not None:
        request.ttl_s = ttl_s
    if keep_last_messages is not None:
        request.keep_last_messages = keep_last_messages
    return request


def run_event(item: Any) -> agent_pb2.RunResponse:
    # ResumeRunResponse / ResolveInterruptResponse wrap the run's own event.
    return item.event


def llm_request(
    kind: Any,
    messages: Sequence[common_pb2.Message],
    model: str,
    tools: Sequence[common_pb2.ToolDefinition],
    context: Sequence[common_pb2.Chunk],
    max_tokens: int,
    temperature: float | None,
    routing: llm_pb2.RoutingOptions | None,
) -> Any:
    options = llm_pb2.GenerationOptions(max_tokens=max_tokens)
    if temperature is not None:
        options.temperature = temperature
    return kind(
        model=model, messages=list(messages), tools=list(tools), context=list(context), options=options, routing=routing
    )
