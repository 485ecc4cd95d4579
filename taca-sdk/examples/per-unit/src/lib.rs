//! Price per unit of volume, by unit: 0.002 per megabyte, 0.0001 per second,
//! 0.001 per call; any other unit is refused (the reading goes to suspense).
#![no_std]

use taca_sdk::{Code, Input, Outcome, Price, Refusal};

/// Prices a reading.
pub fn price(input: &Input<'_>) -> Outcome {
    if input.code != Code::Commit {
        return Ok(Price::ZERO);
    }
    let per_unit = match input.unit {
        "MB" => Price::from_nanos(2_000_000),
        "s" => Price::from_nanos(100_000),
        "" | "call" => Price::from_nanos(1_000_000),
        _ => return Err(Refusal::UNSUPPORTED_UNIT),
    };
    per_unit
        .checked_mul(input.volume)
        .ok_or(Refusal::NOT_PRICED)
}

taca_sdk::taca!(price);
