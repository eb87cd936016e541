"""Upstreams for the gateway tests: real gRPC servers built on the shared runtime (interceptors,
health, reflection) that say what reached them.

:class:`ProbeService` answers ANY method of its service's name (``/<service>/<Method>``, raw
bytes) with JSON: which kind and replica it is, the tenant, subject and request id the runtime
interceptor put in the call's context, the remaining deadline, the raw metadata and how many
times this call's ``x-probe-call`` token was seen. A call with ``x-probe-fail-first: yes`` is
answered UNAVAILABLE the first time its token is seen (to tell retried from not retried
routes). The orchestrator probe also serves a real ``AgentService.Run``.

Run as a process (so a test can SIGKILL it):
``python -m tests.gateway.probes --kind orchestrator --replica b --port 50999``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json

import grpc

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.services.runtime import context as ctx
from agentmesh.services.runtime.errors import ServiceError
from agentmesh.services.runtime.server import Service, serve
from agentmesh.services.runtime.settings import SERVICE_NAMES, ServiceSettings

RUN_METHOD = "/agentmesh.agent.v1.AgentService/Run"


class ProbeAgent(agent_pb2_grpc.AgentServiceServicer):
    """AgentService.Run that streams ``max_steps`` text deltas, ``float(input)`` seconds apart,
    each naming the tenant the call arrived with, then a final event."""

    def __init__(self, replica: str = ""):
        self.replica = replica

    async def Run(self, request, context):  # noqa: N802 - gRPC method name
        yield agent_pb2.RunResponse(
            sequence=1,
            started=agent_pb2.RunStarted(
                run_id=f"probe{self.replica}", session_id=request.session_id, request_id=ctx.current_request_id()
            ),
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


class _AnyMethod(grpc.GenericRpcHandler):
    """Routes every unary method of one service (but Run) to one behaviour."""

    def __init__(self, service: str, behaviour):
        self.prefix = f"/{service}/"
        self.handler = grpc.unary_unary_rpc_method_handler(behaviour)

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self.prefix) and method != RUN_METHOD:
            return self.handler
        return None


class ProbeService(Service):
    """See the module docstring."""

    def __init__(self, kind: str, replica: str = ""):
        self.kind = kind
        self.replica = replica
        self.seen: collections.Counter[str] = collections.Counter()
        super().__init__(ServiceSettings(readiness_interval_s=0.2, grace_period_s=1.0))

    def register(self, server: grpc.aio.Server) -> None:
        async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            token = metadata.get("x-probe-call", "")
            self.seen[token] += 1
            if metadata.get("x-probe-fail-first") == "yes" and self.seen[token] == 1:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "probe: failing the first attempt on purpose")
            return json.dumps(
                {
                    "kind": self.kind,
                    "replica": self.replica,
                    "tenant": ctx.current_tenant(),
                    "request_id": ctx.current_request_id(),
                    "deadline_s": ctx.remaining_s(),
                    "attempts": self.seen[token],
                    "metadata": metadata,
                }
            ).encode()

        # Typed servicer first: its registered method handlers take precedence anyway.
        if self.kind == "orchestrator":
            agent_pb2_grpc.add_AgentServiceServicer_to_server(ProbeAgent(self.replica), server)
        server.add_generic_rpc_handlers((_AnyMethod(SERVICE_NAMES[self.kind], whoami),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(SERVICE_NAMES), required=True)
    parser.add_argument("--replica", default="")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    service = ProbeService(args.kind, args.replica)
    service.settings.port = args.port
    asyncio.run(serve(service))


if __name__ == "__main__":
    main()
