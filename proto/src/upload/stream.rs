//! `send` in the extended form decoded straight from the parser's tokens,
//! without building the `Value` tree: the backoffice's hot path.
//!
//! It accepts a subset of what `parse_call` + `SendRequest::from_call` accept
//! and gives the same request for it. Anything else (Cox's minimal form,
//! members it does not expect, any error at all) makes it return `None`, and
//! the caller decodes the body the general way, which also gives the precise
//! fault. The tests and the fuzz target check that whenever this returns a
//! request, the general way returns the same one.

use std::borrow::Cow;

use super::{BATCH_PARTIES_MAX, BATCH_READINGS_MAX, Batch, SEND_METHOD, SendBody, SendRequest};
use crate::id::{BatchId, Context, Mid, Payer};
use crate::reading::{Code, Reading};
use crate::xmlrpc::{END_OF_BODY, Limits, Parser, Tag, Token, Value, ValueStart};

/// Nesting the extended form needs: batch struct, readings array, reading struct.
const DEPTH_NEEDED: usize = 3;

/// A scalar member value, borrowed from the body where it can be.
pub(super) enum Scalar<'a> {
    Text(Cow<'a, str>),
    Int(i64),
}

/// Decodes `body` as an extended-form `send` call within `limits`, or `None`
/// when it is anything else (see the module's documentation).
pub fn decode(body: &[u8], limits: Limits) -> Option<SendRequest> {
    if limits.depth_max < DEPTH_NEEDED {
        return None;
    }
    let mut p = Parser::new(body, limits).ok()?;
    if p.method_name().ok()? != SEND_METHOD {
        return None;
    }
    open(&mut p, Tag::Params)?;
    open(&mut p, Tag::Param)?;
    p.expect_open(Tag::Value, "").ok()?;
    let mid: Mid = text_of(scalar(&mut p)?)?.parse().ok()?;
    p.expect_close("").ok()?;
    open(&mut p, Tag::Param)?;
    p.expect_open(Tag::Value, "").ok()?;
    let batch = batch(&mut p)?;
    p.expect_close("").ok()?; // </param>
    p.expect_close("").ok()?; // </params>
    p.expect_close("").ok()?; // </methodCall>
    match p.structural(END_OF_BODY).ok()? {
        Token::Eof => Some(SendRequest {
            mid,
            body: SendBody::Batch(batch),
        }),
        _ => None,
    }
}

fn open(p: &mut Parser<'_>, tag: Tag) -> Option<()> {
    p.expect_open(tag, "").ok()
}

/// After `<value>`: the typed element `tag` opens (text before it is space).
fn typed(p: &mut Parser<'_>, tag: Tag) -> Option<()> {
    match p.value_start().ok()? {
        ValueStart::Typed(found) if found == tag => Some(()),
        _ => None,
    }
}

/// After `<value>`: a string, `int` or `i8`, through `</value>`.
fn scalar<'a>(p: &mut Parser<'a>) -> Option<Scalar<'a>> {
    let scalar = match p.value_start().ok()? {
        ValueStart::Text(text) => return Some(Scalar::Text(text)),
        ValueStart::Typed(Tag::String) => Scalar::Text(p.text_until_close("").ok()?),
        ValueStart::Typed(Tag::Char) => {
            let text = p.text_until_close("").ok()?;
            if text.chars().count() != 1 {
                return None;
            }
            Scalar::Text(text)
        }
        ValueStart::Typed(tag @ (Tag::Int | Tag::I8)) => match p.typed(tag).ok()? {
            Value::Int(number) => Scalar::Int(i64::from(number)),
            Value::I8(number) => Scalar::Int(number),
            _ => return None,
        },
        ValueStart::Typed(_) => return None,
    };
    p.expect_close("").ok()?;
    Some(scalar)
}

fn text_of(scalar: Scalar<'_>) -> Option<Cow<'_, str>> {
    match scalar {
        Scalar::Text(text) => Some(text),
        Scalar::Int(_) => None,
    }
}

/// As `upload`'s `u64_member`: decimal text, or a non-negative `int`/`i8`.
fn u64_of(scalar: Scalar<'_>) -> Option<u64> {
    match scalar {
        Scalar::Text(text) => text.parse().ok(),
        Scalar::Int(number) => u64::try_from(number).ok(),
    }
}

/// `<member><name>NAME</name><value>` read; returns NAME, or `None` at
/// `</struct>` (consumed).
fn member_name<'a>(p: &mut Parser<'a>) -> Option<Option<Cow<'a, str>>> {
    match p.structural("").ok()? {
        Token::Open(Tag::Member) => {}
        Token::Close => return Some(None),
        _ => return None,
    }
    open(p, Tag::Name)?;
    let name = p.text_until_close("").ok()?;
    open(p, Tag::Value)?;
    Some(Some(name))
}

/// After `<value>`: `<array>`, then `<data>` or an empty array's end.
/// Returns false for the empty array (all of it consumed through `</value>`).
fn array_start(p: &mut Parser<'_>) -> Option<bool> {
    typed(p, Tag::Array)?;
    match p.structural("").ok()? {
        Token::Open(Tag::Data) => Some(true),
        Token::Close => {
            p.expect_close("").ok()?; // </value>
            Some(false)
        }
        _ => None,
    }
}

/// Next `<value>` of an array's data; false at `</data></array></value>`.
fn next_item(p: &mut Parser<'_>) -> Option<bool> {
    match p.structural("").ok()? {
        Token::Open(Tag::Value) => Some(true),
        Token::Close => {
            p.expect_close("").ok()?; // </array>
            p.expect_close("").ok()?; // </value>
            Some(false)
        }
        _ => None,
    }
}

/// After the batch's `<value>`: the batch struct through `</value>`.
fn batch(p: &mut Parser<'_>) -> Option<Batch> {
    typed(p, Tag::Struct)?;
    let mut id = None;
    let mut readings = None;
    let mut parties = None;
    while let Some(name) = member_name(p)? {
        match name.as_ref() {
            "batchId" if id.is_none() => {
                id = Some(BatchId::parse(&text_of(scalar(p)?)?).ok()?);
            }
            "readings" if readings.is_none() => readings = Some(reading_array(p)?),
            "packedReadings" if readings.is_none() => readings = Some(packed_readings(p)?),
            "parties" if parties.is_none() => parties = Some(party_array(p)?),
            _ => return None,
        }
        p.expect_close("").ok()?; // </member>
    }
    p.expect_close("").ok()?; // </value>
    Some(Batch {
        id: id?,
        readings: readings?,
        parties: parties.unwrap_or_default(),
    })
}

fn reading_array(p: &mut Parser<'_>) -> Option<Vec<Reading>> {
    let mut readings: Vec<Reading> = Vec::new();
    if !array_start(p)? {
        return Some(readings);
    }
    while next_item(p)? {
        if readings.len() == BATCH_READINGS_MAX {
            return None;
        }
        let reading = reading(p)?;
        if readings.last().is_some_and(|last| reading.seq <= last.seq) {
            return None;
        }
        readings.push(reading);
    }
    Some(readings)
}

/// After `<value>`: a `<base64>` packed block through `</value>`.
fn packed_readings(p: &mut Parser<'_>) -> Option<Vec<Reading>> {
    typed(p, Tag::Base64)?;
    let Value::Base64(block) = p.typed(Tag::Base64).ok()? else {
        return None;
    };
    p.expect_close("").ok()?; // </value>
    super::packed::decode(&block).ok()
}

fn party_array(p: &mut Parser<'_>) -> Option<Vec<Payer>> {
    let mut parties = Vec::new();
    if !array_start(p)? {
        return Some(parties);
    }
    while next_item(p)? {
        if parties.len() == BATCH_PARTIES_MAX {
            return None;
        }
        parties.push(Payer::parse(&text_of(scalar(p)?)?).ok()?);
    }
    Some(parties)
}

/// After a reading's `<value>`: the reading struct through `</value>`.
fn reading(p: &mut Parser<'_>) -> Option<Reading> {
    typed(p, Tag::Struct)?;
    let mut fields = ReadingFields::default();
    while let Some(name) = member_name(p)? {
        let value = scalar(p)?;
        fields.set(&name, value)?;
        p.expect_close("").ok()?; // </member>
    }
    p.expect_close("").ok()?; // </value>
    fields.reading()
}

/// A reading's members as they arrive, each at most once.
#[derive(Default)]
pub(super) struct ReadingFields<'a> {
    id: Option<Cow<'a, str>>,
    code: Option<Code>,
    seq: Option<u64>,
    context: Option<Context>,
    time_ms: Option<u64>,
    payer: Option<Payer>,
}

impl<'a> ReadingFields<'a> {
    /// Takes member `name`; `None` for an unknown or repeated member or a
    /// value `upload`'s general decoder would refuse.
    pub(super) fn set(&mut self, name: &str, value: Scalar<'a>) -> Option<()> {
        match name {
            "PID" if self.id.is_none() => self.id = Some(text_of(value)?),
            "code" if self.code.is_none() => self.code = Some(Code::parse(&text_of(value)?)?),
            "seq" if self.seq.is_none() => self.seq = Some(u64_of(value)?),
            "context" if self.context.is_none() => {
                self.context = Some(Context::parse(&text_of(value)?).ok()?);
            }
            "timeMs" if self.time_ms.is_none() => self.time_ms = Some(u64_of(value)?),
            "payer" if self.payer.is_none() => {
                self.payer = Some(Payer::parse(&text_of(value)?).ok()?);
            }
            _ => return None,
        }
        Some(())
    }

    /// The reading, when every required member came.
    pub(super) fn reading(self) -> Option<Reading> {
        Some(Reading {
            seq: self.seq?,
            time_ms: self.time_ms?,
            context: self.context?,
            event: super::event_of(self.code?, &self.id?, self.payer, 0).ok()?,
        })
    }
}
