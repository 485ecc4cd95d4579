//! Every amount traces to its readings, with the real backoffice over
//! HTTP: a customer sees the uses behind each statement line (page and
//! CSV), and nobody else does; the operator lists them (`account.items`)
//! and prices them again (`audit.*`).

use proto::reading::{Event, Reading};
use proto::upload::{Batch, SendBody, SendRequest};
use proto::xmlrpc::Value;
use proto::{BatchId, Context, Payer};

use crate::support::{Backoffice, s};
use crate::web::{FakeMeter, PASSWORD, Visitor, log_in, register, registration};

#[test]
fn a_customer_sees_the_uses_behind_each_line_and_the_operator_audits_them() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut ada = Visitor::new(office.address);
    let ada_cid = register(&mut ada, &registration("Ada", "ada@example.org"), None)
        .text_of("cid")
        .unwrap();
    office
        .call("account.deposit", &[s(&ada_cid), s("10")])
        .unwrap();
    let mut bob = Visitor::new(office.address);
    let bob_cid = register(&mut bob, &registration("Bob", "bob@example.org"), None)
        .text_of("cid")
        .unwrap();
    let mut eve = Visitor::new(office.address);
    register(&mut eve, &registration("Eve", "eve@example.org"), None);
    // Bob's product, 0.25 a use (flat); Ada's meter, which she grants.
    let created = office
        .call(
            "product.create",
            &[
                s(&bob_cid),
                s("Editor"),
                s("0.25 per use"),
                Value::Base64(crate::examples::module("flat")),
                s("1"),
            ],
        )
        .unwrap();
    let pid_of = |member: &str| {
        created
            .member(member)
            .and_then(Value::as_str)
            .unwrap()
            .to_owned()
    };
    let (editor, editor_test) = (pid_of("PID"), pid_of("testPID"));
    let meter = FakeMeter::register(&office, &ada_cid);
    let (method, params) = proto::grant::PasswordGrant {
        request: proto::grant::GrantRequest {
            mid: meter.mid,
            cid: ada_cid.parse().unwrap(),
            label: "ada's laptop".into(),
            scope: proto::grant::Scope::Machine,
        },
        password: PASSWORD.to_owned(),
        expires_in_s: None,
    }
    .to_call();
    meter.call(method, &params).expect("Ada's grant");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let readings = (0..3)
        .map(|index| Reading {
            seq: 1 + index,
            time_ms: now_ms - 2_000 + index,
            context: Context::parse("4242.1").unwrap(),
            event: Event::Commit {
                pid: editor.parse().unwrap(),
                payer: Some(Payer::Customer(ada_cid.parse().unwrap())),
            },
        })
        .collect();
    let request = SendRequest {
        mid: meter.mid,
        body: SendBody::Batch(Batch {
            id: BatchId::parse("laptop:1").unwrap(),
            readings,
            parties: Vec::new(),
        }),
    };
    meter
        .call(proto::upload::SEND_METHOD, &request.to_params())
        .expect("applied");

    // Ada's statement links her use line to the uses behind it.
    let statement = ada.get("/statement");
    let marker = "href=\"/statement/items?transfer=";
    let at = statement.body.find(marker).expect("a linked use line") + marker.len();
    let line: String = statement.body[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let path = format!("/statement/items?transfer={line}");
    let page = ada.get(&path);
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.text_of("line-amount").as_deref(), Some("EUR 0.75"));
    assert_eq!(
        page.text_of("items-count").as_deref(),
        Some("3 uses; page 1 of 1.")
    );
    assert_eq!(
        page.body
            .matches("<td class=\"amount\">EUR 0.25</td>")
            .count(),
        3
    );
    assert!(page.body.contains("4242.1") && page.body.contains("laptop:1"));
    let csv = ada.get(&format!("/statement/items.csv?transfer={line}"));
    let rows: Vec<&str> = csv.body.lines().collect();
    assert_eq!(rows.len(), 4, "{}", csv.body);
    assert!(rows[0].starts_with("time,meter,batch,seq,context,product,price"));
    assert!(
        rows[1].contains(&format!(",laptop:1,1,4242.1,{editor},0.25,EUR,0,")),
        "{}",
        rows[1]
    );
    assert!(
        rows[3].contains(&format!(",{editor},0.25,EUR,2,")),
        "{}",
        rows[3]
    );
    // Bob was paid by that line: he sees when and what, not where.
    let mut bob = Visitor::new(office.address);
    log_in(&mut bob, &bob_cid, PASSWORD);
    let page = bob.get(&path);
    assert_eq!(page.status, 200);
    assert_eq!(
        page.body
            .matches("<td class=\"amount\">EUR 0.25</td>")
            .count(),
        3
    );
    assert!(!page.body.contains("4242.1") && !page.body.contains("laptop:1"));
    // Eve, whose line it is not, learns nothing of it; nor does a
    // visitor without a session, nor a line number that is not one.
    let page = eve.get(&path);
    assert_eq!(page.status, 404);
    assert!(!page.body.contains("0.25") && !page.body.contains(&ada_cid));
    let csv = eve.get(&format!("/statement/items.csv?transfer={line}"));
    assert_eq!(csv.status, 404);
    assert!(!csv.body.contains("0.25"));
    let mut stranger = Visitor::new(office.address);
    assert_eq!(stranger.get(&path).status, 303);
    for bad in ["abc", "-1", "99999999999999999999999", "0"] {
        let page = ada.get(&format!("/statement/items?transfer={bad}"));
        assert_eq!(
            page.status, 404,
            "{bad}: the deposit (0) is not a use line either"
        );
    }
    let past_the_end = ada.get(&format!("{path}&page=7"));
    assert_eq!(past_the_end.status, 200);
    assert_eq!(
        past_the_end
            .body
            .matches("<td class=\"amount\">EUR 0.25</td>")
            .count(),
        0
    );

    // The operator lists the same uses and confirms every amount.
    let items = office.call("account.items", &[s(&line)]).unwrap();
    let items = items.as_array().unwrap();
    assert_eq!(items.len(), 3);
    let member = |item: &Value, name: &str| {
        item.member(name)
            .and_then(Value::as_str)
            .unwrap()
            .to_owned()
    };
    assert_eq!(member(&items[2], "price"), "0.25");
    assert_eq!(member(&items[2], "periodUses"), "2");
    assert_eq!(member(&items[2], "payer"), ada_cid);
    let month = {
        let (year, month, _) = proto::time::civil_date(now_ms);
        format!("{year:04}-{month:02}")
    };
    for (method, params) in [
        ("audit.transfer", vec![s(&line)]),
        ("audit.batch", vec![s(meter.mid.as_str()), s("laptop:1")]),
        ("audit.month", vec![s(&ada_cid), s(&month)]),
    ] {
        let report = office.call(method, &params).unwrap();
        assert_eq!(
            report.member("confirmed"),
            Some(&Value::Bool(true)),
            "{method}: {report:?}"
        );
        assert_eq!(member(&report, "priced"), "3", "{method}");
    }
    let fault = office.call("audit.transfer", &[s("0")]).unwrap_err();
    assert_eq!(fault.code, proto::FaultCode::NotFound.code(), "{fault:?}");
    let fault = office
        .call("audit.month", &[s(&ada_cid), s("2026-13")])
        .unwrap_err();
    assert_eq!(
        fault.code,
        proto::FaultCode::InvalidParams.code(),
        "{fault:?}"
    );

    // Two uses of the editor's test PID are free: no line, but the
    // statement, its CSV and the operator say how many.
    let readings = (0..2)
        .map(|index| Reading {
            seq: 4 + index,
            time_ms: now_ms - 1_000 + index,
            context: Context::parse("4242.1").unwrap(),
            event: Event::Commit {
                pid: editor_test.parse().unwrap(),
                payer: Some(Payer::Customer(ada_cid.parse().unwrap())),
            },
        })
        .collect();
    let request = SendRequest {
        mid: meter.mid,
        body: SendBody::Batch(Batch {
            id: BatchId::parse("laptop:4").unwrap(),
            readings,
            parties: Vec::new(),
        }),
    };
    meter
        .call(proto::upload::SEND_METHOD, &request.to_params())
        .expect("applied");
    let yyyymm = month.replace('-', "");
    let statement = ada.get(&format!("/statement?month={yyyymm}"));
    assert_eq!(
        statement.text_of(&format!("free-{editor_test}")).as_deref(),
        Some("2"),
        "{}",
        statement.body
    );
    // Her editor uses were charged, none free; the one price of each shows.
    assert_eq!(
        statement.text_of(&format!("free-{editor}")).as_deref(),
        Some("0")
    );
    assert!(
        statement
            .body
            .contains("<td class=\"amount\">EUR 0.25</td>"),
        "{}",
        statement.body
    );
    let csv = ada.get(&format!("/statement.csv?month={yyyymm}"));
    assert!(
        csv.body.contains(&format!(
            "\r\n,,2 free uses of {editor_test},{editor_test},2,0,,,EUR\r\n"
        )),
        "{}",
        csv.body
    );
    let free = office
        .call("account.freeUses", &[s(&ada_cid), s(&month)])
        .unwrap();
    let free = free.as_array().unwrap();
    assert_eq!(free.len(), 1, "{free:?}");
    assert_eq!(member(&free[0], "pid"), editor_test);
    assert_eq!(member(&free[0], "uses"), "2");
    // Bob's statement shows none of Ada's free uses.
    let statement = bob.get(&format!("/statement?month={yyyymm}"));
    assert!(
        !statement.body.contains(&format!("free-{editor_test}")),
        "{}",
        statement.body
    );
}

/// A producer who paid for a component used inside their product sees
/// when and what it cost, never the end customer's meter, batch or
/// context: only a use's own customer sees where it was made.
#[test]
fn a_producer_paying_for_a_component_does_not_see_where_the_customer_used_it() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let mut ada = Visitor::new(office.address);
    let ada_cid = register(&mut ada, &registration("Ada", "ada@example.org"), None)
        .text_of("cid")
        .unwrap();
    let mut carol = Visitor::new(office.address);
    let carol_cid = register(
        &mut carol,
        &registration("Carol", "carol@example.org"),
        None,
    )
    .text_of("cid")
    .unwrap();
    let mut bob = Visitor::new(office.address);
    let bob_cid = register(&mut bob, &registration("Bob", "bob@example.org"), None)
        .text_of("cid")
        .unwrap();
    for cid in [&ada_cid, &carol_cid] {
        office.call("account.deposit", &[s(cid), s("10")]).unwrap();
    }
    let product = |owner: &str, name: &str| {
        office.text(
            "product.create",
            &[
                s(owner),
                s(name),
                s("0.25 per use"),
                Value::Base64(crate::examples::module("flat")),
                s("1"),
            ],
            "PID",
        )
    };
    // Carol's editor uses Bob's library inside it, and says so.
    let editor = product(&carol_cid, "Editor");
    let library = product(&bob_cid, "Library");
    office
        .call("product.components", &[s(&editor), s(&library)])
        .unwrap();
    let meter = FakeMeter::register(&office, &ada_cid);
    let (method, params) = proto::grant::PasswordGrant {
        request: proto::grant::GrantRequest {
            mid: meter.mid,
            cid: ada_cid.parse().unwrap(),
            label: "ada's laptop".into(),
            scope: proto::grant::Scope::Machine,
        },
        password: PASSWORD.to_owned(),
        expires_in_s: None,
    }
    .to_call();
    meter.call(method, &params).expect("Ada's grant");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let commit = |seq: u64, pid: &str, payer: Payer| Reading {
        seq,
        time_ms: now_ms - 2_000 + seq,
        context: Context::parse("4242.1").unwrap(),
        event: Event::Commit {
            pid: pid.parse().unwrap(),
            payer: Some(payer),
        },
    };
    let request = SendRequest {
        mid: meter.mid,
        body: SendBody::Batch(Batch {
            id: BatchId::parse("laptop:1").unwrap(),
            readings: vec![
                commit(1, &library, Payer::OwnerOf(editor.parse().unwrap())),
                commit(2, &editor, Payer::Customer(ada_cid.parse().unwrap())),
            ],
            parties: Vec::new(),
        }),
    };
    meter
        .call(proto::upload::SEND_METHOD, &request.to_params())
        .expect("applied");
    // Carol's statement (she is logged in since she registered): she was paid by Ada (editor) and paid Bob
    // (library); the library line is hers to pay, its use Ada's.
    let statement = carol.get("/statement");
    let marker = "href=\"/statement/items?transfer=";
    let lines: Vec<String> = statement
        .body
        .match_indices(marker)
        .map(|(at, _)| {
            statement.body[at + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect()
        })
        .collect();
    assert_eq!(lines.len(), 2, "{}", statement.body);
    for line in &lines {
        let page = carol.get(&format!("/statement/items?transfer={line}"));
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(
            !page.body.contains("4242.1") && !page.body.contains("laptop:1"),
            "line {line} shows where Ada used it: {}",
            page.body
        );
        let csv = carol.get(&format!("/statement/items.csv?transfer={line}"));
        assert!(!csv.body.contains("4242.1"), "{}", csv.body);
    }
}
