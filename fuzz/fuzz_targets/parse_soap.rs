//! Any bytes given to the Parlay X path parse as a SOAP 1.1 envelope or are
//! refused with an error, never a panic; every envelope that parses decodes
//! as a Parlay X request or a fault's reason, without panicking; and text
//! read from it, put back into a fault of ours, reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::parlayx::{Exception, Interface, Request};
use proto::soap::{FaultCode, Limits, fault, parse_envelope};

fuzz_target!(|body: &[u8]| {
    let Ok(envelope) = parse_envelope(body, Limits::PAYMENT) else {
        return;
    };
    for element in &envelope.body {
        for interface in Interface::ALL {
            match Request::decode(interface, element) {
                Ok(request) => {
                    let _ = request.canonical();
                }
                Err(error) => {
                    let fault = Exception::of_decode(&error).fault();
                    parse_envelope(fault.as_bytes(), Limits::PAYMENT).expect("our fault parses");
                }
            }
        }
        let answer = fault(FaultCode::Client, &element.text, None);
        let parsed = parse_envelope(answer.as_bytes(), Limits::PAYMENT)
            .expect("our own fault parses");
        let reason = parsed.body[0]
            .child("faultstring")
            .expect("our fault has a faultstring");
        // XML normalises line ends: \r\n and \r read back as \n.
        assert_eq!(reason.text, element.text.replace("\r\n", "\n").replace('\r', "\n"));
    }
});
