//! Parlay X Payment over SOAP 1.1 (`docs/parlayx.md`): the four
//! interfaces at the standard's paths, their WSDL at `?wsdl`, callers
//! authenticated with WS-Security UsernameToken digests.
//!
//! A caller is a service: the credential (a meter made with `--service
//! PID`) of one product. It charges an end user only through a live grant
//! that end user gave this credential, the money goes to the product's
//! owner, and the product's maximum price bounds every charge. The money
//! itself moves in `send::payments`, under the ledger lock.

pub mod wsse;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use proto::parlayx::{ChargingInformation, Exception, Interface, Property, Request};
use proto::soap::{self, Element, Envelope};
use proto::{Amount, Cid, Mid};

use crate::holds::{HoldError, HoldId};
use crate::ledger::AccountId;
use crate::registry::{Meter, Product};
use crate::send::{Move, PaymentAsk, PaymentRefusal, Rating, ReservationChange};
use crate::server::Service;
use crate::store::Store;

/// How long a reservation lasts from its last `reserveAmount` or
/// `reserveAdditionalAmount` (the standard leaves it to be agreed).
pub const RESERVATION_TTL_MS: u64 = 15 * 60 * 1000;
/// Parlay X calls worked on at once (their bodies read whole); more are
/// refused (HTTP 503).
pub const CALLS_AT_ONCE: usize = 64;
/// Parlay X calls open at once (body being read or call worked on) for
/// one address other than this machine's (one /64 for IPv6): one address
/// must not hold many connections with bodies it sends slowly. Loopback
/// callers (a TLS proxy in front, a service beside the backoffice) are
/// this machine's own and bounded by the connection limits only.
pub const CALLS_PER_ADDRESS_MAX: usize = 16;
/// Parlay X bodies read at once (each at most 64 KiB): bounds the memory
/// that callers sending slowly can hold, 16 MiB, whoever they are.
pub const BODIES_READ_AT_ONCE: usize = 256;

/// What the Parlay X interfaces keep between calls.
pub struct Payments {
    nonces: wsse::Nonces,
    /// The branch's currency (ISO 4217): a charge in another is refused.
    currency: String,
    /// How long a reservation lasts after it is made or changed.
    reservation_ttl_ms: u64,
    slots: Arc<tokio::sync::Semaphore>,
    /// Bodies being read (`BODIES_READ_AT_ONCE`).
    reading: Arc<tokio::sync::Semaphore>,
    /// Calls held per address, for callers from elsewhere.
    by_address: Arc<crate::listen::PerAddress>,
}

impl Default for Payments {
    fn default() -> Self {
        Payments::new(&crate::BranchSettings::default().currency)
    }
}

impl Payments {
    /// The same, reservations lasting `ttl_ms` (at least 1 ms).
    pub fn with_reservation_ttl_ms(mut self, ttl_ms: u64) -> Payments {
        self.reservation_ttl_ms = ttl_ms.max(1);
        self
    }

    /// The interfaces of a branch keeping accounts in `currency`.
    pub fn new(currency: &str) -> Payments {
        Payments {
            nonces: wsse::Nonces::default(),
            currency: currency.to_owned(),
            reservation_ttl_ms: RESERVATION_TTL_MS,
            slots: Arc::new(tokio::sync::Semaphore::new(CALLS_AT_ONCE)),
            reading: Arc::new(tokio::sync::Semaphore::new(BODIES_READ_AT_ONCE)),
            by_address: crate::listen::PerAddress::new(CALLS_PER_ADDRESS_MAX),
        }
    }
}

impl Payments {
    /// A call's hold on its address's share of the slots: none needed
    /// from this machine, `Err` when the address holds its most.
    fn address_hold(
        &self,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Option<crate::listen::AddressHold>, ()> {
        match peer.map(|peer| peer.ip()) {
            Some(ip) if !is_loopback(ip) => self.by_address.take(ip).map(Some).ok_or(()),
            _ => Ok(None),
        }
    }
}

/// The routes: each interface's path (`POST` a call, `GET ?wsdl` its
/// WSDL) and the schemas its WSDL imports.
pub fn routes() -> Router<Arc<Service>> {
    let mut router = Router::new();
    for interface in Interface::ALL {
        router = router.route(
            &interface.path(),
            get(move |state, query| wsdl(state, interface, query))
                .post(move |state, request| call(state, interface, request)),
        );
    }
    router.route("/parlayx/{file}", get(schema))
}

/// The WSDL and schema files served, as kept in the repository.
const FILES: [(&str, &str); 6] = [
    (
        "parlayx_common_types_2_1.xsd",
        include_str!("../../parlayx/parlayx_common_types_2_1.xsd"),
    ),
    (
        "parlayx_payment_types_2_1.xsd",
        include_str!("../../parlayx/parlayx_payment_types_2_1.xsd"),
    ),
    (
        "parlayx_payment_amount_charging_2_1.wsdl",
        include_str!("../../parlayx/parlayx_payment_amount_charging_2_1.wsdl"),
    ),
    (
        "parlayx_payment_volume_charging_2_1.wsdl",
        include_str!("../../parlayx/parlayx_payment_volume_charging_2_1.wsdl"),
    ),
    (
        "parlayx_payment_reserve_amount_charging_2_1.wsdl",
        include_str!("../../parlayx/parlayx_payment_reserve_amount_charging_2_1.wsdl"),
    ),
    (
        "parlayx_payment_reserve_volume_charging_2_1.wsdl",
        include_str!("../../parlayx/parlayx_payment_reserve_volume_charging_2_1.wsdl"),
    ),
];

/// Where the WSDL files name the server; replaced by the branch's public
/// URL when served.
const ADDRESS_PLACEHOLDER: &str = "http://localhost:8080";

fn file(name: &str) -> Option<&'static str> {
    FILES
        .iter()
        .find(|(file, _)| *file == name)
        .map(|(_, text)| *text)
}

fn xml(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    response
}

/// An HTTP refusal before SOAP: `status` and a line of plain text.
fn refusal(status: StatusCode, text: &str) -> Response {
    let mut response = (status, text.to_owned()).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn served(service: &Service, text: &str) -> String {
    text.replace(
        ADDRESS_PLACEHOLDER,
        service.web.config().public_url.trim_end_matches('/'),
    )
}

async fn schema(
    State(service): State<Arc<Service>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match file(&name) {
        Some(text) => xml(StatusCode::OK, served(&service, text)),
        None => (StatusCode::NOT_FOUND, "no such schema\n").into_response(),
    }
}

async fn wsdl(
    State(service): State<Arc<Service>>,
    interface: Interface,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    if !query.is_some_and(|query| query.eq_ignore_ascii_case("wsdl")) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "POST SOAP 1.1 calls here; the WSDL is at {}?wsdl\n",
                interface.path()
            ),
        )
            .into_response();
    }
    let name = format!("parlayx_payment_{}_2_1.wsdl", interface.slug());
    match file(&name) {
        Some(text) => xml(StatusCode::OK, served(&service, text)),
        None => (StatusCode::NOT_FOUND, "no WSDL\n").into_response(),
    }
}

/// Whether a Parlay X call may come this way. A UsernameToken proves who
/// sent the header, not the body next to it: over plain HTTP across a
/// network, whoever sees a call can change its amount or payer and send it
/// first with the same token. So calls come over TLS (`--tls-listen`), or
/// from this machine (a TLS proxy in front, or a service beside us).
pub fn transport_allowed(peer: Option<std::net::SocketAddr>, tls: bool) -> bool {
    tls || peer.is_some_and(|peer| is_loopback(peer.ip()))
}

/// Whether `ip` is this machine's (IPv4 127/8, `::1`, or 127/8 mapped).
fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|ip| ip.is_loopback())
        }
    }
}

async fn call(
    State(service): State<Arc<Service>>,
    interface: Interface,
    request: axum::extract::Request,
) -> Response {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    let tls = request
        .extensions()
        .get::<crate::listen::Transport>()
        .is_some_and(|transport| transport.tls);
    // Refusals before the body is read are HTTP's, in plain text with
    // their own status; every SOAP fault envelope goes with 500 (WS-I
    // Basic Profile R1126), so SOAP clients read faults and HTTP clients
    // (proxies, balancers) read refusals.
    if !transport_allowed(peer, tls) {
        return refusal(
            StatusCode::FORBIDDEN,
            "Parlay X calls are taken over TLS (the backoffice's --tls-listen address) \
             or from this machine: a UsernameToken does not protect the body over plain HTTP\n",
        );
    }
    let busy = |text: &str| {
        let mut response = refusal(StatusCode::SERVICE_UNAVAILABLE, text);
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        response
    };
    let Ok(address_hold) = service.payments.address_hold(peer) else {
        return busy(
            "this address has as many payment calls open as one address may; \
             try again when one is answered\n",
        );
    };
    let Ok(reading) = Arc::clone(&service.payments.reading).try_acquire_owned() else {
        return busy(
            "the backoffice is reading as many payment calls as it takes at once; try again\n",
        );
    };
    let limit = soap::Limits::PAYMENT.body_bytes_max;
    let read =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(request.into_body(), limit));
    let body = match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("a Parlay X call is at most {limit} bytes\n"),
            );
        }
        Ok(Err(_)) => {
            return refusal(StatusCode::BAD_REQUEST, "the body could not be read\n");
        }
        Err(_) => {
            return refusal(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive whole within 10 s\n",
            );
        }
    };
    drop(reading);
    // A slot is taken only for a body that arrived whole: callers that
    // send theirs slowly hold their address's share and a connection, not
    // the calls the backoffice works on at once.
    let Ok(slot) = Arc::clone(&service.payments.slots).try_acquire_owned() else {
        return busy(
            "the backoffice is busy with as many payment calls as it takes at once; try again\n",
        );
    };
    // Store calls and fsync block: off the async workers.
    let answered = tokio::task::spawn_blocking(move || {
        let answer = answer(&service, interface, &body, crate::now_ms());
        drop((slot, address_hold));
        answer
    })
    .await;
    match answered {
        Ok(Ok(body)) => xml(StatusCode::OK, body),
        Ok(Err(fault)) => xml(StatusCode::INTERNAL_SERVER_ERROR, fault),
        Err(_) => xml(
            StatusCode::INTERNAL_SERVER_ERROR,
            Exception::service_error("the call failed inside the backoffice").server_fault(),
        ),
    }
}

/// A call's answer: the response envelope, or a fault envelope.
pub fn answer(
    service: &Service,
    interface: Interface,
    body: &[u8],
    now_ms: u64,
) -> Result<String, String> {
    let envelope = soap::parse_envelope(body, soap::Limits::PAYMENT)
        .map_err(|error| soap::fault(error.fault_code(), &error.to_string(), None))?;
    let element = check_envelope(&envelope)?;
    let caller = authenticate(service, &envelope, now_ms)?;
    let request = Request::decode(interface, element)
        .map_err(|error| Exception::of_decode(&error).fault())?;
    let body = Caller {
        service,
        meter: &caller.0,
        product: &caller.1,
        now_ms,
    }
    .run(interface, &request)
    .map_err(|exception| {
        // SVC0001 is ours (a store that did not answer): the Server's fault.
        if exception.message_id == "SVC0001" {
            exception.server_fault()
        } else {
            exception.fault()
        }
    })?;
    Ok(soap::envelope(&body))
}

/// The body's one element, after the headers were checked: a header that
/// must be understood and is not ours gets the `MustUnderstand` fault.
fn check_envelope(envelope: &Envelope) -> Result<&Element, String> {
    for header in &envelope.headers {
        if header.must_understand() && !header.is(wsse::WSSE_NS, "Security") {
            return Err(soap::fault(
                soap::FaultCode::MustUnderstand,
                &format!(
                    "the header {{{}}}{} must be understood, and this server does not process it",
                    header.namespace.as_deref().unwrap_or(""),
                    header.name
                ),
                None,
            ));
        }
    }
    match envelope.body.as_slice() {
        [element] => Ok(element),
        _ => Err(soap::fault(
            soap::FaultCode::Client,
            "the Body must hold exactly one request element",
            None,
        )),
    }
}

/// The service credential and product that signed the call. Every
/// refusal is the same fault; the log says why.
fn authenticate(
    service: &Service,
    envelope: &Envelope,
    now_ms: u64,
) -> Result<(Meter, Product), String> {
    let failed = |why: &dyn std::fmt::Display| {
        tracing::warn!(why = %why, "Parlay X call refused: authentication");
        soap::fault(
            soap::FaultCode::FailedAuthentication,
            "The security token could not be authenticated or authorized",
            None,
        )
    };
    let security = wsse::security_header(&envelope.headers)
        .ok_or_else(|| failed(&wsse::TokenError::Missing))?;
    let token = wsse::username_token(security).map_err(|error| failed(&error))?;
    token.check_time(now_ms).map_err(|error| failed(&error))?;
    let mid = Mid::parse(&token.username).map_err(|_| failed(&"the user name is not a MID"))?;
    let store = service.backoffice.store();
    let meter = store
        .meter(&mid)
        .map_err(|error| internal_fault(&error))?
        .ok_or_else(|| failed(&format!("{mid} is not registered")))?;
    let Some(pid) = meter.service else {
        return Err(failed(&format!(
            "{mid} is a meter, not a service credential"
        )));
    };
    if meter.revoked.is_some() {
        return Err(failed(&format!("{mid} was revoked")));
    }
    if !meter
        .secrets_at(now_ms)
        .into_iter()
        .any(|(secret, _)| token.proves(secret))
    {
        return Err(failed(&wsse::TokenError::BadDigest));
    }
    service
        .payments
        .nonces
        .admit(&token, now_ms)
        .map_err(|error| failed(&error))?;
    // This node had not seen it; no other node (nor this one before a
    // restart) may have either.
    let claimed = store
        .claim_nonce(&token.nonce_key(), token.remembered_until(now_ms), now_ms)
        .map_err(|error| internal_fault(&error))?;
    if !claimed {
        return Err(failed(&wsse::TokenError::Replayed));
    }
    let product = store
        .product(&pid)
        .map_err(|error| internal_fault(&error))?
        .ok_or_else(|| failed(&format!("{pid} of {mid} is not a product")))?;
    Ok((meter, product))
}

fn internal_fault(error: &dyn std::fmt::Display) -> String {
    tracing::error!(error = %error, "Parlay X call failed");
    Exception::service_error("the backoffice could not read its store; try again").server_fault()
}

trait ServerFault {
    fn server_fault(&self) -> String;
}

impl ServerFault for Exception {
    /// A failure of ours: `soapenv:Server` with the exception in `detail`.
    fn server_fault(&self) -> String {
        self.fault().replacen(
            soap::FaultCode::Client.qualified(),
            soap::FaultCode::Server.qualified(),
            1,
        )
    }
}

/// One authenticated call.
struct Caller<'a> {
    service: &'a Service,
    meter: &'a Meter,
    product: &'a Product,
    now_ms: u64,
}

fn charge_refused(refusal: PaymentRefusal) -> Exception {
    match refusal {
        PaymentRefusal::ReferenceReused(operation) => {
            tracing::info!(
                operation,
                "Parlay X reference code used for another request"
            );
            Exception::invalid_input("referenceCode")
        }
        PaymentRefusal::Insufficient(_) => {
            Exception::charge_failed("the end user's available balance is too low")
        }
        PaymentRefusal::NotTheirs(_) | PaymentRefusal::Hold(HoldError::Unknown(_)) => {
            Exception::invalid_input("reservationIdentifier")
        }
        PaymentRefusal::Hold(HoldError::Ended(_)) => {
            Exception::invalid_input("reservationIdentifier")
        }
        PaymentRefusal::Hold(HoldError::BeyondHold { .. }) => {
            Exception::charge_failed("more than the reservation holds")
        }
        PaymentRefusal::Hold(other) => Exception::invalid_charging(other.to_string()),
        PaymentRefusal::EvidenceUsed(reference) => Exception::invalid_confirmation_refs(reference),
        PaymentRefusal::AboveMaximum(total, max) => Exception::policy_error(format!(
            "the reservation would hold {total}, above the most one use may cost ({max})"
        )),
        PaymentRefusal::AboveCharged(net) => Exception::policy_error(format!(
            "a refund is at most what this service charged the end user, less its refunds \
             to them: {net}"
        )),
    }
}

impl Caller<'_> {
    fn store(&self) -> &crate::store::AnyStore {
        self.service.backoffice.store()
    }

    fn fail(&self, error: &dyn std::fmt::Display) -> Exception {
        tracing::error!(error = %error, "Parlay X call failed");
        Exception::service_error("the backoffice could not complete the call; try again")
    }

    /// The customer an `endUserIdentifier` names: `mailto:` a registered
    /// address, `tel:` a registered number, or a CID (`B1-C7`).
    fn end_user(&self, uri: &str) -> Result<Cid, Exception> {
        let invalid = || Exception::invalid_input("endUserIdentifier");
        let customer = if let Some(address) = uri.strip_prefix("mailto:") {
            self.store()
                .customer_by_email(address)
                .map_err(|error| self.fail(&error))?
        } else if let Some(number) = uri.strip_prefix("tel:") {
            // A global number only (`+`, digits and RFC 3966's visual
            // separators), without parameters: a local number needs a
            // context this branch does not keep.
            let number = crate::registry::phone_number(number).map_err(|_| invalid())?;
            self.store()
                .customer_by_phone(&number)
                .map_err(|error| self.fail(&error))?
        } else if let Ok(cid) = Cid::parse(uri) {
            self.store()
                .customer(&cid)
                .map_err(|error| self.fail(&error))?
        } else {
            return Err(invalid());
        };
        // Nobody by that name reads as somebody who did not grant this
        // service: a service learns from a refusal only what it could
        // charge, not who is a customer of the branch.
        let customer = customer.ok_or_else(|| self.not_granted())?;
        if customer.cid == self.product.owner {
            // A product cannot charge its own owner; refused in the same
            // words as a stranger, so a stolen credential cannot confirm
            // the owner's address or number.
            return Err(self.not_granted());
        }
        Ok(customer.cid)
    }

    /// Refused unless `payer` gave this service a grant that is live now.
    fn granted(&self, payer: &Cid) -> Result<(), Exception> {
        self.grant_of(payer, true)
    }

    /// Refused unless `payee` ever gave this product's service a grant
    /// (live, expired or revoked), through this credential or another of
    /// the same product (one made to replace it): a refund goes only to a
    /// customer the service dealt with, so that refunds are no way to tell
    /// customers from strangers. What it may give back is capped per
    /// product too (`send::payments::beyond_charged`).
    fn granted_ever(&self, payee: &Cid) -> Result<(), Exception> {
        self.grant_of(payee, false)
    }

    fn grant_of(&self, customer: &Cid, live: bool) -> Result<(), Exception> {
        // The customer's grants, few, rather than the service's, many.
        let grants = self
            .store()
            .grants_of_customer(customer)
            .map_err(|error| self.fail(&error))?;
        if grants
            .iter()
            .any(|grant| grant.mid == self.meter.mid && (!live || grant.is_live_at(self.now_ms)))
        {
            return Ok(());
        }
        if !live {
            for grant in &grants {
                let meter = self
                    .store()
                    .meter(&grant.mid)
                    .map_err(|error| self.fail(&error))?;
                if meter.is_some_and(|meter| meter.service == Some(self.product.pid)) {
                    return Ok(());
                }
            }
        }
        Err(self.not_granted())
    }

    /// The refusal of an end user who did not grant this service, or whom
    /// no customer answers to (the same words: `end_user`).
    fn not_granted(&self) -> Exception {
        Exception::policy_error(format!(
            "the end user has not granted {} to charge them",
            self.product.pid
        ))
    }

    /// The amount of `charge`, checked: positive (or, with `signed`, not
    /// zero), in the branch's currency, within the product's maximum. A
    /// code (the service's PID) instead of an amount is priced for `payer`
    /// by the product's TACA, as one use.
    fn amount(
        &self,
        charge: &ChargingInformation,
        signed: bool,
        payer: Option<&Cid>,
    ) -> Result<Amount, Exception> {
        if let Some(currency) = &charge.currency
            && *currency != self.service.payments.currency
        {
            return Err(Exception::policy_error(format!(
                "currency {currency}: this branch charges in {}",
                self.service.payments.currency
            )));
        }
        let amount = match (&charge.amount, &charge.code, payer) {
            (Some(amount), _, _) => *amount,
            // A code names the product whose TACA prices one use of it.
            (None, Some(code), Some(payer)) if *code == self.product.pid.as_str() => {
                self.price(payer, 1, &Rating::default())?
            }
            (None, Some(_), _) => {
                return Err(Exception::invalid_charging(format!(
                    "the code must be the service's product, {}",
                    self.product.pid
                )));
            }
            (None, None, _) => return Err(Exception::invalid_charging("no amount and no code")),
        };
        let usable = if signed {
            !amount.is_zero()
        } else {
            amount.is_positive()
        };
        if !usable {
            return Err(Exception::invalid_charging(format!(
                "the amount {amount} is not a positive amount"
            )));
        }
        self.within_maximum(if amount.is_positive() {
            amount
        } else {
            amount.negated()
        })?;
        crate::payments::check_description(&charge.description)
            .map_err(|_| Exception::invalid_input("charge.description"))?;
        Ok(amount)
    }

    fn within_maximum(&self, amount: Amount) -> Result<(), Exception> {
        match self.product.max_price {
            Some(max) if amount > max => Err(Exception::policy_error(format!(
                "{amount} is above the most one use of {} may cost ({max})",
                self.product.pid
            ))),
            Some(_) => Ok(()),
            // Stored before maximums existed: nothing bounds what it takes.
            None => Err(Exception::policy_error(format!(
                "{} has no maximum price per use, so it cannot charge through Parlay X",
                self.product.pid
            ))),
        }
    }

    fn ask(&self, request: &Request, description: &str) -> Result<PaymentAsk, Exception> {
        self.ask_with(request, description, Vec::new())
    }

    fn ask_with(
        &self,
        request: &Request,
        description: &str,
        evidence: Vec<String>,
    ) -> Result<PaymentAsk, Exception> {
        let reference = request.reference().map(str::to_owned);
        if let Some(reference) = &reference {
            crate::payments::check_reference(reference)
                .map_err(|_| Exception::invalid_input("referenceCode"))?;
        }
        Ok(PaymentAsk {
            service: self.product.pid,
            owner: self.product.owner,
            reference,
            operation: request.operation(),
            canonical: request.canonical(),
            canonical_uncounted: request.canonical_uncounted(),
            description: description.to_owned(),
            evidence,
        })
    }

    /// Whether `request` is a retry of one this service made before and
    /// that took effect: the same reference code and the same request. It
    /// answers the first outcome before anything that may have changed
    /// since is looked at again (a grant revoked, a price, a balance, the
    /// evidence it used). Anything else, or a store that does not answer
    /// now, goes the whole way, where the code is checked again under the
    /// ledger lock. Operations with a reference code answer no value, so
    /// the outcome is the empty response.
    fn repeated(&self, request: &Request) -> bool {
        let Some(reference) = request.reference() else {
            return false;
        };
        match self.store().payment_request(&self.product.pid, reference) {
            Ok(Some(earlier)) => earlier.is_repeated_by(
                request.operation(),
                &request.canonical(),
                &request.canonical_uncounted(),
            ),
            _ => false,
        }
    }

    fn reservation(&self, text: &str) -> Result<HoldId, Exception> {
        reservation_id(text).ok_or_else(|| Exception::invalid_input("reservationIdentifier"))
    }

    fn run(&self, interface: Interface, request: &Request) -> Result<String, Exception> {
        if self.repeated(request) {
            return Ok(proto::parlayx::response(
                interface,
                request.operation(),
                None,
            ));
        }
        let owner = AccountId::Customer(self.product.owner);
        let backoffice = &self.service.backoffice;
        let confirmation_refs = match request {
            Request::ChargeAmount {
                confirmation_refs, ..
            }
            | Request::RefundAmount {
                confirmation_refs, ..
            }
            | Request::ChargeSplitAmount {
                confirmation_refs, ..
            } => confirmation_refs.as_slice(),
            _ => &[],
        };

        let done = |outcome: Result<crate::send::PaymentResult, proto::Fault>| {
            outcome
                .map_err(|fault| self.fail(&fault))?
                .map_err(charge_refused)
        };
        match request {
            Request::ChargeAmount {
                end_user, charge, ..
            } => {
                let payer = self.end_user(end_user)?;
                self.granted(&payer)?;
                let amount = self.amount(charge, false, Some(&payer))?;
                let evidence = self.evidence(confirmation_refs, &[payer])?;
                let ask = self.ask_with(request, &charge.description, evidence)?;
                let moves: [Move; 1] = [(AccountId::Customer(payer), owner, amount)];
                done(backoffice.pay(&ask, &moves, self.now_ms))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    None,
                ))
            }
            Request::RefundAmount {
                end_user, charge, ..
            } => {
                let payee = self.end_user(end_user)?;
                self.granted_ever(&payee)?;
                let amount = self.amount(charge, false, Some(&payee))?;
                let evidence = self.evidence(confirmation_refs, &[payee])?;
                let ask = self.ask_with(request, &charge.description, evidence)?;
                let moves: [Move; 1] = [(owner, AccountId::Customer(payee), amount)];
                done(backoffice.pay(&ask, &moves, self.now_ms))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    None,
                ))
            }
            Request::ChargeSplitAmount { splits, charge, .. } => {
                // A code is priced per payer: a split needs the amount.
                let amount = self.amount(charge, false, None)?;
                let mut payers = Vec::with_capacity(splits.len());
                for split in splits {
                    let payer = self.end_user(&split.end_user)?;
                    if payers.iter().any(|(known, _)| *known == payer) {
                        return Err(Exception::invalid_input("splitInfo"));
                    }
                    self.granted(&payer)?;
                    payers.push((payer, split.percent));
                }
                let parts = split_exactly(amount, &payers)
                    .ok_or_else(|| Exception::invalid_input("splitInfo.percent"))?;
                let who: Vec<Cid> = payers.iter().map(|(payer, _)| *payer).collect();
                let evidence = self.evidence(confirmation_refs, &who)?;
                let ask = self.ask_with(request, &charge.description, evidence)?;
                let moves: Vec<Move> = parts
                    .into_iter()
                    .map(|(payer, part)| (AccountId::Customer(payer), owner, part))
                    .collect();
                done(backoffice.pay(&ask, &moves, self.now_ms))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    None,
                ))
            }
            Request::ReserveAmount { end_user, charge } => {
                let payer = self.end_user(end_user)?;
                self.granted(&payer)?;
                let amount = self.amount(charge, false, Some(&payer))?;
                let ask = self.ask(request, &charge.description)?;
                let paid = done(backoffice.reserve(
                    &ask,
                    &payer,
                    amount,
                    self.now_ms + self.service.payments.reservation_ttl_ms,
                    None,
                    self.now_ms,
                ))?;
                let id = paid
                    .hold
                    .ok_or_else(|| self.fail(&"a reservation without a hold"))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    Some(&id.to_string()),
                ))
            }
            Request::ReserveAdditionalAmount {
                reservation,
                charge,
            } => {
                let id = self.reservation(reservation)?;
                let hold = self.own_hold(id)?;
                let payer = match &hold.account {
                    AccountId::Customer(payer) => Some(*payer),
                    AccountId::System(_) => None,
                };
                let delta = self.amount(charge, true, payer.as_ref())?;
                if let AccountId::Customer(payer) = &hold.account
                    && delta.is_positive()
                {
                    self.granted(payer)?;
                }
                let total = hold
                    .held
                    .checked_add(delta)
                    .map_err(|_| Exception::invalid_charging("out of range"))?;
                self.within_maximum(total)?;
                let ask = self.ask(request, &charge.description)?;
                let change = ReservationChange::Adjust {
                    delta,
                    expires_ms: self.now_ms + self.service.payments.reservation_ttl_ms,
                    max_total: self.product.max_price,
                };
                done(backoffice.change_reservation(&ask, id, change, self.now_ms))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    None,
                ))
            }
            Request::ChargeReservation {
                reservation,
                charge,
                ..
            } => {
                let id = self.reservation(reservation)?;
                let hold = self.own_hold(id)?;
                let payer = match &hold.account {
                    AccountId::Customer(payer) => Some(*payer),
                    AccountId::System(_) => None,
                };
                let amount = self.amount(charge, false, payer.as_ref())?;
                if let AccountId::Customer(payer) = &hold.account {
                    self.granted(payer)?;
                }
                let ask = self.ask(request, &charge.description)?;
                let change = ReservationChange::Capture { amount };
                done(backoffice.change_reservation(&ask, id, change, self.now_ms))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    None,
                ))
            }
            Request::ReleaseReservation { reservation } => {
                let id = self.reservation(reservation)?;
                let ask = self.ask(request, "")?;
                done(backoffice.change_reservation(
                    &ask,
                    id,
                    ReservationChange::Release,
                    self.now_ms,
                ))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    None,
                ))
            }
            Request::ChargeVolume {
                end_user,
                volume,
                billing_text,
                ..
            }
            | Request::RefundVolume {
                end_user,
                volume,
                billing_text,
                ..
            } => {
                let customer = self.end_user(end_user)?;
                let charging = matches!(request, Request::ChargeVolume { .. });
                if charging {
                    self.granted(&customer)?;
                } else {
                    self.granted_ever(&customer)?;
                }
                let rating = self.rating(&volume.parameters)?;
                let amount = self.price(&customer, positive(volume.volume)?, &rating)?;
                let ask = self.ask(request, self.billing_text(billing_text)?)?;
                if amount.is_zero() {
                    // Priced at nothing: nothing moves, nothing is kept.
                    return Ok(proto::parlayx::response(
                        interface,
                        request.operation(),
                        None,
                    ));
                }
                let customer = AccountId::Customer(customer);
                let moves: [Move; 1] = if charging {
                    [(customer, owner, amount)]
                } else {
                    [(owner, customer, amount)]
                };
                done(backoffice.pay(&ask, &moves, self.now_ms))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    None,
                ))
            }
            Request::GetAmount { end_user, volume } => {
                let payer = self.end_user(end_user)?;
                self.granted(&payer)?;
                let rating = self.rating(&volume.parameters)?;
                let count =
                    u64::try_from(volume.volume).map_err(|_| Exception::invalid_input("volume"))?;
                let amount = self.price(&payer, count, &rating)?;
                let unit = if rating.unit.is_empty() {
                    "units"
                } else {
                    rating.unit.as_str()
                };
                let charge = ChargingInformation {
                    description: format!("{count} {unit} of {}", self.product.name),
                    currency: Some(self.service.payments.currency.clone()),
                    amount: Some(amount),
                    code: Some(self.product.pid.to_string()),
                };
                Ok(proto::parlayx::amount_response(interface, &charge))
            }
            Request::ReserveVolume {
                end_user,
                volume,
                billing_text,
            } => {
                let payer = self.end_user(end_user)?;
                self.granted(&payer)?;
                let rating = self.rating(&volume.parameters)?;
                let amount = self.price(&payer, positive(volume.volume)?, &rating)?;
                if amount.is_zero() {
                    return Err(Exception::charge_failed("priced at 0: nothing to reserve"));
                }
                let ask = self.ask(request, self.billing_text(billing_text)?)?;
                let paid = done(backoffice.reserve(
                    &ask,
                    &payer,
                    amount,
                    self.now_ms + self.service.payments.reservation_ttl_ms,
                    Some(rating.text()),
                    self.now_ms,
                ))?;
                let id = paid
                    .hold
                    .ok_or_else(|| self.fail(&"a reservation without a hold"))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    Some(&id.to_string()),
                ))
            }
            Request::ReserveAdditionalVolume {
                reservation,
                volume,
                billing_text,
            } => {
                let id = self.reservation(reservation)?;
                let (hold, payer, rating) = self.own_volume_hold(id)?;
                let count = volume.unsigned_abs();
                if count == 0 {
                    return Err(Exception::invalid_input("volume"));
                }
                if *volume > 0 {
                    self.granted(&payer)?;
                }
                let priced = self.price(&payer, count, &rating)?;
                let delta = if *volume > 0 {
                    priced
                } else {
                    priced.negated()
                };
                let total = hold
                    .held
                    .checked_add(delta)
                    .map_err(|_| Exception::invalid_input("volume"))?;
                self.within_maximum(total)?;
                let ask = self.ask(request, self.billing_text(billing_text)?)?;
                if delta.is_zero() {
                    return Ok(proto::parlayx::response(
                        interface,
                        request.operation(),
                        None,
                    ));
                }
                let change = ReservationChange::Adjust {
                    delta,
                    expires_ms: self.now_ms + self.service.payments.reservation_ttl_ms,
                    max_total: self.product.max_price,
                };
                done(backoffice.change_reservation(&ask, id, change, self.now_ms))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    None,
                ))
            }
            Request::ChargeReservationVolume {
                reservation,
                volume,
                billing_text,
                ..
            } => {
                let id = self.reservation(reservation)?;
                let (_, payer, rating) = self.own_volume_hold(id)?;
                self.granted(&payer)?;
                let amount = self.price(&payer, positive(*volume)?, &rating)?;
                let text = billing_text.as_deref().unwrap_or_default();
                let ask = self.ask(request, self.billing_text(text)?)?;
                if amount.is_zero() {
                    return Ok(proto::parlayx::response(
                        interface,
                        request.operation(),
                        None,
                    ));
                }
                let change = ReservationChange::Capture { amount };
                done(backoffice.change_reservation(&ask, id, change, self.now_ms))?;
                Ok(proto::parlayx::response(
                    interface,
                    request.operation(),
                    None,
                ))
            }
        }
    }

    /// The confirmation references, each checked as evidence of a use of
    /// this product by one of `payers` (`MID:BATCH:SEQ`, an applied
    /// reading whose itemised record is still kept), in canonical form.
    /// Whether one was evidence for another request is checked under the
    /// ledger lock, when the payment is written.
    fn evidence(&self, references: &[String], payers: &[Cid]) -> Result<Vec<String>, Exception> {
        let mut checked: Vec<String> = Vec::with_capacity(references.len());
        for reference in references {
            let invalid = || Exception::invalid_confirmation_refs(reference.clone());
            let (key, seq) = confirmation_ref(reference).ok_or_else(invalid)?;
            let canonical = format!("{}:{}:{seq}", key.mid, key.id);
            if checked.contains(&canonical) {
                return Err(invalid());
            }
            let records = self
                .store()
                .itemised_batch(&key)
                .map_err(|error| self.fail(&error))?
                .ok_or_else(invalid)?;
            let reading = records
                .iter()
                .flat_map(|record| &record.items)
                .find(|item| item.reading.seq == seq)
                .ok_or_else(invalid)?;
            let ours = match &reading.reading.event {
                proto::reading::Event::Commit {
                    pid,
                    payer: Some(proto::Payer::Customer(payer)),
                } => {
                    (*pid == self.product.pid || *pid == self.product.test_pid)
                        && payers.contains(payer)
                }
                _ => false,
            };
            if !ours {
                return Err(invalid());
            }
            checked.push(canonical);
        }
        Ok(checked)
    }

    /// A reservation by volume this service placed: the hold, its payer
    /// and its rating parameters.
    fn own_volume_hold(&self, id: HoldId) -> Result<(crate::holds::Hold, Cid, Rating), Exception> {
        let hold = self.own_hold(id)?;
        let rating = hold.rating.as_deref().and_then(Rating::of_text);
        match (&hold.account, rating) {
            (AccountId::Customer(payer), Some(rating)) => {
                let payer = *payer;
                Ok((hold, payer, rating))
            }
            // A reservation by amount is charged by amount.
            _ => Err(Exception::invalid_input("reservationIdentifier")),
        }
    }

    /// The rating parameters of a request: `unit`, `contract`, `service`
    /// and `operation`, each at most once.
    fn rating(&self, parameters: &[Property]) -> Result<Rating, Exception> {
        let mut rating = Rating::default();
        let mut seen = Vec::new();
        for property in parameters {
            let slot = match property.name.as_str() {
                "unit" => &mut rating.unit,
                "contract" => &mut rating.contract,
                "service" => &mut rating.service,
                "operation" => &mut rating.operation,
                _ => return Err(Exception::invalid_input("parameters")),
            };
            if seen.contains(&property.name)
                || property.value.len() > crate::pricing::RATING_PARAMETER_BYTES_MAX
                || property.value.chars().any(char::is_control)
            {
                return Err(Exception::invalid_input("parameters"));
            }
            seen.push(property.name.clone());
            slot.clone_from(&property.value);
        }
        Ok(rating)
    }

    /// What `volume` costs `payer` (the product's TACA), within the
    /// product's maximum.
    fn price(&self, payer: &Cid, volume: u64, rating: &Rating) -> Result<Amount, Exception> {
        let amount = self
            .service
            .backoffice
            .rate(self.product, payer, volume, rating, self.now_ms)
            .map_err(|fault| self.fail(&fault))?
            .map_err(|reason| {
                tracing::info!(pid = %self.product.pid, reason, "a Parlay X charge not priced");
                Exception::charge_failed("the product's pricing module refused to price it")
            })?;
        self.within_maximum(amount)?;
        Ok(amount)
    }

    fn billing_text<'t>(&self, text: &'t str) -> Result<&'t str, Exception> {
        crate::payments::check_description(text)
            .map_err(|_| Exception::invalid_input("billingText"))?;
        Ok(text)
    }

    /// Hold `id`, if this service placed it (others' are unknown to it).
    fn own_hold(&self, id: HoldId) -> Result<crate::holds::Hold, Exception> {
        self.service
            .backoffice
            .hold(id)
            .filter(|hold| hold.by.as_ref() == Some(&self.product.pid))
            .ok_or_else(|| Exception::invalid_input("reservationIdentifier"))
    }
}

/// `H<n>`: `H` and the hold's number in decimal digits only, without
/// leading zeros, so that each reservation has one identifier.
fn reservation_id(text: &str) -> Option<HoldId> {
    text.strip_prefix('H')
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .filter(|digits| !digits.starts_with('0') || *digits == "0")
        .and_then(|digits| digits.parse().ok())
        .map(HoldId)
}

/// A confirmation reference `MID:BATCH:SEQ` (the batch id may hold
/// colons): the batch's key and the reading's sequence number.
pub fn confirmation_ref(reference: &str) -> Option<(crate::store::BatchKey, u64)> {
    let (mid, rest) = reference.split_once(':')?;
    let (batch, seq) = rest.rsplit_once(':')?;
    if seq.is_empty() || !seq.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some((
        crate::store::BatchKey {
            mid: Mid::parse(mid).ok()?,
            id: proto::BatchId::parse(batch).ok()?,
        },
        seq.parse().ok()?,
    ))
}

/// A volume to charge or reserve: above 0.
fn positive(volume: i64) -> Result<u64, Exception> {
    u64::try_from(volume)
        .ok()
        .filter(|volume| *volume > 0)
        .ok_or_else(|| Exception::invalid_input("volume"))
}

/// `amount` split by percents that add up to exactly 100, each part
/// rounded down to the nano and the remainder to the first payer, so that
/// the parts add up to `amount` exactly; `None` when the percents are not
/// each above 0 and together 100.
pub fn split_exactly(amount: Amount, shares: &[(Cid, Amount)]) -> Option<Vec<(Cid, Amount)>> {
    let hundred = Amount::from_nanos(100_000_000_000);
    let mut total = Amount::ZERO;
    for (_, percent) in shares {
        if !percent.is_positive() || *percent > hundred {
            return None;
        }
        total = total.checked_add(*percent).ok()?;
    }
    if total != hundred || shares.is_empty() {
        return None;
    }
    let mut parts = Vec::with_capacity(shares.len());
    let mut given: i128 = 0;
    for (payer, percent) in shares {
        let part = amount.nanos().checked_mul(percent.nanos())? / hundred.nanos();
        given += part;
        parts.push((*payer, part));
    }
    parts[0].1 += amount.nanos() - given;
    parts
        .into_iter()
        .filter(|(_, part)| *part > 0)
        .map(|(payer, part)| Amount::try_from_nanos(part).ok().map(|part| (payer, part)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(n: u32) -> Cid {
        Cid::parse(&format!("B1-C{n}")).unwrap()
    }

    fn amount(text: &str) -> Amount {
        Amount::parse(text).unwrap()
    }

    #[test]
    fn a_reservation_has_one_identifier_of_digits_only() {
        assert_eq!(reservation_id("H0"), Some(HoldId(0)));
        assert_eq!(reservation_id("H17"), Some(HoldId(17)));
        for wrong in [
            "H+5",
            "H-5",
            "H05",
            "H",
            "h5",
            "H 5",
            "H5 ",
            "H١",
            "H99999999999999999999",
        ] {
            assert_eq!(reservation_id(wrong), None, "{wrong}");
        }
    }

    #[test]
    fn one_address_from_elsewhere_holds_at_most_its_share_of_the_slots() {
        let payments = Payments::default();
        let at = |text: &str| Some(text.parse::<std::net::SocketAddr>().unwrap());
        let held: Vec<_> = (0..CALLS_PER_ADDRESS_MAX)
            .map(|n| {
                payments
                    .address_hold(at(&format!("192.0.2.7:{}", 1000 + n)))
                    .unwrap()
                    .expect("a hold")
            })
            .collect();
        assert!(payments.address_hold(at("192.0.2.7:9")).is_err());
        // The same /64 is one address; another address has its own share.
        let mut v6: Vec<_> = (0..CALLS_PER_ADDRESS_MAX)
            .map(|n| payments.address_hold(at(&format!("[2001:db8::{n:x}]:9"))))
            .collect();
        assert!(v6.iter().all(Result::is_ok));
        assert!(payments.address_hold(at("[2001:db8::ffff]:9")).is_err());
        assert!(payments.address_hold(at("192.0.2.8:9")).unwrap().is_some());
        // This machine's callers share only the whole.
        for _ in 0..100 {
            assert!(payments.address_hold(at("127.0.0.1:9")).unwrap().is_none());
        }
        // A call answered gives its share back.
        drop(held);
        v6.clear();
        assert!(payments.address_hold(at("192.0.2.7:9")).unwrap().is_some());
        assert!(
            payments
                .address_hold(at("[2001:db8::1]:9"))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn calls_come_over_tls_or_from_this_machine_only() {
        let at = |text: &str| Some(text.parse::<std::net::SocketAddr>().unwrap());
        for local in [
            "127.0.0.1:9",
            "127.8.9.10:9",
            "[::1]:9",
            "[::ffff:127.0.0.1]:9",
        ] {
            assert!(transport_allowed(at(local), false), "{local}");
        }
        for remote in [
            "192.0.2.7:9",
            "10.0.0.1:9",
            "[2001:db8::1]:9",
            "[::ffff:192.0.2.7]:9",
        ] {
            assert!(!transport_allowed(at(remote), false), "{remote}");
            assert!(transport_allowed(at(remote), true), "{remote}");
        }
        // Served some other way, with no peer known: refused unless TLS.
        assert!(!transport_allowed(None, false));
    }

    #[test]
    fn a_split_adds_up_to_the_amount_exactly() {
        let parts = split_exactly(
            amount("1"),
            &[
                (cid(1), amount("33.333")),
                (cid(2), amount("33.333")),
                (cid(3), amount("33.334")),
            ],
        )
        .unwrap();
        let sum = parts.iter().fold(Amount::ZERO, |sum, (_, part)| {
            sum.checked_add(*part).unwrap()
        });
        assert_eq!(sum, amount("1"));
        assert_eq!(parts[1].1, amount("0.33333"));
        assert_eq!(parts[2].1, amount("0.33334"));
        assert_eq!(parts[0].1, amount("0.33333"));
        let odd = split_exactly(
            amount("0.000000001"),
            &[(cid(1), amount("50")), (cid(2), amount("50"))],
        )
        .unwrap();
        assert_eq!(odd, vec![(cid(1), amount("0.000000001"))]);
        assert_eq!(split_exactly(amount("1"), &[(cid(1), amount("99"))]), None);
        assert_eq!(
            split_exactly(
                amount("1"),
                &[(cid(1), amount("101")), (cid(2), amount("-1"))]
            ),
            None
        );
        assert_eq!(split_exactly(amount("1"), &[]), None);
    }
}
