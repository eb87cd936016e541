"""The asyncio client: :class:`AsyncClient`, on a ``grpc.aio`` channel to the gateway.

The same resources, arguments, return types and errors as the blocking
:class:`~agentmesh.client.Client` (see :mod:`agentmesh.client.sync` for each method's full
description); unary methods are coroutines, streams are :class:`AsyncStream` /
:class:`AsyncRunStream` read with ``async for``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
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
from agentmesh.client.streams import AsyncRunStream, AsyncStream
from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.tools.v1 import tools_pb2


class _AsyncResource:
    def __init__(self, stubs: Stubs, settings: CallSettings) -> None:
        self._stubs = stubs
        self._settings = settings

    async def _unary(self, method: Any, request: Any, timeout: float | None, kind: CallKind = "unary") -> Any:
        kwargs, info = self._settings.prepare(kind, timeout)
        try:
            return await method(request, **kwargs)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, info.request_id, info.deadline) from exc

    def _stream(self, method: Any, request: Any, timeout: float | None, kind: CallKind) -> tuple[Any, CallInfo]:
        kwargs, info = self._settings.prepare(kind, timeout)
        return method(request, **kwargs), info


class AsyncAgent(_AsyncResource):
    """Agent runs; see :class:`agentmesh.client.sync.Agent`."""

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
    ) -> AsyncRunStream:
        """Start an agent turn; ``async for event in stream`` (see ``Agent.run``)."""
        request = agent_pb2.RunRequest(
            session_id=session_id, input=input, agent=agent, model=model, tools=list(tools), max_steps=max_steps,
            max_tokens=max_tokens, collection=collection, top_k=top_k, disable_retrieval=disable_retrieval,
            on_disconnect=on_disconnect, user_id=user_id,
        )
        call, info = self._stream(self._stubs.agent.Run, request, timeout, "run")
        return AsyncRunStream(call, info, self._resume_from)

    def _resume_from(self, run_id: str, after_sequence: int, timeout: float | None) -> AsyncRunStream:
        return self.resume(run_id, after_sequence, timeout=timeout)

    def resume(self, run_id: str, after_sequence: int = 0, *, timeout: float | None = None) -> AsyncRunStream:
        """Follow a run after ``after_sequence`` (see ``Agent.resume``)."""
        request = agent_pb2.ResumeRunRequest(run_id=run_id, after_sequence=after_sequence)
        call, info = self._stream(self._stubs.agent.ResumeRun, request, timeout, "run")
        return AsyncRunStream(
            call, info, self._resume_from, unwrap=run_event, run_id=run_id, after_sequence=after_sequence
        )

    def resolve_interrupt(
        self,
        run_id: str,
        interrupt_id: str,
        decisions: Sequence[agent_pb2.ToolCallDecision],
        *,
        timeout: float | None = None,
    ) -> AsyncRunStream:
        """Approve or reject pending tool calls and stream on (see ``Agent.resolve_interrupt``)."""
        request = agent_pb2.ResolveInterruptRequest(run_id=run_id, interrupt_id=interrupt_id, decisions=list(decisions))
        call, info = self._stream(self._stubs.agent.ResolveInterrupt, request, timeout, "run")
        return AsyncRunStream(call, info, self._resume_from, unwrap=run_event, run_id=run_id)

    async def cancel(self, run_id: str, *, reason: str = "", timeout: float | None = None) -> agent_pb2.RunInfo:
        """Stop a run (see ``Agent.cancel``)."""
        request = agent_pb2.CancelRunRequest(run_id=run_id, reason=reason)
        return (await self._unary(self._stubs.agent.CancelRun, request, timeout)).run

    async def get(self, run_id: str, *, timeout: float | None = None) -> agent_pb2.RunInfo:
        """A run from its last checkpoint (see ``Agent.get``)."""
        return (await self._unary(self._stubs.agent.GetRun, agent_pb2.GetRunRequest(run_id=run_id), timeout)).run

    async def list_agents(self, *, timeout: float | None = None) -> list[agent_pb2.AgentInfo]:
        """The agents and workflows ``run(agent=...)`` accepts."""
        reply = await self._unary(self._stubs.agent.ListAgents, agent_pb2.ListAgentsRequest(), timeout)
        return list(reply.agents)


class AsyncSessions(_AsyncResource):
    """Session memory; see :class:`agentmesh.client.sync.Sessions`."""

    async def append(
        self,
        session_id: str,
        messages: Sequence[common_pb2.Message],
        *,
        user_id: str = "",
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> memory_pb2.AppendMessagesResponse:
        """Append messages atomically, with an idempotency key (see ``Sessions.append``)."""
        request = memory_pb2.AppendMessagesRequest(
            session_id=session_id, messages=list(messages), user_id=user_id,
            idempotency_key=idempotency_key or new_request_id(),
        )
        return await self._unary(self._stubs.memory.AppendMessages, request, timeout)

    async def context(
        self,
        session_id: str,
        *,
        token_budget: int = 0,
        min_version: int = 0,
        user_id: str = "",
        timeout: float | None = None,
    ) -> memory_pb2.GetContextResponse:
        """The context that fits ``token_budget`` tokens (see ``Sessions.context``)."""
        request = memory_pb2.GetContextRequest(
            session_id=session_id, token_budget=token_budget, min_version=min_version, user_id=user_id
        )
        return await self._unary(self._stubs.memory.GetContext, request, timeout)

    async def messages(
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
        """Stored messages by sequence range (see ``Sessions.messages``)."""
        request = memory_pb2.ListMessagesRequest(
            session_id=session_id, from_sequence=from_sequence, to_sequence=to_sequence, limit=limit,
            min_version=min_version, user_id=user_id,
        )
        return await self._unary(self._stubs.memory.ListMessages, request, timeout)

    def watch(
        self,
        session_id: str,
        *,
        after_sequence: int | None = None,
        user_id: str = "",
        timeout: float | None = None,
    ) -> AsyncStream[memory_pb2.WatchSessionResponse]:
        """Stream appended messages (see ``Sessions.watch``)."""
        request = memory_pb2.WatchSessionRequest(session_id=session_id, user_id=user_id)
        if after_sequence is not None:
            request.after_sequence = after_sequence
        call, info = self._stream(self._stubs.memory.WatchSession, request, timeout, "watch")
        return AsyncStream(call, info)

    async def get(
        self, session_id: str, *, user_id: str = "", timeout: float | None = None
    ) -> memory_pb2.GetSessionResponse:
        """Describe a session (see ``Sessions.get``)."""
        request = memory_pb2.GetSessionRequest(session_id=session_id, user_id=user_id)
        return await self._unary(self._stubs.memory.GetSession, request, timeout)

    async def delete(
        self, session_id: str, *, keep_facts: bool = False, user_id: str = "", timeout: float | None = None
    ) -> memory_pb2.DeleteSessionResponse:
        """Delete a session (see ``Sessions.delete``)."""
        request = memory_pb2.DeleteSessionRequest(session_id=session_id, user_id=user_id, keep_facts=keep_facts)
        return await self._unary(self._stubs.memory.DeleteSession, request, timeout)

    async def set_pinned(
        self, session_id: str, messages: Sequence[common_pb2.Message], *, user_id: str = "", timeout: float | None = None
    ) -> memory_pb2.SetPinnedMessagesResponse:
        """Replace the session's pinned messages (see ``Sessions.set_pinned``)."""
        request = memory_pb2.SetPinnedMessagesRequest(session_id=session_id, user_id=user_id, messages=list(messages))
        return await self._unary(self._stubs.memory.SetPinnedMessages, request, timeout)

    async def compact(
        self, session_id: str, *, user_id: str = "", timeout: float | None = None
    ) -> memory_pb2.CompactSessionResponse:
        """Fold older messages into the summary now (see ``Sessions.compact``)."""
        request = memory_pb2.CompactSessionRequest(session_id=session_id, user_id=user_id)
        return await self._unary(self._stubs.memory.CompactSession, request, timeout, "generate")

    async def set_retention(
        self,
        session_id: str,
        *,
        ttl_s: int | None = None,
        keep_last_messages: int | None = None,
        user_id: str = "",
        timeout: float | None = None,
    ) -> memory_pb2.SetRetentionResponse:
        """Set the session's time to live and message bound (see ``Sessions.set_retention``)."""
        request = retention_request(session_id, ttl_s, keep_last_messages, user_id)
        return await self._unary(self._stubs.memory.SetRetention, request, timeout)


class AsyncFacts(_AsyncResource):
    """Long-term memory of a user; see :class:`agentmesh.client.sync.Facts`."""

    async def remember(
        self, user_id: str, facts: Sequence[str | memory_pb2.FactInput], *, timeout: float | None = None
    ) -> list[memory_pb2.RememberedFact]:
        """Store facts, merging duplicates (see ``Facts.remember``)."""
        request = memory_pb2.RememberFactsRequest(user_id=user_id, facts=[fact_input(f) for f in facts])
        return list((await self._unary(self._stubs.memory.RememberFacts, request, timeout)).results)

    async def recall(
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
        """The user's facts most related to ``query`` (see ``Facts.recall``)."""
        request = recall_request(user_id, query, top_k, min_similarity, recency_weight, min_score)
        return list((await self._unary(self._stubs.memory.RecallFacts, request, timeout)).facts)

    async def delete(self, user_id: str, fact_ids: Sequence[str], *, timeout: float | None = None) -> int:
        """Delete facts by id; how many existed (see ``Facts.delete``)."""
        request = memory_pb2.DeleteFactsRequest(user_id=user_id, fact_ids=list(fact_ids))
        return (await self._unary(self._stubs.memory.DeleteFacts, request, timeout)).facts_deleted

    async def forget_user(self, user_id: str, *, timeout: float | None = None) -> memory_pb2.ForgetUserResponse:
        """Delete every session and fact of the user (see ``Facts.forget_user``)."""
        return await self._unary(self._stubs.memory.ForgetUser, memory_pb2.ForgetUserRequest(user_id=user_id), timeout)

    async def list(  # noqa: A003 - last in the class: the name shadows the builtin only below it
        self, user_id: str, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> memory_pb2.ListFactsResponse:
        """A page of the user's facts (see ``Facts.list``)."""
        request = memory_pb2.ListFactsRequest(user_id=user_id, page_size=page_size, page_token=page_token)
        return await self._unary(self._stubs.memory.ListFacts, request, timeout)


class AsyncTools(_AsyncResource):
    """Tool execution; see :class:`agentmesh.client.sync.Tools`."""

    def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str = "",
        session_id: str = "",
        user_id: str = "",
        timeout: float | None = None,
    ) -> AsyncStream[tools_pb2.ExecuteToolResponse]:
        """Run a tool: ``progress`` events, then its ``result`` (see ``Tools.execute``)."""
        request = execute_tool_request(name, arguments, idempotency_key, session_id, user_id)
        call, info = self._stream(self._stubs.tools.ExecuteTool, request, timeout, "tool")
        return AsyncStream(call, info)

    async def cancel(
        self, name: str, idempotency_key: str, *, timeout: float | None = None
    ) -> tools_pb2.CancelToolCallResponse:
        """Cancel a running call by its idempotency key (see ``Tools.cancel``)."""
        request = tools_pb2.CancelToolCallRequest(name=name, idempotency_key=idempotency_key)
        return await self._unary(self._stubs.tools.CancelToolCall, request, timeout)

    async def list(self, *, timeout: float | None = None) -> tools_pb2.ListToolsResponse:  # noqa: A003
        """Every tool with its JSON Schema and details (see ``Tools.list``)."""
        return await self._unary(self._stubs.tools.ListTools, tools_pb2.ListToolsRequest(), timeout)


class AsyncDocuments(_AsyncResource):
    """Ingestion and search; see :class:`agentmesh.client.sync.Documents`."""

    async def ingest(
        self,
        documents: Iterable[retrieval_pb2.Document] | AsyncIterable[retrieval_pb2.Document],
        *,
        collection: str = "",
        on_progress: Callable[[IngestProgress], None] | None = None,
        timeout: float | None = None,
    ) -> retrieval_pb2.IngestDocumentsResponse:
        """Upload documents (a sync or async iterable) and wait until they are searchable (see
        ``Documents.ingest``); ``on_progress`` runs on the event loop."""
        failure: list[BaseException] = []
        kwargs, info = self._settings.prepare("ingest", timeout)
        requests = _ingest_requests(documents, collection, on_progress, failure)
        try:
            return await self._stubs.retrieval.IngestDocuments(requests, **kwargs)
        except grpc.RpcError as exc:
            if failure:
                raise failure[0] from exc
            raise error_from_rpc(exc, info.request_id, info.deadline) from exc
        except asyncio.CancelledError:
            # grpc.aio cancels the call when the request iterator raises; unless this task itself
            # is being cancelled, the caller gets the iterator's own error.
            task = asyncio.current_task()
            if failure and task is not None and not task.cancelling():
                raise failure[0] from None
            raise

    async def search(
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
        """The chunks most relevant to ``query`` (see ``Documents.search``)."""
        request = retrieval_pb2.SearchRequest(
            collection=collection, query=query, top_k=top_k, mode=mode, filters=list(filters), min_score=min_score,
            fusion=fusion, rrf_k=rrf_k, candidates=candidates, mmr=mmr, rerank=rerank,
        )
        if dense_weight is not None:
            request.dense_weight = dense_weight
        return await self._unary(self._stubs.retrieval.Search, request, timeout)

    async def delete(
        self,
        document_ids: Sequence[str] = (),
        *,
        collection: str = "",
        filters: Sequence[retrieval_pb2.FilterCondition] = (),
        timeout: float | None = None,
    ) -> retrieval_pb2.DeleteDocumentsResponse:
        """Delete documents by id and/or filters (see ``Documents.delete``)."""
        request = retrieval_pb2.DeleteDocumentsRequest(
            collection=collection, document_ids=list(document_ids), filters=list(filters)
        )
        return await self._unary(self._stubs.retrieval.DeleteDocuments, request, timeout)

    async def create_collection(
        self, collection: str, *, chunking: retrieval_pb2.ChunkingConfig | None = None, timeout: float | None = None
    ) -> retrieval_pb2.CreateCollectionResponse:
        """Create a collection (see ``Documents.create_collection``)."""
        request = retrieval_pb2.CreateCollectionRequest(collection=collection, chunking=chunking)
        return await self._unary(self._stubs.retrieval.CreateCollection, request, timeout)

    async def describe_collection(
        self, collection: str = "", *, timeout: float | None = None
    ) -> retrieval_pb2.CollectionInfo:
        """A collection's settings and counts (see ``Documents.describe_collection``)."""
        request = retrieval_pb2.DescribeCollectionRequest(collection=collection)
        return (await self._unary(self._stubs.retrieval.DescribeCollection, request, timeout)).collection

    async def drop_collection(
        self, collection: str, *, timeout: float | None = None
    ) -> retrieval_pb2.DropCollectionResponse:
        """Delete the tenant's documents of a collection (see ``Documents.drop_collection``)."""
        request = retrieval_pb2.DropCollectionRequest(collection=collection)
        return await self._unary(self._stubs.retrieval.DropCollection, request, timeout)


class AsyncLLM(_AsyncResource):
    """LLM completions; see :class:`agentmesh.client.sync.LLM`."""

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
    ) -> AsyncStream[llm_pb2.StreamGenerateResponse]:
        """Stream a completion (see ``LLM.stream``)."""
        request = llm_request(
            llm_pb2.StreamGenerateRequest, messages, model, tools, context, max_tokens, temperature, routing
        )
        call, info = self._stream(self._stubs.llm.StreamGenerate, request, timeout, "generate")
        return AsyncStream(call, info)

    async def generate(
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
        """The whole completion at once (see ``LLM.generate``)."""
        request = llm_request(
            llm_pb2.GenerateRequest, messages, model, tools, context, max_tokens, temperature, routing
        )
        return await self._unary(self._stubs.llm.Generate, request, timeout, "generate")

    async def count_tokens(
        self,
        messages: Sequence[common_pb2.Message],
        *,
        model: str = "",
        tools: Sequence[common_pb2.ToolDefinition] = (),
        context: Sequence[common_pb2.Chunk] = (),
        deployment: str = "",
        timeout: float | None = None,
    ) -> llm_pb2.CountTokensResponse:
        """Input tokens the request would use (see ``LLM.count_tokens``)."""
        request = llm_pb2.CountTokensRequest(
            model=model, messages=list(messages), tools=list(tools), context=list(context), deployment=deployment
        )
        return await self._unary(self._stubs.llm.CountTokens, request, timeout)

    async def list_models(self, *, timeout: float | None = None) -> list[llm_pb2.Model]:
        """The model aliases and their deployments (see ``LLM.list_models``)."""
        return list((await self._unary(self._stubs.llm.ListModels, llm_pb2.ListModelsRequest(), timeout)).models)

    async def spend(self, *, timeout: float | None = None) -> list[llm_pb2.Spend]:
        """The caller's spend in the current budget period (see ``LLM.spend``)."""
        return list((await self._unary(self._stubs.llm.GetSpend, llm_pb2.GetSpendRequest(), timeout)).spends)


class AsyncClient:
    """AgentMesh client for asyncio, over one ``grpc.aio`` channel to the gateway. Create it
    inside the event loop that uses it.

    >>> async with AsyncClient(ClientConfig(address="127.0.0.1:8080")) as client:
    ...     async for event in client.agent.run("How do I parse JSON?", session_id="demo"):
    ...         print(event.text_delta.text, end="")
    """

    def __init__(self, config: ClientConfig | None = None, *, channel: grpc.aio.Channel | None = None) -> None:
        """``config`` None reads :meth:`ClientConfig.from_env`. ``channel``: use this channel
        instead of opening one (its options then apply, not the config's retry policy)."""
        self.config = config or ClientConfig.from_env()
        if channel is None:
            credentials = self.config.channel_credentials()
            options = self.config.channel_options()
            channel = (
                grpc.aio.insecure_channel(self.config.address, options=options)
                if credentials is None
                else grpc.aio.secure_channel(self.config.address, credentials, options=options)
            )
        self.channel = channel
        self._settings = CallSettings(self.config)
        self.stubs = Stubs(channel)
        self.agent = AsyncAgent(self.stubs, self._settings)
        self.sessions = AsyncSessions(self.stubs, self._settings)
        self.documents = AsyncDocuments(self.stubs, self._settings)
        self.llm = AsyncLLM(self.stubs, self._settings)
        self.facts = AsyncFacts(self.stubs, self._settings)
        self.tools = AsyncTools(self.stubs, self._settings)

    def call_options(self, kind: CallKind = "unary", timeout: float | None = None) -> dict[str, Any]:
        """``timeout`` and ``metadata`` keyword arguments for a raw stub call (``client.stubs``)."""
        return self._settings.prepare(kind, timeout)[0]

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel is connected; UnavailableError after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            raise UnavailableError(
                grpc.StatusCode.UNAVAILABLE, f"no connection to {self.config.address} within {timeout:g} s"
            ) from None

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _ingest_requests(
    documents: Iterable[retrieval_pb2.Document] | AsyncIterable[retrieval_pb2.Document],
    collection: str,
    on_progress: Callable[[IngestProgress], None] | None,
    failure: list[BaseException],
) -> AsyncIterator[retrieval_pb2.IngestDocumentsRequest]:
    sent = size = 0

    async def each() -> AsyncIterator[retrieval_pb2.Document]:
        if isinstance(documents, AsyncIterable):
            async for document in documents:
                yield document
        else:
            for document in documents:
                yield document

    try:
        async for document in each():
            request = retrieval_pb2.IngestDocumentsRequest(collection=collection, document=document)
            yield request
            # Resumed when gRPC asks for the next message: this one has been written.
            sent += 1
            size += request.ByteSize()
            if on_progress is not None:
                on_progress(IngestProgress(sent, size))
    except Exception as exc:
        failure.append(exc)
        raise
