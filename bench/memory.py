"""Memory service benchmark: ``GetContext`` and ``AppendMessages`` latency (p50/p99) and throughput
at 1, 16 and 64 concurrent clients, beside a raw redis-py round trip on the same Redis doing the
equivalent storage work, so the service's overhead shows as a ratio.

Set-up (everything real, on this machine):
- one ``redis-server`` started like the local mesh starts it (``start_redis``: AOF on, fsync
  ``everysec``);
- the memory service as its own process (``agentmesh serve memory``), log level INFO as shipped;
  facts and compaction are switched off, so what is measured is the session path alone (with
  compaction on, a 200-message session would be read as summary + recent messages);
- the clients: one asyncio process, one gRPC channel (one redis-py pool for the raw baseline),
  ``clients`` coroutines issuing calls back to back for ``--seconds`` after a short warm-up. The
  client process and the service share the machine's cores.

Operations:
- ``GetContext`` on a 200-message session (user/assistant turns of 15..60 words), at the
  service's default budget (2000 tokens: the newest ~40 messages) and at a budget that fits the
  whole session (all 200); baseline: ``LRANGE`` of the same number of stored messages;
- ``AppendMessages`` of one turn (2 messages) to the client's own session; baseline: ``RPUSH`` of
  the same two stored blobs.

Also recorded: the service process's CPU time per call, and the same store operations called
directly (no gRPC), one at a time, to show how much of a call is the memory code itself.

Run: ``.venv/bin/python -m bench.memory`` (about 2 minutes); writes ``bench/results/memory.json``
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
from agentmesh.services.cli.processes import free_port, spawn, start_redis
from agentmesh.services.memory.store import SessionStore
from agentmesh.services.runtime.clients import check_health
from agentmesh.services.runtime.tokens import default_token_counter
from bench.common import latency_stats, plot_latency, print_table, rss_mb, write_json

CONCURRENCY = (1, 16, 64)
SESSION_MESSAGES = 200
TARGET_P99_MS = 5.0
MD = (("x-tenant-id", "bench"),)
WORDS = ("the a service token budget message memory redis python agent answer question context summary user "
         "assistant session latency throughput cluster replica stream append window recent history pinned "
         "fact preference lisbon nurse coffee weekend museum train ticket hotel booking price").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


async def measure(call: Callable[[int], Awaitable[None]], clients: int, seconds: float, warmup_s: float = 0.5
                  ) -> tuple[list[float], float]:
    """Latencies (ms) of ``call(client)`` issued back to back by ``clients`` coroutines for
    ``seconds`` after ``warmup_s``, and the throughput (calls/s)."""
    samples: list[float] = []
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds

    async def client(c: int) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            await call(c)
            t1 = time.perf_counter()
            if t0 >= measure_from:
                samples.append((t1 - t0) * 1000)

    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - measure_from
    return samples, len(samples) / elapsed


async def wait_serving(address: str, timeout_s: float = 60.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        deadline = time.monotonic() + timeout_s
        while not await check_health(channel):
            if time.monotonic() > deadline:
                raise RuntimeError(f"memory service at {address} did not become SERVING")
            await asyncio.sleep(0.1)


async def run(seconds: float) -> dict:
    load_before = os.getloadavg()
    rng = random.Random(5)
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    redis_port, port = free_port(), free_port()
    redis_proc = start_redis(redis_port, root / "redis", root / "logs")
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {
        "AGENTMESH_MEMORY_REDIS_URL": redis_url,
        "AGENTMESH_MEMORY_PORT": str(port),
        "AGENTMESH_MEMORY_FACTS_ENABLED": "false",
        "AGENTMESH_MEMORY_COMPACTION_TRIGGER_TOKENS": "0",
    }
    service = spawn("memory", [sys.executable, "-m", "agentmesh.services.cli.main", "serve", "memory"], root / "logs",
                    env=env)
    address = f"127.0.0.1:{port}"
    try:
        await wait_serving(address)
        async with grpc.aio.insecure_channel(address) as channel, aioredis.Redis.from_url(
            redis_url, max_connections=128
        ) as raw:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            history = [
                common_pb2.Message(role=common_pb2.ROLE_USER if i % 2 == 0 else common_pb2.ROLE_ASSISTANT,
                                   content=" ".join(sentence(rng, rng.randint(5, 20)) for _ in range(3)))
                for i in range(SESSION_MESSAGES)
            ]
            await stub.AppendMessages(memory_pb2.AppendMessagesRequest(session_id="s200", messages=history),
                                      metadata=MD, timeout=10)
            messages_key = "agentmesh:bench:default:{s200}:messages"
            full_budget = 128_000
            typical = await stub.GetContext(memory_pb2.GetContextRequest(session_id="s200"), metadata=MD, timeout=10)
            full = await stub.GetContext(memory_pb2.GetContextRequest(session_id="s200", token_budget=full_budget),
                                         metadata=MD, timeout=10)
            assert len(full.messages) == SESSION_MESSAGES, "the full budget must return the whole session"
            turn = history[:2]
            blobs = [memory_pb2.SessionMessage(message=m, created_at_ms=1, tokens=30).SerializeToString() for m in turn]

            def get_context(budget: int) -> Callable[[int], Awaitable[None]]:
                request = memory_pb2.GetContextRequest(session_id="s200", token_budget=budget)

                async def call(_: int) -> None:
                    await stub.GetContext(request, metadata=MD, timeout=10)

                return call

            def lrange(n: int) -> Callable[[int], Awaitable[None]]:
                async def call(_: int) -> None:
                    await raw.lrange(messages_key, -n, -1)

                return call

            append_requests = [memory_pb2.AppendMessagesRequest(session_id=f"w{c}", messages=turn)
                               for c in range(max(CONCURRENCY))]

            async def append(c: int) -> None:
                await stub.AppendMessages(append_requests[c], metadata=MD, timeout=10)

            async def rpush(c: int) -> None:
                await raw.rpush(f"bench:raw:{c}", *blobs)

            operations = [
                (f"GetContext budget {typical.tokens_used // 100 * 100 + 100} ({len(typical.messages)} msgs)",
                 get_context(0), lrange(len(typical.messages)), f"LRANGE {len(typical.messages)}"),
                (f"GetContext whole session ({SESSION_MESSAGES} msgs)", get_context(full_budget),
                 lrange(SESSION_MESSAGES), f"LRANGE {SESSION_MESSAGES}"),
                ("AppendMessages (1 turn = 2 msgs)", append, rpush, "RPUSH 2"),
            ]
            server = psutil.Process(service.pid)
            rows = []
            for name, service_call, raw_call, raw_name in operations:
                for clients in CONCURRENCY:
                    cpu_before = sum(server.cpu_times()[:2])
                    samples, rate = await measure(service_call, clients, seconds)
                    # Server CPU per call: less sensitive to other load than latency (warm-up included).
                    calls = len(samples) * (1 + 0.5 / seconds)  # the warm-up's calls used CPU too
                    cpu_ms = (sum(server.cpu_times()[:2]) - cpu_before) * 1000 / max(1.0, calls)
                    raw_samples, raw_rate = await measure(raw_call, clients, seconds)
                    s, r = latency_stats(samples), latency_stats(raw_samples)
                    rows.append({
                        "operation": name, "clients": clients,
                        "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "ops_per_s": round(rate, 1),
                        "raw": raw_name, "raw_p50_ms": r["p50_ms"], "raw_p99_ms": r["p99_ms"],
                        "raw_ops_per_s": round(raw_rate, 1),
                        "ratio_p50": round(s["p50_ms"] / r["p50_ms"], 1),
                        "ratio_p99": round(s["p99_ms"] / r["p99_ms"], 1),
                        "server_cpu_ms_per_call": round(cpu_ms, 3),
                        "service": s, "raw_stats": r,
                    })
                    print(f"{name} @ {clients}: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, {rate:.0f}/s, "
                          f"server CPU {cpu_ms:.3f} ms/call "
                          f"(raw {raw_name}: p99 {r['p99_ms']} ms)", flush=True)
            server_rss = rss_mb(service.pid)

            # The service's own work without gRPC: the same store calls made directly, one at a
            # time from this process (Lua round trip, decoding), to split the overhead.
            store = SessionStore(raw, default_token_counter(), location=redis_url)
            ref = store.ref("bench", "", "s200")
            direct = {}
            for label, fn in (
                ("get_context_default_budget", lambda: store.get_context(ref, 2000)),
                ("get_context_whole_session", lambda: store.get_context(ref, full_budget)),
                ("append_one_turn", lambda: store.append(store.ref("bench", "", "direct"), turn)),
            ):
                for _ in range(50):
                    await fn()
                times = []
                for _ in range(1000):
                    t0 = time.perf_counter()
                    await fn()
                    times.append((time.perf_counter() - t0) * 1000)
                direct[label] = latency_stats(times)
                print(f"store only, {label}: p50 {direct[label]['p50_ms']} ms, p99 {direct[label]['p99_ms']} ms")
    finally:
        service.stop()
        redis_proc.stop()

    columns = ["operation", "clients", "p50_ms", "p99_ms", "ops_per_s", "server_cpu_ms_per_call", "raw", "raw_p50_ms",
               "raw_p99_ms", "raw_ops_per_s", "ratio_p50", "ratio_p99"]
    print_table("memory service vs raw redis-py (same Redis)", rows, columns)
    target_row = next(r for r in rows if r["operation"].startswith("GetContext whole") and r["clients"] == 16)
    typical_row = next(r for r in rows if r["operation"].startswith("GetContext budget") and r["clients"] == 16)
    plot_latency("memory", {
        name: [(r["clients"], r["p99_ms"]) for r in rows if r["operation"] == name]
        for name in dict.fromkeys(r["operation"] for r in rows)
    }, "concurrent clients", "p99 latency (ms)")
    return {
        "config": {"seconds_per_cell": seconds, "session_messages": SESSION_MESSAGES,
                   "typical_budget_tokens": 2000, "typical_messages": len(typical.messages),
                   "whole_session_tokens": full.tokens_used, "facts": False, "compaction": False,
                   "redis": "start_redis (AOF, appendfsync everysec)", "service_log_level": "INFO",
                   "clients": "one asyncio process, one gRPC channel / one redis-py pool"},
        "rows": rows,
        "target": {"what": "GetContext p99 <= 5 ms, 200-message session, 16 clients", "p99_ms_whole_session":
                   target_row["p99_ms"], "met_whole_session": target_row["p99_ms"] <= TARGET_P99_MS,
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
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    write_json("memory", asyncio.run(run(args.seconds)))


if __name__ == "__main__":
    main()
