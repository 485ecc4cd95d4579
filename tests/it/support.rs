//! Starting binaries and speaking raw HTTP to them, bounded in time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long any one network read or write may take before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A child process that is killed when the test ends, however it ends.
pub struct Running {
    pub child: Child,
    pub first_line: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program` with `args` and waits for the first line it prints.
pub fn start(program: &str, args: &[&str]) -> Running {
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {program}: {error}"));
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut first_line = String::new();
    BufReader::new(stdout)
        .read_line(&mut first_line)
        .expect("read first line");
    assert!(!first_line.is_empty(), "{program} exited before printing");
    Running {
        child,
        first_line: first_line.trim().to_owned(),
    }
}

/// The address in a URL like `http://127.0.0.1:1234/RPC2`.
pub fn address_of(url: &str) -> SocketAddr {
    let rest = url.strip_prefix("http://").expect("http URL");
    let host = rest.split('/').next().expect("host part");
    host.parse().expect("socket address")
}

/// The status code and body of an HTTP/1.1 POST with `Connection: close`.
pub fn post(address: SocketAddr, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect_timeout(&address, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("write head");
    // A server may refuse an oversize body before reading it; that is fine.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text_end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a complete HTTP response head");
    let head = String::from_utf8_lossy(&response[..text_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    (status, response[text_end + 4..].to_vec())
}
