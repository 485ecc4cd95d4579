//! The backoffice test binary.

mod bounds;
mod cli;
mod examples;
mod ledger;
mod postgres;
mod pricing;
mod send;
