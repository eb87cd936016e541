"""The local mesh runner with real Redis, real Envoy and real runtime servers standing in for the
five services (``standin_service.py``): start, state file, status, refusal of a second mesh,
stop in order, and the failures a person must be told about."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis

from agentmesh.services.cli import runner
from agentmesh.services.runtime.settings import SERVICE_NAMES

pytestmark = pytest.mark.timeout(180)

STANDIN = Path(__file__).parent / "standin_service.py"
ALL = ("redis", *runner.SERVICE_ORDER, "envoy")


def standin(kind: str) -> list[str]:
    return [sys.executable, str(STANDIN), kind]


@pytest.fixture
def mesh_env(tmp_path, monkeypatch):
    """A run folder and stand-in record folder; no external Redis/Milvus from the caller's env."""
    monkeypatch.delenv("AGENTMESH_MEMORY_REDIS_URL", raising=False)
    monkeypatch.delenv("AGENTMESH_RETRIEVAL_MILVUS_URI", raising=False)
    records = tmp_path / "standins"
    records.mkdir()
    monkeypatch.setenv("AGENTMESH_STANDIN_DIR", str(records))
    paths = runner.RunPaths(tmp_path / ".agentmesh")
    yield paths, records
    # Never leave processes behind, whatever the test did.
    state = runner.read_state(paths) if paths.state.exists() else None
    if state is not None:
        runner.stop_processes(state, timeout_s=5)


def pids_gone(records: list[runner.ProcessRecord]) -> bool:
    return all(not r.is_running() for r in records)


def test_up_status_refuse_second_and_down(mesh_env):
    paths, records = mesh_env
    ports = runner.MeshPorts.free()
    lines: list[str] = []
    state = runner.up(paths, ports, timeout_s=60, service_command=standin, echo=lines.append)

    # Every component started, recorded and alive; the state file says the same.
    assert [p.name for p in state.processes] == list(ALL)
    saved = runner.read_state(paths)
    assert saved is not None and saved.ready and saved.mode == "detached"
    assert {p.name: p.pid for p in saved.processes} == {p.name: p.pid for p in state.processes}
    assert saved.ports == ports.as_dict()
    assert all(p.is_running() for p in saved.processes)
    assert any("gateway SERVING" in line for line in lines)

    # What each service was told: its own port, everyone's address, Redis, Milvus, offline models.
    for kind in SERVICE_NAMES:
        env = json.loads((records / f"{kind}.json").read_text())
        assert env[f"AGENTMESH_{kind.upper()}_PORT"] == str(ports.service(kind))
        assert env[f"AGENTMESH_{kind.upper()}_HOST"] == "127.0.0.1"
        for other in SERVICE_NAMES:
            assert env[f"AGENTMESH_{other.upper()}_ADDRESS"] == f"127.0.0.1:{ports.service(other)}"
        assert env["AGENTMESH_MEMORY_REDIS_URL"] == f"redis://127.0.0.1:{ports.redis}/0"
        assert env["AGENTMESH_RETRIEVAL_MILVUS_URI"] == str(paths.milvus_db)
        assert env["HF_HUB_OFFLINE"] == "1"
    # The Redis it points at is real, with its append-only file in the run folder.
    client = redis.Redis(port=ports.redis)
    assert client.ping() and client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("dir")["dir"] == str(paths.redis_data)
    client.close()

    # status: every component healthy, the gateway checked through Envoy.
    _, rows = runner.status(paths)
    assert {r.name for r in rows} == {*ALL, "gateway"}
    assert all(r.ok for r in rows), rows
    assert next(r for r in rows if r.name == "gateway").state == "SERVING"

    # A second `up` from the same folder refuses and starts nothing.
    with pytest.raises(runner.MeshAlreadyRunning) as info:
        runner.up(paths, runner.MeshPorts.free(), timeout_s=60, service_command=standin, echo=lines.append)
    assert "already running" in str(info.value) and str(paths.root) in str(info.value)
    assert runner.read_state(paths).started_at == saved.started_at

    # down: SIGTERM in reverse order, all gone, state removed; a second down finds nothing.
    stopped: list[str] = []
    assert runner.down(paths, timeout_s=20, echo=stopped.append) is True
    assert [line.split()[1] for line in stopped if line.startswith("stopped ")] == [
        "envoy", "orchestrator", *[n for n in ("memory", "retrieval", "llm", "tools")], "redis"
    ]
    assert pids_gone(saved.processes)
    assert not paths.state.exists()
    assert runner.down(paths, echo=stopped.append) is False


def test_a_service_that_exits_is_named_with_its_log_and_everything_stops(mesh_env):
    paths, _ = mesh_env

    def command(kind: str) -> list[str]:
        if kind == "llm":
            return [sys.executable, "-c", "import sys; print('no provider could be configured'); sys.exit(3)"]
        return standin(kind)

    started: list[runner.ProcessRecord] = []
    original_write = runner.write_state

    def spy(paths_, state):  # remember every process the runner started
        started[:] = list(state.processes)
        original_write(paths_, state)

    runner.write_state = spy
    try:
        with pytest.raises(runner.MeshError) as info:
            runner.up(paths, runner.MeshPorts.free(), timeout_s=60, service_command=command, echo=lambda _: None)
    finally:
        runner.write_state = original_write
    message = str(info.value)
    assert message.startswith("llm exited with code 3 before it was ready")
    assert "no provider could be configured" in message
    assert {p.name for p in started} == {"redis", *runner.SERVICE_ORDER}
    deadline = time.monotonic() + 10
    while not pids_gone(started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids_gone(started)
    assert not paths.state.exists()


def test_a_service_that_never_becomes_ready_times_out_by_name(mesh_env):
    paths, _ = mesh_env

    def command(kind: str) -> list[str]:
        if kind == "retrieval":  # alive but never listening
            return [sys.executable, "-c", "import time; print('loading embedding model', flush=True); time.sleep(120)"]
        return standin(kind)

    t0 = time.monotonic()
    with pytest.raises(runner.MeshError) as info:
        runner.up(paths, runner.MeshPorts.free(), timeout_s=8, service_command=command, echo=lambda _: None)
    assert time.monotonic() - t0 < 40
    message = str(info.value)
    assert message.startswith("retrieval did not report SERVING within 8 s")
    assert "UNAVAILABLE" in message and "loading embedding model" in message
    assert not paths.state.exists()


def test_a_busy_port_is_refused_before_anything_starts(mesh_env):
    paths, _ = mesh_env
    ports = runner.MeshPorts.free()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.gateway))
        sock.listen()
        with pytest.raises(runner.MeshError) as info:
            runner.up(paths, ports, timeout_s=30, service_command=standin, echo=lambda _: None)
    assert f"gateway {ports.gateway}" in str(info.value)
    assert not paths.state.exists()
    assert not list(paths.logs.glob("*.log"))  # nothing was started


def test_foreground_supervisor_stops_everything_when_a_service_dies(mesh_env):
    paths, _ = mesh_env
    state = runner.up(paths, runner.MeshPorts.free(), timeout_s=60, mode="foreground", service_command=standin,
                      echo=lambda _: None)
    lines: list[str] = []
    stop = threading.Event()
    result: list[int] = []
    watcher = threading.Thread(target=lambda: result.append(runner.supervise(paths, state, stop, 10, lines.append)))
    watcher.start()
    os.kill(state.record("tools").pid, signal.SIGKILL)
    watcher.join(60)
    assert result == [1]
    assert any(line.startswith("tools exited with code -9 unexpectedly") for line in lines)
    assert pids_gone(state.processes)
    assert not paths.state.exists()


def test_foreground_supervisor_stops_on_request(mesh_env):
    paths, _ = mesh_env
    state = runner.up(paths, runner.MeshPorts.free(), timeout_s=60, mode="foreground", service_command=standin,
                      echo=lambda _: None)
    stop = threading.Event()
    result: list[int] = []
    watcher = threading.Thread(target=lambda: result.append(runner.supervise(paths, state, stop, 10, lambda _: None)))
    watcher.start()
    time.sleep(0.5)
    stop.set()  # what Ctrl-C / SIGTERM does in `agentmesh up`
    watcher.join(60)
    assert result == [0]
    assert pids_gone(state.processes)
    assert not paths.state.exists()


def test_down_sends_sigkill_to_a_process_that_ignores_sigterm(mesh_env):
    paths, _ = mesh_env
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout.readline() == b"ok\n"  # the handler is in place
    record = runner.ProcessRecord("memory", stubborn.pid, psutil.Process(stubborn.pid).create_time(), "/dev/null")
    runner.write_state(paths, _state(paths, [record]))
    lines: list[str] = []
    t0 = time.monotonic()
    assert runner.down(paths, timeout_s=1.0, echo=lines.append) is True
    stubborn.wait(5)  # psutil reaped it already (it is our child), so no exit status is left here
    assert not record.is_running()
    assert 1.0 <= time.monotonic() - t0 < 10
    assert any("did not stop within 1 s of SIGTERM; sending SIGKILL" in line for line in lines)
    assert not paths.state.exists()


def _state(paths: runner.RunPaths, processes: list[runner.ProcessRecord]) -> runner.MeshState:
    return runner.MeshState(
        root=str(paths.root), started_at="2026-01-01T00:00:00Z", mode="detached", runner_pid=os.getpid(),
        ports=runner.MeshPorts.free().as_dict(), redis_url="redis://127.0.0.1:1/0", milvus_uri="x.db",
        processes=processes, ready=True,
    )
