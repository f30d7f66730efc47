//! Accepting a run: the request checked field by field, the host's rules applied, the environment chosen and its
//! config opened, the run stored as `queued` with its first event, and its execution started on this node.
//!
//! Everything that can refuse a run refuses it here, before it is stored: once [`RunManager::accept`] returns a run,
//! every later failure is that run's status and events.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use berth_core::ErrorKind;
use berth_core::config::DriverConfig;
use berth_core::driver::ExecRequest;
use berth_core::environment::{Driver, Environment, EnvironmentStatus};
use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::lease::LeasePolicy;
use berth_core::run::{Run, RunStatus, check_env_name, check_no_nul};
use berth_core::time::Timestamp;
use berth_core::validation::ValidationErrors;
use berth_store::StoreError;

use super::event_data::EventData;
use super::events::EventWriter;
use super::executor::RunPlan;
use super::manager::RunManager;
use crate::host_policy::{HostPolicyError, WorkspaceCaller};
use crate::vault::{self, ResolvedConfig, VaultError};

/// Longest accepted run timeout: one day.
const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Variables the callback bridge sets whenever it is on; a request may not set them itself.
const RESERVED_ENV: [&str; 3] = ["BERTH_API_URL", "BERTH_API_TOKEN", "BERTH_RUN_ID"];

/// A request to run a command, as the caller gave it (unchecked). Field paths in errors use the API's names.
#[derive(Debug)]
pub struct AcceptRun {
    pub company_id: CompanyId,
    /// Whose workspace rules apply to `workspace_local_path`.
    pub caller: WorkspaceCaller,
    /// Who asked, as logs name them (`admin`, `api_key:<id>`).
    pub actor: String,
    /// `None`: the company's Local environment, if it may have one.
    pub environment_id: Option<String>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub stdin: Option<String>,
    pub timeout_ms: Option<u64>,
    pub workspace_local_path: Option<String>,
    /// `None`: on, when the server has a bridge.
    pub bridge: Option<bool>,
    pub lease_policy: Option<String>,
}

/// Why a run was refused. Nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The request's own fields; the paths name them.
    #[error("{0}")]
    Invalid(ValidationErrors),
    /// The host's rules: workspace roots, Local environments.
    #[error(transparent)]
    HostPolicy(#[from] HostPolicyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The environment's config could not be opened: no longer valid, or its secrets unusable.
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("the environment is archived")]
    EnvironmentArchived,
    #[error("the {driver} driver cannot run commands in this build")]
    DriverUnsupported { driver: Driver },
}

// === impl AcceptError ===

impl AcceptError {
    /// The stable, snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            AcceptError::Invalid(_) => "validation_failed",
            AcceptError::HostPolicy(error) => error.code(),
            AcceptError::Store(error) => error.code(),
            AcceptError::Vault(error) => error.code(),
            AcceptError::EnvironmentArchived => "environment_archived",
            AcceptError::DriverUnsupported { .. } => "driver_unsupported",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            AcceptError::Invalid(_) => ErrorKind::Validation,
            AcceptError::HostPolicy(error) => error.kind(),
            AcceptError::Store(error) => error.kind(),
            AcceptError::Vault(error) => error.kind(),
            AcceptError::EnvironmentArchived => ErrorKind::Conflict,
            // The request asks for what this build cannot do, like any other invalid field.
            AcceptError::DriverUnsupported { .. } => ErrorKind::Validation,
        }
    }
}

// === impl RunManager ===

impl RunManager {
    /// Checks a run request, stores the run (`queued`, with its first event) and starts executing it on this node.
    /// The company must exist; whether the caller may manage it is the caller's check.
    pub async fn accept(&self, request: AcceptRun) -> Result<Run, AcceptError> {
        let company_id = request.company_id;
        let caller = request.caller;
        let actor = request.actor.clone();
        let reserved = self.reserved_env_names();
        let (mut plan, environment_id) = validate(request, &reserved)?;
        // Before anything else happens (even a Local environment being created): the run uses the resolved directory.
        if let Some(requested) = plan.workspace.take() {
            let resolved = self
                .host()
                .confine_workspace(caller, &requested)
                .await
                .inspect_err(|error| {
                    tracing::warn!(
                        company.id = %company_id,
                        actor = %actor,
                        path = %requested.display(),
                        code = error.code(),
                        "run refused: workspace.localPath"
                    );
                })?;
            plan.workspace = Some(resolved);
        }
        let environment = self.resolve_environment(company_id, environment_id).await?;
        let config = self.runnable_config(&environment).await?;

        let store = &self.context().store;
        let now = Timestamp::now();
        let run = Run {
            id: RunId::new(),
            company_id,
            environment_id: environment.id,
            lease_id: None,
            status: RunStatus::Queued,
            command: plan.exec.argv.clone(),
            exit_code: None,
            signal: None,
            error: None,
            owner_node: self.node_id().to_owned(),
            created_at: now,
            started_at: None,
            finished_at: None,
            heartbeat_at: now,
            cancel_requested: false,
        };
        store.insert_run(&run).await?;
        let events = EventWriter::new(store.clone(), run.id);
        events.record(EventData::Status(RunStatus::Queued)).await;
        tracing::info!(run.id = %run.id, env.id = %environment.id, "run accepted");
        let accepted = run.clone();
        self.start(run, environment, config, plan, events);
        Ok(accepted)
    }

    /// The bridge's variable names (the default ones, plus the policy's own, e.g. `PAPERCLIP_API_KEY`).
    fn reserved_env_names(&self) -> Vec<String> {
        let mut names: Vec<String> = RESERVED_ENV.iter().map(|name| (*name).to_owned()).collect();
        if let Some(settings) = self.bridge() {
            let policy_names = &settings.policy.env;
            names.extend([policy_names.url.clone(), policy_names.token.clone()]);
            names.extend(policy_names.run_id.clone());
        }
        names
    }

    /// The given environment (of this company, active), else the company's Local one — if the company may have one
    /// (`--local-environments`).
    async fn resolve_environment(
        &self,
        company_id: CompanyId,
        environment_id: Option<String>,
    ) -> Result<Environment, AcceptError> {
        let store = &self.context().store;
        let environment = match environment_id {
            None if !self.host().may_use_local(company_id) => {
                return Err(HostPolicyError::NoLocalEnvironment.into());
            }
            None => store.ensure_local_environment(company_id).await?,
            Some(id) => {
                let not_found = || {
                    AcceptError::Invalid(ValidationErrors::single(
                        "environmentId",
                        "no such environment in this company",
                    ))
                };
                let id: EnvironmentId = id.parse().map_err(|_| not_found())?;
                let environment = store.get_environment(id).await?.ok_or_else(not_found)?;
                if environment.company_id != company_id {
                    return Err(not_found());
                }
                environment
            }
        };
        // A Local environment kept from a time when every company had one does not outlive the policy.
        if environment.driver == Driver::Local {
            self.host().check_local(company_id)?;
        }
        if environment.status == EnvironmentStatus::Archived {
            return Err(AcceptError::EnvironmentArchived);
        }
        Ok(environment)
    }

    /// The environment's config with its secrets open, if its driver (and provider) can run commands in this build.
    /// Decrypted for the run's lifetime only (the driver connects with them); never stored, zeroized on drop.
    async fn runnable_config(
        &self,
        environment: &Environment,
    ) -> Result<ResolvedConfig, AcceptError> {
        let context = self.context();
        let config = vault::open_config(
            &context.store,
            &context.cipher,
            context.drivers.providers(),
            environment,
        )
        .await?;
        let capabilities = context.drivers.capabilities();
        let driver_runs = capabilities
            .drivers
            .get(&environment.driver)
            .is_some_and(|driver| driver.supports_run_execution);
        let provider_runs = match config.as_config() {
            DriverConfig::Sandbox(sandbox) => capabilities
                .sandbox_providers
                .get(&sandbox.provider)
                .is_some_and(|provider| provider.supports_run_execution),
            _ => true,
        };
        if !driver_runs || !provider_runs {
            return Err(AcceptError::DriverUnsupported {
                driver: environment.driver,
            });
        }
        Ok(config)
    }
}

/// Checks the request field by field, reporting every problem. `workspace_local_path` is checked for its form here;
/// whether the caller may use it is [`HostPolicy::confine_workspace`](crate::host_policy::HostPolicy)'s call.
fn validate(
    request: AcceptRun,
    reserved: &[String],
) -> Result<(RunPlan, Option<String>), AcceptError> {
    let mut errors = ValidationErrors::new();
    if request.command.is_empty() || request.command[0].is_empty() {
        errors.push(
            "command",
            "must name a program: a non-empty array whose first entry is not empty",
        );
    }
    for (index, argument) in request.command.iter().enumerate() {
        if let Err(message) = check_no_nul(argument) {
            errors.push(format!("command.{index}"), message);
        }
    }
    let env = request.env;
    for (name, value) in &env {
        let path = format!("env.{}", name.escape_debug());
        if let Err(message) = check_env_name(name) {
            errors.push(path.clone(), message);
        } else if reserved.iter().any(|reserved| reserved == name) {
            errors.push(
                path.clone(),
                "is set by the callback bridge and cannot be given",
            );
        }
        if let Err(message) = check_no_nul(value) {
            errors.push(path, format!("value {message}"));
        }
    }
    let cwd = request.cwd.filter(|cwd| !cwd.is_empty());
    if let Some(cwd) = &cwd {
        // NUL cannot reach the process at all, and other control characters in a directory name are never what a
        // caller meant (and would garble logs): both are refused with their own message.
        if cwd.chars().any(char::is_control) {
            errors.push("cwd", "must not contain control characters");
        } else if cwd.starts_with('/') || cwd.split('/').any(|segment| segment == "..") {
            errors.push(
                "cwd",
                "must be a path inside the workspace: relative, without '..'",
            );
        }
    }
    let timeout = match request.timeout_ms {
        Some(ms) if !(1..=MAX_TIMEOUT_MS).contains(&ms) => {
            errors.push(
                "timeoutMs",
                format!("must be between 1 and {MAX_TIMEOUT_MS}"),
            );
            None
        }
        other => other.map(Duration::from_millis),
    };
    let workspace = request.workspace_local_path.and_then(|local_path| {
        let path = PathBuf::from(&local_path);
        if !path.is_absolute()
            || local_path.split('/').any(|segment| segment == "..")
            || local_path.contains('\0')
        {
            errors.push(
                "workspace.localPath",
                "must be an absolute path without '..'",
            );
            None
        } else {
            Some(path)
        }
    });
    let lease_policy = request.lease_policy.as_deref().and_then(|text| {
        text.parse::<LeasePolicy>()
            .map_err(|error| errors.push("leasePolicy", error.to_string()))
            .ok()
    });
    errors.into_result(()).map_err(AcceptError::Invalid)?;
    let exec = ExecRequest {
        argv: request.command,
        env,
        cwd,
        stdin: request.stdin.map(String::into_bytes),
        timeout,
    };
    let bridge = request.bridge.unwrap_or(true);
    Ok((
        RunPlan {
            exec,
            workspace,
            lease_policy,
            bridge,
        },
        request.environment_id,
    ))
}
