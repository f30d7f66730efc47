//! Filesystem helpers shared by the drivers and providers that keep workspaces on this host.

use std::io;
use std::path::Path;

use berth_core::driver::DriverError;

/// Runs blocking filesystem work off the async workers. `what` names the work in the error if its task dies.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    tokio::task::spawn_blocking(work).await.map_err(|err| {
        tracing::warn!(work = what, error = %err, "filesystem task did not finish");
        DriverError::failed(format!("{what} could not finish: its worker task failed"))
    })?
}

/// Wraps an IO error with what berth was doing, for `map_err`.
pub fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> DriverError {
    let context = context.into();
    move |source| DriverError::Io { context, source }
}

/// Creates a directory only its owner can enter. An existing directory (not a symlink) is accepted, so a retried
/// operation succeeds.
pub fn create_private_dir(dir: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(dir)
                .map_err(io_error(format!("reading {}", dir.display())))?;
            if meta.is_dir() {
                Ok(())
            } else {
                Err(DriverError::failed(format!(
                    "{} exists and is not a directory",
                    dir.display()
                )))
            }
        }
        Err(err) => Err(io_error(format!("creating {}", dir.display()))(err)),
    }
}
