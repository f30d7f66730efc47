-- berth schema, version 1 (SQLite).
--
-- Keep in step with migrations/postgres/0001_init.sql: same tables, same columns, same version numbers.
-- Conventions: ids are hyphenated UUID strings, timestamps are unix milliseconds, JSON is TEXT. Tables are STRICT so
-- a value of the wrong type is an error here instead of a surprise when it is read back.

CREATE TABLE companies (
    id         TEXT    NOT NULL PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id         TEXT    NOT NULL PRIMARY KEY,
    company_id TEXT    NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    name       TEXT    NOT NULL,
    role       TEXT    NOT NULL CHECK (role IN ('manager', 'reader')),
    -- Only the hash of a key's secret is ever stored.
    token_hash TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
) STRICT;

CREATE INDEX api_keys_company ON api_keys (company_id);

CREATE TABLE environments (
    id          TEXT    NOT NULL PRIMARY KEY,
    company_id  TEXT    NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    description TEXT,
    driver      TEXT    NOT NULL CHECK (driver IN ('local', 'ssh', 'sandbox', 'plugin')),
    status      TEXT    NOT NULL CHECK (status IN ('active', 'archived')),
    -- A JSON object in its stored shape: secret references only, never secret values.
    config      TEXT    NOT NULL,
    -- A JSON object, or NULL.
    metadata    TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    -- Bumped on every update; updates are conditional on it (optimistic concurrency).
    revision    INTEGER NOT NULL DEFAULT 0
) STRICT;

-- One local environment per company, enforced by the database so that concurrent requests cannot create two.
CREATE UNIQUE INDEX environments_one_local_per_company ON environments (company_id) WHERE driver = 'local';
CREATE INDEX environments_company_updated ON environments (company_id, updated_at);

CREATE TABLE environment_leases (
    id                TEXT    NOT NULL PRIMARY KEY,
    company_id        TEXT    NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    environment_id    TEXT    NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    run_id            TEXT,
    status            TEXT    NOT NULL CHECK (status IN ('active', 'released', 'expired', 'failed', 'retained')),
    lease_policy      TEXT    NOT NULL
        CHECK (lease_policy IN ('ephemeral', 'reuse_by_environment', 'retain_on_failure')),
    -- The driver that acquired the lease: release dispatches on it, not on the environment's current driver.
    driver            TEXT    NOT NULL CHECK (driver IN ('local', 'ssh', 'sandbox', 'plugin')),
    provider          TEXT,
    provider_lease_id TEXT,
    acquired_at       INTEGER NOT NULL,
    last_used_at      INTEGER NOT NULL,
    expires_at        INTEGER,
    released_at       INTEGER,
    failure_reason    TEXT,
    cleanup_status    TEXT    CHECK (cleanup_status IN ('pending', 'success', 'failed')),
    -- A JSON object, or NULL. Never holds a secret.
    metadata          TEXT
) STRICT;

CREATE INDEX environment_leases_environment_status ON environment_leases (environment_id, status);
CREATE INDEX environment_leases_status_expires ON environment_leases (status, expires_at);

-- The audit trail. No foreign key on company_id: the log outlives the rows it talks about.
CREATE TABLE activity_log (
    id          INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    company_id  TEXT,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    entity_type TEXT    NOT NULL,
    entity_id   TEXT    NOT NULL,
    -- Any JSON value.
    details     TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE INDEX activity_log_company ON activity_log (company_id, id);

-- Encrypted secrets. environment_id has no foreign key: secrets are removed explicitly, after the environment that
-- referenced them is gone.
CREATE TABLE secrets (
    id             TEXT    NOT NULL PRIMARY KEY,
    company_id     TEXT    NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    environment_id TEXT,
    name           TEXT    NOT NULL,
    nonce          BLOB    NOT NULL,
    ciphertext     BLOB    NOT NULL,
    created_at     INTEGER NOT NULL
) STRICT;

CREATE INDEX secrets_environment ON secrets (environment_id);
