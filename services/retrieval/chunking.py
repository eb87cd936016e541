"""Split documents into overlapping chunks measured in the embedding model's own tokens.

The whole document is tokenized once (the model's fast Rust tokenizer, with character offsets),
then a greedy pass cuts windows of at most ``chunk_tokens`` tokens:

- structure first: when the caller gives section starts (``breaks``: the headings of a Markdown
  or HTML document, the pages of a PDF), a chunk ends at the last section start inside its
  window, unless that leaves fewer than ``chunk_tokens // 8`` tokens (a lone heading line is
  kept with what follows it); so a chunk never ends inside a section when a section boundary is
  in reach, and small sections are packed together whole;
- otherwise each cut is placed at the best boundary in the second half of the window, in this
  order: paragraph break (a blank line) > sentence end (``.``, ``!``, ``?`` or
  ``:`` before whitespace) > line break > any whitespace > between two tokens (only when a
  "word" is longer than half a window, e.g. a long identifier or URL);
- the next chunk starts up to ``overlap_tokens`` tokens before the cut, at the earliest sentence
  start in that range, else the earliest word start, so the overlap never begins mid-word; the
  overlap never reaches back across a section start (a chunk cut at a section start has none);
- a chunk also never spans more than ``max_chars`` characters (a BERT tokenizer maps a whole
  over-long "word" to one ``[UNK]`` token, so a token budget alone does not bound the text).

Every chunk carries exact offsets: ``text[chunk.start:chunk.end] == chunk.text`` (Python string
indices, i.e. Unicode code points, as the ``Chunk`` message's ``start_char``/``end_char``), and it
begins and ends on a token, so leading and trailing whitespace is never part of a chunk.

Why these numbers: ``all-MiniLM-L6-v2`` reads at most 256 word pieces and silently truncates the
rest; 200 chunk tokens + 32 title tokens + ``[CLS]``/``[SEP]`` leave headroom for the few tokens a
chunk can gain when it is re-tokenized on its own after a mid-word cut. Measured against 128/24
and against no title line, 200/40 with titles gave the best mean nDCG@10 on the two home-made
evaluation sets (``services/retrieval/README.md``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

#: Gap scores, best boundary first.
_PARAGRAPH, _SENTENCE, _LINE, _SPACE, _NONE = 4, 3, 2, 1, 0
_SENTENCE_END = frozenset(".!?:")


@dataclass(frozen=True, slots=True)
class TextChunk:
    """One chunk: ``index`` (0-based position in the document), ``start``/``end`` character offsets
    into the document text, the ``text`` itself and its length in model ``tokens``."""

    index: int
    start: int
    end: int
    text: str
    tokens: int


class Chunker:
    """Splits texts into :class:`TextChunk` lists; see the module docstring for the algorithm.

    ``tokenizer`` must have padding and truncation disabled (see ``Embedder.tokenizer``).
    ``model_max_tokens`` is the model's input limit including ``special_tokens``; the constructor
    raises ``ValueError`` when ``chunk_tokens + title_tokens + special_tokens`` exceeds it or when
    the overlap is not smaller than a chunk.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        model_max_tokens: int,
        chunk_tokens: int = 200,
        overlap_tokens: int = 40,
        title_tokens: int = 32,
        special_tokens: int = 2,
        max_chars: int | None = None,
    ):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
        if not 0 <= overlap_tokens < chunk_tokens:
            raise ValueError(f"overlap_tokens must be in [0, chunk_tokens={chunk_tokens}), got {overlap_tokens}")
        if title_tokens < 0:
            raise ValueError(f"title_tokens must be >= 0, got {title_tokens}")
        budget = chunk_tokens + title_tokens + special_tokens
        if budget > model_max_tokens:
            raise ValueError(
                f"chunk_tokens ({chunk_tokens}) + title_tokens ({title_tokens}) + special tokens ({special_tokens}) "
                f"= {budget} exceeds the embedding model's limit of {model_max_tokens} tokens; the model would "
                "truncate chunks. Lower chunk_tokens."
            )
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.title_tokens = title_tokens
        # ~5 characters per token in English prose; 20 leaves room for code and long words.
        self.max_chars = max_chars or 20 * chunk_tokens

    def split(self, text: str, breaks: Sequence[int] = ()) -> list[TextChunk]:
        """Chunks of ``text`` in order; an empty list when ``text`` has no tokens (e.g. only
        whitespace). ``breaks``: character offsets where sections start (headings, pages), any
        order. Runs in O(tokens): about 40 ms per 100 kB of text on one core, most of it in the
        tokenizer."""
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        n = len(offsets)
        if n == 0:
            return []
        starts = [s for s, _ in offsets]
        ends = [e for _, e in offsets]
        # Token indices that begin a section (the first token at or after each break offset).
        sections = sorted({k for k in (bisect_left(starts, b) for b in breaks) if 0 < k < n})
        chunks: list[TextChunk] = []
        a = 0
        while a < n:
            hi = min(a + self.chunk_tokens, n)
            # Shrink the window until it spans at most max_chars characters.
            hi = min(hi, bisect_right(ends, starts[a] + self.max_chars, a, hi))
            if hi == a:  # one token longer than max_chars: emit it in slices, no overlap
                for piece_start in range(starts[a], ends[a], self.max_chars):
                    piece_end = min(piece_start + self.max_chars, ends[a])
                    chunks.append(TextChunk(len(chunks), piece_start, piece_end, text[piece_start:piece_end], 1))
                a += 1
                continue
            cut = self._section_cut(sections, a, hi)
            if cut is None:
                cut = hi if hi == n else self._best_cut(text, starts, ends, a, hi)
            start, end = starts[a], ends[cut - 1]
            chunks.append(TextChunk(len(chunks), start, end, text[start:end], cut - a))
            if cut == n:
                break
            a = self._next_start(text, starts, ends, sections, a, cut)
        return chunks

    def _section_cut(self, sections: list[int], a: int, hi: int) -> int | None:
        """The last section start in ``[a + chunk_tokens // 8, hi]``, or None (``sections``:
        sorted token indices, all inside the text)."""
        i = bisect_right(sections, hi) - 1
        if i >= 0 and sections[i] >= a + max(1, self.chunk_tokens // 8):
            return sections[i]
        return None

    def with_title(self, title: str, chunk_text: str, section: str = "") -> str:
        """The text actually indexed for a chunk (embedded, and BM25-indexed): its document title
        and section heading (``"title > section"``, cut to ``title_tokens`` tokens) on the first
        line, then the chunk. Titles give chunks from deep inside a document the context of what
        the document is about. With ``title_tokens == 0``: the chunk alone."""
        title = " > ".join(part for part in (title.strip(), section.strip()) if part)
        if not title or self.title_tokens == 0:
            return chunk_text
        offsets = self.tokenizer.encode(title, add_special_tokens=False).offsets
        if len(offsets) > self.title_tokens:
            title = title[: offsets[self.title_tokens - 1][1]]
        return f"{title}\n{chunk_text}"

    @staticmethod
    def _gap_score(text: str, starts: list[int], ends: list[int], k: int) -> int:
        """Quality of a boundary just before token ``k`` (0 < k < n)."""
        gap = text[ends[k - 1] : starts[k]]
        if not gap:
            return _NONE
        newlines = gap.count("\n")
        if newlines >= 2:
            return _PARAGRAPH
        if text[ends[k - 1] - 1] in _SENTENCE_END:
            return _SENTENCE
        return _LINE if newlines else _SPACE

    def _best_cut(self, text: str, starts: list[int], ends: list[int], a: int, hi: int) -> int:
        """Token index to end the chunk at (exclusive), in ``(a + half window, hi]``; the best
        scored boundary, the latest one among equals."""
        lo = a + max(1, (hi - a) // 2)
        best, best_score = hi, -1
        for k in range(hi, lo - 1, -1):
            score = self._gap_score(text, starts, ends, k)
            if score > best_score:
                best, best_score = k, score
                if score == _PARAGRAPH:
                    break
        return best

    def _next_start(self, text: str, starts: list[int], ends: list[int], sections: list[int], a: int,
                    cut: int) -> int:
        """First token of the next chunk: at most ``overlap_tokens`` before ``cut``, after ``a``,
        and not before the last section start at or before ``cut``."""
        if self.overlap_tokens == 0:
            return cut
        i = bisect_right(sections, cut) - 1
        if i >= 0 and sections[i] == cut:
            return cut  # the chunk ended where a section begins: no overlap into it
        lo = max(a + 1, cut - self.overlap_tokens)
        if i >= 0 and sections[i] >= lo:
            return sections[i]
        word_start = None
        for k in range(lo, cut):
            score = self._gap_score(text, starts, ends, k)
            if score >= _SENTENCE:
                return k
            if word_start is None and score >= _SPACE:
                word_start = k
        return word_start if word_start is not None else lo
