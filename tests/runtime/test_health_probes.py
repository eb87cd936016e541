"""Readiness follows the service's dependencies; liveness only the process (runtime/server.py)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentmesh.services.cli.processes import free_port
from agentmesh.services.runtime.server import LIVENESS_SERVICE, Service, serve
from agentmesh.services.runtime.settings import SERVICE_NAMES, ServiceSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DependencyBound(Service):
    """Ready only while ``dependency_up`` is set (like a Redis PING)."""

    kind = "memory"

    def __init__(self) -> None:
        super().__init__(ServiceSettings(host="127.0.0.1", port=free_port(), readiness_interval_s=0.05, grace_period_s=1))
        self.dependency_up = False

    def register(self, server: grpc.aio.Server) -> None:
        pass

    async def ready(self) -> tuple[bool, str]:
        return self.dependency_up, "ok" if self.dependency_up else "dependency down"


async def _status(stub: health_pb2_grpc.HealthStub, name: str) -> int:
    return (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)).status


async def _eventually(stub: health_pb2_grpc.HealthStub, name: str, want: int) -> None:
    for _ in range(100):
        if await _status(stub, name) == want:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name!r} never became {health_pb2.HealthCheckResponse.ServingStatus.Name(want)}")


async def test_liveness_stays_serving_through_a_dependency_outage_and_ends_at_shutdown():
    service = DependencyBound()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(service, stop_event=stop, handle_signals=False))
    address = f"127.0.0.1:{service.settings.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await channel.channel_ready()
        # Dependency down from the start: not ready, yet alive.
        await _eventually(stub, LIVENESS_SERVICE, SERVING)
        assert await _status(stub, SERVICE_NAMES["memory"]) == NOT_SERVING
        assert await _status(stub, "") == NOT_SERVING

        service.dependency_up = True
        await _eventually(stub, SERVICE_NAMES["memory"], SERVING)
        assert await _status(stub, "") == SERVING

        service.dependency_up = False  # the outage: readiness drops, liveness does not
        await _eventually(stub, SERVICE_NAMES["memory"], NOT_SERVING)
        assert await _status(stub, LIVENESS_SERVICE) == SERVING

        # Shutdown: the watch on liveness sees NOT_SERVING before the server goes away.
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=10)
        first = await watch.read()
        assert first.status == SERVING
        stop.set()
        second = await watch.read()
        assert second.status == NOT_SERVING
    await asyncio.wait_for(task, timeout=10)
