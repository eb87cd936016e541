"""docs/http.md is executable: every ```sh block runs, in order, with the real ``curl`` against a
real local mesh (Redis, Milvus Lite, embeddings, the five services, Envoy with API keys on), and
its output must match the ```text block that follows it. In an expected block ``…`` stands for
any text within a line and a line holding only ``…`` for any number of lines; everything else
must match exactly. The docs also have to list every HTTP route the protos annotate."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.mesh import local_mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "http.md"
#: The gateway address the examples are written for (`agentmesh up`'s default).
DOC_GATEWAY = "127.0.0.1:8080"
ELLIPSIS = "…"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^#+ (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Example:
    title: str
    script: str
    expected: str


def examples(text: str) -> list[Example]:
    """The ```sh blocks of ``text``, each with the ```text block right after it (blank lines
    between them allowed, nothing else). Raises AssertionError when a block has none."""
    found: list[Example] = []
    fences = list(_FENCE.finditer(text))
    for i, fence in enumerate(fences):
        if fence.group(1) != "sh":
            continue
        after = fences[i + 1] if i + 1 < len(fences) else None
        line = text.count("\n", 0, fence.start()) + 1
        assert after is not None and after.group(1) == "text" and not text[fence.end():after.start()].strip(), (
            f"docs/http.md line {line}: a ```sh example must be followed directly by a ```text block "
            "holding its expected output"
        )
        headings = _HEADING.findall(text, 0, fence.start())
        found.append(Example(f"{headings[-1] if headings else 'top'} (line {line})", fence.group(2), after.group(2)))
    return found


def template_regex(expected: str) -> re.Pattern[str]:
    """A regex matching the output ``expected`` describes (see the module docstring)."""
    parts = []
    for line in expected.splitlines():
        if line.strip() == ELLIPSIS:
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append("[^\n]*".join(re.escape(piece) for piece in line.split(ELLIPSIS)) + r"\n")
    return re.compile("".join(parts))


def matches(expected: str, output: str) -> bool:
    normalized = output.replace("\r\n", "\n")
    if not normalized.endswith("\n"):
        normalized += "\n"
    return template_regex(expected).fullmatch(normalized) is not None


def test_template_matching_rules():
    # The checker itself: the rules the docs rely on, and that it does fail.
    assert matches('{"a":…,"b":2}', '{"a":17,"b":2}\n')
    assert not matches('{"a":…,"b":2}', '{"a":17,"b":3}\n')
    assert matches("HTTP/1.1 400 Bad Request\n…\nbody", "HTTP/1.1 400 Bad Request\r\nx: 1\r\ny: 2\r\n\r\nbody")
    assert matches("first\n…\nlast", "first\nlast")
    assert not matches("first\n…\nlast", "first\nmiddle\nlast\nextra")
    assert not matches("a.b", "axb"), "regex metacharacters in the docs are literal"


def test_every_sh_example_has_its_expected_output_and_uses_the_documented_address():
    found = examples(DOC.read_text(encoding="utf-8"))
    assert len(found) >= 10
    for example in found:
        assert f"http://{DOC_GATEWAY}/" in example.script, example.title
        assert example.expected.strip(), example.title


def _annotated_routes() -> set[str]:
    """``METHOD /path`` of every google.api.http annotation in protos/agentmesh."""
    routes = set()
    for proto in (ROOT / "protos" / "agentmesh").rglob("*.proto"):
        for verb, path in re.findall(r'\b(get|post|put|patch|delete):\s*"([^"]+)"', proto.read_text(encoding="utf-8")):
            routes.add(f"{verb.upper()} {path}")
    return routes


def test_route_table_lists_every_annotated_route():
    routes = _annotated_routes()
    assert "POST /v1/agent:run" in routes and len(routes) >= 10
    table = set(re.findall(r"^\| `((?:GET|POST|PUT|PATCH|DELETE) /[^`]+)` \|", DOC.read_text(encoding="utf-8"), re.MULTILINE))
    assert table == routes, f"missing from docs/http.md: {sorted(routes - table)}; not in the protos: {sorted(table - routes)}"


# --- the examples, against a real mesh ---------------------------------------------------------

EXAMPLES = examples(DOC.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.fail("curl is not installed: the HTTP examples of docs/http.md need it (apt-get install curl)")
    return path


@pytest.fixture(scope="module")
def api_key(tmp_path_factory) -> tuple[str, Path]:
    """An admin API key of tenant `docs`, and the key table the gateway reads it from."""
    key = "amk_" + secrets.token_urlsafe(32)
    table = tmp_path_factory.mktemp("auth") / "api-keys.txt"
    table.write_text(f"# key tenant subject roles\n{key} docs docs-admin admin\n")
    return key, table


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, api_key):
    env = {
        "AGENTMESH_LLM_PROVIDER": "extractive",
        "OPENAI_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
        "AGENTMESH_GATEWAY_API_KEYS_FILE": str(api_key[1]),
    }
    with local_mesh(tmp_path_factory.mktemp("mesh-http"), env) as m:
        yield m


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.title for e in EXAMPLES])
def test_example_output_matches_the_docs(example, mesh, api_key, curl):
    script = example.script.replace(DOC_GATEWAY, mesh.gateway)
    env = {**os.environ, "AGENTMESH_API_KEY": api_key[0]}
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == 0, f"{example.title}: exit {done.returncode}\n{done.stderr}\n{mesh.log('envoy')}"
    assert matches(example.expected, done.stdout), (
        f"{example.title}: output differs from the docs\n--- expected\n{example.expected}\n--- got\n{done.stdout}"
        f"\n--- stderr\n{done.stderr}"
    )
