//! Flat price: 0.25 per committed use, nothing for anything else.
#![no_std]

use taca_sdk::{Code, Input, Outcome, Price};

/// The price of one use.
pub const PRICE_PER_USE: Price = Price::from_nanos(250_000_000);

/// Prices a reading.
pub fn price(input: &Input<'_>) -> Outcome {
    match input.code {
        Code::Commit => Ok(PRICE_PER_USE),
        _ => Ok(Price::ZERO),
    }
}

taca_sdk::taca!(price);
