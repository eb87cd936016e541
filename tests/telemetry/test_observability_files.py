"""observability/: the Grafana dashboard and the Prometheus alert rules are well-formed, every
PromQL expression parses, and every metric they read is one the mesh really exports: the
services' names from the runtime's registry, Envoy's from a real gateway's /stats/prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import agentmesh.services.runtime.telemetry  # noqa: F401 - registers the RPC metrics
from tests.gateway.conftest import envoy_in_front_of, probe_upstreams

ROOT = Path(__file__).resolve().parents[2] / "observability"
DASHBOARD = ROOT / "grafana" / "agentmesh-dashboard.json"
RULES = ROOT / "prometheus" / "agentmesh-alerts.yaml"
# What Grafana substitutes before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$service": ".*", "$job": ".*"}


def metric_names(node) -> set[str]:
    """Names of every series selector in a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        return {node.name} if node.name else set()
    if isinstance(node, promql_parser.MatrixSelector):
        return metric_names(node.vector_selector)
    if isinstance(node, promql_parser.BinaryExpr):
        return metric_names(node.lhs) | metric_names(node.rhs)
    if isinstance(node, promql_parser.Call):
        return set().union(*(metric_names(arg) for arg in node.args))
    if isinstance(node, promql_parser.AggregateExpr | promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return metric_names(node.expr)
    return set()


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append((panel["title"], expr))
    return queries


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def service_metric_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
async def envoy_metric_names(tmp_path_factory) -> set[str]:
    async with probe_upstreams() as upstreams, envoy_in_front_of(upstreams, tmp_path_factory.mktemp("obs")) as gw:
        async with httpx.AsyncClient(timeout=10) as client:
            text = (await client.get(f"http://127.0.0.1:{gw.stats_port}/stats/prometheus")).text
    return {m.group(1) for m in re.finditer(r"^(envoy_\w+)\{", text, re.MULTILINE)}


def test_dashboard_is_a_grafana_dashboard_with_unique_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "agentmesh-overview" and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "service", "job"}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["gridPos"]["w"] <= 24


def test_alert_rules_are_complete():
    seen = set()
    for rule in rules():
        assert rule["alert"].startswith("AgentMesh") and rule["alert"] not in seen
        seen.add(rule["alert"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 40
    assert len(seen) >= 8


async def test_every_expression_parses_and_reads_metrics_that_exist(envoy_metric_names):
    exported = service_metric_names() | envoy_metric_names
    expressions = dashboard_queries() + [(rule["alert"], rule["expr"]) for rule in rules()]
    for where, expr in expressions:
        try:
            parsed = promql_parser.parse(expr)
        except Exception as exc:  # noqa: BLE001 - the parser's own error type is not exported
            pytest.fail(f"{where}: PromQL does not parse: {exc}\n{expr}")
        names = metric_names(parsed)
        assert names, where
        missing = names - exported
        assert not missing, f"{where} reads metrics nobody exports: {sorted(missing)}"
