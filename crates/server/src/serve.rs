//! `berth serve`: start-up, the accept loop and graceful shutdown (API.md §1).

use std::fs;
use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use berth_core::company::DEFAULT_COMPANY_NAME;
use std::sync::Arc;

use berth_drivers::contain::{Containment, Hidden};
use berth_drivers::local::LocalDriver;
use berth_drivers::registry::{DriverRegistry, ProviderRegistry};
use berth_fake_provider::FakeProvider;
use berth_isolation::probe::HostSupport;
use berth_plugins::PluginHost;
use berth_plugins::supervisor::{Deadlines, HostSettings, RestartPolicy};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use zeroize::Zeroizing;

use berth_bridge::policy::BridgePolicy;
use berth_bridge::signing::BridgeSecrets;

use crate::bridge::BridgeSettings;
use crate::host_policy::{HostPolicy, LocalEnvironments, RootError};
use crate::private_file::{IfExists, write_private};
use crate::runs::RunManager;
use crate::runs::manager::DEFAULT_SWEEP_INTERVAL;
use crate::secrets::{SecretCipher, SecretsError};
use crate::state::AppState;
use berth_store::{Store, StoreError};

/// How long in-flight requests get to finish after SIGINT/SIGTERM (idle connections are closed at once); the
/// contract allows 10 s in all.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// Name of the admin token file in the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// Name of the file holding this node's id: stable across restarts, so a restarted node knows its earlier runs died.
pub const NODE_ID_FILE: &str = "node-id";
/// How long live runs get to cancel and release their leases at shutdown, within the contract's 10 s.
const RUN_SHUTDOWN_GRACE: Duration = Duration::from_secs(6);
/// How long plugins get to shut down after the runs (their processes are killed after that).
const PLUGIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct ServeOptions {
    pub listen: String,
    pub data_dir: PathBuf,
    /// Defaults to `sqlite://<data-dir>/berth.db`.
    pub database_url: Option<String>,
    /// `BERTH_ADMIN_TOKEN`: when set, no token file is written.
    pub admin_token: Option<Zeroizing<String>>,
    /// `BERTH_MASTER_KEY`: when set, no master key file is written.
    pub master_key: Option<Zeroizing<String>>,
    /// `BERTH_SWEEP_INTERVAL_MS`: how often orphaned runs and leases and expired leases are swept.
    pub sweep_interval: Option<Duration>,
    /// `--bridge-upstream`: where bridged agent requests go [default: this server].
    pub bridge_upstream: Option<String>,
    /// `--bridge-policy`: a policy file (JSON), or a built-in profile name (`default`, `paperclip`).
    pub bridge_policy: Option<String>,
    /// `BERTH_BRIDGE_UPSTREAM_TOKEN`: the credential presented to a foreign upstream.
    pub bridge_upstream_token: Option<Zeroizing<String>>,
    /// `--workspace-root` / `BERTH_WORKSPACE_ROOTS`: `DIR` or `COMPANY_ID=DIR` entries (empty ones are skipped).
    pub workspace_roots: Vec<String>,
    /// `--local-environments`: which companies get a Local environment.
    pub local_environments: LocalEnvironments,
    /// `--allow-uncontained-local`: run Local and fake-provider commands without containment when the host cannot
    /// contain them (or at all).
    pub allow_uncontained_local: bool,
    /// `--isolation-tier`: how the `isolated` provider builds sandboxes.
    pub isolation_tier: berth_drivers::isolated::TierChoice,
    /// `--plugin-dir` / `BERTH_PLUGIN_DIRS`: plugin directories beyond `<data-dir>/plugins/*`.
    pub plugin_dirs: Vec<PathBuf>,
    /// How soon a crashed plugin is first restarted, and the longest wait between restarts.
    pub plugin_restart_initial: Duration,
    pub plugin_restart_max: Duration,
    /// How long plugin calls may take.
    pub plugin_deadlines: Deadlines,
    /// The API listener's connection limits: header-read timeout, connection bound, lingering close.
    pub connections: berth_listen::Limits,
    /// `--metrics-public`: serve `GET /metrics` without the admin token.
    pub metrics_public: bool,
    /// `--default-run-timeout` / `BERTH_DEFAULT_RUN_TIMEOUT`: the timeout of runs that give none, in environments
    /// whose config names none.
    pub default_run_timeout: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot prepare the data dir {path}")]
    DataDir { path: PathBuf, source: io::Error },
    #[error("cannot read or write the admin token at {path}")]
    AdminToken { path: PathBuf, source: io::Error },
    #[error("the admin token must not be empty")]
    EmptyAdminToken,
    #[error("cannot load the master key")]
    Secrets(#[from] SecretsError),
    #[error("cannot open the database")]
    Store(#[from] StoreError),
    #[error("cannot listen on {address}")]
    Bind { address: String, source: io::Error },
    #[error("the server failed")]
    Serve(#[source] io::Error),
    #[error("cannot set up the sandbox providers")]
    Providers(#[from] berth_drivers::DriverError),
    #[error("cannot read or write the node id at {path}")]
    NodeId { path: PathBuf, source: io::Error },
    #[error("invalid bridge policy {source_name}")]
    BridgePolicy {
        source_name: String,
        source: berth_bridge::BridgeError,
    },
    #[error("cannot read the bridge policy {path}")]
    BridgePolicyFile { path: PathBuf, source: io::Error },
    #[error("--bridge-upstream must be an http:// URL, not `{0}`")]
    BridgeUpstream(String),
    #[error("cannot set up the callback bridge")]
    Bridge(#[from] berth_bridge::BridgeError),
    #[error(transparent)]
    WorkspaceRoot(#[from] RootError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// Starts berth and serves until `shutdown` resolves, then drains for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let state = prepare(&options).await?;
    let listener = TcpListener::bind(&options.listen)
        .await
        .map_err(|source| ServeError::Bind {
            address: options.listen.clone(),
            source,
        })?;
    let address = listener.local_addr().map_err(ServeError::Serve)?;
    if let Some(bridge) = state.bridge() {
        // Without --bridge-upstream, bridged requests come back to this server, on an address the runs can reach.
        let _ = bridge.upstream.set(own_url(address));
    }
    announce(address).map_err(ServeError::Serve)?;
    tracing::info!(%address, backend = ?state.store().backend(), "berth listening");

    let store = state.store().clone();
    let runs = state.runs().clone();
    let plugins = state.plugins().clone();
    runs.spawn_background();
    let metrics_upkeep = state.metrics().spawn_upkeep();
    let router = crate::api::router(state);
    let http = berth_listen::Listener::tcp(listener, options.connections.clone(), move |_| {
        TowerToHyperService::new(router.clone())
    })
    .map_err(ServeError::Serve)?;
    shutdown.await;
    tracing::info!("shutting down");
    // Stop accepting and close idle connections now; requests in flight get the grace period, in parallel with
    // cancelling live runs: each kills its process tree and releases its lease while the database is still open.
    let draining = tokio::spawn(http.shutdown(SHUTDOWN_GRACE));
    runs.shutdown(RUN_SHUTDOWN_GRACE).await;
    plugins.shutdown(PLUGIN_SHUTDOWN_GRACE).await;
    match draining.await {
        Ok(0) => {}
        Ok(dropped) => {
            tracing::warn!(
                connections = dropped,
                "requests still in flight after the grace period; closed them"
            );
        }
        Err(error) => tracing::warn!(%error, "the API listener failed while draining"),
    }
    metrics_upkeep.abort();
    store.close().await;
    Ok(())
}

/// How Local and fake-provider commands are contained: berth's data dir, the fake provider's root, a SQLite
/// database kept elsewhere, and every granted workspace root (other companies' files) are out of their sight; each
/// command gets its own workspace back.
fn host_containment(
    options: &ServeOptions,
    database_url: &str,
    host: &HostPolicy,
    support: &HostSupport,
) -> Containment {
    let mut hidden = Hidden {
        dirs: vec![options.data_dir.clone(), FakeProvider::default_root()],
        files: Vec::new(),
    };
    hidden
        .dirs
        .extend(host.workspace_roots().map(Path::to_path_buf));
    if let Some(path) = database_url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        for suffix in ["", "-wal", "-shm"] {
            hidden.files.push(PathBuf::from(format!("{path}{suffix}")));
        }
        hidden.dirs.push(PathBuf::from(format!("{path}-output")));
    }
    // Uncontained commands each get a cgroup (joined through berth's own binary) where the host allows it.
    let containment = Containment::new(support, hidden, options.allow_uncontained_local)
        .track_processes(init_program());
    if options.allow_uncontained_local {
        tracing::warn!(
            "--allow-uncontained-local: Local and fake-provider commands run as the server's user and can read its \
             data dir and see its processes"
        );
    } else if let Some(refusal) = containment.refusal() {
        tracing::warn!(reason = %refusal, "Local and fake-provider runs will be refused");
    }
    containment
}

/// berth's own binary, which the isolated provider mounts into each sandbox as its init.
fn init_program() -> PathBuf {
    std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}

/// Everything before accepting connections: data dir, keys, database, the default company.
pub async fn prepare(options: &ServeOptions) -> Result<AppState, ServeError> {
    create_private_dir(&options.data_dir)?;
    let cipher = Arc::new(SecretCipher::load_or_create(
        &options.data_dir,
        options.master_key.as_deref().map(String::as_str),
    )?);
    let database_url = match &options.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", options.data_dir.join("berth.db").display()),
    };
    let store = Store::connect(&database_url).await?;
    let company = store.ensure_company(DEFAULT_COMPANY_NAME).await?;
    // The operator's own company always has its Local environment; others per `--local-environments`.
    store.ensure_local_environment(company.id).await?;
    let host = host_policy(options, &store, company.id).await?;
    let admin_token = load_or_create_admin_token(&options.data_dir, options.admin_token.as_ref())?;
    // Read once: which isolation mechanisms this host has (bubblewrap, user namespaces, cgroups, Landlock).
    let support = HostSupport::detect();
    let containment = host_containment(options, &database_url, &host, &support);
    let mut providers = ProviderRegistry::new();
    berth_fake_provider::register_builtin(&mut providers, containment.clone())?;
    berth_drivers::isolated::register_builtin(
        &mut providers,
        options.data_dir.join("isolated"),
        init_program(),
        options.isolation_tier,
        support,
    )?;
    let plugins = Arc::new(start_plugins(options, &mut providers));
    let metrics = crate::metrics::Metrics::install(providers.keys(), options.metrics_public)?;
    let local = LocalDriver::new(options.data_dir.join("workspaces"), containment);
    let drivers = Arc::new(DriverRegistry::new(local, Arc::new(providers)));
    let node_id = load_or_create_node_id(&options.data_dir)?;
    let bridge = Arc::new(bridge_settings(options, &cipher)?);
    let runs = RunManager::new(
        store.clone(),
        drivers.clone(),
        cipher.clone(),
        Some(bridge),
        host,
        node_id,
        options.sweep_interval.unwrap_or(DEFAULT_SWEEP_INTERVAL),
    );
    if let Some(timeout) = options.default_run_timeout {
        runs.set_default_run_timeout(timeout);
    }
    // Leases made by plugins are cleaned up through them: give them a moment to come up first. One that takes
    // longer is cleaned up by the periodic sweep once it is ready.
    futures::future::join_all(
        plugins
            .plugins()
            .iter()
            .map(|plugin| plugin.settle(PLUGIN_SETTLE)),
    )
    .await;
    runs.startup_sweep().await;
    Ok(AppState::new(
        store,
        cipher,
        &admin_token,
        drivers,
        plugins,
        runs,
        metrics,
    ))
}

/// How long start-up waits for plugins before the first sweep.
const PLUGIN_SETTLE: Duration = Duration::from_secs(5);

/// Starts every installed plugin (`<data-dir>/plugins/*`, then `--plugin-dir`s) and registers their sandbox
/// providers. A plugin that cannot be loaded is logged and skipped: it never stops the server.
fn start_plugins(options: &ServeOptions, providers: &mut ProviderRegistry) -> PluginHost {
    let dirs = berth_plugins::manifest::plugin_dirs(
        &[options.data_dir.join("plugins")],
        &options.plugin_dirs,
    );
    let settings = HostSettings {
        state_root: options.data_dir.join("plugin-state"),
        restart: RestartPolicy {
            initial_backoff: options.plugin_restart_initial,
            max_backoff: options.plugin_restart_max,
            ..RestartPolicy::default()
        },
        path: std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PLUGIN_PATH.to_owned()),
        host_version: env!("CARGO_PKG_VERSION").to_owned(),
        deadlines: options.plugin_deadlines,
    };
    let host = PluginHost::start(&dirs, &providers.keys(), &settings);
    for problem in host.problems() {
        providers.note_plugin_problem(problem.message.clone());
    }
    for provider in host.sandbox_providers() {
        let registered = provider
            .map_err(|problem| problem.message)
            .and_then(|provider| {
                let plugin_id = provider.plugin().id().to_owned();
                providers
                    .register_plugin(provider, &plugin_id)
                    .map_err(|error| error.to_string())
            });
        if let Err(message) = registered {
            tracing::warn!(%message, "plugin provider skipped");
            providers.note_plugin_problem(message);
        }
    }
    for driver in host.environment_drivers() {
        let registered = driver
            .map_err(|problem| problem.message)
            .and_then(|driver| {
                let plugin_id = driver.plugin().id().to_owned();
                providers
                    .register_plugin_driver(driver, &plugin_id)
                    .map_err(|error| error.to_string())
            });
        if let Err(message) = registered {
            tracing::warn!(%message, "plugin environment driver skipped");
            providers.note_plugin_problem(message);
        }
    }
    host
}

/// The `PATH` plugins get when berth has none.
const DEFAULT_PLUGIN_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The workspace roots (resolved, and refused when missing or overlapping what berth keeps to itself: the data dir,
/// the SQLite database's directory and the fake provider's sandboxes) and the Local environment policy.
async fn host_policy(
    options: &ServeOptions,
    store: &Store,
    default_company: berth_core::ids::CompanyId,
) -> Result<HostPolicy, ServeError> {
    let fake_root = FakeProvider::default_root();
    let mut protected = vec![options.data_dir.as_path(), fake_root.as_path()];
    if let Some(file) = store.database_file() {
        // A bare file name lives in the working directory.
        protected.push(
            file.parent()
                .filter(|dir| !dir.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        );
    }
    let policy = HostPolicy::new(
        &options.workspace_roots,
        &protected,
        options.local_environments,
        default_company,
    )?;
    for company_id in policy.companies_with_roots() {
        if store.get_company(company_id).await?.is_none() {
            tracing::warn!(company.id = %company_id, "a workspace root is granted to a company that does not exist");
        }
    }
    tracing::info!(
        workspace_roots = ?policy.root_summary(),
        local_environments = policy.local_environments().as_str(),
        "host policy"
    );
    Ok(policy)
}

/// The one line tests and scripts wait for, on stdout.
fn announce(address: SocketAddr) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "berth listening on http://{address}")?;
    stdout.flush()
}

/// Creates the data dir with mode 0700, or makes an existing one private: it holds the master key, the admin token
/// and the database, and another user on the host must not list or read it.
fn create_private_dir(path: &Path) -> Result<(), ServeError> {
    let failed = |source| ServeError::DataDir {
        path: path.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(failed)?;
    let mode = fs::metadata(path).map_err(failed)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the data dir was open to other users; made it private (0700)");
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(failed)?;
    }
    Ok(())
}

/// `BERTH_ADMIN_TOKEN` if set; else the token file; else a fresh token written to the file with mode 0600.
fn load_or_create_admin_token(
    data_dir: &Path,
    from_env: Option<&Zeroizing<String>>,
) -> Result<Zeroizing<String>, ServeError> {
    if let Some(token) = from_env {
        let token = token.trim();
        return if token.is_empty() {
            Err(ServeError::EmptyAdminToken)
        } else {
            Ok(Zeroizing::new(token.to_owned()))
        };
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let error = |source| ServeError::AdminToken {
        path: path.clone(),
        source,
    };
    match fs::read_to_string(&path) {
        Ok(contents) => {
            let token = contents.trim();
            if token.is_empty() {
                Err(ServeError::EmptyAdminToken)
            } else {
                Ok(Zeroizing::new(token.to_owned()))
            }
        }
        Err(read_error) if read_error.kind() == io::ErrorKind::NotFound => {
            let token = Zeroizing::new(format!(
                "berth_admin_{}",
                URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
            ));
            // create_new + 0600 from the first byte: the token is never readable by others, and a concurrent start
            // cannot overwrite a token already handed out.
            let line = Zeroizing::new(format!("{}\n", token.as_str()));
            match write_private(&path, line.as_bytes(), IfExists::Fail) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "wrote a new admin token");
                    Ok(token)
                }
                Err(create_error) if create_error.kind() == io::ErrorKind::AlreadyExists => {
                    load_or_create_admin_token(data_dir, None)
                }
                Err(create_error) => Err(error(create_error)),
            }
        }
        Err(read_error) => Err(error(read_error)),
    }
}

/// The bridge's settings: keys derived from the master key (so replicas agree), the policy, and the upstream.
fn bridge_settings(
    options: &ServeOptions,
    cipher: &SecretCipher,
) -> Result<BridgeSettings, ServeError> {
    let secrets = Arc::new(BridgeSecrets::new(cipher.bridge_secret())?);
    let policy = match options.bridge_policy.as_deref() {
        None => BridgePolicy::agent_default(),
        Some(name) => match BridgePolicy::profile(name) {
            Some(profile) => profile,
            None => {
                let path = PathBuf::from(name);
                let text =
                    fs::read_to_string(&path).map_err(|source| ServeError::BridgePolicyFile {
                        path: path.clone(),
                        source,
                    })?;
                BridgePolicy::from_json(&text).map_err(|source| ServeError::BridgePolicy {
                    source_name: path.display().to_string(),
                    source,
                })?
            }
        },
    };
    let upstream = std::sync::OnceLock::new();
    if let Some(url) = &options.bridge_upstream {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| ServeError::BridgeUpstream(url.clone()))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(ServeError::BridgeUpstream(url.clone()));
        }
        let _ = upstream.set(uri);
    }
    tracing::info!(policy = %policy.name, upstream = ?options.bridge_upstream, "callback bridge ready");
    Ok(BridgeSettings {
        secrets,
        policy: Arc::new(policy),
        upstream,
        upstream_token: options
            .bridge_upstream_token
            .as_ref()
            .map(|token| secrecy::SecretString::from(token.as_str().to_owned())),
    })
}

/// This server's own base URL as seen from this host: a wildcard listen address becomes loopback.
fn own_url(address: SocketAddr) -> http::Uri {
    let host = match address.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    format!("http://{host}:{}", address.port())
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("http://127.0.0.1"))
}

/// This node's id from `<data-dir>/node-id`, created on first start.
fn load_or_create_node_id(data_dir: &Path) -> Result<String, ServeError> {
    let path = data_dir.join(NODE_ID_FILE);
    let error = |source| ServeError::NodeId {
        path: path.clone(),
        source,
    };
    match fs::read_to_string(&path) {
        Ok(contents) if !contents.trim().is_empty() => Ok(contents.trim().to_owned()),
        Ok(_) => Err(error(io::Error::new(
            io::ErrorKind::InvalidData,
            "the node id file is empty",
        ))),
        Err(read_error) if read_error.kind() == io::ErrorKind::NotFound => {
            let node_id = uuid::Uuid::new_v4().to_string();
            match write_private(&path, node_id.as_bytes(), IfExists::Fail) {
                Ok(()) => Ok(node_id),
                Err(create_error) if create_error.kind() == io::ErrorKind::AlreadyExists => {
                    load_or_create_node_id(data_dir)
                }
                Err(create_error) => Err(error(create_error)),
            }
        }
        Err(read_error) => Err(error(read_error)),
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the future is first
/// polled: a signal sent right after the `berth listening on` line must not find the default action (exit by signal)
/// still in place.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut interrupt), Ok(mut terminate)) = handlers else {
            tracing::error!("cannot install signal handlers; stop berth with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    }
}
