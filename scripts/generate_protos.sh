#!/usr/bin/env bash
# Generate the Python contracts from protos/ into OUT (default gen/python) with grpcio-tools.
# `--check` generates into a temporary folder and fails when gen/python differs from it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
gen() {
  local out="$1"
  rm -rf "$out" && mkdir -p "$out"
  # shellcheck disable=SC2046 # one argument per proto file is what protoc wants
  "$PY" -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    $(find protos -name '*.proto' | sort)
}
if [[ "${1:-}" == "--check" ]]; then
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  gen "$tmp/python"
  if ! diff -r -x __pycache__ "$tmp/python" gen/python >/dev/null; then
    diff -r -x __pycache__ "$tmp/python" gen/python | head -40 >&2 || true
    echo "gen/python is stale: run 'make generate' and commit the result" >&2
    exit 1
  fi
  echo "generated code is up to date"
else
  # Generate beside, then swap, so readers of gen/python never see it half-written.
  tmp="$(mktemp -d gen/.python.XXXXXX)"; trap 'rm -rf "$tmp"' EXIT
  gen "$tmp/python"
  rm -rf gen/python && mv "$tmp/python" gen/python
  echo "generated gen/python from protos/"
fi
