//! The registry of XML-RPC fault codes: every fault any of our servers sends
//! has one of these codes. `docs/protocol.md` lists them (a test checks it).
//!
//! Codes below zero follow the XML-RPC fault code interoperability convention
//! (-32700 parse error, -32600 invalid request, ...; -32000 to -32099 are
//! implementation-defined server errors). Codes 100-199 belong to the meter's
//! local API, 200-299 to the upload (`send`), 300-399 to the backoffice's
//! operator calls.

use std::fmt;

macro_rules! fault_codes {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $meaning:literal;)*) => {
        /// A registered fault code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum FaultCode {
            $($(#[$doc])* $name,)*
        }

        impl FaultCode {
            /// Every registered code, in registry order.
            pub const ALL: &'static [FaultCode] = &[$(FaultCode::$name,)*];

            /// The number sent as `faultCode`.
            pub const fn code(self) -> i32 {
                match self {
                    $(FaultCode::$name => $code,)*
                }
            }

            /// What the code means, as `docs/protocol.md` states it.
            pub const fn meaning(self) -> &'static str {
                match self {
                    $(FaultCode::$name => $meaning,)*
                }
            }

            /// The registered code with this number, if any.
            pub fn from_code(code: i32) -> Option<FaultCode> {
                match code {
                    $($code => Some(FaultCode::$name),)*
                    _ => None,
                }
            }
        }
    };
}

fault_codes! {
    /// The body is not well-formed XML.
    ParseError = -32700, "The body is not well-formed XML.";
    /// The body is not UTF-8.
    InvalidCharacter = -32702, "The body is not valid UTF-8 (the only encoding accepted).";
    /// Well-formed XML that is not a valid XML-RPC message.
    InvalidRequest = -32600, "Well-formed XML that is not a valid XML-RPC message: wrong elements, a DOCTYPE, an undefined entity, a scalar that is not valid for its type, or a duplicate struct member.";
    /// No such method.
    MethodNotFound = -32601, "The server has no method of that name.";
    /// Wrong number or types of parameters, or an invalid ID or amount.
    InvalidParams = -32602, "Wrong number or types of parameters, or a parameter that is not valid (an ID, an amount, a code).";
    /// A failure inside the server that is not the caller's fault.
    InternalError = -32603, "A failure inside the server that is not the caller's fault; the call had no effect and may be retried.";
    /// The body exceeds the size limit.
    RequestTooLarge = -32001, "The body exceeds the server's size limit; nothing was parsed.";
    /// Arrays and structs are nested too deep.
    NestingTooDeep = -32002, "Arrays and structs are nested deeper than the server's limit.";
    /// The meter's cache is full.
    CacheFull = 101, "The meter's cache is at its configured maximum; this reading was not recorded. Uploading frees space.";
    /// The meter could not make the reading durable.
    StorageFailed = 102, "The meter could not make this reading durable; it was not recorded.";
    /// Too many open contexts.
    ContextsFull = 103, "The meter tracks its maximum number of open contexts; this call was not recorded.";
    /// A commit with no open query of that PID in its context.
    UnmatchedCommit = 104, "commit(PID) without an open query(PID) in the same context; nothing was recorded.";
    /// Too many open logins and queries in one context.
    FramesFull = 105, "This context has its maximum of open logins and queries; commit, cancel or log out first.";
    /// `login(CID)` from a local user who holds no grant for that CID.
    NotGranted = 106, "login(CID) from a local user who holds no grant of that customer on this meter; nothing was recorded. That user runs `meterd grant CID` first.";
    /// The backoffice refused a grant, or could not be reached.
    GrantFailed = 107, "The grant was not made: the backoffice refused it or could not be reached; the message says why.";
    /// The meter stopped after its storage failed.
    MeterStopped = 108, "The meter stopped after its storage failed to make data durable: this call was not recorded, and nothing is until meterd is restarted. `meterd status` says why.";
    /// A reading may or may not have been recorded.
    RecordingInDoubt = 109, "The meter's storage failed while recording this reading and could not undo it: it may have been recorded, and may be charged after a restart. The meter stopped; `meterd status` says why.";
    /// The operator token is missing or wrong.
    Unauthorized = 301, "The call needs the operator's token (the X-Operator-Token header) and it was missing or wrong.";
    /// No such customer, product or meter.
    NotFound = 302, "No customer, product or meter with that ID.";
    /// A TACA module was refused.
    ModuleRefused = 303, "The TACA module was refused; the message says why (see docs/taca-abi.md).";
    /// A new record was refused (bad name, e-mail, amount).
    RecordRefused = 304, "The record was refused; the message says which field and why.";
    /// The MID is not registered.
    UnknownMeter = 201, "The MID is not registered with this backoffice.";
    /// The upload's signature does not verify.
    BadSignature = 202, "The upload's signature does not verify with the meter's secret.";
    /// The upload was already seen or is too old.
    Replay = 203, "The upload's signature was already used or its time is outside the accepted window.";
    /// The batch has more readings than allowed.
    BatchTooLarge = 204, "The batch has more readings than the backoffice accepts in one upload.";
    /// A batch id reused with different contents.
    BatchConflict = 205, "This batch id was already applied with different contents; nothing was applied.";
    /// A reading in the batch is malformed.
    InvalidReading = 206, "A reading in the batch is malformed (bad code, ID of the wrong kind, sequence out of order); nothing was applied.";
    /// A grant was refused.
    GrantRefused = 207, "The grant was refused: wrong password, unknown customer, or a device code that is unknown, used or expired.";
    /// Too many grant attempts.
    TooManyAttempts = 208, "Too many grant attempts for this meter or customer; wait and try again.";
    /// The meter's clock is too far from the backoffice's.
    ClockSkew = 209, "The upload's time (X-Meter-Time) is further from the backoffice's clock than the signature window allows; the message gives both clocks. Set the meter's clock (NTP); nothing was applied.";
    /// The meter was revoked.
    MeterRevoked = 210, "The meter was revoked by its owner or the operator (the message says who and when); nothing was applied. Revocation is for good: register a new meter, with a new MID and secret.";
}

impl fmt::Display for FaultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.code(), self)
    }
}

/// An XML-RPC fault: a code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fault {code}: {message}")]
pub struct Fault {
    /// The `faultCode`; one of `FaultCode` when we send it.
    pub code: i32,
    /// The `faultString`.
    pub message: String,
}

impl Fault {
    /// A fault with a registered code.
    pub fn new(code: FaultCode, message: impl Into<String>) -> Self {
        Self {
            code: code.code(),
            message: message.into(),
        }
    }

    /// The registered code, if this fault has one.
    pub fn registered(&self) -> Option<FaultCode> {
        FaultCode::from_code(self.code)
    }

    /// "no such method". The name is not repeated: a fault never echoes
    /// the request, and the caller knows what it called.
    pub fn method_not_found(name: &str) -> Self {
        Self::new(
            FaultCode::MethodNotFound,
            format!(
                "the server has no method of that name ({} bytes)",
                name.len()
            ),
        )
    }

    /// Invalid parameters, with a reason.
    pub fn invalid_params(reason: impl fmt::Display) -> Self {
        Self::new(FaultCode::InvalidParams, reason.to_string())
    }
}
