"""Idempotency keys of ``ExecuteTool``: a repeated key returns the first result without running
the tool again.

A key is scoped to (tenant, tool, key). Its record moves through two states:

- *running*: claimed by the call that runs the tool, with a fingerprint of the call (tool,
  arguments, session, user) and a random claim token; it expires after the tool's runtime limit
  plus a margin, so a replica that dies mid-call does not block the key for long. ``CancelToolCall``
  marks a running record *cancel requested* (same fingerprint and token): the replica running the
  call sees the mark and stops it (:meth:`IdempotencyStore.cancel_requested`);
- *done*: the serialized ``ToolResult`` and the fingerprint, kept for ``ttl_s`` (24 h by default).

A second call with the key waits (polling) while the first one runs, then replays the stored
result; a call with the same key but another fingerprint is refused with FAILED_PRECONDITION. A
call that ends with a status instead of a result (DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE...)
releases its claim, so the key can be retried. Only the claim's owner can complete or release
it (compare-and-set on the token), so a claim that expired and was taken over is never
overwritten by its first owner.

Two stores: :class:`RedisIdempotencyStore` (``AGENTMESH_TOOLS_REDIS_URL``; shared by every
replica, survives restarts; each step is one Lua script, so atomic) and
:class:`MemoryIdempotencyStore` (an in-process LRU with TTLs, used when no Redis is configured:
it protects retries against the same replica only and forgets on restart).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import grpc
from redis.exceptions import RedisError

from agentmesh.services.runtime.errors import ServiceError, unavailable
from agentmesh.services.runtime.redis_pool import pooled_redis

_RUNNING = b"R"
_CANCELLING = b"C"
_DONE = b"D"
_FP_LEN = 64  # sha256 hex digest
#: How often a call waiting for a running first call with the same key looks again, in seconds.
POLL_S = 0.05


@dataclass(frozen=True)
class Claim:
    """The right to run the call and store its result under ``key``."""

    key: str
    fingerprint: str
    token: str


@dataclass(frozen=True)
class Record:
    """What the store holds under a key: ``state`` is ``running`` or ``done``; ``cancelling``
    when a running call was asked to stop."""

    state: str
    fingerprint: str
    result: bytes = b""
    cancelling: bool = False


def fingerprint(tool: str, arguments: Any, session_id: str, user_id: str) -> str:
    """sha256 hex digest of the call's canonical JSON (keys sorted)."""
    canonical = json.dumps([tool, arguments, session_id, user_id], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def scoped_key(tenant: str, tool: str, key: str) -> str:
    """The store key of idempotency key ``key`` of ``tool`` for ``tenant``. The caller's key is
    hashed, so any printable text is safe in a Redis key and its length is bounded."""
    return f"agentmesh:tools:idem:{tenant}:{tool}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def _encode(state: bytes, fp: str, rest: bytes) -> bytes:
    return state + fp.encode() + rest


def _decode(value: bytes) -> Record:
    head = value[:1]
    state = "done" if head == _DONE else "running"
    fp = value[1 : 1 + _FP_LEN].decode()
    return Record(state, fp, b"" if state == "running" else value[1 + _FP_LEN :], cancelling=head == _CANCELLING)


def _running(claim: Claim, head: bytes = _RUNNING) -> bytes:
    return _encode(head, claim.fingerprint, claim.token.encode())


class IdempotencyStore(abc.ABC):
    """Storage of claims and results. Store failures raise UNAVAILABLE."""

    #: Shown in messages and readiness: ``redis`` or ``memory``.
    kind: str

    @abc.abstractmethod
    async def try_claim(self, claim: Claim, running_ttl_s: float) -> Record | None:
        """Claim ``claim.key`` unless a record exists: None when claimed, else the record."""

    @abc.abstractmethod
    async def complete(self, claim: Claim, result: bytes, ttl_s: float) -> bool:
        """Store ``result`` if ``claim`` still holds the key; False when it no longer does."""

    @abc.abstractmethod
    async def release(self, claim: Claim) -> None:
        """Drop the claim if it still holds the key (the call ended without a result)."""

    @abc.abstractmethod
    async def request_cancel(self, key: str) -> bool:
        """Mark the call running under ``key`` as asked to stop; False when none runs."""

    @abc.abstractmethod
    async def cancel_requested(self, claim: Claim) -> bool:
        """True when ``claim``'s call was asked to stop (or lost its claim meanwhile)."""

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


async def acquire(
    store: IdempotencyStore, key: str, fp: str, *, running_ttl_s: float, wait_s: float
) -> Claim | bytes:
    """Claim ``key`` for a new run, or return the stored result (serialized ``ToolResult``) of
    the first call, waiting up to ``wait_s`` seconds while that call still runs.

    Raises FAILED_PRECONDITION when the key was used for another call, ABORTED when the first
    call is still running after ``wait_s``, UNAVAILABLE when the store fails."""
    claim = Claim(key, fp, secrets.token_hex(16))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        record = await store.try_claim(claim, running_ttl_s)
        if record is None:
            return claim
        if record.fingerprint != fp:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this idempotency key was already used for a call with other arguments (or another "
                "session or user); use a new key for a new call",
            )
        if record.state == "done":
            return record.result
        if loop.time() >= deadline:
            raise ServiceError(
                grpc.StatusCode.ABORTED,
                "the first call with this idempotency key is still running; retry with the same key "
                "to receive its result once it finishes",
            )
        await asyncio.sleep(POLL_S)


# Claim unless present: returns nil when claimed, else the stored value.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# Compare-and-set on the running record (state, fingerprint and token).
_COMPLETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or v == ARGV[2] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Running -> cancel requested, keeping the fingerprint, token and expiry.
_CANCEL = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local head = string.sub(v, 1, 1)
if head == 'C' then return 1 end
if head ~= 'R' then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then ttl = 1000 end
redis.call('SET', KEYS[1], 'C' .. string.sub(v, 2), 'PX', ttl)
return 1
"""


class RedisIdempotencyStore(IdempotencyStore):
    """Records in Redis, one string per key with a TTL (PX)."""

    kind = "redis"

    def __init__(self, url: str, timeout_s: float = 2.0, *, max_connections: int = 256, pool_timeout_s: float = 10.0):
        self._redis = pooled_redis(
            url, max_connections=max_connections, pool_timeout_s=pool_timeout_s,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        )
        self._claim = self._redis.register_script(_CLAIM)
        self._complete = self._redis.register_script(_COMPLETE)
        self._release = self._redis.register_script(_RELEASE)
        self._cancel = self._redis.register_script(_CANCEL)

    async def try_claim(self, claim: Claim, running_ttl_s: float) -> Record | None:
        try:
            value = await self._claim(keys=[claim.key], args=[_running(claim), int(running_ttl_s * 1000)])
        except RedisError as exc:
            raise unavailable(f"idempotency store (Redis) failed: {exc}; retry shortly") from exc
        return None if value is None else _decode(value)

    async def complete(self, claim: Claim, result: bytes, ttl_s: float) -> bool:
        done = _encode(_DONE, claim.fingerprint, result)
        try:
            return bool(await self._complete(keys=[claim.key], args=[_running(claim), done, int(ttl_s * 1000)]))
        except RedisError as exc:
            raise unavailable(f"idempotency store (Redis) failed to store the result: {exc}") from exc

    async def release(self, claim: Claim) -> None:
        try:
            await self._release(keys=[claim.key], args=[_running(claim), _running(claim, _CANCELLING)])
        except RedisError:
            pass  # the claim expires on its own after the runtime limit

    async def request_cancel(self, key: str) -> bool:
        try:
            return bool(await self._cancel(keys=[key]))
        except RedisError as exc:
            raise unavailable(f"idempotency store (Redis) failed: {exc}; retry shortly") from exc

    async def cancel_requested(self, claim: Claim) -> bool:
        try:
            value = await self._redis.get(claim.key)
        except RedisError:
            return False  # keep running; the next look may succeed
        return value != _running(claim)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


class MemoryIdempotencyStore(IdempotencyStore):
    """Records in this process: an LRU of at most ``max_entries`` keys, each with its TTL."""

    kind = "memory"

    def __init__(self, max_entries: int = 10_000):
        self._max = max_entries
        self._entries: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()

    def _get(self, key: str) -> bytes | None:
        item = self._entries.get(key)
        if item is None:
            return None
        if item[1] <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return item[0]

    def _set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._entries[key] = (value, time.monotonic() + ttl_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def try_claim(self, claim: Claim, running_ttl_s: float) -> Record | None:
        value = self._get(claim.key)
        if value is not None:
            return _decode(value)
        self._set(claim.key, _running(claim), running_ttl_s)
        return None

    async def complete(self, claim: Claim, result: bytes, ttl_s: float) -> bool:
        if self._get(claim.key) != _running(claim):
            return False
        self._set(claim.key, _encode(_DONE, claim.fingerprint, result), ttl_s)
        return True

    async def release(self, claim: Claim) -> None:
        if self._get(claim.key) in (_running(claim), _running(claim, _CANCELLING)):
            del self._entries[claim.key]

    async def request_cancel(self, key: str) -> bool:
        value = self._get(key)
        if value is None or value[:1] == _DONE:
            return False
        if value[:1] == _RUNNING:
            self._entries[key] = (_CANCELLING + value[1:], self._entries[key][1])
        return True

    async def cancel_requested(self, claim: Claim) -> bool:
        return self._get(claim.key) != _running(claim)
