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
//! (`00000000000000000001.log`, 20 digits), each a run of frames, one per
//! group commit: a header (the payload's length u32, the first reading's
//! number u64, the count of readings u32, all little-endian, then the
//! CRC-32 of those 16 bytes), the payload (each reading as a u16 length and
//! `cache::encode_reading`, which carries its number), and the payload's
//! CRC-32. Numbers run on without a gap inside a segment; a segment starts past
//! the end of the one before it (after a gap where numbers were given to a
//! group that failed). A new segment is started when the last one has grown
//! past `SEGMENT_BYTES`; a segment is deleted once every reading in it was
//! uploaded or set aside (`trim`).
//!
//! **Crashes.** A group is acknowledged only after its `fdatasync`, and the
//! next group is written only then, so a crash or power cut can tear only
//! the last frame of the last segment: its header whole and the frame
//! running to the end of the file or past it, or never written (zeros, or
//! too short for a header, to the end of the file). Opening the log cuts
//! such a frame off (nobody was told of its readings). Any other bad frame,
//! one that a whole frame follows above all, held acknowledged readings:
//! the log refuses to open rather than drop them. A failed fsync stops the data folder (`durable`'s
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
/// Bytes of a frame's header: payload length, first number, count, CRC.
const HEADER_BYTES: usize = 20;
/// Most readings in one frame (a group is at most
/// `journal::GROUP_READINGS_MAX`).
const FRAME_READINGS_MAX: usize = 65_536;
/// Longest encoded reading (one is under 200 bytes).
const READING_BYTES_MAX: usize = 1024;
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

/// Appends the frame of `readings` (numbered on without a gap) to `out`.
fn put_frame(out: &mut Vec<u8>, readings: &[Reading]) {
    let mut payload = Vec::with_capacity(readings.len() * 96);
    for reading in readings {
        let record = encode_reading(reading);
        let len = u16::try_from(record.len()).expect("a reading's record is small");
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(&record);
    }
    let mut header = Vec::with_capacity(HEADER_BYTES);
    let len = u32::try_from(payload.len()).expect("a group's frame is bounded");
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(&readings[0].seq.to_le_bytes());
    let count = u32::try_from(readings.len()).expect("a group is bounded");
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&payload);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
}

/// One frame as read from a segment.
enum Frame {
    /// A whole frame: its readings, in order, and its size in bytes.
    Whole(Vec<Reading>, u64),
    /// The end of the segment, at a frame's boundary.
    End,
    /// A header that does not check: `zeros` says whether every byte from
    /// here to the end of the file is zero.
    BadHeader { zeros: bool },
    /// Fewer bytes than a header, or a whole header whose frame runs past
    /// the end of the file.
    Short,
    /// A whole frame whose payload does not check, or holds something that
    /// is not the readings its header announces (`why`).
    BadPayload(String),
}

/// Reads the next frame of `input`.
fn next_frame(input: &mut impl Read) -> std::io::Result<Frame> {
    let mut header = [0u8; HEADER_BYTES];
    let got = read_up_to(input, &mut header)?;
    if got == 0 {
        return Ok(Frame::End);
    }
    if got < HEADER_BYTES {
        return Ok(Frame::Short);
    }
    let field = |range: std::ops::Range<usize>| -> u64 {
        header[range]
            .iter()
            .rev()
            .fold(0u64, |value, byte| value << 8 | u64::from(*byte))
    };
    let checks = crc32fast::hash(&header[..16]) == field(16..20) as u32
        && field(12..16) as usize <= FRAME_READINGS_MAX
        && field(0..4) as usize <= field(12..16) as usize * (2 + READING_BYTES_MAX)
        && field(12..16) > 0;
    if !checks {
        let mut zeros = header.iter().all(|byte| *byte == 0);
        let mut rest = [0u8; 4096];
        while zeros {
            let n = read_up_to(input, &mut rest)?;
            if n == 0 {
                break;
            }
            zeros = rest[..n].iter().all(|byte| *byte == 0);
        }
        return Ok(Frame::BadHeader { zeros });
    }
    let (len, first_seq, count) = (field(0..4) as usize, field(4..12), field(12..16) as usize);
    let mut payload = vec![0u8; len + 4];
    if read_up_to(input, &mut payload)? < payload.len() {
        return Ok(Frame::Short);
    }
    let crc = u32::from_le_bytes(payload[len..].try_into().expect("4 bytes"));
    let payload = &payload[..len];
    if crc32fast::hash(payload) != crc {
        return Ok(Frame::BadPayload(
            "a payload whose checksum does not match".to_owned(),
        ));
    }
    let mut readings = Vec::with_capacity(count);
    let mut at = 0;
    while at < len {
        let Some(size) = payload
            .get(at..at + 2)
            .map(|bytes| u16::from_le_bytes([bytes[0], bytes[1]]) as usize)
        else {
            return Ok(Frame::BadPayload("a reading cut short".to_owned()));
        };
        let reading = payload.get(at + 2..at + 2 + size).and_then(decode_reading);
        match reading {
            Some(reading) if reading.seq == first_seq + readings.len() as u64 => {
                readings.push(reading);
            }
            _ => {
                return Ok(Frame::BadPayload(format!(
                    "no reading {} where the frame from {first_seq} holds it",
                    first_seq + readings.len() as u64
                )));
            }
        }
        at += 2 + size;
    }
    if readings.len() != count {
        return Ok(Frame::BadPayload(format!(
            "{} readings in a frame of {count}",
            readings.len()
        )));
    }
    Ok(Frame::Whole(readings, (HEADER_BYTES + len + 4) as u64))
}

/// A frame whose first reading is `found` where `expected` was to follow.
fn misnumbered(path: &Path, found: u64, expected: u64) -> LogError {
    LogError::Corrupt(format!(
        "{} holds reading {found} where {expected} was to follow",
        path.display()
    ))
}

/// Whether `input` has no byte left.
fn at_end(input: &mut impl Read) -> std::io::Result<bool> {
    Ok(read_up_to(input, &mut [0u8; 1])? == 0)
}

/// Reads into `buffer` until it is full or the input ends; the bytes read.
fn read_up_to(input: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buffer.len() {
        match input.read(&mut buffer[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(got)
}

/// Whether a group numbered from `first_seq` goes to a new segment: the
/// first, one after a gap, or one past a full segment.
fn starts_segment(state: &State, first_seq: u64) -> bool {
    state.next_seq.is_some_and(|next| next < first_seq)
        || state
            .segments
            .last()
            .is_none_or(|segment| segment.len >= SEGMENT_BYTES)
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
            let is_last = Some(index) == last;
            let file_len = std::fs::metadata(&path)?.len();
            let (mut len, mut expected) = (0u64, first_seq);
            let torn = loop {
                let frame = next_frame(&mut input)?;
                let bad = match frame {
                    Frame::End => break None,
                    Frame::Whole(readings, size) => {
                        if readings[0].seq != expected {
                            return Err(misnumbered(&path, readings[0].seq, expected));
                        }
                        len += size;
                        expected += readings.len() as u64;
                        continue;
                    }
                    // Only the last frame of the last segment can be torn,
                    // and only so: never written, or cut short by the end of
                    // the file, or whole but ending the file.
                    Frame::BadHeader { zeros: true } if is_last => {
                        break Some("a frame never written");
                    }
                    Frame::Short if is_last => break Some("a frame cut short"),
                    Frame::BadPayload(_) if is_last && at_end(&mut input)? => {
                        break Some("a frame whose payload was not all written");
                    }
                    Frame::BadHeader { .. } => "a frame header that does not check".to_owned(),
                    Frame::Short => "a frame cut short".to_owned(),
                    Frame::BadPayload(why) => why,
                };
                return Err(LogError::Corrupt(format!(
                    "{} holds {bad} at byte {len}, and readings acknowledged as recorded may be \
                     in it: the meter does not start rather than drop them. Keep a copy of the \
                     folder and see docs/meterd.md (Durability)",
                    path.display()
                )));
            };
            if let Some(why) = torn {
                // A group whose write a crash cut short, never acknowledged.
                tracing::warn!(
                    segment = %path.display(),
                    kept = len,
                    dropped = file_len - len,
                    why,
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

    /// Whether appending a group numbered from `first_seq` starts a new
    /// segment (the cache keeps where the newest starts, so that a lost
    /// segment is noticed).
    pub fn would_start_segment(&self, first_seq: u64) -> bool {
        starts_segment(&lock(&self.state), first_seq)
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
        let starts_segment = starts_segment(&state, first.seq);
        if starts_segment {
            let path = self.dir.join(segment_name(first.seq));
            let file = std::fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|error| fail(error.into()))?;
            if let Err(error) = files.sync_logs_dir() {
                // Not named durably: gone again (an empty last segment is
                // removed on open as well).
                let _ = std::fs::remove_file(&path);
                return Err(fail(error.into()));
            }
            state.segments.push(Segment {
                first_seq: first.seq,
                path,
                len: 0,
            });
            state.active = Some(file);
        }
        let mut bytes = Vec::with_capacity(readings.len() * 96);
        put_frame(&mut bytes, readings);
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
            match &undone {
                Err(why) => {
                    state.broken = Some(format!(
                        "a group could not be cut off the log after it failed ({why})"
                    ));
                }
                Ok(()) if starts_segment => {
                    // The segment made for this group holds nothing: gone
                    // again, so that the next group can make it anew.
                    let empty = state.segments.pop().expect("the segment just made");
                    let reopened = std::fs::remove_file(&empty.path).and_then(|()| {
                        state
                            .segments
                            .last()
                            .map(|last| std::fs::OpenOptions::new().append(true).open(&last.path))
                            .transpose()
                    });
                    match reopened {
                        Ok(active) => state.active = active,
                        Err(why) => {
                            state.broken = Some(format!(
                                "the log could not go back to its last segment ({why})"
                            ));
                        }
                    }
                    // Names only: a stopped folder refuses, and an empty
                    // last segment is removed on open anyway.
                    let _ = files.sync_logs_dir();
                }
                Ok(()) => {}
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
            // Frames from here on; a frame being written now starts at
            // `until` or later and is never read.
            while seq < until {
                let frame_at = offset;
                let (frame, size) = match next_frame(&mut input)? {
                    Frame::End => break,
                    Frame::Whole(frame, size) => (frame, size),
                    _ => {
                        return Err(LogError::Corrupt(format!(
                            "{} holds a bad frame at byte {offset}, before reading {until}",
                            path.display()
                        )));
                    }
                };
                if frame[0].seq != seq {
                    return Err(misnumbered(&path, frame[0].seq, seq));
                }
                offset += size;
                seq += frame.len() as u64;
                if (frame[0].seq..seq).contains(&from) {
                    begin = Some((frame[0].seq, first_seq, frame_at));
                }
                let frame_first = frame[0].seq;
                let mut stopped = false;
                for reading in frame {
                    if reading.seq >= until || readings.len() >= max {
                        stopped = true;
                        break;
                    }
                    if reading.seq >= from {
                        readings.push(reading);
                    }
                }
                if stopped || seq >= until || readings.len() >= max {
                    // The next read begins in this frame, or after it.
                    end = Some(if stopped {
                        (frame_first, first_seq, frame_at)
                    } else {
                        (seq, first_seq, offset)
                    });
                    break 'segments;
                }
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
        put_frame(&mut bytes, readings);
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
    fn a_torn_last_frame_is_cut_off_and_any_other_bad_frame_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let (_db, files, log) = open(dir.path());
            log.append(&files, &[reading(1), reading(2)]).unwrap();
            log.append(&files, &[reading(3)]).unwrap();
            lock(&log.state).segments[0].path.clone()
        };
        let whole = std::fs::read(&path).unwrap();
        let mut next = Vec::new();
        put_frame(&mut next, &[reading(4), reading(5)]);
        let reopened = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            let (db, files) = durable::open(
                dir.path(),
                &durable::Options {
                    cache_bytes: 1 << 20,
                    lock_wait: std::time::Duration::from_secs(2),
                },
            )
            .unwrap();
            let log = ReadingLog::open(&files);
            (db, files, log)
        };
        // What a crash during the next group's write can leave: part of its
        // header, its header and part of its payload, all of it with a
        // payload never written (zeros), or zeros only.
        let mut zeroed = next.clone();
        zeroed[HEADER_BYTES..].fill(0);
        let torn: Vec<Vec<u8>> = vec![
            next[..7].to_vec(),
            next[..HEADER_BYTES + 9].to_vec(),
            zeroed,
            vec![0; next.len()],
        ];
        for tail in torn {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(&tail);
            let (_db, files, log) = reopened(&bytes);
            let log = log.unwrap();
            assert_eq!(log.next_seq(), Some(4));
            assert_eq!(std::fs::metadata(&path).unwrap().len(), whole.len() as u64);
            log.append(&files, &[reading(4)]).unwrap();
            assert_eq!(seqs(&log.read(1, 5, 10).unwrap()), [1, 2, 3, 4]);
        }
        // A bad byte in a frame that another follows: that frame was
        // acknowledged, so opening refuses, in the header or the payload.
        for at in [3, HEADER_BYTES + 5] {
            let mut bytes = whole.clone();
            bytes[at] ^= 0x40;
            let (_db, _files, log) = reopened(&bytes);
            let refused = log.err().expect("refused").to_string();
            assert!(
                refused.contains("does not start rather than drop them"),
                "{refused}"
            );
        }
        // Garbage after the last frame that is not zeros is no torn write.
        let mut bytes = whole.clone();
        bytes.extend_from_slice(b"not a frame at all, and long enough");
        let (db, files, log) = reopened(&bytes);
        assert!(log.is_err());
        drop((log, files, db));
        // A bad last frame of a segment that is not the last refuses too.
        std::fs::write(&path, &whole).unwrap();
        {
            let (_db, files, log) = open(dir.path());
            let mut seq = 4;
            while log.segments() < 2 {
                let group: Vec<Reading> = (seq..seq + 100).map(reading).collect();
                log.append(&files, &group).unwrap();
                seq += 100;
            }
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        let (_db, _files, log) = reopened(&bytes);
        let refused = log.err().expect("refused").to_string();
        assert!(refused.contains("checksum does not match"), "{refused}");
    }

    /// A group that starts a segment (here after a gap) and fails: the
    /// segment made for it goes again, so that nothing stands in the way of
    /// making it anew (a write refused for a full disk stops nothing).
    #[test]
    fn a_segment_made_for_a_failed_group_goes_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, files, log) = open(dir.path());
        log.append(&files, &[reading(1)]).unwrap();
        files.fail_next_syncs(1);
        let failed = log.append(&files, &[reading(5)]).unwrap_err();
        assert!(failed.undone.is_ok(), "{:?}", failed.undone);
        assert_eq!(log.segments(), 1);
        assert!(!log.dir().join(segment_name(5)).exists());
        assert_eq!(seqs(&log.read(1, 10, 10).unwrap()), [1]);
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
