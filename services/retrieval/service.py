"""Retrieval service: ingests documents into Milvus and searches them by embedding similarity.

``RetrievalService.IngestDocuments`` (client streaming) validates every document as it arrives,
chunks it (:mod:`~agentmesh.services.retrieval.chunking`), skips it when the stored version is
identical, and embeds the rest in batches that span documents. Nothing is written until the
stream has ended cleanly, so a bad document anywhere in the stream (INVALID_ARGUMENT, naming its
index) or a cancelled stream writes nothing. Then each document is written by
:meth:`~agentmesh.services.retrieval.store.MilvusStore.write_document` (see its docstring for the
per-document semantics); when the response arrives, the chunks are searchable.

``RetrievalService.Search`` embeds the query and returns the caller's tenant's nearest chunks,
best first, with their cosine similarity as ``score``.

Everything is scoped to the caller's tenant (``x-tenant-id``). Health is SERVING only while the
embedding model is loaded and Milvus answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from pathlib import Path

import grpc
import numpy as np
from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.retrieval.chunking import Chunker
from agentmesh.services.retrieval.embedder import Embedder, SentenceTransformerEmbedder
from agentmesh.services.retrieval.store import (
    MAX_DOCUMENT_ID_BYTES,
    MAX_SOURCE_BYTES,
    MAX_TITLE_BYTES,
    MilvusStore,
    PreparedDocument,
    content_hash,
)
from agentmesh.services.runtime.errors import ServiceError, invalid_argument
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import ServiceSettings

log = logging.getLogger("agentmesh.retrieval")

#: Milvus collection names: a letter or underscore, then letters, digits, underscores; ≤ 255.
COLLECTION_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
MAX_QUERY_CHARS = 8192
DEFAULT_TOP_K = 5
#: Largest metadata map of one document, JSON-encoded, in bytes (Milvus JSON fields hold 64 KiB).
MAX_METADATA_BYTES = 16 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def default_milvus_uri() -> str:
    """``.agentmesh/data/milvus.db`` under ``$AGENTMESH_HOME``, else under the working directory."""
    home = Path(os.environ.get("AGENTMESH_HOME") or Path.cwd())
    return str(home / ".agentmesh" / "data" / "milvus.db")


class RetrievalSettings(ServiceSettings):
    """Settings of the retrieval service (env prefix ``AGENTMESH_RETRIEVAL_``)."""

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
    embedding_model_path: str = Field(
        "", description="Directory of a sentence-transformers model; empty = the packaged all-MiniLM-L6-v2."
    )
    chunk_tokens: int = Field(200, ge=16, description="Largest chunk, in embedding-model tokens.")
    chunk_overlap_tokens: int = Field(40, ge=0, description="Tokens a chunk repeats from the end of the previous one.")
    embed_batch_size: int = Field(32, ge=1, le=1024, description="Texts per embedding forward pass.")
    max_top_k: int = Field(100, ge=1, le=16384, description="Largest top_k Search accepts.")
    max_ingest_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Most document text (UTF-8 bytes) one IngestDocuments stream may carry; the stream is "
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
    def _overlap_below_chunk(self) -> RetrievalSettings:
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap_tokens ({self.chunk_overlap_tokens}) must be smaller than chunk_tokens ({self.chunk_tokens})"
            )
        return self


def validate_collection(name: str) -> None:
    """INVALID_ARGUMENT unless ``name`` is a valid Milvus collection name."""
    if not COLLECTION_PATTERN.match(name):
        raise invalid_argument(
            f"collection {name[:80]!r} is not a valid name: use a letter or '_' followed by up to 254 "
            "letters, digits or '_' (or leave it empty for the default collection)"
        )


def validate_document(index: int, doc: retrieval_pb2.Document) -> None:
    """INVALID_ARGUMENT naming ``documents[index]`` when ``doc`` cannot be stored."""
    where = f"documents[{index}]" + (f" (id {doc.id[:64]!r})" if doc.id else "")

    def fail(problem: str) -> ServiceError:
        return invalid_argument(f"{where}: {problem}; nothing from this stream was written")

    id_bytes = len(doc.id.encode())
    if not 1 <= id_bytes <= MAX_DOCUMENT_ID_BYTES:
        raise fail(f"id must be 1..{MAX_DOCUMENT_ID_BYTES} bytes of UTF-8, got {id_bytes}")
    if _CONTROL.search(doc.id):
        raise fail("id must not contain control characters")
    if not doc.text.strip():
        raise fail("text is empty; send the document's plain text")
    if (n := len(doc.title.encode())) > MAX_TITLE_BYTES:
        raise fail(f"title is {n} bytes; at most {MAX_TITLE_BYTES}")
    if (n := len(doc.source.encode())) > MAX_SOURCE_BYTES:
        raise fail(f"source is {n} bytes; at most {MAX_SOURCE_BYTES}")
    if (n := len(json.dumps(dict(doc.metadata), ensure_ascii=False).encode())) > MAX_METADATA_BYTES:
        raise fail(f"metadata is {n} bytes as JSON; at most {MAX_METADATA_BYTES}")


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """gRPC methods; every call is scoped to ``current_tenant()``."""

    def __init__(self, service: RetrievalService):
        self._service = service

    async def IngestDocuments(self, request_iterator, context) -> retrieval_pb2.IngestDocumentsResponse:
        """INVALID_ARGUMENT for a bad document or collection (naming the document's 0-based index;
        nothing written), RESOURCE_EXHAUSTED above ``max_ingest_bytes``, FAILED_PRECONDITION for a
        collection of another embedding model, UNAVAILABLE when Milvus fails."""
        svc = self._service
        settings = svc.settings
        store, chunker = svc.store, svc.chunker
        received = unchanged = 0
        collection: str | None = None
        collection_exists = False
        seen: dict[str, int] = {}
        total_bytes = 0
        pending: list[tuple[retrieval_pb2.Document, str, list]] = []
        pending_chunks = 0
        prepared: list[PreparedDocument] = []
        # Embed once this many chunks are waiting: several forward passes per call, across documents.
        group = settings.embed_batch_size * 8

        async def embed_pending() -> None:
            nonlocal pending, pending_chunks
            if not pending:
                return
            texts = [chunker.with_title(doc.title, c.text) for doc, _, chunks in pending for c in chunks]
            # One forward pass per call, shortest texts together (less padding); a Search's query
            # embedding queues behind at most one batch instead of a whole group.
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            vectors = np.empty((len(texts), svc.embedder.dimension), dtype=np.float32)
            for start in range(0, len(order), settings.embed_batch_size):
                batch = order[start : start + settings.embed_batch_size]
                vectors[batch] = await svc.embedder.embed([texts[i] for i in batch])
            row = 0
            for doc, digest, chunks in pending:
                prepared.append(PreparedDocument(doc, digest, chunks, vectors[row : row + len(chunks)]))
                row += len(chunks)
            pending, pending_chunks = [], 0

        async for request in request_iterator:
            index = received
            received += 1
            name = request.collection or settings.default_collection
            if collection is None:
                validate_collection(name)
                collection = name
                try:
                    await store.ensure_collection(name, create=False)
                    collection_exists = True
                except ServiceError as exc:
                    if exc.code != grpc.StatusCode.NOT_FOUND:
                        raise
            elif name != collection:
                raise invalid_argument(
                    f"documents[{index}]: collection {name[:80]!r} differs from {collection!r} named by the "
                    "first message; one stream writes one collection; nothing from this stream was written"
                )
            doc = request.document
            validate_document(index, doc)
            if doc.id in seen:
                raise invalid_argument(
                    f"documents[{index}] (id {doc.id[:64]!r}): the same id was already sent as documents[{seen[doc.id]}]; "
                    "send each document once per stream; nothing from this stream was written"
                )
            seen[doc.id] = index
            total_bytes += len(doc.text.encode())
            if total_bytes > settings.max_ingest_bytes:
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"documents[{index}]: the stream carries more than {settings.max_ingest_bytes} bytes of text; "
                    "split the documents over several streams; nothing from this stream was written",
                )
            chunks = await asyncio.to_thread(chunker.split, doc.text)
            if not chunks:
                raise invalid_argument(
                    f"documents[{index}] (id {doc.id[:64]!r}): text has no indexable tokens; nothing from this "
                    "stream was written"
                )
            digest = content_hash(doc)
            if collection_exists and await store.is_current(collection, doc.id, digest, len(chunks)):
                unchanged += 1
                continue
            pending.append((doc, digest, chunks))
            pending_chunks += len(chunks)
            if pending_chunks >= group:
                await embed_pending()
        await embed_pending()

        written = chunks_written = chunks_deleted = 0
        if prepared:
            assert collection is not None
            await store.ensure_collection(collection, create=True)
            for item in prepared:
                result = await store.write_document(collection, item)
                if result.written:
                    written += 1
                    chunks_written += result.chunks_written
                    chunks_deleted += result.chunks_deleted
                else:
                    unchanged += 1
        log.info(
            "ingested",
            extra={"fields": {"collection": collection, "received": received, "written": written,
                              "unchanged": unchanged, "chunks_written": chunks_written, "chunks_deleted": chunks_deleted}},
        )
        return retrieval_pb2.IngestDocumentsResponse(
            documents_received=received,
            documents_written=written,
            documents_unchanged=unchanged,
            chunks_written=chunks_written,
            chunks_deleted=chunks_deleted,
        )

    async def Search(self, request: retrieval_pb2.SearchRequest, context) -> retrieval_pb2.SearchResponse:
        """INVALID_ARGUMENT for an empty or over-long query, a top_k above ``max_top_k``, an
        unknown mode or a bad collection name; NOT_FOUND for a collection that does not exist;
        FAILED_PRECONDITION for a collection of another embedding model; UNAVAILABLE when Milvus
        fails. Queries longer than the model's 256 tokens are embedded from their beginning."""
        svc = self._service
        settings = svc.settings
        collection = request.collection or settings.default_collection
        validate_collection(collection)
        if not request.query.strip():
            raise invalid_argument("query is empty; send 1..8192 characters of text")
        if len(request.query) > MAX_QUERY_CHARS:
            raise invalid_argument(f"query is {len(request.query)} characters; at most {MAX_QUERY_CHARS}")
        top_k = request.top_k or DEFAULT_TOP_K
        if top_k > settings.max_top_k:
            raise invalid_argument(f"top_k {top_k} exceeds this service's maximum of {settings.max_top_k}")
        if request.mode not in (retrieval_pb2.SEARCH_MODE_UNSPECIFIED, retrieval_pb2.SEARCH_MODE_DENSE):
            raise invalid_argument(f"search mode {request.mode} is not supported; use SEARCH_MODE_DENSE")
        if math.isnan(request.min_score):
            raise invalid_argument("min_score is NaN; send a number in -1..1")
        await svc.store.ensure_collection(collection, create=False)
        vector = (await svc.embedder.embed([request.query]))[0]
        chunks = await svc.store.search(collection, vector, top_k, request.min_score)
        return retrieval_pb2.SearchResponse(chunks=chunks)


class RetrievalService(Service):
    """The retrieval service: the embedder, the chunker, the Milvus store and the servicer."""

    kind = "retrieval"
    settings: RetrievalSettings

    def __init__(self, settings: RetrievalSettings, embedder: Embedder | None = None):
        """``embedder``: an already created (possibly loaded) embedder to share, e.g. between
        services in one process; it is then not closed by :meth:`stop`."""
        super().__init__(settings)
        self._owns_embedder = embedder is None
        self.embedder: Embedder = embedder or SentenceTransformerEmbedder(
            settings.embedding_model_path or None, batch_size=settings.embed_batch_size
        )
        self._store: MilvusStore | None = None
        self._chunker: Chunker | None = None

    @property
    def store(self) -> MilvusStore:
        if self._store is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "retrieval service is still starting; retry shortly")
        return self._store

    @property
    def chunker(self) -> Chunker:
        if self._chunker is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "retrieval service is still starting; retry shortly")
        return self._chunker

    def register(self, server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(RetrievalServicer(self), server)

    async def start(self) -> None:
        """Load the embedding model, then connect to Milvus and create/check the default
        collection. Raises (stopping the process) when the model cannot be loaded, the chunk
        settings do not fit the model, or the default collection holds another model's vectors.
        An unreachable Milvus is not fatal: health stays NOT_SERVING until it answers."""
        s = self.settings
        await self.embedder.load()
        self._chunker = Chunker(
            self.embedder.tokenizer,
            model_max_tokens=self.embedder.max_tokens,
            chunk_tokens=s.chunk_tokens,
            overlap_tokens=s.chunk_overlap_tokens,
            special_tokens=self.embedder.special_tokens,
        )
        self._store = MilvusStore(
            s.milvus_uri,
            model_name=self.embedder.model_name,
            dimension=self.embedder.dimension,
            token=s.milvus_token,
            timeout_s=s.milvus_timeout_s,
        )
        try:
            await self._store.ensure_collection(s.default_collection, create=True)
        except ServiceError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                raise RuntimeError(exc.message) from exc
            log.warning("Milvus not reachable at start", extra={"fields": {"reason": exc.message}})
        log.info(
            "retrieval ready to serve",
            extra={"fields": {"model": self.embedder.model_name, "dimension": self.embedder.dimension,
                              "milvus": "lite" if self._store.is_lite else "server"}},
        )

    async def ready(self) -> tuple[bool, str]:
        """Ready when the model is loaded, Milvus answers ``list_collections`` and the default
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
        if self._owns_embedder:
            await self.embedder.close()


def create() -> Service:
    """The retrieval service configured from the environment."""
    return RetrievalService(RetrievalSettings())
