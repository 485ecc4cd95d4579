//! A sled (0.34.7) data folder, opened the way both stores of record open
//! it, and made durable the way sled does not do by itself.
//!
//! sled's `flush` writes its log with `sync_file_range`, which does not
//! survive a power cut, so every flush that acknowledges something is
//! followed by an fsync of the log file (`db`). That is not all: sled writes
//! every log message larger than a quarter of a segment (128 KiB by default:
//! a big value, or a leaf node of up to 16 values that together exceed it)
//! to a file of its own under `blobs/`, with `write_all` and no fsync, and
//! never fsyncs that folder (read in `pagecache/blob_io.rs`). The log then
//! points at a blob that a power cut can take away. So [`SledDir::sync`]
//! fsyncs every blob file it has not synced before, and the `blobs` folder
//! when it holds new files, before it fsyncs the log.
//!
//! **Fail-stop.** After a failed fsync the kernel may have dropped the
//! pages it could not write and mark them clean: a later fsync can succeed
//! without them. So the first failure is kept and every later `sync` fails
//! with it, until the folder is opened again (a restart recovers from what
//! is on disk).
//!
//! **Power-cut image, for tests.** [`SledDir::keep_image_in`] makes every
//! fsync also copy the file it made durable into another folder: at any
//! moment that folder holds what a power cut would leave (every file as of
//! its last fsync; nothing written after). A test opens the image as the
//! data folder and checks that everything acknowledged is there. A store
//! that forgets to sync before it acknowledges fails such a test, which a
//! SIGKILL test cannot show (the page cache survives the process).
//!
//! **Random fsync failures, for soak runs.** Only with the cargo feature
//! `fault-injection` compiled in (off by default; without it the code does
//! not exist), [`open`] reads `DURABLE_FAIL_SYNC_PERMILLE=N` (0 to 1000) and
//! `DURABLE_FAIL_SYNC_SEED=S` (default 0) and makes each later fsync fail
//! with probability N/1000, drawn from the seed and a counter of fsyncs (the
//! same seed fails the same fsyncs of a process). The fsyncs of `open`
//! itself never fail this way, so a restart always comes up. Each injected
//! failure is reported on stderr as a line starting with
//! `durable: injected fsync failure`.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// sled's log file in its folder.
const LOG_FILE: &str = "db";
/// sled's configuration file, written once when the folder is made.
const CONF_FILE: &str = "conf";
/// The folder where sled writes messages too big for its log.
const BLOBS_DIR: &str = "blobs";
/// The folder for files a store keeps beside sled's (append-only logs),
/// made durable through [`SledDir::sync_file`] and [`SledDir::sync_logs_dir`]
/// so that they share the folder's fail-stop, fault injection and
/// power-cut image.
pub const LOGS_DIR: &str = "logs";

/// Why a folder could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process (or a store of this one closed a moment ago and still
    /// held by sled's threads) holds the folder's lock.
    #[error("another process is already using {0}")]
    Locked(String),
    /// sled failed.
    #[error("storage failed: {0}")]
    Storage(#[from] sled::Error),
    /// The folder or its files could not be made or synced.
    #[error("could not open the data folder: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a sync failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SyncError {
    /// This sync failed.
    #[error("could not make the data durable: {0}")]
    Failed(String),
    /// An earlier sync failed: nothing is durable any more until the folder
    /// is opened again.
    #[error("an earlier fsync failed ({0}); nothing more is made durable until a restart")]
    Stopped(String),
}

/// How sled is configured for both stores of record.
pub struct Options {
    /// Bytes of memory sled may use for its page cache.
    pub cache_bytes: u64,
    /// How long opening waits for another holder of the folder's lock.
    pub lock_wait: Duration,
}

/// A sled folder's files, synced after every flush that acknowledges.
pub struct SledDir {
    db: sled::Db,
    dir: PathBuf,
    log: File,
    /// Blob files already made durable (sled never rewrites one).
    blobs_synced: Mutex<HashSet<OsString>>,
    /// The first failed sync, kept: every later sync fails with it. Held
    /// only to read or set it, never across an fsync: every meter call
    /// asks for it (`failure`), and must not wait for the disk.
    failed: Mutex<Option<String>>,
    /// Taken for the whole of each sync, so that syncs run one at a time
    /// and none starts before an earlier one's failure is kept.
    syncing: Mutex<()>,
    /// How many of the next fsyncs fail, as a failing disk's would (tests,
    /// fault runs); `u64::MAX`: all of them.
    failing: AtomicU64,
    /// Where the power-cut image is kept, if a test asked for one.
    image: Mutex<Option<PathBuf>>,
    /// Random fsync failures asked for in the environment (soak runs).
    #[cfg(feature = "fault-injection")]
    random: Option<injection::RandomFailures>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes `dir` (and any missing parent) readable by its owner only (0700),
/// whatever the umask; an existing `dir` loses any group and other access.
/// For folders that hold secrets: a store of record holds meter secrets,
/// password hashes and payment details.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` readable by its owner only (0600), whole or
/// not at all: a temporary file beside it, synced, renamed over it, and the
/// folder synced.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut fresh = path.as_os_str().to_owned();
    fresh.push(".new");
    let fresh = std::path::PathBuf::from(fresh);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&fresh)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&fresh, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Opens (or makes, owner-only: `private_dir`) the sled folder `dir`: the
/// database and its files.
pub fn open(dir: &Path, options: &Options) -> Result<(sled::Db, SledDir), OpenError> {
    private_dir(dir)?;
    let config = sled::Config::new()
        .path(dir)
        // Bounds memory; the rest stays on disk.
        .cache_capacity(options.cache_bytes)
        // Throughput mode: writes are grouped by the stores' own commits.
        .mode(sled::Mode::HighThroughput)
        // The stores flush (and fsync) explicitly; no timer.
        .flush_every_ms(None)
        .use_compression(false);
    let started = Instant::now();
    let db = loop {
        match config.open() {
            // sled 0.34.7 (pinned) reports its file lock this way.
            Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                if started.elapsed() >= options.lock_wait {
                    return Err(OpenError::Locked(dir.display().to_string()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other?,
        }
    };
    let log = File::open(dir.join(LOG_FILE))?;
    // The files sled made when the folder was new, and their names.
    File::open(dir.join(CONF_FILE))?.sync_all()?;
    sync_folder(dir)?;
    let files = SledDir {
        db: db.clone(),
        dir: dir.to_owned(),
        log,
        blobs_synced: Mutex::default(),
        failed: Mutex::default(),
        syncing: Mutex::default(),
        failing: AtomicU64::new(0),
        image: Mutex::default(),
        #[cfg(feature = "fault-injection")]
        random: None,
    };
    files.sync_blobs()?;
    #[cfg(feature = "fault-injection")]
    let files = SledDir {
        random: injection::RandomFailures::from_env(dir)?,
        ..files
    };
    Ok((db, files))
}

/// Copies a power-cut image (see [`SledDir::keep_image_in`]) into `into`,
/// emptied first, to be opened there: opening writes to the folder, and the
/// image must go on as it was.
pub fn copy_image(image: &Path, into: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(into) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    std::fs::create_dir_all(into.join(BLOBS_DIR))?;
    for name in [CONF_FILE, LOG_FILE] {
        std::fs::copy(image.join(name), into.join(name))?;
    }
    for entry in std::fs::read_dir(image.join(BLOBS_DIR))? {
        let name = entry?.file_name();
        std::fs::copy(
            image.join(BLOBS_DIR).join(&name),
            into.join(BLOBS_DIR).join(&name),
        )?;
    }
    if image.join(LOGS_DIR).is_dir() {
        std::fs::create_dir_all(into.join(LOGS_DIR))?;
        for entry in std::fs::read_dir(image.join(LOGS_DIR))? {
            let name = entry?.file_name();
            std::fs::copy(
                image.join(LOGS_DIR).join(&name),
                into.join(LOGS_DIR).join(&name),
            )?;
        }
    }
    Ok(())
}

/// Copies the sled folder `from` (no process may be using it) into `into`,
/// which must not exist, made owner-only: every file and subfolder, each
/// file fsynced and then every folder, so that once this returns the copy
/// survives a power cut. Answers the bytes copied. Anything but files and
/// folders (a link, a device) is refused: a sled folder holds none.
pub fn copy_folder(from: &Path, into: &Path) -> std::io::Result<u64> {
    std::fs::create_dir(into)?;
    private_dir(into)?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = into.join(entry.file_name());
        if kind.is_dir() {
            bytes += copy_folder(&entry.path(), &target)?;
        } else if kind.is_file() {
            bytes += std::fs::copy(entry.path(), &target)?;
            File::open(&target)?.sync_all()?;
        } else {
            return Err(std::io::Error::other(format!(
                "{} is neither a file nor a folder",
                entry.path().display()
            )));
        }
    }
    sync_folder(into)?;
    Ok(bytes)
}

fn sync_folder(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The disk's own `fdatasync` rate in `dir`: how many times per second a
/// small write to a new file there can be made durable, one after another,
/// for `time` (at least one). The limit a durable store's commits are
/// compared with, measured in the same run by the benchmarks.
pub fn fdatasync_rate(dir: &Path, time: Duration) -> std::io::Result<f64> {
    use std::io::Write as _;
    let path = dir.join(".fdatasync-probe");
    let mut file = File::create(&path)?;
    let started = Instant::now();
    let mut count = 0u64;
    let outcome = loop {
        if let Err(error) = file
            .write_all(b"0123456789abcdef")
            .and_then(|()| file.sync_data())
        {
            break Err(error);
        }
        count += 1;
        if started.elapsed() >= time {
            break Ok(count as f64 / started.elapsed().as_secs_f64());
        }
    };
    drop(file);
    let _ = std::fs::remove_file(&path);
    outcome
}

impl SledDir {
    /// Makes everything written to the database before this call durable:
    /// sled's flush, then every new blob file and the folder that names it,
    /// then the log. Once one fails, every later call fails.
    pub fn sync(&self) -> Result<(), SyncError> {
        let _turn = self.turn()?;
        self.write_through().map_err(|reason| self.stop(reason))
    }

    /// This sync's turn, once no sync has failed.
    fn turn(&self) -> Result<MutexGuard<'_, ()>, SyncError> {
        let turn = lock(&self.syncing);
        match self.failure() {
            Some(first) => Err(SyncError::Stopped(first)),
            None => Ok(turn),
        }
    }

    /// Keeps `reason` as the first failure (called holding the turn).
    fn stop(&self, reason: String) -> SyncError {
        lock(&self.failed).get_or_insert_with(|| reason.clone());
        SyncError::Failed(reason)
    }

    /// The database these files hold.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The first failed sync since the folder was opened, if any.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failed).clone()
    }

    /// From now on every fsync fails (or works again), as a failing disk
    /// would. A sync that failed stays failed (see [`SledDir::sync`]).
    pub fn fail_syncs(&self, fail: bool) {
        self.failing
            .store(if fail { u64::MAX } else { 0 }, Ordering::SeqCst);
    }

    /// The next `count` fsyncs fail, then they work again.
    pub fn fail_next_syncs(&self, count: u64) {
        self.failing.store(count, Ordering::SeqCst);
    }

    /// Whether this fsync is one that should fail (counting it).
    fn injected_failure(&self) -> std::io::Result<()> {
        let failing = self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
                0 | u64::MAX => None,
                left => Some(left - 1),
            });
        match failing {
            Err(0) => {}
            _ => return Err(std::io::Error::other("injected fsync failure")),
        }
        #[cfg(feature = "fault-injection")]
        if let Some(random) = &self.random {
            random.check()?;
        }
        Ok(())
    }

    /// After a failed sync, one more attempt to make what was written since
    /// durable (a store undoing what it could not acknowledge). The failure
    /// stays: every later `sync` still fails. A success here is no proof that
    /// what the failed sync held reached the disk, only that what came after
    /// did, in log order.
    pub fn sync_after_failure(&self) -> Result<(), String> {
        let _turn = lock(&self.syncing);
        self.write_through().inspect_err(|reason| {
            lock(&self.failed).get_or_insert_with(|| reason.clone());
        })
    }

    /// The folder for the store's own files (`LOGS_DIR`), made (owner-only)
    /// and named durably in the data folder the first time.
    pub fn logs_dir(&self) -> std::io::Result<PathBuf> {
        let logs = self.dir.join(LOGS_DIR);
        if !logs.is_dir() {
            private_dir(&logs)?;
            sync_folder(&self.dir)?;
        }
        Ok(logs)
    }

    /// Makes what was written to `file` (at `path`, in `logs_dir`) durable,
    /// as `sync` does sled's files: refused once a sync has failed, and
    /// its own failure stops the folder.
    pub fn sync_file(&self, file: &File, path: &Path) -> Result<(), SyncError> {
        let _turn = self.turn()?;
        self.fsync(file, path)
            .map_err(|error| self.stop(error.to_string()))
    }

    /// One more fsync of `file` after a failed sync (a store undoing what
    /// it could not acknowledge), as `sync_after_failure`.
    pub fn sync_file_after_failure(&self, file: &File, path: &Path) -> Result<(), String> {
        let _turn = lock(&self.syncing);
        self.fsync(file, path).map_err(|error| {
            let reason = error.to_string();
            lock(&self.failed).get_or_insert_with(|| reason.clone());
            reason
        })
    }

    /// Makes the names in `logs_dir` durable after a file was made or
    /// removed there. With an image kept, the image's folder then names
    /// the same files: a new one empty until its first `sync_file`.
    pub fn sync_logs_dir(&self) -> Result<(), SyncError> {
        let _turn = self.turn()?;
        let logs = self.dir.join(LOGS_DIR);
        let synced = || -> std::io::Result<()> {
            self.injected_failure()?;
            sync_folder(&logs)?;
            if let Some(image) = lock(&self.image).as_ref() {
                let mirror = image.join(LOGS_DIR);
                std::fs::create_dir_all(&mirror)?;
                let mut named = HashSet::new();
                for entry in std::fs::read_dir(&logs)? {
                    let name = entry?.file_name();
                    if !mirror.join(&name).exists() {
                        File::create(mirror.join(&name))?;
                    }
                    named.insert(name);
                }
                for entry in std::fs::read_dir(&mirror)? {
                    let name = entry?.file_name();
                    if !named.contains(&name) {
                        std::fs::remove_file(mirror.join(&name))?;
                    }
                }
            }
            Ok(())
        };
        synced().map_err(|error| self.stop(error.to_string()))
    }

    /// sled's flush, the new blob files, the log.
    fn write_through(&self) -> Result<(), String> {
        self.db
            .flush()
            .map_err(|error| error.to_string())
            .and_then(|_| self.sync_blobs().map_err(|error| error.to_string()))
            .and_then(|()| {
                self.fsync(&self.log, &self.dir.join(LOG_FILE))
                    .map_err(|error| error.to_string())
            })
    }

    /// Keeps a power-cut image in `image` from now on: the folder's files
    /// as they are now (after a sync), then every file again each time it
    /// is fsynced. Opening `image` as a data folder is what a power cut at
    /// that moment would leave.
    pub fn keep_image_in(&self, image: &Path) -> Result<(), SyncError> {
        self.sync()?;
        let copy = || -> std::io::Result<()> {
            std::fs::create_dir_all(image.join(BLOBS_DIR))?;
            std::fs::copy(self.dir.join(CONF_FILE), image.join(CONF_FILE))?;
            std::fs::copy(self.dir.join(LOG_FILE), image.join(LOG_FILE))?;
            for name in lock(&self.blobs_synced).iter() {
                let from = self.dir.join(BLOBS_DIR).join(name);
                std::fs::copy(from, image.join(BLOBS_DIR).join(name))?;
            }
            let logs = self.dir.join(LOGS_DIR);
            if logs.is_dir() {
                std::fs::create_dir_all(image.join(LOGS_DIR))?;
                for entry in std::fs::read_dir(&logs)? {
                    let name = entry?.file_name();
                    std::fs::copy(logs.join(&name), image.join(LOGS_DIR).join(&name))?;
                }
            }
            Ok(())
        };
        copy().map_err(|error| SyncError::Failed(error.to_string()))?;
        *lock(&self.image) = Some(image.to_owned());
        Ok(())
    }

    /// fsyncs `file` (at `path`); with an image kept, copies the file as it
    /// now is into the image.
    fn fsync(&self, file: &File, path: &Path) -> std::io::Result<()> {
        self.injected_failure()?;
        file.sync_data()?;
        if let Some(image) = lock(&self.image).as_ref() {
            let relative = path.strip_prefix(&self.dir).expect("files of this folder");
            std::fs::copy(path, image.join(relative))?;
        }
        Ok(())
    }

    /// fsyncs the blob files sled wrote since the last call, then the
    /// folder that names them.
    fn sync_blobs(&self) -> std::io::Result<()> {
        let folder = self.dir.join(BLOBS_DIR);
        let mut synced = lock(&self.blobs_synced);
        let mut present = HashSet::new();
        let mut added = false;
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let name = entry?.file_name();
            if !synced.contains(&name) {
                let path = folder.join(&name);
                match File::open(&path) {
                    Ok(file) => self.fsync(&file, &path)?,
                    // Collected by sled meanwhile: nothing to keep.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(error),
                }
                added = true;
            }
            present.insert(name);
        }
        if added {
            self.injected_failure()?;
            sync_folder(&folder)?;
        }
        // Forget blobs sled has collected: the set stays as small as the folder.
        *synced = present;
        Ok(())
    }
}

/// Random fsync failures from the environment: only in builds with the
/// `fault-injection` feature.
#[cfg(feature = "fault-injection")]
mod injection {
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Each fsync fails with probability N/1000 (0 to 1000).
    pub const PERMILLE_VAR: &str = "DURABLE_FAIL_SYNC_PERMILLE";
    /// The seed the failures are drawn from (default 0).
    pub const SEED_VAR: &str = "DURABLE_FAIL_SYNC_SEED";

    /// Fails each fsync with probability `permille`/1000, deterministically
    /// from `seed` and the number of fsyncs asked so far.
    pub struct RandomFailures {
        permille: u64,
        seed: u64,
        count: AtomicU64,
        dir: String,
    }

    /// SplitMix64's output function: a well-mixed 64-bit value per input.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn invalid(message: String) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
    }

    impl RandomFailures {
        pub fn new(permille: u64, seed: u64, dir: &Path) -> RandomFailures {
            RandomFailures {
                permille,
                seed,
                count: AtomicU64::new(0),
                dir: dir.display().to_string(),
            }
        }

        /// The failures the environment asks for, if any; a value that is
        /// not a number in range is an error, never ignored.
        pub fn from_env(dir: &Path) -> std::io::Result<Option<RandomFailures>> {
            let read = |name: &str| -> std::io::Result<Option<u64>> {
                match std::env::var(name) {
                    Err(std::env::VarError::NotPresent) => Ok(None),
                    Err(std::env::VarError::NotUnicode(_)) => {
                        Err(invalid(format!("{name} is not a number")))
                    }
                    Ok(text) => text
                        .trim()
                        .parse()
                        .map(Some)
                        .map_err(|_| invalid(format!("{name}={text:?} is not a number"))),
                }
            };
            let Some(permille) = read(PERMILLE_VAR)? else {
                return Ok(None);
            };
            if permille > 1000 {
                return Err(invalid(format!(
                    "{PERMILLE_VAR}={permille} is above 1000 (per mille)"
                )));
            }
            let seed = read(SEED_VAR)?.unwrap_or(0);
            eprintln!(
                "durable: fault injection on for {}: each fsync fails with probability {permille}/1000 (seed {seed})",
                dir.display()
            );
            Ok((permille > 0).then(|| RandomFailures::new(permille, seed, dir)))
        }

        /// Counts one fsync; an error when this one is to fail.
        pub fn check(&self) -> std::io::Result<()> {
            let number = self.count.fetch_add(1, Ordering::Relaxed);
            let draw = mix(self.seed ^ mix(number.wrapping_add(0x9e37_79b9_7f4a_7c15)));
            if draw % 1000 < self.permille {
                eprintln!(
                    "durable: injected fsync failure (fsync {number} of {}, seed {})",
                    self.dir, self.seed
                );
                return Err(std::io::Error::other("injected fsync failure (random)"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(dir: &Path) -> (sled::Db, SledDir) {
        open(
            dir,
            &Options {
                cache_bytes: 1 << 20,
                lock_wait: Duration::from_secs(2),
            },
        )
        .unwrap()
    }

    /// The one more sync a store tries after a failure (to undo what it
    /// could not acknowledge) keeps its own failure too, if there was none.
    #[test]
    fn a_failed_sync_after_a_failure_is_kept_as_the_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, files) = opened(dir.path());
        files.fail_syncs(true);
        assert!(files.sync_after_failure().is_err());
        assert!(files.failure().unwrap().contains("injected"));
        assert!(matches!(files.sync(), Err(SyncError::Stopped(_))));
        let dir = tempfile::tempdir().unwrap();
        let (_db, files) = opened(dir.path());
        let logs = files.logs_dir().unwrap();
        let path = logs.join("a.log");
        let file = File::create(&path).unwrap();
        files.fail_syncs(true);
        assert!(files.sync_file_after_failure(&file, &path).is_err());
        assert!(matches!(
            files.sync_file(&file, &path),
            Err(SyncError::Stopped(_))
        ));
    }

    /// Every meter call asks whether a sync failed; while a sync waits for
    /// the disk the answer must not wait with it (it did: the failure was
    /// kept under the lock held across each fsync, and 32 clients ran at
    /// one fsync's pace).
    #[test]
    fn asking_for_a_failure_never_waits_for_a_sync_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, files) = opened(dir.path());
        let in_progress = lock(&files.syncing);
        let (asked, answer) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| asked.send(files.failure()).unwrap());
            let answered = answer.recv_timeout(Duration::from_secs(5));
            drop(in_progress);
            assert_eq!(answered, Ok(None), "failure() waited for the sync");
        });
        // Syncs still take turns, and a failure stops the ones after it.
        files.fail_next_syncs(1);
        assert!(matches!(files.sync(), Err(SyncError::Failed(_))));
        assert!(matches!(files.sync(), Err(SyncError::Stopped(_))));
        assert!(files.failure().unwrap().contains("injected"));
    }

    #[test]
    fn the_fdatasync_rate_is_measured_in_the_folder_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let rate = fdatasync_rate(dir.path(), Duration::from_millis(50)).unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let missing = dir.path().join("missing");
        assert!(fdatasync_rate(&missing, Duration::from_millis(1)).is_err());
    }

    fn options() -> Options {
        Options {
            cache_bytes: 1 << 20,
            lock_wait: Duration::from_millis(2_000),
        }
    }

    /// A value far above sled's blob threshold, different for each `seed`.
    fn big_value(seed: u8) -> Vec<u8> {
        (0..300_000u32)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn what_was_synced_survives_a_power_cut_and_what_was_not_is_gone() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path().join("data");
        let image = folder.path().join("image");
        {
            let (db, files) = open(&data, &options()).unwrap();
            files.keep_image_in(&image).unwrap();
            db.insert(b"small", b"kept".as_slice()).unwrap();
            db.insert(b"big", big_value(1)).unwrap();
            files.sync().unwrap();
            assert!(
                std::fs::read_dir(data.join(BLOBS_DIR)).unwrap().count() > 0,
                "a 300 KB value goes to a blob file (else this test shows nothing)"
            );
            // Written, flushed, never fsynced: a power cut loses it.
            db.insert(b"late", b"lost".as_slice()).unwrap();
            db.flush().unwrap();
        }
        let (db, _files) = open(&image, &options()).unwrap();
        assert_eq!(db.get(b"small").unwrap().unwrap().as_ref(), b"kept");
        assert_eq!(db.get(b"big").unwrap().unwrap().as_ref(), big_value(1));
        assert_eq!(db.get(b"late").unwrap(), None);
    }

    #[test]
    fn a_failed_sync_fails_every_later_sync_until_reopened() {
        let folder = tempfile::tempdir().unwrap();
        {
            let (db, files) = open(folder.path(), &options()).unwrap();
            db.insert(b"a", b"1".as_slice()).unwrap();
            files.fail_syncs(true);
            assert!(matches!(files.sync(), Err(SyncError::Failed(_))));
            files.fail_syncs(false);
            db.insert(b"b", b"2".as_slice()).unwrap();
            let later = files.sync().unwrap_err();
            assert!(matches!(later, SyncError::Stopped(_)), "{later}");
            assert!(later.to_string().contains("injected"), "{later}");
            assert!(files.failure().is_some());
        }
        let (db, files) = open(folder.path(), &options()).unwrap();
        assert_eq!(files.failure(), None);
        db.insert(b"c", b"3".as_slice()).unwrap();
        files.sync().unwrap();
    }

    #[test]
    fn a_store_folder_is_its_owners_only_new_or_not() {
        use std::os::unix::fs::PermissionsExt;
        let folder = tempfile::tempdir().unwrap();
        let mode = |dir: &Path| std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        let new = folder.path().join("new/store");
        drop(open(&new, &options()).unwrap());
        assert_eq!(mode(&new), 0o700);
        assert_eq!(mode(&folder.path().join("new")), 0o700, "a parent made too");
        let old = folder.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        drop(open(&old, &options()).unwrap());
        assert_eq!(mode(&old), 0o700);
    }

    #[test]
    fn a_held_folder_is_reported_as_locked() {
        let folder = tempfile::tempdir().unwrap();
        let _held = open(folder.path(), &options()).unwrap();
        let quick = Options {
            lock_wait: Duration::from_millis(50),
            ..options()
        };
        assert!(matches!(
            open(folder.path(), &quick),
            Err(OpenError::Locked(_))
        ));
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn random_failures_follow_the_seed_and_the_rate() {
        let dir = Path::new("unused");
        let draws = |permille, seed| {
            let random = injection::RandomFailures::new(permille, seed, dir);
            (0..10_000)
                .map(|_| random.check().is_err())
                .collect::<Vec<bool>>()
        };
        let first = draws(50, 7);
        assert_eq!(first, draws(50, 7), "the same seed fails the same fsyncs");
        assert_ne!(first, draws(50, 8), "another seed, other fsyncs");
        let failed = first.iter().filter(|failed| **failed).count();
        assert!((350..650).contains(&failed), "about 5%: {failed}");
        assert!(draws(0, 7).iter().all(|failed| !failed));
        assert!(draws(1000, 7).iter().all(|failed| *failed));
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn a_random_failure_stops_the_folder_like_any_other() {
        let folder = tempfile::tempdir().unwrap();
        let (db, files) = open(folder.path(), &options()).unwrap();
        let files = SledDir {
            random: Some(injection::RandomFailures::new(1000, 1, folder.path())),
            ..files
        };
        db.insert(b"a", b"1".as_slice()).unwrap();
        let failed = files.sync().unwrap_err();
        assert!(failed.to_string().contains("injected"), "{failed}");
        assert!(matches!(files.sync(), Err(SyncError::Stopped(_))));
    }
}
