"""Document formats → indexable text with its structure (headings, pages).

Each parser returns a :class:`ParsedText`: the text that is chunked, indexed and returned
(chunk offsets index it), its headings and page starts (the chunker's section boundaries, see
:mod:`~agentmesh.services.retrieval.chunking`), and a title found in the document.

- plain text: as sent.
- Markdown: the CommonMark source itself, line endings normalized to ``\\n``, so chunks and
  their offsets point into the source; headings (ATX and setext) found with ``markdown-it-py``.
- HTML: the visible text, extracted with Beautiful Soup (``html.parser`` backend): ``script``,
  ``style``, ``template``, ``noscript``, ``svg``, ``iframe``, ``nav``, ``footer``, ``aside``,
  form controls and ``<head>`` are dropped; block elements become paragraphs (a blank line) or
  lines, ``<pre>`` keeps its whitespace, other whitespace is collapsed, list items start with
  ``- ``, table cells are joined with `` | ``. ``h1``-``h6`` become headings; ``<title>`` (else
  the first ``h1``) is the title.
- PDF: the text of each page, extracted with ``pypdf``, pages separated by a blank line; each
  page start is a section boundary; the PDF's metadata title is the title.
- JSONL: records → documents, see :func:`parse_jsonl`.

Parsers raise ``ValueError`` with a message a person can act on (bad UTF-8, a corrupt or
encrypted PDF, a PDF without a text layer, a bad JSONL line); the service turns it into
INVALID_ARGUMENT naming the document.
"""

from __future__ import annotations

import io
import json
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from agentmesh.retrieval.v1 import retrieval_pb2

_WS = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Heading:
    """A heading starting at character ``start`` of the text; ``level`` 1 (top) .. 6."""

    start: int
    level: int
    title: str


@dataclass(slots=True)
class ParsedText:
    """Indexable text of a document; ``headings`` sorted by ``start``; ``pages[i]`` is the offset
    where page ``i + 1`` starts (PDF only, else empty); ``title`` found in the document."""

    text: str
    headings: list[Heading] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    title: str = ""
    _paths: list[str] = field(default_factory=list, repr=False)

    def breaks(self) -> list[int]:
        """Offsets where sections start: every heading and every page after the first."""
        return sorted({h.start for h in self.headings} | set(self.pages[1:]))

    def section(self, start: int, end: int) -> str:
        """Label of a chunk spanning ``[start, end)``: the heading path in force at ``start``
        (``"Install > Linux"``), and for PDFs the page range (``"p. 3"``, ``"p. 3-4"``)."""
        parts = []
        if self.headings:
            if not self._paths:
                self._paths = _heading_paths(self.headings)
            i = bisect_right([h.start for h in self.headings], start) - 1
            if i >= 0 and self._paths[i]:
                parts.append(self._paths[i])
        if self.pages:
            first = bisect_right(self.pages, start)
            last = bisect_right(self.pages, max(start, end - 1))
            parts.append(f"p. {first}" if first == last else f"p. {first}-{last}")
        return " · ".join(parts)


def _heading_paths(headings: list[Heading]) -> list[str]:
    """For each heading, the path of titles from the top level down to it."""
    stack: list[Heading] = []
    paths = []
    for h in headings:
        while stack and stack[-1].level >= h.level:
            stack.pop()
        stack.append(h)
        paths.append(" > ".join(x.title for x in stack if x.title))
    return paths


def decode_text(document: retrieval_pb2.Document) -> str:
    """The document's text: ``text``, else ``content`` decoded as UTF-8 (a BOM is dropped)."""
    if document.text or not document.content:
        return document.text
    try:
        return document.content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"content is not valid UTF-8 (byte {exc.start}); send UTF-8 or use `text`") from exc


def parse_markdown(source: str) -> ParsedText:
    from markdown_it import MarkdownIt  # noqa: PLC0415 - only Markdown documents need it

    text = source.replace("\r\n", "\n").replace("\r", "\n")
    line_starts = [0]
    for m in re.finditer("\n", text):
        line_starts.append(m.end())
    tokens = MarkdownIt("commonmark").parse(text)
    headings = []
    for i, tok in enumerate(tokens):
        if tok.type != "heading_open" or tok.map is None:
            continue
        inline = tokens[i + 1] if i + 1 < len(tokens) else None
        words = "".join(c.content for c in (inline.children or []) if c.type in ("text", "code_inline")) if inline else ""
        line_start = line_starts[tok.map[0]]
        # The heading's first non-blank character (up to 3 spaces of indentation are allowed).
        start = line_start + len(text[line_start:]) - len(text[line_start:].lstrip(" "))
        headings.append(Heading(start, int(tok.tag[1]), _WS.sub(" ", words).strip()))
    title = next((h.title for h in headings if h.level == 1 and h.title), "")
    return ParsedText(text, headings, title=title)


# -- HTML -----------------------------------------------------------------------------------------

_DROP = frozenset({
    "script", "style", "template", "noscript", "svg", "math", "canvas", "iframe", "object", "embed", "head",
    "nav", "footer", "aside", "button", "select", "option", "input", "textarea", "audio", "video",
})
#: Block elements followed/preceded by a blank line (a paragraph boundary for the chunker)...
_PARAGRAPH_TAGS = frozenset({
    "p", "pre", "blockquote", "table", "ul", "ol", "dl", "section", "article", "main", "figure", "hr", "body",
    "header", "address", "details",
})
#: ...and those that only start a new line.
_LINE_TAGS = frozenset({
    "div", "li", "tr", "dt", "dd", "br", "form", "fieldset", "summary", "caption", "figcaption", "legend",
    "thead", "tbody", "tfoot",
})
_HEADINGS = {f"h{i}": i for i in range(1, 7)}


class _TextWriter:
    """Accumulates extracted text; separators are requested, and only written between text."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.pending = 0  # newlines to write before the next text (0, 1 or 2)
        self.at_line_start = True

    def separate(self, newlines: int) -> None:
        self.pending = max(self.pending, newlines)

    def write(self, text: str, preformatted: bool = False) -> int:
        """Append ``text`` (whitespace collapsed unless ``preformatted``); returns its start
        offset, or -1 when nothing was written."""
        if not preformatted:
            text = _WS.sub(" ", text)
            if self.at_line_start or self.pending:
                text = text.lstrip(" ")
        if not preformatted and not self.pending and self.parts and self.parts[-1].endswith(" "):
            text = text.lstrip(" ")
        if not text:
            return -1
        if self.pending and self.parts:
            # No trailing spaces before a line break.
            last = self.parts[-1].rstrip(" ")
            self.length -= len(self.parts[-1]) - len(last)
            self.parts[-1] = last
            self.parts.append("\n" * self.pending)
            self.length += self.pending
            self.at_line_start = True
        self.pending = 0
        start = self.length
        self.parts.append(text)
        self.length += len(text)
        self.at_line_start = text.endswith("\n")
        return start

    def text(self) -> str:
        return "".join(self.parts).rstrip()


def parse_html(html: str) -> ParsedText:
    from bs4 import BeautifulSoup, NavigableString, Tag  # noqa: PLC0415 - only HTML documents need it

    soup = BeautifulSoup(html, "html.parser")
    title = ""
    if soup.title is not None:
        title = _WS.sub(" ", soup.title.get_text(" ")).strip()
    out = _TextWriter()
    headings: list[Heading] = []
    # Iterative walk (deeply nested pages would overflow recursion): (node, entering, in_pre).
    stack: list[tuple[Any, bool, bool]] = [(soup, True, False)]
    while stack:
        node, entering, in_pre = stack.pop()
        if isinstance(node, NavigableString):
            if type(node) is NavigableString:  # not a comment, doctype, CDATA...
                out.write(str(node), preformatted=in_pre)
            continue
        if not isinstance(node, Tag):
            continue
        name = (node.name or "").lower()
        if not entering:
            if name in _PARAGRAPH_TAGS:
                out.separate(2)
            elif name in _LINE_TAGS:
                out.separate(1)
            elif name in ("td", "th") and node.find_next_sibling(["td", "th"]) is not None:
                out.write(" | ", preformatted=True)
            continue
        if name in _DROP:
            continue
        if name in _HEADINGS:
            words = _WS.sub(" ", node.get_text(" ")).strip()
            if words:
                out.separate(2)
                start = out.write(words)
                headings.append(Heading(start, _HEADINGS[name], words))
                out.separate(2)
                if not title and name == "h1":
                    title = words
            continue
        if name in _PARAGRAPH_TAGS:
            out.separate(2)
        elif name in _LINE_TAGS:
            out.separate(1)
        if name == "br":
            continue
        if name == "li":
            out.write("- ")
        stack.append((node, False, in_pre))
        child_pre = in_pre or name in ("pre", "textarea")
        stack.extend((child, True, child_pre) for child in reversed(node.contents))
    text = out.text()
    return ParsedText(text, [h for h in headings if h.start < len(text)], title=title)


# -- PDF ------------------------------------------------------------------------------------------

def parse_pdf(data: bytes) -> ParsedText:
    import pypdf  # noqa: PLC0415 - only PDF documents need it
    from pypdf.errors import PdfReadError  # noqa: PLC0415

    if not data.startswith(b"%PDF-"):
        raise ValueError("content is not a PDF (it does not start with %PDF-)")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ValueError("the PDF is encrypted with a password; send a decrypted copy")
        pages = [page.extract_text() or "" for page in reader.pages]
        meta = reader.metadata
        title = str(meta.title).strip() if meta is not None and meta.title else ""
    except ValueError:
        raise
    except (PdfReadError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        raise ValueError(f"the PDF cannot be read: {exc}") from exc
    parts, starts, length = [], [], 0
    for page in pages:
        page = "\n".join(line.rstrip() for line in page.replace("\r\n", "\n").replace("\r", "\n").split("\n")).strip()
        if parts:
            parts.append("\n\n")
            length += 2
        starts.append(length)
        parts.append(page)
        length += len(page)
    text = "".join(parts)
    if not text.strip():
        raise ValueError(f"the PDF's {len(pages)} page(s) have no extractable text (a scan? run OCR on it first)")
    return ParsedText(text, pages=starts, title=title)


def parse(document: retrieval_pb2.Document) -> ParsedText:
    """The indexable text of one (non-JSONL) document; ``ValueError`` when it cannot be read."""
    fmt = document.format
    if fmt == retrieval_pb2.DOCUMENT_FORMAT_PDF:
        return parse_pdf(document.content)
    text = decode_text(document)
    if fmt == retrieval_pb2.DOCUMENT_FORMAT_MARKDOWN:
        return parse_markdown(text)
    if fmt == retrieval_pb2.DOCUMENT_FORMAT_HTML:
        return parse_html(text)
    return ParsedText(text)


# -- JSONL ----------------------------------------------------------------------------------------

def _metadata_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Record:
    """One JSONL line as a document (``line`` is 1-based)."""

    line: int
    document: retrieval_pb2.Document


def parse_jsonl(carrier: retrieval_pb2.Document) -> list[Record]:
    """Documents of a JSONL carrier, one per non-blank line: ``id`` (or ``_id``; a string or an
    integer), ``text`` (a string), optional ``title`` and ``source`` (strings, defaulting to the
    carrier's), optional ``metadata`` (an object) and any other keys: all of these become
    metadata, values that are not strings JSON-encoded, over the carrier's metadata. Raises
    ``ValueError`` naming the line."""
    text = decode_text(carrier)
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {lineno} is not valid JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"line {lineno} is a JSON {type(obj).__name__}, not an object")
        doc_id = obj.pop("id", None)
        alt_id = obj.pop("_id", None)
        doc_id = alt_id if doc_id is None else doc_id
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            raise ValueError(f'line {lineno} has no "id" (or "_id") string or integer')
        body = obj.pop("text", None)
        if not isinstance(body, str):
            raise ValueError(f'line {lineno} has no "text" string')
        strings = {}
        for key in ("title", "source"):
            value = obj.pop(key, None)
            if value is not None and not isinstance(value, str):
                raise ValueError(f'line {lineno}: "{key}" must be a string')
            strings[key] = value
        metadata = dict(carrier.metadata)
        nested = obj.pop("metadata", None)
        if nested is not None and not isinstance(nested, dict):
            raise ValueError(f'line {lineno}: "metadata" must be an object')
        for key, value in [*obj.items(), *(nested or {}).items()]:
            if value is not None:
                metadata[str(key)] = _metadata_value(value)
        records.append(Record(lineno, retrieval_pb2.Document(
            id=str(doc_id),
            title=strings["title"] if strings["title"] is not None else carrier.title,
            source=strings["source"] if strings["source"] is not None else carrier.source,
            text=body,
            metadata=metadata,
            format=retrieval_pb2.DOCUMENT_FORMAT_PLAIN_TEXT,
        )))
    if not records:
        raise ValueError("the JSONL document has no records")
    return records
