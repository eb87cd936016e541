"""Shared fixtures: the real all-MiniLM-L6-v2 embedder, loaded once per test session."""

from __future__ import annotations

import pytest

from agentmesh.services.retrieval.chunking import Chunker
from agentmesh.services.retrieval.embedder import SentenceTransformerEmbedder


@pytest.fixture(scope="session")
async def embedder() -> SentenceTransformerEmbedder:
    model = SentenceTransformerEmbedder()
    await model.load()
    yield model
    await model.close()


@pytest.fixture(scope="session")
def chunker(embedder: SentenceTransformerEmbedder) -> Chunker:
    return Chunker(embedder.tokenizer, model_max_tokens=embedder.max_tokens, special_tokens=embedder.special_tokens)
