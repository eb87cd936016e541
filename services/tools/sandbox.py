"""The ``python`` tool: run model-written Python in a sandbox, one process tree per call.

How a run is contained (``sandbox_init.py`` does the set-up inside the child; this module starts,
watches and stops it):

- **separate processes, one group**: the launcher is started with ``start_new_session=True``,
  so the run is a process group of its own; the service stops it with ``SIGKILL`` to the group;
- **PID namespace**: the program runs under a tiny init (PID 1 of a new PID namespace) that dies
  with the launcher; when it dies the kernel kills everything left in the namespace, including
  processes that left the group with ``setsid()``. A cancelled call or one past its deadline is
  gone within milliseconds;
- **no network**: a new network namespace with no interface up, so every connect fails
  (ENETUNREACH), loopback included: the host's local services are out of reach;
- **filesystem**: a private mount namespace where every mount is read-only, with a fresh
  size-limited tmpfs on ``/tmp`` (the work directory ``/tmp/work`` is cwd and HOME) and on
  ``/dev/shm``, and a ``/proc`` that shows only the run's processes. All of it vanishes with the
  run;
- **resource limits** (``setrlimit``): CPU time (SIGXCPU, then SIGKILL one second later),
  address space, size of any one file written, processes, open files, no core files;
- **identity**: RLIMIT_NPROC counts every process of a uid and is ignored for root, so each
  concurrent run gets a uid of its own from a reserved range (``uid_base`` ..
  ``uid_base + slots - 1``, gid equal to uid, no supplementary groups, ``no_new_privs``). A
  fork bomb then stops at ``processes`` and cannot starve other runs or the service. The count
  is kept per uid by the kernel, across containers that share the host's user namespace: tool
  service replicas on one node need disjoint ranges (``AGENTMESH_TOOLS_PYTHON_UID_BASE``), or
  pods with a user namespace of their own (Kubernetes ``hostUsers: false``);
- **clean environment**: only PATH, HOME, TMPDIR and LANG; the interpreter runs with ``-I``
  (no PYTHON* variables, no user site) and ``-u`` (unbuffered, so output streams as written);
- **wall-clock limit** per call, and a cap on the output kept and streamed (the run is stopped
  when it writes more).

Requirements: Linux, the service running as root (CAP_SYS_ADMIN for the namespaces, CAP_SETUID
/ CAP_SETGID for the per-run uid) and kernel >= 5.12 (``mount_setattr``). :meth:`Sandbox.probe`
runs a trial program at start-up; when anything is missing, every ``python`` call is refused
with an error result that says why — never run with weaker isolation. A stronger boundary
(gVisor, Firecracker) is still advisable for hostile multi-tenant code: these are kernel
namespaces on a shared kernel.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from agentmesh.services.runtime.errors import ServiceError
from agentmesh.services.tools.registry import (
    MAX_PROGRESS_CHARS,
    ProgressCallback,
    Tool,
    ToolError,
    ToolOutput,
)
from agentmesh.tools.v1 import tools_pb2

log = logging.getLogger("agentmesh.tools")

LAUNCHER = Path(__file__).with_name("sandbox_init.py")
#: Inside the run's mount namespace (a private tmpfs).
WORKDIR = "/tmp/work"
#: Environment of the user's program: nothing of the service's leaks in.
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
READ_BYTES = 4096
#: Longest code accepted, in characters.
MAX_CODE_CHARS = 100_000

#: Called with (stream, text) for each chunk of output; stream is tools_pb2.OUTPUT_STREAM_*.
OutputCallback = Callable[[int, str], Awaitable[None]]


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. Sizes in bytes, times in seconds."""

    cpu_s: int = 10
    memory_bytes: int = 512 * 2**20
    file_bytes: int = 16 * 2**20
    tmp_bytes: int = 64 * 2**20
    processes: int = 16
    open_files: int = 128
    wall_s: float = 30.0
    output_bytes: int = 256 * 2**10


@dataclass
class RunResult:
    """How a run ended. ``stopped`` says why the service stopped it (``wall_time``,
    ``output_size``), None when it ended on its own."""

    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    output_truncated: bool
    stopped: str | None
    duration_ms: int


def _usable_by_others(path: str) -> bool:
    """True when a user with no relation to the file's owner can run ``path``: the file is
    world-executable and every directory above it world-searchable."""
    real = Path(os.path.realpath(path))
    try:
        if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def find_interpreter(configured: str = "") -> str | None:
    """The interpreter the sandbox runs: ``configured`` if given, else the first of this
    service's interpreter and ``python3`` on PATH that an unprivileged uid can run."""
    if configured:
        return configured
    for candidate in (sys.executable, shutil.which("python3"), "/usr/local/bin/python3", "/usr/bin/python3"):
        if candidate and _usable_by_others(candidate):
            return candidate
    return None


class _Stopped(Exception):
    def __init__(self, reason: str):
        self.reason = reason


class Sandbox:
    """Starts and stops sandboxed runs; at most ``slots`` at once (one uid per slot)."""

    def __init__(self, limits: SandboxLimits, *, python: str = "", uid_base: int = 700_000, slots: int = 4):
        self.limits = limits
        self.uid_base = uid_base
        self.slots = slots
        self._python = python
        self._free_uids = list(range(uid_base, uid_base + slots))
        self._cleanups: set[asyncio.Task[None]] = set()
        #: Why runs are refused; None once :meth:`probe` succeeded.
        self.unavailable: str | None = "the sandbox has not been checked yet"
        #: ``sys.version`` of the sandbox's interpreter, once probed.
        self.python_version = ""

    async def probe(self) -> str | None:
        """Check that runs can be fully contained here; None when they can, else the reason
        (also kept in :attr:`unavailable`)."""
        self.unavailable = await self._probe()
        if self.unavailable:
            log.warning("python sandbox unavailable", extra={"fields": {"reason": self.unavailable}})
        return self.unavailable

    async def _probe(self) -> str | None:
        if not sys.platform.startswith("linux"):
            return f"the sandbox needs Linux namespaces; this is {sys.platform}"
        if os.geteuid() != 0:
            return (
                f"the tool service runs as uid {os.geteuid()}; the sandbox needs root (CAP_SYS_ADMIN for "
                "network, PID and mount namespaces, CAP_SETUID/CAP_SETGID for a per-run uid)"
            )
        python = find_interpreter(self._python)
        if python is None:
            return (
                "no Python interpreter that an unprivileged uid can run was found; set "
                "AGENTMESH_TOOLS_PYTHON_EXECUTABLE"
            )
        self._python = python
        code = (
            "import socket, sys\n"
            "s = socket.socket()\n"
            "try:\n    s.connect(('127.0.0.1', 9))\nexcept OSError as e:\n    print(e.errno)\n"
            "else:\n    print('connected')\n"
            "print(sys.version.split()[0])\n"
        )
        try:
            result = await self.run(code, wall_s=10)
        except ToolError as exc:
            return str(exc)
        lines = result.stdout.split()
        if result.exit_code != 0 or len(lines) != 2:
            return f"the trial run failed (exit {result.exit_code}, signal {result.signal}): {result.stderr[-300:]}"
        if lines[0] == "connected":
            return "the trial run could reach the network; refusing to run code without network isolation"
        self.python_version = lines[1]
        return None

    async def run(self, code: str, on_output: OutputCallback | None = None, wall_s: float | None = None) -> RunResult:
        """Run ``code``; stream its output to ``on_output``; stop it after ``wall_s`` seconds
        (default and ceiling: the limits' ``wall_s``). Raises ToolError when the sandbox cannot
        be set up, RESOURCE_EXHAUSTED when all slots are busy. Cancelling the call kills the run."""
        if not self._free_uids:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"all {self.slots} sandbox slots are busy; retry shortly"
            )
        uid = self._free_uids.pop()
        try:
            return await self._run(code, uid, on_output, min(wall_s or self.limits.wall_s, self.limits.wall_s))
        finally:
            # A task of its own, so the uid returns to the pool only after the sweep, even when
            # this call is cancelled twice.
            cleanup = asyncio.create_task(self._release_uid(uid))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            await asyncio.shield(cleanup)

    async def _release_uid(self, uid: int) -> None:
        # The PID namespace already took everything down; the sweep only guards the invariant
        # that a uid is free of processes when the next run gets it.
        try:
            await asyncio.to_thread(_kill_uid, uid)
        finally:
            self._free_uids.append(uid)

    async def _run(self, code: str, uid: int, on_output: OutputCallback | None, wall_s: float) -> RunResult:
        lim = self.limits
        status_r, status_w = os.pipe()
        config = {
            "status_fd": status_w,
            "uid": uid,
            "gid": uid,
            "python": self._python,
            "workdir": WORKDIR,
            "env": CLEAN_ENV,
            "cpu_s": lim.cpu_s,
            "memory_bytes": lim.memory_bytes,
            "file_bytes": lim.file_bytes,
            "tmp_bytes": lim.tmp_bytes,
            "processes": lim.processes,
            "open_files": lim.open_files,
        }
        started = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", "-B", str(LAUNCHER), json.dumps(config),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(status_w,),
                start_new_session=True,
                env={},
            )
        except OSError as exc:
            os.close(status_r)
            raise ToolError(f"the sandbox could not be started: {exc}") from exc
        finally:
            os.close(status_w)
        output = _Output(lim.output_bytes, on_output)
        stopped: str | None = None
        readers: list[asyncio.Task[None]] = []
        try:
            assert proc.stdin and proc.stdout and proc.stderr
            proc.stdin.write(code.encode())
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await proc.stdin.drain()
            proc.stdin.close()
            readers = [
                asyncio.create_task(output.pump(proc.stdout, tools_pb2.OUTPUT_STREAM_STDOUT)),
                asyncio.create_task(output.pump(proc.stderr, tools_pb2.OUTPUT_STREAM_STDERR)),
            ]
            try:
                async with asyncio.timeout(wall_s):
                    await asyncio.gather(*readers)
                    await proc.wait()
            except TimeoutError:
                stopped = "wall_time"
            except _Stopped as exc:
                stopped = exc.reason
        finally:
            try:
                # Shielded, so a cancelled call still kills and reaps the run.
                await asyncio.shield(_stop(proc, readers))
            finally:
                status = _read_status(status_r)
        duration_ms = int((time.perf_counter() - started) * 1000)
        if "error" in status:
            raise ToolError(f"the sandbox could not be set up: {status['error']}")
        if not status and stopped is None:
            tail = output.text[tools_pb2.OUTPUT_STREAM_STDERR][-300:]
            raise ToolError(f"the sandbox launcher failed (exit status {proc.returncode}): {tail}")
        return RunResult(
            exit_code=status.get("exit_code"),
            signal=status.get("signal"),
            stdout=output.text[tools_pb2.OUTPUT_STREAM_STDOUT],
            stderr=output.text[tools_pb2.OUTPUT_STREAM_STDERR],
            output_truncated=output.truncated,
            stopped=stopped,
            duration_ms=duration_ms,
        )


class _Output:
    """Both output streams of a run: decoded incrementally (UTF-8, invalid bytes replaced),
    kept up to ``limit`` bytes in all, and passed on chunk by chunk."""

    def __init__(self, limit: int, on_output: OutputCallback | None):
        self.limit = limit
        self.used = 0
        self.truncated = False
        self.text = {tools_pb2.OUTPUT_STREAM_STDOUT: "", tools_pb2.OUTPUT_STREAM_STDERR: ""}
        self._on_output = on_output

    async def pump(self, reader: asyncio.StreamReader, stream: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while data := await reader.read(READ_BYTES):
            room = self.limit - self.used
            if len(data) > room:
                data, self.truncated = data[:room], True
            self.used += len(data)
            text = decoder.decode(data)
            self.text[stream] += text
            if self._on_output is not None:
                for i in range(0, len(text), MAX_PROGRESS_CHARS):
                    await self._on_output(stream, text[i : i + MAX_PROGRESS_CHARS])
            if self.truncated:
                raise _Stopped("output_size")
        self.text[stream] += decoder.decode(b"", final=True)


async def _stop(proc: asyncio.subprocess.Process, readers: list[asyncio.Task[None]]) -> None:
    """Kill the run's process group (a no-op when it ended), read its pipes to their end and reap
    the launcher. The pipes must be drained: ``Process.wait()`` returns only once they are
    closed, and a reader paused on a full buffer would never see the end."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            while await stream.read(65536):
                pass
    await proc.wait()


def _read_status(fd: int) -> dict[str, Any]:
    """The last status line the launcher wrote (empty when the run was killed first)."""
    try:
        os.set_blocking(fd, False)
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 4096):
                data += chunk
    finally:
        os.close(fd)
    status: dict[str, Any] = {}
    for line in data.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            status.update(json.loads(line))
    return status


def _kill_uid(uid: int) -> int:
    """SIGKILL every process whose real uid is ``uid``; returns how many there were."""
    killed = 0
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        if uids is not None and uids.real == uid:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
    if killed:
        log.warning("killed processes left by a sandbox run", extra={"fields": {"uid": uid, "count": killed}})
    return killed


class PythonTool(Tool):
    """Run Python code in the sandbox; stdout/stderr stream as progress events while it runs.

    Output: ``{"exit_code", "signal", "stdout", "stderr", "output_truncated", "stopped"}``
    (``signal`` a name such as ``SIGXCPU`` or null; ``stopped`` is ``wall_time``,
    ``output_size`` or null). A run that does not exit with status 0 is an error result carrying
    the same output, so the model sees the traceback. When the sandbox is unavailable on this
    host every call is an error result that says why.
    """

    name = "python"
    parameters_schema = {
        "type": "object",
        "properties": {
            "code": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_CODE_CHARS,
                "description": "A complete Python program. Print what you want to see.",
            },
            "timeout_s": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "Stop the program after this many seconds (at most the service's limit).",
            },
        },
        "required": ["code"],
        "additionalProperties": False,
    }
    output_schema = {
        "type": "object",
        "properties": {
            "exit_code": {"type": ["integer", "null"]},
            "signal": {"type": ["string", "null"]},
            "stdout": {"type": "string"},
            "stderr": {"type": "string"},
            "output_truncated": {"type": "boolean"},
            "stopped": {"enum": ["wall_time", "output_size", None]},
        },
        "required": ["exit_code", "signal", "stdout", "stderr", "output_truncated", "stopped"],
        "additionalProperties": False,
    }

    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox
        lim = sandbox.limits
        version = f"Python {sandbox.python_version}" if sandbox.python_version else "Python 3"
        self.description = (
            f"Run a {version} program in an isolated sandbox and return its exit code, stdout and stderr. "
            f"No network access. Standard library only. Files can be written in the working directory "
            f"(at most {lim.tmp_bytes // 2**20} MiB, discarded after the run). Limits: {lim.cpu_s} s of CPU, "
            f"{lim.memory_bytes // 2**20} MiB of memory, {lim.wall_s:g} s of wall-clock time, "
            f"{lim.output_bytes // 2**10} KiB of output. Use print() to show results."
        )
        # Leave the sandbox time to stop the run and report it before the service's own limit.
        self.max_runtime_s = lim.wall_s + 5
        self.max_concurrent_calls = sandbox.slots

    async def run(self, arguments: dict[str, Any], progress: ProgressCallback) -> ToolOutput:
        if self.sandbox.unavailable:
            raise ToolError(f"code execution is unavailable on this server: {self.sandbox.unavailable}")

        async def forward(stream: int, text: str) -> None:
            await progress(text, None, stream=stream)

        result = await self.sandbox.run(arguments["code"], forward, arguments.get("timeout_s"))
        lim = self.sandbox.limits
        signame = signal.Signals(result.signal).name if result.signal else None
        output = {
            "exit_code": result.exit_code,
            "signal": signame,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "output_truncated": result.output_truncated,
            "stopped": result.stopped,
        }
        if result.stopped == "wall_time":
            wall = min(arguments.get("timeout_s") or lim.wall_s, lim.wall_s)
            raise ToolError(f"the program ran longer than its wall-clock limit of {wall:g} s and was stopped", output)
        if result.stopped == "output_size":
            raise ToolError(f"the program wrote more than {lim.output_bytes} bytes of output and was stopped", output)
        if result.signal == signal.SIGXCPU:
            raise ToolError(f"the program used up its CPU-time limit of {lim.cpu_s} s and was stopped (SIGXCPU)", output)
        if result.signal == signal.SIGKILL:
            raise ToolError(
                f"the program was killed (SIGKILL), most likely by the CPU-time hard limit of {lim.cpu_s + 1} s", output
            )
        if result.signal:
            raise ToolError(f"the program was killed by {signame}", output)
        if result.exit_code != 0:
            message = f"the program exited with status {result.exit_code}"
            if last := result.stderr.strip().splitlines()[-1:]:
                message += f": {last[0][:300]}"
            raise ToolError(message, output)
        return ToolOutput(output=output)
