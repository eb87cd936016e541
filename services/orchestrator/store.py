"""Durable runs in Redis: checkpoints, the event stream, leases, cancellation, retention.

Keys of a run (one Redis Cluster hash slot per run: ``{tenant:run_id}`` is the hash tag)::

    <prefix>:run:{t:id}:state    the checkpoint (state.RunState as JSON)        TTL run_ttl_s
    <prefix>:run:{t:id}:events   the events (a stream, entry id 0-<sequence>,   TTL run_ttl_s,
                                 field ``e`` = serialized RunResponse)          MAXLEN max_events
    <prefix>:run:{t:id}:lease    the replica running it                         PX lease_ms
    <prefix>:run:{t:id}:cancel   a cancellation request (CancelRun)             TTL run_ttl_s
    <prefix>:tenant:<t>:runs     the tenant's runs by start time (sorted set)   keep-last-N

A new run is recorded in one round trip (its lease, first checkpoint and index entry). Every
later write of a running run goes through one Lua script that first checks the lease is still
held by the writer (fencing: a replica that lost its run, e.g. after a long pause, cannot
overwrite the new owner's state), then appends the buffered events and the checkpoint together.

Storage is bounded three ways: each run's keys expire ``run_ttl_s`` after its last write; its
event stream keeps the last ``max_events`` events; a tenant keeps its last ``max_runs`` runs (the
older finished ones are deleted when a new run starts; running and paused runs are never
pruned, only expired).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from redis.exceptions import NoScriptError, RedisError

from agentmesh.agent.v1 import agent_pb2
from agentmesh.services.orchestrator.state import RunState
from agentmesh.services.runtime.errors import ServiceError
from agentmesh.services.runtime.redis_pool import pooled_redis

log = logging.getLogger("agentmesh.orchestrator")

_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 7, #ARGV, 2 do
  redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[4], '0-' .. ARGV[i], 'e', ARGV[i + 1])
end
if ARGV[5] ~= '' then redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[3]) end
redis.call('EXPIRE', KEYS[3], ARGV[3])
if ARGV[6] == '1' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# A new run: take its lease and write its first checkpoint (0 when the id is already taken).
_START = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(Exception):
    """Another replica owns the run now; this one must stop without writing."""


def store_unavailable(exc: Exception) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, f"run store (Redis) unavailable: {exc}")


class RunKeys:
    def __init__(self, prefix: str, tenant: str, run_id: str):
        tag = f"{{{tenant}:{run_id}}}"
        self.state = f"{prefix}:run:{tag}:state"
        self.events = f"{prefix}:run:{tag}:events"
        self.lease = f"{prefix}:run:{tag}:lease"
        self.cancel = f"{prefix}:run:{tag}:cancel"
        self.index = f"{prefix}:tenant:{tenant}:runs"


class RunStore:
    """Redis access for runs. Methods raise :class:`ServiceError` (UNAVAILABLE) when Redis fails.

    Commands share one :class:`~agentmesh.services.runtime.redis_pool.DeadlinePool` of ``max_connections`` connections; a command that
    finds them all busy waits up to ``pool_timeout_s`` (and within its call's deadline)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "agentmesh:orchestrator",
        lease_ms: int = 10_000,
        run_ttl_s: int = 7 * 86_400,
        max_events: int = 10_000,
        max_runs: int = 1_000,
        max_connections: int = 256,
        pool_timeout_s: float = 10.0,
    ):
        self.redis = pooled_redis(
            url, max_connections=max_connections, pool_timeout_s=pool_timeout_s, socket_connect_timeout=2, socket_timeout=10
        )
        self.url = url
        self.prefix = prefix
        self.lease_ms = lease_ms
        self.run_ttl_s = run_ttl_s
        self.max_events = max_events
        self.max_runs = max_runs
        self._commit = self.redis.register_script(_COMMIT)
        self._start = self.redis.register_script(_START)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        #: Background retention passes in flight, by tenant index key.
        self._pruning: dict[str, asyncio.Task] = {}

    def keys(self, tenant: str, run_id: str) -> RunKeys:
        return RunKeys(self.prefix, tenant, run_id)

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        for task in list(self._pruning.values()):
            task.cancel()
        await asyncio.gather(*self._pruning.values(), return_exceptions=True)
        await self.redis.aclose()

    # -- state and events ------------------------------------------------------------------

    async def load(self, keys: RunKeys) -> RunState | None:
        try:
            raw = await self.redis.get(keys.state)
        except (RedisError, OSError) as exc:
            raise store_unavailable(exc) from exc
        return None if raw is None else RunState.model_validate_json(raw)

    async def commit(
        self, keys: RunKeys, owner: str, events: list[tuple[int, bytes]], state: bytes | None, release: bool
    ) -> None:
        """Append ``events`` and write ``state`` (when given) if ``owner`` still holds the lease;
        renew it, or drop it when ``release``. Raises :class:`LeaseLost` otherwise."""
        args: list = [owner, self.lease_ms, self.run_ttl_s, self.max_events, state or b"", "1" if release else "0"]
        for seq, data in events:
            args.extend((seq, data))
        try:
            ok = await self._commit(keys=[keys.lease, keys.state, keys.events], args=args)
        except (RedisError, OSError) as exc:
            raise store_unavailable(exc) from exc
        if not ok:
            raise LeaseLost(keys.state)

    async def event_bounds(self, keys: RunKeys) -> tuple[int, int]:
        """(first, last) sequence still stored; (0, 0) when none is."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xrange(keys.events, count=1)
                pipe.xrevrange(keys.events, count=1)
                first, last = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise store_unavailable(exc) from exc
        return (_seq(first[0][0]) if first else 0, _seq(last[0][0]) if last else 0)

    async def read_events(self, keys: RunKeys, after: int, count: int = 512, block_ms: int | None = None):
        """Events with sequence > ``after`` (at most ``count``), as (sequence, RunResponse);
        with ``block_ms``, waits that long for the first one."""
        try:
            if block_ms is None:
                entries = await self.redis.xrange(keys.events, min=f"0-{after + 1}", count=count)
            else:
                reply = await self.redis.xread({keys.events: f"0-{after}"}, count=count, block=block_ms)
                entries = reply[0][1] if reply else []
        except (RedisError, OSError) as exc:
            raise store_unavailable(exc) from exc
        return [(_seq(entry_id), agent_pb2.RunResponse.FromString(fields[b"e"])) for entry_id, fields in entries]

    # -- leases and cancellation -----------------------------------------------------------

    async def acquire(self, keys: RunKeys, owner: str) -> bool:
        try:
            return bool(await self.redis.set(keys.lease, owner, nx=True, px=self.lease_ms))
        except (RedisError, OSError) as exc:
            raise store_unavailable(exc) from exc

    async def release(self, keys: RunKeys, owner: str) -> None:
        try:
            await self._release(keys=[keys.lease], args=[owner])
        except (RedisError, OSError) as exc:
            log.warning("could not release a run lease", extra={"fields": {"key": keys.lease, "error": str(exc)}})

    async def lease_owner(self, keys: RunKeys) -> str:
        try:
            owner = await self.redis.get(keys.lease)
        except (RedisError, OSError) as exc:
            raise store_unavailable(exc) from exc
        return owner.decode() if owner else ""

    async def request_cancel(self, keys: RunKeys, reason: str) -> None:
        try:
            await self.redis.set(keys.cancel, reason or "cancelled", ex=self.run_ttl_s)
        except (RedisError, OSError) as exc:
            raise store_unavailable(exc) from exc

    async def _pipeline(self, build: Callable[[Any], None], script: Any) -> list:
        """Run the commands ``build`` queues (EVALSHA of ``script`` among them) in one round
        trip. redis-py's own script support would first ask SCRIPT EXISTS on every execution, a
        second round trip; instead a NOSCRIPT reply (a Redis restarted or failed over) loads the
        script and runs the pipeline again — its commands are idempotent."""
        async def run() -> list:
            async with self.redis.pipeline(transaction=False) as pipe:
                build(pipe)
                return await pipe.execute()

        try:
            return await run()
        except NoScriptError:
            await self.redis.script_load(script.script)
            return await run()

    async def heartbeat(self, owner: str, runs: list[RunKeys]) -> list[tuple[bool, str | None]]:
        """Renew the leases of ``runs`` and read their cancellation requests, in one round trip:
        (still ours, cancel reason or None) per run."""

        def build(pipe: Any) -> None:
            for keys in runs:
                pipe.evalsha(self._renew.sha, 1, keys.lease, owner, self.lease_ms)
                pipe.get(keys.cancel)

        replies = await self._pipeline(build, self._renew)
        out = []
        for i in range(0, len(replies), 2):
            cancel = replies[i + 1]
            out.append((bool(replies[i]), cancel.decode() if cancel is not None else None))
        return out

    async def start(self, keys: RunKeys, owner: str, state: RunState) -> bool:
        """Record a new run in one round trip: take its lease for ``owner``, write its first
        checkpoint, and index it under its tenant (pruning the tenant's oldest finished runs
        beyond ``max_runs``). False when the run id is taken."""
        state.updated_at_ms = int(time.time() * 1000)
        payload = state.model_dump_json()

        def build(pipe: Any) -> None:
            # Two hash slots (the run's keys, the tenant's index): a script and three commands.
            pipe.evalsha(self._start.sha, 2, keys.lease, keys.state, owner, self.lease_ms, payload, self.run_ttl_s)
            pipe.zadd(keys.index, {state.run_id: state.created_at_ms})
            pipe.expire(keys.index, self.run_ttl_s)
            pipe.zcard(keys.index)

        try:
            started, _, _, count = await self._pipeline(build, self._start)
        except (RedisError, OSError) as exc:
            raise store_unavailable(exc) from exc
        if count > self.max_runs and keys.index not in self._pruning:
            # Off the run's path (it would add three round trips before its first token); one
            # pass per tenant at a time, which removes the excess of every run started meanwhile.
            task = asyncio.ensure_future(self._prune(state.tenant, keys.index))
            self._pruning[keys.index] = task
            task.add_done_callback(lambda _: self._pruning.pop(keys.index, None))
        return bool(started)

    # -- retention -------------------------------------------------------------------------

    async def _prune(self, tenant: str, index: str) -> None:
        """Delete the tenant's oldest finished runs beyond ``max_runs`` (three round trips)."""
        try:
            excess = await self.redis.zcard(index) - self.max_runs
            if excess <= 0:
                return
            # Look a little further than the excess: some of the oldest may still run or be paused.
            oldest = [raw.decode() for raw in await self.redis.zrange(index, 0, min(excess + 32, 512) - 1)]
            async with self.redis.pipeline(transaction=False) as pipe:  # many hash slots: no MULTI
                for run_id in oldest:
                    pipe.get(self.keys(tenant, run_id).state)
                states = await pipe.execute()
            doomed = [
                run_id for run_id, raw in zip(oldest, states, strict=True)
                if raw is None or RunState.model_validate_json(raw).phase == "finished"
            ][:excess]
            if not doomed:
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for run_id in doomed:
                    old = self.keys(tenant, run_id)
                    pipe.delete(old.state, old.events, old.cancel)
                pipe.zrem(index, *doomed)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not prune old runs; the next run's start tries again",
                        extra={"fields": {"tenant": tenant, "error": str(exc)}})
            return
        log.info("pruned old runs", extra={"fields": {"tenant": tenant, "runs": len(doomed)}})


def _seq(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[1])


class Journal:
    """A run's event sequence and checkpoints, owned by one replica.

    :meth:`emit` numbers an event, hands it to local subscribers at once and buffers it for
    Redis. Writes (buffered events, with or without a checkpoint) form one chain: each is one
    script call that starts once the previous one finished, so stream ids are written in order
    and a checkpoint never covers an event that is not stored. Buffered events are written
    ``flush_interval_s`` after the first of them, or with the next checkpoint if that comes first.
    :meth:`checkpoint` writes at once and waits for the write. :meth:`checkpoint_behind` only
    snapshots the state: the snapshot goes with the next write (that flush, or a later
    checkpoint, which supersedes it), so it costs no round trip of its own — for checkpoints
    whose loss only means redoing work without side effects. A failed background write is raised
    by the next checkpoint or flush.
    """

    def __init__(
        self,
        store: RunStore,
        keys: RunKeys,
        owner: str,
        sequence: int,
        flush_interval_s: float = 0.1,
        on_event: Callable[[agent_pb2.RunResponse], None] | None = None,
    ):
        self.store = store
        self.keys = keys
        self.owner = owner
        self.sequence = sequence
        self.flush_interval_s = flush_interval_s
        self.on_event = on_event
        self._buffer: list[tuple[int, bytes]] = []
        #: A state snapshot from checkpoint_behind, not yet part of a write.
        self._state: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: The last write scheduled (the chain's tail).
        self._tail: asyncio.Future | None = None
        #: The failure of a write nobody waited for, raised by the next write.
        self._error: BaseException | None = None
        #: True once a checkpoint that releases the lease started.
        self.releasing = False

    def emit(self, event: agent_pb2.RunResponse) -> agent_pb2.RunResponse:
        self.sequence += 1
        event.sequence = self.sequence
        self._buffer.append((self.sequence, event.SerializeToString()))
        if self.on_event is not None:
            self.on_event(event)
        self._arm()
        return event

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval_s, self._flush_behind)

    def _flush_behind(self) -> None:
        self._timer = None
        if self._buffer or self._state is not None:
            self._schedule(None, release=False, behind=True)

    def _schedule(self, state: bytes | None, release: bool, behind: bool) -> asyncio.Future:
        """Queue one write of the buffered events and ``state`` (else the pending snapshot)
        behind the previous write."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        events, self._buffer = self._buffer, []
        state, self._state = state or self._state, None
        previous = self._tail

        async def write() -> None:
            if previous is not None and not previous.done():
                with contextlib.suppress(BaseException):  # its failure is reported by its own future
                    await asyncio.shield(previous)
            if events or state is not None:
                await self.store.commit(self.keys, self.owner, events, state, release)

        # A task of its own: a run cancelled mid-write must not leave it half-known (the script
        # may have run), nor lose the events it carries.
        task = asyncio.ensure_future(write())
        self._tail = task
        task.add_done_callback(self._note_failure if behind else _retrieve)
        return task

    def _note_failure(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _stamp(self, state: RunState, release: bool) -> bytes:
        self._raise_failure()
        state.sequence = self.sequence
        state.updated_at_ms = int(time.time() * 1000)
        if release:
            self.releasing = True
        return state.model_dump_json().encode()

    async def checkpoint(self, state: RunState, release: bool = False) -> None:
        """Write the buffered events and ``state`` (stamped with the last sequence); returns once
        it is stored. Raises :class:`LeaseLost` or UNAVAILABLE, also for an earlier write that
        failed in the background."""
        await asyncio.shield(self._schedule(self._stamp(state, release), release, behind=False))

    def checkpoint_behind(self, state: RunState) -> None:
        """Snapshot ``state`` (stamped with the last sequence) for the next write, which comes
        at most ``flush_interval_s`` later; returns at once."""
        self._state = self._stamp(state, False)
        self._arm()

    async def flush(self) -> None:
        """Write the buffered events (and a pending snapshot) now, after every earlier write."""
        await asyncio.shield(self._schedule(None, release=False, behind=False))
        self._raise_failure()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _retrieve(task: asyncio.Future) -> None:
    # The failure of an awaited write reaches its caller; retrieving it here keeps asyncio from
    # logging it again when that caller was cancelled meanwhile.
    if not task.cancelled():
        task.exception()
