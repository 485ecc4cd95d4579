//! Parlay X `chargeAmount` end to end over HTTP: 32 clients, each on its
//! own kept-alive connection to the backoffice's HTTP server on loopback,
//! send SOAP envelopes with a fresh WS-Security UsernameToken digest and a
//! reference code of their own, each charging one of 1,000 granted
//! customers 0.01. Every charge is durable before it is answered. Prints
//! charges per second and latency (median, p99) beside the limits measured
//! in the same run: the disk's `fdatasync` rate in the data folder and the
//! HTTP round trips per second of the same clients fetching the WSDL (an
//! answer from memory, no store).
//!
//! `cargo bench -p backoffice --bench charge` (env `CHARGE_BENCH_CALLS`:
//! charges per client, default 200; `CHARGE_BENCH_CLIENTS`, default 32).
//! With `BENCH_STORE=postgres://...` the PostgreSQL store (an empty
//! database). Under `cargo test` a smoke run: 4 clients, 5 charges each.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use backoffice::ledger::{AccountId, NewTransfer, SystemAccount, TransferKind};
use backoffice::send::{Backoffice, DEFAULT_PARAMS};
use backoffice::store::{AnyStore, Store};
use base64::Engine as _;
use proto::{Amount, Bid, Cid};

#[path = "../tests/it/examples.rs"]
mod examples;

const WSSE: &str =
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd";
const WSU: &str =
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd";
const DIGEST: &str = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordDigest";
const PATH: &str = "/AmountChargingService/services/AmountCharging";
const LOCAL: &str = "http://www.csapi.org/schema/parlayx/payment/amount_charging/v2_1/local";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let testing = !std::env::args().any(|arg| arg == "--bench");
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    let (clients, calls, customer_count) = if testing {
        (4, 5, 8)
    } else {
        (
            env_number("CHARGE_BENCH_CLIENTS", 32),
            env_number("CHARGE_BENCH_CALLS", 200),
            1_000,
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let store_url = std::env::var("BENCH_STORE").ok();
    let store = AnyStore::open(store_url.as_deref(), dir.path()).unwrap();
    let bid = Bid::parse("B1").unwrap();
    let owner = store
        .create_customer(&bid, "Owner", "owner@example.org")
        .unwrap()
        .cid;
    let product = store
        .create_product(
            &bid,
            backoffice::store::NewProduct::new(
                &owner,
                "Tones",
                "flat",
                &examples::module("flat"),
                Amount::from_units(1).unwrap(),
            ),
        )
        .unwrap();
    let credential = store
        .create_meter_for(&bid, &owner, Some(&product.pid))
        .unwrap();
    let now = backoffice::now_ms();
    let customers: Vec<Cid> = (0..customer_count)
        .map(|n| {
            let cid = store
                .create_customer(&bid, "Customer", &format!("c{n}@example.org"))
                .unwrap()
                .cid;
            store
                .create_grant(backoffice::registry::NewGrant {
                    mid: credential.mid,
                    cid,
                    scope: proto::grant::Scope::Machine,
                    label: "bench".into(),
                    created_ms: now,
                    expires_ms: None,
                })
                .unwrap();
            cid
        })
        .collect();
    let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
    backoffice
        .post(
            customers
                .iter()
                .map(|cid| NewTransfer {
                    debit: AccountId::System(SystemAccount::Funding),
                    credit: AccountId::Customer(*cid),
                    amount: Amount::from_units(1_000).unwrap(),
                    kind: TransferKind::Deposit,
                })
                .collect(),
        )
        .unwrap();
    let fsyncs =
        durable::fdatasync_rate(dir.path(), Duration::from_secs(if testing { 0 } else { 2 }))
            .expect("the data folder takes fdatasync");
    let service = std::sync::Arc::new(backoffice::server::Service {
        backoffice,
        bid,
        operator_token: "bench".into(),
        web: backoffice::web::Web::new(backoffice::web::WebConfig {
            phone: String::new(),
            password_iterations: std::num::NonZero::new(1000).unwrap(),
            secure_cookies: false,
            public_url: "http://127.0.0.1".into(),
            outbox: dir.path().join("outbox"),
            shown: Default::default(),
            top_up: false,
        }),
        funding: Box::new(backoffice::funding::RecordedByOperator),
        payments: backoffice::parlayx::Payments::default(),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound, address) = std::sync::mpsc::channel();
    let server = {
        let service = std::sync::Arc::clone(&service);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                bound.send(listener.local_addr().unwrap()).unwrap();
                backoffice::server::run(listener, service, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        })
    };
    let address: SocketAddr = address.recv().unwrap();
    let secret = credential.secret_hex.clone();
    let mid = credential.mid.to_string();

    // The limit beside it: the same clients' round trips for the WSDL.
    let (wsdl_rate, _) = run_clients(
        clients,
        calls,
        |_, _| format!("GET {PATH}?wsdl HTTP/1.1\r\nHost: bench\r\n\r\n"),
        address,
    );
    let started_charges = Instant::now();
    let (charge_rate, latencies) = run_clients(
        clients,
        calls,
        |client, call| {
            let payer = customers[(client * calls + call) % customers.len()];
            let body = envelope(&mid, &secret, client, call, &payer);
            format!(
                "POST {PATH} HTTP/1.1\r\nHost: bench\r\nContent-Type: text/xml; charset=utf-8\r\n\
                 SOAPAction: \"\"\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        },
        address,
    );
    let elapsed = started_charges.elapsed();
    let pick = |fraction: f64| {
        latencies[((latencies.len() - 1) as f64 * fraction).round() as usize].as_secs_f64() * 1e3
    };
    println!(
        "chargeAmount over HTTP ({}): {clients} clients x {calls} charges in {:.2} s: {charge_rate:.0} charges/s \
         (median {:.2} ms, p99 {:.2} ms); limits in the same run: fdatasync {fsyncs:.0}/s in the data folder \
         (charges/fsync {:.2}), GET ?wsdl {wsdl_rate:.0}/s (charges/round trip {:.3})",
        if store_url.is_some() {
            "postgres"
        } else {
            "sled"
        },
        elapsed.as_secs_f64(),
        pick(0.5),
        pick(0.99),
        charge_rate / fsyncs.max(1.0),
        charge_rate / wsdl_rate.max(1.0),
    );
    stop.send(()).unwrap();
    server.join().unwrap();
    // Every charge moved 0.01, once.
    let charged = Amount::parse("0.01")
        .unwrap()
        .checked_mul_count((clients * calls) as u64)
        .unwrap();
    assert_eq!(
        service.backoffice.balance(&AccountId::Customer(owner)),
        charged
    );
    service.backoffice.ledger().verify();
}

/// `clients` threads each send `calls` requests made by `request` on one
/// kept-alive connection: requests per second and every latency, sorted.
fn run_clients(
    clients: usize,
    calls: usize,
    request: impl Fn(usize, usize) -> String + Sync,
    address: SocketAddr,
) -> (f64, Vec<Duration>) {
    let started = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|client| {
                let request = &request;
                scope.spawn(move || {
                    let mut stream = TcpStream::connect(address).unwrap();
                    stream.set_nodelay(true).unwrap();
                    (0..calls)
                        .map(|call| {
                            let text = request(client, call);
                            let begun = Instant::now();
                            stream.write_all(text.as_bytes()).unwrap();
                            let (status, body) = answer(&mut stream);
                            assert_eq!(status, 200, "{body}");
                            begun.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().unwrap())
            .collect()
    });
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    (rate, latencies)
}

/// One HTTP/1.1 answer with a content length: its status and body.
fn answer(stream: &mut TcpStream) -> (u16, String) {
    let mut received = Vec::new();
    let mut chunk = [0u8; 16_384];
    loop {
        let read = stream.read(&mut chunk).unwrap();
        assert!(read > 0, "the backoffice closed the connection");
        received.extend_from_slice(&chunk[..read]);
        if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            while received.len() < end + 4 + length {
                let read = stream.read(&mut chunk).unwrap();
                assert!(read > 0, "the backoffice closed the connection");
                received.extend_from_slice(&chunk[..read]);
            }
            let status = head[9..12].parse().unwrap();
            return (
                status,
                String::from_utf8_lossy(&received[end + 4..]).into_owned(),
            );
        }
    }
}

/// A chargeAmount of 0.01 from `payer`, signed for `mid` with `secret`.
fn envelope(mid: &str, secret: &str, client: usize, call: usize, payer: &Cid) -> String {
    let base64 = base64::engine::general_purpose::STANDARD;
    let nonce = format!("bench-{client:04}-{call:08}");
    let now = backoffice::now_ms();
    let (year, month, day) = proto::time::civil_date(now);
    let seconds = now / 1000 % 86_400;
    let created = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        now % 1000
    );
    let mut digest = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    digest.update(nonce.as_bytes());
    digest.update(created.as_bytes());
    digest.update(secret.as_bytes());
    format!(
        "<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         xmlns:loc=\"{LOCAL}\"><soapenv:Header><wsse:Security xmlns:wsse=\"{WSSE}\" \
         xmlns:wsu=\"{WSU}\"><wsse:UsernameToken><wsse:Username>{mid}</wsse:Username>\
         <wsse:Password Type=\"{DIGEST}\">{}</wsse:Password><wsse:Nonce>{}</wsse:Nonce>\
         <wsu:Created>{created}</wsu:Created></wsse:UsernameToken></wsse:Security>\
         </soapenv:Header><soapenv:Body><loc:chargeAmount><loc:endUserIdentifier>{payer}\
         </loc:endUserIdentifier><loc:charge><description>Tone</description>\
         <currency>EUR</currency><amount>0.01</amount></loc:charge>\
         <loc:referenceCode>bench-{client}-{call}</loc:referenceCode></loc:chargeAmount>\
         </soapenv:Body></soapenv:Envelope>",
        base64.encode(digest.finish()),
        base64.encode(nonce.as_bytes())
    )
}
