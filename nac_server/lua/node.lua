-- Node: one node's aggregate flags, holders, queue and lock-delays, read atomically. Read-only.
--
-- KEYS: SCRIPT_KEYS.node, that is jobs, rev, waiters, delays, delayjobs (nac:{ns}:<name>), then
-- the node's hash and its queue.
-- ARGV[1] number of actions.
--
-- Returns {revision, holder_count, {{required_by, allowed_by} per action}, {holder_json...},
-- {waiter_json... in queue order}, {lost_job_json, delay_end_ms, ...}}. The counts include lost
-- holders in lock-delay, which still block.

local keys, bad = script_keys('node')
if not keys then return bad end
bad = expect_key_count(keys, 2)
if bad then return bad end
local node_key, queue_key = KEYS[keys.fixed + 1], KEYS[keys.fixed + 2]
local nactions = tonumber(ARGV[1])
local counts, holders, delays = {}, {}, {}
for i = 1, nactions do
  local pair = redis.call('HMGET', node_key, 'r' .. i, 'a' .. i)
  counts[i] = {tonumber(pair[1] or '0'), tonumber(pair[2] or '0')}
end
local flat = redis.call('HGETALL', node_key)
for k = 1, #flat, 2 do
  local prefix, job_id = string.sub(flat[k], 1, 2), string.sub(flat[k], 3)
  if prefix == 'h:' then
    holders[#holders + 1] = redis.call('HGET', keys.jobs, job_id)
  elseif prefix == 'd:' then
    delays[#delays + 1] = redis.call('HGET', keys.delayjobs, job_id)
    delays[#delays + 1] = tonumber(redis.call('ZSCORE', keys.delays, job_id) or '0')
  end
end
local waiters = {}
for _, job_id in ipairs(redis.call('ZRANGE', queue_key, 0, -1)) do
  waiters[#waiters + 1] = redis.call('HGET', keys.waiters, job_id)
end
return {current_revision(keys.rev), tonumber(redis.call('HGET', node_key, 'n') or '0'), counts,
  holders, waiters, delays}
