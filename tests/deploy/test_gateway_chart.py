"""The gateway as the chart deploys it: its config is gateway/envoy.yaml filled by the chart,
accepted by the real Envoy, identical to what the local renderer makes of the same values; and
the pod's probe and preStop drain hook work against a running Envoy."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentmesh.services.cli import gateway as local
from agentmesh.services.cli.processes import envoy_binary, free_port
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import SERVICE_NAMES, ServiceSettings
from tests.deploy.chart import (
    CHART,
    RELEASE,
    SERVICES,
    comment_free,
    container,
    materialize_gateway,
    render,
)
from tests.support import running_service


def test_the_config_fills_every_placeholder_and_targets_the_headless_services(manifests):
    text = manifests.envoy_config_text()
    assert "${" not in comment_free(text)
    config = yaml.safe_load(text)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for kind in SERVICES:
        endpoint = clusters[kind]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        address = endpoint["address"]["socket_address"]
        service = manifests.get("Service", address["address"])
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == kind
        assert service["spec"]["ports"][0]["port"] == address["port_value"]
        assert clusters[kind]["type"] == "STRICT_DNS"
        health = clusters[kind]["health_checks"][0]["grpc_health_check"]["service_name"]
        assert health == SERVICE_NAMES[kind]
    gateway_port = {p["name"]: p["containerPort"] for p in container(manifests.get("Deployment", f"{RELEASE}-gateway"))["ports"]}
    listeners = {li["name"]: li["address"]["socket_address"] for li in config["static_resources"]["listeners"]}
    assert listeners["grpc_ingress"] == {"address": "0.0.0.0", "port_value": gateway_port["grpc"]}
    assert listeners["stats"] == {"address": "0.0.0.0", "port_value": gateway_port["stats"]}


def test_envoy_accepts_the_rendered_config(manifests, tmp_path):
    config = materialize_gateway(manifests, tmp_path)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "--disable-hot-restart", "-l", "error", "-c", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _merged_values(variant: str) -> dict:
    def merge(base: dict, override: dict) -> dict:
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(defaults, yaml.safe_load((CHART / "ci" / f"{variant}-values.yaml").read_text()))


def test_the_chart_and_the_local_renderer_make_the_same_config(manifests, variant, tmp_path):
    """One source of truth: given the same values, both renderers produce the same text (only
    file locations differ: the chart's are where the pod mounts them)."""
    values = _merged_values(variant)
    g = values["gateway"]
    materialize_gateway(manifests, tmp_path)
    mounted = {"jwks": tmp_path / "etc/agentmesh/jwks" / g["auth"]["jwt"]["jwksSecretKey"],
               "keys": tmp_path / "etc/agentmesh/api-keys" / g["auth"]["apiKeys"]["existingSecretKey"]}
    auth = None
    if not g["auth"]["devNoAuth"]:
        jwt = g["auth"]["jwt"]
        auth = local.GatewayAuth(
            jwks_path=mounted["jwks"] if jwt["jwksSecret"] else None, issuer=jwt["issuer"], audience=jwt["audience"],
            api_keys_path=mounted["keys"] if g["auth"]["apiKeys"]["existingSecret"] else None,
        )
    otlp = values["telemetry"]["otlp"]
    options = local.GatewayOptions(
        auth=auth,
        descriptor_set=tmp_path / "etc/envoy/descriptors.binpb",
        cors_origin_regex=g["corsOriginRegex"],
        rate_limits=local.RateLimits(g["rateLimits"]["runRps"], g["rateLimits"]["adminRps"], g["rateLimits"]["defaultRps"]),
        max_heap_bytes=g["maxHeapBytes"],
        otlp_address=f"{otlp['host'] or '127.0.0.1'}:{otlp['port']}",
        trace_sampling_percent=values["telemetry"]["traceSamplingPercent"],
    )
    upstreams = {kind: f"{RELEASE}-{kind}-headless:{values[kind]['port']}" for kind in SERVICES}
    text = local.render_envoy_config(
        g["port"], g["adminPort"], upstreams, listen_address="0.0.0.0", stats_port=g["statsPort"], options=options,
        template=(CHART / "files" / "envoy.yaml").read_text(),
    )
    text = text.replace(str(local.NO_JWT_JWKS), "/etc/envoy/no-jwt.jwks.json").replace(str(tmp_path), "")
    assert text.rstrip("\n") == manifests.envoy_config_text().rstrip("\n")


# ------------------------------------------------------------------ the pod's hooks, for real


class HealthOnly(Service):
    """An upstream that only serves grpc.health.v1 (SERVING as the orchestrator)."""

    kind = "orchestrator"

    def register(self, server: grpc.aio.Server) -> None:
        pass


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


@pytest.mark.timeout(120)
async def test_probe_and_pre_stop_drain_against_the_real_envoy(tmp_path):
    async with running_service(HealthOnly(ServiceSettings(readiness_interval_s=0.2))) as upstream:
        port, admin, stats = free_port(), free_port(), free_port()
        assert len({port, admin, stats}) == 3
        manifests = render("dev", {
            "gateway.port": str(port), "gateway.adminPort": str(admin), "gateway.statsPort": str(stats),
            "gateway.drainTimeSeconds": "1", "gateway.drainSeconds": "30",
            "orchestrator.port": upstream.rpartition(":")[2],
        })
        config = materialize_gateway(manifests, tmp_path)
        # Cluster DNS: every headless Service name resolves to this machine.
        text = config.read_text()
        for kind in SERVICES:
            text = text.replace(f"{RELEASE}-{kind}-headless", "127.0.0.1")
        config.write_text(text)

        c = container(manifests.get("Deployment", f"{RELEASE}-gateway"))
        args = list(c["args"])
        args[args.index("--config-path") + 1] = str(config)
        assert c["command"] == ["envoy"]
        log = (tmp_path / "envoy.log").open("w")
        envoy = subprocess.Popen([envoy_binary(), *args], stdout=log, stderr=subprocess.STDOUT)
        try:
            # The kubelet's probe: GET <pod>:<containerPort named stats>/ready.
            probe = c["readinessProbe"]["httpGet"]
            assert probe["port"] == "stats"
            url = f"http://127.0.0.1:{stats}{probe['path']}"
            deadline = time.monotonic() + 30
            while _http_status(url) != 200:
                assert envoy.poll() is None, (tmp_path / "envoy.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "envoy never became ready"
                await asyncio.sleep(0.1)
            # The admin interface itself is not on the stats port: only GET /ready and metrics are.
            assert _http_status(f"http://127.0.0.1:{stats}/quitquitquit") == 404

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAMES["orchestrator"]))
                first = await asyncio.wait_for(watch.read(), 10)
                assert first.status == health_pb2.HealthCheckResponse.SERVING

                # preStop, exactly as the Deployment declares it (the script at its mounted path).
                hook = c["lifecycle"]["preStop"]["exec"]["command"]
                assert hook[1] == "/etc/envoy/drain.sh"
                started = time.monotonic()
                drain = await asyncio.create_subprocess_exec(hook[0], str(tmp_path / hook[1].lstrip("/")), *hook[2:])
                await asyncio.sleep(3)
                # The stream is still in flight, so the hook keeps waiting; the listener has stopped
                # taking connections after --drain-time-s.
                assert drain.returncode is None
                assert not watch.done()
                assert _refuses_connections(port)

                watch.cancel()
                await asyncio.wait_for(drain.wait(), 5)
                assert drain.returncode == 0
                assert 3 <= time.monotonic() - started < 8
        finally:
            envoy.terminate()
            envoy.wait(10)
            log.close()

        # Envoy gone (a crash, or SIGTERM first): the hook has nothing to drain and returns at once.
        started = time.monotonic()
        gone = await asyncio.create_subprocess_exec(hook[0], str(tmp_path / hook[1].lstrip("/")), *hook[2:])
        assert await asyncio.wait_for(gone.wait(), 5) == 0
        assert time.monotonic() - started < 2

