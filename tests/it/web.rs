//! The web pages over real HTTP, as a browser without JavaScript uses them:
//! CSRF tokens, escaping, who may see what, login throttling, reset links,
//! the registration form's refusals, and grants: a meter's device code
//! approved, refused, reused, guessed, forged or revoked.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};

use proto::grant::{DeviceCode, GrantRequest, PollStatus, Scope};
use proto::xmlrpc::{Limits, MethodResponse, Value, encode_call, parse_response};
use proto::{Fault, Mid};

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

pub fn log_in(visitor: &mut Visitor, who: &str, password: &str) -> Page {
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

/// Every form of the site, posted by a logged-in customer with a wrong
/// token, is refused (403, "Form expired") and changes nothing. The list
/// is every POST route of the web pages; the server checks the token for
/// all of them in one place (`require_csrf`), the upload form in its own
/// handler.
#[test]
fn every_form_refuses_a_wrong_csrf_token_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[("BACKOFFICE_WEB_TOP_UP", "true")],
    );
    let (mut ada, cid) = registered(&office, "Ada");
    // The top-up form's key is new on every showing.
    let account = |ada: &mut Visitor| {
        let page = ada.get("/account");
        page.body.replace(&input_value(&page, "key"), "KEY")
    };
    let account_before = account(&mut ada);
    let top_up_key = input_value(&ada.get("/account"), "key");
    let meters_before = ada.get("/meters").body;
    let wrong = "0".repeat(64);
    let registration = registration("Eve", "eve@example.org");
    let registration: Vec<(&str, &str)> = registration
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let forms: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("/", registration),
        (
            "/login",
            vec![("who", "ada@example.org"), ("password", PASSWORD)],
        ),
        ("/logout", vec![]),
        ("/forgot", vec![("who", "ada@example.org")]),
        (
            "/reset",
            vec![
                ("token", "x"),
                ("password", PASSWORD),
                ("passwordCopy", PASSWORD),
            ],
        ),
        (
            "/account",
            vec![
                ("firstName", "Mallory"),
                ("emailAddress", "mallory@example.org"),
            ],
        ),
        ("/grant", vec![("code", "BCDF-GHJK")]),
        (
            "/grant/decide",
            vec![("code", "BCDF-GHJK"), ("decision", "approve")],
        ),
        ("/grants/revoke", vec![("grant", "1")]),
        (
            "/products/components",
            vec![("pid", "B1-P1"), ("components", "B1-P2")],
        ),
        ("/meters", vec![]),
        ("/meters/rotate", vec![("mid", "B1-M1")]),
        ("/meters/revoke", vec![("mid", "B1-M1"), ("confirm", "yes")]),
        (
            "/account/top-up",
            vec![("key", top_up_key.as_str()), ("amount", "5")],
        ),
    ];
    for (path, fields) in forms {
        for token in [wrong.as_str(), ""] {
            let mut form = fields.clone();
            form.push(("csrf", token));
            let page = ada.post_form(path, &form);
            assert_eq!(page.status, 403, "{path} with {token:?}: {}", page.body);
            assert!(page.body.contains("Form expired"), "{path}: {}", page.body);
        }
    }
    let module = crate::examples::module("flat");
    let upload = ada.post_multipart(
        "/products/new",
        &[
            ("csrf", wrong.as_str()),
            ("name", "Loom"),
            ("description", "Weaves."),
            ("terms", "0.25 per use"),
            ("maxPrice", "0.25"),
            ("agrees", "yes"),
        ],
        ("taca", "loom.wasm", &module),
    );
    assert_eq!(upload.status, 403, "{}", upload.body);
    // A form over the size limit is refused before its token is looked
    // at, and before any handler reads it.
    let huge = "x".repeat(64 * 1024 + 1); // FORM_BYTES_MAX, 64 KiB
    let token = ada.get("/account").csrf();
    let oversize = ada.post_form("/account", &[("csrf", &token), ("firstName", &huge)]);
    assert_eq!(oversize.status, 413, "{}", oversize.body);
    // Nothing changed: still logged in, the same account and meters, no
    // product, no second customer.
    assert_eq!(account(&mut ada), account_before);
    assert_eq!(office.text("customer.show", &[s(&cid)], "balance"), "0");
    assert_eq!(ada.get("/meters").body, meters_before);
    assert!(!account_before.contains("Mallory"));
    assert!(office.call("customer.show", &[s("B1-C2")]).is_err());
    let shown = office.call("customer.show", &[s(&cid)]).unwrap();
    assert!(!format!("{shown:?}").contains("B1-P1"), "{shown:?}");
}

/// An address the branch has no page at gets a 404 page with the same
/// security headers as every page.
#[test]
fn a_missing_page_has_the_security_headers_of_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut visitor = Visitor::new(office.address);
    let entry = visitor.get("/");
    let missing = visitor.get("/no/such/page");
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert!(missing.body.contains("Not found"), "{}", missing.body);
    for name in [
        "content-security-policy",
        "x-content-type-options",
        "x-frame-options",
        "referrer-policy",
        "cache-control",
    ] {
        assert!(entry.header(name).is_some(), "{name} on the entry page");
        assert_eq!(missing.header(name), entry.header(name), "{name}");
    }
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
    let deposited_from = crate::support::now_ms();
    office
        .call("account.deposit", &[s(&ada_cid), s("12.5")])
        .unwrap();
    assert_eq!(
        ada.get("/account").text_of("balance").as_deref(),
        Some("EUR 12.50")
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
        let page = stranger.get("/grant");
        assert_eq!(page.status, 303);
        assert_eq!(page.header("location"), Some("/login?next=/grant"));
    }
    // Ada's statement does show her deposit, in the month it was made
    // (read every month since, in case one ended meanwhile).
    let csv: String = crate::support::months_since(deposited_from)
        .into_iter()
        .map(|month| ada.get(&format!("/statement.csv?month={month}")).body)
        .inspect(|body| {
            assert!(body.starts_with(
                "date,transfer,description,product,uses,unit_price,amount,balance,currency\r\n"
            ));
        })
        .collect();
    assert!(
        csv.contains("deposit from your macro-account,,,,12.5,12.5,EUR\r\n"),
        "{csv}"
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

/// Forty wrong passwords for one account sent at once: no more are checked
/// than the allowance (each attempt is counted before its password is
/// hashed), the rest are refused with 429, and then even the right password
/// is refused until the window passes.
#[test]
fn parallel_guesses_are_counted_before_hashing_and_cannot_pass_the_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (_ada, cid) = registered(&office, "Ada");
    let guessers: Vec<(Visitor, String)> = (0..40)
        .map(|_| {
            let mut visitor = Visitor::new(office.address);
            let token = visitor.get("/login").csrf();
            (visitor, token)
        })
        .collect();
    let start = std::sync::Barrier::new(guessers.len());
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let calls: Vec<_> = guessers
            .into_iter()
            .enumerate()
            .map(|(n, (mut visitor, token))| {
                let (start, cid) = (&start, &cid);
                scope.spawn(move || {
                    start.wait();
                    let guess = format!("wrong-guess-{n}");
                    visitor
                        .post_form(
                            "/login",
                            &[("csrf", &token), ("who", cid), ("password", &guess)],
                        )
                        .status
                })
            })
            .collect();
        calls.into_iter().map(|call| call.join().unwrap()).collect()
    });
    let checked = statuses.iter().filter(|status| **status == 401).count();
    let refused = statuses.iter().filter(|status| **status == 429).count();
    assert_eq!((checked, refused), (9, 31), "{statuses:?}");
    let mut ada = Visitor::new(office.address);
    assert_eq!(log_in(&mut ada, &cid, PASSWORD).status, 429);
}

/// The reset links mailed to an account, newest last.
fn reset_links(office: &Backoffice, to: &str) -> Vec<String> {
    let mut mails: Vec<std::path::PathBuf> = std::fs::read_dir(office.data.join("outbox"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "eml"))
        .collect();
    mails.sort();
    mails
        .iter()
        .map(|path| std::fs::read_to_string(path).unwrap())
        .filter(|mail| mail.starts_with(&format!("To: {to}\r\n")))
        .map(|mail| {
            let link = mail
                .split_whitespace()
                .find(|word| word.contains("/reset?token="))
                .expect("a link")
                .to_owned();
            link[link.find("/reset").unwrap()..].to_owned()
        })
        .collect()
}

/// Using one reset link, or logging in, voids every other link still
/// outstanding for the account: a link left in a mailbox is of use only to
/// whoever else reads it.
#[test]
fn a_used_link_or_a_login_voids_every_other_reset_link() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut ada = Visitor::new(office.address);
    register(&mut ada, &registration("Ada", "ada@example.org"), None);
    let mut visitor = Visitor::new(office.address);
    for _ in 0..2 {
        let token = visitor.get("/forgot").csrf();
        let asked = visitor.post_form("/forgot", &[("csrf", &token), ("who", "ada@example.org")]);
        assert_eq!(asked.status, 200);
    }
    let links = reset_links(&office, "ada@example.org");
    assert_eq!(links.len(), 2, "{links:?}");
    assert_eq!(visitor.get(&links[0]).status, 200, "both links work");
    let form = visitor.get(&links[1]);
    let new_password = "new-Heron-2027";
    let set = visitor.post_form(
        "/reset",
        &[
            ("csrf", &form.csrf()),
            ("token", links[1].split('=').nth(1).unwrap()),
            ("password", new_password),
            ("passwordCopy", new_password),
        ],
    );
    assert_eq!(set.status, 303, "{}", set.body);
    assert_eq!(visitor.get(&links[0]).status, 410, "the other link died");
    // A link asked for, then a login: the link dies.
    let token = visitor.get("/forgot").csrf();
    visitor.post_form("/forgot", &[("csrf", &token), ("who", "ada@example.org")]);
    let links = reset_links(&office, "ada@example.org");
    let last = links.last().unwrap();
    let mut other = Visitor::new(office.address);
    assert_eq!(other.get(last).status, 200);
    assert_eq!(log_in(&mut other, "B1-C1", new_password).status, 303);
    assert_eq!(other.get(last).status, 410, "a login voids it");
}

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(std::fs::read(&path).unwrap());
        }
    }
    found
}

/// A card number is kept and shown as its last four digits only: the full
/// number is in no page and in no file of the store; sent back as shown it
/// stays, and a new one replaces it.
#[test]
fn a_card_number_is_kept_and_shown_as_its_last_four_digits() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (mut ada, cid) = registered(&office, "Ada");
    let account = ada.get("/account");
    assert!(
        account.body.contains("value=\"**** 5678\""),
        "{}",
        account.body
    );
    assert!(!account.body.contains("1234"), "{}", account.body);
    let edit = |visitor: &mut Visitor, number: &str| {
        let token = visitor.get("/account").csrf();
        let fields = registration("Ada", "ada@example.org");
        let mut form: Vec<(&str, &str)> = fields
            .iter()
            .filter(|(name, _)| !name.starts_with("password") && *name != "macroaccountID")
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        form.push(("csrf", &token));
        form.push(("macroaccountID", number));
        visitor.post_form("/account", &form)
    };
    let kept = edit(&mut ada, "**** 5678");
    assert_eq!(
        kept.text_of("notice").as_deref(),
        Some("Saved."),
        "{}",
        kept.body
    );
    assert!(kept.body.contains("value=\"**** 5678\""));
    let replaced = edit(&mut ada, "4111 2222 3333 9876");
    assert_eq!(
        replaced.text_of("notice").as_deref(),
        Some("Saved."),
        "{}",
        replaced.body
    );
    assert!(
        replaced.body.contains("value=\"**** 9876\""),
        "{}",
        replaced.body
    );
    drop(office);
    let store = dir.path().join("backoffice").join("store");
    for needle in ["4000-1234-5678", "1234-5678", "4111 2222", "3333 9876"] {
        assert!(
            !files_under(&store).iter().any(|file| file
                .windows(needle.len())
                .any(|window| window == needle.as_bytes())),
            "{needle} is in a file of the store ({cid})"
        );
    }
}

/// The e-mail address is where password resets go: changing it takes the
/// current password, and the old address is told; other edits do not.
#[test]
fn changing_the_email_address_needs_the_password_and_tells_the_old_address() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (mut ada, _) = registered(&office, "Ada");
    let edit = |visitor: &mut Visitor, email: &str, password: Option<&str>| {
        let token = visitor.get("/account").csrf();
        let fields = registration("Ada", email);
        let mut form: Vec<(&str, &str)> = fields
            .iter()
            .filter(|(name, _)| !name.starts_with("password"))
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        form.push(("csrf", &token));
        if let Some(password) = password {
            form.push(("currentPassword", password));
        }
        visitor.post_form("/account", &form)
    };
    let mails_to = |to: &str| {
        std::fs::read_dir(office.data.join("outbox"))
            .map(|entries| {
                entries
                    .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
                    .filter(|mail| mail.starts_with(&format!("To: {to}\r\n")))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    // Another field, same address: no password needed, nobody told.
    let saved = edit(&mut ada, "ada@example.org", None);
    assert_eq!(
        saved.text_of("notice").as_deref(),
        Some("Saved."),
        "{}",
        saved.body
    );
    for password in [None, Some("wrong-Guess-1")] {
        let refused = edit(&mut ada, "mallory@example.org", password);
        assert_eq!(refused.status, 422, "{}", refused.body);
        assert!(
            refused.body.contains("current password"),
            "{}",
            refused.body
        );
    }
    assert!(
        ada.get("/account")
            .body
            .contains("value=\"ada@example.org\"")
    );
    assert!(mails_to("ada@example.org").is_empty());
    let changed = edit(&mut ada, "ada@new.example.org", Some(PASSWORD));
    assert_eq!(
        changed.text_of("notice").as_deref(),
        Some("Saved."),
        "{}",
        changed.body
    );
    let told = mails_to("ada@example.org");
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(told[0].contains("ada@new.example.org"), "{}", told[0]);
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
    // Secrets at rest are their owner's only: the data folder, the store
    // (meter secrets, password hashes), the operator token, the outbox and
    // its reset links (issue 14).
    let mode = |path: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&office.data), 0o700);
    assert_eq!(mode(&office.data.join("store")), 0o700);
    assert_eq!(mode(&office.data.join("operator-token")), 0o600);
    assert_eq!(mode(&office.data.join("outbox")), 0o700);
    assert_eq!(mode(&outbox[0]), 0o600);
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
        (
            "password",
            vec![
                ("password", "password123456"),
                ("passwordCopy", "password123456"),
            ],
            "most common passwords",
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
    // The form says the rule; a long passphrase of letters only is taken.
    let mut visitor = Visitor::new(office.address);
    assert!(
        visitor
            .get("/")
            .body
            .contains("not a common password, your name or your e-mail address")
    );
    let passphrase = "quiet harbour lanterns";
    let letters_only = with(
        &registration("Bob", "bob@example.org"),
        &[("password", passphrase), ("passwordCopy", passphrase)],
    );
    assert_eq!(register(&mut visitor, &letters_only, None).status, 200);
    assert!(office.call("customer.show", &[s("B1-C2")]).is_ok());
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
        ("maxPrice", "0.25"),
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
    assert_eq!(done.text_of("max-price").as_deref(), Some("EUR 0.25"));
    // The account's product list shows the terms with their maximum.
    let account = ada.get("/account");
    assert_eq!(
        account.text_of("max-price-B1-P1").as_deref(),
        Some("EUR 0.25")
    );
    assert!(account.body.contains("0.25 per use"), "{}", account.body);
}

#[test]
fn a_product_without_a_positive_maximum_price_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut ada = Visitor::new(office.address);
    register(&mut ada, &registration("Ada", "ada@example.org"), None);
    let csrf = ada.get("/products/new").csrf();
    let module = crate::examples::module("flat");
    for max in ["", "0", "-1", "lots"] {
        let fields = [
            ("csrf", csrf.as_str()),
            ("name", "Loom"),
            ("terms", "0.25 per use"),
            ("maxPrice", max),
            ("agrees", "yes"),
        ];
        let page = ada.post_multipart("/products/new", &fields, ("taca", "flat.wasm", &module));
        assert_eq!(page.status, 422, "{max:?}: {}", page.body);
        let shown = page.text_of("maxPrice-error").unwrap_or_default();
        assert!(shown.contains("maximum price"), "{max:?}: {shown}");
    }
    assert!(ada.get("/account").body.contains("None yet."), "no product");
}

/// A meter as the grant calls see it: the test signs `grant.request` and
/// `grant.poll` itself, as `meterd grant` does.
pub struct FakeMeter {
    pub address: SocketAddr,
    pub mid: Mid,
    secret: proto::auth::Secret,
}

impl FakeMeter {
    /// Registers a meter of `owner` through the operator's `meter.create`.
    pub fn register(office: &Backoffice, owner: &str) -> FakeMeter {
        let (mid, secret) = office.meter(owner);
        FakeMeter::new(office.address, &mid, &secret)
    }

    /// The meter `mid` with its secret (hex, as `meter.create` answers it).
    pub fn new(address: SocketAddr, mid: &str, secret: &str) -> FakeMeter {
        FakeMeter {
            address,
            mid: mid.parse().unwrap(),
            secret: proto::auth::Secret::new(secret.as_bytes()).unwrap(),
        }
    }

    /// A signed call on `POST /RPC2`, as `send` is signed.
    pub fn call(&self, method: &str, params: &[Value]) -> Result<Value, Fault> {
        // Each signature is accepted once: give every call its own time.
        static LAST_MS: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let previous = LAST_MS.fetch_max(now, Ordering::SeqCst);
        let time_ms = if previous >= now {
            LAST_MS.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            now
        };
        let body = encode_call(method, params);
        let signature = self.secret.sign(&self.mid, time_ms, &body);
        let mut stream = TcpStream::connect_timeout(&self.address, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let head = format!(
            "POST /RPC2 HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\
             {}: {}\r\n{}: {time_ms}\r\n{}: {signature}\r\nConnection: close\r\n\r\n",
            self.address,
            body.len(),
            proto::auth::MID_HEADER,
            self.mid,
            proto::auth::TIME_HEADER,
            proto::auth::SIGNATURE_HEADER,
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let start = raw
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .expect("an HTTP answer")
            + 4;
        match parse_response(&raw[start..], Limits::BACKOFFICE).expect("an XML-RPC answer") {
            MethodResponse::Success(value) => Ok(value),
            MethodResponse::Fault(fault) => Err(fault),
        }
    }

    /// Asks for a device code for `cid`, as `meterd grant CID` does.
    pub fn request_code(&self, cid: &str, label: &str, scope: Scope) -> DeviceCode {
        let request = GrantRequest {
            mid: self.mid,
            cid: cid.parse().unwrap(),
            label: label.to_owned(),
            scope,
        };
        let (method, params) = request.to_call();
        let answer = self
            .call(method, &params)
            .unwrap_or_else(|fault| panic!("grant.request: {fault}"));
        DeviceCode::from_value(&answer).expect("a device code")
    }

    /// Where the device code stands.
    pub fn poll(&self, device_code: &str) -> PollStatus {
        let (method, params) = proto::grant::poll_call(&self.mid, device_code);
        let answer = self
            .call(method, &params)
            .unwrap_or_else(|fault| panic!("grant.poll: {fault}"));
        PollStatus::from_value(&answer).expect("a poll status")
    }
}

/// The grants the operator's `grant.list` shows for a CID or MID, each as
/// (number, MID, CID, scope, label, expiresMs, revokedMs).
pub fn grants_of(office: &Backoffice, id: &str) -> Vec<[String; 7]> {
    let list = office.call("grant.list", &[s(id)]).expect("grant.list");
    list.as_array()
        .expect("an array")
        .iter()
        .map(|grant| {
            [
                "grant",
                "MID",
                "CID",
                "scope",
                "label",
                "expiresMs",
                "revokedMs",
            ]
            .map(|name| {
                grant
                    .member(name)
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("{name} in {grant:?}"))
                    .to_owned()
            })
        })
        .collect()
}

pub fn registered(office: &Backoffice, first: &str) -> (Visitor, String) {
    let mut visitor = Visitor::new(office.address);
    let email = format!("{}@example.org", first.to_lowercase());
    let page = register(&mut visitor, &registration(first, &email), None);
    assert_eq!(page.status, 200, "{}", page.body);
    let cid = page.text_of("cid").expect("a CID");
    (visitor, cid)
}

/// Posts a user code on the code page.
pub fn enter_code(visitor: &mut Visitor, code: &str) -> Page {
    let csrf = visitor.get("/grant").csrf();
    visitor.post_form("/grant", &[("csrf", &csrf), ("code", code)])
}

/// Approves or refuses a code as the confirmation page's buttons do.
fn decide(visitor: &mut Visitor, code: &str, decision: &str, expires: &str) -> Page {
    let csrf = visitor.get("/grant").csrf();
    visitor.post_form(
        "/grant/decide",
        &[
            ("csrf", &csrf),
            ("code", code),
            ("decision", decision),
            ("expires", expires),
        ],
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn a_device_code_is_approved_once_by_its_customer_and_the_meter_learns_it() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (mut ada, ada_cid) = registered(&office, "Ada");
    let (mut bob, bob_cid) = registered(&office, "Bob");
    // Bob's meter asks Ada for a grant, for one local user of its machine.
    let meter = FakeMeter::register(&office, &bob_cid);
    let ada_user = Scope::User {
        uid: 1000,
        name: "ada".into(),
    };
    let code = meter.request_code(&ada_cid, "bob's <b>laptop</b>", ada_user.clone());
    assert!(code.verification_uri.ends_with("/grant"), "{code:?}");
    assert_eq!(meter.poll(&code.device_code), PollStatus::Pending);

    // Without a session the code page leads to the login page and back.
    let mut stranger = Visitor::new(office.address);
    let away = stranger.get("/grant");
    assert_eq!(away.status, 303);
    assert_eq!(away.header("location"), Some("/login?next=/grant"));
    let login = stranger.get("/login?next=/grant");
    assert!(login.body.contains("name=\"next\" value=\"/grant\""));
    let back = stranger.post_form(
        "/login",
        &[
            ("csrf", &login.csrf()),
            ("who", "ada@example.org"),
            ("password", PASSWORD),
            ("next", "/grant"),
        ],
    );
    assert_eq!(back.status, 303, "{}", back.body);
    assert_eq!(back.header("location"), Some("/grant"));
    // Only pages of the site's own list: never elsewhere.
    let mut other = Visitor::new(office.address);
    let csrf = other.get("/login").csrf();
    let elsewhere = other.post_form(
        "/login",
        &[
            ("csrf", &csrf),
            ("who", "ada@example.org"),
            ("password", PASSWORD),
            ("next", "https://evil.example/"),
        ],
    );
    assert_eq!(elsewhere.header("location"), Some("/account"));

    // Ada types it (any case, with or without the dash) and sees the meter,
    // its owner, the machine and who on it the grant is for.
    let typed = code.user_code.to_lowercase().replace('-', " ");
    let shown = enter_code(&mut ada, &typed);
    assert_eq!(shown.status, 200, "{}", shown.body);
    assert_eq!(
        shown.text_of("grant-code-shown").as_deref(),
        Some(code.user_code.as_str())
    );
    assert_eq!(shown.text_of("grant-mid"), Some(meter.mid.to_string()));
    let owner = shown.text_of("grant-owner").unwrap();
    assert!(
        owner.starts_with(&bob_cid) && owner.contains("Bob"),
        "{owner}"
    );
    assert!(
        shown.body.contains("bob&#39;s &lt;b&gt;laptop&lt;/b&gt;")
            || shown.body.contains("bob's &lt;b&gt;laptop&lt;/b&gt;"),
        "the label is escaped: {}",
        shown.body
    );
    assert!(!shown.body.contains("<b>laptop"), "{}", shown.body);
    assert!(
        shown.body.contains("<code>ada</code> (uid 1000)"),
        "{}",
        shown.body
    );
    assert!(
        shown.text_of("grant-foreign").is_some(),
        "another customer's meter"
    );
    assert!(shown.text_of("grant-machine").is_none());
    assert!(shown.body.contains("id=\"approve\"") && shown.body.contains("id=\"refuse\""));

    // Bob cannot see nor decide Ada's code: the same answer as a wrong one.
    let wrong = enter_code(&mut bob, "BCDF-GHJK");
    assert_eq!(wrong.status, 404, "{}", wrong.body);
    let foreign = enter_code(&mut bob, &code.user_code);
    assert_eq!(foreign.status, 404);
    assert_eq!(foreign.text_of("code-error"), wrong.text_of("code-error"));
    assert!(
        !foreign.body.contains(meter.mid.as_str()),
        "{}",
        foreign.body
    );
    assert_eq!(
        decide(&mut bob, &code.user_code, "approve", "never").status,
        404
    );
    // A decision without the CSRF token, or with another session's, decides nothing.
    let forged = ada.post_form(
        "/grant/decide",
        &[
            ("code", &code.user_code),
            ("decision", "approve"),
            ("expires", "never"),
        ],
    );
    assert_eq!(forged.status, 403, "{}", forged.body);
    let bobs_token = bob.get("/grant").csrf();
    let cross = ada.post_form(
        "/grant/decide",
        &[
            ("csrf", &bobs_token),
            ("code", &code.user_code),
            ("decision", "approve"),
            ("expires", "never"),
        ],
    );
    assert_eq!(cross.status, 403);
    assert!(grants_of(&office, &ada_cid).is_empty(), "no grant yet");
    assert!(grants_of(&office, meter.mid.as_str()).is_empty());
    assert_eq!(meter.poll(&code.device_code), PollStatus::Pending);

    // Ada approves for 30 days.
    let before = now_ms();
    let approved = decide(&mut ada, &code.user_code, "approve", "30d");
    assert_eq!(approved.status, 200, "{}", approved.body);
    assert!(
        approved.text_of("grant-approved").is_some(),
        "{}",
        approved.body
    );
    let grants = grants_of(&office, &ada_cid);
    assert_eq!(grants.len(), 1, "{grants:?}");
    let [number, mid, cid, scope, label, expires, revoked] = grants[0].clone();
    assert_eq!(approved.text_of("grant-number"), Some(number.clone()));
    assert_eq!(
        (mid.as_str(), cid.as_str()),
        (meter.mid.as_str(), ada_cid.as_str())
    );
    assert_eq!(
        (scope.as_str(), label.as_str()),
        ("uid:1000:ada", "bob's <b>laptop</b>")
    );
    let expires: u64 = expires.parse().expect("an expiry");
    let thirty_days = 30 * 24 * 3600 * 1000;
    assert!(
        (before + thirty_days..=now_ms() + thirty_days).contains(&expires),
        "{expires}"
    );
    assert_eq!(revoked, "");
    // The meter learns it once.
    match meter.poll(&code.device_code) {
        PollStatus::Approved(grant) => {
            assert_eq!(grant.cid.as_str(), ada_cid);
            assert_eq!(grant.scope, ada_user);
            assert_eq!(grant.expires_ms, Some(expires));
        }
        other => panic!("not approved: {other:?}"),
    }

    // The code is used up: entering or approving it again is refused, and
    // no second grant is made.
    let again = enter_code(&mut ada, &code.user_code);
    assert_eq!(again.status, 404);
    assert_eq!(again.text_of("code-error"), wrong.text_of("code-error"));
    assert_eq!(
        decide(&mut ada, &code.user_code, "approve", "never").status,
        404
    );
    assert_eq!(grants_of(&office, &ada_cid).len(), 1);

    // The account page lists it, live, with a revoke button.
    let account = ada.get("/account");
    assert_eq!(
        account
            .text_of(&format!("grant-status-{number}"))
            .as_deref(),
        Some("live")
    );
    assert!(account.body.contains(&format!("id=\"revoke-{number}\"")));
    assert!(
        account.body.contains("href=\"/grant\""),
        "a link to authorize a meter"
    );
    assert!(
        bob.get("/account").text_of("no-grants").is_some(),
        "Bob gave none"
    );
}

#[test]
fn a_refused_code_makes_no_grant_and_machine_wide_requests_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (mut ada, ada_cid) = registered(&office, "Ada");
    let meter = FakeMeter::register(&office, &ada_cid);
    let code = meter.request_code(&ada_cid, "build-server", Scope::Machine);
    let shown = enter_code(&mut ada, &code.user_code);
    assert_eq!(shown.status, 200, "{}", shown.body);
    assert!(
        shown
            .body
            .contains("<strong>every user of that machine</strong>"),
        "{}",
        shown.body
    );
    assert!(shown.text_of("grant-machine").is_some());
    assert!(shown.text_of("grant-foreign").is_none(), "Ada's own meter");
    // An unknown decision or expiry decides nothing.
    assert_eq!(
        decide(&mut ada, &code.user_code, "maybe", "never").status,
        422
    );
    assert_eq!(
        decide(&mut ada, &code.user_code, "approve", "forever").status,
        422
    );
    assert_eq!(meter.poll(&code.device_code), PollStatus::Pending);
    let refused = decide(&mut ada, &code.user_code, "refuse", "never");
    assert_eq!(refused.status, 200, "{}", refused.body);
    assert!(refused.text_of("grant-refused").is_some());
    assert_eq!(meter.poll(&code.device_code), PollStatus::Denied);
    assert!(grants_of(&office, &ada_cid).is_empty());
    // Refused once is decided: approving it now is refused.
    assert_eq!(
        decide(&mut ada, &code.user_code, "approve", "never").status,
        404
    );
    assert!(grants_of(&office, &ada_cid).is_empty());
}

#[test]
fn guessing_codes_is_throttled_per_customer() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (mut ada, ada_cid) = registered(&office, "Ada");
    let meter = FakeMeter::register(&office, &ada_cid);
    let code = meter.request_code(&ada_cid, "laptop", Scope::Machine);
    // Nine wrong codes are answered as wrong (code pages and decisions both count)...
    for attempt in 0..9 {
        let guess = format!(
            "BCDF-GHJ{}",
            ["K", "L", "M", "N", "P", "Q", "R", "S", "T"][attempt]
        );
        let page = if attempt % 2 == 0 {
            enter_code(&mut ada, &guess)
        } else {
            decide(&mut ada, &guess, "approve", "never")
        };
        assert_eq!(page.status, 404, "attempt {attempt}: {}", page.body);
    }
    // ...then even the right one is refused unseen, and nothing is decided.
    let tenth = enter_code(&mut ada, &code.user_code);
    assert_eq!(tenth.status, 429, "{}", tenth.body);
    assert!(
        tenth
            .text_of("code-error")
            .unwrap()
            .contains("Too many wrong codes")
    );
    assert!(!tenth.body.contains(meter.mid.as_str()));
    assert_eq!(
        decide(&mut ada, &code.user_code, "approve", "never").status,
        429
    );
    assert!(grants_of(&office, &ada_cid).is_empty());
    assert_eq!(meter.poll(&code.device_code), PollStatus::Pending);
    // Logins are a separate allowance: Ada can still log in elsewhere.
    let mut elsewhere = Visitor::new(office.address);
    assert_eq!(log_in(&mut elsewhere, &ada_cid, PASSWORD).status, 303);
}

/// Ada approves a code of `meter` for herself; the grant's number.
pub fn approved_grant(
    office: &Backoffice,
    visitor: &mut Visitor,
    meter: &FakeMeter,
    cid: &str,
) -> String {
    let code = meter.request_code(cid, "laptop", Scope::Machine);
    assert_eq!(enter_code(visitor, &code.user_code).status, 200);
    let approved = decide(visitor, &code.user_code, "approve", "never");
    assert_eq!(approved.status, 200, "{}", approved.body);
    let number = approved.text_of("grant-number").expect("a grant number");
    assert!(
        grants_of(office, cid)
            .iter()
            .any(|grant| grant[0] == number)
    );
    number
}

#[test]
fn a_grant_is_revoked_on_the_account_page_only_by_its_customer() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (mut ada, ada_cid) = registered(&office, "Ada");
    let (mut bob, bob_cid) = registered(&office, "Bob");
    let meter = FakeMeter::register(&office, &bob_cid);
    let adas = approved_grant(&office, &mut ada, &meter, &ada_cid);
    let bobs = approved_grant(&office, &mut bob, &meter, &bob_cid);
    assert_ne!(adas, bobs);
    let revoked_of = |cid: &str, number: &str| {
        grants_of(&office, cid)
            .into_iter()
            .find(|grant| grant[0] == number)
            .map(|grant| grant[6].clone())
            .expect("the grant")
    };
    // Bob cannot revoke Ada's grant by its number, nor one that does not exist.
    let csrf = bob.get("/account").csrf();
    for number in [adas.as_str(), "999", "x"] {
        let page = bob.post_form("/grants/revoke", &[("csrf", &csrf), ("grant", number)]);
        assert_eq!(page.status, 404, "{number}: {}", page.body);
        assert!(page.body.contains("nothing was revoked"), "{}", page.body);
    }
    assert_eq!(revoked_of(&ada_cid, &adas), "", "Ada's grant is untouched");
    // Nor can anyone without the CSRF token, Ada included.
    let forged = ada.post_form("/grants/revoke", &[("grant", &adas)]);
    assert_eq!(forged.status, 403);
    assert_eq!(revoked_of(&ada_cid, &adas), "");
    let mut stranger = Visitor::new(office.address);
    let csrf = stranger.get("/login").csrf();
    let anonymous = stranger.post_form("/grants/revoke", &[("csrf", &csrf), ("grant", &adas)]);
    assert_eq!(anonymous.status, 303);
    assert_eq!(revoked_of(&ada_cid, &adas), "");
    // Ada revokes it: recorded, shown, no button any more; Bob's stays live.
    let csrf = ada.get("/account").csrf();
    let done = ada.post_form("/grants/revoke", &[("csrf", &csrf), ("grant", &adas)]);
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(
        done.text_of("grants-notice")
            .unwrap()
            .contains(&format!("Grant {adas} is revoked"))
    );
    let status = done.text_of(&format!("grant-status-{adas}")).unwrap();
    assert!(status.starts_with("revoked "), "{status}");
    assert!(!done.body.contains(&format!("id=\"revoke-{adas}\"")));
    assert_ne!(revoked_of(&ada_cid, &adas), "");
    assert_eq!(revoked_of(&bob_cid, &bobs), "");
    assert_eq!(
        bob.get("/account")
            .text_of(&format!("grant-status-{bobs}"))
            .as_deref(),
        Some("live")
    );
}

/// A producer declares the components their product uses inside, on the
/// account page; only their own products, only registered PIDs.
#[test]
fn components_are_declared_only_by_the_products_owner() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (mut ada, ada_cid) = registered(&office, "Ada");
    let (mut eve, _) = registered(&office, "Eve");
    let product = |owner: &str, name: &str| {
        office.text(
            "product.create",
            &[
                s(owner),
                s(name),
                s("0.25 per use"),
                Value::Base64(crate::examples::module("flat")),
                s("0.25"),
            ],
            "PID",
        )
    };
    let editor = product(&ada_cid, "Editor");
    let speller = product(&ada_cid, "Speller");
    let post = |visitor: &mut Visitor, pid: &str, components: &str, csrf: Option<&str>| {
        let token = visitor.get("/account").csrf();
        let mut fields = vec![("pid", pid), ("components", components)];
        let token = csrf.map_or(token, str::to_owned);
        if !token.is_empty() {
            fields.push(("csrf", &token));
        }
        let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, *v)).collect();
        visitor.post_form("/products/components", &fields)
    };
    // Eve cannot declare anything for Ada's editor.
    let refused = post(&mut eve, &editor, &speller, None);
    assert_eq!(refused.status, 404, "{}", refused.body);
    // Without the CSRF token, nothing changes.
    let forged = post(&mut ada, &editor, &speller, Some(""));
    assert_eq!(forged.status, 403);
    for bad in [
        "B1-P404",
        "not-a-pid",
        &format!("{editor}T"),
        editor.as_str(),
    ] {
        let page = post(&mut ada, &editor, bad, None);
        assert_eq!(page.status, 422, "{bad}: {}", page.body);
        assert!(page.body.contains("nothing was changed") || page.body.contains("not saved"));
    }
    // The editor's components form, as the account page shows it.
    let declared = |body: &str| {
        let start = body
            .find(&format!("id=\"components-{editor}\""))
            .expect("the editor's components form");
        let end = start + body[start..].find("</form>").unwrap();
        let form = &body[start..end];
        let input = &form[form.find("name=\"components\"").expect("the input")..];
        input.contains(&format!("value=\"{speller}\""))
    };
    assert!(!declared(&ada.get("/account").body), "unchanged");
    let saved = post(&mut ada, &editor, &speller, None);
    assert_eq!(saved.status, 200, "{}", saved.body);
    assert!(declared(&saved.body), "{}", saved.body);
}

/// A code the customer enters after it expired is refused like any other
/// bad code, and the meter polling it hears `expired`.
#[test]
fn an_expired_code_is_refused_and_the_meter_hears_so() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[("BACKOFFICE_GRANT_CODE_VALID_S", "1")],
    );
    let (mut ada, ada_cid) = registered(&office, "Ada");
    let meter = FakeMeter::register(&office, &ada_cid);
    let code = meter.request_code(&ada_cid, "laptop", Scope::Machine);
    assert_eq!(code.expires_in_s, 1);
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    let late = enter_code(&mut ada, &code.user_code);
    assert_eq!(late.status, 404, "{}", late.body);
    assert_eq!(meter.poll(&code.device_code), PollStatus::Expired);
    assert!(grants_of(&office, &ada_cid).is_empty(), "no grant");
    // A fresh code, entered in time, still works.
    let fresh = meter.request_code(&ada_cid, "laptop", Scope::Machine);
    let page = enter_code(&mut ada, &fresh.user_code);
    assert_eq!(page.status, 200, "{}", page.body);
}

/// The meter `mid` as the operator's `meter.show` shows it: (rotatedMs,
/// rotatedBy, previousValidUntilMs, revokedMs, revokedBy).
fn meter_record(office: &Backoffice, mid: &str) -> [String; 5] {
    let shown = office.call("meter.show", &[s(mid)]).expect("meter.show");
    [
        "rotatedMs",
        "rotatedBy",
        "previousValidUntilMs",
        "revokedMs",
        "revokedBy",
    ]
    .map(|name| {
        shown
            .member(name)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{name} in {shown:?}"))
            .to_owned()
    })
}

/// A meter's owner gives it a new secret on the meters page (shown once;
/// the old one works a day more, or not at all when it leaked) and revokes
/// it for good; nobody else can, by MID, with or without a session or the
/// CSRF token.
#[test]
fn a_meter_is_rotated_and_revoked_on_the_meters_page_only_by_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (mut ada, ada_cid) = registered(&office, "Ada");
    let (mut bob, bob_cid) = registered(&office, "Bob");
    let csrf = ada.get("/meters").csrf();
    let made = ada.post_form("/meters", &[("csrf", &csrf)]);
    let mid = made.text_of("mid").expect("a MID");
    let first = FakeMeter::new(
        office.address,
        &mid,
        made.text_of("secret").expect("a secret").trim(),
    );
    let code = first.request_code(&ada_cid, "laptop", Scope::Machine);
    let untouched = meter_record(&office, &mid);
    assert_eq!(untouched, ["", "", "", "", ""].map(str::to_owned));
    // Bob, as an attacker would: Ada's MID in his own session's forms.
    let csrf = bob.get("/meters").csrf();
    for path in ["/meters/rotate", "/meters/revoke"] {
        for target in [mid.as_str(), "B1-M99", "x"] {
            let page = bob.post_form(
                path,
                &[("csrf", &csrf), ("mid", target), ("confirm", "yes")],
            );
            assert_eq!(page.status, 404, "{path} {target}: {}", page.body);
            assert!(page.body.contains("nothing was changed"), "{}", page.body);
        }
    }
    assert!(
        !bob.get("/meters").body.contains(&mid),
        "Bob's page shows no meter of Ada"
    );
    // Without the token, or without a session, nothing either.
    let forged = ada.post_form("/meters/revoke", &[("mid", &mid), ("confirm", "yes")]);
    assert_eq!(forged.status, 403);
    let mut stranger = Visitor::new(office.address);
    let csrf = stranger.get("/login").csrf();
    let anonymous = stranger.post_form("/meters/rotate", &[("csrf", &csrf), ("mid", &mid)]);
    assert_eq!(anonymous.status, 303);
    assert_eq!(meter_record(&office, &mid), untouched);
    first
        .call("grant.poll", &[s(&mid), s(&code.device_code)])
        .expect("the old secret still works");
    // Ada rotates: the new secret is shown once, the old one works a day more.
    let csrf = ada.get("/meters").csrf();
    let rotated = ada.post_form("/meters/rotate", &[("csrf", &csrf), ("mid", &mid)]);
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    assert!(
        rotated.body.contains("id=\"rotated-meter\""),
        "{}",
        rotated.body
    );
    let new_secret = rotated.text_of("secret").expect("the new secret");
    let new_secret = new_secret.trim();
    assert_eq!(new_secret.len(), 64);
    assert!(
        rotated
            .text_of("grace")
            .unwrap()
            .contains("still works until")
    );
    let [rotated_ms, by, until, revoked_ms, _] = meter_record(&office, &mid);
    assert_eq!(by, ada_cid);
    let day = 24 * 3600 * 1000;
    assert_eq!(
        until.parse::<u64>().unwrap() - rotated_ms.parse::<u64>().unwrap(),
        day
    );
    assert_eq!(revoked_ms, "");
    let page = ada.get("/meters");
    assert!(
        !page.body.contains(new_secret),
        "the secret is shown only once"
    );
    let status = page.text_of(&format!("meter-secret-{mid}")).unwrap();
    assert!(status.starts_with("rotated "), "{status}");
    // Both secrets verify now; the new one ends the old one's grace.
    let second = FakeMeter::new(office.address, &mid, new_secret);
    first
        .call("grant.poll", &[s(&mid), s(&code.device_code)])
        .expect("inside the grace");
    second
        .call("grant.poll", &[s(&mid), s(&code.device_code)])
        .expect("the new secret");
    let refused = first
        .call("grant.poll", &[s(&mid), s(&code.device_code)])
        .unwrap_err();
    assert_eq!(refused.registered(), Some(proto::FaultCode::BadSignature));
    assert_eq!(meter_record(&office, &mid)[2], "", "the grace is over");
    // A leaked secret: rotated with no grace, the old one is refused at once.
    let csrf = ada.get("/meters").csrf();
    let leaked = ada.post_form(
        "/meters/rotate",
        &[("csrf", &csrf), ("mid", &mid), ("leaked", "yes")],
    );
    assert_eq!(leaked.status, 200, "{}", leaked.body);
    assert!(
        leaked
            .text_of("grace")
            .unwrap()
            .contains("refused from now on")
    );
    let third = FakeMeter::new(
        office.address,
        &mid,
        leaked.text_of("secret").unwrap().trim(),
    );
    let refused = second
        .call("grant.poll", &[s(&mid), s(&code.device_code)])
        .unwrap_err();
    assert_eq!(refused.registered(), Some(proto::FaultCode::BadSignature));
    third
        .call("grant.poll", &[s(&mid), s(&code.device_code)])
        .expect("the newest secret");
    // Revoking needs the box ticked: it cannot be undone.
    let csrf = ada.get("/meters").csrf();
    let unticked = ada.post_form("/meters/revoke", &[("csrf", &csrf), ("mid", &mid)]);
    assert_eq!(unticked.status, 422, "{}", unticked.body);
    assert_eq!(meter_record(&office, &mid)[3], "");
    let revoked = ada.post_form(
        "/meters/revoke",
        &[("csrf", &csrf), ("mid", &mid), ("confirm", "yes")],
    );
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert!(
        revoked.body.contains("id=\"revoked-meter\""),
        "{}",
        revoked.body
    );
    let status = revoked.text_of(&format!("meter-status-{mid}")).unwrap();
    assert!(status.starts_with("revoked "), "{status}");
    assert!(
        !revoked.body.contains(&format!("id=\"rotate-{mid}\"")),
        "no buttons any more"
    );
    let [_, _, _, revoked_ms, by] = meter_record(&office, &mid);
    assert!(!revoked_ms.is_empty());
    assert_eq!(by, ada_cid);
    // Every later call of the meter is refused with 210, grant calls too.
    let refused = third
        .call("grant.poll", &[s(&mid), s(&code.device_code)])
        .unwrap_err();
    assert_eq!(refused.registered(), Some(proto::FaultCode::MeterRevoked));
    assert!(
        refused
            .message
            .contains(&format!("revoked by its owner {ada_cid}")),
        "{}",
        refused.message
    );
    // It stays revoked: no new secret, and revoking again changes nothing.
    let csrf = ada.get("/meters").csrf();
    let again = ada.post_form("/meters/rotate", &[("csrf", &csrf), ("mid", &mid)]);
    assert_eq!(again.status, 409, "{}", again.body);
    let again = ada.post_form(
        "/meters/revoke",
        &[("csrf", &csrf), ("mid", &mid), ("confirm", "yes")],
    );
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(meter_record(&office, &mid)[3], revoked_ms);
    let _ = bob_cid;
}

/// The value of the page's hidden or text input named `name`.
fn input_value(page: &Page, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page.body.find(&marker).expect("the input") + marker.len();
    let end = start + page.body[start..].find('"').unwrap();
    page.body[start..end].to_owned()
}

#[test]
fn a_top_up_pays_once_however_often_its_form_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[("BACKOFFICE_WEB_TOP_UP", "true")],
    );
    let mut ada = Visitor::new(office.address);
    let cid = register(&mut ada, &registration("Ada", "ada@example.org"), None)
        .text_of("cid")
        .unwrap();
    let balance = || office.text("customer.show", &[s(&cid)], "balance");
    let form = ada.get("/account");
    let (csrf, key) = (form.csrf(), input_value(&form, "key"));
    assert_eq!(key.len(), 24, "a fresh key per form");
    assert_ne!(input_value(&ada.get("/account"), "key"), key);
    let send = |visitor: &mut Visitor, amount: &str, key: &str| {
        visitor.post_form(
            "/account/top-up",
            &[("csrf", &csrf), ("key", key), ("amount", amount)],
        )
    };

    // Refused amounts and forms move nothing.
    for amount in [
        "", "0", "-5", "abc", "1.001", "10000.01", "1e3", " 5 5", "+5", ".5", "5.", "５", "5.000",
    ] {
        let page = send(&mut ada, amount, &key);
        assert_eq!(page.status, 422, "{amount:?}: {}", page.body);
        assert!(
            page.text_of("top-up-error")
                .unwrap()
                .starts_with("Type an amount from EUR 0.01 to EUR 10000.00"),
            "{amount:?}"
        );
    }
    for bad_key in [
        "",
        "zz",
        &"a".repeat(23),
        &"A".repeat(24),
        &format!("{key}0"),
        "../../x",
    ] {
        let page = send(&mut ada, "5", bad_key);
        assert_eq!(page.status, 422, "{bad_key:?}");
        assert!(
            page.text_of("top-up-error")
                .unwrap()
                .contains("out of date")
        );
    }
    let no_csrf = ada.post_form("/account/top-up", &[("key", &key), ("amount", "5")]);
    assert_eq!(no_csrf.status, 403);
    assert_eq!(balance(), "0");

    // Sent, then sent again (a double click, a reload of the answer).
    let first = send(&mut ada, "20.5", &key);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.text_of("balance").as_deref(), Some("EUR 20.50"));
    assert!(
        first
            .text_of("top-up-notice")
            .unwrap()
            .starts_with("EUR 20.50 was added")
    );
    let again = send(&mut ada, "20.5", &key);
    assert_eq!(again.status, 200);
    assert_eq!(
        again.text_of("top-up-notice").as_deref(),
        Some("This top-up was already made: EUR 20.50 was added once, not again.")
    );
    assert_eq!(again.text_of("balance").as_deref(), Some("EUR 20.50"));
    // The same form with another amount is not a new top-up either.
    let changed = send(&mut ada, "99", &key);
    assert_eq!(changed.status, 422);
    assert!(
        changed
            .text_of("top-up-error")
            .unwrap()
            .starts_with("Nothing was paid")
    );
    assert_eq!(balance(), "20.5");

    // One new form sent four times at once, on four connections.
    let key = input_value(&ada.get("/account"), "key");
    let pages: Vec<Page> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let mut visitor = Visitor {
                    address: ada.address,
                    cookie: ada.cookie.clone(),
                };
                let (csrf, key) = (&csrf, &key);
                scope.spawn(move || {
                    visitor.post_form(
                        "/account/top-up",
                        &[("csrf", csrf), ("key", key), ("amount", "10")],
                    )
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap())
            .collect()
    });
    // One paid; the others were told it was already made, or that it was
    // being made right then (409).
    let notices: Vec<(u16, String)> = pages
        .iter()
        .map(|page| {
            (
                page.status,
                page.text_of("top-up-notice").unwrap_or_default(),
            )
        })
        .collect();
    let added = notices
        .iter()
        .filter(|(status, notice)| *status == 200 && notice.starts_with("EUR 10.00 was added"))
        .count();
    assert_eq!(added, 1, "{notices:?}");
    assert!(
        notices
            .iter()
            .all(|(status, notice)| notice.starts_with("EUR 10.00 was added")
                || (*status == 200 && notice.starts_with("This top-up was already made"))
                || (*status == 409 && notice.starts_with("This top-up is being made right now"))),
        "{notices:?}"
    );
    assert_eq!(balance(), "30.5");
    // The largest top-up is taken.
    let largest = input_value(&ada.get("/account"), "key");
    assert_eq!(send(&mut ada, "10000.00", &largest).status, 200);
    assert_eq!(balance(), "10030.5");

    // Another customer cannot complete or spoil Ada's top-up with her key.
    let mut bob = Visitor::new(office.address);
    let bob_cid = register(&mut bob, &registration("Bob", "bob@example.org"), None)
        .text_of("cid")
        .unwrap();
    let bob_csrf = bob.get("/account").csrf();
    let page = bob.post_form(
        "/account/top-up",
        &[("csrf", &bob_csrf), ("key", &key), ("amount", "10")],
    );
    assert_eq!(page.status, 200, "his own top-up, under his own reference");
    assert_eq!(
        office.text("customer.show", &[s(&bob_cid)], "balance"),
        "10"
    );
    assert_eq!(balance(), "10030.5");
}

#[test]
fn without_a_processor_that_collects_there_is_no_top_up() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (mut ada, cid) = registered(&office, "Ada");
    let account = ada.get("/account");
    assert!(!account.body.contains("top-up"), "{}", account.body);
    let page = ada.post_form(
        "/account/top-up",
        &[
            ("csrf", &account.csrf()),
            ("key", &"a".repeat(24)),
            ("amount", "5"),
        ],
    );
    assert_eq!(page.status, 404, "{}", page.body);
    assert!(
        page.text_of("top-up-error")
            .unwrap()
            .contains("Nothing was paid")
    );
    assert_eq!(office.text("customer.show", &[s(&cid)], "balance"), "0");
}

/// A real SMTP server (Python's aiosmtpd) on a port of its own, saving
/// each message it takes in `folder`; stopped when dropped.
struct SmtpServer {
    child: std::process::Child,
}

impl SmtpServer {
    fn start(port: u16, folder: &std::path::Path) -> SmtpServer {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/python/smtp_server.py"
            ))
            .args([
                &port.to_string(),
                folder.to_str().unwrap(),
                "branch",
                "relay-secret-1",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs (aiosmtpd from PyPI: bash scripts/test installs it)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the SMTP server started");
        SmtpServer { child }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backoffice that sends its mail through the plain relay on `port`, as
/// the user `branch` with `password`.
fn branch_mailing_through(dir: &std::path::Path, port: u16, password: &str) -> Backoffice {
    let port = port.to_string();
    Backoffice::start_with(
        dir,
        "127.0.0.1:0",
        &[
            ("BACKOFFICE_SMTP_HOST", "127.0.0.1"),
            ("BACKOFFICE_SMTP_PORT", &port),
            ("BACKOFFICE_SMTP_SECURITY", "plain"),
            ("BACKOFFICE_SMTP_USER", "branch"),
            ("BACKOFFICE_SMTP_PASSWORD", password),
            ("BACKOFFICE_MAIL_FROM", "Branch <noreply@example.org>"),
        ],
    )
}

#[test]
fn reset_links_leave_through_a_real_smtp_relay_even_one_that_was_down() {
    let dir = tempfile::tempdir().unwrap();
    let received = dir.path().join("received");
    std::fs::create_dir(&received).unwrap();
    // A port with nothing on it yet: the relay is down when the mail is
    // written.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let office = branch_mailing_through(dir.path(), port, "relay-secret-1");
    let (mut ada, _) = registered(&office, "Ada");
    let csrf = ada.get("/forgot").csrf();
    let asked = ada.post_form("/forgot", &[("csrf", &csrf), ("who", "ada@example.org")]);
    assert_eq!(asked.status, 200, "{}", asked.body);
    let outbox = dir.path().join("backoffice/outbox");
    let queued = || {
        std::fs::read_dir(&outbox)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.file_name().to_string_lossy().ends_with(".eml"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(queued(), 1, "kept in the outbox while the relay is down");

    let _server = SmtpServer::start(port, &received);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let message = loop {
        let saved: Vec<_> = std::fs::read_dir(&received)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".eml"))
            .collect();
        if let Some(entry) = saved.first() {
            assert_eq!(saved.len(), 1, "sent once");
            break std::fs::read_to_string(entry.path()).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay got nothing in 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        message.contains("X-Envelope-From: noreply@example.org"),
        "{message}"
    );
    assert!(
        message.contains("X-Envelope-To: ada@example.org"),
        "{message}"
    );
    assert!(message.contains("Subject: Your password"), "{message}");
    assert!(message.contains("/reset?token="), "{message}");
    // Once the relay has it, the outbox forgets it (it holds a reset link).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while queued() > 0 {
        assert!(std::time::Instant::now() < deadline, "still in the outbox");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The link in the mail works (its body is quoted-printable: soft line
    // breaks, `=` written `=3D`).
    assert!(message.contains("Content-Transfer-Encoding: quoted-printable"));
    let message = message
        .replace("=\r\n", "")
        .replace("=\n", "")
        .replace("=3D", "=");
    let start = message.find("/reset?token=").unwrap();
    let token: String = message[start + "/reset?token=".len()..]
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    let page = Visitor::new(office.address).get(&format!("/reset?token={token}"));
    assert_eq!(page.status, 200, "{token} from {message}");
    assert!(page.body.contains("passwordCopy"), "{}", page.body);

    // A recipient the relay refuses for good (550) is set aside, and the
    // outbox is left empty.
    let (mut bounce, _) = registered(&office, "Bounce");
    let csrf = bounce.get("/forgot").csrf();
    let asked = bounce.post_form("/forgot", &[("csrf", &csrf), ("who", "bounce@example.org")]);
    assert_eq!(asked.status, 200);
    let aside = outbox.join("undeliverable");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_dir(&aside).map_or(0, Iterator::count) == 0 {
        assert!(std::time::Instant::now() < deadline, "not set aside");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(queued(), 0);
    assert_eq!(std::fs::read_dir(&received).unwrap().count(), 1);

    // A relay that refuses the branch's login (535) refuses the branch, not
    // the message: it stays queued, nothing is set aside or lost.
    let other = tempfile::tempdir().unwrap();
    let refused = branch_mailing_through(other.path(), port, "a-wrong-password");
    let (mut bob, _) = registered(&refused, "Bob");
    let csrf = bob.get("/forgot").csrf();
    let asked = bob.post_form("/forgot", &[("csrf", &csrf), ("who", "bob@example.org")]);
    assert_eq!(asked.status, 200);
    std::thread::sleep(std::time::Duration::from_secs(4));
    let outbox = other.path().join("backoffice/outbox");
    let kept: Vec<String> = std::fs::read_dir(&outbox)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".eml"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(!outbox.join("undeliverable").exists());
    assert_eq!(
        std::fs::read_dir(&received).unwrap().count(),
        1,
        "the relay took nothing from a branch it refused"
    );
}

#[test]
fn a_customer_sees_times_in_their_own_zone_and_the_branch_keeps_its_months() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[
            ("BACKOFFICE_TIME_ZONE", "Europe/Paris"),
            ("BACKOFFICE_CURRENCY", "JPY"),
        ],
    );
    let (mut ada, cid) = registered(&office, "Ada");
    office
        .call("account.deposit", &[s(&cid), s("1500")])
        .unwrap();
    let edit = |visitor: &mut Visitor, zone: &str| {
        let token = visitor.get("/account").csrf();
        let fields = registration("Ada", "ada@example.org");
        let mut form: Vec<(&str, &str)> = fields
            .iter()
            .filter(|(name, _)| !name.starts_with("password") && *name != "macroaccountID")
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        form.extend([
            ("csrf", token.as_str()),
            ("macroaccountID", "**** 5678"),
            ("timeZone", zone),
        ]);
        visitor.post_form("/account", &form)
    };
    let statement = ada.get("/statement");
    assert!(
        statement
            .body
            .contains("in the branch's time zone, Europe/Paris;"),
        "{}",
        statement.body
    );
    assert!(!statement.body.contains("dates are in yours"));
    assert_eq!(statement.text_of("closing").as_deref(), Some("JPY 1500"));
    for bad in ["Mars/Olympus", "../../etc/passwd", "Europe/Pari"] {
        let refused = edit(&mut ada, bad);
        assert!(
            refused
                .body
                .contains("Give a time zone of the IANA database"),
            "{bad:?}: {}",
            refused.body
        );
    }
    let saved = edit(&mut ada, "Asia/Tokyo");
    assert_eq!(
        saved.text_of("notice").as_deref(),
        Some("Saved."),
        "{}",
        saved.body
    );
    assert!(saved.body.contains("value=\"Asia/Tokyo\""));
    let statement = ada.get("/statement");
    assert!(
        statement
            .body
            .contains("Europe/Paris; dates are in yours, Asia/Tokyo;"),
        "{}",
        statement.body
    );
    // Another customer still sees the branch's zone.
    let (mut bob, _) = registered(&office, "Bob");
    assert!(!bob.get("/statement").body.contains("Asia/Tokyo"));
}
