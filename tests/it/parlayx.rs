//! Parlay X Payment over real HTTP: Python's zeep loads the served WSDL and
//! charges, refunds and reserves as a content server would; raw envelopes
//! as other gateways' integrations write them (`loc:` prefixes, vendor
//! headers); and the attacks a service's endpoint gets: replayed, stale,
//! forged and plain-text tokens, a meter posing as a service, a header it
//! must understand, a service charging a customer who never granted it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

use base64::Engine as _;
use proto::xmlrpc::Value;

use crate::support::{Backoffice, IO_TIMEOUT, s};
use crate::web::{FakeMeter, Visitor, approved_grant, enter_code, registered};

const WSSE: &str =
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd";
const WSU: &str =
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd";
const DIGEST: &str = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordDigest";
const AMOUNT_PATH: &str = "/AmountChargingService/services/AmountCharging";
const AMOUNT_LOCAL: &str = "http://www.csapi.org/schema/parlayx/payment/amount_charging/v2_1/local";

/// A branch with a producer's product (maximum 5 per charge), its service
/// credential, Ada who granted the service and Bob who did not, both with
/// 10 on their accounts.
struct Branch {
    office: Backoffice,
    pid: String,
    owner: String,
    service: (String, String),
    ada: (Visitor, String),
    bob: String,
}

fn branch(dir: &std::path::Path) -> Branch {
    branch_with(dir, "flat")
}

/// As `branch`, the product priced by the TACA example `module`.
fn branch_with(dir: &std::path::Path, module: &str) -> Branch {
    branch_in(Backoffice::start(dir), module)
}

/// As `branch_with`, on the backoffice `office`.
fn branch_in(office: Backoffice, module: &str) -> Branch {
    let mut ada = registered(&office, "Ada");
    let (_, bob) = registered(&office, "Bob");
    let owner = office.text(
        "customer.create",
        &[s("Owen"), s("owen@example.org")],
        "CID",
    );
    let pid = office.text(
        "product.create",
        &[
            s(&owner),
            s("Ring tones"),
            s("1.25 a tone"),
            Value::Base64(crate::examples::module(module)),
            s("5"),
        ],
        "PID",
    );
    let credential = office
        .call("meter.create", &[s(&owner), s(&pid)])
        .expect("a service credential");
    let member = |name: &str| {
        credential
            .member(name)
            .and_then(Value::as_str)
            .unwrap()
            .to_owned()
    };
    let service = (member("MID"), member("secret"));
    // Ada grants the service the way a meter is granted: a device code the
    // service asks for, approved on the grant page.
    let as_meter = FakeMeter::new(office.address, &service.0, &service.1);
    approved_grant(&office, &mut ada.0, &as_meter, &ada.1);
    for cid in [&ada.1, &bob] {
        office.call("account.deposit", &[s(cid), s("10")]).unwrap();
    }
    Branch {
        office,
        pid,
        owner,
        service,
        ada,
        bob,
    }
}

fn balance(office: &Backoffice, cid: &str) -> String {
    office.text("customer.show", &[s(cid)], "balance")
}

fn zeep(branch: &Branch, scenario: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/parlayx_client.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(format!("http://{}", branch.office.address))
        .arg(&branch.service.0)
        .arg(&branch.service.1)
        .arg(scenario)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "zeep failed (is it installed? scripts/test installs it):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// The outcome of call `name`: `Ok(result)` or `Err((messageId, variables))`.
fn outcome(lines: &[serde_json::Value], name: &str) -> Result<String, (String, Vec<String>)> {
    let line = lines
        .iter()
        .find(|line| line["call"] == name)
        .unwrap_or_else(|| panic!("no call {name}: {lines:?}"));
    if let Some(fault) = line.get("fault") {
        let variables = fault["variables"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|v| v.as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        return Err((
            fault["messageId"].as_str().unwrap_or("").to_owned(),
            variables,
        ));
    }
    Ok(line["ok"].as_str().unwrap_or("").to_owned())
}

#[test]
fn zeep_charges_refunds_and_reserves_for_a_granted_customer_only_once_per_reference() {
    let dir = tempfile::tempdir().unwrap();
    let branch = branch(dir.path());
    let ada_email = "ada@example.org";
    let lines = zeep(&branch, "amounts", &[ada_email, "bob@example.org"]);
    let fault = |name: &str| outcome(&lines, name).expect_err(name);
    assert_eq!(outcome(&lines, "charge"), Ok(String::new()));
    // The same code and request: the first outcome, charged once.
    assert_eq!(outcome(&lines, "charge again"), Ok(String::new()));
    // The same code, another request: refused, naming the part.
    assert_eq!(
        fault("charge other"),
        ("SVC0002".into(), vec!["referenceCode".into()])
    );
    // Bob never granted the service: a policy error, and he loses nothing.
    assert_eq!(fault("stranger").0, "POL0001");
    // An address nobody registered reads exactly as a customer who did
    // not grant: a service cannot tell the branch's customers from
    // strangers, by charging or by refunding (a refund goes only to a
    // customer who granted the service at some time).
    assert_eq!(fault("nobody"), fault("stranger"));
    assert_eq!(fault("refund stranger"), fault("stranger"));
    assert_eq!(fault("refund nobody"), fault("stranger"));
    assert_eq!(fault("split with stranger").0, "POL0001");
    assert_eq!(fault("dollars").0, "POL0001");
    assert_eq!(fault("too much").0, "POL0001");
    assert_eq!(fault("no amount").0, "SVC0007");
    assert_eq!(outcome(&lines, "refund"), Ok(String::new()));
    // A reservation: its identifier, more reserved, charged in parts, one
    // charge beyond what is left refused, released (twice: done is done).
    assert_eq!(outcome(&lines, "reserve"), Ok("H0".into()));
    assert_eq!(outcome(&lines, "reserve more"), Ok(String::new()));
    assert_eq!(outcome(&lines, "charge part"), Ok(String::new()));
    assert_eq!(fault("charge beyond").0, "SVC0270");
    assert_eq!(outcome(&lines, "charge rest"), Ok(String::new()));
    assert_eq!(outcome(&lines, "release"), Ok(String::new()));
    assert_eq!(outcome(&lines, "release again"), Ok(String::new()));
    assert_eq!(
        fault("charge released"),
        ("SVC0002".into(), vec!["reservationIdentifier".into()])
    );
    assert_eq!(fault("reserve too much").0, "POL0001");
    assert_eq!(fault("unknown reservation").0, "SVC0002");
    // 10 - 1.25 + 0.25 - 2.5 - 1.5: nothing charged twice, nothing for refusals.
    assert_eq!(balance(&branch.office, &branch.ada.1), "5");
    assert_eq!(balance(&branch.office, &branch.bob), "10");
    assert_eq!(balance(&branch.office, &branch.owner), "5");
    // The statement names the product and the service's reference.
    let statement = branch
        .office
        .call("account.statement", &[s(&branch.ada.1)])
        .unwrap();
    let lines: Vec<String> = statement
        .as_array()
        .unwrap()
        .iter()
        .map(|line| {
            line.member("what")
                .and_then(Value::as_str)
                .unwrap()
                .to_owned()
        })
        .collect();
    for reference in ["r-1", "r-2", "r-3", "r-4"] {
        let expected = format!("payment to {}, reference {reference}", branch.pid);
        assert!(lines.contains(&expected), "{expected} in {lines:?}");
    }
    assert_eq!(lines.len(), 5, "a deposit and four payments: {lines:?}");
    let descriptions: Vec<&str> = statement
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|line| line.member("description").and_then(Value::as_str))
        .collect();
    assert_eq!(
        descriptions,
        ["", "Ring tone", "Goodwill", "First half", "Second half"]
    );
    // Ada's own statement page shows each with the service's description.
    let mut ada = branch.ada.0;
    let page = ada.get("/statement");
    assert_eq!(page.status, 200);
    for line in [
        format!("Ring tones ({}), reference r-1: Ring tone", branch.pid),
        format!("Ring tones ({}), reference r-3: First half", branch.pid),
    ] {
        assert!(page.body.contains(&line), "{line} in {}", page.body);
    }
    // What the service cost her this month: its charges less its refund
    // (1.25 - 0.25 + 2.5 + 1.5), no uses, so no price of one.
    let row = format!("id=\"bought-{}\"", branch.pid);
    let at = page
        .body
        .find(&row)
        .unwrap_or_else(|| panic!("{row} in {}", page.body));
    let row = &page.body[at..at + page.body[at..].find("</tr>").unwrap()];
    assert!(row.contains(">EUR 5.00</td>"), "{row}");
    assert!(row.contains("Ring tones"), "{row}");
    let verified = branch.office.call("ledger.verify", &[]).unwrap();
    let problems = verified
        .member("problems")
        .and_then(Value::as_array)
        .unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn zeep_prices_charges_and_reserves_volumes_with_the_products_taca() {
    let dir = tempfile::tempdir().unwrap();
    // 0.002 per MB, 0.001 per call; any other unit refused.
    let branch = branch_with(dir.path(), "per-unit");
    let lines = zeep(&branch, "volumes", &["ada@example.org", &branch.pid]);
    let fault = |name: &str| outcome(&lines, name).expect_err(name);
    assert_eq!(outcome(&lines, "price"), Ok("1".into()));
    assert_eq!(outcome(&lines, "charge"), Ok(String::new()));
    assert_eq!(outcome(&lines, "charge again"), Ok(String::new()));
    assert_eq!(fault("unknown unit").0, "SVC0270");
    assert_eq!(
        fault("unknown parameter"),
        ("SVC0002".into(), vec!["parameters".into()])
    );
    assert_eq!(fault("too much").0, "POL0001");
    assert_eq!(outcome(&lines, "refund"), Ok(String::new()));
    assert_eq!(outcome(&lines, "reserve"), Ok("H0".into()));
    assert_eq!(outcome(&lines, "reserve more"), Ok(String::new()));
    assert_eq!(outcome(&lines, "charge part"), Ok(String::new()));
    assert_eq!(fault("charge beyond").0, "SVC0270");
    assert_eq!(outcome(&lines, "release"), Ok(String::new()));
    assert_eq!(outcome(&lines, "by code"), Ok(String::new()));
    assert_eq!(fault("by other code").0, "SVC0007");
    // 10 - 2 (1000 MB) + 0.5 (250 MB back) - 1.5 (750 MB) - 0.001 (a call).
    assert_eq!(balance(&branch.office, &branch.ada.1), "6.999");
    assert_eq!(balance(&branch.office, &branch.owner), "3.001");
    let verified = branch.office.call("ledger.verify", &[]).unwrap();
    assert_eq!(
        verified.member("ok"),
        Some(&Value::Bool(true)),
        "{verified:?}"
    );
}

#[test]
fn a_service_is_granted_on_its_own_consent_page_and_never_by_a_customers_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut branch = branch(dir.path());
    let as_meter = FakeMeter::new(branch.office.address, &branch.service.0, &branch.service.1);
    // The page Ada approves on says a service charges her directly, which
    // one, and the most one charge takes; not "used on its machine".
    let code = as_meter.request_code(
        &branch.ada.1,
        "ring tone shop",
        proto::grant::Scope::Machine,
    );
    let page = enter_code(&mut branch.ada.0, &code.user_code);
    assert_eq!(page.status, 200, "{}", page.body);
    let at = page
        .body
        .find("id=\"grant-service\"")
        .expect("the service's wording");
    let said = &page.body[at..at + page.body[at..].find("</p>").unwrap()];
    assert!(
        said.contains("Ring tones")
            && said.contains(&branch.pid)
            && said.contains("at most EUR 5.00"),
        "{said}"
    );
    assert!(!page.body.contains("meterd grant"), "{}", page.body);
    // A meter's page keeps the meter's wording.
    let meter = FakeMeter::register(&branch.office, &branch.ada.1);
    let code = meter.request_code(&branch.ada.1, "laptop", proto::grant::Scope::Machine);
    let page = enter_code(&mut branch.ada.0, &code.user_code);
    assert!(page.text_of("grant-service").is_none(), "{}", page.body);
    assert!(page.body.contains("meterd grant"), "{}", page.body);
    // The service holding Ada's password cannot grant itself with it.
    let (method, params) = proto::grant::PasswordGrant {
        request: proto::grant::GrantRequest {
            mid: branch.service.0.parse().unwrap(),
            cid: branch.ada.1.parse().unwrap(),
            label: "ring tone shop".into(),
            scope: proto::grant::Scope::Machine,
        },
        password: crate::web::PASSWORD.to_owned(),
        expires_in_s: None,
    }
    .to_call();
    let before = branch
        .office
        .call("grant.list", &[s(&branch.ada.1)])
        .unwrap();
    let fault = as_meter.call(method, &params).unwrap_err();
    assert!(fault.message.contains("web pages"), "{fault:?}");
    let after = branch
        .office
        .call("grant.list", &[s(&branch.ada.1)])
        .unwrap();
    assert_eq!(before, after);
}

#[test]
fn confirmation_references_must_name_an_unused_metered_use_of_the_product_by_the_payer() {
    let dir = tempfile::tempdir().unwrap();
    let branch = branch(dir.path());
    // Ada uses the product three times on her metered machine.
    let meter = FakeMeter::register(&branch.office, &branch.ada.1);
    let (method, params) = proto::grant::PasswordGrant {
        request: proto::grant::GrantRequest {
            mid: meter.mid,
            cid: branch.ada.1.parse().unwrap(),
            label: "laptop".into(),
            scope: proto::grant::Scope::Machine,
        },
        password: crate::web::PASSWORD.to_owned(),
        expires_in_s: None,
    }
    .to_call();
    meter.call(method, &params).expect("Ada's grant");
    let now = crate::support::now_ms();
    let readings = (1..=3)
        .map(|seq| proto::reading::Reading {
            seq,
            time_ms: now - 2_000 + seq,
            context: proto::Context::parse("4242.1").unwrap(),
            event: proto::reading::Event::Commit {
                pid: branch.pid.parse().unwrap(),
                payer: Some(proto::Payer::Customer(branch.ada.1.parse().unwrap())),
            },
        })
        .collect();
    let request = proto::upload::SendRequest {
        mid: meter.mid,
        body: proto::upload::SendBody::Batch(proto::upload::Batch {
            id: proto::BatchId::parse("laptop:1").unwrap(),
            readings,
            parties: Vec::new(),
        }),
    };
    meter
        .call(proto::upload::SEND_METHOD, &request.to_params())
        .expect("applied");
    // 10 - 0.75 for the three uses.
    assert_eq!(balance(&branch.office, &branch.ada.1), "9.25");
    let batch = format!("{}:laptop:1", meter.mid);
    let lines = zeep(&branch, "evidence", &["ada@example.org", &batch]);
    let fault = |name: &str| outcome(&lines, name).expect_err(name);
    assert_eq!(outcome(&lines, "with evidence"), Ok(String::new()));
    assert_eq!(outcome(&lines, "again"), Ok(String::new()));
    // The same reading (spelled otherwise) for another charge.
    assert_eq!(fault("used").0, "POL0253");
    assert_eq!(
        fault("missing"),
        ("POL0253".into(), vec![format!("{batch}:9")])
    );
    assert_eq!(fault("malformed").0, "POL0253");
    assert_eq!(fault("twice in one").0, "POL0253");
    assert_eq!(
        fault("too many"),
        ("POL0252".into(), vec!["confirmationRefs".into()])
    );
    assert_eq!(outcome(&lines, "two"), Ok(String::new()));
    assert_eq!(balance(&branch.office, &branch.ada.1), "7.25");
    let verified = branch.office.call("ledger.verify", &[]).unwrap();
    assert_eq!(
        verified.member("ok"),
        Some(&Value::Bool(true)),
        "{verified:?}"
    );
}

#[test]
fn reservations_expire_with_the_backoffice_stopped_across_their_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let ttl = [("BACKOFFICE_RESERVATION_TTL_S", "2")];
    let office = Backoffice::start_with(dir.path(), "127.0.0.1:0", &ttl);
    let listen = office.address.to_string();
    let mut branch = branch_in(office, "flat");
    // Ada's 10 held by two reservations: a third one finds nothing available.
    let lines = zeep(&branch, "expiry-before", &["ada@example.org"]);
    assert_eq!(outcome(&lines, "first"), Ok("H0".into()));
    assert_eq!(outcome(&lines, "second"), Ok("H1".into()));
    assert_eq!(outcome(&lines, "beyond balance").unwrap_err().0, "SVC0270");
    // Stopped across the expiry, started again: the reservations hold
    // nothing and charge nothing, and their expiries are written.
    branch.office.running.child.kill().unwrap();
    branch.office.running.child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    branch.office = Backoffice::start_with(dir.path(), &listen, &ttl);
    let lines = zeep(&branch, "expiry-after", &["ada@example.org"]);
    assert_eq!(
        outcome(&lines, "charge expired").unwrap_err(),
        ("SVC0002".into(), vec!["reservationIdentifier".into()])
    );
    assert_eq!(outcome(&lines, "again"), Ok("H2".into()));
    assert_eq!(balance(&branch.office, &branch.ada.1), "10");
    let verified = branch.office.call("ledger.verify", &[]).unwrap();
    assert_eq!(
        verified.member("ok"),
        Some(&Value::Bool(true)),
        "{verified:?}"
    );
}

/// A WS-Security header for `user` with `password`, `nonce` and `created`.
fn security(user: &str, password: &str, nonce: &[u8], created: &str, must: bool) -> String {
    let base64 = base64::engine::general_purpose::STANDARD;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    digest.update(nonce);
    digest.update(created.as_bytes());
    digest.update(password.as_bytes());
    let must = if must {
        " soapenv:mustUnderstand=\"1\""
    } else {
        ""
    };
    format!(
        "<wsse:Security xmlns:wsse=\"{WSSE}\" xmlns:wsu=\"{WSU}\"{must}><wsse:UsernameToken>\
         <wsse:Username>{user}</wsse:Username><wsse:Password Type=\"{DIGEST}\">{}</wsse:Password>\
         <wsse:Nonce>{}</wsse:Nonce><wsu:Created>{created}</wsu:Created></wsse:UsernameToken>\
         </wsse:Security>",
        base64.encode(digest.finish()),
        base64.encode(nonce)
    )
}

fn now_created(offset_s: i64) -> String {
    let now = crate::support::now_ms() as i64 / 1000 + offset_s;
    let (year, month, day) = proto::time::civil_date(u64::try_from(now).unwrap() * 1000);
    let seconds = now.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// A raw envelope with the Huawei-style vendor header some gateways
/// require, `extra` headers, and a chargeAmount with the `loc:` prefix.
fn envelope(headers: &str, reference: &str, amount: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<soapenv:Envelope \
         xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         xmlns:v2=\"http://www.huawei.com.cn/schema/common/v2_1\" xmlns:loc=\"{AMOUNT_LOCAL}\">\n\
         <soapenv:Header><v2:RequestSOAPHeader><v2:spId>35000001</v2:spId>\
         <v2:timeStamp>20261203101500</v2:timeStamp></v2:RequestSOAPHeader>{headers}\
         </soapenv:Header>\n<soapenv:Body><loc:chargeAmount>\
         <loc:endUserIdentifier>mailto:ada@example.org</loc:endUserIdentifier>\
         <loc:charge><description>Tone</description><currency>EUR</currency>\
         <amount>{amount}</amount><code></code></loc:charge>\
         <loc:referenceCode>{reference}</loc:referenceCode></loc:chargeAmount>\
         </soapenv:Body></soapenv:Envelope>"
    )
}

/// Posts `body` to `path`: the status and the body answered.
fn post(address: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&address, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: text/xml; charset=utf-8\r\n\
         SOAPAction: \"\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let status = raw[9..12].parse().unwrap();
    let start = raw.find("\r\n\r\n").unwrap() + 4;
    (status, raw[start..].to_owned())
}

#[test]
fn a_retried_charge_answers_its_first_outcome_after_the_grant_is_revoked_and_charges_once() {
    let dir = tempfile::tempdir().unwrap();
    let branch = branch(dir.path());
    let address = branch.office.address;
    let (mid, secret) = (&branch.service.0, &branch.service.1);
    let token = |nonce: &[u8]| security(mid, secret, nonce, &now_created(0), false);
    let (status, body) = post(
        address,
        AMOUNT_PATH,
        &envelope(&token(b"retry-nonce-0001"), "r-1", "2"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(balance(&branch.office, &branch.ada.1), "8");
    // Ada revokes the service's grant; its answer to the first call was lost.
    let grants = branch
        .office
        .call("grant.list", &[s(&branch.ada.1)])
        .unwrap();
    let number = match &grants {
        Value::Array(grants) => grants[0].member("grant").cloned().expect("a grant number"),
        other => panic!("{other:?}"),
    };
    branch.office.call("grant.revoke", &[number]).unwrap();
    // The retry answers what the first call did, and charges nothing more.
    let (status, body) = post(
        address,
        AMOUNT_PATH,
        &envelope(&token(b"retry-nonce-0002"), "r-1", "2"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chargeAmountResponse"), "{body}");
    assert_eq!(balance(&branch.office, &branch.ada.1), "8");
    // The same code with another amount is not a retry: it goes the whole
    // way and is refused (here for the revoked grant), as is a new code.
    let (status, body) = post(
        address,
        AMOUNT_PATH,
        &envelope(&token(b"retry-nonce-0003"), "r-1", "3"),
    );
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("not granted"), "{body}");
    let (status, body) = post(
        address,
        AMOUNT_PATH,
        &envelope(&token(b"retry-nonce-0004"), "r-2", "2"),
    );
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("not granted"), "{body}");
    assert_eq!(balance(&branch.office, &branch.ada.1), "8");
}

#[test]
fn raw_envelopes_of_other_gateways_work_and_forged_replayed_or_foreign_calls_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let branch = branch(dir.path());
    let address = branch.office.address;
    let (mid, secret) = (&branch.service.0, &branch.service.1);
    let token = |nonce: &[u8], created: &str| security(mid, secret, nonce, created, true);

    // The served WSDL names this server.
    let wsdl = Visitor::new(address).get(&format!("{AMOUNT_PATH}?wsdl"));
    assert_eq!(wsdl.status, 200);
    assert!(
        wsdl.body
            .contains(&format!("http://{address}{AMOUNT_PATH}"))
    );
    assert!(wsdl.body.contains("name=\"chargeAmount\""));

    // A vendor header without mustUnderstand is ignored; the call works.
    let nonce = b"nonce-0001-abcdef";
    let call = envelope(&token(nonce, &now_created(0)), "raw-1", "1.00");
    let (status, body) = post(address, AMOUNT_PATH, &call);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chargeAmountResponse"), "{body}");
    // The same envelope again is a replayed token: refused before anything.
    let (status, body) = post(address, AMOUNT_PATH, &call);
    assert_eq!(status, 500);
    assert!(body.contains("wsse:FailedAuthentication"), "{body}");

    let refused = |headers: String, label: &str| {
        let (status, body) = post(address, AMOUNT_PATH, &envelope(&headers, label, "1"));
        assert_eq!(status, 500, "{label}: {body}");
        body
    };
    // A token made six minutes ago, a wrong password, a plain meter of the
    // owner posing as the service, no token at all.
    let stale = refused(token(b"nonce-0002-abcdef", &now_created(-360)), "stale");
    assert!(stale.contains("FailedAuthentication"), "{stale}");
    let wrong = security(
        mid,
        "not the secret",
        b"nonce-0003-abcdef",
        &now_created(0),
        false,
    );
    assert!(refused(wrong, "wrong").contains("FailedAuthentication"));
    let (meter, meter_secret) = branch.office.meter(&branch.owner);
    let posing = security(
        &meter,
        &meter_secret,
        b"nonce-0004-abcdef",
        &now_created(0),
        false,
    );
    assert!(refused(posing, "posing").contains("FailedAuthentication"));
    assert!(refused(String::new(), "none").contains("FailedAuthentication"));
    // A header we must understand and do not: the MustUnderstand fault.
    let unknown = format!(
        "{}<x:Route xmlns:x=\"urn:routing\" soapenv:mustUnderstand=\"1\"/>",
        token(b"nonce-0005-abcdef", &now_created(0))
    );
    assert!(refused(unknown, "must").contains("soapenv:MustUnderstand"));
    // Not XML, a DTD, SOAP 1.2: faults, never a crash.
    let (status, body) = post(address, AMOUNT_PATH, "<<<");
    assert_eq!(status, 500, "{body}");
    let dtd = "<!DOCTYPE x [<!ENTITY a \"b\">]><x/>";
    assert!(post(address, AMOUNT_PATH, dtd).1.contains("DOCTYPE"));
    let soap12 =
        "<e:Envelope xmlns:e=\"http://www.w3.org/2003/05/soap-envelope\"><e:Body/></e:Envelope>";
    assert!(
        post(address, AMOUNT_PATH, soap12)
            .1
            .contains("VersionMismatch")
    );

    // The service credential asks grants but never uploads.
    let as_meter = FakeMeter::new(address, mid, secret);
    let upload = as_meter.call("send", &[s("x")]).unwrap_err();
    assert_eq!(
        upload.code,
        proto::FaultCode::Unauthorized.code(),
        "{upload}"
    );

    // Only the one good call moved money.
    assert_eq!(balance(&branch.office, &branch.ada.1), "9");
    assert_eq!(balance(&branch.office, &branch.owner), "1");
}

#[test]
fn a_producer_makes_a_service_credential_on_the_meters_page_for_their_own_product_only() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let (mut owen, owner) = registered(&office, "Owen");
    let (mut mallory, _) = registered(&office, "Mallory");
    let mut ada = registered(&office, "Ada");
    let product = office
        .call(
            "product.create",
            &[
                s(&owner),
                s("Ring tones"),
                s("1.25 a tone"),
                Value::Base64(crate::examples::module("flat")),
                s("5"),
            ],
        )
        .unwrap();
    let id = |name: &str| {
        product
            .member(name)
            .and_then(Value::as_str)
            .unwrap()
            .to_owned()
    };
    let (pid, test_pid) = (id("PID"), id("testPID"));
    // Another customer, a test PID, a made-up PID: no credential, and no
    // meter of any kind appears.
    for (who, named) in [
        (0, pid.as_str()),
        (1, test_pid.as_str()),
        (1, "B1-P999"),
        (1, "not a PID"),
    ] {
        let visitor = if who == 0 { &mut mallory } else { &mut owen };
        let csrf = visitor.get("/meters").csrf();
        let page = visitor.post_form("/meters", &[("csrf", &csrf), ("service", named)]);
        assert_eq!(page.status, 404, "{named}: {}", page.body);
        assert!(page.text_of("secret").is_none(), "{}", page.body);
        assert!(visitor.get("/meters").text_of("meters").is_none());
    }
    // Owen's page offers his product; the credential's secret is shown
    // once, with where and how to call.
    let meters = owen.get("/meters");
    assert!(
        meters.body.contains(&format!("<option value=\"{pid}\">")),
        "{}",
        meters.body
    );
    let made = owen.post_form("/meters", &[("csrf", &meters.csrf()), ("service", &pid)]);
    assert_eq!(made.status, 200, "{}", made.body);
    let mid = made.text_of("mid").expect("the credential's MID");
    let secret = made.text_of("secret").expect("its password");
    assert!(
        made.text_of("parlayx-base").unwrap().ends_with(AMOUNT_PATH),
        "{}",
        made.body
    );
    assert!(
        made.text_of(&format!("meter-for-{mid}"))
            .unwrap()
            .contains(&pid)
    );
    assert!(owen.get("/meters").text_of("secret").is_none());
    // It is a service credential: Ada grants it on its consent page, and
    // it charges her, the money going to Owen.
    let as_service = FakeMeter::new(office.address, &mid, &secret);
    approved_grant(&office, &mut ada.0, &as_service, &ada.1);
    office
        .call("account.deposit", &[s(&ada.1), s("10")])
        .unwrap();
    let call = envelope(
        &security(&mid, &secret, b"web-made-nonce-1", &now_created(0), false),
        "web-1",
        "2",
    );
    let (status, body) = post(office.address, AMOUNT_PATH, &call);
    assert_eq!(status, 200, "{body}");
    assert_eq!(balance(&office, &ada.1), "8");
    assert_eq!(balance(&office, &owner), "2");
    // Like any service credential, it uploads nothing.
    let upload = as_service.call("send", &[s("x")]).unwrap_err();
    assert_eq!(
        upload.code,
        proto::FaultCode::Unauthorized.code(),
        "{upload}"
    );
}

/// Posts the account form of the customer `first` (as registered by
/// `registered`) with `telephone`.
fn set_telephone(visitor: &mut Visitor, first: &str, telephone: &str) -> crate::web::Page {
    let csrf = visitor.get("/account").csrf();
    let mut fields: Vec<(&str, String)> =
        crate::web::registration(first, &format!("{}@example.org", first.to_lowercase()))
            .into_iter()
            .filter(|(name, _)| !name.starts_with("password") && *name != "agrees")
            .collect();
    fields.push(("csrf", csrf));
    fields.push(("telephone", telephone.to_owned()));
    let fields: Vec<(&str, &str)> = fields
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    visitor.post_form("/account", &fields)
}

#[test]
fn a_service_charges_a_customer_by_the_telephone_number_they_registered() {
    let dir = tempfile::tempdir().unwrap();
    let mut branch = branch(dir.path());
    let (mut bob, bob_cid) = (Visitor::new(branch.office.address), branch.bob.clone());
    let logged_in = crate::web::log_in(&mut bob, "bob@example.org", crate::web::PASSWORD);
    assert_eq!(logged_in.status, 303, "{}", logged_in.body);
    // Numbers not in international form are refused on the form.
    for bad in ["0151 1234 5678", "+49 151 CALL", "+0"] {
        let page = set_telephone(&mut branch.ada.0, "Ada", bad);
        assert_eq!(page.status, 422, "{bad}: {}", page.body);
        assert!(page.text_of("telephone-error").is_some(), "{}", page.body);
    }
    let page = set_telephone(&mut branch.ada.0, "Ada", "+49 (151) 1234-5678");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("value=\"+4915112345678\""),
        "{}",
        page.body
    );
    // Bob cannot take Ada's number, in any spelling.
    let page = set_telephone(&mut bob, "Bob", "+49 151 12345678");
    assert_eq!(page.status, 422, "{}", page.body);
    assert!(
        page.text_of("telephone-error")
            .unwrap()
            .contains("Another account"),
        "{}",
        page.body
    );
    let charge = |reference: &str, nonce: &[u8], who: &str| {
        let call = envelope(
            &security(
                &branch.service.0,
                &branch.service.1,
                nonce,
                &now_created(0),
                false,
            ),
            reference,
            "2",
        )
        .replace("mailto:ada@example.org", who);
        post(branch.office.address, AMOUNT_PATH, &call)
    };
    // tel: with RFC 3966's visual separators finds Ada, who granted.
    let (status, body) = charge("tel-1", b"tel-nonce-0001", "tel:+49-151-1234-5678");
    assert_eq!(status, 200, "{body}");
    assert_eq!(balance(&branch.office, &branch.ada.1), "8");
    assert_eq!(balance(&branch.office, &branch.owner), "2");
    // A local number, a parameter: SVC0002 on the identifier; a number
    // nobody holds, and Bob's number without his grant: POL0001 alike.
    // Nothing moves.
    for (n, who) in ["tel:0151-1234-5678", "tel:+4915112345678;ext=1"]
        .into_iter()
        .enumerate()
    {
        let (status, body) = charge(
            &format!("bad-{n}"),
            format!("bad-nonce-{n:04}").as_bytes(),
            who,
        );
        assert_eq!(status, 500, "{who}: {body}");
        assert!(
            body.contains("SVC0002") && body.contains("endUserIdentifier"),
            "{body}"
        );
    }
    let page = set_telephone(&mut bob, "Bob", "+12125550100");
    assert_eq!(page.status, 200, "{}", page.body);
    let (status, bobs) = charge("bob-1", b"bob-nonce-0001", "tel:+12125550100");
    assert_eq!(status, 500, "{bobs}");
    assert!(bobs.contains("POL0001"), "{bobs}");
    let (status, nobodys) = charge("nobody-1", b"nobody-nonce-01", "tel:+4915199999999");
    assert_eq!(status, 500, "{nobodys}");
    assert_eq!(nobodys, bobs);
    // The product's own owner reads the same: a stolen credential cannot
    // confirm the owner's address.
    let (status, owners) = charge("owner-1", b"owner-nonce-01", "mailto:owen@example.org");
    assert_eq!(status, 500, "{owners}");
    assert_eq!(owners, bobs);
    assert_eq!(balance(&branch.office, &bob_cid), "10");
    assert_eq!(balance(&branch.office, &branch.ada.1), "8");
    // Ada gives her number up: it names nobody any more.
    let page = set_telephone(&mut branch.ada.0, "Ada", "");
    assert_eq!(page.status, 200, "{}", page.body);
    let (status, body) = charge("tel-2", b"tel-nonce-0002", "tel:+4915112345678");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("POL0001"), "{body}");
    // One account cannot try number after number for "Another account":
    // Bob made two changes to new numbers (one taken); three more pass,
    // the sixth within 15 minutes is refused before the store is asked,
    // and his number stays.
    for n in 1..=3 {
        let page = set_telephone(&mut bob, "Bob", &format!("+1212555010{n}"));
        assert_eq!(page.status, 200, "{}", page.body);
    }
    let page = set_telephone(&mut bob, "Bob", "+12125550109");
    assert_eq!(page.status, 429, "{}", page.body);
    assert!(
        page.text_of("telephone-error")
            .unwrap()
            .contains("5 times in 15 minutes"),
        "{}",
        page.body
    );
    let page = set_telephone(&mut bob, "Bob", "+12125550103");
    assert_eq!(page.status, 200, "the same number again is no change");
}

/// A credential made later for the same product (to replace one) may
/// refund a customer who granted only the first: refunds are capped per
/// product, and the customer dealt with this product's service. A
/// credential of another product may not.
#[test]
fn a_new_credential_of_the_product_refunds_what_the_first_charged() {
    let dir = tempfile::tempdir().unwrap();
    let branch = branch(dir.path());
    let (status, body) = post(
        branch.office.address,
        AMOUNT_PATH,
        &envelope(
            &security(
                &branch.service.0,
                &branch.service.1,
                b"first-nonce-0001",
                &now_created(0),
                false,
            ),
            "charge-1",
            "2",
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(balance(&branch.office, &branch.ada.1), "8");
    let credential = |pid: &str| {
        let made = branch
            .office
            .call("meter.create", &[s(&branch.owner), s(pid)])
            .expect("a service credential");
        let member = |name: &str| {
            made.member(name)
                .and_then(Value::as_str)
                .unwrap()
                .to_owned()
        };
        (member("MID"), member("secret"))
    };
    let refund = |service: &(String, String), reference: &str, nonce: &[u8]| {
        let call = envelope(
            &security(&service.0, &service.1, nonce, &now_created(0), false),
            reference,
            "1",
        )
        .replace("chargeAmount", "refundAmount");
        post(branch.office.address, AMOUNT_PATH, &call)
    };
    let second = credential(&branch.pid);
    let (status, body) = refund(&second, "refund-1", b"second-nonce-001");
    assert_eq!(status, 200, "{body}");
    assert_eq!(balance(&branch.office, &branch.ada.1), "9");
    // Another product of the same owner never charged Ada.
    let other = branch.office.text(
        "product.create",
        &[
            s(&branch.owner),
            s("Wallpapers"),
            s("1 a picture"),
            Value::Base64(crate::examples::module("flat")),
            s("5"),
        ],
        "PID",
    );
    let (status, body) = refund(&credential(&other), "refund-2", b"other-nonce-0001");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("POL0001"), "{body}");
    assert_eq!(balance(&branch.office, &branch.ada.1), "9");
}

/// Sends `head` (a request's head) on a new connection and reads the
/// whole answer.
fn raw_answer(address: SocketAddr, head: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect_timeout(&address, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer and close before all of a refused body is in.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn refusals_before_soap_are_plain_http_and_every_fault_envelope_goes_with_500() {
    let dir = tempfile::tempdir().unwrap();
    let branch = branch(dir.path());
    let address = branch.office.address;
    let head = |length: usize| {
        format!(
            "POST {AMOUNT_PATH} HTTP/1.1\r\nHost: {address}\r\nContent-Type: text/xml\r\n\
             SOAPAction: \"\"\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        )
    };
    // Too large: 413, plain text, before SOAP.
    let large = vec![b' '; 70 * 1024];
    let answer = raw_answer(address, &head(large.len()), &large);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("text/plain"), "{answer}");
    // Callers that send their bodies slowly, more of them than the calls
    // the backoffice works on at once (from two loopback addresses, as
    // each address holds at most 64 connections), do not keep a whole
    // call from being answered: a slot is taken once a body is in.
    // 80: more than `backoffice::parlayx::CALLS_AT_ONCE`, 64.
    let slow: Vec<TcpStream> = (0..80)
        .map(|n| {
            let from: SocketAddr = if n % 2 == 0 {
                "127.0.0.2:0"
            } else {
                "127.0.0.3:0"
            }
            .parse()
            .unwrap();
            let mut stream = connect_from(from, address);
            stream.write_all(head(1_000).as_bytes()).unwrap();
            stream.write_all(b"<s:Envelope").unwrap();
            stream
        })
        .collect();
    // Give the server time to have every slow call in its handler.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let two_bodies = format!(
        "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\">\
         <s:Body><loc:chargeAmount xmlns:loc=\"{AMOUNT_LOCAL}\"/></s:Body><s:Body/></s:Envelope>"
    );
    let (status, body) = post(address, AMOUNT_PATH, &two_bodies);
    // A fault envelope, and so 500: the second Body is refused, not
    // ignored.
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("soapenv:Client") && body.contains("one Body"),
        "{body}"
    );
    assert_eq!(balance(&branch.office, &branch.ada.1), "10");
    // The slow callers were held to the body's 10 s, not answered.
    for mut stream in slow {
        stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        assert!(
            matches!(stream.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a slow caller was answered before its body was in"
        );
    }
}

/// A connection to `to` from the local address `from` (a loopback address
/// other than 127.0.0.1, so that a test may count as several callers).
fn connect_from(from: SocketAddr, to: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(from)?;
            tokio::time::timeout(IO_TIMEOUT, socket.connect(to))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
        })
        .expect("connect from another loopback address");
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}
