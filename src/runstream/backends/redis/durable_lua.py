"""The Redis Durable Streams append as one Lua script: every check and the write, atomically.

The script is :func:`runstream.core.durable.decide_append` for a well-formed append (the
body already split into entries by the caller): closed stream, content type, idempotent
producer (epoch fencing, duplicates, gaps, §5.2.1), ``Stream-Seq`` (byte-wise), then the
entries, the new state, the expiry index and the wake-up, in one round trip. Anything else
(a stream absent, deleted or expired; numbers the script's JSON cannot hold exactly) answers
``slow`` and the store runs the general path (:func:`~runstream.backends.durable.op_append`
under a compare-and-set), which decides the same way.

``tests/durable`` (the official suite) and ``tests/backends/test_durable.py`` run on it.
"""

from __future__ import annotations

APPEND = r"""
-- KEYS: [1] state, [2] entries, [3] deadlines index.
-- ARGV: [1] now, [2] request media type ('' = none), [3] close '1'/'0', [4] producer id
-- ('' = none), [5] epoch, [6] seq, [7] Stream-Seq ('' = none), [8] channel, [9] wake message,
-- [10] stream name, [11...] entries.
local raw = redis.call('GET', KEYS[1])
if not raw then return {'slow'} end
local st = cjson.decode(raw)
local null = cjson.null
if st.deleted then return {'slow'} end
local now = tonumber(ARGV[1])
local function deadline(s)
  if s.ttl ~= null then return s.touched + s.ttl end
  if s.expires_at ~= null then return s.expires_at end
  return nil
end
local d = deadline(st)
if d and now >= d then return {'slow'} end
local BIG = 1e14  -- cjson re-encodes numbers with 14 digits: larger ones take the slow path
if st.tail >= BIG then return {'slow'} end
for _, p in pairs(st.producers) do
  if p[1] >= BIG or p[2] >= BIG then return {'slow'} end
end
local pid = ARGV[4]
local epoch, seq = tonumber(ARGV[5]), tonumber(ARGV[6])
if pid ~= '' and (epoch >= BIG or seq >= BIG) then return {'slow'} end
local n = #ARGV - 10
local close = ARGV[3] == '1'

-- The producer rule; returns 'accept' or 'dup', or an error reply.
local function producer()
  local p = st.producers[pid]
  if p == nil then
    if seq ~= 0 then return {'gap', 0, seq} end
    return 'accept'
  end
  if epoch < p[1] then return {'stale', p[1]} end
  if epoch > p[1] then
    if seq ~= 0 then return {'badepoch'} end
    return 'accept'
  end
  if seq <= p[2] then return 'dup' end
  if seq == p[2] + 1 then return 'accept' end
  return {'gap', p[2] + 1, seq}
end

if st.closed then
  if pid ~= '' then
    local v = producer()
    if v == 'dup' then return {'dup', raw} end
    if type(v) == 'table' then return v end
  elseif n == 0 and close then
    return {'closeonly', raw}
  end
  return {'closed', st.tail}
end
if n > 0 then
  local kind = string.match(st.content_type, '^([^;]*)')
  if ARGV[2] ~= kind then return {'ctype', kind} end
end
if pid ~= '' then
  local v = producer()
  if v == 'dup' then return {'dup', raw} end
  if type(v) == 'table' then return v end
  st.producers[pid] = {epoch, seq}
end
local sseq = ARGV[7]
if sseq ~= '' then
  local last = st.stream_seq
  if last ~= null then
    -- byte-wise: sseq must be strictly greater than last
    local greater = false
    local i, la, lb = 1, #sseq, #last
    while true do
      if i > la then break end
      if i > lb then greater = true break end
      local a, b = string.byte(sseq, i), string.byte(last, i)
      if a ~= b then greater = a > b break end
      i = i + 1
    end
    if not greater then return {'seq', last} end
  end
  st.stream_seq = sseq
end
if n > 0 then
  for i = 11, #ARGV, 500 do
    redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 499, #ARGV)))
  end
end
st.tail = st.tail + n
st.touched = now
if close then
  st.closed = true
  if pid ~= '' then st.closed_by = {pid, epoch, seq} else st.closed_by = null end
end
local text = cjson.encode(st)
redis.call('SET', KEYS[1], text)
d = deadline(st)
if d then redis.call('ZADD', KEYS[3], d, ARGV[10]) end
redis.call('PUBLISH', ARGV[8], ARGV[9])
if n == 0 then return {'closeonly', text} end
return {'ok', text}
"""
