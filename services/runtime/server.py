"""Server bootstrap shared by every service.

:func:`serve` runs one :class:`Service` as a ``grpc.aio`` server with:
- OpenTelemetry tracing (one SERVER span per RPC, continuing the caller's trace) and the
  :class:`~agentmesh.services.runtime.interceptors.ServerInterceptor` (context, deadline, errors,
  logs, metrics), in that order;
- a Prometheus ``/metrics`` endpoint when ``metrics_port`` is set;
- explicit limits (max message size, max concurrent streams, keepalive);
- ``grpc.health.v1`` whose status follows the service's own readiness probe (it starts
  NOT_SERVING, turns SERVING once :meth:`Service.ready` says so, and back when it stops saying so),
  for ``""`` and the service's own name (readiness), and ``agentmesh.liveness`` (:data:`LIVENESS_SERVICE`),
  which is SERVING from the moment the server listens until shutdown: it answers only while the
  event loop does, so a wedged process fails it, but a dependency outage never does (Kubernetes
  restarts a pod whose liveness fails; restarting for a Redis outage would only add load);
- server reflection;
- graceful shutdown on SIGTERM/SIGINT: health goes NOT_SERVING, no new calls are accepted, and
  in-flight calls get ``grace_period_s`` to finish before they are cancelled.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import ClassVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentmesh.services.runtime import telemetry
from agentmesh.services.runtime.interceptors import ServerInterceptor
from agentmesh.services.runtime.logs import configure_logging
from agentmesh.services.runtime.settings import DEFAULT_PORTS, SERVICE_NAMES, ServiceSettings

#: grpc.health.v1 service name of the liveness check (the chart's livenessProbe asks it).
LIVENESS_SERVICE = "agentmesh.liveness"

log = logging.getLogger("agentmesh.server")


class Service:
    """One AgentMesh service. Subclasses register their servicers and say when they are ready."""

    #: Key in DEFAULT_PORTS / SERVICE_NAMES: "llm", "retrieval", "memory", "tools", "orchestrator".
    kind: ClassVar[str]

    def __init__(self, settings: ServiceSettings):
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        """Add the service's servicers to ``server``."""
        raise NotImplementedError

    async def start(self) -> None:
        """Slow start-up work (load a model, connect to a store). Runs after the port is bound, so
        health answers NOT_SERVING meanwhile. An exception here stops the process."""

    async def ready(self) -> tuple[bool, str]:
        """Readiness probe: (ready, reason). Must check the real dependencies (a Redis PING, the
        collection loaded...) and return quickly; it runs every ``readiness_interval_s``."""
        return True, "ok"

    async def stop(self) -> None:
        """Release resources after the server stopped."""


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel arguments that make the server's limits explicit, and its connection age (see
    ``ServiceSettings.max_connection_age_s``)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if settings.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", round(settings.max_connection_age_s * 1000)))
        if settings.max_connection_age_grace_s > 0:
            options.append(("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace_s * 1000)))
    return options


async def serve(service: Service, *, stop_event: asyncio.Event | None = None, handle_signals: bool = True) -> None:
    """Run ``service`` until SIGTERM/SIGINT (when ``handle_signals``) or ``stop_event``, then shut
    down gracefully.

    Raises ``RuntimeError`` when the port (or the metrics port) cannot be bound.
    """
    settings = service.settings
    if handle_signals:  # the process is ours: own its logging and its tracer provider too
        configure_logging(settings.log_level)
        telemetry.configure_tracing(service.kind)
    name = SERVICE_NAMES[service.kind]
    telemetry.watch_gc_pauses()
    port = settings.port or DEFAULT_PORTS[service.kind]

    metrics_server = None
    if settings.metrics_port:
        try:
            metrics_server = telemetry.start_metrics_server(settings.metrics_port, settings.host)
        except OSError as exc:
            raise RuntimeError(f"cannot serve /metrics on {settings.host}:{settings.metrics_port}: {exc}") from exc

    async def close_metrics() -> None:
        if metrics_server is not None:  # shutdown() waits for the server thread's poll loop
            await asyncio.to_thread(telemetry.stop_metrics_server, metrics_server)

    server = grpc.aio.server(
        interceptors=[telemetry.server_interceptor(), ServerInterceptor(settings.min_deadline_ms)],
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_streams,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service.register(server)
    reflection.enable_server_reflection(
        [name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = f"{settings.host}:{port}"
    if server.add_insecure_port(address) == 0:
        await close_metrics()
        raise RuntimeError(f"cannot listen on {address}: port in use or not permitted")

    async def set_status(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in ("", name):
            await health_servicer.set(svc, status)

    await set_status(False)
    await server.start()
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "listening",
        extra={"fields": {"service": name, "address": address, "metrics_port": settings.metrics_port or None}},
    )

    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    async def readiness_loop() -> None:
        await service.start()
        if settings.gc_freeze and handle_signals:  # in a test process, other tests' garbage would stay
            # What start-up built lives as long as the process; one collection now, then the
            # collector never walks it again (Python docs, gc.freeze).
            gc.collect()
            gc.freeze()
        was: bool | None = None
        while True:
            try:
                ok, reason = await asyncio.wait_for(service.ready(), timeout=max(1.0, settings.readiness_interval_s))
            except Exception as exc:  # noqa: BLE001 - a failing probe means not ready
                ok, reason = False, f"readiness probe failed: {exc!r}"
            if ok != was:
                await set_status(ok)
                log.log(
                    logging.INFO if ok else logging.WARNING,
                    "health status changed",
                    extra={"fields": {"service": name, "serving": ok, "reason": reason}},
                )
                was = ok
            await asyncio.sleep(settings.readiness_interval_s)

    readiness = asyncio.create_task(readiness_loop())
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({readiness, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if readiness in done and readiness.exception() is not None:
        log.error("start-up failed", exc_info=readiness.exception())
        await server.stop(0)
        await close_metrics()
        raise readiness.exception()  # type: ignore[misc]

    log.info("shutting down", extra={"fields": {"service": name, "grace_period_s": settings.grace_period_s}})
    readiness.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.grace_period_s)
    await service.stop()
    await close_metrics()
    if handle_signals:
        telemetry.shutdown_tracing()  # flush the spans still batched for export
    log.info("stopped", extra={"fields": {"service": name}})
