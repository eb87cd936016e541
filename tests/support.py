"""Helpers for tests that run real services in-process or as child processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from agentmesh.services.cli.processes import free_port
from agentmesh.services.runtime.clients import check_health
from agentmesh.services.runtime.server import Service, serve


@contextlib.asynccontextmanager
async def running_service(service: Service, wait_serving: bool = True, timeout_s: float = 60.0) -> AsyncIterator[str]:
    """Serve ``service`` in this event loop on a free port; yield its ``host:port``.

    Waits until its health check says SERVING (unless ``wait_serving`` is False) and stops it
    gracefully on exit. The service's settings get the chosen port.
    """
    port = free_port()
    service.settings.port = port
    address = f"127.0.0.1:{port}"
    stop = asyncio.Event()
    task = asyncio.create_task(serve(service, stop_event=stop, handle_signals=False))
    try:
        if wait_serving:
            async with grpc.aio.insecure_channel(address) as channel:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout_s
                while not await check_health(channel):
                    if task.done():
                        task.result()  # raises the start-up error
                    if loop.time() > deadline:
                        raise TimeoutError(f"{service.kind} did not become SERVING within {timeout_s} s")
                    await asyncio.sleep(0.05)
        yield address
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=30)
