//! Tiered by use in the billing period: the first 10 uses are free, uses 11
//! to 100 cost 0.05 each, and every use after that 0.02.
#![no_std]

use taca_sdk::{Code, Input, Outcome, Price};

/// Uses per period that cost nothing.
pub const FREE_USES: u64 = 10;
/// Uses per period (free ones included) at the standard price.
pub const STANDARD_USES: u64 = 100;

/// Prices a reading.
pub fn price(input: &Input<'_>) -> Outcome {
    if input.code != Code::Commit {
        return Ok(Price::ZERO);
    }
    // `period_uses` counts the uses before this one.
    let nanos = match input.period_uses {
        uses if uses < FREE_USES => 0,
        uses if uses < STANDARD_USES => 50_000_000,
        _ => 20_000_000,
    };
    Ok(Price::from_nanos(nanos))
}

taca_sdk::taca!(price);
