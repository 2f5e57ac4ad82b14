-- Shared helpers, prepended (after _vocabulary.lua) to every script when it is loaded (see
-- nac_server/scripts.py).
--
-- Node hash (nac:{ns}:n:<node>): "n" holder count, "r<i>" holders requiring action i, "a<i>"
-- holders allowing action i, "h:<job_id>" the holder's "require,allow" masks, and
-- ("d:<job_id>") the masks of a lost holder in lock-delay, which still counts as a holder until
-- the delay ends. Holders of a group (see model.py) are also counted per group: "gn:<group>",
-- "gr<i>:<group>" and "ga<i>:<group>", so that a job can leave its own group's holders out of the
-- check in O(actions) too. A lost holder has left its group.
-- Storing allow counts (not refusal counts) keeps old data right when an action is added: nobody
-- allows it yet.
-- Job hash (nac:{ns}:jobs): job_id -> JSON record
--   {id, owner, op, nodes = {{name, require, allow}, ...}, token (decimal string), acq, exp, ttl,
--   group}
-- Waiter hash (nac:{ns}:waiters): job_id -> JSON record
--   {id, owner, op, nodes, ttl, seq, deadline, exp, blocked = {{owner, job_id}, ...}, group}
-- (group is "" or absent for a job of no group).
-- Queue zset (nac:{ns}:q:<node>): waiting job_id -> seq, the order in which they queued.
-- Lock-delay: zset nac:{ns}:delays job_id -> end ms, hash nac:{ns}:delayjobs job_id -> job JSON.
-- History: stream nac:{ns}:events, one entry per change of state with its revision as id
-- ("<revision>-0"), and nac:{ns}:evbytes, the bytes its entries hold.
-- Notices: stream nac:{ns}:notices of advisory CONTENDED entries, which take no revision: the
-- k-th notice after revision R has id "<R>-<k>", so both streams merge in one order.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- An integer as decimal digits: Lua's own tostring and cjson keep only 14 significant digits.
local function digits(n)
  return string.format('%d', n)
end

-- The next value of a namespace's revision or fencing-token counter. A counter whose key is
-- missing (a new namespace, or a store that lost its data) starts from the store's clock in
-- microseconds, so it never goes back: every value handed out before the loss was at most the
-- clock when its counter started plus the grants since, and a store grants far fewer than one
-- a microsecond (see the proto's Job.fencing_token). floor (0: none) is where counters must
-- be above since this Redis process may have lost its last writes (see epoch.lua). Returns the
-- value and whether the counter started with it.
local function next_counter(key, floor)
  local value = redis.call('GET', key)
  local started = not value
  if started then
    local t = redis.call('TIME')
    redis.call('SET', key, digits(math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), floor)))
  elseif floor > tonumber(value) then
    redis.call('SET', key, digits(floor))
  end
  return redis.call('INCR', key), started
end

local function has(mask, i)
  return bit.band(mask, bit.lshift(1, i - 1)) ~= 0
end

local function parse_masks(value)
  local comma = string.find(value, ',', 1, true)
  return tonumber(string.sub(value, 1, comma - 1)), tonumber(string.sub(value, comma + 1))
end

-- Jobs of one non-empty group do not conflict with each other.
local function same_group(one, other)
  return one ~= nil and one ~= '' and one == other
end

-- True when any holder of node_key outside the caller's group refuses (require, allow).
-- O(actions), whatever the holders. own_masks, when given, is the caller's current hold on the
-- node, which never refuses itself (when the caller has a group, its group's counts hold it).
local function node_refuses(node_key, require, allow, nactions, own_masks, group)
  local in_group = group ~= nil and group ~= ''
  local fields = {'n'}
  for i = 1, nactions do
    fields[#fields + 1] = 'r' .. i
    fields[#fields + 1] = 'a' .. i
  end
  if in_group then
    fields[#fields + 1] = 'gn:' .. group
    for i = 1, nactions do
      fields[#fields + 1] = 'gr' .. i .. ':' .. group
      fields[#fields + 1] = 'ga' .. i .. ':' .. group
    end
  end
  local values = redis.call('HMGET', node_key, unpack(fields))
  local function value(k) return tonumber(values[k] or '0') end
  local holders = value(1)
  local own_require, own_allow = 0, 0
  local group_base = 2 * nactions + 1
  if in_group then
    holders = holders - value(group_base + 1)
  elseif own_masks then
    holders = holders - 1
    own_require, own_allow = parse_masks(own_masks)
  end
  if holders <= 0 then
    return false
  end
  for i = 1, nactions do
    local required_by = value(2 * i)
    local allowed_by = value(2 * i + 1)
    if in_group then
      required_by = required_by - value(group_base + 2 * i)
      allowed_by = allowed_by - value(group_base + 2 * i + 1)
    elseif own_masks then
      if has(own_require, i) then required_by = required_by - 1 end
      if has(own_allow, i) then allowed_by = allowed_by - 1 end
    end
    if has(require, i) and allowed_by < holders then
      return true
    end
    if required_by > 0 and not has(allow, i) then
      return true
    end
  end
  return false
end

-- Conflicts travel as flat groups of CONFLICT_WIDTH, in the order of vocabulary.CONFLICT_FIELDS:
-- node index, action, kind, holder id, holder owner, holder operation, and the end of a
-- lock-delay in ms (0 for other kinds).

local function push_conflict(out, index, action, kind, holder_id, record, delay_end)
  for _, v in ipairs({index, action, kind, holder_id, record.owner, record.op, delay_end}) do
    out[#out + 1] = v
  end
end

-- The actions on which masks (require, allow) and another job's (other_require, other_allow)
-- conflict, as {action, kind} pairs.
local function pair_conflicts(require, allow, other_require, other_allow, nactions)
  local found = {}
  for i = 1, nactions do
    if has(require, i) and not has(other_allow, i) then
      found[#found + 1] = {i, KIND.HOLDER_DOES_NOT_ALLOW}
    end
    if has(other_require, i) and not has(allow, i) then
      found[#found + 1] = {i, KIND.HOLDER_REQUIRES}
    end
  end
  return found
end

-- Appends one conflict of kind per action among found: for a lost holder or a job queued earlier
-- the direction does not matter, only that the action is in the way.
local function push_per_action(out, index, found, kind, holder_id, record, delay_end)
  local seen = {}
  for _, c in ipairs(found) do
    if not seen[c[1]] then
      seen[c[1]] = true
      push_conflict(out, index, c[1], kind, holder_id, record, delay_end)
    end
  end
end

-- Appends every conflict with the holders (of other groups) and lost holders of one node to out.
local function explain_node(out, keys, node_key, index, require, allow, nactions, self_id, group)
  local flat = redis.call('HGETALL', node_key)
  for k = 1, #flat, 2 do
    local prefix, holder_id = string.sub(flat[k], 1, 2), string.sub(flat[k], 3)
    if (prefix == 'h:' or prefix == 'd:') and holder_id ~= self_id then
      local held_require, held_allow = parse_masks(flat[k + 1])
      local found = pair_conflicts(require, allow, held_require, held_allow, nactions)
      if #found > 0 then
        if prefix == 'h:' then
          local record = cjson.decode(redis.call('HGET', keys.jobs, holder_id))
          if not same_group(record.group, group) then
            for _, c in ipairs(found) do
              push_conflict(out, index, c[1], c[2], holder_id, record, 0)
            end
          end
        else
          local record = cjson.decode(redis.call('HGET', keys.delayjobs, holder_id))
          local delay_end = tonumber(redis.call('ZSCORE', keys.delays, holder_id) or '0')
          push_per_action(out, index, found, KIND.LOCK_DELAY, holder_id, record, delay_end)
        end
      end
    end
  end
end

-- Appends conflicts with the jobs of other groups queued on a node before seq (all of them when
-- seq is nil).
local function explain_queue(out, keys, queue_key, node_name, index, require, allow, nactions, seq,
    group)
  local upper = seq and ('(' .. seq) or '+inf'
  for _, waiter_id in ipairs(redis.call('ZRANGEBYSCORE', queue_key, '-inf', upper)) do
    local record = cjson.decode(redis.call('HGET', keys.waiters, waiter_id))
    for _, node in ipairs(record.nodes) do
      if node[1] == node_name and not same_group(record.group, group) then
        local found = pair_conflicts(require, allow, node[2], node[3], nactions)
        push_per_action(out, index, found, KIND.WAITING_AHEAD, waiter_id, record, 0)
      end
    end
  end
end

-- Adds delta (1 or -1) to a group's counts on a node; a count that reaches 0 goes.
local function count_in_group(node_key, group, require, allow, nactions, delta)
  if group == nil or group == '' then
    return
  end
  local function bump(field)
    if tonumber(redis.call('HINCRBY', node_key, field, delta)) <= 0 then
      redis.call('HDEL', node_key, field)
    end
  end
  bump('gn:' .. group)
  for i = 1, nactions do
    if has(require, i) then bump('gr' .. i .. ':' .. group) end
    if has(allow, i) then bump('ga' .. i .. ':' .. group) end
  end
end

local function add_holder(node_key, job_id, require, allow, nactions, group)
  redis.call('HINCRBY', node_key, 'n', 1)
  for i = 1, nactions do
    if has(require, i) then redis.call('HINCRBY', node_key, 'r' .. i, 1) end
    if has(allow, i) then redis.call('HINCRBY', node_key, 'a' .. i, 1) end
  end
  count_in_group(node_key, group, require, allow, nactions, 1)
  redis.call('HSET', node_key, 'h:' .. job_id, require .. ',' .. allow)
end

-- Removes a holder ("h:", of group) or lost holder ("d:", of none) entry and its counts.
local function remove_holder(node_key, field, nactions, group)
  local masks = redis.call('HGET', node_key, field)
  if not masks then
    return
  end
  if tonumber(redis.call('HINCRBY', node_key, 'n', -1)) <= 0 then
    redis.call('DEL', node_key)
    return
  end
  local require, allow = parse_masks(masks)
  count_in_group(node_key, group, require, allow, nactions, -1)
  for i = 1, nactions do
    if has(require, i) then redis.call('HINCRBY', node_key, 'r' .. i, -1) end
    if has(allow, i) then redis.call('HINCRBY', node_key, 'a' .. i, -1) end
  end
  redis.call('HDEL', node_key, field)
end

-- The history caps travel as one argument, "events,bytes,notices,floor", with the counter
-- floor of next_counter last.
local function history_limits(arg)
  local values = {}
  for part in string.gmatch(arg, '[^,]+') do
    values[#values + 1] = tonumber(part)
  end
  return values[1], values[2], values[3], values[4] or 0
end

local function entry_size(flat)
  local size = 0
  for _, v in ipairs(flat) do
    size = size + #tostring(v)
  end
  return size
end

-- Takes the next revision and appends the event with it as the stream id, so that a revision
-- names exactly one event. extra: more field/value pairs (reason, actor, dropped nodes). The
-- oldest events go while the history holds more than its cap of events or of bytes; the newest
-- one always stays.
local function emit(keys, limits, event_type, record_json, now, extra)
  local max_events, max_bytes, _, floor = history_limits(limits)
  local revision, started = next_counter(keys.rev, floor)
  local fields = {'type', event_type, 'job', record_json, 't', now}
  if started then
    -- The first event of the history: nothing before it was lost to a trim.
    fields[#fields + 1] = 'first'
    fields[#fields + 1] = '1'
  end
  for _, v in ipairs(extra or {}) do
    fields[#fields + 1] = v
  end
  redis.call('XADD', keys.events, digits(revision) .. '-0', unpack(fields))
  local bytes = redis.call('INCRBY', keys.evbytes, entry_size(fields))
  local length = redis.call('XLEN', keys.events)
  while length > 1 and (length > max_events or bytes > max_bytes) do
    local oldest = redis.call('XRANGE', keys.events, '-', '+', 'COUNT', 1)[1]
    redis.call('XDEL', keys.events, oldest[1])
    bytes = redis.call('DECRBY', keys.evbytes, entry_size(oldest[2]))
    length = length - 1
  end
  return revision
end

-- The script's namespace keys by name (see SCRIPT_KEYS): KEYS must start with exactly
-- nac:{ns}:<name> for each of the script's names, in order, and hold a whole number of per-node
-- groups after them. Returns the keys, or nil and an error reply. A script touches only these
-- and the per-node keys it was given.
local function script_keys(script)
  local spec = SCRIPT_KEYS[script]
  local first = spec.namespace[1]
  local prefix = string.sub(KEYS[1] or '', 1, -(#first + 1))
  local keys = {prefix = prefix, fixed = #spec.namespace}
  for i, name in ipairs(spec.namespace) do
    keys[name] = prefix .. name
    if KEYS[i] ~= keys[name] then
      return nil, redis.error_reply('KEYS[' .. i .. '] must be ' .. keys[name])
    end
  end
  local extra = #KEYS - keys.fixed
  if (#spec.per_node == 0 and extra ~= 0) or (#spec.per_node > 0 and extra % #spec.per_node ~= 0)
  then
    return nil, redis.error_reply(script .. ' got ' .. #KEYS .. ' keys')
  end
  return keys
end

-- An error reply unless KEYS holds the namespace keys and exactly `count` more.
local function expect_key_count(keys, count)
  if #KEYS ~= keys.fixed + count then
    return redis.error_reply('expected ' .. keys.fixed + count .. ' keys, got ' .. #KEYS)
  end
  return nil
end

-- Every verdict reply has one shape: {verdict, revision, record JSON or '', extra, conflict...},
-- extra being a verdict's own value (queue positions, a cycle, a lock-delay's end) or 0.
local function answer(verdict, revision, record, extra, conflicts)
  local reply = {verdict, revision, record or '', extra or 0}
  for _, v in ipairs(conflicts or {}) do
    reply[#reply + 1] = v
  end
  return reply
end

local function current_revision(rev_key)
  return tonumber(redis.call('GET', rev_key) or '0')
end

-- The record of id in hash_key, stored and decoded; or nil, nil and the NOT_HELD answer.
local function stored_record(hash_key, id, rev_key)
  local stored = redis.call('HGET', hash_key, id)
  if not stored then
    return nil, nil, answer(VERDICT.NOT_HELD, current_revision(rev_key))
  end
  return stored, cjson.decode(stored)
end

-- Node keys are the namespace prefix + 'n:' + name, queue keys prefix + 'q:' + name. A caller
-- that passed keys for other nodes than the record holds gets the record back and calls again.
-- The record's keys start at KEYS[first] and take `slots` places (default: all the rest).
local function node_keys_match(prefix, record, first, kinds, slots)
  if (slots or #KEYS - first + 1) ~= #record.nodes * #kinds then
    return false
  end
  for i, node in ipairs(record.nodes) do
    for k, kind in ipairs(kinds) do
      if KEYS[first + (i - 1) * #kinds + k - 1] ~= prefix .. kind .. node[1] then
        return false
      end
    end
  end
  return true
end

-- Whether two node lists name the same nodes with the same masks, in any order.
local function same_nodes(one, other)
  if #one ~= #other then
    return false
  end
  local masks = {}
  for _, node in ipairs(one) do
    masks[node[1]] = node[2] .. ',' .. node[3]
  end
  for _, node in ipairs(other) do
    if masks[node[1]] ~= node[2] .. ',' .. node[3] then
      return false
    end
  end
  return true
end

-- A refusal notifies at most this many holders, each notice naming at most this many conflicts:
-- a refusal changes no state, so what it may add is small and fixed.
local NOTICES_PER_REFUSAL, CONFLICTS_PER_NOTICE = 8, 16

-- Appends an advisory notice after the current revision, as "<revision>-<k>".
local function append_notice(keys, cap, fields)
  local revision = current_revision(keys.rev)
  local seq = 1
  local last = redis.call('XREVRANGE', keys.notices, '+', '-', 'COUNT', 1)[1]
  if last then
    local dash = string.find(last[1], '-', 1, true)
    local last_revision = tonumber(string.sub(last[1], 1, dash - 1))
    if last_revision > revision then
      -- Only a revision counter that went back could get here; a notice is not worth an error.
      return
    end
    if last_revision == revision then
      seq = tonumber(string.sub(last[1], dash + 1)) + 1
    end
  end
  redis.call('XADD', keys.notices, 'MAXLEN', '~', cap, digits(revision) .. '-' .. seq,
    unpack(fields))
end

-- Notes that the waiter was kept out by holder_id, at most once per second per holder and
-- waiting owner (a fresh job id per attempt does not get round it). conflicts: flat groups of
-- CONFLICT_WIDTH with the node's name in place of its index.
local function note_contention(keys, cap, holder, waiter, conflicts, now)
  local pair = holder.id .. '\n' .. waiter.owner
  local last = tonumber(redis.call('HGET', keys.contended, pair) or '-1000000')
  if now - last < 1000 then
    return
  end
  if redis.call('HLEN', keys.contended) > 10000 then
    -- Pairs older than a second no longer limit anything.
    local flat = redis.call('HGETALL', keys.contended)
    for k = 1, #flat, 2 do
      if now - tonumber(flat[k + 1]) >= 1000 then
        redis.call('HDEL', keys.contended, flat[k])
      end
    end
  end
  redis.call('HSET', keys.contended, pair, now)
  append_notice(keys, cap, {'type', EVENT.CONTENDED, 'job', cjson.encode(holder),
    'waiter', cjson.encode(waiter), 'conflicts', cjson.encode(conflicts), 't', now})
end

-- Notices CONTENDED for the first live holders among the flat conflict groups; nodes names the
-- nodes the groups index.
local function note_contentions(keys, limits, conflicts, nodes, waiter_id, owner, op, now)
  local _, _, cap = history_limits(limits)
  local by_holder, order = {}, {}
  for g = 1, #conflicts, CONFLICT_WIDTH do
    local kind, holder_id = conflicts[g + 2], conflicts[g + 3]
    if kind == KIND.HOLDER_DOES_NOT_ALLOW or kind == KIND.HOLDER_REQUIRES then
      local list = by_holder[holder_id]
      if not list and #order < NOTICES_PER_REFUSAL then
        list = {}
        by_holder[holder_id] = list
        order[#order + 1] = {id = holder_id, owner = conflicts[g + 4], op = conflicts[g + 5]}
      end
      if list and #list < CONFLICT_WIDTH * CONFLICTS_PER_NOTICE then
        list[#list + 1] = nodes[conflicts[g]][1]
        for k = 1, CONFLICT_WIDTH - 1 do
          list[#list + 1] = conflicts[g + k]
        end
      end
    end
  end
  local waiter = {id = waiter_id, owner = owner, op = op}
  for _, holder in ipairs(order) do
    note_contention(keys, cap, holder, waiter, by_holder[holder.id], now)
  end
end
