//! The suite every store must pass: what the rest of the backoffice may
//! rely on whichever store runs. A store's tests call
//! `conformance_tests!(harness)` with a harness that opens the store under
//! test, fresh for each test and again on the same data when asked (what
//! a restart sees). What only one store can show (sled's behaviour after a
//! power cut, its on-disk records) stays in that store's own tests.

use proto::{Amount, BatchId, Bid, Cid, Mid, Pid};

use super::*;
use crate::ledger::{AccountId, NewTransfer, SystemAccount, TransferKind};
use crate::registry::{self, Change};

/// Opens the store under test: a new, empty one for each harness, and the
/// same data again on each later call (the previous store dropped first).
pub(crate) trait Harness {
    /// The store.
    type Store: Store + Sync;
    /// Opens it.
    fn open(&self) -> Self::Store;
    /// Cuts the last byte off the first itemised record `store` keeps, as a
    /// bad disk or a wrong hand would.
    fn damage_an_itemised_record(&self, store: &Self::Store);
}

/// One `#[test]` per conformance case, each with a fresh `$harness`.
macro_rules! conformance_tests {
    ($harness:expr) => {
        #[test]
        fn the_registry_issues_ids_in_order_and_keeps_records() {
            $crate::store::conformance::the_registry_issues_ids_in_order_and_keeps_records(&$harness);
        }
        #[test]
        fn concurrent_changes_of_a_customer_never_undo_each_other() {
            $crate::store::conformance::concurrent_changes_of_a_customer_never_undo_each_other(&$harness);
        }
        #[test]
        fn a_telephone_number_names_one_customer_and_moves_with_their_changes() {
            $crate::store::conformance::a_telephone_number_names_one_customer_and_moves_with_their_changes(&$harness);
        }
        #[test]
        fn batches_apply_once_and_survive_reopen() {
            $crate::store::conformance::batches_apply_once_and_survive_reopen(&$harness);
        }
        #[test]
        fn itemised_records_are_kept_with_their_batch_found_by_transfer_and_pruned_in_bounded_steps() {
            $crate::store::conformance::itemised_records_are_kept_with_their_batch_found_by_transfer_and_pruned_in_bounded_steps(&$harness);
        }
        #[test]
        fn grants_are_kept_listed_and_revoked_only_by_their_customer() {
            $crate::store::conformance::grants_are_kept_listed_and_revoked_only_by_their_customer(&$harness);
        }
        #[test]
        fn a_meter_secret_is_rotated_and_revoked_only_by_its_owner_or_the_operator() {
            $crate::store::conformance::a_meter_secret_is_rotated_and_revoked_only_by_its_owner_or_the_operator(&$harness);
        }
        #[test]
        fn suspense_is_kept_paged_in_one_order_counted_and_resolved_once() {
            $crate::store::conformance::suspense_is_kept_paged_in_one_order_counted_and_resolved_once(&$harness);
        }
        #[test]
        fn period_counts_are_set_and_free_counts_added_per_payer_product_and_month() {
            $crate::store::conformance::period_counts_are_set_and_free_counts_added_per_payer_product_and_month(&$harness);
        }
        #[test]
        fn the_one_sequence_range_a_batch_overlaps_is_found_at_any_u64() {
            $crate::store::conformance::the_one_sequence_range_a_batch_overlaps_is_found_at_any_u64(&$harness);
        }
        #[test]
        fn hold_events_are_kept_with_their_captures_once_and_read_back() {
            $crate::store::conformance::hold_events_are_kept_with_their_captures_once_and_read_back(&$harness);
        }
        #[test]
        fn payment_requests_are_kept_once_with_their_transfers_and_verified() {
            $crate::store::conformance::payment_requests_are_kept_once_with_their_transfers_and_verified(&$harness);
        }
        #[test]
        fn a_nonce_is_claimed_once_while_live_across_threads_and_restarts() {
            $crate::store::conformance::a_nonce_is_claimed_once_while_live_across_threads_and_restarts(&$harness);
        }
        #[test]
        fn a_deposit_moves_through_its_steps_once_and_posts_one_transfer() {
            $crate::store::conformance::a_deposit_moves_through_its_steps_once_and_posts_one_transfer(&$harness);
        }
        #[test]
        fn transfers_posted_outside_batches_load_back_as_the_same_ledger() {
            $crate::store::conformance::transfers_posted_outside_batches_load_back_as_the_same_ledger(&$harness);
        }
    };
}
pub(crate) use conformance_tests;

pub(crate) fn customer(n: u32) -> AccountId {
    AccountId::Customer(Cid::parse(&format!("B1-C{n}")).unwrap())
}

pub(crate) fn key(n: u32) -> BatchKey {
    BatchKey {
        mid: Mid::parse("B1-M1").unwrap(),
        id: BatchId::parse(&format!("B1-M1:{n}")).unwrap(),
    }
}

pub(crate) fn batch(payer: u32, owner: u32, nanos: i64) -> Vec<NewTransfer> {
    vec![
        NewTransfer {
            debit: AccountId::System(SystemAccount::Funding),
            credit: customer(payer),
            amount: Amount::from_nanos(nanos * 10),
            kind: TransferKind::Deposit,
        },
        NewTransfer {
            debit: customer(payer),
            credit: customer(owner),
            amount: Amount::from_nanos(nanos),
            kind: TransferKind::Use {
                pid: Pid::parse("B1-P1").unwrap(),
                batch: key(1).id,
                uses: 7,
            },
        },
    ]
}

pub(crate) fn the_registry_issues_ids_in_order_and_keeps_records(harness: &impl Harness) {
    let bid = Bid::parse("B1").unwrap();
    let (ada, product, meter) = {
        let store = harness.open();
        let ada = store
            .create_customer(&bid, "Ada", "ada@example.org")
            .unwrap();
        let bob = store
            .create_customer(&bid, "Bob", "bob@example.org")
            .unwrap();
        assert_eq!((ada.cid.as_str(), bob.cid.as_str()), ("B1-C1", "B1-C2"));
        // Read together, in the order asked, unknown ones as none.
        let nobody = Cid::parse("B1-C99").unwrap();
        assert_eq!(
            store
                .customers(&[bob.cid, nobody, ada.cid, bob.cid])
                .unwrap(),
            vec![
                Some(bob.clone()),
                None,
                Some(ada.clone()),
                Some(bob.clone())
            ]
        );
        assert_eq!(store.customers(&[]).unwrap(), vec![]);
        assert!(matches!(
            store.create_customer(&bid, "Eve", "not an address"),
            Err(StoreError::Registry(RegistryError::BadEmail))
        ));
        let editor = NewProduct {
            owner: &ada.cid,
            name: "Editor",
            description: "",
            terms: "0.25 per use",
            taca: b"\0asm module",
            max_price: Amount::parse("0.25").unwrap(),
        };
        let product = store.create_product(&bid, editor).unwrap();
        assert_eq!(product.max_price, Some(Amount::parse("0.25").unwrap()));
        assert!(matches!(
            store.create_product(
                &bid,
                NewProduct {
                    max_price: Amount::ZERO,
                    ..editor
                }
            ),
            Err(StoreError::Registry(RegistryError::BadMaxPrice(_)))
        ));
        assert_eq!(
            (product.pid.as_str(), product.test_pid.as_str()),
            ("B1-P1", "B1-P1T")
        );
        let stranger = Cid::parse("B1-C99").unwrap();
        let stranger_product = NewProduct {
            owner: &stranger,
            ..editor
        };
        assert!(store.create_product(&bid, stranger_product).is_err());
        let meter = store.create_meter(&bid, &bob.cid).unwrap();
        assert_eq!(meter.mid.as_str(), "B1-M1");
        (ada, product, meter)
    };
    let store = harness.open();
    assert_eq!(store.customer(&ada.cid).unwrap(), Some(ada.clone()));
    assert_eq!(store.product(&product.pid).unwrap(), Some(product.clone()));
    assert_eq!(
        store.product(&product.test_pid).unwrap(),
        Some(product.clone())
    );
    assert_eq!(
        store.taca_module(&product.taca).unwrap().as_deref(),
        Some(&b"\0asm module"[..])
    );
    assert_eq!(store.meter(&meter.mid).unwrap(), Some(meter));
    let denied = Customer {
        denied: true,
        ..ada
    };
    store
        .change_customer(&denied.cid, &|customer| customer.denied = true)
        .unwrap();
    let ada_cid = denied.cid;
    assert_eq!(store.customer(&denied.cid).unwrap(), Some(denied));
    // Terms, as every batch reads them (the sled store keeps them in
    // memory): a change, and a customer made after a batch named their
    // CID, are seen at once by the next read.
    let c3 = Cid::parse("B1-C3").unwrap();
    assert_eq!(
        store.customer_terms(&[ada_cid, c3]).unwrap(),
        vec![Some((Amount::ZERO, true)), None]
    );
    let limit = Amount::parse("-5").unwrap();
    store
        .change_customer(&ada_cid, &|customer| {
            customer.credit_limit = limit;
            customer.denied = false;
        })
        .unwrap();
    // Serials continue after a reopen.
    let carol = store
        .create_customer(&bid, "Carol", "carol@example.org")
        .unwrap();
    assert_eq!(carol.cid.as_str(), "B1-C3");
    assert_eq!(
        store.customer_terms(&[ada_cid, c3]).unwrap(),
        vec![Some((limit, false)), Some((Amount::ZERO, false))]
    );
}

/// Two writers change different fields of one customer at once (an
/// operator's credit limit, the customer's own name): neither undoes
/// the other, as writing back a whole record read earlier would.
pub(crate) fn concurrent_changes_of_a_customer_never_undo_each_other(harness: &impl Harness) {
    let store = harness.open();
    let bid = Bid::parse("B1").unwrap();
    let ada = store
        .create_customer(&bid, "Ada", "ada@example.org")
        .unwrap();
    std::thread::scope(|scope| {
        let (store, cid) = (&store, ada.cid);
        scope.spawn(move || {
            for n in 1..=100 {
                store
                    .change_customer(&cid, &|customer| customer.name = format!("Ada {n}"))
                    .unwrap();
            }
        });
        scope.spawn(move || {
            for n in 1..=100 {
                store
                    .change_customer(&cid, &|customer| {
                        customer.credit_limit = Amount::from_units(n).unwrap();
                    })
                    .unwrap();
            }
        });
    });
    let saved = store.customer(&ada.cid).unwrap().unwrap();
    assert_eq!(saved.name, "Ada 100");
    assert_eq!(saved.credit_limit, Amount::from_units(100).unwrap());
    // A change that breaks a rule changes nothing.
    let refused = store.change_customer(&ada.cid, &|customer| customer.email = "nope".into());
    assert!(matches!(
        refused,
        Err(StoreError::Registry(RegistryError::BadEmail))
    ));
    assert_eq!(store.customer(&ada.cid).unwrap().unwrap(), saved);
}

pub(crate) fn a_telephone_number_names_one_customer_and_moves_with_their_changes(
    harness: &impl Harness,
) {
    let bid = Bid::parse("B1").unwrap();
    let (ada, bob) = {
        let store = harness.open();
        let ada = store
            .create_customer(&bid, "Ada", "ada@example.org")
            .unwrap();
        let bob = store
            .create_customer(&bid, "Bob", "bob@example.org")
            .unwrap();
        assert_eq!(store.customer_by_phone("+4915112345678").unwrap(), None);
        let set = |cid: &Cid, phone: Option<&str>| {
            let phone = phone.map(str::to_owned);
            store.change_customer(cid, &|customer| customer.phone.clone_from(&phone))
        };
        set(&ada.cid, Some("+4915112345678")).unwrap();
        let found = store.customer_by_phone("+4915112345678").unwrap().unwrap();
        assert_eq!(found.cid, ada.cid);
        // Another customer cannot take it; a number not in stored form is
        // refused; neither changes anything.
        assert!(matches!(
            set(&bob.cid, Some("+4915112345678")),
            Err(StoreError::Registry(RegistryError::PhoneTaken))
        ));
        assert!(matches!(
            set(&bob.cid, Some("+49 151 1234 5678")),
            Err(StoreError::Registry(RegistryError::BadPhone))
        ));
        assert_eq!(store.customer(&bob.cid).unwrap().unwrap().phone, None);
        // Setting the same number again is no change; another number frees
        // the old one, which Bob then takes.
        set(&ada.cid, Some("+4915112345678")).unwrap();
        set(&ada.cid, Some("+12125550100")).unwrap();
        assert_eq!(store.customer_by_phone("+4915112345678").unwrap(), None);
        set(&bob.cid, Some("+4915112345678")).unwrap();
        (ada.cid, bob.cid)
    };
    // After a restart: found by number, and a removed number frees it.
    let store = harness.open();
    let by = |phone: &str| store.customer_by_phone(phone).unwrap().map(|c| c.cid);
    assert_eq!(by("+4915112345678"), Some(bob));
    assert_eq!(by("+12125550100"), Some(ada));
    store
        .change_customer(&ada, &|customer| customer.phone = None)
        .unwrap();
    assert_eq!(by("+12125550100"), None);
    // Two customers racing for one number: exactly one holds it.
    let carol = store
        .create_customer(&bid, "Carol", "carol@example.org")
        .unwrap()
        .cid;
    let won: Vec<bool> = std::thread::scope(|scope| {
        let store = &store;
        let racers: Vec<_> = [ada, carol]
            .into_iter()
            .map(|cid| {
                scope.spawn(move || {
                    store
                        .change_customer(&cid, &|customer| {
                            customer.phone = Some("+33142000000".into());
                        })
                        .is_ok()
                })
            })
            .collect();
        racers
            .into_iter()
            .map(|racer| racer.join().unwrap())
            .collect()
    });
    assert_eq!(won.iter().filter(|won| **won).count(), 1, "{won:?}");
    let holder = by("+33142000000").unwrap();
    assert_eq!(
        store.customer(&holder).unwrap().unwrap().phone.as_deref(),
        Some("+33142000000")
    );
}

pub(crate) fn batches_apply_once_and_survive_reopen(harness: &impl Harness) {
    let mut ledger = Ledger::new();
    {
        let store = harness.open();
        let first = ledger.post(batch(1, 2, 100), 0).unwrap();
        let posted = &ledger.transfers()[usize::try_from(first.0).unwrap()..];
        let effects = |answer: &'static [u8]| BatchEffects {
            transfers: posted,
            period_uses: &[],
            free_uses: &[],
            suspense: &[],
            answer,
            digest: Some([7; 32]),
            seq_range: None,
        };
        store.apply_batch(&key(1), effects(b"answer one")).unwrap();
        assert!(matches!(
            store.apply_batch(&key(1), effects(b"again")),
            Err(StoreError::AlreadyApplied(_))
        ));
        assert_eq!(
            store.applied_batch(&key(1)).unwrap(),
            Some(AppliedBatch {
                digest: Some([7; 32]),
                answer: b"answer one".to_vec()
            })
        );
        assert_eq!(store.applied_batch(&key(2)).unwrap(), None);
    }
    let store = harness.open();
    let restored = store.load_ledger().unwrap();
    assert_eq!(restored.transfers(), ledger.transfers());
    assert_eq!(restored.balance(&customer(1)), ledger.balance(&customer(1)));
    assert_eq!(restored.balance(&customer(2)), Amount::from_nanos(100));
    restored.verify();
}

pub(crate) fn itemised_records_are_kept_with_their_batch_found_by_transfer_and_pruned_in_bounded_steps(
    harness: &impl Harness,
) {
    use crate::itemised::{Encoder, Outcome};
    use proto::reading::{Event, Reading};
    let store = harness.open();
    let mut ledger = Ledger::new();
    // Three batches, applied on days 1, 2 and 3; each posts two transfers
    // and keeps two records.
    let day = 24 * 3600 * 1000;
    for n in 1..=3u32 {
        let first = ledger.post(batch(1, 2, 100), 0).unwrap();
        let posted = &ledger.transfers()[usize::try_from(first.0).unwrap()..];
        let mut encoder = Encoder::new(
            key(n).mid,
            key(n).id,
            u64::from(n) * day,
            Some((posted[0].id, posted[1].id)),
        );
        for seq in 0..12_000 {
            let reading = Reading {
                seq,
                time_ms: 5,
                context: proto::Context::parse("pid:1").unwrap(),
                event: Event::Login(Cid::parse("B1-C1").unwrap()),
            };
            encoder.push(&reading, &Outcome::NotPriced);
        }
        let records = encoder.finish();
        assert_eq!(records.len(), 2);
        let effects = BatchEffects {
            transfers: posted,
            period_uses: &[],
            free_uses: &[],
            suspense: &[],
            answer: b"",
            digest: None,
            seq_range: None,
        };
        store
            .stage_batch_itemised(&key(n), effects, u64::from(n) * day, &records)
            .unwrap();
        if n == 1 {
            // Refused with the batch: nothing of it is kept twice.
            assert!(matches!(
                store.stage_batch_itemised(&key(n), effects, 9 * day, &records),
                Err(StoreError::AlreadyApplied(_))
            ));
        }
    }
    store.sync().unwrap();
    // Transfers 0-1 are batch 1's deposit and use, 2-3 batch 2's...
    for (transfer, n) in [(0, 1), (1, 1), (2, 2), (5, 3)] {
        assert_eq!(
            store
                .itemised_batch_of_transfer(TransferId(transfer))
                .unwrap()
                .map(|at| at.key),
            Some(key(n)),
            "transfer {transfer}"
        );
    }
    assert_eq!(
        store.itemised_batch_of_transfer(TransferId(6)).unwrap(),
        None
    );
    let kept = store.itemised_batch(&key(2)).unwrap().unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0].arrived_ms, 2 * day);
    assert_eq!(kept[0].items.len() + kept[1].items.len(), 12_000);
    // Pruning takes at most the records asked for, oldest first, and
    // nothing applied at or after the cut.
    assert_eq!(store.prune_itemised(3 * day, 3).unwrap(), 3);
    assert_eq!(store.itemised_batch(&key(1)).unwrap(), None);
    assert_eq!(
        store.itemised_batch_of_transfer(TransferId(1)).unwrap(),
        None
    );
    // Batch 2's first record went: it is no longer found.
    assert_eq!(store.itemised_batch(&key(2)).unwrap(), None);
    // A retention of one day, at the start of day 4: what came before
    // day 3 goes, the rest stays.
    let pruned = crate::itemised::prune(&store, day, 4 * day, std::time::Duration::ZERO);
    assert_eq!(pruned.unwrap(), 1);
    assert_eq!(store.prune_itemised(3 * day, 3).unwrap(), 0);
    assert_eq!(store.itemised_batch(&key(2)).unwrap(), None);
    assert_eq!(store.itemised_batch(&key(3)).unwrap().unwrap().len(), 2);
    assert_eq!(
        store
            .itemised_batch_of_transfer(TransferId(4))
            .unwrap()
            .map(|at| at.key),
        Some(key(3))
    );
    // A damaged record is reported, never a panic.
    harness.damage_an_itemised_record(&store);
    assert!(matches!(
        store.itemised_batch(&key(3)),
        Err(StoreError::Corrupt(_))
    ));
}

pub(crate) fn grants_are_kept_listed_and_revoked_only_by_their_customer(harness: &impl Harness) {
    let bid = Bid::parse("B1").unwrap();
    let store = harness.open();
    let ada = store
        .create_customer(&bid, "Ada", "ada@example.org")
        .unwrap();
    let bob = store
        .create_customer(&bid, "Bob", "bob@example.org")
        .unwrap();
    let meter = store.create_meter(&bid, &ada.cid).unwrap();
    let new = |cid: Cid| NewGrant {
        mid: meter.mid,
        cid,
        scope: proto::grant::Scope::User {
            uid: 1000,
            name: "bob".into(),
        },
        label: "laptop".into(),
        created_ms: 1_000,
        expires_ms: Some(5_000),
    };
    let first = store.create_grant(new(bob.cid)).unwrap();
    let second = store.create_grant(new(ada.cid)).unwrap();
    assert_eq!((first.id, second.id), (1, 2));
    assert!(first.is_live_at(1_000) && first.is_live_at(4_999));
    assert!(!first.is_live_at(999) && !first.is_live_at(5_000));
    let stranger = Cid::parse("B1-C99").unwrap();
    assert!(store.create_grant(new(stranger)).is_err());
    // Read once, so the meter's grants are kept in memory: a change
    // must still show.
    assert_eq!(store.grants_of_meter(&meter.mid).unwrap().len(), 2);
    assert!(matches!(
        store.revoke_grant(first.id, Some(&ada.cid), 2_000),
        Err(StoreError::Registry(RegistryError::UnknownGrant(1)))
    ));
    let revoked = store.revoke_grant(first.id, Some(&bob.cid), 2_000).unwrap();
    assert!(revoked.is_live_at(1_999) && !revoked.is_live_at(2_000));
    let again = store.revoke_grant(first.id, None, 3_000).unwrap();
    assert_eq!(again.revoked_ms, Some(2_000), "a revocation is not moved");
    assert_eq!(store.grants_of_meter(&meter.mid).unwrap()[0], revoked);
    // A new grant of Ada for the same users replaces her first.
    let again = store
        .create_grant(NewGrant {
            created_ms: 3_000,
            ..new(ada.cid)
        })
        .unwrap();
    let of_meter = store.grants_of_meter(&meter.mid).unwrap();
    assert_eq!(of_meter.len(), 3);
    assert_eq!(of_meter[1].id, second.id);
    assert_eq!(of_meter[1].revoked_ms, Some(3_000), "replaced");
    assert_eq!(of_meter[2], again);
    let second = of_meter[1].clone();
    drop(store);
    let store = harness.open();
    assert_eq!(
        store.grants_of_meter(&meter.mid).unwrap(),
        vec![revoked.clone(), second.clone(), again.clone()]
    );
    assert_eq!(store.grants_of_customer(&bob.cid).unwrap(), vec![revoked]);
    assert_eq!(
        store.grants_of_customer(&ada.cid).unwrap(),
        vec![second, again]
    );
}

pub(crate) fn a_meter_secret_is_rotated_and_revoked_only_by_its_owner_or_the_operator(
    harness: &impl Harness,
) {
    let bid = Bid::parse("B1").unwrap();
    let store = harness.open();
    let ada = store
        .create_customer(&bid, "Ada", "ada@example.org")
        .unwrap();
    let bob = store
        .create_customer(&bid, "Bob", "bob@example.org")
        .unwrap();
    let meter = store.create_meter(&bid, &ada.cid).unwrap();
    let secrets = |meter: &Meter, now_ms: u64| -> Vec<String> {
        meter
            .secrets_at(now_ms)
            .into_iter()
            .map(|(hex, _)| hex.to_owned())
            .collect()
    };
    // Bob finds no meter of his under Ada's MID: nothing changes.
    for attempt in [
        store.rotate_meter_secret(&meter.mid, Actor::Owner(bob.cid), 1_000, 0),
        store.revoke_meter(&meter.mid, Actor::Owner(bob.cid), 1_000),
    ] {
        assert!(matches!(
            attempt,
            Err(StoreError::Registry(RegistryError::UnknownMeter(_)))
        ));
    }
    assert_eq!(store.meter(&meter.mid).unwrap(), Some(meter.clone()));
    assert!(matches!(
        store.rotate_meter_secret(
            &meter.mid,
            Actor::Operator,
            1_000,
            registry::ROTATION_GRACE_MS_MAX + 1
        ),
        Err(StoreError::Registry(RegistryError::GraceTooLong))
    ));
    // Ada rotates: both secrets verify inside the grace, the new one after.
    let rotated = store
        .rotate_meter_secret(&meter.mid, Actor::Owner(ada.cid), 1_000, 500)
        .unwrap();
    assert_ne!(rotated.secret_hex, meter.secret_hex);
    assert_eq!(
        secrets(&rotated, 1_499),
        vec![rotated.secret_hex.clone(), meter.secret_hex.clone()]
    );
    assert_eq!(secrets(&rotated, 1_500), vec![rotated.secret_hex.clone()]);
    assert_eq!(
        rotated.rotated,
        Some(Change {
            at_ms: 1_000,
            by: Actor::Owner(ada.cid)
        })
    );
    // An upload with an older secret than the current one retires nothing.
    store
        .retire_previous_secret(&meter.mid, &meter.secret_hex)
        .unwrap();
    assert_eq!(store.meter(&meter.mid).unwrap(), Some(rotated.clone()));
    store
        .retire_previous_secret(&meter.mid, &rotated.secret_hex)
        .unwrap();
    let retired = store.meter(&meter.mid).unwrap().unwrap();
    assert_eq!(retired.previous, None);
    assert_eq!(secrets(&retired, 1_001), vec![rotated.secret_hex.clone()]);
    // Without a grace (a leaked secret) the old one is refused at once.
    let at_once = store
        .rotate_meter_secret(&meter.mid, Actor::Operator, 2_000, 0)
        .unwrap();
    assert_eq!(secrets(&at_once, 2_000), vec![at_once.secret_hex.clone()]);
    // Revoked: no secret verifies, for good; no new secret, no new grant.
    let revoked = store
        .revoke_meter(&meter.mid, Actor::Operator, 3_000)
        .unwrap();
    assert!(secrets(&revoked, 3_000).is_empty());
    assert!(secrets(&revoked, 0).is_empty());
    let again = store
        .revoke_meter(&meter.mid, Actor::Owner(ada.cid), 4_000)
        .unwrap();
    assert_eq!(again, revoked, "a revocation is not moved or undone");
    assert!(matches!(
        store.rotate_meter_secret(&meter.mid, Actor::Operator, 4_000, 0),
        Err(StoreError::Registry(RegistryError::MeterRevoked(_)))
    ));
    assert!(matches!(
        store.create_grant(NewGrant {
            mid: meter.mid,
            cid: ada.cid,
            scope: proto::grant::Scope::Machine,
            label: "laptop".into(),
            created_ms: 4_000,
            expires_ms: None,
        }),
        Err(StoreError::Registry(RegistryError::MeterRevoked(_)))
    ));
    assert_eq!(
        revoked.revoked,
        Some(Change {
            at_ms: 3_000,
            by: Actor::Operator
        })
    );
    // A new meter of Ada's gets a new MID.
    let new = store.create_meter(&bid, &ada.cid).unwrap();
    assert_ne!(new.mid, meter.mid);
    drop(store);
    let store = harness.open();
    assert_eq!(store.meter(&meter.mid).unwrap(), Some(revoked));
}

fn suspended(mid: &str, batch: &str, seq: u64) -> Suspense {
    Suspense {
        mid: Mid::parse(mid).unwrap(),
        batch: BatchId::parse(batch).unwrap(),
        seq,
        pid: Pid::parse("B1-P1").unwrap(),
        payer: Some("B1-C1".to_owned()),
        time_ms: 1_000 + seq % 1_000,
        reason: format!("unknown product (reading {seq})"),
        authorized: true,
        arrived_ms: 2_000,
    }
}

fn effects<'a>(
    transfers: &'a [Transfer],
    suspense: &'a [Suspense],
    seq_range: Option<&'a SeqRange>,
) -> BatchEffects<'a> {
    BatchEffects {
        transfers,
        period_uses: &[],
        free_uses: &[],
        suspense,
        answer: b"",
        digest: Some([1; 32]),
        seq_range,
    }
}

pub(crate) fn suspense_is_kept_paged_in_one_order_counted_and_resolved_once(
    harness: &impl Harness,
) {
    let store = harness.open();
    // Two meters, two batches each, sequence numbers out of order and one
    // past 2^63; one reading sent again in a later batch is kept once.
    let first = vec![
        suspended("B1-M2", "B1-M2:1", 7),
        suspended("B1-M2", "B1-M2:1", 3),
        suspended("B1-M1", "B1-M1:9", u64::MAX - 1),
    ];
    // A reading named twice in one batch is kept once, as last named.
    let renamed = Suspense {
        reason: "named again".to_owned(),
        ..suspended("B1-M1", "B1-M1:10", 0)
    };
    let second = vec![
        suspended("B1-M1", "B1-M1:9", 1 << 63),
        suspended("B1-M1", "B1-M1:10", 0),
        suspended("B1-M2", "B1-M2:1", 3),
        renamed.clone(),
    ];
    store
        .apply_batch(&key(1), effects(&[], &first, None))
        .unwrap();
    store
        .apply_batch(&key(2), effects(&[], &second, None))
        .unwrap();
    assert_eq!(store.suspense_count().unwrap(), 5);
    let all = store.suspense().unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.contains(&renamed), "{all:?}");
    // Pages of two from cursors give the same readings in the same order.
    let mut paged = Vec::new();
    let mut after: Option<SuspenseCursor> = None;
    loop {
        let page = store.suspense_page(after.as_ref(), 2).unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(SuspenseCursor::of(last));
        paged.extend(page);
    }
    assert_eq!(paged, all);
    // Within a batch, in sequence order, u64 order past 2^63 too.
    let seqs: Vec<u64> = all
        .iter()
        .filter(|record| record.batch.as_str() == "B1-M1:9")
        .map(|record| record.seq)
        .collect();
    assert_eq!(seqs, vec![1 << 63, u64::MAX - 1]);
    // Two readings are priced: out of suspense with their transfer and
    // counts, in one step; resolving them again changes nothing.
    let mut ledger = Ledger::new();
    ledger.post(batch(1, 2, 3), 5).unwrap();
    let period = PeriodKey {
        payer: Cid::parse("B1-C1").unwrap(),
        pid: Pid::parse("B1-P1").unwrap(),
        month: 202_612,
    };
    let resolved = vec![all[0].clone(), all[3].clone()];
    store
        .resolve_suspense_itemised(
            &resolved,
            ledger.transfers(),
            &[(period, 2)],
            &[(period, 1)],
            9_000,
            &[],
        )
        .unwrap();
    assert_eq!(store.suspense_count().unwrap(), 3);
    // Resolving them again (a second re-pricing that read them before the
    // first ended) is refused whole: no second transfer, no second count.
    let mut again = ledger.clone();
    let before = again.transfers().len();
    again.post(batch(1, 2, 3), 6).unwrap();
    assert!(matches!(
        store.resolve_suspense_itemised(
            &resolved,
            &again.transfers()[before..],
            &[(period, 4)],
            &[(period, 1)],
            9_001,
            &[],
        ),
        Err(StoreError::Corrupt(_))
    ));
    // One of them still in suspense and one not: refused whole as well.
    assert!(
        store
            .resolve_suspense_itemised(
                &[all[1].clone(), all[0].clone()],
                &again.transfers()[before..],
                &[],
                &[],
                9_002,
                &[],
            )
            .is_err()
    );
    // Itemised records are never overwritten: a second re-pricing whose
    // records of the same batch would take the same key is refused whole,
    // and the first one's records stay.
    let left = store.suspense().unwrap();
    let (one, other) = (left[0].clone(), left[1].clone());
    // Both sets name the first one's batch (the store keys them by it).
    let repriced = |record: &Suspense, uses: u64| {
        use crate::itemised::{Encoder, Outcome};
        let mut encoder = Encoder::repriced(one.mid, one.batch.clone(), 9_100);
        let reading = proto::reading::Reading {
            seq: record.seq,
            time_ms: 5,
            context: proto::Context::parse("suspense").unwrap(),
            event: proto::reading::Event::Login(Cid::parse("B1-C1").unwrap()),
        };
        for _ in 0..uses {
            encoder.push(&reading, &Outcome::NotPriced);
        }
        RepricedItems {
            key: BatchKey {
                mid: one.mid,
                id: one.batch.clone(),
            },
            transfers: Vec::new(),
            records: encoder.finish(),
        }
    };
    let first_set = repriced(&one, 1);
    store
        .resolve_suspense_itemised(
            std::slice::from_ref(&one),
            &[],
            &[],
            &[],
            9_100,
            std::slice::from_ref(&first_set),
        )
        .unwrap();
    let taken = store.resolve_suspense_itemised(
        std::slice::from_ref(&other),
        &[],
        &[],
        &[],
        9_100,
        &[repriced(&other, 2)],
    );
    assert!(
        matches!(taken, Err(StoreError::ItemisedTaken(_))),
        "{taken:?}"
    );
    let at = ItemisedAt {
        key: first_set.key.clone(),
        arrived_ms: 9_100,
    };
    let kept = store.itemised_records_at(&at).unwrap().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].items.len(), 1, "the first re-pricing's record");
    assert!(store.suspense().unwrap().contains(&other));
    drop(store);
    let store = harness.open();
    assert_eq!(store.suspense_count().unwrap(), 2);
    let left = store.suspense().unwrap();
    assert!(left.iter().all(|record| !resolved.contains(record)));
    assert_eq!(left.len(), 2);
    assert_eq!(store.period_uses(&period).unwrap(), 2);
    assert_eq!(
        store.free_uses(&period.payer, period.month).unwrap(),
        vec![(period.pid, 1)]
    );
    assert_eq!(store.load_ledger().unwrap().transfers(), ledger.transfers());
}

pub(crate) fn period_counts_are_set_and_free_counts_added_per_payer_product_and_month(
    harness: &impl Harness,
) {
    let store = harness.open();
    let ada = Cid::parse("B1-C1").unwrap();
    let bob = Cid::parse("B1-C2").unwrap();
    let (editor, spell) = (Pid::parse("B1-P1").unwrap(), Pid::parse("B1-P2").unwrap());
    let period = |payer, pid, month| PeriodKey { payer, pid, month };
    let apply = |n: u32, period_uses: &[(PeriodKey, u64)], free_uses: &[(PeriodKey, u64)]| {
        let effects = BatchEffects {
            period_uses,
            free_uses,
            ..effects(&[], &[], None)
        };
        store.apply_batch(&key(n), effects).unwrap();
    };
    apply(
        1,
        &[(period(ada, editor, 202_611), 4)],
        &[
            (period(ada, editor, 202_611), 4),
            (period(ada, spell, 202_611), 1),
        ],
    );
    apply(
        2,
        &[
            (period(ada, editor, 202_611), 9),
            (period(bob, editor, 202_612), 1),
        ],
        &[
            (period(ada, editor, 202_611), 2),
            (period(ada, editor, 202_612), 3),
        ],
    );
    // The same batch again adds nothing.
    assert!(matches!(
        store.apply_batch(
            &key(2),
            BatchEffects {
                free_uses: &[(period(ada, editor, 202_611), 50)],
                ..effects(&[], &[], None)
            }
        ),
        Err(StoreError::AlreadyApplied(_))
    ));
    drop(store);
    let store = harness.open();
    assert_eq!(store.period_uses(&period(ada, editor, 202_611)).unwrap(), 9);
    assert_eq!(store.period_uses(&period(bob, editor, 202_612)).unwrap(), 1);
    assert_eq!(store.period_uses(&period(ada, spell, 202_611)).unwrap(), 0);
    assert_eq!(
        store
            .period_uses_many(&[
                period(bob, editor, 202_612),
                period(ada, spell, 202_611),
                period(ada, editor, 202_611),
                period(bob, editor, 202_612),
            ])
            .unwrap(),
        vec![1, 0, 9, 1]
    );
    assert_eq!(store.period_uses_many(&[]).unwrap(), Vec::<u64>::new());
    assert_eq!(
        store.free_uses(&ada, 202_611).unwrap(),
        vec![(editor, 6), (spell, 1)]
    );
    assert_eq!(store.free_uses(&ada, 202_612).unwrap(), vec![(editor, 3)]);
    assert_eq!(store.free_uses(&bob, 202_612).unwrap(), vec![]);
}

pub(crate) fn the_one_sequence_range_a_batch_overlaps_is_found_at_any_u64(harness: &impl Harness) {
    let store = harness.open();
    let range = |instance: &str, first: u64, last: u64| SeqRange {
        mid: Mid::parse("B1-M1").unwrap(),
        instance: instance.to_owned(),
        first,
        last,
    };
    let high = 1u64 << 63;
    let stored = [
        range("a", 1, 10),
        range("a", 20, 30),
        range("a", high - 2, high + 5),
        range("a", u64::MAX - 3, u64::MAX),
        range("b", 5, 6),
    ];
    for (n, stored) in stored.iter().enumerate() {
        let n = u32::try_from(n).unwrap();
        store
            .apply_batch(&key(n), effects(&[], &[], Some(stored)))
            .unwrap();
    }
    drop(store);
    let store = harness.open();
    for (asked, found) in [
        (range("a", 11, 19), None),
        (range("a", 5, 12), Some((1, 10))),
        (range("a", 0, 1), Some((1, 10))),
        (range("a", 25, 40), Some((20, 30))),
        (range("a", 31, high - 3), None),
        (range("a", 31, high - 2), Some((high - 2, high + 5))),
        (range("a", high + 5, high + 9), Some((high - 2, high + 5))),
        (range("a", high + 6, u64::MAX - 4), None),
        (
            range("a", u64::MAX, u64::MAX),
            Some((u64::MAX - 3, u64::MAX)),
        ),
        (range("b", 1, 4), None),
        (range("b", 6, 6), Some((5, 6))),
        (range("c", 0, u64::MAX), None),
    ] {
        assert_eq!(store.overlapping_range(&asked).unwrap(), found, "{asked:?}");
    }
}

pub(crate) fn a_deposit_moves_through_its_steps_once_and_posts_one_transfer(
    harness: &impl Harness,
) {
    use crate::funding::{DepositRecord, DepositState, Reference};
    let store = harness.open();
    let reference = Reference::parse("invoice-7").unwrap();
    assert_eq!(store.deposit(&reference).unwrap(), None);
    let intent = DepositRecord {
        cid: Cid::parse("B1-C1").unwrap(),
        amount: Amount::parse("12.5").unwrap(),
        created_ms: 10,
        state: DepositState::Collecting,
    };
    assert_eq!(
        store.begin_deposit(&reference, &intent).unwrap(),
        (intent.clone(), true)
    );
    // A retry, even with other fields, finds the first.
    let other = DepositRecord {
        amount: Amount::parse("99").unwrap(),
        ..intent.clone()
    };
    assert_eq!(
        store.begin_deposit(&reference, &other).unwrap(),
        (intent.clone(), false)
    );
    let mut ledger = Ledger::new();
    ledger
        .post(
            vec![NewTransfer {
                debit: AccountId::System(SystemAccount::Funding),
                credit: customer(1),
                amount: intent.amount,
                kind: TransferKind::Deposit,
            }],
            11,
        )
        .unwrap();
    let transfer = ledger.transfers()[0].clone();
    assert!(
        store.stage_deposit(&reference, &transfer).is_err(),
        "not collected yet"
    );
    let collected = store.deposit_collected(&reference, "card-1").unwrap();
    assert_eq!(
        collected.state,
        DepositState::Collected {
            processor: "card-1".into()
        }
    );
    // Collected again (a retry): the first processor reference stays.
    assert_eq!(
        store.deposit_collected(&reference, "card-2").unwrap(),
        collected
    );
    let posted = store.post_deposit(&reference, &transfer).unwrap();
    assert_eq!(
        posted.state,
        DepositState::Posted {
            processor: "card-1".into(),
            transfer: transfer.id.0
        }
    );
    // Posted again: the same record, no second transfer.
    assert_eq!(store.post_deposit(&reference, &transfer).unwrap(), posted);
    drop(store);
    let store = harness.open();
    assert_eq!(store.deposit(&reference).unwrap(), Some(posted));
    assert_eq!(store.load_ledger().unwrap().transfers(), ledger.transfers());
    let unknown = Reference::parse("never-begun").unwrap();
    assert!(store.deposit_collected(&unknown, "card-3").is_err());
    assert_eq!(store.deposit(&unknown).unwrap(), None);
}

pub(crate) fn transfers_posted_outside_batches_load_back_as_the_same_ledger(
    harness: &impl Harness,
) {
    let store = harness.open();
    let mut ledger = Ledger::new();
    let first = ledger.post(batch(1, 2, 7), 100).unwrap();
    ledger
        .post(
            vec![
                NewTransfer {
                    debit: customer(2),
                    credit: customer(1),
                    amount: Amount::from_nanos(3),
                    kind: TransferKind::Correction { of: TransferId(1) },
                },
                NewTransfer {
                    debit: customer(1),
                    credit: AccountId::System(SystemAccount::Funding),
                    amount: Amount::parse("0.000000001").unwrap(),
                    kind: TransferKind::Withdrawal,
                },
            ],
            200,
        )
        .unwrap();
    let all = ledger.transfers();
    store
        .post_transfers(&all[usize::try_from(first.0).unwrap()..2])
        .unwrap();
    store.post_transfers(&all[2..]).unwrap();
    drop(store);
    let store = harness.open();
    let restored = store.load_ledger().unwrap();
    assert_eq!(restored.transfers(), ledger.transfers());
    for n in 1..=2 {
        assert_eq!(restored.balance(&customer(n)), ledger.balance(&customer(n)));
    }
    restored.verify();
}

pub(crate) fn hold_events_are_kept_with_their_captures_once_and_read_back<H: Harness>(harness: &H) {
    use crate::holds::{HoldBook, HoldId};
    let store = harness.open();
    let (payer, payee) = (customer(1), customer(2));
    let mut ledger = Ledger::new();
    let mut book = HoldBook::new();
    // Money to hold: a deposit.
    let deposit = ledger.prepare(batch(1, 2, 100)[..1].to_vec(), 1).unwrap();
    store.stage_transfers(&deposit).unwrap();
    ledger.commit(deposit);
    let placed = book
        .prepare_place(
            payer,
            Amount::from_nanos(600),
            5_000,
            "a match",
            Amount::from_nanos(1_000),
            10,
        )
        .unwrap();
    store
        .stage_holds(std::slice::from_ref(&placed), &[], None)
        .unwrap();
    book.commit(vec![placed]);
    // A capture and its transfer, together.
    let charge = ledger
        .prepare(
            vec![NewTransfer {
                debit: payer,
                credit: payee,
                amount: Amount::from_nanos(250),
                kind: TransferKind::Deposit,
            }],
            20,
        )
        .unwrap();
    let captured = book
        .prepare_capture(HoldId(0), Amount::from_nanos(250), charge[0].id, 20)
        .unwrap();
    store
        .stage_holds(std::slice::from_ref(&captured), &charge, None)
        .unwrap();
    ledger.commit(charge.clone());
    book.commit(vec![captured.clone()]);
    // More held, a second hold, the first released, the second expired.
    let adjusted = book
        .prepare_adjust(
            HoldId(0),
            Amount::from_nanos(-50),
            6_000,
            Amount::from_nanos(100),
            30,
        )
        .unwrap();
    book.commit(vec![adjusted.clone()]);
    let second = book
        .prepare_place(
            payer,
            Amount::from_nanos(90),
            100,
            "",
            Amount::from_nanos(400),
            40,
        )
        .unwrap();
    book.commit(vec![second.clone()]);
    let released = book.prepare_release(HoldId(0), 50).unwrap();
    book.commit(vec![released.clone()]);
    let expired = book.prepare_expiries(200);
    book.commit(expired.clone());
    let mut rest = vec![adjusted, second, released];
    rest.extend(expired);
    store.stage_holds(&rest, &[], None).unwrap();
    store.sync().unwrap();
    assert_eq!(store.hold_events_from(0).unwrap(), book.events());
    assert_eq!(store.hold_events_from(2).unwrap(), &book.events()[2..]);
    let next = book.events().len() as u64;
    assert!(store.hold_events_from(next).unwrap().is_empty());
    // An event whose number is kept is refused with its transfers: nothing
    // of that write is kept.
    let mut again = captured;
    again.change = crate::holds::HoldChange::Captured {
        amount: Amount::from_nanos(1),
        transfer: TransferId(2),
    };
    let extra = ledger
        .prepare(
            vec![NewTransfer {
                debit: payer,
                credit: payee,
                amount: Amount::from_nanos(1),
                kind: TransferKind::Deposit,
            }],
            60,
        )
        .unwrap();
    assert!(store.stage_holds(&[again], &extra, None).is_err());
    drop(store);
    let store = harness.open();
    assert_eq!(store.hold_events_from(0).unwrap(), book.events());
    assert_eq!(store.load_ledger().unwrap().transfers(), ledger.transfers());
    let restored = HoldBook::restore(store.hold_events_from(0).unwrap()).unwrap();
    assert_eq!(
        restored.holds().collect::<Vec<_>>(),
        book.holds().collect::<Vec<_>>()
    );
    // The second hold's note was empty; the first one's kept as written.
    assert_eq!(restored.hold(HoldId(0)).unwrap().note, "a match");
    assert_eq!(restored.hold(HoldId(1)).unwrap().note, "");
    // The store's check reads them (this test keeps no registry, so other
    // problems are expected), and names a capture whose transfer does not
    // take the money from the hold's account.
    let hold_problems = |store: &H::Store| {
        let (report, _) = store.verify();
        assert!(
            report
                .checked
                .iter()
                .any(|(what, _)| *what == "hold events"),
            "{:?}",
            report.checked
        );
        report
            .problems
            .into_iter()
            .filter(|problem| problem.starts_with("hold event"))
            .collect::<Vec<_>>()
    };
    assert_eq!(hold_problems(&store), Vec::<String>::new());
    let mut book = restored;
    let third = book
        .prepare_place(
            payer,
            Amount::from_nanos(10),
            9_000,
            "",
            Amount::from_nanos(100),
            100,
        )
        .unwrap();
    book.commit(vec![third]);
    // Transfer 0 is the deposit, from funding: not the hold's account.
    let wrong = book
        .prepare_capture(HoldId(2), Amount::from_nanos(10), TransferId(0), 110)
        .unwrap();
    let mut written = book.events()[book.events().len() - 1..].to_vec();
    written.push(wrong);
    store.stage_holds(&written, &[], None).unwrap();
    let problems = hold_problems(&store);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("does not take"), "{problems:?}");
}

pub(crate) fn a_nonce_is_claimed_once_while_live_across_threads_and_restarts<H: Harness>(
    harness: &H,
) {
    const NOW: u64 = 1_800_000_000_000;
    let store = harness.open();
    // Eight claims of one nonce at once (eight nodes, say): one wins.
    let key = [7u8; 32];
    let won = std::thread::scope(|scope| {
        let claims: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| store.claim_nonce(&key, NOW + 300_000, NOW).unwrap()))
            .collect();
        claims
            .into_iter()
            .filter_map(|claim| claim.join().unwrap().then_some(()))
            .count()
    });
    assert_eq!(won, 1);
    // Other nonces are their own; the one whose first byte cleans up
    // removes only expired claims.
    let mut sweeper = [0u8; 32];
    sweeper[1] = 1;
    assert!(store.claim_nonce(&sweeper, NOW + 300_000, NOW).unwrap());
    assert!(!store.claim_nonce(&key, NOW + 300_000, NOW + 1).unwrap());
    drop(store);
    // After a restart the claim is still live until its expiry...
    let store = harness.open();
    assert!(
        !store
            .claim_nonce(&key, NOW + 600_000, NOW + 300_000)
            .unwrap()
    );
    assert!(
        !store
            .claim_nonce(&sweeper, NOW + 600_000, NOW + 300_000)
            .unwrap()
    );
    // ...and free after it, for one claimer again.
    assert!(
        store
            .claim_nonce(&key, NOW + 900_000, NOW + 300_001)
            .unwrap()
    );
    assert!(
        !store
            .claim_nonce(&key, NOW + 900_000, NOW + 300_002)
            .unwrap()
    );
    // A sweep after the other expired forgets it, and it is free again.
    let mut other = [0u8; 32];
    other[1] = 2;
    assert!(
        store
            .claim_nonce(&other, NOW + 900_000, NOW + 300_003)
            .unwrap()
    );
    assert!(
        store
            .claim_nonce(&sweeper, NOW + 900_000, NOW + 300_004)
            .unwrap()
    );
    assert!(
        !store
            .claim_nonce(&other, NOW + 900_000, NOW + 300_005)
            .unwrap()
    );
}

pub(crate) fn payment_requests_are_kept_once_with_their_transfers_and_verified<H: Harness>(
    harness: &H,
) {
    use crate::holds::{HoldBook, HoldChange, HoldId};
    use crate::payments::{PaymentRequest, digest};
    let service = Pid::parse("B1-P1").unwrap();
    let (payer, owner) = (customer(1), customer(2));
    let payment = |reference: &str| TransferKind::Payment {
        pid: service,
        reference: reference.to_owned(),
    };
    let request = |reference: &str, transfers: Vec<u64>, hold: Option<u64>| PaymentRequest {
        service,
        reference: reference.to_owned(),
        operation: "chargeAmount".to_owned(),
        digest: digest(reference),
        description: "ring tone \u{e9}".to_owned(),
        at_ms: 20,
        transfers,
        hold,
        evidence: Vec::new(),
        form: proto::parlayx::CANONICAL_FORM,
    };
    let mut ledger = Ledger::new();
    let mut book = HoldBook::new();
    {
        let store = harness.open();
        // The service's product, owned by the payee: verify checks that
        // every payment pays or is paid by the product's owner.
        let bid = Bid::parse("B1").unwrap();
        store
            .create_customer(&bid, "Payer", "payer@example.org")
            .unwrap();
        let payee = store
            .create_customer(&bid, "Owner", "owner@example.org")
            .unwrap();
        assert_eq!(AccountId::Customer(payee.cid), owner);
        let product = NewProduct {
            owner: &payee.cid,
            name: "Ring tones",
            description: "",
            terms: "1 a tone",
            taca: b"\0asm module",
            max_price: Amount::parse("5").unwrap(),
        };
        assert_eq!(store.create_product(&bid, product).unwrap().pid, service);
        let deposit = ledger.prepare(batch(1, 2, 100)[..1].to_vec(), 1).unwrap();
        store.stage_transfers(&deposit).unwrap();
        ledger.commit(deposit);
        let charge = ledger
            .prepare(
                vec![NewTransfer {
                    debit: payer,
                    credit: owner,
                    amount: Amount::from_nanos(300),
                    kind: payment("order 1"),
                }],
                20,
            )
            .unwrap();
        let mut first = request("order 1", vec![charge[0].id.0], None);
        first.evidence = vec!["B1-M1:B1-M1:7:3".to_owned()];
        store.stage_holds(&[], &charge, Some(&first)).unwrap();
        assert_eq!(
            store.evidence_used("B1-M1:B1-M1:7:3").unwrap(),
            Some((service, "order 1".to_owned()))
        );
        assert_eq!(store.evidence_used("B1-M1:B1-M1:7:4").unwrap(), None);
        ledger.commit(charge);
        assert_eq!(
            store.payment_request(&service, "order 1").unwrap(),
            Some(first.clone())
        );
        assert_eq!(store.payment_request(&service, "order 2").unwrap(), None);
        let other = Pid::parse("B1-P8").unwrap();
        assert_eq!(store.payment_request(&other, "order 1").unwrap(), None);
        // The same code again, with another transfer: refused, nothing
        // written (the transfer is not there either).
        let again = ledger
            .prepare(
                vec![NewTransfer {
                    debit: payer,
                    credit: owner,
                    amount: Amount::from_nanos(5),
                    kind: payment("order 1"),
                }],
                21,
            )
            .unwrap();
        let taken = request("order 1", vec![again[0].id.0], None);
        assert!(store.stage_holds(&[], &again, Some(&taken)).is_err());
        // Another code, with evidence given already: refused, nothing written.
        let mut reused = request("order 2", vec![again[0].id.0], None);
        reused.evidence = vec!["B1-M1:B1-M1:7:3".to_owned()];
        assert!(store.stage_holds(&[], &again, Some(&reused)).is_err());
        assert_eq!(store.payment_request(&service, "order 2").unwrap(), None);
        assert_eq!(store.load_ledger().unwrap().transfers().len(), 2);
        assert_eq!(
            store.payment_request(&service, "order 1").unwrap(),
            Some(first.clone())
        );
        // A reservation the service placed: the hold names it, and the
        // request names the hold.
        let placed = book
            .prepare_place_by(
                payer,
                Amount::from_nanos(100),
                9_000,
                "stream",
                Amount::from_nanos(700),
                30,
                Some(service),
                Some("MB\ngold\n\n".to_owned()),
            )
            .unwrap();
        let reserved = PaymentRequest {
            operation: "reserveAmount".to_owned(),
            // As stored before forms were numbered: kept as 0.
            form: 0,
            ..request("reservation 1", Vec::new(), Some(0))
        };
        store
            .stage_holds(std::slice::from_ref(&placed), &[], Some(&reserved))
            .unwrap();
        book.commit(vec![placed]);
    }
    // Read back after a reopen.
    let store = harness.open();
    let mut kept = store.payment_requests().unwrap();
    kept.sort_by(|a, b| a.reference.cmp(&b.reference));
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0].reference, "order 1");
    assert_eq!(kept[1].hold_id(), Some(HoldId(0)));
    let events = store.hold_events_from(0).unwrap();
    assert!(matches!(
        &events[0].change,
        HoldChange::Placed { by: Some(by), rating: Some(rating), .. }
            if *by == service && rating == "MB\ngold\n\n"
    ));
    assert_eq!(events, book.events());
    let problems = |store: &H::Store| {
        let (report, _) = store.verify();
        assert!(
            report
                .checked
                .iter()
                .any(|(what, _)| *what == "payment requests"),
            "{:?}",
            report.checked
        );
        report
            .problems
            .into_iter()
            .filter(|problem| problem.contains("payment"))
            .collect::<Vec<_>>()
    };
    assert_eq!(problems(&store), Vec::<String>::new());
    // A payment no request names is a problem verify reports.
    let stray = ledger
        .prepare(
            vec![NewTransfer {
                debit: payer,
                credit: owner,
                amount: Amount::from_nanos(7),
                kind: payment("order 9"),
            }],
            40,
        )
        .unwrap();
    store.stage_transfers(&stray).unwrap();
    let found = problems(&store);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("no payment request names"), "{found:?}");
}
