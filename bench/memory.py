"""Memory service benchmark: ``GetContext`` and ``AppendMessages`` latency (p50/p99), throughput
and CPU per call at 1, 16 and 64 concurrent clients, beside a raw redis-py round trip on the same
Redis doing the equivalent storage work, so the service's overhead shows as a ratio.

Set-up (everything real, on this machine):
- one ``redis-server`` started like the local mesh starts it (``start_redis``: AOF on, fsync
  ``everysec``);
- the memory service as its own process (``agentmesh serve memory``; ``--server-processes N``
  starts N on the same port, which gRPC opens with ``SO_REUSEPORT`` so the kernel spreads
  connections over them), log level INFO as shipped (one JSON line per call), tracing and metrics
  on; facts and compaction are off, so what is measured is the session path alone (with
  compaction on, a 200-message session would be read as summary + recent messages);
- the clients: this process (separate from the service), ``clients`` coroutines issuing calls
  back to back for ``--seconds`` after a short warm-up, over 8 gRPC channels (8 connections);
  the raw baseline over one redis-py pool. Client, service and Redis share the machine's cores,
  and so does whatever else runs on it: each row records the CPU each of them spent per call and
  the load average, since CPU per call is what other load distorts least.

Operations:
- ``GetContext`` on a 200-message session (user/assistant turns of 15..60 words), at the
  service's default budget (2000 tokens: the newest ~40 messages) and at a budget that fits the
  whole session (all 200); baseline: ``LRANGE`` of the same number of stored messages. The
  session does not change during the run, so after the first call the service holds its messages
  (cache.py) and each call costs the budget walk in Redis plus the gRPC call;
- a chat turn: ``AppendMessages`` of one turn (2 messages) then ``GetContext`` at the default
  budget, on the client's own 200-message session, so every read follows a write (the pattern of
  an agent loop); baseline: ``RPUSH`` 2 then ``LRANGE`` of the same number of messages;
- ``AppendMessages`` of one turn (2 messages) to the client's own session; baseline: ``RPUSH`` of
  the same two stored blobs.

Also recorded: the same store operations called directly (no gRPC), one at a time, with and
without the message cache, to show how much of a call is the memory code itself.

Run: ``.venv/bin/python -m bench.memory`` (about 3 minutes); writes ``bench/results/memory.json``
and ``bench/results/memory.png``. The target (issue 5): GetContext p99 ≤ 5 ms for the 200-message
session at 16 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import psutil
import redis.asyncio as aioredis

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from agentmesh.services.cli.processes import Proc, free_port, spawn, start_redis
from agentmesh.services.memory.cache import ContextCache
from agentmesh.services.memory.store import SessionStore
from agentmesh.services.runtime.clients import check_health
from agentmesh.services.runtime.tokens import default_token_counter
from bench.common import freeze_gc, latency_stats, plot_latency, print_table, rss_mb, write_json

CONCURRENCY = (1, 16, 64)
SESSION_MESSAGES = 200
TARGET_P99_MS = 5.0
CHANNELS = 8
MD = (("x-tenant-id", "bench"),)
WORDS = ("the a service token budget message memory redis python agent answer question context summary user "
         "assistant session latency throughput cluster replica stream append window recent history pinned "
         "fact preference lisbon nurse coffee weekend museum train ticket hotel booking price").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def cpu_s(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


async def measure(call: Callable[[int], Awaitable[None]], clients: int, seconds: float, warmup_s: float = 0.5
                  ) -> tuple[list[float], float, int]:
    """Latencies (ms) of ``call(client)`` issued back to back by ``clients`` coroutines for
    ``seconds`` after ``warmup_s``, the throughput (calls/s) and every call made (warm-up too)."""
    samples: list[float] = []
    made = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds

    async def client(c: int) -> None:
        nonlocal made
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            await call(c)
            made += 1
            t1 = time.perf_counter()
            if t0 >= measure_from:
                samples.append((t1 - t0) * 1000)

    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - measure_from
    return samples, len(samples) / elapsed, made


async def wait_serving(address: str, processes: int, timeout_s: float = 60.0) -> None:
    """Until ``2 * processes`` new connections in a row find the service SERVING (each new
    connection may land on any of the processes sharing the port)."""
    deadline = time.monotonic() + timeout_s
    ok = 0
    while ok < 2 * processes:
        async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            if await check_health(channel):
                ok += 1
                continue
        ok = 0
        if time.monotonic() > deadline:
            raise RuntimeError(f"memory service at {address} did not become SERVING")
        await asyncio.sleep(0.1)


def start_service(port: int, redis_url: str, logs: Path, n: int) -> Proc:
    env = {
        "AGENTMESH_MEMORY_REDIS_URL": redis_url,
        "AGENTMESH_MEMORY_PORT": str(port),
        "AGENTMESH_MEMORY_FACTS_ENABLED": "false",
        "AGENTMESH_MEMORY_COMPACTION_TRIGGER_TOKENS": "0",
    }
    return spawn(f"memory-{n}", [sys.executable, "-m", "agentmesh.services.cli.main", "serve", "memory"], logs,
                 env=env)


class Clients:
    """``CHANNELS`` gRPC channels, each its own connection (a local subchannel pool), so the
    calls spread over every service process sharing the port."""

    def __init__(self, address: str):
        self.channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(CHANNELS)]
        self.stubs = [memory_pb2_grpc.MemoryServiceStub(c) for c in self.channels]

    def stub(self, client: int) -> memory_pb2_grpc.MemoryServiceStub:
        return self.stubs[client % CHANNELS]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def run(seconds: float, processes: int) -> dict:
    load_before = os.getloadavg()
    rng = random.Random(5)
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    redis_port, port = free_port(), free_port()
    redis_proc = start_redis(redis_port, root / "redis", root / "logs")
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    services = [start_service(port, redis_url, root / "logs", n) for n in range(processes)]
    address = f"127.0.0.1:{port}"
    clients = None
    try:
        await wait_serving(address, processes)
        clients = Clients(address)
        async with aioredis.Redis.from_url(redis_url, max_connections=128) as raw:
            stub = clients.stub(0)
            history = [
                common_pb2.Message(role=common_pb2.ROLE_USER if i % 2 == 0 else common_pb2.ROLE_ASSISTANT,
                                   content=" ".join(sentence(rng, rng.randint(5, 20)) for _ in range(3)))
                for i in range(SESSION_MESSAGES)
            ]
            sessions = ["s200", *(f"chat{c}" for c in range(max(CONCURRENCY)))]
            for session in sessions:
                await stub.AppendMessages(memory_pb2.AppendMessagesRequest(session_id=session, messages=history),
                                          metadata=MD, timeout=30)
            messages_key = "agentmesh:bench:default:{s200}:messages"
            full_budget = 128_000
            typical = await stub.GetContext(memory_pb2.GetContextRequest(session_id="s200"), metadata=MD, timeout=10)
            full = await stub.GetContext(memory_pb2.GetContextRequest(session_id="s200", token_budget=full_budget),
                                         metadata=MD, timeout=10)
            assert len(full.messages) == SESSION_MESSAGES, "the full budget must return the whole session"
            n_typical = len(typical.messages)
            turn = history[:2]
            blobs = [memory_pb2.SessionMessage(message=m, created_at_ms=1, tokens=30).SerializeToString() for m in turn]

            def get_context(budget: int) -> Callable[[int], Awaitable[None]]:
                request = memory_pb2.GetContextRequest(session_id="s200", token_budget=budget)

                async def call(c: int) -> None:
                    await clients.stub(c).GetContext(request, metadata=MD, timeout=10)

                return call

            def lrange(n: int) -> Callable[[int], Awaitable[None]]:
                async def call(_: int) -> None:
                    await raw.lrange(messages_key, -n, -1)

                return call

            append_requests = [memory_pb2.AppendMessagesRequest(session_id=f"w{c}", messages=turn)
                               for c in range(max(CONCURRENCY))]
            chat_appends = [memory_pb2.AppendMessagesRequest(session_id=f"chat{c}", messages=turn)
                            for c in range(max(CONCURRENCY))]
            chat_reads = [memory_pb2.GetContextRequest(session_id=f"chat{c}") for c in range(max(CONCURRENCY))]

            async def append(c: int) -> None:
                await clients.stub(c).AppendMessages(append_requests[c], metadata=MD, timeout=10)

            async def rpush(c: int) -> None:
                await raw.rpush(f"bench:raw:{c}", *blobs)

            async def chat_turn(c: int) -> None:
                stub = clients.stub(c)
                await stub.AppendMessages(chat_appends[c], metadata=MD, timeout=10)
                await stub.GetContext(chat_reads[c], metadata=MD, timeout=10)

            async def raw_turn(c: int) -> None:
                await raw.rpush(f"bench:chat:{c}", *blobs)
                await raw.lrange(messages_key, -n_typical, -1)

            operations = [
                (f"GetContext budget 2000 ({n_typical} msgs)", get_context(0), lrange(n_typical),
                 f"LRANGE {n_typical}"),
                (f"GetContext whole session ({SESSION_MESSAGES} msgs)", get_context(full_budget),
                 lrange(SESSION_MESSAGES), f"LRANGE {SESSION_MESSAGES}"),
                ("chat turn: AppendMessages 2 msgs + GetContext budget 2000", chat_turn, raw_turn,
                 f"RPUSH 2 + LRANGE {n_typical}"),
                ("AppendMessages (1 turn = 2 msgs)", append, rpush, "RPUSH 2"),
            ]
            server = [psutil.Process(s.pid) for s in services]
            redis_ps = [psutil.Process(redis_proc.pid)]
            rows = []

            async def cell(name: str, service_call, raw_call, raw_name: str, concurrency: int) -> dict:
                server_before, redis_before, client_before = cpu_s(server), cpu_s(redis_ps), time.process_time()
                samples, rate, made = await measure(service_call, concurrency, seconds)
                per_call = 1000 / max(1, made)
                server_ms = (cpu_s(server) - server_before) * per_call
                redis_ms = (cpu_s(redis_ps) - redis_before) * per_call
                client_ms = (time.process_time() - client_before) * per_call
                raw_samples, raw_rate, _ = await measure(raw_call, concurrency, seconds)
                s, r = latency_stats(samples), latency_stats(raw_samples)
                row = {
                    "operation": name, "clients": concurrency, "server_processes": len(server),
                    "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "ops_per_s": round(rate, 1),
                    "server_cpu_ms_per_call": round(server_ms, 3), "redis_cpu_ms_per_call": round(redis_ms, 3),
                    "client_cpu_ms_per_call": round(client_ms, 3),
                    "raw": raw_name, "raw_p50_ms": r["p50_ms"], "raw_p99_ms": r["p99_ms"],
                    "raw_ops_per_s": round(raw_rate, 1),
                    "ratio_p50": round(s["p50_ms"] / r["p50_ms"], 1),
                    "ratio_p99": round(s["p99_ms"] / r["p99_ms"], 1),
                    "load_average_1m": round(os.getloadavg()[0], 2),
                    "service": s, "raw_stats": r,
                }
                print(f"{name} @ {concurrency} x {len(server)} proc: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, "
                      f"{rate:.0f}/s, CPU ms/call server {server_ms:.3f} redis {redis_ms:.3f} client "
                      f"{client_ms:.3f} (raw {raw_name}: p99 {r['p99_ms']} ms), load {os.getloadavg()[0]:.2f}",
                      flush=True)
                return row

            for name, service_call, raw_call, raw_name in operations:
                for concurrency in CONCURRENCY:
                    rows.append(await cell(name, service_call, raw_call, raw_name, concurrency))
            server_rss = [rss_mb(s.pid) for s in services]

            # The target cell once more with one more service process on the same port.
            services.append(start_service(port, redis_url, root / "logs", len(services)))
            await wait_serving(address, len(services))
            await clients.close()
            clients = Clients(address)
            server = [psutil.Process(s.pid) for s in services]
            name, service_call, raw_call, raw_name = operations[1]
            rows.append(await cell(name, service_call, raw_call, raw_name, 16))

            # The service's own work without gRPC: the same store calls made directly, one at a
            # time from this process (Lua round trip, framing), with the message cache (as the
            # service runs) and without it (every message decoded and framed on each call).
            direct = {}
            counter = default_token_counter()
            cached = SessionStore(raw, counter, location=redis_url)
            uncached = SessionStore(raw, counter, location=redis_url, cache=ContextCache(0))
            ref = cached.ref("bench", "", "s200")
            for label, fn in (
                ("get_context_default_budget", lambda: cached.get_context(ref, 2000)),
                ("get_context_whole_session", lambda: cached.get_context(ref, full_budget)),
                ("get_context_default_budget_uncached", lambda: uncached.get_context(ref, 2000)),
                ("get_context_whole_session_uncached", lambda: uncached.get_context(ref, full_budget)),
                ("append_one_turn", lambda: cached.append(cached.ref("bench", "", "direct"), turn)),
            ):
                for _ in range(50):
                    await fn()
                times = []
                cpu_before = time.process_time()
                for _ in range(1000):
                    t0 = time.perf_counter()
                    await fn()
                    times.append((time.perf_counter() - t0) * 1000)
                cpu_ms = (time.process_time() - cpu_before) * 1000 / len(times)
                direct[label] = {**latency_stats(times), "cpu_ms_per_call": round(cpu_ms, 3)}
                print(f"store only, {label}: p50 {direct[label]['p50_ms']} ms, p99 {direct[label]['p99_ms']} ms, "
                      f"CPU {direct[label]['cpu_ms_per_call']} ms/call")
    finally:
        if clients is not None:
            await clients.close()
        for service in services:
            service.stop()
        redis_proc.stop()

    columns = ["operation", "clients", "server_processes", "p50_ms", "p99_ms", "ops_per_s", "server_cpu_ms_per_call",
               "redis_cpu_ms_per_call", "client_cpu_ms_per_call", "raw", "raw_p50_ms", "raw_p99_ms", "ratio_p50",
               "ratio_p99", "load_average_1m"]
    print_table("memory service vs raw redis-py (same Redis)", rows, columns)
    whole = [r for r in rows if r["operation"].startswith("GetContext whole") and r["clients"] == 16]
    typical_row = next(r for r in rows if r["operation"].startswith("GetContext budget") and r["clients"] == 16)
    plot_latency("memory", {
        name: [(r["clients"], r["p99_ms"]) for r in rows
               if r["operation"] == name and r["server_processes"] == processes]
        for name in dict.fromkeys(r["operation"] for r in rows)
    }, "concurrent clients", "p99 latency (ms)")
    return {
        "config": {"seconds_per_cell": seconds, "session_messages": SESSION_MESSAGES,
                   "typical_budget_tokens": 2000, "typical_messages": n_typical,
                   "whole_session_tokens": full.tokens_used, "facts": False, "compaction": False,
                   "redis": "start_redis (AOF, appendfsync everysec)", "service_log_level": "INFO",
                   "server_processes": processes,
                   "clients": f"this process (not the service's), {CHANNELS} gRPC channels / one redis-py pool"},
        "rows": rows,
        "target": {"what": "GetContext p99 <= 5 ms, 200-message session, 16 clients",
                   "p99_ms_whole_session": {f"{r['server_processes']} process(es)": r["p99_ms"] for r in whole},
                   "met_whole_session": any(r["p99_ms"] <= TARGET_P99_MS for r in whole),
                   "p99_ms_default_budget": typical_row["p99_ms"],
                   "met_default_budget": typical_row["p99_ms"] <= TARGET_P99_MS},
        "service_rss_mb": server_rss,
        "store_only_sequential": direct,
        # Other work on the machine skews every figure: the 1-minute load average before and after.
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell (default 5)")
    parser.add_argument("--server-processes", type=int, default=1,
                        help="memory service processes sharing the port (default 1; the target cell is also "
                        "measured with one more)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    freeze_gc()
    write_json("memory", asyncio.run(run(args.seconds, args.server_processes)))


if __name__ == "__main__":
    main()
