-- Node: one node's aggregate flags, holders, queue and lock-delays, read atomically. Read-only.
--
-- KEYS[1] node hash, KEYS[2] node queue, KEYS[3] jobs, KEYS[4] rev, KEYS[5] waiters,
-- KEYS[6] ghosts, KEYS[7] ghostjobs.
-- ARGV[1] number of actions.
--
-- Returns {revision, holder_count, {{required_by, allowed_by} per action}, {holder_json...},
-- {waiter_json... in queue order}, {ghost_json, delay_end_ms, ...}}. The counts include lost
-- holders in lock-delay, which still block.

local node_key, queue_key, jobs_key, rev_key, waiters_key, ghosts_key, ghostjobs_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local nactions = tonumber(ARGV[1])
local counts, holders, ghosts = {}, {}, {}
for i = 1, nactions do
  local pair = redis.call('HMGET', node_key, 'r' .. i, 'a' .. i)
  counts[i] = {tonumber(pair[1] or '0'), tonumber(pair[2] or '0')}
end
local flat = redis.call('HGETALL', node_key)
for k = 1, #flat, 2 do
  local prefix, job_id = string.sub(flat[k], 1, 2), string.sub(flat[k], 3)
  if prefix == 'h:' then
    holders[#holders + 1] = redis.call('HGET', jobs_key, job_id)
  elseif prefix == 'g:' then
    ghosts[#ghosts + 1] = redis.call('HGET', ghostjobs_key, job_id)
    ghosts[#ghosts + 1] = tonumber(redis.call('ZSCORE', ghosts_key, job_id) or '0')
  end
end
local waiters = {}
for _, job_id in ipairs(redis.call('ZRANGE', queue_key, 0, -1)) do
  waiters[#waiters + 1] = redis.call('HGET', waiters_key, job_id)
end
return {current_revision(rev_key), tonumber(redis.call('HGET', node_key, 'n') or '0'), counts,
  holders, waiters, ghosts}
