"""A real Envoy, rendered from gateway/envoy.yaml, in front of five real in-process gRPC servers.

Each upstream is a :class:`~tests.gateway.probes.ProbeService` served by the shared runtime
(``serve``: interceptors, health, reflection): it answers for one AgentMesh service name, so a test
can tell which upstream a call reached and what metadata and deadline arrived there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest_asyncio
import yaml

from agentmesh.services.cli.gateway import GatewayOptions, render_envoy_config
from agentmesh.services.cli.processes import Proc, free_port, start_envoy
from agentmesh.services.runtime.settings import SERVICE_NAMES
from tests.gateway.probes import ProbeService
from tests.support import running_service


def distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class Gateway:
    address: str
    admin_port: int
    upstreams: dict[str, str]
    proc: Proc
    stats_port: int = 0

    @property
    def url(self) -> str:
        """Base URL of the public listener for HTTP clients (JSON, gRPC-Web)."""
        return f"http://{self.address}"

    @property
    def log_path(self) -> Path:
        return self.proc.log_path


@contextlib.asynccontextmanager
async def envoy_in_front_of(
    upstreams: dict[str, str],
    folder: Path,
    options: GatewayOptions | None = None,
    edit: Callable[[dict], None] | None = None,
) -> AsyncIterator[Gateway]:
    """Render the template for ``upstreams`` (and ``options``; default: dev mode), start Envoy on
    free ports, stop it on exit. ``edit`` may change the parsed config before Envoy gets it (a
    test-only variation such as a second replica in one cluster)."""
    listen_port, admin_port, stats_port = distinct_free_ports(3)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "envoy.yaml"
    text = render_envoy_config(listen_port, admin_port, upstreams, stats_port=stats_port, options=options)
    if edit is not None:
        parsed = yaml.safe_load(text)
        edit(parsed)
        text = yaml.safe_dump(parsed, sort_keys=False)
    config.write_text(text)
    # Started in a thread: this loop must keep serving Envoy's first health checks meanwhile.
    proc = await asyncio.to_thread(start_envoy, config, admin_port, folder)
    try:
        yield Gateway(f"127.0.0.1:{listen_port}", admin_port, upstreams, proc, stats_port)
    finally:
        await asyncio.to_thread(proc.stop, 10.0)


@contextlib.asynccontextmanager
async def probe_upstreams() -> AsyncIterator[dict[str, str]]:
    """One in-process :class:`ProbeService` per service kind; yields ``{kind: "host:port"}``."""
    async with contextlib.AsyncExitStack() as stack:
        yield {kind: await stack.enter_async_context(running_service(ProbeService(kind))) for kind in SERVICE_NAMES}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gateway(tmp_path_factory) -> AsyncIterator[Gateway]:
    async with probe_upstreams() as upstreams:
        async with envoy_in_front_of(upstreams, tmp_path_factory.mktemp("gateway")) as gw:
            yield gw


async def whoami(address: str, kind: str, metadata=(), timeout: float | None = 5.0, method: str = "Whoami") -> dict:
    """Call ``/<service of kind>/<method>`` on ``address`` and decode the probe's JSON answer."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE_NAMES[kind]}/{method}")
        return json.loads(await call(b"", metadata=metadata, timeout=timeout))
