-- Undelay: end a lost holder's lock-delay once it is over, freeing its nodes.
--
-- KEYS: SCRIPT_KEYS.undelay, that is delays, delayjobs, rev, events, evbytes (all
-- nac:{ns}:<name>), then the node hashes of the lost job's nodes, in its order.
-- ARGV[1] job id, ARGV[2] history caps "events,bytes,notices", ARGV[3] number of actions.
--
-- Returns {verdict, revision, record, 0} (see answer in _lib), the verdict one of
--   RELEASED    the delay ended, with a LOCK_DELAY_ENDED event; record: the lost job
--   NOT_HELD    no such delay
--   STILL_LIVE  the delay is not over yet
--   RETRY       KEYS named other nodes; record: the lost job; call again

local keys, bad = script_keys('undelay')
if not keys then return bad end

local job_id, limits, nactions = ARGV[1], ARGV[2], tonumber(ARGV[3])
local stored = redis.call('HGET', keys.delayjobs, job_id)
if not stored then
  return answer(VERDICT.NOT_HELD, current_revision(keys.rev))
end
local now = now_ms()
if tonumber(redis.call('ZSCORE', keys.delays, job_id) or '0') > now then
  return answer(VERDICT.STILL_LIVE, current_revision(keys.rev))
end
local record = cjson.decode(stored)
if not node_keys_match(keys.prefix, record, keys.fixed + 1, {'n:'}) then
  return answer(VERDICT.RETRY, current_revision(keys.rev), stored)
end
for i = 1, #record.nodes do
  remove_holder(KEYS[keys.fixed + i], 'd:' .. job_id, nactions)
end
redis.call('ZREM', keys.delays, job_id)
redis.call('HDEL', keys.delayjobs, job_id)
return answer(VERDICT.RELEASED, emit(keys, limits, EVENT.LOCK_DELAY_ENDED, stored, now), stored)
