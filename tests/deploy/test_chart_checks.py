"""The chart's CI checks (scripts/check_chart.sh, scripts/generate_k8s.py): they pass on the
repository, and each one fails, saying why, on the fault it exists to catch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.deploy.chart import CHART, HELM, REPO, RenderError, chart_copy, helm_template

CHECK = REPO / "scripts" / "check_chart.sh"
GENERATE = REPO / "scripts" / "generate_k8s.py"


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


def test_check_chart_passes_on_the_repository():
    result = run([str(CHECK)])
    assert result.returncode == 0, result.stdout + result.stderr
    for variant in ("minimal", "production", "dev"):
        assert f"ok   {variant}: helm lint --strict" in result.stdout
    assert "valid for Kubernetes 1.37.0 (strict)" in result.stdout
    assert "k8s matches helm/agentmesh" in result.stdout


def test_check_chart_fails_on_an_object_kubernetes_would_refuse(tmp_path):
    copy = chart_copy(tmp_path, variants=("minimal",))
    # Passes the chart's own schema (podSecurityContext is a free-form object), not Kubernetes'.
    (copy / "ci" / "broken-values.yaml").write_text(
        (copy / "ci" / "minimal-values.yaml").read_text() + "defaults:\n  podSecurityContext:\n    runAsUser: root\n"
    )
    result = run([str(CHECK)], env={"CHART": str(copy)})
    assert result.returncode == 1
    assert "ok   minimal" in result.stdout
    assert "FAIL broken: kubernetes-validate --strict -k 1.37.0" in result.stderr
    assert "spec.template.spec.securityContext.runAsUser" in result.stderr


def test_check_chart_fails_on_an_object_without_a_schema(tmp_path):
    copy = chart_copy(tmp_path, variants=("minimal",))
    (copy / "templates" / "unknown.yaml").write_text(
        "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata:\n  name: agentmesh\nspec: {}\n"
    )
    result = run([str(CHECK)], env={"CHART": str(copy)})
    assert result.returncode == 1
    assert "Couldn't find schema for kind ServiceMonitor" in result.stderr
    assert "FAIL minimal: kubernetes-validate" in result.stderr


def test_lint_refuses_a_value_the_schema_does_not_know():
    result = run([HELM, "lint", "--strict", str(CHART), "-f", str(CHART / "ci" / "minimal-values.yaml"),
                  "--set", "orchestrator.replicas=3", "--set", "gateway.corsOriginRegex=it's"])
    assert result.returncode == 1
    assert "orchestrator: Additional property replicas is not allowed" in result.stdout
    assert "gateway.corsOriginRegex: Does not match pattern" in result.stdout


def test_the_chart_carries_the_gateway_sources_themselves():
    for name, source in [("envoy.yaml", "gateway/envoy.yaml"), ("no-jwt.jwks.json", "gateway/no-jwt.jwks.json"),
                         ("descriptors.binpb", "gen/descriptors.binpb")]:
        carried = CHART / "files" / name
        assert carried.is_symlink(), f"files/{name} must link to {source}, not copy it"
        assert carried.resolve() == (REPO / source).resolve()


def test_a_new_template_placeholder_fails_the_render_until_the_chart_fills_it(tmp_path):
    copy = chart_copy(tmp_path, variants=("minimal",))
    envoy = copy / "files" / "envoy.yaml"
    envoy.write_text(
        envoy.read_text()
        + "# ${DOCUMENTED_ONLY} in a comment is documentation\n"
        + 'layered_runtime: { layers: [{ name: static, static_layer: { upstream: "${NEW_UPSTREAM_HOST}" } }] }\n'
    )
    values = [copy / "ci" / "minimal-values.yaml"]
    with pytest.raises(RenderError) as failure:
        helm_template(values, chart=copy)
    message = str(failure.value)
    assert "gateway/envoy.yaml has placeholder(s) ${NEW_UPSTREAM_HOST} that the chart does not fill" in message
    assert "agentmesh.gateway.placeholders in templates/_helpers.tpl" in message
    assert "DOCUMENTED_ONLY" not in message

    # Filling it is one line in the placeholder table.
    helpers = copy / "templates" / "_helpers.tpl"
    text = helpers.read_text()
    assert text.count("LISTEN_ADDRESS: 0.0.0.0\n") == 1
    helpers.write_text(text.replace("LISTEN_ADDRESS: 0.0.0.0\n", 'LISTEN_ADDRESS: 0.0.0.0\nNEW_UPSTREAM_HOST: "new.example"\n'))
    rendered = helm_template(values, chart=copy)
    assert 'static_layer: { upstream: "new.example" }' in rendered
    assert "# ${DOCUMENTED_ONLY} in a comment is documentation" in rendered


def test_k8s_drift_check_names_the_edited_and_the_missing_file(tmp_path):
    k8s = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", k8s)
    clean = run([sys.executable, str(GENERATE), "--check", "--k8s-dir", str(k8s)])
    assert clean.returncode == 0, clean.stderr

    deployment = k8s / "overlays" / "production" / "patches" / "deployment-agentmesh-llm.yaml"
    deployment.write_text(deployment.read_text().replace("- op: remove", "- op: test", 1))
    (k8s / "overlays" / "dev" / "resources.yaml").unlink()
    drift = run([sys.executable, str(GENERATE), "--check", "--k8s-dir", str(k8s)])
    assert drift.returncode == 1
    assert "has drifted from helm/agentmesh (2 file(s): overlays/dev/resources.yaml, " \
           "overlays/production/patches/deployment-agentmesh-llm.yaml)" in drift.stderr
    assert "run scripts/generate_k8s.py and commit the result" in drift.stderr


def test_k8s_overlays_build_to_the_chart_render_with_kustomize():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the generator's own patch check still ran")
    result = run([sys.executable, str(GENERATE), "--check"])
    assert result.returncode == 0, result.stderr
    assert "kubectl kustomize builds dev, production exactly as the chart renders them" in result.stdout
