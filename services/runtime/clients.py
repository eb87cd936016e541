"""Typed clients for calls between services.

:class:`Downstream` owns one ``grpc.aio`` channel per dependency and hands out stubs. Callers pass
``metadata=outgoing_metadata()`` and ``timeout=downstream_timeout(...)`` (from
:mod:`agentmesh.services.runtime.context`) so each call carries the request id, the tenant and a
deadline derived from the caller's own, and the ``traceparent`` of the span around the call.

Each channel balances calls, not connections: ``round_robin`` over every address its target
resolves to. In Kubernetes the targets are ``dns:///`` names of headless Services (every ready
pod, see the Helm chart), and servers close connections after ``max_connection_age_s``
(:mod:`~agentmesh.services.runtime.server`), so a channel re-resolves and reaches pods the
HorizontalPodAutoscaler added — with a ClusterIP address and the default ``pick_first`` a
long-lived HTTP/2 connection would pin every call of a caller to one pod (gRPC's load-balancing
guide: https://grpc.io/blog/grpc-load-balancing/). Locally a replicated service is an ``ipv4:``
target listing every replica.

The channels carry no client interceptor: each service already wraps its downstream calls in
spans of its own (``chat``, ``execute_tool``, ``memory load``... in the orchestrator), so the
OpenTelemetry CLIENT spans only duplicated them, while grpc.aio's interceptor machinery cost an
extra task and queue per call and per streamed message (12 % of the orchestrator's CPU per step,
bench/orchestrator.py).
"""

from __future__ import annotations

import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentmesh.client.config import RetryPolicy
from agentmesh.llm.v1 import llm_pb2_grpc
from agentmesh.memory.v1 import memory_pb2_grpc
from agentmesh.retrieval.v1 import retrieval_pb2_grpc
from agentmesh.services.runtime.settings import MeshSettings
from agentmesh.tools.v1 import tools_pb2_grpc


#: Retries between services: one or two more attempts after 0-20 ms, 0-40 ms (gRFC A6 back-off),
#: enough to reach another replica, short enough that a dependency that is down entirely is
#: still reported at once (at most ~60 ms later than without retries).
INTERNAL_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.02, max_backoff_s=0.2)


def channel_options(max_message_bytes: int = 4 * 1024 * 1024) -> list[tuple[str, int | str]]:
    """Channel arguments of every call between services: message limits, keepalive, the
    ``round_robin`` load-balancing policy (each call to the next ready address), and gRPC's
    retry policy (:data:`INTERNAL_RETRY`) for the client package's idempotent methods
    (:data:`~agentmesh.client.config.IDEMPOTENT_METHODS`; UNAVAILABLE only, within the call's
    deadline): a read that reached a replica as it died is sent again, and round_robin gives it
    to another one. Streams and other writes are never re-sent."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(INTERNAL_RETRY.service_config())),
    ]


class Downstream:
    """Channels and stubs to the other services, created on first use."""

    def __init__(self, mesh: MeshSettings | None = None, max_message_bytes: int = 4 * 1024 * 1024):
        self.mesh = mesh or MeshSettings()
        self.max_message_bytes = max_message_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, name: str) -> grpc.aio.Channel:
        """The channel to service ``name`` ("llm", "retrieval", "memory", "tools", "orchestrator")."""
        if name not in self._channels:
            address = getattr(self.mesh, f"{name}_address")
            self._channels[name] = grpc.aio.insecure_channel(address, options=channel_options(self.max_message_bytes))
        return self._channels[name]

    @property
    def llm(self) -> llm_pb2_grpc.LLMServiceStub:
        return llm_pb2_grpc.LLMServiceStub(self.channel("llm"))

    @property
    def retrieval(self) -> retrieval_pb2_grpc.RetrievalServiceStub:
        return retrieval_pb2_grpc.RetrievalServiceStub(self.channel("retrieval"))

    @property
    def memory(self) -> memory_pb2_grpc.MemoryServiceStub:
        return memory_pb2_grpc.MemoryServiceStub(self.channel("memory"))

    @property
    def tools(self) -> tools_pb2_grpc.ToolServiceStub:
        return tools_pb2_grpc.ToolServiceStub(self.channel("tools"))

    async def is_serving(self, name: str, timeout_s: float = 1.0) -> bool:
        """True when service ``name`` answers its health check with SERVING."""
        return await check_health(self.channel(name), timeout_s=timeout_s)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


async def check_health(channel: grpc.aio.Channel, service: str = "", timeout_s: float = 1.0) -> bool:
    """One ``grpc.health.v1.Health/Check``; False on NOT_SERVING or any RPC error."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    except grpc.aio.AioRpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
