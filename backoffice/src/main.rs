//! `backoffice`: the backoffice's command line. For now it checks TACA
//! modules, so producers know what a module costs before uploading it.
#![forbid(unsafe_code)]

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Taca {
            command: TacaCommand::Check { module, samples },
        } => check(&module, samples),
    }
}
