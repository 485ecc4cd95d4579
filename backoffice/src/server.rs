//! The backoffice's XML-RPC server: `POST /RPC2` with `send` for meters and
//! the operator's calls, which need the operator token (`X-Operator-Token`).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::{CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use proto::auth::{MID_HEADER, SIGNATURE_HEADER, TIME_HEADER};
use proto::params::Params;
use proto::xmlrpc::{
    Limits, MethodCall, Value, encode_fault, encode_response, method_name, parse_call,
};
use proto::{Amount, Bid, Cid, Fault, FaultCode};

use crate::ledger::{AccountId, TransferKind};
use crate::pricing::Pricing;
use crate::send::{Backoffice, Signed, Verified};
use crate::store::{AnyStore, Store, StoreError, SuspenseCursor};

/// The header that carries the operator token.
pub const OPERATOR_HEADER: &str = "x-operator-token";
/// Longest the server waits for calls in flight at shutdown.
pub const SHUTDOWN_GRACE_MS: u64 = 5_000;

/// What the server needs.
pub struct Service {
    /// The money path and the store.
    pub backoffice: Backoffice<AnyStore>,
    /// This branch.
    pub bid: Bid,
    /// The token operator calls must carry.
    pub operator_token: String,
    /// The web pages.
    pub web: crate::web::Web,
    /// Where deposits are collected from.
    pub funding: Box<dyn crate::funding::MacroAccounts>,
    /// The Parlay X Payment interfaces.
    pub payments: crate::parlayx::Payments,
}

use crate::now_ms;

/// How often expired holds get their expiry written (they hold nothing
/// from their expiry on, written or not).
pub const HOLD_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes the expiry of holds past their time every `HOLD_SWEEP_INTERVAL`,
/// on a thread of its own, while the service lives: expiry happens whether
/// or not anyone calls.
pub fn sweep_expired_holds(service: std::sync::Weak<Service>) {
    let spawned = std::thread::Builder::new()
        .name("hold-expiry".into())
        .spawn(move || {
            while let Some(service) = service.upgrade() {
                match service.backoffice.expire_holds(now_ms()) {
                    Ok(0) => {}
                    Ok(expired) => tracing::info!(expired, "holds expired"),
                    Err(fault) => {
                        tracing::error!(fault = %fault.message, "writing expired holds failed")
                    }
                }
                drop(service);
                std::thread::sleep(HOLD_SWEEP_INTERVAL);
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the sweep of expired holds");
    }
}

/// Meter calls (uploads and grant calls) read and answered at once; more
/// are answered 503 with `Retry-After` before their body is read.
pub const METER_CALLS_AT_ONCE: usize = 8;
/// Operator calls read and answered at once; more get 503 likewise.
pub const OPERATOR_CALLS_AT_ONCE: usize = 4;
/// What a call refused for lack of a slot is told to wait, in seconds.
pub const RETRY_AFTER_S: u64 = 1;
/// How long a caller has to send its whole body once its headers are in.
pub const BODY_READ_TIMEOUT_MS: u64 = 30_000;

/// The slots of `/RPC2` calls: each one holds at most one maximum-size body
/// in memory, so these bound what callers can make the server hold.
struct Slots {
    meter: Arc<tokio::sync::Semaphore>,
    operator: Arc<tokio::sync::Semaphore>,
    /// Meter calls per address.
    meter_by_address: Arc<crate::listen::PerAddress>,
    /// How long a body may take once its head is in.
    body_read: std::time::Duration,
}

/// The router: `POST /RPC2` and the web pages, with the documented limits.
pub fn router(service: Arc<Service>) -> Router {
    router_with(service, crate::listen::ConnectionLimits::default())
}

/// The router, its bodies and pages timed by `limits`.
pub fn router_with(service: Arc<Service>, limits: crate::listen::ConnectionLimits) -> Router {
    let slots = Arc::new(Slots {
        meter: Arc::new(tokio::sync::Semaphore::new(METER_CALLS_AT_ONCE)),
        operator: Arc::new(tokio::sync::Semaphore::new(OPERATOR_CALLS_AT_ONCE)),
        meter_by_address: crate::listen::PerAddress::new(limits.meter_calls_per_address),
        body_read: limits.body_read,
    });
    Router::new()
        .route(
            "/RPC2",
            post(move |state, request| answer(state, Arc::clone(&slots), request)),
        )
        .route("/metrics", axum::routing::get(metrics))
        .merge(crate::parlayx::routes())
        .merge(
            crate::web::routes(Arc::clone(&service))
                .merge(crate::web::upload_routes())
                .layer(axum::middleware::from_fn(move |request, next| {
                    crate::listen::request_deadline(limits.request, request, next)
                })),
        )
        .fallback(crate::web::not_found)
        .with_state(service)
}

/// Fewest characters in an operator token: a shorter one (an empty file
/// left by a crash, say) would let anyone be the operator.
pub const OPERATOR_TOKEN_CHARS_MIN: usize = 32;

/// The operator token in `dir`, created (owner-only) on first start: written
/// whole to a new file, synced, then renamed into place and the folder
/// synced, so a crash leaves either no token or the whole one.
pub fn operator_token(dir: &std::path::Path) -> std::io::Result<(std::path::PathBuf, String)> {
    let path = dir.join("operator-token");
    match std::fs::read_to_string(&path) {
        Ok(token) => {
            let token = token.trim();
            if token.chars().count() < OPERATOR_TOKEN_CHARS_MIN {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "the operator token in {} has fewer than {OPERATOR_TOKEN_CHARS_MIN} characters, \
                         which anyone could guess; delete the file and start again to make a new one",
                        path.display()
                    ),
                ));
            }
            Ok((path, token.to_owned()))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let token = crate::registry::new_meter_secret();
            durable::write_private(&path, token.as_bytes())?;
            Ok((path, token))
        }
        Err(error) => Err(error),
    }
}

/// Serves until `shutdown` completes, within the documented connection
/// limits and timeouts (`listen`).
pub async fn run(
    listener: tokio::net::TcpListener,
    service: Arc<Service>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with(
        vec![crate::listen::Listener {
            socket: listener,
            tls: None,
        }],
        service,
        crate::listen::ConnectionLimits::default(),
        shutdown,
    )
    .await
}

/// `run` on every one of `listeners` (plain or TLS) within `limits`: one
/// set of call slots and one connection table for all of them.
pub async fn run_with(
    listeners: Vec<crate::listen::Listener>,
    service: Arc<Service>,
    limits: crate::listen::ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::listen::serve(listeners, router_with(service, limits), limits, shutdown).await
}

/// Prometheus text format: what the money path did since the process
/// started, and the state of the store.
async fn metrics(State(service): State<Arc<Service>>) -> impl IntoResponse {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let counters = service.backoffice.counters();
    let suspense = service.backoffice.store().suspense_count();
    let (transfers, accounts) = service.backoffice.ledger_size();
    let lag_ms = counters.upload_lag_ms.load(Relaxed);
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = write!(
            text,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    };
    for (name, help, value) in [
        (
            "backoffice_readings_received_total",
            "Readings in uploads that passed authentication.",
            &counters.readings_received,
        ),
        (
            "backoffice_batches_applied_total",
            "Batches applied.",
            &counters.batches_applied,
        ),
        (
            "backoffice_batches_repeated_total",
            "Batches sent again, answered as before.",
            &counters.batches_repeated,
        ),
        (
            "backoffice_uploads_refused_total",
            "Uploads refused: malformed, unsigned, replayed, unknown meter.",
            &counters.uploads_refused,
        ),
        (
            "backoffice_prices_total",
            "Readings priced by TACAs.",
            &counters.prices,
        ),
        (
            "backoffice_pricing_fuel_total",
            "Wasm fuel the prices used.",
            &counters.pricing_fuel,
        ),
        (
            "backoffice_suspended_total",
            "Readings put in suspense.",
            &counters.suspended,
        ),
        (
            "backoffice_batches_repriced_total",
            "Batches priced again under the ledger's lock because another batch of the same payer, product and month was applied while they were priced.",
            &counters.batches_repriced,
        ),
    ] {
        metric(name, "counter", help, value.load(Relaxed).to_string());
    }
    if let Ok(suspense) = suspense {
        metric(
            "backoffice_suspense_readings",
            "gauge",
            "Readings in suspense now.",
            suspense.to_string(),
        );
    }
    metric(
        "backoffice_ledger_transfers",
        "gauge",
        "Transfers posted.",
        transfers.to_string(),
    );
    metric(
        "backoffice_ledger_accounts",
        "gauge",
        "Accounts with postings.",
        accounts.to_string(),
    );
    metric(
        "backoffice_upload_lag_seconds",
        "gauge",
        "For the last applied batch: from its oldest reading to its arrival.",
        format!("{}.{:03}", lag_ms / 1000, lag_ms % 1000),
    );
    let _ = write!(
        text,
        "# HELP backoffice_batch_phase_seconds_total Where applied batches' time went, summed over them, by phase.\n\
         # TYPE backoffice_batch_phase_seconds_total counter\n"
    );
    for (phase, ns) in crate::send::Phase::ALL.iter().zip(&counters.batch_phase_ns) {
        let ns = ns.load(Relaxed);
        let _ = writeln!(
            text,
            "backoffice_batch_phase_seconds_total{{phase=\"{}\"}} {}.{:09}",
            phase.name(),
            ns / 1_000_000_000,
            ns % 1_000_000_000
        );
    }
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
}

fn xml_answer(status: StatusCode, body: Vec<u8>) -> axum::response::Response {
    (status, [(CONTENT_TYPE, "text/xml")], body).into_response()
}

/// Answers a call whose body was not read; the connection is closed after
/// it, since the unread body is still on its way.
fn unread(status: StatusCode, fault: &Fault) -> axum::response::Response {
    let mut response = xml_answer(status, encode_fault(fault));
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Who a call is from, by its headers alone.
enum Caller {
    /// Signature headers naming a registered meter.
    Meter,
    /// The operator token.
    Operator,
}

fn signed(headers: &HeaderMap) -> Signed<'_> {
    Signed {
        mid: header(headers, MID_HEADER),
        time: header(headers, TIME_HEADER),
        signature: header(headers, SIGNATURE_HEADER),
    }
}

/// Refuses, from the headers alone, a call that could not be authenticated
/// whatever its body: no signature headers of a registered meter and no
/// operator token. Such a body is never read.
fn caller(service: &Service, headers: &HeaderMap) -> Result<Caller, Fault> {
    if headers.contains_key(MID_HEADER) {
        match service.backoffice.check_signed_headers(signed(headers)) {
            Ok(_) => Ok(Caller::Meter),
            Err(fault) => Err(service.backoffice.refused(fault)),
        }
    } else if let Some(token) = header(headers, OPERATOR_HEADER) {
        if proto::auth::equal_in_constant_time(token.as_bytes(), service.operator_token.as_bytes())
        {
            Ok(Caller::Operator)
        } else {
            Err(Fault::new(
                FaultCode::Unauthorized,
                "the operator token is wrong",
            ))
        }
    } else {
        Err(Fault::new(
            FaultCode::Unauthorized,
            "a call needs a meter's signature headers (X-Meter-Id, X-Meter-Time, X-Meter-Signature) or the operator token",
        ))
    }
}

async fn answer(
    State(service): State<Arc<Service>>,
    slots: Arc<Slots>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = request.into_parts();
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    let headers = parts.headers;
    let caller = match caller(&service, &headers) {
        Ok(caller) => caller,
        Err(fault) => return unread(StatusCode::OK, &fault),
    };
    let slots_of = &slots;
    // A meter calls once at a time: one address cannot take every slot.
    let address_hold = match (&caller, peer) {
        (Caller::Meter, Some(peer)) => match slots.meter_by_address.take(peer) {
            Some(hold) => Some(hold),
            None => return busy(),
        },
        _ => None,
    };
    let slots = match caller {
        Caller::Meter => &slots.meter,
        Caller::Operator => &slots.operator,
    };
    let Ok(slot) = Arc::clone(slots).try_acquire_owned() else {
        return busy();
    };
    let body = match read_body(body, slots_of.body_read).await {
        Ok(body) => body,
        Err(response) => return *response,
    };
    // Parsing, pricing and fsync block: keep them off the async workers.
    let answered = tokio::task::spawn_blocking(move || {
        let (outcome, signer) = dispatch(&service, caller, &headers, &body);
        drop(slot);
        drop(address_hold);
        let body = match outcome {
            Ok(value) => encode_response(&value),
            Err(fault) => encode_fault(&fault),
        };
        let signature = signer.map(|(secret, call)| secret.sign_answer(&call, &body));
        (body, signature)
    })
    .await;
    let (body, signature) = answered.unwrap_or_else(|error| {
        let fault = Fault::new(FaultCode::InternalError, error.to_string());
        (encode_fault(&fault), None)
    });
    let mut response = xml_answer(StatusCode::OK, body);
    if let Some(signature) = signature
        && let Ok(value) = HeaderValue::from_str(&signature)
    {
        response
            .headers_mut()
            .insert(proto::auth::ANSWER_SIGNATURE_HEADER, value);
    }
    response
}

/// 503 with `Retry-After`, the body unread.
fn busy() -> axum::response::Response {
    let fault = Fault::new(
        FaultCode::InternalError,
        format!(
            "the backoffice is busy with as many calls of this kind as it takes at once; try again in {RETRY_AFTER_S} s"
        ),
    );
    let mut response = unread(StatusCode::SERVICE_UNAVAILABLE, &fault);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
    response
}

/// The whole body, at most the backoffice's limit, within `deadline`; or
/// the answer that says why not.
async fn read_body(
    body: axum::body::Body,
    deadline: std::time::Duration,
) -> Result<axum::body::Bytes, Box<axum::response::Response>> {
    let limit = Limits::BACKOFFICE.body_bytes_max;
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit));
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            let fault = Fault::new(
                FaultCode::RequestTooLarge,
                format!("request body over {limit} bytes"),
            );
            Err(Box::new(unread(StatusCode::PAYLOAD_TOO_LARGE, &fault)))
        }
        Ok(Err(error)) => {
            let fault = Fault::new(
                FaultCode::InvalidRequest,
                format!("the body could not be read: {error}"),
            );
            Err(Box::new(unread(StatusCode::BAD_REQUEST, &fault)))
        }
        Err(_) => {
            let fault = Fault::new(
                FaultCode::InvalidRequest,
                format!("the body did not arrive within {} ms", deadline.as_millis()),
            );
            Err(Box::new(unread(StatusCode::REQUEST_TIMEOUT, &fault)))
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The secret and call signature an answer to a meter is signed with.
type AnswerSigner = (proto::auth::Secret, String);

fn dispatch(
    service: &Service,
    caller: Caller,
    headers: &HeaderMap,
    body: &[u8],
) -> (Result<Value, Fault>, Option<AnswerSigner>) {
    if let Caller::Meter = caller {
        // The signature is over the raw body: check it before decoding
        // anything. Every answer to a verified call is signed back.
        let verified = match service.backoffice.verify(signed(headers), body, now_ms()) {
            Ok(verified) => verified,
            Err(fault) => return (Err(service.backoffice.refused(fault)), None),
        };
        let signer = (verified.secret.clone(), verified.signature.to_owned());
        return (meter_call(service, verified, body), Some(signer));
    }
    (operator_dispatch(service, headers, body), None)
}

fn meter_call(service: &Service, verified: Verified<'_>, body: &[u8]) -> Result<Value, Fault> {
    // An upload is decoded once, by `send` itself (by its fast way when it
    // can); only the method name is read here.
    let name = method_name(body, Limits::BACKOFFICE).map_err(Fault::from)?;
    if name == proto::upload::SEND_METHOD {
        return service.backoffice.send_verified(body, verified, now_ms());
    }
    if let Some(grant_call) = crate::grant_calls::meter_method(&name) {
        return crate::grant_calls::answer(service, grant_call, verified, body, now_ms());
    }
    Err(Fault::new(
        FaultCode::Unauthorized,
        format!(
            "a meter may call `{}` and the grant calls, not `{name}`",
            proto::upload::SEND_METHOD
        ),
    ))
}

fn operator_dispatch(service: &Service, headers: &HeaderMap, body: &[u8]) -> Result<Value, Fault> {
    let token = header(headers, OPERATOR_HEADER).unwrap_or("");
    if !proto::auth::equal_in_constant_time(token.as_bytes(), service.operator_token.as_bytes()) {
        return Err(Fault::new(
            FaultCode::Unauthorized,
            "operator calls need the operator token",
        ));
    }
    let call = parse_call(body, Limits::BACKOFFICE).map_err(Fault::from)?;
    operator_call(service, &call)
}

pub(crate) fn store_fault(error: StoreError) -> Fault {
    match error {
        StoreError::Registry(error) => Fault::new(FaultCode::RecordRefused, error.to_string()),
        other => Fault::new(FaultCode::InternalError, other.to_string()),
    }
}

/// `store.backup` and `store.backupStatus`: where the backup goes and how
/// it stands (`state`: running, done or failed; counts as strings).
fn backup_value(job: &crate::store::backup::BackupJob) -> Value {
    use crate::store::backup::BackupState;
    let dest = ("dest", Value::string(job.dest.display().to_string()));
    let count = |n: u64| Value::string(n.to_string());
    match job.state() {
        BackupState::Running { records, bytes } => Value::structure([
            ("state", Value::string("running")),
            dest,
            ("records", count(records)),
            ("bytes", count(bytes)),
        ]),
        BackupState::Done(copied) => Value::structure([
            ("state", Value::string("done")),
            dest,
            ("records", count(copied.records)),
            ("bytes", count(copied.bytes)),
            ("transfers", count(copied.transfers)),
            ("problems", count(copied.problems)),
            (
                "firstProblem",
                Value::string(copied.first_problem.unwrap_or_default()),
            ),
        ]),
        BackupState::Failed(reason) => Value::structure([
            ("state", Value::string("failed")),
            dest,
            ("error", Value::string(reason)),
        ]),
    }
}

/// The customer `cid`, or fault 302.
fn find_customer(service: &Service, cid: &Cid) -> Result<crate::registry::Customer, Fault> {
    service
        .backoffice
        .store()
        .customer(cid)
        .map_err(store_fault)?
        .ok_or_else(|| Fault::new(FaultCode::NotFound, format!("no customer {cid}")))
}

/// Changes the customer `cid` durably and answers with it.
fn change_customer(
    service: &Service,
    cid: &Cid,
    change: impl Fn(&mut crate::registry::Customer),
) -> Result<Value, Fault> {
    find_customer(service, cid)?;
    service
        .backoffice
        .store()
        .change_customer(cid, &change)
        .map_err(store_fault)?;
    customer_value(service, cid)
}

/// A verification's report: `{ok, checked, problemCount, problems}`.
pub fn verify_value(report: &crate::verify::Report) -> Value {
    Value::structure([
        ("ok", Value::Bool(report.is_ok())),
        ("checked", Value::string(report.summary())),
        (
            "problemCount",
            Value::string(report.problem_count.to_string()),
        ),
        (
            "problems",
            Value::Array(
                report
                    .problems
                    .iter()
                    .map(|problem| Value::string(problem.as_str()))
                    .collect(),
            ),
        ),
    ])
}

/// The customer, as `customer_value`, then the deposit: its reference,
/// its transfer and whether the reference was used before.
fn deposit_value(
    service: &Service,
    cid: &Cid,
    deposited: &crate::send::Deposited,
) -> Result<Value, Fault> {
    let mut value = customer_value(service, cid)?;
    if let Value::Struct(members) = &mut value {
        for (name, member) in [
            ("reference", Value::string(deposited.reference.as_str())),
            (
                "transfer",
                Value::string(deposited.transfer.id.0.to_string()),
            ),
            ("repeated", Value::Bool(deposited.repeated)),
        ] {
            members.push(proto::xmlrpc::Member::new(name, member));
        }
    }
    Ok(value)
}

fn customer_value(service: &Service, cid: &Cid) -> Result<Value, Fault> {
    let customer = find_customer(service, cid)?;
    let balance = service.backoffice.balance(&AccountId::Customer(*cid));
    Ok(Value::structure([
        ("CID", Value::string(customer.cid.as_str())),
        ("name", Value::string(customer.name)),
        ("email", Value::string(customer.email)),
        ("balance", Value::string(balance.to_string())),
        (
            "creditLimit",
            Value::string(customer.credit_limit.to_string()),
        ),
        ("denied", Value::Bool(customer.denied)),
    ]))
}

/// Lines an operator call answers with at most, and by default.
pub const PAGE_MAX: usize = 10_000;

/// The optional count parameter at `index` (a string or an int), or
/// `default` when it is absent or an empty string.
fn count_param(params: &Params<'_>, index: usize, default: usize) -> Result<usize, Fault> {
    let refuse = |value: &Value| params.wrong_type(index, "a count of 0 or more", value);
    match params.get(index) {
        Err(_) => Ok(default),
        Ok(Value::String(text)) if text.trim().is_empty() => Ok(default),
        Ok(Value::Int(n)) => usize::try_from(*n).map_err(|_| refuse(&Value::Int(*n))),
        Ok(Value::String(text)) => text
            .parse()
            .map_err(|_| refuse(&Value::string(text.as_str()))),
        Ok(other) => Err(params.wrong_type(index, "int or string", other)),
    }
}

/// The optional paging parameters at `first` and `first + 1`: where to
/// start (a transfer number; default 0) and how many (default and most
/// [`PAGE_MAX`]).
fn page_of(params: &Params<'_>, first: usize) -> Result<(usize, usize), Fault> {
    Ok((
        count_param(params, first, 0)?,
        count_param(params, first + 1, PAGE_MAX)?.min(PAGE_MAX),
    ))
}

fn operator_call(service: &Service, call: &MethodCall) -> Result<Value, Fault> {
    let params = Params::new(&call.name, &call.params);
    let store = service.backoffice.store();
    match call.name.as_str() {
        "customer.create" => {
            params.arity(2, 3)?;
            let customer = match params.get(2) {
                Err(_) => store
                    .create_customer(&service.bid, params.string(0)?, params.string(1)?)
                    .map_err(store_fault)?,
                Ok(_) => crate::grant_calls::create_customer_with_password(
                    service,
                    params.string(0)?,
                    params.string(1)?,
                    params.string(2)?,
                )?,
            };
            Ok(Value::structure([(
                "CID",
                Value::string(customer.cid.as_str()),
            )]))
        }
        "customer.show" => {
            params.arity(1, 1)?;
            customer_value(service, &params.parsed(0)?)
        }
        "product.create" => {
            params.arity(5, 5)?;
            let max_price: Amount = params.parsed(4)?;
            let owner: Cid = params.parsed(0)?;
            let module = match params.get(3)? {
                Value::Base64(bytes) => bytes,
                other => return Err(params.wrong_type(3, "base64", other)),
            };
            // As an upload is: in a process of its own (`pricing::guard`).
            let samples = crate::pricing::UPLOAD_SAMPLES.map(str::to_owned).to_vec();
            crate::pricing::guard::Guard::current()
                .and_then(|guard| guard.check_blocking(module, &samples))
                .map_err(|error| match error {
                    crate::pricing::guard::GuardError::Refused(message) => {
                        Fault::new(FaultCode::ModuleRefused, message)
                    }
                    other => Fault::new(FaultCode::InternalError, other.to_string()),
                })?;
            let product = store
                .create_product(
                    &service.bid,
                    crate::store::NewProduct::new(
                        &owner,
                        params.string(1)?,
                        params.string(2)?,
                        module,
                        max_price,
                    ),
                )
                .map_err(store_fault)?;
            Ok(Value::structure([
                ("PID", Value::string(product.pid.as_str())),
                ("testPID", Value::string(product.test_pid.as_str())),
                ("taca", Value::string(product.taca.to_string())),
                ("maxPrice", Value::string(max_price.to_string())),
            ]))
        }
        "meter.create" => {
            params.arity(1, 2)?;
            let owner: Cid = params.parsed(0)?;
            let product = match params.optional_parsed::<proto::Pid>(1)? {
                None => None,
                Some(pid) => match store.product(&pid).map_err(store_fault)? {
                    Some(product) if product.owner == owner && product.pid == pid => Some(pid),
                    _ => {
                        return Err(Fault::invalid_params(format!(
                            "{pid} is not a product of {owner} (its PID, not its test PID)"
                        )));
                    }
                },
            };
            let meter = store
                .create_meter_for(&service.bid, &owner, product.as_ref())
                .map_err(store_fault)?;
            Ok(Value::structure([
                ("MID", Value::string(meter.mid.as_str())),
                ("secret", Value::string(meter.secret_hex)),
            ]))
        }
        "meter.rotate" => {
            params.arity(1, 2)?;
            let mid: proto::Mid = params.parsed(0)?;
            let grace_ms = match params.get(1) {
                Err(_) => crate::registry::ROTATION_GRACE_MS_DEFAULT,
                Ok(_) => {
                    let seconds: u64 = params.parsed(1)?;
                    seconds.saturating_mul(1000)
                }
            };
            let meter = store
                .rotate_meter_secret(&mid, crate::registry::Actor::Operator, now_ms(), grace_ms)
                .map_err(meter_fault)?;
            tracing::info!(%mid, grace_ms, "meter secret rotated by the operator");
            let mut value = meter_value(&meter);
            if let Value::Struct(members) = &mut value {
                members.insert(
                    1,
                    proto::xmlrpc::Member::new("secret", Value::string(meter.secret_hex)),
                );
            }
            Ok(value)
        }
        "meter.revoke" => {
            params.arity(1, 1)?;
            let mid: proto::Mid = params.parsed(0)?;
            let meter = store
                .revoke_meter(&mid, crate::registry::Actor::Operator, now_ms())
                .map_err(meter_fault)?;
            tracing::info!(%mid, "meter revoked by the operator");
            Ok(meter_value(&meter))
        }
        "meter.show" => {
            params.arity(1, 1)?;
            let mid: proto::Mid = params.parsed(0)?;
            let meter = store
                .meter(&mid)
                .map_err(store_fault)?
                .ok_or_else(|| Fault::new(FaultCode::NotFound, format!("no meter {mid}")))?;
            Ok(meter_value(&meter))
        }
        "account.deposit" => {
            params.arity(2, 3)?;
            let cid: Cid = params.parsed(0)?;
            let amount: Amount = params.parsed(1)?;
            // Without a reference the deposit cannot be retried safely: a
            // new one is made up and answered.
            let reference = match params.get(2) {
                Err(_) => crate::funding::Reference::random(),
                Ok(_) => crate::funding::Reference::parse(params.string(2)?)
                    .map_err(|error| Fault::invalid_params(&error))?,
            };
            let customer = find_customer(service, &cid)?;
            // Collected through the configured macro-account processor (the
            // operator's record until a card processor plugs in).
            let deposited = service.backoffice.deposit_once(
                service.funding.as_ref(),
                &customer,
                amount,
                &reference,
            )?;
            deposit_value(service, &cid, &deposited)
        }
        "account.deny" => {
            params.arity(2, 2)?;
            let cid: Cid = params.parsed(0)?;
            let denied = params
                .get(1)?
                .as_bool()
                .ok_or_else(|| params.wrong_type(1, "boolean", params.get(1).expect("present")))?;
            change_customer(service, &cid, |customer| customer.denied = denied)
        }
        "account.creditLimit" => {
            params.arity(2, 2)?;
            let cid: Cid = params.parsed(0)?;
            let limit: Amount = params.parsed(1)?;
            change_customer(service, &cid, |customer| customer.credit_limit = limit)
        }
        "account.statement" => {
            params.arity(1, 3)?;
            let cid: Cid = params.parsed(0)?;
            let (from, limit) = page_of(&params, 1)?;
            let lines = service
                .backoffice
                .statement(&AccountId::Customer(cid))
                .iter()
                .filter(|transfer| transfer.id.0 >= from as u64)
                .take(limit)
                .map(|transfer| {
                    let signed = if transfer.credit == AccountId::Customer(cid) {
                        transfer.amount
                    } else {
                        transfer.amount.negated()
                    };
                    let (what, other) = match &transfer.kind {
                        TransferKind::Deposit => ("deposit".to_owned(), String::new()),
                        TransferKind::Withdrawal => ("withdrawal".to_owned(), String::new()),
                        TransferKind::Use { pid, uses: 1, .. } => {
                            (format!("use of {pid}"), String::new())
                        }
                        TransferKind::Use { pid, uses, .. } => {
                            (format!("{uses} uses of {pid}"), String::new())
                        }
                        TransferKind::Correction { of } => {
                            ("correction".to_owned(), of.0.to_string())
                        }
                        TransferKind::Payment { pid, reference } => (
                            format!("payment to {pid}, reference {reference}"),
                            String::new(),
                        ),
                    };
                    // A service's payment: what the service put on the bill.
                    let description = match &transfer.kind {
                        TransferKind::Payment { pid, reference } => store
                            .payment_request(pid, reference)
                            .map_err(store_fault)?
                            .map(|request| request.description)
                            .unwrap_or_default(),
                        _ => String::new(),
                    };
                    Ok(Value::structure([
                        ("transfer", Value::string(transfer.id.0.to_string())),
                        ("amount", Value::string(signed.to_string())),
                        ("what", Value::string(what)),
                        ("corrects", Value::string(other)),
                        ("description", Value::string(description)),
                    ]))
                })
                .collect::<Result<Vec<Value>, Fault>>()?;
            Ok(Value::Array(lines))
        }
        "account.freeUses" => {
            params.arity(2, 2)?;
            let cid: Cid = params.parsed(0)?;
            let month = parse_month(params.string(1)?)
                .ok_or_else(|| Fault::invalid_params("account.freeUses: the month is YYYY-MM"))?;
            let free = service
                .backoffice
                .store()
                .free_uses(&cid, month)
                .map_err(store_fault)?;
            Ok(Value::Array(
                free.into_iter()
                    .map(|(pid, uses)| {
                        Value::structure([
                            ("pid", Value::string(pid.as_str())),
                            ("uses", Value::string(uses.to_string())),
                        ])
                    })
                    .collect(),
            ))
        }
        "store.backup" => {
            params.arity(1, 1)?;
            let dest = std::path::PathBuf::from(params.string(0)?);
            if !dest.is_absolute() {
                return Err(Fault::invalid_params(
                    "store.backup: the destination is an absolute path on the backoffice's machine",
                ));
            }
            let job = store.start_backup(&dest).map_err(|error| match error {
                StoreError::WrongStore(message) => Fault::new(FaultCode::RecordRefused, message),
                other => store_fault(other),
            })?;
            Ok(backup_value(&job))
        }
        "store.backupStatus" => {
            params.arity(0, 0)?;
            match store.backup_job() {
                Some(job) => Ok(backup_value(&job)),
                None => Err(Fault::new(FaultCode::NotFound, "no backup was started")),
            }
        }
        "ledger.verify" => {
            params.arity(0, 0)?;
            Ok(verify_value(&crate::verify::running(&service.backoffice)))
        }
        "suspense.reprice" => {
            params.arity(0, 0)?;
            let (priced, remaining) = service.backoffice.reprice_suspense()?;
            Ok(Value::structure([
                ("priced", Value::string(priced.to_string())),
                ("remaining", Value::string(remaining.to_string())),
            ]))
        }
        "suspense.list" => {
            params.arity(0, 2)?;
            let after = match params.get(0) {
                Err(_) => None,
                Ok(Value::String(text)) if text.trim().is_empty() => None,
                Ok(Value::String(text)) => Some(SuspenseCursor::parse(text).ok_or_else(|| {
                    Fault::invalid_params("suspense.list: the cursor is `MID BATCH SEQ`")
                })?),
                Ok(other) => return Err(params.wrong_type(0, "a cursor string", other)),
            };
            let limit = count_param(&params, 1, PAGE_MAX)?.min(PAGE_MAX);
            let records = store
                .suspense_page(after.as_ref(), limit)
                .map_err(store_fault)?;
            Ok(Value::Array(
                records
                    .into_iter()
                    .map(|record| {
                        Value::structure([
                            (
                                "cursor",
                                Value::string(SuspenseCursor::of(&record).to_string()),
                            ),
                            ("MID", Value::string(record.mid.as_str())),
                            ("batchId", Value::string(record.batch.as_str())),
                            ("seq", Value::string(record.seq.to_string())),
                            ("PID", Value::string(record.pid.as_str())),
                            ("reason", Value::string(record.reason)),
                        ])
                    })
                    .collect(),
            ))
        }
        "product.components" => {
            params.arity(1, 1 + crate::registry::COMPONENTS_MAX)?;
            let pid: proto::Pid = params.parsed(0)?;
            let components = (1..call.params.len())
                .map(|index| params.parsed(index))
                .collect::<Result<Vec<proto::Pid>, Fault>>()?;
            let product =
                store
                    .set_components(&pid, None, &components)
                    .map_err(|error| match error {
                        StoreError::Registry(crate::registry::RegistryError::UnknownProduct(_)) => {
                            Fault::new(FaultCode::NotFound, error.to_string())
                        }
                        other => store_fault(other),
                    })?;
            Ok(Value::structure([
                ("PID", Value::string(product.pid.as_str())),
                (
                    "components",
                    Value::string(
                        product
                            .components
                            .iter()
                            .map(proto::Pid::as_str)
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                ),
            ]))
        }
        "grant.list" => {
            params.arity(1, 1)?;
            let id = params.string(0)?;
            let grants = if let Ok(cid) = id.parse::<Cid>() {
                store.grants_of_customer(&cid)
            } else if let Ok(mid) = id.parse::<proto::Mid>() {
                store.grants_of_meter(&mid)
            } else {
                return Err(Fault::invalid_params(
                    "grant.list: parameter 1 must be a CID or an MID",
                ));
            };
            Ok(Value::Array(
                grants
                    .map_err(store_fault)?
                    .iter()
                    .map(crate::grant_calls::grant_value)
                    .collect(),
            ))
        }
        "grant.revoke" => {
            params.arity(1, 1)?;
            let number: u64 = params.parsed(0)?;
            let grant =
                store
                    .revoke_grant(number, None, now_ms())
                    .map_err(|error| match error {
                        StoreError::Registry(crate::registry::RegistryError::UnknownGrant(_)) => {
                            Fault::new(FaultCode::NotFound, error.to_string())
                        }
                        other => store_fault(other),
                    })?;
            tracing::info!(grant = grant.id, mid = %grant.mid, cid = %grant.cid, "grant revoked by the operator");
            Ok(crate::grant_calls::grant_value(&grant))
        }
        "audit.batch" | "audit.transfer" | "audit.month" => {
            audit_call(service, &call.name, &params)
        }
        "account.items" => items_call(service, &params),
        other => Err(Fault::method_not_found(other)),
    }
}

/// A meter's record as the operator's calls show it, never its secrets:
/// `{MID, owner, rotatedMs, rotatedBy, previousValidUntilMs, revokedMs,
/// revokedBy}` (empty strings for what did not happen).
fn meter_value(meter: &crate::registry::Meter) -> Value {
    let at = |change: &Option<crate::registry::Change>| {
        Value::string(
            change
                .as_ref()
                .map_or(String::new(), |change| change.at_ms.to_string()),
        )
    };
    let by = |change: &Option<crate::registry::Change>| {
        Value::string(
            change
                .as_ref()
                .map_or(String::new(), |change| match change.by {
                    crate::registry::Actor::Operator => "operator".to_owned(),
                    crate::registry::Actor::Owner(cid) => cid.as_str().to_owned(),
                }),
        )
    };
    Value::structure([
        ("MID", Value::string(meter.mid.as_str())),
        ("owner", Value::string(meter.owner.as_str())),
        ("rotatedMs", at(&meter.rotated)),
        ("rotatedBy", by(&meter.rotated)),
        (
            "previousValidUntilMs",
            Value::string(meter.previous.as_ref().map_or(String::new(), |previous| {
                previous.valid_until_ms.to_string()
            })),
        ),
        ("revokedMs", at(&meter.revoked)),
        ("revokedBy", by(&meter.revoked)),
    ])
}

/// A refused rotation or revocation: 302 for an unknown MID.
fn meter_fault(error: StoreError) -> Fault {
    match error {
        StoreError::Registry(crate::registry::RegistryError::UnknownMeter(_)) => {
            Fault::new(FaultCode::NotFound, error.to_string())
        }
        other => store_fault(other),
    }
}

/// `YYYY-MM` as `YYYYMM`, or `None`.
pub fn parse_month(text: &str) -> Option<u32> {
    let (year, month) = text.split_once('-')?;
    if year.len() != 4 || month.len() != 2 {
        return None;
    }
    let (year, month): (u32, u32) = (year.parse().ok()?, month.parse().ok()?);
    ((1900..=9999).contains(&year) && (1..=12).contains(&month)).then_some(year * 100 + month)
}

/// An audit's report as an operator call answers it.
pub fn audit_value(report: &crate::audit::Report) -> Value {
    Value::structure([
        ("confirmed", Value::Bool(report.difference.is_none())),
        ("batches", Value::string(report.batches.to_string())),
        ("readings", Value::string(report.readings.to_string())),
        ("priced", Value::string(report.priced.to_string())),
        ("transfers", Value::string(report.transfers.to_string())),
        (
            "difference",
            Value::string(report.difference.clone().unwrap_or_default()),
        ),
        ("summary", Value::string(report.summary())),
    ])
}

/// `audit.batch(MID, batchId)`, `audit.transfer(N)`, `audit.month(CID,
/// YYYY-MM)`: prices the kept readings again and confirms every amount.
fn audit_call(service: &Service, method: &str, params: &Params<'_>) -> Result<Value, Fault> {
    use crate::audit::{AuditError, Scope};
    let scope = match method {
        "audit.batch" => {
            params.arity(2, 2)?;
            Scope::Batch(crate::store::BatchKey {
                mid: params.parsed(0)?,
                id: params.parsed(1)?,
            })
        }
        "audit.transfer" => {
            params.arity(1, 1)?;
            Scope::Transfer(crate::ledger::TransferId(params.parsed(0)?))
        }
        _ => {
            params.arity(2, 2)?;
            let month = parse_month(params.string(1)?)
                .ok_or_else(|| Fault::invalid_params("audit.month: the month is YYYY-MM"))?;
            Scope::Month {
                cid: params.parsed(0)?,
                month,
            }
        }
    };
    let ledger = service.backoffice.ledger();
    let report = crate::audit::audit(service.backoffice.store(), &ledger, &Pricing::new(), &scope)
        .map_err(|error| match error {
            AuditError::NotFound(why) => Fault::new(FaultCode::NotFound, why),
            AuditError::Store(error) => store_fault(error),
        })?;
    Ok(audit_value(&report))
}

/// `account.items(transfer [, from [, count]])`: the uses summed into a
/// statement line, from the kept readings, in pages (`from`: the first
/// item's index).
fn items_call(service: &Service, params: &Params<'_>) -> Result<Value, Fault> {
    params.arity(1, 3)?;
    let id = crate::ledger::TransferId(params.parsed(0)?);
    let (from, limit) = page_of(params, 1)?;
    let items = crate::itemised::items_of_transfer(service.backoffice.store(), id)
        .map_err(store_fault)?
        .ok_or_else(|| {
            Fault::new(
                FaultCode::NotFound,
                format!("the uses behind transfer {} are not kept", id.0),
            )
        })?;
    Ok(Value::Array(
        items
            .iter()
            .enumerate()
            .skip(from)
            .take(limit)
            .map(|(index, item)| item_value(index, item))
            .collect(),
    ))
}

/// One use of a statement line as the operator calls answer it.
pub fn item_value(index: usize, item: &crate::itemised::LineItem) -> Value {
    let reading = &item.reading;
    Value::structure([
        ("item", Value::string(index.to_string())),
        ("MID", Value::string(item.mid.as_str())),
        ("batchId", Value::string(item.batch.as_str())),
        ("seq", Value::string(reading.seq.to_string())),
        ("timeMs", Value::string(reading.time_ms.to_string())),
        ("context", Value::string(reading.context.as_str())),
        ("PID", Value::string(reading.event.id_str())),
        ("payer", Value::string(item.priced.payer.as_str())),
        ("owner", Value::string(item.priced.owner.as_str())),
        ("price", Value::string(item.priced.amount.to_string())),
        ("fuel", Value::string(item.priced.fuel.to_string())),
        ("taca", Value::string(item.priced.taca.to_string())),
        (
            "periodUses",
            Value::string(item.priced.period_uses.to_string()),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_short_operator_token_stops_the_start_and_a_new_one_is_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (path, token) = operator_token(dir.path()).unwrap();
        assert!(token.len() >= OPERATOR_TOKEN_CHARS_MIN);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(operator_token(dir.path()).unwrap().1, token, "read back");
        assert!(!dir.path().join("operator-token.new").exists());
        for short in ["", "  \n", "0123456789abcdef"] {
            std::fs::write(&path, short).unwrap();
            let error = operator_token(dir.path()).unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{short:?}");
            assert!(error.to_string().contains("delete the file"), "{error}");
        }
    }
}
