"""Session history in Redis.

Scope and keys. A session is named by (tenant, user, session id); all its keys share the prefix
``{prefix}:{tenant}:{user}:{{session_id}}`` (:attr:`SessionRef.base`): ``:meta``, ``:messages``,
``:tokens``, ``:pinned``, ``:idem``, ``:idem_at``, ``:lock``, and the pub/sub channel ``:events``.
What each holds is documented in :mod:`agentmesh.services.memory.lua`. The braces are a Redis
Cluster hash tag, so one session's keys sit in one slot and every script may touch all of them.
The tenant holds no ``:``, the user no ``{`` and the session id neither ``{`` nor ``}``, so two
scopes never map to the same key, and ``{prefix}:{tenant}:{user}:{*`` matches exactly one user's
sessions (that is how :meth:`SessionStore.forget_user` finds them).

Messages are stored as ``agentmesh.memory.v1.SessionMessage`` in protobuf binary (the contract
type itself: tool-call arguments round-trip exactly, and fields added later survive older
readers) carrying the message, its append time and its token count. Id and sequence are not
stored: the sequence is the position (``meta.first`` + list index) and the id is
``<incarnation>-<sequence>``. A parallel list holds each message's token count, so a budget is
computed inside Redis without decoding a single message.

Consistency. Every operation is ONE Lua script (:mod:`~agentmesh.services.memory.lua`), so it is
atomic: an append is written completely or not at all, concurrent appends never interleave, and a
read sees one version of the session. Writes are never retried automatically (a lost reply would
otherwise append twice; idempotency keys make a client's own retry safe); reads retry once on a
broken connection (a pooled connection left over from before a Redis restart fails once).

Every method raises :class:`~agentmesh.services.runtime.errors.ServiceError` only:
INVALID_ARGUMENT for bad input, FAILED_PRECONDITION for a state the request cannot apply to,
UNAVAILABLE when Redis cannot be reached or fails, DATA_LOSS when a stored element is corrupt.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import grpc
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from agentmesh.common.v1 import common_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.services.memory import lua
from agentmesh.services.memory.cache import CachedWindow, ContextCache, decode_frame, frame
from agentmesh.services.memory.watch import SessionEvents
from agentmesh.services.runtime.context import TENANT_PATTERN, remaining_s
from agentmesh.services.runtime.errors import ServiceError, invalid_argument, unavailable
from agentmesh.services.runtime.tokens import TOKENIZERS, CounterChoice, TokenCounter

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,128}$")
#: The user of calls that name none.
DEFAULT_USER = "default"
#: Roles a stored message may have (ROLE_UNSPECIFIED and unknown numbers are refused).
KNOWN_ROLES = frozenset(v for v in common_pb2.Role.values() if v != common_pb2.ROLE_UNSPECIFIED)
#: Appends whose text is shorter than this are tokenized on the event loop (a thread hop costs
#: more than tokenizing a few kB); longer ones in a worker thread.
_INLINE_TOKENIZE_CHARS = 16 * 1024
#: Pinned-message and summary counts kept per process for reads in another tokenizer.
_SIDE_COUNTS = 4096
#: Attempts of a read in another tokenizer when the session is deleted and created again under it.
_RECOUNT_ATTEMPTS = 3
#: Most messages ListMessages returns at once.
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100

T = TypeVar("T")

_SUFFIXES = ("meta", "messages", "tokens", "pinned", "idem", "idem_at", "lock")


@dataclass(frozen=True)
class Limits:
    """Input limits of the store."""

    #: Most messages in one append (the contract allows 1..256).
    max_messages_per_append: int = 256
    #: Largest serialized message, in bytes (common.proto: content at most 1 MiB).
    max_message_bytes_each: int = 1024 * 1024
    #: Most tokens the pinned messages of a session may take.
    max_pinned_tokens: int = 4000
    #: Most pinned messages of a session.
    max_pinned_messages: int = 16


@dataclass(frozen=True)
class Retention:
    """Service-wide retention defaults; a session's own setting (SetRetention) overrides them."""

    #: Seconds after the last write at which a session expires; 0 = never.
    ttl_s: int = 0
    #: Messages a session keeps; 0 = all.
    keep_last_messages: int = 0
    #: How long an idempotency key is remembered, in seconds.
    idempotency_window_s: int = 86_400


@dataclass(frozen=True)
class SessionRef:
    """A validated (tenant, user, session) and the Redis names derived from it."""

    tenant: str
    user: str
    session: str
    prefix: str = "agentmesh"

    @classmethod
    def of(cls, tenant: str, user: str, session: str, prefix: str = "agentmesh") -> SessionRef:
        """Validate the parts (INVALID_ARGUMENT naming the bad one); an empty user is ``default``."""
        validate_tenant(tenant)
        user = resolve_user(user)
        validate_session_id(session)
        return cls(tenant, user, session, prefix)

    @property
    def base(self) -> str:
        return f"{self.prefix}:{self.tenant}:{self.user}:{{{self.session}}}"

    @property
    def keys(self) -> list[str]:
        """The session's keys in the order :mod:`~agentmesh.services.memory.lua` expects."""
        base = self.base
        return [f"{base}:{suffix}" for suffix in _SUFFIXES]

    @property
    def channel(self) -> str:
        return f"{self.base}:events"

    @property
    def index_prefix(self) -> str:
        """Retention index members of this session are this plus the incarnation (see lua.py)."""
        return f"{self.tenant}/{self.user}/{self.session}/"

    @property
    def lock_key(self) -> str:
        return f"{self.base}:lock"


@dataclass(frozen=True)
class IndexEntry:
    """A retention index member: one incarnation of one session (see lua.py)."""

    ref: SessionRef
    incarnation: str

    @classmethod
    def parse(cls, member: str, prefix: str) -> IndexEntry:
        """ValueError (or INVALID_ARGUMENT for a bad part) unless ``member`` is
        ``<tenant>/<user>/<session>/<incarnation>``."""
        tenant, user, session, incarnation = member.split("/")
        return cls(SessionRef.of(tenant, user, session, prefix), incarnation)

    @property
    def member(self) -> str:
        return self.ref.index_prefix + self.incarnation


def validate_tenant(tenant: str) -> None:
    if not TENANT_PATTERN.match(tenant):
        raise invalid_argument(f"tenant {tenant[:80]!r} is invalid: use 1..64 characters of [A-Za-z0-9_-]")


def resolve_user(user_id: str) -> str:
    """``user_id``, or ``default`` when empty. INVALID_ARGUMENT unless it is 1..128 characters of
    ``[A-Za-z0-9._:@+-]``."""
    if not user_id:
        return DEFAULT_USER
    if not USER_ID_PATTERN.match(user_id):
        shown = user_id[:64] + ("..." if len(user_id) > 64 else "")
        raise invalid_argument(
            f"user_id {shown!r} is invalid: use 1..128 characters of letters, digits, '.', '_', ':', '@', '+' or '-' "
            "(or leave it empty for the default user)"
        )
    return user_id


def validate_session_id(session_id: str) -> None:
    """INVALID_ARGUMENT unless ``session_id`` is 1..128 characters of ``[A-Za-z0-9._:-]``."""
    if not SESSION_ID_PATTERN.match(session_id):
        shown = session_id[:64] + ("..." if len(session_id) > 64 else "")
        raise invalid_argument(
            f"session_id {shown!r} is invalid: use 1..128 characters of letters, digits, '.', '_', ':' or '-'"
        )


def validate_messages(
    messages: Sequence[common_pb2.Message], limits: Limits, *, field: str = "messages"
) -> list[bytes]:
    """Check every message and return their serialized forms, in order.

    Rules (INVALID_ARGUMENT naming ``messages[i]`` on the first violation): 1..limit messages; a
    known role; tool calls only on assistant messages, each with an id, a name and arguments JSON
    can hold (no NaN or Infinity); a tool message answers a ``tool_call_id``; each message at most
    ``max_message_bytes_each`` bytes serialized.
    """
    if not messages:
        raise invalid_argument(f"{field} is empty: append at least one message")
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
                f"{field}[{i}].role is {name}: set ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
            )
        if message.tool_calls and message.role != common_pb2.ROLE_ASSISTANT:
            raise invalid_argument(f"{field}[{i}] has tool_calls but only ROLE_ASSISTANT messages may request tools")
        for j, call in enumerate(message.tool_calls):
            if not call.id or not call.name:
                raise invalid_argument(f"{field}[{i}].tool_calls[{j}] needs both an id and a name")
            try:  # counted and summarized as JSON: NaN and Infinity have no JSON form
                json_format.MessageToDict(call.arguments)
            except ValueError as exc:
                raise invalid_argument(
                    f"{field}[{i}].tool_calls[{j}].arguments cannot be written as JSON ({exc}): use finite numbers"
                ) from None
        if message.role == common_pb2.ROLE_TOOL and not message.tool_call_id:
            raise invalid_argument(
                f"{field}[{i}] is a ROLE_TOOL message without tool_call_id: set the id of the call it answers"
            )
        size = message.ByteSize()
        if size > limits.max_message_bytes_each:
            raise invalid_argument(
                f"{field}[{i}] is {size} bytes serialized; the limit is {limits.max_message_bytes_each} bytes"
            )
        blobs.append(message.SerializeToString(deterministic=True))
    return blobs


def redis_location(url: str) -> str:
    """``host:port/db`` of a Redis URL, without credentials (safe to show in messages and logs)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    db = parts.path.lstrip("/") or "0"
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}/{db}"


def message_id(incarnation: str, sequence: int) -> str:
    """The id of message ``sequence`` of a session incarnation (see SessionMessage.id)."""
    return f"{incarnation}-{sequence}"


def render_summary(summary: memory_pb2.SessionSummary) -> common_pb2.Message:
    """The running summary as the system message GetContext returns."""
    span = (
        f"message {summary.from_sequence}"
        if summary.from_sequence == summary.through_sequence
        else f"messages {summary.from_sequence}-{summary.through_sequence}"
    )
    return common_pb2.Message(
        role=common_pb2.ROLE_SYSTEM,
        content=f"Summary of the earlier conversation ({span}):\n{summary.text}",
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _int(value: bytes | int | None) -> int:
    return int(value) if value is not None else 0


@dataclass
class AppendResult:
    version: int
    first_sequence: int
    incarnation: str
    count: int
    replayed: bool = False
    #: Tokens of stored messages no summary covers yet (drives compaction; 0 for a replay).
    unsummarized_tokens: int = 0

    @property
    def message_ids(self) -> list[str]:
        return [message_id(self.incarnation, self.first_sequence + i) for i in range(self.count)]


@dataclass
class MessageRange:
    """What :meth:`SessionStore.list_messages` returns."""

    messages: list[memory_pb2.SessionMessage]
    version: int
    first_sequence: int
    incarnation: str


@dataclass
class SessionState:
    """What :meth:`SessionStore.describe` returns (``exists`` False: everything else is zero)."""

    exists: bool
    incarnation: str = ""
    version: int = 0
    first_sequence: int = 0
    summary: memory_pb2.SessionSummary | None = None
    #: Cumulative tokens through the summary's last sequence (0 without a summary).
    summary_cumulative_tokens: int = 0
    #: Cumulative tokens of the messages retention deleted.
    trimmed_tokens: int = 0
    pinned: list[common_pb2.Message] = field(default_factory=list)
    ttl_s: int = 0
    keep_last_messages: int = 0
    expires_in_ms: int = 0
    created_at_ms: int = 0
    updated_at_ms: int = 0

    @property
    def messages_stored(self) -> int:
        return self.version - self.first_sequence + 1 if self.version else 0


class SessionStore:
    """Sessions of every tenant and user in one Redis database (see the module docstring).

    ``counter``: the tokenizer of the stored counts; its ``name`` is recorded with each session
    (``enc``, lua.py) and GetContext in that tokenizer walks them in Redis.
    ``page_size``: token counts read per LRANGE while GetContext walks back from the newest
    message (messages per read when the service counts itself). ``events``: the notification hub used to wait for a version (read-your-writes) and
    by WatchSession; ``read_wait_s``: longest such wait, in seconds. ``cache``: the recent messages
    this process returned (cache.py; a default-sized one when not given).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        counter: TokenCounter,
        *,
        location: str,
        events: SessionEvents | None = None,
        limits: Limits | None = None,
        retention: Retention | None = None,
        key_prefix: str = "agentmesh",
        page_size: int = 64,
        read_wait_s: float = 2.0,
        cache: ContextCache | None = None,
        track_retention: bool = False,
    ):
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.redis = redis
        self.counter = counter
        self.location = location
        self.events = events
        self.limits = limits or Limits()
        self.retention = retention or Retention()
        self.key_prefix = key_prefix
        self.page_size = page_size
        self.read_wait_s = read_wait_s
        self.cache = cache if cache is not None else ContextCache()
        self._append = redis.register_script(lua.APPEND)
        self._get_context = redis.register_script(lua.GET_CONTEXT)
        self._context_head = redis.register_script(lua.CONTEXT_HEAD)
        #: (tokenizer, digest of a pinned message or summary) -> its tokens, for reads in another
        #: tokenizer than ``counter`` (least recently used first out).
        self._side_counts: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._list = redis.register_script(lua.LIST)
        self._set_pinned = redis.register_script(lua.SET_PINNED)
        self._set_retention = redis.register_script(lua.SET_RETENTION)
        self._delete = redis.register_script(lua.DELETE)
        self._write_summary = redis.register_script(lua.WRITE_SUMMARY)
        self._claim = redis.register_script(lua.CLAIM)
        self._pruned = redis.register_script(lua.PRUNED)
        #: The retention index (lua.py); written only when ``track_retention``.
        self.index_key = f"{key_prefix}:retention"
        self.track_retention = track_retention

    def ref(self, tenant: str, user: str, session: str) -> SessionRef:
        """The validated scope of a session (INVALID_ARGUMENT for a bad part)."""
        return SessionRef.of(tenant, user, session, self.key_prefix)

    def key(self, tenant: str, session_id: str, user: str = "") -> str:
        """Redis key of a session's message list (validates every part)."""
        return self.ref(tenant, user, session_id).keys[1]

    # -- writes ---------------------------------------------------------------------------------

    async def count_tokens(
        self, messages: Sequence[common_pb2.Message], counter: TokenCounter | None = None
    ) -> list[int]:
        """Tokens of each message with ``counter`` (default: the store's, the one of the stored
        counts), in a thread for long texts."""
        counter = counter or self.counter
        if sum(len(m.content) for m in messages) < _INLINE_TOKENIZE_CHARS:
            return counter.count_messages(messages)
        return await asyncio.to_thread(counter.count_messages, messages)

    async def append(
        self, ref: SessionRef, messages: Sequence[common_pb2.Message], idempotency_key: str = ""
    ) -> AppendResult:
        """Append ``messages`` (oldest first) atomically.

        Everything is validated and serialized before Redis is touched, so invalid input writes
        nothing. With an ``idempotency_key`` that the session has seen within the idempotency
        window, nothing is written and the first call's result comes back with ``replayed``;
        the same key with other messages raises FAILED_PRECONDITION. Applies the session's
        retention (keep-last trimming, TTL refresh) and notifies watchers, in the same script.
        """
        if idempotency_key and not IDEMPOTENCY_KEY_PATTERN.match(idempotency_key):
            raise invalid_argument("idempotency_key must be 1..128 printable ASCII characters without spaces")
        validate_messages(messages, self.limits)
        tokens = await self.count_tokens(messages)
        now = _now_ms()
        blobs = [
            memory_pb2.SessionMessage(message=m, created_at_ms=now, tokens=t).SerializeToString()
            for m, t in zip(messages, tokens, strict=True)
        ]
        request_hash = ""
        if idempotency_key:
            digest = hashlib.sha256()
            for m in messages:
                raw = m.SerializeToString(deterministic=True)
                digest.update(len(raw).to_bytes(8, "big") + raw)
            request_hash = digest.hexdigest()[:32]
        argv = [
            now,
            secrets.token_hex(8),
            self.retention.ttl_s,
            self.retention.keep_last_messages,
            idempotency_key,
            request_hash,
            self.retention.idempotency_window_s * 1000,
            ref.channel,
            len(blobs),
            *blobs,
            *tokens,
            *self._track(ref),
            self.counter.name,
        ]
        reply = await self._call(lambda: self._append(keys=self._write_keys(ref), args=argv), retry=False)
        if reply[0] == b"replay":
            stored_hash, first, version, inc = reply[1].decode().split("|")
            if stored_hash != request_hash:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"idempotency_key {idempotency_key!r} was already used in session {ref.session!r} for "
                    "different messages; use a new key for a new append",
                )
            first_i, version_i = int(first), int(version)
            return AppendResult(version_i, first_i, inc, version_i - first_i + 1, replayed=True)
        _, first, version, inc, unsummarized = reply
        return AppendResult(int(version), int(first), inc.decode(), len(blobs), unsummarized_tokens=int(unsummarized))

    async def set_pinned(self, ref: SessionRef, messages: Sequence[common_pb2.Message]) -> int:
        """Replace the session's pinned messages (ROLE_SYSTEM only; none unpins). Returns their
        tokens. INVALID_ARGUMENT beyond ``max_pinned_messages`` / ``max_pinned_tokens``."""
        if len(messages) > self.limits.max_pinned_messages:
            raise invalid_argument(
                f"{len(messages)} pinned messages; at most {self.limits.max_pinned_messages} per session"
            )
        blobs: list[bytes] = []
        for i, m in enumerate(messages):
            if m.role != common_pb2.ROLE_SYSTEM or m.tool_calls or m.tool_call_id:
                raise invalid_argument(f"messages[{i}] must be a plain ROLE_SYSTEM message to be pinned")
            if not m.content.strip():
                raise invalid_argument(f"messages[{i}].content is empty")
        if messages:
            blobs = validate_messages(messages, self.limits)
        tokens = sum(await self.count_tokens(messages)) if messages else 0
        if tokens > self.limits.max_pinned_tokens:
            raise invalid_argument(
                f"pinned messages take {tokens} tokens; the limit is {self.limits.max_pinned_tokens}"
            )
        argv = [_now_ms(), secrets.token_hex(8), self.retention.ttl_s, tokens, len(blobs), *blobs, *self._track(ref),
                self.counter.name]
        await self._call(lambda: self._set_pinned(keys=self._write_keys(ref), args=argv), retry=False)
        return tokens

    async def set_retention(self, ref: SessionRef, ttl_s: int | None, keep_last: int | None) -> tuple[int, int, int]:
        """Set the session's own TTL and/or keep-last (None leaves one unchanged) and apply them
        now. Returns (ttl_s, keep_last_messages, messages_deleted)."""
        for name, value in (("ttl_s", ttl_s), ("keep_last_messages", keep_last)):
            if value is not None and not 0 <= value <= 2**31 - 1:
                raise invalid_argument(f"{name} {value} is out of range")
        argv = [
            _now_ms(),
            secrets.token_hex(8),
            self.retention.ttl_s,
            self.retention.keep_last_messages,
            "" if ttl_s is None else ttl_s,
            "" if keep_last is None else keep_last,
            *self._track(ref),
            self.counter.name,
        ]
        ttl, keep, dropped = await self._call(
            lambda: self._set_retention(keys=self._write_keys(ref), args=argv), retry=False
        )
        return int(ttl), int(keep), int(dropped)

    async def delete(self, ref: SessionRef) -> tuple[bool, int, str]:
        """Delete every key of the session and tell its watchers. Returns (existed,
        messages_deleted, incarnation it had)."""
        for key in (ref.base, *(self._window_key(ref, name) for name in TOKENIZERS)):
            self.cache.drop(key)
        n, stored, inc = await self._call(
            lambda: self._delete(keys=self._write_keys(ref), args=[ref.channel, ref.index_prefix]), retry=False
        )
        return int(n) > 0, int(stored), inc.decode() if isinstance(inc, bytes) else str(inc)

    async def forget_user(self, tenant: str, user: str) -> tuple[list[SessionRef], int]:
        """Delete every session of (tenant, user): SCAN for ``{prefix}:{tenant}:{user}:{*`` and
        delete each session found, until a pass finds nothing (at most 5 passes, so appends
        racing with the deletion are caught too). Returns (sessions deleted, keys deleted)."""
        validate_tenant(tenant)
        user = resolve_user(user)
        pattern = _glob_escape(f"{self.key_prefix}:{tenant}:{user}:") + "{*"
        self.cache.drop_prefix(f"{self.key_prefix}:{tenant}:{user}:{{")
        sessions: dict[str, SessionRef] = {}
        keys_deleted = 0
        for _ in range(5):
            found: set[str] = set()

            async def scan(found: set[str] = found) -> None:
                async for key in self.redis.scan_iter(match=pattern, count=1000):
                    text = key.decode()
                    start = text.index("{", len(self.key_prefix) + len(tenant) + len(user) + 3)
                    found.add(text[start + 1 : text.index("}", start)])

            await self._call(scan, retry=True)
            if not found:
                break
            for session in found:
                ref = SessionRef(tenant, user, session, self.key_prefix)
                n, _, _ = await self._call(
                    lambda ref=ref: self._delete(keys=self._write_keys(ref), args=[ref.channel, ref.index_prefix]),
                    retry=False,
                )
                keys_deleted += int(n)
                sessions[session] = ref
        # Index entries of incarnations that expired and were not swept yet name the user too.
        members = _glob_escape(f"{tenant}/{user}/") + "*"

        async def unindex() -> None:
            found = [m async for m in self.redis.zscan_iter(self.index_key, match=members, count=1000)]
            if found:
                await self.redis.zrem(self.index_key, *(m for m, _ in found))

        await self._call(unindex, retry=True)
        return list(sessions.values()), keys_deleted

    async def write_summary(
        self, ref: SessionRef, incarnation: str, expected_through: int, summary: memory_pb2.SessionSummary,
        cumulative_tokens: int,
    ) -> int:
        """Compare-and-set the running summary: written only when the session still has
        ``incarnation`` and its summary still ends at ``expected_through``. Returns 1 written,
        0 session deleted or replaced, -1 another compaction got there first."""
        tokens = (await self.count_tokens([render_summary(summary)]))[0]
        summary.tokens = tokens
        argv = [incarnation, expected_through, summary.SerializeToString(), tokens, summary.through_sequence,
                cumulative_tokens, self.counter.name]
        return int(await self._call(lambda: self._write_summary(keys=ref.keys[:1], args=argv), retry=False))

    # -- reads ----------------------------------------------------------------------------------

    async def get_context(
        self, ref: SessionRef, token_budget: int, min_version: int = 0, choice: CounterChoice | None = None
    ) -> bytes:
        """Pinned messages, the running summary and the newest messages, within ``token_budget``
        tokens of ``choice`` (a counter and whether its counts are approximate for the model;
        default: the store's own ``counter``), as a serialized ``GetContextResponse`` (bytes: the
        service sends them as they are), naming the tokenizer.

        Order of priority: the pinned messages always (FAILED_PRECONDITION when they alone exceed
        the budget), then the summary if it fits, then the newest messages not covered by an
        included summary, walking back from the newest and stopping at the first that does not
        fit, so the recent part is always a contiguous tail. A session that does not exist is
        empty (version 0). Waits for ``min_version`` (see :meth:`wait_for_version`). Messages
        this process returned before come from :attr:`cache` (see cache.py); DATA_LOSS when a
        stored element is not a valid message.

        When the stored counts are in the requested tokenizer (the session's ``enc``, see lua.py)
        the budget is walked in Redis over them; otherwise :meth:`_get_context_recounted` counts.
        """
        if token_budget < 0:
            raise invalid_argument("token_budget must not be negative")
        choice = choice or CounterChoice(self.counter, self.counter.approximate)
        if choice.tokenizer != self.counter.name:
            return await self._get_context_recounted(ref, token_budget, min_version, choice)
        cached = self.cache.get(ref.base)
        argv = [token_budget, self.page_size, *((cached.inc, cached.first, cached.through) if cached else ("", 0, 0)),
                self.counter.name]

        async def read() -> list:
            return await self._call(lambda: self._get_context(keys=ref.keys[:4], args=argv), retry=True)

        reply = await read()
        if min_version and self._version_of(reply) < min_version:
            reply = await self._wait_then(ref, min_version, read, self._version_of)
        if reply[0] == 0:
            return self._response([], None, [], 0, 1, 0, choice)
        if reply[0] == -2:  # counted with another tokenizer (another configuration wrote the session)
            return await self._get_context_recounted(ref, token_budget, min_version, choice)
        if reply[0] == -1:
            raise self._pinned_over_budget(ref, token_budget, int(reply[3]), choice)
        _, inc, version, _first, ptok, used_summary, _sthrough, used, summary_blob, n_pinned, *rest = reply
        inc, version, n_pinned = inc.decode(), int(version), int(n_pinned)
        start, fetch_from = int(rest[n_pinned]), int(rest[n_pinned + 1])
        frames: list[bytes] = []
        if fetch_from > start:  # the script relied on what ``cached`` holds
            frames.extend(cached.frames[start - cached.first : fetch_from - cached.first])
            self.cache.hits += 1
        else:
            self.cache.misses += 1
        for seq, blob in enumerate(rest[n_pinned + 2 :], start=fetch_from):
            try:
                frames.append(frame(blob, message_id(inc, seq)))
            except DecodeError as exc:
                raise self._corrupt(memory_pb2.SessionMessage, ref, f"message {seq}", exc) from exc
        if frames:
            self.cache.put(ref.base, CachedWindow(inc, start, tuple(frames), sum(map(len, frames))))
        pinned = [self._decode(common_pb2.Message, blob, ref, f"pinned message {i}")
                  for i, blob in enumerate(rest[:n_pinned])]
        summary = self._decode(memory_pb2.SessionSummary, summary_blob, ref, "summary") if int(used_summary) else None
        tokens = int(ptok) + int(used) + (summary.tokens if summary is not None else 0)
        return self._response(pinned, summary, frames, version, start, tokens, choice)

    async def _get_context_recounted(
        self, ref: SessionRef, budget: int, min_version: int, choice: CounterChoice
    ) -> bytes:
        """:meth:`get_context` counted with ``choice.counter`` instead of the stored counts: the
        same priorities, computed here.

        Each message is counted once per process and tokenizer: its count is kept beside its frame
        in a cache window of (session, tokenizer) — a stored message never changes. The walk reads
        only what that window does not hold: CONTEXT_HEAD brings the pinned messages, the summary
        and the newest messages not held (at most a page), and LIST a page of older ones when the
        budget reaches them; messages are decoded and counted one by one as the walk reaches them.
        In a chat, a turn's read therefore counts the turn's new messages only. The pinned
        messages and the summary are counted once per content (:attr:`_side_counts`).
        Consistency: the head is one snapshot (version, first, summary, pinned); older messages are
        read from the same incarnation (they cannot change), those retention deleted meanwhile are
        left out as omitted, and a session deleted and created again meanwhile restarts the read
        (ABORTED after :data:`_RECOUNT_ATTEMPTS`)."""
        counter = choice.counter
        key = self._window_key(ref, counter.name)
        for _ in range(_RECOUNT_ATTEMPTS):
            held = self.cache.get(key)
            argv = [held.inc if held else "", held.through if held else 0, self.page_size]

            async def read(argv: list = argv) -> list:
                return await self._call(lambda: self._context_head(keys=ref.keys[:4], args=argv), retry=True)

            reply = await read()
            if min_version and self._version_of(reply) < min_version:
                reply = await self._wait_then(ref, min_version, read, self._version_of)
            if reply[0] == 0:
                return self._response([], None, [], 0, 1, 0, choice)
            _, inc, version, first, sthrough, summary_blob, n_pinned, *rest = reply
            inc, version, first, n_pinned = inc.decode(), int(version), int(first), int(n_pinned)
            fetched: dict[int, bytes] = dict(enumerate(rest[n_pinned + 1 :], start=int(rest[n_pinned])))
            if held is not None and held.inc != inc:
                held = None
            pinned = []
            ptok = 0
            for i, blob in enumerate(rest[:n_pinned]):
                pinned.append(self._decode(common_pb2.Message, blob, ref, f"pinned message {i}"))
                ptok += await self._side_count(counter, blob, pinned[-1])
            if ptok > budget:
                raise self._pinned_over_budget(ref, budget, ptok, choice)
            left, floor, summary, stok = budget - ptok, first, None, 0
            if summary_blob:
                candidate = self._decode(memory_pb2.SessionSummary, summary_blob, ref, "summary")
                stok = await self._side_count(counter, summary_blob, render_summary(candidate))
                if stok <= left:
                    summary, left, floor = candidate, left - stok, max(first, int(sthrough) + 1)
            frames: list[bytes] = []  # newest first while walking
            counts: list[int] = []
            used, seq, spare, restart = 0, version, None, False
            while seq >= floor:
                if held is not None and held.first <= seq <= held.through:
                    item = held.frames[seq - held.first], held.counts[seq - held.first]
                elif seq in fetched:
                    item = await self._count_stored(counter, fetched.pop(seq), ref, inc, seq)
                else:
                    lo = max(floor, seq - self.page_size + 1)
                    if held is not None and lo <= held.through < seq:
                        lo = held.through + 1
                    page = await self._call(
                        lambda args=[lo, seq, seq - lo + 1]: self._list(keys=ref.keys[:3], args=args), retry=True
                    )
                    if page[0] == 0 or page[1].decode() != inc:  # deleted (and maybe created again) meanwhile
                        restart = True
                        break
                    fetched.update(enumerate(page[5:], start=int(page[4])))
                    if int(page[4]) > lo:  # retention deleted messages from lo on meanwhile: they are omitted
                        floor = int(page[4])
                    continue
                if used + item[1] > left:
                    spare = item  # counted: kept in the window for a larger budget next time
                    break
                used += item[1]
                frames.append(item[0])
                counts.append(item[1])
                seq -= 1
            if restart:
                continue
            start = seq + 1
            frames.reverse()
            counts.reverse()
            self._keep_window(key, inc, start, frames, counts, spare, held)
            return self._response(pinned, summary, frames, version, start, ptok + used + (stok if summary else 0),
                                  choice)
        raise ServiceError(
            grpc.StatusCode.ABORTED,
            f"session {ref.session!r} was deleted and created again while being read, {_RECOUNT_ATTEMPTS} times; retry",
        )

    def _keep_window(
        self, key: str, inc: str, start: int, frames: list[bytes], counts: list[int], spare: tuple[bytes, int] | None,
        held: CachedWindow | None,
    ) -> None:
        """Cache what a recounted read counted: the returned messages ``start..``, the one that did
        not fit (``spare``), and up to a page of the older messages ``held`` already had (a read
        whose window slid forward keeps them, so a larger budget next does not count them again)."""
        first, frames, counts = start, list(frames), list(counts)
        if spare is not None:
            first, frames, counts = first - 1, [spare[0], *frames], [spare[1], *counts]
        if held is not None and held.inc == inc and held.first < first <= held.through + 1:
            lo = max(held.first, first - self.page_size)
            frames[:0] = held.frames[lo - held.first : first - held.first]
            counts[:0] = held.counts[lo - held.first : first - held.first]
            first = lo
        if frames:
            self.cache.put(key, CachedWindow(inc, first, tuple(frames), sum(map(len, frames)), tuple(counts)))

    @staticmethod
    def _window_key(ref: SessionRef, tokenizer: str) -> str:
        """Cache key of the session's window counted in ``tokenizer`` (the stored-count window is
        ``ref.base``; a session id holds no ``|`` or ``}``, so no two keys collide)."""
        return f"{ref.base}|{tokenizer}"

    async def _count_stored(
        self, counter: TokenCounter, blob: bytes, ref: SessionRef, inc: str, seq: int
    ) -> tuple[bytes, int]:
        """(frame, tokens with ``counter``) of a stored message; DATA_LOSS when it is corrupt."""
        try:
            framed, stored = decode_frame(blob, message_id(inc, seq))
        except DecodeError as exc:
            raise self._corrupt(memory_pb2.SessionMessage, ref, f"message {seq}", exc) from exc
        return framed, (await self.count_tokens([stored.message], counter))[0]

    async def _side_count(self, counter: TokenCounter, blob: bytes, message: common_pb2.Message) -> int:
        """Tokens of a pinned message or of the summary (``message``, stored as ``blob``) with
        ``counter``, remembered by content."""
        key = (counter.name, hashlib.blake2b(blob, digest_size=16).digest())
        tokens = self._side_counts.get(key)
        if tokens is None:
            tokens = (await self.count_tokens([message], counter))[0]
            self._side_counts[key] = tokens
            if len(self._side_counts) > _SIDE_COUNTS:
                self._side_counts.popitem(last=False)
        else:
            self._side_counts.move_to_end(key)
        return tokens

    @staticmethod
    def _pinned_over_budget(ref: SessionRef, budget: int, tokens: int, choice: CounterChoice) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"token_budget {budget} is smaller than the pinned messages of session {ref.session!r} "
            f"({tokens} tokens in {choice.tokenizer}); raise the budget or pin less",
        )

    @staticmethod
    def _response(
        pinned: list[common_pb2.Message], summary: memory_pb2.SessionSummary | None, frames: Sequence[bytes],
        version: int, start: int, tokens: int, choice: CounterChoice,
    ) -> bytes:
        """The serialized GetContextResponse: pinned messages, the summary when included, the
        frames of sequences ``start..version``."""
        head = memory_pb2.GetContextResponse(messages=pinned)
        covered = 0
        if summary is not None:
            head.messages.append(render_summary(summary))
            covered = summary.through_sequence
        count = version - start + 1
        tail = memory_pb2.GetContextResponse(
            tokens_used=tokens,
            version=version,
            messages_omitted=max(0, version - count - covered),
            pinned_messages=len(pinned),
            summary_included=summary is not None,
            summary_through_sequence=covered,
            first_sequence=start if count else 0,
            tokenizer=choice.tokenizer,
            tokens_approximate=choice.approximate,
        )
        # Serialized messages of one type concatenate into one message (repeated fields append in
        # order, and the ``messages``/``message_ids`` entries of each frame interleave harmlessly).
        return head.SerializeToString() + b"".join(frames) + tail.SerializeToString()

    async def list_messages(
        self, ref: SessionRef, from_sequence: int = 0, to_sequence: int = 0, limit: int = DEFAULT_LIST_LIMIT,
        min_version: int = 0,
    ) -> MessageRange:
        """Stored messages ``from_sequence..to_sequence`` (inclusive; 0 = oldest stored / newest),
        at most ``limit``, with their ids and sequences. Waits for ``min_version``."""
        if to_sequence and from_sequence > to_sequence:
            raise invalid_argument(f"from_sequence {from_sequence} is after to_sequence {to_sequence}")
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise invalid_argument(f"limit {limit} must be 1..{MAX_LIST_LIMIT}")
        argv = [from_sequence, to_sequence, limit]

        async def read() -> list:
            return await self._call(lambda: self._list(keys=ref.keys[:3], args=argv), retry=True)

        reply = await read()
        if min_version and self._version_of(reply) < min_version:
            reply = await self._wait_then(ref, min_version, read, self._version_of)
        if reply[0] == 0:
            return MessageRange([], 0, 0, "")
        _, inc, version, first, start, *blobs = reply
        inc, start = inc.decode(), int(start)
        out = []
        for i, blob in enumerate(blobs):
            seq = start + i
            item = self._decode(memory_pb2.SessionMessage, blob, ref, f"message {seq}")
            item.sequence = seq
            item.id = message_id(inc, seq)
            out.append(item)
        version, first = int(version), int(first)
        return MessageRange(out, version, first if version else 0, inc)

    async def describe(self, ref: SessionRef) -> SessionState:
        """Meta data, summary, pinned messages and retention of a session."""

        async def read() -> list:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(ref.keys[0])
                pipe.pttl(ref.keys[0])
                pipe.lrange(ref.keys[3], 0, -1)
                return await pipe.execute()

        meta, pttl, pinned = await self._call(read, retry=True)
        if not meta:
            return SessionState(exists=False)
        get = meta.get
        state = SessionState(
            exists=True,
            incarnation=get(b"inc", b"").decode(),
            version=_int(get(b"version")),
            first_sequence=_int(get(b"first")),
            summary_cumulative_tokens=_int(get(b"sumcum")),
            trimmed_tokens=_int(get(b"ttrim")),
            pinned=[self._decode(common_pb2.Message, b, ref, f"pinned message {i}") for i, b in enumerate(pinned)],
            ttl_s=_int(get(b"ttl")) if b"ttl" in meta else self.retention.ttl_s,
            keep_last_messages=_int(get(b"keep")) if b"keep" in meta else self.retention.keep_last_messages,
            expires_in_ms=max(0, int(pttl)),
            created_at_ms=_int(get(b"created")),
            updated_at_ms=_int(get(b"updated")),
        )
        if b"summary" in meta:
            state.summary = self._decode(memory_pb2.SessionSummary, meta[b"summary"], ref, "summary")
        return state

    async def head(self, ref: SessionRef) -> tuple[str, int]:
        """(incarnation, version) of the session; ("", 0) when it does not exist."""
        inc, version = await self._call(lambda: self.redis.hmget(ref.keys[0], ["inc", "version"]), retry=True)
        return (inc.decode(), _int(version)) if inc else ("", 0)

    async def incarnation(self, ref: SessionRef) -> str:
        """The session's incarnation, or "" when it does not exist."""
        value = await self._call(lambda: self.redis.hget(ref.keys[0], "inc"), retry=True)
        return value.decode() if value else ""

    async def wait_for_version(self, ref: SessionRef, min_version: int) -> int:
        """Wait until the session reaches ``min_version`` (read-your-writes); return its version.

        Waits at most ``read_wait_s`` (less when the call's deadline is nearer) on the session's
        notifications, then raises FAILED_PRECONDITION: with one Redis primary every acknowledged
        append is visible at once, so a version that does not appear was never acknowledged
        here, or was lost with the data (a failover to a replica that had not received it, or a
        deletion of the session)."""

        async def read() -> int:
            value = await self._call(lambda: self.redis.hget(ref.keys[0], "version"), retry=True)
            return _int(value)

        version = await read()
        if version >= min_version:
            return version
        return await self._wait_then(ref, min_version, read, lambda v: v)

    async def ping(self) -> None:
        """One PING; UNAVAILABLE when Redis does not answer. A refused or broken connection also
        drops every pooled connection, so none left from before an outage is used after it."""
        try:
            await self._call(self.redis.ping, retry=True)
        except ServiceError as err:
            if isinstance(err.__cause__, redis_errors.ConnectionError):
                await self.redis.connection_pool.disconnect()
            raise

    # -- retention index (the sweeper's side; see lua.py and retention.py) -------------------------

    async def claim_due(self, now_ms: int, lease_ms: int, limit: int) -> list[IndexEntry]:
        """Retention index entries due at ``now_ms``, claimed for ``lease_ms`` (another replica
        takes them over after that if this one does not finish them)."""
        members = await self._call(
            lambda: self._claim(keys=[self.index_key], args=[now_ms, lease_ms, limit]), retry=False
        )
        entries = []
        for member in members:
            try:
                entries.append(IndexEntry.parse(member.decode(), self.key_prefix))
            except (ValueError, ServiceError):  # not written by these scripts: it would come back forever
                await self._call(lambda member=member: self.redis.zrem(self.index_key, member), retry=False)
        return entries

    async def session_position(self, ref: SessionRef) -> tuple[str, int]:
        """(incarnation, first stored sequence) of the session; ("", 0) when it does not exist."""
        inc, first = await self._call(lambda: self.redis.hmget(ref.keys[0], ["inc", "first"]), retry=True)
        return (inc.decode(), _int(first)) if inc else ("", 0)

    async def pruned(self, entry: IndexEntry, first: int, now_ms: int) -> int:
        """Record that the facts of messages before ``first`` were pruned and reschedule the entry
        (lua.PRUNED). Returns its next due time (ms), -1 when it left the index."""
        return int(await self._call(
            lambda: self._pruned(keys=[entry.ref.keys[0], self.index_key],
                                 args=[entry.member, entry.incarnation, first, now_ms]),
            retry=False,
        ))

    async def indexed(self, entry: IndexEntry) -> bool:
        """Whether the entry is still in the index (DeleteSession removes its session's)."""
        return await self._call(lambda: self.redis.zscore(self.index_key, entry.member), retry=True) is not None

    async def unindex(self, entry: IndexEntry) -> None:
        """Remove an entry whose incarnation is gone (its facts have been pruned)."""
        await self._call(lambda: self.redis.zrem(self.index_key, entry.member), retry=False)

    async def index_entries(self) -> list[tuple[str, float]]:
        """Every (member, due time in ms) of the retention index (tests, operators)."""
        rows = await self._call(lambda: self.redis.zrange(self.index_key, 0, -1, withscores=True), retry=True)
        return [(m.decode(), score) for m, score in rows]

    # -- plumbing -------------------------------------------------------------------------------

    def _write_keys(self, ref: SessionRef) -> list[str]:
        return [*ref.keys, self.index_key]

    def _track(self, ref: SessionRef) -> tuple[str, str]:
        return ("1" if self.track_retention else "0", ref.index_prefix)

    @staticmethod
    def _version_of(reply: list) -> int:
        return int(reply[2]) if reply[0] != 0 else 0  # every non-empty reply has the version third

    async def _wait_then(self, ref: SessionRef, min_version: int, read: Callable[[], Awaitable[T]],
                         version_of: Callable[[T], int]) -> T:
        left = remaining_s()
        budget = self.read_wait_s if left is None else max(0.0, min(self.read_wait_s, left - 0.05))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        if self.events is not None and budget > 0:
            async with self.events.subscribe(ref.channel, confirm_s=min(budget, 0.5)) as waiter:
                while True:
                    reply = await read()
                    if version_of(reply) >= min_version:
                        return reply
                    left_s = deadline - loop.time()
                    if left_s <= 0:
                        break
                    await waiter.wait(min(left_s, 0.25))
        else:
            reply = await read()
            if version_of(reply) >= min_version:
                return reply
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"session {ref.session!r} is at version {version_of(reply)}, below min_version {min_version}, after "
            f"waiting {budget:.2g} s; that version was not acknowledged by this store or its data was lost "
            "(session deleted, or Redis failed over to a replica that had not received it)",
        )

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

    @classmethod
    def _decode(cls, kind: type[T], blob: bytes, ref: SessionRef, what: str) -> T:
        out = kind()
        try:
            out.ParseFromString(blob)
        except DecodeError as exc:
            raise cls._corrupt(kind, ref, what, exc) from exc
        return out

    @staticmethod
    def _corrupt(kind: type, ref: SessionRef, what: str, exc: Exception) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.DATA_LOSS,
            f"session {ref.session!r}: stored {what} is not a valid {kind.DESCRIPTOR.full_name} ({exc}); "
            "the session's data in Redis is corrupt",
        )


def _glob_escape(text: str) -> str:
    """``text`` with Redis glob metacharacters escaped (for SCAN MATCH)."""
    return re.sub(r"([*?\[\]\\^])", r"\\\1", text)
