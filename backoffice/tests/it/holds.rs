//! Holds in the ledger, after random interleavings of deposits, uses,
//! holds placed, adjusted, captured in parts, released and expired: the sum
//! of all balances stays zero, no account's available balance is above its
//! balance, no hold takes more than was available when placed, no hold
//! captures more than it holds, every
//! capture is a transfer from the hold's account, an ended hold never
//! changes again, every hold ends exactly once, and the events read back
//! give the same book.

use backoffice::holds::{Ending, HoldBook, HoldChange, HoldError, HoldId};
use backoffice::ledger::{AccountId, Ledger, NewTransfer, SystemAccount, TransferId, TransferKind};
use proptest::prelude::*;
use proto::{Amount, Cid};

const CUSTOMERS: u32 = 3;
const FUNDING: AccountId = AccountId::System(SystemAccount::Funding);

fn customer(n: u32) -> AccountId {
    AccountId::Customer(Cid::parse(&format!("B1-C{n}")).unwrap())
}

fn producer() -> AccountId {
    AccountId::Customer(Cid::parse("B1-C99").unwrap())
}

fn nanos(n: i64) -> Amount {
    Amount::from_nanos(n)
}

#[derive(Debug, Clone)]
enum Operation {
    Deposit {
        to: u32,
        nanos: i64,
    },
    Use {
        payer: u32,
        nanos: i64,
    },
    Place {
        on: u32,
        nanos: i64,
        ttl: u64,
    },
    Adjust {
        pick: prop::sample::Index,
        nanos: i64,
        ttl: u64,
    },
    Capture {
        pick: prop::sample::Index,
        nanos: i64,
    },
    Release {
        pick: prop::sample::Index,
    },
    Wait {
        ms: u64,
    },
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        (0..CUSTOMERS, 1..2_000i64).prop_map(|(to, nanos)| Operation::Deposit { to, nanos }),
        (0..CUSTOMERS, 1..800i64).prop_map(|(payer, nanos)| Operation::Use { payer, nanos }),
        (0..CUSTOMERS, 1..1_500i64, 1..60u64).prop_map(|(on, nanos, ttl)| Operation::Place {
            on,
            nanos,
            ttl
        }),
        (any::<prop::sample::Index>(), -800..800i64, 1..60u64)
            .prop_map(|(pick, nanos, ttl)| Operation::Adjust { pick, nanos, ttl }),
        (any::<prop::sample::Index>(), 1..900i64)
            .prop_map(|(pick, nanos)| Operation::Capture { pick, nanos }),
        any::<prop::sample::Index>().prop_map(|pick| Operation::Release { pick }),
        (1..40u64).prop_map(|ms| Operation::Wait { ms }),
    ]
}

/// What `account` can spend now: its balance less what is held.
fn spendable(ledger: &Ledger, book: &HoldBook, account: &AccountId, now: u64) -> Amount {
    book.available(account, ledger.balance(account), now)
}

fn pick(book: &HoldBook, index: &prop::sample::Index) -> Option<HoldId> {
    let count = book.holds().count();
    (count > 0).then(|| HoldId(index.index(count) as u64))
}

/// Runs one operation as the backoffice would; returns whether it changed
/// anything.
fn run(ledger: &mut Ledger, book: &mut HoldBook, operation: &Operation, now: &mut u64) -> bool {
    match *operation {
        Operation::Deposit { to, nanos: n } => {
            let deposit = NewTransfer {
                debit: FUNDING,
                credit: customer(to),
                amount: nanos(n),
                kind: TransferKind::Deposit,
            };
            ledger.post(vec![deposit], *now).is_ok()
        }
        Operation::Use { payer, nanos: n } => {
            // Metered uses are charged whatever is held (the meter was
            // told the payer's standing, on the available balance, before
            // the use): only while the payer has anything at all.
            if !ledger.balance(&customer(payer)).is_positive() {
                return false;
            }
            let charge = NewTransfer {
                debit: customer(payer),
                credit: producer(),
                amount: nanos(n),
                kind: TransferKind::Deposit,
            };
            ledger.post(vec![charge], *now).is_ok()
        }
        Operation::Place { on, nanos: n, ttl } => {
            let account = customer(on);
            let can = spendable(ledger, book, &account, *now);
            match book.prepare_place(account, nanos(n), *now + ttl, "a match", can, *now) {
                Ok(event) => {
                    assert!(nanos(n) <= can, "never more than was available");
                    book.commit(vec![event]);
                    true
                }
                Err(HoldError::Insufficient { .. }) => false,
                Err(other) => panic!("{other}"),
            }
        }
        Operation::Adjust {
            ref pick,
            nanos: n,
            ttl,
        } => {
            let Some(id) = self::pick(book, pick) else {
                return false;
            };
            let account = book.hold(id).unwrap().account;
            let can = spendable(ledger, book, &account, *now);
            match book.prepare_adjust(id, nanos(n), *now + ttl, can, *now) {
                Ok(event) => {
                    book.commit(vec![event]);
                    true
                }
                Err(
                    HoldError::Ended(_)
                    | HoldError::Insufficient { .. }
                    | HoldError::BeyondHold { .. },
                ) => false,
                Err(other) => panic!("{other}"),
            }
        }
        Operation::Capture { ref pick, nanos: n } => {
            let Some(id) = self::pick(book, pick) else {
                return false;
            };
            let account = book.hold(id).unwrap().account;
            let transfer = TransferId(ledger.transfers().len() as u64);
            let Ok(event) = book.prepare_capture(id, nanos(n), transfer, *now) else {
                return false;
            };
            // The transfer and the event are made durable together; here,
            // applied together.
            let charge = NewTransfer {
                debit: account,
                credit: producer(),
                amount: nanos(n),
                kind: TransferKind::Deposit,
            };
            let prepared = ledger.prepare(vec![charge], *now).unwrap();
            assert_eq!(prepared[0].id, transfer);
            ledger.commit(prepared);
            book.commit(vec![event]);
            true
        }
        Operation::Release { ref pick } => {
            let Some(id) = self::pick(book, pick) else {
                return false;
            };
            match book.prepare_release(id, *now) {
                Ok(event) => {
                    book.commit(vec![event]);
                    true
                }
                Err(HoldError::Ended(_)) => false,
                Err(other) => panic!("{other}"),
            }
        }
        Operation::Wait { ms } => {
            *now += ms;
            let due = book.prepare_expiries(*now);
            let any = !due.is_empty();
            book.commit(due);
            any
        }
    }
}

fn check(ledger: &Ledger, book: &HoldBook, now: u64) -> Result<(), TestCaseError> {
    let total = ledger.balances().fold(Amount::ZERO, |sum, (_, balance)| {
        sum.checked_add(*balance).unwrap()
    });
    prop_assert_eq!(total, Amount::ZERO, "balances sum to zero");
    for n in 0..CUSTOMERS {
        let account = customer(n);
        let balance = ledger.balance(&account);
        let available = book.available(&account, balance, now);
        prop_assert!(
            available <= balance,
            "available {} above balance {}",
            available,
            balance
        );
        // Rebuilt from its events at any point, the book says the same.
        let rebuilt = HoldBook::restore(book.events().to_vec()).unwrap();
        prop_assert_eq!(rebuilt.available(&account, balance, now), available);
    }
    for hold in book.holds() {
        prop_assert!(hold.captured <= hold.held, "{:?}", hold);
        let captured = book
            .events()
            .iter()
            .filter(|event| event.hold == hold.id)
            .filter_map(|event| match event.change {
                HoldChange::Captured { amount, transfer } => Some((amount, transfer)),
                _ => None,
            })
            .try_fold(Amount::ZERO, |sum, (amount, transfer)| {
                let posted = &ledger.transfers()[usize::try_from(transfer.0).unwrap()];
                prop_assert_eq!(posted.debit, hold.account);
                prop_assert_eq!(posted.amount, amount);
                Ok(sum.checked_add(amount).unwrap())
            })?;
        prop_assert_eq!(captured, hold.captured);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn holds_keep_the_ledger_whole_and_end_once(operations in prop::collection::vec(operation(), 1..80)) {
        let (mut ledger, mut book, mut now) = (Ledger::new(), HoldBook::new(), 1_000u64);
        for operation in &operations {
            let ended_before: Vec<_> = book.holds().filter(|hold| hold.ended.is_some()).cloned().collect();
            let events_before = book.events().len();
            let changed = run(&mut ledger, &mut book, operation, &mut now);
            if !changed {
                prop_assert_eq!(book.events().len(), events_before, "a refusal changes nothing");
            }
            for hold in ended_before {
                prop_assert_eq!(book.hold(hold.id), Some(&hold), "an ended hold never changes");
            }
            check(&ledger, &book, now)?;
        }
        // Long after: every hold has ended, once, and what it left is
        // available again.
        now += 1_000;
        let due = book.prepare_expiries(now);
        book.commit(due);
        for hold in book.holds() {
            let endings = book
                .events()
                .iter()
                .filter(|event| event.hold == hold.id)
                .filter(|event| matches!(event.change, HoldChange::Released | HoldChange::Expired))
                .count();
            prop_assert_eq!(endings, 1, "{:?}", hold);
            prop_assert!(matches!(hold.ended, Some(Ending::Released(_) | Ending::Expired(_))));
        }
        for n in 0..CUSTOMERS {
            let account = customer(n);
            prop_assert_eq!(book.available(&account, ledger.balance(&account), now), ledger.balance(&account));
        }
        prop_assert!(book.prepare_expiries(now + 1_000_000).is_empty(), "nothing expires twice");
        // Read back, the events give the same book.
        let restored = HoldBook::restore(book.events().to_vec()).unwrap();
        prop_assert_eq!(restored.holds().collect::<Vec<_>>(), book.holds().collect::<Vec<_>>());
        check(&ledger, &restored, now)?;
    }
}

#[test]
fn events_read_back_that_do_not_follow_are_refused_and_change_nothing() {
    let mut book = HoldBook::new();
    let account = customer(0);
    let placed = book
        .prepare_place(account, nanos(100), 50, "a match", nanos(100), 10)
        .unwrap();
    book.commit(vec![placed.clone()]);
    let capture = book
        .prepare_capture(HoldId(0), nanos(60), TransferId(7), 20)
        .unwrap();
    // A capture beyond the hold, an event out of order, an event after the
    // end: refused whole.
    let mut beyond = capture.clone();
    beyond.change = HoldChange::Captured {
        amount: nanos(101),
        transfer: TransferId(7),
    };
    assert!(book.clone().append_stored(vec![beyond]).is_err());
    let mut late = capture.clone();
    late.number = 5;
    assert!(book.clone().append_stored(vec![late]).is_err());
    let released = book.prepare_release(HoldId(0), 30).unwrap();
    let mut after_end = capture.clone();
    after_end.number = 2;
    let mut copy = book.clone();
    assert!(
        copy.append_stored(vec![released.clone(), after_end])
            .is_err()
    );
    assert_eq!(copy.events().len(), 1, "nothing of the refused events");
    // Expired before its time: refused.
    let mut early = book.prepare_expiries(50).pop().unwrap();
    early.at_ms = 49;
    assert!(book.clone().append_stored(vec![early]).is_err());
    // Past its expiry a hold holds nothing, captures nothing, and its
    // expiry is written once, dated at its expiry.
    assert_eq!(book.held(&account, 49), nanos(100));
    assert_eq!(book.held(&account, 50), Amount::ZERO);
    assert_eq!(
        book.prepare_capture(HoldId(0), nanos(1), TransferId(8), 50),
        Err(HoldError::Ended(HoldId(0)))
    );
    let due = book.prepare_expiries(70);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].at_ms, 50);
    book.commit(due);
    assert!(book.prepare_expiries(80).is_empty());
    assert_eq!(
        book.hold(HoldId(0)).unwrap().ended,
        Some(Ending::Expired(50))
    );
}

#[test]
fn a_hold_is_adjusted_within_what_can_be_spent_and_never_below_what_was_captured() {
    let mut book = HoldBook::new();
    let account = customer(1);
    let placed = book
        .prepare_place(account, nanos(100), 1_000, "stream", nanos(150), 0)
        .unwrap();
    book.commit(vec![placed]);
    let capture = book
        .prepare_capture(HoldId(0), nanos(70), TransferId(0), 1)
        .unwrap();
    book.commit(vec![capture]);
    // 30 left: reduced by 31 is refused, by 30 allowed.
    assert!(matches!(
        book.prepare_adjust(HoldId(0), nanos(-31), 2_000, nanos(50), 2),
        Err(HoldError::BeyondHold { .. })
    ));
    // More than can be spent: refused.
    assert!(matches!(
        book.prepare_adjust(HoldId(0), nanos(51), 2_000, nanos(50), 2),
        Err(HoldError::Insufficient { .. })
    ));
    let more = book
        .prepare_adjust(HoldId(0), nanos(50), 2_000, nanos(50), 2)
        .unwrap();
    book.commit(vec![more]);
    let hold = book.hold(HoldId(0)).unwrap();
    assert_eq!(
        (hold.held, hold.captured, hold.remaining()),
        (nanos(150), nanos(70), nanos(80))
    );
    assert_eq!(hold.expires_ms, 2_000, "the expiry moves with the change");
    // Bad placements.
    for (amount, expires, note) in [(0, 10, "x"), (5, 0, "x"), (5, 10, "a\u{7}bell")] {
        assert!(
            book.prepare_place(account, nanos(amount), expires, note, nanos(1_000), 0)
                .is_err()
        );
    }
    assert!(
        book.prepare_place(account, nanos(5), 10, &"x".repeat(501), nanos(1_000), 0)
            .is_err()
    );
}
