"""A replica killed (SIGKILL) while it serves a stream, in a real mesh with two orchestrators and
three LLM routers behind the real Envoy: the client's stream ends with a status well before its
deadline (never a hang), and a retry lands on a surviving replica and succeeds.

What the client sees depends on which hop lost its peer and when (gateway/README.md, "A replica
that dies mid-stream"):
- the replica behind Envoy dies before its first response byte: Envoy answers UNAVAILABLE
  itself ("upstream connect error or disconnect/reset before headers"); a call that may have
  had effects is not re-sent by Envoy, the client's retry lands on another replica;
- a router dies mid-Run: the orchestrator, alive, ends the Run with UNAVAILABLE in proper gRPC
  trailers; the retry (a new Run) reaches another router through the orchestrator's ``ipv4:``
  target;
- an orchestrator dies mid-Run: the response had started, and Envoy (1.40) can then only reset
  the client's HTTP/2 stream (RST_STREAM, error code 2 INTERNAL_ERROR), which gRPC reports as
  INTERNAL "Received RST_STREAM"; no Envoy setting sends trailers instead (the typed Python
  client reports it as ``StreamLostError``, an UNAVAILABLE). The retry is
  ResumeRun, which Envoy routes to the surviving replica, which takes the run over from its
  checkpoint.
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import psutil
import pytest

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.client.errors import StreamLostError, error_from_rpc
from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from tests.e2e.mesh import tenant_md
from tests.faults.mesh import envoy_stats, fault_mesh, replicas_of
from tests.faults.provider import FaultFake
from tests.orchestrator.conftest import collect, kinds, of_kind

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

#: The client's deadline on every stream of this module, in seconds.
DEADLINE_S = 60
#: How soon after the kill the client must have its status, in seconds.
PROMPT_S = 5.0
#: Orchestrator lease of a run: a run whose replica died can be taken over this long after.
LEASE_S = 2


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


@pytest.fixture(scope="module")
def fake():
    with FaultFake(default_turn={"text": "Short and complete.", "text_chunks": 2}, api_key="sk-faults") as server:
        yield server


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, fake):
    env = {
        "AGENTMESH_LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-faults",
        "AGENTMESH_LLM_MODEL": "gpt-4o-mini",
        "AGENTMESH_LLM_FALLBACK_TO_EXTRACTIVE": "false",  # a fallback would hide the failure
        "AGENTMESH_ORCHESTRATOR_LEASE_TTL_S": str(LEASE_S),
        "AGENTMESH_ORCHESTRATOR_HEARTBEAT_S": "0.2",
        "AGENTMESH_MEMORY_EXTRACTION": "heuristic",  # every provider call is one the test scripted
    }
    with fault_mesh(tmp_path_factory.mktemp("faults-replicas"), env, replicas={"orchestrator": 2, "llm": 3}) as m:
        yield m


@pytest.fixture()
async def stub(mesh):
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        yield agent_pb2_grpc.AgentServiceStub(channel)


def run_request(session: str) -> agent_pb2.RunRequest:
    return agent_pb2.RunRequest(session_id=session, input="Tell me the whole story.", disable_retrieval=True)


async def read_until_deltas(call, n: int) -> list[agent_pb2.RunResponse]:
    seen: list[agent_pb2.RunResponse] = []
    async for event in call:
        seen.append(event)
        if len(of_kind(seen, "text_delta")) == n:
            return seen
    raise AssertionError(f"the stream ended after {kinds(seen)} without {n} text deltas")


async def status_after_kill(call, proc: psutil.Process) -> tuple[grpc.aio.AioRpcError, float]:
    """SIGKILL ``proc``, read ``call`` to its end; (the error it ended with, seconds it took)."""
    proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(proc.wait, 10)
    killed = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value, time.monotonic() - killed


def streaming_router(mesh, fake: FaultFake) -> psutil.Process:
    """The live router replica whose provider connection carries a stream open at the fake (a
    stream of a killed router may still be open there: the fake notices only when it writes)."""
    peers = set(fake.streaming_peers())
    owners = [
        rec for rec in replicas_of(mesh, "llm")
        if any((c.laddr.ip, c.laddr.port) in peers and c.raddr and c.raddr.port == fake.port
               for c in psutil.Process(rec.pid).net_connections("tcp"))
    ]
    assert len(owners) == 1, f"streams at the provider {peers} belong to routers {[r.name for r in owners]}"
    return psutil.Process(owners[0].pid)


async def provider_streaming(fake: FaultFake, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not fake.streams_open:
        assert time.monotonic() < deadline, "the request never reached the provider"
        await asyncio.sleep(0.05)


def test_every_replica_is_an_endpoint_of_its_gateway_cluster(mesh):
    for kind, count in (("orchestrator", 2), ("llm", 3)):
        assert [r.name for r in replicas_of(mesh, kind)] == [kind, *(f"{kind}-{i}" for i in range(2, count + 1))]
        hosts = envoy_stats(mesh, rf"^cluster\.{kind}\.membership_(total|healthy)$")
        assert hosts == {f"cluster.{kind}.membership_total": count, f"cluster.{kind}.membership_healthy": count}


async def test_a_router_killed_before_its_first_byte_is_unavailable_and_a_retry_succeeds(mesh, fake):
    fake.enqueue({"text": "Too late.", "first_token_delay_s": 30})  # nothing comes before the kill
    request = llm_pb2.StreamGenerateRequest(messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="Hi.")])
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        call = stub.StreamGenerate(request, metadata=tenant_md(), timeout=DEADLINE_S)
        await provider_streaming(fake)
        router = streaming_router(mesh, fake)

        error, took = await status_after_kill(call, router)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "reset before headers" in error.details(), error.details()
        assert took < PROMPT_S, f"the status came {took:.1f} s after the kill"

        fake.enqueue({"text": "On time this time.", "text_chunks": 2})
        events = [event async for event in stub.StreamGenerate(request, metadata=tenant_md(), timeout=DEADLINE_S)]
    assert "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta") == "On time this time."
    assert events[-1].finish.reason == common_pb2.FINISH_REASON_STOP


async def test_a_router_killed_mid_stream_ends_the_run_unavailable_and_a_retry_uses_the_other(mesh, fake, stub):
    fake.enqueue({"text": words(60), "chunk_delay_s": 0.1})  # about 6 s of streaming
    call = stub.Run(run_request("kill-router"), metadata=tenant_md(), timeout=DEADLINE_S)
    seen = await read_until_deltas(call, 3)
    router = streaming_router(mesh, fake)

    error, took = await status_after_kill(call, router)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert error.details().startswith("llm service:"), error.details()
    assert took < PROMPT_S, f"the status came {took:.1f} s after the kill"
    assert seen[0].WhichOneof("event") == "started"

    # The same request again: the orchestrator's channel reconnects to the surviving router.
    fake.enqueue({"text": "The story, told in full this time.", "text_chunks": 4})
    events = await collect(stub.Run(run_request("kill-router"), metadata=tenant_md(), timeout=DEADLINE_S))
    final = events[-1].final
    assert final.status == agent_pb2.RUN_STATUS_COMPLETED
    assert final.output == "The story, told in full this time."


async def test_an_orchestrator_killed_mid_stream_is_resumed_on_the_other_replica(mesh, fake, stub):
    text = words(40, "x")
    fake.enqueue({"text": text, "chunk_delay_s": 0.15}, {"text": "Taken over and finished.", "text_chunks": 3})
    call = stub.Run(run_request("kill-orchestrator"), metadata=tenant_md(), timeout=DEADLINE_S)
    seen = await read_until_deltas(call, 3)
    run_id = seen[0].started.run_id
    info = (await stub.GetRun(agent_pb2.GetRunRequest(run_id=run_id), metadata=tenant_md(), timeout=10)).run
    pids = {rec.pid: rec.name for rec in replicas_of(mesh, "orchestrator")}
    owner = int(info.replica.rsplit("-", 2)[1])  # "<host>-<pid>-<id>"
    assert owner in pids, f"run on {info.replica}, not on a replica of this mesh {pids}"

    error, took = await status_after_kill(call, psutil.Process(owner))
    # The documented Envoy limit (module docstring): INTERNAL from an HTTP/2 reset, not a hang.
    assert error.code() == grpc.StatusCode.INTERNAL, error
    assert "RST_STREAM" in error.details(), error.details()
    assert took < PROMPT_S, f"the status came {took:.1f} s after the kill"
    # The typed client names it for what it is: UNAVAILABLE, a lost stream to resume.
    typed = error_from_rpc(error)
    assert isinstance(typed, StreamLostError) and typed.code == grpc.StatusCode.UNAVAILABLE, typed

    # The retry: ResumeRun through the gateway, from the last event the client saw.
    started = time.monotonic()
    rest = await collect(stub.ResumeRun(
        agent_pb2.ResumeRunRequest(run_id=run_id, after_sequence=seen[-1].sequence),
        metadata=tenant_md(), timeout=DEADLINE_S,
    ))
    (resumed,) = of_kind(rest, "resumed")
    survivor = next(pid for pid in pids if pid != owner)
    assert f"-{survivor}-" in resumed.replica, f"taken over by {resumed.replica}, expected pid {survivor}"
    assert "stopped renewing the run's lease" in resumed.reason
    assert time.monotonic() - started < LEASE_S + PROMPT_S
    final = rest[-1].final
    assert final.status == agent_pb2.RUN_STATUS_COMPLETED and final.output == "Taken over and finished."
    assert [e.sequence for e in rest] == sorted(e.sequence for e in rest) and rest[0].sequence > seen[-1].sequence

    # New calls keep succeeding: Envoy retries a call that picked the dead endpoint (connect
    # failure) on the other one, and ejects the dead endpoint.
    more = await asyncio.gather(*(collect(stub.Run(run_request(f"after-kill-{i}"), metadata=tenant_md(),
                                                   timeout=DEADLINE_S)) for i in range(6)))
    assert all(events[-1].final.status == agent_pb2.RUN_STATUS_COMPLETED for events in more)
    stats = envoy_stats(mesh, r"^cluster\.orchestrator\.(upstream_cx_connect_fail|health_check\.failure|"
                              r"outlier_detection\.ejections_active)$")
    assert stats["cluster.orchestrator.upstream_cx_connect_fail"] + stats["cluster.orchestrator.health_check.failure"] >= 1
