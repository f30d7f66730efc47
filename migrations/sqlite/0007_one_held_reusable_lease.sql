-- berth schema, version 7 (SQLite): at most one reusable lease per environment held at a time.
--
-- Keep in step with migrations/postgres/0007_one_held_reusable_lease.sql: same index, same version numbers.
--
-- A run of a `reuse_by_environment` environment takes the environment's one reusable sandbox; a second run meanwhile
-- must get a sandbox of its own. Checking "is the reusable lease busy?" before inserting one is a read-then-write that
-- two runs (on one node or on replicas sharing this database) can both pass, and providers key a reusable sandbox by
-- environment, so both would work in the same one. This index makes the second insert fail instead: the store reports
-- `reusable_lease_held` and the run falls back to an ephemeral lease.
--
-- Held means active, or ended with its cleanup still pending: a sweep releasing a dead run's reusable lease (or
-- expiring a kept one) destroys the sandbox after the status change, and a run taking the environment's sandbox
-- meanwhile would have it destroyed under its command. Kept (retained) leases are not held: only the run holding the
-- environment's active reusable lease claims one (that is how a kept sandbox is resumed), and a kept sandbox that
-- cannot be resumed (its config changed) must not keep the environment from taking a new one.
--
-- Databases written before this index may hold two such leases of one environment (the race above): every
-- one but the oldest is demoted to `ephemeral` in its row (a run holding one decides about keeping it from what it
-- acquired, not from the row).
UPDATE environment_leases SET lease_policy = 'ephemeral'
WHERE lease_policy = 'reuse_by_environment' AND (status = 'active' OR cleanup_status = 'pending')
  AND EXISTS (
    SELECT 1 FROM environment_leases AS older
    WHERE older.environment_id = environment_leases.environment_id
      AND older.lease_policy = 'reuse_by_environment' AND (older.status = 'active' OR older.cleanup_status = 'pending')
      AND (older.acquired_at < environment_leases.acquired_at
           OR (older.acquired_at = environment_leases.acquired_at AND older.id < environment_leases.id))
  );

-- The store maps a violation to `reusable_lease_held` by this name.
CREATE UNIQUE INDEX environment_leases_one_held_reusable ON environment_leases (environment_id)
    WHERE lease_policy = 'reuse_by_environment' AND (status = 'active' OR cleanup_status = 'pending');
