"""Replicas in the local gateway config and runner (what the fault meshes are built with): several
addresses per kind become endpoints of the kind's cluster, in a config the real Envoy accepts;
bad replica settings are refused with a message that names them."""

from __future__ import annotations

import pytest
import yaml

from agentmesh.services.cli import runner
from agentmesh.services.cli.gateway import GatewayConfigError, render_envoy_config, validate_with_envoy
from agentmesh.services.runtime.settings import DEFAULT_PORTS

pytestmark = pytest.mark.timeout(60)

UPSTREAMS = {kind: f"127.0.0.1:{port}" for kind, port in DEFAULT_PORTS.items()}


def endpoints(config: dict, kind: str) -> list[tuple[str, int]]:
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == kind)
    return [
        (e["endpoint"]["address"]["socket_address"]["address"], e["endpoint"]["address"]["socket_address"]["port_value"])
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]


def test_every_replica_is_an_endpoint_of_its_cluster_and_envoy_accepts_the_config(tmp_path):
    upstreams = UPSTREAMS | {"orchestrator": ["127.0.0.1:7001", "127.0.0.1:7002"], "llm": ["10.0.0.5:7003"]}
    text = render_envoy_config(18080, 19901, upstreams)
    config = yaml.safe_load(text)
    assert endpoints(config, "orchestrator") == [("127.0.0.1", 7001), ("127.0.0.1", 7002)]
    assert endpoints(config, "llm") == [("10.0.0.5", 7003)]
    assert endpoints(config, "memory") == [("127.0.0.1", DEFAULT_PORTS["memory"])]
    # Health checks and outlier detection are per cluster: both replicas are checked and ejected alone.
    orchestrator = next(c for c in config["static_resources"]["clusters"] if c["name"] == "orchestrator")
    assert orchestrator["health_checks"][0]["grpc_health_check"]["service_name"] == "agentmesh.agent.v1.AgentService"
    assert orchestrator["outlier_detection"]["consecutive_local_origin_failure"] == 3
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    validate_with_envoy(path)


@pytest.mark.parametrize(
    ("addresses", "message"),
    [([], "empty list"), (["127.0.0.1:7001", "127.0.0.1:7001"], "twice"), (["127.0.0.1:7001", "no-port"], "host:port")],
)
def test_bad_replica_addresses_are_refused(addresses, message):
    with pytest.raises(GatewayConfigError, match=message):
        render_envoy_config(18080, 19901, UPSTREAMS | {"tools": addresses})


def test_runner_replica_names_kinds_and_service_addresses():
    assert runner.replica_name("llm", 1) == "llm" and runner.replica_name("llm", 3) == "llm-3"
    assert [runner.replica_kind(n) for n in ("llm-3", "orchestrator", "redis", "envoy")] == [
        "llm", "orchestrator", "redis", "envoy"]
    ports = runner.MeshPorts.free()
    replica_ports = runner._replica_ports(ports, {"orchestrator": 3})
    assert replica_ports["orchestrator"][0] == ports.orchestrator and len(set(replica_ports["orchestrator"])) == 3
    assert replica_ports["llm"] == [ports.llm]
    env = runner.mesh_env(ports, "redis://127.0.0.1:1/0", "/tmp/m.db", replica_ports)
    a, b, c = replica_ports["orchestrator"]
    assert env["AGENTMESH_ORCHESTRATOR_ADDRESS"] == f"ipv4:127.0.0.1:{a},127.0.0.1:{b},127.0.0.1:{c}"
    assert env["AGENTMESH_LLM_ADDRESS"] == f"127.0.0.1:{ports.llm}"


@pytest.mark.parametrize(("replicas", "message"), [({"gateway": 2}, "unknown service"), ({"llm": 0}, "1..8")])
def test_bad_replica_counts_are_refused(replicas, message):
    with pytest.raises(runner.MeshError, match=message):
        runner._replica_ports(runner.MeshPorts.free(), replicas)
