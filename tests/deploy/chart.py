"""Render the Helm chart with the real Helm and look at what it made (helpers for tests/deploy).

No Kubernetes API server exists here, so a "pod" of the gateway is simulated the way the
kubelet would set it up: :func:`materialize_gateway` writes the ConfigMap and Secret volumes of
the gateway Deployment under a temporary root and points the rendered Envoy config at them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "agentmesh"
HELM = os.environ.get("HELM") or str(REPO / "node_modules" / ".bin" / "helm")
#: Kubernetes version the chart is rendered and validated for (scripts/check_chart.sh).
KUBE_VERSION = "1.37.0"
RELEASE = "agentmesh"
VARIANTS = ("minimal", "production", "dev")
SERVICES = ("orchestrator", "llm", "retrieval", "memory", "tools")


class RenderError(RuntimeError):
    """``helm template`` failed; the message is Helm's."""


def helm_template(
    values_files: Iterable[Path] = (), set_values: Mapping[str, str] | None = None, chart: Path = CHART
) -> str:
    """``helm template agentmesh <chart>`` → the manifests as text. Raises :class:`RenderError`."""
    argv = [HELM, "template", RELEASE, str(chart), "--kube-version", KUBE_VERSION]
    for path in values_files:
        argv += ["-f", str(path)]
    for name, value in (set_values or {}).items():
        argv += ["--set", f"{name}={value}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if "found symbolic link in path" not in line]
        raise RenderError("\n".join(lines))
    return result.stdout


@dataclass
class Manifests:
    """The objects of one render."""

    docs: list[dict]

    @classmethod
    def parse(cls, text: str) -> Manifests:
        return cls([doc for doc in yaml.safe_load_all(text) if doc])

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
        return found[0]

    def find(self, kind: str, name: str) -> dict | None:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        return found[0] if found else None

    def workloads(self) -> list[dict]:
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")

    def envoy_config_text(self) -> str:
        return self.get("ConfigMap", f"{RELEASE}-gateway")["data"]["envoy.yaml"]


def render(variant: str | None = None, set_values: Mapping[str, str] | None = None, chart: Path = CHART,
           extra_values: Iterable[Path] = ()) -> Manifests:
    """The chart rendered with ``ci/<variant>-values.yaml`` (and ``--set`` overrides)."""
    files = [chart / "ci" / f"{variant}-values.yaml"] if variant else []
    return Manifests.parse(helm_template([*files, *extra_values], set_values, chart))


def chart_copy(tmp_path: Path, variants: tuple[str, ...] = ()) -> Path:
    """A real-file copy of the chart (symlinks resolved) keeping only the given ci variants."""
    copy = tmp_path / "agentmesh"
    shutil.copytree(CHART, copy, symlinks=False)
    for values in (copy / "ci").glob("*-values.yaml"):
        if values.name.removesuffix("-values.yaml") not in variants:
            values.unlink()
    return copy


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']} has {len(containers)} containers"
    return containers[0]


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a matchLabels selector selects objects with ``labels``."""
    return all(labels.get(k) == v for k, v in selector.items())


#: Stand-ins for the Secrets the chart expects to exist, by key: a JWKS (one public key, the
#: gateway's own no-JWT key set), an API key table, and values for secretKeyRef variables.
JWKS_STANDIN = (REPO / "gateway" / "no-jwt.jwks.json").read_text(encoding="utf-8")
API_KEYS_STANDIN = "test-key-0123456789abcdefghij tenant-a alice admin\n"


def materialize_gateway(manifests: Manifests, root: Path) -> Path:
    """Lay out the gateway container's mounted volumes under ``root`` as the kubelet would
    (ConfigMap keys, Secret items with stand-in contents) and write the Envoy config with its
    paths pointing there. Returns the config's path."""
    deployment = manifests.get("Deployment", f"{RELEASE}-gateway")
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}
    for mount_path, mount in mounts.items():
        volume = volumes[mount["name"]]
        target = root / mount_path.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            cm = manifests.get("ConfigMap", volume["configMap"]["name"])
            for key, value in cm.get("data", {}).items():
                (target / key).write_text(value, encoding="utf-8")
            for key, value in cm.get("binaryData", {}).items():
                (target / key).write_bytes(base64.b64decode(value))
        elif "secret" in volume:
            for item in volume["secret"]["items"]:
                content = JWKS_STANDIN if "jwks" in volume["name"] else API_KEYS_STANDIN
                (target / item["path"]).write_text(content, encoding="utf-8")
    # One pass over the config: each file path under a ConfigMap/Secret mount moves under root.
    file_mounts = [m for m, mount in mounts.items() if "emptyDir" not in volumes[mount["name"]]]
    pattern = re.compile("|".join(re.escape(f"{m}/") for m in sorted(file_mounts, key=len, reverse=True)))
    config = pattern.sub(lambda match: f"{root}{match.group(0)}", manifests.envoy_config_text())
    path = root / "envoy-local.yaml"
    path.write_text(config, encoding="utf-8")
    return path


def comment_free(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
