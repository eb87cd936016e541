"""Typed filter conditions (``retrieval_pb2.FilterCondition``) → Milvus filter expressions.

The service is the only author of filter expressions: a client sends typed conditions, this
module validates them (INVALID_ARGUMENT naming the condition) and renders them with every value
and metadata key quoted by :func:`quote`; no client string reaches Milvus as expression syntax.
The tenant condition is never built here: :class:`~agentmesh.services.retrieval.store.MilvusStore`
adds it to every expression itself, from the request context.

Conditions apply to document-level fields (the id, source, title and metadata that every chunk
of a document carries), so a condition selects whole documents. Rendering, per operator
(``f`` is ``document_id``/``source``/``title`` or ``metadata["key"]``):

==================  ================================================================
EQUAL               ``f == "v"``
NOT_EQUAL           ``f != "v"``; for a metadata key ``(not exists f or f != "v")``
IN                  ``f in ["a", "b"]``; for a metadata key ``(f == "a" or f == "b")``
                    (Milvus only accepts ``in`` on a field, not on a JSON path)
NOT_IN              ``not (f in [...])``; for a metadata key ``(not exists f or not (...))``
EXISTS/NOT_EXISTS   ``exists f`` / ``not exists f`` (metadata keys only)
ranges              ``f > "v"``, ``f >= "v"``, ``f < "v"``, ``f <= "v"`` (string order)
==================  ================================================================

A document without the key never matches EQUAL, IN or a range, and always matches NOT_EQUAL and
NOT_IN (Milvus alone would drop it: comparisons on a missing JSON key are false).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.services.runtime.errors import ServiceError, invalid_argument
from agentmesh.services.runtime.milvus_expr import quote

MAX_CONDITIONS = 16
MAX_IN_VALUES = 100
MAX_VALUE_BYTES = 1024
MAX_KEY_CHARS = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: What :func:`quote` cannot escape: control characters except tab, line feed, carriage return.
_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_FIELDS = {
    retrieval_pb2.DOCUMENT_FIELD_ID: "document_id",
    retrieval_pb2.DOCUMENT_FIELD_SOURCE: "source",
    retrieval_pb2.DOCUMENT_FIELD_TITLE: "title",
}
_COMPARE = {
    retrieval_pb2.FILTER_OPERATOR_EQUAL: "==",
    retrieval_pb2.FILTER_OPERATOR_NOT_EQUAL: "!=",
    retrieval_pb2.FILTER_OPERATOR_GREATER_THAN: ">",
    retrieval_pb2.FILTER_OPERATOR_GREATER_OR_EQUAL: ">=",
    retrieval_pb2.FILTER_OPERATOR_LESS_THAN: "<",
    retrieval_pb2.FILTER_OPERATOR_LESS_OR_EQUAL: "<=",
}
_SET = (retrieval_pb2.FILTER_OPERATOR_IN, retrieval_pb2.FILTER_OPERATOR_NOT_IN)
_PRESENCE = (retrieval_pb2.FILTER_OPERATOR_EXISTS, retrieval_pb2.FILTER_OPERATOR_NOT_EXISTS)


def _operator_name(op: int) -> str:
    try:
        return retrieval_pb2.FilterOperator.Name(op)
    except ValueError:
        return str(op)


def render_condition(index: int, cond: retrieval_pb2.FilterCondition) -> str:
    """One condition as an expression; INVALID_ARGUMENT naming ``filters[index]`` when it is
    malformed (no field, unknown operator, wrong number of values, bad key or value)."""

    def fail(problem: str) -> ServiceError:
        return invalid_argument(f"filters[{index}]: {problem}")

    which = cond.WhichOneof("field")
    if which is None:
        raise fail("set metadata_key or document_field")
    if which == "metadata_key":
        key = cond.metadata_key
        if not 1 <= len(key) <= MAX_KEY_CHARS or _CONTROL.search(key):
            raise fail(f"metadata_key must be 1..{MAX_KEY_CHARS} characters without control characters")
        target, is_json = f"metadata[{quote(key)}]", True
    else:
        if cond.document_field not in _FIELDS:
            raise fail(f"document_field {cond.document_field} is not one of DOCUMENT_FIELD_ID, _SOURCE, _TITLE")
        target, is_json = _FIELDS[cond.document_field], False

    op, values = cond.operator, list(cond.values)
    for v in values:
        if len(v.encode()) > MAX_VALUE_BYTES:
            raise fail(f"a value is {len(v.encode())} bytes; at most {MAX_VALUE_BYTES}")
        if _VALUE_CONTROL.search(v):
            raise fail("values must not contain control characters other than tab and line breaks")

    if op in _PRESENCE:
        if not is_json:
            raise fail(f"{_operator_name(op)} applies to metadata keys only")
        if values:
            raise fail(f"{_operator_name(op)} takes no values, got {len(values)}")
        return f"exists {target}" if op == retrieval_pb2.FILTER_OPERATOR_EXISTS else f"not exists {target}"
    if op in _COMPARE:
        if len(values) != 1:
            raise fail(f"{_operator_name(op)} takes exactly one value, got {len(values)}")
        expr = f"{target} {_COMPARE[op]} {quote(values[0])}"
        if op == retrieval_pb2.FILTER_OPERATOR_NOT_EQUAL and is_json:
            return f"(not exists {target} or {expr})"
        return expr
    if op in _SET:
        if not 1 <= len(values) <= MAX_IN_VALUES:
            raise fail(f"{_operator_name(op)} takes 1..{MAX_IN_VALUES} values, got {len(values)}")
        quoted = [quote(v) for v in dict.fromkeys(values)]
        member = (
            "(" + " or ".join(f"{target} == {q}" for q in quoted) + ")"
            if is_json else f"{target} in [{', '.join(quoted)}]"
        )
        if op == retrieval_pb2.FILTER_OPERATOR_IN:
            return member
        return f"(not exists {target} or not {member})" if is_json else f"not ({member})"
    raise fail(f"operator {_operator_name(op)} is not supported; use one of EQUAL, NOT_EQUAL, IN, NOT_IN, "
               "EXISTS, NOT_EXISTS, GREATER_THAN, GREATER_OR_EQUAL, LESS_THAN, LESS_OR_EQUAL")


def render(conditions: Sequence[retrieval_pb2.FilterCondition]) -> str:
    """All conditions joined with ``and`` (empty string for none); INVALID_ARGUMENT for more than
    :data:`MAX_CONDITIONS` or any malformed condition."""
    if len(conditions) > MAX_CONDITIONS:
        raise invalid_argument(f"{len(conditions)} filter conditions; at most {MAX_CONDITIONS}")
    return " and ".join(f"({render_condition(i, c)})" for i, c in enumerate(conditions))
