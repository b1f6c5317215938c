-- One lease, all checks and changes in one step. KEYS[1]: the lease (hash: o owner, f fence,
-- v value, e deadline ms, h 1 while held). ARGV: op (acquire, renew, release, get), owner,
-- fence, ttl ms, value, force (0/1), retain ms (how long the record outlives its deadline, for
-- its fence). Replies {status, owner, fence, value, deadline, taken, now}: taken is 1 when the
-- lease was taken and not released (it is held while its deadline is ahead of now).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, owner, fence, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local retain = tonumber(ARGV[7])
local raw = redis.call('HMGET', KEYS[1], 'o', 'f', 'v', 'e', 'h')
local exists = raw[2] ~= false
local cur_owner, cur_fence, cur_value = raw[1] or '', tonumber(raw[2] or '0'), raw[3] or ''
local deadline = tonumber(raw[4] or '0')
local taken = raw[5] == '1'
local held = taken and deadline > now

local function reply(status)
  return {status, cur_owner, cur_fence, cur_value, deadline, taken and 1 or 0, now}
end

local function store()
  redis.call('HSET', KEYS[1], 'o', cur_owner, 'f', cur_fence, 'v', cur_value, 'e', deadline, 'h', taken and '1' or '0')
  redis.call('PEXPIREAT', KEYS[1], math.max(deadline, now) + retain)
end

if op == 'get' then
  return reply(exists and 'ok' or 'missing')
end

if op == 'acquire' then
  if held and cur_owner ~= owner and ARGV[6] ~= '1' then
    return reply('held')
  end
  cur_owner, cur_fence, cur_value = owner, cur_fence + 1, ARGV[5]
  deadline, taken = now + ttl, true
  store()
  return reply('ok')
end

-- renew and release: only the holder, at its fence, while the lease has not expired.
if not (held and cur_owner == owner and cur_fence == fence) then
  return reply('lost')
end
if op == 'renew' then
  deadline = now + ttl
else
  deadline, taken = now, false
end
store()
return reply('ok')
