//! A product with a free test PID: 0.01 per use, except under the product's
//! test PID (which ends in `T`), where integration tests cost nothing.
#![no_std]

use taca_sdk::{Code, Input, Outcome, Price};

/// Prices a reading.
pub fn price(input: &Input<'_>) -> Outcome {
    if input.is_test_pid() || input.code != Code::Commit {
        return Ok(Price::ZERO);
    }
    Ok(Price::from_nanos(10_000_000))
}

taca_sdk::taca!(price);
