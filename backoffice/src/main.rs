//! `backoffice`: the backoffice's command line: `serve` runs the server;
//! `taca check` shows producers what a module charges before they upload it.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use backoffice::pricing::{PriceInput, Pricing, PricingError, TacaHash};
use clap::{Parser, Subcommand};
use proto::{Cid, Code, Pid};

/// Exit code for a bad command line (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "backoffice",
    version,
    about = "The superdistribution backoffice."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the backoffice: XML-RPC on POST /RPC2 (meters' `send` and the
    /// operator's calls) until SIGINT or SIGTERM.
    Serve {
        /// Where the store lives [default: $XDG_STATE_HOME/backoffice, else ~/.local/state/backoffice].
        #[arg(long, env = "BACKOFFICE_DATA_DIR", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// The address to listen on.
        #[arg(long, env = "BACKOFFICE_LISTEN", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// This branch's code; every ID it issues starts with it.
        #[arg(long, env = "BACKOFFICE_BID", default_value = "B1")]
        bid: proto::Bid,
    },
    /// Work with TACA pricing modules.
    Taca {
        #[command(subcommand)]
        command: TacaCommand,
    },
}

#[derive(Subcommand, Debug)]
enum TacaCommand {
    /// Validate a module as an upload would, then print the price and fuel
    /// for each sample input. Exit 0 when the module would be accepted.
    #[command(after_help = "\
A SAMPLE is comma-separated key=value pairs; keys left out take the default:
  code=)        one of { } ( )  (login, logout, query, commit)
  uses=0        the payer's earlier uses of this PID in the billing period
  volume=1      units consumed
  unit= contract= service= operation=   Parlay X rating parameters
  payer=B1-C1   pid=B1-P1 (a PID ending in T is a product's test PID)
Without samples, a few typical inputs are tried.

Example: backoffice taca check tiered.wasm code=\\),uses=0 code=\\),uses=50 unit=MB,volume=1500")]
    Check {
        /// The module, as built with `cargo build --release --target wasm32-unknown-unknown`.
        module: PathBuf,
        /// Sample inputs.
        samples: Vec<String>,
    },
}

fn default_samples() -> Vec<String> {
    [
        "code=),uses=0",
        "code=),uses=10",
        "code=),uses=100",
        "code=(",
        "code=),pid=B1-P1T",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn parse_sample(text: &str) -> Result<PriceInput, String> {
    let mut input = PriceInput::invocation(
        Cid::parse("B1-C1").expect("valid default"),
        Code::Commit,
        Pid::parse("B1-P1").expect("valid default"),
        0,
    );
    for pair in text.split(',').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{key} needs a number, not {value:?}"))
        };
        match key {
            "code" => {
                input.code = Code::parse(value)
                    .ok_or_else(|| format!("code must be one of {{ }} ( ), not {value:?}"))?
            }
            "uses" => input.period_uses = number()?,
            "volume" => input.volume = number()?,
            "unit" => input.unit = value.to_owned(),
            "contract" => input.contract = value.to_owned(),
            "service" => input.service = value.to_owned(),
            "operation" => input.operation = value.to_owned(),
            "payer" => input.payer = Cid::parse(value).map_err(|error| error.to_string())?,
            "pid" => input.pid = Pid::parse(value).map_err(|error| error.to_string())?,
            _ => return Err(format!("unknown sample key {key:?}")),
        }
    }
    Ok(input)
}

fn check(module: &PathBuf, samples: Vec<String>) -> ExitCode {
    let bytes = match std::fs::read(module) {
        Ok(bytes) => bytes,
        Err(error) => {
            eprintln!("backoffice: cannot read {}: {error}", module.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let samples = if samples.is_empty() {
        default_samples()
    } else {
        samples
    };
    let inputs = match samples
        .iter()
        .map(|text| parse_sample(text))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(inputs) => inputs,
        Err(message) => {
            eprintln!("backoffice: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    println!(
        "module: {} ({} bytes, sha256 {})",
        module.display(),
        bytes.len(),
        TacaHash::of(&bytes)
    );
    let results = match Pricing::new().check(&bytes, &inputs) {
        Ok(results) => results,
        Err(error) => {
            println!("refused: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("{:<44} {:>22} {:>10}", "sample", "price", "fuel");
    for (sample, result) in samples.iter().zip(results) {
        match result {
            Ok(priced) => println!(
                "{sample:<44} {:>22} {:>10}",
                priced.amount.to_string(),
                priced.fuel
            ),
            Err(PricingError::Refused(code)) => println!(
                "{sample:<44} {:>22} {:>10}",
                format!("refused ({code})"),
                "-"
            ),
            Err(error) => println!("{sample:<44} {error}"),
        }
    }
    println!("accepted: the module would be accepted for upload");
    ExitCode::SUCCESS
}

fn default_data_dir() -> PathBuf {
    let env = |key: &str| std::env::var(key).ok().filter(|value| !value.is_empty());
    match (env("XDG_STATE_HOME"), env("HOME")) {
        (Some(state), _) => PathBuf::from(state).join("backoffice"),
        (None, Some(home)) => PathBuf::from(home).join(".local/state/backoffice"),
        (None, None) => PathBuf::from("backoffice-data"),
    }
}

/// The operator token in `dir`, created (owner-only) on first start.
fn operator_token(dir: &std::path::Path) -> std::io::Result<(PathBuf, String)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("operator-token");
    match std::fs::read_to_string(&path) {
        Ok(token) => Ok((path, token.trim().to_owned())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let token = backoffice::registry::new_meter_secret();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(token.as_bytes())?;
            file.sync_all()?;
            Ok((path, token))
        }
        Err(error) => Err(error),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn serve(data_dir: Option<PathBuf>, listen: std::net::SocketAddr, bid: proto::Bid) -> ExitCode {
    let dir = data_dir.unwrap_or_else(default_data_dir);
    let opened = std::fs::create_dir_all(&dir)
        .map_err(|error| error.to_string())
        .and_then(|()| operator_token(&dir).map_err(|error| error.to_string()))
        .and_then(|token| {
            let store = backoffice::store::SledStore::open(&dir.join("store"))
                .map_err(|error| error.to_string())?;
            let params = backoffice::send::DEFAULT_PARAMS;
            let backoffice = backoffice::send::Backoffice::open(store, params)
                .map_err(|error| error.to_string())?;
            Ok((token, backoffice))
        });
    let ((token_path, operator_token), backoffice) = match opened {
        Ok(opened) => opened,
        Err(message) => {
            eprintln!("backoffice: cannot open {}: {message}", dir.display());
            return ExitCode::from(69);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    let outcome = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        // A daemon must not die because whoever started it closed its stdout.
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "backoffice listening on http://{address}/RPC2");
        let _ = writeln!(stdout, "operator token in {}", token_path.display());
        let service = std::sync::Arc::new(backoffice::server::Service {
            backoffice,
            bid,
            operator_token,
        });
        backoffice::server::run(listener, service, shutdown_signal()).await
    });
    runtime.shutdown_timeout(std::time::Duration::from_millis(
        backoffice::server::SHUTDOWN_GRACE_MS,
    ));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("backoffice: {error}");
            ExitCode::from(69)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            data_dir,
            listen,
            bid,
        } => serve(data_dir, listen, bid),
        Command::Taca {
            command: TacaCommand::Check { module, samples },
        } => check(&module, samples),
    }
}
