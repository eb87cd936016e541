"""``agentmesh eval``: evaluations shipped with the product.

``agentmesh eval retrieval --beir DIR [--json OUT]`` ingests a BEIR-layout dataset through the
retrieval service and prints nDCG@10, Recall@100 and MRR@10 of dense, BM25 and hybrid search
side by side (see :mod:`agentmesh.services.eval.retrieval`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
from pathlib import Path
from typing import NoReturn

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.services.eval import beir
from agentmesh.services.eval.retrieval import DEFAULT_CONFIGS, Report, SearchConfig, local_service, run

eval_app = typer.Typer(
    name="eval", help="Evaluate AgentMesh on standard datasets.", no_args_is_help=True, add_completion=False,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(Text(f"error: {message}"))
    raise typer.Exit(code)


def _collection_name(dataset: str) -> str:
    return ("beir_" + re.sub(r"[^A-Za-z0-9_]", "_", dataset))[:255]


@eval_app.command("retrieval")
def retrieval(
    beir_dir: Path = typer.Option(..., "--beir", help="Dataset folder in BEIR layout (corpus.jsonl, queries.jsonl, "
                                  "qrels/test.tsv or qrels.tsv)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
    address: str | None = typer.Option(
        None, "--address", help="host:port of a running retrieval service or gateway. Default: start a retrieval "
        "service in this process, with the default settings, on a temporary Milvus Lite file."),
    collection: str = typer.Option("", "--collection", help="Collection to ingest into (default: beir_<folder name>)."),
    tenant: str = typer.Option("eval", "--tenant", help="Tenant sent as x-tenant-id."),
    split: str = typer.Option("test", "--split", help="qrels/<split>.tsv to read."),
    top_k: int = typer.Option(100, "--top-k", min=10, max=1000, help="Chunks retrieved per query."),
    fusion: str | None = typer.Option(None, "--fusion", help="Hybrid fusion: rrf or weighted (default: the service's)."),
    dense_weight: float | None = typer.Option(None, "--dense-weight", min=0, max=1, help="Weighted fusion: dense weight."),
    rrf_k: int = typer.Option(0, "--rrf-k", min=0, max=1000, help="RRF constant k (0: the service's)."),
    chunk_tokens: int | None = typer.Option(None, "--chunk-tokens", help="Chunk size of the collection, in tokens."),
    overlap_tokens: int | None = typer.Option(None, "--overlap-tokens", help="Chunk overlap, in tokens."),
    title_tokens: int | None = typer.Option(None, "--title-tokens", help="Title tokens indexed with each chunk."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, max=64, help="Searches in flight at once."),
) -> None:
    """Ingest a BEIR dataset through the retrieval service and report nDCG@10, Recall@100 and
    MRR@10 for dense, BM25 and hybrid search."""
    try:
        dataset = beir.load(beir_dir, split)
    except beir.DatasetError as exc:
        _fail(str(exc), 2)
    fusions = {"rrf": retrieval_pb2.FUSION_METHOD_RRF, "weighted": retrieval_pb2.FUSION_METHOD_WEIGHTED}
    if fusion is not None and fusion not in fusions:
        _fail(f"--fusion must be rrf or weighted, not {fusion!r}", 2)
    hybrid = SearchConfig("hybrid", retrieval_pb2.SEARCH_MODE_HYBRID, fusions.get(fusion or "", 0), dense_weight, rrf_k)
    configs = (*DEFAULT_CONFIGS[:2], hybrid)
    chunking = None
    if chunk_tokens is not None or overlap_tokens is not None or title_tokens is not None:
        chunking = retrieval_pb2.ChunkingConfig(chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens,
                                                title_tokens=title_tokens)
    name = collection or _collection_name(dataset.name)
    n_docs, n_queries = len(dataset.corpus), len(dataset.queries)
    err.print(Text(f"{dataset.name}: {n_docs} documents, {n_queries} judged queries ({dataset.qrels_file})"))

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err)

    async def go() -> Report:
        async with contextlib.AsyncExitStack() as stack:
            target = address
            if target is None:
                starting = progress.add_task("starting a retrieval service in this process", total=1)
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="agentmesh-eval-"))
                target = await stack.enter_async_context(local_service(Path(tmp), max_top_k=top_k))
                progress.advance(starting)
            ingest_task = progress.add_task("ingesting documents", total=n_docs)
            search_task = progress.add_task("searching", total=n_queries * len(configs))
            return await run(target, dataset, collection=name, tenant=tenant, top_k=top_k, configs=configs,
                             chunking=chunking, concurrency=concurrency,
                             on_ingest=lambda n: progress.advance(ingest_task, n),
                             on_search=lambda n: progress.advance(search_task, n))

    try:
        with progress:
            report = asyncio.run(go())
    except grpc.aio.AioRpcError as exc:
        _fail(f"{exc.code().name}: {exc.details() or 'no details'}")
    except (RuntimeError, TimeoutError, ValueError) as exc:
        _fail(str(exc))

    ing = report.ingest
    out.print(Text(
        f"ingested {ing.documents} documents ({ing.written} written, {ing.unchanged} unchanged, "
        f"{ing.skipped_empty} empty skipped) as {ing.chunks} chunks in {ing.seconds:.1f} s "
        f"({ing.embedding_s:.1f} s embedding) into {report.collection}"
    ))
    table = Table(title=f"{report.dataset}: {report.queries} queries, top {report.top_k} chunks per query")
    for column in ("search", "nDCG@10", "Recall@100", "MRR@10", "mean ms", "p50 ms"):
        table.add_column(column, justify="left" if column == "search" else "right")
    best = {m: max(r.metrics[m] for r in report.results) for m in ("ndcg@10", "recall@100", "mrr@10")}
    for r in report.results:
        cells = [Text(f"{r.metrics[m]:.4f}", style="bold" if r.metrics[m] == best[m] else "")
                 for m in ("ndcg@10", "recall@100", "mrr@10")]
        label = r.label + (f" ({r.fusion.removeprefix('FUSION_METHOD_').lower()})" if r.fusion else "")
        table.add_row(label, *cells, f"{r.latency_ms_mean:.1f}", f"{r.latency_ms_p50:.1f}")
    out.print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        out.print(Text(f"wrote {json_out}"))


@eval_app.command("dataset")
def dataset(
    name: str = typer.Argument(..., help="stdlib-modules or python-reference."),
    directory: Path = typer.Argument(..., help="Folder to write the dataset into (created)."),
) -> None:
    """Write one of the two small BEIR-format datasets built from this Python's own documentation
    with hand-written, judged queries (NOT standard datasets; see agentmesh.services.eval.datasets)."""
    from agentmesh.services.eval import datasets  # noqa: PLC0415 - imports many stdlib modules

    if name not in datasets.DATASETS:
        _fail(f"unknown dataset {name!r}; choose one of: {', '.join(datasets.DATASETS)}", 2)
    root = datasets.write(name, directory)
    loaded = beir.load(root)
    out.print(Text(f"wrote {name} to {root}: {len(loaded.corpus)} documents, {len(loaded.queries)} judged queries"))
