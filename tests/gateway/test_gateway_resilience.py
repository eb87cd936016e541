"""Resilience of the gateway against a real Envoy: which calls are retried on UNAVAILABLE, and an
upstream replica killed mid-test (SIGKILL, streams in flight) being ejected while traffic goes on
on the remaining replica."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

import grpc
import pytest

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.services.cli.processes import envoy_admin_get, spawn
from agentmesh.services.cli.runner import health_status
from agentmesh.services.runtime.settings import SERVICE_NAMES
from tests.gateway.conftest import Gateway, distinct_free_ports, envoy_in_front_of, whoami

pytestmark = pytest.mark.timeout(120)


def fail_first(token: str) -> tuple[tuple[str, str], ...]:
    """Metadata that makes a probe answer UNAVAILABLE the first time it sees ``token``."""
    return (("x-probe-fail-first", "yes"), ("x-probe-call", token))


@pytest.mark.parametrize(
    ("kind", "method"),
    [
        ("retrieval", "Search"),
        ("tools", "ListTools"),
        ("memory", "GetContext"),
        ("llm", "ListModels"),
    ],
)
async def test_unavailable_is_retried_for_idempotent_reads(gateway: Gateway, kind, method):
    reply = await whoami(gateway.address, kind, fail_first(uuid.uuid4().hex), method=method)
    assert reply["attempts"] == 2  # the first attempt failed, Envoy's retry succeeded


@pytest.mark.parametrize(
    ("kind", "method"),
    [
        ("tools", "ExecuteTool"),
        ("retrieval", "IngestDocuments"),
        ("memory", "AppendMessages"),
        ("llm", "Generate"),
        ("orchestrator", "Cancel"),  # any other AgentService method
    ],
)
async def test_unavailable_is_not_retried_for_calls_with_effects(gateway: Gateway, kind, method):
    token = uuid.uuid4().hex
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await whoami(gateway.address, kind, fail_first(token), method=method)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The upstream saw exactly one attempt: the next call with the same token is its second.
    assert (await whoami(gateway.address, kind, (("x-probe-call", token),), method=method))["attempts"] == 2


def _stats(admin_port: int, prefix: str) -> dict[str, int]:
    code, body = envoy_admin_get(admin_port, f"/stats?format=json&filter=^{prefix}")
    assert code == 200, body
    return {s["name"].removeprefix(prefix): s["value"] for s in json.loads(body)["stats"] if "value" in s}


async def _wait_serving(address: str, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await asyncio.to_thread(health_status, address, SERVICE_NAMES["orchestrator"]) != "SERVING":
        assert loop.time() < deadline, f"probe at {address} not SERVING"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(180)
async def test_a_killed_replica_is_ejected_and_traffic_continues_on_the_other(tmp_path):
    port_a, port_b, closed = distinct_free_ports(3)
    replicas = {}
    for name, port in (("a", port_a), ("b", port_b)):
        argv = [sys.executable, "-m", "tests.gateway.probes", "--kind", "orchestrator", "--replica", name, "--port", str(port)]
        replicas[name] = spawn(f"probe-{name}", argv, tmp_path / "logs")
    try:
        await asyncio.gather(*(_wait_serving(f"127.0.0.1:{p}") for p in (port_a, port_b)))
        upstreams = {kind: f"127.0.0.1:{closed}" for kind in SERVICE_NAMES} | {"orchestrator": f"127.0.0.1:{port_a}"}

        def second_replica(config: dict) -> None:
            # What a headless Service with two ready pods gives STRICT_DNS: two endpoints.
            cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "orchestrator")
            endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            endpoints.append({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port_b}}}})

        async with envoy_in_front_of(upstreams, tmp_path / "envoy", edit=second_replica) as gw:
            seen = {(await whoami(gw.address, "orchestrator"))["replica"] for _ in range(6)}
            assert seen == {"a", "b"}, "round robin over both replicas"

            # Two long Run streams: round robin puts one on each replica.
            async with grpc.aio.insecure_channel(gw.address) as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                request = agent_pb2.RunRequest(session_id="kill", input="0.25", max_steps=12)
                calls = [stub.Run(request, timeout=30) for _ in range(2)]
                firsts = [await call.read() for call in calls]
                on = {first.started.run_id[-1]: call for first, call in zip(firsts, calls, strict=True)}
                assert set(on) == {"a", "b"}
                await on["a"].read()  # both streams are flowing
                await on["b"].read()

                replicas["b"].popen.kill()  # SIGKILL: no goodbye, no health status change
                replicas["b"].popen.wait(10)

                with pytest.raises(grpc.aio.AioRpcError) as info:
                    while await on["b"].read() != grpc.aio.EOF:
                        pass
                # Its stream dies with it: the response had started, so Envoy can only reset the
                # client's stream (RST_STREAM), which gRPC reports as INTERNAL; no `final` came.
                assert info.value.code() == grpc.StatusCode.INTERNAL
                assert "RST_STREAM" in info.value.details()
                rest = []
                while (event := await on["a"].read()) != grpc.aio.EOF:
                    rest.append(event)
                assert rest[-1].WhichOneof("event") == "final"  # the other replica's stream completes

            # Traffic continues: every call succeeds (a call that picks the dead replica fails to
            # connect and is retried on the other) and soon b is ejected.
            replies = [await whoami(gw.address, "orchestrator") for _ in range(20)]
            assert {r["replica"] for r in replies} == {"a"}
            stats = await asyncio.to_thread(_stats, gw.admin_port, "cluster.orchestrator.")
            assert stats["outlier_detection.ejections_active"] == 1
            assert stats["outlier_detection.ejections_enforced_consecutive_local_origin_failure"] >= 1
            assert stats["upstream_cx_connect_fail"] >= 1
            retried = stats["upstream_rq_retry"]
            # Once b is ejected no call even tries it: no more retries.
            await asyncio.gather(*(whoami(gw.address, "orchestrator") for _ in range(10)))
            after = await asyncio.to_thread(_stats, gw.admin_port, "cluster.orchestrator.")
            assert after["upstream_rq_retry"] == retried
            assert after["outlier_detection.ejections_active"] == 1
    finally:
        for proc in replicas.values():
            proc.stop(5)
