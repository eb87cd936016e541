"""Health follows the real dependencies: a Milvus server (Milvus Lite's standalone gRPC server in a
child process, reached through an ``http://`` URI) that is absent, started, killed and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.cli.processes import free_port, port_is_open
from agentmesh.services.retrieval.service import RetrievalService, RetrievalSettings
from agentmesh.services.runtime.clients import check_health
from agentmesh.services.runtime.settings import SERVICE_NAMES
from tests.support import running_service

NAME = SERVICE_NAMES["retrieval"]


@contextlib.contextmanager
def milvus_server(data_dir: Path, port: int, log: Path) -> Iterator[subprocess.Popen]:
    """A Milvus Lite gRPC server on ``port``, killed (SIGKILL) on exit if still running."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


async def wait_for(predicate, timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_health_tracks_a_milvus_server(embedder, tmp_path: Path) -> None:
    port = free_port()
    settings = RetrievalSettings(milvus_uri=f"http://127.0.0.1:{port}", readiness_interval_s=0.2, milvus_timeout_s=3)
    service = RetrievalService(settings, embedder=embedder)
    data_dir, log = tmp_path / "milvus-data", tmp_path / "milvus.log"

    async with running_service(service, wait_serving=False) as address, grpc.aio.insecure_channel(address) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)

        async def serving() -> bool:
            return await check_health(channel, NAME)

        async def not_serving() -> bool:
            return not await check_health(channel, NAME)

        # Model loaded, Milvus absent: the process runs but says NOT_SERVING.
        await wait_for(lambda: asyncio.sleep(0, result=service.embedder.loaded and service._store is not None), 60,
                       "the model to load")
        for _ in range(10):
            assert not await check_health(channel, NAME)
            await asyncio.sleep(0.1)

        with milvus_server(data_dir, port, log) as proc:
            await wait_for(serving, 60, "SERVING once Milvus is up")
            doc = retrieval_pb2.Document(id="lighthouse", title="Lighthouses",
                                         text="A lighthouse warns ships of rocks with a rotating beam of light.")

            async def one(d):
                yield retrieval_pb2.IngestDocumentsRequest(document=d)

            written = await stub.IngestDocuments(one(doc), timeout=60)
            assert written.chunks_written == 1
            hits = await stub.Search(retrieval_pb2.SearchRequest(query="beacon warning ships at night"), timeout=30)
            assert [c.document_id for c in hits.chunks] == ["lighthouse"]

            proc.kill()
            proc.wait(timeout=10)
            await wait_for(not_serving, 15, "NOT_SERVING after Milvus died")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Search(retrieval_pb2.SearchRequest(query="lighthouse"), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"Milvus at http://127.0.0.1:{port}" in err.value.details()

        assert not port_is_open("127.0.0.1", port)
        with milvus_server(data_dir, port, log):
            await wait_for(serving, 60, "SERVING again after Milvus restarted")
            hits = await stub.Search(retrieval_pb2.SearchRequest(query="beacon warning ships at night"), timeout=30)
            assert [c.document_id for c in hits.chunks] == ["lighthouse"]


async def test_start_refuses_a_default_collection_of_another_model(embedder, tmp_path: Path) -> None:
    from agentmesh.services.retrieval.store import MilvusStore

    uri = str(tmp_path / "milvus.db")
    foreign = MilvusStore(uri, model_name="another-model", dimension=512)
    await foreign.ensure_collection("agentmesh_docs", create=True)
    service = RetrievalService(RetrievalSettings(milvus_uri=uri), embedder=embedder)
    with pytest.raises(RuntimeError, match="holds embeddings of another-model"):
        async with running_service(service, timeout_s=60):
            pass


async def test_start_refuses_chunks_the_model_would_truncate(embedder, tmp_path: Path) -> None:
    settings = RetrievalSettings(milvus_uri=str(tmp_path / "milvus.db"), chunk_tokens=240)
    with pytest.raises(ValueError, match="exceeds the embedding model's limit of 256 tokens"):
        async with running_service(RetrievalService(settings, embedder=embedder), timeout_s=60):
            pass
