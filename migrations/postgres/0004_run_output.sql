-- berth schema, version 4 (PostgreSQL): the columns that locate output beside a SQLite database.
--
-- Keep in step with migrations/sqlite/0004_run_output.sql: same columns, same version numbers.
--
-- On PostgreSQL both columns stay NULL: output remains in data, because replicas sharing this database must read each
-- other's runs and have no file system in common. The columns exist so both backends share one events query.
ALTER TABLE run_events
    ADD COLUMN output_offset BIGINT CHECK (output_offset >= 0),
    ADD COLUMN output_length BIGINT
        CHECK (output_length >= 0 AND (output_offset IS NULL) = (output_length IS NULL));
