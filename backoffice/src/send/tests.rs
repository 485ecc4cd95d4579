//! The money path as a whole: batches signed, priced and applied on sled,
//! failed syncs, busy pricing and deposits.

use std::collections::HashMap;

use proto::auth::Secret;
use proto::reading::{Event, Reading};
use proto::upload::{SendBody, SendRequest};
use proto::xmlrpc::Value;
use proto::{Amount, BatchId, Cid, Payer, Pid};

use super::*;
use crate::ledger::{NewTransfer, TransferKind};

/// A branch on sled in `dir`: Ada pays 0.001 per commit of Bob's
/// product (a hand-written TACA) through a machine-wide grant on her
/// meter, with 10 deposited.
struct Branch {
    backoffice: Backoffice<crate::store::SledStore>,
    meter: crate::registry::Meter,
    consumer: Cid,
    pid: Pid,
    now_ms: u64,
}

impl Branch {
    fn open(dir: &std::path::Path) -> Branch {
        Self::open_with(dir, "flat.wat")
    }

    /// A branch whose product is priced by the TACA in `fixture`.
    fn open_with(dir: &std::path::Path, fixture: &str) -> Branch {
        use crate::store::SledStore;
        let store = SledStore::open(dir).unwrap();
        let bid = proto::Bid::parse("B1").unwrap();
        let consumer = store
            .create_customer(&bid, "Ada", "ada@example.org")
            .unwrap();
        let producer = store
            .create_customer(&bid, "Bob", "bob@example.org")
            .unwrap();
        // Written by hand from the ABI document.
        let flat = wat::parse_file(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(fixture),
        )
        .unwrap();
        let product = store
            .create_product(
                &bid,
                crate::store::NewProduct::new(
                    &producer.cid,
                    "Editor",
                    "flat",
                    &flat,
                    Amount::from_units(1).unwrap(),
                ),
            )
            .unwrap();
        let meter = store.create_meter(&bid, &consumer.cid).unwrap();
        let now_ms = 1_764_000_000_000;
        store
            .create_grant(crate::registry::NewGrant {
                mid: meter.mid,
                cid: consumer.cid,
                scope: proto::grant::Scope::Machine,
                label: "test".into(),
                created_ms: now_ms - 60_000,
                expires_ms: None,
            })
            .unwrap();
        let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
        backoffice.post(vec![deposit_of(consumer.cid, 10)]).unwrap();
        Branch {
            backoffice,
            meter,
            consumer: consumer.cid,
            pid: product.pid,
            now_ms,
        }
    }

    /// The same branch after a restart.
    fn reopen(self, dir: &std::path::Path) -> Branch {
        drop(self.backoffice);
        let store = crate::store::SledStore::open(dir).unwrap();
        Branch {
            backoffice: Backoffice::open(store, DEFAULT_PARAMS).unwrap(),
            ..self
        }
    }

    /// A batch of 4 commits, readings `first_seq..first_seq + 4`.
    fn body(&self, first_seq: u64) -> Vec<u8> {
        let readings = (0..4)
            .map(|offset| Reading {
                seq: first_seq + offset,
                time_ms: self.now_ms - 1000,
                context: proto::Context::parse("7").unwrap(),
                event: Event::Commit {
                    pid: self.pid,
                    payer: Some(Payer::Customer(self.consumer)),
                },
            })
            .collect();
        let mid = self.meter.mid;
        let request = SendRequest {
            mid,
            body: SendBody::Batch(proto::upload::Batch {
                id: BatchId::parse(&format!("{mid}:{first_seq}")).unwrap(),
                readings,
                parties: Vec::new(),
            }),
        };
        proto::xmlrpc::encode_call("send", &request.to_params())
    }

    /// Sends `body`, signed at `time_ms`.
    fn send(&self, body: &[u8], time_ms: u64) -> Result<Value, Fault> {
        let secret = Secret::new(self.meter.secret_hex.as_bytes()).unwrap();
        let signature = secret.sign(&self.meter.mid, time_ms, body);
        let time = time_ms.to_string();
        self.backoffice.send(
            body,
            Signed {
                mid: Some(self.meter.mid.as_str()),
                time: Some(&time),
                signature: Some(&signature),
            },
            self.now_ms,
        )
    }

    fn balance(&self) -> Amount {
        self.backoffice
            .ledger()
            .balance(&AccountId::Customer(self.consumer))
    }
}

#[test]
fn a_failed_fsync_stops_money_operations_until_a_restart_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let branch = Branch::open(dir.path());
    let now_ms = branch.now_ms;
    let first = branch.body(1);
    branch.send(&first, now_ms).unwrap();
    // The disk fails while the second batch is made durable.
    branch.backoffice.store().fail_syncs(true);
    let second = branch.body(5);
    let fault = branch.send(&second, now_ms + 1).unwrap_err();
    assert_eq!(fault.code, FaultCode::InternalError.code());
    // Even with the disk back, nothing moves money until a restart.
    branch.backoffice.store().fail_syncs(false);
    let third = branch.body(9);
    let refused = branch.send(&third, now_ms + 2).unwrap_err();
    assert!(refused.message.contains("restart"), "{refused:?}");
    let deposit = branch.backoffice.post(Vec::new()).unwrap_err();
    assert!(deposit.message.contains("restart"), "{deposit:?}");
    assert!(!branch.backoffice.is_durable());
    // After a restart the meter's retry of the second batch is applied
    // exactly once, whether or not its staged writes reached the disk.
    let branch = branch.reopen(dir.path());
    branch.send(&second, now_ms + 3).unwrap();
    branch.send(&second, now_ms + 4).unwrap();
    branch.send(&third, now_ms + 5).unwrap();
    branch.backoffice.ledger().verify();
    // Twelve uses at 0.001.
    assert_eq!(branch.balance(), Amount::parse("9.988").unwrap());
}

#[test]
fn busy_pricing_refuses_the_batch_retryably_and_sends_nothing_to_suspense() {
    let dir = tempfile::tempdir().unwrap();
    let branch = Branch::open(dir.path());
    // Busy while the module is loaded (its version check needs a slot).
    let first = branch.body(1);
    let held = branch
        .backoffice
        .pricing
        .hold_every_slot(std::time::Duration::from_millis(300));
    let fault = branch.send(&first, branch.now_ms).unwrap_err();
    assert_eq!(
        fault.registered(),
        Some(FaultCode::InternalError),
        "{fault:?}"
    );
    assert!(fault.message.contains("busy"), "{fault:?}");
    assert_eq!(branch.backoffice.store().suspense_count().unwrap(), 0);
    assert_eq!(branch.balance(), Amount::from_units(10).unwrap());
    assert!(
        branch.backoffice.is_durable(),
        "busy is not a failure of the books"
    );
    drop(held);
    // The meter's retry, signed anew, is applied: four uses at 0.001.
    branch.send(&first, branch.now_ms + 1).unwrap();
    assert_eq!(branch.balance(), Amount::parse("9.996").unwrap());
    // Busy while pricing (the module is loaded now): one wait for the
    // batch, not one per use (4 here), and nothing to suspense.
    let second = branch.body(5);
    let held = branch
        .backoffice
        .pricing
        .hold_every_slot(std::time::Duration::from_millis(300));
    let asked = std::time::Instant::now();
    let fault = branch.send(&second, branch.now_ms + 2).unwrap_err();
    assert!(
        asked.elapsed() < std::time::Duration::from_millis(900),
        "{:?}",
        asked.elapsed()
    );
    assert!(fault.message.contains("busy"), "{fault:?}");
    assert_eq!(branch.backoffice.store().suspense_count().unwrap(), 0);
    drop(held);
    branch.send(&second, branch.now_ms + 3).unwrap();
    assert_eq!(branch.balance(), Amount::parse("9.992").unwrap());
    assert_eq!(branch.backoffice.store().suspense_count().unwrap(), 0);
}

/// A price waits for a slot another price frees, rather than failing.
#[test]
fn a_price_waits_for_a_slot_to_free() {
    let dir = tempfile::tempdir().unwrap();
    let branch = Branch::open(dir.path());
    let body = branch.body(1);
    let held = branch
        .backoffice
        .pricing
        .hold_every_slot(std::time::Duration::from_millis(5_000));
    std::thread::scope(|scope| {
        scope.spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(held);
        });
        branch.send(&body, branch.now_ms).unwrap();
    });
    assert_eq!(branch.balance(), Amount::parse("9.996").unwrap());
}

/// Batches of one meter sent from many threads at once are each applied
/// once, priced with the right period counts though they are priced
/// outside the ledger's lock, and every one answered "applied" is in the
/// store after a restart (answered only after a sync that followed its
/// staging).
#[test]
fn concurrent_sends_are_each_applied_once_priced_in_order_and_durable_when_answered() {
    let dir = tempfile::tempdir().unwrap();
    let branch = Branch::open_with(dir.path(), "counting.wat");
    let bodies: Vec<Vec<u8>> = (0..24).map(|n| branch.body(1 + 4 * n)).collect();
    std::thread::scope(|scope| {
        for worker in 0..4u64 {
            let (branch, bodies) = (&branch, &bodies);
            scope.spawn(move || {
                // Each worker sends its share, then every batch again:
                // the repeats are answered, never applied twice.
                let own = bodies.iter().skip(worker as usize).step_by(4);
                for (n, body) in own.chain(bodies.iter()).enumerate() {
                    let time = branch.now_ms + worker * 1_000 + n as u64;
                    branch.send(body, time).unwrap();
                }
            });
        }
    });
    // The n-th use costs n * 0.000001: 96 uses, 96 * 97 / 2 millionths.
    let charged = Amount::parse("0.004656").unwrap();
    let left = Amount::from_units(10)
        .unwrap()
        .checked_sub(charged)
        .unwrap();
    assert_eq!(branch.balance(), left);
    eprintln!(
        "batches priced again under the lock: {}",
        branch
            .backoffice
            .counters()
            .batches_repriced
            .load(Ordering::Relaxed)
    );
    let branch = branch.reopen(dir.path());
    branch.backoffice.ledger().verify();
    assert_eq!(branch.balance(), left);
}

fn deposit_of(cid: Cid, units: i64) -> NewTransfer {
    NewTransfer {
        debit: AccountId::System(crate::ledger::SystemAccount::Funding),
        credit: AccountId::Customer(cid),
        amount: Amount::from_units(units).unwrap(),
        kind: TransferKind::Deposit,
    }
}

#[test]
fn a_failed_fsync_of_a_deposit_stops_money_operations_and_overwrites_nothing() {
    use crate::store::SledStore;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let bid = proto::Bid::parse("B1").unwrap();
    let ada = store
        .create_customer(&bid, "Ada", "ada@example.org")
        .unwrap();
    let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
    backoffice.post(vec![deposit_of(ada.cid, 1)]).unwrap();
    backoffice.store().fail_syncs(true);
    assert!(backoffice.post(vec![deposit_of(ada.cid, 2)]).is_err());
    backoffice.store().fail_syncs(false);
    // The next deposit would take the same transfer number as the one
    // whose sync failed, and overwrite it: refused until a restart.
    let refused = backoffice.post(vec![deposit_of(ada.cid, 4)]).unwrap_err();
    assert!(refused.message.contains("restart"), "{refused:?}");
    assert!(!backoffice.is_durable());
    let repriced = backoffice.reprice_suspense().unwrap_err();
    assert!(repriced.message.contains("restart"), "{repriced:?}");
    // A sync of another operation that works does not answer "durable"
    // while an earlier one failed.
    assert!(backoffice.durable().is_err());
    drop(backoffice);
    let store = SledStore::open(dir.path()).unwrap();
    let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
    backoffice.post(vec![deposit_of(ada.cid, 4)]).unwrap();
    let ledger = backoffice.ledger();
    ledger.verify();
    let ids: Vec<u64> = ledger
        .transfers()
        .iter()
        .map(|transfer| transfer.id.0)
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    // The deposit whose sync failed may or may not have reached the
    // disk; the first and the last are there, each once.
    let balance = ledger.balance(&AccountId::Customer(ada.cid));
    assert!(
        balance == Amount::from_units(5).unwrap() || balance == Amount::from_units(7).unwrap(),
        "{balance}"
    );
}

#[test]
fn a_failed_fsync_while_repricing_stops_money_operations() {
    use crate::store::SledStore;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let bid = proto::Bid::parse("B1").unwrap();
    let ada = store
        .create_customer(&bid, "Ada", "ada@example.org")
        .unwrap();
    let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
    backoffice.store().fail_syncs(true);
    assert!(backoffice.reprice_suspense().is_err());
    backoffice.store().fail_syncs(false);
    let refused = backoffice.post(vec![deposit_of(ada.cid, 1)]).unwrap_err();
    assert!(refused.message.contains("restart"), "{refused:?}");
}
/// A card processor that honours idempotency keys: its books hold one
/// collection per key. It can make the backoffice's disk fail right
/// after it collects, as a crash between collection and posting would.
struct Processor<'a> {
    books: &'a Mutex<HashMap<String, String>>,
    calls: &'a AtomicU64,
    fail_disk_after: Option<&'a crate::store::SledStore>,
}

impl crate::funding::MacroAccounts for Processor<'_> {
    fn collect(
        &self,
        _customer: &crate::registry::Customer,
        _amount: Amount,
        idempotency_key: &str,
    ) -> Result<String, crate::funding::FundingError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut books = lock(self.books);
        let next = format!("auth-{}", books.len() + 1);
        let answer = books
            .entry(idempotency_key.to_owned())
            .or_insert(next)
            .clone();
        if let Some(store) = self.fail_disk_after {
            store.fail_syncs(true);
        }
        Ok(answer)
    }
}

fn deposits_in(ledger: &Ledger) -> Vec<&crate::ledger::Transfer> {
    ledger
        .transfers()
        .iter()
        .filter(|transfer| transfer.kind == TransferKind::Deposit)
        .collect()
}

#[test]
fn a_deposit_retried_after_a_crash_between_collection_and_posting_is_collected_and_posted_once() {
    use crate::funding::Reference;
    use crate::store::SledStore;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let bid = proto::Bid::parse("B1").unwrap();
    let ada = store
        .create_customer(&bid, "Ada", "ada@example.org")
        .unwrap();
    let books = Mutex::new(HashMap::new());
    let calls = AtomicU64::new(0);
    let ten = Amount::from_units(10).unwrap();
    let reference = Reference::parse("rent-2025-11").unwrap();
    let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
    // The processor collects, then the disk fails before the backoffice
    // has recorded the collection, let alone posted the deposit.
    let failing = Processor {
        books: &books,
        calls: &calls,
        fail_disk_after: Some(backoffice.store()),
    };
    let fault = backoffice
        .deposit_once(&failing, &ada, ten, &reference)
        .unwrap_err();
    assert_eq!(fault.code, FaultCode::InternalError.code(), "{fault:?}");
    assert!(deposits_in(&backoffice.ledger()).is_empty());
    assert!(!backoffice.is_durable());
    assert_eq!(lock(&books).len(), 1, "the money was collected");
    drop(backoffice);
    // The restart reads what reached the disk; the operator retries
    // with the same reference.
    let store = SledStore::open(dir.path()).unwrap();
    let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
    let working = Processor {
        books: &books,
        calls: &calls,
        fail_disk_after: None,
    };
    let first = backoffice
        .deposit_once(&working, &ada, ten, &reference)
        .unwrap();
    assert!(first.repeated);
    assert_eq!(first.processor, "auth-1");
    assert_eq!(
        lock(&books).keys().collect::<Vec<_>>(),
        vec!["B1:rent-2025-11"],
        "one collection, under one key"
    );
    let calls_then = calls.load(Ordering::SeqCst);
    // Once posted, a retry asks nobody and posts nothing.
    let again = backoffice
        .deposit_once(&working, &ada, ten, &reference)
        .unwrap();
    assert_eq!(again.transfer, first.transfer);
    assert_eq!(calls.load(Ordering::SeqCst), calls_then);
    // The same reference for another amount or customer is refused.
    let other = backoffice
        .deposit_once(&working, &ada, Amount::from_units(11).unwrap(), &reference)
        .unwrap_err();
    assert_eq!(other.code, FaultCode::RecordRefused.code(), "{other:?}");
    drop(backoffice);
    let store = SledStore::open(dir.path()).unwrap();
    let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
    let ledger = backoffice.ledger();
    ledger.verify();
    assert_eq!(deposits_in(&ledger), vec![&first.transfer]);
    assert_eq!(ledger.balance(&AccountId::Customer(ada.cid)), ten);
    assert_eq!(lock(&books).len(), 1);
}

#[test]
fn a_deposit_is_completed_from_each_recorded_step_and_never_collected_twice() {
    use crate::funding::{DepositRecord, DepositState, Reference};
    use crate::store::{SledStore, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let bid = proto::Bid::parse("B1").unwrap();
    let ada = store
        .create_customer(&bid, "Ada", "ada@example.org")
        .unwrap();
    let books = Mutex::new(HashMap::new());
    let calls = AtomicU64::new(0);
    let amount = Amount::parse("2.5").unwrap();
    let intent = DepositRecord {
        cid: ada.cid,
        amount,
        created_ms: 1,
        state: DepositState::Collecting,
    };
    // What a process that stopped at each step left on disk: an intent
    // (the processor collected meanwhile), and a recorded collection.
    let asked = Reference::parse("asked").unwrap();
    store.begin_deposit(&asked, &intent).unwrap();
    lock(&books).insert("B1:asked".to_owned(), "auth-asked".to_owned());
    let collected = Reference::parse("collected").unwrap();
    store.begin_deposit(&collected, &intent).unwrap();
    store
        .deposit_collected(&collected, "auth-collected")
        .unwrap();
    let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
    let processor = Processor {
        books: &books,
        calls: &calls,
        fail_disk_after: None,
    };
    let posted = backoffice
        .deposit_once(&processor, &ada, amount, &collected)
        .unwrap();
    assert_eq!(posted.processor, "auth-collected");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "posted only");
    let posted = backoffice
        .deposit_once(&processor, &ada, amount, &asked)
        .unwrap();
    assert_eq!(posted.processor, "auth-asked");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "asked again");
    assert_eq!(lock(&books).len(), 1, "under the same key: nothing more");
    // Retries at once, from many threads, post one deposit.
    let racing = Reference::parse("racing").unwrap();
    let transfers: Vec<u64> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    backoffice
                        .deposit_once(&processor, &ada, amount, &racing)
                        .unwrap()
                        .transfer
                        .id
                        .0
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect()
    });
    assert!(
        transfers.iter().all(|id| *id == transfers[0]),
        "{transfers:?}"
    );
    assert_eq!(lock(&books).len(), 2);
    let ledger = backoffice.ledger();
    ledger.verify();
    assert_eq!(deposits_in(&ledger).len(), 3);
    assert_eq!(
        ledger.balance(&AccountId::Customer(ada.cid)),
        Amount::parse("7.5").unwrap()
    );
    // A bad amount is refused before anything is recorded.
    let zero = Reference::parse("zero").unwrap();
    assert!(
        backoffice
            .deposit_once(&processor, &ada, Amount::ZERO, &zero)
            .is_err()
    );
    assert_eq!(backoffice.store().deposit(&zero).unwrap(), None);
}
