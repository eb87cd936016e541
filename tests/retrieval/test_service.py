"""RetrievalService over gRPC with real embeddings and a real Milvus Lite in a temporary folder."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.services.retrieval.corpus import stdlib_documents
from agentmesh.services.retrieval.store import MilvusStore, content_hash
from tests.retrieval.helpers import Client, doc, md, prose

STDLIB = ["json", "re", "csv", "subprocess", "tempfile", "pickle", "base64", "urllib.parse"]


@pytest.fixture(scope="module")
def stdlib_docs() -> list[retrieval_pb2.Document]:
    return list(stdlib_documents(STDLIB))


@pytest.fixture(scope="module")
async def stdlib_ingested(client: Client, stdlib_docs) -> retrieval_pb2.IngestDocumentsResponse:
    return await client.ingest(stdlib_docs, tenant="docs", collection="stdlib")


async def test_ingest_counts_and_stores_every_chunk(client: Client, stdlib_docs, stdlib_ingested) -> None:
    r = stdlib_ingested
    assert (r.documents_received, r.documents_written, r.documents_unchanged) == (len(STDLIB), len(STDLIB), 0)
    assert r.chunks_deleted == 0
    assert r.chunks_written > 50
    assert await client.count("docs", "stdlib") == r.chunks_written
    rows = await client.rows("docs", "stdlib", "python-stdlib:json")
    json_doc = next(d for d in stdlib_docs if d.id == "python-stdlib:json")
    assert [row["chunk_index"] for row in rows] == list(range(len(rows)))
    for row in rows:
        assert json_doc.text[row["start_char"]:row["end_char"]] == row["text"]
        assert row["content_hash"] == content_hash(json_doc)
        assert row["metadata"] == dict(json_doc.metadata)
        assert (row["title"], row["source"]) == (json_doc.title, json_doc.source)


@pytest.mark.parametrize(
    ("query", "module"),
    [
        ("parse JSON string into Python object", "json"),
        ("run a shell command and capture its output", "subprocess"),
        ("create a temporary directory that is removed afterwards", "tempfile"),
        ("read rows from a comma separated values file", "csv"),
        ("split a URL into scheme, host and path", "urllib.parse"),
    ],
)
async def test_search_ranks_the_right_module_first(client: Client, stdlib_docs, stdlib_ingested, query, module) -> None:
    chunks = await client.search(query, tenant="docs", collection="stdlib", top_k=5)
    assert chunks[0].document_id == f"python-stdlib:{module}", [c.document_id for c in chunks]
    scores = [c.score for c in chunks]
    assert scores == sorted(scores, reverse=True)
    texts = {d.id: d.text for d in stdlib_docs}
    for c in chunks:
        assert texts[c.document_id][c.start_char:c.end_char] == c.text
        assert c.chunk_id and c.title and c.source.startswith("https://docs.python.org/")
        assert -1.0 <= c.score <= 1.0


async def test_reingesting_unchanged_documents_writes_nothing(client: Client, stdlib_docs, stdlib_ingested) -> None:
    before = await client.count("docs", "stdlib")
    again = await client.ingest(stdlib_docs, tenant="docs", collection="stdlib")
    assert (again.documents_received, again.documents_unchanged) == (len(STDLIB), len(STDLIB))
    assert (again.documents_written, again.chunks_written, again.chunks_deleted) == (0, 0, 0)
    assert await client.count("docs", "stdlib") == before


async def test_top_k_and_min_score(client: Client, stdlib_ingested) -> None:
    query = "parse JSON string into Python object"
    dense = retrieval_pb2.SEARCH_MODE_DENSE
    assert len(await client.search(query, tenant="docs", collection="stdlib")) == 5  # top_k 0 means 5
    assert len(await client.search(query, tenant="docs", collection="stdlib", top_k=12)) == 12
    scored = await client.search(query, tenant="docs", collection="stdlib", top_k=50, min_score=0.4, mode=dense)
    assert scored and all(c.score >= 0.4 for c in scored)
    assert len(scored) < 50
    assert await client.search(query, tenant="docs", collection="stdlib", min_score=0.99, mode=dense) == []
    # Hybrid scores are fused (RRF: at most 2 / 61 with k = 60), and min_score applies to them.
    fused = await client.search(query, tenant="docs", collection="stdlib", top_k=50, min_score=0.02)
    assert fused and all(0.02 <= c.score <= 2 / 61 + 1e-6 for c in fused) and len(fused) < 50


async def test_changed_document_replaces_all_old_chunks(client: Client) -> None:
    long = doc("handbook", prose("glaciers", 60), title="Glacier handbook", edition="1")
    neighbour = doc("neighbour", prose("lighthouses", 10))
    first = await client.ingest([long, neighbour], tenant="ops", collection="versions")
    n_old = await client.count("ops", "versions", "handbook")
    assert n_old >= 4 and first.documents_written == 2
    neighbour_chunks = await client.count("ops", "versions", "neighbour")

    short = doc("handbook", prose("volcanoes", 12), title="Volcano handbook", edition="2")
    second = await client.ingest([short], tenant="ops", collection="versions")
    n_new = await client.count("ops", "versions", "handbook")
    assert 1 <= n_new < n_old
    assert (second.documents_written, second.chunks_written, second.chunks_deleted) == (1, n_new, n_old - n_new)
    rows = await client.rows("ops", "versions", "handbook")
    assert [r["chunk_index"] for r in rows] == list(range(n_new))
    assert {r["content_hash"] for r in rows} == {content_hash(short)}
    assert all("glaciers" not in r["text"] and r["metadata"] == {"edition": "2"} for r in rows)
    assert await client.count("ops", "versions", "neighbour") == neighbour_chunks

    hits = await client.search("glaciers", tenant="ops", collection="versions", top_k=20, min_score=-1)
    assert all("glaciers" not in c.text for c in hits), "no chunk of the old version is searchable"

    # Only the title changes: still a new version (the hash covers the whole document).
    retitled = doc("handbook", short.text, title="Volcano handbook, 2nd printing", edition="2")
    third = await client.ingest([retitled], tenant="ops", collection="versions")
    assert (third.documents_written, third.chunks_written, third.chunks_deleted) == (1, n_new, 0)
    hits = await client.search("volcanoes", tenant="ops", collection="versions", top_k=50, min_score=-1)
    assert {c.title for c in hits if c.document_id == "handbook"} == {retitled.title}


@pytest.mark.parametrize("mode", [retrieval_pb2.SEARCH_MODE_HYBRID, retrieval_pb2.SEARCH_MODE_DENSE,
                                  retrieval_pb2.SEARCH_MODE_SPARSE], ids=["hybrid", "dense", "sparse"])
async def test_search_right_after_ingest_finds_the_document(client: Client, mode: int) -> None:
    topics = {
        "sourdough": ("Sourdough bread rises because wild yeast and lactic acid bacteria ferment the dough "
                      "slowly overnight; bakers feed the starter with flour and water every day.",
                      "how do I keep a bread starter alive"),
        "terns": ("Arctic terns migrate from the Arctic to the Antarctic and back every year, the longest "
                  "migration of any bird, following the summer at both poles.",
                  "which bird flies the furthest each year"),
        "eruption": ("Volcanic eruptions in Iceland are mostly fissure eruptions where basalt lava flows out of "
                     "long cracks in the ground above the mid-Atlantic ridge.",
                     "lava flowing out of cracks in the earth"),
    }
    collection = f"ryw_{mode}"
    for doc_id, (text, query) in topics.items():
        reply = await client.ingest([doc(doc_id, text)], tenant="fresh", collection=collection)
        assert reply.documents_written == 1
        # No wait, no retry: the first search after the response sees the document.
        chunks = await client.search(query, tenant="fresh", collection=collection, top_k=1, mode=mode)
        assert [c.document_id for c in chunks] == [doc_id]


async def test_tenants_never_see_each_other(client: Client) -> None:
    acme = doc("plan", "Acme's secret plan: ship the rocket skates in March and the anvils in May.")
    await client.ingest([acme], tenant="acme", collection="shared")
    for other in ("globex", "default"):
        assert await client.search("rocket skates plan", tenant=other, collection="shared", top_k=100, min_score=-1) == []

    # The same document id in another tenant is a separate document: nothing is overwritten.
    globex = doc("plan", "Globex's plan: build a doomsday device in the volcano lair by autumn.")
    r = await client.ingest([globex], tenant="globex", collection="shared")
    assert (r.documents_written, r.documents_unchanged, r.chunks_deleted) == (1, 0, 0)
    assert await client.count("acme", "shared", "plan") == 1
    acme_hits = await client.search("plan", tenant="acme", collection="shared", top_k=100, min_score=-1)
    globex_hits = await client.search("plan", tenant="globex", collection="shared", top_k=100, min_score=-1)
    assert [c.text for c in acme_hits] == [acme.text]
    assert [c.text for c in globex_hits] == [globex.text]
    assert acme_hits[0].chunk_id != globex_hits[0].chunk_id


async def test_ids_that_look_like_filter_syntax_are_plain_values(client: Client) -> None:
    victim = doc("victim", "A document of tenant victim that nobody else may touch.")
    await client.ingest([victim], tenant="victim", collection="escaping")
    evil_ids = ['x" or tenant != "nobody', "back\\slash\\", "it's 'quoted'", 'x") or (1 == 1']
    docs = [doc(i, f"Harmless text number {n} about teapots.") for n, i in enumerate(evil_ids)]
    r = await client.ingest(docs, tenant="mallory", collection="escaping")
    assert r.documents_written == len(evil_ids)
    for i in evil_ids:
        assert await client.count("mallory", "escaping", i) == 1
    again = await client.ingest(docs, tenant="mallory", collection="escaping")
    assert again.documents_unchanged == len(evil_ids)
    changed = [doc(i, "Now a shorter text.") for i in evil_ids]
    assert (await client.ingest(changed, tenant="mallory", collection="escaping")).documents_written == len(evil_ids)
    assert await client.count("victim", "escaping", "victim") == 1
    assert await client.count("mallory", "escaping") == len(evil_ids)
    hits = await client.search("teapots", tenant="mallory", collection="escaping", top_k=100, min_score=-1)
    assert {c.document_id for c in hits} == set(evil_ids)


BAD_STREAMS = [
    ("empty id", [doc("", "text")], "documents[2]: id must be 1..256 bytes"),
    ("long id", [doc("é" * 129, "text")], "got 258"),
    ("control id", [doc("a\nb", "text")], "id must not contain control characters"),
    ("empty text", [doc("e", "")], "documents[2] (id 'e'): text is empty"),
    ("blank text", [doc("b", " \n\t ")], "text is empty"),
    ("long title", [doc("t", "text", title="x" * 1025)], "title is 1025 bytes; at most 1024"),
    ("big metadata", [doc("m", "text", blob="y" * 20000)], "metadata is"),
    ("duplicate id", [doc("good-0", "again")], "already sent as documents[0]"),
    ("no document", [retrieval_pb2.Document()], "documents[2]: id must be"),
]


@pytest.fixture(scope="module")
async def strict_collection(client: Client) -> None:
    # The collection exists with one document, so "nothing written" is checked against real rows.
    await client.ingest([doc("seed", "Seed document of the strict tenant.")], tenant="strict", collection="stdlib_like")


@pytest.mark.usefixtures("strict_collection")
@pytest.mark.parametrize(("case", "tail", "message"), BAD_STREAMS, ids=[c[0] for c in BAD_STREAMS])
async def test_bad_documents_fail_the_stream_and_write_nothing(client: Client, case, tail, message) -> None:
    good = [doc(f"good-{i}", f"Valid document {i} about harbour cranes.") for i in range(2)]
    before = await client.count("strict", "stdlib_like")
    assert before >= 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.ingest(good + tail, tenant="strict", collection="stdlib_like")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert "nothing from this stream was written" in err.value.details()
    assert await client.count("strict", "stdlib_like") == before


@pytest.mark.usefixtures("strict_collection")
async def test_one_stream_one_collection(client: Client) -> None:
    docs = [doc("a", "first document"), doc("b", "second document")]
    before = await client.count("strict", "stdlib_like")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.ingest(docs, tenant="strict", collections=["stdlib_like", "other_collection"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[1]: collection 'other_collection' differs from 'stdlib_like'" in err.value.details()
    assert await client.count("strict", "stdlib_like") == before


async def test_bad_collection_name_and_new_collection_untouched(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.ingest([doc("a", "text")], collection="no spaces-allowed")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid name" in err.value.details()
    # A stream into a new collection that fails validation does not even create the collection.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.ingest([doc("a", "text"), doc("", "text")], collection="never_created")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.search("anything", collection="never_created")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "collection 'never_created' does not exist" in err.value.details()


async def test_stream_above_the_byte_limit_is_resource_exhausted(client: Client) -> None:
    settings = client.service.settings
    saved = settings.max_ingest_bytes
    settings.max_ingest_bytes = 2048
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.ingest([doc(f"big-{i}", "word " * 300) for i in range(3)], tenant="big", collection="limits")
    finally:
        settings.max_ingest_bytes = saved
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "documents[1]: the stream carries more than 2048 bytes" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await client.search("word", tenant="big", collection="limits")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_empty_stream_is_a_no_op(client: Client) -> None:
    r = await client.ingest([])
    assert (r.documents_received, r.documents_written, r.chunks_written) == (0, 0, 0)


async def test_default_collection_exists_from_the_start(client: Client) -> None:
    assert await client.search("anything at all", tenant="brand-new", min_score=-1) == []


@pytest.mark.parametrize(
    ("request_kwargs", "code", "message"),
    [
        ({"query": ""}, grpc.StatusCode.INVALID_ARGUMENT, "query is empty"),
        ({"query": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "query is empty"),
        ({"query": "q" * 8193}, grpc.StatusCode.INVALID_ARGUMENT, "query is 8193 characters; at most 8192"),
        ({"query": "q", "top_k": 101}, grpc.StatusCode.INVALID_ARGUMENT, "top_k 101 exceeds this service's maximum of 100"),
        ({"query": "q", "mode": 7}, grpc.StatusCode.INVALID_ARGUMENT, "search mode 7 is not supported"),
        ({"query": "q", "min_score": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "min_score is NaN"),
        ({"query": "q", "collection": "1bad"}, grpc.StatusCode.INVALID_ARGUMENT, "is not a valid name"),
        ({"query": "q", "collection": "missing_one"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    ],
)
async def test_search_validation(client: Client, request_kwargs, code, message) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.stub.Search(retrieval_pb2.SearchRequest(**request_kwargs), timeout=30)
    assert err.value.code() == code
    assert message in err.value.details()


async def test_invalid_tenant_header_is_refused(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.search("anything", tenant="not a tenant!")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_collection_of_another_model_is_failed_precondition(client: Client) -> None:
    foreign = MilvusStore(client.service.settings.milvus_uri, model_name="some-other-model", dimension=768)
    await foreign.ensure_collection("foreign_model", create=True)
    for call in (
        client.search("anything", collection="foreign_model"),
        client.ingest([doc("d", "text")], collection="foreign_model"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "holds embeddings of some-other-model (768-d)" in err.value.details()
        assert "sentence-transformers/all-MiniLM-L6-v2 (384-d)" in err.value.details()
    # The service's own client still works afterwards.
    assert await client.search("anything", tenant="brand-new", min_score=-1) == []


async def test_concurrent_streams_write_a_document_once(client: Client) -> None:
    text = prose("tidal power", 30)
    replies = await asyncio.gather(*(client.ingest([doc("tides", text)], tenant="race", collection="race") for _ in range(2)))
    assert sorted((r.documents_written, r.documents_unchanged) for r in replies) == [(0, 1), (1, 0)]
    n = await client.count("race", "race", "tides")
    assert sum(r.chunks_written for r in replies) == n
    assert [r["chunk_index"] for r in await client.rows("race", "race", "tides")] == list(range(n))


async def test_a_stream_that_never_ends_writes_nothing(client: Client) -> None:
    async def requests() -> AsyncIterator[retrieval_pb2.IngestDocumentsRequest]:
        for i in range(3):
            yield retrieval_pb2.IngestDocumentsRequest(document=doc(f"half-{i}", "Half sent."))
        await asyncio.sleep(3600)  # the client stalls; its deadline expires

    default = client.service.settings.default_collection
    before = await client.count("stalled", default)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.stub.IngestDocuments(requests(), metadata=md("stalled"), timeout=2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.5)
    assert await client.count("stalled", default) == before == 0
