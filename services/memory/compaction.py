"""Compaction: fold a session's older messages into its running summary through the LLM router.

When a session's messages that no summary covers pass ``trigger_tokens``, the service schedules
a compaction in the background (``CompactSession`` runs one on demand). One compaction:

1. takes the session's compaction lock in Redis (one compaction per session across replicas);
2. leaves the newest ``keep_recent_tokens`` out, and ends the summarized range at a turn
   boundary: just before a user message when possible, else never right before a tool result,
   so a tool call and its result are never split between summary and recent messages;
3. cuts the range into windows of at most ``window_tokens`` and, for each window, asks the router
   for an updated summary of (summary so far + window). Each call is bounded no matter how big
   the backlog is, so a summarizer never overflows its context; a single message larger than a
   window is shortened for the summarizer only. At most ``max_windows`` calls per compaction —
   a bigger backlog continues on the next trigger;
4. writes the summary after each window with a compare-and-set (the session must still have the
   same incarnation and the same summary end), so a deleted session is never resurrected and two
   compactions never overwrite each other.

The summarized messages are NOT deleted: ``ListMessages`` still returns them; only retention
deletes messages. GetContext returns the summary in their place.

Summarizer: with a language model behind the router (``ListModels`` reports ``is_llm``) the
window is sent as a transcript with instructions (:data:`INSTRUCTIONS`). Without one — or when the
router fell back to its extractive provider — the router's extractive provider (``model =
"extractive"``) gets each message (and the summary so far) as a context chunk and the window's
text as the question: it quotes the sentences that score best against the whole window
(Okapi BM25, at most 3), which becomes the summary with its ``[n]`` markers removed. That summary
is a lossy excerpt, and says so (``is_llm = false``).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import grpc
import redis.exceptions as redis_errors
from google.protobuf import json_format

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.services.memory.router import EXTRACTIVE_MODEL, RouterClient
from agentmesh.services.memory.store import SessionRef, SessionStore
from agentmesh.services.runtime.errors import ServiceError

log = logging.getLogger("agentmesh.memory")

_MARKER = re.compile(r"\s*\[\d{1,4}\]")
_TERM = re.compile(r"\w")
_ROLE = {
    common_pb2.ROLE_SYSTEM: "System",
    common_pb2.ROLE_USER: "User",
    common_pb2.ROLE_ASSISTANT: "Assistant",
    common_pb2.ROLE_TOOL: "Tool",
}


def instructions(max_words: int) -> str:
    """System prompt of an LLM summarization call."""
    return (
        "You keep the running summary of a conversation between a user and an assistant. Rewrite the "
        "summary so that it also covers the new messages. Keep what later turns may need: facts about the "
        "user, decisions, names, numbers, commitments, open questions and tool results that matter. Write "
        f"plain prose in the third person, at most {max_words} words. Reply with the summary only."
    )


@dataclass(frozen=True)
class CompactionSettings:
    #: Unsummarized stored tokens above which a session is compacted in the background; 0 = never.
    trigger_tokens: int = 4000
    #: Newest tokens left out of the summary (they stay verbatim in GetContext).
    keep_recent_tokens: int = 1000
    #: Most message tokens per summarization call.
    window_tokens: int = 3000
    #: Longest summary, in tokens (the router's ``max_tokens``).
    summary_max_tokens: int = 400
    #: Summarization calls per compaction.
    max_windows: int = 8
    #: Seconds the compaction lock lives if its holder dies.
    lock_timeout_s: float = 300.0


@dataclass
class CompactionResult:
    compacted: bool
    messages_summarized: int = 0
    summary: memory_pb2.SessionSummary | None = None
    #: True when more old messages remain than one compaction handles.
    more: bool = False


def _render(item: memory_pb2.SessionMessage, max_chars: int | None) -> str:
    """One message as a transcript line (tool calls and results spelled out)."""
    m = item.message
    text = m.content
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars].rstrip() + " …"
    parts = [text] if text else []
    for call in m.tool_calls:
        args = json_format.MessageToJson(call.arguments, indent=None)
        parts.append(f"(calls tool {call.name} with {args})")
    who = _ROLE.get(m.role, "Message")
    if m.role == common_pb2.ROLE_TOOL and m.name:
        who = f"Tool {m.name}"
    return f"{who}: {' '.join(parts)}"


class Compactor:
    """Runs compactions of sessions in ``store`` with summaries from ``router``."""

    def __init__(self, store: SessionStore, router: RouterClient, settings: CompactionSettings):
        self.store = store
        self.router = router
        self.settings = settings

    def due(self, unsummarized_tokens: int) -> bool:
        """Whether an append that leaves this many unsummarized tokens should trigger compaction."""
        return 0 < self.settings.trigger_tokens < unsummarized_tokens

    async def compact(self, ref: SessionRef, *, wait_lock_s: float) -> CompactionResult:
        """Compact ``ref`` now (see the module docstring). ``wait_lock_s``: how long to wait for
        a compaction already running elsewhere (ABORTED after that). Raises UNAVAILABLE when
        Redis or the router fails; what was written before the failure stays."""
        lock = self.store.redis.lock(
            ref.lock_key, timeout=self.settings.lock_timeout_s, blocking=wait_lock_s > 0,
            blocking_timeout=wait_lock_s or None,
        )
        acquired = await self.store._call(lock.acquire, retry=False)
        if not acquired:
            raise ServiceError(
                grpc.StatusCode.ABORTED,
                f"another compaction of session {ref.session!r} is running; retry when it has finished",
            )
        try:
            return await self._compact_locked(ref)
        finally:
            try:
                await lock.release()
            except (redis_errors.LockError, redis_errors.RedisError):
                pass  # expired, deleted with the session, or Redis went away: nothing to release

    async def _compact_locked(self, ref: SessionRef) -> CompactionResult:
        s = self.settings
        state = await self.store.describe(ref)
        if not state.exists or state.version == 0:
            return CompactionResult(False)
        summary = state.summary
        through = summary.through_sequence if summary is not None else 0
        start = max(through + 1, state.first_sequence)
        if start > state.version:
            return CompactionResult(False, summary=summary)
        # Cumulative tokens through start - 1: the summary's, or (after retention deleted
        # unsummarized messages) those of the deleted messages.
        base = state.summary_cumulative_tokens if start == through + 1 else state.trimmed_tokens

        # Read the unsummarized messages (in pages), enough for this compaction's windows.
        items: list[memory_pb2.SessionMessage] = []
        cap = s.max_windows * s.window_tokens + s.keep_recent_tokens
        read_tokens = 0
        cursor = start
        while cursor <= state.version:
            page = await self.store.list_messages(ref, from_sequence=cursor, limit=1000)
            if page.incarnation != state.incarnation or not page.messages or page.messages[0].sequence != cursor:
                return CompactionResult(False, summary=summary)  # deleted, replaced or trimmed meanwhile
            for item in page.messages:
                if item.sequence > state.version:
                    break
                items.append(item)
                read_tokens += item.tokens
            cursor = page.messages[-1].sequence + 1
            if read_tokens > cap + s.window_tokens:
                break
        reached_end = cursor > state.version

        # Leave the newest keep_recent_tokens out (only known when the read reached the end).
        last = len(items) - 1
        if reached_end:
            kept = 0
            while last >= 0 and kept + items[last].tokens <= s.keep_recent_tokens:
                kept += items[last].tokens
                last -= 1
        # items[last + 1] must exist to judge a boundary after items[last].
        last = min(last, len(items) - 2)
        end = self._boundary(items, 0, last)
        if end is None:
            return CompactionResult(False, summary=summary)

        summarized = 0
        done = 0
        i = 0
        while i <= end and done < s.max_windows:
            j, tokens = i, items[i].tokens
            while j + 1 <= end and tokens + items[j + 1].tokens <= s.window_tokens:
                j += 1
                tokens += items[j].tokens
            if j < end:  # not the last window: end it at a boundary as well
                boundary = self._boundary(items, i, j)
                j = j if boundary is None else boundary
                tokens = sum(item.tokens for item in items[i : j + 1])
            window = items[i : j + 1]
            new = await self._summarize(summary, window)
            new.from_sequence = summary.from_sequence if summary is not None else window[0].sequence
            new.through_sequence = window[-1].sequence
            new.updated_at_ms = int(time.time() * 1000)
            written = await self.store.write_summary(
                ref, state.incarnation, summary.through_sequence if summary is not None else 0, new, base + tokens
            )
            if written != 1:
                log.info(
                    "compaction stopped: the session changed under it",
                    extra={"fields": {"session": ref.session, "reason": "deleted" if written == 0 else "raced"}},
                )
                break
            summary, base = new, base + tokens
            summarized += len(window)
            done += 1
            i = j + 1
        more = i <= end or not reached_end
        log.info(
            "session compacted",
            extra={"fields": {"session": ref.session, "messages": summarized, "windows": done,
                              "through": summary.through_sequence if summary else 0, "more": more}},
        )
        return CompactionResult(summarized > 0, summarized, summary, more)

    @staticmethod
    def _boundary(items: list[memory_pb2.SessionMessage], lo: int, hi: int) -> int | None:
        """The best index ``k`` in ``lo..hi`` to end a summarized range at (``items[k + 1]``
        must exist): the last one followed by a user message, else the last one not followed by a
        tool result; None when there is none."""
        fallback = None
        for k in range(hi, lo - 1, -1):
            following = items[k + 1].message.role
            if following == common_pb2.ROLE_USER:
                return k
            if fallback is None and following != common_pb2.ROLE_TOOL:
                fallback = k
        return fallback

    async def _summarize(
        self, summary: memory_pb2.SessionSummary | None, window: list[memory_pb2.SessionMessage]
    ) -> memory_pb2.SessionSummary:
        """The summary covering ``summary`` + ``window`` (provider fields set; ranges not)."""
        s = self.settings
        previous = summary.text if summary is not None else ""
        # Shorten any message that alone would overflow a window (the summarizer's input only).
        limits = [
            max(200, int(len(item.message.content) * s.window_tokens / item.tokens))
            if item.tokens > s.window_tokens else None
            for item in window
        ]
        lines = [_render(item, limit) for item, limit in zip(window, limits, strict=True)]
        if not any(_TERM.search(line.split(":", 1)[1]) for line in lines):
            # Nothing with words to summarize (e.g. only emoji): the summary just moves on.
            return memory_pb2.SessionSummary(
                text=previous, provider=summary.provider if summary else "", model=summary.model if summary else "",
                is_llm=summary.is_llm if summary else False,
            )
        options = llm_pb2.GenerationOptions(max_tokens=s.summary_max_tokens, temperature=0.0)
        if await self.router.is_llm():
            request = llm_pb2.GenerateRequest(
                messages=[
                    common_pb2.Message(
                        role=common_pb2.ROLE_SYSTEM, content=instructions(int(s.summary_max_tokens * 0.7))
                    ),
                    common_pb2.Message(
                        role=common_pb2.ROLE_USER,
                        content=f"Summary so far:\n{previous or '(none yet)'}\n\nNew messages:\n" + "\n".join(lines),
                    ),
                ],
                options=options,
            )
            reply = await self.router.generate(request)
            if reply.metadata.is_llm and reply.message.content.strip():
                return memory_pb2.SessionSummary(
                    text=reply.message.content.strip(), provider=reply.metadata.provider, model=reply.metadata.model,
                    is_llm=True,
                )
            log.warning("summarizer fell back to the extractive provider",
                        extra={"fields": {"notice": reply.metadata.notice}})
        context = []
        if previous:
            context.append(common_pb2.Chunk(chunk_id="summary", title="summary so far", text=previous))
        context.extend(
            common_pb2.Chunk(chunk_id=f"message-{item.sequence}", title=f"message {item.sequence}", text=line)
            for item, line in zip(window, lines, strict=True)
        )
        question = " ".join(line.split(":", 1)[1] for line in lines)
        reply = await self.router.generate(
            llm_pb2.GenerateRequest(
                model=EXTRACTIVE_MODEL,
                messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=question)],
                context=context,
                options=options,
            )
        )
        text = _MARKER.sub("", reply.message.content).strip()
        return memory_pb2.SessionSummary(
            text=text or previous, provider=reply.metadata.provider, model=reply.metadata.model, is_llm=False
        )
