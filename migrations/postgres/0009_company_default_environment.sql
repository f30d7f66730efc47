-- berth schema, version 9 (PostgreSQL): a company's default environment.
--
-- Keep in step with migrations/sqlite/0009_company_default_environment.sql: same column, same version numbers.
--
-- A run that names no environment runs in its company's default environment when it has one, else in its Local one.
-- The reference has no ON DELETE action on purpose: deleting an environment that is some company's default is
-- refused (the store maps a violation of this constraint, by its name, to `environment_is_default`) rather than
-- silently sending that company's runs back to this host. The API checks first, before it cancels the environment's
-- runs; this constraint holds it against a PATCH of the company racing the delete, on any replica. NO ACTION is
-- checked at the end of the statement, so deleting a company (which cascades to its environments) still works.
ALTER TABLE companies ADD COLUMN default_environment_id TEXT
    CONSTRAINT companies_default_environment_fkey REFERENCES environments (id);
