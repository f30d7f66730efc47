//! Companies and their API keys.

use berth_core::company::{ApiKey, Company};
use berth_core::ids::{ApiKeyId, CompanyId, EnvironmentId};
use berth_core::time::Timestamp;

use super::Store;
use super::error::{ConflictKind, StoreError, conflict_as};
use super::rows::{ApiKeyRow, CompanyRow, convert_all};

/// PostgreSQL's name for the unique constraint on `companies.name` (see the migrations).
const COMPANY_NAME_CONSTRAINT: &str = "companies_name_key";

macro_rules! company_columns {
    () => {
        "id, name, created_at, default_environment_id"
    };
}

const INSERT_COMPANY: &str = concat!(
    "INSERT INTO companies (",
    company_columns!(),
    ") VALUES ($1, $2, $3, $4)"
);
const INSERT_COMPANY_IF_ABSENT: &str = "INSERT INTO companies (id, name, created_at) VALUES ($1, $2, $3) \
     ON CONFLICT (name) DO NOTHING";
const LIST_COMPANIES: &str = concat!(
    "SELECT ",
    company_columns!(),
    " FROM companies ORDER BY created_at, id"
);
const GET_COMPANY: &str = concat!(
    "SELECT ",
    company_columns!(),
    " FROM companies WHERE id = $1"
);
const COMPANY_BY_NAME: &str = concat!(
    "SELECT ",
    company_columns!(),
    " FROM companies WHERE name = $1"
);
/// Conditional on the environment being one of the company's, checked by the write itself: no read-then-write gap
/// in which the environment could move or vanish (a delete racing this fails one of the two on the foreign key).
const SET_DEFAULT_ENVIRONMENT: &str = concat!(
    "UPDATE companies SET default_environment_id = $2 WHERE id = $1 AND ($2 IS NULL OR EXISTS \
     (SELECT 1 FROM environments WHERE environments.id = $2 AND environments.company_id = $1)) RETURNING ",
    company_columns!()
);

const INSERT_API_KEY: &str = "INSERT INTO api_keys (id, company_id, name, role, token_hash, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6)";
const API_KEY_BY_TOKEN_HASH: &str =
    "SELECT id, company_id, name, role, created_at FROM api_keys WHERE token_hash = $1";
const DELETE_API_KEY: &str = "DELETE FROM api_keys WHERE id = $1";

// === impl Store ===

impl Store {
    /// Fails with `Conflict(CompanyNameTaken)` if the name is in use.
    pub async fn insert_company(&self, company: &Company) -> Result<(), StoreError> {
        on_pool!(&self.db, |pool| {
            sqlx::query(INSERT_COMPANY)
                .bind(company.id.to_string())
                .bind(&company.name)
                .bind(company.created_at.unix_millis())
                .bind(company.default_environment_id.map(|id| id.to_string()))
                .execute(pool)
                .await
                .map_err(conflict_as(
                    COMPANY_NAME_CONSTRAINT,
                    ConflictKind::CompanyNameTaken,
                ))?;
        });
        Ok(())
    }

    /// The company named `name`, created if it does not exist yet.
    ///
    /// Safe under concurrency: the insert is a no-op when the name exists (including when a concurrent call inserted
    /// it first; PostgreSQL waits for that transaction to settle), and the row is then read back.
    pub async fn ensure_company(&self, name: &str) -> Result<Company, StoreError> {
        let id = CompanyId::new();
        on_pool!(&self.db, |pool| {
            sqlx::query(INSERT_COMPANY_IF_ABSENT)
                .bind(id.to_string())
                .bind(name)
                .bind(Timestamp::now().unix_millis())
                .execute(pool)
                .await?;
        });
        // Companies are never deleted, so the row exists now.
        self.company_by_name(name)
            .await?
            .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
    }

    /// Every company, oldest first.
    pub async fn list_companies(&self) -> Result<Vec<Company>, StoreError> {
        let rows: Vec<CompanyRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LIST_COMPANIES).fetch_all(pool).await?
        });
        convert_all(rows)
    }

    pub async fn get_company(&self, id: CompanyId) -> Result<Option<Company>, StoreError> {
        let row: Option<CompanyRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(GET_COMPANY)
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
        });
        row.map(Company::try_from).transpose()
    }

    pub async fn company_by_name(&self, name: &str) -> Result<Option<Company>, StoreError> {
        let row: Option<CompanyRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(COMPANY_BY_NAME)
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        row.map(Company::try_from).transpose()
    }

    /// Sets the company's default environment, or clears it with `None`. Returns the updated company, or `None`
    /// when the company does not exist or the environment is not one of its own (it never was, or it was deleted
    /// concurrently: the foreign key fails whichever of the two writes comes second).
    pub async fn set_default_environment(
        &self,
        company_id: CompanyId,
        environment_id: Option<EnvironmentId>,
    ) -> Result<Option<Company>, StoreError> {
        let result: Result<Option<CompanyRow>, sqlx::Error> = on_pool!(&self.db, |pool| {
            sqlx::query_as(SET_DEFAULT_ENVIRONMENT)
                .bind(company_id.to_string())
                .bind(environment_id.map(|id| id.to_string()))
                .fetch_optional(pool)
                .await
        });
        match result {
            Ok(row) => row.map(Company::try_from).transpose(),
            Err(error)
                if error
                    .as_database_error()
                    .is_some_and(|db| db.is_foreign_key_violation()) =>
            {
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Stores a key with the hash of its secret (the secret itself is never stored).
    pub async fn insert_api_key(&self, key: &ApiKey, token_hash: &str) -> Result<(), StoreError> {
        on_pool!(&self.db, |pool| {
            sqlx::query(INSERT_API_KEY)
                .bind(key.id.to_string())
                .bind(key.company_id.to_string())
                .bind(&key.name)
                .bind(key.role.as_str())
                .bind(token_hash)
                .bind(key.created_at.unix_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The key whose secret hashes to `token_hash`: how requests are authenticated.
    pub async fn api_key_by_token_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<ApiKey>, StoreError> {
        let row: Option<ApiKeyRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(API_KEY_BY_TOKEN_HASH)
                .bind(token_hash)
                .fetch_optional(pool)
                .await?
        });
        row.map(ApiKey::try_from).transpose()
    }

    /// Revokes a key. Returns whether it existed.
    pub async fn delete_api_key(&self, id: ApiKeyId) -> Result<bool, StoreError> {
        let result = on_pool!(&self.db, |pool| {
            sqlx::query(DELETE_API_KEY)
                .bind(id.to_string())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(result > 0)
    }
}
