//! The backoffice test binary.

mod backup;
mod bounds;
mod cli;
mod examples;
mod ledger;
mod postgres;
mod pricing;
mod send;
