"""The gateway config from gateway/envoy.yaml: it validates, and a real Envoy built from it routes
gRPC calls (unary and server-streaming) to the right service with tenant, request id and deadline
intact."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.services.cli.gateway import render_envoy_config, validate_with_envoy
from agentmesh.services.runtime.settings import DEFAULT_PORTS, SERVICE_NAMES
from tests.gateway.conftest import Gateway, distinct_free_ports, envoy_in_front_of, whoami

pytestmark = pytest.mark.timeout(120)

LOCAL_UPSTREAMS = {kind: f"127.0.0.1:{port}" for kind, port in DEFAULT_PORTS.items()}


def test_local_render_passes_envoy_validate(tmp_path):
    config = tmp_path / "envoy.yaml"
    config.write_text(render_envoy_config(8080, 9901, LOCAL_UPSTREAMS))
    validate_with_envoy(config)

    parsed = yaml.safe_load(config.read_text())
    assert parsed["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    listener = parsed["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}
    endpoints = {
        c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        for c in parsed["static_resources"]["clusters"]
    }
    assert endpoints == {k: {"address": "127.0.0.1", "port_value": p} for k, p in DEFAULT_PORTS.items()} | {
        "otlp_collector": {"address": "127.0.0.1", "port_value": 4317},
        "envoy_admin": {"address": "127.0.0.1", "port_value": 9901},  # only behind the stats listener
    }
    stats = parsed["static_resources"]["listeners"][1]
    assert stats["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9902}
    stats_routes = stats["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert sorted(r["match"]["path"] for r in stats_routes) == ["/ready", "/stats/prometheus"]


def test_cluster_render_with_dns_names_passes_envoy_validate(tmp_path):
    # The shape the Helm chart renders: listener on all interfaces, headless-Service DNS names.
    upstreams = {k: f"agentmesh-{k}-headless.agentmesh.svc.cluster.local:{p}" for k, p in DEFAULT_PORTS.items()}
    config = tmp_path / "envoy.yaml"
    config.write_text(render_envoy_config(8080, 9901, upstreams, listen_address="0.0.0.0"))
    validate_with_envoy(config)
    parsed = yaml.safe_load(config.read_text())
    assert parsed["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"  # admin never public


STREAMING_METHODS = {
    "/agentmesh.agent.v1.AgentService/Run",
    "/agentmesh.llm.v1.LLMService/StreamGenerate",
    "/agentmesh.llm.v1.LLMService/Generate",  # unary, but as long as a whole generation
    "/agentmesh.memory.v1.MemoryService/WatchSession",
    "/agentmesh.retrieval.v1.RetrievalService/IngestDocuments",
    "/agentmesh.tools.v1.ToolService/ExecuteTool",
}
IDEMPOTENT_METHODS = {
    "/agentmesh.retrieval.v1.RetrievalService/Search",
    "/agentmesh.llm.v1.LLMService/ListModels",
    "/agentmesh.tools.v1.ToolService/ListTools",
    "/agentmesh.memory.v1.MemoryService/GetContext",
    "/agentmesh.memory.v1.MemoryService/ListMessages",
    "/grpc.health.v1.Health/Check",
}


def _route_for(routes: list[dict], path: str) -> dict:
    """The first route whose match takes a gRPC call to ``path`` (Envoy's first-match rule)."""
    for route in routes:
        match = route["match"]
        if "headers" in match:  # the OPTIONS (CORS preflight) route
            continue
        if match.get("path") == path or ("prefix" in match and path.startswith(match["prefix"])):
            return route
        if "safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path):
            return route
    raise AssertionError(f"no route for {path}")


def test_routes_cover_every_service_with_grpc_timeouts_and_safe_retries():
    parsed = yaml.safe_load(render_envoy_config(8080, 9901, LOCAL_UPSTREAMS))
    hcm = parsed["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    for kind, name in SERVICE_NAMES.items():
        assert _route_for(routes, f"/{name}/Anything")["route"]["cluster"] == kind
    for route in routes:
        action = route.get("route")
        if action is None:
            assert route["match"] == {"prefix": "/"} and route["direct_response"]["status"] == 404
            continue
        assert action["timeout"] in ("0s", "5s")  # 5 s: the CORS preflight route, answered by Envoy
    for path in STREAMING_METHODS | IDEMPOTENT_METHODS | {"/agentmesh.memory.v1.MemoryService/AppendMessages"}:
        action = _route_for(routes, path)["route"]
        # The client's deadline always wins; without one a stream is bounded only by the idle
        # timeout and a unary call by 120 s.
        expected = {"grpc_timeout_header_max": "0s"}
        if path not in STREAMING_METHODS and not path.startswith("/grpc.health.v1."):  # Watch streams
            expected["max_stream_duration"] = "120s"
        assert action["max_stream_duration"] == expected, path
        retry_on = set(action["retry_policy"]["retry_on"].split(","))
        # UNAVAILABLE is retried only where repeating the call is harmless.
        assert ("unavailable" in retry_on) == (path in IDEMPOTENT_METHODS), path
        assert {"connect-failure", "refused-stream", "reset-before-request"} <= retry_on
        assert action["retry_policy"]["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert hcm["stream_idle_timeout"] == "300s"
    assert hcm["codec_type"] == "AUTO"
    assert hcm["generate_request_id"] is True


def test_every_upstream_cluster_has_outlier_detection_and_circuit_breakers():
    parsed = yaml.safe_load(render_envoy_config(8080, 9901, LOCAL_UPSTREAMS))
    clusters = {c["name"]: c for c in parsed["static_resources"]["clusters"]}
    for kind in SERVICE_NAMES:
        cluster = clusters[kind]
        outlier = cluster["outlier_detection"]
        assert outlier["consecutive_local_origin_failure"] == 3 and outlier["enforcing_consecutive_local_origin_failure"] == 100
        assert outlier["consecutive_5xx"] == 5 and outlier["max_ejection_percent"] == 50
        thresholds = cluster["circuit_breakers"]["thresholds"][0]
        assert thresholds["max_requests"] == thresholds["max_pending_requests"] == thresholds["max_connections"] == 1024
        assert thresholds["retry_budget"]["budget_percent"]["value"] == 20.0
        assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == SERVICE_NAMES[kind]


def test_edge_limits_and_overload_manager():
    parsed = yaml.safe_load(render_envoy_config(8080, 9901, LOCAL_UPSTREAMS))
    overload = parsed["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == 1 << 30
    assert monitors["envoy.resource_monitors.global_downstream_max_connections"]["max_active_downstream_connections"] == 10000
    assert {a["name"] for a in overload["actions"]} >= {
        "envoy.overload_actions.shrink_heap",
        "envoy.overload_actions.stop_accepting_requests",
        "envoy.overload_actions.reset_high_memory_stream",
    }
    listener = parsed["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 32768
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["use_remote_address"] is True and hcm["normalize_path"] is True
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
    assert hcm["max_request_headers_kb"] == 60
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 100
    assert hcm["http2_protocol_options"]["initial_stream_window_size"] == 65536


async def test_each_service_prefix_reaches_its_own_upstream(gateway: Gateway):
    for kind in SERVICE_NAMES:
        reply = await whoami(gateway.address, kind)
        assert reply["kind"] == kind


async def test_tenant_metadata_reaches_the_upstream(gateway: Gateway):
    reply = await whoami(gateway.address, "retrieval", metadata=(("x-tenant-id", "acme-42"),))
    assert reply["tenant"] == "acme-42"
    assert reply["metadata"]["x-tenant-id"] == "acme-42"


async def test_request_id_is_generated_when_absent_and_kept_when_sent(gateway: Gateway):
    generated = await whoami(gateway.address, "memory")
    # Envoy's generated id is a UUID; the interceptor put the same one in the call's context.
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", generated["request_id"])
    assert generated["metadata"]["x-request-id"] == generated["request_id"]

    # Both a free-form id and a UUID (which Envoy would alter to pack its trace decision) pass
    # unchanged, call after call.
    for mine in (f"client-{uuid.uuid4().hex[:12]}", str(uuid.uuid4()), str(uuid.uuid4())):
        kept = await whoami(gateway.address, "memory", metadata=(("x-request-id", mine),))
        assert kept["request_id"] == mine


async def test_client_deadline_reaches_the_upstream(gateway: Gateway):
    reply = await whoami(gateway.address, "llm", timeout=5.0)
    # grpc-timeout is sent rounded up to its unit, hence the small margin.
    assert reply["deadline_s"] is not None and 3.0 < reply["deadline_s"] <= 5.1
    no_deadline = await whoami(gateway.address, "llm", timeout=None)
    assert no_deadline["deadline_s"] is None


async def test_server_stream_arrives_event_by_event(gateway: Gateway):
    request = agent_pb2.RunRequest(session_id="s1", input="0.3", max_steps=5)
    arrivals: list[tuple[float, agent_pb2.RunResponse]] = []
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        start = time.monotonic()
        call = agent_pb2_grpc.AgentServiceStub(channel).Run(
            request, metadata=(("x-tenant-id", "streamer"),), timeout=30
        )
        async for event in call:
            arrivals.append((time.monotonic() - start, event))
        assert await call.code() == grpc.StatusCode.OK

    events = [e for _, e in arrivals]
    assert [e.sequence for e in events] == list(range(1, 8))
    assert events[0].WhichOneof("event") == "started" and events[0].started.request_id
    assert [e.text_delta.text for e in events[1:6]] == [f"{i}:streamer " for i in range(5)]
    assert events[-1].WhichOneof("event") == "final"
    # Not buffered: the first delta arrives long before the stream ends (5 x 0.3 s).
    first_delta_at, last_at = arrivals[1][0], arrivals[-1][0]
    assert last_at >= 1.4
    assert first_delta_at < last_at - 0.8


@pytest.mark.timeout(90)
async def test_stream_outlives_envoys_default_15s_route_timeout(gateway: Gateway):
    # Envoy's default route timeout (15 s) would cut this 16.5 s stream; the routes set 0s.
    request = agent_pb2.RunRequest(session_id="long", input="1.1", max_steps=15)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        events = [e async for e in agent_pb2_grpc.AgentServiceStub(channel).Run(request, timeout=60)]
    assert events[-1].WhichOneof("event") == "final"
    assert len(events) == 17


async def test_health_and_reflection_go_to_the_orchestrator(gateway: Gateway):
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAMES["orchestrator"]), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The orchestrator's health servicer does not know the LLM service: proof of where it went.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAMES["llm"]), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name async for r in responses for s in r.list_services_response.service}
    assert SERVICE_NAMES["orchestrator"] in names
    assert SERVICE_NAMES["llm"] not in names


async def test_unknown_service_is_unimplemented(gateway: Gateway):
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        call = channel.unary_unary("/agentmesh.billing.v1.BillingService/Charge")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_access_log_is_one_json_object_per_call(gateway: Gateway):
    request_id = f"log-{uuid.uuid4().hex}"
    await whoami(gateway.address, "tools", metadata=(("x-request-id", request_id), ("x-tenant-id", "acme")))
    deadline = time.monotonic() + 10
    entry = None
    while entry is None and time.monotonic() < deadline:
        for line in gateway.log_path.read_text().splitlines():
            if request_id in line:
                entry = json.loads(line)
        await asyncio.sleep(0.2)
    assert entry is not None, "no access log line for the call"
    assert entry["method"] == f"/{SERVICE_NAMES['tools']}/Whoami"
    assert entry["tenant"] == "acme"
    assert entry["grpc_status"] == "OK"
    assert entry["upstream_cluster"] == "tools"
    assert entry["upstream_host"] == gateway.upstreams["tools"]
    assert isinstance(entry["duration_ms"], int)


async def test_unreachable_upstream_is_unavailable(tmp_path):
    closed = distinct_free_ports(1)[0]  # nothing listens there
    upstreams = {kind: f"127.0.0.1:{closed}" for kind in SERVICE_NAMES}
    async with envoy_in_front_of(upstreams, tmp_path) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await whoami(gw.address, "tools")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_real_tool_service_through_the_gateway(tmp_path):
    """The real tool service behind a real Envoy: unary and server-streaming calls answer as they
    do directly, and the service's own error statuses reach the client unchanged."""
    tools_service = pytest.importorskip("agentmesh.services.tools.service")
    from google.protobuf import struct_pb2

    from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
    from tests.support import running_service

    closed = distinct_free_ports(1)[0]
    async with running_service(tools_service.create()) as tools_address:
        upstreams = {kind: f"127.0.0.1:{closed}" for kind in SERVICE_NAMES} | {"tools": tools_address}
        async with envoy_in_front_of(upstreams, tmp_path) as gw:
            async with grpc.aio.insecure_channel(gw.address) as via_gw, grpc.aio.insecure_channel(tools_address) as direct:
                through = tools_pb2_grpc.ToolServiceStub(via_gw)
                listed = await through.ListTools(tools_pb2.ListToolsRequest(), timeout=5)
                assert listed == await tools_pb2_grpc.ToolServiceStub(direct).ListTools(tools_pb2.ListToolsRequest(), timeout=5)
                assert "calculator" in {t.name for t in listed.tools}

                args = struct_pb2.Struct()
                args.update({"expression": "17 * 23"})
                events = [
                    e async for e in through.ExecuteTool(
                        tools_pb2.ExecuteToolRequest(name="calculator", arguments=args, tool_call_id="call_1"), timeout=10
                    )
                ]
                assert events[-1].WhichOneof("event") == "result"
                assert events[-1].result.output.struct_value["result"] == 391

                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in through.ExecuteTool(tools_pb2.ExecuteToolRequest(name="no_such_tool"), timeout=5):
                        pass
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
                assert "no_such_tool" in info.value.details()


async def test_drain_waits_for_an_open_stream_to_finish(gateway: Gateway, tmp_path):
    """`agentmesh down` drains the gateway before stopping it: a stream in flight completes."""
    from agentmesh.services.cli.runner import drain_gateway

    async with envoy_in_front_of(gateway.upstreams, tmp_path) as gw:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Run(
                agent_pb2.RunRequest(session_id="drain", input="0.5", max_steps=4), timeout=30
            )
            first = await call.read()
            assert first.WhichOneof("event") == "started"

            def drain() -> tuple[int, float]:
                left = drain_gateway(gw.admin_port, 15.0)
                return left, time.monotonic()

            drained = asyncio.create_task(asyncio.to_thread(drain))
            rest = []
            while (event := await call.read()) != grpc.aio.EOF:
                rest.append(event)
            stream_ended = time.monotonic()
            left, drain_returned = await drained
            assert left == 0
            assert drain_returned >= stream_ended - 0.3  # the drain waited for the stream (4 x 0.5 s)
            assert rest[-1].WhichOneof("event") == "final" and len(rest) == 5
            assert await call.code() == grpc.StatusCode.OK
