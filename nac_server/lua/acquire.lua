-- Acquire: grant a job on all of its nodes or on none.
--
-- KEYS[1] jobs hash, KEYS[2] lease zset, KEYS[3] revision counter, KEYS[4] fencing counter,
-- KEYS[5] event stream, KEYS[6..] one node hash per requested node, in request order.
-- ARGV[1] job id, ARGV[2] owner, ARGV[3] operation, ARGV[4] ttl in ms, ARGV[5] "1" for a dry run,
-- ARGV[6] event history cap, ARGV[7] number of actions,
-- ARGV[8..] per node: name, require mask, allow mask.
--
-- Returns one of
--   {"granted", revision, job_json}       the job now holds every node
--   {"existing", revision, job_json}      the same job was already held (a retry)
--   {"exists", revision, job_json}        the id is held with other content
--   {"would_grant", revision}             dry run, no conflict
--   {"refused", revision, c1...}          conflicts as flat groups of six (see explain_node)
-- A retry of a granted call finds the job and answers "existing", so no token is taken twice.

local jobs_key, leases_key, rev_key, fence_key, events_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local job_id, owner, operation = ARGV[1], ARGV[2], ARGV[3]
local ttl, dry_run, maxlen, nactions = tonumber(ARGV[4]), ARGV[5] == '1', ARGV[6], tonumber(ARGV[7])

local nodes = {}
for i = 8, #ARGV, 3 do
  nodes[#nodes + 1] = {ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])}
end

if not dry_run then
  local stored = redis.call('HGET', jobs_key, job_id)
  if stored then
    local record = cjson.decode(stored)
    local same = record.owner == owner and record.op == operation and #record.nodes == #nodes
    if same then
      local wanted = {}
      for _, node in ipairs(nodes) do
        wanted[node[1]] = node[2] .. ',' .. node[3]
      end
      for _, node in ipairs(record.nodes) do
        if wanted[node[1]] ~= node[2] .. ',' .. node[3] then
          same = false
        end
      end
    end
    return {same and 'existing' or 'exists', current_revision(rev_key), stored}
  end
end

local refusing = {}
for i, node in ipairs(nodes) do
  if node_refuses(KEYS[5 + i], node[2], node[3], nactions, nil) then
    refusing[#refusing + 1] = i
  end
end

if #refusing > 0 then
  local reply = {'refused', current_revision(rev_key)}
  for _, i in ipairs(refusing) do
    explain_node(reply, jobs_key, KEYS[5 + i], i, nodes[i][2], nodes[i][3], nactions, nil)
  end
  return reply
end

if dry_run then
  return {'would_grant', current_revision(rev_key)}
end

local now = now_ms()
local record = {
  id = job_id, owner = owner, op = operation, nodes = nodes,
  token = redis.call('INCR', fence_key), acq = now, exp = now + ttl, ttl = ttl,
}
local record_json = cjson.encode(record)
redis.call('HSET', jobs_key, job_id, record_json)
redis.call('ZADD', leases_key, record.exp, job_id)
for i, node in ipairs(nodes) do
  add_holder(KEYS[5 + i], job_id, node[2], node[3], nactions)
end
local revision = emit(rev_key, events_key, maxlen, 'ACQUIRED', record_json, now)
return {'granted', revision, record_json}
