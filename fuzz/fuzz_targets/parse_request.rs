//! Any bytes given to a server's request path get an answer that is itself a
//! valid XML-RPC response, and never a panic; any call that parses decodes as
//! a meter call or an upload without panicking; and whatever the streaming
//! `send` decoder decodes, the general one decodes the same way. The bytes
//! are also read as a packed readings block: whatever decodes encodes back
//! to a block that decodes to the same readings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::meter_api::MeterCall;
use proto::upload::{SendRequest, packed};
use proto::xmlrpc::{Limits, Value, handle_call, parse_call, parse_response};

fuzz_target!(|body: &[u8]| {
    if let Ok(readings) = packed::decode(body) {
        assert_eq!(packed::decode(&packed::encode(&readings)), Ok(readings));
    }
    let limits = Limits::METER_API;
    if let Ok(call) = parse_call(body, limits) {
        let _ = MeterCall::from_call(&call);
        let _ = SendRequest::from_call(&call);
    }
    for limits in [Limits::BACKOFFICE, Limits::METER_API] {
        for fast in [
            SendRequest::decode_extended(body, limits),
            SendRequest::decode_extended_from_tokens(body, limits),
        ]
        .into_iter()
        .flatten()
        {
            let call = parse_call(body, limits).expect("the streaming decoder's body parses");
            assert_eq!(SendRequest::from_call(&call), Ok(fast));
        }
    }
    let answer = handle_call(body, limits, |call| Ok(Value::Array(call.params)));
    parse_response(&answer, Limits::BACKOFFICE).expect("our own answer parses");
    let _ = parse_response(body, limits);
});
