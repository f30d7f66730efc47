//! Environments.

use berth_core::environment::Environment;
use berth_core::ids::{CompanyId, EnvironmentId};
use berth_core::probe::{LastProbe, ProbeResult};
use berth_core::time::Timestamp;

use super::error::{ConflictKind, StoreError, conflict_as};
use super::rows::{EnvironmentRow, ProbeRow, convert_all, json_text, json_text_or_null};
use super::{EnvironmentFilter, Store};

/// The partial unique index that allows one `local` environment per company (see the migrations).
const ONE_LOCAL_PER_COMPANY: &str = "environments_one_local_per_company";

/// How often `ensure_local_environment` retries when the local environment vanishes between its insert and its read
/// (a concurrent delete, or a driver change away from `local`).
const ENSURE_LOCAL_ATTEMPTS: usize = 3;

macro_rules! environment_columns {
    () => {
        "id, company_id, name, description, driver, status, config, metadata, created_at, updated_at, revision"
    };
}

const INSERT_ENVIRONMENT: &str = concat!(
    "INSERT INTO environments (",
    environment_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
);
/// The conflict target names the partial index (column and predicate), so only "a local environment already exists"
/// is absorbed; any other violation still fails.
const INSERT_LOCAL_ENVIRONMENT_IF_ABSENT: &str = concat!(
    "INSERT INTO environments (",
    environment_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
     ON CONFLICT (company_id) WHERE driver = 'local' DO NOTHING"
);
const GET_ENVIRONMENT: &str = concat!(
    "SELECT ",
    environment_columns!(),
    " FROM environments WHERE id = $1"
);
const LOCAL_ENVIRONMENT_OF_COMPANY: &str = concat!(
    "SELECT ",
    environment_columns!(),
    " FROM environments WHERE company_id = $1 AND driver = 'local'"
);
/// A `NULL` filter parameter matches every row.
const LIST_ENVIRONMENTS: &str = concat!(
    "SELECT ",
    environment_columns!(),
    " FROM environments WHERE company_id = $1 AND ($2 IS NULL OR status = $2) AND ($3 IS NULL OR driver = $3) \
     ORDER BY updated_at DESC, id DESC"
);
/// Conditional on the revision the caller read: a concurrent update makes it match no row.
const UPDATE_ENVIRONMENT: &str = concat!(
    "UPDATE environments SET name = $2, description = $3, driver = $4, status = $5, config = $6, metadata = $7, \
     updated_at = $8, revision = revision + 1 WHERE id = $1 AND revision = $9 RETURNING ",
    environment_columns!()
);
const ENVIRONMENT_REVISION: &str = "SELECT revision FROM environments WHERE id = $1";
/// Keeps the newer probe: one that started earlier but finished later does not replace it. An environment deleted
/// meanwhile makes the insert fail its foreign key, which the caller ignores.
const RECORD_PROBE: &str = "INSERT INTO environment_probes (environment_id, probed_at, ok, driver, summary, details) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (environment_id) DO UPDATE SET probed_at = excluded.probed_at, \
     ok = excluded.ok, driver = excluded.driver, summary = excluded.summary, details = excluded.details \
     WHERE environment_probes.probed_at <= excluded.probed_at";
macro_rules! probe_columns_from {
    () => {
        "SELECT environment_id, probed_at, ok, driver, summary, details FROM environment_probes"
    };
}
const LAST_PROBE: &str = concat!(probe_columns_from!(), " WHERE environment_id = $1");
const LAST_PROBES_OF_COMPANY: &str = concat!(
    probe_columns_from!(),
    " WHERE environment_id IN (SELECT id FROM environments WHERE company_id = $1)"
);
/// Leases go with the environment (`ON DELETE CASCADE`); secrets are removed separately.
const DELETE_ENVIRONMENT: &str = concat!(
    "DELETE FROM environments WHERE id = $1 RETURNING ",
    environment_columns!()
);

// === impl Store ===

impl Store {
    /// Fails with `Conflict(LocalEnvironmentExists)` if `environment` is local and the company already has one.
    pub async fn insert_environment(&self, environment: &Environment) -> Result<(), StoreError> {
        self.insert_environment_with(INSERT_ENVIRONMENT, environment)
            .await
            .map(drop)
    }

    /// The company's local environment, created (from [`Environment::local_for`]) if it has none.
    ///
    /// Safe under concurrency: the insert yields to an existing local environment through the partial unique index,
    /// so every concurrent caller gets the same row.
    pub async fn ensure_local_environment(
        &self,
        company_id: CompanyId,
    ) -> Result<Environment, StoreError> {
        for _ in 0..ENSURE_LOCAL_ATTEMPTS {
            let candidate = Environment::local_for(company_id, Timestamp::now());
            self.insert_environment_with(INSERT_LOCAL_ENVIRONMENT_IF_ABSENT, &candidate)
                .await?;
            let row: Option<EnvironmentRow> = on_pool!(&self.db, |pool| {
                sqlx::query_as(LOCAL_ENVIRONMENT_OF_COMPANY)
                    .bind(company_id.to_string())
                    .fetch_optional(pool)
                    .await?
            });
            if let Some(row) = row {
                return Environment::try_from(row);
            }
        }
        Err(StoreError::Database(sqlx::Error::RowNotFound))
    }

    pub async fn get_environment(
        &self,
        id: EnvironmentId,
    ) -> Result<Option<Environment>, StoreError> {
        let row: Option<EnvironmentRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(GET_ENVIRONMENT)
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
        });
        row.map(Environment::try_from).transpose()
    }

    /// The company's environments matching `filter`, most recently updated first (ties broken by id, newest first).
    pub async fn list_environments(
        &self,
        company_id: CompanyId,
        filter: &EnvironmentFilter,
    ) -> Result<Vec<Environment>, StoreError> {
        let status = filter.status.map(|status| status.as_str());
        let driver = filter.driver.map(|driver| driver.as_str());
        let rows: Vec<EnvironmentRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LIST_ENVIRONMENTS)
                .bind(company_id.to_string())
                .bind(status)
                .bind(driver)
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }

    /// Writes every mutable field of `environment` (name, description, driver, status, config, metadata,
    /// updated_at) iff the stored revision equals `environment.revision`, and returns the stored row, whose revision
    /// is one higher.
    ///
    /// No row with that id → `Ok(None)`; revision mismatch → `Err(ConcurrentUpdate)`; making a second environment
    /// of the company local → `Err(Conflict(LocalEnvironmentExists))`.
    pub async fn update_environment(
        &self,
        environment: &Environment,
    ) -> Result<Option<Environment>, StoreError> {
        let config = json_text(&environment.config)?;
        let metadata = json_text_or_null(environment.metadata.as_ref())?;
        // One transaction, so that "no row matched" is told apart from "the row exists at another revision"
        // against the same state.
        let updated: Result<Option<EnvironmentRow>, StoreError> = in_write_tx!(&self.db, |tx| {
            let updated: Option<EnvironmentRow> = sqlx::query_as(UPDATE_ENVIRONMENT)
                .bind(environment.id.to_string())
                .bind(&environment.name)
                .bind(environment.description.as_deref())
                .bind(environment.driver.as_str())
                .bind(environment.status.as_str())
                .bind(&config)
                .bind(metadata.as_deref())
                .bind(environment.updated_at.unix_millis())
                .bind(environment.revision)
                .fetch_optional(&mut *tx)
                .await
                .map_err(conflict_as(
                    ONE_LOCAL_PER_COMPANY,
                    ConflictKind::LocalEnvironmentExists,
                ))?;
            match updated {
                Some(row) => Ok(Some(row)),
                None => {
                    let stored: Option<i64> = sqlx::query_scalar(ENVIRONMENT_REVISION)
                        .bind(environment.id.to_string())
                        .fetch_optional(&mut *tx)
                        .await?;
                    match stored {
                        Some(_) => Err(StoreError::ConcurrentUpdate),
                        None => Ok(None),
                    }
                }
            }
        });
        updated?.map(Environment::try_from).transpose()
    }

    /// Keeps `result` as the environment's last probe, taken at `at`, unless a newer one is kept already.
    pub async fn record_probe(
        &self,
        environment_id: EnvironmentId,
        at: Timestamp,
        result: &ProbeResult,
    ) -> Result<(), StoreError> {
        let details = json_text(&result.details)?;
        on_pool!(&self.db, |pool| {
            sqlx::query(RECORD_PROBE)
                .bind(environment_id.to_string())
                .bind(at.unix_millis())
                .bind(i64::from(result.ok))
                .bind(result.driver.as_str())
                .bind(&result.summary)
                .bind(&details)
                .execute(pool)
                .await
                .map(|_| ())?
        });
        Ok(())
    }

    /// The environment's last probe, if it was ever probed.
    pub async fn last_probe(
        &self,
        environment_id: EnvironmentId,
    ) -> Result<Option<LastProbe>, StoreError> {
        let row: Option<ProbeRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LAST_PROBE)
                .bind(environment_id.to_string())
                .fetch_optional(pool)
                .await?
        });
        row.map(LastProbe::try_from).transpose()
    }

    /// The last probe of every environment of the company that was ever probed.
    pub async fn last_probes_of_company(
        &self,
        company_id: CompanyId,
    ) -> Result<Vec<LastProbe>, StoreError> {
        let rows: Vec<ProbeRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LAST_PROBES_OF_COMPANY)
                .bind(company_id.to_string())
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }

    /// Deletes an environment and its leases; returns the removed row, or `None` if there was none. Fails with
    /// `Conflict(EnvironmentIsDefault)` while it is its company's default environment.
    pub async fn delete_environment(
        &self,
        id: EnvironmentId,
    ) -> Result<Option<Environment>, StoreError> {
        let row: Option<EnvironmentRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(DELETE_ENVIRONMENT)
                .bind(id.to_string())
                .fetch_optional(pool)
                .await
                .map_err(default_environment_conflict)?
        });
        row.map(Environment::try_from).transpose()
    }

    /// Runs one of the two environment inserts; returns the number of rows inserted.
    async fn insert_environment_with(
        &self,
        sql: &'static str,
        environment: &Environment,
    ) -> Result<u64, StoreError> {
        let config = json_text(&environment.config)?;
        let metadata = json_text_or_null(environment.metadata.as_ref())?;
        let inserted = on_pool!(&self.db, |pool| {
            sqlx::query(sql)
                .bind(environment.id.to_string())
                .bind(environment.company_id.to_string())
                .bind(&environment.name)
                .bind(environment.description.as_deref())
                .bind(environment.driver.as_str())
                .bind(environment.status.as_str())
                .bind(&config)
                .bind(metadata.as_deref())
                .bind(environment.created_at.unix_millis())
                .bind(environment.updated_at.unix_millis())
                .bind(environment.revision)
                .execute(pool)
                .await
                .map_err(conflict_as(
                    ONE_LOCAL_PER_COMPANY,
                    ConflictKind::LocalEnvironmentExists,
                ))?
                .rows_affected()
        });
        Ok(inserted)
    }
}

/// The only foreign key that refers to an environment without a delete action is a company's default environment
/// (migration 0009): violating it on delete means the environment is still its company's default.
fn default_environment_conflict(error: sqlx::Error) -> StoreError {
    if error
        .as_database_error()
        .is_some_and(|db| db.is_foreign_key_violation())
    {
        StoreError::Conflict(ConflictKind::EnvironmentIsDefault)
    } else {
        StoreError::from(error)
    }
}
