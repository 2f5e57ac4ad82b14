-- Due: which leases have run out, and when the next one will. Writes only to drop a lease
-- whose job is gone.
--
-- KEYS[1] lease zset, KEYS[2] jobs hash.
-- ARGV[1] most jobs to return.
--
-- Returns {now_ms, next_deadline_ms or -1, job_json...} for jobs whose deadline has passed.
-- The caller expires each one with release.lua, which checks the deadline again.

local leases_key, jobs_key = KEYS[1], KEYS[2]
local now = now_ms()
local reply = {now, -1}
local due = redis.call('ZRANGEBYSCORE', leases_key, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, job_id in ipairs(due) do
  local stored = redis.call('HGET', jobs_key, job_id)
  if stored then
    reply[#reply + 1] = stored
  else
    -- A lease without a job cannot be expired by release.lua; drop it here.
    redis.call('ZREM', leases_key, job_id)
  end
end
local upcoming = redis.call('ZRANGEBYSCORE', leases_key, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #upcoming > 0 then
  reply[2] = tonumber(upcoming[2])
end
return reply
