//! Meter readings: Cox's four codes and what our upload adds to each.

use std::fmt;

use crate::id::{Cid, Context, Payer, Pid};

/// Cox's reading codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// `{`: a customer logged in; the ID is a CID.
    Login,
    /// `}`: a customer logged out; the ID is a CID.
    Logout,
    /// `(`: a use of a product is beginning; the ID is a PID.
    Query,
    /// `)`: a use of a product is committed (chargeable); the ID is a PID.
    Commit,
}

impl Code {
    /// The one-character wire form.
    pub const fn as_char(self) -> char {
        match self {
            Code::Login => '{',
            Code::Logout => '}',
            Code::Query => '(',
            Code::Commit => ')',
        }
    }

    /// The code for a wire character.
    pub const fn from_char(character: char) -> Option<Code> {
        match character {
            '{' => Some(Code::Login),
            '}' => Some(Code::Logout),
            '(' => Some(Code::Query),
            ')' => Some(Code::Commit),
            _ => None,
        }
    }

    /// The code for a one-character string.
    pub fn parse(text: &str) -> Option<Code> {
        let mut characters = text.chars();
        let code = Code::from_char(characters.next()?)?;
        characters.next().is_none().then_some(code)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// What happened, with the ID of the right kind for its code. The payer is
/// what the meter resolved (nearest enclosing login or query); `None` when
/// nobody would pay, or in Cox's minimal form, where the backoffice resolves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// `{` with the CID that logged in.
    Login(Cid),
    /// `}` with the CID that logged out.
    Logout(Cid),
    /// `(` with the PID queried and who would pay.
    Query {
        /// The product being used.
        pid: Pid,
        /// Who would pay for it.
        payer: Option<Payer>,
    },
    /// `)` with the PID committed and who pays.
    Commit {
        /// The product used.
        pid: Pid,
        /// Who pays for it.
        payer: Option<Payer>,
    },
}

impl Event {
    /// Cox's code of this event.
    pub const fn code(&self) -> Code {
        match self {
            Event::Login(_) => Code::Login,
            Event::Logout(_) => Code::Logout,
            Event::Query { .. } => Code::Query,
            Event::Commit { .. } => Code::Commit,
        }
    }

    /// The CID or PID the reading is about, as text (Cox's `PID` member).
    pub fn id_str(&self) -> &str {
        match self {
            Event::Login(cid) | Event::Logout(cid) => cid.as_str(),
            Event::Query { pid, .. } | Event::Commit { pid, .. } => pid.as_str(),
        }
    }

    /// The resolved payer, for queries and commits.
    pub const fn payer(&self) -> Option<Payer> {
        match *self {
            Event::Login(_) | Event::Logout(_) => None,
            Event::Query { payer, .. } | Event::Commit { payer, .. } => payer,
        }
    }
}

/// One reading as the meter records and uploads it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reading {
    /// Per-meter sequence number: strictly increasing, never reused.
    pub seq: u64,
    /// When the call was made, in milliseconds since the Unix epoch (UTC).
    pub time_ms: u64,
    /// The calling context the nesting was tracked in.
    pub context: Context,
    /// What happened.
    pub event: Event,
}
