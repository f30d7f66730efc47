-- berth schema, version 8 (PostgreSQL): every lease names its provider.
--
-- Keep in step with migrations/sqlite/0008_lease_provider.sql: same backfill, same version numbers.
--
-- `provider` now says where every lease lives, whatever its driver: `local`, `ssh`, the sandbox provider's key, or a
-- plugin driver's plugin key (berth_core::lease::provider_of). It used to be what the driver returned: NULL for local
-- and ssh leases, and a plugin driver's driver key. A plugin driver's lease is dispatched on the driver key its
-- acquired config records, so only rows with that config move to the plugin key; the others keep the driver key
-- their release still needs. An ssh lease's id becomes `ssh://user@host:port/workspace` (built from its metadata,
-- which berth never parses it back from).
UPDATE environment_leases SET provider = driver
WHERE provider IS NULL AND driver IN ('local', 'ssh');

UPDATE environment_leases
SET provider = COALESCE(
    acquired_config::jsonb ->> 'provider',
    (SELECT environments.config::jsonb ->> 'provider' FROM environments
     WHERE environments.id = environment_leases.environment_id AND environments.driver = 'sandbox')
)
WHERE provider IS NULL AND driver = 'sandbox';

UPDATE environment_leases SET provider = acquired_config::jsonb ->> 'pluginKey'
WHERE driver = 'plugin' AND jsonb_typeof(acquired_config::jsonb -> 'pluginKey') = 'string'
  AND jsonb_typeof(acquired_config::jsonb -> 'driverKey') = 'string';

UPDATE environment_leases
SET provider_lease_id = 'ssh://' || (metadata::jsonb ->> 'username') || '@'
    || CASE WHEN strpos(metadata::jsonb ->> 'host', ':') > 0
            THEN '[' || (metadata::jsonb ->> 'host') || ']'
            ELSE metadata::jsonb ->> 'host' END
    || ':' || (metadata::jsonb ->> 'port') || (metadata::jsonb ->> 'workspacePath')
WHERE driver = 'ssh' AND provider_lease_id IS NOT NULL AND provider_lease_id NOT LIKE 'ssh://%'
  AND jsonb_typeof(metadata::jsonb -> 'username') = 'string' AND jsonb_typeof(metadata::jsonb -> 'host') = 'string'
  AND jsonb_typeof(metadata::jsonb -> 'port') = 'number' AND jsonb_typeof(metadata::jsonb -> 'workspacePath') = 'string';
