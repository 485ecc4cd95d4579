//! The web pages over real HTTP, as a browser without JavaScript uses them:
//! CSRF tokens, escaping, who may see what, login throttling, reset links,
//! and the registration form's refusals.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::support::{Backoffice, IO_TIMEOUT, s};

/// One HTTP answer.
pub struct Page {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Page {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The CSRF token of the page's forms.
    pub fn csrf(&self) -> String {
        let marker = "name=\"csrf\" value=\"";
        let start = self.body.find(marker).expect("a form with a CSRF token") + marker.len();
        self.body[start..start + 64].to_owned()
    }

    /// The text of the element with this id (its first text node).
    pub fn text_of(&self, id: &str) -> Option<String> {
        let marker = format!("id=\"{id}\"");
        let at = self.body.find(&marker)?;
        let open_end = at + self.body[at..].find('>')? + 1;
        let close = open_end + self.body[open_end..].find('<')?;
        Some(self.body[open_end..close].to_owned())
    }
}

/// A visitor with a cookie jar of one cookie, speaking HTTP/1.1.
pub struct Visitor {
    address: SocketAddr,
    cookie: Option<String>,
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

impl Visitor {
    pub fn new(address: SocketAddr) -> Visitor {
        Visitor {
            address,
            cookie: None,
        }
    }

    fn request(&mut self, method: &str, path: &str, content_type: &str, body: &[u8]) -> Page {
        let mut stream = TcpStream::connect_timeout(&self.address, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let cookie = self
            .cookie
            .as_ref()
            .map(|cookie| format!("Cookie: {cookie}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{cookie}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.address,
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        // A server may refuse an oversize body before reading it all.
        let _ = stream.write_all(body);
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(": "))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        for (key, value) in &headers {
            if key.eq_ignore_ascii_case("set-cookie") {
                let pair = value.split(';').next().unwrap_or_default();
                self.cookie = Some(pair.to_owned());
            }
        }
        Page {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    pub fn get(&mut self, path: &str) -> Page {
        self.request("GET", path, "text/plain", b"")
    }

    pub fn post_form(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let body = fields
            .iter()
            .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
            .collect::<Vec<_>>()
            .join("&");
        self.request(
            "POST",
            path,
            "application/x-www-form-urlencoded",
            body.as_bytes(),
        )
    }
}

impl Visitor {
    /// A `multipart/form-data` POST: text fields and one file.
    pub fn post_multipart(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        file: (&str, &str, &[u8]),
    ) -> Page {
        const BOUNDARY: &str = "----boundary7MA4YWxkTrZu0gW";
        let mut body = Vec::new();
        for (name, value) in fields {
            body.extend_from_slice(
                format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .as_bytes(),
            );
        }
        let (name, filename, bytes) = file;
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/wasm\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        self.request(
            "POST",
            path,
            &format!("multipart/form-data; boundary={BOUNDARY}"),
            &body,
        )
    }
}

pub const PASSWORD: &str = "tulip-Otter-93";

/// A valid registration, as (field, value) pairs, for `first` at `email`.
pub fn registration(first: &str, email: &str) -> Vec<(&'static str, String)> {
    [
        ("salutation", "Dr"),
        ("firstName", first),
        ("lastName", "Lovelace"),
        ("emailAddress", email),
        ("street", "12 St James's Square"),
        ("city", "London"),
        ("zipCode", "SW1Y 4JH"),
        ("country", "United Kingdom"),
        ("macroaccountCo", "Analytical Bank"),
        ("macroaccountID", "4000-1234-5678"),
        ("expirationMonth", "12"),
        ("expirationYear", "2099"),
        ("password", PASSWORD),
        ("passwordCopy", PASSWORD),
        ("agrees", "yes"),
    ]
    .into_iter()
    .map(|(name, value)| (name, value.to_owned()))
    .collect()
}

fn with(
    fields: &[(&'static str, String)],
    changes: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let mut fields: Vec<(&'static str, String)> = fields
        .iter()
        .filter(|(name, _)| !changes.iter().any(|(changed, _)| changed == name))
        .cloned()
        .collect();
    fields.extend(
        changes
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| (*name, (*value).to_owned())),
    );
    fields
}

/// Registers through the entry page; the page that answered.
pub fn register(
    visitor: &mut Visitor,
    fields: &[(&'static str, String)],
    csrf: Option<&str>,
) -> Page {
    let token = visitor.get("/").csrf();
    let mut form: Vec<(&str, &str)> = fields
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let csrf = csrf.map_or(token, str::to_owned);
    if !csrf.is_empty() {
        form.push(("csrf", &csrf));
    }
    visitor.post_form("/", &form)
}

fn log_in(visitor: &mut Visitor, who: &str, password: &str) -> Page {
    let token = visitor.get("/login").csrf();
    visitor.post_form(
        "/login",
        &[("csrf", &token), ("who", who), ("password", password)],
    )
}

#[test]
fn a_post_without_or_with_a_wrong_csrf_token_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut visitor = Visitor::new(office.address);
    let fields = registration("Ada", "ada@example.org");
    let missing = register(&mut visitor, &fields, Some(""));
    assert_eq!(missing.status, 403, "{}", missing.body);
    let wrong = register(&mut visitor, &fields, Some(&"0".repeat(64)));
    assert_eq!(wrong.status, 403);
    // Another visitor's token is no good either.
    let other_token = Visitor::new(office.address).get("/").csrf();
    assert_eq!(
        register(&mut visitor, &fields, Some(&other_token)).status,
        403
    );
    let nobody = office.call("customer.show", &[s("B1-C1")]);
    assert!(nobody.is_err(), "no customer was created: {nobody:?}");
    // With the page's own token it works.
    let done = register(&mut visitor, &fields, None);
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.text_of("cid").as_deref(), Some("B1-C1"));
    // Logged-in forms need the token too.
    let logout = visitor.post_form("/logout", &[]);
    assert_eq!(logout.status, 403);
    assert_eq!(visitor.get("/account").status, 200, "still logged in");
}

#[test]
fn a_script_tag_in_a_name_is_shown_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut visitor = Visitor::new(office.address);
    let fields = registration("<script>alert('x')</script>", "mallory@example.org");
    let page = register(&mut visitor, &fields, None);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(!page.body.contains("<script>alert"), "{}", page.body);
    assert!(page.body.contains("&lt;script&gt;alert("), "{}", page.body);
    let account = visitor.get("/account");
    assert!(!account.body.contains("<script>alert"));
    assert!(account.body.contains("&lt;script&gt;"));
    assert!(
        account
            .header("content-security-policy")
            .is_some_and(|policy| policy.contains("default-src 'none'")),
        "no inline script would run anyway"
    );
}

#[test]
fn another_customers_pages_are_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut ada = Visitor::new(office.address);
    let ada_cid = register(&mut ada, &registration("Ada", "ada@example.org"), None)
        .text_of("cid")
        .unwrap();
    let mut bob = Visitor::new(office.address);
    let bob_cid = register(&mut bob, &registration("Bob", "bob@example.org"), None)
        .text_of("cid")
        .unwrap();
    office
        .call("account.deposit", &[s(&ada_cid), s("12.5")])
        .unwrap();
    assert_eq!(
        ada.get("/account").text_of("balance").as_deref(),
        Some("12.50")
    );
    // Bob's pages are Bob's whatever the URL says.
    for path in [
        format!("/account?cid={ada_cid}"),
        format!("/statement?cid={ada_cid}"),
        format!("/statement.csv?cid={ada_cid}"),
    ] {
        let page = bob.get(&path);
        assert_eq!(page.status, 200, "{path}");
        assert!(
            !page.body.contains(&ada_cid),
            "{path} shows Ada: {}",
            page.body
        );
        assert!(!page.body.contains("12.5"), "{path} shows Ada's money");
    }
    assert_eq!(bob.get("/account").text_of("cid"), Some(bob_cid));
    // Without a session, or with a made-up one, every private page sends
    // the visitor to the login page.
    for cookie in [None, Some(format!("bo_session={}", "ab".repeat(32)))] {
        let mut stranger = Visitor::new(office.address);
        stranger.cookie = cookie;
        for path in [
            "/account",
            "/statement",
            "/statement.csv",
            "/meters",
            "/products/new",
        ] {
            let page = stranger.get(path);
            assert_eq!(page.status, 303, "{path}");
            assert_eq!(page.header("location"), Some("/login"), "{path}");
        }
    }
    // Ada's statement does show her deposit.
    let csv = ada.get("/statement.csv");
    assert!(
        csv.body
            .starts_with("date,transfer,description,amount,balance")
    );
    assert!(
        csv.body.contains("deposit from your macro-account,12.5"),
        "{}",
        csv.body
    );
}

#[test]
fn the_tenth_wrong_password_in_a_row_is_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut ada = Visitor::new(office.address);
    let cid = register(&mut ada, &registration("Ada", "ada@example.org"), None)
        .text_of("cid")
        .unwrap();
    // A wrong password for an account that does not exist reads the same.
    let mut other = Visitor::new(office.address);
    let unknown = log_in(&mut other, "nobody@example.org", "guess-number-0");
    let known = log_in(&mut other, "ada@example.org", "guess-number-0");
    assert_eq!((unknown.status, known.status), (401, 401));
    assert_eq!(unknown.text_of("login-error"), known.text_of("login-error"));
    // That was Ada's first failure; eight more are allowed.
    let mut attacker = Visitor::new(office.address);
    // Switching between the CID and the address does not help.
    for attempt in 2..=9 {
        let who = if attempt % 2 == 0 {
            "ADA@example.org"
        } else {
            &cid
        };
        let page = log_in(&mut attacker, who, &format!("guess-number-{attempt}"));
        assert_eq!(page.status, 401, "attempt {attempt}");
        assert!(page.body.contains("is wrong"));
    }
    // The tenth is refused without a check, even with the right password,
    // and by either name.
    let tenth = log_in(&mut attacker, &cid, PASSWORD);
    assert_eq!(
        log_in(&mut attacker, "ada@example.org", PASSWORD).status,
        429
    );
    assert_eq!(tenth.status, 429, "{}", tenth.body);
    assert!(tenth.body.contains("Too many failed attempts"));
}

#[test]
fn a_reset_link_works_once_and_warns_of_a_break_in() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut ada = Visitor::new(office.address);
    register(&mut ada, &registration("Ada", "ada@example.org"), None);
    let mut visitor = Visitor::new(office.address);
    let token = visitor.get("/forgot").csrf();
    let asked = visitor.post_form("/forgot", &[("csrf", &token), ("who", "ADA@example.org")]);
    assert_eq!(asked.status, 200);
    // Asking for an unknown account reads the same, and sends nothing.
    let token = visitor.get("/forgot").csrf();
    let unknown = visitor.post_form("/forgot", &[("csrf", &token), ("who", "eve@example.org")]);
    assert_eq!(unknown.text_of("notice"), asked.text_of("notice"));
    let outbox: Vec<_> = std::fs::read_dir(office.data.join("outbox"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "eml"))
        .collect();
    assert_eq!(outbox.len(), 1, "{outbox:?}");
    let mail = std::fs::read_to_string(&outbox[0]).unwrap();
    assert!(mail.starts_with("To: ada@example.org\r\n"), "{mail}");
    assert!(
        mail.contains("someone may be trying to break into your account"),
        "{mail}"
    );
    let link = mail
        .split_whitespace()
        .find(|word| word.contains("/reset?token="))
        .expect("a link");
    let path = &link[link.find("/reset").unwrap()..];
    let new_password = "new-Heron-2027";
    let form = visitor.get(path);
    assert_eq!(form.status, 200, "{}", form.body);
    let reset_token = path.split('=').nth(1).unwrap();
    let set = visitor.post_form(
        "/reset",
        &[
            ("csrf", &form.csrf()),
            ("token", reset_token),
            ("password", new_password),
            ("passwordCopy", new_password),
        ],
    );
    assert_eq!(set.status, 303, "{}", set.body);
    assert_eq!(set.header("location"), Some("/account"));
    assert_eq!(
        visitor.get("/account").text_of("cid").as_deref(),
        Some("B1-C1")
    );
    // Used once: the link is dead now.
    let mut later = Visitor::new(office.address);
    assert_eq!(later.get(path).status, 410);
    let later_token = later.get("/login").csrf();
    let again = later.post_form(
        "/reset",
        &[
            ("csrf", &later_token),
            ("token", reset_token),
            ("password", "another-Pass-99"),
            ("passwordCopy", "another-Pass-99"),
        ],
    );
    assert_eq!(again.status, 410);
    // The old password is gone and every old session with it; the new one works.
    assert_eq!(ada.get("/account").status, 303, "the old session ended");
    assert_eq!(log_in(&mut later, "B1-C1", PASSWORD).status, 401);
    assert_eq!(log_in(&mut later, "B1-C1", new_password).status, 303);
}

#[test]
fn registrations_are_refused_field_by_field_with_the_branch_phone() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let good = registration("Ada", "ada@example.org");
    let mut visitor = Visitor::new(office.address);
    assert_eq!(register(&mut visitor, &good, None).status, 200);
    // The field, what is changed, the message shown at the field.
    type Case = (
        &'static str,
        Vec<(&'static str, &'static str)>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "passwordCopy",
            vec![("passwordCopy", "tulip-Otter-94")],
            "The two passwords differ.",
        ),
        (
            "password",
            vec![("password", "short1"), ("passwordCopy", "short1")],
            "at least 10 characters",
        ),
        ("agrees", vec![("agrees", "")], "You must agree"),
        (
            "expirationYear",
            vec![("expirationYear", "2020")],
            "has expired",
        ),
        (
            "emailAddress",
            vec![("emailAddress", "Ada@Example.org")],
            "already registered",
        ),
        (
            "emailAddress",
            vec![("emailAddress", "not-an-address")],
            "e-mail address like",
        ),
        (
            "expirationMonth",
            vec![("expirationMonth", "13")],
            "expiry month",
        ),
        ("lastName", vec![("lastName", "")], "Last name is required."),
        (
            "macroaccountID",
            vec![("macroaccountID", "12<34")],
            "only letters, digits",
        ),
    ];
    for (field, changes, message) in cases {
        let mut visitor = Visitor::new(office.address);
        let page = register(&mut visitor, &with(&good, &changes), None);
        assert_eq!(page.status, 422, "{field}: {}", page.body);
        let shown = page.text_of(&format!("{field}-error")).unwrap_or_default();
        assert!(
            shown.contains(message),
            "{field}: {shown:?} in {}",
            page.body
        );
        assert_eq!(
            page.text_of("phone").as_deref(),
            Some("+1 555 0100"),
            "{field}"
        );
        // What was typed is kept (but never a password).
        assert!(page.body.contains("value=\"London\""), "{field}");
        assert!(!page.body.contains(PASSWORD), "{field}");
    }
    assert!(
        office.call("customer.show", &[s("B1-C2")]).is_err(),
        "no second customer"
    );
}

#[test]
fn a_refused_module_shows_the_checkers_message_and_oversize_uploads_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut ada = Visitor::new(office.address);
    register(&mut ada, &registration("Ada", "ada@example.org"), None);
    let form = ada.get("/products/new");
    assert_eq!(form.status, 200);
    let csrf = form.csrf();
    let fields = [
        ("csrf", csrf.as_str()),
        ("name", "Loom"),
        ("description", "Weaves."),
        ("terms", "0.25 per use"),
        ("agrees", "yes"),
    ];
    let garbage = ada.post_multipart("/products/new", &fields, ("taca", "loom.wasm", b"not wasm"));
    assert_eq!(garbage.status, 422, "{}", garbage.body);
    let message = garbage.text_of("taca-error").unwrap_or_default();
    assert!(message.starts_with("The module was refused:"), "{message}");
    assert!(
        garbage.body.contains("value=\"Loom\""),
        "what was typed is kept"
    );
    // A module past the size limit is refused before it is read whole.
    let huge = vec![0u8; 2 * 1024 * 1024];
    let oversize = ada.post_multipart("/products/new", &fields, ("taca", "huge.wasm", &huge));
    assert_eq!(oversize.status, 413, "{}", oversize.body);
    // Without the CSRF token nothing is registered, even with a good module.
    let module = crate::examples::module("flat");
    let forged = ada.post_multipart(
        "/products/new",
        &fields[1..],
        ("taca", "flat.wasm", &module),
    );
    assert_eq!(forged.status, 403);
    assert!(ada.get("/account").body.contains("None yet."), "no product");
    // With everything right it is registered.
    let done = ada.post_multipart("/products/new", &fields, ("taca", "flat.wasm", &module));
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.text_of("pid").as_deref(), Some("B1-P1"));
    assert_eq!(done.text_of("test-pid").as_deref(), Some("B1-P1T"));
}
