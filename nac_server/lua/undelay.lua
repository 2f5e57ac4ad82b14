-- Undelay: end a lost holder's lock-delay once it is over, freeing its nodes.
--
-- KEYS[1] ghosts, KEYS[2] ghostjobs, KEYS[3] rev, KEYS[4] events, KEYS[5] evbytes
-- (all nac:{ns}:<name>), then the node hashes of the lost job's nodes, in its order.
-- ARGV[1] job id, ARGV[2] history caps "events,bytes,notices", ARGV[3] number of actions.
--
-- Returns {"ended", revision} with a LOCK_DELAY_ENDED event, {"absent", revision} when there is
-- no such delay, {"running", revision} when it is not over yet, or {"retry", revision, job_json}
-- when KEYS named other nodes.

local FIXED = 5
local keys = namespace_keys('ghosts')
local bad = expect_keys(keys, {'ghosts', 'ghostjobs', 'rev', 'events', 'evbytes'})
if bad then return bad end

local job_id, limits, nactions = ARGV[1], ARGV[2], tonumber(ARGV[3])
local stored = redis.call('HGET', keys.ghostjobs, job_id)
if not stored then
  return {'absent', current_revision(keys.rev)}
end
local now = now_ms()
if tonumber(redis.call('ZSCORE', keys.ghosts, job_id) or '0') > now then
  return {'running', current_revision(keys.rev)}
end
local record = cjson.decode(stored)
if not node_keys_match(keys.prefix, record, FIXED + 1, {'n:'}) then
  return {'retry', current_revision(keys.rev), stored}
end
for i = 1, #record.nodes do
  remove_holder(KEYS[FIXED + i], 'g:' .. job_id, nactions)
end
redis.call('ZREM', keys.ghosts, job_id)
redis.call('HDEL', keys.ghostjobs, job_id)
return {'ended', emit(keys, limits, 'LOCK_DELAY_ENDED', stored, now)}
