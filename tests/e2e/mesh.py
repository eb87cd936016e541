"""A whole local mesh (Redis, Milvus Lite, the five services, Envoy) for end-to-end tests,
started by the same runner as `agentmesh up`, on free ports in a temporary run folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.memory.v1 import memory_pb2_grpc
from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.cli import runner
from agentmesh.tools.v1 import tools_pb2_grpc

#: Real stdlib documentation ingested by the end-to-end tests (small, so the tests stay quick).
E2E_MODULES = ["json", "csv", "itertools", "pathlib", "heapq"]


@dataclass
class Mesh:
    paths: runner.RunPaths
    ports: runner.MeshPorts
    channel: grpc.aio.Channel | None = None

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports.gateway}"

    def address(self, kind: str) -> str:
        return f"127.0.0.1:{self.ports.service(kind)}"

    def record(self, name: str) -> runner.ProcessRecord:
        state = runner.read_state(self.paths)
        assert state is not None, "the mesh is not running"
        rec = state.record(name)
        assert rec is not None, f"no process {name!r} in the mesh state"
        return rec

    def log(self, name: str) -> str:
        """The last lines of process ``name``'s log (for failure messages)."""
        return runner.log_tail(self.record(name).log, 60)


@contextlib.contextmanager
def local_mesh(root: Path, env: dict[str, str]) -> Iterator[Mesh]:
    """Start a mesh whose services see ``env`` on top of this process's environment."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    paths = runner.RunPaths(root / ".agentmesh")
    ports = runner.MeshPorts.free()
    try:
        runner.up(paths, ports, timeout_s=240, echo=lambda _: None)
        yield Mesh(paths, ports)
    finally:
        runner.down(paths, echo=lambda _: None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tenant_md(tenant: str = "e2e") -> tuple[tuple[str, str], ...]:
    return (("x-tenant-id", tenant),)


class Stubs:
    """Typed stubs on one channel to the gateway."""

    def __init__(self, channel: grpc.aio.Channel):
        self.agent = agent_pb2_grpc.AgentServiceStub(channel)
        self.retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        self.memory = memory_pb2_grpc.MemoryServiceStub(channel)
        self.tools = tools_pb2_grpc.ToolServiceStub(channel)


async def ingest(stubs: Stubs, documents: list[retrieval_pb2.Document], tenant: str = "e2e"):
    async def requests():
        for doc in documents:
            yield retrieval_pb2.IngestDocumentsRequest(document=doc)

    return await stubs.retrieval.IngestDocuments(requests(), metadata=tenant_md(tenant), timeout=300)


async def run_events(stubs: Stubs, request: agent_pb2.RunRequest, tenant: str = "e2e", timeout: float = 120):
    """All events of one Run, in order (raises AioRpcError on a non-OK status)."""
    return [event async for event in stubs.agent.Run(request, metadata=tenant_md(tenant), timeout=timeout)]
