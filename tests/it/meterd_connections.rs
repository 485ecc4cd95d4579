//! meterd's socket under hostile local users (issue 14, items 2 and 6):
//! connections that send a partial request, or nothing, beyond the
//! connection limit; SIGTERM while such a connection is open; a socket in a
//! directory every user may write; a socket owned by another user.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meterd::server::{
    BODY_READ_TIMEOUT_MS, CONNECTIONS_MAX, HEADER_READ_TIMEOUT_MS, SHUTDOWN_GRACE_MS,
};
use proto::Pid;

use crate::support::{MeterdSetup, workspace_binary};

/// The ways a connection can hold on without finishing a request.
#[derive(Debug, Clone, Copy)]
enum Stall {
    /// Connects and sends nothing.
    Silent,
    /// Sends part of a request's head.
    HalfHead,
    /// Sends a whole head and part of the body it announces.
    HalfBody,
}

impl Stall {
    fn bytes(self) -> &'static [u8] {
        match self {
            Stall::Silent => b"",
            Stall::HalfHead => b"POST /RPC2 HTTP/1.1\r\nHost: meterd\r\nContent-Ty",
            Stall::HalfBody => {
                b"POST /RPC2 HTTP/1.1\r\nHost: meterd\r\nContent-Type: text/xml\r\nContent-Length: 100\r\n\r\n<methodCall>"
            }
        }
    }
}

fn stall(socket: &Path, how: Stall) -> UnixStream {
    let mut stream = UnixStream::connect(socket).expect("connect to meterd");
    stream
        .write_all(how.bytes())
        .expect("send the partial request");
    stream
}

fn a_meter(dir: &tempfile::TempDir) -> crate::support::MeterdRun {
    MeterdSetup {
        dir: dir.path().to_owned(),
        backoffice: None,
    }
    .start()
}

/// A caller's `query` and `status` are answered, timed.
fn served_within(socket: &Path, bound: Duration) -> Duration {
    let started = Instant::now();
    let mut meter = meterd::client::Meter::connect(socket);
    let answer = meter.try_query(Pid::parse("B1-P7").unwrap());
    assert!(matches!(answer, Ok(false)), "query answered: {answer:?}");
    meter.status().expect("status answered");
    let took = started.elapsed();
    assert!(took < bound, "served in {took:?}, more than {bound:?}");
    took
}

#[test]
fn slow_and_silent_connections_beyond_the_limit_never_lock_callers_out() {
    let dir = tempfile::tempdir().unwrap();
    let meter = a_meter(&dir);
    let kinds = [Stall::Silent, Stall::HalfHead, Stall::HalfBody];
    // More bad connections than the meter serves at once: each one past the
    // limit closes the one that has waited longest without a call.
    let bad = CONNECTIONS_MAX + 200;
    let started = Instant::now();
    let mut held: Vec<UnixStream> = (0..bad)
        .map(|n| stall(&meter.socket, kinds[n % kinds.len()]))
        .collect();
    let opened = started.elapsed();
    assert!(
        opened < Duration::from_millis(HEADER_READ_TIMEOUT_MS / 2),
        "opening {bad} connections took {opened:?}: too slow to show that they, not the timeouts, were overcome"
    );
    // With every one of them still open (no timeout has passed), callers
    // are served, again and again, each time past a full table.
    for round in 0..5 {
        held.extend((0..50).map(|n| stall(&meter.socket, kinds[n % kinds.len()])));
        let took = served_within(&meter.socket, Duration::from_secs(3));
        eprintln!(
            "round {round}: served in {took:?} with {} bad connections made",
            held.len()
        );
    }
    let flood = started.elapsed();
    assert!(
        flood < Duration::from_millis(HEADER_READ_TIMEOUT_MS),
        "the flood took {flood:?}: a timeout, not room made, may have served the callers"
    );
    // The oldest were closed to make room: at most CONNECTIONS_MAX are open.
    std::thread::sleep(Duration::from_millis(200));
    let mut closed = 0;
    for stream in &mut held {
        stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        if matches!(stream.read(&mut byte), Ok(0)) {
            closed += 1;
        }
    }
    assert!(
        closed >= held.len() - CONNECTIONS_MAX,
        "{closed} of {} closed",
        held.len()
    );
    drop(held);
    // Each kind of stall is closed once its time is up, and the meter
    // serves on.
    let waited = Instant::now();
    let stalled: Vec<(Stall, UnixStream)> = kinds
        .iter()
        .map(|&how| (how, stall(&meter.socket, how)))
        .collect();
    let bound = Duration::from_millis(HEADER_READ_TIMEOUT_MS.max(BODY_READ_TIMEOUT_MS) + 5_000);
    for (how, mut stream) in stalled {
        stream.set_read_timeout(Some(bound)).unwrap();
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .unwrap_or_else(|error| panic!("{how:?} still open after {bound:?}: {error}"));
        let closed_after = waited.elapsed();
        let answer = String::from_utf8_lossy(&answer);
        eprintln!("{how:?} closed after {closed_after:?}: {answer:?}");
        let timeout = match how {
            Stall::HalfBody => {
                assert!(answer.starts_with("HTTP/1.1 408"), "{how:?}: {answer}");
                BODY_READ_TIMEOUT_MS
            }
            _ => HEADER_READ_TIMEOUT_MS,
        };
        assert!(
            closed_after >= Duration::from_millis(timeout - 500),
            "{how:?} closed after {closed_after:?}, before its {timeout} ms"
        );
    }
    // An idle keep-alive connection is closed after the head timeout too,
    // and the client reconnects without the caller noticing.
    let mut client = meterd::client::Meter::connect(&meter.socket);
    client.status().expect("status answered");
    std::thread::sleep(Duration::from_millis(HEADER_READ_TIMEOUT_MS + 500));
    client
        .status()
        .expect("status answered on a new connection");
    served_within(&meter.socket, Duration::from_secs(2));
}

#[test]
fn sigterm_exits_within_the_grace_while_connections_are_half_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut meter = a_meter(&dir);
    let _held: Vec<UnixStream> = [Stall::Silent, Stall::HalfHead, Stall::HalfBody]
        .into_iter()
        .map(|how| stall(&meter.socket, how))
        .collect();
    // Let the meter accept them (a call on another connection comes after).
    served_within(&meter.socket, Duration::from_secs(2));
    let started = Instant::now();
    let process = meter.running.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &process])
            .status()
            .unwrap()
            .success()
    );
    let status = meter.running.child.wait().unwrap();
    let took = started.elapsed();
    eprintln!("meterd exited {took:?} after SIGTERM, three half-sent connections open");
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(
        took < Duration::from_millis(SHUTDOWN_GRACE_MS),
        "SIGTERM took {took:?}, more than the {SHUTDOWN_GRACE_MS} ms grace"
    );
    assert!(!meter.socket.exists(), "the socket is removed on exit");
}

/// The uid this test runs as (effective).
fn own_uid() -> u32 {
    meterd::procinfo::effective_uid().expect("/proc/self/status")
}

/// Runs `command` to its end, or kills it after `bound` (a meter that
/// should have refused to start and listens instead).
fn exits_within(mut command: Command, bound: Duration) -> std::process::Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("meterd runs");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > bound {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("meterd ends")
}

#[test]
fn the_meter_refuses_a_socket_where_every_user_may_create_it_first() {
    let dir = tempfile::tempdir().unwrap();
    let open_to_all = dir.path().join("tmp");
    std::fs::create_dir(&open_to_all).unwrap();
    std::fs::set_permissions(
        &open_to_all,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    let meterd = workspace_binary("meterd", "meterd");
    let mut serve = Command::new(&meterd);
    serve
        .arg("--socket")
        .arg(open_to_all.join("meterd.sock"))
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("METERD_SOCKET");
    let refused = exits_within(serve, Duration::from_secs(10));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(64), "{message}");
    assert!(message.contains("writable by every user"), "{message}");
    assert!(!open_to_all.join("meterd.sock").exists());
    // With no socket given and no XDG_RUNTIME_DIR, a user other than root
    // is told to say where; the meter never falls back to /tmp.
    if own_uid() != 0 {
        let mut serve = Command::new(&meterd);
        serve
            .args(["serve", "--data-dir"])
            .arg(dir.path().join("data"))
            .env_remove("METERD_SOCKET")
            .env_remove("XDG_RUNTIME_DIR");
        let refused = exits_within(serve, Duration::from_secs(10));
        let message = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(64), "{message}");
        assert!(message.contains("--socket"), "{message}");
    } else {
        eprintln!(
            "running as root: the default without XDG_RUNTIME_DIR is /run/meterd, checked in meterd::socket's unit tests"
        );
    }
}

/// Runs the Python example client's `status()` on `socket`.
fn python_status(socket: &Path, owner: Option<&str>) -> std::process::Output {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python/src");
    let mut command = Command::new("python3");
    command
        .arg("-c")
        .arg(
            "import sys; sys.path.insert(0, sys.argv[1]); from meterd_client import connect; \
             print(connect(sys.argv[2]).status()['pendingReadings'])",
        )
        .arg(examples)
        .arg(socket)
        .env_remove("METERD_SOCKET_OWNER");
    if let Some(owner) = owner {
        command.env("METERD_SOCKET_OWNER", owner);
    }
    command.output().expect("python3 runs")
}

#[test]
fn clients_refuse_a_socket_owned_by_another_user() {
    if own_uid() != 0 {
        eprintln!(
            "skipped: making a socket of another owner needs root (the unit tests of meterd::socket cover the rule)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let meter = a_meter(&dir);
    let meterd = workspace_binary("meterd", "meterd");
    let status = |owner: Option<&str>| {
        let mut command = Command::new(&meterd);
        command
            .arg("--socket")
            .arg(&meter.socket)
            .arg("status")
            .env_remove("METERD_SOCKET_OWNER");
        if let Some(owner) = owner {
            command.env("METERD_SOCKET_OWNER", owner);
        }
        command.output().unwrap()
    };
    assert_eq!(
        status(None).status.code(),
        Some(0),
        "root's socket is trusted"
    );
    assert!(python_status(&meter.socket, None).status.success());
    // Another user's socket (as a squatter's would be) is never called.
    std::os::unix::fs::chown(&meter.socket, Some(65534), Some(65534)).unwrap();
    let refused = status(None);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(69), "{message}");
    assert!(message.contains("belongs to uid 65534"), "{message}");
    let mut client = meterd::client::Meter::connect(&meter.socket);
    assert!(matches!(
        client.try_query(Pid::parse("B1-P7").unwrap()),
        Err(meterd::client::ClientError::Untrusted(_))
    ));
    assert!(!client.query(Pid::parse("B1-P7").unwrap()), "fails closed");
    let refused = python_status(&meter.socket, None);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        message.contains("UntrustedSocket") && message.contains("belongs to uid 65534"),
        "{message}"
    );
    // Named as the meter's owner, it is called.
    assert_eq!(status(Some("65534")).status.code(), Some(0));
    assert_eq!(status(Some("nobody")).status.code(), Some(0));
    assert!(python_status(&meter.socket, Some("65534")).status.success());
}

#[test]
fn under_a_low_open_files_limit_bad_connections_never_lock_callers_out() {
    // A soft limit of 1,024 (systemd's default) is below what 1,024
    // connections and the meter's own files need; here 200, for speed.
    let limit = 200;
    let works = Command::new("prlimit")
        .args([&format!("--nofile={limit}:{limit}"), "--", "true"])
        .status();
    if !matches!(works, Ok(status) if status.success()) {
        eprintln!("skipped: prlimit cannot lower the open-files limit here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("meterd.sock");
    let meterd = workspace_binary("meterd", "meterd");
    let nofile = format!("--nofile={limit}:{limit}");
    let data = dir.path().join("data");
    let args = [
        nofile.as_str(),
        "--",
        meterd.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let _meter = crate::support::start_with_env("prlimit", &args, &[("METERD_LOG", "error")]);
    let kinds = [Stall::Silent, Stall::HalfHead, Stall::HalfBody];
    let started = Instant::now();
    let mut held: Vec<UnixStream> = (0..limit + 100)
        .map(|n| stall(&socket, kinds[n % kinds.len()]))
        .collect();
    for round in 0..3 {
        held.extend((0..20).map(|n| stall(&socket, kinds[n % kinds.len()])));
        let took = served_within(&socket, Duration::from_secs(3));
        eprintln!(
            "round {round}: served in {took:?} with {} bad connections made, open-files limit {limit}",
            held.len()
        );
    }
    let flood = started.elapsed();
    assert!(
        flood < Duration::from_millis(HEADER_READ_TIMEOUT_MS),
        "the flood took {flood:?}: a timeout, not room made, may have served the callers"
    );
}
