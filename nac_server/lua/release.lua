-- Release or expire: end a job and free its nodes.
--
-- KEYS[1] jobs hash, KEYS[2] lease zset, KEYS[3] revision counter, KEYS[4] event stream,
-- KEYS[5..] the node hashes of the job's nodes, in the job's order.
-- ARGV[1] job id, ARGV[2] owner (release only), ARGV[3] "release" or "expire",
-- ARGV[4] event history cap, ARGV[5] number of actions.
--
-- Returns one of
--   {"released", revision, job_json}      ended; RELEASED or EXPIRED event appended
--   {"absent", revision}                  no such job (never held, or already ended)
--   {"denied", revision, job_json}        release by another owner; nothing changed
--   {"alive", revision}                   expire, but the lease has been renewed meanwhile
--   {"retry", revision, job_json}         KEYS named other nodes than the job holds; call again
-- Every replica may run "expire" for the same job at once: only the first finds it.

local jobs_key, leases_key, rev_key, events_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, owner, mode, maxlen, nactions = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])

local stored = redis.call('HGET', jobs_key, job_id)
if not stored then
  return {'absent', current_revision(rev_key)}
end
local record = cjson.decode(stored)
local now = now_ms()
if mode == 'release' and record.owner ~= owner then
  return {'denied', current_revision(rev_key), stored}
end
if mode == 'expire' then
  local deadline = tonumber(redis.call('ZSCORE', leases_key, job_id) or '0')
  if deadline > now then
    return {'alive', current_revision(rev_key)}
  end
end
if not node_keys_match(jobs_key, record, KEYS, 5) then
  return {'retry', current_revision(rev_key), stored}
end

for i = 1, #record.nodes do
  remove_holder(KEYS[4 + i], job_id, nactions)
end
redis.call('HDEL', jobs_key, job_id)
redis.call('ZREM', leases_key, job_id)
local event_type = mode == 'expire' and 'EXPIRED' or 'RELEASED'
local revision = emit(rev_key, events_key, maxlen, event_type, stored, now)
return {'released', revision, stored}
