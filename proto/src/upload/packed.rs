//! The packed reading form: a batch's readings as one `<base64>` block
//! (`packedReadings`) instead of an array of structs, what our meter sends.
//!
//! The struct form spends about 470 bytes of XML on a reading; this form
//! spends 7 to 12 (10 to 16 in base64), so a 10,000-reading upload is about
//! 130 KB instead of 4.7 MB: less to sign, to carry and to decode. Each
//! distinct ID and context is written once, in a string table, and readings
//! name them by index.
//!
//! Layout (all integers unsigned LEB128 varints of at most 10 bytes, the
//! form protobuf calls `varint`):
//!
//! ```text
//! version          1 byte, PACKED_VERSION
//! N                readings, at most BATCH_READINGS_MAX
//! S                strings, at most 3 N
//! S times:         length (1 to TOKEN_LEN_MAX), then that many bytes
//! N times, one reading:
//!   code           1 byte, the wire character: `{` `}` `(` `)`
//!   seq            the first reading's seq; then the step from the one
//!                  before, at least 1 (so seqs strictly increase)
//!   time           zigzag of the step from the time before, modulo 2^64
//!                  (the first reading's from 0), so times may go back
//!   id             index of the reading's CID or PID in the strings
//!   context        index of its context
//!   payer          0 for none, else 1 + index of the payer's CID or PID
//! ```
//!
//! Nothing may follow the last reading. A reading decodes to exactly what
//! the struct form with the same fields decodes to, and is refused for the
//! same reasons, so the readings digest, and with it exactly-once, do not
//! depend on the form a batch was sent in.

use std::collections::HashMap;

use super::{event_of, invalid_reading};
use crate::fault::Fault;
use crate::id::{Cid, Context, Payer, Pid, TOKEN_LEN_MAX};
use crate::reading::{Code, Event, Reading};

/// The only layout so far.
pub const PACKED_VERSION: u8 = 1;

/// Bytes the shortest reading takes: a code and five one-byte varints.
const READING_BYTES_MIN: usize = 6;

/// The readings in the packed layout.
pub fn encode(readings: &[Reading]) -> Vec<u8> {
    let mut strings: HashMap<&str, u64> = HashMap::new();
    let mut table: Vec<&str> = Vec::new();
    let mut index = |text| {
        *strings.entry(text).or_insert_with(|| {
            table.push(text);
            table.len() as u64 - 1
        })
    };
    let mut rows: Vec<u8> = Vec::with_capacity(readings.len() * 9);
    let mut previous_seq = None;
    let mut previous_time = 0u64;
    for reading in readings {
        rows.push(reading.event.code().as_char() as u8);
        let step = match previous_seq {
            None => reading.seq,
            Some(previous) => reading.seq.wrapping_sub(previous),
        };
        previous_seq = Some(reading.seq);
        put(&mut rows, step);
        put(
            &mut rows,
            zigzag(reading.time_ms.wrapping_sub(previous_time)),
        );
        previous_time = reading.time_ms;
        put(&mut rows, index(reading.event.id_str()));
        put(&mut rows, index(reading.context.as_str()));
        let payer = match &reading.event {
            Event::Query { payer, .. } | Event::Commit { payer, .. } => payer.as_ref(),
            Event::Login(_) | Event::Logout(_) => None,
        };
        put(
            &mut rows,
            payer.map_or(0, |payer| 1 + index(payer.as_str())),
        );
    }
    let mut out = Vec::with_capacity(rows.len() + 32 * table.len() + 16);
    out.push(PACKED_VERSION);
    put(&mut out, readings.len() as u64);
    put(&mut out, table.len() as u64);
    for text in &table {
        put(&mut out, text.len() as u64);
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(&rows);
    out
}

/// Decodes a packed block, with the same faults as the struct form:
/// `InvalidReading` naming the reading for a bad one, `InvalidParams` for a
/// block that is not in the layout, `BatchTooLarge` for too many readings.
pub fn decode(block: &[u8]) -> Result<Vec<Reading>, Fault> {
    let mut r = Reader { rest: block };
    let version = r.byte().ok_or_else(|| malformed("it is empty"))?;
    if version != PACKED_VERSION {
        return Err(malformed(format!(
            "layout version {version}; this backoffice reads version {PACKED_VERSION}"
        )));
    }
    let count = r.varint().ok_or_else(|| malformed("no reading count"))?;
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    super::check_count(count)?;
    let string_count = r.varint().ok_or_else(|| malformed("no string count"))?;
    if string_count > 3 * count as u64 {
        return Err(malformed(format!(
            "{string_count} strings for {count} readings (at most 3 per reading)"
        )));
    }
    // Sized by what the rest of the block can hold (a string takes at
    // least 2 bytes), not by what it claims.
    let mut strings: Vec<&str> = Vec::with_capacity((string_count as usize).min(r.rest.len() / 2));
    for number in 0..string_count {
        let text = r
            .string()
            .ok_or_else(|| malformed(format!("string {} is cut short or too long", number + 1)))?;
        strings.push(text);
    }
    // A reading takes at least READING_BYTES_MIN bytes: a count the rest
    // cannot hold is refused before anything is sized from it.
    if r.rest.len() < count.saturating_mul(READING_BYTES_MIN) {
        return Err(malformed(format!(
            "{count} readings cannot fit in the {} bytes left",
            r.rest.len()
        )));
    }
    let mut table = Table::new(&strings);
    let mut readings = Vec::with_capacity(count);
    let mut previous_seq: Option<u64> = None;
    let mut previous_time = 0u64;
    for index in 0..count {
        let cut = || invalid_reading(index, "the packed block ends inside this reading");
        let code = r.byte().ok_or_else(cut)?;
        let code = Code::from_char(char::from(code))
            .ok_or_else(|| invalid_reading(index, "code must be one of { } ( )"))?;
        let step = r.varint().ok_or_else(cut)?;
        let seq = match previous_seq {
            None => step,
            Some(previous) => match previous.checked_add(step) {
                Some(seq) if step > 0 => seq,
                _ => return Err(invalid_reading(index, "seq must increase within a batch")),
            },
        };
        previous_seq = Some(seq);
        let time_ms = previous_time.wrapping_add(unzigzag(r.varint().ok_or_else(cut)?));
        previous_time = time_ms;
        let id = r.varint().ok_or_else(cut)?;
        let context = r.varint().ok_or_else(cut)?;
        let payer = r.varint().ok_or_else(cut)?;
        let payer = match payer {
            0 => None,
            at => Some(table.payer(at - 1, index)?),
        };
        let event = table.event(code, id, payer, index)?;
        readings.push(Reading {
            seq,
            time_ms,
            context: table.context(context, index)?,
            event,
        });
    }
    if !r.rest.is_empty() {
        return Err(malformed(format!(
            "{} bytes follow the last reading",
            r.rest.len()
        )));
    }
    Ok(readings)
}

fn malformed(reason: impl std::fmt::Display) -> Fault {
    Fault::invalid_params(format!(
        "send: packedReadings is not a packed block: {reason}"
    ))
}

/// The string table, each entry parsed when first used and kept in the
/// form it was last used as (an ID is parsed again only when the same
/// string is used as two kinds): one small entry per string, so a block
/// of many strings costs little more than its bytes.
struct Table<'a> {
    strings: &'a [&'a str],
    parsed: Vec<Parsed>,
}

#[derive(Clone)]
enum Parsed {
    Not,
    Customer(Cid),
    Product(Pid),
    Context(Context),
}

impl<'a> Table<'a> {
    fn new(strings: &'a [&'a str]) -> Self {
        Table {
            strings,
            parsed: vec![Parsed::Not; strings.len()],
        }
    }

    fn text(&self, at: u64, index: usize) -> Result<(usize, &'a str), Fault> {
        usize::try_from(at)
            .ok()
            .and_then(|at| Some((at, *self.strings.get(at)?)))
            .ok_or_else(|| {
                invalid_reading(
                    index,
                    format!(
                        "string {at} is not in the block's {} strings",
                        self.strings.len()
                    ),
                )
            })
    }

    fn payer(&mut self, at: u64, index: usize) -> Result<Payer, Fault> {
        let (at, text) = self.text(at, index)?;
        match &self.parsed[at] {
            Parsed::Customer(cid) => return Ok(Payer::Customer(*cid)),
            Parsed::Product(pid) => return Ok(Payer::OwnerOf(*pid)),
            Parsed::Not | Parsed::Context(_) => {}
        }
        let payer = Payer::parse(text).map_err(|error| invalid_reading(index, error))?;
        self.parsed[at] = match payer {
            Payer::Customer(cid) => Parsed::Customer(cid),
            Payer::OwnerOf(pid) => Parsed::Product(pid),
        };
        Ok(payer)
    }

    fn context(&mut self, at: u64, index: usize) -> Result<Context, Fault> {
        let (at, text) = self.text(at, index)?;
        if let Parsed::Context(context) = &self.parsed[at] {
            return Ok(context.clone());
        }
        let context = Context::parse(text).map_err(|error| invalid_reading(index, error))?;
        self.parsed[at] = Parsed::Context(context.clone());
        Ok(context)
    }

    /// The event for `code`, its ID parsed as the kind the code needs, with
    /// `event_of`'s checks (no payer on a login or logout).
    fn event(
        &mut self,
        code: Code,
        at: u64,
        payer: Option<Payer>,
        index: usize,
    ) -> Result<Event, Fault> {
        let (at, text) = self.text(at, index)?;
        let event = match (code, &self.parsed[at], payer) {
            (Code::Login, Parsed::Customer(cid), None) => Event::Login(*cid),
            (Code::Logout, Parsed::Customer(cid), None) => Event::Logout(*cid),
            (Code::Query, Parsed::Product(pid), payer) => Event::Query { pid: *pid, payer },
            (Code::Commit, Parsed::Product(pid), payer) => Event::Commit { pid: *pid, payer },
            _ => event_of(code, text, payer, index)?,
        };
        self.parsed[at] = match event {
            Event::Login(cid) | Event::Logout(cid) => Parsed::Customer(cid),
            Event::Query { pid, .. } | Event::Commit { pid, .. } => Parsed::Product(pid),
        };
        Ok(event)
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(first)
    }

    /// An unsigned LEB128 value of at most 10 bytes that fits a u64.
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return None;
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// A length-prefixed string of 1 to TOKEN_LEN_MAX printable ASCII bytes.
    fn string(&mut self) -> Option<&'a str> {
        let length = usize::try_from(self.varint()?).ok()?;
        if length == 0 || length > TOKEN_LEN_MAX || length > self.rest.len() {
            return None;
        }
        let (text, rest) = self.rest.split_at(length);
        self.rest = rest;
        if !text.iter().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        std::str::from_utf8(text).ok()
    }
}

fn put(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

const fn zigzag(step: u64) -> u64 {
    let signed = step as i64;
    ((signed << 1) ^ (signed >> 63)) as u64
}

const fn unzigzag(value: u64) -> u64 {
    (value >> 1) ^ (value & 1).wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::FaultCode;
    use crate::upload::BATCH_READINGS_MAX;

    fn reading(seq: u64, time_ms: u64, context: &str, event: Event) -> Reading {
        Reading {
            seq,
            time_ms,
            context: Context::parse(context).unwrap(),
            event,
        }
    }

    fn cid(text: &str) -> Cid {
        Cid::parse(text).unwrap()
    }

    fn pid(text: &str) -> Pid {
        Pid::parse(text).unwrap()
    }

    fn sample() -> Vec<Reading> {
        let customer = Some(Payer::Customer(cid("B1-C3")));
        vec![
            reading(7, 1_700_000_000_000, "pid:1", Event::Login(cid("B1-C3"))),
            reading(
                8,
                1_700_000_000_005,
                "pid:1",
                Event::Query {
                    pid: pid("B1-P2"),
                    payer: customer,
                },
            ),
            // A clock that stepped back, and a component paid by its product's owner.
            reading(
                9,
                1_699_999_999_000,
                "pid:1:thread:2",
                Event::Commit {
                    pid: pid("B1-P9"),
                    payer: Some(Payer::OwnerOf(pid("B1-P2"))),
                },
            ),
            reading(
                1_000,
                1_700_000_000_010,
                "pid:1",
                Event::Commit {
                    pid: pid("B1-P2"),
                    payer: customer,
                },
            ),
            reading(
                1_001,
                1_700_000_000_010,
                "pid:1",
                Event::Query {
                    pid: pid("B1-P2"),
                    payer: None,
                },
            ),
            reading(u64::MAX, u64::MAX, "pid:1", Event::Logout(cid("B1-C3"))),
        ]
    }

    #[test]
    fn readings_come_back_as_they_went() {
        let readings = sample();
        let block = encode(&readings);
        assert_eq!(decode(&block), Ok(readings.clone()));
        // Each string is written once: 3 IDs, 2 contexts, B1-C3 shared by
        // logins and payers, and B1-P2 by uses and an owner's payment.
        assert_eq!(block[2], 5, "strings in the table");
        assert_eq!(decode(&encode(&[])), Ok(Vec::new()));
        let mut many = Vec::new();
        for seq in 0..20_000u64 {
            many.push(reading(
                seq * 3,
                1_700_000_000_000 + seq / 7,
                &format!("pid:{}", seq % 40),
                Event::Commit {
                    pid: pid(&format!("B1-P{}", seq % 100)),
                    payer: Some(Payer::Customer(cid(&format!("B1-C{}", seq % 1000)))),
                },
            ));
        }
        let block = encode(&many);
        assert!(block.len() < 12 * many.len(), "{} bytes", block.len());
        assert_eq!(decode(&block), Ok(many));
    }

    #[test]
    fn zigzag_steps_cover_every_u64() {
        for step in [0, 1, 2, u64::MAX, u64::MAX - 1, 1 << 63, (1 << 63) - 1] {
            assert_eq!(unzigzag(zigzag(step)), step);
        }
        assert_eq!(zigzag(u64::MAX), 1, "a step of -1 is small");
    }

    fn fault_of(block: &[u8]) -> Fault {
        decode(block).expect_err("refused")
    }

    #[test]
    fn a_bad_block_is_refused_with_what_is_wrong() {
        let good = encode(&sample());
        // Every cut of a good block is refused, never read short.
        for end in 0..good.len() {
            let fault = fault_of(&good[..end]);
            assert!(
                matches!(
                    fault.registered(),
                    Some(FaultCode::InvalidParams | FaultCode::InvalidReading)
                ),
                "{end}: {fault}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(fault_of(&longer).message.contains("1 bytes follow"));
        let mut version = good.clone();
        version[0] = 2;
        assert!(fault_of(&version).message.contains("layout version 2"));

        // Too many readings for the batch limit, or for the bytes that follow.
        let mut huge = vec![PACKED_VERSION];
        put(&mut huge, BATCH_READINGS_MAX as u64 + 1);
        assert_eq!(fault_of(&huge).registered(), Some(FaultCode::BatchTooLarge));
        let mut short = vec![PACKED_VERSION];
        put(&mut short, 40_000);
        put(&mut short, 0);
        assert!(fault_of(&short).message.contains("cannot fit"));
        let mut strings = vec![PACKED_VERSION, 1];
        put(&mut strings, 4);
        assert!(
            fault_of(&strings)
                .message
                .contains("4 strings for 1 readings")
        );
        // A varint longer than a u64.
        let mut long = vec![PACKED_VERSION];
        long.extend_from_slice(&[0xff; 10]);
        long.push(1);
        assert!(fault_of(&long).message.contains("no reading count"));
    }

    /// A block with one string table and one reading of the given fields.
    fn one(strings: &[&str], row: &[u8]) -> Vec<u8> {
        let mut block = vec![PACKED_VERSION, 1];
        put(&mut block, strings.len() as u64);
        for text in strings {
            put(&mut block, text.len() as u64);
            block.extend_from_slice(text.as_bytes());
        }
        block.extend_from_slice(row);
        block
    }

    #[test]
    fn a_bad_reading_is_refused_as_the_struct_form_refuses_it() {
        // "B1-C3" is also a valid context; "a/b" is not.
        let strings = ["B1-C3", "a/b", "B1-P2"];
        let ok = one(&strings, &[b')', 5, 0, 2, 0, 1]);
        assert!(decode(&ok).is_ok());
        for (row, says) in [
            (&[b'x', 5, 0, 2, 0, 1][..], "code must be one of"),
            (&[b')', 5, 0, 0, 0, 1][..], "invalid PID"),
            (&[b'{', 5, 0, 2, 0, 0][..], "invalid CID"),
            (&[b'{', 5, 0, 0, 0, 1][..], "no payer"),
            (&[b')', 5, 0, 2, 1, 1][..], "invalid context"),
            (&[b')', 5, 0, 2, 0, 4][..], "string 3 is not in"),
            (&[b')', 5, 0, 9, 0, 1][..], "string 9 is not in"),
        ] {
            let fault = fault_of(&one(&strings, row));
            assert_eq!(
                fault.registered(),
                Some(FaultCode::InvalidReading),
                "{row:?}"
            );
            assert!(
                fault.message.starts_with("reading 1: ") && fault.message.contains(says),
                "{row:?}: {}",
                fault.message
            );
        }
        // Strings: empty, too long, not printable.
        for text in ["", &"x".repeat(TOKEN_LEN_MAX + 1), "B1 C3", "B1-C\u{e9}"] {
            let fault = fault_of(&one(&[text], &[b'{', 5, 0, 0, 0, 0]));
            assert!(
                fault.message.contains("string 1 is cut short or too long"),
                "{text:?}"
            );
        }
        // The seq must increase: a second reading with a step of 0, and one
        // whose step overflows.
        for step in [0u64, u64::MAX] {
            let mut block = vec![PACKED_VERSION, 2, 2, 5];
            block.extend_from_slice(b"B1-C3");
            block.push(5);
            block.extend_from_slice(b"pid:1");
            block.extend_from_slice(&[b'{', 5, 0, 0, 1, 0, b'}']);
            put(&mut block, step);
            block.extend_from_slice(&[0, 0, 1, 0]);
            let fault = fault_of(&block);
            assert_eq!(
                fault.message, "reading 2: seq must increase within a batch",
                "step {step}"
            );
        }
    }
}
