"""The blocking client: :class:`Client`, on a ``grpc`` channel to the gateway.

Every method sends the configured credential and tenant, a fresh ``x-request-id`` and the
configured deadline of its kind (or its own ``timeout=``, in seconds), and raises
:class:`~agentmesh.client.AgentMeshError` (the subclass of the status code) on failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from agentmesh.agent.v1 import agent_pb2
from agentmesh.client._base import (
    CallInfo,
    CallSettings,
    IngestProgress,
    Stubs,
    execute_tool_request,
    fact_input,
    llm_request,
    new_request_id,
    recall_request,
    retention_request,
    run_event,
)
from agentmesh.client.config import CallKind, ClientConfig
from agentmesh.client.errors import UnavailableError, error_from_rpc
from agentmesh.client.streams import RunStream, Stream
from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.tools.v1 import tools_pb2


class _Resource:
    def __init__(self, stubs: Stubs, settings: CallSettings) -> None:
        self._stubs = stubs
        self._settings = settings

    def _unary(self, method: Any, request: Any, timeout: float | None, kind: CallKind = "unary") -> Any:
        kwargs, info = self._settings.prepare(kind, timeout)
        try:
            return method(request, **kwargs)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, info.request_id, info.deadline) from exc

    def _stream(self, method: Any, request: Any, timeout: float | None, kind: CallKind) -> tuple[Any, CallInfo]:
        kwargs, info = self._settings.prepare(kind, timeout)
        return method(request, **kwargs), info


class Agent(_Resource):
    """Agent runs (``agentmesh.agent.v1.AgentService``)."""

    def run(
        self,
        input: str,  # noqa: A002 - the proto field's name
        *,
        session_id: str,
        user_id: str = "",
        agent: str = "",
        model: str = "",
        tools: Sequence[str] = (),
        max_steps: int = 0,
        max_tokens: int = 0,
        collection: str = "",
        top_k: int = 0,
        disable_retrieval: bool = False,
        on_disconnect: agent_pb2.OnDisconnect = agent_pb2.ON_DISCONNECT_UNSPECIFIED,
        timeout: float | None = None,
    ) -> RunStream:
        """Start an agent turn and stream its events (``RunResponse``: ``started`` first, ``final``
        last; text arrives as ``text_delta`` events).

        Args:
            input: the question or instruction, 1..16384 characters.
            session_id: session whose memory the turn reads and extends, 1..128 characters of
                ``[A-Za-z0-9._:-]``.
            user_id: the user the run acts for, within the tenant: the session, the long-term
                facts and the tools' memory are that user's ("" = the caller's authenticated
                subject, or the tenant's default user).
            agent: a named agent or workflow (see :meth:`list_agents`); then leave ``model``,
                ``tools``, ``max_steps``, ``max_tokens``, ``collection``, ``top_k`` and
                ``disable_retrieval`` unset.
            model: model alias for the LLM router ("" = router default).
            tools: tool names the agent may call (empty = all).
            max_steps: model calls in this turn, 1..16 (0 = orchestrator default).
            max_tokens: completion tokens per model call (0 = router default).
            collection, top_k, disable_retrieval: retrieval grounding (top_k 0..20, 0 = default).
            on_disconnect: ``ON_DISCONNECT_CONTINUE`` keeps the run going when this stream breaks,
                so :meth:`RunStream.resume` can follow it; the default cancels it.
            timeout: deadline of the whole stream in seconds (default ``Timeouts.run_s``).

        Returns:
            A :class:`RunStream`; iterate it, or call ``.result()`` for the ``final`` event.
            The call is never retried automatically: a broken stream is resumed with
            ``stream.resume()`` (ResumeRun from the last event seen).

        Raises (while iterating):
            InvalidArgumentError (empty input, bad session id, conflicting fields), NotFoundError
            (unknown agent), DeadlineExceededError, UnavailableError, UnauthenticatedError,
            PermissionDeniedError, ResourceExhaustedError (gateway rate limit)...
        """
        request = agent_pb2.RunRequest(
            session_id=session_id, input=input, agent=agent, model=model, tools=list(tools), max_steps=max_steps,
            max_tokens=max_tokens, collection=collection, top_k=top_k, disable_retrieval=disable_retrieval,
            on_disconnect=on_disconnect, user_id=user_id,
        )
        call, info = self._stream(self._stubs.agent.Run, request, timeout, "run")
        return RunStream(call, info, self._resume_from)

    def _resume_from(self, run_id: str, after_sequence: int, timeout: float | None) -> RunStream:
        return self.resume(run_id, after_sequence, timeout=timeout)

    def resume(self, run_id: str, after_sequence: int = 0, *, timeout: float | None = None) -> RunStream:
        """Follow a run from the event after ``after_sequence`` (0 = replay from the first stored
        event): stored events first, then new ones until ``final``. If the replica running it
        is gone, another takes it over (a ``resumed`` event says so).

        Raises (while iterating): NotFoundError (unknown run, or another tenant's),
        OutOfRangeError (events after ``after_sequence`` no longer stored), the status the run
        failed with, DeadlineExceededError.
        """
        request = agent_pb2.ResumeRunRequest(run_id=run_id, after_sequence=after_sequence)
        call, info = self._stream(self._stubs.agent.ResumeRun, request, timeout, "run")
        return RunStream(
            call, info, self._resume_from, unwrap=run_event, run_id=run_id, after_sequence=after_sequence
        )

    def resolve_interrupt(
        self,
        run_id: str,
        interrupt_id: str,
        decisions: Sequence[agent_pb2.ToolCallDecision],
        *,
        timeout: float | None = None,
    ) -> RunStream:
        """Approve or reject the tool calls a paused run waits for (one decision per pending call,
        from ``stream.interrupt.approvals``) and stream the run on from there. A decision that
        approves may set ``arguments`` (a Struct): the call runs with them instead of the model's.

        Raises (while iterating): NotFoundError, InvalidArgumentError (a decision missing,
        unknown or given twice), FailedPreconditionError (the run does not wait for this
        interrupt).
        """
        request = agent_pb2.ResolveInterruptRequest(run_id=run_id, interrupt_id=interrupt_id, decisions=list(decisions))
        call, info = self._stream(self._stubs.agent.ResolveInterrupt, request, timeout, "run")
        return RunStream(call, info, self._resume_from, unwrap=run_event, run_id=run_id)

    def cancel(self, run_id: str, *, reason: str = "", timeout: float | None = None) -> agent_pb2.RunInfo:
        """Stop a run wherever it runs (its stream ends with ``final`` status CANCELLED).
        ``reason``: at most 1000 characters. Raises NotFoundError, FailedPreconditionError
        (already finished). Not retried (a second cancel of a stopped run is refused)."""
        request = agent_pb2.CancelRunRequest(run_id=run_id, reason=reason)
        return self._unary(self._stubs.agent.CancelRun, request, timeout).run

    def get(self, run_id: str, *, timeout: float | None = None) -> agent_pb2.RunInfo:
        """A run as its last checkpoint describes it (phase, status, usage, pending approvals,
        ``last_sequence``). Raises NotFoundError, InvalidArgumentError (malformed id)."""
        return self._unary(self._stubs.agent.GetRun, agent_pb2.GetRunRequest(run_id=run_id), timeout).run

    def list_agents(self, *, timeout: float | None = None) -> list[agent_pb2.AgentInfo]:
        """The agents and workflows ``run(agent=...)`` accepts."""
        return list(self._unary(self._stubs.agent.ListAgents, agent_pb2.ListAgentsRequest(), timeout).agents)


class Sessions(_Resource):
    """Session memory (``agentmesh.memory.v1.MemoryService``), scoped to the caller's tenant.
    ``user_id`` "" means the user ``default`` everywhere."""

    def append(
        self,
        session_id: str,
        messages: Sequence[common_pb2.Message],
        *,
        user_id: str = "",
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> memory_pb2.AppendMessagesResponse:
        """Append 1..256 messages (oldest first) atomically. Without ``idempotency_key`` a random
        one is sent, so gRPC's retry on UNAVAILABLE can never append twice (a repeated key
        returns the first call's response with ``replayed`` set).

        Returns ``version`` (pass it as ``min_version`` to read your own write),
        ``first_sequence`` and ``message_ids``. Raises InvalidArgumentError,
        FailedPreconditionError (a key reused with other messages), UnavailableError.
        """
        request = memory_pb2.AppendMessagesRequest(
            session_id=session_id, messages=list(messages), user_id=user_id,
            idempotency_key=idempotency_key or new_request_id(),
        )
        return self._unary(self._stubs.memory.AppendMessages, request, timeout)

    def context(
        self,
        session_id: str,
        *,
        token_budget: int = 0,
        min_version: int = 0,
        user_id: str = "",
        timeout: float | None = None,
    ) -> memory_pb2.GetContextResponse:
        """The session's messages that fit ``token_budget`` tokens (0 = service default): pinned
        system messages, the running summary, then the most recent messages, oldest first.
        ``min_version``: read at least this version (from :meth:`append`), waiting briefly;
        FailedPreconditionError when the session does not reach it."""
        request = memory_pb2.GetContextRequest(
            session_id=session_id, token_budget=token_budget, min_version=min_version, user_id=user_id
        )
        return self._unary(self._stubs.memory.GetContext, request, timeout)

    def messages(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        to_sequence: int = 0,
        limit: int = 0,
        min_version: int = 0,
        user_id: str = "",
        timeout: float | None = None,
    ) -> memory_pb2.ListMessagesResponse:
        """Stored messages by sequence range, inclusive (0 = oldest / newest), at most ``limit``
        (0 = 100, max 1000); continue from ``next_sequence``."""
        request = memory_pb2.ListMessagesRequest(
            session_id=session_id, from_sequence=from_sequence, to_sequence=to_sequence, limit=limit,
            min_version=min_version, user_id=user_id,
        )
        return self._unary(self._stubs.memory.ListMessages, request, timeout)

    def watch(
        self,
        session_id: str,
        *,
        after_sequence: int | None = None,
        user_id: str = "",
        timeout: float | None = None,
    ) -> Stream[memory_pb2.WatchSessionResponse]:
        """Stream the session's messages as they are appended: ``started`` first, then each
        ``message`` exactly once in sequence order, ``deleted`` (and the end) if the session is
        deleted. ``after_sequence``: first deliver stored messages above it (resuming a watch).
        No deadline by default (``Timeouts.watch_s``); leave the ``with`` block or call
        ``cancel()`` to stop."""
        request = memory_pb2.WatchSessionRequest(session_id=session_id, user_id=user_id)
        if after_sequence is not None:
            request.after_sequence = after_sequence
        call, info = self._stream(self._stubs.memory.WatchSession, request, timeout, "watch")
        return Stream(call, info)

    def get(self, session_id: str, *, user_id: str = "", timeout: float | None = None) -> memory_pb2.GetSessionResponse:
        """Describe a session: ``exists``, version, stored range, summary, pinned, retention."""
        request = memory_pb2.GetSessionRequest(session_id=session_id, user_id=user_id)
        return self._unary(self._stubs.memory.GetSession, request, timeout)

    def delete(
        self, session_id: str, *, keep_facts: bool = False, user_id: str = "", timeout: float | None = None
    ) -> memory_pb2.DeleteSessionResponse:
        """Delete a session (and, unless ``keep_facts``, the facts extracted from it).
        ``existed`` is False when nothing was stored."""
        request = memory_pb2.DeleteSessionRequest(session_id=session_id, user_id=user_id, keep_facts=keep_facts)
        return self._unary(self._stubs.memory.DeleteSession, request, timeout)

    def set_pinned(
        self, session_id: str, messages: Sequence[common_pb2.Message], *, user_id: str = "", timeout: float | None = None
    ) -> memory_pb2.SetPinnedMessagesResponse:
        """Replace the session's pinned messages (system role; an empty list unpins all): they
        come first in every :meth:`context` and are never summarized or trimmed. Returns
        ``pinned_tokens``, what they take from every context budget. Raises InvalidArgumentError
        (a role other than system, or pinned messages over the service's token limit)."""
        request = memory_pb2.SetPinnedMessagesRequest(session_id=session_id, user_id=user_id, messages=list(messages))
        return self._unary(self._stubs.memory.SetPinnedMessages, request, timeout)

    def compact(
        self, session_id: str, *, user_id: str = "", timeout: float | None = None
    ) -> memory_pb2.CompactSessionResponse:
        """Fold older messages into the running summary now, through the LLM router (the stored
        messages are kept; the newest ~1,000 tokens stay out of the summary). ``compacted`` is
        False when the session is empty or nothing was old enough. Deadline of kind ``generate``
        (model calls). Raises AbortedError (another compaction of the session is running),
        UnavailableError (Redis or the router failed; what was summarized before stays)."""
        request = memory_pb2.CompactSessionRequest(session_id=session_id, user_id=user_id)
        return self._unary(self._stubs.memory.CompactSession, request, timeout, "generate")

    def set_retention(
        self,
        session_id: str,
        *,
        ttl_s: int | None = None,
        keep_last_messages: int | None = None,
        user_id: str = "",
        timeout: float | None = None,
    ) -> memory_pb2.SetRetentionResponse:
        """Set how long the session lives after its last write (``ttl_s``, seconds; 0 = for
        ever) and how many of its newest messages it keeps (``keep_last_messages``; 0 = all);
        None leaves a bound as it is. Returns the retention in force and ``messages_deleted``
        (older messages deleted at once, summarized or not). Behind an authenticating gateway it
        needs the ``admin`` role (PermissionDeniedError)."""
        request = retention_request(session_id, ttl_s, keep_last_messages, user_id)
        return self._unary(self._stubs.memory.SetRetention, request, timeout)


class Facts(_Resource):
    """Long-term memory of a user: facts and preferences stored with embeddings
    (``agentmesh.memory.v1.MemoryService``), scoped to the caller's tenant. ``user_id`` "" means
    the user ``default``."""

    def remember(
        self, user_id: str, facts: Sequence[str | memory_pb2.FactInput], *, timeout: float | None = None
    ) -> list[memory_pb2.RememberedFact]:
        """Store facts (a plain string is a ``FACT_KIND_FACT`` without sources). One result per
        fact, in order: ``outcome`` CREATED, EXACT_DUPLICATE or MERGED (a near duplicate; then
        ``similarity``) with the ``fact_id`` kept. Raises InvalidArgumentError (empty or too long
        text, too many facts), UnavailableError."""
        request = memory_pb2.RememberFactsRequest(user_id=user_id, facts=[fact_input(f) for f in facts])
        return list(self._unary(self._stubs.memory.RememberFacts, request, timeout).results)

    def recall(
        self,
        user_id: str,
        query: str,
        *,
        top_k: int = 0,
        min_similarity: float | None = None,
        recency_weight: float | None = None,
        min_score: float | None = None,
        timeout: float | None = None,
    ) -> list[memory_pb2.RecalledFact]:
        """The user's facts most related to ``query``, best first: cosine ``similarity`` blended
        with ``recency`` by ``recency_weight`` into ``score`` (unset fields: the service's
        defaults; ``top_k`` 0 = 5)."""
        request = recall_request(user_id, query, top_k, min_similarity, recency_weight, min_score)
        return list(self._unary(self._stubs.memory.RecallFacts, request, timeout).facts)

    def delete(self, user_id: str, fact_ids: Sequence[str], *, timeout: float | None = None) -> int:
        """Delete facts by id; returns how many existed."""
        request = memory_pb2.DeleteFactsRequest(user_id=user_id, fact_ids=list(fact_ids))
        return self._unary(self._stubs.memory.DeleteFacts, request, timeout).facts_deleted

    def forget_user(self, user_id: str, *, timeout: float | None = None) -> memory_pb2.ForgetUserResponse:
        """Delete every session and fact of the user (the right to be forgotten). Behind an
        authenticating gateway it needs the ``admin`` role (PermissionDeniedError)."""
        return self._unary(self._stubs.memory.ForgetUser, memory_pb2.ForgetUserRequest(user_id=user_id), timeout)

    def list(  # noqa: A003 - last in the class: the name shadows the builtin only below it
        self, user_id: str, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> memory_pb2.ListFactsResponse:
        """A page of the user's facts, most recently updated first; continue with
        ``next_page_token`` until it is empty."""
        request = memory_pb2.ListFactsRequest(user_id=user_id, page_size=page_size, page_token=page_token)
        return self._unary(self._stubs.memory.ListFacts, request, timeout)


class Tools(_Resource):
    """Tool execution (``agentmesh.tools.v1.ToolService``): the registry and direct calls."""

    def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str = "",
        session_id: str = "",
        user_id: str = "",
        timeout: float | None = None,
    ) -> Stream[tools_pb2.ExecuteToolResponse]:
        """Run tool ``name`` with JSON ``arguments`` (checked against its schema): ``progress``
        events while it runs, then one ``result``. With ``idempotency_key`` a repeated call returns
        the first result without running again, and :meth:`cancel` can stop it. Raises
        NotFoundError (unknown tool), InvalidArgumentError (arguments), ResourceExhaustedError
        (the tool's concurrency limit), DeadlineExceededError."""
        request = execute_tool_request(name, arguments, idempotency_key, session_id, user_id)
        call, info = self._stream(self._stubs.tools.ExecuteTool, request, timeout, "tool")
        return Stream(call, info)

    def cancel(self, name: str, idempotency_key: str, *, timeout: float | None = None) -> tools_pb2.CancelToolCallResponse:
        """Cancel the running call of ``name`` made with ``idempotency_key`` (its processes are
        killed); NotFoundError when no such call runs."""
        request = tools_pb2.CancelToolCallRequest(name=name, idempotency_key=idempotency_key)
        return self._unary(self._stubs.tools.CancelToolCall, request, timeout)

    def list(self, *, timeout: float | None = None) -> tools_pb2.ListToolsResponse:  # noqa: A003
        """Every tool: ``tools`` (name, description, JSON Schema of the arguments, ready for any
        provider) and ``details`` (origin, limits, approval)."""
        return self._unary(self._stubs.tools.ListTools, tools_pb2.ListToolsRequest(), timeout)


class Documents(_Resource):
    """Ingestion and search (``agentmesh.retrieval.v1.RetrievalService``), scoped to the caller's
    tenant. Behind an authenticating gateway ingestion needs the ``admin`` role."""

    def ingest(
        self,
        documents: Iterable[retrieval_pb2.Document],
        *,
        collection: str = "",
        on_progress: Callable[[IngestProgress], None] | None = None,
        timeout: float | None = None,
    ) -> retrieval_pb2.IngestDocumentsResponse:
        """Upload documents on one client stream (read lazily, so a large corpus is never held in
        memory), then wait until they are chunked, embedded and searchable.

        Args:
            documents: each at most 4 MiB serialized; re-sending an unchanged document is a no-op.
            collection: "" = the default collection.
            on_progress: called after each document was handed to gRPC (from gRPC's sending
                thread), with the running counts.
            timeout: deadline in seconds (default ``Timeouts.ingest_s``).

        Returns the counts (``documents_written``, ``documents_unchanged``, ``chunks_written``...)
        and one ``DocumentResult`` per document. Never retried automatically (re-sending is safe:
        unchanged documents are skipped). Raises InvalidArgumentError, ResourceExhaustedError
        (a message over the limit), PermissionDeniedError (no ``admin`` role); an exception raised
        by ``documents`` or ``on_progress`` is re-raised as is.
        """
        failure: list[BaseException] = []
        kwargs, info = self._settings.prepare("ingest", timeout)
        requests = _ingest_requests(documents, collection, on_progress, failure)
        try:
            return self._stubs.retrieval.IngestDocuments(requests, **kwargs)
        except grpc.RpcError as exc:
            if failure:
                raise failure[0] from exc
            raise error_from_rpc(exc, info.request_id, info.deadline) from exc

    def search(
        self,
        query: str,
        *,
        collection: str = "",
        top_k: int = 0,
        mode: retrieval_pb2.SearchMode = retrieval_pb2.SEARCH_MODE_UNSPECIFIED,
        filters: Sequence[retrieval_pb2.FilterCondition] = (),
        min_score: float = 0.0,
        fusion: retrieval_pb2.FusionMethod = retrieval_pb2.FUSION_METHOD_UNSPECIFIED,
        dense_weight: float | None = None,
        rrf_k: int = 0,
        candidates: int = 0,
        mmr: retrieval_pb2.MmrOptions | None = None,
        rerank: bool = False,
        timeout: float | None = None,
    ) -> retrieval_pb2.SearchResponse:
        """The chunks most relevant to ``query`` (1..8192 characters), best first.

        ``top_k`` 1..100 (0 = 5); ``mode`` dense, sparse (BM25) or hybrid (the default);
        ``filters`` (all must hold, at most 16); ``min_score`` in the unit of the final score;
        ``fusion``/``dense_weight``/``rrf_k`` tune hybrid fusion; ``candidates`` the depth of each
        ranking; ``mmr`` diversifies; ``rerank`` uses the service's reranker. Idempotent: retried
        on UNAVAILABLE. Raises InvalidArgumentError, NotFoundError (unknown collection),
        FailedPreconditionError (``rerank`` without a configured reranker).
        """
        request = retrieval_pb2.SearchRequest(
            collection=collection, query=query, top_k=top_k, mode=mode, filters=list(filters), min_score=min_score,
            fusion=fusion, rrf_k=rrf_k, candidates=candidates, mmr=mmr, rerank=rerank,
        )
        if dense_weight is not None:
            request.dense_weight = dense_weight
        return self._unary(self._stubs.retrieval.Search, request, timeout)

    def delete(
        self,
        document_ids: Sequence[str] = (),
        *,
        collection: str = "",
        filters: Sequence[retrieval_pb2.FilterCondition] = (),
        timeout: float | None = None,
    ) -> retrieval_pb2.DeleteDocumentsResponse:
        """Delete documents (all their chunks) chosen by id and/or by ``filters``; returns
        ``documents_deleted`` and ``chunks_deleted``. Raises InvalidArgumentError (neither ids
        nor filters), NotFoundError (unknown collection), PermissionDeniedError (no ``admin``)."""
        request = retrieval_pb2.DeleteDocumentsRequest(
            collection=collection, document_ids=list(document_ids), filters=list(filters)
        )
        return self._unary(self._stubs.retrieval.DeleteDocuments, request, timeout)

    def create_collection(
        self, collection: str, *, chunking: retrieval_pb2.ChunkingConfig | None = None, timeout: float | None = None
    ) -> retrieval_pb2.CreateCollectionResponse:
        """Create a collection with its own chunking settings (None = service defaults).
        Creating it again with the same settings returns ``created`` False; other settings raise
        AlreadyExistsError. Needs the ``admin`` role behind an authenticating gateway."""
        request = retrieval_pb2.CreateCollectionRequest(collection=collection, chunking=chunking)
        return self._unary(self._stubs.retrieval.CreateCollection, request, timeout)

    def describe_collection(self, collection: str = "", *, timeout: float | None = None) -> retrieval_pb2.CollectionInfo:
        """A collection's settings and the caller's tenant's document and chunk counts in it.
        Raises NotFoundError. Idempotent: retried on UNAVAILABLE."""
        request = retrieval_pb2.DescribeCollectionRequest(collection=collection)
        return self._unary(self._stubs.retrieval.DescribeCollection, request, timeout).collection

    def drop_collection(self, collection: str, *, timeout: float | None = None) -> retrieval_pb2.DropCollectionResponse:
        """Delete every document of the caller's tenant in ``collection``; the collection itself
        goes once no tenant has chunks in it (``collection_removed``). Raises NotFoundError,
        PermissionDeniedError (no ``admin`` role)."""
        request = retrieval_pb2.DropCollectionRequest(collection=collection)
        return self._unary(self._stubs.retrieval.DropCollection, request, timeout)


class LLM(_Resource):
    """Direct LLM completions through the router (``agentmesh.llm.v1.LLMService``), without an agent."""

    def stream(
        self,
        messages: Sequence[common_pb2.Message],
        *,
        model: str = "",
        tools: Sequence[common_pb2.ToolDefinition] = (),
        context: Sequence[common_pb2.Chunk] = (),
        max_tokens: int = 0,
        temperature: float | None = None,
        routing: llm_pb2.RoutingOptions | None = None,
        timeout: float | None = None,
    ) -> Stream[llm_pb2.StreamGenerateResponse]:
        """Stream a completion: ``metadata`` first, then ``text_delta`` / ``tool_call_delta`` /
        ``citation`` events, ``usage``, and ``finish`` (reason, usage, cost in USD). A failure
        after the first delta sends ``interrupted`` (partial usage) and ends with its status.
        ``max_tokens`` 0 = router default; ``temperature`` 0..2, None = provider default;
        ``context``: grounding chunks, cited as [1]..[n]. Never retried automatically.
        Raises InvalidArgumentError, ResourceExhaustedError (rate limit or budget, with
        ``retry_delay_s``), UnavailableError, DeadlineExceededError."""
        request = llm_request(
            llm_pb2.StreamGenerateRequest, messages, model, tools, context, max_tokens, temperature, routing
        )
        call, info = self._stream(self._stubs.llm.StreamGenerate, request, timeout, "generate")
        return Stream(call, info)

    def generate(
        self,
        messages: Sequence[common_pb2.Message],
        *,
        model: str = "",
        tools: Sequence[common_pb2.ToolDefinition] = (),
        context: Sequence[common_pb2.Chunk] = (),
        max_tokens: int = 0,
        temperature: float | None = None,
        routing: llm_pb2.RoutingOptions | None = None,
        timeout: float | None = None,
    ) -> llm_pb2.GenerateResponse:
        """The whole completion at once (see :meth:`stream` for the arguments and errors)."""
        request = llm_request(
            llm_pb2.GenerateRequest, messages, model, tools, context, max_tokens, temperature, routing
        )
        return self._unary(self._stubs.llm.Generate, request, timeout, "generate")

    def count_tokens(
        self,
        messages: Sequence[common_pb2.Message],
        *,
        model: str = "",
        tools: Sequence[common_pb2.ToolDefinition] = (),
        context: Sequence[common_pb2.Chunk] = (),
        deployment: str = "",
        timeout: float | None = None,
    ) -> llm_pb2.CountTokensResponse:
        """Input tokens the request would use on the deployment it would be routed to first (or
        ``deployment``): exact with tiktoken for OpenAI-family models without tools,
        ``approximate`` otherwise; also the tokenizer and the context window. Raises
        InvalidArgumentError, NotFoundError (unknown model or deployment)."""
        request = llm_pb2.CountTokensRequest(
            model=model, messages=list(messages), tools=list(tools), context=list(context), deployment=deployment
        )
        return self._unary(self._stubs.llm.CountTokens, request, timeout)

    def list_models(self, *, timeout: float | None = None) -> list[llm_pb2.Model]:
        """The model aliases with their deployments, routing strategy, fallbacks, limits, prices
        and circuit-breaker state."""
        return list(self._unary(self._stubs.llm.ListModels, llm_pb2.ListModelsRequest(), timeout).models)

    def spend(self, *, timeout: float | None = None) -> list[llm_pb2.Spend]:
        """The caller's spend in USD in the current budget period: its tenant first, then its API
        key when the gateway identified one; each with its budget (0 = none) and ``held_usd``,
        the worst-case cost of calls in flight."""
        return list(self._unary(self._stubs.llm.GetSpend, llm_pb2.GetSpendRequest(), timeout).spends)


class Client:
    """Blocking AgentMesh client over one gRPC channel to the gateway.

    >>> with Client(ClientConfig(address="127.0.0.1:8080", api_key="amk_...")) as client:
    ...     for event in client.agent.run("How do I parse JSON?", session_id="demo"):
    ...         print(event.text_delta.text, end="")

    Attributes:
        agent: runs (:class:`Agent`); sessions: memory (:class:`Sessions`); documents: ingestion
        and search (:class:`Documents`); llm: completions (:class:`LLM`); facts: long-term
        memory (:class:`Facts`); tools: tool calls (:class:`Tools`); stubs: the raw stubs.
    """

    def __init__(self, config: ClientConfig | None = None, *, channel: grpc.Channel | None = None) -> None:
        """``config`` None reads :meth:`ClientConfig.from_env`. ``channel``: use this channel
        instead of opening one (its options then apply, not the config's retry policy)."""
        self.config = config or ClientConfig.from_env()
        if channel is None:
            credentials = self.config.channel_credentials()
            options = self.config.channel_options()
            channel = (
                grpc.insecure_channel(self.config.address, options=options)
                if credentials is None
                else grpc.secure_channel(self.config.address, credentials, options=options)
            )
        self.channel = channel
        self._settings = CallSettings(self.config)
        self.stubs = Stubs(channel)
        self.agent = Agent(self.stubs, self._settings)
        self.sessions = Sessions(self.stubs, self._settings)
        self.documents = Documents(self.stubs, self._settings)
        self.llm = LLM(self.stubs, self._settings)
        self.facts = Facts(self.stubs, self._settings)
        self.tools = Tools(self.stubs, self._settings)

    def call_options(self, kind: CallKind = "unary", timeout: float | None = None) -> dict[str, Any]:
        """``timeout`` and ``metadata`` keyword arguments for a raw stub call (``client.stubs``)."""
        return self._settings.prepare(kind, timeout)[0]

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected; UnavailableError after ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise UnavailableError(
                grpc.StatusCode.UNAVAILABLE, f"no connection to {self.config.address} within {timeout:g} s"
            ) from None

    def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ingest_requests(
    documents: Iterable[retrieval_pb2.Document],
    collection: str,
    on_progress: Callable[[IngestProgress], None] | None,
    failure: list[BaseException],
) -> Iterator[retrieval_pb2.IngestDocumentsRequest]:
    sent = size = 0
    try:
        for document in documents:
            request = retrieval_pb2.IngestDocumentsRequest(collection=collection, document=document)
            yield request
            # Resumed when gRPC asks for the next message: this one has been handed over.
            sent += 1
            size += request.ByteSize()
            if on_progress is not None:
                on_progress(IngestProgress(sent, size))
    except Exception as exc:
        # gRPC would report it as UNKNOWN "Exception iterating requests"; keep it for the caller.
        failure.append(exc)
        raise
