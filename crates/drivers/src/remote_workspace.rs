//! Workspaces on a remote reached through a shell ([`RemoteShell`]: an SSH host, or a sandbox through its provider's
//! execute): incremental sync in, sync back of what the remote changed, with conflicts reported.
//!
//! **Sync in.** The host tree is scanned into a content manifest ([`crate::sync::Manifest`]: modes, sizes,
//! SHA-256, symlink targets; a file unchanged since the last scan is not read again, see [`HashCache`]). The remote
//! tree is listed with `find -printf` (kind, mode, size, mtime to the nanosecond, link target; no hashing on the
//! remote). A file travels when the remote has nothing there, or something of another kind, size, mode or mtime (the
//! archive carries mtimes to the nanosecond in pax records, so a file synced before matches until either side changes
//! it: rsync's quick check), and always when its host mtime has whole seconds only and is within the last two
//! seconds, too recent for such a timestamp to tell. What travels goes as one tar stream over one channel into
//! `tar -x` on the remote. Nothing of the remote is deleted at sync-in: a persistent workspace keeps its build
//! products.
//!
//! **Sync back.** The remote is listed again and compared with the listing taken right after sync-in (a file whose
//! mtime is too close to sync-in to trust is compared by content); what the command created or changed comes back as
//! one tar stream, into a private staging directory, and is applied to the host by [`crate::sync`]'s rules (conflicts
//! keep the host's version and put the remote's beside it; one entry that cannot land is reported, the others still
//! land). A path the remote's tar could not send is reported, not fatal.
//!
//! **The remote is untrusted**: it chooses what its listing says and what its tar sends. The sizes it lists must fit
//! the environment's `syncBackMaxMb` before anything is staged, and what it sends is counted again while it is read.
//! Staging is a 0700 directory of plain files berth names (mode 0600): the archive is read entry by entry, never
//! unpacked as it says, so no setuid file, device, FIFO, hard link or path outside the staging directory ever exists
//! there. What lands on the host gets permission bits only, through [`crate::fs`]'s descriptor walk (see
//! [`crate::sync`]). A remote that stalls for [`SYNC_BACK_IDLE`] is given up on, and the run's cancel stops it.
//!
//! Symlinks are copied as links and never followed on either side; paths are checked before anything is written.
//!
//! **Paths past `PATH_MAX`.** No system call takes a path longer than 4096 bytes whole, and the remote's GNU tar packs
//! and unpacks by whole names, so such paths are reached in steps: sync-back lists them to tar with `--directory=`
//! steps down to their directory ([`TarList`]); sync-in reads them on the host from descriptors, sends them under
//! short names and has a script the archive carries walk down to their directory and rename them into place
//! ([`DeepPlacement`]); clearing one goes the same way. The steps need GNU tar 1.29 or later
//! (`--no-verbatim-files-from`) and `mv -T`, asked for only when deep paths travel: on an older remote such a
//! transfer fails as a whole (sync-back reports every change `not_sent`; sync-in fails the run), never silently.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use berth_core::config::SyncExclude;
use berth_core::driver::{DriverError, SkipReason, SkippedEntry, SyncReport};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::fs::{blocking, io_error};
use crate::remote_shell::{CONTROL_TIMEOUT, RemoteShell, ScriptOutput, control, shell_quote};
pub use crate::sync::CONFLICT_SUFFIX;
use crate::sync::{
    self, Budget, Changes, Content, Entry, HashCache, Incoming, Manifest, SyncBackLimits,
};

/// Bytes per chunk between the tar thread and the channel.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between them: backpressure, not buffering.
const CHUNKS_IN_FLIGHT: usize = 16;
/// How long a whole transfer may take.
const TRANSFER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);
/// How long the remote may send nothing while it sends the workspace back before berth gives up on it.
pub const SYNC_BACK_IDLE: Duration = Duration::from_secs(60);
/// The prefix of a sync-back staging directory's name.
pub const STAGING_PREFIX: &str = ".berth-sync-";
/// Most bytes of a remote listing berth reads.
const MAX_LISTING_BYTES: usize = 256 * 1024 * 1024;
/// Archive bytes allowed per entry asked for, beyond file content: headers, long names, padding.
const ARCHIVE_OVERHEAD_PER_ENTRY: u64 = 16 * 1024;

/// One entry of a remote listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteEntry {
    /// `f` file, `d` directory, `l` symlink.
    pub kind: char,
    pub mode: u32,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// The nanoseconds of the mtime (0 where the remote's filesystem keeps whole seconds only).
    pub mtime_nanos: u32,
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
    /// The remote's clock (seconds) when sync-in began, if it could be read: a file whose mtime is not well before
    /// it may have been changed since within the same timestamp, so sync-back compares its content.
    pub remote_clock: Option<i64>,
    pub files_sent: u64,
    pub bytes_sent: u64,
}

/// Lists `dir` on the remote, leaving out what `exclude` matches. A missing directory lists as empty.
pub async fn list(
    shell: &dyn RemoteShell,
    dir: &str,
    exclude: &SyncExclude,
) -> Result<RemoteListing, DriverError> {
    Ok(list_if_present(shell, dir, exclude)
        .await?
        .map(|(_, listing)| listing)
        .unwrap_or_default())
}

/// Exit status of the listing when the directory does not exist.
const MISSING_DIR_STATUS: u32 = 3;

/// Lists `dir` on the remote, with the remote's clock when it was listed; `None` when it does not exist.
async fn list_if_present(
    shell: &dyn RemoteShell,
    dir: &str,
    exclude: &SyncExclude,
) -> Result<Option<(Option<i64>, RemoteListing)>, DriverError> {
    // The clock first (its own NUL-terminated field), then one record per entry; `%T@` has the mtime's fraction.
    let script = format!(
        "cd -- {} 2>/dev/null || exit {MISSING_DIR_STATUS}; date +%s; printf '\\0'; exec find . -mindepth 1 -printf '%y %m %s %T@ %P\\0%l\\0'",
        shell_quote(dir)
    );
    let output = bounded_listing(shell, &script).await?;
    if output.status == Some(MISSING_DIR_STATUS) {
        return Ok(None);
    }
    if !output.success() {
        return Err(DriverError::failed(format!(
            "cannot list the remote workspace {dir} (GNU find is needed): {}",
            output.error_line()
        )));
    }
    let (clock, records) = match output.stdout.iter().position(|&byte| byte == 0) {
        Some(end) => (
            parse_clock(&output.stdout[..end]),
            &output.stdout[end + 1..],
        ),
        None => (None, &output.stdout[..]),
    };
    let mut listing = parse_listing(records)?;
    if !exclude.is_empty() {
        listing.retain(|path, _| !exclude.matches(path));
    }
    Ok(Some((clock, listing)))
}

/// The remote's `date +%s`, if it printed one.
fn parse_clock(printed: &[u8]) -> Option<i64> {
    std::str::from_utf8(printed).ok()?.trim().parse().ok()
}

/// An mtime as `find -printf %T@` prints it (`1700000000.1234567890`): seconds and nanoseconds.
fn parse_mtime(printed: &str) -> Option<(i64, u32)> {
    let (seconds, fraction) = printed.split_once('.').unwrap_or((printed, ""));
    let seconds = seconds.parse().ok()?;
    if !fraction.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = fraction.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    Some((seconds, digits.parse().ok()?))
}

/// Runs a listing script, keeping at most [`MAX_LISTING_BYTES`] of what it prints: the remote chooses how much
/// that is.
async fn bounded_listing(
    shell: &dyn RemoteShell,
    script: &str,
) -> Result<ScriptOutput, DriverError> {
    let (input, received) = mpsc::channel(1);
    drop(input);
    let (output, mut chunks) = mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let collect = async move {
        let mut stdout = Vec::new();
        while let Some(chunk) = chunks.recv().await {
            if stdout.len() + chunk.len() > MAX_LISTING_BYTES {
                return None;
            }
            stdout.extend_from_slice(&chunk);
        }
        Some(stdout)
    };
    let (ran, stdout) = tokio::join!(
        shell.run_script(script, received, Some(output), CONTROL_TIMEOUT),
        collect
    );
    let Some(stdout) = stdout else {
        return Err(DriverError::failed(format!(
            "the remote workspace listing is larger than {} MiB",
            MAX_LISTING_BYTES / (1024 * 1024)
        )));
    };
    let mut output = ran?;
    output.stdout = stdout;
    Ok(output)
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
        if !crate::fs::is_clean_relative(path) {
            continue;
        }
        let kind = kind.chars().next().ok_or_else(malformed)?;
        let (mtime, mtime_nanos) = parse_mtime(mtime).ok_or_else(malformed)?;
        let entry = RemoteEntry {
            kind,
            mode: u32::from_str_radix(mode, 8).map_err(|_| malformed())? & 0o777,
            size: if kind == 'f' {
                size.parse().map_err(|_| malformed())?
            } else {
                0
            },
            mtime,
            mtime_nanos,
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

/// Whether the remote already holds what the host has at this path: for a file, the same size, mode and mtime to
/// the nanosecond (the archive carries mtimes whole, so a file synced before matches until either side changes it).
fn up_to_date(host: &Entry, host_mtime: Option<(i64, u32)>, remote: Option<&RemoteEntry>) -> bool {
    let Some(remote) = remote else { return false };
    match host {
        Entry::Dir { mode } => remote.kind == 'd' && remote.mode == *mode,
        Entry::File { mode, size, .. } => {
            remote.kind == 'f'
                && remote.mode == *mode
                && remote.size == *size
                && Some((remote.mtime, remote.mtime_nanos)) == host_mtime
        }
        Entry::Symlink { target } => remote.kind == 'l' && remote.link.as_deref() == Some(target),
    }
}

/// Brings the host tree `local` into `dir` on the remote (created if missing), sending only what the remote lacks.
pub async fn sync_in(
    shell: &dyn RemoteShell,
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
    let (exists, mut remote_clock, before) = if fresh {
        (false, None, RemoteListing::new())
    } else {
        match list_if_present(shell, dir, exclude).await? {
            Some((clock, listing)) => (true, clock, listing),
            None => (false, None, RemoteListing::new()),
        }
    };
    let mut send = Vec::new();
    let mut clear = Vec::new();
    // On a host filesystem that keeps whole seconds (no nanoseconds), a file changed this recently may have been
    // changed again within the same second: it travels whatever its mtime says.
    let recent = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(i64::MAX, |now| {
            i64::try_from(now.as_secs()).unwrap_or(i64::MAX) - MTIME_TRUST_MARGIN_SECS
        });
    for (path, entry) in host.entries() {
        let remote = before.get(path);
        let mtime = mtimes.get(path).copied();
        // Only a file's mtime decides anything (directories and links compare by mode and target).
        let trusted = !matches!(entry, Entry::File { .. })
            || mtime.is_some_and(|(seconds, nanos)| nanos != 0 || seconds < recent);
        if trusted && up_to_date(entry, mtime, remote) {
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
        let output = if clear.iter().any(|path| path.len() > WHOLE_PATH_MAX) {
            // `rm` cannot take a path past PATH_MAX whole: a script, on stdin (no argv limit), walks down to each.
            let script = format!("cd -- {} && exec sh -s", shell_quote(dir));
            control(shell, &script, Some(removal_script(&clear).into_bytes())).await?
        } else {
            let script = format!("cd -- {} && xargs -0 rm -rf --", shell_quote(dir));
            control(shell, &script, Some(nul_list(&clear))).await?
        };
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
        let clock = upload(shell, local, dir, &host, send).await?;
        // The earlier clock is the safer one: it makes more mtimes too recent to trust.
        remote_clock = remote_clock.or(clock);
    }
    tracing::debug!(dir, files_sent, bytes_sent, "workspace synced in");
    Ok(SyncedIn {
        host,
        remote,
        remote_clock,
        files_sent,
        bytes_sent,
    })
}

/// Shell that removes each of `paths` (relative to the current directory), reaching those past [`WHOLE_PATH_MAX`] by
/// `cd -P` steps; `rm -rf` itself walks what lies below by descriptors, however deep.
fn removal_script(paths: &[String]) -> String {
    let mut script = String::new();
    for path in paths {
        let line = match path.rsplit_once('/') {
            Some((parent, name)) if path.len() > WHOLE_PATH_MAX => {
                let steps: Vec<String> = path_steps(parent)
                    .iter()
                    .map(|step| format!("cd -P -- {}", shell_quote(step)))
                    .collect();
                format!(
                    "({} && rm -rf -- {}) || exit 1\n",
                    steps.join(" && "),
                    shell_quote(name)
                )
            }
            _ => format!("rm -rf -- {} || exit 1\n", shell_quote(path)),
        };
        script.push_str(&line);
    }
    script
}

fn nul_list(paths: &[String]) -> Vec<u8> {
    let mut list = Vec::new();
    for path in paths {
        list.extend_from_slice(path.as_bytes());
        list.push(0);
    }
    list
}

/// How sync-in lands what the remote's tar cannot unpack in place: a path longer than [`WHOLE_PATH_MAX`], which
/// no system call on a Linux remote takes whole (GNU tar unpacks by whole names).
///
/// Such files and links travel in the same archive under short names, `<dir>/<group>/<name>`, with their
/// directory's `place.sh`; after unpacking, the remote runs it: for each group (the deep paths of one directory) it
/// walks down to that directory in steps of at most [`WHOLE_PATH_MAX`] bytes (`cd -P`, physical, so the shell never
/// builds the whole path), creating what is missing, and renames each file or link there (`mv -T`: a rename keeps
/// the nanosecond mtime tar gave it), or makes and chmods each directory. `<dir>` is then removed, however it went.
#[derive(Debug)]
struct DeepPlacement {
    /// `.berth-deep-<pid>-<nanos>`, at the top of the remote workspace.
    dir: String,
    /// Deep path → its short name in the archive (files and links; directories are made by the script).
    renamed: BTreeMap<String, String>,
    /// Deep directories, made by the script rather than sent.
    made: HashSet<String>,
    script: String,
}

impl DeepPlacement {
    /// The plan for `paths` (what sync-in sends, as `host` has them); `None` when none is too deep.
    fn plan(host: &Manifest, paths: &[String]) -> Option<Self> {
        let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for path in paths.iter().filter(|path| path.len() > WHOLE_PATH_MAX) {
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            groups.entry(parent).or_default().push(name);
        }
        if groups.is_empty() {
            return None;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        let dir = format!(".berth-deep-{}-{nanos}", std::process::id());
        let mut renamed = BTreeMap::new();
        let mut made = HashSet::new();
        let mut script = String::from("set -u\n");
        // Sorted by directory, so a deep directory is made before the group of what lies in it.
        for (index, (parent, names)) in groups.into_iter().enumerate() {
            let mut steps = Vec::new();
            for step in path_steps(parent) {
                let step = shell_quote(&step);
                steps.push(format!("mkdir -p -- {step} && cd -P -- {step}"));
            }
            for name in names {
                let path = format!("{parent}/{name}");
                let quoted = shell_quote(name);
                match host.get(&path) {
                    Some(Entry::Dir { mode }) => {
                        steps.push(format!(
                            "mkdir -p -- {quoted} && chmod {:o} -- {quoted}",
                            mode & 0o7777
                        ));
                        made.insert(path);
                    }
                    Some(Entry::File { .. } | Entry::Symlink { .. }) => {
                        let short = format!("{dir}/{index}/{name}");
                        steps.push(format!(
                            "mv -f -T -- \"$1\"/{} {quoted}",
                            shell_quote(&short)
                        ));
                        renamed.insert(path, short);
                    }
                    None => {}
                }
            }
            script.push_str(&format!("({}) || exit 1\n", steps.join(" && ")));
        }
        Some(Self {
            dir,
            renamed,
            made,
            script,
        })
    }

    fn script_path(&self) -> String {
        format!("{}/place.sh", self.dir)
    }
}

/// The remote's side of [`upload`]: make `dir`, print the clock, unpack stdin there and, with deep paths, place them
/// (the staging directory is removed whatever happened).
fn unpack_script(dir: &str, placement: Option<&DeepPlacement>) -> String {
    match placement {
        None => format!(
            "mkdir -p -- {dir} && date +%s && exec tar -x -p --no-same-owner -f - -C {dir}",
            dir = shell_quote(dir)
        ),
        Some(placement) => format!(
            "mkdir -p -- {dir} && date +%s && cd -- {dir} && {{ tar -x -p --no-same-owner -f - && sh {script} \"$(pwd -P)\"; \
             placed=$?; rm -rf -- {staged}; exit $placed; }}",
            dir = shell_quote(dir),
            script = shell_quote(&placement.script_path()),
            staged = shell_quote(&placement.dir),
        ),
    }
}

/// Streams a tar of `paths` (relative to `local`) into `tar -x` in `dir`. Returns the remote's clock (seconds) from
/// before the unpacking, if it printed one.
async fn upload(
    shell: &dyn RemoteShell,
    local: &Path,
    dir: &str,
    host: &Manifest,
    paths: Vec<String>,
) -> Result<Option<i64>, DriverError> {
    let placement = DeepPlacement::plan(host, &paths);
    let script = unpack_script(dir, placement.as_ref());
    let (chunks, received) = mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let root = local.to_path_buf();
    let packer =
        tokio::task::spawn_blocking(move || pack(&root, &paths, placement.as_ref(), chunks));
    let transferred = shell
        .run_script(&script, received, None, TRANSFER_TIMEOUT)
        .await;
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
    Ok(parse_clock(&output.stdout))
}

/// Writes a tar of `paths` into `chunks`, each under its own name or, past [`WHOLE_PATH_MAX`], the short one of
/// `placement` (whose script goes last). The host tree is read from a descriptor one name at a time ([`crate::fs`]),
/// so no path is too deep to read and no link is followed. A file's mtime also travels to the nanosecond, in a pax
/// record GNU tar applies, so that the next quick check compares exact times.
fn pack(
    root: &Path,
    paths: &[String],
    placement: Option<&DeepPlacement>,
    chunks: mpsc::Sender<Vec<u8>>,
) -> Result<(), DriverError> {
    use crate::fs::{Kind, Reach, Tree};
    let writer = ChunkWriter {
        chunks,
        buffer: Vec::with_capacity(CHUNK),
    };
    let mut builder = tar::Builder::new(writer);
    let tree = Tree::open(root)?;
    let packing = |path: &str| io_error(format!("packing {}", root.join(path).display()));
    let gone = |path: &str| {
        DriverError::failed(format!(
            "{} changed while the workspace was being sent",
            root.join(path).display()
        ))
    };
    for path in paths {
        if placement.is_some_and(|placement| placement.made.contains(path)) {
            continue;
        }
        let name = placement
            .and_then(|placement| placement.renamed.get(path))
            .unwrap_or(path);
        let Reach::Slot(slot) = tree.reach(path, false)? else {
            return Err(gone(path));
        };
        let Some(meta) = slot.meta()? else {
            return Err(gone(path));
        };
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode & 0o7777);
        header.set_mtime(u64::try_from(meta.mtime.0).unwrap_or_default());
        match meta.kind {
            Kind::File => {
                let Some((file, meta)) = slot.open_file()? else {
                    return Err(gone(path));
                };
                let record = pax_record("mtime", &format!("{}.{:09}", meta.mtime.0, meta.mtime.1));
                let mut pax = tar::Header::new_ustar();
                pax.set_entry_type(tar::EntryType::XHeader);
                pax.set_path("PaxHeaders/mtime").map_err(packing(path))?;
                pax.set_mode(0o644);
                pax.set_size(record.len() as u64);
                pax.set_cksum();
                builder
                    .append(&pax, record.as_bytes())
                    .map_err(packing(path))?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(meta.size);
                // Exactly the size the header states, whatever the file does meanwhile: a file that shrank is
                // padded, one that grew is cut (the next sync sees its new size and sends it again).
                let content = file.take(meta.size).chain(io::repeat(0)).take(meta.size);
                builder
                    .append_data(&mut header, name, content)
                    .map_err(packing(path))?;
            }
            Kind::Symlink => {
                let Some(target) = slot.read_link()? else {
                    return Err(gone(path));
                };
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder
                    .append_link(&mut header, name, &target)
                    .map_err(packing(path))?;
            }
            Kind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, name, io::empty())
                    .map_err(packing(path))?;
            }
            // Not workspace content: scans leave them out, and one that appeared since is not sent.
            Kind::Special => {}
        }
    }
    if let Some(placement) = placement {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o600);
        header.set_size(placement.script.len() as u64);
        builder
            .append_data(
                &mut header,
                placement.script_path(),
                placement.script.as_bytes(),
            )
            .map_err(io_error("packing the placement script"))?;
    }
    let mut writer = builder
        .into_inner()
        .map_err(io_error("finishing the workspace archive"))?;
    writer
        .flush()
        .map_err(io_error("sending the workspace archive"))
}

/// One pax extended-header record: `<length> <key>=<value>\n`, the length counting itself.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut length = body.len() + 1;
    while length.to_string().len() + body.len() != length {
        length = length.to_string().len() + body.len();
    }
    format!("{length}{body}")
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

/// The receiving end of a download: chunks as they arrive, counted. Past `max` bytes it stops reading and raises
/// `overflow`: a remote may not send an archive much larger than the file content it is allowed.
struct ChunkReader {
    chunks: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    position: usize,
    received: Arc<AtomicU64>,
    max: u64,
    overflow: Arc<AtomicBool>,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.position == self.current.len() {
            match self.chunks.blocking_recv() {
                Some(chunk) => {
                    let total = self
                        .received
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed)
                        .saturating_add(chunk.len() as u64);
                    if total > self.max {
                        self.overflow.store(true, Ordering::Relaxed);
                        return Err(io::Error::other("the remote archive is too large"));
                    }
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
fn expected_remote(entry: &Entry, mtime: Option<(i64, u32)>) -> RemoteEntry {
    match entry {
        Entry::Dir { mode } => RemoteEntry {
            kind: 'd',
            mode: *mode,
            size: 0,
            mtime: 0,
            mtime_nanos: 0,
            link: None,
        },
        // The archive carries the mtime to the nanosecond (a pax record).
        Entry::File { mode, size, .. } => RemoteEntry {
            kind: 'f',
            mode: *mode,
            size: *size,
            mtime: mtime.unwrap_or_default().0,
            mtime_nanos: mtime.unwrap_or_default().1,
            link: None,
        },
        Entry::Symlink { target } => RemoteEntry {
            kind: 'l',
            mode: 0o777,
            size: 0,
            mtime: 0,
            mtime_nanos: 0,
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

/// How far before the remote's clock at sync-in an mtime must lie to be trusted to have moved with every change:
/// a filesystem that keeps whole seconds (or two, FAT) cannot tell an edit in the same second from none, so a file
/// whose mtime is later than this is compared by content.
const MTIME_TRUST_MARGIN_SECS: i64 = 2;

/// Brings what the command changed in `dir` back to `local`, within `limits`, by [`crate::sync`]'s rules.
///
/// What changed is what the listing shows moved since sync-in (kind, mode, size, mtime to the nanosecond, link
/// target); a file that looks the same but whose mtime is too close to sync-in to trust (`MTIME_TRUST_MARGIN_SECS`,
/// two seconds) is fetched too, and counts as changed only when its content differs from the host's at sync-in.
///
/// The remote is untrusted. What it claims (the listing's sizes) must fit the bound before anything is staged; what
/// it sends is counted again while it is read, before it is written. It lands in a private staging directory (mode
/// 0700) as plain files named by berth, mode 0600 — never a setuid file, a device, a FIFO or a link there — and is
/// applied to the host through [`crate::fs`]'s descriptor walk, with permission bits only. A remote that sends
/// nothing for [`SYNC_BACK_IDLE`] is given up on; a stop (the run's cancel) ends it at once. The staging directory
/// is removed however it ends.
pub async fn sync_back(
    shell: &dyn RemoteShell,
    dir: &str,
    local: &Path,
    synced: &SyncedIn,
    exclude: &SyncExclude,
    limits: &SyncBackLimits,
) -> Result<SyncReport, DriverError> {
    let mut now = list(shell, dir, exclude).await?;
    // FIFOs, sockets and devices are no workspace content: the new ones are reported, none is fetched, and to the
    // rest of sync-back they are not there.
    let is_content = |entry: &RemoteEntry| matches!(entry.kind, 'f' | 'd' | 'l');
    let specials: Vec<String> = now
        .iter()
        .filter(|(path, entry)| {
            !is_content(entry)
                && synced
                    .remote
                    .get(*path)
                    .is_none_or(|before| before.kind != entry.kind)
        })
        .map(|(path, _)| path.clone())
        .collect();
    now.retain(|_, entry| is_content(entry));
    let changed_paths: Vec<String> = now
        .iter()
        .filter(|(path, entry)| changed(synced.remote.get(*path), entry))
        .map(|(path, _)| path.clone())
        .collect();
    let unsure: Vec<String> = now
        .iter()
        .filter(|(path, entry)| {
            entry.kind == 'f'
                && !changed(synced.remote.get(*path), entry)
                && matches!(synced.host.get(path), Some(Entry::File { .. }))
                && synced
                    .remote_clock
                    .is_none_or(|clock| entry.mtime >= clock - MTIME_TRUST_MARGIN_SECS)
        })
        .map(|(path, _)| path.clone())
        .collect();
    let deleted: Vec<String> = synced
        .remote
        .iter()
        .filter(|(path, entry)| is_content(entry) && !now.contains_key(*path))
        .map(|(path, _)| path.clone())
        .collect();
    if changed_paths.is_empty() && deleted.is_empty() && unsure.is_empty() && specials.is_empty() {
        return Ok(SyncReport::default());
    }
    let mut fetch: Vec<String> = changed_paths
        .iter()
        .filter(|path| now.get(*path).is_some_and(|entry| entry.kind != 'd'))
        .cloned()
        .collect();
    fetch.extend(unsure.iter().cloned());
    // What the remote says it will send must fit before anything is staged.
    let listed: u64 = fetch
        .iter()
        .filter_map(|path| now.get(path))
        .filter(|entry| entry.kind == 'f')
        .map(|entry| entry.size)
        .fold(0, u64::saturating_add);
    Budget::new(limits).check_fits(listed)?;

    let staging = create_staging(local)?;
    let applied = async {
        let (unpacked, trouble) = if fetch.is_empty() {
            (Unpacked::default(), None)
        } else {
            download(shell, dir, &fetch, staging.path(), limits).await?
        };
        let mut changes = collect_changes(
            &now,
            changed_paths,
            &unsure,
            deleted,
            unpacked,
            trouble,
            &synced.host,
        );
        changes.skipped.extend(
            specials
                .into_iter()
                .map(|path| sync::skipped(path, SkipReason::SpecialFile)),
        );
        let (host_dir, before, limits) = (local.to_path_buf(), synced.host.clone(), limits.clone());
        blocking("the workspace sync", move || {
            sync::apply(&host_dir, None, &before, changes, &limits)
        })
        .await
    }
    .await;
    let removed = blocking("the workspace sync", move || {
        let path = staging.path().to_path_buf();
        staging
            .close()
            .map_err(io_error(format!("removing {}", path.display())))
    })
    .await;
    if let Err(error) = removed {
        tracing::warn!(error = %error, "could not remove a sync-back staging directory");
    }
    applied
}

/// What the remote changed, with what it sent for each path. `trouble` is why the remote's archive may lack some
/// (its tar's complaint): a path it lacks is reported as not sent, with that reason.
fn collect_changes(
    now: &RemoteListing,
    mut changed_paths: Vec<String>,
    unsure: &[String],
    deleted: Vec<String>,
    unpacked: Unpacked,
    trouble: Option<String>,
    host_before: &Manifest,
) -> Changes {
    let Unpacked {
        mut staged,
        skipped,
    } = unpacked;
    for path in unsure {
        let unchanged = match (staged.get(path), host_before.get(path)) {
            (Some(Staged::File { sha256, .. }), Some(Entry::File { sha256: was, .. })) => {
                sha256 == was
            }
            _ => false,
        };
        if unchanged {
            staged.remove(path);
        } else {
            tracing::debug!(
                path,
                "a file whose mtime could not be trusted changed (or did not arrive)"
            );
            changed_paths.push(path.clone());
        }
    }
    let skipped_paths: HashSet<String> = skipped.iter().map(|entry| entry.path.clone()).collect();
    let mut changes = Changes {
        deleted,
        skipped,
        ..Changes::default()
    };
    for path in changed_paths {
        let Some(remote) = now.get(&path) else {
            continue;
        };
        if skipped_paths.contains(&path) {
            continue;
        }
        // Rewritten with the very content and mode it had at sync-in: no change (only content and mode count).
        if let (
            Some(Staged::File { sha256, mode, .. }),
            Some(Entry::File {
                sha256: was,
                mode: was_mode,
                ..
            }),
        ) = (staged.get(&path), host_before.get(&path))
            && sha256 == was
            && mode == was_mode
        {
            continue;
        }
        let incoming = if remote.kind == 'd' {
            Incoming::Dir { mode: remote.mode }
        } else {
            match staged.remove(&path) {
                Some(Staged::File {
                    staged,
                    mode,
                    sha256,
                }) => Incoming::File {
                    mode,
                    sha256,
                    mtime: Some((remote.mtime, remote.mtime_nanos)),
                    content: Content::Staged(staged),
                },
                Some(Staged::Symlink { target }) => Incoming::Symlink { target },
                None => Incoming::Missing {
                    reason: SkipReason::NotSent,
                    detail: trouble.clone(),
                },
            }
        };
        changes.changed.insert(path, incoming);
    }
    changes
}
/// A private staging directory beside the workspace, on its filesystem (a large sync-back must not fill a small
/// /tmp), else in the temporary directory: mode 0700 whatever the umask.
fn create_staging(local: &Path) -> Result<tempfile::TempDir, DriverError> {
    let private = || std::fs::Permissions::from_mode(0o700);
    let beside = local.parent().and_then(|parent| {
        tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .permissions(private())
            .tempdir_in(parent)
            .ok()
    });
    let staging = match beside {
        Some(staging) => staging,
        None => tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .permissions(private())
            .tempdir()
            .map_err(io_error("creating a staging directory"))?,
    };
    crate::fs::make_private(staging.path())?;
    Ok(staging)
}

/// What the remote sent back for one path.
#[derive(Debug)]
enum Staged {
    /// Content in a staging file berth named; `mode` is the permission bits only.
    File {
        staged: PathBuf,
        mode: u32,
        sha256: String,
    },
    Symlink {
        target: String,
    },
}

/// What a download staged, and what it left out.
#[derive(Debug, Default)]
struct Unpacked {
    staged: BTreeMap<String, Staged>,
    skipped: Vec<SkippedEntry>,
}

/// The longest relative path handed to the remote's tar whole. A longer one cannot be opened by name on a Linux
/// remote (`PATH_MAX`, 4096 bytes with its NUL), so its directory is reached in steps (see [`TarList`]); the margin
/// keeps every step well inside the limit.
const WHOLE_PATH_MAX: usize = 3072;

/// The list the remote's tar reads (`-T -`, NUL-separated), and how to read back the names it archives.
///
/// Paths up to [`WHOLE_PATH_MAX`] are listed as they are. Deeper ones are grouped by their directory: for each group
/// the list holds a marker (`.`, which tar archives as the directory entry `./`), then `--directory=` steps down to
/// the group's directory (each step at most [`WHOLE_PATH_MAX`] bytes; GNU tar's `-C` is cumulative and opens each
/// step relative to the last, so no system call ever sees the whole path), the group's names, and one
/// `--directory=..` per component back up. tar archives a group's names relative to its directory; the marker tells
/// the reader which group they belong to ([`TarList::segments`]). Options in the list need
/// `--no-verbatim-files-from` (GNU tar 1.29, 2016), so only a list with deep paths asks for it, and then every name is
/// written `./name`: a name starting with `-` is never read as an option.
#[derive(Debug)]
struct TarList {
    bytes: Vec<u8>,
    /// Segment 0 holds whole paths; segment `i` (after the `i`-th marker) names relative to `segments[i]`.
    segments: Vec<String>,
}

impl TarList {
    fn new(paths: &[String]) -> Self {
        let (whole, deep): (Vec<&String>, Vec<&String>) =
            paths.iter().partition(|path| path.len() <= WHOLE_PATH_MAX);
        if deep.is_empty() {
            return Self {
                bytes: nul_list(paths),
                segments: vec![String::new()],
            };
        }
        let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for path in deep {
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            groups.entry(parent).or_default().push(name);
        }
        let mut bytes = Vec::new();
        let mut push = |record: &str| {
            bytes.extend_from_slice(record.as_bytes());
            bytes.push(0);
        };
        for path in whole {
            push(&format!("./{path}"));
        }
        let mut segments = vec![String::new()];
        for (parent, names) in groups {
            push(".");
            let steps = path_steps(parent);
            for step in &steps {
                push(&format!("--directory={step}"));
            }
            for name in names {
                push(&format!("./{name}"));
            }
            for _ in 0..parent.split('/').count() {
                push("--directory=..");
            }
            segments.push(parent.to_owned());
        }
        Self { bytes, segments }
    }

    /// Whether the list holds options (deep paths).
    fn has_steps(&self) -> bool {
        self.segments.len() > 1
    }
}

/// `dir` cut at `/` into steps of at most [`WHOLE_PATH_MAX`] bytes (a component is at most 255).
fn path_steps(dir: &str) -> Vec<String> {
    let mut steps: Vec<String> = Vec::new();
    for component in dir.split('/') {
        match steps.last_mut() {
            Some(step) if step.len() + 1 + component.len() <= WHOLE_PATH_MAX => {
                step.push('/');
                step.push_str(component);
            }
            _ => steps.push(component.to_owned()),
        }
    }
    steps
}

/// Streams a tar of `paths` in `dir` into `staging`, within `limits`. With what was staged comes the remote tar's
/// complaint when it could not read some paths (they are missing from what was staged).
async fn download(
    shell: &dyn RemoteShell,
    dir: &str,
    paths: &[String],
    staging: &Path,
    limits: &SyncBackLimits,
) -> Result<(Unpacked, Option<String>), DriverError> {
    let list = TarList::new(paths);
    let script = format!(
        "cd -- {} && exec tar -c -f - --no-recursion --null{} -T -",
        shell_quote(dir),
        if list.has_steps() {
            " --no-verbatim-files-from"
        } else {
            ""
        }
    );
    let (chunks, received) = mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let progress = Arc::new(AtomicU64::new(0));
    let overflow = Arc::new(AtomicBool::new(false));
    let reader = ChunkReader {
        chunks: received,
        current: Vec::new(),
        position: 0,
        received: progress.clone(),
        max: limits.max_bytes().saturating_add(
            (paths.len() as u64)
                .saturating_add(16)
                .saturating_mul(ARCHIVE_OVERHEAD_PER_ENTRY),
        ),
        overflow: overflow.clone(),
    };
    let root = staging.to_path_buf();
    let wanted: HashSet<String> = paths.iter().cloned().collect();
    let budget = Budget::new(limits);
    let TarList {
        bytes: list,
        segments,
    } = list;
    let unpacker = tokio::task::spawn_blocking(move || {
        let limit_mb = budget.limit_mb();
        let unpacked = unpack_segments(reader, &root, &wanted, &segments, budget);
        if overflow.load(Ordering::Relaxed) {
            return Err(DriverError::SyncBackTooLarge { limit_mb });
        }
        unpacked
    });
    // The list of paths is the remote tar's stdin.
    let (list_sender, list_received) = mpsc::channel(1);
    let _ = list_sender.send(list).await;
    drop(list_sender);
    let stop = limits.stop_flag();
    let transferred = tokio::select! {
        output = shell.run_script(&script, list_received, Some(chunks), TRANSFER_TIMEOUT) => output,
        () = stop.stopped() => Err(DriverError::SyncBackCancelled),
        () = idle(&progress, SYNC_BACK_IDLE) => Err(DriverError::SyncBackStalled {
            idle_secs: SYNC_BACK_IDLE.as_secs(),
        }),
    };
    // The transfer is over (or dropped, which ends the stream): the unpacker finishes with what arrived.
    let unpacked = unpacker
        .await
        .map_err(|error| DriverError::failed(format!("the workspace unpacker failed: {error}")))?;
    if let Err(error @ (DriverError::SyncBackCancelled | DriverError::SyncBackStalled { .. })) =
        transferred
    {
        return Err(error);
    }
    // The unpacker's failure (a bound crossed) is why the transfer stopped, when it stopped early.
    let unpacked = unpacked?;
    let output = transferred?;
    if output.status.is_none() {
        return Err(DriverError::failed(format!(
            "the remote's tar of the workspace {dir} did not finish: {}",
            output.error_line()
        )));
    }
    // GNU tar goes on past a path it cannot read (gone since the listing, a path too long) and says so in its exit
    // status: what it sent is applied, and what it did not is reported with its complaint.
    let trouble = (!output.success()).then(|| {
        let complaint = output.error_line();
        tracing::warn!(
            dir,
            complaint,
            "the remote could not send every changed path"
        );
        format!("the remote's tar: {complaint}")
    });
    Ok((unpacked, trouble))
}

/// Resolves once `progress` has not moved for a whole `limit`.
async fn idle(progress: &AtomicU64, limit: Duration) {
    let mut seen = progress.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(limit).await;
        let now = progress.load(Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Reads a tar archive from the remote into `staging`: regular files asked for (`wanted`) become staging files named
/// by berth (mode 0600; their mode is kept aside, permission bits only), symlinks are kept in memory, and
/// everything else — devices, FIFOs, hard links, paths not asked for — is never written. File content is counted
/// against `budget` while it is read, before it is written.
#[cfg(test)]
fn unpack(
    reader: impl Read,
    staging: &Path,
    wanted: &HashSet<String>,
    budget: Budget,
) -> Result<Unpacked, DriverError> {
    unpack_segments(reader, staging, wanted, &[String::new()], budget)
}

/// [`unpack`] of an archive made from a [`TarList`] with these `segments`: a name in segment `i > 0` is relative to
/// `segments[i]`. Each marker (a directory entry `./`) starts the next segment; with one segment there are none.
fn unpack_segments(
    reader: impl Read,
    staging: &Path,
    wanted: &HashSet<String>,
    segments: &[String],
    mut budget: Budget,
) -> Result<Unpacked, DriverError> {
    let mut segment = 0_usize;
    let reading = || io_error("reading the remote workspace archive");
    let mut archive = tar::Archive::new(reader);
    let mut unpacked = Unpacked::default();
    let max_entries = wanted.len().saturating_mul(2).saturating_add(16);
    let mut next_name = 0_u64;
    for (index, entry) in archive.entries().map_err(reading())?.enumerate() {
        budget.check_stop()?;
        if index >= max_entries {
            return Err(DriverError::failed(
                "the remote sent more archive entries than were asked for",
            ));
        }
        let mut entry = entry.map_err(reading())?;
        let kind = entry.header().entry_type();
        let size = entry.size();
        let path = entry.path().ok().and_then(|path| {
            path.to_str().map(|path| {
                path.trim_start_matches("./")
                    .trim_end_matches('/')
                    .to_owned()
            })
        });
        if segments.len() > 1
            && kind == tar::EntryType::Directory
            && matches!(path.as_deref(), Some("" | "."))
        {
            segment += 1;
            continue;
        }
        let path = match (path, segments.get(segment)) {
            (Some(path), Some(prefix)) if !prefix.is_empty() => Some(format!("{prefix}/{path}")),
            (path, Some(_)) => path,
            // More markers than groups: a remote that sends what it was not asked for.
            (_, None) => None,
        };
        let Some(path) = path.filter(|path| wanted.contains(path)) else {
            // Not asked for: its content is read past (and counted), never written.
            budget.take(size)?;
            tracing::debug!(kind = ?kind, "skipping an archive entry that was not asked for");
            continue;
        };
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                budget.check_fits(size)?;
                let mode = entry.header().mode().unwrap_or(0o600) & 0o777;
                let staged = staging.join(next_name.to_string());
                next_name += 1;
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(&staged)
                    .map_err(io_error(format!("staging `{path}`")))?;
                let sha256 = stage(&mut entry, file, &path, &mut budget)?;
                let replaced = unpacked.staged.insert(
                    path,
                    Staged::File {
                        staged,
                        mode,
                        sha256,
                    },
                );
                if let Some(Staged::File { staged, .. }) = replaced {
                    let _ = std::fs::remove_file(staged);
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .and_then(|target| target.to_str().map(str::to_owned));
                match target {
                    Some(target) => {
                        unpacked.staged.insert(path, Staged::Symlink { target });
                    }
                    None => unpacked.skipped.push(SkippedEntry {
                        path,
                        reason: SkipReason::NotSent,
                        detail: Some("its link target is not UTF-8".to_owned()),
                    }),
                }
            }
            // Directories come from the listing.
            tar::EntryType::Directory => {}
            _ => {
                tracing::warn!(path, kind = ?kind, "the remote sent a special file; it is not synced back");
                unpacked.skipped.push(SkippedEntry {
                    path,
                    reason: SkipReason::SpecialFile,
                    detail: None,
                });
            }
        }
    }
    Ok(unpacked)
}

/// Copies one archive entry into its staging file, counting each chunk before it is written; returns its hash.
fn stage(
    entry: &mut impl Read,
    mut file: std::fs::File,
    path: &str,
    budget: &mut Budget,
) -> Result<String, DriverError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; crate::fs::BUFFER_SIZE];
    loop {
        let n = match entry.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                return Err(io_error("reading the remote workspace archive")(err));
            }
        };
        budget.take(n as u64)?;
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n])
            .map_err(io_error(format!("staging `{path}`")))?;
    }
    Ok(hex::encode(hasher.finalize()))
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
pub async fn remove(shell: &dyn RemoteShell, dir: &str) -> Result<(), DriverError> {
    // Read-only directories inside must not stop the removal.
    let script = format!(
        "{}; chmod -R u+w -- \"$d\" 2>/dev/null; rm -rf -- \"$d\"",
        kill_in(dir)
    );
    let output = control(shell, &script, None).await?;
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
pub async fn kill_processes_in(shell: &dyn RemoteShell, dir: &str) -> Result<(), DriverError> {
    control(shell, &format!("{}; true", kill_in(dir)), None)
        .await
        .map(drop)
}

/// Creates `dir` on the remote.
pub async fn create(shell: &dyn RemoteShell, dir: &str) -> Result<(), DriverError> {
    let output = control(shell, &format!("mkdir -p -- {}", shell_quote(dir)), None).await?;
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
            mtime_nanos: 0,
            link: None,
        };
        assert!(up_to_date(&file, Some((10, 0)), Some(&remote)));
        assert!(!up_to_date(&file, Some((11, 0)), Some(&remote)));
        // The same second is not the same time.
        assert!(!up_to_date(&file, Some((10, 5)), Some(&remote)));
        assert!(!up_to_date(&file, Some((10, 0)), None));
        let moved = RemoteEntry {
            mode: 0o755,
            ..remote
        };
        assert!(!up_to_date(&file, Some((10, 0)), Some(&moved)));
    }

    /// One raw tar entry: the name is written as is (a hostile remote's tar need not refuse `..` or `/`).
    fn raw_entry(
        archive: &mut Vec<u8>,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        size: u64,
        data: &[u8],
        link: Option<&str>,
    ) {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        if let Some(link) = link {
            header.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        archive.extend_from_slice(header.as_bytes());
        archive.extend_from_slice(data);
        let padding = (512 - data.len() % 512) % 512;
        archive.extend(std::iter::repeat_n(0, padding));
    }

    fn finish(mut archive: Vec<u8>) -> Vec<u8> {
        archive.extend(std::iter::repeat_n(0, 1024));
        archive
    }

    fn wanted(paths: &[&str]) -> HashSet<String> {
        paths.iter().map(|path| (*path).to_owned()).collect()
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn a_hostile_archive_stages_only_private_plain_files() {
        let temp = tempfile::tempdir().unwrap();
        let staging = temp.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            "suid",
            tar::EntryType::Regular,
            0o4755,
            3,
            b"ELF",
            None,
        );
        raw_entry(
            &mut archive,
            "fifo",
            tar::EntryType::Fifo,
            0o644,
            0,
            b"",
            None,
        );
        raw_entry(
            &mut archive,
            "dev/null",
            tar::EntryType::Char,
            0o666,
            0,
            b"",
            None,
        );
        raw_entry(
            &mut archive,
            "hard",
            tar::EntryType::Link,
            0o644,
            0,
            b"",
            Some("/etc/shadow"),
        );
        raw_entry(
            &mut archive,
            "../escape",
            tar::EntryType::Regular,
            0o644,
            1,
            b"x",
            None,
        );
        raw_entry(
            &mut archive,
            "/etc/cron.d/x",
            tar::EntryType::Regular,
            0o644,
            1,
            b"y",
            None,
        );
        raw_entry(
            &mut archive,
            "link",
            tar::EntryType::Symlink,
            0o777,
            0,
            b"",
            Some("/etc"),
        );
        raw_entry(
            &mut archive,
            "link/passwd",
            tar::EntryType::Regular,
            0o644,
            5,
            b"pwned",
            None,
        );
        let archive = finish(archive);

        let unpacked = unpack(
            &archive[..],
            &staging,
            &wanted(&["suid", "fifo", "dev/null", "hard", "link", "link/passwd"]),
            Budget::new(&SyncBackLimits::default()),
        )
        .unwrap();

        let Some(Staged::File { staged, mode, .. }) = unpacked.staged.get("suid") else {
            panic!("{unpacked:?}");
        };
        assert_eq!(*mode, 0o755, "kept aside without the setuid bit");
        assert_eq!(std::fs::read(staged).unwrap(), b"ELF");
        assert!(matches!(
            unpacked.staged.get("link"),
            Some(Staged::Symlink { target }) if target == "/etc"
        ));
        // A file below the link is staged flat, under a name berth chose: nothing went through the link.
        assert!(matches!(
            unpacked.staged.get("link/passwd"),
            Some(Staged::File { .. })
        ));
        let mut skipped: Vec<(&str, SkipReason)> = unpacked
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
                ("hard", SkipReason::SpecialFile),
            ]
        );
        // Staging holds plain 0600 files only; nothing was written beside it.
        for entry in std::fs::read_dir(&staging).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert!(meta.is_file(), "{path:?}");
            assert_eq!(mode_of(&path), 0o600, "{path:?}");
        }
        assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 2);
        assert!(!temp.path().join("escape").exists());
    }

    #[test]
    fn archives_past_the_bound_stop_before_their_content_is_written() {
        let temp = tempfile::tempdir().unwrap();
        let staging = temp.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let limits = SyncBackLimits::new(1);

        // A header that claims 2 GiB (a sparse file, sent whole) is refused before a byte of it is read.
        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            "sparse",
            tar::EntryType::Regular,
            0o644,
            2 << 30,
            b"",
            None,
        );
        let err = unpack(
            &archive[..],
            &staging,
            &wanted(&["sparse"]),
            Budget::new(&limits),
        )
        .unwrap_err();
        assert!(
            matches!(err, DriverError::SyncBackTooLarge { limit_mb: 1 }),
            "{err}"
        );

        // Entries that fit one by one but not together: the one that crosses the bound is never completed.
        let half = vec![b'z'; 512 * 1024];
        let mut archive = Vec::new();
        for name in ["a", "b", "c"] {
            raw_entry(
                &mut archive,
                name,
                tar::EntryType::Regular,
                0o644,
                half.len() as u64,
                &half,
                None,
            );
        }
        let archive = finish(archive);
        let err = unpack(
            &archive[..],
            &staging,
            &wanted(&["a", "b", "c"]),
            Budget::new(&limits),
        )
        .unwrap_err();
        assert!(matches!(err, DriverError::SyncBackTooLarge { .. }), "{err}");

        // Content sent for a path nobody asked for counts too.
        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            "x",
            tar::EntryType::Regular,
            0o644,
            2 << 20,
            b"",
            None,
        );
        let err = unpack(
            &archive[..],
            &staging,
            &wanted(&["a"]),
            Budget::new(&limits),
        )
        .unwrap_err();
        assert!(matches!(err, DriverError::SyncBackTooLarge { .. }), "{err}");
    }

    #[test]
    fn an_archive_of_endless_entries_is_cut_off() {
        let temp = tempfile::tempdir().unwrap();
        let mut archive = Vec::new();
        for index in 0..100 {
            raw_entry(
                &mut archive,
                &format!("d{index}"),
                tar::EntryType::Directory,
                0o755,
                0,
                b"",
                None,
            );
        }
        let archive = finish(archive);
        let err = unpack(
            &archive[..],
            temp.path(),
            &wanted(&["a"]),
            Budget::new(&SyncBackLimits::default()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("more archive entries"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_remote_that_stops_sending_is_given_up_on() {
        let progress = Arc::new(AtomicU64::new(0));
        let moving = progress.clone();
        let feeder = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(30)).await;
                moving.fetch_add(1, Ordering::Relaxed);
            }
        });
        let started = tokio::time::Instant::now();
        idle(&progress, Duration::from_secs(60)).await;
        // Progress for 150 s, then a whole minute of nothing.
        assert!(
            started.elapsed() >= Duration::from_secs(180),
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() <= Duration::from_secs(300),
            "{:?}",
            started.elapsed()
        );
        feeder.await.unwrap();
    }

    #[test]
    fn staging_is_private() {
        let temp = tempfile::tempdir().unwrap();
        let workspace = temp.path().join("ws");
        std::fs::create_dir(&workspace).unwrap();
        let staging = create_staging(&workspace).unwrap();
        assert_eq!(staging.path().parent(), Some(temp.path()));
        assert!(
            staging
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(STAGING_PREFIX)
        );
        assert_eq!(mode_of(staging.path()), 0o700);
    }

    fn remote_file(size: u64) -> RemoteEntry {
        RemoteEntry {
            kind: 'f',
            mode: 0o644,
            size,
            mtime: 1_700_000_000,
            mtime_nanos: 0,
            link: None,
        }
    }

    /// Applies what `collect_changes` makes of a download, as `sync_back` does.
    fn apply_download(
        host: &Path,
        now: &RemoteListing,
        changed: &[&str],
        unpacked: Unpacked,
    ) -> SyncReport {
        let changes = collect_changes(
            now,
            changed.iter().map(|path| (*path).to_owned()).collect(),
            &[],
            Vec::new(),
            unpacked,
            None,
            &Manifest::default(),
        );
        sync::apply(
            host,
            None,
            &Manifest::default(),
            changes,
            &SyncBackLimits::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn applying_meets_a_host_fifo_without_opening_it() {
        let temp = tempfile::tempdir().unwrap();
        let host = temp.path().join("host");
        std::fs::create_dir(&host).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            host.join("pipe"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let staging = temp.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("0"), "data").unwrap();
        let mut unpacked = Unpacked::default();
        unpacked.staged.insert(
            "pipe".to_owned(),
            Staged::File {
                staged: staging.join("0"),
                mode: 0o755,
                sha256: hex::encode(Sha256::digest(b"data")),
            },
        );
        let mut now = RemoteListing::new();
        now.insert("pipe".to_owned(), remote_file(4));

        let host_dir = host.clone();
        let report = tokio::time::timeout(
            Duration::from_secs(10),
            blocking("test", move || {
                Ok(apply_download(&host_dir, &now, &["pipe"], unpacked))
            }),
        )
        .await
        .expect("applying blocked on a host FIFO")
        .unwrap();
        // The FIFO is something berth never synced: it stays, and the remote's file is kept beside it.
        assert_eq!(report.conflicts, ["pipe"]);
        let meta = std::fs::symlink_metadata(host.join("pipe")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
        assert_eq!(
            std::fs::read_to_string(host.join("pipe.berth-conflict")).unwrap(),
            "data"
        );
        assert_eq!(mode_of(&host.join("pipe.berth-conflict")), 0o755);
    }

    #[tokio::test]
    async fn applying_never_writes_through_a_link_the_remote_planted() {
        let temp = tempfile::tempdir().unwrap();
        let outside = temp.path().join("etc");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("passwd"), "root").unwrap();
        let host = temp.path().join("host");
        std::fs::create_dir(&host).unwrap();
        let staging = temp.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("0"), "pwned").unwrap();
        // The remote lists (and sends) a link to /etc, then a file below it.
        let mut unpacked = Unpacked::default();
        unpacked.staged.insert(
            "x".to_owned(),
            Staged::Symlink {
                target: outside.display().to_string(),
            },
        );
        unpacked.staged.insert(
            "x/passwd".to_owned(),
            Staged::File {
                staged: staging.join("0"),
                mode: 0o644,
                sha256: hex::encode(Sha256::digest(b"pwned")),
            },
        );
        let mut now = RemoteListing::new();
        now.insert(
            "x".to_owned(),
            RemoteEntry {
                kind: 'l',
                mode: 0o777,
                size: 0,
                mtime: 0,
                mtime_nanos: 0,
                link: Some(outside.display().to_string()),
            },
        );
        now.insert("x/passwd".to_owned(), remote_file(5));

        let report = apply_download(&host, &now, &["x", "x/passwd"], unpacked);
        assert_eq!(
            std::fs::read_to_string(outside.join("passwd")).unwrap(),
            "root"
        );
        assert_eq!(std::fs::read_link(host.join("x")).unwrap(), outside);
        assert_eq!(
            report.skipped,
            [SkippedEntry {
                path: "x/passwd".to_owned(),
                reason: SkipReason::UnsafeHostPath,
                detail: None,
            }]
        );
    }

    #[tokio::test]
    async fn packed_files_keep_their_mtime_to_the_nanosecond_through_gnu_tar() {
        let temp = tempfile::tempdir().unwrap();
        let source = temp.path().join("source");
        std::fs::create_dir_all(source.join("dir")).unwrap();
        std::fs::write(source.join("dir/f"), "content").unwrap();
        let (chunks, mut received) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let root = source.clone();
        let packer = tokio::task::spawn_blocking(move || {
            pack(&root, &["dir".to_owned(), "dir/f".to_owned()], None, chunks)
        });
        let mut archive = Vec::new();
        while let Some(chunk) = received.recv().await {
            archive.extend_from_slice(&chunk);
        }
        packer.await.unwrap().unwrap();
        let target = temp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(temp.path().join("a.tar"), &archive).unwrap();
        let status = std::process::Command::new("tar")
            .args(["-x", "-p", "--no-same-owner", "-f"])
            .arg(temp.path().join("a.tar"))
            .arg("-C")
            .arg(&target)
            .status()
            .unwrap();
        assert!(status.success());
        use std::os::unix::fs::MetadataExt;
        let (from, to) = (
            std::fs::metadata(source.join("dir/f")).unwrap(),
            std::fs::metadata(target.join("dir/f")).unwrap(),
        );
        assert_eq!(
            (to.mtime(), to.mtime_nsec()),
            (from.mtime(), from.mtime_nsec())
        );
        assert_eq!(
            std::fs::read_to_string(target.join("dir/f")).unwrap(),
            "content"
        );
    }

    #[test]
    fn pax_records_count_their_own_length() {
        let record = pax_record("mtime", "1700000000.123456789");
        assert_eq!(record, "30 mtime=1700000000.123456789\n");
        assert_eq!(record.len(), 30);
        let short = pax_record("k", "v");
        assert_eq!(short, format!("{} k=v\n", short.len()));
    }

    #[test]
    fn mtimes_keep_their_nanoseconds() {
        assert_eq!(
            parse_mtime("1700000000.1234567890"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(
            parse_mtime("1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_mtime("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(parse_mtime("17x.5"), None);
        assert_eq!(parse_mtime("1.-5"), None);
        // Two edits in the same second are two different listings.
        let mut first = remote_file(5);
        first.mtime_nanos = 100;
        let second = RemoteEntry {
            mtime_nanos: 200,
            ..first.clone()
        };
        assert!(changed(Some(&first), &second));
        assert!(!changed(Some(&first), &first.clone()));
    }

    #[test]
    fn a_file_too_recent_to_trust_counts_as_changed_only_when_its_content_did() {
        let temp = tempfile::tempdir().unwrap();
        let staged = temp.path().join("0");
        std::fs::write(&staged, "same").unwrap();
        let mut host_before = Manifest::default();
        for (path, content) in [("same.txt", "same"), ("edited.txt", "was!")] {
            host_before.insert_for_tests(
                path,
                Entry::File {
                    mode: 0o644,
                    size: 4,
                    sha256: hex::encode(Sha256::digest(content.as_bytes())),
                },
            );
        }
        let mut unpacked = Unpacked::default();
        for path in ["same.txt", "edited.txt"] {
            unpacked.staged.insert(
                path.to_owned(),
                Staged::File {
                    staged: staged.clone(),
                    mode: 0o644,
                    sha256: hex::encode(Sha256::digest(b"same")),
                },
            );
        }
        let mut now = RemoteListing::new();
        now.insert("same.txt".to_owned(), remote_file(4));
        now.insert("edited.txt".to_owned(), remote_file(4));
        let changes = collect_changes(
            &now,
            Vec::new(),
            &["same.txt".to_owned(), "edited.txt".to_owned()],
            Vec::new(),
            unpacked,
            None,
            &host_before,
        );
        assert_eq!(
            changes.changed.keys().collect::<Vec<_>>(),
            ["edited.txt"],
            "{changes:?}"
        );
    }
}

#[cfg(test)]
mod deep_path_tests {
    use std::collections::HashSet;
    use std::io::Write;
    use std::process::{Command, Stdio};

    use super::{Staged, TarList, WHOLE_PATH_MAX, path_steps, unpack_segments};
    use crate::sync::{Budget, SyncBackLimits};

    /// Makes `depth` directories of 200-byte names below `root` one `cd` at a time (no call sees the whole path),
    /// writes `f` (content `deep`) at the bottom, and returns its relative path.
    fn deep_file(root: &std::path::Path, depth: usize, tag: &str) -> String {
        let name = format!("{tag}{}", "P".repeat(199));
        let script = format!(
            "i=0; while [ $i -lt {depth} ]; do mkdir -p {name} && cd -P {name} || exit 1; i=$((i+1)); done; echo deep-{tag} > f; printf x > -C"
        );
        let status = Command::new("sh")
            .args(["-c", &script])
            .current_dir(root)
            .status()
            .unwrap();
        assert!(status.success());
        format!("{}/f", vec![name; depth].join("/"))
    }

    #[test]
    fn steps_stay_below_the_limit_and_rejoin_to_the_directory() {
        let dir = vec!["D".repeat(200); 40].join("/");
        let steps = path_steps(&dir);
        assert!(steps.len() > 1);
        assert!(steps.iter().all(|step| step.len() <= WHOLE_PATH_MAX));
        assert_eq!(steps.join("/"), dir);
        assert_eq!(path_steps("a/b"), ["a/b"]);
    }

    /// The remote's GNU tar (here, this host's) reads a list with deep paths and sends them all; the reader puts each
    /// name back under its group, and a name that looks like an option is archived as a file.
    #[test]
    fn gnu_tar_sends_paths_past_path_max_by_the_list() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("top"), "top").unwrap();
        let first = deep_file(&root, 25, "a");
        let second = deep_file(&root, 30, "b");
        let option_like = format!("{}/-C", first.rsplit_once('/').unwrap().0);
        assert!(first.len() > 4096 && second.len() > 4096);
        let paths = vec![
            "top".to_owned(),
            first.clone(),
            second.clone(),
            option_like.clone(),
        ];
        let list = TarList::new(&paths);
        assert!(list.has_steps());
        let mut tar = Command::new("tar")
            .args([
                "-c",
                "-f",
                "-",
                "--no-recursion",
                "--null",
                "--no-verbatim-files-from",
                "-T",
                "-",
            ])
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        tar.stdin.take().unwrap().write_all(&list.bytes).unwrap();
        let output = tar.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );

        let staging = temp.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let wanted: HashSet<String> = paths.iter().cloned().collect();
        let unpacked = unpack_segments(
            &output.stdout[..],
            &staging,
            &wanted,
            &list.segments,
            Budget::new(&SyncBackLimits::default()),
        )
        .unwrap();
        assert!(unpacked.skipped.is_empty(), "{:?}", unpacked.skipped);
        let content = |path: &str| match unpacked.staged.get(path) {
            Some(Staged::File { staged, .. }) => std::fs::read_to_string(staged).unwrap(),
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(content("top"), "top");
        assert_eq!(content(&first), "deep-a\n");
        assert_eq!(content(&second), "deep-b\n");
        assert_eq!(content(&option_like), "x");
        assert_eq!(unpacked.staged.len(), 4);
    }

    /// Sync-in's two halves with this host standing in for the remote: a host tree deeper than PATH_MAX (files, a
    /// link, a directory, names that need quoting) is packed and unpacked by the very script the remote runs, and
    /// arrives whole, mtimes to the nanosecond, with nothing of the placement left behind.
    #[tokio::test]
    async fn deep_host_paths_are_packed_and_placed_by_the_remote_script() {
        use std::sync::Arc;

        use crate::sync::{HashCache, scan_tree_cached};

        let temp = tempfile::tempdir().unwrap();
        let source = temp.path().join("source");
        std::fs::create_dir(&source).unwrap();
        std::fs::write(source.join("top"), "top").unwrap();
        let deep = deep_file(&source, 30, "s");
        let bottom = deep.rsplit_once('/').unwrap().0.to_owned();
        let status = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "{}; ln -s f link; echo q > \"it's\"; mkdir sub; chmod 750 sub; echo in > sub/g",
                    descend_to(&bottom)
                ),
            ])
            .current_dir(&source)
            .status()
            .unwrap();
        assert!(status.success());

        let cache = Arc::new(HashCache::default());
        let (host, _) = scan_tree_cached(&source, &cache).await.unwrap();
        let paths: Vec<String> = host.entries().keys().cloned().collect();
        let placement = super::DeepPlacement::plan(&host, &paths);
        assert!(placement.is_some());
        let (chunks, mut received) = tokio::sync::mpsc::channel(super::CHUNKS_IN_FLIGHT);
        let (root, packed_paths) = (source.clone(), paths.clone());
        let packer = tokio::task::spawn_blocking(move || {
            super::pack(&root, &packed_paths, placement.as_ref(), chunks).map(|()| placement)
        });
        let mut archive = Vec::new();
        while let Some(chunk) = received.recv().await {
            archive.extend_from_slice(&chunk);
        }
        let placement = packer.await.unwrap().unwrap();

        let target = temp.path().join("target");
        let script = super::unpack_script(&target.display().to_string(), placement.as_ref());
        let mut remote = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        remote.stdin.take().unwrap().write_all(&archive).unwrap();
        let output = remote.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(super::parse_clock(&output.stdout).is_some());

        let (arrived, _) = scan_tree_cached(&target, &cache).await.unwrap();
        assert_eq!(arrived.entries(), host.entries());
        let names: Vec<String> = std::fs::read_dir(&target)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|name| !name.starts_with(".berth-deep")),
            "{names:?}"
        );
        // The deep file's mtime came through the rename whole.
        let mtime = |root: &std::path::Path| {
            let output = Command::new("sh")
                .args(["-c", &format!("{}; stat -c %Y.%y f", descend_to(&bottom))])
                .current_dir(root)
                .output()
                .unwrap();
            String::from_utf8(output.stdout).unwrap()
        };
        assert_eq!(mtime(&target), mtime(&source));
    }

    /// What sync-in must clear (something of another kind in the way) goes, however deep, and nothing else does.
    #[test]
    fn the_removal_script_reaches_paths_past_path_max() {
        let temp = tempfile::tempdir().unwrap();
        let deep = deep_file(temp.path(), 30, "r");
        let bottom = deep.rsplit_once('/').unwrap().0.to_owned();
        std::fs::write(temp.path().join("it's"), "x").unwrap();
        let script = super::removal_script(&[deep.clone(), "it's".to_owned()]);
        let mut shell = Command::new("sh")
            .arg("-s")
            .current_dir(temp.path())
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        shell
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(shell.wait().unwrap().success());
        assert!(!temp.path().join("it's").exists());
        let listing = Command::new("sh")
            .args(["-c", &format!("{} && ls -A", descend_to(&bottom))])
            .current_dir(temp.path())
            .output()
            .unwrap();
        assert!(listing.status.success());
        assert_eq!(String::from_utf8(listing.stdout).unwrap(), "-C\n");
    }

    /// Shell that walks down `dir` one component at a time.
    fn descend_to(dir: &str) -> String {
        dir.split('/')
            .map(|name| format!("cd -P {name}"))
            .collect::<Vec<_>>()
            .join(" && ")
    }

    #[test]
    fn lists_without_deep_paths_are_as_before() {
        let list = TarList::new(&["a".to_owned(), "-b".to_owned()]);
        assert!(!list.has_steps());
        assert_eq!(list.bytes, b"a\0-b\0");
    }
}
