-- Unwait: take a waiting job out of its queues without a grant.
--
-- KEYS: SCRIPT_KEYS.unwait, that is waiters, waitexp, rev, events, evbytes (all
-- nac:{ns}:<name>), then the queue of each of the waiter's nodes, in its order.
-- ARGV[1] job id, ARGV[2] "leave" (its wait ended or its client went away) or "lapsed" (the
-- sweep found its liveness over), ARGV[3] history caps "events,bytes,notices".
--
-- Returns {verdict, revision, record, 0} (see answer in _lib), the verdict one of
--   RELEASED    left the queue, with a WAIT_ENDED event; record: the waiter
--   NOT_HELD    not waiting (granted meanwhile, or already gone)
--   STILL_LIVE  "lapsed", but the waiter was refreshed meanwhile
--   RETRY       KEYS named other queues; record: the waiter; call again

local keys, bad = script_keys('unwait')
if not keys then return bad end

local job_id, mode, limits = ARGV[1], ARGV[2], ARGV[3]
local stored, record, absent = stored_record(keys.waiters, job_id, keys.rev)
if not stored then return absent end
local now = now_ms()
if mode == 'lapsed' and record.exp > now then
  return answer(VERDICT.STILL_LIVE, current_revision(keys.rev))
end
if not node_keys_match(keys.prefix, record, keys.fixed + 1, {'q:'}) then
  return answer(VERDICT.RETRY, current_revision(keys.rev), stored)
end
for i = 1, #record.nodes do
  redis.call('ZREM', KEYS[keys.fixed + i], job_id)
end
redis.call('HDEL', keys.waiters, job_id)
redis.call('ZREM', keys.waitexp, job_id)
return answer(VERDICT.RELEASED, emit(keys, limits, EVENT.WAIT_ENDED, stored, now), stored)
