-- Append and/or close, validating everything first so that a rejected request changes nothing.
-- ARGV: 1 media type ('' when no body), 2 close, 3 Stream-Seq, 4 producer id ('' if none),
--       5 epoch, 6 seq, 7 channel, 8 request nonce ('!' in front when sent again), 9.. items
-- The nonces of the last RECENT appends without producer, each with the tail after it, are a
-- ring of meta fields r0..r15 ('nonce:tail'), 'ri' counting the appends written to it. One field
-- set per append, nothing read: the list this replaced ('rn', rewritten whole and trimmed by
-- pattern per append) took a third of the script's time. Streams written by earlier versions
-- may still hold 'rn'/'rc'; those versions' scripts read them, this one never does.
local RECENT = 16
local m = load(KEYS[1])
local st = state(m)
if st ~= 'ok' then
  return {st}
end
-- A request sent again after its reply was lost may have been applied, and other writers may
-- have appended since: its nonce among the recent appends says it was (the reply is the first
-- run's); absent from a list that never dropped one, it was not. Past that, nobody can tell,
-- and the caller is told so rather than risk writing it twice.
-- (A producer's request needs none of this: its epoch and sequence number tell a resend.)
local nonce = ARGV[8]
local plain = ARGV[4] == ''
local written = tonumber(m.ri or '0')  -- plain appends recorded in the ring so far
if string.byte(nonce, 1) == 33 and plain then
  nonce = string.sub(nonce, 2)
  local mark = nonce .. ':'
  local slots = {}
  for i = 0, math.min(written, RECENT) - 1 do
    slots[#slots + 1] = 'r' .. i
  end
  local ring = #slots > 0 and redis.call('HMGET', KEYS[1], unpack(slots)) or {}
  for i = 1, #ring do
    local entry = ring[i]
    if entry and string.sub(entry, 1, #mark) == mark then
      m.tail = string.sub(entry, #mark + 1)
      return {'ok', unpack(info(m))}
    end
  end
  if written >= RECENT then
    return {'unsure'}
  end
end
local has_data = #ARGV >= 9
local close = ARGV[2] == '1'
local pid = ARGV[4]
local epoch, pseq = tonumber(ARGV[5]), tonumber(ARGV[6])

-- Producer checks first: a retry of the request that closed the stream is a duplicate, and a
-- zombie learns it is fenced even after the stream closed.
if pid ~= '' then
  local raw = redis.call('HGET', KEYS[3], pid)
  if not raw then
    if pseq ~= 0 then
      return {'gap', '0', ARGV[6]}
    end
  else
    local sep = string.find(raw, ':', 1, true)
    local cur_epoch, cur_seq = tonumber(string.sub(raw, 1, sep - 1)), tonumber(string.sub(raw, sep + 1))
    if epoch < cur_epoch then
      return {'stale', int(cur_epoch)}
    elseif epoch > cur_epoch then
      if pseq ~= 0 then
        return {'badseq'}
      end
    elseif pseq <= cur_seq then
      return {'dup', int(cur_epoch), int(cur_seq), unpack(info(m))}
    elseif pseq ~= cur_seq + 1 then
      return {'gap', int(cur_seq + 1), ARGV[6]}
    end
  end
end

if m.closed == '1' then
  if not has_data and close then
    touch(m)
    return {'closedok', unpack(info(m))}
  end
  return {'closed', m.tail}
end
if has_data and ARGV[1] ~= m.mt then
  return {'ct'}
end
if ARGV[3] ~= '' then
  if m.seq ~= nil and bytes_le(ARGV[3], m.seq) then
    return {'seq'}
  end
  redis.call('HSET', KEYS[1], 'seq', ARGV[3])
end

local tail = add_items(tonumber(m.tail), m.json == '1', 9)
m.tail = int(tail)
local fields = {'tail', m.tail}
if plain then
  table.insert(fields, 'r' .. (written % RECENT)); table.insert(fields, nonce .. ':' .. m.tail)
  table.insert(fields, 'ri'); table.insert(fields, written + 1)
end
if close then
  m.closed = '1'
  table.insert(fields, 'closed'); table.insert(fields, '1')
end
redis.call('HSET', KEYS[1], unpack(fields))
if pid ~= '' then
  redis.call('HSET', KEYS[3], pid, int(epoch) .. ':' .. int(pseq))
end
if m.ttl ~= nil and m.ttl ~= '' then
  touch(m)
else
  apply_expiry(m)
end
if has_data or close then
  redis.call('PUBLISH', ARGV[7], m.tail)
end
return {'ok', unpack(info(m))}
