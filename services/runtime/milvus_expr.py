"""Milvus boolean-expression literals, shared by every service that builds Milvus filters
(retrieval's documents, memory's facts): the services are the only authors of filter expressions,
and every value they put in one goes through :func:`quote`."""

from __future__ import annotations


def quote(value: str) -> str:
    """``value`` as a double-quoted Milvus filter string literal.

    Escapes backslash, double quote, and ``\\n``/``\\r``/``\\t`` (the escapes both Milvus' and
    Milvus Lite's expression parsers accept). Raises ``ValueError`` for other control characters,
    which no literal can carry; callers validate values before they get here.
    """
    out = []
    for ch in value:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise ValueError(f"control character {ch!r} cannot appear in a filter value")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
