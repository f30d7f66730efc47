//! `berth env`: list, show, create, update, probe and delete environments.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Map, Value, json};

use super::output::{
    parse_json_argument, path_segment, print_fields, print_table, show, with_query,
};
use crate::client::{ClientArgs, Session};

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// List the company's environments, newest update first.
    List {
        /// Only environments in this status (active, archived).
        #[arg(long)]
        status: Option<String>,
        /// Only environments with this driver (local, ssh, sandbox, plugin).
        #[arg(long)]
        driver: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one environment (its config with secrets as references only).
    Get {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create an environment.
    Create {
        #[arg(long)]
        name: String,
        /// local, ssh, sandbox or plugin.
        #[arg(long)]
        driver: String,
        /// Driver config as JSON, or @FILE to read it from a file.
        #[arg(long)]
        config: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Free-form metadata as a JSON object, or @FILE.
        #[arg(long)]
        metadata: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change an environment: only the fields given change. With the same driver, --config is merged over the
    /// stored config (a key set to null removes it); with --driver, the config is replaced and no secret carries over.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// A new description; an empty one removes it.
        #[arg(long)]
        description: Option<String>,
        /// local, ssh, sandbox or plugin.
        #[arg(long)]
        driver: Option<String>,
        /// active or archived (an archived environment takes no new runs).
        #[arg(long)]
        status: Option<String>,
        /// Driver config as JSON, or @FILE. Secrets go in as plain values and are stored encrypted.
        #[arg(long)]
        config: Option<String>,
        /// Metadata as a JSON object, or @FILE; `null` removes it.
        #[arg(long)]
        metadata: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check that berth can reach and use an environment (exit 1 when it cannot).
    Probe {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete an environment (its active leases are released first).
    Rm {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

const ENVIRONMENT_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("DRIVER", "driver"),
    ("STATUS", "status"),
    ("UPDATED", "updatedAt"),
];

pub(super) async fn run(command: EnvCommand) -> anyhow::Result<ExitCode> {
    match command {
        EnvCommand::List {
            status,
            driver,
            client,
        } => {
            let session = Session::open(client).await?;
            let path = with_query(
                format!("/api/companies/{}/environments", session.company_id),
                &[("status", status), ("driver", driver)],
            )?;
            let list = session.api.get(&path).await?;
            show(session.json, &list, |list| {
                print_table(list, ENVIRONMENT_COLUMNS)
            });
        }
        EnvCommand::Get { id, client } => {
            let session = Session::connect(client)?;
            let environment = session
                .api
                .get(&format!("/api/environments/{}", path_segment(&id)?))
                .await?;
            show(session.json, &environment, print_fields);
        }
        EnvCommand::Create {
            name,
            driver,
            config,
            description,
            metadata,
            client,
        } => {
            let config = match config.as_deref() {
                None => json!({}),
                Some(text) => parse_json_argument("--config", text)?,
            };
            let mut body = json!({"name": name, "driver": driver, "config": config});
            if let Some(description) = description {
                body["description"] = Value::String(description);
            }
            if let Some(metadata) = metadata.as_deref() {
                body["metadata"] = parse_json_argument("--metadata", metadata)?;
            }
            let session = Session::open(client).await?;
            let created = session
                .api
                .post(
                    &format!("/api/companies/{}/environments", session.company_id),
                    &body,
                )
                .await?;
            show(session.json, &created, |created| {
                println!("{}", created["id"].as_str().unwrap_or_default())
            });
        }
        EnvCommand::Update {
            id,
            name,
            description,
            driver,
            status,
            config,
            metadata,
            client,
        } => {
            let mut body = Map::new();
            if let Some(name) = name {
                body.insert("name".to_owned(), Value::String(name));
            }
            if let Some(description) = description {
                let description = if description.is_empty() {
                    Value::Null
                } else {
                    Value::String(description)
                };
                body.insert("description".to_owned(), description);
            }
            if let Some(driver) = driver {
                body.insert("driver".to_owned(), Value::String(driver));
            }
            if let Some(status) = status {
                body.insert("status".to_owned(), Value::String(status));
            }
            if let Some(config) = config.as_deref() {
                body.insert(
                    "config".to_owned(),
                    parse_json_argument("--config", config)?,
                );
            }
            if let Some(metadata) = metadata.as_deref() {
                body.insert(
                    "metadata".to_owned(),
                    parse_json_argument("--metadata", metadata)?,
                );
            }
            if body.is_empty() {
                bail!(
                    "nothing to change: give at least one of --name, --description, --driver, --status, --config, \
                     --metadata"
                );
            }
            let session = Session::connect(client)?;
            let updated = session
                .api
                .patch(
                    &format!("/api/environments/{}", path_segment(&id)?),
                    &Value::Object(body),
                )
                .await?;
            show(session.json, &updated, |updated| {
                println!("updated {}", updated["id"].as_str().unwrap_or_default())
            });
        }
        EnvCommand::Probe { id, client } => {
            let session = Session::connect(client)?;
            let result = session
                .api
                .post(
                    &format!("/api/environments/{}/probe", path_segment(&id)?),
                    &json!({}),
                )
                .await?;
            let ok = result["ok"].as_bool().unwrap_or(false);
            show(session.json, &result, |result| {
                println!(
                    "{}: {}",
                    if ok { "ok" } else { "failed" },
                    result["summary"].as_str().unwrap_or_default()
                );
            });
            if !ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        EnvCommand::Rm { id, client } => {
            let session = Session::connect(client)?;
            let removed = session
                .api
                .delete(&format!("/api/environments/{}", path_segment(&id)?))
                .await?;
            show(session.json, &removed, |removed| {
                println!("removed {}", removed["id"].as_str().unwrap_or_default())
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
