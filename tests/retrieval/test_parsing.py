"""Document formats: Markdown headings and offsets, HTML text extraction, PDF pages, JSONL records."""

from __future__ import annotations

import json

import pytest

from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.services.retrieval import parsing
from tests.retrieval.pdfgen import make_pdf

MARKDOWN = (
    "Intro line before any heading.\r\n\r\n"
    "# Field guide\r\n\r\nGeneral text.\r\n\r\n"
    "## Install *quickly*\r\nSteps to install.\r\n\r\n"
    "### On `Linux`\r\napt install it\r\n\r\n"
    "Setext heading\r\n--------------\r\nunder setext\r\n\r\n"
    "```\r\n# not a heading inside code\r\n```\r\n"
)


def test_markdown_headings_offsets_and_paths() -> None:
    parsed = parsing.parse_markdown(MARKDOWN)
    assert "\r" not in parsed.text and parsed.text == MARKDOWN.replace("\r\n", "\n")
    assert [(h.level, h.title) for h in parsed.headings] == [
        (1, "Field guide"), (2, "Install quickly"), (3, "On Linux"), (2, "Setext heading"),
    ]
    for h in parsed.headings:
        line = parsed.text[h.start:].split("\n", 1)[0]
        assert line.lstrip("# ").startswith(h.title.split()[0])
    assert parsed.title == "Field guide"
    assert parsed.breaks() == [h.start for h in parsed.headings]
    linux = parsed.headings[2].start
    assert parsed.section(0, 10) == ""
    assert parsed.section(linux, linux + 5) == "Field guide > Install quickly > On Linux"
    assert parsed.section(parsed.headings[3].start + 20, len(parsed.text)) == "Field guide > Setext heading"


HTML = """<!doctype html><html><head><title>Tide  Tables</title><style>p {color: red}</style>
<script>var secret = "script text";</script></head>
<body><nav><a href="/">Home</a> | <a href="/about">About us</a></nav>
<h1>Tides</h1><p>The <b>moon</b> pulls
  the   oceans.</p><!-- hidden comment -->
<h2>Spring tides</h2><p>Happen at new and full moon.<br>Twice a month.</p>
<ul><li>High water</li><li>Low  water</li></ul>
<table><tr><th>Port</th><th>Range</th></tr><tr><td>Brest</td><td>7 m</td></tr></table>
<pre>code   keeps
   its spacing</pre>
<aside>Advertisement</aside><footer>Copyright 2024</footer></body></html>"""


def test_html_visible_text_structure_and_title() -> None:
    parsed = parsing.parse_html(HTML)
    text = parsed.text
    for hidden in ("script text", "color: red", "Home", "About us", "hidden comment", "Advertisement", "Copyright"):
        assert hidden not in text
    assert "The moon pulls the oceans." in text  # inline markup and whitespace collapsed
    assert "Happen at new and full moon.\nTwice a month." in text
    assert "- High water\n- Low water" in text
    assert "Port | Range\nBrest | 7 m" in text
    assert "code   keeps\n   its spacing" in text  # <pre> kept verbatim
    assert "\n\nSpring tides\n\n" in text  # block elements are paragraphs
    assert parsed.title == "Tide Tables"
    assert [(h.level, h.title) for h in parsed.headings] == [(1, "Tides"), (2, "Spring tides")]
    assert all(text[h.start:].startswith(h.title) for h in parsed.headings)
    spring = parsed.headings[1].start
    assert parsed.section(spring + 20, spring + 40) == "Tides > Spring tides"


def test_html_title_falls_back_to_first_h1_and_deep_nesting_is_fine() -> None:
    deep = "<div>" * 5000 + "<h1>Deep title</h1><p>deep text</p>" + "</div>" * 5000
    parsed = parsing.parse_html(deep)
    assert parsed.title == "Deep title"
    assert parsed.text == "Deep title\n\ndeep text"


def test_pdf_pages_title_and_page_sections() -> None:
    data = make_pdf([["Basalt is a volcanic rock (mafic).", "It cools quickly."], ["Granite cools slowly."]],
                    title="Rock notes")
    parsed = parsing.parse_pdf(data)
    assert parsed.text == "Basalt is a volcanic rock (mafic).\nIt cools quickly.\n\nGranite cools slowly."
    assert parsed.title == "Rock notes"
    second = parsed.text.index("Granite")
    assert parsed.pages == [0, second]
    assert parsed.breaks() == [second]
    assert parsed.section(0, 10) == "p. 1"
    assert parsed.section(second, len(parsed.text)) == "p. 2"
    assert parsed.section(0, len(parsed.text)) == "p. 1-2"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello, not a pdf", "does not start with %PDF-"),
        (b"%PDF-1.4\nthis is garbage\n%%EOF", "the PDF cannot be read"),
        (make_pdf([[], []]), "have no extractable text"),
    ],
)
def test_unreadable_pdfs_are_value_errors(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parsing.parse_pdf(data)


def test_parse_dispatches_on_format_and_decodes_content() -> None:
    md = retrieval_pb2.Document(format=retrieval_pb2.DOCUMENT_FORMAT_MARKDOWN, content="\ufeff# Title\n\nbody".encode())
    assert parsing.parse(md).headings[0].title == "Title"
    assert parsing.parse(retrieval_pb2.Document(text="plain # not a heading")).headings == []
    bad = retrieval_pb2.Document(format=retrieval_pb2.DOCUMENT_FORMAT_HTML, content=b"<p>caf\xe9</p>")
    with pytest.raises(ValueError, match=r"content is not valid UTF-8 \(byte 6\)"):
        parsing.parse(bad)


def _jsonl(*lines: object) -> retrieval_pb2.Document:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    return retrieval_pb2.Document(format=retrieval_pb2.DOCUMENT_FORMAT_JSONL, text=text, title="Default title",
                                  source="file://records.jsonl", metadata={"batch": "7", "lang": "en"})


def test_jsonl_records_become_documents() -> None:
    carrier = _jsonl(
        {"_id": "a1", "title": "Alpha", "text": "first", "metadata": {"year": 2021, "lang": "fr"}},
        "",
        {"id": 42, "text": "second", "author": "Ann", "tags": ["x", "y"], "draft": True, "skip": None},
    )
    records = parsing.parse_jsonl(carrier)
    assert [r.line for r in records] == [1, 3]
    a, b = (r.document for r in records)
    assert (a.id, a.title, a.source, a.text) == ("a1", "Alpha", "file://records.jsonl", "first")
    assert dict(a.metadata) == {"batch": "7", "lang": "fr", "year": "2021"}
    assert (b.id, b.title, b.text) == ("42", "Default title", "second")
    assert dict(b.metadata) == {"batch": "7", "lang": "en", "author": "Ann", "tags": '["x","y"]', "draft": "true"}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (({"id": "a", "text": "ok"}, "{not json"), "line 2 is not valid JSON"),
        (("[1, 2]",), "line 1 is a JSON list, not an object"),
        (({"text": "no id"},), 'line 1 has no "id"'),
        (({"id": True, "text": "bool id"},), 'line 1 has no "id"'),
        (({"id": "a"},), 'line 1 has no "text" string'),
        (({"id": "a", "text": "t", "title": 3},), 'line 1: "title" must be a string'),
        (({"id": "a", "text": "t", "metadata": [1]},), 'line 1: "metadata" must be an object'),
        (("", "  "), "has no records"),
    ],
)
def test_bad_jsonl_names_the_line(lines: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parsing.parse_jsonl(_jsonl(*lines))
