//! The client library: what a metered Rust program links to talk to its meter.
//! Blocking, one keep-alive connection per `Meter`, no async runtime needed.
//!
//! ```no_run
//! use meterd::client::Meter;
//! use proto::Pid;
//!
//! let product = Pid::parse("B1-P7").unwrap();
//! let mut meter = Meter::connect_default();
//! if let Some(mut usage) = meter.begin(product) {
//!     // ... do the metered work; components may call usage.meter() ...
//!     usage.commit().expect("use recorded");
//! }
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::grant::{GrantInfo, PollStatus};
use proto::meter_api::{GrantStarted, MeterCall, Password, grants_from_value};
use proto::xmlrpc::{Limits, MethodResponse, Value, encode_call, parse_response};
use proto::{Cid, Context, Fault, Pid};

/// How long a call may take; `flush` waits up to 30 s for an upload, and
/// `grant.wait` up to 25 s for the customer plus one call to the backoffice.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(40);
/// Largest response accepted, in bytes.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// How long a call answered from memory (`query`, `login`, ...) polls for
/// its answer before sleeping in `read`. On the virtual machines we measure
/// on, waking a thread that slept costs about 30 us, more than the meter
/// needs to answer; polling this briefly keeps the round trip near the
/// meter's own work. Calls that wait for a disk (`commit`, `flush`) sleep at
/// once, so as not to take a core from the meter.
pub const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(100);

/// Why a call did not get an answer from the meter.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No meter answered at the socket.
    #[error("no meter at {path}: {source}")]
    Unavailable {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The socket belongs to a user the client does not trust to be its
    /// meter (`socket::check_owner`).
    #[error("{0}")]
    Untrusted(#[from] crate::socket::Untrusted),
    /// The meter answered something that is not a valid response.
    #[error("bad answer from the meter: {0}")]
    Protocol(String),
    /// The meter refused the call.
    #[error("the meter refused: {0}")]
    Fault(#[from] Fault),
}

/// A connection to the meter.
#[derive(Debug)]
pub struct Meter {
    path: PathBuf,
    context: Option<Context>,
    stream: Option<UnixStream>,
}

impl Meter {
    /// A meter at `path`. Connects on the first call (and reconnects when the
    /// meter restarts or closed an idle connection), so this never fails.
    /// Every connection is made only to a socket whose owner is this user,
    /// root, `$METERD_SOCKET_OWNER`, or the owner of a directory only root
    /// could have made (`socket::check_owner`); otherwise calls fail with
    /// `ClientError::Untrusted` (and `query` answers false).
    pub fn connect(path: impl Into<PathBuf>) -> Meter {
        Meter {
            path: path.into(),
            context: None,
            stream: None,
        }
    }

    /// A meter at the default socket path (`$METERD_SOCKET`, else
    /// `$XDG_RUNTIME_DIR/meterd.sock`, else `/run/meterd/meterd.sock`).
    pub fn connect_default() -> Meter {
        Meter::connect(crate::default_socket_path(|key| std::env::var(key).ok()))
    }

    /// Makes every call in `context`, a name for this thread or task (see
    /// the context model in `docs/meterd.md`).
    pub fn with_context(mut self, context: Context) -> Meter {
        self.context = Some(context);
        self
    }

    /// Makes the calls from now on in `context`, or in the process's own
    /// context for `None` (what `with_context` does, on a meter in use).
    pub fn set_context(&mut self, context: Option<Context>) {
        self.context = context;
    }

    /// Closes the connection; the next call makes a new one. For a caller
    /// that cannot tell whether a call was cut off between its request and
    /// its answer (the next call must not read that answer as its own).
    pub fn disconnect(&mut self) {
        self.stream = None;
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `login(CID)`: this context's uses are charged to `cid` until `logout`.
    pub fn login(&mut self, cid: Cid) -> Result<(), ClientError> {
        let context = self.context.clone();
        self.call(&MeterCall::Login { cid, context }).map(drop)
    }

    /// `logout(CID)`: true when a login of `cid` was open.
    pub fn logout(&mut self, cid: Cid) -> Result<bool, ClientError> {
        let context = self.context.clone();
        self.call_bool(&MeterCall::Logout { cid, context })
    }

    /// `query(PID)`: may a use begin? False whenever the meter cannot be
    /// asked (fail closed). Prefer `begin`, which never leaves a query open.
    pub fn query(&mut self, pid: Pid) -> bool {
        self.try_query(pid).unwrap_or(false)
    }

    /// `query(PID)`, with the reason when there was no answer.
    pub fn try_query(&mut self, pid: Pid) -> Result<bool, ClientError> {
        let context = self.context.clone();
        self.call_bool(&MeterCall::Query { pid, context })
    }

    /// `commit(PID)`: the use happened. Returns once it is durable.
    pub fn commit(&mut self, pid: Pid) -> Result<(), ClientError> {
        let context = self.context.clone();
        self.call(&MeterCall::Commit { pid, context }).map(drop)
    }

    /// `cancel(PID)`: closes an open query without a use.
    pub fn cancel(&mut self, pid: Pid) -> Result<bool, ClientError> {
        let context = self.context.clone();
        self.call_bool(&MeterCall::Cancel { pid, context })
    }

    /// `flush()`: upload now; true when the upload succeeded.
    pub fn flush(&mut self) -> Result<bool, ClientError> {
        self.call_bool(&MeterCall::Flush)
    }

    /// `status()`: the meter's state.
    pub fn status(&mut self) -> Result<Value, ClientError> {
        self.call(&MeterCall::Status)
    }

    /// `grant.start(CID, machineWide)`: asks the backoffice, through the
    /// meter, for a code with which `cid` grants this meter to charge them
    /// for this user's uses (for root with `machine_wide`, every user's).
    /// Show the customer the code and the page, then call `grant_wait`.
    pub fn grant_start(
        &mut self,
        cid: Cid,
        machine_wide: bool,
    ) -> Result<GrantStarted, ClientError> {
        let value = self.call(&MeterCall::GrantStart { cid, machine_wide })?;
        GrantStarted::from_value(&value).map_err(|fault| ClientError::Protocol(fault.message))
    }

    /// `grant.wait(request)`: waits a bounded time (about 25 s) for the
    /// customer's answer; call again while it answers `Pending`. On
    /// `Approved` the meter holds the grant.
    pub fn grant_wait(&mut self, request: &str) -> Result<PollStatus, ClientError> {
        let value = self.call(&MeterCall::GrantWait {
            request: request.to_owned(),
        })?;
        PollStatus::from_value(&value).map_err(|fault| ClientError::Protocol(fault.message))
    }

    /// `grant.password(CID, password, machineWide[, expiresInS])`: grants
    /// with the customer's password; the meter holds the grant it answers.
    pub fn grant_password(
        &mut self,
        cid: Cid,
        password: &str,
        machine_wide: bool,
        expires_in_s: Option<u64>,
    ) -> Result<GrantInfo, ClientError> {
        let value = self.call(&MeterCall::GrantPassword {
            cid,
            password: Password(password.to_owned()),
            machine_wide,
            expires_in_s,
        })?;
        GrantInfo::from_value(&value).map_err(|fault| ClientError::Protocol(fault.message))
    }

    /// `grant.list()`: the grants the meter holds that admit this user
    /// (every grant, for root).
    pub fn grants(&mut self) -> Result<Vec<GrantInfo>, ClientError> {
        let value = self.call(&MeterCall::GrantList)?;
        grants_from_value(&value).map_err(|fault| ClientError::Protocol(fault.message))
    }

    /// Queries `pid` and, when the use may begin, returns a guard that
    /// commits it with `Use::commit` or cancels it when dropped. `None` when
    /// the use may not begin or no meter answered.
    pub fn begin(&mut self, pid: Pid) -> Option<Use<'_>> {
        self.query(pid).then_some(Use {
            meter: self,
            pid,
            finished: false,
        })
    }

    fn call_bool(&mut self, call: &MeterCall) -> Result<bool, ClientError> {
        match self.call(call)? {
            Value::Bool(answer) => Ok(answer),
            other => Err(ClientError::Protocol(format!(
                "expected a boolean, got a {}",
                other.type_name()
            ))),
        }
    }

    /// Sends one call; on a kept-alive connection that turns out closed (the
    /// meter restarted) it reconnects and sends once more.
    pub fn call(&mut self, call: &MeterCall) -> Result<Value, ClientError> {
        let (name, params) = call.to_call();
        let body = encode_call(name, &params);
        let reused = self.stream.is_some();
        let poll = match call {
            MeterCall::Commit { .. }
            | MeterCall::Flush
            | MeterCall::GrantStart { .. }
            | MeterCall::GrantWait { .. }
            | MeterCall::GrantPassword { .. } => Duration::ZERO,
            _ => POLL_BEFORE_SLEEP,
        };
        match self.exchange(&body, poll) {
            Err(Exchange::Closed(_)) if reused => {
                self.stream = None;
                self.exchange(&body, poll)
            }
            other => other,
        }
        .map_err(|failure| {
            self.stream = None;
            match failure {
                Exchange::Closed(source) | Exchange::Io(source) => ClientError::Unavailable {
                    path: self.path.clone(),
                    source,
                },
                Exchange::Protocol(message) => ClientError::Protocol(message),
                Exchange::Untrusted(untrusted) => ClientError::Untrusted(untrusted),
            }
        })
        .and_then(|response| match response {
            MethodResponse::Success(value) => Ok(value),
            MethodResponse::Fault(fault) => Err(ClientError::Fault(fault)),
        })
    }

    /// The connection, made anew when there is none, to a socket whose
    /// owner the client trusts.
    fn stream(&mut self) -> Result<&mut UnixStream, Exchange> {
        if self.stream.is_none() {
            crate::socket::check_owner_for_this_process(&self.path).map_err(Exchange::Untrusted)?;
            let connect = || -> std::io::Result<UnixStream> {
                let stream = UnixStream::connect(&self.path)?;
                stream.set_read_timeout(Some(CALL_TIMEOUT))?;
                stream.set_write_timeout(Some(CALL_TIMEOUT))?;
                Ok(stream)
            };
            self.stream = Some(connect().map_err(Exchange::Io)?);
        }
        Ok(self.stream.as_mut().expect("just connected"))
    }

    fn exchange(&mut self, body: &[u8], poll: Duration) -> Result<MethodResponse, Exchange> {
        let stream = self.stream()?;
        let head = format!(
            "POST /RPC2 HTTP/1.1\r\nHost: meterd\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut request = Vec::with_capacity(head.len() + body.len());
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(body);
        stream.write_all(&request).map_err(Exchange::Closed)?;
        let response = read_response(stream, poll)?;
        parse_response(&response, Limits::METER_API)
            .map_err(|error| Exchange::Protocol(error.to_string()))
    }
}

enum Exchange {
    /// Nothing came back: the connection was closed (safe to resend).
    Closed(std::io::Error),
    /// The connection failed part-way.
    Io(std::io::Error),
    /// Something came back that is not a valid answer.
    Protocol(String),
    /// The socket's owner is not trusted: nothing was sent.
    Untrusted(crate::socket::Untrusted),
}

/// Waits up to `poll` for the first bytes of an answer without sleeping.
/// Returns how many bytes it read into `chunk` (0: none yet, sleep in `read`).
fn poll_answer(
    stream: &mut UnixStream,
    chunk: &mut [u8],
    poll: Duration,
) -> Result<usize, Exchange> {
    if poll.is_zero() {
        return Ok(0);
    }
    stream.set_nonblocking(true).map_err(Exchange::Io)?;
    let started = Instant::now();
    let outcome = loop {
        match stream.read(chunk) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() >= poll {
                    break Ok(0);
                }
                std::thread::yield_now();
            }
            Ok(0) => {
                let error =
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed");
                break Err(Exchange::Closed(error));
            }
            Ok(read) => break Ok(read),
            Err(error) => break Err(Exchange::Io(error)),
        }
    };
    stream.set_nonblocking(false).map_err(Exchange::Io)?;
    outcome
}

/// Reads one HTTP/1.1 response with a `Content-Length` body, first polling
/// for it up to `poll`.
fn read_response(stream: &mut UnixStream, poll: Duration) -> Result<Vec<u8>, Exchange> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let polled = poll_answer(stream, &mut chunk, poll)?;
    buffer.extend_from_slice(&chunk[..polled]);
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end;
        }
        if buffer.len() > RESPONSE_BYTES_MAX {
            return Err(Exchange::Protocol("response head too large".into()));
        }
        let read = stream.read(&mut chunk).map_err(Exchange::Io)?;
        if read == 0 {
            let error = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed");
            return Err(if buffer.is_empty() {
                Exchange::Closed(error)
            } else {
                Exchange::Io(error)
            });
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = std::str::from_utf8(&buffer[..head_end])
        .map_err(|_| Exchange::Protocol("response head is not text".into()))?;
    let length = content_length(head)?;
    if length > RESPONSE_BYTES_MAX {
        return Err(Exchange::Protocol(format!(
            "response of {length} bytes is too large"
        )));
    }
    let mut body = buffer.split_off(head_end + 4);
    while body.len() < length {
        let read = stream.read(&mut chunk).map_err(Exchange::Io)?;
        if read == 0 {
            return Err(Exchange::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        body.extend_from_slice(&chunk[..read]);
    }
    if body.len() != length {
        return Err(Exchange::Protocol("more bytes than Content-Length".into()));
    }
    Ok(body)
}

fn content_length(head: &str) -> Result<usize, Exchange> {
    head.lines()
        .skip(1)
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .ok_or_else(|| Exchange::Protocol("response without Content-Length".into()))
}

/// A use that has begun: commit it, or drop it to cancel (not charged).
#[derive(Debug)]
pub struct Use<'a> {
    meter: &'a mut Meter,
    pid: Pid,
    finished: bool,
}

impl Use<'_> {
    /// The meter, for components used inside this use (they are charged to
    /// this product's owner).
    pub fn meter(&mut self) -> &mut Meter {
        self.meter
    }

    /// Records the use; returns once it is durable.
    pub fn commit(mut self) -> Result<(), ClientError> {
        self.finished = true;
        self.meter.commit(self.pid)
    }
}

impl Drop for Use<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: if the meter is gone, so is the open query.
            let _ = self.meter.cancel(self.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

    #[test]
    fn an_answer_within_the_poll_is_read_without_sleeping() {
        let (mut ours, mut theirs) = UnixStream::pair().expect("socket pair");
        theirs.write_all(ANSWER).expect("answer");
        let body = read_response(&mut ours, POLL_BEFORE_SLEEP).map_err(|_| "no answer");
        assert_eq!(body, Ok(b"hello".to_vec()));
    }

    #[test]
    fn a_late_answer_is_still_read_after_the_poll_gives_up() {
        let (mut ours, mut theirs) = UnixStream::pair().expect("socket pair");
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            theirs.write_all(&ANSWER[..10]).expect("first part");
            std::thread::sleep(Duration::from_millis(5));
            theirs.write_all(&ANSWER[10..]).expect("rest");
            theirs
        });
        let started = Instant::now();
        let body = read_response(&mut ours, POLL_BEFORE_SLEEP).map_err(|_| "no answer");
        assert_eq!(body, Ok(b"hello".to_vec()));
        assert!(started.elapsed() >= Duration::from_millis(20));
        let _theirs = late.join().expect("writer");
        // The socket is back in blocking mode for the next call: a read
        // waits for its timeout instead of returning at once.
        ours.set_read_timeout(Some(Duration::from_millis(10)))
            .expect("timeout");
        let waited = Instant::now();
        let mut byte = [0u8; 1];
        ours.read(&mut byte).expect_err("nothing more to read");
        assert!(waited.elapsed() >= Duration::from_millis(9));
    }

    #[test]
    fn a_meter_that_closes_during_the_poll_is_a_closed_connection() {
        let (mut ours, theirs) = UnixStream::pair().expect("socket pair");
        drop(theirs);
        let outcome = read_response(&mut ours, POLL_BEFORE_SLEEP);
        assert!(matches!(outcome, Err(Exchange::Closed(_))));
    }
}
