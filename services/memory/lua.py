"""Lua scripts that make every session operation one atomic Redis round trip.

Every script works on the keys of ONE session, always passed in this order (they share the hash
tag ``{session_id}``, so they live in one Redis Cluster slot; the scripts that write also take the
retention index):

    KEYS[1] meta      hash: inc, enc, version, first, tokens, ttrim, created, updated, ttl, keep,
                            ptokens, summary, stokens, sthrough, sumcum
    KEYS[2] messages  list: SessionMessage blobs (protobuf, without id/sequence), oldest first
    KEYS[3] tokens    list: token count of each element of ``messages`` (decimal strings)
    KEYS[4] pinned    list: pinned common.v1.Message blobs
    KEYS[5] idem      hash: idempotency key -> "request hash|first sequence|version|incarnation"
    KEYS[6] idem_at   sorted set: idempotency key scored by its creation time (ms), for expiry
    KEYS[7] lock      string: the compaction lock (only deleted here)
    KEYS[8] retention sorted set shared by all sessions (the scripts that write take it): the
                      retention index, see below

Meta fields: ``inc`` the session's incarnation (random hex chosen when the session is created);
``enc`` the tokenizer of every stored count (``tokens``, ``ptokens``, ``stokens``): the writer's
when the session is created, ``mixed`` once a writer counting with another tokenizer stored a
count (replicas configured differently, or the setting changed), absent for sessions written
before it existed (``wordpiece``, the only tokenizer then); ``version`` the last sequence;
``first`` the sequence of ``messages[0]``; ``tokens`` the cumulative tokens of every message ever
appended; ``ttrim`` the cumulative tokens of the messages retention deleted; ``ttl``/``keep`` the
session's own retention (absent = service default); ``ptokens`` tokens of the pinned messages;
``summary`` a SessionSummary blob, ``stokens`` its tokens as a system message, ``sthrough`` the
last sequence it covers and ``sumcum`` the cumulative tokens through that sequence; ``pfirst`` the
``first`` the session's facts were last pruned for (absent = 1).

The retention index (``{prefix}:retention``) tells the sweeper (retention.py) which facts may have
lost their source messages: one member ``<tenant>/<user>/<session>/<incarnation>`` per session
incarnation that has a TTL or has had messages trimmed since its facts were last pruned, scored
with the time (ms) to look at it: ``now`` while trimmed messages wait for pruning, else the
session's expiry. Every script that trims or sets a TTL updates it in the same atomic step as the
data (``schedule``), only when the service keeps facts (``track`` = 1), so an expiry or a trim can
never happen without its index entry: nothing relies on keyspace notifications, which Redis
drops when no client listens. The index is one key outside the session's hash slot, so these
scripts need a single Redis primary (as the rest of the service does: see the README).

Every script that stores a count takes the writer's tokenizer as its LAST argument (``ARGV[#ARGV]``).

Numbers are Lua doubles inside scripts: exact up to 2^53, far beyond any session.
"""

from __future__ import annotations

#: Helpers prepended to the scripts that write.
_HELPERS = """
local function apply_ttl(ttl_s)
  for i = 1, 6 do
    if ttl_s > 0 then redis.call('PEXPIRE', KEYS[i], ttl_s * 1000) else redis.call('PERSIST', KEYS[i]) end
  end
end
local function effective(field, default)
  local v = redis.call('HGET', KEYS[1], field)
  if v then return tonumber(v) end
  return tonumber(default)
end
local function trim(keep)
  if keep <= 0 then return 0 end
  local len = redis.call('LLEN', KEYS[2])
  if len <= keep then return 0 end
  local drop = len - keep
  local toks = redis.call('LRANGE', KEYS[3], 0, drop - 1)
  local sum = 0
  for _, t in ipairs(toks) do sum = sum + tonumber(t) end
  redis.call('LTRIM', KEYS[2], drop, -1)
  redis.call('LTRIM', KEYS[3], drop, -1)
  redis.call('HINCRBY', KEYS[1], 'first', drop)
  redis.call('HINCRBY', KEYS[1], 'ttrim', sum)
  return drop
end
-- The retention index entry of the session's incarnation (see the module docstring).
local function schedule(track, member_prefix, now, ttl_s)
  if track ~= '1' then return end
  local m = redis.call('HMGET', KEYS[1], 'inc', 'first', 'pfirst')
  if not m[1] then return end
  local member = member_prefix .. m[1]
  local due = nil
  if tonumber(m[2]) > tonumber(m[3] or '1') then
    due = now
    local cur = redis.call('ZSCORE', KEYS[8], member)
    if cur and tonumber(cur) < due then due = tonumber(cur) end
  elseif ttl_s > 0 then
    due = now + ttl_s * 1000
  end
  if due then redis.call('ZADD', KEYS[8], due, member) else redis.call('ZREM', KEYS[8], member) end
end
local function ensure_meta(inc, now)
  local cur = redis.call('HGET', KEYS[1], 'inc')
  if cur then return cur end
  redis.call('HSET', KEYS[1], 'inc', inc, 'enc', ARGV[#ARGV], 'version', 0, 'first', 1, 'tokens', 0, 'ttrim', 0,
             'created', now, 'updated', now)
  return inc
end
-- A count in the writer's tokenizer is about to be stored: a session counted with another one
-- becomes 'mixed' (GetContext then counts it again; see the module docstring).
local function note_enc()
  if (redis.call('HGET', KEYS[1], 'enc') or 'wordpiece') ~= ARGV[#ARGV] then
    redis.call('HSET', KEYS[1], 'enc', 'mixed')
  end
end
"""

#: ARGV: now_ms, new_inc, default_ttl_s, default_keep, idem_key ('' = none), request_hash,
#: idem_window_ms, channel, n, blob_1..blob_n, tokens_1..tokens_n, track (1 = keep the
#: retention index), index member prefix ("<tenant>/<user>/<session>/"), tokenizer.
#: Returns {'replay', record} or {'ok', first_sequence, version, inc, unsummarized_tokens}.
APPEND = _HELPERS + """
local now = tonumber(ARGV[1])
local idem_key = ARGV[5]
if idem_key ~= '' then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now - tonumber(ARGV[7]), 'LIMIT', 0, 64)
  if #expired > 0 then
    redis.call('HDEL', KEYS[5], unpack(expired))
    redis.call('ZREM', KEYS[6], unpack(expired))
  end
  local rec = redis.call('HGET', KEYS[5], idem_key)
  if rec then return {'replay', rec} end
end
local inc = ensure_meta(ARGV[2], now)
note_enc()
local n = tonumber(ARGV[9])
local blobs, toks, sum = {}, {}, 0
for i = 1, n do
  blobs[i] = ARGV[9 + i]
  toks[i] = ARGV[9 + n + i]
  sum = sum + tonumber(toks[i])
end
redis.call('RPUSH', KEYS[2], unpack(blobs))
redis.call('RPUSH', KEYS[3], unpack(toks))
local version = redis.call('HINCRBY', KEYS[1], 'version', n)
local total = redis.call('HINCRBY', KEYS[1], 'tokens', sum)
redis.call('HSET', KEYS[1], 'updated', now)
local first_seq = version - n + 1
if idem_key ~= '' then
  redis.call('HSET', KEYS[5], idem_key, ARGV[6] .. '|' .. first_seq .. '|' .. version .. '|' .. inc)
  redis.call('ZADD', KEYS[6], now, idem_key)
end
trim(effective('keep', ARGV[4]))
local ttl = effective('ttl', ARGV[3])
apply_ttl(ttl)
schedule(ARGV[10 + 2 * n], ARGV[11 + 2 * n], now, ttl)
redis.call('PUBLISH', ARGV[8], 'v' .. version)
local m = redis.call('HMGET', KEYS[1], 'sumcum', 'ttrim')
local base = math.max(tonumber(m[1] or '0'), tonumber(m[2] or '0'))
return {'ok', first_seq, version, inc, total - base}
"""

#: ARGV: budget_tokens, page (token counts read per LRANGE while walking back), what the caller
#: already holds of this session: cached_inc, cached_from, cached_through (sequences), and the
#: tokenizer the budget is in. Returns {0} for a missing session; {-2, inc, version} when the
#: stored counts are not in that tokenizer (``enc``: the caller counts itself, see
#: CONTEXT_HEAD); {-1, inc, version, pinned_tokens} when the pinned messages
#: alone exceed the budget; else {1, inc, version, first, pinned_tokens, summary_used (0/1),
#: summary_through, history_tokens, summary blob or '', n_pinned, pinned..., start, fetch_from,
#: blobs...}: the recent messages are sequences start..version; the blobs are those from
#: fetch_from on. A stored message never changes (its id names the incarnation), so the caller
#: can reuse what it holds: when cached_inc is the incarnation and cached_from..cached_through
#: covers the start of the window, only the newer messages are sent.
GET_CONTEXT = """
local m = redis.call('HMGET', KEYS[1], 'inc', 'version', 'first', 'ptokens', 'summary', 'stokens', 'sthrough', 'enc')
if not m[1] then return {0} end
local version, first = tonumber(m[2]), tonumber(m[3])
if (m[8] or 'wordpiece') ~= ARGV[6] then return {-2, m[1], version} end
local budget = tonumber(ARGV[1])
local ptok = tonumber(m[4] or '0')
if ptok > budget then return {-1, m[1], version, ptok} end
local left = budget - ptok
local summary, stok, sthrough = m[5], tonumber(m[6] or '0'), tonumber(m[7] or '0')
local used_summary = 0
local floor = first
if summary and stok <= left then
  used_summary = 1
  left = left - stok
  if sthrough + 1 > floor then floor = sthrough + 1 end
end
local page = tonumber(ARGV[2])
local hi = version - first
local lowest = floor - first
local used, count, idx, full = 0, 0, hi, false
while idx >= lowest and not full do
  local from = math.max(lowest, idx - page + 1)
  local toks = redis.call('LRANGE', KEYS[3], from, idx)
  for j = #toks, 1, -1 do
    local t = tonumber(toks[j])
    if used + t > left then full = true; break end
    used = used + t
    count = count + 1
  end
  idx = from - 1
end
local start = version - count + 1
local fetch_from = start
if ARGV[3] == m[1] and tonumber(ARGV[4]) <= start and tonumber(ARGV[5]) >= start - 1 then
  fetch_from = math.max(start, tonumber(ARGV[5]) + 1)
end
local out = {1, m[1], version, first, ptok, used_summary, sthrough, used}
if used_summary == 1 then out[#out + 1] = summary else out[#out + 1] = '' end
local pinned = {}
if ptok > 0 then pinned = redis.call('LRANGE', KEYS[4], 0, -1) end
out[#out + 1] = #pinned
for _, p in ipairs(pinned) do out[#out + 1] = p end
out[#out + 1] = start
out[#out + 1] = fetch_from
if fetch_from <= version then
  for _, b in ipairs(redis.call('LRANGE', KEYS[2], fetch_from - first, hi)) do out[#out + 1] = b end
end
return out
"""

#: GetContext when the stored counts are not in the requested tokenizer: the caller counts the
#: messages itself, walking back from the newest (store.py). ARGV: held_inc, held_through (the
#: newest sequence the caller has counted for that incarnation, 0 = none), page. Returns {0} for
#: a missing session, else {1, inc, version, first, summary_through, summary blob or '', n_pinned,
#: pinned..., lo, blobs lo..version}: the newest messages the caller does not hold, at most
#: ``page`` of them (older ones are read with LIST when the budget reaches them).
CONTEXT_HEAD = """
local m = redis.call('HMGET', KEYS[1], 'inc', 'version', 'first', 'summary', 'sthrough')
if not m[1] then return {0} end
local version, first = tonumber(m[2]), tonumber(m[3])
local lo = math.max(first, version - tonumber(ARGV[3]) + 1)
if ARGV[1] == m[1] then lo = math.max(lo, tonumber(ARGV[2]) + 1) end
local out = {1, m[1], version, first, tonumber(m[5] or '0'), m[4] or ''}
local pinned = redis.call('LRANGE', KEYS[4], 0, -1)
out[#out + 1] = #pinned
for _, p in ipairs(pinned) do out[#out + 1] = p end
out[#out + 1] = lo
if lo <= version then
  for _, b in ipairs(redis.call('LRANGE', KEYS[2], lo - first, version - first)) do out[#out + 1] = b end
end
return out
"""

#: ARGV: from_sequence (0 = oldest stored), to_sequence (0 = newest), limit.
#: Returns {0} for a missing session, else {1, inc, version, first, from, blobs...}.
LIST = """
local m = redis.call('HMGET', KEYS[1], 'inc', 'version', 'first')
if not m[1] then return {0} end
local version, first = tonumber(m[2]), tonumber(m[3])
local from = tonumber(ARGV[1])
if from < first then from = first end
local to = tonumber(ARGV[2])
if to == 0 or to > version then to = version end
local limit = tonumber(ARGV[3])
if to - from + 1 > limit then to = from + limit - 1 end
local out = {1, m[1], version, first, from}
if from <= to then
  for _, b in ipairs(redis.call('LRANGE', KEYS[2], from - first, to - first)) do out[#out + 1] = b end
end
return out
"""

#: ARGV: now_ms, new_inc, default_ttl_s, pinned_tokens, n, blob_1..blob_n, track, index member
#: prefix, tokenizer. Returns the incarnation.
SET_PINNED = _HELPERS + """
local inc = ensure_meta(ARGV[2], tonumber(ARGV[1]))
if tonumber(ARGV[4]) > 0 then note_enc() end
redis.call('DEL', KEYS[4])
local n = tonumber(ARGV[5])
if n > 0 then
  local blobs = {}
  for i = 1, n do blobs[i] = ARGV[5 + i] end
  redis.call('RPUSH', KEYS[4], unpack(blobs))
end
redis.call('HSET', KEYS[1], 'ptokens', ARGV[4], 'updated', ARGV[1])
local ttl = effective('ttl', ARGV[3])
apply_ttl(ttl)
schedule(ARGV[6 + n], ARGV[7 + n], tonumber(ARGV[1]), ttl)
return inc
"""

#: ARGV: now_ms, new_inc, default_ttl_s, default_keep, ttl_s ('' = unchanged), keep ('' = unchanged),
#: track, index member prefix, tokenizer (recorded when this creates the session).
#: Returns {ttl_s, keep, messages_deleted}.
SET_RETENTION = _HELPERS + """
ensure_meta(ARGV[2], tonumber(ARGV[1]))
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'ttl', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'keep', ARGV[6]) end
local ttl, keep = effective('ttl', ARGV[3]), effective('keep', ARGV[4])
local dropped = trim(keep)
apply_ttl(ttl)
schedule(ARGV[7], ARGV[8], tonumber(ARGV[1]), ttl)
return {ttl, keep, dropped}
"""

#: ARGV: channel, index member prefix. Returns {keys_deleted, messages_deleted, inc or ''}.
#: The incarnation leaves the retention index: the caller handles its facts (or keeps them).
DELETE = """
local inc = redis.call('HGET', KEYS[1], 'inc')
local stored = redis.call('LLEN', KEYS[2])
local n = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
if inc then redis.call('ZREM', KEYS[8], ARGV[2] .. inc) end
if n > 0 then redis.call('PUBLISH', ARGV[1], 'd') end
return {n, stored, inc or ''}
"""

#: Compare-and-set of the running summary. ARGV: inc, expected_sthrough, summary_blob, stokens,
#: sthrough, sumcum, tokenizer. Returns 1 written, 0 session gone or replaced, -1 summary changed
#: meanwhile.
WRITE_SUMMARY = """
local m = redis.call('HMGET', KEYS[1], 'inc', 'sthrough', 'enc')
if m[1] ~= ARGV[1] then return 0 end
if tonumber(m[2] or '0') ~= tonumber(ARGV[2]) then return -1 end
if (m[3] or 'wordpiece') ~= ARGV[7] then redis.call('HSET', KEYS[1], 'enc', 'mixed') end
redis.call('HSET', KEYS[1], 'summary', ARGV[3], 'stokens', ARGV[4], 'sthrough', ARGV[5], 'sumcum', ARGV[6])
return 1
"""

#: The sweeper's claim on due entries of the retention index (KEYS[1]). ARGV: now_ms, lease_ms,
#: limit. Returns the members due at ``now``, each moved to ``now + lease`` so that another
#: replica's sweeper leaves it alone meanwhile (and takes it over if this one dies).
CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], until_ms, member) end
return due
"""

#: After the sweeper pruned the facts of trimmed messages. KEYS: meta, retention index. ARGV:
#: member, incarnation, first (the messages before it were pruned), now_ms. Records ``pfirst`` and
#: schedules what is next: now when more messages were trimmed meanwhile, the expiry when the
#: session has a TTL, nothing otherwise; when the incarnation has gone meanwhile, now (the next
#: sweep prunes all of it) unless DeleteSession removed the entry. Returns the member's next due
#: time, or -1 when it left the index.
PRUNED = """
local m = redis.call('HMGET', KEYS[1], 'inc', 'first', 'pfirst')
local now = tonumber(ARGV[4])
if m[1] ~= ARGV[2] then
  -- Gone meanwhile: expired (sweep it again), or deleted (DeleteSession removed the entry itself
  -- and decided about the facts: keep_facts must hold).
  if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
    redis.call('ZADD', KEYS[2], now, ARGV[1])
    return now
  end
  return -1
end
local pfirst = math.max(tonumber(m[3] or '1'), tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'pfirst', pfirst)
local due = -1
if tonumber(m[2]) > pfirst then
  due = now
else
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > 0 then due = now + pttl end
end
if due >= 0 then redis.call('ZADD', KEYS[2], due, ARGV[1]) else redis.call('ZREM', KEYS[2], ARGV[1]) end
return due
"""
