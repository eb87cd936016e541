"""Routing: which deployments a request tries, in which order, and their live state.

For each request the :class:`Router` builds a :class:`Plan` — the candidate deployments in order:
1. the deployments of the requested alias, ordered by the alias's strategy (or only the pinned
   ``RoutingOptions.deployment``);
2. when the prompt plus ``max_tokens`` fits none of them (``context_window``), the deployments of
   its ``context_window_fallbacks`` aliases instead; candidates that do not fit are dropped;
3. the deployments of its ``fallbacks`` aliases (or the request's ``fallback_models``), each
   alias ordered by its own strategy;
4. the extractive provider, when ``AGENTMESH_LLM_FALLBACK_TO_EXTRACTIVE`` is on, nothing was
   pinned, and the request fits some deployment (a prompt too long for every deployment is the
   caller's to shorten: INVALID_ARGUMENT, not a quoted answer).
The router walks the plan, skipping deployments whose circuit is open or whose own RPM/TPM
limit is reached, and fails over on transient failures before the first token.

Strategies (``strategy`` of an alias):
- ``fallback``: catalogue order;
- ``weighted``: a random order in which each deployment comes first with probability
  proportional to its weight — weighted sampling without replacement by Efraimidis & Spirakis,
  "Weighted random sampling with a reservoir" (Information Processing Letters 97(5), 2006): sort by
  ``u ** (1 / weight)``, u uniform in (0, 1); weight 0 goes last;
- ``least_in_flight``: fewest requests in flight on this replica first (ties in random order);
- ``lowest_latency``: lowest exponentially weighted moving average of the time to first token
  (:data:`TTFT_EWMA_ALPHA`) on this replica first; deployments not measured yet go first so they
  get measured;
- ``lowest_cost``: lowest estimated cost of this request (prompt tokens × input price +
  ``max_tokens`` × output price) first.

In-flight counts and latency averages are per router replica (like Envoy's outlier detection):
they describe what this replica sees. Circuit breakers are per replica without Redis, and shared
by all replicas with it (:mod:`.breakers`). Limits that must hold across replicas live in Redis
(:mod:`.admission`).
"""

from __future__ import annotations

import collections
import enum
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm.catalogue import EXTRACTIVE, Catalogue, CircuitBreakerConfig, DeploymentConfig, ModelConfig
from agentmesh.services.llm.counting import Tokenizer
from agentmesh.services.llm.providers.base import Provider

if TYPE_CHECKING:
    from agentmesh.services.llm.breakers import SharedCircuitBreaker

#: Weight of the newest time-to-first-token sample in the moving average.
TTFT_EWMA_ALPHA = 0.2
#: Most aliases a request may list in RoutingOptions.fallback_models.
MAX_REQUEST_FALLBACKS = 8

_STRATEGIES = {
    "fallback": llm_pb2.ROUTING_STRATEGY_FALLBACK,
    "weighted": llm_pb2.ROUTING_STRATEGY_WEIGHTED,
    "least_in_flight": llm_pb2.ROUTING_STRATEGY_LEAST_IN_FLIGHT,
    "lowest_latency": llm_pb2.ROUTING_STRATEGY_LOWEST_LATENCY,
    "lowest_cost": llm_pb2.ROUTING_STRATEGY_LOWEST_COST,
}


class Circuit(enum.Enum):
    CLOSED = llm_pb2.CIRCUIT_STATE_CLOSED
    OPEN = llm_pb2.CIRCUIT_STATE_OPEN
    HALF_OPEN = llm_pb2.CIRCUIT_STATE_HALF_OPEN


class CircuitBreaker:
    """Error-rate circuit breaker of one deployment (see :class:`CircuitBreakerConfig`).

    Outcomes count only for calls that reached a verdict: a success, or a transient failure
    (connection, timeout, 429, 5xx, a cut stream). Refusals of the request itself (400, 401,
    404) and cancellations by the caller say nothing about the deployment's health.
    ``on_change(state)`` is called on every transition (metrics)."""

    def __init__(self, config: CircuitBreakerConfig, on_change: Callable[[Circuit], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque()
        self._failures = 0
        self._state = Circuit.CLOSED
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> Circuit:
        if self._state is Circuit.OPEN and self._clock() - self._opened_at >= self.config.open_s:
            self._set(Circuit.HALF_OPEN)
        return self._state

    def retry_in_s(self) -> float:
        """Seconds until an open circuit lets a probe through (0 unless open)."""
        if self.state is not Circuit.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.config.open_s - self._clock())

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open state only one probe at a time."""
        state = self.state
        if state is Circuit.CLOSED:
            return True
        if state is Circuit.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def release(self, permit: object = True) -> None:
        """The allowed call ended without a verdict (cancelled, refused before sending)."""
        self._probing = False

    # The interface the pipeline uses, shared with :class:`.breakers.SharedCircuitBreaker`.

    async def acquire(self, lease_s: float = 0.0) -> bool:
        """:meth:`allow` (the permit to pass to :meth:`report` / :meth:`release`)."""
        return self.allow()

    async def report(self, permit: object, success: bool) -> None:
        """:meth:`record`."""
        self.record(success)

    async def refresh(self) -> None:
        """Nothing to refresh: the state is this replica's own."""

    def record(self, success: bool) -> None:
        """The verdict of an allowed call."""
        now = self._clock()
        if self._state is Circuit.HALF_OPEN:
            self._probing = False
            if success:
                self._outcomes.clear()
                self._failures = 0
                self._set(Circuit.CLOSED)
            else:
                self._open(now)
            return
        if self._state is Circuit.OPEN:
            return  # a call admitted before the circuit opened
        self._outcomes.append((now, success))
        self._failures += not success
        horizon = now - self.config.window_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            _, ok = self._outcomes.popleft()
            self._failures -= not ok
        total = len(self._outcomes)
        if not success and total >= self.config.min_requests and self._failures / total >= self.config.failure_rate:
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._outcomes.clear()
        self._failures = 0
        self._set(Circuit.OPEN)

    def _set(self, state: Circuit) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change:
                self._on_change(state)


class Runtime:
    """A deployment with its provider client and live state on this replica."""

    def __init__(self, config: DeploymentConfig, provider: Provider, breaker: CircuitBreaker | SharedCircuitBreaker,
                 tokenizer: Tokenizer):
        self.config = config
        self.provider = provider
        self.breaker = breaker
        self.tokenizer = tokenizer
        self.in_flight = 0
        #: Moving average of the time to first token, seconds; None until measured.
        self.ttft_ewma_s: float | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def observe_ttft(self, seconds: float) -> None:
        prev = self.ttft_ewma_s
        self.ttft_ewma_s = seconds if prev is None else prev + TTFT_EWMA_ALPHA * (seconds - prev)


@dataclass
class Candidate:
    runtime: Runtime
    #: Alias the deployment was reached through.
    alias: str


@dataclass
class Plan:
    """Where a request goes: ``alias`` it was routed by, the ordered ``candidates``, and the
    upstream model to send when the request named a model that is no alias (passthrough)."""

    alias: str
    candidates: list[Candidate]
    upstream_override: str = ""
    pinned: bool = False
    #: Candidates dropped because the request does not fit their context window.
    too_long: list[tuple[str, int]] = field(default_factory=list)


def order(strategy: str, runtimes: Sequence[Runtime], cost: Callable[[Runtime], float],
          rng: random.Random) -> list[Runtime]:
    """``runtimes`` in the order ``strategy`` tries them (module docstring)."""
    items = list(runtimes)
    if len(items) < 2 or strategy == "fallback":
        return items
    if strategy == "weighted":
        def key(r: Runtime) -> float:
            w = r.config.weight
            return rng.random() ** (1.0 / w) if w > 0 else -1.0

        return sorted(items, key=key, reverse=True)
    if strategy == "least_in_flight":
        rng.shuffle(items)
        return sorted(items, key=lambda r: r.in_flight)
    if strategy == "lowest_latency":
        return sorted(items, key=lambda r: -1.0 if r.ttft_ewma_s is None else r.ttft_ewma_s)
    if strategy == "lowest_cost":
        return sorted(items, key=cost)
    raise ValueError(f"unknown strategy {strategy!r}")


def strategy_proto(strategy: str) -> int:
    return _STRATEGIES[strategy]


class Router:
    """Resolves model names to plans over one catalogue's runtimes."""

    def __init__(self, catalogue: Catalogue, runtimes: dict[str, Runtime], extractive: Runtime,
                 fallback_to_extractive: bool, rng: random.Random | None = None):
        self.catalogue = catalogue
        self.runtimes = runtimes
        self.extractive = extractive
        self.fallback_to_extractive = fallback_to_extractive
        self.rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        # upstream model name → deployments serving it (a model name is accepted as an implicit alias)
        self._by_upstream: dict[str, list[Runtime]] = {}
        for dep in catalogue.deployments():
            self._by_upstream.setdefault(dep.model, []).append(runtimes[dep.name])

    def _model(self, alias: str) -> ModelConfig | None:
        return self.catalogue.models.get(alias)

    def aliases(self) -> list[str]:
        return list(self.catalogue.models)

    def resolve(self, model: str, deployment: str, fallback_models: Sequence[str]) -> Plan:
        """The unordered skeleton of a plan. Raises LookupError (unknown model / deployment /
        fallback alias, message for the caller) and ValueError (too many fallbacks)."""
        if len(fallback_models) > MAX_REQUEST_FALLBACKS:
            raise ValueError(f"routing.fallback_models lists {len(fallback_models)} aliases; at most "
                             f"{MAX_REQUEST_FALLBACKS} are allowed")
        for alias in fallback_models:
            if alias != EXTRACTIVE and alias not in self.catalogue.models:
                raise LookupError(f"routing.fallback_models names unknown model {alias!r}; {self._known()}")
        if deployment:
            runtime = self.extractive if deployment == EXTRACTIVE else self.runtimes.get(deployment)
            if runtime is None:
                names = ", ".join(sorted(self.runtimes)) or "none"
                raise LookupError(f"routing.deployment {deployment!r} is not in the catalogue (deployments: {names})")
            alias = model or self._alias_of(deployment)
            return Plan(alias=alias, candidates=[Candidate(runtime, alias)], pinned=True)
        alias = model or self.catalogue.default_alias
        if alias == EXTRACTIVE:
            return Plan(alias=EXTRACTIVE, candidates=[Candidate(self.extractive, EXTRACTIVE)])
        if alias in self.catalogue.models:
            return Plan(alias=alias, candidates=[])
        if alias in self._by_upstream:
            return Plan(alias=alias, candidates=[Candidate(r, alias) for r in self._by_upstream[alias]])
        if self.catalogue.passthrough and self.catalogue.models:
            return Plan(alias=self.catalogue.default_alias, candidates=[], upstream_override=alias)
        raise LookupError(f"model {alias!r} is not in the catalogue; {self._known()}")

    def _known(self) -> str:
        names = [*self.catalogue.models, EXTRACTIVE]
        return f"use one of: {', '.join(names)} (ListModels describes them)"

    def _alias_of(self, deployment: str) -> str:
        for alias, model in self.catalogue.models.items():
            if any(d.name == deployment for d in model.deployments):
                return alias
        return EXTRACTIVE

    def plan(self, model: str, routing: llm_pb2.RoutingOptions, fits: Callable[[Runtime], tuple[bool, int]],
             cost: Callable[[Runtime], float]) -> Plan:
        """The ordered plan of a request (module docstring). ``fits(runtime)`` says whether the
        request fits the deployment's context window (and the window); ``cost(runtime)`` estimates
        the request's cost there. Raises LookupError / ValueError as :meth:`resolve` does."""
        plan = self.resolve(model, routing.deployment, routing.fallback_models)
        if plan.pinned:
            self._drop_too_long(plan, fits)
            if routing.fallback_models:
                self._extend(plan, routing.fallback_models, fits, cost)
            return plan
        config = self._model(plan.alias)
        if config is not None:
            runtimes = [self.runtimes[d.name] for d in config.deployments]
            plan.candidates = [Candidate(r, plan.alias) for r in order(config.strategy, runtimes, cost, self.rng)]
        self._drop_too_long(plan, fits)
        if not plan.candidates and config is not None:
            for alias in config.context_window_fallbacks:
                self._extend(plan, [alias], fits, cost)
        fallbacks = list(routing.fallback_models) if routing.fallback_models else (config.fallbacks if config else [])
        self._extend(plan, fallbacks, fits, cost)
        if not plan.candidates and plan.too_long:
            return plan  # too long for every deployment: the caller must shorten it, no quoting instead
        if self.fallback_to_extractive and plan.alias != EXTRACTIVE and all(
            c.runtime is not self.extractive for c in plan.candidates
        ):
            plan.candidates.append(Candidate(self.extractive, EXTRACTIVE))
        return plan

    def _drop_too_long(self, plan: Plan, fits: Callable[[Runtime], tuple[bool, int]]) -> None:
        kept = []
        for candidate in plan.candidates:
            ok, window = fits(candidate.runtime)
            if ok:
                kept.append(candidate)
            else:
                plan.too_long.append((candidate.runtime.name, window))
        plan.candidates = kept

    def _extend(self, plan: Plan, aliases: Sequence[str], fits: Callable[[Runtime], tuple[bool, int]],
                cost: Callable[[Runtime], float]) -> None:
        present = {id(c.runtime) for c in plan.candidates}
        for alias in aliases:
            if alias == EXTRACTIVE:
                if id(self.extractive) not in present:
                    plan.candidates.append(Candidate(self.extractive, EXTRACTIVE))
                    present.add(id(self.extractive))
                continue
            config = self._model(alias)
            if config is None:
                continue
            runtimes = [self.runtimes[d.name] for d in config.deployments]
            for runtime in order(config.strategy, runtimes, cost, self.rng):
                if id(runtime) in present:
                    continue
                ok, window = fits(runtime)
                if not ok:
                    plan.too_long.append((runtime.name, window))
                    continue
                plan.candidates.append(Candidate(runtime, alias))
                present.add(id(runtime))
