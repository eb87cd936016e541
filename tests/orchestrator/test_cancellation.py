"""A client that cancels its run stops the model's stream at the provider and kills a running
sandboxed program within a second; the run ends CANCELLED and nothing reaches the session."""

from __future__ import annotations

import asyncio
import time

import grpc
import psutil
import pytest

from agentmesh.agent.v1 import agent_pb2
from tests.orchestrator.conftest import SANDBOX_SLOTS, SANDBOX_UID_BASE, Mesh, tenant_md

pytestmark = pytest.mark.timeout(120)


def sandbox_pids() -> list[int]:
    """Live processes running as one of the tests' sandbox uids."""
    pids = []
    for proc in psutil.process_iter(["uids", "status"]):
        uids = proc.info.get("uids")
        in_range = uids is not None and SANDBOX_UID_BASE <= uids.real < SANDBOX_UID_BASE + SANDBOX_SLOTS
        if in_range and proc.info.get("status") != psutil.STATUS_ZOMBIE:
            pids.append(proc.pid)
    return pids


async def read_until(call, predicate) -> list[agent_pb2.RunResponse]:
    seen = []
    async for event in call:
        seen.append(event)
        if predicate(event):
            return seen
    raise AssertionError(f"the stream ended first: {[e.WhichOneof('event') for e in seen]}")


async def wait_for(check, timeout_s: float, interval_s: float = 0.02):
    """``await check()`` until it returns something truthy; (value, seconds it took)."""
    start = time.monotonic()
    while True:
        value = await check()
        if value or time.monotonic() - start > timeout_s:
            return value, time.monotonic() - start
        await asyncio.sleep(interval_s)


async def cancelled_state(agent_stub, run_id: str) -> agent_pb2.RunInfo | None:
    run = (await agent_stub.GetRun(agent_pb2.GetRunRequest(run_id=run_id), metadata=tenant_md())).run
    return run if run.phase == agent_pb2.RUN_PHASE_FINISHED else None


async def test_cancelling_stops_the_provider_stream_within_a_second(mesh: Mesh, agent_stub):
    mesh.fake.script("calc", {"text": " ".join(f"word{i}" for i in range(40)), "chunk_delay_s": 0.2})
    call = agent_stub.Run(
        agent_pb2.RunRequest(session_id="cancel-1", input="Talk slowly.", agent="calc"), metadata=tenant_md(), timeout=60
    )
    seen = await read_until(call, lambda e: e.WhichOneof("event") == "text_delta")
    run_id = seen[0].started.run_id
    index = len(mesh.fake.requests) - 1
    assert mesh.fake.requests[index]["outcome"] is None  # still streaming

    call.cancel()
    cancelled_at = time.monotonic()
    outcome = await asyncio.to_thread(mesh.fake.wait_for_outcome, index, 5.0)
    took = time.monotonic() - cancelled_at
    assert outcome == "client_disconnected"  # the provider saw the connection go
    assert took < 1.0, f"the provider stream stopped {took:.2f} s after the cancel"

    run, _ = await wait_for(lambda: cancelled_state(agent_stub, run_id), 1.0)
    assert run is not None and run.status == agent_pb2.RUN_STATUS_CANCELLED
    assert run.error_message == "the client went away"
    # Nothing of the cancelled turn was remembered.
    replay = [
        r.event async for r in agent_stub.ResumeRun(agent_pb2.ResumeRunRequest(run_id=run_id), metadata=tenant_md())
    ]
    assert replay[-1].final.status == agent_pb2.RUN_STATUS_CANCELLED and replay[-1].final.session_version == 0


async def test_cancelling_kills_a_sleeping_sandboxed_program_within_a_second(mesh: Mesh, agent_stub):
    mesh.require_sandbox()
    code = "import time\nprint('sleeping', flush=True)\ntime.sleep(60)\n"
    mesh.fake.script("sleeper", {"tool_calls": [{"id": "call_nap", "name": "python", "arguments": {"code": code}}]})
    assert not sandbox_pids()
    call = agent_stub.Run(
        agent_pb2.RunRequest(session_id="cancel-2", input="Nap.", agent="sleeper"), metadata=tenant_md(), timeout=90
    )
    seen = await read_until(call, lambda e: e.WhichOneof("event") == "tool_progress" and "sleeping" in e.tool_progress.message)
    pids = sandbox_pids()
    assert pids, "the sandboxed program is running"

    call.cancel()

    async def gone() -> bool:
        return not sandbox_pids()

    done, took = await wait_for(gone, 5.0)
    assert done, f"sandbox processes still alive: {sandbox_pids()}"
    assert took < 1.0, f"the sandboxed program was killed {took:.2f} s after the cancel"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    run, _ = await wait_for(lambda: cancelled_state(agent_stub, seen[0].started.run_id), 1.0)
    assert run is not None and run.status == agent_pb2.RUN_STATUS_CANCELLED
    assert call.cancelled() and await call.code() == grpc.StatusCode.CANCELLED
