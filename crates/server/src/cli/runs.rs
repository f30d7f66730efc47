//! `berth runs`: the company's runs, one run, its output, and cancelling it. (`berth run` starts one.)

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::output::{path_segment, print_fields, print_table, show, with_query};
use crate::client::{ClientArgs, Session};
use crate::run_command::{OnInterrupt, follow_from, render};

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List the company's runs, newest first.
    List {
        /// Only runs in this status (queued, running, succeeded, failed, timed_out, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// At most this many runs (1 to 10000).
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one run: status, exit code, signal, error, times.
    Get {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a run's output: stdout to stdout, stderr to stderr, berth's errors on stderr. With --json, every event
    /// as one JSON line.
    Logs {
        id: String,
        /// Keep following until the run ends, then exit with its exit code as `berth run` would (Ctrl-C stops
        /// following and leaves the run alone).
        #[arg(short, long)]
        follow: bool,
        /// Start after this event sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a run: its process tree is killed and its lease released. Cancelling a finished run changes nothing.
    Cancel {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

const RUN_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("STATUS", "status"),
    ("EXIT", "exitCode"),
    ("ENVIRONMENT", "environmentId"),
    ("CREATED", "createdAt"),
];

/// Events fetched per request when printing a finished run's output.
const EVENTS_PAGE: u32 = 1000;

pub(super) async fn run(command: RunsCommand) -> anyhow::Result<ExitCode> {
    match command {
        RunsCommand::List {
            status,
            limit,
            client,
        } => {
            let session = Session::open(client).await?;
            let path = with_query(
                format!("/api/companies/{}/runs", session.company_id),
                &[
                    ("status", status),
                    ("limit", limit.map(|limit| limit.to_string())),
                ],
            )?;
            let runs = session.api.get(&path).await?;
            show(session.json, &runs, |list| print_table(list, RUN_COLUMNS));
        }
        RunsCommand::Get { id, client } => {
            let session = Session::connect(client)?;
            let run = session
                .api
                .get(&format!("/api/runs/{}", path_segment(&id)?))
                .await?;
            show(session.json, &run, print_fields);
        }
        RunsCommand::Logs {
            id,
            follow,
            after,
            client,
        } => {
            let session = Session::connect(client)?;
            let id = path_segment(&id)?;
            if follow {
                let code = follow_from(
                    &session,
                    id,
                    after,
                    session.json,
                    OnInterrupt::StopFollowing,
                )
                .await?;
                return Ok(ExitCode::from(code));
            }
            print_events(&session, id, after).await?;
        }
        RunsCommand::Cancel { id, client } => {
            let session = Session::connect(client)?;
            let run = session
                .api
                .post(
                    &format!("/api/runs/{}/cancel", path_segment(&id)?),
                    &json!({}),
                )
                .await?;
            show(session.json, &run, |run| {
                println!(
                    "{} {}",
                    run["id"].as_str().unwrap_or_default(),
                    run["status"].as_str().unwrap_or_default()
                );
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the events recorded so far, a page at a time.
async fn print_events(session: &Session, run_id: &str, after: i64) -> anyhow::Result<()> {
    let mut after = after;
    loop {
        let page = session
            .api
            .get(&format!(
                "/api/runs/{run_id}/events?after={after}&limit={EVENTS_PAGE}"
            ))
            .await?;
        let events = page.as_array().map(Vec::as_slice).unwrap_or_default();
        for event in events {
            if session.json {
                println!("{event}");
            } else {
                render(event)?;
            }
        }
        match events.last().and_then(|event| event["seq"].as_i64()) {
            Some(last) if events.len() == EVENTS_PAGE as usize => after = last,
            _ => return Ok(()),
        }
    }
}
