//! The local driver: runs commands on the machine berth runs on, in directories under a workspace root.
//!
//! Only the probe exists so far; runs arrive with the run orchestrator.

use std::io;
use std::path::{Path, PathBuf};

use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use serde_json::Map;

/// Bytes in a GiB, for human summaries.
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Clone, Debug)]
pub struct LocalDriver {
    workspace_root: PathBuf,
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
    pub fn new(workspace_root: impl Into<PathBuf>) -> Self {
        Self {
            workspace_root: workspace_root.into(),
        }
    }

    pub fn workspace_root(&self) -> &Path {
        &self.workspace_root
    }

    /// Checks that runs could execute here: the workspace root exists (it is created if missing) and is writable,
    /// and reports the host name, free disk, OS and architecture. Never errs: failures are `ok: false`.
    pub async fn probe(&self) -> ProbeResult {
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
    let hostname = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    Ok(HostFacts {
        hostname,
        cwd,
        free_disk_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_creates_the_root_and_reports_the_host() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("workspaces").join("nested");
        let driver = LocalDriver::new(&root);
        let result = driver.probe().await;

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
        let result = LocalDriver::new(temp.path()).probe().await;
        assert!(result.ok, "{result:?}");
    }

    #[tokio::test]
    async fn root_that_cannot_be_created_fails_with_a_clear_summary() {
        let temp = tempfile::tempdir().unwrap();
        let file = temp.path().join("plain-file");
        std::fs::write(&file, b"not a directory").unwrap();
        let root = file.join("workspaces");
        let result = LocalDriver::new(&root).probe().await;

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
        assert!(result.details.is_empty());
    }

    #[tokio::test]
    async fn root_that_is_a_file_fails() {
        let temp = tempfile::tempdir().unwrap();
        let file = temp.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let result = LocalDriver::new(&file).probe().await;
        assert!(!result.ok);
        assert!(
            result.summary.contains("workspace root"),
            "{}",
            result.summary
        );
    }
}
