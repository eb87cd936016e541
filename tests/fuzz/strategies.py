"""Hypothesis strategies for fuzzing: any protobuf message built from its descriptor, malformed
wire bytes for a message type, and malformed JSON for a transcoded HTTP route.

:class:`MessageFuzzer` walks a ``google.protobuf.Descriptor`` field by field, so it builds every
request type of every contract (and any type added later) without knowing it:

- strings: empty, control characters, bidi and BOM marks, emoji, injection-looking text, known
  names from the running mesh (``vocabulary``, so requests get past "unknown id" checks), valid
  identifiers, and strings of 129 B up to past the 4 MiB message limit;
- integers at the bounds of their type (negatives for the signed ones), small ones (limits,
  ``top_k``...), and any value of the type;
- floats: NaN, ±inf, -0.0, the float32 extremes, anything;
- enums: every declared value and unknown numbers (proto3 enums are open);
- repeated and map fields from empty to past the documented limits (17, 257, 1001 items);
- nested messages to a bounded depth, one member per ``oneof``, ``optional`` fields set to their
  zero value (presence matters);
- ``google.protobuf.Struct`` (tool arguments, JSON Schemas) also as JSON-like objects, with the
  numbers a Struct can carry but JSON cannot (NaN, ±inf).

:meth:`MessageFuzzer.mutated` changes a valid request in one to three places instead.

The proto3 wire format is documented at https://protobuf.dev/programming-guides/encoding/ (tags,
varints, wire types); :func:`malformed_wire` breaks it in each of the ways a decoder must refuse.
"""

from __future__ import annotations

import json
import math
import operator
from typing import Any

from google.protobuf import descriptor as d
from google.protobuf import message as pb_message
from google.protobuf import message_factory, struct_pb2
from hypothesis import strategies as st

FD = d.FieldDescriptor

#: Unicode code points that are valid in UTF-8 (no lone surrogates), control characters included.
CHARACTERS = st.characters(codec="utf-8")

#: Strings that broke parsers, filters, paths and templates somewhere before.
NASTY_STRINGS = [
    "", " ", "\x00", "\n", "\r\n", "\t", "\x7f", "\x1b[31m", "\u202e", "\ufeff", "\u200b", "😀", "é", "e\u0301",
    "..", ".", "/", "../../../../etc/passwd", "%00", "%s%s%n", "{}", "[]", "null", "true", "NaN", "Infinity",
    "-1", "0", "9" * 40, "1e999", "' OR '1'='1", '" or 1==1 or "', 'id in ["x"] or true', "a\\", "\\u0000",
    "${jndi:ldap://x}", "{{7*7}}", "<script>alert(1)</script>", "$(reboot)", "*", "?", "#", "a" * 64, "a" * 65,
    "a" * 128, "a" * 129, "a" * 256, "a" * 257, "__proto__", "default", "-", "_", ":", "@", "a b", "A:B.c-d_e",
    "0" * 32, "f" * 32, "g" * 32, "x-1", "1-1", "0-0", "\u0000abc",
]

#: Sizes of the "huge" strings and byte strings: over the usual 128 / 1024 / 8192 limits, over a
#: chunk of work (70 000), and over the services' 4 MiB message limit (RESOURCE_EXHAUSTED).
HUGE_SIZES = [129, 1025, 8193, 70_000, 4 * 1024 * 1024 + 1]

#: Repetition counts of repeated fields: past 16, 256 and 1000, the documented item limits.
MANY = [17, 257, 1001]

NON_FINITE = [math.nan, math.inf, -math.inf]
FLOAT_EDGES = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 2.0000001, math.nan, math.inf, -math.inf, 3.4028234663852886e38,
               1.401298464324817e-45, 1e300]

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


#: Most bytes one repeated or map field is grown to by repetition: past the 4 MiB message limit,
#: but not so far that building and sending the example takes long.
REPEAT_BUDGET_BYTES = 5 * 1024 * 1024


def _affordable(item: Any, n: int) -> int:
    """How many copies of ``item`` (up to ``n``) fit :data:`REPEAT_BUDGET_BYTES`."""
    if isinstance(item, pb_message.Message):
        size = item.ByteSize()
    elif isinstance(item, str | bytes):
        size = len(item.encode() if isinstance(item, str) else item)
    else:
        size = 8
    return max(1, min(n, REPEAT_BUDGET_BYTES // max(size, 1)))


def bounded_integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers of [low, high], biased to the bounds, the powers of two around them and small values."""
    edges = {low, high, low + 1, high - 1, 0, 1, 2, -1, 5, 16, 17, 100, 101, 256, 257, 1000, 1001, 8192, 8193,
             2**31 - 1, 2**31, 2**32 - 1, -(2**31), 2**53 + 1, 2**63 - 1}
    return st.one_of(
        st.sampled_from(sorted(v for v in edges if low <= v <= high)),
        st.integers(max(low, 0), min(high, 2000)),
        st.integers(low, high),
    )


def message_class(descriptor: d.Descriptor) -> type[pb_message.Message]:
    return message_factory.GetMessageClass(descriptor)


def _messages_in(msg: pb_message.Message):
    """``msg`` and every message set inside it (singular, repeated and map values), depth first."""
    yield msg
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for item in value.values():
                    yield from _messages_in(item)
        elif field.is_repeated:
            for item in value:
                yield from _messages_in(item)
        else:
            yield from _messages_in(value)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _is_synthetic(oneof: d.OneofDescriptor) -> bool:
    """True for the oneof protoc makes for a proto3 ``optional`` field (named ``_<field>``)."""
    return len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name


class MessageFuzzer:
    """Strategies for any message type, with ``vocabulary`` (names known to the mesh under test)
    mixed into every string."""

    def __init__(self, vocabulary: list[str] | tuple[str, ...] = (), max_depth: int = 4):
        self.max_depth = max_depth
        words = sorted(set(vocabulary))
        self.strings = st.one_of(
            st.text(CHARACTERS, max_size=24),
            st.sampled_from(NASTY_STRINGS),
            st.from_regex(r"[A-Za-z0-9._:@-]{1,40}", fullmatch=True),
            *([st.sampled_from(words)] if words else []),
            st.builds(operator.mul, st.sampled_from(["a", "é", "\x00", "😀", "word. ", "\u202e"]),
                      st.sampled_from(HUGE_SIZES)),
        )
        self.byte_strings = st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"", b"%PDF-1.4\n%%EOF", b'{"id": "x", "text": "y"}\n{"id": 1}\n', b"\xff\xfe\x00",
                             b"<html><title>t</title><body>b</body></html>", b"# T\n\ntext", b"\x00" * 16]),
            self.strings.map(lambda s: s.encode("utf-8")),
            st.builds(operator.mul, st.sampled_from([b"\xff", b"%PDF-1.4\n", b"a"]), st.sampled_from(HUGE_SIZES)),
        )
        #: JSON-like objects for google.protobuf.Struct: what a client means to send, plus the
        #: numbers JSON has no form for (NaN, ±inf), which a Struct can still carry.
        json_scalars = (st.none() | st.booleans() | st.sampled_from(FLOAT_EDGES) | st.sampled_from(NON_FINITE)
                        | st.floats() | st.integers(-(2**53), 2**53) | self.strings)
        self.json_objects = st.dictionaries(
            st.sampled_from(words or ["x"]) | st.text(CHARACTERS, max_size=8),
            st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(CHARACTERS, max_size=6), inner, max_size=3), max_leaves=6),
            max_size=4,
        )
        self._cache: dict[tuple[str, int], st.SearchStrategy[pb_message.Message]] = {}

    # ---------------------------------------------------------------------------- messages

    def message(self, descriptor: d.Descriptor, depth: int = 0) -> st.SearchStrategy[pb_message.Message]:
        """Messages of ``descriptor``'s type; at ``max_depth`` their message-typed fields stay unset."""
        key = (descriptor.full_name, depth)
        if key not in self._cache:
            self._cache[key] = st.deferred(lambda: self._build(descriptor, depth))
        return self._cache[key]

    def _build(self, descriptor: d.Descriptor, depth: int) -> st.SearchStrategy[pb_message.Message]:
        generic = self._generic(descriptor, depth)
        if descriptor.full_name == "google.protobuf.Struct":  # tool arguments, JSON Schemas
            return generic | self.json_objects.map(_struct)
        return generic

    def _generic(self, descriptor: d.Descriptor, depth: int) -> st.SearchStrategy[pb_message.Message]:
        fields = [f for f in descriptor.fields if depth < self.max_depth or f.message_type is None]
        oneofs = [o for o in descriptor.oneofs if not _is_synthetic(o)]
        setters = {f.name: self._setter(f, depth) for f in fields}
        cls = message_class(descriptor)

        @st.composite
        def build(draw: st.DrawFn) -> pb_message.Message:
            msg = cls()
            chosen = {o.name: draw(st.sampled_from([None, *o.fields]), label=o.name) for o in oneofs}
            for field in fields:
                group = field.containing_oneof
                if group is not None and not _is_synthetic(group) and chosen.get(group.name) is not field:
                    continue
                if group is None or _is_synthetic(group):
                    if not draw(st.booleans(), label=f"set {field.name}"):
                        continue
                setters[field.name](draw, msg)
            return msg

        return build()

    def mutated(self, seed: pb_message.Message) -> st.SearchStrategy[pb_message.Message]:
        """``seed`` (a valid request) with 0..3 mutations. Each picks a message anywhere in it (the
        request, a repeated element, a map value, a Struct...) and replaces or clears one of its
        fields, or gives a Struct a new entry. Such requests pass most checks and reach the code
        behind them."""

        @st.composite
        def build(draw: st.DrawFn) -> pb_message.Message:
            msg = type(seed)()
            msg.CopyFrom(seed)
            for _ in range(draw(st.integers(0, 3), label="mutations")):
                self._mutate(draw, msg)
            return msg

        return build()

    def _mutate(self, draw: st.DrawFn, msg: pb_message.Message) -> None:
        target = draw(st.sampled_from(list(_messages_in(msg))), label="message mutated")
        if isinstance(target, struct_pb2.Struct) and draw(st.booleans(), label="new Struct entry"):
            target.update(draw(self.json_objects, label="entries"))
            return
        fields = list(target.DESCRIPTOR.fields)
        if not fields:
            return
        field = draw(st.sampled_from(fields), label="field")
        target.ClearField(field.name)
        if draw(st.integers(0, 3), label="clear (0) or replace") > 0:
            self._setter(field, self.max_depth - 2)(draw, target)

    def _setter(self, field: d.FieldDescriptor, depth: int):
        """fn(draw, msg) that sets ``field`` of ``msg`` to a drawn value."""
        name = field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_s = self.scalar(field.message_type.fields_by_name["key"])
            value_field = field.message_type.fields_by_name["value"]
            entries = st.dictionaries(key_s, self.value(value_field, depth + 1), max_size=4)
            if field.message_type.fields_by_name["key"].type == FD.TYPE_STRING:
                many_keys = st.builds(lambda v, n: {f"k{i}": v for i in range(_affordable(v, n))},
                                      self.value(value_field, self.max_depth), st.sampled_from(MANY))
                entries = entries | many_keys

            def set_map(draw, msg):
                target = getattr(msg, name)
                for k, v in draw(entries, label=name).items():
                    if value_field.message_type is not None:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v

            return set_map
        item = self.value(field, depth + 1)
        if field.is_repeated:
            many = st.sampled_from(MANY[:2] if field.message_type is not None else MANY)
            items = st.lists(item, max_size=5) | st.builds(lambda x, n: [x] * _affordable(x, n), item, many)

            def set_repeated(draw, msg):
                values = draw(items, label=name)
                target = getattr(msg, name)
                if field.message_type is not None:
                    for v in values:
                        target.add().CopyFrom(v)
                else:
                    target.extend(values)

            return set_repeated
        if field.message_type is not None:

            def set_message(draw, msg):
                getattr(msg, name).CopyFrom(draw(item, label=name))

            return set_message

        def set_scalar(draw, msg):
            setattr(msg, name, draw(item, label=name))

        return set_scalar

    def value(self, field: d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.message_type is not None:
            return self.message(field.message_type, depth)
        return self.scalar(field)

    def scalar(self, field: d.FieldDescriptor) -> st.SearchStrategy[Any]:
        t = field.type
        if t == FD.TYPE_STRING:
            return self.strings
        if t == FD.TYPE_BYTES:
            return self.byte_strings
        if t == FD.TYPE_BOOL:
            return st.booleans()
        if t == FD.TYPE_FLOAT:
            return st.sampled_from(FLOAT_EDGES) | st.floats(width=32)
        if t == FD.TYPE_DOUBLE:
            return st.sampled_from(FLOAT_EDGES) | st.floats()
        if t == FD.TYPE_ENUM:
            known = st.sampled_from([v.number for v in field.enum_type.values])
            return known if field.enum_type.is_closed else known | bounded_integers(-(2**31), 2**31 - 1)
        if t in _INT_RANGES:
            return bounded_integers(*_INT_RANGES[t])
        raise NotImplementedError(f"no strategy for field {field.full_name} of type {t}")


# -------------------------------------------------------------------------------- wire bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _broken_field(field: d.FieldDescriptor) -> st.SearchStrategy[bytes]:
    """Encodings of ``field`` a decoder must refuse: invalid UTF-8 in a string, a length past
    the end, a truncated varint or fixed value, a group start never closed, a nested message
    that is itself garbage."""
    n = field.number
    options = [
        st.just(_tag(n, 2) + _varint(1000) + b"abc"),  # length past the end
        st.just(_tag(n, 0) + b"\xff" * 11),  # varint longer than 10 bytes
        st.just(_tag(n, 0) + b"\x80"),  # varint cut short
        st.just(_tag(n, 1) + b"\x00\x01"),  # fixed64 cut short
        st.just(_tag(n, 5) + b"\x00"),  # fixed32 cut short
        st.just(_tag(n, 3) + b"\x08\x01"),  # group started, never ended
        st.just(_tag(n, 4)),  # group end without a start
        st.just(_tag(n, 6) + b"\x00"),  # wire type 6 does not exist
    ]
    if field.type == FD.TYPE_STRING:
        options.append(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\xfe", b"\xf8\x88\x80\x80\x80"]).map(
            lambda bad: _tag(n, 2) + _varint(len(bad)) + bad))  # invalid UTF-8: proto3 strings must be UTF-8
    if field.message_type is not None:
        options.append(st.binary(min_size=1, max_size=16).map(lambda junk: _tag(n, 2) + _varint(len(junk)) + junk))
    return st.one_of(options)


def malformed_wire(descriptor: d.Descriptor, fuzzer: MessageFuzzer) -> st.SearchStrategy[bytes]:
    """Bytes that claim to be a serialized ``descriptor`` message: random bytes, a valid message
    cut, flipped or spliced, or one broken field (a tag of one of its fields, badly encoded),
    possibly after valid fields. Many of them do not parse; the rest are strange but valid."""
    valid = fuzzer.message(descriptor, depth=fuzzer.max_depth - 1).map(lambda m: m.SerializeToString())
    fields = list(descriptor.fields)

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(valid))
        how = draw(st.sampled_from(["cut", "flip", "insert", "append"]))
        at = draw(st.integers(0, len(data)))
        if how == "cut":
            return bytes(data[:at])
        if how == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= draw(st.integers(1, 255))
            return bytes(data)
        junk = draw(st.binary(min_size=1, max_size=8))
        return bytes(data[:at] + junk + data[at:]) if how == "insert" else bytes(data + junk)

    broken = [st.tuples(valid, _broken_field(f)).map(lambda pair: pair[0] + pair[1]) for f in fields]
    return st.one_of(
        st.binary(max_size=256),
        mutated(),
        *broken,
        st.just(_tag(2**29 - 1, 2) + _varint(2**31)),  # highest field number, absurd length
        st.just(_varint(0)),  # field number 0 is invalid
        st.just(b"\xff" * 4096),
    )


def parses(descriptor: d.Descriptor, data: bytes) -> bool:
    """True when ``data`` is a valid serialized ``descriptor`` message (what the server's decoder says)."""
    try:
        message_class(descriptor).FromString(data)
    except pb_message.DecodeError:
        return False
    return True


# ---------------------------------------------------------------------------------- JSON


_JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(CHARACTERS, max_size=16)
    | st.sampled_from(["1e999", "-1", "NOPE", "ROLE_USER", "DOCUMENT_FORMAT_PDF", "", "AAAA", "!!", "P1D", "1.5"])
)
JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(CHARACTERS, max_size=8), inner, max_size=4),
    max_leaves=12,
)


def malformed_json(descriptor: d.Descriptor) -> st.SearchStrategy[bytes]:
    """HTTP bodies for a route whose request is ``descriptor``: not JSON at all, JSON of the
    wrong shape, or an object with the request's own field names (camelCase and snake_case)
    holding values of the wrong type, out-of-range numbers (``1e999``, 2^64), unknown enum names,
    NaN; sometimes an unknown field too."""
    names = [f.json_name for f in descriptor.fields] + [f.name for f in descriptor.fields]

    def dump(value: Any) -> bytes:
        return json.dumps(value, allow_nan=True).encode()

    field_values = JSON_VALUES | st.sampled_from([2**64, -(2**63) - 1, 1e308, "x" * 5000])
    shaped = st.dictionaries(st.sampled_from(names), field_values, max_size=len(names)) if names else st.just({})
    with_unknown = st.tuples(shaped, st.text(CHARACTERS, min_size=1, max_size=8), JSON_VALUES).map(
        lambda t: {**t[0], t[1]: t[2]})
    return st.one_of(
        st.binary(max_size=64),
        st.text(CHARACTERS, max_size=64).map(str.encode),
        st.sampled_from([b"", b"{", b"[", b"{}", b"null", b"[]", b'{"a":}', b"{'a': 1}", b"\xff\xfe", b'"str"',
                         b"{" * 2000, b"[" * 10_000, b'{"a": NaN}', b"\x00"]),
        JSON_VALUES.map(dump),
        shaped.map(dump),
        with_unknown.map(dump),
    )


def url_segments() -> st.SearchStrategy[str]:
    """Path segments for ``{variable}`` parts of an HTTP route, percent-encoded when needed."""
    from urllib.parse import quote  # noqa: PLC0415

    return st.one_of(
        st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True),
        st.text(CHARACTERS, min_size=1, max_size=20).map(lambda s: quote(s, safe="")),
        st.sampled_from(["%00", "%ff", "..", "%2e%2e", "a%2Fb", "x" * 300, "default", "%zz"]),
    )


#: Headers the mesh reads from a call's metadata (the gateway sets most of them; a caller inside
#: the cluster could send anything).
METADATA_KEYS = ["x-tenant-id", "x-request-id", "x-subject", "x-api-key-id", "x-agentmesh-roles", "traceparent",
                 "tracestate", "x-user-id"]


def metadata(tenant: str) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    """Call metadata: usually ``x-tenant-id: tenant`` alone; sometimes another (or an invalid)
    tenant, or extra headers with odd printable values (gRPC allows printable ASCII only)."""
    printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40) | st.sampled_from(
        ["", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "00-zz-zz-zz", "a" * 65, "a" * 4000, "default", "-", "..",
         "admin,operator", "tenant with space"])
    extra = st.lists(st.tuples(st.sampled_from(METADATA_KEYS), printable), max_size=3)
    return st.one_of(
        st.just((("x-tenant-id", tenant),)),
        st.just((("x-tenant-id", tenant),)),
        extra.map(lambda pairs: (("x-tenant-id", tenant), *pairs)),
        extra.map(tuple),
    )

