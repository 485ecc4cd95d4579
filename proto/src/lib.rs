//! `proto`: the API boundary between metered programs, `meterd` and the
//! `backoffice`. Typed IDs, exact amounts, meter readings, and the XML-RPC codec
//! with its fault registry, and upload signatures. This crate does no I/O and knows nothing of tokio,
//! sled or wasmtime: it turns bytes into typed values and back.
#![forbid(unsafe_code)]

pub mod amount;
pub mod auth;
pub mod fault;
pub mod grant;
pub mod id;
pub mod meter_api;
pub mod params;
pub mod parlayx;
pub mod reading;
pub mod record;
pub mod soap;
pub mod time;
pub mod upload;
pub mod xmlrpc;

pub use amount::{Amount, AmountError};
pub use fault::{Fault, FaultCode};
pub use id::{BatchId, Bid, Cid, Context, IdError, Mid, Payer, Pid};
pub use reading::{Code, Event, Reading};
