-- One record of a space, read or changed in one step. KEYS[1]: the space's hash (field: key,
-- value: "<version>:<bytes>"), KEYS[2]: the space's version counter, so that versions never repeat.
-- ARGV: op (get, put, del, list), key, expected version, value.
-- Replies {now ms, stored or false, status} (list: {now ms, the hash's fields and values}).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
if op == 'list' then
  return {now, redis.call('HGETALL', KEYS[1])}
end
local current = redis.call('HGET', KEYS[1], ARGV[2])
if op == 'get' then
  return {now, current, 'ok'}
end
local version = 0
if current then
  version = tonumber(string.sub(current, 1, string.find(current, ':', 1, true) - 1))
end
if version ~= tonumber(ARGV[3]) then
  return {now, current, 'conflict'}
end
if op == 'del' then
  redis.call('HDEL', KEYS[1], ARGV[2])
  return {now, false, 'ok'}
end
local stored = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[4]
redis.call('HSET', KEYS[1], ARGV[2], stored)
return {now, stored, 'ok'}
