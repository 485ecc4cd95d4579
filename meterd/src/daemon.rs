//! Wires the daemon together: cache, journal, status table, socket, server,
//! context sweeper; and takes it apart again on shutdown.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{Notify, watch};

use crate::backoffice::Backoffice;
use crate::cache::{Cache, CacheError};
use crate::config::{CONTEXT_SWEEP_INTERVAL_MS, Config};
use crate::meter::{Meter, UploadReport, UploadSignals};
use crate::standing::StatusTable;
use crate::uploader::Uploader;
use crate::{journal, server};
use proto::auth::Secret;

/// How long shutdown waits for the journal to finish writing.
pub const JOURNAL_DRAIN_MS: u64 = 5_000;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The cache could not be opened (another meterd may hold it).
    #[error("cannot open the cache in {path}: {source}")]
    Cache {
        /// The cache directory.
        path: String,
        /// Why.
        source: CacheError,
    },
    /// The upload settings are unusable (secret file, URL).
    #[error("{0}")]
    Upload(String),
    /// Another meter answers on the socket.
    #[error("another meterd is already listening on {0}")]
    AlreadyRunning(String),
    /// The socket's directory is writable by every user (`socket::check_directory`).
    #[error("{0}")]
    UnsafeSocketDirectory(String),
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

fn bind(path: &Path, mode: u32) -> Result<UnixListener, StartError> {
    let socket_error = |source| StartError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(socket_error)?;
    }
    // Before anything is removed or bound: a directory every user may write
    // could hold a socket another user made to answer in the meter's place.
    crate::socket::check_directory(path).map_err(StartError::UnsafeSocketDirectory)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::AlreadyRunning(path.display().to_string()));
        }
        // A socket left behind by a meter that did not exit cleanly.
        std::fs::remove_file(path).map_err(socket_error)?;
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(socket_error)?;
    Ok(listener)
}

/// Runs the meter until `shutdown` completes. `ready` is called once the
/// socket accepts calls.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&Config),
) -> Result<(), StartError> {
    let cache_dir = config.data_dir.join("cache");
    let cache =
        Cache::open(&cache_dir, config.cache_readings_max).map_err(|source| StartError::Cache {
            path: cache_dir.display().to_string(),
            source,
        })?;
    let cache = Arc::new(cache);
    let saved = cache.saved_table().map_err(|source| StartError::Cache {
        path: cache_dir.display().to_string(),
        source,
    })?;
    let table = Arc::new(Mutex::new(
        saved
            .as_ref()
            .map(StatusTable::from_saved)
            .unwrap_or_default(),
    ));
    let (journal, writer) = journal::start(Arc::clone(&cache));
    let (report, _) = watch::channel(UploadReport::default());
    let signals = Arc::new(UploadSignals {
        wake: Notify::new(),
        report,
        flush_tickets: std::sync::atomic::AtomicU64::new(0),
    });
    let backoffice = match &config.upload {
        Some(settings) => {
            let secret = read_secret(&settings.secret_file)?;
            let backoffice = Backoffice::with_ca(
                &settings.url,
                settings.mid,
                secret,
                settings.backoffice_ca.as_deref(),
            )
            .map_err(StartError::Upload)?
            .rereading(settings.secret_file.clone());
            let endpoint = backoffice.endpoint();
            if !endpoint.tls && !crate::backoffice::is_loopback_host(&endpoint.host) {
                tracing::warn!(
                    host = %endpoint.host,
                    "uploading over plain http to another machine: anyone on the way reads the readings; use https://"
                );
            }
            Some(Arc::new(backoffice))
        }
        None => None,
    };
    let uploading = backoffice.clone();
    let listener = bind(&config.socket, config.socket_mode)?;
    let meter = Meter::new(
        Arc::clone(&cache),
        journal,
        Arc::clone(&table),
        Arc::clone(&signals),
        backoffice,
        config.context_limits,
    )
    .map_err(|source| StartError::Cache {
        path: cache_dir.display().to_string(),
        source,
    })?;
    let meter = Arc::new(meter);
    let uploader = uploading.map(|backoffice| {
        Uploader::new(
            Arc::clone(&cache),
            Arc::clone(&table),
            Arc::clone(&signals),
            backoffice,
            meter.contexts(),
        )
    });
    let saved_sessions = cache.saved_sessions().map_err(|source| StartError::Cache {
        path: cache_dir.display().to_string(),
        source,
    })?;
    let restored = meter.restore_sessions(&saved_sessions);
    if restored > 0 {
        tracing::info!(restored, "sessions restored");
    }
    let sweeper = tokio::spawn(sweep_contexts(Arc::clone(&meter)));
    let uploads = uploader.map(|uploader| tokio::spawn(uploader.run()));
    tracing::info!(socket = %config.socket.display(), pending = cache.pending(), "meterd ready");
    ready(&config);
    server::run(listener, Arc::clone(&meter), shutdown).await;
    sweeper.abort();
    // An upload in flight is abandoned: its batch stays in the cache, with its
    // id, and is resent on the next start.
    if let Some(uploads) = uploads {
        uploads.abort();
    }
    drop(meter);
    let drained = tokio::task::spawn_blocking(move || writer.join());
    if tokio::time::timeout(Duration::from_millis(JOURNAL_DRAIN_MS), drained)
        .await
        .is_err()
    {
        tracing::warn!("journal still writing at exit; acknowledged readings are durable already");
    }
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("meterd stopped");
    Ok(())
}

fn read_secret(path: &Path) -> Result<Secret, StartError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        StartError::Upload(format!(
            "cannot read the secret file {}: {error}",
            path.display()
        ))
    })?;
    Secret::new(text.trim().as_bytes())
        .map_err(|error| StartError::Upload(format!("secret file {}: {error}", path.display())))
}

async fn sweep_contexts(meter: Arc<Meter>) {
    let mut interval = tokio::time::interval(Duration::from_millis(CONTEXT_SWEEP_INTERVAL_MS));
    loop {
        interval.tick().await;
        let dropped = meter.sweep_contexts();
        if dropped > 0 {
            tracing::debug!(dropped, "dropped contexts of exited processes");
        }
        let ended = meter.end_ungranted_logins().await;
        if ended > 0 {
            tracing::info!(ended, "closed logins whose grant expired");
        }
    }
}
