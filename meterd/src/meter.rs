//! The meter's calls: who pays, whether a use may begin, and recording uses.
//! Transport-free: the server hands in a decoded call and who made it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::grant::{DeviceCode, GrantInfo, GrantRequest, PasswordGrant, PollStatus};
use proto::meter_api::{GrantStarted, MeterCall, Password, grants_to_value};
use proto::reading::Event;
use proto::xmlrpc::Value;
use proto::{Cid, Context, Fault, FaultCode, Pid};
use tokio::sync::{Notify, watch};

use crate::backoffice::{Backoffice, BackofficeError};
use crate::cache::{Cache, CacheError, NewReading, SavedSession, SavedSessions};
use crate::context::{Caller, ContextError, ContextKey, ContextLimits, Contexts, ProcessId};
use crate::grants::{self, Held, Next, Requests};
use crate::journal::{Journal, JournalError};
use crate::standing::StatusTable;

/// How long `flush()` waits for an upload before answering false.
pub const FLUSH_WAIT_MS: u64 = 30_000;
/// How long one `grant.wait` waits for the customer before answering
/// `pending` (the caller then asks again); below the client's call timeout.
pub const GRANT_WAIT_MS: u64 = 25_000;
/// How long one grant call to the backoffice may take.
pub const GRANT_CALL_TIMEOUT_MS: u64 = 10_000;

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
    contexts: Arc<Mutex<Contexts>>,
    /// Serializes saving sessions, so an older list never overwrites a newer.
    sessions_saved: tokio::sync::Mutex<()>,
    table: Arc<Mutex<StatusTable>>,
    journal: Journal,
    cache: Arc<Cache>,
    signals: Arc<UploadSignals>,
    backoffice: Option<Arc<Backoffice>>,
    grants: Mutex<Held>,
    requests: Mutex<Requests>,
    /// The machine's label, shown to customers asked for a grant.
    label: String,
    /// Where `/proc` is, for telling live processes from exited ones.
    pub proc_root: PathBuf,
    /// Where `passwd` is, for the names of local users.
    pub etc_root: PathBuf,
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
        JournalError::Stopped(_) => FaultCode::MeterStopped,
        JournalError::InDoubt(_) => FaultCode::RecordingInDoubt,
    };
    Fault::new(code, error.to_string())
}

fn grant_failed(error: BackofficeError) -> Fault {
    let message = match error {
        BackofficeError::Refused(fault) => format!(
            "the backoffice refused the grant: {} (fault {})",
            fault.message, fault.code
        ),
        other => format!("the backoffice could not be asked: {other}"),
    };
    Fault::new(FaultCode::GrantFailed, message)
}

/// One signed grant call to the backoffice, its answer decoded as `what`;
/// every failure is fault 107.
async fn grant_call<T>(
    backoffice: &Backoffice,
    (method, params): (&'static str, Vec<Value>),
    what: &str,
    decode: impl FnOnce(&Value) -> Result<T, Fault>,
) -> Result<T, Fault> {
    let timeout = Duration::from_millis(GRANT_CALL_TIMEOUT_MS);
    let answer = backoffice
        .call(method, &params, timeout)
        .await
        .map_err(grant_failed)?;
    decode(&answer).map_err(|fault| {
        Fault::new(
            FaultCode::GrantFailed,
            format!("the backoffice's answer was not {what}: {}", fault.message),
        )
    })
}

fn storage_fault(error: &dyn std::fmt::Display) -> Fault {
    Fault::new(FaultCode::StorageFailed, error.to_string())
}

/// Refuses `grant.password` unless the backoffice is on this machine: the
/// meter speaks https to it: over plain http anywhere else the
/// customer's web password would cross the network readable by anyone on
/// the way. The device code flow sends no password.
fn password_may_be_sent(backoffice: &Backoffice, cid: Cid) -> Result<(), Fault> {
    let endpoint = backoffice.endpoint();
    if endpoint.tls || crate::backoffice::is_loopback_host(&endpoint.host) {
        return Ok(());
    }
    Err(Fault::new(
        FaultCode::GrantFailed,
        format!(
            "this meter reaches its backoffice ({}) over plain http, which is not on this \
             machine, so it will not send {cid}'s password there; nothing was sent. Use the \
             code flow instead: run `meterd grant {cid}` (without --password-stdin) and have \
             {cid} approve the code on the backoffice's web pages",
            endpoint.host
        ),
    ))
}

/// A new handle for a grant request: 128 random bits in hex.
fn request_handle() -> Result<String, Fault> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| storage_fault(&"the system's random generator failed"))?;
    Ok(proto::record::hex(&bytes))
}

impl Meter {
    /// The open frames of every context, shared with the uploader, which
    /// keeps a component's use in the batch of its enclosing use.
    pub fn contexts(&self) -> Arc<Mutex<Contexts>> {
        Arc::clone(&self.contexts)
    }

    /// A meter over `cache`, recording through `journal`, with `table` shared
    /// with the uploader, calling `backoffice` (if any) for grants; it holds
    /// the grants kept in the cache.
    pub fn new(
        cache: Arc<Cache>,
        journal: Journal,
        table: Arc<Mutex<StatusTable>>,
        signals: Arc<UploadSignals>,
        backoffice: Option<Arc<Backoffice>>,
        limits: ContextLimits,
    ) -> Result<Self, CacheError> {
        let held = Held::new(cache.grants()?);
        let proc_root = PathBuf::from("/proc");
        Ok(Self {
            contexts: Arc::new(Mutex::new(Contexts::new(limits))),
            sessions_saved: tokio::sync::Mutex::new(()),
            table,
            journal,
            cache,
            signals,
            backoffice,
            grants: Mutex::new(held),
            requests: Mutex::new(Requests::default()),
            label: grants::machine_label(&proc_root),
            proc_root,
            etc_root: PathBuf::from("/etc"),
        })
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
            uid: peer.uid,
        };
        let Some(context) = context else {
            return Ok(match peer.lineage.as_slice() {
                [] => Caller {
                    key: ContextKey::Connection(peer.connection),
                    enclosing: Vec::new(),
                    uid: peer.uid,
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
        Ok(Caller {
            key,
            enclosing,
            uid: peer.uid,
        })
    }

    /// Answers one call from `peer`.
    pub async fn call(&self, peer: &Peer, call: MeterCall) -> Result<Value, Fault> {
        // After a failed sync nothing is acknowledged: every call but
        // `status` (which says why) gets the same clear fault.
        if let Some(reason) = self.cache.stopped()
            && !matches!(call, MeterCall::Status)
        {
            return Err(Fault::new(
                FaultCode::MeterStopped,
                CacheError::Stopped(reason).to_string(),
            ));
        }
        match call {
            MeterCall::Login { cid, context } => {
                let caller = self.caller(peer, context.as_ref())?;
                self.login(&caller, cid, peer.uid)
                    .await
                    .map(|()| Value::Bool(true))
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
            MeterCall::GrantStart { cid, machine_wide } => self
                .grant_start(peer, cid, machine_wide)
                .await
                .map(|started| started.to_value()),
            MeterCall::GrantWait { request } => self
                .grant_wait(peer, &request)
                .await
                .map(|status| status.to_value()),
            MeterCall::GrantPassword {
                cid,
                password,
                machine_wide,
                expires_in_s,
            } => self
                .grant_password(peer, cid, password, machine_wide, expires_in_s)
                .await
                .map(|grant| grant.to_value()),
            MeterCall::GrantList => {
                let uid = Self::uid_of(peer.uid)?;
                Ok(grants_to_value(&lock(&self.grants).visible_to(uid)))
            }
        }
    }

    fn uid_of(uid: Option<u32>) -> Result<u32, Fault> {
        uid.ok_or_else(|| {
            Fault::new(
                FaultCode::NotGranted,
                "grants and logins need a caller with credentials (the Unix socket's peer uid)",
            )
        })
    }

    fn backoffice(&self) -> Result<&Arc<Backoffice>, Fault> {
        self.backoffice.as_ref().ok_or_else(|| {
            Fault::new(
                FaultCode::GrantFailed,
                "this meter has no backoffice configured (backoffice URL, MID and secret file), \
                 so it cannot ask for a grant",
            )
        })
    }

    /// Asks the backoffice for a device code to grant `cid` to the caller.
    pub async fn grant_start(
        &self,
        peer: &Peer,
        cid: Cid,
        machine_wide: bool,
    ) -> Result<GrantStarted, Fault> {
        let uid = Self::uid_of(peer.uid)?;
        let scope = grants::scope_for(uid, machine_wide, &self.etc_root)?;
        let backoffice = self.backoffice()?;
        lock(&self.requests).check_room(uid, now_ms())?;
        let request = GrantRequest {
            mid: backoffice.mid(),
            cid,
            label: self.label.clone(),
            scope: scope.clone(),
        };
        let code = grant_call(
            backoffice,
            request.to_call(),
            "a device code",
            DeviceCode::from_value,
        )
        .await?;
        let now = now_ms();
        let lifetime_s = code.expires_in_s.min(grants::REQUEST_LIFETIME_MAX_S);
        let interval_s = code
            .interval_s
            .clamp(grants::POLL_INTERVAL_MIN_S, grants::POLL_INTERVAL_MAX_S);
        let handle = request_handle()?;
        let waiting = grants::Request {
            uid,
            cid,
            scope,
            device_code: code.device_code,
            interval_s,
            expires_ms: now + lifetime_s * 1000,
            next_poll_ms: now + interval_s * 1000,
        };
        lock(&self.requests).insert(handle.clone(), waiting, now)?;
        Ok(GrantStarted {
            request: handle,
            user_code: code.user_code,
            verification_uri: code.verification_uri,
            expires_in_s: lifetime_s,
        })
    }

    /// Waits up to `GRANT_WAIT_MS` for the customer to answer the request
    /// `handle` that the caller started, polling the backoffice at the
    /// interval it asked for. An approved grant is kept before it is answered.
    pub async fn grant_wait(&self, peer: &Peer, handle: &str) -> Result<PollStatus, Fault> {
        let uid = Self::uid_of(peer.uid)?;
        let backoffice = self.backoffice()?;
        let deadline = now_ms() + GRANT_WAIT_MS;
        loop {
            let now = now_ms();
            let next = lock(&self.requests).next(handle, uid, now)?;
            let device_code = match next {
                Next::Expired => return Ok(PollStatus::Expired),
                Next::WaitUntil(when) if when >= deadline => return Ok(PollStatus::Pending),
                Next::WaitUntil(when) => {
                    tokio::time::sleep(Duration::from_millis(when.saturating_sub(now))).await;
                    continue;
                }
                Next::Poll(device_code) => device_code,
            };
            let (method, params) = proto::grant::poll_call(&backoffice.mid(), &device_code);
            let timeout = Duration::from_millis(GRANT_CALL_TIMEOUT_MS);
            let answer = match backoffice.call(method, &params, timeout).await {
                Ok(answer) => answer,
                Err(BackofficeError::Refused(fault))
                    if fault.registered() == Some(FaultCode::TooManyAttempts) =>
                {
                    lock(&self.requests).slow_down(handle);
                    continue;
                }
                Err(BackofficeError::Refused(fault))
                    if matches!(
                        fault.registered(),
                        Some(FaultCode::Replay | FaultCode::ClockSkew | FaultCode::InternalError)
                    ) =>
                {
                    // Not an answer about the request (a poll seen twice, a
                    // clock to set, a busy backoffice): poll again.
                    tracing::warn!(%fault, "polling a grant request was refused for now");
                    continue;
                }
                Err(error @ BackofficeError::Refused(_)) => {
                    lock(&self.requests).remove(handle);
                    return Err(grant_failed(error));
                }
                Err(error) => {
                    // Unreachable for now: poll again after the interval.
                    tracing::warn!(%error, "polling a grant request failed");
                    continue;
                }
            };
            let status = PollStatus::from_value(&answer).map_err(|fault| {
                Fault::new(
                    FaultCode::GrantFailed,
                    format!(
                        "the backoffice's answer was not a poll status: {}",
                        fault.message
                    ),
                )
            })?;
            match &status {
                PollStatus::Pending => continue,
                PollStatus::Approved(grant) => {
                    let Some(request) = lock(&self.requests).remove(handle) else {
                        // Another waiter took the answer meanwhile.
                        continue;
                    };
                    grants::check_answer(request.cid, &request.scope, uid, grant)?;
                    self.keep_grant(grant.clone()).await?;
                    tracing::info!(cid = %grant.cid, scope = %grant.scope, "grant approved");
                }
                PollStatus::Denied | PollStatus::Expired => {
                    lock(&self.requests).remove(handle);
                }
            }
            return Ok(status);
        }
    }

    /// Grants `cid` to the caller with the customer's password.
    pub async fn grant_password(
        &self,
        peer: &Peer,
        cid: Cid,
        password: Password,
        machine_wide: bool,
        expires_in_s: Option<u64>,
    ) -> Result<GrantInfo, Fault> {
        let uid = Self::uid_of(peer.uid)?;
        let scope = grants::scope_for(uid, machine_wide, &self.etc_root)?;
        let backoffice = self.backoffice()?;
        password_may_be_sent(backoffice, cid)?;
        let grant = PasswordGrant {
            request: GrantRequest {
                mid: backoffice.mid(),
                cid,
                label: self.label.clone(),
                scope: scope.clone(),
            },
            password: password.0,
            expires_in_s,
        };
        let granted = grant_call(
            backoffice,
            grant.to_call(),
            "a grant",
            GrantInfo::from_value,
        )
        .await?;
        grants::check_answer(cid, &scope, uid, &granted)?;
        self.keep_grant(granted.clone()).await?;
        tracing::info!(cid = %granted.cid, scope = %granted.scope, "grant made with a password");
        Ok(granted)
    }

    /// Keeps a grant durably, then in memory.
    async fn keep_grant(&self, grant: GrantInfo) -> Result<(), Fault> {
        let cache = Arc::clone(&self.cache);
        let kept = grant.clone();
        let now = now_ms();
        tokio::task::spawn_blocking(move || cache.save_grant(&kept, now))
            .await
            .map_err(|error| storage_fault(&error))?
            .map_err(|error| storage_fault(&error))?;
        lock(&self.grants).insert(grant, now);
        Ok(())
    }

    /// Closes the logins whose grant no longer admits them (it expired);
    /// returns how many were closed.
    pub async fn end_ungranted_logins(&self) -> usize {
        let now = now_ms();
        let ended = {
            let grants = lock(&self.grants);
            lock(&self.contexts).end_logins(|cid, uid| grants.admits(cid, uid, now))
        };
        if ended > 0
            && let Err(fault) = self.save_sessions().await
        {
            tracing::warn!(%fault, "could not save sessions");
        }
        ended
    }

    async fn record(&self, caller: &Caller, event: Event) -> Result<u64, Fault> {
        self.record_in(&caller.key, event).await
    }

    /// Records `event` in the context `key` (a commit: its chain's).
    async fn record_in(&self, key: &ContextKey, event: Event) -> Result<u64, Fault> {
        let context = Context::parse(&key.to_string()).expect("context keys are valid tokens");
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

    async fn login(&self, caller: &Caller, cid: Cid, uid: Option<u32>) -> Result<(), Fault> {
        let uid = Self::uid_of(uid)?;
        if !lock(&self.grants).admits(cid, uid, now_ms()) {
            return Err(Fault::new(
                FaultCode::NotGranted,
                format!(
                    "uid {uid} holds no grant of {cid} on this meter, so it cannot log in as \
                     {cid}; nothing was recorded. Run `meterd grant {cid}` as that user and \
                     have {cid} approve it"
                ),
            ));
        }
        lock(&self.contexts)
            .login(caller, cid, uid)
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

    /// `logout(CID)`: recorded, then saved without the session, and only
    /// then closed, so that a logout refused on the way (a full cache, a
    /// failing disk) leaves the session open both here and on disk, never
    /// closed here and reopened by a restart.
    async fn logout(&self, caller: &Caller, cid: Cid) -> Result<bool, Fault> {
        if !lock(&self.contexts).has_login(caller, cid) {
            return Ok(false);
        }
        self.record(caller, Event::Logout(cid)).await?;
        // Held until the session is closed, so no other save writes it back.
        let _serial = self.sessions_saved.lock().await;
        self.write_sessions(Some((&caller.key, cid))).await?;
        lock(&self.contexts).logout(caller, cid);
        Ok(true)
    }

    /// Saves the open logins durably, so a restarted meter still knows them.
    async fn save_sessions(&self) -> Result<(), Fault> {
        let _serial = self.sessions_saved.lock().await;
        self.write_sessions(None).await
    }

    /// Writes the open logins, without the nearest login of the CID in the
    /// context given (and the logins above it, which its logout closes);
    /// the caller holds `sessions_saved`.
    async fn write_sessions(&self, closing: Option<(&ContextKey, Cid)>) -> Result<(), Fault> {
        let mut logins = lock(&self.contexts).logins();
        if let Some((key, cid)) = closing
            && let Some(at) = logins
                .iter()
                .rposition(|(context, open, _)| context == key && *open == cid)
        {
            let mut index = 0;
            logins.retain(|(context, _, _)| {
                let keep = index < at || context != key;
                index += 1;
                keep
            });
        }
        let sessions: Vec<SavedSession> = logins
            .into_iter()
            .map(|(key, cid, uid)| SavedSession {
                context: key.to_string(),
                cid,
                uid,
            })
            .collect();
        let saved = SavedSessions {
            boot_id: crate::procinfo::read_boot_id(&self.proc_root).unwrap_or_default(),
            sessions,
        };
        let cache = Arc::clone(&self.cache);
        tokio::task::spawn_blocking(move || cache.save_sessions(&saved))
            .await
            .map_err(|error| storage_fault(&error))?
            .map_err(|error| storage_fault(&error))
    }

    /// Reopens the sessions saved before a restart of the meter, in this
    /// boot of the machine, whose processes still run (same PID and start
    /// time) as the uid that logged in and whose grant still admits that
    /// uid. Returns how many were restored.
    pub fn restore_sessions(&self, saved: &SavedSessions) -> usize {
        if saved.sessions.is_empty() {
            return 0;
        }
        let boot_id = crate::procinfo::read_boot_id(&self.proc_root);
        if saved.boot_id.is_empty() || boot_id.as_deref() != Some(saved.boot_id.as_str()) {
            // After a reboot, PIDs and start times repeat: the saved
            // contexts may name other processes now.
            tracing::info!(
                saved = saved.sessions.len(),
                "sessions saved in another boot of the machine are not restored"
            );
            return 0;
        }
        let now = now_ms();
        let grants = lock(&self.grants);
        let mut contexts = lock(&self.contexts);
        let mut restored = 0;
        for session in &saved.sessions {
            let Some(key) = ContextKey::parse(&session.context) else {
                continue;
            };
            // The process still runs, and still as the uid that logged in
            // (it may have changed its uid in place since).
            let alive_as_uid = key.process().is_some_and(|process| {
                crate::procinfo::is_alive(&self.proc_root, &process)
                    && crate::procinfo::read_uid(&self.proc_root, process.pid) == Some(session.uid)
            });
            let granted = grants.admits(session.cid, session.uid, now);
            let caller = Caller {
                key,
                enclosing: Vec::new(),
                uid: Some(session.uid),
            };
            if alive_as_uid && granted && contexts.login(&caller, session.cid, session.uid).is_ok()
            {
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
        let (payer, chain) = lock(&self.contexts)
            .close_query_in_chain(caller, pid)
            .ok_or_else(|| {
                Fault::new(
                    FaultCode::UnmatchedCommit,
                    format!("commit({pid}) without an open query({pid}) in this context"),
                )
            })?;
        let seq = self
            .record_in(
                &chain,
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
        if self.backoffice.is_none() {
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
            (
                "stopped",
                self.cache.stopped().map_or(Value::Nil, Value::String),
            ),
            ("uploadsConfigured", Value::Bool(self.backoffice.is_some())),
            (
                "grantsHeld",
                Value::string(lock(&self.grants).live(now_ms()).to_string()),
            ),
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
    use proto::grant::Scope;

    /// The CIDs of the grants `grant.list` shows `peer`.
    async fn listed(meter: &Meter, peer: &Peer) -> Vec<String> {
        let value = meter.call(peer, MeterCall::GrantList).await.unwrap();
        proto::meter_api::grants_from_value(&value)
            .unwrap()
            .into_iter()
            .map(|grant| grant.cid.to_string())
            .collect()
    }

    /// A meter on a cache in `dir`, without uploads.
    fn meter(dir: &std::path::Path) -> Meter {
        meter_on(Arc::new(Cache::open(dir, 1_000).unwrap()))
    }

    /// A meter on `cache`, without uploads.
    fn meter_on(cache: Arc<Cache>) -> Meter {
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
            None,
            ContextLimits::default(),
        )
        .unwrap()
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

    fn grant(cid: &str, scope: Scope, expires_ms: Option<u64>) -> GrantInfo {
        GrantInfo {
            cid: Cid::parse(cid).unwrap(),
            scope,
            created_ms: now_ms(),
            expires_ms,
        }
    }

    fn user(uid: u32) -> Scope {
        Scope::User {
            uid,
            name: String::new(),
        }
    }

    fn login_call(cid: &str) -> MeterCall {
        MeterCall::Login {
            cid: Cid::parse(cid).unwrap(),
            context: None,
        }
    }

    fn fault_of(outcome: Result<Value, Fault>) -> Option<FaultCode> {
        outcome.err().and_then(|fault| fault.registered())
    }

    #[tokio::test]
    async fn a_meter_whose_storage_failed_refuses_every_call_and_its_status_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let meter = meter(dir.path());
        let bob = peer(1000, &[20, 10], false);
        let query = || MeterCall::Query {
            pid: Pid::parse("B1-P1").unwrap(),
            context: None,
        };
        let commit = || MeterCall::Commit {
            pid: Pid::parse("B1-P1").unwrap(),
            context: None,
        };
        meter
            .keep_grant(grant("B1-C4", user(1000), None))
            .await
            .unwrap();
        meter.call(&bob, login_call("B1-C4")).await.unwrap();
        meter.call(&bob, query()).await.unwrap();
        meter.cache.fail_syncs(true);
        // The commit whose sync failed: not acknowledged, and in doubt
        // because the undo could not be synced either.
        assert_eq!(
            fault_of(meter.call(&bob, commit()).await),
            Some(FaultCode::RecordingInDoubt)
        );
        meter.cache.fail_syncs(false);
        for call in [query(), commit(), login_call("B1-C4"), MeterCall::Flush] {
            let fault = meter.call(&bob, call).await.unwrap_err();
            assert_eq!(fault.registered(), Some(FaultCode::MeterStopped));
            assert!(
                fault.message.contains("restart meterd"),
                "{}",
                fault.message
            );
        }
        let status = meter.call(&bob, MeterCall::Status).await.unwrap();
        let stopped = status
            .member("stopped")
            .and_then(Value::as_str)
            .unwrap_or_default();
        assert!(stopped.contains("injected fsync failure"), "{status:?}");
    }

    #[tokio::test]
    async fn login_needs_a_live_grant_that_admits_the_callers_uid() {
        let dir = tempfile::tempdir().unwrap();
        let meter = meter(dir.path());
        let bob = peer(1000, &[20, 10], false);
        let eve = peer(1001, &[30, 10], false);
        let refused = meter.call(&bob, login_call("B1-C4")).await.unwrap_err();
        assert_eq!(refused.registered(), Some(FaultCode::NotGranted));
        assert!(
            refused.message.contains("meterd grant B1-C4"),
            "{}",
            refused.message
        );
        meter
            .keep_grant(grant("B1-C4", user(1000), None))
            .await
            .unwrap();
        assert_eq!(
            meter.call(&bob, login_call("B1-C4")).await,
            Ok(Value::Bool(true))
        );
        assert_eq!(
            fault_of(meter.call(&eve, login_call("B1-C4")).await),
            Some(FaultCode::NotGranted),
            "another uid"
        );
        assert_eq!(
            fault_of(meter.call(&bob, login_call("B1-C5")).await),
            Some(FaultCode::NotGranted),
            "another customer"
        );
        let anonymous = Peer {
            uid: None,
            ..peer(1000, &[], false)
        };
        assert_eq!(
            fault_of(meter.call(&anonymous, login_call("B1-C4")).await),
            Some(FaultCode::NotGranted),
            "no credentials"
        );
        // An expired grant admits no one; a machine-wide one admits everyone.
        meter
            .keep_grant(grant("B1-C6", user(1001), Some(now_ms() - 1)))
            .await
            .unwrap();
        assert_eq!(
            fault_of(meter.call(&eve, login_call("B1-C6")).await),
            Some(FaultCode::NotGranted)
        );
        meter
            .keep_grant(grant("B1-C7", Scope::Machine, None))
            .await
            .unwrap();
        assert_eq!(
            meter.call(&eve, login_call("B1-C7")).await,
            Ok(Value::Bool(true))
        );
        // The grants are in the cache: a meter started on it holds them.
        // An expired grant was dropped when the next one was kept.
        assert_eq!(listed(&meter, &bob).await, ["B1-C4", "B1-C7"]);
        assert_eq!(listed(&meter, &eve).await, ["B1-C7"]);
        assert_eq!(
            listed(&meter, &peer(0, &[5], false)).await,
            ["B1-C4", "B1-C7"]
        );
        let again = meter_on(Arc::clone(&meter.cache));
        drop(meter);
        assert_eq!(listed(&again, &bob).await, ["B1-C4", "B1-C7"]);
        assert_eq!(
            again.call(&bob, login_call("B1-C4")).await,
            Ok(Value::Bool(true))
        );
    }

    fn query_call(pid: &str) -> MeterCall {
        MeterCall::Query {
            pid: Pid::parse(pid).unwrap(),
            context: None,
        }
    }

    #[tokio::test]
    async fn a_logout_that_could_not_be_recorded_leaves_the_session_open_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        // Room for one reading: the login's. The logout's is refused.
        let cache = Arc::new(Cache::open(dir.path(), 1).unwrap());
        let meter = meter_on(Arc::clone(&cache));
        meter
            .keep_grant(grant("B1-C4", user(1000), None))
            .await
            .unwrap();
        let program = peer(1000, &[20, 10], false);
        meter.call(&program, login_call("B1-C4")).await.unwrap();
        let logout = MeterCall::Logout {
            cid: Cid::parse("B1-C4").unwrap(),
            context: None,
        };
        assert_eq!(
            fault_of(meter.call(&program, logout.clone()).await),
            Some(FaultCode::CacheFull)
        );
        // Still open here, and still saved: a restart brings back what was
        // open before, not a session that was closed.
        assert_eq!(
            meter.call(&program, query_call("B1-P1")).await,
            Ok(Value::Bool(true)),
            "the session is still open"
        );
        let saved = cache.saved_sessions().unwrap();
        assert_eq!(saved.sessions.len(), 1, "{saved:?}");
        // Where the reading fits, the logout closes it here and on disk.
        let other = tempfile::tempdir().unwrap();
        let roomy_cache = Arc::new(Cache::open(other.path(), 1_000).unwrap());
        let roomy = meter_on(Arc::clone(&roomy_cache));
        roomy
            .keep_grant(grant("B1-C4", user(1000), None))
            .await
            .unwrap();
        roomy.call(&program, login_call("B1-C4")).await.unwrap();
        assert_eq!(roomy.call(&program, logout).await, Ok(Value::Bool(true)));
        assert_eq!(
            roomy.call(&program, query_call("B1-P1")).await,
            Ok(Value::Bool(false))
        );
        assert!(roomy_cache.saved_sessions().unwrap().sessions.is_empty());
    }

    #[tokio::test]
    async fn a_login_pays_only_for_the_uid_that_made_it_even_in_the_same_process() {
        let dir = tempfile::tempdir().unwrap();
        let meter = meter(dir.path());
        meter
            .keep_grant(grant("B1-C4", user(0), None))
            .await
            .unwrap();
        // Root logs in, then calls setuid(1000) in place: the same process
        // (PID and start time), now calling with uid 1000.
        let root = peer(0, &[20, 10], false);
        let after_setuid = peer(1000, &[20, 10], false);
        assert_eq!(
            meter.call(&root, login_call("B1-C4")).await,
            Ok(Value::Bool(true))
        );
        assert_eq!(
            meter.call(&after_setuid, query_call("B1-P1")).await,
            Ok(Value::Bool(false)),
            "root's session is not uid 1000's"
        );
        let anonymous = Peer {
            uid: None,
            ..root.clone()
        };
        assert_eq!(
            meter.call(&anonymous, query_call("B1-P1")).await,
            Ok(Value::Bool(false))
        );
        assert_eq!(
            meter.call(&root, query_call("B1-P1")).await,
            Ok(Value::Bool(true))
        );
        // Nor may uid 1000 commit the use root began.
        let commit = MeterCall::Commit {
            pid: Pid::parse("B1-P1").unwrap(),
            context: None,
        };
        assert_eq!(
            fault_of(meter.call(&after_setuid, commit.clone()).await),
            Some(FaultCode::UnmatchedCommit)
        );
        assert_eq!(meter.call(&root, commit).await, Ok(Value::Bool(true)));
    }

    /// A fake `/proc` with a boot id and processes `(pid, effective uid)`,
    /// each started at `process(pid)`'s start time.
    fn fake_proc(boot_id: &str, processes: &[(u32, u32)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let random = root.path().join("sys/kernel/random");
        std::fs::create_dir_all(&random).unwrap();
        std::fs::write(random.join("boot_id"), format!("{boot_id}\n")).unwrap();
        for &(pid, uid) in processes {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir(&dir).unwrap();
            let start = process(pid).start_ticks;
            let stat = format!("{pid} (p) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 50");
            std::fs::write(dir.join("stat"), stat).unwrap();
            let status = format!("Name:\tp\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n");
            std::fs::write(dir.join("status"), status).unwrap();
        }
        root
    }

    #[tokio::test]
    async fn sessions_are_restored_only_while_their_grant_admits_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut meter = meter(dir.path());
        // Process 20 runs as uid 1000; process 30 logged in as uid 1000 and
        // has since changed its uid to 0 in place; process 40 has exited.
        let proc_root = fake_proc("boot-a", &[(20, 1000), (30, 0)]);
        meter.proc_root = proc_root.path().to_owned();
        let session = |pid: u32, cid: &str, uid| SavedSession {
            context: ContextKey::Process(process(pid)).to_string(),
            cid: Cid::parse(cid).unwrap(),
            uid,
        };
        meter
            .keep_grant(grant("B1-C4", user(1000), None))
            .await
            .unwrap();
        let saved = |boot_id: &str| SavedSessions {
            boot_id: boot_id.to_owned(),
            sessions: vec![
                session(20, "B1-C4", 1000),
                session(20, "B1-C4", 1001),
                session(20, "B1-C5", 1000),
                session(30, "B1-C4", 1000),
                session(40, "B1-C4", 1000),
            ],
        };
        // Saved in another boot (or before boot ids were kept): PIDs and
        // start times repeat after a reboot, so none is restored.
        assert_eq!(meter.restore_sessions(&saved("boot-b")), 0);
        assert_eq!(meter.restore_sessions(&saved("")), 0);
        assert!(lock(&meter.contexts).logins().is_empty());
        assert_eq!(meter.restore_sessions(&saved("boot-a")), 1);
        let caller = Caller {
            key: ContextKey::Process(process(20)),
            enclosing: Vec::new(),
            uid: Some(1000),
        };
        assert_eq!(
            lock(&meter.contexts).logins(),
            [(caller.key.clone(), Cid::parse("B1-C4").unwrap(), 1000)]
        );
        // The grant expires: the sweep closes the login, and saves that
        // with this boot's id.
        assert_eq!(meter.end_ungranted_logins().await, 0);
        meter
            .keep_grant(grant("B1-C4", user(1000), Some(now_ms() - 1)))
            .await
            .unwrap();
        assert_eq!(meter.end_ungranted_logins().await, 1);
        assert!(lock(&meter.contexts).logins().is_empty());
        let kept = meter.cache.saved_sessions().unwrap();
        assert!(kept.sessions.is_empty(), "saved too");
        assert_eq!(kept.boot_id, "boot-a");
    }

    #[tokio::test]
    async fn a_password_is_sent_only_to_a_backoffice_on_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(dir.path(), 1_000).unwrap());
        let (journal, _writer) = crate::journal::start(Arc::clone(&cache));
        let (report, _) = watch::channel(UploadReport::default());
        let signals = Arc::new(UploadSignals {
            wake: Notify::new(),
            report,
            flush_tickets: std::sync::atomic::AtomicU64::new(0),
        });
        let secret = proto::auth::Secret::new(b"a test secret of thirty-two bytes").unwrap();
        let mid = proto::Mid::parse("B1-M1").unwrap();
        // A port where nothing listens: were the password sent, the fault
        // would say the backoffice could not be reached.
        let remote = Backoffice::new("http://192.0.2.1:9/RPC2", mid, secret).unwrap();
        let meter = Meter::new(
            cache,
            journal,
            Arc::default(),
            signals,
            Some(Arc::new(remote)),
            ContextLimits::default(),
        )
        .unwrap();
        let call = MeterCall::GrantPassword {
            cid: Cid::parse("B1-C4").unwrap(),
            password: Password("pw".into()),
            machine_wide: false,
            expires_in_s: None,
        };
        let fault = meter
            .call(&peer(1000, &[20], false), call)
            .await
            .unwrap_err();
        assert_eq!(fault.registered(), Some(FaultCode::GrantFailed));
        assert!(fault.message.contains("plain http"), "{}", fault.message);
        assert!(
            fault
                .message
                .contains("`meterd grant B1-C4` (without --password-stdin)"),
            "{}",
            fault.message
        );
        assert!(
            fault.message.contains("nothing was sent"),
            "{}",
            fault.message
        );
    }

    #[tokio::test]
    async fn grants_need_a_backoffice_and_only_root_asks_for_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        let meter = meter(dir.path());
        let cid = Cid::parse("B1-C4").unwrap();
        let bob = peer(1000, &[20], false);
        let root = peer(0, &[20], false);
        let outcome = meter
            .call(
                &bob,
                MeterCall::GrantStart {
                    cid,
                    machine_wide: true,
                },
            )
            .await;
        assert_eq!(fault_of(outcome), Some(FaultCode::InvalidParams));
        let outcome = meter
            .call(
                &root,
                MeterCall::GrantPassword {
                    cid,
                    password: Password("pw".into()),
                    machine_wide: true,
                    expires_in_s: None,
                },
            )
            .await;
        assert_eq!(
            fault_of(outcome),
            Some(FaultCode::GrantFailed),
            "no backoffice"
        );
        let outcome = meter
            .call(
                &bob,
                MeterCall::GrantWait {
                    request: "00".into(),
                },
            )
            .await;
        assert_eq!(fault_of(outcome), Some(FaultCode::GrantFailed));
    }
}
