//! Copying workspaces into places that run commands, and what changed back out.
//!
//! Drivers that cannot run in place (sandboxes) copy the host workspace in with [`copy_tree`], keep the
//! [`Manifest`] it returns (in [`RealizedWorkspace::metadata`](berth_core::driver::RealizedWorkspace), see
//! [`Manifest::to_value`]), and after the run call [`sync_back`]: files the command created or changed are written
//! to the host, files it deleted are deleted there, and anything it did not touch is left alone, even if the host
//! changed it meanwhile.
//!
//! Symlinks are copied as symlinks and never followed, in either direction: a link to `/etc` in a workspace stays a
//! link, and nothing is ever read or written through one. Only regular files, directories and symlinks are copied;
//! sockets, fifos and devices are skipped, as are entries whose names are not UTF-8 (the manifest is JSON).
//! File modes are kept (the permission bits, `0o777`; setuid, setgid and sticky bits are dropped).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::fs::{blocking, io_error};
use berth_core::driver::{DriverError, SyncReport};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The permission bits that are copied.
const MODE_MASK: u32 = 0o777;

/// Read and hash files in chunks of this size.
const BUFFER_SIZE: usize = 64 * 1024;

/// Makes temporary names unique within this process; the pid makes them unique across processes.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What a tree held when it was copied: relative path (`/`-separated, no `.` or `..`) → entry. The tree's root is not
/// listed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Manifest {
    entries: BTreeMap<String, Entry>,
}

/// One entry of a [`Manifest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        size: u64,
        /// Lowercase hex SHA-256 of the content.
        sha256: String,
    },
    Symlink {
        /// The link's target, as it is: never resolved.
        target: String,
    },
}

impl Entry {
    fn is_dir(&self) -> bool {
        matches!(self, Entry::Dir { .. })
    }
}

// === impl Manifest ===

impl Manifest {
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The JSON form, for keeping in workspace metadata.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// Reads a manifest back from [`to_value`](Self::to_value). Metadata travels through storage, so every path is
    /// checked: a manifest can never name anything outside the tree it describes.
    pub fn from_value(value: &Value) -> Result<Self, DriverError> {
        let manifest: Manifest = Manifest::deserialize(value).map_err(|err| {
            DriverError::failed(format!("the workspace manifest is malformed: {err}"))
        })?;
        if let Some(bad) = manifest
            .entries
            .keys()
            .find(|path| !is_clean_relative(path))
        {
            return Err(DriverError::failed(format!(
                "the workspace manifest names an invalid path `{bad}`"
            )));
        }
        Ok(manifest)
    }

    /// Keeps only the entries for which `keep(path)` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.entries.retain(|path, _| keep(path));
    }

    /// Total size of the files listed, in bytes.
    pub fn total_file_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|entry| match entry {
                Entry::File { size, .. } => *size,
                Entry::Dir { .. } | Entry::Symlink { .. } => 0,
            })
            .sum()
    }
}

/// Whether `path` is a relative, `/`-separated path of plain names: no empty, `.` or `..` segment, no NUL.
pub(crate) fn is_clean_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

/// Copies the directory tree `from` into `to` (created if missing; it must hold nothing yet), preserving modes and
/// copying symlinks as symlinks. Returns what was copied, with a content hash of every file.
pub async fn copy_tree(from: &Path, to: &Path) -> Result<Manifest, DriverError> {
    let (from, to) = (from.to_path_buf(), to.to_path_buf());
    blocking("the workspace sync", move || copy_tree_blocking(&from, &to)).await
}

/// Content hashes from earlier scans, so that a file that did not change is not read again. A hash is reused only
/// while the file's stat fingerprint — device, inode, size, and mtime and ctime to the nanosecond — is the same:
/// every write moves the ctime, which no one can set back.
#[derive(Debug, Default)]
pub struct HashCache {
    /// Scanned root → what its latest scan hashed.
    roots: std::sync::Mutex<HashMap<PathBuf, KnownHashes>>,
}

/// Relative path → (fingerprint, hash).
type KnownHashes = HashMap<String, (Fingerprint, String)>;

/// Roots a [`HashCache`] remembers; past that it starts over (it is a cache: losing it only costs reads).
const HASH_CACHE_ROOTS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(meta: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// [`scan_tree`], reading only the files whose fingerprint changed since `cache` last saw them. Also returns each
/// file's mtime (whole seconds), which the stat for the fingerprint has already read.
pub async fn scan_tree_cached(
    dir: &Path,
    cache: &std::sync::Arc<HashCache>,
) -> Result<(Manifest, BTreeMap<String, i64>), DriverError> {
    let (dir, cache) = (dir.to_path_buf(), cache.clone());
    blocking("the workspace sync", move || {
        let known = cache
            .roots
            .lock()
            .ok()
            .and_then(|mut roots| roots.remove(&dir))
            .unwrap_or_default();
        let mut seen = HashMap::with_capacity(known.len());
        let mut mtimes = BTreeMap::new();
        let mut manifest = Manifest::default();
        walk(&dir, "", &mut manifest, &mut |relative, path, entry| {
            let Entry::File { size, sha256, .. } = entry else {
                return Ok(());
            };
            let meta = fs::symlink_metadata(path)
                .map_err(io_error(format!("reading {}", path.display())))?;
            let fingerprint = Fingerprint::of(&meta);
            mtimes.insert(relative.to_owned(), fingerprint.mtime.0);
            let (hashed_size, hash) = match known.get(relative) {
                Some((cached, hash)) if *cached == fingerprint => (fingerprint.size, hash.clone()),
                _ => hash_file(path)?,
            };
            // A file that changed while it was hashed is not remembered: its next scan reads it again.
            if hashed_size == fingerprint.size {
                seen.insert(relative.to_owned(), (fingerprint, hash.clone()));
            }
            *size = hashed_size;
            *sha256 = hash;
            Ok(())
        })?;
        if let Ok(mut roots) = cache.roots.lock() {
            if roots.len() >= HASH_CACHE_ROOTS {
                roots.clear();
            }
            roots.insert(dir, seen);
        }
        Ok((manifest, mtimes))
    })
    .await
}

/// Lists the tree at `dir` as [`copy_tree`] would have copied it.
pub async fn scan_tree(dir: &Path) -> Result<Manifest, DriverError> {
    let dir = dir.to_path_buf();
    blocking("the workspace sync", move || {
        let mut manifest = Manifest::default();
        walk(&dir, "", &mut manifest, &mut hash_entry)?;
        Ok(manifest)
    })
    .await
}

/// Brings what changed in `sandbox_dir` since `at_copy_in` (the manifest [`copy_tree`] returned) to `host_dir`.
///
/// New or changed files and symlinks are written atomically (temporary file, then rename) with their modes; new
/// directories are created; entries of `at_copy_in` that are gone from the sandbox are deleted from the host
/// (directories only when empty: the host may have added files to them). The sandbox wins over concurrent host
/// changes to the same path. Nothing is written outside `host_dir`, and never through a symlink.
pub async fn sync_back(
    sandbox_dir: &Path,
    host_dir: &Path,
    at_copy_in: &Manifest,
) -> Result<SyncReport, DriverError> {
    let (sandbox_dir, host_dir, before) = (
        sandbox_dir.to_path_buf(),
        host_dir.to_path_buf(),
        at_copy_in.clone(),
    );
    blocking("the workspace sync", move || {
        sync_back_blocking(&sandbox_dir, &host_dir, &before)
    })
    .await
}

/// Calls `visit(relative path, source path, entry)` for every entry under `dir`, parents before children, then
/// records the entry in `manifest`. Never follows a symlink. File entries arrive without their hash: `visit` fills it
/// in (a copy hashes while it copies, a scan just hashes), so each file is read once.
fn walk(
    dir: &Path,
    prefix: &str,
    manifest: &mut Manifest,
    visit: &mut dyn FnMut(&str, &Path, &mut Entry) -> Result<(), DriverError>,
) -> Result<(), DriverError> {
    let reading = || format!("reading {}", dir.display());
    let mut children = Vec::new();
    for item in fs::read_dir(dir).map_err(io_error(reading()))? {
        children.push(item.map_err(io_error(reading()))?);
    }
    // A stable order makes failures reproducible.
    children.sort_by_key(fs::DirEntry::file_name);
    for child in children {
        let path = child.path();
        let Some(name) = child.file_name().to_str().map(str::to_owned) else {
            tracing::warn!(path = %path.display(), "skipping a workspace entry whose name is not UTF-8");
            continue;
        };
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let meta =
            fs::symlink_metadata(&path).map_err(io_error(format!("reading {}", path.display())))?;
        let file_type = meta.file_type();
        let mode = meta.permissions().mode() & MODE_MASK;
        let mut entry = if file_type.is_symlink() {
            let target = fs::read_link(&path)
                .map_err(io_error(format!("reading the link {}", path.display())))?;
            let Some(target) = target.to_str().map(str::to_owned) else {
                tracing::warn!(path = %path.display(), "skipping a symlink whose target is not UTF-8");
                continue;
            };
            Entry::Symlink { target }
        } else if file_type.is_dir() {
            Entry::Dir { mode }
        } else if file_type.is_file() {
            Entry::File {
                mode,
                size: meta.len(),
                sha256: String::new(),
            }
        } else {
            tracing::debug!(path = %path.display(), "skipping a workspace entry that is not a file, directory or symlink");
            continue;
        };
        visit(&relative, &path, &mut entry)?;
        let is_dir = entry.is_dir();
        manifest.entries.insert(relative.clone(), entry);
        if is_dir {
            walk(&path, &relative, manifest, visit)?;
        }
    }
    Ok(())
}

/// Opens a file for reading without following a symlink swapped in for it.
fn open_nofollow(path: &Path) -> Result<File, DriverError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(io_error(format!("opening {}", path.display())))
}

/// The visitor of a scan: hashes files, leaves the rest as listed.
fn hash_entry(_relative: &str, path: &Path, entry: &mut Entry) -> Result<(), DriverError> {
    if let Entry::File { size, sha256, .. } = entry {
        let (hashed_size, hash) = hash_file(path)?;
        *size = hashed_size;
        *sha256 = hash;
    }
    Ok(())
}

pub(crate) fn hash_file(path: &Path) -> Result<(u64, String), DriverError> {
    let mut file = open_nofollow(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; BUFFER_SIZE];
    let mut size = 0_u64;
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(io_error(format!("reading {}", path.display()))(err)),
        };
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Copies `from` to a new file `to` (which must not exist: `create_new` also refuses to write through a symlink
/// there) with `mode`, returning the size and hash of what was copied.
fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<(u64, String), DriverError> {
    let mut source = open_nofollow(from)?;
    let writing = || format!("writing {}", to.display());
    let mut target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(io_error(writing()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; BUFFER_SIZE];
    let mut size = 0_u64;
    loop {
        let n = match source.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(io_error(format!("reading {}", from.display()))(err)),
        };
        hasher.update(&buffer[..n]);
        target
            .write_all(&buffer[..n])
            .map_err(io_error(writing()))?;
        size += n as u64;
    }
    // Through the descriptor: exact (no umask) and immune to the path being swapped.
    target
        .set_permissions(Permissions::from_mode(mode))
        .map_err(io_error(writing()))?;
    Ok((size, hex::encode(hasher.finalize())))
}

fn copy_tree_blocking(from: &Path, to: &Path) -> Result<Manifest, DriverError> {
    let meta = fs::metadata(from).map_err(io_error(format!("reading {}", from.display())))?;
    if !meta.is_dir() {
        return Err(DriverError::failed(format!(
            "{} is not a directory",
            from.display()
        )));
    }
    fs::create_dir_all(to).map_err(io_error(format!("creating {}", to.display())))?;
    let mut manifest = Manifest::default();
    // Directory modes are applied last, deepest first: a read-only directory must still receive its contents.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    walk(from, "", &mut manifest, &mut |relative, source, entry| {
        let target = to.join(relative);
        match entry {
            Entry::Dir { mode } => {
                fs::create_dir(&target)
                    .map_err(io_error(format!("creating {}", target.display())))?;
                dir_modes.push((target, *mode));
            }
            Entry::File { mode, size, sha256 } => {
                // Hash what was actually copied: the file may have changed since it was listed.
                let (copied_size, hash) = copy_file(source, &target, *mode)?;
                *size = copied_size;
                *sha256 = hash;
            }
            Entry::Symlink { target: link } => {
                std::os::unix::fs::symlink(&*link, &target)
                    .map_err(io_error(format!("creating the link {}", target.display())))?;
            }
        }
        Ok(())
    })?;
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, Permissions::from_mode(mode))
            .map_err(io_error(format!("setting the mode of {}", dir.display())))?;
    }
    Ok(manifest)
}

/// Whether the sandbox's `new` entry means the host's entry (listed as `old` at copy-in) must go first.
fn must_delete(old: &Entry, new: Option<&Entry>) -> bool {
    match new {
        None => true,
        Some(new) => old.is_dir() != new.is_dir(),
    }
}

fn sync_back_blocking(
    sandbox_dir: &Path,
    host_dir: &Path,
    before: &Manifest,
) -> Result<SyncReport, DriverError> {
    let host_meta =
        fs::metadata(host_dir).map_err(io_error(format!("reading {}", host_dir.display())))?;
    if !host_meta.is_dir() {
        return Err(DriverError::failed(format!(
            "{} is not a directory",
            host_dir.display()
        )));
    }
    let mut after = Manifest::default();
    walk(sandbox_dir, "", &mut after, &mut hash_entry)?;
    let mut report = SyncReport::default();

    // Deletions first, children before parents, so that a path that changed kind is free for its new entry.
    for (relative, old) in before.entries.iter().rev() {
        if !must_delete(old, after.get(relative)) {
            continue;
        }
        let target = host_target(host_dir, relative)?;
        let Some(meta) = lstat(&target)? else {
            continue;
        };
        if old.is_dir() {
            if meta.is_dir() {
                match fs::remove_dir(&target) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) if err.kind() == io::ErrorKind::DirectoryNotEmpty => {
                        tracing::debug!(path = %target.display(), "keeping a deleted directory that still holds host files");
                    }
                    Err(err) => {
                        return Err(io_error(format!("removing {}", target.display()))(err));
                    }
                }
            }
        } else if !meta.is_dir() {
            match fs::remove_file(&target) {
                Ok(()) => report.files_deleted += 1,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_error(format!("removing {}", target.display()))(err)),
            }
        }
    }

    // Then writes, parents before children.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for (relative, new) in &after.entries {
        if before.get(relative) == Some(new) {
            continue;
        }
        let target = host_target(host_dir, relative)?;
        let source = sandbox_dir.join(relative);
        match new {
            Entry::Dir { mode } => {
                match lstat(&target)? {
                    Some(meta) if meta.is_dir() => {}
                    Some(_) => {
                        // A file or link the host put where the sandbox now has a directory: the sandbox wins.
                        fs::remove_file(&target)
                            .map_err(io_error(format!("removing {}", target.display())))?;
                        create_dir(&target)?;
                    }
                    None => create_dir(&target)?,
                }
                dir_modes.push((target, *mode));
            }
            Entry::File { mode, .. } => {
                let size = replace_with_file(&source, &target, *mode)?;
                report.files_written += 1;
                report.bytes_written += size;
            }
            Entry::Symlink { target: link } => {
                replace_with_symlink(link, &target)?;
                report.files_written += 1;
            }
        }
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, Permissions::from_mode(mode))
            .map_err(io_error(format!("setting the mode of {}", dir.display())))?;
    }
    tracing::debug!(
        host_dir = %host_dir.display(),
        files_written = report.files_written,
        files_deleted = report.files_deleted,
        bytes_written = report.bytes_written,
        "workspace synced back"
    );
    Ok(report)
}

pub(crate) fn lstat(path: &Path) -> Result<Option<fs::Metadata>, DriverError> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(meta)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_error(format!("reading {}", path.display()))(err)),
    }
}

pub(crate) fn create_dir(path: &Path) -> Result<(), DriverError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(io_error(format!("creating {}", path.display())))
}

/// The host path for `relative`, after checking that every directory on the way is a real directory inside
/// `host_dir` (created when missing), never a symlink: nothing may be written through a link.
pub(crate) fn host_target(host_dir: &Path, relative: &str) -> Result<PathBuf, DriverError> {
    if !is_clean_relative(relative) {
        return Err(DriverError::failed(format!(
            "refusing to sync the invalid path `{relative}`"
        )));
    }
    let segments: Vec<&str> = relative.split('/').collect();
    let mut current = host_dir.to_path_buf();
    for segment in &segments[..segments.len() - 1] {
        current.push(segment);
        match lstat(&current)? {
            Some(meta) if meta.is_dir() => {}
            Some(_) => {
                return Err(DriverError::failed(format!(
                    "refusing to sync `{relative}`: {} on the host is not a directory (a symlink?)",
                    current.display()
                )));
            }
            None => create_dir(&current)?,
        }
    }
    Ok(host_dir.join(relative))
}

/// A fresh name next to `target` for writing before the atomic rename.
fn temp_sibling(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.berth-sync-{}-{n}", std::process::id()))
}

fn rename_into_place(temp: &Path, target: &Path) -> Result<(), DriverError> {
    fs::rename(temp, target).map_err(|err| {
        let _ = fs::remove_file(temp);
        io_error(format!("replacing {}", target.display()))(err)
    })
}

/// Writes `source`'s content to `target` atomically with `mode`; returns the bytes written.
pub(crate) fn replace_with_file(
    source: &Path,
    target: &Path,
    mode: u32,
) -> Result<u64, DriverError> {
    let temp = temp_sibling(target);
    let copied = copy_file(source, &temp, mode);
    let (size, _) = match copied {
        Ok(copied) => copied,
        Err(err) => {
            let _ = fs::remove_file(&temp);
            return Err(err);
        }
    };
    rename_into_place(&temp, target)?;
    Ok(size)
}

pub(crate) fn replace_with_symlink(link: &str, target: &Path) -> Result<(), DriverError> {
    let temp = temp_sibling(target);
    std::os::unix::fs::symlink(link, &temp)
        .map_err(io_error(format!("creating the link {}", target.display())))?;
    rename_into_place(&temp, target)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use serde_json::json;

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// A small workspace: nested dirs, an executable, a read-only file, relative and absolute links, a link out.
    fn sample(root: &Path, outside: &Path) {
        fs::create_dir_all(root.join("src/nested")).unwrap();
        fs::write(root.join("README.md"), "hello\n").unwrap();
        fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
        fs::write(root.join("src/nested/deep.txt"), "deep\n").unwrap();
        fs::write(root.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
        fs::set_permissions(root.join("run.sh"), Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("locked.txt"), "read only\n").unwrap();
        fs::set_permissions(root.join("locked.txt"), Permissions::from_mode(0o444)).unwrap();
        fs::create_dir(root.join("private")).unwrap();
        fs::write(root.join("private/key"), "k").unwrap();
        fs::set_permissions(root.join("private"), Permissions::from_mode(0o700)).unwrap();
        symlink("src/main.rs", root.join("main-link")).unwrap();
        symlink(outside, root.join("escape")).unwrap();
        symlink("../../outside-relative", root.join("src/up")).unwrap();
    }

    #[tokio::test]
    async fn cached_scans_see_every_change_the_full_scan_sees() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("tree");
        sample(&root, temp.path());
        let cache = std::sync::Arc::new(HashCache::default());
        assert_eq!(
            scan_tree_cached(&root, &cache).await.unwrap().0,
            scan_tree(&root).await.unwrap()
        );
        // Same size, new content; a new file; a removed one: the cached scan must not trust what it saw before.
        fs::write(root.join("README.md"), "HELLO\n").unwrap();
        fs::write(root.join("src/added.txt"), "new").unwrap();
        fs::remove_file(root.join("src/nested/deep.txt")).unwrap();
        let (cached, mtimes) = scan_tree_cached(&root, &cache).await.unwrap();
        assert_eq!(cached, scan_tree(&root).await.unwrap());
        assert!(cached.get("src/nested/deep.txt").is_none());
        assert!(mtimes.contains_key("src/added.txt") && !mtimes.contains_key("src"));
        assert_eq!(scan_tree_cached(&root, &cache).await.unwrap().0, cached);
    }

    #[tokio::test]
    async fn copies_preserve_modes_links_and_nesting() {
        let temp = tempfile::tempdir().unwrap();
        let outside = temp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), "do not copy").unwrap();
        let host = temp.path().join("host");
        sample(&host, &outside);
        let copy = temp.path().join("copy");

        let manifest = copy_tree(&host, &copy).await.unwrap();

        assert_eq!(
            fs::read_to_string(copy.join("src/nested/deep.txt")).unwrap(),
            "deep\n"
        );
        assert_eq!(mode_of(&copy.join("run.sh")), 0o755);
        assert_eq!(mode_of(&copy.join("locked.txt")), 0o444);
        assert_eq!(mode_of(&copy.join("private")), 0o700);
        assert_eq!(
            fs::read_link(copy.join("main-link")).unwrap(),
            Path::new("src/main.rs")
        );
        assert_eq!(fs::read_link(copy.join("escape")).unwrap(), outside);
        assert_eq!(
            fs::read_link(copy.join("src/up")).unwrap(),
            Path::new("../../outside-relative")
        );
        // The link out was copied as a link, never followed.
        assert!(
            fs::symlink_metadata(copy.join("escape"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            manifest
                .entries()
                .keys()
                .all(|path| !path.starts_with("escape/"))
        );
        assert!(!manifest.entries().values().any(|entry| matches!(
            entry,
            Entry::File { size, .. } if *size == "do not copy".len() as u64
        )));

        assert_eq!(
            manifest.get("README.md"),
            Some(&Entry::File {
                mode: mode_of(&host.join("README.md")) & 0o777,
                size: 6,
                sha256: hex::encode(Sha256::digest(b"hello\n")),
            })
        );
        assert_eq!(
            manifest.get("src"),
            Some(&Entry::Dir {
                mode: mode_of(&host.join("src"))
            })
        );
        assert_eq!(
            manifest.get("escape"),
            Some(&Entry::Symlink {
                target: outside.display().to_string()
            })
        );
        assert_eq!(manifest.len(), 12);
        assert_eq!(scan_tree(&copy).await.unwrap(), manifest);

        // The manifest survives a trip through JSON metadata.
        let value = manifest.to_value();
        assert_eq!(
            value["run.sh"],
            json!({"kind": "file", "mode": 0o755, "size": 19, "sha256": hex::encode(Sha256::digest(b"#!/bin/sh\necho run\n"))})
        );
        assert_eq!(Manifest::from_value(&value).unwrap(), manifest);
    }

    #[tokio::test]
    async fn tampered_manifests_are_refused() {
        for bad in [
            json!({"../etc/passwd": {"kind": "file", "mode": 420, "size": 1, "sha256": ""}}),
            json!({"/etc/passwd": {"kind": "symlink", "target": "x"}}),
            json!({"a/./b": {"kind": "dir", "mode": 493}}),
            json!({"a//b": {"kind": "dir", "mode": 493}}),
            json!({"a": {"kind": "socket"}}),
            json!([1, 2]),
        ] {
            assert!(
                Manifest::from_value(&bad).is_err(),
                "{bad} should be refused"
            );
        }
        assert!(Manifest::from_value(&json!({})).unwrap().is_empty());
    }

    #[tokio::test]
    async fn changes_new_files_and_deletions_round_trip() {
        let temp = tempfile::tempdir().unwrap();
        let outside = temp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let host = temp.path().join("host");
        sample(&host, &outside);
        fs::write(host.join("untouched.txt"), "same").unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();

        // What a command does in the sandbox.
        fs::write(sandbox.join("README.md"), "changed\n").unwrap();
        fs::set_permissions(sandbox.join("src/main.rs"), Permissions::from_mode(0o600)).unwrap();
        fs::write(sandbox.join("new.txt"), "brand new").unwrap();
        fs::create_dir_all(sandbox.join("out/bin")).unwrap();
        fs::write(sandbox.join("out/bin/tool"), "tool").unwrap();
        fs::set_permissions(sandbox.join("out/bin/tool"), Permissions::from_mode(0o750)).unwrap();
        fs::set_permissions(sandbox.join("out"), Permissions::from_mode(0o750)).unwrap();
        fs::remove_file(sandbox.join("src/nested/deep.txt")).unwrap();
        fs::remove_dir(sandbox.join("src/nested")).unwrap();
        fs::remove_file(sandbox.join("main-link")).unwrap();
        symlink("README.md", sandbox.join("main-link")).unwrap();
        fs::remove_file(sandbox.join("locked.txt")).unwrap();
        symlink("/absolute/target", sandbox.join("abs-link")).unwrap();
        // Meanwhile the host changes a file the command never touched: that change must stay.
        fs::write(host.join("untouched.txt"), "host edit").unwrap();

        let report = sync_back(&sandbox, &host, &manifest).await.unwrap();

        assert_eq!(
            fs::read_to_string(host.join("README.md")).unwrap(),
            "changed\n"
        );
        assert_eq!(mode_of(&host.join("src/main.rs")), 0o600);
        assert_eq!(
            fs::read_to_string(host.join("new.txt")).unwrap(),
            "brand new"
        );
        assert_eq!(
            fs::read_to_string(host.join("out/bin/tool")).unwrap(),
            "tool"
        );
        assert_eq!(mode_of(&host.join("out/bin/tool")), 0o750);
        assert_eq!(mode_of(&host.join("out")), 0o750);
        assert!(!host.join("src/nested").exists());
        assert!(!host.join("locked.txt").exists());
        assert_eq!(
            fs::read_link(host.join("main-link")).unwrap(),
            Path::new("README.md")
        );
        assert_eq!(
            fs::read_link(host.join("abs-link")).unwrap(),
            Path::new("/absolute/target")
        );
        assert_eq!(
            fs::read_to_string(host.join("untouched.txt")).unwrap(),
            "host edit"
        );
        assert_eq!(fs::read_link(host.join("escape")).unwrap(), outside);
        // No temporary files are left behind.
        assert!(!fs::read_dir(&host).unwrap().any(|entry| {
            entry
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("berth-sync")
        }));

        assert_eq!(
            report,
            SyncReport {
                // README.md, src/main.rs, new.txt, out/bin/tool, main-link, abs-link.
                files_written: 6,
                // src/nested/deep.txt, locked.txt.
                files_deleted: 2,
                bytes_written: 8 + 13 + 9 + 4,
                conflicts: Vec::new(),
            }
        );

        // Nothing changed since: a second sync writes nothing.
        let now = scan_tree(&sandbox).await.unwrap();
        let again = sync_back(&sandbox, &host, &now).await.unwrap();
        assert_eq!(again, SyncReport::default());
    }

    #[tokio::test]
    async fn sync_back_never_writes_through_host_symlinks() {
        let temp = tempfile::tempdir().unwrap();
        let outside = temp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let host = temp.path().join("host");
        fs::create_dir(&host).unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();

        // During the run, the host grows a link out where the sandbox creates a directory with a file.
        symlink(&outside, host.join("sub")).unwrap();
        fs::create_dir(sandbox.join("sub")).unwrap();
        fs::write(sandbox.join("sub/file"), "inside").unwrap();
        // And a link where the sandbox writes a plain file: the link is replaced, its target untouched.
        fs::write(outside.join("victim"), "original").unwrap();
        symlink(outside.join("victim"), host.join("plain")).unwrap();
        fs::write(sandbox.join("plain"), "replaced").unwrap();

        sync_back(&sandbox, &host, &manifest).await.unwrap();

        assert!(fs::symlink_metadata(host.join("sub")).unwrap().is_dir());
        assert_eq!(fs::read_to_string(host.join("sub/file")).unwrap(), "inside");
        assert!(!outside.join("file").exists());
        assert!(fs::symlink_metadata(host.join("plain")).unwrap().is_file());
        assert_eq!(
            fs::read_to_string(outside.join("victim")).unwrap(),
            "original"
        );
    }

    #[tokio::test]
    async fn host_ancestor_symlinks_are_refused() {
        let temp = tempfile::tempdir().unwrap();
        let outside = temp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let host = temp.path().join("host");
        fs::create_dir_all(host.join("dir")).unwrap();
        fs::write(host.join("dir/file"), "v1").unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();

        // The host swaps a directory the manifest knows for a link out; the sandbox changes a file in it.
        fs::remove_dir_all(host.join("dir")).unwrap();
        symlink(&outside, host.join("dir")).unwrap();
        fs::write(sandbox.join("dir/file"), "v2").unwrap();

        let err = sync_back(&sandbox, &host, &manifest).await.unwrap_err();
        assert!(err.to_string().contains("refusing"), "{err}");
        assert!(!outside.join("file").exists());
    }

    #[tokio::test]
    async fn deleted_directories_keep_files_the_host_added() {
        let temp = tempfile::tempdir().unwrap();
        let host = temp.path().join("host");
        fs::create_dir_all(host.join("gone")).unwrap();
        fs::write(host.join("gone/a"), "a").unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();

        fs::remove_dir_all(sandbox.join("gone")).unwrap();
        fs::write(host.join("gone/host-added"), "keep me").unwrap();

        let report = sync_back(&sandbox, &host, &manifest).await.unwrap();
        assert_eq!(report.files_deleted, 1);
        assert!(!host.join("gone/a").exists());
        assert_eq!(
            fs::read_to_string(host.join("gone/host-added")).unwrap(),
            "keep me"
        );
    }

    #[tokio::test]
    async fn copying_refuses_non_directories_and_a_non_empty_target() {
        let temp = tempfile::tempdir().unwrap();
        let file = temp.path().join("file");
        fs::write(&file, "x").unwrap();
        assert!(copy_tree(&file, &temp.path().join("to")).await.is_err());

        let from = temp.path().join("from");
        fs::create_dir(&from).unwrap();
        fs::write(from.join("a"), "new").unwrap();
        let to = temp.path().join("to");
        fs::create_dir(&to).unwrap();
        symlink(&file, to.join("a")).unwrap();
        assert!(copy_tree(&from, &to).await.is_err());
        // The pre-existing link in the target was not written through.
        assert_eq!(fs::read_to_string(&file).unwrap(), "x");
    }
}
