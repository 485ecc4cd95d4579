//! A stand-in backoffice that speaks the `send` contract, for testing the
//! meter until the real one exists: it verifies signatures, applies each batch
//! id once, records what it applied, answers status tables, and fails or
//! loses answers on demand.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header::CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use proto::auth::{MID_HEADER, SIGNATURE_HEADER, Secret, TIME_HEADER};
use proto::reading::Reading;
use proto::upload::{MeterParams, Outcome, SendAnswer, SendBody, SendRequest, Standing};
use proto::xmlrpc::{Limits, encode_fault, encode_response, parse_call};
use proto::{BatchId, Fault, FaultCode, Mid, Payer};

/// How the stand-in behaves; change it while a test runs.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Answer 503 without applying anything.
    pub down: bool,
    /// Apply the batch, then answer 502 as if the answer were lost.
    pub lose_answers: bool,
    /// Parties answered as denied.
    pub denied: HashSet<Payer>,
    /// The upload parameters to program into meters.
    pub params: MeterParams,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            down: false,
            lose_answers: false,
            denied: HashSet::new(),
            params: MeterParams {
                flush_readings_max: 1_000_000,
                flush_interval_s: 3_600,
                status_stale_max_s: 86_400,
                unknown_uses_max: 1_000_000,
            },
        }
    }
}

/// What the stand-in saw.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Batches applied, in order, with their readings.
    pub applied: Vec<(BatchId, Vec<Reading>)>,
    /// Every `send` that passed signature checks, per batch id.
    pub attempts: HashMap<BatchId, usize>,
    /// Sends refused for their signature.
    pub forged: usize,
}

#[derive(Default)]
struct Shared {
    behaviour: Behaviour,
    ledger: Ledger,
}

/// A handle on a running stand-in.
#[derive(Clone)]
pub struct FakeBackoffice {
    shared: Arc<Mutex<Shared>>,
    secrets: Arc<HashMap<Mid, Secret>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FakeBackoffice {
    /// A stand-in that knows these meters.
    pub fn new(secrets: HashMap<Mid, Secret>) -> Self {
        Self {
            shared: Arc::default(),
            secrets: Arc::new(secrets),
        }
    }

    /// Serves on `listener` (run it on a tokio runtime).
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let router = Router::new()
            .route("/RPC2", post(send))
            .layer(DefaultBodyLimit::max(Limits::BACKOFFICE.body_bytes_max))
            .with_state(self);
        axum::serve(listener, router).await
    }

    /// Starts serving on a free loopback port in a thread of its own; returns
    /// the address.
    pub fn spawn(&self) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let address = listener.local_addr().expect("bound address");
        let server = self.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                server.serve(listener).await
            })
        });
        address
    }

    /// Changes the behaviour.
    pub fn behave(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut lock(&self.shared).behaviour);
    }

    /// Reads what was recorded.
    pub fn ledger<T>(&self, read: impl FnOnce(&Ledger) -> T) -> T {
        read(&lock(&self.shared).ledger)
    }

    /// Every reading applied, in order.
    pub fn applied_readings(&self) -> Vec<Reading> {
        self.ledger(|ledger| {
            ledger
                .applied
                .iter()
                .flat_map(|(_, readings)| readings.iter().cloned())
                .collect()
        })
    }

    fn verify(&self, headers: &HeaderMap, body: &[u8], mid: &Mid) -> Result<(), Fault> {
        let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
        let secret = self
            .secrets
            .get(mid)
            .ok_or_else(|| Fault::new(FaultCode::UnknownMeter, "unknown MID"))?;
        let claimed = header(MID_HEADER).and_then(|text| Mid::parse(text).ok());
        let time_ms = header(TIME_HEADER).and_then(|text| text.parse().ok());
        let signature = header(SIGNATURE_HEADER);
        match (claimed, time_ms, signature) {
            (Some(claimed), Some(time_ms), Some(signature)) if claimed == *mid => secret
                .verify(mid, time_ms, body, signature)
                .map_err(|error| Fault::new(FaultCode::BadSignature, error.to_string())),
            _ => Err(Fault::new(
                FaultCode::BadSignature,
                "missing or mismatched signature headers",
            )),
        }
    }
}

fn xml(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(CONTENT_TYPE, "text/xml")], body).into_response()
}

async fn send(State(server): State<FakeBackoffice>, headers: HeaderMap, body: Bytes) -> Response {
    let call = match parse_call(&body, Limits::BACKOFFICE) {
        Ok(call) => call,
        Err(error) => return xml(StatusCode::OK, encode_fault(&Fault::from(error))),
    };
    let request = match SendRequest::from_call(&call) {
        Ok(request) => request,
        Err(fault) => return xml(StatusCode::OK, encode_fault(&fault)),
    };
    if let Err(fault) = server.verify(&headers, &body, &request.mid) {
        lock(&server.shared).ledger.forged += 1;
        return xml(StatusCode::OK, encode_fault(&fault));
    }
    let SendBody::Batch(batch) = request.body else {
        let fault = Fault::new(
            FaultCode::InvalidRequest,
            "the stand-in takes only the extended form",
        );
        return xml(StatusCode::OK, encode_fault(&fault));
    };
    let mut shared = lock(&server.shared);
    *shared.ledger.attempts.entry(batch.id.clone()).or_default() += 1;
    if shared.behaviour.down {
        return (StatusCode::SERVICE_UNAVAILABLE, "down on purpose").into_response();
    }
    let already = shared.ledger.applied.iter().any(|(id, _)| *id == batch.id);
    let payers: HashSet<Payer> = batch
        .readings
        .iter()
        .filter_map(|reading| reading.event.payer())
        .collect();
    if !already && !batch.readings.is_empty() {
        shared
            .ledger
            .applied
            .push((batch.id.clone(), batch.readings));
    }
    if shared.behaviour.lose_answers {
        return (StatusCode::BAD_GATEWAY, "answer lost on purpose").into_response();
    }
    let mut standings: Vec<Standing> = payers
        .into_iter()
        .map(|party| Standing {
            party,
            allowed: !shared.behaviour.denied.contains(&party),
        })
        .collect();
    standings.extend(shared.behaviour.denied.iter().map(|&party| Standing {
        party,
        allowed: false,
    }));
    // Denied sorts first, so it wins over allowed for the same party.
    standings.sort_by_key(|standing| (standing.party, standing.allowed));
    standings.dedup_by_key(|standing| standing.party);
    let answer = SendAnswer {
        batch_id: batch.id,
        outcome: if already {
            Outcome::AlreadyApplied
        } else {
            Outcome::Applied
        },
        standings,
        params: shared.behaviour.params,
    };
    xml(StatusCode::OK, encode_response(&answer.to_value()))
}
