//! `meterd`: the meter daemon (`meterd serve`) and the commands scripts and
//! login hooks use to call it.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meterd::client::{ClientError, Meter};
use meterd::config::{self, FileSettings};
use meterd::meter::PARENT_CONTEXT;
use proto::grant::{GrantInfo, PollStatus, Scope};
use proto::xmlrpc::Value;
use proto::{Cid, Context, Pid};

/// Exit code for a bad command line or configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code when no meter answers (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code when the meter refused the call.
const EXIT_REFUSED: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "meterd",
    version,
    about = "The superdistribution meter: counts uses of metered software and uploads them to a backoffice.",
    long_about = "The superdistribution meter: counts uses of metered software and uploads them to a backoffice.\n\n\
`meterd serve` runs the daemon. The other commands call a running daemon, for shell scripts and login hooks: \
`meterd query PID` exits 0 when the use may begin and 1 when it may not."
)]
struct Cli {
    /// The meter's socket [env: METERD_SOCKET] [default: $XDG_RUNTIME_DIR/meterd.sock, else /run/meterd/meterd.sock (serve: root only)]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the meter daemon until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Start a session: uses in the calling shell (and its children) are charged to CID.
    Login {
        /// The customer ID, such as B1-C42.
        cid: Cid,
        #[command(flatten)]
        context: ContextArg,
    },
    /// End the session of CID.
    Logout {
        /// The customer ID.
        cid: Cid,
        #[command(flatten)]
        context: ContextArg,
    },
    /// May a use of PID begin? Exit 0 for yes, 1 for no, 69 when no meter answers (also a no).
    Query {
        /// The product ID, such as B1-P7.
        pid: Pid,
        #[command(flatten)]
        context: ContextArg,
    },
    /// Record a use of PID (after a query that answered yes).
    Commit {
        /// The product ID.
        pid: Pid,
        #[command(flatten)]
        context: ContextArg,
    },
    /// Close an open query of PID without a use.
    Cancel {
        /// The product ID.
        pid: Pid,
        #[command(flatten)]
        context: ContextArg,
    },
    /// Upload now; exit 0 when the upload succeeded.
    Flush,
    /// Show the meter's state.
    Status,
    /// Let CID be charged for your uses on this meter: prints a code that CID
    /// enters on the backoffice's pages, then waits for the approval. Exit 0
    /// when granted, 2 when refused, expired or failed.
    Grant {
        /// The customer ID, such as B1-C42.
        cid: Cid,
        /// Grant every user of this machine, not only you (root only, and
        /// only where the customer's approval allows it).
        #[arg(long)]
        machine: bool,
        /// Read CID's password from standard input (one line) instead of
        /// showing a code. Never put a password in an argument. Only with a
        /// backoffice on this machine (a loopback address): the meter speaks
        /// plain http, so elsewhere it refuses; use the code flow.
        #[arg(long)]
        password_stdin: bool,
        /// With --password-stdin: the grant ends after SECONDS (default:
        /// until revoked).
        #[arg(long, value_name = "SECONDS", requires = "password_stdin")]
        expires_in: Option<u64>,
    },
    /// List the grants this meter holds for you (every grant, for root).
    Grants,
}

#[derive(clap::Args, Debug)]
struct ContextArg {
    /// The context to call in. Default: the shell that runs this command
    /// (`..`), so a session or query spans the commands of one script.
    #[arg(long, value_name = "NAME", default_value = PARENT_CONTEXT)]
    context: Context,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// A TOML config file (keys as in docs/meterd.md).
    #[arg(long, env = "METERD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the cache and state live [default: $XDG_STATE_HOME/meterd, else ~/.local/state/meterd].
    #[arg(long, env = "METERD_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Socket permissions in octal; they decide who may call [default: 600].
    #[arg(long, env = "METERD_SOCKET_MODE", value_name = "OCTAL")]
    socket_mode: Option<String>,
    /// Readings the cache may hold before it refuses new ones [default: 10000000].
    #[arg(long, env = "METERD_CACHE_READINGS_MAX", value_name = "N")]
    cache_readings_max: Option<u64>,
    /// The backoffice's XML-RPC URL, such as https://backoffice.example/RPC2
    /// (http:// is meant for this machine, such as http://127.0.0.1:8080/RPC2;
    /// to another one it works but is read by anyone on the way).
    #[arg(long, env = "METERD_BACKOFFICE", value_name = "URL")]
    backoffice: Option<String>,
    /// This meter's MID, issued by the backoffice.
    #[arg(long, env = "METERD_MID", value_name = "MID")]
    mid: Option<String>,
    /// A file holding this meter's secret, issued with the MID.
    #[arg(long, env = "METERD_SECRET_FILE", value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// For an https:// backoffice: CA certificates (PEM) its certificate
    /// must chain to [default: the system's roots].
    #[arg(long, env = "METERD_BACKOFFICE_CA", value_name = "FILE")]
    backoffice_ca: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| meterd::default_socket_path(|key| std::env::var(key).ok()));
    match cli.command {
        Command::Serve(args) => serve(cli.socket, args),
        command => call(socket, command),
    }
}

fn serve(socket: Option<PathBuf>, args: ServeArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("METERD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let file = match &args.config {
        Some(path) => match config::read_file(path) {
            Ok(file) => file,
            Err(error) => return usage_error(&error),
        },
        None => FileSettings::default(),
    };
    let overrides = FileSettings {
        socket: socket.or_else(|| std::env::var_os(meterd::SOCKET_ENV).map(PathBuf::from)),
        socket_mode: args.socket_mode,
        data_dir: args.data_dir,
        cache_readings_max: args.cache_readings_max,
        backoffice_url: args.backoffice,
        mid: args.mid,
        secret_file: args.secret_file,
        backoffice_ca: args.backoffice_ca,
        contexts_max: None,
        frames_max: None,
    };
    let config = match config::resolve(overrides, file, |key| std::env::var(key).ok()) {
        Ok(config) => config,
        Err(error) => return usage_error(&error),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    let outcome = runtime.block_on(meterd::daemon::serve(config, shutdown_signal(), |config| {
        // A daemon must not die because whoever started it closed its stdout.
        let _ = writeln!(
            std::io::stdout(),
            "meterd listening on {}",
            config.socket.display()
        );
    }));
    // Abandoned calls (past the grace period) must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // A setting to change, like any other bad setting.
        Err(error @ meterd::daemon::StartError::UnsafeSocketDirectory(_)) => usage_error(&error),
        Err(error) => {
            eprintln!("meterd: {error}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

fn usage_error(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("meterd: {error}");
    ExitCode::from(EXIT_USAGE)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
}

fn call(socket: PathBuf, command: Command) -> ExitCode {
    let mut meter = Meter::connect(socket);
    if let Command::Grant {
        cid,
        machine,
        password_stdin,
        expires_in,
    } = command
    {
        return grant(&mut meter, cid, machine, password_stdin, expires_in);
    }
    let with = |meter: Meter, context: ContextArg| meter.with_context(context.context);
    let outcome: Result<bool, ClientError> = match command {
        Command::Serve(_) => unreachable!("handled by serve"),
        Command::Grant { .. } => unreachable!("handled by grant"),
        Command::Grants => meter.grants().map(|grants| {
            print_grants(&grants);
            true
        }),
        Command::Login { cid, context } => with(meter, context).login(cid).map(|()| true),
        Command::Logout { cid, context } => with(meter, context).logout(cid),
        Command::Query { pid, context } => with(meter, context).try_query(pid),
        Command::Commit { pid, context } => with(meter, context).commit(pid).map(|()| true),
        Command::Cancel { pid, context } => with(meter, context).cancel(pid),
        Command::Flush => meter.flush(),
        Command::Status => meter.status().map(|status| {
            print_status(&status);
            true
        }),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => client_error(&error),
    }
}

fn client_error(error: &ClientError) -> ExitCode {
    eprintln!("meterd: {error}");
    match error {
        ClientError::Fault(_) => ExitCode::from(EXIT_REFUSED),
        _ => ExitCode::from(EXIT_UNAVAILABLE),
    }
}

/// `meterd grant CID`: by device code (the customer approves on the web
/// pages) or by password on standard input.
fn grant(
    meter: &mut Meter,
    cid: Cid,
    machine: bool,
    password_stdin: bool,
    expires_in: Option<u64>,
) -> ExitCode {
    let granted = if password_stdin {
        let mut line = String::new();
        if let Err(error) = std::io::stdin().read_line(&mut line) {
            return usage_error(&format!("cannot read the password: {error}"));
        }
        let password = line.strip_suffix('\n').unwrap_or(&line);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            return usage_error(&"--password-stdin needs the password on standard input");
        }
        match meter.grant_password(cid, password, machine, expires_in) {
            Ok(granted) => granted,
            Err(error) => return client_error(&error),
        }
    } else {
        let started = match meter.grant_start(cid, machine) {
            Ok(started) => started,
            Err(error) => return client_error(&error),
        };
        println!(
            "Open {}, log in as {cid} and enter the code {}",
            started.verification_uri, started.user_code
        );
        eprintln!(
            "meterd: waiting for {cid} to approve (the code expires in {} s)",
            started.expires_in_s
        );
        loop {
            match meter.grant_wait(&started.request) {
                Ok(PollStatus::Pending) => continue,
                Ok(PollStatus::Approved(granted)) => break granted,
                Ok(PollStatus::Denied) => {
                    eprintln!("meterd: {cid} refused the grant");
                    return ExitCode::from(EXIT_REFUSED);
                }
                Ok(PollStatus::Expired) => {
                    eprintln!(
                        "meterd: the code expired before {cid} approved it; run `meterd grant {cid}` again"
                    );
                    return ExitCode::from(EXIT_REFUSED);
                }
                Err(error) => return client_error(&error),
            }
        }
    };
    let to = match &granted.scope {
        Scope::User { uid, .. } => format!("uid {uid}"),
        Scope::Machine => "every user of this machine".to_owned(),
    };
    match granted.expires_ms {
        Some(expires) => println!("granted {} to {to} until {}", granted.cid, utc(expires)),
        None => println!("granted {} to {to}", granted.cid),
    }
    ExitCode::SUCCESS
}

fn print_grants(grants: &[GrantInfo]) {
    let now = meterd::meter::now_ms();
    for grant in grants {
        let until = match grant.expires_ms {
            None => "until revoked".to_owned(),
            Some(expires) if expires <= now => format!("expired {}", utc(expires)),
            Some(expires) => format!("until {}", utc(expires)),
        };
        println!(
            "{:<12} {:<24} since {}  {until}",
            grant.cid,
            grant.scope.to_string(),
            utc(grant.created_ms)
        );
    }
}

/// `YYYY-MM-DD HH:MM:SSZ` for ms since the Unix epoch (proleptic Gregorian,
/// UTC).
fn utc(ms: u64) -> String {
    proto::time::utc_text(ms)
}

fn print_status(status: &Value) {
    for member in status.as_struct().unwrap_or_default() {
        let shown = match &member.value {
            Value::String(text) => text.clone(),
            Value::Bool(truth) => truth.to_string(),
            Value::Nil => "-".to_owned(),
            Value::Array(items) if items.is_empty() => "-".to_owned(),
            Value::Array(items) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map_or_else(|| format!("{item:?}"), str::to_owned)
                })
                .collect::<Vec<_>>()
                .join(" "),
            other => format!("{other:?}"),
        };
        println!("{:<20} {shown}", member.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_796_195_045_123), "2026-12-02 07:04:05Z");
    }
}
