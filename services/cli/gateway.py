"""Render the Envoy gateway template (``gateway/envoy.yaml``) for a local run.

The template is the one source of truth for the gateway; it holds ``${NAME}`` placeholders for
the listeners, the upstreams, authentication, limits, transcoding and tracing (every one is listed
in ``gateway/README.md``). :func:`render_envoy_config` fills them from checked values and refuses
to produce a file with a hole in it; :class:`GatewaySettings` reads the local run's choices from
the environment (``AGENTMESH_GATEWAY_*``).

Without a JWKS file or an API key file the gateway is rendered in **dev mode**
(``DEV_NO_AUTH=true``): no authentication, the client's own ``x-tenant-id`` is believed. That is
for a laptop only, never for a gateway others can reach.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentmesh.services.runtime.context import TENANT_PATTERN
from agentmesh.services.runtime.settings import SERVICE_NAMES

_REPO = Path(__file__).resolve().parents[2]
#: Where the template lives in a source checkout; ``AGENTMESH_ENVOY_TEMPLATE`` points elsewhere.
DEFAULT_TEMPLATE = _REPO / "gateway" / "envoy.yaml"
#: The FileDescriptorSet written by ``scripts/generate_protos.sh`` for gRPC-JSON transcoding.
DEFAULT_DESCRIPTOR_SET = _REPO / "gen" / "descriptors.binpb"
#: JWKS used when JWT authentication is off (see :func:`no_jwt_jwks`): Envoy needs a loadable key
#: set even for a disabled provider, and no token can ever verify against this one.
NO_JWT_JWKS = _REPO / "gateway" / "no-jwt.jwks.json"
#: API key table used when API keys are off: an empty file.
NO_API_KEYS = Path("/dev/null")
#: Issuer and audience rendered when JWT authentication is off.
JWT_DISABLED = "agentmesh-jwt-disabled"
#: Browser origins allowed by default: pages served from this machine.
LOCAL_ORIGINS = r"^https?://(localhost|127\.0\.0\.1)(:[0-9]{1,5})?$"

PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
# A DNS name (RFC 1123 labels); IP literals are checked with ``ipaddress``. Anything else (spaces,
# quotes, YAML syntax) is refused so a host value can never change the config's structure.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
# File paths and JWT issuer/audience end up inside double-quoted YAML and Lua strings: no quote,
# backslash, whitespace or control character may reach them.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+@-]{0,4095}$")
_SAFE_URI = re.compile(r"^[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]{1,512}$")
# API keys: opaque tokens of URL-safe characters, long enough not to be guessed.
_API_KEY = re.compile(r"^[A-Za-z0-9._~+/=-]{24,256}$")
_ROLE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_SUBJECT = re.compile(r"^[^\s#]{1,256}$")


class GatewayConfigError(ValueError):
    """The template cannot be rendered with the values given; the message says which value."""


# ------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class GatewayAuth:
    """Credentials the gateway accepts; at least one of the two files must be given.

    ``jwks_path``: a JSON Web Key Set file (RFC 7517) with the public keys tokens are signed with;
    ``issuer`` and ``audience`` must then be set and every token must carry exactly that ``iss``
    and ``aud`` (and an ``exp``). ``api_keys_path``: the API key table (one key per line:
    ``<key> <tenant> <subject> [role,role...]``, see gateway/README.md).
    """

    jwks_path: Path | None = None
    issuer: str = ""
    audience: str = ""
    api_keys_path: Path | None = None


@dataclass(frozen=True)
class RateLimits:
    """Requests per second (also the burst size) of each route's local token bucket, per Envoy
    instance: ``run`` for AgentService.Run, ``admin`` for the admin routes (ingestion...),
    ``default`` for every other route."""

    run: int = 20
    admin: int = 5
    default: int = 200


@dataclass(frozen=True)
class GatewayOptions:
    """Everything of the gateway but its ports and upstreams.

    ``auth=None`` renders dev mode (no authentication). ``otlp_address`` is the ``host:port`` of
    an OTLP/gRPC trace collector (undeliverable spans are dropped); ``trace_sampling_percent``
    the share of calls without a sampled client ``traceparent`` that are traced (0..100).
    ``max_heap_bytes`` is the overload manager's heap budget: the gateway sheds load from 90 %.
    """

    auth: GatewayAuth | None = None
    descriptor_set: Path = DEFAULT_DESCRIPTOR_SET
    cors_origin_regex: str = LOCAL_ORIGINS
    rate_limits: RateLimits = field(default_factory=RateLimits)
    max_heap_bytes: int = 1 << 30
    otlp_address: str = "127.0.0.1:4317"
    trace_sampling_percent: float = 100.0


class GatewaySettings(BaseSettings):
    """The local gateway's settings from the environment (``AGENTMESH_GATEWAY_*``).

    With neither ``AGENTMESH_GATEWAY_JWKS_FILE`` nor ``AGENTMESH_GATEWAY_API_KEYS_FILE`` set the
    gateway runs in dev mode (no authentication). The trace collector is taken from the standard
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the services read
    the same variables), else ``127.0.0.1:4317``.
    """

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_GATEWAY_", extra="ignore")

    jwks_file: Path | None = Field(None, description="JWKS file of the token signing keys; turns JWT auth on.")
    jwt_issuer: str = Field("", description="Required `iss` of every token.")
    jwt_audience: str = Field("", description="Required `aud` of every token.")
    api_keys_file: Path | None = Field(None, description="API key table; turns API key auth on.")
    cors_origin_regex: str = Field(LOCAL_ORIGINS, description="Browser origins allowed (RE2, whole origin).")
    rate_limit_run_rps: int = Field(20, ge=1, le=1_000_000, description="Run calls per second per gateway.")
    rate_limit_admin_rps: int = Field(5, ge=1, le=1_000_000, description="Admin calls per second per route.")
    rate_limit_default_rps: int = Field(200, ge=1, le=1_000_000, description="Other calls per second per route.")
    max_heap_bytes: int = Field(1 << 30, ge=64 << 20, description="Envoy heap budget in bytes.")
    trace_sampling_percent: float = Field(100.0, ge=0, le=100, description="Share of new traces sampled, %.")

    @property
    def dev_mode(self) -> bool:
        return self.jwks_file is None and self.api_keys_file is None

    def options(self) -> GatewayOptions:
        """The :class:`GatewayOptions` these settings stand for (files are checked at render)."""
        auth = None
        if not self.dev_mode:
            auth = GatewayAuth(
                jwks_path=self.jwks_file and self.jwks_file.expanduser().resolve(),
                issuer=self.jwt_issuer,
                audience=self.jwt_audience,
                api_keys_path=self.api_keys_file and self.api_keys_file.expanduser().resolve(),
            )
        return GatewayOptions(
            auth=auth,
            cors_origin_regex=self.cors_origin_regex,
            rate_limits=RateLimits(self.rate_limit_run_rps, self.rate_limit_admin_rps, self.rate_limit_default_rps),
            max_heap_bytes=self.max_heap_bytes,
            otlp_address=otlp_address_from_env(),
            trace_sampling_percent=self.trace_sampling_percent,
        )


def otlp_address_from_env(default: str = "127.0.0.1:4317") -> str:
    """``host:port`` of the OTLP/gRPC collector named by the standard OpenTelemetry variables
    (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, then ``OTEL_EXPORTER_OTLP_ENDPOINT``; a URL such as
    ``http://collector:4317``), else ``default``."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        value = os.environ.get(name, "").strip()
        if value:
            parts = urlsplit(value if "://" in value else f"http://{value}")
            if not parts.hostname:
                raise GatewayConfigError(f"{name}={value!r} names no host; use e.g. http://127.0.0.1:4317")
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            return f"{host}:{parts.port or 4317}"
    return default


# ---------------------------------------------------------------------------- credential files


def parse_api_keys(text: str, source: str = "API key file") -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Parse an API key table: ``{key: (tenant, subject, roles)}``.

    One key per line, ``<key> <tenant> <subject> [role,role...]`` separated by spaces; blank
    lines and lines starting with ``#`` are ignored. A key is 24..256 characters of
    ``[A-Za-z0-9._~+/=-]``, a tenant 1..64 of ``[A-Za-z0-9_-]`` (the mesh's tenant rule), a role
    1..64 of ``[A-Za-z0-9._:-]``. Raises :class:`GatewayConfigError` naming the line of the first
    problem (the key itself is never echoed) or a key given twice.
    """
    table: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{source}, line {number}"
        if len(words) not in (3, 4):
            raise GatewayConfigError(
                f"{where}: expected '<key> <tenant> <subject> [role,role...]', got {len(words)} fields"
            )
        key, tenant, subject = words[:3]
        roles = tuple(words[3].split(",")) if len(words) == 4 else ()
        if not _API_KEY.match(key):
            raise GatewayConfigError(f"{where}: the key must be 24..256 characters of [A-Za-z0-9._~+/=-]")
        if not TENANT_PATTERN.match(tenant):
            raise GatewayConfigError(f"{where}: tenant {tenant!r} must be 1..64 characters of [A-Za-z0-9_-]")
        if not _SUBJECT.match(subject):
            raise GatewayConfigError(f"{where}: subject {subject!r} must be 1..256 characters without spaces or '#'")
        bad = [r for r in roles if not _ROLE.match(r)]
        if bad:
            raise GatewayConfigError(f"{where}: role(s) {bad} must be 1..64 characters of [A-Za-z0-9._:-]")
        if key in table:
            raise GatewayConfigError(f"{where}: this key is already listed on an earlier line")
        table[key] = (tenant, subject, roles)
    return table


def check_jwks(path: Path) -> int:
    """Check that ``path`` holds a JWKS (``{"keys": [...]}`` with at least one key that has a
    ``kty``) and return its number of keys. Envoy checks the keys themselves when it loads the
    config. Raises :class:`GatewayConfigError`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GatewayConfigError(f"cannot read the JWKS file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise GatewayConfigError(f"the JWKS file {path} is not JSON: {exc}") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) and k.get("kty") for k in keys):
        raise GatewayConfigError(f"the JWKS file {path} must be {{\"keys\": [...]}} with at least one key (RFC 7517)")
    if any("d" in k for k in keys):
        raise GatewayConfigError(f"the JWKS file {path} holds a PRIVATE key ('d'); give the gateway public keys only")
    return len(keys)


# P-256 (SEC 2 / FIPS 186-4 D.1.2.3): y^2 = x^3 - 3x + b over GF(p).
_P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
_P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
NO_JWT_SEED = b"AgentMesh gateway: JWT authentication is off; no private key exists for this point"


def no_jwt_jwks() -> dict:
    """The JWKS rendered when JWT authentication is off: one P-256 public key whose private key
    nobody knows, so no token verifies against it.

    Envoy refuses to load a JWT provider without a valid public key, even a disabled one. The
    point is chosen "nothing up my sleeve": x is the first SHA-256(seed || counter) that lies on
    the curve (y = the even square root, p = 3 mod 4), so the key was derived, not generated, and
    finding its private key is the elliptic-curve discrete logarithm problem. ``gateway/no-jwt.jwks.json``
    is this function's output (a test keeps them equal).
    """
    p = _P256_P
    counter = 0
    while True:
        x = int.from_bytes(hashlib.sha256(NO_JWT_SEED + counter.to_bytes(4, "big")).digest(), "big")
        rhs = (pow(x, 3, p) - 3 * x + _P256_B) % p
        y = pow(rhs, (p + 1) // 4, p)
        if x < p and y * y % p == rhs:
            break
        counter += 1
    y = y if y % 2 == 0 else p - y

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    key = {"kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y), "kid": "agentmesh-no-jwt", "alg": "ES256"}
    return {"keys": [key | {"use": "sig"}]}


# ----------------------------------------------------------------------------------- checks


def template_path() -> Path:
    """Path of the Envoy template: ``$AGENTMESH_ENVOY_TEMPLATE`` or ``gateway/envoy.yaml``."""
    return Path(os.environ.get("AGENTMESH_ENVOY_TEMPLATE") or DEFAULT_TEMPLATE)


def template_placeholders(template: str) -> set[str]:
    """Names of the ``${NAME}`` placeholders used in ``template`` (comment lines excluded)."""
    return {m.group(1) for line in template.splitlines() if not _is_comment(line) for m in PLACEHOLDER.finditer(line)}


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _check_port(what: str, port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise GatewayConfigError(f"{what} must be a TCP port 1..65535, got {port!r}")
    return port


def _check_int(what: str, value: object, low: int, high: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise GatewayConfigError(f"{what} must be an integer {low}..{high}, got {value!r}")
    return str(value)


def _check_host(what: str, host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _DNS_NAME.match(host):
        raise GatewayConfigError(f"{what} {host!r} is neither an IP address nor a DNS name")
    return host


def _check_file(what: str, path: Path, must_exist: bool = True) -> str:
    text = str(path)
    if not _SAFE_PATH.match(text):
        raise GatewayConfigError(f"{what} {text!r} must be an absolute path of [A-Za-z0-9._/+@-] characters")
    if must_exist and not path.exists():
        raise GatewayConfigError(f"{what} {text} does not exist")
    return text


def _check_uri(what: str, value: str) -> str:
    if not _SAFE_URI.match(value or ""):
        raise GatewayConfigError(f"{what} {value!r} must be 1..512 URI characters (no spaces, quotes or backslashes)")
    return value


def _check_regex(what: str, value: str) -> str:
    if not value or len(value) > 512 or any(c in value for c in "'\n\r\t"):
        raise GatewayConfigError(f"{what} must be 1..512 characters without quotes or line breaks, got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise GatewayConfigError(f"{what} {value!r} is not a regular expression: {exc}") from None
    return value


def _quote_v6(host: str) -> str:
    # An IPv6 literal is quoted: a bare '::1' is not a plain scalar inside a YAML flow mapping.
    return f'"{host}"' if ":" in host else host


def split_address(what: str, address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) → (host, port). Raises GatewayConfigError."""
    if not isinstance(address, str) or ":" not in address:
        raise GatewayConfigError(f"{what} must be 'host:port', got {address!r}")
    host, _, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit():
        raise GatewayConfigError(f"{what} must be 'host:port' with a numeric port, got {address!r}")
    return _check_host(what, host), _check_port(what, int(port_text))


def _auth_values(auth: GatewayAuth | None) -> dict[str, str]:
    if auth is None:
        return {
            "DEV_NO_AUTH": "true",
            "JWKS_PATH": _check_file("the no-JWT JWKS", NO_JWT_JWKS),
            "JWT_ISSUER": JWT_DISABLED,
            "JWT_AUDIENCE": JWT_DISABLED,
            "API_KEYS_PATH": str(NO_API_KEYS),
        }
    if auth.jwks_path is None and auth.api_keys_path is None:
        raise GatewayConfigError("authentication needs a JWKS file, an API key file or both (auth=None is dev mode)")
    values = {"DEV_NO_AUTH": "false"}
    if auth.jwks_path is not None:
        values["JWKS_PATH"] = _check_file("JWKS file", auth.jwks_path)
        check_jwks(auth.jwks_path)
        values["JWT_ISSUER"] = _check_uri("JWT issuer", auth.issuer)
        values["JWT_AUDIENCE"] = _check_uri("JWT audience", auth.audience)
    else:
        values["JWKS_PATH"] = _check_file("the no-JWT JWKS", NO_JWT_JWKS)
        values["JWT_ISSUER"] = values["JWT_AUDIENCE"] = JWT_DISABLED
    if auth.api_keys_path is not None:
        values["API_KEYS_PATH"] = _check_file("API key file", auth.api_keys_path)
        try:
            text = auth.api_keys_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GatewayConfigError(f"cannot read the API key file {auth.api_keys_path}: {exc}") from None
        parse_api_keys(text, str(auth.api_keys_path))
    else:
        values["API_KEYS_PATH"] = str(NO_API_KEYS)
    return values


# --------------------------------------------------------------------------------- rendering


def render_envoy_config(
    listen_port: int,
    admin_port: int,
    upstreams: Mapping[str, str | Sequence[str]],
    *,
    listen_address: str = "127.0.0.1",
    stats_port: int | None = None,
    options: GatewayOptions | None = None,
    template: str | None = None,
) -> str:
    """Fill the gateway template and return the Envoy YAML.

    ``upstreams`` maps each service kind (``orchestrator``, ``llm``, ``retrieval``, ``memory``,
    ``tools``) to the ``host:port`` of its gRPC server, or to a list of them (replicas: every one
    becomes an endpoint of the kind's cluster, balanced per call, health-checked and ejected on
    its own; the config is then written back from the parsed YAML, without the template's
    comments). ``listen_address`` is the interface of the public and stats listeners
    (``0.0.0.0`` to accept calls from other machines); the admin
    interface is always bound to 127.0.0.1. ``stats_port`` (Prometheus and readiness) defaults to
    ``admin_port + 1``. ``options`` carries authentication, limits, transcoding and tracing
    (default: :class:`GatewayOptions` — dev mode, no authentication). ``template`` overrides the
    text read from :func:`template_path`.

    Raises :class:`GatewayConfigError` naming the value when a port is outside 1..65535 or two
    ports are equal, an address, path, issuer, audience or regex is malformed, a credential file is
    missing or malformed, a service kind is unknown, a list of replicas is empty or names an
    address twice, or a placeholder of the template has no value (e.g. an upstream missing from
    ``upstreams``).
    """
    if template is None:
        template = template_path().read_text(encoding="utf-8")
    options = options or GatewayOptions()
    unknown = sorted(set(upstreams) - set(SERVICE_NAMES))
    if unknown:
        raise GatewayConfigError(f"unknown service kind(s) {unknown} in upstreams; known: {sorted(SERVICE_NAMES)}")

    if stats_port is None:
        stats_port = admin_port + 1 if isinstance(admin_port, int) and not isinstance(admin_port, bool) else admin_port
    values = {
        "LISTEN_ADDRESS": _quote_v6(_check_host("listen_address", listen_address)),
        "LISTEN_PORT": str(_check_port("listen_port", listen_port)),
        "ADMIN_PORT": str(_check_port("admin_port", admin_port)),
        "STATS_PORT": str(_check_port("stats_port", stats_port)),
    }
    if listen_port == admin_port:
        raise GatewayConfigError(f"listen_port and admin_port are both {listen_port}; they must differ")
    if stats_port in (listen_port, admin_port):
        raise GatewayConfigError(f"stats_port {stats_port} must differ from listen_port and admin_port")
    replicas: dict[str, list[tuple[str, int]]] = {}
    for kind, given in upstreams.items():
        addresses = [given] if isinstance(given, str) else list(given)
        if not addresses:
            raise GatewayConfigError(f"upstream {kind!r} has an empty list of addresses")
        endpoints = [split_address(f"upstream {kind!r}", address) for address in addresses]
        if len(set(endpoints)) != len(endpoints):
            raise GatewayConfigError(f"upstream {kind!r} lists an address twice: {addresses}")
        host, port = endpoints[0]
        values[f"{kind.upper()}_HOST"] = _quote_v6(host)
        values[f"{kind.upper()}_PORT"] = str(port)
        if len(endpoints) > 1:
            replicas[kind] = endpoints[1:]

    wanted = template_placeholders(template)
    if wanted - set(values):  # the option values are checked only when the template uses them
        values |= _option_values(options, wanted)

    missing = sorted(wanted - set(values))
    if missing:
        kinds = sorted({name.rsplit("_", 1)[0].lower() for name in missing} & set(SERVICE_NAMES))
        hint = f" (no upstream given for {', '.join(kinds)})" if kinds else ""
        raise GatewayConfigError(f"no value for template placeholder(s) {', '.join(missing)}{hint}")

    def fill(match: re.Match[str]) -> str:
        # Comment lines keep their ${NAME} documentation; values go only where a name is known.
        return values.get(match.group(1), match.group(0))

    rendered = "\n".join(line if _is_comment(line) else PLACEHOLDER.sub(fill, line) for line in template.splitlines())
    try:
        parsed = yaml.safe_load(rendered)
    except yaml.YAMLError as exc:  # a broken template, not a bad value: values are checked above
        raise GatewayConfigError(f"the rendered gateway config is not valid YAML: {exc}") from exc
    if not replicas:
        return rendered + "\n"
    for kind, extra in replicas.items():
        _add_endpoints(parsed, kind, extra)
    return yaml.safe_dump(parsed, sort_keys=False)


def _add_endpoints(config: dict, kind: str, endpoints: list[tuple[str, int]]) -> None:
    """Append ``endpoints`` to the one locality of cluster ``kind`` (what STRICT_DNS would find
    behind a name with several addresses, e.g. a headless Service with several ready pods)."""
    clusters = (config.get("static_resources") or {}).get("clusters") or []
    cluster = next((c for c in clusters if c.get("name") == kind), None)
    try:
        lb_endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]  # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        raise GatewayConfigError(f"the gateway template has no cluster {kind!r} with endpoints for replicas") from None
    for host, port in endpoints:
        lb_endpoints.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}})


def _option_values(options: GatewayOptions, wanted: set[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    if wanted & {"DEV_NO_AUTH", "JWKS_PATH", "JWT_ISSUER", "JWT_AUDIENCE", "API_KEYS_PATH"}:
        values |= _auth_values(options.auth)
    if "DESCRIPTOR_SET_PATH" in wanted:
        values["DESCRIPTOR_SET_PATH"] = _check_file("descriptor set (run `make generate`)", options.descriptor_set)
    limits = options.rate_limits
    values["CORS_ORIGIN_REGEX"] = _check_regex("cors_origin_regex", options.cors_origin_regex)
    values["RATE_LIMIT_RUN_RPS"] = _check_int("rate_limits.run", limits.run, 1, 1_000_000)
    values["RATE_LIMIT_ADMIN_RPS"] = _check_int("rate_limits.admin", limits.admin, 1, 1_000_000)
    values["RATE_LIMIT_DEFAULT_RPS"] = _check_int("rate_limits.default", limits.default, 1, 1_000_000)
    values["MAX_HEAP_BYTES"] = _check_int("max_heap_bytes", options.max_heap_bytes, 64 << 20, 1 << 40)
    otlp_host, otlp_port = split_address("otlp_address", options.otlp_address)
    values["OTLP_HOST"], values["OTLP_PORT"] = _quote_v6(otlp_host), str(otlp_port)
    sampling = options.trace_sampling_percent
    if isinstance(sampling, bool) or not isinstance(sampling, int | float) or not 0 <= sampling <= 100:
        raise GatewayConfigError(f"trace_sampling_percent must be a number 0..100, got {sampling!r}")
    values["TRACE_SAMPLING_PERCENT"] = f"{float(sampling):g}"
    return values


def validate_with_envoy(config_path: Path, envoy: str | None = None, timeout_s: float = 30.0) -> None:
    """Run ``envoy --mode validate`` on ``config_path``. Raises GatewayConfigError with Envoy's
    own message when the config is rejected."""
    from agentmesh.services.cli.processes import envoy_binary  # noqa: PLC0415 - keeps import light

    result = subprocess.run(
        [envoy or envoy_binary(), "--mode", "validate", "--disable-hot-restart", "-l", "error", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise GatewayConfigError(f"envoy rejected {config_path}: " + " | ".join(detail))
