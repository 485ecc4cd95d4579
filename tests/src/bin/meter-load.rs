//! Load generator for meterd: `query` latency over a keep-alive connection,
//! durable `commit` throughput with 1 and with many clients, and the meter's
//! memory while a million readings wait for upload. Starts its own meterd in
//! a fresh directory, uploading to an in-process stand-in backoffice that
//! confirms the customer once and then stays down (so readings pile up).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meterd::client::Meter;
use proto::auth::Secret;
use proto::meter_api::MeterCall;
use proto::xmlrpc::{Limits, MethodResponse, Value, encode_call, parse_response};
use proto::{Cid, Context, Mid, Pid};
use tests::fake_backoffice::FakeBackoffice;

const SECRET: &[u8] = b"load generator secret, 32 bytes!";

const USAGE: &str =
    "usage: meter-load METERD_BINARY WORK_DIR [--queries N] [--clients N] [--seconds N] [--fill N]

Starts METERD_BINARY serving in WORK_DIR (which must not exist), then measures:
  baseline: N raw Unix-socket round trips before and after the queries, the
          machine's floor in the same run (before them also with a caller
          that polls for the answer, as the client library does);
  query:  N query round trips on one keep-alive connection (default 100000),
          median and p99, each followed by an untimed cancel;
  disk:   the data folder's raw fdatasync rate, before and after the commits;
  commit: query+commit pairs for SECONDS (default 5) with 1 client, then with
          CLIENTS clients (default 32); every commit is durable when it returns,
          each rate also as a ratio to the disk's fdatasync rate. The CLIENTS
          run twice: a thread each with the client library, then all from one
          event thread (as wrk drives a server, leaving the cores to meterd);
  memory: before each CLIENTS run, the same clients' query+cancel pairs, which
          need no disk: what the CPU allows them, printed beside the commits.
          Each phase prints how busy the machine was and meterd's share;
  fill:   commits until N readings wait (default 1000000), printing the
          meter's RSS every 100000.";

struct Options {
    meterd: PathBuf,
    dir: PathBuf,
    queries: usize,
    clients: usize,
    seconds: u64,
    fill: u64,
}

fn options(args: &[String]) -> Result<Options, String> {
    let [meterd, dir, rest @ ..] = args else {
        return Err(USAGE.into());
    };
    let mut options = Options {
        meterd: meterd.into(),
        dir: dir.into(),
        queries: 100_000,
        clients: 32,
        seconds: 5,
        fill: 1_000_000,
    };
    for pair in rest.chunks(2) {
        let [flag, value] = pair else {
            return Err(USAGE.into());
        };
        let number: u64 = value
            .parse()
            .map_err(|_| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--queries" => options.queries = number as usize,
            "--clients" => options.clients = number as usize,
            "--seconds" => options.seconds = number,
            "--fill" => options.fill = number,
            _ => return Err(USAGE.into()),
        }
    }
    Ok(options)
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    _backoffice: FakeBackoffice,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(options: &Options) -> Result<Daemon, String> {
    if options.dir.exists() {
        return Err(format!(
            "{} exists; give a fresh directory",
            options.dir.display()
        ));
    }
    std::fs::create_dir_all(&options.dir).map_err(|error| error.to_string())?;
    let socket = options.dir.join("meterd.sock");
    let mid = Mid::parse("B1-M1").unwrap();
    let backoffice = FakeBackoffice::new([(mid, Secret::new(SECRET).unwrap())].into());
    backoffice.behave(|behaviour| {
        behaviour.params.flush_readings_max = 100_000_000;
        behaviour.params.flush_interval_s = 86_400;
    });
    let address = backoffice.spawn();
    let secret_file = options.dir.join("secret");
    std::fs::write(&secret_file, SECRET).map_err(|error| error.to_string())?;
    let child = Command::new(&options.meterd)
        .arg("--socket")
        .arg(&socket)
        .arg("serve")
        .arg("--data-dir")
        .arg(options.dir.join("data"))
        .arg("--backoffice")
        .arg(format!("http://{address}/RPC2"))
        .arg("--mid")
        .arg(mid.as_str())
        .arg("--secret-file")
        .arg(&secret_file)
        .env("METERD_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|error| format!("cannot start {}: {error}", options.meterd.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            return Err("meterd did not start listening".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The customer grants this meter to this user (login needs it).
    let customer = Cid::parse("B1-C1").unwrap();
    backoffice.behave(|behaviour| {
        behaviour
            .passwords
            .insert(customer, "load generator".to_owned());
    });
    Meter::connect(&socket)
        .grant_password(customer, "load generator", false, None)
        .map_err(|error| format!("the grant failed: {error}"))?;
    // One confirmed use puts the customer in the status table; then the
    // backoffice goes down, so nothing is drained while we measure.
    let mut meter = client(&socket, "setup");
    let product = Pid::parse("B1-P1").unwrap();
    if !meter
        .try_query(product)
        .map_err(|error| error.to_string())?
    {
        return Err("the first query was refused".into());
    }
    meter.commit(product).map_err(|error| error.to_string())?;
    if !meter.flush().map_err(|error| error.to_string())? {
        return Err("the first upload failed".into());
    }
    backoffice.behave(|behaviour| behaviour.down = true);
    Ok(Daemon {
        child,
        socket,
        _backoffice: backoffice,
    })
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// Clock ticks so far: the whole machine's busy and total (`/proc/stat`),
/// and the process `pid`'s own (`/proc/PID/stat`, user + system).
#[derive(Clone, Copy)]
struct Ticks {
    busy: u64,
    total: u64,
    process: u64,
}

impl Ticks {
    fn now(pid: u32) -> Ticks {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is
        // counted in user already): busy leaves out idle, iowait and the
        // time the hypervisor took (steal).
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.iter().skip(3).take(2).sum::<u64>() + fields.get(7).copied().unwrap_or(0);
        let own = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and
        // stime are the 12th and 13th.
        let after_name = own.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let times: Vec<u64> = after_name
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|field| field.parse().ok())
            .collect();
        Ticks {
            busy: total - idle,
            total,
            process: times.iter().sum(),
        }
    }

    /// "machine N% busy, meterd M cores" between `self` and `later`.
    fn describe(self, later: Ticks) -> String {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        let cores = std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
            .count()
            .max(1) as f64;
        format!(
            "machine {:.0}% busy, meterd {:.2} of {cores:.0} cores",
            100.0 * later.busy.saturating_sub(self.busy) as f64 / total,
            cores * later.process.saturating_sub(self.process) as f64 / total,
        )
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index]
}

fn client(socket: &Path, name: &str) -> Meter {
    let mut meter =
        Meter::connect(socket).with_context(Context::parse(name).expect("valid context"));
    meter.login(Cid::parse("B1-C1").unwrap()).expect("login");
    meter
}

/// The floor this machine sets: a 300-byte request and 200-byte answer
/// between two threads over a Unix socket, no HTTP, no XML. The answering
/// thread sleeps in `read`; the asking one too, or with `poll` it polls
/// (yielding) as the client library does for calls answered from memory.
fn measure_baseline(dir: &Path, count: usize, poll: bool) {
    use std::io::{Read, Write};
    let path = dir.join(if poll {
        "baseline-poll.sock"
    } else {
        "baseline.sock"
    });
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind baseline socket");
    let echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut request = [0u8; 300];
        while stream.read_exact(&mut request).is_ok() {
            stream.write_all(&request[..200]).expect("answer");
        }
    });
    let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connect baseline");
    stream.set_nonblocking(poll).expect("socket mode");
    let request = [b'x'; 300];
    let mut answer = [0u8; 200];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        stream.write_all(&request).expect("send");
        let mut received = 0;
        while received < answer.len() {
            match stream.read(&mut answer[received..]) {
                Ok(0) => panic!("baseline echo closed"),
                Ok(read) => received += read,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::yield_now();
                }
                Err(error) => panic!("baseline receive: {error}"),
            }
        }
        times.push(started.elapsed());
    }
    drop(stream);
    echo.join().expect("echo thread");
    times.sort_unstable();
    let caller = if poll {
        "caller polls"
    } else {
        "caller sleeps"
    };
    println!(
        "baseline ({caller}): {count} raw Unix-socket round trips, median {:.1} us, p99 {:.1} us",
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
    );
}

fn measure_queries(socket: &Path, count: usize) {
    let product = Pid::parse("B1-P1").unwrap();
    let mut meter = client(socket, "query");
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let allowed = meter.try_query(product).expect("query answered");
        times.push(started.elapsed());
        assert!(allowed, "query refused");
        meter.cancel(product).expect("cancel");
    }
    times.sort_unstable();
    println!(
        "query: {count} round trips, median {:.1} us, p99 {:.1} us, max {:.1} us",
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        times[times.len() - 1].as_secs_f64() * 1e6,
    );
}

/// What a load client does after each allowed query.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    /// A durable commit: the use is recorded and synced before the answer.
    Commit,
    /// A cancel: answered from memory, the same pair of calls without the
    /// disk, so the rate it reaches is what the CPU alone allows.
    Cancel,
}

impl Then {
    fn call(self, pid: Pid, context: Option<Context>) -> MeterCall {
        match self {
            Then::Commit => MeterCall::Commit { pid, context },
            Then::Cancel => MeterCall::Cancel { pid, context },
        }
    }
}

/// How the load's clients are driven.
#[derive(Clone, Copy, PartialEq)]
enum Driver {
    /// One thread per client, each with the blocking client library, as
    /// metered programs call their meter.
    Threads,
    /// All clients' connections from one thread on one epoll (tokio's
    /// current-thread runtime), as load generators such as wrk drive a
    /// server: the clients' own thread switches stay off the meter's cores.
    Events,
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Threads => "a thread each",
            Driver::Events => "one event thread",
        }
    }
}

/// `clients` clients of query+`then` pairs, run until `stop`, counting the
/// pairs done in `done`; each client's context is `label` and its number.
struct Load<'a> {
    socket: &'a Path,
    clients: usize,
    stop: &'a AtomicBool,
    done: &'a AtomicU64,
    label: &'a str,
    then: Then,
}

impl Load<'_> {
    fn run(&self, driver: Driver) {
        match driver {
            Driver::Threads => self.threads(),
            Driver::Events => self.events(),
        }
    }

    fn threads(&self) {
        let product = Pid::parse("B1-P1").unwrap();
        std::thread::scope(|scope| {
            for index in 0..self.clients {
                scope.spawn(move || {
                    let mut meter = client(self.socket, &format!("{}{index}", self.label));
                    while !self.stop.load(Ordering::Relaxed) {
                        assert!(meter.try_query(product).expect("query"), "query refused");
                        match self.then {
                            Then::Commit => meter.commit(product).expect("durable commit"),
                            Then::Cancel => assert!(meter.cancel(product).expect("cancel")),
                        }
                        self.done.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
    }

    fn events(&self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
        let shared = Arc::new((AtomicBool::new(false), AtomicU64::new(0)));
        runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for index in 0..self.clients {
                let context =
                    Context::parse(&format!("{}{index}", self.label)).expect("valid context");
                tasks.spawn(event_client(
                    self.socket.to_path_buf(),
                    context,
                    self.then,
                    shared.clone(),
                ));
            }
            while !self.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            shared.0.store(true, Ordering::Relaxed);
            while let Some(ended) = tasks.join_next().await {
                if let Err(message) = ended.expect("a client task") {
                    panic!("event client: {message}");
                }
            }
        });
        self.done
            .fetch_add(shared.1.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// One client of `Load::events`: its own connection and context, logged in,
/// then query+`then` pairs until told to stop. Every answer is parsed and
/// checked, as the client library does.
async fn event_client(
    socket: PathBuf,
    context: Context,
    then: Then,
    shared: Arc<(AtomicBool, AtomicU64)>,
) -> Result<(), String> {
    let mut stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    let product = Pid::parse("B1-P1").unwrap();
    let customer = Cid::parse("B1-C1").unwrap();
    let login = http_request(&MeterCall::Login {
        cid: customer,
        context: Some(context.clone()),
    });
    let query = http_request(&MeterCall::Query {
        pid: product,
        context: Some(context.clone()),
    });
    let finish = http_request(&then.call(product, Some(context)));
    let mut buffer = Vec::with_capacity(4096);
    event_exchange(&mut stream, &login, &mut buffer).await?;
    while !shared.0.load(Ordering::Relaxed) {
        match event_exchange(&mut stream, &query, &mut buffer).await? {
            Value::Bool(true) => {}
            other => return Err(format!("query answered {other:?}")),
        }
        match (
            then,
            event_exchange(&mut stream, &finish, &mut buffer).await?,
        ) {
            (Then::Commit, _) | (Then::Cancel, Value::Bool(true)) => {}
            (Then::Cancel, other) => return Err(format!("cancel answered {other:?}")),
        }
        shared.1.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// A call as the client library sends it: HTTP/1.1 head and XML-RPC body.
fn http_request(call: &MeterCall) -> Vec<u8> {
    let (name, params) = call.to_call();
    let body = encode_call(name, &params);
    let mut request = format!(
        "POST /RPC2 HTTP/1.1\r\nHost: meterd\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request
}

/// Sends `request` and reads its answer (a `Content-Length` body) into
/// `buffer`; a fault or a malformed answer is an error.
async fn event_exchange(
    stream: &mut tokio::net::UnixStream,
    request: &[u8],
    buffer: &mut Vec<u8>,
) -> Result<Value, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(request)
        .await
        .map_err(|error| format!("send: {error}"))?;
    buffer.clear();
    let (body_start, length) = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end]).map_err(|_| "head is not text")?;
            if !head.starts_with("HTTP/1.1 200 ") {
                return Err(format!("answered {:?}", head.lines().next()));
            }
            let length = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())
                        .flatten()
                })
                .filter(|length| *length <= 64 * 1024)
                .ok_or("answer without a Content-Length of at most 64 KiB")?;
            break (end + 4, length);
        }
        if buffer.len() > 64 * 1024
            || stream.read_buf(buffer).await.map_err(|e| e.to_string())? == 0
        {
            return Err("the meter closed the connection".into());
        }
    };
    while buffer.len() < body_start + length {
        if stream.read_buf(buffer).await.map_err(|e| e.to_string())? == 0 {
            return Err("the meter closed the connection mid-answer".into());
        }
    }
    if buffer.len() != body_start + length {
        // One call at a time: anything more is a meter out of step.
        return Err("more bytes than Content-Length".into());
    }
    match parse_response(&buffer[body_start..], Limits::METER_API) {
        Ok(MethodResponse::Success(value)) => Ok(value),
        Ok(MethodResponse::Fault(fault)) => Err(format!("fault: {}", fault.message)),
        Err(error) => Err(format!("malformed answer: {error}")),
    }
}

/// The data folder's raw `fdatasync` rate, measured for a second.
fn measure_disk(dir: &Path) -> f64 {
    let rate =
        durable::fdatasync_rate(dir, Duration::from_secs(1)).expect("fdatasync in the data folder");
    println!(
        "disk: {rate:.0} fdatasync per second in {} (a small write made durable, one after another)",
        dir.display()
    );
    rate
}

/// Runs query+`then` pairs for `seconds` and prints what was done; returns
/// pairs per second and the CPU used, sampled after the first second (once
/// every client is logged in) until the stop.
fn measure_pairs(
    daemon: &Daemon,
    clients: usize,
    seconds: u64,
    then: Then,
    driver: Driver,
    label: &str,
) -> (f64, String) {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let started = Instant::now();
    let pid = daemon.child.id();
    let mut cpu = String::new();
    std::thread::scope(|scope| {
        let load = Load {
            socket: &daemon.socket,
            clients,
            stop: &stop,
            done: &done,
            label,
            then,
        };
        scope.spawn(move || load.run(driver));
        let settle = Duration::from_secs(1).min(Duration::from_secs(seconds) / 2);
        std::thread::sleep(settle);
        let from = Ticks::now(pid);
        std::thread::sleep(Duration::from_secs(seconds).saturating_sub(settle));
        cpu = from.describe(Ticks::now(pid));
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed().as_secs_f64();
    let total = done.load(Ordering::Relaxed);
    let rate = total as f64 / elapsed;
    let clients = match clients {
        1 => "1 client".to_owned(),
        many => format!("{many} clients"),
    };
    let (phase, what) = match then {
        Then::Commit => ("commit", "durable commits"),
        Then::Cancel => ("memory", "query+cancel pairs"),
    };
    print!(
        "{phase}: {clients} ({}), {total} {what} in {elapsed:.1} s = {rate:.0} per second",
        driver.name(),
    );
    (rate, cpu)
}

/// The commit phases with `clients` clients driven by `driver`: with more
/// than one, first the same pairs of calls answered from memory (what the
/// CPU allows these clients without a disk), then the durable commits
/// beside both limits.
fn measure_commits(daemon: &Daemon, clients: usize, seconds: u64, fsyncs: f64, driver: Driver) {
    let label = match driver {
        Driver::Threads => "t",
        Driver::Events => "e",
    };
    let ceiling = (clients > 1).then(|| {
        let memory = format!("{label}m");
        let (rate, cpu) = measure_pairs(daemon, clients, seconds, Then::Cancel, driver, &memory);
        println!(", what the CPU allows these clients without a disk; {cpu}");
        rate
    });
    let commits = format!("{label}c");
    let (rate, cpu) = measure_pairs(daemon, clients, seconds, Then::Commit, driver, &commits);
    print!(" = {:.2}x the disk's fdatasync rate", rate / fsyncs);
    if let Some(ceiling) = ceiling {
        print!(", {:.2}x the pairs without a disk", rate / ceiling);
    }
    println!("; {cpu}");
}

fn fill(daemon: &Daemon, target: u64, clients: usize) {
    let pid = daemon.child.id();
    let stop = AtomicBool::new(false);
    let committed = AtomicU64::new(0);
    println!("fill: RSS {} KiB with 0 readings waiting", rss_kib(pid));
    std::thread::scope(|scope| {
        let load = Load {
            socket: &daemon.socket,
            clients,
            stop: &stop,
            done: &committed,
            label: "f",
            then: Then::Commit,
        };
        scope.spawn(move || load.run(Driver::Threads));
        let mut next_report = 100_000;
        let mut meter = Meter::connect(&daemon.socket);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let status = meter.status().expect("status");
            let pending: u64 = status
                .member("pendingReadings")
                .and_then(|value| value.as_str())
                .and_then(|text| text.parse().ok())
                .unwrap_or(0);
            while pending >= next_report {
                println!(
                    "fill: RSS {} KiB with {pending} readings waiting",
                    rss_kib(pid)
                );
                next_report += 100_000;
            }
            if pending >= target {
                stop.store(true, Ordering::Relaxed);
                break;
            }
        }
    });
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match options(&args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(64);
        }
    };
    let daemon = match start(&options) {
        Ok(daemon) => daemon,
        Err(message) => {
            eprintln!("meter-load: {message}");
            return ExitCode::FAILURE;
        }
    };
    measure_baseline(&options.dir, options.queries, false);
    measure_baseline(&options.dir, options.queries, true);
    measure_queries(&daemon.socket, options.queries);
    measure_baseline(&options.dir.join("data"), options.queries, false);
    let data = options.dir.join("data");
    let before = measure_disk(&data);
    measure_commits(&daemon, 1, options.seconds, before, Driver::Threads);
    measure_commits(
        &daemon,
        options.clients,
        options.seconds,
        before,
        Driver::Threads,
    );
    measure_commits(
        &daemon,
        options.clients,
        options.seconds,
        before,
        Driver::Events,
    );
    let after = measure_disk(&data);
    println!(
        "disk: fdatasync {before:.0} per second before the commits, {after:.0} after; ratios are to the first"
    );
    if options.fill > 0 {
        fill(&daemon, options.fill, options.clients);
    }
    ExitCode::SUCCESS
}
