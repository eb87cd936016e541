"""The service image, checked without a Docker engine: the Dockerfile's promises (multi-stage,
non-root, `agentmesh serve <kind>`, the pinned CPU torch), a build context that holds what the
Dockerfile copies, and the install step itself — the wheel `pip install .` builds from that
context must carry every service module and the `agentmesh` command."""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.deploy.chart import CHART, REPO, SERVICES

DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def test_two_stages_on_python_slim_ending_as_a_numeric_non_root_user():
    steps = instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in steps if i == "ARG" and "=" in a}
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    stages = [a for i, a in steps if i == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    runtime = steps[[i for i, (k, _) in enumerate(steps) if k == "FROM"][-1]:]
    users = [a for i, a in runtime if i == "USER"]
    assert users == ["10001:10001"]
    # The chart runs the pods as this user and mounts the cache at its home.
    defaults = CHART / "values.yaml"
    assert "runAsUser: 10001" in defaults.read_text()
    assert "--home-dir /home/agentmesh" in DOCKERFILE
    # Only the virtualenv crosses into the runtime stage: no compiler, no source tree.
    assert [a for i, a in runtime if i == "COPY"] == ["--from=build /opt/agentmesh /opt/agentmesh"]


def test_entrypoint_runs_a_service_by_name():
    steps = dict(instructions())
    assert json.loads(steps["ENTRYPOINT"]) == ["agentmesh", "serve"]
    deployment = (CHART / "templates" / "services-deployment.yaml").read_text()
    assert "args: [{{ $kind | quote }}]" in deployment


def test_torch_is_the_cpu_build_pinned_like_the_project():
    pins = [d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"] if d.startswith("torch")]
    assert pins == ["torch==2.13.0"]
    assert "pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in DOCKERFILE


def build_context(tmp_path: Path) -> Path:
    """Copy what .dockerignore lets through (an allowlist: `*`, then `!path` lines, then
    excluded patterns) into a fresh directory, as `docker build` would send it."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore must start by excluding everything"
    allowed = [r[1:].rstrip("/") for r in rules[1:] if r.startswith("!")]
    excluded = [r.removeprefix("**/") for r in rules[1:] if not r.startswith("!")]
    context = tmp_path / "context"
    for name in allowed:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=lambda _d, names: [
                n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in excluded)])
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(source, context / name)
    return context


def test_the_build_context_holds_exactly_what_the_dockerfile_copies(tmp_path):
    context = build_context(tmp_path)
    copied = {p.split("/")[0] for i, a in instructions() if i == "COPY" and not a.startswith("--from") for p in a.split()[:-1]}
    assert copied == {p.name for p in context.iterdir()} == {"pyproject.toml", "README.md", "gen", "services", "clients"}
    assert not list(context.rglob("__pycache__"))


@pytest.mark.timeout(240)
def test_the_installed_package_has_every_service_module_and_the_command(tmp_path):
    context = build_context(tmp_path)
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheels), "."],
        cwd=context, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("agentmesh-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = configparser.ConfigParser()
        scripts.read_string(archive.read(entry_points).decode())
    expected = {f"agentmesh/services/{p.relative_to(REPO / 'services')}" for p in (REPO / "services").rglob("*.py")}
    expected |= {f"agentmesh/{p.relative_to(REPO / 'gen' / 'python' / 'agentmesh')}"
                 for p in (REPO / "gen" / "python" / "agentmesh").rglob("*.py")}
    missing = sorted(expected - names)
    assert missing == [], f"not in the image (add their packages to pyproject.toml): {missing}"
    for kind in SERVICES:
        assert f"agentmesh/services/{kind}/service.py" in names
    assert scripts["console_scripts"]["agentmesh"] == "agentmesh.services.cli.main:app"
