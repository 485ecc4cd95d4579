//! The web pages: registration, sessions, the account, products, meters and
//! statements, rendered on the server (maud escapes everything it renders)
//! and usable without JavaScript.
//!
//! Every form carries its session's CSRF token; cookies are HttpOnly and
//! SameSite=Strict (and Secure when served over TLS); failed logins are
//! throttled per account and per address; a customer reaches only their own
//! pages, since every page takes the CID from the session, never from the
//! request. A meter is authorized to charge a customer only on the grant
//! pages (`grant`), by a logged-in session with its CSRF token.

mod grant;
pub mod mail;
pub mod pages;
pub mod password;
pub mod session;
pub mod shown;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Multipart, Query, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION,
    REFERRER_POLICY, SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::Markup;
use proto::{Amount, Cid, Pid};

use crate::funding;
use crate::ledger::{AccountId, Transfer};
use crate::pricing::MODULE_BYTES_MAX;
use crate::pricing::guard::{CHECKS_AT_ONCE_MAX, Guard, GuardError};
use crate::registry::{Customer, Meter, PasswordHash, Profile, Registration, RegistryError};
use crate::server::Service;
use crate::store::{Store, StoreError};
use session::{COOKIE as SESSION_COOKIE, Session, Sessions};

/// Largest form body (everything but a product upload).
pub const FORM_BYTES_MAX: usize = 64 * 1024;
/// Largest product upload: the module and the form's text fields.
pub const UPLOAD_BYTES_MAX: usize = MODULE_BYTES_MAX + 64 * 1024;

/// How the web pages are set up.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// The branch's telephone number, shown on refusals.
    pub phone: String,
    /// PBKDF2 iterations for new passwords.
    pub password_iterations: NonZeroU32,
    /// Mark cookies Secure (when a TLS proxy serves the pages).
    pub secure_cookies: bool,
    /// The address customers reach the pages at, for links in mail.
    pub public_url: String,
    /// Where outgoing mail is written, one file per message.
    pub outbox: PathBuf,
    /// The branch's currency and time zone, for amounts and times.
    pub shown: shown::Shown,
    /// Customers may top up their micro-account on the account page, through
    /// the branch's processor (`Service::funding`). Only where that
    /// processor really collects, or where the branch's operator is its only
    /// customer (the local franchise): the built-in `RecordedByOperator`
    /// collects nothing, so each top-up would be new money.
    pub top_up: bool,
}

/// The web pages' state.
pub struct Web {
    config: WebConfig,
    sessions: Sessions,
    /// Password derivations (and module checks) running at once: one per
    /// core, so a burst of logins queues instead of taking every thread.
    heavy: tokio::sync::Semaphore,
    /// Top-up references being collected right now: a second submit of
    /// the same form is told to wait for the first's answer instead of
    /// asking the processor at the same time.
    topping_up: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Web {
    /// The pages with `config`.
    pub fn new(config: WebConfig) -> Web {
        Web::with_sessions(config, Sessions::default())
    }

    /// The pages with `config`, keeping visits in `sessions` (shared by
    /// the nodes of a branch in PostgreSQL).
    pub fn with_sessions(config: WebConfig, sessions: Sessions) -> Web {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Web {
            config,
            sessions,
            heavy: tokio::sync::Semaphore::new(cores),
            topping_up: std::sync::Mutex::default(),
        }
    }

    /// The visits, throttles and reset links, for the meters' grant calls.
    pub(crate) fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The pages' settings.
    pub(crate) fn config(&self) -> &WebConfig {
        &self.config
    }

    /// A turn at CPU-heavy work (the same turns as `heavy`) if one is free
    /// now: held until the permit is dropped.
    pub(crate) fn try_heavy_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.heavy.try_acquire().ok()
    }

    /// How amounts and times are shown to `customer`: the branch's
    /// currency and zone, times in the customer's own zone if they chose one.
    pub(crate) fn shown_for(&self, customer: &Customer) -> shown::Shown {
        let zone = customer
            .profile
            .as_ref()
            .map_or("", |profile| profile.time_zone.as_str());
        self.config.shown.for_viewer(zone)
    }

    /// Runs CPU-heavy work (PBKDF2, a module check) off the async workers,
    /// at most one per core at a time.
    async fn heavy<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let _permit = self
            .heavy
            .acquire()
            .await
            .map_err(|error| error.to_string())?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|error| error.to_string())
    }
}

/// The routes of the web pages. Every form posted to them is checked for
/// its session's CSRF token before its handler runs (`require_csrf`), so a
/// form added later cannot forget to; the upload form (multipart) checks
/// its own in `add_product`.
pub fn routes(service: Arc<Service>) -> Router<Arc<Service>> {
    Router::new()
        .route("/", get(entry_page).post(register))
        .route("/login", get(login_page).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/forgot", get(forgot_page).post(forgot))
        .route("/reset", get(reset_page).post(reset))
        .route("/account", get(account_page).post(edit_account))
        .route("/account/top-up", axum::routing::post(top_up))
        .route("/grant", get(grant::code_page).post(grant::enter_code))
        .route("/grant/decide", axum::routing::post(grant::decide))
        .route("/grants/revoke", axum::routing::post(grant::revoke))
        .route("/products/components", axum::routing::post(set_components))
        .route("/products/new", get(new_product_page))
        .route("/meters", get(meters_page).post(add_meter))
        .route("/meters/rotate", axum::routing::post(rotate_meter))
        .route("/meters/revoke", axum::routing::post(revoke_meter))
        .route("/statement", get(statement_page))
        .route("/statement.csv", get(statement_csv))
        .route("/statement/items", get(items_page))
        .route("/statement/items.csv", get(items_csv))
        .route("/style.css", get(style))
        .route("/health", get(health))
        .route_layer(axum::middleware::from_fn_with_state(service, require_csrf))
        .layer(DefaultBodyLimit::max(FORM_BYTES_MAX))
}

/// Refuses a POST whose form lacks its session's CSRF token (or is larger
/// than a form may be), before the route's handler sees it.
async fn require_csrf(
    State(service): State<Arc<Service>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, FORM_BYTES_MAX).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "the form is too large").into_response();
    };
    if let Err(refused) = posted_form(&service.web, &parts.headers, &bytes) {
        return *refused;
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// The routes that take uploads, with their own body limit.
pub fn upload_routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/products/new", axum::routing::post(add_product))
        .layer(DefaultBodyLimit::max(UPLOAD_BYTES_MAX))
}

/// A form's fields by name (the last value of a repeated name wins).
struct Fields(HashMap<String, String>);

impl Fields {
    fn parse(body: &[u8]) -> Fields {
        Fields(
            form_urlencoded(body)
                .into_iter()
                .collect::<HashMap<String, String>>(),
        )
    }

    fn get(&self, name: &str) -> &str {
        self.0.get(name).map_or("", String::as_str)
    }

    fn trimmed(&self, name: &str) -> String {
        self.get(name).trim().to_owned()
    }
}

/// `application/x-www-form-urlencoded`, decoded as browsers encode it
/// (invalid escapes kept as they are, invalid UTF-8 replaced).
fn form_urlencoded(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body)
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect()
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// A page's response: the HTML, its status, the session cookie when it is
/// new, and headers that keep the page out of frames and caches.
fn page(
    web: &Web,
    session: &Session,
    set_cookie: bool,
    status: StatusCode,
    body: Markup,
) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    secure_headers(headers);
    if set_cookie {
        set_session_cookie(web, headers, &session.token);
    }
    response
}

/// The answer for an address the branch has no page at, with the headers
/// every page has. It makes no session: probes for pages create nothing.
pub async fn not_found() -> Response {
    let body = maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Not found - superdistribution branch" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                main {
                    h1 { "Not found" }
                    p { "This branch has no page at this address. " a href="/" { "Start here." } }
                }
            }
        }
    };
    let mut response = (StatusCode::NOT_FOUND, body).into_response();
    secure_headers(response.headers_mut());
    response
}

fn secure_headers(headers: &mut HeaderMap) {
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn set_session_cookie(web: &Web, headers: &mut HeaderMap, token: &str) {
    let secure = if web.config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    let max_age = session::IDLE_MAX.as_secs();
    let cookie = format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    );
    headers.append(
        SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("tokens are hex"),
    );
}

fn redirect(web: &Web, to: &str, session: Option<&Session>) -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(LOCATION, to.to_owned())]).into_response();
    secure_headers(response.headers_mut());
    if let Some(session) = session {
        set_session_cookie(web, response.headers_mut(), &session.token);
    }
    response
}

/// The visitor's session (a new one if they have none).
fn visit(web: &Web, headers: &HeaderMap) -> (Session, bool) {
    web.sessions.visit(cookie_value(headers, SESSION_COOKIE))
}

/// The form's CSRF token matches its session's, compared in constant time.
fn csrf_ok(session: &Session, fields: &Fields) -> bool {
    proto::auth::equal_in_constant_time(fields.get("csrf").as_bytes(), session.csrf.as_bytes())
}

/// A posted form with its visit: the session (and whether it is new) and
/// the fields, or the refusal when the form lacks the session's CSRF token.
fn posted_form(
    web: &Web,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Session, bool, Fields), Box<Response>> {
    let (session, new) = visit(web, headers);
    let fields = Fields::parse(body);
    if csrf_ok(&session, &fields) {
        Ok((session, new, fields))
    } else {
        Err(Box::new(csrf_refused(web, &session, new)))
    }
}

fn csrf_refused(web: &Web, session: &Session, set_cookie: bool) -> Response {
    page(
        web,
        session,
        set_cookie,
        StatusCode::FORBIDDEN,
        pages::message(
            session,
            "Form expired",
            "This form was not sent from this site's page, or it is too old. Go back, reload \
             the page and send it again.",
        ),
    )
}

fn trouble(web: &Web, session: &Session, error: &dyn std::fmt::Display) -> Response {
    page(
        web,
        session,
        false,
        StatusCode::INTERNAL_SERVER_ERROR,
        pages::message(
            session,
            "Something went wrong",
            &format!(
                "The branch could not do this just now ({error}). Please try again, or call {}.",
                web.config.phone
            ),
        ),
    )
}

/// The logged-in customer of this request, or a redirect to the login page.
fn customer_of(
    service: &Service,
    headers: &HeaderMap,
) -> Result<(Session, Customer), Box<Response>> {
    customer_or_login(service, headers, "/login")
}

/// Pages a login may lead back to (`/login?next=...`): a fixed list, so a
/// link can never send a customer off the site after logging in.
const NEXT_PAGES: [&str; 1] = ["/grant"];

/// Where a login leads: `next` when it is one of [`NEXT_PAGES`], otherwise
/// the account page.
fn after_login(next: &str) -> &'static str {
    NEXT_PAGES
        .into_iter()
        .find(|page| *page == next)
        .unwrap_or("/account")
}

/// The logged-in customer of this request, or a redirect to `login` (the
/// login page, perhaps with where to go after it).
fn customer_or_login(
    service: &Service,
    headers: &HeaderMap,
    login: &str,
) -> Result<(Session, Customer), Box<Response>> {
    let web = &service.web;
    let (session, new) = visit(web, headers);
    let Some(cid) = session.cid else {
        return Err(Box::new(redirect(web, login, new.then_some(&session))));
    };
    match service.backoffice.store().customer(&cid) {
        Ok(Some(customer)) => Ok((session, customer)),
        Ok(None) => {
            web.sessions.log_out(&session.token);
            Err(Box::new(redirect(web, "/login", None)))
        }
        Err(error) => Err(Box::new(trouble(web, &session, &error))),
    }
}

async fn style() -> Response {
    let mut response = ([(CONTENT_TYPE, "text/css")], pages::STYLE).into_response();
    response
        .headers_mut()
        .insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// For load balancers and operators: 200 `ok` while the store answers.
async fn health(State(service): State<Arc<Service>>) -> Response {
    if !service.backoffice.is_durable() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            "a write could not be made durable: restart the backoffice\n",
        )
            .into_response();
    }
    let (transfers, accounts) = service.backoffice.ledger_size();
    match service.backoffice.store().suspense_count() {
        Ok(suspense) => (
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("ok\ntransfers {transfers}\naccounts {accounts}\nsuspense {suspense}\n"),
        )
            .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("store unavailable: {error}\n"),
        )
            .into_response(),
    }
}

async fn entry_page(State(service): State<Arc<Service>>, headers: HeaderMap) -> Response {
    let web = &service.web;
    let (session, new) = visit(web, &headers);
    if session.cid.is_some() {
        return redirect(web, "/account", None);
    }
    let form = pages::RegistrationForm::default();
    page(
        web,
        &session,
        new,
        StatusCode::OK,
        pages::entry(&session, &form, &[], &web.config.phone),
    )
}

/// The current month as `YYYYMM` (UTC).
fn this_month() -> u32 {
    crate::send::month_of(crate::now_ms())
}

/// Checks the registration form's fields; the messages are per field.
fn check_profile(fields: &Fields, errors: &mut Vec<(&'static str, String)>) -> Profile {
    let mut text = |name: &'static str, label: &str, required: bool, max: usize| {
        let value = fields.trimmed(name);
        if required && value.is_empty() {
            errors.push((name, format!("{label} is required.")));
        } else if value.len() > max {
            errors.push((name, format!("{label} may have at most {max} characters.")));
        } else if value.chars().any(char::is_control) {
            errors.push((name, format!("{label} may not contain control characters.")));
        }
        value
    };
    let salutation = text("salutation", "Salutation", false, 20);
    let first_name = text("firstName", "First name", true, 100);
    let middle_name = text("middleName", "Middle name", false, 100);
    let last_name = text("lastName", "Last name", true, 100);
    let street = text("street", "Street", true, 200);
    let city = text("city", "City", true, 100);
    let state = text("state", "State", false, 100);
    let zip_code = text("zipCode", "Postal code", true, 20);
    let country = text("country", "Country", true, 100);
    let macroaccount_co = text("macroaccountCo", "Card or bank", true, 100);
    let typed_account = text("macroaccountID", "Account number", true, 34);
    let time_zone = text("timeZone", "Time zone", false, 64);
    // The form shows the kept number masked; sent back as shown, it stays.
    let masked = crate::registry::mask_account(&typed_account);
    let macroaccount_id = if typed_account == masked {
        typed_account
    } else {
        if !typed_account.is_empty()
            && !typed_account
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-')
        {
            errors.push((
                "macroaccountID",
                "The account number may have only letters, digits, spaces and dashes.".into(),
            ));
        }
        // Only the last four are kept: no funding adapter needs more.
        masked
    };
    let month = fields
        .trimmed("expirationMonth")
        .parse::<u8>()
        .ok()
        .filter(|m| (1..=12).contains(m));
    let year = fields
        .trimmed("expirationYear")
        .parse::<u16>()
        .ok()
        .filter(|y| (2000..=2200).contains(y));
    match (month, year) {
        (None, _) => errors.push(("expirationMonth", "Give the expiry month, 1 to 12.".into())),
        (_, None) => errors.push(("expirationYear", "Give the expiry year, like 2029.".into())),
        (Some(month), Some(year)) => {
            if u32::from(year) * 100 + u32::from(month) < this_month() {
                errors.push((
                    "expirationYear",
                    "This macro-account has expired; give one that is still valid.".into(),
                ));
            }
        }
    }
    if !time_zone.is_empty() && shown::parse_zone(&time_zone).is_err() {
        errors.push((
            "timeZone",
            "Give a time zone of the IANA database, like Europe/Paris or America/New_York, or leave it empty.".into(),
        ));
    }
    Profile {
        salutation,
        first_name,
        middle_name,
        last_name,
        street,
        city,
        state,
        zip_code,
        country,
        macroaccount_co,
        macroaccount_id,
        expiration_month: month.unwrap_or(0),
        expiration_year: year.unwrap_or(0),
        time_zone,
    }
}

fn display_name(profile: &Profile) -> String {
    [
        &profile.first_name,
        &profile.middle_name,
        &profile.last_name,
    ]
    .into_iter()
    .filter(|part| !part.is_empty())
    .cloned()
    .collect::<Vec<_>>()
    .join(" ")
}

async fn register(
    State(service): State<Arc<Service>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let web = &service.web;
    let (session, new, fields) = match posted_form(web, &headers, &body) {
        Ok(posted) => posted,
        Err(refused) => return *refused,
    };
    let mut errors = Vec::new();
    let profile = check_profile(&fields, &mut errors);
    let email = fields.trimmed("emailAddress");
    if registry_email_bad(&email) {
        errors.push((
            "emailAddress",
            "Give an e-mail address like ada@example.org.".into(),
        ));
    }
    let password = fields.get("password").to_owned();
    if let Some(weak) = password::weakness(
        &password,
        &[&profile.first_name, &profile.last_name, &email],
    ) {
        errors.push(("password", weak.to_owned()));
    }
    if password != fields.get("passwordCopy") {
        errors.push(("passwordCopy", "The two passwords differ.".into()));
    }
    if fields.get("agrees").is_empty() {
        errors.push((
            "agrees",
            "You must agree to the branch's terms to register.".into(),
        ));
    }
    let form = pages::RegistrationForm::from_fields(&fields);
    if errors.is_empty() {
        // A known address is refused before the costly password derivation.
        match service.backoffice.store().customer_by_email(&email) {
            Ok(None) => {}
            Ok(Some(_)) => errors.push(("emailAddress", EMAIL_TAKEN.into())),
            Err(error) => return trouble(web, &session, &error),
        }
    }
    if errors.is_empty() && !web.sessions.may_register(&peer.ip().to_string()) {
        errors.push((
            "form",
            "Too many registrations from your address; please try again later.".into(),
        ));
    }
    if errors.is_empty() {
        let iterations = web.config.password_iterations;
        let hashed: PasswordHash = match web
            .heavy(move || password::hash(&password, iterations))
            .await
        {
            Ok(hashed) => hashed,
            Err(error) => return trouble(web, &session, &error),
        };
        let registration = Registration {
            name: display_name(&profile),
            email: email.clone(),
            profile: Some(profile),
            password: Some(hashed),
        };
        match service
            .backoffice
            .store()
            .register_customer(&service.bid, registration)
        {
            Ok(customer) => {
                let session = web.sessions.log_in(&session.token, customer.cid);
                return page(
                    web,
                    &session,
                    true,
                    StatusCode::OK,
                    pages::registered(&session, &customer),
                );
            }
            Err(StoreError::Registry(RegistryError::EmailTaken)) => {
                errors.push(("emailAddress", EMAIL_TAKEN.into()));
            }
            Err(StoreError::Registry(error)) => errors.push(("form", error.to_string())),
            Err(error) => return trouble(web, &session, &error),
        }
    }
    page(
        web,
        &session,
        new,
        StatusCode::UNPROCESSABLE_ENTITY,
        pages::entry(&session, &form, &errors, &web.config.phone),
    )
}

const EMAIL_TAKEN: &str = "This e-mail address is already registered. Start a session instead, or ask for a new \
     password.";

fn registry_email_bad(email: &str) -> bool {
    crate::registry::check_email(email).is_err()
}

/// The customer a login or reset form names, by CID or e-mail address.
fn customer_named(service: &Service, who: &str) -> Result<Option<Customer>, StoreError> {
    let store = service.backoffice.store();
    match Cid::parse(who) {
        Ok(cid) => store.customer(&cid),
        Err(_) => store.customer_by_email(who),
    }
}

#[derive(serde::Deserialize)]
struct NextQuery {
    #[serde(default)]
    next: String,
}

async fn login_page(
    State(service): State<Arc<Service>>,
    Query(query): Query<NextQuery>,
    headers: HeaderMap,
) -> Response {
    let web = &service.web;
    let (session, new) = visit(web, &headers);
    let next = after_login(&query.next);
    if session.cid.is_some() {
        return redirect(web, next, None);
    }
    page(
        web,
        &session,
        new,
        StatusCode::OK,
        pages::login(&session, "", next, None),
    )
}

async fn login(
    State(service): State<Arc<Service>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let web = &service.web;
    let (session, new, fields) = match posted_form(web, &headers, &body) {
        Ok(posted) => posted,
        Err(refused) => return *refused,
    };
    let who = fields.trimmed("who");
    let next = after_login(fields.get("next"));
    let address = peer.ip().to_string();
    let customer = match customer_named(&service, &who) {
        Ok(customer) => customer,
        Err(error) => return trouble(web, &session, &error),
    };
    // Failures count against the account whichever name was typed for it
    // (CID or address), so switching does not double the allowance; an
    // unknown name counts against itself.
    let account = customer
        .as_ref()
        .map_or_else(|| who.clone(), |customer| customer.cid.to_string());
    let Some(attempt) = web.sessions.reserve_attempt(&account, &address) else {
        return page(
            web,
            &session,
            new,
            StatusCode::TOO_MANY_REQUESTS,
            pages::login(
                &session,
                &who,
                next,
                Some(&format!(
                    "Too many failed attempts. Wait 15 minutes, ask for a new password, or \
                     call the branch at {}.",
                    web.config.phone
                )),
            ),
        );
    };
    let typed = fields.get("password").to_owned();
    let iterations = web.config.password_iterations;
    let stored = customer
        .as_ref()
        .and_then(|customer| customer.password.clone());
    let matches = web
        .heavy(move || match stored {
            Some(stored) => password::verify(&typed, &stored),
            None => {
                password::verify_nothing(&typed, iterations);
                false
            }
        })
        .await
        .unwrap_or(false);
    match customer {
        Some(customer) if matches => {
            web.sessions.attempt_succeeded(&account, &address, attempt);
            web.sessions.void_resets(customer.cid);
            let session = web.sessions.log_in(&session.token, customer.cid);
            redirect(web, next, Some(&session))
        }
        // Counted already, when it was reserved.
        _ => page(
            web,
            &session,
            new,
            StatusCode::UNAUTHORIZED,
            pages::login(
                &session,
                &who,
                next,
                Some("The CID or e-mail address, or the password, is wrong."),
            ),
        ),
    }
}

async fn logout(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let web = &service.web;
    let (session, _, _) = match posted_form(web, &headers, &body) {
        Ok(posted) => posted,
        Err(refused) => return *refused,
    };
    web.sessions.log_out(&session.token);
    redirect(web, "/login", None)
}

async fn forgot_page(State(service): State<Arc<Service>>, headers: HeaderMap) -> Response {
    let web = &service.web;
    let (session, new) = visit(web, &headers);
    page(
        web,
        &session,
        new,
        StatusCode::OK,
        pages::forgot(&session, None),
    )
}

async fn forgot(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let web = &service.web;
    let (session, new, fields) = match posted_form(web, &headers, &body) {
        Ok(posted) => posted,
        Err(refused) => return *refused,
    };
    let who = fields.trimmed("who");
    match customer_named(&service, &who) {
        // Past the allowance nothing more is sent, and the page reads the same.
        Ok(Some(customer)) if web.sessions.may_mail_reset(customer.cid) => {
            let token = web.sessions.new_reset(customer.cid);
            let link = format!(
                "{}/reset?token={token}",
                web.config.public_url.trim_end_matches('/')
            );
            if let Err(error) = send_mail(
                &web.config,
                &customer.email,
                "Your password",
                &pages::reset_mail(&customer, &link, &web.config.phone),
            ) {
                return trouble(web, &session, &error);
            }
        }
        Ok(_) => {}
        Err(error) => return trouble(web, &session, &error),
    }
    // The same answer whether or not the account exists.
    page(
        web,
        &session,
        new,
        StatusCode::OK,
        pages::forgot(
            &session,
            Some(
                "If this account exists, a link to set a new password was sent to its e-mail address. It works once, for an hour.",
            ),
        ),
    )
}

/// Writes a message to the outbox (one file per message); a mail relay or
/// the tests pick it up from there.
fn send_mail(config: &WebConfig, to: &str, subject: &str, body: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Messages carry reset links: owner-only, like the store.
    durable::private_dir(&config.outbox)?;
    let name = format!("{}-{}.eml", crate::now_ms(), &password::random_token()[..8]);
    let temporary = config.outbox.join(format!(".{name}"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)?;
    write!(
        file,
        "To: {to}\r\nSubject: {subject}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    )?;
    file.sync_all()?;
    std::fs::rename(&temporary, config.outbox.join(name))
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    #[serde(default)]
    token: String,
}

async fn reset_page(
    State(service): State<Arc<Service>>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    let web = &service.web;
    let (session, new) = visit(web, &headers);
    if web.sessions.reset_for(&query.token).is_none() {
        return link_gone(web, &session, new);
    }
    page(
        web,
        &session,
        new,
        StatusCode::OK,
        pages::reset(&session, &query.token, None),
    )
}

async fn reset(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let web = &service.web;
    let (session, new, fields) = match posted_form(web, &headers, &body) {
        Ok(posted) => posted,
        Err(refused) => return *refused,
    };
    let token = fields.get("token").to_owned();
    let Some(cid) = web.sessions.reset_for(&token) else {
        return link_gone(web, &session, new);
    };
    let store = service.backoffice.store();
    let customer = match store.customer(&cid) {
        Ok(Some(customer)) => customer,
        Ok(None) => return redirect(web, "/login", None),
        Err(error) => return trouble(web, &session, &error),
    };
    let typed = fields.get("password").to_owned();
    let mut problem =
        password::weakness(&typed, &[&customer.name, &customer.email]).map(str::to_owned);
    if problem.is_none() && typed != fields.get("passwordCopy") {
        problem = Some("The two passwords differ.".to_owned());
    }
    if let Some(problem) = problem {
        return page(
            web,
            &session,
            new,
            StatusCode::UNPROCESSABLE_ENTITY,
            pages::reset(&session, &token, Some(&problem)),
        );
    }
    if web.sessions.take_reset(&token) != Some(cid) {
        return link_gone(web, &session, new);
    }
    let iterations = web.config.password_iterations;
    let hashed = match web.heavy(move || password::hash(&typed, iterations)).await {
        Ok(hashed) => hashed,
        Err(error) => return trouble(web, &session, &error),
    };
    // Only the password changes: an operator's deny or credit limit, or a
    // profile edit, made meanwhile stays.
    if let Err(error) = store.change_customer(&cid, &|customer| {
        customer.password = Some(hashed.clone());
    }) {
        return trouble(web, &session, &error);
    }
    web.sessions.log_out_everywhere(cid);
    web.sessions.succeeded(cid.as_str());
    let session = web.sessions.log_in(&session.token, cid);
    redirect(web, "/account", Some(&session))
}

async fn account_page(State(service): State<Arc<Service>>, headers: HeaderMap) -> Response {
    let (session, customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    account_response(
        &service,
        &session,
        &customer,
        AccountNotes::default(),
        StatusCode::OK,
    )
}

/// What the account page says beyond the records: the registration form's
/// refusals, and notices for the form and for the grants.
#[derive(Default)]
struct AccountNotes<'a> {
    errors: &'a [(&'static str, String)],
    notice: Option<&'a str>,
    grants_notice: Option<&'a str>,
    products_notice: Option<&'a str>,
    top_up: Option<(&'a str, bool)>,
    /// The top-up form to show again as it was sent (its key and amount):
    /// after a failure, sending it again completes that top-up.
    top_up_again: Option<(&'a str, &'a str)>,
}

fn account_response(
    service: &Service,
    session: &Session,
    customer: &Customer,
    notes: AccountNotes<'_>,
    status: StatusCode,
) -> Response {
    let web = &service.web;
    let store = service.backoffice.store();
    let products = match store.products_of(&customer.cid) {
        Ok(products) => products,
        Err(error) => return trouble(web, session, &error),
    };
    let grants = match store.grants_of_customer(&customer.cid) {
        Ok(grants) => grants,
        Err(error) => return trouble(web, session, &error),
    };
    let balance = service
        .backoffice
        .balance(&AccountId::Customer(customer.cid));
    let view = pages::AccountView {
        customer,
        balance,
        products: &products,
        grants: &grants,
        now_ms: crate::now_ms(),
        errors: notes.errors,
        notice: notes.notice,
        grants_notice: notes.grants_notice,
        products_notice: notes.products_notice,
        top_up: notes.top_up,
        top_up_form: (web.config.top_up && !customer.denied).then(|| {
            notes.top_up_again.map_or_else(
                || (new_top_up_key(), String::new()),
                |(key, amount)| (key.to_owned(), amount.to_owned()),
            )
        }),
        shown: &web.shown_for(customer),
    };
    page(web, session, false, status, pages::account(session, &view))
}

/// Most one top-up may add, in units of the branch's currency.
pub const TOP_UP_MAX_UNITS: i64 = 10_000;

/// Hex digits of a top-up form's key (96 random bits).
const TOP_UP_KEY_DIGITS: usize = 24;

/// A new top-up form's key.
fn new_top_up_key() -> String {
    funding::Reference::random().as_str()[..TOP_UP_KEY_DIGITS].to_owned()
}

/// The micro-account's reference for a top-up: the form's random key
/// (made when the form was shown) under `web:` and the customer's CID, so
/// that a customer can neither reuse another's reference nor take one the
/// operator will use (`web:` + a CID of at most 30 bytes + `:` + 24 digits
/// fits the references' 64 bytes).
fn top_up_reference(cid: &Cid, key: &str) -> Option<funding::Reference> {
    let plain = key.len() == TOP_UP_KEY_DIGITS
        && key
            .bytes()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'));
    plain
        .then(|| funding::Reference::parse(&format!("web:{cid}:{key}")).ok())
        .flatten()
}

/// Checks a typed top-up amount: positive, in whole minor units of the
/// currency, at most [`TOP_UP_MAX_UNITS`].
fn top_up_amount(typed: &str, currency: &shown::Currency) -> Result<Amount, String> {
    let most = Amount::from_units(TOP_UP_MAX_UNITS).unwrap_or(Amount::ZERO);
    let refused = || {
        let least = Amount::try_from_nanos(10i128.pow(9 - currency.places().min(9)))
            .unwrap_or(Amount::ZERO);
        format!(
            "Type an amount from {} to {}, in whole {}, like {}.",
            currency.total(least),
            currency.total(most),
            if currency.places() == 0 {
                "units"
            } else {
                "cents"
            },
            currency.rounded(Amount::from_units(20).unwrap_or(Amount::ZERO)),
        )
    };
    let typed = typed.trim();
    let amount = Amount::parse(typed).map_err(|_| refused())?;
    let places = typed.split_once('.').map_or(0, |(_, after)| after.len());
    if !amount.is_positive() || places > currency.places() as usize || amount > most {
        return Err(refused());
    }
    Ok(amount)
}

/// Funds the session customer's micro-account from their macro-account
/// through the branch's processor (`funding::MacroAccounts`), once per form:
/// the form's key is the deposit's idempotency key, so a second submit of
/// the same form (a double click, a reload, a retry after a lost answer)
/// pays once and says so.
async fn top_up(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (session, customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let fields = Fields::parse(&body);
    if !csrf_ok(&session, &fields) {
        return csrf_refused(&service.web, &session, false);
    }
    let typed = fields.trimmed("amount");
    let key = fields.get("key");
    // `again`: show the form as it was sent, so that sending it again
    // completes this top-up rather than starting another.
    let respond = |notice: &str, ok: bool, again: bool, status| {
        account_response(
            &service,
            &session,
            &customer,
            AccountNotes {
                top_up: Some((notice, ok)),
                top_up_again: again.then_some((key, typed.as_str())),
                ..AccountNotes::default()
            },
            status,
        )
    };
    if !service.web.config.top_up {
        return respond(
            "This branch takes money in another way: call it to fund your account. Nothing was paid.",
            false,
            false,
            StatusCode::NOT_FOUND,
        );
    }
    if customer.denied {
        return respond(
            &format!(
                "Service is denied on this account: nothing was paid. Call the branch at {}.",
                service.web.config.phone
            ),
            false,
            false,
            StatusCode::FORBIDDEN,
        );
    }
    let currency = &service.web.config.shown.currency;
    let amount = match top_up_amount(&typed, currency) {
        Ok(amount) => amount,
        Err(why) => return respond(&why, false, false, StatusCode::UNPROCESSABLE_ENTITY),
    };
    let Some(reference) = top_up_reference(&customer.cid, key) else {
        return respond(
            "This form is out of date: nothing was paid. Reload the page and try again.",
            false,
            false,
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    };
    // One collection per reference at a time; the guard lets go however
    // the call ends.
    struct InFlight<'a>(&'a Web, String);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            if let Ok(mut running) = self.0.topping_up.lock() {
                running.remove(&self.1);
            }
        }
    }
    let fresh = service
        .web
        .topping_up
        .lock()
        .map(|mut running| running.insert(reference.as_str().to_owned()))
        .unwrap_or(false);
    if !fresh {
        return respond(
            "This top-up is being made right now: reload the account page in a moment to see it. It will be paid once.",
            true,
            false,
            StatusCode::CONFLICT,
        );
    }
    let _in_flight = InFlight(&service.web, reference.as_str().to_owned());
    // Collection and the durable write block: off the async workers, at
    // most one per core at a time.
    let worker = Arc::clone(&service);
    let payer = customer.clone();
    let done = service
        .web
        .heavy(move || {
            worker
                .backoffice
                .deposit_once(&*worker.funding, &payer, amount, &reference)
        })
        .await;
    match done {
        Ok(Ok(deposited)) if deposited.repeated => respond(
            &format!(
                "This top-up was already made: {} was added once, not again.",
                currency.total(amount)
            ),
            true,
            false,
            StatusCode::OK,
        ),
        Ok(Ok(deposited)) => respond(
            &format!(
                "{} was added to your micro-account (transfer {}).",
                currency.total(amount),
                deposited.transfer.id.0
            ),
            true,
            false,
            StatusCode::OK,
        ),
        Ok(Err(fault)) if fault.code == proto::FaultCode::RecordRefused.code() => respond(
            &format!("Nothing was paid: {}", fault.message),
            false,
            false,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        Ok(Err(fault)) => {
            tracing::error!(cid = %customer.cid, fault = %fault.message, "a top-up failed");
            respond(
                &format!(
                    "The top-up could not be completed. Sending this form again (as it is below) finishes it without paying twice. If it keeps failing, call {}.",
                    service.web.config.phone
                ),
                false,
                true,
                StatusCode::SERVICE_UNAVAILABLE,
            )
        }
        Err(error) => trouble(&service.web, &session, &error),
    }
}

/// The components a product of the session's customer uses inside.
async fn set_components(
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
    let respond = |notice: &str, status| {
        account_response(
            &service,
            &session,
            &customer,
            AccountNotes {
                products_notice: Some(notice),
                ..AccountNotes::default()
            },
            status,
        )
    };
    let Ok(pid) = fields.trimmed("pid").parse::<proto::Pid>() else {
        return respond(
            "No such product of yours: nothing was changed.",
            StatusCode::NOT_FOUND,
        );
    };
    let typed = fields.get("components");
    let mut components = Vec::new();
    for word in typed
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|word| !word.is_empty())
    {
        match word.parse::<proto::Pid>() {
            Ok(component) => components.push(component),
            Err(_) => {
                return respond(
                    "Components are PIDs such as B1-P2, separated by spaces: nothing was changed.",
                    StatusCode::UNPROCESSABLE_ENTITY,
                );
            }
        }
    }
    let store = service.backoffice.store();
    match store.set_components(&pid, Some(&customer.cid), &components) {
        Ok(product) => {
            tracing::info!(pid = %product.pid, components = product.components.len(), "components declared");
            respond(
                &format!("The components of {pid} are saved."),
                StatusCode::OK,
            )
        }
        Err(StoreError::Registry(RegistryError::UnknownProduct(_))) => respond(
            "No such product of yours: nothing was changed.",
            StatusCode::NOT_FOUND,
        ),
        Err(StoreError::Registry(error)) => respond(
            &format!("The components were not saved: {error}."),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        Err(error) => trouble(web, &session, &error),
    }
}

async fn edit_account(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (session, mut customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let web = &service.web;
    let fields = Fields::parse(&body);
    if !csrf_ok(&session, &fields) {
        return csrf_refused(web, &session, false);
    }
    let mut errors = Vec::new();
    let profile = check_profile(&fields, &mut errors);
    let email = fields.trimmed("emailAddress");
    if registry_email_bad(&email) {
        errors.push((
            "emailAddress",
            "Give an e-mail address like ada@example.org.".into(),
        ));
    }
    let phone = match fields.trimmed("telephone").as_str() {
        "" => None,
        typed => match crate::registry::phone_number(typed) {
            Ok(number) => Some(number),
            Err(_) => {
                errors.push((
                    "telephone",
                    "Give the number in international form: + and the country code, like \
                     +44 20 7946 0958."
                        .into(),
                ));
                None
            }
        },
    };
    // The page again with `errors`, refused for a throttle (429).
    let throttled = |errors: &[(&'static str, String)]| {
        account_response(
            &service,
            &session,
            &customer,
            AccountNotes {
                errors,
                ..AccountNotes::default()
            },
            StatusCode::TOO_MANY_REQUESTS,
        )
    };
    // A new number is counted before the store is asked whether another
    // account holds it, so that one account cannot try number after number.
    if errors.is_empty()
        && phone.is_some()
        && phone != customer.phone
        && !web.sessions.may_change_phone(customer.cid)
    {
        errors.push((
            "telephone",
            format!(
                "You changed the telephone number {} times in 15 minutes. Wait, or call the \
                 branch at {}.",
                session::PHONE_CHANGES_MAX,
                web.config.phone
            ),
        ));
        return throttled(&errors);
    }
    // The address is where password resets go: changing it needs the
    // current password (counted like a login attempt), and the old address
    // is told.
    let old_email = customer.email.clone();
    let email_changes = !email.eq_ignore_ascii_case(&old_email);
    if errors.is_empty() && email_changes {
        let account = customer.cid.to_string();
        let Some(attempt) = web.sessions.reserve_attempt(&account, "account page") else {
            errors.push((
                "currentPassword",
                format!(
                    "Too many wrong passwords. Wait 15 minutes, or call the branch at {}.",
                    web.config.phone
                ),
            ));
            return throttled(&errors);
        };
        let typed = fields.get("currentPassword").to_owned();
        let stored = customer.password.clone();
        let matches = web
            .heavy(move || stored.is_some_and(|stored| password::verify(&typed, &stored)))
            .await
            .unwrap_or(false);
        if matches {
            web.sessions
                .attempt_succeeded(&account, "account page", attempt);
        } else {
            errors.push((
                "currentPassword",
                "Give your current password to change the e-mail address.".into(),
            ));
        }
    }
    if errors.is_empty() {
        // Only the contact details change: the deny flag, credit limit and
        // password are whatever they are now, not what the page read.
        let name = display_name(&profile);
        let changed = service
            .backoffice
            .store()
            .change_customer(&customer.cid, &|stored| {
                stored.name.clone_from(&name);
                stored.email.clone_from(&email);
                stored.profile = Some(profile.clone());
                stored.phone.clone_from(&phone);
            });
        match changed {
            Ok(saved) => {
                customer = saved;
                if email_changes
                    && let Err(error) = send_mail(
                        &web.config,
                        &old_email,
                        "Your e-mail address was changed",
                        &pages::email_changed_mail(&customer, &web.config.phone),
                    )
                {
                    tracing::error!(%error, cid = %customer.cid, "could not tell the old address of its change");
                }
                return account_response(
                    &service,
                    &session,
                    &customer,
                    AccountNotes {
                        notice: Some("Saved."),
                        ..AccountNotes::default()
                    },
                    StatusCode::OK,
                );
            }
            Err(StoreError::Registry(RegistryError::EmailTaken)) => errors.push((
                "emailAddress",
                "Another account has this e-mail address.".into(),
            )),
            Err(StoreError::Registry(RegistryError::PhoneTaken)) => errors.push((
                "telephone",
                "Another account has this telephone number. If it is yours, call the branch."
                    .into(),
            )),
            Err(StoreError::Registry(error)) => errors.push(("form", error.to_string())),
            Err(error) => return trouble(web, &session, &error),
        }
    }
    account_response(
        &service,
        &session,
        &customer,
        AccountNotes {
            errors: &errors,
            ..AccountNotes::default()
        },
        StatusCode::UNPROCESSABLE_ENTITY,
    )
}

async fn new_product_page(State(service): State<Arc<Service>>, headers: HeaderMap) -> Response {
    let (session, _customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    page(
        &service.web,
        &session,
        false,
        StatusCode::OK,
        pages::new_product(&session, &pages::ProductForm::default(), &[]),
    )
}

async fn add_product(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    mut multipart: Multipart,
) -> Response {
    let (session, customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let web = &service.web;
    let mut form = pages::ProductForm::default();
    let mut csrf = String::new();
    let mut agrees = false;
    let mut module: Option<Vec<u8>> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(error) => return upload_refused(web, &session, &error),
        };
        let name = field.name().unwrap_or_default().to_owned();
        let bytes = match field.bytes().await {
            Ok(bytes) => bytes,
            Err(error) => return upload_refused(web, &session, &error),
        };
        let text = || String::from_utf8_lossy(&bytes).trim().to_owned();
        match name.as_str() {
            "csrf" => csrf = text(),
            "name" => form.name = text(),
            "description" => form.description = text(),
            "terms" => form.terms = text(),
            "maxPrice" => form.max_price = text(),
            "agrees" => agrees = !bytes.is_empty(),
            "taca" => module = Some(bytes.to_vec()),
            _ => {}
        }
    }
    if !proto::auth::equal_in_constant_time(csrf.as_bytes(), session.csrf.as_bytes()) {
        return csrf_refused(web, &session, false);
    }
    let mut errors: Vec<(&'static str, String)> = Vec::new();
    if let Err(error) =
        crate::registry::check_text("name", &form.name, crate::registry::NAME_BYTES_MAX)
    {
        errors.push(("name", format!("The product's {error}.")));
    }
    if form.description.len() > crate::registry::TERMS_BYTES_MAX {
        errors.push(("description", "The description is too long.".into()));
    }
    if let Err(error) =
        crate::registry::check_text("terms", &form.terms, crate::registry::TERMS_BYTES_MAX)
    {
        errors.push(("terms", format!("The {error}.")));
    }
    let max_price = match Amount::parse(&form.max_price) {
        Ok(max) if max.is_positive() => Some(max),
        _ => {
            errors.push((
                "maxPrice",
                "The maximum price per use must be an amount above 0, such as 0.25.".into(),
            ));
            None
        }
    };
    if !agrees {
        errors.push((
            "agrees",
            "You must agree to the producer terms to register a product.".into(),
        ));
    }
    let module = module.filter(|bytes| !bytes.is_empty());
    let mut busy = false;
    match &module {
        None => errors.push(("taca", "Choose the TACA module (.wasm) to upload.".into())),
        Some(bytes) => {
            // Checked in a process of its own, bounded in time and memory,
            // on the samples `taca check` tries (`pricing::guard`); if the
            // uploader goes away, dropping this future kills it.
            let samples = crate::pricing::UPLOAD_SAMPLES.map(str::to_owned).to_vec();
            let checked = match Guard::current() {
                Ok(guard) => guard.check(bytes.clone(), samples).await,
                Err(error) => Err(error),
            };
            match checked {
                Ok(_) => {}
                Err(GuardError::Refused(refused)) => {
                    errors.push(("taca", format!("The module was refused: {refused}.")))
                }
                Err(GuardError::Busy) => {
                    busy = true;
                    errors.push((
                        "taca",
                        format!(
                            "Busy, try again: the backoffice is checking {CHECKS_AT_ONCE_MAX} \
                             other modules right now. Nothing was registered; send the form \
                             again in a minute."
                        ),
                    ))
                }
                Err(error) => return trouble(web, &session, &error),
            }
        }
    }
    if errors.is_empty() {
        let module = module.expect("checked above");
        let new = crate::store::NewProduct {
            owner: &customer.cid,
            name: &form.name,
            description: &form.description,
            terms: &form.terms,
            taca: &module,
            max_price: max_price.expect("checked above"),
        };
        match service.backoffice.store().create_product(&service.bid, new) {
            Ok(product) => {
                return page(
                    web,
                    &session,
                    false,
                    StatusCode::OK,
                    pages::product_added(&session, &product, &service.web.shown_for(&customer)),
                );
            }
            Err(StoreError::Registry(error)) => errors.push(("form", error.to_string())),
            Err(error) => return trouble(web, &session, &error),
        }
    }
    let status = if busy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    page(
        web,
        &session,
        false,
        status,
        pages::new_product(&session, &form, &errors),
    )
}

fn link_gone(web: &Web, session: &Session, new: bool) -> Response {
    page(
        web,
        session,
        new,
        StatusCode::GONE,
        pages::message(
            session,
            "Link used or expired",
            "This link was used already or is older than an hour. Ask for a new one on the \
             login page.",
        ),
    )
}

fn upload_refused(
    web: &Web,
    session: &Session,
    error: &axum::extract::multipart::MultipartError,
) -> Response {
    page(
        web,
        session,
        false,
        error.status(),
        pages::message(
            session,
            "Upload refused",
            &format!(
                "The upload could not be read: {}. A TACA module may have at most \
                 {MODULE_BYTES_MAX} bytes.",
                error.body_text()
            ),
        ),
    )
}

async fn meters_page(State(service): State<Arc<Service>>, headers: HeaderMap) -> Response {
    let (session, customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    meters_answer(&service, &session, &customer, StatusCode::OK, None)
}

/// The meters page of `customer` with `notice` above the table: their
/// meters and service credentials, and their products (a service
/// credential is made for one of them).
fn meters_answer(
    service: &Service,
    session: &Session,
    customer: &Customer,
    status: StatusCode,
    notice: Option<pages::MeterNotice<'_>>,
) -> Response {
    let store = service.backoffice.store();
    match (
        store.meters_of(&customer.cid),
        store.products_of(&customer.cid),
    ) {
        (Ok(meters), Ok(products)) => page(
            &service.web,
            session,
            false,
            status,
            pages::meters(
                session,
                &meters,
                &products,
                notice,
                &service.web.config.public_url,
                &service.web.shown_for(customer),
            ),
        ),
        (Err(error), _) | (_, Err(error)) => trouble(&service.web, session, &error),
    }
}

/// `POST /meters` (`csrf`, and `service=PID` for a service credential):
/// registers a meter of the session's customer, or a Parlay X service
/// credential for one of their products (`docs/parlayx.md`), and shows
/// its secret this once.
async fn add_meter(
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
    let store = service.backoffice.store();
    let product = match fields.trimmed("service").as_str() {
        "" => None,
        named => match service_product(store, &customer, named) {
            Ok(pid) => Some(pid),
            Err(Ok((status, title, text))) => {
                return page(
                    web,
                    &session,
                    false,
                    status,
                    pages::message(&session, title, text),
                );
            }
            Err(Err(error)) => return trouble(web, &session, &error),
        },
    };
    match store.create_meter_for(&service.bid, &customer.cid, product.as_ref()) {
        Ok(meter) => {
            tracing::info!(mid = %meter.mid, service = ?meter.service, "meter registered on the web pages");
            meters_answer(
                &service,
                &session,
                &customer,
                StatusCode::OK,
                Some(pages::MeterNotice::Registered(&meter)),
            )
        }
        Err(error) => trouble(web, &session, &error),
    }
}

/// Why a service credential is not made: a page's status, title and text.
type NoService = (StatusCode, &'static str, &'static str);

/// The product `named` (a PID) of `customer` a service credential may be
/// made for: theirs (another customer's reads as no product at all), by
/// its PID (a test PID is never charged), and with a maximum price per
/// use, which bounds every Parlay X charge.
fn service_product(
    store: &crate::store::AnyStore,
    customer: &Customer,
    named: &str,
) -> Result<Pid, Result<NoService, StoreError>> {
    let unknown = (
        StatusCode::NOT_FOUND,
        "No such product",
        "You have no product with this PID, so no service credential was made. A service \
         credential charges for one of your products, named by its PID (not its test PID).",
    );
    let Ok(pid) = named.parse::<Pid>() else {
        return Err(Ok(unknown));
    };
    let product = match store.product(&pid) {
        Ok(Some(product)) if product.owner == customer.cid && product.pid == pid => product,
        Ok(_) => return Err(Ok(unknown)),
        Err(error) => return Err(Err(error)),
    };
    if product.max_price.is_none() {
        return Err(Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            "No maximum price",
            "This product has no maximum price per use, which bounds every charge a service \
             makes, so no service credential was made. Upload the product again with a maximum.",
        )));
    }
    Ok(pid)
}

/// `POST /meters/rotate` (`csrf`, `mid`, `leaked`): gives a meter of the
/// session's customer a new secret, shown once on the answer; the old one
/// works for `ROTATION_GRACE_MS_DEFAULT` more, or not at all when
/// `leaked=yes`.
async fn rotate_meter(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let fields = Fields::parse(&body);
    let grace_ms = if fields.get("leaked") == "yes" {
        0
    } else {
        crate::registry::ROTATION_GRACE_MS_DEFAULT
    };
    change_meter(&service, &headers, &fields, |store, mid, by| {
        store
            .rotate_meter_secret(mid, by, crate::now_ms(), grace_ms)
            .map(|meter| {
                tracing::info!(%mid, grace_ms, "meter secret rotated on the web pages");
                (meter, MeterChange::Rotated)
            })
    })
}

/// `POST /meters/revoke` (`csrf`, `mid`, `confirm=yes`): revokes a meter of
/// the session's customer, for good.
async fn revoke_meter(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let fields = Fields::parse(&body);
    let confirmed = fields.get("confirm") == "yes";
    change_meter(&service, &headers, &fields, |store, mid, by| {
        if !confirmed {
            return Ok((
                store.meter(mid)?.ok_or(RegistryError::UnknownMeter(*mid))?,
                MeterChange::NotConfirmed,
            ));
        }
        store.revoke_meter(mid, by, crate::now_ms()).map(|meter| {
            tracing::info!(%mid, "meter revoked on the web pages");
            (meter, MeterChange::Revoked)
        })
    })
}

/// What a meter form did.
enum MeterChange {
    Rotated,
    Revoked,
    NotConfirmed,
}

/// Runs `change` on the meter the form names, as its owner (the
/// session's customer: another customer's MID reads as no meter at all),
/// and answers the meters page.
fn change_meter(
    service: &Service,
    headers: &HeaderMap,
    fields: &Fields,
    change: impl FnOnce(
        &crate::store::AnyStore,
        &proto::Mid,
        crate::registry::Actor,
    ) -> Result<(Meter, MeterChange), StoreError>,
) -> Response {
    let (session, customer) = match customer_of(service, headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let web = &service.web;
    if !csrf_ok(&session, fields) {
        return csrf_refused(web, &session, false);
    }
    let refused = |status: StatusCode, title: &str, text: &str| {
        page(
            web,
            &session,
            false,
            status,
            pages::message(&session, title, text),
        )
    };
    let unknown = || {
        refused(
            StatusCode::NOT_FOUND,
            "No such meter",
            "You registered no meter with this MID, so nothing was changed. Your meters are \
             listed on the meters page.",
        )
    };
    let Ok(mid) = fields.trimmed("mid").parse::<proto::Mid>() else {
        return unknown();
    };
    let store = service.backoffice.store();
    let by = crate::registry::Actor::Owner(customer.cid);
    let (meter, done) = match change(store, &mid, by) {
        Ok((meter, _)) if meter.owner != customer.cid => return unknown(),
        Ok(changed) => changed,
        Err(StoreError::Registry(RegistryError::UnknownMeter(_))) => return unknown(),
        Err(StoreError::Registry(RegistryError::MeterRevoked(_))) => {
            return refused(
                StatusCode::CONFLICT,
                "Meter revoked",
                "This meter is revoked, so it gets no new secret. Register a new meter.",
            );
        }
        Err(error) => return trouble(web, &session, &error),
    };
    let notice = match done {
        MeterChange::Rotated => pages::MeterNotice::Rotated(&meter),
        MeterChange::Revoked => pages::MeterNotice::Revoked(&meter),
        MeterChange::NotConfirmed => {
            return refused(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Not revoked",
                "Revoking a meter cannot be undone: tick the box beside its Revoke button to \
                 confirm. Nothing was changed.",
            );
        }
    };
    meters_answer(service, &session, &customer, StatusCode::OK, Some(notice))
}

#[derive(serde::Deserialize)]
struct MonthQuery {
    month: Option<String>,
}

/// One line of a statement, from the customer's side.
pub struct Line {
    /// The transfer.
    pub transfer: Transfer,
    /// Positive: money in; negative: money out.
    pub signed: Amount,
    /// The balance after it.
    pub balance: Amount,
    /// For a payment a service asked: what the service put on the bill.
    pub note: String,
    /// The name of the product a use or payment was of (empty if unknown).
    pub name: String,
    /// For a use line: the price of one use, when all its uses cost the same.
    pub unit_price: Option<Amount>,
    /// The product a use, payment or correction of one was of.
    pub pid: Option<Pid>,
}

impl Line {
    /// What the line is, for the statement: the transfer's kind with its
    /// product's name and, when every use cost the same, the price of one;
    /// for a service's payment, its description.
    pub fn text(&self, currency: &shown::Currency) -> String {
        let mut what = pages::describe(&self.transfer, &self.name);
        if let (Some(price), crate::ledger::TransferKind::Use { uses, .. }) =
            (self.unit_price, &self.transfer.kind)
            && *uses > 1
        {
            what.push_str(&format!(" at {} each", currency.exact(price)));
        }
        if !self.note.is_empty() {
            what.push_str(": ");
            what.push_str(&self.note);
        }
        what
    }
}

/// Use lines of one statement whose uses are read to find their price of
/// one use; later lines show none (a statement page stays bounded).
pub const UNIT_PRICE_LINES_MAX: usize = 50;
/// Suspended readings looked at for a producer's statement; past it the
/// count shows "or more".
pub const SUSPENSE_LOOKED_AT_MAX: usize = 20_000;

/// Products' names, each looked up once per page.
struct Names<'a> {
    service: &'a Service,
    known: HashMap<Pid, String>,
}

impl Names<'_> {
    fn of(&mut self, pid: &Pid) -> String {
        if let Some(name) = self.known.get(pid) {
            return name.clone();
        }
        let name = self
            .service
            .backoffice
            .store()
            .product(pid)
            .ok()
            .flatten()
            .map(|product| product.name)
            .unwrap_or_default();
        self.known.insert(*pid, name.clone());
        name
    }
}

/// The one price every use of a line cost, from its kept readings; `None`
/// when they differ or are not kept.
fn unit_price_of(service: &Service, transfer: &Transfer) -> Option<Amount> {
    let items = crate::itemised::items_of_transfer(service.backoffice.store(), transfer.id)
        .ok()
        .flatten()?;
    let first = items.first()?.priced.amount;
    items
        .iter()
        .all(|item| item.priced.amount == first)
        .then_some(first)
}

/// The customer's lines in `month` (`YYYYMM`, in the branch's time zone),
/// with the balance before it.
fn statement_lines(service: &Service, cid: Cid, month: u32) -> (Amount, Vec<Line>) {
    let shown = &service.web.config().shown;
    let account = AccountId::Customer(cid);
    let mut opening = Amount::ZERO;
    let mut lines = Vec::new();
    let mut running = Amount::ZERO;
    let mut names = Names {
        service,
        known: HashMap::new(),
    };
    let mut priced_lines = 0;
    // The product of each use and payment of the account, for the
    // corrections that refer to them (in any month before).
    let mut products: HashMap<u64, Pid> = HashMap::new();
    for transfer in service.backoffice.statement(&account) {
        let pid = match &transfer.kind {
            crate::ledger::TransferKind::Use { pid, .. }
            | crate::ledger::TransferKind::Payment { pid, .. } => {
                products.insert(transfer.id.0, *pid);
                Some(*pid)
            }
            crate::ledger::TransferKind::Correction { of } => products.get(&of.0).copied(),
            _ => None,
        };
        let signed = if transfer.credit == account {
            transfer.amount
        } else {
            transfer.amount.negated()
        };
        // Balances are sums of amounts below 10^18 that the ledger already
        // accepted, so this addition cannot overflow where the ledger's did not.
        running = running.checked_add(signed).unwrap_or(running);
        let posted = shown.month_of(transfer.posted_ms);
        if posted < month {
            opening = running;
        } else if posted == month {
            let (note, name, unit_price) = match &transfer.kind {
                crate::ledger::TransferKind::Payment { pid, reference } => (
                    service
                        .backoffice
                        .store()
                        .payment_request(pid, reference)
                        .ok()
                        .flatten()
                        .map(|request| request.description)
                        .unwrap_or_default(),
                    names.of(pid),
                    None,
                ),
                crate::ledger::TransferKind::Use { pid, .. } => {
                    priced_lines += 1;
                    let unit_price = (priced_lines <= UNIT_PRICE_LINES_MAX)
                        .then(|| unit_price_of(service, &transfer))
                        .flatten();
                    (String::new(), names.of(pid), unit_price)
                }
                _ => (String::new(), String::new(), None),
            };
            lines.push(Line {
                transfer,
                signed,
                balance: running,
                note,
                name,
                unit_price,
                pid,
            });
        }
    }
    (opening, lines)
}

/// What each product cost `cid` in the month of `lines`, with the uses
/// that cost nothing (`free`): uses charged, Parlay X payments, less the
/// corrections that gave money back.
fn bought(
    service: &Service,
    cid: Cid,
    own: &std::collections::HashSet<Pid>,
    lines: &[Line],
    free: &[(Pid, u64)],
) -> Vec<pages::Bought> {
    use crate::ledger::TransferKind;
    let account = AccountId::Customer(cid);
    let mut names = Names {
        service,
        known: HashMap::new(),
    };
    let mut by_pid: std::collections::BTreeMap<Pid, pages::Bought> = Default::default();
    fn entry<'a>(
        by_pid: &'a mut std::collections::BTreeMap<Pid, pages::Bought>,
        pid: Pid,
        names: &mut Names<'_>,
    ) -> &'a mut pages::Bought {
        by_pid.entry(pid).or_insert_with(|| pages::Bought {
            pid,
            name: names.of(&pid),
            uses: 0,
            free: 0,
            cost: Amount::ZERO,
            unit_price: None,
            varied: false,
            prices_known: true,
        })
    }
    for line in lines {
        let Some(pid) = line.pid else { continue };
        if own.contains(&pid) {
            continue;
        }
        let transfer = &line.transfer;
        let one = entry(&mut by_pid, pid, &mut names);
        // Money out is cost, money back (a refund, a correction) lowers it.
        one.cost =
            Amount::try_from_nanos(one.cost.nanos() - line.signed.nanos()).unwrap_or(one.cost);
        match &transfer.kind {
            TransferKind::Use { uses, .. } if transfer.debit == account => {
                one.uses = one.uses.saturating_add(*uses);
                match (line.unit_price, one.unit_price) {
                    (None, _) => one.prices_known = false,
                    (Some(price), None) if !one.varied => one.unit_price = Some(price),
                    (Some(price), Some(seen)) if price != seen => {
                        one.unit_price = None;
                        one.varied = true;
                    }
                    _ => {}
                }
            }
            TransferKind::Use { .. } => {}
            _ => one.prices_known = false,
        }
    }
    for (pid, uses) in free {
        entry(&mut by_pid, *pid, &mut names).free = *uses;
    }
    let mut bought: Vec<pages::Bought> = by_pid.into_values().collect();
    for one in &mut bought {
        // A price is claimed only when every charged use's price is known.
        if !one.prices_known {
            one.unit_price = None;
        }
    }
    bought
}

/// What each product of `cid` earned in the month of `lines`: uses and
/// income per day, payers counted, and its readings in suspense.
fn earned(
    service: &Service,
    cid: Cid,
    products: &[crate::registry::Product],
    month: u32,
    lines: &[Line],
) -> Result<Vec<pages::Earned>, StoreError> {
    let shown = &service.web.config().shown;
    let account = AccountId::Customer(cid);
    let days = shown::days_in(month) as usize;
    let mut earned: Vec<pages::Earned> = Vec::new();
    let mut payers: Vec<HashMap<AccountId, i128>> = Vec::new();
    let mut index: HashMap<Pid, usize> = HashMap::new();
    for product in products {
        index.insert(product.pid, earned.len());
        earned.push(pages::Earned {
            pid: product.pid,
            name: product.name.clone(),
            uses: 0,
            income: Amount::ZERO,
            payers: 0,
            top_three: Amount::ZERO,
            suspense: (0, false),
            days: vec![(0, 0); days],
        });
        payers.push(HashMap::new());
    }
    for line in lines {
        use crate::ledger::TransferKind;
        let Some(&at) = line.pid.as_ref().and_then(|pid| index.get(pid)) else {
            continue;
        };
        let transfer = &line.transfer;
        // Money in is income; money paid back (a refund, a correction)
        // lowers it. The payer is the other side of the transfer.
        let nanos = line.signed.nanos();
        let payer = if transfer.credit == account {
            transfer.debit
        } else {
            transfer.credit
        };
        let uses = match &transfer.kind {
            TransferKind::Use { uses, .. } if transfer.credit == account => *uses,
            _ => 0,
        };
        let one = &mut earned[at];
        one.uses = one.uses.saturating_add(uses);
        one.income = Amount::try_from_nanos(one.income.nanos() + nanos).unwrap_or(one.income);
        let day = (shown.day_of(transfer.posted_ms) as usize).clamp(1, days) - 1;
        one.days[day].0 = one.days[day].0.saturating_add(uses);
        one.days[day].1 += nanos;
        *payers[at].entry(payer).or_default() += nanos;
    }
    for (one, paid) in earned.iter_mut().zip(&payers) {
        one.payers = paid.values().filter(|nanos| **nanos > 0).count();
        let mut largest: Vec<i128> = paid.values().copied().filter(|nanos| *nanos > 0).collect();
        largest.sort_unstable_by(|a, b| b.cmp(a));
        let top: i128 = largest.iter().take(3).sum();
        one.top_three = Amount::try_from_nanos(top).unwrap_or(one.income);
    }
    if !earned.is_empty() {
        let mut after = None;
        let mut looked_at = 0;
        loop {
            let page = service
                .backoffice
                .store()
                .suspense_page(after.as_ref(), 1_000)?;
            let Some(last) = page.last() else { break };
            after = Some(crate::store::SuspenseCursor::of(last));
            for reading in &page {
                if let Some(&at) = index.get(&reading.pid) {
                    earned[at].suspense.0 += 1;
                }
            }
            looked_at += page.len();
            if looked_at >= SUSPENSE_LOOKED_AT_MAX && page.len() == 1_000 {
                for one in &mut earned {
                    one.suspense.1 = true;
                }
                break;
            }
        }
    }
    Ok(earned)
}

fn month_param(web: &Web, query: &MonthQuery) -> u32 {
    query
        .month
        .as_deref()
        .and_then(|text| text.parse::<u32>().ok())
        .filter(|month| (190_001..=999_912).contains(month) && (1..=12).contains(&(month % 100)))
        .unwrap_or_else(|| web.config().shown.month_of(crate::now_ms()))
}

async fn statement_page(
    State(service): State<Arc<Service>>,
    Query(query): Query<MonthQuery>,
    headers: HeaderMap,
) -> Response {
    let (session, customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let month = month_param(&service.web, &query);
    // Reading a month's lines, their uses and the suspense is blocking
    // store work: off the async workers, one per core at a time.
    let worker = Arc::clone(&service);
    let session_for_page = session.clone();
    let found = service
        .web
        .heavy(move || {
            let service = worker;
            let (opening, lines) = statement_lines(&service, customer.cid, month);
            let free = service.backoffice.store().free_uses(&customer.cid, month)?;
            let products = service.backoffice.store().products_of(&customer.cid)?;
            let own: std::collections::HashSet<Pid> = products
                .iter()
                .flat_map(|product| [product.pid, product.test_pid])
                .collect();
            let bought = bought(&service, customer.cid, &own, &lines, &free);
            let earned = earned(&service, customer.cid, &products, month, &lines)?;
            let view = pages::StatementView {
                customer: &customer,
                month,
                opening,
                lines: &lines,
                bought: &bought,
                earned: &earned,
                shown: &service.web.shown_for(&customer),
            };
            Ok::<_, StoreError>(pages::statement(&session_for_page, &view))
        })
        .await;
    match found {
        Ok(Ok(markup)) => page(&service.web, &session, false, StatusCode::OK, markup),
        Ok(Err(error)) => trouble(&service.web, &session, &error),
        Err(error) => trouble(&service.web, &session, &error),
    }
}

/// A statement as CSV (RFC 4180, through the `csv` crate): a leading `=`,
/// `+`, `-` or `@` in text is neutralised so a spreadsheet does not run it
/// as a formula; amounts are exact, in the branch's currency.
fn csv_text(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    }
}

/// A CSV file as a download named `filename`.
fn csv_download(filename: &str, rows: &[Vec<String>]) -> Response {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    for row in rows {
        // Writing to a Vec fails only when memory does.
        let _ = writer.write_record(row);
    }
    let body = writer.into_inner().unwrap_or_default();
    let mut response = (
        [
            (CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        body,
    )
        .into_response();
    secure_headers(response.headers_mut());
    response
}

async fn statement_csv(
    State(service): State<Arc<Service>>,
    Query(query): Query<MonthQuery>,
    headers: HeaderMap,
) -> Response {
    let (session, customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let month = month_param(&service.web, &query);
    // Blocking store work: off the async workers, as the page's.
    let worker = Arc::clone(&service);
    let cid = customer.cid;
    let read = service
        .web
        .heavy(move || {
            let (_, lines) = statement_lines(&worker, cid, month);
            worker
                .backoffice
                .store()
                .free_uses(&cid, month)
                .map(|free| (lines, free))
        })
        .await;
    let (lines, free) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(error)) => return trouble(&service.web, &session, &error),
        Err(error) => return trouble(&service.web, &session, &error),
    };
    let shown = &service.web.shown_for(&customer);
    let money = &shown.currency;
    let mut rows = vec![
        [
            "date",
            "transfer",
            "description",
            "product",
            "uses",
            "unit_price",
            "amount",
            "balance",
            "currency",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for line in &lines {
        let (pid, uses) = match &line.transfer.kind {
            crate::ledger::TransferKind::Use { pid, uses, .. } => {
                (pid.as_str().to_owned(), uses.to_string())
            }
            crate::ledger::TransferKind::Payment { pid, .. } => {
                (pid.as_str().to_owned(), String::new())
            }
            _ => (String::new(), String::new()),
        };
        rows.push(vec![
            shown.date(line.transfer.posted_ms),
            line.transfer.id.0.to_string(),
            csv_text(&line.text(money)),
            pid,
            uses,
            line.unit_price
                .map(|price| price.to_string())
                .unwrap_or_default(),
            line.signed.to_string(),
            line.balance.to_string(),
            money.code().to_owned(),
        ]);
    }
    // Free uses move no money: rows without a transfer, amount or balance.
    for (pid, uses) in &free {
        rows.push(vec![
            String::new(),
            String::new(),
            csv_text(&pages::free_uses(*uses, pid)),
            pid.as_str().to_owned(),
            uses.to_string(),
            "0".to_owned(),
            String::new(),
            String::new(),
            money.code().to_owned(),
        ]);
    }
    csv_download(&format!("statement-{}-{month}.csv", customer.cid), &rows)
}

/// Uses shown on one page of a statement line's itemisation.
pub const ITEMS_PAGE_ROWS: usize = 1_000;

#[derive(serde::Deserialize)]
pub(crate) struct ItemsQuery {
    transfer: Option<String>,
    page: Option<String>,
}

/// A statement line's uses, as its customer may see them.
pub struct LineItems {
    /// The line.
    pub transfer: Transfer,
    /// The uses behind it (`None`: not kept).
    pub items: Option<Vec<crate::itemised::LineItem>>,
    /// The customer paid (sees where and how it was used); otherwise they
    /// were paid (sees when and what, not who or on which machine).
    pub paid: bool,
    /// The product's name (empty if unknown).
    pub name: String,
}

/// The uses behind the session customer's statement line `transfer`; `None`
/// when the line is not theirs or not a use.
fn line_items(
    service: &Service,
    cid: Cid,
    query: &ItemsQuery,
) -> Result<Option<LineItems>, StoreError> {
    let Some(id) = query
        .transfer
        .as_deref()
        .and_then(|text| text.parse::<u64>().ok())
    else {
        return Ok(None);
    };
    let account = AccountId::Customer(cid);
    let Some(transfer) = service
        .backoffice
        .statement(&account)
        .into_iter()
        .find(|transfer| transfer.id.0 == id)
    else {
        return Ok(None);
    };
    if !matches!(transfer.kind, crate::ledger::TransferKind::Use { .. }) {
        return Ok(None);
    }
    let items = crate::itemised::items_of_transfer(service.backoffice.store(), transfer.id)?;
    // Where and how a use was made is shown only to the customer whose use
    // it was: a producer who paid for a component used inside their own
    // product (the reading names the product's owner as payer) sees the
    // paid-to view, not the end customer's meter and context.
    let own_uses = items.as_ref().is_none_or(|items| {
        items.iter().all(|item| {
            matches!(
                item.reading.event,
                proto::reading::Event::Commit { payer: Some(proto::Payer::Customer(payer)), .. }
                    if payer == cid
            )
        })
    });
    let name = match &transfer.kind {
        crate::ledger::TransferKind::Use { pid, .. } => Names {
            service,
            known: HashMap::new(),
        }
        .of(pid),
        _ => String::new(),
    };
    Ok(Some(LineItems {
        paid: transfer.debit == account && own_uses,
        name,
        transfer,
        items,
    }))
}

fn no_such_line(web: &Web, session: &Session) -> Response {
    page(
        web,
        session,
        false,
        StatusCode::NOT_FOUND,
        pages::message(
            session,
            "No such line",
            "Your statement has no use line with that number.",
        ),
    )
}

async fn items_page(
    State(service): State<Arc<Service>>,
    Query(query): Query<ItemsQuery>,
    headers: HeaderMap,
) -> Response {
    let (session, customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let number = query
        .page
        .as_deref()
        .and_then(|text| text.parse::<usize>().ok())
        .filter(|number| *number >= 1)
        .unwrap_or(1);
    match line_items(&service, customer.cid, &query) {
        Ok(Some(line)) => page(
            &service.web,
            &session,
            false,
            StatusCode::OK,
            pages::items(&session, &line, number, &service.web.shown_for(&customer)),
        ),
        Ok(None) => no_such_line(&service.web, &session),
        Err(error) => trouble(&service.web, &session, &error),
    }
}

async fn items_csv(
    State(service): State<Arc<Service>>,
    Query(query): Query<ItemsQuery>,
    headers: HeaderMap,
) -> Response {
    let (session, customer) = match customer_of(&service, &headers) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let line = match line_items(&service, customer.cid, &query) {
        Ok(Some(line)) => line,
        Ok(None) => return no_such_line(&service.web, &session),
        Err(error) => return trouble(&service.web, &session, &error),
    };
    let shown = &service.web.shown_for(&customer);
    let mut header = vec!["time"];
    if line.paid {
        header.extend(["meter", "batch", "seq", "context"]);
    }
    header.extend([
        "product",
        "price",
        "currency",
        "earlier_uses_in_month",
        "fuel",
        "taca",
    ]);
    let mut rows = vec![header.into_iter().map(str::to_owned).collect::<Vec<_>>()];
    for item in line.items.iter().flatten() {
        let reading = &item.reading;
        let priced = &item.priced;
        let mut row = vec![shown.time_ms(reading.time_ms)];
        if line.paid {
            row.extend([
                csv_text(item.mid.as_str()),
                csv_text(item.batch.as_str()),
                reading.seq.to_string(),
                csv_text(reading.context.as_str()),
            ]);
        }
        row.extend([
            csv_text(reading.event.id_str()),
            priced.amount.to_string(),
            shown.currency.code().to_owned(),
            priced.period_uses.to_string(),
            priced.fuel.to_string(),
            priced.taca.to_string(),
        ]);
        rows.push(row);
    }
    csv_download(
        &format!("uses-{}-{}.csv", customer.cid, line.transfer.id.0),
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_like_browsers_send_them() {
        let fields = form_urlencoded(b"a=%3Cb%3E+c&empty=&bad=%zz%4&plus=1%2B1&=x&last=1&last=2");
        assert_eq!(
            fields,
            vec![
                ("a".into(), "<b> c".into()),
                ("empty".into(), String::new()),
                ("bad".into(), "%zz%4".into()),
                ("plus".into(), "1+1".into()),
                (String::new(), "x".into()),
                ("last".into(), "1".into()),
                ("last".into(), "2".into()),
            ]
        );
        assert_eq!(Fields::parse(b"last=1&last=2").get("last"), "2");
        assert_eq!(Fields::parse(b"x=%C3%A9").get("x"), "é");
    }

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_text("3 uses of B1-P1"), "3 uses of B1-P1");
        assert_eq!(csv_text("=1+1"), "'=1+1");
        assert_eq!(csv_text("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_text("-2"), "'-2");
        let response = csv_download(
            "x.csv",
            &[
                vec!["a,b".into(), "say \"hi\"".into()],
                vec!["line\nbreak".into(), csv_text("+1")],
            ],
        );
        let body = futures_body(response);
        assert_eq!(
            body,
            "\"a,b\",\"say \"\"hi\"\"\"\r\n\"line\nbreak\",'+1\r\n"
        );
    }

    fn futures_body(response: Response) -> String {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = runtime
            .block_on(http_body_util::BodyExt::collect(response.into_body()))
            .unwrap()
            .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }
}
