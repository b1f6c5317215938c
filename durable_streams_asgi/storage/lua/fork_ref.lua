-- Take a reference on a fork source and validate the fork point, atomically with the source's
-- deletion (which cannot then miss the new fork).
-- ARGV: 1 member (fork path .. "\n" .. fork id), 2 fork offset ('' = tail), 3 sub-offset,
--       4 requested media type ('' = inherit)
local m = load(KEYS[1])
local st = state(m)
if st ~= 'ok' then
  return {st}
end
local tail = tonumber(m.tail)
local anchor = tail
if ARGV[2] ~= '' then
  anchor = tonumber(ARGV[2])
end
if anchor > tail then
  return {'range'}
end
local point = anchor + tonumber(ARGV[3])
if point > tail then
  return {'sub'}
end
if ARGV[4] ~= '' and ARGV[4] ~= m.mt then
  return {'ct'}
end
redis.call('SADD', KEYS[4], ARGV[1])
apply_expiry(m)
return {'ok', int(anchor), int(point), m.ct, m.mt, m.ttl or '', m.exp or '', m.json or '0'}
