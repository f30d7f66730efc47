-- berth schema, version 1 (PostgreSQL).
--
-- Keep in step with migrations/sqlite/0001_init.sql: same tables, same columns, same version numbers.
-- Conventions: ids are hyphenated UUID strings (TEXT, as on SQLite, so both backends decode the same Rust types),
-- timestamps are BIGINT unix milliseconds, JSON is TEXT. Every integer the server decodes as i64 is BIGINT.
-- Unique constraints are named explicitly: the store maps a violation to a conflict kind by constraint name.

CREATE TABLE companies (
    id         TEXT   NOT NULL PRIMARY KEY,
    name       TEXT   NOT NULL CONSTRAINT companies_name_key UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT   NOT NULL PRIMARY KEY,
    company_id TEXT   NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    name       TEXT   NOT NULL,
    role       TEXT   NOT NULL CHECK (role IN ('manager', 'reader')),
    -- Only the hash of a key's secret is ever stored.
    token_hash TEXT   NOT NULL CONSTRAINT api_keys_token_hash_key UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE INDEX api_keys_company ON api_keys (company_id);

CREATE TABLE environments (
    id          TEXT   NOT NULL PRIMARY KEY,
    company_id  TEXT   NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    name        TEXT   NOT NULL,
    description TEXT,
    driver      TEXT   NOT NULL CHECK (driver IN ('local', 'ssh', 'sandbox', 'plugin')),
    status      TEXT   NOT NULL CHECK (status IN ('active', 'archived')),
    -- A JSON object in its stored shape: secret references only, never secret values.
    config      TEXT   NOT NULL,
    -- A JSON object, or NULL.
    metadata    TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    -- Bumped on every update; updates are conditional on it (optimistic concurrency).
    revision    BIGINT NOT NULL DEFAULT 0
);

-- One local environment per company, enforced by the database so that concurrent requests cannot create two.
CREATE UNIQUE INDEX environments_one_local_per_company ON environments (company_id) WHERE driver = 'local';
CREATE INDEX environments_company_updated ON environments (company_id, updated_at);

CREATE TABLE environment_leases (
    id                TEXT   NOT NULL PRIMARY KEY,
    company_id        TEXT   NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    environment_id    TEXT   NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    run_id            TEXT,
    status            TEXT   NOT NULL CHECK (status IN ('active', 'released', 'expired', 'failed', 'retained')),
    lease_policy      TEXT   NOT NULL
        CHECK (lease_policy IN ('ephemeral', 'reuse_by_environment', 'retain_on_failure')),
    -- The driver that acquired the lease: release dispatches on it, not on the environment's current driver.
    driver            TEXT   NOT NULL CHECK (driver IN ('local', 'ssh', 'sandbox', 'plugin')),
    provider          TEXT,
    provider_lease_id TEXT,
    acquired_at       BIGINT NOT NULL,
    last_used_at      BIGINT NOT NULL,
    expires_at        BIGINT,
    released_at       BIGINT,
    failure_reason    TEXT,
    cleanup_status    TEXT   CHECK (cleanup_status IN ('pending', 'success', 'failed')),
    -- A JSON object, or NULL. Never holds a secret.
    metadata          TEXT
);

CREATE INDEX environment_leases_environment_status ON environment_leases (environment_id, status);
CREATE INDEX environment_leases_status_expires ON environment_leases (status, expires_at);

-- The audit trail. No foreign key on company_id: the log outlives the rows it talks about.
CREATE TABLE activity_log (
    id          BIGINT NOT NULL GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    company_id  TEXT,
    actor       TEXT   NOT NULL,
    action      TEXT   NOT NULL,
    entity_type TEXT   NOT NULL,
    entity_id   TEXT   NOT NULL,
    -- Any JSON value.
    details     TEXT   NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE INDEX activity_log_company ON activity_log (company_id, id);

-- Encrypted secrets. environment_id has no foreign key: secrets are removed explicitly, after the environment that
-- referenced them is gone.
CREATE TABLE secrets (
    id             TEXT   NOT NULL PRIMARY KEY,
    company_id     TEXT   NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    environment_id TEXT,
    name           TEXT   NOT NULL,
    nonce          BYTEA  NOT NULL,
    ciphertext     BYTEA  NOT NULL,
    created_at     BIGINT NOT NULL
);

CREATE INDEX secrets_environment ON secrets (environment_id);
