//! Typed access to the parameters of a call, with faults that say which
//! parameter was wrong and why.

use std::fmt::Display;
use std::str::FromStr;

use crate::fault::Fault;
use crate::xmlrpc::Value;

/// The parameters of one call, checked one at a time.
#[derive(Debug)]
pub struct Params<'a> {
    method: &'a str,
    values: &'a [Value],
}

impl<'a> Params<'a> {
    /// Wraps the parameters of `method`.
    pub fn new(method: &'a str, values: &'a [Value]) -> Self {
        Self { method, values }
    }

    /// Fails unless there are between `min` and `max` parameters.
    pub fn arity(&self, min: usize, max: usize) -> Result<(), Fault> {
        let count = self.values.len();
        if (min..=max).contains(&count) {
            return Ok(());
        }
        let wanted = if min == max {
            format!("{min}")
        } else {
            format!("{min} to {max}")
        };
        Err(Fault::invalid_params(format!(
            "{} takes {wanted} parameters, got {count}",
            self.method
        )))
    }

    /// The parameter at `index`, which must exist.
    pub fn get(&self, index: usize) -> Result<&'a Value, Fault> {
        self.values.get(index).ok_or_else(|| {
            Fault::invalid_params(format!(
                "{}: parameter {} is missing",
                self.method,
                index + 1
            ))
        })
    }

    /// The string parameter at `index`.
    pub fn string(&self, index: usize) -> Result<&'a str, Fault> {
        let value = self.get(index)?;
        value
            .as_str()
            .ok_or_else(|| self.wrong_type(index, "string", value))
    }

    /// The string parameter at `index` parsed as `T` (an ID, an amount).
    pub fn parsed<T>(&self, index: usize) -> Result<T, Fault>
    where
        T: FromStr,
        T::Err: Display,
    {
        let text = self.string(index)?;
        text.parse().map_err(|error: T::Err| {
            Fault::invalid_params(format!("{}: parameter {}: {error}", self.method, index + 1))
        })
    }

    /// Like `parsed`, but `None` when there is no parameter at `index`.
    pub fn optional_parsed<T>(&self, index: usize) -> Result<Option<T>, Fault>
    where
        T: FromStr,
        T::Err: Display,
    {
        if index >= self.values.len() {
            return Ok(None);
        }
        self.parsed(index).map(Some)
    }

    /// The fault for a parameter of the wrong XML-RPC type.
    pub fn wrong_type(&self, index: usize, expected: &str, found: &Value) -> Fault {
        Fault::invalid_params(format!(
            "{}: parameter {} must be a {expected}, not a {}",
            self.method,
            index + 1,
            found.type_name()
        ))
    }
}
