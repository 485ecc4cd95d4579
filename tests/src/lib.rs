//! Servers and helpers for the end-to-end tests, which run the real binaries.
//! `validator1` is the XML-RPC conformance server built on `proto`'s codec.
#![forbid(unsafe_code)]

pub mod http_rpc;
pub mod validator1;
