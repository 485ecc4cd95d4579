//! A stand-in backoffice that speaks the `send` contract, for testing the
//! meter until the real one exists: it verifies signatures, applies each batch
//! id once (a batch id sent again with other readings is refused with 205,
//! as the real one does), records what it applied, answers status tables,
//! and fails, loses answers or answers 205 on demand. It also makes grants:
//! `grant.password` with the passwords a test sets, and the device flow
//! (`grant.request`, `grant.poll`) with codes a test approves or denies.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header::CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use proto::auth::{ANSWER_SIGNATURE_HEADER, MID_HEADER, SIGNATURE_HEADER, Secret, TIME_HEADER};
use proto::grant::{
    DeviceCode, GrantInfo, GrantRequest, PasswordGrant, PollStatus, poll_from_call,
};
use proto::reading::Reading;
use proto::upload::{MeterParams, Outcome, SendAnswer, SendBody, SendRequest, Standing};
use proto::xmlrpc::{Limits, MethodCall, Value, encode_fault, encode_response, parse_call};
use proto::{BatchId, Cid, Fault, FaultCode, Mid, Payer};

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
    /// Answer every batch with readings with fault 205, applying nothing.
    pub conflict: bool,
    /// Customers' passwords for `grant.password`.
    pub passwords: HashMap<Cid, String>,
    /// The poll interval answered to `grant.request`.
    pub grant_interval_s: u64,
    /// The lifetime of device codes.
    pub grant_expires_in_s: u64,
    /// How far this backoffice's clock is ahead of the machine's (ms; may
    /// be negative): a signature more than 5 minutes from it gets fault
    /// 209, as from the real backoffice.
    pub clock_offset_ms: i64,
    /// How answers to meters are signed.
    pub answers: Answers,
    /// Refuse packed readings as a backoffice older than that form does.
    pub structs_only: bool,
}

/// How the stand-in signs its answers to meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answers {
    /// As the backoffice does.
    Signed,
    /// Not at all, as a man in the middle would answer.
    Unsigned,
    /// With the meter's secret, but for another call (a replayed answer).
    SignedForAnotherCall,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            down: false,
            lose_answers: false,
            conflict: false,
            passwords: HashMap::new(),
            grant_interval_s: 1,
            grant_expires_in_s: 600,
            clock_offset_ms: 0,
            answers: Answers::Signed,
            structs_only: false,
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
    /// Sends (signature checked) whose readings came packed.
    pub packed_sends: usize,
    /// Sends (signature checked) whose readings came as structs.
    pub struct_sends: usize,
    /// Packed sends refused as a backoffice older than that form refuses them.
    pub packed_refused: usize,
    /// Batches refused with 205.
    pub conflicts: Vec<BatchId>,
    /// Grants made, per meter.
    pub grants: Vec<(Mid, GrantInfo)>,
    /// Grant calls refused (wrong password, unknown code).
    pub grants_refused: usize,
    /// Device requests made, in order.
    pub device_requests: Vec<GrantRequest>,
}

/// A device code's state.
#[derive(Debug, Clone)]
enum Device {
    Pending,
    Approved(GrantInfo),
    Denied,
    /// Answered to the meter once: a code is single-use.
    Used,
}

#[derive(Debug, Clone)]
struct DeviceEntry {
    mid: Mid,
    request: GrantRequest,
    user_code: String,
    state: Device,
}

#[derive(Default)]
struct Shared {
    behaviour: Behaviour,
    ledger: Ledger,
    devices: HashMap<String, DeviceEntry>,
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
            .route("/RPC2", post(rpc))
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

    /// Approves the device request whose user code is `user_code`, as the
    /// customer would on the web pages, with an optional expiry; false when
    /// no pending request has that code.
    pub fn approve(&self, user_code: &str, expires_ms: Option<u64>) -> bool {
        self.answer_device(user_code, |entry| {
            Device::Approved(GrantInfo {
                cid: entry.request.cid,
                scope: entry.request.scope.clone(),
                created_ms: now_ms(),
                expires_ms,
            })
        })
    }

    /// Denies the device request whose user code is `user_code`.
    pub fn deny(&self, user_code: &str) -> bool {
        self.answer_device(user_code, |_| Device::Denied)
    }

    fn answer_device(&self, user_code: &str, answer: impl FnOnce(&DeviceEntry) -> Device) -> bool {
        let mut shared = lock(&self.shared);
        let Some(entry) = shared
            .devices
            .values_mut()
            .find(|entry| entry.user_code == user_code && matches!(entry.state, Device::Pending))
        else {
            return false;
        };
        entry.state = answer(entry);
        if let Device::Approved(grant) = &entry.state {
            let made = (entry.mid, grant.clone());
            shared.ledger.grants.push(made);
        }
        true
    }

    fn verify(&self, headers: &HeaderMap, body: &[u8], mid: &Mid) -> Result<(), Fault> {
        let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
        let secret = self
            .secrets
            .get(mid)
            .ok_or_else(|| Fault::new(FaultCode::UnknownMeter, "unknown MID"))?;
        let claimed = header(MID_HEADER).and_then(|text| Mid::parse(text).ok());
        let time_ms: Option<u64> = header(TIME_HEADER).and_then(|text| text.parse().ok());
        let signature = header(SIGNATURE_HEADER);
        let offset_ms = lock(&self.shared).behaviour.clock_offset_ms;
        let clock_ms = now_ms().saturating_add_signed(offset_ms);
        match (claimed, time_ms, signature) {
            (Some(_), Some(time_ms), Some(_)) if time_ms.abs_diff(clock_ms) > 5 * 60 * 1000 => {
                Err(Fault::new(
                    FaultCode::ClockSkew,
                    format!(
                        "the meter's clock is {} s off the backoffice's",
                        time_ms.abs_diff(clock_ms) / 1000
                    ),
                ))
            }
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Signs an answer to a meter's call as the backoffice does: with the
/// secret of the MID in the call's headers, over the call's signature and
/// the answer's body (unless the behaviour says otherwise).
async fn rpc(State(server): State<FakeBackoffice>, headers: HeaderMap, body: Bytes) -> Response {
    let response = answer_rpc(&server, &headers, &body);
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let signer = header(MID_HEADER)
        .and_then(|mid| Mid::parse(mid).ok())
        .and_then(|mid| server.secrets.get(&mid).cloned())
        .zip(header(SIGNATURE_HEADER));
    let answers = lock(&server.shared).behaviour.answers;
    let (parts, answer) = response.into_parts();
    let Ok(answer) = axum::body::to_bytes(answer, usize::MAX).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "unreadable answer").into_response();
    };
    let mut response = Response::from_parts(parts, axum::body::Body::from(answer.clone()));
    let signature = match (answers, signer) {
        (Answers::Signed, Some((secret, call))) => Some(secret.sign_answer(call, &answer)),
        (Answers::SignedForAnotherCall, Some((secret, call))) => {
            Some(secret.sign_answer(&format!("{call}0"), &answer))
        }
        _ => None,
    };
    if let Some(signature) = signature {
        response.headers_mut().insert(
            ANSWER_SIGNATURE_HEADER,
            signature.parse().expect("hex is a valid header value"),
        );
    }
    response
}

fn answer_rpc(server: &FakeBackoffice, headers: &HeaderMap, body: &[u8]) -> Response {
    let call = match parse_call(body, Limits::BACKOFFICE) {
        Ok(call) => call,
        Err(error) => return xml(StatusCode::OK, encode_fault(&Fault::from(error))),
    };
    let granted = match call.name.as_str() {
        "send" => return send(server, headers, body, &call),
        proto::grant::REQUEST_METHOD => grant_request(server, headers, body, &call),
        proto::grant::POLL_METHOD => grant_poll(server, headers, body, &call),
        proto::grant::PASSWORD_METHOD => grant_password(server, headers, body, &call),
        other => Err(Fault::method_not_found(other)),
    };
    match granted {
        Ok(value) => xml(StatusCode::OK, encode_response(&value)),
        Err(fault) => xml(StatusCode::OK, encode_fault(&fault)),
    }
}

fn refused(server: &FakeBackoffice, message: &str) -> Fault {
    lock(&server.shared).ledger.grants_refused += 1;
    Fault::new(FaultCode::GrantRefused, message)
}

fn grant_request(
    server: &FakeBackoffice,
    headers: &HeaderMap,
    body: &[u8],
    call: &MethodCall,
) -> Result<Value, Fault> {
    let request = GrantRequest::from_call(call)?;
    server.verify(headers, body, &request.mid)?;
    let mut shared = lock(&server.shared);
    let n = shared.devices.len() + 1;
    let device_code = format!("device-{n}-{}", now_ms());
    let user_code = format!("CODE-{n:04}");
    let answer = DeviceCode {
        device_code: device_code.clone(),
        user_code: user_code.clone(),
        verification_uri: "http://backoffice.test/grant".to_owned(),
        expires_in_s: shared.behaviour.grant_expires_in_s,
        interval_s: shared.behaviour.grant_interval_s,
    };
    shared.ledger.device_requests.push(request.clone());
    shared.devices.insert(
        device_code,
        DeviceEntry {
            mid: request.mid,
            request,
            user_code,
            state: Device::Pending,
        },
    );
    Ok(answer.to_value())
}

fn grant_poll(
    server: &FakeBackoffice,
    headers: &HeaderMap,
    body: &[u8],
    call: &MethodCall,
) -> Result<Value, Fault> {
    let (mid, device_code) = poll_from_call(call)?;
    server.verify(headers, body, &mid)?;
    let mut shared = lock(&server.shared);
    let Some(entry) = shared
        .devices
        .get_mut(&device_code)
        .filter(|entry| entry.mid == mid)
    else {
        drop(shared);
        return Err(refused(server, "unknown device code"));
    };
    let status = match std::mem::replace(&mut entry.state, Device::Used) {
        Device::Pending => {
            entry.state = Device::Pending;
            PollStatus::Pending
        }
        Device::Approved(grant) => PollStatus::Approved(grant),
        Device::Denied => PollStatus::Denied,
        Device::Used => PollStatus::Expired,
    };
    Ok(status.to_value())
}

fn grant_password(
    server: &FakeBackoffice,
    headers: &HeaderMap,
    body: &[u8],
    call: &MethodCall,
) -> Result<Value, Fault> {
    let grant = PasswordGrant::from_call(call)?;
    let request = &grant.request;
    server.verify(headers, body, &request.mid)?;
    let known = lock(&server.shared)
        .behaviour
        .passwords
        .get(&request.cid)
        .cloned();
    if known.as_deref() != Some(grant.password.as_str()) {
        return Err(refused(server, "wrong password or unknown customer"));
    }
    let created_ms = now_ms();
    let info = GrantInfo {
        cid: request.cid,
        scope: request.scope.clone(),
        created_ms,
        expires_ms: grant
            .expires_in_s
            .map(|seconds| created_ms + seconds * 1000),
    };
    lock(&server.shared)
        .ledger
        .grants
        .push((request.mid, info.clone()));
    Ok(info.to_value())
}

fn send(server: &FakeBackoffice, headers: &HeaderMap, body: &[u8], call: &MethodCall) -> Response {
    let packed = call
        .params
        .get(1)
        .is_some_and(|batch| batch.member("packedReadings").is_some());
    if packed && lock(&server.shared).behaviour.structs_only {
        lock(&server.shared).ledger.packed_refused += 1;
        // What a backoffice before the packed form answers (signed, as any
        // answer to a call that names a meter).
        let fault = Fault::invalid_params(proto::upload::NO_READINGS_ARRAY);
        return xml(StatusCode::OK, encode_fault(&fault));
    }
    let request = match SendRequest::from_call(call) {
        Ok(request) => request,
        Err(fault) => return xml(StatusCode::OK, encode_fault(&fault)),
    };
    if let Err(fault) = server.verify(headers, body, &request.mid) {
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
    if packed {
        shared.ledger.packed_sends += 1;
    } else {
        shared.ledger.struct_sends += 1;
    }
    if shared.behaviour.down {
        return (StatusCode::SERVICE_UNAVAILABLE, "down on purpose").into_response();
    }
    let earlier = shared
        .ledger
        .applied
        .iter()
        .find(|(id, _)| *id == batch.id)
        .map(|(_, readings)| readings);
    let conflict = match earlier {
        Some(readings) => *readings != batch.readings,
        None => shared.behaviour.conflict && !batch.readings.is_empty(),
    };
    if conflict {
        shared.ledger.conflicts.push(batch.id.clone());
        let fault = Fault::new(
            FaultCode::BatchConflict,
            format!("batch {} was applied with other readings", batch.id),
        );
        return xml(StatusCode::OK, encode_fault(&fault));
    }
    let already = earlier.is_some();
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
