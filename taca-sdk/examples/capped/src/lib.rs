//! Capped monthly price: 0.30 per use, but never more than 9.00 in a billing
//! period; once the cap is reached, further uses that period are free.
#![no_std]

use taca_sdk::{Code, Input, Outcome, Price, Refusal};

/// The price of one use.
pub const PRICE_PER_USE: Price = Price::from_nanos(300_000_000);
/// The most one payer pays in a period.
pub const CAP: Price = Price::from_nanos(9_000_000_000);

/// Prices a reading.
pub fn price(input: &Input<'_>) -> Outcome {
    if input.code != Code::Commit {
        return Ok(Price::ZERO);
    }
    let paid = PRICE_PER_USE
        .checked_mul(input.period_uses)
        .ok_or(Refusal::NOT_PRICED)?;
    let left = CAP.saturating_sub(paid);
    Ok(if left < PRICE_PER_USE {
        left
    } else {
        PRICE_PER_USE
    })
}

taca_sdk::taca!(price);
