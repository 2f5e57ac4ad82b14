-- Release, expire or force-release: end a job and free its nodes.
--
-- KEYS[1] jobs, KEYS[2] leases, KEYS[3] rev, KEYS[4] events, KEYS[5] ghosts, KEYS[6] ghostjobs,
-- KEYS[7] config, KEYS[8] evbytes (all nac:{ns}:<name>), then the node hashes of the job's nodes, in its order.
-- ARGV[1] job id, ARGV[2] owner (release only), ARGV[3] "release", "expire" or "force",
-- ARGV[4] history caps "events,bytes,notices", ARGV[5] number of actions, ARGV[6] default lock-delay in ms,
-- ARGV[7] reason and ARGV[8] actor (force only).
--
-- Returns one of
--   {"released", revision, job_json, delay_end_ms}   ended; RELEASED, EXPIRED or FORCE_RELEASED
--   {"absent", revision}                  no such job (never held, or already ended)
--   {"denied", revision, job_json}        release by another owner; nothing changed
--   {"alive", revision}                   expire, but the lease has been renewed meanwhile
--   {"retry", revision, job_json}         KEYS named other nodes than the job holds; call again
-- A lost holder (expire, force) leaves its masks on its nodes for the namespace's lock-delay
-- (config field lock_delay_ms, else ARGV[6]); a clean release never does. Every replica may run
-- "expire" for the same job at once: only the first finds it.

local FIXED = 8
local keys = namespace_keys('jobs')
local bad = expect_keys(keys, {'jobs', 'leases', 'rev', 'events', 'ghosts', 'ghostjobs', 'config',
  'evbytes'})
if bad then return bad end

local job_id, owner, mode, limits = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local nactions, default_delay = tonumber(ARGV[5]), tonumber(ARGV[6])

local stored = redis.call('HGET', keys.jobs, job_id)
if not stored then
  return {'absent', current_revision(keys.rev)}
end
local record = cjson.decode(stored)
local now = now_ms()
if mode == 'release' and record.owner ~= owner then
  return {'denied', current_revision(keys.rev), stored}
end
if mode == 'expire' then
  local deadline = tonumber(redis.call('ZSCORE', keys.leases, job_id) or '0')
  if deadline > now then
    return {'alive', current_revision(keys.rev)}
  end
end
if not node_keys_match(keys.prefix, record, FIXED + 1, {'n:'}) then
  return {'retry', current_revision(keys.rev), stored}
end

local delay = 0
if mode ~= 'release' then
  delay = tonumber(redis.call('HGET', keys.config, 'lock_delay_ms') or default_delay)
end
local delay_end = 0
if delay > 0 then
  delay_end = now + delay
  -- The lost holder keeps counting on its nodes: its masks move from "h:" to "g:".
  for i = 1, #record.nodes do
    local node_key = KEYS[FIXED + i]
    local masks = redis.call('HGET', node_key, 'h:' .. job_id)
    redis.call('HDEL', node_key, 'h:' .. job_id)
    redis.call('HSET', node_key, 'g:' .. job_id, masks)
  end
  redis.call('ZADD', keys.ghosts, delay_end, job_id)
  redis.call('HSET', keys.ghostjobs, job_id, stored)
else
  for i = 1, #record.nodes do
    remove_holder(KEYS[FIXED + i], 'h:' .. job_id, nactions)
  end
end
redis.call('HDEL', keys.jobs, job_id)
redis.call('ZREM', keys.leases, job_id)
local event_type = ({release = 'RELEASED', expire = 'EXPIRED', force = 'FORCE_RELEASED'})[mode]
local extra = {}
if mode == 'force' then
  extra = {'reason', ARGV[7], 'actor', ARGV[8]}
end
local revision = emit(keys, limits, event_type, stored, now, extra)
return {'released', revision, stored, delay_end}
