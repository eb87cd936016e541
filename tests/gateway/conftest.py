"""A real Envoy, rendered from gateway/envoy.yaml, in front of five real in-process gRPC servers.

Each upstream is served by the shared runtime (``serve``: interceptors, health, reflection) and
answers for one AgentMesh service name, so a test can tell which upstream a call reached and what
metadata and deadline arrived there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest_asyncio

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.services.cli.gateway import render_envoy_config
from agentmesh.services.cli.processes import Proc, free_port, start_envoy
from agentmesh.services.runtime import context as ctx
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import SERVICE_NAMES, ServiceSettings
from tests.support import running_service


def distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class ProbeAgent(agent_pb2_grpc.AgentServiceServicer):
    """AgentService.Run that streams ``max_steps`` text deltas, ``float(input)`` seconds apart,
    each naming the tenant the call arrived with, then a final event."""

    async def Run(self, request, context):  # noqa: N802 - gRPC method name
        yield agent_pb2.RunResponse(
            sequence=1,
            started=agent_pb2.RunStarted(run_id="probe", session_id=request.session_id, request_id=ctx.current_request_id()),
        )
        interval = float(request.input)
        for i in range(request.max_steps):
            await asyncio.sleep(interval)
            yield agent_pb2.RunResponse(
                sequence=i + 2, text_delta=agent_pb2.TextDelta(text=f"{i}:{ctx.current_tenant()} ")
            )
        yield agent_pb2.RunResponse(
            sequence=request.max_steps + 2, final=agent_pb2.RunCompleted(status=agent_pb2.RUN_STATUS_COMPLETED)
        )


class ProbeService(Service):
    """Answers ``/<service name of kind>/Whoami`` (raw bytes) with JSON saying which upstream it
    is and what it saw: tenant and request id (as set by the runtime interceptor from metadata),
    the remaining deadline, and the raw metadata. The orchestrator probe also serves a real
    AgentService.Run."""

    def __init__(self, kind: str):
        self.kind = kind
        super().__init__(ServiceSettings(readiness_interval_s=0.2, grace_period_s=1.0))

    def register(self, server: grpc.aio.Server) -> None:
        async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            remaining = ctx.remaining_s()
            return json.dumps(
                {
                    "kind": self.kind,
                    "tenant": ctx.current_tenant(),
                    "request_id": ctx.current_request_id(),
                    "deadline_s": remaining,
                    "metadata": {k: v for k, v in context.invocation_metadata() if isinstance(v, str)},
                }
            ).encode()

        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAMES[self.kind], {"Whoami": grpc.unary_unary_rpc_method_handler(whoami)}
        )
        server.add_generic_rpc_handlers((handler,))
        if self.kind == "orchestrator":
            agent_pb2_grpc.add_AgentServiceServicer_to_server(ProbeAgent(), server)


@dataclass
class Gateway:
    address: str
    admin_port: int
    upstreams: dict[str, str]
    proc: Proc

    @property
    def log_path(self) -> Path:
        return self.proc.log_path


@contextlib.asynccontextmanager
async def envoy_in_front_of(upstreams: dict[str, str], folder: Path) -> AsyncIterator[Gateway]:
    """Render the template for ``upstreams``, start Envoy on free ports, stop it on exit."""
    listen_port, admin_port = distinct_free_ports(2)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "envoy.yaml"
    config.write_text(render_envoy_config(listen_port, admin_port, upstreams))
    # Started in a thread: this loop must keep serving Envoy's first health checks meanwhile.
    proc = await asyncio.to_thread(start_envoy, config, admin_port, folder)
    try:
        yield Gateway(f"127.0.0.1:{listen_port}", admin_port, upstreams, proc)
    finally:
        await asyncio.to_thread(proc.stop, 10.0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gateway(tmp_path_factory) -> AsyncIterator[Gateway]:
    async with contextlib.AsyncExitStack() as stack:
        upstreams = {}
        for kind in SERVICE_NAMES:
            upstreams[kind] = await stack.enter_async_context(running_service(ProbeService(kind)))
        async with envoy_in_front_of(upstreams, tmp_path_factory.mktemp("gateway")) as gw:
            yield gw


async def whoami(address: str, kind: str, metadata=(), timeout: float | None = 5.0) -> dict:
    """Call ``/<service of kind>/Whoami`` on ``address`` and decode the probe's JSON answer."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE_NAMES[kind]}/Whoami")
        return json.loads(await call(b"", metadata=metadata, timeout=timeout))
