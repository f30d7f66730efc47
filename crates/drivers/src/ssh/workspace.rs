//! Workspaces over SSH: incremental sync in, sync back of what the remote changed, with conflicts reported.
//!
//! **Sync in.** The host tree is scanned into a content manifest ([`crate::sync::Manifest`]: modes, sizes,
//! SHA-256, symlink targets; a file unchanged since the last scan is not read again, see [`HashCache`]). The remote
//! tree is listed with `find -printf` (kind, mode, size, mtime, link target; no hashing on the remote). A file travels when the remote has nothing there, or something of another kind, size,
//! mode or mtime (tar keeps mtimes, so a file synced before matches until either side changes it: rsync's quick
//! check). What travels goes as one tar stream over one channel into `tar -x` on the remote. Nothing of the remote
//! is deleted at sync-in: a persistent workspace keeps its build products.
//!
//! **Sync back.** The remote is listed again and compared with the listing taken right after sync-in; what the
//! command created or changed comes back as one tar stream, into a private staging directory, and is applied to the
//! host path by path. A host path that changed during the run (its content differs from the manifest taken at
//! sync-in) is never overwritten: the remote version is written beside it as `NAME.berth-conflict` and reported.
//! Remote deletions delete on the host only what is still as it was at sync-in.
//!
//! Symlinks are copied as links and never followed on either side; paths are checked before anything is written.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use berth_core::config::SyncExclude;
use berth_core::driver::{DriverError, SyncReport};
use tokio::sync::mpsc;

use super::exec::{control, run_script, shell_quote};
use super::pool::{Pool, SshTarget};
use crate::fs::{blocking, io_error};
use crate::sync::{self, Entry, HashCache, Manifest};

/// Bytes per chunk between the tar thread and the channel.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between them: backpressure, not buffering.
const CHUNKS_IN_FLIGHT: usize = 16;
/// How long a whole transfer may take.
const TRANSFER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);
/// The suffix of the remote version of a path that changed on both sides.
pub const CONFLICT_SUFFIX: &str = ".berth-conflict";

/// One entry of a remote listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteEntry {
    /// `f` file, `d` directory, `l` symlink.
    pub kind: char,
    pub mode: u32,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub link: Option<String>,
}

/// Relative path → entry.
pub type RemoteListing = BTreeMap<String, RemoteEntry>;

/// What sync-in did, and what sync-back needs.
#[derive(Debug)]
pub struct SyncedIn {
    /// The host tree at sync-in.
    pub host: Manifest,
    /// The remote tree right after sync-in.
    pub remote: RemoteListing,
    pub files_sent: u64,
    pub bytes_sent: u64,
}

/// Lists `dir` on the remote, leaving out what `exclude` matches. A missing directory lists as empty.
pub async fn list(
    pool: &Arc<Pool>,
    target: &SshTarget,
    dir: &str,
    exclude: &SyncExclude,
) -> Result<RemoteListing, DriverError> {
    Ok(list_if_present(pool, target, dir, exclude)
        .await?
        .unwrap_or_default())
}

/// Exit status of the listing when the directory does not exist.
const MISSING_DIR_STATUS: u32 = 3;

/// Lists `dir` on the remote; `None` when it does not exist.
async fn list_if_present(
    pool: &Arc<Pool>,
    target: &SshTarget,
    dir: &str,
    exclude: &SyncExclude,
) -> Result<Option<RemoteListing>, DriverError> {
    let script = format!(
        "cd -- {} 2>/dev/null || exit {MISSING_DIR_STATUS}; exec find . -mindepth 1 \\( -type f -o -type d -o -type l \\) -printf '%y %m %s %T@ %P\\0%l\\0'",
        shell_quote(dir)
    );
    let output = control(pool, target, &script, None).await?;
    if output.status == Some(MISSING_DIR_STATUS) {
        return Ok(None);
    }
    if !output.success() {
        return Err(DriverError::failed(format!(
            "cannot list the remote workspace {dir} (GNU find is needed): {}",
            output.error_line()
        )));
    }
    let mut listing = parse_listing(&output.stdout)?;
    if !exclude.is_empty() {
        listing.retain(|path, _| !exclude.matches(path));
    }
    Ok(Some(listing))
}

fn parse_listing(bytes: &[u8]) -> Result<RemoteListing, DriverError> {
    let malformed = || DriverError::failed("the remote workspace listing is malformed");
    let mut listing = RemoteListing::new();
    let mut fields = bytes.split(|&byte| byte == 0);
    while let Some(head) = fields.next() {
        if head.is_empty() {
            break;
        }
        let link = fields.next().ok_or_else(malformed)?;
        // Names that are not UTF-8, or not clean, are skipped, as the host side skips them.
        let Ok(head) = std::str::from_utf8(head) else {
            continue;
        };
        let mut parts = head.splitn(5, ' ');
        let (Some(kind), Some(mode), Some(size), Some(mtime), Some(path)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(malformed());
        };
        if !sync::is_clean_relative(path) {
            continue;
        }
        let kind = kind.chars().next().ok_or_else(malformed)?;
        let entry = RemoteEntry {
            kind,
            mode: u32::from_str_radix(mode, 8).map_err(|_| malformed())? & 0o777,
            size: if kind == 'f' {
                size.parse().map_err(|_| malformed())?
            } else {
                0
            },
            mtime: mtime
                .split('.')
                .next()
                .and_then(|seconds| seconds.parse().ok())
                .ok_or_else(malformed)?,
            link: (kind == 'l')
                .then(|| String::from_utf8(link.to_vec()).ok())
                .flatten(),
        };
        if kind == 'l' && entry.link.is_none() {
            continue;
        }
        listing.insert(path.to_owned(), entry);
    }
    Ok(listing)
}

/// Whether the remote already holds what the host has at this path.
fn up_to_date(host: &Entry, host_mtime: Option<i64>, remote: Option<&RemoteEntry>) -> bool {
    let Some(remote) = remote else { return false };
    match host {
        Entry::Dir { mode } => remote.kind == 'd' && remote.mode == *mode,
        Entry::File { mode, size, .. } => {
            remote.kind == 'f'
                && remote.mode == *mode
                && remote.size == *size
                && Some(remote.mtime) == host_mtime
        }
        Entry::Symlink { target } => remote.kind == 'l' && remote.link.as_deref() == Some(target),
    }
}

/// Brings the host tree `local` into `dir` on the remote (created if missing), sending only what the remote lacks.
pub async fn sync_in(
    pool: &Arc<Pool>,
    target: &SshTarget,
    local: &Path,
    dir: &str,
    fresh: bool,
    exclude: &SyncExclude,
    hashes: &Arc<HashCache>,
) -> Result<SyncedIn, DriverError> {
    let (mut host, mtimes) = sync::scan_tree_cached(local, hashes).await?;
    if !exclude.is_empty() {
        host.retain(|path| !exclude.matches(path));
    }
    let (exists, before) = if fresh {
        (false, RemoteListing::new())
    } else {
        match list_if_present(pool, target, dir, exclude).await? {
            Some(listing) => (true, listing),
            None => (false, RemoteListing::new()),
        }
    };
    let mut send = Vec::new();
    let mut clear = Vec::new();
    for (path, entry) in host.entries() {
        let remote = before.get(path);
        if up_to_date(entry, mtimes.get(path).copied(), remote) {
            continue;
        }
        // Something of another kind is in the way (tar cannot put a file where a directory is).
        if let Some(remote) = remote {
            let same_kind = matches!(
                (entry, remote.kind),
                (Entry::Dir { .. }, 'd') | (Entry::File { .. }, 'f')
            );
            if !same_kind {
                clear.push(path.clone());
            }
        }
        send.push(path.clone());
    }
    if !clear.is_empty() {
        let script = format!("cd -- {} && xargs -0 rm -rf --", shell_quote(dir));
        let output = control(pool, target, &script, Some(nul_list(&clear))).await?;
        if !output.success() {
            return Err(DriverError::failed(format!(
                "cannot prepare the remote workspace {dir}: {}",
                output.error_line()
            )));
        }
    }
    let files_sent = send
        .iter()
        .filter(|path| {
            matches!(
                host.get(path),
                Some(Entry::File { .. } | Entry::Symlink { .. })
            )
        })
        .count() as u64;
    let bytes_sent = send
        .iter()
        .filter_map(|path| match host.get(path) {
            Some(Entry::File { size, .. }) => Some(*size),
            _ => None,
        })
        .sum();
    // What the remote holds now, without listing it again: tar keeps modes, sizes, link targets and file mtimes as
    // the host has them. A guess that is off only makes sync-back fetch a file it then finds unchanged.
    let mut remote = before;
    remote.retain(|path, _| !clear.iter().any(|cleared| is_at_or_below(path, cleared)));
    for path in &send {
        if let Some(entry) = host.get(path) {
            remote.insert(
                path.clone(),
                expected_remote(entry, mtimes.get(path).copied()),
            );
        }
    }
    // The directory must exist even with nothing to send: the command runs there.
    if !send.is_empty() || !exists {
        upload(pool, target, local, dir, send).await?;
    }
    tracing::debug!(dir, files_sent, bytes_sent, "workspace synced in");
    Ok(SyncedIn {
        host,
        remote,
        files_sent,
        bytes_sent,
    })
}

fn nul_list(paths: &[String]) -> Vec<u8> {
    let mut list = Vec::new();
    for path in paths {
        list.extend_from_slice(path.as_bytes());
        list.push(0);
    }
    list
}

/// Streams a tar of `paths` (relative to `local`) into `tar -x` in `dir`.
async fn upload(
    pool: &Arc<Pool>,
    target: &SshTarget,
    local: &Path,
    dir: &str,
    paths: Vec<String>,
) -> Result<(), DriverError> {
    let script = format!(
        "mkdir -p -- {dir} && exec tar -x -p --no-same-owner -f - -C {dir}",
        dir = shell_quote(dir)
    );
    let (chunks, received) = mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let root = local.to_path_buf();
    let packer = tokio::task::spawn_blocking(move || pack(&root, &paths, chunks));
    let transferred = run_script(pool, target, &script, received, None, TRANSFER_TIMEOUT).await;
    let packed = packer
        .await
        .map_err(|error| DriverError::failed(format!("the workspace packer failed: {error}")))?;
    let output = transferred?;
    packed?;
    if !output.success() {
        return Err(DriverError::failed(format!(
            "the remote could not unpack the workspace into {dir}: {}",
            output.error_line()
        )));
    }
    Ok(())
}

/// Writes a tar of `paths` into `chunks`. Links are archived as links, never followed.
fn pack(root: &Path, paths: &[String], chunks: mpsc::Sender<Vec<u8>>) -> Result<(), DriverError> {
    let writer = ChunkWriter {
        chunks,
        buffer: Vec::with_capacity(CHUNK),
    };
    let mut builder = tar::Builder::new(writer);
    builder.follow_symlinks(false);
    for path in paths {
        let source = root.join(path);
        builder
            .append_path_with_name(&source, path)
            .map_err(io_error(format!("packing {}", source.display())))?;
    }
    let mut writer = builder
        .into_inner()
        .map_err(io_error("finishing the workspace archive"))?;
    writer
        .flush()
        .map_err(io_error("sending the workspace archive"))
}

struct ChunkWriter {
    chunks: mpsc::Sender<Vec<u8>>,
    buffer: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
        self.chunks
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the transfer stopped"))
    }
}

struct ChunkReader {
    chunks: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    position: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.position == self.current.len() {
            match self.chunks.blocking_recv() {
                Some(chunk) => {
                    self.current = chunk;
                    self.position = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.position);
        out[..n].copy_from_slice(&self.current[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

/// Whether a remote entry changed between two listings. A directory's mtime moves whenever its entries do, and a
/// link's own metadata is meaningless: only what they are counts for them.
fn changed(before: Option<&RemoteEntry>, now: &RemoteEntry) -> bool {
    let Some(before) = before else { return true };
    match now.kind {
        'd' => before.kind != 'd' || before.mode != now.mode,
        'l' => before.kind != 'l' || before.link != now.link,
        _ => before != now,
    }
}

/// How the remote lists `entry` once tar has unpacked it.
fn expected_remote(entry: &Entry, mtime: Option<i64>) -> RemoteEntry {
    match entry {
        Entry::Dir { mode } => RemoteEntry {
            kind: 'd',
            mode: *mode,
            size: 0,
            mtime: 0,
            link: None,
        },
        Entry::File { mode, size, .. } => RemoteEntry {
            kind: 'f',
            mode: *mode,
            size: *size,
            mtime: mtime.unwrap_or_default(),
            link: None,
        },
        Entry::Symlink { target } => RemoteEntry {
            kind: 'l',
            mode: 0o777,
            size: 0,
            mtime: 0,
            link: Some(target.clone()),
        },
    }
}

/// Whether `path` is `parent` or inside it.
fn is_at_or_below(path: &str, parent: &str) -> bool {
    path == parent
        || path
            .strip_prefix(parent)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Brings what the command changed in `dir` back to `local`.
pub async fn sync_back(
    pool: &Arc<Pool>,
    target: &SshTarget,
    dir: &str,
    local: &Path,
    synced: &SyncedIn,
    exclude: &SyncExclude,
) -> Result<SyncReport, DriverError> {
    let now = list(pool, target, dir, exclude).await?;
    let changed_paths: Vec<String> = now
        .iter()
        .filter(|(path, entry)| changed(synced.remote.get(*path), entry))
        .map(|(path, _)| path.clone())
        .collect();
    let deleted: Vec<String> = synced
        .remote
        .keys()
        .filter(|path| !now.contains_key(*path))
        .cloned()
        .collect();
    if changed_paths.is_empty() && deleted.is_empty() {
        return Ok(SyncReport::default());
    }
    // Staged beside the workspace, on its filesystem: a large sync-back must not fill a small /tmp (or its quota).
    let staging = local
        .parent()
        .and_then(|parent| {
            tempfile::Builder::new()
                .prefix(".berth-sync-")
                .tempdir_in(parent)
                .ok()
        })
        .map_or_else(tempfile::tempdir, Ok)
        .map_err(io_error("creating a staging directory"))?;
    let fetch: Vec<String> = changed_paths
        .iter()
        .filter(|path| now.get(*path).is_some_and(|entry| entry.kind != 'd'))
        .cloned()
        .collect();
    if !fetch.is_empty() {
        download(pool, target, dir, &fetch, staging.path()).await?;
    }
    let (host_dir, staging_dir, before) = (
        local.to_path_buf(),
        staging.path().to_path_buf(),
        synced.host.clone(),
    );
    let report = blocking("the workspace sync", move || {
        apply(
            &host_dir,
            &staging_dir,
            &before,
            &now,
            &changed_paths,
            &deleted,
        )
    })
    .await?;
    drop(staging);
    Ok(report)
}

/// Streams a tar of `paths` in `dir` into `staging`.
async fn download(
    pool: &Arc<Pool>,
    target: &SshTarget,
    dir: &str,
    paths: &[String],
    staging: &Path,
) -> Result<(), DriverError> {
    let script = format!(
        "cd -- {} && exec tar -c -f - --no-recursion --null -T -",
        shell_quote(dir)
    );
    let (chunks, received) = mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let root = staging.to_path_buf();
    let unpacker = tokio::task::spawn_blocking(move || {
        let mut archive = tar::Archive::new(ChunkReader {
            chunks: received,
            current: Vec::new(),
            position: 0,
        });
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_overwrite(false);
        // `unpack` refuses `..` and absolute names and never writes through a link it extracted.
        archive
            .unpack(&root)
            .map_err(io_error("unpacking the remote workspace"))
    });
    // The list of paths is the remote tar's stdin.
    let (list, list_received) = mpsc::channel(1);
    let _ = list.send(nul_list(paths)).await;
    drop(list);
    let transferred = run_script(
        pool,
        target,
        &script,
        list_received,
        Some(chunks),
        TRANSFER_TIMEOUT,
    )
    .await;
    let unpacked = unpacker
        .await
        .map_err(|error| DriverError::failed(format!("the workspace unpacker failed: {error}")))?;
    let output = transferred?;
    if !output.success() {
        return Err(DriverError::failed(format!(
            "the remote could not pack the workspace {dir}: {}",
            output.error_line()
        )));
    }
    unpacked
}

/// What a host path holds now, in manifest terms (files hashed).
fn host_entry(path: &Path) -> Result<Option<Entry>, DriverError> {
    let Some(meta) = sync::lstat(path)? else {
        return Ok(None);
    };
    let mode = meta.permissions().mode() & 0o777;
    let file_type = meta.file_type();
    Ok(Some(if file_type.is_symlink() {
        let link =
            std::fs::read_link(path).map_err(io_error(format!("reading {}", path.display())))?;
        Entry::Symlink {
            target: link.to_string_lossy().into_owned(),
        }
    } else if file_type.is_dir() {
        Entry::Dir { mode }
    } else {
        let (size, sha256) = sync::hash_file(path)?;
        Entry::File { mode, size, sha256 }
    }))
}

/// Same content (modes aside): what decides whether the host changed a path during the run.
fn same_content(a: Option<&Entry>, b: Option<&Entry>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(Entry::Dir { .. }), Some(Entry::Dir { .. })) => true,
        (Some(Entry::File { sha256: x, .. }), Some(Entry::File { sha256: y, .. })) => x == y,
        (Some(Entry::Symlink { target: x }), Some(Entry::Symlink { target: y })) => x == y,
        _ => false,
    }
}

fn apply(
    host_dir: &Path,
    staging: &Path,
    before: &Manifest,
    now: &RemoteListing,
    changed_paths: &[String],
    deleted: &[String],
) -> Result<SyncReport, DriverError> {
    let mut report = SyncReport::default();
    // Deletions, children first.
    for path in deleted.iter().rev() {
        let target = sync::host_target(host_dir, path)?;
        let current = host_entry(&target)?;
        let Some(current) = current else { continue };
        if !same_content(Some(&current), before.get(path)) {
            report.conflicts.push(path.clone());
            continue;
        }
        let removed = if matches!(current, Entry::Dir { .. }) {
            // Only when empty: the host may hold files the run never saw.
            std::fs::remove_dir(&target).is_ok()
        } else {
            std::fs::remove_file(&target)
                .map_err(io_error(format!("removing {}", target.display())))
                .map(|()| true)?
        };
        if removed && !matches!(current, Entry::Dir { .. }) {
            report.files_deleted += 1;
        }
    }
    // Writes, parents first.
    let mut dir_modes = Vec::new();
    for path in changed_paths {
        let Some(remote) = now.get(path) else {
            continue;
        };
        let target = sync::host_target(host_dir, path)?;
        let current = host_entry(&target)?;
        if remote.kind == 'd' {
            match &current {
                Some(Entry::Dir { .. }) => {}
                Some(_) => {
                    report.conflicts.push(path.clone());
                    continue;
                }
                None => sync::create_dir(&target)?,
            }
            dir_modes.push((target, remote.mode));
            continue;
        }
        let staged = staging.join(path);
        let Some(incoming) = host_entry(&staged)? else {
            return Err(DriverError::failed(format!(
                "the remote did not send `{path}`"
            )));
        };
        if same_content(current.as_ref(), Some(&incoming)) {
            // Already as the remote has it (or only the mode moved): bring the mode along.
            if let (Some(Entry::File { mode, .. }), Entry::File { mode: new_mode, .. }) =
                (&current, &incoming)
                && mode != new_mode
            {
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*new_mode))
                    .map_err(io_error(format!(
                        "setting the mode of {}",
                        target.display()
                    )))?;
            }
            continue;
        }
        let host_unchanged = same_content(current.as_ref(), before.get(path));
        let destination = if host_unchanged {
            target.clone()
        } else {
            // Changed on both sides: the host's version stays, the remote's is kept beside it.
            report.conflicts.push(path.clone());
            sync::host_target(host_dir, &format!("{path}{CONFLICT_SUFFIX}"))?
        };
        if host_unchanged && matches!(current, Some(Entry::Dir { .. })) {
            report.conflicts.push(path.clone());
            continue;
        }
        match incoming {
            Entry::File { mode, .. } => {
                report.bytes_written += sync::replace_with_file(&staged, &destination, mode)?;
                // The remote's mtime, so that the next sync's quick check sees both sides in step.
                set_mtime(&destination, remote.mtime)?;
            }
            Entry::Symlink { target: link } => sync::replace_with_symlink(&link, &destination)?,
            Entry::Dir { .. } => continue,
        }
        report.files_written += 1;
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .map_err(io_error(format!("setting the mode of {}", dir.display())))?;
    }
    Ok(report)
}

fn set_mtime(path: &Path, seconds: i64) -> Result<(), DriverError> {
    let Ok(seconds) = u64::try_from(seconds) else {
        return Ok(());
    };
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .and_then(|file| file.set_modified(at))
        .map_err(io_error(format!("setting the mtime of {}", path.display())))
}

/// Shell that sets `d` to `dir` resolved (or exits 0 when it is gone) and kills every process of the user whose
/// working directory is in it (Linux `/proc`; elsewhere nothing matches).
fn kill_in(dir: &str) -> String {
    format!(
        "d=$(cd -- {} 2>/dev/null && pwd -P) || exit 0; for p in /proc/[0-9]*; do c=$(readlink \"$p/cwd\" 2>/dev/null) || continue; \
         case \"$c\" in \"$d\"|\"$d\"/*) kill -KILL \"${{p#/proc/}}\" 2>/dev/null;; esac; done",
        shell_quote(dir)
    )
}

/// Removes `dir` on the remote, first killing what still runs in it (a daemon the run left behind).
pub async fn remove(pool: &Arc<Pool>, target: &SshTarget, dir: &str) -> Result<(), DriverError> {
    // Read-only directories inside must not stop the removal.
    let script = format!(
        "{}; chmod -R u+w -- \"$d\" 2>/dev/null; rm -rf -- \"$d\"",
        kill_in(dir)
    );
    let output = control(pool, target, &script, None).await?;
    if output.success() {
        Ok(())
    } else {
        Err(DriverError::failed(format!(
            "cannot remove the remote workspace {dir}: {}",
            output.error_line()
        )))
    }
}

/// Kills every process of the remote user whose working directory is `dir` or below.
pub async fn kill_processes_in(
    pool: &Arc<Pool>,
    target: &SshTarget,
    dir: &str,
) -> Result<(), DriverError> {
    control(pool, target, &format!("{}; true", kill_in(dir)), None)
        .await
        .map(drop)
}

/// Creates `dir` on the remote.
pub async fn create(pool: &Arc<Pool>, target: &SshTarget, dir: &str) -> Result<(), DriverError> {
    let output = control(
        pool,
        target,
        &format!("mkdir -p -- {}", shell_quote(dir)),
        None,
    )
    .await?;
    if output.success() {
        Ok(())
    } else {
        Err(DriverError::failed(format!(
            "cannot create the remote workspace {dir}: {}",
            output.error_line()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_parse_and_skip_unclean_paths() {
        let raw = b"f 644 5 1700000000.5 a.txt\0\0d 755 4096 1700000000.0 src\0\0l 777 9 1700000001.0 src/link\0../a.txt\0f 600 1 1.0 ../escape\0\0";
        let listing = parse_listing(raw).unwrap();
        assert_eq!(listing.len(), 3);
        assert_eq!(listing["a.txt"].size, 5);
        assert_eq!(listing["a.txt"].mtime, 1_700_000_000);
        assert_eq!(listing["src"].size, 0);
        assert_eq!(listing["src/link"].link.as_deref(), Some("../a.txt"));
        assert!(!listing.contains_key("../escape"));
        let not_utf8 = b"f 644 1 1.0 caf\xe9\0\0f 644 2 1.0 ok\0\0";
        let listing = parse_listing(not_utf8).unwrap();
        assert_eq!(
            listing.keys().collect::<Vec<_>>(),
            ["ok"],
            "a name that is not UTF-8 is skipped"
        );
    }

    #[test]
    fn the_quick_check_compares_kind_mode_size_and_mtime() {
        let file = Entry::File {
            mode: 0o644,
            size: 5,
            sha256: String::new(),
        };
        let remote = RemoteEntry {
            kind: 'f',
            mode: 0o644,
            size: 5,
            mtime: 10,
            link: None,
        };
        assert!(up_to_date(&file, Some(10), Some(&remote)));
        assert!(!up_to_date(&file, Some(11), Some(&remote)));
        assert!(!up_to_date(&file, Some(10), None));
        let moved = RemoteEntry {
            mode: 0o755,
            ..remote
        };
        assert!(!up_to_date(&file, Some(10), Some(&moved)));
    }
}
