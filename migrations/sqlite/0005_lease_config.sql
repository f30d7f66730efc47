-- berth schema, version 5 (SQLite): the config each lease was acquired with.
--
-- Keep in step with migrations/postgres/0005_lease_config.sql: same columns, same version numbers.
--
-- The environment's config in its stored shape (secrets only as references, never a value) at the moment the lease
-- was taken: cleanup after the environment was edited reaches the provider resource with the credentials it was
-- made with, and the secrets it references are kept until no unfinished lease needs them. Never returned by the API.
ALTER TABLE environment_leases ADD COLUMN acquired_config TEXT;
