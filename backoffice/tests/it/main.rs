//! The backoffice test binary.

mod backup;
mod bounds;
mod cli;
mod examples;
mod holds;
mod ledger;
mod postgres;
mod pricing;
mod send;
