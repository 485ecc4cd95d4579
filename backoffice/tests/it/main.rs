//! The backoffice test binary.

mod cli;
mod examples;
mod pricing;
