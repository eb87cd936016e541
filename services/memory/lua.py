"""Lua scripts that make every session operation one atomic Redis round trip.

Every script works on the keys of ONE session, always passed in this order (they share the hash
tag ``{session_id}``, so they live in one Redis Cluster slot):

    KEYS[1] meta      hash: inc, version, first, tokens, ttrim, created, updated, ttl, keep,
                            ptokens, summary, stokens, sthrough, sumcum
    KEYS[2] messages  list: SessionMessage blobs (protobuf, without id/sequence), oldest first
    KEYS[3] tokens    list: token count of each element of ``messages`` (decimal strings)
    KEYS[4] pinned    list: pinned common.v1.Message blobs
    KEYS[5] idem      hash: idempotency key -> "request hash|first sequence|version|incarnation"
    KEYS[6] idem_at   sorted set: idempotency key scored by its creation time (ms), for expiry
    KEYS[7] lock      string: the compaction lock (only deleted here)

Meta fields: ``inc`` the session's incarnation (random hex chosen when the session is created);
``version`` the last sequence; ``first`` the sequence of ``messages[0]``; ``tokens`` the
cumulative tokens of every message ever appended; ``ttrim`` the cumulative tokens of the messages
retention deleted; ``ttl``/``keep`` the session's own retention (absent = service default);
``ptokens`` tokens of the pinned messages; ``summary`` a SessionSummary blob, ``stokens`` its
tokens as a system message, ``sthrough`` the last sequence it covers and ``sumcum`` the
cumulative tokens through that sequence.

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
local function ensure_meta(inc, now)
  local cur = redis.call('HGET', KEYS[1], 'inc')
  if cur then return cur end
  redis.call('HSET', KEYS[1], 'inc', inc, 'version', 0, 'first', 1, 'tokens', 0, 'ttrim', 0,
             'created', now, 'updated', now)
  return inc
end
"""

#: ARGV: now_ms, new_inc, default_ttl_s, default_keep, idem_key ('' = none), request_hash,
#: idem_window_ms, channel, n, blob_1..blob_n, tokens_1..tokens_n.
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
apply_ttl(effective('ttl', ARGV[3]))
redis.call('PUBLISH', ARGV[8], 'v' .. version)
local m = redis.call('HMGET', KEYS[1], 'sumcum', 'ttrim')
local base = math.max(tonumber(m[1] or '0'), tonumber(m[2] or '0'))
return {'ok', first_seq, version, inc, total - base}
"""

#: ARGV: budget_tokens, page (token counts read per LRANGE while walking back).
#: Returns {0} for a missing session; {-1, inc, version, pinned_tokens} when the pinned messages
#: alone exceed the budget; else {1, inc, version, first, pinned_tokens, summary_used (0/1),
#: summary_through, history_tokens, summary blob or '', n_pinned, pinned..., messages...}.
GET_CONTEXT = """
local m = redis.call('HMGET', KEYS[1], 'inc', 'version', 'first', 'ptokens', 'summary', 'stokens', 'sthrough')
if not m[1] then return {0} end
local version, first = tonumber(m[2]), tonumber(m[3])
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
local out = {1, m[1], version, first, ptok, used_summary, sthrough, used}
if used_summary == 1 then out[#out + 1] = summary else out[#out + 1] = '' end
local pinned = {}
if ptok > 0 then pinned = redis.call('LRANGE', KEYS[4], 0, -1) end
out[#out + 1] = #pinned
for _, p in ipairs(pinned) do out[#out + 1] = p end
if count > 0 then
  for _, b in ipairs(redis.call('LRANGE', KEYS[2], hi - count + 1, hi)) do out[#out + 1] = b end
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

#: ARGV: now_ms, new_inc, default_ttl_s, pinned_tokens, n, blob_1..blob_n. Returns the incarnation.
SET_PINNED = _HELPERS + """
local inc = ensure_meta(ARGV[2], tonumber(ARGV[1]))
redis.call('DEL', KEYS[4])
local n = tonumber(ARGV[5])
if n > 0 then
  local blobs = {}
  for i = 1, n do blobs[i] = ARGV[5 + i] end
  redis.call('RPUSH', KEYS[4], unpack(blobs))
end
redis.call('HSET', KEYS[1], 'ptokens', ARGV[4], 'updated', ARGV[1])
apply_ttl(effective('ttl', ARGV[3]))
return inc
"""

#: ARGV: now_ms, new_inc, default_ttl_s, default_keep, ttl_s ('' = unchanged), keep ('' = unchanged).
#: Returns {ttl_s, keep, messages_deleted}.
SET_RETENTION = _HELPERS + """
ensure_meta(ARGV[2], tonumber(ARGV[1]))
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'ttl', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'keep', ARGV[6]) end
local ttl, keep = effective('ttl', ARGV[3]), effective('keep', ARGV[4])
local dropped = trim(keep)
apply_ttl(ttl)
return {ttl, keep, dropped}
"""

#: ARGV: channel. Returns {keys_deleted, messages_deleted, inc or ''}.
DELETE = """
local inc = redis.call('HGET', KEYS[1], 'inc')
local stored = redis.call('LLEN', KEYS[2])
local n = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
if n > 0 then redis.call('PUBLISH', ARGV[1], 'd') end
return {n, stored, inc or ''}
"""

#: Compare-and-set of the running summary. ARGV: inc, expected_sthrough, summary_blob, stokens,
#: sthrough, sumcum. Returns 1 written, 0 session gone or replaced, -1 summary changed meanwhile.
WRITE_SUMMARY = """
local m = redis.call('HMGET', KEYS[1], 'inc', 'sthrough')
if m[1] ~= ARGV[1] then return 0 end
if tonumber(m[2] or '0') ~= tonumber(ARGV[2]) then return -1 end
redis.call('HSET', KEYS[1], 'summary', ARGV[3], 'stokens', ARGV[4], 'sthrough', ARGV[5], 'sumcum', ARGV[6])
return 1
"""
