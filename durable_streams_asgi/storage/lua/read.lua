-- Read the stream's own data from a position, with a snapshot of its metadata; refreshes a
-- sliding TTL. Data below a fork's base is the caller's to read from the source.
-- ARGV: 1 start position ('' = the tail), 2 max bytes, 3 touch ('1' or '0')
local m = load(KEYS[1])
local st = state(m)
if st ~= 'ok' then
  return {st}
end
if ARGV[3] == '1' then
  touch(m)
end
local tail = tonumber(m.tail)
local start = tail
if ARGV[1] ~= '' then
  start = tonumber(ARGV[1])
end
if start > tail then
  return {'range'}
end
local out = {'ok', int(start), unpack(info(m))}
local base = tonumber(m.base or '0')
if start < base or start >= tail then
  return out
end
local budget = tonumber(ARGV[2])
local size = 0
local pos = start
-- Bounded work per call, also for streams of tiny entries: the reader asks again for the rest.
local max_entries = 2048
local taken = 0
while pos < tail and size < budget and taken < max_entries do
  local entries = redis.call('XRANGE', KEYS[2], '(' .. int(pos), '+', 'COUNT', 64)
  if #entries == 0 then
    break
  end
  for _, entry in ipairs(entries) do
    local id = entry[1]
    local data = entry[2][2]
    table.insert(out, id)
    table.insert(out, data)
    size = size + #data
    taken = taken + 1
    pos = tonumber(string.sub(id, 1, string.find(id, '-', 1, true) - 1))
    if size >= budget or taken >= max_entries then
      break
    end
  end
end
return out
