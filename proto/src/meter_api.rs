//! The meter's local API (Cox's meter calls), decoded from and encoded to
//! XML-RPC in this one place.
//!
//! `login(CID)`, `logout(CID)` (also `logoff`), `query(PID) -> boolean`,
//! `commit(PID)`, `flush() -> boolean`, `status()`, and our extension
//! `cancel(PID) -> boolean`, which closes a query without a use. All calls
//! with an ID take an optional second parameter, an explicit context (see
//! meterd's docs on contexts); without it the meter uses the caller's process.
//!
//! Grants (a customer's authorization for this meter to charge them, bound
//! to the local user who asked): `grant.start(CID[, machineWide])` ->
//! `GrantStarted`, then `grant.wait(request)` -> `{status, grant?}` (a
//! `PollStatus`) until it is not `pending`; `grant.password(CID, password[,
//! machineWide[, expiresInS]])` -> a `GrantInfo`; `grant.list()` -> the
//! grants this meter holds for the caller.

use std::fmt;

use crate::fault::Fault;
use crate::grant::{GrantInfo, PASSWORD_BYTES_MAX};
use crate::id::{Cid, Context, Pid};
use crate::params::Params;
use crate::xmlrpc::{MethodCall, Value};

/// Longest handle of a grant request, in bytes.
pub const GRANT_REQUEST_BYTES_MAX: usize = 64;

/// A customer's password on its way to the meter: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

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
    /// Asks the backoffice for a device code to grant `cid` to the caller
    /// (or, for root only, to every user of the machine).
    GrantStart {
        /// The customer who would pay.
        cid: Cid,
        /// A machine-wide grant (root only).
        machine_wide: bool,
    },
    /// Waits (a bounded time) for the customer to answer a grant request.
    GrantWait {
        /// The handle `grant.start` answered.
        request: String,
    },
    /// Grants `cid` to the caller with the customer's password.
    GrantPassword {
        /// The customer who pays.
        cid: Cid,
        /// The customer's web password.
        password: Password,
        /// A machine-wide grant (root only).
        machine_wide: bool,
        /// Seconds the grant lives; `None`: until revoked.
        expires_in_s: Option<u64>,
    },
    /// The grants this meter holds that admit the caller (every grant, for
    /// root).
    GrantList,
}

/// The answer to `grant.start`: what the customer must do, and the handle
/// for `grant.wait`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantStarted {
    /// The handle to wait on (only the user who started it may).
    pub request: String,
    /// What the customer types on the web pages (`XXXX-XXXX`).
    pub user_code: String,
    /// The page where the customer enters it.
    pub verification_uri: String,
    /// Seconds until the code expires.
    pub expires_in_s: u64,
}

fn bad_answer(what: impl fmt::Display) -> Fault {
    Fault::new(
        crate::fault::FaultCode::InvalidRequest,
        format!("meter answer: {what}"),
    )
}

impl GrantStarted {
    /// Encodes the answer.
    pub fn to_value(&self) -> Value {
        Value::structure([
            ("request", Value::string(self.request.as_str())),
            ("userCode", Value::string(self.user_code.as_str())),
            (
                "verificationUri",
                Value::string(self.verification_uri.as_str()),
            ),
            ("expiresInS", Value::string(self.expires_in_s.to_string())),
        ])
    }

    /// Decodes the answer.
    pub fn from_value(value: &Value) -> Result<GrantStarted, Fault> {
        let text = |name: &str| {
            value
                .member(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| bad_answer(format!("{name} missing")))
        };
        Ok(GrantStarted {
            request: text("request")?,
            user_code: text("userCode")?,
            verification_uri: text("verificationUri")?,
            expires_in_s: text("expiresInS")?
                .parse()
                .map_err(|_| bad_answer("expiresInS is not a count"))?,
        })
    }
}

/// Encodes the answer to `grant.list`: an array of grants.
pub fn grants_to_value(grants: &[GrantInfo]) -> Value {
    Value::Array(grants.iter().map(GrantInfo::to_value).collect())
}

/// Decodes the answer to `grant.list`.
pub fn grants_from_value(value: &Value) -> Result<Vec<GrantInfo>, Fault> {
    value
        .as_array()
        .ok_or_else(|| bad_answer("grant.list answers an array"))?
        .iter()
        .map(GrantInfo::from_value)
        .collect()
}

/// An optional boolean parameter (default false).
fn optional_bool(params: &Params<'_>, index: usize, values: &[Value]) -> Result<bool, Fault> {
    match values.get(index) {
        None => Ok(false),
        Some(Value::Bool(truth)) => Ok(*truth),
        Some(other) => Err(params.wrong_type(index, "boolean", other)),
    }
}

/// An optional count of seconds: an int or a decimal string.
fn optional_seconds(
    params: &Params<'_>,
    index: usize,
    values: &[Value],
) -> Result<Option<u64>, Fault> {
    match values.get(index) {
        None => Ok(None),
        Some(Value::Int(count)) => u64::try_from(*count)
            .map(Some)
            .map_err(|_| Fault::invalid_params("expiresInS must not be negative")),
        Some(Value::I8(count)) => u64::try_from(*count)
            .map(Some)
            .map_err(|_| Fault::invalid_params("expiresInS must not be negative")),
        Some(Value::String(_)) => params.optional_parsed(index),
        Some(other) => Err(params.wrong_type(index, "count of seconds", other)),
    }
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
            "grant.start" => {
                params.arity(1, 2)?;
                MeterCall::GrantStart {
                    cid: params.parsed(0)?,
                    machine_wide: optional_bool(&params, 1, &call.params)?,
                }
            }
            "grant.wait" => {
                params.arity(1, 1)?;
                let request = params.string(0)?;
                if request.is_empty()
                    || request.len() > GRANT_REQUEST_BYTES_MAX
                    || !request.bytes().all(|b| b.is_ascii_alphanumeric())
                {
                    return Err(Fault::invalid_params(
                        "grant.wait: the request is the handle grant.start answered",
                    ));
                }
                MeterCall::GrantWait {
                    request: request.to_owned(),
                }
            }
            "grant.password" => {
                params.arity(2, 4)?;
                let password = params.string(1)?;
                if password.is_empty() || password.len() > PASSWORD_BYTES_MAX {
                    return Err(Fault::invalid_params(format!(
                        "grant.password: the password has 1 to {PASSWORD_BYTES_MAX} bytes"
                    )));
                }
                MeterCall::GrantPassword {
                    cid: params.parsed(0)?,
                    password: Password(password.to_owned()),
                    machine_wide: optional_bool(&params, 2, &call.params)?,
                    expires_in_s: optional_seconds(&params, 3, &call.params)?,
                }
            }
            "grant.list" => {
                params.arity(0, 0)?;
                MeterCall::GrantList
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
            MeterCall::GrantStart { cid, machine_wide } => (
                "grant.start",
                vec![Value::string(cid.as_str()), Value::Bool(*machine_wide)],
            ),
            MeterCall::GrantWait { request } => {
                ("grant.wait", vec![Value::string(request.as_str())])
            }
            MeterCall::GrantPassword {
                cid,
                password,
                machine_wide,
                expires_in_s,
            } => {
                let mut params = vec![
                    Value::string(cid.as_str()),
                    Value::string(password.0.as_str()),
                    Value::Bool(*machine_wide),
                ];
                if let Some(seconds) = expires_in_s {
                    params.push(Value::string(seconds.to_string()));
                }
                ("grant.password", params)
            }
            MeterCall::GrantList => ("grant.list", Vec::new()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::Scope;

    fn decode(name: &str, params: Vec<Value>) -> Result<MeterCall, Fault> {
        MeterCall::from_call(&MethodCall {
            name: name.into(),
            params,
        })
    }

    #[test]
    fn grant_calls_round_trip() {
        let cid: Cid = "B1-C4".parse().unwrap();
        for call in [
            MeterCall::GrantStart {
                cid,
                machine_wide: true,
            },
            MeterCall::GrantWait {
                request: "0123abcd".into(),
            },
            MeterCall::GrantPassword {
                cid,
                password: Password("correct horse".into()),
                machine_wide: false,
                expires_in_s: Some(3600),
            },
            MeterCall::GrantPassword {
                cid,
                password: Password("x".into()),
                machine_wide: true,
                expires_in_s: None,
            },
            MeterCall::GrantList,
        ] {
            let (name, params) = call.to_call();
            assert_eq!(decode(name, params), Ok(call));
        }
        // Optional parameters, and an int for the lifetime (what Python sends).
        assert_eq!(
            decode("grant.start", vec![Value::string("B1-C4")]),
            Ok(MeterCall::GrantStart {
                cid,
                machine_wide: false
            })
        );
        assert_eq!(
            decode(
                "grant.password",
                vec![
                    Value::string("B1-C4"),
                    Value::string("pw"),
                    Value::Bool(false),
                    Value::Int(60)
                ]
            ),
            Ok(MeterCall::GrantPassword {
                cid,
                password: Password("pw".into()),
                machine_wide: false,
                expires_in_s: Some(60),
            })
        );
    }

    #[test]
    fn bad_grant_calls_are_refused_without_echoing_the_password() {
        let refused = [
            decode("grant.start", vec![Value::string("B1-P4")]),
            decode("grant.start", vec![Value::string("B1-C4"), Value::Int(1)]),
            decode("grant.wait", vec![Value::string("../x")]),
            decode("grant.wait", vec![Value::string("a".repeat(65))]),
            decode("grant.password", vec![Value::string("B1-C4")]),
            decode(
                "grant.password",
                vec![Value::string("B1-C4"), Value::string("")],
            ),
            decode(
                "grant.password",
                vec![Value::string("B1-C4"), Value::string("x".repeat(1025))],
            ),
            decode(
                "grant.password",
                vec![
                    Value::string("B1-C4"),
                    Value::string("secret-pw"),
                    Value::Bool(false),
                    Value::Int(-1),
                ],
            ),
            decode("grant.list", vec![Value::Nil]),
        ];
        for outcome in refused {
            let fault = outcome.unwrap_err();
            assert!(!fault.message.contains("secret-pw"), "{}", fault.message);
        }
        let call = MeterCall::GrantPassword {
            cid: "B1-C4".parse().unwrap(),
            password: Password("secret-pw".into()),
            machine_wide: false,
            expires_in_s: None,
        };
        assert!(!format!("{call:?}").contains("secret-pw"));
    }

    #[test]
    fn grant_answers_round_trip() {
        let started = GrantStarted {
            request: "00ff".into(),
            user_code: "ABCD-EFGH".into(),
            verification_uri: "http://127.0.0.1:8080/grant".into(),
            expires_in_s: 600,
        };
        assert_eq!(GrantStarted::from_value(&started.to_value()), Ok(started));
        let grants = vec![GrantInfo {
            cid: "B1-C4".parse().unwrap(),
            scope: Scope::User {
                uid: 1000,
                name: "bob".into(),
            },
            created_ms: 1,
            expires_ms: Some(2),
        }];
        assert_eq!(grants_from_value(&grants_to_value(&grants)), Ok(grants));
    }
}
