use proto::id::{ID_LEN_MAX, IdFault};
use proto::{BatchId, Bid, Cid, Context, Mid, Payer, Pid};

#[test]
fn valid_ids_parse_and_print_back() {
    for text in ["B1-C42", "EU2-C0", "ABCDEFGH-C12345678901234567890"] {
        let cid = Cid::parse(text).expect(text);
        assert_eq!(cid.as_str(), text);
        assert_eq!(cid.to_string(), text);
    }
    assert_eq!(
        Pid::parse("B1-P7").unwrap().branch(),
        Bid::parse("B1").unwrap()
    );
    assert_eq!(Mid::parse("Z9-M1").unwrap().as_str(), "Z9-M1");
    assert_eq!("ABCDEFGH-C12345678901234567890".len(), ID_LEN_MAX);
}

#[test]
fn invalid_ids_are_refused_with_the_reason() {
    let cases = [
        ("", IdFault::Empty),
        ("B1-C123456789012345678901", IdFault::BadSerial),
        ("ABCDEFGH-C123456789012345678901", IdFault::TooLong),
        ("b1-C1", IdFault::BadBranch),
        ("1B-C1", IdFault::BadBranch),
        ("ABCDEFGHI-C1", IdFault::BadBranch),
        ("B1C1", IdFault::BadBranch),
        ("-C1", IdFault::BadBranch),
        ("B1-P1", IdFault::WrongKind),
        ("B1-", IdFault::WrongKind),
        ("B1-C", IdFault::BadSerial),
        ("B1-Cx", IdFault::BadSerial),
        ("B1-C1 ", IdFault::BadSerial),
        ("B1-C1-2", IdFault::BadSerial),
        ("B1-C١", IdFault::BadSerial),
    ];
    for (text, reason) in cases {
        let error = Cid::parse(text).expect_err(text);
        assert_eq!(error.reason, reason, "{text:?}");
        assert!(error.to_string().starts_with("invalid CID"), "{error}");
    }
}

#[test]
fn kinds_are_disjoint() {
    assert!(Pid::parse("B1-C1").is_err());
    assert!(Mid::parse("B1-P1").is_err());
    assert_eq!(
        Payer::parse("B1-C1").unwrap(),
        Payer::Customer(Cid::parse("B1-C1").unwrap())
    );
    assert_eq!(
        Payer::parse("B1-P1").unwrap(),
        Payer::OwnerOf(Pid::parse("B1-P1").unwrap())
    );
    assert!(Payer::parse("B1-M1").is_err());
}

#[test]
fn ids_deserialize_only_when_valid() {
    // Deserialize goes through the same constructor: an invalid ID cannot exist.
    use serde::Deserialize;
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error, StrDeserializer};
    let good: StrDeserializer<'_, Error> = "B1-C5".into_deserializer();
    assert_eq!(Cid::deserialize(good).unwrap().as_str(), "B1-C5");
    let bad: StrDeserializer<'_, Error> = "B1-P5".into_deserializer();
    assert!(Cid::deserialize(bad).is_err());
    let bad_bid: StrDeserializer<'_, Error> = "b1".into_deserializer();
    assert!(Bid::deserialize(bad_bid).is_err());
}

#[test]
fn tokens_are_bounded_and_plain() {
    assert!(BatchId::parse("B1-M3:000042").is_ok());
    assert!(Context::parse("pid:4242:thread:7").is_ok());
    assert!(Context::parse("").is_err());
    assert!(Context::parse(&"a".repeat(65)).is_err());
    assert!(Context::parse(&"a".repeat(64)).is_ok());
    assert!(BatchId::parse("a b").is_err());
    assert!(BatchId::parse("a<b").is_err());
}

#[test]
fn built_ids_carry_the_branch() {
    let bid = Bid::parse("EU2").unwrap();
    assert_eq!(Pid::new(&bid, "17").unwrap().as_str(), "EU2-P17");
    assert!(Pid::new(&bid, "no").is_err());
}
