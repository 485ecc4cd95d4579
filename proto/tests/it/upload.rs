use proto::reading::{Code, Event, Reading};
use proto::upload::{
    BATCH_READINGS_MAX, Batch, MeterParams, Outcome, ReadingsForm, SendAnswer, SendBody,
    SendRequest, Standing, standings_from_value, standings_value,
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

/// The general decoding of a `send` body: parse to values, then decode.
fn general(body: &[u8]) -> Result<SendRequest, String> {
    let call = parse_call(body, Limits::BACKOFFICE).map_err(|error| error.to_string())?;
    SendRequest::from_call(&call).map_err(|fault| fault.message)
}

/// The streaming decoder may decline a body, but whatever it decodes, the
/// general decoding decodes the same way; so does its token-based way alone.
fn agrees(body: &[u8]) -> bool {
    if let Some(fast) = SendRequest::decode_extended_from_tokens(body, Limits::BACKOFFICE) {
        assert_eq!(
            Ok(&fast),
            general(body).as_ref(),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    match SendRequest::decode_extended(body, Limits::BACKOFFICE) {
        Some(fast) => {
            assert_eq!(
                Ok(&fast),
                general(body).as_ref(),
                "{}",
                String::from_utf8_lossy(body)
            );
            true
        }
        None => false,
    }
}

fn sample_request() -> SendRequest {
    SendRequest {
        mid: Mid::parse("B1-M1").unwrap(),
        body: SendBody::Batch(sample_batch()),
    }
}

#[test]
fn the_streaming_decoder_decodes_what_meters_send_as_the_general_one_does() {
    let request = sample_request();
    let body = encode_call("send", &request.to_params());
    assert!(agrees(&body), "the meter's own form takes the fast path");
    assert_eq!(
        SendRequest::decode_extended(&body, Limits::BACKOFFICE),
        Some(request)
    );
    let mut empty = sample_batch();
    empty.readings.clear();
    empty.parties.clear();
    let empty = SendRequest {
        mid: Mid::parse("B1-M2").unwrap(),
        body: SendBody::Batch(empty),
    };
    assert!(agrees(&encode_call("send", &empty.to_params())));
}

#[test]
fn the_streaming_decoder_takes_every_spelling_the_general_one_takes() {
    let reading = |members: &str| format!("<value><struct>{members}</struct></value>");
    let member = |name: &str, value: &str| {
        format!("<member><name>{name}</name><value>{value}</value></member>")
    };
    let plain = [
        member("PID", "B1-P1"),
        member("code", "<string>)</string>"),
        member("seq", "<i8>7</i8>"),
        member("context", "<string>42.7</string>"),
        member("timeMs", "<int> 1764000000 </int>"),
        member("payer", "<char>B</char>"),
    ];
    let bodies = [
        // Untyped values, typed ints, members in another order, a char.
        format!(
            "<methodCall><methodName> send </methodName><params><param><value>B1-M1</value></param>\
             <param><value><struct>{}{}</struct></value></param></params></methodCall>",
            member(
                "readings",
                &format!(
                    "<array><data>{}</data></array>",
                    reading(
                        &[
                            plain[4].clone(),
                            plain[0].clone(),
                            plain[1].clone(),
                            plain[2].clone(),
                            plain[3].clone()
                        ]
                        .concat()
                    )
                )
            ),
            member("batchId", "B1-M1:7"),
        ),
        // Comments, CDATA, entities, an XML declaration, an empty array.
        format!(
            "<?xml version=\"1.0\"?>\n<methodCall><!-- hi --><methodName>send</methodName><params>\
             <param><value><string><![CDATA[B1-M1]]></string></value></param><param><value>\
             <struct>{}{}{}</struct></value></param></params></methodCall>\n",
            member("batchId", "B1-M1&#58;8"),
            member("readings", "<array><data></data></array>"),
            member("parties", "<array/>"),
        ),
        // A payer that is a single character: valid XML-RPC, not a valid ID.
        format!(
            "<methodCall><methodName>send</methodName><params><param><value>B1-M1</value></param>\
             <param><value><struct>{}{}</struct></value></param></params></methodCall>",
            member("batchId", "B1-M1:9"),
            member(
                "readings",
                &format!("<array><data>{}</data></array>", reading(&plain.concat()))
            ),
        ),
    ];
    assert!(agrees(bodies[0].as_bytes()), "{}", bodies[0]);
    assert!(agrees(bodies[1].as_bytes()), "{}", bodies[1]);
    assert!(!agrees(bodies[2].as_bytes()));
    assert!(general(bodies[2].as_bytes()).is_err());
}

#[test]
fn the_streaming_decoder_never_accepts_what_the_general_one_refuses() {
    // Many small edits of a valid body: cut, doubled, swapped or replaced
    // bytes and fragments. Whenever the streaming decoder still decodes the
    // result, the general decoder must decode it the same way.
    let body = encode_call("send", &sample_request().to_params());
    let fragments: [&[u8]; 16] = [
        b"<member><name>seq</name><value>5</value></member>",
        b"<member><name>seq</name><value>9999</value></member>",
        b"<member><name>batchId</name><value>B1-M1:1</value></member>",
        b"<member><name>payer</name><value>B1-C2</value></member>",
        b"<member><name>PID</name><value><int>3</int></value></member>",
        b"<member><name>parties</name><value><array><data/></array></value></member>",
        b"<member><name>extra</name><value>1</value></member>",
        b"<value><int>-1</int></value>",
        b"</struct>",
        b"<struct>",
        b"<param><value>x</value></param>",
        b"<!DOCTYPE a>",
        b"&bogus;",
        b"\xff",
        b"<![CDATA[)]]>",
        b" ",
    ];
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    let (mut decoded, mut declined) = (0, 0);
    for _ in 0..20_000 {
        let mut edited = body.clone();
        for _ in 0..1 + next(3) {
            let at = next(edited.len());
            match next(5) {
                0 => {
                    let end = (at + 1 + next(40)).min(edited.len());
                    edited.drain(at..end);
                }
                1 => {
                    let end = (at + 1 + next(60)).min(edited.len());
                    let copy = edited[at..end].to_vec();
                    let to = next(edited.len());
                    edited.splice(to..to, copy);
                }
                2 => edited[at] = b"<>/ 0123456789:;-PCBT()\"&"[next(25)],
                3 => {
                    // Between two tags, where a fragment is most likely to
                    // leave the XML well formed.
                    let bounds: Vec<usize> = (0..edited.len())
                        .filter(|&index| edited[index] == b'>')
                        .map(|index| index + 1)
                        .collect();
                    let at = bounds.get(next(bounds.len().max(1))).copied().unwrap_or(0);
                    let fragment = fragments[next(fragments.len())];
                    edited.splice(at..at, fragment.iter().copied());
                }
                _ => {
                    let other = next(edited.len());
                    edited.swap(at, other);
                }
            }
        }
        if agrees(&edited) {
            decoded += 1;
        } else {
            declined += 1;
        }
    }
    // Some edits keep the body valid (inside text, say), most do not.
    assert!(
        decoded > 100 && declined > 10_000,
        "{decoded} decoded, {declined} declined"
    );
}

fn packed_body(request: &SendRequest) -> Vec<u8> {
    encode_call("send", &request.to_params_in(ReadingsForm::Packed))
}

#[test]
fn packed_readings_decode_to_the_same_batch_and_digest_as_structs() {
    let request = sample_request();
    let packed = packed_body(&request);
    let structs = encode_call("send", &request.to_params());
    assert!(
        agrees(&packed),
        "the meter's packed form takes the fast path"
    );
    assert_eq!(
        SendRequest::decode_extended(&packed, Limits::BACKOFFICE),
        Some(request.clone())
    );
    assert_eq!(general(&packed), Ok(request.clone()));
    assert!(
        packed.len() * 4 < structs.len(),
        "{} bytes packed, {} as structs",
        packed.len(),
        structs.len()
    );
    // The base64 block may be wrapped: the byte matcher declines it, the
    // token decoder and the general one read it.
    let text = String::from_utf8(packed.clone()).unwrap();
    let start = text.find("<base64>").unwrap() + "<base64>".len();
    let mut wrapped = text.clone();
    wrapped.insert_str(start + 8, "\n  ");
    assert!(agrees(wrapped.as_bytes()));
    assert_eq!(general(wrapped.as_bytes()), Ok(request.clone()));
    // An empty batch in the packed form.
    let mut empty = sample_batch();
    empty.readings.clear();
    let empty = SendRequest {
        mid: Mid::parse("B1-M2").unwrap(),
        body: SendBody::Batch(empty),
    };
    assert!(agrees(&packed_body(&empty)));
    assert_eq!(general(&packed_body(&empty)), Ok(empty));
}

#[test]
fn a_batch_with_both_forms_or_a_bad_block_is_refused() {
    let request = sample_request();
    let text = String::from_utf8(packed_body(&request)).unwrap();
    let structs = String::from_utf8(encode_call("send", &request.to_params())).unwrap();
    let readings_member = {
        let start = structs.find("<member><name>readings</name>").unwrap();
        let end = structs.find("<member><name>parties</name>").unwrap();
        structs[start..end].to_owned()
    };
    let both = text.replace(
        "<member><name>parties</name>",
        &format!("{readings_member}<member><name>parties</name>"),
    );
    assert!(!agrees(both.as_bytes()));
    assert_eq!(
        general(both.as_bytes()),
        Err("send: a batch carries readings or packedReadings, not both".to_owned())
    );
    // A block that is not valid base64, one that is cut short, and one
    // whose layout version is unknown: refused by every decoder.
    let start = text.find("<base64>").unwrap() + "<base64>".len();
    let end = text.find("</base64>").unwrap();
    let block = &text[start..end];
    for (replacement, says) in [
        ("!!!!".to_owned(), "base64"),
        (block[..block.len() - 8].to_owned(), "packed"),
        (format!("Ag{}", &block[2..]), "layout version"),
    ] {
        let bad = format!("{}{replacement}{}", &text[..start], &text[end..]);
        assert!(!agrees(bad.as_bytes()), "{replacement}");
        let error = general(bad.as_bytes()).expect_err("refused");
        assert!(error.contains(says), "{says}: {error}");
    }
}

#[test]
fn the_largest_packed_batch_fits_the_body_limit_with_room_to_spare() {
    let readings: Vec<Reading> = (0..BATCH_READINGS_MAX as u64)
        .map(|seq| Reading {
            seq: seq * 1_000_003,
            time_ms: 1_764_000_000_000 + seq * 997,
            context: Context::parse(&format!("pid:{}:thread:{}", seq % 4_096, seq)).unwrap(),
            event: Event::Commit {
                pid: pid(&format!("ABCDEFGH-P1234567890123456{:04}", seq % 10_000)),
                payer: Some(Payer::Customer(cid(&format!(
                    "ABCDEFGH-C123456789012345{:05}",
                    seq
                )))),
            },
        })
        .collect();
    let request = SendRequest {
        mid: Mid::parse("B1-M1").unwrap(),
        body: SendBody::Batch(Batch {
            id: BatchId::parse("B1-M1:1").unwrap(),
            readings,
            parties: Vec::new(),
        }),
    };
    let body = packed_body(&request);
    assert!(
        body.len() * 2 <= Limits::BACKOFFICE.body_bytes_max,
        "{} bytes",
        body.len()
    );
    assert_eq!(
        SendRequest::decode_extended(&body, Limits::BACKOFFICE),
        Some(request)
    );
}

/// The fuzz seed, written by hand from the layout in `docs/protocol.md`
/// (not by our encoder), decodes by every way to the readings it means.
#[test]
fn a_packed_block_written_from_the_documented_layout_decodes() {
    let body = include_bytes!("../../../fuzz/seeds/parse_request/send_packed.xml");
    assert!(agrees(body));
    let Ok(SendRequest {
        body: SendBody::Batch(batch),
        ..
    }) = general(body)
    else {
        panic!("decodes");
    };
    let context = Context::parse("pid:1").unwrap();
    let customer = Some(Payer::Customer(cid("B1-C1")));
    let time_ms = 1_764_000_000_000;
    assert_eq!(
        batch.readings,
        vec![
            Reading {
                seq: 1,
                time_ms,
                context: context.clone(),
                event: Event::Login(cid("B1-C1")),
            },
            Reading {
                seq: 2,
                time_ms: time_ms + 1,
                context: context.clone(),
                event: Event::Query {
                    pid: pid("B1-P1"),
                    payer: customer,
                },
            },
            Reading {
                seq: 3,
                time_ms: time_ms + 2,
                context,
                event: Event::Commit {
                    pid: pid("B1-P1"),
                    payer: customer,
                },
            },
        ]
    );
}
