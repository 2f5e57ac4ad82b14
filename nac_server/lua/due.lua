-- Due: what the expiry sweep must end, and when it should look again. Writes only to drop
-- index entries whose record is gone.
--
-- KEYS: SCRIPT_KEYS.due, that is leases, jobs, waitexp, waiters, delays, delayjobs (all
-- nac:{ns}:<name>).
-- ARGV[1] most entries of each kind to return.
--
-- Returns {now_ms, next_deadline_ms or -1, {job_json...}, {waiter_json...}, {lost_job_json...}}:
-- jobs whose lease ran out, waiters whose wait or liveness ran out, and lost holders whose
-- lock-delay is over. The sweep ends each with a script that checks the deadline again.

local keys, bad = script_keys('due')
if not keys then return bad end
local limit = tonumber(ARGV[1])
local now = now_ms()
local next_deadline = -1
local function due(index_key, records_key)
  local found = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', index_key, '-inf', now, 'LIMIT', 0, limit)) do
    local stored = redis.call('HGET', records_key, id)
    if stored then
      found[#found + 1] = stored
    else
      redis.call('ZREM', index_key, id)
    end
  end
  local upcoming = redis.call('ZRANGEBYSCORE', index_key, '(' .. now, '+inf', 'WITHSCORES',
    'LIMIT', 0, 1)
  if #upcoming > 0 then
    local at = tonumber(upcoming[2])
    if next_deadline < 0 or at < next_deadline then
      next_deadline = at
    end
  end
  return found
end
local jobs = due(keys.leases, keys.jobs)
local waiters = due(keys.waitexp, keys.waiters)
local delays = due(keys.delays, keys.delayjobs)
return {now, next_deadline, jobs, waiters, delays}
