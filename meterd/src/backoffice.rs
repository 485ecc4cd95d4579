//! The meter's signed calls to its backoffice over HTTP/1.1: `send` (the
//! uploader) and the grant calls (`grant.request`, `grant.poll`,
//! `grant.password`). Every call's body is signed with the meter's secret in
//! the `X-Meter-*` headers (see `docs/protocol.md`, "Signing").

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use proto::auth::{ANSWER_SIGNATURE_HEADER, MID_HEADER, SIGNATURE_HEADER, Secret, TIME_HEADER};
use proto::xmlrpc::{Limits, MethodResponse, Value, encode_call, parse_response};
use proto::{Fault, Mid};

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
fn unsigned_fault(body: &[u8]) -> String {
    match parse_response(body, Limits::BACKOFFICE) {
        Ok(MethodResponse::Fault(fault)) => format!(" (it says: {fault})"),
        _ => String::new(),
    }
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
    secret: Secret,
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
            secret,
            endpoint,
            tls,
        })
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
    /// there is none. Gives up after `timeout`.
    pub async fn call(
        &self,
        method: &str,
        params: &[Value],
        timeout: Duration,
    ) -> Result<Value, BackofficeError> {
        let body = encode_call(method, params);
        let answer = tokio::time::timeout(timeout, self.post(body))
            .await
            .map_err(|_| {
                BackofficeError::Unreachable(format!("no answer within {} ms", timeout.as_millis()))
            })??;
        match parse_response(&answer, Limits::BACKOFFICE) {
            Ok(MethodResponse::Success(value)) => Ok(value),
            Ok(MethodResponse::Fault(fault)) => Err(BackofficeError::Refused(fault)),
            Err(error) => Err(BackofficeError::BadAnswer(error.to_string())),
        }
    }

    async fn post(&self, body: Vec<u8>) -> Result<Bytes, BackofficeError> {
        let unreachable =
            |error: &dyn std::fmt::Display| BackofficeError::Unreachable(error.to_string());
        let endpoint = &self.endpoint;
        let stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|error| unreachable(&error))?;
        let time_ms = now_ms();
        let signature = self.secret.sign(&self.mid, time_ms, &body);
        let request = Request::post(endpoint.path.as_str())
            .header(HOST, format!("{}:{}", endpoint.host, endpoint.port))
            .header(CONTENT_TYPE, "text/xml")
            .header(MID_HEADER, self.mid.as_str())
            .header(TIME_HEADER, time_ms.to_string())
            .header(SIGNATURE_HEADER, signature.as_str())
            .body(Full::new(Bytes::from(body)))
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
        let verified = answer_signature.as_deref().map(|answer_signature| {
            self.secret
                .verify_answer(&signature, &body, answer_signature)
        });
        match verified {
            Some(Ok(())) => Ok(body),
            Some(Err(error)) => Err(BackofficeError::BadAnswer(format!(
                "the answer's signature ({ANSWER_SIGNATURE_HEADER}) {error}; it was not trusted{}",
                unsigned_fault(&body)
            ))),
            None => Err(BackofficeError::BadAnswer(format!(
                "the answer is not signed ({ANSWER_SIGNATURE_HEADER} missing); it was not trusted{}",
                unsigned_fault(&body)
            ))),
        }
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
        assert!(Endpoint::parse("https://x").is_err());
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
