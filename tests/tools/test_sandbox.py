"""The python sandbox: every limit is exercised by a program that tries to break it.

These tests run real sandboxed processes (namespaces, rlimits, a per-run uid); they need what
the sandbox needs (Linux, root, kernel >= 5.12) and are skipped, saying why, elsewhere.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time

import grpc
import psutil
import pytest
from google.protobuf import json_format, struct_pb2

from agentmesh.services.tools.registry import ToolError
from agentmesh.services.tools.sandbox import PythonTool, Sandbox, SandboxLimits
from agentmesh.services.tools.service import ToolsService, ToolsSettings
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.support import running_service

UID_BASE = 710_000
LIMITS = SandboxLimits(
    cpu_s=1,
    memory_bytes=256 * 2**20,
    file_bytes=2**20,
    tmp_bytes=8 * 2**20,
    processes=8,
    open_files=64,
    wall_s=10,
    output_bytes=64 * 2**10,
)


def sandbox_pids(base: int, slots: int) -> list[int]:
    """Host pids of processes running as one of the sandbox's uids."""
    pids = []
    for proc in psutil.process_iter(["uids", "status"]):
        uids = proc.info.get("uids")
        if uids and base <= uids.real < base + slots and proc.info.get("status") != psutil.STATUS_ZOMBIE:
            pids.append(proc.pid)
    return pids


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
async def sandbox() -> Sandbox:
    box = Sandbox(LIMITS, uid_base=UID_BASE, slots=2)
    reason = await box.probe()
    if reason:
        pytest.skip(f"the sandbox cannot run here: {reason}")
    return box


async def test_a_plain_program_runs_as_an_unprivileged_uid_in_a_clean_private_world(sandbox):
    code = (
        "import os, sys\n"
        "print(os.getuid(), os.getgid(), os.getgroups())\n"
        "print(sorted(os.environ))\n"
        "print(os.getcwd(), os.environ['HOME'])\n"
        "print(os.getpid())\n"
        "print(len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
        "open('note.txt', 'w').write('x')\n"
        "print(sorted(os.listdir('.')))\n"
    )
    result = await sandbox.run(code)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    uid, gid, groups = lines[0].split(" ", 2)
    assert UID_BASE <= int(uid) < UID_BASE + 2 and gid == uid and groups == "[]"
    assert lines[1] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"  # nothing of the service's environment
    assert lines[2] == "/tmp/work /tmp/work"
    assert lines[3] == "2"  # its own PID namespace, under a tiny init
    assert lines[4] == "2"  # /proc shows the init and the program, not the host's processes
    assert lines[5] == "['main.py', 'note.txt']"


async def test_the_work_directory_is_private_to_each_run(sandbox):
    first = await sandbox.run("open('/tmp/work/left.txt', 'w').write('secret'); open('/tmp/also.txt', 'w').write('x')")
    assert first.exit_code == 0, first.stderr
    second = await sandbox.run("import os; print(sorted(os.listdir('/tmp/work')), sorted(os.listdir('/tmp')))")
    assert second.stdout.strip() == "['main.py'] ['work']"


async def test_everything_outside_the_private_tmp_is_read_only(sandbox):
    code = (
        "import os\n"
        "for path in ('/var/tmp/x', '/run/lock/x', os.path.expanduser('~root') + '/x', '/x'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "    except OSError as e:\n"
        "        print(e.errno)\n"
        "    else:\n"
        "        print('WROTE', path)\n"
    )
    result = await sandbox.run(code)
    assert "WROTE" not in result.stdout
    assert set(result.stdout.split()) <= {str(errno.EROFS), str(errno.EACCES), str(errno.ENOENT)}
    assert not os.path.exists("/var/tmp/x")


async def test_a_fork_bomb_stops_at_the_process_limit(sandbox):
    # Deterministic form: the program counts how many children it gets before fork fails.
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, e.errno, flush=True)\n"
    )
    result = await sandbox.run(code)
    assert result.exit_code == 0, result.stderr
    children, error = map(int, result.stdout.split())
    assert children == LIMITS.processes - 1  # the program itself is the first of its uid's processes
    assert error == errno.EAGAIN
    # The sleeping children died with the run's PID namespace.
    assert sandbox_pids(UID_BASE, 2) == []


async def test_a_real_fork_bomb_never_exceeds_the_limit_and_leaves_nothing(sandbox):
    peak = 0
    done = asyncio.Event()

    async def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(await asyncio.to_thread(sandbox_pids, UID_BASE, 2)))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    try:
        code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        result = await sandbox.run(code, wall_s=2)
    finally:
        done.set()
        await watcher
    assert result.stopped == "wall_time" or result.signal in (signal.SIGXCPU, signal.SIGKILL)
    assert time.monotonic() - started < 5
    assert 1 <= peak <= LIMITS.processes
    assert sandbox_pids(UID_BASE, 2) == []


async def test_an_allocation_bomb_hits_the_memory_limit(sandbox):
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 2**20))\n"
    result = await sandbox.run(code)
    assert result.exit_code == 1
    assert result.stderr.strip().endswith("MemoryError")


async def test_an_infinite_loop_is_stopped_by_the_cpu_limit(sandbox):
    started = time.monotonic()
    result = await sandbox.run("while True:\n    pass\n")
    elapsed = time.monotonic() - started
    assert result.signal == signal.SIGXCPU
    assert result.stopped is None
    assert LIMITS.cpu_s * 0.9 <= elapsed < LIMITS.cpu_s + 3


async def test_a_sleeping_program_is_stopped_by_the_wall_clock_limit(sandbox):
    started = time.monotonic()
    result = await sandbox.run("import time\nprint('going to sleep', flush=True)\ntime.sleep(60)\n", wall_s=1)
    elapsed = time.monotonic() - started
    assert result.stopped == "wall_time"
    assert result.stdout == "going to sleep\n"
    assert 0.9 <= elapsed < 2
    assert sandbox_pids(UID_BASE, 2) == []


async def test_a_big_file_write_stops_at_the_file_size_limit(sandbox):
    code = (
        "import os\n"
        "with open('big.bin', 'wb') as f:\n"
        "    try:\n"
        "        f.write(b'x' * (8 * 2**20))\n"
        "    except OSError as e:\n"
        "        print(e.errno)\n"
        "print(os.path.getsize('big.bin'))\n"
    )
    result = await sandbox.run(code)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == [str(errno.EFBIG), str(LIMITS.file_bytes)]


async def test_a_socket_connect_to_a_local_listening_server_is_refused(sandbox):
    accepted = 0

    async def on_connect(reader, writer):
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # Prove the server does accept connections from outside the sandbox.
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    await asyncio.sleep(0.05)
    assert accepted == 1
    code = (
        "import socket\n"
        f"for host in ('127.0.0.1', 'localhost', '{_host_address()}'):\n"
        "    try:\n"
        f"        socket.create_connection((host, {port}), timeout=2)\n"
        "    except OSError as e:\n"
        "        print(host, type(e).__name__, e.errno)\n"
        "    else:\n"
        "        print(host, 'CONNECTED')\n"
    )
    try:
        result = await sandbox.run(code)
    finally:
        server.close()
        await server.wait_closed()
    assert "CONNECTED" not in result.stdout, result.stdout
    assert f"127.0.0.1 OSError {errno.ENETUNREACH}" in result.stdout
    assert accepted == 1  # no connection from the sandbox ever arrived


def _host_address() -> str:
    """A non-loopback address of this host (its first one), or 127.0.0.1 when it has none."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family.name == "AF_INET" and not address.address.startswith("127."):
                return address.address
    return "127.0.0.1"


async def test_processes_that_leave_the_group_still_die_with_the_run(sandbox):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # leaves the process group the service kills
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print('parent exits', flush=True)\n"
    )
    result = await sandbox.run(code)
    assert result.exit_code == 0
    await asyncio.sleep(0.1)
    assert sandbox_pids(UID_BASE, 2) == []


async def test_output_beyond_the_cap_stops_the_program(sandbox):
    result = await sandbox.run("while True:\n    print('x' * 1000)\n")
    assert result.stopped == "output_size"
    assert result.output_truncated
    assert len(result.stdout.encode()) == LIMITS.output_bytes


async def test_the_sandbox_refuses_clearly_when_it_cannot_be_set_up():
    box = Sandbox(LIMITS, python="/nonexistent/python3", uid_base=UID_BASE + 10, slots=1)
    reason = await box.probe()
    assert reason is not None and "could not be set up" in reason and "/nonexistent/python3" in reason
    tool = PythonTool(box)
    with pytest.raises(ToolError, match="code execution is unavailable on this server: the sandbox could not be set up"):
        await tool.run({"code": "print(1)"}, _ignore_progress)


async def _ignore_progress(message, fraction=None, *, stream=0):
    return None


# -- through the service ------------------------------------------------------------------------


def code_request(code: str, **extra) -> tools_pb2.ExecuteToolRequest:
    arguments = struct_pb2.Struct()
    arguments.update({"code": code, **extra})
    return tools_pb2.ExecuteToolRequest(name="python", arguments=arguments, tool_call_id="call_py")


@pytest.fixture(scope="module")
async def python_stub(sandbox):
    settings = ToolsSettings(
        python_uid_base=UID_BASE + 20,
        python_slots=2,
        python_cpu_s=2,
        python_wall_s=5,
        python_max_processes=8,
    )
    service = ToolsService(settings, mesh=None)
    async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
        assert service.sandbox is not None and service.sandbox.unavailable is None
        yield tools_pb2_grpc.ToolServiceStub(channel)


async def test_output_streams_as_progress_while_the_program_runs(python_stub):
    code = "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')\nraise SystemExit(3)\n"
    seen: list[tuple[float, tools_pb2.ExecuteToolResponse]] = []
    async for item in python_stub.ExecuteTool(code_request(code), timeout=20):
        seen.append((time.monotonic(), item))
    progress = [(t, i.progress) for t, i in seen if i.WhichOneof("event") == "progress"]
    stdout = "".join(p.message for _, p in progress if p.stream == tools_pb2.OUTPUT_STREAM_STDOUT)
    assert stdout == "first\nsecond\n"
    first_at = next(t for t, p in progress if p.message.startswith("first"))
    result_at, last = seen[-1]
    assert last.WhichOneof("event") == "result"
    assert result_at - first_at >= 0.8  # 'first' arrived while the program was still sleeping
    result = last.result
    assert result.is_error and result.error_message == "the program exited with status 3"
    output = json_format.MessageToDict(result.output)
    assert output["exit_code"] == 3 and output["stdout"] == "first\nsecond\n" and output["stopped"] is None


async def test_a_traceback_reaches_the_model_as_an_error_result(python_stub):
    items = [i async for i in python_stub.ExecuteTool(code_request("1 / 0"), timeout=20)]
    stderr = "".join(i.progress.message for i in items[:-1] if i.progress.stream == tools_pb2.OUTPUT_STREAM_STDERR)
    assert "ZeroDivisionError" in stderr
    result = items[-1].result
    assert result.is_error and result.error_message.endswith("ZeroDivisionError: division by zero")
    assert "Traceback" in json_format.MessageToDict(result.output)["stderr"]


async def test_the_call_timeout_argument_stops_the_program(python_stub):
    items = [i async for i in python_stub.ExecuteTool(code_request("import time; time.sleep(30)", timeout_s=0.5), timeout=20)]
    result = items[-1].result
    assert result.is_error and "wall-clock limit of 0.5 s" in result.error_message
    assert json_format.MessageToDict(result.output)["stopped"] == "wall_time"


async def test_cancelling_the_call_kills_the_sleeping_process_within_a_second(python_stub):
    call = python_stub.ExecuteTool(code_request("import time\nprint('sleeping', flush=True)\ntime.sleep(60)\n"), timeout=30)
    first = await call.read()
    assert first.progress.message.startswith("sleeping")
    pids = sandbox_pids(UID_BASE + 20, 2)
    assert len(pids) == 1  # the program, under its own uid
    call.cancel()
    cancelled_at = time.monotonic()
    while any(alive(pid) for pid in pids) and time.monotonic() - cancelled_at < 1.0:
        await asyncio.sleep(0.02)
    assert not any(alive(pid) for pid in pids), "the sandboxed process outlived the cancelled call by 1 s"


async def test_a_caller_deadline_kills_the_process_too(python_stub):
    call = python_stub.ExecuteTool(code_request("import time\nprint('sleeping', flush=True)\ntime.sleep(60)\n"), timeout=1.5)
    assert (await call.read()).progress.message.startswith("sleeping")
    pids = sandbox_pids(UID_BASE + 20, 2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while (item := await call.read()) is not grpc.aio.EOF:
            assert item.WhichOneof("event") == "progress"
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 1.0
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert pids and not any(alive(pid) for pid in pids)
