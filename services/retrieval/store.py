"""Chunk storage, dense and BM25 search in Milvus, through ``pymilvus.MilvusClient``.

The URI picks the deployment: a path ending in ``.db`` runs Milvus Lite inside this process (the
local default); ``http://host:19530`` (or ``https://``, ``tcp://``) talks to a Milvus server or
cluster.

One schema for every collection (schema version 2; fields and their limits):

==============  ==========================  ================================================
field           type                        holds
==============  ==========================  ================================================
chunk_id        VARCHAR(64), primary        ``<sha256(tenant, document id)[:32]>-<chunk index>``
tenant          VARCHAR(64), partition key  caller's tenant (``x-tenant-id``)
document_id     VARCHAR(256)                caller's document id
chunk_index     INT64                       position of the chunk in its document, from 0
chunk_count     INT64                       chunks of this version of the document
title           VARCHAR(1024)               document title
source          VARCHAR(2048)               document source (URL, path...)
section         VARCHAR(1024)               heading path or page range of the chunk
text            VARCHAR(65535)              chunk text (what is returned)
search_text     VARCHAR(65535), analyzed    what is indexed: title/section line + chunk text
start_char      INT64                       offset of the chunk in the document, code points
end_char        INT64                       one past its last character, code points
content_hash    VARCHAR(64)                 SHA-256 (hex) of the document as received
metadata        JSON                        the document's string metadata
embedding       FLOAT_VECTOR(dim)           L2-normalized embedding of ``search_text``, COSINE
sparse          SPARSE_FLOAT_VECTOR         BM25 terms of ``search_text``, computed by Milvus
==============  ==========================  ================================================

``sparse`` is the output of a Milvus BM25 function over ``search_text``: Milvus tokenizes the
text (``standard`` tokenizer, lowercased, Lucene's 33 English stop words removed), keeps the
term statistics and scores queries with BM25 (k1 = 1.2, b = 0.75, Robertson's classic values,
also Lucene's defaults). No stemming: Milvus Lite implements none, and the same collection must
rank the same on Lite and on a server. Corpus statistics (document frequencies, average length)
are Milvus', over the collection's segments, not per tenant: a tenant's BM25 scores can shift
with other tenants' data, but no row of another tenant is ever returned.

Collection properties record the embedder's model name and dimension
(``agentmesh.embedding_model``, ``agentmesh.embedding_dim``), the schema version
(``agentmesh.schema_version``) and the collection's chunking (``agentmesh.chunk_tokens``,
``agentmesh.overlap_tokens``, ``agentmesh.title_tokens``). A collection of another model is
refused with FAILED_PRECONDITION (its vectors would not be comparable). So is a collection
created by the first version of this service (no schema version, no BM25 field): Milvus cannot
add a function output field to an existing collection, and copying every row into a new one
behind the caller's back could double the storage unannounced, so the service refuses it and
says how to re-create it (DropCollection, or delete the Milvus Lite file, then ingest again).

Tenancy: every query, count, delete and search is built here with ``tenant == "<tenant>"`` from
:func:`~agentmesh.services.runtime.context.current_tenant` (the partition key, so Milvus only
scans that tenant's partition), with every value quoted by :func:`quote`; conditions from a
request are rendered by :mod:`~agentmesh.services.retrieval.filters` and only ever AND-ed to it.

Consistency: collections are created with, and every read asks for, ``Strong`` consistency, so
a read issued after a write returned sees that write (read-your-writes).

Threads: pymilvus calls block, so reads run in the default thread pool and all writes run in
one dedicated writer thread, which serializes them (two streams writing the same document never
interleave, and a drop never races a write of this process).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
from pymilvus import DataType, Function, FunctionType, MilvusClient
from pymilvus.client.types import LoadState
from pymilvus.exceptions import MilvusException

from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.services.retrieval.chunking import TextChunk
from agentmesh.services.runtime.context import current_tenant
from agentmesh.services.runtime.errors import ServiceError
from agentmesh.services.runtime.milvus_expr import quote

__all__ = ["MilvusStore", "ChunkingSettings", "PreparedDocument", "WriteResult", "Hit", "quote", "chunk_id",
           "content_hash"]

log = logging.getLogger("agentmesh.retrieval")

T = TypeVar("T")

MODEL_PROPERTY = "agentmesh.embedding_model"
DIM_PROPERTY = "agentmesh.embedding_dim"
SCHEMA_PROPERTY = "agentmesh.schema_version"
SCHEMA_VERSION = "2"
_CHUNK_PROPERTIES = ("agentmesh.chunk_tokens", "agentmesh.overlap_tokens", "agentmesh.title_tokens")

#: Field limits, in the units Milvus counts VARCHAR ``max_length`` in (bytes of UTF-8).
MAX_DOCUMENT_ID_BYTES = 256
MAX_TITLE_BYTES = 1024
MAX_SOURCE_BYTES = 2048
MAX_SECTION_BYTES = 1024
MAX_TEXT_BYTES = 65535
#: Largest result window of one Milvus query (offset + limit), a server limit.
_QUERY_WINDOW = 16384
#: Rows per upsert request: keeps each request far below gRPC message limits (~5 kB per row).
_UPSERT_BATCH = 256
_OUTPUT_FIELDS = ["chunk_id", "document_id", "chunk_index", "title", "source", "section", "text", "start_char",
                  "end_char", "metadata"]
_STRONG = "Strong"
#: Milvus error codes: a search/query on a collection that is not loaded (ErrCollectionNotLoaded),
#: and on one that does not exist (ErrCollectionNotFound).
_NOT_LOADED = 101
_NOT_FOUND = 100

#: Lucene's English stop words (``EnglishAnalyzer.ENGLISH_STOP_WORDS_SET``). Besides ranking,
#: they keep BM25 fast: Milvus Lite scores a query term by walking its whole posting list.
ENGLISH_STOP_WORDS = (
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not",
    "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was",
    "will", "with",
)
ANALYZER_PARAMS = {"tokenizer": "standard", "filter": ["lowercase", {"type": "stop", "stop_words": list(ENGLISH_STOP_WORDS)}]}
BM25_K1, BM25_B = 1.2, 0.75


@dataclass(frozen=True, slots=True)
class ChunkingSettings:
    """How a collection's documents are chunked, in embedding-model tokens (see
    :class:`~agentmesh.services.retrieval.chunking.Chunker`)."""

    chunk_tokens: int
    overlap_tokens: int
    title_tokens: int

    def properties(self) -> dict[str, str]:
        values = (self.chunk_tokens, self.overlap_tokens, self.title_tokens)
        return {k: str(v) for k, v in zip(_CHUNK_PROPERTIES, values, strict=True)}

    @classmethod
    def from_properties(cls, props: dict[str, Any]) -> ChunkingSettings | None:
        try:
            return cls(*(int(props[k]) for k in _CHUNK_PROPERTIES))
        except (KeyError, ValueError, TypeError):
            return None


def chunk_id(tenant: str, document_id: str, index: int) -> str:
    """Stable id of chunk ``index`` of ``document_id`` for ``tenant``: re-ingesting a document
    overwrites its chunks in place, and equal document ids of two tenants never collide."""
    digest = hashlib.sha256(f"{tenant}\x00{document_id}".encode()).hexdigest()[:32]
    return f"{digest}-{index}"


def content_hash(document: retrieval_pb2.Document) -> str:
    """SHA-256 (hex) over everything received for a document: id, title, source, format, text,
    raw content and the metadata sorted by key. Any change to one of them makes it "changed"."""
    payload = json.dumps(
        [document.id, document.title, document.source, int(document.format), document.text,
         hashlib.sha256(document.content).hexdigest(), sorted(document.metadata.items())],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(slots=True)
class PreparedDocument:
    """A document chunked and embedded, ready to write. ``title`` is the title stored with its
    chunks (the document's, else the one found in it); ``sections[i]``, ``search_texts[i]`` and
    row ``i`` of ``embeddings`` (shape ``(len(chunks), dim)``) belong to ``chunks[i]``."""

    document: retrieval_pb2.Document
    title: str
    content_hash: str
    chunks: list[TextChunk]
    sections: list[str]
    search_texts: list[str]
    embeddings: np.ndarray


@dataclass(slots=True)
class WriteResult:
    """Outcome of :meth:`MilvusStore.write_document`: ``written`` is False when the stored version
    was already current; ``chunks_deleted`` counts stale chunks of the previous version."""

    written: bool
    chunks_written: int = 0
    chunks_deleted: int = 0


@dataclass(slots=True)
class Hit:
    """One search result: ``score`` is the cosine similarity (dense) or the BM25 score (sparse,
    always >= 0); ``fields`` holds the stored fields (and ``embedding`` when asked for)."""

    chunk_id: str
    score: float
    fields: dict[str, Any]


def _redact(uri: str) -> str:
    """The URI without credentials, for messages and logs."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


class MilvusStore:
    """Tenant-scoped chunk store on one Milvus deployment; see the module docstring.

    ``uri``: Milvus Lite file (``*.db``; its folder is created) or server URL. ``token``: Milvus
    credentials (``user:password`` or an API key) for servers. ``timeout_s``: per-call timeout in
    seconds. ``default_chunking``: settings of collections created without explicit ones.
    Errors from Milvus become UNAVAILABLE (NOT_FOUND for a collection dropped meanwhile); see
    each method for the others.
    """

    def __init__(self, uri: str, *, model_name: str, dimension: int, token: str = "", timeout_s: float = 10.0,
                 default_chunking: ChunkingSettings = ChunkingSettings(200, 40, 32)):
        self.uri = uri
        self.model_name = model_name
        self.dimension = dimension
        self.timeout_s = timeout_s
        self.default_chunking = default_chunking
        self._token = token
        self._client: MilvusClient | None = None
        self._connect_lock = threading.Lock()
        self._verified: dict[str, ChunkingSettings] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milvus-writer")

    @property
    def is_lite(self) -> bool:
        return self.uri.endswith(".db")

    # -- plumbing -------------------------------------------------------------------------------

    def _connect_blocking(self) -> MilvusClient:
        """The client, created on first use (this starts Milvus Lite for a ``.db`` URI; for a
        server, pymilvus connects lazily and reconnects after an outage)."""
        with self._connect_lock:
            if self._client is None:
                if self.is_lite:
                    Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
                self._client = MilvusClient(uri=self.uri, token=self._token, timeout=self.timeout_s)
            return self._client

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(client, *args)`` translating Milvus failures into UNAVAILABLE. When
        ``args[0]`` names a collection that is not loaded (a restarted server, an operator's
        ``release``), load it and try once more; when it names one that no longer exists
        (dropped meanwhile), NOT_FOUND."""
        name = args[0] if args and isinstance(args[0], str) else None
        try:
            client = self._connect_blocking()
            try:
                return fn(client, *args)
            except MilvusException as exc:
                if exc.code != _NOT_LOADED or name is None:
                    raise
                log.warning("collection was not loaded; loading it", extra={"fields": {"collection": name}})
                client.load_collection(name, timeout=self.timeout_s)
                return fn(client, *args)
        except ServiceError:
            raise
        except MilvusException as exc:
            if exc.code == _NOT_FOUND and name is not None:
                self._verified.pop(name, None)
                raise ServiceError(grpc.StatusCode.NOT_FOUND, f"collection {name!r} does not exist") from exc
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, f"Milvus at {_redact(self.uri)} failed: {exc.message}"
            ) from exc
        except (grpc.RpcError, ConnectionError, OSError) as exc:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"Milvus at {_redact(self.uri)} is unreachable: {exc}") from exc

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self._guard, fn, *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        # Runs to completion in the writer thread even if the awaiting RPC is cancelled, so a
        # document is never left half-written by a client going away.
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._guard, fn, *args)

    # -- lifecycle ------------------------------------------------------------------------------

    async def ping(self) -> None:
        """One cheap round trip (``list_collections``); raises UNAVAILABLE when Milvus does not answer."""
        await self._read(lambda c: c.list_collections(timeout=min(self.timeout_s, 2.0)))

    async def ensure_loaded(self, collection: str) -> None:
        """Load ``collection`` into memory unless it already is (a restarted Milvus server may
        come back with collections released). Raises UNAVAILABLE when Milvus fails."""

        def run(client: MilvusClient, name: str) -> None:
            state = client.get_load_state(name, timeout=min(self.timeout_s, 2.0)).get("state")
            if state != LoadState.Loaded:
                log.warning("collection not loaded; loading it", extra={"fields": {"collection": name, "state": str(state)}})
                client.load_collection(name, timeout=self.timeout_s)

        await self._read(run, collection)

    async def close(self) -> None:
        await asyncio.to_thread(self._writer.shutdown, True)
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
            self._client = None

    # -- collections ----------------------------------------------------------------------------

    def _schema(self):
        schema = MilvusClient.create_schema(
            auto_id=False,
            enable_dynamic_field=False,
            description=f"AgentMesh chunks embedded with {self.model_name} ({self.dimension}-d), BM25-indexed",
        )
        schema.add_field("chunk_id", DataType.VARCHAR, max_length=64, is_primary=True)
        schema.add_field("tenant", DataType.VARCHAR, max_length=64, is_partition_key=True)
        schema.add_field("document_id", DataType.VARCHAR, max_length=MAX_DOCUMENT_ID_BYTES)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("chunk_count", DataType.INT64)
        schema.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE_BYTES)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_BYTES)
        schema.add_field("section", DataType.VARCHAR, max_length=MAX_SECTION_BYTES)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        schema.add_field("search_text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True,
                         analyzer_params=ANALYZER_PARAMS)
        schema.add_field("start_char", DataType.INT64)
        schema.add_field("end_char", DataType.INT64)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dimension)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(name="search_text_bm25", function_type=FunctionType.BM25,
                                     input_field_names=["search_text"], output_field_names=["sparse"]))
        return schema

    def _create_blocking(self, client: MilvusClient, name: str, chunking: ChunkingSettings) -> bool:
        if client.has_collection(name, timeout=self.timeout_s):
            return False
        index = MilvusClient.prepare_index_params()
        index.add_index("embedding", index_type="AUTOINDEX", metric_type="COSINE")
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                        params={"bm25_k1": BM25_K1, "bm25_b": BM25_B})
        client.create_collection(
            name,
            schema=self._schema(),
            consistency_level=_STRONG,
            properties={MODEL_PROPERTY: self.model_name, DIM_PROPERTY: str(self.dimension),
                        SCHEMA_PROPERTY: SCHEMA_VERSION, **chunking.properties()},
            timeout=self.timeout_s,
        )
        # sync=False: the collection is empty, so there is nothing to wait for, and the waiting
        # path calls AllocTimestamp, which Milvus Lite does not implement (it logs a traceback).
        # _verify_blocking loads the collection right after.
        client.create_index(name, index, timeout=self.timeout_s, sync=False)
        log.info("created collection", extra={"fields": {"collection": name, "model": self.model_name,
                                                         "chunking": chunking.properties()}})
        return True

    def _properties_blocking(self, client: MilvusClient, name: str) -> dict[str, Any]:
        if not client.has_collection(name, timeout=self.timeout_s):
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"collection {name!r} does not exist; ingest documents into it or create it first",
            )
        props = client.describe_collection(name, timeout=self.timeout_s).get("properties") or {}
        if props.get(MODEL_PROPERTY) is None or props.get(DIM_PROPERTY) is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"collection {name!r} was not created by the AgentMesh retrieval service (it records no "
                "embedding model); use another collection name",
            )
        return props

    def _verify_blocking(self, client: MilvusClient, name: str) -> ChunkingSettings:
        props = self._properties_blocking(client, name)
        model, dim = props[MODEL_PROPERTY], props[DIM_PROPERTY]
        if model != self.model_name or str(dim) != str(self.dimension):
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"collection {name!r} holds embeddings of {model} ({dim}-d) but this service embeds with "
                f"{self.model_name} ({self.dimension}-d); vectors of different models are not comparable. "
                "Re-ingest into a new collection or run the service with the collection's model",
            )
        chunking = ChunkingSettings.from_properties(props)
        if props.get(SCHEMA_PROPERTY) != SCHEMA_VERSION or chunking is None:
            where = f"delete the Milvus Lite data at {self.uri}" if self.is_lite else "drop it with pymilvus"
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"collection {name!r} was created by an earlier version of the retrieval service (schema "
                f"{props.get(SCHEMA_PROPERTY, '1')}, without the BM25 field that sparse and hybrid search need) "
                "and cannot be migrated in place. Re-create it: call DropCollection on it as each tenant that "
                f"has documents in it (it is removed once empty), or {where}; then ingest the documents again",
            )
        client.load_collection(name, timeout=self.timeout_s)  # a no-op when loaded; servers need it
        return chunking

    async def ensure_collection(self, name: str, *, create: bool, chunking: ChunkingSettings | None = None
                                ) -> ChunkingSettings:
        """The chunking settings of ``name``, after checking that it exists, records this
        embedder's model and has the current schema; with ``create``, create it first when
        missing (with ``chunking``, else the default). Raises NOT_FOUND (missing, not
        ``create``), FAILED_PRECONDITION (another model, an earlier schema, or not ours),
        UNAVAILABLE. The result is cached per collection."""
        cached = self._verified.get(name)
        if cached is not None:
            return cached
        if create:
            await self._write(self._create_blocking, name, chunking or self.default_chunking)
        settings = await self._read(self._verify_blocking, name)
        self._verified[name] = settings
        return settings

    async def create_collection(self, name: str, chunking: ChunkingSettings) -> tuple[ChunkingSettings, bool]:
        """Create ``name`` with ``chunking``: ``(settings, True)``; when it already exists with
        the same settings ``(settings, False)``. ALREADY_EXISTS when it exists with other
        settings; FAILED_PRECONDITION / UNAVAILABLE as :meth:`ensure_collection`."""
        created = await self._write(self._create_blocking, name, chunking)
        self._verified.pop(name, None)
        settings = await self.ensure_collection(name, create=False)
        if settings != chunking:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"collection {name!r} already exists with chunk_tokens={settings.chunk_tokens}, "
                f"overlap_tokens={settings.overlap_tokens}, title_tokens={settings.title_tokens}; a collection's "
                "chunking cannot change (its chunks would be cut two ways): use another name, or drop it first",
            )
        return settings, created

    # -- reads ----------------------------------------------------------------------------------

    @staticmethod
    def _tenant_filter(tenant: str, extra: str = "") -> str:
        base = f"tenant == {quote(tenant)}"
        return f"{base} and ({extra})" if extra else base

    def _doc_filter(self, tenant: str, document_id: str) -> str:
        return f"tenant == {quote(tenant)} and document_id == {quote(document_id)}"

    def _count_blocking(self, client: MilvusClient, collection: str, expr: str) -> int:
        rows = client.query(collection, filter=expr, output_fields=["count(*)"], timeout=self.timeout_s,
                            consistency_level=_STRONG)
        return int(rows[0]["count(*)"]) if rows else 0

    def _is_current_blocking(self, client: MilvusClient, collection: str, tenant: str, doc_id: str, digest: str) -> bool:
        """True when exactly this version is stored: chunk 0 carries ``digest`` and the version's
        chunk count n, and the document has n chunks, all with ``digest`` and indices below n.
        A write interrupted half-way leaves mixed hashes, missing or extra chunks, so it reads
        as changed and the next ingestion repairs it."""
        base = self._doc_filter(tenant, doc_id)
        head = client.query(collection, filter=f"{base} and chunk_index == 0", output_fields=["content_hash", "chunk_count"],
                            limit=1, timeout=self.timeout_s, consistency_level=_STRONG)
        if not head or head[0]["content_hash"] != digest:
            return False
        n = int(head[0]["chunk_count"])
        if self._count_blocking(client, collection, base) != n:
            return False
        current = f"{base} and content_hash == {quote(digest)} and chunk_index < {n}"
        return self._count_blocking(client, collection, current) == n

    async def is_current(self, collection: str, document_id: str, digest: str) -> bool:
        """Whether the caller's tenant already stores exactly the version of the document whose
        :func:`content_hash` is ``digest``."""
        return await self._read(self._is_current_blocking, collection, current_tenant(), document_id, digest)

    async def count(self, collection: str, document_id: str | None = None) -> int:
        """Chunks stored for the caller's tenant (of one document when ``document_id`` is given)."""
        tenant = current_tenant()
        expr = self._doc_filter(tenant, document_id) if document_id is not None else self._tenant_filter(tenant)
        return await self._read(self._count_blocking, collection, expr)

    async def counts(self, collection: str) -> tuple[int, int]:
        """``(chunks, documents)`` of the caller's tenant in ``collection``."""
        tenant = current_tenant()

        def run(client: MilvusClient, collection: str) -> tuple[int, int]:
            return (self._count_blocking(client, collection, self._tenant_filter(tenant)),
                    self._count_blocking(client, collection, self._tenant_filter(tenant, "chunk_index == 0")))

        return await self._read(run, collection)

    async def document_chunks(self, collection: str, document_id: str) -> list[dict[str, Any]]:
        """Stored rows of one document of the caller's tenant, by chunk index (without vectors)."""
        tenant = current_tenant()

        def run(client: MilvusClient, collection: str) -> list[dict[str, Any]]:
            rows = client.query(
                collection,
                filter=self._doc_filter(tenant, document_id),
                output_fields=[*_OUTPUT_FIELDS, "chunk_count", "content_hash", "search_text"],
                limit=_QUERY_WINDOW,
                timeout=self.timeout_s,
                consistency_level=_STRONG,
            )
            return sorted((dict(r) for r in rows), key=lambda r: r["chunk_index"])

        return await self._read(run, collection)

    def _search_blocking(self, client: MilvusClient, collection: str, data: Any, field: str, metric: str,
                         limit: int, expr: str, with_vectors: bool) -> list[Hit]:
        hits = client.search(
            collection,
            data=[data],
            anns_field=field,
            filter=expr,
            limit=limit,
            output_fields=_OUTPUT_FIELDS + (["embedding"] if with_vectors else []),
            search_params={"metric_type": metric},
            timeout=self.timeout_s,
            consistency_level=_STRONG,
        )[0]
        out = []
        for hit in hits:
            distance = float(hit["distance"])
            # BM25: Milvus servers report the score, Milvus Lite its negation ("smaller is closer").
            score = abs(distance) if metric == "BM25" else distance
            fields = dict(hit["entity"])
            out.append(Hit(str(fields["chunk_id"]), score, fields))
        out.sort(key=lambda h: h.score, reverse=True)
        return out

    async def search_dense(self, collection: str, vector: np.ndarray, limit: int, conditions: str = "",
                           with_vectors: bool = False) -> list[Hit]:
        """The caller's tenant's ``limit`` chunks nearest ``vector`` (shape ``(dim,)``), best first,
        scored by cosine similarity, among those meeting ``conditions`` (an expression from
        :func:`~agentmesh.services.retrieval.filters.render`)."""
        expr = self._tenant_filter(current_tenant(), conditions)
        return await self._read(self._search_blocking, collection, vector.tolist(), "embedding", "COSINE", limit,
                                expr, with_vectors)

    async def search_sparse(self, collection: str, query: str, limit: int, conditions: str = "",
                            with_vectors: bool = False) -> list[Hit]:
        """The caller's tenant's ``limit`` chunks with the highest BM25 score for ``query``, best
        first, among those meeting ``conditions``. Chunks sharing no term with the query are not
        returned (their score is 0)."""
        expr = self._tenant_filter(current_tenant(), conditions)
        return await self._read(self._search_blocking, collection, query, "sparse", "BM25", limit, expr, with_vectors)

    # -- writes ---------------------------------------------------------------------------------

    def _write_blocking(self, client: MilvusClient, collection: str, tenant: str, prepared: PreparedDocument) -> WriteResult:
        doc = prepared.document
        n = len(prepared.chunks)
        if self._is_current_blocking(client, collection, tenant, doc.id, prepared.content_hash):
            return WriteResult(written=False)  # another stream wrote this version meanwhile
        base = self._doc_filter(tenant, doc.id)
        stale = self._count_blocking(client, collection, f"{base} and chunk_index >= {n}")
        metadata = dict(doc.metadata)
        rows = [
            {
                "chunk_id": chunk_id(tenant, doc.id, c.index),
                "tenant": tenant,
                "document_id": doc.id,
                "chunk_index": c.index,
                "chunk_count": n,
                "title": prepared.title,
                "source": doc.source,
                "section": prepared.sections[i],
                "text": c.text,
                "search_text": prepared.search_texts[i],
                "start_char": c.start,
                "end_char": c.end,
                "content_hash": prepared.content_hash,
                "metadata": metadata,
                "embedding": prepared.embeddings[i],
            }
            for i, c in enumerate(prepared.chunks)
        ]
        # Chunk 0 last: it carries the version's chunk count that is_current trusts, so it is
        # only rewritten once every other chunk of the new version is in place.
        order = rows[1:] + rows[:1]
        for start in range(0, len(order), _UPSERT_BATCH):
            client.upsert(collection, order[start : start + _UPSERT_BATCH], timeout=self.timeout_s)
        if stale:
            client.delete(collection, filter=f"{base} and chunk_index >= {n}", timeout=self.timeout_s)
        return WriteResult(written=True, chunks_written=n, chunks_deleted=stale)

    async def write_document(self, collection: str, prepared: PreparedDocument) -> WriteResult:
        """Make ``prepared`` the stored version of its document for the caller's tenant.

        Semantics (Milvus has no multi-row transactions, so this is what "atomic per document"
        means here):
        - writes are serialized (one writer thread), so two writers never interleave on a document;
        - if exactly this version is already stored, nothing is written (``written=False``);
        - otherwise chunks ``1..n-1`` then chunk 0 are upserted under their stable ids (replacing
          the old version's chunks with the same index), then the old version's chunks ``n..``
          are deleted, so no orphan remains; a reader may see the new chunks next to the old tail
          for the duration of that one delete call;
        - once this returns, Strong-consistency reads see the new version;
        - if Milvus fails half-way the call raises UNAVAILABLE and the document is left with mixed
          versions, which :meth:`is_current` reports as changed: ingesting the document again
          repairs it.
        """
        n = len(prepared.chunks)
        if prepared.embeddings.shape != (n, self.dimension) or not len(prepared.sections) == len(prepared.search_texts) == n:
            raise ValueError(
                f"expected {n} sections, search texts and embeddings of shape ({n}, {self.dimension}), got "
                f"{len(prepared.sections)}, {len(prepared.search_texts)} and {prepared.embeddings.shape}"
            )
        return await self._write(self._write_blocking, collection, current_tenant(), prepared)

    def _delete_blocking(self, client: MilvusClient, collection: str, expr: str) -> tuple[int, int]:
        documents = self._count_blocking(client, collection, f"{expr} and chunk_index == 0")
        chunks = self._count_blocking(client, collection, expr)
        if chunks:
            client.delete(collection, filter=expr, timeout=self.timeout_s)
        return documents, chunks

    async def delete_documents(self, collection: str, document_ids: Sequence[str], conditions: str) -> tuple[int, int]:
        """Delete the caller's tenant's documents whose id is in ``document_ids`` (when not
        empty) and that meet ``conditions`` (when not empty); at least one must be given.
        Returns ``(documents, chunks)`` deleted."""
        parts = []
        if document_ids:
            parts.append(f"document_id in [{', '.join(quote(i) for i in dict.fromkeys(document_ids))}]")
        if conditions:
            parts.append(f"({conditions})")
        if not parts:
            raise ValueError("delete_documents needs document ids or conditions")
        expr = self._tenant_filter(current_tenant(), " and ".join(parts))
        return await self._write(self._delete_blocking, collection, expr)

    async def drop_collection(self, collection: str) -> tuple[int, int, bool]:
        """Delete every chunk of the caller's tenant in ``collection``, then remove the
        collection itself when no tenant has a chunk left in it. Works on collections of another
        model or an earlier schema (that is how they are re-created). Returns ``(documents,
        chunks, removed)``. NOT_FOUND when it does not exist; FAILED_PRECONDITION when it was
        not created by this service."""
        tenant = current_tenant()

        def run(client: MilvusClient, name: str) -> tuple[int, int, bool]:
            self._properties_blocking(client, name)
            client.load_collection(name, timeout=self.timeout_s)
            documents, chunks = self._delete_blocking(client, name, self._tenant_filter(tenant))
            # Every row has chunk_index >= 0: this counts all tenants' chunks.
            if self._count_blocking(client, name, "chunk_index >= 0") > 0:
                return documents, chunks, False
            client.drop_collection(name, timeout=self.timeout_s)
            self._verified.pop(name, None)
            log.info("dropped collection", extra={"fields": {"collection": name}})
            return documents, chunks, True

        return await self._write(run, collection)
