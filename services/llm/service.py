"""The LLM router: ``agentmesh.llm.v1.LLMService``.

It validates a request, routes it over the model catalogue (:mod:`.catalogue`, :mod:`.routing`)
to an OpenAI-compatible, Azure OpenAI, Anthropic or extractive deployment, and streams typed
events back:

    metadata, (citation | text_delta | tool_call_delta)*, usage, finish
    metadata, (citation | text_delta | tool_call_delta)+, interrupted, then a gRPC status

The generation itself — failover before the first token, retries, circuit breakers, admission,
caching, the stream-failure semantics — is :mod:`.pipeline`; this module holds the settings, the
service's life cycle (catalogue loading and hot reload, Redis, metrics endpoint), request
validation and the unary RPCs. ``Generate`` is ``StreamGenerate`` collected into one response.
README.md documents the behaviour and every setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import redis
import redis.asyncio as aioredis
from google.protobuf import json_format, struct_pb2
from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.services.llm import catalogue as cat
from agentmesh.services.llm import telemetry as tm
from agentmesh.services.llm.admission import Admission, Scope
from agentmesh.services.llm.admission import period as budget_period
from agentmesh.services.llm.breakers import BreakerStore, SharedCircuitBreaker
from agentmesh.services.llm.cache import ResponseCache
from agentmesh.services.llm.counting import Tokenizers
from agentmesh.services.llm.pipeline import (
    DEADLINE_RESERVE_S,
    SENT_DELTAS_KEY,
    SENT_TOKENS_KEY,
    Generation,
    api_key_id,
)
from agentmesh.services.llm.providers.base import GenerationRequest, Provider
from agentmesh.services.llm.providers.extractive import ExtractiveProvider
from agentmesh.services.llm.routing import CircuitBreaker, Router, Runtime, strategy_proto
from agentmesh.services.runtime.context import current_tenant, downstream_timeout
from agentmesh.services.runtime.errors import ServiceError, invalid_argument, not_found
from agentmesh.services.runtime.redis_pool import RedisPoolSettings, pooled_redis
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import ServiceSettings

__all__ = ["EXTRACTIVE_MODEL", "SENT_DELTAS_KEY", "SENT_TOKENS_KEY", "LLMService", "LLMSettings", "collect", "create"]

log = logging.getLogger("agentmesh.llm")

Role = common_pb2.Role
#: The common subset of OpenAI and Anthropic tool names (common.v1.ToolDefinition.name).
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: Model name that selects the extractive provider explicitly.
EXTRACTIVE_MODEL = cat.EXTRACTIVE
#: Longest cache entry lifetime a request may ask for, in seconds (30 days).
MAX_CACHE_TTL_S = 30 * 86_400


class LLMSettings(ServiceSettings, RedisPoolSettings):
    """Settings of the LLM router (env prefix ``AGENTMESH_LLM_``; the provider keys, the OpenAI
    base URL and the Redis URL are also read from their usual unprefixed variables). Invalid
    combinations fail at start."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_LLM_", extra="ignore", populate_by_name=True)

    catalogue: str = Field("", description="Path of the model catalogue (YAML); empty = one provider from the "
                           "variables below.")
    catalogue_reload_s: float = Field(5.0, ge=0, description="How often the catalogue file is checked for changes, "
                                      "in seconds (0 = never reload).")
    provider: Literal["auto", "openai", "anthropic", "extractive"] = Field(
        "auto",
        description="Provider to call without a catalogue. auto = openai when an OpenAI key or base URL is set, else "
        "anthropic when an Anthropic key is set, else extractive.",
    )
    model: str = Field("", description="Upstream model used when a request names none; empty = provider default.")
    openai_base_url: str = Field(
        "",
        validation_alias=AliasChoices("AGENTMESH_LLM_OPENAI_BASE_URL", "OPENAI_BASE_URL"),
        description="OpenAI-compatible endpoint, e.g. http://localhost:11434/v1; empty = OpenAI.",
    )
    openai_api_key: SecretStr = Field(
        SecretStr(""), validation_alias=AliasChoices("AGENTMESH_LLM_OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    anthropic_base_url: str = Field(
        "", validation_alias=AliasChoices("AGENTMESH_LLM_ANTHROPIC_BASE_URL"), description="Empty = Anthropic."
    )
    anthropic_api_key: SecretStr = Field(
        SecretStr(""), validation_alias=AliasChoices("AGENTMESH_LLM_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY")
    )
    client: Literal["lean", "httpx", "sdk"] = Field(
        "lean", description="Transport of deployments that set none: lean (HTTP/1.1 on asyncio), httpx, or the "
        "official SDK.",
    )
    default_max_tokens: int = Field(1024, ge=1, description="Completion tokens when a request sets max_tokens=0.")
    max_tokens_limit: int = Field(16384, ge=1, description="Largest max_tokens a request may ask for.")
    first_token_timeout_s: float = Field(
        30.0, gt=0, description="Seconds to wait for a deployment's first text or tool-call delta."
    )
    total_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a whole request may take, failovers included (the caller's deadline may "
        "cut it shorter); also a deployment's default total timeout per attempt.",
    )
    fallback_to_extractive: bool = Field(
        True, description="Answer with the extractive provider when every deployment failed before its first delta."
    )
    provider_max_retries: int = Field(
        0, ge=0, le=10, description="Retries per deployment on 429 / 5xx / connection errors, for deployments that "
        "set no max_retries (0: fail over at once).",
    )
    retry_base_s: float = Field(0.25, gt=0, description="Backoff base: retry n waits up to base * 2**n seconds.")
    retry_max_s: float = Field(8.0, gt=0, description="Longest backoff between two retries, in seconds.")
    max_retry_after_s: float = Field(
        10.0, ge=0, description="A provider's retry-after longer than this fails over instead of waiting, in seconds."
    )
    coalesce_backlog: int = Field(
        32, ge=0, description="When more than this many text / tool-call deltas of a stream are waiting to be sent "
        "at once (it fell behind its upstream), they go out merged: each run of text, and each run of one tool "
        "call's argument fragments, as one message (the text is unchanged). 0 = never merge.",
    )
    redis_url: str = Field(
        "", validation_alias=AliasChoices("AGENTMESH_LLM_REDIS_URL", "REDIS_URL"),
        description="Redis for admission counters, spend and the response cache; empty = none (limits then refused).",
    )
    redis_prefix: str = Field("agentmesh:llm", min_length=1, description="Prefix of the router's Redis keys.")
    admission_fail_open: bool = Field(
        False, description="Admit requests when Redis is unreachable (default: refuse them with UNAVAILABLE)."
    )
    shared_breakers: bool = Field(
        True, description="With Redis: every replica shares each deployment's circuit breaker (else each replica "
        "keeps its own).",
    )
    breaker_sync_s: float = Field(
        1.0, gt=0, le=60, description="How stale a replica's view of a shared circuit breaker may get, in seconds "
        "(its own failures refresh it at once).",
    )
    cache_ttl_s: int = Field(3600, ge=1, le=MAX_CACHE_TTL_S, description="Default lifetime of a cache entry, in s.")
    cache_max_bytes: int = Field(1 << 20, ge=1024, description="Largest answer stored in the cache, in bytes.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 = off.")
    tiktoken_dir: str = Field("", description="Folder with tiktoken encoding files (o200k_base.tiktoken...).")
    max_upstream_connections: int = Field(1000, ge=1, description="Open connections per deployment, at most.")

    @model_validator(mode="after")
    def _check(self) -> LLMSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"AGENTMESH_LLM_DEFAULT_MAX_TOKENS ({self.default_max_tokens}) exceeds "
                f"AGENTMESH_LLM_MAX_TOKENS_LIMIT ({self.max_tokens_limit})"
            )
        if self.provider == "openai" and not (self.openai_api_key.get_secret_value() or self.openai_base_url):
            raise ValueError(
                "AGENTMESH_LLM_PROVIDER=openai needs AGENTMESH_LLM_OPENAI_API_KEY (or OPENAI_API_KEY), "
                "or AGENTMESH_LLM_OPENAI_BASE_URL for an OpenAI-compatible server that needs no key"
            )
        if self.provider == "anthropic" and not self.anthropic_api_key.get_secret_value():
            raise ValueError("AGENTMESH_LLM_PROVIDER=anthropic needs AGENTMESH_LLM_ANTHROPIC_API_KEY (or ANTHROPIC_API_KEY)")
        return self

    def resolved_provider(self) -> Literal["openai", "anthropic", "extractive"]:
        """The provider kind ``provider`` stands for (resolves ``auto``)."""
        if self.provider != "auto":
            return self.provider
        if self.openai_api_key.get_secret_value() or self.openai_base_url:
            return "openai"
        if self.anthropic_api_key.get_secret_value():
            return "anthropic"
        return "extractive"


def env_catalogue(settings: LLMSettings, base: cat.Catalogue | None = None) -> cat.Catalogue:
    """The one-deployment catalogue of a router configured by environment variables (with the
    limits of ``base``, a catalogue file that declares no models)."""
    from agentmesh.services.llm.providers import anthropic as anthropic_provider  # noqa: PLC0415
    from agentmesh.services.llm.providers import openai as openai_provider  # noqa: PLC0415

    kind = settings.resolved_provider()
    if kind == "openai":
        model = settings.model or openai_provider.DEFAULT_MODEL
        base_url, key = settings.openai_base_url, settings.openai_api_key.get_secret_value()
        variable = "AGENTMESH_LLM_OPENAI_API_KEY (or OPENAI_API_KEY)"
    elif kind == "anthropic":
        model = settings.model or anthropic_provider.DEFAULT_MODEL
        base_url, key = settings.anthropic_base_url, settings.anthropic_api_key.get_secret_value()
        variable = "AGENTMESH_LLM_ANTHROPIC_API_KEY (or ANTHROPIC_API_KEY)"
    else:
        model, base_url, key, variable = "", "", "", ""
    return cat.single_deployment(
        provider=kind, model=model, base_url=base_url, api_key=key, key_variable=variable,
        max_retries=settings.provider_max_retries,
        limits=base.limits if base else None, circuit_breaker=base.circuit_breaker if base else None,
    )


def build_provider(config: cat.DeploymentConfig, settings: LLMSettings) -> Provider:
    """The provider client of a deployment (constructed only; no remote call)."""
    transport = config.client or settings.client
    if config.provider in ("openai", "azure"):
        from agentmesh.services.llm.providers.openai import OpenAIProvider  # noqa: PLC0415

        return OpenAIProvider(
            model=config.model, base_url=config.base_url, api_key=config.api_key, transport=transport,
            azure=config.provider == "azure", api_version=config.api_version, key_env=config.key_variable,
            max_connections=settings.max_upstream_connections,
        )
    if config.provider == "anthropic":
        from agentmesh.services.llm.providers.anthropic import AnthropicProvider  # noqa: PLC0415

        return AnthropicProvider(
            model=config.model, base_url=config.base_url, api_key=config.api_key, transport=transport,
            key_env=config.key_variable, max_connections=settings.max_upstream_connections,
        )
    return ExtractiveProvider()


@dataclass
class RouterState:
    """One catalogue with its runtimes (swapped whole on reload; requests keep the one they started with)."""

    catalogue: cat.Catalogue
    router: Router
    runtimes: dict[str, Runtime]
    extractive: Runtime
    from_env: bool


class LLMService(Service, llm_pb2_grpc.LLMServiceServicer):
    """The router (see the module docstring)."""

    kind = "llm"

    def __init__(self, settings: LLMSettings):
        super().__init__(settings)
        self.settings: LLMSettings = settings
        self.state: RouterState | None = None
        self.tokenizers = Tokenizers(settings.tiktoken_dir)
        self.rng = random.Random()  # noqa: S311 - jitter and load spreading, not security
        self.redis: aioredis.Redis | None = None
        self.admission: Admission | None = None
        self.cache: ResponseCache | None = None
        self.breakers: BreakerStore | None = None
        self._retired: list[Runtime] = []
        self._tasks: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._metrics_server: Any = None
        extractive_config = cat.DeploymentConfig(name=cat.EXTRACTIVE, provider="extractive")
        self._extractive = Runtime(extractive_config, ExtractiveProvider(),
                                   CircuitBreaker(cat.CircuitBreakerConfig()), self.tokenizers.for_model("extractive", ""))

    # --- life cycle ---------------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> None:
        llm_pb2_grpc.add_LLMServiceServicer_to_server(self, server)

    def _load(self) -> tuple[cat.Catalogue, bool]:
        """(catalogue, built from the environment). Raises CatalogueError."""
        if not self.settings.catalogue:
            return env_catalogue(self.settings), True
        loaded = cat.load(self.settings.catalogue)
        if not loaded.models:
            return env_catalogue(self.settings, loaded), True
        return loaded, False

    def _check_redis_needs(self, catalogue: cat.Catalogue) -> None:
        needs = catalogue.limits.any or any(d.rpm or d.tpm for d in catalogue.deployments())
        if needs and not self.settings.redis_url:
            raise cat.CatalogueError(
                "the catalogue sets rate limits or budgets, which are enforced in Redis: set AGENTMESH_LLM_REDIS_URL "
                "(or REDIS_URL)"
            )

    async def start(self) -> None:
        """Load the catalogue (a bad one stops the process with a message naming the field),
        connect Redis, load the tokenizers, start the reload watcher and the metrics endpoint."""
        catalogue, from_env = self._load()
        self._check_redis_needs(catalogue)
        if self.settings.redis_url:
            self.redis = pooled_redis(
                self.settings.redis_url, max_connections=self.settings.redis_max_connections,
                pool_timeout_s=self.settings.redis_pool_timeout_s, socket_connect_timeout=2, socket_timeout=5,
                health_check_interval=30,
            )
            self.admission = Admission(self.redis, self.settings.redis_prefix)
            self.cache = ResponseCache(self.redis, self.settings.redis_prefix, self.settings.cache_max_bytes)
            if self.settings.shared_breakers:
                self.breakers = BreakerStore(self.redis, self.settings.redis_prefix)
        await self._install(catalogue, from_env)
        if self.settings.catalogue:
            self._stamp = _stamp(self.settings.catalogue)
            if self.settings.catalogue_reload_s > 0:
                self._watcher = asyncio.create_task(self._watch())
        if self.settings.metrics_port and "metrics_port" not in ServiceSettings.model_fields:
            # A runtime whose serve() exposes /metrics itself declares metrics_port in ServiceSettings;
            # until then the router serves the default registry on its own.
            from prometheus_client import start_http_server  # noqa: PLC0415

            self._metrics_server, _ = start_http_server(self.settings.metrics_port, addr=self.settings.host)
            log.info("metrics endpoint listening", extra={"fields": {"port": self.settings.metrics_port}})

    async def _install(self, catalogue: cat.Catalogue, from_env: bool) -> None:
        old = self.state
        runtimes: dict[str, Runtime] = {}
        for config in catalogue.deployments():
            previous = old.runtimes.get(config.name) if old else None
            if previous is not None and previous.config == config:
                runtimes[config.name] = previous
                continue
            rules = config.circuit_breaker or catalogue.circuit_breaker
            breaker: CircuitBreaker | SharedCircuitBreaker
            if self.breakers is not None:
                breaker = SharedCircuitBreaker(config.name, rules, self.breakers, sync_s=self.settings.breaker_sync_s,
                                               spawn=self.background, on_change=tm.circuit_listener(config.name))
            else:
                breaker = CircuitBreaker(rules, tm.circuit_listener(config.name))
            provider = build_provider(config, self.settings)
            runtimes[config.name] = Runtime(config, provider, breaker,
                                            self.tokenizers.for_model(config.provider, provider.model))
        openai_models = [(r.config.provider, r.provider.model) for r in runtimes.values()
                         if r.config.provider in ("openai", "azure")]
        if openai_models:
            # tiktoken files load in about a second: never on a request's path.
            await asyncio.to_thread(self.tokenizers.preload, openai_models)
        router = Router(catalogue, runtimes, self._extractive, self.settings.fallback_to_extractive, self.rng)
        self.state = RouterState(catalogue, router, runtimes, self._extractive, from_env)
        if old:
            kept = {id(r) for r in runtimes.values()}
            self._retired += [r for r in old.runtimes.values() if id(r) not in kept]
        await self._close_idle_retired()

    async def _close_idle_retired(self) -> None:
        idle = [r for r in self._retired if r.in_flight == 0]
        self._retired = [r for r in self._retired if r.in_flight > 0]
        for runtime in idle:
            await runtime.provider.aclose()

    async def _watch(self) -> None:
        """Reload the catalogue when its file changes; a bad file keeps the previous catalogue."""
        path = self.settings.catalogue
        while True:
            await asyncio.sleep(self.settings.catalogue_reload_s)
            await self._close_idle_retired()
            stamp = _stamp(path)
            if stamp is None or stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                catalogue, from_env = self._load()
                self._check_redis_needs(catalogue)
                await self._install(catalogue, from_env)
            except cat.CatalogueError as exc:
                tm.RELOADS.labels("error").inc()
                log.error("catalogue reload failed; the previous catalogue stays in use",
                          extra={"fields": {"path": path, "error": str(exc)}})
                continue
            except Exception:  # noqa: BLE001 - a reload must never kill the watcher
                tm.RELOADS.labels("error").inc()
                log.exception("catalogue reload failed; the previous catalogue stays in use")
                continue
            tm.RELOADS.labels("ok").inc()
            log.info("catalogue reloaded", extra={"fields": {
                "path": path, "models": list(catalogue.models), "deployments": len(catalogue.deployments())}})

    async def ready(self) -> tuple[bool, str]:
        """Ready once the catalogue's clients are built and, when configured, Redis answers PING.
        The probe never calls a provider (no tokens spent; the fallbacks answer while one is down)."""
        state = self.state
        if state is None:
            return False, "the catalogue is not loaded yet"
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.ping(), timeout=2)
            except (redis.RedisError, OSError, TimeoutError) as exc:
                return False, f"Redis ({self.settings.redis_url}) is unreachable: {exc}"
        models = [f"{alias}: " + ", ".join(f"{d.name} ({d.provider} {d.model or 'default'})" for d in m.deployments)
                  for alias, m in state.catalogue.models.items()]
        return True, "; ".join(models) or "extractive provider only"

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.state is not None:
            for runtime in [*self.state.runtimes.values(), *self._retired]:
                await runtime.provider.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` without waiting for it (kept referenced until it ends)."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def current(self) -> RouterState:
        if self.state is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the LLM router is still starting; retry shortly")
        return self.state

    # --- RPCs ---------------------------------------------------------------------------------

    def StreamGenerate(  # noqa: N802 - gRPC method name
        self, request: llm_pb2.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        """The event stream described in the module docstring. Statuses: INVALID_ARGUMENT (bad
        request, or too long for every context window), NOT_FOUND (unknown model / deployment),
        RESOURCE_EXHAUSTED (a limit or budget, with RetryInfo), UNAVAILABLE / DEADLINE_EXCEEDED
        (every deployment failed, or the stream was cut after its first delta), FAILED_PRECONDITION
        (cache asked for without Redis)."""
        # The generator itself is the handler's result (one async-generator layer less per event);
        # a failure building it (bad x-api-key-id, still starting) raises here, inside the interceptor.
        return Generation(self, self.current(), request, context).events()

    async def Generate(  # noqa: N802
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.GenerateResponse:
        """``StreamGenerate`` collected into one response (same statuses); a tool call whose
        arguments are not a JSON object (e.g. cut by max_tokens) raises UNAVAILABLE."""
        return await collect(Generation(self, self.current(), request, context).events())  # type: ignore[arg-type]

    async def ListModels(  # noqa: N802
        self, request: llm_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.ListModelsResponse:
        """Every alias with its deployments and their live state (circuit, in flight, TTFT), then
        the extractive provider."""
        state = self.current()
        default = state.catalogue.default_alias
        await asyncio.gather(*(runtime.breaker.refresh() for runtime in state.runtimes.values()))
        models = []
        for alias, config in state.catalogue.models.items():
            deployments = [self._describe(state.runtimes[d.name]) for d in config.deployments]
            models.append(llm_pb2.Model(
                name=alias, provider=config.deployments[0].provider, is_llm=config.deployments[0].provider != "extractive",
                is_default=alias == default, strategy=strategy_proto(config.strategy), deployments=deployments,
                fallback_models=config.fallbacks, context_window_fallback_models=config.context_window_fallbacks,
            ))
        models.append(llm_pb2.Model(
            name=EXTRACTIVE_MODEL, provider="extractive", is_llm=False, is_default=default == EXTRACTIVE_MODEL,
            strategy=llm_pb2.ROUTING_STRATEGY_FALLBACK, deployments=[self._describe(state.extractive)],
        ))
        return llm_pb2.ListModelsResponse(models=models)

    def _describe(self, runtime: Runtime) -> llm_pb2.Deployment:
        config = runtime.config
        first = config.first_token_timeout_s or self.settings.first_token_timeout_s
        total = config.total_timeout_s or self.settings.total_timeout_s
        return llm_pb2.Deployment(
            name=config.name, provider=config.provider, upstream_model=runtime.provider.model,
            base_url=runtime.provider.base_url, weight=config.weight, rpm_limit=config.rpm, tpm_limit=config.tpm,
            input_usd_per_million_tokens=config.input_usd_per_mtok,
            output_usd_per_million_tokens=config.output_usd_per_mtok, context_window_tokens=config.context_window,
            circuit_state=runtime.breaker.state.value, in_flight=max(0, runtime.in_flight),
            ttft_ewma_ms=0.0 if runtime.ttft_ewma_s is None else runtime.ttft_ewma_s * 1000,
            first_token_timeout_ms=round(first * 1000), total_timeout_ms=round(total * 1000),
        )

    async def CountTokens(  # noqa: N802
        self, request: llm_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.CountTokensResponse:
        """Input tokens of the request on the deployment it would be routed to first (or the one
        named). INVALID_ARGUMENT for a bad request, NOT_FOUND for an unknown model / deployment."""
        state = self.current()
        self._validate_conversation(request)
        try:
            plan = state.router.resolve(request.model, request.deployment, ())
        except LookupError as err:
            raise not_found(str(err.args[0])) from None
        if plan.candidates:
            runtime = plan.candidates[0].runtime
        else:
            runtime = state.runtimes[state.catalogue.models[plan.alias].deployments[0].name]
        upstream = plan.upstream_override or runtime.provider.model
        tokenizer = self.tokenizers.for_model(runtime.config.provider, upstream)
        count = await asyncio.to_thread(tokenizer.prompt, runtime.config.provider, request.messages,
                                        request.tools, request.context)
        return llm_pb2.CountTokensResponse(
            input_tokens=count.tokens, approximate=count.approximate, tokenizer=count.tokenizer,
            deployment=runtime.name, upstream_model=upstream, context_window_tokens=runtime.config.context_window,
        )

    async def GetSpend(  # noqa: N802
        self, request: llm_pb2.GetSpendRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.GetSpendResponse:
        """Spend of the caller's tenant (and API key) in the current budget period, and what its
        calls in flight hold (USD). FAILED_PRECONDITION without Redis; UNAVAILABLE when Redis does
        not answer."""
        state = self.current()
        if self.admission is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "spend is tracked in Redis: set AGENTMESH_LLM_REDIS_URL on the router")
        limits = state.catalogue.limits
        tenant, key = current_tenant(), api_key_id(context)
        scopes = [Scope("tenant", tenant, limits.for_tenant(tenant) or cat.LimitConfig())]
        if key:
            scopes.append(Scope("api_key", key, limits.for_api_key(key) or cat.LimitConfig()))
        import datetime as dt  # noqa: PLC0415

        now = dt.datetime.now(dt.UTC)
        spends = []
        for scope in scopes:
            try:
                spent, held = await self.admission.spent(scope), await self.admission.held(scope)
            except redis.RedisError as exc:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"Redis is unreachable: {exc}") from None
            period_id, _, _ = budget_period(scope.limits, now)
            spends.append(llm_pb2.Spend(scope=scope.kind, id=scope.id, spent_usd=spent, budget_usd=scope.limits.budget_usd,
                                        period=scope.limits.budget_period, period_id=period_id, held_usd=held))
        return llm_pb2.GetSpendResponse(spends=spends)

    # --- validation ---------------------------------------------------------------------------

    def _validate_conversation(self, request: Any) -> None:
        if not request.messages:
            raise invalid_argument("messages is empty: send at least one message")
        call_ids: set[str] = set()
        for i, m in enumerate(request.messages):
            if m.role not in (Role.ROLE_SYSTEM, Role.ROLE_USER, Role.ROLE_ASSISTANT, Role.ROLE_TOOL):
                raise invalid_argument(
                    f"messages[{i}].role is {Role.Name(m.role) if m.role in Role.values() else m.role}: "
                    "set ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
                )
            if m.tool_calls and m.role != Role.ROLE_ASSISTANT:
                raise invalid_argument(f"messages[{i}] has tool_calls but only ROLE_ASSISTANT messages may")
            for j, call in enumerate(m.tool_calls):
                if not call.id:
                    raise invalid_argument(f"messages[{i}].tool_calls[{j}].id is empty")
                if not TOOL_NAME.match(call.name):
                    raise invalid_argument(
                        f"messages[{i}].tool_calls[{j}].name {call.name[:80]!r} must match ^[a-zA-Z0-9_-]{{1,64}}$"
                    )
                _check_json(call.arguments, f"messages[{i}].tool_calls[{j}].arguments")
                call_ids.add(call.id)
            if m.role == Role.ROLE_TOOL:
                if not m.tool_call_id:
                    raise invalid_argument(f"messages[{i}] is ROLE_TOOL but tool_call_id is empty")
                if m.tool_call_id not in call_ids:
                    raise invalid_argument(
                        f"messages[{i}].tool_call_id {m.tool_call_id[:80]!r} answers no tool call of an "
                        "earlier assistant message"
                    )
        names: set[str] = set()
        for i, tool in enumerate(request.tools):
            if not TOOL_NAME.match(tool.name):
                raise invalid_argument(f"tools[{i}].name {tool.name[:80]!r} must match ^[a-zA-Z0-9_-]{{1,64}}$")
            if tool.name in names:
                raise invalid_argument(f"tools[{i}].name {tool.name!r} is listed twice")
            names.add(tool.name)
            schema_type = tool.parameters_schema.fields.get("type")
            if schema_type is not None and schema_type.string_value != "object":
                raise invalid_argument(f"tools[{i}].parameters_schema must describe an object (\"type\": \"object\")")
            _check_json(tool.parameters_schema, f"tools[{i}].parameters_schema")

    def validate(self, request: llm_pb2.GenerateRequest | llm_pb2.StreamGenerateRequest) -> GenerationRequest:
        """Check ``request`` and resolve its defaults. Raises INVALID_ARGUMENT naming the field."""
        self._validate_conversation(request)
        options = request.options
        max_tokens = options.max_tokens or self.settings.default_max_tokens
        if max_tokens > self.settings.max_tokens_limit:
            raise invalid_argument(
                f"options.max_tokens {max_tokens} exceeds this router's limit of {self.settings.max_tokens_limit} "
                "tokens (AGENTMESH_LLM_MAX_TOKENS_LIMIT)"
            )
        temperature = options.temperature if options.HasField("temperature") else None
        if temperature is not None and not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            raise invalid_argument(f"options.temperature {temperature} must be between 0 and 2")
        if request.routing.cache_ttl_s > MAX_CACHE_TTL_S:
            raise invalid_argument(f"routing.cache_ttl_s {request.routing.cache_ttl_s} exceeds 30 days ({MAX_CACHE_TTL_S} s)")
        return GenerationRequest(
            model=request.model,
            messages=list(request.messages),
            tools=list(request.tools),
            context=list(request.context),
            max_tokens=max_tokens,
            temperature=temperature,
            timeout_s=downstream_timeout(self.settings.total_timeout_s, reserve_s=DEADLINE_RESERVE_S),
        )


def _check_json(struct: struct_pb2.Struct, field: str) -> None:
    """INVALID_ARGUMENT when ``struct`` has no JSON form (a NaN or infinite number): providers,
    token counts and the cache key all see it as JSON."""
    try:
        json_format.MessageToDict(struct)
    except ValueError as exc:
        raise invalid_argument(f"{field} cannot be written as JSON ({exc}): use finite numbers") from None


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


async def collect(events: AsyncIterator[llm_pb2.StreamGenerateResponse]) -> llm_pb2.GenerateResponse:
    """Fold a StreamGenerate event stream into a GenerateResponse (tool calls reassembled by
    index, arguments parsed into a Struct). Raises UNAVAILABLE for arguments that are not a JSON
    object; a stream ending in a status raises it."""
    response = llm_pb2.GenerateResponse()
    text: list[str] = []
    calls: dict[int, dict[str, list[str] | str]] = {}
    async for event in events:
        kind = event.WhichOneof("event")
        if kind == "metadata":
            response.metadata.CopyFrom(event.metadata)
        elif kind == "text_delta":
            text.append(event.text_delta.text)
        elif kind == "tool_call_delta":
            d = event.tool_call_delta
            call = calls.setdefault(d.index, {"id": "", "name": "", "args": []})
            call["id"] = call["id"] or d.id
            call["name"] = call["name"] or d.name
            call["args"].append(d.arguments_delta)  # type: ignore[union-attr]
        elif kind == "citation":
            response.citations.append(event.citation)
        elif kind == "usage":
            response.usage.CopyFrom(event.usage)
        elif kind == "finish":
            response.finish_reason = event.finish.reason
            response.usage.CopyFrom(event.finish.usage)
    message = response.message
    message.role = Role.ROLE_ASSISTANT
    message.content = "".join(text)
    for index in sorted(calls):
        call = calls[index]
        raw = "".join(call["args"])  # type: ignore[arg-type]
        try:
            parsed = json.loads(raw or "{}")
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            hint = (
                " (generation stopped at max_tokens: raise options.max_tokens)"
                if response.finish_reason == common_pb2.FINISH_REASON_LENGTH
                else ""
            )
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"{response.metadata.provider} returned tool call {call['name']!r} whose arguments are not a "
                f"JSON object: {raw[:200]!r}{hint}",
            )
        message.tool_calls.append(
            common_pb2.ToolCall(id=call["id"], name=call["name"], arguments=json_format.ParseDict(parsed, struct_pb2.Struct()))
        )
    return response


def create() -> Service:
    """The router configured from the environment (AGENTMESH_LLM_*, OPENAI_*, ANTHROPIC_API_KEY,
    REDIS_URL)."""
    return LLMService(LLMSettings())
