//! The classic XML-RPC `validator1` suite, answered on `proto`'s codec, plus
//! `system.listMethods` and a bounded `system.multicall`.

use proto::xmlrpc::{Limits, MethodCall, Value};
use proto::{Fault, FaultCode};

/// The validator's bounds: its nested-struct test sends a calendar of a few
/// hundred kilobytes.
pub const LIMITS: Limits = Limits {
    body_bytes_max: 1024 * 1024,
    depth_max: 16,
};

/// Most calls in one `system.multicall`.
pub const MULTICALL_CALLS_MAX: usize = 1000;

const METHODS: &[&str] = &[
    "validator1.arrayOfStructsTest",
    "validator1.countTheEntities",
    "validator1.easyStructTest",
    "validator1.echoStructTest",
    "validator1.manyTypesTest",
    "validator1.moderateSizeArrayCheck",
    "validator1.nestedStructTest",
    "validator1.simpleStructReturnTest",
    "system.listMethods",
    "system.multicall",
];

/// Answers one call.
pub fn dispatch(call: MethodCall) -> Result<Value, Fault> {
    let params = call.params;
    match call.name.as_str() {
        "validator1.arrayOfStructsTest" => array_of_structs(&params),
        "validator1.countTheEntities" => count_the_entities(&params),
        "validator1.easyStructTest" => stooges_sum(one(&params)?).map(Value::Int),
        "validator1.echoStructTest" => echo_struct(params),
        "validator1.manyTypesTest" => many_types(params),
        "validator1.moderateSizeArrayCheck" => moderate_size_array(&params),
        "validator1.nestedStructTest" => nested_struct(&params),
        "validator1.simpleStructReturnTest" => simple_struct_return(&params),
        "system.listMethods" => Ok(Value::Array(
            METHODS.iter().map(|name| Value::string(*name)).collect(),
        )),
        "system.multicall" => multicall(&params),
        other => Err(Fault::method_not_found(other)),
    }
}

fn one(params: &[Value]) -> Result<&Value, Fault> {
    match params {
        [only] => Ok(only),
        _ => Err(Fault::invalid_params(format!(
            "takes 1 parameter, got {}",
            params.len()
        ))),
    }
}

fn int_member(value: &Value, name: &str) -> Result<i32, Fault> {
    value
        .member(name)
        .and_then(Value::as_i32)
        .ok_or_else(|| Fault::invalid_params(format!("struct needs an int member {name:?}")))
}

fn checked_sum(numbers: impl IntoIterator<Item = i32>) -> Result<i32, Fault> {
    numbers
        .into_iter()
        .try_fold(0i32, i32::checked_add)
        .ok_or_else(|| Fault::invalid_params("sum overflows an int"))
}

fn stooges_sum(value: &Value) -> Result<i32, Fault> {
    checked_sum([
        int_member(value, "moe")?,
        int_member(value, "larry")?,
        int_member(value, "curly")?,
    ])
}

fn array_of_structs(params: &[Value]) -> Result<Value, Fault> {
    let items = one(params)?
        .as_array()
        .ok_or_else(|| Fault::invalid_params("expected an array of structs"))?;
    let curlies = items
        .iter()
        .map(|item| int_member(item, "curly"))
        .collect::<Result<Vec<_>, _>>()?;
    checked_sum(curlies).map(Value::Int)
}

fn count_the_entities(params: &[Value]) -> Result<Value, Fault> {
    let text = one(params)?
        .as_str()
        .ok_or_else(|| Fault::invalid_params("expected a string"))?;
    let count = |wanted: char| {
        let found = text.chars().filter(|&c| c == wanted).count();
        Value::Int(i32::try_from(found).unwrap_or(i32::MAX))
    };
    Ok(Value::structure([
        ("ctLeftAngleBrackets", count('<')),
        ("ctRightAngleBrackets", count('>')),
        ("ctAmpersands", count('&')),
        ("ctApostrophes", count('\'')),
        ("ctQuotes", count('"')),
    ]))
}

fn echo_struct(mut params: Vec<Value>) -> Result<Value, Fault> {
    one(&params)?;
    match params.pop() {
        Some(value @ Value::Struct(_)) => Ok(value),
        _ => Err(Fault::invalid_params("expected a struct")),
    }
}

fn many_types(params: Vec<Value>) -> Result<Value, Fault> {
    let expected = [
        "int",
        "boolean",
        "string",
        "double",
        "dateTime.iso8601",
        "base64",
    ];
    let types: Vec<&str> = params.iter().map(Value::type_name).collect();
    if types != expected {
        return Err(Fault::invalid_params(format!(
            "expected {expected:?}, got {types:?}"
        )));
    }
    Ok(Value::Array(params))
}

fn moderate_size_array(params: &[Value]) -> Result<Value, Fault> {
    let items = one(params)?
        .as_array()
        .ok_or_else(|| Fault::invalid_params("expected an array of strings"))?;
    let not_strings = || Fault::invalid_params("expected a non-empty array of strings");
    let first = items
        .first()
        .and_then(Value::as_str)
        .ok_or_else(not_strings)?;
    let last = items
        .last()
        .and_then(Value::as_str)
        .ok_or_else(not_strings)?;
    Ok(Value::String(format!("{first}{last}")))
}

fn nested_struct(params: &[Value]) -> Result<Value, Fault> {
    let day = one(params)?
        .member("2000")
        .and_then(|year| year.member("04"))
        .and_then(|month| month.member("01"))
        .ok_or_else(|| Fault::invalid_params("calendar has no entry for 2000-04-01"))?;
    stooges_sum(day).map(Value::Int)
}

fn simple_struct_return(params: &[Value]) -> Result<Value, Fault> {
    let number = one(params)?
        .as_i32()
        .ok_or_else(|| Fault::invalid_params("expected an int"))?;
    let times = |factor: i32| {
        number
            .checked_mul(factor)
            .map(Value::Int)
            .ok_or_else(|| Fault::invalid_params("product overflows an int"))
    };
    Ok(Value::structure([
        ("times10", times(10)?),
        ("times100", times(100)?),
        ("times1000", times(1000)?),
    ]))
}

/// `system.multicall([{methodName, params}])`: each result wrapped in a
/// one-element array, each failure as a fault struct. No nested multicalls.
fn multicall(params: &[Value]) -> Result<Value, Fault> {
    let calls = one(params)?
        .as_array()
        .ok_or_else(|| Fault::invalid_params("expected an array of calls"))?;
    if calls.len() > MULTICALL_CALLS_MAX {
        return Err(Fault::invalid_params(format!(
            "at most {MULTICALL_CALLS_MAX} calls per multicall"
        )));
    }
    let results = calls.iter().map(|call| match one_of_many(call) {
        Ok(value) => Value::Array(vec![value]),
        Err(fault) => Value::structure([
            ("faultCode", Value::Int(fault.code)),
            ("faultString", Value::String(fault.message)),
        ]),
    });
    Ok(Value::Array(results.collect()))
}

fn one_of_many(call: &Value) -> Result<Value, Fault> {
    let name = call
        .member("methodName")
        .and_then(Value::as_str)
        .ok_or_else(|| Fault::invalid_params("each call needs a methodName"))?;
    if name == "system.multicall" {
        return Err(Fault::new(
            FaultCode::InvalidParams,
            "system.multicall cannot be nested",
        ));
    }
    let params = call
        .member("params")
        .and_then(Value::as_array)
        .ok_or_else(|| Fault::invalid_params("each call needs a params array"))?;
    dispatch(MethodCall {
        name: name.to_owned(),
        params: params.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, params: Vec<Value>) -> Result<Value, Fault> {
        dispatch(MethodCall {
            name: name.into(),
            params,
        })
    }

    fn stooges(moe: i32, larry: i32, curly: i32) -> Value {
        Value::structure([
            ("moe", Value::Int(moe)),
            ("larry", Value::Int(larry)),
            ("curly", Value::Int(curly)),
        ])
    }

    #[test]
    fn known_answers() {
        let entities = call(
            "validator1.countTheEntities",
            vec![Value::string("<\"\"><&><'><")],
        )
        .unwrap();
        assert_eq!(entities.member("ctQuotes"), Some(&Value::Int(2)));
        assert_eq!(entities.member("ctLeftAngleBrackets"), Some(&Value::Int(4)));
        assert_eq!(entities.member("ctAmpersands"), Some(&Value::Int(1)));
        assert_eq!(entities.member("ctApostrophes"), Some(&Value::Int(1)));
        assert_eq!(
            entities.member("ctRightAngleBrackets"),
            Some(&Value::Int(3))
        );
        let structs = Value::Array(vec![stooges(1, 2, 3), stooges(-98, 23, -6)]);
        assert_eq!(
            call("validator1.arrayOfStructsTest", vec![structs]).unwrap(),
            Value::Int(-3)
        );
    }

    #[test]
    fn bad_input_is_a_fault_not_a_panic() {
        let overflow = stooges(i32::MAX, 1, 0);
        assert!(call("validator1.easyStructTest", vec![overflow]).is_err());
        assert!(
            call(
                "validator1.simpleStructReturnTest",
                vec![Value::Int(i32::MAX)]
            )
            .is_err()
        );
        assert!(
            call(
                "validator1.moderateSizeArrayCheck",
                vec![Value::Array(vec![])]
            )
            .is_err()
        );
        assert!(call("validator1.nestedStructTest", vec![Value::Nil]).is_err());
        assert!(call("validator1.manyTypesTest", vec![Value::Int(1)]).is_err());
        let nested = Value::Array(vec![Value::structure([
            ("methodName", Value::string("system.multicall")),
            ("params", Value::Array(vec![])),
        ])]);
        let answer = call("system.multicall", vec![nested]).unwrap();
        assert!(answer.as_array().unwrap()[0].member("faultCode").is_some());
    }
}
