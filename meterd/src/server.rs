//! The meter's XML-RPC server: HTTP/1.1 on a Unix socket, one task per
//! connection, the caller identified by the socket's peer credentials.
//!
//! Every connection is bounded in time: a request's head must arrive whole
//! within `HEADER_READ_TIMEOUT_MS` of the connection's start or of the
//! previous answer (so this is also the idle keep-alive timeout), and its
//! body within `BODY_READ_TIMEOUT_MS`. And a full connection table never
//! locks callers out: a new connection closes the connection that has waited
//! longest without a call in progress (idle, or sending its request slowly),
//! so silent or half-sent connections, however many, cannot keep an honest
//! caller from being served.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use proto::meter_api::MeterCall;
use proto::xmlrpc::{Limits, encode_fault, encode_response, parse_call};
use proto::{Fault, FaultCode};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::meter::{Meter, Peer};
use crate::procinfo;

/// Most connections served at once (fewer when the process may not open
/// that many files: see `connections_max`). A new connection beyond it
/// closes the one that has waited longest without a call in progress; only
/// when every connection is in a call is it refused.
pub const CONNECTIONS_MAX: usize = 1024;
/// File descriptors kept for the cache, the journal and the uploader when
/// the open-files limit is what bounds the connections.
pub const FDS_RESERVED: usize = 64;
/// How long a request's head may take to arrive whole, counted from the
/// connection's start or from the answer to its previous call: the header
/// read timeout and the idle keep-alive timeout in one.
pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// How long a request's body may take to arrive whole once its head has.
pub const BODY_READ_TIMEOUT_MS: u64 = 10_000;
/// A connection that answered a call less than this ago is never closed to
/// make room (nor at once at shutdown): its answer may not have left yet,
/// and a client that finds its kept-alive connection closed with nothing
/// read sends the call again, which must never happen to a call that was
/// made.
pub const ANSWERED_KEPT_MS: u64 = 1_000;
/// How long calls in flight may take to finish after shutdown begins;
/// connections without a call in progress are closed at once.
pub const SHUTDOWN_GRACE_MS: u64 = 5_000;
/// The request limits of the meter's API.
pub const LIMITS: Limits = Limits::METER_API;

static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

fn peer_of(stream: &UnixStream, proc_root: &Path) -> Peer {
    let connection = CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1;
    let credentials = stream.peer_cred().ok();
    let uid = credentials.as_ref().map(|credentials| credentials.uid());
    let pid = credentials
        .and_then(|credentials| credentials.pid())
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid != 0);
    let lineage = pid.map_or_else(procinfo::Lineage::default, |pid| {
        procinfo::lineage(proc_root, pid, uid)
    });
    Peer {
        lineage: lineage.processes,
        parent_is_other_user: lineage.stopped_at_other_user,
        uid,
        connection,
    }
}

fn xml(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/xml")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn close_after(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert(CONNECTION, hyper::header::HeaderValue::from_static("close"));
    response
}

async fn answer(
    meter: Arc<Meter>,
    peer: Arc<Peer>,
    connections: Arc<Connections>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::POST {
        let fault = Fault::new(FaultCode::InvalidRequest, "XML-RPC calls are POST requests");
        return Ok(xml(StatusCode::METHOD_NOT_ALLOWED, encode_fault(&fault)));
    }
    // A body of unstated length would be read as empty and answered with a
    // parse fault that hides the cause: say what is missing.
    let headers = request.headers();
    if !headers.contains_key(hyper::header::CONTENT_LENGTH)
        && !headers.contains_key(hyper::header::TRANSFER_ENCODING)
    {
        let fault = Fault::new(
            FaultCode::InvalidRequest,
            "a call needs a Content-Length header (or a chunked body)",
        );
        return Ok(xml(StatusCode::LENGTH_REQUIRED, encode_fault(&fault)));
    }
    let limited = Limited::new(request.into_body(), LIMITS.body_bytes_max);
    let deadline = Duration::from_millis(BODY_READ_TIMEOUT_MS);
    let body = match tokio::time::timeout(deadline, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => {
            let fault = Fault::new(
                FaultCode::RequestTooLarge,
                format!("request body over {} bytes", LIMITS.body_bytes_max),
            );
            return Ok(xml(StatusCode::PAYLOAD_TOO_LARGE, encode_fault(&fault)));
        }
        Err(_) => {
            let fault = Fault::new(
                FaultCode::InvalidRequest,
                format!("the request body did not arrive within {BODY_READ_TIMEOUT_MS} ms"),
            );
            return Ok(close_after(xml(
                StatusCode::REQUEST_TIMEOUT,
                encode_fault(&fault),
            )));
        }
    };
    // From here the connection is in a call: it is no longer closed to make
    // room for others, nor at shutdown before the grace period ends.
    let Some(_call) = connections.begin_call(peer.connection) else {
        let fault = Fault::new(FaultCode::InvalidRequest, "the connection is closing");
        return Ok(close_after(xml(
            StatusCode::SERVICE_UNAVAILABLE,
            encode_fault(&fault),
        )));
    };
    let outcome = match parse_call(&body, LIMITS).map_err(Fault::from) {
        Ok(call) => match MeterCall::from_call(&call) {
            Ok(call) => meter.call(&peer, call).await,
            Err(fault) => Err(fault),
        },
        Err(fault) => Err(fault),
    };
    let body = match outcome {
        Ok(value) => encode_response(&value),
        Err(fault) => encode_fault(&fault),
    };
    Ok(xml(StatusCode::OK, body))
}

/// The connections being served, for choosing which to close.
#[derive(Debug)]
pub struct Connections {
    table: Mutex<Table>,
    max: usize,
    answered_kept: Duration,
}

#[derive(Debug, Default)]
struct Table {
    slots: HashMap<u64, Slot>,
    /// Counts events, so that slots can be ordered by their last one.
    clock: u64,
    /// Shutdown has begun: no new calls.
    closing: bool,
}

#[derive(Debug)]
struct Slot {
    /// A call is in progress (its request read, its answer not yet made).
    busy: bool,
    /// When the slot last began to wait: admitted, or a call answered.
    waiting_since: u64,
    /// When its last call was answered, if it made one.
    answered_at: Option<Instant>,
    /// Told to close the connection.
    close: Arc<Notify>,
}

/// A call in progress; ends it when dropped (also when the call is
/// abandoned).
#[derive(Debug)]
pub struct Call<'a> {
    connections: &'a Connections,
    connection: u64,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        let mut table = self.connections.lock();
        table.clock += 1;
        let now = table.clock;
        if let Some(slot) = table.slots.get_mut(&self.connection) {
            slot.busy = false;
            slot.waiting_since = now;
            slot.answered_at = Some(Instant::now());
        }
    }
}

/// What became of a new connection.
#[derive(Debug)]
pub enum Admission {
    /// Served; close it when this is notified.
    Admitted(Arc<Notify>),
    /// Every connection is in a call or just answered one: refused.
    Full,
}

impl Connections {
    /// A table of at most `max` connections.
    pub fn new(max: usize) -> Connections {
        Connections::keeping_answered(max, Duration::from_millis(ANSWERED_KEPT_MS))
    }

    /// A table of at most `max` connections that keeps those that answered
    /// a call less than `answered_kept` ago.
    pub fn keeping_answered(max: usize, answered_kept: Duration) -> Connections {
        Connections {
            table: Mutex::new(Table::default()),
            max: max.max(1),
            answered_kept,
        }
    }

    /// May `slot` be closed now: no call in progress, and no answer that
    /// may still be on its way.
    fn closable(&self, slot: &Slot, now: Instant) -> bool {
        !slot.busy
            && slot
                .answered_at
                .is_none_or(|answered| now.duration_since(answered) >= self.answered_kept)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many connections are served.
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// True when no connection is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits `connection`, closing the longest-waiting connection without a
    /// call in progress when the table is full.
    pub fn admit(&self, connection: u64) -> Admission {
        let mut table = self.lock();
        if table.closing {
            return Admission::Full;
        }
        if table.slots.len() >= self.max && !self.evict_oldest_waiting(&mut table) {
            return Admission::Full;
        }
        table.clock += 1;
        let close = Arc::new(Notify::new());
        let slot = Slot {
            busy: false,
            waiting_since: table.clock,
            answered_at: None,
            close: Arc::clone(&close),
        };
        table.slots.insert(connection, slot);
        Admission::Admitted(close)
    }

    /// Closes the connection that has waited longest without a call in
    /// progress (or an answer just made); false when there is none.
    pub fn evict_oldest(&self) -> bool {
        self.evict_oldest_waiting(&mut self.lock())
    }

    fn evict_oldest_waiting(&self, table: &mut Table) -> bool {
        let now = Instant::now();
        let oldest = table
            .slots
            .iter()
            .filter(|(_, slot)| self.closable(slot, now))
            .min_by_key(|(_, slot)| slot.waiting_since)
            .map(|(connection, _)| *connection);
        let Some(connection) = oldest else {
            return false;
        };
        if let Some(slot) = table.slots.remove(&connection) {
            slot.close.notify_one();
        }
        true
    }

    /// Marks `connection` as in a call until the returned guard drops;
    /// `None` when it is being closed (made room for, or shutdown).
    pub fn begin_call(&self, connection: u64) -> Option<Call<'_>> {
        let mut table = self.lock();
        if table.closing {
            return None;
        }
        let slot = table.slots.get_mut(&connection)?;
        slot.busy = true;
        Some(Call {
            connections: self,
            connection,
        })
    }

    /// True while `connection` is served (not closed to make room).
    pub fn serves(&self, connection: u64) -> bool {
        self.lock().slots.contains_key(&connection)
    }

    /// Forgets a connection that ended.
    pub fn remove(&self, connection: u64) {
        self.lock().slots.remove(&connection);
    }

    /// Shutdown: no new calls, and every connection neither in a call nor
    /// just answered is closed (the rest close once their answer is out).
    pub fn close_waiting(&self) {
        let now = Instant::now();
        let mut table = self.lock();
        table.closing = true;
        table.slots.retain(|_, slot| {
            if !self.closable(slot, now) {
                return true;
            }
            slot.close.notify_one();
            false
        });
    }
}

/// How many connections may be served at once: `CONNECTIONS_MAX`, or fewer
/// when the open-files limit (`/proc/self/limits`) leaves less room after
/// `FDS_RESERVED`.
pub fn connections_max() -> usize {
    let soft_limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| open_files_limit(&limits));
    match soft_limit {
        Some(limit) => CONNECTIONS_MAX.min(limit.saturating_sub(FDS_RESERVED).max(16)),
        None => CONNECTIONS_MAX,
    }
}

/// The soft limit on open files in the text of `/proc/self/limits`.
fn open_files_limit(limits: &str) -> Option<usize> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_ascii_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(usize::MAX);
    }
    soft.parse().ok()
}

fn out_of_descriptors(error: &std::io::Error) -> bool {
    // EMFILE (24) and ENFILE (23).
    matches!(error.raw_os_error(), Some(23 | 24))
}

/// Serves `meter` on `listener` until `shutdown` completes; then closes the
/// connections without a call in progress, gives calls in flight
/// `SHUTDOWN_GRACE_MS` to finish, and abandons the rest.
pub async fn run(listener: UnixListener, meter: Arc<Meter>, shutdown: impl Future<Output = ()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(Connections::new(connections_max()));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) if out_of_descriptors(&error) => {
                    // Make room by closing the longest-waiting connection;
                    // its descriptor is freed once its task sees that.
                    let evicted = connections.evict_oldest();
                    tracing::warn!(%error, evicted, "accept failed: out of file descriptors");
                    let pause = if evicted { 1 } else { 50 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let peer = Arc::new(peer_of(&stream, &meter.proc_root));
        let connection = peer.connection;
        let close = match connections.admit(connection) {
            Admission::Admitted(close) => close,
            Admission::Full => {
                tracing::warn!(
                    limit = connections.max,
                    "connection refused: every connection is in a call or has just answered one"
                );
                continue;
            }
        };
        let service_meter = Arc::clone(&meter);
        let service_connections = Arc::clone(&connections);
        let service = service_fn(move |request| {
            answer(
                Arc::clone(&service_meter),
                Arc::clone(&peer),
                Arc::clone(&service_connections),
                request,
            )
        });
        let served = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS))
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let served = graceful.watch(served);
        let meter = Arc::clone(&meter);
        let connections = Arc::clone(&connections);
        tasks.spawn(async move {
            tokio::select! {
                outcome = served => {
                    if let Err(error) = outcome {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                () = close.notified() => {
                    tracing::debug!(connection, "connection closed to make room or at shutdown");
                }
            }
            connections.remove(connection);
            meter.forget_connection(connection);
        });
    }
    // Connections waiting for a request have nothing to lose: close them
    // now, and let calls in flight finish within the grace period.
    connections.close_waiting();
    let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("calls still in flight after the shutdown grace period; abandoning them");
    }
    // Abandoned connections must not keep the meter (and so the journal)
    // alive past the grace period.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_closes_the_longest_waiting_connection_never_one_in_a_call() {
        let connections = Connections::keeping_answered(3, Duration::ZERO);
        let mut closers = Vec::new();
        for connection in 1..=3 {
            match connections.admit(connection) {
                Admission::Admitted(close) => closers.push(close),
                Admission::Full => panic!("room for {connection}"),
            }
        }
        // 1 is in a call; 2 answered a call since 3 arrived.
        let call = connections.begin_call(1).expect("1 may call");
        drop(connections.begin_call(2).expect("2 may call"));
        assert!(matches!(connections.admit(4), Admission::Admitted(_)));
        assert_eq!(connections.len(), 3);
        assert!(connections.begin_call(3).is_none(), "3 was closed");
        assert!(connections.serves(2), "2 is kept");
        // Next the oldest waiting is 2 (1 is still in its call).
        assert!(matches!(connections.admit(5), Admission::Admitted(_)));
        assert!(connections.begin_call(2).is_none(), "2 was closed");
        let _four = connections.begin_call(4).expect("4 may call");
        let _five = connections.begin_call(5).expect("5 may call");
        assert!(
            matches!(connections.admit(6), Admission::Full),
            "every connection is in a call"
        );
        drop(call);
        assert!(matches!(connections.admit(6), Admission::Admitted(_)));
        assert!(connections.begin_call(1).is_none(), "1, done, was closed");
    }

    #[test]
    fn a_connection_that_just_answered_is_not_closed_before_its_answer_is_out() {
        let connections = Connections::new(2);
        let _first = connections.admit(1);
        let _second = connections.admit(2);
        let call = connections.begin_call(1).expect("1 calls");
        drop(call);
        let _busy = connections.begin_call(2).expect("2 calls");
        assert!(
            matches!(connections.admit(3), Admission::Full),
            "1 answered just now, 2 is in a call"
        );
        connections.close_waiting();
        assert!(connections.serves(1), "kept at shutdown too");
    }

    #[test]
    fn shutdown_closes_the_waiting_and_keeps_calls_in_flight() {
        let connections = Connections::keeping_answered(8, Duration::ZERO);
        let Admission::Admitted(waiting) = connections.admit(1) else {
            panic!("admitted")
        };
        let _admitted = connections.admit(2);
        let call = connections.begin_call(2).expect("2 calls");
        connections.close_waiting();
        assert_eq!(connections.len(), 1, "only the call in flight is left");
        let closed = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(1), waiting.notified()).await
            });
        assert!(closed.is_ok(), "the waiting connection was told to close");
        assert!(connections.begin_call(2).is_none(), "no new calls");
        drop(call);
        assert!(matches!(connections.admit(3), Admission::Full));
    }

    #[test]
    fn the_open_files_limit_bounds_the_connections() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63460                63460                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(open_files_limit(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(open_files_limit(unlimited), Some(usize::MAX));
        assert_eq!(open_files_limit("nothing here"), None);
    }
}
