//! meterd end to end: the real daemon, real programs (Rust and Python) as
//! separate processes, and a stand-in backoffice speaking the `send` contract
//! and making grants.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use proto::auth::Secret;
use proto::reading::{Event, Reading};
use proto::xmlrpc::Limits;
use proto::{Cid, FaultCode, Mid, Payer, Pid};
use tests::fake_backoffice::FakeBackoffice;

use crate::support::{
    Lcg, MeterdSetup, fault_code, kill_test_seed, unix_request, workspace_binary,
};

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

/// What one run of the meterd CLI printed and how it ended.
#[derive(Debug)]
struct CliRun {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the meterd CLI with `stdin`, as this test's user, or through
/// `as_user` (a command prefix such as `setpriv --reuid=65534 ...`).
fn meterd_run(socket: &Path, args: &[&str], stdin: &str, as_user: &[String]) -> CliRun {
    let meterd = workspace_binary("meterd", "meterd");
    let mut command = match as_user.split_first() {
        Some((program, prefix)) => {
            let mut command = Command::new(program);
            command.args(prefix).arg(&meterd);
            command
        }
        None => Command::new(&meterd),
    };
    let mut child = command
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meterd CLI runs");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("meterd CLI ends");
    CliRun {
        code: output.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The real uid of this test process.
fn own_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .expect("a Uid: line")
}

/// Grants `cid` to this test's user through `meterd grant --password-stdin`,
/// the stand-in knowing the customer's password.
fn grant_by_password(backoffice: &FakeBackoffice, socket: &Path, customer: &str) {
    let password = format!("the password of {customer}");
    backoffice.behave(|behaviour| {
        behaviour.passwords.insert(cid(customer), password.clone());
    });
    let run = meterd_run(
        socket,
        &["grant", "--password-stdin", customer],
        &format!("{password}\n"),
        &[],
    );
    assert_eq!(run.code, 0, "meterd grant {customer}: {run:?}");
    assert_eq!(
        run.stdout.trim(),
        format!("granted {customer} to uid {}", own_uid())
    );
}

/// A command prefix that runs a program as a second user (nobody), or why
/// this machine cannot.
fn as_second_user(socket_dir: &Path) -> Result<Vec<String>, String> {
    if own_uid() != 0 {
        return Err(format!(
            "the test runs as uid {}, not root, so it cannot start a client under a second uid",
            own_uid()
        ));
    }
    let prefix: Vec<String> = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]
    .map(str::to_owned)
    .to_vec();
    let works = Command::new(&prefix[0])
        .args(&prefix[1..])
        .arg(workspace_binary("meterd", "meterd"))
        .arg("--version")
        .output()
        .map_err(|error| format!("setpriv does not run: {error}"))?;
    if !works.status.success() {
        return Err(format!(
            "uid 65534 cannot run the meterd binary: {}",
            String::from_utf8_lossy(&works.stderr).trim()
        ));
    }
    // The second user must reach the socket (mode 666) through its folder.
    std::fs::set_permissions(
        socket_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .map_err(|error| format!("cannot open the socket's folder to uid 65534: {error}"))?;
    Ok(prefix)
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
    for customer in ["B1-C1", "B1-C2", "B1-C3"] {
        grant_by_password(&backoffice, &meter.socket, customer);
    }
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
    grant_by_password(&backoffice, &meter.socket, "B1-C5");
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
        (
            "login without a grant",
            call("login", &string("B1-C1")),
            FaultCode::NotGranted,
        ),
        (
            "a grant without a backoffice",
            call("grant.start", &string("B1-C1")),
            FaultCode::GrantFailed,
        ),
        (
            "waiting on a request never made",
            call("grant.wait", &string("0123")),
            FaultCode::GrantFailed,
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
    // A POST without a length is told so (411), not answered as a parse
    // fault of an empty body.
    {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&meter.socket).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"POST /RPC2 HTTP/1.1\r\nHost: meterd\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 411"), "{answer}");
        assert!(answer.contains("Content-Length"), "{answer}");
    }
    let (status, answer) = unix_request(&meter.socket, "POST", call("status", "").as_bytes());
    assert_eq!((status, fault_code(&answer)), (200, None), "still serving");
    // Without a backoffice, flush answers false and the daemon says why.
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 1);
}

#[test]
fn backoffice_down_then_up_loses_nothing_and_charges_once() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
    backoffice.behave(|behaviour| behaviour.down = true);
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
    // The grant is kept in the meter's cache across every restart.
    grant_by_password(&backoffice, &setup.start().socket, "B1-C1");
    let mut random = Lcg(kill_test_seed(
        "sigkill_at_random_moments_loses_no_acknowledged_commit_and_charges_none_twice",
    ));
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
    let (backoffice, setup) = with_backoffice(&dir);
    let product = pid("B1-P1");
    let mut meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
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
    let (backoffice, setup) = with_backoffice(&dir);
    let mut meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
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
fn the_readmes_python_block_calls_what_the_package_defines() {
    let readme = include_str!("../../README.md");
    let package = include_str!("../../clients/python/src/meterd_client/__init__.py");
    assert!(readme.contains("pip install ./clients/python"));
    let block = readme
        .split("```python")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README has a Python block");
    assert!(
        block.contains("from meterd_client import connect"),
        "{block}"
    );
    assert!(package.contains("\ndef connect("));
    let called: Vec<&str> = block
        .split("meter.")
        .skip(1)
        .filter_map(|rest| rest.split_once('(').map(|(name, _)| name))
        .collect();
    assert!(called.len() >= 2, "{block}");
    for name in called {
        assert!(
            package.contains(&format!("    def {name}(")),
            "the README calls meter.{name}, which meterd_client does not define"
        );
    }
}

/// `pip install` of the package as a user would (from a copy, so the
/// checkout gets no build folders), then the installed module: `query`
/// fails closed where no meter answers, `use` refuses.
#[test]
fn the_python_package_installs_with_pip_and_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let package = source.join("src/meterd_client");
    std::fs::create_dir_all(&package).unwrap();
    let clients = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python");
    for file in [
        "pyproject.toml",
        "README.md",
        "src/meterd_client/__init__.py",
    ] {
        std::fs::copy(format!("{clients}/{file}"), source.join(file)).unwrap();
    }
    let target = dir.path().join("installed");
    let installed = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
        .arg(&target)
        .arg(&source)
        .output()
        .expect("python3 -m pip runs");
    assert!(installed.status.success(), "{installed:?}");
    let run = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys\n\
             sys.path.insert(0, sys.argv[1])\n\
             import meterd_client\n\
             assert meterd_client.__file__.startswith(sys.argv[1]), meterd_client.__file__\n\
             meter = meterd_client.connect(sys.argv[2])\n\
             print('query', meter.query('B1-P1'))\n\
             try:\n    meter.try_query('B1-P1')\nexcept meterd_client.MeterUnavailable:\n    print('unavailable')\n\
             try:\n    with meter.use('B1-P1'):\n        print('used')\n\
             except meterd_client.MeterUnavailable:\n    print('no use')\n",
        )
        .arg(&target)
        .arg(dir.path().join("no-meter.sock"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout)
            .lines()
            .collect::<Vec<_>>(),
        ["query False", "unavailable", "no use"]
    );
}

#[test]
fn login_needs_a_grant_of_the_callers_own_uid() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start_with(&["--socket-mode", "666"]);
    let mut client = meterd::client::Meter::connect(&meter.socket);
    let refused = client.login(cid("B1-C4")).unwrap_err();
    let meterd::client::ClientError::Fault(fault) = refused else {
        panic!("a fault, not {refused}");
    };
    assert_eq!(fault.registered(), Some(FaultCode::NotGranted));
    assert!(fault.message.contains("meterd grant B1-C4"), "{fault}");

    // A wrong password: the backoffice's refusal, as fault 107.
    backoffice.behave(|behaviour| {
        behaviour.passwords.insert(cid("B1-C4"), "right".to_owned());
    });
    let wrong = meterd_run(
        &meter.socket,
        &["grant", "--password-stdin", "B1-C4"],
        "wrong\n",
        &[],
    );
    assert_eq!(wrong.code, 2, "{wrong:?}");
    assert!(wrong.stderr.contains("fault 107"), "{wrong:?}");
    assert!(wrong.stderr.contains("wrong password"), "{wrong:?}");
    let empty = meterd_run(
        &meter.socket,
        &["grant", "--password-stdin", "B1-C4"],
        "",
        &[],
    );
    assert_eq!(empty.code, 64, "{empty:?}");
    assert!(client.login(cid("B1-C4")).is_err());

    grant_by_password(&backoffice, &meter.socket, "B1-C4");
    let made = backoffice.ledger(|ledger| ledger.grants.clone());
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].0, Mid::parse("B1-M1").unwrap());
    client
        .login(cid("B1-C4"))
        .expect("granted: the login is allowed");
    let listed = client.grants().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].cid, cid("B1-C4"));
    let shown = meterd_run(&meter.socket, &["grants"], "", &[]);
    assert!(shown.stdout.contains("B1-C4"), "{shown:?}");
    assert!(shown.stdout.contains("until revoked"), "{shown:?}");

    // Another local user may not use this user's grant, nor inherit its
    // session from a parent process of this user.
    let other = match as_second_user(dir.path()) {
        Ok(prefix) => prefix,
        Err(reason) => {
            println!("skipping the second-uid assertions: {reason}");
            return;
        }
    };
    let login = meterd_run(
        &meter.socket,
        &["login", "B1-C4", "--context", "own"],
        "",
        &other,
    );
    assert_eq!(login.code, 2, "{login:?}");
    assert!(login.stderr.contains("fault 106"), "{login:?}");
    assert!(login.stderr.contains("uid 65534"), "{login:?}");
    // This test process (root) holds a session of B1-C4; the second user's
    // process, its child, must not be charged to it.
    let query = meterd_run(
        &meter.socket,
        &["query", "B1-P1", "--context", "own"],
        "",
        &other,
    );
    assert_eq!(query.code, 1, "no payer for uid 65534: {query:?}");
    let parent = meterd_run(&meter.socket, &["query", "B1-P1"], "", &other);
    assert_eq!(parent.code, 2, "{parent:?}");
    assert!(parent.stderr.contains("another user"), "{parent:?}");
    // Only root may grant every user of the machine; then they all may log in.
    backoffice.behave(|behaviour| {
        behaviour.passwords.insert(cid("B1-C6"), "six".to_owned());
    });
    let machine = ["grant", "--machine", "--password-stdin", "B1-C6"];
    let refused = meterd_run(&meter.socket, &machine, "six\n", &other);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(refused.stderr.contains("only root"), "{refused:?}");
    let granted = meterd_run(&meter.socket, &machine, "six\n", &[]);
    assert_eq!(granted.code, 0, "{granted:?}");
    assert_eq!(
        granted.stdout.trim(),
        "granted B1-C6 to every user of this machine"
    );
    let login = meterd_run(
        &meter.socket,
        &["login", "B1-C6", "--context", "own"],
        "",
        &other,
    );
    assert_eq!(login.code, 0, "{login:?}");
    // The second user sees the machine-wide grant only; root sees both.
    let theirs = meterd_run(&meter.socket, &["grants"], "", &other);
    assert!(theirs.stdout.contains("B1-C6") && !theirs.stdout.contains("B1-C4"));
}

/// A root process that logged in with root's own grant and then calls
/// setuid in place keeps its PID and start time, so its context is the
/// same; the session must still not pay for the new uid's uses.
#[test]
fn a_session_does_not_follow_its_process_to_another_uid() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start_with(&["--socket-mode", "666"]);
    let python = Path::new("/usr/bin/python3");
    let runnable = as_second_user(dir.path()).and_then(|_| {
        if python.exists() {
            Ok(())
        } else {
            Err("there is no /usr/bin/python3 to change its uid".to_owned())
        }
    });
    if let Err(reason) = runnable {
        println!("skipping: {reason}");
        return;
    }
    grant_by_password(&backoffice, &meter.socket, "B1-C4");
    let output = Command::new(python)
        .arg("-c")
        .arg(
            "import os, sys\n\
             sys.path.insert(0, sys.argv[1])\n\
             from meterd_client import connect\n\
             meter = connect(sys.argv[2])\n\
             meter.login('B1-C4')\n\
             print('root', meter.query('B1-P1'))\n\
             meter.cancel('B1-P1')\n\
             os.setgroups([])\n\
             os.setgid(65534)\n\
             os.setuid(65534)\n\
             meter = connect(sys.argv[2])\n\
             print('after setuid', meter.query('B1-P1'))\n",
        )
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../clients/python/src"
        ))
        .arg(&meter.socket)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        ["root True", "after setuid False"],
        "{output:?}"
    );
}

/// Starts `meterd grant CID` and reads the user code it prints.
fn start_device_grant(socket: &Path, customer: &str) -> (std::process::Child, String) {
    let mut child = Command::new(workspace_binary("meterd", "meterd"))
        .arg("--socket")
        .arg(socket)
        .args(["grant", customer])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meterd grant runs");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped stdout"))
        .read_line(&mut line)
        .expect("the instruction line");
    let prefix =
        format!("Open http://backoffice.test/grant, log in as {customer} and enter the code ");
    let code = line
        .trim()
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("instruction line: {line:?}"))
        .to_owned();
    (child, code)
}

fn finish(child: std::process::Child) -> CliRun {
    let output = child.wait_with_output().expect("meterd grant ends");
    CliRun {
        code: output.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn the_device_flow_grants_once_the_customer_approves() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start_with(&["--socket-mode", "666"]);
    let (child, code) = start_device_grant(&meter.socket, "B1-C4");
    let asked = backoffice.ledger(|ledger| ledger.device_requests.clone());
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].cid, cid("B1-C4"));
    assert!(asked[0].scope.admits(own_uid()) && !asked[0].scope.admits(own_uid() + 1));
    assert!(!asked[0].label.is_empty(), "the machine's label");
    let mut client = meterd::client::Meter::connect(&meter.socket);
    assert!(client.login(cid("B1-C4")).is_err(), "not approved yet");
    assert!(backoffice.approve(&code, None));
    let run = finish(child);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout.lines().last(),
        Some(format!("granted B1-C4 to uid {}", own_uid()).as_str())
    );
    client
        .login(cid("B1-C4"))
        .expect("approved: the login is allowed");

    // Refused by the customer: exit 2, no grant.
    let (child, code) = start_device_grant(&meter.socket, "B1-C5");
    assert!(backoffice.deny(&code));
    let run = finish(child);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("B1-C5 refused the grant"), "{run:?}");
    assert!(client.login(cid("B1-C5")).is_err());

    // Never approved: the code expires, exit 2.
    backoffice.behave(|behaviour| behaviour.grant_expires_in_s = 1);
    let (child, _) = start_device_grant(&meter.socket, "B1-C5");
    let run = finish(child);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("expired"), "{run:?}");
    assert!(client.login(cid("B1-C5")).is_err());

    // Only the user who started a request may wait on it.
    backoffice.behave(|behaviour| behaviour.grant_expires_in_s = 600);
    let started = client.grant_start(cid("B1-C7"), false).unwrap();
    // The system's Python: a user's own (pyenv, say) may be closed to others.
    let python = Path::new("/usr/bin/python3");
    let second_user = as_second_user(dir.path()).and_then(|other| {
        if python.exists() {
            Ok(other)
        } else {
            Err("there is no /usr/bin/python3 to run as uid 65534".to_owned())
        }
    });
    match second_user {
        Ok(other) => {
            // The client module, where uid 65534 can read it whatever the
            // checkout's own permissions (a clone in a 0700 folder, say).
            let module_dir = dir.path().join("python");
            std::fs::create_dir_all(&module_dir).unwrap();
            std::fs::set_permissions(
                &module_dir,
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
            let package = module_dir.join("meterd_client");
            std::fs::create_dir_all(&package).unwrap();
            std::fs::copy(
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../clients/python/src/meterd_client/__init__.py"
                ),
                package.join("__init__.py"),
            )
            .unwrap();
            for (path, mode) in [(&package, 0o755), (&package.join("__init__.py"), 0o644)] {
                std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .unwrap();
            }
            let waited = Command::new(&other[0])
                .args(&other[1..])
                .arg(python)
                .arg("-c")
                .arg(
                    "import sys\n\
                     sys.path.insert(0, sys.argv[1])\n\
                     from meterd_client import MeterFault, connect\n\
                     try:\n    connect(sys.argv[2]).call('grant.wait', sys.argv[3])\n    print('answered')\n\
                     except MeterFault as fault:\n    print('fault', fault.code)\n",
                )
                .arg(&module_dir)
                .arg(&meter.socket)
                .arg(&started.request)
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&waited.stdout);
            assert_eq!(said.trim(), "fault -32602", "{waited:?}");
        }
        Err(reason) => println!("skipping the second-uid assertion: {reason}"),
    }
    assert!(backoffice.approve(&started.user_code, Some(u64::MAX / 2)));
    let status = loop {
        match client.grant_wait(&started.request).unwrap() {
            proto::grant::PollStatus::Pending => continue,
            status => break status,
        }
    };
    assert!(
        matches!(status, proto::grant::PollStatus::Approved(_)),
        "{status:?}"
    );
    client.login(cid("B1-C7")).unwrap();
    assert!(
        client.grant_wait(&started.request).is_err(),
        "an answered request is forgotten"
    );
}

/// Copies a folder tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Logs `customer` in and commits one use of each product.
fn use_products(socket: &Path, customer: &str, products: &[&str]) {
    let mut client = meterd::client::Meter::connect(socket);
    client.login(cid(customer)).unwrap();
    for product in products {
        assert!(client.query(pid(product)), "{product} may be used");
        client.commit(pid(product)).unwrap();
    }
    assert!(client.logout(cid(customer)).unwrap());
}

#[test]
fn a_data_folder_made_again_uploads_everything_without_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let mut meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
    use_products(&meter.socket, "B1-C1", &["B1-P1", "B1-P2"]);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    meter.running.child.kill().unwrap();
    meter.running.child.wait().unwrap();
    // The data folder is lost; the meter starts again with the same MID and
    // secret, and its sequence numbers start again at 1.
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    let meter = setup.start();
    let mut client = meterd::client::Meter::connect(&meter.socket);
    assert!(
        client.login(cid("B1-C1")).is_err(),
        "the grant went with the folder"
    );
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
    use_products(&meter.socket, "B1-C1", &["B1-P3"]);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let (applied, conflicts) =
        backoffice.ledger(|ledger| (ledger.applied.clone(), ledger.conflicts.clone()));
    assert_eq!(conflicts, [], "no batch id was reused");
    let ids: HashSet<_> = applied.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 2, "two batches, two ids: {ids:?}");
    let counts = commits(&backoffice.applied_readings());
    let customer = Some(Payer::Customer(cid("B1-C1")));
    assert_eq!(
        counts,
        HashMap::from([
            ((pid("B1-P1"), customer), 1),
            ((pid("B1-P2"), customer), 1),
            ((pid("B1-P3"), customer), 1),
        ]),
        "every use charged once"
    );
}

/// The meter's status, as `meterd status` prints it.
fn status_of(socket: &Path) -> HashMap<String, String> {
    let run = meterd_run(socket, &["status"], "", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    run.stdout
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name.to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// A data folder restored from a backup: the readings it shares with what
/// the original sent go again under the same batch id (applied once), its
/// new readings under a new one (never a conflict, never charged twice).
#[test]
fn a_restored_backup_charges_every_use_once() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let mut meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
    use_products(&meter.socket, "B1-C1", &["B1-P1"]);
    // A backup of the data folder, taken with these readings not yet sent.
    meter.running.child.kill().unwrap();
    meter.running.child.wait().unwrap();
    let backup = dir.path().join("backup");
    copy_tree(&dir.path().join("data"), &backup);
    let mut meter = setup.start();
    use_products(&meter.socket, "B1-C1", &["B1-P2"]);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    meter.running.child.kill().unwrap();
    meter.running.child.wait().unwrap();
    // The backup is restored: it holds P1's readings, which the original
    // sent, and takes P3's.
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    copy_tree(&backup, &dir.path().join("data"));
    let meter = setup.start();
    use_products(&meter.socket, "B1-C1", &["B1-P3"]);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let (applied, attempts, conflicts) = backoffice.ledger(|ledger| {
        (
            ledger.applied.clone(),
            ledger.attempts.clone(),
            ledger.conflicts.clone(),
        )
    });
    assert_eq!(conflicts, [], "new readings never reuse a batch id");
    let counts = commits(&backoffice.applied_readings());
    let customer = Some(Payer::Customer(cid("B1-C1")));
    assert_eq!(
        counts,
        HashMap::from([
            ((pid("B1-P1"), customer), 1),
            ((pid("B1-P2"), customer), 1),
            ((pid("B1-P3"), customer), 1),
        ]),
        "every use charged once: {applied:?}"
    );
    // P1's batch: sent by the original and again by the restored copy.
    let first = &applied[0].0;
    assert_eq!(attempts[first], 2, "{attempts:?}");
    assert_eq!(applied.len(), 3, "P1's batch, P2's, P3's: {applied:?}");
    let status = status_of(&meter.socket);
    assert_eq!(status["conflictedBatches"], "0", "{status:?}");
    assert_eq!(status["pendingReadings"], "0", "{status:?}");
}

/// A meter whose clock the backoffice refuses is told so in `status`
/// (fault 209 with the offset), and uploads once the clocks agree.
#[test]
fn a_meter_whose_clock_is_refused_shows_why_in_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
    backoffice.behave(|behaviour| behaviour.clock_offset_ms = 3_600_000);
    use_products(&meter.socket, "B1-C1", &["B1-P1"]);
    meterd_cli(&meter.socket, &["flush"]);
    let status = status_of(&meter.socket);
    let error = &status["lastError"];
    assert!(error.contains("209"), "{status:?}");
    assert!(error.contains("3600 s off"), "{status:?}");
    assert_ne!(status["pendingReadings"], "0", "nothing was applied");
    backoffice.behave(|behaviour| behaviour.clock_offset_ms = 0);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let status = status_of(&meter.socket);
    assert_eq!(status["pendingReadings"], "0", "{status:?}");
    assert_eq!(status["lastError"], "-", "{status:?}");
}

#[test]
fn a_batch_id_sent_again_with_other_readings_is_set_aside_and_its_readings_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
    use_products(&meter.socket, "B1-C1", &["B1-P1"]);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    // The backoffice answers the next batch with 205, as it does for an id
    // it applied before with other readings.
    backoffice.behave(|behaviour| behaviour.conflict = true);
    use_products(&meter.socket, "B1-C1", &["B1-P2"]);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let conflicts = backoffice.ledger(|ledger| ledger.conflicts.clone());
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    let status = status_of(&meter.socket);
    assert_eq!(status["conflictedBatches"], "1", "{status:?}");
    assert_eq!(status["conflictedBatchIds"], conflicts[0].to_string());
    // login, P2, logout.
    assert_eq!(status["conflictedReadings"], "3", "{status:?}");
    assert_eq!(status["pendingReadings"], "0");
    // Later uses upload under a new instance id; the set-aside batch is not
    // sent again.
    backoffice.behave(|behaviour| behaviour.conflict = false);
    use_products(&meter.socket, "B1-C1", &["B1-P3"]);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let (applied, attempts, conflicts) = backoffice.ledger(|ledger| {
        (
            ledger.applied.clone(),
            ledger.attempts.clone(),
            ledger.conflicts.clone(),
        )
    });
    assert_eq!(conflicts.len(), 1, "no second conflict");
    assert_eq!(attempts[&conflicts[0]], 1, "never sent again");
    let instance = |id: &proto::BatchId| id.as_str().split(':').next().unwrap().to_owned();
    assert_ne!(
        instance(&applied.last().unwrap().0),
        instance(&conflicts[0]),
        "a new instance id after the conflict"
    );
    let counts = commits(&backoffice.applied_readings());
    let customer = Some(Payer::Customer(cid("B1-C1")));
    assert_eq!(
        counts,
        HashMap::from([((pid("B1-P1"), customer), 1), ((pid("B1-P3"), customer), 1),])
    );
    assert_eq!(applied.len(), 2);
    assert_eq!(status_of(&meter.socket)["conflictedReadings"], "3");
    // The set-aside readings are kept across a restart too.
    drop(meter);
    let meter = setup.start();
    assert_eq!(status_of(&meter.socket)["conflictedReadings"], "3");
}

/// The meter uploads its readings packed; a backoffice older than that
/// form refuses it as invalid parameters, and the meter then sends the same
/// batch, and the later ones (for an hour), as structs, without losing or
/// doubling a use.
#[test]
fn readings_go_packed_and_as_structs_to_a_backoffice_that_refuses_packed() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
    use_products(&meter.socket, "B1-C1", &["B1-P1"]);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let sends = |backoffice: &FakeBackoffice| {
        backoffice.ledger(|ledger| {
            (
                ledger.packed_sends,
                ledger.struct_sends,
                ledger.packed_refused,
            )
        })
    };
    let (packed, structs, refused) = sends(&backoffice);
    assert!(packed >= 1, "{packed} packed sends");
    assert_eq!((structs, refused), (0, 0));
    drop(meter);

    let old_dir = tempfile::tempdir().unwrap();
    let (old, setup) = with_backoffice(&old_dir);
    old.behave(|behaviour| behaviour.structs_only = true);
    let meter = setup.start();
    grant_by_password(&old, &meter.socket, "B1-C1");
    use_products(&meter.socket, "B1-C1", &["B1-P1", "B1-P2"]);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    use_products(&meter.socket, "B1-C1", &["B1-P2"]);
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let (packed, structs, refused) = sends(&old);
    assert_eq!((packed, refused), (0, 1), "refused once, never tried again");
    assert!(structs >= 2, "{structs} sends as structs");
    let customer = Some(Payer::Customer(cid("B1-C1")));
    assert_eq!(
        commits(&old.applied_readings()),
        HashMap::from([((pid("B1-P1"), customer), 1), ((pid("B1-P2"), customer), 2)])
    );
    assert_eq!(status_of(&meter.socket)["pendingReadings"], "0");
}

/// The backoffice charges a component to the enclosing product's owner only
/// when the enclosing commit arrives in the same batch: a flush while the
/// enclosing use is still open must not part them.
#[test]
fn a_component_is_uploaded_in_the_batch_of_its_enclosing_use() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
    let (editor, speller, other) = (pid("B1-P1"), pid("B1-P2"), pid("B1-P3"));
    let mut program = meterd::client::Meter::connect(&meter.socket);
    program.login(cid("B1-C1")).unwrap();
    // Another use, complete, before the component: it may go at once.
    assert!(program.try_query(other).unwrap());
    program.commit(other).unwrap();
    assert!(program.try_query(editor).unwrap());
    assert!(program.try_query(speller).unwrap());
    program.commit(speller).unwrap();
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let uploaded = commits(&backoffice.applied_readings());
    assert_eq!(
        uploaded.get(&(other, Some(Payer::Customer(cid("B1-C1"))))),
        Some(&1),
        "what came before went: {uploaded:?}"
    );
    assert!(
        !uploaded.contains_key(&(speller, Some(Payer::OwnerOf(editor)))),
        "the spell check waits for the editor's commit: {uploaded:?}"
    );
    program.commit(editor).unwrap();
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    let batches = backoffice.ledger(|ledger| ledger.applied.clone());
    let together = batches.iter().any(|(_, readings)| {
        let in_batch = commits(readings);
        in_batch.contains_key(&(speller, Some(Payer::OwnerOf(editor))))
            && in_batch.contains_key(&(editor, Some(Payer::Customer(cid("B1-C1")))))
    });
    assert!(together, "one batch holds both: {batches:?}");
}

/// Someone on the path between meter and backoffice answers in its place:
/// "applied" (which would make the meter delete readings), 205 (which would
/// set the batch aside), or a real answer replayed from another call. The
/// meter trusts only answers signed for the very call it made, and loses
/// nothing.
#[test]
fn an_answer_not_signed_for_the_call_made_changes_nothing_on_the_meter() {
    use tests::fake_backoffice::Answers;
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
    use_products(&meter.socket, "B1-C1", &["B1-P1", "B1-P2"]);
    let pending = status_of(&meter.socket)["pendingReadings"].clone();
    assert_ne!(pending, "0");
    for (answers, conflict) in [
        (Answers::Unsigned, false),
        (Answers::Unsigned, true),
        (Answers::SignedForAnotherCall, false),
    ] {
        backoffice.behave(|behaviour| {
            behaviour.answers = answers;
            behaviour.conflict = conflict;
        });
        assert_eq!(meterd_cli(&meter.socket, &["flush"]), 1, "{answers:?}");
        let status = status_of(&meter.socket);
        assert!(
            status["lastError"].contains("not trusted"),
            "{answers:?}: {status:?}"
        );
        assert_eq!(
            status["pendingReadings"], pending,
            "{answers:?}: {status:?}"
        );
        assert_eq!(status["conflictedBatches"], "0", "{answers:?}: {status:?}");
    }
    backoffice.behave(|behaviour| {
        behaviour.answers = Answers::Signed;
        behaviour.conflict = false;
    });
    assert_eq!(meterd_cli(&meter.socket, &["flush"]), 0);
    assert_eq!(status_of(&meter.socket)["pendingReadings"], "0");
    let counts = commits(&backoffice.applied_readings());
    let customer = Some(Payer::Customer(cid("B1-C1")));
    assert_eq!(
        counts,
        HashMap::from([((pid("B1-P1"), customer), 1), ((pid("B1-P2"), customer), 1),]),
        "every use applied once"
    );
}

/// A grant answered by someone else than the backoffice (a forged "granted"
/// for a customer who never said yes) is not recorded on the meter.
#[test]
fn a_grant_answer_not_signed_for_the_call_made_grants_nothing() {
    use tests::fake_backoffice::Answers;
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    let password = "the password of B1-C1";
    backoffice.behave(|behaviour| {
        behaviour
            .passwords
            .insert(cid("B1-C1"), password.to_owned());
    });
    for answers in [Answers::Unsigned, Answers::SignedForAnotherCall] {
        backoffice.behave(|behaviour| behaviour.answers = answers);
        let run = meterd_run(
            &meter.socket,
            &["grant", "--password-stdin", "B1-C1"],
            &format!("{password}\n"),
            &[],
        );
        assert_ne!(run.code, 0, "{answers:?}: {run:?}");
        assert!(
            run.stderr.contains("not trusted") || run.stdout.contains("not trusted"),
            "{answers:?}: {run:?}"
        );
        assert_eq!(status_of(&meter.socket)["grantsHeld"], "0", "{answers:?}");
    }
    backoffice.behave(|behaviour| behaviour.answers = Answers::Signed);
    grant_by_password(&backoffice, &meter.socket, "B1-C1");
    assert_eq!(status_of(&meter.socket)["grantsHeld"], "1");
}

/// The load generator's smoke run: every phase answers, and each commit
/// rate comes with its ratio to the data folder's raw `fdatasync` rate
/// measured in the same run (the full runs are by hand: docs/benchmarks.md).
#[test]
fn the_load_generator_reports_commit_rates_beside_the_disks_fdatasync_rate() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_meter-load"))
        .arg(workspace_binary("meterd", "meterd"))
        .arg(&work)
        .args([
            "--queries",
            "200",
            "--clients",
            "4",
            "--seconds",
            "1",
            "--fill",
            "0",
        ])
        .output()
        .expect("meter-load runs");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let disk = printed
        .lines()
        .filter(|line| line.starts_with("disk: ") && line.contains("fdatasync per second in"))
        .count();
    assert_eq!(disk, 2, "{printed}");
    let phases = [
        "commit: 1 client (a thread each)",
        "commit: 4 clients (a thread each)",
        "commit: 4 clients (one event thread)",
    ];
    for phase in phases {
        let line = printed
            .lines()
            .find(|line| line.starts_with(phase))
            .unwrap_or_else(|| panic!("no line for {phase}: {printed}"));
        let ratio: f64 = line
            .rsplit_once("= ")
            .and_then(|(_, tail)| tail.split_once("x the disk's fdatasync rate"))
            .and_then(|(ratio, _)| ratio.parse().ok())
            .unwrap_or_else(|| panic!("no ratio in {line:?}"));
        assert!(ratio > 0.0, "{line}");
        assert!(line.contains("% busy, meterd "), "{line}");
        if !phase.contains("1 client") {
            // Beside the same clients' calls answered from memory.
            assert!(line.contains("x the pairs without a disk"), "{line}");
        }
    }
    for driver in ["a thread each", "one event thread"] {
        let memory = format!("memory: 4 clients ({driver}), ");
        assert!(
            printed.lines().any(|line| line.starts_with(&memory)
                && line.contains("query+cancel pairs")
                && line.contains("% busy")),
            "no {memory:?} line: {printed}"
        );
    }
}

/// The Python client's latency bench, smoke-run against a real meter:
/// every row printed with its ratio to the raw socket floor of the same
/// run (the full runs are by hand: docs/benchmarks.md).
#[test]
fn the_python_query_bench_reports_each_client_beside_the_raw_floor() {
    let dir = tempfile::tempdir().unwrap();
    let (_backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    let output = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../clients/python/bench/query_latency.py"
        ))
        .arg(&meter.socket)
        .arg("50")
        .output()
        .expect("python3 runs");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    for row in ["raw:", "package:", "xmlrpc:", "raw again:"] {
        let line = printed
            .lines()
            .find(|line| line.starts_with(row))
            .unwrap_or_else(|| panic!("no {row} row in {printed}"));
        assert!(line.ends_with("x the raw floor"), "{line}");
    }
}

/// A C program built with the system's compiler against `meter.h` and
/// libmeter makes uses from four threads, each in its own context, and they
/// are uploaded and charged to its customer; without a meter it fails with
/// the library's reason and makes no use.
#[test]
fn a_c_program_linked_with_libmeter_meters_its_uses() {
    let dir = tempfile::tempdir().unwrap();
    let (backoffice, setup) = with_backoffice(&dir);
    let meter = setup.start();
    grant_by_password(&backoffice, &meter.socket, "B1-C4");
    let lib = crate::support::workspace_library("meter-c");
    assert!(lib.join("libmeter.so").is_file(), "{}", lib.display());
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let program = dir.path().join("metered");
    let compiled = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pthread", "-I"])
        .arg(root.join("clients/c/include"))
        .arg(root.join("clients/c/examples/metered.c"))
        .arg("-L")
        .arg(&lib)
        .args(["-lmeter", "-o"])
        .arg(&program)
        .output()
        .expect("the system's C compiler (cc) runs");
    assert!(
        compiled.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let run = |socket: &Path| {
        Command::new(&program)
            .arg(socket)
            .args(["B1-C4", "B1-P4", "4", "5"])
            .env("LD_LIBRARY_PATH", &lib)
            .output()
            .expect("the C program runs")
    };
    let ran = run(&meter.socket);
    let said = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert_eq!(said.trim(), "committed 20 uses, uploaded: yes");
    let readings = backoffice.applied_readings();
    assert_eq!(
        commits(&readings),
        HashMap::from([((pid("B1-P4"), Some(Payer::Customer(cid("B1-C4")))), 20)])
    );
    let contexts: std::collections::HashSet<String> = readings
        .iter()
        .filter(|reading| matches!(reading.event, Event::Commit { .. }))
        .map(|reading| reading.context.as_str().to_owned())
        .collect();
    assert_eq!(contexts.len(), 4, "one context per thread: {contexts:?}");
    // No meter there: the query fails closed and the program says why.
    let ran = run(&dir.path().join("no-meter.sock"));
    assert_eq!(ran.status.code(), Some(2));
    let why = String::from_utf8_lossy(&ran.stderr);
    assert!(why.contains("login: no meter at"), "{why}");
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout).trim(),
        "committed 0 uses, uploaded: no"
    );
}
