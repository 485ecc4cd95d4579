//! The XML-RPC layer: values, calls, responses and faults, parsed from and
//! encoded to bytes with bounded size and depth. No I/O: servers hand in a
//! body and get bytes back.

mod encode;
mod parse;
mod value;

pub use encode::{encode_call, encode_fault, encode_response, encode_value};
pub use parse::{CodecError, method_name, parse_call, parse_response};
pub(crate) use parse::{END_OF_BODY, Parser, Tag, Token, ValueStart, resolve_reference};
pub use value::{Member, MethodCall, MethodResponse, Value};

use crate::fault::{Fault, FaultCode};

/// Bounds on what the parser accepts. Every server sets these explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body accepted, in bytes. Larger input is refused before parsing.
    pub body_bytes_max: usize,
    /// Deepest nesting of arrays and structs accepted.
    pub depth_max: usize,
}

impl Limits {
    /// For the meter's local API: single small calls.
    pub const METER_API: Limits = Limits {
        body_bytes_max: 64 * 1024,
        depth_max: 16,
    };
    /// For `send` and the backoffice API: a batch of up to
    /// `upload::BATCH_READINGS_MAX` readings in the extended form fits.
    pub const BACKOFFICE: Limits = Limits {
        body_bytes_max: 32 * 1024 * 1024,
        depth_max: 16,
    };
}

/// Parses a request body and runs `handler` on the call, returning the body of
/// the response: the handler's value, or a fault when either the request could
/// not be parsed or the handler refused it. A fault never echoes the request.
pub fn handle_call(
    body: &[u8],
    limits: Limits,
    handler: impl FnOnce(MethodCall) -> Result<Value, Fault>,
) -> Vec<u8> {
    let outcome = parse_call(body, limits)
        .map_err(Fault::from)
        .and_then(handler);
    match outcome {
        Ok(value) => encode_response(&value),
        Err(fault) => encode_fault(&fault),
    }
}

impl From<CodecError> for Fault {
    fn from(error: CodecError) -> Fault {
        let code = match error {
            CodecError::TooLarge { .. } => FaultCode::RequestTooLarge,
            CodecError::TooDeep { .. } => FaultCode::NestingTooDeep,
            CodecError::NotUtf8 { .. } => FaultCode::InvalidCharacter,
            CodecError::Xml { .. } => FaultCode::ParseError,
            CodecError::Doctype { .. }
            | CodecError::UnknownEntity { .. }
            | CodecError::Structure { .. }
            | CodecError::BadScalar { .. }
            | CodecError::DuplicateMember { .. } => FaultCode::InvalidRequest,
        };
        Fault::new(code, error.to_string())
    }
}
