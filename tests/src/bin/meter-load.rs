//! Load generator for meterd: `query` latency over a keep-alive connection,
//! durable `commit` throughput with 1 and with many clients, and the meter's
//! memory while a million readings wait for upload. Starts its own meterd in
//! a fresh directory, uploading to an in-process stand-in backoffice that
//! confirms the customer once and then stays down (so readings pile up).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meterd::client::Meter;
use proto::auth::Secret;
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
          each rate also as a ratio to the disk's fdatasync rate;
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

/// Runs `clients` threads of query+commit until `stop`; returns commits.
fn commit_load(
    socket: &Path,
    clients: usize,
    stop: &AtomicBool,
    committed: &AtomicU64,
    label: &str,
) {
    let product = Pid::parse("B1-P1").unwrap();
    std::thread::scope(|scope| {
        for index in 0..clients {
            scope.spawn(move || {
                let mut meter = client(socket, &format!("{label}{index}"));
                while !stop.load(Ordering::Relaxed) {
                    assert!(meter.try_query(product).expect("query"), "query refused");
                    meter.commit(product).expect("durable commit");
                    committed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
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

fn measure_commits(socket: &Path, clients: usize, seconds: u64, fsyncs: f64) {
    let stop = AtomicBool::new(false);
    let committed = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| commit_load(socket, clients, &stop, &committed, "c"));
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed().as_secs_f64();
    let total = committed.load(Ordering::Relaxed);
    let rate = total as f64 / elapsed;
    println!(
        "commit: {clients} clients, {total} durable commits in {elapsed:.1} s = {rate:.0} per second \
         = {:.2}x the disk's fdatasync rate",
        rate / fsyncs
    );
}

fn fill(daemon: &Daemon, target: u64, clients: usize) {
    let pid = daemon.child.id();
    let stop = AtomicBool::new(false);
    let committed = AtomicU64::new(0);
    println!("fill: RSS {} KiB with 0 readings waiting", rss_kib(pid));
    std::thread::scope(|scope| {
        scope.spawn(|| commit_load(&daemon.socket, clients, &stop, &committed, "f"));
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
    measure_commits(&daemon.socket, 1, options.seconds, before);
    measure_commits(&daemon.socket, options.clients, options.seconds, before);
    let after = measure_disk(&data);
    println!(
        "disk: fdatasync {before:.0} per second before the commits, {after:.0} after; ratios are to the first"
    );
    if options.fill > 0 {
        fill(&daemon, options.fill, options.clients);
    }
    ExitCode::SUCCESS
}
