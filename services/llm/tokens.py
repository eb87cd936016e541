"""The router's own token count, used where no provider tokenizer is available.

A *router token* is a maximal run of word characters (``\\w+``: letters, digits, underscore) or a
single character that is neither a word character nor whitespace (punctuation, a bracket, an
operator): ``"json.dumps(obj) [1]"`` is 9 router tokens, ``json . dumps ( obj ) [ 1 ]``.

It is used for two things, and documented as such wherever it shows up:
- the usage of the extractive provider, which is not a language model and has no tokenizer;
- the size of what had already been streamed when a provider stream is cut (providers report
  their own usage only at the end of a stream).

It is not any provider's tokenizer (those cannot be loaded offline): BPE tokenizers split rare
words and identifiers into several tokens, so for code and unusual words this count is lower than
a provider's. Every place that reports it says it is counted this way.
"""

from __future__ import annotations

import re

#: One router token: a run of word characters, or one non-space, non-word character.
TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Router tokens of ``text`` in order (see the module docstring for the definition)."""
    return TOKEN_PATTERN.findall(text)


def count_tokens(text: str) -> int:
    """Number of router tokens in ``text``."""
    return sum(1 for _ in TOKEN_PATTERN.finditer(text))
