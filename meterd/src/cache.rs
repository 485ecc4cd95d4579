//! The durable cache: readings waiting for upload (in the meter's own log,
//! `readings`), and in sled the pending batch, the status table, the upload
//! parameters, grants and sessions. The only module that touches sled.
//!
//! sled's state lives in one tree so that each change is one atomic
//! `apply_batch`. Keys: `m:...`; `m:first_pending` is the first reading not
//! yet uploaded or set aside, and the log's readings before it are done
//! with. (Caches made before the log kept readings under `r` + seq,
//! big-endian u64: `open` moves them into the log once.) Every change that
//! acknowledges something is made durable first: a group of readings by
//! one write and one fsync of the log, sled's changes by
//! `durable::SledDir::sync` (sled's flush, then an fsync of its log and of
//! any blob file sled wrote: sled's flush alone survives no power cut).
//!
//! **Fail-stop.** Once a sync fails, the cache refuses every change until
//! it is opened again (a restart recovers from what is on disk): after a
//! failed fsync nothing later can be trusted to be durable. A group of
//! readings whose sync failed is cut off the log again, and `NEXT_SEQ` is
//! kept past it (a sequence number is not given twice); whether the cut
//! reached the disk decides what the callers are told (`Stopped` or
//! `InDoubt`).
//!
//! Every batch id carries a random **instance id** (64 bits). The cache
//! makes a new one **every time it is opened**, and the readings appended
//! from then on are batched under it: a data folder restored from a
//! backup, cloned, rolled back, or lost and made again, with the same MID
//! and secret, never sends new readings under a batch id that it (or
//! another copy of it) sent before. Readings already in the cache when it
//! is opened keep the instance id they were appended under (the cache
//! keeps, for each open, the first sequence number appended under its id,
//! until those readings are uploaded), and a batch never mixes readings of
//! two instance ids: a restored copy resends the readings it shares with
//! the original under the same batch id, so the backoffice either answers
//! "already applied" (same readings: nothing is charged twice) or 205 (other
//! readings: set aside), never charges them a second time under a new id. A
//! batch fixed before a restart keeps its id: retries are unchanged.
//!
//! A batch the backoffice answers with fault 205 (`BatchConflict`: that id
//! was applied already, with other readings) is **set aside**: its readings
//! move, in one atomic step, from `r` + seq to `c` + seq, where they are kept
//! and never uploaded again; its record goes to `x` + first seq; and the
//! cache takes a new instance id for the readings appended after that, so
//! that they cannot collide with the batches of whatever copy of this cache
//! sent that id first.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use proto::grant::{GrantInfo, Scope};
use proto::reading::{Code, Event, Reading};
use proto::record::{Reader, put_str};
use proto::upload::{MeterParams, Standing};
use proto::{BatchId, Cid, Context, Payer, Pid};

use crate::batching::BatchEnd;
use crate::readings::ReadingLog;

/// How long opening waits for another holder of the cache's lock to let go.
pub const LOCK_WAIT_MS: u64 = 2_000;
/// Bytes of memory sled may use for its page cache; the rest stays on disk.
pub const SLED_CACHE_BYTES: u64 = 8 * 1024 * 1024;

const READING_PREFIX: u8 = b'r';
const SET_ASIDE_READING_PREFIX: u8 = b'c';
const SET_ASIDE_BATCH_PREFIX: u8 = b'x';
/// How many set-aside batch ids the meter's status shows (the newest).
pub const SET_ASIDE_SHOWN_MAX: usize = 16;
const NEXT_SEQ_KEY: &[u8] = b"m:next_seq";
/// The first reading not yet uploaded or set aside.
const FIRST_PENDING_KEY: &[u8] = b"m:first_pending";
/// Where the readings log ended when it was opened, first written to, or
/// last began a new segment (kept before the segment is made); it only
/// grows, so a log that ends before it lost readings it had acknowledged.
const LOG_FLOOR_KEY: &[u8] = b"m:log_floor";
const BATCH_KEY: &[u8] = b"m:batch";
const TABLE_KEY: &[u8] = b"m:table";
/// Where sessions were kept before they carried the uid; dropped on save.
const OLD_SESSIONS_KEY: &[u8] = b"m:sessions";
const SESSIONS_KEY: &[u8] = b"m:logins";
/// The boot id of the machine when the sessions were saved.
const SESSIONS_BOOT_KEY: &[u8] = b"m:logins_boot";
const GRANT_PREFIX: &[u8] = b"g:";
/// Where the single instance id was kept before there was one per open;
/// read once as the id of every reading then cached, and dropped.
const OLD_INSTANCE_KEY: &[u8] = b"m:instance";
/// The instance ids: (first seq appended under it, id), 16 bytes each, in
/// order; the last is the current one.
const INSTANCES_KEY: &[u8] = b"m:instances";
const RECORD_VERSION: u8 = 1;

/// Why the cache could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache holds its configured maximum of readings.
    #[error("the cache holds its maximum of {max} readings; upload to free space")]
    Full {
        /// The configured maximum.
        max: u64,
    },
    /// Another process (another meterd) holds the cache.
    #[error("another meterd is already using {0}")]
    Locked(String),
    /// sled failed (disk full, I/O error).
    #[error("storage failed: {0}")]
    Storage(#[from] sled::Error),
    /// Opening the folder failed.
    #[error("could not open the cache: {0}")]
    Io(#[from] std::io::Error),
    /// The pending batch had no readings; it was dropped.
    #[error("the pending batch {0} held no readings and was dropped")]
    EmptyBatch(String),
    /// Making the data durable failed: the cache has stopped.
    #[error("could not make the cache durable: {0}")]
    Sync(#[from] durable::SyncError),
    /// The readings log failed or is corrupt.
    #[error("{0}")]
    Log(String),
    /// A sync failed earlier: the cache takes no change until a restart.
    #[error(
        "the meter stopped recording after its storage failed ({0}); restart meterd once the disk is fixed"
    )]
    Stopped(String),
    /// A group of readings was written but could not be made durable, and
    /// removing it again could not be made durable either: the readings may
    /// or may not be on disk, and may be uploaded after a restart.
    #[error(
        "the meter's storage failed while recording ({0}) and could not undo it: this reading may have been recorded; the meter stopped"
    )]
    InDoubt(String),
}

impl From<crate::readings::LogError> for CacheError {
    fn from(error: crate::readings::LogError) -> Self {
        match error {
            crate::readings::LogError::Sync(error) => CacheError::Sync(error),
            other => CacheError::Log(other.to_string()),
        }
    }
}

impl From<durable::OpenError> for CacheError {
    fn from(error: durable::OpenError) -> Self {
        match error {
            durable::OpenError::Locked(dir) => CacheError::Locked(dir),
            durable::OpenError::Storage(error) => CacheError::Storage(error),
            durable::OpenError::Io(error) => CacheError::Io(error),
        }
    }
}

/// A reading before the cache gives it a sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReading {
    /// When the call was made, ms since the Unix epoch.
    pub time_ms: u64,
    /// The context it was made in.
    pub context: Context,
    /// What happened.
    pub event: Event,
}

/// A batch fixed before its first send: same id and readings on every retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingBatch {
    /// `INSTANCE:FIRST_SEQ`.
    pub id: BatchId,
    /// Sequence number of the first reading.
    pub first_seq: u64,
    /// Sequence number of the last reading.
    pub last_seq: u64,
}

/// An open login, as kept across a restart of the meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSession {
    /// The context, in the form recorded in readings.
    pub context: String,
    /// The customer logged in.
    pub cid: Cid,
    /// The uid that logged in (a grant must still admit it).
    pub uid: u32,
}

/// The open logins saved last, and the boot they were saved in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedSessions {
    /// The machine's boot id (`/proc/sys/kernel/random/boot_id`) when they
    /// were saved; empty when it was unknown (or saved before boot ids were
    /// kept). After a reboot PIDs and start times repeat, so sessions of
    /// another boot name other processes.
    pub boot_id: String,
    /// The logins.
    pub sessions: Vec<SavedSession>,
}

/// The status table and parameters from the last upload answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedTable {
    /// When the answer arrived, ms since the Unix epoch.
    pub received_ms: u64,
    /// The standings.
    pub standings: Vec<Standing>,
    /// The upload parameters.
    pub params: MeterParams,
}

/// Batches set aside after a conflict: what the meter's status shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetAside {
    /// Batches set aside.
    pub batches: u64,
    /// Readings in them, kept in the cache.
    pub readings: u64,
    /// The ids of the newest `SET_ASIDE_SHOWN_MAX`, oldest first.
    pub latest: Vec<BatchId>,
}

impl SetAside {
    fn add(&mut self, batch: &PendingBatch) {
        self.batches += 1;
        self.readings += batch.last_seq - batch.first_seq + 1;
        if self.latest.len() == SET_ASIDE_SHOWN_MAX {
            self.latest.remove(0);
        }
        self.latest.push(batch.id.clone());
    }
}

/// The meter's durable cache.
pub struct Cache {
    tree: sled::Tree,
    files: durable::SledDir,
    log: ReadingLog,
    path: PathBuf,
    readings_max: u64,
    next_seq: AtomicU64,
    first_pending_seq: AtomicU64,
    /// (first seq, instance id), in order; the last is the current one.
    instances: std::sync::Mutex<Vec<(u64, u64)>>,
    set_aside: std::sync::Mutex<SetAside>,
}

fn encode_instances(instances: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(instances.len() * 16);
    for (start, instance) in instances {
        out.extend_from_slice(&start.to_be_bytes());
        out.extend_from_slice(&instance.to_be_bytes());
    }
    out
}

fn decode_instances(bytes: &[u8]) -> Vec<(u64, u64)> {
    assert!(
        bytes.len().is_multiple_of(16) && !bytes.is_empty(),
        "cache: instances record is corrupt"
    );
    bytes
        .chunks_exact(16)
        .map(|pair| (u64_of(&pair[..8]), u64_of(&pair[8..])))
        .collect()
}

/// Drops the instance ids that no waiting reading (sequence number
/// `first_pending` or later) was appended under, keeping the last (current)
/// one.
fn prune_instances(instances: &mut Vec<(u64, u64)>, first_pending: u64) {
    let mut kept = Vec::with_capacity(instances.len());
    for (index, &(start, instance)) in instances.iter().enumerate() {
        match instances.get(index + 1) {
            Some(&(next_start, _)) if next_start <= first_pending || next_start <= start => {}
            _ => kept.push((start, instance)),
        }
    }
    *instances = kept;
}

/// Makes `instance` the id of readings from `next_seq` on.
fn start_instance(instances: &mut Vec<(u64, u64)>, next_seq: u64, instance: u64) {
    // The current id, if no reading was appended under it, is not needed.
    if instances
        .last()
        .is_some_and(|&(start, _)| start >= next_seq)
    {
        instances.pop();
    }
    instances.push((next_seq, instance));
}

/// A new random instance id.
fn random_instance() -> Result<u64, CacheError> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| std::io::Error::other("the system's random generator failed"))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Where a cache made before the readings log kept reading `seq`.
#[cfg(test)]
fn reading_key(seq: u64) -> [u8; 9] {
    prefixed(READING_PREFIX, seq)
}

fn prefixed(prefix: u8, seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = prefix;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn u64_of(bytes: &[u8]) -> u64 {
    let array: [u8; 8] = bytes.try_into().expect("stored u64 has 8 bytes");
    u64::from_be_bytes(array)
}

impl Cache {
    /// Opens (or creates) the cache in `dir`, holding at most `readings_max`
    /// readings.
    pub fn open(dir: &Path, readings_max: u64) -> Result<Cache, CacheError> {
        let (db, files) = durable::open(
            dir,
            &durable::Options {
                // Bounds memory; readings beyond it stay on disk.
                cache_bytes: SLED_CACHE_BYTES,
                // sled's own threads may hold a cache closed a moment ago
                // (a restart in the same process): wait a little.
                lock_wait: std::time::Duration::from_millis(LOCK_WAIT_MS),
            },
        )?;
        let tree = db.open_tree("cache")?;
        let log = ReadingLog::open(&files)?;
        move_readings_into(&log, &tree, &files)?;
        let stored_next = match tree.get(NEXT_SEQ_KEY)? {
            Some(bytes) => u64_of(&bytes),
            None => 1,
        };
        let first_pending_seq = match tree.get(FIRST_PENDING_KEY)? {
            Some(bytes) => u64_of(&bytes),
            // A cache made before this key: the log's first reading on
            // (what `move_readings_into` found), or the next.
            None => log.first_seq().unwrap_or(stored_next).min(stored_next),
        };
        // The log must hold what sled says was written to it: its newest
        // segment's start, the pending batch, the readings not yet uploaded.
        let log_end = log.next_seq().unwrap_or(0);
        let pending_batch = tree.get(BATCH_KEY)?.map(|bytes| decode_batch(&bytes));
        let floor = tree.get(LOG_FLOOR_KEY)?.map(|bytes| u64_of(&bytes));
        let needed = [
            floor.map(|floor| (floor, "it ended when last opened or extended")),
            pending_batch
                .as_ref()
                .map(|batch| (batch.last_seq + 1, "the batch being sent ends")),
        ];
        for (end, what) in needed.into_iter().flatten() {
            if log_end < end {
                return Err(CacheError::Log(format!(
                    "the readings log in {} ends before reading {end}, where {what}: segments \
                     holding acknowledged readings are missing. The meter does not start rather \
                     than number new readings over them; restore the folder from a copy",
                    log.dir().display()
                )));
            }
        }
        let next_seq = stored_next
            .max(log.next_seq().unwrap_or(0))
            .max(first_pending_seq);
        // Every reading in the log was uploaded or set aside: the numbers
        // after it went to groups that failed, and none waits (`pending`
        // would count them). Safe here only: nothing appends yet.
        let first_pending_seq = if first_pending_seq >= log.next_seq().unwrap_or(0) {
            next_seq
        } else {
            first_pending_seq
        };
        // Readings already cached keep the instance ids they were appended
        // under; those appended from now on get a new one, made durably
        // before any batch id uses it.
        let mut instances = match (tree.get(INSTANCES_KEY)?, tree.get(OLD_INSTANCE_KEY)?) {
            (Some(bytes), _) => decode_instances(&bytes),
            (None, Some(old)) => vec![(0, u64_of(&old))],
            (None, None) => Vec::new(),
        };
        prune_instances(&mut instances, first_pending_seq);
        start_instance(&mut instances, next_seq, random_instance()?);
        let mut changes = sled::Batch::default();
        changes.insert(INSTANCES_KEY, encode_instances(&instances));
        changes.remove(OLD_INSTANCE_KEY);
        changes.insert(FIRST_PENDING_KEY, &first_pending_seq.to_be_bytes());
        changes.insert(NEXT_SEQ_KEY, &next_seq.to_be_bytes());
        if let Some(end) = log.next_seq() {
            changes.insert(LOG_FLOOR_KEY, &end.to_be_bytes());
        }
        tree.apply_batch(changes)?;
        files.sync()?;
        let mut set_aside = SetAside::default();
        for entry in tree.scan_prefix([SET_ASIDE_BATCH_PREFIX]) {
            set_aside.add(&decode_batch(&entry?.1));
        }
        Ok(Cache {
            tree,
            files,
            log,
            path: dir.to_owned(),
            readings_max,
            next_seq: AtomicU64::new(next_seq),
            first_pending_seq: AtomicU64::new(first_pending_seq),
            instances: std::sync::Mutex::new(instances),
            set_aside: std::sync::Mutex::new(set_aside),
        })
    }

    fn instances(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.instances
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This cache's current instance id, 16 hex digits: new at every open,
    /// the id of the readings appended since.
    pub fn instance(&self) -> String {
        let current = self.instances().last().map_or(0, |&(_, instance)| instance);
        format!("{current:016x}")
    }

    /// The instance id that reading `seq` was appended under, and the first
    /// sequence number appended under another (a batch stops before it).
    fn instance_of(&self, seq: u64) -> (u64, Option<u64>) {
        let instances = self.instances();
        let index = instances
            .iter()
            .rposition(|&(start, _)| start <= seq)
            .unwrap_or(0);
        let bound = instances.get(index + 1).map(|&(start, _)| start);
        (instances[index].1, bound)
    }

    /// The id of an upload that carries no readings, sent at `now_ms` to
    /// refresh the status table: `INSTANCE:tMS`.
    pub fn refresh_id(&self, now_ms: u64) -> BatchId {
        BatchId::parse(&format!("{}:t{now_ms}", self.instance()))
            .expect("INSTANCE:tMS is a valid batch id")
    }

    /// Where the cache lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configured maximum of readings.
    pub fn readings_max(&self) -> u64 {
        self.readings_max
    }

    /// Readings waiting for upload.
    pub fn pending(&self) -> u64 {
        // The first pending reading never passes the next one, and both only
        // grow: reading the first before the next keeps the difference from
        // going negative while an upload deletes readings.
        let first = self.first_pending_seq.load(Ordering::Acquire);
        let next = self.next_seq.load(Ordering::Acquire);
        next.saturating_sub(first)
    }

    fn sync(&self) -> Result<(), CacheError> {
        Ok(self.files.sync()?)
    }

    /// Refuses every change once a sync has failed.
    fn running(&self) -> Result<(), CacheError> {
        match self.files.failure() {
            Some(reason) => Err(CacheError::Stopped(reason)),
            None => Ok(()),
        }
    }

    /// Why the cache stopped taking changes, if it did: a sync failed.
    pub fn stopped(&self) -> Option<String> {
        self.files.failure()
    }

    /// From now on every fsync fails, as a failing disk would (tests).
    #[cfg(test)]
    pub(crate) fn fail_syncs(&self, fail: bool) {
        self.files.fail_syncs(fail);
    }

    /// Keeps a power-cut image of the cache in `image` (tests).
    #[cfg(test)]
    pub(crate) fn keep_image_in(&self, image: &Path) {
        self.files.keep_image_in(image).unwrap();
    }

    /// Appends readings durably, numbering them in order: one write and
    /// one fsync of the log. Returns the first sequence number. Only one
    /// thread (the group committer) calls this.
    pub fn append(&self, readings: &[NewReading]) -> Result<u64, CacheError> {
        self.running()?;
        let count = readings.len() as u64;
        if self.pending() + self.set_aside().readings + count > self.readings_max {
            return Err(CacheError::Full {
                max: self.readings_max,
            });
        }
        let first = self.next_seq.load(Ordering::Acquire);
        let numbered: Vec<Reading> = readings
            .iter()
            .enumerate()
            .map(|(offset, new)| Reading {
                seq: first + offset as u64,
                time_ms: new.time_ms,
                context: new.context.clone(),
                event: new.event,
            })
            .collect();
        let next = first + count;
        if self.log.would_start_segment(first)
            && let Some(end) = self.log.next_seq()
        {
            // Kept before the segment is made (once per segment): see
            // `LOG_FLOOR_KEY`.
            self.tree.insert(LOG_FLOOR_KEY, &end.to_be_bytes())?;
            self.sync()?;
        }
        let first_ever = self.log.next_seq().is_none();
        if let Err(failure) = self.log.append(&self.files, &numbered) {
            return Err(self.undo_append(first, next, failure));
        }
        if first_ever {
            // The log's first readings: from now on it must never be found
            // empty (`LOG_FLOOR_KEY`). Kept after the append, so a crash
            // before this leaves no floor rather than one past the log; a
            // failure here stops the cache, but these readings are durable.
            let kept = self
                .tree
                .insert(LOG_FLOOR_KEY, &next.to_be_bytes())
                .map_err(CacheError::from)
                .and_then(|_| self.sync());
            if let Err(error) = kept {
                tracing::error!(%error, "could not keep where the readings log reached");
            }
        }
        // Only now may a batch take these readings: `next_seq` bounds what
        // `pending_batch_ending` reads, so a reading whose sync is still
        // running (or failed) is never uploaded.
        self.next_seq.store(next, Ordering::Release);
        Ok(first)
    }

    /// A group's write or sync failed and the log cut it off again (or
    /// could not make that durable: `failure.undone`). Keeps `NEXT_SEQ`
    /// past the group, with one more fsync straight on sled's log (the
    /// stopped `SledDir` refuses any other), so that a restart does not
    /// give its numbers again; that is best effort: nobody was told them.
    fn undo_append(
        &self,
        first: u64,
        next: u64,
        failure: crate::readings::AppendFailure,
    ) -> CacheError {
        let error = CacheError::from(failure.error);
        if let Err(why) = self
            .tree
            .insert(NEXT_SEQ_KEY, &next.to_be_bytes())
            .map_err(|error| error.to_string())
            .and_then(|_| self.files.sync_after_failure())
        {
            tracing::warn!(%why, first, next, "could not keep the next sequence number past a failed group");
        }
        match (failure.undone, &error) {
            // A write refused before any sync (a full disk): nothing stopped.
            (Ok(()), CacheError::Log(_)) if self.files.failure().is_none() => error,
            (Ok(()), _) => CacheError::Stopped(error.to_string()),
            (Err(undo_error), _) => {
                tracing::error!(%error, %undo_error, first, next, "readings in doubt");
                CacheError::InDoubt(error.to_string())
            }
        }
    }

    /// Time of the oldest waiting reading, if any.
    pub fn oldest_time_ms(&self) -> Result<Option<u64>, CacheError> {
        let first = self.first_pending_seq.load(Ordering::Acquire);
        let next = self.next_seq.load(Ordering::Acquire);
        let oldest = self.log.read(first, next, 1)?;
        Ok(oldest.first().map(|reading| reading.time_ms))
    }

    /// The batch to upload next: the pending one if there is one, else a new
    /// one of at most `readings_max` readings, made durable before it is
    /// returned. `None` when nothing waits.
    pub fn pending_batch(&self, readings_max: usize) -> Result<Option<PendingBatch>, CacheError> {
        self.pending_batch_ending(readings_max, |readings| BatchEnd::Take(readings.len()))
    }

    /// Like `pending_batch`, but a new batch takes as many of the first
    /// `readings_max` waiting readings as `end` says (see
    /// `batching::batch_end`); `None` also when `end` holds them back.
    pub fn pending_batch_ending(
        &self,
        readings_max: usize,
        end: impl FnOnce(&[Reading]) -> BatchEnd,
    ) -> Result<Option<PendingBatch>, CacheError> {
        self.running()?;
        if let Some(bytes) = self.tree.get(BATCH_KEY)? {
            return Ok(Some(decode_batch(&bytes)));
        }
        // Readings appended but not yet durable (their group's sync is
        // running, or failed and is being undone) are not the uploader's.
        let durable_next = self.next_seq.load(Ordering::Acquire);
        let first_pending = self.first_pending_seq.load(Ordering::Acquire);
        let mut readings = self
            .log
            .read(first_pending, durable_next, readings_max.max(1))?;
        if readings.is_empty() {
            return Ok(None);
        }
        // A batch holds readings of one instance id only.
        let (instance, bound) = self.instance_of(readings[0].seq);
        if let Some(bound) = bound {
            readings.retain(|reading| reading.seq < bound);
        }
        let taken = match end(&readings) {
            BatchEnd::Take(count) => count.clamp(1, readings.len()),
            BatchEnd::Hold => return Ok(None),
        };
        let first_seq = readings[0].seq;
        let last_seq = readings[taken - 1].seq;
        let id = BatchId::parse(&format!("{instance:016x}:{first_seq}"))
            .expect("INSTANCE:seq is a valid batch id");
        let batch = PendingBatch {
            id,
            first_seq,
            last_seq,
        };
        self.tree.insert(BATCH_KEY, encode_batch(&batch))?;
        self.sync()?;
        Ok(Some(batch))
    }

    /// The readings of a batch, in order.
    pub fn batch_readings(&self, batch: &PendingBatch) -> Result<Vec<Reading>, CacheError> {
        let until = batch.last_seq.saturating_add(1);
        let readings = self.log.read(batch.first_seq, until, usize::MAX)?;
        if readings.is_empty() {
            // Cannot happen since batches take durable readings only; if a
            // cache made before that holds one, it is dropped, not retried
            // forever.
            self.tree.remove(BATCH_KEY)?;
            self.sync()?;
            return Err(CacheError::EmptyBatch(batch.id.to_string()));
        }
        Ok(readings)
    }

    /// The backoffice confirmed `batch`: delete its readings and keep the
    /// answer, in one atomic step.
    pub fn confirm_batch(
        &self,
        batch: &PendingBatch,
        table: &SavedTable,
    ) -> Result<(), CacheError> {
        self.running()?;
        let mut changes = sled::Batch::default();
        changes.remove(BATCH_KEY);
        changes.insert(TABLE_KEY, encode_table(table));
        changes.insert(FIRST_PENDING_KEY, &(batch.last_seq + 1).to_be_bytes());
        self.tree.apply_batch(changes)?;
        self.sync()?;
        self.first_pending_seq
            .store(batch.last_seq + 1, Ordering::Release);
        self.trim_log(batch.last_seq + 1);
        Ok(())
    }

    /// Deletes the log's segments whose readings are all done with. Only
    /// disk space depends on it: a failure is logged (a failed fsync has
    /// stopped the cache by then, as any other).
    fn trim_log(&self, first_kept: u64) {
        if let Err(error) = self.log.trim(&self.files, first_kept) {
            tracing::warn!(%error, "could not delete uploaded readings from the log");
        }
    }

    /// The backoffice refused `batch` as a conflict (its id was applied with
    /// other readings): keeps its readings, out of the upload path, and
    /// takes a new instance id for the readings appended after this, in one
    /// atomic step. Readings already cached keep their ids: another copy
    /// of this cache may hold them too, and must not be charged twice.
    pub fn set_aside_batch(&self, batch: &PendingBatch) -> Result<(), CacheError> {
        self.running()?;
        let mut changes = sled::Batch::default();
        let until = batch.last_seq.saturating_add(1);
        for reading in self.log.read(batch.first_seq, until, usize::MAX)? {
            changes.insert(
                &prefixed(SET_ASIDE_READING_PREFIX, reading.seq),
                encode_reading(&reading),
            );
        }
        changes.insert(FIRST_PENDING_KEY, &(batch.last_seq + 1).to_be_bytes());
        changes.remove(BATCH_KEY);
        changes.insert(
            &prefixed(SET_ASIDE_BATCH_PREFIX, batch.first_seq),
            encode_batch(batch),
        );
        let mut instances = self.instances();
        let mut updated = instances.clone();
        prune_instances(&mut updated, batch.last_seq + 1);
        let next_seq = self.next_seq.load(Ordering::Acquire);
        start_instance(&mut updated, next_seq, random_instance()?);
        changes.insert(INSTANCES_KEY, encode_instances(&updated));
        self.tree.apply_batch(changes)?;
        self.sync()?;
        self.first_pending_seq
            .store(batch.last_seq + 1, Ordering::Release);
        *instances = updated;
        drop(instances);
        self.trim_log(batch.last_seq + 1);
        self.set_aside
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .add(batch);
        Ok(())
    }

    /// The batches set aside so far.
    pub fn set_aside(&self) -> SetAside {
        self.set_aside
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The readings of the batches set aside, in order (they stay in the
    /// cache for a person to look at; the meter never uploads them).
    pub fn set_aside_readings(&self) -> Result<Vec<Reading>, CacheError> {
        let mut readings = Vec::new();
        for entry in self.tree.scan_prefix([SET_ASIDE_READING_PREFIX]) {
            readings.push(checked_decode(&entry?.1));
        }
        Ok(readings)
    }

    /// Keeps an answer that confirmed no batch (a refresh of the table).
    pub fn save_table(&self, table: &SavedTable) -> Result<(), CacheError> {
        self.running()?;
        self.tree.insert(TABLE_KEY, encode_table(table))?;
        self.sync()
    }

    /// Keeps the open logins (context as recorded in readings, CID, and the
    /// uid that logged in) with the boot id they belong to, so that sessions
    /// survive a restart of the meter, but not a reboot.
    pub fn save_sessions(&self, saved: &SavedSessions) -> Result<(), CacheError> {
        self.running()?;
        let mut out = Vec::with_capacity(saved.sessions.len() * 52);
        for session in &saved.sessions {
            put_str(&mut out, &session.context);
            put_str(&mut out, session.cid.as_str());
            out.extend_from_slice(&session.uid.to_be_bytes());
        }
        let mut changes = sled::Batch::default();
        changes.insert(SESSIONS_KEY, out);
        changes.insert(SESSIONS_BOOT_KEY, saved.boot_id.as_bytes());
        changes.remove(OLD_SESSIONS_KEY);
        self.tree.apply_batch(changes)?;
        self.sync()
    }

    /// The open logins saved last. Logins saved before sessions carried a
    /// uid are not kept: no grant could be checked for them; those saved
    /// before they carried a boot id come with an empty one.
    pub fn saved_sessions(&self) -> Result<SavedSessions, CacheError> {
        let Some(bytes) = self.tree.get(SESSIONS_KEY)? else {
            return Ok(SavedSessions::default());
        };
        let boot_id = match self.tree.get(SESSIONS_BOOT_KEY)? {
            Some(boot) => String::from_utf8_lossy(&boot).into_owned(),
            None => String::new(),
        };
        let mut fields = Reader::new(&bytes);
        let mut sessions = Vec::new();
        while !fields.is_empty() {
            let decoded = (|| {
                Some(SavedSession {
                    context: fields.text()?.to_owned(),
                    cid: Cid::parse(fields.text()?).ok()?,
                    uid: fields.u32()?,
                })
            })();
            sessions.push(decoded.expect("cache: sessions record is corrupt"));
        }
        Ok(SavedSessions { boot_id, sessions })
    }

    /// Keeps a grant durably, replacing an earlier one of the same customer
    /// and scope, and drops grants expired before `now_ms`.
    pub fn save_grant(&self, grant: &GrantInfo, now_ms: u64) -> Result<(), CacheError> {
        self.running()?;
        let mut changes = sled::Batch::default();
        for held in self.grants()? {
            if held.expires_ms.is_some_and(|expires| expires <= now_ms) {
                changes.remove(grant_key(&held));
            }
        }
        changes.insert(grant_key(grant), encode_grant(grant));
        self.tree.apply_batch(changes)?;
        self.sync()
    }

    /// Every grant kept, expired ones included.
    pub fn grants(&self) -> Result<Vec<GrantInfo>, CacheError> {
        let mut grants = Vec::new();
        for entry in self.tree.scan_prefix(GRANT_PREFIX) {
            let (_, record) = entry?;
            grants.push(decode_grant(&record).expect("cache: grant record is corrupt"));
        }
        Ok(grants)
    }

    /// The status table of the last upload, if any.
    pub fn saved_table(&self) -> Result<Option<SavedTable>, CacheError> {
        Ok(self
            .tree
            .get(TABLE_KEY)?
            .map(|bytes| decode_table(&bytes).expect("cache: status table record is corrupt")))
    }
}

/// `g:CID SCOPE`, with the scope without the user's name (a user renamed
/// still has one grant).
fn grant_key(grant: &GrantInfo) -> Vec<u8> {
    let scope = match &grant.scope {
        Scope::User { uid, .. } => format!("uid:{uid}"),
        Scope::Machine => "machine".to_owned(),
    };
    let mut key = GRANT_PREFIX.to_vec();
    key.extend_from_slice(format!("{} {scope}", grant.cid).as_bytes());
    key
}

/// Record: version, created, expires (0: none, 1 + ms), CID, scope.
fn encode_grant(grant: &GrantInfo) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&grant.created_ms.to_be_bytes());
    match grant.expires_ms {
        None => out.push(0),
        Some(expires) => {
            out.push(1);
            out.extend_from_slice(&expires.to_be_bytes());
        }
    }
    put_str(&mut out, grant.cid.as_str());
    put_str(&mut out, &grant.scope.to_string());
    out
}

fn decode_grant(record: &[u8]) -> Option<GrantInfo> {
    let mut fields = Reader::new(record);
    if fields.byte()? != RECORD_VERSION {
        return None;
    }
    let created_ms = fields.u64()?;
    let expires_ms = match fields.byte()? {
        0 => None,
        1 => Some(fields.u64()?),
        _ => return None,
    };
    let grant = GrantInfo {
        cid: Cid::parse(fields.text()?).ok()?,
        scope: fields.text()?.parse().ok()?,
        created_ms,
        expires_ms,
    };
    fields.is_empty().then_some(grant)
}

/// Moves the readings a cache made before the log kept in sled (`r` +
/// seq) into the log, in runs of consecutive numbers, then deletes them
/// from sled with `FIRST_PENDING` set to the first of them; those already
/// in the log (a move a crash interrupted) are not appended twice.
fn move_readings_into(
    log: &ReadingLog,
    tree: &sled::Tree,
    files: &durable::SledDir,
) -> Result<(), CacheError> {
    let Some(first) = tree.scan_prefix([READING_PREFIX]).next() else {
        return Ok(());
    };
    let first_seq = u64_of(&first?.0[1..]);
    let mut run: Vec<Reading> = Vec::new();
    let mut moved = 0u64;
    let flush = |run: &mut Vec<Reading>| -> Result<(), CacheError> {
        log.append(files, run)
            .map_err(|failure| CacheError::from(failure.error))?;
        run.clear();
        Ok(())
    };
    for record in tree.scan_prefix([READING_PREFIX]).values() {
        let reading = checked_decode(&record?);
        if log.next_seq().is_some_and(|next| reading.seq < next) {
            continue;
        }
        let follows = run.last().is_none_or(|last| last.seq + 1 == reading.seq);
        if !follows || run.len() == crate::journal::GROUP_READINGS_MAX {
            flush(&mut run)?;
        }
        run.push(reading);
        moved += 1;
    }
    if !run.is_empty() {
        flush(&mut run)?;
    }
    let mut changes = sled::Batch::default();
    for key in tree.scan_prefix([READING_PREFIX]).keys() {
        changes.remove(key?);
    }
    let first_pending = match tree.get(FIRST_PENDING_KEY)? {
        Some(bytes) => u64_of(&bytes).min(first_seq),
        None => first_seq,
    };
    changes.insert(FIRST_PENDING_KEY, &first_pending.to_be_bytes());
    tree.apply_batch(changes)?;
    files.sync()?;
    tracing::info!(
        moved,
        "moved the cached readings from sled into the readings log"
    );
    Ok(())
}

fn checked_decode(record: &[u8]) -> Reading {
    decode_reading(record).expect("cache: reading record is corrupt")
}

/// Record: version, seq, time, code, ID, payer (0 none, 1 CID, 2 PID), context.
pub(crate) fn encode_reading(reading: &Reading) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&reading.seq.to_be_bytes());
    out.extend_from_slice(&reading.time_ms.to_be_bytes());
    let code = u8::try_from(reading.event.code().as_char()).expect("codes are ASCII");
    out.push(code);
    put_str(&mut out, reading.event.id_str());
    match reading.event.payer() {
        None => out.push(0),
        Some(Payer::Customer(cid)) => {
            out.push(1);
            put_str(&mut out, cid.as_str());
        }
        Some(Payer::OwnerOf(pid)) => {
            out.push(2);
            put_str(&mut out, pid.as_str());
        }
    }
    put_str(&mut out, reading.context.as_str());
    out
}

pub(crate) fn decode_reading(record: &[u8]) -> Option<Reading> {
    let mut fields = Reader::new(record);
    if fields.byte()? != RECORD_VERSION {
        return None;
    }
    let seq = fields.u64()?;
    let time_ms = fields.u64()?;
    let code = Code::from_char(char::from(fields.byte()?))?;
    let id = fields.text()?;
    let payer = match fields.byte()? {
        0 => None,
        1 => Some(Payer::Customer(Cid::parse(fields.text()?).ok()?)),
        2 => Some(Payer::OwnerOf(Pid::parse(fields.text()?).ok()?)),
        _ => return None,
    };
    let context = Context::parse(fields.text()?).ok()?;
    if !fields.is_empty() {
        return None;
    }
    let event = match code {
        Code::Login => Event::Login(Cid::parse(id).ok()?),
        Code::Logout => Event::Logout(Cid::parse(id).ok()?),
        Code::Query => Event::Query {
            pid: Pid::parse(id).ok()?,
            payer,
        },
        Code::Commit => Event::Commit {
            pid: Pid::parse(id).ok()?,
            payer,
        },
    };
    Some(Reading {
        seq,
        time_ms,
        context,
        event,
    })
}

fn encode_batch(batch: &PendingBatch) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    out.extend_from_slice(&batch.first_seq.to_be_bytes());
    out.extend_from_slice(&batch.last_seq.to_be_bytes());
    put_str(&mut out, batch.id.as_str());
    out
}

fn decode_batch(bytes: &[u8]) -> PendingBatch {
    let mut fields = Reader::new(bytes);
    let decoded = (|| {
        let first_seq = fields.u64()?;
        let last_seq = fields.u64()?;
        let id = BatchId::parse(fields.text()?).ok()?;
        (first_seq <= last_seq).then_some(PendingBatch {
            id,
            first_seq,
            last_seq,
        })
    })();
    decoded.expect("cache: pending batch record is corrupt")
}

fn encode_table(table: &SavedTable) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + table.standings.len() * 24);
    out.extend_from_slice(&table.received_ms.to_be_bytes());
    let params = table.params;
    for value in [
        params.flush_readings_max,
        params.flush_interval_s,
        params.status_stale_max_s,
        params.unknown_uses_max,
    ] {
        out.extend_from_slice(&value.to_be_bytes());
    }
    let count = u32::try_from(table.standings.len()).expect("status table fits u32");
    out.extend_from_slice(&count.to_be_bytes());
    for standing in &table.standings {
        out.push(u8::from(standing.allowed));
        put_str(&mut out, standing.party.as_str());
    }
    out
}

fn decode_table(bytes: &[u8]) -> Option<SavedTable> {
    let mut fields = Reader::new(bytes);
    let received_ms = fields.u64()?;
    let params = MeterParams {
        flush_readings_max: fields.u32()?,
        flush_interval_s: fields.u32()?,
        status_stale_max_s: fields.u32()?,
        unknown_uses_max: fields.u32()?,
    };
    let count = fields.u32()?;
    let mut standings = Vec::new();
    for _ in 0..count {
        let allowed = match fields.byte()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let party = Payer::parse(fields.text()?).ok()?;
        standings.push(Standing { party, allowed });
    }
    fields.is_empty().then_some(SavedTable {
        received_ms,
        standings,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_reading(n: u64) -> NewReading {
        NewReading {
            time_ms: 1_000 + n,
            context: Context::parse("42.7").unwrap(),
            event: Event::Commit {
                pid: Pid::parse("B1-P1").unwrap(),
                payer: Some(Payer::Customer(Cid::parse("B1-C1").unwrap())),
            },
        }
    }

    fn params() -> MeterParams {
        MeterParams {
            flush_readings_max: 100,
            flush_interval_s: 60,
            status_stale_max_s: 3600,
            unknown_uses_max: 4,
        }
    }

    #[test]
    fn records_round_trip_and_corruption_is_detected() {
        let reading = Reading {
            seq: 9,
            time_ms: 5,
            context: Context::parse("1.2:t").unwrap(),
            event: Event::Query {
                pid: Pid::parse("B1-P3").unwrap(),
                payer: Some(Payer::OwnerOf(Pid::parse("B1-P2").unwrap())),
            },
        };
        let record = encode_reading(&reading);
        assert_eq!(decode_reading(&record), Some(reading));
        for cut in 0..record.len() {
            assert_eq!(decode_reading(&record[..cut]), None, "truncated at {cut}");
        }
        let mut bad_version = record.clone();
        bad_version[0] = 9;
        assert_eq!(decode_reading(&bad_version), None);
    }

    #[test]
    fn readings_survive_reopen_and_a_pending_batch_keeps_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let instance = {
            let cache = Cache::open(dir.path(), 10).unwrap();
            assert_eq!(cache.append(&[new_reading(1), new_reading(2)]).unwrap(), 1);
            assert_eq!(cache.append(&[new_reading(3)]).unwrap(), 3);
            assert_eq!(cache.pending(), 3);
            let batch = cache.pending_batch(2).unwrap().unwrap();
            assert_eq!((batch.first_seq, batch.last_seq), (1, 2));
            assert_eq!(batch.id.as_str(), format!("{}:1", cache.instance()));
            cache.instance()
        };
        let cache = Cache::open(dir.path(), 10).unwrap();
        assert_ne!(
            cache.instance(),
            instance,
            "a reopen makes a new instance id"
        );
        assert_eq!(cache.instance().len(), 16);
        assert_eq!(cache.pending(), 3);
        assert_eq!(cache.oldest_time_ms().unwrap(), Some(1_001));
        // The same batch, with its id, comes back after a restart, even with
        // a larger limit: a retry is the same batch.
        let batch = cache.pending_batch(100).unwrap().unwrap();
        assert_eq!((batch.first_seq, batch.last_seq), (1, 2));
        assert_eq!(batch.id.as_str(), format!("{instance}:1"));
        let readings = cache.batch_readings(&batch).unwrap();
        assert_eq!(
            readings.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(
            cache.append(&[new_reading(4)]).unwrap(),
            4,
            "numbers never reused"
        );
        let table = SavedTable {
            received_ms: 77,
            standings: vec![Standing {
                party: Payer::Customer(Cid::parse("B1-C1").unwrap()),
                allowed: false,
            }],
            params: params(),
        };
        cache.confirm_batch(&batch, &table).unwrap();
        assert_eq!(cache.pending(), 2);
        assert_eq!(cache.saved_table().unwrap(), Some(table.clone()));
        // Reading 3 was cached before the reopen: it keeps the old id, in a
        // batch of its own; reading 4 goes under the new one.
        let next = cache.pending_batch(100).unwrap().unwrap();
        assert_eq!(
            (next.first_seq, next.last_seq, next.id.to_string()),
            (3, 3, format!("{instance}:3"))
        );
        cache.confirm_batch(&next, &table).unwrap();
        let after = cache.pending_batch(100).unwrap().unwrap();
        assert_eq!(
            (after.first_seq, after.last_seq, after.id.to_string()),
            (4, 4, format!("{}:4", cache.instance()))
        );
        assert_eq!(
            cache.refresh_id(5).to_string(),
            format!("{}:t5", cache.instance())
        );
    }

    #[test]
    fn a_restored_copy_resends_shared_readings_under_their_ids_and_new_ones_under_new_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (original, backup) = (dir.path().join("original"), dir.path().join("backup"));
        {
            let cache = Cache::open(&original, 10).unwrap();
            cache.append(&[new_reading(1), new_reading(2)]).unwrap();
        }
        // A backup of the folder, taken with readings 1 and 2 not yet sent.
        fn copy_tree(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let entry = entry.unwrap();
                let target = to.join(entry.file_name());
                if entry.file_type().unwrap().is_dir() {
                    copy_tree(&entry.path(), &target);
                } else {
                    std::fs::copy(entry.path(), &target).unwrap();
                }
            }
        }
        copy_tree(&original, &backup);
        // The original runs on (a new reading) and later the backup is
        // restored (a new reading of its own): the shared readings go under
        // the same batch id in both, so the backoffice applies them once;
        // the new ones under ids that differ.
        let mut ids = Vec::new();
        for folder in [&original, &backup] {
            let cache = Cache::open(folder, 10).unwrap();
            cache.append(&[new_reading(3)]).unwrap();
            let shared = cache.pending_batch(10).unwrap().unwrap();
            assert_eq!((shared.first_seq, shared.last_seq), (1, 2));
            cache
                .confirm_batch(
                    &shared,
                    &SavedTable {
                        received_ms: 1,
                        standings: Vec::new(),
                        params: params(),
                    },
                )
                .unwrap();
            let own = cache.pending_batch(10).unwrap().unwrap();
            assert_eq!((own.first_seq, own.last_seq), (3, 3));
            ids.push((shared.id, own.id));
        }
        assert_eq!(ids[0].0, ids[1].0, "the shared readings: one batch id");
        assert_ne!(ids[0].1, ids[1].1, "new readings never collide");
    }

    #[test]
    fn a_cache_made_before_instance_ids_per_open_keeps_its_id_for_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path(), 10).unwrap();
            cache.append(&[new_reading(1)]).unwrap();
            // As an older meterd left it: one instance id, kept forever.
            cache.tree.remove(INSTANCES_KEY).unwrap();
            cache
                .tree
                .insert(OLD_INSTANCE_KEY, &0x0123_4567_89ab_cdef_u64.to_be_bytes())
                .unwrap();
            cache.sync().unwrap();
        }
        let cache = Cache::open(dir.path(), 10).unwrap();
        cache.append(&[new_reading(2)]).unwrap();
        let old = cache.pending_batch(10).unwrap().unwrap();
        assert_eq!(old.id.as_str(), "0123456789abcdef:1");
        assert_eq!(old.last_seq, 1);
        assert_ne!(cache.instance(), "0123456789abcdef");
        assert_eq!(cache.tree.get(OLD_INSTANCE_KEY).unwrap(), None);
    }

    #[test]
    fn grants_survive_reopen_and_a_new_one_replaces_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let grant = |cid: &str, scope: Scope, created_ms, expires_ms| GrantInfo {
            cid: Cid::parse(cid).unwrap(),
            scope,
            created_ms,
            expires_ms,
        };
        let bob = |name: &str| Scope::User {
            uid: 1000,
            name: name.into(),
        };
        let first = grant("B1-C4", bob("bob"), 10, None);
        let machine = grant("B1-C4", Scope::Machine, 11, Some(500));
        let short = grant("B1-C5", bob("bob"), 12, Some(100));
        {
            let cache = Cache::open(dir.path(), 10).unwrap();
            assert_eq!(cache.grants().unwrap(), []);
            for grant in [&first, &machine, &short] {
                cache.save_grant(grant, 50).unwrap();
            }
            assert_eq!(cache.grants().unwrap().len(), 3);
        }
        let cache = Cache::open(dir.path(), 10).unwrap();
        assert_eq!(cache.grants().unwrap().len(), 3);
        // The same customer and uid again (the user was renamed): replaced;
        // and the grant that expired at 100 is dropped.
        let again = grant("B1-C4", bob("robert"), 200, Some(9_000));
        cache.save_grant(&again, 200).unwrap();
        let mut held = cache.grants().unwrap();
        held.sort_by_key(|grant| grant.created_ms);
        assert_eq!(held, [machine, again]);
        let record = encode_grant(&held[1]);
        for cut in 0..record.len() {
            assert_eq!(decode_grant(&record[..cut]), None, "truncated at {cut}");
        }
    }

    #[test]
    fn sessions_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = SavedSessions {
            boot_id: "0b5e4c1e-0000-4000-8000-000000000001".to_owned(),
            sessions: vec![SavedSession {
                context: "42.7".to_owned(),
                cid: Cid::parse("B1-C1").unwrap(),
                uid: 1000,
            }],
        };
        Cache::open(dir.path(), 10)
            .unwrap()
            .save_sessions(&sessions)
            .unwrap();
        assert_eq!(
            Cache::open(dir.path(), 10)
                .unwrap()
                .saved_sessions()
                .unwrap(),
            sessions
        );
    }

    fn seqs(cache: &Cache) -> Vec<u64> {
        let Some(batch) = cache.pending_batch(10_000).unwrap() else {
            return Vec::new();
        };
        cache
            .batch_readings(&batch)
            .unwrap()
            .iter()
            .map(|reading| reading.seq)
            .collect()
    }

    #[test]
    fn a_failed_group_sync_stops_the_cache_undoes_the_group_and_never_reuses_its_numbers() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path(), 100).unwrap();
            assert_eq!(cache.append(&[new_reading(1), new_reading(2)]).unwrap(), 1);
            cache.files.fail_next_syncs(1);
            let failed = cache.append(&[new_reading(3), new_reading(4)]).unwrap_err();
            // The undo reached the disk: the callers may be told "not recorded".
            assert!(matches!(failed, CacheError::Stopped(_)), "{failed}");
            assert!(cache.stopped().unwrap().contains("injected"));
            // Nothing more is acknowledged, though the disk works again.
            let refused = cache.append(&[new_reading(5)]).unwrap_err();
            assert!(matches!(refused, CacheError::Stopped(_)), "{refused}");
            assert!(matches!(
                cache.pending_batch(10),
                Err(CacheError::Stopped(_))
            ));
            assert!(matches!(
                cache.save_grant(
                    &GrantInfo {
                        cid: Cid::parse("B1-C1").unwrap(),
                        scope: Scope::User {
                            uid: 1000,
                            name: String::new()
                        },
                        created_ms: 1,
                        expires_ms: None,
                    },
                    2
                ),
                Err(CacheError::Stopped(_))
            ));
        }
        // A restart recovers from what is on disk: the acknowledged readings,
        // not the group that failed, and the next number is past it.
        let cache = Cache::open(dir.path(), 100).unwrap();
        assert_eq!(cache.stopped(), None);
        assert_eq!(seqs(&cache), vec![1, 2]);
        assert_eq!(
            cache.append(&[new_reading(6)]).unwrap(),
            5,
            "3 and 4 are never given again"
        );
    }

    /// The uploader runs while a group's sync is still going: the group's
    /// readings are in the log's file already, but nobody has been told
    /// they are recorded (the sync may yet fail and the group be cut off),
    /// so no batch may take them.
    #[test]
    fn a_batch_never_takes_readings_whose_group_is_not_yet_durable() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 100).unwrap();
        cache.append(&[new_reading(1), new_reading(2)]).unwrap();
        // `append`'s write for a group of 3 and 4, without its sync.
        let group: Vec<Reading> = [3, 4]
            .into_iter()
            .map(|seq| Reading {
                seq,
                time_ms: 1_000 + seq,
                context: Context::parse("42.7").unwrap(),
                event: new_reading(seq).event,
            })
            .collect();
        cache.log.write_unsynced(&group);
        let batch = cache.pending_batch(100).unwrap().unwrap();
        assert_eq!((batch.first_seq, batch.last_seq), (1, 2));
        assert_eq!(
            cache.batch_readings(&batch).unwrap().len(),
            2,
            "only the durable readings"
        );
    }

    /// A cache made before the readings log kept its readings in sled: they
    /// move into the log when it is opened, keep their numbers and batch
    /// ids, and the next reading is numbered after them.
    #[test]
    fn readings_a_cache_kept_in_sled_move_into_the_log_once() {
        let dir = tempfile::tempdir().unwrap();
        let instance = {
            let (db, files) = durable::open(
                dir.path(),
                &durable::Options {
                    cache_bytes: SLED_CACHE_BYTES,
                    lock_wait: std::time::Duration::from_millis(LOCK_WAIT_MS),
                },
            )
            .unwrap();
            let tree = db.open_tree("cache").unwrap();
            let mut old = sled::Batch::default();
            // 3 and 4 were a group whose sync failed: a gap.
            for seq in [1, 2, 5, 6] {
                let new = new_reading(seq);
                let reading = Reading {
                    seq,
                    time_ms: new.time_ms,
                    context: new.context,
                    event: new.event,
                };
                old.insert(&reading_key(seq), encode_reading(&reading));
            }
            old.insert(NEXT_SEQ_KEY, &7u64.to_be_bytes());
            old.insert(OLD_INSTANCE_KEY, &0xabcu64.to_be_bytes());
            tree.apply_batch(old).unwrap();
            files.sync().unwrap();
            "0000000000000abc"
        };
        let cache = Cache::open(dir.path(), 100).unwrap();
        assert_eq!(cache.tree.scan_prefix([READING_PREFIX]).count(), 0);
        assert_eq!(cache.pending(), 6);
        let batch = cache.pending_batch(100).unwrap().unwrap();
        assert_eq!(batch.id.to_string(), format!("{instance}:1"));
        assert_eq!(
            seqs(&cache),
            vec![1, 2, 5, 6],
            "the same readings, the gap kept"
        );
        assert_eq!(cache.append(&[new_reading(7)]).unwrap(), 7);
        drop(cache);
        let cache = Cache::open(dir.path(), 100).unwrap();
        assert_eq!(cache.append(&[new_reading(8)]).unwrap(), 8);
        let batch = cache.pending_batch(100).unwrap().unwrap();
        assert_eq!(
            cache
                .batch_readings(&batch)
                .unwrap()
                .iter()
                .map(|reading| reading.seq)
                .collect::<Vec<_>>(),
            [1, 2, 5, 6],
            "moved once; a batch stops at the instance id of the next open"
        );
    }

    /// A backlog much larger than a segment uploads in order, batch after
    /// batch, each reading once, and the uploaded segments are deleted.
    #[test]
    fn a_long_backlog_uploads_in_order_and_its_segments_go() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 100_000).unwrap();
        for group in 0..50 {
            let readings: Vec<NewReading> =
                (0..200).map(|n| new_reading(group * 200 + n)).collect();
            cache.append(&readings).unwrap();
        }
        let segments = cache.log.segments();
        assert!(segments > 20, "{segments} segments");
        let table = SavedTable {
            received_ms: 1,
            standings: Vec::new(),
            params: params(),
        };
        let mut uploaded = Vec::new();
        while let Some(batch) = cache
            .pending_batch_ending(700, |readings| BatchEnd::Take(readings.len() - 1))
            .unwrap()
        {
            let readings = cache.batch_readings(&batch).unwrap();
            assert_eq!(readings.first().unwrap().seq, batch.first_seq);
            assert_eq!(readings.last().unwrap().seq, batch.last_seq);
            uploaded.extend(readings.iter().map(|reading| reading.seq));
            cache.confirm_batch(&batch, &table).unwrap();
        }
        assert!(
            uploaded == (1..=10_000).collect::<Vec<u64>>(),
            "{} uploaded",
            uploaded.len()
        );
        assert_eq!(cache.pending(), 0);
        assert_eq!(cache.log.segments(), 1, "only the last segment stays");
        drop(cache);
        let cache = Cache::open(dir.path(), 100_000).unwrap();
        assert_eq!(cache.pending(), 0);
        assert_eq!(cache.append(&[new_reading(1)]).unwrap(), 10_001);
    }

    /// A pending batch without readings (a cache written before batches
    /// took only durable readings) is dropped with an error, not retried
    /// forever behind a panic.
    #[test]
    fn a_pending_batch_without_readings_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 100).unwrap();
        cache.append(&[new_reading(1)]).unwrap();
        let empty = PendingBatch {
            id: BatchId::parse("00000000000000ff:7").unwrap(),
            first_seq: 7,
            last_seq: 8,
        };
        cache.tree.insert(BATCH_KEY, encode_batch(&empty)).unwrap();
        let held = cache.pending_batch(100).unwrap().unwrap();
        assert_eq!(held, empty);
        assert!(matches!(
            cache.batch_readings(&held),
            Err(CacheError::EmptyBatch(_))
        ));
        let next = cache.pending_batch(100).unwrap().unwrap();
        assert_eq!((next.first_seq, next.last_seq), (1, 1));
    }

    #[test]
    fn a_group_whose_undo_cannot_be_synced_either_is_in_doubt() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 100).unwrap();
        cache.append(&[new_reading(1)]).unwrap();
        cache.fail_syncs(true);
        let failed = cache.append(&[new_reading(2)]).unwrap_err();
        assert!(matches!(failed, CacheError::InDoubt(_)), "{failed}");
        assert!(matches!(
            cache.append(&[new_reading(3)]),
            Err(CacheError::Stopped(_))
        ));
        drop(cache);
        let cache = Cache::open(dir.path(), 100).unwrap();
        assert_eq!(cache.append(&[new_reading(4)]).unwrap(), 3);
    }

    /// What a power cut would leave of a cache keeping its image in `image`.
    fn after_power_cut(image: &Path, into: &Path) -> Cache {
        durable::copy_image(image, into).unwrap();
        Cache::open(into, 1_000).unwrap()
    }

    /// Every change the cache acknowledged is in what a power cut leaves
    /// right after it (the image holds each file as of its last fsync): a
    /// step that answered before its fsync fails here, where a SIGKILL test
    /// passes (the page cache survives the process).
    #[test]
    fn every_step_the_cache_acknowledged_survives_a_power_cut_right_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (data, image) = (dir.path().join("data"), dir.path().join("image"));
        let cut = dir.path().join("cut");
        let table = SavedTable {
            received_ms: 77,
            standings: Vec::new(),
            params: params(),
        };
        let grant = GrantInfo {
            cid: Cid::parse("B1-C2").unwrap(),
            scope: Scope::User {
                uid: 1000,
                name: String::new(),
            },
            created_ms: 1,
            expires_ms: None,
        };
        let sessions = SavedSessions {
            boot_id: "0b5e4c1e-0000-4000-8000-000000000002".to_owned(),
            sessions: vec![SavedSession {
                context: "42.7".to_owned(),
                cid: Cid::parse("B1-C2").unwrap(),
                uid: 1000,
            }],
        };
        let cache = Cache::open(&data, 1_000).unwrap();
        cache.keep_image_in(&image);
        for n in 0..20 {
            cache
                .append(&[new_reading(2 * n), new_reading(2 * n + 1)])
                .unwrap();
            assert_eq!(after_power_cut(&image, &cut).pending(), 2 * n + 2);
        }
        let confirmed = cache.pending_batch(15).unwrap().unwrap();
        assert_eq!(
            after_power_cut(&image, &cut).pending_batch(100).unwrap(),
            Some(confirmed.clone()),
            "a batch is fixed durably before its first send"
        );
        cache.confirm_batch(&confirmed, &table).unwrap();
        let after = after_power_cut(&image, &cut);
        assert_eq!((after.pending(), seqs(&after)[0]), (25, 16));
        assert_eq!(after.saved_table().unwrap(), Some(table.clone()));
        drop(after);
        let set_aside = cache.pending_batch(5).unwrap().unwrap();
        cache.set_aside_batch(&set_aside).unwrap();
        let after = after_power_cut(&image, &cut);
        assert_eq!((after.pending(), seqs(&after)[0]), (20, 21));
        assert_eq!(after.set_aside().readings, 5);
        drop(after);
        cache
            .save_table(&SavedTable {
                received_ms: 78,
                ..table
            })
            .unwrap();
        assert_eq!(
            after_power_cut(&image, &cut)
                .saved_table()
                .unwrap()
                .unwrap()
                .received_ms,
            78
        );
        cache.save_grant(&grant, 2).unwrap();
        assert_eq!(after_power_cut(&image, &cut).grants().unwrap(), vec![grant]);
        cache.save_sessions(&sessions).unwrap();
        assert_eq!(
            after_power_cut(&image, &cut).saved_sessions().unwrap(),
            sessions
        );
    }

    #[test]
    fn a_full_cache_refuses_and_keeps_what_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 2).unwrap();
        cache.append(&[new_reading(1)]).unwrap();
        assert!(matches!(
            cache.append(&[new_reading(2), new_reading(3)]),
            Err(CacheError::Full { max: 2 })
        ));
        assert_eq!(cache.pending(), 1);
        cache.append(&[new_reading(2)]).unwrap();
        assert_eq!(cache.pending(), 2);
    }

    /// Numbers given to a group that failed, after every real reading was
    /// uploaded, are not counted as waiting after a restart.
    #[test]
    fn numbers_of_a_failed_last_group_do_not_wait_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path(), 100).unwrap();
            cache.append(&[new_reading(1), new_reading(2)]).unwrap();
            let batch = cache.pending_batch(10).unwrap().unwrap();
            let table = SavedTable {
                received_ms: 1,
                standings: Vec::new(),
                params: params(),
            };
            cache.confirm_batch(&batch, &table).unwrap();
            cache.files.fail_next_syncs(1);
            assert!(cache.append(&[new_reading(3), new_reading(4)]).is_err());
        }
        let cache = Cache::open(dir.path(), 100).unwrap();
        assert_eq!(cache.pending(), 0);
        assert_eq!(cache.pending_batch(10).unwrap(), None);
        assert_eq!(cache.append(&[new_reading(5)]).unwrap(), 5);
        assert_eq!(cache.pending(), 1);
        assert_eq!(seqs(&cache), vec![5]);
    }

    /// A data folder whose readings log lost segments (deleted, or not
    /// restored with the rest) refuses to open, rather than number new
    /// readings over those it acknowledged and is sending.
    #[test]
    fn a_cache_whose_log_lost_acknowledged_readings_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path(), 100).unwrap();
            cache
                .append(&[new_reading(1), new_reading(2), new_reading(3)])
                .unwrap();
            cache.pending_batch(2).unwrap().unwrap();
        }
        std::fs::remove_dir_all(dir.path().join(durable::LOGS_DIR)).unwrap();
        let refused = Cache::open(dir.path(), 100).err().expect("refused");
        assert!(
            refused
                .to_string()
                .contains("acknowledged readings are missing"),
            "{refused}"
        );
        // Nor without a batch being sent, right after the first readings.
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path(), 100).unwrap();
            cache.append(&[new_reading(1)]).unwrap();
        }
        std::fs::remove_dir_all(dir.path().join(durable::LOGS_DIR)).unwrap();
        assert!(Cache::open(dir.path(), 100).is_err());
        // Nor after a reopen: the log's end when it was last opened or
        // extended is kept.
        let dir = tempfile::tempdir().unwrap();
        drop(Cache::open(dir.path(), 100).unwrap());
        {
            let cache = Cache::open(dir.path(), 100).unwrap();
            cache.append(&[new_reading(1)]).unwrap();
        }
        drop(Cache::open(dir.path(), 100).unwrap());
        std::fs::remove_dir_all(dir.path().join(durable::LOGS_DIR)).unwrap();
        assert!(Cache::open(dir.path(), 100).is_err());
    }

    #[test]
    fn a_cache_made_again_in_the_same_place_never_reuses_a_batch_id() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let cache = Cache::open(dir.path(), 10).unwrap();
            cache.append(&[new_reading(1)]).unwrap();
            let batch = cache.pending_batch(10).unwrap().unwrap();
            (batch.id, cache.refresh_id(5))
        };
        std::fs::remove_dir_all(dir.path()).unwrap();
        let cache = Cache::open(dir.path(), 10).unwrap();
        cache.append(&[new_reading(1)]).unwrap();
        let batch = cache.pending_batch(10).unwrap().unwrap();
        assert_eq!(batch.first_seq, 1, "sequence numbers start over");
        assert_ne!(batch.id, first.0, "but the batch id is new");
        assert_ne!(cache.refresh_id(5), first.1);
        assert_eq!(cache.instance().len(), 16);
        assert!(batch.id.as_str().len() <= proto::id::TOKEN_LEN_MAX);
    }

    #[test]
    fn a_conflicting_batch_is_set_aside_with_its_readings_and_later_ones_upload() {
        let dir = tempfile::tempdir().unwrap();
        let (first_instance, kept) = {
            let cache = Cache::open(dir.path(), 4).unwrap();
            cache
                .append(&[new_reading(1), new_reading(2), new_reading(3)])
                .unwrap();
            let instance = cache.instance();
            let batch = cache.pending_batch(2).unwrap().unwrap();
            cache.set_aside_batch(&batch).unwrap();
            assert_ne!(cache.instance(), instance, "a new instance id");
            assert_eq!(cache.pending(), 1);
            // Reading 3 was cached before the conflict: it keeps its id
            // (another copy may hold it too); later readings take the new one.
            let next = cache.pending_batch(10).unwrap().unwrap();
            assert_eq!((next.first_seq, next.last_seq), (3, 3));
            assert_eq!(next.id.to_string(), format!("{instance}:3"));
            // Set-aside readings count against the cache's maximum.
            assert!(matches!(
                cache.append(&[new_reading(4), new_reading(5)]),
                Err(CacheError::Full { max: 4 })
            ));
            (instance, cache.instance())
        };
        let cache = Cache::open(dir.path(), 4).unwrap();
        assert_ne!(cache.instance(), kept, "new at every open");
        let set_aside = cache.set_aside();
        assert_eq!((set_aside.batches, set_aside.readings), (1, 2));
        assert_eq!(
            set_aside.latest[0].to_string(),
            format!("{first_instance}:1")
        );
        let readings = cache.set_aside_readings().unwrap();
        assert_eq!(readings.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(readings[0], {
            let new = new_reading(1);
            Reading {
                seq: 1,
                time_ms: new.time_ms,
                context: new.context,
                event: new.event,
            }
        });
        // The batch after it is the one that was pending, not the set-aside one.
        let next = cache.pending_batch(10).unwrap().unwrap();
        assert_eq!((next.first_seq, next.last_seq), (3, 3));
    }
}
