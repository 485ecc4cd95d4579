//! The backoffice test binary.

mod cli;
mod examples;
mod ledger;
mod pricing;
mod send;
