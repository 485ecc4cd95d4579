use proto::reading::{Code, Event, Reading};
use proto::upload::{
    BATCH_READINGS_MAX, Batch, MeterParams, Outcome, SendAnswer, SendBody, SendRequest, Standing,
    standings_from_value, standings_value,
};
use proto::xmlrpc::{Limits, MethodCall, Value, encode_call, parse_call};
use proto::{BatchId, Cid, Context, FaultCode, Mid, Payer, Pid};

fn pid(text: &str) -> Pid {
    Pid::parse(text).unwrap()
}

fn cid(text: &str) -> Cid {
    Cid::parse(text).unwrap()
}

fn sample_batch() -> Batch {
    let context = Context::parse("pid:100").unwrap();
    let events = [
        Event::Login(cid("B1-C1")),
        Event::Query {
            pid: pid("B1-P1"),
            payer: Some(Payer::Customer(cid("B1-C1"))),
        },
        Event::Query {
            pid: pid("B1-P2"),
            payer: Some(Payer::OwnerOf(pid("B1-P1"))),
        },
        Event::Commit {
            pid: pid("B1-P2"),
            payer: Some(Payer::OwnerOf(pid("B1-P1"))),
        },
        Event::Commit {
            pid: pid("B1-P1"),
            payer: Some(Payer::Customer(cid("B1-C1"))),
        },
        Event::Commit {
            pid: pid("B1-P9"),
            payer: None,
        },
        Event::Logout(cid("B1-C1")),
    ];
    let readings = events
        .into_iter()
        .enumerate()
        .map(|(index, event)| Reading {
            seq: 1000 + index as u64,
            time_ms: 1_764_000_000_000 + index as u64,
            context: context.clone(),
            event,
        })
        .collect();
    Batch {
        id: BatchId::parse("B1-M1:1000").unwrap(),
        readings,
        parties: vec![Payer::Customer(cid("B1-C7")), Payer::OwnerOf(pid("B1-P8"))],
    }
}

fn through_the_wire(request: &SendRequest) -> Result<SendRequest, proto::Fault> {
    let body = encode_call("send", &request.to_params());
    let call = parse_call(&body, Limits::BACKOFFICE).unwrap();
    SendRequest::from_call(&call)
}

#[test]
fn extended_batches_round_trip_through_xml() {
    let request = SendRequest {
        mid: Mid::parse("B1-M1").unwrap(),
        body: SendBody::Batch(sample_batch()),
    };
    assert_eq!(through_the_wire(&request).unwrap(), request);
}

#[test]
fn cox_minimal_form_is_accepted_with_char_codes() {
    let body = r#"<?xml version="1.0"?><methodCall><methodName>send</methodName><params>
<param><value><string>B1-M1</string></value></param>
<param><value><array><data>
<value><struct><member><name>PID</name><value><string>B1-C1</string></value></member><member><name>code</name><value><char>{</char></value></member></struct></value>
<value><struct><member><name>PID</name><value><string>B1-P1</string></value></member><member><name>code</name><value><char>(</char></value></member></struct></value>
<value><struct><member><name>PID</name><value><string>B1-P1</string></value></member><member><name>code</name><value><string>)</string></value></member></struct></value>
</data></array></value></param></params></methodCall>"#;
    let call = parse_call(body.as_bytes(), Limits::BACKOFFICE).unwrap();
    let request = SendRequest::from_call(&call).unwrap();
    assert_eq!(
        request.body,
        SendBody::Minimal(vec![
            Event::Login(cid("B1-C1")),
            Event::Query {
                pid: pid("B1-P1"),
                payer: None
            },
            Event::Commit {
                pid: pid("B1-P1"),
                payer: None
            },
        ])
    );
    assert_eq!(through_the_wire(&request).unwrap(), request);
}

fn fault_of_batch(edit: impl FnOnce(&mut Vec<Value>)) -> FaultCode {
    let mut params = SendRequest {
        mid: Mid::parse("B1-M1").unwrap(),
        body: SendBody::Batch(sample_batch()),
    }
    .to_params();
    let Value::Struct(members) = &mut params[1] else {
        panic!()
    };
    let Value::Array(readings) = &mut members[1].value else {
        panic!()
    };
    edit(readings);
    let call = MethodCall {
        name: "send".into(),
        params,
    };
    SendRequest::from_call(&call)
        .unwrap_err()
        .registered()
        .unwrap()
}

fn set_member(reading: &mut Value, name: &str, value: Value) {
    let Value::Struct(members) = reading else {
        panic!()
    };
    match members.iter_mut().find(|member| member.name == name) {
        Some(member) => member.value = value,
        None => members.push(proto::xmlrpc::Member::new(name, value)),
    }
}

#[test]
fn malformed_readings_refuse_the_whole_batch() {
    let invalid = FaultCode::InvalidReading;
    assert_eq!(
        fault_of_batch(|r| set_member(&mut r[0], "code", Value::string("x"))),
        invalid
    );
    assert_eq!(
        fault_of_batch(|r| set_member(&mut r[0], "code", Value::string("{{"))),
        invalid
    );
    assert_eq!(
        fault_of_batch(|r| set_member(&mut r[0], "PID", Value::string("B1-P1"))),
        invalid,
        "login needs a CID"
    );
    assert_eq!(
        fault_of_batch(|r| set_member(&mut r[1], "PID", Value::string("B1-C1"))),
        invalid,
        "query needs a PID"
    );
    assert_eq!(
        fault_of_batch(|r| set_member(&mut r[1], "seq", Value::string("-1"))),
        invalid
    );
    assert_eq!(
        fault_of_batch(|r| set_member(&mut r[1], "seq", Value::string("1000"))),
        invalid,
        "seq must increase"
    );
    assert_eq!(
        fault_of_batch(|r| set_member(&mut r[1], "timeMs", Value::Double(1.0))),
        invalid
    );
    assert_eq!(
        fault_of_batch(|r| set_member(&mut r[1], "payer", Value::string("B1-M1"))),
        invalid
    );
    assert_eq!(
        fault_of_batch(|r| set_member(&mut r[0], "payer", Value::string("B1-C1"))),
        invalid,
        "login has no payer"
    );
    assert_eq!(
        fault_of_batch(|r| set_member(&mut r[1], "extra", Value::Nil)),
        invalid
    );
    assert_eq!(
        fault_of_batch(|r| r[2] = Value::string("not a struct")),
        invalid
    );
    assert_eq!(
        fault_of_batch(|r| {
            let Value::Struct(members) = &mut r[1] else {
                panic!()
            };
            members.retain(|member| member.name != "context");
        }),
        invalid
    );
    assert_eq!(
        fault_of_batch(|r| {
            let copy = r[0].clone();
            r.resize(BATCH_READINGS_MAX + 1, copy);
        }),
        FaultCode::BatchTooLarge
    );
}

#[test]
fn send_params_are_checked() {
    let code = |params: Vec<Value>| {
        SendRequest::from_call(&MethodCall {
            name: "send".into(),
            params,
        })
        .unwrap_err()
        .registered()
        .unwrap()
    };
    assert_eq!(code(vec![]), FaultCode::InvalidParams);
    assert_eq!(
        code(vec![Value::string("B1-C1"), Value::Array(vec![])]),
        FaultCode::InvalidParams
    );
    assert_eq!(
        code(vec![Value::string("B1-M1"), Value::Int(3)]),
        FaultCode::InvalidParams
    );
    assert_eq!(
        code(vec![
            Value::string("B1-M1"),
            Value::structure([("batchId", Value::string("b 1"))])
        ]),
        FaultCode::InvalidParams
    );
}

#[test]
fn answers_round_trip() {
    let answer = SendAnswer {
        batch_id: BatchId::parse("B1-M1:1000").unwrap(),
        outcome: Outcome::AlreadyApplied,
        standings: vec![
            Standing {
                party: Payer::Customer(cid("B1-C1")),
                allowed: true,
            },
            Standing {
                party: Payer::OwnerOf(pid("B1-P2")),
                allowed: false,
            },
        ],
        params: MeterParams {
            flush_readings_max: 10_000,
            flush_interval_s: 3600,
            status_stale_max_s: 2_592_000,
            unknown_uses_max: 8,
        },
    };
    assert_eq!(SendAnswer::from_value(&answer.to_value()).unwrap(), answer);
    // Cox's table: an array of {CID, status}.
    let table = standings_value(&answer.standings);
    assert_eq!(
        table.as_array().unwrap()[0].member("CID").unwrap().as_str(),
        Some("B1-C1")
    );
    assert_eq!(standings_from_value(&table).unwrap(), answer.standings);
}

#[test]
fn the_largest_batch_fits_the_body_limit() {
    let longest = Context::parse(&"c".repeat(proto::id::TOKEN_LEN_MAX)).unwrap();
    let long_pid = pid("ABCDEFGH-P12345678901234567890");
    let long_cid = Payer::Customer(cid("ABCDEFGH-C12345678901234567890"));
    let readings = (0..BATCH_READINGS_MAX as u64)
        .map(|seq| Reading {
            seq: u64::MAX - BATCH_READINGS_MAX as u64 + seq,
            time_ms: u64::MAX,
            context: longest.clone(),
            event: Event::Commit {
                pid: long_pid,
                payer: Some(long_cid),
            },
        })
        .collect();
    let batch = Batch {
        id: BatchId::parse(&"b".repeat(64)).unwrap(),
        readings,
        parties: vec![long_cid; proto::upload::BATCH_PARTIES_MAX],
    };
    let request = SendRequest {
        mid: Mid::parse("ABCDEFGH-M12345678901234567890").unwrap(),
        body: SendBody::Batch(batch),
    };
    let body = encode_call("send", &request.to_params());
    assert!(
        body.len() <= Limits::BACKOFFICE.body_bytes_max,
        "{} bytes",
        body.len()
    );
    let call = parse_call(&body, Limits::BACKOFFICE).unwrap();
    assert_eq!(SendRequest::from_call(&call).unwrap(), request);
}

#[test]
fn codes_are_coxs_characters() {
    assert_eq!(Code::parse("{"), Some(Code::Login));
    assert_eq!(Code::parse("}"), Some(Code::Logout));
    assert_eq!(Code::parse("("), Some(Code::Query));
    assert_eq!(Code::parse(")"), Some(Code::Commit));
    assert_eq!(Code::parse(""), None);
    assert_eq!(Code::parse("()"), None);
}
