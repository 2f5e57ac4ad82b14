-- Shared helpers, prepended to every script when it is loaded (see nac_server/scripts.py).
--
-- Node hash (nac:{ns}:n:<node>): "n" holder count, "r<i>" holders requiring action i, "a<i>"
-- holders allowing action i, "h:<job_id>" the holder's "require,allow" masks. Storing allow counts
-- (not refusal counts) keeps old data right when an action is added: nobody allows it yet.
-- Job hash (nac:{ns}:jobs): job_id -> JSON record
--   {id, owner, op, nodes = {{name, require, allow}, ...}, token, acq, exp, ttl}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function has(mask, i)
  return bit.band(mask, bit.lshift(1, i - 1)) ~= 0
end

local function parse_masks(value)
  local comma = string.find(value, ',', 1, true)
  return tonumber(string.sub(value, 1, comma - 1)), tonumber(string.sub(value, comma + 1))
end

-- True when any holder of node_key refuses (require, allow). O(actions), whatever the holders.
-- own_masks, when given, is the caller's current hold on the node, which never refuses itself.
local function node_refuses(node_key, require, allow, nactions, own_masks)
  local fields = {'n'}
  for i = 1, nactions do
    fields[#fields + 1] = 'r' .. i
    fields[#fields + 1] = 'a' .. i
  end
  local values = redis.call('HMGET', node_key, unpack(fields))
  local holders = tonumber(values[1] or '0')
  local own_require, own_allow = 0, 0
  if own_masks then
    holders = holders - 1
    own_require, own_allow = parse_masks(own_masks)
  end
  if holders <= 0 then
    return false
  end
  for i = 1, nactions do
    local required_by = tonumber(values[2 * i] or '0')
    local allowed_by = tonumber(values[2 * i + 1] or '0')
    if own_masks then
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

-- Appends every conflict on one node to out as flat groups of six:
-- node index, action, kind (1 holder does not allow, 2 holder requires), holder id, owner, op.
local function explain_node(out, jobs_key, node_key, index, require, allow, nactions, self_id)
  local flat = redis.call('HGETALL', node_key)
  for k = 1, #flat, 2 do
    local name = flat[k]
    if string.sub(name, 1, 2) == 'h:' then
      local holder_id = string.sub(name, 3)
      if holder_id ~= self_id then
        local held_require, held_allow = parse_masks(flat[k + 1])
        local record = cjson.decode(redis.call('HGET', jobs_key, holder_id))
        for i = 1, nactions do
          if has(require, i) and not has(held_allow, i) then
            for _, v in ipairs({index, i, 1, holder_id, record.owner, record.op}) do
              out[#out + 1] = v
            end
          end
          if has(held_require, i) and not has(allow, i) then
            for _, v in ipairs({index, i, 2, holder_id, record.owner, record.op}) do
              out[#out + 1] = v
            end
          end
        end
      end
    end
  end
end

local function add_holder(node_key, job_id, require, allow, nactions)
  redis.call('HINCRBY', node_key, 'n', 1)
  for i = 1, nactions do
    if has(require, i) then redis.call('HINCRBY', node_key, 'r' .. i, 1) end
    if has(allow, i) then redis.call('HINCRBY', node_key, 'a' .. i, 1) end
  end
  redis.call('HSET', node_key, 'h:' .. job_id, require .. ',' .. allow)
end

local function remove_holder(node_key, job_id, nactions)
  local masks = redis.call('HGET', node_key, 'h:' .. job_id)
  if not masks then
    return
  end
  if tonumber(redis.call('HINCRBY', node_key, 'n', -1)) <= 0 then
    redis.call('DEL', node_key)
    return
  end
  local require, allow = parse_masks(masks)
  for i = 1, nactions do
    if has(require, i) then redis.call('HINCRBY', node_key, 'r' .. i, -1) end
    if has(allow, i) then redis.call('HINCRBY', node_key, 'a' .. i, -1) end
  end
  redis.call('HDEL', node_key, 'h:' .. job_id)
end

-- Takes the next revision and appends the event with it as the stream id, so that a revision
-- names exactly one event.
local function emit(rev_key, events_key, maxlen, event_type, record_json, now)
  local revision = redis.call('INCR', rev_key)
  redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, revision .. '-0',
    'type', event_type, 'job', record_json, 't', now)
  return revision
end

local function current_revision(rev_key)
  return tonumber(redis.call('GET', rev_key) or '0')
end

-- Node keys are the job-table key's prefix + 'n:' + name; a caller that passed keys for other
-- nodes than the job holds gets the right names back and calls again.
local function node_keys_match(jobs_key, record, keys, first)
  local prefix = string.sub(jobs_key, 1, -5) .. 'n:'
  if #keys - first + 1 ~= #record.nodes then
    return false
  end
  for i, node in ipairs(record.nodes) do
    if keys[first + i - 1] ~= prefix .. node[1] then
      return false
    end
  end
  return true
end
