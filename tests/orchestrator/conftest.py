"""A real mesh for the orchestrator tests, in this process: Redis, the LLM router (its OpenAI
client talking to the scripted fake below), memory (long-term facts on: the real embedding model,
Milvus Lite, heuristic extraction so the scripted model is only asked by the agents), tools (python
sandbox included, and the test MCP server ``tests/tools/mcp_server.py`` over stdio as ``demo``),
retrieval (Milvus Lite, the same embedding model) and the orchestrator with
``tests/orchestrator/agents.yaml``.

The model is :class:`RoutedFakeOpenAI`: the scripted OpenAI fake, with one queue of turns per
agent, picked by the ``agent=<name>.`` marker that starts each test agent's instructions (runs
without an agent name use the queue ""). Agents of a parallel workflow call the model at the same
time, so a single queue could hand a turn to the wrong agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.cli.processes import Proc, free_port, spawn, start_redis
from agentmesh.services.llm.service import LLMService, LLMSettings
from agentmesh.services.memory.service import MemoryService, MemorySettings
from agentmesh.services.orchestrator.agents import load_catalog
from agentmesh.services.orchestrator.service import OrchestratorService, OrchestratorSettings
from agentmesh.services.retrieval.embedder import SentenceTransformerEmbedder
from agentmesh.services.retrieval.service import RetrievalService, RetrievalSettings
from agentmesh.services.runtime.clients import check_health
from agentmesh.services.runtime.settings import MeshSettings
from agentmesh.services.tools.service import ToolsService, ToolsSettings
from tests.fakes.openai_server import FakeOpenAIServer
from tests.support import running_service

AGENTS_YAML = Path(__file__).with_name("agents.yaml")
MCP_SERVER = Path(__file__).parent.parent / "tools" / "mcp_server.py"
#: First uid of the sandbox range these tests use (other test suites use other ranges).
SANDBOX_UID_BASE = 720_000
SANDBOX_SLOTS = 4
TENANT = "orch"
_MARKER = re.compile(r"^agent=([A-Za-z0-9_-]+)\.")
_PROVIDER_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "REDIS_URL")


def route_key(body: dict[str, Any]) -> str:
    """The agent a chat-completions request comes from ("" for a run without an agent)."""
    for message in body.get("messages") or []:
        if message.get("role") == "system" and isinstance(message.get("content"), str):
            if m := _MARKER.match(message["content"]):
                return m.group(1)
    return ""


class RoutedFakeOpenAI(FakeOpenAIServer):
    """The scripted OpenAI fake with one queue of turns per agent (see the module docstring)."""

    def __init__(self, **kwargs: Any):
        super().__init__([], **kwargs)
        self._queues: dict[str, deque] = defaultdict(deque)
        self._request_key = threading.local()

    def validate(self, body: dict[str, Any], headers: dict[str, str]) -> str | None:
        self._request_key.value = route_key(body)  # same handler thread as the _next_turn() below
        return super().validate(body, headers)

    def _next_turn(self) -> dict[str, Any] | None:
        key = getattr(self._request_key, "value", "")
        with self._lock:
            queue = self._queues.get(key)
            return queue.popleft() if queue else None

    def script(self, agent: str, *turns: dict[str, Any]) -> None:
        with self._lock:
            self._queues[agent].extend(turns)

    def pending(self, agent: str) -> int:
        with self._lock:
            return len(self._queues.get(agent, ()))

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()

    def requests_of(self, agent: str) -> list[dict[str, Any]]:
        """Recorded requests (body, outcome...) of one agent, oldest first."""
        return [r for r in self.requests if self.matches(r["path"]) and route_key(r["body"]) == agent]


@dataclass
class Mesh:
    redis_url: str
    fake: RoutedFakeOpenAI
    mesh: MeshSettings
    orchestrator: str
    root: Path
    tools_service: ToolsService

    def require_sandbox(self) -> None:
        """Skip (saying why) where the python sandbox cannot run (it needs root, Linux >= 5.12)."""
        sandbox = self.tools_service.sandbox
        if sandbox is None or sandbox.unavailable:
            pytest.skip(f"the python sandbox cannot run here: {sandbox.unavailable if sandbox else 'disabled'}")

    def settings(self, **overrides: Any) -> OrchestratorSettings:
        """Orchestrator settings for this mesh (short leases so take-overs are quick)."""
        values: dict[str, Any] = {
            "redis_url": self.redis_url,
            "readiness_interval_s": 0.2,
            "lease_ttl_s": 2.0,
            "heartbeat_s": 0.2,
            "follow_poll_ms": 200,
            "grace_period_s": 2.0,
            "tools_cache_s": 0,
        }
        values.update(overrides)
        return OrchestratorSettings(**values)

    @contextlib.asynccontextmanager
    async def orchestrator_instance(self, **overrides: Any) -> AsyncIterator[str]:
        """Another orchestrator replica on this mesh; yields its address."""
        service = OrchestratorService(self.settings(**overrides), self.mesh, catalog=load_catalog(AGENTS_YAML))
        async with running_service(service) as address:
            yield address


def tenant_md(tenant: str = TENANT) -> tuple[tuple[str, str], ...]:
    return (("x-tenant-id", tenant),)


@contextlib.asynccontextmanager
async def orchestrator_process(mesh: Mesh, folder: Path) -> AsyncIterator[tuple[str, Proc]]:
    """An orchestrator replica in a process of its own (so a test can SIGKILL it), on this mesh,
    with short leases; yields its address once SERVING, and the process."""
    port = free_port()
    m = mesh.mesh
    env = {
        "AGENTMESH_ORCHESTRATOR_HOST": "127.0.0.1",
        "AGENTMESH_ORCHESTRATOR_PORT": str(port),
        "AGENTMESH_ORCHESTRATOR_REDIS_URL": mesh.redis_url,
        "AGENTMESH_ORCHESTRATOR_AGENTS_PATH": str(AGENTS_YAML),
        "AGENTMESH_ORCHESTRATOR_LEASE_TTL_S": "2",
        "AGENTMESH_ORCHESTRATOR_HEARTBEAT_S": "0.2",
        "AGENTMESH_ORCHESTRATOR_READINESS_INTERVAL_S": "0.2",
        "AGENTMESH_LLM_ADDRESS": m.llm_address,
        "AGENTMESH_MEMORY_ADDRESS": m.memory_address,
        "AGENTMESH_RETRIEVAL_ADDRESS": m.retrieval_address,
        "AGENTMESH_TOOLS_ADDRESS": m.tools_address,
    }
    proc = spawn("orchestrator-doomed", [sys.executable, "-m", "agentmesh.services.cli.main", "serve", "orchestrator"],
                 folder, env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            deadline = time.monotonic() + 60
            while not await check_health(channel):
                assert proc.alive() and time.monotonic() < deadline, proc.log_path.read_text()[-3000:]
                await asyncio.sleep(0.1)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.stop()


@contextlib.contextmanager
def _no_provider_env():
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in _PROVIDER_ENV or k.startswith("AGENTMESH_")}
    try:
        yield
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="session")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    root = tmp_path_factory.mktemp("orchestrator-mesh")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    redis_port = free_port()
    redis = start_redis(redis_port, root / "redis", root / "logs")
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    fake = RoutedFakeOpenAI().start()
    catalogue = root / "models.yaml"
    # Priced so cost budgets can be tested: 1,000 / 2,000 USD per million tokens (0.1 ¢ / 0.2 ¢
    # per token). The breaker never opens: the cancellation tests cut streams on purpose.
    catalogue.write_text(
        "default_model: chat\n"
        "models:\n"
        "  chat:\n"
        "    deployments:\n"
        f"      - {{name: fake, provider: openai, model: gpt-4o-mini, base_url: '{fake.base_url}',\n"
        "         input_usd_per_mtok: 1000, output_usd_per_mtok: 2000}\n"
        "circuit_breaker: {min_requests: 100000}\n"
    )
    embedder = SentenceTransformerEmbedder()
    stack = contextlib.AsyncExitStack()
    try:
        with _no_provider_env():
            llm = LLMService(
                LLMSettings(catalogue=str(catalogue), fallback_to_extractive=False, readiness_interval_s=0.2)
            )
            llm_address = await stack.enter_async_context(running_service(llm))
            memory = MemoryService(
                MemorySettings(
                    redis_url=redis_url,
                    compaction_trigger_tokens=0,
                    readiness_interval_s=0.2,
                    facts_enabled=True,
                    extraction="heuristic",
                    milvus_uri=str(root / "memory.db"),
                ),
                embedder=embedder,
                mesh=MeshSettings(llm_address=llm_address),
            )
            memory_address = await stack.enter_async_context(running_service(memory, timeout_s=180))
            retrieval = RetrievalService(
                RetrievalSettings(milvus_uri=str(root / "milvus.db"), readiness_interval_s=0.2), embedder=embedder
            )
            retrieval_address = await stack.enter_async_context(running_service(retrieval, timeout_s=180))
            mesh_settings = MeshSettings(
                llm_address=llm_address,
                memory_address=memory_address,
                retrieval_address=retrieval_address,
            )
            mcp_config = root / "mcp.json"
            mcp_config.write_text(json.dumps(
                {"servers": {"demo": {"transport": "stdio", "command": sys.executable, "args": [str(MCP_SERVER), "stdio"]}}}
            ))
            tools = ToolsService(
                ToolsSettings(
                    readiness_interval_s=0.2,
                    mcp_config=str(mcp_config),
                    redis_url=redis_url,
                    python_uid_base=SANDBOX_UID_BASE,
                    python_slots=SANDBOX_SLOTS,
                    python_wall_s=60,
                    max_runtime_s=60,
                ),
                mesh=mesh_settings,
            )
            tools_address = await stack.enter_async_context(running_service(tools))
            mesh_settings = MeshSettings(
                llm_address=llm_address,
                memory_address=memory_address,
                retrieval_address=retrieval_address,
                tools_address=tools_address,
            )
            m = Mesh(redis_url, fake, mesh_settings, "", root, tools)
            m.orchestrator = await stack.enter_async_context(m.orchestrator_instance())
            async with grpc.aio.insecure_channel(retrieval_address) as channel:
                await _ingest(retrieval_pb2_grpc.RetrievalServiceStub(channel))
        yield m
    finally:
        await stack.aclose()
        await embedder.close()
        fake.stop()
        redis.stop()


async def _ingest(stub: retrieval_pb2_grpc.RetrievalServiceStub) -> None:
    doc = retrieval_pb2.Document(
        id="lighthouse",
        title="The Eddystone Lighthouse",
        source="test://lighthouse",
        text="The fourth Eddystone Lighthouse, designed by John Smeaton, was completed in 1759. It used "
        "dovetailed granite blocks and hydraulic lime, and stood until 1877.",
    )

    async def requests():
        yield retrieval_pb2.IngestDocumentsRequest(document=doc)

    await stub.IngestDocuments(requests(), metadata=tenant_md(), timeout=120)


@pytest.fixture
async def agent_stub(mesh: Mesh) -> AsyncIterator[agent_pb2_grpc.AgentServiceStub]:
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        yield agent_pb2_grpc.AgentServiceStub(channel)


@pytest.fixture
async def raw_redis(mesh: Mesh) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(mesh.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(autouse=True)
def _fresh_script(request: pytest.FixtureRequest):
    """Each test using the mesh scripts its own turns and starts with none left over."""
    if "mesh" not in request.fixturenames:
        yield
        return
    fake = request.getfixturevalue("mesh").fake
    fake.clear()
    yield
    fake.clear()


async def collect(call) -> list[agent_pb2.RunResponse]:
    """Every event of a Run-like call (ResumeRun / ResolveInterrupt items are unwrapped)."""
    out = []
    async for item in call:
        out.append(item.event if hasattr(item, "event") and not isinstance(item, agent_pb2.RunResponse) else item)
    return out


def kinds(events: list[agent_pb2.RunResponse]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def of_kind(events: list[agent_pb2.RunResponse], kind: str) -> list:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]
