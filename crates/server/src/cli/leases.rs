//! `berth lease`: an environment's leases, and one lease (manager or admin: readers are refused by the API).

use std::process::ExitCode;

use clap::Subcommand;

use super::output::{path_segment, print_fields, print_table, show, with_query};
use crate::client::{ClientArgs, Session};

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// List an environment's leases.
    List {
        /// The environment's id.
        #[arg(long)]
        env: String,
        /// Only leases in this status (active, released, expired, failed, retained).
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one lease: its status, policy, provider, times, failure reason and cleanup status.
    Get {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

const LEASE_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("STATUS", "status"),
    ("POLICY", "leasePolicy"),
    ("RUN", "runId"),
    ("ACQUIRED", "acquiredAt"),
];

pub(super) async fn run(command: LeaseCommand) -> anyhow::Result<ExitCode> {
    match command {
        LeaseCommand::List {
            env,
            status,
            client,
        } => {
            let session = Session::connect(client)?;
            let path = with_query(
                format!("/api/environments/{}/leases", path_segment(&env)?),
                &[("status", status)],
            )?;
            let leases = session.api.get(&path).await?;
            show(session.json, &leases, |list| {
                print_table(list, LEASE_COLUMNS)
            });
        }
        LeaseCommand::Get { id, client } => {
            let session = Session::connect(client)?;
            let lease = session
                .api
                .get(&format!("/api/environment-leases/{}", path_segment(&id)?))
                .await?;
            show(session.json, &lease, print_fields);
        }
    }
    Ok(ExitCode::SUCCESS)
}
