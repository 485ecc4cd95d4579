//! Ledger invariants after random sequences of deposits, uses, withdrawals,
//! corrections and invalid batches: the sum of all balances is zero, each
//! balance is the sum of its postings, and no posted transfer ever changes.

use backoffice::ledger::{AccountId, Ledger, NewTransfer, SystemAccount, TransferId, TransferKind};
use proptest::prelude::*;
use proto::{Amount, BatchId, Cid, Pid};

const CUSTOMERS: u32 = 6;
const FUNDING: AccountId = AccountId::System(SystemAccount::Funding);

fn customer(n: u32) -> AccountId {
    AccountId::Customer(Cid::parse(&format!("B1-C{n}")).unwrap())
}

#[derive(Debug, Clone)]
enum Operation {
    Deposit {
        to: u32,
        nanos: i64,
    },
    Withdraw {
        from: u32,
        nanos: i64,
    },
    Uses {
        payer: u32,
        owner: u32,
        nanos: Vec<i64>,
    },
    Correct {
        pick: prop::sample::Index,
    },
    /// A batch whose last transfer is invalid: nothing may be posted.
    Poisoned {
        payer: u32,
        owner: u32,
        nanos: i64,
    },
    /// A deposit too large for any balance.
    Overflowing {
        to: u32,
    },
}

fn operation() -> impl Strategy<Value = Operation> {
    let who = 0..CUSTOMERS;
    let nanos = 1i64..=5_000_000_000_000;
    prop_oneof![
        (who.clone(), nanos.clone()).prop_map(|(to, nanos)| Operation::Deposit { to, nanos }),
        (who.clone(), nanos.clone()).prop_map(|(from, nanos)| Operation::Withdraw { from, nanos }),
        (
            who.clone(),
            who.clone(),
            prop::collection::vec(1i64..=1_000_000_000, 1..20)
        )
            .prop_map(|(payer, owner, nanos)| Operation::Uses {
                payer,
                owner,
                nanos
            }),
        any::<prop::sample::Index>().prop_map(|pick| Operation::Correct { pick }),
        (who.clone(), who.clone(), nanos).prop_map(|(payer, owner, nanos)| Operation::Poisoned {
            payer,
            owner,
            nanos
        }),
        who.prop_map(|to| Operation::Overflowing { to }),
    ]
}

fn use_kind(uses: u64) -> TransferKind {
    TransferKind::Use {
        pid: Pid::parse("B1-P1").unwrap(),
        batch: BatchId::parse("B1-M1:1").unwrap(),
        uses,
    }
}

fn batch_of(ledger: &Ledger, operation: &Operation) -> Vec<NewTransfer> {
    let transfer = |debit, credit, nanos: i64, kind| NewTransfer {
        debit,
        credit,
        amount: Amount::from_nanos(nanos),
        kind,
    };
    match operation {
        Operation::Deposit { to, nanos } => vec![transfer(
            FUNDING,
            customer(*to),
            *nanos,
            TransferKind::Deposit,
        )],
        Operation::Withdraw { from, nanos } => {
            vec![transfer(
                customer(*from),
                FUNDING,
                *nanos,
                TransferKind::Withdrawal,
            )]
        }
        Operation::Uses {
            payer,
            owner,
            nanos,
        } => nanos
            .iter()
            .enumerate()
            .map(|(seq, &n)| transfer(customer(*payer), customer(*owner), n, use_kind(seq as u64)))
            .collect(),
        Operation::Correct { pick } => match ledger.transfers() {
            [] => Vec::new(),
            transfers => {
                let original = &transfers[pick.index(transfers.len())];
                vec![NewTransfer {
                    debit: original.credit,
                    credit: original.debit,
                    amount: original.amount,
                    kind: TransferKind::Correction { of: original.id },
                }]
            }
        },
        Operation::Poisoned {
            payer,
            owner,
            nanos,
        } => vec![
            transfer(customer(*payer), customer(*owner), *nanos, use_kind(0)),
            transfer(customer(*payer), customer(*owner), 0, use_kind(1)),
        ],
        Operation::Overflowing { to } => vec![
            NewTransfer {
                debit: FUNDING,
                credit: customer(*to),
                amount: Amount::parse("999999999999999999").unwrap(),
                kind: TransferKind::Deposit,
            };
            2
        ],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn invariants_hold_after_any_sequence(operations in prop::collection::vec(operation(), 1..60)) {
        let mut ledger = Ledger::new();
        for operation in &operations {
            let before = ledger.transfers().to_vec();
            let balances_before: Vec<(AccountId, Amount)> =
                ledger.balances().map(|(account, balance)| (*account, *balance)).collect();
            let batch = batch_of(&ledger, operation);
            let size = batch.len();
            let outcome = ledger.post(batch, 0);
            // Posted transfers never change; a failed batch changes nothing.
            prop_assert_eq!(&ledger.transfers()[..before.len()], &before[..]);
            match outcome {
                Ok(first) => {
                    prop_assert_eq!(first, TransferId(before.len() as u64));
                    prop_assert_eq!(ledger.transfers().len(), before.len() + size);
                }
                Err(_) => {
                    let expected = match operation {
                        Operation::Poisoned { .. } | Operation::Overflowing { .. } => true,
                        // A use paid by its own owner is a transfer to itself.
                        Operation::Uses { payer, owner, .. } => payer == owner,
                        _ => false,
                    };
                    prop_assert!(expected, "only invalid batches fail: {:?}", operation);
                    prop_assert_eq!(ledger.transfers().len(), before.len());
                    for (account, balance) in &balances_before {
                        prop_assert_eq!(ledger.balance(account), *balance);
                    }
                }
            }
            ledger.verify();
            let total = ledger
                .balances()
                .try_fold(Amount::ZERO, |sum, (_, balance)| sum.checked_add(*balance))
                .unwrap();
            prop_assert!(total.is_zero());
        }
    }
}
