-- Renew: push a live job's lease to now + its TTL. Never changes the revision.
--
-- KEYS: SCRIPT_KEYS.renew, that is jobs, leases (nac:{ns}:<name>).
-- ARGV[1] job id, ARGV[2] owner.
--
-- Returns {verdict, 0, record, 0} (see answer in _lib), the verdict one of
--   RENEWED            record: the job with its new expiry
--   NOT_HELD           the job has ended or its lease has already run out (renewing cannot
--                      revive it)
--   PERMISSION_DENIED  another owner's job; record: the job

local keys, bad = script_keys('renew')
if not keys then return bad end
local job_id, owner = ARGV[1], ARGV[2]

local stored = redis.call('HGET', keys.jobs, job_id)
if not stored then
  return answer(VERDICT.NOT_HELD, 0)
end
local record = cjson.decode(stored)
if record.owner ~= owner then
  return answer(VERDICT.PERMISSION_DENIED, 0, stored)
end
local now = now_ms()
local deadline = tonumber(redis.call('ZSCORE', keys.leases, job_id) or '0')
if deadline <= now then
  return answer(VERDICT.NOT_HELD, 0)
end
record.exp = now + record.ttl
local record_json = cjson.encode(record)
redis.call('HSET', keys.jobs, job_id, record_json)
redis.call('ZADD', keys.leases, record.exp, job_id)
return answer(VERDICT.RENEWED, 0, record_json)
