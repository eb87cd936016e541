"""The per-process cache of recent messages behind ``GetContext``.

A stored message never changes: its id names the session's incarnation and its sequence,
retention only deletes whole messages from the front of a session, and a session deleted and
created again gets a new incarnation. So each process keeps, per session, the recent messages it
last returned, already in the wire format of ``GetContextResponse`` (one ``messages`` entry and
one ``message_ids`` entry each), and the context script sends only the messages it does not hold
(:data:`agentmesh.services.memory.lua.GET_CONTEXT`). Every call still runs the script — the
budget walk over the token counts, the pinned messages, the summary, the version — so a replica
never serves a stale context and read-your-writes holds across replicas; what the cache saves is
moving, decoding and re-encoding messages this process has already seen. In a chat, each turn's
read then costs the messages of one turn, whatever the length of the session.

A read counted in another tokenizer than the stored counts (GetContext's ``model``) keeps its
own window per (session, tokenizer), with each message's count in that tokenizer beside its frame
(:attr:`CachedWindow.counts`): a message's count never changes either, so each is computed once.

Bounds: ``max_bytes`` of frames in total, least recently used sessions evicted first; an entry
unused for ``idle_s`` is dropped (:meth:`ContextCache.expire` runs periodically), so the content
of a deleted session does not stay in a replica's memory beyond that. DeleteSession and ForgetUser
drop this replica's entries at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from agentmesh.memory.v1 import memory_pb2

#: Tag of SessionMessage.message (field 3, length-delimited): how every stored message starts.
_STORED_MESSAGE_TAG = 0x1A
#: Tags of GetContextResponse.messages (field 1) and .message_ids (field 9), length-delimited.
_RESPONSE_MESSAGE_TAG = b"\x0a"
_RESPONSE_ID_TAG = b"\x4a"


@dataclass(frozen=True)
class CachedWindow:
    """Frames of sequences ``first .. first + len(frames) - 1`` of incarnation ``inc``, and for a
    window counted in a requested tokenizer, the token ``counts`` of the same messages (else
    empty). Immutable: a coroutine that read it keeps a consistent view while others replace it."""

    inc: str
    first: int
    frames: tuple[bytes, ...]
    size: int
    counts: tuple[int, ...] = ()

    @property
    def through(self) -> int:
        return self.first + len(self.frames) - 1


def frame(blob: bytes, message_id: str) -> bytes:
    """``GetContextResponse`` wire entries (one message, its id) of a stored ``SessionMessage``.

    The blob is parsed once (``DecodeError`` when it is not a SessionMessage); the message bytes
    are then reused as they are: a blob written by the store starts with the message field, so
    the entry is the same bytes under the tag of ``messages``."""
    return decode_frame(blob, message_id)[0]


def decode_frame(blob: bytes, message_id: str) -> tuple[bytes, memory_pb2.SessionMessage]:
    """:func:`frame` and the parsed ``SessionMessage`` (for a caller that also counts it)."""
    stored = memory_pb2.SessionMessage.FromString(blob)
    if blob and blob[0] == _STORED_MESSAGE_TAG:
        length, shift, pos = 0, 0, 1
        while True:
            byte = blob[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        message = _RESPONSE_MESSAGE_TAG + blob[1 : pos + length]
    else:  # not written by this store's append (field order differs): re-encode
        message = memory_pb2.GetContextResponse(messages=[stored.message]).SerializeToString()
    encoded_id = message_id.encode()
    if len(encoded_id) < 0x80:  # always for <16 hex>-<sequence>: a one-byte length
        return message + _RESPONSE_ID_TAG + bytes((len(encoded_id),)) + encoded_id, stored
    return message + memory_pb2.GetContextResponse(message_ids=[message_id]).SerializeToString(), stored


class ContextCache:
    """Recent-message frames per session (see the module docstring). ``max_bytes`` 0 disables it."""

    def __init__(self, max_bytes: int = 64 * 2**20, idle_s: float = 300.0):
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self._entries: OrderedDict[str, tuple[CachedWindow, float]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedWindow | None:
        """The session's window, or None (also when it has been idle for ``idle_s``)."""
        item = self._entries.get(key)
        if item is None:
            return None
        window, used_at = item
        now = time.monotonic()
        if now - used_at > self.idle_s:
            self.drop(key)
            return None
        self._entries[key] = (window, now)
        self._entries.move_to_end(key)
        return window

    def put(self, key: str, window: CachedWindow) -> None:
        """Replace the session's window, then evict least recently used sessions down to
        ``max_bytes`` (a window larger than that is not kept)."""
        self.drop(key)
        if not window.frames or window.size > self.max_bytes:
            return
        self._entries[key] = (window, time.monotonic())
        self._bytes += window.size
        while self._bytes > self.max_bytes:
            self.drop(next(iter(self._entries)))

    def drop(self, key: str) -> None:
        item = self._entries.pop(key, None)
        if item is not None:
            self._bytes -= item[0].size

    def drop_prefix(self, prefix: str) -> int:
        """Drop every session whose key starts with ``prefix``; returns how many."""
        keys = [k for k in self._entries if k.startswith(prefix)]
        for key in keys:
            self.drop(key)
        return len(keys)

    def expire(self) -> int:
        """Drop the sessions idle for more than ``idle_s``; returns how many."""
        deadline = time.monotonic() - self.idle_s
        expired = [k for k, (_, used_at) in self._entries.items() if used_at < deadline]
        for key in expired:
            self.drop(key)
        return len(expired)

