-- Delete, or soft-delete while forks read from the stream. ARGV: 1 channel
local m = load(KEYS[1])
local st = state(m)
if st ~= 'ok' then
  return {st}
end
redis.call('PUBLISH', ARGV[1], 'deleted')
if redis.call('SCARD', KEYS[4]) > 0 then
  redis.call('HSET', KEYS[1], 'del', '1')
  m.del = '1'
  apply_expiry(m)
  return {'soft'}
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return {'deleted', m.src or '', m.id}
