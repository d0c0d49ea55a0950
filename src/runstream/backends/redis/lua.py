"""Lua scripts of the Redis backend: every write to a stream is one atomic script.

Each script touches only the three keys of one stream (``KEYS``), which share a
hash tag, so it runs unchanged on Redis Cluster. Time comes from the server
(``TIME``), so every host appending to a stream stamps events with one clock.
The wake-up ``PUBLISH`` is inside the script: a follower woken by it reads a
log that already holds the entry. Pub/sub is only a wake-up; the stream is the
truth (a lost message costs latency, never an event).

Keys: ``KEYS[1]`` the stream (entry ids ``<offset>-0``), ``KEYS[2]`` the meta
hash, ``KEYS[3]`` the producer hash (producer id -> ``"seq:first:last"``).
"""

from __future__ import annotations

# Shared prelude: server time as "<sec>.<usec>" and its numeric value.
_NOW = """
local function server_time()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2])), tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function create_meta(meta, epoch, ts)
  redis.call('HSET', meta, 'epoch', epoch, 'status', 'open', 'first_id', '1', 'last_id', '0',
    'created_at', ts)
end
"""

APPEND = (
    _NOW
    + """
-- ARGV[1]: "new_epoch NUL max_len NUL count NUL producer_seq NUL producer_id" (id last: it
--          may hold any character; '' = no producer). ARGV[2]: the entries,
--          "type NUL data_json NUL type NUL data_json ...". Two arguments whatever the batch:
--          the client packs every argument in Python, so fewer is faster. Neither entry field
--          can hold a NUL: types are validated and JSON escapes control characters.
local log, meta, prod = KEYS[1], KEYS[2], KEYS[3]
local h = ARGV[1]
local h1 = string.find(h, '\0', 1, true)
local h2 = string.find(h, '\0', h1 + 1, true)
local h3 = string.find(h, '\0', h2 + 1, true)
local h4 = string.find(h, '\0', h3 + 1, true)
local new_epoch = string.sub(h, 1, h1 - 1)
local max_len = tonumber(string.sub(h, h1 + 1, h2 - 1))
local n = tonumber(string.sub(h, h2 + 1, h3 - 1))
local pseq = string.sub(h, h3 + 1, h4 - 1)
local pid = string.sub(h, h4 + 1)
-- The wake-up channel and message follow from the key: "<prefix>:{<name>}:log".
local prefix, name = string.match(log, '^(.*):{(.*)}:log$')
local m = redis.call('HMGET', meta, 'epoch', 'status', 'first_id', 'last_id')
local epoch, first_kept, last = m[1], 0, 0
local created = 0
local ts = server_time()
if epoch then
  if m[2] == 'closed' then return {'closed'} end
  if pid ~= '' then
    local p = redis.call('HGET', prod, pid)
    if p then
      local seq, pf, pl = string.match(p, '^(%d+):(%d+):(%d+)$')
      -- seqs are decimal strings without leading zeros: compare by length, then text,
      -- so values beyond 2^53 stay exact.
      local cmp = 0
      if #pseq ~= #seq then
        if #pseq < #seq then cmp = -1 else cmp = 1 end
      elseif pseq ~= seq then
        if pseq < seq then cmp = -1 else cmp = 1 end
      end
      if cmp == 0 then return {'dup', epoch, tonumber(pf), tonumber(pl)} end
      if cmp < 0 then return {'stale', seq} end
    end
  end
  first_kept, last = tonumber(m[3]), tonumber(m[4])
else
  -- No metadata: a new stream, or its history was lost (flushed, failover). Anything left
  -- under the other keys belongs to a history nobody can address any more.
  redis.call('DEL', log, prod)
  epoch = new_epoch
  created = 1
  first_kept, last = 1, 0
  create_meta(meta, epoch, ts)
end
local blob = ARGV[2]
local first = last + 1
local pos = 1
for i = 0, n - 1 do
  local a = string.find(blob, '\0', pos, true)
  local b = string.find(blob, '\0', a + 1, true) or (#blob + 1)
  redis.call('XADD', log, string.format('%d-0', first + i),
    't', string.sub(blob, pos, a - 1), 'd', string.sub(blob, a + 1, b - 1), 'ts', ts)
  pos = b + 1
end
last = last + n
redis.call('HSET', meta, 'last_id', string.format('%d', last))
if max_len > 0 and last - first_kept + 1 > max_len then
  local keep = last - max_len + 1
  redis.call('XTRIM', log, 'MINID', string.format('%d-0', keep))
  redis.call('HSET', meta, 'first_id', string.format('%d', keep))
end
if pid ~= '' then
  redis.call('HSET', prod, pid, pseq .. ':' .. string.format('%d:%d', first, last))
end
redis.call('PUBLISH', prefix .. ':wake', name)
return {'ok', epoch, first, last, created}
"""
)

CLOSE = (
    _NOW
    + """
-- ARGV: new_epoch, channel, name, end_data_json, has_status, status, has_reason, reason,
--       ttl_ms ('0' = keep forever)
local log, meta, prod = KEYS[1], KEYS[2], KEYS[3]
local m = redis.call('HMGET', meta, 'epoch', 'status', 'last_id')
local created, last = 0, 0
local ts = server_time()
if not m[1] then
  redis.call('DEL', log, prod)
  create_meta(meta, ARGV[1], ts)
  created = 1
elseif m[2] == 'closed' then
  return {0, redis.call('HGETALL', meta)}
else
  last = tonumber(m[3])
end
local id = string.format('%d', last + 1)
redis.call('XADD', log, id .. '-0', 't', 'end', 'd', ARGV[4], 'ts', ts)
redis.call('HSET', meta, 'status', 'closed', 'last_id', id, 'closed_at', ts)
if ARGV[5] == '1' then redis.call('HSET', meta, 'close_status', ARGV[6]) end
if ARGV[7] == '1' then redis.call('HSET', meta, 'close_reason', ARGV[8]) end
local ttl = tonumber(ARGV[9])
if ttl > 0 then
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl) end
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {created, redis.call('HGETALL', meta)}
"""
)

DELETE = """
-- ARGV: channel, name
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

TRIM = (
    _NOW
    + """
-- ARGV: channel, name, max_len ('' = none), max_age seconds ('' = none).
-- Returns the number of entries removed, or -1 if the stream does not exist.
local log, meta = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'status', 'first_id', 'last_id')
if not m[1] then return -1 end
local first, last = tonumber(m[2]), tonumber(m[3])
local keep = first
if ARGV[3] ~= '' then keep = math.max(keep, last - tonumber(ARGV[3]) + 1) end
if ARGV[4] ~= '' then
  local _, now = server_time()
  local cutoff = now - tonumber(ARGV[4])
  -- Ids are contiguous from first_id to last_id and stamped by one clock, so the first
  -- entry young enough is found by bisection, O(log n) lookups.
  local lo, hi = keep, last + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local key = string.format('%d-0', mid)
    local e = redis.call('XRANGE', log, key, key)
    local young = false
    if e[1] then
      local f = e[1][2]
      for i = 1, #f, 2 do
        if f[i] == 'ts' then young = tonumber(f[i + 1]) >= cutoff end
      end
    end
    if young then hi = mid else lo = mid + 1 end
  end
  keep = lo
end
-- The end entry of a closed stream is the durable record of the close: never trimmed.
if m[1] == 'closed' and keep > last then keep = last end
if keep <= first then return 0 end
redis.call('XTRIM', log, 'MINID', string.format('%d-0', keep))
redis.call('HSET', meta, 'first_id', string.format('%d', keep))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return keep - first
"""
)

READ = """
-- A byte-bounded page. KEYS: log, meta. ARGV: first entry id to read ("<after+1>-0"),
-- limit (events), max_bytes. Returns {meta as HGETALL, entries as XRANGE}: the longest
-- run of entries, at least one, whose sizes (#type + #data, bytes) sum to at most
-- max_bytes, as runstream.backends.base.within_budget cuts it. The meta and the
-- entries are one snapshot. Entries are fetched in chunks sized from the average
-- so far (the first alone), so the script never holds more than about one entry
-- past the budget, whatever the event sizes.
local meta = redis.call('HGETALL', KEYS[2])
if #meta == 0 then return {meta, {}} end
local limit, budget = tonumber(ARGV[2]), tonumber(ARGV[3])
local out, total, start, want = {}, 0, ARGV[1], 1
while #out < limit do
  local n = math.min(want, limit - #out)
  local chunk = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', n)
  for _, entry in ipairs(chunk) do
    local f = entry[2]
    for i = 1, #f, 2 do
      if f[i] == 't' or f[i] == 'd' then total = total + #f[i + 1] end
    end
    if #out > 0 and total > budget then return {meta, out} end
    out[#out + 1] = entry
    if total >= budget then return {meta, out} end
  end
  if #chunk < n then break end
  start = '(' .. chunk[#chunk][1]
  want = math.max(1, math.min(256, math.floor((budget - total) * #out / total) + 1))
end
return {meta, out}
"""
