//! Accepting a run: the request checked field by field, the host's rules applied, the environment chosen (the given
//! one, else the company's default, else its Local one) and its config opened, the timeout settled (the run's, else
//! the environment's `timeoutMs`, else the server's default), the run stored as `queued` with its first event in one
//! transaction, and its execution started on this node.
//!
//! Everything that can refuse a run refuses it here, before it is stored: once [`RunManager::accept`] returns a run,
//! every later failure is that run's status and events.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use berth_core::ErrorKind;
use berth_core::config::{DriverConfig, MAX_TIMEOUT_MS};
use berth_core::driver::ExecRequest;
use berth_core::environment::{Driver, Environment, EnvironmentStatus};
use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::lease::LeasePolicy;
use berth_core::run::{NewRunEvent, Run, RunStatus, check_env_name, check_no_nul};
use berth_core::time::Timestamp;
use berth_core::validation::ValidationErrors;
use berth_store::StoreError;

use super::event_data::EventData;
use super::events::EventWriter;
use super::executor::RunPlan;
use super::manager::RunManager;
use crate::host_policy::{HostPolicyError, WorkspaceCaller};
use crate::vault::{self, ResolvedConfig, VaultError};

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
    /// `None`: the company's default environment, else its Local one (if it may have one).
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
    /// Checks a run request, stores the run (`queued`, with its first event, in one transaction) and starts executing
    /// it on this node.
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
        let (timeout, timeout_from) = self.effective_timeout(plan.exec.timeout, config.as_config());
        plan.exec.timeout = timeout;

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
        // The run and its `queued` event together: a crash between two writes would leave a run whose log does not
        // start like every run's (the orphan sweep still adds a missing `queued`, for databases written before).
        let queued = EventData::Status(RunStatus::Queued);
        let first = NewRunEvent {
            at: now,
            kind: queued.kind(),
            data: queued.into_value(),
        };
        store.insert_run_with_events(&run, vec![first]).await?;
        crate::metrics::run_accepted(environment.driver);
        let events = EventWriter::new(store.clone(), run.id);
        tracing::info!(
            run.id = %run.id,
            env.id = %environment.id,
            timeout_ms = timeout.map(|timeout| u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
            timeout_from,
            "run accepted"
        );
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

    /// The timeout a run gets, and where it comes from (for the log): its own, else its environment's `timeoutMs`,
    /// else the server's `--default-run-timeout`, else none.
    fn effective_timeout(
        &self,
        requested: Option<Duration>,
        config: &DriverConfig,
    ) -> (Option<Duration>, &'static str) {
        if let Some(timeout) = requested {
            return (Some(timeout), "run");
        }
        if let Some(ms) = config.timeout_ms() {
            return (Some(Duration::from_millis(ms)), "environment");
        }
        match self.default_run_timeout() {
            Some(timeout) => (Some(timeout), "server"),
            None => (None, "none"),
        }
    }

    /// The given environment (of this company, active), else the company's default environment, else its Local
    /// one — if the company may have one (`--local-environments`).
    async fn resolve_environment(
        &self,
        company_id: CompanyId,
        environment_id: Option<String>,
    ) -> Result<Environment, AcceptError> {
        let store = &self.context().store;
        let environment_id = match environment_id {
            Some(id) => Some(id),
            // Read per run, so a change applies to the next run, on every replica.
            None => store
                .get_company(company_id)
                .await?
                .and_then(|company| company.default_environment_id)
                .map(|id| id.to_string()),
        };
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
        Some(ms) if !(1..=MAX_TIMEOUT_MS.unsigned_abs()).contains(&ms) => {
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

/// Parses a run timeout given on the command line (`berth serve --default-run-timeout`): a whole number with a unit
/// — `ms`, `s`, `m`, `h` — or bare seconds (`90` is `90s`), between 1 ms and one day, like a run's `timeoutMs`.
pub fn parse_run_timeout(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "`{text}` is not a duration: use a whole number with ms, s, m or h (e.g. 30s, 10m, 2h)"
            ));
        }
    };
    let number: u64 = number.parse().map_err(|_| {
        format!(
            "`{text}` is not a duration: use a whole number with ms, s, m or h (e.g. 30s, 10m, 2h)"
        )
    })?;
    let max = MAX_TIMEOUT_MS.unsigned_abs();
    match number.checked_mul(per_unit) {
        Some(ms) if (1..=max).contains(&ms) => Ok(Duration::from_millis(ms)),
        _ => Err(format!(
            "`{text}` is out of range: a run timeout is between 1ms and 24h ({max} ms)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_timeouts_parse_with_units_and_within_bounds() {
        assert_eq!(parse_run_timeout("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_run_timeout("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_run_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_run_timeout("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_run_timeout("24h"), Ok(Duration::from_secs(86_400)));
        for bad in [
            "",
            "0",
            "0s",
            "25h",
            "-5s",
            "1.5s",
            "10 minutes",
            "s",
            "99999999999999999999h",
        ] {
            assert!(parse_run_timeout(bad).is_err(), "{bad:?}");
        }
    }
}
