//! `backoffice`: the backoffice's command line: `serve` runs the server;
//! `taca check` shows producers what a module charges before they upload it.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use backoffice::pricing::{PriceInput, Pricing, TacaHash};
use clap::{Parser, Subcommand};

/// Exit code for a bad command line (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code when the backoffice cannot do it (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser, Debug)]
#[command(
    name = "backoffice",
    version,
    about = "The superdistribution backoffice.",
    long_about = "The superdistribution backoffice. `serve` runs it: the web pages at /, \
XML-RPC at /RPC2, /health and /metrics. The operator's commands (customer, product, meter, \
deposit, deny, allow, credit-limit, show, statement, free-uses, suspense, reprice, components, grants, revoke, verify, audit, backup) call a running backoffice \
with the operator token it wrote beside its store; `verify`, `audit` and `backup` with `--data-dir DIR` work on a stopped one, \
and `restore` brings a backup back into one. `cargo run --release -p franchise` runs one \
together with a meter."
)]
struct Cli {
    /// The running backoffice's XML-RPC URL, for the operator's commands.
    #[arg(
        long,
        global = true,
        env = "BACKOFFICE_URL",
        default_value = "http://127.0.0.1:8080/RPC2"
    )]
    url: String,
    /// The operator token file [default: DATA_DIR/operator-token, with
    /// DATA_DIR from BACKOFFICE_DATA_DIR as `serve` reads it, else the
    /// user's state folder].
    #[arg(
        long,
        global = true,
        env = "BACKOFFICE_TOKEN_FILE",
        value_name = "FILE"
    )]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// What the operator does to a registered meter.
#[derive(Subcommand, Debug)]
enum MeterCommand {
    /// Give meter MID a new secret (printed once, or written to a new file):
    /// the old one still verifies for --grace-hours, or until the meter
    /// uploads with the new one. Move the new file over meterd's secret
    /// file: meterd reads it again when it changes.
    Rotate {
        /// The meter.
        mid: String,
        /// Write the new secret to FILE (made new, mode 0600) instead of
        /// printing it; move it over meterd's secret file afterwards.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// Hours the old secret still verifies (0: not at all, for a secret
        /// that leaked; at most 168).
        #[arg(long, value_name = "HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(0..=168))]
        grace_hours: u64,
    },
    /// Revoke meter MID for good: every later upload and grant call of it is
    /// refused (fault 210); batches applied stay applied. Its owner
    /// registers a new meter to go on.
    Revoke {
        /// The meter.
        mid: String,
    },
}

// Parsed once at start: the size of `serve`'s flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the backoffice until SIGINT or SIGTERM: the web pages at /,
    /// XML-RPC on POST /RPC2 (meters' `send` and the operator's calls),
    /// GET /health and GET /metrics.
    Serve {
        /// Where the store lives [default: $XDG_STATE_HOME/backoffice, else ~/.local/state/backoffice].
        #[arg(long, env = "BACKOFFICE_DATA_DIR", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Keep the branch in PostgreSQL instead of the data folder:
        /// postgres://USER@HOST:PORT/DB (or key=value settings). Its schema
        /// is brought up to date at start (see `migrate`). The data folder
        /// still holds the operator token and the outbox.
        #[arg(
            long,
            env = "BACKOFFICE_STORE",
            hide_env_values = true,
            value_name = "URL"
        )]
        store: Option<String>,
        /// The address to listen on.
        #[arg(long, env = "BACKOFFICE_LISTEN", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// This branch's code; every ID it issues starts with it.
        #[arg(long, env = "BACKOFFICE_BID", default_value = "B1")]
        bid: proto::Bid,
        #[command(flatten)]
        web: WebArgs,
        /// Days the readings of applied batches are kept itemised (for
        /// statements' itemised uses and `audit`); older ones are deleted
        /// at start and every hour.
        #[arg(long, env = "BACKOFFICE_ITEMISED_RETENTION_DAYS", default_value_t = backoffice::itemised::RETENTION_DAYS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..=36_500))]
        itemised_retention_days: u64,
        /// Seconds a Parlay X reservation lasts after it is made or
        /// changed (docs/parlayx.md).
        #[arg(long, env = "BACKOFFICE_RESERVATION_TTL_S", default_value_t = backoffice::parlayx::RESERVATION_TTL_MS / 1000, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        reservation_ttl_s: u64,
    },
    /// Register a customer: prints the new CID.
    Customer {
        /// The customer's name.
        name: String,
        /// The customer's e-mail address.
        email: String,
        /// Read the password the customer chose from standard input (one
        /// line), so they can log in and grant meters; never an argument.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Register a product of OWNER with its TACA module: prints the PID and test PID.
    Product {
        /// The owner's CID.
        owner: String,
        /// The product's name.
        name: String,
        /// The terms shown to customers.
        terms: String,
        /// The TACA module (wasm).
        module: PathBuf,
        /// The most one use may cost, shown with the terms; a price above it
        /// is refused (the use goes to suspense). Changing it needs a new product.
        #[arg(long, value_name = "AMOUNT")]
        max_price: String,
    },
    /// Declare the components PID uses inside (replacing those declared
    /// before; none: it uses none): only their uses inside PID's uses are
    /// charged to PID's owner.
    Components {
        /// The product.
        pid: String,
        /// The PIDs of the products it uses inside.
        components: Vec<String>,
    },
    /// List the grants a customer (CID) gave, or a meter (MID) holds.
    Grants {
        /// A CID or an MID.
        id: String,
    },
    /// Revoke a grant by its number (from `grants`): that meter's later
    /// uses of the customer go to suspense.
    Revoke {
        /// The grant's number.
        grant: u64,
    },
    /// Register a meter of OWNER: prints the MID and its secret (shown
    /// once). `meter rotate MID` and `meter revoke MID` change a meter's secret.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Meter {
        /// The owner's CID.
        #[arg(required = true)]
        owner: Option<String>,
        /// Write the meter's secret to FILE (made new, mode 0600) for
        /// meterd's --secret-file, instead of printing it.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// Make it the service credential of product PID (OWNER's), for
        /// Parlay X Payment: the MID is the WS-Security user name and the
        /// secret its password; it asks grants like a meter and never
        /// uploads (docs/parlayx.md).
        #[arg(long, value_name = "PID")]
        service: Option<String>,
        #[command(subcommand)]
        action: Option<MeterCommand>,
    },
    /// Record a deposit from the customer's macro-account, once per
    /// reference: run it again with the same --reference after a failure or
    /// a lost answer, and it completes or repeats the answer, never deposits twice.
    Deposit {
        /// The customer.
        cid: String,
        /// The amount, a decimal such as 10 or 0.5.
        amount: String,
        /// The deposit's reference: 1 to 64 letters, digits, '-', '_', '.'
        /// or ':' [default: a new random one, printed first].
        #[arg(long, value_name = "REFERENCE")]
        reference: Option<String>,
    },
    /// Mark an account "deny service".
    Deny {
        /// The customer.
        cid: String,
    },
    /// Lift "deny service".
    Allow {
        /// The customer.
        cid: String,
    },
    /// Set the balance an account must stay above (0: prepaid; -50: 50 of credit).
    CreditLimit {
        /// The customer.
        cid: String,
        /// The limit, a decimal (negative for credit).
        #[arg(allow_negative_numbers = true)]
        limit: String,
    },
    /// Show an account: balance, credit limit, denied.
    Show {
        /// The customer.
        cid: String,
    },
    /// Every debit and credit of an account.
    Statement {
        /// The customer.
        cid: String,
    },
    /// How many of a customer's uses in a month moved no money (priced at
    /// zero, of their own products, or of a test PID), per product: these
    /// make no statement line.
    FreeUses {
        /// The customer.
        cid: String,
        /// The month of the uses, YYYY-MM (UTC).
        #[arg(long, value_name = "YYYY-MM")]
        month: String,
    },
    /// Bring a PostgreSQL store's schema up to date and exit: the
    /// versioned migrations it lacks, in order, each once, under a lock (so
    /// that nodes starting at once do not race). Refuses a database made by
    /// a newer backoffice. Exit 0 when the schema is current, 69 when the
    /// database cannot be reached, 65 when its schema cannot be used.
    Migrate {
        /// The database: postgres://USER@HOST:PORT/DB (or key=value
        /// settings). Messages name its host, port and database, never a
        /// password.
        #[arg(
            long,
            env = "BACKOFFICE_STORE",
            hide_env_values = true,
            value_name = "URL"
        )]
        store: String,
    },
    /// Move a branch kept in a data folder (sled) into an empty PostgreSQL
    /// database: every record in one transaction, then every table, every
    /// transfer and every balance compared before it says so. The
    /// backoffice must be stopped. Once moved, the folder's store is
    /// renamed store.moved-to-postgres (kept, never used again unless
    /// renamed back) and the folder remembers the database, so that
    /// `serve --data-dir DIR` alone refuses and `serve --store URL
    /// --data-dir DIR` serves the moved branch. Exit 0 when moved and
    /// equal, 65 when the folder's store has problems or the database is
    /// not empty, 69 when either cannot be opened.
    MigrateStore {
        /// The data folder of the branch to move.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// The empty database: postgres://USER@HOST:PORT/DB.
        #[arg(
            long,
            env = "BACKOFFICE_STORE",
            hide_env_values = true,
            value_name = "URL"
        )]
        to: String,
    },
    /// Check the books: the ledger's invariants, every balance against its
    /// postings, every record and index of the store. Prints what it
    /// checked with counts and every problem found; exits 1 if any.
    Verify {
        /// Check the store of a stopped backoffice in DIR (its data
        /// folder) instead of asking the running one (`ledger.verify`).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Copy the embedded store (sled) into DEST, a new folder, while the
    /// backoffice runs: the copy is the store at one instant (writes wait
    /// while the records are copied; reads and pages go on), verified
    /// before it is named DEST. A kill meanwhile leaves no DEST, only
    /// DEST.partial, removed by the next backup. Prints progress on stderr.
    /// A branch kept in PostgreSQL is backed up with PostgreSQL's tools.
    Backup {
        /// The backup folder to make (it must not exist). Without
        /// --data-dir the running backoffice writes it, so it is a path on
        /// its machine.
        dest: PathBuf,
        /// Back up the store of a stopped backoffice in DIR (its data
        /// folder) instead of asking the running one.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Bring a backup back as the store of a data folder that has none
    /// (move the old store folder aside first; the backoffice must be
    /// stopped). The backup is copied, then opened and verified, before it
    /// becomes the store; the backup itself is never changed.
    Restore {
        /// A folder made by `backoffice backup`.
        backup: PathBuf,
        /// The data folder to restore into [default: as `serve`'s].
        #[arg(long, env = "BACKOFFICE_DATA_DIR", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Restore a backup whose records do not verify as it is (it
        /// copied a store that had the same problems).
        #[arg(long)]
        unverified: bool,
    },
    /// List the readings in suspense.
    Suspense,
    /// Price the readings in suspense again; what prices now is posted.
    Reprice,
    /// Price the kept readings of a batch, of the batch behind a transfer,
    /// or of every batch behind a customer's month again, with the stored
    /// TACA modules, and confirm every amount. Exit 0 when every amount is
    /// as posted, 1 naming the first that differs, 2 when there is nothing
    /// to audit. Calls the running backoffice; with --data-dir, audits a
    /// data folder no backoffice is using.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["batch", "transfer", "customer"])))]
    Audit {
        /// A batch id (with --meter).
        #[arg(long, requires = "meter", value_name = "ID")]
        batch: Option<String>,
        /// The meter that sent the batch.
        #[arg(long, value_name = "MID")]
        meter: Option<String>,
        /// A transfer number (a statement line).
        #[arg(long, value_name = "N")]
        transfer: Option<u64>,
        /// A customer (with --month).
        #[arg(long, requires = "month", value_name = "CID")]
        customer: Option<String>,
        /// The month, YYYY-MM (UTC).
        #[arg(long, value_name = "YYYY-MM")]
        month: Option<String>,
        /// Audit this data folder offline (no backoffice may be using it).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
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
Without samples, the samples an upload is tried on: code=),uses=0
code=),uses=10 code=),uses=100 code=( code=),pid=B1-P1T. The module is
checked as an upload is, in a process of its own within the same bounds.

Example: backoffice taca check tiered.wasm code=\\),uses=0 code=\\),uses=50 unit=MB,volume=1500")]
    Check {
        /// The module, as built with `cargo build --release --target wasm32-unknown-unknown`.
        module: PathBuf,
        /// Sample inputs.
        samples: Vec<String>,
        /// The maximum price per use the product will declare: a sample
        /// priced above it is flagged (such uses would go to suspense).
        #[arg(long, value_name = "AMOUNT")]
        max_price: Option<proto::Amount>,
    },
}

fn check(module: &PathBuf, samples: Vec<String>, max_price: Option<proto::Amount>) -> ExitCode {
    use backoffice::pricing::guard::{Guard, GuardError, Outcome};
    let bytes = match std::fs::read(module) {
        Ok(bytes) => bytes,
        Err(error) => {
            eprintln!("backoffice: cannot read {}: {error}", module.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let upload_samples = samples.is_empty();
    let samples = if upload_samples {
        backoffice::pricing::UPLOAD_SAMPLES
            .map(str::to_owned)
            .to_vec()
    } else {
        samples
    };
    // A bad sample is the caller's error: said before the module is read.
    for (index, text) in samples.iter().enumerate() {
        if let Err(message) = PriceInput::parse_sample(text) {
            eprintln!("backoffice: sample {} ({text:?}): {message}", index + 1);
            return ExitCode::from(EXIT_USAGE);
        }
    }
    println!(
        "module: {} ({} bytes, sha256 {})",
        module.display(),
        bytes.len(),
        TacaHash::of(&bytes)
    );
    if upload_samples {
        println!("samples: the {} an upload is tried on", samples.len());
    } else {
        println!(
            "samples: yours; an upload is tried on these {} instead: {}",
            backoffice::pricing::UPLOAD_SAMPLES.len(),
            backoffice::pricing::UPLOAD_SAMPLES.join(" ")
        );
    }
    // Checked as an upload is: in a process of its own, within the same
    // bounds (`pricing::guard`).
    let report = match Guard::current().and_then(|guard| guard.check_blocking(&bytes, &samples)) {
        Ok(report) => report,
        Err(GuardError::Refused(message)) => {
            println!("refused: {message}");
            return ExitCode::FAILURE;
        }
        Err(GuardError::BadSample(message)) => {
            eprintln!("backoffice: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(error) => {
            eprintln!("backoffice: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("{:<44} {:>22} {:>10}", "sample", "price", "fuel");
    let mut above_max = 0;
    for (sample, outcome) in samples.iter().zip(report.outcomes) {
        match outcome {
            Outcome::Priced { amount, fuel } => {
                let warning = match max_price {
                    Some(max) if amount > max => {
                        above_max += 1;
                        format!("  WARNING: above the maximum of {max} per use")
                    }
                    _ => String::new(),
                };
                println!(
                    "{sample:<44} {:>22} {fuel:>10}{warning}",
                    amount.to_string()
                )
            }
            Outcome::Refused { code } => println!(
                "{sample:<44} {:>22} {:>10}",
                format!("refused ({code})"),
                "-"
            ),
        }
    }
    println!(
        "fuel: all a price used (instantiation included), at most {} (docs/taca-abi.md)",
        backoffice::pricing::FUEL_PER_CALL
    );
    match &report.fresh_because {
        None => println!("instances: reused, reset after each price"),
        Some(reason) => {
            println!("instances: a fresh one per price, about ten times slower ({reason})")
        }
    }
    println!("check: {} ms of CPU", report.cpu_ms);
    if above_max > 0 {
        println!(
            "warning: {above_max} sample(s) priced above the maximum per use; such uses go to suspense, not to the ledger"
        );
    }
    println!("accepted: the module would be accepted for upload");
    ExitCode::SUCCESS
}

/// Exit code of an audit that found an amount that differs.
const EXIT_DIFFERS: u8 = 1;
/// Exit code of an audit with nothing to audit (or a refused call).
const EXIT_NOTHING: u8 = 2;

struct AuditArgs<'a> {
    batch: Option<&'a str>,
    meter: Option<&'a str>,
    transfer: Option<u64>,
    customer: Option<&'a str>,
    month: Option<&'a str>,
}

fn audit(cli: &Cli, args: &AuditArgs<'_>, data_dir: Option<&PathBuf>) -> ExitCode {
    use backoffice::audit::{AuditError, Scope};
    use proto::xmlrpc::Value;
    let month = match args.month.map(backoffice::server::parse_month) {
        Some(None) => {
            eprintln!("backoffice: --month is YYYY-MM");
            return ExitCode::from(EXIT_USAGE);
        }
        month => month.flatten(),
    };
    let Some(data_dir) = data_dir else {
        let (method, params) = match (args.batch, args.meter, args.transfer, args.customer) {
            (Some(batch), Some(meter), _, _) => (
                "audit.batch",
                vec![Value::string(meter), Value::string(batch)],
            ),
            (_, _, Some(transfer), _) => {
                ("audit.transfer", vec![Value::string(transfer.to_string())])
            }
            (_, _, _, Some(cid)) => (
                "audit.month",
                vec![
                    Value::string(cid),
                    Value::string(args.month.unwrap_or_default()),
                ],
            ),
            _ => return ExitCode::from(EXIT_USAGE),
        };
        return match call_operator(cli, method, &params) {
            Ok(report) => {
                let text = |name: &str| match report.member(name) {
                    Some(Value::String(text)) => text.clone(),
                    _ => String::new(),
                };
                println!("{}", text("summary"));
                if matches!(report.member("confirmed"), Some(Value::Bool(true))) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_DIFFERS)
                }
            }
            Err(code) => code,
        };
    };
    let parsed = (|| -> Result<Scope, String> {
        Ok(
            match (args.batch, args.meter, args.transfer, args.customer) {
                (Some(batch), Some(meter), _, _) => Scope::Batch(backoffice::store::BatchKey {
                    mid: meter
                        .parse()
                        .map_err(|error: proto::IdError| error.to_string())?,
                    id: batch
                        .parse()
                        .map_err(|error: proto::IdError| error.to_string())?,
                }),
                (_, _, Some(transfer), _) => {
                    Scope::Transfer(backoffice::ledger::TransferId(transfer))
                }
                (_, _, _, Some(cid)) => Scope::Month {
                    cid: cid
                        .parse()
                        .map_err(|error: proto::IdError| error.to_string())?,
                    month: month.ok_or("--customer needs --month")?,
                },
                _ => return Err("say what to audit".into()),
            },
        )
    })();
    let scope = match parsed {
        Ok(scope) => scope,
        Err(message) => {
            eprintln!("backoffice: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(message) = kept_in_folder(data_dir) {
        eprintln!("backoffice: {message}");
        return ExitCode::from(69);
    }
    let store = match backoffice::store::SledStore::open(&data_dir.join("store")) {
        Ok(store) => store,
        Err(error) => {
            eprintln!("backoffice: cannot open {}: {error}", data_dir.display());
            return ExitCode::from(69);
        }
    };
    use backoffice::store::Store as _;
    let ledger = match store.load_ledger() {
        Ok(ledger) => ledger,
        Err(error) => {
            eprintln!("backoffice: cannot read the ledger: {error}");
            return ExitCode::from(69);
        }
    };
    match backoffice::audit::audit(&store, &ledger, &Pricing::new(), &scope) {
        Ok(report) => {
            println!("{}", report.summary());
            if report.difference.is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DIFFERS)
            }
        }
        Err(AuditError::NotFound(why)) => {
            eprintln!("backoffice: {why}");
            ExitCode::from(EXIT_NOTHING)
        }
        Err(AuditError::Store(error)) => {
            eprintln!("backoffice: {error}");
            ExitCode::from(69)
        }
    }
}

/// `BACKOFFICE_DATA_DIR` if set (which `serve --data-dir` also reads, so
/// the operator's commands find the token of a backoffice started with
/// it), else the user's state folder.
fn default_data_dir() -> PathBuf {
    let env = |key: &str| std::env::var(key).ok().filter(|value| !value.is_empty());
    if let Some(dir) = env("BACKOFFICE_DATA_DIR") {
        return PathBuf::from(dir);
    }
    match (env("XDG_STATE_HOME"), env("HOME")) {
        (Some(state), _) => PathBuf::from(state).join("backoffice"),
        (None, Some(home)) => PathBuf::from(home).join(".local/state/backoffice"),
        (None, None) => PathBuf::from("backoffice-data"),
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

/// The web pages' settings.
#[derive(Debug, Clone, clap::Args)]
struct WebArgs {
    /// The branch's telephone number, shown on refusal pages and in mail.
    #[arg(long, env = "BACKOFFICE_PHONE", default_value = "+1 555 0100")]
    phone: String,
    /// The address customers reach the pages at, for links in mail
    /// [default: http://LISTEN].
    #[arg(long, env = "BACKOFFICE_PUBLIC_URL", value_name = "URL")]
    public_url: Option<String>,
    /// PBKDF2 iterations for new passwords. Below 600000 only for tests.
    #[arg(long, env = "BACKOFFICE_PASSWORD_ITERATIONS", default_value_t = backoffice::web::password::ITERATIONS_MIN)]
    password_iterations: u32,
    /// Mark session cookies Secure (when a TLS proxy serves the pages).
    #[arg(long, env = "BACKOFFICE_SECURE_COOKIES")]
    secure_cookies: bool,
    /// How long the code `meterd grant` prints may be entered on /grant,
    /// in seconds (1 to 3600).
    #[arg(long, env = "BACKOFFICE_GRANT_CODE_VALID_S", default_value_t = backoffice::grants::CODE_VALID_MS / 1000)]
    grant_code_valid_s: u64,
    /// Also serve /RPC2 and the pages over TLS on this address (meters and
    /// customers on the internet); `--listen` stays plain http, for the
    /// operator's commands on this machine. Needs --tls-cert and --tls-key.
    #[arg(long, env = "BACKOFFICE_TLS_LISTEN", value_name = "ADDR", requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Option<std::net::SocketAddr>,
    /// The TLS certificate chain, PEM (the server's first).
    #[arg(
        long,
        env = "BACKOFFICE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_listen"
    )]
    tls_cert: Option<PathBuf>,
    /// The TLS private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "BACKOFFICE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_listen"
    )]
    tls_key: Option<PathBuf>,
    /// Seconds a connection has to send a request's head, once it is new
    /// or idle between requests; then it is closed.
    #[arg(long, env = "BACKOFFICE_HEADER_TIMEOUT_S", value_name = "S",
        default_value_t = backoffice::listen::HEADER_READ_TIMEOUT_MS / 1000,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout_s: u64,
    /// Seconds an /RPC2 call has to send its body once its head is in.
    #[arg(long, env = "BACKOFFICE_BODY_TIMEOUT_S", value_name = "S",
        default_value_t = backoffice::server::BODY_READ_TIMEOUT_MS / 1000,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    body_timeout_s: u64,
    /// Seconds a web page's whole request (body and answer) may take.
    #[arg(long, env = "BACKOFFICE_PAGE_TIMEOUT_S", value_name = "S",
        default_value_t = backoffice::listen::REQUEST_TIMEOUT_MS / 1000,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    page_timeout_s: u64,
    /// Connections at once from one address (one /64 for IPv6); behind a
    /// reverse proxy every connection comes from its address: raise this
    /// and limit per client in the proxy.
    #[arg(long, env = "BACKOFFICE_CONNECTIONS_PER_ADDRESS", value_name = "N",
        default_value_t = backoffice::listen::CONNECTIONS_PER_ADDRESS_MAX,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    connections_per_address: usize,
    /// Meter calls (uploads, grant calls) read at once from one address;
    /// behind a reverse proxy raise this to 8 (all of them).
    #[arg(long, env = "BACKOFFICE_METER_CALLS_PER_ADDRESS", value_name = "N",
        default_value_t = backoffice::listen::METER_CALLS_PER_ADDRESS_MAX,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=8))]
    meter_calls_per_address: usize,
    #[command(flatten)]
    shown: backoffice::web::shown::ShownArgs,
    /// Send mail (reset links, notices) through this SMTP relay; without
    /// it mail stays in the data folder's outbox/ (one file per message).
    /// With it the outbox is a queue: each message is sent, then deleted.
    #[arg(
        long,
        env = "BACKOFFICE_SMTP_HOST",
        value_name = "HOST",
        requires = "mail_from"
    )]
    smtp_host: Option<String>,
    /// The relay's port [default: 465 for tls, 587 for starttls, 25 for plain].
    #[arg(
        long,
        env = "BACKOFFICE_SMTP_PORT",
        value_name = "PORT",
        requires = "smtp_host"
    )]
    smtp_port: Option<u16>,
    /// How the connection to the relay is protected; plain only to a relay
    /// on this machine.
    #[arg(
        long,
        env = "BACKOFFICE_SMTP_SECURITY",
        value_enum,
        default_value = "starttls"
    )]
    smtp_security: backoffice::web::mail::Security,
    /// The user name at the relay (its password in BACKOFFICE_SMTP_PASSWORD).
    #[arg(
        long,
        env = "BACKOFFICE_SMTP_USER",
        value_name = "USER",
        requires = "smtp_host"
    )]
    smtp_user: Option<String>,
    /// The sender of the branch's mail: 'Branch <noreply@example.org>'.
    #[arg(long, env = "BACKOFFICE_MAIL_FROM", value_name = "ADDRESS")]
    mail_from: Option<String>,
    /// Offer customers a top-up form on their account page. Its deposits go
    /// through the branch's processor; the built-in one records them as if
    /// the operator had received the money (it collects nothing), so turn
    /// this on only for a branch whose customers are trusted with that (a
    /// test branch, a company's own), until a card processor is plugged in.
    #[arg(long, env = "BACKOFFICE_WEB_TOP_UP")]
    web_top_up: bool,
}

/// Deletes itemised readings older than `retention_days` now and every
/// `PRUNE_INTERVAL`, while the service lives.
fn prune_itemised(service: std::sync::Weak<backoffice::server::Service>, retention_days: u64) {
    let retention_ms = retention_days.saturating_mul(24 * 3600 * 1000);
    let spawned = std::thread::Builder::new()
        .name("itemised-pruning".into())
        .spawn(move || {
            while let Some(service) = service.upgrade() {
                let store = service.backoffice.store();
                match backoffice::itemised::prune(
                    store,
                    retention_ms,
                    backoffice::now_ms(),
                    std::time::Duration::from_millis(10),
                ) {
                    Ok(0) => {}
                    Ok(deleted) => {
                        tracing::info!(deleted, retention_days, "itemised readings pruned")
                    }
                    Err(error) => tracing::error!(%error, "pruning itemised readings failed"),
                }
                drop(service);
                std::thread::sleep(backoffice::itemised::PRUNE_INTERVAL);
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start pruning itemised readings");
    }
}

fn serve(
    data_dir: Option<PathBuf>,
    store: Option<&str>,
    listen: std::net::SocketAddr,
    bid: proto::Bid,
    web: &WebArgs,
    itemised_retention_days: u64,
    reservation_ttl_s: u64,
) -> ExitCode {
    let Some(iterations) = std::num::NonZeroU32::new(web.password_iterations) else {
        eprintln!("backoffice: --password-iterations must be at least 1");
        return ExitCode::from(EXIT_USAGE);
    };
    if iterations.get() < backoffice::web::password::ITERATIONS_MIN {
        eprintln!(
            "backoffice: WARNING: {iterations} password iterations is below {}; for tests only",
            backoffice::web::password::ITERATIONS_MIN
        );
    }
    backoffice::init_logs();
    let smtp = match &web.smtp_host {
        Some(host) => {
            let password = std::env::var("BACKOFFICE_SMTP_PASSWORD").unwrap_or_default();
            let settings = backoffice::web::mail::SmtpSettings {
                host: host.clone(),
                port: web.smtp_port,
                security: web.smtp_security,
                credentials: web.smtp_user.clone().map(|user| (user, password)),
                from: web.mail_from.clone().unwrap_or_default(),
            };
            match backoffice::web::mail::Smtp::new(&settings) {
                Ok(smtp) => Some(smtp),
                Err(message) => {
                    eprintln!("backoffice: SMTP: {message}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        None => None,
    };
    let tls = match (&web.tls_cert, &web.tls_key) {
        (Some(certificate), Some(key)) => {
            match backoffice::listen::tls_acceptor(certificate, key) {
                Ok(acceptor) => Some(acceptor),
                Err(message) => {
                    eprintln!("backoffice: TLS: {message}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        _ => None,
    };
    let limits = backoffice::listen::ConnectionLimits {
        header_read: std::time::Duration::from_secs(web.header_timeout_s),
        body_read: std::time::Duration::from_secs(web.body_timeout_s),
        request: std::time::Duration::from_secs(web.page_timeout_s),
        per_address: web.connections_per_address,
        meter_calls_per_address: web.meter_calls_per_address,
        ..backoffice::listen::ConnectionLimits::default()
    };
    let dir = data_dir.unwrap_or_else(default_data_dir);
    let opened = durable::private_dir(&dir)
        .map_err(|error| error.to_string())
        .and_then(|()| backoffice::server::operator_token(&dir).map_err(|error| error.to_string()))
        .and_then(|token| {
            let store = backoffice::store::AnyStore::open(store, &dir)
                .map_err(|error| error.to_string())?;
            let params = backoffice::send::DEFAULT_PARAMS;
            let backoffice = backoffice::send::Backoffice::open(store, params)
                .map_err(|error| error.to_string())?;
            if !backoffice
                .device_codes()
                .set_valid_ms(web.grant_code_valid_s.saturating_mul(1000))
            {
                return Err("--grant-code-valid-s must be 1 to 3600".to_owned());
            }
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
        let _ = writeln!(stdout, "web pages at http://{address}/");
        let tls_listener = match (web.tls_listen, tls) {
            (Some(tls_listen), Some(tls)) => {
                let tls_listener = tokio::net::TcpListener::bind(tls_listen).await?;
                let tls_address = tls_listener.local_addr()?;
                let _ = writeln!(
                    stdout,
                    "TLS on https://{tls_address}/RPC2 and https://{tls_address}/"
                );
                Some((tls_listener, tls_address, tls))
            }
            _ => None,
        };
        let _ = writeln!(stdout, "operator token in {}", token_path.display());
        let _ = writeln!(stdout, "store: {}", backoffice.store().describe());
        let public_url = match (&web.public_url, &tls_listener) {
            (Some(url), _) => url.clone(),
            (None, Some((_, tls_address, _))) => format!("https://{tls_address}"),
            (None, None) => format!("http://{address}"),
        };
        let currency = web.shown.currency.clone();
        let sessions = backoffice.store().web_sessions();
        let web = backoffice::web::Web::with_sessions(
            backoffice::web::WebConfig {
                phone: web.phone.clone(),
                password_iterations: iterations,
                // Pages served over TLS get cookies that never travel in clear.
                secure_cookies: web.secure_cookies || tls_listener.is_some(),
                public_url,
                outbox: dir.join("outbox"),
                shown: web.shown.shown(),
                top_up: web.web_top_up,
            },
            sessions,
        );
        let service = std::sync::Arc::new(backoffice::server::Service {
            backoffice,
            bid,
            operator_token,
            web,
            funding: Box::new(backoffice::funding::RecordedByOperator),
            payments: backoffice::parlayx::Payments::new(currency.code())
                .with_reservation_ttl_ms(reservation_ttl_s * 1000),
        });
        prune_itemised(std::sync::Arc::downgrade(&service), itemised_retention_days);
        if let Some(smtp) = smtp {
            backoffice::web::mail::spawn_delivery(dir.join("outbox"), smtp)?;
        }
        backoffice::server::sweep_expired_holds(std::sync::Arc::downgrade(&service));
        let mut listeners = vec![backoffice::listen::Listener {
            socket: listener,
            tls: None,
        }];
        if let Some((socket, _, tls)) = tls_listener {
            listeners.push(backoffice::listen::Listener {
                socket,
                tls: Some(tls),
            });
        }
        let stopping = std::sync::Arc::clone(&service);
        let served =
            backoffice::server::run_with(listeners, service, limits, shutdown_signal()).await;
        // A clean stop folds the period counts written behind and makes
        // everything durable (Store::close).
        if let Err(error) = backoffice::store::Store::close(stopping.backoffice.store()) {
            tracing::error!(%error, "the store could not be closed cleanly; it is replayed at the next start");
        }
        served
    });
    // `run` gave requests in flight the whole grace already; what is left
    // (a connection that never finished its request) is abandoned.
    runtime.shutdown_timeout(std::time::Duration::from_millis(250));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("backoffice: {error}");
            ExitCode::from(69)
        }
    }
}

/// Calls `method` (`meter.create`: registers a meter; `meter.rotate`:
/// gives one a new secret) and writes the secret it answers to `file`
/// (new, 0600), printing only the MID: the secret is never shown.
fn secret_to_file(
    cli: &Cli,
    method: &str,
    params: &[proto::xmlrpc::Value],
    file: &std::path::Path,
) -> ExitCode {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Made before the call, so that a file that cannot be written leaves
    // no meter (or new secret) whose secret nobody has.
    let mut out = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
    {
        Ok(out) => out,
        Err(error) => {
            eprintln!(
                "backoffice: cannot make the secret file {}: {error}",
                file.display()
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let made = call_operator(cli, method, params);
    let value = match made {
        Ok(value) => value,
        Err(code) => {
            drop(out);
            let _ = std::fs::remove_file(file);
            return code;
        }
    };
    let (Some(mid), Some(secret)) = (
        value.member("MID").and_then(proto::xmlrpc::Value::as_str),
        value
            .member("secret")
            .and_then(proto::xmlrpc::Value::as_str),
    ) else {
        eprintln!("backoffice: the answer to {method} has no MID and secret");
        return ExitCode::from(EXIT_UNAVAILABLE);
    };
    if let Err(error) = out
        .write_all(secret.as_bytes())
        .and_then(|()| out.sync_all())
    {
        // The meter has this secret now: it must not be lost.
        eprintln!(
            "backoffice: meter {mid} has a new secret but it could not be written to {} \
             ({error}); here it is: {secret}",
            file.display()
        );
        return ExitCode::from(EXIT_UNAVAILABLE);
    }
    println!("MID={mid} secret-file={}", file.display());
    ExitCode::SUCCESS
}

fn print_value(value: &proto::xmlrpc::Value) {
    use proto::xmlrpc::Value;
    match value {
        Value::Struct(members) => {
            let line: Vec<String> = members
                .iter()
                .map(|member| match &member.value {
                    Value::String(text) => format!("{}={text}", member.name),
                    Value::Bool(truth) => format!("{}={truth}", member.name),
                    other => format!("{}={other:?}", member.name),
                })
                .collect();
            println!("{}", line.join(" "));
        }
        Value::Array(items) => items.iter().for_each(print_value),
        other => println!("{other:?}"),
    }
}

/// An operator call that answers in pages: asks for pages until one comes
/// back short, printing each. A statement's next page starts at the
/// transfer after the last one; suspense's after the last record's cursor.
fn operator_pages(cli: &Cli, method: &str, params: &[proto::xmlrpc::Value]) -> ExitCode {
    use proto::xmlrpc::Value;
    let page_max = backoffice::server::PAGE_MAX;
    let mut from = String::new();
    loop {
        let mut page_params = params.to_vec();
        page_params.push(Value::string(from.as_str()));
        page_params.push(Value::string(page_max.to_string()));
        let value = match call_operator(cli, method, &page_params) {
            Ok(value) => value,
            Err(code) => return code,
        };
        print_value(&value);
        let lines = match &value {
            Value::Array(lines) => lines.as_slice(),
            _ => &[],
        };
        if lines.len() < page_max {
            return ExitCode::SUCCESS;
        }
        let last = lines.last();
        from = match (
            last.and_then(|line| line.member("transfer")),
            last.and_then(|line| line.member("cursor")),
        ) {
            (Some(Value::String(id)), _) => id
                .parse::<u64>()
                .map_or(u64::MAX, |id| id.saturating_add(1))
                .to_string(),
            (_, Some(Value::String(cursor))) => cursor.clone(),
            _ => return ExitCode::SUCCESS,
        };
    }
}

fn operator(cli: &Cli, method: &str, params: Vec<proto::xmlrpc::Value>) -> ExitCode {
    match call_operator(cli, method, &params) {
        Ok(value) => {
            print_value(&value);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Calls the running backoffice with the operator token; an error is
/// printed and becomes the exit status.
fn call_operator(
    cli: &Cli,
    method: &str,
    params: &[proto::xmlrpc::Value],
) -> Result<proto::xmlrpc::Value, ExitCode> {
    let token_file = cli
        .token_file
        .clone()
        .unwrap_or_else(|| default_data_dir().join("operator-token"));
    let token = match std::fs::read_to_string(&token_file) {
        Ok(token) => token.trim().to_owned(),
        Err(error) => {
            eprintln!(
                "backoffice: cannot read the operator token {}: {error}",
                token_file.display()
            );
            return Err(ExitCode::from(EXIT_USAGE));
        }
    };
    backoffice::operator::call(&cli.url, &token, method, params).map_err(|error| {
        eprintln!("backoffice: {error}");
        match error {
            backoffice::operator::OperatorError::Refused(_) => ExitCode::from(2),
            _ => ExitCode::from(69),
        }
    })
}

/// One line of standard input, without its line ending: a password is
/// never an argument, where `ps` and shell histories would show it.
fn read_password() -> Result<String, ExitCode> {
    let mut line = String::new();
    match std::io::stdin().read_line(&mut line) {
        Ok(0) => {
            eprintln!("backoffice: --password-stdin: standard input is empty");
            Err(ExitCode::from(EXIT_USAGE))
        }
        Ok(_) => Ok(line.trim_end_matches(['\n', '\r']).to_owned()),
        Err(error) => {
            eprintln!("backoffice: --password-stdin: {error}");
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

/// `verify`: offline on a stopped branch's data folder, else through the
/// running branch's `ledger.verify`.
/// Whether `dir` holds a branch kept in the folder itself (sled), for the
/// commands that read one offline: never an empty store made on the spot.
fn kept_in_folder(dir: &std::path::Path) -> Result<(), String> {
    if dir.join("store").is_dir() {
        return Ok(());
    }
    let marker = dir.join(backoffice::store::STORE_MARKER);
    Err(match std::fs::read_to_string(&marker) {
        Ok(text) => format!(
            "the branch of {} is kept in PostgreSQL ({}): check it through the running \
             backoffice (leave out --data-dir)",
            dir.display(),
            text.trim()
        ),
        Err(_) => format!("{} holds no branch (no store folder in it)", dir.display()),
    })
}

/// One progress line of a backup on stderr.
fn backup_progress(records: u64, bytes: u64) {
    eprintln!(
        "backoffice: backup: {records} records, {:.1} MiB copied",
        bytes as f64 / 1_048_576.0
    );
}

/// The last line of a backup or a restore, and its exit: 1 when the copy
/// holds problems (of the store it copied).
fn copied_line(
    done: &str,
    at: &std::path::Path,
    copied: &backoffice::store::backup::Copied,
) -> ExitCode {
    println!(
        "{done} {}: {} records ({} transfers), {} bytes",
        at.display(),
        copied.records,
        copied.transfers,
        copied.bytes
    );
    if copied.problems == 0 {
        println!("verified: no problems");
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "backoffice: the copy is faithful, but what it copied has {} problem(s) (see \
             `backoffice verify`); the first: {}",
            copied.problems,
            copied.first_problem.as_deref().unwrap_or("")
        );
        ExitCode::from(1)
    }
}

fn backup(cli: &Cli, dest: &std::path::Path, data_dir: Option<&std::path::Path>) -> ExitCode {
    use backoffice::store::backup::Copied;
    use proto::xmlrpc::Value;
    let started = std::time::Instant::now();
    if let Some(dir) = data_dir {
        if let Err(message) = kept_in_folder(dir) {
            eprintln!("backoffice: {message}");
            return ExitCode::from(69);
        }
        let store = match backoffice::store::SledStore::open(&dir.join("store")) {
            Ok(store) => store,
            Err(error) => {
                eprintln!(
                    "backoffice: cannot open the store in {}: {error} (on a running backoffice, \
                     leave out --data-dir)",
                    dir.display()
                );
                return ExitCode::from(69);
            }
        };
        let mut shown = std::time::Instant::now();
        return match store.backup(dest, &mut |records, bytes| {
            if shown.elapsed() >= std::time::Duration::from_secs(2) {
                backup_progress(records, bytes);
                shown = std::time::Instant::now();
            }
        }) {
            Ok(copied) => {
                eprintln!(
                    "backoffice: backup took {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                copied_line("backed up into", dest, &copied)
            }
            Err(error) => {
                eprintln!("backoffice: the backup failed: {error}");
                ExitCode::from(69)
            }
        };
    }
    // The running backoffice writes it: a path it reads the same way.
    let dest = match std::path::absolute(dest) {
        Ok(dest) => dest,
        Err(error) => {
            eprintln!("backoffice: {}: {error}", dest.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut status = match call_operator(
        cli,
        "store.backup",
        &[Value::string(dest.display().to_string())],
    ) {
        Ok(value) => value,
        Err(code) => return code,
    };
    let mut shown = std::time::Instant::now();
    loop {
        let text = |name: &str| match status.member(name) {
            Some(Value::String(text)) => text.clone(),
            _ => String::new(),
        };
        let number = |name: &str| text(name).parse::<u64>().unwrap_or(0);
        // The status of the last backup started: another caller's, if one
        // started since.
        if text("dest") != dest.display().to_string() {
            eprintln!(
                "backoffice: another backup (into {}) was started meanwhile; see its status \
                 with store.backupStatus",
                text("dest")
            );
            return ExitCode::from(69);
        }
        match text("state").as_str() {
            "running" => {
                if shown.elapsed() >= std::time::Duration::from_secs(2) {
                    backup_progress(number("records"), number("bytes"));
                    shown = std::time::Instant::now();
                }
            }
            "done" => {
                let copied = Copied {
                    records: number("records"),
                    bytes: number("bytes"),
                    transfers: number("transfers"),
                    problems: number("problems"),
                    first_problem: Some(text("firstProblem")).filter(|text| !text.is_empty()),
                };
                eprintln!(
                    "backoffice: backup took {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return copied_line("backed up into", &dest, &copied);
            }
            _ => {
                eprintln!("backoffice: the backup failed: {}", text("error"));
                return ExitCode::from(69);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        status = match call_operator(cli, "store.backupStatus", &[]) {
            Ok(value) => value,
            Err(code) => return code,
        };
    }
}

fn restore(backup: &std::path::Path, data_dir: &std::path::Path, unverified: bool) -> ExitCode {
    let marker = data_dir.join(backoffice::store::STORE_MARKER);
    if let Ok(text) = std::fs::read_to_string(&marker)
        && text.starts_with("postgres ")
    {
        eprintln!(
            "backoffice: the branch of {} is kept in PostgreSQL ({}): a backup of the \
             embedded store is restored into a data folder of its own",
            data_dir.display(),
            text.trim()
        );
        return ExitCode::from(69);
    }
    if let Err(error) = durable::private_dir(data_dir) {
        eprintln!("backoffice: cannot make {}: {error}", data_dir.display());
        return ExitCode::from(69);
    }
    let store = data_dir.join("store");
    match backoffice::store::backup::restore(backup, &store, unverified) {
        Ok(copied) => copied_line("restored into", &store, &copied),
        Err(error) => {
            eprintln!("backoffice: the restore failed: {error}");
            ExitCode::from(69)
        }
    }
}

fn migrate_store(dir: &std::path::Path, url: &str) -> ExitCode {
    use backoffice::store::{PgStore, SledStore, StoreError, moving};
    let failed = |error: StoreError| {
        if error.to_string().contains(moving::DIFFERS) {
            eprintln!("backoffice: {error}");
        } else {
            eprintln!("backoffice: nothing was moved: {error}");
        }
        match error {
            StoreError::Corrupt(_) | StoreError::WrongStore(_) | StoreError::Schema(_) => {
                ExitCode::from(65)
            }
            _ => ExitCode::from(69),
        }
    };
    if let Err(message) = kept_in_folder(dir) {
        eprintln!("backoffice: {message}");
        return ExitCode::from(69);
    }
    let from = match SledStore::open(&dir.join("store")) {
        Ok(store) => store,
        Err(error) => {
            eprintln!(
                "backoffice: cannot open the store in {}: {error} (stop the backoffice first)",
                dir.display()
            );
            return ExitCode::from(69);
        }
    };
    let to = match PgStore::connect(url) {
        Ok(store) => store,
        Err(error) => return failed(error),
    };
    let started = std::time::Instant::now();
    let mut shown = std::time::Instant::now();
    let mut rows = 0u64;
    let moved = moving::sled_to_postgres(&from, &to, &mut |table, count| {
        rows += count;
        if shown.elapsed() >= std::time::Duration::from_secs(2) {
            eprintln!("backoffice: migrate-store: {rows} rows written (now {table})");
            shown = std::time::Instant::now();
        }
    });
    let moved = match moved {
        Ok(moved) => moved,
        Err(error) => return failed(error),
    };
    for (table, count) in &moved.tables {
        println!("{table}: {count}");
    }
    println!(
        "moved the branch of {} into {} in {:.1} s; compared {} transfers and {} balances: equal",
        dir.display(),
        to.shown(),
        started.elapsed().as_secs_f64(),
        moved.transfers,
        moved.balances
    );
    // The folder's store is never served again by mistake beside the
    // database: set aside, and the folder names where its branch now is.
    drop(from);
    let store = dir.join("store");
    let aside = dir.join("store.moved-to-postgres");
    let marker = dir.join(backoffice::store::STORE_MARKER);
    // The marker first: from then on `serve` without --store refuses this
    // folder, whether or not the rename below happens.
    let retired = durable::write_private(&marker, format!("postgres {}\n", to.shown()).as_bytes())
        .and_then(|()| std::fs::rename(&store, &aside));
    match retired {
        Ok(()) => {
            println!(
                "{} is now {} (kept, not used); serve this branch with --store naming the \
                 database, --data-dir {}",
                store.display(),
                aside.display(),
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "backoffice: the branch was moved, but {} could not be set aside: {error}; \
                 do not serve it again",
                store.display()
            );
            ExitCode::from(69)
        }
    }
}

fn migrate(url: &str) -> ExitCode {
    use backoffice::store::{PgStore, StoreError, postgres::MIGRATIONS};
    let failed = |error: StoreError| {
        eprintln!("backoffice: {error}");
        match error {
            StoreError::Schema(_) => ExitCode::from(65),
            _ => ExitCode::from(69),
        }
    };
    let store = match PgStore::open(url) {
        Ok(store) => store,
        Err(error) => return failed(error),
    };
    match store.migrate(MIGRATIONS) {
        Ok(done) if done.applied.is_empty() => {
            println!(
                "the schema of {} is at version {}: nothing to apply",
                store.shown(),
                done.version
            );
            ExitCode::SUCCESS
        }
        Ok(done) => {
            for version in &done.applied {
                let name = MIGRATIONS
                    .iter()
                    .find(|step| step.version == *version)
                    .map_or("", |step| step.name);
                println!("applied migration {version} ({name})");
            }
            println!(
                "the schema of {} is at version {}",
                store.shown(),
                done.version
            );
            ExitCode::SUCCESS
        }
        Err(error) => failed(error),
    }
}

fn verify(cli: &Cli, data_dir: Option<&std::path::Path>) -> ExitCode {
    use proto::xmlrpc::Value;
    if let Some(dir) = data_dir
        && let Err(message) = kept_in_folder(dir)
    {
        eprintln!("backoffice: {message}");
        return ExitCode::from(69);
    }
    let (ok, checked, count, problems) = match data_dir {
        Some(dir) => match backoffice::verify::offline(&dir.join("store")) {
            Ok(report) => (
                report.is_ok(),
                report.summary(),
                report.problem_count,
                report.problems,
            ),
            Err(error) => {
                eprintln!(
                    "backoffice: cannot open the store in {}: {error} (on a running backoffice, leave out --data-dir)",
                    dir.display()
                );
                return ExitCode::from(69);
            }
        },
        None => {
            let value = match call_operator(cli, "ledger.verify", &[]) {
                Ok(value) => value,
                Err(code) => return code,
            };
            let text = |name: &str| match value.member(name) {
                Some(Value::String(text)) => text.clone(),
                _ => String::new(),
            };
            let problems = match value.member("problems") {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|item| match item {
                        Value::String(text) => Some(text.clone()),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            (
                matches!(value.member("ok"), Some(Value::Bool(true))),
                text("checked"),
                text("problemCount").parse().unwrap_or(u64::MAX),
                problems,
            )
        }
    };
    println!("checked: {checked}");
    for problem in &problems {
        println!("problem: {problem}");
    }
    if ok {
        println!("verified: no problems");
        ExitCode::SUCCESS
    } else {
        let first = problems.first().map_or("", String::as_str);
        eprintln!("backoffice: {count} problem(s) found; the first: {first}");
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    use proto::xmlrpc::Value;
    // A child process checking an uploaded module (`pricing::guard`).
    if let Some(code) = backoffice::pricing::guard::child_main() {
        return code;
    }
    let cli = Cli::parse();
    let text = |text: &str| Value::string(text);
    match &cli.command {
        Command::Serve {
            data_dir,
            store,
            listen,
            bid,
            web,
            itemised_retention_days,
            reservation_ttl_s,
        } => serve(
            data_dir.clone(),
            store.as_deref(),
            *listen,
            *bid,
            web,
            *itemised_retention_days,
            *reservation_ttl_s,
        ),
        Command::Customer {
            name,
            email,
            password_stdin,
        } => {
            let mut params = vec![text(name), text(email)];
            if *password_stdin {
                match read_password() {
                    Ok(password) => params.push(Value::string(password)),
                    Err(code) => return code,
                }
            }
            operator(&cli, "customer.create", params)
        }
        Command::Product {
            owner,
            name,
            terms,
            module,
            max_price,
        } => match std::fs::read(module) {
            Ok(bytes) => operator(
                &cli,
                "product.create",
                vec![
                    text(owner),
                    text(name),
                    text(terms),
                    Value::Base64(bytes),
                    text(max_price),
                ],
            ),
            Err(error) => {
                eprintln!("backoffice: cannot read {}: {error}", module.display());
                ExitCode::from(EXIT_USAGE)
            }
        },
        Command::Meter {
            action:
                Some(MeterCommand::Rotate {
                    mid,
                    secret_file,
                    grace_hours,
                }),
            ..
        } => {
            let params = vec![text(mid), text(&(grace_hours * 3600).to_string())];
            match secret_file {
                None => operator(&cli, "meter.rotate", params),
                Some(file) => secret_to_file(&cli, "meter.rotate", &params, file),
            }
        }
        Command::Meter {
            action: Some(MeterCommand::Revoke { mid }),
            ..
        } => operator(&cli, "meter.revoke", vec![text(mid)]),
        Command::Meter {
            owner: Some(owner),
            secret_file,
            service,
            action: None,
        } => {
            let mut params = vec![text(owner)];
            params.extend(service.iter().map(|pid| text(pid)));
            match secret_file {
                None => operator(&cli, "meter.create", params),
                Some(file) => secret_to_file(&cli, "meter.create", &params, file),
            }
        }
        Command::Meter { owner: None, .. } => {
            eprintln!("backoffice: meter needs OWNER, or rotate MID, or revoke MID");
            ExitCode::from(EXIT_USAGE)
        }
        Command::Deposit {
            cid,
            amount,
            reference,
        } => {
            let reference = match reference {
                Some(reference) => match backoffice::funding::Reference::parse(reference) {
                    Ok(reference) => reference,
                    Err(error) => {
                        eprintln!("backoffice: --reference: {error}");
                        return ExitCode::from(EXIT_USAGE);
                    }
                },
                None => {
                    let reference = backoffice::funding::Reference::random();
                    // Before the call: whatever becomes of it, the operator
                    // can retry under this reference.
                    eprintln!(
                        "backoffice: deposit reference {reference} (to retry: --reference {reference})"
                    );
                    reference
                }
            };
            operator(
                &cli,
                "account.deposit",
                vec![text(cid), text(amount), text(reference.as_str())],
            )
        }
        Command::Deny { cid } => operator(&cli, "account.deny", vec![text(cid), Value::Bool(true)]),
        Command::Allow { cid } => {
            operator(&cli, "account.deny", vec![text(cid), Value::Bool(false)])
        }
        Command::CreditLimit { cid, limit } => {
            operator(&cli, "account.creditLimit", vec![text(cid), text(limit)])
        }
        Command::Show { cid } => operator(&cli, "customer.show", vec![text(cid)]),
        Command::Statement { cid } => operator_pages(&cli, "account.statement", &[text(cid)]),
        Command::FreeUses { cid, month } => {
            operator(&cli, "account.freeUses", vec![text(cid), text(month)])
        }
        Command::Verify { data_dir } => verify(&cli, data_dir.as_deref()),
        Command::Migrate { store } => migrate(store),
        Command::MigrateStore { from, to } => migrate_store(from, to),
        Command::Backup { dest, data_dir } => backup(&cli, dest, data_dir.as_deref()),
        Command::Restore {
            backup,
            data_dir,
            unverified,
        } => restore(
            backup,
            &data_dir.clone().unwrap_or_else(default_data_dir),
            *unverified,
        ),
        Command::Suspense => operator_pages(&cli, "suspense.list", &[]),
        Command::Reprice => operator(&cli, "suspense.reprice", vec![]),
        Command::Grants { id } => operator(&cli, "grant.list", vec![text(id)]),
        Command::Components { pid, components } => operator(
            &cli,
            "product.components",
            std::iter::once(pid)
                .chain(components)
                .map(|id| text(id))
                .collect(),
        ),
        Command::Revoke { grant } => operator(&cli, "grant.revoke", vec![text(&grant.to_string())]),
        Command::Audit {
            batch,
            meter,
            transfer,
            customer,
            month,
            data_dir,
        } => audit(
            &cli,
            &AuditArgs {
                batch: batch.as_deref(),
                meter: meter.as_deref(),
                transfer: *transfer,
                customer: customer.as_deref(),
                month: month.as_deref(),
            },
            data_dir.as_ref(),
        ),
        Command::Taca {
            command:
                TacaCommand::Check {
                    module,
                    samples,
                    max_price,
                },
        } => check(module, samples.clone(), *max_price),
    }
}
