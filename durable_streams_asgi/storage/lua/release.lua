-- Drop a fork's reference; clean the source up if it was deleted (or expired) meanwhile.
-- ARGV: 1 member
redis.call('SREM', KEYS[4], ARGV[1])
local m = load(KEYS[1])
if m == nil then
  redis.call('DEL', KEYS[4])
  return {'missing'}
end
if redis.call('SCARD', KEYS[4]) > 0 then
  return {'kept'}
end
local st = state(m)
if st ~= 'ok' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  return {'deleted', m.src or '', m.id}
end
apply_expiry(m)
return {'kept'}
