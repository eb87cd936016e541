"""Durable runs: a client resumes the event stream after losing it; a run whose orchestrator was
killed (SIGKILL, a separate process) is taken over by another replica from its checkpoint; a run
is cancelled from another replica; retention bounds what Redis keeps."""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import pytest
import redis.asyncio as aioredis

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.services.cli.processes import free_port, spawn
from agentmesh.services.runtime.clients import check_health
from tests.orchestrator.conftest import AGENTS_YAML, Mesh, collect, kinds, of_kind, tenant_md
from tests.orchestrator.test_agent_runs import session_version

pytestmark = pytest.mark.timeout(180)


async def test_a_client_that_lost_its_stream_resumes_it_from_the_last_event_it_saw(mesh: Mesh, agent_stub):
    text = " ".join(f"w{i}" for i in range(12))
    mesh.fake.script("writer", {"text": text, "chunk_delay_s": 0.1})
    request = agent_pb2.RunRequest(
        session_id="resume-1", input="Write slowly.", agent="writer", on_disconnect=agent_pb2.ON_DISCONNECT_CONTINUE
    )
    call = agent_stub.Run(request, metadata=tenant_md(), timeout=60)
    seen = []
    async for event in call:
        seen.append(event)
        if len(of_kind(seen, "text_delta")) == 3:
            break
    call.cancel()  # the connection is gone; the run is not
    run_id = seen[0].started.run_id
    await asyncio.sleep(0.3)
    run = (await agent_stub.GetRun(agent_pb2.GetRunRequest(run_id=run_id), metadata=tenant_md())).run
    assert run.phase == agent_pb2.RUN_PHASE_RUNNING and run.replica

    rest = await collect(
        agent_stub.ResumeRun(
            agent_pb2.ResumeRunRequest(run_id=run_id, after_sequence=seen[-1].sequence), metadata=tenant_md(), timeout=30
        )
    )
    assert [e.sequence for e in rest] == list(range(seen[-1].sequence + 1, seen[-1].sequence + 1 + len(rest)))
    assert "resumed" not in kinds(rest)  # the same replica ran it all along
    assert "".join(d.text for d in of_kind(seen + rest, "text_delta")) == text
    assert rest[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED and rest[-1].final.output == text


async def test_a_run_whose_orchestrator_died_is_taken_over_from_its_checkpoint(mesh: Mesh, agent_stub, tmp_path):
    port = free_port()
    m = mesh.mesh
    env = {
        "AGENTMESH_ORCHESTRATOR_HOST": "127.0.0.1",
        "AGENTMESH_ORCHESTRATOR_PORT": str(port),
        "AGENTMESH_ORCHESTRATOR_REDIS_URL": mesh.redis_url,
        "AGENTMESH_ORCHESTRATOR_AGENTS_PATH": str(AGENTS_YAML),
        "AGENTMESH_ORCHESTRATOR_LEASE_TTL_S": "2",
        "AGENTMESH_ORCHESTRATOR_HEARTBEAT_S": "0.2",
        "AGENTMESH_ORCHESTRATOR_READINESS_INTERVAL_S": "0.2",
        "AGENTMESH_LLM_ADDRESS": m.llm_address,
        "AGENTMESH_MEMORY_ADDRESS": m.memory_address,
        "AGENTMESH_RETRIEVAL_ADDRESS": m.retrieval_address,
        "AGENTMESH_TOOLS_ADDRESS": m.tools_address,
    }
    proc = spawn("orchestrator-doomed", [sys.executable, "-m", "agentmesh.services.cli.main", "serve", "orchestrator"],
                 tmp_path, env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            deadline = time.monotonic() + 60
            while not await check_health(channel):
                assert proc.alive() and time.monotonic() < deadline, proc.log_path.read_text()[-3000:]
                await asyncio.sleep(0.1)
            mesh.fake.script(
                "calc",
                {"tool_calls": [{"id": "call_mul", "name": "calculator", "arguments": {"expression": "6*7"}}]},
                {"text": "Six times seven is forty-two, as computed.", "chunk_delay_s": 0.3},  # dies in this one
                {"text": "It is 42.", "text_chunks": 2},  # the step again, on the new replica
            )
            before = await session_version(mesh, "crash-1")
            call = agent_pb2_grpc.AgentServiceStub(channel).Run(
                agent_pb2.RunRequest(session_id="crash-1", input="What is 6*7?", agent="calc"),
                metadata=tenant_md(),
                timeout=60,
            )
            seen = []
            async for event in call:
                seen.append(event)
                if event.WhichOneof("event") == "text_delta":
                    break
            proc.popen.kill()  # SIGKILL: no goodbye, the lease is left to expire
            proc.popen.wait(10)
            killed_at = time.monotonic()
    finally:
        proc.stop()
    run_id = seen[0].started.run_id
    assert of_kind(seen, "tool_result")[0].output.struct_value["result"] == 42

    rest = await collect(
        agent_stub.ResumeRun(
            agent_pb2.ResumeRunRequest(run_id=run_id, after_sequence=seen[-1].sequence), metadata=tenant_md(), timeout=60
        )
    )
    taken_over = time.monotonic() - killed_at
    (resumed,) = of_kind(rest, "resumed")
    first_delta = next(e for e in seen if e.WhichOneof("event") == "text_delta")
    assert resumed.discarded_after_sequence < first_delta.sequence  # the unfinished step is void...
    last_tool = next(e for e in seen if e.WhichOneof("event") == "tool_result")
    assert resumed.discarded_after_sequence >= last_tool.sequence  # ...the finished one is kept
    assert "stopped renewing the run's lease" in resumed.reason
    assert taken_over < 2.0 + 3.0  # the lease (2 s) expired, then one poll
    k = kinds(rest)
    assert "tool_call" not in k  # the calculator step was checkpointed: it is not run again
    assert [e.step_started.step for e in rest if e.WhichOneof("event") == "step_started"] == [2]
    assert all(a.sequence < b.sequence for a, b in zip(rest, rest[1:]))
    assert rest[0].sequence > seen[-1].sequence
    final = rest[-1].final
    assert final.status == agent_pb2.RUN_STATUS_COMPLETED and final.output == "It is 42." and final.steps == 2
    # The new replica sent the model the checkpointed conversation (the tool result included)...
    third = mesh.fake.requests_of("calc")[-1]["body"]["messages"]
    assert third[-1]["role"] == "tool" and third[-1]["tool_call_id"] == "call_mul"
    # ...and the turn reached the session once.
    assert final.session_version == before + 4
    run = (await agent_stub.GetRun(agent_pb2.GetRunRequest(run_id=run_id), metadata=tenant_md())).run
    assert run.phase == agent_pb2.RUN_PHASE_FINISHED and run.status == agent_pb2.RUN_STATUS_COMPLETED


async def test_cancel_run_stops_a_run_executing_on_another_replica(mesh: Mesh, agent_stub):
    mesh.fake.script("writer", {"text": " ".join(f"w{i}" for i in range(50)), "chunk_delay_s": 0.1})
    request = agent_pb2.RunRequest(
        session_id="cancel-3", input="Go on.", agent="writer", on_disconnect=agent_pb2.ON_DISCONNECT_CONTINUE
    )
    call = agent_stub.Run(request, metadata=tenant_md(), timeout=60)
    first = await call.read()
    await call.read()
    call.cancel()
    index = len(mesh.fake.requests) - 1
    async with mesh.orchestrator_instance() as other, grpc.aio.insecure_channel(other) as channel:
        started = time.monotonic()
        reply = await agent_pb2_grpc.AgentServiceStub(channel).CancelRun(
            agent_pb2.CancelRunRequest(run_id=first.started.run_id, reason="changed my mind"), metadata=tenant_md()
        )
        took = time.monotonic() - started
    assert reply.run.phase == agent_pb2.RUN_PHASE_FINISHED and reply.run.status == agent_pb2.RUN_STATUS_CANCELLED
    assert reply.run.error_message == "changed my mind"
    assert took < 1.0, f"CancelRun took {took:.2f} s"
    assert await asyncio.to_thread(mesh.fake.wait_for_outcome, index, 2.0) == "client_disconnected"
    replay = await collect(agent_stub.ResumeRun(agent_pb2.ResumeRunRequest(run_id=first.started.run_id), metadata=tenant_md()))
    assert replay[-1].final.status == agent_pb2.RUN_STATUS_CANCELLED


async def test_retention_keeps_the_last_runs_and_bounds_each_event_stream(mesh: Mesh, raw_redis: aioredis.Redis):
    md = tenant_md("retention")
    async with mesh.orchestrator_instance(max_runs_per_tenant=2, max_events_per_run=100, run_ttl_s=300) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            run_ids = []
            for i in range(4):
                mesh.fake.script("writer", {"text": f"Answer {i}."})
                events = await collect(stub.Run(agent_pb2.RunRequest(session_id="r", input="Hi.", agent="writer"), metadata=md))
                run_ids.append(events[0].started.run_id)
            index = "agentmesh:orchestrator:tenant:retention:runs"
            # Pruning runs in the background right after a run starts: give it a moment.
            for _ in range(100):
                kept_ids = [r.decode() for r in await raw_redis.zrange(index, 0, -1)]
                if kept_ids == run_ids[2:]:
                    break
                await asyncio.sleep(0.02)
            assert kept_ids == run_ids[2:]
            for old in run_ids[:2]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetRun(agent_pb2.GetRunRequest(run_id=old), metadata=md)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
                assert not await raw_redis.keys(f"agentmesh:orchestrator:run:{{retention:{old}}}:*")
            kept = f"agentmesh:orchestrator:run:{{retention:{run_ids[-1]}}}"
            assert 0 < await raw_redis.ttl(f"{kept}:state") <= 300 and 0 < await raw_redis.ttl(f"{kept}:events") <= 300

            # A long run keeps only its last 100 events. (Paced: the router merges deltas that pile
            # up faster than they are sent, and this run needs one event per word.)
            mesh.fake.script("writer", {"text": " ".join(f"w{i}" for i in range(150)), "chunk_delay_s": 0.004})
            events = await collect(stub.Run(agent_pb2.RunRequest(session_id="r", input="Long.", agent="writer"), metadata=md))
            run_id = events[0].started.run_id
            key = f"agentmesh:orchestrator:run:{{retention:{run_id}}}:events"
            assert await raw_redis.xlen(key) == 100
            first = len(events) - 99
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub.ResumeRun(agent_pb2.ResumeRunRequest(run_id=run_id, after_sequence=3), metadata=md))
            assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert f"events 4..{first - 1} of run {run_id} are no longer stored" in info.value.details()
            tail = await collect(
                stub.ResumeRun(agent_pb2.ResumeRunRequest(run_id=run_id, after_sequence=first - 1), metadata=md)
            )
            assert tail == events[first - 1:]


async def test_a_live_replica_keeps_its_run_through_a_quiet_step_longer_than_the_lease(mesh: Mesh, agent_stub):
    # No event for 3 s (lease: 2 s): only the heartbeat keeps the lease, so a follower on another
    # replica must wait for the run instead of taking it over.
    mesh.fake.script("writer", {"text": "Finally.", "first_token_delay_s": 3.0})
    requests_before = len(mesh.fake.requests_of("writer"))
    request = agent_pb2.RunRequest(
        session_id="quiet-1", input="Think first.", agent="writer", on_disconnect=agent_pb2.ON_DISCONNECT_CONTINUE
    )
    call = agent_stub.Run(request, metadata=tenant_md(), timeout=60)
    first = await call.read()
    call.cancel()
    async with mesh.orchestrator_instance() as other, grpc.aio.insecure_channel(other) as channel:
        events = await collect(
            agent_pb2_grpc.AgentServiceStub(channel).ResumeRun(
                agent_pb2.ResumeRunRequest(run_id=first.started.run_id), metadata=tenant_md(), timeout=30
            )
        )
    assert "resumed" not in kinds(events)
    assert events[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED and events[-1].final.output == "Finally."
    assert len(mesh.fake.requests_of("writer")) == requests_before + 1  # the model was called once


async def test_a_replica_shutting_down_hands_its_runs_over_instead_of_cancelling_them(mesh: Mesh, agent_stub):
    mesh.fake.script(
        "writer",
        {"text": " ".join(f"w{i}" for i in range(30)), "chunk_delay_s": 0.2},  # outlives the 2 s grace period
        {"text": "Written again.", "text_chunks": 2},
    )
    request = agent_pb2.RunRequest(session_id="drain-1", input="Write.", agent="writer")
    seen = []
    # A 10 s lease: a take-over that had to wait for it to expire would show.
    async with mesh.orchestrator_instance(grace_period_s=1.0, lease_ttl_s=10.0) as doomed:
        channel = grpc.aio.insecure_channel(doomed)
        call = agent_pb2_grpc.AgentServiceStub(channel).Run(request, metadata=tenant_md(), timeout=60)
        async for event in call:
            seen.append(event)
            if event.WhichOneof("event") == "text_delta":
                break
        # Leaving the block stops the replica gracefully (SIGTERM's path): 1 s of grace, then the
        # runs still going are handed over.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in call:
            seen.append(event)
    await channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    run_id = seen[0].started.run_id
    run = (await agent_stub.GetRun(agent_pb2.GetRunRequest(run_id=run_id), metadata=tenant_md())).run
    assert run.phase == agent_pb2.RUN_PHASE_RUNNING and run.replica == ""  # not cancelled, lease released
    started = time.monotonic()
    rest = await collect(
        agent_stub.ResumeRun(
            agent_pb2.ResumeRunRequest(run_id=run_id, after_sequence=seen[-1].sequence), metadata=tenant_md(), timeout=30
        )
    )
    assert time.monotonic() - started < 5.0  # no lease to wait for
    # First the events the draining replica stored after the last one the client read (the
    # unfinished step, which `resumed` declares void), then the new replica's.
    (resumed,) = of_kind(rest, "resumed")
    at = kinds(rest).index("resumed")
    assert all(e.WhichOneof("event") == "text_delta" for e in rest[:at])
    assert all(e.sequence > resumed.discarded_after_sequence for e in rest[:at])
    assert "Written again." == "".join(d.text for d in of_kind(rest[at:], "text_delta"))
    assert rest[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED and rest[-1].final.output == "Written again."
