"""search_documents against the real retrieval service (Milvus Lite in a temporary folder, real
all-MiniLM-L6-v2 embeddings), through the real tool service."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import AsyncIterator  # noqa: E402

import grpc  # noqa: E402
import pytest  # noqa: E402
from google.protobuf import json_format, struct_pb2  # noqa: E402

from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc  # noqa: E402
from agentmesh.services.retrieval.service import RetrievalService, RetrievalSettings  # noqa: E402
from agentmesh.services.runtime.settings import MeshSettings  # noqa: E402
from agentmesh.services.tools.service import ToolsService, ToolsSettings  # noqa: E402
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc  # noqa: E402
from tests.support import running_service  # noqa: E402

DOCS = {
    "acme": [
        ("volcano", "Volcanoes", "A volcano erupts when magma rises through the crust. Pressure from dissolved gases "
         "drives the eruption, and lava flows out of the vent while ash is thrown into the sky."),
        ("tides", "Tides", "Ocean tides are caused by the gravitational pull of the Moon and the Sun on the oceans. "
         "Most coasts see two high tides and two low tides every day."),
    ],
    "globex": [
        ("bread", "Baking bread", "To bake bread, mix flour, water, salt and yeast, knead the dough, let it rise for "
         "an hour, shape the loaf and bake it in a hot oven until the crust is brown."),
    ],
}


def md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-tenant-id", tenant),)


@pytest.fixture(scope="module")
async def retrieval_address(tmp_path_factory) -> AsyncIterator[str]:
    folder = tmp_path_factory.mktemp("milvus")
    service = RetrievalService(RetrievalSettings(milvus_uri=str(folder / "milvus.db")))
    async with running_service(service, timeout_s=180) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            for tenant, docs in DOCS.items():

                async def requests(docs=docs):
                    for doc_id, title, text in docs:
                        document = retrieval_pb2.Document(id=doc_id, title=title, source=f"test://{doc_id}", text=text)
                        yield retrieval_pb2.IngestDocumentsRequest(document=document)

                reply = await stub.IngestDocuments(requests(), metadata=md(tenant), timeout=120)
                assert reply.documents_written == len(docs)
        yield address


@pytest.fixture(scope="module")
async def tools(retrieval_address: str) -> AsyncIterator[tools_pb2_grpc.ToolServiceStub]:
    service = ToolsService(ToolsSettings(python_enabled=False), mesh=MeshSettings(retrieval_address=retrieval_address))
    async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
        yield tools_pb2_grpc.ToolServiceStub(channel)


async def search(stub, tenant: str, **arguments) -> list[tools_pb2.ExecuteToolResponse]:
    args = struct_pb2.Struct()
    args.update(arguments)
    call = stub.ExecuteTool(
        tools_pb2.ExecuteToolRequest(name="search_documents", arguments=args, tool_call_id="call_s"),
        metadata=md(tenant),
        timeout=60,
    )
    return [item async for item in call]


async def test_progress_then_chunks_of_the_callers_tenant(tools):
    items = await search(tools, "acme", query="what makes a volcano erupt?", top_k=2)
    assert [i.WhichOneof("event") for i in items] == ["progress", "progress", "result"]
    assert items[0].progress.message.startswith("searching documents for")
    assert items[1].progress.message == "found 2 chunks" and items[1].progress.fraction == 1.0

    result = items[-1].result
    assert not result.is_error
    assert [c.document_id for c in result.chunks] == ["volcano", "tides"]  # best first, acme's only
    assert result.chunks[0].title == "Volcanoes" and "magma" in result.chunks[0].text
    assert result.chunks[0].score > result.chunks[1].score

    output = json_format.MessageToDict(result.output)
    assert output["query"] == "what makes a volcano erupt?"
    assert [c["chunk_id"] for c in output["chunks"]] == [c.chunk_id for c in result.chunks]
    assert output["chunks"][0]["text"] == result.chunks[0].text
    assert output["chunks"][0]["source"] == "test://volcano"


async def test_the_tenant_is_propagated_to_retrieval(tools):
    # The same query as another tenant sees only that tenant's documents...
    globex = (await search(tools, "globex", query="what makes a volcano erupt?", top_k=5))[-1].result
    assert [c.document_id for c in globex.chunks] == ["bread"]
    # ...and a tenant with no documents (or the default one) sees nothing.
    for tenant in ("initech", "default"):
        result = (await search(tools, tenant, query="what makes a volcano erupt?"))[-1].result
        assert len(result.chunks) == 0
        assert json_format.MessageToDict(result.output)["chunks"] == []


async def test_top_k_is_passed_on(tools):
    result = (await search(tools, "acme", query="ocean tides and the moon", top_k=1))[-1].result
    assert [c.document_id for c in result.chunks] == ["tides"]
