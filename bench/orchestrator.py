"""Orchestrator overhead per step: the time of an agent step NOT spent in the model or the tools,
p50/p99 at 1, 16 and 64 concurrent runs.

Run: ``.venv/bin/python -m bench.orchestrator`` (``make bench-orchestrator``); ``--seconds N`` per
level (default 12). Writes ``bench/results/orchestrator.json`` and prints a table. Takes about a
minute and a half. (Sandbox start-up latency, the issue's other figure, is ``bench.sandbox``.)

Setup (every service a real process, as ``agentmesh up`` runs them, on this 2-core machine):
- Redis (``start_redis``: AOF on) holding the sessions and tool idempotency records, and a second
  one holding the run checkpoints and event streams, so the orchestrator's Redis commands per
  step can be counted (``INFO commandstats``);
- the orchestrator (``agentmesh serve orchestrator``, default settings: checkpoints in Redis,
  events flushed at most ``EVENT_FLUSH_MS`` (100 ms) after they are sent, INFO logs, spans
  created), with one agent from a YAML file: the calculator as its tool, session memory on,
  retrieval off, ``max_steps: 4``;
- the LLM router, the memory service (sessions only) and the tool service, each its own process;
  retrieval is not started (the agent does not retrieve; the orchestrator's readiness says so);
- the model: the scripted OpenAI fake (``tests.fakes.openai_server``) in its own process, every
  turn the same streamed calculator call, so every run makes 4 steps (4 model calls, 4 tool
  calls) and ends with MAX_STEPS — the order concurrent runs take the turns in does not matter;
- this process: ``concurrency`` clients each starting one ``Run`` after the other for
  ``--seconds`` after a 2 s warm-up.

The figure: every step ends with a ``step_completed`` event in which the orchestrator splits the
step's wall-clock time (from building the model request to the checkpoint after the step's tool
results) into ``model_ms`` (waiting for the router's stream: router and provider time),
``tools_ms`` (waiting for the tool calls: tool service time) and ``overhead_ms``, the rest: the
orchestrator's own work — the model request, forwarding each delta as an event, reassembling
tool calls, starting the tool calls, the checkpoint written to Redis before the tools run (the
one after them is written in the background), event bookkeeping — and any time its event loop
was busy with other runs. The table also gives the orchestrator's CPU time per step (process CPU
/ steps, so per-run work such as memory load/append and the run's first and last checkpoints is
spread over the steps), its Redis commands and Lua script calls (EVALSHA: one per write of
events and/or a checkpoint, plus lease renewals) per step, and the client-observed run time. Under load all of these include waiting for a share of the two cores,
which the clients, the fake, the router, the tool and memory services and Redis also use: so the
rows also give the CPU per step of every process together (``all_cpu_ms_per_step``, by process in
the JSON), the cores that keeps busy, and how busy the whole machine was (``machine_busy_pct``).

Target (issue 6): overhead <= 3 ms per step at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import redis

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.services.cli.processes import Proc, free_port, spawn, start_redis
from agentmesh.services.runtime.clients import check_health
from bench.common import CpuMeter, freeze_gc, latency_stats, plot_latency, print_table, rss_mb, write_json

CONCURRENCY = (1, 16, 64)
STEPS_PER_RUN = 4
TARGET_P50_MS = 3.0
WARMUP_S = 2.0
MD = (("x-tenant-id", "bench"),)
AGENT_YAML = """\
agents:
  bench:
    instructions: Compute with the calculator.
    tools: [calculator]
    retrieval: {enabled: false}
    memory: {enabled: true, token_budget: 1000}
    max_steps: 4
"""
TURN = {
    "tool_calls": [{"name": "calculator", "arguments": {"expression": "(17 + 25) * 3"}, "fragments": 3}],
    "usage": {"input_tokens": 120, "output_tokens": 12},
}


async def wait_ready(address: str, proc: Proc, timeout_s: float = 120.0, health: bool = True) -> None:
    """Until ``address`` answers its health check with SERVING (or, with ``health`` False, answers
    at all): the orchestrator stays NOT_SERVING here because retrieval is not started."""
    async with grpc.aio.insecure_channel(address) as channel:
        deadline = time.monotonic() + timeout_s
        while True:
            if health and await check_health(channel):
                return
            if not health:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await agent_pb2_grpc.AgentServiceStub(channel).ListAgents(
                        agent_pb2.ListAgentsRequest(), metadata=MD, timeout=1
                    )
                    return
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited; see {proc.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} not ready after {timeout_s} s; see {proc.log_path}")
            await asyncio.sleep(0.2)


async def level(stub: agent_pb2_grpc.AgentServiceStub, concurrency: int, seconds: float) -> dict:
    """Runs back to back from ``concurrency`` clients; the step events and run times measured."""
    overhead, duration, model, tools, runs_ms = [], [], [], [], []
    errors = 0
    start = time.perf_counter()
    measure_from = start + WARMUP_S
    stop_at = measure_from + seconds

    async def client(c: int) -> None:
        nonlocal errors
        n = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            n += 1
            request = agent_pb2.RunRequest(session_id=f"bench-{concurrency}-{c}-{n}", input="What is (17+25)*3?",
                                           agent="bench")
            steps = []
            try:
                async for event in stub.Run(request, metadata=MD, timeout=60):
                    if event.WhichOneof("event") == "step_completed":
                        steps.append(event.step_completed)
                    elif event.WhichOneof("event") == "final" and event.final.status != agent_pb2.RUN_STATUS_MAX_STEPS:
                        errors += 1
            except grpc.aio.AioRpcError as exc:
                errors += 1
                print(f"run failed: {exc.code().name}: {exc.details()}", flush=True)
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at + 30:
                runs_ms.append((t1 - t0) * 1000)
                for s in steps:
                    overhead.append(s.overhead_ms)
                    duration.append(s.duration_ms)
                    model.append(s.model_ms)
                    tools.append(s.tools_ms)

    await asyncio.gather(*(client(c) for c in range(concurrency)))
    elapsed = time.perf_counter() - measure_from
    return {
        "overhead": latency_stats(overhead),
        "step": latency_stats(duration),
        "model": latency_stats(model),
        "tools": latency_stats(tools),
        "run": latency_stats(runs_ms),
        "steps": len(overhead),
        "runs": len(runs_ms),
        "steps_per_s": round(len(overhead) / elapsed, 1),
        "errors": errors,
    }


async def bench(seconds: float) -> dict:
    load_at_start = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="bench-orchestrator-"))
    logs = root / "logs"
    agents = root / "agents.yaml"
    agents.write_text(AGENT_YAML)
    # Enough identical turns for every level (the fake refuses a request once they run out).
    script = root / "turns.json"
    script.write_text(json.dumps([TURN] * 60_000))
    ports = {k: free_port() for k in ("redis", "runs_redis", "fake", "llm", "memory", "tools", "orchestrator")}
    redis_url = f"redis://127.0.0.1:{ports['redis']}/0"
    procs: list[Proc] = []
    runs_redis = redis.Redis(port=ports["runs_redis"])
    try:
        procs.append(start_redis(ports["redis"], root / "redis", logs))
        procs.append(start_redis(ports["runs_redis"], root / "runs-redis", logs))
        fake = spawn("fake-openai", [sys.executable, "-m", "tests.fakes.openai_server", "--port", str(ports["fake"]),
                                     "--script", str(script)], logs)
        procs.append(fake)
        env = {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **{f"AGENTMESH_{k.upper()}_PORT": str(ports[k]) for k in ("llm", "memory", "tools", "orchestrator")},
            **{f"AGENTMESH_{k.upper()}_ADDRESS": f"127.0.0.1:{ports[k]}" for k in ("llm", "memory", "tools")},
            "AGENTMESH_RETRIEVAL_ADDRESS": f"127.0.0.1:{free_port()}",  # not started
            "AGENTMESH_LLM_PROVIDER": "openai",
            "AGENTMESH_LLM_OPENAI_BASE_URL": f"http://127.0.0.1:{ports['fake']}/v1",
            "AGENTMESH_LLM_OPENAI_API_KEY": "sk-bench",
            "AGENTMESH_LLM_MODEL": "gpt-4o-mini",
            "AGENTMESH_LLM_FALLBACK_TO_EXTRACTIVE": "false",
            "AGENTMESH_MEMORY_REDIS_URL": redis_url,
            "AGENTMESH_MEMORY_FACTS_ENABLED": "false",
            "AGENTMESH_MEMORY_COMPACTION_TRIGGER_TOKENS": "0",
            "AGENTMESH_TOOLS_PYTHON_ENABLED": "false",
            "AGENTMESH_ORCHESTRATOR_REDIS_URL": f"redis://127.0.0.1:{ports['runs_redis']}/0",
            "AGENTMESH_ORCHESTRATOR_AGENTS_PATH": str(agents),
        }
        def serve(kind: str) -> Proc:
            proc = spawn(kind, [sys.executable, "-m", "agentmesh.services.cli.main", "serve", kind], logs, env)
            procs.append(proc)
            return proc

        dependencies = {kind: serve(kind) for kind in ("llm", "memory", "tools")}
        for kind, proc in dependencies.items():
            await wait_ready(f"127.0.0.1:{ports[kind]}", proc)
        orchestrator = serve("orchestrator")  # last: its dependencies answer from its first call on
        address = f"127.0.0.1:{ports['orchestrator']}"
        await wait_ready(address, orchestrator, health=False)
        server = psutil.Process(orchestrator.pid)
        # Every process of the benchmark shares the machine's cores: their CPU shows how busy it is.
        this = "load generator (this)"
        processes = {this: psutil.Process()}
        for proc in procs:
            processes[proc.name if proc.name not in processes else f"{proc.name}-{proc.pid}"] = psutil.Process(proc.pid)
        meter = CpuMeter(processes, own_only={this})
        rows = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            request = agent_pb2.RunRequest(session_id="bench-check", input="What is (17+25)*3?", agent="bench")
            events = [e async for e in stub.Run(request, metadata=MD, timeout=60)]
            if events[-1].final.status != agent_pb2.RUN_STATUS_MAX_STEPS or events[-1].final.steps != STEPS_PER_RUN:
                raise RuntimeError(f"the check run did not make {STEPS_PER_RUN} steps: {events[-1]}")
            for concurrency in CONCURRENCY:
                cpu_before = sum(server.cpu_times()[:2])
                meter.start()
                runs_redis.config_resetstat()
                result = await level(stub, concurrency, seconds)
                cpu_s = sum(server.cpu_times()[:2]) - cpu_before
                all_cpu = meter.stop()
                commands = runs_redis.info("commandstats")
                # CPU of the warm-up's steps too: spread over every step made in the level.
                all_steps = result["steps"] * (seconds + WARMUP_S) / seconds
                redis_calls = sum(v["calls"] for k, v in commands.items() if k != "cmdstat_config")
                scripts = commands.get("cmdstat_evalsha", {}).get("calls", 0) + commands.get("cmdstat_eval", {}).get("calls", 0)
                o, r = result["overhead"], result["run"]
                row = {
                    "concurrent_runs": concurrency,
                    "steps": result["steps"],
                    "steps_per_s": result["steps_per_s"],
                    "overhead_p50_ms": o.get("p50_ms"),
                    "overhead_p99_ms": o.get("p99_ms"),
                    "step_p50_ms": result["step"].get("p50_ms"),
                    "model_p50_ms": result["model"].get("p50_ms"),
                    "tools_p50_ms": result["tools"].get("p50_ms"),
                    "cpu_ms_per_step": round(cpu_s * 1000 / max(1.0, all_steps), 3),
                    # Every process (mesh, fake model, Redis, this load generator), per step.
                    "all_cpu_ms_per_step": round(sum(all_cpu.values()) * 1000 / max(1.0, all_steps), 3),
                    "cpu_ms_per_step_by_process": {
                        name: round(cpu * 1000 / max(1.0, all_steps), 3) for name, cpu in all_cpu.items()
                    },
                    "cores_busy": round(sum(all_cpu.values()) / (seconds + WARMUP_S), 2),
                    "machine_busy_pct": meter.busy_pct,
                    "redis_commands_per_step": round(redis_calls / max(1.0, all_steps), 2),
                    "redis_scripts_per_step": round(scripts / max(1.0, all_steps), 2),
                    "run_p50_ms": r.get("p50_ms"),
                    "run_p99_ms": r.get("p99_ms"),
                    "errors": result["errors"],
                    **{f"{k}_stats": result[k] for k in ("overhead", "step", "model", "tools", "run")},
                }
                rows.append(row)
                print(f"{concurrency} runs: overhead p50 {o.get('p50_ms')} ms, p99 {o.get('p99_ms')} ms per step; "
                      f"{result['steps_per_s']} steps/s; CPU {row['cpu_ms_per_step']} ms/step "
                      f"({row['all_cpu_ms_per_step']} ms/step all processes, {row['cores_busy']} cores, "
                      f"machine {row['machine_busy_pct']} % busy); "
                      f"Redis {row['redis_scripts_per_step']} scripts / {row['redis_commands_per_step']} commands "
                      "per step", flush=True)
        orchestrator_rss = rss_mb(orchestrator.pid)
    finally:
        runs_redis.close()
        for proc in reversed(procs):
            proc.stop()
    columns = ["concurrent_runs", "steps", "steps_per_s", "overhead_p50_ms", "overhead_p99_ms", "step_p50_ms",
               "model_p50_ms", "tools_p50_ms", "cpu_ms_per_step", "all_cpu_ms_per_step", "machine_busy_pct",
               "redis_scripts_per_step", "run_p50_ms", "run_p99_ms", "errors"]
    print_table(f"orchestrator overhead per step ({STEPS_PER_RUN} steps per run)", rows, columns)
    plot_latency("orchestrator", {
        "overhead p50": [(r["concurrent_runs"], r["overhead_p50_ms"]) for r in rows],
        "overhead p99": [(r["concurrent_runs"], r["overhead_p99_ms"]) for r in rows],
    }, "concurrent runs", "orchestrator overhead per step (ms)")
    return {
        "setup": {
            "seconds_per_level": seconds,
            "warmup_s": WARMUP_S,
            "steps_per_run": STEPS_PER_RUN,
            "agent": AGENT_YAML,
            "model": "tests.fakes.openai_server (scripted, threaded), every turn one streamed calculator call",
            "services": "orchestrator, llm router, memory, tools: one process each (agentmesh serve); Redis with AOF "
            "(one for the runs, one for sessions and tool idempotency)",
            "logs": str(logs),
            "load_average_at_start": load_at_start,
        },
        "target": {
            "overhead_p50_ms": TARGET_P50_MS,
            "met": {r["concurrent_runs"]: (r["overhead_p50_ms"] or 1e9) <= TARGET_P50_MS for r in rows},
        },
        "orchestrator_rss_mb": orchestrator_rss,
        "levels": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="measured seconds per concurrency level")
    args = parser.parse_args()
    freeze_gc()
    write_json("orchestrator", asyncio.run(bench(args.seconds)))


if __name__ == "__main__":
    main()
