//! The web pages in a real browser: headless Chromium driven through
//! chromedriver (Debian's `chromium` and `chromium-driver`, which `.ci/run`
//! installs). A producer registers, logs in, edits, registers a product
//! with a real TACA module, sees a statement after metered uses of it,
//! registers a meter and logs out. Every page is saved as a screenshot in
//! `target/screenshots/`.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

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

fn chromedriver() -> Chromedriver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "cannot start chromedriver ({error}): install Debian's chromium and \
                 chromium-driver, as .ci/run does"
            )
        });
    let driver = Chromedriver { child, port };
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    driver
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

#[test]
fn a_producer_registers_adds_a_product_and_sees_its_uses_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
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
        assert_eq!(text_of(&client, "balance").await, "0.00");
        screenshot(&client, "04-account").await;

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
        screenshot(&client, "06-product").await;

        // A customer uses it three times through a meter.
        let consumer = office
            .call("customer.create", &[s("Cara"), s("cara@example.org")])
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
        meter.login(consumer.parse().unwrap()).unwrap();
        for _ in 0..3 {
            meter
                .begin(pid.parse().unwrap())
                .expect("the meter allows the use")
                .commit()
                .unwrap();
        }
        assert!(meter.flush().unwrap(), "uploaded");

        // The statement shows them.
        client.goto(&format!("{base}/account")).await.unwrap();
        assert_eq!(text_of(&client, "balance").await, "0.75");
        click(&client, "details").await;
        text_of(&client, "lines").await;
        let lines = client
            .find(Locator::Id("lines"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // Three uses at 0.25, in as many statement lines as the meter made
        // uploads (one per batch).
        let uses: u32 = lines
            .lines()
            .filter(|line| line.contains(&format!(" of {pid} ")))
            .filter_map(|line| line.split_whitespace().nth(2)?.parse::<u32>().ok())
            .sum();
        assert_eq!(uses, 3, "{lines}");
        assert_eq!(text_of(&client, "closing").await, "0.75");
        client
            .find(Locator::Id("chart"))
            .await
            .expect("the daily chart");
        screenshot(&client, "07-statement").await;

        // Register a meter: its secret is shown once.
        client.goto(&format!("{base}/meters")).await.unwrap();
        click(&client, "meter-submit").await;
        let new_mid = text_of(&client, "mid").await;
        assert!(new_mid.starts_with("B1-M"), "{new_mid}");
        let shown_secret = text_of(&client, "secret").await;
        assert_eq!(shown_secret.trim().len(), 64, "{shown_secret}");
        let config = text_of(&client, "config").await;
        assert!(config.contains(&format!("--mid {new_mid}")), "{config}");
        screenshot(&client, "08-meter").await;
        client.goto(&format!("{base}/meters")).await.unwrap();
        let again = client.source().await.unwrap();
        assert!(
            !again.contains(shown_secret.trim()),
            "the secret is shown only once"
        );

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
        screenshot(&client, "09-logged-out").await;
        client.close().await.unwrap();
    });
}
