//! Encrypted secrets. The store only moves ciphertext; encryption lives with the server's secret keeper.

use berth_core::ids::{EnvironmentId, SecretId};

use super::error::StoreError;
use super::rows::SecretRow;
use super::{Store, StoredSecret};

const INSERT_SECRET: &str = "INSERT INTO secrets (id, company_id, environment_id, name, nonce, ciphertext, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";
const GET_SECRET: &str = "SELECT id, company_id, environment_id, name, nonce, ciphertext, created_at \
     FROM secrets WHERE id = $1";
const DELETE_SECRET: &str = "DELETE FROM secrets WHERE id = $1";
const DELETE_SECRETS_OF_ENVIRONMENT: &str = "DELETE FROM secrets WHERE environment_id = $1";

// === impl Store ===

impl Store {
    pub async fn insert_secret(&self, secret: &StoredSecret) -> Result<(), StoreError> {
        on_pool!(&self.db, |pool| {
            sqlx::query(INSERT_SECRET)
                .bind(secret.id.to_string())
                .bind(secret.company_id.to_string())
                .bind(secret.environment_id.map(|id| id.to_string()))
                .bind(&secret.name)
                .bind(&secret.nonce)
                .bind(&secret.ciphertext)
                .bind(secret.created_at.unix_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn get_secret(&self, id: SecretId) -> Result<Option<StoredSecret>, StoreError> {
        let row: Option<SecretRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(GET_SECRET)
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
        });
        row.map(StoredSecret::try_from).transpose()
    }

    /// Returns whether the secret existed.
    pub async fn delete_secret(&self, id: SecretId) -> Result<bool, StoreError> {
        let deleted = on_pool!(&self.db, |pool| {
            sqlx::query(DELETE_SECRET)
                .bind(id.to_string())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted > 0)
    }

    /// Removes every secret attached to the environment (after it was deleted, or when its config no longer
    /// references them). Returns how many were removed.
    pub async fn delete_secrets_of_environment(
        &self,
        environment_id: EnvironmentId,
    ) -> Result<u64, StoreError> {
        let deleted = on_pool!(&self.db, |pool| {
            sqlx::query(DELETE_SECRETS_OF_ENVIRONMENT)
                .bind(environment_id.to_string())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted)
    }
}
