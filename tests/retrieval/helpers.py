"""Helpers shared by the retrieval service tests: a client of the service under test that can
also look into its store as any tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc

from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.retrieval.service import RetrievalService
from agentmesh.services.runtime import context as ctx


def md(tenant: str) -> tuple[tuple[str, str], ...]:
    return ((ctx.TENANT_HEADER, tenant),)


def doc(doc_id: str, text: str, title: str = "", **metadata: str) -> retrieval_pb2.Document:
    return retrieval_pb2.Document(id=doc_id, title=title or doc_id, source=f"test://{doc_id}", text=text, metadata=metadata)


def prose(topic: str, sentences: int) -> str:
    """Sentences about ``topic``, grouped in paragraphs of five."""
    lines = [f"Fact {i} about {topic}: observation number {i} was recorded and checked twice." for i in range(sentences)]
    return "\n\n".join(" ".join(lines[i:i + 5]) for i in range(0, len(lines), 5))


class Client:
    """The service under test, its stub and a way to look into its store as some tenant."""

    def __init__(self, service: RetrievalService, channel: grpc.aio.Channel):
        self.service = service
        self.stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        self.address = ""  # host:port, when the fixture knows it

    async def ingest(self, documents: Iterable[retrieval_pb2.Document], tenant: str = "default",
                     collection: str = "", collections: list[str] | None = None) -> retrieval_pb2.IngestDocumentsResponse:
        docs = list(documents)

        async def requests() -> AsyncIterator[retrieval_pb2.IngestDocumentsRequest]:
            for i, d in enumerate(docs):
                name = collections[i] if collections else collection
                yield retrieval_pb2.IngestDocumentsRequest(collection=name, document=d)

        return await self.stub.IngestDocuments(requests(), metadata=md(tenant), timeout=300)

    async def search(self, query: str, tenant: str = "default", **kwargs) -> list:
        reply = await self.stub.Search(retrieval_pb2.SearchRequest(query=query, **kwargs), metadata=md(tenant), timeout=60)
        return list(reply.chunks)

    async def as_tenant(self, tenant: str, fn, *args):
        token = ctx.tenant_var.set(tenant)
        try:
            return await fn(*args)
        finally:
            ctx.tenant_var.reset(token)

    async def count(self, tenant: str, collection: str, document_id: str | None = None) -> int:
        return await self.as_tenant(tenant, self.service.store.count, collection, document_id)

    async def rows(self, tenant: str, collection: str, document_id: str) -> list[dict]:
        return await self.as_tenant(tenant, self.service.store.document_chunks, collection, document_id)

    async def call(self, method: str, request, tenant: str = "default"):
        """A unary RPC of the service as ``tenant``."""
        return await getattr(self.stub, method)(request, metadata=md(tenant), timeout=60)
