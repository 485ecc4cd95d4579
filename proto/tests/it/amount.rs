use proto::{Amount, AmountError};
use rust_decimal::Decimal;
use std::str::FromStr;

fn amount(text: &str) -> Amount {
    Amount::parse(text).expect(text)
}

#[test]
fn wire_form_is_the_shortest_exact_decimal() {
    for (input, shown) in [
        ("0", "0"),
        ("-0", "0"),
        ("12.5", "12.5"),
        ("12.500000000", "12.5"),
        ("0.000000001", "0.000000001"),
        ("-3", "-3"),
        ("007.10", "7.1"),
        (
            "999999999999999999.999999999",
            "999999999999999999.999999999",
        ),
        ("1.0000000000000", "1"),
    ] {
        assert_eq!(amount(input).to_string(), shown, "{input}");
        assert_eq!(amount(shown), amount(input));
    }
}

#[test]
fn malformed_amounts_are_refused() {
    for input in [
        "", "-", ".", "1.", ".5", "+1", "1e3", "1,5", " 1", "1 ", "0x10", "NaN", "--1", "1.2.3",
    ] {
        assert_eq!(Amount::parse(input), Err(AmountError::Syntax), "{input:?}");
    }
    assert_eq!(Amount::parse("0.0000000001"), Err(AmountError::TooPrecise));
    assert_eq!(
        Amount::parse("1000000000000000000"),
        Err(AmountError::Overflow)
    );
    assert_eq!(Amount::parse(&"9".repeat(40)), Err(AmountError::Overflow));
}

#[test]
fn arithmetic_is_checked() {
    let max = amount("999999999999999999.999999999");
    assert_eq!(
        max.checked_add(Amount::from_nanos(1)),
        Err(AmountError::Overflow)
    );
    assert_eq!(
        max.negated().checked_sub(Amount::from_nanos(1)),
        Err(AmountError::Overflow)
    );
    assert_eq!(
        amount("0.1").checked_add(amount("0.2")).unwrap(),
        amount("0.3")
    );
    assert_eq!(
        amount("0.000000003").checked_mul_count(3).unwrap(),
        amount("0.000000009")
    );
    assert_eq!(
        amount("1").checked_mul_count(u64::MAX),
        Err(AmountError::Overflow)
    );
    assert_eq!(
        amount("1.5").checked_sub(amount("2")).unwrap(),
        amount("-0.5")
    );
    assert!(amount("-0.5").is_negative());
    assert!(!Amount::ZERO.is_negative() && !Amount::ZERO.is_positive());
}

#[test]
fn rounding_is_half_to_even_and_only_on_request() {
    assert_eq!(
        amount("0.125").round_dp(2),
        Decimal::from_str("0.12").unwrap()
    );
    assert_eq!(
        amount("0.135").round_dp(2),
        Decimal::from_str("0.14").unwrap()
    );
    assert_eq!(
        amount("-0.125").round_dp(2),
        Decimal::from_str("-0.12").unwrap()
    );
    // The amount itself is untouched.
    assert_eq!(amount("0.125").to_string(), "0.125");
}

#[test]
fn splits_hand_out_the_remainder_exactly() {
    let parts = amount("10").split(3).unwrap();
    assert_eq!(
        parts,
        vec![
            amount("3.333333334"),
            amount("3.333333333"),
            amount("3.333333333")
        ]
    );
    let parts = amount("-10").split(3).unwrap();
    assert_eq!(
        parts,
        vec![
            amount("-3.333333334"),
            amount("-3.333333333"),
            amount("-3.333333333")
        ]
    );
    assert_eq!(amount("1").split(0), Err(AmountError::ZeroParts));
}

#[test]
fn decimals_with_more_places_are_refused_not_rounded() {
    let precise = Decimal::from_str("0.0000000015").unwrap();
    assert_eq!(
        Amount::try_from_decimal(precise),
        Err(AmountError::TooPrecise)
    );
    let fine = Decimal::from_str("1.50").unwrap();
    assert_eq!(Amount::try_from_decimal(fine).unwrap(), amount("1.5"));
    assert_eq!(amount("1.5").nanos(), 1_500_000_000);
    assert_eq!(
        Amount::try_from_nanos(1_500_000_000).unwrap(),
        amount("1.5")
    );
    assert_eq!(
        Amount::try_from_nanos(-(10i128.pow(27))),
        Err(AmountError::Overflow)
    );
    let max = amount("999999999999999999.999999999");
    assert_eq!(Amount::try_from_nanos(max.nanos()).unwrap(), max);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn any_amount() -> impl Strategy<Value = Amount> {
        (-999_999_999_999_999_999_999_999_999i128..=999_999_999_999_999_999_999_999_999i128)
            .prop_map(|nanos| {
                Amount::try_from_decimal(Decimal::from_i128_with_scale(nanos, 9)).unwrap()
            })
    }

    proptest! {
        #[test]
        fn display_parses_back_to_the_same_amount(value in any_amount()) {
            prop_assert_eq!(Amount::parse(&value.to_string()).unwrap(), value);
        }

        #[test]
        fn add_then_sub_is_identity_when_in_range(a in any_amount(), b in any_amount()) {
            if let Ok(sum) = a.checked_add(b) {
                prop_assert_eq!(sum.checked_sub(b).unwrap(), a);
            }
        }

        #[test]
        fn split_parts_sum_to_the_whole(value in any_amount(), parts in 1u32..50) {
            let shares = value.split(parts).unwrap();
            let total = shares.iter().try_fold(Amount::ZERO, |sum, share| sum.checked_add(*share)).unwrap();
            prop_assert_eq!(total, value);
            let max = shares.iter().max().unwrap().nanos();
            let min = shares.iter().min().unwrap().nanos();
            prop_assert!(max - min <= 1);
        }

        #[test]
        fn parse_never_panics(text in "\\PC{0,40}") {
            let _ = Amount::parse(&text);
        }
    }
}
