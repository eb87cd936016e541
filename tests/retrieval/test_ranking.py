"""Fusion and MMR: the formulas on hand-made rankings, and agreement with Milvus' own
``hybrid_search`` rankers on a real Milvus Lite collection."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pymilvus import AnnSearchRequest, RRFRanker, WeightedRanker

from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.services.retrieval import ranking
from agentmesh.services.retrieval.chunking import Chunker
from agentmesh.services.retrieval.store import ChunkingSettings, Hit, MilvusStore, PreparedDocument, content_hash
from agentmesh.services.runtime import context as ctx


def hit(chunk_id: str, score: float, vector: list[float] | None = None) -> Hit:
    fields = {"chunk_id": chunk_id}
    if vector is not None:
        v = np.asarray(vector, dtype=np.float32)
        fields["embedding"] = (v / np.linalg.norm(v)).tolist()
    return Hit(chunk_id, score, fields)


def test_rrf_sums_reciprocal_ranks() -> None:
    dense = [hit("a", 0.9), hit("b", 0.8), hit("c", 0.7)]
    sparse = [hit("c", 12.0), hit("d", 9.0), hit("a", 1.0)]
    fused = ranking.fuse_rrf(ranking.candidates(dense, sparse), k=60)
    scores = {c.chunk_id: c.fused for c in fused}
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 63)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert scores["b"] == pytest.approx(1 / 62) and scores["d"] == pytest.approx(1 / 62)
    # a and c tie on RRF: the better single rank wins, then the chunk id.
    assert [c.chunk_id for c in fused] == ["a", "c", "b", "d"]
    a = fused[0]
    assert (a.dense, a.dense_rank, a.sparse, a.sparse_rank) == (0.9, 1, 1.0, 3)
    d = next(c for c in fused if c.chunk_id == "d")
    assert (d.dense, d.dense_rank, d.sparse_rank) == (None, 0, 2)


def test_weighted_fusion_normalizes_like_milvus() -> None:
    dense = [hit("a", 0.9), hit("b", -0.2)]
    sparse = [hit("b", 1.0), hit("c", 10.0)]
    fused = ranking.fuse_weighted(ranking.candidates(dense, sparse), dense_weight=0.7)
    scores = {c.chunk_id: c.fused for c in fused}
    # cosine → (1 + s) / 2; BM25 → 2 atan(s) / π (tan(π/4) = 1 → 0.5); a missing ranking adds 0.
    assert scores == pytest.approx({"a": 0.7 * 0.95, "b": 0.7 * 0.4 + 0.3 * 0.5,
                                    "c": 0.3 * 2 * math.atan(10.0) / math.pi})
    assert [c.chunk_id for c in fused] == ["a", "b", "c"]


def test_mmr_trades_relevance_for_diversity() -> None:
    pool = ranking.by_score(ranking.candidates([
        hit("dup1", 0.95, [1, 0, 0]),
        hit("dup2", 0.94, [1, 0.01, 0]),
        hit("other", 0.80, [0, 1, 0]),
        hit("third", 0.70, [0, 0, 1]),
    ]))
    assert [c.chunk_id for c in ranking.mmr(pool, 3, 1.0)] == ["dup1", "dup2", "other"]
    assert [c.chunk_id for c in ranking.mmr(pool, 3, 0.5)] == ["dup1", "other", "third"]
    assert [c.chunk_id for c in ranking.mmr(pool, 10, 0.5)][:1] == ["dup1"] and len(ranking.mmr(pool, 10, 0.5)) == 4
    assert ranking.mmr([], 3, 0.5) == []


def test_score_is_the_last_stage() -> None:
    c = ranking.Candidate("x", {}, dense=0.5, sparse=3.0)
    assert c.score == 0.5
    c.fused = 0.03
    assert c.score == 0.03
    c.rerank = -2.0
    assert c.score == -2.0
    assert ranking.Candidate("y", {}, sparse=4.0).score == 4.0


def test_chunk_message_carries_every_stage() -> None:
    fields = {"document_id": "d", "title": "T", "source": "s", "text": "body", "start_char": 3, "end_char": 7,
              "chunk_index": 2, "section": "A > B", "metadata": {"lang": "en"}}
    c = ranking.Candidate("d-2", fields, dense=0.4, dense_rank=3, sparse=7.5, sparse_rank=1, fused=0.032)
    chunk = ranking.to_chunk(c)
    assert (chunk.chunk_id, chunk.document_id, chunk.chunk_index, chunk.section) == ("d-2", "d", 2, "A > B")
    assert (chunk.start_char, chunk.end_char, dict(chunk.metadata)) == (3, 7, {"lang": "en"})
    assert chunk.score == pytest.approx(0.032)
    s = chunk.scores
    assert (s.dense, s.sparse, s.fused, s.dense_rank, s.sparse_rank) == pytest.approx((0.4, 7.5, 0.032, 3, 1))
    assert not s.HasField("rerank")
    bare = ranking.to_chunk(ranking.Candidate("d-2", fields, sparse=1.0, sparse_rank=1))
    assert not bare.scores.HasField("dense") and not bare.scores.HasField("fused") and bare.scores.dense_rank == 0


TOPICS = [
    ("Basalt", "Basalt is a dark volcanic rock formed from rapidly cooling lava rich in magnesium and iron."),
    ("Granite", "Granite is a light intrusive igneous rock that cools slowly deep underground."),
    ("Obsidian", "Obsidian is volcanic glass produced when felsic lava cools too fast to crystallize."),
    ("Pumice", "Pumice is a frothy volcanic rock so full of gas bubbles that it floats on water."),
    ("Limestone", "Limestone is a sedimentary rock made mostly of calcite from shells and coral."),
    ("Marble", "Marble is metamorphosed limestone prized by sculptors for its even texture."),
    ("Slate", "Slate is a fine grained metamorphic rock that splits into thin flat sheets for roofs."),
    ("Sandstone", "Sandstone forms when grains of sand are cemented together by silica or calcite."),
    ("Tuff", "Tuff is rock made of volcanic ash ejected from a vent during an eruption."),
    ("Gneiss", "Gneiss shows banding of light and dark minerals created under high pressure."),
]


@pytest.fixture(scope="module")
async def rocks(embedder, chunker: Chunker, tmp_path_factory) -> MilvusStore:
    store = MilvusStore(str(tmp_path_factory.mktemp("fusion") / "milvus.db"), model_name=embedder.model_name,
                        dimension=embedder.dimension, default_chunking=ChunkingSettings(200, 40, 32))
    await store.ensure_collection("rocks", create=True)
    token = ctx.tenant_var.set("geo")
    try:
        for title, text in TOPICS:
            doc = retrieval_pb2.Document(id=title.lower(), title=title, text=text)
            chunks = chunker.split(text)
            search_texts = [chunker.with_title(title, c.text) for c in chunks]
            vectors = await embedder.embed(search_texts)
            await store.write_document("rocks", PreparedDocument(doc, title, content_hash(doc), chunks, [""] * len(chunks),
                                                                 search_texts, vectors))
    finally:
        ctx.tenant_var.reset(token)
    yield store
    await store.close()


@pytest.mark.parametrize("query", ["volcanic rock that cools fast", "sedimentary calcite", "roof sheets"])
async def test_fusion_matches_milvus_hybrid_search(rocks: MilvusStore, embedder, query: str) -> None:
    depth = 6
    vector = (await embedder.embed([query]))[0]
    token = ctx.tenant_var.set("geo")
    try:
        dense = await rocks.search_dense("rocks", vector, depth)
        sparse = await rocks.search_sparse("rocks", query, depth)
    finally:
        ctx.tenant_var.reset(token)
    assert dense and sparse
    ours_rrf = {c.chunk_id: c.fused for c in ranking.fuse_rrf(ranking.candidates(dense, sparse), 60)}
    ours_weighted = {c.chunk_id: c.fused for c in ranking.fuse_weighted(ranking.candidates(dense, sparse), 0.6)}
    client = rocks._connect_blocking()
    requests = [
        AnnSearchRequest([vector.tolist()], "embedding", {"metric_type": "COSINE"}, depth, expr='tenant == "geo"'),
        AnnSearchRequest([query], "sparse", {"metric_type": "BM25"}, depth, expr='tenant == "geo"'),
    ]
    for ranker, ours in ((RRFRanker(60), ours_rrf), (WeightedRanker(0.6, 0.4), ours_weighted)):
        theirs = client.hybrid_search("rocks", requests, ranker, limit=2 * depth, output_fields=["chunk_id"])[0]
        milvus = {h["entity"]["chunk_id"]: abs(float(h["distance"])) for h in theirs}
        assert milvus.keys() == ours.keys()
        for chunk_id, score in ours.items():
            assert math.isclose(milvus[chunk_id], score, rel_tol=1e-5, abs_tol=1e-6), (type(ranker).__name__, chunk_id)
