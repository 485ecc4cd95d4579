//! Serves the XML-RPC validator1 suite over HTTP on `proto`'s codec, for
//! conformance tests with other languages' clients.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use tests::{http_rpc, validator1};

const USAGE: &str = "\
usage: validator1 [--listen ADDRESS]

Serves the XML-RPC validator1 conformance suite on POST /RPC2 until SIGINT or
SIGTERM. ADDRESS defaults to 127.0.0.1:8080; port 0 picks a free port. The
first line printed is the URL served.";

fn parse_listen(mut args: impl Iterator<Item = String>) -> Result<SocketAddr, String> {
    let mut listen: SocketAddr = "127.0.0.1:8080".parse().expect("valid default");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args.next().ok_or("--listen needs an address")?;
                listen = value
                    .parse()
                    .map_err(|_| format!("not an address: {value:?}"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(listen)
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let listen = match parse_listen(std::env::args().skip(1)) {
        Ok(listen) => listen,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("validator1: {message}\n\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("validator1: cannot listen on {listen}: {error}");
            return ExitCode::from(69);
        }
    };
    let address = listener
        .local_addr()
        .expect("bound listener has an address");
    println!("http://{address}/RPC2");
    let router = http_rpc::router(validator1::LIMITS, Arc::new(validator1::dispatch));
    match http_rpc::run(listener, router, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("validator1: {error}");
            ExitCode::FAILURE
        }
    }
}
