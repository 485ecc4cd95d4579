//! The readings waiting for upload, in an append-only log of the meter's own
//! beside sled (`logs/` in the cache folder, `durable::LOGS_DIR`).
//!
//! Why not sled: a reading acknowledged through sled cost sled's flush (two
//! writes, each waited for with `sync_file_range`), then the fsync of its
//! log, then a scan of its blob folder: two to three waits on the disk per
//! group commit, and a value (with its page-table entry in memory) per
//! reading. Here a group commit is one `write` and one `fdatasync`, and the
//! meter keeps nothing in memory per reading (docs/benchmarks.md).
//!
//! **Format.** Segments named by the sequence number of their first reading
//! (`00000000000000000001.log`, 20 digits), each a run of records: the
//! payload's length (u32, little-endian), its CRC-32 (u32, little-endian),
//! the payload (`cache::encode_reading`, which carries the sequence number).
//! Numbers run on without a gap inside a segment; a segment starts past
//! the end of the one before it (after a gap where numbers were given to a
//! group that failed). A new segment is started when the last one has grown
//! past `SEGMENT_BYTES`; a segment is deleted once every reading in it was
//! uploaded or set aside (`trim`).
//!
//! **Crashes.** A group is acknowledged only after its `fdatasync`. A crash
//! or power cut during a group's write leaves at most a torn last record:
//! opening the log cuts the last segment back to its last whole record
//! (nobody was told about what followed). A bad record anywhere else is
//! corruption and the log refuses to open, rather than lose readings that
//! were acknowledged. A failed fsync stops the data folder (`durable`'s
//! fail-stop) and the group is cut off again (`append`).
//!
//! All fsyncs go through the data folder's `durable::SledDir`, so the log
//! shares its fail-stop, its fault injection and its power-cut image.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use proto::reading::Reading;

use crate::cache::{decode_reading, encode_reading};

/// A new segment is started when the last has grown past this (in unit
/// tests, a few kilobytes, so that they cross segments).
#[cfg(not(test))]
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
#[cfg(test)]
pub const SEGMENT_BYTES: u64 = 8 * 1024;
/// Bytes before each record's payload: its length and its CRC-32.
const HEADER_BYTES: usize = 8;
/// Longest payload a record may have (a reading is under 200 bytes): a
/// longer length is corruption, never an allocation.
const PAYLOAD_BYTES_MAX: usize = 1024;
/// Positions remembered for reads (see `State::hints`).
const HINTS_MAX: usize = 8;

/// Why the log could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading or writing a segment failed.
    #[error("the readings log failed: {0}")]
    Io(#[from] std::io::Error),
    /// A record other than a torn last one is bad.
    #[error("the readings log is corrupt: {0}")]
    Corrupt(String),
    /// Making the log durable failed (the data folder has stopped).
    #[error("could not make the readings log durable: {0}")]
    Sync(#[from] durable::SyncError),
}

/// Why a group was not appended, and whether cutting it off again was made
/// durable (see `ReadingLog::append`).
#[derive(Debug)]
pub struct AppendFailure {
    /// What failed.
    pub error: LogError,
    /// `Ok` when the log is known to end where it did before the group;
    /// `Err` (why) when the group may be on disk.
    pub undone: Result<(), String>,
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// Bytes of whole records in it.
    len: u64,
}

struct State {
    /// In order of their first sequence number; the last is the one
    /// appended to.
    segments: Vec<Segment>,
    /// The last segment, open for writing.
    active: Option<File>,
    /// One past the last reading in the log; `None` while it is empty.
    next_seq: Option<u64>,
    /// Where some readings start (seq, segment's first seq, offset), so
    /// that reading a batch from where the last one ended does not read
    /// its segment from the start.
    hints: Vec<(u64, u64, u64)>,
    /// Set when a group could not be cut off again: nothing more is
    /// appended until the log is opened again.
    broken: Option<String>,
}

/// The log; `append` is called by one thread at a time (the group
/// committer), reads and `trim` by any.
pub struct ReadingLog {
    dir: PathBuf,
    state: Mutex<State>,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

fn first_seq_of(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|byte| byte.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Appends `reading`'s record to `out`.
fn put_record(out: &mut Vec<u8>, reading: &Reading) {
    let payload = encode_reading(reading);
    let len = u32::try_from(payload.len()).expect("a reading's record is small");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// The next record of `input`: `Ok(None)` at its end or at a torn or bad
/// record (with how it was bad in `bad`), else the reading and its size.
fn next_record(
    input: &mut impl Read,
    bad: &mut Option<String>,
) -> std::io::Result<Option<(Reading, u64)>> {
    let mut header = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        match input.read(&mut header[got..])? {
            0 if got == 0 => return Ok(None),
            0 => {
                *bad = Some("a torn record header".to_owned());
                return Ok(None);
            }
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len == 0 || len > PAYLOAD_BYTES_MAX {
        *bad = Some(format!("a record length of {len} bytes"));
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    if let Err(error) = input.read_exact(&mut payload) {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            *bad = Some("a torn record".to_owned());
            return Ok(None);
        }
        return Err(error);
    }
    if crc32fast::hash(&payload) != crc {
        *bad = Some("a record whose checksum does not match".to_owned());
        return Ok(None);
    }
    let Some(reading) = decode_reading(&payload) else {
        *bad = Some("a record that is not a reading".to_owned());
        return Ok(None);
    };
    Ok(Some((reading, (HEADER_BYTES + len) as u64)))
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ReadingLog {
    /// Opens the log of the data folder `files`, checking every record:
    /// a torn last record is cut off, any other bad record refuses.
    pub fn open(files: &durable::SledDir) -> Result<ReadingLog, LogError> {
        let dir = files.logs_dir()?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name();
            match name.to_str().and_then(first_seq_of) {
                Some(first_seq) => found.push(first_seq),
                None => {
                    return Err(LogError::Corrupt(format!(
                        "{} is not a segment of the log",
                        dir.join(&name).display()
                    )));
                }
            }
        }
        found.sort_unstable();
        let mut segments = Vec::with_capacity(found.len());
        let mut next_seq: Option<u64> = None;
        let last = found.len().checked_sub(1);
        for (index, first_seq) in found.into_iter().enumerate() {
            let path = dir.join(segment_name(first_seq));
            if let Some(expected) = next_seq
                && first_seq < expected
            {
                return Err(LogError::Corrupt(format!(
                    "{} starts at reading {first_seq}, inside the segment before it (to {expected})",
                    path.display()
                )));
            }
            let mut input = BufReader::with_capacity(64 * 1024, File::open(&path)?);
            let (mut len, mut expected, mut bad) = (0u64, first_seq, None);
            while let Some((reading, size)) = next_record(&mut input, &mut bad)? {
                // A torn write never makes a whole record with another
                // number: this is corruption wherever it is.
                if reading.seq != expected {
                    return Err(LogError::Corrupt(format!(
                        "{} holds reading {} at byte {len} where {expected} was to follow",
                        path.display(),
                        reading.seq
                    )));
                }
                len += size;
                expected += 1;
            }
            let file_len = std::fs::metadata(&path)?.len();
            if let Some(bad) = bad.filter(|_| len < file_len) {
                if Some(index) != last {
                    return Err(LogError::Corrupt(format!(
                        "{} holds {bad} at byte {len}",
                        path.display()
                    )));
                }
                // The tail of the last segment: a group whose write a crash
                // cut short, never acknowledged.
                tracing::warn!(
                    segment = %path.display(),
                    kept = len,
                    dropped = file_len - len,
                    %bad,
                    "cut a torn write off the end of the readings log"
                );
                let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                file.set_len(len)?;
                files.sync_file(&file, &path)?;
            }
            if len == 0 && Some(index) == last {
                // Made for a group that never reached it: gone, so that the
                // next segment is named by the next number.
                std::fs::remove_file(&path)?;
                files.sync_logs_dir()?;
                continue;
            }
            next_seq = Some(expected);
            segments.push(Segment {
                first_seq,
                path,
                len,
            });
        }
        let active = match segments.last() {
            Some(segment) => Some(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&segment.path)?,
            ),
            None => None,
        };
        Ok(ReadingLog {
            dir,
            state: Mutex::new(State {
                segments,
                active,
                next_seq,
                hints: Vec::new(),
                broken: None,
            }),
        })
    }

    /// The number the log's first segment starts at; `None` when empty.
    pub fn first_seq(&self) -> Option<u64> {
        lock(&self.state)
            .segments
            .first()
            .map(|segment| segment.first_seq)
    }

    /// One past the last reading in the log; `None` when it holds none.
    pub fn next_seq(&self) -> Option<u64> {
        lock(&self.state).next_seq
    }

    /// Appends `readings` (numbered on without a gap, from `next_seq` or
    /// past it: a gap starts a new segment) and makes them durable: one
    /// write and one fsync. On failure the group is cut off again and that is made
    /// durable if the disk lets it (`AppendFailure::undone`).
    pub fn append(
        &self,
        files: &durable::SledDir,
        readings: &[Reading],
    ) -> Result<(), AppendFailure> {
        let fail = |error: LogError| AppendFailure {
            error,
            undone: Ok(()),
        };
        let Some(first) = readings.first() else {
            return Ok(());
        };
        let mut state = lock(&self.state);
        if let Some(broken) = &state.broken {
            return Err(fail(LogError::Corrupt(broken.clone())));
        }
        let numbered = readings
            .iter()
            .enumerate()
            .all(|(offset, reading)| reading.seq == first.seq + offset as u64)
            && state.next_seq.is_none_or(|next| next <= first.seq);
        assert!(
            numbered,
            "readings are appended in order, each group without a gap"
        );
        let gap = state.next_seq.is_some_and(|next| next < first.seq);
        let starts_segment = gap
            || state
                .segments
                .last()
                .is_none_or(|segment| segment.len >= SEGMENT_BYTES);
        if starts_segment {
            let path = self.dir.join(segment_name(first.seq));
            let file = std::fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|error| fail(error.into()))?;
            files.sync_logs_dir().map_err(|error| fail(error.into()))?;
            state.segments.push(Segment {
                first_seq: first.seq,
                path,
                len: 0,
            });
            state.active = Some(file);
        }
        let mut bytes = Vec::with_capacity(readings.len() * 96);
        for reading in readings {
            put_record(&mut bytes, reading);
        }
        let state = &mut *state;
        let segment = state.segments.last_mut().expect("a segment to append to");
        let file = state.active.as_mut().expect("the last segment is open");
        let written = std::io::Write::write_all(file, &bytes)
            .map_err(LogError::from)
            .and_then(|()| files.sync_file(file, &segment.path).map_err(LogError::from));
        if let Err(error) = written {
            // Cut the group off again; whether that reached the disk decides
            // what its callers are told.
            let undone = file
                .set_len(segment.len)
                .map_err(|error| error.to_string())
                .and_then(|()| files.sync_file_after_failure(file, &segment.path));
            if let Err(why) = &undone {
                state.broken = Some(format!(
                    "a group could not be cut off the log after it failed ({why})"
                ));
            }
            return Err(AppendFailure { error, undone });
        }
        segment.len += bytes.len() as u64;
        state.next_seq = Some(first.seq + readings.len() as u64);
        Ok(())
    }

    /// Up to `max` readings from number `from` on, stopping before `until`.
    pub fn read(&self, from: u64, until: u64, max: usize) -> Result<Vec<Reading>, LogError> {
        let mut readings = Vec::new();
        if from >= until || max == 0 {
            return Ok(readings);
        }
        let (start, segments) = {
            let state = lock(&self.state);
            let Some(index) = state
                .segments
                .iter()
                .rposition(|segment| segment.first_seq <= from)
            else {
                return Ok(readings);
            };
            let segment = &state.segments[index];
            // The nearest known position at or before `from` in its segment.
            let start = state
                .hints
                .iter()
                .filter(|&&(seq, first, _)| first == segment.first_seq && seq <= from)
                .max_by_key(|&&(seq, _, _)| seq)
                .map_or((segment.first_seq, 0), |&(seq, _, offset)| (seq, offset));
            let segments: Vec<(u64, PathBuf)> = state.segments[index..]
                .iter()
                .map(|segment| (segment.first_seq, segment.path.clone()))
                .collect();
            (start, segments.into_iter())
        };
        let (mut seq, mut offset) = start;
        let (mut begin, mut end) = (None, None);
        let mut later = false;
        'segments: for (first_seq, path) in segments {
            // Each segment after the first is read from its start.
            if std::mem::replace(&mut later, true) {
                offset = 0;
                seq = first_seq;
            }
            let file = File::open(&path)?;
            let mut input = BufReader::with_capacity(64 * 1024, file);
            std::io::Seek::seek(&mut input, std::io::SeekFrom::Start(offset))?;
            let mut bad = None;
            while let Some((reading, size)) = next_record(&mut input, &mut bad)? {
                if reading.seq != seq {
                    return Err(LogError::Corrupt(format!(
                        "{} holds reading {} where {seq} was to follow",
                        path.display(),
                        reading.seq
                    )));
                }
                if reading.seq == from {
                    begin = Some((seq, first_seq, offset));
                }
                offset += size;
                seq += 1;
                if reading.seq >= from {
                    readings.push(reading);
                }
                if seq >= until || readings.len() >= max {
                    end = Some((seq, first_seq, offset));
                    break 'segments;
                }
            }
            if let Some(bad) = bad {
                // A record being written now (beyond `until`) may be torn;
                // one before it is not.
                return Err(LogError::Corrupt(format!(
                    "{} holds {bad} at byte {offset}, before reading {until}",
                    path.display()
                )));
            }
        }
        // Where this read began (a batch's readings are read again from
        // there) and ended (the next batch begins there).
        let mut state = lock(&self.state);
        for hint in [begin, end].into_iter().flatten() {
            if state.hints.contains(&hint) {
                continue;
            }
            if state.hints.len() == HINTS_MAX {
                state.hints.remove(0);
            }
            state.hints.push(hint);
        }
        Ok(readings)
    }

    /// Deletes the segments all of whose readings are numbered before
    /// `first_kept` (uploaded or set aside). The last segment stays.
    pub fn trim(&self, files: &durable::SledDir, first_kept: u64) -> Result<usize, LogError> {
        let mut state = lock(&self.state);
        let mut dropped = 0;
        while state.segments.len() > 1 && state.segments[1].first_seq <= first_kept {
            let segment = state.segments.remove(0);
            std::fs::remove_file(&segment.path)?;
            state
                .hints
                .retain(|&(_, first, _)| first != segment.first_seq);
            dropped += 1;
        }
        if dropped > 0 {
            files.sync_logs_dir()?;
        }
        Ok(dropped)
    }

    /// Segments in the log (tests).
    #[cfg(test)]
    pub(crate) fn segments(&self) -> usize {
        lock(&self.state).segments.len()
    }

    /// Writes `readings` to the log without an fsync and without counting
    /// them (tests: a group whose sync is still running).
    #[cfg(test)]
    pub(crate) fn write_unsynced(&self, readings: &[Reading]) {
        let mut state = lock(&self.state);
        let mut bytes = Vec::new();
        for reading in readings {
            put_record(&mut bytes, reading);
        }
        let file = state.active.as_mut().expect("a segment");
        std::io::Write::write_all(file, &bytes).unwrap();
    }

    /// The folder of the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::reading::Event;
    use proto::{Context, Pid};

    fn reading(seq: u64) -> Reading {
        Reading {
            seq,
            time_ms: 1_000 + seq,
            context: Context::parse("pid:42").unwrap(),
            event: Event::Commit {
                pid: Pid::parse("B1-P7").unwrap(),
                payer: None,
            },
        }
    }

    fn open(dir: &Path) -> (sled::Db, durable::SledDir, ReadingLog) {
        let (db, files) = durable::open(
            dir,
            &durable::Options {
                cache_bytes: 1 << 20,
                lock_wait: std::time::Duration::from_secs(2),
            },
        )
        .unwrap();
        let log = ReadingLog::open(&files).unwrap();
        (db, files, log)
    }

    fn seqs(readings: &[Reading]) -> Vec<u64> {
        readings.iter().map(|reading| reading.seq).collect()
    }

    #[test]
    fn readings_come_back_in_order_across_segments_and_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let per_segment = {
            let (_db, files, log) = open(dir.path());
            assert_eq!(log.next_seq(), None);
            let mut seq = 5;
            while log.segments() < 3 {
                let group: Vec<Reading> = (seq..seq + 100).map(reading).collect();
                log.append(&files, &group).unwrap();
                seq += 100;
            }
            assert_eq!(log.next_seq(), Some(seq));
            assert_eq!(
                log.read(5, seq, 3).unwrap(),
                vec![reading(5), reading(6), reading(7)]
            );
            // From a hint, across a segment's end, up to `until`.
            let all = seqs(&log.read(8, seq, usize::MAX).unwrap());
            assert!(
                all == (8..seq).collect::<Vec<_>>(),
                "{} readings from 8 to {seq}: {:?}..{:?}",
                all.len(),
                all.first(),
                all.last()
            );
            assert_eq!(
                seqs(&log.read(seq - 2, seq + 10, 10).unwrap()),
                [seq - 2, seq - 1]
            );
            std::fs::read_dir(log.dir()).unwrap().count()
        };
        assert_eq!(per_segment, 3);
        let (_db, files, log) = open(dir.path());
        let next = log.next_seq().unwrap();
        assert_eq!(seqs(&log.read(5, 7, 10).unwrap()), [5, 6]);
        log.append(&files, &[reading(next)]).unwrap();
        // Trimming keeps every segment holding a reading from `first_kept` on.
        let second = {
            let state = lock(&log.state);
            state.segments[1].first_seq
        };
        assert_eq!(log.trim(&files, second - 1).unwrap(), 0);
        assert_eq!(log.trim(&files, second).unwrap(), 1);
        assert_eq!(
            seqs(&log.read(second, second + 2, 10).unwrap()),
            [second, second + 1]
        );
        assert_eq!(log.read(5, 10, 10).unwrap(), Vec::new(), "trimmed away");
        assert_eq!(
            log.trim(&files, next + 1).unwrap(),
            1,
            "the last segment stays"
        );
        assert_eq!(seqs(&log.read(next, next + 1, 10).unwrap()), [next]);
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_a_bad_one_before_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let (_db, files, log) = open(dir.path());
            log.append(&files, &[reading(1), reading(2)]).unwrap();
            lock(&log.state).segments[0].path.clone()
        };
        let whole = std::fs::read(&path).unwrap();
        for cut in [1, HEADER_BYTES as u64 + 3] {
            // A crash in the middle of the next group's write.
            let mut torn = whole.clone();
            let mut next = Vec::new();
            put_record(&mut next, &reading(3));
            torn.extend_from_slice(&next[..cut as usize]);
            std::fs::write(&path, &torn).unwrap();
            let (_db, files, log) = open(dir.path());
            assert_eq!(log.next_seq(), Some(3));
            assert_eq!(std::fs::metadata(&path).unwrap().len(), whole.len() as u64);
            log.append(&files, &[reading(3)]).unwrap();
            assert_eq!(seqs(&log.read(1, 4, 10).unwrap()), [1, 2, 3]);
            drop((log, files));
            std::fs::write(&path, &whole).unwrap();
        }
        // A flipped byte in the first record of a segment that is not the
        // last: acknowledged readings would be lost, so it refuses.
        {
            let (_db, files, log) = open(dir.path());
            let mut seq = 3;
            while log.segments() < 2 {
                let group: Vec<Reading> = (seq..seq + 100).map(reading).collect();
                log.append(&files, &group).unwrap();
                seq += 100;
            }
        }
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_BYTES + 2] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let (_db, files) = durable::open(
            dir.path(),
            &durable::Options {
                cache_bytes: 1 << 20,
                lock_wait: std::time::Duration::from_secs(2),
            },
        )
        .unwrap();
        let refused = ReadingLog::open(&files).err().expect("refused");
        assert!(
            refused.to_string().contains("checksum does not match"),
            "{refused}"
        );
    }

    #[test]
    fn a_failed_fsync_cuts_the_group_off_and_stops_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, files, log) = open(dir.path());
        log.append(&files, &[reading(1)]).unwrap();
        files.fail_next_syncs(1);
        let failed = log.append(&files, &[reading(2), reading(3)]).unwrap_err();
        assert!(failed.undone.is_ok(), "{:?}", failed.undone);
        assert!(files.failure().unwrap().contains("injected"));
        assert_eq!(log.next_seq(), Some(2));
        assert_eq!(seqs(&log.read(1, 10, 10).unwrap()), [1]);
        assert!(matches!(
            log.append(&files, &[reading(2)]).unwrap_err().error,
            LogError::Sync(durable::SyncError::Stopped(_))
        ));
        // The undo could not be made durable either: the log takes nothing
        // more until it is opened again.
        drop((log, files, _db));
        let (_db, files, log) = open(dir.path());
        files.fail_syncs(true);
        let failed = log.append(&files, &[reading(2)]).unwrap_err();
        assert!(failed.undone.is_err());
        files.fail_syncs(false);
        assert!(matches!(
            log.append(&files, &[reading(2)]).unwrap_err().error,
            LogError::Corrupt(_)
        ));
    }
}
