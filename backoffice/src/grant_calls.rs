//! The meters' grant calls on `POST /RPC2` (`grant.request`, `grant.poll`,
//! `grant.password`), signed like `send`, and what the operator's calls on
//! grants share with them. The web pages decide device codes; see
//! `grants` for the codes and `docs/security.md` for the trust model.

use proto::grant::{self, DeviceCode, GrantRequest, PasswordGrant};
use proto::params::Params;
use proto::xmlrpc::{Limits, Value, parse_call};
use proto::{Cid, Fault, FaultCode, Mid};

use crate::grants::{CodeError, POLL_INTERVAL_S};
use crate::registry::{Customer, Grant, NewGrant};
use crate::send::Verified;
use crate::server::{Service, store_fault};
use crate::store::Store;
use crate::web::password;

/// Longest lifetime a grant made by password may ask for: ten years.
pub const GRANT_EXPIRES_IN_S_MAX: u64 = 10 * 365 * 24 * 3600;

/// One of the meters' grant calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterMethod {
    /// `grant.request`.
    Request,
    /// `grant.poll`.
    Poll,
    /// `grant.password`.
    Password,
}

/// The meters' grant call named `name`, if it is one.
pub fn meter_method(name: &str) -> Option<MeterMethod> {
    match name {
        grant::REQUEST_METHOD => Some(MeterMethod::Request),
        grant::POLL_METHOD => Some(MeterMethod::Poll),
        grant::PASSWORD_METHOD => Some(MeterMethod::Password),
        _ => None,
    }
}

fn refused(why: impl Into<String>) -> Fault {
    Fault::new(FaultCode::GrantRefused, why)
}

/// A grant as the operator's calls show it.
pub fn grant_value(grant: &Grant) -> Value {
    let ms = |ms: Option<u64>| Value::string(ms.map_or(String::new(), |ms| ms.to_string()));
    Value::structure([
        ("grant", Value::string(grant.id.to_string())),
        ("MID", Value::string(grant.mid.as_str())),
        ("CID", Value::string(grant.cid.as_str())),
        ("scope", Value::string(grant.scope.to_string())),
        ("label", Value::string(grant.label.as_str())),
        ("createdMs", Value::string(grant.created_ms.to_string())),
        ("expiresMs", ms(grant.expires_ms)),
        ("revokedMs", ms(grant.revoked_ms)),
    ])
}

/// Answers a meter's signed grant call. The signature is checked before
/// anything else is looked at, with the MID the call names.
pub fn answer(
    service: &Service,
    method: MeterMethod,
    verified: Verified<'_>,
    body: &[u8],
    now_ms: u64,
) -> Result<Value, Fault> {
    // The signature is over the raw body: it was checked before decoding.
    let call = parse_call(body, Limits::METER_API).map_err(Fault::from)?;
    let mid: Mid = Params::new(&call.name, &call.params).parsed(0)?;
    verified.names(&mid)?;
    service.backoffice.admit(&verified, now_ms)?;
    match method {
        MeterMethod::Request => request(service, GrantRequest::from_call(&call)?, now_ms),
        MeterMethod::Poll => {
            let (polled, device_code) = grant::poll_from_call(&call)?;
            service
                .backoffice
                .device_codes()
                .poll(&polled, &device_code, now_ms)
                .map(|status| status.to_value())
                .map_err(code_fault)
        }
        // A service is a server elsewhere: a customer's password is never
        // handed to it; its customers grant on the web pages.
        MeterMethod::Password if verified.service.is_some() => Err(refused(
            "a service's credential cannot grant by password: the customer approves its code on the web pages"
                .to_owned(),
        )),
        MeterMethod::Password => by_password(service, PasswordGrant::from_call(&call)?, now_ms),
    }
}

fn code_fault(error: CodeError) -> Fault {
    match error {
        CodeError::TooMany => Fault::new(FaultCode::TooManyAttempts, error.to_string()),
        CodeError::Unknown => refused(error.to_string()),
        CodeError::Unavailable(_) => Fault::new(FaultCode::InternalError, error.to_string()),
    }
}

fn customer(service: &Service, cid: &Cid) -> Result<Customer, Fault> {
    service
        .backoffice
        .store()
        .customer(cid)
        .map_err(store_fault)?
        .ok_or_else(|| refused(format!("no customer {cid} in this branch")))
}

fn request(service: &Service, request: GrantRequest, now_ms: u64) -> Result<Value, Fault> {
    customer(service, &request.cid)?;
    let (mid, cid) = (request.mid, request.cid);
    let owner = service
        .backoffice
        .store()
        .meter(&mid)
        .map_err(store_fault)?
        .ok_or_else(|| {
            Fault::new(
                FaultCode::UnknownMeter,
                format!("{mid} is not registered here"),
            )
        })?
        .owner;
    let (device_code, user_code) = service
        .backoffice
        .device_codes()
        .issue(request, owner, now_ms)
        .map_err(code_fault)?;
    tracing::info!(%mid, %cid, "grant code issued");
    let public_url = service.web.config().public_url.trim_end_matches('/');
    Ok(DeviceCode {
        device_code,
        user_code: crate::grants::display(&user_code),
        verification_uri: format!("{public_url}/grant"),
        expires_in_s: service.backoffice.device_codes().valid_ms() / 1000,
        interval_s: POLL_INTERVAL_S,
    }
    .to_value())
}

fn by_password(service: &Service, asked: PasswordGrant, now_ms: u64) -> Result<Value, Fault> {
    let request = &asked.request;
    let sessions = service.web.sessions();
    // Guesses through meters count against the same allowance as the
    // login page's, per customer, and per meter as the "address".
    let account = request.cid.to_string();
    let address = format!("meter {}", request.mid);
    if sessions.throttled(&account, &address) {
        return Err(Fault::new(
            FaultCode::TooManyAttempts,
            "too many failed attempts for this customer or meter; wait 15 minutes",
        ));
    }
    let expires_ms = match asked.expires_in_s {
        None => None,
        Some(seconds) if (1..=GRANT_EXPIRES_IN_S_MAX).contains(&seconds) => {
            Some(now_ms + seconds * 1000)
        }
        Some(_) => {
            return Err(Fault::invalid_params(format!(
                "a grant's lifetime is 1 to {GRANT_EXPIRES_IN_S_MAX} seconds"
            )));
        }
    };
    let store = service.backoffice.store();
    let customer = store.customer(&request.cid).map_err(store_fault)?;
    // One derivation per core at a time, shared with the login page; when
    // every core is deriving already, the meter is told to retry, so a
    // flood of guesses neither takes every core nor piles up threads that
    // `send` needs.
    let Some(_permit) = service.web.try_heavy_permit() else {
        return Err(Fault::new(
            FaultCode::TooManyAttempts,
            "the branch is busy checking passwords; try again in a moment",
        ));
    };
    // Counted as a failure before the check (atomically with the allowance
    // check), cleared by a success: guesses sent at once never pass it.
    let Some(attempt) = sessions.reserve_attempt(&account, &address) else {
        return Err(Fault::new(
            FaultCode::TooManyAttempts,
            "too many failed attempts for this customer or meter; wait 15 minutes",
        ));
    };
    let matches = match customer.as_ref().and_then(|c| c.password.as_ref()) {
        Some(stored) => password::verify(&asked.password, stored),
        None => {
            // The same work whether or not the customer exists.
            password::verify_nothing(&asked.password, service.web.config().password_iterations);
            false
        }
    };
    if !matches {
        tracing::warn!(mid = %request.mid, cid = %request.cid, "grant by password refused");
        return Err(refused(
            "the CID or the password is wrong (a customer without a web password grants on the web pages)",
        ));
    }
    sessions.attempt_succeeded(&account, &address, attempt);
    let grant = store
        .create_grant(NewGrant {
            mid: request.mid,
            cid: request.cid,
            scope: request.scope.clone(),
            label: request.label.clone(),
            created_ms: now_ms,
            expires_ms,
        })
        .map_err(store_fault)?;
    tracing::info!(grant = grant.id, mid = %grant.mid, cid = %grant.cid, scope = %grant.scope, "grant made by password");
    Ok(grant.info().to_value())
}

/// `customer.create(name, email, password)`: an operator registers a
/// customer who chose a password (at a counter, say), with the web form's
/// password rules.
pub fn create_customer_with_password(
    service: &Service,
    name: &str,
    email: &str,
    typed: &str,
) -> Result<Customer, Fault> {
    if let Some(weak) = password::weakness(typed, &[name, email]) {
        return Err(Fault::new(FaultCode::RecordRefused, weak));
    }
    let hash = password::hash(typed, service.web.config().password_iterations);
    service
        .backoffice
        .store()
        .register_customer(
            &service.bid,
            crate::registry::Registration {
                name: name.to_owned(),
                email: email.to_owned(),
                profile: None,
                password: Some(hash),
            },
        )
        .map_err(store_fault)
}
