//! Hostile traffic against a real backoffice over real TCP (issue 14 items 1
//! and 2): strangers are refused before their body is read, calls are
//! bounded in number and time, and silent or slow connections can neither
//! hold the server nor lock out anyone else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use proto::FaultCode;
use proto::auth::{MID_HEADER, SIGNATURE_HEADER, TIME_HEADER};

use crate::support::{Backoffice, IO_TIMEOUT, fault_code, now_ms, s};

/// The server's own bounds, as `backoffice::server` and `listen` document them.
const METER_CALLS_AT_ONCE: usize = 8;
const METER_CALLS_PER_ADDRESS: usize = 2;
const BODY_MAX: usize = 32 * 1024 * 1024;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

fn office() -> (tempfile::TempDir, Backoffice) {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    (dir, office)
}

/// A registered meter: its MID.
fn meter(office: &Backoffice) -> String {
    let owner = office.text("customer.create", &[s("Bob"), s("bob@example.org")], "CID");
    office.meter(&owner).0
}

fn connect(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&address, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// A connection from another loopback address than the tests' own
/// 127.0.0.1, as a second host would make.
fn connect_from(from: &str, address: SocketAddr) -> std::io::Result<TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{from}:0").parse().unwrap())?;
        let stream = socket.connect(address).await?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    })
}

/// The head of a `POST /RPC2` announcing `length` body bytes.
fn head(address: SocketAddr, headers: &[(&str, String)], length: usize) -> String {
    let mut head = format!(
        "POST /RPC2 HTTP/1.1\r\nHost: {address}\r\nContent-Type: text/xml\r\nContent-Length: {length}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Extra request headers.
type Headers = Vec<(&'static str, String)>;

/// Signature headers naming `mid` with a signature that verifies nothing.
fn signed_headers(mid: &str) -> Headers {
    vec![
        (MID_HEADER, mid.to_owned()),
        (TIME_HEADER, now_ms().to_string()),
        (SIGNATURE_HEADER, "ab".repeat(32)),
    ]
}

/// Reads one answer: its status, its head and its body.
fn read_answer(stream: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut response = Vec::new();
    let mut buffer = [0_u8; 8192];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => {
                response.extend_from_slice(&buffer[..read]);
                if let Some(end) = find(&response, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&response[..end]).to_string();
                    let length = head
                        .lines()
                        .find_map(|line| {
                            line.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|value| value.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if response.len() >= end + 4 + length {
                        let status = head[9..12].parse().unwrap();
                        return (status, head, response[end + 4..end + 4 + length].to_vec());
                    }
                }
            }
            Err(error) => panic!("reading the answer: {error}"),
        }
    }
    panic!(
        "the connection closed without a whole answer: {:?}",
        String::from_utf8_lossy(&response)
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// True once the server has closed `stream` (an end of file or a reset).
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(limit + Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0_u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Some(started.elapsed()),
        Ok(_) => None,
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(started.elapsed())
        }
        Err(_) => None,
    }
}

#[test]
fn a_stranger_is_answered_before_any_of_the_body_is_read() {
    let (_dir, office) = office();
    let mid = meter(&office);
    let cases: [(&str, Headers, FaultCode); 4] = [
        ("no headers at all", vec![], FaultCode::Unauthorized),
        (
            "a wrong operator token",
            vec![("x-operator-token", "not-the-token".to_owned())],
            FaultCode::Unauthorized,
        ),
        (
            "a meter that is not registered",
            signed_headers("B1-M999"),
            FaultCode::UnknownMeter,
        ),
        (
            "a registered meter without a time",
            vec![
                (MID_HEADER, mid.clone()),
                (SIGNATURE_HEADER, "ab".repeat(32)),
            ],
            FaultCode::BadSignature,
        ),
    ];
    for (what, headers, expected) in cases {
        let mut stream = connect(office.address);
        // A maximum-size body is announced and none of it is sent: a server
        // that read the body first would wait for it.
        stream
            .write_all(head(office.address, &headers, BODY_MAX).as_bytes())
            .unwrap();
        let started = Instant::now();
        let (status, head, body) = read_answer(&mut stream);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: answered after {:?}",
            started.elapsed()
        );
        assert_eq!(status, 200, "{what}: {head}");
        assert_eq!(fault_code(&body), Some(expected), "{what}");
        assert!(
            head.to_ascii_lowercase().contains("connection: close"),
            "{what}: the unread body ends the connection: {head}"
        );
    }
}

#[test]
fn garbage_from_a_registered_meter_is_refused_by_its_signature_not_decoded() {
    let (_dir, office) = office();
    let mid = meter(&office);
    for garbage in [
        b"\x00\xff not XML at all".to_vec(),
        b"<?xml version=\"1.0\"?><methodCall><methodName>send</methodName><params><param><value><i4>1</i4></value></param></params></methodCall>".to_vec(),
        b"<?xml version=\"1.0\"?><methodCall><methodName>meter.create</methodName><params/></methodCall>".to_vec(),
    ] {
        let mut stream = connect(office.address);
        stream
            .write_all(head(office.address, &signed_headers(&mid), garbage.len()).as_bytes())
            .unwrap();
        stream.write_all(&garbage).unwrap();
        let (status, _, body) = read_answer(&mut stream);
        assert_eq!(status, 200);
        assert_eq!(
            fault_code(&body),
            Some(FaultCode::BadSignature),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
}

/// Holds `count` meter calls from `from` whose heads are in and whose
/// bodies are not, each holding one of the server's slots.
fn hold_meter_calls(office: &Backoffice, from: &str, mid: &str, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut stream = connect_from(from, office.address).unwrap();
            stream
                .write_all(head(office.address, &signed_headers(mid), 1_000).as_bytes())
                .unwrap();
            stream.write_all(b"<?xml").unwrap();
            stream
        })
        .collect()
}

/// A meter call from `from` with a 10-byte body: its status, head and body
/// (once the server has taken the heads of calls sent before it).
fn meter_call_from(office: &Backoffice, from: &str, mid: &str) -> (u16, String, Vec<u8>) {
    let mut stream = connect_from(from, office.address).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
        .write_all(head(office.address, &signed_headers(mid), 10).as_bytes())
        .unwrap();
    stream.write_all(b"0123456789").unwrap();
    read_answer(&mut stream)
}

/// Tries a meter call from `from` until it gets `status` (the server takes
/// the held calls' heads in its own time), for up to 5 s.
fn until_status(
    office: &Backoffice,
    from: &str,
    mid: &str,
    status: u16,
) -> Option<(String, Vec<u8>)> {
    for _ in 0..100 {
        let (got, head, body) = meter_call_from(office, from, mid);
        if got == status {
            return Some((head, body));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn past_its_slots_a_call_gets_503_with_retry_after_and_the_next_one_gets_through() {
    let (_dir, office) = office();
    let mid = meter(&office);
    // One address sends more meter calls at once than it may hold: those
    // past its slots are answered 503 at once, before their body.
    let mut held = hold_meter_calls(&office, "127.0.0.1", &mid, 3 * METER_CALLS_PER_ADDRESS);
    let mut refused = Vec::new();
    for stream in &mut held {
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut answer = [0_u8; 4096];
        if let Ok(read) = stream.read(&mut answer)
            && read > 0
        {
            refused.push(String::from_utf8_lossy(&answer[..read]).to_string());
        }
    }
    assert!(
        refused.len() >= METER_CALLS_PER_ADDRESS,
        "{} of {} calls refused: {refused:?}",
        refused.len(),
        held.len()
    );
    for answer in &refused {
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
        assert!(answer.contains("<int>-32603</int>"), "{answer}");
    }
    // Operator calls have slots of their own.
    assert!(office.call("ledger.verify", &[]).is_ok());
    drop(held);
    let (_, body) = until_status(&office, "127.0.0.1", &mid, 200).expect("a call gets through");
    assert_eq!(
        fault_code(&body),
        Some(FaultCode::BadSignature),
        "slots come back when the calls end"
    );
}

/// The peak resident memory of a process, in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Sends `count` maximum-size garbage bodies at once with `headers`, each
/// on its own connection, and waits for every answer or close.
fn flood(address: SocketAddr, headers: &[(&str, String)], count: usize) -> Vec<u16> {
    let garbage = std::sync::Arc::new(vec![b'x'; BODY_MAX]);
    let threads: Vec<_> = (0..count)
        .map(|n| {
            let garbage = std::sync::Arc::clone(&garbage);
            let head = head(address, headers, BODY_MAX);
            // From as many addresses as there are slots, so that all fill.
            let from = format!("127.0.0.{}", 1 + n % METER_CALLS_AT_ONCE);
            std::thread::spawn(move || {
                let mut stream = connect_from(&from, address).unwrap();
                stream
                    .set_write_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                let _ = stream.write_all(head.as_bytes());
                // A refused body is cut off by the server: that is fine.
                let _ = stream.write_all(&garbage);
                let mut response = Vec::new();
                let _ = stream.read_to_end(&mut response);
                std::str::from_utf8(response.get(9..12).unwrap_or(b"000"))
                    .ok()
                    .and_then(|status| status.parse().ok())
                    .unwrap_or(0)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .collect()
}

#[test]
fn sixty_four_maximum_size_garbage_bodies_at_once_stay_within_the_documented_memory() {
    let (_dir, office) = office();
    let mid = meter(&office);
    let pid = office.running.child.id();
    let before = peak_kib(pid);
    let unsigned = flood(office.address, &[], 64);
    let after_unsigned = peak_kib(pid);
    let signed = flood(office.address, &signed_headers(&mid), 64);
    let after_signed = peak_kib(pid);
    println!(
        "backoffice peak RSS: {} MiB at start, {} MiB after 64 unsigned 32 MiB bodies, {} MiB after 64 signed ones (answers: {:?} / {:?})",
        before / 1024,
        after_unsigned / 1024,
        after_signed / 1024,
        count_statuses(&unsigned),
        count_statuses(&signed),
    );
    // Unsigned bodies are never read; signed ones are read at most
    // METER_CALLS_AT_ONCE at a time (each up to twice while collected).
    assert!(
        after_unsigned - before < 64 * 1024,
        "unsigned bodies grew the peak by {} MiB",
        (after_unsigned - before) / 1024
    );
    let bound_kib = (2 * METER_CALLS_AT_ONCE * BODY_MAX / 1024) as u64 + 64 * 1024;
    assert!(
        after_signed - before < bound_kib,
        "signed bodies grew the peak by {} MiB (bound {} MiB)",
        (after_signed - before) / 1024,
        bound_kib / 1024
    );
    assert!(
        signed.iter().all(|&status| status == 200 || status == 503),
        "{signed:?}"
    );
    // And the server still answers.
    assert!(office.call("ledger.verify", &[]).is_ok());
}

fn count_statuses(statuses: &[u16]) -> std::collections::BTreeMap<u16, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for status in statuses {
        *counts.entry(*status).or_default() += 1;
    }
    counts
}

#[test]
fn silent_and_slow_connections_beyond_the_limits_lock_nobody_out_and_are_closed() {
    let (_dir, office) = office();
    // One host opens more connections than the server takes from one
    // address, and says nothing on any of them.
    let silent: Vec<TcpStream> = (0..1_100)
        .filter_map(|_| connect_from("127.0.0.2", office.address).ok())
        .collect();
    assert!(silent.len() > 1_024, "{} connections made", silent.len());
    // Another sends its head one byte a second.
    let mut slow = connect(office.address);
    slow.write_all(b"PO").unwrap();
    // Everyone else is still served, at once.
    let started = Instant::now();
    for _ in 0..5 {
        office.call("ledger.verify", &[]).expect("served");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "five calls took {:?}",
        started.elapsed()
    );
    // A silent connection from this address and the slow one are closed
    // once the head has not come within the header timeout.
    let mut quiet = connect(office.address);
    let slow_writer = std::thread::spawn(move || {
        for _ in 0..30 {
            std::thread::sleep(Duration::from_secs(1));
            if slow.write_all(b"S").is_err() {
                return true;
            }
        }
        false
    });
    let closed =
        closed_within(&mut quiet, HEADER_READ_TIMEOUT).expect("a silent connection is closed");
    assert!(
        closed >= HEADER_READ_TIMEOUT - Duration::from_secs(1)
            && closed < HEADER_READ_TIMEOUT + Duration::from_secs(5),
        "closed after {closed:?}"
    );
    assert!(
        slow_writer.join().unwrap(),
        "a head sent a byte a second is cut off"
    );
    drop(silent);
}

#[test]
fn sigterm_ends_the_backoffice_within_its_grace_while_a_request_is_half_sent() {
    let (_dir, mut office) = office();
    let mut half = connect(office.address);
    half.write_all(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut idle = connect(office.address);
    idle.write_all(b"").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pid = office.running.child.id();
    let started = Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = started + Duration::from_secs(15);
    loop {
        if let Some(status) = office.running.child.try_wait().unwrap() {
            let took = started.elapsed();
            assert!(status.success(), "{status}");
            assert!(took < Duration::from_millis(5_000 + 1_500), "took {took:?}");
            break;
        }
        assert!(Instant::now() < deadline, "still running after 15 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A certificate authority made for one test, and a server certificate it
/// signed for `localhost` and 127.0.0.1: their PEM files.
struct TestPki {
    ca: std::path::PathBuf,
    certificate: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn test_pki(dir: &std::path::Path, name: &str) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let server = server_params.signed_by(&server_key, &issuer).unwrap();
    let pki = TestPki {
        ca: dir.join(format!("{name}-ca.pem")),
        certificate: dir.join(format!("{name}-server.pem")),
        key: dir.join(format!("{name}-server.key")),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.certificate, server.pem()).unwrap();
    std::fs::write(&pki.key, server_key.serialize_pem()).unwrap();
    pki
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_meter_uploads_over_tls_to_the_backoffice_it_trusts_and_to_no_other() {
    use crate::support::{MeterdSetup, grant_by_password, workspace_binary};
    use crate::web::PASSWORD;
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki(dir.path(), "branch");
    let stranger = test_pki(dir.path(), "stranger");
    let port = free_port();
    let tls_listen = format!("127.0.0.1:{port}");
    let office = Backoffice::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[
            ("BACKOFFICE_TLS_LISTEN", tls_listen.as_str()),
            ("BACKOFFICE_TLS_CERT", pki.certificate.to_str().unwrap()),
            ("BACKOFFICE_TLS_KEY", pki.key.to_str().unwrap()),
        ],
    );
    let consumer = office.text(
        "customer.create",
        &[s("Ada"), s("ada@example.org"), s(PASSWORD)],
        "CID",
    );
    let (mid, secret) = office.meter(&consumer);
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, &secret).unwrap();
    // Plain http on the TLS port gets nothing served.
    let mut plain = connect(format!("127.0.0.1:{port}").parse().unwrap());
    plain
        .write_all(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let meter_with = |name: &str, ca: &std::path::Path| {
        let meter_dir = dir.path().join(name);
        std::fs::create_dir_all(&meter_dir).unwrap();
        let setup = MeterdSetup {
            dir: meter_dir,
            backoffice: None,
        };
        let url = format!("https://localhost:{port}/RPC2");
        let run = setup.start_with(&[
            "--backoffice",
            &url,
            "--mid",
            &mid,
            "--secret-file",
            secret_file.to_str().unwrap(),
            "--backoffice-ca",
            ca.to_str().unwrap(),
        ]);
        (setup, run)
    };
    let meterd_cli = |socket: &std::path::Path, args: &[&str]| {
        let output = std::process::Command::new(workspace_binary("meterd", "meterd"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    // A meter that trusts another CA reaches nothing: the password is not
    // sent, no batch is either.
    let (_, wary) = meter_with("wary", &stranger.ca);
    let (code, _) = meterd_cli(&wary.socket, &["flush"]);
    assert_eq!(code, Some(1));
    let (_, status) = meterd_cli(&wary.socket, &["status"]);
    assert!(status.contains("TLS"), "{status}");
    drop(wary);

    // The meter that trusts the branch's CA grants (the password goes over
    // TLS, not in clear) and uploads.
    let (_, meter) = meter_with("trusting", &pki.ca);
    grant_by_password(&meter.socket, &consumer, PASSWORD);
    let socket = meter.socket.display().to_string();
    let demo = std::process::Command::new(env!("CARGO_BIN_EXE_metered-demo"))
        .args([&socket, &consumer, "B1-P1", "B1-P9", "1", "3"])
        .status()
        .unwrap();
    assert!(demo.success());
    let (code, _) = meterd_cli(&meter.socket, &["flush"]);
    assert_eq!(code, Some(0), "uploaded over TLS");
    let (_, status) = meterd_cli(&meter.socket, &["status"]);
    assert!(
        status
            .lines()
            .any(|line| line.split_whitespace().collect::<Vec<_>>() == ["pendingReadings", "0"]),
        "{status}"
    );
    // The backoffice has the batch: the uses of unknown products wait in
    // its suspense.
    let suspense = office.call("suspense.list", &[]).unwrap();
    assert!(format!("{suspense:?}").contains("B1-P1"), "{suspense:?}");
}

#[test]
fn a_body_sent_too_slowly_is_cut_off_on_rpc2_and_on_the_pages() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[
            ("BACKOFFICE_BODY_TIMEOUT_S", "2"),
            ("BACKOFFICE_PAGE_TIMEOUT_S", "3"),
        ],
    );
    let mid = meter(&office);
    // A meter call whose body stops half-way.
    let mut stream = connect(office.address);
    stream
        .write_all(head(office.address, &signed_headers(&mid), 1_000).as_bytes())
        .unwrap();
    stream.write_all(b"<?xml version=").unwrap();
    let started = Instant::now();
    let (status, _, body) = read_answer(&mut stream);
    let took = started.elapsed();
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    assert!(
        took >= Duration::from_millis(1_500) && took < Duration::from_secs(6),
        "/RPC2 cut off after {took:?}"
    );
    // A login form whose body stops half-way.
    let mut stream = connect(office.address);
    stream
        .write_all(
            format!(
                "POST /login HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nemail=a",
                office.address
            )
            .as_bytes(),
        )
        .unwrap();
    let started = Instant::now();
    let (status, _, _) = read_answer(&mut stream);
    let took = started.elapsed();
    assert_eq!(status, 408);
    assert!(
        took >= Duration::from_millis(2_500) && took < Duration::from_secs(7),
        "the page cut off after {took:?}"
    );
    // The server goes on answering.
    assert!(office.call("ledger.verify", &[]).is_ok());
}
