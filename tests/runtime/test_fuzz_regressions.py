"""Regressions found by tests/fuzz in the shared runtime (services/runtime/interceptors.py).

Request bytes that do not decode into the method's request type used to reach the caller as
UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>..." (grpc.aio decodes before
any handler runs); they must be INVALID_ARGUMENT naming the type, for every RPC kind, while
valid requests still reach the handler.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from agentmesh.services.runtime.server import Service
from agentmesh.services.runtime.settings import ServiceSettings
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.support import running_service

pytestmark = pytest.mark.timeout(60)

#: A string field holding invalid UTF-8 (proto3 strings must be UTF-8): field 1, length 2.
BAD_UTF8 = b"\x0a\x02\xff\xfe"
#: A length-delimited field claiming 1000 bytes of which 3 follow.
CUT_SHORT = b"\x0a\xe8\x07abc"


class Echo(tools_pb2_grpc.ToolServiceServicer, retrieval_pb2_grpc.RetrievalServiceServicer):
    """A unary, a server-streaming and a client-streaming method that report what they got."""

    async def Search(self, request, context):  # noqa: N802
        return retrieval_pb2.SearchResponse()

    async def ExecuteTool(self, request, context):  # noqa: N802
        yield tools_pb2.ExecuteToolResponse(result=tools_pb2.ToolResult(error_message=request.name))

    async def IngestDocuments(self, request_iterator, context):  # noqa: N802
        received = [request.document.id async for request in request_iterator]
        return retrieval_pb2.IngestDocumentsResponse(documents_received=len(received))


class EchoService(Service):
    kind = "tools"

    def register(self, server: grpc.aio.Server) -> None:
        tools_pb2_grpc.add_ToolServiceServicer_to_server(Echo(), server)
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(Echo(), server)


@pytest.fixture(scope="module")
async def address():
    async with running_service(EchoService(ServiceSettings())) as addr:
        yield addr


def _raw(channel, kind: str, path: str):
    identity = {"request_serializer": None, "response_deserializer": None}
    return getattr(channel, kind)(path, **identity)


@pytest.mark.parametrize("payload", [BAD_UTF8, CUT_SHORT, b"\xff" * 8], ids=["bad-utf8", "cut-short", "junk"])
async def test_undecodable_unary_and_server_stream_requests_are_invalid_argument(address, payload):
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await _raw(channel, "unary_unary", "/agentmesh.retrieval.v1.RetrievalService/Search")(payload, timeout=10)
        assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "agentmesh.retrieval.v1.SearchRequest" in unary.value.details()

        stream = _raw(channel, "unary_stream", "/agentmesh.tools.v1.ToolService/ExecuteTool")(payload, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in stream:
                pass
        assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "agentmesh.tools.v1.ExecuteToolRequest" in streamed.value.details()

        # A valid request still reaches the handler.
        valid = tools_pb2.ExecuteToolRequest(name="calc").SerializeToString()
        items = [tools_pb2.ExecuteToolResponse.FromString(item) async for item in
                 _raw(channel, "unary_stream", "/agentmesh.tools.v1.ToolService/ExecuteTool")(valid, timeout=10)]
        assert [i.result.error_message for i in items] == ["calc"]


def _ingest(address: str, payloads: list[bytes]) -> retrieval_pb2.IngestDocumentsResponse:
    # The blocking client: the asyncio one may report a stream the server ended early as
    # INTERNAL instead of the server's status (grpc/grpc#36066).
    with grpc.insecure_channel(address) as channel:
        reply = _raw(channel, "stream_unary", "/agentmesh.retrieval.v1.RetrievalService/IngestDocuments")(
            iter(payloads), timeout=10)
    return retrieval_pb2.IngestDocumentsResponse.FromString(reply)


async def test_an_undecodable_message_of_a_client_stream_is_invalid_argument_naming_its_index(address):
    valid = retrieval_pb2.IngestDocumentsRequest(document=retrieval_pb2.Document(id="a")).SerializeToString()
    assert (await asyncio.to_thread(_ingest, address, [valid, valid])).documents_received == 2
    with pytest.raises(grpc.RpcError) as refused:
        await asyncio.to_thread(_ingest, address, [valid, BAD_UTF8, valid])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request message 1 of the stream" in refused.value.details()
    assert "agentmesh.retrieval.v1.IngestDocumentsRequest" in refused.value.details()
