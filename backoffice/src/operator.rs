//! The operator's client: calls a running backoffice's operator methods
//! over HTTP with the operator token, for the command line and scripts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use proto::Fault;
use proto::xmlrpc::{Limits, MethodResponse, Value, encode_call, parse_response};

use crate::server::OPERATOR_HEADER;

/// How long one call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an operator call failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The URL is not `http://HOST:PORT/PATH`.
    #[error("bad URL {0:?}: expected http://HOST:PORT/RPC2")]
    BadUrl(String),
    /// The backoffice could not be reached.
    #[error("cannot reach the backoffice at {url}: {source}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        source: std::io::Error,
    },
    /// The answer was not a valid XML-RPC response.
    #[error("bad answer from the backoffice: {0}")]
    BadAnswer(String),
    /// The backoffice refused the call.
    #[error("the backoffice refused: {0}")]
    Refused(#[from] Fault),
}

/// Calls `method` with `params` on the backoffice at `url`.
pub fn call(
    url: &str,
    token: &str,
    method: &str,
    params: &[Value],
) -> Result<Value, OperatorError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| OperatorError::BadUrl(url.to_owned()))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "RPC2"), |(a, p)| (a, p));
    let unreachable = |source| OperatorError::Unreachable {
        url: url.to_owned(),
        source,
    };
    let mut stream = TcpStream::connect(authority).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(CALL_TIMEOUT))
        .map_err(unreachable)?;
    let body = encode_call(method, params);
    let head = format!(
        "POST /{path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: text/xml\r\n{OPERATOR_HEADER}: {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(unreachable)?;
    stream.write_all(&body).map_err(unreachable)?;
    let mut response = Vec::new();
    stream
        .take(u64::try_from(Limits::BACKOFFICE.body_bytes_max).unwrap_or(u64::MAX))
        .read_to_end(&mut response)
        .map_err(unreachable)?;
    let head_end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| OperatorError::BadAnswer("no HTTP response head".into()))?;
    match parse_response(&response[head_end + 4..], Limits::BACKOFFICE) {
        Ok(MethodResponse::Success(value)) => Ok(value),
        Ok(MethodResponse::Fault(fault)) => Err(OperatorError::Refused(fault)),
        Err(error) => Err(OperatorError::BadAnswer(error.to_string())),
    }
}
