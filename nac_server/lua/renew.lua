-- Renew: push a live job's lease to now + its TTL. Never changes the revision.
--
-- KEYS[1] jobs hash, KEYS[2] lease zset.
-- ARGV[1] job id, ARGV[2] owner.
--
-- Returns {"renewed", job_json} with the new expiry, {"absent"} when the job has ended or its
-- lease has already run out (renewing cannot revive it), or {"denied", job_json} for another owner.

local jobs_key, leases_key = KEYS[1], KEYS[2]
local job_id, owner = ARGV[1], ARGV[2]

local stored = redis.call('HGET', jobs_key, job_id)
if not stored then
  return {'absent'}
end
local record = cjson.decode(stored)
if record.owner ~= owner then
  return {'denied', stored}
end
local now = now_ms()
local deadline = tonumber(redis.call('ZSCORE', leases_key, job_id) or '0')
if deadline <= now then
  return {'absent'}
end
record.exp = now + record.ttl
local record_json = cjson.encode(record)
redis.call('HSET', jobs_key, job_id, record_json)
redis.call('ZADD', leases_key, record.exp, job_id)
return {'renewed', record_json}
