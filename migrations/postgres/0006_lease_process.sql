-- berth schema, version 6 (PostgreSQL): the process group of the command running on each lease.
--
-- Keep in step with migrations/sqlite/0006_lease_process.sql: same columns, same version numbers.
--
-- A JSON object (berth_core::driver::ProcessIdentity: pgid, sessionId, startTicks, bootId, optional cgroup) written
-- as soon as a command starts and cleared when it ends: after a crash of berth, cleanup kills exactly these
-- processes, wherever they ran, and never a process that later got a recycled pid. Never returned by the API.
ALTER TABLE environment_leases ADD COLUMN process TEXT;
