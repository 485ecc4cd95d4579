//! Soak run of the kill test (issue 13): a real backoffice and a real meterd,
//! built with the `fault-injection` feature, under metered load; each cycle
//! SIGKILLs meterd, the backoffice, both or neither at a random moment, while
//! injected fsync failures stop either of them at random (a stopped meterd
//! answers 108, a stopped backoffice -32603 and 503 on `/health`). Whatever
//! died or stopped is restarted. At the end injection is turned off, both
//! restart, the meter uploads everything, and the uses charged in the ledger
//! are compared with the commits the clients saw acknowledged. Not run in
//! CI: see `--help` and `docs/benchmarks.md`.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meterd::client::{ClientError, Meter};
use proto::xmlrpc::{Limits, MethodResponse, Value, encode_call, parse_response};
use proto::{Amount, Cid, Context, FaultCode, Pid};

const USAGE: &str = "usage: soak [--cycles N] [--seed S] [--sync-fail-permille N] [--clients K]
            [--cycle-ms MS] [--dir DIR] [--keep] [--meterd PATH --backoffice PATH]
            [--taca FILE]

Repeats the kill test across meterd and the backoffice, with fsync failures
injected at random, and reports acknowledged / charged / lost / doubled.
Exits 1 when a use acknowledged was not charged (lost), when more uses were
charged than could have been recorded (doubled), when the meter had a batch
refused with 205 (it resent a batch id with other readings), or when
`backoffice verify` finds a problem; 2 when the run itself could not go on;
64 on bad flags.

  --cycles N       cycles to run (default 1000)
  --seed S         the seed of the kill moments and of every process's fsync
                   failures (default: fresh, printed; pass it to replay the
                   same choices; thread timing still varies)
  --sync-fail-permille N
                   each fsync of meterd and the backoffice fails with
                   probability N/1000 during the cycles (default 4)
  --clients K      client threads doing login/query/commit (default 4)
  --cycle-ms MS    a cycle lasts between MS/2 and 3*MS/2 ms (default 1000)
  --dir DIR        work folder, must not exist (default: a new folder in the
                   temporary folder; removed after a clean run unless --keep)
  --meterd PATH, --backoffice PATH
                   the binaries to run, built with `--features
                   fault-injection`. Default: the soak builds them itself,
                   `cargo build -p meterd -p backoffice --features
                   meterd/fault-injection,backoffice/fault-injection` into
                   the target folder and profile it was built with, so
                   target/PROFILE/meterd and target/PROFILE/backoffice are
                   then the fault-injection builds (a later plain build
                   replaces them)
  --taca FILE      the flat TACA (0.25 per use) as wasm; default: built from
                   taca-sdk/examples (needs the wasm32-unknown-unknown target)

Run: cargo run --release -p tests --bin soak --features fault-injection -- --cycles 1000";

/// The fixed price of one use under the flat TACA, in nanos of a unit.
const PRICE_NANOS: i128 = 250_000_000;
/// What the consumer deposits: far more than any run uses.
const DEPOSIT_UNITS: i64 = 100_000_000;
const PASSWORD: &str = "soak-Otter-93-tulip";
/// How long a process may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the final upload may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// The line `durable` prints for each injected failure (see its docs).
const INJECTED_LINE: &str = "durable: injected fsync failure";
/// The line `durable` prints when it opens a folder with injection on.
const ARMED_LINE: &str = "durable: fault injection on";

struct Options {
    cycles: u64,
    seed: u64,
    permille: u64,
    clients: usize,
    cycle_ms: u64,
    dir: Option<PathBuf>,
    keep: bool,
    meterd: Option<PathBuf>,
    backoffice: Option<PathBuf>,
    taca: Option<PathBuf>,
}

fn fresh_seed() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    since.as_secs().rotate_left(32)
        ^ u64::from(since.subsec_nanos())
        ^ u64::from(std::process::id()).rotate_left(16)
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        cycles: 1000,
        seed: fresh_seed(),
        permille: 4,
        clients: 4,
        cycle_ms: 1000,
        dir: None,
        keep: false,
        meterd: None,
        backoffice: None,
        taca: None,
    };
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        if flag == "--keep" {
            options.keep = true;
            continue;
        }
        let value = rest
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"))?;
        let number = || -> Result<u64, String> {
            value
                .parse()
                .map_err(|_| format!("{flag} needs a whole number, not {value:?}"))
        };
        match flag.as_str() {
            "--cycles" => options.cycles = number()?,
            "--seed" => options.seed = number()?,
            "--sync-fail-permille" => {
                options.permille = number()?;
                if options.permille > 1000 {
                    return Err("--sync-fail-permille is at most 1000".into());
                }
            }
            "--clients" => {
                options.clients = usize::try_from(number()?)
                    .ok()
                    .filter(|clients| (1..=256).contains(clients))
                    .ok_or("--clients is between 1 and 256")?;
            }
            "--cycle-ms" => {
                options.cycle_ms = number()?;
                if !(20..=600_000).contains(&options.cycle_ms) {
                    return Err("--cycle-ms is between 20 and 600000".into());
                }
            }
            "--dir" => options.dir = Some(value.into()),
            "--meterd" => options.meterd = Some(value.into()),
            "--backoffice" => options.backoffice = Some(value.into()),
            "--taca" => options.taca = Some(value.into()),
            _ => return Err(format!("unknown flag {flag}\n\n{USAGE}")),
        }
    }
    if options.meterd.is_some() != options.backoffice.is_some() {
        return Err("give both --meterd and --backoffice, or neither".into());
    }
    Ok(options)
}

/// A pseudo-random sequence from a seed (the kill tests' generator).
struct Lcg(u64);

impl Lcg {
    /// The next number in `0..bound` (`bound` > 0).
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound
    }

    /// A full 64-bit draw (a seed for one process's fsync failures).
    fn next_seed(&mut self) -> u64 {
        (self.below(1 << 31) << 32) ^ self.below(1 << 31)
    }
}

/// What the stderr of the processes said, counted.
#[derive(Default)]
struct Logged {
    injected: AtomicU64,
    armed: AtomicBool,
}

/// Runs `command`, sending its stdout and stderr to `log`, counting the
/// injected failures it reports in `logged`; returns it with the first line
/// it printed on stdout.
fn spawn_logged(
    command: &mut Command,
    log: &Path,
    logged: &Arc<Logged>,
) -> Result<(Child, String), String> {
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|error| format!("cannot open {}: {error}", log.display()))
    };
    let mut child = command
        .env_remove("METERD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot start {command:?}: {error}"))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut err_log = open_log()?;
    let counts = Arc::clone(logged);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.starts_with(INJECTED_LINE) {
                counts.injected.fetch_add(1, Ordering::Relaxed);
            } else if line.starts_with(ARMED_LINE) {
                counts.armed.store(true, Ordering::SeqCst);
            }
            let _ = writeln!(err_log, "{line}");
        }
    });
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut reader = BufReader::new(stdout);
    let mut first = String::new();
    let read = reader.read_line(&mut first);
    let mut out_log = open_log()?;
    let _ = write!(out_log, "{first}");
    std::thread::spawn(move || std::io::copy(&mut reader, &mut out_log));
    match read {
        Ok(n) if n > 0 => Ok((child, first.trim().to_owned())),
        _ => {
            let _ = child.kill();
            let status = child.wait().map(|status| status.to_string());
            Err(format!(
                "{command:?} exited before printing ({status:?}); see {}",
                log.display()
            ))
        }
    }
}

/// The environment that turns injection on in a process (or nothing).
fn injection_env(permille: u64, seed: Option<u64>) -> Vec<(&'static str, String)> {
    match seed {
        Some(seed) if permille > 0 => vec![
            ("DURABLE_FAIL_SYNC_PERMILLE", permille.to_string()),
            ("DURABLE_FAIL_SYNC_SEED", seed.to_string()),
        ],
        _ => Vec::new(),
    }
}

/// Waits until `durable` in a process just started said injection is on:
/// a binary built without the feature never says it.
fn check_armed(logged: &Logged, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !logged.armed.load(Ordering::SeqCst) {
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not report fault injection: was it built with --features fault-injection?"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

struct Office {
    child: Child,
    address: SocketAddr,
    token: String,
}

/// The paths and settings every start needs.
struct World {
    dir: PathBuf,
    meterd_bin: PathBuf,
    backoffice_bin: PathBuf,
    office_logged: Arc<Logged>,
    meterd_logged: Arc<Logged>,
    permille: u64,
    /// The meter's registration, once made.
    meter: Option<(String, PathBuf)>,
}

impl World {
    fn office_data(&self) -> PathBuf {
        self.dir.join("backoffice")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("meterd.sock")
    }

    fn start_office(&self, listen: &str, inject: Option<u64>) -> Result<Office, String> {
        let data = self.office_data();
        let env = injection_env(self.permille, inject);
        self.office_logged.armed.store(false, Ordering::SeqCst);
        let (child, first) = spawn_logged(
            Command::new(&self.backoffice_bin)
                .arg("serve")
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen", listen, "--password-iterations", "1000"])
                .env("BACKOFFICE_LOG", "warn")
                .envs(env.iter().map(|(key, value)| (*key, value))),
            &self.dir.join("backoffice.log"),
            &self.office_logged,
        )?;
        let mut office = Office {
            child,
            address: "127.0.0.1:1".parse().expect("an address"),
            token: String::new(),
        };
        let url = first
            .strip_prefix("backoffice listening on ")
            .ok_or_else(|| format!("the backoffice said {first:?}"))?;
        office.address = url
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .and_then(|host| host.parse().ok())
            .ok_or_else(|| format!("no address in {first:?}"))?;
        office.token = std::fs::read_to_string(data.join("operator-token"))
            .map_err(|error| format!("the operator token: {error}"))?;
        if !env.is_empty() {
            check_armed(&self.office_logged, "the backoffice")?;
        }
        Ok(office)
    }

    fn start_meterd(&self, office: SocketAddr, inject: Option<u64>) -> Result<Daemon, String> {
        let (mid, secret_file) = self.meter.as_ref().expect("the meter is registered");
        let env = injection_env(self.permille, inject);
        self.meterd_logged.armed.store(false, Ordering::SeqCst);
        let (child, first) = spawn_logged(
            Command::new(&self.meterd_bin)
                .arg("--socket")
                .arg(self.socket())
                .arg("serve")
                .arg("--data-dir")
                .arg(self.dir.join("meterd"))
                .arg("--backoffice")
                .arg(format!("http://{office}/RPC2"))
                .args(["--mid", mid])
                .arg("--secret-file")
                .arg(secret_file)
                .env("METERD_LOG", "warn")
                .envs(env.iter().map(|(key, value)| (*key, value))),
            &self.dir.join("meterd.log"),
            &self.meterd_logged,
        )?;
        let child = Daemon(child);
        if !first.starts_with("meterd listening on") {
            return Err(format!("meterd said {first:?}"));
        }
        if !env.is_empty() {
            check_armed(&self.meterd_logged, "meterd")?;
        }
        Ok(child)
    }
}

/// Sends one HTTP/1.1 request with `Connection: close`; the status and body.
fn http(
    address: SocketAddr,
    request_line: &str,
    headers: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let timeout = Duration::from_secs(30);
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{request_line} HTTP/1.1\r\nHost: {address}\r\n{headers}Content-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let status = std::str::from_utf8(&response[..end])
        .ok()
        .and_then(|head| head.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, response[end + 4..].to_vec()))
}

impl Office {
    /// An operator call: its value, or why not.
    fn call(&self, method: &str, params: &[Value]) -> Result<Value, String> {
        let headers = format!("X-Operator-Token: {}\r\n", self.token.trim());
        let (status, body) = http(
            self.address,
            "POST /RPC2",
            &headers,
            &encode_call(method, params),
        )
        .map_err(|error| format!("{method}: {error}"))?;
        if status != 200 {
            return Err(format!("{method}: HTTP {status}"));
        }
        match parse_response(&body, Limits::BACKOFFICE) {
            Ok(MethodResponse::Success(value)) => Ok(value),
            Ok(MethodResponse::Fault(fault)) => Err(format!("{method}: {fault}")),
            Err(error) => Err(format!("{method}: {error}")),
        }
    }

    fn text(&self, method: &str, params: &[Value], member: &str) -> Result<String, String> {
        self.call(method, params)?
            .member(member)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("{method}: no {member} in the answer"))
    }

    fn balance(&self, cid: &str) -> Result<Amount, String> {
        let text = self.text("customer.show", &[Value::string(cid)], "balance")?;
        Amount::parse(&text).map_err(|error| format!("balance {text:?}: {error}"))
    }

    /// `/health`: true when the backoffice says it can still make writes
    /// durable (503 after a failed fsync).
    fn healthy(&self) -> std::io::Result<bool> {
        let (status, _) = http(self.address, "GET /health", "", b"")?;
        Ok(status == 200)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Office {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A meterd process, killed when dropped (however the run ends).
struct Daemon(Child);

impl Daemon {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How the clients' commits were answered.
#[derive(Default)]
struct Commits {
    acknowledged: AtomicU64,
    cache_full: AtomicU64,
    storage_failed: AtomicU64,
    stopped: AtomicU64,
    unmatched: AtomicU64,
    in_doubt: AtomicU64,
    unknown: AtomicU64,
    other_fault: AtomicU64,
    queries_refused: AtomicU64,
    queries_failed: AtomicU64,
    other_faults: Mutex<Vec<String>>,
}

fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// One client: login, then query+commit until `stop`, counting each commit
/// by its answer. After any failure it logs in again (a meter that
/// restarted may not have restored the session).
fn client(socket: &Path, index: usize, cid: Cid, pid: Pid, stop: &AtomicBool, commits: &Commits) {
    let context = Context::parse(&format!("soak{index}")).expect("a valid context");
    let mut meter = Meter::connect(socket).with_context(context);
    let mut logged_in = false;
    let mut refused_in_a_row = 0u32;
    let pause = || std::thread::sleep(Duration::from_millis(10));
    while !stop.load(Ordering::Relaxed) {
        if !logged_in {
            // A restored session, or none: either way, one login after.
            let _ = meter.logout(cid);
            if meter.login(cid).is_err() {
                pause();
                continue;
            }
            logged_in = true;
        }
        match meter.try_query(pid) {
            Ok(true) => refused_in_a_row = 0,
            Ok(false) => {
                // Unconfirmed while the backoffice is down, or no session.
                add(&commits.queries_refused);
                refused_in_a_row += 1;
                if refused_in_a_row.is_multiple_of(5) {
                    logged_in = false;
                }
                pause();
                continue;
            }
            Err(_) => {
                add(&commits.queries_failed);
                logged_in = false;
                pause();
                continue;
            }
        }
        let counter = match meter.commit(pid) {
            Ok(()) => {
                add(&commits.acknowledged);
                continue;
            }
            Err(ClientError::Fault(fault)) => match fault.registered() {
                Some(FaultCode::CacheFull) => &commits.cache_full,
                Some(FaultCode::StorageFailed) => &commits.storage_failed,
                Some(FaultCode::MeterStopped) => &commits.stopped,
                Some(FaultCode::UnmatchedCommit) => &commits.unmatched,
                Some(FaultCode::RecordingInDoubt) => &commits.in_doubt,
                _ => {
                    let mut faults = commits
                        .other_faults
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    if faults.len() < 10 {
                        faults.push(fault.to_string());
                    }
                    &commits.other_fault
                }
            },
            // The meter died or the connection broke: the use may or may
            // not have been recorded.
            Err(ClientError::Unavailable { .. } | ClientError::Protocol(_)) => &commits.unknown,
        };
        add(counter);
        logged_in = false;
        pause();
    }
}

/// What happened to the processes over the run.
#[derive(Default)]
struct Events {
    kills_meterd: u64,
    kills_office: u64,
    kills_both: u64,
    no_kill: u64,
    meterd_stops: u64,
    office_stops: u64,
    meterd_exits: u64,
    office_exits: u64,
}

/// Both processes, restarted as needed.
struct Running {
    office: Office,
    meterd: Daemon,
    listen: String,
    status: Meter,
    /// Starts that failed (a store whose first fsync failed: exit 69).
    meterd_start_failures: u64,
    office_start_failures: u64,
}

impl Running {
    fn restart_office(&mut self, world: &World, inject: Option<u64>) -> Result<(), String> {
        self.office.kill();
        let mut tries = 0u64;
        loop {
            // A start whose own first fsyncs fail (injected) exits: the
            // next try draws other failures.
            let inject = inject.map(|seed| seed ^ tries.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            match world.start_office(&self.listen, inject) {
                Ok(office) => {
                    self.office = office;
                    return Ok(());
                }
                Err(error) if tries < 20 => {
                    eprintln!("soak: starting the backoffice failed ({error}); again");
                    self.office_start_failures += 1;
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn restart_meterd(&mut self, world: &World, inject: Option<u64>) -> Result<(), String> {
        self.meterd.kill();
        let mut tries = 0u64;
        loop {
            // A start whose own first fsyncs fail (injected) exits: the
            // next try draws other failures.
            let inject = inject.map(|seed| seed ^ tries.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            match world.start_meterd(self.office.address, inject) {
                Ok(child) => {
                    self.meterd = child;
                    return Ok(());
                }
                Err(error) if tries < 20 => {
                    eprintln!("soak: starting meterd failed ({error}); again");
                    self.meterd_start_failures += 1;
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Restarts whichever process stopped (after a failed fsync) or exited.
    fn heal(&mut self, world: &World, rng: &mut Lcg, events: &mut Events) -> Result<(), String> {
        match self.status.status() {
            Ok(status) => {
                if status.member("stopped").and_then(Value::as_str).is_some() {
                    events.meterd_stops += 1;
                    self.restart_meterd(world, Some(rng.next_seed()))?;
                }
            }
            Err(_) => {
                if let Ok(Some(_)) = self.meterd.0.try_wait() {
                    events.meterd_exits += 1;
                    eprintln!("soak: meterd exited by itself; see meterd.log");
                    self.restart_meterd(world, Some(rng.next_seed()))?;
                }
            }
        }
        match self.office.healthy() {
            Ok(true) => {}
            Ok(false) => {
                events.office_stops += 1;
                self.restart_office(world, Some(rng.next_seed()))?;
            }
            Err(_) => {
                if let Ok(Some(_)) = self.office.child.try_wait() {
                    events.office_exits += 1;
                    eprintln!("soak: the backoffice exited by itself; see backoffice.log");
                    self.restart_office(world, Some(rng.next_seed()))?;
                }
            }
        }
        Ok(())
    }
}

/// The binaries: given, or built with the feature into this binary's own
/// target folder and profile.
fn binaries(options: &Options) -> Result<(PathBuf, PathBuf), String> {
    if let (Some(meterd), Some(backoffice)) = (&options.meterd, &options.backoffice) {
        return Ok((meterd.clone(), backoffice.clone()));
    }
    let exe = std::env::current_exe().map_err(|error| error.to_string())?;
    let profile_dir = exe.parent().ok_or("no folder for this binary")?;
    let target = profile_dir.parent().ok_or("no target folder")?;
    let profile = profile_dir
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or("no profile")?;
    let mut command = Command::new(env!("CARGO"));
    command
        .args(["build", "--quiet", "-p", "meterd", "-p", "backoffice"])
        .args(["--bin", "meterd", "--bin", "backoffice"])
        .args([
            "--features",
            "meterd/fault-injection,backoffice/fault-injection",
        ])
        .arg("--target-dir")
        .arg(target)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    if profile == "release" {
        command.arg("--release");
    }
    eprintln!("soak: building meterd and backoffice with fault injection ({profile})");
    let status = command
        .status()
        .map_err(|error| format!("cannot run cargo: {error}"))?;
    if !status.success() {
        return Err("building meterd and backoffice with fault injection failed".into());
    }
    Ok((profile_dir.join("meterd"), profile_dir.join("backoffice")))
}

/// The flat TACA: given, or built from `taca-sdk/examples`.
fn flat_taca(options: &Options) -> Result<Vec<u8>, String> {
    let file = match &options.taca {
        Some(file) => file.clone(),
        None => {
            let folder =
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../taca-sdk/examples"));
            // From their own folder, so that its `.cargo/config.toml` applies.
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--release", "-p", "taca-flat"])
                .args(["--target", "wasm32-unknown-unknown", "--target-dir"])
                .arg(folder.join("target"))
                .current_dir(&folder)
                .status()
                .map_err(|error| format!("cannot run cargo: {error}"))?;
            if !status.success() {
                return Err(
                    "building the flat TACA failed (is the wasm32-unknown-unknown target installed?)"
                        .into(),
                );
            }
            folder.join("target/wasm32-unknown-unknown/release/taca_flat.wasm")
        }
    };
    std::fs::read(&file).map_err(|error| format!("{}: {error}", file.display()))
}

/// The parties and the product, made on a backoffice without injection.
struct Parties {
    consumer: Cid,
    producer: String,
    product: Pid,
}

fn set_up(world: &mut World, office: &Office, taca: Vec<u8>) -> Result<Parties, String> {
    let s = Value::string;
    let consumer = office.text(
        "customer.create",
        &[s("Ada"), s("ada@example.org"), s(PASSWORD)],
        "CID",
    )?;
    let producer = office.text("customer.create", &[s("Bob"), s("bob@example.org")], "CID")?;
    let product = office.text(
        "product.create",
        &[
            s(&producer),
            s("Editor"),
            s("0.25 per use"),
            Value::Base64(taca),
            s("0.25"),
        ],
        "PID",
    )?;
    let meter = office.call("meter.create", &[s(&consumer)])?;
    let member = |name: &str| {
        meter
            .member(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("meter.create: no {name}"))
    };
    let (mid, secret) = (member("MID")?, member("secret")?);
    let secret_file = world.dir.join("secret");
    std::fs::write(&secret_file, secret).map_err(|error| error.to_string())?;
    world.meter = Some((mid, secret_file));
    office.call(
        "account.deposit",
        &[s(&consumer), s(&DEPOSIT_UNITS.to_string())],
    )?;
    Ok(Parties {
        consumer: Cid::parse(&consumer).map_err(|error| error.to_string())?,
        producer,
        product: Pid::parse(&product).map_err(|error| error.to_string())?,
    })
}

/// Uploads until nothing waits, or for at most `DRAIN_TIMEOUT`: the
/// readings still waiting then, with the meter's last upload error, and the
/// batches the backoffice refused with 205 (set aside by the meter) and
/// their readings.
fn drain(socket: &Path) -> Result<(u64, String, u64, u64), String> {
    let mut meter = Meter::connect(socket);
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let flushed = meter.flush().unwrap_or(false);
        let status = meter.status().map_err(|error| error.to_string())?;
        let number = |name: &str| {
            status
                .member(name)
                .and_then(Value::as_str)
                .and_then(|text| text.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let pending = number("pendingReadings");
        if (flushed && pending == 0) || Instant::now() > deadline {
            let error = status
                .member("lastError")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            return Ok((
                pending,
                error,
                number("conflictedBatches"),
                number("conflictedReadings"),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_listening(socket: &Path) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if Instant::now() > deadline {
            return Err("meterd does not listen".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn run(options: &Options, dir: &Path) -> Result<bool, String> {
    let begun_run = Instant::now();
    let (meterd_bin, backoffice_bin) = binaries(options)?;
    let taca = flat_taca(options)?;
    let mut world = World {
        dir: dir.to_owned(),
        meterd_bin,
        backoffice_bin,
        office_logged: Arc::default(),
        meterd_logged: Arc::default(),
        permille: options.permille,
        meter: None,
    };
    let mut rng = Lcg(options.seed);
    // Set up without injection: the parties, the grant, a first upload.
    let office = world.start_office("127.0.0.1:0", None)?;
    let listen = office.address.to_string();
    let parties = set_up(&mut world, &office, taca)?;
    let meterd = world.start_meterd(office.address, None)?;
    wait_listening(&world.socket())?;
    Meter::connect(world.socket())
        .grant_password(parties.consumer, PASSWORD, false, None)
        .map_err(|error| format!("the grant failed: {error}"))?;
    let mut running = Running {
        office,
        meterd,
        listen,
        status: Meter::connect(world.socket()),
        meterd_start_failures: 0,
        office_start_failures: 0,
    };
    {
        let mut first = Meter::connect(world.socket())
            .with_context(Context::parse("setup").expect("a valid context"));
        first
            .login(parties.consumer)
            .map_err(|error| error.to_string())?;
        if !first.flush().unwrap_or(false) {
            return Err("the first upload failed".into());
        }
        first
            .logout(parties.consumer)
            .map_err(|error| error.to_string())?;
    }
    // From now on every start has injection on, each with its own seed.
    running.restart_office(&world, Some(rng.next_seed()))?;
    running.restart_meterd(&world, Some(rng.next_seed()))?;

    let stop = AtomicBool::new(false);
    let commits = Commits::default();
    let mut events = Events::default();
    let started = Instant::now();
    let socket = world.socket();
    let outcome: Result<(), String> = std::thread::scope(|scope| {
        for index in 0..options.clients {
            let (socket, stop, commits) = (&socket, &stop, &commits);
            scope.spawn(move || {
                client(
                    socket,
                    index,
                    parties.consumer,
                    parties.product,
                    stop,
                    commits,
                );
            });
        }
        // Uploads all the time, so that kills and failures meet them.
        scope.spawn(|| {
            let mut meter = Meter::connect(&socket);
            while !stop.load(Ordering::Relaxed) {
                let _ = meter.flush();
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let result = (|| {
            for cycle in 0..options.cycles {
                let length = options.cycle_ms / 2 + rng.below(options.cycle_ms + 1);
                let action = rng.below(4);
                let kill_at = Duration::from_millis(rng.below(length + 1));
                let length = Duration::from_millis(length);
                let begun = Instant::now();
                let mut done = false;
                loop {
                    if !done && begun.elapsed() >= kill_at {
                        done = true;
                        match action {
                            0 => events.no_kill += 1,
                            1 => {
                                events.kills_meterd += 1;
                                running.restart_meterd(&world, Some(rng.next_seed()))?;
                            }
                            2 => {
                                events.kills_office += 1;
                                running.restart_office(&world, Some(rng.next_seed()))?;
                            }
                            _ => {
                                events.kills_both += 1;
                                running.meterd.kill();
                                running.office.kill();
                                running.restart_office(&world, Some(rng.next_seed()))?;
                                running.restart_meterd(&world, Some(rng.next_seed()))?;
                            }
                        }
                    }
                    running.heal(&world, &mut rng, &mut events)?;
                    // (A restart in `heal` may run past the kill moment:
                    // the cycle still makes its kill before it ends.)
                    if done && begun.elapsed() >= length {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
                if (cycle + 1).is_multiple_of(50) {
                    eprintln!(
                        "soak: {} cycles, {} acknowledged, {:.0} s",
                        cycle + 1,
                        get(&commits.acknowledged),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    });
    outcome?;
    let cycling = started.elapsed();

    // Injection off, both restarted, everything uploaded.
    running.restart_office(&world, None)?;
    running.restart_meterd(&world, None)?;
    wait_listening(&world.socket())?;
    let (stuck, upload_error, conflicts, set_aside) = drain(&world.socket())?;
    let office = &running.office;
    let earned = office.balance(&parties.producer)?;
    let left = office.balance(parties.consumer.as_str())?;
    let suspense = office
        .call("suspense.list", &[])?
        .as_array()
        .map_or(0, <[Value]>::len);
    let deposit = Amount::from_units(DEPOSIT_UNITS).map_err(|error| error.to_string())?;
    let paid = deposit
        .checked_sub(left)
        .map_err(|error| format!("the consumer's balance: {error}"))?;
    running.office.kill();
    running.meterd.kill();
    let verify = Command::new(&world.backoffice_bin)
        .arg("verify")
        .arg("--data-dir")
        .arg(world.office_data())
        .output()
        .map_err(|error| format!("backoffice verify: {error}"))?;
    let verified = verify.status.success();

    let whole = earned.nanos() % PRICE_NANOS == 0;
    let charged = u64::try_from(earned.nanos() / PRICE_NANOS).map_err(|error| error.to_string())?;
    let acknowledged = get(&commits.acknowledged);
    let in_doubt = get(&commits.in_doubt);
    let unknown = get(&commits.unknown);
    let lost = acknowledged.saturating_sub(charged);
    let doubled = charged.saturating_sub(acknowledged + in_doubt + unknown);
    let cycles = options.cycles.max(1);
    println!(
        "soak: seed={} cycles={} clients={} sync-fail-permille={} cycle-ms={}",
        options.seed, options.cycles, options.clients, options.permille, options.cycle_ms
    );
    println!(
        "kills: meterd={} backoffice={} both={} none={}",
        events.kills_meterd, events.kills_office, events.kills_both, events.no_kill
    );
    println!(
        "injected fsync failures seen: meterd={} backoffice={}; stops restarted: meterd={} backoffice={}; exits by themselves: meterd={} backoffice={}",
        get(&world.meterd_logged.injected),
        get(&world.office_logged.injected),
        events.meterd_stops,
        events.office_stops,
        events.meterd_exits,
        events.office_exits
    );
    println!(
        "starts that failed (their first fsync failed) and were tried again: meterd={} backoffice={}",
        running.meterd_start_failures, running.office_start_failures
    );
    println!(
        "commits: acknowledged={acknowledged} in-doubt(109)={in_doubt} unknown={unknown} refused: stopped(108)={} storage(102)={} full(101)={} unmatched-after-restart(104)={} other={}",
        get(&commits.stopped),
        get(&commits.storage_failed),
        get(&commits.cache_full),
        get(&commits.unmatched),
        get(&commits.other_fault)
    );
    println!(
        "queries: refused={} failed={}",
        get(&commits.queries_refused),
        get(&commits.queries_failed)
    );
    for fault in commits
        .other_faults
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
    {
        println!("  other fault: {fault}");
    }
    println!(
        "ledger: charged={charged} (earned {earned}, paid {paid}) suspense={suspense} batches-refused-205={conflicts} set-aside-readings={set_aside}"
    );
    println!("lost={lost} doubled={doubled}");
    println!(
        "verify: {} {}",
        if verified { "ok" } else { "FAILED" },
        String::from_utf8_lossy(&verify.stdout).trim()
    );
    if !verified {
        println!("{}", String::from_utf8_lossy(&verify.stderr).trim());
    }
    println!(
        "time: {:.1} s of cycles, {:.0} ms per cycle; {:.1} s in all (with building, setting up and the last upload)",
        cycling.as_secs_f64(),
        cycling.as_secs_f64() * 1000.0 / cycles as f64,
        begun_run.elapsed().as_secs_f64()
    );
    let mut clean = lost == 0 && doubled == 0 && verified;
    if stuck > 0 {
        println!(
            "after {} s of uploads {stuck} readings still wait in the meter; its last upload error: {upload_error}",
            DRAIN_TIMEOUT.as_secs()
        );
        clean = false;
    }
    if conflicts > 0 {
        // Nothing here restores a copy of a data folder: a batch id the
        // backoffice applied with other readings means the meter changed a
        // batch after sending it.
        println!(
            "the meter resent {conflicts} batch id(s) with other readings (205): see meterd.log"
        );
        clean = false;
    }
    if !whole {
        println!("the producer earned {earned}: not a whole number of uses");
        clean = false;
    }
    if paid != earned {
        println!("the consumer paid {paid} but the producer earned {earned}");
        clean = false;
    }
    Ok(clean)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let options = match options(&args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(64);
        }
    };
    let dir = options.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("soak-{}-{}", options.seed, std::process::id()))
    });
    if dir.exists() {
        eprintln!("soak: {} exists; give a fresh folder", dir.display());
        return ExitCode::from(64);
    }
    if let Err(error) = std::fs::create_dir_all(&dir) {
        eprintln!("soak: cannot make {}: {error}", dir.display());
        return ExitCode::from(2);
    }
    eprintln!(
        "soak: seed {} (replay with --seed {}), work folder {}",
        options.seed,
        options.seed,
        dir.display()
    );
    match run(&options, &dir) {
        Ok(true) => {
            if !options.keep {
                let _ = std::fs::remove_dir_all(&dir);
            }
            ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!(
                "soak: FAILED; seed {}, logs and data kept in {}",
                options.seed,
                dir.display()
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!(
                "soak: {error}; seed {}, logs and data kept in {}",
                options.seed,
                dir.display()
            );
            ExitCode::from(2)
        }
    }
}
