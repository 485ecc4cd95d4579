//! The backoffice's HTTP listener: every connection counted against a
//! total and a per-address limit, and timed in every phase of a request, so
//! that silent, slow or idle connections cannot hold the server's file
//! descriptors and lock out meters and customers.
//!
//! | phase | bound |
//! | --- | --- |
//! | connections at once | `ConnectionLimits::total` (at most the open-file limit less a reserve) |
//! | connections at once from one address (IPv6: one /64) | `ConnectionLimits::per_address` |
//! | a new connection's first request head, and an idle keep-alive connection's next | `ConnectionLimits::header_read` |
//! | a request's body once its head is in | `ConnectionLimits::body_read` (`/RPC2`), `ConnectionLimits::request` (pages) |
//! | a page's whole request, body and handler | `ConnectionLimits::request` |
//!
//! A connection over a limit is closed at once, before anything is read.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Most connections served at once (lowered to the open-file limit less
/// `FILES_RESERVED`).
pub const CONNECTIONS_MAX: usize = 4_096;
/// Most connections served at once from one address (one /64 for IPv6).
pub const CONNECTIONS_PER_ADDRESS_MAX: usize = 64;
/// Most meter calls (uploads and grant calls) read and answered at once for
/// one address (one /64 for IPv6): a meter makes one at a time, and anyone
/// who knows a MID (they are not secret) must not take every slot.
pub const METER_CALLS_PER_ADDRESS_MAX: usize = 2;
/// File descriptors kept for the store, the log and the rest.
pub const FILES_RESERVED: usize = 128;
/// How long a connection may take to send a request's head, counted from
/// when it is ready for one: a new connection and an idle keep-alive one.
pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// How long a web page's whole request may take, body and handler.
pub const REQUEST_TIMEOUT_MS: u64 = 60_000;

/// The listener's bounds; `Default` is the documented values above.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections at once.
    pub total: usize,
    /// Connections at once from one address.
    pub per_address: usize,
    /// Meter calls at once from one address (`METER_CALLS_PER_ADDRESS_MAX`).
    pub meter_calls_per_address: usize,
    /// See `HEADER_READ_TIMEOUT_MS`.
    pub header_read: Duration,
    /// See `REQUEST_TIMEOUT_MS`.
    pub request: Duration,
    /// See `server::BODY_READ_TIMEOUT_MS`.
    pub body_read: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        let files = open_files_limit().unwrap_or(1_024);
        ConnectionLimits {
            total: CONNECTIONS_MAX.min(files.saturating_sub(FILES_RESERVED).max(16)),
            per_address: CONNECTIONS_PER_ADDRESS_MAX,
            meter_calls_per_address: METER_CALLS_PER_ADDRESS_MAX,
            header_read: Duration::from_millis(HEADER_READ_TIMEOUT_MS),
            request: Duration::from_millis(REQUEST_TIMEOUT_MS),
            body_read: Duration::from_millis(crate::server::BODY_READ_TIMEOUT_MS),
        }
    }
}

/// The soft limit of open files of this process, from `/proc`.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Where a connection counts: its IPv4 address, or the /64 of its IPv6 one
/// (one host commonly holds a whole /64).
pub(crate) fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// Things held per address (one /64 for IPv6), each address at most
/// `limit` at once.
pub(crate) struct PerAddress {
    limit: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One thing `PerAddress` counts; given back when dropped.
pub(crate) struct AddressHold {
    of: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    pub(crate) fn new(limit: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            limit,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// One more for `address`, unless it holds its limit already.
    pub(crate) fn take(self: &Arc<Self>, address: IpAddr) -> Option<AddressHold> {
        let key = address_key(address);
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = held.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(AddressHold {
            of: Arc::clone(self),
            key,
        })
    }
}

impl Drop for AddressHold {
    fn drop(&mut self) {
        let mut held = self
            .of
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Connections held now: in all, and per address through `PerAddress`.
struct Table {
    total: Mutex<usize>,
    limit: usize,
    by_address: Arc<PerAddress>,
}

impl Table {
    fn new(limits: &ConnectionLimits) -> Arc<Table> {
        Arc::new(Table {
            total: Mutex::new(0),
            limit: limits.total,
            by_address: PerAddress::new(limits.per_address),
        })
    }
}

/// One admitted connection; leaves the table (and its address's count)
/// when dropped.
struct Admitted {
    table: Arc<Table>,
    _address: AddressHold,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        *self
            .table
            .total
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) -= 1;
    }
}

fn admit(table: &Arc<Table>, peer: SocketAddr) -> Result<Admitted, &'static str> {
    let mut total = table
        .total
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if *total >= table.limit {
        return Err("too many connections");
    }
    let address = table
        .by_address
        .take(peer.ip())
        .ok_or("too many connections from this address")?;
    *total += 1;
    Ok(Admitted {
        table: Arc::clone(table),
        _address: address,
    })
}

/// A TLS acceptor from a PEM certificate chain and a PEM private key
/// (PKCS#8, PKCS#1 or SEC1), offering HTTP/1.1.
pub fn tls_acceptor(
    certificate: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("{}: {error}", certificate.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", certificate.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|error| format!("{}: {error}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| error.to_string())?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|error| format!("the certificate and key do not make a TLS identity: {error}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// How a request came: over TLS or plain TCP. Every request served by
/// [`serve`] carries it as an extension, beside `ConnectInfo` with the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    /// The connection is TLS (`--tls-listen`).
    pub tls: bool,
}

/// Serves one connection's requests with `router`, the head of each within
/// `limits.header_read`.
async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    transport: Transport,
    router: Router,
    limits: ConnectionLimits,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(transport);
        tower::ServiceExt::oneshot(router.clone(), request)
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(served).await {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// One address the server listens on, plain or TLS.
pub struct Listener {
    /// The bound socket.
    pub socket: TcpListener,
    /// TLS for every connection on it, or none.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serves `router` on every one of `listeners` within `limits` (one table of
/// connections for all of them) until `shutdown` completes, then gives
/// requests in flight `server::SHUTDOWN_GRACE_MS`. A TLS connection's
/// handshake and its first request's head share `limits.header_read`.
pub async fn serve(
    listeners: Vec<Listener>,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let table = Table::new(&limits);
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel(64);
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let accepted_tx = accepted_tx.clone();
            tokio::spawn(async move {
                loop {
                    match listener.socket.accept().await {
                        Ok((stream, peer)) => {
                            if accepted_tx
                                .send((stream, peer, listener.tls.clone()))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(error) => {
                            // Out of file descriptors, say: wait instead of spinning.
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        })
        .collect();
    drop(accepted_tx);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer, tls) = tokio::select! {
            next = accepted.recv() => match next {
                Some(next) => next,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let admitted = match admit(&table, peer) {
            Ok(admitted) => admitted,
            Err(why) => {
                tracing::debug!(%peer, why, "connection closed on accept");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            match tls {
                None => {
                    let plain = Transport { tls: false };
                    serve_connection(stream, peer, plain, router, limits, watcher).await
                }
                Some(tls) => {
                    let started = tokio::time::Instant::now();
                    match tokio::time::timeout(limits.header_read, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            // The handshake's time comes off the first head's.
                            let left = limits.header_read.saturating_sub(started.elapsed());
                            let limits = ConnectionLimits {
                                header_read: left.max(Duration::from_millis(1)),
                                ..limits
                            };
                            let secure = Transport { tls: true };
                            serve_connection(stream, peer, secure, router, limits, watcher).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(admitted);
        });
    }
    for task in accepting {
        task.abort();
    }
    let grace = Duration::from_millis(crate::server::SHUTDOWN_GRACE_MS);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the shutdown grace period; abandoning them");
    }
    Ok(())
}

/// Ends a web page's request that takes longer than `limit` (a body sent
/// slowly, say) with 408.
pub async fn request_deadline(
    limit: Duration,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (
            axum::http::StatusCode::REQUEST_TIMEOUT,
            [(axum::http::header::CONNECTION, "close")],
            "the request took too long\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_count_by_host_and_ipv6_by_its_64() {
        let v6 = |text: &str| address_key(text.parse().unwrap());
        assert_eq!(v6("2001:db8:1:2:aaaa::1"), v6("2001:db8:1:2:bbbb::2"));
        assert_ne!(v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1"));
        assert_eq!(v6("::ffff:192.0.2.1"), v6("192.0.2.1"));
        assert_ne!(v6("192.0.2.1"), v6("192.0.2.2"));
    }

    #[test]
    fn an_address_holds_its_limit_and_gets_each_back() {
        let per_address = PerAddress::new(2);
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let first = per_address.take(ip("192.0.2.1")).unwrap();
        let _second = per_address.take(ip("192.0.2.1")).unwrap();
        assert!(per_address.take(ip("192.0.2.1")).is_none());
        assert!(per_address.take(ip("192.0.2.2")).is_some());
        drop(first);
        assert!(per_address.take(ip("192.0.2.1")).is_some());
    }

    #[test]
    fn a_full_table_or_address_refuses_and_a_closed_connection_frees_its_place() {
        let limits = ConnectionLimits {
            total: 3,
            per_address: 2,
            ..ConnectionLimits::default()
        };
        let table = Table::new(&limits);
        let peer = |text: &str| -> SocketAddr { text.parse().unwrap() };
        let first = admit(&table, peer("192.0.2.1:1")).unwrap();
        let _second = admit(&table, peer("192.0.2.1:2")).unwrap();
        assert!(admit(&table, peer("192.0.2.1:3")).is_err());
        let _third = admit(&table, peer("192.0.2.2:1")).unwrap();
        assert!(admit(&table, peer("192.0.2.3:1")).is_err());
        drop(first);
        assert!(admit(&table, peer("192.0.2.1:4")).is_ok());
    }
}
