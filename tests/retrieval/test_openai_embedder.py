"""The OpenAI-compatible embedder, through the real ``openai`` SDK, against a local server that
speaks the ``POST /v1/embeddings`` wire format and computes real all-MiniLM-L6-v2 embeddings (what
vLLM, Infinity or text-embeddings-inference serving that model would answer)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest

from agentmesh.retrieval.v1 import retrieval_pb2 as pb
from agentmesh.services.retrieval.embedder import OpenAIEmbedder, SentenceTransformerEmbedder
from agentmesh.services.retrieval.service import RetrievalService, RetrievalSettings
from agentmesh.services.runtime.errors import ServiceError
from tests.retrieval.helpers import Client, doc
from tests.support import running_service

KEY = "sk-test-key"
MODEL = "minilm-remote"


class _EmbeddingsAPI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append(body)
        if self.path != "/v1/embeddings":
            self._reply(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self._reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                        "code": "invalid_api_key"}})
            return
        if server.rate_limited > 0:
            server.rate_limited -= 1
            self._reply(429, {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
                        {"retry-after": "0"})
            return
        if body.get("model") != MODEL:
            self._reply(404, {"error": {"message": f"The model `{body.get('model')}` does not exist",
                                        "type": "invalid_request_error", "code": "model_not_found"}})
            return
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = server.model._embed_blocking(texts)
        if body.get("dimensions"):
            vectors = vectors[:, : body["dimensions"]]  # shortened, as text-embedding-3 models do
        assert body.get("encoding_format") == "float"
        tokens = sum(len(t.split()) for t in texts)
        self._reply(200, {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
            "model": MODEL,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def api(embedder: SentenceTransformerEmbedder) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EmbeddingsAPI)
    server.model, server.requests, server.rate_limited = embedder, [], 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def base_url(api: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{api.server_address[1]}/v1"


async def test_service_ingests_and_searches_with_the_api(api, embedder, tmp_path) -> None:
    settings = RetrievalSettings(milvus_uri=str(tmp_path / "milvus.db"), embedder="openai", embedding_model=MODEL,
                                 embedding_api_base=base_url(api), embedding_api_key=KEY, embed_batch_size=4)
    service = RetrievalService(settings)
    docs = [doc(f"d{i}", f"Paragraph {i}: " + text) for i, text in enumerate([
        "Sourdough starters need flour and water every day.",
        "Arctic terns migrate from pole to pole each year.",
        "Basalt lava flows out of long fissures in Iceland.",
        "Lighthouses warn ships of rocks with rotating beams.",
        "Glaciers carve U-shaped valleys as they move downhill.",
        "Coral reefs grow slowly in warm shallow seas.",
    ])]
    async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
        assert (service.embedder.model_name, service.embedder.dimension) == (MODEL, 384)
        client = Client(service, channel)
        api.requests.clear()
        reply = await client.ingest(docs, collection="remote")
        assert reply.documents_written == 6
        assert [len(r["input"]) for r in api.requests] == [4, 2], "batched by embed_batch_size"
        hits = await client.search("which bird flies furthest", collection="remote", top_k=1, mode=pb.SEARCH_MODE_DENSE)
        assert [c.document_id for c in hits] == ["d1"]
        # The API serves the same model, so its vectors are the local model's vectors.
        local = await embedder.embed(["which bird flies furthest"])
        remote = await service.embedder.embed(["which bird flies furthest"])
        assert np.allclose(local, remote, atol=1e-5)
        info = (await client.call("DescribeCollection", pb.DescribeCollectionRequest(collection="remote"))).collection
        assert (info.embedding_model, info.embedding_dimension, info.documents) == (MODEL, 384, 6)


async def test_a_collection_of_another_model_is_refused_at_start(api, embedder, tmp_path) -> None:
    uri = str(tmp_path / "milvus.db")
    async with running_service(RetrievalService(RetrievalSettings(milvus_uri=uri), embedder=embedder)):
        pass  # creates the default collection with the local model
    remote = RetrievalSettings(milvus_uri=uri, embedder="openai", embedding_model=MODEL, embedding_api_base=base_url(api),
                               embedding_api_key=KEY)
    with pytest.raises(RuntimeError) as err:
        async with running_service(RetrievalService(remote), timeout_s=60):
            pass
    assert "holds embeddings of sentence-transformers/all-MiniLM-L6-v2 (384-d)" in str(err.value)
    assert f"this service embeds with {MODEL} (384-d)" in str(err.value)


async def test_rate_limits_are_retried_and_dimensions_are_sent(api) -> None:
    api.rate_limited = 1
    api.requests.clear()
    short = OpenAIEmbedder(MODEL, base_url=base_url(api), api_key=KEY, dimensions=128)
    await short.load()
    try:
        assert short.dimension == 128 and len(api.requests) == 2, "one 429, then the retry"
        assert api.requests[-1]["dimensions"] == 128
        vectors = await short.embed(["a", "b", "c"])
        assert vectors.shape == (3, 128)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5), "normalized by the embedder"
        assert short.special_tokens == 0 and short.tokenizer.encode("hello world").ids
    finally:
        await short.close()


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        ({"api_key": "sk-wrong"}, grpc.StatusCode.FAILED_PRECONDITION, "answered 401"),
        ({"model": "no-such-model"}, grpc.StatusCode.FAILED_PRECONDITION, "answered 404"),
        ({"base_url": "http://127.0.0.1:9/v1"}, grpc.StatusCode.UNAVAILABLE, "failed"),
    ],
)
async def test_api_failures_are_clear(api, kwargs: dict, code: grpc.StatusCode, message: str) -> None:
    args = {"model": MODEL, "base_url": base_url(api), "api_key": KEY, "max_retries": 0, "timeout_s": 5, **kwargs}
    embedder = OpenAIEmbedder(args.pop("model"), **args)
    try:
        with pytest.raises(ServiceError) as err:
            await embedder.load()
    finally:
        await embedder.close()
    assert err.value.code == code
    assert message in err.value.message and "embeddings API at" in err.value.message


def test_openai_embedder_needs_a_model_name() -> None:
    with pytest.raises(ValueError, match="embedder 'openai' needs embedding_model"):
        RetrievalSettings(embedder="openai")
