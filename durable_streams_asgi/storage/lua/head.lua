-- Metadata without refreshing the TTL: {state, creating request, info...}.
local m = load(KEYS[1])
local st = state(m)
if st ~= 'ok' then
  return {st, ''}
end
return {'ok', m.rq or '', unpack(info(m))}
