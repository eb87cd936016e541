"""Prometheus metrics, JSON logs with trace ids, and OTLP export of a service's spans.

In process: the RPC metrics of the runtime interceptor against a probe service's real calls.
As a process (``agentmesh serve orchestrator``, exactly as the runner and the container start
it): ``AGENTMESH_ORCHESTRATOR_METRICS_PORT`` opens ``/metrics``, the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` sends its spans to an OTLP receiver, and its stderr is JSON lines
carrying the caller's trace id.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.services.cli.processes import free_port, spawn
from agentmesh.services.runtime.settings import SERVICE_NAMES
from tests.gateway.probes import ProbeService
from tests.support import running_service
from tests.telemetry.collector import otlp_receiver

pytestmark = pytest.mark.timeout(120)
AGENT = SERVICE_NAMES["orchestrator"]


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    async with httpx.AsyncClient(timeout=5) as client:
        reply = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert reply.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def labels(method: str, grpc_type: str, **extra: str) -> tuple:
    return tuple(sorted({"grpc_service": AGENT, "grpc_method": method, "grpc_type": grpc_type, **extra}.items()))


async def test_rpc_counts_by_method_and_code_latency_and_in_flight_streams():
    probe = ProbeService("orchestrator")
    probe.settings.metrics_port = metrics_port = free_port()
    async with running_service(probe) as address, grpc.aio.insecure_channel(address) as channel:
        before = await scrape(metrics_port)
        whoami = channel.unary_unary(f"/{AGENT}/Whoami")
        for _ in range(3):
            await whoami(b"", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await whoami(b"", metadata=(("x-probe-fail-first", "yes"), ("x-probe-call", uuid.uuid4().hex)), timeout=5)

        stream = agent_pb2_grpc.AgentServiceStub(channel).Run(
            agent_pb2.RunRequest(session_id="m", input="0.3", max_steps=2), timeout=10
        )
        await stream.read()
        during = await scrape(metrics_port)
        rest = []
        while (event := await stream.read()) != grpc.aio.EOF:
            rest.append(event)
        await asyncio.sleep(0.1)
        after = await scrape(metrics_port)

    def delta(name: str, key: tuple) -> float:
        return after.get((name, key), 0.0) - before.get((name, key), 0.0)

    assert delta("grpc_server_handled_total", labels("Whoami", "unary", grpc_code="OK")) == 3
    assert delta("grpc_server_handled_total", labels("Whoami", "unary", grpc_code="UNAVAILABLE")) == 1
    assert delta("grpc_server_started_total", labels("Whoami", "unary")) == 4
    assert delta("grpc_server_handling_seconds_count", labels("Whoami", "unary")) == 4
    run = labels("Run", "server_stream")
    assert delta("grpc_server_handled_total", labels("Run", "server_stream", grpc_code="OK")) == 1
    assert delta("grpc_server_msg_sent_total", run) == 1 + len(rest) == 4  # started, 2 deltas, final
    # The stream lasted ~0.6 s (2 x 0.3 s): counted in the 2.5 s bucket, not in the 0.5 s one.
    assert delta("grpc_server_handling_seconds_bucket", labels("Run", "server_stream", le="2.5")) == 1
    assert delta("grpc_server_handling_seconds_bucket", labels("Run", "server_stream", le="0.5")) == 0
    assert during[("grpc_server_in_flight", run)] == before.get(("grpc_server_in_flight", run), 0) + 1
    assert after[("grpc_server_in_flight", run)] == before.get(("grpc_server_in_flight", run), 0)


@pytest.mark.timeout(180)
async def test_a_service_process_serves_metrics_exports_spans_and_logs_trace_ids(tmp_path):
    grpc_port, metrics_port, closed = free_port(), free_port(), free_port()
    async with otlp_receiver() as (receiver, receiver_address):
        env = {
            "AGENTMESH_ORCHESTRATOR_PORT": str(grpc_port),
            "AGENTMESH_ORCHESTRATOR_METRICS_PORT": str(metrics_port),
            # No dependency is running: a Run fails fast with UNAVAILABLE, which is all we need.
            **{f"AGENTMESH_{kind.upper()}_ADDRESS": f"127.0.0.1:{closed}" for kind in SERVICE_NAMES if kind != "orchestrator"},
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver_address}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        proc = spawn("orchestrator", [sys.executable, "-m", "agentmesh.services.cli.main", "serve", "orchestrator"], tmp_path, env)
        try:
            metrics = None
            for _ in range(150):
                try:
                    metrics = await scrape(metrics_port)
                    break
                except httpx.TransportError:
                    assert proc.alive(), proc.log_path.read_text()
                    await asyncio.sleep(0.2)
            assert metrics is not None, "no /metrics endpoint"
            assert any(name == "process_resident_memory_bytes" for name, _ in metrics)

            trace_id, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
            metadata = (("traceparent", f"00-{trace_id}-{caller_span}-01"), ("x-tenant-id", "acme"), ("x-subject", "alice"))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stub.Run(agent_pb2.RunRequest(session_id="p", input="hi"), metadata=metadata, timeout=10):
                        pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

            (server_span,) = await receiver.wait_for(lambda s: s.trace_id == trace_id and s.name.endswith("/Run"))
            assert server_span.service == "agentmesh-orchestrator" and server_span.parent_span_id == caller_span
            after = await scrape(metrics_port)
            handled = ("grpc_server_handled_total", labels("Run", "server_stream", grpc_code="UNAVAILABLE"))
            assert after[handled] == 1
            # The start-up heap was frozen after one full collection, and collections are timed.
            assert after[("python_gc_frozen_objects", ())] > 10_000
            assert after[("python_gc_pause_seconds_count", (("generation", "2"),))] >= 1
            assert after[("python_gc_pause_seconds_count", (("generation", "0"),))] >= 1
        finally:
            proc.stop(10)

    lines = [json.loads(line) for line in proc.log_path.read_text().splitlines() if line.startswith("{")]
    (finished,) = [line for line in lines if line.get("msg") == "rpc finished" and line.get("method", "").endswith("/Run")]
    assert finished["code"] == "UNAVAILABLE"
    assert finished["trace_id"] == trace_id and finished["span_id"] == server_span.span_id
    assert (finished["tenant"], finished["subject"]) == ("acme", "alice")
