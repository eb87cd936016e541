"""End to end through the gateway: what the whole mesh adds to a streamed answer, and whether the
memory of its processes holds steady under load.

Run: ``.venv/bin/python -m bench.e2e`` (``make bench-e2e``; 5 to 6 minutes on 2 cores, start-up and ingestion included). Writes
``bench/results/e2e.json`` and ``e2e.png`` and prints tables. Soak mode:
``.venv/bin/python -m bench.e2e --soak-s 600`` (``make bench-soak``) writes ``e2e_soak.json`` and
``e2e_soak.png`` instead.

Setup (every part a real process on this machine):
- the mesh exactly as ``agentmesh up`` runs it (:func:`agentmesh.services.cli.runner.up`: Redis,
  the five services, Envoy in dev mode, i.e. without authentication), on free ports in a temporary
  run folder, with these settings: the router's catalogue has one OpenAI-compatible deployment on
  the fake provider (no extractive fallback, so a broken path fails instead of hiding); the
  gateway's Run rate limit is raised to 100,000/s (the default 20/s would refuse most runs); the
  memory service's sessions expire 60 s after their last write
  (``AGENTMESH_MEMORY_SESSION_TTL_S``) so the data Redis holds stays bounded during a soak; every
  service and Envoy export their OpenTelemetry spans (100 % sampled, the gateway's default) over
  OTLP to a collector process started here (``OTEL_BSP_SCHEDULE_DELAY`` = 500 ms);
- a small real corpus (the standard library documentation of :data:`CORPUS_MODULES`) ingested
  through the gateway, so retrieval embeds each query (all-MiniLM-L6-v2 on the CPU) and runs
  Milvus Lite's hybrid search;
- the provider: :mod:`tests.fakes.streaming_server` in its own process (OpenAI chat-completions
  SSE), every completion :data:`TOKENS` one-word content chunks, the first after
  :data:`FIRST_TOKEN_MS` and the next ones every :data:`TOKEN_MS` (a FIXED rate: 50 tokens/s per
  stream, a hosted model's pace);
- this process, the load generator (Python ``grpc.aio``; it competes with the mesh for the 2
  cores, its CPU is in the results): ``concurrency`` workers each starting one stream after the
  other (closed loop) for ``--seconds`` after a ``--warmup-s`` warm-up, at 1, 50 and 200
  concurrent streams. Workers share one HTTP/2 connection per :data:`STREAMS_PER_CHANNEL` streams
  (Envoy allows 100 streams per client connection). Latencies are those of the streams started
  after the warm-up; streams still running :data:`DRAIN_S` after the window closed are cancelled
  and counted as errors, so a saturated level reports the streams that did finish.

Three kinds of stream per level:
- ``direct``: the fake read straight over HTTP with the router's own client (its lean HTTP/1.1
  transport and SSE parser): the baseline, what calling the provider costs without the mesh;
- ``grounded``: ``AgentService.Run`` through Envoy with a new session per run, as
  ``agentmesh chat`` sends it: the orchestrator registers the run in Redis, loads the session's
  memory (``GetContext``), retrieves 4 chunks (``Search``), offers every tool, calls the router,
  which streams from the fake, and at the end appends the turn to memory;
- ``model_only``: the same with ``disable_retrieval``: the mesh's own hops without the search.

Figures:
- TTFT (time to first token) measured by the client: from the call to the first content chunk
  (direct) or the first ``text_delta`` event (mesh). "Added" = mesh minus direct at the same
  percentile and concurrency: what the mesh adds to the provider's own first token;
- ITL (inter-token latency): every gap between consecutive content chunks / ``text_delta``
  events as the client reads them, pooled over the streams; "added" likewise (the fake paces
  tokens at :data:`TOKEN_MS`; a delayed token shortens the next gap, so the added p50 stays near
  0 and the p99 shows the stalls);
- every level's workers start spread over one provider stream's duration (``STAGGER_S``,
  within the warm-up), so N streams are open at any time and arrive at a steady rate;
- completed runs (or direct streams) per second, counted as they finish inside the measured
  window; errors by status;
- CPU time per completed run of every process over the measured window (``psutil`` user +
  system; a mesh process with its children), and the share of a core: on 2 shared cores, where
  the time goes is as telling as the latency; with the cores all of them keep busy and the share
  of the machine's two cores in use (``machine_busy_pct``: queueing grows steeply near 100 %);
- where the added TTFT goes, per run, from the spans of each traced run (the client sends its own
  sampled W3C ``traceparent`` and keeps its wall-clock send and first-token times; all processes
  share the machine's clock): client → Envoy, Envoy → orchestrator, orchestrator work before
  the memory call (validation, tool list, run registration and first checkpoint in Redis), memory
  ``GetContext``, retrieval ``Search`` (of which the retrieval service's own span), orchestrator
  work before the model call (checkpoint, request), router work before its upstream request
  (gRPC hop, validation, token count, routing), and from the router's upstream request to the
  client's first token (the provider's own TTFT plus the way back through router, orchestrator
  and Envoy). Means add up to the client's TTFT;
- resident memory (RSS) of every mesh process (and of its children, listed as ``name/child``)
  before and after the levels, and Redis's ``used_memory`` and key count.

Soak (``--soak-s N``): a steady load (``--soak-concurrency`` streams of ``--soak-workload``, by
default 20 grounded runs, closed loop) for N seconds, the RSS of every process sampled every
``--soak-sample-s``; growth per process = median RSS of the last 10 % of the samples against the
median of the first 10 % after the warm-up (``--soak-warmup-s``, default 20 % of N up to 60 s),
plus a least-squares slope in MiB/min. Redis holds data (sessions for 60 s, the last 1,000 runs
of the tenant with their events): its growth is data until those bounds are reached, so its
``used_memory`` and key count are recorded too.

Targets of the issue (reported, not asserted): the mesh adds <= 15 ms p99 to TTFT at 50
concurrent streams; no process grows its memory by more than 10 % over a 10-minute soak measured
after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import redis
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.cli import runner
from agentmesh.services.cli.processes import Proc, free_port, port_is_open, spawn
from agentmesh.services.llm.providers.base import ProviderError, SSEParser
from agentmesh.services.llm.providers.http import LeanTransport
from agentmesh.services.retrieval.corpus import stdlib_documents
from bench.common import RESULTS_DIR, CpuMeter, freeze_gc, latency_stats, print_table, write_json

FIRST_TOKEN_MS = 50.0
TOKEN_MS = 20.0
TOKENS = 32
LEVELS = (1, 50, 200)
#: Workers of a level start spread over the provider's own stream duration (``closed_loop``).
STAGGER_S = (FIRST_TOKEN_MS + TOKENS * TOKEN_MS) / 1000
MEASURE_S = 12.0
WARMUP_S = 3.0
#: Longest wait for the streams still running when a level's window closes, in seconds.
DRAIN_S = 30.0
RUN_TIMEOUT_S = 120.0
#: Envoy's downstream limit is 100 concurrent streams per HTTP/2 connection (gateway/envoy.yaml).
STREAMS_PER_CHANNEL = 50
SESSION_TTL_S = 60
TENANT = "bench"
TARGET_ADDED_TTFT_P99_MS = 15.0
TARGET_LEVEL = 50
TARGET_RSS_GROWTH_PCT = 10.0
SOAK_CONCURRENCY = 20
CORPUS_MODULES = ["json", "csv", "heapq", "itertools", "pathlib", "functools", "collections"]
QUESTIONS = [
    "How do I parse a JSON string into a Python object?",
    "How do I read a CSV file into dictionaries?",
    "How do I keep the smallest items of a stream with a heap?",
    "How do I group consecutive items with itertools?",
    "How do I list the files of a folder with pathlib?",
    "How do I cache the results of a function?",
    "How do I count how often each word occurs?",
    "How do I keep only the last N items in a deque?",
]
WORKLOADS = ("grounded", "model_only")
OTLP_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
#: The processes that are not the mesh (their CPU is their own, children not included).
LOAD_PROCESSES = ("fake provider", "otlp collector", "load generator (this)")


# --------------------------------------------------------------------------- the OTLP collector


def _kept(service: str, kind: int, name: str) -> bool:
    """The spans the TTFT breakdown reads (kind: 1 internal, 2 server, 3 client)."""
    if service == "agentmesh-gateway":
        return True
    if service == "agentmesh-orchestrator":
        return (kind == 2 and name.endswith("/Run")) or (
            kind == 1 and (name == "memory load" or name.startswith(("retrieval ", "chat ")))
        )
    if service == "agentmesh-retrieval":
        return kind == 2 and name.endswith("/Search")
    return service == "agentmesh-llm" and kind == 3 and name.startswith("chat ")


def _collector_main(conn) -> None:  # noqa: ANN001 - a multiprocessing Connection
    """An OTLP/gRPC trace receiver in its own process. Exports are acknowledged and dropped unless
    recording; recorded spans are sent back as ``(trace id hex, service, name, kind, start ns,
    end ns)`` tuples. Commands on ``conn``: ``record``, ``take``, ``stop``."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: PLC0415

    recording = threading.Event()
    lock = threading.Lock()
    spans: list[tuple] = []

    def export(raw: bytes, _context) -> bytes:  # noqa: ANN001
        if recording.is_set():
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
            rows = []
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        if _kept(service, s.kind, s.name):
                            rows.append((s.trace_id.hex(), service, s.name, s.kind,
                                         s.start_time_unix_nano, s.end_time_unix_nano))
            with lock:
                spans.extend(rows)
        return b""  # an empty ExportTraceServiceResponse: every span accepted

    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        OTLP_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(export)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    while True:
        command = conn.recv()
        if command == "record":
            recording.set()
        elif command == "take":
            recording.clear()
            with lock:
                conn.send(spans[:])
                spans.clear()
        else:
            break
    server.stop(1)


class Collector:
    """The collector process (see :func:`_collector_main`)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_collector_main, args=(child,), daemon=True)
        self.process.start()
        self.port: int = self.conn.recv()

    def record(self) -> None:
        self.conn.send("record")

    def take(self) -> list[tuple]:
        self.conn.send("take")
        return self.conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


# ------------------------------------------------------------------------------------- the load


@dataclass
class Sample:
    """One stream as the client saw it (times in seconds; wall clock in ns since the epoch)."""

    ttft_s: float
    total_s: float
    gaps_s: list[float]
    trace_id: str = ""
    sent_ns: int = 0
    first_ns: int = 0


@dataclass
class Level:
    """The streams of one (kind, concurrency) level."""

    kind: str
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    completed_in_window: int = 0
    window_s: float = 0.0
    errors: Counter = field(default_factory=Counter)
    #: The message of the first error of each kind.
    error_examples: dict[str, str] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    #: Share of both cores in use during the measured window (all processes of the machine).
    machine_busy_pct: float | None = None


Call = Callable[[int], Awaitable[Sample]]


def _body() -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": QUESTIONS[0]}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 1024}


def direct_call(client: LeanTransport, port: int) -> Call:
    """One stream read from the fake with the router's own HTTP client and SSE parser."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = _body()

    async def call(_worker: int) -> Sample:
        start = time.perf_counter()
        first = last = 0.0
        gaps: list[float] = []
        parser = SSEParser()
        async for raw in client.post_stream(url, body, RUN_TIMEOUT_S):
            for _, data in parser.feed(raw):
                if data == "[DONE]":
                    continue
                for choice in json.loads(data).get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if first:
                            gaps.append(now - last)
                        else:
                            first = now
                        last = now
        if not first:
            raise RunNotCompleted("direct stream without content")
        return Sample(first - start, time.perf_counter() - start, gaps)

    return call


def run_request(kind: str, n: int) -> agent_pb2.RunRequest:
    """A new session per run (its first turn); ``model_only`` skips retrieval."""
    return agent_pb2.RunRequest(session_id=f"bench-{uuid.uuid4().hex[:16]}", input=QUESTIONS[n % len(QUESTIONS)],
                                disable_retrieval=kind == "model_only")


class MeshClient:
    """Stubs over enough channels to the gateway for ``concurrency`` streams."""

    def __init__(self, gateway: str, concurrency: int):
        # A local subchannel pool gives every channel its own HTTP/2 connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(gateway, options=options)
                         for _ in range(max(1, math.ceil(concurrency / STREAMS_PER_CHANNEL)))]
        self.stubs = [agent_pb2_grpc.AgentServiceStub(c) for c in self.channels]
        self.runs = 0

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    def call(self, kind: str) -> Call:
        async def call(worker: int) -> Sample:
            self.runs += 1
            stub = self.stubs[worker // STREAMS_PER_CHANNEL % len(self.stubs)]
            trace_id = secrets.token_hex(16)
            metadata = (("x-tenant-id", TENANT), ("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"))
            sent_ns = time.time_ns()
            start = time.perf_counter()
            first = last = 0.0
            first_ns = 0
            gaps: list[float] = []
            status = None
            async for event in stub.Run(run_request(kind, self.runs), metadata=metadata, timeout=RUN_TIMEOUT_S):
                which = event.WhichOneof("event")
                if which == "text_delta":
                    now = time.perf_counter()
                    if first:
                        gaps.append(now - last)
                    else:
                        first, first_ns = now, time.time_ns()
                    last = now
                elif which == "final":
                    status = event.final.status
            if status != agent_pb2.RUN_STATUS_COMPLETED or not first:
                raise RunNotCompleted(agent_pb2.RunStatus.Name(status or 0))
            return Sample(first - start, time.perf_counter() - start, gaps, trace_id, sent_ns, first_ns)

        return call


class RunNotCompleted(Exception):
    """A run that ended without a COMPLETED final event or without any text."""


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, RunNotCompleted):
        return f"run {exc}"
    return type(exc).__name__


def _error_message(exc: BaseException) -> str:
    return (exc.details() or "" if isinstance(exc, grpc.aio.AioRpcError) else str(exc))[:300]


async def closed_loop(call: Call, level: Level, warmup_s: float, measure_s: float, progress: Progress,
                      meter: CpuMeter) -> Level:
    """``level.concurrency`` workers each making one call after the other until the window closes;
    streams started after the warm-up are sampled, completions inside the window counted."""
    loop_start = time.perf_counter()
    measure_from = loop_start + warmup_s
    stop_at = measure_from + measure_s
    task = progress.add_task(f"{level.kind} x{level.concurrency}", total=warmup_s + measure_s)
    measuring = False

    async def worker(w: int) -> None:
        # Spread over one stream's duration: N streams open at any time, arriving at a steady
        # rate (started together, equal-length streams would stay in lockstep: bursts of N).
        await asyncio.sleep(w / level.concurrency * STAGGER_S)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                sample = await call(w)
            except (grpc.aio.AioRpcError, ProviderError, RunNotCompleted, OSError) as exc:
                if started >= measure_from:
                    level.errors[_error_name(exc)] += 1
                    level.error_examples.setdefault(_error_name(exc), _error_message(exc))
                await asyncio.sleep(0.05)  # a failing path must not spin
                continue
            ended = time.perf_counter()
            if started >= measure_from:
                level.samples.append(sample)
            if measure_from <= ended <= stop_at:
                level.completed_in_window += 1

    workers = [asyncio.create_task(worker(w)) for w in range(level.concurrency)]
    try:
        while (now := time.perf_counter()) < stop_at:
            if not measuring and now >= measure_from:
                meter.start()
                measuring = True
            progress.update(task, completed=min(now - loop_start, warmup_s + measure_s),
                            description=f"{level.kind} x{level.concurrency}: {len(level.samples)} streams, "
                                        f"{sum(level.errors.values())} errors")
            await asyncio.sleep(0.25)
        level.cpu_s = meter.stop() if measuring else {}
        level.machine_busy_pct = meter.busy_pct if measuring else None
        level.window_s = measure_s
        progress.update(task, completed=warmup_s + measure_s, description=f"{level.kind} x{level.concurrency}: draining")
        done, pending = await asyncio.wait(workers, timeout=DRAIN_S)
        for t in pending:
            t.cancel()
        if pending:
            level.errors["cancelled at drain"] += len(pending)
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for t in workers:
            t.cancel()
        progress.remove_task(task)
    return level


# ------------------------------------------------------------------------------------ the mesh


@dataclass
class Bench:
    root: Path
    paths: runner.RunPaths
    ports: runner.MeshPorts
    fake: Proc
    fake_port: int
    collector: Collector

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports.gateway}"

    def processes(self, with_load: bool = False) -> dict[str, psutil.Process]:
        """The live mesh processes by name, from the runner's state file; with ``with_load``, the
        fake provider, the OTLP collector and this process too (see :data:`LOAD_PROCESSES`)."""
        state = runner.read_state(self.paths)
        found = {rec.name: p for rec in (state.processes if state else []) if (p := rec.process()) is not None}
        if with_load:
            found.update(zip(LOAD_PROCESSES, (psutil.Process(self.fake.pid),
                                              psutil.Process(self.collector.process.pid), psutil.Process()),
                             strict=True))
        return found

    def mesh_names(self) -> list[str]:
        state = runner.read_state(self.paths)
        return [rec.name for rec in state.processes] if state else []

    def died(self, names: list[str]) -> dict[str, str]:
        """The processes of ``names`` that are no longer running, with the last lines of their log."""
        state = runner.read_state(self.paths)
        out = {}
        for name in names:
            rec = state.record(name) if state else None
            if rec is None or not rec.is_running():
                out[name] = runner.log_tail(rec.log, 15) if rec else "(not in the state file)"
        return out

    def redis_url(self) -> str:
        state = runner.read_state(self.paths)
        return state.redis_url if state else ""


def _catalogue(path: Path, fake_port: int) -> None:
    path.write_text(f"""\
# The one deployment of the benchmark: the fake OpenAI-compatible provider (tests.fakes.streaming_server).
default_model: bench
models:
  bench:
    strategy: fallback
    deployments:
      - name: fake-openai
        provider: openai
        model: gpt-4o-mini
        base_url: http://127.0.0.1:{fake_port}/v1
        api_key_env: AGENTMESH_BENCH_FAKE_KEY
        input_usd_per_mtok: 0.15
        output_usd_per_mtok: 0.60
        context_window: 128000
""")


@contextlib.contextmanager
def mesh(echo: Callable[[str], None], extra_env: dict[str, str]):
    """The fake provider, the OTLP collector and the whole mesh (its services see ``extra_env``
    on top of the benchmark's settings), stopped on exit."""
    root = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    paths = runner.RunPaths(root / ".agentmesh")
    ports = runner.MeshPorts.free()
    fake_port = free_port()
    fake: Proc | None = None
    collector: Collector | None = None
    try:
        collector = Collector()
        fake = spawn("fake-openai", [sys.executable, "-m", "tests.fakes.streaming_server", "--port", str(fake_port),
                                     "--tokens", str(TOKENS), "--first-token-ms", str(FIRST_TOKEN_MS),
                                     "--token-ms", str(TOKEN_MS)], root / "logs",
                     {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        catalogue = root / "models.yaml"
        _catalogue(catalogue, fake_port)
        os.environ.update({
            "AGENTMESH_LLM_CATALOGUE": str(catalogue),
            "AGENTMESH_BENCH_FAKE_KEY": "sk-bench",
            "AGENTMESH_LLM_FALLBACK_TO_EXTRACTIVE": "false",
            "AGENTMESH_GATEWAY_RATE_LIMIT_RUN_RPS": "100000",
            "AGENTMESH_MEMORY_SESSION_TTL_S": str(SESSION_TTL_S),
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{collector.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "500",
            **extra_env,
        })
        deadline = time.monotonic() + 20
        while not port_is_open("127.0.0.1", fake_port):
            if not fake.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the fake provider did not start; see {fake.log_path}")
            time.sleep(0.05)
        started = time.monotonic()
        runner.up(paths, ports, timeout_s=300, echo=echo)
        echo(f"mesh up in {time.monotonic() - started:.1f} s (logs in {paths.logs})")
        yield Bench(root, paths, ports, fake, fake_port, collector)
    finally:
        runner.down(paths, echo=lambda _: None)
        if fake is not None:
            fake.stop()
        if collector is not None:
            collector.stop()


async def prepare(bench: Bench) -> dict:
    """Ingest the corpus through the gateway, then check that one grounded run completes."""
    documents = list(stdlib_documents(modules=CORPUS_MODULES))
    md = (("x-tenant-id", TENANT),)
    async with grpc.aio.insecure_channel(bench.gateway) as channel:

        async def upload():
            for doc in documents:
                yield retrieval_pb2.IngestDocumentsRequest(document=doc)

        started = time.perf_counter()
        reply = await retrieval_pb2_grpc.RetrievalServiceStub(channel).IngestDocuments(upload(), metadata=md,
                                                                                        timeout=600)
        ingest_s = time.perf_counter() - started
    client = MeshClient(bench.gateway, 1)
    try:
        check = await client.call("grounded")(0)
    except (grpc.aio.AioRpcError, RunNotCompleted) as exc:
        raise RuntimeError(f"the check run failed ({_error_name(exc)}); see the logs in {bench.paths.logs}") from exc
    finally:
        await client.close()
    return {"documents": len(documents), "chunks": reply.chunks_written, "ingest_s": round(ingest_s, 2),
            "check_run_ttft_ms": round(check.ttft_s * 1000, 2)}


def rss_by_process(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """RSS in MiB of each process, and of each of its children as ``name/child``."""
    out: dict[str, float] = {}
    for name, p in processes.items():
        with contextlib.suppress(psutil.Error):
            out[name] = round(p.memory_info().rss / 2**20, 1)
            for child in p.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    out[f"{name}/{child.name()}"] = round(child.memory_info().rss / 2**20, 1)
    return out


# ------------------------------------------------------------------------------- the breakdown

HOPS = (
    ("client_to_envoy", "client → Envoy (client gRPC stack, HTTP/2)"),
    ("envoy_to_orchestrator", "Envoy filters + route → orchestrator's Run handler"),
    ("orchestrator_before_memory", "validation, tool list, run registered + checkpoint in Redis"),
    ("memory_get_context", "memory GetContext (span in the orchestrator)"),
    ("retrieval_search", "retrieval Search: query embedding + Milvus hybrid search + hop"),
    ("orchestrator_before_model", "checkpoint in Redis, model request built"),
    ("router_before_upstream", "hop to the router, validation, token count, routing"),
    ("upstream_to_client", "provider TTFT + router → orchestrator → Envoy → client"),
)


def breakdown(samples: list[Sample], spans: list[tuple], direct_ttft_mean_ms: float) -> dict:
    """Per-hop time to first token (ms) of the traced runs; see :data:`HOPS` and the docstring."""
    by_trace: dict[str, dict[str, tuple[int, int]]] = {}
    for trace_id, service, name, kind, start, end in spans:
        if service == "agentmesh-gateway":
            key = "envoy"
        elif service == "agentmesh-orchestrator":
            key = {2: "run"}.get(kind) or ("memory" if name == "memory load" else
                                           "retrieval" if name.startswith("retrieval ") else "chat")
        elif service == "agentmesh-retrieval":
            key = "retrieval_service"
        else:
            key = "upstream"
        marks = by_trace.setdefault(trace_id, {})
        if key not in marks or start < marks[key][0]:  # the first of each (a run has one model step)
            marks[key] = (start, end)
    hops: dict[str, list[float]] = {name: [] for name, _ in HOPS}
    hops["retrieval_service_span"] = []
    totals: list[float] = []
    complete = 0
    for s in samples:
        m = by_trace.get(s.trace_id, {})
        if not all(k in m for k in ("run", "memory", "chat", "upstream")):
            continue
        complete += 1
        ms = 1e-6
        after_context = m["retrieval"][1] if "retrieval" in m else m["memory"][1]
        if "envoy" in m:
            hops["client_to_envoy"].append((m["envoy"][0] - s.sent_ns) * ms)
            hops["envoy_to_orchestrator"].append((m["run"][0] - m["envoy"][0]) * ms)
        hops["orchestrator_before_memory"].append((m["memory"][0] - m["run"][0]) * ms)
        hops["memory_get_context"].append((m["memory"][1] - m["memory"][0]) * ms)
        if "retrieval" in m:
            hops["retrieval_search"].append((m["retrieval"][1] - m["retrieval"][0]) * ms)
            if "retrieval_service" in m:
                hops["retrieval_service_span"].append((m["retrieval_service"][1] - m["retrieval_service"][0]) * ms)
        hops["orchestrator_before_model"].append((m["chat"][0] - after_context) * ms)
        hops["router_before_upstream"].append((m["upstream"][0] - m["chat"][0]) * ms)
        hops["upstream_to_client"].append((s.first_ns - m["upstream"][0]) * ms)
        totals.append((s.first_ns - s.sent_ns) * ms)
    out: dict = {"traced_runs": complete, "streams": len(samples)}
    if not complete:
        return out
    total_mean = float(np.mean(totals))
    added_mean = total_mean - direct_ttft_mean_ms
    out["ttft_mean_ms"] = round(total_mean, 2)
    out["direct_ttft_mean_ms"] = round(direct_ttft_mean_ms, 2)
    out["added_mean_ms"] = round(added_mean, 2)
    rows = {}
    for name, values in hops.items():
        if not values:
            continue
        stats = latency_stats(values)
        mean = stats["mean_ms"]
        # The provider's own first token is inside upstream_to_client: its added part is the rest.
        added_part = mean - direct_ttft_mean_ms if name == "upstream_to_client" else mean
        rows[name] = {**stats, "share_of_added_pct": round(100 * added_part / added_mean, 1) if added_mean > 0 else None}
    rows["upstream_to_client"]["minus_direct_ttft_mean_ms"] = round(
        rows["upstream_to_client"]["mean_ms"] - direct_ttft_mean_ms, 2)
    out["hops"] = rows
    out["hop_meaning"] = {**dict(HOPS), "retrieval_service_span": "the retrieval service's own Search span "
                          "(inside retrieval_search)"}
    return out


# ------------------------------------------------------------------------------------ the levels


def _level_row(level: Level, direct: Level | None) -> dict:
    ttft = latency_stats([s.ttft_s * 1000 for s in level.samples])
    itl = latency_stats([g * 1000 for s in level.samples for g in s.gaps_s])
    row = {
        "kind": level.kind, "concurrency": level.concurrency, "streams": len(level.samples),
        "completed_per_s": round(level.completed_in_window / level.window_s, 2) if level.window_s else 0.0,
        "errors": sum(level.errors.values()),
        "ttft_p50_ms": ttft.get("p50_ms"), "ttft_p99_ms": ttft.get("p99_ms"),
        "itl_p50_ms": itl.get("p50_ms"), "itl_p99_ms": itl.get("p99_ms"),
    }
    if direct is not None and ttft.get("n") and direct.samples:
        dt = latency_stats([s.ttft_s * 1000 for s in direct.samples])
        di = latency_stats([g * 1000 for s in direct.samples for g in s.gaps_s])
        for q in ("p50", "p99"):
            row[f"added_ttft_{q}_ms"] = round(ttft[f"{q}_ms"] - dt[f"{q}_ms"], 2)
            row[f"added_itl_{q}_ms"] = round(itl[f"{q}_ms"] - di[f"{q}_ms"], 2)
    completed = max(1, level.completed_in_window)
    row["cpu_ms_per_run"] = {name: round(cpu * 1000 / completed, 2) for name, cpu in level.cpu_s.items()}
    row["cpu_cores"] = {name: round(cpu / level.window_s, 2) for name, cpu in level.cpu_s.items()} if level.window_s else {}
    row["cores_busy"] = round(sum(row["cpu_cores"].values()), 2)
    row["machine_busy_pct"] = level.machine_busy_pct
    row["errors_by_kind"] = dict(level.errors)
    row["error_examples"] = level.error_examples
    row["ttft_stats"], row["itl_stats"] = ttft, itl
    row["total_stats"] = latency_stats([s.total_s * 1000 for s in level.samples])
    return row


async def run_levels(bench: Bench, levels: tuple[int, ...], measure_s: float,
                     warmup_s: float) -> tuple[list, dict, dict]:
    """(a row per kind and level, the TTFT breakdown per mesh level, the mesh processes that died
    with the end of their log). A process that dies ends the levels early."""
    rows: list[dict] = []
    breakdowns: dict = {}
    meter = CpuMeter(bench.processes(with_load=True), set(LOAD_PROCESSES))
    mesh_names = bench.mesh_names()
    died: dict[str, str] = {}
    client = LeanTransport("fake", max_connections=1000)
    columns = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    mesh_levels: list[Level] = []
    directs: dict[int, Level] = {}
    with Progress(*columns) as progress:
        overall = progress.add_task("levels", total=len(levels) * (1 + len(WORKLOADS)))
        bench.collector.record()
        for concurrency in levels:
            direct = await closed_loop(direct_call(client, bench.fake_port), Level("direct", concurrency),
                                       warmup_s, measure_s, progress, meter)
            directs[concurrency] = direct
            rows.append(_level_row(direct, None))
            progress.advance(overall)
            for kind in WORKLOADS:
                mesh_client = MeshClient(bench.gateway, concurrency)
                try:
                    level = await closed_loop(mesh_client.call(kind), Level(kind, concurrency), warmup_s, measure_s,
                                              progress, meter)
                finally:
                    await mesh_client.close()
                mesh_levels.append(level)
                rows.append(_level_row(level, direct))
                r = rows[-1]
                progress.console.print(
                    f"{kind} x{concurrency}: {r['completed_per_s']} runs/s, TTFT added p50 {r.get('added_ttft_p50_ms')} ms"
                    f" p99 {r.get('added_ttft_p99_ms')} ms, ITL added p99 {r.get('added_itl_p99_ms')} ms, "
                    f"{r['errors']} errors")
                progress.advance(overall)
                if died := bench.died(mesh_names):
                    progress.console.print(f"[red]mesh process(es) died: {', '.join(died)}; stopping the levels")
                    break
            if died:
                break
    await client.aclose()
    await asyncio.sleep(6.0)  # Envoy flushes its spans every 5 s; the services every 0.5 s
    spans = bench.collector.take()
    for level in mesh_levels:
        direct = directs[level.concurrency]
        direct_mean = float(np.mean([s.ttft_s * 1000 for s in direct.samples])) if direct.samples else 0.0
        breakdowns[f"{level.kind}@{level.concurrency}"] = breakdown(level.samples, spans, direct_mean)
    return rows, breakdowns, died


def plot_levels(name: str, rows: list[dict]) -> Path:
    import matplotlib  # noqa: PLC0415 - only this benchmark's plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for kind, color in zip(WORKLOADS, ("tab:blue", "tab:orange"), strict=False):
        mine = [r for r in rows if r["kind"] == kind and "added_ttft_p50_ms" in r]
        xs = [r["concurrency"] for r in mine]
        for metric, ax in (("ttft", axes[0]), ("itl", axes[1])):
            ax.plot(xs, [r[f"added_{metric}_p50_ms"] for r in mine], "o-", color=color, label=f"{kind} p50")
            ax.plot(xs, [r[f"added_{metric}_p99_ms"] for r in mine], "s--", color=color, label=f"{kind} p99")
    levels = sorted({r["concurrency"] for r in rows})
    axes[0].axhline(TARGET_ADDED_TTFT_P99_MS, color="red", lw=0.8, ls=":", label="target p99 at 50 streams")
    axes[0].set_title("time to first token added by the mesh")
    axes[1].set_title("inter-token latency added by the mesh")
    for ax in axes:
        if levels and levels[0] > 0:
            ax.set_xscale("log")
            ax.set_xlim(levels[0] / 1.5, levels[-1] * 1.5)
        ax.set_yscale("symlog", linthresh=10)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("ms (mesh minus direct, same percentile)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"e2e: Run through Envoy vs the provider direct ({TOKENS} tokens, {FIRST_TOKEN_MS:.0f} ms first, "
                 f"{TOKEN_MS:.0f} ms apart)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _redis_info(url: str) -> dict:
    if not url:
        return {}
    with contextlib.suppress(redis.RedisError), redis.Redis.from_url(url) as r:
        info = r.info("memory")
        return {"used_memory_mb": round(info["used_memory"] / 2**20, 2), "keys": r.dbsize()}
    return {}


async def levels_main(args: argparse.Namespace) -> None:
    load_at_start = os.getloadavg()
    with mesh(print, args.mesh_env) as bench:
        prepared = await prepare(bench)
        print(f"ingested {prepared['documents']} documents ({prepared['chunks']} chunks) in {prepared['ingest_s']} s")
        rss_before = rss_by_process(bench.processes())
        redis_before = _redis_info(bench.redis_url())
        rows, breakdowns, died = await run_levels(bench, tuple(args.levels), args.seconds, args.warmup_s)
        rss_after = rss_by_process(bench.processes())
        redis_after = _redis_info(bench.redis_url())
        logs = str(bench.paths.logs)
    print_table("e2e: Run through the mesh vs the provider direct", rows,
                ["kind", "concurrency", "streams", "completed_per_s", "errors", "ttft_p50_ms", "ttft_p99_ms",
                 "added_ttft_p50_ms", "added_ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "added_itl_p50_ms",
                 "added_itl_p99_ms"])
    cpu_rows = [{"kind": r["kind"], "concurrency": r["concurrency"], **r["cpu_ms_per_run"],
                 "cores busy": r["cores_busy"], "machine busy %": r["machine_busy_pct"]} for r in rows]
    print_table("CPU ms per completed stream (user + system)", cpu_rows)
    for key, b in breakdowns.items():
        if b.get("hops") and key.endswith(f"@{TARGET_LEVEL}"):
            print_table(f"where the TTFT goes: {key} ({b['traced_runs']} traced runs; direct TTFT mean "
                        f"{b['direct_ttft_mean_ms']} ms, added mean {b['added_mean_ms']} ms)",
                        [{"hop": k, **{c: v.get(c) for c in ("p50_ms", "p99_ms", "mean_ms", "share_of_added_pct")}}
                         for k, v in b["hops"].items()])
    print_table("RSS (MiB) before and after the levels",
                [{"process": k, "before": v, "after": rss_after.get(k, ""),
                  "growth_pct": round(100 * (rss_after[k] - v) / v, 1) if k in rss_after and v else ""}
                 for k, v in rss_before.items()])
    target = next((r for r in rows if r["kind"] == "grounded" and r["concurrency"] == TARGET_LEVEL), None)
    target_mo = next((r for r in rows if r["kind"] == "model_only" and r["concurrency"] == TARGET_LEVEL), None)
    plot_levels(args.name, rows)
    write_json(args.name, {
        "setup": {
            "provider": {"server": "tests.fakes.streaming_server (own process)", "tokens": TOKENS,
                         "first_token_ms": FIRST_TOKEN_MS, "token_ms": TOKEN_MS},
            "levels": list(args.levels), "measure_s": args.seconds, "warmup_s": args.warmup_s,
            "streams_per_connection": STREAMS_PER_CHANNEL, "corpus": prepared, "questions": QUESTIONS,
            "mesh": "agentmesh.services.cli.runner.up (Redis, 5 services, Envoy dev mode); router catalogue: one "
                    "openai deployment on the fake, no extractive fallback; gateway Run rate limit 100000/s; memory "
                    f"sessions expire after {SESSION_TTL_S} s; spans exported over OTLP (100 % sampled)",
            "client": "this process: grpc.aio (mesh), the router's LeanTransport + SSEParser (direct)",
            "mesh_env_overrides": args.mesh_env,
            "logs": logs, "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
        },
        "died": died,
        "target": {
            "what": f"the mesh adds <= {TARGET_ADDED_TTFT_P99_MS} ms p99 to TTFT at {TARGET_LEVEL} concurrent streams",
            "grounded_added_ttft_p99_ms": target and target.get("added_ttft_p99_ms"),
            "model_only_added_ttft_p99_ms": target_mo and target_mo.get("added_ttft_p99_ms"),
            "met_grounded": bool(target and target.get("added_ttft_p99_ms") is not None
                                 and target["added_ttft_p99_ms"] <= TARGET_ADDED_TTFT_P99_MS),
            "met_model_only": bool(target_mo and target_mo.get("added_ttft_p99_ms") is not None
                                   and target_mo["added_ttft_p99_ms"] <= TARGET_ADDED_TTFT_P99_MS),
        },
        "levels": rows,
        "ttft_breakdown": breakdowns,
        "rss_mb": {"before": rss_before, "after": rss_after},
        "redis": {"before": redis_before, "after": redis_after},
    })


# -------------------------------------------------------------------------------------- the soak


async def soak(bench: Bench, kind: str, seconds: float, concurrency: int, sample_s: float) -> dict:
    """Steady closed-loop load of ``kind`` runs; RSS of every process every ``sample_s`` seconds."""
    processes = bench.processes()
    samples: list[dict] = []
    completed = 0
    errors: Counter = Counter()
    examples: dict[str, str] = {}
    client = MeshClient(bench.gateway, concurrency)
    call = client.call(kind)
    begin = time.perf_counter()
    stop_at = begin + seconds

    async def worker(w: int) -> None:
        nonlocal completed
        while time.perf_counter() < stop_at:
            try:
                await call(w)
                completed += 1
            except (grpc.aio.AioRpcError, RunNotCompleted, OSError) as exc:
                errors[_error_name(exc)] += 1
                examples.setdefault(_error_name(exc), _error_message(exc))
                await asyncio.sleep(0.05)

    columns = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    workers = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    try:
        with Progress(*columns) as progress:
            task = progress.add_task("soak", total=seconds)
            next_sample = begin
            while (now := time.perf_counter()) < stop_at:
                if now >= next_sample:
                    samples.append({"t_s": round(now - begin, 2), "completed": completed,
                                    "errors": sum(errors.values()), "rss_mb": rss_by_process(processes)})
                    next_sample += sample_s
                last = samples[-1]
                progress.update(task, completed=now - begin, description=(
                    f"soak {kind} x{concurrency}: {completed} runs, {sum(errors.values())} errors, "
                    f"RSS total {sum(last['rss_mb'].values()):,.0f} MiB"))
                await asyncio.sleep(min(0.5, max(0.0, next_sample - time.perf_counter())))
        samples.append({"t_s": round(time.perf_counter() - begin, 2), "completed": completed,
                        "errors": sum(errors.values()), "rss_mb": rss_by_process(processes)})
        await asyncio.wait(workers, timeout=DRAIN_S)
    finally:
        for t in workers:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await client.close()
    return {"samples": samples, "completed": completed, "errors": dict(errors), "error_examples": examples}


def soak_growth(samples: list[dict], warmup_s: float) -> list[dict]:
    """Per process: RSS after the warm-up vs at the end (medians of the first / last 10 % of the
    samples after the warm-up), growth in % and the least-squares slope in MiB/min."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    if len(after) < 2:
        return []
    edge = max(1, len(after) // 10)
    names = sorted({n for s in after for n in s["rss_mb"]})
    rows = []
    for name in names:
        points = [(s["t_s"], s["rss_mb"][name]) for s in after if name in s["rss_mb"]]
        if len(points) < 2:
            continue
        ts, rss = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        start, end = float(np.median(rss[:edge])), float(np.median(rss[-edge:]))
        growth = 100 * (end - start) / start if start else 0.0
        rows.append({"process": name, "rss_start_mb": round(start, 1), "rss_end_mb": round(end, 1),
                     "rss_max_mb": round(float(rss.max()), 1), "growth_pct": round(growth, 2),
                     "slope_mb_per_min": round(float(np.polyfit(ts, rss, 1)[0]) * 60, 3),
                     "within_bound": growth <= TARGET_RSS_GROWTH_PCT})
    return rows


def plot_soak(name: str, samples: list[dict], warmup_s: float) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (absolute, relative) = plt.subplots(1, 2, figsize=(13, 5))
    for process in sorted({n for s in samples for n in s["rss_mb"]}):
        points = [(s["t_s"], s["rss_mb"][process]) for s in samples if process in s["rss_mb"]]
        ts, rss = [p[0] for p in points], [p[1] for p in points]
        absolute.plot(ts, rss, label=process)
        base = next((r for t, r in points if t >= warmup_s), None)
        if base:
            relative.plot([t for t in ts if t >= warmup_s], [100 * (r - base) / base for t, r in points if t >= warmup_s],
                          label=process)
    absolute.set_yscale("log")
    absolute.set_ylabel("RSS (MiB, log scale)")
    absolute.set_title("resident memory of every process")
    relative.axhline(TARGET_RSS_GROWTH_PCT, color="red", lw=0.8, ls=":", label="bound +10 %")
    relative.set_ylabel("% change since the end of the warm-up")
    relative.set_title("growth after the warm-up")
    for ax in (absolute, relative):
        ax.axvline(warmup_s, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("seconds of steady load")
        ax.grid(True, alpha=0.3)
    relative.legend(fontsize=7, loc="upper left", ncols=2)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


async def soak_main(args: argparse.Namespace) -> None:
    warmup_s = args.soak_warmup_s if args.soak_warmup_s is not None else min(60.0, 0.2 * args.soak_s)
    load_at_start = os.getloadavg()
    with mesh(print, args.mesh_env) as bench:
        prepared = await prepare(bench)
        redis_before = _redis_info(bench.redis_url())
        result = await soak(bench, args.soak_workload, args.soak_s, args.soak_concurrency, args.soak_sample_s)
        redis_after = _redis_info(bench.redis_url())
        died = bench.died(bench.mesh_names())
        logs = str(bench.paths.logs)
    rows = soak_growth(result["samples"], warmup_s)
    print_table(f"soak: {args.soak_s:.0f} s of {args.soak_concurrency} concurrent {args.soak_workload} runs "
                f"({result['completed']} runs, {sum(result['errors'].values())} errors); RSS after the "
                f"{warmup_s:.0f} s warm-up", rows)
    plot_soak(f"{args.name}_soak", result["samples"], warmup_s)
    write_json(f"{args.name}_soak", {
        "setup": {"soak_s": args.soak_s, "concurrency": args.soak_concurrency, "sample_s": args.soak_sample_s,
                  "warmup_s": warmup_s, "workload": args.soak_workload, "corpus": prepared,
                  "provider": {"tokens": TOKENS, "first_token_ms": FIRST_TOKEN_MS, "token_ms": TOKEN_MS},
                  "memory_session_ttl_s": SESSION_TTL_S, "mesh_env_overrides": args.mesh_env, "logs": logs,
                  "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "target": {"what": f"no process grows RSS by more than {TARGET_RSS_GROWTH_PCT} % over a 10-minute soak "
                           "after a warm-up", "soak_s": args.soak_s,
                   "met": bool(rows) and not died and all(r["within_bound"] for r in rows),
                   "over_bound": [r["process"] for r in rows if not r["within_bound"]],
                   # Redis grows with the data it is asked to keep until the retention bounds are
                   # reached (sessions expire after SESSION_TTL_S, the tenant's last 1,000 runs).
                   "met_by_the_services": bool(rows) and not died and all(
                       r["within_bound"] for r in rows if not r["process"].startswith("redis"))},
        "runs_completed": result["completed"],
        "runs_per_s": round(result["completed"] / args.soak_s, 2),
        "errors": result["errors"],
        "error_examples": result["error_examples"],
        "died": died,
        "growth": rows,
        "redis": {"before": redis_before, "after": redis_after},
        "samples": result["samples"],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrent streams per level")
    parser.add_argument("--seconds", type=float, default=MEASURE_S, help="measured seconds per level and kind")
    parser.add_argument("--warmup-s", type=float, default=WARMUP_S, help="warm-up seconds before each level")
    parser.add_argument("--soak-s", type=float, default=0.0, help="soak mode: seconds of steady load (0 = levels)")
    parser.add_argument("--soak-concurrency", type=int, default=SOAK_CONCURRENCY, help="concurrent streams of the soak")
    parser.add_argument("--soak-workload", choices=WORKLOADS, default="grounded", help="kind of run of the soak")
    parser.add_argument("--soak-sample-s", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--soak-warmup-s", type=float, default=None,
                        help="seconds of soak before growth is measured (default 20 %% of the soak, at most 60)")
    parser.add_argument("--mesh-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every mesh process (e.g. to try a setting); repeatable")
    parser.add_argument("--name", default="e2e", help="results name: bench/results/<name>.json (soak: <name>_soak)")
    args = parser.parse_args()
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "200")  # rich would cut the wide tables to 80 columns in a log
    try:
        args.mesh_env = dict(item.split("=", 1) for item in args.mesh_env)
    except ValueError:
        parser.error("--mesh-env takes NAME=VALUE")
    freeze_gc()
    asyncio.run(soak_main(args) if args.soak_s > 0 else levels_main(args))


if __name__ == "__main__":
    main()
