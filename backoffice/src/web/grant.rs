//! The grant pages: a customer enters the user code a meter printed
//! (`meterd grant`, RFC 8628's device authorization), sees the meter, its
//! owner, the machine and the local users it asks for, and approves (with
//! an optional expiry) or refuses; the account page revokes.
//!
//! Every step needs a logged-in session and its CSRF token, the CID is the
//! session's, and a code that is not waiting for this customer (mistyped,
//! used, expired, or another customer's) gets one answer that tells none of
//! these apart and counts as a failure in the session throttle, per
//! customer (`grant-code:CID`) and per address, so codes cannot be guessed.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use proto::grant::{GrantInfo, GrantRequest};

use super::session::Session;
use super::{
    AccountNotes, Fields, Web, account_response, csrf_ok, csrf_refused, customer_of,
    customer_or_login, page, pages, trouble,
};
use crate::grants::{CodeError, display, normalize};
use crate::registry::{Customer, Grant, NewGrant, RegistryError};
use crate::server::Service;
use crate::store::{Store, StoreError};

/// Where a visitor without a session is sent: the login page, then back.
const LOGIN_THEN_GRANT: &str = "/login?next=/grant";

const DAY_MS: u64 = 24 * 3600 * 1000;

/// The expiry choices of the approval form: field value, label, lifetime.
pub const EXPIRIES: [(&str, &str, Option<u64>); 4] = [
    ("never", "never (until you revoke it)", None),
    ("1d", "after 1 day", Some(DAY_MS)),
    ("30d", "after 30 days", Some(30 * DAY_MS)),
    ("1y", "after 1 year", Some(365 * DAY_MS)),
];

/// The throttle's account key for code attempts of `customer`.
fn throttle_key(customer: &Customer) -> String {
    format!("grant-code:{}", customer.cid)
}

/// The page to type a code in.
pub(super) async fn code_page(State(service): State<Arc<Service>>, headers: HeaderMap) -> Response {
    let (session, _customer) = match customer_or_login(&service, &headers, LOGIN_THEN_GRANT) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    page(
        &service.web,
        &session,
        false,
        StatusCode::OK,
        pages::grant_code(&session, "", None),
    )
}

/// The answer to a code that is not waiting for this customer, whatever
/// the reason; the attempt counts against the throttle.
fn code_refused(
    web: &Web,
    session: &Session,
    typed: &str,
    account: &str,
    address: &str,
) -> Response {
    web.sessions.failed(account, address);
    page(
        web,
        session,
        false,
        StatusCode::NOT_FOUND,
        pages::grant_code(
            session,
            typed,
            Some(
                "This code is not waiting for your approval: it may be mistyped, used already, \
                 expired, or meant for another customer. Run meterd grant again for a new code.",
            ),
        ),
    )
}

fn code_throttled(web: &Web, session: &Session, typed: &str) -> Response {
    page(
        web,
        session,
        false,
        StatusCode::TOO_MANY_REQUESTS,
        pages::grant_code(
            session,
            typed,
            Some(&format!(
                "Too many wrong codes. Wait 15 minutes, or call the branch at {}.",
                web.config.phone
            )),
        ),
    )
}

/// The meter's owner as the confirmation shows it: CID and name.
/// Who registered the meter asking, and the product it charges for when it
/// is a service's credential (Parlay X).
type Asker = (Option<Customer>, Option<crate::registry::Product>);

fn meter_owner(service: &Service, request: &GrantRequest) -> Result<Asker, StoreError> {
    let store = service.backoffice.store();
    match store.meter(&request.mid)? {
        Some(meter) => {
            let product = match &meter.service {
                Some(pid) => store.product(pid)?,
                None => None,
            };
            Ok((store.customer(&meter.owner)?, product))
        }
        None => Ok((None, None)),
    }
}

/// A typed code: shown back as `XXXX-XXXX` when it has the right length.
fn shown_code(typed: &str) -> String {
    let letters = normalize(typed);
    if letters.len() == crate::grants::USER_CODE_LETTERS {
        display(&letters)
    } else {
        typed.trim().chars().take(20).collect()
    }
}

/// A code typed on the code page: the confirmation when it waits for this
/// customer.
pub(super) async fn enter_code(
    State(service): State<Arc<Service>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (session, customer) = match customer_or_login(&service, &headers, LOGIN_THEN_GRANT) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let web = &service.web;
    let fields = Fields::parse(&body);
    if !csrf_ok(&session, &fields) {
        return csrf_refused(web, &session, false);
    }
    let typed = shown_code(fields.get("code"));
    let (account, address) = (throttle_key(&customer), peer.ip().to_string());
    if web.sessions.throttled(&account, &address) {
        return code_throttled(web, &session, &typed);
    }
    let codes = service.backoffice.device_codes();
    let request = match codes.pending_for(&typed, &customer.cid, crate::now_ms()) {
        Ok(Some(request)) => request,
        Ok(None) => return code_refused(web, &session, &typed, &account, &address),
        Err(error) => return trouble(web, &session, &error),
    };
    let (owner, product) = match meter_owner(&service, &request) {
        Ok(asker) => asker,
        Err(error) => return trouble(web, &session, &error),
    };
    page(
        web,
        &session,
        false,
        StatusCode::OK,
        pages::grant_confirm(
            &session,
            &customer,
            &typed,
            &request,
            owner.as_ref(),
            product.as_ref(),
            &service.web.shown_for(&customer),
        ),
    )
}

/// Approve or refuse, from the confirmation page.
pub(super) async fn decide(
    State(service): State<Arc<Service>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (session, customer) = match customer_or_login(&service, &headers, LOGIN_THEN_GRANT) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let web = &service.web;
    let fields = Fields::parse(&body);
    if !csrf_ok(&session, &fields) {
        return csrf_refused(web, &session, false);
    }
    let typed = shown_code(fields.get("code"));
    let approve = match fields.get("decision") {
        "approve" => true,
        "refuse" => false,
        _ => return bad_form(web, &session, "Choose Approve or Refuse."),
    };
    let lifetime = match EXPIRIES
        .iter()
        .find(|(value, _, _)| *value == fields.get("expires"))
    {
        Some((_, _, lifetime)) => *lifetime,
        // A refusal needs no expiry.
        None if !approve => None,
        None => return bad_form(web, &session, "Choose when the grant expires."),
    };
    let (account, address) = (throttle_key(&customer), peer.ip().to_string());
    if web.sessions.throttled(&account, &address) {
        return code_throttled(web, &session, &typed);
    }
    let now = crate::now_ms();
    let codes = service.backoffice.device_codes();
    let store = service.backoffice.store();
    let mut made: Option<Grant> = None;
    let decided = if approve {
        let expires_ms = lifetime.map(|lifetime| now.saturating_add(lifetime));
        codes.decide(
            &typed,
            &customer.cid,
            now,
            Some(|request: &GrantRequest| -> Result<GrantInfo, StoreError> {
                let grant = store.create_grant(NewGrant {
                    mid: request.mid,
                    cid: request.cid,
                    scope: request.scope.clone(),
                    label: request.label.clone(),
                    created_ms: now,
                    expires_ms,
                })?;
                let info = grant.info();
                made = Some(grant);
                Ok(info)
            }),
        )
    } else {
        codes.decide(
            &typed,
            &customer.cid,
            now,
            None::<fn(&GrantRequest) -> Result<GrantInfo, StoreError>>,
        )
    };
    match decided {
        Err(CodeError::Unknown | CodeError::TooMany) => {
            code_refused(web, &session, &typed, &account, &address)
        }
        Err(error @ CodeError::Unavailable(_)) => trouble(web, &session, &error),
        Ok(Err(error)) => trouble(web, &session, &error),
        Ok(Ok(request)) => {
            match &made {
                Some(grant) => {
                    tracing::info!(grant = grant.id, mid = %grant.mid, cid = %grant.cid, scope = %grant.scope, "grant approved on the web pages")
                }
                None => {
                    tracing::info!(mid = %request.mid, cid = %request.cid, "grant refused on the web pages")
                }
            }
            page(
                web,
                &session,
                false,
                StatusCode::OK,
                pages::grant_decided(
                    &session,
                    &request,
                    made.as_ref(),
                    &service.web.shown_for(&customer),
                ),
            )
        }
    }
}

fn bad_form(web: &Web, session: &Session, text: &str) -> Response {
    page(
        web,
        session,
        false,
        StatusCode::UNPROCESSABLE_ENTITY,
        pages::message(session, "Nothing was decided", text),
    )
}

/// Revokes one of the customer's grants, from the account page.
pub(super) async fn revoke(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (session, customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let web = &service.web;
    let fields = Fields::parse(&body);
    if !csrf_ok(&session, &fields) {
        return csrf_refused(web, &session, false);
    }
    let typed = fields.trimmed("grant");
    let unknown = || {
        page(
            web,
            &session,
            false,
            StatusCode::NOT_FOUND,
            pages::message(
                &session,
                "No such grant",
                "You gave no grant with this number, so nothing was revoked. Your grants are \
                 listed on your account page.",
            ),
        )
    };
    let Ok(number) = typed.parse::<u64>() else {
        return unknown();
    };
    let store = service.backoffice.store();
    match store.revoke_grant(number, Some(&customer.cid), crate::now_ms()) {
        Ok(grant) => {
            tracing::info!(grant = grant.id, mid = %grant.mid, cid = %grant.cid, "grant revoked on the web pages");
            let notice = format!(
                "Grant {} is revoked: meter {} can no longer charge you.",
                grant.id, grant.mid
            );
            account_response(
                &service,
                &session,
                &customer,
                AccountNotes {
                    grants_notice: Some(&notice),
                    ..AccountNotes::default()
                },
                StatusCode::OK,
            )
        }
        Err(StoreError::Registry(RegistryError::UnknownGrant(_))) => unknown(),
        Err(error) => trouble(web, &session, &error),
    }
}
