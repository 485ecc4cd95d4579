//! The backoffice test binary.

mod examples;
mod pricing;
