"""What the chart renders, for each ci/*-values.yaml variant: the properties a cluster relies on
(one Deployment/Service/ServiceAccount/PDB per component, HPAs, native gRPC probes, the
restricted security profile, graceful termination, settings the services accept, network
policies that allow exactly the mesh's calls)."""

from __future__ import annotations

import importlib
import ipaddress
import itertools
import os

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from agentmesh.services.runtime.server import LIVENESS_SERVICE
from agentmesh.services.runtime.settings import SERVICE_NAMES, MeshSettings
from tests.deploy.chart import (
    RELEASE,
    SERVICES,
    Manifests,
    RenderError,
    chart_copy,
    container,
    matches,
    pod_spec,
    render,
)

COMPONENTS = (*SERVICES, "gateway")
MINIMAL = {"externalRedis.url": "redis://redis:6379/0", "externalMilvus.uri": "http://milvus:19530",
           "gateway.auth.devNoAuth": "true"}


def name(component: str) -> str:
    return f"{RELEASE}-{component}"


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def selecting(manifests: Manifests, kind: str, workload: dict) -> list[dict]:
    """Objects of ``kind`` whose selector selects ``workload``'s pods."""
    labels = pod_labels(workload)
    found = []
    for obj in manifests.of_kind(kind):
        spec = obj["spec"]
        selector = spec.get("selector", {})
        selector = selector.get("matchLabels", selector) if kind != "Service" else selector
        if selector and matches(selector, labels):
            found.append(obj)
    return found


# ------------------------------------------------------------------------------ objects


def test_every_component_has_its_deployment_service_account_service_and_pdb(manifests):
    for component in COMPONENTS:
        deployment = manifests.get("Deployment", name(component))
        spec = pod_spec(deployment)
        account = manifests.get("ServiceAccount", spec["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False
        assert spec["automountServiceAccountToken"] is False
        # The pod labels select this component only.
        assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
        services = selecting(manifests, "Service", deployment)
        expected_services = {name(component)} | ({f"{name(component)}-headless"} if component in SERVICES else set())
        assert {s["metadata"]["name"] for s in services} == expected_services
        for service in services:
            assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]
        pdbs = selecting(manifests, "PodDisruptionBudget", deployment)
        assert [p["metadata"]["name"] for p in pdbs] == [name(component)]
        assert pdbs[0]["spec"]["maxUnavailable"] == 1


def test_headless_services_publish_every_ready_pod_of_each_service(manifests):
    for kind in SERVICES:
        headless = manifests.get("Service", f"{name(kind)}-headless")
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["spec"].get("publishNotReadyAddresses") is not True


def test_the_chart_never_holds_a_secret(manifests):
    assert manifests.of_kind("Secret") == []


# --------------------------------------------------------------------------- autoscaling


def hpas_by_target(manifests: Manifests) -> dict[str, dict]:
    return {h["spec"]["scaleTargetRef"]["name"]: h for h in manifests.of_kind("HorizontalPodAutoscaler")}


def test_production_autoscales_every_component_and_omits_replicas(rendered):
    manifests = rendered["production"]
    hpas = hpas_by_target(manifests)
    assert set(hpas) == {name(c) for c in COMPONENTS}
    for component in COMPONENTS:
        deployment = manifests.get("Deployment", name(component))
        assert "replicas" not in deployment["spec"], f"{component}: the HPA owns the replica count"
        hpa = hpas[name(component)]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name(component)}
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        resources = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
        assert set(resources) == {"cpu", "memory"}
        assert all(t["type"] == "Utilization" and 0 < t["averageUtilization"] <= 100 for t in resources.values())
        scale_down = hpa["spec"]["behavior"]["scaleDown"]
        # Long streams: wait 10 minutes of low load, then remove one pod at a time.
        assert scale_down["stabilizationWindowSeconds"] >= 600
        assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
        pods_metrics = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        if component in ("orchestrator", "llm"):
            assert pods_metrics == [{"type": "Pods", "pods": {
                "metric": {"name": "grpc_server_in_flight"},
                "target": {"type": "AverageValue", "averageValue": "50"}}}]
        else:
            assert pods_metrics == []


@pytest.mark.parametrize("variant_name", ["minimal", "dev"])
def test_without_autoscaling_deployments_set_replicas_and_no_hpa_exists(rendered, variant_name):
    manifests = rendered[variant_name]
    assert manifests.of_kind("HorizontalPodAutoscaler") == []
    expected = 1 if variant_name == "dev" else 2
    assert {d["metadata"]["name"]: d["spec"]["replicas"] for d in manifests.of_kind("Deployment")} == {
        name(c): expected for c in COMPONENTS
    }


def test_a_component_can_switch_the_default_off():
    # `false` in a component must beat `true` in defaults (sprig's merge would keep `true`).
    manifests = render(set_values={**MINIMAL, "defaults.autoscaling.enabled": "true", "llm.autoscaling.enabled": "false",
                                   "tools.pdb.enabled": "false"})
    assert set(hpas_by_target(manifests)) == {name(c) for c in COMPONENTS if c != "llm"}
    assert manifests.get("Deployment", name("llm"))["spec"]["replicas"] == 2
    assert "replicas" not in manifests.get("Deployment", name("memory"))["spec"]
    assert manifests.find("PodDisruptionBudget", name("tools")) is None
    assert manifests.find("PodDisruptionBudget", name("memory")) is not None


# -------------------------------------------------------------------------------- probes


def test_services_have_native_grpc_startup_readiness_and_liveness_probes(manifests):
    for kind in SERVICES:
        c = container(manifests.get("Deployment", name(kind)))
        port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            handler = {k: v for k, v in c[probe].items() if k in ("grpc", "httpGet", "exec", "tcpSocket")}
            # Readiness follows dependencies; liveness only the process (a Redis outage restarts nothing).
            expected = LIVENESS_SERVICE if probe == "livenessProbe" else SERVICE_NAMES[kind]
            assert handler == {"grpc": {"port": port, "service": expected}}, f"{kind} {probe}"
    # The embedding model loads before retrieval says SERVING: at least 5 minutes of start-up.
    startup = container(manifests.get("Deployment", name("retrieval")))["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_gateway_probes_ask_envoy_ready_through_the_read_only_stats_listener(manifests):
    c = container(manifests.get("Deployment", name("gateway")))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/ready", "port": "stats"}
    config = yaml.safe_load(manifests.envoy_config_text())
    listeners = {
        listener["address"]["socket_address"]["port_value"]: listener for listener in config["static_resources"]["listeners"]
    }
    stats = listeners[ports["stats"]]
    assert stats["address"]["socket_address"]["address"] == "0.0.0.0"
    assert ports["grpc"] in listeners
    # Admin stays on loopback; /ready reaches it only through the stats listener's route.
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    routes = stats["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert {r["match"]["path"]: r["route"]["cluster"] for r in routes}["/ready"] == "envoy_admin"


# ------------------------------------------------------------------------------ security


def test_every_pod_meets_the_restricted_pod_security_profile(manifests):
    for workload in manifests.workloads():
        label = workload["metadata"]["name"]
        spec = pod_spec(workload)
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, label
        assert pod_sc["runAsUser"] > 0, label
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, label
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), label
        assert spec["enableServiceLinks"] is False, label
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert not any("hostPath" in v for v in volumes.values()), label
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc["readOnlyRootFilesystem"] is True, label
            assert sc["capabilities"] == {"drop": ["ALL"]}, label
            assert sc.get("runAsUser", pod_sc["runAsUser"]) != 0, label
            assert "privileged" not in sc or sc["privileged"] is False, label
            # The root filesystem is read-only: /tmp must be a writable emptyDir.
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]], label
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], label


def test_service_pods_have_a_writable_cache_for_models_and_libraries(manifests):
    for kind in SERVICES:
        deployment = manifests.get("Deployment", name(kind))
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        cache = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == "/home/agentmesh/.cache"]
        assert len(cache) == 1 and "emptyDir" in volumes[cache[0]["name"]]


# ------------------------------------------------------------------ graceful termination


def test_termination_grace_covers_the_pre_stop_wait_and_the_stream_drain(manifests):
    for kind in SERVICES:
        deployment = manifests.get("Deployment", name(kind))
        settings = manifests.get("ConfigMap", name(kind))["data"]
        drain_s = float(settings[f"AGENTMESH_{kind.upper()}_GRACE_PERIOD_S"])
        command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop_s = float(command[1])
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 5, kind
    gateway = manifests.get("Deployment", name("gateway"))
    c = container(gateway)
    hook = c["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["/bin/bash", "/etc/envoy/drain.sh"]
    admin_port, max_wait_s, min_wait_s = (int(x) for x in hook[2:])
    assert f"port_value: {admin_port} }}" in manifests.envoy_config_text()
    assert pod_spec(gateway)["terminationGracePeriodSeconds"] > max_wait_s
    args = c["args"]
    assert args[args.index("--drain-time-s") + 1] == str(min_wait_s)


def test_streaming_services_drain_for_as_long_as_a_generation(rendered):
    for variant in ("minimal", "production"):
        for kind in ("orchestrator", "llm"):
            settings = rendered[variant].get("ConfigMap", name(kind))["data"]
            assert float(settings[f"AGENTMESH_{kind.upper()}_GRACE_PERIOD_S"]) >= 300


def test_topology_spread_selects_the_component_own_pods(manifests):
    for deployment in manifests.of_kind("Deployment"):
        constraints = pod_spec(deployment)["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} >= {"topology.kubernetes.io/zone"}
        for constraint in constraints:
            assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
            assert constraint["matchLabelKeys"] == ["pod-template-hash"]


# ------------------------------------------------------------------------------ settings


def settings_class(kind: str) -> type[BaseSettings]:
    module = importlib.import_module(f"agentmesh.services.{kind}.service")
    prefix = f"AGENTMESH_{kind.upper()}_"
    found = [
        value for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, BaseSettings) and value.model_config.get("env_prefix") == prefix
    ]
    assert len(found) == 1, f"{kind}: expected one Settings class with env prefix {prefix}"
    return found[0]


def env_names(cls: type[BaseSettings]) -> set[str]:
    """Environment variables a pydantic-settings class reads."""
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in cls.model_fields.items():
        names.add(f"{prefix}{field_name}".upper())
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
        names |= {c.upper() for c in choices if isinstance(c, str)}
    return names


def container_env(manifests: Manifests, kind: str) -> dict[str, str]:
    """The environment a service container starts with; secretKeyRef values get stand-ins."""
    deployment = manifests.get("Deployment", name(kind))
    c = container(deployment)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env |= manifests.get("ConfigMap", source["configMapRef"]["name"])["data"]
    standins = {"AGENTMESH_MEMORY_REDIS_URL": "redis://redis-from-secret:6379/0"}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert "secretKeyRef" in var["valueFrom"], var
            env[var["name"]] = standins.get(var["name"], "secret-standin")
    return env


@pytest.mark.parametrize("kind", SERVICES)
def test_the_rendered_settings_are_accepted_by_the_service(manifests, kind, monkeypatch):
    env = container_env(manifests, kind)
    cls = settings_class(kind)
    known = env_names(cls) | env_names(MeshSettings) | {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OTEL_EXPORTER_OTLP_ENDPOINT"}
    unknown = sorted(k for k in env if k not in known)
    assert unknown == [], f"{kind}: no setting reads {unknown}"
    for variable in list(os.environ):
        if variable.startswith(("AGENTMESH_", "OPENAI_", "ANTHROPIC_", "REDIS_", "MILVUS_")):
            monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    settings = cls()  # raises pydantic's ValidationError on a value the service would refuse
    port = {p["name"]: p["containerPort"] for p in container(manifests.get("Deployment", name(kind)))["ports"]}["grpc"]
    assert (settings.host, settings.port) == ("0.0.0.0", port)

    mesh = MeshSettings()
    for callee in SERVICES:
        variable = f"AGENTMESH_{callee.upper()}_ADDRESS"
        if variable not in env:
            continue
        # A dns:/// target naming the headless Service: the channel balances over every ready pod.
        target = getattr(mesh, f"{callee}_address")
        assert target.startswith("dns:///"), target
        host, _, callee_port = target.removeprefix("dns:///").rpartition(":")
        service = manifests.get("Service", host)
        assert service["spec"]["clusterIP"] == "None"
        assert [p["port"] for p in service["spec"]["ports"]] == [int(callee_port)]
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == callee


def test_each_service_knows_the_address_of_exactly_the_services_it_calls(manifests):
    calls = {"orchestrator": {"llm", "retrieval", "memory", "tools"}, "tools": {"retrieval"}}
    for kind in SERVICES:
        data = manifests.get("ConfigMap", name(kind))["data"]
        addresses = {k.removeprefix("AGENTMESH_").removesuffix("_ADDRESS").lower() for k in data if k.endswith("_ADDRESS")}
        assert addresses == calls.get(kind, set()), kind


def test_managed_settings_cannot_be_overridden_through_settings():
    with pytest.raises(RenderError, match=r"memory\.settings\.PORT is managed by the chart: set memory\.port"):
        render(set_values={**MINIMAL, "memory.settings.PORT": "1234"})


def test_a_changed_setting_rolls_only_that_service():
    before = render(set_values=MINIMAL)
    after = render(set_values={**MINIMAL, "orchestrator.settings.MAX_STEPS_LIMIT": "8"})

    def checksum(m: Manifests, kind: str) -> str:
        return m.get("Deployment", name(kind))["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(before, "orchestrator") != checksum(after, "orchestrator")
    assert all(checksum(before, k) == checksum(after, k) for k in SERVICES if k != "orchestrator")


# -------------------------------------------------------------------------- secrets, stores


def test_provider_keys_and_store_credentials_come_from_existing_secrets(rendered):
    manifests = rendered["production"]
    llm_env = {v["name"]: v for v in container(manifests.get("Deployment", name("llm")))["env"]}
    for variable in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        assert llm_env[variable]["valueFrom"]["secretKeyRef"] == {"name": "llm-provider-keys", "key": variable, "optional": True}
    memory_env = {v["name"]: v for v in container(manifests.get("Deployment", name("memory")))["env"]}
    assert memory_env["AGENTMESH_MEMORY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "agentmesh-redis", "key": "url"}
    assert "AGENTMESH_MEMORY_REDIS_URL" not in manifests.get("ConfigMap", name("memory"))["data"]
    retrieval_env = {v["name"]: v for v in container(manifests.get("Deployment", name("retrieval")))["env"]}
    assert retrieval_env["AGENTMESH_RETRIEVAL_MILVUS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "agentmesh-milvus"
    # Without a provider Secret there is no key variable at all.
    assert "env" not in container(rendered["minimal"].get("Deployment", name("llm")))


def test_stores_are_external_by_default(rendered):
    manifests = rendered["minimal"]
    assert manifests.of_kind("StatefulSet") == []
    assert manifests.get("ConfigMap", name("memory"))["data"]["AGENTMESH_MEMORY_REDIS_URL"] == (
        "redis://redis.databases.svc.cluster.local:6379/0")
    assert manifests.get("ConfigMap", name("retrieval"))["data"]["AGENTMESH_RETRIEVAL_MILVUS_URI"] == (
        "http://milvus.databases.svc.cluster.local:19530")


def test_dev_runs_single_node_redis_with_aof_and_embedded_milvus(rendered):
    manifests = rendered["dev"]
    redis = manifests.get("StatefulSet", name("redis"))
    args = container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--dir") + 1] == "/data"
    assert {m["mountPath"]: m["name"] for m in container(redis)["volumeMounts"]}["/data"] == "data"
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    assert redis["spec"]["replicas"] == 1
    assert manifests.get("ConfigMap", name("memory"))["data"]["AGENTMESH_MEMORY_REDIS_URL"] == f"redis://{name('redis')}:6379/0"
    assert manifests.get("Service", name("redis"))["spec"]["ports"][0]["port"] == 6379

    milvus = manifests.get("StatefulSet", name("milvus"))
    env = {v["name"]: v["value"] for v in container(milvus)["env"]}
    assert env["ETCD_USE_EMBED"] == "true" and env["COMMON_STORAGETYPE"] == "local"
    etcd = yaml.safe_load(manifests.get("ConfigMap", name("milvus"))["data"]["embedEtcd.yaml"])
    assert etcd["listen-client-urls"] == "http://127.0.0.1:2379"
    assert container(milvus)["command"] == ["milvus", "run", "standalone"]
    assert manifests.get("ConfigMap", name("retrieval"))["data"]["AGENTMESH_RETRIEVAL_MILVUS_URI"] == f"http://{name('milvus')}:19530"


def test_missing_configuration_fails_the_render_with_the_fix():
    with pytest.raises(RenderError, match=r"set externalRedis\.url \(or externalRedis\.existingSecret\), or redis\.enabled=true"):
        render(set_values={"externalMilvus.uri": "http://m:19530", "gateway.auth.devNoAuth": "true"})
    with pytest.raises(RenderError, match=r"set externalMilvus\.uri, or milvus\.enabled=true"):
        render(set_values={"externalRedis.url": "redis://r:6379", "gateway.auth.devNoAuth": "true"})
    with pytest.raises(RenderError, match=r"gateway\.auth\.devNoAuth=true on a private dev cluster"):
        render(set_values={"externalRedis.url": "redis://r:6379", "externalMilvus.uri": "http://m:19530"})
    with pytest.raises(RenderError, match=r"maxHeapBytes \(1073741824\) must stay below the gateway's memory limit \(1Gi"):
        render(set_values={**MINIMAL, "gateway.maxHeapBytes": "1073741824"})


# ------------------------------------------------------------------------ network policies


def _peer_selects(peer: dict, labels: dict) -> bool:
    # Peers of these policies select pods of the release's own namespace, or IP blocks.
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        return False
    return matches(peer["podSelector"].get("matchLabels", {}), labels)


def _ports_allow(rule: dict, port: int) -> bool:
    return "ports" not in rule or any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in rule["ports"])


def _allows(policies: list[dict], direction: str, peer_labels: dict, port: int) -> bool:
    key = "to" if direction == "egress" else "from"
    for policy in policies:
        for rule in policy["spec"].get(direction, []):
            peers = rule.get(key)
            if _ports_allow(rule, port) and (peers is None or any(_peer_selects(p, peer_labels) for p in peers)):
                return True
    return False


def _pods(manifests: Manifests) -> dict[str, tuple[dict, list[int]]]:
    """component → (pod labels, TCP ports it listens on)."""
    return {
        pod_labels(w)["app.kubernetes.io/component"]: (pod_labels(w), [p["containerPort"] for p in container(w)["ports"]])
        for w in manifests.workloads()
    }


def test_network_policies_allow_exactly_the_calls_of_the_mesh(manifests, variant):
    policies = manifests.of_kind("NetworkPolicy")
    pods = _pods(manifests)
    release = {"app.kubernetes.io/name": "agentmesh", "app.kubernetes.io/instance": RELEASE}
    deny_all = [p for p in policies if p["spec"]["podSelector"]["matchLabels"] == release]
    assert len(deny_all) == 1 and set(deny_all[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny_all[0]["spec"] and "egress" not in deny_all[0]["spec"]

    def applying(labels: dict) -> list[dict]:
        return [p for p in policies if matches(p["spec"]["podSelector"]["matchLabels"], labels)]

    for labels, _ in pods.values():
        assert len(applying(labels)) == 2, f"{labels}: the default deny plus its own policy"

    allowed = set()
    for (src, (src_labels, _)), (dst, (dst_labels, ports)) in itertools.permutations(pods.items(), 2):
        for port in ports:
            if _allows(applying(src_labels), "egress", dst_labels, port) and _allows(applying(dst_labels), "ingress", src_labels, port):
                allowed.add((src, dst))
    expected = {("gateway", k) for k in SERVICES} | {("orchestrator", k) for k in ("llm", "retrieval", "memory", "tools")}
    expected |= {("tools", "retrieval")}
    if variant == "dev":
        expected |= {("memory", "redis"), ("retrieval", "milvus")}
    assert allowed == expected


def test_every_pod_may_resolve_names_and_only_llm_reaches_public_addresses(manifests, variant):
    policies = manifests.of_kind("NetworkPolicy")
    for labels, _ in _pods(manifests).values():
        own = [p for p in policies if p["spec"]["podSelector"]["matchLabels"] == {
            k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")}]
        assert len(own) == 1
        rules = own[0]["spec"]["egress"]
        component = labels["app.kubernetes.io/component"]
        dns = [r for r in rules if any(p.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"} for p in r.get("to", []))]
        if component in ("redis", "milvus"):
            assert rules == [], f"{component} calls nothing"
            continue
        assert dns and {(p["port"], p["protocol"]) for p in dns[0]["ports"]} == {(53, "UDP"), (53, "TCP")}
        blocks = [p["ipBlock"] for r in rules for p in r.get("to", []) if "ipBlock" in p]
        if component != "llm":
            assert blocks == [], component
            continue
        (block,) = blocks
        network = ipaddress.ip_network(block["cidr"])
        excluded = [ipaddress.ip_network(e) for e in block["except"]]

        def reachable(ip: str) -> bool:
            address = ipaddress.ip_address(ip)
            return address in network and not any(address in e for e in excluded)

        assert reachable("104.18.6.192")  # a public provider API address
        assert not reachable("169.254.169.254")  # cloud metadata endpoint
        assert not reachable("10.0.0.7") and not reachable("192.168.1.1")


# ------------------------------------------------------------------------------- monitoring


def test_services_expose_metrics_for_prometheus(manifests):
    for kind in SERVICES:
        deployment = manifests.get("Deployment", name(kind))
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        settings = manifests.get("ConfigMap", name(kind))["data"]
        assert settings[f"AGENTMESH_{kind.upper()}_METRICS_PORT"] == str(ports["metrics"])
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(ports["metrics"]), "/metrics")
    gateway = manifests.get("Deployment", name("gateway"))
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    stats = {p["name"]: p["containerPort"] for p in container(gateway)["ports"]}["stats"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(stats), "/stats/prometheus")


def test_dashboards_and_alert_rules_dropped_into_files_are_shipped(tmp_path):
    copy = chart_copy(tmp_path)
    (copy / "files" / "dashboards").mkdir()
    (copy / "files" / "dashboards" / "mesh.json").write_text('{"title": "AgentMesh", "panels": []}\n')
    (copy / "files" / "alerts").mkdir()
    for group in ("streams", "errors"):
        (copy / "files" / "alerts" / f"{group}.yaml").write_text(
            f"groups:\n  - name: {group}\n    rules:\n      - alert: {group.title()}High\n        expr: vector(1) > 0\n")
    values = {**MINIMAL, "monitoring.grafanaDashboards.enabled": "true", "monitoring.prometheusRule.enabled": "true",
              "monitoring.prometheusRule.labels.release": "kube-prometheus-stack"}
    manifests = render(set_values=values, chart=copy)
    dashboards = manifests.get("ConfigMap", f"{RELEASE}-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert yaml.safe_load(dashboards["data"]["mesh.json"]) == {"title": "AgentMesh", "panels": []}
    rule = manifests.get("PrometheusRule", RELEASE)
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [g["name"] for g in rule["spec"]["groups"]] == ["errors", "streams"]
    # Enabled without the files: a clear refusal, not an empty object.
    with pytest.raises(RenderError, match=r"monitoring\.grafanaDashboards\.enabled but the chart has no files/dashboards"):
        render(set_values={**MINIMAL, "monitoring.grafanaDashboards.enabled": "true"})
    (copy / "files" / "alerts" / "errors.yaml").write_text("- not: a rule file\n")
    with pytest.raises(RenderError, match=r"files/alerts/errors\.yaml must be a Prometheus rule file"):
        render(set_values=values, chart=copy)


# ------------------------------------------------------------------------------------ notes


def render_notes(tmp_path, variant: str) -> str:
    """NOTES.txt as `helm install` would print it (`helm template` does not render it): the copy
    of the chart evaluates the file's text with `tpl` inside a ConfigMap."""
    copy = chart_copy(tmp_path, variants=(variant,))
    (copy / "files" / "notes.txt").write_text((copy / "templates" / "NOTES.txt").read_text())
    (copy / "templates" / "notes-probe.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n'
        '  notes: {{ tpl (.Files.Get "files/notes.txt") . | quote }}\n'
    )
    return render(variant, chart=copy).get("ConfigMap", "notes")["data"]["notes"]


def test_notes_tell_how_to_reach_the_gateway_and_warn_about_dev_settings(tmp_path):
    minimal = render_notes(tmp_path / "minimal", "minimal")
    assert "port-forward svc/agentmesh-gateway 8080:8080" in minimal
    assert "x-api-key" in minimal and "WARNING" not in minimal
    assert "No LLM provider Secret" in minimal
    dev = render_notes(tmp_path / "dev", "dev")
    assert "WARNING: gateway.auth.devNoAuth=true" in dev
    assert "In-chart stores (Redis and Milvus) run as single-node StatefulSets" in dev
    production = render_notes(tmp_path / "production", "production")
    assert "No LLM provider Secret" not in production and "In-chart stores" not in production
