"""Circuit breakers shared by every router replica, in Redis.

A deployment that is broken for one replica is broken for all of them, so with Redis configured
(and ``AGENTMESH_LLM_SHARED_BREAKERS``, on by default) each deployment's breaker lives in one Redis
hash that every replica reads and writes through one Lua script (:data:`BREAKER_LUA`, atomic, on
Redis's clock). The rules are those of :class:`.routing.CircuitBreaker` — at least
``min_requests`` verdicts in the last ``window_s`` seconds of which at least ``failure_rate``
failed → **open** for ``open_s`` → **half-open**: one probe call, across all replicas → success
closes, failure re-opens — with the window counted in one-second buckets (``ceil(window_s)``
buckets, so the hash never grows).

The hot path stays local. Each replica keeps a cached view of the shared state and decides from
it without a round trip: a closed circuit lets the call go, an open one skips the deployment until
its ``open_s`` has passed. What goes to Redis:
- a **failure** verdict at once (with the successes counted since the last write), because it may
  open the circuit — its reply refreshes the view;
- successes in bulk, with the view refresh that runs in the background at most every
  ``AGENTMESH_LLM_BREAKER_SYNC_S`` seconds while the deployment is used (a view never read, or
  older than :data:`STALE_SYNCS` × that — an idle deployment — is read before deciding instead);
- the **probe**: when the view says the open time has passed, taking the single probe slot is a
  round trip (the slot is leased for the call's timeout, so a replica that dies mid-probe does not
  block the deployment), and so is the probe's verdict.
So a replica learns that another one opened a circuit within ``BREAKER_SYNC_S`` (sooner if its own
call fails), and a healthy deployment costs one small script call per replica per
``BREAKER_SYNC_S``, not one per request.

When Redis does not answer, each breaker falls back to a local breaker fed with the same verdicts
(the per-replica behaviour of :class:`.routing.CircuitBreaker`), logs it once, and returns to the
shared state with the next successful refresh. In-flight counts and latency averages stay per
replica (they describe what one replica sees, like Envoy's outlier detection).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import redis
import redis.asyncio as aioredis

from agentmesh.services.llm.catalogue import CircuitBreakerConfig
from agentmesh.services.llm.routing import Circuit, CircuitBreaker

log = logging.getLogger("agentmesh.llm")

# KEYS: the deployment's hash. ARGV: op (sync | probe | verdict | release), probe token, successes,
# failures, window_s, min_requests, failure_rate, open_ms, probe lease ms, probe success (0/1).
# Fields: state (closed | open | half_open), opened (ms), probe (token), probe_until (ms), and
# bucket b:<second mod slots> = "second:successes:failures".
# Reply: {state, ms until an open circuit lets a probe through, 1 when the probe slot was granted}.
BREAKER_LUA = """
local key = KEYS[1]
local op, token = ARGV[1], ARGV[2]
local ok, fail = tonumber(ARGV[3]), tonumber(ARGV[4])
local window, min_requests, rate = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local open_ms, lease_ms, success = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10] == '1'
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local slots = math.max(1, math.ceil(window))
local state = redis.call('HGET', key, 'state') or 'closed'
local opened = tonumber(redis.call('HGET', key, 'opened') or '0')
local granted = 0

local function clear_buckets()
  for j = 0, slots - 1 do redis.call('HDEL', key, 'b:' .. j) end
end
local function set_open()
  clear_buckets()
  redis.call('HSET', key, 'state', 'open', 'opened', now)
  redis.call('HDEL', key, 'probe', 'probe_until')
  state, opened = 'open', now
end
local function set_closed()
  clear_buckets()
  redis.call('HSET', key, 'state', 'closed')
  redis.call('HDEL', key, 'opened', 'probe', 'probe_until')
  state = 'closed'
end

if op == 'sync' then
  if state == 'closed' and ok + fail > 0 then
    local field = 'b:' .. (sec % slots)
    local b_ok, b_fail = 0, 0
    local bucket = redis.call('HGET', key, field)
    if bucket then
      local s, o, f = string.match(bucket, '(%d+):(%d+):(%d+)')
      if tonumber(s) == sec then b_ok, b_fail = tonumber(o), tonumber(f) end
    end
    redis.call('HSET', key, field, sec .. ':' .. (b_ok + ok) .. ':' .. (b_fail + fail))
    if fail > 0 then
      local successes, failures = 0, 0
      for j = 0, slots - 1 do
        local b = redis.call('HGET', key, 'b:' .. j)
        if b then
          local s, o, f = string.match(b, '(%d+):(%d+):(%d+)')
          if tonumber(s) > sec - slots then
            successes = successes + tonumber(o)
            failures = failures + tonumber(f)
          end
        end
      end
      local total = successes + failures
      if total >= min_requests and failures / total >= rate then set_open() end
    end
  end
elseif op == 'probe' then
  if state == 'open' and now >= opened + open_ms then
    state = 'half_open'
    redis.call('HSET', key, 'state', 'half_open')
  end
  if state == 'half_open' and tonumber(redis.call('HGET', key, 'probe_until') or '0') <= now then
    redis.call('HSET', key, 'probe', token, 'probe_until', now + lease_ms)
    granted = 1
  end
elseif op == 'verdict' then
  if state == 'half_open' and redis.call('HGET', key, 'probe') == token then
    if success then set_closed() else set_open() end
  end
elseif op == 'release' then
  if redis.call('HGET', key, 'probe') == token then redis.call('HDEL', key, 'probe', 'probe_until') end
end

redis.call('PEXPIRE', key, 2 * (slots * 1000 + open_ms + lease_ms))
local remaining = 0
if state == 'open' then
  remaining = opened + open_ms - now
  if remaining <= 0 then state, remaining = 'half_open', 0 end
end
return {state, remaining, granted}
"""

#: A view older than this many BREAKER_SYNC_S (or never read) is refreshed before deciding, not after.
STALE_SYNCS = 10

_STATES = {"closed": Circuit.CLOSED, "open": Circuit.OPEN, "half_open": Circuit.HALF_OPEN}
#: A permit is False (skip the deployment), True (an ordinary call) or a probe token (str).
Permit = bool | str


class BreakerStore:
    """The breaker script bound to one Redis connection; ``replica`` names this process in probe
    tokens."""

    def __init__(self, client: aioredis.Redis, prefix: str):
        self.redis = client
        self.prefix = prefix
        self.replica = uuid.uuid4().hex[:12]
        self._script = client.register_script(BREAKER_LUA)
        self._probes = itertools.count(1)

    def token(self) -> str:
        return f"{self.replica}:{next(self._probes)}"

    async def run(self, name: str, config: CircuitBreakerConfig, op: str, *, token: str = "", ok: int = 0,
                  fail: int = 0, success: bool = False, lease_s: float = 0.0) -> tuple[Circuit, float, bool]:
        """(shared state, seconds until an open circuit lets a probe through, probe granted).
        Raises ``redis.RedisError``."""
        reply = await self._script(keys=[f"{self.prefix}:breaker:{name}"], args=[
            op, token, ok, fail, repr(float(config.window_s)), config.min_requests, repr(float(config.failure_rate)),
            math.ceil(config.open_s * 1000), math.ceil(lease_s * 1000), "1" if success else "0"])
        state = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        return _STATES[state], int(reply[1]) / 1000, bool(int(reply[2]))


class SharedCircuitBreaker:
    """The breaker of deployment ``name`` shared through ``store`` (module docstring), with the
    interface of :class:`.routing.CircuitBreaker` that the pipeline uses: ``acquire()`` →
    permit, ``report(permit, success)``, ``release(permit)``, ``state``, ``retry_in_s()``,
    ``refresh()``. ``spawn(coroutine)`` runs background refreshes; ``on_change(state)`` follows
    the state this replica sees (metrics)."""

    def __init__(self, name: str, config: CircuitBreakerConfig, store: BreakerStore, *, sync_s: float,
                 spawn: Callable[[Coroutine[Any, Any, None]], object],
                 on_change: Callable[[Circuit], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.config = config
        self.store = store
        self.sync_s = sync_s
        self._spawn = spawn
        self._on_change = on_change
        self._clock = clock
        #: Decides while Redis is unreachable; fed with every verdict meanwhile.
        self.local = CircuitBreaker(config, on_change=self._local_change, clock=clock)
        self._state = Circuit.CLOSED
        self._seen = Circuit.CLOSED  # last state reported to on_change
        self._due = 0.0  # clock() when an open circuit lets a probe through
        self._synced = -math.inf
        self._pending_ok = 0
        self._probe: str | None = None  # the probe token this replica holds
        self._degraded = False

    # --- the view -----------------------------------------------------------------------------

    @property
    def state(self) -> Circuit:
        if self._degraded:
            return self.local.state
        if self._state is Circuit.OPEN and self._clock() >= self._due:
            return Circuit.HALF_OPEN
        return self._state

    def retry_in_s(self) -> float:
        """Seconds until an open circuit lets a probe through (0 unless open)."""
        if self._degraded:
            return self.local.retry_in_s()
        return max(0.0, self._due - self._clock()) if self._state is Circuit.OPEN else 0.0

    def _apply(self, state: Circuit, remaining_s: float) -> None:
        now = self._clock()
        self._state, self._due, self._synced = state, now + remaining_s, now
        if self._degraded:
            self._degraded = False
            log.info("shared circuit breaker reachable again", extra={"fields": {"deployment": self.name}})
        self._notify()

    def _notify(self) -> None:
        state = self.state
        if state is not self._seen:
            self._seen = state
            if self._on_change:
                self._on_change(state)

    def _local_change(self, _state: Circuit) -> None:
        if self._degraded:
            self._notify()

    def _degrade(self, exc: Exception) -> None:
        self._synced = self._clock()  # retry the shared state after sync_s, not on every call
        self._pending_ok = 0  # the outage's verdicts stay with the local breaker
        if not self._degraded:
            self._degraded = True
            log.warning("shared circuit breaker unreachable; deciding on this replica's own verdicts",
                        extra={"fields": {"deployment": self.name, "error": str(exc)}})
            self._notify()

    async def refresh(self) -> None:
        """Push the successes counted so far and read the shared state (never raises)."""
        self._synced = self._clock()
        pending, self._pending_ok = self._pending_ok, 0
        try:
            state, remaining, _ = await self.store.run(self.name, self.config, "sync", ok=pending)
        except (redis.RedisError, OSError) as exc:
            self._degrade(exc)
            return
        self._apply(state, remaining)

    # --- a call -------------------------------------------------------------------------------

    async def acquire(self, lease_s: float = 60.0) -> Permit:
        """Whether a call may go out now: False, True, or a probe token (the one probe of a
        half-open circuit, leased for ``lease_s``; report or release it). A round trip only when
        an open circuit is due for its probe."""
        now = self._clock()
        age = now - self._synced
        if age >= STALE_SYNCS * self.sync_s and not self._degraded:
            await self.refresh()  # never read, or idle for long: read it before deciding
            now = self._clock()
        elif age >= self.sync_s:
            self._synced = now
            self._spawn(self.refresh())
        if self._degraded:
            return self.local.allow()
        if self._state is Circuit.CLOSED:
            return True
        if self._probe is not None or (self._state is Circuit.OPEN and now < self._due):
            return False
        token = self._probe = self.store.token()  # taken locally first: one probe per replica
        try:
            state, remaining, granted = await self.store.run(self.name, self.config, "probe", token=token,
                                                             lease_s=lease_s)
        except (redis.RedisError, OSError) as exc:
            self._probe = None
            self._degrade(exc)
            return self.local.allow()
        except BaseException:
            self._probe = None
            raise
        self._apply(state, remaining)
        if granted:
            return token
        self._probe = None
        return state is Circuit.CLOSED  # another replica's probe closed it meanwhile

    async def report(self, permit: Permit, success: bool) -> None:
        """The verdict of a call that was let through (a failure or a probe's verdict is written
        at once; successes are counted and written with the next refresh)."""
        self.local.record(success)
        if self._degraded and not isinstance(permit, str):
            return  # Redis is unreachable: the local breaker decides until the next refresh succeeds
        if isinstance(permit, str):
            self._probe = None
            try:
                state, remaining, _ = await self.store.run(self.name, self.config, "verdict", token=permit,
                                                           success=success)
            except (redis.RedisError, OSError) as exc:
                self._degrade(exc)
                return
            self._apply(state, remaining)
            return
        if success:
            self._pending_ok += 1
            return
        pending, self._pending_ok = self._pending_ok, 0
        try:
            state, remaining, _ = await self.store.run(self.name, self.config, "sync", ok=pending, fail=1)
        except (redis.RedisError, OSError) as exc:
            self._degrade(exc)
            return
        self._apply(state, remaining)

    def release(self, permit: Permit = True) -> None:
        """The call ended without a verdict (cancelled, refused before sending): a probe slot is
        given back for the next probe."""
        if isinstance(permit, str):
            self._probe = None
            self._spawn(self._release(permit))
        elif self._degraded:
            self.local.release()

    async def _release(self, token: str) -> None:
        try:
            await self.store.run(self.name, self.config, "release", token=token)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not give back a circuit breaker's probe slot; it frees itself when its lease ends",
                        extra={"fields": {"deployment": self.name, "error": str(exc)}})
