"""RetrievalSettings: where Milvus is, and settings refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agentmesh.services.retrieval.service import RetrievalSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MILVUS_URI", "AGENTMESH_RETRIEVAL_MILVUS_URI", "AGENTMESH_HOME"):
        monkeypatch.delenv(name, raising=False)


def test_default_uri_is_under_agentmesh_home_or_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert RetrievalSettings().milvus_uri == str(tmp_path / ".agentmesh" / "data" / "milvus.db")
    monkeypatch.setenv("AGENTMESH_HOME", "/srv/agentmesh")
    assert RetrievalSettings().milvus_uri == "/srv/agentmesh/.agentmesh/data/milvus.db"


def test_milvus_uri_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILVUS_URI", "http://milvus:19530")
    assert RetrievalSettings().milvus_uri == "http://milvus:19530"
    monkeypatch.setenv("AGENTMESH_RETRIEVAL_MILVUS_URI", "/data/lite.db")
    assert RetrievalSettings().milvus_uri == "/data/lite.db"


def test_prefixed_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTMESH_RETRIEVAL_CHUNK_TOKENS", "120")
    monkeypatch.setenv("AGENTMESH_RETRIEVAL_MAX_TOP_K", "20")
    s = RetrievalSettings()
    assert (s.chunk_tokens, s.chunk_overlap_tokens, s.max_top_k, s.default_collection) == (120, 40, 20, "agentmesh_docs")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"milvus_uri": "milvus.sqlite"}, "neither a Milvus Lite file ending in .db"),
        ({"chunk_tokens": 100, "chunk_overlap_tokens": 100}, "must be smaller than chunk_tokens"),
        ({"default_collection": "bad-name"}, "default_collection"),
        ({"max_top_k": 0}, "max_top_k"),
    ],
)
def test_bad_settings_fail_with_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RetrievalSettings(**kwargs)
