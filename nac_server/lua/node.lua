-- Node: one node's aggregate flags and its holders, read atomically. Read-only.
--
-- KEYS[1] node hash, KEYS[2] jobs hash, KEYS[3] revision counter.
-- ARGV[1] number of actions.
--
-- Returns {revision, holder_count, {required_by, allowed_by} per action..., job_json...}.

local node_key, jobs_key, rev_key = KEYS[1], KEYS[2], KEYS[3]
local nactions = tonumber(ARGV[1])
local reply = {current_revision(rev_key), tonumber(redis.call('HGET', node_key, 'n') or '0')}
for i = 1, nactions do
  local counts = redis.call('HMGET', node_key, 'r' .. i, 'a' .. i)
  reply[#reply + 1] = {tonumber(counts[1] or '0'), tonumber(counts[2] or '0')}
end
local flat = redis.call('HGETALL', node_key)
for k = 1, #flat, 2 do
  if string.sub(flat[k], 1, 2) == 'h:' then
    reply[#reply + 1] = redis.call('HGET', jobs_key, string.sub(flat[k], 3))
  end
end
return reply
