"""Ranking metrics as BEIR reports them (through ``pytrec_eval``, i.e. trec_eval's definitions).

For one query, ``ranking`` is the retrieved document ids best first and ``qrels`` maps judged
document ids to relevance grades (> 0 relevant):

- nDCG@k (Järvelin & Kekäläinen, 2002): ``DCG@k / IDCG@k`` with ``DCG@k = Σ_{i=1..k} grade_i /
  log2(i + 1)`` (trec_eval's linear gain) and IDCG@k the DCG of the judged grades sorted best
  first; 0 when nothing is relevant.
- Recall@k: relevant documents among the first k, over all relevant documents.
- MRR@k: ``1 / rank`` of the first relevant document within the first k, else 0.

Each is averaged over the queries (macro average), as BEIR does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def ndcg_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    dcg = sum(max(qrels.get(doc, 0), 0) / math.log2(i + 2) for i, doc in enumerate(ranking[:k]))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    relevant = {doc for doc, g in qrels.items() if g > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    for i, doc in enumerate(ranking[:k]):
        if qrels.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


#: The metrics `agentmesh eval retrieval` reports, by name.
METRICS = {
    "ndcg@10": lambda r, q: ndcg_at_k(r, q, 10),
    "recall@100": lambda r, q: recall_at_k(r, q, 100),
    "mrr@10": lambda r, q: mrr_at_k(r, q, 10),
}


def evaluate(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Mean of every metric in :data:`METRICS` over the queries of ``qrels`` (a query with no
    ranking counts as retrieving nothing)."""
    if not qrels:
        return {name: 0.0 for name in METRICS}
    return {
        name: sum(fn(rankings.get(q, ()), judged) for q, judged in qrels.items()) / len(qrels)
        for name, fn in METRICS.items()
    }
