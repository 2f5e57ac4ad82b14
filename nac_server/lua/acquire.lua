-- Acquire: grant a job on all of its nodes or on none; with a wait, queue it when refused.
--
-- KEYS: SCRIPT_KEYS.acquire, that is jobs, leases, rev, fence, events, waiters, waitexp, waitseq,
-- delays, delayjobs, contended, evbytes, notices (all nac:{ns}:<name>), then per requested node,
-- in request order: its node hash and its queue.
-- ARGV[1] job id, ARGV[2] owner, ARGV[3] operation, ARGV[4] ttl in ms, ARGV[5] "1" for a dry run,
-- ARGV[6] history caps "events,bytes,notices", ARGV[7] number of actions, ARGV[8] wait in ms (0: answer at once),
-- ARGV[9] waiter liveness in ms, ARGV[10] group ("" for none), ARGV[11] the end of a grace
-- period after a loss of the store's data in ms (0: none), ARGV[12] "1" for a reclaim,
-- ARGV[13] "1" once the caller has looked at the deployment's epoch for this call,
-- ARGV[14..] per node: name, require mask, allow mask.
--
-- Returns {verdict, revision, record, extra, conflict...} (see answer in _lib), the verdict one of
--   GRANTED         record: the job, which now holds every node
--   EXISTING        record: the same job, already held (a retry)
--   NOT_HELD        record: the same job, whose lease has run out by the store's clock but
--                   that the sweep has not expired yet: it is no longer held
--   ALREADY_EXISTS  record: the holder of the id, held or waiting with other content, or a lost
--                   job still in lock-delay
--   WOULD_GRANT     dry run, no conflict
--   REFUSED         conflicts as flat groups (see _lib)
--   QUEUED          waiting; extra: its position in each node's queue; conflicts; call again
--                   to re-check
--   DEADLOCK        queuing would close a cycle of waiting owners, or a re-check of a queued
--                   job finds one closed since (it then leaves the queue with WAIT_ENDED);
--                   extra: the cycle in words
--   CHECK_EPOCH     nothing done: the namespace has no token counter (it is new, or the store
--                   lost its data), so the caller looks at the epoch (a loss starts a grace
--                   period) and calls again with ARGV[13] "1"
-- A job conflicts with the holders and lost holders of its nodes, and with the jobs queued there
-- before it (fairness), except those of its own group; during a grace period, every job but a
-- reclaim is refused with one GRACE conflict per node. A retry of a granted call answers "existing", so no token is taken twice;
-- a call for a queued job re-checks it in its place and refreshes its liveness.

local keys, bad = script_keys('acquire')
if not keys then return bad end

local job_id, owner, operation = ARGV[1], ARGV[2], ARGV[3]
local ttl, dry_run, limits, nactions = tonumber(ARGV[4]), ARGV[5] == '1', ARGV[6], tonumber(ARGV[7])
local wait, liveness, group = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10]
local grace_end, reclaim = tonumber(ARGV[11]), ARGV[12] == '1'
local epoch_checked = ARGV[13] == '1'

local nodes = {}
for i = 14, #ARGV, 3 do
  nodes[#nodes + 1] = {ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])}
end
bad = expect_key_count(keys, 2 * #nodes)
if bad then return bad end
local function node_key(i) return KEYS[keys.fixed + 2 * i - 1] end
local function queue_key(i) return KEYS[keys.fixed + 2 * i] end

local function same_content(record)
  return record.owner == owner and record.op == operation and (record.group or '') == group
    and same_nodes(record.nodes, nodes)
end

local waiting = nil
if not dry_run then
  local stored = redis.call('HGET', keys.jobs, job_id)
  if stored then
    local record = cjson.decode(stored)
    local verdict = same_content(record) and VERDICT.EXISTING or VERDICT.ALREADY_EXISTS
    -- Judged by the store's clock, not by whether the sweep has come by.
    if verdict == VERDICT.EXISTING and record.exp <= now_ms() then
      verdict = VERDICT.NOT_HELD
    end
    return answer(verdict, current_revision(keys.rev), stored)
  end
  -- A lost job in lock-delay still counts as holding its nodes, so its id is still in use.
  local lost = redis.call('HGET', keys.delayjobs, job_id)
  if lost then
    return answer(VERDICT.ALREADY_EXISTS, current_revision(keys.rev), lost)
  end
  local queued = redis.call('HGET', keys.waiters, job_id)
  if queued then
    waiting = cjson.decode(queued)
    if not same_content(waiting) then
      return answer(VERDICT.ALREADY_EXISTS, current_revision(keys.rev), queued)
    end
  end
end

-- A grant that would start the token counter could be the first after a loss the replicas have
-- not noticed yet: they look first, so that it falls in the grace period.
if not dry_run and not epoch_checked and redis.call('EXISTS', keys.fence) == 0 then
  return answer(VERDICT.CHECK_EPOCH, current_revision(keys.rev))
end

local conflicts = {}
if grace_end > 0 and not reclaim and now_ms() < grace_end then
  -- Holders from before the loss may still be writing: only they may come back for now.
  local nobody = {owner = '', op = ''}
  for i, node in ipairs(nodes) do
    local action = 5 -- READ_METADATA, for a node that requires nothing
    for a = 1, nactions do
      if has(node[2], a) then action = a break end
    end
    push_conflict(conflicts, i, action, KIND.GRACE, '', nobody, grace_end)
  end
else
  for i, node in ipairs(nodes) do
    if node_refuses(node_key(i), node[2], node[3], nactions, nil, group) then
      explain_node(conflicts, keys, node_key(i), i, node[2], node[3], nactions, nil, group)
    end
    explain_queue(conflicts, keys, queue_key(i), node[1], i, node[2], node[3], nactions,
      waiting and waiting.seq or nil, group)
  end
end

if dry_run then
  if #conflicts > 0 then
    return answer(VERDICT.REFUSED, current_revision(keys.rev), nil, 0, conflicts)
  end
  return answer(VERDICT.WOULD_GRANT, current_revision(keys.rev))
end

local now = now_ms()

local function leave_queue()
  redis.call('HDEL', keys.waiters, job_id)
  redis.call('ZREM', keys.waitexp, job_id)
  for i = 1, #nodes do
    redis.call('ZREM', queue_key(i), job_id)
  end
end

if #conflicts == 0 then
  if waiting then leave_queue() end
  local record = {
    id = job_id, owner = owner, op = operation, nodes = nodes,
    token = digits((next_counter(keys.fence, select(4, history_limits(limits))))), acq = now, exp = now + ttl, ttl = ttl, group = group,
  }
  local record_json = cjson.encode(record)
  redis.call('HSET', keys.jobs, job_id, record_json)
  redis.call('ZADD', keys.leases, record.exp, job_id)
  for i, node in ipairs(nodes) do
    add_holder(node_key(i), job_id, node[2], node[3], nactions, group)
  end
  local revision = emit(keys, limits, EVENT.ACQUIRED, record_json, now)
  return answer(VERDICT.GRANTED, revision, record_json)
end

-- Who keeps this job out: the wait-for edges of the deadlock check.
local blocked, seen = {}, {}
for g = 1, #conflicts, CONFLICT_WIDTH do
  local kind, holder_id, holder_owner = conflicts[g + 2], conflicts[g + 3], conflicts[g + 4]
  if kind ~= KIND.LOCK_DELAY and kind ~= KIND.GRACE and not seen[holder_id] then
    seen[holder_id] = true
    blocked[#blocked + 1] = {holder_owner, holder_id}
  end
end

-- A path of waiting owners from one of ours back to us closes a cycle that no one can leave.
local function find_cycle()
  local edges = {}
  for _, text in ipairs(redis.call('HVALS', keys.waiters)) do
    local other = cjson.decode(text)
    if other.id ~= job_id then
      edges[other.owner] = edges[other.owner] or {}
      for _, edge in ipairs(other.blocked) do
        table.insert(edges[other.owner], {edge[1], edge[2], other.id})
      end
    end
  end
  local visited, frontier = {}, {}
  for _, edge in ipairs(blocked) do
    if edge[1] ~= owner and not visited[edge[1]] then
      visited[edge[1]] = true
      frontier[#frontier + 1] = {edge[1], owner .. ' (job ' .. job_id .. ') waits for job '
        .. edge[2] .. ' of ' .. edge[1]}
    end
  end
  while #frontier > 0 do
    local current = table.remove(frontier, 1)
    for _, edge in ipairs(edges[current[1]] or {}) do
      local path = current[2] .. '; ' .. current[1] .. ' (job ' .. edge[3] .. ') waits for job '
        .. edge[2] .. ' of ' .. edge[1]
      if edge[1] == owner then
        return path
      end
      if not visited[edge[1]] then
        visited[edge[1]] = true
        frontier[#frontier + 1] = {edge[1], path}
      end
    end
  end
  return nil
end

local waiter_json
if waiting then
  -- What keeps it out may have changed since it queued (a conversion, other waiters): a cycle
  -- closed meanwhile is reported now, and the job leaves the queue.
  local cycle = find_cycle()
  if cycle then
    leave_queue()
    emit(keys, limits, EVENT.WAIT_ENDED, cjson.encode(waiting), now)
    return answer(VERDICT.DEADLOCK, current_revision(keys.rev), nil, cycle)
  end
  -- Same nodes, perhaps in another order: keep this call's, which the conflicts index.
  waiting.nodes = nodes
  waiting.blocked = blocked
  waiting.exp = math.min(waiting.deadline, now + liveness)
  waiter_json = cjson.encode(waiting)
  redis.call('HSET', keys.waiters, job_id, waiter_json)
  redis.call('ZADD', keys.waitexp, waiting.exp, job_id)
elseif wait > 0 then
  local cycle = find_cycle()
  if cycle then
    return answer(VERDICT.DEADLOCK, current_revision(keys.rev), nil, cycle)
  end
  local seq = redis.call('INCR', keys.waitseq)
  local deadline = now + wait
  waiting = {
    id = job_id, owner = owner, op = operation, nodes = nodes, ttl = ttl, seq = seq,
    deadline = deadline, exp = math.min(deadline, now + liveness), blocked = blocked,
    group = group,
  }
  waiter_json = cjson.encode(waiting)
  redis.call('HSET', keys.waiters, job_id, waiter_json)
  redis.call('ZADD', keys.waitexp, waiting.exp, job_id)
  for i = 1, #nodes do
    redis.call('ZADD', queue_key(i), seq, job_id)
  end
  emit(keys, limits, EVENT.WAITING, waiter_json, now)
end

note_contentions(keys, limits, conflicts, nodes, job_id, owner, operation, now)

if not waiting then
  return answer(VERDICT.REFUSED, current_revision(keys.rev), nil, 0, conflicts)
end
local positions = {}
for i = 1, #nodes do
  positions[i] = redis.call('ZCOUNT', queue_key(i), '-inf', waiting.seq)
end
return answer(VERDICT.QUEUED, current_revision(keys.rev), nil, positions, conflicts)
