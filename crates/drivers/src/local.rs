//! The local driver: runs commands on the machine berth runs on.
//!
//! A lease is a run-private directory `<workspace root>/<run id>` (mode 0700), removed at release. A run that names a
//! host directory (`workspace.localPath`) runs in place there instead: nothing is copied, so there is nothing to
//! sync back. Commands go through [`crate::process::run_process_tracked`], with exactly the environment the run asked
//! for (and, uncontained, a cgroup of their own where berth can make one).

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::fs::{blocking, create_private_dir, io_error};
use berth_core::config::DriverConfig;
use berth_core::driver::{
    BoxFuture, CancelSignal, DriverError, EnvironmentDriver, ExecOutcome, ExecRequest, LeaseHandle,
    LeaseRequest, OutputSink, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::ids::RunId;
use berth_core::probe::ProbeResult;
use serde_json::{Map, Value};

use crate::contain::Containment;
use crate::process::{ProcessSpec, command_cwd, run_process_tracked};

/// Lease metadata key: the run-private directory.
pub const WORKSPACE_DIR_KEY: &str = "workspaceDir";
/// Lease metadata key: the host the lease is on.
pub const HOST_KEY: &str = "host";

/// Bytes in a GiB, for human summaries.
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Clone, Debug)]
pub struct LocalDriver {
    workspace_root: PathBuf,
    containment: Containment,
}

/// What a successful local probe found.
#[derive(Debug)]
struct HostFacts {
    hostname: String,
    cwd: PathBuf,
    free_disk_bytes: u64,
}

// === impl LocalDriver ===

impl LocalDriver {
    /// A driver whose run workspaces live under `workspace_root`. Nothing is touched until it is used: the root is
    /// created on demand, so a misconfigured root shows up as a failed probe rather than a server that won't start.
    /// Commands run under `containment` (see [`crate::contain`]).
    pub fn new(workspace_root: impl Into<PathBuf>, containment: Containment) -> Self {
        Self {
            workspace_root: workspace_root.into(),
            containment,
        }
    }

    pub fn workspace_root(&self) -> &Path {
        &self.workspace_root
    }

    /// Checks that runs could execute here: the workspace root exists (it is created if missing) and is writable,
    /// and reports the host name, free disk, OS and architecture. Never errs: failures are `ok: false`.
    async fn probe_host(&self) -> ProbeResult {
        let root = self.workspace_root.clone();
        // Filesystem calls block; keep them off the async workers.
        let facts = tokio::task::spawn_blocking(move || gather_facts(&root)).await;
        match facts {
            Ok(Ok(facts)) => ready(facts),
            Ok(Err(summary)) => {
                tracing::debug!(driver = "local", %summary, "local probe failed");
                ProbeResult::failed(Driver::Local, summary)
            }
            Err(join_error) => {
                tracing::warn!(driver = "local", error = %join_error, "local probe task did not finish");
                ProbeResult::failed(
                    Driver::Local,
                    "the local probe could not finish: its worker task failed",
                )
            }
        }
    }

    /// Creates `<root>/<run id>` for a run.
    async fn create_lease_dir(&self, run_id: RunId) -> Result<PathBuf, DriverError> {
        let root = self.workspace_root.clone();
        blocking("the local driver", move || {
            std::fs::create_dir_all(&root).map_err(io_error(format!(
                "creating the workspace root {}",
                root.display()
            )))?;
            let root = std::fs::canonicalize(&root).map_err(io_error(format!(
                "resolving the workspace root {}",
                root.display()
            )))?;
            let dir = root.join(run_id.to_string());
            create_private_dir(&dir)?;
            Ok(dir)
        })
        .await
    }

    /// The lease's run directory, checked to be `<root>/<run id>`: lease metadata travels through storage, and a
    /// tampered path must never make berth run in, or delete, anything else. `Ok(None)`: the lease names none.
    async fn lease_dir(&self, lease: &LeaseHandle) -> Result<Option<PathBuf>, DriverError> {
        let Some(value) = lease.metadata.get(WORKSPACE_DIR_KEY) else {
            return Ok(None);
        };
        let Some(dir) = value.as_str().map(PathBuf::from) else {
            return Err(DriverError::failed(
                "the lease's workspaceDir is not a path",
            ));
        };
        let root = self.workspace_root.clone();
        let checked = dir.clone();
        let inside = blocking("the local driver", move || {
            // A root that does not exist holds no lease directories.
            match std::fs::canonicalize(&root) {
                Ok(root) => Ok(is_run_dir_of(&root, &checked)),
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(err) => Err(io_error(format!(
                    "resolving the workspace root {}",
                    root.display()
                ))(err)),
            }
        })
        .await?;
        if inside {
            Ok(Some(dir))
        } else {
            tracing::warn!(lease.dir = %dir.display(), "refusing a lease directory outside the workspace root");
            Err(DriverError::failed(format!(
                "the lease's workspace directory {} is not a run directory under the workspace root {}",
                dir.display(),
                self.workspace_root.display()
            )))
        }
    }

    /// Kills what the lease's last command left running, found by its recorded identity wherever it ran: in the
    /// run-private directory or in a user's own `localPath` (where a scan by working directory would also hit the
    /// user's unrelated processes). A command that ended normally is no longer recorded.
    async fn kill_recorded_process(&self, lease: &LeaseHandle) -> Result<(), DriverError> {
        let Some(identity) = lease.process.clone() else {
            return Ok(());
        };
        blocking("the local driver", move || {
            crate::process::kill_recorded(&identity)
                .map(|_| ())
                .map_err(io_error(format!(
                    "killing what the run's process group {} left running",
                    identity.pgid
                )))
        })
        .await
    }

    async fn remove_lease_dir(
        &self,
        lease: &LeaseHandle,
        kill_leftovers: bool,
    ) -> Result<(), DriverError> {
        let Some(dir) = self.lease_dir(lease).await? else {
            tracing::debug!("local lease has no workspace directory; nothing to remove");
            return Ok(());
        };
        blocking("the local driver", move || {
            // Destroy is for workspaces nobody runs in any more (orphans, expiry): processes a crashed berth left
            // there go with it. A run's own release needs no scan, its process tree is already gone. Only this
            // directory, which berth made for the run, is scanned: never a user's `localPath`.
            if kill_leftovers {
                crate::process::kill_processes_in(&dir);
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::debug!(lease.dir = %dir.display(), "local lease directory removed");
                    Ok(())
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(io_error(format!("removing {}", dir.display()))(err)),
            }
        })
        .await
    }
}

impl EnvironmentDriver for LocalDriver {
    fn driver(&self) -> Driver {
        Driver::Local
    }

    fn probe<'a>(&'a self, config: &'a DriverConfig) -> BoxFuture<'a, ProbeResult> {
        Box::pin(async move {
            match config {
                DriverConfig::Local(_) => {
                    let mut result = self.probe_host().await;
                    result
                        .details
                        .insert("containment".to_owned(), self.containment.describe());
                    result.details.insert(
                        "processTracking".to_owned(),
                        self.containment.process_tracking().into(),
                    );
                    if let Some(refusal) = self.containment.refusal() {
                        result.ok = false;
                        result.summary = refusal.to_string();
                    }
                    result
                }
                other => ProbeResult::failed(
                    Driver::Local,
                    format!("the local driver cannot probe a {} config", other.driver()),
                ),
            }
        })
    }

    fn acquire<'a>(
        &'a self,
        config: &'a DriverConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        Box::pin(async move {
            if !matches!(config, DriverConfig::Local(_)) {
                return Err(DriverError::failed(format!(
                    "the local driver cannot take a lease for a {} config",
                    config.driver()
                )));
            }
            let dir = self.create_lease_dir(request.run_id).await?;
            let Some(dir_text) = dir.to_str().map(str::to_owned) else {
                return Err(DriverError::failed(format!(
                    "the workspace root {} is not a UTF-8 path",
                    self.workspace_root.display()
                )));
            };
            tracing::debug!(run.id = %request.run_id, lease.dir = %dir_text, "local lease acquired");
            let mut metadata = Map::new();
            metadata.insert(HOST_KEY.to_owned(), hostname().into());
            metadata.insert(WORKSPACE_DIR_KEY.to_owned(), dir_text.into());
            Ok(LeaseHandle {
                provider: None,
                provider_lease_id: None,
                metadata,
                expires_at: None,
                process: None,
            })
        })
    }

    /// Local leases are never reused: each run gets its own directory.
    fn matches_reusable_lease(&self, _config: &DriverConfig, _lease: &LeaseHandle) -> bool {
        false
    }

    fn resume<'a>(
        &'a self,
        _config: &'a DriverConfig,
        _lease: &'a LeaseHandle,
        _request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async { Ok(None) })
    }

    /// Kills what the lease's recorded command left running, then removes the run directory unless `keep` (kept
    /// for inspection; a later [`destroy`](Self::destroy) removes it).
    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
        _config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.kill_recorded_process(lease).await?;
            if keep {
                tracing::debug!("local lease kept");
                return Ok(());
            }
            self.remove_lease_dir(lease, false).await
        })
    }

    fn destroy<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        _config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.kill_recorded_process(lease).await?;
            self.remove_lease_dir(lease, true).await
        })
    }

    fn realize_workspace<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
        Box::pin(async move {
            let (dir, local_path, ephemeral) = match &request.local_path {
                Some(path) => {
                    let path = path.clone();
                    let dir = blocking("the local driver", move || {
                        let resolved = std::fs::canonicalize(&path).map_err(|err| {
                            DriverError::failed(format!(
                                "the workspace path {} is not usable: {err}",
                                path.display()
                            ))
                        })?;
                        if !resolved.is_dir() {
                            return Err(DriverError::failed(format!(
                                "the workspace path {} is not a directory",
                                path.display()
                            )));
                        }
                        Ok(resolved)
                    })
                    .await?;
                    (dir.clone(), Some(dir), false)
                }
                None => {
                    let Some(dir) = self.lease_dir(lease).await? else {
                        return Err(DriverError::failed(
                            "the local lease has no workspace directory",
                        ));
                    };
                    (dir, None, true)
                }
            };
            let Some(cwd) = dir.to_str().map(str::to_owned) else {
                return Err(DriverError::failed(format!(
                    "the workspace path {} is not UTF-8",
                    dir.display()
                )));
            };
            tracing::debug!(run.id = %request.run_id, workspace.cwd = %cwd, ephemeral, "local workspace ready");
            let mut metadata = Map::new();
            metadata.insert("inPlace".to_owned(), Value::Bool(!ephemeral));
            Ok(RealizedWorkspace {
                cwd,
                local_path,
                ephemeral,
                metadata,
            })
        })
    }

    fn execute<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
        request: ExecRequest,
        sink: &'a dyn OutputSink,
        cancel: CancelSignal,
    ) -> BoxFuture<'a, Result<ExecOutcome, DriverError>> {
        Box::pin(async move {
            let cwd = command_cwd(Path::new(&workspace.cwd), &request)?;
            let spec = ProcessSpec {
                argv: request.argv,
                env: request.env,
                cwd,
                stdin: request.stdin,
                timeout: request.timeout,
            };
            let spec = self.containment.confine(spec, Path::new(&workspace.cwd))?;
            run_process_tracked(spec, self.containment.tracking(), sink, cancel).await
        })
    }

    /// In-place workspaces hold the command's changes already; run-private ones have no host directory.
    fn sync_back<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
        Box::pin(async { Ok(SyncReport::default()) })
    }
}

/// Whether `dir` is exactly `<root>/<a run id>`, judged on the path's text (no symlink resolution).
fn is_run_dir_of(root: &Path, dir: &Path) -> bool {
    let plain = dir
        .components()
        .all(|component| matches!(component, Component::RootDir | Component::Normal(_)));
    plain
        && dir.parent() == Some(root)
        && dir
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.parse::<RunId>().is_ok())
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn ready(facts: HostFacts) -> ProbeResult {
    let HostFacts {
        hostname,
        cwd,
        free_disk_bytes,
    } = facts;
    // Precision loss is irrelevant here: the figure is for people, rounded to a tenth of a GiB.
    let free_gib = free_disk_bytes as f64 / GIB;
    let summary = format!(
        "local host {hostname} ready: {free_gib:.1} GiB free in {}",
        cwd.display()
    );
    let mut details = Map::new();
    details.insert("hostname".to_owned(), hostname.into());
    details.insert("cwd".to_owned(), cwd.display().to_string().into());
    details.insert("freeDiskBytes".to_owned(), free_disk_bytes.into());
    details.insert("os".to_owned(), std::env::consts::OS.into());
    details.insert("arch".to_owned(), std::env::consts::ARCH.into());
    ProbeResult::ok(Driver::Local, summary, details)
}

/// Blocking part of the probe. The error is the probe summary: one line saying what failed, with the path.
fn gather_facts(root: &Path) -> Result<HostFacts, String> {
    let shown = root.display();
    std::fs::create_dir_all(root)
        .map_err(|err| format!("cannot create the workspace root {shown}: {err}"))?;
    // Report the resolved path: a relative or symlinked root is hard to act on in a summary.
    let cwd = std::fs::canonicalize(root)
        .map_err(|err| format!("cannot resolve the workspace root {shown}: {err}"))?;
    rustix::fs::access(
        &cwd,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    )
    .map_err(|err| {
        format!(
            "the workspace root {} is not writable: {}",
            cwd.display(),
            io::Error::from(err)
        )
    })?;
    let stats = rustix::fs::statvfs(&cwd).map_err(|err| {
        format!(
            "cannot read free disk space for {}: {}",
            cwd.display(),
            io::Error::from(err)
        )
    })?;
    let free_disk_bytes = stats.f_bavail.saturating_mul(stats.f_frsize);
    let hostname = hostname();
    Ok(HostFacts {
        hostname,
        cwd,
        free_disk_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{Collect, exec, lease_request, never};

    #[tokio::test]
    async fn probe_creates_the_root_and_reports_the_host() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("workspaces").join("nested");
        let driver = LocalDriver::new(&root, Containment::disabled_for_tests());
        let result = driver.probe(&DriverConfig::local()).await;

        assert!(result.ok, "{result:?}");
        assert_eq!(result.driver, Driver::Local);
        assert!(root.is_dir());
        let hostname = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        assert_eq!(result.details["hostname"], hostname.as_str());
        let cwd = std::fs::canonicalize(&root).unwrap();
        assert_eq!(result.details["cwd"], cwd.display().to_string().as_str());
        assert!(result.details["freeDiskBytes"].is_u64(), "{result:?}");
        assert_eq!(result.details["os"], std::env::consts::OS);
        assert_eq!(result.details["arch"], std::env::consts::ARCH);
        assert!(
            result
                .summary
                .starts_with(&format!("local host {hostname} ready: ")),
            "{}",
            result.summary
        );
        assert!(
            result
                .summary
                .ends_with(&format!(" GiB free in {}", cwd.display())),
            "{}",
            result.summary
        );
    }

    #[tokio::test]
    async fn probe_of_an_existing_root_is_ok() {
        let temp = tempfile::tempdir().unwrap();
        let result = LocalDriver::new(temp.path(), Containment::disabled_for_tests())
            .probe(&DriverConfig::local())
            .await;
        assert!(result.ok, "{result:?}");
    }

    #[tokio::test]
    async fn root_that_cannot_be_created_fails_with_a_clear_summary() {
        let temp = tempfile::tempdir().unwrap();
        let file = temp.path().join("plain-file");
        std::fs::write(&file, b"not a directory").unwrap();
        let root = file.join("workspaces");
        let result = LocalDriver::new(&root, Containment::disabled_for_tests())
            .probe(&DriverConfig::local())
            .await;

        assert!(!result.ok);
        assert_eq!(result.driver, Driver::Local);
        assert!(
            result.summary.starts_with(&format!(
                "cannot create the workspace root {}",
                root.display()
            )),
            "{}",
            result.summary
        );
        // A failed probe says nothing of the host but how its commands would be contained and tracked.
        assert_eq!(
            result.details.keys().collect::<Vec<_>>(),
            ["containment", "processTracking"],
            "{:?}",
            result.details
        );
    }

    #[tokio::test]
    async fn root_that_is_a_file_fails() {
        let temp = tempfile::tempdir().unwrap();
        let file = temp.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let result = LocalDriver::new(&file, Containment::disabled_for_tests())
            .probe(&DriverConfig::local())
            .await;
        assert!(!result.ok);
        assert!(
            result.summary.contains("workspace root"),
            "{}",
            result.summary
        );
    }

    #[tokio::test]
    async fn a_run_private_workspace_lives_from_acquire_to_release() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("root");
        let driver = LocalDriver::new(&root, Containment::disabled_for_tests());
        let request = lease_request();
        let lease = driver
            .acquire(&DriverConfig::local(), &request)
            .await
            .unwrap();

        let dir = std::fs::canonicalize(&root)
            .unwrap()
            .join(request.run_id.to_string());
        assert_eq!(lease.provider, None);
        assert_eq!(lease.provider_lease_id, None);
        assert_eq!(lease.expires_at, None);
        assert_eq!(
            lease.metadata[WORKSPACE_DIR_KEY],
            dir.display().to_string().as_str()
        );
        assert_eq!(lease.metadata[HOST_KEY], hostname().as_str());
        assert!(dir.is_dir());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let workspace = driver
            .realize_workspace(
                &lease,
                &WorkspaceRequest {
                    run_id: request.run_id,
                    local_path: None,
                },
            )
            .await
            .unwrap();
        assert!(workspace.ephemeral);
        assert_eq!(workspace.local_path, None);
        assert_eq!(workspace.cwd, dir.display().to_string());

        let sink = Collect::default();
        let mut command = exec(&["/bin/sh", "-c", "echo made > file.txt; pwd; echo $HOME"]);
        command.env.insert("ONLY".to_owned(), "this".to_owned());
        let outcome = driver
            .execute(&lease, &workspace, command, &sink, never())
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        let cwd = dir.display().to_string();
        assert_eq!(sink.text(), format!("{cwd}\n{cwd}\n"));
        assert_eq!(
            std::fs::read_to_string(dir.join("file.txt")).unwrap(),
            "made\n"
        );
        assert_eq!(
            driver.sync_back(&lease, &workspace).await.unwrap(),
            SyncReport::default()
        );

        assert!(!driver.matches_reusable_lease(&DriverConfig::local(), &lease));
        assert_eq!(
            driver
                .resume(&DriverConfig::local(), &lease, &request)
                .await
                .unwrap(),
            None
        );

        driver.release(&lease, true, None).await.unwrap();
        assert!(dir.is_dir(), "keep leaves the directory for inspection");
        driver.release(&lease, false, None).await.unwrap();
        assert!(!dir.exists());
        // Releasing twice, or destroying what is gone, is fine.
        driver.release(&lease, false, None).await.unwrap();
        driver.destroy(&lease, None).await.unwrap();
    }

    #[tokio::test]
    async fn a_local_path_runs_in_place() {
        let temp = tempfile::tempdir().unwrap();
        let project = temp.path().join("project");
        std::fs::create_dir_all(project.join("sub")).unwrap();
        std::fs::write(project.join("sub/in.txt"), "input").unwrap();
        let driver = LocalDriver::new(temp.path().join("root"), Containment::disabled_for_tests());
        let request = lease_request();
        let lease = driver
            .acquire(&DriverConfig::local(), &request)
            .await
            .unwrap();
        let workspace = driver
            .realize_workspace(
                &lease,
                &WorkspaceRequest {
                    run_id: request.run_id,
                    // Resolved: the command runs in the real directory.
                    local_path: Some(project.join("sub").join("..")),
                },
            )
            .await
            .unwrap();
        let project = std::fs::canonicalize(&project).unwrap();
        assert!(!workspace.ephemeral);
        assert_eq!(workspace.local_path.as_deref(), Some(project.as_path()));
        assert_eq!(workspace.cwd, project.display().to_string());

        let sink = Collect::default();
        let mut command = exec(&["/bin/sh", "-c", "cat in.txt; echo out > out.txt"]);
        command.cwd = Some("sub".to_owned());
        let outcome = driver
            .execute(&lease, &workspace, command, &sink, never())
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(sink.text(), "input");
        assert_eq!(
            std::fs::read_to_string(project.join("sub/out.txt")).unwrap(),
            "out\n"
        );

        // Release removes the run directory, never the project.
        driver.destroy(&lease, None).await.unwrap();
        assert!(project.join("sub/in.txt").exists());

        let missing = driver
            .realize_workspace(
                &lease,
                &WorkspaceRequest {
                    run_id: request.run_id,
                    local_path: Some(temp.path().join("nope")),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(missing.code(), "driver_failed");
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    #[tokio::test]
    async fn command_cwds_stay_inside_the_workspace() {
        let temp = tempfile::tempdir().unwrap();
        let driver = LocalDriver::new(temp.path(), Containment::disabled_for_tests());
        let request = lease_request();
        let lease = driver
            .acquire(&DriverConfig::local(), &request)
            .await
            .unwrap();
        let workspace = driver
            .realize_workspace(
                &lease,
                &WorkspaceRequest {
                    run_id: request.run_id,
                    local_path: None,
                },
            )
            .await
            .unwrap();
        for bad in ["/etc", "..", "a/../../b"] {
            let mut command = exec(&["pwd"]);
            command.cwd = Some(bad.to_owned());
            let err = driver
                .execute(&lease, &workspace, command, &Collect::default(), never())
                .await
                .unwrap_err();
            assert_eq!(err.code(), "spawn_failed", "{bad}");
            assert!(
                err.to_string()
                    .contains("relative path inside the workspace"),
                "{err}"
            );
        }
        let mut command = exec(&["pwd"]);
        command.cwd = Some("missing".to_owned());
        let err = driver
            .execute(&lease, &workspace, command, &Collect::default(), never())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "spawn_failed");
    }

    #[tokio::test]
    async fn tampered_lease_metadata_never_deletes_outside_the_root() {
        let temp = tempfile::tempdir().unwrap();
        let victim = temp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("precious"), "x").unwrap();
        let root = temp.path().join("root");
        let driver = LocalDriver::new(&root, Containment::disabled_for_tests());
        let lease = driver
            .acquire(&DriverConfig::local(), &lease_request())
            .await
            .unwrap();
        let canonical_root = std::fs::canonicalize(&root).unwrap();

        // A sibling of the run directories that is not one.
        let not_a_run = canonical_root.join("shared");
        std::fs::create_dir(&not_a_run).unwrap();
        for bad in [
            victim.display().to_string(),
            format!("{}/../victim", canonical_root.display()),
            not_a_run.display().to_string(),
            canonical_root.display().to_string(),
            format!("{}/{}/..", canonical_root.display(), RunId::new()),
        ] {
            let mut tampered = lease.clone();
            tampered
                .metadata
                .insert(WORKSPACE_DIR_KEY.to_owned(), bad.clone().into());
            let err = driver.destroy(&tampered, None).await.unwrap_err();
            assert_eq!(err.code(), "driver_failed", "{bad}");
            assert!(
                driver.release(&tampered, false, None).await.is_err(),
                "{bad}"
            );
        }
        assert!(victim.join("precious").exists());
        assert!(not_a_run.exists());

        let mut no_dir = lease.clone();
        no_dir.metadata.remove(WORKSPACE_DIR_KEY);
        driver.destroy(&no_dir, None).await.unwrap();
        let mut not_text = lease.clone();
        not_text
            .metadata
            .insert(WORKSPACE_DIR_KEY.to_owned(), 7.into());
        assert!(driver.destroy(&not_text, None).await.is_err());
    }

    #[tokio::test]
    async fn other_configs_are_refused() {
        let temp = tempfile::tempdir().unwrap();
        let driver = LocalDriver::new(temp.path(), Containment::disabled_for_tests());
        let config = DriverConfig::Sandbox(berth_core::config::SandboxConfig {
            provider: "fake".to_owned(),
            reuse_lease: false,
            timeout_ms: None,
            sync_back_max_mb: None,
            fields: Map::new(),
            secrets: Default::default(),
        });
        let result = driver.probe(&config).await;
        assert!(!result.ok);
        assert!(driver.acquire(&config, &lease_request()).await.is_err());
        assert_eq!(driver.driver(), Driver::Local);
    }

    /// After a crash, destroy kills the recorded group wherever it ran (here: a user's project, not the run's
    /// directory), and nothing else working in that directory.
    #[tokio::test]
    async fn destroy_kills_the_recorded_group_wherever_it_ran_and_nothing_else() {
        use std::io::BufRead;
        use std::os::unix::process::{CommandExt, ExitStatusExt};

        let temp = tempfile::tempdir().unwrap();
        let project = tempfile::tempdir().unwrap();
        let driver = LocalDriver::new(temp.path(), Containment::disabled_for_tests());
        let mut lease = driver
            .acquire(&DriverConfig::local(), &lease_request())
            .await
            .unwrap();
        let mut run = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 1000 & echo $!; wait"])
            .current_dir(project.path())
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(run.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let background: u32 = line.trim().parse().unwrap();
        let mut users_shell = std::process::Command::new("sleep")
            .arg("1000")
            .current_dir(project.path())
            .spawn()
            .unwrap();
        lease.process = Some(crate::process::identity_of(run.id()).unwrap());

        driver.destroy(&lease, None).await.unwrap();
        assert_eq!(run.wait().unwrap().signal(), Some(9));
        let dead = (0..100).any(|_| {
            let stat = std::fs::read_to_string(format!("/proc/{background}/stat"));
            let gone = stat.map_or(true, |stat| {
                crate::process::parse_proc_stat(&stat)
                    .is_none_or(|stat| matches!(stat.state, 'Z' | 'X'))
            });
            if !gone {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            gone
        });
        assert!(dead, "the run's background process survived destroy");
        assert!(
            users_shell.try_wait().unwrap().is_none(),
            "a process that merely works in the project was killed"
        );
        users_shell.kill().unwrap();
        users_shell.wait().unwrap();
    }
}
