-- Update: convert a held job to a new node list and masks, all nodes or none.
--
-- KEYS: SCRIPT_KEYS.update, that is jobs, rev, events, delays, delayjobs, contended, evbytes,
-- notices (all nac:{ns}:<name>), then the node hashes of the job's current nodes in its order,
-- then those of the requested nodes in request order (a node may appear in both).
-- ARGV[1] job id, ARGV[2] owner, ARGV[3] "1" for a dry run, ARGV[4] history caps
-- "events,bytes,notices", ARGV[5] number of actions, ARGV[6..] per requested node: name,
-- require mask, allow mask. The current nodes are the keys the requested ones do not take.
--
-- Returns {verdict, revision, record, 0, conflict...} (see answer in _lib), the record being the
-- job as it is after the call, the verdict one of
--   UPDATED            converted; UPDATED event (naming the nodes it no longer holds); same
--                      token and lease
--   UNCHANGED          the job already has exactly these nodes and masks
--   WOULD_GRANT        dry run, no conflict
--   REFUSED            conflicts as flat groups; the job untouched
--   NOT_HELD           no such job (no record), or its lease has run out by the store's clock
--                      (the sweep will expire it)
--   PERMISSION_DENIED  another owner's job
--   RETRY              KEYS named other current nodes; call again
-- The job is checked against the other holders and lost holders of each node, never against
-- itself, its group or waiters: a conversion goes ahead of the queue.

local keys, bad = script_keys('update')
if not keys then return bad end

local job_id, owner, dry_run, limits = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local nactions = tonumber(ARGV[5])
local nodes = {}
for i = 6, #ARGV, 3 do
  nodes[#nodes + 1] = {ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])}
end
local current_count = #KEYS - keys.fixed - #nodes
if current_count < 0 then
  return expect_key_count(keys, #nodes)
end

local stored, record, absent = stored_record(keys.jobs, job_id, keys.rev)
if not stored then return absent end
if record.owner ~= owner then
  return answer(VERDICT.PERMISSION_DENIED, current_revision(keys.rev), stored)
end
if record.exp <= now_ms() then
  return answer(VERDICT.NOT_HELD, current_revision(keys.rev))
end
if not node_keys_match(keys.prefix, record, keys.fixed + 1, {'n:'}, current_count) then
  return answer(VERDICT.RETRY, current_revision(keys.rev), stored)
end
local function new_key(i) return KEYS[keys.fixed + current_count + i] end

if same_nodes(record.nodes, nodes) then
  return answer(VERDICT.UNCHANGED, current_revision(keys.rev), stored)
end

local conflicts = {}
for i, node in ipairs(nodes) do
  local own = redis.call('HGET', new_key(i), 'h:' .. job_id)
  if node_refuses(new_key(i), node[2], node[3], nactions, own or nil, record.group) then
    explain_node(conflicts, keys, new_key(i), i, node[2], node[3], nactions, job_id,
      record.group)
  end
end

if #conflicts > 0 then
  if not dry_run then
    note_contentions(keys, limits, conflicts, nodes, job_id, owner, record.op, now_ms())
  end
  return answer(VERDICT.REFUSED, current_revision(keys.rev), stored, 0, conflicts)
end
if dry_run then
  return answer(VERDICT.WOULD_GRANT, current_revision(keys.rev), stored)
end

for i = 1, current_count do
  remove_holder(KEYS[keys.fixed + i], 'h:' .. job_id, nactions, record.group)
end
for i, node in ipairs(nodes) do
  add_holder(new_key(i), job_id, node[2], node[3], nactions, record.group)
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
local revision = emit(keys, limits, EVENT.UPDATED, record_json, now_ms(), extra)
return answer(VERDICT.UPDATED, revision, record_json)
