"""The orchestrator's Redis connections are a bounded pool where a command waits for a free
connection (``AGENTMESH_ORCHESTRATOR_REDIS_MAX_CONNECTIONS``): many more concurrent runs than
connections all complete, instead of failing with UNAVAILABLE "Too many connections" as with
redis-py's default pool, and the replica never opens more connections than the bound."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.services.orchestrator.agents import load_catalog
from agentmesh.services.orchestrator.service import OrchestratorService
from tests.orchestrator.conftest import AGENTS_YAML, Mesh, collect, tenant_md
from tests.support import running_service

pytestmark = pytest.mark.timeout(120)

RUNS = 50
POOL = 4


async def test_fifty_concurrent_runs_share_four_redis_connections(mesh: Mesh):
    mesh.fake.script("", *({"text": f"answer {i}"} for i in range(RUNS)))
    service = OrchestratorService(
        mesh.settings(redis_max_connections=POOL), mesh.mesh, catalog=load_catalog(AGENTS_YAML)
    )
    pool = service.store.redis.connection_pool
    opened = 0

    async def watch() -> None:  # the most connections the pool ever held at once
        nonlocal opened
        while True:
            opened = max(opened, len(pool._in_use_connections) + len(pool._available_connections))
            await asyncio.sleep(0.005)

    async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        watcher = asyncio.create_task(watch())
        try:
            runs = await asyncio.gather(
                *(
                    collect(stub.Run(agent_pb2.RunRequest(session_id=f"pool-{i}", input="Answer briefly.",
                                                          disable_retrieval=True),
                                     metadata=tenant_md(), timeout=90))
                    for i in range(RUNS)
                ),
                return_exceptions=True,
            )
        finally:
            watcher.cancel()
    failures = [r for r in runs if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of {RUNS} runs failed, e.g. {failures[0]!r}"
    assert all(r[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED for r in runs)
    assert sorted(r[-1].final.output for r in runs) == sorted(f"answer {i}" for i in range(RUNS))
    assert 1 <= opened <= POOL, opened
