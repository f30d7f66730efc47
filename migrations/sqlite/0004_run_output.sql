-- berth schema, version 4 (SQLite): command output beside the database.
--
-- Keep in step with migrations/postgres/0004_run_output.sql: same columns, same version numbers.
--
-- Storing every byte of output as JSON text in run_events cost more than the command itself (100 MB of output is
-- ~0.3 s of SQLite page writes alone), so on SQLite a stdout/stderr row may instead point at its bytes in the run's
-- append-only segment file next to the database file (`<database>-output/<run id>`). Such a row holds `{}` in data
-- and the byte range here; the store puts the text back as `{"text": ...}` when it lists events. Rows written before
-- this version, and rows of an in-memory database, keep their text in data and leave both columns NULL.
ALTER TABLE run_events ADD COLUMN output_offset INTEGER CHECK (output_offset >= 0);
ALTER TABLE run_events ADD COLUMN output_length INTEGER
    CHECK (output_length >= 0 AND (output_offset IS NULL) = (output_length IS NULL));
