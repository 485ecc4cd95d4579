//! Servers and programs for the end-to-end tests, which run the real
//! binaries: `validator1` (the XML-RPC conformance server on `proto`'s codec),
//! `fake_backoffice` (a stand-in for `send` until the backoffice exists) and
//! the `metered-demo` program that uses the meter's client library.
#![forbid(unsafe_code)]

pub mod fake_backoffice;
pub mod http_rpc;
pub mod validator1;
