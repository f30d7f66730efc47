//! The `berth` command line: `serve`, and client subcommands that talk to a running server (API.md §1).

mod activity;
mod companies;
mod env;
mod leases;
mod output;
mod runs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use self::companies::{CompanyCommand, KeyCommand};
use self::env::EnvCommand;
use self::leases::LeaseCommand;
use self::output::{cell, print_json};
use self::runs::RunsCommand;
use crate::client::{ClientArgs, Session};
use crate::data_dir::default_data_dir;
use crate::host_policy::LocalEnvironments;
use crate::serve::ServeOptions;
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "berth: where AI-agent work runs",
    propagate_version = true
)]
pub struct Cli {
    /// Log line format (logs go to stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty, env = "BERTH_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the berth server.
    Serve(ServeArgs),
    /// Manage environments.
    #[command(subcommand)]
    Env(EnvCommand),
    /// Run a command in an environment and stream its output; exits with the command's exit code (124 on
    /// timeout, 125 when berth failed before the command ran, 255 when berth lost the run after starting it).
    Run(crate::run_command::RunArgs),
    /// Runs: list, show, print or follow their output, cancel.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Inspect leases.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Companies: list and create them (admin), show and update one (its keys; updates need a manager key).
    #[command(subcommand)]
    Company(CompanyCommand),
    /// A company's API keys (admin).
    #[command(subcommand)]
    Key(KeyCommand),
    /// The company's activity log: who created, changed, probed or deleted what, and when.
    Activity(activity::ActivityArgs),
    /// Local fixtures for trying drivers: `berth lab ssh up | status | down`.
    #[command(subcommand)]
    Lab(crate::lab::LabCommand),
    /// Provider plugins: check one before installing it, list the installed ones.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Start the plugin in DIR and drive protocol v1 through every step berth uses, one line per check (PASS, FAIL,
    /// SKIP); exits 1 when any check failed.
    Check(crate::plugin_check::CheckArgs),
    /// The installed plugins' providers and drivers as the server sees them: plugin, status and why.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `--isolation-tier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IsolationTier {
    Auto,
    Namespaces,
    Landlock,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "BERTH_LISTEN", default_value = "127.0.0.1:7420")]
    pub listen: String,
    /// Where berth keeps its database, keys and workspaces [default: $XDG_DATA_HOME/berth or ~/.local/share/berth].
    #[arg(long, env = "BERTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `sqlite://PATH` or `postgres://…` [default: sqlite://<data-dir>/berth.db].
    #[arg(long, env = "BERTH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the callback bridge forwards agent requests [default: this server]. Set it to front another control
    /// plane; BERTH_BRIDGE_UPSTREAM_TOKEN is then the credential berth presents there.
    #[arg(long, env = "BERTH_BRIDGE_UPSTREAM")]
    pub bridge_upstream: Option<String>,
    /// The bridge policy: a JSON file, or a built-in profile (`default`, `paperclip`).
    #[arg(long, env = "BERTH_BRIDGE_POLICY")]
    pub bridge_policy: Option<String>,
    /// A directory that company API keys may name (or name directories inside of) as a run's workspace.localPath:
    /// DIR for every company, COMPANY_ID=DIR for one. Repeatable; a value (and BERTH_WORKSPACE_ROOTS) may list
    /// several, separated by `:`. Without one, company keys cannot use workspace.localPath; the admin token may
    /// name any directory. Nobody may name berth's data dir (or its database's or sandboxes' directories).
    #[arg(
        long = "workspace-root",
        env = "BERTH_WORKSPACE_ROOTS",
        value_name = "[COMPANY_ID=]DIR",
        value_delimiter = ':'
    )]
    pub workspace_roots: Vec<String>,
    /// Which companies get a Local environment (runs on this host): only the `default` company, or all.
    #[arg(
        long,
        env = "BERTH_LOCAL_ENVIRONMENTS",
        value_enum,
        default_value_t = LocalEnvironments::DefaultCompany
    )]
    pub local_environments: LocalEnvironments,
    /// Run Local and fake-provider commands without containment (own PID namespace, berth's data dir hidden, no
    /// capabilities) when this host cannot provide it, instead of refusing them. Such commands can read the admin
    /// token and master key: only for a single-user machine you trust every run on.
    #[arg(long, env = "BERTH_ALLOW_UNCONTAINED_LOCAL")]
    pub allow_uncontained_local: bool,
    /// How the `isolated` sandbox provider builds sandboxes: `namespaces` (bubblewrap, with Landlock as a second
    /// layer), `landlock` (Landlock as the boundary, for hosts such as containers that refuse namespaces; needs
    /// Landlock ABI 6), or `auto`: namespaces where the host allows them, else Landlock.
    #[arg(long, env = "BERTH_ISOLATION_TIER", value_enum, default_value_t = IsolationTier::Auto)]
    pub isolation_tier: IsolationTier,
    /// A provider plugin's directory, holding its `berth-plugin.json` (repeatable; PLUGINS.md). Every
    /// `<data-dir>/plugins/*/` is loaded too.
    #[arg(
        long = "plugin-dir",
        env = "BERTH_PLUGIN_DIRS",
        value_name = "DIR",
        value_delimiter = ':'
    )]
    pub plugin_dirs: Vec<PathBuf>,
    /// The first delay before a crashed plugin is restarted (doubling from there, at most 5 min). For tests.
    #[arg(long, hide = true, default_value_t = 1000)]
    pub plugin_restart_initial_ms: u64,
    /// The longest delay before a crashed plugin is restarted. For tests.
    #[arg(long, hide = true, default_value_t = 300_000)]
    pub plugin_restart_max_ms: u64,
    /// How long a plugin call (other than probe and execute) may take. For tests.
    #[arg(long, hide = true, default_value_t = 30_000)]
    pub plugin_call_deadline_ms: u64,
    /// How long past its timeout a plugin execute may take. For tests.
    #[arg(long, hide = true, default_value_t = 30_000)]
    pub plugin_execute_grace_ms: u64,
    /// How long a started plugin may take to answer `initialize`. For tests.
    #[arg(long, hide = true, default_value_t = 15_000)]
    pub plugin_initialize_deadline_ms: u64,
    /// How long an API client may take to send a request head, and may stay idle between requests. For tests.
    #[arg(long, hide = true, default_value_t = 10_000)]
    pub http_header_read_timeout_ms: u64,
    /// API connections served at once; past it, a connection is answered 503 `too_many_connections`.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,
    /// The timeout of a run that gives none (`timeoutMs`) in an environment whose config names none: a whole
    /// number with ms, s, m or h (bare: seconds), 1ms to 24h. A run that reaches it is `timed_out`. Default: none.
    #[arg(
        long,
        env = "BERTH_DEFAULT_RUN_TIMEOUT",
        value_name = "DURATION",
        value_parser = crate::runs::accept::parse_run_timeout
    )]
    pub default_run_timeout: Option<std::time::Duration>,
    /// Serve `GET /metrics` without a token. By default it needs the admin token; use this only where the API
    /// port is reachable by nothing but your Prometheus (or a proxy in front restricts `/metrics`).
    #[arg(long)]
    pub metrics_public: bool,
}

impl Cli {
    /// Whether this command runs the server (which wants a multi-threaded runtime) rather than a short client call.
    pub fn is_server(&self) -> bool {
        matches!(self.command, Command::Serve(_))
    }

    /// The log filter when `BERTH_LOG` is unset: the server narrates, client commands stay quiet.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Serve(_) => "info",
            // Its report says what went wrong; the supervisor's warnings about the plugin going down and being
            // restarted (which the check provokes) would only repeat it. BERTH_LOG=info shows the plugin's own log.
            Command::Plugin(PluginCommand::Check(_)) => "error",
            _ => "warn",
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Env(command) => env::run(command).await,
        Command::Runs(command) => runs::run(command).await,
        Command::Lease(command) => leases::run(command).await,
        Command::Company(command) => companies::company(command).await,
        Command::Key(command) => companies::key(command).await,
        Command::Activity(args) => activity::run(args).await,
        Command::Run(args) => crate::run_command::run(args).await,
        Command::Lab(command) => crate::lab::run(command).await,
        Command::Plugin(PluginCommand::Check(args)) => crate::plugin_check::run(args).await,
        Command::Plugin(PluginCommand::List { client }) => plugin_list(client).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let options = ServeOptions {
        listen: args.listen,
        data_dir: match args.data_dir {
            Some(dir) => dir,
            None => default_data_dir()?,
        },
        database_url: args.database_url,
        admin_token: secret_env("BERTH_ADMIN_TOKEN"),
        master_key: secret_env("BERTH_MASTER_KEY"),
        bridge_upstream: args.bridge_upstream,
        bridge_policy: args.bridge_policy,
        bridge_upstream_token: secret_env("BERTH_BRIDGE_UPSTREAM_TOKEN"),
        workspace_roots: args.workspace_roots,
        local_environments: args.local_environments,
        allow_uncontained_local: args.allow_uncontained_local,
        plugin_dirs: args.plugin_dirs,
        plugin_restart_initial: std::time::Duration::from_millis(
            args.plugin_restart_initial_ms.max(1),
        ),
        plugin_restart_max: std::time::Duration::from_millis(args.plugin_restart_max_ms.max(1)),
        plugin_deadlines: berth_plugins::supervisor::Deadlines {
            call: std::time::Duration::from_millis(args.plugin_call_deadline_ms.max(1)),
            execute_grace: std::time::Duration::from_millis(args.plugin_execute_grace_ms.max(1)),
            initialize: std::time::Duration::from_millis(args.plugin_initialize_deadline_ms.max(1)),
            ..berth_plugins::supervisor::Deadlines::default()
        },
        isolation_tier: match args.isolation_tier {
            IsolationTier::Auto => berth_drivers::isolated::TierChoice::Auto,
            IsolationTier::Namespaces => berth_drivers::isolated::TierChoice::Namespaces,
            IsolationTier::Landlock => berth_drivers::isolated::TierChoice::Landlock,
        },
        connections: berth_listen::Limits {
            header_read_timeout: std::time::Duration::from_millis(
                args.http_header_read_timeout_ms.max(1),
            ),
            max_connections: args.max_connections.max(1),
            ..berth_listen::Limits::default()
        },
        metrics_public: args.metrics_public,
        default_run_timeout: args.default_run_timeout,
        sweep_interval: std::env::var("BERTH_SWEEP_INTERVAL_MS")
            .ok()
            .and_then(|value| value.parse::<u64>().ok())
            .filter(|millis| *millis > 0)
            .map(std::time::Duration::from_millis),
    };
    crate::serve::serve(options, crate::serve::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

fn secret_env(name: &str) -> Option<Zeroizing<String>> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
        .map(Zeroizing::new)
}

/// `berth plugin list`: the capabilities' sandbox providers and environment drivers whose `source` is `plugin`, and
/// the plugins that could not be loaded (the API has no plugin route of its own).
async fn plugin_list(client: ClientArgs) -> anyhow::Result<ExitCode> {
    let session = Session::open(client).await?;
    let capabilities = session
        .api
        .get(&format!(
            "/api/companies/{}/environments/capabilities",
            session.company_id
        ))
        .await?;
    let plugin_driver = &capabilities["drivers"]["plugin"];
    let mut plugins = Vec::new();
    for (entries, kind) in [
        (&capabilities["sandboxProviders"], "sandbox_provider"),
        (&plugin_driver["environmentDrivers"], "environment_driver"),
    ] {
        for (key, entry) in entries.as_object().into_iter().flatten() {
            if entry["source"] != "plugin" {
                continue;
            }
            plugins.push(json!({
                "pluginKey": entry["pluginKey"],
                "driverKey": key,
                "kind": kind,
                "status": entry["status"],
                "reason": entry.get("reason").cloned().unwrap_or(Value::Null),
                "displayName": entry["displayName"],
            }));
        }
    }
    let problems = plugin_driver["problems"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if session.json {
        print_json(&json!({"plugins": plugins, "problems": problems}));
    } else {
        output::print_table(
            &Value::Array(plugins),
            &[
                ("PLUGIN", "pluginKey"),
                ("DRIVER", "driverKey"),
                ("KIND", "kind"),
                ("STATUS", "status"),
                ("REASON", "reason"),
            ],
        );
        for problem in &problems {
            println!("not loaded: {}", cell(problem));
        }
    }
    Ok(ExitCode::SUCCESS)
}
