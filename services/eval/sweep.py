"""The measurement that chose the retrieval defaults: a grid of chunking settings and search
configurations over the two home-made datasets of :mod:`agentmesh.services.eval.datasets`.

Run: ``.venv/bin/python -m agentmesh.services.eval.sweep [--out FILE]`` (about half an hour on
2 cores, most of it embedding every corpus once per chunking variant). It starts one retrieval
service in this process (default settings, temporary Milvus Lite), ingests each dataset into one
collection per chunking variant through ``IngestDocuments``, runs every query under every search
configuration through ``Search``, and prints nDCG@10 / Recall@100 / MRR@10 per cell; the JSON
report goes to ``--out`` (default ``services/eval/results/sweep.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.eval import beir, datasets
from agentmesh.services.eval.retrieval import SearchConfig, ingest, local_service, prepare_collection, search_all

HYBRID, RRF, WEIGHTED = retrieval_pb2.SEARCH_MODE_HYBRID, retrieval_pb2.FUSION_METHOD_RRF, retrieval_pb2.FUSION_METHOD_WEIGHTED

#: (label, chunk_tokens, overlap_tokens, title_tokens)
CHUNKINGS = (
    ("200/40 titles", 200, 40, 32),
    ("200/40 no titles", 200, 40, 0),
    ("128/24 titles", 128, 24, 32),
)
CONFIGS = (
    SearchConfig("dense", retrieval_pb2.SEARCH_MODE_DENSE),
    SearchConfig("bm25", retrieval_pb2.SEARCH_MODE_SPARSE),
    SearchConfig("rrf k=20", HYBRID, RRF, rrf_k=20),
    SearchConfig("rrf k=60", HYBRID, RRF, rrf_k=60),
    SearchConfig("weighted 0.3", HYBRID, WEIGHTED, dense_weight=0.3),
    SearchConfig("weighted 0.5", HYBRID, WEIGHTED, dense_weight=0.5),
    SearchConfig("weighted 0.7", HYBRID, WEIGHTED, dense_weight=0.7),
    SearchConfig("weighted 0.8", HYBRID, WEIGHTED, dense_weight=0.8),
)
TOP_K = 100


async def sweep(workdir: Path) -> list[dict]:
    rows = []
    loaded = {name: beir.load(datasets.write(name, workdir / name)) for name in datasets.DATASETS}
    async with local_service(workdir / "milvus", max_top_k=TOP_K) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            for c, (label, chunk, overlap, title) in enumerate(CHUNKINGS):
                chunking = retrieval_pb2.ChunkingConfig(chunk_tokens=chunk, overlap_tokens=overlap, title_tokens=title)
                for d, (name, dataset) in enumerate(loaded.items()):
                    collection = f"sweep_{c}_{d}"
                    await prepare_collection(stub, collection, "sweep", chunking)
                    summary = await ingest(stub, dataset, collection, "sweep")
                    t0 = time.perf_counter()
                    results = await search_all(stub, dataset, collection, "sweep", CONFIGS, TOP_K, concurrency=2)
                    print(f"{name} / {label}: {summary.chunks} chunks, ingested in {summary.seconds:.0f} s, "
                          f"searched in {time.perf_counter() - t0:.0f} s", flush=True)
                    for r in results:
                        rows.append({"dataset": name, "chunking": label, "chunks": summary.chunks, "search": r.label,
                                     **r.metrics, "latency_ms_p50": r.latency_ms_p50})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sweep.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agentmesh-sweep-") as tmp:
        rows = asyncio.run(sweep(Path(tmp)))
    table = Table(title="retrieval sweep (home-made datasets, NOT standard BEIR sets)")
    for col in ("dataset", "chunking", "search", "ndcg@10", "recall@100", "mrr@10"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["dataset"], r["chunking"], r["search"], *(f"{r[m]:.4f}" for m in ("ndcg@10", "recall@100", "mrr@10")))
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "top_k": TOP_K}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
