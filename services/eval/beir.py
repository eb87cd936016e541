"""Read a dataset in BEIR layout (Thakur et al., NeurIPS 2021 Datasets and Benchmarks):

- ``corpus.jsonl``: one document per line, ``{"_id", "title", "text", "metadata"?}``;
- ``queries.jsonl``: one query per line, ``{"_id", "text", "metadata"?}``;
- ``qrels/<split>.tsv`` (BEIR's own layout; ``test`` by default), else ``qrels.tsv``: a header
  line, then ``query-id <TAB> corpus-id <TAB> score`` rows (an integer relevance grade; > 0 is
  relevant).

Only queries with at least one judged document are evaluated, as BEIR does. Every malformed
line is a ``DatasetError`` naming the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    """The directory is not a readable BEIR dataset; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class CorpusDocument:
    id: str
    title: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Dataset:
    """``qrels[query_id][doc_id]`` is the relevance grade; ``queries`` holds only judged queries."""

    name: str
    corpus: list[CorpusDocument]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    qrels_file: str


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing (a BEIR dataset has corpus.jsonl, queries.jsonl and qrels)")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("_id"), (str, int)):
                raise DatasetError(f'{path}:{lineno}: expected an object with an "_id"')
            rows.append((lineno, obj))
    return rows


def _metadata(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in value.items()
            if v is not None}


def load(directory: str | Path, split: str = "test") -> Dataset:
    """The dataset in ``directory``; ``split`` picks ``qrels/<split>.tsv``."""
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory")
    corpus = []
    seen: set[str] = set()
    for lineno, obj in _jsonl(root / "corpus.jsonl"):
        doc_id = str(obj["_id"])
        if doc_id in seen:
            raise DatasetError(f"{root / 'corpus.jsonl'}:{lineno}: duplicate _id {doc_id!r}")
        seen.add(doc_id)
        title, text = obj.get("title") or "", obj.get("text") or ""
        if not isinstance(title, str) or not isinstance(text, str):
            raise DatasetError(f"{root / 'corpus.jsonl'}:{lineno}: title and text must be strings")
        corpus.append(CorpusDocument(doc_id, title, text, _metadata(obj.get("metadata"))))
    if not corpus:
        raise DatasetError(f"{root / 'corpus.jsonl'} has no documents")
    queries = {}
    for lineno, obj in _jsonl(root / "queries.jsonl"):
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{root / 'queries.jsonl'}:{lineno}: query has no text")
        queries[str(obj["_id"])] = text
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        qrels_path = root / "qrels.tsv"
    if not qrels_path.is_file():
        raise DatasetError(f"{root} has neither qrels/{split}.tsv nor qrels.tsv")
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.rstrip("\n").split("\t")
            if lineno == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue  # the header line
            if not line.strip():
                continue
            if len(parts) < 3:
                raise DatasetError(f"{qrels_path}:{lineno}: expected query-id<TAB>corpus-id<TAB>score")
            try:
                grade = int(parts[-1])
            except ValueError as exc:
                raise DatasetError(f"{qrels_path}:{lineno}: score {parts[-1]!r} is not an integer") from exc
            qrels.setdefault(parts[0], {})[parts[1]] = grade
    judged = {q: t for q, t in queries.items() if any(g > 0 for g in qrels.get(q, {}).values())}
    if not judged:
        raise DatasetError(f"no query of {root / 'queries.jsonl'} has a relevant document in {qrels_path}")
    return Dataset(root.resolve().name, corpus, judged, {q: qrels[q] for q in judged}, str(qrels_path))
