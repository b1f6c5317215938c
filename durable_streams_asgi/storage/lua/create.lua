-- Create a stream, or report the one already there (the caller compares configurations).
-- ARGV: 1 id, 2 ct, 3 mt, 4 json, 5 ttl, 6 exp, 7 closed, 8 rq, 9 src, 10 base, 11.. items
local m = load(KEYS[1])
local st = state(m)
if st ~= 'missing' then
  if st == 'ok' then
    touch(m)  -- an idempotent re-create counts as a write for a sliding TTL
  end
  return {st, m.rq or '', unpack(info(m))}
end
if m ~= nil then
  -- Expired a moment ago and not yet removed by Redis: the path is free.
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
end
local base = tonumber(ARGV[10])
local tail = add_items(base, ARGV[4] == '1', 11)
m = {ct = ARGV[2], mt = ARGV[3], json = ARGV[4], tail = int(tail), closed = ARGV[7], id = ARGV[1], rq = ARGV[8],
     base = ARGV[10]}
local fields = {'ct', m.ct, 'mt', m.mt, 'json', m.json, 'tail', m.tail, 'closed', m.closed, 'id', m.id, 'rq', m.rq,
                'base', m.base}
if ARGV[5] ~= '' then
  m.ttl = ARGV[5]
  m.dl = int(now_ms() + tonumber(m.ttl) * 1000)
  table.insert(fields, 'ttl'); table.insert(fields, m.ttl)
  table.insert(fields, 'dl'); table.insert(fields, m.dl)
elseif ARGV[6] ~= '' then
  m.exp = ARGV[6]
  m.dl = m.exp
  table.insert(fields, 'exp'); table.insert(fields, m.exp)
  table.insert(fields, 'dl'); table.insert(fields, m.dl)
end
if ARGV[9] ~= '' then
  m.src = ARGV[9]
  table.insert(fields, 'src'); table.insert(fields, m.src)
end
redis.call('HSET', KEYS[1], unpack(fields))
apply_expiry(m)
return {'created', m.rq, unpack(info(m))}
