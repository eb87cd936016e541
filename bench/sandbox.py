"""Sandbox start latency: from asking for a ``python`` run to its first byte of output.

Run: ``.venv/bin/python -m bench.sandbox`` (``make bench-sandbox``); ``--runs N`` per row
(default 200). Writes ``bench/results/sandbox.json`` and prints a table. Takes well under a
minute. Needs what the sandbox needs (Linux, root, kernel >= 5.12); elsewhere it reports why it
cannot run and writes nothing.

The program is ``print("ready")``. Each run pays for the whole isolation: a launcher process
(``python -I -S``), new mount, network and PID namespaces, the read-only remount and the private
tmpfs mounts, an init, the rlimits and uid switch, and the sandbox interpreter's own start-up
(``python -I``), which is most of it. Rows:

- ``direct, 1 at a time``: :meth:`Sandbox.run` called in this process, time to the first stdout
  chunk;
- ``direct, 2 at a time``: two runs at once (one per core; ``slots=2``), the same figure per run;
- ``gRPC ExecuteTool``: one tool service in this process, a client on a real channel; time from
  sending ``ExecuteTool`` to receiving the first ``OUTPUT_STREAM_STDOUT`` progress event, so it
  includes the service's argument validation, the progress queue and gRPC streaming.

Target (issue 6): p50 <= 150 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import grpc
from google.protobuf import struct_pb2

from agentmesh.services.tools.sandbox import Sandbox, SandboxLimits
from agentmesh.services.tools.service import ToolsService, ToolsSettings
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from bench.common import latency_stats, print_table, rss_mb, write_json
from tests.support import running_service

CODE = 'print("ready")\n'
TARGET_P50_MS = 150.0


async def first_output_ms(sandbox: Sandbox) -> float:
    started = time.perf_counter()
    first: list[float] = []

    async def on_output(stream: int, text: str) -> None:
        if not first:
            first.append((time.perf_counter() - started) * 1000)

    result = await sandbox.run(CODE, on_output)
    if result.exit_code != 0 or not first:
        raise RuntimeError(f"the benchmark program failed: {result}")
    return first[0]


async def direct(sandbox: Sandbox, runs: int, concurrency: int) -> list[float]:
    samples: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            samples.append(await first_output_ms(sandbox))

    share = [runs // concurrency + (1 if i < runs % concurrency else 0) for i in range(concurrency)]
    await asyncio.gather(*(worker(n) for n in share))
    return samples


async def through_grpc(runs: int) -> list[float]:
    settings = ToolsSettings(python_slots=2, python_uid_base=740_000, log_level="WARNING")
    arguments = struct_pb2.Struct()
    arguments.update({"code": CODE})
    request = tools_pb2.ExecuteToolRequest(name="python", arguments=arguments, tool_call_id="bench")
    samples: list[float] = []
    async with running_service(ToolsService(settings, mesh=None)) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = tools_pb2_grpc.ToolServiceStub(channel)
            for _ in range(runs):
                started = time.perf_counter()
                first = None
                async for item in stub.ExecuteTool(request, timeout=30):
                    if first is None and item.progress.stream == tools_pb2.OUTPUT_STREAM_STDOUT:
                        first = (time.perf_counter() - started) * 1000
                    if item.WhichOneof("event") == "result" and item.result.is_error:
                        raise RuntimeError(f"the benchmark program failed: {item.result.error_message}")
                assert first is not None
                samples.append(first)
    return samples


async def main(runs: int) -> None:
    sandbox = Sandbox(SandboxLimits(), uid_base=730_000, slots=2)
    reason = await sandbox.probe()
    if reason:
        print(f"the sandbox cannot run on this machine: {reason}")
        return
    for _ in range(5):  # warm the page cache and the interpreter's imports
        await first_output_ms(sandbox)
    load_before = os.getloadavg()[0]
    rows = []
    for label, samples in (
        ("direct, 1 at a time", await direct(sandbox, runs, 1)),
        ("direct, 2 at a time", await direct(sandbox, runs, 2)),
        ("gRPC ExecuteTool", await through_grpc(runs)),
    ):
        rows.append({"path": label, **latency_stats(samples)})
    print_table(
        f"sandbox start to first output, ms (python {sandbox.python_version}; target p50 <= {TARGET_P50_MS:g} ms)",
        rows,
        ["path", "n", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"],
    )
    write_json(
        "sandbox",
        {
            "program": CODE,
            "sandbox_python": sandbox.python_version,
            "target_p50_ms": TARGET_P50_MS,
            "start_to_first_output": rows,
            # Other work on the machine inflates these figures; the 1-minute load average says how much.
            "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
            "bench_process_rss_mb": rss_mb(),
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs per row (default 200)")
    asyncio.run(main(parser.parse_args().runs))
