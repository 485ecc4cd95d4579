//! meterd end to end: the real daemon, real programs (Rust and Python) as
//! separate processes, and a stand-in backoffice speaking the `send` contract.

use std::collections::{HashMap, HashSet};
use std::process::Command;

use proto::auth::Secret;
use proto::reading::{Event, Reading};
use proto::xmlrpc::Limits;
use proto::{Cid, FaultCode, Mid, Payer, Pid};
use tests::fake_backoffice::FakeBackoffice;

use crate::support::{MeterdSetup, fault_code, unix_request, workspace_binary};

const SECRET: &[u8] = b"a test secret of thirty-two bytes";

fn cid(text: &str) -> Cid {
    Cid::parse(text).unwrap()
}

fn pid(text: &str) -> Pid {
    Pid::parse(text).unwrap()
}

/// A stand-in backoffice and a meter set up to upload to it.
fn with_backoffice(dir: &tempfile::TempDir) -> (FakeBackoffice, MeterdSetup) {
    let mid = Mid::parse("B1-M1").unwrap();
    let backoffice = FakeBackoffice::new(HashMap::from([(mid, Secret::new(SECRET).unwrap())]));
    let address = backoffice.spawn();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let setup = MeterdSetup {
        dir: dir.path().to_owned(),
        backoffice: Some((address, mid, secret_file)),
    };
    (backoffice, setup)
}

fn meterd_cli(socket: &std::path::Path, args: &[&str]) -> i32 {
    let status = Command::new(workspace_binary("meterd", "meterd"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .status()
        .expect("meterd CLI runs");
    status.code().expect("exit code")
}

/// Commits per (product, payer) among `readings`.
fn commits(readings: &[Reading]) -> HashMap<(Pid, Option<Payer>), usize> {
    let mut counts = HashMap::new();
    for reading in readings {
        if let Event::Commit { pid, payer } = reading.event {
            *counts.entry((pid, payer)).or_default() += 1;
        }
    }
    counts
}

#[test]
fn interleaved_programs_and_threads_are_charged_to_the_right_payer() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    let socket = meter.socket.display().to_string();
    let component = "B1-P9";
    let demo = |cid: &str, product: &str, threads: &str, uses: &str| {
        Command::new(env!("CARGO_BIN_EXE_metered-demo"))
            .args([&socket, cid, product, component, threads, uses])
            .spawn()
            .expect("metered-demo starts")
    };
    let python = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/meter_client.py"
        ))
        .args([&socket, "B1-C3", "B1-P3", component, "2", "10"])
        .spawn()
        .expect("python3 runs");
    let programs = [
        demo("B1-C1", "B1-P1", "3", "20"),
        demo("B1-C2", "B1-P2", "2", "20"),
        python,
    ];
    for mut program in programs {
        assert!(
            program.wait().unwrap().success(),
            "a metered program failed"
        );
    }
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0, "flush uploads");
    let readings = backoffice.applied_readings();
    let counts = commits(&readings);
    let customer = |text| Some(Payer::Customer(cid(text)));
    let owner = |text| Some(Payer::OwnerOf(pid(text)));
    let expected = HashMap::from([
        ((pid("B1-P1"), customer("B1-C1")), 60),
        ((pid("B1-P2"), customer("B1-C2")), 40),
        ((pid("B1-P3"), customer("B1-C3")), 20),
        ((pid(component), owner("B1-P1")), 60),
        ((pid(component), owner("B1-P2")), 40),
        ((pid(component), owner("B1-P3")), 20),
    ]);
    assert_eq!(counts, expected);
    let logins = readings
        .iter()
        .filter(|r| matches!(r.event, Event::Login(_)))
        .count();
    let logouts = readings
        .iter()
        .filter(|r| matches!(r.event, Event::Logout(_)))
        .count();
    assert_eq!((logins, logouts), (3, 3));
    let seqs: Vec<u64> = readings.iter().map(|reading| reading.seq).collect();
    assert!(
        seqs.windows(2).all(|pair| pair[0] < pair[1]),
        "sequence numbers increase"
    );
}

#[test]
fn a_login_hook_session_covers_the_shells_children() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    let meterd = workspace_binary("meterd", "meterd");
    let meterd = meterd.display();
    // One shell: login, a query/commit pair from separate commands, logout.
    let script = format!(
        "set -e; M='{meterd} --socket {socket}'; \
         if $M query B1-P5; then exit 10; fi; \
         $M login B1-C5; $M query B1-P5; $M commit B1-P5; $M logout B1-C5; \
         if $M query B1-P5; then exit 11; fi",
        socket = meter.socket.display()
    );
    let status = Command::new("sh").arg("-c").arg(&script).status().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let counts = commits(&backoffice.applied_readings());
    assert_eq!(
        counts,
        HashMap::from([((pid("B1-P5"), Some(Payer::Customer(cid("B1-C5")))), 1)])
    );
}

#[test]
fn bad_input_gets_a_fault_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let setup = MeterdSetup {
        dir: dir.path().to_owned(),
        backoffice: None,
    };
    let meter = setup.start();
    let call = |name: &str, params: &str| {
        format!("<methodCall><methodName>{name}</methodName><params>{params}</params></methodCall>")
    };
    let string = |text: &str| format!("<param><value><string>{text}</string></value></param>");
    let cases: Vec<(&str, String, FaultCode)> = vec![
        (
            "malformed",
            "<methodCall><methodName>query".into(),
            FaultCode::ParseError,
        ),
        (
            "wrong type",
            call("query", "<param><value><int>7</int></value></param>"),
            FaultCode::InvalidParams,
        ),
        (
            "unknown method",
            call("purchase", ""),
            FaultCode::MethodNotFound,
        ),
        (
            "CID for PID",
            call("query", &string("B1-C1")),
            FaultCode::InvalidParams,
        ),
        (
            "garbage ID",
            call("login", &string("&lt;&amp;&gt;")),
            FaultCode::InvalidParams,
        ),
        (
            "too many params",
            call("flush", &string("x")),
            FaultCode::InvalidParams,
        ),
        (
            "reserved context",
            call("query", &(string("B1-P1") + &string(".x"))),
            FaultCode::InvalidParams,
        ),
        (
            "unmatched commit",
            call("commit", &string("B1-P1")),
            FaultCode::UnmatchedCommit,
        ),
    ];
    for (label, body, expected) in cases {
        let (status, answer) = unix_request(&meter.socket, "POST", body.as_bytes());
        assert_eq!(status, 200, "{label}");
        assert_eq!(fault_code(&answer), Some(expected), "{label}");
    }
    let (status, _) = unix_request(
        &meter.socket,
        "POST",
        &vec![b' '; Limits::METER_API.body_bytes_max + 1],
    );
    assert_eq!(status, 413, "oversize");
    let (status, _) = unix_request(&meter.socket, "GET", b"");
    assert_eq!(status, 405, "GET");
    let (status, answer) = unix_request(&meter.socket, "POST", call("status", "").as_bytes());
    assert_eq!((status, fault_code(&answer)), (200, None), "still serving");
    // Without a backoffice, flush answers false and the daemon says why.
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 1);
}

#[test]
fn backoffice_down_then_up_loses_nothing_and_charges_once() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    backoffice.behave(|behaviour| behaviour.down = true);
    let meter = setup.start();
    let socket = meter.socket.display().to_string();
    let run_demo = |uses: &str| {
        let status = Command::new(env!("CARGO_BIN_EXE_metered-demo"))
            .args([&socket, "B1-C1", "B1-P1", "B1-P9", "1", uses])
            .status()
            .unwrap();
        assert!(status.success());
    };
    // Uses are acknowledged while the backoffice is down.
    run_demo("5");
    assert_eq!(
        meterd_cli(&meter.socket, &["flush"]),
        1,
        "upload fails while down"
    );
    assert!(backoffice.applied_readings().is_empty());
    // Up again, but the answer to the first upload is lost after it was applied.
    backoffice.behave(|behaviour| {
        behaviour.down = false;
        behaviour.lose_answers = true;
    });
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 1, "answer lost");
    backoffice.behave(|behaviour| behaviour.lose_answers = false);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0, "retry succeeds");
    let (applied, attempts) =
        backoffice.ledger(|ledger| (ledger.applied.clone(), ledger.attempts.clone()));
    // Retries while down may have fixed a first batch before the program
    // finished; either way every reading arrives once, each batch id once.
    let ids: HashSet<_> = applied.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), applied.len(), "no batch applied twice");
    let uploaded: usize = applied.iter().map(|(_, readings)| readings.len()).sum();
    assert_eq!(uploaded, 12, "login, 5 x (component + product), logout");
    let retried = applied.iter().any(|(id, _)| attempts[id] >= 2);
    assert!(retried, "a batch was resent with the same id: {attempts:?}");
    // More uses after recovery upload as a new batch.
    run_demo("1");
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let all = backoffice.applied_readings();
    let seqs: HashSet<u64> = all.iter().map(|reading| reading.seq).collect();
    assert_eq!(seqs.len(), all.len(), "no reading uploaded twice");
    assert_eq!(all.len(), 16);
}

/// A pseudo-random sequence, fixed per run so failures can be replayed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound
    }
}

/// What one round's client saw: commits acknowledged, and the one in flight
/// when the meter died (which may or may not have been recorded).
fn commit_until_killed(socket: std::path::PathBuf, first: u32) -> (Vec<u32>, Option<u32>) {
    let mut meter = meterd::client::Meter::connect(socket);
    let mut acknowledged = Vec::new();
    if meter.login(cid("B1-C1")).is_err() {
        return (acknowledged, None);
    }
    for n in first.. {
        let product = pid(&format!("B1-P{n}"));
        match meter.try_query(product) {
            Ok(true) => {}
            // Unconfirmed uses are bounded until the first upload answers.
            Ok(false) => {
                let _ = meter.flush();
                continue;
            }
            Err(_) => return (acknowledged, None),
        }
        match meter.commit(product) {
            Ok(()) => acknowledged.push(n),
            Err(_) => return (acknowledged, Some(n)),
        }
    }
    unreachable!("the meter is killed long before u32::MAX commits")
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_commit_and_charges_none_twice() {
    const ROUNDS: u32 = 20;
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    // Small batches, so that kills also land during uploads.
    backoffice.behave(|behaviour| behaviour.params.flush_readings_max = 25);
    let mut random = Lcg(std::process::id().into());
    let mut acknowledged: Vec<u32> = Vec::new();
    let mut in_flight: Vec<u32> = Vec::new();
    let mut next = 1;
    for _ in 0..ROUNDS {
        let mut meter = setup.start();
        let socket = meter.socket.clone();
        let first = next;
        let client = std::thread::spawn(move || commit_until_killed(socket, first));
        std::thread::sleep(std::time::Duration::from_millis(50 + random.below(250)));
        meter.running.child.kill().expect("SIGKILL meterd");
        meter.running.child.wait().unwrap();
        let (acked, maybe) = client.join().expect("client thread");
        next = acked
            .iter()
            .chain(&maybe)
            .max()
            .map_or(next, |last| last + 1);
        acknowledged.extend(acked);
        in_flight.extend(maybe);
    }
    assert!(
        acknowledged.len() > 100,
        "too few commits to mean much: {}",
        acknowledged.len()
    );
    let meter = setup.start();
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0, "final upload");
    let mut uploaded: HashMap<u32, usize> = HashMap::new();
    for reading in backoffice.applied_readings() {
        if let Event::Commit { pid, .. } = reading.event {
            let n: u32 = pid.as_str().trim_start_matches("B1-P").parse().unwrap();
            *uploaded.entry(n).or_default() += 1;
        }
    }
    let twice: Vec<_> = uploaded.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "uploaded more than once: {twice:?}");
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|n| !uploaded.contains_key(n))
        .collect();
    assert!(lost.is_empty(), "acknowledged but never uploaded: {lost:?}");
    let unexplained: Vec<_> = uploaded
        .keys()
        .filter(|n| !acknowledged.contains(n) && !in_flight.contains(n))
        .collect();
    assert!(
        unexplained.is_empty(),
        "uploaded but never committed: {unexplained:?}"
    );
    let applied_batches = backoffice.ledger(|ledger| ledger.applied.len());
    println!(
        "{ROUNDS} kills: {} commits acknowledged, {} in flight at a kill, {} uploaded in {applied_batches} batches",
        acknowledged.len(),
        in_flight.len(),
        uploaded.len()
    );
}

#[test]
fn sessions_survive_a_restart_of_the_meter() {
    let dir = tempfile::tempdir().unwrap();
    let setup = MeterdSetup {
        dir: dir.path().to_owned(),
        backoffice: None,
    };
    let product = pid("B1-P1");
    let mut meter = setup.start();
    // This test process is the caller: its context holds the session.
    let mut client = meterd::client::Meter::connect(&meter.socket);
    client.login(cid("B1-C1")).unwrap();
    assert!(client.query(product));
    assert!(client.cancel(product).unwrap());
    meter.running.child.kill().unwrap();
    meter.running.child.wait().unwrap();
    assert!(!client.query(product), "no meter: fails closed");
    let meter = setup.start();
    assert!(client.query(product), "the session was restored");
    client.commit(product).unwrap();
    assert!(client.logout(cid("B1-C1")).unwrap());
    drop(meter);
    let _meter = setup.start();
    assert!(!client.query(product), "the logout was saved too");
}

#[test]
fn sigterm_drains_and_exits_and_a_second_meter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let setup = MeterdSetup {
        dir: dir.path().to_owned(),
        backoffice: None,
    };
    let mut meter = setup.start();
    // A second meter on the same socket and data directory says why it stops.
    let second = Command::new(workspace_binary("meterd", "meterd"))
        .arg("--socket")
        .arg(&meter.socket)
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("METERD_LOG", "error")
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(69));
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(
        message.contains("another meterd is already using"),
        "{message}"
    );
    let mut client = meterd::client::Meter::connect(&meter.socket);
    client.login(cid("B1-C1")).unwrap();
    let process = meter.running.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &process])
            .status()
            .unwrap()
            .success()
    );
    let status = meter.running.child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(!meter.socket.exists(), "the socket is removed on exit");
    assert!(
        !client.query(pid("B1-P1")),
        "fails closed once the meter is gone"
    );
}

#[test]
fn the_readme_shows_the_python_transport_the_tests_run() {
    let readme = include_str!("../../README.md");
    let client = include_str!("../../examples/python/meterd_client.py");
    let block = readme
        .split("```python")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README has a Python block");
    let transport: Vec<&str> = block
        .lines()
        .skip_while(|line| !line.starts_with("class UnixConnection"))
        .take_while(|line| !line.starts_with("meter = "))
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert!(
        transport.len() > 10,
        "the README shows the transport classes"
    );
    for line in transport {
        assert!(
            client.contains(line),
            "README line not in examples/python/meterd_client.py: {line}"
        );
    }
}
