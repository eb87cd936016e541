"""Session history in Redis.

Layout: one Redis list per session, key ``{prefix}:{tenant}:session:{session_id}:messages``, one
element per message, oldest first. The tenant cannot contain ``:`` (``[A-Za-z0-9_-]``) and the
key ends in a fixed suffix, so two (tenant, session) pairs never map to the same key.

Elements are ``agentmesh.common.v1.Message`` in protobuf binary encoding rather than JSON: it is
the contract type itself, so tool-call arguments (``Struct``) round-trip exactly; it is smaller
and faster to encode and parse; and a reader built from an older ``common.proto`` keeps fields
added later (unknown fields survive), which matters while replicas of different versions run
side by side. The price is that ``redis-cli LRANGE`` shows bytes instead of text.

- Append is one ``MULTI``/``RPUSH``/``EXPIRE``/``EXEC`` transaction after every message has been
  validated and serialized, so a batch is written completely or not at all and concurrent
  batches never interleave. The list length after the push is the session's version.
- Reads walk the list from its end in pages of ``page_size`` messages (never the whole list), and
  stop at the first message that does not fit the budget. The first page is read together with
  ``LLEN`` in one transaction; later pages use absolute indices below that length, which appends
  (always at the tail) cannot shift, so one read sees the session as it was at ``version``.
- Writes are never retried automatically: a lost reply would otherwise append the batch twice.
  Reads retry once on a broken connection (a pooled connection left over from before a Redis
  restart fails once, then reconnects).

Every method raises :class:`~agentmesh.services.runtime.errors.ServiceError` only:
INVALID_ARGUMENT for bad input, UNAVAILABLE when Redis cannot be reached or fails, DATA_LOSS
when a stored element is not a valid message.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import grpc
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from google.protobuf.message import DecodeError

from agentmesh.common.v1 import common_pb2
from agentmesh.services.runtime.tokens import TokenCounter
from agentmesh.services.runtime.context import TENANT_PATTERN
from agentmesh.services.runtime.errors import ServiceError, invalid_argument, unavailable

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Roles a stored message may have (ROLE_UNSPECIFIED and unknown numbers are refused).
KNOWN_ROLES = frozenset(v for v in common_pb2.Role.values() if v != common_pb2.ROLE_UNSPECIFIED)

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """Input limits of :meth:`SessionStore.append`."""

    #: Most messages in one append (the contract allows 1..256).
    max_messages_per_append: int = 256
    #: Largest serialized message, in bytes (common.proto: content at most 1 MiB).
    max_message_bytes_each: int = 1024 * 1024


@dataclass
class ContextWindow:
    """What :meth:`SessionStore.get_context` returns."""

    #: The newest messages that fit, oldest first.
    messages: list[common_pb2.Message] = field(default_factory=list)
    #: Tokens of ``messages`` as counted by the store's TokenCounter.
    tokens_used: int = 0
    #: Messages in the session when it was read.
    version: int = 0
    #: Older messages left out: ``version - len(messages)``.
    messages_omitted: int = 0


def validate_session_id(session_id: str) -> None:
    """INVALID_ARGUMENT unless ``session_id`` is 1..128 characters of ``[A-Za-z0-9._:-]``."""
    if not SESSION_ID_PATTERN.match(session_id):
        shown = session_id[:64] + ("..." if len(session_id) > 64 else "")
        raise invalid_argument(
            f"session_id {shown!r} is invalid: use 1..128 characters of letters, digits, '.', '_', ':' or '-'"
        )


def validate_messages(messages: Sequence[common_pb2.Message], limits: Limits) -> list[bytes]:
    """Check every message and return their serialized forms, in order.

    Rules (INVALID_ARGUMENT naming ``messages[i]`` on the first violation): 1..limit messages; a
    known role; tool calls only on assistant messages, each with an id and a name; a tool message
    answers a ``tool_call_id``; each message at most ``max_message_bytes_each`` bytes serialized.
    """
    if not messages:
        raise invalid_argument("messages is empty: append at least one message")
    if len(messages) > limits.max_messages_per_append:
        raise invalid_argument(
            f"{len(messages)} messages in one append; the limit is {limits.max_messages_per_append}: "
            "split them over several calls"
        )
    blobs: list[bytes] = []
    for i, message in enumerate(messages):
        if message.role not in KNOWN_ROLES:
            name = common_pb2.Role.Name(message.role) if message.role in common_pb2.Role.values() else message.role
            raise invalid_argument(
                f"messages[{i}].role is {name}: set ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
            )
        if message.tool_calls and message.role != common_pb2.ROLE_ASSISTANT:
            raise invalid_argument(f"messages[{i}] has tool_calls but only ROLE_ASSISTANT messages may request tools")
        for j, call in enumerate(message.tool_calls):
            if not call.id or not call.name:
                raise invalid_argument(f"messages[{i}].tool_calls[{j}] needs both an id and a name")
        if message.role == common_pb2.ROLE_TOOL and not message.tool_call_id:
            raise invalid_argument(
                f"messages[{i}] is a ROLE_TOOL message without tool_call_id: set the id of the call it answers"
            )
        size = message.ByteSize()
        if size > limits.max_message_bytes_each:
            raise invalid_argument(
                f"messages[{i}] is {size} bytes serialized; the limit is {limits.max_message_bytes_each} bytes"
            )
        blobs.append(message.SerializeToString())
    return blobs


def redis_location(url: str) -> str:
    """``host:port/db`` of a Redis URL, without credentials (safe to show in messages and logs)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    db = parts.path.lstrip("/") or "0"
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}/{db}"


class SessionStore:
    """Session history of every tenant in one Redis database (see the module docstring).

    ``page_size`` is how many messages one read fetches (LRANGE) while walking back from the
    newest; ``session_ttl_s`` > 0 makes a session expire that many seconds after its last append.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        counter: TokenCounter,
        *,
        location: str,
        limits: Limits | None = None,
        key_prefix: str = "agentmesh",
        session_ttl_s: int = 0,
        page_size: int = 64,
    ):
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.redis = redis
        self.counter = counter
        self.location = location
        self.limits = limits or Limits()
        self.key_prefix = key_prefix
        self.session_ttl_s = session_ttl_s
        self.page_size = page_size

    def key(self, tenant: str, session_id: str) -> str:
        """Redis key of a session's message list (validates both parts)."""
        if not TENANT_PATTERN.match(tenant):
            raise invalid_argument(f"tenant {tenant[:80]!r} is invalid: use 1..64 characters of [A-Za-z0-9_-]")
        validate_session_id(session_id)
        return f"{self.key_prefix}:{tenant}:session:{session_id}:messages"

    async def append(self, tenant: str, session_id: str, messages: Sequence[common_pb2.Message]) -> int:
        """Append ``messages`` (oldest first) atomically; return the new version (list length).

        Everything is validated and serialized before Redis is touched, so invalid input writes
        nothing. Refreshes the session TTL when one is configured.
        """
        key = self.key(tenant, session_id)
        blobs = validate_messages(messages, self.limits)

        async def push() -> int:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *blobs)
                if self.session_ttl_s > 0:
                    pipe.expire(key, self.session_ttl_s)
                results = await pipe.execute()
            return int(results[0])

        return await self._call(push, retry=False)

    async def get_context(self, tenant: str, session_id: str, token_budget: int) -> ContextWindow:
        """The newest messages whose tokens sum to at most ``token_budget``, oldest first.

        Walks back from the newest message and stops at the first one that does not fit, so the
        window is always a contiguous tail of the session (no gaps). A session that does not
        exist is empty (version 0). If the newest message alone exceeds the budget, no message
        is returned and all are counted in ``messages_omitted``.
        """
        key = self.key(tenant, session_id)
        if token_budget < 0:
            raise invalid_argument("token_budget must not be negative")

        async def first_page() -> tuple[int, list[bytes]]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.llen(key)
                pipe.lrange(key, -self.page_size, -1)
                length, page = await pipe.execute()
            return int(length), page

        version, page = await self._call(first_page, retry=True)
        start = version - len(page)  # absolute index of page[0]
        kept: list[common_pb2.Message] = []
        used = 0
        while page:
            decoded = [self._decode(blob, session_id, start + i) for i, blob in enumerate(page)]
            counts = await asyncio.to_thread(self.counter.count_messages, decoded)
            full = False
            for message, tokens in zip(reversed(decoded), reversed(counts), strict=True):
                if used + tokens > token_budget:
                    full = True
                    break
                kept.append(message)
                used += tokens
            if full or start == 0:
                break
            lo = max(0, start - self.page_size)
            page = await self._call(lambda lo=lo, hi=start - 1: self.redis.lrange(key, lo, hi), retry=True)
            # Shorter than asked: the session expired or was deleted while we read it; what was
            # read so far is still a consistent tail of the version we reported.
            if len(page) != start - lo:
                break
            start = lo
        kept.reverse()
        return ContextWindow(messages=kept, tokens_used=used, version=version, messages_omitted=version - len(kept))

    async def ping(self) -> None:
        """One PING; UNAVAILABLE when Redis does not answer. A refused or broken connection also
        drops every pooled connection, so none left from before an outage is used after it."""
        try:
            await self._call(self.redis.ping, retry=True)
        except ServiceError as err:
            if isinstance(err.__cause__, redis_errors.ConnectionError):
                await self.redis.connection_pool.disconnect()
            raise

    async def _call(self, fn: Callable[[], Awaitable[T]], *, retry: bool) -> T:
        """Run one Redis interaction; translate Redis failures into UNAVAILABLE."""
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            try:
                return await fn()
            except redis_errors.ConnectionError as exc:
                # Only a broken connection is retried; after a TimeoutError Redis is slow, and
                # asking again would double the caller's wait.
                if attempt + 1 < attempts:
                    continue
                raise unavailable(
                    f"session store (Redis at {self.location}) is unreachable: {exc}; retry when it is back"
                ) from exc
            except redis_errors.TimeoutError as exc:
                raise unavailable(
                    f"session store (Redis at {self.location}) did not answer in time: {exc}; retry later"
                ) from exc
            except redis_errors.RedisError as exc:
                raise unavailable(
                    f"session store (Redis at {self.location}) failed: {type(exc).__name__}: {exc}"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _decode(self, blob: bytes, session_id: str, index: int) -> common_pb2.Message:
        message = common_pb2.Message()
        try:
            message.ParseFromString(blob)
        except DecodeError as exc:
            raise ServiceError(
                grpc.StatusCode.DATA_LOSS,
                f"session {session_id!r}: stored element {index} is not a valid agentmesh.common.v1.Message "
                f"({exc}); the session's data in Redis is corrupt",
            ) from exc
        return message
