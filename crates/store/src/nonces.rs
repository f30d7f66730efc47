//! Nonces of signed bridge requests: remembered until their signature window closes, so a replay is refused on any
//! replica.

use berth_core::ids::RunId;
use berth_core::time::Timestamp;

use super::Store;
use super::error::StoreError;

const REMEMBER_NONCE: &str = "INSERT INTO bridge_nonces (run_id, nonce, expires_at) VALUES ($1, $2, $3) \
     ON CONFLICT (run_id, nonce) DO NOTHING";
const SWEEP_NONCES: &str = "DELETE FROM bridge_nonces WHERE expires_at < $1";

// === impl Store ===

impl Store {
    /// Records a nonce; `false` when it was already there (a replay). One statement, so two replicas seeing the same
    /// request at once cannot both accept it.
    pub async fn remember_nonce(
        &self,
        run_id: RunId,
        nonce: &str,
        expires_at: Timestamp,
    ) -> Result<bool, StoreError> {
        let inserted = on_pool!(&self.db, |pool| {
            sqlx::query(REMEMBER_NONCE)
                .bind(run_id.to_string())
                .bind(nonce)
                .bind(expires_at.unix_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(inserted == 1)
    }

    /// Forgets nonces whose window has closed; returns how many.
    pub async fn sweep_nonces(&self, now: Timestamp) -> Result<u64, StoreError> {
        let deleted = on_pool!(&self.db, |pool| {
            sqlx::query(SWEEP_NONCES)
                .bind(now.unix_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted)
    }
}
