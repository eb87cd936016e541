"""Typed filter conditions → Milvus expressions: rendering, escaping and refusals. (Their effect
on real searches is tested in test_service.py.)"""

from __future__ import annotations

import grpc
import pytest

from agentmesh.retrieval.v1 import retrieval_pb2 as pb
from agentmesh.services.retrieval.filters import quote, render
from agentmesh.services.runtime.errors import ServiceError


def meta(key: str, op: int, *values: str) -> pb.FilterCondition:
    return pb.FilterCondition(metadata_key=key, operator=op, values=list(values))


def field(f: int, op: int, *values: str) -> pb.FilterCondition:
    return pb.FilterCondition(document_field=f, operator=op, values=list(values))


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (meta("lang", pb.FILTER_OPERATOR_EQUAL, "en"), 'metadata["lang"] == "en"'),
        (meta("lang", pb.FILTER_OPERATOR_NOT_EQUAL, "en"), '(not exists metadata["lang"] or metadata["lang"] != "en")'),
        (meta("lang", pb.FILTER_OPERATOR_IN, "en", "fr", "en"), '(metadata["lang"] == "en" or metadata["lang"] == "fr")'),
        (meta("lang", pb.FILTER_OPERATOR_NOT_IN, "en"),
         '(not exists metadata["lang"] or not (metadata["lang"] == "en"))'),
        (meta("lang", pb.FILTER_OPERATOR_EXISTS), 'exists metadata["lang"]'),
        (meta("lang", pb.FILTER_OPERATOR_NOT_EXISTS), 'not exists metadata["lang"]'),
        (meta("date", pb.FILTER_OPERATOR_GREATER_OR_EQUAL, "2024-01-01"), 'metadata["date"] >= "2024-01-01"'),
        (meta("date", pb.FILTER_OPERATOR_LESS_THAN, "2025"), 'metadata["date"] < "2025"'),
        (field(pb.DOCUMENT_FIELD_ID, pb.FILTER_OPERATOR_IN, "a", "b"), 'document_id in ["a", "b"]'),
        (field(pb.DOCUMENT_FIELD_SOURCE, pb.FILTER_OPERATOR_NOT_IN, "s"), 'not (source in ["s"])'),
        (field(pb.DOCUMENT_FIELD_TITLE, pb.FILTER_OPERATOR_NOT_EQUAL, "t"), 'title != "t"'),
    ],
)
def test_rendering(condition: pb.FilterCondition, expected: str) -> None:
    assert render([condition]) == f"({expected})"


def test_conditions_are_anded_and_none_is_empty() -> None:
    assert render([]) == ""
    both = render([meta("a", pb.FILTER_OPERATOR_EQUAL, "1"), field(pb.DOCUMENT_FIELD_ID, pb.FILTER_OPERATOR_EQUAL, "d")])
    assert both == '(metadata["a"] == "1") and (document_id == "d")'


def test_values_and_keys_are_quoted_never_spliced() -> None:
    evil = 'x" or tenant != "nobody'
    expr = render([meta('k"] or 1==1 or metadata["k', pb.FILTER_OPERATOR_EQUAL, evil)])
    assert expr == r'(metadata["k\"] or 1==1 or metadata[\"k"] == "x\" or tenant != \"nobody")'
    assert quote("back\\slash\ttab\nline") == r'"back\\slash\ttab\nline"'
    with pytest.raises(ValueError, match="control character"):
        quote("bell\x07")


@pytest.mark.parametrize(
    ("conditions", "message"),
    [
        ([pb.FilterCondition(operator=pb.FILTER_OPERATOR_EQUAL, values=["x"])], "filters[0]: set metadata_key or document_field"),
        ([meta("", pb.FILTER_OPERATOR_EQUAL, "x")], "metadata_key must be 1..128 characters"),
        ([meta("k\x01", pb.FILTER_OPERATOR_EQUAL, "x")], "without control characters"),
        ([meta("k", pb.FILTER_OPERATOR_EQUAL)], "FILTER_OPERATOR_EQUAL takes exactly one value, got 0"),
        ([meta("k", pb.FILTER_OPERATOR_LESS_THAN, "a", "b")], "takes exactly one value, got 2"),
        ([meta("k", pb.FILTER_OPERATOR_IN)], "FILTER_OPERATOR_IN takes 1..100 values, got 0"),
        ([meta("k", pb.FILTER_OPERATOR_IN, *map(str, range(101)))], "takes 1..100 values, got 101"),
        ([meta("k", pb.FILTER_OPERATOR_EXISTS, "x")], "FILTER_OPERATOR_EXISTS takes no values"),
        ([field(pb.DOCUMENT_FIELD_ID, pb.FILTER_OPERATOR_EXISTS)], "applies to metadata keys only"),
        ([field(9, pb.FILTER_OPERATOR_EQUAL, "x")], "document_field 9 is not one of"),
        ([meta("k", pb.FILTER_OPERATOR_UNSPECIFIED, "x")], "operator FILTER_OPERATOR_UNSPECIFIED is not supported"),
        ([meta("k", 99, "x")], "operator 99 is not supported"),
        ([meta("k", pb.FILTER_OPERATOR_EQUAL, "x" * 1025)], "a value is 1025 bytes; at most 1024"),
        ([meta("k", pb.FILTER_OPERATOR_EQUAL, "a\x00b")], "must not contain control characters"),
        ([meta("k", pb.FILTER_OPERATOR_EQUAL, "x")] * 17, "17 filter conditions; at most 16"),
        ([meta("ok", pb.FILTER_OPERATOR_EQUAL, "x"), meta("", pb.FILTER_OPERATOR_EQUAL, "x")], "filters[1]:"),
    ],
)
def test_malformed_conditions_are_invalid_argument(conditions: list, message: str) -> None:
    with pytest.raises(ServiceError) as err:
        render(conditions)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.message
