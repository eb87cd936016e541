"""Long-term memory: facts and preferences of a (tenant, user), with embeddings, in Milvus.

The memory service owns its collection (default ``agentmesh_memory_facts``) and — with Milvus Lite,
which allows one process per ``.db`` file — its own database file (see ``MemorySettings``).

==================  =========================  ==================================================
field               type                       holds
==================  =========================  ==================================================
fact_id             VARCHAR(64), primary       32 random hex characters, kept by merges
tenant              VARCHAR(64), partition     the caller's tenant
user_id             VARCHAR(128)               the user the fact is about
text                VARCHAR(4096)              latest wording (≤ 1000 characters)
text_hash           VARCHAR(64)                SHA-256 of (tenant, user, normalized text)
kind                INT64                      ``FactKind`` number
session_ids         ARRAY<VARCHAR(128)>[32]    sessions among ``sources`` (for deletion)
sources             JSON                       ``[{"session_id", "message_id"}]``, newest last, ≤ 32
created_at_ms       INT64                      first stored
updated_at_ms       INT64                      last stated again (drives recency)
mentions            INT64                      times stated
embedding           FLOAT_VECTOR(dim)          L2-normalized embedding of ``text``, COSINE
==================  =========================  ==================================================

Tenancy: every filter is built here and starts with ``tenant == <tenant> and user_id == <user>``,
values quoted with :func:`agentmesh.services.runtime.milvus_expr.quote`.

Deduplication (:meth:`FactStore.remember`): a fact whose normalized text (lower case, spaces
collapsed, trailing ``.!;`` dropped) hashes like a stored one of the same user is an exact
duplicate: the stored fact gains the source, a mention and a fresh ``updated_at_ms``. Otherwise the
user's most similar fact is looked up; at cosine similarity ≥ ``dedup_similarity`` the input is a
near duplicate and is merged: the stored fact keeps its id, takes the NEW wording and embedding
(the newest statement wins: "I have three kids" replaces "I have two kids", which all-MiniLM-L6-v2
scores 0.93 alike), and gains the source and a mention. Writes of one user are serialized by the
caller (a Redis lock), so two concurrent writers cannot both create the same fact.

Consistency: Strong on every read, so a fact is recallable as soon as ``remember`` returned.
Threads: pymilvus blocks, so reads run in the default pool and writes in one writer thread.
pymilvus (and the pandas it pulls in, ~0.3 s and tens of MB) is imported only when a store is
opened, so a memory service without facts never loads it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from agentmesh.memory.v1 import memory_pb2
from agentmesh.services.runtime.errors import ServiceError
from agentmesh.services.runtime.milvus_expr import quote

if TYPE_CHECKING:
    from pymilvus import MilvusClient

log = logging.getLogger("agentmesh.memory")

T = TypeVar("T")

MODEL_PROPERTY = "agentmesh.embedding_model"
DIM_PROPERTY = "agentmesh.embedding_dim"
MAX_FACT_CHARS = 1000
MAX_SOURCES = 32
#: Largest result window of one Milvus query (offset + limit), a server limit.
QUERY_WINDOW = 16384
_STRONG = "Strong"
_FIELDS = ["fact_id", "text", "text_hash", "kind", "session_ids", "sources", "created_at_ms", "updated_at_ms",
           "mentions"]
_TRAILING = re.compile(r"[\s.!;]+$")


def normalize(text: str) -> str:
    """The form exact duplicates are compared in: lower case, whitespace collapsed, trailing
    ``.``/``!``/``;`` removed."""
    return _TRAILING.sub("", " ".join(text.split()).lower())


def text_hash(tenant: str, user: str, text: str) -> str:
    return hashlib.sha256(f"{tenant}\x00{user}\x00{normalize(text)}".encode()).hexdigest()


def _redact(uri: str) -> str:
    return re.sub(r"//[^/@]*@", "//", uri)


@dataclass
class FactInput:
    """A validated fact to store: ``text`` (≤ 1000 characters, whitespace collapsed), ``kind``
    (FactKind number), ``sources`` (session id, message id) pairs."""

    text: str
    kind: int
    sources: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Remembered:
    fact_id: str
    outcome: int
    similarity: float


def row_to_fact(row: dict[str, Any]) -> memory_pb2.Fact:
    return memory_pb2.Fact(
        fact_id=row["fact_id"],
        text=row["text"],
        kind=int(row["kind"]),
        sources=[memory_pb2.FactSource(session_id=s["session_id"], message_id=s["message_id"]) for s in row["sources"]],
        created_at_ms=int(row["created_at_ms"]),
        updated_at_ms=int(row["updated_at_ms"]),
        mentions=int(row["mentions"]),
    )


def _merge_sources(old: list[dict[str, str]], new: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    fresh = set(new)
    out = [s for s in old if (s["session_id"], s["message_id"]) not in fresh]
    out.extend({"session_id": sid, "message_id": mid} for sid, mid in new)
    return out[-MAX_SOURCES:]


def _session_ids(sources: list[dict[str, str]]) -> list[str]:
    return sorted({s["session_id"] for s in sources if s["session_id"]})


class FactStore:
    """The facts collection on one Milvus deployment (see the module docstring).

    ``uri``: Milvus Lite file (``*.db``; its folder is created) or server URL. ``timeout_s``: per
    call, in seconds. Milvus failures become UNAVAILABLE.
    """

    def __init__(self, uri: str, *, collection: str, model_name: str, dimension: int, token: str = "",
                 timeout_s: float = 10.0, dedup_similarity: float = 0.88):
        self.uri = uri
        self.collection = collection
        self.model_name = model_name
        self.dimension = dimension
        self.timeout_s = timeout_s
        self.dedup_similarity = dedup_similarity
        self._token = token
        self._client: MilvusClient | None = None
        self._connect_lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-milvus-writer")

    # -- plumbing -------------------------------------------------------------------------------

    def _connect(self) -> MilvusClient:
        from pymilvus import MilvusClient  # noqa: PLC0415 - see the module docstring

        with self._connect_lock:
            if self._client is None:
                if self.uri.endswith(".db"):
                    Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
                self._client = MilvusClient(uri=self.uri, token=self._token, timeout=self.timeout_s)
            return self._client

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        from pymilvus.exceptions import MilvusException  # noqa: PLC0415

        try:
            return fn(self._connect(), *args)
        except ServiceError:
            raise
        except MilvusException as exc:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, f"fact store (Milvus at {_redact(self.uri)}) failed: {exc.message}"
            ) from exc
        except (grpc.RpcError, ConnectionError, OSError) as exc:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, f"fact store (Milvus at {_redact(self.uri)}) is unreachable: {exc}"
            ) from exc

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self._guard, fn, *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        # Runs to completion in the writer thread even if the awaiting RPC is cancelled.
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._guard, fn, *args)

    def _scope(self, tenant: str, user: str) -> str:
        return f"tenant == {quote(tenant)} and user_id == {quote(user)}"

    def _query(self, client: MilvusClient, expr: str, fields: list[str], limit: int = QUERY_WINDOW) -> list[dict]:
        return [dict(r) for r in client.query(self.collection, filter=expr, output_fields=fields, limit=limit,
                                               timeout=self.timeout_s, consistency_level=_STRONG)]

    def _count(self, client: MilvusClient, expr: str) -> int:
        rows = client.query(self.collection, filter=expr, output_fields=["count(*)"], timeout=self.timeout_s,
                            consistency_level=_STRONG)
        return int(rows[0]["count(*)"]) if rows else 0

    # -- lifecycle ------------------------------------------------------------------------------

    def _schema(self):
        from pymilvus import DataType, MilvusClient  # noqa: PLC0415

        schema = MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False,
            description=f"AgentMesh long-term memory embedded with {self.model_name} ({self.dimension}-d)",
        )
        schema.add_field("fact_id", DataType.VARCHAR, max_length=64, is_primary=True)
        schema.add_field("tenant", DataType.VARCHAR, max_length=64, is_partition_key=True)
        schema.add_field("user_id", DataType.VARCHAR, max_length=128)
        schema.add_field("text", DataType.VARCHAR, max_length=4096)
        schema.add_field("text_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("kind", DataType.INT64)
        schema.add_field("session_ids", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_SOURCES,
                         max_length=128)
        schema.add_field("sources", DataType.JSON)
        schema.add_field("created_at_ms", DataType.INT64)
        schema.add_field("updated_at_ms", DataType.INT64)
        schema.add_field("mentions", DataType.INT64)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dimension)
        return schema

    def _ensure_blocking(self, client: MilvusClient) -> None:
        name = self.collection
        if not client.has_collection(name, timeout=self.timeout_s):
            client.create_collection(
                name, schema=self._schema(), consistency_level=_STRONG,
                properties={MODEL_PROPERTY: self.model_name, DIM_PROPERTY: str(self.dimension)},
                timeout=self.timeout_s,
            )
            index = client.prepare_index_params()
            index.add_index("embedding", index_type="AUTOINDEX", metric_type="COSINE")
            # sync=False: the collection is empty; the waiting path needs AllocTimestamp, which
            # Milvus Lite lacks (see the retrieval store).
            client.create_index(name, index, timeout=self.timeout_s, sync=False)
            log.info("created the facts collection", extra={"fields": {"collection": name}})
        props = client.describe_collection(name, timeout=self.timeout_s).get("properties") or {}
        model, dim = props.get(MODEL_PROPERTY), props.get(DIM_PROPERTY)
        if model != self.model_name or str(dim) != str(self.dimension):
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"collection {name!r} holds embeddings of {model} ({dim}-d) but this service embeds with "
                f"{self.model_name} ({self.dimension}-d); point AGENTMESH_MEMORY_FACTS_COLLECTION at another "
                "collection or run with the collection's model",
            )
        client.load_collection(name, timeout=self.timeout_s)

    async def ensure(self) -> None:
        """Create the collection when missing, check it records this embedder's model (else
        FAILED_PRECONDITION) and load it. UNAVAILABLE when Milvus fails."""
        await self._write(self._ensure_blocking)

    async def ping(self) -> None:
        await self._read(lambda c: c.list_collections(timeout=min(self.timeout_s, 2.0)))

    async def close(self) -> None:
        await asyncio.to_thread(self._writer.shutdown, True)
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
            self._client = None

    # -- writes ---------------------------------------------------------------------------------

    def _remember_blocking(self, client: MilvusClient, tenant: str, user: str, facts: list[FactInput],
                           vectors: np.ndarray, now_ms: int, max_facts: int) -> list[Remembered]:
        scope = self._scope(tenant, user)
        out: list[Remembered] = []
        total: int | None = None
        for fact, vector in zip(facts, vectors, strict=True):
            digest = text_hash(tenant, user, fact.text)
            rows = self._query(client, f"{scope} and text_hash == {quote(digest)}", [*_FIELDS, "embedding"], limit=1)
            if rows:
                row = rows[0]
                row.update(sources=_merge_sources(row["sources"], fact.sources), updated_at_ms=now_ms,
                           mentions=int(row["mentions"]) + 1)
                outcome, similarity = memory_pb2.REMEMBER_OUTCOME_EXACT_DUPLICATE, 1.0
            else:
                hits = client.search(
                    self.collection, data=[vector.tolist()], anns_field="embedding", filter=scope, limit=1,
                    output_fields=[*_FIELDS, "embedding"], search_params={"metric_type": "COSINE"},
                    timeout=self.timeout_s, consistency_level=_STRONG,
                )[0]
                if hits and float(hits[0]["distance"]) >= self.dedup_similarity:
                    row = dict(hits[0]["entity"])
                    similarity = float(hits[0]["distance"])
                    row.update(text=fact.text, text_hash=digest, kind=fact.kind, embedding=vector,
                               sources=_merge_sources(row["sources"], fact.sources), updated_at_ms=now_ms,
                               mentions=int(row["mentions"]) + 1)
                    outcome = memory_pb2.REMEMBER_OUTCOME_MERGED
                else:
                    if total is None:
                        total = self._count(client, scope)
                    if total >= max_facts:
                        raise ServiceError(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"user {user!r} already has {total} facts, the limit per user; delete some "
                            "(DeleteFacts) before adding more",
                        )
                    total += 1
                    row = {"fact_id": secrets.token_hex(16), "text": fact.text, "text_hash": digest, "kind": fact.kind,
                           "sources": _merge_sources([], fact.sources), "created_at_ms": now_ms,
                           "updated_at_ms": now_ms, "mentions": 1, "embedding": vector}
                    outcome, similarity = memory_pb2.REMEMBER_OUTCOME_CREATED, 0.0
            row.update(tenant=tenant, user_id=user, session_ids=_session_ids(row["sources"]))
            row["embedding"] = np.asarray(row["embedding"], dtype=np.float32).tolist()
            client.upsert(self.collection, [row], timeout=self.timeout_s)
            out.append(Remembered(row["fact_id"], outcome, similarity))
        return out

    async def remember(self, tenant: str, user: str, facts: list[FactInput], vectors: np.ndarray, *, now_ms: int,
                       max_facts: int) -> list[Remembered]:
        """Store ``facts`` (``vectors[i]`` embeds ``facts[i].text``) with deduplication (module
        docstring); one result per input, in order. The caller serializes writes per user.
        RESOURCE_EXHAUSTED when a new fact would pass ``max_facts`` for the user."""
        return await self._write(self._remember_blocking, tenant, user, facts, vectors, now_ms, max_facts)

    def _delete_ids_blocking(self, client: MilvusClient, tenant: str, user: str, ids: list[str]) -> int:
        expr = f"{self._scope(tenant, user)} and fact_id in [{', '.join(quote(i) for i in ids)}]"
        found = self._count(client, expr)
        if found:
            client.delete(self.collection, filter=expr, timeout=self.timeout_s)
        return found

    async def delete_ids(self, tenant: str, user: str, ids: list[str]) -> int:
        """Delete the user's facts with these ids; returns how many existed."""
        return await self._write(self._delete_ids_blocking, tenant, user, ids)

    def _delete_user_blocking(self, client: MilvusClient, tenant: str, user: str) -> int:
        expr = self._scope(tenant, user)
        found = self._count(client, expr)
        client.delete(self.collection, filter=expr, timeout=self.timeout_s)
        return found

    async def delete_user(self, tenant: str, user: str) -> int:
        """Delete every fact of (tenant, user); returns how many there were."""
        return await self._write(self._delete_user_blocking, tenant, user)

    def _prune_blocking(self, client: MilvusClient, tenant: str, user: str, session: str,
                        gone: Callable[[str], bool]) -> tuple[int, int]:
        expr = f"{self._scope(tenant, user)} and array_contains(session_ids, {quote(session)})"
        deleted = updated = 0
        for row in self._query(client, expr, [*_FIELDS, "embedding"]):
            keep = [s for s in row["sources"] if s["session_id"] != session or not gone(s["message_id"])]
            if len(keep) == len(row["sources"]):
                continue
            if not keep:
                one = f"{self._scope(tenant, user)} and fact_id == {quote(row['fact_id'])}"
                client.delete(self.collection, filter=one, timeout=self.timeout_s)
                deleted += 1
            else:
                row.update(tenant=tenant, user_id=user, sources=keep, session_ids=_session_ids(keep))
                row["embedding"] = np.asarray(row["embedding"], dtype=np.float32).tolist()
                client.upsert(self.collection, [row], timeout=self.timeout_s)
                updated += 1
        return deleted, updated

    async def prune_sources(self, tenant: str, user: str, session: str,
                            gone: Callable[[str], bool]) -> tuple[int, int]:
        """Drop from the user's facts the sources of ``session`` whose message id ``gone``
        selects; a fact left without any source is deleted, one that keeps a source (another
        message, another session, or a source naming no message) is updated. Returns (facts
        deleted, facts updated)."""
        return await self._write(self._prune_blocking, tenant, user, session, gone)

    async def remove_session(self, tenant: str, user: str, session: str,
                             message_prefix: str | None = None) -> tuple[int, int]:
        """Drop ``session`` from the sources of the user's facts (only sources whose message id
        starts with ``message_prefix`` when given); a fact left without sources is deleted.
        Returns (facts deleted, facts updated)."""
        if message_prefix is None:
            return await self.prune_sources(tenant, user, session, lambda _message_id: True)
        return await self.prune_sources(tenant, user, session, lambda message_id: message_id.startswith(message_prefix))

    # -- reads ----------------------------------------------------------------------------------

    async def recall(self, tenant: str, user: str, vector: np.ndarray, *, top_k: int, min_similarity: float,
                     recency_weight: float, half_life_s: float, now_ms: int,
                     min_score: float = -math.inf) -> list[memory_pb2.RecalledFact]:
        """The user's facts scored ``(1 - w) * similarity + w * 0.5 ** (age / half_life)`` (age from
        ``updated_at_ms``; the relevance + recency sum of Park et al., "Generative Agents", 2023,
        with a half-life instead of their hourly decay factor), best first, without those below
        ``min_similarity`` or scoring below ``min_score``. Milvus returns the
        ``max(4 * top_k, 50)`` most similar facts and they are re-ranked here, so a very old,
        very similar fact can still outrank a recent one only within that candidate set."""
        limit = min(max(4 * top_k, 50), QUERY_WINDOW)

        def run(client: MilvusClient) -> list[memory_pb2.RecalledFact]:
            hits = client.search(
                self.collection, data=[vector.tolist()], anns_field="embedding", filter=self._scope(tenant, user),
                limit=limit, output_fields=_FIELDS, search_params={"metric_type": "COSINE"},
                timeout=self.timeout_s, consistency_level=_STRONG,
            )[0]
            out = []
            for hit in hits:
                similarity = float(hit["distance"])
                if similarity < min_similarity:
                    continue
                fact = row_to_fact(hit["entity"])
                age_s = max(0.0, (now_ms - fact.updated_at_ms) / 1000.0)
                recency = 0.5 ** (age_s / half_life_s)
                score = (1.0 - recency_weight) * similarity + recency_weight * recency
                if score < min_score:
                    continue
                out.append(memory_pb2.RecalledFact(fact=fact, similarity=similarity, recency=recency, score=score))
            out.sort(key=lambda r: (-r.score, r.fact.fact_id))
            return out[:top_k]

        return await self._read(run)

    async def list(self, tenant: str, user: str) -> list[memory_pb2.Fact]:
        """Every fact of the user (at most 16384), most recently updated first."""

        def run(client: MilvusClient) -> list[memory_pb2.Fact]:
            rows = self._query(client, self._scope(tenant, user), _FIELDS)
            facts = [row_to_fact(r) for r in rows]
            facts.sort(key=lambda f: (-f.updated_at_ms, f.fact_id))
            return facts

        return await self._read(run)

    async def count(self, tenant: str, user: str) -> int:
        return await self._read(self._count, self._scope(tenant, user))
