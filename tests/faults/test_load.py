"""Load and back-pressure through the real gateway, on one mesh (real runner, Envoy, Redis, the
five services; the provider is the fake of :mod:`tests.faults.provider`):

- 500 Run streams open at once through Envoy all complete, with zero errors;
- a client that reads a long generation slowly: HTTP/2 flow control carries the back-pressure
  back to the provider, which is paused, and neither Envoy nor the router buffers the stream;
  the same through a Run: the orchestrator stops reading the generation while its client is
  behind (bounded subscriber queue), so the provider is paused and the orchestrator stays bounded;
- Redis killed and restarted under concurrent appends through the gateway: calls during the
  outage fail fast with UNAVAILABLE, calls succeed again after it, and no acknowledged append is
  lost (last: it restarts Redis under the running mesh).

Limits raised for this mesh (the defaults protect a real deployment): the gateway's Run bucket
(20/s → 2000/s) and default bucket (200/s → 5000/s), per Envoy instance; the router's wait for a
first token (30 s → 120 s), because the 500 streams are held at the provider until all are open.
The services' Redis pools keep their defaults (256 connections, a command waits for a free one:
services/runtime/redis_pool.py); redis-py's own pool refused the 101st command in flight, which
failed about half of 500 concurrent runs with UNAVAILABLE "Too many connections".
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.cli.processes import Proc, free_port, start_redis
from tests.e2e.mesh import tenant_md
from tests.faults.mesh import channels, envoy_stats, fault_mesh, rss_mb
from tests.faults.provider import FaultFake

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

STREAMS = 500
#: Envoy allows 100 concurrent streams per client connection.
CONNECTIONS = 10
ANSWER = "Every stream gets this answer in eight pieces."


@pytest.fixture(scope="module")
def fake():
    with FaultFake(default_turn={"text": ANSWER, "text_chunks": 8}, api_key="sk-faults") as server:
        yield server


@dataclass
class RedisServer:
    """The mesh's Redis, started here (not by the runner) so the test can kill and restart it."""

    port: int
    folder: Path
    proc: Proc | None = None

    def start(self) -> None:
        self.proc = start_redis(self.port, self.folder / "data", self.folder / "logs")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(free_port(), tmp_path_factory.mktemp("faults-load-redis"))
    server.start()
    yield server
    server.proc.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, fake, redis_server):
    env = {
        "AGENTMESH_MEMORY_REDIS_URL": redis_server.url,  # every service's Redis (runner.mesh_env)
        "AGENTMESH_LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-faults",
        "AGENTMESH_LLM_MODEL": "gpt-4o-mini",
        "AGENTMESH_LLM_FALLBACK_TO_EXTRACTIVE": "false",
        "AGENTMESH_LLM_FIRST_TOKEN_TIMEOUT_S": "120",
        "AGENTMESH_GATEWAY_RATE_LIMIT_RUN_RPS": "2000",
        "AGENTMESH_GATEWAY_RATE_LIMIT_DEFAULT_RPS": "5000",
        "AGENTMESH_MEMORY_EXTRACTION": "heuristic",
    }
    with fault_mesh(tmp_path_factory.mktemp("faults-load"), env) as m:
        yield m


async def test_500_concurrent_runs_through_envoy_complete_without_errors(mesh, fake):
    fake.reset_progress()
    # Every stream waits at the provider until all 500 are open: they are concurrent at every hop.
    fake.default_turn = {"text": ANSWER, "text_chunks": 8, "chunk_delay_s": 0.02,
                         "hold_until_streams": STREAMS, "hold_timeout_s": 90}
    peak = 0

    async def watch_gateway() -> None:
        nonlocal peak
        while True:
            stats = await asyncio.to_thread(envoy_stats, mesh, r"^http\.ingress_grpc\.downstream_rq_active$")
            peak = max(peak, stats.get("http.ingress_grpc.downstream_rq_active", 0))
            await asyncio.sleep(0.2)

    async def one(stub: agent_pb2_grpc.AgentServiceStub, i: int) -> list[agent_pb2.RunResponse]:
        request = agent_pb2.RunRequest(session_id=f"load-{i}", input=f"Question number {i}?", disable_retrieval=True)
        return [event async for event in stub.Run(request, metadata=tenant_md(), timeout=120)]

    chans = channels(mesh, CONNECTIONS)
    watcher = asyncio.create_task(watch_gateway())
    started = time.monotonic()
    try:
        stubs = [agent_pb2_grpc.AgentServiceStub(c) for c in chans]
        results = await asyncio.gather(*(one(stubs[i % CONNECTIONS], i) for i in range(STREAMS)), return_exceptions=True)
    finally:
        elapsed = time.monotonic() - started
        watcher.cancel()
        fake.default_turn = {"text": ANSWER, "text_chunks": 8}
        await asyncio.gather(*(c.close() for c in chans))

    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of {STREAMS} streams failed, e.g. {errors[0]!r}"
    for i, events in enumerate(results):
        final = events[-1].final
        assert final.status == agent_pb2.RUN_STATUS_COMPLETED, (i, events[-1])
        assert final.output == ANSWER
        assert "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta") == ANSWER
    assert fake.max_streams_open >= STREAMS, f"at most {fake.max_streams_open} provider streams were open at once"
    assert peak >= STREAMS, f"Envoy saw at most {peak} requests at once"
    assert elapsed < 120, f"{STREAMS} streams took {elapsed:.0f} s"


#: One delta of the long generation: 4 KiB of ordinary words.
PIECE = ("the quick brown fox jumps over the lazy dog " * 100)[:4096]
#: 32768 deltas of 4 KiB: 128 MiB, two thousand times the 64 KiB HTTP/2 stream windows.
DELTAS = 32768


@pytest.mark.timeout(90)
async def test_a_slow_consumer_pauses_the_provider_and_nothing_buffers_the_stream(mesh, fake):
    envoy = psutil.Process(mesh.record("envoy").pid)
    router = psutil.Process(mesh.record("llm").pid)
    before = {"envoy": rss_mb(envoy.pid), "router": rss_mb(router.pid)}
    fake.enqueue({"repeat": {"piece": PIECE, "count": DELTAS}})
    fake.reset_progress()
    total = DELTAS * len(PIECE)

    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        request = llm_pb2.StreamGenerateRequest(
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="Write at great length.")],
            options=llm_pb2.GenerationOptions(max_tokens=16384),
        )
        call = stub.StreamGenerate(request, metadata=tenant_md(), timeout=80)
        received = 0

        async def read_slowly(seconds: float) -> None:
            nonlocal received
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                event = await call.read()
                assert event is not grpc.aio.EOF, "the stream ended early"
                received += len(event.text_delta.text)
                await asyncio.sleep(0.02)  # about 200 KiB/s: far slower than the provider

        await read_slowly(5.0)
        _, sent_early = fake.progress()
        read_early = received
        await read_slowly(4.0)
        _, sent_late = fake.progress()
        peak = {"envoy": rss_mb(envoy.pid), "router": rss_mb(router.pid)}

        # Paused: the provider sent a small part of the stream, and in the last 4 s it advanced
        # only about as far as the client read (plus at most a few windows), not at its own pace.
        assert sent_late < total / 4, f"the provider sent {sent_late / 2**20:.1f} MiB of {total / 2**20:.0f} MiB"
        assert sent_late - sent_early < (received - read_early) + 4 * 2**20, (
            f"provider +{(sent_late - sent_early) / 2**20:.1f} MiB while the client read "
            f"{(received - read_early) / 2**20:.1f} MiB"
        )
        ahead = sent_late - received
        # In flight between provider and client: mostly the kernel's socket buffers (Linux grows a
        # TCP receive buffer up to net.ipv4.tcp_rmem's maximum, 32 MiB here), then the windows.
        assert ahead < 40 * 2**20, f"{ahead / 2**20:.1f} MiB sent by the provider and not yet read by the client"
        growth = {name: peak[name] - before[name] for name in peak}
        assert growth["envoy"] < 16, f"Envoy grew by {growth['envoy']:.1f} MiB"
        assert growth["router"] < 48, f"the router grew by {growth['router']:.1f} MiB"

        # The client goes away: the cancellation reaches the provider, whose stream is closed.
        call.cancel()
    deadline = time.monotonic() + 10
    while fake.streams_open and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert fake.streams_open == 0, "the provider stream outlived the cancelled call"
    assert fake.requests[-1]["outcome"] == "client_disconnected"


@pytest.mark.timeout(90)
async def test_a_slow_consumer_of_a_run_pauses_the_provider_and_the_orchestrator_stays_bounded(mesh, fake):
    """The same long generation through a Run: the orchestrator's subscriber queue is bounded and
    the run stops reading its model stream while its client is behind, so the pause reaches the
    provider (the same bounds as above: what is in flight between provider and orchestrator is
    mostly kernel socket buffers and HTTP/2 windows, up to tens of MiB, so the generation must be
    much longer than that for the check to mean anything)."""
    orchestrator = mesh.record("orchestrator").pid
    before = rss_mb(orchestrator)
    fake.enqueue({"repeat": {"piece": PIECE, "count": DELTAS}})
    fake.reset_progress()
    total = DELTAS * len(PIECE)
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        request = agent_pb2.RunRequest(session_id="slow-run", input="Write at great length.", disable_retrieval=True,
                                       max_tokens=16384)
        call = stub.Run(request, metadata=tenant_md(), timeout=80)
        received = 0

        async def read_slowly(seconds: float) -> None:
            nonlocal received
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                event = await call.read()
                assert event is not grpc.aio.EOF, "the run ended early"
                received += len(event.text_delta.text)
                await asyncio.sleep(0.02)

        try:
            await read_slowly(5.0)
            _, sent_early = fake.progress()
            read_early = received
            await read_slowly(4.0)
            _, sent_late = fake.progress()
            growth = rss_mb(orchestrator) - before
        finally:
            call.cancel()
    assert sent_late < total / 4, f"the provider sent {sent_late / 2**20:.1f} MiB of {total / 2**20:.0f} MiB"
    assert sent_late - sent_early < (received - read_early) + 4 * 2**20, (
        f"provider +{(sent_late - sent_early) / 2**20:.1f} MiB while the client read "
        f"{(received - read_early) / 2**20:.1f} MiB"
    )
    assert growth < 48, f"the orchestrator grew by {growth:.0f} MiB"
    # The cancelled run (waiting for its client) stops at once, and with it the provider stream.
    deadline = time.monotonic() + 10
    while fake.streams_open and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert fake.streams_open == 0, "the provider stream outlived the cancelled run"


#: How long after Redis is back an append may still fail, in seconds.
RECONNECT_S = 3.0


@dataclass
class Writer:
    """One session written by one sequential client: what was acknowledged and what failed."""

    session: str
    acked: dict[str, memory_pb2.AppendMessagesResponse] = field(default_factory=dict)
    failed: dict[str, tuple[float, float, grpc.StatusCode]] = field(default_factory=dict)  # key: (at, s, code)


@pytest.mark.timeout(120)
async def test_redis_restarted_under_load_loses_no_acknowledged_append(mesh, redis_server):
    """Last in this module: it kills and restarts the mesh's Redis."""
    writers = [Writer(f"outage-{i}") for i in range(16)]
    stop = asyncio.Event()
    deadline_s = 10.0

    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)

        async def append(writer: Writer, key: str, timeout: float = deadline_s) -> memory_pb2.AppendMessagesResponse:
            request = memory_pb2.AppendMessagesRequest(
                session_id=writer.session, idempotency_key=key,
                messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=f"message {key}")],
            )
            return await stub.AppendMessages(request, metadata=tenant_md(), timeout=timeout)

        async def write(writer: Writer) -> None:
            while not stop.is_set():
                key = uuid.uuid4().hex
                began = time.monotonic()
                try:
                    writer.acked[key] = await append(writer, key)
                except grpc.aio.AioRpcError as err:
                    writer.failed[key] = (began, time.monotonic() - began, err.code())
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(write(w)) for w in writers]
        try:
            await _until(lambda: min(len(w.acked) for w in writers) >= 5, 30, "appends before the outage")
            redis_server.proc.popen.send_signal(signal.SIGKILL)  # no shutdown save: only the AOF survives
            await asyncio.to_thread(redis_server.proc.popen.wait, 10)
            killed = time.monotonic()
            acked_before = sum(len(w.acked) for w in writers)
            await asyncio.sleep(3.0)  # the outage, under load
            await asyncio.to_thread(redis_server.start)
            recovered = time.monotonic()
            counts = {w.session: len(w.acked) for w in writers}
            await _until(lambda: all(len(w.acked) >= counts[w.session] + 5 for w in writers), 30,
                         "appends after the restart")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        failures = [(at, s, code) for w in writers for (at, s, code) in w.failed.values()]
        assert any(killed <= at < recovered for at, _, _ in failures), "no append failed while Redis was down"
        assert {code for _, _, code in failures} == {grpc.StatusCode.UNAVAILABLE}
        latencies = [s for _, s, _ in failures]
        assert max(latencies) < deadline_s / 2, f"a failing append took {max(latencies):.1f} s (deadline {deadline_s} s)"
        assert statistics.median(latencies) < 1.0, f"median failure took {statistics.median(latencies):.2f} s"
        # Failures start with the kill (an append in flight then) and end within moments of
        # the restart (the service's Redis connections reconnect on their next command).
        outside = [at for at, _, _ in failures if not killed - 1.0 <= at < recovered + RECONNECT_S]
        assert not outside, f"{len(outside)} appends failed outside the outage"
        assert sum(len(w.acked) for w in writers) > acked_before

        # A failed append is retried with its key: it is appended now, or was before the crash
        # (then replayed); either way exactly once.
        for w in writers:
            for key in list(w.failed):
                w.acked[key] = await append(w, key)

        for w in writers:
            stored = await _all_messages(stub, w.session)
            by_content = {}
            for m in stored:
                assert m.message.content not in by_content, f"{m.message.content} stored twice in {w.session}"
                by_content[m.message.content] = m
            assert [m.sequence for m in stored] == list(range(1, len(stored) + 1))
            assert set(by_content) == {f"message {k}" for k in w.acked}, f"{w.session}: stored != acknowledged"
            for key, ack in w.acked.items():
                m = by_content[f"message {key}"]
                assert (m.sequence, m.id) == (ack.first_sequence, ack.message_ids[0]), (w.session, key)


async def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _all_messages(stub: memory_pb2_grpc.MemoryServiceStub, session: str) -> list[memory_pb2.SessionMessage]:
    out: list[memory_pb2.SessionMessage] = []
    while True:
        page = await stub.ListMessages(
            memory_pb2.ListMessagesRequest(session_id=session, from_sequence=len(out) + 1, limit=1000),
            metadata=tenant_md(), timeout=10,
        )
        out.extend(page.messages)
        if not page.messages or len(out) >= page.version:
            return out
