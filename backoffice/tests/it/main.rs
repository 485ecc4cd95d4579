//! The backoffice test binary.

mod bounds;
mod cli;
mod examples;
mod ledger;
mod pricing;
mod send;
