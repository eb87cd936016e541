"""Render the Envoy gateway template (``gateway/envoy.yaml``) for a local run.

The template is the one source of truth for the gateway; it holds ``${NAME}`` placeholders for
the listener, the admin port and each upstream's host and port (see ``gateway/README.md``).
:func:`render_envoy_config` fills them and refuses to produce a file with a hole in it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

import yaml

from agentmesh.services.runtime.settings import SERVICE_NAMES

#: Where the template lives in a source checkout; ``AGENTMESH_ENVOY_TEMPLATE`` points elsewhere.
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "gateway" / "envoy.yaml"

PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
# A DNS name (RFC 1123 labels); IP literals are checked with ``ipaddress``. Anything else (spaces,
# quotes, YAML syntax) is refused so a host value can never change the config's structure.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


class GatewayConfigError(ValueError):
    """The template cannot be rendered with the values given; the message says which value."""


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


def _check_host(what: str, host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _DNS_NAME.match(host):
        raise GatewayConfigError(f"{what} {host!r} is neither an IP address nor a DNS name")
    return host


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


def render_envoy_config(
    listen_port: int,
    admin_port: int,
    upstreams: Mapping[str, str],
    *,
    listen_address: str = "127.0.0.1",
    template: str | None = None,
) -> str:
    """Fill the gateway template and return the Envoy YAML.

    ``upstreams`` maps each service kind (``orchestrator``, ``llm``, ``retrieval``, ``memory``,
    ``tools``) to the ``host:port`` of its gRPC server. ``listen_address`` is the listener's
    interface (``0.0.0.0`` to accept calls from other machines); the admin interface is always
    bound to 127.0.0.1. ``template`` overrides the text read from :func:`template_path`.

    Raises :class:`GatewayConfigError` naming the value when a port is outside 1..65535, an
    address is malformed, a service kind is unknown, or a placeholder of the template has no
    value (e.g. an upstream missing from ``upstreams``).
    """
    if template is None:
        template = template_path().read_text(encoding="utf-8")
    unknown = sorted(set(upstreams) - set(SERVICE_NAMES))
    if unknown:
        raise GatewayConfigError(f"unknown service kind(s) {unknown} in upstreams; known: {sorted(SERVICE_NAMES)}")

    values = {
        "LISTEN_ADDRESS": _quote_v6(_check_host("listen_address", listen_address)),
        "LISTEN_PORT": str(_check_port("listen_port", listen_port)),
        "ADMIN_PORT": str(_check_port("admin_port", admin_port)),
    }
    if listen_port == admin_port:
        raise GatewayConfigError(f"listen_port and admin_port are both {listen_port}; they must differ")
    for kind, address in upstreams.items():
        host, port = split_address(f"upstream {kind!r}", address)
        values[f"{kind.upper()}_HOST"] = _quote_v6(host)
        values[f"{kind.upper()}_PORT"] = str(port)

    missing = sorted(template_placeholders(template) - set(values))
    if missing:
        kinds = sorted({name.rsplit("_", 1)[0].lower() for name in missing} & set(SERVICE_NAMES))
        hint = f" (no upstream given for {', '.join(kinds)})" if kinds else ""
        raise GatewayConfigError(f"no value for template placeholder(s) {', '.join(missing)}{hint}")

    def fill(match: re.Match[str]) -> str:
        # Comment lines keep their ${NAME} documentation; values go only where a name is known.
        return values.get(match.group(1), match.group(0))

    rendered = "\n".join(line if _is_comment(line) else PLACEHOLDER.sub(fill, line) for line in template.splitlines())
    try:
        yaml.safe_load(rendered)
    except yaml.YAMLError as exc:  # a broken template, not a bad value: values are checked above
        raise GatewayConfigError(f"the rendered gateway config is not valid YAML: {exc}") from exc
    return rendered + "\n"


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
