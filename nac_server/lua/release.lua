-- Release, expire or force-release: end a job and free its nodes.
--
-- KEYS: SCRIPT_KEYS.release, that is jobs, leases, rev, events, delays, delayjobs, config,
-- evbytes (all nac:{ns}:<name>), then the node hashes of the job's nodes, in its order.
-- ARGV[1] job id, ARGV[2] owner (release only), ARGV[3] "release", "expire" or "force",
-- ARGV[4] history caps "events,bytes,notices", ARGV[5] number of actions,
-- ARGV[6] default lock-delay in ms, ARGV[7] reason and ARGV[8] actor (force only).
--
-- Returns {verdict, revision, record, extra} (see answer in _lib), the verdict one of
--   RELEASED           ended with RELEASED, EXPIRED or FORCE_RELEASED; record: the job;
--                      extra: the end of its nodes' lock-delay in ms, 0 for none
--   NOT_HELD           no such job (never held, or already ended)
--   PERMISSION_DENIED  release by another owner; nothing changed; record: the job
--   STILL_LIVE         expire, but the lease has been renewed meanwhile
--   RETRY              KEYS named other nodes than the job holds; record: the job; call again
-- A lost holder (expire, force) leaves its masks on its nodes for the namespace's lock-delay
-- (config field lock_delay_ms, else ARGV[6]); a clean release never does. Every replica may run
-- "expire" for the same job at once: only the first finds it.

local keys, bad = script_keys('release')
if not keys then return bad end

local job_id, owner, mode, limits = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local nactions, default_delay = tonumber(ARGV[5]), tonumber(ARGV[6])

local stored, record, absent = stored_record(keys.jobs, job_id, keys.rev)
if not stored then return absent end
local now = now_ms()
if mode == 'release' and record.owner ~= owner then
  return answer(VERDICT.PERMISSION_DENIED, current_revision(keys.rev), stored)
end
if mode == 'expire' then
  local deadline = tonumber(redis.call('ZSCORE', keys.leases, job_id) or '0')
  if deadline > now then
    return answer(VERDICT.STILL_LIVE, current_revision(keys.rev))
  end
end
if not node_keys_match(keys.prefix, record, keys.fixed + 1, {'n:'}) then
  return answer(VERDICT.RETRY, current_revision(keys.rev), stored)
end

local delay = 0
if mode ~= 'release' then
  delay = tonumber(redis.call('HGET', keys.config, 'lock_delay_ms') or default_delay)
end
local delay_end = 0
if delay > 0 then
  delay_end = now + delay
  -- The lost holder keeps counting on its nodes: its masks move from "h:" to "d:". It leaves
  -- its group, which may not skip its lock-delay.
  for i = 1, #record.nodes do
    local node_key = KEYS[keys.fixed + i]
    local masks = redis.call('HGET', node_key, 'h:' .. job_id)
    redis.call('HDEL', node_key, 'h:' .. job_id)
    redis.call('HSET', node_key, 'd:' .. job_id, masks)
    local require, allow = parse_masks(masks)
    count_in_group(node_key, record.group, require, allow, nactions, -1)
  end
  redis.call('ZADD', keys.delays, delay_end, job_id)
  redis.call('HSET', keys.delayjobs, job_id, stored)
else
  for i = 1, #record.nodes do
    remove_holder(KEYS[keys.fixed + i], 'h:' .. job_id, nactions, record.group)
  end
end
redis.call('HDEL', keys.jobs, job_id)
redis.call('ZREM', keys.leases, job_id)
local event_type = ({
  release = EVENT.RELEASED, expire = EVENT.EXPIRED, force = EVENT.FORCE_RELEASED,
})[mode]
local extra = {}
if mode == 'force' then
  extra = {'reason', ARGV[7], 'actor', ARGV[8]}
end
local revision = emit(keys, limits, event_type, stored, now, extra)
return answer(VERDICT.RELEASED, revision, stored, delay_end)
