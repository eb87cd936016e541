"""The gateway with authentication ON (gateway/envoy.yaml rendered with a JWKS and an API key
table), a real Envoy in front of the probe upstreams: who may call what, which identity reaches
the services, JSON transcoding, gRPC-Web, CORS, limits and the access log."""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agentmesh.agent.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.services.cli.gateway import GatewayOptions, RateLimits
from agentmesh.services.runtime.settings import SERVICE_NAMES
from tests.gateway.auth import ApiKeys, Issuer, bearer, write_credentials
from tests.gateway.conftest import Gateway, envoy_in_front_of, probe_upstreams, whoami

pytestmark = pytest.mark.timeout(120)

INGEST = "IngestDocuments"  # any RetrievalService method but Search is an admin method


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def api_keys() -> ApiKeys:
    return ApiKeys()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def secure(tmp_path_factory, issuer: Issuer, api_keys: ApiKeys) -> AsyncIterator[Gateway]:
    folder = tmp_path_factory.mktemp("secure-gateway")
    auth = write_credentials(folder / "credentials", issuer, api_keys)
    # Buckets large enough that only the rate-limit test (its own gateway) ever trips one.
    options = GatewayOptions(auth=auth, rate_limits=RateLimits(run=100, admin=100, default=1000))
    async with probe_upstreams() as upstreams, envoy_in_front_of(upstreams, folder, options) as gw:
        yield gw


async def call_code(gw: Gateway, kind: str, metadata=(), method: str = "Whoami") -> grpc.StatusCode:
    try:
        await whoami(gw.address, kind, metadata, method=method)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# ------------------------------------------------------------------------------ authentication


async def test_no_credentials_is_unauthenticated_for_unary_stream_and_reflection(secure: Gateway):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await whoami(secure.address, "tools")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == "Jwt is missing"

    async with grpc.aio.insecure_channel(secure.address) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Run(agent_pb2.RunRequest(session_id="s", input="0"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in responses]
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_needs_no_credentials(secure: Gateway):
    async with grpc.aio.insecure_channel(secure.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAMES["orchestrator"]), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("name", "claims", "code", "detail"),
    [
        ("expired", {"exp": int(time.time()) - 3600}, UNAUTHENTICATED, "Jwt is expired"),
        ("other issuer", {"iss": "https://evil.example/"}, UNAUTHENTICATED, "Jwt issuer is not configured"),
        ("no expiry", {"exp": None}, UNAUTHENTICATED, "Jwt verification fails"),  # require_expiration
        # A genuine token of our issuer, but minted for another service: Envoy's jwt_authn answers
        # 403, i.e. the caller is known but this gateway is not what the token allows.
        ("other audience", {"aud": "someone-else"}, grpc.StatusCode.PERMISSION_DENIED, "Audiences in Jwt are not allowed"),
    ],
)
async def test_invalid_tokens_are_refused(secure: Gateway, issuer: Issuer, name, claims, code, detail):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await whoami(secure.address, "tools", (bearer(issuer.token(**claims)),))
    assert info.value.code() == code, name
    assert detail.lower() in info.value.details().lower(), info.value.details()


async def test_token_signed_by_another_key_or_malformed_is_unauthenticated(secure: Gateway):
    forged = Issuer(kid="test-key-1").token()  # same kid, different private key
    assert await call_code(secure, "tools", (bearer(forged),)) == grpc.StatusCode.UNAUTHENTICATED
    assert await call_code(secure, "tools", (bearer("not.a.jwt"),)) == grpc.StatusCode.UNAUTHENTICATED


async def test_verified_identity_is_forwarded_and_client_identity_headers_are_replaced(secure: Gateway, issuer: Issuer):
    forged = (("x-subject", "mallory"), ("x-agentmesh-roles", "admin"))
    token = issuer.token(roles=["reader", "writer"])
    reply = await whoami(secure.address, "tools", (bearer(token), *forged))
    assert reply["tenant"] == "acme"  # the runtime's context, from the trusted header
    md = reply["metadata"]
    assert (md["x-tenant-id"], md["x-subject"], md["x-agentmesh-roles"]) == ("acme", "alice", "reader,writer")
    assert "authorization" not in md  # the token stops at the gateway
    assert "x-agentmesh-asked-tenant" not in md

    # The client may name its own tenant; it is checked, not believed, and the header the
    # gateway uses for the check cannot be forged either.
    same = await whoami(secure.address, "memory", (bearer(token), ("x-tenant-id", "acme")))
    assert same["tenant"] == "acme" and "x-agentmesh-asked-tenant" not in same["metadata"]
    forged_ask = await whoami(secure.address, "memory", (bearer(token), ("x-agentmesh-asked-tenant", "globex")))
    assert forged_ask["tenant"] == "acme"


# ------------------------------------------------------------------------------ authorization


async def test_another_tenants_resource_is_permission_denied(secure: Gateway, issuer: Issuer):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await whoami(secure.address, "memory", (bearer(issuer.token()), ("x-tenant-id", "globex")))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "another tenant" in info.value.details() and "'acme'" in info.value.details()


@pytest.mark.parametrize("tenant", [None, "", "no spaces allowed", "x" * 65, 42])
async def test_token_without_a_valid_tenant_is_permission_denied(secure: Gateway, issuer: Issuer, tenant):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await whoami(secure.address, "tools", (bearer(issuer.token(tenant=tenant)),))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "names no tenant" in info.value.details()


async def test_admin_methods_need_the_admin_role(secure: Gateway, issuer: Issuer):
    user = (bearer(issuer.token(roles=["reader"])),)
    admin = (bearer(issuer.token(roles=["reader", "admin"])),)
    scalar_admin = (bearer(issuer.token(roles="admin")),)  # a single-string claim counts too

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await whoami(secure.address, "retrieval", user, method=INGEST)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "this method needs the 'admin' role; the credential has: reader"
    assert await call_code(secure, "retrieval", user, method="CreateCollection") == grpc.StatusCode.PERMISSION_DENIED
    assert await call_code(secure, "memory", user, method="ForgetUser") == grpc.StatusCode.PERMISSION_DENIED
    # ... while the everyday methods of the same services are open to any user of the tenant.
    assert await call_code(secure, "retrieval", user, method="Search") == grpc.StatusCode.OK
    assert await call_code(secure, "memory", user, method="GetContext") == grpc.StatusCode.OK

    for credential in (admin, scalar_admin):
        reply = await whoami(secure.address, "retrieval", credential, method=INGEST)
        assert reply["metadata"]["x-agentmesh-roles"] in ("reader,admin", "admin")
    assert await call_code(secure, "memory", admin, method="ForgetUser") == grpc.StatusCode.OK


async def test_api_keys_authenticate_with_the_identity_of_their_table_line(secure: Gateway, api_keys: ApiKeys):
    reply = await whoami(secure.address, "tools", (("x-api-key", api_keys.acme_user),))
    md = reply["metadata"]
    assert (md["x-tenant-id"], md["x-subject"], md["x-agentmesh-roles"]) == ("acme", "acme-reporting", "")
    assert "x-api-key" not in md

    unknown = (("x-api-key", "amk_" + "x" * 30),)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await whoami(secure.address, "tools", unknown)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details().startswith("unknown API key")

    other_tenant = (("x-api-key", api_keys.globex_user), ("x-tenant-id", "acme"))
    assert await call_code(secure, "tools", other_tenant) == grpc.StatusCode.PERMISSION_DENIED
    user = (("x-api-key", api_keys.acme_user),)
    assert await call_code(secure, "retrieval", user, method=INGEST) == grpc.StatusCode.PERMISSION_DENIED
    admin = await whoami(secure.address, "retrieval", (("x-api-key", api_keys.acme_admin),), method=INGEST)
    assert admin["metadata"]["x-agentmesh-roles"] == "admin,ingest"
    assert admin["metadata"]["x-subject"] == "acme-ops"


async def test_an_api_key_wins_over_a_bearer_token_and_neither_reaches_the_service(
    secure: Gateway, issuer: Issuer, api_keys: ApiKeys
):
    both = (("x-api-key", api_keys.globex_user), bearer(issuer.token()))
    reply = await whoami(secure.address, "tools", both)
    assert reply["tenant"] == "globex"
    assert "authorization" not in reply["metadata"] and "x-api-key" not in reply["metadata"]


# -------------------------------------------------------------------------- JSON transcoding


async def test_a_run_streams_as_json_lines_through_transcoding(secure: Gateway, issuer: Issuer):
    """What `curl -N -H 'authorization: Bearer …' -d '{"sessionId":…}' …/v1/agent:run` does."""
    body = {"sessionId": "json-1", "input": "0.3", "maxSteps": 4}
    arrivals: list[tuple[float, dict]] = []
    async with httpx.AsyncClient(timeout=30) as client:
        start = time.monotonic()
        async with client.stream(
            "POST", f"{secure.url}/v1/agent:run", json=body, headers=dict([bearer(issuer.token(tenant="json-co"))])
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            async for line in response.aiter_lines():
                if line.strip():
                    arrivals.append((time.monotonic() - start, json.loads(line)))

    events = [e for _, e in arrivals]
    assert [e["sequence"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[0]["started"]["sessionId"] == "json-1" and events[0]["started"]["requestId"]
    assert [e["textDelta"]["text"] for e in events[1:5]] == [f"{i}:json-co " for i in range(4)]
    assert events[-1] == {"sequence": 6, "final": {"status": "RUN_STATUS_COMPLETED"}}
    # Streamed, not buffered: the first delta long before the end (4 x 0.3 s).
    assert arrivals[-1][0] >= 1.1 and arrivals[1][0] < arrivals[-1][0] - 0.6


async def test_json_callers_get_http_statuses(secure: Gateway, issuer: Issuer):
    async with httpx.AsyncClient(timeout=10) as client:
        body = {"sessionId": "s", "input": "0", "maxSteps": 1}
        anonymous = await client.post(f"{secure.url}/v1/agent:run", json=body)
        assert anonymous.status_code == 401 and anonymous.text == "Jwt is missing"
        other = await client.post(
            f"{secure.url}/v1/agent:run", json=body, headers=dict([bearer(issuer.token()), ("x-tenant-id", "globex")])
        )
        assert other.status_code == 403 and "another tenant" in other.text
        nowhere = await client.post(f"{secure.url}/v1/nothing:here", json=body, headers=dict([bearer(issuer.token())]))
        assert nowhere.status_code == 404
        not_json = await client.post(
            f"{secure.url}/v1/agent:run", content=b"{not json", headers=dict([bearer(issuer.token())])
        )
        assert not_json.status_code == 400


# ---------------------------------------------------------------------------------- gRPC-Web


def grpc_web_frame(message: bytes, trailer: bool = False) -> bytes:
    return struct.pack(">BI", 0x80 if trailer else 0x00, len(message)) + message


def grpc_web_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """Split a gRPC-Web response body into its messages and its trailer block."""
    messages, trailers, offset = [], {}, 0
    while offset < len(body):
        flag, length = struct.unpack(">BI", body[offset : offset + 5])
        payload = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if flag & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


async def test_grpc_web_run_for_browsers(secure: Gateway, issuer: Issuer):
    request = agent_pb2.RunRequest(session_id="web-1", input="0", max_steps=2).SerializeToString()
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "origin": "http://localhost:5173"}
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.post(
            f"{secure.url}/agentmesh.agent.v1.AgentService/Run",
            content=grpc_web_frame(request),
            headers=headers | dict([bearer(issuer.token())]),
        )
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/grpc-web")
        assert reply.headers["access-control-allow-origin"] == "http://localhost:5173"
        messages, trailers = grpc_web_frames(reply.content)
        events = [agent_pb2.RunResponse.FromString(m) for m in messages]
        assert [e.WhichOneof("event") for e in events] == ["started", "text_delta", "text_delta", "final"]
        assert events[1].text_delta.text == "0:acme "
        assert trailers["grpc-status"] == "0"

        anonymous = await client.post(
            f"{secure.url}/agentmesh.agent.v1.AgentService/Run", content=grpc_web_frame(request), headers=headers
        )
        assert anonymous.headers["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])


async def test_cors_preflight_is_answered_for_allowed_origins_only(secure: Gateway):
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}
    async with httpx.AsyncClient(timeout=10) as client:
        allowed = await client.options(
            f"{secure.url}/agentmesh.agent.v1.AgentService/Run", headers=preflight | {"origin": "http://localhost:5173"}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert "authorization" in allowed.headers["access-control-allow-headers"]
        refused = await client.options(
            f"{secure.url}/v1/agent:run", headers=preflight | {"origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in refused.headers
        assert refused.status_code == 401  # treated as any anonymous call


# ------------------------------------------------------------------------ limits and logs


async def test_oversized_or_malformed_headers_are_refused(secure: Gateway, issuer: Issuer):
    async with httpx.AsyncClient(timeout=10) as client:
        body = {"sessionId": "s", "input": "0", "maxSteps": 1}
        huge = await client.post(
            f"{secure.url}/v1/agent:run", json=body, headers=dict([bearer(issuer.token()), ("x-padding", "a" * 70_000)])
        )
        assert huge.status_code == 431  # max_request_headers_kb: 60
        underscore = await client.post(
            f"{secure.url}/v1/agent:run", json=body, headers=dict([bearer(issuer.token()), ("x_tenant_id", "globex")])
        )
        assert underscore.status_code == 400  # headers_with_underscores_action: REJECT_REQUEST


async def test_access_log_has_trace_id_and_the_trusted_identity(secure: Gateway, issuer: Issuer):
    trace_id = uuid.uuid4().hex
    request_id = f"log-{uuid.uuid4().hex}"
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    metadata = (bearer(issuer.token(sub="bob")), ("x-request-id", request_id), ("traceparent", traceparent))
    reply = await whoami(secure.address, "tools", metadata)
    # The service was called in the client's trace, from a span of the gateway's own.
    upstream_traceparent = reply["metadata"]["traceparent"]
    assert upstream_traceparent.split("-")[1] == trace_id and upstream_traceparent != traceparent

    entry = None
    deadline = time.monotonic() + 10
    while entry is None and time.monotonic() < deadline:
        for line in secure.log_path.read_text().splitlines():
            if request_id in line:
                entry = json.loads(line)
        await asyncio.sleep(0.2)
    assert entry is not None, "no access log line for the call"
    assert entry["trace_id"] == trace_id
    assert (entry["tenant"], entry["subject"], entry["grpc_status"]) == ("acme", "bob", "OK")

    # A refused call is logged too, without any identity the client claimed.
    await call_code(secure, "tools", (("x-tenant-id", "acme"), ("x-request-id", request_id + "-anon")))
    await asyncio.sleep(0.6)
    refused = [json.loads(line) for line in secure.log_path.read_text().splitlines() if request_id + "-anon" in line]
    assert refused and refused[0]["grpc_status"] == "UNAUTHENTICATED"
    assert refused[0]["tenant"] is None and refused[0]["subject"] is None
    assert re.fullmatch(r"[0-9a-f]{32}", refused[0]["trace_id"])


async def test_stats_listener_serves_only_prometheus_and_readiness(secure: Gateway):
    base = f"http://127.0.0.1:{secure.stats_port}"
    async with httpx.AsyncClient(timeout=10) as client:
        metrics = await client.get(f"{base}/stats/prometheus")
        assert metrics.status_code == 200
        assert "envoy_cluster_upstream_rq_total" in metrics.text
        assert (await client.get(f"{base}/ready")).text.strip() == "LIVE"
        for method, path in (("POST", "/quitquitquit"), ("POST", "/drain_listeners"), ("GET", "/config_dump")):
            assert (await client.request(method, f"{base}{path}")).status_code == 404, path
        assert (await client.post(f"{base}/ready")).status_code == 404


# --------------------------------------------------------------------------------- rate limit


async def test_a_rate_limit_trips_with_resource_exhausted(tmp_path, issuer: Issuer, api_keys: ApiKeys):
    auth = write_credentials(tmp_path / "credentials", issuer, api_keys)
    options = GatewayOptions(auth=auth, rate_limits=RateLimits(run=2, admin=5, default=1000))
    metadata = (("x-api-key", api_keys.acme_user),)
    request = agent_pb2.RunRequest(session_id="rl", input="0", max_steps=1)
    async with probe_upstreams() as upstreams, envoy_in_front_of(upstreams, tmp_path, options) as gw:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)

            async def run_once() -> grpc.StatusCode:
                try:
                    [e async for e in stub.Run(request, metadata=metadata, timeout=5)]
                except grpc.aio.AioRpcError as err:
                    return err.code()
                return grpc.StatusCode.OK

            codes = await asyncio.gather(*(run_once() for _ in range(8)))
        # The bucket holds 2 tokens (+2 per second: a refill tick may land inside the burst).
        ok, exhausted = codes.count(grpc.StatusCode.OK), codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert 2 <= ok <= 4 and ok + exhausted == 8, codes
        # Per route: other methods still pass while Run is exhausted.
        assert await call_code(gw, "tools", metadata) == grpc.StatusCode.OK

        async with httpx.AsyncClient(timeout=10) as client:
            url = f"{gw.url}/v1/agent:run"
            replies = [await client.post(url, json={"sessionId": "rl", "input": "0"}, headers=dict(metadata)) for _ in range(3)]
        limited = [r for r in replies if r.status_code == 429]
        assert limited and limited[0].headers["x-ratelimit-limit"] == "2"

        stats = (await asyncio.to_thread(_admin_stats, gw.admin_port))
        assert stats.get("run.http_local_rate_limit.rate_limited", 0) >= exhausted + len(limited)


def _admin_stats(admin_port: int) -> dict[str, int]:
    from agentmesh.services.cli.processes import envoy_admin_get

    code, body = envoy_admin_get(admin_port, "/stats?format=json")
    assert code == 200
    return {s["name"]: s["value"] for s in json.loads(body)["stats"] if "value" in s}
