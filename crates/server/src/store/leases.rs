//! Environment leases.

use berth_core::ids::{EnvironmentId, LeaseId};
use berth_core::lease::{Lease, LeaseStatus};

use super::Store;
use super::error::StoreError;
use super::rows::{LeaseRow, convert_all, json_text_or_null};

macro_rules! lease_columns {
    () => {
        "id, company_id, environment_id, run_id, status, lease_policy, driver, provider, provider_lease_id, \
         acquired_at, last_used_at, expires_at, released_at, failure_reason, cleanup_status, metadata"
    };
}

const INSERT_LEASE: &str = concat!(
    "INSERT INTO environment_leases (",
    lease_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
);
const GET_LEASE: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM environment_leases WHERE id = $1"
);
/// A `NULL` status matches every lease.
const LIST_LEASES: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM environment_leases WHERE environment_id = $1 AND ($2 IS NULL OR status = $2) \
     ORDER BY last_used_at DESC, id DESC"
);

// === impl Store ===

impl Store {
    pub async fn insert_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let metadata = json_text_or_null(lease.metadata.as_ref())?;
        on_pool!(&self.db, |pool| {
            sqlx::query(INSERT_LEASE)
                .bind(lease.id.to_string())
                .bind(lease.company_id.to_string())
                .bind(lease.environment_id.to_string())
                .bind(lease.run_id.map(|id| id.to_string()))
                .bind(lease.status.as_str())
                .bind(lease.lease_policy.as_str())
                .bind(lease.driver.as_str())
                .bind(lease.provider.as_deref())
                .bind(lease.provider_lease_id.as_deref())
                .bind(lease.acquired_at.unix_millis())
                .bind(lease.last_used_at.unix_millis())
                .bind(lease.expires_at.map(|at| at.unix_millis()))
                .bind(lease.released_at.map(|at| at.unix_millis()))
                .bind(lease.failure_reason.as_deref())
                .bind(lease.cleanup_status.map(|status| status.as_str()))
                .bind(metadata.as_deref())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn get_lease(&self, id: LeaseId) -> Result<Option<Lease>, StoreError> {
        let row: Option<LeaseRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(GET_LEASE)
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
        });
        row.map(Lease::try_from).transpose()
    }

    /// The environment's leases, optionally only those in `status`, most recently used first.
    pub async fn list_leases(
        &self,
        environment_id: EnvironmentId,
        status: Option<LeaseStatus>,
    ) -> Result<Vec<Lease>, StoreError> {
        let status = status.map(|status| status.as_str());
        let rows: Vec<LeaseRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LIST_LEASES)
                .bind(environment_id.to_string())
                .bind(status)
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }
}
