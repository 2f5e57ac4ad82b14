-- Unwait: take a waiting job out of its queues without a grant.
--
-- KEYS[1] waiters, KEYS[2] waitexp, KEYS[3] rev, KEYS[4] events, KEYS[5] evbytes
-- (all nac:{ns}:<name>), then the queue of each of the waiter's nodes, in its order.
-- ARGV[1] job id, ARGV[2] "leave" (its wait ended or its client went away) or "lapsed" (the
-- sweep found its liveness over), ARGV[3] history caps "events,bytes,notices".
--
-- Returns {"left", revision} with a WAIT_ENDED event, {"absent", revision} when it is not
-- waiting (granted meanwhile, or already gone), {"alive", revision} for "lapsed" when the waiter
-- was refreshed meanwhile, or {"retry", revision, waiter_json} when KEYS named other queues.

local FIXED = 5
local keys = namespace_keys('waiters')
local bad = expect_keys(keys, {'waiters', 'waitexp', 'rev', 'events', 'evbytes'})
if bad then return bad end

local job_id, mode, limits = ARGV[1], ARGV[2], ARGV[3]
local stored = redis.call('HGET', keys.waiters, job_id)
if not stored then
  return {'absent', current_revision(keys.rev)}
end
local record = cjson.decode(stored)
local now = now_ms()
if mode == 'lapsed' and record.exp > now then
  return {'alive', current_revision(keys.rev)}
end
if not node_keys_match(keys.prefix, record, FIXED + 1, {'q:'}) then
  return {'retry', current_revision(keys.rev), stored}
end
for i = 1, #record.nodes do
  redis.call('ZREM', KEYS[FIXED + i], job_id)
end
redis.call('HDEL', keys.waiters, job_id)
redis.call('ZREM', keys.waitexp, job_id)
return {'left', emit(keys, limits, 'WAIT_ENDED', stored, now)}
