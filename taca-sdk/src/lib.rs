//! `taca-sdk`: write a TACA (a product's pricing function) as one plain Rust
//! function and build it for `wasm32-unknown-unknown`:
//!
//! ```
//! use taca_sdk::{Code, Input, Outcome, Price};
//!
//! fn price(input: &Input<'_>) -> Outcome {
//!     match input.code {
//!         Code::Commit => Ok(Price::from_nanos(1_000_000)), // 0.001 per use
//!         _ => Ok(Price::ZERO),
//!     }
//! }
//!
//! taca_sdk::taca!(price);
//! ```
//!
//! `no_std`, no allocator, no imports: the module is a pure function of its
//! input, as `docs/taca-abi.md` requires. All `unsafe` is in `abi`.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod abi;

/// A price in billionths of the currency unit: the ledger's fixed scale of 9
/// decimal places, as an integer, so no float is ever involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Price(i64);

/// Billionths per whole currency unit.
pub const NANOS_PER_UNIT: i64 = 1_000_000_000;

impl Price {
    /// Free.
    pub const ZERO: Price = Price(0);

    /// A price of `nanos` billionths of the unit.
    pub const fn from_nanos(nanos: i64) -> Price {
        Price(nanos)
    }

    /// `units` whole units plus `nanos` billionths, or `None` on overflow.
    pub const fn new(units: i64, nanos: i64) -> Option<Price> {
        match units.checked_mul(NANOS_PER_UNIT) {
            Some(whole) => match whole.checked_add(nanos) {
                Some(total) => Some(Price(total)),
                None => None,
            },
            None => None,
        }
    }

    /// The price in billionths of the unit.
    pub const fn nanos(self) -> i64 {
        self.0
    }

    /// `self * count`, or `None` on overflow.
    pub const fn checked_mul(self, count: u64) -> Option<Price> {
        if count > i64::MAX as u64 {
            return None;
        }
        match self.0.checked_mul(count as i64) {
            Some(total) => Some(Price(total)),
            None => None,
        }
    }

    /// `self + other`, or `None` on overflow.
    pub const fn checked_add(self, other: Price) -> Option<Price> {
        match self.0.checked_add(other.0) {
            Some(total) => Some(Price(total)),
            None => None,
        }
    }

    /// `self - other`, or zero when `other` is larger.
    pub const fn saturating_sub(self, other: Price) -> Price {
        let difference = self.0.saturating_sub(other.0);
        Price(if difference < 0 { 0 } else { difference })
    }
}

/// Cox's reading codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// `{`
    Login,
    /// `}`
    Logout,
    /// `(`
    Query,
    /// `)`: a committed use, what is normally charged.
    Commit,
}

/// Why a TACA does not price a reading (the reading goes to suspense).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal(pub u32);

impl Refusal {
    /// Not priced, no reason given.
    pub const NOT_PRICED: Refusal = Refusal(1);
    /// The reading code is not one this TACA prices.
    pub const UNSUPPORTED_CODE: Refusal = Refusal(2);
    /// The unit is not one this TACA prices.
    pub const UNSUPPORTED_UNIT: Refusal = Refusal(3);
    /// The input could not be read.
    pub const BAD_INPUT: Refusal = Refusal(4);
}

/// What a pricing function returns.
pub type Outcome = Result<Price, Refusal>;

/// Everything a TACA is told about one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input<'a> {
    /// What happened.
    pub code: Code,
    /// Units consumed; 1 for an invocation.
    pub volume: u64,
    /// The payer's uses of this PID earlier in the current billing period.
    pub period_uses: u64,
    /// Who pays (a CID).
    pub payer: &'a str,
    /// The product priced; a product's test PID ends in `T`.
    pub pid: &'a str,
    /// Parlay X rating parameter `unit`.
    pub unit: &'a str,
    /// Parlay X rating parameter `contract`.
    pub contract: &'a str,
    /// Parlay X rating parameter `service`.
    pub service: &'a str,
    /// Parlay X rating parameter `operation`.
    pub operation: &'a str,
}

impl Input<'_> {
    /// True for a product's free test PID.
    pub fn is_test_pid(&self) -> bool {
        self.pid.ends_with('T')
    }
}

/// Reads the ABI's input layout (`docs/taca-abi.md`). Safe code, usable on
/// any target; `abi` calls it on the module's input area.
pub fn decode(bytes: &[u8]) -> Result<Input<'_>, Refusal> {
    let mut reader = Reader(bytes);
    if reader.u32()? != abi::ABI_VERSION as u32 {
        return Err(Refusal::BAD_INPUT);
    }
    let code = match reader.u32()? {
        0x7b => Code::Login,
        0x7d => Code::Logout,
        0x28 => Code::Query,
        0x29 => Code::Commit,
        _ => return Err(Refusal::BAD_INPUT),
    };
    let volume = reader.u64()?;
    let period_uses = reader.u64()?;
    Ok(Input {
        code,
        volume,
        period_uses,
        payer: reader.text()?,
        pid: reader.text()?,
        unit: reader.text()?,
        contract: reader.text()?,
        service: reader.text()?,
        operation: reader.text()?,
    })
}

/// The ABI's result value for an outcome: the price, or the negated refusal.
pub fn encode_outcome(outcome: Outcome) -> i64 {
    match outcome {
        Ok(price) if price.nanos() >= 0 => price.nanos(),
        Ok(_) => -i64::from(Refusal::NOT_PRICED.0),
        Err(refusal) => -i64::from(refusal.0.max(1)),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], Refusal> {
        if self.0.len() < count {
            return Err(Refusal::BAD_INPUT);
        }
        let (head, rest) = self.0.split_at(count);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, Refusal> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64(&mut self) -> Result<u64, Refusal> {
        let bytes = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(array))
    }

    fn text(&mut self) -> Result<&'a str, Refusal> {
        let bytes = self.take(2)?;
        let len = usize::from(u16::from_le_bytes([bytes[0], bytes[1]]));
        core::str::from_utf8(self.take(len)?).map_err(|_| Refusal::BAD_INPUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input_bytes(code: u8, volume: u64, uses: u64, texts: [&str; 6]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&u32::from(code).to_le_bytes());
        bytes.extend_from_slice(&volume.to_le_bytes());
        bytes.extend_from_slice(&uses.to_le_bytes());
        for text in texts {
            bytes.extend_from_slice(&(text.len() as u16).to_le_bytes());
            bytes.extend_from_slice(text.as_bytes());
        }
        bytes
    }

    #[test]
    fn prices_are_exact_and_overflow_is_reported() {
        assert_eq!(
            Price::new(1, 500_000_000),
            Some(Price::from_nanos(1_500_000_000))
        );
        assert_eq!(
            Price::from_nanos(3).checked_mul(4),
            Some(Price::from_nanos(12))
        );
        assert_eq!(
            Price::from_nanos(i64::MAX).checked_add(Price::from_nanos(1)),
            None
        );
        assert_eq!(Price::new(i64::MAX / 1000, 0), None);
        assert_eq!(Price::from_nanos(2).checked_mul(u64::MAX), None);
        assert_eq!(
            Price::from_nanos(2).saturating_sub(Price::from_nanos(5)),
            Price::ZERO
        );
    }

    #[test]
    fn inputs_decode_and_bad_ones_are_refused() {
        let bytes = input_bytes(b')', 3, 9, ["B1-C1", "B1-P7T", "MB", "gold", "svc", "op"]);
        let input = decode(&bytes).unwrap();
        assert_eq!(input.code, Code::Commit);
        assert_eq!((input.volume, input.period_uses), (3, 9));
        assert_eq!(
            (input.payer, input.pid, input.unit),
            ("B1-C1", "B1-P7T", "MB")
        );
        assert_eq!(
            (input.contract, input.service, input.operation),
            ("gold", "svc", "op")
        );
        assert!(input.is_test_pid());
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut]),
                Err(Refusal::BAD_INPUT),
                "cut at {cut}"
            );
        }
        let bad_code = input_bytes(b'x', 1, 0, ["", "", "", "", "", ""]);
        assert_eq!(decode(&bad_code), Err(Refusal::BAD_INPUT));
    }

    #[test]
    fn outcomes_encode_as_the_abi_says() {
        assert_eq!(encode_outcome(Ok(Price::from_nanos(7))), 7);
        assert_eq!(encode_outcome(Err(Refusal::UNSUPPORTED_UNIT)), -3);
        assert_eq!(encode_outcome(Err(Refusal(0))), -1);
        assert_eq!(
            encode_outcome(Ok(Price::from_nanos(-5))),
            -1,
            "negative prices are refused"
        );
    }
}
