//! Typed identifiers: branch (BID), customer (CID), product (PID), meter (MID),
//! batch and calling context. An invalid identifier cannot be constructed.
//!
//! The franchise-wide form of a CID, PID or MID is `BRANCH-KSERIAL`: the BID of
//! the branch that issued it, a dash, one kind letter (`C`, `P` or `M`) and a
//! serial of upper-case letters and digits, for example `B1-C42`, `B1-P7`,
//! `EU2-M1000`. The kind letter makes the three kinds disjoint, so a PID can
//! never be taken for a CID on any wire. IDs are stored inline (no heap), are
//! `Copy`, and compare byte-wise.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest branch code (BID), in bytes.
pub const BID_LEN_MAX: usize = 8;
/// Longest serial after the kind letter, in bytes.
pub const SERIAL_LEN_MAX: usize = 20;
/// Longest CID, PID or MID, in bytes: branch, dash, kind letter, serial.
pub const ID_LEN_MAX: usize = BID_LEN_MAX + 2 + SERIAL_LEN_MAX;
/// Longest batch id or context token, in bytes.
pub const TOKEN_LEN_MAX: usize = 64;

/// Why a string is not a valid identifier of the kind asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {reason} (expected {example})")]
pub struct IdError {
    /// Which identifier was being parsed ("CID", "PID", ...).
    pub kind: &'static str,
    /// What was wrong with it.
    pub reason: IdFault,
    /// A valid example of the kind, for the message.
    pub example: &'static str,
}

/// The ways an identifier can be malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdFault {
    /// The string is empty.
    #[error("empty")]
    Empty,
    /// The string is longer than the kind allows.
    #[error("too long")]
    TooLong,
    /// The branch part is missing, too long, or not upper-case letters and digits
    /// starting with a letter.
    #[error("bad branch code")]
    BadBranch,
    /// The kind letter after the dash is not the one this kind needs.
    #[error("wrong kind letter")]
    WrongKind,
    /// The serial is empty or not upper-case letters and digits.
    #[error("bad serial")]
    BadSerial,
    /// A character outside `A-Z a-z 0-9 . _ : -`.
    #[error("character not allowed")]
    BadCharacter,
}

fn is_branch_code(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.len() <= BID_LEN_MAX
        && bytes[0].is_ascii_uppercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Inline storage for an ASCII identifier of at most `ID_LEN_MAX` bytes;
/// the bytes past `len` are always zero.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct IdBytes {
    len: u8,
    bytes: [u8; ID_LEN_MAX],
}

const _: () = assert!(ID_LEN_MAX < 32, "an IdBytes hashes as 32 bytes");

/// Hashed as four words rather than a 30-byte slice: IDs key the maps of
/// every batch (payers, periods, balances), and a hasher takes whole words
/// several times faster than bytes. Equal IDs have equal words, since the
/// bytes past `len` are zero.
impl std::hash::Hash for IdBytes {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut words = [0u8; 32];
        words[0] = self.len;
        words[1..=ID_LEN_MAX].copy_from_slice(&self.bytes);
        for word in words.chunks_exact(8) {
            state.write_u64(u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
    }
}

impl IdBytes {
    fn new(text: &str) -> Self {
        debug_assert!(text.len() <= ID_LEN_MAX && text.is_ascii());
        let mut bytes = [0u8; ID_LEN_MAX];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        let len = u8::try_from(text.len()).expect("ID length fits in u8");
        Self { len, bytes }
    }

    fn as_str(&self) -> &str {
        let slice = &self.bytes[..usize::from(self.len)];
        // Only ASCII is ever stored (checked by every constructor).
        std::str::from_utf8(slice).expect("IDs are ASCII")
    }
}

/// Checks `BRANCH-KSERIAL` with the given kind letter.
fn check_party_id(text: &str, kind_letter: u8) -> Result<(), IdFault> {
    if text.is_empty() {
        return Err(IdFault::Empty);
    }
    if text.len() > ID_LEN_MAX {
        return Err(IdFault::TooLong);
    }
    let bytes = text.as_bytes();
    let dash = bytes
        .iter()
        .position(|&b| b == b'-')
        .ok_or(IdFault::BadBranch)?;
    if !is_branch_code(&bytes[..dash]) {
        return Err(IdFault::BadBranch);
    }
    let rest = &bytes[dash + 1..];
    match rest.first() {
        Some(&letter) if letter == kind_letter => {}
        _ => return Err(IdFault::WrongKind),
    }
    let serial = &rest[1..];
    if serial.is_empty()
        || serial.len() > SERIAL_LEN_MAX
        || !serial
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        return Err(IdFault::BadSerial);
    }
    Ok(())
}

macro_rules! party_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $letter:literal, $example:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(IdBytes);

        impl $name {
            /// The kind letter that follows the branch code and dash.
            pub const KIND_LETTER: char = $letter as char;

            /// Parses and validates an identifier of this kind.
            pub fn parse(text: &str) -> Result<Self, IdError> {
                check_party_id(text, $letter).map_err(|reason| IdError {
                    kind: $kind,
                    reason,
                    example: $example,
                })?;
                Ok(Self(IdBytes::new(text)))
            }

            /// Builds the identifier `BRANCH-K<serial>` from its parts.
            pub fn new(branch: &Bid, serial: &str) -> Result<Self, IdError> {
                let mut text = String::with_capacity(ID_LEN_MAX);
                text.push_str(branch.as_str());
                text.push('-');
                text.push(Self::KIND_LETTER);
                text.push_str(serial);
                Self::parse(&text)
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }

            /// The branch that issued this identifier.
            pub fn branch(&self) -> Bid {
                let text = self.as_str();
                let dash = text.find('-').expect("validated IDs contain a dash");
                Bid(IdBytes::new(&text[..dash]))
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(text: &str) -> Result<Self, IdError> {
                Self::parse(text)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", $kind, self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

party_id!(
    /// A customer ID: identifies a person's micro-account franchise-wide.
    Cid, "CID", b'C', "B1-C42"
);
party_id!(
    /// A product ID: identifies one product under one TACA franchise-wide.
    Pid, "PID", b'P', "B1-P7"
);
party_id!(
    /// A meter ID: identifies one registered meterd franchise-wide.
    Mid, "MID", b'M', "B1-M3"
);

/// A branch ID: the code of one backoffice in the franchise, 1 to 8 upper-case
/// letters and digits starting with a letter, for example `B1` or `EU2`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bid(IdBytes);

impl Bid {
    /// Parses and validates a branch code.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        let error = |reason| IdError {
            kind: "BID",
            reason,
            example: "B1",
        };
        if text.is_empty() {
            return Err(error(IdFault::Empty));
        }
        if text.len() > BID_LEN_MAX {
            return Err(error(IdFault::TooLong));
        }
        if !is_branch_code(text.as_bytes()) {
            return Err(error(IdFault::BadBranch));
        }
        Ok(Self(IdBytes::new(text)))
    }

    /// The branch code as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl FromStr for Bid {
    type Err = IdError;
    fn from_str(text: &str) -> Result<Self, IdError> {
        Self::parse(text)
    }
}

impl fmt::Display for Bid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Bid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BID({})", self.as_str())
    }
}

impl Serialize for Bid {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Bid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

fn check_token(text: &str, kind: &'static str, example: &'static str) -> Result<(), IdError> {
    let error = |reason| IdError {
        kind,
        reason,
        example,
    };
    if text.is_empty() {
        return Err(error(IdFault::Empty));
    }
    if text.len() > TOKEN_LEN_MAX {
        return Err(error(IdFault::TooLong));
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
    if !text.as_bytes().iter().all(allowed) {
        return Err(error(IdFault::BadCharacter));
    }
    Ok(())
}

macro_rules! token {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $example:literal) => {
        $(#[$doc])*
        // Shared, not boxed: a batch's readings each hold a context, most
        // of them the same few, and cloning one is then a counter increment
        // instead of an allocation.
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// Parses and validates: 1 to `TOKEN_LEN_MAX` bytes of
            /// `A-Z a-z 0-9 . _ : -`.
            pub fn parse(text: &str) -> Result<Self, IdError> {
                check_token(text, $kind, $example)?;
                Ok(Self(text.into()))
            }

            /// The token as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(text: &str) -> Result<Self, IdError> {
                Self::parse(text)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", $kind, &self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

token!(
    /// A batch id, generated by the meter and persisted before the first send,
    /// so that every retry of one batch carries the same id.
    BatchId, "batch id", "B1-M3:000042"
);
token!(
    /// The calling context that nesting is tracked in (see meterd's docs), for
    /// example `pid:4242` or `pid:4242:thread:7`.
    Context, "context", "pid:4242"
);

/// Who pays for a use, as the meter resolved it: the customer of the nearest
/// enclosing `login`, or the owner of the product of the nearest enclosing
/// `query`. Also the key of the backoffice's status table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Payer {
    /// The logged-in customer pays.
    Customer(Cid),
    /// Whoever owns this product pays (a component used inside it).
    OwnerOf(Pid),
}

impl Payer {
    /// Parses a CID or a PID; the kind letter tells which.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        match Cid::parse(text) {
            Ok(cid) => Ok(Self::Customer(cid)),
            Err(cid_error) if cid_error.reason == IdFault::WrongKind => Pid::parse(text)
                .map(Self::OwnerOf)
                .map_err(|error| IdError {
                    kind: "payer (CID or PID)",
                    example: "B1-C42",
                    ..error
                }),
            Err(error) => Err(IdError {
                kind: "payer (CID or PID)",
                ..error
            }),
        }
    }

    /// The CID or PID as text.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Customer(cid) => cid.as_str(),
            Self::OwnerOf(pid) => pid.as_str(),
        }
    }
}

impl fmt::Display for Payer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
