"""Rendering the gateway's authentication, limits and tracing options: dev mode versus
authentication, credential files checked before Envoy ever sees them, unsafe values refused,
settings from the environment, and the runner's choice of mode."""

from __future__ import annotations

import base64
import json
import re

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from agentmesh.services.cli import runner
from agentmesh.services.cli.gateway import (
    NO_JWT_JWKS,
    GatewayAuth,
    GatewayConfigError,
    GatewayOptions,
    GatewaySettings,
    RateLimits,
    check_jwks,
    no_jwt_jwks,
    otlp_address_from_env,
    parse_api_keys,
    render_envoy_config,
    validate_with_envoy,
)
from agentmesh.services.runtime.settings import DEFAULT_PORTS
from tests.gateway.auth import ApiKeys, Issuer, write_credentials

UPSTREAMS = {kind: f"127.0.0.1:{port}" for kind, port in DEFAULT_PORTS.items()}
KEY = "amk_0123456789abcdefghijklmnop"


def filters(text: str) -> dict[str, dict]:
    hcm = yaml.safe_load(text)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f for f in hcm["http_filters"]}


def test_dev_mode_disables_authentication_and_says_so_in_the_config():
    rendered = filters(render_envoy_config(8080, 9901, UPSTREAMS))
    assert rendered["envoy.filters.http.jwt_authn"]["disabled"] is True
    assert rendered["envoy.filters.http.lua"]["disabled"] is True
    provider = rendered["envoy.filters.http.jwt_authn"]["typed_config"]["providers"]["agentmesh"]
    assert provider["local_jwks"]["filename"] == str(NO_JWT_JWKS)
    assert '"/dev/null"' in rendered["envoy.filters.http.lua"]["typed_config"]["default_source_code"]["inline_string"]


def test_authenticated_render_passes_envoy_validate(tmp_path):
    auth = write_credentials(tmp_path, Issuer(), ApiKeys())
    options = GatewayOptions(auth=auth, rate_limits=RateLimits(run=7, admin=3, default=50), trace_sampling_percent=12.5)
    config = tmp_path / "envoy.yaml"
    config.write_text(render_envoy_config(8080, 9901, UPSTREAMS, listen_address="0.0.0.0", options=options))
    validate_with_envoy(config)

    rendered = filters(config.read_text())
    assert rendered["envoy.filters.http.jwt_authn"]["disabled"] is False
    assert rendered["envoy.filters.http.lua"]["disabled"] is False
    provider = rendered["envoy.filters.http.jwt_authn"]["typed_config"]["providers"]["agentmesh"]
    assert (provider["issuer"], provider["audiences"], provider["local_jwks"]["filename"]) == (
        auth.issuer, [auth.audience], str(auth.jwks_path)
    )
    assert provider["require_expiration"] is True and provider["forward"] is False
    hcm = yaml.safe_load(config.read_text())["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["tracing"]["random_sampling"]["value"] == 12.5
    run = next(r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r["match"].get("path", "").endswith("/Run"))
    bucket = run["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]["token_bucket"]
    assert bucket["max_tokens"] == bucket["tokens_per_fill"] == 7


def test_the_no_jwt_jwks_is_the_derived_nothing_up_my_sleeve_key():
    shipped = json.loads(NO_JWT_JWKS.read_text())
    assert shipped == no_jwt_jwks()
    (key,) = shipped["keys"]

    def number(text: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")

    # A valid P-256 point (cryptography checks it lies on the curve), public only.
    ec.EllipticCurvePublicNumbers(number(key["x"]), number(key["y"]), ec.SECP256R1()).public_key()
    assert "d" not in key and check_jwks(NO_JWT_JWKS) == 1


def test_api_key_table_parses_and_every_mistake_names_its_line():
    table = parse_api_keys(f"# ops keys\n\n{KEY} acme svc admin,ingest\n{KEY}x globex bot\n")
    assert table == {KEY: ("acme", "svc", ("admin", "ingest")), KEY + "x": ("globex", "bot", ())}

    cases = [
        ("short-key acme svc", "line 1: the key must be 24..256 characters"),
        (f"{KEY} acme", "line 1: expected '<key> <tenant> <subject> [role,role...]', got 2 fields"),
        (f"# c\n{KEY} bad/tenant svc", "line 2: tenant 'bad/tenant' must be 1..64 characters"),
        (f"{KEY} acme svc ad$min", "line 1: role(s) ['ad$min'] must be"),
        (f"{KEY} acme svc\n{KEY} acme other", "line 2: this key is already listed on an earlier line"),
    ]
    for text, message in cases:
        with pytest.raises(GatewayConfigError) as info:
            parse_api_keys(text, "keys.txt")
        assert message in str(info.value) and str(info.value).startswith("keys.txt, ")
        assert KEY not in str(info.value)  # a key never ends up in a log


def test_credential_files_are_checked_before_envoy_sees_them(tmp_path):
    jwks = tmp_path / "jwks.json"
    for content, message in [
        ("{}", "must be {\"keys\": [...]}"),
        ('{"keys": []}', "at least one key"),
        ("not json", "is not JSON"),
        (json.dumps({"keys": [{"kty": "EC", "d": "secret", "x": "a", "y": "b"}]}), "holds a PRIVATE key"),
    ]:
        jwks.write_text(content)
        with pytest.raises(GatewayConfigError, match=re.escape(message)):
            check_jwks(jwks)

    auth = write_credentials(tmp_path / "ok", Issuer(), ApiKeys())
    bad_keys = tmp_path / "keys.txt"
    bad_keys.write_text("tooshort acme svc\n")
    checks = [
        (GatewayAuth(), "needs a JWKS file, an API key file or both"),
        (GatewayAuth(jwks_path=tmp_path / "missing.json", issuer="i", audience="a"), "missing.json does not exist"),
        (GatewayAuth(jwks_path=auth.jwks_path, issuer='evil" x', audience="a"), "JWT issuer 'evil\" x' must be 1..512 URI characters"),
        (GatewayAuth(jwks_path=auth.jwks_path, issuer="i", audience=""), "JWT audience '' must be"),
        (GatewayAuth(api_keys_path=bad_keys), "keys.txt, line 1: the key must be"),
        (GatewayAuth(api_keys_path=tmp_path / "with space" / "k.txt"), "must be an absolute path of"),
    ]
    for auth_option, message in checks:
        with pytest.raises(GatewayConfigError) as info:
            render_envoy_config(8080, 9901, UPSTREAMS, options=GatewayOptions(auth=auth_option))
        assert message in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (GatewayOptions(cors_origin_regex="^https://a.example$' , x"), "cors_origin_regex must be 1..512 characters without quotes"),
        (GatewayOptions(cors_origin_regex="^(unclosed"), "is not a regular expression"),
        (GatewayOptions(rate_limits=RateLimits(run=0)), "rate_limits.run must be an integer 1..1000000, got 0"),
        (GatewayOptions(max_heap_bytes=1024), "max_heap_bytes must be an integer"),
        (GatewayOptions(trace_sampling_percent=150), "trace_sampling_percent must be a number 0..100, got 150"),
        (GatewayOptions(otlp_address="collector"), "otlp_address must be 'host:port'"),
    ],
)
def test_unsafe_or_malformed_option_values_are_refused(options, message):
    with pytest.raises(GatewayConfigError) as info:
        render_envoy_config(8080, 9901, UPSTREAMS, options=options)
    assert message in str(info.value)


def test_stats_port_defaults_beside_admin_and_must_be_distinct():
    parsed = yaml.safe_load(render_envoy_config(8080, 9901, UPSTREAMS))
    assert parsed["static_resources"]["listeners"][1]["address"]["socket_address"]["port_value"] == 9902
    with pytest.raises(GatewayConfigError, match="stats_port 8080 must differ"):
        render_envoy_config(8080, 9901, UPSTREAMS, stats_port=8080)


def test_settings_from_the_environment(monkeypatch, tmp_path):
    for name in ("AGENTMESH_GATEWAY_JWKS_FILE", "AGENTMESH_GATEWAY_API_KEYS_FILE", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert GatewaySettings().dev_mode and GatewaySettings().options().auth is None
    assert otlp_address_from_env() == "127.0.0.1:4317"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector.observability:4317")
    assert otlp_address_from_env() == "otel-collector.observability:4317"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector")
    assert otlp_address_from_env() == "collector:4317"

    monkeypatch.setenv("AGENTMESH_GATEWAY_API_KEYS_FILE", str(tmp_path / "keys.txt"))
    monkeypatch.setenv("AGENTMESH_GATEWAY_RATE_LIMIT_RUN_RPS", "3")
    settings = GatewaySettings()
    assert not settings.dev_mode
    options = settings.options()
    assert options.auth == GatewayAuth(api_keys_path=(tmp_path / "keys.txt").resolve())
    assert options.rate_limits.run == 3 and options.otlp_address == "collector:4317"


def test_runner_renders_dev_mode_with_a_warning_and_refuses_a_bad_key_file(monkeypatch, tmp_path):
    for name in ("AGENTMESH_GATEWAY_JWKS_FILE", "AGENTMESH_GATEWAY_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    lines: list[str] = []
    ports = runner.MeshPorts.free()
    text = runner.render_gateway(ports, UPSTREAMS, lines.append)
    assert filters(text)["envoy.filters.http.lua"]["disabled"] is True
    assert lines and lines[0].startswith("gateway: DEV MODE, authentication OFF")

    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY} acme svc admin\n")
    monkeypatch.setenv("AGENTMESH_GATEWAY_API_KEYS_FILE", str(keys))
    lines.clear()
    text = runner.render_gateway(ports, UPSTREAMS, lines.append)
    assert filters(text)["envoy.filters.http.lua"]["disabled"] is False
    assert lines == ["gateway: authentication on (API keys)"]

    keys.write_text("oops\n")
    with pytest.raises(runner.MeshError, match=r"gateway settings \(AGENTMESH_GATEWAY_\*\): .*keys.txt, line 1"):
        runner.render_gateway(ports, UPSTREAMS, lines.append)
