"""Fixtures for the telemetry tests (the in-memory span exporter is in tests/conftest.py): the five real services served in this process (so every span they make lands in that exporter)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from agentmesh.services.cli import runner
from agentmesh.services.cli.processes import start_redis
from agentmesh.services.runtime.clients import check_health
from agentmesh.services.runtime.server import serve
from agentmesh.services.runtime.settings import SERVICE_NAMES


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.asynccontextmanager
async def services_in_process(root: Path, env: dict[str, str]) -> AsyncIterator[runner.MeshPorts]:
    """Redis plus the five services, each built by its own ``create()`` from the environment the
    runner gives a local mesh (and ``env``), served in this event loop on free ports."""
    ports = runner.MeshPorts.free()
    redis = start_redis(ports.redis, root / "redis", root / "logs")
    mesh_env = runner.mesh_env(ports, f"redis://127.0.0.1:{ports.redis}/0", str(root / "milvus.db"))
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    try:
        with environment(mesh_env | {"AGENTMESH_HOME": str(root)} | env):
            for kind in runner.SERVICE_ORDER:
                module = importlib.import_module(f"agentmesh.services.{kind}.service")
                service = module.create()
                tasks.append(asyncio.create_task(serve(service, stop_event=stop, handle_signals=False)))
            for kind in runner.SERVICE_ORDER:
                await _wait_serving(f"127.0.0.1:{ports.service(kind)}", SERVICE_NAMES[kind], tasks)
            yield ports
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
        redis.stop()


async def _wait_serving(address: str, name: str, tasks: list[asyncio.Task], timeout_s: float = 180.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        while not await check_health(channel, name):
            for task in tasks:
                if task.done():
                    task.result()  # a service that failed to start raises here
            if loop.time() > deadline:
                raise TimeoutError(f"{name} at {address} not SERVING within {timeout_s} s")
            await asyncio.sleep(0.1)
