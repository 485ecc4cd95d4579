//! The HTML of the web pages. maud escapes every value it renders, so a
//! name with markup in it shows as text.

use maud::{DOCTYPE, Markup, html};
use proto::grant::{GrantRequest, Scope};
use proto::{Amount, Pid};

use super::session::Session;
use super::shown::{Shown, days_in};
use super::{Fields, ITEMS_PAGE_ROWS, Line, LineItems};
use crate::ledger::{Transfer, TransferKind};
use crate::registry::{Customer, Grant, Meter, Product};

/// The one style sheet, served at `/style.css`.
pub const STYLE: &str = "\
body{font-family:system-ui,sans-serif;max-width:60rem;margin:0 auto;padding:1rem;color:#222}\
header{display:flex;gap:1rem;align-items:center;border-bottom:1px solid #ccc;margin-bottom:1rem}\
header form{display:inline}\
label{display:block;margin:.5rem 0 .1rem}\
input[type=text],input[type=email],input[type=password],textarea{width:100%;max-width:30rem}\
.error{color:#a00}.notice{color:#060}\
.refusal{border:1px solid #a00;padding:.5rem 1rem;margin:1rem 0}\
table{border-collapse:collapse}td,th{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:left}\
td.amount{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
pre{background:#f4f4f4;padding:.5rem;overflow-x:auto}\
.spend{fill:#b33}.income{fill:#383}\
.warning{border:1px solid #b60;padding:.5rem 1rem;margin:1rem 0}\
table form{margin:0}\
";

fn layout(session: &Session, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " - superdistribution branch" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header {
                    strong { "Superdistribution branch" }
                    @if session.cid.is_some() {
                        a href="/account" { "Account" }
                        a href="/products/new" { "Register a product" }
                        a href="/meters" { "Meters" }
                        a href="/statement" { "Transactions" }
                        form method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(session.csrf);
                            button type="submit" id="logout" { "Log out" }
                        }
                    } @else {
                        a href="/" { "Register" }
                        a href="/login" { "Start session" }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

fn field_errors(errors: &[(&'static str, String)], name: &str) -> Markup {
    html! {
        @for (_, message) in errors.iter().filter(|(field, _)| *field == name) {
            p.error id={ (name) "-error" } { (message) }
        }
    }
}

/// A text input with its label and its errors.
fn text_input(
    label: &str,
    name: &str,
    kind: &str,
    value: &str,
    errors: &[(&'static str, String)],
) -> Markup {
    html! {
        label for=(name) { (label) }
        input type=(kind) id=(name) name=(name) value=(value);
        (field_errors(errors, name))
    }
}

/// A page with one message.
pub fn message(session: &Session, title: &str, text: &str) -> Markup {
    layout(session, title, html! { p { (text) } })
}

/// What the registration form holds, for showing it again.
#[derive(Debug, Default, Clone)]
pub struct RegistrationForm {
    /// Cox's field names, in order.
    pub values: Vec<(&'static str, String)>,
    /// The agreement box.
    pub agrees: bool,
}

/// The registration fields: name, label, input type. The passwords are
/// never shown again.
const REGISTRATION_FIELDS: [(&str, &str, &str); 16] = [
    ("salutation", "Salutation (optional)", "text"),
    ("firstName", "First name", "text"),
    ("middleName", "Middle name (optional)", "text"),
    ("lastName", "Last name", "text"),
    ("emailAddress", "E-mail address", "email"),
    ("street", "Street and number", "text"),
    ("city", "City", "text"),
    ("state", "State or region (optional)", "text"),
    ("zipCode", "Postal code", "text"),
    ("country", "Country", "text"),
    (
        "macroaccountCo",
        "Card issuer or bank (your macro-account)",
        "text",
    ),
    (
        "macroaccountID",
        "Card or account number (only its last four are kept; type a new one to replace it)",
        "text",
    ),
    ("expirationMonth", "Expires: month (1-12)", "text"),
    ("expirationYear", "Expires: year", "text"),
    (
        "timeZone",
        "Time zone for times on your pages (optional; like Europe/Paris; empty: the branch's)",
        "text",
    ),
    ("password", "", ""),
];

impl RegistrationForm {
    pub(super) fn from_fields(fields: &Fields) -> RegistrationForm {
        RegistrationForm {
            values: REGISTRATION_FIELDS
                .iter()
                .filter(|(name, _, _)| *name != "password")
                .map(|(name, _, _)| (*name, fields.trimmed(name)))
                .collect(),
            agrees: !fields.get("agrees").is_empty(),
        }
    }

    /// The form filled from a customer's record, for editing.
    pub fn of(customer: &Customer) -> RegistrationForm {
        let profile = customer.profile.clone().unwrap_or_default();
        let month = if profile.expiration_month == 0 {
            String::new()
        } else {
            profile.expiration_month.to_string()
        };
        let year = if profile.expiration_year == 0 {
            String::new()
        } else {
            profile.expiration_year.to_string()
        };
        RegistrationForm {
            values: vec![
                ("salutation", profile.salutation),
                ("firstName", profile.first_name),
                ("middleName", profile.middle_name),
                ("lastName", profile.last_name),
                ("emailAddress", customer.email.clone()),
                ("street", profile.street),
                ("city", profile.city),
                ("state", profile.state),
                ("zipCode", profile.zip_code),
                ("country", profile.country),
                ("macroaccountCo", profile.macroaccount_co),
                // Kept masked; masked again for records from before.
                (
                    "macroaccountID",
                    crate::registry::mask_account(&profile.macroaccount_id),
                ),
                ("expirationMonth", month),
                ("expirationYear", year),
                ("timeZone", profile.time_zone),
            ],
            agrees: true,
        }
    }

    fn value(&self, name: &str) -> &str {
        self.values
            .iter()
            .find(|(field, _)| *field == name)
            .map_or("", |(_, value)| value.as_str())
    }
}

fn profile_inputs(form: &RegistrationForm, errors: &[(&'static str, String)]) -> Markup {
    html! {
        @for (name, label, kind) in REGISTRATION_FIELDS.iter().filter(|(name, _, _)| *name != "password") {
            (text_input(label, name, kind, form.value(name), errors))
        }
    }
}

/// The entry page: the registration form, with the refusal's reasons when
/// it was refused.
pub fn entry(
    session: &Session,
    form: &RegistrationForm,
    errors: &[(&'static str, String)],
    phone: &str,
) -> Markup {
    let body = html! {
        @if !errors.is_empty() {
            div.refusal id="refusal" {
                p { strong { "Your registration was refused:" } }
                ul { @for (_, message) in errors { li { (message) } } }
                p { "Questions? Call the branch at " span id="phone" { (phone) } "." }
            }
        }
        p {
            "Register to pay for software by use, and to be paid for yours. "
            "Already registered? " a href="/login" { "Start a session" } "."
        }
        form method="post" action="/" id="register" {
            (csrf(session))
            (profile_inputs(form, errors))
            (text_input(&format!("Password ({})", super::password::RULE), "password", "password", "", errors))
            (text_input("Password again", "passwordCopy", "password", "", errors))
            label {
                input type="checkbox" name="agrees" id="agrees" value="yes" checked[form.agrees];
                " I agree to the branch's terms: uses of metered software are charged to my micro-account, which I fund from my macro-account."
            }
            (field_errors(errors, "agrees"))
            (field_errors(errors, "form"))
            p { button type="submit" id="register-submit" { "Register" } }
        }
    };
    layout(session, "Register", body)
}

/// After a registration: the new CID.
pub fn registered(session: &Session, customer: &Customer) -> Markup {
    let body = html! {
        p { "Welcome, " (customer.name) ". Your customer ID (CID) is:" }
        p { strong id="cid" { (customer.cid.as_str()) } }
        p {
            "To use metered software on a machine, authorize its meter to charge you: run "
            code { "meterd grant " (customer.cid.as_str()) } " there and enter the code it prints on "
            a href="/grant" { "Authorize a meter" } ". Then log in to the meter with "
            code { "meterd login " (customer.cid.as_str()) }
            ". Fund your micro-account before using metered software."
        }
        p { a href="/account" { "Go to your account" } }
    };
    layout(session, "Registered", body)
}

/// The login page; `next` is where a successful login leads.
pub fn login(session: &Session, who: &str, next: &str, error: Option<&str>) -> Markup {
    let body = html! {
        @if let Some(error) = error { p.error id="login-error" { (error) } }
        @if next == "/grant" {
            p id="login-for-grant" { "Start a session to authorize a meter: you will enter its code next." }
        }
        form method="post" action="/login" id="login" {
            (csrf(session))
            input type="hidden" name="next" value=(next);
            label for="who" { "CID or e-mail address" }
            input type="text" id="who" name="who" value=(who) autocomplete="username";
            label for="password" { "Password" }
            input type="password" id="password" name="password" autocomplete="current-password";
            p { button type="submit" id="login-submit" { "Start session" } }
        }
        p { a href="/forgot" { "Forgot the password?" } " · " a href="/" { "Register" } }
    };
    layout(session, "Start session", body)
}

/// The page that asks for a reset link.
pub fn forgot(session: &Session, notice: Option<&str>) -> Markup {
    let body = html! {
        @if let Some(notice) = notice { p.notice id="notice" { (notice) } }
        form method="post" action="/forgot" id="forgot" {
            (csrf(session))
            label for="who" { "CID or e-mail address" }
            input type="text" id="who" name="who";
            p { button type="submit" { "Send me a link" } }
        }
    };
    layout(session, "New password", body)
}

/// The page a reset link opens.
pub fn reset(session: &Session, token: &str, problem: Option<&str>) -> Markup {
    let body = html! {
        @if let Some(problem) = problem { p.error id="password-error" { (problem) } }
        form method="post" action="/reset" id="reset" {
            (csrf(session))
            input type="hidden" name="token" value=(token);
            label for="password" { "New password (" (super::password::RULE) ")" }
            input type="password" id="password" name="password" autocomplete="new-password";
            label for="passwordCopy" { "New password again" }
            input type="password" id="passwordCopy" name="passwordCopy" autocomplete="new-password";
            p { button type="submit" { "Set the password" } }
        }
    };
    layout(session, "Set a new password", body)
}

/// The mail with a reset link.
pub fn reset_mail(customer: &Customer, link: &str, phone: &str) -> String {
    format!(
        "Hello {name},\r\n\r\nsomeone asked for a new password for the account {cid}.\r\n\
         To set one, open this link within an hour; it works once:\r\n\r\n{link}\r\n\r\n\
         If you did not ask for this, someone may be trying to break into your account.\r\n\
         Your password has not changed. Please call the branch at {phone}.\r\n",
        name = customer.name,
        cid = customer.cid,
    )
}

/// The notice to an account's former e-mail address after it changed.
pub fn email_changed_mail(customer: &Customer, phone: &str) -> String {
    format!(
        "Hello {name},\r\n\r\nthe e-mail address of the account {cid} was changed to\r\n\
         {email}; password resets go there from now on.\r\n\r\n\
         If you did not do this, someone may have taken over your account.\r\n\
         Please call the branch at {phone}.\r\n",
        name = customer.name,
        cid = customer.cid,
        email = customer.email,
    )
}

/// What the account page shows.
pub struct AccountView<'a> {
    /// The logged-in customer.
    pub customer: &'a Customer,
    /// The micro-account's balance.
    pub balance: Amount,
    /// The customer's products.
    pub products: &'a [Product],
    /// The grants the customer gave, live or not.
    pub grants: &'a [Grant],
    /// Now, for telling live grants from expired ones.
    pub now_ms: u64,
    /// The registration form's refusals.
    pub errors: &'a [(&'static str, String)],
    /// A notice for the registration form ("Saved.").
    pub notice: Option<&'a str>,
    /// A notice for the grants (one revoked).
    pub grants_notice: Option<&'a str>,
    /// A notice for the products (components saved or refused).
    pub products_notice: Option<&'a str>,
    /// What became of a top-up: the notice, and whether money moved or
    /// was already moved (`false`: a refusal).
    pub top_up: Option<(&'a str, bool)>,
    /// The top-up form's key and amount (none: no form, the branch takes
    /// money another way or the account is denied). The key is the
    /// deposit's idempotency key, new each time the page is shown (unless
    /// a failed top-up is shown again), so the same form sent twice pays
    /// once.
    pub top_up_form: Option<(String, String)>,
    /// The branch's currency and time zone.
    pub shown: &'a Shown,
}

/// A product's maximum price per use, as its terms show it.
fn max_price_text(product: &Product, shown: &Shown) -> String {
    product.max_price.map_or_else(
        || "none declared (registered before maximums)".to_owned(),
        |max| shown.currency.exact(max),
    )
}

/// Who on the meter's machine a grant is for: one user, or (in bold) all.
fn scope_text(scope: &Scope) -> Markup {
    html! {
        @match scope {
            Scope::User { uid, name } if name.is_empty() => { "the user with uid " (uid) }
            Scope::User { uid, name } => { "the user " code { (name) } " (uid " (uid) ")" }
            Scope::Machine => strong { "every user of that machine" }
        }
    }
}

/// Where a grant stands at `now_ms`.
fn grant_status(grant: &Grant, now_ms: u64, shown: &Shown) -> String {
    match (grant.revoked_ms, grant.expires_ms) {
        (Some(revoked), _) if revoked <= now_ms => format!("revoked {}", shown.time(revoked)),
        (_, Some(expires)) if expires <= now_ms => "expired".to_owned(),
        _ => "live".to_owned(),
    }
}

fn grants_section(session: &Session, view: &AccountView<'_>) -> Markup {
    html! {
        h2 id="grants-heading" { "Meters that may charge you" }
        p {
            "A meter charges you only through a grant you approved. "
            a href="/grant" id="authorize" { "Authorize a meter" }
            " with the code that " code { "meterd grant" } " printed."
        }
        @if let Some(notice) = view.grants_notice { p.notice id="grants-notice" { (notice) } }
        @if view.grants.is_empty() {
            p id="no-grants" { "No meter may charge you." }
        } @else {
            table id="grants" {
                tr {
                    th { "Grant" } th { "Meter (MID)" } th { "Machine" } th { "For" }
                    th { "Approved" } th { "Expires" } th { "Status" } th {}
                }
                @for grant in view.grants {
                    @let status = grant_status(grant, view.now_ms, view.shown);
                    tr id={ "grant-row-" (grant.id) } {
                        td { (grant.id) }
                        td { (grant.mid.as_str()) }
                        td { (grant.label) }
                        td { (scope_text(&grant.scope)) }
                        td { (view.shown.time(grant.created_ms)) }
                        td { (grant.expires_ms.map_or_else(|| "never".to_owned(), |at| view.shown.time(at))) }
                        td id={ "grant-status-" (grant.id) } { (status) }
                        td {
                            @if status == "live" {
                                form method="post" action="/grants/revoke" {
                                    (csrf(session))
                                    input type="hidden" name="grant" value=(grant.id);
                                    button type="submit" id={ "revoke-" (grant.id) } { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The account page.
pub fn account(session: &Session, view: &AccountView<'_>) -> Markup {
    let AccountView {
        customer,
        balance,
        products,
        errors,
        notice,
        ..
    } = *view;
    let form = RegistrationForm::of(customer);
    let body = html! {
        p { "CID " strong id="cid" { (customer.cid.as_str()) } }
        p { "Micro-account balance: " strong id="balance" { (view.shown.currency.total(balance)) } }
        @if customer.denied { p.error { "Service is denied on this account. Call the branch." } }
        @if let Some((key, amount)) = &view.top_up_form {
            form method="post" action="/account/top-up" id="top-up" {
                (csrf(session))
                input type="hidden" name="key" value=(key);
                label for="amount" { "Add money from your card or bank account (" (view.shown.currency.code()) ")" }
                input type="text" id="amount" name="amount" value=(amount) inputmode="decimal" autocomplete="off" size="10" required;
                " "
                button type="submit" id="top-up-submit" { "Top up" }
            }
        }
        @match view.top_up {
            Some((notice, true)) => p.notice id="top-up-notice" { (notice) },
            Some((notice, false)) => p.error id="top-up-error" { (notice) },
            None => {},
        }
        p {
            a href="/products/new" id="add-product" { "Register a product" } " · "
            a href="/statement" id="details" { "Transaction details" } " · "
            a href="/meters" { "Meters" }
        }
        (grants_section(session, view))
        h2 { "Your products" }
        @if let Some(notice) = view.products_notice { p.notice id="products-notice" { (notice) } }
        @if products.is_empty() {
            p { "None yet." }
        } @else {
            p { "Components: the PIDs of other products yours uses inside. Only their uses inside uses of yours are charged to you; any other product's use claimed to be inside yours is not." }
            table id="products" {
                tr { th { "PID" } th { "Test PID" } th { "Name" } th { "Terms" } th { "Maximum price per use" } th { "Components" } }
                @for product in products {
                    tr {
                        td { (product.pid.as_str()) }
                        td { (product.test_pid.as_str()) }
                        td { (product.name) }
                        td { (product.terms) }
                        td.amount id={ "max-price-" (product.pid.as_str()) } { (max_price_text(product, view.shown)) }
                        td {
                            form method="post" action="/products/components" id={ "components-" (product.pid.as_str()) } {
                                (csrf(session))
                                input type="hidden" name="pid" value=(product.pid.as_str());
                                input type="text" name="components" aria-label="Components (PIDs separated by spaces)"
                                    value=(product.components.iter().map(Pid::as_str).collect::<Vec<_>>().join(" "));
                                " "
                                button type="submit" { "Save" }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Registration" }
        @if let Some(notice) = notice { p.notice id="notice" { (notice) } }
        form method="post" action="/account" id="edit" {
            (csrf(session))
            (profile_inputs(&form, errors))
            (text_input(
                "Telephone number (optional), international form like +44 20 7946 0958: a service you granted may charge you by it",
                "telephone",
                "tel",
                customer.phone.as_deref().unwrap_or_default(),
                errors,
            ))
            label for="currentPassword" { "Current password (needed only to change the e-mail address, where password resets go)" }
            input type="password" id="currentPassword" name="currentPassword" autocomplete="current-password";
            (field_errors(errors, "currentPassword"))
            (field_errors(errors, "form"))
            p { button type="submit" id="save" { "Save" } }
        }
    };
    layout(session, &customer.name, body)
}

/// What the product form holds.
#[derive(Debug, Default, Clone)]
pub struct ProductForm {
    /// Its name.
    pub name: String,
    /// What it is.
    pub description: String,
    /// The terms shown to customers.
    pub terms: String,
    /// The most one use may cost, as typed.
    pub max_price: String,
}

/// The form to register a product.
pub fn new_product(
    session: &Session,
    form: &ProductForm,
    errors: &[(&'static str, String)],
) -> Markup {
    let body = html! {
        @if !errors.is_empty() {
            div.refusal id="refusal" {
                p { strong { "The product was not registered:" } }
                ul { @for (_, message) in errors { li { (message) } } }
            }
        }
        form method="post" action="/products/new" enctype="multipart/form-data" id="product" {
            (csrf(session))
            (text_input("Name", "name", "text", &form.name, errors))
            label for="description" { "Description" }
            textarea id="description" name="description" rows="3" { (form.description) }
            (field_errors(errors, "description"))
            label for="terms" { "Terms shown to customers (what a use costs)" }
            textarea id="terms" name="terms" rows="3" { (form.terms) }
            (field_errors(errors, "terms"))
            (text_input("Maximum price per use (a TACA price above it is refused; changing it needs a new product)", "maxPrice", "text", &form.max_price, errors))
            label for="taca" { "Pricing function (TACA): a WebAssembly module built with taca-sdk" }
            input type="file" id="taca" name="taca" accept=".wasm,application/wasm";
            (field_errors(errors, "taca"))
            label {
                input type="checkbox" name="agrees" id="agrees" value="yes";
                " I agree to the producer terms: the branch runs this module to price every use and credits my micro-account."
            }
            (field_errors(errors, "agrees"))
            (field_errors(errors, "form"))
            p { button type="submit" id="product-submit" { "Register the product" } }
        }
    };
    layout(session, "Register a product", body)
}

/// After a product is registered: its PIDs and how to use them.
pub fn product_added(session: &Session, product: &Product, shown: &Shown) -> Markup {
    let pid = product.pid.as_str();
    let test_pid = product.test_pid.as_str();
    let rust = format!(
        "let mut meter = meterd::client::Meter::connect_default();\n\
         let pid: proto::Pid = \"{pid}\".parse()?;\n\
         if let Some(usage) = meter.begin(pid) {{\n    \
         // ... the metered work ...\n    usage.commit()?;\n}}"
    );
    let python = format!(
        "from meterd_client import connect\n\
         meter = connect()\n\
         with meter.use(\"{pid}\"):  # committed at the end, cancelled if it raises\n    \
         ...  # the metered work"
    );
    let body = html! {
        p { (product.name) " is registered." }
        table {
            tr { th { "PID" } td id="pid" { (pid) } }
            tr { th { "Test PID (free, for your tests)" } td id="test-pid" { (test_pid) } }
            tr { th { "Terms" } td id="terms" { (product.terms) } }
            tr { th { "Maximum price per use" } td id="max-price" { (max_price_text(product, shown)) } }
            tr { th { "TACA" } td { code { (product.taca.to_string()) } } }
        }
        h2 { "Coding it into your program" }
        p { "Ask the meter before each use and commit after it. In Rust, with the meterd client library:" }
        pre { code { (rust) } }
        p { "In Python, with the repository's " code { "meterd_client" } " package (" code { "pip install ./clients/python" } "):" }
        pre { code { (python) } }
        p { "Use " code { (test_pid) } " while testing: its uses are free." }
        p { a href="/account" { "Back to your account" } }
    };
    layout(session, "Product registered", body)
}

/// What the meters page reports above its table.
#[derive(Debug, Clone, Copy)]
pub enum MeterNotice<'a> {
    /// A meter just registered: its secret, shown this once.
    Registered(&'a Meter),
    /// A meter whose secret was just rotated: the new one, shown this once.
    Rotated(&'a Meter),
    /// A meter just revoked.
    Revoked(&'a Meter),
}

/// Who changed a meter, as its owner reads it.
fn actor_text(by: crate::registry::Actor) -> String {
    match by {
        crate::registry::Actor::Operator => "the operator".to_owned(),
        crate::registry::Actor::Owner(cid) => format!("you ({cid})"),
    }
}

/// The lines that start `meterd` with `meter`'s secret, for a fresh file.
fn meterd_setup(meter: &Meter, url: &str, file: &str) -> Markup {
    html! {
        pre id="config" {
            "(umask 077 && printf %s '" (meter.secret_hex) "' > " (file) ")\n"
            "meterd serve --backoffice " (url) " --mid " (meter.mid.as_str()) " --secret-file " (file)
        }
    }
}

/// The meters page, with what was just done (`notice`): a new meter's or
/// a rotated meter's secret is shown this once, never again.
pub fn meters(
    session: &Session,
    meters: &[Meter],
    products: &[crate::registry::Product],
    notice: Option<MeterNotice<'_>>,
    public_url: &str,
    shown: &Shown,
) -> Markup {
    let base = public_url.trim_end_matches('/');
    let url = format!("{base}/RPC2");
    let body = html! {
        @match notice {
            Some(MeterNotice::Registered(meter)) if meter.service.is_some() => {
                @let pid = meter.service.as_ref().map(|pid| pid.as_str()).unwrap_or_default();
                div.notice id="new-service" {
                    p {
                        "Service credential " strong id="mid" { (meter.mid.as_str()) } " for " strong { (pid) }
                        " is made. Its password, shown only now:"
                    }
                    pre id="secret" { (meter.secret_hex) }
                    p {
                        "Your service calls Parlay X Payment v2.1 over SOAP at "
                        code id="parlayx-base" { (base) "/AmountChargingService/services/AmountCharging" }
                        " (and the other interfaces beside it; each serves its WSDL at " code { "?wsdl" } "), "
                        "over TLS or from this machine, with a WS-Security UsernameToken: user name "
                        code { (meter.mid.as_str()) } ", this password as a " code { "PasswordDigest" } "."
                    }
                    p {
                        "It charges only customers who granted it: it asks for a code as a meter does ("
                        code { "grant.request" } "), and the customer approves it on "
                        a href="/grant" { "Authorize a meter" } ". The money goes to you, at most the product's maximum price each time."
                    }
                }
            }
            Some(MeterNotice::Registered(meter)) => {
                div.notice id="new-meter" {
                    p { "Meter " strong id="mid" { (meter.mid.as_str()) } " is registered. Its secret, shown only now:" }
                    pre id="secret" { (meter.secret_hex) }
                    p { "Save the secret in a file only meterd can read, then start meterd with it:" }
                    (meterd_setup(meter, &url, "meter.secret"))
                    p {
                        "The meter charges only customers who grant it: each runs "
                        code { "meterd grant CID" } " as their own user on that machine and approves the code it prints on "
                        a href="/grant" { "Authorize a meter" } "."
                    }
                }
            }
            Some(MeterNotice::Rotated(meter)) => {
                div.notice id="rotated-meter" {
                    p { "Meter " strong id="mid" { (meter.mid.as_str()) } " has a new secret, shown only now:" }
                    pre id="secret" { (meter.secret_hex) }
                    @match &meter.previous {
                        Some(previous) => p id="grace" {
                            "The old secret still works until " (shown.time(previous.valid_until_ms))
                            ", or until the meter uploads with the new one; after that it is refused."
                        },
                        None => p id="grace" { "The old secret is refused from now on." },
                    }
                    p { "Save the new secret over the meter's secret file; meterd reads the file again when it changes, so it needs no restart, and its first upload with the new secret ends the old one's day. Readings waiting on the meter are kept and uploaded with the new secret:" }
                    pre id="config" {
                        "(umask 077 && printf %s '" (meter.secret_hex) "' > meter.secret.new) && mv meter.secret.new meter.secret\n"
                        "# meter.secret: the file meterd was started with (--mid " (meter.mid.as_str()) " --secret-file meter.secret)"
                    }
                }
            }
            Some(MeterNotice::Revoked(meter)) => {
                div.notice id="revoked-meter" {
                    p {
                        "Meter " strong id="mid" { (meter.mid.as_str()) } " is revoked: the backoffice refuses every upload and grant request of it from now on. "
                        "Uses it uploaded before stay charged. To go on metering on that machine, register a new meter."
                    }
                }
            }
            None => {}
        }
        @if meters.is_empty() {
            p { "No meters yet." }
        } @else {
            table id="meters" {
                tr { th { "MID" } th { "For" } th { "Status" } th { "Secret" } th { } th { } }
                @for meter in meters {
                    @let mid = meter.mid.as_str();
                    tr {
                        td { (mid) }
                        td id={ "meter-for-" (mid) } {
                            @match &meter.service {
                                Some(pid) => { "service charging for " (pid.as_str()) }
                                None => "meter",
                            }
                        }
                        td id={ "meter-status-" (mid) } {
                            @match &meter.revoked {
                                Some(revoked) => { "revoked " (shown.time(revoked.at_ms)) " by " (actor_text(revoked.by)) }
                                None => "live",
                            }
                        }
                        td id={ "meter-secret-" (mid) } {
                            @match &meter.rotated {
                                Some(rotated) => {
                                    "rotated " (shown.time(rotated.at_ms)) " by " (actor_text(rotated.by))
                                    @if let Some(previous) = &meter.previous {
                                        "; the old one works until " (shown.time(previous.valid_until_ms))
                                    }
                                }
                                None => "as registered",
                            }
                        }
                        @if meter.revoked.is_none() {
                            td {
                                form method="post" action="/meters/rotate" {
                                    (csrf(session))
                                    input type="hidden" name="mid" value=(mid);
                                    label {
                                        input type="checkbox" name="leaked" value="yes" id={ "leaked-" (mid) };
                                        " the old secret may have leaked: refuse it at once (otherwise it works for one more day)"
                                    }
                                    button type="submit" id={ "rotate-" (mid) } { "New secret" }
                                }
                            }
                            td {
                                form method="post" action="/meters/revoke" {
                                    (csrf(session))
                                    input type="hidden" name="mid" value=(mid);
                                    label {
                                        input type="checkbox" name="confirm" value="yes" required id={ "confirm-" (mid) };
                                        " for good: it cannot be undone"
                                    }
                                    button type="submit" id={ "revoke-" (mid) } { "Revoke" }
                                }
                            }
                        } @else {
                            td { } td { }
                        }
                    }
                }
            }
        }
        form method="post" action="/meters" id="add-meter" {
            (csrf(session))
            p { button type="submit" id="meter-submit" { "Register a new meter" } }
        }
        @let chargeable: Vec<_> = products.iter().filter(|product| product.max_price.is_some()).collect();
        @if !chargeable.is_empty() {
            form method="post" action="/meters" id="add-service" {
                (csrf(session))
                p {
                    "A service that is not metered on the customer's machine (a content server, a gateway) "
                    "charges your customers through Parlay X Payment with a credential of its own, for one product."
                }
                label for="service" { "Product" }
                select id="service" name="service" {
                    @for product in &chargeable {
                        option value=(product.pid.as_str()) { (product.name) " (" (product.pid.as_str()) ")" }
                    }
                }
                p { button type="submit" id="service-submit" { "Make a service credential" } }
            }
        }
    };
    layout(session, "Meters", body)
}

/// The page to enter a meter's user code on; `problem` says why the last
/// one was not taken.
pub fn grant_code(session: &Session, typed: &str, problem: Option<&str>) -> Markup {
    let body = html! {
        p {
            "A meter asks to charge you after " code { "meterd grant" } " printed a code and this page's address. "
            "Enter the code here; you will see the meter before you approve anything."
        }
        @if let Some(problem) = problem { p.error id="code-error" { (problem) } }
        form method="post" action="/grant" id="grant-code" {
            (csrf(session))
            label for="code" { "Code (like BCDF-GHJK)" }
            input type="text" id="code" name="code" value=(typed) maxlength="20"
                autocomplete="off" autocapitalize="characters" spellcheck="false";
            p { button type="submit" id="code-submit" { "Continue" } }
        }
        p { "A code works once, and only for a few minutes after the meter asked. Only you, logged in, can approve a code made for your CID." }
    };
    layout(session, "Authorize a meter", body)
}

/// What a code asks for, with Approve and Refuse.
pub fn grant_confirm(
    session: &Session,
    customer: &Customer,
    code: &str,
    request: &GrantRequest,
    owner: Option<&Customer>,
    service: Option<&crate::registry::Product>,
    shown: &Shown,
) -> Markup {
    let foreign = owner.is_none_or(|owner| owner.cid != customer.cid);
    let body = html! {
        @match service {
            None => p {
                "The meter below asks to charge your micro-account (" (customer.cid.as_str()) ") "
                "for metered software used on its machine. Approve only if you ran "
                code { "meterd grant" } " there yourself just now and this is that machine."
            },
            Some(product) => p id="grant-service" {
                "The service " strong { (product.name) } " (" (product.pid.as_str()) ") asks to "
                "charge your micro-account (" (customer.cid.as_str()) ") directly, for what you "
                "buy from it, without a meter on your machine: each charge at most "
                (product.max_price.map_or_else(|| "its maximum price".to_owned(), |max| shown.currency.exact(max)))
                ", as often as it charges, until the grant expires or you revoke it. "
                "Approve only if you asked this service for it yourself just now."
            },
        }
        table id="grant-request" {
            tr { th { "Code" } td id="grant-code-shown" { (code) } }
            tr { th { "Meter (MID)" } td id="grant-mid" { (request.mid.as_str()) } }
            tr {
                th { "Meter registered by" }
                td id="grant-owner" {
                    @match owner {
                        Some(owner) => { (owner.cid.as_str()) " (" (owner.name) ")" }
                        None => { "unknown" }
                    }
                }
            }
            tr { th { "Machine (as the meter names it)" } td id="grant-label" { (request.label) } }
            tr { th { "For" } td id="grant-scope" { (scope_text(&request.scope)) } }
        }
        @if foreign {
            p.warning id="grant-foreign" {
                "This meter was registered by another customer, who runs that machine. "
                "Approve only if you trust them with your micro-account."
            }
        }
        @if request.scope == Scope::Machine {
            p.warning id="grant-machine" {
                "Every local user of that machine, and every program they run, could charge you."
            }
        }
        form method="post" action="/grant/decide" id="grant-decide" {
            (csrf(session))
            input type="hidden" name="code" value=(code);
            label for="expires" { "The grant expires" }
            select id="expires" name="expires" {
                @for (value, label, _) in super::grant::EXPIRIES {
                    option value=(value) selected[value == "never"] { (label) }
                }
            }
            p {
                button type="submit" name="decision" value="approve" id="approve" { "Approve" }
                " "
                button type="submit" name="decision" value="refuse" id="refuse" { "Refuse" }
            }
        }
        p { "You can revoke a grant at any time on your " a href="/account" { "account page" } "." }
    };
    layout(session, "Authorize this meter?", body)
}

/// What was decided: `grant` is the one made, or none for a refusal.
pub fn grant_decided(
    session: &Session,
    request: &GrantRequest,
    grant: Option<&Grant>,
    shown: &Shown,
) -> Markup {
    let body = html! {
        @match grant {
            Some(grant) => {
                p id="grant-approved" {
                    "Meter " (grant.mid.as_str()) " may now charge you for "
                    (scope_text(&grant.scope)) " on " (grant.label) "."
                }
                p {
                    "Grant " strong id="grant-number" { (grant.id) } ", "
                    @match grant.expires_ms {
                        Some(expires) => { "until " span id="grant-expires" { (shown.time(expires)) } }
                        None => { span id="grant-expires" { "until you revoke it" } }
                    }
                    ". The meter learns of it within seconds."
                }
            }
            None => {
                p id="grant-refused" {
                    "You refused meter " (request.mid.as_str()) ": it will not charge you. "
                    "The meter is told so."
                }
            }
        }
        p { a href="/account" id="to-account" { "Your grants, on the account page" } }
    };
    let title = if grant.is_some() {
        "Meter authorized"
    } else {
        "Meter refused"
    };
    layout(session, title, body)
}

/// What a transfer was, for a statement line; `name` is the product's
/// name for a use or payment (empty when unknown).
pub fn describe(transfer: &Transfer, name: &str) -> String {
    match &transfer.kind {
        TransferKind::Deposit => "deposit from your macro-account".to_owned(),
        TransferKind::Withdrawal => "withdrawal to your macro-account".to_owned(),
        TransferKind::Use { pid, uses: 1, .. } => format!("1 use of {}", product_text(name, pid)),
        TransferKind::Use { pid, uses, .. } => {
            format!("{uses} uses of {}", product_text(name, pid))
        }
        TransferKind::Correction { of } => format!("correction of transfer {}", of.0),
        TransferKind::Payment { pid, reference } => {
            format!("{}, reference {reference}", product_text(name, pid))
        }
    }
}

/// "3 free uses of B1-P1": uses of `pid` in the month that moved no money.
pub fn free_uses(uses: u64, pid: &Pid) -> String {
    let noun = if uses == 1 { "use" } else { "uses" };
    format!("{uses} free {noun} of {pid}")
}

fn month_name(month: u32) -> String {
    const NAMES: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let index = usize::try_from(month % 100).unwrap_or(1).clamp(1, 12) - 1;
    format!("{} {}", NAMES[index], month / 100)
}

fn previous_month(month: u32) -> u32 {
    if month % 100 == 1 {
        month - 100 + 11
    } else {
        month - 1
    }
}

fn next_month(month: u32) -> u32 {
    if month % 100 == 12 {
        month + 100 - 11
    } else {
        month + 1
    }
}

/// One series of a chart: a day's amount in nanos for each day of the
/// month, its CSS class and what a bar of it means ("spent").
pub struct Series<'a> {
    /// `spend` or `income` (the style sheet's colours).
    pub class: &'static str,
    /// What a bar of it is, for its tooltip: "spent", "earned".
    pub verb: &'a str,
    /// Nanos per day of the month, from day 1.
    pub days: Vec<i128>,
    /// Uses per day, when the series counts them (shown in the tooltip).
    pub uses: Option<Vec<u64>>,
}

/// An amount in nanos as a label, rounded to the minor unit.
fn label(nanos: i128, shown: &Shown) -> String {
    Amount::try_from_nanos(nanos).map_or_else(
        |_| "more than the largest amount".to_owned(),
        |amount| shown.currency.total(amount),
    )
}

/// A bar chart of amounts per day of `month`, with its amount axis
/// labelled in the branch's currency. Heights are whole pixels from exact
/// amounts: nanos scaled with integer arithmetic.
pub fn chart(id: &str, title: &str, month: u32, series: &[Series<'_>], shown: &Shown) -> Markup {
    let days = days_in(month) as usize;
    let top = series
        .iter()
        .flat_map(|one| one.days.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    const HEIGHT: i128 = 120;
    const LEFT: usize = 80;
    let bar = |nanos: i128| (nanos * HEIGHT / top).max(i128::from(nanos > 0));
    let step = 6 * series.len().max(1) + 4;
    let width = LEFT + days * step + 10;
    html! {
        svg id=(id) xmlns="http://www.w3.org/2000/svg" width=(width) height="165" viewBox={ "0 0 " (width) " 165" } role="img" aria-label=(title) {
            title { (title) ", " (month_name(month)) }
            // Two gridlines: the highest day, and half of it.
            @for amount in [top, top / 2] {
                @if top > 1 {
                    @let y = 130 - amount * HEIGHT / top;
                    text.axis x=(LEFT - 4) y=(y + 3) font-size="9" text-anchor="end" { (label(amount, shown)) }
                    line x1=(LEFT) y1=(y) x2=(width) y2=(y) stroke="#ddd" {}
                }
            }
            text x=(LEFT - 4) y="133" font-size="9" text-anchor="end" { (label(0, shown)) }
            @for day in 0..days {
                @let x = LEFT + 2 + day * step;
                @for (n, one) in series.iter().enumerate() {
                    @let nanos = one.days.get(day).copied().unwrap_or(0);
                    @let height = bar(nanos);
                    @if height > 0 {
                        rect class=(one.class) x=(x + n * 6) y=(130 - height) width="6" height=(height) {
                            title {
                                (month_name(month)) " " (day + 1) ": " (one.verb) " " (label(nanos, shown))
                                @if let Some(uses) = one.uses.as_ref().and_then(|uses| uses.get(day)) {
                                    " for " (uses) " " (if *uses == 1 { "use" } else { "uses" })
                                }
                            }
                        }
                    }
                }
                @if day % 5 == 0 {
                    text x=(x) y="145" font-size="9" { (day + 1) }
                }
            }
            line x1=(LEFT) y1="130" x2=(width) y2="130" stroke="#888" {}
            line x1=(LEFT) y1="10" x2=(LEFT) y2="130" stroke="#888" {}
            text x=(LEFT) y="160" font-size="10" { (shown.currency.code()) " per day of " (month_name(month)) " (" (shown.zone_name()) ")" }
        }
    }
}

/// What one product cost the statement's customer in its month.
pub struct Bought {
    /// The product.
    pub pid: Pid,
    /// Its name (empty when the product is unknown).
    pub name: String,
    /// Uses charged.
    pub uses: u64,
    /// Uses that cost nothing (priced at zero, own products, test PIDs).
    pub free: u64,
    /// What the charged uses cost.
    pub cost: Amount,
    /// The price of one use, when every charged use cost the same.
    pub unit_price: Option<Amount>,
    /// Charged uses cost different prices.
    pub varied: bool,
    /// Every charged use's price was looked up (a line past the page's
    /// limit, or whose uses are no longer kept, leaves it unknown).
    pub prices_known: bool,
}

/// What one of the statement customer's products earned in its month.
pub struct Earned {
    /// The product.
    pub pid: Pid,
    /// Its name.
    pub name: String,
    /// Uses paid for.
    pub uses: u64,
    /// What they earned.
    pub income: Amount,
    /// Accounts that paid for it (counted, not named).
    pub payers: usize,
    /// Of the income, what the three largest payers paid.
    pub top_three: Amount,
    /// Readings of the product waiting in suspense (any month), up to the
    /// count looked at; `true` beside it when there may be more.
    pub suspense: (u64, bool),
    /// Uses and income per day of the month.
    pub days: Vec<(u64, i128)>,
}

/// A product as a statement names it: "Word Processor (B1-P1)".
pub fn product_text(name: &str, pid: &Pid) -> String {
    if name.is_empty() {
        pid.as_str().to_owned()
    } else {
        format!("{name} ({pid})")
    }
}

/// "3 of 7" as a share of the total, to a whole percent.
fn share(part: Amount, whole: Amount) -> String {
    if whole.nanos() <= 0 {
        return "0%".to_owned();
    }
    format!("{}%", part.nanos() * 100 / whole.nanos())
}

/// What a statement page shows.
pub struct StatementView<'a> {
    /// The customer.
    pub customer: &'a Customer,
    /// The month, `YYYYMM`, in the branch's time zone.
    pub month: u32,
    /// The balance before the month.
    pub opening: Amount,
    /// The month's lines.
    pub lines: &'a [Line],
    /// What each product cost the customer.
    pub bought: &'a [Bought],
    /// What each of the customer's products earned.
    pub earned: &'a [Earned],
    /// The branch's currency and time zone.
    pub shown: &'a Shown,
}

/// The statement of one billing cycle (a calendar month in the branch's
/// time zone).
pub fn statement(session: &Session, view: &StatementView<'_>) -> Markup {
    let StatementView {
        customer,
        month,
        opening,
        lines,
        bought,
        earned,
        shown,
    } = *view;
    let money = &shown.currency;
    let closing = lines.last().map_or(opening, |line| line.balance);
    let days = days_in(month) as usize;
    let mut spend = vec![0i128; days];
    let mut income = vec![0i128; days];
    for line in lines {
        let index = (shown.day_of(line.transfer.posted_ms) as usize).clamp(1, days) - 1;
        let nanos = line.signed.nanos();
        if nanos < 0 {
            spend[index] -= nanos;
        } else {
            income[index] += nanos;
        }
    }
    let body = html! {
        p {
            a href={ "/statement?month=" (previous_month(month)) } { "« " (month_name(previous_month(month))) }
            " · "
            a href={ "/statement?month=" (next_month(month)) } { (month_name(next_month(month))) " »" }
            " · "
            a href={ "/statement.csv?month=" (month) } id="csv" { "Download CSV" }
        }
        p {
            "Account " (customer.cid.as_str()) ". Opening balance " strong id="opening" { (money.total(opening)) }
            ", closing balance " strong id="closing" { (money.total(closing)) } ". "
            "Months and their days are in the branch's time zone, " (shown.zone_name())
            @if shown.viewer_zone_name() != shown.zone_name() { "; dates are in yours, " (shown.viewer_zone_name()) }
            "; amounts in " (money.code()) ", rounded to the "
            @if money.places() == 0 { "unit" } @else { "cent" }
            " for display (each line's exact amount shows when you point at it)."
        }
        (chart("chart", "Spent (red) and received (green) per day", month, &[
            Series { class: "spend", verb: "spent", days: spend, uses: None },
            Series { class: "income", verb: "received", days: income, uses: None },
        ], shown))
        @if !bought.is_empty() {
            h2 { "What each product cost you" }
            table id="bought" {
                tr { th { "Product" } th { "Uses charged" } th { "Free uses" } th { "Price per use" } th { "Cost" } }
                @for one in bought {
                    tr id={ "bought-" (one.pid.as_str()) } {
                        td { (product_text(&one.name, &one.pid)) }
                        td.amount { (one.uses) }
                        td.amount id={ "free-" (one.pid.as_str()) } { (one.free) }
                        td.amount {
                            @match (one.unit_price, one.varied, one.uses) {
                                (Some(price), _, _) => (money.exact(price)),
                                (None, true, _) => "varied",
                                (None, false, 0) => "",
                                (None, false, _) => "see the uses",
                            }
                        }
                        td.amount title=(money.exact(one.cost)) { (money.total(one.cost)) }
                    }
                }
            }
            p { "Free uses cost you nothing (priced at zero, of your own products, or of a product's test PID): they move no money, so no line below shows them." }
        }
        @if !earned.is_empty() {
            h2 { "What your products earned" }
            table id="earned" {
                tr { th { "Product" } th { "Uses paid for" } th { "Income" } th { "Paying accounts" } th { "Three largest payers' share" } th { "Readings in suspense" } }
                @for one in earned {
                    tr id={ "earned-" (one.pid.as_str()) } {
                        td { (product_text(&one.name, &one.pid)) }
                        td.amount { (one.uses) }
                        td.amount title=(money.exact(one.income)) { (money.total(one.income)) }
                        td.amount { (one.payers) }
                        td.amount { (share(one.top_three, one.income)) }
                        td.amount id={ "suspense-" (one.pid.as_str()) } { (one.suspense.0) @if one.suspense.1 { " or more" } }
                    }
                }
            }
            p { "Readings in suspense could not be priced yet (an unknown payer, no grant, a TACA that failed); the branch prices them again or resolves them. Payers are counted, never named." }
            @for one in earned {
                h3 { "Income per day from " (product_text(&one.name, &one.pid)) }
                (chart(&format!("chart-{}", one.pid.as_str()), &format!("Income per day from {}", product_text(&one.name, &one.pid)), month, &[
                    Series {
                        class: "income",
                        verb: "earned",
                        days: one.days.iter().map(|day| day.1).collect(),
                        uses: Some(one.days.iter().map(|day| day.0).collect()),
                    },
                ], shown))
            }
        }
        h2 { "Transactions" }
        @if lines.is_empty() {
            p id="no-lines" { "No transactions in this month." }
        } @else {
            table id="lines" {
                tr { th { "Date" } th { "Transfer" } th { "Description" } th { "Amount" } th { "Balance" } }
                @for line in lines {
                    tr {
                        td { (shown.date(line.transfer.posted_ms)) }
                        td { (line.transfer.id.0) }
                        td {
                            @if matches!(line.transfer.kind, TransferKind::Use { .. }) {
                                a href={ "/statement/items?transfer=" (line.transfer.id.0) } id={ "items-" (line.transfer.id.0) } { (line.text(money)) }
                            } @else {
                                (line.text(money))
                            }
                        }
                        td.amount title=(money.exact(line.signed)) { (money.total(line.signed)) }
                        td.amount title=(money.exact(line.balance)) { (money.total(line.balance)) }
                    }
                }
            }
        }
    };
    layout(
        session,
        &format!("Transactions, {}", month_name(month)),
        body,
    )
}

/// The uses behind one statement line, [`ITEMS_PAGE_ROWS`] to a page
/// (`number` from 1).
pub fn items(session: &Session, line: &LineItems, number: usize, shown: &Shown) -> Markup {
    let transfer = &line.transfer;
    let id = transfer.id.0;
    let all = line.items.as_deref().unwrap_or_default();
    let pages = all.len().div_ceil(ITEMS_PAGE_ROWS).max(1);
    let rows: Vec<_> = all
        .iter()
        .skip((number - 1).saturating_mul(ITEMS_PAGE_ROWS))
        .take(ITEMS_PAGE_ROWS)
        .collect();
    let body = html! {
        p {
            a href={ "/statement?month=" (shown.month_of(transfer.posted_ms)) } { "« Back to the statement" }
            @if line.items.is_some() {
                " · "
                a href={ "/statement/items.csv?transfer=" (id) } id="items-csv" { "Download CSV" }
            }
        }
        p {
            "Transfer " (id) ", " (shown.date(transfer.posted_ms)) ": " (describe(transfer, &line.name)) ", "
            strong id="line-amount" title=(shown.currency.exact(transfer.amount)) { (shown.currency.total(transfer.amount)) }
            @if line.paid { " paid." } @else { " received." }
        }
        @match &line.items {
            None => p id="not-kept" {
                "The uses behind this line are no longer kept: they are kept for a limited time (13 months or more) after their batch came. Call the branch if you dispute it."
            },
            Some(_) => {
                p {
                    "Each use was priced by the product's terms (its TACA, named by the SHA-256 of its module) with your earlier uses of the product in the month; "
                    "anyone can price it again and get the same amount (" code { "backoffice audit --transfer " (id) } ")."
                }
                p id="items-count" { (all.len()) " uses; page " (number) " of " (pages) "." }
                table id="items" {
                    tr {
                        th { "Time (" (shown.viewer_zone_name()) ")" }
                        @if line.paid { th { "Meter" } th { "Batch" } th { "Seq" } th { "Context" } }
                        th { "Product" } th { "Price" } th { "Earlier uses in the month" } th { "Fuel" } th { "TACA" }
                    }
                    @for item in &rows {
                        tr {
                            td { (shown.time_ms(item.reading.time_ms)) }
                            @if line.paid {
                                td { (item.mid.as_str()) }
                                td { (item.batch.as_str()) }
                                td { (item.reading.seq) }
                                td { (item.reading.context.as_str()) }
                            }
                            td { (item.reading.event.id_str()) }
                            td.amount { (shown.currency.exact(item.priced.amount)) }
                            td.amount { (item.priced.period_uses) }
                            td.amount { (item.priced.fuel) }
                            td { code title=(item.priced.taca) { (item.priced.taca.to_string().get(..12).unwrap_or_default()) "…" } }
                        }
                    }
                }
                p {
                    @if number > 1 {
                        a href={ "/statement/items?transfer=" (id) "&page=" (number - 1) } id="items-previous" { "« Previous page" }
                        " "
                    }
                    @if number < pages {
                        a href={ "/statement/items?transfer=" (id) "&page=" (number + 1) } id="items-next" { "Next page »" }
                    }
                }
            }
        }
    };
    layout(session, &format!("Uses behind transfer {id}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_step_across_years() {
        assert_eq!(previous_month(202_601), 202_512);
        assert_eq!(next_month(202_612), 202_701);
        assert_eq!(next_month(202_603), 202_604);
        assert_eq!(month_name(202_611), "November 2026");
    }
}
