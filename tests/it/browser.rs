//! The web pages in a real browser: headless Chromium driven through
//! chromedriver (Debian's `chromium` and `chromium-driver`, which `scripts/test`
//! installs). A producer registers, logs in, edits, registers a product
//! with a real TACA module and a maximum price; a customer authorizes a
//! meter with the code it asked for (RFC 8628's device code), uses the
//! product through it and revokes the grant; the producer sees a statement
//! of those uses, registers a meter and logs out. Every page is saved as a
//! screenshot in `target/screenshots/`.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

use proto::grant::{PollStatus, Scope};

use crate::support::{Backoffice, MeterdSetup, s};
use crate::web::{PASSWORD, registration};

use crate::examples;

/// How long the browser may take to show an element.
const WAIT: Duration = Duration::from_secs(20);

/// A chromedriver on a loopback port, stopped when dropped.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts chromedriver on a port it picks itself (`--port=0`) and reads
/// the port from the line it prints once it listens: a port chosen here
/// and freed before chromedriver binds it could be taken in between.
fn chromedriver() -> Chromedriver {
    let mut child = Command::new("chromedriver")
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "cannot start chromedriver ({error}): install Debian's chromium and \
                 chromium-driver, as scripts/test does"
            )
        });
    let stdout = child.stdout.take().expect("stdout is piped");
    // Dropped (and so killed) if the port never comes.
    let mut driver = Chromedriver { child, port: 0 };
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut port = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if port.is_none() {
                port = started_on(&line);
                if let Some(port) = port {
                    let _ = sender.send(port);
                }
            }
            // Keep reading, so that later output never meets a closed pipe.
        }
    });
    driver.port = receiver
        .recv_timeout(WAIT)
        .expect("chromedriver said which port it listens on");
    assert!(
        TcpStream::connect(("127.0.0.1", driver.port)).is_ok(),
        "chromedriver listens on port {}",
        driver.port
    );
    driver
}

/// The port in chromedriver's "ChromeDriver was started successfully on
/// port 40451." line.
fn started_on(line: &str) -> Option<u16> {
    line.split_once("started successfully on port ")?
        .1
        .trim_end_matches('.')
        .trim()
        .parse()
        .ok()
}

async fn browser(driver: &Chromedriver) -> Client {
    let mut capabilities = serde_json::Map::new();
    let mut options = serde_json::json!({
        "args": [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1200,1400",
        ]
    });
    if std::path::Path::new("/usr/bin/chromium").exists() {
        options["binary"] = serde_json::Value::from("/usr/bin/chromium");
    }
    capabilities.insert("goog:chromeOptions".to_owned(), options);
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session")
}

/// `target/screenshots`, next to the build output.
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe
        .parent()
        .and_then(|deps| deps.parent())
        .and_then(|profile| profile.parent())
        .expect("target/PROFILE/deps");
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "{name} is a PNG");
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
}

async fn fill(client: &Client, id: &str, text: &str) {
    let field = client.find(Locator::Id(id)).await.expect(id);
    field.clear().await.expect("clear");
    field.send_keys(text).await.expect("type");
}

async fn click(client: &Client, id: &str) {
    client
        .find(Locator::Id(id))
        .await
        .expect(id)
        .click()
        .await
        .expect("click");
}

async fn text_of(client: &Client, id: &str) -> String {
    client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Id(id))
        .await
        .unwrap_or_else(|error| panic!("#{id} did not appear: {error}"))
        .text()
        .await
        .expect("text")
}

/// The uid of the local user running the tests.
fn this_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").expect("/proc").uid()
}

#[test]
fn a_producer_registers_adds_a_product_and_sees_its_uses_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    // With the top-up form (the built-in processor records what it is told).
    let office = Backoffice::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[("BACKOFFICE_WEB_TOP_UP", "true")],
    );
    let base = format!("http://{}", office.address);
    let module_path = dir.path().join("flat.wasm");
    std::fs::write(&module_path, examples::module("flat")).unwrap();
    let driver = chromedriver();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = browser(&driver).await;

        // Register.
        client.goto(&format!("{base}/")).await.unwrap();
        screenshot(&client, "01-entry").await;
        for (name, value) in registration("Grace", "grace@example.org") {
            if name == "agrees" {
                click(&client, "agrees").await;
            } else {
                fill(&client, name, &value).await;
            }
        }
        click(&client, "register-submit").await;
        let cid = text_of(&client, "cid").await;
        assert_eq!(cid, "B1-C1");
        screenshot(&client, "02-registered").await;

        // Log out, and in again with the e-mail address.
        click(&client, "logout").await;
        text_of(&client, "login-submit").await;
        screenshot(&client, "03-login").await;
        fill(&client, "who", "grace@example.org").await;
        fill(&client, "password", PASSWORD).await;
        click(&client, "login-submit").await;
        assert_eq!(text_of(&client, "balance").await, "EUR 0.00");
        screenshot(&client, "04-account").await;

        // Top up from the card on file (a double submit of one form is
        // tested in web.rs: it pays once).
        fill(&client, "amount", "20").await;
        click(&client, "top-up-submit").await;
        // The notice is only on the answer: wait for it before reading the
        // balance, or the old page's balance may be read as it goes.
        assert!(
            text_of(&client, "top-up-notice")
                .await
                .starts_with("EUR 20.00 was added")
        );
        assert_eq!(text_of(&client, "balance").await, "EUR 20.00");
        screenshot(&client, "04-top-up").await;

        // Edit the registration.
        fill(&client, "city", "Cambridge").await;
        click(&client, "save").await;
        assert_eq!(text_of(&client, "notice").await, "Saved.");
        client.goto(&format!("{base}/account")).await.unwrap();
        let city = client.find(Locator::Id("city")).await.unwrap();
        assert_eq!(
            city.prop("value").await.unwrap().as_deref(),
            Some("Cambridge")
        );
        screenshot(&client, "05-edited").await;

        // Register a product with the flat-price TACA.
        click(&client, "add-product").await;
        text_of(&client, "product-submit").await;
        fill(&client, "name", "Difference Engine").await;
        fill(&client, "description", "Tabulates polynomials.").await;
        fill(&client, "terms", "0.25 per use").await;
        fill(&client, "maxPrice", "0.25").await;
        client
            .find(Locator::Id("taca"))
            .await
            .unwrap()
            .send_keys(module_path.to_str().unwrap())
            .await
            .unwrap();
        click(&client, "agrees").await;
        click(&client, "product-submit").await;
        let pid = text_of(&client, "pid").await;
        let test_pid = text_of(&client, "test-pid").await;
        assert_eq!((pid.as_str(), test_pid.as_str()), ("B1-P1", "B1-P1T"));
        assert_eq!(text_of(&client, "max-price").await, "EUR 0.25");
        screenshot(&client, "06-product").await;
        click(&client, "logout").await;
        text_of(&client, "login-submit").await;

        // A customer with a web password and a meter, which may not let her
        // log in before she grants it; it asks for a grant (as `meterd
        // grant` does) and gets a code for her.
        let consumer = office
            .call(
                "customer.create",
                &[s("Cara"), s("cara@example.org"), s(PASSWORD)],
            )
            .unwrap();
        let consumer = consumer.member("CID").unwrap().as_str().unwrap().to_owned();
        office
            .call("account.deposit", &[s(&consumer), s("10")])
            .unwrap();
        let (mid, secret) = office.meter(&consumer);
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, secret).unwrap();
        let setup = MeterdSetup {
            dir: dir.path().to_owned(),
            backoffice: Some((office.address, mid.parse().unwrap(), secret_file)),
        };
        let meterd = setup.start();
        let mut meter = meterd::client::Meter::connect(&meterd.socket);
        let cara: proto::Cid = consumer.parse().unwrap();
        assert!(meter.login(cara).is_err(), "no grant yet");
        let code = meter.grant_start(cara, false).expect("grant.start");
        assert_eq!(code.verification_uri, format!("{base}/grant"));

        // Cara opens the page the meter named: first the login, then the code.
        client.goto(&code.verification_uri).await.unwrap();
        text_of(&client, "login-for-grant").await;
        screenshot(&client, "07-login-for-grant").await;
        fill(&client, "who", "cara@example.org").await;
        fill(&client, "password", PASSWORD).await;
        click(&client, "login-submit").await;
        text_of(&client, "code-submit").await;
        assert!(
            client
                .current_url()
                .await
                .unwrap()
                .as_str()
                .ends_with("/grant")
        );
        fill(&client, "code", &code.user_code.to_lowercase()).await;
        screenshot(&client, "08-grant-code").await;
        click(&client, "code-submit").await;
        assert_eq!(text_of(&client, "grant-mid").await, mid);
        let label = meterd::grants::machine_label(std::path::Path::new("/proc"));
        assert_eq!(text_of(&client, "grant-label").await, label);
        assert!(text_of(&client, "grant-owner").await.starts_with(&consumer));
        let scope = text_of(&client, "grant-scope").await;
        assert!(scope.contains(&format!("uid {}", this_uid())), "{scope}");
        client
            .find(Locator::Id("expires"))
            .await
            .unwrap()
            .select_by_value("1y")
            .await
            .unwrap();
        screenshot(&client, "09-grant-confirm").await;
        click(&client, "approve").await;
        text_of(&client, "grant-approved").await;
        let number = text_of(&client, "grant-number").await;
        screenshot(&client, "10-grant-approved").await;
        // The meter learns of it (`meterd grant` waits like this).
        let granted = loop {
            match meter.grant_wait(&code.request).expect("grant.wait") {
                PollStatus::Pending => continue,
                PollStatus::Approved(grant) => break grant,
                other => panic!("the meter was not told of the approval: {other:?}"),
            }
        };
        assert_eq!(granted.cid, cara);
        assert!(
            matches!(granted.scope, Scope::User { uid, .. } if uid == this_uid()),
            "{:?}",
            granted.scope
        );
        assert!(granted.expires_ms.is_some(), "a year");

        // Cara uses the product three times through that meter.
        let used_from = crate::support::now_ms();
        meter.login(cara).expect("granted now");
        for _ in 0..3 {
            meter
                .begin(pid.parse().unwrap())
                .expect("the meter allows the use")
                .commit()
                .unwrap();
        }
        assert!(meter.flush().unwrap(), "uploaded");

        // Her account shows what she paid and the grant, which she revokes.
        click(&client, "to-account").await;
        assert_eq!(text_of(&client, "balance").await, "EUR 9.25");
        let status = format!("grant-status-{number}");
        assert_eq!(text_of(&client, &status).await, "live");
        screenshot(&client, "11-grants").await;
        click(&client, &format!("revoke-{number}")).await;
        assert!(
            text_of(&client, "grants-notice")
                .await
                .contains(&format!("Grant {number} is revoked"))
        );
        assert!(text_of(&client, &status).await.starts_with("revoked "));
        screenshot(&client, "12-revoked").await;
        let revoked = office.call("grant.list", &[s(&consumer)]).unwrap();
        let revoked_ms = revoked.as_array().unwrap()[0]
            .member("revokedMs")
            .and_then(proto::xmlrpc::Value::as_str)
            .unwrap()
            .to_owned();
        assert!(!revoked_ms.is_empty(), "recorded as revoked");
        click(&client, "logout").await;
        text_of(&client, "login-submit").await;

        // The producer's statement shows the uses.
        fill(&client, "who", "grace@example.org").await;
        fill(&client, "password", PASSWORD).await;
        click(&client, "login-submit").await;
        assert_eq!(text_of(&client, "balance").await, "EUR 20.75");
        click(&client, "details").await;
        text_of(&client, "closing").await;
        // The statements of the month the uses were made in: each month
        // since, in case one ended meanwhile (the link shows this month's).
        let mut lines = String::new();
        for month in crate::support::months_since(used_from) {
            client
                .goto(&format!("{base}/statement?month={month}"))
                .await
                .unwrap();
            text_of(&client, "closing").await;
            for table in client.find_all(Locator::Id("lines")).await.unwrap() {
                lines += &table.text().await.unwrap();
                lines.push('\n');
            }
        }
        // Three uses at 0.25, in as many statement lines as the meter made
        // uploads (one per batch).
        let uses: u32 = lines
            .lines()
            .filter(|line| line.contains(&format!("({pid})")))
            .filter_map(|line| line.split_whitespace().nth(2)?.parse::<u32>().ok())
            .sum();
        assert_eq!(uses, 3, "{lines}");
        assert_eq!(text_of(&client, "closing").await, "EUR 20.75");
        client
            .find(Locator::Id("chart"))
            .await
            .expect("the daily chart");
        // What her product earned: three uses from one paying account.
        let earned = client
            .find(Locator::Id(&format!("earned-{pid}")))
            .await
            .expect("the earnings table")
            .text()
            .await
            .unwrap();
        assert!(
            earned.contains(&format!("({pid}) 3 EUR 0.75 1 100% 0")),
            "{earned}"
        );
        client
            .find(Locator::Id(&format!("chart-{pid}")))
            .await
            .expect("the product's income chart");
        screenshot(&client, "13-statement").await;

        // Register a meter: its secret is shown once.
        client.goto(&format!("{base}/meters")).await.unwrap();
        click(&client, "meter-submit").await;
        let new_mid = text_of(&client, "mid").await;
        assert!(new_mid.starts_with("B1-M"), "{new_mid}");
        let shown_secret = text_of(&client, "secret").await;
        assert_eq!(shown_secret.trim().len(), 64, "{shown_secret}");
        let config = text_of(&client, "config").await;
        assert!(config.contains(&format!("--mid {new_mid}")), "{config}");
        screenshot(&client, "14-meter").await;
        client.goto(&format!("{base}/meters")).await.unwrap();
        let again = client.source().await.unwrap();
        assert!(
            !again.contains(shown_secret.trim()),
            "the secret is shown only once"
        );
        // A new secret for it, shown once; then revoked, which the browser
        // does not even send until the "for good" box is ticked.
        click(&client, &format!("rotate-{new_mid}")).await;
        let rotated = text_of(&client, "secret").await;
        assert_eq!(rotated.trim().len(), 64, "{rotated}");
        assert_ne!(rotated.trim(), shown_secret.trim());
        let grace = text_of(&client, "grace").await;
        assert!(grace.contains("still works until"), "{grace}");
        screenshot(&client, "14a-meter-rotated").await;
        click(&client, &format!("revoke-{new_mid}")).await;
        assert_eq!(
            text_of(&client, &format!("meter-status-{new_mid}")).await,
            "live"
        );
        click(&client, &format!("confirm-{new_mid}")).await;
        click(&client, &format!("revoke-{new_mid}")).await;
        text_of(&client, "revoked-meter").await;
        let status = text_of(&client, &format!("meter-status-{new_mid}")).await;
        assert!(status.starts_with("revoked "), "{status}");
        assert!(
            !client.source().await.unwrap().contains(rotated.trim()),
            "the new secret is shown only once"
        );
        screenshot(&client, "14b-meter-revoked").await;

        // Log out: the account is out of reach.
        click(&client, "logout").await;
        text_of(&client, "login-submit").await;
        client.goto(&format!("{base}/account")).await.unwrap();
        text_of(&client, "login-submit").await;
        assert!(
            client
                .current_url()
                .await
                .unwrap()
                .as_str()
                .ends_with("/login")
        );
        screenshot(&client, "15-logged-out").await;
        client.close().await.unwrap();
    });
}
