"""The opt-in exact-match response cache, in Redis.

A request opts in with ``RoutingOptions.cache``. Its key is the SHA-256 of the normalized
request: the tenant (tenants never share entries), the model alias or pinned deployment, the
messages, tools and context as canonical JSON (protobuf JSON mapping, keys sorted — so map order
and whitespace of the encoding never matter), ``max_tokens`` and the temperature rounded to 3
decimals (the proto carries a float32). A complete answer of a language model (ending with
``finish``) is stored with its events — text and tool-call deltas, citations, usage, finish —
under that key for ``cache_ttl_s`` seconds; extractive answers and cut streams are never stored.
A hit replays the stored events as a stream, in the order they were first sent, after a
``metadata`` event with ``cached = true`` and ``attempts = 0``; it calls no provider, passes no
admission and costs nothing (``Finish.cost_usd = 0``; ``usage`` is the original generation's).

Stored value: each event as a 4-byte big-endian length and the serialized
``StreamGenerateResponse``, the ``metadata`` event first.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence

import redis.asyncio as aioredis
from google.protobuf import json_format

from agentmesh.llm.v1 import llm_pb2
from agentmesh.services.llm.providers.base import GenerationRequest

_LENGTH = struct.Struct(">I")
#: Version of the key derivation and value format; bump it when either changes.
FORMAT_VERSION = 1


def _dicts(messages: Sequence[object]) -> list[dict]:
    return [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in messages]  # type: ignore[arg-type]


def cache_key(prefix: str, tenant: str, target: str, request: GenerationRequest) -> str:
    """The Redis key of a request (see the module docstring). ``target`` is the alias or the
    pinned deployment."""
    normalized = {
        "v": FORMAT_VERSION,
        "tenant": tenant,
        "target": target,
        "messages": _dicts(request.messages),
        "tools": _dicts(request.tools),
        "context": _dicts(request.context),
        "max_tokens": request.max_tokens,
        "temperature": None if request.temperature is None else round(request.temperature, 3),
    }
    digest = hashlib.sha256(json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{prefix}:cache:{digest}"


def encode(events: Sequence[llm_pb2.StreamGenerateResponse]) -> bytes:
    parts = []
    for event in events:
        data = event.SerializeToString()
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode(blob: bytes) -> list[llm_pb2.StreamGenerateResponse]:
    """The events of a stored value; ValueError when it is truncated or not a stream."""
    events, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise ValueError("truncated cache entry")
        (size,) = _LENGTH.unpack_from(blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise ValueError("truncated cache entry")
        events.append(llm_pb2.StreamGenerateResponse.FromString(blob[offset : offset + size]))
        offset += size
    if not events or not events[0].HasField("metadata") or not events[-1].HasField("finish"):
        raise ValueError("cache entry is not a complete stream")
    return events


class ResponseCache:
    """Get / put whole streams (``max_bytes`` bounds a stored value)."""

    def __init__(self, client: aioredis.Redis, prefix: str, max_bytes: int):
        self.redis = client
        self.prefix = prefix
        self.max_bytes = max_bytes

    async def get(self, key: str) -> list[llm_pb2.StreamGenerateResponse] | None:
        blob = await self.redis.get(key)
        if blob is None:
            return None
        try:
            return decode(blob)
        except ValueError:
            await self.redis.delete(key)  # unreadable (e.g. an older format): drop it
            return None

    async def put(self, key: str, events: Sequence[llm_pb2.StreamGenerateResponse], ttl_s: int) -> bool:
        """Store a complete stream; False when it is larger than ``max_bytes``."""
        blob = encode(events)
        if len(blob) > self.max_bytes:
            return False
        await self.redis.set(key, blob, ex=ttl_s)
        return True
