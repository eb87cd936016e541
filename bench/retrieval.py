"""Retrieval service benchmark: ingestion throughput with real embeddings, and ``Search``
latency (p50/p99) and throughput at 1, 8 and 32 concurrent clients against 100k chunks, beside
the same queries issued straight to pymilvus, so the service's own overhead shows.

Set-up (on this machine; every process shares its cores):
- Milvus Lite's own gRPC server as a separate process (``python -m milvus_lite server``), so the
  service and the pymilvus baseline talk to the same Milvus the same way (over gRPC);
- the retrieval service as its own process (``agentmesh serve retrieval``), default settings
  (hybrid search, RRF k=60, 50 candidates per ranking), log level INFO as shipped;
- the clients: one asyncio process, one gRPC channel (one pymilvus client for the baseline).

Ingestion: :data:`INGEST_MODULES` of the stdlib demo corpus streamed through
``IngestDocuments`` into an empty collection: real chunking, real all-MiniLM-L6-v2 embeddings
on the CPU, real BM25 indexing by Milvus. Reported: chunks/s over the whole call (client wall
time) and the share of the service's time spent embedding (from the response's
``embedding_ms``/``duration_ms``).

Search: embedding 100k chunks for real would take over an hour on 2 CPUs, so the 100k-chunk
collection is built from the real chunks just ingested: each synthetic chunk joins the first half
of one real chunk to the second half of another (real words, real lengths, for BM25), and its
vector is the normalized mean of their two real embeddings plus a little Gaussian noise (real
neighbourhoods, for the dense index). Rows are inserted with pymilvus into a collection the
service created, all in one tenant. Queries are the 90 hand-written developer questions of
``agentmesh.services.eval.datasets``, cycled.

Overhead: at 100k chunks Milvus Lite's own latency varies by ±100 ms from call to call, so the
difference of two independent p50s says little; the overhead is also measured with paired
calls (the same query through the service, then straight to pymilvus, order alternating, one
client), at 100k chunks and on the small ingestion collection (a few hundred chunks), where
Milvus answers in milliseconds and the service's own cost shows.

Measured per cell: the service's ``Search`` (top_k 10) against the baseline doing the same work
without the service: embed the query in this process with the same embedder class (one worker
thread, like the service), then ``MilvusClient.search`` (dense), ``search`` on the BM25 field
(sparse), or Milvus' own ``hybrid_search`` with ``RRFRanker(60)`` and 50 candidates per
request (hybrid). Overhead = service p50 − baseline p50. Hybrid (the default mode) at 1, 8 and
32 clients; dense and BM25 at 1 client for the breakdown.

Run: ``.venv/bin/python -m bench.retrieval`` (about 7 minutes on 2 cores, a third of it building
the 100k rows in Milvus Lite); writes ``bench/results/retrieval.json`` and ``.png``.
Target (issue 4): service overhead ≤ 2 ms at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
from pymilvus import AnnSearchRequest, MilvusClient, RRFRanker

from agentmesh.retrieval.v1 import retrieval_pb2 as pb
from agentmesh.retrieval.v1 import retrieval_pb2_grpc
from agentmesh.services.cli.processes import free_port, port_is_open, spawn
from agentmesh.services.eval.datasets import QUERIES
from agentmesh.services.retrieval.corpus import stdlib_documents
from agentmesh.services.retrieval.embedder import SentenceTransformerEmbedder
from agentmesh.services.runtime.clients import check_health
from bench.common import latency_stats, plot_latency, print_table, rss_mb, write_json

INGEST_MODULES = ["json", "csv", "re", "pathlib", "subprocess", "logging", "itertools", "functools", "datetime",
                  "collections", "argparse", "heapq", "tempfile", "shutil", "uuid", "hashlib", "base64", "textwrap",
                  "random", "statistics"]
ROWS = 100_000
TENANT = "bench"
MD = (("x-tenant-id", TENANT),)
TOP_K = 10
CANDIDATES = 50
CONCURRENCY = (1, 8, 32)
TARGET_OVERHEAD_MS = 2.0
MODES = (pb.SEARCH_MODE_HYBRID, pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_SPARSE)
_FIELDS = ["chunk_id", "document_id", "chunk_index", "title", "source", "section", "text", "start_char", "end_char",
           "metadata"]


def mode_name(mode: int) -> str:
    return pb.SearchMode.Name(mode).removeprefix("SEARCH_MODE_").lower()


async def measure(call: Callable[[int], Awaitable[None]], clients: int, seconds: float) -> tuple[list[float], float]:
    """Latencies (ms) of ``call(i)`` (i counts calls) issued back to back by ``clients``
    coroutines for ``seconds`` after one warm-up call each; and the throughput (calls/s)."""
    counter = iter(range(1 << 30))
    await asyncio.gather(*(call(next(counter)) for _ in range(clients)))
    samples: list[float] = []
    start = time.perf_counter()
    stop_at = start + seconds

    async def client() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await call(next(counter))
            samples.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(client() for _ in range(clients)))
    return samples, len(samples) / (time.perf_counter() - start)


async def paired(service_call: Callable[[int], Awaitable[None]], baseline_call: Callable[[int], Awaitable[None]],
                 n: int) -> dict:
    """The same query through the service and through the baseline, one after the other, ``n``
    times (order alternating, one client): drifts in the machine's load hit both alike, so the
    median of the per-pair differences is the service's overhead, which independent runs of a
    few dozen calls on a noisy Milvus Lite cannot resolve."""
    service_ms, baseline_ms = [], []
    for i in range(n):
        for first in ((service_call, service_ms), (baseline_call, baseline_ms))[:: 1 if i % 2 == 0 else -1]:
            call, out = first
            t0 = time.perf_counter()
            await call(i)
            out.append((time.perf_counter() - t0) * 1000)
    diffs = [a - b for a, b in zip(service_ms, baseline_ms, strict=True)]
    return {"n": n, "service_p50_ms": round(float(np.median(service_ms)), 2),
            "pymilvus_p50_ms": round(float(np.median(baseline_ms)), 2),
            "overhead_median_ms": round(float(np.median(diffs)), 2),
            "overhead_iqr_ms": [round(float(np.percentile(diffs, 25)), 2), round(float(np.percentile(diffs, 75)), 2)]}


async def wait_serving(address: str, timeout_s: float = 180.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        deadline = time.monotonic() + timeout_s
        while not await check_health(channel):
            if time.monotonic() > deadline:
                raise RuntimeError(f"retrieval service at {address} did not become SERVING")
            await asyncio.sleep(0.2)


async def ingest(stub: retrieval_pb2_grpc.RetrievalServiceStub, collection: str) -> dict:
    docs = list(stdlib_documents(INGEST_MODULES))

    async def requests():  # noqa: ANN202
        for d in docs:
            yield pb.IngestDocumentsRequest(collection=collection, document=d)

    t0 = time.perf_counter()
    reply = await stub.IngestDocuments(requests(), metadata=MD, timeout=3600)
    wall = time.perf_counter() - t0
    return {
        "documents": len(docs), "bytes": sum(len(d.text.encode()) for d in docs), "chunks": reply.chunks_written,
        "wall_s": round(wall, 2), "chunks_per_s": round(reply.chunks_written / wall, 1),
        "embedding_s": round(reply.embedding_ms / 1000, 2), "service_s": round(reply.duration_ms / 1000, 2),
        "embedding_share": round(reply.embedding_ms / max(1, reply.duration_ms), 3),
    }


def synthesize(client: MilvusClient, source: str, target: str, rows: int) -> dict:
    """Insert ``rows`` chunks built from the real ones of ``source`` (see the module docstring)."""
    real = client.query(source, filter=f'tenant == "{TENANT}"', limit=16384,
                        output_fields=[*_FIELDS, "search_text", "embedding"])
    rng = np.random.default_rng(11)
    vectors = np.asarray([r["embedding"] for r in real], dtype=np.float32)
    t0 = time.perf_counter()
    batch = []
    for i in range(rows):
        a, b = rng.integers(len(real), size=2)
        ta, tb = real[a]["text"], real[b]["text"]
        text = ta[: len(ta) // 2] + " " + tb[len(tb) // 2:]
        v = vectors[a] + vectors[b] + rng.normal(0, 0.02, vectors.shape[1]).astype(np.float32)
        doc_id = f"syn-{i // 10}"
        batch.append({
            "chunk_id": hashlib.sha256(f"{doc_id}/{i}".encode()).hexdigest()[:40], "tenant": TENANT,
            "document_id": doc_id, "chunk_index": i % 10, "chunk_count": 10, "title": real[a]["title"],
            "source": real[a]["source"], "section": "", "text": text, "search_text": f"{real[a]['title']}\n{text}",
            "start_char": 0, "end_char": len(text), "content_hash": "0" * 64, "metadata": {},
            "embedding": (v / np.linalg.norm(v)).tolist(),
        })
        if len(batch) == 2000:
            client.insert(target, batch)
            batch = []
    if batch:
        client.insert(target, batch)
    client.flush(target)
    return {"source_chunks": len(real), "rows": rows, "insert_s": round(time.perf_counter() - t0, 1)}


async def run(seconds: float) -> dict:
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    milvus_port, port = free_port(), free_port()
    milvus = spawn("milvus", [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(root / "milvus"),
                              "--host", "127.0.0.1", "--port", str(milvus_port)], root / "logs")
    uri = f"http://127.0.0.1:{milvus_port}"
    service = spawn("retrieval", [sys.executable, "-m", "agentmesh.services.cli.main", "serve", "retrieval"],
                    root / "logs", env={"AGENTMESH_RETRIEVAL_MILVUS_URI": uri, "AGENTMESH_RETRIEVAL_PORT": str(port)})
    address = f"127.0.0.1:{port}"
    embedder = SentenceTransformerEmbedder()
    try:
        deadline = time.monotonic() + 60
        while not port_is_open("127.0.0.1", milvus_port):
            if time.monotonic() > deadline or not milvus.alive():
                raise RuntimeError(f"Milvus Lite server did not start; see {milvus.log_path}")
            await asyncio.sleep(0.2)
        await wait_serving(address)
        await embedder.load()
        client = MilvusClient(uri)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            ingestion = await ingest(stub, "bench_ingest")
            print(f"ingestion: {ingestion}", flush=True)

            queries = [q for q, _ in QUERIES]
            expr = f'tenant == "{TENANT}"'

            def service_call(mode: int, collection: str = "bench_100k") -> Callable[[int], Awaitable[None]]:
                async def call(i: int) -> None:
                    request = pb.SearchRequest(collection=collection, query=queries[i % len(queries)], top_k=TOP_K,
                                               mode=mode, min_score=-1)
                    await stub.Search(request, metadata=MD, timeout=600)

                return call

            def baseline_call(mode: int, collection: str = "bench_100k") -> Callable[[int], Awaitable[None]]:
                async def call(i: int) -> None:
                    q = queries[i % len(queries)]
                    if mode == pb.SEARCH_MODE_SPARSE:
                        await asyncio.to_thread(
                            client.search, collection, data=[q], anns_field="sparse", filter=expr, limit=TOP_K,
                            output_fields=_FIELDS, search_params={"metric_type": "BM25"}, consistency_level="Strong")
                    else:
                        v = (await embedder.embed([q]))[0].tolist()
                        if mode == pb.SEARCH_MODE_DENSE:
                            await asyncio.to_thread(
                                client.search, collection, data=[v], anns_field="embedding", filter=expr, limit=TOP_K,
                                output_fields=_FIELDS, search_params={"metric_type": "COSINE"}, consistency_level="Strong")
                        else:
                            requests = [
                                AnnSearchRequest([v], "embedding", {"metric_type": "COSINE"}, CANDIDATES, expr=expr),
                                AnnSearchRequest([q], "sparse", {"metric_type": "BM25"}, CANDIDATES, expr=expr),
                            ]
                            await asyncio.to_thread(client.hybrid_search, collection, requests, RRFRanker(60),
                                                    limit=TOP_K, output_fields=_FIELDS)

                return call

            # Overhead where Milvus answers in milliseconds: the small collection, Milvus idle.
            overhead = {}
            for mode in MODES:
                await paired(service_call(mode, "bench_ingest"), baseline_call(mode, "bench_ingest"), 5)  # warm-up
                cell = await paired(service_call(mode, "bench_ingest"), baseline_call(mode, "bench_ingest"), 200)
                overhead[f"{mode_name(mode)} on bench_ingest"] = cell
                print(f"paired {mode_name(mode)} on bench_ingest: {cell}", flush=True)

            await stub.CreateCollection(pb.CreateCollectionRequest(collection="bench_100k"), metadata=MD, timeout=60)
            built = await asyncio.to_thread(synthesize, client, "bench_ingest", "bench_100k", ROWS)
            print(f"100k collection: {built}", flush=True)

            # First searches build Milvus Lite's in-memory indexes (BM25 postings take a while).
            t0 = time.perf_counter()
            for mode in MODES:
                await service_call(mode)(0)
                await baseline_call(mode)(0)
            warmup_s = round(time.perf_counter() - t0, 1)
            print(f"warm-up (index builds): {warmup_s} s", flush=True)

            cells = [(pb.SEARCH_MODE_HYBRID, c) for c in CONCURRENCY] + [(pb.SEARCH_MODE_DENSE, 1), (pb.SEARCH_MODE_SPARSE, 1)]
            rows = []
            for mode, clients in cells:
                name = mode_name(mode)
                samples, rate = await measure(service_call(mode), clients, seconds)
                base_samples, base_rate = await measure(baseline_call(mode), clients, seconds)
                s, b = latency_stats(samples), latency_stats(base_samples)
                row = {
                    "mode": name, "clients": clients, "n": s["n"], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
                    "qps": round(rate, 2), "pymilvus_n": b["n"], "pymilvus_p50_ms": b["p50_ms"],
                    "pymilvus_p99_ms": b["p99_ms"], "pymilvus_qps": round(base_rate, 2),
                    "overhead_p50_ms": round(s["p50_ms"] - b["p50_ms"], 2),
                    "ratio_p50": round(s["p50_ms"] / b["p50_ms"], 3), "service": s, "pymilvus": b,
                }
                rows.append(row)
                print(f"{name} @ {clients}: service p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms {rate:.2f}/s | "
                      f"pymilvus p50 {b['p50_ms']} ms p99 {b['p99_ms']} ms {base_rate:.2f}/s", flush=True)
            for mode in MODES:
                cell = await paired(service_call(mode, "bench_100k"), baseline_call(mode, "bench_100k"), 30)
                overhead[f"{mode_name(mode)} on bench_100k"] = cell
                print(f"paired {mode_name(mode)} on bench_100k: {cell}", flush=True)
            service_rss, milvus_rss = rss_mb(service.pid), rss_mb(milvus.pid)
        client.close()
    finally:
        await embedder.close()
        service.stop()
        milvus.stop()

    columns = ["mode", "clients", "n", "p50_ms", "p99_ms", "qps", "pymilvus_p50_ms", "pymilvus_p99_ms", "pymilvus_qps",
               "overhead_p50_ms", "ratio_p50"]
    print_table(f"Search on {ROWS:,} chunks: service vs pymilvus (same Milvus Lite server)", rows, columns)
    print_table("ingestion (real embeddings)", [ingestion])
    plot_latency("retrieval", {
        "service (hybrid)": [(r["clients"], r["p50_ms"]) for r in rows if r["mode"] == "hybrid"],
        "pymilvus hybrid_search": [(r["clients"], r["pymilvus_p50_ms"]) for r in rows if r["mode"] == "hybrid"],
    }, "concurrent clients", "p50 latency (ms)")
    small = overhead["hybrid on bench_ingest"]
    print_table("service overhead, paired calls (1 client)", [{"cell": k, **v} for k, v in overhead.items()],
                ["cell", "n", "service_p50_ms", "pymilvus_p50_ms", "overhead_median_ms"])
    return {
        "config": {"rows": ROWS, "top_k": TOP_K, "candidates_per_ranking": CANDIDATES, "seconds_per_cell": seconds,
                   "milvus": "Milvus Lite gRPC server process (python -m milvus_lite server)",
                   "vectors": "synthetic from real MiniLM embeddings (mean of two + N(0, 0.02) noise), see docstring",
                   "queries": f"{len(QUERIES)} hand-written developer questions, cycled"},
        "ingestion": ingestion,
        "collection_100k": built,
        "warmup_s": warmup_s,
        "rows": rows,
        "overhead_paired": overhead,
        "target": {"what": "service overhead <= 2 ms at p50 (hybrid, 1 client; median of paired differences on the "
                           "small collection, where Milvus' own latency does not drown it)",
                   "overhead_ms": small["overhead_median_ms"], "met": small["overhead_median_ms"] <= TARGET_OVERHEAD_MS},
        "rss_mb": {"service": service_rss, "milvus_lite": milvus_rss},
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell (default 8)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    write_json("retrieval", asyncio.run(run(args.seconds)))


if __name__ == "__main__":
    main()
