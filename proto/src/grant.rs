//! Grants: a customer's authorization for one meter to charge them. The
//! meter asks the backoffice for one in a signed call (the same headers and
//! HMAC as `send`), either by the device authorization pattern of RFC 8628
//! (`grant.request` answers a short user code that the customer enters on
//! the web pages while logged in; the meter then polls with `grant.poll`) or,
//! for headless machines, with the customer's password (`grant.password`).
//!
//! The scope says which local user of the meter's machine the grant is for:
//! the meter binds logins to it (socket peer credentials), and the customer
//! sees it before approving.

use std::fmt;
use std::str::FromStr;

use crate::fault::{Fault, FaultCode};
use crate::id::{Cid, Mid};
use crate::params::Params;
use crate::xmlrpc::{MethodCall, Value};

/// Asks for a device code: `grant.request(MID, CID, label, scope)`.
pub const REQUEST_METHOD: &str = "grant.request";
/// Polls a device code: `grant.poll(MID, deviceCode)`.
pub const POLL_METHOD: &str = "grant.poll";
/// Grants with the customer's password:
/// `grant.password(MID, CID, label, scope, password[, expiresInS])`.
pub const PASSWORD_METHOD: &str = "grant.password";
/// Longest machine label a meter may send, in bytes.
pub const LABEL_BYTES_MAX: usize = 100;
/// Longest password accepted on the wire, in bytes.
pub const PASSWORD_BYTES_MAX: usize = 1_024;
/// Longest local user name in a scope, in bytes.
pub const USER_NAME_BYTES_MAX: usize = 32;

/// Which local users of the meter's machine a grant is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Scope {
    /// One local user, by uid (and the name shown to the customer).
    User {
        /// The uid the meter binds logins to.
        uid: u32,
        /// The user's login name, for people (may be empty).
        name: String,
    },
    /// Every local user of the machine: made only by root, and only where
    /// the customer's approval says so.
    Machine,
}

impl Scope {
    /// True when the scope lets the local user `uid` log in.
    pub fn admits(&self, uid: u32) -> bool {
        match self {
            Scope::User { uid: granted, .. } => *granted == uid,
            Scope::Machine => true,
        }
    }
}

impl fmt::Display for Scope {
    /// `uid:1000:bob` or `machine`: the wire form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::User { uid, name } => write!(f, "uid:{uid}:{name}"),
            Scope::Machine => f.write_str("machine"),
        }
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(text: &str) -> Result<Scope, String> {
        if text == "machine" {
            return Ok(Scope::Machine);
        }
        let bad = || format!("a scope is `machine` or `uid:UID:NAME`, not {text:?}");
        let rest = text.strip_prefix("uid:").ok_or_else(bad)?;
        let (uid, name) = rest.split_once(':').ok_or_else(bad)?;
        let uid: u32 = uid.parse().map_err(|_| bad())?;
        let fine = name.len() <= USER_NAME_BYTES_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !fine {
            return Err(bad());
        }
        Ok(Scope::User {
            uid,
            name: name.to_owned(),
        })
    }
}

/// What a meter asks for: a grant of `cid` for this meter, in `scope`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRequest {
    /// The meter asking (also in the signature headers).
    pub mid: Mid,
    /// The customer who would pay.
    pub cid: Cid,
    /// The machine's label, shown to the customer (host name, say).
    pub label: String,
    /// The local users the grant is for.
    pub scope: Scope,
}

/// A grant by password: the request, the password, an optional lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordGrant {
    /// What is asked for.
    pub request: GrantRequest,
    /// The customer's web password.
    pub password: String,
    /// Seconds the grant lives; `None`: until revoked.
    pub expires_in_s: Option<u64>,
}

/// The backoffice's answer to `grant.request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCode {
    /// The meter's secret handle for polling.
    pub device_code: String,
    /// What the customer types on the web pages (`XXXX-XXXX`).
    pub user_code: String,
    /// The page where the customer enters it.
    pub verification_uri: String,
    /// Seconds until the code expires.
    pub expires_in_s: u64,
    /// Seconds the meter waits between polls.
    pub interval_s: u64,
}

/// A grant as the backoffice recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantInfo {
    /// The customer who pays.
    pub cid: Cid,
    /// The local users it is for.
    pub scope: Scope,
    /// When it was approved, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it expires, if it does.
    pub expires_ms: Option<u64>,
}

/// Where a device code stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollStatus {
    /// Not approved yet: poll again after the interval.
    Pending,
    /// Approved: the grant (the code is now used up).
    Approved(GrantInfo),
    /// The customer refused it.
    Denied,
    /// Expired or unknown: ask for a new code.
    Expired,
}

fn bad(what: impl fmt::Display) -> Fault {
    Fault::new(FaultCode::InvalidRequest, format!("grant answer: {what}"))
}

fn text_member<'a>(value: &'a Value, name: &str) -> Result<&'a str, Fault> {
    value
        .member(name)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{name} missing")))
}

fn u64_member(value: &Value, name: &str) -> Result<u64, Fault> {
    text_member(value, name)?
        .parse()
        .map_err(|_| bad(format!("{name} is not a count")))
}

fn check_label(label: &str) -> Result<(), Fault> {
    if label.len() > LABEL_BYTES_MAX || label.chars().any(char::is_control) {
        return Err(Fault::invalid_params(format!(
            "a machine label is at most {LABEL_BYTES_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

impl GrantRequest {
    fn params(&self) -> Vec<Value> {
        vec![
            Value::string(self.mid.as_str()),
            Value::string(self.cid.as_str()),
            Value::string(self.label.as_str()),
            Value::string(self.scope.to_string()),
        ]
    }

    fn from_params(params: &Params<'_>) -> Result<GrantRequest, Fault> {
        let label = params.string(2)?;
        check_label(label)?;
        Ok(GrantRequest {
            mid: params.parsed(0)?,
            cid: params.parsed(1)?,
            label: label.to_owned(),
            scope: params.parsed(3)?,
        })
    }

    /// The `grant.request` call's parameters.
    pub fn to_call(&self) -> (&'static str, Vec<Value>) {
        (REQUEST_METHOD, self.params())
    }

    /// Decodes `grant.request`.
    pub fn from_call(call: &MethodCall) -> Result<GrantRequest, Fault> {
        let params = Params::new(&call.name, &call.params);
        params.arity(4, 4)?;
        Self::from_params(&params)
    }
}

impl PasswordGrant {
    /// The `grant.password` call's parameters.
    pub fn to_call(&self) -> (&'static str, Vec<Value>) {
        let mut params = self.request.params();
        params.push(Value::string(self.password.as_str()));
        if let Some(seconds) = self.expires_in_s {
            params.push(Value::string(seconds.to_string()));
        }
        (PASSWORD_METHOD, params)
    }

    /// Decodes `grant.password`.
    pub fn from_call(call: &MethodCall) -> Result<PasswordGrant, Fault> {
        let params = Params::new(&call.name, &call.params);
        params.arity(5, 6)?;
        let password = params.string(4)?;
        if password.len() > PASSWORD_BYTES_MAX {
            return Err(Fault::invalid_params("the password is too long"));
        }
        Ok(PasswordGrant {
            request: GrantRequest::from_params(&params)?,
            password: password.to_owned(),
            expires_in_s: params.optional_parsed(5)?,
        })
    }
}

/// Decodes `grant.poll(MID, deviceCode)`.
pub fn poll_from_call(call: &MethodCall) -> Result<(Mid, String), Fault> {
    let params = Params::new(&call.name, &call.params);
    params.arity(2, 2)?;
    let code = params.string(1)?;
    if code.len() > 128 {
        return Err(Fault::invalid_params("a device code is at most 128 bytes"));
    }
    Ok((params.parsed(0)?, code.to_owned()))
}

/// The `grant.poll` call's parameters.
pub fn poll_call(mid: &Mid, device_code: &str) -> (&'static str, Vec<Value>) {
    (
        POLL_METHOD,
        vec![Value::string(mid.as_str()), Value::string(device_code)],
    )
}

impl DeviceCode {
    /// Encodes the answer to `grant.request`.
    pub fn to_value(&self) -> Value {
        Value::structure([
            ("deviceCode", Value::string(self.device_code.as_str())),
            ("userCode", Value::string(self.user_code.as_str())),
            (
                "verificationUri",
                Value::string(self.verification_uri.as_str()),
            ),
            ("expiresInS", Value::string(self.expires_in_s.to_string())),
            ("intervalS", Value::string(self.interval_s.to_string())),
        ])
    }

    /// Decodes the answer to `grant.request`.
    pub fn from_value(value: &Value) -> Result<DeviceCode, Fault> {
        Ok(DeviceCode {
            device_code: text_member(value, "deviceCode")?.to_owned(),
            user_code: text_member(value, "userCode")?.to_owned(),
            verification_uri: text_member(value, "verificationUri")?.to_owned(),
            expires_in_s: u64_member(value, "expiresInS")?,
            interval_s: u64_member(value, "intervalS")?,
        })
    }
}

impl GrantInfo {
    /// Encodes a grant.
    pub fn to_value(&self) -> Value {
        Value::structure([
            ("CID", Value::string(self.cid.as_str())),
            ("scope", Value::string(self.scope.to_string())),
            ("createdMs", Value::string(self.created_ms.to_string())),
            (
                "expiresMs",
                Value::string(self.expires_ms.map_or(String::new(), |ms| ms.to_string())),
            ),
        ])
    }

    /// Decodes a grant.
    pub fn from_value(value: &Value) -> Result<GrantInfo, Fault> {
        let expires = text_member(value, "expiresMs")?;
        Ok(GrantInfo {
            cid: text_member(value, "CID")?.parse().map_err(bad)?,
            scope: text_member(value, "scope")?.parse().map_err(bad)?,
            created_ms: u64_member(value, "createdMs")?,
            expires_ms: if expires.is_empty() {
                None
            } else {
                Some(expires.parse().map_err(|_| bad("expiresMs"))?)
            },
        })
    }
}

impl PollStatus {
    /// Encodes the answer to `grant.poll`: `{status, grant?}` with status
    /// `pending`, `approved`, `denied` or `expired` (RFC 8628's
    /// `authorization_pending`, success, `access_denied`, `expired_token`).
    pub fn to_value(&self) -> Value {
        let status = |text: &str| ("status", Value::string(text));
        match self {
            PollStatus::Pending => Value::structure([status("pending")]),
            PollStatus::Approved(grant) => {
                Value::structure([status("approved"), ("grant", grant.to_value())])
            }
            PollStatus::Denied => Value::structure([status("denied")]),
            PollStatus::Expired => Value::structure([status("expired")]),
        }
    }

    /// Decodes the answer to `grant.poll`.
    pub fn from_value(value: &Value) -> Result<PollStatus, Fault> {
        Ok(match text_member(value, "status")? {
            "pending" => PollStatus::Pending,
            "approved" => PollStatus::Approved(GrantInfo::from_value(
                value.member("grant").ok_or_else(|| bad("grant missing"))?,
            )?),
            "denied" => PollStatus::Denied,
            "expired" => PollStatus::Expired,
            other => return Err(bad(format!("unknown status {other:?}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_and_bad_ones_are_refused() {
        for scope in [
            Scope::Machine,
            Scope::User {
                uid: 1000,
                name: "bob".into(),
            },
            Scope::User {
                uid: 0,
                name: String::new(),
            },
        ] {
            assert_eq!(scope.to_string().parse::<Scope>(), Ok(scope));
        }
        for bad in [
            "",
            "uid:x:bob",
            "uid:1",
            "user:1:bob",
            "uid:1:b<b",
            "machines",
        ] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
        let bob = Scope::User {
            uid: 1000,
            name: "bob".into(),
        };
        assert!(bob.admits(1000) && !bob.admits(1001) && !bob.admits(0));
        assert!(Scope::Machine.admits(1001));
    }

    #[test]
    fn calls_and_answers_round_trip() {
        let request = GrantRequest {
            mid: "B1-M2".parse().unwrap(),
            cid: "B1-C4".parse().unwrap(),
            label: "bob's laptop".into(),
            scope: Scope::User {
                uid: 1000,
                name: "bob".into(),
            },
        };
        let (name, params) = request.to_call();
        let call = MethodCall {
            name: name.into(),
            params,
        };
        assert_eq!(GrantRequest::from_call(&call), Ok(request.clone()));
        let by_password = PasswordGrant {
            request,
            password: "correct horse".into(),
            expires_in_s: Some(3600),
        };
        let (name, params) = by_password.to_call();
        let call = MethodCall {
            name: name.into(),
            params,
        };
        assert_eq!(PasswordGrant::from_call(&call), Ok(by_password));
        let grant = GrantInfo {
            cid: "B1-C4".parse().unwrap(),
            scope: Scope::Machine,
            created_ms: 5,
            expires_ms: None,
        };
        for status in [
            PollStatus::Pending,
            PollStatus::Approved(grant),
            PollStatus::Denied,
            PollStatus::Expired,
        ] {
            assert_eq!(PollStatus::from_value(&status.to_value()), Ok(status));
        }
    }

    #[test]
    fn labels_with_control_characters_are_refused() {
        let call = MethodCall {
            name: REQUEST_METHOD.into(),
            params: vec![
                Value::string("B1-M2"),
                Value::string("B1-C4"),
                Value::string("evil\nlabel"),
                Value::string("machine"),
            ],
        };
        assert!(GrantRequest::from_call(&call).is_err());
    }
}
