"""The stdlib demo corpus: real documentation of the running interpreter, deterministic output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentmesh.services.retrieval.corpus import DEFAULT_MODULES, _stable_repr, stdlib_documents

ROOT = Path(__file__).resolve().parents[2]

#: Run in a fresh interpreter: every stdlib document's SHA-256, which modules got imported,
#: anything the imports printed to stdout (nothing may be) and documents that quote the
#: process environment (none may: e.g. ``cgi``'s defaults are ``os.environ``).
_PROBE = """
import contextlib, hashlib, io, json, os, sys
from agentmesh.services.retrieval.corpus import stdlib_documents
captured = io.StringIO()
with contextlib.redirect_stdout(captured):
    docs = list(stdlib_documents(all_modules=True))
digests = {d.id: hashlib.sha256(d.SerializeToString(deterministic=True)).hexdigest() for d in docs}
leaks = [d.id for d in docs if os.environ["AGENTMESH_PROBE"] in d.text or os.environ["PATH"] in d.text]
print(json.dumps({"digests": digests, "modules": sorted(sys.modules), "printed": captured.getvalue(), "leaks": leaks}))
"""


def _probe(tmp_path: Path, seed: str, extra_env: dict[str, str]) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": seed, **extra_env}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=True
    )
    return json.loads(out.stdout)


def test_default_documents_are_real_module_docs() -> None:
    docs = list(stdlib_documents())
    assert [d.id for d in docs] == [f"python-stdlib:{m}" for m in DEFAULT_MODULES]
    by_id = {d.id: d for d in docs}
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    j = by_id["python-stdlib:json"]
    assert j.source == f"https://docs.python.org/{version}/library/json.html"
    assert j.metadata["module"] == "json" and j.metadata["python_version"] == version
    assert "json.loads(s, *, cls=None" in j.text
    assert "Deserialize ``s``" in j.text
    assert "class json.JSONDecoder(" in j.text and "json.JSONDecoder.raw_decode(self, s, idx=0)" in j.text
    assert by_id["python-stdlib:os.path"].text.startswith("Module os.path ")
    assert by_id["python-stdlib:heapq"].title == "heapq — Heap queue algorithm (a.k.a. priority queue)"
    # C-accelerated modules document their C functions too.
    assert "bisect.bisect_left(" in by_id["python-stdlib:bisect"].text
    assert sum(len(d.text) for d in docs) > 300_000


def test_same_text_every_run_in_one_process() -> None:
    first = [d.SerializeToString(deterministic=True) for d in stdlib_documents()]
    second = [d.SerializeToString(deterministic=True) for d in stdlib_documents()]
    assert first == second


def test_all_modules_is_deterministic_across_processes_and_quiet(tmp_path: Path) -> None:
    a = _probe(tmp_path, "1", {"AGENTMESH_PROBE": "probe-value-one", "HOME": str(tmp_path)})
    b = _probe(tmp_path, "2", {"AGENTMESH_PROBE": "probe-value-two"})
    assert a["leaks"] == [] and b["leaks"] == []
    assert a["digests"] == b["digests"], [k for k in a["digests"] if a["digests"][k] != b["digests"].get(k)]
    ids = set(a["digests"])
    assert len(ids) > 150
    assert {"python-stdlib:json", "python-stdlib:asyncio", "python-stdlib:sqlite3"} <= ids
    for skipped in ("antigravity", "this", "idlelib", "tkinter", "turtle"):
        assert f"python-stdlib:{skipped}" not in ids
        assert skipped not in a["modules"], f"{skipped} was imported"
    assert a["printed"] == ""


def test_stable_repr_of_default_values() -> None:
    assert _stable_repr(os.environ) == "os.environ"
    assert _stable_repr(frozenset({"b", "a", "c"})) == "frozenset({'a', 'b', 'c'})"
    assert _stable_repr({"k": (1, None)}) == "{'k': (1, None)}"
    assert _stable_repr((1,)) == "(1,)"
    assert _stable_repr(json.dumps) == "json.dumps"
    assert _stable_repr(object()) == "<object object>"


def test_unknown_module_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot import standard library module 'no_such_module'"):
        list(stdlib_documents(["json", "no_such_module"]))


def test_duplicates_are_emitted_once() -> None:
    assert [d.id for d in stdlib_documents(["json", "re", "json"])] == ["python-stdlib:json", "python-stdlib:re"]
