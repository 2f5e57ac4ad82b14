-- Update: convert a held job to a new node list and masks, all nodes or none.
--
-- KEYS[1] jobs, KEYS[2] rev, KEYS[3] events, KEYS[4] ghosts, KEYS[5] ghostjobs,
-- KEYS[6] contended, KEYS[7] evbytes, KEYS[8] notices (all nac:{ns}:<name>), then the node hashes of the job's current nodes in its
-- order, then those of the requested nodes in request order (a node may appear in both).
-- ARGV[1] job id, ARGV[2] owner, ARGV[3] "1" for a dry run, ARGV[4] history caps "events,bytes,notices",
-- ARGV[5] number of actions, ARGV[6] how many current nodes KEYS names,
-- ARGV[7..] per requested node: name, require mask, allow mask.
--
-- Returns one of
--   {"updated", revision, job_json}       converted; UPDATED event (naming the nodes it no
--                                         longer holds); same token and lease
--   {"unchanged", revision, job_json}     the job already has exactly these nodes and masks
--   {"would_update", revision, job_json}  dry run, no conflict
--   {"refused", revision, job_json, c...} conflicts as flat groups of seven; job untouched
--   {"absent", revision}                  no such job
--   {"denied", revision, job_json}        another owner's job
--   {"retry", revision, job_json}         KEYS named other current nodes; call again
-- The job is checked against the other holders and lost holders of each node, never against
-- itself and never against waiters: a conversion goes ahead of the queue.

local FIXED = 8
local keys = namespace_keys('jobs')
local bad = expect_keys(keys, {'jobs', 'rev', 'events', 'ghosts', 'ghostjobs', 'contended',
  'evbytes', 'notices'})
if bad then return bad end

local job_id, owner, dry_run, limits = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local nactions, current_count = tonumber(ARGV[5]), tonumber(ARGV[6])
local nodes = {}
for i = 7, #ARGV, 3 do
  nodes[#nodes + 1] = {ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])}
end

local stored = redis.call('HGET', keys.jobs, job_id)
if not stored then
  return {'absent', current_revision(keys.rev)}
end
local record = cjson.decode(stored)
if record.owner ~= owner then
  return {'denied', current_revision(keys.rev), stored}
end
if not node_keys_match(keys.prefix, record, FIXED + 1, {'n:'}, current_count) then
  return {'retry', current_revision(keys.rev), stored}
end
local function new_key(i) return KEYS[FIXED + current_count + i] end

if same_nodes(record.nodes, nodes) then
  return {'unchanged', current_revision(keys.rev), stored}
end

local conflicts = {}
for i, node in ipairs(nodes) do
  local own = redis.call('HGET', new_key(i), 'h:' .. job_id)
  if node_refuses(new_key(i), node[2], node[3], nactions, own or nil) then
    explain_node(conflicts, keys, new_key(i), i, node[2], node[3], nactions, job_id)
  end
end

if #conflicts > 0 then
  if not dry_run then
    note_contentions(keys, limits, conflicts, nodes, job_id, owner, record.op, now_ms())
  end
  local reply = {'refused', current_revision(keys.rev), stored}
  for _, v in ipairs(conflicts) do
    reply[#reply + 1] = v
  end
  return reply
end
if dry_run then
  return {'would_update', current_revision(keys.rev), stored}
end

for i = 1, current_count do
  remove_holder(KEYS[FIXED + i], 'h:' .. job_id, nactions)
end
for i, node in ipairs(nodes) do
  add_holder(new_key(i), job_id, node[2], node[3], nactions)
end
-- Watchers and waiters of a node the job lets go must hear of it too.
local kept, dropped = {}, {}
for _, node in ipairs(nodes) do
  kept[node[1]] = true
end
for _, node in ipairs(record.nodes) do
  if not kept[node[1]] then
    dropped[#dropped + 1] = node[1]
  end
end
local extra = {}
if #dropped > 0 then
  extra = {'dropped', cjson.encode(dropped)}
end
record.nodes = nodes
local record_json = cjson.encode(record)
redis.call('HSET', keys.jobs, job_id, record_json)
local revision = emit(keys, limits, 'UPDATED', record_json, now_ms(), extra)
return {'updated', revision, record_json}
