-- Snapshot: every current job and waiter and the revision they stand at, read atomically.
-- Read-only.
--
-- KEYS[1] jobs hash, KEYS[2] revision counter, KEYS[3] waiters hash.
-- ARGV: none.
--
-- Returns {revision, {job_json...}, {waiter_json...}}.

return {current_revision(KEYS[2]), redis.call('HVALS', KEYS[1]), redis.call('HVALS', KEYS[3])}
