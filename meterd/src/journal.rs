//! Group commit: callers hand readings to one writer thread, which appends
//! everything that has queued up since its last write in one durable step (one
//! fsync), then answers every caller. A reading is acknowledged only after it
//! is durable.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::cache::{Cache, CacheError, NewReading};

/// Most readings written under one fsync.
pub const GROUP_READINGS_MAX: usize = 4096;
/// Most readings waiting for the writer; callers beyond it wait their turn.
pub const QUEUE_READINGS_MAX: usize = 16_384;
/// After a group, the writer looks for the next reading this long before
/// it sleeps: a caller who commits right after its last answer (one
/// client's query and commit take about 100 us here) then finds it awake,
/// saving the 30-50 us a sleeping thread takes to wake on a VM. Under load
/// the next group is usually waiting already; when it is not, the writer
/// yields its core between looks, so that the workers answering the calls
/// that will make the next group run first (on 2 cores, 32 clients: 3.51x
/// the disk's fsync rate against 3.18x spinning, docs/benchmarks.md).
pub const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(200);

/// A group is gathered (see `gather`) when the last one held at least this
/// many readings: only then are enough callers committing at once that
/// fewer, larger groups leave the CPU to them. Four clients or fewer never
/// fill a group this large, so they never wait (waiting only delays them;
/// PostgreSQL's `commit_siblings` is the same idea).
pub const GATHER_AFTER_GROUP: usize = 5;
/// A gathered group is written once a look finds this long has passed
/// since the last one began (an fsync takes 100-150 us here). Each look
/// follows a yield, which on a crowded machine can last a time slice, so
/// this is a target, not a bound. 32 clients on 2 cores: 4.77x the disk's
/// fsync rate against 4.48x gathering after groups of 4, and 3.51x
/// yielding without gathering; 4.23x against 2.78x for the build that
/// spun and did not gather (docs/benchmarks.md).
pub const GATHER_UNTIL: Duration = Duration::from_micros(300);

/// Why a reading was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// The cache is at its maximum.
    #[error("the cache holds its maximum of {max} readings; upload to free space")]
    Full {
        /// The configured maximum.
        max: u64,
    },
    /// The reading could not be made durable.
    #[error("{0}")]
    Storage(String),
    /// The meter is shutting down.
    #[error("the meter is shutting down")]
    Closed,
    /// A sync failed (this group's or an earlier one): nothing was
    /// recorded, and nothing is until a restart.
    #[error("{0}")]
    Stopped(String),
    /// This group's sync failed and could not be undone: the reading may
    /// have been recorded.
    #[error("{0}")]
    InDoubt(String),
}

impl From<&CacheError> for JournalError {
    fn from(error: &CacheError) -> Self {
        match error {
            CacheError::Full { max } => JournalError::Full { max: *max },
            CacheError::Stopped(_) | CacheError::Sync(_) => {
                JournalError::Stopped(error.to_string())
            }
            CacheError::InDoubt(_) => JournalError::InDoubt(error.to_string()),
            other => JournalError::Storage(other.to_string()),
        }
    }
}

type Request = (NewReading, oneshot::Sender<Result<u64, JournalError>>);

/// The handle callers use; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    sender: mpsc::Sender<Request>,
}

/// The writer thread; join it after the last `Journal` is dropped.
pub struct Writer {
    thread: JoinHandle<()>,
}

impl Writer {
    /// Waits until every queued reading has been written or refused.
    pub fn join(self) {
        self.thread.join().expect("journal writer does not panic");
    }
}

/// Starts the writer thread over `cache`.
pub fn start(cache: Arc<Cache>) -> (Journal, Writer) {
    let (sender, receiver) = mpsc::channel(QUEUE_READINGS_MAX);
    let thread = std::thread::Builder::new()
        .name("meterd-journal".into())
        .spawn(move || write_loop(&cache, receiver))
        .expect("spawn journal writer");
    (Journal { sender }, Writer { thread })
}

impl Journal {
    /// Records one reading durably; returns its sequence number.
    pub async fn record(&self, reading: NewReading) -> Result<u64, JournalError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((reading, reply))
            .await
            .map_err(|_| JournalError::Closed)?;
        answer.await.map_err(|_| JournalError::Closed)?
    }
}

fn drain(receiver: &mut mpsc::Receiver<Request>, group: &mut Vec<Request>) {
    while group.len() < GROUP_READINGS_MAX {
        match receiver.try_recv() {
            Ok(request) => group.push(request),
            Err(_) => break,
        }
    }
}

/// The next request: looked for during [`SPIN_BEFORE_SLEEP`], then waited
/// for asleep. `None` once every `Journal` is gone.
fn next_request(receiver: &mut mpsc::Receiver<Request>) -> Option<Request> {
    let started = Instant::now();
    loop {
        match receiver.try_recv() {
            Ok(request) => return Some(request),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) if started.elapsed() < SPIN_BEFORE_SLEEP => {
                std::thread::yield_now();
            }
            Err(mpsc::error::TryRecvError::Empty) => return receiver.blocking_recv(),
        }
    }
}

fn write_loop(cache: &Cache, mut receiver: mpsc::Receiver<Request>) {
    let mut group: Vec<Request> = Vec::with_capacity(GROUP_READINGS_MAX);
    let mut last = (Instant::now(), 0);
    while let Some(first) = next_request(&mut receiver) {
        group.push(first);
        // Those who arrived during the last group's fsync form this one.
        drain(&mut receiver, &mut group);
        if last.1 >= GATHER_AFTER_GROUP {
            gather(&mut receiver, &mut group, last.0 + GATHER_UNTIL);
        }
        last = (Instant::now(), group.len());
        write_group(cache, &mut group);
    }
}

/// Under load, lets the callers already on their way join `group`: yields
/// the core (to the workers parsing their calls) and takes what came, as
/// long as each yield brought someone and `until` has not passed. Returns
/// how many looks it took.
fn gather(
    receiver: &mut mpsc::Receiver<Request>,
    group: &mut Vec<Request>,
    until: Instant,
) -> usize {
    let mut looks = 0;
    loop {
        let before = group.len();
        std::thread::yield_now();
        drain(receiver, group);
        looks += 1;
        if group.len() == before || Instant::now() >= until {
            return looks;
        }
    }
}

/// Writes a group; when the whole group does not fit the cache, writes what
/// fits one by one, so a full cache refuses only the overflow.
fn write_group(cache: &Cache, group: &mut Vec<Request>) {
    let readings: Vec<NewReading> = group.iter().map(|(reading, _)| reading.clone()).collect();
    match cache.append(&readings) {
        Ok(first_seq) => {
            for (offset, (_, reply)) in group.drain(..).enumerate() {
                let _ = reply.send(Ok(first_seq + offset as u64));
            }
        }
        Err(CacheError::Full { .. }) if group.len() > 1 => {
            for (reading, reply) in group.drain(..) {
                let outcome = cache
                    .append(std::slice::from_ref(&reading))
                    .map_err(|error| JournalError::from(&error));
                let _ = reply.send(outcome);
            }
        }
        Err(error) => {
            let error = JournalError::from(&error);
            for (_, reply) in group.drain(..) {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::reading::Event;
    use proto::{Context, Pid};

    fn reading(n: u64) -> NewReading {
        NewReading {
            time_ms: 1_000 + n,
            context: Context::parse("42.7").unwrap(),
            event: Event::Query {
                pid: Pid::parse("B1-P1").unwrap(),
                payer: None,
            },
        }
    }

    /// `count` callers record at once; their answers, in call order.
    async fn record_many(journal: &Journal, count: u64) -> Vec<Result<u64, JournalError>> {
        let calls: Vec<_> = (0..count)
            .map(|n| {
                let journal = journal.clone();
                tokio::spawn(async move { journal.record(reading(n)).await })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        answers
    }

    fn request(n: u64) -> Request {
        (reading(n), oneshot::channel().0)
    }

    /// Gathering stops once a look brings nobody, takes what keeps coming,
    /// and past its deadline looks only once however fast callers come.
    #[test]
    fn gathering_stops_when_nobody_comes_and_at_its_deadline() {
        let (sender, mut receiver) = mpsc::channel(QUEUE_READINGS_MAX);
        let mut group = vec![request(0)];
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(gather(&mut receiver, &mut group, far), 1);
        assert_eq!(group.len(), 1);

        // A caller that never stops.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut n = 1;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if sender.try_send(request(n)).is_ok() {
                        n += 1;
                    } else {
                        std::thread::yield_now();
                    }
                }
            })
        };
        while receiver.is_empty() {
            std::thread::yield_now();
        }
        let passed = Instant::now();
        let past_deadline = gather(&mut receiver, &mut group, passed);
        let taken = group.len();
        group.truncate(1);
        let until_full = gather(&mut receiver, &mut group, far);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flood.join().unwrap();
        assert_eq!(past_deadline, 1, "looked again past the deadline");
        assert!(taken > 1, "nothing gathered");
        assert!(until_full >= 1 && group.len() <= GROUP_READINGS_MAX);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_each_get_their_own_number_and_all_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(dir.path(), 10_000).unwrap());
        let (journal, writer) = start(Arc::clone(&cache));
        let mut seqs: Vec<u64> = record_many(&journal, 500)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=500).collect::<Vec<_>>());
        drop(journal);
        writer.join();
        drop(cache);
        assert_eq!(Cache::open(dir.path(), 10_000).unwrap().pending(), 500);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_cache_refuses_only_what_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(dir.path(), 30).unwrap());
        let (journal, _writer) = start(Arc::clone(&cache));
        let answers = record_many(&journal, 50).await;
        let recorded = answers.iter().filter(|answer| answer.is_ok()).count();
        let refused = answers
            .iter()
            .filter(|answer| matches!(answer, Err(JournalError::Full { max: 30 })))
            .count();
        assert_eq!((recorded, refused), (30, 20), "{answers:?}");
        assert_eq!(cache.pending(), 30);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failed_sync_no_caller_is_told_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(dir.path(), 10_000).unwrap());
        let (journal, _writer) = start(Arc::clone(&cache));
        assert_eq!(journal.record(reading(0)).await, Ok(1));
        cache.fail_syncs(true);
        for answer in record_many(&journal, 40).await {
            assert!(
                matches!(
                    answer,
                    Err(JournalError::Stopped(_) | JournalError::InDoubt(_))
                ),
                "{answer:?}"
            );
        }
        cache.fail_syncs(false);
        let later = journal.record(reading(99)).await;
        assert!(matches!(later, Err(JournalError::Stopped(_))), "{later:?}");
        assert!(cache.stopped().is_some());
    }
}
