//! The proto test binary: one module per part of the crate.

mod amount;
mod codec;
mod faults;
mod ids;
mod meter_api;
mod roundtrip;
mod upload;
