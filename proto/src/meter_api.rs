//! The meter's local API (Cox's meter calls), decoded from and encoded to
//! XML-RPC in this one place.
//!
//! `login(CID)`, `logout(CID)` (also `logoff`), `query(PID) -> boolean`,
//! `commit(PID)`, `flush() -> boolean`, `status()`, and our extension
//! `cancel(PID) -> boolean`, which closes a query without a use. All calls
//! with an ID take an optional second parameter, an explicit context (see
//! meterd's docs on contexts); without it the meter uses the caller's process.

use crate::fault::Fault;
use crate::id::{Cid, Context, Pid};
use crate::params::Params;
use crate::xmlrpc::{MethodCall, Value};

/// One call to the meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeterCall {
    /// A customer starts a session: uses are charged to this CID.
    Login {
        /// The customer.
        cid: Cid,
        /// An explicit context, if the caller names one.
        context: Option<Context>,
    },
    /// The customer's session ends.
    Logout {
        /// The customer.
        cid: Cid,
        /// An explicit context, if the caller names one.
        context: Option<Context>,
    },
    /// May a use of this product begin? Opens a nesting level.
    Query {
        /// The product.
        pid: Pid,
        /// An explicit context, if the caller names one.
        context: Option<Context>,
    },
    /// The use of this product happened: record it durably.
    Commit {
        /// The product.
        pid: Pid,
        /// An explicit context, if the caller names one.
        context: Option<Context>,
    },
    /// Closes an open query of this product without a use (not charged).
    Cancel {
        /// The product.
        pid: Pid,
        /// An explicit context, if the caller names one.
        context: Option<Context>,
    },
    /// Upload now and refresh the status table.
    Flush,
    /// The meter's state, for operators.
    Status,
}

impl MeterCall {
    /// Decodes a call; an unknown method or a bad parameter is a fault.
    pub fn from_call(call: &MethodCall) -> Result<MeterCall, Fault> {
        let name = call.name.as_str();
        let params = Params::new(name, &call.params);
        let decoded = match name {
            "login" => MeterCall::Login {
                cid: with_context(&params)?,
                context: params.optional_parsed(1)?,
            },
            "logout" | "logoff" => MeterCall::Logout {
                cid: with_context(&params)?,
                context: params.optional_parsed(1)?,
            },
            "query" => MeterCall::Query {
                pid: with_context(&params)?,
                context: params.optional_parsed(1)?,
            },
            "commit" => MeterCall::Commit {
                pid: with_context(&params)?,
                context: params.optional_parsed(1)?,
            },
            "cancel" => MeterCall::Cancel {
                pid: with_context(&params)?,
                context: params.optional_parsed(1)?,
            },
            "flush" => {
                params.arity(0, 0)?;
                MeterCall::Flush
            }
            "status" => {
                params.arity(0, 0)?;
                MeterCall::Status
            }
            _ => return Err(Fault::method_not_found(name)),
        };
        Ok(decoded)
    }

    /// The method name and parameters, for clients.
    pub fn to_call(&self) -> (&'static str, Vec<Value>) {
        let with = |id: &str, context: &Option<Context>| {
            let mut params = vec![Value::string(id)];
            if let Some(context) = context {
                params.push(Value::string(context.as_str()));
            }
            params
        };
        match self {
            MeterCall::Login { cid, context } => ("login", with(cid.as_str(), context)),
            MeterCall::Logout { cid, context } => ("logout", with(cid.as_str(), context)),
            MeterCall::Query { pid, context } => ("query", with(pid.as_str(), context)),
            MeterCall::Commit { pid, context } => ("commit", with(pid.as_str(), context)),
            MeterCall::Cancel { pid, context } => ("cancel", with(pid.as_str(), context)),
            MeterCall::Flush => ("flush", Vec::new()),
            MeterCall::Status => ("status", Vec::new()),
        }
    }
}

/// The ID in parameter 1 of a call that also takes an optional context.
fn with_context<T>(params: &Params<'_>) -> Result<T, Fault>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    params.arity(1, 2)?;
    params.parsed(0)
}
