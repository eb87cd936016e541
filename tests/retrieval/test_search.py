"""Search modes, per-stage scores, typed filters, tenant isolation on every path, MMR and the
reranker, against the real service (MiniLM embeddings, Milvus Lite with its BM25 function)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from agentmesh.retrieval.v1 import retrieval_pb2 as pb
from agentmesh.services.retrieval.rerank import HttpReranker
from agentmesh.services.retrieval.service import RetrievalService, RetrievalSettings
from tests.retrieval.helpers import Client, doc
from tests.support import running_service

C = "search"
CORPUS = [
    doc("d_json", "json.loads parses a JSON document into Python objects and json.dumps serializes them.",
        title="JSON", lang="en", year="2021", kind="api"),
    doc("d_zx", "The Zorblax-9000 controller raises fault code QX7741 when the coolant loop stalls.",
        title="Controller faults", lang="en", year="2023"),
    doc("d_fr", "Le pain au levain lève lentement grâce aux levures sauvages et aux bactéries lactiques.",
        title="Pain", lang="fr", year="2019"),
    doc("d_tide", "Spring tides happen at new and full moon, when the sun and the moon are aligned.",
        title="Tides", year="2022"),
    doc("d_tide2", "Spring tides occur at full and new moon, when the sun and moon line up together.",
        title="Tides again", year="2022"),
    doc("d_neap", "Neap tides happen at the quarter moons, when the sun and moon pull at right angles.",
        title="Neap tides", year="2020"),
]
SECRET = doc("secret", "The Zorblax-9000 controller raises fault code QX7741 when the coolant loop stalls.",
             title="Rival notes", lang="en", year="2023")
MODES = [pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_SPARSE, pb.SEARCH_MODE_HYBRID]
MODE_IDS = ["dense", "sparse", "hybrid"]


@pytest.fixture(scope="module", autouse=True)
async def corpus(client: Client) -> None:
    assert (await client.ingest(CORPUS, tenant="lab", collection=C)).documents_written == len(CORPUS)
    assert (await client.ingest([SECRET], tenant="rival", collection=C)).documents_written == 1


async def search(client: Client, query: str, tenant: str = "lab", **kwargs) -> pb.SearchResponse:
    kwargs.setdefault("top_k", 10)
    return await client.call("Search", pb.SearchRequest(collection=C, query=query, **kwargs), tenant)


def ids(reply: pb.SearchResponse) -> list[str]:
    return [c.document_id for c in reply.chunks]


async def test_bm25_finds_rare_tokens_and_reports_only_its_stage(client: Client) -> None:
    reply = await search(client, "QX7741", mode=pb.SEARCH_MODE_SPARSE)
    assert reply.mode == pb.SEARCH_MODE_SPARSE and reply.fusion == pb.FUSION_METHOD_UNSPECIFIED
    assert ids(reply) == ["d_zx"], "only chunks sharing a term with the query have a BM25 score"
    c = reply.chunks[0]
    assert c.scores.HasField("sparse") and c.scores.sparse > 0 and c.score == pytest.approx(c.scores.sparse)
    assert c.scores.sparse_rank == 1
    assert not c.scores.HasField("dense") and not c.scores.HasField("fused") and c.scores.dense_rank == 0


async def test_dense_reports_cosine_only(client: Client) -> None:
    reply = await search(client, "lunar alignment and ocean water levels", mode=pb.SEARCH_MODE_DENSE, min_score=-1)
    assert ids(reply)[0] in {"d_tide", "d_tide2", "d_neap"}
    assert len(reply.chunks) == len(CORPUS), "dense search ranks every chunk of the tenant"
    for rank, c in enumerate(reply.chunks, 1):
        assert c.scores.dense == pytest.approx(c.score) and c.scores.dense_rank == rank
        assert not c.scores.HasField("sparse")


async def test_hybrid_is_the_default_and_fuses_both_rankings(client: Client) -> None:
    reply = await search(client, "coolant fault QX7741 on the controller")
    assert reply.mode == pb.SEARCH_MODE_HYBRID and reply.fusion == pb.FUSION_METHOD_RRF
    top = reply.chunks[0]
    assert top.document_id == "d_zx"
    s = top.scores
    assert s.HasField("dense") and s.HasField("sparse") and s.dense_rank >= 1 and s.sparse_rank == 1
    assert s.fused == pytest.approx(1 / (60 + s.dense_rank) + 1 / (60 + s.sparse_rank)) and top.score == pytest.approx(s.fused)
    k10 = await search(client, "coolant fault QX7741 on the controller", rrf_k=10)
    assert k10.chunks[0].scores.fused == pytest.approx(1 / (10 + s.dense_rank) + 1 / 11)
    # Chunks only the dense ranking found carry no BM25 score.
    assert any(not c.scores.HasField("sparse") and c.scores.dense_rank for c in reply.chunks)


async def test_weighted_fusion(client: Client) -> None:
    dense = await search(client, "tides at full moon", mode=pb.SEARCH_MODE_DENSE, min_score=-1)
    only_dense = await search(client, "tides at full moon", fusion=pb.FUSION_METHOD_WEIGHTED, dense_weight=1.0)
    assert only_dense.fusion == pb.FUSION_METHOD_WEIGHTED
    assert ids(only_dense) == ids(dense)
    for c in only_dense.chunks:
        assert c.scores.fused == pytest.approx((1 + c.scores.dense) / 2, abs=1e-6)
    only_bm25 = await search(client, "tides at full moon", fusion=pb.FUSION_METHOD_WEIGHTED, dense_weight=0.0)
    sparse = await search(client, "tides at full moon", mode=pb.SEARCH_MODE_SPARSE)
    assert ids(only_bm25)[: len(sparse.chunks)] == ids(sparse)


async def test_candidates_bound_each_ranking(client: Client) -> None:
    reply = await search(client, "tides", top_k=2, candidates=2, mode=pb.SEARCH_MODE_HYBRID)
    assert len(reply.chunks) == 2
    assert all(c.scores.dense_rank <= 2 and c.scores.sparse_rank <= 2 for c in reply.chunks)


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([pb.FilterCondition(metadata_key="year", operator=pb.FILTER_OPERATOR_EQUAL, values=["2022"])],
         {"d_tide", "d_tide2"}),
        ([pb.FilterCondition(metadata_key="lang", operator=pb.FILTER_OPERATOR_IN, values=["fr", "de"])], {"d_fr"}),
        ([pb.FilterCondition(metadata_key="kind", operator=pb.FILTER_OPERATOR_NOT_EQUAL, values=["api"])],
         {"d_zx", "d_fr", "d_tide", "d_tide2", "d_neap"}),
        ([pb.FilterCondition(metadata_key="kind", operator=pb.FILTER_OPERATOR_EXISTS)], {"d_json"}),
        ([pb.FilterCondition(metadata_key="lang", operator=pb.FILTER_OPERATOR_NOT_EXISTS)],
         {"d_tide", "d_tide2", "d_neap"}),
        ([pb.FilterCondition(metadata_key="year", operator=pb.FILTER_OPERATOR_GREATER_OR_EQUAL, values=["2022"]),
          pb.FilterCondition(metadata_key="year", operator=pb.FILTER_OPERATOR_LESS_THAN, values=["2023"])],
         {"d_tide", "d_tide2"}),
        ([pb.FilterCondition(document_field=pb.DOCUMENT_FIELD_ID, operator=pb.FILTER_OPERATOR_IN,
                             values=["d_fr", "secret"])], {"d_fr"}),
        ([pb.FilterCondition(document_field=pb.DOCUMENT_FIELD_TITLE, operator=pb.FILTER_OPERATOR_EQUAL,
                             values=["Neap tides"])], {"d_neap"}),
        ([pb.FilterCondition(document_field=pb.DOCUMENT_FIELD_SOURCE, operator=pb.FILTER_OPERATOR_NOT_IN,
                             values=[f"test://{d.id}" for d in CORPUS[1:]])], {"d_json"}),
        ([pb.FilterCondition(metadata_key='year"] != "x" or tenant != "lab', operator=pb.FILTER_OPERATOR_EXISTS)],
         set()),
    ],
    ids=["equal", "in", "not-equal-keeps-missing", "exists", "not-exists", "range", "id-in-own-tenant-only",
         "title", "source-not-in", "injection-is-a-key"],
)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
async def test_filters_apply_to_every_mode(client: Client, conditions: list, expected: set, mode: int) -> None:
    # A query that every document matches in BM25 ("the", "and" are stop words): use real words.
    query = "tides moon controller json pain levain"
    reply = await search(client, query, mode=mode, top_k=50, filters=conditions, min_score=-1)
    found = set(ids(reply))
    if mode == pb.SEARCH_MODE_SPARSE:
        assert found <= expected and ("d_fr" not in expected or "d_fr" in found)
    else:
        assert found == expected


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
async def test_tenants_are_isolated_in_every_mode(client: Client, mode: int) -> None:
    query = "Zorblax-9000 controller fault code QX7741 coolant"
    lab = await search(client, query, mode=mode, top_k=50, min_score=-1)
    assert "secret" not in ids(lab) and "d_zx" in ids(lab)
    rival = await search(client, query, tenant="rival", mode=mode, top_k=50, min_score=-1)
    assert ids(rival) == ["secret"]
    nobody = await search(client, query, tenant="nobody", mode=mode, top_k=50, min_score=-1)
    assert ids(nobody) == []


async def test_mmr_skips_near_duplicates(client: Client) -> None:
    query = "spring tides at new and full moon"
    plain = await search(client, query, mode=pb.SEARCH_MODE_DENSE, top_k=2)
    assert set(ids(plain)) == {"d_tide", "d_tide2"}, "the two paraphrases are the closest"
    diverse = await search(client, query, mode=pb.SEARCH_MODE_DENSE, top_k=2, mmr=pb.MmrOptions(relevance_weight=0.3))
    assert ids(diverse)[0] == ids(plain)[0]
    assert ids(diverse)[1] not in {"d_tide", "d_tide2"}
    # relevance_weight 1 is plain relevance order; MMR also works on fused hybrid scores.
    same = await search(client, query, mode=pb.SEARCH_MODE_DENSE, top_k=2, mmr=pb.MmrOptions(relevance_weight=1.0))
    assert ids(same) == ids(plain)
    hybrid = await search(client, query, top_k=3, mmr=pb.MmrOptions())
    assert len(set(ids(hybrid))) == 3


SEARCH_ERRORS = [
    ({"dense_weight": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "dense_weight 1.5 is outside 0..1"),
    ({"rrf_k": 1001}, grpc.StatusCode.INVALID_ARGUMENT, "rrf_k 1001 is above 1000"),
    ({"candidates": 1001}, grpc.StatusCode.INVALID_ARGUMENT, "candidates 1001 is above 1000"),
    ({"candidates": 3, "top_k": 5}, grpc.StatusCode.INVALID_ARGUMENT, "candidates (3) must be at least top_k (5)"),
    ({"mmr": pb.MmrOptions(relevance_weight=2)}, grpc.StatusCode.INVALID_ARGUMENT, "mmr.relevance_weight 2.0 is outside"),
    ({"fusion": 9}, grpc.StatusCode.INVALID_ARGUMENT, "fusion 9 is not supported"),
    ({"mode": 7}, grpc.StatusCode.INVALID_ARGUMENT, "search mode 7 is not supported"),
    ({"filters": [pb.FilterCondition(metadata_key="k", operator=pb.FILTER_OPERATOR_IN)]},
     grpc.StatusCode.INVALID_ARGUMENT, "filters[0]: FILTER_OPERATOR_IN takes 1..100 values, got 0"),
    ({"rerank": True}, grpc.StatusCode.FAILED_PRECONDITION, "no reranker configured"),
]


@pytest.mark.parametrize(("kwargs", "code", "message"), SEARCH_ERRORS, ids=[m for _, _, m in SEARCH_ERRORS])
async def test_search_option_errors(client: Client, kwargs: dict, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await search(client, "tides", **kwargs)
    assert err.value.code() == code
    assert message in err.value.details()


# -- reranker -------------------------------------------------------------------------------------

class _RerankAPI(BaseHTTPRequestHandler):
    """Cohere-format ``POST /v1/rerank``: scores documents in the reverse of the order given
    (so a test can tell the service re-sorted by them), or fails as ``server.fail`` says."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers.get("Authorization"), body))
        if self.server.fail:
            self.send_response(self.server.fail)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "model overloaded"}')
            return
        n = len(body["documents"])
        results = [{"index": i, "relevance_score": float(i) / n} for i in reversed(range(n))]
        payload = json.dumps({"id": "rr-1", "results": results, "meta": {"billed_units": {"search_units": 1}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def rerank_api() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RerankAPI)
    server.requests, server.fail = [], 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def test_reranker_reorders_candidates(embedder, tmp_path, rerank_api) -> None:
    url = f"http://127.0.0.1:{rerank_api.server_address[1]}/v1/rerank"
    settings = RetrievalSettings(milvus_uri=str(tmp_path / "milvus.db"))
    service = RetrievalService(settings, embedder=embedder, reranker=HttpReranker(url, model="bge-reranker-base",
                                                                                 api_key="sk-test"))
    async with running_service(service) as address, grpc.aio.insecure_channel(address) as channel:
        client = Client(service, channel)
        await client.ingest(CORPUS, tenant="lab", collection=C)
        plain = await search(client, "tides at the full moon", mode=pb.SEARCH_MODE_DENSE, top_k=4, candidates=4)
        reranked = await search(client, "tides at the full moon", mode=pb.SEARCH_MODE_DENSE, top_k=4, candidates=4,
                                rerank=True)
        path, auth, body = rerank_api.requests[-1]
        assert (path, auth, body["model"], body["query"]) == ("/v1/rerank", "Bearer sk-test", "bge-reranker-base",
                                                             "tides at the full moon")
        assert body["documents"] == [f"{c.title}\n{c.text}" for c in plain.chunks], "the pool, in retrieval order"
        # The fake scores the pool in reverse: the service re-sorted by its scores.
        assert ids(reranked) == list(reversed(ids(plain)))
        for c in reranked.chunks:
            assert c.scores.HasField("rerank") and c.score == pytest.approx(c.scores.rerank) and c.scores.HasField("dense")
        rerank_api.fail = 503
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await search(client, "tides", rerank=True)
        finally:
            rerank_api.fail = 0
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "answered 503" in err.value.details() and url in err.value.details()
