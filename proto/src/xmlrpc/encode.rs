//! The XML-RPC encoder: values, calls, responses and faults to bytes.

use std::fmt::Write as _;

use base64::Engine as _;

use super::value::Value;
use crate::fault::Fault;

const DECLARATION: &str = "<?xml version=\"1.0\"?>";

/// Encodes a `<methodCall>`.
pub fn encode_call(name: &str, params: &[Value]) -> Vec<u8> {
    let mut out = String::with_capacity(128);
    out.push_str(DECLARATION);
    out.push_str("<methodCall><methodName>");
    escape_into(&mut out, name);
    out.push_str("</methodName><params>");
    for param in params {
        out.push_str("<param>");
        write_value(&mut out, param);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>");
    out.into_bytes()
}

/// Encodes a successful `<methodResponse>` with one value.
pub fn encode_response(value: &Value) -> Vec<u8> {
    let mut out = String::with_capacity(128);
    out.push_str(DECLARATION);
    out.push_str("<methodResponse><params><param>");
    write_value(&mut out, value);
    out.push_str("</param></params></methodResponse>");
    out.into_bytes()
}

/// Encodes a fault `<methodResponse>`.
pub fn encode_fault(fault: &Fault) -> Vec<u8> {
    let mut out = String::with_capacity(256);
    out.push_str(DECLARATION);
    out.push_str(
        "<methodResponse><fault><value><struct><member><name>faultCode</name><value><int>",
    );
    write!(out, "{}", fault.code).expect("writing to a String cannot fail");
    out.push_str("</int></value></member><member><name>faultString</name><value><string>");
    escape_into(&mut out, &fault.message);
    out.push_str("</string></value></member></struct></value></fault></methodResponse>");
    out.into_bytes()
}

/// Encodes one `<value>` element into `out`.
pub fn encode_value(out: &mut String, value: &Value) {
    write_value(out, value);
}

fn write_value(out: &mut String, value: &Value) {
    out.push_str("<value>");
    match value {
        Value::Int(number) => {
            write!(out, "<int>{number}</int>").expect("writing to a String cannot fail");
        }
        Value::I8(number) => {
            write!(out, "<i8>{number}</i8>").expect("writing to a String cannot fail");
        }
        Value::Bool(truth) => out.push_str(if *truth {
            "<boolean>1</boolean>"
        } else {
            "<boolean>0</boolean>"
        }),
        Value::String(text) => {
            out.push_str("<string>");
            escape_into(out, text);
            out.push_str("</string>");
        }
        Value::Double(number) => {
            // Rust prints finite doubles as plain decimals, never with an
            // exponent, which is the only form the XML-RPC spec allows.
            write!(out, "<double>{number}</double>").expect("writing to a String cannot fail");
        }
        Value::DateTime(text) => {
            out.push_str("<dateTime.iso8601>");
            escape_into(out, text);
            out.push_str("</dateTime.iso8601>");
        }
        Value::Base64(bytes) => {
            out.push_str("<base64>");
            base64::engine::general_purpose::STANDARD.encode_string(bytes, out);
            out.push_str("</base64>");
        }
        Value::Struct(members) => {
            out.push_str("<struct>");
            for member in members {
                out.push_str("<member><name>");
                escape_into(out, &member.name);
                out.push_str("</name>");
                write_value(out, &member.value);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
        Value::Array(items) => {
            out.push_str("<array><data>");
            for item in items {
                write_value(out, item);
            }
            out.push_str("</data></array>");
        }
        Value::Nil => out.push_str("<nil/>"),
    }
    out.push_str("</value>");
}

/// Appends `text` with `&`, `<`, `>` escaped, and `\r` as a character
/// reference so that XML's end-of-line normalization keeps it.
fn escape_into(out: &mut String, text: &str) {
    let mut start = 0;
    for (index, byte) in text.bytes().enumerate() {
        let replacement = match byte {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'\r' => "&#13;",
            _ => continue,
        };
        out.push_str(&text[start..index]);
        out.push_str(replacement);
        start = index + 1;
    }
    out.push_str(&text[start..]);
}
