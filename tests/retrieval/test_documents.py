"""Ingestion formats, per-document results, DeleteDocuments and the collections API, against the
real service; plus the refusal of collections written by the first version of the service."""

from __future__ import annotations

import json

import grpc
import pytest
from pymilvus import DataType, MilvusClient

from agentmesh.retrieval.v1 import retrieval_pb2 as pb
from agentmesh.services.retrieval.service import RetrievalService, RetrievalSettings
from tests.retrieval.helpers import Client, doc, md, prose
from tests.retrieval.pdfgen import make_pdf
from tests.support import running_service

FILLER = " ".join(f"Step {i} of this part is described in plain words for the operator." for i in range(9))
MARKDOWN = f"""# Field guide

Welcome to the field guide for the weather station. {FILLER}

## Install

Unpack the mast and the anemometer. {FILLER}

### Linux

Run the zephyrctl daemon with systemd and check the journal. {FILLER}

## Calibrate

Point the vane north and press the barometer button twice. {FILLER}
"""

HTML = """<html><head><title>Station manual</title><script>var leaked = "scriptonly";</script></head>
<body><nav>Menu Home</nav><h1>Manual</h1><p>The hygrometer measures humidity.</p>
<h2>Cleaning</h2><p>Wipe the solar panel with a damp cloth every spring.</p></body></html>"""


def fmt(doc_id: str, format_: int, title: str = "", text: str = "", content: bytes = b"", **metadata: str) -> pb.Document:
    return pb.Document(id=doc_id, title=title, source=f"file://{doc_id}", text=text, content=content, format=format_,
                       metadata=metadata)


async def test_formats_are_parsed_chunked_along_structure_and_cited(client: Client) -> None:
    filler = [f"Line {i} of the handbook repeats the general safety advice." for i in range(20)]
    pdf = make_pdf([["Page one talks about the rain gauge.", *filler], ["Page two covers the thermometer shield.", *filler]],
                   title="Sensor handbook")
    records = "\n".join(json.dumps(r) for r in [
        {"_id": "rec-1", "title": "Log 1", "text": "Wind gusts reached ninety knots overnight.", "station": "north"},
        {"id": "rec-2", "text": "A hailstorm dented the radiation shield.", "metadata": {"station": "south"}},
    ])
    docs = [
        fmt("guide", pb.DOCUMENT_FORMAT_MARKDOWN, content=MARKDOWN.replace("\n", "\r\n").encode()),
        fmt("manual", pb.DOCUMENT_FORMAT_HTML, text=HTML),
        fmt("handbook", pb.DOCUMENT_FORMAT_PDF, content=pdf),
        fmt("", pb.DOCUMENT_FORMAT_JSONL, title="Station log", text=records, batch="7"),
        fmt("plain", pb.DOCUMENT_FORMAT_PLAIN_TEXT, text="Plain notes about the data logger battery."),
    ]
    reply = await client.ingest(docs, tenant="wx", collection="formats")
    assert reply.documents_received == 6 and reply.documents_written == 6
    assert [r.id for r in reply.documents] == ["guide", "manual", "handbook", "rec-1", "rec-2", "plain"]
    assert all(r.status == pb.DOCUMENT_STATUS_WRITTEN and r.chunks >= 1 for r in reply.documents)
    assert reply.embedding_ms > 0 and reply.duration_ms >= reply.embedding_ms

    async def top(query: str, **kwargs) -> pb.SearchResponse:
        r = await client.call("Search", pb.SearchRequest(collection="formats", query=query, top_k=1,
                                                         mode=pb.SEARCH_MODE_SPARSE, **kwargs), "wx")
        return r.chunks[0]

    linux = await top("zephyrctl daemon systemd")
    assert (linux.document_id, linux.section) == ("guide", "Field guide > Install > Linux")
    assert linux.title == "Field guide", "the first h1 titles an untitled Markdown document"
    source = MARKDOWN  # offsets index the source with line endings normalized
    assert source[linux.start_char:linux.end_char] == linux.text and linux.text.startswith("### Linux")

    cleaning = await top("solar panel damp cloth")
    assert (cleaning.document_id, cleaning.title, cleaning.section) == ("manual", "Station manual", "Manual")
    rows = await client.rows("wx", "formats", "manual")
    assert all("scriptonly" not in r["text"] and "Menu" not in r["text"] for r in rows)

    shield = await top("thermometer")
    assert (shield.document_id, shield.title, shield.section) == ("handbook", "Sensor handbook", "p. 2")

    gust = await top("gusts knots", filters=[pb.FilterCondition(metadata_key="station", operator=pb.FILTER_OPERATOR_EQUAL,
                                                                 values=["north"])])
    assert (gust.document_id, gust.title, dict(gust.metadata)) == ("rec-1", "Log 1", {"batch": "7", "station": "north"})
    hail = await top("hailstorm")
    assert (hail.title, hail.source, hail.metadata["station"]) == ("Station log", "file://", "south")

    again = await client.ingest(docs, tenant="wx", collection="formats")
    assert again.documents_unchanged == 6 and again.documents_written == 0
    assert [r.status for r in again.documents] == [pb.DOCUMENT_STATUS_UNCHANGED] * 6
    assert [r.chunks for r in again.documents] == [r.chunks for r in reply.documents]


BAD_FORMATS = [
    ("pdf without bytes", fmt("p", pb.DOCUMENT_FORMAT_PDF, text="not bytes"), "documents[1] (id 'p'): a PDF document needs"),
    ("corrupt pdf", fmt("p", pb.DOCUMENT_FORMAT_PDF, content=b"%PDF-1.7 garbage"), "the PDF cannot be read"),
    ("scanned pdf", fmt("p", pb.DOCUMENT_FORMAT_PDF, content=make_pdf([[]])), "no extractable text"),
    ("text and content", fmt("t", pb.DOCUMENT_FORMAT_MARKDOWN, text="a", content=b"b"), "set text or content, not both"),
    ("unknown format", fmt("u", 42, text="x"), "format 42 is unknown"),
    ("bad utf-8", fmt("h", pb.DOCUMENT_FORMAT_HTML, content=b"<p>\xff</p>"), "content is not valid UTF-8"),
    ("jsonl with id", fmt("j", pb.DOCUMENT_FORMAT_JSONL, text='{"id": "a", "text": "t"}'), "leave its id empty"),
    ("bad jsonl line", fmt("", pb.DOCUMENT_FORMAT_JSONL, text='{"id": "a", "text": "t"}\n{oops'),
     "documents[1]: line 2 is not valid JSON"),
    ("bad jsonl record", fmt("", pb.DOCUMENT_FORMAT_JSONL, text='{"id": "a", "text": "  "}'),
     "documents[1] line 1 (id 'a'): text is empty"),
    ("html without text", fmt("e", pb.DOCUMENT_FORMAT_HTML, text="<script>only()</script>"), "no indexable tokens"),
]


@pytest.mark.parametrize(("case", "bad", "message"), BAD_FORMATS, ids=[c[0] for c in BAD_FORMATS])
async def test_unreadable_documents_fail_the_stream_and_write_nothing(client: Client, case, bad, message) -> None:
    good = doc("good", "A valid note about the weather vane.")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.ingest([good, bad], tenant="strict", collection="badformats")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details() and "nothing from this stream was written" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await client.search("weather vane", tenant="strict", collection="badformats")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_documents_by_id_and_by_filter(client: Client) -> None:
    docs = [doc(f"n{i}", prose(f"topic {i}", 12), year=str(2020 + i % 3)) for i in range(6)]
    await client.ingest(docs, tenant="del", collection="deletes")
    await client.ingest([doc("n0", "The other tenant's n0.")], tenant="other", collection="deletes")
    per_doc = {d.id: await client.count("del", "deletes", d.id) for d in docs}

    async def delete(tenant: str = "del", **kwargs) -> pb.DeleteDocumentsResponse:
        return await client.call("DeleteDocuments", pb.DeleteDocumentsRequest(collection="deletes", **kwargs), tenant)

    r = await delete(document_ids=["n0", "n1", "missing"])
    assert (r.documents_deleted, r.chunks_deleted) == (2, per_doc["n0"] + per_doc["n1"])
    assert await client.count("other", "deletes", "n0") == 1, "another tenant's document with that id stays"
    assert await client.search("topic 0", tenant="del", collection="deletes", top_k=50, min_score=-1,
                               filters=[pb.FilterCondition(document_field=pb.DOCUMENT_FIELD_ID,
                                                           operator=pb.FILTER_OPERATOR_IN, values=["n0", "n1"])]) == []

    year_2022 = [pb.FilterCondition(metadata_key="year", operator=pb.FILTER_OPERATOR_EQUAL, values=["2022"])]
    r = await delete(filters=year_2022)  # n2 and n5
    assert (r.documents_deleted, r.chunks_deleted) == (2, per_doc["n2"] + per_doc["n5"])
    r = await delete(document_ids=["n3", "n4"],
                     filters=[pb.FilterCondition(metadata_key="year", operator=pb.FILTER_OPERATOR_EQUAL, values=["2020"])])
    assert r.documents_deleted == 1 and await client.count("del", "deletes", "n3") == 0
    assert await client.count("del", "deletes") == per_doc["n4"]
    assert (await delete(tenant="other", document_ids=["n4"])).documents_deleted == 0


@pytest.mark.parametrize(
    ("request_kwargs", "code", "message"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "give document_ids, filters or both"),
        ({"document_ids": ["x"] * 1001}, grpc.StatusCode.INVALID_ARGUMENT, "1001 document ids; at most 1000"),
        ({"document_ids": ["ok", "a\tb"]}, grpc.StatusCode.INVALID_ARGUMENT, "document_ids[1]: id must not contain"),
        ({"filters": [pb.FilterCondition(metadata_key="k")]}, grpc.StatusCode.INVALID_ARGUMENT, "filters[0]: operator"),
        ({"document_ids": ["x"], "collection": "no_such_collection"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    ],
)
async def test_delete_documents_errors(client: Client, request_kwargs: dict, code, message: str) -> None:
    await client.ingest([doc("keep", "kept")], tenant="del2", collection="deletes2")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.call("DeleteDocuments", pb.DeleteDocumentsRequest(**{"collection": "deletes2", **request_kwargs}))
    assert err.value.code() == code and message in err.value.details()
    assert await client.count("del2", "deletes2", "keep") == 1


async def test_collections_create_describe_drop(client: Client) -> None:
    chunking = pb.ChunkingConfig(chunk_tokens=64, overlap_tokens=8, title_tokens=0)
    created = await client.call("CreateCollection", pb.CreateCollectionRequest(collection="small", chunking=chunking), "a")
    info = created.collection
    assert created.created and (info.name, info.chunks, info.documents) == ("small", 0, 0)
    assert (info.embedding_model, info.embedding_dimension) == ("sentence-transformers/all-MiniLM-L6-v2", 384)
    assert (info.chunking.chunk_tokens, info.chunking.overlap_tokens, info.chunking.title_tokens) == (64, 8, 0)

    same = await client.call("CreateCollection", pb.CreateCollectionRequest(collection="small", chunking=chunking), "b")
    assert not same.created
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.call("CreateCollection", pb.CreateCollectionRequest(
            collection="small", chunking=pb.ChunkingConfig(chunk_tokens=128)), "a")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already exists with chunk_tokens=64, overlap_tokens=8, title_tokens=0" in err.value.details()

    await client.ingest([doc("long", prose("barometers", 40), title="Barometer book")], tenant="a", collection="small")
    await client.ingest([doc("b1", "one"), doc("b2", "two")], tenant="b", collection="small")
    rows = await client.rows("a", "small", "long")
    assert len(rows) > 4
    assert all(r["search_text"] == r["text"] for r in rows), "title_tokens 0 indexes the chunk alone"
    tokenizer = client.service.embedder.tokenizer
    assert all(len(tokenizer.encode(r["text"], add_special_tokens=False).ids) <= 64 for r in rows)

    described = (await client.call("DescribeCollection", pb.DescribeCollectionRequest(collection="small"), "a")).collection
    assert (described.chunks, described.documents, described.chunking.chunk_tokens) == (len(rows), 1, 64)
    other = (await client.call("DescribeCollection", pb.DescribeCollectionRequest(collection="small"), "b")).collection
    assert (other.chunks, other.documents) == (2, 2)
    default = (await client.call("DescribeCollection", pb.DescribeCollectionRequest(), "a")).collection
    assert (default.name, default.chunking.chunk_tokens, default.chunking.title_tokens) == ("agentmesh_docs", 200, 32)

    dropped = await client.call("DropCollection", pb.DropCollectionRequest(collection="small"), "a")
    assert (dropped.documents_deleted, dropped.chunks_deleted, dropped.collection_removed) == (1, len(rows), False)
    assert await client.count("b", "small") == 2, "the other tenant's documents stay"
    dropped = await client.call("DropCollection", pb.DropCollectionRequest(collection="small"), "b")
    assert (dropped.documents_deleted, dropped.collection_removed) == (2, True)
    for call, request in (("DescribeCollection", pb.DescribeCollectionRequest(collection="small")),
                          ("DropCollection", pb.DropCollectionRequest(collection="small")),
                          ("Search", pb.SearchRequest(collection="small", query="barometers"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.call(call, request, "a")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, call
    # Re-created on the next ingestion, with the service defaults.
    await client.ingest([doc("again", "back again")], tenant="a", collection="small")
    info = (await client.call("DescribeCollection", pb.DescribeCollectionRequest(collection="small"), "a")).collection
    assert (info.chunking.chunk_tokens, info.documents) == (200, 1)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.CreateCollectionRequest(), "collection is empty"),
        (pb.CreateCollectionRequest(collection="bad-name"), "is not a valid name"),
        (pb.CreateCollectionRequest(collection="c1", chunking=pb.ChunkingConfig(chunk_tokens=250)),
         "exceeds the embedding model's limit of 256 tokens"),
        (pb.CreateCollectionRequest(collection="c1", chunking=pb.ChunkingConfig(chunk_tokens=50, overlap_tokens=50)),
         "overlap_tokens must be in [0, chunk_tokens=50)"),
    ],
)
async def test_create_collection_refuses_bad_settings(client: Client, request_, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.call("CreateCollection", request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def _legacy_collection(uri: str, name: str) -> None:
    """A collection as the first version of the service created it: dense only, no BM25 field,
    no schema version, no chunking properties."""
    client = MilvusClient(uri)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("chunk_id", DataType.VARCHAR, max_length=64, is_primary=True)
    schema.add_field("tenant", DataType.VARCHAR, max_length=64, is_partition_key=True)
    schema.add_field("document_id", DataType.VARCHAR, max_length=256)
    schema.add_field("chunk_index", DataType.INT64)
    schema.add_field("text", DataType.VARCHAR, max_length=65535)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=384)
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="AUTOINDEX", metric_type="COSINE")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong", properties={
        "agentmesh.embedding_model": "sentence-transformers/all-MiniLM-L6-v2", "agentmesh.embedding_dim": "384"})
    client.insert(name, [{"chunk_id": f"c{i}", "tenant": t, "document_id": f"d{i}", "chunk_index": 0, "text": "old",
                          "embedding": [0.05] * 384} for i, t in enumerate(["t1", "t1", "t2"])])


async def test_collections_of_the_first_schema_are_refused_until_recreated(client: Client) -> None:
    _legacy_collection(client.service.settings.milvus_uri, "legacy")
    for call, request in (("Search", pb.SearchRequest(collection="legacy", query="old")),
                          ("DescribeCollection", pb.DescribeCollectionRequest(collection="legacy"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.call(call, request, "t1")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "created by an earlier version of the retrieval service" in err.value.details()
        assert "call DropCollection on it as each tenant that has documents in it" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.ingest([doc("new", "new text")], tenant="t1", collection="legacy")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    first = await client.call("DropCollection", pb.DropCollectionRequest(collection="legacy"), "t1")
    assert (first.chunks_deleted, first.collection_removed) == (2, False)
    second = await client.call("DropCollection", pb.DropCollectionRequest(collection="legacy"), "t2")
    assert (second.chunks_deleted, second.collection_removed) == (1, True)
    written = await client.ingest([doc("new", "A fresh document about anemometers.")], tenant="t1", collection="legacy")
    assert written.documents_written == 1
    hits = await client.search("anemometers", tenant="t1", collection="legacy", mode=pb.SEARCH_MODE_SPARSE)
    assert [c.document_id for c in hits] == ["new"]


async def test_start_refuses_a_default_collection_of_the_first_schema(embedder, tmp_path) -> None:
    uri = str(tmp_path / "milvus.db")
    _legacy_collection(uri, "agentmesh_docs")
    with pytest.raises(RuntimeError, match="created by an earlier version of the retrieval service"):
        async with running_service(RetrievalService(RetrievalSettings(milvus_uri=uri), embedder=embedder), timeout_s=60):
            pass


async def test_collection_names_are_checked_on_every_rpc(client: Client) -> None:
    for call, request in (("DescribeCollection", pb.DescribeCollectionRequest(collection="9x")),
                          ("DropCollection", pb.DropCollectionRequest(collection="a b")),
                          ("DeleteDocuments", pb.DeleteDocumentsRequest(collection="x;y", document_ids=["a"]))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.stub.__getattribute__(call)(request, metadata=md("default"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not a valid name" in err.value.details()
