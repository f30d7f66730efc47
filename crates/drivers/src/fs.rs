//! Filesystem helpers shared by the drivers and providers that keep workspaces on this host.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use berth_core::driver::DriverError;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Whether `path` is a relative, `/`-separated path of plain names: no empty, `.` or `..` segment, no NUL.
pub(crate) fn is_clean_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

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

/// Creates a directory only its owner can enter (0700, whatever the umask). An existing directory (not a symlink)
/// is accepted as it is, so a retried operation succeeds.
pub fn create_private_dir(dir: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => make_private(dir),
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

/// Makes `dir` (just created by berth) exactly 0700, whatever the umask took off or left on.
pub fn make_private(dir: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error(format!("setting the mode of {}", dir.display())))
}

/// A directory opened once; everything below it is reached from its descriptor one name at a time
/// (`openat(O_NOFOLLOW)`), never through a symlink. However the tree changes meanwhile — a directory swapped for a
/// link to `/etc` — nothing is read or written outside it.
#[derive(Debug)]
pub(crate) struct Tree {
    dir: Arc<OwnedFd>,
    path: PathBuf,
}

/// What a name in a [`Tree`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket, device node, or anything else.
    Special,
}

/// The `lstat` of a name in a [`Tree`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) kind: Kind,
    /// All mode bits, setuid, setgid and sticky included: callers mask.
    pub(crate) mode: u32,
    pub(crate) size: u64,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) mtime: (i64, i64),
    pub(crate) ctime: (i64, i64),
}

/// Where a relative path of a [`Tree`] leads.
#[derive(Debug)]
pub(crate) enum Reach {
    /// Every directory on the way is a real directory: here is the last name, in its directory.
    Slot(Slot),
    /// A directory on the way does not exist (and was not to be created).
    Missing,
    /// A directory on the way is not a real directory (a symlink, a file): nothing goes through it. `at` is the
    /// relative path of the first such component.
    Blocked { at: String },
}

/// One name in one directory of a [`Tree`]: every operation on it works from the directory's descriptor, so it
/// cannot be redirected through a link swapped in above it.
#[derive(Debug)]
pub(crate) struct Slot {
    dir: Arc<OwnedFd>,
    name: String,
    /// For messages only.
    path: PathBuf,
}

/// How [`Slot::write_file`] puts the file in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Write beside it, then rename over whatever is there (never opening it).
    Replace,
    /// Create it; fail when anything is there.
    CreateNew,
}

/// How [`Slot::remove_dir`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RemovedDir {
    Removed,
    NotEmpty,
    Gone,
}

/// Makes temporary names unique within this process; the pid makes them unique across processes.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Read and copy in chunks of this size.
pub(crate) const BUFFER_SIZE: usize = 64 * 1024;

fn errno_error(context: impl Into<String>) -> impl FnOnce(Errno) -> DriverError {
    let context = context.into();
    move |errno| DriverError::Io {
        context,
        source: io::Error::from(errno),
    }
}

/// Flags for opening a directory below a tree: never through a link, never a controlling terminal.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY
}

impl Meta {
    fn of(stat: &rustix::fs::Stat) -> Self {
        let kind = match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Special,
        };
        Self {
            kind,
            mode: stat.st_mode & 0o7777,
            size: u64::try_from(stat.st_size).unwrap_or_default(),
            dev: stat.st_dev,
            ino: stat.st_ino,
            mtime: (
                stat.st_mtime,
                i64::try_from(stat.st_mtime_nsec).unwrap_or_default(),
            ),
            ctime: (
                stat.st_ctime,
                i64::try_from(stat.st_ctime_nsec).unwrap_or_default(),
            ),
        }
    }
}

impl Tree {
    /// Opens the directory at `path` (which may itself be reached through links: it is the caller's choice).
    pub(crate) fn open(path: &Path) -> Result<Self, DriverError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOCTTY;
        match rustix::fs::open(path, flags, Mode::empty()) {
            Ok(fd) => Ok(Self {
                dir: Arc::new(fd),
                path: path.to_path_buf(),
            }),
            Err(Errno::NOTDIR) => Err(DriverError::failed(format!(
                "{} is not a directory",
                path.display()
            ))),
            Err(errno) => Err(errno_error(format!("opening {}", path.display()))(errno)),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The slot of `relative` (a clean relative path), opening every directory on the way without following
    /// links. With `create`, missing directories on the way are created (mode 0700).
    pub(crate) fn reach(&self, relative: &str, create: bool) -> Result<Reach, DriverError> {
        if !is_clean_relative(relative) {
            return Err(DriverError::failed(format!(
                "refusing the invalid workspace path `{relative}`"
            )));
        }
        let (parents, name) = match relative.rsplit_once('/') {
            Some((parents, name)) => (Some(parents), name),
            None => (None, relative),
        };
        let mut dir = self.dir.clone();
        let mut walked = String::new();
        for segment in parents.into_iter().flat_map(|parents| parents.split('/')) {
            if !walked.is_empty() {
                walked.push('/');
            }
            walked.push_str(segment);
            let opened = match rustix::fs::openat(&*dir, segment, dir_flags(), Mode::empty()) {
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&*dir, segment, Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(errno) => {
                            return Err(errno_error(format!(
                                "creating {}",
                                self.path.join(&walked).display()
                            ))(errno));
                        }
                    }
                    rustix::fs::openat(&*dir, segment, dir_flags(), Mode::empty())
                }
                other => other,
            };
            dir = match opened {
                Ok(fd) => Arc::new(fd),
                Err(Errno::NOENT) => return Ok(Reach::Missing),
                Err(Errno::LOOP | Errno::NOTDIR) => return Ok(Reach::Blocked { at: walked }),
                Err(errno) => {
                    return Err(errno_error(format!(
                        "opening {}",
                        self.path.join(&walked).display()
                    ))(errno));
                }
            };
        }
        Ok(Reach::Slot(Slot {
            dir,
            name: name.to_owned(),
            path: self.path.join(relative),
        }))
    }

    /// The names in the directory `dir` (at `path`, for messages), sorted; names that are not UTF-8 are left out
    /// (and logged).
    pub(crate) fn names(dir: &OwnedFd, path: &Path) -> Result<Vec<String>, DriverError> {
        let reading = || format!("reading {}", path.display());
        let mut names = Vec::new();
        for item in rustix::fs::Dir::read_from(dir).map_err(errno_error(reading()))? {
            let item = item.map_err(errno_error(reading()))?;
            let bytes = item.file_name().to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            match std::str::from_utf8(bytes) {
                Ok(name) => names.push(name.to_owned()),
                Err(_) => {
                    tracing::warn!(dir = %path.display(), "skipping a workspace entry whose name is not UTF-8")
                }
            }
        }
        // A stable order makes failures reproducible.
        names.sort();
        Ok(names)
    }

    /// The root directory's descriptor.
    pub(crate) fn root(&self) -> Arc<OwnedFd> {
        self.dir.clone()
    }

    /// The slot of `name` directly in the directory `dir` of this tree, whose relative path is `relative`.
    pub(crate) fn slot_in(&self, dir: &Arc<OwnedFd>, name: &str, relative: &str) -> Slot {
        Slot {
            dir: dir.clone(),
            name: name.to_owned(),
            path: self.path.join(relative),
        }
    }
}

impl Slot {
    /// The path, for messages.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `lstat`: `None` when nothing is there.
    pub(crate) fn meta(&self) -> Result<Option<Meta>, DriverError> {
        match rustix::fs::statat(&*self.dir, &*self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(Meta::of(&stat))),
            Err(Errno::NOENT) => Ok(None),
            Err(errno) => Err(errno_error(format!("reading {}", self.path.display()))(
                errno,
            )),
        }
    }

    /// Opens the regular file here for reading. `None` when nothing is there or it is not a regular file: a FIFO
    /// or a device is never opened, and the open itself cannot block.
    pub(crate) fn open_file(&self) -> Result<Option<(File, Meta)>, DriverError> {
        match self.meta()? {
            Some(meta) if meta.kind == Kind::File => {}
            _ => return Ok(None),
        }
        self.open_regular(OFlags::RDONLY)
    }

    /// Opens what is here with `access`, only if it is (still) a regular file.
    fn open_regular(&self, access: OFlags) -> Result<Option<(File, Meta)>, DriverError> {
        let flags = access | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&*self.dir, &*self.name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::LOOP | Errno::NXIO) => return Ok(None),
            Err(errno) => {
                return Err(errno_error(format!("opening {}", self.path.display()))(
                    errno,
                ));
            }
        };
        let stat = rustix::fs::fstat(&fd)
            .map_err(errno_error(format!("reading {}", self.path.display())))?;
        let meta = Meta::of(&stat);
        if meta.kind != Kind::File {
            return Ok(None);
        }
        Ok(Some((File::from(fd), meta)))
    }

    /// Opens the directory here, never through a link. `None` when it is not (or no longer) a directory.
    pub(crate) fn open_dir(&self) -> Result<Option<Arc<OwnedFd>>, DriverError> {
        match rustix::fs::openat(&*self.dir, &*self.name, dir_flags(), Mode::empty()) {
            Ok(fd) => Ok(Some(Arc::new(fd))),
            Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => Ok(None),
            Err(errno) => Err(errno_error(format!("opening {}", self.path.display()))(
                errno,
            )),
        }
    }

    /// The target of the symlink here. `None` when it is not a symlink (any more) or its target is not UTF-8.
    pub(crate) fn read_link(&self) -> Result<Option<String>, DriverError> {
        match rustix::fs::readlinkat(&*self.dir, &*self.name, Vec::new()) {
            Ok(target) => Ok(target.into_string().ok()),
            Err(Errno::NOENT | Errno::INVAL) => Ok(None),
            Err(errno) => Err(errno_error(format!(
                "reading the link {}",
                self.path.display()
            ))(errno)),
        }
    }

    /// Removes the file, link or special file here. `false` when nothing was there.
    pub(crate) fn remove_file(&self) -> Result<bool, DriverError> {
        match rustix::fs::unlinkat(&*self.dir, &*self.name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(errno) => Err(errno_error(format!("removing {}", self.path.display()))(
                errno,
            )),
        }
    }

    /// Removes the directory here if it is empty.
    pub(crate) fn remove_dir(&self) -> Result<RemovedDir, DriverError> {
        match rustix::fs::unlinkat(&*self.dir, &*self.name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(RemovedDir::Removed),
            Err(Errno::NOTEMPTY | Errno::EXIST) => Ok(RemovedDir::NotEmpty),
            Err(Errno::NOENT | Errno::NOTDIR) => Ok(RemovedDir::Gone),
            Err(errno) => Err(errno_error(format!("removing {}", self.path.display()))(
                errno,
            )),
        }
    }

    /// Creates a directory here, mode 0700 until [`set_dir_mode`](Self::set_dir_mode).
    pub(crate) fn create_dir(&self) -> Result<(), DriverError> {
        rustix::fs::mkdirat(&*self.dir, &*self.name, Mode::from_raw_mode(0o700))
            .map_err(errno_error(format!("creating {}", self.path.display())))
    }

    /// Sets the permission bits (`mode & 0o777`) of the directory here, through its own descriptor. `false` when it
    /// is not (any more) a directory.
    pub(crate) fn set_dir_mode(&self, mode: u32) -> Result<bool, DriverError> {
        let Some(dir) = self.open_dir()? else {
            return Ok(false);
        };
        rustix::fs::fchmod(&*dir, Mode::from_raw_mode(mode & 0o777)).map_err(errno_error(
            format!("setting the mode of {}", self.path.display()),
        ))?;
        Ok(true)
    }

    /// Sets the permission bits (`mode & 0o777`) of the regular file here. `false` when it is not (any more) one.
    pub(crate) fn set_file_mode(&self, mode: u32) -> Result<bool, DriverError> {
        match self.meta()? {
            Some(meta) if meta.kind == Kind::File => {}
            _ => return Ok(false),
        }
        let Some((file, _)) = self.open_regular(OFlags::RDONLY)? else {
            return Ok(false);
        };
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode & 0o777)).map_err(errno_error(
            format!("setting the mode of {}", self.path.display()),
        ))?;
        Ok(true)
    }

    /// Writes what `source` yields into a regular file here with `mode & 0o777` (never setuid, setgid or sticky)
    /// and, if given, `mtime` (seconds, nanoseconds). `before_write(n)` is called with each chunk's size before it is
    /// written: its error stops the copy, and nothing half-written is left. Returns the size and SHA-256 written.
    pub(crate) fn write_file(
        &self,
        source: &mut dyn Read,
        mode: u32,
        mtime: Option<(i64, u32)>,
        placement: Placement,
        before_write: &mut dyn FnMut(u64) -> Result<(), DriverError>,
    ) -> Result<(u64, String), DriverError> {
        let name = match placement {
            Placement::CreateNew => self.name.clone(),
            Placement::Replace => temp_name(),
        };
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::NOCTTY
            | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&*self.dir, &*name, flags, Mode::from_raw_mode(0o600))
            .map_err(errno_error(format!("writing {}", self.path.display())))?;
        let written = fill(
            File::from(fd),
            source,
            mode,
            mtime,
            &self.path,
            before_write,
        );
        let written = match (written, placement) {
            (Ok(written), Placement::CreateNew) => return Ok(written),
            (Ok(written), Placement::Replace) => {
                rustix::fs::renameat(&*self.dir, &*name, &*self.dir, &*self.name)
                    .map(|()| written)
                    .map_err(errno_error(format!("replacing {}", self.path.display())))
            }
            (Err(err), _) => Err(err),
        };
        if written.is_err() {
            let _ = rustix::fs::unlinkat(&*self.dir, &*name, AtFlags::empty());
        }
        written
    }

    /// Puts a symlink to `target` here. `Replace` renames it over whatever is there.
    pub(crate) fn write_symlink(
        &self,
        target: &str,
        placement: Placement,
    ) -> Result<(), DriverError> {
        let creating = || format!("creating the link {}", self.path.display());
        match placement {
            Placement::CreateNew => rustix::fs::symlinkat(target, &*self.dir, &*self.name)
                .map_err(errno_error(creating())),
            Placement::Replace => {
                let temp = temp_name();
                rustix::fs::symlinkat(target, &*self.dir, &*temp)
                    .map_err(errno_error(creating()))?;
                rustix::fs::renameat(&*self.dir, &*temp, &*self.dir, &*self.name).map_err(|errno| {
                    let _ = rustix::fs::unlinkat(&*self.dir, &*temp, AtFlags::empty());
                    errno_error(format!("replacing {}", self.path.display()))(errno)
                })
            }
        }
    }
}

/// Copies `source` into the new file `target`, then sets its mode and mtime through the descriptor.
fn fill(
    mut target: File,
    source: &mut dyn Read,
    mode: u32,
    mtime: Option<(i64, u32)>,
    path: &Path,
    before_write: &mut dyn FnMut(u64) -> Result<(), DriverError>,
) -> Result<(u64, String), DriverError> {
    use sha2::{Digest, Sha256};
    let writing = || format!("writing {}", path.display());
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; BUFFER_SIZE];
    let mut size = 0_u64;
    loop {
        let n = match source.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                return Err(io_error(format!(
                    "reading the source of {}",
                    path.display()
                ))(err));
            }
        };
        before_write(n as u64)?;
        hasher.update(&buffer[..n]);
        target
            .write_all(&buffer[..n])
            .map_err(io_error(writing()))?;
        size += n as u64;
    }
    // Through the descriptor: exact (no umask), and never a setuid, setgid or sticky bit.
    rustix::fs::fchmod(&target, Mode::from_raw_mode(mode & 0o777))
        .map_err(errno_error(writing()))?;
    if let Some((seconds, nanos)) =
        mtime.and_then(|(seconds, nanos)| Some((u64::try_from(seconds).ok()?, nanos)))
    {
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(seconds, nanos.min(999_999_999));
        target
            .set_modified(at)
            .map_err(io_error(format!("setting the mtime of {}", path.display())))?;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// A fresh name in the same directory for writing before the atomic rename. It does not derive from the name it
/// stands in for, so it stays short (at most 37 bytes) however long that name is: a name near `NAME_MAX` must still
/// get a temporary file. The process id and a counter keep it unique; `O_EXCL` refuses a stale one.
fn temp_name() -> String {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".berth-sync-{:x}-{n:x}", std::process::id())
}
