"""Rendering gateway/envoy.yaml: every placeholder gets a checked value, or a clear error."""

from __future__ import annotations

import pytest
import yaml

from agentmesh.services.cli.gateway import (
    DEFAULT_TEMPLATE,
    GatewayConfigError,
    render_envoy_config,
    template_placeholders,
)
from agentmesh.services.runtime.settings import DEFAULT_PORTS

UPSTREAMS = {kind: f"127.0.0.1:{port}" for kind, port in DEFAULT_PORTS.items()}


def test_template_placeholders_are_exactly_the_documented_ones():
    expected = {"LISTEN_ADDRESS", "LISTEN_PORT", "ADMIN_PORT", "STATS_PORT"} | {
        f"{kind.upper()}_{part}" for kind in DEFAULT_PORTS for part in ("HOST", "PORT")
    } | {
        "DEV_NO_AUTH", "JWKS_PATH", "JWT_ISSUER", "JWT_AUDIENCE", "API_KEYS_PATH", "DESCRIPTOR_SET_PATH",
        "CORS_ORIGIN_REGEX", "RATE_LIMIT_RUN_RPS", "RATE_LIMIT_ADMIN_RPS", "RATE_LIMIT_DEFAULT_RPS",
        "MAX_HEAP_BYTES", "OTLP_HOST", "OTLP_PORT", "TRACE_SAMPLING_PERCENT",
    }
    assert template_placeholders(DEFAULT_TEMPLATE.read_text()) == expected


def test_render_fills_every_placeholder_outside_comments():
    text = render_envoy_config(18080, 19901, UPSTREAMS)
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("${" in line for line in code)
    assert any("${LISTEN_PORT}" in line for line in text.splitlines() if line.lstrip().startswith("#"))
    parsed = yaml.safe_load(text)
    assert parsed["admin"]["address"]["socket_address"]["port_value"] == 19901


def test_missing_upstream_names_the_placeholders_and_the_service():
    partial = {k: v for k, v in UPSTREAMS.items() if k != "memory"}
    with pytest.raises(GatewayConfigError) as info:
        render_envoy_config(8080, 9901, partial)
    assert str(info.value) == "no value for template placeholder(s) MEMORY_HOST, MEMORY_PORT (no upstream given for memory)"


def test_placeholder_the_renderer_does_not_know_is_an_error():
    template = "admin: {port: ${ADMIN_PORT}}\nx: ${LISTEN_PORT}\ny: ${LISTEN_ADDRESS}\nz: ${TRACING_PORT}\n"
    with pytest.raises(GatewayConfigError, match=r"no value for template placeholder\(s\) TRACING_PORT$"):
        render_envoy_config(8080, 9901, {}, template=template)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"listen_port": 0}, "listen_port must be a TCP port 1..65535, got 0"),
        ({"listen_port": 70000}, "listen_port must be a TCP port 1..65535, got 70000"),
        ({"admin_port": "9901"}, "admin_port must be a TCP port 1..65535, got '9901'"),
        ({"admin_port": True}, "admin_port must be a TCP port 1..65535, got True"),
        ({"admin_port": 8080}, "listen_port and admin_port are both 8080; they must differ"),
        ({"listen_address": "0.0.0.0; rm"}, "listen_address '0.0.0.0; rm' is neither an IP address nor a DNS name"),
    ],
)
def test_bad_ports_and_listen_address(kwargs, message):
    args = {"listen_port": 8080, "admin_port": 9901, "upstreams": UPSTREAMS, **kwargs}
    with pytest.raises(GatewayConfigError) as info:
        render_envoy_config(**args)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("localhost", "upstream 'llm' must be 'host:port', got 'localhost'"),
        ("localhost:http", "upstream 'llm' must be 'host:port' with a numeric port, got 'localhost:http'"),
        ("llm:0", "upstream 'llm' must be a TCP port 1..65535, got 0"),
        ("bad host:50052", "upstream 'llm' 'bad host' is neither an IP address nor a DNS name"),
        ("{x}:50052", "upstream 'llm' '{x}' is neither an IP address nor a DNS name"),
    ],
)
def test_malformed_upstream_address(address, message):
    with pytest.raises(GatewayConfigError) as info:
        render_envoy_config(8080, 9901, {**UPSTREAMS, "llm": address})
    assert str(info.value) == message


def test_unknown_service_kind_is_refused():
    with pytest.raises(GatewayConfigError, match=r"unknown service kind\(s\) \['billing'\]"):
        render_envoy_config(8080, 9901, {**UPSTREAMS, "billing": "127.0.0.1:1"})


def test_dns_names_and_ipv6_upstreams_render_to_valid_yaml():
    upstreams = {**UPSTREAMS, "llm": "agentmesh-llm-headless.prod.svc.cluster.local:50052", "tools": "[::1]:50055"}
    parsed = yaml.safe_load(render_envoy_config(8080, 9901, upstreams, listen_address="::"))
    clusters = {c["name"]: c for c in parsed["static_resources"]["clusters"]}

    def socket(kind: str) -> dict:
        return clusters[kind]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]

    assert socket("llm") == {"address": "agentmesh-llm-headless.prod.svc.cluster.local", "port_value": 50052}
    assert socket("tools") == {"address": "::1", "port_value": 50055}
    assert parsed["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] == "::"


def test_template_path_can_be_overridden(tmp_path, monkeypatch):
    custom = tmp_path / "envoy.yaml"
    custom.write_text("admin: {port: ${ADMIN_PORT}}\nlisten: ${LISTEN_ADDRESS}:${LISTEN_PORT}\n")
    monkeypatch.setenv("AGENTMESH_ENVOY_TEMPLATE", str(custom))
    assert render_envoy_config(8080, 9901, {}) == "admin: {port: 9901}\nlisten: 127.0.0.1:8080\n"
