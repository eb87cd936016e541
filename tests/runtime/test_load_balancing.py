"""Calls between services are balanced per call, and servers make long-lived clients move on.

Real grpc.aio servers on loopback: a downstream channel (``runtime.clients``) to a target listing
two replicas sends successive calls to both (``round_robin``), and a server configured with a
connection age (``runtime.server.server_options``) makes a busy client open new connections —
what lets callers re-resolve DNS and reach replicas an autoscaler added — while a stream that
outlives the age keeps working within the grace period. A read that fails UNAVAILABLE (a replica
dying under it) is sent again; a write without an idempotency key is not.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.runtime.clients import Downstream, channel_options
from agentmesh.services.runtime.server import server_options
from agentmesh.services.runtime.settings import MeshSettings, ServiceSettings

pytestmark = pytest.mark.timeout(60)


class CountingHealth(health.aio.HealthServicer):
    """The standard health servicer, counting Check calls by server and by client connection."""

    def __init__(self, name: str, calls: Counter, peers: Counter):
        super().__init__()
        self.name, self.calls, self.peers = name, calls, peers

    async def Check(self, request, context):  # noqa: N802 - the gRPC method name
        self.calls[self.name] += 1
        self.peers[context.peer()] += 1
        return await super().Check(request, context)


async def start(name: str, calls: Counter, peers: Counter, options=()) -> tuple[grpc.aio.Server, int, CountingHealth]:
    server = grpc.aio.server(options=list(options))
    servicer = CountingHealth(name, calls, peers)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, servicer


async def test_a_downstream_channel_balances_calls_over_every_replica_of_its_target():
    calls, peers = Counter(), Counter()
    one, port_one, _ = await start("one", calls, peers)
    two, port_two, _ = await start("two", calls, peers)
    downstream = Downstream(MeshSettings(memory_address=f"ipv4:127.0.0.1:{port_one},127.0.0.1:{port_two}"))
    try:
        stub = health_pb2_grpc.HealthStub(downstream.channel("memory"))
        # round_robin sends calls only to replicas it is connected to: until both connections are
        # up (a slow machine may take a few calls), the first one gets them all.
        for _ in range(200):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if calls["one"] and calls["two"]:
                break
        assert calls["one"] and calls["two"], calls
        calls.clear()
        for _ in range(20):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        # Both connected: the calls alternate (pick_first would send all 20 to one).
        assert calls["one"] + calls["two"] == 20 and min(calls["one"], calls["two"]) >= 8, calls
        # One replica gone: every call goes to the other, none fails.
        await two.stop(None)
        before = calls["one"]
        for _ in range(10):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert calls["one"] == before + 10
    finally:
        await downstream.close()
        await one.stop(None)
        await two.stop(None)


async def test_the_connection_age_moves_a_busy_client_to_new_connections_and_spares_streams_in_flight():
    calls, peers = Counter(), Counter()
    settings = ServiceSettings(max_connection_age_s=0.3, max_connection_age_grace_s=10)
    assert ("grpc.max_connection_age_ms", 300) in server_options(settings)
    assert ("grpc.max_connection_age_grace_ms", 10_000) in server_options(settings)
    assert not any(k.startswith("grpc.max_connection_age") for k, _ in server_options(ServiceSettings(max_connection_age_s=0)))
    server, port, servicer = await start("aged", calls, peers, server_options(settings))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=30)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            for _ in range(15):  # 1.5 s of calls: several connection ages
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                await asyncio.sleep(0.1)
            assert sum(peers.values()) == 15 and len(peers) >= 2, peers  # new connections, no failed call
            # The stream opened on the first connection outlived its age: still delivering.
            await servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
            assert (await asyncio.wait_for(watch.read(), 5)).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
    finally:
        await server.stop(None)


class FlakyMemory(memory_pb2_grpc.MemoryServiceServicer):
    """Answers every method's first call with UNAVAILABLE, as a replica dying under it would."""

    def __init__(self):
        self.attempts: Counter = Counter()

    async def _once(self, method: str, context, reply):
        self.attempts[method] += 1
        if self.attempts[method] == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")
        return reply

    async def GetContext(self, request, context):  # noqa: N802 - the gRPC method names
        return await self._once("GetContext", context, memory_pb2.GetContextResponse(version=7))

    async def DeleteSession(self, request, context):  # noqa: N802
        return await self._once("DeleteSession", context, memory_pb2.DeleteSessionResponse(existed=True))


async def test_idempotent_reads_are_retried_on_unavailable_and_other_writes_are_not():
    server = grpc.aio.server()
    flaky = FlakyMemory()
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(flaky, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    downstream = Downstream(MeshSettings(memory_address=f"127.0.0.1:{port}"))
    try:
        memory = downstream.memory
        reply = await memory.GetContext(memory_pb2.GetContextRequest(session_id="s"), timeout=10)
        assert reply.version == 7 and flaky.attempts["GetContext"] == 2
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await memory.DeleteSession(memory_pb2.DeleteSessionRequest(session_id="s"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and flaky.attempts["DeleteSession"] == 1
    finally:
        await downstream.close()
        await server.stop(None)
