-- Epoch: notice, once for the whole deployment, that the store has lost its data.
--
-- KEYS[1] nac:{deployment}:id, KEYS[2] nac:{deployment}:grace, KEYS[3] nac:{deployment}:run,
-- KEYS[4] nac:{deployment}:floor (one Cluster slot).
-- ARGV[1] the deployment id this replica knows ('' when it has just started), ARGV[2] a fresh
-- id, ARGV[3] the grace period in ms, ARGV[4] the run_id of the Redis process answering.
--
-- Returns {id, end of the grace period in ms (0: none), counter floor (0: none)}. A run_id
-- other than the last one seen means another Redis process: restarted from its files, or a
-- replica promoted by a failover, either of which may lack the last writes. Then every
-- namespace's counters must go above the clock now (the floor), so that no token or revision
-- handed out in the lost writes is handed out again. The id is missing when the store is
-- new or has lost its data. A replica that knew an id declares the loss: a new id, and a grace
-- period from now in which only reclaims are granted. A replica that knew none cannot tell a
-- loss from a new store and starts no grace period. Replicas that come later adopt both.

local known, fresh, grace_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], fresh)
  if known ~= '' and grace_ms > 0 then
    redis.call('SET', KEYS[2], digits(now_ms() + grace_ms))
  end
  current = fresh
end
local last_run = redis.call('GET', KEYS[3])
if last_run ~= ARGV[4] then
  redis.call('SET', KEYS[3], ARGV[4])
  if last_run then
    local t = redis.call('TIME')
    redis.call('SET', KEYS[4], digits(tonumber(t[1]) * 1000000 + tonumber(t[2])))
  end
end
return {current, tonumber(redis.call('GET', KEYS[2]) or '0'),
  tonumber(redis.call('GET', KEYS[4]) or '0')}
