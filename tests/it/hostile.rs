//! A hostile customer, end to end with the real backoffice: they register
//! on the web pages, add a product with an extreme TACA, register a meter,
//! and sign uploads (as a modified meter would) that name other customers
//! as payers and nest their component under another producer's product.
//! Nobody who did not grant that meter may be charged.

use proto::reading::{Event, Reading};
use proto::upload::{Batch, SendAnswer, SendBody, SendRequest};
use proto::xmlrpc::Value;
use proto::{BatchId, Context, Payer, Pid};

use crate::support::{Backoffice, s};
use crate::web::{FakeMeter, Visitor, register, registration};

/// Asks 500,000,000.000000000 a use (the i64 of nanos the ABI returns),
/// whatever the input: the most its declared maximum allows.
const EXTREME_TACA: &str = r#"(module (memory (export "memory") 1)
    (func (export "taca_abi_version") (result i32) (i32.const 1))
    (func (export "taca_input") (result i32) (i32.const 1024))
    (func (export "taca_price") (param i32) (result i64) (i64.const 500000000000000000)))"#;

#[test]
fn a_hostile_customer_charges_nobody_who_did_not_grant_their_meter() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    // Three customers with money, and an honest producer's editor.
    let victims: Vec<String> = ["Ann", "Ben", "Cat"]
        .iter()
        .map(|name| {
            let email = format!("{}@example.org", name.to_lowercase());
            let cid = office.text("customer.create", &[s(name), s(&email)], "CID");
            office.call("account.deposit", &[s(&cid), s("10")]).unwrap();
            cid
        })
        .collect();
    let producer = office.text("customer.create", &[s("Bob"), s("bob@example.org")], "CID");
    let editor = office.text(
        "product.create",
        &[
            s(&producer),
            s("Editor"),
            s("0.25 per use"),
            Value::Base64(crate::examples::module("flat")),
            s("0.25"),
        ],
        "PID",
    );

    // Mallory registers, adds her product and a meter, all on the web pages.
    let mut mallory = Visitor::new(office.address);
    let page = register(
        &mut mallory,
        &registration("Mallory", "mallory@example.org"),
        None,
    );
    let attacker = page.text_of("cid").expect("Mallory's CID");
    let csrf = mallory.get("/products/new").csrf();
    let module = wat::parse_str(EXTREME_TACA).unwrap();
    let added = mallory.post_multipart(
        "/products/new",
        &[
            ("csrf", &csrf),
            ("name", "Greedy"),
            ("terms", "a bargain"),
            ("maxPrice", "500000000"),
            ("agrees", "yes"),
        ],
        ("taca", "greedy.wasm", &module),
    );
    let greedy: Pid = added
        .text_of("pid")
        .unwrap_or_else(|| panic!("product added: {}", added.body))
        .parse()
        .unwrap();
    let csrf = mallory.get("/meters").csrf();
    let meter_page = mallory.post_form("/meters", &[("csrf", &csrf)]);
    let meter = FakeMeter::new(
        office.address,
        &meter_page.text_of("mid").expect("the MID"),
        &meter_page.text_of("secret").expect("the secret"),
    );

    // Her meter's upload: each victim "uses" Greedy, and Greedy is "used
    // inside" each victim's use of the editor, so that Bob would pay.
    let editor: Pid = editor.parse().unwrap();
    let context = Context::parse("666.1").unwrap();
    let mut readings = Vec::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for victim in &victims {
        let victim = Payer::Customer(victim.parse().unwrap());
        for (pid, payer) in [
            (greedy, victim),
            (greedy, Payer::OwnerOf(editor)),
            (editor, victim),
        ] {
            readings.push(Reading {
                seq: 1 + readings.len() as u64,
                time_ms: now_ms - 1_000,
                context: context.clone(),
                event: Event::Commit {
                    pid,
                    payer: Some(payer),
                },
            });
        }
    }
    let request = SendRequest {
        mid: meter.mid,
        body: SendBody::Batch(Batch {
            id: BatchId::parse("evil:1").unwrap(),
            readings,
            parties: victims
                .iter()
                .map(|cid| Payer::parse(cid).unwrap())
                .collect(),
        }),
    };
    let answer = meter
        .call(proto::upload::SEND_METHOD, &request.to_params())
        .expect("the upload is accepted, and charges nobody");
    let answer = SendAnswer::from_value(&answer).unwrap();

    let balance = |cid: &str| office.text("customer.show", &[s(cid)], "balance");
    for victim in &victims {
        assert_eq!(balance(victim), "10", "{victim} is not charged");
        let standing = answer
            .standings
            .iter()
            .find(|standing| standing.party.as_str() == victim.as_str())
            .expect("asked for");
        assert!(!standing.allowed, "the meter learns nothing of {victim}");
    }
    assert_eq!(balance(&producer), "0", "Bob pays for no component");
    assert_eq!(balance(&attacker), "0", "Mallory is credited nothing");
    let suspense = office.call("suspense.list", &[]).unwrap();
    let suspense = suspense.as_array().unwrap();
    assert_eq!(suspense.len(), 9, "every reading kept: {suspense:?}");
    for record in suspense {
        let reason = record.member("reason").and_then(Value::as_str).unwrap();
        assert!(reason.starts_with("no grant"), "{reason}");
    }
    // She grants her own meter and really uses Bob's editor (paying for
    // it), claiming Greedy inside it and inside its free test PID: Bob
    // never declared Greedy a component, so he pays for none of it.
    let (method, params) = proto::grant::PasswordGrant {
        request: proto::grant::GrantRequest {
            mid: meter.mid,
            cid: attacker.parse().unwrap(),
            label: "mallory's box".into(),
            scope: proto::grant::Scope::Machine,
        },
        password: crate::web::PASSWORD.to_owned(),
        expires_in_s: None,
    }
    .to_call();
    meter.call(method, &params).expect("her own grant");
    office
        .call("account.deposit", &[s(&attacker), s("1")])
        .unwrap();
    let me = Payer::Customer(attacker.parse().unwrap());
    let test_pid: Pid = format!("{editor}T").parse().unwrap();
    let events = [
        (greedy, Payer::OwnerOf(editor)),
        (editor, me),
        (greedy, Payer::OwnerOf(test_pid)),
        (test_pid, me),
    ];
    let readings = events
        .iter()
        .enumerate()
        .map(|(index, &(pid, payer))| Reading {
            seq: 100 + index as u64,
            time_ms: now_ms,
            context: context.clone(),
            event: Event::Commit {
                pid,
                payer: Some(payer),
            },
        })
        .collect();
    let request = SendRequest {
        mid: meter.mid,
        body: SendBody::Batch(Batch {
            id: BatchId::parse("evil:2").unwrap(),
            readings,
            parties: Vec::new(),
        }),
    };
    meter
        .call(proto::upload::SEND_METHOD, &request.to_params())
        .expect("applied");
    assert_eq!(
        balance(&producer),
        "0.25",
        "Bob is paid for his editor only"
    );
    assert_eq!(
        balance(&attacker),
        "0.75",
        "Mallory paid for it and got nothing"
    );
    let suspense = office.call("suspense.list", &[]).unwrap();
    assert_eq!(suspense.as_array().unwrap().len(), 11);

    // Re-pricing applies the same rules.
    let repriced = office.call("suspense.reprice", &[]).unwrap();
    assert_eq!(
        repriced.member("priced").and_then(Value::as_str),
        Some("0"),
        "{repriced:?}"
    );
    for victim in &victims {
        assert_eq!(balance(victim), "10");
    }
    assert_eq!(balance(&producer), "0.25");
}
