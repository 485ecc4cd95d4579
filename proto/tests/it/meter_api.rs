use proto::meter_api::MeterCall;
use proto::xmlrpc::{MethodCall, Value};
use proto::{Cid, Context, FaultCode, Pid};

fn decode(name: &str, params: Vec<Value>) -> Result<MeterCall, proto::Fault> {
    MeterCall::from_call(&MethodCall {
        name: name.into(),
        params,
    })
}

#[test]
fn cox_calls_decode() {
    let pid = Pid::parse("B1-P7").unwrap();
    let cid = Cid::parse("B1-C42").unwrap();
    assert_eq!(
        decode("query", vec![Value::string("B1-P7")]).unwrap(),
        MeterCall::Query { pid, context: None }
    );
    assert_eq!(
        decode("commit", vec![Value::string("B1-P7")]).unwrap(),
        MeterCall::Commit { pid, context: None }
    );
    assert_eq!(
        decode("login", vec![Value::string("B1-C42")]).unwrap(),
        MeterCall::Login { cid, context: None }
    );
    assert_eq!(
        decode("logoff", vec![Value::string("B1-C42")]).unwrap(),
        MeterCall::Logout { cid, context: None }
    );
    assert_eq!(decode("flush", vec![]).unwrap(), MeterCall::Flush);
    assert_eq!(decode("status", vec![]).unwrap(), MeterCall::Status);
    let context = Context::parse("pid:1:thread:2").unwrap();
    assert_eq!(
        decode(
            "query",
            vec![Value::string("B1-P7"), Value::string("pid:1:thread:2")]
        )
        .unwrap(),
        MeterCall::Query {
            pid,
            context: Some(context)
        }
    );
}

#[test]
fn calls_encode_and_decode_back() {
    let pid = Pid::parse("B1-P7").unwrap();
    let calls = [
        MeterCall::Query {
            pid,
            context: Some(Context::parse("t1").unwrap()),
        },
        MeterCall::Commit { pid, context: None },
        MeterCall::Cancel { pid, context: None },
        MeterCall::Logout {
            cid: Cid::parse("B1-C1").unwrap(),
            context: None,
        },
        MeterCall::Flush,
    ];
    for original in calls {
        let (name, params) = original.to_call();
        assert_eq!(decode(name, params).unwrap(), original);
    }
}

#[test]
fn bad_calls_are_faults() {
    let code = |name: &str, params: Vec<Value>| decode(name, params).unwrap_err().registered();
    assert_eq!(code("purchase", vec![]), Some(FaultCode::MethodNotFound));
    assert_eq!(code("query", vec![]), Some(FaultCode::InvalidParams));
    assert_eq!(
        code("query", vec![Value::Int(7)]),
        Some(FaultCode::InvalidParams)
    );
    assert_eq!(
        code("query", vec![Value::string("B1-C42")]),
        Some(FaultCode::InvalidParams)
    );
    assert_eq!(
        code("login", vec![Value::string("B1-P7")]),
        Some(FaultCode::InvalidParams)
    );
    assert_eq!(
        code("flush", vec![Value::Nil]),
        Some(FaultCode::InvalidParams)
    );
    assert_eq!(
        code(
            "commit",
            vec![Value::string("B1-P7"), Value::string("bad context")]
        ),
        Some(FaultCode::InvalidParams)
    );
    assert_eq!(
        code(
            "commit",
            vec![
                Value::string("B1-P7"),
                Value::string("c"),
                Value::string("x")
            ]
        ),
        Some(FaultCode::InvalidParams)
    );
    let message = decode("query", vec![Value::string("B1-C42")])
        .unwrap_err()
        .message;
    assert!(message.contains("invalid PID"), "{message}");
}
