"""Chunking with the real all-MiniLM-L6-v2 tokenizer: offsets, token limits, overlap, boundaries."""

from __future__ import annotations

import time

import pytest

from agentmesh.services.retrieval.chunking import Chunker
from agentmesh.services.retrieval.corpus import stdlib_documents


def _prose(paragraphs: int = 40, sentences: int = 7) -> str:
    """Paragraphs of distinct, ordinary sentences (each 10-20 tokens)."""
    words = ["socket", "buffer", "timeout", "handler", "parser", "queue", "thread", "stream", "record", "index"]
    out = []
    for p in range(paragraphs):
        out.append(" ".join(
            f"The {words[(p + s) % 10]} number {p * sentences + s} reads {s + 2} values from the "
            f"{words[(p * s) % 10]} and returns them to the caller."
            for s in range(sentences)
        ))
    return "\n\n".join(out)


def _token_count(chunker: Chunker, text: str, special: bool = False) -> int:
    return len(chunker.tokenizer.encode(text, add_special_tokens=special).ids)


def _check_offsets(text: str, chunks) -> None:
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert text[c.start:c.end] == c.text
        assert c.text == c.text.strip(), "chunks start and end on a token, never on whitespace"


@pytest.fixture(scope="module")
def asyncio_doc_text() -> str:
    return next(stdlib_documents(["asyncio"])).text


def test_offsets_are_exact_and_chunks_fit_the_model(chunker: Chunker, embedder, asyncio_doc_text: str) -> None:
    text = asyncio_doc_text
    chunks = chunker.split(text)
    assert len(chunks) > 20
    _check_offsets(text, chunks)
    for c in chunks:
        assert 1 <= c.tokens <= chunker.chunk_tokens
        # What the model reads (title + chunk + [CLS]/[SEP]) is never truncated.
        embedded = chunker.with_title("asyncio — The asyncio package, tracking PEP 3156", c.text)
        assert _token_count(chunker, embedded, special=True) <= embedder.max_tokens


def test_every_token_is_covered_and_overlap_is_bounded(chunker: Chunker, asyncio_doc_text: str) -> None:
    text = asyncio_doc_text
    chunks = chunker.split(text)
    assert chunks[0].start == len(text) - len(text.lstrip())
    assert chunks[-1].end == len(text.rstrip())
    overlaps = 0
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.start > prev.start, "each chunk starts later than the previous one"
        if nxt.start < prev.end:
            overlaps += 1
            assert _token_count(chunker, text[nxt.start:prev.end]) <= chunker.overlap_tokens
        else:
            assert not text[prev.end:nxt.start].strip(), "no text is skipped between chunks"
    assert overlaps >= len(chunks) // 2, "most consecutive chunks share context"


def test_cuts_snap_to_sentences_and_starts_to_words(chunker: Chunker) -> None:
    text = _prose(paragraphs=1, sentences=150)  # one paragraph: only sentence ends to snap to
    chunks = chunker.split(text)
    assert len(chunks) > 10
    _check_offsets(text, chunks)
    for c in chunks[:-1]:
        assert c.text.endswith("."), f"chunk {c.index} ends mid-sentence: {c.text[-40:]!r}"
    for c in chunks[1:]:
        assert text[c.start - 1].isspace(), f"chunk {c.index} starts mid-word"
        assert c.text.startswith("The "), f"chunk {c.index} does not start at a sentence: {c.text[:40]!r}"
        assert c.tokens >= chunker.chunk_tokens // 2 or c is chunks[-1]


def test_paragraph_breaks_win_over_sentences(chunker: Chunker) -> None:
    # Paragraphs of ~120 tokens: a cut in the second half of a 200-token window always finds one.
    text = _prose(paragraphs=30, sentences=8)
    chunks = chunker.split(text)
    for c in chunks[:-1]:
        assert text[c.end:c.end + 2] == "\n\n", f"chunk {c.index} does not end at a paragraph"


def test_overlap_zero_gives_disjoint_chunks(embedder) -> None:
    chunker = Chunker(embedder.tokenizer, model_max_tokens=embedder.max_tokens, chunk_tokens=64, overlap_tokens=0)
    text = _prose(paragraphs=5)
    chunks = chunker.split(text)
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.start >= prev.end
        assert not text[prev.end:nxt.start].strip()


def test_unicode_offsets_are_code_points(chunker: Chunker) -> None:
    text = "Ünïcödé façade — naïve café. " * 200 + "Ἀριστοτέλης 東京 🐍 emoji at the end."
    chunks = chunker.split(text)
    _check_offsets(text, chunks)
    assert chunks[-1].text.endswith("emoji at the end.")


def test_words_longer_than_a_chunk_are_cut_between_tokens(chunker: Chunker, embedder) -> None:
    # Many word pieces with no whitespace: the cut must fall between tokens, within the limit.
    text = "prefix " + "ab1.cd2_" * 400 + " suffix"
    chunks = chunker.split(text)
    assert len(chunks) > 2
    _check_offsets(text, chunks)
    for c in chunks:
        assert c.tokens <= chunker.chunk_tokens
        assert _token_count(chunker, c.text, special=True) <= embedder.max_tokens


def test_a_single_huge_token_is_sliced_by_characters(chunker: Chunker) -> None:
    # BERT maps a "word" over 100 characters to one [UNK]; max_chars still bounds the chunk.
    blob = "Q" * (chunker.max_chars * 2 + 123)
    text = f"Before the blob. {blob} After the blob."
    chunks = chunker.split(text)
    _check_offsets(text, chunks)
    assert all(len(c.text) <= chunker.max_chars for c in chunks)
    assert "".join(c.text for c in chunks if set(c.text) == {"Q"}) == blob


def test_blank_text_has_no_chunks(chunker: Chunker) -> None:
    assert chunker.split("") == []
    assert chunker.split(" \n\t \n") == []


def test_short_text_is_one_chunk(chunker: Chunker) -> None:
    chunks = chunker.split("  json.loads parses a JSON document.  ")
    assert [(c.start, c.end, c.text) for c in chunks] == [(2, 36, "json.loads parses a JSON document.")]


def test_100_kb_document_is_fast(chunker: Chunker, asyncio_doc_text: str) -> None:
    text = (asyncio_doc_text * 2)[:100_000]
    t0 = time.perf_counter()
    chunks = chunker.split(text)
    elapsed = time.perf_counter() - t0
    _check_offsets(text, chunks)
    assert elapsed < 1.0, f"chunking 100 kB took {elapsed:.2f} s"


def test_long_titles_are_cut_to_the_title_budget(chunker: Chunker) -> None:
    title = " ".join(f"word{i}" for i in range(200))
    embedded = chunker.with_title(title, "chunk body")
    head, body = embedded.split("\n", 1)
    assert body == "chunk body"
    assert title.startswith(head)
    assert _token_count(chunker, head) <= chunker.title_tokens
    assert chunker.with_title("", "chunk body") == "chunk body"


def test_settings_that_would_truncate_are_refused(embedder) -> None:
    with pytest.raises(ValueError, match="exceeds the embedding model's limit of 256 tokens"):
        Chunker(embedder.tokenizer, model_max_tokens=embedder.max_tokens, chunk_tokens=250)
    with pytest.raises(ValueError, match="overlap_tokens"):
        Chunker(embedder.tokenizer, model_max_tokens=embedder.max_tokens, chunk_tokens=100, overlap_tokens=100)


# -- structure (section starts from headings or pages) -----------------------------------------

def _sections_doc(sizes: list[int]) -> tuple[str, list[int]]:
    """Markdown-like text: one '## Section i' heading per entry, followed by ``sizes[i]`` sentences."""
    parts, breaks, pos = [], [], 0
    for i, n in enumerate(sizes):
        body = " ".join(f"Sentence {j} of section {i} talks about item {i * 100 + j}." for j in range(n))
        block = f"## Section {i}\n\n{body}"
        if parts:
            pos += 2
        breaks.append(pos)
        parts.append(block)
        pos += len(block)
    return "\n\n".join(parts), breaks


def test_chunks_end_where_sections_begin_and_never_overlap_into_them(chunker: Chunker) -> None:
    text, breaks = _sections_doc([3, 25, 2, 40, 4])
    chunks = chunker.split(text, breaks)
    _check_offsets(text, chunks)
    for c in chunks[:-1]:
        inside = [b for b in breaks if c.start < b < c.end]
        # A chunk holding a section start beyond its first chunk_tokens // 8 tokens ends right
        # where a (later) section begins: sections are packed whole, never cut at their start.
        if any(_token_count(chunker, text[c.start:b]) >= chunker.chunk_tokens // 8 for b in inside):
            assert text[c.end:].lstrip().startswith("## Section"), c.index
    starts = {c.start for c in chunks}
    assert sum(b in starts for b in breaks[1:]) >= 3, "most sections start a chunk"
    for prev, nxt in zip(chunks, chunks[1:]):
        if nxt.start in breaks:
            assert nxt.start >= prev.end, "no overlap into a new section"


def test_small_sections_are_packed_together(chunker: Chunker) -> None:
    text, breaks = _sections_doc([2] * 12)  # ~12 sections of ~30 tokens
    chunks = chunker.split(text, breaks)
    assert len(chunks) < 6
    for c in chunks:
        assert c.text.startswith("## Section"), "each chunk starts at a section"


def test_breaks_do_not_change_text_without_them(chunker: Chunker, asyncio_doc_text: str) -> None:
    assert chunker.split(asyncio_doc_text, []) == chunker.split(asyncio_doc_text)
    # Breaks outside the text or at its very start are ignored.
    assert chunker.split("A short text.", [0, 10_000]) == chunker.split("A short text.")


def test_section_goes_into_the_indexed_title_line(chunker: Chunker) -> None:
    assert chunker.with_title("Guide", "body", "Install > Linux") == "Guide > Install > Linux\nbody"
    assert chunker.with_title("", "body", "p. 3") == "p. 3\nbody"
    untitled = Chunker(chunker.tokenizer, model_max_tokens=256, title_tokens=0)
    assert untitled.with_title("Guide", "body", "Install") == "body"
