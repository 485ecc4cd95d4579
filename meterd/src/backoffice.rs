//! The meter's signed calls to its backoffice over HTTP/1.1: `send` (the
//! uploader) and the grant calls (`grant.request`, `grant.poll`,
//! `grant.password`). Every call's body is signed with the meter's secret in
//! the `X-Meter-*` headers (see `docs/protocol.md`, "Signing"). The secret
//! file is read again before a call when its modification time changed,
//! and when the backoffice refuses a signature (fault 202, as after a
//! rotation of the meter's secret; the call, signed anew, is sent once
//! more): replacing the file is enough, no restart.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use proto::auth::{ANSWER_SIGNATURE_HEADER, MID_HEADER, SIGNATURE_HEADER, Secret, TIME_HEADER};
use proto::xmlrpc::{Limits, MethodResponse, Value, encode_call, parse_response};
use proto::{Fault, FaultCode, Mid};

use crate::meter::now_ms;

/// Why a call to the backoffice got no answer it could use.
#[derive(Debug, thiserror::Error)]
pub enum BackofficeError {
    /// The backoffice could not be reached or did not answer in time.
    #[error("backoffice unreachable: {0}")]
    Unreachable(String),
    /// The backoffice answered with something other than a valid answer.
    #[error("bad answer from the backoffice: {0}")]
    BadAnswer(String),
    /// The backoffice answered with a fault.
    #[error("backoffice refused: {0}")]
    Refused(Fault),
}

/// Where the backoffice listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Request path.
    pub path: String,
    /// `https://`: TLS, the backoffice's certificate checked.
    pub tls: bool,
}

impl Endpoint {
    /// Parses `http://HOST[:PORT][/PATH]` or `https://...`; the path
    /// defaults to `/RPC2`, the port to 80 or 443.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (rest, tls) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Err("the URL must start with http:// or https://".into()),
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/RPC2"),
        };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or("unclosed [ in the URL")?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(port) => port.parse().map_err(|_| format!("bad port {port:?}"))?,
            None if tls => 443,
            None => 80,
        };
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        Ok(Endpoint {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
            tls,
        })
    }
}

/// Sends `request` on a fresh connection `io` and returns the answer's head.
async fn send_on<I>(
    io: I,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, BackofficeError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let unreachable =
        |error: &dyn std::fmt::Display| BackofficeError::Unreachable(error.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|error| unreachable(&error))?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|error| unreachable(&error))
}

/// What an answer that is not trusted says, for the log: the backoffice
/// signs no answer to a call it could not verify (an unknown MID, a secret
/// it no longer accepts), so its fault is shown, never acted on.
fn unsigned_fault(body: &[u8]) -> Option<Fault> {
    match parse_response(body, Limits::BACKOFFICE) {
        Ok(MethodResponse::Fault(fault)) => Some(fault),
        _ => None,
    }
}

/// An answer with HTTP status 200.
struct Answer {
    body: Bytes,
    /// Why it is not to be trusted; `None` when the backoffice signed it
    /// for the call it answers.
    distrust: Option<String>,
}

/// True when `host` (a URL's host, IPv6 without brackets) names this
/// machine: `localhost` (or a name under it), an address in 127.0.0.0/8,
/// or `::1` (also written as an IPv4-mapped loopback address). Only then
/// does plain http keep what is sent on the machine.
pub fn is_loopback_host(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(address) => address.to_canonical().is_loopback(),
        Err(_) => false,
    }
}

/// A meter's signed link to its backoffice.
pub struct Backoffice {
    mid: Mid,
    secret: Mutex<Secret>,
    secret_file: Option<SecretFile>,
    endpoint: Endpoint,
    /// For `https://`: the roots its certificate must chain to.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Backoffice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoffice")
            .field("mid", &self.mid)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// The TLS client of an `https://` backoffice: trusting the certificates
/// in `ca_file` (PEM) if given, else the system's roots.
fn tls_connector(ca_file: Option<&std::path::Path>) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certificates: Vec<CertificateDer<'static>> = match ca_file {
        Some(path) => CertificateDer::pem_file_iter(path)
            .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
            .map_err(|error| format!("the CA file {}: {error}", path.display()))?,
        None => rustls_native_certs::load_native_certs().certs,
    };
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(match ca_file {
            Some(path) => format!("the CA file {} holds no usable certificate", path.display()),
            None => "no trusted root certificates found on this system; give the backoffice's CA with --backoffice-ca".into(),
        });
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| error.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// Where the secret was read from, and what it held then.
struct SecretFile {
    path: PathBuf,
    text: Mutex<Option<String>>,
    modified: Mutex<Option<std::time::SystemTime>>,
}

impl std::fmt::Debug for SecretFile {
    /// The path only: the secret is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// When the file at `path` was last modified, if that can be known.
fn modified(path: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path)
        .and_then(|metadata| metadata.modified())
        .ok()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Backoffice {
    /// The backoffice at `url`, called as meter `mid` with `secret`; an
    /// `https://` one is trusted through the system's roots.
    pub fn new(url: &str, mid: Mid, secret: Secret) -> Result<Backoffice, String> {
        Self::with_ca(url, mid, secret, None)
    }

    /// Like `new`; an `https://` backoffice must chain to a certificate in
    /// `ca_file` (PEM) when given, else to the system's roots.
    pub fn with_ca(
        url: &str,
        mid: Mid,
        secret: Secret,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Backoffice, String> {
        let endpoint = Endpoint::parse(url)?;
        let tls = if endpoint.tls {
            Some(tls_connector(ca_file)?)
        } else {
            None
        };
        Ok(Backoffice {
            mid,
            secret: Mutex::new(secret),
            secret_file: None,
            endpoint,
            tls,
        })
    }

    /// Reads the secret again from `path` (where it was read from) when
    /// the backoffice refuses a signature: a rotated secret takes effect
    /// once the file is replaced.
    pub fn rereading(mut self, path: PathBuf) -> Backoffice {
        let text = std::fs::read_to_string(&path)
            .ok()
            .map(|text| text.trim().to_owned());
        let modified = modified(&path);
        self.secret_file = Some(SecretFile {
            path,
            text: Mutex::new(text),
            modified: Mutex::new(modified),
        });
        self
    }

    /// The meter's MID.
    pub fn mid(&self) -> Mid {
        self.mid
    }

    /// Where the backoffice listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Calls `method` with `params`, signed; the answer's value, or why
    /// there is none. Gives up after `timeout`. A call refused for its
    /// signature is sent once more when the secret file holds a new secret.
    pub async fn call(
        &self,
        method: &str,
        params: &[Value],
        timeout: Duration,
    ) -> Result<Value, BackofficeError> {
        let body = Bytes::from(encode_call(method, params));
        self.reread_secret_if_changed();
        let mut reread = false;
        loop {
            let answer = tokio::time::timeout(timeout, self.post(body.clone()))
                .await
                .map_err(|_| {
                    BackofficeError::Unreachable(format!(
                        "no answer within {} ms",
                        timeout.as_millis()
                    ))
                })??;
            if let Some(why) = answer.distrust {
                // The backoffice signs no answer to a call it could not
                // verify: a 202 may mean the secret was rotated. Reading
                // the local file again is all an untrusted answer can
                // cause; anything else it says is only logged.
                let fault = unsigned_fault(&answer.body);
                if !reread
                    && fault.as_ref().and_then(Fault::registered) == Some(FaultCode::BadSignature)
                    && self.reread_secret()
                {
                    reread = true;
                    continue;
                }
                return Err(BackofficeError::BadAnswer(format!(
                    "{why}; it was not trusted{}",
                    fault.map_or_else(String::new, |fault| format!(" (it says: {fault})"))
                )));
            }
            let answer = answer.body;
            match parse_response(&answer, Limits::BACKOFFICE) {
                Ok(MethodResponse::Success(value)) => return Ok(value),
                Ok(MethodResponse::Fault(fault)) => {
                    if !reread
                        && fault.registered() == Some(FaultCode::BadSignature)
                        && self.reread_secret()
                    {
                        reread = true;
                        continue;
                    }
                    return Err(BackofficeError::Refused(fault));
                }
                Err(error) => return Err(BackofficeError::BadAnswer(error.to_string())),
            }
        }
    }

    /// Reads the secret file again when its modification time changed.
    fn reread_secret_if_changed(&self) {
        let Some(file) = &self.secret_file else {
            return;
        };
        let now = modified(&file.path);
        if std::mem::replace(&mut *lock(&file.modified), now) != now {
            self.reread_secret();
        }
    }

    /// Reads the secret file again; true when it holds a new, valid secret,
    /// which signs from now on.
    fn reread_secret(&self) -> bool {
        let Some(file) = &self.secret_file else {
            return false;
        };
        let text = match std::fs::read_to_string(&file.path) {
            Ok(text) => text.trim().to_owned(),
            Err(error) => {
                tracing::warn!(file = %file.path.display(), %error, "cannot read the secret file again");
                return false;
            }
        };
        let mut last = lock(&file.text);
        if last.as_deref() == Some(text.as_str()) {
            return false;
        }
        match Secret::new(text.as_bytes()) {
            Ok(secret) => {
                *lock(&self.secret) = secret;
                *last = Some(text);
                tracing::info!(file = %file.path.display(), "a new secret in the secret file signs from now on");
                true
            }
            Err(error) => {
                tracing::warn!(file = %file.path.display(), %error, "the secret file holds no valid secret; the one before still signs");
                false
            }
        }
    }

    /// Posts a signed call; the answer's body, and whether the backoffice
    /// signed it for this call (`Answer::trusted`).
    async fn post(&self, body: Bytes) -> Result<Answer, BackofficeError> {
        let unreachable =
            |error: &dyn std::fmt::Display| BackofficeError::Unreachable(error.to_string());
        let endpoint = &self.endpoint;
        let stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|error| unreachable(&error))?;
        let time_ms = now_ms();
        // The secret that signs the call checks its answer, even if the
        // secret file is read again meanwhile.
        let secret = lock(&self.secret).clone();
        let signature = secret.sign(&self.mid, time_ms, &body);
        let request = Request::post(endpoint.path.as_str())
            .header(HOST, format!("{}:{}", endpoint.host, endpoint.port))
            .header(CONTENT_TYPE, "text/xml")
            .header(MID_HEADER, self.mid.as_str())
            .header(TIME_HEADER, time_ms.to_string())
            .header(SIGNATURE_HEADER, signature.as_str())
            .body(Full::new(body))
            .map_err(|error| unreachable(&error))?;
        let response = match &self.tls {
            None => send_on(stream, request).await?,
            Some(connector) => {
                let name = rustls_pki_types::ServerName::try_from(endpoint.host.clone())
                    .map_err(|error| unreachable(&error))?;
                let stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|error| unreachable(&format!("TLS: {error}")))?;
                send_on(stream, request).await?
            }
        };
        let status = response.status();
        let answer_signature = response
            .headers()
            .get(ANSWER_SIGNATURE_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(response.into_body(), Limits::BACKOFFICE.body_bytes_max)
            .collect()
            .await
            .map_err(|error| unreachable(&*error))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(BackofficeError::BadAnswer(format!("HTTP status {status}")));
        }
        // Only the backoffice holds this meter's secret: an answer it did not
        // sign for this very call (someone on the path, a replayed answer)
        // changes nothing here, whatever it says.
        let distrust = match answer_signature.as_deref() {
            Some(answer_signature) => secret
                .verify_answer(&signature, &body, answer_signature)
                .err()
                .map(|error| format!("the answer's signature ({ANSWER_SIGNATURE_HEADER}) {error}")),
            None => Some(format!(
                "the answer is not signed ({ANSWER_SIGNATURE_HEADER} missing)"
            )),
        };
        Ok(Answer { body, distrust })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let endpoint = Endpoint::parse("http://127.0.0.1:8080/RPC2").unwrap();
        assert_eq!(
            (
                endpoint.host.as_str(),
                endpoint.port,
                endpoint.path.as_str()
            ),
            ("127.0.0.1", 8080, "/RPC2")
        );
        let endpoint = Endpoint::parse("http://[::1]:9").unwrap();
        assert_eq!(
            (
                endpoint.host.as_str(),
                endpoint.port,
                endpoint.path.as_str()
            ),
            ("::1", 9, "/RPC2")
        );
        let endpoint = Endpoint::parse("http://backoffice.example").unwrap();
        assert_eq!(endpoint.port, 80);
        let tls = Endpoint::parse("https://x").unwrap();
        assert_eq!((tls.host.as_str(), tls.port, tls.tls), ("x", 443, true));
        let tls = Endpoint::parse("https://[::1]/other").unwrap();
        assert_eq!(
            (tls.host.as_str(), tls.port, tls.path.as_str(), tls.tls),
            ("::1", 443, "/other", true)
        );
        assert!(!Endpoint::parse("http://x").unwrap().tls);
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("http://:80/").is_err());
        assert!(Endpoint::parse("http://x:port/").is_err());
    }

    #[test]
    fn only_this_machines_addresses_are_loopback() {
        for host in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "::ffff:127.0.0.1",
            "localhost",
            "LocalHost",
            "localhost.",
            "backoffice.localhost",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "10.0.0.1",
            "128.0.0.1",
            "0.0.0.0",
            "::",
            "::2",
            "fe80::1",
            "backoffice.example",
            "localhost.example",
            "mylocalhost",
            "127.0.0.1.example",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
        // As the meter's settings give it.
        let endpoint = Endpoint::parse("http://[::1]:8080/RPC2").unwrap();
        assert!(is_loopback_host(&endpoint.host));
    }
}
