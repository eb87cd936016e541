#!/bin/bash
# preStop hook of the gateway. Starts Envoy's graceful drain (every client connection gets a
# GOAWAY, listeners close after --drain-time-s) and returns once no request is in flight on any
# listener, or after MAX_WAIT_S; the kubelet then sends SIGTERM and Envoy exits. It never
# returns before MIN_WAIT_S: clients that still resolve the old endpoints can connect meanwhile.
# Usage: gateway-drain.sh ADMIN_PORT MAX_WAIT_S MIN_WAIT_S
set -u
port=${1:?usage: gateway-drain.sh ADMIN_PORT MAX_WAIT_S MIN_WAIT_S}
max_wait=${2:?max wait in seconds}
min_wait=${3:?min wait in seconds}

# One admin call (HTTP/1.1, bash's /dev/tcp): the body on stdout; non-zero unless 200.
admin() {
  local status
  exec 3<>"/dev/tcp/127.0.0.1/${port}" || return 1
  printf '%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$1" "$2" >&3
  IFS= read -r -t 5 status <&3 || { exec 3<&-; return 1; }
  cat <&3
  exec 3<&-
  [[ $status == "HTTP/1.1 200 "* ]]
}

# Requests (gRPC streams included) in flight on every HTTP listener but the admin one. The body
# may be chunked: chunk-size lines simply do not match.
active_requests() {
  local body line total=0
  body=$(admin GET '/stats?filter=downstream_rq_active') || return 1
  while IFS= read -r line; do
    line=${line%$'\r'}
    if [[ $line =~ ^http\.([^.]+)\.downstream_rq_active:\ ([0-9]+)$ && ${BASH_REMATCH[1]} != admin ]]; then
      total=$((total + BASH_REMATCH[2]))
    fi
  done <<< "$body"
  echo "$total"
}

admin POST '/drain_listeners?graceful' >/dev/null || exit 0  # Envoy already gone: nothing to drain
while (( SECONDS < max_wait )); do
  if (( SECONDS >= min_wait )); then
    active=$(active_requests) || exit 0
    (( active == 0 )) && exit 0
  fi
  sleep 1
done
exit 0
