//! The daemon's configuration: flags, then environment, then a TOML file,
//! then the documented defaults (see `docs/meterd.md`).

use std::path::{Path, PathBuf};

use proto::Mid;
use serde::Deserialize;

use crate::context::ContextLimits;

/// Readings the cache holds at most unless configured otherwise.
pub const CACHE_READINGS_MAX_DEFAULT: u64 = 10_000_000;
/// Socket permissions unless configured otherwise: the owner only.
pub const SOCKET_MODE_DEFAULT: u32 = 0o600;
/// How often contexts of exited processes are dropped.
pub const CONTEXT_SWEEP_INTERVAL_MS: u64 = 10_000;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A setting has a value it cannot have.
    #[error("{0}")]
    Invalid(String),
}

/// Settings that may be given, every one optional: the config file's, and
/// those of the command line and environment, which win over the file's.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// Socket path.
    pub socket: Option<PathBuf>,
    /// Socket permissions, as an octal string such as "660".
    pub socket_mode: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Readings the cache may hold.
    pub cache_readings_max: Option<u64>,
    /// The backoffice's XML-RPC URL.
    pub backoffice_url: Option<String>,
    /// This meter's MID.
    pub mid: Option<String>,
    /// A file holding this meter's secret.
    pub secret_file: Option<PathBuf>,
    /// For an `https://` backoffice: the CA certificates (PEM) its
    /// certificate must chain to, instead of the system's roots.
    pub backoffice_ca: Option<PathBuf>,
    /// Most contexts with open frames.
    pub contexts_max: Option<usize>,
    /// Most open frames per context.
    pub frames_max: Option<usize>,
}

/// Where and how the meter uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSettings {
    /// The backoffice's XML-RPC URL, `http://host:port/RPC2`.
    pub url: String,
    /// This meter's MID.
    pub mid: Mid,
    /// The file holding this meter's secret.
    pub secret_file: PathBuf,
    /// The CA file for an `https://` backoffice (system roots if `None`).
    pub backoffice_ca: Option<PathBuf>,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Socket path.
    pub socket: PathBuf,
    /// Socket permissions.
    pub socket_mode: u32,
    /// Data directory (the cache lives in `cache/` under it).
    pub data_dir: PathBuf,
    /// Readings the cache may hold.
    pub cache_readings_max: u64,
    /// Where to upload; `None` runs the meter without uploads.
    pub upload: Option<UploadSettings>,
    /// Bounds on contexts.
    pub context_limits: ContextLimits,
}

/// The data directory unless configured: `$XDG_STATE_HOME/meterd`, else
/// `$HOME/.local/state/meterd`, else `./meterd-data`.
pub fn default_data_dir(lookup: impl Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(state) = lookup("XDG_STATE_HOME").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(state).join("meterd");
    }
    match lookup("HOME").filter(|dir| !dir.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/meterd"),
        None => PathBuf::from("meterd-data"),
    }
}

/// Reads a config file.
pub fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| ConfigError::Parse {
        path: path.to_owned(),
        message: error.message().to_owned(),
    })
}

fn parse_mode(text: &str) -> Result<u32, ConfigError> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| ConfigError::Invalid(format!("socket mode {text:?} is not octal like 660")))
}

/// Resolves the configuration: overrides (flags and environment), then the
/// file, then defaults.
pub fn resolve(
    overrides: FileSettings,
    file: FileSettings,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    resolve_as(overrides, file, lookup, crate::procinfo::effective_uid())
}

/// `resolve` for a process running as `euid`, which decides the default
/// socket (`socket::serve_default`).
pub fn resolve_as(
    overrides: FileSettings,
    file: FileSettings,
    lookup: impl Fn(&str) -> Option<String>,
    euid: Option<u32>,
) -> Result<Config, ConfigError> {
    let socket = match overrides.socket.or(file.socket) {
        Some(socket) => socket,
        None => crate::socket::serve_default(&lookup, euid).map_err(ConfigError::Invalid)?,
    };
    let socket_mode = match overrides.socket_mode.or(file.socket_mode) {
        Some(text) => parse_mode(&text)?,
        None => SOCKET_MODE_DEFAULT,
    };
    let data_dir = overrides
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| default_data_dir(&lookup));
    let cache_readings_max = overrides
        .cache_readings_max
        .or(file.cache_readings_max)
        .unwrap_or(CACHE_READINGS_MAX_DEFAULT);
    if cache_readings_max == 0 {
        return Err(ConfigError::Invalid(
            "cache_readings_max must be at least 1".into(),
        ));
    }
    let defaults = ContextLimits::default();
    let context_limits = ContextLimits {
        contexts_max: overrides
            .contexts_max
            .or(file.contexts_max)
            .unwrap_or(defaults.contexts_max),
        frames_max: overrides
            .frames_max
            .or(file.frames_max)
            .unwrap_or(defaults.frames_max),
    };
    let url = overrides.backoffice_url.or(file.backoffice_url);
    let mid = overrides.mid.or(file.mid);
    let secret_file = overrides.secret_file.or(file.secret_file);
    let backoffice_ca = overrides.backoffice_ca.or(file.backoffice_ca);
    let upload = match (url, mid, secret_file) {
        (None, None, None) => None,
        (Some(url), Some(mid), Some(secret_file)) => {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(ConfigError::Invalid(format!(
                    "backoffice URL {url:?} must start with https:// (or http://, meant for this machine)"
                )));
            }
            let mid = Mid::parse(&mid).map_err(|error| ConfigError::Invalid(error.to_string()))?;
            Some(UploadSettings {
                url,
                mid,
                secret_file,
                backoffice_ca,
            })
        }
        _ => {
            return Err(ConfigError::Invalid(
                "uploads need all three of backoffice URL, MID and secret file".into(),
            ));
        }
    };
    Ok(Config {
        socket,
        socket_mode,
        data_dir,
        cache_readings_max,
        upload,
        context_limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let file: FileSettings = toml::from_str(
            "socket = \"/file.sock\"\ndata_dir = \"/file-data\"\ncache_readings_max = 5\nsocket_mode = \"660\"",
        )
        .unwrap();
        let overrides = FileSettings {
            socket: Some("/flag.sock".into()),
            ..FileSettings::default()
        };
        let config = resolve_as(overrides, file, no_env, Some(1000)).unwrap();
        assert_eq!(config.socket, PathBuf::from("/flag.sock"));
        assert_eq!(config.data_dir, PathBuf::from("/file-data"));
        assert_eq!(config.cache_readings_max, 5);
        assert_eq!(config.socket_mode, 0o660);
        assert_eq!(config.upload, None);
        let defaults = resolve_as(
            FileSettings::default(),
            FileSettings::default(),
            no_env,
            Some(0),
        )
        .unwrap();
        assert_eq!(defaults.socket, PathBuf::from(crate::socket::SYSTEM_SOCKET));
        assert_eq!(defaults.data_dir, PathBuf::from("meterd-data"));
        assert_eq!(defaults.socket_mode, SOCKET_MODE_DEFAULT);
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        assert!(toml::from_str::<FileSettings>("sokcet = \"/x\"").is_err());
        let bad_mode = FileSettings {
            socket_mode: Some("999".into()),
            ..FileSettings::default()
        };
        assert!(resolve_as(bad_mode, FileSettings::default(), no_env, Some(0)).is_err());
        // Not root and no XDG_RUNTIME_DIR: say where, never /tmp.
        let error = resolve_as(
            FileSettings::default(),
            FileSettings::default(),
            no_env,
            Some(1000),
        )
        .unwrap_err();
        assert!(error.to_string().contains("--socket"), "{error}");
        let half_upload = FileSettings {
            backoffice_url: Some("http://127.0.0.1:1/RPC2".into()),
            ..FileSettings::default()
        };
        let error = resolve_as(half_upload, FileSettings::default(), no_env, Some(0)).unwrap_err();
        assert!(error.to_string().contains("all three"), "{error}");
        let bad_mid = FileSettings {
            backoffice_url: Some("http://127.0.0.1:1/RPC2".into()),
            mid: Some("B1-C1".into()),
            secret_file: Some("/s".into()),
            ..FileSettings::default()
        };
        assert!(resolve_as(bad_mid, FileSettings::default(), no_env, Some(0)).is_err());
    }

    #[test]
    fn data_dir_follows_xdg() {
        let env = |key: &str| (key == "HOME").then(|| "/home/ann".to_owned());
        assert_eq!(
            default_data_dir(env),
            PathBuf::from("/home/ann/.local/state/meterd")
        );
        let env = |key: &str| (key == "XDG_STATE_HOME").then(|| "/state".to_owned());
        assert_eq!(default_data_dir(env), PathBuf::from("/state/meterd"));
    }
}
