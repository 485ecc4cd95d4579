//! `franchise`: a whole local franchise in one command. It runs a backoffice
//! (its web pages and XML-RPC on a loopback port) and a meterd uploading to
//! it, both on sled under one data folder, registers the meter on the first
//! run, and prints what to do next. Ctrl-C stops both; running it again
//! reuses the data.

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use backoffice::send::{Backoffice, DEFAULT_PARAMS};
use backoffice::store::{AnyStore, Store};
use clap::Parser;
use meterd::config::FileSettings;
use proto::{Bid, Mid};

/// Exit status when something the franchise needs is unavailable.
const EXIT_UNAVAILABLE: u8 = 69;
/// Exit status for a bad setting.
const EXIT_USAGE: u8 = 64;
/// The customer that owns the local meter.
const OPERATOR_EMAIL: &str = "operator@franchise.localhost";

#[derive(Parser, Debug)]
#[command(
    name = "franchise",
    version,
    about = "Run a local superdistribution franchise: a backoffice with its web pages, and a \
meterd uploading to it.",
    long_about = "Run a local superdistribution franchise: a backoffice (web pages and XML-RPC \
on a loopback port) and a meterd uploading to it, both on sled under one data folder. The first \
run registers the meter; later runs reuse everything. Ctrl-C stops both. The README's \
\"Walk through it\" section shows what to do next."
)]
struct Cli {
    /// Where the backoffice's store, the meter's cache and its secret live.
    #[arg(long, env = "FRANCHISE_DATA_DIR", default_value = "local-data")]
    data_dir: PathBuf,
    /// Keep the branch in PostgreSQL instead of the data folder:
    /// postgres://USER@HOST:PORT/DB (see docs/postgres.md).
    #[arg(
        long,
        env = "BACKOFFICE_STORE",
        hide_env_values = true,
        value_name = "URL"
    )]
    store: Option<String>,
    /// The backoffice's address: web pages at /, XML-RPC at /RPC2.
    #[arg(long, env = "FRANCHISE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The meter's socket [default: $METERD_SOCKET, else
    /// $XDG_RUNTIME_DIR/meterd.sock, else /run/meterd/meterd.sock for root].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// This branch's code; every ID it issues starts with it.
    #[arg(long, env = "BACKOFFICE_BID", default_value = "B1")]
    bid: Bid,
    /// The branch's telephone number, shown on refusal pages.
    #[arg(long, env = "BACKOFFICE_PHONE", default_value = "+1 555 0100")]
    phone: String,
    /// PBKDF2 iterations for new passwords. Below 600000 only for tests.
    #[arg(long, env = "BACKOFFICE_PASSWORD_ITERATIONS", default_value_t = backoffice::web::password::ITERATIONS_MIN)]
    password_iterations: u32,
    #[command(flatten)]
    shown: backoffice::web::shown::ShownArgs,
}

fn main() -> ExitCode {
    // A child process checking an uploaded module (`pricing::guard`).
    if let Some(code) = backoffice::pricing::guard::child_main() {
        return code;
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FRANCHISE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let Some(iterations) = std::num::NonZeroU32::new(cli.password_iterations) else {
        eprintln!("franchise: --password-iterations must be at least 1");
        return ExitCode::from(EXIT_USAGE);
    };
    match run(&cli, iterations) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("franchise: {message}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// The local meter: its MID and the file holding its secret.
struct LocalMeter {
    mid: Mid,
    secret_file: PathBuf,
}

/// The meter registered on an earlier run, if its files and its record
/// agree; else a new one, registered to the franchise's operator customer.
fn local_meter(store: &AnyStore, bid: &Bid, dir: &Path) -> Result<(LocalMeter, bool), String> {
    let mid_file = dir.join("mid");
    let secret_file = dir.join("meter.secret");
    let earlier = std::fs::read_to_string(&mid_file)
        .ok()
        .and_then(|text| Mid::parse(text.trim()).ok());
    if let Some(mid) = earlier {
        let secret = std::fs::read_to_string(&secret_file).unwrap_or_default();
        let record = store.meter(&mid).map_err(|error| error.to_string())?;
        if record.is_some_and(|meter| meter.secret_hex == secret.trim()) {
            return Ok((LocalMeter { mid, secret_file }, false));
        }
        tracing::warn!(%mid, "the meter files do not match the store: registering a new meter");
    }
    let owner = match store
        .customer_by_email(OPERATOR_EMAIL)
        .map_err(|error| error.to_string())?
    {
        Some(customer) => customer,
        None => store
            .create_customer(bid, "Local operator", OPERATOR_EMAIL)
            .map_err(|error| error.to_string())?,
    };
    let meter = store
        .create_meter(bid, &owner.cid)
        .map_err(|error| error.to_string())?;
    write_private(&secret_file, meter.secret_hex.as_bytes())
        .map_err(|error| format!("cannot write {}: {error}", secret_file.display()))?;
    write_private(&mid_file, meter.mid.as_str().as_bytes())
        .map_err(|error| format!("cannot write {}: {error}", mid_file.display()))?;
    Ok((
        LocalMeter {
            mid: meter.mid,
            secret_file,
        },
        true,
    ))
}

/// Writes a file readable by its owner only: a temporary file, synced,
/// renamed over the old one, so a crash leaves the old or the new.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

fn run(cli: &Cli, iterations: std::num::NonZeroU32) -> Result<(), String> {
    let data = &cli.data_dir;
    let office_dir = data.join("backoffice");
    let meter_dir = data.join("meterd");
    for dir in [&office_dir, &meter_dir] {
        durable::private_dir(dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    }
    let (token_path, operator_token) = backoffice::server::operator_token(&office_dir)
        .map_err(|error| format!("cannot keep the operator token: {error}"))?;
    let store =
        AnyStore::open(cli.store.as_deref(), &office_dir).map_err(|error| error.to_string())?;
    let (meter, new_meter) = local_meter(&store, &cli.bid, &meter_dir)?;
    let office = Backoffice::open(store, DEFAULT_PARAMS).map_err(|error| error.to_string())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| error.to_string())?;
    let outcome = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(cli.listen)
            .await
            .map_err(|error| {
                format!(
                    "cannot listen on {}: {error} (is a franchise or backoffice running? \
                     --listen picks another address)",
                    cli.listen
                )
            })?;
        let address = listener.local_addr().map_err(|error| error.to_string())?;
        let sessions = office.store().web_sessions();
        let web = backoffice::web::Web::with_sessions(
            backoffice::web::WebConfig {
                phone: cli.phone.clone(),
                password_iterations: iterations,
                secure_cookies: false,
                public_url: format!("http://{address}"),
                outbox: office_dir.join("outbox"),
                shown: cli.shown.shown(),
                // The local franchise's operator is its only customer: a
                // top-up recorded by the operator is theirs to make.
                top_up: true,
            },
            sessions,
        );
        let service = std::sync::Arc::new(backoffice::server::Service {
            backoffice: office,
            bid: cli.bid,
            operator_token,
            web,
            funding: Box::new(backoffice::funding::RecordedByOperator),
            payments: backoffice::parlayx::Payments::new(cli.shown.currency.code()),
        });
        backoffice::server::sweep_expired_holds(std::sync::Arc::downgrade(&service));
        let (stop_office, stopped) = tokio::sync::watch::channel(false);
        let mut stopped_office = stopped.clone();
        let office_task = tokio::spawn(backoffice::server::run(listener, service, async move {
            let _ = stopped_office.wait_for(|stop| *stop).await;
        }));

        let overrides = FileSettings {
            socket: cli
                .socket
                .clone()
                .or_else(|| std::env::var_os(meterd::SOCKET_ENV).map(PathBuf::from)),
            data_dir: Some(meter_dir.clone()),
            backoffice_url: Some(format!("http://{address}/RPC2")),
            mid: Some(meter.mid.to_string()),
            secret_file: Some(meter.secret_file.clone()),
            ..FileSettings::default()
        };
        let config = meterd::config::resolve(overrides, FileSettings::default(), |key| {
            std::env::var(key).ok()
        })
        .map_err(|error| error.to_string())?;
        // The meter stops first, so that its last upload still finds the
        // backoffice; then the backoffice.
        let meter_outcome = meterd::daemon::serve(config, shutdown_signal(), |config| {
            let _ = print_banner(cli, address, &token_path, &meter, new_meter, &config.socket);
        })
        .await;
        let _ = stop_office.send(true);
        let office_outcome = office_task.await;
        meter_outcome.map_err(|error| format!("meterd: {error}"))?;
        match office_outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("backoffice: {error}")),
            Err(error) => Err(format!("backoffice: {error}")),
        }
    });
    // The meter and the backoffice gave calls in flight their grace
    // already; what is left is abandoned.
    runtime.shutdown_timeout(std::time::Duration::from_millis(250));
    outcome
}

fn print_banner(
    cli: &Cli,
    address: SocketAddr,
    token_path: &Path,
    meter: &LocalMeter,
    new_meter: bool,
    socket: &Path,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "franchise: web pages at http://{address}/")?;
    writeln!(
        out,
        "  backoffice  http://{address}/RPC2 (health at /health, metrics at /metrics)"
    )?;
    writeln!(
        out,
        "  meter       {} ({}), socket {}",
        meter.mid,
        if new_meter {
            "registered now"
        } else {
            "registered on an earlier run"
        },
        socket.display()
    )?;
    writeln!(
        out,
        "  data        {} (run again to reuse it; Ctrl-C stops both)",
        cli.data_dir.display()
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "Next, in another shell (README.md, \"Walk through it\"):"
    )?;
    writeln!(out, "  cargo build --release -p meterd -p backoffice")?;
    writeln!(
        out,
        "  export BACKOFFICE_TOKEN_FILE={}",
        token_path.display()
    )?;
    if cli.listen.to_string() != "127.0.0.1:8080" {
        writeln!(out, "  export BACKOFFICE_URL=http://{address}/RPC2")?;
    }
    let default_socket = meterd::default_socket_path(|key| std::env::var(key).ok());
    if socket != default_socket {
        writeln!(out, "  export {}={}", meterd::SOCKET_ENV, socket.display())?;
    }
    writeln!(out, "  then open http://{address}/ and register")?;
    out.flush()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
