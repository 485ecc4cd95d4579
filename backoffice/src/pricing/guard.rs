//! Checking an uploaded module in a process of its own (issue 14, item 7).
//!
//! The structural limits (`limits`) bound what compiling a module can cost,
//! but a compiler bug or a shape nobody measured could still take longer or
//! more memory than that, and work on the server's own threads cannot be
//! stopped once begun. So an upload, the operator's `product.create` and
//! `backoffice taca check` all check a module (structural limits, compile,
//! the rewrite's compile, the samples) in a child process: the program
//! running, started again with `CHILD_ARG`. The parent caps the child's
//! address space (`CHECK_MEMORY_BYTES_MAX`) and CPU time
//! (`CHECK_CPU_SECONDS_MAX`) with `prlimit` before it sends the module, kills
//! it at the wall-clock deadline (`CHECK_WALL_MS_MAX`) and when the caller
//! goes away (the future of `Guard::check` dropped: the uploader
//! disconnected), and runs at most `CHECKS_AT_ONCE_MAX` children at once;
//! past that a check is answered `Busy` at once. The server itself never
//! compiles an upload: it compiles a stored module (in-process, bounded by
//! the structural limits) only when a use of it is first priced.
//!
//! A program that can check modules calls `child_main` first thing in
//! `main`: `backoffice` and `franchise` do.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use proto::Amount;
use serde::{Deserialize, Serialize};

use super::{CheckError, MODULE_BYTES_MAX, PriceInput, Pricing, PricingError};

/// The first argument that makes a program a module checker (`child_main`).
pub const CHILD_ARG: &str = "--taca-check-child";
/// Checks (child processes) running at once, over the whole process; past
/// it a check is answered `GuardError::Busy` without waiting.
pub const CHECKS_AT_ONCE_MAX: usize = 2;
/// CPU seconds a check may use (`RLIMIT_CPU`: the kernel stops it).
pub const CHECK_CPU_SECONDS_MAX: u64 = 10;
/// Wall-clock time a check may take before it is killed, in milliseconds.
pub const CHECK_WALL_MS_MAX: u64 = 20_000;
/// Address space a check may map (`RLIMIT_AS`), the engine's reservations
/// for its few instances included.
pub const CHECK_MEMORY_BYTES_MAX: u64 = 1024 * 1024 * 1024;
/// Instances the child's engine pools: it prices one sample at a time.
const CHILD_POOL_SLOTS: u32 = 4;
/// Most bytes of the child's error output kept for a message.
const STDERR_KEPT_BYTES: u64 = 4096;

/// Checks running now, over the whole process.
pub fn checks_running() -> usize {
    CHECKS_AT_ONCE_MAX - CHECKS.available_permits()
}

static CHECKS: LazyLock<tokio::sync::Semaphore> =
    LazyLock::new(|| tokio::sync::Semaphore::new(CHECKS_AT_ONCE_MAX));

/// What a sample was priced at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Priced: the amount and the fuel the price used, all of it.
    Priced {
        /// The amount.
        amount: Amount,
        /// Fuel used, instantiation included.
        fuel: u64,
    },
    /// Refused by the module with this code.
    Refused {
        /// The refusal code.
        code: u64,
    },
}

/// An accepted module's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Each sample's outcome, in order.
    pub outcomes: Vec<Outcome>,
    /// Why each price needs a fresh instance, when it does.
    pub fresh_because: Option<String>,
    /// CPU time the check used (the child's, user and system).
    pub cpu_ms: u64,
}

/// What the child answers on its standard output.
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Accepted(Report),
    Refused(String),
    BadSample(String),
}

/// Why a check gave no report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// The module was refused; the message says why (for the producer).
    #[error("{0}")]
    Refused(String),
    /// A sample is not a valid input: the caller's error.
    #[error("{0}")]
    BadSample(String),
    /// `CHECKS_AT_ONCE_MAX` checks are running.
    #[error(
        "the backoffice is checking {CHECKS_AT_ONCE_MAX} other modules right now; nothing was \
         registered: try again in a minute"
    )]
    Busy,
    /// The caller went away and the check was stopped.
    #[error("the check was cancelled")]
    Cancelled,
    /// The check could not be run (not the module's fault).
    #[error("the module could not be checked: {0}")]
    Internal(String),
}

/// Runs checks in child processes of `program`.
#[derive(Debug, Clone)]
pub struct Guard {
    program: PathBuf,
    wall: Duration,
    cpu_seconds: u64,
}

/// Sets the flag when dropped: the check's future went away.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Guard {
    /// Checks with `program`, which must call `child_main`.
    pub fn new(program: impl Into<PathBuf>) -> Guard {
        Guard {
            program: program.into(),
            wall: Duration::from_millis(CHECK_WALL_MS_MAX),
            cpu_seconds: CHECK_CPU_SECONDS_MAX,
        }
    }

    /// The same with another wall-clock deadline (tests).
    pub fn with_deadline(mut self, wall: Duration) -> Guard {
        self.wall = wall;
        self
    }

    /// The same with other time bounds (tests of a debug build, whose
    /// compiler is about twenty times slower).
    pub fn with_time_bounds(mut self, cpu_seconds: u64, wall: Duration) -> Guard {
        self.cpu_seconds = cpu_seconds;
        self.wall = wall;
        self
    }

    /// Checks with the program running now.
    pub fn current() -> Result<Guard, GuardError> {
        std::env::current_exe()
            .map(Guard::new)
            .map_err(|error| GuardError::Internal(format!("the program's path: {error}")))
    }

    /// Checks `module` on `samples` (`PriceInput::parse_sample` texts) in a
    /// child process; `Busy` at once when `CHECKS_AT_ONCE_MAX` run. Dropping
    /// the future kills the child.
    pub fn check(
        &self,
        module: Vec<u8>,
        samples: Vec<String>,
    ) -> impl Future<Output = Result<Report, GuardError>> + Send + 'static {
        let guard = self.clone();
        async move {
            let permit = CHECKS.try_acquire().map_err(|_| GuardError::Busy)?;
            let cancel = Arc::new(AtomicBool::new(false));
            let _cancel_on_drop = CancelOnDrop(Arc::clone(&cancel));
            tokio::task::spawn_blocking(move || {
                // Held until the child is gone, killed or not.
                let _permit = permit;
                guard.run(&module, &samples, &cancel)
            })
            .await
            .map_err(|error| GuardError::Internal(error.to_string()))?
        }
    }

    /// `check` for callers without an async runtime (or on a blocking
    /// thread of one).
    pub fn check_blocking(&self, module: &[u8], samples: &[String]) -> Result<Report, GuardError> {
        let _permit = CHECKS.try_acquire().map_err(|_| GuardError::Busy)?;
        self.run(module, samples, &AtomicBool::new(false))
    }

    fn run(
        &self,
        module: &[u8],
        samples: &[String],
        cancel: &AtomicBool,
    ) -> Result<Report, GuardError> {
        let internal = |what: &str, error: &dyn std::fmt::Display| {
            GuardError::Internal(format!("{what}: {error}"))
        };
        let started = Instant::now();
        let mut child = Command::new(&self.program)
            .arg(CHILD_ARG)
            .args(samples)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| internal(&format!("starting {}", self.program.display()), &error))?;
        // The limits are set before the child has the module: it waits for
        // its input before doing any work.
        if let Err(error) = limit(&child, self.cpu_seconds) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(internal("limiting the check's process", &error));
        }
        let mut stdin = child.stdin.take().expect("piped");
        let input = module.to_vec();
        // A child that stops reading cannot block the deadline.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let mut stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stdout.read_to_end(&mut text);
            text
        });
        let stderr = child.stderr.take().expect("piped");
        let errors = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.take(STDERR_KEPT_BYTES).read_to_end(&mut text);
            text
        });
        let deadline = self.wall;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(error) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(internal("waiting for the check", &error));
                }
            }
            let cancelled = cancel.load(Ordering::Relaxed);
            if cancelled || started.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(if cancelled {
                    GuardError::Cancelled
                } else {
                    GuardError::Refused(format!(
                        "checking the module took longer than {} ms, the most a check may take \
                         (docs/taca-abi.md, \"Bounds\")",
                        deadline.as_millis()
                    ))
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = writer.join();
        let stdout = reader.join().unwrap_or_default();
        let stderr = errors.join().unwrap_or_default();
        if !status.success() {
            return Err(GuardError::Refused(abnormal_end(
                status,
                &stderr,
                self.cpu_seconds,
            )));
        }
        match serde_json::from_slice::<Answer>(&stdout) {
            Ok(Answer::Accepted(report)) => Ok(report),
            Ok(Answer::Refused(message)) => Err(GuardError::Refused(message)),
            Ok(Answer::BadSample(message)) => Err(GuardError::BadSample(message)),
            Err(error) => Err(internal("the check's answer", &error)),
        }
    }
}

/// Caps the child's address space and CPU time.
fn limit(child: &std::process::Child, cpu_seconds: u64) -> std::io::Result<()> {
    use rustix::process::{Pid, Resource, Rlimit, prlimit};
    let pid = Pid::from_child(child);
    let cap = |resource, soft: u64, hard: u64| {
        prlimit(
            Some(pid),
            resource,
            Rlimit {
                current: Some(soft),
                maximum: Some(hard),
            },
        )
        .map(|_| ())
        .map_err(std::io::Error::from)
    };
    cap(Resource::As, CHECK_MEMORY_BYTES_MAX, CHECK_MEMORY_BYTES_MAX)?;
    // SIGXCPU at the soft limit, SIGKILL a second later.
    cap(Resource::Cpu, cpu_seconds, cpu_seconds + 1)
}

/// The producer's message for a check that ended without an answer.
fn abnormal_end(status: std::process::ExitStatus, stderr: &[u8], cpu_seconds: u64) -> String {
    use std::os::unix::process::ExitStatusExt;
    let text = String::from_utf8_lossy(stderr);
    let memory = text.contains("memory allocation")
        || text.contains("out of memory")
        || text.contains("Cannot allocate memory")
        || text.contains("failed to allocate")
        || text.contains("mmap failed");
    // SIGXCPU (24) at the soft CPU limit, SIGKILL (9) at the hard one.
    let cpu = matches!(status.signal(), Some(24) | Some(9));
    if cpu {
        format!(
            "checking the module used more than {cpu_seconds} s of CPU, the most a check may \
             use (docs/taca-abi.md, \"Bounds\")"
        )
    } else if memory {
        format!(
            "checking the module needed more than {} MiB of memory, the most a check may use \
             (docs/taca-abi.md, \"Bounds\")",
            CHECK_MEMORY_BYTES_MAX / (1024 * 1024)
        )
    } else {
        let last = text.lines().last().unwrap_or("").trim();
        format!(
            "checking the module ended abnormally ({status}) within the bounds of a check \
             ({CHECK_CPU_SECONDS_MAX} s of CPU, {} MiB of memory){}",
            CHECK_MEMORY_BYTES_MAX / (1024 * 1024),
            if last.is_empty() {
                String::new()
            } else {
                format!(": {last}")
            }
        )
    }
}

/// When the program was started as a module checker (`CHILD_ARG` first),
/// checks the module on standard input against the samples in the other
/// arguments, prints the answer on standard output and returns the exit
/// code; otherwise `None`, and the program goes on as usual.
pub fn child_main() -> Option<ExitCode> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(CHILD_ARG) {
        return None;
    }
    let samples: Vec<String> = args.collect();
    let mut module = Vec::new();
    let limit = u64::try_from(MODULE_BYTES_MAX + 1).expect("fits");
    if let Err(error) = std::io::stdin().take(limit).read_to_end(&mut module) {
        eprintln!("reading the module: {error}");
        return Some(ExitCode::FAILURE);
    }
    let answer = child_check(&module, &samples);
    match serde_json::to_writer(std::io::stdout().lock(), &answer) {
        Ok(()) => Some(ExitCode::SUCCESS),
        Err(error) => {
            eprintln!("writing the answer: {error}");
            Some(ExitCode::FAILURE)
        }
    }
}

fn child_check(module: &[u8], samples: &[String]) -> Answer {
    let mut inputs = Vec::with_capacity(samples.len());
    for (index, text) in samples.iter().enumerate() {
        match PriceInput::parse_sample(text) {
            Ok(input) => inputs.push(input),
            Err(error) => {
                return Answer::BadSample(format!(
                    "sample {} ({text:?}) is not a valid input: {error}",
                    index + 1
                ));
            }
        }
    }
    let pricing = Pricing::with_pool(CHILD_POOL_SLOTS);
    let results = match pricing.check(module, &inputs) {
        Ok(results) => results,
        Err(CheckError::BadSample { .. }) => {
            unreachable!("parse_sample returns valid inputs")
        }
        Err(CheckError::Module(error)) => return Answer::Refused(error.to_string()),
    };
    let outcomes = results
        .into_iter()
        .map(|result| match result {
            Ok(priced) => Outcome::Priced {
                amount: priced.amount,
                fuel: priced.fuel,
            },
            Err(PricingError::Refused(code)) => Outcome::Refused { code },
            Err(other) => unreachable!("check refuses the module on {other}"),
        })
        .collect();
    let fresh_because = pricing
        .load(module)
        .ok()
        .and_then(|taca| taca.fresh_instance_reason().map(str::to_owned));
    Answer::Accepted(Report {
        outcomes,
        fresh_because,
        cpu_ms: cpu_ms(),
    })
}

/// CPU time this process's threads used, in milliseconds (the first field
/// of each `/proc/self/task/*/schedstat`, in nanoseconds; 0 where absent).
fn cpu_ms() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let nanos: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    nanos / 1_000_000
}
