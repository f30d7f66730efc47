//! The one way the server writes a file only its owner can read (tokens, keys, ids, lab credentials).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// What [`write_private`] does when the file already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfExists {
    /// Fail with `AlreadyExists` (`O_CREAT|O_EXCL`): never replace what another process wrote.
    Fail,
    /// Truncate and rewrite it, tightening its mode to 0600.
    Overwrite,
}

/// Writes `contents` to `path` with mode 0600 whatever the umask — from the first byte when the file is created —
/// and flushes it to disk.
pub(crate) fn write_private(path: &Path, contents: &[u8], if_exists: IfExists) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).mode(0o600);
    match if_exists {
        IfExists::Fail => options.create_new(true),
        IfExists::Overwrite => options.create(true).truncate(true),
    };
    let mut file = options.open(path)?;
    // The creation mode is masked by the umask and ignored for a file that already existed: set it outright.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn fail_refuses_an_existing_file_and_leaves_it_alone() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("token");
        write_private(&path, b"first", IfExists::Fail).unwrap();
        assert_eq!(mode(&path), 0o600);
        let err = write_private(&path, b"second", IfExists::Fail).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"first");
    }

    #[test]
    fn overwrite_truncates_and_tightens_the_mode() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("key");
        fs::write(&path, "a longer old content").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new", IfExists::Overwrite).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }
}
