//! XML-RPC values, calls and responses as plain data.

use crate::fault::Fault;

/// One XML-RPC value. `Double` exists because the XML-RPC type does; money
/// never travels as a double (amounts are decimal strings).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `<int>` or `<i4>`.
    Int(i32),
    /// `<i8>`, a 64-bit integer (Python can read but not send these).
    I8(i64),
    /// `<boolean>`.
    Bool(bool),
    /// `<string>`, an untyped `<value>`, or `<char>` (a one-character string).
    String(String),
    /// `<double>`.
    Double(f64),
    /// `<dateTime.iso8601>`, kept as its text, which has the form
    /// `YYYYMMDDTHH:MM:SS` (checked when parsed).
    DateTime(String),
    /// `<base64>`, decoded.
    Base64(Vec<u8>),
    /// `<struct>`, members in the order received, names unique.
    Struct(Vec<Member>),
    /// `<array>`.
    Array(Vec<Value>),
    /// `<nil/>`.
    Nil,
}

/// One member of a struct.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The member's name.
    pub name: String,
    /// The member's value.
    pub value: Value,
}

impl Member {
    /// A member from a name and a value.
    pub fn new(name: impl Into<String>, value: Value) -> Self {
        Self {
            name: name.into(),
            value,
        }
    }
}

impl Value {
    /// A string value.
    pub fn string(text: impl Into<String>) -> Value {
        Value::String(text.into())
    }

    /// A struct from `(name, value)` pairs.
    pub fn structure<N: Into<String>>(members: impl IntoIterator<Item = (N, Value)>) -> Value {
        Value::Struct(
            members
                .into_iter()
                .map(|(name, value)| Member::new(name, value))
                .collect(),
        )
    }

    /// The XML-RPC name of this value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "int",
            Value::I8(_) => "i8",
            Value::Bool(_) => "boolean",
            Value::String(_) => "string",
            Value::Double(_) => "double",
            Value::DateTime(_) => "dateTime.iso8601",
            Value::Base64(_) => "base64",
            Value::Struct(_) => "struct",
            Value::Array(_) => "array",
            Value::Nil => "nil",
        }
    }

    /// The text of a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(text) => Some(text),
            _ => None,
        }
    }

    /// The number of an `int` value, or of an `i8` value that fits.
    pub fn as_i32(&self) -> Option<i32> {
        match *self {
            Value::Int(number) => Some(number),
            Value::I8(number) => i32::try_from(number).ok(),
            _ => None,
        }
    }

    /// The number of an `int` or `i8` value.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Int(number) => Some(i64::from(number)),
            Value::I8(number) => Some(number),
            _ => None,
        }
    }

    /// The truth of a boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(truth) => Some(truth),
            _ => None,
        }
    }

    /// The elements of an array value.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The members of a struct value.
    pub fn as_struct(&self) -> Option<&[Member]> {
        match self {
            Value::Struct(members) => Some(members),
            _ => None,
        }
    }

    /// The value of the struct member called `name`.
    pub fn member(&self, name: &str) -> Option<&Value> {
        self.as_struct()?
            .iter()
            .find(|member| member.name == name)
            .map(|member| &member.value)
    }
}

/// A parsed `<methodCall>`.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodCall {
    /// The method name.
    pub name: String,
    /// The parameters in order.
    pub params: Vec<Value>,
}

/// A parsed `<methodResponse>`: one value or a fault.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodResponse {
    /// The call succeeded with this value.
    Success(Value),
    /// The call failed.
    Fault(Fault),
}
