//! Command output beside a SQLite database: one append-only segment file per run.
//!
//! # Why
//!
//! Storing every byte of output as JSON text in `run_events` capped a run's output at a fraction of what a pipe
//! carries: SQLite alone needs ~0.3 s to write 100 MB of pages, and the JSON escaping costs as much again. On SQLite,
//! the bytes of a stdout/stderr event therefore go to `<database file>-output/<run id>` (named like SQLite's own
//! `-wal` and `-shm` companions), and the event's row stores only their offset and length. PostgreSQL keeps output in
//! the database, because replicas sharing it must read each other's runs.
//!
//! # Rules
//!
//! - Bytes are appended before the rows pointing at them are inserted, so a committed row never points past the end
//!   of its file; bytes whose rows then fail to go in stay in the file, unreferenced. Appends need no lock (see
//!   [`OutputSegments::append`]), so they do not lengthen the time SQLite's single write lock is held.
//! - One write per batch of events, no fsync: the database runs WAL with `synchronous = NORMAL`, so a power loss may
//!   lose its newest commits anyway; likewise it may lose the newest output. A row whose bytes did not survive lists
//!   with the bytes that did (logged), so a run's history stays readable.
//! - Every segment holds the UTF-8 text of one event, so each range decodes on its own.
//! - Retention follows the rows: segment files whose run is gone (a company was deleted, cascading to its runs) are
//!   removed when the store is opened (`Store::open_output`).

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use berth_core::ids::RunId;

/// Where the output segments of one SQLite database live.
#[derive(Clone, Debug)]
pub(super) struct OutputSegments {
    dir: PathBuf,
}

/// A byte range of a segment file, as stored in `run_events.output_offset` / `output_length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    pub offset: u64,
    pub length: u64,
}

impl OutputSegments {
    /// The segment directory of the SQLite database file `database`: `<database>-output` beside it.
    pub(super) fn beside(database: &Path) -> OutputSegments {
        let mut name = database.as_os_str().to_owned();
        name.push("-output");
        OutputSegments {
            dir: PathBuf::from(name),
        }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (private to the server's user, like the data dir).
    pub(super) fn create_dir(&self) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
    }

    fn path(&self, run_id: RunId) -> PathBuf {
        self.dir.join(run_id.to_string())
    }

    /// Appends `pieces` to the run's segment file, in order and in as few writes as the kernel allows, and returns
    /// each piece's range. Blocking.
    ///
    /// Needs no lock: the file is opened `O_APPEND`, so each write lands at the end atomically, and the file offset
    /// it leaves behind (per open file, so no other appender moves it) says where it landed. Should the kernel take
    /// the bytes in several writes and another appender's land in between, the pieces would not be contiguous: that
    /// is an error, and the bytes already written stay unreferenced.
    pub(super) fn append(&self, run_id: RunId, pieces: &[&[u8]]) -> io::Result<Vec<Segment>> {
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(self.path(run_id))?;
        let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|piece| IoSlice::new(piece)).collect();
        let mut remaining: &mut [IoSlice<'_>] = &mut slices;
        let mut start: Option<u64> = None;
        let mut end = 0;
        while !remaining.is_empty() {
            let written = match file.write_vectored(remaining) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(written) => written,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            let position = file.stream_position()?;
            let landed = position - written as u64;
            match start {
                None => start = Some(landed),
                Some(_) if landed != end => {
                    return Err(io::Error::other(
                        "another append landed between the parts of this one",
                    ));
                }
                Some(_) => {}
            }
            end = position;
            IoSlice::advance_slices(&mut remaining, written);
        }
        let mut offset = start.unwrap_or(end);
        Ok(pieces
            .iter()
            .map(|piece| {
                let length = piece.len() as u64;
                let segment = Segment { offset, length };
                offset += length;
                segment
            })
            .collect())
    }

    /// Reads the given ranges of the run's segment file. A range the file does not (fully) hold comes back short —
    /// only possible after a power loss or a tampered file — and the caller reports it; a missing file reads as
    /// empty. Blocking.
    pub(super) fn read(&self, run_id: RunId, segments: &[Segment]) -> io::Result<Vec<Vec<u8>>> {
        let file = match File::open(self.path(run_id)) {
            Ok(file) => Some(file),
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(error) => return Err(error),
        };
        segments
            .iter()
            .map(|segment| match &file {
                Some(file) => read_range(file, *segment),
                None => Ok(Vec::new()),
            })
            .collect()
    }

    /// The runs that have a segment file: every file whose name is a run id.
    pub(super) fn runs(&self) -> io::Result<Vec<RunId>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let mut runs = Vec::new();
        for entry in entries {
            let entry = entry?;
            if let Some(run_id) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse().ok())
            {
                runs.push(run_id);
            }
        }
        Ok(runs)
    }

    /// Removes the run's segment file, if there is one.
    pub(super) fn remove(&self, run_id: RunId) -> io::Result<()> {
        match std::fs::remove_file(self.path(run_id)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }
}

/// Reads `segment` from `file`, stopping early at the end of the file. Reads into spare capacity: no zeroing of a
/// buffer about to be overwritten.
fn read_range(file: &File, segment: Segment) -> io::Result<Vec<u8>> {
    let length = usize::try_from(segment.length)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "segment too large"))?;
    let mut buffer = Vec::with_capacity(length);
    let mut reader = file;
    reader.seek(io::SeekFrom::Start(segment.offset))?;
    reader.take(segment.length).read_to_end(&mut buffer)?;
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_named_after_the_database_file() {
        let segments = OutputSegments::beside(Path::new("/var/lib/berth/berth.db"));
        assert_eq!(segments.dir(), Path::new("/var/lib/berth/berth.db-output"));
    }

    #[test]
    fn appends_return_consecutive_ranges_and_read_back() -> io::Result<()> {
        let temp = tempfile::tempdir()?;
        let segments = OutputSegments::beside(&temp.path().join("berth.db"));
        segments.create_dir()?;
        let run_id = RunId::new();
        let first = segments.append(run_id, &[b"hello ", b"world"])?;
        let second = segments.append(run_id, &[b"!"])?;
        assert_eq!(
            [first, second].concat(),
            vec![
                Segment {
                    offset: 0,
                    length: 6
                },
                Segment {
                    offset: 6,
                    length: 5
                },
                Segment {
                    offset: 11,
                    length: 1
                },
            ]
        );
        let read = segments.read(
            run_id,
            &[
                Segment {
                    offset: 6,
                    length: 5,
                },
                Segment {
                    offset: 11,
                    length: 4,
                },
            ],
        )?;
        assert_eq!(read, vec![b"world".to_vec(), b"!".to_vec()]);
        assert_eq!(segments.runs()?, vec![run_id]);
        segments.remove(run_id)?;
        segments.remove(run_id)?;
        assert!(segments.runs()?.is_empty());
        assert_eq!(
            segments.read(
                run_id,
                &[Segment {
                    offset: 0,
                    length: 3
                }]
            )?,
            vec![Vec::<u8>::new()]
        );
        Ok(())
    }
}
