-- wrk script: 100-byte text appends, round-robin over 32 streams.
-- Usage: wrk -s append.lua http://host:port -- /v1/stream/<run-id>
local prefix = "/v1/stream/bench"
local streams = 32
local counter = 0
local body = string.rep("x", 100)
local headers = { ["Content-Type"] = "text/plain" }

function init(args)
  if args[1] then prefix = args[1] end
  counter = math.random(0, streams - 1)
end

function request()
  counter = counter + 1
  return wrk.format("POST", prefix .. "/s" .. (counter % streams), headers, body)
end
