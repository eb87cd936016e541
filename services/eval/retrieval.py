"""Retrieval evaluation on a BEIR-layout dataset, through the retrieval service's own API.

:func:`run` ingests the corpus with ``IngestDocuments`` (streams of :data:`BATCH_DOCUMENTS`
documents; a document's title is the document title, its text the BEIR text, or the title when
the text is empty; documents with neither are skipped and counted), then sends every judged
query to ``Search`` once per configuration (dense, BM25 and hybrid by default) and scores the
rankings with :mod:`~agentmesh.services.eval.metrics`.

Documents are longer than chunks, so a search returns chunks: a document's rank is the rank of
its best chunk (later chunks of a document already seen are dropped), over the ``top_k`` chunks
the search returned (100 by default). Recall@100 therefore counts the documents found within
those chunks, fewer than 100 when several chunks of one document rank high; for corpora of short
documents (most BEIR sets: abstracts, passages) a document is one chunk and nothing changes.

Without an address, :func:`local_service` starts a retrieval service in this process on a
temporary Milvus Lite file, with the product's default settings, so a run measures the defaults
and needs no running mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.eval import metrics
from agentmesh.services.eval.beir import Dataset
from agentmesh.services.runtime.clients import channel_options, check_health
from agentmesh.services.runtime.context import TENANT_HEADER

#: Documents per IngestDocuments stream: progress is reported per stream, and a failure loses one.
BATCH_DOCUMENTS = 64


@dataclass(frozen=True, slots=True)
class SearchConfig:
    """One way of searching: a label, a mode, and hybrid options (0/None = service default)."""

    label: str
    mode: int
    fusion: int = 0
    dense_weight: float | None = None
    rrf_k: int = 0

    def request(self, collection: str, query: str, top_k: int) -> retrieval_pb2.SearchRequest:
        req = retrieval_pb2.SearchRequest(collection=collection, query=query, top_k=top_k, mode=self.mode,
                                          fusion=self.fusion, rrf_k=self.rrf_k, min_score=float("-inf"))
        if self.dense_weight is not None:
            req.dense_weight = self.dense_weight
        return req


DEFAULT_CONFIGS = (
    SearchConfig("dense", retrieval_pb2.SEARCH_MODE_DENSE),
    SearchConfig("bm25", retrieval_pb2.SEARCH_MODE_SPARSE),
    SearchConfig("hybrid", retrieval_pb2.SEARCH_MODE_HYBRID),
)


@dataclass(slots=True)
class IngestSummary:
    documents: int = 0
    skipped_empty: int = 0
    written: int = 0
    unchanged: int = 0
    chunks: int = 0
    embedding_s: float = 0.0
    seconds: float = 0.0


@dataclass(slots=True)
class ConfigResult:
    label: str
    metrics: dict[str, float]
    latency_ms_mean: float
    latency_ms_p50: float
    fusion: str = ""


@dataclass(slots=True)
class Report:
    dataset: str
    qrels: str
    collection: str
    documents: int
    queries: int
    top_k: int
    ingest: IngestSummary
    results: list[ConfigResult] = field(default_factory=list)
    service: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    return ((TENANT_HEADER, tenant),)


async def ingest(stub: retrieval_pb2_grpc.RetrievalServiceStub, dataset: Dataset, collection: str, tenant: str,
                 progress: Callable[[int], None] = lambda n: None, timeout_s: float = 3600.0) -> IngestSummary:
    """Send the corpus in streams of :data:`BATCH_DOCUMENTS`; ``progress(n)`` after each stream
    with the number of documents it carried. Raises ``grpc.aio.AioRpcError`` as the service does."""
    summary = IngestSummary()
    started = time.perf_counter()
    docs = []
    for d in dataset.corpus:
        text = d.text if d.text.strip() else d.title
        if not text.strip():
            summary.skipped_empty += 1
            continue
        docs.append(retrieval_pb2.Document(id=d.id, title=d.title, text=text, metadata=d.metadata))
    summary.documents = len(docs)
    for start in range(0, len(docs), BATCH_DOCUMENTS):
        batch = docs[start : start + BATCH_DOCUMENTS]

        async def requests(batch=batch) -> AsyncIterator[retrieval_pb2.IngestDocumentsRequest]:
            for doc in batch:
                yield retrieval_pb2.IngestDocumentsRequest(collection=collection, document=doc)

        reply = await stub.IngestDocuments(requests(), metadata=_metadata(tenant), timeout=timeout_s)
        summary.written += reply.documents_written
        summary.unchanged += reply.documents_unchanged
        summary.chunks += sum(r.chunks for r in reply.documents)
        summary.embedding_s += reply.embedding_ms / 1000
        progress(len(batch))
    summary.seconds = time.perf_counter() - started
    return summary


def document_ranking(chunks: Any) -> list[str]:
    """Document ids in the order of their best chunk."""
    return list(dict.fromkeys(c.document_id for c in chunks))


async def search_all(stub: retrieval_pb2_grpc.RetrievalServiceStub, dataset: Dataset, collection: str, tenant: str,
                     configs: tuple[SearchConfig, ...], top_k: int, concurrency: int = 4,
                     progress: Callable[[int], None] = lambda n: None, timeout_s: float = 120.0
                     ) -> list[ConfigResult]:
    """Every judged query under every configuration, ``concurrency`` searches at a time."""
    rankings: dict[str, dict[str, list[str]]] = {c.label: {} for c in configs}
    latencies: dict[str, list[float]] = {c.label: [] for c in configs}
    fusions: dict[str, str] = {}
    jobs = [(c, qid, text) for c in configs for qid, text in dataset.queries.items()]
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            config, qid, text = queue.get_nowait()
            t0 = time.perf_counter()
            reply = await stub.Search(config.request(collection, text, top_k), metadata=_metadata(tenant),
                                      timeout=timeout_s)
            latencies[config.label].append((time.perf_counter() - t0) * 1000)
            rankings[config.label][qid] = document_ranking(reply.chunks)
            if reply.fusion:
                fusions[config.label] = retrieval_pb2.FusionMethod.Name(reply.fusion)
            progress(1)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    results = []
    for c in configs:
        lat = sorted(latencies[c.label])
        results.append(ConfigResult(
            label=c.label,
            metrics={k: round(v, 4) for k, v in metrics.evaluate(rankings[c.label], dataset.qrels).items()},
            latency_ms_mean=round(sum(lat) / len(lat), 1) if lat else 0.0,
            latency_ms_p50=round(lat[len(lat) // 2], 1) if lat else 0.0,
            fusion=fusions.get(c.label, ""),
        ))
    return results


async def prepare_collection(stub: retrieval_pb2_grpc.RetrievalServiceStub, collection: str, tenant: str,
                             chunking: retrieval_pb2.ChunkingConfig | None) -> retrieval_pb2.CollectionInfo:
    """Create the collection (with ``chunking`` when given; an existing one with the same
    settings is reused, other settings are ALREADY_EXISTS)."""
    reply = await stub.CreateCollection(
        retrieval_pb2.CreateCollectionRequest(collection=collection, chunking=chunking), metadata=_metadata(tenant),
        timeout=60,
    )
    return reply.collection


@contextlib.asynccontextmanager
async def local_service(data_dir: Path, max_top_k: int, timeout_s: float = 300.0) -> AsyncIterator[str]:
    """A retrieval service with the default settings served in this event loop on a free port,
    on a Milvus Lite file in ``data_dir``; yields ``host:port`` once it is SERVING."""
    # Imported here: the service loads torch and pymilvus, which a run against --address skips.
    from agentmesh.services.cli.processes import free_port  # noqa: PLC0415
    from agentmesh.services.retrieval.service import RetrievalService, RetrievalSettings  # noqa: PLC0415
    from agentmesh.services.runtime.server import serve  # noqa: PLC0415

    settings = RetrievalSettings(milvus_uri=str(data_dir / "milvus.db"), host="127.0.0.1", port=free_port(),
                                 max_top_k=max(max_top_k, 100), readiness_interval_s=2.0)
    address = f"127.0.0.1:{settings.port}"
    stop = asyncio.Event()
    task = asyncio.create_task(serve(RetrievalService(settings), stop_event=stop, handle_signals=False))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while not await check_health(channel):
                if task.done():
                    task.result()  # raises the start-up error
                if loop.time() > deadline:
                    raise TimeoutError(f"the retrieval service did not become SERVING within {timeout_s:.0f} s")
                await asyncio.sleep(0.1)
        yield address
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=60)


async def run(address: str, dataset: Dataset, *, collection: str, tenant: str, top_k: int = 100,
              configs: tuple[SearchConfig, ...] = DEFAULT_CONFIGS, chunking: retrieval_pb2.ChunkingConfig | None = None,
              concurrency: int = 4, on_ingest: Callable[[int], None] = lambda n: None,
              on_search: Callable[[int], None] = lambda n: None) -> Report:
    """Ingest ``dataset`` into ``collection`` through the service at ``address``, run every
    query under every configuration, and report the metrics."""
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        info = await prepare_collection(stub, collection, tenant, chunking)
        summary = await ingest(stub, dataset, collection, tenant, progress=on_ingest)
        results = await search_all(stub, dataset, collection, tenant, configs, top_k, concurrency, progress=on_search)
    return Report(
        dataset=dataset.name, qrels=dataset.qrels_file, collection=collection, documents=len(dataset.corpus),
        queries=len(dataset.queries), top_k=top_k, ingest=summary, results=results,
        service={"address": address, "embedding_model": info.embedding_model,
                 "embedding_dimension": info.embedding_dimension,
                 "chunking": {"chunk_tokens": info.chunking.chunk_tokens, "overlap_tokens": info.chunking.overlap_tokens,
                              "title_tokens": info.chunking.title_tokens}},
    )
