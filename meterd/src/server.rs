//! The meter's XML-RPC server: HTTP/1.1 on a Unix socket, one task per
//! connection, the caller identified by the socket's peer credentials.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use proto::meter_api::MeterCall;
use proto::xmlrpc::{Limits, encode_fault, encode_response, parse_call};
use proto::{Fault, FaultCode};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::meter::{Meter, Peer};
use crate::procinfo;

/// Most connections served at once; more are closed on accept.
pub const CONNECTIONS_MAX: usize = 1024;
/// How long calls in flight may take to finish after shutdown begins.
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

async fn answer(
    meter: Arc<Meter>,
    peer: Arc<Peer>,
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
    let body = match limited.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let fault = Fault::new(
                FaultCode::RequestTooLarge,
                format!("request body over {} bytes", LIMITS.body_bytes_max),
            );
            return Ok(xml(StatusCode::PAYLOAD_TOO_LARGE, encode_fault(&fault)));
        }
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

/// Serves `meter` on `listener` until `shutdown` completes, then gives calls
/// in flight `SHUTDOWN_GRACE_MS` to finish.
pub async fn run(listener: UnixListener, meter: Arc<Meter>, shutdown: impl Future<Output = ()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(
                limit = CONNECTIONS_MAX,
                "connection refused: too many connections"
            );
            continue;
        };
        let peer = Arc::new(peer_of(&stream, &meter.proc_root));
        let connection = peer.connection;
        let service_meter = Arc::clone(&meter);
        let service = service_fn(move |request| {
            answer(Arc::clone(&service_meter), Arc::clone(&peer), request)
        });
        let served = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let served = graceful.watch(served);
        let meter = Arc::clone(&meter);
        tokio::spawn(async move {
            if let Err(error) = served.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            meter.forget_connection(connection);
            drop(permit);
        });
    }
    let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("calls still in flight after the shutdown grace period; abandoning them");
    }
}
