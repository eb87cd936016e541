"""Cluster-wide admission (RPM / TPM limits), spend tracking and budgets, in Redis.

Every router replica runs the same two Lua scripts against one Redis, so a limit holds across any
number of replicas: a script runs atomically, so no two replicas can both take the last
tokens of a window, and the time is Redis's own clock (``TIME``), so replica clocks do not matter.

**Windows.** Each limited scope (``t:<tenant>``, ``k:<api key id>``, ``d:<deployment>``) keeps an
exact sliding one-minute log per limit: a sorted set of reservations scored by admission time
(ms) and, for TPM, a hash of reserved tokens per reservation plus their running sum. Admission
first drops the entries older than the window (subtracting their tokens from the sum), then checks
every limit of every scope of the request; it admits only if all pass, and then records the
reservation in all of them (all or nothing). Any 60-second interval therefore admits at most
``rpm`` requests and ``tpm`` reserved-then-reconciled tokens. Amortised cost is O(log n) per
request (each entry is added and expired once).

**Reservation and reconciliation.** A request reserves ``prompt tokens + max_tokens`` (the prompt
counted by :mod:`.counting`) before the call. After the call the reservation is replaced by the
real usage (``input + output`` tokens reported by the provider, or the partial usage of a cut
stream; 0 for a call that failed before sending anything), freeing what the answer did not use.
Tokens stay attributed to the admission instant.

**Refusal.** When a limit is reached the script computes when the oldest entries will have left the
window enough for this request to fit — the retry delay returned to the caller as
``google.rpc.RetryInfo`` with RESOURCE_EXHAUSTED. A request that alone exceeds a TPM limit can
never be admitted and gets INVALID_ARGUMENT instead.

**Spend and budgets.** After each call its cost (USD, catalogue prices) is added to the tenant's
and the API key's spend of the current budget period (UTC ``day`` / ``month``, or ``total``);
a scope whose spend has reached its ``budget_usd`` is refused until the period ends (calls in flight
when the budget is reached still finish, so spend can pass the budget by at most their cost).

All keys share the hash tag ``{<prefix>}`` so that the scripts, which touch keys of several
scopes, also run on Redis Cluster (in one slot).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from agentmesh.services.llm.catalogue import LimitConfig

log = logging.getLogger("agentmesh.llm")

#: Length of the RPM / TPM window, in ms.
WINDOW_MS = 60_000

# KEYS per scope (5): rpm log, tpm log, tpm amounts, tpm sum, spend.
# ARGV: window_ms, reservation id, tokens, scope count, then per scope (4): rpm, tpm, budget_usd,
# ms until the budget period ends (-1: never).
# Returns {1, now_ms} when admitted; {0, wait_ms (-1: no retry helps), scope, limit, ...} when
# refused; {-1, scope, limit} when the request alone exceeds a TPM limit.
ADMIT_LUA = """
local window = tonumber(ARGV[1])
local id = ARGV[2]
local tokens = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = now - window
local wait = 0
local noretry = false
local refused = {}

local function expire(log_key, amount_key, sum_key)
  while true do
    local old = redis.call('ZRANGEBYSCORE', log_key, '-inf', horizon, 'LIMIT', 0, 500)
    if #old == 0 then return end
    local amounts = redis.call('HMGET', amount_key, unpack(old))
    local freed = 0
    for j = 1, #amounts do freed = freed + (tonumber(amounts[j]) or 0) end
    redis.call('HDEL', amount_key, unpack(old))
    redis.call('ZREM', log_key, unpack(old))
    if redis.call('DECRBY', sum_key, freed) < 0 then redis.call('SET', sum_key, 0) end
  end
end

for i = 0, n - 1 do
  local rpm_key, tpm_key, amount_key, sum_key, spend_key = KEYS[i*5+1], KEYS[i*5+2], KEYS[i*5+3], KEYS[i*5+4], KEYS[i*5+5]
  local rpm, tpm = tonumber(ARGV[5+i*4]), tonumber(ARGV[6+i*4])
  local budget, budget_wait = tonumber(ARGV[7+i*4]), tonumber(ARGV[8+i*4])
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', rpm_key, '-inf', horizon)
    local count = redis.call('ZCARD', rpm_key)
    if count + 1 > rpm then
      local e = redis.call('ZRANGE', rpm_key, count - rpm, count - rpm, 'WITHSCORES')
      wait = math.max(wait, tonumber(e[2]) + window - now)
      table.insert(refused, i); table.insert(refused, 'rpm')
    end
  end
  if tpm > 0 then
    if tokens > tpm then return {-1, i, 'tpm'} end
    expire(tpm_key, amount_key, sum_key)
    local sum = tonumber(redis.call('GET', sum_key) or '0')
    if sum + tokens > tpm then
      local need = sum + tokens - tpm
      local freed = 0
      local start = 0
      local found = false
      while not found do
        local page = redis.call('ZRANGE', tpm_key, start, start + 199, 'WITHSCORES')
        if #page == 0 then break end
        local members = {}
        for j = 1, #page, 2 do table.insert(members, page[j]) end
        local amounts = redis.call('HMGET', amount_key, unpack(members))
        for j = 1, #members do
          freed = freed + (tonumber(amounts[j]) or 0)
          if freed >= need then
            wait = math.max(wait, tonumber(page[j*2]) + window - now)
            found = true
            break
          end
        end
        start = start + 200
      end
      if not found then wait = math.max(wait, window) end
      table.insert(refused, i); table.insert(refused, 'tpm')
    end
  end
  if budget > 0 then
    local spent = tonumber(redis.call('GET', spend_key) or '0')
    if spent >= budget then
      if budget_wait < 0 then noretry = true else wait = math.max(wait, budget_wait) end
      table.insert(refused, i); table.insert(refused, 'budget')
    end
  end
end

if #refused > 0 then
  if noretry then wait = -1 end
  local out = {0, wait}
  for j = 1, #refused do table.insert(out, refused[j]) end
  return out
end

for i = 0, n - 1 do
  local rpm_key, tpm_key, amount_key, sum_key = KEYS[i*5+1], KEYS[i*5+2], KEYS[i*5+3], KEYS[i*5+4]
  local rpm, tpm = tonumber(ARGV[5+i*4]), tonumber(ARGV[6+i*4])
  if rpm > 0 then
    redis.call('ZADD', rpm_key, now, id)
    redis.call('PEXPIRE', rpm_key, window * 2)
  end
  if tpm > 0 then
    redis.call('ZADD', tpm_key, now, id)
    redis.call('HSET', amount_key, id, tokens)
    redis.call('INCRBY', sum_key, tokens)
    redis.call('PEXPIRE', tpm_key, window * 2)
    redis.call('PEXPIRE', amount_key, window * 2)
    redis.call('PEXPIRE', sum_key, window * 2)
  end
end
return {1, now}
"""

# KEYS per scope (4): tpm log, tpm amounts, tpm sum, spend.
# ARGV: reservation id, used tokens, scope count, then per scope (3): tracked (0/1), cost_usd,
# spend key lifetime in s (0: none).
SETTLE_LUA = """
local id = ARGV[1]
local used = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
for i = 0, n - 1 do
  local tpm_key, amount_key, sum_key, spend_key = KEYS[i*4+1], KEYS[i*4+2], KEYS[i*4+3], KEYS[i*4+4]
  local tracked, cost, ttl = ARGV[4+i*3], ARGV[5+i*3], tonumber(ARGV[6+i*3])
  if tracked == '1' then
    local reserved = redis.call('HGET', amount_key, id)
    if reserved then
      redis.call('HSET', amount_key, id, used)
      redis.call('INCRBY', sum_key, used - tonumber(reserved))
    end
  end
  if tonumber(cost) > 0 then
    redis.call('INCRBYFLOAT', spend_key, cost)
    if ttl > 0 then redis.call('EXPIRE', spend_key, ttl) end
  end
end
return 1
"""


@dataclass(frozen=True)
class Scope:
    """One limited identity: ``kind`` (``tenant``, ``api_key``, ``deployment``), ``id`` and its
    limits."""

    kind: str
    id: str
    limits: LimitConfig

    @property
    def tag(self) -> str:
        return {"tenant": "t", "api_key": "k", "deployment": "d"}[self.kind] + ":" + self.id


@dataclass
class Refusal:
    """Why admission refused: the ``(scope, limit)`` pairs reached and the delay after which a
    retry can succeed (None when no retry can: a request above a limit, a ``total`` budget)."""

    violations: list[tuple[Scope, str]]
    retry_after_s: float | None
    #: True when the request alone exceeds a TPM limit (INVALID_ARGUMENT, not RESOURCE_EXHAUSTED).
    too_large: bool = False


@dataclass
class Reservation:
    """An admitted request: reconcile it with :meth:`Admission.settle` once."""

    id: str
    scopes: list[Scope]
    tokens: int
    settled: bool = field(default=False)


def period(limits: LimitConfig | None, now: dt.datetime) -> tuple[str, float | None, int]:
    """(period id, seconds until it ends or None, key lifetime in s) of a budget period (UTC)."""
    kind = limits.budget_period if limits else "month"
    if kind == "day":
        end = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
        return now.strftime("%Y-%m-%d"), (end - now).total_seconds(), 2 * 86_400
    if kind == "month":
        year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
        end = dt.datetime(year, month, 1, tzinfo=dt.UTC)
        return now.strftime("%Y-%m"), (end - now).total_seconds(), 40 * 86_400
    return "total", None, 0


class Admission:
    """The scripts bound to one Redis connection (``prefix`` namespaces the keys)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "agentmesh:llm"):
        self.redis = client
        self.prefix = prefix
        self._admit = client.register_script(ADMIT_LUA)
        self._settle = client.register_script(SETTLE_LUA)

    def _key(self, scope: Scope, part: str) -> str:
        return f"{self.prefix}:{{adm}}:{scope.tag}:{part}"

    def spend_key(self, scope: Scope, now: dt.datetime | None = None) -> str:
        period_id, _, _ = period(scope.limits, now or dt.datetime.now(dt.UTC))
        return f"{self.prefix}:{{adm}}:{scope.tag}:spend:{period_id}"

    async def admit(self, scopes: Sequence[Scope], tokens: int) -> Reservation | Refusal:
        """Reserve one request and ``tokens`` tokens in every scope, or refuse (see the module
        docstring). Raises ``redis.RedisError`` when Redis fails."""
        now = dt.datetime.now(dt.UTC)
        keys: list[str] = []
        args: list[object] = [WINDOW_MS, uuid.uuid4().hex, tokens, len(scopes)]
        for scope in scopes:
            _, until_end, _ = period(scope.limits, now)
            keys += [self._key(scope, "rpm"), self._key(scope, "tpm"), self._key(scope, "tpm:amount"),
                     self._key(scope, "tpm:sum"), self.spend_key(scope, now)]
            args += [scope.limits.rpm, scope.limits.tpm, repr(float(scope.limits.budget_usd)),
                     -1 if until_end is None else int(until_end * 1000) + 1]
        reply = await self._admit(keys=keys, args=args)
        status = int(reply[0])
        if status == 1:
            return Reservation(id=str(args[1]), scopes=list(scopes), tokens=tokens)
        if status == -1:
            return Refusal([(scopes[int(reply[1])], "tpm")], None, too_large=True)
        wait_ms = int(reply[1])
        pairs = reply[2:]
        violations = [(scopes[int(pairs[j])], _text(pairs[j + 1])) for j in range(0, len(pairs), 2)]
        return Refusal(violations, None if wait_ms < 0 else max(wait_ms, 1) / 1000)

    async def settle(self, reservation: Reservation, used_tokens: int, cost_usd: float,
                     charge: Sequence[Scope] = ()) -> None:
        """Replace the reservation's tokens by ``used_tokens`` and add ``cost_usd`` to the spend of
        the reservation's tenant / API key scopes and of ``charge`` (scopes tracked without limits).
        Idempotent: only the first call counts."""
        if reservation.settled:
            return
        reservation.settled = True
        await self._run_settle(reservation.id, reservation.scopes, used_tokens, cost_usd, charge)

    async def charge(self, scopes: Sequence[Scope], cost_usd: float) -> None:
        """Add ``cost_usd`` to the spend of ``scopes`` (no reservation to reconcile)."""
        if cost_usd > 0 and scopes:
            await self._run_settle("-", [], 0, cost_usd, scopes)

    async def _run_settle(self, rid: str, limited: Sequence[Scope], used: int, cost: float,
                          charge: Sequence[Scope]) -> None:
        now = dt.datetime.now(dt.UTC)
        keys: list[str] = []
        args: list[object] = [rid, max(0, used), 0]
        seen: set[str] = set()
        count = 0
        for scope, tracked in [*((s, True) for s in limited), *((s, False) for s in charge)]:
            if scope.tag in seen:
                continue
            seen.add(scope.tag)
            _, _, ttl = period(scope.limits, now)
            spend = cost if scope.kind != "deployment" else 0.0
            keys += [self._key(scope, "tpm"), self._key(scope, "tpm:amount"), self._key(scope, "tpm:sum"),
                     self.spend_key(scope, now)]
            args += ["1" if tracked and scope.limits.tpm else "0", repr(float(spend)), ttl]
            count += 1
        if count:
            args[2] = count
            await self._settle(keys=keys, args=args)

    async def spent(self, scope: Scope) -> float:
        """USD spent by ``scope`` in its current budget period."""
        value = await self.redis.get(self.spend_key(scope))
        return float(value) if value is not None else 0.0


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
