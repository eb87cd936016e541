"""A whole local mesh for the fault tests, started by the real runner (``runner.up``) with
optional service replicas, and what the tests measure on it: process memory, Envoy stats.

Like :func:`tests.e2e.mesh.local_mesh`, plus ``replicas`` (several processes of a service kind,
each an endpoint of the kind's gateway cluster; see ``runner.up``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import psutil

from agentmesh.services.cli import runner
from agentmesh.services.cli.processes import envoy_admin_get
from tests.e2e.mesh import Mesh

#: Many streams on one channel: grpc.aio channels with equal arguments share one connection
#: unless each has its own subchannel pool, and Envoy allows 100 streams per connection.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@contextlib.contextmanager
def fault_mesh(root: Path, env: Mapping[str, str], replicas: Mapping[str, int] | None = None,
               timeout_s: float = 300) -> Iterator[Mesh]:
    """Start a mesh whose processes see ``env`` on top of this process's environment; stop it and
    restore the environment on exit."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    paths = runner.RunPaths(root / ".agentmesh")
    ports = runner.MeshPorts.free()
    try:
        runner.up(paths, ports, timeout_s=timeout_s, echo=lambda _: None, replicas=replicas)
        yield Mesh(paths, ports)
    finally:
        runner.down(paths, echo=lambda _: None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def replicas_of(mesh: Mesh, kind: str) -> list[runner.ProcessRecord]:
    """The live processes of service ``kind``, first replica first."""
    state = runner.read_state(mesh.paths)
    assert state is not None
    return [rec for rec in state.processes if runner.replica_kind(rec.name) == kind and rec.is_running()]


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid``, in MiB."""
    return psutil.Process(pid).memory_info().rss / 2**20


def envoy_stats(mesh: Mesh, pattern: str) -> dict[str, int]:
    """Envoy counters and gauges whose name matches the regex ``pattern`` (admin /stats)."""
    code, body = envoy_admin_get(mesh.ports.admin, f"/stats?format=json&filter={pattern}")
    assert code == 200, body
    return {s["name"]: s["value"] for s in json.loads(body)["stats"] if "value" in s}


def channels(mesh: Mesh, count: int) -> list[grpc.aio.Channel]:
    """``count`` channels to the gateway, each on its own HTTP/2 connection."""
    return [grpc.aio.insecure_channel(mesh.gateway, options=OWN_CONNECTION) for _ in range(count)]
