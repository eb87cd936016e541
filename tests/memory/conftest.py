"""Fixtures for the memory service tests: a real redis-server and the service in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from agentmesh.memory.v1 import memory_pb2_grpc
from agentmesh.services.cli.processes import free_port, start_redis
from agentmesh.services.memory.service import MemoryService, MemorySettings
from tests.support import running_service

#: Small, so GetContext crosses page boundaries in the tests.
PAGE = 4


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
    settings = MemorySettings(redis_url=redis_server.url, readiness_interval_s=0.2, context_page_messages=PAGE)
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
