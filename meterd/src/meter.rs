//! The meter's calls: who pays, whether a use may begin, and recording uses.
//! Transport-free: the server hands in a decoded call and who made it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::meter_api::MeterCall;
use proto::reading::Event;
use proto::xmlrpc::Value;
use proto::{Cid, Context, Fault, FaultCode, Pid};
use tokio::sync::{Notify, watch};

use crate::cache::{Cache, NewReading};
use crate::context::{Caller, ContextError, ContextKey, ContextLimits, Contexts, ProcessId};
use crate::journal::{Journal, JournalError};
use crate::standing::StatusTable;

/// How long `flush()` waits for an upload before answering false.
pub const FLUSH_WAIT_MS: u64 = 30_000;

/// The context name that means "my parent process".
pub const PARENT_CONTEXT: &str = "..";

/// The outcome of the latest upload attempt, for `status()` and `flush()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// Counts attempts.
    pub attempt: u64,
    /// The last `flush()` ticket issued before this attempt began: every
    /// flush with a ticket up to this one is answered by this report.
    pub flushes_served: u64,
    /// When the last upload succeeded, ms since the Unix epoch.
    pub last_success_ms: Option<u64>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
}

/// How the meter and its uploader signal each other.
#[derive(Debug)]
pub struct UploadSignals {
    /// Wakes the uploader (a flush, a full cache, an unconfirmed payer).
    pub wake: Notify,
    /// The uploader's latest report.
    pub report: watch::Sender<UploadReport>,
    /// Tickets handed to `flush()` callers, so that each waits for an upload
    /// that began after it asked, not one already in flight.
    pub flush_tickets: std::sync::atomic::AtomicU64,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The calling process and those of its ancestors that run as the same
    /// user, nearest first; empty when the transport gave no process
    /// credentials.
    pub lineage: Vec<ProcessId>,
    /// The lineage stopped at an ancestor that runs as another user.
    pub parent_is_other_user: bool,
    /// The caller's uid, from the socket's peer credentials.
    pub uid: Option<u32>,
    /// The connection's number, the context of callers without credentials.
    pub connection: u64,
}

/// The meter's state, shared by every connection.
pub struct Meter {
    contexts: Mutex<Contexts>,
    /// Serializes saving sessions, so an older list never overwrites a newer.
    sessions_saved: tokio::sync::Mutex<()>,
    table: Arc<Mutex<StatusTable>>,
    journal: Journal,
    cache: Arc<Cache>,
    signals: Arc<UploadSignals>,
    uploads_configured: bool,
    /// Where `/proc` is, for telling live processes from exited ones.
    pub proc_root: PathBuf,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug that already failed a call; the
    // data it guards stays consistent because every change is one operation.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn context_fault(error: ContextError) -> Fault {
    let code = match error {
        ContextError::ContextsFull { .. } => FaultCode::ContextsFull,
        ContextError::FramesFull { .. } => FaultCode::FramesFull,
    };
    Fault::new(code, error.to_string())
}

fn journal_fault(error: JournalError) -> Fault {
    let code = match error {
        JournalError::Full { .. } => FaultCode::CacheFull,
        JournalError::Storage(_) | JournalError::Closed => FaultCode::StorageFailed,
    };
    Fault::new(code, error.to_string())
}

impl Meter {
    /// A meter over `cache`, recording through `journal`, with `table` shared
    /// with the uploader.
    pub fn new(
        cache: Arc<Cache>,
        journal: Journal,
        table: Arc<Mutex<StatusTable>>,
        signals: Arc<UploadSignals>,
        uploads_configured: bool,
        limits: ContextLimits,
    ) -> Self {
        Self {
            contexts: Mutex::new(Contexts::new(limits)),
            sessions_saved: tokio::sync::Mutex::new(()),
            table,
            journal,
            cache,
            signals,
            uploads_configured,
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// The caller of a call made by `peer`, with an optional explicit context.
    pub fn caller(&self, peer: &Peer, context: Option<&Context>) -> Result<Caller, Fault> {
        let as_process = |lineage: &[ProcessId]| Caller {
            key: ContextKey::Process(lineage[0]),
            enclosing: lineage[1..]
                .iter()
                .copied()
                .map(ContextKey::Process)
                .collect(),
        };
        let Some(context) = context else {
            return Ok(match peer.lineage.as_slice() {
                [] => Caller {
                    key: ContextKey::Connection(peer.connection),
                    enclosing: Vec::new(),
                },
                lineage => as_process(lineage),
            });
        };
        if peer.lineage.is_empty() {
            return Err(Fault::invalid_params(
                "explicit contexts need a caller with process credentials",
            ));
        }
        if context.as_str() == PARENT_CONTEXT {
            if peer.lineage.len() < 2 {
                return Err(Fault::invalid_params(if peer.parent_is_other_user {
                    "the caller's parent process runs as another user; its context is not the caller's"
                } else {
                    "the caller has no parent process"
                }));
            }
            return Ok(as_process(&peer.lineage[1..]));
        }
        if context.as_str().starts_with('.') {
            return Err(Fault::invalid_params(
                "context names starting with '.' are reserved",
            ));
        }
        let key = ContextKey::Named {
            process: peer.lineage[0],
            name: context.clone(),
        };
        if Context::parse(&key.to_string()).is_err() {
            return Err(Fault::invalid_params(
                "context name too long for this process",
            ));
        }
        let enclosing = peer
            .lineage
            .iter()
            .copied()
            .map(ContextKey::Process)
            .collect();
        Ok(Caller { key, enclosing })
    }

    /// Answers one call from `peer`.
    pub async fn call(&self, peer: &Peer, call: MeterCall) -> Result<Value, Fault> {
        match call {
            MeterCall::Login { cid, context } => {
                let caller = self.caller(peer, context.as_ref())?;
                self.login(&caller, cid).await.map(|()| Value::Bool(true))
            }
            MeterCall::Logout { cid, context } => {
                let caller = self.caller(peer, context.as_ref())?;
                self.logout(&caller, cid).await.map(Value::Bool)
            }
            MeterCall::Query { pid, context } => {
                let caller = self.caller(peer, context.as_ref())?;
                self.query(&caller, pid).map(Value::Bool)
            }
            MeterCall::Commit { pid, context } => {
                let caller = self.caller(peer, context.as_ref())?;
                self.commit(&caller, pid).await.map(|_| Value::Bool(true))
            }
            MeterCall::Cancel { pid, context } => {
                let caller = self.caller(peer, context.as_ref())?;
                Ok(Value::Bool(
                    lock(&self.contexts).close_query(&caller, pid).is_some(),
                ))
            }
            MeterCall::Flush => Ok(Value::Bool(self.flush().await)),
            MeterCall::Status => Ok(self.status()),
        }
    }

    async fn record(&self, caller: &Caller, event: Event) -> Result<u64, Fault> {
        let context =
            Context::parse(&caller.key.to_string()).expect("context keys are valid tokens");
        let reading = NewReading {
            time_ms: now_ms(),
            context,
            event,
        };
        let outcome = self.journal.record(reading).await;
        if matches!(outcome, Err(JournalError::Full { .. })) {
            self.signals.wake.notify_one();
        }
        outcome.map_err(journal_fault)
    }

    async fn login(&self, caller: &Caller, cid: Cid) -> Result<(), Fault> {
        lock(&self.contexts)
            .login(caller, cid)
            .map_err(context_fault)?;
        let saved = match self.record(caller, Event::Login(cid)).await {
            Ok(_) => self.save_sessions().await,
            Err(fault) => Err(fault),
        };
        if saved.is_err() {
            lock(&self.contexts).logout(caller, cid);
        }
        saved
    }

    async fn logout(&self, caller: &Caller, cid: Cid) -> Result<bool, Fault> {
        if !lock(&self.contexts).logout(caller, cid) {
            return Ok(false);
        }
        self.record(caller, Event::Logout(cid)).await?;
        self.save_sessions().await?;
        Ok(true)
    }

    /// Saves the open logins durably, so a restarted meter still knows them.
    async fn save_sessions(&self) -> Result<(), Fault> {
        let _serial = self.sessions_saved.lock().await;
        let sessions: Vec<(String, Cid)> = lock(&self.contexts)
            .logins()
            .into_iter()
            .map(|(key, cid)| (key.to_string(), cid))
            .collect();
        let cache = Arc::clone(&self.cache);
        let storage =
            |error: &dyn std::fmt::Display| Fault::new(FaultCode::StorageFailed, error.to_string());
        tokio::task::spawn_blocking(move || cache.save_sessions(&sessions))
            .await
            .map_err(|error| storage(&error))?
            .map_err(|error| storage(&error))
    }

    /// Reopens the sessions saved before a restart whose processes still run.
    /// Returns how many were restored.
    pub fn restore_sessions(&self, saved: &[(String, Cid)]) -> usize {
        let mut contexts = lock(&self.contexts);
        let mut restored = 0;
        for (text, cid) in saved {
            let Some(key) = ContextKey::parse(text) else {
                continue;
            };
            let alive = key
                .process()
                .is_some_and(|process| crate::procinfo::is_alive(&self.proc_root, &process));
            let caller = Caller {
                key,
                enclosing: Vec::new(),
            };
            if alive && contexts.login(&caller, *cid).is_ok() {
                restored += 1;
            }
        }
        restored
    }

    /// May a use of `pid` begin? Opens a query frame when it may.
    pub fn query(&self, caller: &Caller, pid: Pid) -> Result<bool, Fault> {
        let mut contexts = lock(&self.contexts);
        let Some(payer) = contexts.payer(caller) else {
            return Ok(false);
        };
        let (verdict, upload_early) = lock(&self.table).verdict(payer, now_ms());
        if upload_early {
            self.signals.wake.notify_one();
        }
        if !verdict.allows() {
            return Ok(false);
        }
        contexts
            .open_query(caller, pid, payer)
            .map_err(context_fault)?;
        Ok(true)
    }

    async fn commit(&self, caller: &Caller, pid: Pid) -> Result<u64, Fault> {
        let payer = lock(&self.contexts)
            .close_query(caller, pid)
            .ok_or_else(|| {
                Fault::new(
                    FaultCode::UnmatchedCommit,
                    format!("commit({pid}) without an open query({pid}) in this context"),
                )
            })?;
        let seq = self
            .record(
                caller,
                Event::Commit {
                    pid,
                    payer: Some(payer),
                },
            )
            .await?;
        let pending = self.cache.pending();
        let flush_at = u64::from(lock(&self.table).params().flush_readings_max);
        if pending >= flush_at {
            self.signals.wake.notify_one();
        }
        Ok(seq)
    }

    /// Uploads now; true when an upload succeeded within `FLUSH_WAIT_MS`.
    pub async fn flush(&self) -> bool {
        if !self.uploads_configured {
            return false;
        }
        let mut reports = self.signals.report.subscribe();
        let ticket = self
            .signals
            .flush_tickets
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        self.signals.wake.notify_one();
        let wait = async {
            loop {
                {
                    let report = reports.borrow_and_update();
                    if report.flushes_served >= ticket {
                        return report.last_error.is_none();
                    }
                }
                if reports.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(Duration::from_millis(FLUSH_WAIT_MS), wait)
            .await
            .unwrap_or(false)
    }

    /// Drops the contexts of processes that have exited.
    pub fn sweep_contexts(&self) -> usize {
        let root = self.proc_root.clone();
        lock(&self.contexts).retain_processes(|process| crate::procinfo::is_alive(&root, process))
    }

    /// Drops a closed connection's context.
    pub fn forget_connection(&self, connection: u64) {
        lock(&self.contexts).forget_connection(connection);
    }

    fn status(&self) -> Value {
        let report = self.signals.report.borrow().clone();
        let open_contexts = lock(&self.contexts).len();
        let received_ms = lock(&self.table).received_ms();
        let table_age_s = received_ms.map(|received| now_ms().saturating_sub(received) / 1000);
        let set_aside = self.cache.set_aside();
        let optional =
            |value: Option<u64>| value.map_or(Value::Nil, |v| Value::string(v.to_string()));
        Value::structure([
            (
                "pendingReadings",
                Value::string(self.cache.pending().to_string()),
            ),
            (
                "cacheReadingsMax",
                Value::string(self.cache.readings_max().to_string()),
            ),
            ("openContexts", Value::string(open_contexts.to_string())),
            ("uploadsConfigured", Value::Bool(self.uploads_configured)),
            ("lastUploadMs", optional(report.last_success_ms)),
            (
                "lastError",
                report.last_error.map_or(Value::Nil, Value::String),
            ),
            ("tableAgeS", optional(table_age_s)),
            (
                "conflictedBatches",
                Value::string(set_aside.batches.to_string()),
            ),
            (
                "conflictedReadings",
                Value::string(set_aside.readings.to_string()),
            ),
            (
                "conflictedBatchIds",
                Value::Array(
                    set_aside
                        .latest
                        .iter()
                        .map(|id| Value::string(id.as_str()))
                        .collect(),
                ),
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A meter on a fresh cache in `dir`, without uploads.
    fn meter(dir: &std::path::Path) -> Meter {
        let cache = Arc::new(Cache::open(dir, 1_000).unwrap());
        let (journal, _writer) = crate::journal::start(Arc::clone(&cache));
        let (report, _) = watch::channel(UploadReport::default());
        let signals = Arc::new(UploadSignals {
            wake: Notify::new(),
            report,
            flush_tickets: std::sync::atomic::AtomicU64::new(0),
        });
        Meter::new(
            cache,
            journal,
            Arc::default(),
            signals,
            false,
            ContextLimits::default(),
        )
    }

    fn process(pid: u32) -> ProcessId {
        ProcessId {
            pid,
            start_ticks: u64::from(pid) * 10,
        }
    }

    fn peer(uid: u32, pids: &[u32], parent_is_other_user: bool) -> Peer {
        Peer {
            lineage: pids.iter().copied().map(process).collect(),
            parent_is_other_user,
            uid: Some(uid),
            connection: 1,
        }
    }

    #[test]
    fn the_parent_context_is_refused_when_the_parent_is_another_user() {
        let dir = tempfile::tempdir().unwrap();
        let meter = meter(dir.path());
        let parent = Context::parse(PARENT_CONTEXT).unwrap();
        let same_user = meter.caller(&peer(1000, &[20, 10], false), Some(&parent));
        assert_eq!(same_user.unwrap().key, ContextKey::Process(process(10)));
        let fault = meter
            .caller(&peer(1000, &[20], true), Some(&parent))
            .unwrap_err();
        assert_eq!(fault.registered(), Some(FaultCode::InvalidParams));
        assert!(fault.message.contains("another user"), "{}", fault.message);
        let orphan = meter.caller(&peer(1000, &[20], false), Some(&parent));
        assert!(orphan.unwrap_err().message.contains("no parent"));
        // Without `..`, the caller's own process is its context, and only
        // the ancestors the lineage kept enclose it.
        let own = meter.caller(&peer(1000, &[20], true), None).unwrap();
        assert_eq!(own.key, ContextKey::Process(process(20)));
        assert!(own.enclosing.is_empty());
    }
}
