//! `berth company` and `berth key`: companies and their API keys (admin token; a company's own keys may show it, and
//! its manager keys update it).

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Map, Value, json};

use super::output::{path_segment, print_table, show};
use crate::client::{ClientArgs, Session};

#[derive(Debug, Subcommand)]
pub enum CompanyCommand {
    /// List every company (admin).
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create a company (admin); prints its id.
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a company (admin, or any key of the company).
    Get {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change a company (admin, or a manager key of the company).
    Update {
        id: String,
        /// The environment runs use when they name none (`berth run` without --env): one of the company's own
        /// environments, active. `none` clears it, so such runs go to the company's Local environment again.
        #[arg(long, value_name = "ENV_ID|none")]
        default_environment: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key for the company (--company, default `default`); prints its token, which is shown only
    /// this once.
    Create {
        #[arg(long)]
        name: String,
        /// manager (read everything, change environments, start runs) or reader (read, configs redacted).
        #[arg(long)]
        role: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete an API key: it stops working at once.
    Rm {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub(super) async fn company(command: CompanyCommand) -> anyhow::Result<ExitCode> {
    match command {
        CompanyCommand::List { client } => {
            let session = Session::connect(client)?;
            let companies = session.api.get("/api/companies").await?;
            show(session.json, &companies, |companies| {
                print_table(
                    companies,
                    &[
                        ("ID", "id"),
                        ("NAME", "name"),
                        ("DEFAULT ENV", "defaultEnvironmentId"),
                        ("CREATED", "createdAt"),
                    ],
                );
            });
        }
        CompanyCommand::Create { name, client } => {
            let session = Session::connect(client)?;
            let created = session
                .api
                .post("/api/companies", &json!({"name": name}))
                .await?;
            show(session.json, &created, |created| {
                println!("{}", created["id"].as_str().unwrap_or_default())
            });
        }
        CompanyCommand::Get { id, client } => {
            let session = Session::connect(client)?;
            let company = session
                .api
                .get(&format!("/api/companies/{}", path_segment(&id)?))
                .await?;
            show(session.json, &company, print_company);
        }
        CompanyCommand::Update {
            id,
            default_environment,
            client,
        } => {
            let mut body = Map::new();
            match default_environment.as_deref() {
                None => bail!("nothing to change: give --default-environment ENV_ID (or none)"),
                Some("none") => {
                    body.insert("defaultEnvironmentId".to_owned(), Value::Null);
                }
                Some(environment) => {
                    body.insert(
                        "defaultEnvironmentId".to_owned(),
                        Value::String(path_segment(environment)?.to_owned()),
                    );
                }
            }
            let session = Session::connect(client)?;
            let company = session
                .api
                .patch(
                    &format!("/api/companies/{}", path_segment(&id)?),
                    &Value::Object(body),
                )
                .await?;
            show(session.json, &company, print_company);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A company as `key: value` lines.
fn print_company(company: &Value) {
    println!("id: {}", company["id"].as_str().unwrap_or_default());
    println!("name: {}", company["name"].as_str().unwrap_or_default());
    match company["defaultEnvironmentId"].as_str() {
        Some(environment) => println!("default environment: {environment}"),
        None => {
            println!("default environment: none (runs that name none use the Local environment)")
        }
    }
    println!(
        "created: {}",
        company["createdAt"].as_str().unwrap_or_default()
    );
}

pub(super) async fn key(command: KeyCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeyCommand::Create { name, role, client } => {
            let session = Session::open(client).await?;
            let created = session
                .api
                .post(
                    &format!("/api/companies/{}/api-keys", session.company_id),
                    &json!({"name": name, "role": role}),
                )
                .await?;
            show(session.json, &created, |created| {
                // The token alone on stdout, so `TOKEN=$(berth key create ...)` works; what it is goes to stderr.
                eprintln!(
                    "created {} key {} ({}); the token is shown only this once:",
                    created["role"].as_str().unwrap_or_default(),
                    created["name"].as_str().unwrap_or_default(),
                    created["id"].as_str().unwrap_or_default(),
                );
                println!("{}", created["token"].as_str().unwrap_or_default());
            });
        }
        KeyCommand::Rm { id, client } => {
            let session = Session::connect(client)?;
            let removed = session
                .api
                .delete(&format!("/api/api-keys/{}", path_segment(&id)?))
                .await?;
            show(session.json, &removed, |removed| {
                println!("removed {}", removed["id"].as_str().unwrap_or(&id))
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
