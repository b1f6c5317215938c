-- Prelude of every script. KEYS of one stream, all in one hash slot ({path}):
--   KEYS[1] meta (hash)   KEYS[2] data (stream)   KEYS[3] producers (hash)   KEYS[4] forks (set)
-- meta fields: ct (content type), mt (its media type), json, tail, closed, ttl (s), exp (ms),
--   dl (deadline ms), seq (last Stream-Seq), id, src (fork source path), base (fork point),
--   del (soft-deleted), rq (the creating request, for idempotent re-creates), ri and r0..r15
--   (append.lua's recent nonces).
-- Data entries have ID "<end position>-0" and one field "d", so "XRANGE (<pos> +" starts at
-- the entry holding <pos>.

-- Redis's clock, read once per script run and only where an expiry needs it: most streams have
-- none, and a redis.call costs about as much as the rest of a small append together.
local clock
local function now_ms()
  if clock == nil then
    local t = redis.call('TIME')
    clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock
end

local function int(n)
  return string.format('%.0f', n)
end

-- The meta fields scripts read, by name: HMGET of these rather than HGETALL, so that fields
-- kept for rare paths (append.lua's ring of recent nonces) cost the common ones nothing.
local FIELDS = {'ct', 'mt', 'json', 'tail', 'closed', 'ttl', 'exp', 'dl', 'seq', 'id', 'src', 'base', 'del', 'rq',
                'ri'}

local function load(key)
  local raw = redis.call('HMGET', key, unpack(FIELDS))
  local m, found = {}, false
  for i = 1, #FIELDS do
    local value = raw[i]
    if value then
      m[FIELDS[i]] = value
      found = true
    end
  end
  if not found then  -- (every stream has at least ct, tail and id)
    return nil
  end
  return m
end

local function pinned(m)
  -- A stream that forks read from, or that is soft-deleted, must never vanish by Redis expiry.
  return m.del == '1' or redis.call('SCARD', KEYS[4]) > 0
end

-- 'ok', 'missing' or 'gone' (soft-deleted, or expired while forks still read from it).
local function state(m)
  if m == nil then
    return 'missing'
  end
  if m.del == '1' then
    return 'gone'
  end
  local dl = tonumber(m.dl or '')
  if dl ~= nil and now_ms() >= dl then
    if redis.call('SCARD', KEYS[4]) > 0 then
      return 'gone'
    end
    return 'missing'
  end
  return 'ok'
end

local function apply_expiry(m)
  local dl = tonumber(m.dl or '')
  if dl == nil then
    -- No deadline is ever removed, so none of this stream's keys has an expiry to clear: skip
    -- the four PERSISTs that every append would otherwise pay.
    return
  end
  local keep = pinned(m)
  for i = 1, 4 do
    if keep then
      redis.call('PERSIST', KEYS[i])
    else
      redis.call('PEXPIREAT', KEYS[i], int(dl))
    end
  end
end

-- Reset a sliding TTL (reads and writes do this; HEAD does not).
local function touch(m)
  if m.ttl ~= nil and m.ttl ~= '' then
    m.dl = int(now_ms() + tonumber(m.ttl) * 1000)
    redis.call('HSET', KEYS[1], 'dl', m.dl)
    apply_expiry(m)
  end
end

-- Byte-wise a <= b. Lua's own comparison follows the server's locale (strcoll).
local function bytes_le(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a <= #b
end

local function info(m)
  return {m.tail, m.closed or '0', m.ct, m.ttl or '', m.exp or '', m.id, m.json or '0', m.src or '', m.base or '0'}
end

-- Append items (ARGV from index first) after position tail; returns the new tail.
local function add_items(tail, json, first)
  for i = first, #ARGV do
    local item = ARGV[i]
    if #item > 0 then
      if json then
        tail = tail + 1
      else
        tail = tail + #item
      end
      redis.call('XADD', KEYS[2], int(tail) .. '-0', 'd', item)
    end
  end
  return tail
end
