-- berth schema, version 2 (PostgreSQL): runs and their events.
--
-- Keep in step with migrations/sqlite/0002_runs.sql: same tables, same columns, same version numbers.

-- environment_id has no foreign key: a run is history and outlives the environment it ran in.
CREATE TABLE runs (
    id               TEXT   NOT NULL PRIMARY KEY,
    company_id       TEXT   NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    environment_id   TEXT   NOT NULL,
    lease_id         TEXT,
    status           TEXT   NOT NULL
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled')),
    -- The argv as a JSON array of strings.
    command          TEXT   NOT NULL,
    exit_code        BIGINT,
    signal           TEXT,
    error            TEXT,
    -- The node executing the run; it refreshes heartbeat_at while the run is live.
    owner_node       TEXT   NOT NULL,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    heartbeat_at     BIGINT NOT NULL,
    -- 0 or 1: BIGINT rather than BOOLEAN so that both backends decode the same type.
    cancel_requested BIGINT NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1))
);

CREATE INDEX runs_company_created ON runs (company_id, created_at);
CREATE INDEX runs_environment ON runs (environment_id);
-- Heartbeats (by owner) and the orphan sweep (by owner or stale heartbeat) only ever look at live runs, a small set.
CREATE INDEX runs_live_owner ON runs (owner_node) WHERE status IN ('queued', 'running');
CREATE INDEX runs_live_heartbeat ON runs (heartbeat_at) WHERE status IN ('queued', 'running');

-- seq is dense and increasing per run, starting at 1; the primary key makes a duplicate impossible.
CREATE TABLE run_events (
    run_id TEXT   NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq    BIGINT NOT NULL,
    at     BIGINT NOT NULL,
    kind   TEXT   NOT NULL
        CHECK (kind IN ('status', 'lease', 'workspace', 'stdout', 'stderr', 'agent', 'bridge', 'error')),
    -- Any JSON value.
    data   TEXT   NOT NULL,
    PRIMARY KEY (run_id, seq)
);
