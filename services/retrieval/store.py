"""Chunk storage and dense search in Milvus, through ``pymilvus.MilvusClient``.

The URI picks the deployment: a path ending in ``.db`` runs Milvus Lite inside this process (the
local default); ``http://host:19530`` (or ``https://``, ``tcp://``) talks to a Milvus server or
cluster.

One schema for every collection (fields and their limits):

==============  =======================  ===================================================
field           type                     holds
==============  =======================  ===================================================
chunk_id        VARCHAR(64), primary     ``<sha256(tenant, document id)[:32]>-<chunk index>``
tenant          VARCHAR(64), partition   caller's tenant (``x-tenant-id``), partition key
document_id     VARCHAR(256)             caller's document id
chunk_index     INT64                    position of the chunk in its document, from 0
title           VARCHAR(1024)            document title
source          VARCHAR(2048)            document source (URL, path...)
text            VARCHAR(65535)           chunk text
start_char      INT64                    offset of the chunk in the document, code points
end_char        INT64                    one past its last character, code points
content_hash    VARCHAR(64)              SHA-256 (hex) of the whole document (see below)
metadata        JSON                     the document's string metadata
embedding       FLOAT_VECTOR(dim)        L2-normalized embedding, COSINE index (AUTOINDEX)
==============  =======================  ===================================================

The embedder's model name and dimension are recorded as collection properties
(``agentmesh.embedding_model``, ``agentmesh.embedding_dim``); using a collection with another
model is refused with FAILED_PRECONDITION, since its vectors would not be comparable.

Tenancy: every query, count, delete and search is built here with ``tenant == "<tenant>"`` from
:func:`~agentmesh.services.runtime.context.current_tenant` (the partition key, so Milvus only
scans that tenant's partition), with every value quoted by :func:`quote`; no caller string ever
reaches a filter expression unescaped.

Consistency: collections are created with, and every read asks for, ``Strong`` consistency, so
a read issued after a write returned sees that write (read-your-writes).

Threads: pymilvus calls block, so reads run in the default thread pool and all writes run in
one dedicated writer thread, which serializes them (two streams writing the same document never
interleave).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.client.types import LoadState
from pymilvus.exceptions import MilvusException

from agentmesh.common.v1 import common_pb2
from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.services.retrieval.chunking import TextChunk
from agentmesh.services.runtime.context import current_tenant
from agentmesh.services.runtime.errors import ServiceError

log = logging.getLogger("agentmesh.retrieval")

T = TypeVar("T")

MODEL_PROPERTY = "agentmesh.embedding_model"
DIM_PROPERTY = "agentmesh.embedding_dim"

#: Field limits, in the units Milvus counts VARCHAR ``max_length`` in (bytes of UTF-8).
MAX_DOCUMENT_ID_BYTES = 256
MAX_TITLE_BYTES = 1024
MAX_SOURCE_BYTES = 2048
MAX_TEXT_BYTES = 65535
#: Largest result window of one Milvus query (offset + limit), a server limit.
_QUERY_WINDOW = 16384
#: Rows per upsert request: keeps each request far below gRPC message limits (~3 kB per row).
_UPSERT_BATCH = 256
_OUTPUT_FIELDS = ["chunk_id", "document_id", "title", "source", "text", "start_char", "end_char"]
_STRONG = "Strong"
#: Milvus error code of a search/query on a collection that is not loaded (ErrCollectionNotLoaded).
_NOT_LOADED = 101


def quote(value: str) -> str:
    """``value`` as a double-quoted Milvus filter string literal.

    Escapes backslash, double quote, and ``\\n``/``\\r``/``\\t`` (the escapes both Milvus' and
    Milvus Lite's expression parsers accept). Raises ``ValueError`` for other control characters,
    which no literal can carry; callers validate ids before they get here.
    """
    out = []
    for ch in value:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise ValueError(f"control character {ch!r} cannot appear in a filter value")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def chunk_id(tenant: str, document_id: str, index: int) -> str:
    """Stable id of chunk ``index`` of ``document_id`` for ``tenant``: re-ingesting a document
    overwrites its chunks in place, and equal document ids of two tenants never collide."""
    digest = hashlib.sha256(f"{tenant}\x00{document_id}".encode()).hexdigest()[:32]
    return f"{digest}-{index}"


def content_hash(document: retrieval_pb2.Document) -> str:
    """SHA-256 (hex) over everything stored from a document: id, title, source, text and the
    metadata sorted by key. Any change to one of them makes the document "changed"."""
    payload = json.dumps(
        [document.id, document.title, document.source, document.text, sorted(document.metadata.items())],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(slots=True)
class PreparedDocument:
    """A document chunked and embedded, ready to write: ``embeddings`` has shape
    ``(len(chunks), dim)``, row ``i`` embedding ``chunks[i]``."""

    document: retrieval_pb2.Document
    content_hash: str
    chunks: list[TextChunk]
    embeddings: np.ndarray


@dataclass(slots=True)
class WriteResult:
    """Outcome of :meth:`MilvusStore.write_document`: ``written`` is False when the stored version
    was already current; ``chunks_deleted`` counts stale chunks of the previous version."""

    written: bool
    chunks_written: int = 0
    chunks_deleted: int = 0


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
    seconds. Errors from Milvus become UNAVAILABLE; see each method for the others.
    """

    def __init__(self, uri: str, *, model_name: str, dimension: int, token: str = "", timeout_s: float = 10.0):
        self.uri = uri
        self.model_name = model_name
        self.dimension = dimension
        self.timeout_s = timeout_s
        self._token = token
        self._client: MilvusClient | None = None
        self._connect_lock = threading.Lock()
        self._verified: set[str] = set()
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
        ``release``), load it and try once more."""
        try:
            client = self._connect_blocking()
            try:
                return fn(client, *args)
            except MilvusException as exc:
                if exc.code != _NOT_LOADED or not args or not isinstance(args[0], str):
                    raise
                log.warning("collection was not loaded; loading it", extra={"fields": {"collection": args[0]}})
                client.load_collection(args[0], timeout=self.timeout_s)
                return fn(client, *args)
        except ServiceError:
            raise
        except MilvusException as exc:
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
            description=f"AgentMesh chunks embedded with {self.model_name} ({self.dimension}-d)",
        )
        schema.add_field("chunk_id", DataType.VARCHAR, max_length=64, is_primary=True)
        schema.add_field("tenant", DataType.VARCHAR, max_length=64, is_partition_key=True)
        schema.add_field("document_id", DataType.VARCHAR, max_length=MAX_DOCUMENT_ID_BYTES)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE_BYTES)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_BYTES)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        schema.add_field("start_char", DataType.INT64)
        schema.add_field("end_char", DataType.INT64)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dimension)
        return schema

    def _create_blocking(self, client: MilvusClient, name: str) -> None:
        if client.has_collection(name, timeout=self.timeout_s):
            return
        client.create_collection(
            name,
            schema=self._schema(),
            consistency_level=_STRONG,
            properties={MODEL_PROPERTY: self.model_name, DIM_PROPERTY: str(self.dimension)},
            timeout=self.timeout_s,
        )
        index = client.prepare_index_params()
        index.add_index("embedding", index_type="AUTOINDEX", metric_type="COSINE")
        # sync=False: the collection is empty, so there is nothing to wait for, and the waiting
        # path calls AllocTimestamp, which Milvus Lite does not implement (it logs a traceback).
        # _verify_blocking loads the collection right after.
        client.create_index(name, index, timeout=self.timeout_s, sync=False)
        log.info("created collection", extra={"fields": {"collection": name, "model": self.model_name}})

    def _verify_blocking(self, client: MilvusClient, name: str) -> None:
        if not client.has_collection(name, timeout=self.timeout_s):
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"collection {name!r} does not exist; ingest documents into it first",
            )
        props = client.describe_collection(name, timeout=self.timeout_s).get("properties") or {}
        model, dim = props.get(MODEL_PROPERTY), props.get(DIM_PROPERTY)
        if model is None or dim is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"collection {name!r} was not created by the AgentMesh retrieval service (it records no "
                "embedding model); use another collection name",
            )
        if model != self.model_name or str(dim) != str(self.dimension):
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"collection {name!r} holds embeddings of {model} ({dim}-d) but this service embeds with "
                f"{self.model_name} ({self.dimension}-d); vectors of different models are not comparable. "
                "Re-ingest into a new collection or run the service with the collection's model",
            )
        client.load_collection(name, timeout=self.timeout_s)  # a no-op when loaded; servers need it

    async def ensure_collection(self, name: str, *, create: bool) -> None:
        """Check ``name`` exists and records this embedder's model; with ``create``, create it
        first when missing. Raises NOT_FOUND (missing, not ``create``), FAILED_PRECONDITION
        (another model, or not ours), UNAVAILABLE. The result is cached per collection."""
        if name in self._verified:
            return
        if create:
            await self._write(self._create_blocking, name)
        await self._read(self._verify_blocking, name)
        self._verified.add(name)

    # -- reads ----------------------------------------------------------------------------------

    def _doc_filter(self, tenant: str, document_id: str) -> str:
        return f"tenant == {quote(tenant)} and document_id == {quote(document_id)}"

    @staticmethod
    def _count_blocking(client: MilvusClient, collection: str, expr: str, timeout: float) -> int:
        rows = client.query(collection, filter=expr, output_fields=["count(*)"], timeout=timeout,
                            consistency_level=_STRONG)
        return int(rows[0]["count(*)"]) if rows else 0

    def _is_current_blocking(self, client: MilvusClient, collection: str, tenant: str, doc_id: str,
                             digest: str, n_chunks: int) -> bool:
        """True when exactly chunks ``0..n_chunks-1`` of this version are stored, nothing else.
        A write interrupted half-way leaves mixed hashes or extra chunks, so it reads as changed
        and the next ingestion repairs it."""
        base = self._doc_filter(tenant, doc_id)
        total = self._count_blocking(client, collection, base, self.timeout_s)
        if total != n_chunks:
            return False
        current = self._count_blocking(
            client, collection, f"{base} and content_hash == {quote(digest)} and chunk_index < {int(n_chunks)}",
            self.timeout_s,
        )
        return current == n_chunks

    async def is_current(self, collection: str, document_id: str, digest: str, n_chunks: int) -> bool:
        """Whether the caller's tenant already stores this exact version of the document, chunked
        into ``n_chunks`` chunks (a change of chunking settings therefore re-writes it)."""
        return await self._read(self._is_current_blocking, collection, current_tenant(), document_id, digest, n_chunks)

    async def count(self, collection: str, document_id: str | None = None) -> int:
        """Chunks stored for the caller's tenant (of one document when ``document_id`` is given)."""
        tenant = current_tenant()
        expr = self._doc_filter(tenant, document_id) if document_id is not None else f"tenant == {quote(tenant)}"
        return await self._read(self._count_blocking, collection, expr, self.timeout_s)

    async def document_chunks(self, collection: str, document_id: str) -> list[dict[str, Any]]:
        """Stored rows of one document of the caller's tenant, by chunk index (without vectors)."""
        tenant = current_tenant()

        def run(client: MilvusClient, collection: str) -> list[dict[str, Any]]:
            rows = client.query(
                collection,
                filter=self._doc_filter(tenant, document_id),
                output_fields=[*_OUTPUT_FIELDS, "chunk_index", "content_hash", "metadata"],
                limit=_QUERY_WINDOW,
                timeout=self.timeout_s,
                consistency_level=_STRONG,
            )
            return sorted((dict(r) for r in rows), key=lambda r: r["chunk_index"])

        return await self._read(run, collection)

    async def search(self, collection: str, vector: np.ndarray, top_k: int, min_score: float) -> list[common_pb2.Chunk]:
        """The caller's tenant's ``top_k`` chunks nearest ``vector`` (shape ``(dim,)``), best first,
        without those scoring below ``min_score`` (cosine similarity)."""
        tenant = current_tenant()

        def run(client: MilvusClient, collection: str) -> list[common_pb2.Chunk]:
            hits = client.search(
                collection,
                data=[vector.tolist()],
                anns_field="embedding",
                filter=f"tenant == {quote(tenant)}",
                limit=top_k,
                output_fields=_OUTPUT_FIELDS,
                search_params={"metric_type": "COSINE"},
                timeout=self.timeout_s,
                consistency_level=_STRONG,
            )[0]
            out = []
            for hit in hits:
                score = float(hit["distance"])
                if score < min_score:
                    continue
                e = hit["entity"]
                out.append(common_pb2.Chunk(
                    chunk_id=e["chunk_id"], document_id=e["document_id"], title=e["title"], source=e["source"],
                    text=e["text"], start_char=e["start_char"], end_char=e["end_char"], score=score,
                ))
            out.sort(key=lambda c: c.score, reverse=True)
            return out

        return await self._read(run, collection)

    # -- writes ---------------------------------------------------------------------------------

    def _write_blocking(self, client: MilvusClient, collection: str, tenant: str, prepared: PreparedDocument) -> WriteResult:
        doc = prepared.document
        n = len(prepared.chunks)
        if self._is_current_blocking(client, collection, tenant, doc.id, prepared.content_hash, n):
            return WriteResult(written=False)  # another stream wrote this version meanwhile
        base = self._doc_filter(tenant, doc.id)
        stale = self._count_blocking(client, collection, f"{base} and chunk_index >= {n}", self.timeout_s)
        metadata = dict(doc.metadata)
        rows = [
            {
                "chunk_id": chunk_id(tenant, doc.id, c.index),
                "tenant": tenant,
                "document_id": doc.id,
                "chunk_index": c.index,
                "title": doc.title,
                "source": doc.source,
                "text": c.text,
                "start_char": c.start,
                "end_char": c.end,
                "content_hash": prepared.content_hash,
                "metadata": metadata,
                "embedding": prepared.embeddings[i],
            }
            for i, c in enumerate(prepared.chunks)
        ]
        for start in range(0, len(rows), _UPSERT_BATCH):
            client.upsert(collection, rows[start : start + _UPSERT_BATCH], timeout=self.timeout_s)
        if stale:
            client.delete(collection, filter=f"{base} and chunk_index >= {n}", timeout=self.timeout_s)
        return WriteResult(written=True, chunks_written=n, chunks_deleted=stale)

    async def write_document(self, collection: str, prepared: PreparedDocument) -> WriteResult:
        """Make ``prepared`` the stored version of its document for the caller's tenant.

        Semantics (Milvus has no multi-row transactions, so this is what "atomic per document"
        means here):
        - writes are serialized (one writer thread), so two writers never interleave on a document;
        - if exactly this version is already stored, nothing is written (``written=False``);
        - otherwise chunks ``0..n-1`` are upserted under their stable ids (replacing the old
          version's chunks with the same index), then the old version's chunks ``n..`` are
          deleted, so no orphan remains; a reader may see the new chunks next to the old tail for
          the duration of that one delete call;
        - once this returns, Strong-consistency reads see the new version;
        - if Milvus fails half-way the call raises UNAVAILABLE and the document is left with mixed
          versions, which :meth:`is_current` reports as changed: ingesting the document again
          repairs it.
        """
        if prepared.embeddings.shape != (len(prepared.chunks), self.dimension):
            raise ValueError(
                f"expected embeddings of shape ({len(prepared.chunks)}, {self.dimension}), "
                f"got {prepared.embeddings.shape}"
            )
        return await self._write(self._write_blocking, collection, current_tenant(), prepared)
