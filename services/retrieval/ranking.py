"""Ranking after retrieval: fusion of the dense and BM25 rankings, maximal marginal relevance,
and the ``Chunk`` messages with every stage's score.

Fusion runs here rather than inside Milvus' ``hybrid_search`` so that each returned chunk can
carry the score and rank it had in each ranking (the citation shows why it was found), and so
that MMR gets the candidates' vectors without a second round trip. The scores are the ones
Milvus' own ``RRFRanker`` and ``WeightedRanker`` compute on the same two rankings (a test checks
both agree on a real collection):

- RRF (Cormack, Clarke & Büttcher, SIGIR 2009): ``fused = Σ_legs 1 / (k + rank)``, ranks from 1;
  a chunk missing from a ranking gets nothing from it. ``k = 60`` is the paper's constant and
  Milvus' default.
- Weighted: each score mapped to 0..1 the way Milvus' ``WeightedRanker`` does with
  ``norm_score=True`` (cosine ``(1 + s) / 2``, BM25 ``2 · atan(s) / π``), then
  ``fused = w · dense + (1 − w) · bm25``, a missing ranking contributing 0.
- MMR (Carbonell & Goldstein, SIGIR 1998): greedily pick the candidate maximizing
  ``λ · relevance − (1 − λ) · max cosine(candidate, picked)``, where relevance is the candidate's
  current score min-max normalized to 0..1 over the pool, so it is on the same scale whatever
  stage produced it (cosine, BM25, fused or reranked).

Ties are broken by the best rank in either ranking, then by chunk id, so results are stable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agentmesh.common.v1 import common_pb2
from agentmesh.services.retrieval.store import Hit

DEFAULT_RRF_K = 60


@dataclass(slots=True)
class Candidate:
    """A chunk found by at least one ranking, with what each stage said about it."""

    chunk_id: str
    fields: dict[str, Any]
    dense: float | None = None
    dense_rank: int = 0
    sparse: float | None = None
    sparse_rank: int = 0
    fused: float | None = None
    rerank: float | None = None

    @property
    def score(self) -> float:
        """The score of the last stage that ran."""
        for value in (self.rerank, self.fused, self.dense, self.sparse):
            if value is not None:
                return value
        return 0.0

    def _tiebreak(self) -> tuple[int, str]:
        ranks = [r for r in (self.dense_rank, self.sparse_rank) if r]
        return (min(ranks) if ranks else 1 << 30, self.chunk_id)


def candidates(dense: Sequence[Hit] = (), sparse: Sequence[Hit] = ()) -> list[Candidate]:
    """Both rankings merged by chunk id, each chunk with its score and 1-based rank in each.
    The order is the dense ranking, then the chunks only BM25 found."""
    merged: dict[str, Candidate] = {}
    for rank, hit in enumerate(dense, 1):
        merged[hit.chunk_id] = Candidate(hit.chunk_id, hit.fields, dense=hit.score, dense_rank=rank)
    for rank, hit in enumerate(sparse, 1):
        c = merged.get(hit.chunk_id)
        if c is None:
            c = merged[hit.chunk_id] = Candidate(hit.chunk_id, hit.fields)
        elif "embedding" in hit.fields and "embedding" not in c.fields:
            c.fields = hit.fields
        c.sparse, c.sparse_rank = hit.score, rank
    return list(merged.values())


def by_score(items: Sequence[Candidate]) -> list[Candidate]:
    """Best first by :attr:`Candidate.score`, ties broken as the module docstring says."""
    return sorted(items, key=lambda c: (-c.score, *c._tiebreak()))


def fuse_rrf(items: Sequence[Candidate], k: int = DEFAULT_RRF_K) -> list[Candidate]:
    """Set ``fused`` by reciprocal rank fusion; returns the candidates best first."""
    for c in items:
        c.fused = sum(1.0 / (k + r) for r in (c.dense_rank, c.sparse_rank) if r)
    return by_score(items)


def fuse_weighted(items: Sequence[Candidate], dense_weight: float) -> list[Candidate]:
    """Set ``fused`` by the weighted sum of normalized scores; returns best first."""
    for c in items:
        dense = (1.0 + c.dense) / 2.0 if c.dense is not None else 0.0
        sparse = 2.0 * math.atan(c.sparse) / math.pi if c.sparse is not None else 0.0
        c.fused = dense_weight * dense + (1.0 - dense_weight) * sparse
    return by_score(items)


def mmr(pool: Sequence[Candidate], top_k: int, lambda_: float) -> list[Candidate]:
    """Up to ``top_k`` candidates of ``pool`` (best first, each with ``fields["embedding"]``, an
    L2-normalized vector) in maximal-marginal-relevance order."""
    if not pool or top_k <= 0:
        return []
    scores = np.asarray([c.score for c in pool], dtype=np.float64)
    span = scores.max() - scores.min()
    relevance = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
    vectors = np.asarray([c.fields["embedding"] for c in pool], dtype=np.float32)
    redundancy = np.zeros(len(pool))  # highest similarity to anything picked so far
    available = np.ones(len(pool), dtype=bool)
    picked: list[Candidate] = []
    for _ in range(min(top_k, len(pool))):
        value = lambda_ * relevance - (1.0 - lambda_) * redundancy
        value[~available] = -np.inf
        i = int(np.argmax(value))  # first maximum: the better-ranked candidate wins ties
        picked.append(pool[i])
        available[i] = False
        sims = vectors @ vectors[i]
        redundancy = sims if len(picked) == 1 else np.maximum(redundancy, sims)
    return picked


def to_chunk(c: Candidate) -> common_pb2.Chunk:
    """The ``Chunk`` message of a candidate, with every stage's score (unset when not run)."""
    f = c.fields
    scores = common_pb2.ChunkScores(dense_rank=c.dense_rank, sparse_rank=c.sparse_rank)
    if c.dense is not None:
        scores.dense = c.dense
    if c.sparse is not None:
        scores.sparse = c.sparse
    if c.fused is not None:
        scores.fused = c.fused
    if c.rerank is not None:
        scores.rerank = c.rerank
    metadata = f.get("metadata") or {}
    return common_pb2.Chunk(
        chunk_id=c.chunk_id,
        document_id=f["document_id"],
        title=f["title"],
        source=f["source"],
        text=f["text"],
        start_char=f["start_char"],
        end_char=f["end_char"],
        score=c.score,
        scores=scores,
        chunk_index=f["chunk_index"],
        section=f.get("section") or "",
        metadata={str(k): v if isinstance(v, str) else str(v) for k, v in metadata.items()},
    )
