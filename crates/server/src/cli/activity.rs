//! `berth activity`: the company's activity log — who changed what, when (field names, never values).

use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::output::{cell, print_json};
use crate::client::{ClientArgs, Session};

#[derive(Debug, Args)]
pub struct ActivityArgs {
    /// Only entries after this one (the ID column): for reading on from where you stopped.
    #[arg(long, default_value_t = 0)]
    after: i64,
    /// At most this many entries (1 to 10000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    #[command(flatten)]
    client: ClientArgs,
}

pub(super) async fn run(args: ActivityArgs) -> anyhow::Result<ExitCode> {
    let session = Session::open(args.client).await?;
    let entries = session
        .api
        .get(&format!(
            "/api/companies/{}/activity?after={}&limit={}",
            session.company_id, args.after, args.limit
        ))
        .await?;
    if session.json {
        print_json(&entries);
        return Ok(ExitCode::SUCCESS);
    }
    for entry in entries.as_array().into_iter().flatten() {
        let details = match &entry["details"] {
            Value::Object(map) if map.is_empty() => String::new(),
            Value::Null => String::new(),
            details => format!("  {details}"),
        };
        println!(
            "{:>6}  {}  {}  {} {} {}{}",
            cell(&entry["id"]),
            cell(&entry["createdAt"]),
            cell(&entry["actor"]),
            cell(&entry["action"]),
            cell(&entry["entityType"]),
            cell(&entry["entityId"]),
            details,
        );
    }
    Ok(ExitCode::SUCCESS)
}
