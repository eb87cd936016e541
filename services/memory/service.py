"""Memory service: session history in Redis, returned within a token budget.

``MemoryService.AppendMessages`` appends a batch atomically and returns the session's new version;
``MemoryService.GetContext`` returns the newest messages that fit a token budget. Sessions are
scoped to the caller's tenant (``x-tenant-id``). Storage layout and consistency rules are in
:mod:`agentmesh.services.memory.store`; token counting in :mod:`agentmesh.services.runtime.tokens`.

Health follows Redis: the readiness probe is a PING, so the service reports NOT_SERVING within
about ``readiness_interval_s`` + ``redis_timeout_s`` of Redis going away and SERVING again once it
answers.
"""

from __future__ import annotations

import logging

import grpc
import redis.asyncio as aioredis
from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.memory.store import Limits, SessionStore, redis_location
from agentmesh.services.runtime.tokens import TokenCounter, default_token_counter
from agentmesh.services.runtime.context import current_tenant
from agentmesh.services.runtime.errors import ServiceError, invalid_argument, unavailable
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import ServiceSettings

log = logging.getLogger("agentmesh.memory")


class MemorySettings(ServiceSettings):
    """Settings of the memory service (env prefix ``AGENTMESH_MEMORY_``)."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_MEMORY_", extra="ignore")

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
    max_messages_per_append: int = Field(256, ge=1, le=256, description="Most messages in one AppendMessages.")
    max_message_bytes_each: int = Field(
        1024 * 1024, ge=64, description="Largest single message, protobuf-serialized, in bytes."
    )
    session_ttl_s: int = Field(
        0, ge=0, description="A session expires this many seconds after its last append; 0 = never."
    )
    context_page_messages: int = Field(
        64, ge=1, le=10_000, description="Messages GetContext reads per Redis round trip."
    )

    @model_validator(mode="after")
    def _budgets_consistent(self) -> MemorySettings:
        if self.default_token_budget > self.max_token_budget:
            raise ValueError(
                f"default_token_budget ({self.default_token_budget}) exceeds max_token_budget ({self.max_token_budget})"
            )
        return self


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """gRPC methods; every call is scoped to ``current_tenant()``."""

    def __init__(self, service: MemoryService):
        self._service = service

    async def AppendMessages(
        self, request: memory_pb2.AppendMessagesRequest, context
    ) -> memory_pb2.AppendMessagesResponse:
        """INVALID_ARGUMENT for a bad session id or message (nothing is written), UNAVAILABLE
        when Redis fails."""
        version = await self._service.store().append(current_tenant(), request.session_id, request.messages)
        return memory_pb2.AppendMessagesResponse(version=version)

    async def GetContext(self, request: memory_pb2.GetContextRequest, context) -> memory_pb2.GetContextResponse:
        """INVALID_ARGUMENT for a bad session id or a budget above ``max_token_budget``,
        UNAVAILABLE when Redis fails, DATA_LOSS when a stored message is corrupt."""
        settings = self._service.settings
        budget = request.token_budget or settings.default_token_budget
        if budget > settings.max_token_budget:
            raise invalid_argument(
                f"token_budget {budget} exceeds this service's maximum of {settings.max_token_budget} tokens"
            )
        window = await self._service.store().get_context(current_tenant(), request.session_id, budget)
        return memory_pb2.GetContextResponse(
            messages=window.messages,
            tokens_used=window.tokens_used,
            version=window.version,
            messages_omitted=window.messages_omitted,
        )


class MemoryService(Service):
    """The memory service: a Redis client, the tokenizer and the servicer."""

    kind = "memory"
    settings: MemorySettings

    def __init__(self, settings: MemorySettings, counter: TokenCounter | None = None):
        super().__init__(settings)
        self._counter = counter
        self._redis: aioredis.Redis | None = None
        self._store: SessionStore | None = None

    def register(self, server: grpc.aio.Server) -> None:
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(self), server)

    async def start(self) -> None:
        """Load the tokenizer and create the Redis client (connections open lazily, so a Redis
        that is down at start-up only keeps health at NOT_SERVING)."""
        s = self.settings
        counter = self._counter or default_token_counter()
        # No automatic retries inside redis-py: the store retries reads itself and never writes
        # (see store.py); redis-py's default of 10 retries would also hide an outage for seconds.
        self._redis = aioredis.Redis.from_url(
            s.redis_url,
            socket_timeout=s.redis_timeout_s,
            socket_connect_timeout=s.redis_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._store = SessionStore(
            self._redis,
            counter,
            location=redis_location(s.redis_url),
            limits=Limits(s.max_messages_per_append, s.max_message_bytes_each),
            key_prefix=s.key_prefix,
            session_ttl_s=s.session_ttl_s,
            page_size=s.context_page_messages,
        )
        log.info("memory store configured", extra={"fields": {"redis": self._store.location}})

    def store(self) -> SessionStore:
        """The session store; UNAVAILABLE while the service is still starting."""
        if self._store is None:
            raise unavailable("memory service is still starting; retry shortly")
        return self._store

    async def ready(self) -> tuple[bool, str]:
        """Ready when Redis answers PING (bounded by ``redis_timeout_s``)."""
        if self._store is None:
            return False, "starting"
        try:
            await self._store.ping()
        except ServiceError as err:
            return False, err.message
        return True, f"Redis at {self._store.location} answers PING"

    async def stop(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
            self._store = None


def create() -> Service:
    """The memory service configured from the environment."""
    return MemoryService(MemorySettings())
