"""Fixtures for the memory service tests: a real redis-server, the real LLM router and the
memory service in-process, and one embedding model loaded once for the whole test session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from agentmesh.memory.v1 import memory_pb2_grpc
from agentmesh.services.cli.processes import free_port, start_redis
from agentmesh.services.llm.service import LLMService, LLMSettings
from agentmesh.services.memory.service import MemoryService, MemorySettings
from agentmesh.services.retrieval.embedder import SentenceTransformerEmbedder
from agentmesh.services.runtime.settings import MeshSettings
from tests.support import running_service

#: Small, so GetContext crosses page boundaries in the tests.
PAGE = 4

_PROVIDER_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")


class RedisServer:
    """A redis-server child process on a free port, restartable on the same port and data dir."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.data_dir = root / "data"
        self.log_dir = root / "logs"
        self.proc = start_redis(self.port, self.data_dir, self.log_dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.stop()

    def kill(self) -> None:
        """SIGKILL: a crash, no chance to flush anything."""
        self.proc.popen.kill()
        self.proc.popen.wait(10)

    def restart(self) -> None:
        self.proc = start_redis(self.port, self.data_dir, self.log_dir)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def memory_address(redis_server: RedisServer) -> AsyncIterator[str]:
    """A sessions-only memory service (no facts, no compaction)."""
    settings = MemorySettings(
        redis_url=redis_server.url, readiness_interval_s=0.2, context_page_messages=PAGE, facts_enabled=False,
        compaction_trigger_tokens=0, read_wait_s=1.0, watch_poll_s=5.0,
    )
    async with running_service(MemoryService(settings)) as address:
        yield address


@pytest.fixture
async def memory(memory_address: str) -> AsyncIterator[memory_pb2_grpc.MemoryServiceStub]:
    async with grpc.aio.insecure_channel(memory_address) as channel:
        yield memory_pb2_grpc.MemoryServiceStub(channel)


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client for looking at what the service wrote."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
async def embedder() -> AsyncIterator[SentenceTransformerEmbedder]:
    """all-MiniLM-L6-v2, loaded once for every memory test that needs it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model = SentenceTransformerEmbedder()
    await model.load()
    yield model
    await model.close()


@contextlib.contextmanager
def no_provider_env() -> Iterator[None]:
    """Keys from the developer's shell must not turn the extractive router into a real one."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in _PROVIDER_ENV or k.startswith("AGENTMESH_LLM_")}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.asynccontextmanager
async def llm_router(**settings: object) -> AsyncIterator[str]:
    """The real LLM router (agentmesh.services.llm.service) in-process; yields its address."""
    with no_provider_env():
        service = LLMService(LLMSettings(readiness_interval_s=0.2, **settings))
    async with running_service(service) as address:
        yield address


@pytest.fixture(scope="session")
async def extractive_router() -> AsyncIterator[str]:
    """The router with no LLM configured: its extractive provider answers."""
    async with llm_router(provider="extractive") as address:
        yield address


@contextlib.asynccontextmanager
async def memory_service(redis_url: str, *, router: str, embedder=None, milvus_uri: str = "",
                         **settings: object) -> AsyncIterator[tuple[MemoryService, str]]:
    """A memory service talking to ``router``; with an ``embedder`` and ``milvus_uri`` it serves
    facts too. Yields (service, address)."""
    facts = embedder is not None
    kwargs: dict[str, object] = {"redis_url": redis_url, "readiness_interval_s": 0.2, "facts_enabled": facts}
    if facts:
        kwargs["milvus_uri"] = milvus_uri
    kwargs.update(settings)
    service = MemoryService(MemorySettings(**kwargs), embedder=embedder, mesh=MeshSettings(llm_address=router))
    async with running_service(service, timeout_s=120) as address:
        yield service, address
