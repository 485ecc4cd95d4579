//! The codec on bytes: every type, the forms real clients send, and the
//! negative space.

use proto::xmlrpc::{
    CodecError, Limits, Member, MethodCall, MethodResponse, Value, encode_call, encode_fault,
    encode_response, handle_call, parse_call, parse_response,
};
use proto::{Fault, FaultCode};

const LIMITS: Limits = Limits::METER_API;

fn call(body: &str) -> Result<MethodCall, CodecError> {
    parse_call(body.as_bytes(), LIMITS)
}

fn one_param(value_xml: &str) -> Result<Value, CodecError> {
    let body = format!(
        "<?xml version=\"1.0\"?><methodCall><methodName>m</methodName><params><param>{value_xml}</param></params></methodCall>"
    );
    call(&body).map(|mut call| call.params.remove(0))
}

#[test]
fn python_style_call_with_whitespace_parses() {
    // What Python's xmlrpc.client sends, newlines included.
    let body = "<?xml version='1.0'?>\n<methodCall>\n<methodName>query</methodName>\n<params>\n<param>\n<value><string>B1-P7</string></value>\n</param>\n</params>\n</methodCall>\n";
    let parsed = call(body).unwrap();
    assert_eq!(parsed.name, "query");
    assert_eq!(parsed.params, vec![Value::string("B1-P7")]);
}

#[test]
fn every_scalar_type_parses() {
    let cases: Vec<(&str, Value)> = vec![
        ("<value><int>-42</int></value>", Value::Int(-42)),
        ("<value><i4> 7 </i4></value>", Value::Int(7)),
        (
            "<value><i8>9007199254740993</i8></value>",
            Value::I8(9_007_199_254_740_993),
        ),
        ("<value><boolean>1</boolean></value>", Value::Bool(true)),
        ("<value><boolean>0</boolean></value>", Value::Bool(false)),
        (
            "<value><string> a b </string></value>",
            Value::string(" a b "),
        ),
        ("<value>untyped</value>", Value::string("untyped")),
        ("<value></value>", Value::string("")),
        ("<value/>", Value::string("")),
        ("<value><string/></value>", Value::string("")),
        ("<value><char>(</char></value>", Value::string("(")),
        ("<value><double>-1.5</double></value>", Value::Double(-1.5)),
        (
            "<value><double>1e-05</double></value>",
            Value::Double(1e-05),
        ),
        (
            "<value><dateTime.iso8601>19980717T14:08:55</dateTime.iso8601></value>",
            Value::DateTime("19980717T14:08:55".into()),
        ),
        (
            "<value><base64>\naGVs\nbG8=\n</base64></value>",
            Value::Base64(b"hello".to_vec()),
        ),
        ("<value><nil/></value>", Value::Nil),
        (
            "<value><string>&lt;&amp;&gt;&apos;&quot;&#65;&#x42;</string></value>",
            Value::string("<&>'\"AB"),
        ),
        (
            "<value><string><![CDATA[<raw>]]></string></value>",
            Value::string("<raw>"),
        ),
        (
            "<value><string>a\r\nb</string></value>",
            Value::string("a\nb"),
        ),
    ];
    for (xml, expected) in cases {
        assert_eq!(one_param(xml).unwrap(), expected, "{xml}");
    }
}

#[test]
fn structs_and_arrays_nest() {
    let value = one_param(
        "<value><struct><member><name>a</name><value><array><data><value><int>1</int></value><value>x</value></data></array></value></member><member><name>b</name><value><struct></struct></value></member></struct></value>",
    )
    .unwrap();
    assert_eq!(
        value,
        Value::Struct(vec![
            Member::new("a", Value::Array(vec![Value::Int(1), Value::string("x")])),
            Member::new("b", Value::Struct(vec![])),
        ])
    );
    assert_eq!(
        one_param("<value><array><data></data></array></value>").unwrap(),
        Value::Array(vec![])
    );
    assert_eq!(
        one_param("<value><array/></value>").unwrap(),
        Value::Array(vec![])
    );
}

#[test]
fn calls_without_params_parse() {
    let parsed = call("<methodCall><methodName>flush</methodName></methodCall>").unwrap();
    assert_eq!(
        parsed,
        MethodCall {
            name: "flush".into(),
            params: vec![]
        }
    );
    let parsed = call("<methodCall><methodName>flush</methodName><params/></methodCall>").unwrap();
    assert!(parsed.params.is_empty());
}

#[test]
fn responses_and_faults_round_trip() {
    let value = Value::structure([("ok", Value::Bool(true)), ("n", Value::Int(3))]);
    let body = encode_response(&value);
    assert_eq!(
        parse_response(&body, LIMITS).unwrap(),
        MethodResponse::Success(value)
    );
    let fault = Fault::new(FaultCode::CacheFull, "full <&> up");
    let body = encode_fault(&fault);
    assert_eq!(
        parse_response(&body, LIMITS).unwrap(),
        MethodResponse::Fault(fault)
    );
}

#[test]
fn encoded_calls_parse_back() {
    let params = vec![
        Value::string("a&<b>\r"),
        Value::Int(1),
        Value::Nil,
        Value::Double(0.1),
    ];
    let body = encode_call("system.test", &params);
    let parsed = parse_call(&body, LIMITS).unwrap();
    assert_eq!(parsed.name, "system.test");
    assert_eq!(parsed.params, params);
}

fn refused(body: &[u8]) -> CodecError {
    parse_call(body, LIMITS).expect_err("must be refused")
}

#[test]
fn malformed_xml_is_a_parse_error() {
    for body in [
        "<methodCall><methodName>x</methodName>",
        "<methodCall><methodName>x</methodCall>",
        "<methodCall>",
        "",
        "not xml at all",
        "<methodCall><methodName>x</methodName><params><param><value><int>1</int></value></param></params></methodCall><extra/>",
        "<methodCall><methodName>a&b</methodName></methodCall>",
    ] {
        let error = refused(body.as_bytes());
        assert!(
            matches!(
                error,
                CodecError::Xml { .. }
                    | CodecError::Structure { .. }
                    | CodecError::UnknownEntity { .. }
            ),
            "{body:?}: {error:?}"
        );
    }
}

#[test]
fn wrong_structure_and_bad_scalars_are_refused() {
    let structure_cases = [
        "<methodResponse/>",
        "<methodCall><params/></methodCall>",
        "<methodCall><methodName></methodName></methodCall>",
        "<methodCall><methodName>bad name</methodName></methodCall>",
        "<methodCall><methodName>m</methodName><params><param><int>1</int></param></params></methodCall>",
        "<methodCall><methodName>m</methodName><params><param><value><blob>1</blob></value></param></params></methodCall>",
        "<methodCall><methodName>m</methodName><params><param><value>text<int>1</int></value></param></params></methodCall>",
        "<methodCall><methodName>m</methodName><params><param><value><int><b>1</b></int></value></param></params></methodCall>",
        "<methodCall><methodName>m</methodName>stray</methodCall>",
    ];
    for body in structure_cases {
        assert!(
            matches!(refused(body.as_bytes()), CodecError::Structure { .. }),
            "{body}"
        );
    }
    for xml in [
        "<value><int>2147483648</int></value>",
        "<value><int>1.0</int></value>",
        "<value><int></int></value>",
        "<value><boolean>true</boolean></value>",
        "<value><double>inf</double></value>",
        "<value><double>NaN</double></value>",
        "<value><double>0x1p3</double></value>",
        "<value><dateTime.iso8601>2026-11-25T10:00:00</dateTime.iso8601></value>",
        "<value><base64>!!!</base64></value>",
        "<value><char>ab</char></value>",
        "<value><char></char></value>",
    ] {
        assert!(
            matches!(one_param(xml), Err(CodecError::BadScalar { .. })),
            "{xml}"
        );
    }
    let duplicate = "<value><struct><member><name>a</name><value>1</value></member><member><name>a</name><value>2</value></member></struct></value>";
    assert!(matches!(
        one_param(duplicate),
        Err(CodecError::DuplicateMember { .. })
    ));
}

#[test]
fn large_structs_with_duplicates_are_refused() {
    let mut members: String = (0..40)
        .map(|index| format!("<member><name>m{index}</name><value>v</value></member>"))
        .collect();
    members.push_str("<member><name>m3</name><value>again</value></member>");
    let xml = format!("<value><struct>{members}</struct></value>");
    assert!(matches!(
        one_param(&xml),
        Err(CodecError::DuplicateMember { .. })
    ));
}

#[test]
fn doctype_and_entities_are_never_expanded() {
    let billion_laughs = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<methodCall><methodName>m</methodName><params><param><value>&lol2;</value></param></params></methodCall>"#;
    assert!(matches!(
        refused(billion_laughs.as_bytes()),
        CodecError::Doctype { .. }
    ));
    let external = r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><methodCall><methodName>m</methodName></methodCall>"#;
    assert!(matches!(
        refused(external.as_bytes()),
        CodecError::Doctype { .. }
    ));
    let undefined = "<methodCall><methodName>m</methodName><params><param><value>&xxe;</value></param></params></methodCall>";
    assert!(matches!(
        refused(undefined.as_bytes()),
        CodecError::UnknownEntity { .. }
    ));
    let null_reference = "<methodCall><methodName>m</methodName><params><param><value>&#0;</value></param></params></methodCall>";
    assert!(matches!(
        refused(null_reference.as_bytes()),
        CodecError::UnknownEntity { .. }
    ));
}

#[test]
fn nesting_is_bounded() {
    let depth = LIMITS.depth_max;
    let nested = |levels: usize| {
        let open = "<value><array><data>".repeat(levels);
        let close = "</data></array></value>".repeat(levels);
        format!(
            "<methodCall><methodName>m</methodName><params><param>{open}<value>x</value>{close}</param></params></methodCall>"
        )
    };
    assert!(call(&nested(depth)).is_ok());
    assert_eq!(
        refused(nested(depth + 1).as_bytes()),
        CodecError::TooDeep { max: depth }
    );
    // Far deeper than the limit fails at the limit, without exhausting the stack.
    assert_eq!(
        refused(nested(100_000).as_bytes()),
        CodecError::TooLarge {
            len: nested(100_000).len(),
            max: LIMITS.body_bytes_max
        }
    );
    let generous = Limits {
        body_bytes_max: 64 << 20,
        depth_max: depth,
    };
    assert_eq!(
        parse_call(nested(100_000).as_bytes(), generous),
        Err(CodecError::TooDeep { max: depth })
    );
}

#[test]
fn oversize_bodies_are_refused_before_parsing() {
    let body = vec![b'<'; LIMITS.body_bytes_max + 1];
    assert_eq!(
        refused(&body),
        CodecError::TooLarge {
            len: body.len(),
            max: LIMITS.body_bytes_max
        }
    );
}

#[test]
fn non_utf8_is_refused() {
    let mut body = b"<methodCall><methodName>m</methodName><params><param><value>".to_vec();
    let prefix = body.len();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(b"</value></param></params></methodCall>");
    let CodecError::NotUtf8 { offset } = refused(&body) else {
        panic!("expected NotUtf8")
    };
    assert_eq!(offset, prefix as u64, "the first bad byte");
    // Inside a longer text, and in markup.
    let mut body = b"<methodCall><methodName>m</methodName><params><param><value>abc".to_vec();
    let prefix = body.len();
    body.extend_from_slice(&[0xc3, 0x28]);
    body.extend_from_slice(b"</value></param></params></methodCall>");
    assert_eq!(
        refused(&body),
        CodecError::NotUtf8 {
            offset: prefix as u64
        }
    );
}

#[test]
fn faults_never_echo_the_body() {
    let marker = "SECRET-PAYLOAD-<script>";
    let bodies = [
        format!("<methodCall><methodName>m</methodName><{marker}"),
        format!(
            "<methodCall><methodName>m</methodName><params><param><value><int>{marker}</int></value></param></params></methodCall>"
        ),
        "<methodCall><methodName>m</methodName><params><param><value><SECRET-PAYLOAD/></value></param></params></methodCall>".to_string(),
        format!("<!DOCTYPE {marker}><methodCall/>"),
    ];
    for body in bodies {
        let answer = handle_call(body.as_bytes(), LIMITS, |_| Ok(Value::Nil));
        let text = String::from_utf8(answer.clone()).unwrap();
        assert!(!text.contains("SECRET"), "{text}");
        match parse_response(&answer, LIMITS).unwrap() {
            MethodResponse::Fault(fault) => assert!(fault.registered().is_some(), "{fault:?}"),
            other => panic!("expected a fault, got {other:?}"),
        }
    }
}

#[test]
fn handle_call_maps_errors_to_registered_faults() {
    let fault_code =
        |body: &[u8]| match parse_response(&handle_call(body, LIMITS, |_| Ok(Value::Nil)), LIMITS)
            .unwrap()
        {
            MethodResponse::Fault(fault) => fault.registered(),
            MethodResponse::Success(_) => None,
        };
    assert_eq!(fault_code(b"<methodCall>"), Some(FaultCode::ParseError));
    assert_eq!(
        fault_code(b"<methodCall><params/></methodCall>"),
        Some(FaultCode::InvalidRequest)
    );
    assert_eq!(fault_code(&[0xff]), Some(FaultCode::InvalidCharacter));
    assert_eq!(
        fault_code(&vec![b' '; LIMITS.body_bytes_max + 1]),
        Some(FaultCode::RequestTooLarge)
    );
    assert_eq!(
        fault_code(b"<methodCall><methodName>m</methodName></methodCall>"),
        None
    );
    let answer = handle_call(
        b"<methodCall><methodName>nope.secret</methodName></methodCall>",
        LIMITS,
        |call| Err(Fault::method_not_found(&call.name)),
    );
    match parse_response(&answer, LIMITS).unwrap() {
        MethodResponse::Fault(fault) => {
            assert_eq!(fault.registered(), Some(FaultCode::MethodNotFound));
            assert!(
                !fault.message.contains("nope") && !fault.message.contains("secret"),
                "a fault never echoes the request: {}",
                fault.message
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_method_name_is_read_without_the_rest_and_refused_as_parse_call_refuses_it() {
    use proto::xmlrpc::method_name;
    let limits = Limits::BACKOFFICE;
    let body = b"<?xml version=\"1.0\"?><methodCall><methodName> send </methodName><params>";
    assert_eq!(method_name(body, limits), Ok("send".to_owned()));
    for bad in [
        &b"<methodCall><methodName>a b</methodName></methodCall>"[..],
        b"<methodResponse><params/></methodResponse>",
        b"<!DOCTYPE x><methodCall><methodName>send</methodName></methodCall>",
        b"not xml",
    ] {
        let error = method_name(bad, limits).unwrap_err();
        assert_eq!(Err(error), parse_call(bad, limits).map(|_| ()));
    }
}
