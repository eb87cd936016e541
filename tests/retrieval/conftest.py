"""Shared fixtures: the real all-MiniLM-L6-v2 embedder, loaded once per test session, and per
test module a retrieval service on its own Milvus Lite file."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from agentmesh.services.retrieval.chunking import Chunker
from agentmesh.services.retrieval.embedder import SentenceTransformerEmbedder
from agentmesh.services.retrieval.service import RetrievalService, RetrievalSettings
from tests.retrieval.helpers import Client
from tests.support import running_service


@pytest.fixture(scope="session")
async def embedder() -> SentenceTransformerEmbedder:
    model = SentenceTransformerEmbedder()
    await model.load()
    yield model
    await model.close()


@pytest.fixture(scope="session")
def chunker(embedder: SentenceTransformerEmbedder) -> Chunker:
    return Chunker(embedder.tokenizer, model_max_tokens=embedder.max_tokens, special_tokens=embedder.special_tokens)


@pytest.fixture(scope="module")
async def client(embedder, tmp_path_factory) -> AsyncIterator[Client]:
    """The service with default settings (sharing the session's embedder) and a client of it."""
    folder = tmp_path_factory.mktemp("milvus")
    service = RetrievalService(RetrievalSettings(milvus_uri=str(folder / "milvus.db")), embedder=embedder)
    async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
        client = Client(service, channel)
        client.address = address
        yield client
