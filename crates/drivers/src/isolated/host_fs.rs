//! The sandbox's directories on the host.

use std::path::Path;

use berth_core::driver::DriverError;

use crate::fs::io_error;

/// Creates `root` (and its parents) private to this user.
pub(super) fn ensure_private_dir_tree(root: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(io_error(format!("creating {}", root.display())))?;
    let meta =
        std::fs::symlink_metadata(root).map_err(io_error(format!("reading {}", root.display())))?;
    if !meta.is_dir() || meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(DriverError::failed(format!(
            "the isolated provider's root {} is not a directory of berth's user",
            root.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error(format!("securing {}", root.display())))?;
    }
    Ok(())
}

/// Gives the sandbox user everything under `dir` (links themselves, never their targets).
pub(super) fn chown_tree(dir: &Path, uid: u32) -> Result<(), DriverError> {
    let owner = |path: &Path| {
        rustix::fs::chownat(
            rustix::fs::CWD,
            path,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(uid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|err| {
            io_error(format!("handing {} to the sandbox user", path.display()))(err.into())
        })
    };
    owner(dir)?;
    let entries = std::fs::read_dir(dir).map_err(io_error(format!("reading {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_error(format!("reading {}", dir.display())))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(io_error(format!("reading {}", path.display())))?;
        if kind.is_dir() {
            chown_tree(&path, uid)?;
        } else {
            owner(&path)?;
        }
    }
    Ok(())
}

/// Whether an unprivileged user of this host could read `path`: it and every directory above it grant "others"
/// search (and `path` itself read). A sandbox may be shown what any host account could see, never more.
pub(super) fn readable_by_anyone(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(resolved) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata(&resolved) else {
        return false;
    };
    let own_bit = if meta.is_dir() { 0o005 } else { 0o004 };
    if meta.permissions().mode() & own_bit != own_bit {
        return false;
    }
    resolved
        .ancestors()
        .skip(1)
        .all(|dir| std::fs::metadata(dir).is_ok_and(|meta| meta.permissions().mode() & 0o001 != 0))
}
