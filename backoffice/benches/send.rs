//! `send` end to end in process: parse, verify the signature, price every
//! commit with the flat TACA, post, make the batch durable, answer. Two
//! meters send 10,000-reading batches at once, payers spread over 1,000
//! customers. Prints readings per second and batch latency (median, p99),
//! and the latency of deposits made meanwhile (one every 20 ms): what a
//! batch's hold on the ledger costs everyone else.
//!
//! `cargo bench -p backoffice --bench send` (BATCHES per meter: env
//! `SEND_BENCH_BATCHES`, default 10; under `cargo test` it runs 1). With
//! `SEND_BENCH_HTTP=1` the meters POST to the backoffice's own HTTP server on
//! loopback instead of calling `send` in process (the smoke run always does).
//! `SEND_BENCH_METERS=N` sends from N meters (default 2; over HTTP at most
//! `METER_CALLS_PER_ADDRESS_MAX`, since they all send from 127.0.0.1);
//! `SEND_BENCH_PAYERS=own` gives each meter payers of its own (as machines
//! of different customers have) instead of every payer on every meter.
//! With `BENCH_STORE=postgres://...`, `SEND_BENCH_NODES=N` opens N
//! backoffices (nodes, each with its own connections) on the one database
//! and sends meter m's batches to node m modulo N (in process).
//! `SEND_BENCH_PERF_CONTROL=FIFO` writes `enable` and `disable` to perf's
//! control FIFO around the timed part (`perf record -D -1 --control
//! fifo:FIFO ...`), so that a profile leaves out the setup.
//! Readings go packed, as meterd sends them; `SEND_BENCH_FORM=structs`
//! sends them as an array of structs instead (Cox's members, any client).

use std::time::{Duration, Instant};

use backoffice::ledger::{AccountId, NewTransfer, SystemAccount, TransferKind};
use backoffice::send::{Backoffice, DEFAULT_PARAMS, Signed};
use backoffice::store::{AnyStore, Store};
use proto::auth::Secret;
use proto::reading::{Event, Reading};
use proto::upload::{Batch, ReadingsForm, SendBody, SendRequest};
use proto::xmlrpc::encode_call;
use proto::{Amount, BatchId, Bid, Cid, Context, Mid, Payer};

#[path = "../tests/it/examples.rs"]
mod examples;

/// A body with the time and signature its meter sends with it.
type SignedBody = (Vec<u8>, String, String);

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` runs this without it.
    let testing = !std::env::args().any(|arg| arg == "--bench");
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    // Under `cargo test` a smoke run: small batches, few customers.
    let (batches, readings_per_batch, customer_count) = if testing {
        (1, 200, 20)
    } else {
        let batches = std::env::var("SEND_BENCH_BATCHES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(10);
        (batches, 10_000, 1_000)
    };
    let dir = tempfile::tempdir().unwrap();
    // BENCH_STORE=postgres://... measures the PostgreSQL store (an empty
    // database); by default the sled store in a temporary folder.
    let store = AnyStore::open(std::env::var("BENCH_STORE").ok().as_deref(), dir.path()).unwrap();
    let bid = Bid::parse("B1").unwrap();
    let customers: Vec<Cid> = (0..customer_count)
        .map(|n| {
            store
                .create_customer(&bid, "Customer", &format!("c{n}@example.org"))
                .unwrap()
                .cid
        })
        .collect();
    let owner = customers[0];
    let product = store
        .create_product(
            &bid,
            backoffice::store::NewProduct::new(
                &owner,
                "Editor",
                "flat",
                &examples::module("flat"),
                proto::Amount::from_units(1).unwrap(),
            ),
        )
        .unwrap();
    let meter_count: usize = std::env::var("SEND_BENCH_METERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2);
    let own_payers = std::env::var("SEND_BENCH_PAYERS").is_ok_and(|value| value == "own");
    let meters: Vec<(Mid, Secret)> = (0..meter_count)
        .map(|_| {
            let meter = store.create_meter(&bid, &owner).unwrap();
            (meter.mid, Secret::new(meter.secret_hex.as_bytes()).unwrap())
        })
        .collect();
    // Every customer lets both meters charge them.
    for (mid, _) in &meters {
        for cid in &customers {
            store
                .create_grant(backoffice::registry::NewGrant {
                    mid: *mid,
                    cid: *cid,
                    scope: proto::grant::Scope::Machine,
                    label: "bench".into(),
                    created_ms: 0,
                    expires_ms: None,
                })
                .unwrap();
        }
    }
    let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
    let node_count: usize = std::env::var("SEND_BENCH_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
        .max(1);
    let deposits = customers
        .iter()
        .map(|cid| NewTransfer {
            debit: AccountId::System(SystemAccount::Funding),
            credit: AccountId::Customer(*cid),
            amount: Amount::from_units(1_000_000).unwrap(),
            kind: TransferKind::Deposit,
        })
        .collect();
    backoffice.post(deposits).unwrap();
    // The other nodes, opened once the setup is stored (they load it).
    let other_nodes: Vec<Backoffice<AnyStore>> = (1..node_count)
        .map(|node| {
            let url = std::env::var("BENCH_STORE").expect("several nodes share a PostgreSQL store");
            let dir = dir.path().join(format!("node-{node}"));
            std::fs::create_dir_all(&dir).unwrap();
            Backoffice::open(AnyStore::open(Some(&url), &dir).unwrap(), DEFAULT_PARAMS).unwrap()
        })
        .collect();
    // The real time: over HTTP the server checks signatures against its clock.
    let now_ms = backoffice::now_ms();
    let form = match std::env::var("SEND_BENCH_FORM").as_deref() {
        Ok("structs") => ReadingsForm::Structs,
        Ok("packed") | Err(_) => ReadingsForm::Packed,
        Ok(other) => panic!("SEND_BENCH_FORM is packed or structs, not {other:?}"),
    };
    let bodies = |meter: usize, mid: Mid| -> Vec<Vec<u8>> {
        (0..batches)
            .map(|index| {
                let readings = (0..readings_per_batch)
                    .map(|offset| {
                        let seq = (index * readings_per_batch + offset) as u64 + 1;
                        let payers = customer_count - 1;
                        let slot = if own_payers {
                            // Meter m's payers: those whose number is m
                            // modulo the meters.
                            let share = payers / meter_count;
                            meter + meter_count * ((seq as usize) % share)
                        } else {
                            (seq as usize) % payers
                        };
                        let payer = customers[1 + slot];
                        Reading {
                            seq,
                            time_ms: now_ms - 1000,
                            context: Context::parse("42.7").unwrap(),
                            event: Event::Commit {
                                pid: product.pid,
                                payer: Some(Payer::Customer(payer)),
                            },
                        }
                    })
                    .collect();
                let id =
                    BatchId::parse(&format!("{mid}:{}", index * readings_per_batch + 1)).unwrap();
                let request = SendRequest {
                    mid,
                    body: SendBody::Batch(Batch {
                        id,
                        readings,
                        parties: Vec::new(),
                    }),
                };
                encode_call("send", &request.to_params_in(form))
            })
            .collect()
    };
    // Each body signed as its meter signs it, before the clock starts: the
    // signing is the meter's work, not the backoffice's.
    let mut body_bytes = 0usize;
    let work: Vec<(Mid, Vec<SignedBody>)> = meters
        .iter()
        .enumerate()
        .map(|(meter, (mid, secret))| {
            let signed = bodies(meter, *mid)
                .into_iter()
                .enumerate()
                .map(|(index, body)| {
                    body_bytes += body.len();
                    let time_ms = now_ms + index as u64;
                    let signature = secret.sign(mid, time_ms, &body);
                    (body, time_ms.to_string(), signature)
                })
                .collect();
            (*mid, signed)
        })
        .collect();
    // The smoke run under `cargo test` goes over HTTP, which the tests of
    // `send` itself do not.
    let http = std::env::var("SEND_BENCH_HTTP").map_or(testing, |value| value == "1");
    assert!(
        !http || meter_count <= backoffice::listen::METER_CALLS_PER_ADDRESS_MAX,
        "over HTTP at most {} meters: the backoffice answers more calls at once from one \
         address 503",
        backoffice::listen::METER_CALLS_PER_ADDRESS_MAX
    );
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
    let (stop, server) = if http {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, address) = std::sync::mpsc::channel();
        let service = std::sync::Arc::clone(&service);
        let server = std::thread::spawn(move || {
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
        });
        (Some((stop, address.recv().unwrap())), Some(server))
    } else {
        (None, None)
    };
    let address = stop.as_ref().map(|(_, address)| *address);
    let perf_control = std::env::var("SEND_BENCH_PERF_CONTROL").ok();
    let perf = |command: &str| {
        if let Some(fifo) = &perf_control {
            std::fs::write(fifo, format!("{command}\n")).expect("perf's control FIFO");
        }
    };
    perf("enable");
    let started = Instant::now();
    let cpu_started = cpu_seconds();
    let sending = std::sync::atomic::AtomicBool::new(true);
    let mut deposit_latencies: Vec<Duration> = Vec::new();
    let latencies: Vec<Duration> = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let mut waits = Vec::new();
            while sending.load(std::sync::atomic::Ordering::Relaxed) {
                let begun = Instant::now();
                service
                    .backoffice
                    .post(vec![NewTransfer {
                        debit: AccountId::System(SystemAccount::Funding),
                        credit: AccountId::Customer(owner),
                        amount: Amount::from_units(1).unwrap(),
                        kind: TransferKind::Deposit,
                    }])
                    .expect("deposit posted");
                waits.push(begun.elapsed());
                std::thread::sleep(Duration::from_millis(20));
            }
            waits
        });
        let handles: Vec<_> = work
            .iter()
            .enumerate()
            .map(|(meter, (mid, bodies))| {
                let backoffice = match meter % node_count {
                    0 => &service.backoffice,
                    node => &other_nodes[node - 1],
                };
                scope.spawn(move || {
                    let mut connection = address.map(|address| {
                        let stream = std::net::TcpStream::connect(address)
                            .expect("connect to the backoffice");
                        // As meterd's client: no wait for an acknowledgment
                        // before the last segment of a call.
                        stream.set_nodelay(true).expect("TCP_NODELAY");
                        stream
                    });
                    bodies
                        .iter()
                        .map(|(body, time, signature)| {
                            let begun = Instant::now();
                            match &mut connection {
                                Some(stream) => post(stream, mid, time, signature, body),
                                None => {
                                    let signed = Signed {
                                        mid: Some(mid.as_str()),
                                        time: Some(time),
                                        signature: Some(signature),
                                    };
                                    backoffice
                                        .send(body, signed, now_ms)
                                        .expect("batch applied");
                                }
                            }
                            begun.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let sent: Vec<_> = handles.into_iter().map(|handle| handle.join()).collect();
        // The prober stops even when a meter failed, so that the failure
        // ends the run instead of leaving it waiting for ever.
        sending.store(false, std::sync::atomic::Ordering::Relaxed);
        deposit_latencies = prober.join().unwrap();
        sent.into_iter()
            .flat_map(|latencies| latencies.expect("a meter's sends all applied"))
            .collect::<Vec<_>>()
    });
    let elapsed = started.elapsed().as_secs_f64();
    perf("disable");
    let cpu = cpu_started
        .zip(cpu_seconds())
        .map(|(before, after)| after - before);
    let mut sorted = latencies;
    sorted.sort_unstable();
    let total = readings_per_batch * sorted.len();
    let pick = |fraction: f64| sorted[((sorted.len() - 1) as f64 * fraction).round() as usize];
    deposit_latencies.sort_unstable();
    let deposit_pick = |fraction: f64| {
        deposit_latencies[((deposit_latencies.len() - 1) as f64 * fraction).round() as usize]
    };
    println!(
        "send{} ({form:?}, {:.1} bytes per reading): {} batches of {readings_per_batch} readings from {meter_count} meters ({} payers) to {node_count} node(s), {customer_count} customers: {:.0} readings/s; batch latency median {:.1} ms, p99 {:.1} ms; {} deposits meanwhile: median {:.1} ms, p99 {:.1} ms",
        if http { " over HTTP" } else { "" },
        body_bytes as f64 / total as f64,
        sorted.len(),
        if own_payers { "own" } else { "shared" },
        total as f64 / elapsed,
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3,
        deposit_latencies.len(),
        deposit_pick(0.5).as_secs_f64() * 1e3,
        deposit_pick(0.99).as_secs_f64() * 1e3,
    );
    // CPU per reading moves less than readings per second on a shared
    // machine (time stolen by other guests is not counted).
    if let Some(cpu) = cpu {
        println!(
            "cpu: {:.2} us per reading ({:.2} cores busy on average)",
            cpu * 1e6 / total as f64,
            cpu / elapsed
        );
    }
    // Where a batch's time went, on average (node 0's batches).
    let counters = service.backoffice.counters();
    let applied = counters
        .batches_applied
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(1);
    let phases: Vec<String> = backoffice::send::Phase::ALL
        .iter()
        .zip(&counters.batch_phase_ns)
        .map(|(phase, ns)| {
            let ns = ns.load(std::sync::atomic::Ordering::Relaxed);
            format!("{} {:.1}", phase.name(), ns as f64 / applied as f64 / 1e6)
        })
        .collect();
    println!("phases, ms per batch: {}", phases.join(", "));
    if let (Some((stop, _)), Some(server)) = (stop, server) {
        stop.send(()).unwrap();
        server.join().unwrap();
    }
    service.backoffice.ledger().verify();
    for node in &other_nodes {
        assert_eq!(
            node.ledger().transfers().len(),
            service.backoffice.ledger().transfers().len(),
            "every node sees one ledger"
        );
    }
    assert_eq!(
        service.backoffice.store().suspense_count().unwrap(),
        0,
        "every use was priced and posted"
    );
}

/// CPU seconds (user and system) this process has used, from Linux's
/// `/proc/self/stat` (in ticks of 1/100 s); `None` elsewhere.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the parenthesised name, the state is field 3; user and system
    // time are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}

/// POSTs one signed body on a kept-alive connection and checks the answer.
fn post(stream: &mut std::net::TcpStream, mid: &Mid, time: &str, signature: &str, body: &[u8]) {
    use std::io::{Read, Write};
    let head = format!(
        "POST /RPC2 HTTP/1.1\r\nHost: bench\r\nContent-Type: text/xml\r\n{}: {mid}\r\n{}: {time}\r\n{}: {signature}\r\nContent-Length: {}\r\n\r\n",
        proto::auth::MID_HEADER,
        proto::auth::TIME_HEADER,
        proto::auth::SIGNATURE_HEADER,
        body.len()
    );
    // Head and body in one write, as meterd's HTTP client sends them.
    let mut call = Vec::with_capacity(head.len() + body.len());
    call.extend_from_slice(head.as_bytes());
    call.extend_from_slice(body);
    stream.write_all(&call).unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 65536];
    let (head_end, length) = loop {
        let read = stream.read(&mut chunk).unwrap();
        assert!(read > 0, "the backoffice closed the connection");
        answer.extend_from_slice(&chunk[..read]);
        if let Some(end) = answer.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .expect("a content length")
                .trim()
                .parse()
                .unwrap();
            break (end + 4, length);
        }
    };
    while answer.len() < head_end + length {
        let read = stream.read(&mut chunk).unwrap();
        assert!(read > 0, "the backoffice closed the connection");
        answer.extend_from_slice(&chunk[..read]);
    }
    let text = String::from_utf8_lossy(&answer[head_end..]);
    assert!(!text.contains("<fault>"), "{text}");
}
