//! Row structs as both backends decode them, and their conversion into `berth_core` types.
//!
//! Rows hold only strings, integers and bytes, which decode identically on SQLite and PostgreSQL. Parsing into
//! domain types happens here, in one place, and every failure becomes [`StoreError::CorruptRow`] naming the column.

use std::str::FromStr;

use serde_json::{Map, Value};

use berth_core::company::{ApiKey, Company};
use berth_core::environment::Environment;
use berth_core::lease::Lease;
use berth_core::probe::{LastProbe, ProbeResult};
use berth_core::run::{Run, RunEvent};
use berth_core::time::Timestamp;

use super::error::StoreError;
use super::output::Segment;
use super::{ActivityEntry, StoredSecret};

#[derive(Debug, sqlx::FromRow)]
pub(super) struct CompanyRow {
    id: String,
    name: String,
    created_at: i64,
    default_environment_id: Option<String>,
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct ApiKeyRow {
    id: String,
    company_id: String,
    name: String,
    role: String,
    created_at: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct EnvironmentRow {
    id: String,
    company_id: String,
    name: String,
    description: Option<String>,
    driver: String,
    status: String,
    config: String,
    metadata: Option<String>,
    created_at: i64,
    updated_at: i64,
    revision: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct ProbeRow {
    environment_id: String,
    probed_at: i64,
    ok: i64,
    driver: String,
    summary: String,
    details: String,
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct LeaseRow {
    id: String,
    company_id: String,
    environment_id: String,
    run_id: Option<String>,
    status: String,
    lease_policy: String,
    driver: String,
    provider: Option<String>,
    provider_lease_id: Option<String>,
    acquired_at: i64,
    last_used_at: i64,
    expires_at: Option<i64>,
    released_at: Option<i64>,
    failure_reason: Option<String>,
    cleanup_status: Option<String>,
    metadata: Option<String>,
    acquired_config: Option<String>,
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct RunRow {
    id: String,
    company_id: String,
    environment_id: String,
    lease_id: Option<String>,
    status: String,
    command: String,
    exit_code: Option<i64>,
    signal: Option<String>,
    error: Option<String>,
    owner_node: String,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    heartbeat_at: i64,
    cancel_requested: i64,
}

/// What [`heartbeat_runs`](super::Store::heartbeat_runs) reads back from the runs it refreshed.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct HeartbeatRow {
    pub(super) id: String,
    pub(super) cancel_requested: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct RunEventRow {
    run_id: String,
    seq: i64,
    at: i64,
    kind: String,
    data: String,
    /// Where the output text is, when it lives in a segment file beside a SQLite database (see `output`).
    output_offset: Option<i64>,
    output_length: Option<i64>,
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct ActivityRow {
    id: i64,
    company_id: Option<String>,
    actor: String,
    action: String,
    entity_type: String,
    entity_id: String,
    details: String,
    created_at: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct SecretRow {
    id: String,
    company_id: String,
    environment_id: Option<String>,
    name: String,
    nonce: Vec<u8>,
    ciphertext: Vec<u8>,
    created_at: i64,
}

// === conversions ===

impl TryFrom<CompanyRow> for Company {
    type Error = StoreError;

    fn try_from(row: CompanyRow) -> Result<Self, StoreError> {
        const TABLE: &str = "companies";
        Ok(Company {
            id: parse(&row.id, TABLE, "id")?,
            name: row.name,
            created_at: Timestamp::from_unix_millis(row.created_at),
            default_environment_id: parse_optional(
                row.default_environment_id.as_deref(),
                TABLE,
                "default_environment_id",
            )?,
        })
    }
}

impl TryFrom<ApiKeyRow> for ApiKey {
    type Error = StoreError;

    fn try_from(row: ApiKeyRow) -> Result<Self, StoreError> {
        const TABLE: &str = "api_keys";
        Ok(ApiKey {
            id: parse(&row.id, TABLE, "id")?,
            company_id: parse(&row.company_id, TABLE, "company_id")?,
            name: row.name,
            role: parse(&row.role, TABLE, "role")?,
            created_at: Timestamp::from_unix_millis(row.created_at),
        })
    }
}

impl TryFrom<EnvironmentRow> for Environment {
    type Error = StoreError;

    fn try_from(row: EnvironmentRow) -> Result<Self, StoreError> {
        const TABLE: &str = "environments";
        Ok(Environment {
            id: parse(&row.id, TABLE, "id")?,
            company_id: parse(&row.company_id, TABLE, "company_id")?,
            name: row.name,
            description: row.description,
            driver: parse(&row.driver, TABLE, "driver")?,
            status: parse(&row.status, TABLE, "status")?,
            config: json_object(&row.config, TABLE, "config")?,
            metadata: json_object_or_null(row.metadata.as_deref(), TABLE, "metadata")?,
            created_at: Timestamp::from_unix_millis(row.created_at),
            updated_at: Timestamp::from_unix_millis(row.updated_at),
            revision: row.revision,
        })
    }
}

impl TryFrom<ProbeRow> for LastProbe {
    type Error = StoreError;

    fn try_from(row: ProbeRow) -> Result<Self, StoreError> {
        const TABLE: &str = "environment_probes";
        Ok(LastProbe {
            environment_id: parse(&row.environment_id, TABLE, "environment_id")?,
            at: Timestamp::from_unix_millis(row.probed_at),
            result: ProbeResult {
                ok: row.ok != 0,
                driver: parse(&row.driver, TABLE, "driver")?,
                summary: row.summary,
                details: json_object(&row.details, TABLE, "details")?,
            },
        })
    }
}

impl TryFrom<LeaseRow> for Lease {
    type Error = StoreError;

    fn try_from(row: LeaseRow) -> Result<Self, StoreError> {
        const TABLE: &str = "environment_leases";
        Ok(Lease {
            id: parse(&row.id, TABLE, "id")?,
            company_id: parse(&row.company_id, TABLE, "company_id")?,
            environment_id: parse(&row.environment_id, TABLE, "environment_id")?,
            run_id: parse_optional(row.run_id.as_deref(), TABLE, "run_id")?,
            status: parse(&row.status, TABLE, "status")?,
            lease_policy: parse(&row.lease_policy, TABLE, "lease_policy")?,
            driver: parse(&row.driver, TABLE, "driver")?,
            provider: row.provider,
            provider_lease_id: row.provider_lease_id,
            acquired_at: Timestamp::from_unix_millis(row.acquired_at),
            last_used_at: Timestamp::from_unix_millis(row.last_used_at),
            expires_at: row.expires_at.map(Timestamp::from_unix_millis),
            released_at: row.released_at.map(Timestamp::from_unix_millis),
            failure_reason: row.failure_reason,
            cleanup_status: parse_optional(row.cleanup_status.as_deref(), TABLE, "cleanup_status")?,
            metadata: json_object_or_null(row.metadata.as_deref(), TABLE, "metadata")?,
            acquired_config: json_object_or_null(
                row.acquired_config.as_deref(),
                TABLE,
                "acquired_config",
            )?,
        })
    }
}

impl TryFrom<RunRow> for Run {
    type Error = StoreError;

    fn try_from(row: RunRow) -> Result<Self, StoreError> {
        const TABLE: &str = "runs";
        Ok(Run {
            id: parse(&row.id, TABLE, "id")?,
            company_id: parse(&row.company_id, TABLE, "company_id")?,
            environment_id: parse(&row.environment_id, TABLE, "environment_id")?,
            lease_id: parse_optional(row.lease_id.as_deref(), TABLE, "lease_id")?,
            status: parse(&row.status, TABLE, "status")?,
            command: serde_json::from_str(&row.command).map_err(|_| corrupt(TABLE, "command"))?,
            exit_code: row
                .exit_code
                .map(i32::try_from)
                .transpose()
                .map_err(|_| corrupt(TABLE, "exit_code"))?,
            signal: row.signal,
            error: row.error,
            owner_node: row.owner_node,
            created_at: Timestamp::from_unix_millis(row.created_at),
            started_at: row.started_at.map(Timestamp::from_unix_millis),
            finished_at: row.finished_at.map(Timestamp::from_unix_millis),
            heartbeat_at: Timestamp::from_unix_millis(row.heartbeat_at),
            cancel_requested: flag(row.cancel_requested, TABLE, "cancel_requested")?,
        })
    }
}

impl RunEventRow {
    const TABLE: &'static str = "run_events";

    pub(super) fn seq(&self) -> i64 {
        self.seq
    }

    /// The segment holding this row's output text, if it is not in `data`.
    pub(super) fn segment(&self) -> Result<Option<Segment>, StoreError> {
        let column = |value: Option<i64>, name| {
            value
                .map(|value| u64::try_from(value).map_err(|_| corrupt(Self::TABLE, name)))
                .transpose()
        };
        match (
            column(self.output_offset, "output_offset")?,
            column(self.output_length, "output_length")?,
        ) {
            (None, None) => Ok(None),
            (Some(offset), Some(length)) => Ok(Some(Segment { offset, length })),
            _ => Err(corrupt(Self::TABLE, "output_length")),
        }
    }

    /// The event; `text` is the content of its segment, which becomes `data.text`.
    pub(super) fn into_event(self, text: Option<String>) -> Result<RunEvent, StoreError> {
        let mut data: Value =
            serde_json::from_str(&self.data).map_err(|_| corrupt(Self::TABLE, "data"))?;
        if let Some(text) = text {
            let Value::Object(map) = &mut data else {
                return Err(corrupt(Self::TABLE, "data"));
            };
            map.insert("text".to_owned(), Value::String(text));
        }
        Ok(RunEvent {
            run_id: parse(&self.run_id, Self::TABLE, "run_id")?,
            seq: self.seq,
            at: Timestamp::from_unix_millis(self.at),
            kind: parse(&self.kind, Self::TABLE, "kind")?,
            data,
        })
    }
}

impl TryFrom<ActivityRow> for ActivityEntry {
    type Error = StoreError;

    fn try_from(row: ActivityRow) -> Result<Self, StoreError> {
        const TABLE: &str = "activity_log";
        Ok(ActivityEntry {
            id: row.id,
            company_id: parse_optional(row.company_id.as_deref(), TABLE, "company_id")?,
            actor: row.actor,
            action: row.action,
            entity_type: row.entity_type,
            entity_id: row.entity_id,
            details: serde_json::from_str(&row.details).map_err(|_| corrupt(TABLE, "details"))?,
            created_at: Timestamp::from_unix_millis(row.created_at),
        })
    }
}

impl TryFrom<SecretRow> for StoredSecret {
    type Error = StoreError;

    fn try_from(row: SecretRow) -> Result<Self, StoreError> {
        const TABLE: &str = "secrets";
        Ok(StoredSecret {
            id: parse(&row.id, TABLE, "id")?,
            company_id: parse(&row.company_id, TABLE, "company_id")?,
            environment_id: parse_optional(row.environment_id.as_deref(), TABLE, "environment_id")?,
            name: row.name,
            nonce: row.nonce,
            ciphertext: row.ciphertext,
            created_at: Timestamp::from_unix_millis(row.created_at),
        })
    }
}

/// Converts every row, failing on the first corrupt one.
pub(super) fn convert_all<R, T>(rows: Vec<R>) -> Result<Vec<T>, StoreError>
where
    T: TryFrom<R, Error = StoreError>,
{
    rows.into_iter().map(T::try_from).collect()
}

// === encoding ===

/// The stored text of a JSON object.
pub(super) fn json_text(map: &Map<String, Value>) -> Result<String, StoreError> {
    // Cannot fail for a map of JSON values (keys are strings); kept fallible rather than unwrapped.
    serde_json::to_string(map)
        .map_err(|err| StoreError::Database(sqlx::Error::Encode(Box::new(err))))
}

/// The stored text of any serializable value as JSON (a run's argv, an event's data).
pub(super) fn json_value_text<T: serde::Serialize + ?Sized>(
    value: &T,
) -> Result<String, StoreError> {
    // Cannot fail for the types stored (strings, JSON values); kept fallible rather than unwrapped.
    serde_json::to_string(value)
        .map_err(|err| StoreError::Database(sqlx::Error::Encode(Box::new(err))))
}

/// The stored form of a boolean: `0` or `1` in an integer column, the one type both backends decode alike.
pub(super) fn flag_value(value: bool) -> i64 {
    i64::from(value)
}

/// The stored text of an optional JSON object: SQL `NULL` for `None`.
pub(super) fn json_text_or_null(
    map: Option<&Map<String, Value>>,
) -> Result<Option<String>, StoreError> {
    map.map(json_text).transpose()
}

// === decoding ===

fn corrupt(table: &'static str, column: &'static str) -> StoreError {
    StoreError::CorruptRow { table, column }
}

/// Parses a column through its domain type's `FromStr`; the parse error is dropped because it quotes the value.
fn parse<T: FromStr>(
    value: &str,
    table: &'static str,
    column: &'static str,
) -> Result<T, StoreError> {
    value.parse().map_err(|_| corrupt(table, column))
}

fn parse_optional<T: FromStr>(
    value: Option<&str>,
    table: &'static str,
    column: &'static str,
) -> Result<Option<T>, StoreError> {
    value.map(|value| parse(value, table, column)).transpose()
}

/// An integer column holding a boolean as `0` or `1` (see [`flag_value`]).
fn flag(value: i64, table: &'static str, column: &'static str) -> Result<bool, StoreError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(corrupt(table, column)),
    }
}

/// A column that must hold a JSON object.
fn json_object(
    text: &str,
    table: &'static str,
    column: &'static str,
) -> Result<Map<String, Value>, StoreError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(corrupt(table, column)),
    }
}

/// A column that holds a JSON object or is `NULL` (a stored JSON `null` reads as `None` too).
pub(super) fn json_object_or_null(
    text: Option<&str>,
    table: &'static str,
    column: &'static str,
) -> Result<Option<Map<String, Value>>, StoreError> {
    let Some(text) = text else {
        return Ok(None);
    };
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(Value::Null) => Ok(None),
        _ => Err(corrupt(table, column)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Corruption = fn(&mut EnvironmentRow);

    fn environment_row() -> EnvironmentRow {
        EnvironmentRow {
            id: "0190f2a4-9a6e-7cc3-8b1e-1c2d3e4f5a6b".to_owned(),
            company_id: "0190f2a4-9a6e-7cc3-8b1e-1c2d3e4f5a6c".to_owned(),
            name: "box".to_owned(),
            description: None,
            driver: "ssh".to_owned(),
            status: "active".to_owned(),
            config: r#"{"host":"h"}"#.to_owned(),
            metadata: None,
            created_at: 1,
            updated_at: 2,
            revision: 3,
        }
    }

    #[test]
    fn a_valid_row_converts() {
        let environment = Environment::try_from(environment_row()).unwrap();
        assert_eq!(environment.config["host"], "h");
        assert_eq!(environment.revision, 3);
        assert_eq!(environment.metadata, None);
    }

    #[test]
    fn corrupt_columns_are_named_without_their_values() {
        let cases: [(&str, Corruption); 5] = [
            ("driver", |row| row.driver = "docker-secret".to_owned()),
            ("status", |row| row.status = "gone".to_owned()),
            ("id", |row| row.id = "not-an-id".to_owned()),
            ("config", |row| row.config = "[1]".to_owned()),
            ("metadata", |row| row.metadata = Some("\"x\"".to_owned())),
        ];
        for (column, corrupt_it) in cases {
            let mut row = environment_row();
            corrupt_it(&mut row);
            let err = Environment::try_from(row).unwrap_err();
            assert_eq!(err.code(), "corrupt_row");
            assert!(err.to_string().contains(column), "{err}");
            assert!(!err.to_string().contains("docker-secret"), "{err}");
        }
    }

    #[test]
    fn null_metadata_reads_as_none() {
        let mut row = environment_row();
        row.metadata = Some("null".to_owned());
        assert_eq!(Environment::try_from(row).unwrap().metadata, None);
    }
}
