//! Copying workspaces into places that run commands, and what changed back out: **the rules of sync-back**, for
//! every driver that syncs (the fake and isolated sandboxes on this host through [`sync_back_with`]; SSH hosts and
//! plugin sandboxes through [`crate::remote_workspace`], which finds what changed its own way and applies it here,
//! through `apply`).
//!
//! Drivers that cannot run in place copy the host workspace in ([`copy_tree`], or a tar stream for a remote), keep
//! the [`Manifest`] of the host tree at that moment (in the workspace's metadata, see [`Manifest::to_value`], or in
//! memory), and after the run bring back what the environment changed.
//!
//! **What changed.** A path changed in the environment when it is new, gone, or differs from what the environment
//! held at sync-in in kind, permission bits, content or link target. On this host content is compared by SHA-256.
//! A remote is compared by its listing — kind, mode, size, mtime to the nanosecond, link target — and a file whose
//! listing did not move but whose mtime is within two seconds of the remote's clock at sync-in (a filesystem that
//! keeps whole seconds cannot tell an edit in that second from none) is fetched and compared by content. What the
//! environment did not change is never touched, whatever the host did to it meanwhile.
//!
//! **How it lands.** For each changed path, parents before children, after the deletions (children first):
//!
//! - The host still has what it had at sync-in there (same content; a directory is a directory): the environment's
//!   version replaces it — a new or changed file or link is written through a temporary file in the same directory
//!   and a rename, a deletion deletes it, and a change of kind works both ways (file or link ↔ directory: the old
//!   entry goes, a directory only once empty).
//! - The host changed it during the run (other content, deleted, another kind, something berth never syncs like a
//!   FIFO), or a directory the environment deleted or made a file still holds what the host added: a **conflict**.
//!   The host's version stays; the environment's file or link is written beside it as `NAME.berth-conflict` (the
//!   name shortened to fit 255 bytes), a directory's entries go below `NAME.berth-conflict/`, and the path is
//!   listed in [`SyncReport::conflicts`]. A deletion that meets a conflict is not applied.
//! - The host already has exactly what the environment has: nothing is written (a changed mode is still applied).
//!
//! Symlinks are copied as symlinks and never followed, in either direction: a link to `/etc` in a workspace stays a
//! link, and nothing is ever read or written through one. File modes are kept (the permission bits, `0o777`;
//! setuid, setgid and sticky bits are dropped). Names may be as long as the filesystem takes (255 bytes) and paths
//! as deep as it holds: every name is reached from its directory's descriptor, never through a whole path, and a
//! temporary name is short whatever the name it stands in for.
//!
//! **Nothing is lost silently.** One entry that cannot be applied (an I/O error, a name the host refuses) does not
//! stop the others: it is listed in [`SyncReport::skipped`] as [`SkipReason::Failed`] with the error, and the rest
//! still land. Entries are also skipped, and listed, when the environment listed a change it did not send
//! ([`SkipReason::NotSent`]), when a host path on the way is not a real directory even beside a conflict
//! ([`SkipReason::UnsafeHostPath`]), and for FIFOs, sockets and devices ([`SkipReason::SpecialFile`]). All but
//! special files are a **loss** ([`lost_entries`]): a change the environment made that is nowhere on the host, so a
//! run whose sync-back lost anything does not end as plain success (the server fails it with `sync_back_failed`).
//! Special files are not a loss: they are not workspace content in either direction (copy-in skips them too), and
//! what they would hold does not exist as data.
//!
//! **What comes back is untrusted**: the environment chooses it.
//!
//! - Both trees are walked from directory descriptors, one name at a time, never following a link (`openat` with
//!   `O_NOFOLLOW`): a link the environment plants, or a host directory swapped for one, never makes berth read or
//!   write outside either root.
//! - Files land with their permission bits only — never setuid, setgid or sticky. An existing host path is never
//!   opened for writing and nothing is opened blocking, so a FIFO on either side cannot hang a sync.
//! - The file content one sync-back brings is bounded ([`SyncBackLimits`]: the environment's `syncBackMaxMb`),
//!   counted while it is read and before anything is written, so a sparse 2 GB file counts as 2 GB. Past the bound
//!   sync-back fails with [`DriverError::SyncBackTooLarge`] before it has changed the host.
//! - A [`StopFlag`] (set when the run is cancelled) stops it between chunks and entries, with
//!   [`DriverError::SyncBackCancelled`]; [`CancelLatch`] keeps a run's cancel signal past `execute` so a driver's
//!   sync-back can watch it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::fs::{
    BUFFER_SIZE, Kind, Meta, Placement, Reach, RemovedDir, Slot, Tree, blocking,
    create_private_dir, io_error, is_clean_relative,
};
use berth_core::config::{DEFAULT_SYNC_BACK_MAX_MB, SYNC_BACK_MAX_MB_KEY};
use berth_core::driver::{
    CancelSignal, DriverError, LeaseHandle, SkipReason, SkippedEntry, SyncReport,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The permission bits that are copied.
const MODE_MASK: u32 = 0o777;

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

    #[cfg(test)]
    pub(crate) fn insert_for_tests(&mut self, path: &str, entry: Entry) {
        self.entries.insert(path.to_owned(), entry);
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

// === Limits, stops and cancels ===

/// Set once to stop a sync-back: it stops between chunks and between entries, and cleans up what it staged.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<StopInner>);

#[derive(Debug, Default)]
struct StopInner {
    stopped: AtomicBool,
    notify: tokio::sync::Notify,
}

impl StopFlag {
    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }

    /// Resolves once [`stop`](Self::stop) has been called.
    pub async fn stopped(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_stopped() {
                return;
            }
            notified.await;
        }
    }
}

/// What one sync-back may take from an environment, and what stops it.
#[derive(Clone, Debug)]
pub struct SyncBackLimits {
    max_mb: u64,
    stop: StopFlag,
}

impl Default for SyncBackLimits {
    fn default() -> Self {
        Self::new(DEFAULT_SYNC_BACK_MAX_MB)
    }
}

impl SyncBackLimits {
    /// At most `max_mb` MiB of file content (`syncBackMaxMb`).
    pub fn new(max_mb: u64) -> Self {
        Self {
            max_mb: max_mb.max(1),
            stop: StopFlag::default(),
        }
    }

    /// The bound a sandbox lease carries (`syncBackMaxMb` in its metadata, stamped by the sandbox driver from the
    /// environment's config), else the default.
    pub fn for_lease(lease: &LeaseHandle) -> Self {
        lease
            .metadata
            .get(SYNC_BACK_MAX_MB_KEY)
            .and_then(Value::as_u64)
            .map_or_else(Self::default, Self::new)
    }

    /// Stops when `stop` is set.
    pub fn with_stop(mut self, stop: StopFlag) -> Self {
        self.stop = stop;
        self
    }

    pub fn max_mb(&self) -> u64 {
        self.max_mb
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_mb.saturating_mul(1024 * 1024)
    }

    pub fn stop_flag(&self) -> &StopFlag {
        &self.stop
    }
}

/// The bytes one pass of a sync-back has taken from the environment, against its bound.
#[derive(Debug)]
pub(crate) struct Budget {
    limit_mb: u64,
    max_bytes: u64,
    used: u64,
    stop: StopFlag,
}

impl Budget {
    pub(crate) fn new(limits: &SyncBackLimits) -> Self {
        Self {
            limit_mb: limits.max_mb(),
            max_bytes: limits.max_bytes(),
            used: 0,
            stop: limits.stop.clone(),
        }
    }

    pub(crate) fn limit_mb(&self) -> u64 {
        self.limit_mb
    }

    /// Fails when `bytes` more would go past the bound, without taking them.
    pub(crate) fn check_fits(&self, bytes: u64) -> Result<(), DriverError> {
        if self.used.saturating_add(bytes) > self.max_bytes {
            return Err(DriverError::SyncBackTooLarge {
                limit_mb: self.limit_mb,
            });
        }
        self.check_stop()
    }

    /// Takes `bytes` (read, about to be written); fails past the bound or when stopped.
    pub(crate) fn take(&mut self, bytes: u64) -> Result<(), DriverError> {
        self.check_fits(bytes)?;
        self.used += bytes;
        Ok(())
    }

    pub(crate) fn check_stop(&self) -> Result<(), DriverError> {
        if self.stop.is_stopped() {
            Err(DriverError::SyncBackCancelled)
        } else {
            Ok(())
        }
    }
}

/// Keeps a run's cancel signal after `execute` returns, so that the sync-back that follows can watch it:
/// `execute` gets [`hold`](Self::hold)'s signal, sync-back waits on [`cancelled`](Self::cancelled).
#[derive(Clone, Default)]
pub struct CancelLatch(Arc<LatchInner>);

#[derive(Default)]
struct LatchInner {
    signal: tokio::sync::Mutex<Option<CancelSignal>>,
    fired: AtomicBool,
}

impl std::fmt::Debug for CancelLatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelLatch")
            .field("fired", &self.has_fired())
            .finish_non_exhaustive()
    }
}

impl CancelLatch {
    /// Keeps `cancel`; returns a signal that fires when it does, for `execute`.
    pub async fn hold(&self, cancel: CancelSignal) -> CancelSignal {
        *self.0.signal.lock().await = Some(cancel);
        self.0.fired.store(false, Ordering::SeqCst);
        let latch = self.clone();
        Box::pin(async move { latch.cancelled().await })
    }

    /// Whether the held signal has fired so far.
    pub fn has_fired(&self) -> bool {
        self.0.fired.load(Ordering::SeqCst)
    }

    /// Resolves when the held signal fires (at once if it has); never, if none is held. One waiter at a time
    /// polls the signal; others wait their turn.
    pub async fn cancelled(&self) {
        let mut slot = self.0.signal.lock().await;
        if self.has_fired() {
            return;
        }
        match slot.as_mut() {
            Some(signal) => {
                signal.as_mut().await;
                *slot = None;
                self.0.fired.store(true, Ordering::SeqCst);
            }
            None => {
                drop(slot);
                std::future::pending::<()>().await;
            }
        }
    }
}

// === Copy in, scan ===

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
    fn of(meta: &Meta) -> Self {
        Self {
            dev: meta.dev,
            ino: meta.ino,
            size: meta.size,
            mtime: meta.mtime,
            ctime: meta.ctime,
        }
    }
}

/// [`scan_tree`], reading only the files whose fingerprint changed since `cache` last saw them. Also returns each
/// file's mtime (seconds, nanoseconds), which the stat for the fingerprint has already read.
pub async fn scan_tree_cached(
    dir: &Path,
    cache: &Arc<HashCache>,
) -> Result<(Manifest, BTreeMap<String, (i64, u32)>), DriverError> {
    let (dir, cache) = (dir.to_path_buf(), cache.clone());
    blocking("the workspace sync", move || {
        let tree = Tree::open(&dir)?;
        let known = cache
            .roots
            .lock()
            .ok()
            .and_then(|mut roots| roots.remove(&dir))
            .unwrap_or_default();
        let mut seen = HashMap::with_capacity(known.len());
        let mut mtimes = BTreeMap::new();
        let mut manifest = Manifest::default();
        walk(
            &tree,
            &mut manifest,
            &mut Vec::new(),
            &mut |relative, slot, meta, entry| {
                let Entry::File { size, sha256, .. } = entry else {
                    return Ok(());
                };
                let fingerprint = Fingerprint::of(meta);
                let (seconds, nanos) = fingerprint.mtime;
                mtimes.insert(
                    relative.to_owned(),
                    (seconds, u32::try_from(nanos).unwrap_or_default()),
                );
                let (hashed_size, hash) = match known.get(relative) {
                    Some((cached, hash)) if *cached == fingerprint => {
                        (fingerprint.size, hash.clone())
                    }
                    _ => hash_slot(slot)?,
                };
                // A file that changed while it was hashed is not remembered: its next scan reads it again.
                if hashed_size == fingerprint.size {
                    seen.insert(relative.to_owned(), (fingerprint, hash.clone()));
                }
                *size = hashed_size;
                *sha256 = hash;
                Ok(())
            },
        )?;
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
        let tree = Tree::open(&dir)?;
        let mut manifest = Manifest::default();
        walk(&tree, &mut manifest, &mut Vec::new(), &mut hash_entry)?;
        Ok(manifest)
    })
    .await
}

// === Sync back ===

/// [`sync_back_with`] under the default [`SyncBackLimits`].
pub async fn sync_back(
    sandbox_dir: &Path,
    host_dir: &Path,
    at_copy_in: &Manifest,
) -> Result<SyncReport, DriverError> {
    sync_back_with(
        sandbox_dir,
        host_dir,
        at_copy_in,
        &SyncBackLimits::default(),
    )
    .await
}

/// Makes `workspace` an empty private directory for a fresh copy of `local_path`, and returns `local_path` resolved,
/// checked to be a directory. Blocking; the sandbox providers' copy-in starts here.
pub fn empty_for_copy(workspace: &Path, local_path: &Path) -> Result<PathBuf, DriverError> {
    match std::fs::remove_dir_all(workspace) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_error(format!("clearing {}", workspace.display()))(err)),
    }
    create_private_dir(workspace)?;
    let resolved = std::fs::canonicalize(local_path).map_err(|err| {
        DriverError::failed(format!(
            "the workspace path {} is not usable: {err}",
            local_path.display()
        ))
    })?;
    if !resolved.is_dir() {
        return Err(DriverError::failed(format!(
            "the workspace path {} is not a directory",
            local_path.display()
        )));
    }
    Ok(resolved)
}

/// Brings what changed in `sandbox_dir` since `at_copy_in` (the manifest [`copy_tree`] returned) to `host_dir`.
///
/// What the sandbox changed is compared by content hash with `at_copy_in` and applied by the rules of this module
/// (see the module doc): changes land, deletions delete what the host still has as it was, a path the host changed
/// too is a conflict (the host's version stays, the sandbox's goes beside it), and an entry that cannot be applied is
/// reported while the rest still are. Nothing is read outside `sandbox_dir` or written outside `host_dir`, and never
/// through a symlink. The sandbox's file content is counted against `limits` while it is read, before anything is
/// written: past it, nothing is changed on the host.
pub async fn sync_back_with(
    sandbox_dir: &Path,
    host_dir: &Path,
    at_copy_in: &Manifest,
    limits: &SyncBackLimits,
) -> Result<SyncReport, DriverError> {
    let (sandbox_dir, host_dir, before, limits) = (
        sandbox_dir.to_path_buf(),
        host_dir.to_path_buf(),
        at_copy_in.clone(),
        limits.clone(),
    );
    blocking("the workspace sync", move || {
        sync_back_blocking(&sandbox_dir, &host_dir, &before, &limits)
    })
    .await
}

/// What a walk calls for every entry: its relative path, its slot, its `lstat`, and the entry (a file's hash still
/// empty: the visitor fills it in, so each file is read once).
type Visit<'v> = dyn FnMut(&str, &Slot, &Meta, &mut Entry) -> Result<(), DriverError> + 'v;

/// Calls `visit` for every entry of `tree`, parents before children, then records the entry in `manifest`. Never
/// follows a symlink; special files (FIFOs, sockets, devices) are not visited but listed in `specials`.
fn walk(
    tree: &Tree,
    manifest: &mut Manifest,
    specials: &mut Vec<String>,
    visit: &mut Visit<'_>,
) -> Result<(), DriverError> {
    walk_dir(
        tree,
        &tree.root(),
        tree.path(),
        "",
        manifest,
        specials,
        visit,
    )
}

fn walk_dir(
    tree: &Tree,
    dir: &Arc<OwnedFd>,
    dir_path: &Path,
    prefix: &str,
    manifest: &mut Manifest,
    specials: &mut Vec<String>,
    visit: &mut Visit<'_>,
) -> Result<(), DriverError> {
    for name in Tree::names(dir, dir_path)? {
        let relative = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let slot = tree.slot_in(dir, &name, &relative);
        let Some(meta) = slot.meta()? else {
            // Gone since the directory was read.
            continue;
        };
        let mode = meta.mode & MODE_MASK;
        let mut entry = match meta.kind {
            Kind::Symlink => match slot.read_link()? {
                Some(target) => Entry::Symlink { target },
                None => {
                    tracing::warn!(path = %slot.path().display(), "skipping a symlink whose target is not UTF-8");
                    continue;
                }
            },
            Kind::Dir => Entry::Dir { mode },
            Kind::File => Entry::File {
                mode,
                size: meta.size,
                sha256: String::new(),
            },
            Kind::Special => {
                tracing::debug!(path = %slot.path().display(), "skipping a workspace entry that is not a file, directory or symlink");
                specials.push(relative);
                continue;
            }
        };
        visit(&relative, &slot, &meta, &mut entry)?;
        let is_dir = entry.is_dir();
        manifest.entries.insert(relative.clone(), entry);
        if is_dir {
            // Opened without following a link: a directory swapped for one since its stat is not entered.
            if let Some(child) = slot.open_dir()? {
                walk_dir(
                    tree,
                    &child,
                    slot.path(),
                    &relative,
                    manifest,
                    specials,
                    visit,
                )?;
            }
        }
    }
    Ok(())
}

/// The visitor of a scan: hashes files, leaves the rest as listed.
fn hash_entry(
    _relative: &str,
    slot: &Slot,
    _meta: &Meta,
    entry: &mut Entry,
) -> Result<(), DriverError> {
    if let Entry::File { size, sha256, .. } = entry {
        let (hashed_size, hash) = hash_slot(slot)?;
        *size = hashed_size;
        *sha256 = hash;
    }
    Ok(())
}

/// Size and hash of the regular file in `slot`.
pub(crate) fn hash_slot(slot: &Slot) -> Result<(u64, String), DriverError> {
    let Some((mut file, _)) = slot.open_file()? else {
        return Err(changed_while_read(slot.path()));
    };
    hash_reader(&mut file, slot.path(), u64::MAX, None)
}

fn changed_while_read(path: &Path) -> DriverError {
    DriverError::failed(format!(
        "{} changed while it was being read (it is no longer a regular file)",
        path.display()
    ))
}

/// Reads `source` to its end, hashing it. The first `free` bytes are not counted; every byte after them is taken
/// from `budget` (when given) before it is hashed.
pub(crate) fn hash_reader(
    source: &mut dyn Read,
    path: &Path,
    free: u64,
    mut budget: Option<&mut Budget>,
) -> Result<(u64, String), DriverError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; BUFFER_SIZE];
    let mut size = 0_u64;
    loop {
        let n = match source.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(io_error(format!("reading {}", path.display()))(err)),
        };
        if let Some(budget) = budget.as_deref_mut() {
            let counted = (size + n as u64).saturating_sub(free.max(size));
            budget.take(counted)?;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

fn copy_tree_blocking(from: &Path, to: &Path) -> Result<Manifest, DriverError> {
    let source = Tree::open(from)?;
    fs::create_dir_all(to).map_err(io_error(format!("creating {}", to.display())))?;
    let target = Tree::open(to)?;
    let mut manifest = Manifest::default();
    // Directory modes are applied last, deepest first: a read-only directory must still receive its contents.
    let mut dir_modes: Vec<(String, u32)> = Vec::new();
    walk(
        &source,
        &mut manifest,
        &mut Vec::new(),
        &mut |relative, slot, _meta, entry| {
            let Reach::Slot(into) = target.reach(relative, false)? else {
                return Err(DriverError::failed(format!(
                    "cannot copy `{relative}`: its directory in {} is gone",
                    to.display()
                )));
            };
            match entry {
                Entry::Dir { mode } => {
                    into.create_dir()?;
                    dir_modes.push((relative.to_owned(), *mode));
                }
                Entry::File { mode, size, sha256 } => {
                    let Some((mut file, _)) = slot.open_file()? else {
                        return Err(changed_while_read(slot.path()));
                    };
                    // Hash what was actually copied: the file may have changed since it was listed.
                    let (copied_size, hash) =
                        into.write_file(&mut file, *mode, None, Placement::CreateNew, &mut |_| {
                            Ok(())
                        })?;
                    *size = copied_size;
                    *sha256 = hash;
                }
                Entry::Symlink { target: link } => {
                    into.write_symlink(link, Placement::CreateNew)?
                }
            }
            Ok(())
        },
    )?;
    for (relative, mode) in dir_modes.into_iter().rev() {
        if let Reach::Slot(slot) = target.reach(&relative, false)? {
            slot.set_dir_mode(mode)?;
        }
    }
    Ok(manifest)
}

// === Applying what changed ===

/// The suffix of the environment's version of a path that changed on both sides, written beside the host's.
pub const CONFLICT_SUFFIX: &str = ".berth-conflict";

/// The longest name Linux filesystems take (`NAME_MAX`, in bytes).
const NAME_MAX: usize = 255;

/// `path` with [`CONFLICT_SUFFIX`] on its last name, that name first shortened (at a character boundary) so that the
/// result still fits in `NAME_MAX`: a 250-byte name must have a conflict copy too.
pub fn conflict_path(path: &str) -> String {
    let (parent, name) = match path.rsplit_once('/') {
        Some((parent, name)) => (Some(parent), name),
        None => (None, path),
    };
    let mut keep = name.len().min(NAME_MAX - CONFLICT_SUFFIX.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    let beside = format!("{}{CONFLICT_SUFFIX}", &name[..keep]);
    match parent {
        Some(parent) => format!("{parent}/{beside}"),
        None => beside,
    }
}

/// What the environment holds now at a path that changed since sync-in.
#[derive(Debug)]
pub(crate) enum Incoming {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        sha256: String,
        /// The environment's mtime (seconds, nanoseconds), kept so that both sides look alike to the next sync.
        mtime: Option<(i64, u32)>,
        content: Content,
    },
    Symlink {
        target: String,
    },
    /// Listed as changed, but its content did not arrive: reported, never applied.
    Missing {
        reason: SkipReason,
        detail: Option<String>,
    },
}

/// Where an incoming file's content is read from.
#[derive(Debug)]
pub(crate) enum Content {
    /// A staging file berth wrote (from a remote's archive).
    Staged(PathBuf),
    /// The same path in the environment's tree on this host.
    Environment,
}

/// What changed in the environment since sync-in.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// Paths the environment held at sync-in and holds no more.
    pub(crate) deleted: Vec<String>,
    /// Paths that are new or differ (kind, mode, content, target), with what they are now.
    pub(crate) changed: BTreeMap<String, Incoming>,
    /// What was left out before anything was applied (special files).
    pub(crate) skipped: Vec<SkippedEntry>,
}

/// What a host path holds now.
#[derive(Debug)]
enum HostState {
    Absent,
    /// In manifest terms (files hashed).
    Entry(Entry),
    /// A FIFO, socket or device (never opened), or a link whose target is not UTF-8.
    Other,
}

fn host_state(slot: &Slot) -> Result<HostState, DriverError> {
    let Some(meta) = slot.meta()? else {
        return Ok(HostState::Absent);
    };
    Ok(match meta.kind {
        Kind::Symlink => match slot.read_link()? {
            Some(target) => HostState::Entry(Entry::Symlink { target }),
            None => HostState::Other,
        },
        Kind::Dir => HostState::Entry(Entry::Dir {
            mode: meta.mode & MODE_MASK,
        }),
        Kind::File => match slot.open_file()? {
            Some((mut file, meta)) => {
                let (size, sha256) = hash_reader(&mut file, slot.path(), u64::MAX, None)?;
                HostState::Entry(Entry::File {
                    mode: meta.mode & MODE_MASK,
                    size,
                    sha256,
                })
            }
            None => HostState::Other,
        },
        Kind::Special => HostState::Other,
    })
}

/// Same content (modes aside): what decides whether the host changed a path during the run.
fn same_content(current: &HostState, before: Option<&Entry>) -> bool {
    match (current, before) {
        (HostState::Absent, None) => true,
        (HostState::Entry(current), Some(before)) => match (current, before) {
            (Entry::Dir { .. }, Entry::Dir { .. }) => true,
            (Entry::File { sha256: x, .. }, Entry::File { sha256: y, .. }) => x == y,
            (Entry::Symlink { target: x }, Entry::Symlink { target: y }) => x == y,
            _ => false,
        },
        _ => false,
    }
}

/// Whether the host already holds what the environment has (modes aside).
fn already_there(current: &HostState, incoming: &Incoming) -> bool {
    match (current, incoming) {
        (HostState::Entry(Entry::File { sha256: x, .. }), Incoming::File { sha256: y, .. }) => {
            x == y
        }
        (HostState::Entry(Entry::Symlink { target: x }), Incoming::Symlink { target: y }) => x == y,
        (HostState::Entry(Entry::Dir { .. }), Incoming::Dir { .. }) => true,
        _ => false,
    }
}

/// Reports `path` as skipped for `reason`, and logs it.
pub(crate) fn skip(report: &mut SyncReport, path: &str, reason: SkipReason) {
    report.skipped.push(skipped(path.to_owned(), reason));
}

/// An entry sync-back skips for `reason`, logged as it is made.
pub(crate) fn skipped(path: String, reason: SkipReason) -> SkippedEntry {
    tracing::warn!(path, reason = reason.as_str(), "sync-back skipped an entry");
    SkippedEntry {
        path,
        reason,
        detail: None,
    }
}

/// The entries of `report` whose change the environment made did not arrive on the host: what makes a sync-back
/// fail (see the module's rules). Special files are not workspace content and are left out.
pub fn lost_entries(report: &SyncReport) -> Vec<&SkippedEntry> {
    report
        .skipped
        .iter()
        .filter(|entry| entry.reason != SkipReason::SpecialFile)
        .collect()
}

/// Applies `changes` to the host tree at `host_dir`, by the rules of this module. `before` is the host tree at
/// sync-in; `environment` is the environment's tree when it is on this host (its files are read from there).
///
/// One entry that cannot be applied is reported ([`SkipReason::Failed`], with the error) and the rest still are;
/// only a stop ([`DriverError::SyncBackCancelled`]) or a host root that cannot be opened ends it early.
pub(crate) fn apply(
    host_dir: &Path,
    environment: Option<&Tree>,
    before: &Manifest,
    changes: Changes,
    limits: &SyncBackLimits,
) -> Result<SyncReport, DriverError> {
    let mut applier = Applier {
        host: Tree::open(host_dir)?,
        environment,
        before,
        budget: Budget::new(limits),
        report: SyncReport {
            skipped: changes.skipped,
            ..SyncReport::default()
        },
        redirects: Vec::new(),
        dir_modes: Vec::new(),
        not_dirs: changes
            .changed
            .iter()
            .filter(|(_, incoming)| !matches!(incoming, Incoming::Dir { .. }))
            .map(|(path, _)| path.clone())
            .collect(),
    };
    // Deletions first, children before parents, so that a path that changed kind is free for its new entry.
    let mut deleted = changes.deleted;
    deleted.sort();
    for path in deleted.iter().rev() {
        applier.budget.check_stop()?;
        let result = applier.delete(path);
        applier.settle(path, result)?;
    }
    // Then writes, parents before children (a parent sorts before its children).
    for (path, incoming) in &changes.changed {
        applier.budget.check_stop()?;
        let result = applier.write(path, incoming);
        applier.settle(path, result)?;
    }
    // Directory modes last, deepest first: a read-only directory must still have received its contents.
    for (path, mode) in std::mem::take(&mut applier.dir_modes).into_iter().rev() {
        let result = match applier.host.reach(&path, false) {
            Ok(Reach::Slot(slot)) => slot.set_dir_mode(mode).map(drop),
            Ok(Reach::Missing | Reach::Blocked { .. }) => Ok(()),
            Err(error) => Err(error),
        };
        applier.settle(&path, result)?;
    }
    tracing::debug!(
        host_dir = %host_dir.display(),
        files_written = applier.report.files_written,
        files_deleted = applier.report.files_deleted,
        bytes_written = applier.report.bytes_written,
        conflicts = applier.report.conflicts.len(),
        skipped = applier.report.skipped.len(),
        "workspace synced back"
    );
    Ok(applier.report)
}

struct Applier<'a> {
    host: Tree,
    environment: Option<&'a Tree>,
    before: &'a Manifest,
    /// What is copied is counted again: a file on this host may have grown since it was scanned.
    budget: Budget,
    report: SyncReport,
    /// Environment directories that met a conflict, and where what the environment has below them goes instead.
    redirects: Vec<(String, String)>,
    dir_modes: Vec<(String, u32)>,
    /// Paths the environment says are no directory: one that still has entries below it is a hostile listing.
    not_dirs: std::collections::HashSet<String>,
}

impl Applier<'_> {
    /// Records an entry's failure and goes on; only a stop ends the sync-back.
    fn settle(&mut self, path: &str, result: Result<(), DriverError>) -> Result<(), DriverError> {
        match result {
            Ok(()) => Ok(()),
            Err(DriverError::SyncBackCancelled) => Err(DriverError::SyncBackCancelled),
            Err(error) => {
                tracing::warn!(path, error = %error, "sync-back could not apply an entry; applying the rest");
                self.report.skipped.push(SkippedEntry {
                    path: path.to_owned(),
                    reason: SkipReason::Failed,
                    detail: Some(error.to_string()),
                });
                Ok(())
            }
        }
    }

    fn conflict(&mut self, path: &str) {
        if !self.report.conflicts.iter().any(|known| known == path) {
            tracing::info!(
                path,
                "changed on both sides during the run: the host's version is kept"
            );
            self.report.conflicts.push(path.to_owned());
        }
    }

    /// Where the environment's `path` goes on the host: below a conflicting directory's conflict path, else itself.
    fn redirected(&self, path: &str) -> String {
        self.redirects
            .iter()
            .filter_map(|(from, to)| {
                let rest = path.strip_prefix(from.as_str())?.strip_prefix('/')?;
                Some((from.len(), format!("{to}/{rest}")))
            })
            .max_by_key(|(depth, _)| *depth)
            .map_or_else(|| path.to_owned(), |(_, to)| to)
    }

    /// The environment deleted `path`: it goes from the host only if the host still has it as it was at sync-in.
    fn delete(&mut self, path: &str) -> Result<(), DriverError> {
        let slot = match self.host.reach(path, false)? {
            Reach::Slot(slot) => slot,
            Reach::Missing => return Ok(()),
            Reach::Blocked { at } => {
                // The host made a directory on the way something else during the run: its version stays.
                self.conflict(&at);
                return Ok(());
            }
        };
        let current = host_state(&slot)?;
        if matches!(current, HostState::Absent) {
            return Ok(());
        }
        if !same_content(&current, self.before.get(path)) {
            self.conflict(path);
            return Ok(());
        }
        if matches!(current, HostState::Entry(Entry::Dir { .. })) {
            // Only when empty: what the host added to it during the run stays.
            if slot.remove_dir()? == RemovedDir::NotEmpty {
                self.conflict(path);
            }
        } else if slot.remove_file()? {
            self.report.files_deleted += 1;
        }
        Ok(())
    }

    /// The environment has `incoming` at `path`, new or changed since sync-in.
    fn write(&mut self, path: &str, incoming: &Incoming) -> Result<(), DriverError> {
        if let Incoming::Missing { reason, detail } = incoming {
            tracing::warn!(
                path,
                reason = reason.as_str(),
                "sync-back did not receive an entry"
            );
            self.report.skipped.push(SkippedEntry {
                path: path.to_owned(),
                reason: *reason,
                detail: detail.clone(),
            });
            return Ok(());
        }
        let target = self.redirected(path);
        let redirected = target != path;
        let slot = match self.host.reach(&target, true)? {
            Reach::Slot(slot) => slot,
            Reach::Missing => {
                return Err(DriverError::failed(format!(
                    "a directory on the way to `{target}` could not be created"
                )));
            }
            Reach::Blocked { at } if !redirected && !self.not_dirs.contains(&at) => {
                // A directory the environment kept is something else on the host now (a link, a file): the host
                // changed it during the run, so its version stays and the environment's entries go beside it.
                self.conflict(&at);
                self.redirects.push((at.clone(), conflict_path(&at)));
                return self.write(path, incoming);
            }
            Reach::Blocked { at } => {
                blocked(&mut self.report, path, &at);
                return Ok(());
            }
        };
        let current = host_state(&slot)?;
        let before = if redirected {
            None
        } else {
            self.before.get(path)
        };
        let host_unchanged = same_content(&current, before);
        if let Incoming::Dir { mode } = incoming {
            match current {
                HostState::Entry(Entry::Dir { .. }) => {}
                HostState::Absent => slot.create_dir()?,
                // A file or link as at sync-in: the environment made it a directory.
                _ if host_unchanged => {
                    slot.remove_file()?;
                    slot.create_dir()?;
                }
                _ => {
                    self.conflict(path);
                    let beside = conflict_path(&target);
                    self.redirects.push((path.to_owned(), beside.clone()));
                    let Reach::Slot(beside_slot) = self.host.reach(&beside, true)? else {
                        skip(&mut self.report, path, SkipReason::UnsafeHostPath);
                        return Ok(());
                    };
                    match beside_slot.meta()? {
                        None => beside_slot.create_dir()?,
                        Some(meta) if meta.kind == Kind::Dir => {}
                        Some(_) => {
                            return Err(DriverError::failed(format!(
                                "`{beside}` is in the way of the environment's directory `{path}`"
                            )));
                        }
                    }
                    self.dir_modes.push((beside, *mode));
                    return Ok(());
                }
            }
            self.dir_modes.push((target, *mode));
            return Ok(());
        }
        if already_there(&current, incoming) {
            // Only the mode may have moved: bring it along.
            if let (HostState::Entry(Entry::File { mode, .. }), Incoming::File { mode: new, .. }) =
                (&current, incoming)
                && mode != new
            {
                slot.set_file_mode(*new)?;
            }
            return Ok(());
        }
        let free = match current {
            _ if !host_unchanged => false,
            // A directory as at sync-in, that the environment made a file or link: emptied by the deletions above
            // unless the host added to it.
            HostState::Entry(Entry::Dir { .. }) => slot.remove_dir()? != RemovedDir::NotEmpty,
            _ => true,
        };
        let destination = if free {
            slot
        } else {
            // Changed on both sides (or something berth never synced is there, a FIFO): the host's version stays,
            // the environment's is written beside it.
            self.conflict(path);
            match self.host.reach(&conflict_path(&target), true)? {
                Reach::Slot(slot) => slot,
                Reach::Missing | Reach::Blocked { .. } => {
                    skip(&mut self.report, path, SkipReason::UnsafeHostPath);
                    return Ok(());
                }
            }
        };
        self.put(path, &destination, incoming)
    }

    /// Writes the environment's file or link `path` at `destination`.
    fn put(
        &mut self,
        path: &str,
        destination: &Slot,
        incoming: &Incoming,
    ) -> Result<(), DriverError> {
        match incoming {
            Incoming::File {
                mode,
                mtime,
                content,
                ..
            } => {
                let source = match content {
                    Content::Staged(staged) => Some(
                        fs::File::open(staged)
                            .map_err(io_error(format!("reading the staged `{path}`")))?,
                    ),
                    Content::Environment => match self.environment {
                        Some(environment) => match environment.reach(path, false)? {
                            Reach::Slot(source) => source.open_file()?.map(|(file, _)| file),
                            Reach::Missing | Reach::Blocked { .. } => None,
                        },
                        None => None,
                    },
                };
                let Some(mut source) = source else {
                    skip(&mut self.report, path, SkipReason::NotSent);
                    return Ok(());
                };
                let budget = &mut self.budget;
                let (size, _) = destination.write_file(
                    &mut source,
                    *mode,
                    *mtime,
                    Placement::Replace,
                    &mut |n| budget.take(n),
                )?;
                self.report.files_written += 1;
                self.report.bytes_written += size;
            }
            Incoming::Symlink { target } => {
                destination.write_symlink(target, Placement::Replace)?;
                self.report.files_written += 1;
            }
            Incoming::Dir { .. } | Incoming::Missing { .. } => {}
        }
        Ok(())
    }
}

/// Reports `path` as skipped: `at`, a directory on its way on the host, is a symlink or not a directory.
pub(crate) fn blocked(report: &mut SyncReport, path: &str, at: &str) {
    tracing::warn!(
        path,
        at,
        "not writing through a host path that is not a real directory"
    );
    report.skipped.push(SkippedEntry {
        path: path.to_owned(),
        reason: SkipReason::UnsafeHostPath,
        detail: None,
    });
}

fn sync_back_blocking(
    sandbox_dir: &Path,
    host_dir: &Path,
    before: &Manifest,
    limits: &SyncBackLimits,
) -> Result<SyncReport, DriverError> {
    let sandbox = Tree::open(sandbox_dir)?;

    // Read (and count) everything the sandbox sends before touching the host: past the bound, nothing changes.
    let mut budget = Budget::new(limits);
    let mut after = Manifest::default();
    let mut specials = Vec::new();
    walk(
        &sandbox,
        &mut after,
        &mut specials,
        &mut |relative, slot, meta, entry| {
            budget.check_stop()?;
            let Entry::File { size, sha256, .. } = entry else {
                return Ok(());
            };
            let known = match before.get(relative) {
                Some(Entry::File { size, sha256, .. }) => Some((*size, sha256.as_str())),
                _ => None,
            };
            // A file as large as at copy-in may be unchanged: its bytes count only once it turns out otherwise.
            let free = known.map_or(0, |(known_size, _)| known_size.min(meta.size));
            budget.check_fits(meta.size - free)?;
            let Some((mut file, _)) = slot.open_file()? else {
                return Err(changed_while_read(slot.path()));
            };
            let (read, hash) = hash_reader(&mut file, slot.path(), free, Some(&mut budget))?;
            if known.is_none_or(|(known_size, known_hash)| known_size != read || known_hash != hash)
            {
                budget.take(free.min(read))?;
            }
            *size = read;
            *sha256 = hash;
            Ok(())
        },
    )?;

    let mut changes = Changes::default();
    changes.skipped.extend(
        specials
            .into_iter()
            .map(|path| skipped(path, SkipReason::SpecialFile)),
    );
    changes.deleted = before
        .entries
        .keys()
        .filter(|path| !after.entries.contains_key(*path))
        .cloned()
        .collect();
    for (path, entry) in after.entries {
        if before.get(&path) == Some(&entry) {
            continue;
        }
        let incoming = match entry {
            Entry::Dir { mode } => Incoming::Dir { mode },
            Entry::File { mode, sha256, .. } => Incoming::File {
                mode,
                sha256,
                mtime: None,
                content: Content::Environment,
            },
            Entry::Symlink { target } => Incoming::Symlink { target },
        };
        changes.changed.insert(path, incoming);
    }
    apply(host_dir, Some(&sandbox), before, changes, limits)
}

#[cfg(test)]
mod tests {
    use std::fs::Permissions;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::time::Duration;

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
                // README.md, new.txt, out/bin/tool, main-link, abs-link (src/main.rs only changed its mode: it is
                // not rewritten).
                files_written: 5,
                // src/nested/deep.txt, locked.txt.
                files_deleted: 2,
                bytes_written: 8 + 9 + 4,
                conflicts: Vec::new(),
                skipped: Vec::new(),
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

        let report = sync_back(&sandbox, &host, &manifest).await.unwrap();

        // Both links are the host's doing during the run: they stay, and the environment's versions go beside.
        assert_eq!(report.conflicts, ["plain", "sub"]);
        assert!(fs::symlink_metadata(host.join("sub")).unwrap().is_symlink());
        assert_eq!(
            fs::read_to_string(host.join("sub.berth-conflict/file")).unwrap(),
            "inside"
        );
        assert!(!outside.join("file").exists());
        assert!(
            fs::symlink_metadata(host.join("plain"))
                .unwrap()
                .is_symlink()
        );
        assert_eq!(
            fs::read_to_string(host.join("plain.berth-conflict")).unwrap(),
            "replaced"
        );
        assert_eq!(
            fs::read_to_string(outside.join("victim")).unwrap(),
            "original"
        );
    }

    #[tokio::test]
    async fn host_ancestor_symlinks_are_never_written_through() {
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

        let report = sync_back(&sandbox, &host, &manifest).await.unwrap();
        assert!(report.skipped.is_empty(), "{report:?}");
        assert_eq!(report.conflicts, ["dir"]);
        assert_eq!(
            fs::read_to_string(host.join("dir.berth-conflict/file")).unwrap(),
            "v2"
        );
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

    // === What comes back is untrusted ===

    /// Every path under `root` (not following links) whose mode has a setuid or setgid bit.
    fn setid_files(root: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                if meta.permissions().mode() & 0o6000 != 0 {
                    found.push(path.clone());
                }
                if meta.is_dir() {
                    stack.push(path);
                }
            }
        }
        found
    }

    fn mkfifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
    }

    /// A sandbox copied from an empty host, and the manifest of that copy.
    async fn empty_pair(temp: &Path) -> (PathBuf, PathBuf, Manifest) {
        let host = temp.join("host");
        fs::create_dir(&host).unwrap();
        let sandbox = temp.join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();
        (host, sandbox, manifest)
    }

    #[tokio::test]
    async fn setuid_setgid_and_sticky_bits_never_land_on_either_side() {
        let temp = tempfile::tempdir().unwrap();
        let host = temp.path().join("host");
        fs::create_dir(&host).unwrap();
        fs::write(host.join("host-suid"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(host.join("host-suid"), Permissions::from_mode(0o4755)).unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();
        assert_eq!(mode_of(&sandbox.join("host-suid")), 0o755);

        // The environment makes a setuid copy of a binary, a setgid file, and a setgid, sticky directory.
        fs::copy("/usr/bin/id", sandbox.join("suid")).unwrap();
        fs::set_permissions(sandbox.join("suid"), Permissions::from_mode(0o4755)).unwrap();
        fs::write(sandbox.join("sgid"), "x").unwrap();
        fs::set_permissions(sandbox.join("sgid"), Permissions::from_mode(0o2750)).unwrap();
        fs::create_dir(sandbox.join("shared")).unwrap();
        fs::write(sandbox.join("shared/file"), "y").unwrap();
        fs::set_permissions(sandbox.join("shared"), Permissions::from_mode(0o3777)).unwrap();
        fs::set_permissions(sandbox.join("host-suid"), Permissions::from_mode(0o6711)).unwrap();

        let report = sync_back(&sandbox, &host, &manifest).await.unwrap();
        assert_eq!(mode_of(&host.join("suid")), 0o755);
        assert_eq!(
            fs::read(host.join("suid")).unwrap(),
            fs::read("/usr/bin/id").unwrap()
        );
        assert_eq!(mode_of(&host.join("sgid")), 0o750);
        assert_eq!(mode_of(&host.join("shared")), 0o777);
        // A mode change that only adds setid bits is no change at all.
        assert_eq!(mode_of(&host.join("host-suid")), 0o4711 & 0o777);
        assert!(setid_files(&host).is_empty(), "{:?}", setid_files(&host));
        assert!(report.skipped.is_empty(), "{report:?}");
    }

    #[tokio::test]
    async fn a_host_fifo_is_kept_never_opened() {
        let temp = tempfile::tempdir().unwrap();
        let (host, sandbox, manifest) = empty_pair(temp.path()).await;
        // The host grows FIFOs where the environment writes a file and makes a directory; nobody ever opens them.
        mkfifo(&host.join("pipe"));
        mkfifo(&host.join("dir"));
        fs::write(sandbox.join("pipe"), "data").unwrap();
        fs::create_dir(sandbox.join("dir")).unwrap();
        fs::write(sandbox.join("dir/inside"), "in").unwrap();

        let report = tokio::time::timeout(
            Duration::from_secs(10),
            sync_back(&sandbox, &host, &manifest),
        )
        .await
        .expect("sync-back blocked on a FIFO")
        .unwrap();
        // The FIFOs are the host's: they stay, and the environment's entries go beside them.
        assert_eq!(report.conflicts, ["dir", "pipe"]);
        assert_eq!(
            fs::read_to_string(host.join("pipe.berth-conflict")).unwrap(),
            "data"
        );
        assert_eq!(
            fs::read_to_string(host.join("dir.berth-conflict/inside")).unwrap(),
            "in"
        );
        assert_eq!(report.files_written, 2);
    }

    #[tokio::test]
    async fn a_file_swapped_for_a_fifo_in_the_sandbox_is_never_opened() {
        let temp = tempfile::tempdir().unwrap();
        let host = temp.path().join("host");
        fs::create_dir(&host).unwrap();
        fs::write(host.join("file"), "host").unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();
        fs::remove_file(sandbox.join("file")).unwrap();
        mkfifo(&sandbox.join("file"));

        let report = tokio::time::timeout(
            Duration::from_secs(10),
            sync_back(&sandbox, &host, &manifest),
        )
        .await
        .expect("sync-back blocked on a FIFO")
        .unwrap();
        // The file is gone from the sandbox (a FIFO is no file): gone from the host too, and the FIFO reported.
        assert!(!host.join("file").exists());
        assert_eq!(
            report.skipped,
            [SkippedEntry {
                path: "file".to_owned(),
                reason: SkipReason::SpecialFile,
                detail: None,
            }]
        );
    }

    #[tokio::test]
    async fn fifos_sockets_and_devices_from_the_environment_are_skipped_and_reported() {
        let temp = tempfile::tempdir().unwrap();
        let (host, sandbox, manifest) = empty_pair(temp.path()).await;
        mkfifo(&sandbox.join("fifo"));
        let _listener = std::os::unix::net::UnixListener::bind(sandbox.join("socket")).unwrap();
        fs::create_dir(sandbox.join("dev")).unwrap();
        // A device node needs CAP_MKNOD: the tests run as root (see ARCHITECTURE: the sshd tests need it too).
        rustix::fs::mknodat(
            rustix::fs::CWD,
            sandbox.join("dev/null"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        fs::write(sandbox.join("regular"), "ok").unwrap();

        let report = tokio::time::timeout(
            Duration::from_secs(10),
            sync_back(&sandbox, &host, &manifest),
        )
        .await
        .unwrap()
        .unwrap();
        let mut skipped: Vec<(&str, SkipReason)> = report
            .skipped
            .iter()
            .map(|entry| (entry.path.as_str(), entry.reason))
            .collect();
        skipped.sort_by_key(|(path, _)| *path);
        assert_eq!(
            skipped,
            [
                ("dev/null", SkipReason::SpecialFile),
                ("fifo", SkipReason::SpecialFile),
                ("socket", SkipReason::SpecialFile),
            ]
        );
        assert_eq!(fs::read_to_string(host.join("regular")).unwrap(), "ok");
        assert!(fs::symlink_metadata(host.join("dev")).unwrap().is_dir());
        for gone in ["fifo", "socket", "dev/null"] {
            assert!(
                fs::symlink_metadata(host.join(gone)).is_err(),
                "{gone} reached the host"
            );
        }
    }

    #[tokio::test]
    async fn a_planted_symlink_never_redirects_writes_outside_the_host_workspace() {
        let temp = tempfile::tempdir().unwrap();
        let outside = temp.path().join("etc");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("passwd"), "root:x:0:0\n").unwrap();
        let host = temp.path().join("host");
        fs::create_dir_all(host.join("x")).unwrap();
        fs::write(host.join("x/passwd"), "v1").unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();

        // In the environment: `ln -s /etc link; echo pwned > link/passwd` (through the environment's own link), and
        // a changed x/passwd...
        symlink(&outside, sandbox.join("link")).unwrap();
        fs::write(sandbox.join("x/passwd"), "pwned").unwrap();
        // ...while a link to the same place is planted on the host where the manifest knows a directory, by an
        // earlier sync or anyone.
        fs::remove_dir_all(host.join("x")).unwrap();
        symlink(&outside, host.join("x")).unwrap();

        let report = sync_back(&sandbox, &host, &manifest).await.unwrap();
        assert_eq!(
            fs::read_to_string(outside.join("passwd")).unwrap(),
            "root:x:0:0\n"
        );
        // The environment's link comes back as a link, never followed.
        assert_eq!(fs::read_link(host.join("link")).unwrap(), outside);
        // The host changed `x` during the run: its link stays, and the environment's file goes beside it.
        assert_eq!(report.conflicts, ["x"]);
        assert!(report.skipped.is_empty(), "{report:?}");
        assert_eq!(
            fs::read_to_string(host.join("x.berth-conflict/passwd")).unwrap(),
            "pwned"
        );
        assert_eq!(fs::read_link(host.join("x")).unwrap(), outside);
        assert!(
            !fs::read_dir(&outside).unwrap().any(|entry| entry
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("berth-sync")),
            "a temporary file was written outside"
        );
    }

    #[tokio::test]
    async fn a_sandbox_directory_swapped_for_a_link_is_never_read_through() {
        let temp = tempfile::tempdir().unwrap();
        let outside = temp.path().join("secrets");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("key"), "secret").unwrap();
        let (host, sandbox, manifest) = empty_pair(temp.path()).await;
        symlink(&outside, sandbox.join("data")).unwrap();

        sync_back(&sandbox, &host, &manifest).await.unwrap();
        // A link, not a copy of what it points at.
        assert_eq!(fs::read_link(host.join("data")).unwrap(), outside);
        assert!(!fs::symlink_metadata(host.join("data")).unwrap().is_dir());
    }

    #[tokio::test]
    async fn the_size_bound_trips_on_a_sparse_file_before_anything_lands() {
        let temp = tempfile::tempdir().unwrap();
        let host = temp.path().join("host");
        fs::create_dir(&host).unwrap();
        fs::write(host.join("keep.txt"), "host").unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();

        // `truncate -s 2G` in the environment: 2 GiB of nothing that reads as 2 GiB of zeros.
        let sparse = fs::File::create(sandbox.join("sparse")).unwrap();
        sparse.set_len(2 * 1024 * 1024 * 1024).unwrap();
        fs::write(sandbox.join("keep.txt"), "changed").unwrap();
        fs::write(sandbox.join("new.txt"), "new").unwrap();

        let started = std::time::Instant::now();
        let err = sync_back_with(&sandbox, &host, &manifest, &SyncBackLimits::new(1))
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::SyncBackTooLarge { limit_mb: 1 }));
        assert_eq!(err.code(), "sync_back_too_large");
        assert_eq!(
            err.to_string(),
            "sync-back stopped: the environment sent more than syncBackMaxMb=1 MiB; raise config.syncBackMaxMb or write less"
        );
        // It was refused from its size, not read to the end.
        assert!(started.elapsed() < Duration::from_secs(5));
        // Nothing was applied: not the small files either.
        assert_eq!(fs::read_to_string(host.join("keep.txt")).unwrap(), "host");
        assert!(!host.join("new.txt").exists());
        assert!(!host.join("sparse").exists());
    }

    #[tokio::test]
    async fn the_size_bound_counts_changed_content_only() {
        let temp = tempfile::tempdir().unwrap();
        let host = temp.path().join("host");
        fs::create_dir(&host).unwrap();
        let mib = 1024 * 1024;
        fs::write(host.join("big-unchanged"), vec![7_u8; 3 * mib]).unwrap();
        fs::write(host.join("big-rewritten"), vec![1_u8; 2 * mib]).unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();
        let limits = SyncBackLimits::new(1);

        // Three untouched MiB cost nothing.
        fs::write(sandbox.join("small"), vec![2_u8; mib / 2]).unwrap();
        let report = sync_back_with(&sandbox, &host, &manifest, &limits)
            .await
            .unwrap();
        assert_eq!(report.bytes_written, (mib / 2) as u64);

        // Same size, other content: all of it counts, and two MiB are past a 1 MiB bound.
        let manifest = scan_tree(&sandbox).await.unwrap();
        fs::write(sandbox.join("big-rewritten"), vec![9_u8; 2 * mib]).unwrap();
        let err = sync_back_with(&sandbox, &host, &manifest, &limits)
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::SyncBackTooLarge { .. }), "{err}");
        assert_eq!(
            fs::read(host.join("big-rewritten")).unwrap(),
            vec![1_u8; 2 * mib]
        );

        // Files that fit one by one but not together.
        let manifest = scan_tree(&sandbox).await.unwrap();
        fs::write(sandbox.join("a"), vec![3_u8; mib / 2 + 1]).unwrap();
        fs::write(sandbox.join("b"), vec![4_u8; mib / 2]).unwrap();
        let err = sync_back_with(&sandbox, &host, &manifest, &limits)
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::SyncBackTooLarge { .. }), "{err}");
        assert!(!host.join("a").exists() && !host.join("b").exists());
    }

    #[tokio::test]
    async fn a_stopped_sync_back_changes_nothing() {
        let temp = tempfile::tempdir().unwrap();
        let (host, sandbox, manifest) = empty_pair(temp.path()).await;
        fs::write(sandbox.join("new.txt"), "new").unwrap();
        let stop = StopFlag::default();
        stop.stop();
        let limits = SyncBackLimits::default().with_stop(stop);
        let err = sync_back_with(&sandbox, &host, &manifest, &limits)
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::SyncBackCancelled), "{err}");
        assert!(!host.join("new.txt").exists());
    }

    #[tokio::test]
    async fn the_bound_travels_on_sandbox_leases() {
        let mut lease = LeaseHandle::default();
        assert_eq!(
            SyncBackLimits::for_lease(&lease).max_mb(),
            DEFAULT_SYNC_BACK_MAX_MB
        );
        lease
            .metadata
            .insert(SYNC_BACK_MAX_MB_KEY.to_owned(), json!(5));
        assert_eq!(
            SyncBackLimits::for_lease(&lease).max_bytes(),
            5 * 1024 * 1024
        );
    }

    #[tokio::test]
    async fn one_entry_that_cannot_land_does_not_stop_the_others() {
        let temp = tempfile::tempdir().unwrap();
        let host = temp.path().join("host");
        fs::create_dir(&host).unwrap();
        fs::write(host.join("a"), "orig").unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();
        fs::write(sandbox.join("a"), "env").unwrap();
        fs::write(sandbox.join("b"), "b").unwrap();
        fs::create_dir(sandbox.join("z")).unwrap();
        fs::write(sandbox.join("z/new"), "new").unwrap();
        // `a` changes on the host too, and a directory stands where its conflict copy must go.
        fs::write(host.join("a"), "host").unwrap();
        fs::create_dir_all(host.join("a.berth-conflict/in-the-way")).unwrap();

        let report = sync_back(&sandbox, &host, &manifest).await.unwrap();
        assert_eq!(report.conflicts, ["a"]);
        assert_eq!(report.skipped.len(), 1, "{report:?}");
        assert_eq!(report.skipped[0].path, "a");
        assert_eq!(report.skipped[0].reason, SkipReason::Failed);
        assert!(report.skipped[0].detail.is_some(), "{report:?}");
        assert_eq!(lost_entries(&report).len(), 1);
        // Everything after it landed.
        assert_eq!(fs::read_to_string(host.join("b")).unwrap(), "b");
        assert_eq!(fs::read_to_string(host.join("z/new")).unwrap(), "new");
        assert_eq!(fs::read_to_string(host.join("a")).unwrap(), "host");
    }

    #[tokio::test]
    async fn kinds_swap_both_ways_and_long_names_land() {
        let temp = tempfile::tempdir().unwrap();
        let host = temp.path().join("host");
        let long = "n".repeat(250);
        fs::create_dir_all(host.join("dir-to-file")).unwrap();
        fs::write(host.join("dir-to-file/inner"), "x").unwrap();
        fs::create_dir(host.join("dir-to-link")).unwrap();
        fs::write(host.join("file-to-dir"), "x").unwrap();
        symlink("somewhere", host.join("link-to-dir")).unwrap();
        fs::create_dir(host.join("kept-dir")).unwrap();
        fs::write(host.join(&long), "old").unwrap();
        let sandbox = temp.path().join("sandbox");
        let manifest = copy_tree(&host, &sandbox).await.unwrap();

        fs::remove_dir_all(sandbox.join("dir-to-file")).unwrap();
        fs::write(sandbox.join("dir-to-file"), "file now").unwrap();
        fs::remove_dir(sandbox.join("dir-to-link")).unwrap();
        symlink("elsewhere", sandbox.join("dir-to-link")).unwrap();
        fs::remove_file(sandbox.join("file-to-dir")).unwrap();
        fs::create_dir(sandbox.join("file-to-dir")).unwrap();
        fs::write(sandbox.join("file-to-dir/f"), "in").unwrap();
        fs::remove_file(sandbox.join("link-to-dir")).unwrap();
        fs::create_dir(sandbox.join("link-to-dir")).unwrap();
        fs::write(sandbox.join("link-to-dir/f"), "in").unwrap();
        fs::remove_dir(sandbox.join("kept-dir")).unwrap();
        fs::write(sandbox.join("kept-dir"), "a file").unwrap();
        fs::write(sandbox.join(&long), "new").unwrap();
        fs::write(sandbox.join("m".repeat(255)), "max").unwrap();
        // The host adds to a directory the sandbox made a file: the host's directory stays, the file goes beside.
        fs::write(host.join("kept-dir/host-added"), "keep").unwrap();

        let report = sync_back(&sandbox, &host, &manifest).await.unwrap();
        assert!(lost_entries(&report).is_empty(), "{report:?}");
        assert_eq!(report.conflicts, ["kept-dir"]);
        assert_eq!(
            fs::read_to_string(host.join("dir-to-file")).unwrap(),
            "file now"
        );
        assert_eq!(
            fs::read_link(host.join("dir-to-link")).unwrap(),
            Path::new("elsewhere")
        );
        assert_eq!(
            fs::read_to_string(host.join("file-to-dir/f")).unwrap(),
            "in"
        );
        assert_eq!(
            fs::read_to_string(host.join("link-to-dir/f")).unwrap(),
            "in"
        );
        assert_eq!(
            fs::read_to_string(host.join("kept-dir/host-added")).unwrap(),
            "keep"
        );
        assert_eq!(
            fs::read_to_string(host.join("kept-dir.berth-conflict")).unwrap(),
            "a file"
        );
        assert_eq!(fs::read_to_string(host.join(&long)).unwrap(), "new");
        assert_eq!(
            fs::read_to_string(host.join("m".repeat(255))).unwrap(),
            "max"
        );
    }

    #[test]
    fn conflict_paths_fit_in_a_name() {
        assert_eq!(conflict_path("a/b"), "a/b.berth-conflict");
        let long = format!("dir/{}", "n".repeat(250));
        let beside = conflict_path(&long);
        assert!(beside.starts_with("dir/nnn") && beside.ends_with(CONFLICT_SUFFIX));
        assert_eq!(beside.len() - "dir/".len(), NAME_MAX);
        // Never cut inside a character.
        let wide = "é".repeat(127);
        let beside = conflict_path(&wide);
        assert!(beside.len() <= NAME_MAX && beside.ends_with(CONFLICT_SUFFIX));
    }

    #[tokio::test]
    async fn a_cancel_latch_outlives_execute() {
        // Execute's signal fires with the run's cancel.
        let latch = CancelLatch::default();
        let (fire, fired) = tokio::sync::oneshot::channel::<()>();
        let held = latch
            .hold(Box::pin(async move {
                let _ = fired.await;
            }))
            .await;
        fire.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .unwrap();
        assert!(latch.has_fired());
        latch.cancelled().await;

        // A cancel that comes after execute returned still reaches sync-back.
        let latch = CancelLatch::default();
        let (fire, fired) = tokio::sync::oneshot::channel::<()>();
        let held = latch
            .hold(Box::pin(async move {
                let _ = fired.await;
            }))
            .await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), held)
                .await
                .is_err()
        );
        assert!(!latch.has_fired());
        let waiting = tokio::spawn({
            let latch = latch.clone();
            async move { latch.cancelled().await }
        });
        fire.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(latch.has_fired());

        // Nothing held: never fires.
        let idle = CancelLatch::default();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), idle.cancelled())
                .await
                .is_err()
        );
    }
}
