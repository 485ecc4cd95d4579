use proto::FaultCode;
use std::collections::HashSet;

#[test]
fn codes_are_unique_and_round_trip() {
    let mut seen = HashSet::new();
    for &code in FaultCode::ALL {
        assert!(seen.insert(code.code()), "{code} registered twice");
        assert_eq!(FaultCode::from_code(code.code()), Some(code));
        assert!(!code.meaning().is_empty());
    }
    assert_eq!(FaultCode::from_code(0), None);
}

#[test]
fn protocol_doc_lists_every_code_with_its_meaning() {
    let doc = include_str!("../../../docs/protocol.md");
    for &code in FaultCode::ALL {
        let row = format!("| {} | `{:?}` | {} |", code.code(), code, code.meaning());
        assert!(doc.contains(&row), "docs/protocol.md lacks the row:\n{row}");
    }
}
