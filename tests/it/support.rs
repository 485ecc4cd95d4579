//! Starting binaries and speaking raw HTTP to them, bounded in time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proto::Fault;
use proto::xmlrpc::Value;

/// How long any one network read or write may take before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A child process that is killed when the test ends, however it ends.
pub struct Running {
    pub child: Child,
    pub first_line: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The variable that replays a kill test: its seed, as the test printed it.
pub const KILL_TEST_SEED: &str = "KILL_TEST_SEED";

/// The seed of a test that kills processes at moments it draws at random:
/// `KILL_TEST_SEED` if set (to replay a failure), else a fresh one. Printed
/// either way, so that it shows in a failing test's output (and with
/// `--nocapture`). The seed fixes when the kills come; the threads and the
/// machine's load still vary from run to run.
pub fn kill_test_seed(test: &str) -> u64 {
    let seed = match std::env::var(KILL_TEST_SEED) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{KILL_TEST_SEED}={text:?} is not a number")),
        Err(_) => {
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            since.as_secs().rotate_left(32)
                ^ u64::from(since.subsec_nanos())
                ^ u64::from(std::process::id()).rotate_left(16)
        }
    };
    eprintln!("{test}: {KILL_TEST_SEED}={seed} replays this run's kill times");
    seed
}

/// A pseudo-random sequence from a seed (see [`kill_test_seed`]).
pub struct Lcg(pub u64);

impl Lcg {
    /// The next number in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound
    }
}

/// Starts `program` with `args` and waits for the first line it prints.
pub fn start(program: &str, args: &[&str]) -> Running {
    start_with_env(program, args, &[])
}

/// Like `start`, with extra environment variables.
pub fn start_with_env(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Running {
    let mut child = Command::new(program)
        .args(args)
        // A developer's own meter must not leak into a test's binaries;
        // a test that wants one passes it in `envs`.
        .env_remove("METERD_SOCKET")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {program}: {error}"));
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut reader = BufReader::new(stdout);
    let mut first_line = String::new();
    reader.read_line(&mut first_line).expect("read first line");
    // Keep reading, so that later output never meets a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    assert!(!first_line.is_empty(), "{program} exited before printing");
    Running {
        child,
        first_line: first_line.trim().to_owned(),
    }
}

/// The address in a URL like `http://127.0.0.1:1234/RPC2`.
pub fn address_of(url: &str) -> SocketAddr {
    let rest = url.strip_prefix("http://").expect("http URL");
    let host = rest.split('/').next().expect("host part");
    host.parse().expect("socket address")
}

/// The status code and body of an HTTP/1.1 POST with `Connection: close`.
pub fn post(address: SocketAddr, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let stream = TcpStream::connect_timeout(&address, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    exchange(stream, &format!("POST {path}"), &address.to_string(), body)
}

/// Sends one request with `Connection: close` and reads the whole answer.
/// A server may refuse an oversize body before reading it; that is fine.
fn exchange(
    mut stream: impl Read + Write,
    request_line: &str,
    host: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let head = format!(
        "{request_line} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("write head");
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    split_response(&response)
}

/// The path of the workspace binary `name` from package `package`, built
/// first (once per test run) with the profile these tests were built with.
/// Cargo gives a test only its own package's binaries, and `meterd` and
/// `backoffice` live in packages of their own.
pub fn workspace_binary(package: &str, name: &str) -> std::path::PathBuf {
    built_in_workspace(package, &["--bin", name]).join(name)
}

/// The folder holding the shared library of workspace package `package`
/// (`lib<name>.so`), built first as `workspace_binary` builds binaries.
pub fn workspace_library(package: &str) -> std::path::PathBuf {
    built_in_workspace(package, &["--lib"])
}

/// Builds `target` of `package` once per test run, with the profile these
/// tests were built with, into their target folder; returns
/// `target/PROFILE`.
fn built_in_workspace(package: &str, target: &[&str]) -> std::path::PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let test_exe = std::env::current_exe().expect("test executable path");
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/PROFILE/deps");
    let target_dir = profile_dir.parent().expect("target directory");
    let profile = profile_dir
        .file_name()
        .and_then(|name| name.to_str())
        .expect("profile name");
    let key = format!("{package} {}", target.join(" "));
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !built.contains(&key) {
        let mut command = Command::new(env!("CARGO"));
        command
            .args(["build", "--quiet", "-p", package])
            .args(target)
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if profile == "release" {
            command.arg("--release");
        }
        let status = command.status().expect("cargo runs");
        assert!(status.success(), "cargo build -p {key} failed");
        built.push(key);
    }
    profile_dir.to_path_buf()
}

/// A running meterd with its socket.
pub struct MeterdRun {
    pub running: Running,
    pub socket: std::path::PathBuf,
}

/// Where a meterd stores things and how it uploads.
pub struct MeterdSetup {
    pub dir: std::path::PathBuf,
    pub backoffice: Option<(SocketAddr, proto::Mid, std::path::PathBuf)>,
}

impl MeterdSetup {
    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.join("meterd.sock")
    }

    /// Starts `meterd serve` and waits until it listens.
    pub fn start(&self) -> MeterdRun {
        self.start_with(&[])
    }

    /// Starts `meterd serve` with `extra` arguments (`--socket-mode 666`, say).
    pub fn start_with(&self, extra: &[&str]) -> MeterdRun {
        let socket = self.socket();
        let data = self.dir.join("data");
        let mut args = vec![
            "--socket".to_owned(),
            socket.display().to_string(),
            "serve".to_owned(),
            "--data-dir".to_owned(),
            data.display().to_string(),
        ];
        if let Some((address, mid, secret_file)) = &self.backoffice {
            args.extend([
                "--backoffice".to_owned(),
                format!("http://{address}/RPC2"),
                "--mid".to_owned(),
                mid.to_string(),
                "--secret-file".to_owned(),
                secret_file.display().to_string(),
            ]);
        }
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let meterd = workspace_binary("meterd", "meterd");
        // Warnings only: the tests kill and restart meters on purpose.
        let running = start_with_env(
            meterd.to_str().expect("UTF-8 path"),
            &args,
            &[("METERD_LOG", "warn")],
        );
        assert!(
            running.first_line.starts_with("meterd listening on"),
            "{}",
            running.first_line
        );
        MeterdRun { running, socket }
    }
}

/// The status code and body of an HTTP/1.1 request over a Unix socket.
pub fn unix_request(socket: &std::path::Path, method: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let stream = std::os::unix::net::UnixStream::connect(socket).expect("connect to meterd");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    exchange(stream, &format!("{method} /RPC2"), "meterd", body)
}

/// The status code and body of a complete HTTP/1.1 response (`Connection:
/// close`, so the body is everything after the head).
fn split_response(response: &[u8]) -> (u16, Vec<u8>) {
    let text_end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a complete HTTP response head");
    let head = String::from_utf8_lossy(&response[..text_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    (status, response[text_end + 4..].to_vec())
}

/// The registered fault code of an XML-RPC response, `None` for a success.
pub fn fault_code(body: &[u8]) -> Option<proto::FaultCode> {
    use proto::xmlrpc::{Limits, MethodResponse, parse_response};
    match parse_response(body, Limits::BACKOFFICE).expect("a valid XML-RPC response") {
        MethodResponse::Fault(fault) => fault.registered(),
        MethodResponse::Success(_) => None,
    }
}

/// Calls an operator method on a running backoffice and returns its value,
/// or the fault.
pub fn operator_call(
    address: SocketAddr,
    token: &str,
    method: &str,
    params: &[proto::xmlrpc::Value],
) -> Result<proto::xmlrpc::Value, proto::Fault> {
    use proto::xmlrpc::{Limits, MethodResponse, encode_call, parse_response};
    let body = encode_call(method, params);
    let stream = TcpStream::connect_timeout(&address, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let host = format!("{address}\r\nX-Operator-Token: {token}");
    let (status, answer) = exchange(stream, "POST /RPC2", &host, &body);
    assert_eq!(status, 200);
    match parse_response(&answer, Limits::BACKOFFICE).expect("an XML-RPC response") {
        MethodResponse::Success(value) => Ok(value),
        MethodResponse::Fault(fault) => Err(fault),
    }
}

/// A running backoffice on a temporary data folder, with its operator token.
pub struct Backoffice {
    pub running: Running,
    pub address: SocketAddr,
    pub token: String,
    pub data: std::path::PathBuf,
}

impl Backoffice {
    pub fn start(dir: &std::path::Path) -> Backoffice {
        Self::start_at(dir, "127.0.0.1:0")
    }

    pub fn start_at(dir: &std::path::Path, listen: &str) -> Backoffice {
        Self::start_with(dir, listen, &[])
    }

    /// Like `start_at`, with more environment variables (settings).
    pub fn start_with(dir: &std::path::Path, listen: &str, envs: &[(&str, &str)]) -> Backoffice {
        let binary = workspace_binary("backoffice", "backoffice");
        let data = dir.join("backoffice");
        let running = start_with_env(
            binary.to_str().expect("UTF-8 path"),
            &[
                "serve",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                listen,
                // Web logins in tests need not take half a second each.
                "--password-iterations",
                "1000",
            ],
            &[&[("BACKOFFICE_LOG", "warn")], envs].concat(),
        );
        let url = running
            .first_line
            .strip_prefix("backoffice listening on ")
            .expect("the listening line")
            .to_owned();
        let token = std::fs::read_to_string(data.join("operator-token")).expect("operator token");
        Backoffice {
            address: address_of(&url),
            running,
            token,
            data,
        }
    }

    pub fn call(&self, method: &str, params: &[Value]) -> Result<Value, Fault> {
        operator_call(self.address, &self.token, method, params)
    }

    /// Registers a meter of `owner`: its MID and secret.
    pub fn meter(&self, owner: &str) -> (String, String) {
        let meter = self
            .call("meter.create", &[s(owner)])
            .expect("meter.create");
        let member = |name: &str| {
            meter
                .member(name)
                .and_then(Value::as_str)
                .expect("member")
                .to_owned()
        };
        (member("MID"), member("secret"))
    }

    pub fn text(&self, method: &str, params: &[Value], member: &str) -> String {
        let value = self
            .call(method, params)
            .unwrap_or_else(|fault| panic!("{method}: {fault}"));
        value
            .member(member)
            .and_then(Value::as_str)
            .expect("member present")
            .to_owned()
    }
}

/// An XML-RPC string.
pub fn s(text: &str) -> Value {
    Value::string(text)
}

/// Lets the real meter on `socket` charge `cid` for this test's user, as a
/// customer on a headless machine does: `meterd grant --password-stdin`.
pub fn grant_by_password(socket: &std::path::Path, cid: &str, password: &str) {
    use std::io::Write as _;
    let mut child = Command::new(workspace_binary("meterd", "meterd"))
        .arg("--socket")
        .arg(socket)
        .args(["grant", "--password-stdin", cid])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meterd grant runs");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    writeln!(stdin, "{password}").unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && said.contains(&format!("granted {cid}")),
        "meterd grant {cid}: {said}"
    );
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970");
    u64::try_from(since.as_millis()).expect("ms fit in 64 bits")
}

/// The month (`YYYYMM`, UTC) of `time_ms`, as statements date their lines.
pub fn month_of(time_ms: u64) -> u32 {
    let (year, month, _) = proto::time::civil_date(time_ms);
    u32::try_from(year * 100 + i64::from(month)).expect("a four-digit year")
}

/// Every month from the one of `since_ms` to the current one, in order.
/// A test that dates its money with the clock reads the statement of each
/// (`/statement?month=`), not "this month": lines made just before a month
/// ends are on the previous month's page by the time it is read.
pub fn months_since(since_ms: u64) -> Vec<u32> {
    let last = month_of(now_ms());
    let mut month = month_of(since_ms);
    let mut months = vec![month];
    while month < last {
        month = if month % 100 == 12 {
            month + 89
        } else {
            month + 1
        };
        months.push(month);
    }
    months
}

#[test]
fn months_since_covers_a_year_end() {
    // 2025-12-31T23:59:59.999Z and one ms later.
    assert_eq!(month_of(1_767_225_599_999), 202_512);
    assert_eq!(month_of(1_767_225_600_000), 202_601);
    assert_eq!(month_of(0), 197_001);
    let months = months_since(1_767_225_599_999);
    assert_eq!(&months[..2], &[202_512, 202_601]);
    assert!(months.windows(2).all(|pair| pair[0] < pair[1]));
}
