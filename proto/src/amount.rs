//! `Amount`: an exact monetary value at the fixed ledger scale.
//!
//! Every amount has exactly [`Amount::SCALE`] (9) decimal places: a billionth of
//! the currency unit, so single invocations can cost fractions of a cent. Its
//! magnitude stays below 10^18 units, so any sum or difference of two amounts
//! fits `rust_decimal` exactly and overflow is reported, never wrapped or
//! rounded. There is no conversion from or to floating point.
//!
//! Rounding happens only where a value is shown or settled, through
//! [`Amount::round_dp`], with round-half-to-even ("banker's rounding"), which
//! has no bias over many settlements.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an amount could not be parsed or computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Not a plain decimal: optional `-`, digits, optional `.` and digits.
    #[error("not a decimal amount (expected digits such as 12.5 or -0.000000001)")]
    Syntax,
    /// More decimal places than the ledger scale keeps.
    #[error("more than {} decimal places", Amount::SCALE)]
    TooPrecise,
    /// The magnitude would reach 10^18 units or more.
    #[error("amount out of range (magnitude must stay below 10^18)")]
    Overflow,
    /// A split into zero parts was asked for.
    #[error("cannot split into zero parts")]
    ZeroParts,
}

/// An exact monetary amount at the ledger scale (9 decimal places).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Amount(Decimal);

/// Digits allowed before the decimal point.
const INTEGER_DIGITS_MAX: usize = 18;

impl Amount {
    /// Decimal places of every amount in the ledger.
    pub const SCALE: u32 = 9;
    /// Zero.
    pub const ZERO: Amount = Amount(Decimal::from_parts(0, 0, 0, false, Self::SCALE));

    fn limit() -> Decimal {
        Decimal::from_i128_with_scale(10i128.pow(27), Self::SCALE)
    }

    fn checked(value: Decimal) -> Result<Self, AmountError> {
        if value.abs() >= Self::limit() {
            return Err(AmountError::Overflow);
        }
        let mut value = value;
        value.rescale(Self::SCALE);
        Ok(Self(value))
    }

    /// Builds an amount from a count of billionths of the unit (10^-9).
    pub fn from_nanos(nanos: i64) -> Self {
        // |i64| < 10^19 nanos = 10^10 units, always in range.
        Self(Decimal::from_i128_with_scale(
            i128::from(nanos),
            Self::SCALE,
        ))
    }

    /// Builds an amount from a count of billionths, or `Overflow` when its
    /// magnitude reaches 10^18 units.
    pub fn try_from_nanos(nanos: i128) -> Result<Self, AmountError> {
        let limit = 10i128.pow(27);
        if nanos <= -limit || nanos >= limit {
            return Err(AmountError::Overflow);
        }
        Ok(Self(Decimal::from_i128_with_scale(nanos, Self::SCALE)))
    }

    /// Builds an amount from whole units.
    pub fn from_units(units: i64) -> Result<Self, AmountError> {
        Self::checked(Decimal::from(units))
    }

    /// The amount as a count of billionths of the unit.
    pub fn nanos(&self) -> i128 {
        let mut value = self.0;
        value.rescale(Self::SCALE);
        value.mantissa()
    }

    /// The exact decimal value.
    pub fn to_decimal(&self) -> Decimal {
        self.0
    }

    /// Accepts a decimal only if it has at most 9 places and is in range.
    pub fn try_from_decimal(value: Decimal) -> Result<Self, AmountError> {
        if value.normalize().scale() > Self::SCALE {
            return Err(AmountError::TooPrecise);
        }
        Self::checked(value)
    }

    /// Parses the wire form: `-?[0-9]{1,18}(\.[0-9]{1,9})?`. No exponent, no
    /// sign `+`, no separators, no surrounding space.
    pub fn parse(text: &str) -> Result<Self, AmountError> {
        let bytes = text.as_bytes();
        let (negative, unsigned) = match bytes.first() {
            Some(b'-') => (true, &bytes[1..]),
            _ => (false, bytes),
        };
        let (integer, fraction) = match unsigned.iter().position(|&b| b == b'.') {
            Some(dot) => (&unsigned[..dot], Some(&unsigned[dot + 1..])),
            None => (unsigned, None),
        };
        let all_digits = |part: &[u8]| !part.is_empty() && part.iter().all(u8::is_ascii_digit);
        if !all_digits(integer) || fraction.is_some_and(|part| !all_digits(part)) {
            return Err(AmountError::Syntax);
        }
        let fraction = fraction.unwrap_or(b"");
        if fraction.len() > Self::SCALE as usize {
            let significant = fraction[Self::SCALE as usize..].iter().any(|&b| b != b'0');
            if significant {
                return Err(AmountError::TooPrecise);
            }
        }
        let integer = trim_leading_zeros(integer);
        if integer.len() > INTEGER_DIGITS_MAX {
            return Err(AmountError::Overflow);
        }
        let mut nanos: i128 = 0;
        for &digit in integer {
            nanos = nanos * 10 + i128::from(digit - b'0');
        }
        for place in 0..Self::SCALE as usize {
            let digit = fraction.get(place).map_or(0, |&b| i128::from(b - b'0'));
            nanos = nanos * 10 + digit;
        }
        if negative {
            nanos = -nanos;
        }
        Self::checked(Decimal::from_i128_with_scale(nanos, Self::SCALE))
    }

    /// `self + other`, or `Overflow`.
    pub fn checked_add(self, other: Amount) -> Result<Amount, AmountError> {
        Self::checked(self.0 + other.0)
    }

    /// `self - other`, or `Overflow`.
    pub fn checked_sub(self, other: Amount) -> Result<Amount, AmountError> {
        Self::checked(self.0 - other.0)
    }

    /// `self * count` for a whole count (a volume, a number of uses).
    pub fn checked_mul_count(self, count: u64) -> Result<Amount, AmountError> {
        let product = self
            .0
            .checked_mul(Decimal::from(count))
            .ok_or(AmountError::Overflow)?;
        Self::checked(product)
    }

    /// The amount with its sign flipped.
    pub fn negated(self) -> Amount {
        Self(-self.0)
    }

    /// True for zero.
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }

    /// True for amounts below zero.
    pub fn is_negative(&self) -> bool {
        self.0.is_sign_negative() && !self.0.is_zero()
    }

    /// True for amounts above zero.
    pub fn is_positive(&self) -> bool {
        self.0.is_sign_positive() && !self.0.is_zero()
    }

    /// Rounds to `places` decimal places, half to even, for showing or
    /// settling. The ledger itself never rounds.
    pub fn round_dp(&self, places: u32) -> Decimal {
        self.0
            .round_dp_with_strategy(places, RoundingStrategy::MidpointNearestEven)
    }

    /// Splits into `parts` amounts that differ by at most one nano and sum
    /// exactly to `self`; the larger parts come first (10.00 / 3 = 3.333333334
    /// + 3.333333333 + 3.333333333).
    pub fn split(self, parts: u32) -> Result<Vec<Amount>, AmountError> {
        if parts == 0 {
            return Err(AmountError::ZeroParts);
        }
        let total = self.nanos();
        let count = i128::from(parts);
        let base = total / count;
        let remainder = total % count;
        let step = remainder.signum();
        let extra = remainder.unsigned_abs();
        let shares = (0..parts)
            .map(|index| {
                let nanos = if u128::from(index) < extra {
                    base + step
                } else {
                    base
                };
                Amount(Decimal::from_i128_with_scale(nanos, Self::SCALE))
            })
            .collect();
        Ok(shares)
    }
}

fn trim_leading_zeros(digits: &[u8]) -> &[u8] {
    let first = digits
        .iter()
        .position(|&b| b != b'0')
        .unwrap_or(digits.len());
    &digits[first..]
}

impl FromStr for Amount {
    type Err = AmountError;
    fn from_str(text: &str) -> Result<Self, AmountError> {
        Self::parse(text)
    }
}

/// The wire and display form: the shortest exact decimal, for example `12.5`,
/// `0.000000001`, `-3`. `parse` accepts it back unchanged.
impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let normalized = self.0.normalize();
        if normalized.is_zero() {
            return f.write_str("0");
        }
        write!(f, "{normalized}")
    }
}

impl fmt::Debug for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Amount({self})")
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}
