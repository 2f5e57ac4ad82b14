-- Snapshot: every current job and waiter and the revision they stand at, read atomically.
-- Read-only.
--
-- KEYS[1] jobs hash, KEYS[2] revision counter, KEYS[3] waiters hash, KEYS[4] notices stream.
-- ARGV: none.
--
-- Returns {revision, {job_json...}, {waiter_json...}, last_notice_id or ""}: a watch that starts
-- at the snapshot follows on from the notices already sent.

local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)[1]
return {current_revision(KEYS[2]), redis.call('HVALS', KEYS[1]), redis.call('HVALS', KEYS[3]),
  last and last[1] or ''}
