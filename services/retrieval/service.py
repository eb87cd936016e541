"""Retrieval service: ingests documents into Milvus and searches them (dense, BM25 or hybrid).

``IngestDocuments`` (client streaming) validates every document as it arrives, reads its format
(:mod:`~agentmesh.services.retrieval.parsing`: plain text, Markdown, HTML, PDF, JSONL records),
skips it when the stored version has the same content hash, chunks the rest along its structure
(:mod:`~agentmesh.services.retrieval.chunking`, with the collection's chunking settings) and
embeds the chunks in batches that span documents. Nothing is written until the stream has ended
cleanly, so a bad document anywhere in the stream (INVALID_ARGUMENT, naming its index) or a
cancelled stream writes nothing. Then each document is written by
:meth:`~agentmesh.services.retrieval.store.MilvusStore.write_document`; when the response
arrives, the chunks are searchable (read-your-writes). The response reports what happened to
each document and how long embedding took.

``Search`` runs the dense ranking (cosine similarity of embeddings), the BM25 ranking (Milvus'
BM25 function) or both, fused (:mod:`~agentmesh.services.retrieval.ranking`); the default is
hybrid with reciprocal rank fusion. Then optionally the configured reranker, ``min_score``, and
maximal-marginal-relevance diversification. Typed filter conditions
(:mod:`~agentmesh.services.retrieval.filters`) narrow every ranking; the tenant condition is
always added by the store, from the request context.

``DeleteDocuments``, ``CreateCollection``, ``DescribeCollection`` and ``DropCollection`` manage
documents and collections; see their docstrings. Everything is scoped to the caller's tenant
(``x-tenant-id``). Health is SERVING only while the embedder is loaded and Milvus answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import numpy as np
from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.retrieval import filters, parsing, ranking
from agentmesh.services.retrieval.chunking import Chunker, TextChunk
from agentmesh.services.retrieval.embedder import Embedder, OpenAIEmbedder, SentenceTransformerEmbedder
from agentmesh.services.retrieval.rerank import HttpReranker, Reranker
from agentmesh.services.retrieval.store import (
    MAX_DOCUMENT_ID_BYTES,
    MAX_SECTION_BYTES,
    MAX_SOURCE_BYTES,
    MAX_TITLE_BYTES,
    ChunkingSettings,
    MilvusStore,
    PreparedDocument,
    content_hash,
)
from agentmesh.services.runtime.context import downstream_timeout
from agentmesh.services.runtime.errors import ServiceError, invalid_argument
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import ServiceSettings

log = logging.getLogger("agentmesh.retrieval")

#: Milvus collection names: a letter or underscore, then letters, digits, underscores; ≤ 255.
COLLECTION_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
MAX_QUERY_CHARS = 8192
DEFAULT_TOP_K = 5
MAX_CANDIDATES = 1000
MAX_DELETE_IDS = 1000
#: Largest metadata map of one document, JSON-encoded, in bytes (Milvus JSON fields hold 64 KiB).
MAX_METADATA_BYTES = 16 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MODES = {
    "dense": retrieval_pb2.SEARCH_MODE_DENSE,
    "sparse": retrieval_pb2.SEARCH_MODE_SPARSE,
    "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID,
}
_FUSIONS = {"rrf": retrieval_pb2.FUSION_METHOD_RRF, "weighted": retrieval_pb2.FUSION_METHOD_WEIGHTED}
_TEXT_FORMATS = (
    retrieval_pb2.DOCUMENT_FORMAT_UNSPECIFIED,
    retrieval_pb2.DOCUMENT_FORMAT_PLAIN_TEXT,
    retrieval_pb2.DOCUMENT_FORMAT_MARKDOWN,
    retrieval_pb2.DOCUMENT_FORMAT_HTML,
)


def default_milvus_uri() -> str:
    """``.agentmesh/data/milvus.db`` under ``$AGENTMESH_HOME``, else under the working directory."""
    home = Path(os.environ.get("AGENTMESH_HOME") or Path.cwd())
    return str(home / ".agentmesh" / "data" / "milvus.db")


class RetrievalSettings(ServiceSettings):
    """Settings of the retrieval service (env prefix ``AGENTMESH_RETRIEVAL_``).

    The search and chunking defaults were chosen by measurement; see
    ``services/retrieval/README.md`` for the figures.
    """

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_RETRIEVAL_", extra="ignore")

    milvus_uri: str = Field(
        default_factory=default_milvus_uri,
        validation_alias=AliasChoices("AGENTMESH_RETRIEVAL_MILVUS_URI", "MILVUS_URI", "milvus_uri"),
        description="Milvus Lite file (*.db) or Milvus server URL (http://host:19530). Read from "
        "AGENTMESH_RETRIEVAL_MILVUS_URI, else MILVUS_URI; default .agentmesh/data/milvus.db under "
        "AGENTMESH_HOME or the working directory.",
    )
    milvus_token: str = Field(
        "",
        validation_alias=AliasChoices("AGENTMESH_RETRIEVAL_MILVUS_TOKEN", "MILVUS_TOKEN", "milvus_token"),
        description="Milvus server credentials ('user:password' or an API key); empty for Milvus Lite.",
    )
    milvus_timeout_s: float = Field(10.0, gt=0, description="Timeout of each Milvus call, in seconds.")
    default_collection: str = Field(
        "agentmesh_docs", pattern=COLLECTION_PATTERN.pattern, description="Collection used when a request names none."
    )
    # -- embedder
    embedder: Literal["local", "openai"] = Field(
        "local", description="'local': sentence-transformers on this machine; 'openai': an OpenAI-compatible "
        "embeddings API (embedding_model, embedding_api_base, embedding_api_key)."
    )
    embedding_model_path: str = Field(
        "", description="local: directory of a sentence-transformers model; empty = the packaged all-MiniLM-L6-v2."
    )
    embedding_model: str = Field("", description="openai: the API's model name (e.g. text-embedding-3-small).")
    embedding_api_base: str = Field(
        "", description="openai: base URL of the API (e.g. http://vllm:8000/v1); empty = api.openai.com."
    )
    embedding_api_key: str = Field(
        "",
        validation_alias=AliasChoices("AGENTMESH_RETRIEVAL_EMBEDDING_API_KEY", "OPENAI_API_KEY", "embedding_api_key"),
        description="openai: API key (AGENTMESH_RETRIEVAL_EMBEDDING_API_KEY, else OPENAI_API_KEY).",
    )
    embedding_dimensions: int | None = Field(
        None, ge=1, description="openai: sent as `dimensions` (shortened text-embedding-3 vectors); unset = the model's."
    )
    embedding_max_tokens: int = Field(8191, ge=16, description="openai: the model's input limit, in its tokens.")
    embedding_tokenizer_path: str = Field(
        "", description="openai: tokenizer.json of the model, to size chunks in its tokens; empty = the packaged "
        "MiniLM tokenizer as an approximation."
    )
    embedding_timeout_s: float = Field(30.0, gt=0, description="openai: timeout of each embeddings request, s.")
    embed_batch_size: int = Field(32, ge=1, le=2048, description="Texts per embedding forward pass or API request.")
    # -- chunking (of collections created without explicit settings, the default collection included)
    chunk_tokens: int = Field(200, ge=16, description="Largest chunk, in embedding-model tokens.")
    chunk_overlap_tokens: int = Field(40, ge=0, description="Tokens a chunk repeats from the end of the previous one.")
    title_tokens: int = Field(
        32, ge=0, description="Tokens of title and section heading indexed with each chunk; 0 = the chunk text alone."
    )
    # -- search
    default_search_mode: Literal["dense", "sparse", "hybrid"] = Field(
        "hybrid", description="Mode of a Search that names none."
    )
    fusion: Literal["rrf", "weighted"] = Field(
        "rrf", description="Fusion of a hybrid Search that names none (weighted 0.5 measured higher on the home-made "
        "sets; RRF stays the default, see the README)."
    )
    rrf_k: int = Field(60, ge=1, le=1000, description="Constant k of reciprocal rank fusion.")
    dense_weight: float = Field(
        0.5, ge=0, le=1, description="Weighted fusion: weight of the dense ranking (0.5 scored best of 0.3/0.5/0.7/0.8)."
    )
    candidates: int = Field(
        50, ge=1, le=MAX_CANDIDATES,
        description="Depth of each fused ranking and size of the reranked/diversified pool (at least top_k).",
    )
    mmr_lambda: float = Field(0.5, ge=0, le=1, description="MMR relevance weight when a request leaves it unset.")
    max_top_k: int = Field(100, ge=1, le=16384, description="Largest top_k Search accepts.")
    # -- reranker
    reranker_url: str = Field(
        "", description="Cohere-compatible rerank endpoint (e.g. http://vllm:8000/v1/rerank); empty = no reranker."
    )
    reranker_model: str = Field("", description="Model name sent to the rerank endpoint.")
    reranker_api_key: str = Field("", description="Bearer key of the rerank endpoint.")
    reranker_timeout_s: float = Field(10.0, gt=0, description="Timeout of one rerank call, in seconds.")
    # -- ingestion
    max_ingest_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Most document text and content (bytes) one IngestDocuments stream may carry; the stream is "
        "held until it ends so that a bad document writes nothing.",
    )

    @field_validator("milvus_uri")
    @classmethod
    def _uri_supported(cls, value: str) -> str:
        if not (value.endswith(".db") or re.match(r"^(https?|tcp|unix)://", value)):
            raise ValueError(
                f"milvus_uri {value!r} is neither a Milvus Lite file ending in .db nor an http(s)://, tcp:// "
                "or unix:// Milvus address"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RetrievalSettings:
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap_tokens ({self.chunk_overlap_tokens}) must be smaller than chunk_tokens ({self.chunk_tokens})"
            )
        if self.embedder == "openai" and not self.embedding_model:
            raise ValueError("embedder 'openai' needs embedding_model (AGENTMESH_RETRIEVAL_EMBEDDING_MODEL)")
        return self

    def default_chunking(self) -> ChunkingSettings:
        return ChunkingSettings(self.chunk_tokens, self.chunk_overlap_tokens, self.title_tokens)


def build_embedder(settings: RetrievalSettings) -> Embedder:
    """The embedder the settings describe (not loaded yet)."""
    if settings.embedder == "openai":
        return OpenAIEmbedder(
            settings.embedding_model,
            base_url=settings.embedding_api_base or None,
            api_key=settings.embedding_api_key,
            dimensions=settings.embedding_dimensions,
            batch_size=settings.embed_batch_size,
            max_tokens=settings.embedding_max_tokens,
            tokenizer_path=settings.embedding_tokenizer_path or None,
            timeout_s=settings.embedding_timeout_s,
        )
    return SentenceTransformerEmbedder(settings.embedding_model_path or None, batch_size=settings.embed_batch_size)


def validate_collection(name: str) -> None:
    """INVALID_ARGUMENT unless ``name`` is a valid Milvus collection name."""
    if not COLLECTION_PATTERN.match(name):
        raise invalid_argument(
            f"collection {name[:80]!r} is not a valid name: use a letter or '_' followed by up to 254 "
            "letters, digits or '_' (or leave it empty for the default collection)"
        )


def _where(label: str, doc: retrieval_pb2.Document) -> str:
    return label + (f" (id {doc.id[:64]!r})" if doc.id else "")


def _nothing_written(where: str, problem: str) -> ServiceError:
    return invalid_argument(f"{where}: {problem}; nothing from this stream was written")


def validate_id(document_id: str) -> str | None:
    """What is wrong with a document id, or None."""
    n = len(document_id.encode())
    if not 1 <= n <= MAX_DOCUMENT_ID_BYTES:
        return f"id must be 1..{MAX_DOCUMENT_ID_BYTES} bytes of UTF-8, got {n}"
    if _CONTROL.search(document_id):
        return "id must not contain control characters"
    return None


def validate_carrier(label: str, doc: retrieval_pb2.Document) -> None:
    """INVALID_ARGUMENT when a received document's format and payload do not fit together."""
    where = _where(label, doc)
    fmt = doc.format
    if fmt not in retrieval_pb2.DocumentFormat.values():
        raise _nothing_written(where, f"format {fmt} is unknown; use a DOCUMENT_FORMAT_* value")
    if doc.text and doc.content:
        raise _nothing_written(where, "set text or content, not both")
    if fmt == retrieval_pb2.DOCUMENT_FORMAT_PDF and not doc.content:
        raise _nothing_written(where, "a PDF document needs its bytes in content")
    if fmt == retrieval_pb2.DOCUMENT_FORMAT_JSONL and doc.id:
        raise _nothing_written(where, "a JSONL document's records carry their own ids; leave its id empty")


def validate_document(label: str, doc: retrieval_pb2.Document) -> None:
    """INVALID_ARGUMENT naming ``label`` when ``doc`` (a JSONL record, or any other document)
    cannot be stored."""
    where = _where(label, doc)
    if problem := validate_id(doc.id):
        raise _nothing_written(where, problem)
    if doc.format in _TEXT_FORMATS and not doc.content and not doc.text.strip():
        raise _nothing_written(where, "text is empty; send the document's plain text")
    if (n := len(doc.title.encode())) > MAX_TITLE_BYTES:
        raise _nothing_written(where, f"title is {n} bytes; at most {MAX_TITLE_BYTES}")
    if (n := len(doc.source.encode())) > MAX_SOURCE_BYTES:
        raise _nothing_written(where, f"source is {n} bytes; at most {MAX_SOURCE_BYTES}")
    if (n := len(json.dumps(dict(doc.metadata), ensure_ascii=False).encode())) > MAX_METADATA_BYTES:
        raise _nothing_written(where, f"metadata is {n} bytes as JSON; at most {MAX_METADATA_BYTES}")


def _cut_bytes(text: str, limit: int) -> str:
    """``text`` shortened to at most ``limit`` bytes of UTF-8, on a character boundary."""
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore")


@dataclass(slots=True)
class _Pending:
    """A document chunked and waiting for its embeddings; ``result`` is its response entry."""

    document: retrieval_pb2.Document
    title: str
    digest: str
    chunks: list[TextChunk]
    sections: list[str]
    search_texts: list[str]
    result: retrieval_pb2.DocumentResult


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """gRPC methods; every call is scoped to ``current_tenant()``."""

    def __init__(self, service: RetrievalService):
        self._service = service

    # -- ingestion ------------------------------------------------------------------------------

    async def IngestDocuments(self, request_iterator, context) -> retrieval_pb2.IngestDocumentsResponse:
        """INVALID_ARGUMENT for a bad document or collection, an unreadable file or a bad JSONL
        line (naming the document's 0-based index, and the line; nothing written),
        RESOURCE_EXHAUSTED above ``max_ingest_bytes``, FAILED_PRECONDITION for a collection of
        another embedding model or an earlier schema, ABORTED when the collection was created
        meanwhile with other chunking, UNAVAILABLE when Milvus or the embeddings API fails."""
        started = time.perf_counter()
        svc = self._service
        settings = svc.settings
        store = svc.store
        received = 0
        embed_s = 0.0
        collection: str | None = None
        collection_exists = False
        chunking: ChunkingSettings | None = None
        chunker: Chunker | None = None
        seen: dict[str, str] = {}
        total_bytes = 0
        results: list[retrieval_pb2.DocumentResult] = []
        pending: list[_Pending] = []
        pending_chunks = 0
        prepared: list[tuple[PreparedDocument, retrieval_pb2.DocumentResult]] = []
        # Embed once this many chunks are waiting: several forward passes per call, across documents.
        group = settings.embed_batch_size * 8

        async def embed_pending() -> None:
            nonlocal pending, pending_chunks, embed_s
            if not pending:
                return
            texts = [t for p in pending for t in p.search_texts]
            # One forward pass per call, shortest texts together (less padding); a Search's query
            # embedding queues behind at most one batch instead of a whole group.
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            vectors = np.empty((len(texts), svc.embedder.dimension), dtype=np.float32)
            t0 = time.perf_counter()
            for start in range(0, len(order), settings.embed_batch_size):
                batch = order[start : start + settings.embed_batch_size]
                vectors[batch] = await svc.embedder.embed([texts[i] for i in batch])
            embed_s += time.perf_counter() - t0
            row = 0
            for p in pending:
                n = len(p.chunks)
                prepared.append((PreparedDocument(p.document, p.title, p.digest, p.chunks, p.sections, p.search_texts,
                                                  vectors[row : row + n]), p.result))
                row += n
            pending, pending_chunks = [], 0

        async def admit(label: str, doc: retrieval_pb2.Document) -> None:
            nonlocal received, pending_chunks
            assert collection is not None and chunker is not None
            received += 1
            validate_document(label, doc)
            where = _where(label, doc)
            if doc.id in seen:
                raise _nothing_written(where, f"the same id was already sent as {seen[doc.id]}; send each document "
                                              "once per stream")
            seen[doc.id] = label
            digest = content_hash(doc)
            if collection_exists and await store.is_current(collection, doc.id, digest):
                results.append(retrieval_pb2.DocumentResult(
                    id=doc.id, status=retrieval_pb2.DOCUMENT_STATUS_UNCHANGED,
                    chunks=await store.count(collection, doc.id)))
                return
            try:
                parsed = await asyncio.to_thread(parsing.parse, doc)
            except ValueError as exc:
                raise _nothing_written(where, str(exc)) from None
            chunks = await asyncio.to_thread(chunker.split, parsed.text, parsed.breaks())
            if not chunks:
                raise _nothing_written(where, "text has no indexable tokens")
            title = doc.title or _cut_bytes(parsed.title, MAX_TITLE_BYTES)
            sections = [_cut_bytes(parsed.section(c.start, c.end), MAX_SECTION_BYTES) for c in chunks]
            search_texts = [chunker.with_title(title, c.text, s) for c, s in zip(chunks, sections, strict=True)]
            result = retrieval_pb2.DocumentResult(id=doc.id, chunks=len(chunks))
            results.append(result)
            pending.append(_Pending(doc, title, digest, chunks, sections, search_texts, result))
            pending_chunks += len(chunks)
            if pending_chunks >= group:
                await embed_pending()

        index = -1
        async for request in request_iterator:
            index += 1
            name = request.collection or settings.default_collection
            if collection is None:
                validate_collection(name)
                collection = name
                try:
                    chunking = await store.ensure_collection(name, create=False)
                    collection_exists = True
                except ServiceError as exc:
                    if exc.code != grpc.StatusCode.NOT_FOUND:
                        raise
                    chunking = settings.default_chunking()
                chunker = svc.chunker_for(chunking)
            elif name != collection:
                raise invalid_argument(
                    f"documents[{index}]: collection {name[:80]!r} differs from {collection!r} named by the "
                    "first message; one stream writes one collection; nothing from this stream was written"
                )
            carrier = request.document
            label = f"documents[{index}]"
            validate_carrier(label, carrier)
            total_bytes += len(carrier.text.encode()) + len(carrier.content)
            if total_bytes > settings.max_ingest_bytes:
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"documents[{index}]: the stream carries more than {settings.max_ingest_bytes} bytes of text; "
                    "split the documents over several streams; nothing from this stream was written",
                )
            if carrier.format == retrieval_pb2.DOCUMENT_FORMAT_JSONL:
                try:
                    records = await asyncio.to_thread(parsing.parse_jsonl, carrier)
                except ValueError as exc:
                    raise _nothing_written(label, str(exc)) from None
                for record in records:
                    await admit(f"{label} line {record.line}", record.document)
            else:
                await admit(label, carrier)
        await embed_pending()

        written = unchanged = chunks_written = chunks_deleted = 0
        if prepared:
            assert collection is not None and chunker is not None
            created_with = await store.ensure_collection(collection, create=True, chunking=chunking)
            if created_with != chunking:
                raise ServiceError(
                    grpc.StatusCode.ABORTED,
                    f"collection {collection!r} was created meanwhile with other chunking settings than this stream's "
                    "documents were cut with; send the stream again; nothing from this stream was written",
                )
            for item, result in prepared:
                outcome = await store.write_document(collection, item)
                if outcome.written:
                    result.status = retrieval_pb2.DOCUMENT_STATUS_WRITTEN
                    result.chunks_deleted = outcome.chunks_deleted
                    written += 1
                    chunks_written += outcome.chunks_written
                    chunks_deleted += outcome.chunks_deleted
                else:
                    result.status = retrieval_pb2.DOCUMENT_STATUS_UNCHANGED
        unchanged = sum(r.status == retrieval_pb2.DOCUMENT_STATUS_UNCHANGED for r in results)
        duration_ms = round((time.perf_counter() - started) * 1000)
        log.info(
            "ingested",
            extra={"fields": {"collection": collection, "received": received, "written": written,
                              "unchanged": unchanged, "chunks_written": chunks_written,
                              "chunks_deleted": chunks_deleted, "embedding_ms": round(embed_s * 1000),
                              "duration_ms": duration_ms}},
        )
        return retrieval_pb2.IngestDocumentsResponse(
            documents_received=received,
            documents_written=written,
            documents_unchanged=unchanged,
            chunks_written=chunks_written,
            chunks_deleted=chunks_deleted,
            documents=results,
            embedding_ms=round(embed_s * 1000),
            duration_ms=duration_ms,
        )

    # -- search ---------------------------------------------------------------------------------

    async def Search(self, request: retrieval_pb2.SearchRequest, context) -> retrieval_pb2.SearchResponse:
        """INVALID_ARGUMENT for an empty or over-long query, a top_k above ``max_top_k``, an
        unknown mode or fusion, out-of-range weights, k, candidates or lambda, a malformed filter
        condition or a bad collection name; NOT_FOUND for a collection that does not exist;
        FAILED_PRECONDITION for a collection of another embedding model or an earlier schema, or
        ``rerank`` without a configured reranker; UNAVAILABLE when Milvus, the embeddings API or
        the reranker fails. Queries longer than the model's input limit are embedded from their
        beginning (BM25 reads all of it)."""
        svc = self._service
        s = svc.settings
        collection = request.collection or s.default_collection
        validate_collection(collection)
        query = request.query
        if not query.strip():
            raise invalid_argument("query is empty; send 1..8192 characters of text")
        if len(query) > MAX_QUERY_CHARS:
            raise invalid_argument(f"query is {len(query)} characters; at most {MAX_QUERY_CHARS}")
        top_k = request.top_k or DEFAULT_TOP_K
        if top_k > s.max_top_k:
            raise invalid_argument(f"top_k {top_k} exceeds this service's maximum of {s.max_top_k}")
        mode = request.mode or _MODES[s.default_search_mode]
        if mode not in _MODES.values():
            raise invalid_argument(
                f"search mode {request.mode} is not supported; use SEARCH_MODE_DENSE, _SPARSE or _HYBRID"
            )
        if math.isnan(request.min_score):
            raise invalid_argument("min_score is NaN; send a number")
        fusion = request.fusion or _FUSIONS[s.fusion]
        if fusion not in _FUSIONS.values():
            raise invalid_argument(f"fusion {request.fusion} is not supported; use FUSION_METHOD_RRF or _WEIGHTED")
        dense_weight = request.dense_weight if request.HasField("dense_weight") else s.dense_weight
        if not 0.0 <= dense_weight <= 1.0:  # also refuses NaN
            raise invalid_argument(f"dense_weight {dense_weight} is outside 0..1")
        rrf_k = request.rrf_k or s.rrf_k
        if rrf_k > 1000:
            raise invalid_argument(f"rrf_k {rrf_k} is above 1000")
        if request.candidates > MAX_CANDIDATES:
            raise invalid_argument(f"candidates {request.candidates} is above {MAX_CANDIDATES}")
        if request.candidates and request.candidates < top_k:
            raise invalid_argument(f"candidates ({request.candidates}) must be at least top_k ({top_k})")
        pool = request.candidates or max(top_k, s.candidates)
        use_mmr = request.HasField("mmr")
        lambda_ = request.mmr.relevance_weight if request.mmr.HasField("relevance_weight") else s.mmr_lambda
        if use_mmr and not 0.0 <= lambda_ <= 1.0:
            raise invalid_argument(f"mmr.relevance_weight {lambda_} is outside 0..1")
        if request.rerank and svc.reranker is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "rerank was requested but this retrieval service has no reranker configured "
                "(AGENTMESH_RETRIEVAL_RERANKER_URL); search without rerank",
            )
        conditions = filters.render(request.filters)
        await svc.store.ensure_collection(collection, create=False)

        hybrid = mode == retrieval_pb2.SEARCH_MODE_HYBRID
        # Only a stage that reorders needs more than top_k candidates.
        depth = pool if (hybrid or use_mmr or request.rerank) else top_k

        async def dense() -> list:
            vector = (await svc.embedder.embed([query]))[0]
            return await svc.store.search_dense(collection, vector, depth, conditions, with_vectors=use_mmr)

        async def sparse() -> list:
            return await svc.store.search_sparse(collection, query, depth, conditions, with_vectors=use_mmr)

        if hybrid:
            dense_hits, sparse_hits = await asyncio.gather(dense(), sparse())
            found = ranking.candidates(dense_hits, sparse_hits)
            if fusion == retrieval_pb2.FUSION_METHOD_WEIGHTED:
                ranked = ranking.fuse_weighted(found, dense_weight)
            else:
                ranked = ranking.fuse_rrf(found, rrf_k)
        elif mode == retrieval_pb2.SEARCH_MODE_DENSE:
            ranked = ranking.by_score(ranking.candidates(dense=await dense()))
        else:
            ranked = ranking.by_score(ranking.candidates(sparse=await sparse()))
        ranked = ranked[:pool]

        if request.rerank and ranked:
            assert svc.reranker is not None
            texts = [f"{c.fields['title']}\n{c.fields['text']}" if c.fields["title"] else c.fields["text"] for c in ranked]
            scores = await svc.reranker.rerank(query, texts, downstream_timeout(s.reranker_timeout_s, reserve_s=0.05))
            for c, score in zip(ranked, scores, strict=True):
                c.rerank = score
            ranked = ranking.by_score(ranked)
        ranked = [c for c in ranked if c.score >= request.min_score]
        final = ranking.mmr(ranked, top_k, lambda_) if use_mmr else ranked[:top_k]
        return retrieval_pb2.SearchResponse(
            chunks=[ranking.to_chunk(c) for c in final],
            mode=mode,
            fusion=fusion if hybrid else retrieval_pb2.FUSION_METHOD_UNSPECIFIED,
        )

    # -- documents and collections --------------------------------------------------------------

    async def DeleteDocuments(self, request: retrieval_pb2.DeleteDocumentsRequest, context
                              ) -> retrieval_pb2.DeleteDocumentsResponse:
        """INVALID_ARGUMENT without ids and filters, for more than 1000 ids, a bad id or a
        malformed condition; NOT_FOUND for a missing collection; FAILED_PRECONDITION as Search;
        UNAVAILABLE when Milvus fails. Deleting documents that do not exist deletes nothing."""
        svc = self._service
        collection = request.collection or svc.settings.default_collection
        validate_collection(collection)
        ids = list(request.document_ids)
        if not ids and not request.filters:
            raise invalid_argument("give document_ids, filters or both; to delete every document use DropCollection")
        if len(ids) > MAX_DELETE_IDS:
            raise invalid_argument(f"{len(ids)} document ids; at most {MAX_DELETE_IDS} per call")
        for i, doc_id in enumerate(ids):
            if problem := validate_id(doc_id):
                raise invalid_argument(f"document_ids[{i}]: {problem}")
        conditions = filters.render(request.filters)
        await svc.store.ensure_collection(collection, create=False)
        documents, chunks = await svc.store.delete_documents(collection, ids, conditions)
        log.info("deleted documents", extra={"fields": {"collection": collection, "documents": documents,
                                                        "chunks": chunks}})
        return retrieval_pb2.DeleteDocumentsResponse(documents_deleted=documents, chunks_deleted=chunks)

    async def _info(self, collection: str, chunking: ChunkingSettings) -> retrieval_pb2.CollectionInfo:
        store = self._service.store
        chunks, documents = await store.counts(collection)
        return retrieval_pb2.CollectionInfo(
            name=collection,
            embedding_model=store.model_name,
            embedding_dimension=store.dimension,
            chunking=retrieval_pb2.ChunkingConfig(chunk_tokens=chunking.chunk_tokens,
                                                  overlap_tokens=chunking.overlap_tokens,
                                                  title_tokens=chunking.title_tokens),
            chunks=chunks,
            documents=documents,
        )

    async def CreateCollection(self, request: retrieval_pb2.CreateCollectionRequest, context
                               ) -> retrieval_pb2.CreateCollectionResponse:
        """INVALID_ARGUMENT for a missing or bad name, or chunking the embedder cannot take
        (chunks it would truncate, an overlap not below the chunk size); ALREADY_EXISTS when the
        collection exists with other chunking; FAILED_PRECONDITION when it exists with another
        model or an earlier schema; UNAVAILABLE when Milvus fails."""
        svc = self._service
        if not request.collection:
            raise invalid_argument("collection is empty; name the collection to create")
        validate_collection(request.collection)
        default = svc.settings.default_chunking()
        c = request.chunking
        chunking = ChunkingSettings(
            c.chunk_tokens if c.HasField("chunk_tokens") else default.chunk_tokens,
            c.overlap_tokens if c.HasField("overlap_tokens") else default.overlap_tokens,
            c.title_tokens if c.HasField("title_tokens") else default.title_tokens,
        )
        try:
            svc.chunker_for(chunking)
        except ValueError as exc:
            raise invalid_argument(f"chunking: {exc}") from None
        settings, created = await svc.store.create_collection(request.collection, chunking)
        return retrieval_pb2.CreateCollectionResponse(collection=await self._info(request.collection, settings),
                                                      created=created)

    async def DescribeCollection(self, request: retrieval_pb2.DescribeCollectionRequest, context
                                 ) -> retrieval_pb2.DescribeCollectionResponse:
        """NOT_FOUND for a missing collection; INVALID_ARGUMENT, FAILED_PRECONDITION and
        UNAVAILABLE as Search."""
        svc = self._service
        collection = request.collection or svc.settings.default_collection
        validate_collection(collection)
        chunking = await svc.store.ensure_collection(collection, create=False)
        return retrieval_pb2.DescribeCollectionResponse(collection=await self._info(collection, chunking))

    async def DropCollection(self, request: retrieval_pb2.DropCollectionRequest, context
                             ) -> retrieval_pb2.DropCollectionResponse:
        """Deletes the caller's tenant's documents; removes the collection once no tenant has
        chunks in it (also for collections of another model or an earlier schema, which is how
        those are re-created). NOT_FOUND for a missing collection; FAILED_PRECONDITION for one
        not created by this service; UNAVAILABLE when Milvus fails."""
        svc = self._service
        collection = request.collection or svc.settings.default_collection
        validate_collection(collection)
        documents, chunks, removed = await svc.store.drop_collection(collection)
        log.info("dropped tenant's documents", extra={"fields": {"collection": collection, "documents": documents,
                                                                 "chunks": chunks, "collection_removed": removed}})
        return retrieval_pb2.DropCollectionResponse(documents_deleted=documents, chunks_deleted=chunks,
                                                    collection_removed=removed)


class RetrievalService(Service):
    """The retrieval service: the embedder, the chunkers, the Milvus store, the optional
    reranker and the servicer."""

    kind = "retrieval"
    settings: RetrievalSettings

    def __init__(self, settings: RetrievalSettings, embedder: Embedder | None = None,
                 reranker: Reranker | None = None):
        """``embedder``: an already created (possibly loaded) embedder to share, e.g. between
        services in one process; it is then not closed by :meth:`stop`. ``reranker``: one to
        use instead of the one ``reranker_url`` describes."""
        super().__init__(settings)
        self._owns_embedder = embedder is None
        self.embedder: Embedder = embedder or build_embedder(settings)
        self.reranker: Reranker | None = reranker or (
            HttpReranker(settings.reranker_url, model=settings.reranker_model, api_key=settings.reranker_api_key)
            if settings.reranker_url else None
        )
        self._store: MilvusStore | None = None
        self._chunkers: dict[ChunkingSettings, Chunker] = {}

    @property
    def store(self) -> MilvusStore:
        if self._store is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "retrieval service is still starting; retry shortly")
        return self._store

    @property
    def chunker(self) -> Chunker:
        """The chunker of the service's default chunking settings."""
        return self.chunker_for(self.settings.default_chunking())

    def chunker_for(self, chunking: ChunkingSettings) -> Chunker:
        """A chunker with ``chunking`` for this embedder; ``ValueError`` when the settings do not
        fit the model (see :class:`Chunker`)."""
        if not self.embedder.loaded:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "retrieval service is still starting; retry shortly")
        chunker = self._chunkers.get(chunking)
        if chunker is None:
            chunker = self._chunkers[chunking] = Chunker(
                self.embedder.tokenizer,
                model_max_tokens=self.embedder.max_tokens,
                chunk_tokens=chunking.chunk_tokens,
                overlap_tokens=chunking.overlap_tokens,
                title_tokens=chunking.title_tokens,
                special_tokens=self.embedder.special_tokens,
            )
        return chunker

    def register(self, server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(RetrievalServicer(self), server)

    async def start(self) -> None:
        """Load the embedder, then connect to Milvus and create/check the default collection.
        Raises (stopping the process) when the embedder cannot be loaded, the chunk settings do
        not fit the model, or the default collection holds another model's vectors or has an
        earlier schema. An unreachable Milvus is not fatal: health stays NOT_SERVING until it
        answers."""
        s = self.settings
        await self.embedder.load()
        default = s.default_chunking()
        self.chunker_for(default)  # raises ValueError for settings the model would truncate
        self._store = MilvusStore(
            s.milvus_uri,
            model_name=self.embedder.model_name,
            dimension=self.embedder.dimension,
            token=s.milvus_token,
            timeout_s=s.milvus_timeout_s,
            default_chunking=default,
        )
        try:
            chunking = await self._store.ensure_collection(s.default_collection, create=True)
            if chunking != default:
                log.warning("the default collection keeps the chunking it was created with",
                            extra={"fields": {"collection": s.default_collection, "recorded": str(chunking),
                                              "configured": str(default)}})
        except ServiceError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                raise RuntimeError(exc.message) from exc
            log.warning("Milvus not reachable at start", extra={"fields": {"reason": exc.message}})
        log.info(
            "retrieval ready to serve",
            extra={"fields": {"model": self.embedder.model_name, "dimension": self.embedder.dimension,
                              "milvus": "lite" if self._store.is_lite else "server",
                              "search_mode": s.default_search_mode, "fusion": s.fusion,
                              "reranker": self.reranker.name if self.reranker else None}},
        )

    async def ready(self) -> tuple[bool, str]:
        """Ready when the embedder is loaded, Milvus answers ``list_collections`` and the default
        collection exists with this model and is loaded (it is loaded here when it is not)."""
        if not self.embedder.loaded or self._store is None:
            return False, "embedding model not loaded"
        try:
            await self._store.ping()
            await self._store.ensure_collection(self.settings.default_collection, create=True)
            await self._store.ensure_loaded(self.settings.default_collection)
        except ServiceError as exc:
            return False, exc.message
        return True, "ok"

    async def stop(self) -> None:
        if self._store is not None:
            await self._store.close()
        if self.reranker is not None:
            await self.reranker.close()
        if self._owns_embedder:
            await self.embedder.close()


def create() -> Service:
    """The retrieval service configured from the environment."""
    return RetrievalService(RetrievalSettings())
