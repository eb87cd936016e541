{{/*
Names and labels follow the `helm create` scaffold; every object of a component also carries
app.kubernetes.io/component (orchestrator, llm, retrieval, memory, tools, gateway, redis, milvus).
*/}}

{{- define "agentmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Release-wide name. A release whose name already contains the chart name is not repeated
("agentmesh" → agentmesh-orchestrator, not agentmesh-agentmesh-orchestrator).
*/}}
{{- define "agentmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "agentmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of a component's objects: <fullname>-<component>, short enough that "-headless" still fits
in a 63-character DNS label. Argument: (list $ "orchestrator").
*/}}
{{- define "agentmesh.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "agentmesh.fullname" $root) (index . 1) | trunc 54 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of a component. Argument: (list $ "orchestrator"). */}}
{{- define "agentmesh.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "agentmesh.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* All labels of a component's objects. Argument: (list $ "orchestrator"). */}}
{{- define "agentmesh.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "agentmesh.chart" $root }}
{{ include "agentmesh.selectorLabels" . }}
app.kubernetes.io/part-of: agentmesh
{{- if $root.Chart.AppVersion }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- end }}

{{/* Labels every pod of the release has (the default-deny policy selects on them). */}}
{{- define "agentmesh.releaseSelector" -}}
app.kubernetes.io/name: {{ include "agentmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The five services, in dependency order (the gateway is not one of them). */}}
{{- define "agentmesh.serviceKinds" -}}
{{- list "orchestrator" "llm" "retrieval" "memory" "tools" | toJson }}
{{- end }}

{{/*
gRPC service name of each kind (SERVICE_NAMES in services/runtime/settings.py): the name its
grpc.health.v1 status is registered under.
*/}}
{{- define "agentmesh.grpcServiceNames" -}}
orchestrator: agentmesh.agent.v1.AgentService
llm: agentmesh.llm.v1.LLMService
retrieval: agentmesh.retrieval.v1.RetrievalService
memory: agentmesh.memory.v1.MemoryService
tools: agentmesh.tools.v1.ToolService
{{- end }}

{{/*
Who calls each service. The gateway routes to all five; the orchestrator calls the other four;
the tools service calls retrieval (search_documents). NetworkPolicies and the
AGENTMESH_<KIND>_ADDRESS settings of each caller are derived from this one table.
*/}}
{{- define "agentmesh.callers" -}}
orchestrator: [gateway]
llm: [gateway, orchestrator]
retrieval: [gateway, orchestrator, tools]
memory: [gateway, orchestrator]
tools: [gateway, orchestrator]
{{- end }}

{{/* The services a component calls, as a JSON list. Argument: (list $ "orchestrator"). */}}
{{- define "agentmesh.callees" -}}
{{- $caller := index . 1 }}
{{- $callees := list }}
{{- range $kind, $callers := include "agentmesh.callers" (index . 0) | fromYaml }}
{{- if has $caller $callers }}
{{- $callees = append $callees $kind }}
{{- end }}
{{- end }}
{{- $callees | toJson }}
{{- end }}

{{/*
Deep merge for values: maps merge recursively, anything else in the override replaces the base
(including false, 0 and ""; sprig's merge functions would skip those). Argument: (list base
override); returns YAML.
*/}}
{{- define "agentmesh.deepMerge" -}}
{{- $out := deepCopy (index . 0) }}
{{- range $key, $value := index . 1 }}
{{- $current := get $out $key }}
{{- if and (kindIs "map" $value) (kindIs "map" $current) }}
{{- $_ := set $out $key (include "agentmesh.deepMerge" (list $current $value) | fromYaml) }}
{{- else }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
A component's effective values: .Values.defaults overridden by .Values.<component>.
Argument: (list $ "orchestrator"); returns YAML (use with fromYaml).
*/}}
{{- define "agentmesh.component" -}}
{{- $root := index . 0 }}
{{- include "agentmesh.deepMerge" (list $root.Values.defaults (index $root.Values (index . 1))) }}
{{- end }}

{{/* ServiceAccount name. Argument: (list $ "orchestrator" $componentValues). */}}
{{- define "agentmesh.serviceAccountName" -}}
{{- $sa := (index . 2).serviceAccount }}
{{- if $sa.create }}
{{- default (include "agentmesh.componentName" (list (index . 0) (index . 1))) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{- define "agentmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
gRPC target the other services call a service at: the DNS name of its headless Service (short:
the pod's resolv.conf search list finds it in the release's namespace, as for the gateway), so each
channel resolves every ready pod and balances calls over them (round_robin; servers close
connections after maxConnectionAge, so callers re-resolve and reach pods the HPA added). A
ClusterIP would pin each caller's one HTTP/2 connection to one pod. Argument: (list $ "llm").
*/}}
{{- define "agentmesh.address" -}}
{{- $root := index . 0 }}
{{- $kind := index . 1 }}
{{- printf "dns:///%s-headless:%v" (include "agentmesh.componentName" (list $root $kind)) (index $root.Values $kind "port") }}
{{- end }}

{{/* terminationGracePeriodSeconds of a component. Argument: the component's values. */}}
{{- define "agentmesh.terminationGracePeriod" -}}
{{- add .preStopSleepSeconds .drainSeconds 10 }}
{{- end }}

{{/*
topologySpreadConstraints of a component (empty when disabled).
Argument: (list $ "orchestrator" $componentValues).
*/}}
{{- define "agentmesh.topologySpread" -}}
{{- $c := index . 2 }}
{{- if $c.topologySpread.enabled }}
{{- $selector := include "agentmesh.selectorLabels" (list (index . 0) (index . 1)) }}
topologySpreadConstraints:
{{- range $c.topologySpread.topologyKeys }}
  - maxSkew: {{ $c.topologySpread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $c.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- $selector | nindent 8 }}
    # Count only the pods of the current rollout.
    matchLabelKeys:
      - pod-template-hash
{{- end }}
{{- end }}
{{- end }}

{{/* Scheduling fields shared by every pod. Argument: the component's values. */}}
{{- define "agentmesh.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- stores */}}

{{- define "agentmesh.redisName" -}}
{{- include "agentmesh.componentName" (list . "redis") }}
{{- end }}

{{- define "agentmesh.milvusName" -}}
{{- include "agentmesh.componentName" (list . "milvus") }}
{{- end }}

{{/*
Redis URL of the memory service when it is not read from a Secret; fails when no Redis is
configured at all.
*/}}
{{- define "agentmesh.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:%v/0" (include "agentmesh.redisName" .) .Values.redis.port }}
{{- else if .Values.externalRedis.url }}
{{- .Values.externalRedis.url }}
{{- else if not .Values.externalRedis.existingSecret }}
{{- fail "no Redis for the memory service: set externalRedis.url (or externalRedis.existingSecret), or redis.enabled=true for an in-chart dev Redis" }}
{{- end }}
{{- end }}

{{- define "agentmesh.milvusUri" -}}
{{- if .Values.milvus.enabled }}
{{- printf "http://%s:%v" (include "agentmesh.milvusName" .) .Values.milvus.port }}
{{- else if .Values.externalMilvus.uri }}
{{- .Values.externalMilvus.uri }}
{{- else }}
{{- fail "no Milvus for the retrieval service: set externalMilvus.uri, or milvus.enabled=true for an in-chart dev Milvus" }}
{{- end }}
{{- end }}

{{/*
TCP port of a store URL (explicit port, else the scheme's default). Argument: (list url
defaultPort).
*/}}
{{- define "agentmesh.urlPort" -}}
{{- $url := urlParse (index . 0) }}
{{- $hostPort := splitList ":" $url.host }}
{{- if gt (len $hostPort) 1 }}
{{- last $hostPort }}
{{- else if eq $url.scheme "https" }}
{{- 443 }}
{{- else }}
{{- index . 1 }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- gateway */}}

{{/*
Values of the ${NAME} placeholders of gateway/envoy.yaml (see gateway/README.md), one line each:
a placeholder the template gains is one more line here, and a placeholder left without a value
fails the render. Values are inserted verbatim; values.schema.json keeps strings free of the
quote characters of the spot they land in.
*/}}
{{- define "agentmesh.gateway.placeholders" -}}
{{- $g := .Values.gateway }}
{{- $auth := include "agentmesh.gateway.auth" . | fromYaml }}
LISTEN_ADDRESS: 0.0.0.0
LISTEN_PORT: {{ $g.port | quote }}
ADMIN_PORT: {{ $g.adminPort | quote }}
STATS_PORT: {{ $g.statsPort | quote }}
{{- range $kind := include "agentmesh.serviceKinds" . | fromJsonArray }}
{{- /* Headless Services: STRICT_DNS then sees every ready pod and balances per call. */}}
{{ upper $kind }}_HOST: {{ printf "%s-headless" (include "agentmesh.componentName" (list $ $kind)) | quote }}
{{ upper $kind }}_PORT: {{ index $.Values $kind "port" | quote }}
{{- end }}
MAX_HEAP_BYTES: {{ $g.maxHeapBytes | int64 | quote }}
RATE_LIMIT_RUN_RPS: {{ $g.rateLimits.runRps | quote }}
RATE_LIMIT_ADMIN_RPS: {{ $g.rateLimits.adminRps | quote }}
RATE_LIMIT_DEFAULT_RPS: {{ $g.rateLimits.defaultRps | quote }}
CORS_ORIGIN_REGEX: {{ $g.corsOriginRegex | quote }}
DEV_NO_AUTH: {{ $auth.devNoAuth | quote }}
JWT_ISSUER: {{ $auth.issuer | quote }}
JWT_AUDIENCE: {{ $auth.audience | quote }}
JWKS_PATH: {{ $auth.jwksPath | quote }}
API_KEYS_PATH: {{ $auth.apiKeysPath | quote }}
DESCRIPTOR_SET_PATH: "/etc/envoy/descriptors.binpb"
OTLP_HOST: {{ default "127.0.0.1" .Values.telemetry.otlp.host | quote }}
OTLP_PORT: {{ .Values.telemetry.otlp.port | quote }}
TRACE_SAMPLING_PERCENT: {{ .Values.telemetry.traceSamplingPercent | quote }}
{{- end }}

{{/*
The gateway's authentication, as gateway/README.md defines it: JWT (a JWKS Secret, issuer and
audience), API keys (a key table Secret), or both. Without JWT the provider gets the no-JWT key
set (gateway/no-jwt.jwks.json: a public key nobody has the private key of) and a dummy issuer,
since Envoy needs a loadable provider even when unused. With neither, the render fails unless
gateway.auth.devNoAuth says authentication is off.
*/}}
{{- define "agentmesh.gateway.auth" -}}
{{- $auth := .Values.gateway.auth }}
{{- $jwt := $auth.jwt.jwksSecret }}
{{- $keys := $auth.apiKeys.existingSecret }}
{{- if and $jwt (not (and $auth.jwt.issuer $auth.jwt.audience)) }}
{{- fail "gateway.auth.jwt.jwksSecret is set: set gateway.auth.jwt.issuer and .audience too (every token must carry them as iss and aud)" }}
{{- end }}
{{- if and (not $auth.devNoAuth) (not $jwt) (not $keys) }}
{{- fail "the gateway authenticates every call: set gateway.auth.jwt (jwksSecret, issuer, audience) and/or gateway.auth.apiKeys.existingSecret, or gateway.auth.devNoAuth=true on a private dev cluster" }}
{{- end }}
{{- if and $auth.devNoAuth (or $jwt $keys) }}
{{- fail "gateway.auth.devNoAuth=true turns authentication off, yet gateway.auth.jwt.jwksSecret or gateway.auth.apiKeys.existingSecret is set: choose one" }}
{{- end }}
devNoAuth: {{ ternary "true" "false" $auth.devNoAuth }}
{{- if $jwt }}
issuer: {{ $auth.jwt.issuer | quote }}
audience: {{ $auth.jwt.audience | quote }}
jwksPath: {{ printf "/etc/agentmesh/jwks/%s" $auth.jwt.jwksSecretKey | quote }}
{{- else }}
issuer: agentmesh-jwt-disabled
audience: agentmesh-jwt-disabled
jwksPath: /etc/envoy/no-jwt.jwks.json
{{- end }}
{{- if $keys }}
apiKeysPath: {{ printf "/etc/agentmesh/api-keys/%s" $auth.apiKeys.existingSecretKey | quote }}
{{- else }}
apiKeysPath: /dev/null
{{- end }}
{{- end }}

{{/*
gateway/envoy.yaml (carried as files/envoy.yaml, a symlink) with every placeholder filled.
Fails when a placeholder outside a comment line has no value.
*/}}
{{- define "agentmesh.gateway.envoyConfig" -}}
{{- $config := .Files.Get "files/envoy.yaml" }}
{{- if not $config }}
{{- fail "files/envoy.yaml is missing or empty: it must be a symlink to gateway/envoy.yaml (or a copy of it)" }}
{{- end }}
{{- $values := include "agentmesh.gateway.placeholders" . | fromYaml }}
{{- /* Like the local renderer: comment lines keep their ${NAME} documentation. */}}
{{- $lines := list }}
{{- $left := list }}
{{- range $line := splitList "\n" $config }}
{{- if and (contains "${" $line) (not (regexMatch "^[ \t]*#" $line)) }}
{{- range $name, $value := $values }}
{{- $line = replace (printf "${%s}" $name) (toString $value) $line }}
{{- end }}
{{- $left = concat $left (regexFindAll "\\$\\{[A-Za-z0-9_]+\\}" $line -1) }}
{{- end }}
{{- $lines = append $lines $line }}
{{- end }}
{{- if $left }}
{{- fail (printf "gateway/envoy.yaml has placeholder(s) %s that the chart does not fill: add them to agentmesh.gateway.placeholders in templates/_helpers.tpl" (join ", " (uniq $left))) }}
{{- end }}
{{- $config = join "\n" $lines }}
{{- $config }}
{{- end }}

{{/*
A Kubernetes memory quantity in bytes ("512Mi" → 536870912), "" for forms it does not handle
(exponents, fractions). Argument: the quantity.
*/}}
{{- define "agentmesh.bytes" -}}
{{- $q := toString . }}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "" 1 }}
{{- $m := regexFindAll "^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$" $q 1 }}
{{- if $m }}
{{- $number := regexReplaceAll "^([0-9]+).*$" $q "${1}" }}
{{- $unit := regexReplaceAll "^[0-9]+" $q "" }}
{{- mul (int64 $number) (index $units $unit) }}
{{- end }}
{{- end }}
