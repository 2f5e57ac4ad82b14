-- Snapshot: every current job and the revision they stand at, read atomically. Read-only.
--
-- KEYS[1] jobs hash, KEYS[2] revision counter.
-- ARGV: none.
--
-- Returns {revision, job_json...}.

local reply = {current_revision(KEYS[2])}
for _, stored in ipairs(redis.call('HVALS', KEYS[1])) do
  reply[#reply + 1] = stored
end
return reply
