//! `taca-sdk`: what a producer compiles to `wasm32-unknown-unknown` to price
//! uses of their product. `no_std`, no allocator, no imports. This crate grows
//! the ABI module and the export macro; for now it holds the price type.
#![no_std]
#![forbid(unsafe_code)]

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
