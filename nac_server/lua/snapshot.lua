-- Snapshot: every current job and waiter and the revision they stand at, read atomically.
-- Read-only.
--
-- KEYS: SCRIPT_KEYS.snapshot, that is jobs, rev, waiters, notices (nac:{ns}:<name>).
-- ARGV: none.
--
-- Returns {revision, {job_json...}, {waiter_json...}, last_notice_id or ""}: a watch that starts
-- at the snapshot follows on from the notices already sent.

local keys, bad = script_keys('snapshot')
if not keys then return bad end
local last = redis.call('XREVRANGE', keys.notices, '+', '-', 'COUNT', 1)[1]
return {current_revision(keys.rev), redis.call('HVALS', keys.jobs), redis.call('HVALS', keys.waiters),
  last and last[1] or ''}
