"""Retention of derived data: the facts whose source messages retention deleted.

``DeleteSession`` and ``ForgetUser`` delete facts themselves, in the call. TTL expiry and
keep-last trimming delete messages inside Redis — an expiry without any client call at all — so
the facts extracted from those messages are found afterwards, through the retention index that
the session scripts keep in the same atomic step as the data (see :mod:`~agentmesh.services.memory.lua`):
one entry per session incarnation that has a TTL or trimmed messages, due at the expiry or at once
after a trim. Keyspace notifications are not used: Redis sends them only to clients connected at
that moment, so an expiry while every replica restarts would leave facts behind forever.

:class:`RetentionSweeper` takes the due entries every ``interval_s`` and, for each:

- the incarnation is gone (its keys expired; the session may exist again with a new
  incarnation): every source naming a message of that incarnation is dropped from the user's
  facts, and the entry is removed;
- the incarnation is still there: the sources naming messages trimmed from its front (sequence
  below ``first``) are dropped, and the entry is rescheduled (``lua.PRUNED``).

A fact left without any source is deleted, in Milvus; one that keeps a source — a message that is
still stored, another session, or a source naming no message (``RememberFacts`` without a
message id: nothing says it came from a deleted message) — is kept with that source only. Each
entry is handled under the user's facts lock, the lock every fact write takes, so a fact being
merged at the same moment cannot lose the merge. Facts thus go within ``interval_s`` of the
expiry or the trim, plus the time to prune them.

Failures: entries are claimed with a lease (``lease_s``), so replicas never handle the same entry
at once and the entries of a sweeper that died are taken over when the lease ends; pruning is
idempotent. While Milvus (or Redis) fails, entries stay due and are retried at the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import AsyncContextManager

from agentmesh.services.memory.facts import FactStore
from agentmesh.services.memory.store import IndexEntry, SessionStore
from agentmesh.services.runtime.errors import ServiceError

log = logging.getLogger("agentmesh.memory")


def sequence_in(message_id: str, incarnation: str) -> int | None:
    """The sequence of ``message_id`` when it names a message of ``incarnation``, else None."""
    inc, _, seq = message_id.rpartition("-")
    return int(seq) if inc == incarnation and seq.isdigit() else None


@dataclass
class SweepResult:
    """What one :meth:`RetentionSweeper.sweep` did."""

    entries: int = 0
    facts_deleted: int = 0
    facts_updated: int = 0


class RetentionSweeper:
    """Prunes facts after TTL expiry and keep-last trimming (see the module docstring).

    ``facts``: the facts store, or None while it is not ready (the sweep then waits).
    ``user_lock(tenant, user)``: the user's facts lock. ``interval_s``: seconds between sweeps;
    ``batch``: entries claimed at once; ``lease_s``: how long a claim keeps other replicas off.
    ``on_tick``: also run at every tick (the service expires its context cache there).
    """

    def __init__(self, store: SessionStore, facts: Callable[[], FactStore | None],
                 user_lock: Callable[[str, str], AsyncContextManager[None]], *, interval_s: float = 5.0,
                 batch: int = 100, lease_s: float = 60.0, on_tick: Callable[[], object] | None = None):
        self.store = store
        self.facts = facts
        self.user_lock = user_lock
        self.interval_s = interval_s
        self.batch = batch
        self.lease_s = lease_s
        self.on_tick = on_tick
        self.total = SweepResult()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="memory-retention")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self.on_tick is not None:
                self.on_tick()
            try:
                await self.sweep()
            except ServiceError as err:
                log.warning("retention sweep failed; retrying at the next tick", extra={"fields": {
                    "error": err.message}})
            except Exception:  # noqa: BLE001 - the loop must outlive one bad sweep
                log.exception("retention sweep failed; retrying at the next tick")

    async def sweep(self) -> SweepResult:
        """Handle every entry due now (in batches); nothing while the facts store is not ready."""
        result = SweepResult()
        facts = self.facts()
        if facts is None:
            return result
        now_ms = int(time.time() * 1000)
        while True:
            entries = await self.store.claim_due(now_ms, int(self.lease_s * 1000), self.batch)
            for entry in entries:
                deleted, updated = await self._prune(facts, entry)
                result.entries += 1
                result.facts_deleted += deleted
                result.facts_updated += updated
            if len(entries) < self.batch:
                break
        self.total.entries += result.entries
        self.total.facts_deleted += result.facts_deleted
        self.total.facts_updated += result.facts_updated
        return result

    async def _prune(self, facts: FactStore, entry: IndexEntry) -> tuple[int, int]:
        ref, incarnation = entry.ref, entry.incarnation
        async with self.user_lock(ref.tenant, ref.user):
            current, first = await self.store.session_position(ref)
            if current != incarnation:
                if not await self.store.indexed(entry):
                    return 0, 0  # deleted by DeleteSession, which handled the facts (keep_facts holds)
                deleted, updated = await facts.prune_sources(
                    ref.tenant, ref.user, ref.session, lambda mid: sequence_in(mid, incarnation) is not None
                )
                await self.store.unindex(entry)
                why = "session expired"
            else:
                deleted, updated = await facts.prune_sources(
                    ref.tenant, ref.user, ref.session,
                    lambda mid: (seq := sequence_in(mid, incarnation)) is not None and seq < first,
                )
                # A fresh "now": what is due again because of trims made meanwhile waits for the
                # next tick instead of being claimed again by this sweep.
                await self.store.pruned(entry, first, int(time.time() * 1000))
                why = "messages trimmed"
        if deleted or updated:
            log.info("facts pruned after retention", extra={"fields": {
                "session": ref.session, "reason": why, "facts_deleted": deleted, "facts_updated": updated}})
        return deleted, updated
