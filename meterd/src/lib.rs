//! `meterd`: the local meter daemon that metered programs call on every use,
//! its client library (`client`) and the pieces of the daemon: `cache` (the
//! only module that touches sled), `journal` (group commit), `context` (who
//! pays), `standing` (the status table), `meter` (the calls), `grants` (who
//! may log in as whom), `server` (the Unix-socket XML-RPC server),
//! `backoffice` (the signed calls to the backoffice), `uploader` (`send` to
//! the backoffice) and `daemon` (wiring and shutdown).
#![forbid(unsafe_code)]

pub mod backoffice;
pub mod batching;
pub mod cache;
pub mod client;
pub mod config;
pub mod context;
pub mod daemon;
pub mod grants;
pub mod journal;
pub mod meter;
pub mod procinfo;
pub mod server;
pub mod standing;
pub mod uploader;

use std::path::PathBuf;

/// Environment variable that overrides the socket path.
pub const SOCKET_ENV: &str = "METERD_SOCKET";

/// The socket path a meter client uses when none is given: `$METERD_SOCKET`,
/// else `$XDG_RUNTIME_DIR/meterd.sock`, else `/tmp/meterd.sock`.
pub fn default_socket_path(lookup: impl Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(path) = lookup(SOCKET_ENV).filter(|path| !path.is_empty()) {
        return PathBuf::from(path);
    }
    match lookup("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("meterd.sock"),
        None => PathBuf::from("/tmp/meterd.sock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_prefers_explicit_then_runtime_dir() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == key)
                    .map(|(_, value)| value.to_string())
            }
        };
        assert_eq!(
            default_socket_path(env(&[(SOCKET_ENV, "/s"), ("XDG_RUNTIME_DIR", "/r")])),
            PathBuf::from("/s")
        );
        assert_eq!(
            default_socket_path(env(&[("XDG_RUNTIME_DIR", "/run/user/7")])),
            PathBuf::from("/run/user/7/meterd.sock")
        );
        assert_eq!(
            default_socket_path(env(&[])),
            PathBuf::from("/tmp/meterd.sock")
        );
    }
}
