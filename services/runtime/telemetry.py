"""Tracing (OpenTelemetry) and metrics (Prometheus) shared by every service.

Tracing
    :func:`configure_tracing` installs the process's ``TracerProvider`` (resource
    ``service.name = agentmesh-<kind>``). Spans are exported over OTLP/gRPC when the standard
    variable ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (and
    ``OTEL_TRACES_EXPORTER`` is not ``none``); otherwise spans are still created, so trace and span
    ids reach the logs and the next service, but nothing is sent. Sampling follows
    ``OTEL_TRACES_SAMPLER`` (default: parent-based, always on), so a caller's — usually the
    gateway's — sampling decision holds for the whole run.

    Context crosses services in the W3C ``traceparent``/``tracestate`` metadata:
    :func:`server_interceptor` (``opentelemetry-instrumentation-grpc``) continues the caller's
    trace with one SERVER span per RPC; ``context.outgoing_metadata`` injects the current span's
    context into every downstream call (no CLIENT spans: see ``clients.py``). Health checks and
    reflection are not traced.

Metrics
    Counters and histograms in the ``prometheus_client`` default registry, named after
    go-grpc-prometheus so existing gRPC dashboards read them: ``grpc_server_started_total``,
    ``grpc_server_handled_total{grpc_code}``, ``grpc_server_handling_seconds`` (histogram),
    ``grpc_server_msg_sent_total`` (stream items) and the gauge ``grpc_server_in_flight`` (calls
    being served — the HPA's custom metric for long streams). Labels: ``grpc_service``,
    ``grpc_method``, ``grpc_type`` (``unary``, ``server_stream``, ``client_stream``,
    ``bidi_stream``). :func:`start_metrics_server` serves them at ``/metrics``.

    ``python_gc_pause_seconds{generation}`` (histogram, installed by :func:`watch_gc_pauses`)
    times every collection of the cyclic garbage collector: the event loop stands still for that
    long, so a tail-latency spike that lines up with a full (generation 2) collection is visible;
    ``python_gc_frozen_objects`` counts what ``gc.freeze`` took out of collection at start-up.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("agentmesh.telemetry")

#: ``service.namespace`` of every AgentMesh service; ``service.name`` is ``agentmesh-<kind>``.
SERVICE_NAMESPACE = "agentmesh"

# Seconds. gRPC calls here range from a 1 ms memory read to a generation streaming for minutes,
# so the buckets span 5 ms .. 10 min.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LABELS = ("grpc_service", "grpc_method", "grpc_type")

RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _LABELS)
RPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by gRPC status code.", (*_LABELS, "grpc_code")
)
RPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status, in seconds (a stream's whole life).",
    _LABELS,
    buckets=LATENCY_BUCKETS_S,
)
RPC_MSG_SENT = Counter("grpc_server_msg_sent_total", "Stream items sent by server-streaming RPCs.", _LABELS)
RPC_IN_FLIGHT = Gauge("grpc_server_in_flight", "RPCs being served right now (streams included).", _LABELS)

_configured: TracerProvider | None = None
_lock = threading.Lock()


#: Most method names whose filter decision is remembered (names come from callers: bounded).
_FILTER_MEMO_SIZE = 1024


GC_PAUSE = Histogram(
    "python_gc_pause_seconds",
    "Time the cyclic garbage collector stopped the process, per collection, in seconds.",
    ("generation",),
    # Young collections take tens of microseconds; a full one over a large heap tens of ms.
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
Gauge("python_gc_frozen_objects", "Objects moved into the permanent generation by gc.freeze.").set_function(
    gc.get_freeze_count
)
_gc_pause_children = [GC_PAUSE.labels(generation=str(g)) for g in range(3)]
_gc_started = [0.0]


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        _gc_pause_children[info["generation"]].observe(time.perf_counter() - _gc_started[0])


def watch_gc_pauses() -> None:
    """Time every garbage collection into ``python_gc_pause_seconds`` (once per process; the
    callback costs about a microsecond per collection)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def _not_infrastructure():
    # grpc.health.v1 (Envoy checks every replica every few seconds) and reflection are noise.
    keep = filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection.")))
    decided: dict[str | bytes, bool] = {}

    def filter_fn(details) -> bool:
        # The decision depends on the method name alone, but the library's filters re-derive it
        # on every call (typing.Protocol isinstance checks, os.path splitting): ~40 us per RPC,
        # more than the span itself. Remember it per method name.
        method = getattr(details, "method", None)
        if not isinstance(method, (str, bytes)):
            return keep(details)
        decision = decided.get(method)
        if decision is None:
            decision = keep(details)
            if len(decided) < _FILTER_MEMO_SIZE:
                decided[method] = decision
        return decision

    return filter_fn


def configure_tracing(kind: str, processors: Sequence[SpanProcessor] = ()) -> TracerProvider:
    """Install the global ``TracerProvider`` for service ``kind`` (once per process; later calls
    return the first provider). ``processors`` are added as given (tests pass a
    ``SimpleSpanProcessor`` with an in-memory exporter); the OTLP exporter is added when the
    environment names an endpoint (see the module docstring)."""
    global _configured  # noqa: PLW0603 - one provider per process, as OpenTelemetry requires
    with _lock:
        if _configured is not None:
            return _configured
        resource = Resource.create({"service.name": f"agentmesh-{kind}", "service.namespace": SERVICE_NAMESPACE})
        provider = TracerProvider(resource=resource)
        for processor in processors:
            provider.add_span_processor(processor)
        exporter = _otlp_exporter()
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _configured = provider
        return provider


def _otlp_exporter() -> Any | None:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    # Imported only when used: the exporter pulls in the OTLP protos.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

    log.info("exporting traces over OTLP/gRPC", extra={"fields": {"endpoint": endpoint}})
    return OTLPSpanExporter()  # reads the endpoint, headers, TLS and timeout from OTEL_* itself


def shutdown_tracing() -> None:
    """Flush and stop the provider installed by :func:`configure_tracing` (on process exit)."""
    if _configured is not None:
        _configured.shutdown()


def server_interceptor() -> grpc.aio.ServerInterceptor:
    """The SERVER-span interceptor; put it first so the rest of the call runs inside the span."""
    return aio_server_interceptor(filter_=_not_infrastructure())


def start_metrics_server(port: int, host: str = "0.0.0.0") -> Any:  # noqa: S104 - scraped by Prometheus
    """Serve ``/metrics`` (Prometheus text format) on ``host:port`` from a daemon thread; returns
    the HTTP server (stop it with :func:`stop_metrics_server`). Raises OSError when the port is
    taken."""
    server, _thread = start_http_server(port, addr=host)
    return server


def stop_metrics_server(server: Any) -> None:
    """Stop a server from :func:`start_metrics_server` and free its port (blocks up to 0.5 s)."""
    server.shutdown()
    server.server_close()


def grpc_type(handler: grpc.RpcMethodHandler) -> str:
    """``unary``, ``server_stream``, ``client_stream`` or ``bidi_stream`` (the metric label)."""
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def split_method(method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → (``pkg.Service``, ``Method``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span as 32 and 16 hex digits, or None outside a span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
