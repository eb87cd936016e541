"""Prometheus metrics (default registry) and OpenTelemetry spans of the router.

Metrics (all prefixed ``agentmesh_llm_``; ``deployment`` is the catalogue name):

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| ``requests_total`` | counter | deployment, code | finished requests by the deployment that answered (``none`` when refused before any call) and gRPC status code |
| ``attempts_total`` | counter | deployment, outcome | upstream calls: ``ok`` or the failure kind (``server``, ``rate_limited``, ``timeout``...) |
| ``time_to_first_token_seconds`` | histogram | deployment | from sending the upstream request to its first text / tool-call delta |
| ``inter_token_latency_seconds`` | histogram | deployment | per stream: mean gap between consecutive deltas (OpenTelemetry's ``gen_ai.server.time_per_output_token``) |
| ``tokens_total`` | counter | deployment, type | ``input`` / ``output`` tokens of finished (and cut) generations |
| ``cost_usd_total`` | counter | deployment | USD at catalogue prices |
| ``retries_total`` | counter | deployment, reason | retries on the same deployment |
| ``failovers_total`` | counter | deployment, reason | a deployment given up for the next candidate before the first token: the failure kind, ``circuit_open``, ``deployment_limit`` (its own RPM/TPM) or ``budget`` (the caller's budget cannot cover its worst case) |
| ``circuit_state`` | gauge | deployment | 0 closed, 1 half-open, 2 open (as this replica sees a shared breaker) |
| ``in_flight`` | gauge | deployment | upstream calls in progress on this replica |
| ``streams_interrupted_total`` | counter | deployment | streams cut after their first delta |
| ``admission_rejections_total`` | counter | scope, limit | refusals (scope ``tenant`` / ``api_key`` / ``deployment``; limit ``rpm`` / ``tpm`` / ``budget``) |
| ``cache_requests_total`` | counter | result | ``hit`` / ``miss`` / ``store`` |
| ``catalogue_reloads_total`` | counter | result | ``ok`` / ``error`` |

Spans (``opentelemetry-api``; a no-op until the process installs an SDK tracer provider) follow the
GenAI semantic conventions: one ``chat {model}`` span per request (kind INTERNAL, a child of the
RPC's SERVER span that the runtime's gRPC instrumentation starts) and one
``chat {upstream model}`` child span (kind CLIENT) per upstream attempt, with ``gen_ai.system``
(also ``gen_ai.provider.name``), ``gen_ai.operation.name``, ``gen_ai.request.model``,
``gen_ai.request.max_tokens``, ``gen_ai.request.temperature``, ``gen_ai.response.model``,
``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``,
``server.address`` / ``server.port`` and ``error.type``, plus ``agentmesh.llm.*`` routing
attributes (deployment, attempts, cached, cost_usd, tenant).
"""

from __future__ import annotations

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from agentmesh.services.llm.routing import Circuit

tracer = trace.get_tracer("agentmesh.llm")

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

REQUESTS = Counter("agentmesh_llm_requests_total", "Finished requests by answering deployment and gRPC status code.",
                   ["deployment", "code"])
ATTEMPTS = Counter("agentmesh_llm_attempts_total", "Upstream calls by deployment and outcome.",
                   ["deployment", "outcome"])
TTFT = Histogram("agentmesh_llm_time_to_first_token_seconds", "Time from the upstream request to its first delta.",
                 ["deployment"], buckets=_TTFT_BUCKETS)
ITL = Histogram("agentmesh_llm_inter_token_latency_seconds", "Mean gap between consecutive deltas of a stream.",
                ["deployment"], buckets=_ITL_BUCKETS)
TOKENS = Counter("agentmesh_llm_tokens_total", "Tokens by deployment and type (input/output).", ["deployment", "type"])
COST = Counter("agentmesh_llm_cost_usd_total", "Cost in USD at catalogue prices.", ["deployment"])
RETRIES = Counter("agentmesh_llm_retries_total", "Retries on the same deployment.", ["deployment", "reason"])
FAILOVERS = Counter("agentmesh_llm_failovers_total", "Deployments given up before the first token.",
                    ["deployment", "reason"])
CIRCUIT = Gauge("agentmesh_llm_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ["deployment"])
IN_FLIGHT = Gauge("agentmesh_llm_in_flight", "Upstream calls in progress on this replica.", ["deployment"])
INTERRUPTED = Counter("agentmesh_llm_streams_interrupted_total", "Streams cut after their first delta.", ["deployment"])
REJECTIONS = Counter("agentmesh_llm_admission_rejections_total", "Requests refused by admission.", ["scope", "limit"])
CACHE = Counter("agentmesh_llm_cache_requests_total", "Response-cache lookups and stores.", ["result"])
RELOADS = Counter("agentmesh_llm_catalogue_reloads_total", "Catalogue reloads by result.", ["result"])

CIRCUIT_VALUES = {Circuit.CLOSED: 0, Circuit.HALF_OPEN: 1, Circuit.OPEN: 2}


def circuit_listener(deployment: str):  # noqa: ANN201 - a callback
    """The breaker callback that mirrors its state into ``circuit_state``."""
    gauge = CIRCUIT.labels(deployment)
    gauge.set(0)

    def changed(state: Circuit) -> None:
        gauge.set(CIRCUIT_VALUES[state])

    return changed
