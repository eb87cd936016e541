#!/usr/bin/env bash
# Chart CI (`make check-chart`). For every helm/agentmesh/ci/*-values.yaml:
#   1. helm lint --strict (values.schema.json included);
#   2. helm template | kubernetes-validate --strict against Kubernetes $KUBE_VERSION: every
#      object must match its schema, with no unknown field, and have a schema at all (a kind
#      kubernetes-validate does not know is a failure here, not a warning);
# then 3. k8s/ must be what scripts/generate_k8s.py makes of the chart (and, with kubectl
# installed, each overlay's kustomize build must equal the chart's render).
# Tools: $HELM (node_modules/.bin/helm), $KUBERNETES_VALIDATE (.venv/bin/kubernetes-validate),
# $PYTHON (.venv/bin/python). CHART=<dir> runs steps 1-2 on another copy of the chart.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM="${HELM:-node_modules/.bin/helm}"
KV="${KUBERNETES_VALIDATE:-.venv/bin/kubernetes-validate}"
PY="${PYTHON:-.venv/bin/python}"
KUBE_VERSION="${KUBE_VERSION:-1.37.0}"
# Custom resources the chart may render (monitoring.prometheusRule) have no schema in
# kubernetes-validate: a missing schema is tolerated for these kinds only.
NO_SCHEMA_KINDS="${NO_SCHEMA_KINDS:-PrometheusRule}"
CHART="${CHART:-helm/agentmesh}"
export HELM

for tool in "$HELM" "$KV" "$PY"; do
  [[ -x "$tool" ]] || { echo "missing tool $tool: run 'make install'" >&2; exit 1; }
done

shopt -s nullglob
variants=("$CHART"/ci/*-values.yaml)
(( ${#variants[@]} )) || { echo "no $CHART/ci/*-values.yaml" >&2; exit 1; }

failed=0
for values in "${variants[@]}"; do
  name="$(basename "$values" -values.yaml)"
  # Helm warns on stderr about the symlinked files/ (they are followed on purpose).
  if ! lint="$("$HELM" lint --strict "$CHART" -f "$values" 2>&1)"; then
    echo "$lint" | grep -v 'found symbolic link in path' >&2 || true
    echo "FAIL $name: helm lint --strict" >&2
    failed=1
    continue
  fi
  if ! rendered="$("$HELM" template agentmesh "$CHART" --kube-version "$KUBE_VERSION" -f "$values" 2>/dev/null)"; then
    "$HELM" template agentmesh "$CHART" --kube-version "$KUBE_VERSION" -f "$values" 2>&1 >/dev/null \
      | grep -v 'found symbolic link in path' >&2 || true
    echo "FAIL $name: helm template" >&2
    failed=1
    continue
  fi
  # --quiet prints only problems; kubernetes-validate exits 0 on a WARN (no schema for a kind),
  # so any output but a tolerated kind's missing schema fails the check.
  report="$(printf '%s\n' "$rendered" | "$KV" --strict --quiet -k "$KUBE_VERSION" - 2>&1)" && rc=0 || rc=$?
  for kind in $NO_SCHEMA_KINDS; do
    report="$(printf '%s\n' "$report" | grep -v "^WARN .*Couldn't find schema for kind $kind with" || true)"
  done
  if (( rc != 0 )) || [[ -n "$report" ]]; then
    echo "$report" >&2
    echo "FAIL $name: kubernetes-validate --strict -k $KUBE_VERSION" >&2
    failed=1
    continue
  fi
  count="$(printf '%s\n' "$rendered" | grep -c '^kind:')"
  echo "ok   $name: helm lint --strict, $count objects valid for Kubernetes $KUBE_VERSION (strict)"
done

# k8s/ is generated from helm/agentmesh: the drift check is about that chart only.
if [[ "$CHART" -ef helm/agentmesh ]]; then
  "$PY" scripts/generate_k8s.py --check || failed=1
fi
exit "$failed"
