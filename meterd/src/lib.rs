//! `meterd`: the local meter daemon that metered programs call on every use,
//! its client library (`client`) and the pieces of the daemon: `cache` (the
//! only module that touches sled), `readings` (the readings' own log),
//! `journal` (group commit), `context` (who
//! pays), `standing` (the status table), `meter` (the calls), `grants` (who
//! may log in as whom), `server` (the Unix-socket XML-RPC server), `socket`
//! (where the socket is, and whose socket a client calls), `backoffice` (the
//! signed calls to the backoffice), `uploader` (`send` to the backoffice)
//! and `daemon` (wiring and shutdown).
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
pub mod readings;
pub mod server;
pub mod socket;
pub mod standing;
pub mod uploader;

pub use socket::SOCKET_ENV;

use std::path::PathBuf;

/// The socket path a meter client uses when none is given: `$METERD_SOCKET`,
/// else `$XDG_RUNTIME_DIR/meterd.sock`, else the system-wide meter's
/// `/run/meterd/meterd.sock` (`socket::client_default`).
pub fn default_socket_path(lookup: impl Fn(&str) -> Option<String>) -> PathBuf {
    socket::client_default(lookup)
}
