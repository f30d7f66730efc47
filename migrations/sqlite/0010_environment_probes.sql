-- berth schema, version 10 (SQLite): the last probe of each environment.
--
-- Keep in step with migrations/postgres/0010_environment_probes.sql: same table, same version numbers.
--
-- A probe is kept beside its environment, not in it: recording one is not an edit (no revision bump, no optimistic
-- conflict with a PATCH in flight), and the environment row stays what its owner wrote. Only the newest probe is
-- kept (an older one finishing late does not replace it); it goes with its environment.
CREATE TABLE environment_probes (
    environment_id TEXT   NOT NULL PRIMARY KEY REFERENCES environments (id) ON DELETE CASCADE,
    probed_at      INTEGER NOT NULL,
    ok             INTEGER NOT NULL CHECK (ok IN (0, 1)),
    driver         TEXT   NOT NULL,
    summary        TEXT   NOT NULL,
    -- A JSON object: the probe's details, which never hold a secret.
    details        TEXT   NOT NULL
);
