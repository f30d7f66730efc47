//! The activity log: an append-only audit trail.

use berth_core::ids::CompanyId;
use berth_core::time::Timestamp;

use super::error::StoreError;
use super::rows::{ActivityRow, convert_all};
use super::{ActivityEntry, NewActivity, Store};

const INSERT_ACTIVITY: &str = "INSERT INTO activity_log \
     (company_id, actor, action, entity_type, entity_id, details, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)";
/// Ids increase with every insert, so they order the log exactly, even within one millisecond.
const LIST_ACTIVITY: &str = "SELECT id, company_id, actor, action, entity_type, entity_id, details, created_at \
     FROM activity_log WHERE company_id = $1 ORDER BY id";

/// A page of the log after a cursor: the id of the last entry the reader has.
const LIST_ACTIVITY_AFTER: &str = "SELECT id, company_id, actor, action, entity_type, entity_id, details, created_at \
     FROM activity_log WHERE company_id = $1 AND id > $2 ORDER BY id LIMIT $3";

// === impl Store ===

impl Store {
    /// Appends an entry, stamped with the current time.
    pub async fn record_activity(&self, entry: &NewActivity) -> Result<(), StoreError> {
        let details = entry.details.to_string();
        on_pool!(&self.db, |pool| {
            sqlx::query(INSERT_ACTIVITY)
                .bind(entry.company_id.map(|id| id.to_string()))
                .bind(&entry.actor)
                .bind(&entry.action)
                .bind(&entry.entity_type)
                .bind(&entry.entity_id)
                .bind(&details)
                .bind(Timestamp::now().unix_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Up to `limit` entries of the company's activity after the entry `after` (0: from the start), oldest first.
    pub async fn list_activity_after(
        &self,
        company_id: CompanyId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ActivityEntry>, StoreError> {
        let rows: Vec<ActivityRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LIST_ACTIVITY_AFTER)
                .bind(company_id.to_string())
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }

    /// The company's activity, oldest first.
    pub async fn list_activity(
        &self,
        company_id: CompanyId,
    ) -> Result<Vec<ActivityEntry>, StoreError> {
        let rows: Vec<ActivityRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LIST_ACTIVITY)
                .bind(company_id.to_string())
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }
}
