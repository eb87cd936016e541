"""``agentmesh eval retrieval``: metrics, the BEIR reader, and the command end to end on a small
BEIR-format dataset built here (the real service, real embeddings, Milvus Lite)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentmesh.retrieval.v1 import retrieval_pb2 as pb
from agentmesh.services.cli.main import app
from agentmesh.services.eval import beir, metrics
from agentmesh.services.eval.retrieval import DEFAULT_CONFIGS, run
from tests.retrieval.helpers import Client

# -- metrics ------------------------------------------------------------------------------------


def test_ndcg_recall_mrr_by_hand() -> None:
    qrels = {"a": 2, "b": 1, "z": 0}
    ranking = ["x", "b", "a", "y"]
    dcg = 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert metrics.ndcg_at_k(ranking, qrels, 10) == pytest.approx(dcg / idcg)
    assert metrics.ndcg_at_k(["a", "b"], qrels, 10) == pytest.approx(1.0)
    assert metrics.ndcg_at_k(["x", "y", "b"], qrels, 2) == 0.0
    assert metrics.recall_at_k(ranking, qrels, 100) == 1.0
    assert metrics.recall_at_k(ranking, qrels, 2) == 0.5
    assert metrics.mrr_at_k(ranking, qrels, 10) == 0.5
    assert metrics.mrr_at_k(["z", "x"], qrels, 10) == 0.0, "grade 0 is not relevant"
    assert metrics.mrr_at_k(["x"] * 10 + ["a"], qrels, 10) == 0.0
    averaged = metrics.evaluate({"q1": ["a"], "q2": []}, {"q1": {"a": 1}, "q2": {"b": 1}})
    assert averaged == {"ndcg@10": 0.5, "recall@100": 0.5, "mrr@10": 0.5}


# -- the BEIR reader ----------------------------------------------------------------------------


def write_beir(root: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str, int]],
               qrels_path: str = "qrels/test.tsv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    path = root / qrels_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return root


def test_reader_keeps_judged_queries_and_falls_back_to_qrels_tsv(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "set", [{"_id": "d1", "title": "T", "text": "x", "metadata": {"y": 1}}, {"_id": 2, "text": ""}],
                      [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "unjudged"}, {"_id": "q3", "text": "zero"}],
                      [("q1", "d1", 1), ("q3", "2", 0)], qrels_path="qrels.tsv")
    ds = beir.load(root)
    assert ds.name == "set" and ds.qrels_file.endswith("qrels.tsv")
    assert [(d.id, d.title, d.metadata) for d in ds.corpus] == [("d1", "T", {"y": "1"}), ("2", "", {})]
    assert ds.queries == {"q1": "first"} and ds.qrels == {"q1": {"d1": 1}}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: (r / "corpus.jsonl").unlink(), "corpus.jsonl is missing"),
        (lambda r: (r / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{bad json\n'), "corpus.jsonl:2: not valid JSON"),
        (lambda r: (r / "corpus.jsonl").write_text('{"_id": "a"}\n{"_id": "a"}\n'), "duplicate _id 'a'"),
        (lambda r: (r / "queries.jsonl").write_text('{"_id": "q1"}\n'), "queries.jsonl:1: query has no text"),
        (lambda r: (r / "qrels" / "test.tsv").write_text("q1\td1\thigh\n"), "score 'high' is not an integer"),
        (lambda r: (r / "qrels" / "test.tsv").unlink(), "has neither qrels/test.tsv nor qrels.tsv"),
        (lambda r: (r / "qrels" / "test.tsv").write_text("q9\td1\t1\n"), "no query of"),
    ],
)
def test_reader_errors_name_the_file_and_line(tmp_path: Path, mutate, message: str) -> None:
    root = write_beir(tmp_path / "set", [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "q"}], [("q1", "d1", 1)])
    mutate(root)
    with pytest.raises(beir.DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        beir.load(root)


# -- end to end ---------------------------------------------------------------------------------

#: Some queries paraphrase their document (no shared content word with any document: BM25 cannot
#: find them); others ask for one part number in crates that each list twenty (all-MiniLM-L6-v2
#: dilutes one code among twenty; BM25 matches it exactly).
PARAPHRASES = [
    ("bread", "Sourdough loaves rise because wild yeast ferments the dough slowly overnight.",
     "why does naturally leavened baking puff up"),
    ("terns", "Arctic terns migrate between the polar regions every year, the longest journey of any bird.",
     "which animal travels furthest annually"),
    ("lava", "Basalt flows out of long cracks in Iceland during fissure eruptions.",
     "molten rock escaping through fractures in the ground"),
    ("lighthouse", "A lighthouse warns ships away from rocks with a rotating beam of light.",
     "tower guiding vessels at night"),
    ("glacier", "Glaciers carve U-shaped valleys as they grind downhill under their own weight.",
     "how moving ice shapes mountain landscapes"),
    ("coral", "Coral reefs grow slowly in warm shallow seas and shelter many fish species.",
     "underwater ecosystems built by tiny animals"),
]


def _crates() -> list[list[str]]:
    rng = random.Random(7)
    return [["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2)) + str(rng.randint(1000, 9999))
             for _ in range(20)] for _ in range(6)]


def small_beir(root: Path) -> Path:
    crates = _crates()
    corpus = [{"_id": key, "title": "", "text": text} for key, text, _ in PARAPHRASES]
    corpus += [{"_id": f"crate-{i}", "title": "", "text": f"Spare parts shipped in crate {i + 1}: {', '.join(codes)}."}
               for i, codes in enumerate(crates)]
    queries = [{"_id": f"p-{key}", "text": query} for key, _, query in PARAPHRASES]
    queries += [{"_id": f"c-{i}-{j}", "text": f"part {codes[j]}"} for i, codes in enumerate(crates) for j in (3, 11)]
    qrels = [(f"p-{key}", key, 1) for key, _, _ in PARAPHRASES]
    qrels += [(f"c-{i}-{j}", f"crate-{i}", 1) for i in range(len(crates)) for j in (3, 11)]
    return write_beir(root, corpus, queries, qrels)


def test_eval_command_end_to_end(tmp_path: Path) -> None:
    dataset = small_beir(tmp_path / "tiny-beir")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", "retrieval", "--beir", str(dataset), "--json", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("dense", "bm25", "hybrid (rrf)", "nDCG@10", "Recall@100", "MRR@10", "12 documents"):
        assert text in result.output
    report = json.loads(out.read_text())
    assert (report["dataset"], report["queries"], report["documents"]) == ("tiny-beir", 18, 12)
    assert report["ingest"]["written"] == 12 and report["ingest"]["chunks"] == 12
    assert report["service"]["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    scores = {r["label"]: r["metrics"] for r in report["results"]}
    assert set(scores) == {"dense", "bm25", "hybrid"}
    for m in scores.values():
        assert all(0.0 <= v <= 1.0 for v in m.values())
    # BM25 finds every part number and no paraphrase; dense misses some part numbers.
    assert scores["bm25"]["mrr@10"] == pytest.approx(12 / 18, abs=1e-4)
    assert scores["dense"]["mrr@10"] < 0.95
    # Fusion gets both halves.
    for metric in ("ndcg@10", "mrr@10"):
        assert scores["hybrid"][metric] > max(scores["dense"][metric], scores["bm25"][metric]), metric


def test_eval_command_refuses_a_bad_dataset(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "retrieval", "--beir", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "is not a directory" in result.output


async def test_run_against_a_running_service(client: Client, tmp_path: Path) -> None:
    dataset = beir.load(small_beir(tmp_path / "tiny"))
    chunking = pb.ChunkingConfig(chunk_tokens=64, overlap_tokens=0, title_tokens=0)
    seen = []
    report = await run(client.address, dataset, collection="tiny_remote", tenant="evaluator", top_k=20,
                       configs=DEFAULT_CONFIGS, chunking=chunking, on_ingest=seen.append)
    assert sum(seen) == 12 and report.queries == 18 and report.service["chunking"] == {"chunk_tokens": 64, "overlap_tokens": 0, "title_tokens": 0}
    again = await run(client.address, dataset, collection="tiny_remote", tenant="evaluator", top_k=20, chunking=chunking)
    assert (again.ingest.written, again.ingest.unchanged) == (0, 12), "a second run re-uses what is stored"
    assert [r.metrics for r in again.results] == [r.metrics for r in report.results]
    assert await client.count("evaluator", "tiny_remote") == report.ingest.chunks > 12, "crates split at 64 tokens"
