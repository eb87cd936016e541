"""The extractive provider through the real router, and its BM25 sentence scoring."""

from __future__ import annotations

import re
from collections import Counter

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm.providers.extractive import Sentence, bm25_scores, split_sentences, terms
from agentmesh.services.runtime.tokens import count_tokens
from tests.llm.support import chunk, router, stream, user

CONTEXT = [
    chunk(1, "json", "The json module encodes and decodes JSON. json.dumps(obj) serializes obj to a JSON formatted "
                     "str. Use indent to pretty-print."),
    chunk(2, "pathlib", "pathlib offers classes representing filesystem paths. Path.read_text() returns the decoded "
                        "contents of the file as a string."),
    chunk(3, "csv", "The csv module reads and writes tabular data in CSV format. csv.reader returns a reader object "
                    "which iterates over lines."),
]


async def test_extractive_answer_quotes_the_best_sentences_with_citations():
    question = "How do I read the contents of a file as a string?"
    async with router(provider="extractive") as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user(question)], context=CONTEXT))

    assert result.error is None
    meta = result.metadata
    assert (meta.provider, meta.model, meta.is_llm) == ("extractive", "extractive", False)
    assert "not written by a language model" in meta.notice and "quotes" in meta.notice
    # The best sentence comes first, from chunk 2, cited [2]; its citation precedes its text.
    assert result.text.startswith("Path.read_text() returns the decoded contents of the file as a string [2].")
    kinds = result.kinds()
    assert kinds[0] == "metadata" and kinds[1] == "citation" and kinds[-2:] == ["usage", "finish"]
    citations = result.of("citation")
    assert citations[0].index == 2 and citations[0].chunk == CONTEXT[1]
    cited, text = set(), ""
    for event in result.events:  # every [n] in the text was preceded by the citation of chunk n
        if event.HasField("citation"):
            cited.add(event.citation.index)
        elif event.HasField("text_delta"):
            text += event.text_delta.text
            assert {int(n) for n in re.findall(r"\[(\d+)\]", text)} <= cited
    assert len(result.of("text_delta")) >= 3  # streamed in word groups, not one blob
    assert not result.of("tool_call_delta")
    usage = result.of("finish")[0].usage
    assert usage.output_tokens == count_tokens(result.text)
    assert usage.input_tokens == count_tokens(question) + sum(count_tokens(c.text) for c in CONTEXT)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert result.of("finish")[0].reason == common_pb2.FINISH_REASON_STOP


async def test_without_context_it_says_it_has_no_sources():
    async with router(provider="extractive") as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("What is a monad?")]))
    assert result.error is None
    assert result.text.startswith("I have no sources to answer from")
    assert not result.of("citation")
    assert result.of("finish")[0].reason == common_pb2.FINISH_REASON_STOP


async def test_max_tokens_stops_the_answer_with_length():
    async with router(provider="extractive") as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(
            messages=[user("How do I read the contents of a file as a string?")], context=CONTEXT,
            options=llm_pb2.GenerationOptions(max_tokens=15)))
    finish = result.of("finish")[0]
    assert finish.reason == common_pb2.FINISH_REASON_LENGTH
    assert 0 < count_tokens(result.text) == finish.usage.output_tokens <= 15


async def test_no_shared_word_says_so_and_quotes_the_top_source():
    async with router(provider="extractive") as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(messages=[user("zebra quokka")], context=CONTEXT))
    assert result.text.startswith("None of the retrieved sources shares a word with the question.")
    assert result.text.endswith("The top source begins: The json module encodes and decodes JSON [1].")


async def test_model_extractive_selects_it_even_when_an_llm_is_configured():
    # The OpenAI base URL points nowhere: a request for it would fail, the extractive one never calls it.
    async with router(provider="openai", openai_base_url="http://127.0.0.1:9/v1", fallback_to_extractive=False) as stub:
        result = await stream(stub, llm_pb2.StreamGenerateRequest(
            model="extractive", messages=[user("csv reader")], context=CONTEXT))
        models = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)
    assert result.error is None and result.metadata.provider == "extractive"
    assert "[3]" in result.text
    assert [(m.name, m.provider, m.is_llm, m.is_default) for m in models.models] == [
        ("gpt-4.1-mini", "openai", True, True), ("extractive", "extractive", False, False)]


async def test_list_models_without_an_llm():
    async with router() as stub:  # provider=auto with nothing configured
        models = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)
    assert [(m.name, m.is_llm, m.is_default) for m in models.models] == [("extractive", False, True)]


def test_bm25_prefers_rare_matching_terms_and_shorter_sentences():
    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat", "the the the the"]
    sentences = [Sentence(t, 1, Counter(terms(t)), len(terms(t))) for t in texts]
    only_cat = bm25_scores(terms("cat"), sentences)
    assert only_cat[2] > only_cat[0] > 0 == only_cat[1] == only_cat[3]  # same tf: the shorter wins (b)
    scores = bm25_scores(terms("the cat"), sentences)
    assert scores[2] > scores[1]  # one rare "cat" outweighs two common "the" (idf)
    assert scores[0] > scores[3]  # four "the" saturate (k1) and cannot match "the" + "cat"


def test_sentence_splitting_keeps_abbreviation_like_dots_and_cuts_long_runs():
    text = "Call json.dumps(obj) to encode. json.loads(s)\n decodes. Then e.g. decode it!\n\nA paragraph " + "word " * 130
    pieces = split_sentences(text)
    assert pieces[:3] == ["Call json.dumps(obj) to encode.", "json.loads(s) decodes.", "Then e.g. decode it!"]
    assert [len(p.split()) for p in pieces[3:]] == [60, 60, 12]
