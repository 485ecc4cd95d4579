//! The validator1 server: conformance with Python's stock client, and the
//! negative space over real HTTP.

use std::process::Command;

use proto::FaultCode;

use crate::support::{Running, address_of, fault_code, post, start};

fn server() -> Running {
    start(
        env!("CARGO_BIN_EXE_validator1"),
        &["--listen", "127.0.0.1:0"],
    )
}

#[test]
fn python_xmlrpc_client_passes_validator1() {
    let server = server();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/validator1_client.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(&server.first_line)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.starts_with("ok: 18 checks"), "{stdout}");
}

#[test]
fn hostile_requests_get_faults_or_http_errors_and_the_server_survives() {
    let server = server();
    let address = address_of(&server.first_line);
    let deep = format!(
        "<methodCall><methodName>validator1.echoStructTest</methodName><params><param>{}{}</param></params></methodCall>",
        "<value><array><data>".repeat(200),
        "</data></array></value>".repeat(200)
    );
    let bomb = r#"<?xml version="1.0"?><!DOCTYPE b [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><methodCall><methodName>validator1.countTheEntities</methodName><params><param><value>&b;</value></param></params></methodCall>"#;
    let cases: Vec<(&str, Vec<u8>, FaultCode)> = vec![
        ("malformed XML", b"<methodCall><methodName>x</methodName".to_vec(), FaultCode::ParseError),
        ("not XML-RPC", b"<hello/>".to_vec(), FaultCode::InvalidRequest),
        ("unknown method", b"<methodCall><methodName>nope</methodName></methodCall>".to_vec(), FaultCode::MethodNotFound),
        (
            "wrong type",
            b"<methodCall><methodName>validator1.simpleStructReturnTest</methodName><params><param><value><string>7</string></value></param></params></methodCall>".to_vec(),
            FaultCode::InvalidParams,
        ),
        ("deep nesting", deep.into_bytes(), FaultCode::NestingTooDeep),
        ("entity bomb", bomb.as_bytes().to_vec(), FaultCode::InvalidRequest),
        ("not UTF-8", vec![b'<', 0xff, b'>'], FaultCode::InvalidCharacter),
    ];
    for (label, body, expected) in cases {
        let (status, answer) = post(address, "/RPC2", &body);
        assert_eq!(status, 200, "{label}");
        assert_eq!(fault_code(&answer), Some(expected), "{label}");
    }
    let oversize = vec![b' '; tests::validator1::LIMITS.body_bytes_max + 1];
    let (status, _) = post(address, "/RPC2", &oversize);
    assert_eq!(status, 413, "oversize body");
    // Still serving.
    let ok = b"<methodCall><methodName>validator1.simpleStructReturnTest</methodName><params><param><value><int>3</int></value></param></params></methodCall>";
    let (status, answer) = post(address, "/RPC2", ok);
    assert_eq!(status, 200);
    assert_eq!(fault_code(&answer), None);
    assert!(String::from_utf8_lossy(&answer).contains("<int>3000</int>"));
}
