"""One generation, from a validated request to the last event (see ``README.md``, "Stream
semantics").

    plan (routing) → cache lookup → attempts (breaker, admission) → stream → settle

Attempts walk the plan's candidates. Before a deployment is called its circuit must allow it and
admission must pass: at the first deployment called, one Redis script admits the caller's
tenant / API key (RPM, TPM, a budget hold of the worst-case cost there — a refusal ends the
request) together with the deployment's own RPM/TPM (a refusal skips the deployment); a later,
pricier deployment first raises the budget hold (refused: skipped). One more script call settles
everything after the stream (:mod:`.admission`). A cache hit counts against the caller's RPM only. A failure before the first
text or tool-call delta is retried on the same deployment when retryable (HTTP 429, 5xx,
connection errors: exponential backoff with full jitter — M. Brooker, "Exponential Backoff And
Jitter", AWS Architecture Blog, 2015 — or exactly the provider's ``retry-after``), as long as the
caller's deadline leaves time; otherwise the next candidate is tried. The caller sees none of
this: events are held back until the first delta. A failure after the first delta ends the stream
with a ``StreamInterrupted`` event carrying the partial usage, then a gRPC status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import redis
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm import telemetry as tm
from agentmesh.services.llm.admission import Refusal, Reservation, Scope, Violation
from agentmesh.services.llm.breakers import Permit
from agentmesh.services.llm.cache import cache_key
from agentmesh.services.llm.catalogue import EXTRACTIVE, LimitConfig
from agentmesh.services.llm.counting import Count
from agentmesh.services.llm.providers.base import Batch, ErrorKind, GenerationRequest, ProviderError
from agentmesh.services.llm.routing import Candidate, Plan, Runtime
from agentmesh.services.runtime.context import current_tenant
from agentmesh.services.runtime.errors import ServiceError, invalid_argument, not_found

if TYPE_CHECKING:
    from agentmesh.services.llm.service import LLMService, RouterState

log = logging.getLogger("agentmesh.llm")

#: Seconds of the caller's deadline kept back so a failover or a status still reaches the caller.
DEADLINE_RESERVE_S = 0.25
#: Trailing-metadata keys set when a stream is cut after its first delta.
SENT_DELTAS_KEY = "agentmesh-sent-deltas"
SENT_TOKENS_KEY = "agentmesh-sent-tokens"
#: Metadata key carrying the caller's API key id (set by the gateway).
API_KEY_HEADER = "x-api-key-id"

_DELTAS = ("text_delta", "tool_call_delta")
_TENANT, _API_KEY, _DEPLOYMENT = "tenant", "api_key", "deployment"


class StatusError(ServiceError):
    """A ServiceError with ``google.rpc`` status details (RetryInfo, QuotaFailure...). The RPC
    method puts them in the trailing metadata (``grpc-status-details-bin``) before the interceptor
    turns the error into the status, so clients read them with ``rpc_status.from_call``."""

    def __init__(self, code: grpc.StatusCode, message: str, details: list[object]):
        super().__init__(code, message)
        self.details = details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        status = status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message)
        for detail in self.details:
            status.details.add().Pack(detail)
        return tuple(rpc_status.to_status(status).trailing_metadata)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(1, round(seconds * 1000)))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _limit_text(limit: str, limits: LimitConfig) -> str:
    if limit == "rpm":
        return f"limit of {limits.rpm} requests per minute"
    if limit == "tpm":
        return f"limit of {limits.tpm} tokens per minute"
    return f"budget of {limits.budget_usd:g} USD per {limits.budget_period if limits.budget_period != 'total' else 'lifetime'}"


def _usd(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"


def _violation_text(v: Violation, hold_usd: float) -> str:
    """What one limit says about a refused request."""
    who, limits = f"{v.scope.kind} {v.scope.id!r}", v.scope.limits
    if v.limit != "budget" or v.spent_usd >= limits.budget_usd:
        return f"{who} reached its {_limit_text(v.limit, limits)}"
    left = max(0.0, limits.budget_usd - v.spent_usd - v.held_usd)
    return (f"{who} has {_usd(left)} USD left of its {_limit_text('budget', limits)} ({_usd(v.spent_usd)} spent, "
            f"{_usd(v.held_usd)} held by calls in flight), less than this request's worst-case cost of "
            f"{_usd(hold_usd)} USD")


def _deployment_tag(runtime: Runtime) -> str:
    """The admission scope tag of a deployment's own limits."""
    return Scope(_DEPLOYMENT, runtime.name, LimitConfig()).tag


def api_key_id(context: grpc.aio.ServicerContext) -> str:
    """The ``x-api-key-id`` of the call (empty when absent). INVALID_ARGUMENT when malformed."""
    for key, value in context.invocation_metadata() or ():
        if key == API_KEY_HEADER and isinstance(value, str):
            if not (1 <= len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value):
                raise invalid_argument(f"invalid {API_KEY_HEADER} {value[:40]!r}: use 1..128 printable ASCII characters")
            return value
    return ""


class Generation:
    """One StreamGenerate / Generate call (module docstring)."""

    def __init__(self, service: LLMService, state: RouterState, request: llm_pb2.StreamGenerateRequest,
                 context: grpc.aio.ServicerContext):
        self.svc = service
        self.settings = service.settings
        self.state = state
        self.request = request
        self.context = context
        self.loop = asyncio.get_running_loop()
        self.tenant = current_tenant()
        self.key_id = api_key_id(context)  # may raise INVALID_ARGUMENT: before the span starts
        self.code = grpc.StatusCode.OK
        self.answered_by = "none"
        self.used_tokens = 0
        self.cost_usd = 0.0
        self._counts: dict[tuple[str, str], Count] = {}
        self.gen: GenerationRequest | None = None
        self._caller: tuple[list[Scope], list[Scope]] | None = None
        #: Admission of this request (None until a deployment was admitted, or without limits).
        self.reservation: Reservation | None = None
        self._admitted = False  # the caller's scopes passed admission (or there are none)
        #: Tags of the deployment scopes of deployments that failed before answering (TPM back to 0).
        self._released: set[str] = set()
        self.span = tm.tracer.start_span("chat", kind=SpanKind.INTERNAL)  # child of the RPC's SERVER span

    # --- token counts ------------------------------------------------------------------------

    def upstream(self, plan: Plan, runtime: Runtime) -> str:
        return plan.upstream_override if plan.upstream_override and runtime is not self.state.extractive \
            else runtime.provider.model

    def prompt_count(self, runtime: Runtime, upstream: str) -> Count:
        """Prompt tokens of the request on ``runtime`` (counted once per tokenizer)."""
        tokenizer = self.svc.tokenizers.for_model(runtime.config.provider, upstream)
        family = "openai" if runtime.config.provider in ("openai", "azure") else runtime.config.provider
        key = (tokenizer.name, family)
        count = self._counts.get(key)
        if count is None:
            gen = self.gen
            assert gen is not None
            count = self._counts[key] = tokenizer.prompt(runtime.config.provider, gen.messages, gen.tools, gen.context)
        return count

    # --- the whole call ----------------------------------------------------------------------

    async def events(self) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        try:
            gen = self.gen = self.svc.validate(self.request)
            routing = self.request.routing
            plan = self._plan(gen, routing)
            span = self.span
            if span.is_recording():
                span.update_name(f"chat {plan.alias}")
                span.set_attributes({
                    "gen_ai.operation.name": "chat", "gen_ai.request.model": plan.alias,
                    "gen_ai.request.max_tokens": gen.max_tokens, "agentmesh.tenant": self.tenant,
                })
                if gen.temperature is not None:
                    span.set_attribute("gen_ai.request.temperature", gen.temperature)
            key = None
            if routing.cache:
                if self.svc.cache is None:
                    raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                       "routing.cache needs the response cache, which needs Redis: set "
                                       "AGENTMESH_LLM_REDIS_URL on the router, or send the request without cache")
                key = cache_key(self.settings.redis_prefix, self.tenant, routing.deployment or plan.alias, gen)
                hit = await self._cache_get(key)
                if hit is not None:
                    await self._admit_cached()
                    for event in self._replay(hit):
                        yield event
                    return
            candidate, call, answer = await self._attempts(plan, gen)
            async for event in self._stream(plan, candidate, call, answer, key):
                yield event
        except StatusError as err:
            self.code = err.code
            self.context.set_trailing_metadata(err.trailing_metadata())
            raise
        except ServiceError as err:
            self.code = err.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            self.code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            self.code = grpc.StatusCode.INTERNAL
            raise
        finally:
            if self.reservation is not None or self.cost_usd:
                settle = self._settle()
                if self.code == grpc.StatusCode.CANCELLED:
                    self.svc.background(settle)  # the caller is gone; never block its cancellation
                else:
                    await settle
            tm.REQUESTS.labels(self.answered_by, self.code.name).inc()
            if self.code != grpc.StatusCode.OK and self.span.is_recording():
                self.span.set_status(Status(StatusCode.ERROR, self.code.name))
                self.span.set_attribute("error.type", self.code.name)
            self.span.end()

    def _plan(self, gen: GenerationRequest, routing: llm_pb2.RoutingOptions) -> Plan:
        def fits(runtime: Runtime) -> tuple[bool, int]:
            window = runtime.config.context_window
            if not window:
                return True, 0
            return self.prompt_count(runtime, runtime.provider.model).tokens + gen.max_tokens <= window, window

        def cost(runtime: Runtime) -> float:
            config = runtime.config
            if not (config.input_usd_per_mtok or config.output_usd_per_mtok):
                return 0.0
            return config.price_usd(self.prompt_count(runtime, runtime.provider.model).tokens, gen.max_tokens)

        try:
            plan = self.state.router.plan(self.request.model, routing, fits, cost)
        except LookupError as err:
            raise not_found(str(err.args[0])) from None
        except ValueError as err:
            raise invalid_argument(str(err)) from None
        if not plan.candidates:
            windows = ", ".join(f"{name}: {window}" for name, window in plan.too_long)
            first = next((r for r in self.state.runtimes.values() if r.name == plan.too_long[0][0]), None)
            tokens = self.prompt_count(first, first.provider.model).tokens if first else 0
            raise invalid_argument(
                f"the prompt ({tokens} tokens) plus max_tokens ({gen.max_tokens}) does not fit the context window of "
                f"any deployment of {plan.alias!r} or of its context-window fallbacks ({windows} tokens): shorten "
                "the conversation or the context, or lower options.max_tokens"
            )
        return plan

    # --- cache -------------------------------------------------------------------------------

    async def _cache_get(self, key: str) -> list[llm_pb2.StreamGenerateResponse] | None:
        try:
            hit = await self.svc.cache.get(key)  # type: ignore[union-attr]
        except redis.RedisError as exc:
            log.warning("response cache unreachable; answering without it", extra={"fields": {"error": str(exc)}})
            return None
        tm.CACHE.labels("hit" if hit else "miss").inc()
        return hit

    def _replay(self, events: list[llm_pb2.StreamGenerateResponse]) -> list[llm_pb2.StreamGenerateResponse]:
        meta = events[0].metadata
        meta.cached = True
        meta.attempts = 0
        events[-1].finish.cost_usd = 0.0
        self.answered_by = meta.deployment or "cache"
        if self.span.is_recording():
            finish = events[-1].finish
            self.span.set_attributes({
                "gen_ai.system": meta.provider, "gen_ai.provider.name": meta.provider, "gen_ai.response.model": meta.model,
                "gen_ai.usage.input_tokens": finish.usage.input_tokens,
                "gen_ai.usage.output_tokens": finish.usage.output_tokens, "agentmesh.llm.cached": True,
                "agentmesh.llm.deployment": meta.deployment, "agentmesh.llm.attempts": 0,
            })
        return events

    async def _cache_put(self, key: str, events: list[llm_pb2.StreamGenerateResponse], ttl_s: int) -> None:
        try:
            if await self.svc.cache.put(key, events, ttl_s):  # type: ignore[union-attr]
                tm.CACHE.labels("store").inc()
        except redis.RedisError as exc:
            log.warning("response cache unreachable; answer not stored", extra={"fields": {"error": str(exc)}})

    # --- admission and spend -----------------------------------------------------------------

    def _scopes(self) -> tuple[list[Scope], list[Scope]]:
        """(limited scopes, all caller scopes for spend) of the caller."""
        if self._caller is None:
            limits = self.state.catalogue.limits
            tenant_limits = limits.for_tenant(self.tenant) or LimitConfig()
            scopes = [Scope(_TENANT, self.tenant, tenant_limits)]
            if self.key_id:
                scopes.append(Scope(_API_KEY, self.key_id, limits.for_api_key(self.key_id) or LimitConfig()))
            self._caller = [s for s in scopes if s.limits.active], scopes
        return self._caller

    def _redis_down(self, exc: Exception) -> bool:
        """True to go on without admission (ADMISSION_FAIL_OPEN); else raises UNAVAILABLE."""
        if self.settings.admission_fail_open:
            log.warning("admission skipped: Redis unreachable (AGENTMESH_LLM_ADMISSION_FAIL_OPEN)",
                        extra={"fields": {"error": str(exc)}})
            return True
        raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                           f"the router cannot check rate limits: Redis is unreachable ({exc}); retry shortly") from None

    async def _admit_cached(self) -> None:
        """A cache hit is a request (the caller's RPM counts it) but uses no upstream tokens and
        costs nothing (no TPM, no budget hold, no deployment limits)."""
        limited, _ = self._scopes()
        scopes = [Scope(s.kind, s.id, LimitConfig(rpm=s.limits.rpm)) for s in limited if s.limits.rpm]
        if not scopes:
            return
        assert self.svc.admission is not None  # start() refuses limits without Redis
        try:
            outcome = await self.svc.admission.admit(scopes, 0)
        except redis.RedisError as exc:
            self._redis_down(exc)
            return
        if outcome.reservation is None:
            raise self._refused(outcome.refusal, 0, 0, 0, None)  # type: ignore[arg-type]

    async def _admit_candidate(self, runtime: Runtime, upstream: str, gen: GenerationRequest) -> Refusal | None:
        """Admission before calling ``runtime`` (module docstring): None when it may be called,
        the Refusal of its own limits (or of a budget that cannot cover its worst case after a
        failover) when it must be skipped. Raises RESOURCE_EXHAUSTED / INVALID_ARGUMENT when the
        caller's scopes refuse the request, UNAVAILABLE when Redis is unreachable (unless
        ADMISSION_FAIL_OPEN)."""
        admission = self.svc.admission
        if admission is None:
            return None
        limited, _ = self._scopes()
        config = runtime.config
        own = [Scope(_DEPLOYMENT, runtime.name, LimitConfig(rpm=config.rpm, tpm=config.tpm))] \
            if config.rpm or config.tpm else []
        budgeted = [s for s in limited if s.limits.budget_usd]
        worst = 0.0
        if budgeted and (config.input_usd_per_mtok or config.output_usd_per_mtok):
            worst = config.price_usd(self.prompt_count(runtime, upstream).tokens, gen.max_tokens)
        first = not self._admitted
        if first:
            required = limited
        elif self.reservation is not None and worst > self.reservation.held_usd:
            required = budgeted  # a pricier deployment: raise the hold first
        else:
            required = []
        if not required and not own:
            self._admitted = True
            return None
        prompt_tokens = self.prompt_count(runtime, upstream).tokens
        tokens = prompt_tokens + gen.max_tokens
        try:
            outcome = await admission.admit(required, tokens, hold_usd=worst, optional=own,
                                            reservation=self.reservation, hold_ttl_s=gen.timeout_s)
        except redis.RedisError as exc:
            self._redis_down(exc)
            self._admitted = True
            return None
        if outcome.reservation is None:
            refusal = outcome.refusal
            assert refusal is not None
            if first:
                raise self._refused(refusal, tokens, prompt_tokens, gen.max_tokens, runtime)
            for violation in refusal.violations:
                tm.REJECTIONS.labels(violation.scope.kind, violation.limit).inc()
            return refusal
        self.reservation = outcome.reservation
        self._admitted = True
        if outcome.refusal is not None:
            for violation in outcome.refusal.violations:
                tm.REJECTIONS.labels(violation.scope.kind, violation.limit).inc()
        return outcome.refusal

    def _refused(self, refusal: Refusal, tokens: int, prompt_tokens: int, max_tokens: int,
                 runtime: Runtime | None) -> ServiceError:
        for violation in refusal.violations:
            tm.REJECTIONS.labels(violation.scope.kind, violation.limit).inc()
        worst = ""
        if runtime is not None and refusal.hold_usd:
            worst = (f" ({prompt_tokens} prompt tokens + max_tokens {max_tokens} at the prices of deployment "
                     f"{runtime.name!r})")
        if refusal.too_large:
            big = next((v for v in refusal.violations if v.limit == "tpm" and tokens > v.scope.limits.tpm), None)
            if big is not None:
                return invalid_argument(
                    f"the request needs {tokens} tokens (prompt {prompt_tokens} + max_tokens {max_tokens}) but "
                    f"{big.scope.kind} {big.scope.id!r} may use at most {big.scope.limits.tpm} tokens per minute: "
                    "lower options.max_tokens or shorten the prompt"
                )
            budget = next(v for v in refusal.violations if v.limit == "budget")
            return invalid_argument(
                f"the request may cost up to {_usd(refusal.hold_usd)} USD{worst}, more than the whole "
                f"{_limit_text('budget', budget.scope.limits)} of {budget.scope.kind} {budget.scope.id!r}: lower "
                "options.max_tokens or shorten the prompt"
            )
        reached = "; ".join(_violation_text(v, refusal.hold_usd) for v in refusal.violations)
        if worst and any(v.limit == "budget" and v.spent_usd < v.scope.limits.budget_usd for v in refusal.violations):
            reached += worst + "; lower options.max_tokens to need less"
        violations = error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=f"{v.scope.kind}:{v.scope.id}",
                                                     description=_limit_text(v.limit, v.scope.limits))
            for v in refusal.violations
        ])
        if refusal.retry_after_s is None:
            return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{reached}; it resets only when the budget is raised", [violations])
        return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{reached}; retry in {refusal.retry_after_s:.3g} s",
                           [retry_info(refusal.retry_after_s), violations])

    async def _settle(self) -> None:
        admission = self.svc.admission
        if admission is None:
            return
        _, everyone = self._scopes()
        try:
            if self.reservation is not None:
                await admission.settle(self.reservation, self.used_tokens, self.cost_usd, charge=everyone,
                                       release=self._released)
            else:
                await admission.charge(everyone, self.cost_usd)
        except redis.RedisError as exc:
            log.warning("could not record usage and spend in Redis", extra={"fields": {"error": str(exc)}})

    # --- attempts ----------------------------------------------------------------------------

    def _backoff(self, retry: int, retry_after_s: float | None) -> float | None:
        """Seconds before retry ``retry + 1``; None when the provider asks for a longer wait than
        ``max_retry_after_s`` (failing over is better)."""
        if retry_after_s is not None:
            return None if retry_after_s > self.settings.max_retry_after_s else retry_after_s
        return self.svc.rng.uniform(0, min(self.settings.retry_max_s, self.settings.retry_base_s * 2**retry))

    async def _attempts(self, plan: Plan, gen: GenerationRequest) -> tuple[Candidate, GenerationRequest, _Answer]:
        """The first candidate that produces a first delta, with its open stream; raises the
        status of the whole plan's failure."""
        loop = self.loop
        deadline = loop.time() + gen.timeout_s
        errors: list[tuple[Candidate, ProviderError]] = []
        skipped_open: list[Runtime] = []
        skipped_limited: list[tuple[Runtime, Refusal]] = []
        attempts = 0
        for candidate in plan.candidates:
            runtime = candidate.runtime
            config = runtime.config
            breaker = runtime.breaker
            permit = await breaker.acquire(gen.timeout_s)
            if not permit:
                skipped_open.append(runtime)
                tm.FAILOVERS.labels(runtime.name, "circuit_open").inc()
                continue
            upstream = self.upstream(plan, runtime)
            try:
                refusal = await self._admit_candidate(runtime, upstream, gen)
            except BaseException:
                breaker.release(permit)
                raise
            if refusal is not None:
                breaker.release(permit)
                skipped_limited.append((runtime, refusal))
                own = refusal.violations[0].scope.kind == _DEPLOYMENT
                tm.FAILOVERS.labels(runtime.name, "deployment_limit" if own else "budget").inc()
                continue
            retries = self.settings.provider_max_retries if config.max_retries is None else config.max_retries
            first_token_s = config.first_token_timeout_s or self.settings.first_token_timeout_s
            total_s = config.total_timeout_s or self.settings.total_timeout_s
            for retry in range(retries + 1):
                remaining = deadline - loop.time()
                if remaining <= 0.001:
                    breaker.release(permit)
                    break
                call = dataclasses.replace(gen, model=upstream, timeout_s=min(remaining, total_s))
                attempts += 1
                outcome = await self._attempt(plan, candidate, call, first_token_s, attempts, errors, permit)
                if isinstance(outcome, _Answer):
                    return candidate, call, outcome
                err = outcome
                errors.append((candidate, err))
                if not err.kind.transient:
                    self._released.add(_deployment_tag(runtime))
                    raise self._refused_by_provider(runtime, call, err)
                if err.kind.retryable and retry < retries:
                    delay = self._backoff(retry, err.retry_after_s)
                    if delay is not None and loop.time() + delay < deadline - DEADLINE_RESERVE_S:
                        permit = await breaker.acquire(gen.timeout_s)
                        if permit:
                            tm.RETRIES.labels(runtime.name, err.kind.value).inc()
                            log.info("retrying a deployment", extra={"fields": {
                                "deployment": runtime.name, "error": str(err), "delay_s": round(delay, 3)}})
                            await asyncio.sleep(delay)
                            continue
                tm.FAILOVERS.labels(runtime.name, err.kind.value).inc()
                break
            self._released.add(_deployment_tag(runtime))  # its own TPM reservation goes back to 0 at settle
        raise self._unanswered(plan, errors, skipped_open, skipped_limited)

    async def _attempt(self, plan: Plan, candidate: Candidate, call: GenerationRequest, first_token_s: float,
                       attempts: int, errors: list[tuple[Candidate, ProviderError]],
                       permit: Permit) -> _Answer | ProviderError:
        """Call one deployment up to its first delta (``permit`` from its breaker): the answer so
        far, or the failure (the breaker told either way)."""
        runtime = candidate.runtime
        provider = runtime.provider
        loop = self.loop
        started = loop.time()
        first_s = min(first_token_s, call.timeout_s)
        if first_s < first_token_s:
            why = "the caller's deadline"
        elif runtime.config.first_token_timeout_s:
            why = f"first_token_timeout_s of deployment {runtime.name!r}"
        else:
            why = "AGENTMESH_LLM_FIRST_TOKEN_TIMEOUT_S"
        span = tm.tracer.start_span(f"chat {call.model or provider.model}", kind=SpanKind.CLIENT,
                                    context=trace.set_span_in_context(self.span))
        if span.is_recording():
            span.set_attributes({
                "gen_ai.operation.name": "chat", "gen_ai.system": provider.name, "gen_ai.provider.name": provider.name,
                "gen_ai.request.model": provider.resolve_model(call), "gen_ai.request.max_tokens": call.max_tokens,
                "agentmesh.llm.deployment": runtime.name, "agentmesh.llm.attempt": attempts,
            })
            if call.temperature is not None:
                span.set_attribute("gen_ai.request.temperature", call.temperature)
            _server_attributes(span, provider.base_url)
        runtime.in_flight += 1
        tm.IN_FLIGHT.labels(runtime.name).inc()
        stream = provider.stream(call)
        try:
            head, done = await _head(stream, started + first_s, provider.name,
                                     f"no first token within {first_s:.3g} s ({why})")
        except ProviderError as err:
            await self._end_attempt(runtime, stream)
            if err.kind.transient:
                await runtime.breaker.report(permit, False)
            else:
                runtime.breaker.release(permit)
            tm.ATTEMPTS.labels(runtime.name, err.kind.value).inc()
            if span.is_recording():
                span.set_status(Status(StatusCode.ERROR, str(err)))
                span.set_attribute("error.type", err.kind.value)
            span.end()
            log.warning("deployment failed before its first delta", extra={"fields": {
                "deployment": runtime.name, "provider": provider.name, "error_kind": err.kind.value, "error": str(err)}})
            return err
        except BaseException:
            await self._end_attempt(runtime, stream)
            runtime.breaker.release(permit)
            span.end()
            raise
        ttft = loop.time() - started
        runtime.observe_ttft(ttft)
        tm.TTFT.labels(runtime.name).observe(ttft)
        return _Answer(stream, head, done, started, attempts, span, self._notice(plan, candidate, errors), permit)

    async def _end_attempt(self, runtime: Runtime, stream: AsyncIterator[Batch]) -> None:
        runtime.in_flight -= 1
        tm.IN_FLIGHT.labels(runtime.name).dec()
        await stream.aclose()  # type: ignore[attr-defined]

    def _notice(self, plan: Plan, candidate: Candidate, errors: list[tuple[Candidate, ProviderError]]) -> str:
        if candidate.runtime is not self.state.extractive or plan.alias == EXTRACTIVE or plan.pinned:
            return ""  # an LLM answered, or the caller asked for the extractive provider
        if len(errors) == 1:
            failed, err = errors[0]
            return (f"The {failed.runtime.provider.name} provider failed before answering ({err}); "
                    "the extractive provider answered instead. ")
        if errors:
            listed = "; ".join(f"{c.runtime.name} ({c.runtime.provider.name}): {e}" for c, e in errors)
            return f"Every deployment failed before answering ({listed}); the extractive provider answered instead. "
        return f"No deployment of {plan.alias!r} could be called now; the extractive provider answered instead. "

    # --- the answer --------------------------------------------------------------------------

    async def _stream(self, plan: Plan, candidate: Candidate, call: GenerationRequest, answer: _Answer,
                      cache_key_: str | None) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        runtime = candidate.runtime
        provider = runtime.provider
        loop = self.loop
        metadata = provider.metadata(call)
        if answer.notice:
            log.warning("no deployment answered before its first delta; the extractive provider answered instead",
                        extra={"fields": {"model": plan.alias, "notice": answer.notice}})
        metadata.notice = answer.notice + metadata.notice
        metadata.deployment = runtime.name
        metadata.requested_model = plan.alias
        metadata.attempts = answer.attempts
        self.answered_by = runtime.name
        head_event = llm_pb2.StreamGenerateResponse(metadata=metadata)
        end = answer.started + call.timeout_s
        stream = answer.stream
        sent: list[llm_pb2.StreamGenerateResponse] = []
        first_t = last_t = loop.time()
        finish: llm_pb2.Finish | None = None
        backlog = self.settings.coalesce_backlog
        try:
            yield head_event
            try:
                for batch in answer.head:
                    if backlog and len(batch) > backlog:
                        batch = coalesce(batch, backlog)  # noqa: PLW2901
                    if batch[-1].HasField("finish"):
                        finish = self._complete(runtime, call, sent, batch)
                    for event in batch:
                        yield event
                    sent.extend(batch)
                if not answer.done and finish is None:
                    watchdog = _Watchdog(loop, end)
                    try:
                        while True:
                            if watchdog.expired:
                                raise ProviderError(ErrorKind.TIMEOUT, _total_timeout(call))
                            watchdog.arm()
                            try:
                                batch = await anext(stream)
                            except StopAsyncIteration:
                                break
                            except asyncio.CancelledError:
                                if watchdog.caught():
                                    raise ProviderError(ErrorKind.TIMEOUT, _total_timeout(call)) from None
                                raise
                            finally:
                                watchdog.reading = False
                            last_t = loop.time()
                            if backlog and len(batch) > backlog:
                                batch = coalesce(batch, backlog)
                            if batch[-1].HasField("finish"):
                                finish = self._complete(runtime, call, sent, batch)
                            for event in batch:
                                yield event
                            sent.extend(batch)
                            if finish is not None:
                                break
                    finally:
                        watchdog.close()
                if finish is None:
                    raise ProviderError(ErrorKind.PROTOCOL, f"{provider.name} ended the stream without a finish")
            except ProviderError as err:
                await runtime.breaker.report(answer.permit, False)
                tm.ATTEMPTS.labels(runtime.name, err.kind.value).inc()
                interrupted, status = self._interrupted(runtime, call, sent, err)
                yield interrupted
                raise status from err
            await runtime.breaker.report(answer.permit, True)
            tm.ATTEMPTS.labels(runtime.name, "ok").inc()
            deltas = sum(1 for e in sent if e.WhichOneof("event") in _DELTAS)
            if deltas > 1:
                tm.ITL.labels(runtime.name).observe((last_t - first_t) / (deltas - 1))
            if self.span.is_recording() or answer.span.is_recording():
                self._span_done(answer.span, metadata, finish)
            if cache_key_ is not None and provider.is_llm:
                ttl = self.request.routing.cache_ttl_s or self.settings.cache_ttl_s
                await self._cache_put(cache_key_, [head_event, *sent], ttl)
        except (asyncio.CancelledError, GeneratorExit):
            runtime.breaker.release(answer.permit)
            raise
        finally:
            runtime.in_flight -= 1
            tm.IN_FLIGHT.labels(runtime.name).dec()
            answer.span.end()
            await stream.aclose()  # type: ignore[attr-defined] - closes the upstream HTTP stream

    def _output_tokens(self, runtime: Runtime, call: GenerationRequest,
                       events: list[llm_pb2.StreamGenerateResponse]) -> tuple[int, int]:
        """(deltas, tokens) of the text and tool-call deltas in ``events``."""
        texts: list[str] = []
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "text_delta":
                texts.append(event.text_delta.text)
            elif kind == "tool_call_delta":
                d = event.tool_call_delta
                texts.append(d.name + d.arguments_delta)
        tokenizer = self.svc.tokenizers.for_model(runtime.config.provider, call.model or runtime.provider.model)
        return len(texts), tokenizer.texts([t for t in texts if t])

    def _complete(self, runtime: Runtime, call: GenerationRequest, sent: list[llm_pb2.StreamGenerateResponse],
                  batch: Batch) -> llm_pb2.Finish:
        """Fill in the closing batch's usage (when the provider reported none) and cost."""
        finish = batch[-1].finish
        if finish.usage_estimated:
            input_tokens = self.prompt_count(runtime, call.model or runtime.provider.model).tokens
            _, output_tokens = self._output_tokens(runtime, call, [*sent, *batch])
            usage = common_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                                     total_tokens=input_tokens + output_tokens)
            finish.usage.CopyFrom(usage)
            for event in batch:
                if event.HasField("usage"):
                    event.usage.CopyFrom(usage)
        usage = finish.usage
        finish.cost_usd = runtime.config.price_usd(usage.input_tokens, usage.output_tokens)
        self._account(runtime, usage.input_tokens, usage.output_tokens, finish.cost_usd)
        return finish

    def _account(self, runtime: Runtime, input_tokens: int, output_tokens: int, cost: float) -> None:
        self.used_tokens = input_tokens + output_tokens
        self.cost_usd = cost
        tm.TOKENS.labels(runtime.name, "input").inc(input_tokens)
        tm.TOKENS.labels(runtime.name, "output").inc(output_tokens)
        if cost:
            tm.COST.labels(runtime.name).inc(cost)

    def _interrupted(self, runtime: Runtime, call: GenerationRequest, sent: list[llm_pb2.StreamGenerateResponse],
                     err: ProviderError) -> tuple[llm_pb2.StreamGenerateResponse, ServiceError]:
        provider = runtime.provider
        deltas, output_tokens = self._output_tokens(runtime, call, sent)
        input_count = self.prompt_count(runtime, call.model or provider.model)
        usage = common_pb2.Usage(input_tokens=input_count.tokens, output_tokens=output_tokens,
                                 total_tokens=input_count.tokens + output_tokens)
        cost = runtime.config.price_usd(usage.input_tokens, usage.output_tokens)
        self._account(runtime, usage.input_tokens, usage.output_tokens, cost)
        tm.INTERRUPTED.labels(runtime.name).inc()
        tokenizer = self.svc.tokenizers.for_model(runtime.config.provider, call.model or provider.model).name
        message = (
            f"the {provider.name} stream was cut after {_plural(deltas, 'delta')} (about "
            f"{_plural(output_tokens, 'token')}, counted with {tokenizer}) had been sent: {err}. The answer received "
            "so far is incomplete."
        )
        code = grpc.StatusCode.DEADLINE_EXCEEDED if err.kind == ErrorKind.TIMEOUT else grpc.StatusCode.UNAVAILABLE
        log.warning("provider stream cut after its first delta", extra={"fields": {
            "deployment": runtime.name, "provider": provider.name, "error": str(err), "sent_deltas": deltas}})
        self.context.set_trailing_metadata(((SENT_DELTAS_KEY, str(deltas)), (SENT_TOKENS_KEY, str(output_tokens))))
        event = llm_pb2.StreamGenerateResponse(interrupted=llm_pb2.StreamInterrupted(
            partial_usage=usage, usage_estimated=True, cost_usd=cost, sent_deltas=deltas, reason=message))
        if self.span.is_recording():
            self.span.set_attributes({"gen_ai.usage.input_tokens": usage.input_tokens,
                                      "gen_ai.usage.output_tokens": usage.output_tokens,
                                      "agentmesh.llm.deployment": runtime.name, "agentmesh.llm.interrupted": True})
        return event, ServiceError(code, message)

    def _span_done(self, attempt_span: trace.Span, metadata: llm_pb2.ResponseMetadata, finish: llm_pb2.Finish) -> None:
        reason = common_pb2.FinishReason.Name(finish.reason).removeprefix("FINISH_REASON_").lower()
        attributes = {
            "gen_ai.system": metadata.provider, "gen_ai.provider.name": metadata.provider,
            "gen_ai.response.model": metadata.model, "gen_ai.response.finish_reasons": [reason],
            "gen_ai.usage.input_tokens": finish.usage.input_tokens,
            "gen_ai.usage.output_tokens": finish.usage.output_tokens,
        }
        attempt_span.set_attributes(attributes)
        self.span.set_attributes({**attributes, "agentmesh.llm.deployment": metadata.deployment,
                                  "agentmesh.llm.attempts": metadata.attempts, "agentmesh.llm.cached": False,
                                  "agentmesh.llm.cost_usd": finish.cost_usd})

    # --- statuses ----------------------------------------------------------------------------

    def _refused_by_provider(self, runtime: Runtime, call: GenerationRequest, err: ProviderError) -> ServiceError:
        """The status of a failure no other deployment would fix (400, 401/403, 404)."""
        name = runtime.provider.name
        if err.kind == ErrorKind.BAD_REQUEST:
            return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} refused the request ({err})")
        if err.kind == ErrorKind.AUTH:
            return ServiceError(grpc.StatusCode.UNAVAILABLE,
                                f"{name} rejected the router's credentials ({err}): set a valid key in "
                                f"{runtime.config.key_variable}")
        where = (f"AGENTMESH_LLM_{name.upper()}_BASE_URL" if self.state.from_env
                 else f"base_url of deployment {runtime.name!r} in the catalogue")
        return ServiceError(grpc.StatusCode.NOT_FOUND,
                            f"{name} does not know model {runtime.provider.resolve_model(call)!r} ({err}): pass a "
                            f"model that {name} serves, or check {where}")

    def _unanswered(self, plan: Plan, errors: list[tuple[Candidate, ProviderError]], skipped_open: list[Runtime],
                    skipped_limited: list[tuple[Runtime, Refusal]]) -> ServiceError:
        """The status when no candidate answered."""
        skipped = []
        if skipped_open:
            skipped.append("circuit open: " + ", ".join(r.name for r in skipped_open))
        own = [(r, f) for r, f in skipped_limited if f.violations[0].scope.kind == _DEPLOYMENT]
        if own:
            skipped.append("own rate limit reached: " + ", ".join(r.name for r, _ in own))
        unaffordable = [(r, f) for r, f in skipped_limited if f.violations[0].scope.kind != _DEPLOYMENT]
        if unaffordable:
            skipped.append("budget cannot cover its worst-case cost: " + ", ".join(r.name for r, _ in unaffordable))
        if not errors:
            # (A deployment is skipped for the budget only after an earlier one was admitted, and
            # that one either failed — then `errors` is not empty — or was at its own limit.)
            if skipped_limited and not skipped_open:
                waits = [r.retry_after_s for _, r in skipped_limited if r.retry_after_s is not None]
                wait = min(waits) if waits else 60.0
                limits = "its own rate limit" if not unaffordable else "its own rate limit or the caller's budget"
                return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"every deployment of {plan.alias!r} is at {limits} "
                                   f"({'; '.join(skipped)}); retry in {wait:.3g} s", [retry_info(wait)])
            waits = [r.breaker.retry_in_s() for r in skipped_open] + [
                r.retry_after_s for _, r in skipped_limited if r.retry_after_s is not None]
            wait = max(0.001, min(waits)) if waits else 1.0
            return StatusError(grpc.StatusCode.UNAVAILABLE,
                               f"no deployment of {plan.alias!r} can be called now ({'; '.join(skipped)}); "
                               f"retry in {wait:.3g} s", [retry_info(wait)])
        candidate, err = errors[-1]
        name = candidate.runtime.provider.name
        if len({id(c.runtime) for c, _ in errors}) > 1 or skipped:
            listed = "; ".join(f"{c.runtime.name} ({c.runtime.provider.name}): {e}" for c, e in errors)
            if skipped:
                listed += "; skipped — " + "; ".join(skipped)
            summary = f"every deployment of {plan.alias!r} failed before answering: {listed}"
        else:
            summary = ""
        if all(e.kind == ErrorKind.RATE_LIMITED for _, e in errors):
            waits = [e.retry_after_s for _, e in errors if e.retry_after_s is not None]
            message = summary or f"{name} rate-limited the request ({err})"
            if waits:
                return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{message}; retry after {min(waits):g} s",
                                   [retry_info(min(waits))])
            return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{message}; retry later")
        if err.kind == ErrorKind.TIMEOUT:
            return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, summary or f"{name} timed out before answering: {err}")
        return ServiceError(grpc.StatusCode.UNAVAILABLE, summary or f"{name} failed before answering: {err}")


@dataclasses.dataclass
class _Answer:
    """A deployment that produced its first delta: the open stream and the events so far."""

    stream: AsyncIterator[Batch]
    head: list[Batch]
    done: bool
    started: float
    attempts: int
    span: trace.Span
    notice: str
    #: The breaker's permit for this call (reported with the stream's verdict).
    permit: Permit


def _total_timeout(call: GenerationRequest) -> str:
    return (f"the generation did not finish within {call.timeout_s:.3g} s (the deployment's total timeout, "
            "AGENTMESH_LLM_TOTAL_TIMEOUT_S, or the caller's deadline)")


class _Watchdog:
    """A stream's total timeout with one timer per stream instead of one per network read (an
    ``asyncio.timeout`` per read cost ~3 µs, a tenth of the router's CPU per token in burst). When
    it fires while the stream waits for the upstream (``reading``) it cancels that wait, as
    ``asyncio.timeout`` does (:meth:`caught` tells its own cancellation from the caller's); when it
    fires while the caller is being sent to, ``expired`` fails the next read at once."""

    __slots__ = ("_base", "_cancelled", "_handle", "_task", "expired", "reading")

    def __init__(self, loop: asyncio.AbstractEventLoop, end: float):
        self._task: asyncio.Task | None = None
        self._base = 0
        self._cancelled = False
        self.expired = False
        self.reading = False
        self._handle = loop.call_at(end, self._fire)

    def arm(self) -> None:
        """The stream is about to wait for the upstream (in the current task)."""
        task = asyncio.current_task()
        if task is not self._task:
            self._task = task
            self._base = task.cancelling() if task is not None else 0
        self.reading = True

    def _fire(self) -> None:
        self.expired = True
        if self.reading and self._task is not None:
            self._cancelled = True
            self._task.cancel()

    def caught(self) -> bool:
        """Whether the CancelledError being handled is the watchdog's (then it is consumed)."""
        return self._cancelled and self._task is not None and self._task.uncancel() <= self._base

    def close(self) -> None:
        self._handle.cancel()


def coalesce(batch: Batch, backlog: int) -> Batch:
    """``batch`` (events that arrived together) with its runs merged (:func:`merge_deltas`) when
    it holds more than ``backlog`` text / tool-call deltas: the stream has fallen that far behind
    its upstream (``AGENTMESH_LLM_COALESCE_BACKLOG``); otherwise unchanged."""
    waiting = 0
    for event in batch:
        if event.WhichOneof("event") in _DELTAS:
            waiting += 1
    return merge_deltas(batch) if waiting > backlog else batch


def merge_deltas(events: list[llm_pb2.StreamGenerateResponse]) -> Batch:
    """``events`` with each run of text deltas, and each run of argument fragments of one tool
    call (after its opening delta), joined into one event. The concatenated text and arguments
    are unchanged."""
    out: Batch = []
    pieces: list[str] = []
    run_kind = ""
    run_index = -1

    def close() -> None:
        if len(pieces) > 1:
            last = out[-1]
            if run_kind == "text_delta":
                last.text_delta.text = "".join(pieces)
            else:
                last.tool_call_delta.arguments_delta = "".join(pieces)
        pieces.clear()

    for event in events:
        kind = event.WhichOneof("event")
        if kind == "text_delta":
            if run_kind == "text_delta":
                pieces.append(event.text_delta.text)
                continue
            close()
            run_kind, pieces[:] = kind, [event.text_delta.text]
        elif kind == "tool_call_delta":
            delta = event.tool_call_delta
            if run_kind == "tool_call_delta" and delta.index == run_index and not delta.id and not delta.name:
                pieces.append(delta.arguments_delta)
                continue
            close()
            run_kind, run_index, pieces[:] = kind, delta.index, [delta.arguments_delta]
        else:
            close()
            run_kind = ""
        out.append(event)
    close()
    return out


def _server_attributes(span: trace.Span, base_url: str) -> None:
    if not base_url:
        return
    from urllib.parse import urlsplit  # noqa: PLC0415

    parts = urlsplit(base_url)
    if parts.hostname:
        span.set_attribute("server.address", parts.hostname)
        span.set_attribute("server.port", parts.port or (443 if parts.scheme == "https" else 80))


async def _head(stream: AsyncIterator[Batch], deadline: float, name: str, timeout_message: str) -> tuple[list[Batch], bool]:
    """Batches up to and including the first with a text / tool-call delta, and whether the stream
    ended. ProviderError(TIMEOUT, ``timeout_message``) past ``deadline`` (a ``loop.time()``
    instant); ProviderError(PROTOCOL) when the stream ends with no delta and no finish."""
    head: list[Batch] = []
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                batch = await anext(stream)
        except StopAsyncIteration:
            if not head or not head[-1][-1].HasField("finish"):
                raise ProviderError(ErrorKind.PROTOCOL, f"{name} ended the stream without a finish") from None
            return head, True
        except TimeoutError:
            raise ProviderError(ErrorKind.TIMEOUT, timeout_message) from None
        head.append(batch)
        if any(event.WhichOneof("event") in _DELTAS for event in batch):
            return head, False
        if batch[-1].HasField("finish"):
            return head, True
