//! Property tests: any value survives encode then parse; any bytes are
//! answered without a panic.

use proptest::prelude::*;
use proto::xmlrpc::{Limits, Member, Value, encode_call, handle_call, parse_call};

fn xml_text() -> impl Strategy<Value = String> {
    // Every character XML 1.0 can carry (no other control characters).
    proptest::collection::vec(
        prop_oneof![
            Just('\t'),
            Just('\n'),
            Just('\r'),
            Just('&'),
            Just('<'),
            Just(']'),
            proptest::char::range(' ', '~'),
            proptest::char::range('\u{a0}', '\u{d7ff}'),
            proptest::char::range('\u{10000}', '\u{10ffff}'),
        ],
        0..24,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i32>().prop_map(Value::Int),
        any::<i64>().prop_map(Value::I8),
        any::<bool>().prop_map(Value::Bool),
        xml_text().prop_map(Value::String),
        any::<f64>()
            .prop_filter("finite", |d| d.is_finite())
            .prop_map(Value::Double),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Base64),
        Just(Value::Nil),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(xml_text(), inner, 0..8).prop_map(|members| {
                Value::Struct(
                    members
                        .into_iter()
                        .map(|(name, value)| Member::new(name, value))
                        .collect(),
                )
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encoded_values_parse_back(values in proptest::collection::vec(any_value(), 0..4)) {
        let body = encode_call("echo", &values);
        let call = parse_call(&body, Limits::BACKOFFICE).unwrap();
        prop_assert_eq!(call.params, values);
    }

    #[test]
    fn arbitrary_bytes_get_an_answer(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let answer = handle_call(&bytes, Limits::METER_API, |_| Ok(Value::Nil));
        prop_assert!(answer.starts_with(b"<?xml"));
    }

    #[test]
    fn mutated_valid_calls_never_panic(values in proptest::collection::vec(any_value(), 1..3), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut body = encode_call("echo", &values);
        let at = cut.index(body.len());
        body[at] = byte;
        let _ = parse_call(&body, Limits::METER_API);
    }
}
