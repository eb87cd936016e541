#!/usr/bin/env bash
# Generate from protos/ with grpcio-tools:
#   gen/python/           the Python contracts (messages, stubs, type hints) of protos/agentmesh
#   gen/descriptors.binpb the FileDescriptorSet of every AgentMesh service with all its imports,
#                         read by the gateway's gRPC-JSON transcoder (gateway/README.md)
#   gen/ts/               the TypeScript contracts (messages and service descriptors, protoc-gen-es
#                         v2) of protos/agentmesh and the google/api files they import, used by
#                         clients/node; the plugin comes from clients/node/node_modules
#                         (`npm ci --prefix clients/node`), PROTOC_GEN_ES overrides its path
#   gen/docs/             the Markdown API reference, one page per package, from the protos'
#                         comments (scripts/generate_proto_docs.py)
# protos/google/api is vendored (see its README.md): it is compiled into the descriptor set, but
# its Python comes from the googleapis-common-protos wheel, so none is generated here.
# `--check` generates into a temporary folder and fails when gen/ differs from it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
ES_PLUGIN="${PROTOC_GEN_ES:-clients/node/node_modules/.bin/protoc-gen-es}"
if [[ ! -x "$ES_PLUGIN" ]]; then
  echo "protoc-gen-es not found at $ES_PLUGIN: run 'npm ci --prefix clients/node' first" >&2
  exit 1
fi
gen() {
  local out="$1"
  rm -rf "$out" && mkdir -p "$out/python" "$out/ts"
  local protos
  protos="$(find protos/agentmesh -name '*.proto' | sort)"
  # shellcheck disable=SC2086 # one argument per proto file is what protoc wants
  "$PY" -m grpc_tools.protoc -Iprotos --python_out="$out/python" --pyi_out="$out/python" \
    --grpc_python_out="$out/python" $protos
  # shellcheck disable=SC2086
  "$PY" -m grpc_tools.protoc -Iprotos --include_imports --descriptor_set_out="$out/descriptors.binpb" $protos
  "$PY" scripts/generate_proto_docs.py --out "$out/docs"
  # TypeScript needs google/api too (the Python comes from a wheel; TS has no such package).
  # import_extension=js: Node's ESM loader wants the extension in relative imports.
  local google_api
  google_api="$(find protos/google/api -name '*.proto' | sort)"
  # shellcheck disable=SC2086
  "$PY" -m grpc_tools.protoc -Iprotos --plugin=protoc-gen-es="$ES_PLUGIN" --es_out="$out/ts" \
    --es_opt=target=ts,import_extension=js $protos $google_api
}
if [[ "${1:-}" == "--check" ]]; then
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  gen "$tmp/gen"
  stale=0
  if ! diff -r -x __pycache__ "$tmp/gen/python" gen/python >/dev/null; then
    diff -r -x __pycache__ "$tmp/gen/python" gen/python | head -40 >&2 || true
    stale=1
  fi
  if ! diff -r "$tmp/gen/ts" gen/ts >/dev/null 2>&1; then
    diff -r "$tmp/gen/ts" gen/ts 2>&1 | head -40 >&2 || true
    stale=1
  fi
  if ! diff -r "$tmp/gen/docs" gen/docs >/dev/null 2>&1; then
    diff -r "$tmp/gen/docs" gen/docs 2>&1 | head -40 >&2 || true
    stale=1
  fi
  if ! cmp -s "$tmp/gen/descriptors.binpb" gen/descriptors.binpb; then
    echo "gen/descriptors.binpb differs from protos/ (or is missing)" >&2
    stale=1
  fi
  if [[ $stale == 1 ]]; then
    echo "generated code is stale: run 'make generate' and commit the result" >&2
    exit 1
  fi
  echo "generated code is up to date"
else
  # Generate beside, then swap, so readers of gen/ never see it half-written.
  tmp="$(mktemp -d gen/.gen.XXXXXX)"; trap 'rm -rf "$tmp"' EXIT
  gen "$tmp/gen"
  rm -rf gen/python && mv "$tmp/gen/python" gen/python
  rm -rf gen/ts && mv "$tmp/gen/ts" gen/ts
  rm -rf gen/docs && mv "$tmp/gen/docs" gen/docs
  mv -f "$tmp/gen/descriptors.binpb" gen/descriptors.binpb
  echo "generated gen/python, gen/ts, gen/docs and gen/descriptors.binpb from protos/"
fi
