//! A throw-away PostgreSQL cluster for tests, from the machine's own
//! PostgreSQL (Debian's `postgresql` package; `bash .ci/run` installs it):
//! `initdb` in a temporary folder, a socket folder and a loopback port of
//! its own, stopped and deleted when dropped. Nothing else on the machine
//! is touched, so tests may run several at once.
//!
//! PostgreSQL refuses to run as root: as root, the cluster's folder is
//! given to the `postgres` user the package creates and every server
//! command runs as that user (`runuser`).
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// Where the server programs are: `$PG_BIN`, else the folder `initdb` on
/// `PATH` really is in, else
/// the newest `/usr/lib/postgresql/*/bin` (Debian's layout).
pub fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            // Through a link to the real folder, which has the client
            // programs of the same version beside the server's.
            if let Ok(initdb) = std::fs::canonicalize(dir.join("initdb"))
                && let Some(real) = initdb.parent()
                && real.join("pg_ctl").is_file()
            {
                return Ok(real.to_owned());
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "PostgreSQL's server programs (initdb, pg_ctl) were not found: install Debian's \
         `postgresql` package (`bash .ci/run` does), or set PG_BIN to their folder"
            .to_owned()
    })
}

fn is_root() -> bool {
    // The owner of a file this process just made is this process's user.
    let probe = tempfile::tempfile().ok();
    probe
        .and_then(|file| file.metadata().ok())
        .map(|meta| std::os::unix::fs::MetadataExt::uid(&meta) == 0)
        .unwrap_or(false)
}

fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|error| error.to_string())?;
    Ok(listener
        .local_addr()
        .map_err(|error| error.to_string())?
        .port())
}

impl Cluster {
    /// Makes and starts a new cluster; its superuser is `postgres`, trusted
    /// on loopback and on its socket.
    pub fn start() -> Result<Cluster, String> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("pgtest-")
            .tempdir()
            .map_err(|error| error.to_string())?;
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(dir.path()))?;
        }
        let mut cluster = Cluster {
            dir,
            bin,
            port: 0,
            as_postgres,
        };
        cluster.server_command("initdb", |command| {
            command
                .arg("-D")
                .arg(cluster.data())
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale"])
                .arg("--no-sync");
        })?;
        // A few tries: the free port found can be taken before the server
        // binds it.
        let mut last = String::new();
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(error) => last = format!("{error}\nserver log:\n{}", cluster.log()),
            }
            if !last.contains("in use") {
                break;
            }
        }
        cluster.port = 0;
        Err(last)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    fn server_command(
        &self,
        program: &str,
        build: impl FnOnce(&mut Command),
    ) -> Result<Output, String> {
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join(program));
            command
        } else {
            Command::new(self.bin.join(program))
        };
        build(&mut command);
        run(&mut command)
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=64",
            self.port,
            self.socket_dir().display()
        );
        self.server_command("pg_ctl", |command| {
            command
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .args(["-w", "-t", "60", "-o", &options, "start"]);
        })
        .map(drop)
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `name` as the superuser.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates database `name`; returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        let port = self.port.to_string();
        self.server_command("createdb", |command| {
            command
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
                .arg(name);
        })?;
        Ok(self.url(name))
    }

    /// Runs SQL through `psql` on database `name`; returns what it printed
    /// (unaligned, tuples only).
    pub fn psql(&self, name: &str, sql: &str) -> Result<String, String> {
        let port = self.port.to_string();
        let output = self.server_command("psql", |command| {
            command
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", name])
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        })?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`): no
    /// checkpoint, recovery from the write-ahead log at the next start.
    pub fn stop_immediately(&self) -> Result<(), String> {
        self.server_command("pg_ctl", |command| {
            command
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-m", "immediate", "stop"]);
        })
        .map(drop)
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl_start()
    }

    /// Turns TLS on with the certificate chain and key given (PEM), kept
    /// in the data folder as the server's own (`server.crt`, `server.key`,
    /// readable by the server's user only), and waits until new sessions
    /// see it. Clients that do not ask for TLS are still served plain.
    pub fn enable_tls(&self, certificate_pem: &str, key_pem: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        for (name, text) in [("server.crt", certificate_pem), ("server.key", key_pem)] {
            let path = self.data().join(name);
            std::fs::write(&path, text).map_err(|error| format!("{}: {error}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|error| format!("{}: {error}", path.display()))?;
            if self.as_postgres {
                run(Command::new("chown").arg("postgres:").arg(&path))?;
            }
        }
        self.psql("postgres", "ALTER SYSTEM SET ssl = on")?;
        self.psql("postgres", "SELECT pg_reload_conf()")?;
        for _ in 0..100 {
            if self.psql("postgres", "SHOW ssl")?.trim() == "on" {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(format!("TLS did not come on:\n{}", self.log()))
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Whatever its start said (a start that timed out may still have
        // left a server running); already stopped is fine.
        let _ = self.stop_immediately();
    }
}

fn run(command: &mut Command) -> Result<Output, String> {
    let output = command
        .output()
        .map_err(|error| format!("{command:?}: {error}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_starts_answers_survives_an_immediate_stop_and_goes_away() {
        let cluster = Cluster::start().unwrap();
        cluster.create_database("probe").unwrap();
        cluster
            .psql("probe", "CREATE TABLE t (n int); INSERT INTO t VALUES (41)")
            .unwrap();
        cluster.stop_immediately().unwrap();
        assert!(cluster.psql("probe", "SELECT 1").is_err(), "stopped");
        cluster.restart().unwrap();
        assert_eq!(
            cluster.psql("probe", "SELECT n + 1 FROM t").unwrap().trim(),
            "42"
        );
        let dir = cluster.dir.path().to_owned();
        drop(cluster);
        assert!(!dir.exists());
    }
}
