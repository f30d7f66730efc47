-- berth schema, version 8 (SQLite): every lease names its provider.
--
-- Keep in step with migrations/postgres/0008_lease_provider.sql: same backfill, same version numbers.
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
    json_extract(acquired_config, '$.provider'),
    (SELECT json_extract(environments.config, '$.provider') FROM environments
     WHERE environments.id = environment_leases.environment_id AND environments.driver = 'sandbox')
)
WHERE provider IS NULL AND driver = 'sandbox';

UPDATE environment_leases SET provider = json_extract(acquired_config, '$.pluginKey')
WHERE driver = 'plugin' AND json_type(acquired_config, '$.pluginKey') = 'text'
  AND json_type(acquired_config, '$.driverKey') = 'text';

UPDATE environment_leases
SET provider_lease_id = 'ssh://' || json_extract(metadata, '$.username') || '@'
    || CASE WHEN instr(json_extract(metadata, '$.host'), ':') > 0
            THEN '[' || json_extract(metadata, '$.host') || ']'
            ELSE json_extract(metadata, '$.host') END
    || ':' || json_extract(metadata, '$.port') || json_extract(metadata, '$.workspacePath')
WHERE driver = 'ssh' AND provider_lease_id IS NOT NULL AND provider_lease_id NOT LIKE 'ssh://%'
  AND json_type(metadata, '$.username') = 'text' AND json_type(metadata, '$.host') = 'text'
  AND json_type(metadata, '$.port') = 'integer' AND json_type(metadata, '$.workspacePath') = 'text';
