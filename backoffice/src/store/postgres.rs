//! The PostgreSQL store: a branch whose state lives in a database that
//! several backoffice nodes share, backed up and replicated the way
//! operators of payment systems already do it.
//!
//! Built in steps (issue 15). Here so far: connecting (a pool of
//! `tokio-postgres` connections on a runtime of the store's own, so that
//! the synchronous `Store` interface can be called from any thread,
//! async handlers included), and the versioned schema: `MIGRATIONS`,
//! applied in order at start or alone by `backoffice migrate`, each once,
//! under an advisory lock so that nodes starting together do not race,
//! each checked against the SHA-256 it was applied with. A database made by
//! a newer backoffice, or whose applied migration differs from this one's,
//! is refused with a message that says which.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use super::StoreError;

mod branch;
pub mod codes;
pub mod web;

/// One step of the schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number: applied in increasing order, each once.
    pub version: i64,
    /// What it is for, in a word or two.
    pub name: &'static str,
    /// The SQL, run in the migration's transaction.
    pub sql: &'static str,
}

impl Migration {
    /// The SHA-256 of its SQL, hex: what a database records it applied.
    pub fn sha256(&self) -> String {
        proto::record::hex(
            ring::digest::digest(&ring::digest::SHA256, self.sql.as_bytes()).as_ref(),
        )
    }
}

/// The schema's steps, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "branch",
        sql: include_str!("postgres/0001_branch.sql"),
    },
    Migration {
        version: 2,
        name: "web",
        sql: include_str!("postgres/0002_web.sql"),
    },
    Migration {
        version: 3,
        name: "grant codes",
        sql: include_str!("postgres/0003_grant_codes.sql"),
    },
    Migration {
        version: 4,
        name: "itemised lz4",
        sql: include_str!("postgres/0004_itemised_lz4.sql"),
    },
    Migration {
        version: 5,
        name: "fillfactor",
        sql: include_str!("postgres/0005_fillfactor.sql"),
    },
    Migration {
        version: 6,
        name: "ledger epoch",
        sql: include_str!("postgres/0006_ledger_epoch.sql"),
    },
    Migration {
        version: 7,
        name: "holds",
        sql: include_str!("postgres/0007_holds.sql"),
    },
    Migration {
        version: 8,
        name: "payments",
        sql: include_str!("postgres/0008_payments.sql"),
    },
    Migration {
        version: 9,
        name: "nonces",
        sql: include_str!("postgres/0009_nonces.sql"),
    },
    Migration {
        version: 10,
        name: "phones",
        sql: include_str!("postgres/0010_phones.sql"),
    },
    Migration {
        version: 11,
        name: "payment request forms",
        sql: include_str!("postgres/0011_payment_forms.sql"),
    },
];

/// Where the ledger epoch stands (migration 6): its count and the token
/// its last raise drew.
type Epoch = (i64, String);

const READ_EPOCH: &str = "SELECT n, token FROM ledger_epoch";

/// Most times a transaction aborted for a conflict is run again. Each
/// round of transactions meeting on one row lets one of them through, so
/// eight writers at once on one row (customers made from eight threads
/// under SERIALIZABLE) need up to seven rounds with nothing unlucky: eight
/// retries ran out once in CI, sixteen with the pause capped below leave a
/// margin and still give up within about 1.5 s.
pub const CONFLICT_RETRIES: u32 = 16;

/// Runs `work`, one transaction, and again from its start when the
/// database aborted it for a conflict, at most `CONFLICT_RETRIES` times.
async fn retrying<T, F>(shown: &str, mut work: impl FnMut() -> F) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        match work().await {
            Err(StoreError::Conflict(reason)) if attempt < CONFLICT_RETRIES => {
                attempt += 1;
                tracing::debug!(at = %shown, attempt, %reason, "a transaction met a conflict: run again");
                tokio::time::sleep(conflict_pause(attempt)).await;
            }
            other => return other,
        }
    }
}

/// The pause before attempt `attempt` (from 1) of a transaction that met a
/// conflict: 1, 2, 4 ... 64 ms, and up to as much again at random, so
/// that the transactions that met do not meet again.
fn conflict_pause(attempt: u32) -> std::time::Duration {
    use ring::rand::SecureRandom;
    let base = 1u64 << (attempt.clamp(1, 7) - 1);
    let mut byte = [0u8; 1];
    let extra = match ring::rand::SystemRandom::new().fill(&mut byte) {
        Ok(()) => base * u64::from(byte[0]) / 255,
        Err(_) => 0,
    };
    std::time::Duration::from_millis(base + extra)
}

/// The advisory lock migrations take (the bytes of "backoffi").
const MIGRATION_LOCK: i64 = 0x6261_636b_6f66_6669;
/// The branch's ledger lock (the bytes of "backledg"): a node holds it
/// while it numbers and writes transfers, period counts and batches, so
/// that nodes sharing the database take turns and each sees the last one's
/// writes (`hold_ledger`).
const LEDGER_LOCK: i64 = 0x6261_636b_6c65_6467;
/// Every money write holds this shared for its transaction; a node that
/// takes the ledger lock takes this one exclusively once, so it waits for
/// the writes in flight of a node whose hold ended under it (its session
/// dropped) before it reads anything.
const WRITERS_LOCK: i64 = 0x6261_636b_7772_6974;
/// How long a node waits for the ledger lock before the call is refused
/// (retryably): another node holds it for one batch at a time.
pub const LEDGER_LOCK_WAIT: Duration = Duration::from_secs(30);
/// How long connecting, and waiting for a free connection, may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest one statement may run (`statement_timeout`), unless the
/// connection string sets its own `options`; migrations and `migrate-store`
/// lift it for their own transaction.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections per node.
pub const POOL_SIZE: usize = 16;

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The versions applied now, in order.
    pub applied: Vec<i64>,
    /// The schema's version after.
    pub version: i64,
}

/// A branch in PostgreSQL.
pub struct PgStore {
    pool: deadpool_postgres::Pool,
    /// The connection that takes the ledger lock (`hold_ledger`), out of
    /// the pool, with its session (`Session`).
    ledger_lock: std::sync::Mutex<Option<(deadpool_postgres::ClientWrapper, Session)>>,
    /// That session while this node holds the ledger lock: every money
    /// write checks that it still does.
    holding: std::sync::Mutex<Option<Session>>,
    /// The ledger epoch (migration 6) this node's last money write left,
    /// committed under its hold; `None` while a write is under way or
    /// after one failed (its outcome may be unknown).
    epoch_seen: std::sync::Mutex<Option<Epoch>>,
    /// How long a hold waits for another node's (`LEDGER_LOCK_WAIT`).
    ledger_lock_wait: Duration,
    runtime: Option<tokio::runtime::Runtime>,
    /// Where it is, without any password: for messages.
    shown: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("at", &self.shown).finish()
    }
}

/// A database session: its server process and when that started (µs since
/// the Unix epoch). A process number alone may be reused after the
/// database restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Session {
    pid: i32,
    started_us: i64,
}

/// Runs `work` on the runtime of `handle` from any thread, inside an async
/// handler too (see `PgStore::block`).
fn block_on<T: Send>(handle: &tokio::runtime::Handle, work: impl Future<Output = T> + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return handle.block_on(work);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| handle.block_on(work))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn lock_std<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether connections are TLS: only where the connection string asks for
/// it, and then never falling back to plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    /// No `sslmode`, or `sslmode=disable`.
    Off,
    /// `sslmode=require`, `verify-ca` or `verify-full`: TLS, the server's
    /// certificate and name verified.
    Required,
}

/// What a connection string says about TLS beyond what `tokio-postgres`
/// reads: `sslrootcert=FILE` (the CA to trust, PEM; libpq's name) is taken
/// out, and `sslmode` is decided here (`TlsMode`), libpq's names accepted;
/// `prefer` and `allow`, which may fall back to plain text, are refused.
#[derive(Debug, PartialEq, Eq)]
struct TlsSettings {
    /// The string without `sslrootcert`, `sslmode` as `tokio-postgres`
    /// reads it.
    rest: String,
    root_file: Option<std::path::PathBuf>,
    mode: TlsMode,
}

impl TlsSettings {
    /// Reads `url`; an error never repeats a value (a password may be one).
    fn take_from(url: &str) -> Result<TlsSettings, String> {
        let mut root_file = None;
        let mut mode = TlsMode::Off;
        let mut negotiation = false;
        let mut setting = |key: &str, value: &str| -> Result<Option<String>, String> {
            match key {
                "sslrootcert" => {
                    root_file = Some(std::path::PathBuf::from(value));
                    Ok(None)
                }
                "sslmode" => {
                    mode = match value {
                        "disable" => TlsMode::Off,
                        "require" | "verify-ca" | "verify-full" => TlsMode::Required,
                        "prefer" | "allow" => {
                            return Err(format!(
                                "sslmode={value} may fall back to plain text: say sslmode=require \
                                 (TLS, the server's certificate verified) or sslmode=disable"
                            ));
                        }
                        _ => {
                            return Err(
                                "sslmode is one of disable, require, verify-ca or verify-full"
                                    .to_owned(),
                            );
                        }
                    };
                    Ok(Some(
                        if mode == TlsMode::Required {
                            "require"
                        } else {
                            "disable"
                        }
                        .to_owned(),
                    ))
                }
                "sslnegotiation" => {
                    negotiation = true;
                    Ok(Some(value.to_owned()))
                }
                _ => Ok(Some(value.to_owned())),
            }
        };
        let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let rest = if is_url {
            match url.split_once('?') {
                None => url.to_owned(),
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for pair in query.split('&') {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        let decoded = percent_decoded(value);
                        if let Some(value) = setting(key, &decoded)? {
                            // Only what this reading changed is written anew.
                            if key == "sslmode" {
                                kept.push(format!("{key}={value}"));
                            } else {
                                kept.push(pair.to_owned());
                            }
                        }
                    }
                    if kept.is_empty() {
                        base.to_owned()
                    } else {
                        format!("{base}?{}", kept.join("&"))
                    }
                }
            }
        } else {
            let mut kept = Vec::new();
            for (key, value) in key_values(url)? {
                if let Some(value) = setting(&key, &value)? {
                    kept.push(format!("{key}={}", quoted(&value)));
                }
            }
            kept.join(" ")
        };
        if negotiation && mode != TlsMode::Required {
            return Err("sslnegotiation needs sslmode=require".to_owned());
        }
        Ok(TlsSettings {
            rest,
            root_file,
            mode,
        })
    }
}

/// Key=value settings as libpq reads them: `key = value` pairs separated
/// by white space (spaces around `=` allowed); a value in single quotes may
/// hold spaces, and `\` escapes the next character. An error never
/// repeats what it read (a password may be in it).
fn key_values(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut chars = text.chars().peekable();
    let mut pairs = Vec::new();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
    };
    loop {
        skip_spaces(&mut chars);
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        skip_spaces(&mut chars);
        if chars.next() != Some('=') {
            return Err(format!(
                "setting {} of the connection string has no \"=\"",
                pairs.len() + 1
            ));
        }
        skip_spaces(&mut chars);
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("the quoted value of {key} is not closed")),
                    },
                    Some(c) => value.push(c),
                    None => return Err(format!("the quoted value of {key} is not closed")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        value.push(next);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// A value quoted as libpq and `tokio-postgres` read it.
fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `%XX` escapes of a URL's query value decoded (a path may hold them).
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = bytes
            .get(at + 1..at + 3)
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match (bytes[at], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                at += 3;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The TLS client for the database: trusting the certificates in
/// `root_file` (PEM) if given, else the system's roots.
fn tls_client(root_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certificates: Vec<CertificateDer<'static>> = match root_file {
        Some(path) => CertificateDer::pem_file_iter(path)
            .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
            .map_err(|error| format!("the CA file {}: {error}", path.display()))?,
        None => rustls_native_certs::load_native_certs().certs,
    };
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(match root_file {
            Some(path) => format!("the CA file {} holds no usable certificate", path.display()),
            None => "no trusted root certificates found on this system; name the database's \
                     CA with sslrootcert=FILE"
                .into(),
        });
    }
    tls_client_with(roots)
}

fn tls_client_with(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, String> {
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// `host:port/dbname` of a connection string, never its password.
fn shown(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres")
    )
}

fn database(error: &dyn std::fmt::Display, at: &str) -> StoreError {
    StoreError::Database(format!("{at}: {error}"))
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`,
    /// or `host=... dbname=...`) and brings its schema up to date.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        let store = PgStore::open(url)?;
        store.migrate(MIGRATIONS)?;
        Ok(store)
    }

    /// Connects without touching the schema.
    pub fn open(url: &str) -> Result<PgStore, StoreError> {
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.contains('='))
        {
            return Err(StoreError::Database(
                "a PostgreSQL store is named by a postgres:// URL (or key=value settings)"
                    .to_owned(),
            ));
        }
        let tls = TlsSettings::take_from(url).map_err(|error| {
            StoreError::Database(format!("not a PostgreSQL connection string: {error}"))
        })?;
        let mut config = tokio_postgres::Config::from_str(&tls.rest).map_err(|error| {
            // The parser's message never repeats the URL (which may hold a
            // password).
            StoreError::Database(format!("not a PostgreSQL connection string: {error}"))
        })?;
        // Decided here, whatever the parser made of the string: TLS only
        // where it was asked for, and then required.
        config.ssl_mode(match tls.mode {
            TlsMode::Off => tokio_postgres::config::SslMode::Disable,
            TlsMode::Required => tokio_postgres::config::SslMode::Require,
        });
        config.connect_timeout(CONNECT_TIMEOUT);
        // A database host that vanishes (no reset ever comes) is noticed
        // within about a minute instead of the system's two hours.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        if config.get_application_name().is_none() {
            config.application_name("backoffice");
        }
        // No call waits forever on the database (a lock held by a stuck
        // session, a runaway query): it fails, and the meter retries.
        // Settings given in the URL's `options` win.
        if config.get_options().is_none() {
            config.options(format!(
                "-c statement_timeout={}",
                STATEMENT_TIMEOUT.as_millis()
            ));
        }
        let shown = shown(&config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("store-postgres")
            .enable_all()
            .build()
            .map_err(StoreError::Sync)?;
        let connector = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => None,
            _ => Some(tls_client(tls.root_file.as_deref()).map_err(|error| {
                StoreError::Database(format!("{shown}: TLS to the database: {error}"))
            })?),
        };
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres_rustls::MakeRustlsConnect::new(match connector {
                Some(connector) => connector,
                // Never used: the mode says no TLS.
                None => tls_client_with(rustls::RootCertStore::empty())
                    .map_err(|error| StoreError::Database(format!("{shown}: {error}")))?,
            }),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = {
            // Building the pool needs the runtime it will run on.
            let _entered = runtime.enter();
            deadpool_postgres::Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(CONNECT_TIMEOUT))
                .create_timeout(Some(CONNECT_TIMEOUT))
                .build()
                .map_err(|error| database(&error, &shown))?
        };
        let store = PgStore {
            pool,
            ledger_lock: std::sync::Mutex::default(),
            holding: std::sync::Mutex::default(),
            epoch_seen: std::sync::Mutex::default(),
            ledger_lock_wait: LEDGER_LOCK_WAIT,
            runtime: Some(runtime),
            shown,
        };
        // Fail now, with the reason, rather than at the first request.
        store.block(async {
            let client = store.client().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|error| database(&error, &store.shown))?;
            Ok::<(), StoreError>(())
        })?;
        Ok(store)
    }

    /// Runs `work` on the store's runtime and waits for it: callable from
    /// any thread, inside an async handler too (there on a thread of its
    /// own, since a runtime's worker may not block on another runtime; the
    /// caller's worker waits as it would for a disk read).
    fn block<T: Send>(&self, work: impl Future<Output = T> + Send) -> T {
        let handle = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the store")
            .handle();
        block_on(handle, work)
    }

    /// Runs `work`, one transaction, as `block` does; when the database
    /// aborts it for a conflict with another transaction (a serialization
    /// failure, under `SERIALIZABLE` isolation or an engine that always
    /// runs it, or a deadlock), runs it again from the start, at most
    /// `CONFLICT_RETRIES` times, after a short growing pause. The aborted
    /// attempt changed nothing.
    fn block_retrying<T: Send, F>(&self, work: impl FnMut() -> F + Send) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send,
    {
        self.block(retrying(&self.shown, work))
    }

    /// A connection from the pool.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|error| StoreError::Unavailable(format!("{}: {error}", self.shown)))
    }

    /// The same store, waiting at most `wait` for the ledger lock instead
    /// of `LEDGER_LOCK_WAIT` (for tests of a lock that is not let go of).
    #[must_use]
    pub fn with_ledger_lock_wait(mut self, wait: Duration) -> PgStore {
        self.ledger_lock_wait = wait;
        self
    }

    /// Takes the branch's ledger lock, waiting for another node to let go
    /// of it (at most `LEDGER_LOCK_WAIT`), then for the writes in flight of
    /// a node whose hold ended under it. Held on a connection of its own
    /// until [`PgStore::release_ledger`]; one hold at a time per store.
    /// True when another writer may have written money since this node's
    /// last write (the ledger epoch moved, or this node does not know
    /// where it stands): what the node keeps in memory must be read again.
    pub fn hold_ledger_lock(&self) -> Result<bool, StoreError> {
        // The lock is re-entrant per session: a second hold on the same
        // connection would take it again at once, and one release would
        // not let go of it.
        if lock_std(&self.holding).is_some() {
            return Err(StoreError::Locked(format!(
                "{}: this node already holds the ledger lock",
                self.shown
            )));
        }
        let taken = lock_std(&self.ledger_lock).take();
        let (client, session) = self.block(async {
            let (client, session) = match taken {
                Some((client, session)) if !client.is_closed() => (client, session),
                _ => {
                    let object = self.client().await?;
                    // Out of the pool: the lock lives as long as this
                    // connection, never lent to another call.
                    let client = deadpool_postgres::Object::take(object);
                    let row = client
                        .query_one(
                            "SELECT pid, (extract(epoch FROM backend_start) * 1000000)::bigint \
                             FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                            &[],
                        )
                        .await
                        .map_err(|error| database(&error, &self.shown))?;
                    let session = Session {
                        pid: row.get(0),
                        started_us: row.get(1),
                    };
                    client
                        .batch_execute(&format!(
                            "SET lock_timeout = {}",
                            self.ledger_lock_wait.as_millis()
                        ))
                        .await
                        .map_err(|error| database(&error, &self.shown))?;
                    (client, session)
                }
            };
            client
                .batch_execute(&format!(
                    "SELECT pg_advisory_lock({LEDGER_LOCK}); \
                     SELECT pg_advisory_lock({WRITERS_LOCK}); \
                     SELECT pg_advisory_unlock({WRITERS_LOCK});"
                ))
                .await
                .map_err(|error| {
                    StoreError::Unavailable(format!(
                        "{}: the ledger lock, held by another node: {error}",
                        self.shown
                    ))
                })?;
            Ok::<_, StoreError>((client, session))
        })?;
        // Read once the lock is held and every write in flight is done.
        let epoch = self.block(async {
            let row = client
                .query_one(&client.prepare_cached(READ_EPOCH).await?, &[])
                .await?;
            Ok::<Epoch, tokio_postgres::Error>((row.get(0), row.get(1)))
        });
        *lock_std(&self.holding) = Some(session);
        *lock_std(&self.ledger_lock) = Some((client, session));
        let epoch = match epoch {
            Ok(epoch) => epoch,
            Err(error) => {
                self.release_ledger();
                return Err(database(&error, &self.shown));
            }
        };
        Ok(lock_std(&self.epoch_seen).as_ref() != Some(&epoch))
    }

    /// Whether the ledger epoch is where this node's last write left it
    /// (false when that is not known, or the database cannot be read).
    pub(crate) fn epoch_unchanged(&self) -> bool {
        let Some(seen) = lock_std(&self.epoch_seen).clone() else {
            return false;
        };
        let now = self.block(async {
            let client = self.client().await?;
            let row = client
                .query_one(&client.prepare_cached(READ_EPOCH).await?, &[])
                .await?;
            Ok::<Epoch, StoreError>((row.get(0), row.get(1)))
        });
        matches!(now, Ok(now) if now == seen)
    }

    /// Commits a money write made under the hold (`still_holding` began
    /// it), and remembers the ledger epoch it leaves: the next hold that
    /// finds it unchanged knows no other writer came between.
    async fn commit_money(
        &self,
        transaction: deadpool_postgres::Transaction<'_>,
    ) -> Result<(), StoreError> {
        if lock_std(&self.holding).is_none() {
            transaction.commit().await?;
            return Ok(());
        }
        let row = transaction
            .query_one(&transaction.prepare_cached(READ_EPOCH).await?, &[])
            .await?;
        let epoch: Epoch = (row.get(0), row.get(1));
        transaction.commit().await?;
        *lock_std(&self.epoch_seen) = Some(epoch);
        Ok(())
    }

    /// Lets go of the ledger lock. If that cannot be said (the connection
    /// broke), the connection is dropped, which ends its session and so
    /// the lock.
    pub fn release_ledger(&self) {
        *lock_std(&self.holding) = None;
        let Some((client, session)) = lock_std(&self.ledger_lock).take() else {
            return;
        };
        let released = self.block(async {
            client
                .batch_execute(&format!("SELECT pg_advisory_unlock({LEDGER_LOCK})"))
                .await
                .map(|()| client)
        });
        if let Ok(client) = released {
            *lock_std(&self.ledger_lock) = Some((client, session));
        }
    }

    /// Inside a money write: fails it unless this node holds the ledger
    /// lock it took (its session can end under it: a database restart, a
    /// failover, a dropped connection, and another node may hold the lock
    /// since). Nothing to check for a write made outside a hold (tests of
    /// the store alone).
    async fn still_holding(
        &self,
        transaction: &deadpool_postgres::Transaction<'_>,
    ) -> Result<(), StoreError> {
        // Until this write commits, where the ledger stands is not known.
        *lock_std(&self.epoch_seen) = None;
        let Some(session) = *lock_std(&self.holding) else {
            return Ok(());
        };
        // The shared writers' lock first (held to the commit), then the
        // check: a node taking the ledger lock waits for this write, or
        // this write sees the lock is no longer ours.
        let held: bool = transaction
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.pid = $1 AND l.objsubid = 1 \
                 AND ((l.classid::bigint << 32) | l.objid::bigint) = $2 \
                 AND (extract(epoch FROM a.backend_start) * 1000000)::bigint = $4) \
                 FROM (SELECT pg_advisory_xact_lock_shared($3)) AS writer",
                &[
                    &session.pid,
                    &LEDGER_LOCK,
                    &WRITERS_LOCK,
                    &session.started_us,
                ],
            )
            .await
            .map_err(|error| database(&error, &self.shown))?
            .get(0);
        if held {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "{}: this node's hold of the ledger lock ended under it (the database \
                 restarted or the connection dropped); nothing was written: try again",
                self.shown
            )))
        }
    }

    /// Where it is (host, port, database; never a password).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Applies the steps of `migrations` the database lacks, in order, in
    /// one transaction under the migration lock.
    pub fn migrate(&self, migrations: &[Migration]) -> Result<Migrated, StoreError> {
        let at = &self.shown;
        self.block(async {
            let mut client = self.client().await?;
            migrate(&mut client, migrations)
                .await
                .map_err(|error| match error {
                    Failure::Database(error) => database(&error, at),
                    Failure::Schema(message) => StoreError::Schema(format!("{at}: {message}")),
                })
        })
    }

    /// The schema's version (0: none yet).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let at = &self.shown;
        self.block(async {
            let client = self.client().await?;
            let exists = client
                .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
                .await
                .map_err(|error| database(&error, at))?
                .get::<_, bool>(0);
            if !exists {
                return Ok(0);
            }
            let row = client
                .query_one(
                    "SELECT coalesce(max(version), 0) FROM schema_migrations",
                    &[],
                )
                .await
                .map_err(|error| database(&error, at))?;
            Ok(row.get::<_, i64>(0))
        })
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Safe from any thread, inside another runtime too.
        // The lock's connection first, while its runtime still runs.
        drop(lock_std(&self.ledger_lock).take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

enum Failure {
    Database(tokio_postgres::Error),
    Schema(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Self {
        Failure::Database(error)
    }
}

async fn migrate(
    client: &mut deadpool_postgres::Object,
    migrations: &[Migration],
) -> Result<Migrated, Failure> {
    let transaction = client.transaction().await?;
    // A migration of a large branch may take longer than any one call.
    transaction
        .batch_execute("SET LOCAL statement_timeout = 0")
        .await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version bigint PRIMARY KEY,
                name text NOT NULL,
                sha256 text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let rows = transaction
        .query(
            "SELECT version, name, sha256 FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    let known = migrations.last().map_or(0, |last| last.version);
    let mut version = 0;
    for row in &rows {
        let (applied, name, sha256): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
        let Some(ours) = migrations.iter().find(|ours| ours.version == applied) else {
            return Err(Failure::Schema(format!(
                "the database's schema is at version {} ({name}), made by a newer backoffice: \
                 this one knows versions up to {known}; run the newer backoffice",
                rows.last().map_or(applied, |row| row.get(0))
            )));
        };
        if ours.sha256() != sha256 {
            return Err(Failure::Schema(format!(
                "migration {applied} ({name}) was applied with other SQL than this \
                 backoffice's (SHA-256 {sha256}, here {}): the database and this backoffice \
                 disagree on the schema; nothing was changed",
                ours.sha256()
            )));
        }
        version = applied;
    }
    let mut applied = Vec::new();
    let from = version;
    for migration in migrations.iter().filter(|step| step.version > from) {
        transaction.batch_execute(migration.sql).await?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, name, sha256) VALUES ($1, $2, $3)",
                &[&migration.version, &migration.name, &migration.sha256()],
            )
            .await?;
        applied.push(migration.version);
        version = migration.version;
    }
    transaction.commit().await?;
    Ok(Migrated { applied, version })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{Harness, conformance_tests};

    #[test]
    fn conflict_pauses_grow_to_a_cap_and_all_the_retries_stay_within_two_seconds() {
        let pauses: Vec<_> = (1..=CONFLICT_RETRIES).map(conflict_pause).collect();
        assert!(pauses[0] >= Duration::from_millis(1) && pauses[0] <= Duration::from_millis(2));
        for pause in &pauses[6..] {
            assert!(*pause >= Duration::from_millis(64) && *pause <= Duration::from_millis(128));
        }
        let total: Duration = pauses.iter().sum();
        assert!(total <= Duration::from_secs(2), "{total:?}");
    }

    /// A database of its own on a throw-away cluster of its own.
    struct PgHarness {
        cluster: pgtest::Cluster,
        url: String,
    }

    impl PgHarness {
        fn new() -> Self {
            let cluster = pgtest::Cluster::start().unwrap();
            let url = cluster.create_database("branch").unwrap();
            PgHarness { cluster, url }
        }
    }

    impl Harness for PgHarness {
        type Store = PgStore;
        fn open(&self) -> PgStore {
            PgStore::connect(&self.url).unwrap()
        }
        fn damage_an_itemised_record(&self, _store: &PgStore) {
            self.cluster
                .psql(
                    "branch",
                    "UPDATE itemised SET record = substring(record FROM 1 FOR length(record) - 1) \
                     WHERE (arrived_ms, mid, batch, part) = \
                     (SELECT arrived_ms, mid, batch, part FROM itemised \
                      ORDER BY arrived_ms, mid, batch, part LIMIT 1)",
                )
                .unwrap();
        }
    }

    conformance_tests!(PgHarness::new());

    #[test]
    fn libpq_tls_settings_are_read_and_taken_out_of_the_connection_string() {
        let read = |url: &str| TlsSettings::take_from(url).unwrap();
        assert_eq!(
            read("postgres://u@db:5432/branch"),
            TlsSettings {
                rest: "postgres://u@db:5432/branch".into(),
                root_file: None,
                mode: TlsMode::Off
            }
        );
        assert_eq!(
            read(
                "postgres://u:p@db/branch?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x%20y"
            ),
            TlsSettings {
                rest: "postgres://u:p@db/branch?sslmode=require&application_name=x%20y".into(),
                root_file: Some("/etc/ca.pem".into()),
                mode: TlsMode::Required
            }
        );
        assert_eq!(
            read("postgres://u@db/branch?sslrootcert=/ca.pem").rest,
            "postgres://u@db/branch"
        );
        assert_eq!(
            read("host=db dbname=branch sslmode=verify-ca sslrootcert=/ca.pem"),
            TlsSettings {
                rest: "host='db' dbname='branch' sslmode='require'".into(),
                root_file: Some("/ca.pem".into()),
                mode: TlsMode::Required
            }
        );
        // Spaces around "=" and quoted values with spaces and quotes, as
        // libpq allows them.
        assert_eq!(
            read(r"host = db  sslmode = verify-full application_name='bo node 1' password='it\'s \\ x' sslrootcert = '/my ca.pem'"),
            TlsSettings {
                rest: r"host='db' sslmode='require' application_name='bo node 1' password='it\'s \\ x'".into(),
                root_file: Some("/my ca.pem".into()),
                mode: TlsMode::Required
            }
        );
        // What tokio-postgres reads back is what was meant.
        let config: tokio_postgres::Config =
            read("application_name='bo node 1' sslmode=require password='a b'")
                .rest
                .parse()
                .unwrap();
        assert_eq!(config.get_application_name(), Some("bo node 1"));
        assert_eq!(config.get_password(), Some(&b"a b"[..]));
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        // Modes that may fall back to plain text are refused; so is
        // nonsense, and no message repeats a value.
        for refused in [
            "postgres://u@db/branch?sslmode=prefer",
            "host=db sslmode=allow",
            "postgres://u@db/branch?sslmode=sometimes",
            "host=db password=secret sslnegotiation=direct",
            "host=db password='secret",
            "host=db secret",
        ] {
            let error = TlsSettings::take_from(refused).unwrap_err();
            assert!(!error.contains("secret"), "{refused}: {error}");
            assert!(PgStore::open(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn grant_codes_in_the_database_follow_the_rules_of_codes_in_memory() {
        let cluster = pgtest::Cluster::start().unwrap();
        for (n, (name, rule)) in crate::grants::rules::RULES.iter().enumerate() {
            eprintln!("rule: {name}");
            let url = cluster.create_database(&format!("codes{n}")).unwrap();
            let store = PgStore::connect(&url).unwrap();
            rule(&crate::grants::DeviceCodes::shared(store.grant_codes()));
        }
    }

    #[test]
    fn a_write_checks_the_session_that_holds_the_ledger_lock_not_only_its_process_number() {
        use crate::ledger::{AccountId, SystemAccount, Transfer, TransferId, TransferKind};
        use crate::store::Store;
        let harness = PgHarness::new();
        let (holder, other) = (harness.open(), harness.open());
        let hold = holder.hold_ledger().unwrap();
        let session = lock_std(&holder.holding).unwrap();
        let transfer = Transfer {
            id: TransferId(0),
            debit: AccountId::System(SystemAccount::Funding),
            credit: AccountId::Customer(proto::Cid::parse("B1-C1").unwrap()),
            amount: proto::Amount::from_nanos(1),
            kind: TransferKind::Deposit,
            posted_ms: 1,
        };
        // The same process number from another session (as after a
        // restart of the database reused it): refused.
        *lock_std(&other.holding) = Some(Session {
            pid: session.pid,
            started_us: session.started_us + 1,
        });
        let refused = other.stage_transfers(std::slice::from_ref(&transfer));
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        // The very session: the check passes.
        *lock_std(&other.holding) = Some(session);
        other.stage_transfers(&[transfer]).unwrap();
        *lock_std(&other.holding) = None;
        drop(hold);
    }

    #[test]
    fn every_statement_has_a_time_limit_unless_the_url_sets_its_own() {
        let harness = PgHarness::new();
        let setting = |store: &PgStore| {
            store.block(async {
                let client = store.client().await.unwrap();
                client
                    .query_one("SHOW statement_timeout", &[])
                    .await
                    .unwrap()
                    .get::<_, String>(0)
            })
        };
        assert_eq!(setting(&harness.open()), "1min");
        let own = format!("{}?options=-c%20statement_timeout%3D5s", harness.url);
        assert_eq!(setting(&PgStore::connect(&own).unwrap()), "5s");
        // What a stuck statement gets: an error, not a wait without end.
        let quick = format!("{}?options=-c%20statement_timeout%3D200ms", harness.url);
        let store = PgStore::connect(&quick).unwrap();
        let failed = store.block(async {
            let client = store.client().await.unwrap();
            client.query_one("SELECT pg_sleep(5)", &[]).await
        });
        let error = failed.unwrap_err();
        assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "a sleep past the limit is cancelled: {error:?}"
        );
    }
}
