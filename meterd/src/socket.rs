//! Where the meter's socket is, and why a caller may trust what answers
//! there: a socket that another local user could have created first would
//! let them answer every `query` with true and collect the CIDs of every
//! `login`.
//!
//! - The default path is in a directory no other user can write:
//!   `$XDG_RUNTIME_DIR/meterd.sock`, else, for root (and for callers of a
//!   system-wide meter), `/run/meterd/meterd.sock`. Never `/tmp`.
//! - The daemon refuses a socket whose directory every user may write
//!   (`mode & 0o002`, sticky or not: the sticky bit keeps others from
//!   removing our socket, not from creating the name before us).
//! - Clients connect only to a socket owned by a trusted uid
//!   (`check_owner`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Environment variable that overrides the socket path.
pub const SOCKET_ENV: &str = "METERD_SOCKET";
/// Environment variable naming one more uid (or user name) whose socket a
/// client trusts, besides its own and root's.
pub const OWNER_ENV: &str = "METERD_SOCKET_OWNER";
/// The system-wide meter's socket (`docs/meterd.service`); `/run` is root's,
/// so no other user can create `/run/meterd`.
pub const SYSTEM_SOCKET: &str = "/run/meterd/meterd.sock";
/// The socket's file name in `$XDG_RUNTIME_DIR`.
pub const SOCKET_NAME: &str = "meterd.sock";

fn runtime_dir(lookup: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    lookup("XDG_RUNTIME_DIR")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
}

/// The socket a client calls when none is given: `$METERD_SOCKET`, else
/// `$XDG_RUNTIME_DIR/meterd.sock`, else the system-wide meter's
/// `/run/meterd/meterd.sock`.
pub fn client_default(lookup: impl Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(path) = lookup(SOCKET_ENV).filter(|path| !path.is_empty()) {
        return PathBuf::from(path);
    }
    runtime_dir(&lookup).map_or_else(|| PathBuf::from(SYSTEM_SOCKET), |dir| dir.join(SOCKET_NAME))
}

/// The socket the daemon listens on when none is configured:
/// `$XDG_RUNTIME_DIR/meterd.sock`, else `/run/meterd/meterd.sock` for root
/// (`euid` 0); anyone else must say where.
pub fn serve_default(
    lookup: impl Fn(&str) -> Option<String>,
    euid: Option<u32>,
) -> Result<PathBuf, String> {
    if let Some(dir) = runtime_dir(&lookup) {
        return Ok(dir.join(SOCKET_NAME));
    }
    if euid == Some(0) {
        return Ok(PathBuf::from(SYSTEM_SOCKET));
    }
    Err(format!(
        "no socket path: XDG_RUNTIME_DIR is not set, and only root uses {SYSTEM_SOCKET}; \
         give --socket PATH (or {SOCKET_ENV}) in a directory that only you can write, \
         or set XDG_RUNTIME_DIR"
    ))
}

/// The daemon's rule: the socket's directory must not be writable by every
/// user, who could create the socket's name before the meter does.
pub fn check_directory(socket: &Path) -> Result<(), String> {
    let directory = directory_of(socket);
    let metadata = std::fs::metadata(&directory)
        .map_err(|error| format!("cannot inspect {}: {error}", directory.display()))?;
    if metadata.mode() & 0o002 != 0 {
        return Err(format!(
            "refusing to listen on {}: its directory {} is writable by every user, \
             who could put a socket there first and answer in the meter's place; \
             use $XDG_RUNTIME_DIR, {SYSTEM_SOCKET}, or a directory that only you can write",
            socket.display(),
            directory.display()
        ));
    }
    Ok(())
}

fn directory_of(socket: &Path) -> PathBuf {
    match socket.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The uid in `METERD_SOCKET_OWNER`: a number or a user name (looked up in
/// `etc/passwd`).
pub fn configured_owner(value: &str, passwd: Option<&str>) -> Option<u32> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if let Ok(uid) = value.parse() {
        return Some(uid);
    }
    passwd?.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let uid = fields.nth(1)?;
        (name == value).then(|| uid.parse().ok()).flatten()
    })
}

/// Why a client will not call a socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the socket {path} belongs to uid {owner}, not to you (uid {own}), root, or \
     {OWNER_ENV}: another user may have put it there to answer in the meter's place; \
     not calling it (if that user runs your meter, set {OWNER_ENV}={owner})"
)]
pub struct Untrusted {
    /// The socket.
    pub path: PathBuf,
    /// Its owner.
    pub owner: u32,
    /// The caller's effective uid (`u32::MAX` when unknown).
    pub own: u32,
}

/// The clients' rule: a socket is called only when its owner is the caller
/// (`euid`), root, `configured`, or the owner of a directory that only root
/// could have made (its parent is root's and writable by nobody else), as
/// `/run/meterd` of the system-wide meter. A socket that does not exist
/// passes (the connection then fails as usual).
pub fn check_owner(
    socket: &Path,
    euid: Option<u32>,
    configured: Option<u32>,
) -> Result<(), Untrusted> {
    let Ok(metadata) = std::fs::metadata(socket) else {
        return Ok(());
    };
    let owner = metadata.uid();
    if owner == 0 || Some(owner) == euid || Some(owner) == configured {
        return Ok(());
    }
    if in_a_directory_of_its_owner_made_by_root(socket, owner) {
        return Ok(());
    }
    Err(Untrusted {
        path: socket.to_owned(),
        owner,
        own: euid.unwrap_or(u32::MAX),
    })
}

fn in_a_directory_of_its_owner_made_by_root(socket: &Path, owner: u32) -> bool {
    let directory = directory_of(socket);
    let Ok(directory) = directory.canonicalize() else {
        return false;
    };
    let Some(parent) = directory.parent() else {
        return false;
    };
    let (Ok(of_directory), Ok(of_parent)) =
        (std::fs::metadata(&directory), std::fs::metadata(parent))
    else {
        return false;
    };
    of_directory.uid() == owner
        && of_directory.mode() & 0o022 == 0
        && of_parent.uid() == 0
        && of_parent.mode() & 0o022 == 0
}

/// Checks `socket` for this process, with `METERD_SOCKET_OWNER` from the
/// environment.
pub fn check_owner_for_this_process(socket: &Path) -> Result<(), Untrusted> {
    let configured = std::env::var(OWNER_ENV).ok().and_then(|value| {
        let passwd = std::fs::read_to_string("/etc/passwd").ok();
        configured_owner(&value, passwd.as_deref())
    });
    check_owner(socket, crate::procinfo::effective_uid(), configured)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |key: &str| {
            pairs
                .iter()
                .find(|(name, _)| *name == key)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn the_default_socket_is_never_in_a_directory_others_can_write() {
        assert_eq!(
            client_default(env(&[(SOCKET_ENV, "/s"), ("XDG_RUNTIME_DIR", "/r")])),
            PathBuf::from("/s")
        );
        assert_eq!(
            client_default(env(&[("XDG_RUNTIME_DIR", "/run/user/7")])),
            PathBuf::from("/run/user/7/meterd.sock")
        );
        assert_eq!(client_default(env(&[])), PathBuf::from(SYSTEM_SOCKET));
        assert_eq!(
            serve_default(env(&[("XDG_RUNTIME_DIR", "/run/user/7")]), Some(7)),
            Ok(PathBuf::from("/run/user/7/meterd.sock"))
        );
        assert_eq!(
            serve_default(env(&[]), Some(0)),
            Ok(PathBuf::from(SYSTEM_SOCKET))
        );
        let refused = serve_default(env(&[]), Some(1000)).unwrap_err();
        assert!(refused.contains("--socket"), "{refused}");
        assert!(refused.contains("XDG_RUNTIME_DIR"), "{refused}");
        assert!(serve_default(env(&[]), None).is_err());
    }

    #[test]
    fn a_socket_in_a_directory_every_user_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("meterd.sock");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(check_directory(&socket), Ok(()));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
        assert_eq!(check_directory(&socket), Ok(()));
        for mode in [0o777, 0o1777, 0o703] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let refused = check_directory(&socket).unwrap_err();
            assert!(refused.contains("writable by every user"), "{refused}");
        }
    }

    #[test]
    fn the_configured_owner_is_a_uid_or_a_user_name() {
        let passwd =
            "root:x:0:0::/root:/bin/sh\nmeterd:x:998:997::/var/lib/meterd:/usr/sbin/nologin\n";
        assert_eq!(configured_owner("998", None), Some(998));
        assert_eq!(configured_owner("meterd", Some(passwd)), Some(998));
        assert_eq!(configured_owner("nobody", Some(passwd)), None);
        assert_eq!(configured_owner("", Some(passwd)), None);
    }

    #[test]
    fn a_socket_of_another_user_is_not_called() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("meterd.sock");
        assert_eq!(check_owner(&socket, Some(1000), None), Ok(()), "absent");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mut owner = std::fs::metadata(&socket).unwrap().uid();
        assert_eq!(check_owner(&socket, Some(owner), None), Ok(()));
        assert_eq!(
            check_owner(&socket, Some(1000), None).is_ok(),
            owner == 0 || owner == 1000
        );
        if owner == 0 {
            // Root's socket is everyone's meter; as root, give it away.
            std::os::unix::fs::chown(&socket, Some(65534), Some(65534)).unwrap();
            owner = 65534;
        }
        let caller = if owner == 1000 { 1001 } else { 1000 };
        let refused = check_owner(&socket, Some(caller), None).unwrap_err();
        assert_eq!(refused.owner, owner);
        assert!(refused.to_string().contains(OWNER_ENV), "{refused}");
        assert_eq!(check_owner(&socket, Some(caller), Some(owner)), Ok(()));
    }

    #[test]
    fn a_system_meters_socket_is_called_in_a_directory_only_root_could_make() {
        if crate::procinfo::effective_uid() != Some(0) {
            return; // needs root to make such a directory
        }
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let own = run.join("meterd");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&own, Some(65534), Some(65534)).unwrap();
        let socket = own.join("meterd.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std::os::unix::fs::chown(&socket, Some(65534), Some(65534)).unwrap();
        assert_eq!(check_owner(&socket, Some(1000), None), Ok(()));
        // Where others could have made the directory, it proves nothing.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_owner(&socket, Some(1000), None).is_err());
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&own, Some(1234), Some(1234)).unwrap();
        assert!(
            check_owner(&socket, Some(1000), None).is_err(),
            "not the directory's owner"
        );
    }
}
