"""The extractive provider: answers without a language model by quoting the context.

It is what the router uses when no LLM is configured, and its last fallback. It never calls
a tool and says so plainly in its metadata (``is_llm=false`` and a ``notice``).

How an answer is built:
1. The question is the content of the last ``ROLE_USER`` message.
2. Every context chunk is split into sentences: paragraphs at blank lines, then at ``. ! ?``
   followed by whitespace, except after common abbreviations (``e.g.``, ``i.e.``, ``etc.``...) and
   single-letter initials; whitespace is collapsed; a sentence longer than
   :data:`MAX_SENTENCE_WORDS` words is cut into pieces of that size so code listings without full
   stops stay quotable. (Lower-case sentence starts are common in API docs: ``json.dumps(obj)
   serializes...``, so a capital letter is not required.)
3. Sentences are scored against the question with Okapi BM25 — Robertson & Zaragoza, "The
   Probabilistic Relevance Framework: BM25 and Beyond" (Foundations and Trends in IR 3(4), 2009) —
   with the usual ``k1 = 1.2``, ``b = 0.75`` and Lucene's non-negative IDF
   ``ln(1 + (N - df + 0.5) / (df + 0.5))``, over lower-cased ``\\w+`` terms; each sentence is one
   BM25 document and each distinct question term counts once.
4. Up to :data:`MAX_SENTENCES` sentences are quoted, best first, keeping only those scoring at
   least :data:`RELATIVE_CUTOFF` of the best. Each ends with ``[n]``, n being the 1-based position
   of its chunk in ``context``; a ``citation`` event for chunk n precedes the first sentence citing it.
   When no sentence shares a term with the question, the answer says so and quotes the first
   sentence of the first chunk (retrieval's best match).
5. The text is streamed in groups of :data:`WORDS_PER_DELTA` words, and stops early (finish
   reason LENGTH) at the last whole word that keeps the output within ``max_tokens``.

Usage is counted with the mesh's token counter (:mod:`agentmesh.services.runtime.tokens`, an
approximation of LLM tokens): input = the tokens of every message's content plus every context
chunk's text (everything the provider reads), output = the tokens of the text it sent.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm.providers.base import Batch, GenerationRequest, Provider, finish_events
from agentmesh.services.runtime.tokens import count_tokens

FinishReason = common_pb2.FinishReason

#: BM25 term-frequency saturation and length normalisation (Robertson & Zaragoza 2009, §3.3).
K1 = 1.2
B = 0.75
#: At most this many sentences are quoted.
MAX_SENTENCES = 3
#: A sentence is quoted only if it scores at least this fraction of the best sentence.
RELATIVE_CUTOFF = 0.25
#: Longest quotable sentence, in whitespace-separated words; longer ones are cut into pieces.
MAX_SENTENCE_WORDS = 60
#: Words per streamed text delta.
WORDS_PER_DELTA = 4

NOTICE = (
    "This answer was not written by a language model: the extractive provider quotes the sentences "
    "of the retrieved sources that best match the question, with [n] marking the source quoted."
)
NO_SOURCES = (
    "I have no sources to answer from: no documents were retrieved for this question, and without "
    "a language model configured I can only quote retrieved documents."
)
NO_MATCH = "None of the retrieved sources shares a word with the question. The top source begins:"

_TERM = re.compile(r"\w+")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
#: A piece ending like this does not end a sentence ("e.g. foo", "J. Smith").
_NOT_AN_END = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|approx|incl|resp|Mr|Mrs|Ms|Dr|St|No)|(?<![\w.])[A-Za-z])\.$", re.I)
_WORD_GROUP = re.compile(r"\S+\s*")


@dataclass(frozen=True)
class Sentence:
    text: str
    chunk: int  # 1-based position of the chunk in the context
    terms: Counter[str]
    length: int  # number of terms


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (see step 2 of the module docstring)."""
    out: list[str] = []
    for paragraph in _PARAGRAPH.split(text):
        pieces: list[str] = []
        for piece in _SENTENCE_END.split(" ".join(paragraph.split())):
            if pieces and _NOT_AN_END.search(pieces[-1]):
                pieces[-1] += " " + piece
            else:
                pieces.append(piece)
        for sentence in pieces:
            words = sentence.split()
            for start in range(0, len(words), MAX_SENTENCE_WORDS):
                piece = " ".join(words[start : start + MAX_SENTENCE_WORDS])
                if _TERM.search(piece):
                    out.append(piece)
    return out


def terms(text: str) -> list[str]:
    """Lower-cased ``\\w+`` terms of ``text``."""
    return [t.lower() for t in _TERM.findall(text)]


def bm25_scores(query: Sequence[str], sentences: Sequence[Sentence]) -> list[float]:
    """Okapi BM25 score of each sentence for the distinct terms of ``query`` (module docstring)."""
    n = len(sentences)
    if n == 0:
        return []
    avg_len = sum(s.length for s in sentences) / n or 1.0
    unique = set(query)
    df = {t: sum(1 for s in sentences if t in s.terms) for t in unique}
    idf = {t: math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in unique}
    scores = []
    for s in sentences:
        norm = K1 * (1 - B + B * s.length / avg_len)
        scores.append(sum(idf[t] * s.terms[t] * (K1 + 1) / (s.terms[t] + norm) for t in unique if s.terms[t]))
    return scores


def _cite(sentence: str, n: int) -> str:
    # The marker goes before a final full stop so it reads "… a JSON string [1]."
    if sentence[-1] in ".!?":
        return f"{sentence[:-1]} [{n}]{sentence[-1]}"
    return f"{sentence} [{n}]"


def select(question: str, context: Sequence[common_pb2.Chunk]) -> list[tuple[str, int | None]]:
    """The answer as segments ``(text, cited chunk number or None)``, in order."""
    if not context:
        return [(NO_SOURCES, None)]
    sentences = [
        Sentence(text, n, Counter(ts), len(ts))
        for n, chunk in enumerate(context, start=1)
        for text in split_sentences(chunk.text)
        if (ts := terms(text))
    ]
    if not sentences:
        return [(NO_SOURCES, None)]
    scores = bm25_scores(terms(question), sentences)
    best = max(scores)
    if best <= 0:
        return [(NO_MATCH, None), (_cite(sentences[0].text, sentences[0].chunk), sentences[0].chunk)]
    ranked = sorted(range(len(sentences)), key=lambda i: -scores[i])
    chosen = [i for i in ranked[:MAX_SENTENCES] if scores[i] >= RELATIVE_CUTOFF * best]
    return [(_cite(sentences[i].text, sentences[i].chunk), sentences[i].chunk) for i in chosen]


def _fit(text: str, budget: int) -> str:
    """The longest run of whole leading words of ``text`` within ``budget`` tokens."""
    out = ""
    for word in re.findall(r"\s*\S+", text):
        if count_tokens(out + word) > budget:
            break
        out += word
    return out


def plan(
    segments: Sequence[tuple[str, int | None]], max_tokens: int
) -> tuple[list[tuple[str, int | None]], common_pb2.FinishReason.ValueType]:
    """The text deltas of an answer within ``max_tokens`` tokens, each with the chunk
    number to cite just before it (set on the first delta of a citing segment), and the finish
    reason (LENGTH when the budget cut the answer)."""
    out: list[tuple[str, int | None]] = []
    used = 0
    for position, (text, chunk) in enumerate(segments):
        groups = _WORD_GROUP.findall(text)
        deltas = ["".join(groups[i : i + WORDS_PER_DELTA]) for i in range(0, len(groups), WORDS_PER_DELTA)]
        if position:
            deltas[0] = " " + deltas[0]
        for i, delta in enumerate(deltas):
            cite = chunk if i == 0 else None
            cost = count_tokens(delta)
            if used + cost > max_tokens:
                if fitted := _fit(delta, max_tokens - used):
                    out.append((fitted, cite))
                return out, FinishReason.FINISH_REASON_LENGTH
            out.append((delta, cite))
            used += cost
    return out, FinishReason.FINISH_REASON_STOP


class ExtractiveProvider(Provider):
    """The no-LLM provider described in the module docstring."""

    name = "extractive"
    is_llm = False

    def __init__(self) -> None:
        super().__init__("extractive")

    def resolve_model(self, request: GenerationRequest) -> str:
        return self.model  # a model name in the request is meant for an LLM provider

    def metadata(self, request: GenerationRequest) -> llm_pb2.ResponseMetadata:
        meta = super().metadata(request)
        meta.notice = NOTICE
        return meta

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Batch]:
        question = next((m.content for m in reversed(request.messages) if m.role == common_pb2.ROLE_USER), "")
        input_tokens = sum(count_tokens(m.content) for m in request.messages) + sum(
            count_tokens(c.text) for c in request.context
        )
        deltas, reason = plan(select(question, request.context), request.max_tokens)
        output_tokens = 0
        cited: set[int] = set()
        for text, chunk in deltas:
            batch: Batch = []
            if chunk is not None and chunk not in cited:
                cited.add(chunk)
                batch.append(
                    llm_pb2.StreamGenerateResponse(citation=common_pb2.Citation(index=chunk, chunk=request.context[chunk - 1]))
                )
            output_tokens += count_tokens(text)
            batch.append(llm_pb2.StreamGenerateResponse(text_delta=llm_pb2.TextDelta(text=text)))
            yield batch
        yield finish_events(reason, input_tokens, output_tokens)
