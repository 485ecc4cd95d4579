//! The money path: uploads priced with real TACA modules, posted to the
//! ledger, answered with standings; repeats, forgeries and replays.

use backoffice::ledger::{AccountId, NewTransfer, SystemAccount, TransferKind};
use backoffice::registry::NewGrant;
use backoffice::send::{Backoffice, SIGNATURE_WINDOW_MS, Signed, USE_AGE_MAX_MS};
use backoffice::store::{NewProduct, SledStore, Store, SuspenseCursor};
use proto::auth::Secret;
use proto::reading::{Event, Reading};
use proto::upload::{Batch, MeterParams, Outcome, SendAnswer, SendBody, SendRequest};
use proto::xmlrpc::{Value, encode_call};
use proto::{Amount, BatchId, Bid, Cid, Context, FaultCode, Mid, Payer, Pid};

use crate::examples::module;

const NOW_MS: u64 = 1_764_000_000_000;
const PARAMS: MeterParams = MeterParams {
    flush_readings_max: 10_000,
    flush_interval_s: 3_600,
    status_stale_max_s: 86_400,
    unknown_uses_max: 16,
};

struct World {
    _dir: tempfile::TempDir,
    backoffice: Backoffice<SledStore>,
    consumer: Cid,
    producer: Cid,
    maker: Cid,
    product: Pid,
    test_pid: Pid,
    component: Pid,
    mid: Mid,
    secret: Secret,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let bid = Bid::parse("B1").unwrap();
    let consumer = store
        .create_customer(&bid, "Ada", "ada@example.org")
        .unwrap()
        .cid;
    let producer = store
        .create_customer(&bid, "Bob", "bob@example.org")
        .unwrap()
        .cid;
    let maker = store
        .create_customer(&bid, "Carol", "carol@example.org")
        .unwrap()
        .cid;
    let product = store
        .create_product(
            &bid,
            NewProduct::new(&producer, "Editor", "0.25 per use", &module("flat"), max()),
        )
        .unwrap();
    let component = store
        .create_product(
            &bid,
            NewProduct::new(&maker, "Spell", "tiered", &module("tiered"), max()),
        )
        .unwrap();
    // Bob's editor has Carol's spell checker built in.
    store
        .set_components(&product.pid, Some(&producer), &[component.pid])
        .unwrap();
    let meter = store.create_meter(&bid, &consumer).unwrap();
    let secret = Secret::new(meter.secret_hex.as_bytes()).unwrap();
    // Ada lets her meter charge her, from before the uses in these tests.
    store.create_grant(grant_of(meter.mid, consumer)).unwrap();
    let backoffice = Backoffice::open(store, PARAMS).unwrap();
    backoffice
        .post(vec![NewTransfer {
            debit: AccountId::System(SystemAccount::Funding),
            credit: AccountId::Customer(consumer),
            amount: Amount::from_units(10).unwrap(),
            kind: TransferKind::Deposit,
        }])
        .unwrap();
    World {
        _dir: dir,
        backoffice,
        consumer,
        producer,
        maker,
        product: product.pid,
        test_pid: product.test_pid,
        component: component.pid,
        mid: meter.mid,
        secret,
    }
}

/// The most one use of the test products may cost.
/// `backoffice verify` on the running branch finds nothing wrong.
fn books_verify(world: &World) {
    let report = backoffice::verify::running(&world.backoffice);
    assert!(report.is_ok(), "{:?}", report.problems);
}

fn max() -> Amount {
    Amount::from_units(1).unwrap()
}

/// A grant of `cid` to meter `mid`, live from before the tests' uses.
fn grant_of(mid: Mid, cid: Cid) -> NewGrant {
    NewGrant {
        mid,
        cid,
        scope: proto::grant::Scope::User {
            uid: 1000,
            name: "ada".into(),
        },
        label: "test machine".into(),
        created_ms: NOW_MS - 60_000,
        expires_ms: None,
    }
}

fn batch(world: &World, id: &str, events: Vec<Event>) -> Vec<u8> {
    batch_from(world.mid, id, events)
}

fn batch_from(mid: Mid, id: &str, events: Vec<Event>) -> Vec<u8> {
    let context = Context::parse("42.7").unwrap();
    let readings = events
        .into_iter()
        .enumerate()
        .map(|(index, event)| Reading {
            seq: 100 + index as u64,
            time_ms: NOW_MS - 1000,
            context: context.clone(),
            event,
        })
        .collect();
    body_of(mid, id, readings, Vec::new())
}

/// The `send` body of batch `id` of meter `mid`.
fn body_of(mid: Mid, id: &str, readings: Vec<Reading>, parties: Vec<Payer>) -> Vec<u8> {
    let request = SendRequest {
        mid,
        body: SendBody::Batch(Batch {
            id: BatchId::parse(id).unwrap(),
            readings,
            parties,
        }),
    };
    encode_call("send", &request.to_params())
}

fn send(world: &World, body: &[u8], time_ms: u64) -> Result<Value, proto::Fault> {
    let signature = world.secret.sign(&world.mid, time_ms, body);
    let time = time_ms.to_string();
    let signed = Signed {
        mid: Some(world.mid.as_str()),
        time: Some(&time),
        signature: Some(&signature),
    };
    world.backoffice.send(body, signed, NOW_MS)
}

fn balance(world: &World, cid: Cid) -> Amount {
    world.backoffice.ledger().balance(&AccountId::Customer(cid))
}

fn amount(text: &str) -> Amount {
    Amount::parse(text).unwrap()
}

fn uses(world: &World) -> Vec<Event> {
    let me = Some(Payer::Customer(world.consumer));
    let inside = Some(Payer::OwnerOf(world.product));
    let mut events = vec![Event::Login(world.consumer)];
    for _ in 0..3 {
        events.push(Event::Commit {
            pid: world.component,
            payer: inside,
        });
        events.push(Event::Commit {
            pid: world.product,
            payer: me,
        });
    }
    events.push(Event::Commit {
        pid: world.test_pid,
        payer: me,
    });
    events.push(Event::Commit {
        pid: Pid::parse("B1-P404").unwrap(),
        payer: me,
    });
    events.push(Event::Logout(world.consumer));
    events
}

#[test]
fn uses_become_exact_transfers_and_components_are_paid_by_the_product_owner() {
    let world = world();
    let body = batch(&world, "B1-M1:100", uses(&world));
    let answer = SendAnswer::from_value(&send(&world, &body, NOW_MS).unwrap()).unwrap();
    assert_eq!(answer.outcome, Outcome::Applied);
    assert_eq!(answer.params, PARAMS);
    // Three uses of the editor at 0.25; the test PID is free; the component's
    // first ten uses in the month are free (tiered), and they fall on Bob.
    assert_eq!(balance(&world, world.consumer), amount("9.25"));
    assert_eq!(balance(&world, world.producer), amount("0.75"));
    assert_eq!(balance(&world, world.maker), Amount::ZERO);
    let allowed = |party: Payer| {
        answer
            .standings
            .iter()
            .find(|s| s.party == party)
            .map(|s| s.allowed)
    };
    assert_eq!(allowed(Payer::Customer(world.consumer)), Some(true));
    assert_eq!(
        allowed(Payer::OwnerOf(world.product)),
        Some(true),
        "Bob has 0.75"
    );
    assert_eq!(
        allowed(Payer::OwnerOf(world.component)),
        Some(false),
        "Carol has nothing yet"
    );
    let suspense = world.backoffice.store().suspense().unwrap();
    assert_eq!(suspense.len(), 1);
    assert!(
        suspense[0].reason.contains("unknown PID B1-P404"),
        "{:?}",
        suspense[0]
    );
    world.backoffice.ledger().verify();
    books_verify(&world);
}

#[test]
fn a_batch_sent_again_is_answered_the_same_and_applied_once() {
    let world = world();
    let body = batch(&world, "B1-M1:100", uses(&world));
    let first = SendAnswer::from_value(&send(&world, &body, NOW_MS).unwrap()).unwrap();
    // The meter retries after a lost answer: a new signature, the same batch.
    let again = SendAnswer::from_value(&send(&world, &body, NOW_MS + 1).unwrap()).unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyApplied);
    assert_eq!(again.standings, first.standings);
    assert_eq!(balance(&world, world.consumer), amount("9.25"));
    assert_eq!(world.backoffice.store().suspense().unwrap().len(), 1);
}

#[test]
fn forged_replayed_stale_and_unknown_uploads_are_refused_with_nothing_applied() {
    let world = world();
    let body = batch(&world, "B1-M1:100", uses(&world));
    let code = |result: Result<Value, proto::Fault>| result.unwrap_err().registered().unwrap();
    let forged = Secret::new(b"not the meter's secret at all")
        .unwrap()
        .sign(&world.mid, NOW_MS, &body);
    let time = NOW_MS.to_string();
    let signed = Signed {
        mid: Some(world.mid.as_str()),
        time: Some(&time),
        signature: Some(&forged),
    };
    assert_eq!(
        code(world.backoffice.send(&body, signed, NOW_MS)),
        FaultCode::BadSignature
    );
    assert_eq!(
        code(world.backoffice.send(&body, Signed::default(), NOW_MS)),
        FaultCode::BadSignature
    );
    let skewed = send(&world, &body, NOW_MS - SIGNATURE_WINDOW_MS - 1_000).unwrap_err();
    assert_eq!(skewed.registered(), Some(FaultCode::ClockSkew));
    assert!(
        skewed
            .message
            .contains("the meter's clock is 301 s behind the backoffice's"),
        "{}",
        skewed.message
    );
    // A well-formed change: another customer named as the payer.
    let mut tampered = body.clone();
    let named = world.consumer.as_str().as_bytes();
    let at = tampered
        .windows(named.len())
        .position(|window| window == named)
        .expect("the body names the consumer")
        + named.len()
        - 1;
    tampered[at] = if tampered[at] == b'9' {
        b'8'
    } else {
        tampered[at] + 1
    };
    let signature = world.secret.sign(&world.mid, NOW_MS, &body);
    let signed = Signed {
        mid: Some(world.mid.as_str()),
        time: Some(&time),
        signature: Some(&signature),
    };
    assert_eq!(
        code(world.backoffice.send(&tampered, signed, NOW_MS)),
        FaultCode::BadSignature,
        "a changed body never verifies"
    );
    let stranger_mid = Mid::parse("B1-M99").unwrap();
    let stranger = batch_from(stranger_mid, "B1-M99:1", vec![]);
    let signature = world.secret.sign(&stranger_mid, NOW_MS, &stranger);
    let signed = Signed {
        mid: Some("B1-M99"),
        time: Some(&time),
        signature: Some(&signature),
    };
    assert_eq!(
        code(world.backoffice.send(&stranger, signed, NOW_MS)),
        FaultCode::UnknownMeter
    );
    assert_eq!(
        balance(&world, world.consumer),
        amount("10"),
        "nothing applied"
    );
    // The genuine upload, then its exact replay.
    send(&world, &body, NOW_MS).unwrap();
    assert_eq!(code(send(&world, &body, NOW_MS)), FaultCode::Replay);
    assert_eq!(balance(&world, world.consumer), amount("9.25"));
}

#[test]
fn the_ledger_and_period_counts_survive_a_restart() {
    let world = world();
    let body = batch(&world, "B1-M1:100", uses(&world));
    send(&world, &body, NOW_MS).unwrap();
    let path = world._dir.path().to_owned();
    let World {
        backoffice,
        _dir: dir,
        ..
    } = world;
    drop(backoffice);
    let store = SledStore::open(&path).unwrap();
    let reopened = Backoffice::open(store, PARAMS).unwrap();
    let ledger = reopened.ledger();
    ledger.verify();
    let consumer = reopened
        .store()
        .customer(&Cid::parse("B1-C1").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        ledger.balance(&AccountId::Customer(consumer.cid)),
        amount("9.25")
    );
    let period = backoffice::store::PeriodKey {
        payer: Cid::parse("B1-C2").unwrap(),
        pid: Pid::parse("B1-P2").unwrap(),
        month: backoffice::send::month_of(NOW_MS - 1000),
    };
    assert_eq!(reopened.store().period_uses(&period).unwrap(), 3);
    drop(dir);
}

#[test]
fn a_denied_or_broke_customer_is_answered_false() {
    let world = world();
    let me = Some(Payer::Customer(world.consumer));
    // 40 uses at 0.25 = 10.00: the balance reaches zero, which a prepaid
    // account is not allowed to reach.
    let events: Vec<Event> = (0..40)
        .map(|_| Event::Commit {
            pid: world.product,
            payer: me,
        })
        .collect();
    let answer =
        SendAnswer::from_value(&send(&world, &batch(&world, "B1-M1:1", events), NOW_MS).unwrap())
            .unwrap();
    assert_eq!(balance(&world, world.consumer), Amount::ZERO);
    let standing = answer
        .standings
        .iter()
        .find(|s| s.party == Payer::Customer(world.consumer))
        .unwrap();
    assert!(!standing.allowed, "a prepaid account at zero is denied");
    // A deposit and a new upload restore the standing.
    world
        .backoffice
        .post(vec![NewTransfer {
            debit: AccountId::System(SystemAccount::Funding),
            credit: AccountId::Customer(world.consumer),
            amount: amount("5"),
            kind: TransferKind::Deposit,
        }])
        .unwrap();
    let login = vec![Event::Login(world.consumer)];
    let answer =
        SendAnswer::from_value(&send(&world, &batch(&world, "B1-M1:2", login), NOW_MS).unwrap())
            .unwrap();
    assert!(answer.standings[0].allowed);
    // An operator's "deny service" wins over any balance.
    world
        .backoffice
        .store()
        .change_customer(&world.consumer, &|customer| customer.denied = true)
        .unwrap();
    let login = vec![Event::Login(world.consumer)];
    let answer =
        SendAnswer::from_value(&send(&world, &batch(&world, "B1-M1:3", login), NOW_MS).unwrap())
            .unwrap();
    assert!(!answer.standings[0].allowed);
}

#[test]
fn a_taca_that_traps_sends_its_reading_to_suspense_and_the_rest_is_applied() {
    let world = world();
    // Prices 0.5 for the first use in the period, traps on any later one.
    let trapping = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "taca_abi_version") (result i32) (i32.const 1))
            (func (export "taca_input") (result i32) (i32.const 1024))
            (func (export "taca_price") (param i32) (result i64)
              (if (i64.ne (i64.load (i32.const 1040)) (i64.const 0)) (then unreachable))
              (i64.const 500000000)))"#,
    )
    .unwrap();
    let bid = Bid::parse("B1").unwrap();
    let risky = world
        .backoffice
        .store()
        .create_product(
            &bid,
            NewProduct::new(&world.producer, "Risky", "traps", &trapping, max()),
        )
        .unwrap();
    let me = Some(Payer::Customer(world.consumer));
    let events = vec![
        Event::Commit {
            pid: risky.pid,
            payer: me,
        },
        Event::Commit {
            pid: risky.pid,
            payer: me,
        },
        Event::Commit {
            pid: world.product,
            payer: me,
        },
    ];
    let answer =
        SendAnswer::from_value(&send(&world, &batch(&world, "B1-M1:7", events), NOW_MS).unwrap())
            .unwrap();
    assert_eq!(answer.outcome, Outcome::Applied);
    assert_eq!(
        balance(&world, world.consumer),
        amount("9.25"),
        "0.5 + 0.25 charged"
    );
    let suspense = world.backoffice.store().suspense().unwrap();
    assert_eq!(suspense.len(), 1, "{suspense:?}");
    assert_eq!((suspense[0].pid, suspense[0].seq), (risky.pid, 101));
    assert!(
        suspense[0].reason.contains("trapped"),
        "{}",
        suspense[0].reason
    );
    world.backoffice.ledger().verify();
    books_verify(&world);
}

#[test]
fn suspense_is_repriced_once_what_was_missing_exists_under_the_same_rules() {
    let world = world();
    let stranger = Cid::parse("B1-C4").unwrap();
    let later = Pid::parse("B1-P3").unwrap();
    let events = vec![
        Event::Commit {
            pid: world.product,
            payer: Some(Payer::Customer(stranger)),
        },
        Event::Commit {
            pid: later,
            payer: Some(Payer::Customer(world.consumer)),
        },
        Event::Commit {
            pid: world.product,
            payer: Some(Payer::Customer(world.consumer)),
        },
    ];
    send(&world, &batch(&world, "B1-M1:1", events), NOW_MS).unwrap();
    let store = world.backoffice.store();
    assert_eq!(store.suspense().unwrap().len(), 2);
    assert_eq!(store.suspense_count().unwrap(), 2);
    assert_eq!(
        world.backoffice.reprice_suspense().unwrap(),
        (0, 2),
        "still unknown"
    );
    // The product B1-P3 is registered; the stranger registers too and
    // grants the meter, but only from now on: the use made before stays.
    let bid = Bid::parse("B1").unwrap();
    let product = store
        .create_product(
            &bid,
            NewProduct::new(&world.producer, "Later", "flat", &module("flat"), max()),
        )
        .unwrap();
    assert_eq!(product.pid, later);
    let customer = store
        .create_customer(&bid, "New", "new@example.org")
        .unwrap();
    assert_eq!(customer.cid, stranger);
    store
        .create_grant(NewGrant {
            created_ms: NOW_MS + 1,
            ..grant_of(world.mid, stranger)
        })
        .unwrap();
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (1, 1));
    let left = store.suspense().unwrap();
    assert!(left[0].reason.starts_with("no grant"), "{left:?}");
    assert_eq!(store.suspense_count().unwrap(), 1);
    assert_eq!(balance(&world, stranger), Amount::ZERO, "never charged");
    assert_eq!(balance(&world, world.consumer), amount("9.5"));
    assert_eq!(balance(&world, world.producer), amount("0.5"));
    assert_eq!(
        world.backoffice.reprice_suspense().unwrap(),
        (0, 1),
        "nothing twice"
    );
    world.backoffice.ledger().verify();
    books_verify(&world);
}

#[test]
fn a_refused_price_does_not_count_in_the_period_even_when_priced_on_all_cores() {
    let world = world();
    // Prices (count + 1) nanos, and refuses the use that would be the third
    // in the period: every later use sees the same count and is refused too.
    let picky = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "taca_abi_version") (result i32) (i32.const 1))
            (func (export "taca_input") (result i32) (i32.const 1024))
            (func (export "taca_price") (param i32) (result i64)
              (if (i64.eq (i64.load (i32.const 1040)) (i64.const 2))
                (then (return (i64.const -7))))
              (i64.add (i64.load (i32.const 1040)) (i64.const 1))))"#,
    )
    .unwrap();
    let bid = Bid::parse("B1").unwrap();
    let picky = world
        .backoffice
        .store()
        .create_product(
            &bid,
            NewProduct::new(&world.producer, "Picky", "refuses", &picky, max()),
        )
        .unwrap();
    let me = Some(Payer::Customer(world.consumer));
    let commits = |n: usize| {
        (0..n)
            .map(|_| Event::Commit {
                pid: picky.pid,
                payer: me,
            })
            .collect::<Vec<_>>()
    };
    // Enough uses that they are priced on several threads.
    let body = batch(&world, "B1-M1:1000", commits(300));
    send(&world, &body, NOW_MS).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("9.999999997"));
    assert_eq!(balance(&world, world.producer), amount("0.000000003"));
    assert_eq!(world.backoffice.store().suspense().unwrap().len(), 298);
    assert_eq!(world.backoffice.store().suspense_count().unwrap(), 298);
    // Suspense pages by cursor: every record once, in the store's order.
    let store = world.backoffice.store();
    let mut paged = Vec::new();
    let mut after: Option<SuspenseCursor> = None;
    for _ in 0..10 {
        let page = store.suspense_page(after.as_ref(), 100).unwrap();
        let Some(last) = page.last() else { break };
        let cursor = SuspenseCursor::of(last);
        assert_eq!(
            SuspenseCursor::parse(&cursor.to_string()),
            Some(cursor.clone())
        );
        after = Some(cursor);
        paged.extend(page);
    }
    assert_eq!(paged, store.suspense().unwrap());
    // The two priced uses are one statement line.
    let lines = world
        .backoffice
        .statement(&AccountId::Customer(world.producer));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        matches!(lines[0].kind, TransferKind::Use { uses: 2, pid, .. } if pid == picky.pid),
        "{lines:?}"
    );
    // The period still holds two uses: the next one is refused as well.
    let body = batch(&world, "B1-M1:2000", commits(1));
    send(&world, &body, NOW_MS + 1).unwrap();
    assert_eq!(world.backoffice.store().suspense().unwrap().len(), 299);
    assert_eq!(world.backoffice.store().suspense_count().unwrap(), 299);
    assert_eq!(balance(&world, world.consumer), amount("9.999999997"));
    world.backoffice.ledger().verify();
    books_verify(&world);
}

/// A processor that declines, or takes what it is asked.
struct Processor {
    declines: bool,
}

impl backoffice::funding::MacroAccounts for Processor {
    fn collect(
        &self,
        customer: &backoffice::registry::Customer,
        amount: Amount,
        _idempotency_key: &str,
    ) -> Result<String, backoffice::funding::FundingError> {
        if self.declines {
            Err(backoffice::funding::FundingError::Declined(format!(
                "card of {} expired",
                customer.cid
            )))
        } else {
            Ok(format!("auth-{amount}"))
        }
    }
}

#[test]
fn a_deposit_is_posted_only_when_the_macro_account_pays() {
    let world = world();
    let customer = world
        .backoffice
        .store()
        .customer(&world.producer)
        .unwrap()
        .unwrap();
    let before = world.backoffice.ledger().transfers().len();
    let declined = world
        .backoffice
        .deposit(&Processor { declines: true }, &customer, amount("5"))
        .unwrap_err();
    assert_eq!(declined.registered(), Some(FaultCode::RecordRefused));
    assert!(declined.message.contains("expired"), "{declined:?}");
    assert_eq!(
        world.backoffice.ledger().transfers().len(),
        before,
        "nothing posted"
    );
    assert_eq!(balance(&world, world.producer), Amount::ZERO);
    let refused = world
        .backoffice
        .deposit(&Processor { declines: false }, &customer, amount("-1"))
        .unwrap_err();
    assert_eq!(refused.registered(), Some(FaultCode::InvalidParams));
    let posted = world
        .backoffice
        .deposit(&Processor { declines: false }, &customer, amount("5"))
        .unwrap();
    assert_eq!(posted.kind, TransferKind::Deposit);
    assert_eq!(balance(&world, world.producer), amount("5"));
    world.backoffice.ledger().verify();
    books_verify(&world);
}

#[test]
fn period_counts_carry_from_batch_to_batch_as_within_one() {
    // 18 uses of the tiered component, paid by the consumer: the first ten
    // in the month are free, the next eight 0.05 each, whether they come in
    // one batch or in three.
    let commits = |world: &World, count: usize| -> Vec<Event> {
        (0..count)
            .map(|_| Event::Commit {
                pid: world.component,
                payer: Some(Payer::Customer(world.consumer)),
            })
            .collect()
    };
    let one = world();
    let body = batch(&one, "B1-M1:100", commits(&one, 18));
    send(&one, &body, NOW_MS).unwrap();
    let three = world();
    for (index, id) in ["B1-M1:100", "B1-M1:200", "B1-M1:300"].iter().enumerate() {
        let body = batch(&three, id, commits(&three, 6));
        send(&three, &body, NOW_MS + index as u64).unwrap();
    }
    for world in [&one, &three] {
        assert_eq!(balance(world, world.consumer), amount("9.60"));
        let period = backoffice::store::PeriodKey {
            payer: world.consumer,
            pid: world.component,
            month: backoffice::send::month_of(NOW_MS - 1000),
        };
        assert_eq!(world.backoffice.store().period_uses(&period).unwrap(), 18);
        world.backoffice.ledger().verify();
        books_verify(world);
    }
}

/// A hostile meter owner: their meter names other customers as payers and
/// nests components under products it has no authorized use of.
#[test]
fn a_meter_charges_nobody_who_did_not_grant_it() {
    let world = world();
    let bid = Bid::parse("B1").unwrap();
    let store = world.backoffice.store();
    // Mallory registers, with a meter of her own and a product whose TACA
    // asks for as much as the maximum allows.
    let mallory = store
        .create_customer(&bid, "Mallory", "mallory@example.org")
        .unwrap()
        .cid;
    let meter = store.create_meter(&bid, &mallory).unwrap();
    let secret = Secret::new(meter.secret_hex.as_bytes()).unwrap();
    let greedy = store
        .create_product(
            &bid,
            NewProduct::new(&mallory, "Greedy", "flat", &module("flat"), max()),
        )
        .unwrap()
        .pid;
    let victims = [world.consumer, world.producer, world.maker];
    let before: Vec<Amount> = victims.iter().map(|&cid| balance(&world, cid)).collect();
    let mut events = Vec::new();
    for &victim in &victims {
        events.push(Event::Commit {
            pid: greedy,
            payer: Some(Payer::Customer(victim)),
        });
        // A component of Mallory's nested under the victims' products,
        // whose owners would pay: no authorized use of them encloses it.
        events.push(Event::Commit {
            pid: greedy,
            payer: Some(Payer::OwnerOf(world.product)),
        });
        events.push(Event::Commit {
            pid: world.product,
            payer: Some(Payer::Customer(victim)),
        });
    }
    let body = batch_from(meter.mid, "x:1", events);
    let signature = secret.sign(&meter.mid, NOW_MS, &body);
    let time = NOW_MS.to_string();
    let signed = Signed {
        mid: Some(meter.mid.as_str()),
        time: Some(&time),
        signature: Some(&signature),
    };
    let answer =
        SendAnswer::from_value(&world.backoffice.send(&body, signed, NOW_MS).unwrap()).unwrap();
    let after: Vec<Amount> = victims.iter().map(|&cid| balance(&world, cid)).collect();
    assert_eq!(after, before, "no victim is charged");
    assert_eq!(balance(&world, mallory), Amount::ZERO, "nothing credited");
    let suspense = store.suspense().unwrap();
    assert_eq!(suspense.len(), 9, "every reading kept: {suspense:?}");
    assert!(
        suspense
            .iter()
            .all(|record| record.reason.starts_with("no grant")),
        "{suspense:?}"
    );
    // The meter learns nothing of customers who did not grant it.
    for standing in &answer.standings {
        if let Payer::Customer(_) = standing.party {
            assert!(!standing.allowed, "{standing:?}");
        }
    }
    // Re-pricing applies the same rules.
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (0, 9));
    world.backoffice.ledger().verify();
    books_verify(&world);
}

#[test]
fn a_component_is_charged_to_the_owner_only_inside_an_authorized_use() {
    let world = world();
    let me = Some(Payer::Customer(world.consumer));
    let inside = Some(Payer::OwnerOf(world.product));
    let context = |name: &str| Context::parse(name).unwrap();
    // 12 component uses (the tiered TACA's first 10 a month are free, then
    // 0.05): 11 inside an authorized use in the same context, 1 whose
    // enclosing use is in another context.
    let mut readings = Vec::new();
    let mut push = |context: &Context, event: Event| {
        readings.push(Reading {
            seq: 1 + readings.len() as u64,
            time_ms: NOW_MS - 1000,
            context: context.clone(),
            event,
        })
    };
    let main = context("42.7");
    let other = context("43.7");
    push(
        &other,
        Event::Commit {
            pid: world.component,
            payer: inside,
        },
    );
    for _ in 0..11 {
        push(
            &main,
            Event::Commit {
                pid: world.component,
                payer: inside,
            },
        );
    }
    push(
        &main,
        Event::Commit {
            pid: world.product,
            payer: me,
        },
    );
    let body = body_of(world.mid, "x:1", readings, Vec::new());
    send(&world, &body, NOW_MS).unwrap();
    // Bob, the editor's owner, is credited 0.25 and pays 0.05 for the
    // eleventh spell check; the twelfth (another context) goes to suspense.
    assert_eq!(balance(&world, world.producer), amount("0.2"));
    assert_eq!(balance(&world, world.maker), amount("0.05"));
    let suspense = world.backoffice.store().suspense().unwrap();
    assert_eq!(suspense.len(), 1, "{suspense:?}");
    assert_eq!(suspense[0].seq, 1);
    assert!(suspense[0].reason.starts_with("no grant"), "{suspense:?}");
}

#[test]
fn a_revoked_or_expired_grant_charges_nothing_after_it_ends_and_answers_false() {
    let world = world();
    let store = world.backoffice.store();
    let me = Some(Payer::Customer(world.consumer));
    let grant = store.grants_of_meter(&world.mid).unwrap()[0].clone();
    store
        .revoke_grant(grant.id, Some(&world.consumer), NOW_MS - 500)
        .unwrap();
    // One use before the revocation, one after.
    let readings = [NOW_MS - 1000, NOW_MS - 100]
        .iter()
        .enumerate()
        .map(|(index, &time_ms)| Reading {
            seq: 1 + index as u64,
            time_ms,
            context: Context::parse("42.7").unwrap(),
            event: Event::Commit {
                pid: world.product,
                payer: me,
            },
        })
        .collect();
    let body = body_of(
        world.mid,
        "x:1",
        readings,
        vec![Payer::Customer(world.consumer)],
    );
    let answer = SendAnswer::from_value(&send(&world, &body, NOW_MS).unwrap()).unwrap();
    assert_eq!(
        balance(&world, world.consumer),
        amount("9.75"),
        "the first only"
    );
    let suspense = store.suspense().unwrap();
    assert_eq!(suspense.len(), 1);
    assert_eq!(suspense[0].seq, 2);
    let standing = answer
        .standings
        .iter()
        .find(|standing| standing.party == Payer::Customer(world.consumer))
        .unwrap();
    assert!(!standing.allowed, "the meter answers false from now on");
}

#[test]
fn a_price_above_the_products_maximum_goes_to_suspense_and_posts_nothing() {
    let world = world();
    let bid = Bid::parse("B1").unwrap();
    let store = world.backoffice.store();
    // The flat TACA asks 0.25 a use; its producer declared at most 0.10.
    let capped = store
        .create_product(
            &bid,
            NewProduct::new(
                &world.producer,
                "Capped",
                "0.10 per use",
                &module("flat"),
                amount("0.1"),
            ),
        )
        .unwrap();
    let me = Some(Payer::Customer(world.consumer));
    let events = vec![
        Event::Commit {
            pid: capped.pid,
            payer: me,
        },
        Event::Commit {
            pid: world.product,
            payer: me,
        },
    ];
    send(&world, &batch(&world, "x:1", events), NOW_MS).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("9.75"));
    let suspense = store.suspense().unwrap();
    assert_eq!(suspense.len(), 1);
    assert_eq!(suspense[0].pid, capped.pid);
    assert!(
        suspense[0].reason.contains("above the product's maximum"),
        "{}",
        suspense[0].reason
    );
    world.backoffice.ledger().verify();
    books_verify(&world);
}

#[test]
fn a_batch_id_sent_again_with_other_readings_is_refused_with_205() {
    let world = world();
    let me = Some(Payer::Customer(world.consumer));
    let one = vec![Event::Commit {
        pid: world.product,
        payer: me,
    }];
    let two = vec![
        Event::Commit {
            pid: world.product,
            payer: me,
        },
        Event::Commit {
            pid: world.product,
            payer: me,
        },
    ];
    send(&world, &batch(&world, "x:1", one.clone()), NOW_MS).unwrap();
    let fault = send(&world, &batch(&world, "x:1", two), NOW_MS + 1).unwrap_err();
    assert_eq!(
        fault.registered(),
        Some(FaultCode::BatchConflict),
        "{fault:?}"
    );
    assert_eq!(
        balance(&world, world.consumer),
        amount("9.75"),
        "applied once"
    );
    // The same readings again are a retry, answered as before.
    let again = send(&world, &batch(&world, "x:1", one), NOW_MS + 2).unwrap();
    assert_eq!(
        SendAnswer::from_value(&again).unwrap().outcome,
        Outcome::AlreadyApplied
    );
}

/// Signs `body` with the world's meter at `now_ms` and sends it at `now_ms`.
fn send_at(world: &World, body: &[u8], now_ms: u64) -> Result<Value, proto::Fault> {
    let signature = world.secret.sign(&world.mid, now_ms, body);
    let time = now_ms.to_string();
    let signed = Signed {
        mid: Some(world.mid.as_str()),
        time: Some(&time),
        signature: Some(&signature),
    };
    world.backoffice.send(body, signed, now_ms)
}

/// Holds keep money from being spent elsewhere: the available balance
/// decides new holds and good standing; a capture is a transfer, checked
/// against what the hold has left even when many come at once; holds
/// outlive a restart, and one that expired while the backoffice was
/// stopped holds nothing from its expiry and has its expiry written once.
#[test]
fn holds_reserve_money_until_captured_released_or_expired_across_a_restart() {
    use backoffice::holds::{Ending, HoldError, HoldId};
    let world = world();
    let office = &world.backoffice;
    let payer = AccountId::Customer(world.consumer);
    let payee = AccountId::Customer(world.producer);
    let charge = || TransferKind::Use {
        pid: world.product,
        batch: BatchId::parse("B1-M1:100").unwrap(),
        uses: 1,
    };
    // An applied batch for the charges to name.
    send(&world, &batch(&world, "B1-M1:100", uses(&world)), NOW_MS).unwrap();
    let start = balance(&world, world.consumer);
    assert_eq!(start, amount("9.25"));
    let hour = 3_600_000;
    let first = office
        .place_hold(payer, amount("4"), NOW_MS + hour, "a match", NOW_MS)
        .unwrap()
        .unwrap();
    assert_eq!(first.id, HoldId(0));
    assert_eq!(office.available(&payer, NOW_MS), amount("5.25"));
    assert_eq!(balance(&world, world.consumer), start, "nothing moved yet");
    // More than is available: refused, nothing changed.
    let refused = office
        .place_hold(payer, amount("5.26"), NOW_MS + hour, "", NOW_MS)
        .unwrap();
    assert!(
        matches!(refused, Err(HoldError::Insufficient { .. })),
        "{refused:?}"
    );
    // Captured in parts, at once from 8 threads: never beyond the hold.
    let captured: Vec<bool> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    match office
                        .capture_hold(HoldId(0), amount("0.75"), payee, charge(), NOW_MS + 1)
                        .unwrap()
                    {
                        Ok(transfer) => {
                            assert_eq!((transfer.debit, transfer.credit), (payer, payee));
                            true
                        }
                        Err(HoldError::BeyondHold { .. }) => false,
                        Err(other) => panic!("{other}"),
                    }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(captured.iter().filter(|c| **c).count(), 5, "5 x 0.75 of 4");
    assert_eq!(balance(&world, world.consumer), amount("5.5"));
    assert_eq!(office.available(&payer, NOW_MS + 2), amount("5.25"));
    // Released: the 0.25 it kept is available again, once.
    office.release_hold(HoldId(0), NOW_MS + 3).unwrap().unwrap();
    assert_eq!(office.available(&payer, NOW_MS + 3), amount("5.5"));
    assert_eq!(
        office.release_hold(HoldId(0), NOW_MS + 4).unwrap(),
        Err(HoldError::Ended(HoldId(0)))
    );
    // A hold of everything available: the payer is no longer in good
    // standing for new uses.
    office
        .place_hold(payer, amount("5.5"), NOW_MS + hour, "all of it", NOW_MS + 5)
        .unwrap()
        .unwrap();
    let login = vec![Event::Login(world.consumer)];
    let answer =
        SendAnswer::from_value(&send(&world, &batch(&world, "B1-M1:2", login), NOW_MS).unwrap())
            .unwrap();
    assert!(!answer.standings[0].allowed, "everything is held");
    // Stopped across the expiry of the second hold, started again: the
    // hold is kept, holds nothing past its expiry, and its expiry is
    // written once, dated at the expiry.
    let World {
        _dir, backoffice, ..
    } = world;
    drop(backoffice);
    let office = Backoffice::open(SledStore::open(_dir.path()).unwrap(), PARAMS).unwrap();
    let later = NOW_MS + 2 * hour;
    let held = office.hold(HoldId(1)).unwrap();
    assert_eq!((held.held, held.ended), (amount("5.5"), None));
    assert_eq!(office.available(&payer, NOW_MS + 6), Amount::ZERO);
    assert_eq!(office.available(&payer, later), amount("5.5"));
    assert_eq!(office.expire_holds(later).unwrap(), 1);
    assert_eq!(office.expire_holds(later + 1).unwrap(), 0);
    assert_eq!(
        office.hold(HoldId(1)).unwrap().ended,
        Some(Ending::Expired(NOW_MS + hour))
    );
    // A node whose clock is behind does not act on a hold that expired by
    // the time of the latest event (another hold placed after it).
    let short = office
        .place_hold(payer, amount("1"), later + 10, "", later)
        .unwrap()
        .unwrap();
    office
        .place_hold(payer, amount("1"), later + hour, "", later + 20)
        .unwrap()
        .unwrap();
    let payee = AccountId::Customer(Cid::parse("B1-C2").unwrap());
    assert_eq!(
        office
            .capture_hold(
                short.id,
                amount("1"),
                payee,
                TransferKind::Deposit,
                later + 5
            )
            .unwrap(),
        Err(HoldError::Ended(short.id)),
        "a slow clock"
    );
    // Nor is a hold captured to its own account.
    assert_eq!(
        office
            .capture_hold(
                HoldId(3),
                amount("1"),
                payer,
                TransferKind::Deposit,
                later + 21
            )
            .unwrap(),
        Err(HoldError::SameAccount(HoldId(3)))
    );
    let (report, _) = office.store().verify();
    assert!(report.is_ok(), "{:?}", report.problems);
    office.ledger().verify();
}

/// Two re-pricings of one batch's suspense, each pricing one of its uses,
/// would date their records the same millisecond (one after the batch
/// arrived, when that is later than the clock): each gets its own, and
/// both sets of records are kept.
#[test]
fn two_repricings_of_one_batch_keep_each_their_own_itemised_records() {
    let world = world();
    let store = world.backoffice.store();
    let bid = Bid::parse("B1").unwrap();
    // The batch arrives "tomorrow" by the backoffice's clock of the call.
    let tomorrow = backoffice::now_ms() + 86_400_000;
    let pids = [Pid::parse("B1-P3").unwrap(), Pid::parse("B1-P4").unwrap()];
    let readings = pids
        .iter()
        .enumerate()
        .map(|(index, pid)| Reading {
            seq: 100 + index as u64,
            time_ms: tomorrow - 1000,
            context: Context::parse("42.7").unwrap(),
            event: Event::Commit {
                pid: *pid,
                payer: Some(Payer::Customer(world.consumer)),
            },
        })
        .collect();
    let body = body_of(world.mid, "B1-M1:1", readings, Vec::new());
    send_at(&world, &body, tomorrow).unwrap();
    assert_eq!(store.suspense_count().unwrap(), 2);
    let made = store
        .create_product(
            &bid,
            NewProduct::new(&world.producer, "Later", "flat", &module("flat"), max()),
        )
        .unwrap();
    assert_eq!(made.pid, pids[0]);
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (1, 1));
    // Restarted, the backoffice no longer knows when it last re-priced:
    // its second re-pricing first dates its records as the first did, is
    // refused by the store (nothing written), and dates them later.
    let World {
        _dir,
        backoffice,
        consumer,
        producer,
        maker,
        product,
        test_pid,
        component,
        mid,
        secret,
    } = world;
    drop(backoffice);
    let world = World {
        backoffice: Backoffice::open(SledStore::open(_dir.path()).unwrap(), PARAMS).unwrap(),
        _dir,
        consumer,
        producer,
        maker,
        product,
        test_pid,
        component,
        mid,
        secret,
    };
    let store = world.backoffice.store();
    let made = store
        .create_product(
            &bid,
            NewProduct::new(&world.producer, "Later", "flat", &module("flat"), max()),
        )
        .unwrap();
    assert_eq!(made.pid, pids[1]);
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (1, 0));
    let key = backoffice::store::BatchKey {
        mid: world.mid,
        id: BatchId::parse("B1-M1:1").unwrap(),
    };
    for (after, pid) in [(1, pids[0]), (2, pids[1])] {
        let at = backoffice::store::ItemisedAt {
            key: key.clone(),
            arrived_ms: tomorrow + after,
        };
        let records = store.itemised_records_at(&at).unwrap().unwrap();
        let items: Vec<_> = records.iter().flat_map(|record| &record.items).collect();
        assert_eq!(items.len(), 1, "{items:?}");
        assert!(
            format!("{:?}", items[0]).contains(pid.as_str()),
            "{items:?}"
        );
    }
    world.backoffice.ledger().verify();
    books_verify(&world);
}

/// A customer who granted her own meter uses another producer's product
/// and claims components inside it: only components its owner declared,
/// inside uses of its real PID, are charged to that owner.
#[test]
fn a_granted_meter_makes_a_producer_pay_only_for_declared_components_of_real_uses() {
    let world = world();
    let bid = Bid::parse("B1").unwrap();
    let store = world.backoffice.store();
    let greedy = store
        .create_product(
            &bid,
            NewProduct::new(&world.maker, "Greedy", "flat", &module("flat"), max()),
        )
        .unwrap()
        .pid;
    let me = Some(Payer::Customer(world.consumer));
    let inside = |pid: Pid| Some(Payer::OwnerOf(pid));
    let events = vec![
        // Not declared by Bob: never his to pay.
        Event::Commit {
            pid: greedy,
            payer: inside(world.product),
        },
        Event::Commit {
            pid: world.product,
            payer: me,
        },
        // Declared, but inside a free test use: not charged either.
        Event::Commit {
            pid: world.component,
            payer: inside(world.test_pid),
        },
        Event::Commit {
            pid: world.test_pid,
            payer: me,
        },
    ];
    send(&world, &batch(&world, "x:1", events), NOW_MS).unwrap();
    assert_eq!(
        balance(&world, world.consumer),
        amount("9.75"),
        "one real use"
    );
    assert_eq!(
        balance(&world, world.producer),
        amount("0.25"),
        "paid nothing"
    );
    assert_eq!(balance(&world, world.maker), Amount::ZERO);
    let suspense = store.suspense().unwrap();
    let reasons: Vec<&str> = suspense
        .iter()
        .map(|record| record.reason.as_str())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("did not declare"), "{reasons:?}");
    assert!(reasons[1].contains("test PID"), "{reasons:?}");
    // Re-pricing keeps them there.
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (0, 2));
}

/// A meter cannot date uses months back, into a billing month whose free
/// tier is unspent: past `USE_AGE_MAX_MS` before arrival a use goes to
/// suspense, even under a grant that was live then.
#[test]
fn a_use_dated_more_than_two_months_before_its_batch_arrived_goes_to_suspense() {
    let world = world();
    let store = world.backoffice.store();
    let day = 24 * 3600 * 1000;
    store
        .create_grant(NewGrant {
            created_ms: NOW_MS - 100 * day,
            ..grant_of(world.mid, world.consumer)
        })
        .unwrap();
    let use_at = |time_ms: u64, seq: u64| Reading {
        seq,
        time_ms,
        context: Context::parse("42.7").unwrap(),
        event: Event::Commit {
            pid: world.product,
            payer: Some(Payer::Customer(world.consumer)),
        },
    };
    let old = use_at(NOW_MS - USE_AGE_MAX_MS - 1_000, 1);
    let recent = use_at(NOW_MS - USE_AGE_MAX_MS + day, 2);
    send_at(
        &world,
        &body_of(world.mid, "y:1", vec![old, recent], Vec::new()),
        NOW_MS,
    )
    .unwrap();
    assert_eq!(balance(&world, world.consumer), amount("9.75"));
    let suspense = store.suspense().unwrap();
    assert_eq!(suspense.len(), 1, "{suspense:?}");
    assert!(suspense[0].reason.starts_with("too old"), "{suspense:?}");
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (0, 1));
}

#[test]
fn a_meter_cannot_backdate_uses_past_a_revocation_or_date_them_in_the_future() {
    let world = world();
    let store = world.backoffice.store();
    let me = Some(Payer::Customer(world.consumer));
    let grant = store.grants_of_meter(&world.mid).unwrap()[0].clone();
    store.revoke_grant(grant.id, None, NOW_MS - 500).unwrap();
    let use_at = |time_ms: u64, seq: u64| Reading {
        seq,
        time_ms,
        context: Context::parse("42.7").unwrap(),
        event: Event::Commit {
            pid: world.product,
            payer: me,
        },
    };
    let body = |id: &str, readings: Vec<Reading>| body_of(world.mid, id, readings, Vec::new());
    // Stamped before the revocation, but arriving long after it ended.
    let late = NOW_MS + world.backoffice.late_ms();
    send_at(&world, &body("x:1", vec![use_at(NOW_MS - 1_000, 1)]), late).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("10"));
    let suspense = store.suspense().unwrap();
    assert!(suspense[0].reason.starts_with("no grant"), "{suspense:?}");
    // The customer grants the meter again, later: that grant does not
    // reach back to the use before, nor cover uses dated after a batch
    // arrived.
    let granted_at = late + 1_000;
    store
        .create_grant(NewGrant {
            created_ms: granted_at,
            ..grant_of(world.mid, world.consumer)
        })
        .unwrap();
    let arrives = granted_at + 1_000;
    let future = arrives + 2 * SIGNATURE_WINDOW_MS;
    send_at(&world, &body("x:2", vec![use_at(future, 2)]), arrives).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("10"));
    let suspense = store.suspense().unwrap();
    assert!(
        suspense
            .iter()
            .any(|record| record.reason.starts_with("from the future")),
        "{suspense:?}"
    );
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (0, 2));
    // Within the clock's tolerance a use just before the grant's approval
    // counts: the meter's clock may be a little behind ours.
    send_at(
        &world,
        &body("x:3", vec![use_at(granted_at - 1_000, 3)]),
        arrives + 1,
    )
    .unwrap();
    assert_eq!(balance(&world, world.consumer), amount("9.75"));
}

/// A producer pays for a component only inside a use of theirs that was
/// itself charged: not inside one whose price was refused, nor through a
/// later use than the one that encloses it.
#[test]
fn a_component_is_charged_only_inside_an_enclosing_use_that_was_charged() {
    let world = world();
    let bid = Bid::parse("B1").unwrap();
    let store = world.backoffice.store();
    // Asks 0.25 a use but declared at most 0.10: every use is refused.
    let capped = store
        .create_product(
            &bid,
            NewProduct::new(
                &world.producer,
                "Capped",
                "0.10",
                &module("flat"),
                amount("0.1"),
            ),
        )
        .unwrap()
        .pid;
    store
        .set_components(&capped, None, &[world.component])
        .unwrap();
    let me = Some(Payer::Customer(world.consumer));
    let inside = |pid: Pid| Some(Payer::OwnerOf(pid));
    // Eleven spell checks inside the refused use (the tiered TACA's first
    // ten a month are free, so the eleventh would cost Bob 0.05).
    let mut events: Vec<Event> = (0..11)
        .map(|_| Event::Commit {
            pid: world.component,
            payer: inside(capped),
        })
        .collect();
    events.push(Event::Commit {
        pid: capped,
        payer: me,
    });
    send(&world, &batch(&world, "x:1", events), NOW_MS).unwrap();
    assert_eq!(
        balance(&world, world.producer),
        Amount::ZERO,
        "Bob pays nothing"
    );
    assert_eq!(balance(&world, world.maker), Amount::ZERO);
    assert_eq!(balance(&world, world.consumer), amount("10"));
    let suspense = store.suspense().unwrap();
    assert_eq!(suspense.len(), 12, "{suspense:?}");
    assert!(
        suspense[..11]
            .iter()
            .all(|record| record.reason.contains("was not charged") && !record.authorized),
        "{suspense:?}"
    );
    // Re-pricing does not charge them either.
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (0, 12));
    assert_eq!(balance(&world, world.producer), Amount::ZERO);
}

/// A restored or cloned meter may cut its batches elsewhere than the
/// original did: readings of one meter instance are applied once whatever
/// batch id brings them.
#[test]
fn readings_applied_under_one_batch_id_are_refused_under_another() {
    let world = world();
    let me = Some(Payer::Customer(world.consumer));
    let body = |id: &str, seqs: std::ops::RangeInclusive<u64>| {
        let readings = seqs
            .map(|seq| Reading {
                seq,
                time_ms: NOW_MS - 1_000,
                context: Context::parse("42.7").unwrap(),
                event: Event::Commit {
                    pid: world.product,
                    payer: me,
                },
            })
            .collect();
        body_of(world.mid, id, readings, Vec::new())
    };
    let instance = "0123456789abcdef";
    send(&world, &body(&format!("{instance}:1"), 1..=3), NOW_MS).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("9.25"));
    let fault = send(&world, &body(&format!("{instance}:3"), 3..=5), NOW_MS + 1).unwrap_err();
    assert_eq!(
        fault.registered(),
        Some(FaultCode::BatchConflict),
        "{fault:?}"
    );
    assert!(
        fault.message.contains("readings 1 to 3"),
        "{}",
        fault.message
    );
    assert_eq!(
        balance(&world, world.consumer),
        amount("9.25"),
        "nothing twice"
    );
    // The same batch again is a retry; the readings after it are new.
    let again = send(&world, &body(&format!("{instance}:1"), 1..=3), NOW_MS + 2).unwrap();
    assert_eq!(
        SendAnswer::from_value(&again).unwrap().outcome,
        Outcome::AlreadyApplied
    );
    send(&world, &body(&format!("{instance}:4"), 4..=5), NOW_MS + 3).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("8.75"));
    // Another instance numbers its readings from 1 again.
    send(&world, &body("fedcba9876543210:1", 1..=2), NOW_MS + 4).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("8.25"));
    world.backoffice.ledger().verify();
    books_verify(&world);
}

/// A batch sent again is answered with the standings as they are now, not
/// as they were when it was first applied: the meter files them as fresh.
#[test]
fn a_batch_sent_again_is_answered_with_the_standings_of_now() {
    let world = world();
    let body = batch(&world, "B1-M1:100", uses(&world));
    let first = SendAnswer::from_value(&send(&world, &body, NOW_MS).unwrap()).unwrap();
    let standing = |answer: &SendAnswer| {
        answer
            .standings
            .iter()
            .find(|standing| standing.party == Payer::Customer(world.consumer))
            .map(|standing| standing.allowed)
    };
    assert_eq!(standing(&first), Some(true));
    world
        .backoffice
        .store()
        .change_customer(&world.consumer, &|customer| customer.denied = true)
        .unwrap();
    let again = SendAnswer::from_value(&send(&world, &body, NOW_MS + 1).unwrap()).unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyApplied);
    assert_eq!(again.batch_id, first.batch_id);
    assert_eq!(standing(&again), Some(false), "denied since");
    assert_eq!(
        balance(&world, world.consumer),
        amount("9.25"),
        "applied once"
    );
}

/// Cox's minimal form has no batch id: the very same signed body sent
/// again (an answer was lost) gets the stored answer, even later than the
/// signature window, and is applied once.
#[test]
fn the_same_signed_minimal_body_sent_again_gets_its_answer_and_is_applied_once() {
    let world = world();
    let events = vec![
        Event::Login(world.consumer),
        Event::Query {
            pid: world.product,
            payer: None,
        },
        Event::Commit {
            pid: world.product,
            payer: None,
        },
        Event::Logout(world.consumer),
    ];
    let request = SendRequest {
        mid: world.mid,
        body: SendBody::Minimal(events),
    };
    let body = encode_call("send", &request.to_params());
    let signature = world.secret.sign(&world.mid, NOW_MS, &body);
    let time = NOW_MS.to_string();
    let signed = Signed {
        mid: Some(world.mid.as_str()),
        time: Some(&time),
        signature: Some(&signature),
    };
    let first = world.backoffice.send(&body, signed, NOW_MS).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("9.75"));
    for later in [NOW_MS + 1, NOW_MS + 2 * SIGNATURE_WINDOW_MS] {
        let again = world.backoffice.send(&body, signed, later).unwrap();
        assert_eq!(again, first, "the stored answer");
        assert_eq!(balance(&world, world.consumer), amount("9.75"), "once");
    }
    // Another signature over the same body names no applied batch and is
    // checked as any upload is.
    let forged = Secret::new(b"not the meter's secret at all")
        .unwrap()
        .sign(&world.mid, NOW_MS, &body);
    let signed = Signed {
        mid: Some(world.mid.as_str()),
        time: Some(&time),
        signature: Some(&forged),
    };
    let fault = world
        .backoffice
        .send(&body, signed, NOW_MS + 3)
        .unwrap_err();
    assert_eq!(fault.registered(), Some(FaultCode::BadSignature));
    books_verify(&world);
}

/// Refreshes of the status table (batches without readings), which any
/// local user can ask for, store nothing; a batch with readings keeps only
/// its digest, and its repeat is still answered.
#[test]
fn refreshes_store_nothing_and_applied_batches_only_their_digest() {
    let world = world();
    let store = world.backoffice.store();
    for n in 0..3 {
        let id = format!("0123456789abcdef:t{n}");
        let body = body_of(
            world.mid,
            &id,
            Vec::new(),
            vec![Payer::Customer(world.consumer)],
        );
        let answer = SendAnswer::from_value(&send(&world, &body, NOW_MS + n).unwrap()).unwrap();
        assert!(answer.standings[0].allowed);
        let key = backoffice::store::BatchKey {
            mid: world.mid,
            id: BatchId::parse(&id).unwrap(),
        };
        assert_eq!(store.applied_batch(&key).unwrap(), None, "nothing stored");
    }
    let body = batch(&world, "x:1", uses(&world));
    send(&world, &body, NOW_MS).unwrap();
    let key = backoffice::store::BatchKey {
        mid: world.mid,
        id: BatchId::parse("x:1").unwrap(),
    };
    let kept = store.applied_batch(&key).unwrap().expect("applied");
    assert!(kept.digest.is_some() && kept.answer.is_empty(), "{kept:?}");
    let again = SendAnswer::from_value(&send(&world, &body, NOW_MS + 9).unwrap()).unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyApplied);
    assert_eq!(again.batch_id.as_str(), "x:1");
}

/// Rewrites the kept readings of batch `id` in the store in `dir` (closed),
/// as someone with the disk could: `change` edits each reading's outcome.
fn tamper_itemised(
    dir: &std::path::Path,
    id: &str,
    change: impl Fn(&mut backoffice::itemised::Item),
) {
    let db = sled::Config::new().path(dir).open().unwrap();
    let tree = db.open_tree("itemised").unwrap();
    for entry in tree.iter() {
        let (key, bytes) = entry.unwrap();
        let record = backoffice::itemised::decode(&bytes).unwrap();
        if record.batch.as_str() != id {
            continue;
        }
        let mut encoder = backoffice::itemised::Encoder::new(
            record.mid,
            record.batch,
            record.arrived_ms,
            record.transfers,
        );
        for mut item in record.items {
            change(&mut item);
            encoder.push(&item.reading, &item.outcome);
        }
        tree.insert(key, encoder.finish().remove(0)).unwrap();
    }
    db.flush().unwrap();
}

fn audit_in(dir: &std::path::Path, scope: &backoffice::audit::Scope) -> backoffice::audit::Report {
    let store = SledStore::open(dir).unwrap();
    let ledger = store.load_ledger().unwrap();
    backoffice::audit::audit(&store, &ledger, &backoffice::pricing::Pricing::new(), scope).unwrap()
}

/// The command line's offline audit of the data folder whose store is `dir`.
fn audit_command(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let data = dir.parent().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_backoffice"))
        .arg("audit")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("backoffice runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().expect("exit code"), text)
}

#[test]
fn every_amount_traces_to_its_readings_and_audit_names_a_tampered_price_or_module() {
    use backoffice::audit::Scope;
    use backoffice::itemised::Outcome as Kept;
    use backoffice::ledger::TransferId;
    use backoffice::store::BatchKey;
    let world = world();
    let first = batch(&world, "B1-M1:100", uses(&world));
    send(&world, &first, NOW_MS).unwrap();
    // Twelve uses of the tiered component by Ada: ten free in the month,
    // then 0.05 each.
    let commits = (0..12)
        .map(|_| Event::Commit {
            pid: world.component,
            payer: Some(Payer::Customer(world.consumer)),
        })
        .collect();
    send(&world, &batch(&world, "X:100", commits), NOW_MS + 1).unwrap();
    let store = world.backoffice.store();
    let key = |id: &str| BatchKey {
        mid: world.mid,
        id: BatchId::parse(id).unwrap(),
    };
    // Every reading is kept, in order, with what became of it.
    let records = store.itemised_batch(&key("B1-M1:100")).unwrap().unwrap();
    let items: Vec<_> = records.iter().flat_map(|record| &record.items).collect();
    assert_eq!(items.len(), uses(&world).len());
    assert_eq!(items[0].outcome, Kept::NotPriced, "the login");
    let Kept::Priced(component) = &items[1].outcome else {
        panic!("{:?}", items[1]);
    };
    assert_eq!(
        (
            component.payer,
            component.owner,
            component.amount,
            component.transfer
        ),
        (world.producer, world.maker, Amount::ZERO, None),
        "Bob pays for Carol's component inside his editor: free in her tier, no money moves"
    );
    let Kept::Priced(editor) = &items[2].outcome else {
        panic!("{:?}", items[2]);
    };
    assert_eq!(
        (editor.payer, editor.amount),
        (world.consumer, amount("0.25"))
    );
    assert_eq!(items[7].outcome, Kept::Free, "the test PID");
    assert!(
        matches!(&items[8].outcome, Kept::Suspense(reason) if reason.contains("unknown PID B1-P404")),
        "{:?}",
        items[8]
    );
    // The editor's statement line shows its three uses, adding up to it.
    let line = editor.transfer.unwrap();
    let behind = backoffice::itemised::items_of_transfer(store, line)
        .unwrap()
        .unwrap();
    assert_eq!(behind.len(), 3);
    let ledger = world.backoffice.ledger();
    let posted = &ledger.transfers()[usize::try_from(line.0).unwrap()];
    assert_eq!(posted.amount, amount("0.75"));
    assert!(
        behind
            .iter()
            .all(|item| item.priced.amount == amount("0.25"))
    );
    // Ada's tiered line: uses 0 to 11 of the month.
    let tiered = store.itemised_batch(&key("X:100")).unwrap().unwrap();
    let counts: Vec<u64> = tiered[0]
        .items
        .iter()
        .map(|item| match &item.outcome {
            Kept::Priced(priced) => priced.period_uses,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(counts, (0..12).collect::<Vec<u64>>());
    // Every amount is confirmed by pricing again, whichever way asked.
    let month = backoffice::send::month_of(NOW_MS);
    let scopes = [
        Scope::Batch(key("B1-M1:100")),
        Scope::Transfer(line),
        Scope::Month {
            cid: world.consumer,
            month,
        },
    ];
    let pricing = backoffice::pricing::Pricing::new();
    for scope in &scopes {
        let report = backoffice::audit::audit(store, &ledger, &pricing, scope).unwrap();
        assert_eq!(report.difference, None, "{scope:?}: {}", report.summary());
        assert!(report.priced >= 3 && report.transfers >= 1, "{report:?}");
    }
    let month_report = backoffice::audit::audit(store, &ledger, &pricing, &scopes[2]).unwrap();
    assert_eq!(month_report.batches, 2);
    assert!(
        matches!(
            backoffice::audit::audit(store, &ledger, &pricing, &Scope::Transfer(TransferId(0))),
            Err(backoffice::audit::AuditError::NotFound(_))
        ),
        "the deposit has no readings"
    );
    // Someone with the disk lowers the price of Ada's 12th tiered use.
    let World {
        _dir: dir,
        backoffice,
        ..
    } = world;
    drop(backoffice);
    let lowered = |item: &mut backoffice::itemised::Item| {
        if let Kept::Priced(priced) = &mut item.outcome
            && item.reading.seq == 111
        {
            priced.amount = amount("0.04");
        }
    };
    tamper_itemised(dir.path(), "X:100", lowered);
    let report = audit_in(dir.path(), &Scope::Batch(key("X:100")));
    let difference = report.difference.expect("the lowered price is found");
    assert!(
        difference.contains("reading 111") && difference.contains("stored price 0.04"),
        "{difference}"
    );
    // The command line, offline on the data folder, names it and exits 1.
    let data = tempfile::tempdir().unwrap();
    let store_dir = data.path().join("store");
    std::fs::rename(dir.path(), &store_dir).unwrap();
    let (code, text) = audit_command(
        &store_dir,
        &[
            "--customer",
            world.consumer.as_str(),
            "--month",
            &format!("{}-{:02}", month / 100, month % 100),
        ],
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("reading 111"), "{text}");
    // Put back, every amount is confirmed again (exit 0).
    tamper_itemised(&store_dir, "X:100", |item| {
        if let Kept::Priced(priced) = &mut item.outcome
            && item.reading.seq == 111
        {
            priced.amount = amount("0.05");
        }
    });
    let (code, text) = audit_command(
        &store_dir,
        &["--meter", world.mid.as_str(), "--batch", "X:100"],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("confirmed: 1 batches, 12 readings, 12 uses"),
        "{text}"
    );
    // The tiered module replaced by the flat one under its hash: named.
    {
        let db = sled::Config::new().path(&store_dir).open().unwrap();
        let tacas = db.open_tree("tacas").unwrap();
        let tiered = backoffice::pricing::TacaHash::of(&module("tiered"));
        tacas
            .insert(tiered.to_string().as_bytes(), module("flat"))
            .unwrap();
        db.flush().unwrap();
    }
    let (code, text) = audit_command(&store_dir, &["--transfer", &line.0.to_string()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("is not the module of that hash"), "{text}");
    let (code, text) = audit_command(&store_dir, &["--transfer", "0"]);
    assert_eq!(code, 2, "{text}");
}

#[test]
fn uses_priced_out_of_suspense_trace_to_their_readings_and_are_audited() {
    use backoffice::audit::{Scope, audit};
    use backoffice::itemised::{Outcome as Kept, items_of_transfer};
    use backoffice::store::BatchKey;
    let world = world();
    let later = Pid::parse("B1-P3").unwrap();
    let me = Some(Payer::Customer(world.consumer));
    let events = vec![
        Event::Commit {
            pid: later,
            payer: me,
        },
        Event::Commit {
            pid: world.product,
            payer: me,
        },
        Event::Commit {
            pid: later,
            payer: me,
        },
    ];
    send(&world, &batch(&world, "B1-M1:1", events), NOW_MS).unwrap();
    let store = world.backoffice.store();
    let bid = Bid::parse("B1").unwrap();
    store
        .create_product(
            &bid,
            NewProduct::new(&world.producer, "Later", "flat", &module("flat"), max()),
        )
        .unwrap();
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (2, 0));
    let ledger = world.backoffice.ledger();
    let line = ledger.transfers().last().unwrap().clone();
    assert_eq!(line.amount, amount("0.5"));
    // The line's uses are the two readings that waited in suspense, priced
    // as the first and second use of B1-P3 in the month.
    let items = items_of_transfer(store, line.id).unwrap().unwrap();
    let seen: Vec<(u64, u64, Amount)> = items
        .iter()
        .map(|item| {
            (
                item.reading.seq,
                item.priced.period_uses,
                item.priced.amount,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![(100, 0, amount("0.25")), (102, 1, amount("0.25"))]
    );
    assert_eq!(items[0].batch.as_str(), "B1-M1:1");
    // The batch's own records are as applied: those two in suspense.
    let key = BatchKey {
        mid: world.mid,
        id: BatchId::parse("B1-M1:1").unwrap(),
    };
    let kept = store.itemised_batch(&key).unwrap().unwrap();
    assert!(
        matches!(&kept[0].items[0].outcome, Kept::Suspense(reason) if reason.contains("unknown PID"))
    );
    let pricing = backoffice::pricing::Pricing::new();
    let month = backoffice::send::month_of(line.posted_ms);
    for scope in [
        Scope::Transfer(line.id),
        Scope::Batch(key.clone()),
        Scope::Month {
            cid: world.consumer,
            month,
        },
    ] {
        let report = audit(store, &ledger, &pricing, &scope).unwrap();
        assert_eq!(report.difference, None, "{scope:?}: {}", report.summary());
    }
    let report = audit(store, &ledger, &pricing, &Scope::Transfer(line.id)).unwrap();
    assert_eq!((report.priced, report.transfers), (2, 1), "{report:?}");
    // Pruned one record at a time, nothing of either is left findable.
    while store.prune_itemised(u64::MAX, 1).unwrap() == 1 {}
    assert_eq!(store.itemised_batch(&key).unwrap(), None);
    for transfer in ledger.transfers() {
        assert_eq!(
            store.itemised_batch_of_transfer(transfer.id).unwrap(),
            None,
            "{transfer:?}"
        );
    }
}

/// Signs `body` as meter `world.mid` with `secret` at `now_ms`, and sends
/// it at `now_ms`.
fn send_with(
    world: &World,
    secret: &Secret,
    body: &[u8],
    now_ms: u64,
) -> Result<Value, proto::Fault> {
    let signature = secret.sign(&world.mid, now_ms, body);
    let time = now_ms.to_string();
    let signed = Signed {
        mid: Some(world.mid.as_str()),
        time: Some(&time),
        signature: Some(&signature),
    };
    world.backoffice.send(body, signed, now_ms)
}

/// One use of the product by the consumer (0.25), in a batch of its own
/// meter instance (`instance`), so that batches never share readings.
fn one_use(world: &World, instance: &str) -> Vec<u8> {
    let me = Some(Payer::Customer(world.consumer));
    batch(
        world,
        &format!("{instance}:1"),
        vec![
            Event::Login(world.consumer),
            Event::Commit {
                pid: world.product,
                payer: me,
            },
            Event::Logout(world.consumer),
        ],
    )
}

/// A meter whose secret was rotated goes on uploading with the old one
/// inside the grace (readings signed before the new secret reached it are
/// not lost), the old one is refused after the grace or once the meter
/// uploaded with the new one; a revoked meter gets 210 for any secret, and
/// what it uploaded before stays applied.
#[test]
fn a_rotated_secret_verifies_only_inside_its_grace_and_a_revoked_meter_with_none() {
    use backoffice::registry::Actor;
    let world = world();
    let store = world.backoffice.store();
    let code = |result: Result<Value, proto::Fault>| result.unwrap_err().registered().unwrap();
    let hour = 3_600_000;
    let first = world.secret.clone();
    let rotated = store
        .rotate_meter_secret(&world.mid, Actor::Owner(world.consumer), NOW_MS, hour)
        .unwrap();
    let second = Secret::new(rotated.secret_hex.as_bytes()).unwrap();
    // Inside the grace the old secret still verifies: the upload is applied.
    send_with(&world, &first, &one_use(&world, "a"), NOW_MS + 1_000).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("9.75"));
    // After it, the old secret is refused, saying why, and nothing applied.
    let late = send_with(&world, &first, &one_use(&world, "b"), NOW_MS + hour).unwrap_err();
    assert_eq!(late.registered(), Some(FaultCode::BadSignature));
    assert!(
        late.message.contains("secret was rotated by its owner"),
        "{}",
        late.message
    );
    assert_eq!(balance(&world, world.consumer), amount("9.75"));
    // The same readings signed with the new secret go through.
    send_with(&world, &second, &one_use(&world, "b"), NOW_MS + hour).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("9.5"));
    // The first upload signed with the new secret ends the grace early.
    let later = NOW_MS + 2 * hour;
    let rotated = store
        .rotate_meter_secret(&world.mid, Actor::Operator, later, hour)
        .unwrap();
    let third = Secret::new(rotated.secret_hex.as_bytes()).unwrap();
    send_with(&world, &second, &one_use(&world, "c"), later + 1).unwrap();
    send_with(&world, &third, &one_use(&world, "d"), later + 2).unwrap();
    assert_eq!(
        code(send_with(&world, &second, &one_use(&world, "e"), later + 3)),
        FaultCode::BadSignature,
        "inside the grace, but the meter uses the new secret already"
    );
    assert_eq!(balance(&world, world.consumer), amount("9"));
    // Revoked: every secret is refused with 210, which says by whom and when.
    store
        .revoke_meter(&world.mid, Actor::Owner(world.consumer), later + 10)
        .unwrap();
    for secret in [&first, &second, &third] {
        let refused = send_with(&world, secret, &one_use(&world, "e"), later + 20).unwrap_err();
        assert_eq!(refused.registered(), Some(FaultCode::MeterRevoked));
        assert!(
            refused
                .message
                .contains(&format!("revoked by its owner {}", world.consumer)),
            "{}",
            refused.message
        );
    }
    // A batch applied before, sent again, is refused too; it stays applied.
    let again = send_with(&world, &third, &one_use(&world, "d"), later + 30).unwrap_err();
    assert_eq!(again.registered(), Some(FaultCode::MeterRevoked));
    assert_eq!(balance(&world, world.consumer), amount("9"));
    books_verify(&world);
}

/// A meter with batches in flight while its owner rotates its secret: the
/// uploads signed with the old one during the rotation are all applied
/// (each reads the meter's record once: the old secret is current, or the
/// previous one inside its grace), none is refused.
#[test]
fn uploads_signed_with_the_old_secret_during_a_rotation_are_all_applied() {
    use backoffice::registry::Actor;
    let world = world();
    let old = world.secret.clone();
    std::thread::scope(|scope| {
        let uploads = scope.spawn(|| {
            for n in 0..20 {
                send_with(&world, &old, &one_use(&world, &format!("f{n}")), NOW_MS + n)
                    .unwrap_or_else(|fault| panic!("upload {n}: {fault}"));
            }
        });
        world
            .backoffice
            .store()
            .rotate_meter_secret(&world.mid, Actor::Operator, NOW_MS, 3_600_000)
            .unwrap();
        uploads.join().unwrap();
    });
    assert_eq!(balance(&world, world.consumer), amount("5"));
    books_verify(&world);
}

#[test]
fn uses_that_move_no_money_are_counted_for_statements_once_in_batches_and_repricing() {
    let world = world();
    let me = Some(Payer::Customer(world.consumer));
    let later = Pid::parse("B1-P3").unwrap();
    let commits = |pid: Pid, n: usize| (0..n).map(move |_| Event::Commit { pid, payer: me });
    // 12 uses of the tiered component (the first 10 a month are free), 2 of
    // the editor's test PID (free), 1 of the editor (0.25), 3 of a product
    // not registered yet (suspense).
    let events: Vec<Event> = commits(world.component, 12)
        .chain(commits(world.test_pid, 2))
        .chain(commits(world.product, 1))
        .chain(commits(later, 3))
        .collect();
    let body = batch(&world, "B1-M1:1", events);
    send(&world, &body, NOW_MS).unwrap();
    assert_eq!(balance(&world, world.consumer), amount("9.65"));
    let store = world.backoffice.store();
    let month = backoffice::send::month_of(NOW_MS - 1000);
    let sorted = |mut free: Vec<(Pid, u64)>| {
        free.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        free
    };
    assert_eq!(
        store.free_uses(&world.consumer, month).unwrap(),
        sorted(vec![(world.component, 10), (world.test_pid, 2)])
    );
    // Other months, other payers: none.
    assert_eq!(store.free_uses(&world.consumer, month - 1).unwrap(), vec![]);
    assert_eq!(store.free_uses(&world.producer, month).unwrap(), vec![]);
    // The same batch again is a retry: nothing counted twice.
    send(&world, &body, NOW_MS + 1).unwrap();
    assert_eq!(
        store.free_uses(&world.consumer, month).unwrap(),
        sorted(vec![(world.component, 10), (world.test_pid, 2)])
    );
    // The missing product is registered with the tiered terms: its 3 uses
    // leave suspense priced at zero, and are counted as free once.
    let bid = Bid::parse("B1").unwrap();
    let product = store
        .create_product(
            &bid,
            NewProduct::new(&world.producer, "Later", "tiered", &module("tiered"), max()),
        )
        .unwrap();
    assert_eq!(product.pid, later);
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (3, 0));
    assert_eq!(world.backoffice.reprice_suspense().unwrap(), (0, 0));
    assert_eq!(
        store.free_uses(&world.consumer, month).unwrap(),
        sorted(vec![(world.component, 10), (world.test_pid, 2), (later, 3)])
    );
    assert_eq!(balance(&world, world.consumer), amount("9.65"));
    books_verify(&world);
}

#[test]
fn a_branch_moved_into_postgresql_keeps_every_record_and_applies_a_retried_batch_once() {
    use backoffice::store::{AnyStore, PgStore, StoreError, moving};
    let cluster = pgtest::Cluster::start().unwrap();
    let world = world();
    // Everything a branch keeps: priced uses (transfers, period and free
    // counts, itemised records, an applied batch with its digest), a
    // reading in suspense, a deposit by reference, products with modules,
    // a meter and its grant.
    let body = batch(&world, "B1-M1:100", uses(&world));
    let first = SendAnswer::from_value(&send(&world, &body, NOW_MS).unwrap()).unwrap();
    assert_eq!(first.outcome, Outcome::Applied);
    let customer = world
        .backoffice
        .store()
        .customer(&world.producer)
        .unwrap()
        .unwrap();
    world
        .backoffice
        .deposit(&Processor { declines: false }, &customer, amount("5"))
        .unwrap();
    let suspense = world.backoffice.store().suspense().unwrap();
    assert_eq!(suspense.len(), 1);
    let balances: Vec<(Cid, Amount)> = [world.consumer, world.producer, world.maker]
        .into_iter()
        .map(|cid| (cid, balance(&world, cid)))
        .collect();
    let World {
        _dir: dir,
        backoffice,
        mid,
        secret,
        consumer,
        product,
        ..
    } = world;
    drop(backoffice);
    let sled = SledStore::open(dir.path()).unwrap();
    let key = backoffice::store::BatchKey {
        mid,
        id: BatchId::parse("B1-M1:100").unwrap(),
    };
    let applied = sled.applied_batch(&key).unwrap().unwrap();
    let itemised = sled.itemised_batch(&key).unwrap().unwrap();
    let grants = sled.grants_of_meter(&mid).unwrap();
    // A hold on the consumer, partly captured by a transfer.
    let mut ledger = sled.load_ledger().unwrap();
    let mut book = backoffice::holds::HoldBook::new();
    let payer = AccountId::Customer(consumer);
    let placed = book
        .prepare_place(
            payer,
            amount("1"),
            NOW_MS + 3_600_000,
            "a stream",
            amount("5"),
            NOW_MS,
        )
        .unwrap();
    let charge = ledger
        .prepare(
            vec![NewTransfer {
                debit: payer,
                credit: AccountId::Customer(Cid::parse("B1-C2").unwrap()),
                amount: amount("0.25"),
                // Captures get a kind of their own with the charging
                // interface (issue 16); any valid transfer serves here.
                kind: TransferKind::Use {
                    pid: product,
                    batch: BatchId::parse("B1-M1:100").unwrap(),
                    uses: 1,
                },
            }],
            NOW_MS,
        )
        .unwrap();
    book.commit(vec![placed.clone()]);
    let captured = book
        .prepare_capture(
            backoffice::holds::HoldId(0),
            amount("0.25"),
            charge[0].id,
            NOW_MS,
        )
        .unwrap();
    sled.stage_holds(&[placed, captured.clone()], &charge, None)
        .unwrap();
    sled.sync().unwrap();
    book.commit(vec![captured]);
    ledger.commit(charge);
    let balances: Vec<(Cid, Amount)> = balances
        .iter()
        .map(|(cid, _)| (*cid, ledger.balance(&AccountId::Customer(*cid))))
        .collect();

    let url = cluster.create_database("moved").unwrap();
    let pg = PgStore::connect(&url).unwrap();
    let mut rows = 0;
    let moved = moving::sled_to_postgres(&sled, &pg, &mut |_, count| rows += count).unwrap();
    assert_eq!(
        moved.transfers,
        sled.load_ledger().unwrap().transfers().len() as u64
    );
    let table = |name: &str| moved.tables.iter().find(|(t, _)| *t == name).unwrap().1;
    assert_eq!(table("customers"), 3);
    assert_eq!(
        table("products"),
        2,
        "each product once, not under its test PID too"
    );
    assert_eq!(
        (table("meters"), table("grants"), table("deposits")),
        (1, 1, 1)
    );
    assert_eq!((table("batches"), table("suspense")), (1, 1));
    assert_eq!(table("hold_events"), 2);
    assert_eq!(pg.hold_events_from(0).unwrap(), book.events());
    assert_eq!(pg.load_ledger().unwrap().transfers(), ledger.transfers());
    assert!(table("itemised") >= 1 && table("period_uses") >= 1 && table("free_uses") >= 1);
    assert_eq!(rows, moved.tables.iter().map(|(_, n)| n).sum::<u64>());
    // Read back through the PostgreSQL store as a node would.
    assert_eq!(pg.applied_batch(&key).unwrap().unwrap(), applied);
    assert_eq!(pg.itemised_batch(&key).unwrap().unwrap(), itemised);
    assert_eq!(pg.grants_of_meter(&mid).unwrap(), grants);
    assert_eq!(pg.suspense().unwrap(), suspense);
    assert_eq!(
        pg.product(&product).unwrap(),
        sled.product(&product).unwrap()
    );
    let taca = sled.product(&product).unwrap().unwrap().taca;
    assert_eq!(
        pg.taca_module(&taca).unwrap(),
        sled.taca_module(&taca).unwrap()
    );
    assert_eq!(
        pg.customer_by_email("ADA@example.org")
            .unwrap()
            .map(|c| c.cid),
        Some(consumer)
    );
    // Numbering goes on where sled left it: no ID is issued twice.
    let bid = Bid::parse("B1").unwrap();
    let next = pg.create_customer(&bid, "Dee", "dee@example.org").unwrap();
    assert_eq!(next.cid.as_str(), "B1-C4");
    let grant = pg.create_grant(grant_of(mid, next.cid)).unwrap();
    assert_eq!(grant.id, grants.iter().map(|g| g.id).max().unwrap() + 1);
    let meter = pg.create_meter(&bid, &next.cid).unwrap();
    assert_eq!(meter.mid.as_str(), "B1-M2");
    // Nothing moves into a database that holds a branch: refused whole.
    let again = moving::sled_to_postgres(&sled, &pg, &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(&again, StoreError::WrongStore(text) if text.contains("already holds")),
        "{again:?}"
    );
    drop(sled);
    drop(pg);
    // The moved branch serves: the meter's retry of the same batch is
    // applied once, and the balances are the same.
    std::fs::create_dir(dir.path().join("node")).unwrap();
    let store = AnyStore::open(Some(&url), &dir.path().join("node")).unwrap();
    let backoffice = Backoffice::open(store, PARAMS).unwrap();
    let time = (NOW_MS + 5).to_string();
    let signature = secret.sign(&mid, NOW_MS + 5, &body);
    let retried = backoffice
        .send(
            &body,
            Signed {
                mid: Some(mid.as_str()),
                time: Some(&time),
                signature: Some(&signature),
            },
            NOW_MS,
        )
        .unwrap();
    let retried = SendAnswer::from_value(&retried).unwrap();
    assert_eq!(retried.outcome, Outcome::AlreadyApplied);
    for (cid, before) in balances {
        assert_eq!(
            backoffice.ledger().balance(&AccountId::Customer(cid)),
            before
        );
    }
    let report = backoffice::verify::running(&backoffice);
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn a_damaged_branch_is_not_moved_and_the_database_stays_empty() {
    use backoffice::store::{PgStore, moving};
    let cluster = pgtest::Cluster::start().unwrap();
    let world = world();
    let body = batch(&world, "B1-M1:100", uses(&world));
    send(&world, &body, NOW_MS).unwrap();
    let World {
        _dir: dir,
        backoffice,
        ..
    } = world;
    drop(backoffice);
    // A reading in suspense that no longer decodes.
    {
        // sled's own threads let go of the folder's lock a moment after
        // the backoffice is dropped: wait for it, as the stores do.
        let (db, _files) = durable::open(
            dir.path(),
            &durable::Options {
                cache_bytes: 16 << 20,
                lock_wait: std::time::Duration::from_secs(10),
            },
        )
        .unwrap();
        let suspense = db.open_tree("suspense").unwrap();
        let (key, _) = suspense.iter().next().unwrap().unwrap();
        suspense.insert(key, &b"{not json"[..]).unwrap();
        db.flush().unwrap();
    }
    let sled = SledStore::open(dir.path()).unwrap();
    let url = cluster.create_database("moved").unwrap();
    let pg = PgStore::connect(&url).unwrap();
    let refused = moving::sled_to_postgres(&sled, &pg, &mut |_, _| {}).unwrap_err();
    assert!(refused.to_string().contains("problem"), "{refused}");
    assert!(pg.table_counts().unwrap().iter().all(|(_, n)| *n == 0));
    // A failure while reading, after some records were written, rolls back
    // everything written before it.
    let (sender, receiver) = std::sync::mpsc::sync_channel(4);
    sender
        .send(Ok(Some(moving::Chunk::Serials(vec![("C".into(), 5)]))))
        .unwrap();
    sender
        .send(Err(backoffice::store::StoreError::Corrupt("cut".into())))
        .unwrap();
    drop(sender);
    assert!(pg.import(receiver, &mut |_, _| {}).is_err());
    assert!(pg.table_counts().unwrap().iter().all(|(_, n)| *n == 0));
    // Nor does a reader that stops without saying it is done (a panic).
    let (sender, receiver) = std::sync::mpsc::sync_channel(4);
    sender
        .send(Ok(Some(moving::Chunk::Serials(vec![("C".into(), 5)]))))
        .unwrap();
    drop(sender);
    let stopped = pg.import(receiver, &mut |_, _| {}).unwrap_err();
    assert!(
        stopped.to_string().contains("stopped before it ended"),
        "{stopped}"
    );
    assert!(pg.table_counts().unwrap().iter().all(|(_, n)| *n == 0));
}

/// Two nodes (two `Backoffice`s, two connection pools) on one PostgreSQL
/// database: uploads of two meters and deposits on both, one batch sent to
/// both, all at once.
#[test]
fn two_nodes_on_one_database_apply_each_batch_once_and_share_one_ledger() {
    use backoffice::store::PgStore;
    let cluster = pgtest::Cluster::start().unwrap();
    let url = cluster.create_database("branch").unwrap();
    let setup = PgStore::connect(&url).unwrap();
    let bid = Bid::parse("B1").unwrap();
    let producer = setup
        .create_customer(&bid, "Bob", "bob@example.org")
        .unwrap()
        .cid;
    let product = setup
        .create_product(
            &bid,
            NewProduct::new(&producer, "Editor", "0.25 per use", &module("flat"), max()),
        )
        .unwrap()
        .pid;
    // Two payers, each with a meter, each funded with 10.
    let mut meters = Vec::new();
    for (name, email) in [("Ada", "ada@example.org"), ("Cy", "cy@example.org")] {
        let cid = setup.create_customer(&bid, name, email).unwrap().cid;
        let meter = setup.create_meter(&bid, &cid).unwrap();
        setup.create_grant(grant_of(meter.mid, cid)).unwrap();
        meters.push((
            cid,
            meter.mid,
            Secret::new(meter.secret_hex.as_bytes()).unwrap(),
        ));
    }
    drop(setup);
    let nodes: Vec<Backoffice<PgStore>> = (0..2)
        .map(|_| Backoffice::open(PgStore::connect(&url).unwrap(), PARAMS).unwrap())
        .collect();
    for (cid, _, _) in &meters {
        nodes[0]
            .post(vec![NewTransfer {
                debit: AccountId::System(SystemAccount::Funding),
                credit: AccountId::Customer(*cid),
                amount: Amount::from_units(10).unwrap(),
                kind: TransferKind::Deposit,
            }])
            .unwrap();
    }
    let body_for = |mid: Mid, cid: Cid, n: u64| {
        let events = (0..4)
            .map(|_| Event::Commit {
                pid: product,
                payer: Some(Payer::Customer(cid)),
            })
            .collect::<Vec<_>>();
        let readings = events
            .into_iter()
            .enumerate()
            .map(|(index, event)| Reading {
                seq: n * 100 + index as u64,
                time_ms: NOW_MS - 1000,
                context: Context::parse("42.7").unwrap(),
                event,
            })
            .collect();
        body_of(mid, &format!("{mid}:{n}"), readings, Vec::new())
    };
    let send_to = |node: &Backoffice<PgStore>, secret: &Secret, mid: Mid, body: &[u8], at: u64| {
        let time = at.to_string();
        let signature = secret.sign(&mid, at, body);
        let answer = node
            .send(
                body,
                Signed {
                    mid: Some(mid.as_str()),
                    time: Some(&time),
                    signature: Some(&signature),
                },
                NOW_MS,
            )
            .unwrap();
        SendAnswer::from_value(&answer).unwrap().outcome
    };
    // Each meter uploads to both nodes in turn, at once with the other
    // meter; every batch is also retried on the other node (a meter whose
    // first node failed): applied once. Deposits go to both nodes too.
    std::thread::scope(|scope| {
        for (m, (cid, mid, secret)) in meters.iter().enumerate() {
            let nodes = &nodes;
            scope.spawn(move || {
                for n in 0..10u64 {
                    let body = body_for(*mid, *cid, n);
                    let (first, other) = (
                        &nodes[(n as usize + m) % 2],
                        &nodes[(n as usize + m + 1) % 2],
                    );
                    let at = NOW_MS + n * 10 + m as u64;
                    assert_eq!(send_to(first, secret, *mid, &body, at), Outcome::Applied);
                    assert_eq!(
                        send_to(other, secret, *mid, &body, at + 1_000),
                        Outcome::AlreadyApplied
                    );
                    other
                        .post(vec![NewTransfer {
                            debit: AccountId::System(SystemAccount::Funding),
                            credit: AccountId::Customer(*cid),
                            amount: amount("0.5"),
                            kind: TransferKind::Deposit,
                        }])
                        .unwrap();
                }
            });
        }
    });
    // 10 + 10 * 0.5 deposited, 10 batches of 4 uses at 0.25 charged: 5
    // left each, on both nodes; the producer has 20.
    for node in &nodes {
        for (cid, _, _) in &meters {
            assert_eq!(
                node.balance(&AccountId::Customer(*cid)),
                amount("5"),
                "{cid}"
            );
        }
        assert_eq!(node.balance(&AccountId::Customer(producer)), amount("20"));
        let ledger = node.ledger();
        let ids: Vec<u64> = ledger.transfers().iter().map(|t| t.id.0).collect();
        assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>());
        let report = backoffice::verify::running(node);
        assert!(report.is_ok(), "{:?}", report.problems);
    }
    // The period counts both nodes priced from add up: 40 uses of each payer.
    let month = backoffice::send::month_of(NOW_MS - 1000);
    for (cid, _, _) in &meters {
        let key = backoffice::store::PeriodKey {
            payer: *cid,
            pid: product,
            month,
        };
        assert_eq!(nodes[1].store().period_uses(&key).unwrap(), 40);
    }
}

/// Two nodes on one database: a hold placed on one is seen, captured and
/// released on the other, each capture checked against what the hold has
/// left whichever node takes it, and an expiry written by both sweeps at
/// once is written once.
#[test]
fn a_hold_placed_on_one_node_is_captured_on_another_and_expires_once() {
    use backoffice::holds::{Ending, HoldError, HoldId};
    use backoffice::store::PgStore;
    let cluster = pgtest::Cluster::start().unwrap();
    let url = cluster.create_database("branch").unwrap();
    let nodes: Vec<Backoffice<PgStore>> = (0..2)
        .map(|_| Backoffice::open(PgStore::connect(&url).unwrap(), PARAMS).unwrap())
        .collect();
    let bid = Bid::parse("B1").unwrap();
    let store = nodes[0].store();
    let payer = store
        .create_customer(&bid, "Ada", "ada@example.org")
        .unwrap()
        .cid;
    let payee = store
        .create_customer(&bid, "Bob", "bob@example.org")
        .unwrap()
        .cid;
    let (payer, payee) = (AccountId::Customer(payer), AccountId::Customer(payee));
    nodes[1]
        .post(vec![NewTransfer {
            debit: AccountId::System(SystemAccount::Funding),
            credit: payer,
            amount: amount("10"),
            kind: TransferKind::Deposit,
        }])
        .unwrap();
    let hour = 3_600_000;
    nodes[0]
        .place_hold(payer, amount("6"), NOW_MS + hour, "a stream", NOW_MS)
        .unwrap()
        .unwrap();
    assert_eq!(nodes[1].available(&payer, NOW_MS), amount("4"));
    // Node B cannot hold what node A holds.
    assert!(matches!(
        nodes[1]
            .place_hold(payer, amount("4.01"), NOW_MS + hour, "", NOW_MS)
            .unwrap(),
        Err(HoldError::Insufficient { .. })
    ));
    // Captures on both nodes at once: never beyond the hold.
    let captured: Vec<bool> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8)
            .map(|n| {
                let node = &nodes[n % 2];
                scope.spawn(move || {
                    node.capture_hold(
                        HoldId(0),
                        amount("1"),
                        payee,
                        TransferKind::Deposit,
                        NOW_MS + 1,
                    )
                    .unwrap()
                    .is_ok()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(captured.iter().filter(|c| **c).count(), 6, "{captured:?}");
    let hold = nodes[0].hold(HoldId(0)).unwrap();
    assert_eq!(hold.captured, amount("6"), "{hold:?}");
    assert_eq!(nodes[1].balance(&payer), amount("4"));
    // A second hold, expired on both nodes' sweeps at once: written once.
    nodes[1]
        .place_hold(payer, amount("2"), NOW_MS + hour, "", NOW_MS + 2)
        .unwrap()
        .unwrap();
    let later = NOW_MS + 2 * hour;
    let expired: Vec<usize> = std::thread::scope(|scope| {
        let threads: Vec<_> = nodes
            .iter()
            .map(|node| scope.spawn(move || node.expire_holds(later).unwrap()))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(
        expired.iter().sum::<usize>(),
        2,
        "the first hold and the second: {expired:?}"
    );
    for node in &nodes {
        assert_eq!(
            node.hold(HoldId(1)).unwrap().ended,
            Some(Ending::Expired(NOW_MS + hour))
        );
        assert_eq!(node.available(&payer, later), amount("4"));
    }
    assert_eq!(store.hold_events_from(0).unwrap().len(), 1 + 6 + 1 + 2);
}

#[test]
fn refunds_never_give_a_customer_more_than_the_service_charged_them_even_at_once() {
    use backoffice::send::{PaymentAsk, PaymentRefusal};
    let world = world();
    let office = &world.backoffice;
    let payer = AccountId::Customer(world.consumer);
    let owner = AccountId::Customer(world.producer);
    let ask = |reference: &str, operation: &'static str| PaymentAsk {
        service: world.product,
        owner: world.producer,
        reference: Some(reference.to_owned()),
        operation,
        canonical: format!("{operation} {reference}"),
        canonical_uncounted: format!("{operation} {reference} form 1"),
        description: "Goodwill".to_owned(),
        evidence: Vec::new(),
    };
    // Nothing charged yet: the customer's deposits and metered uses are
    // not the service's to refund.
    assert_eq!(
        office
            .pay(
                &ask("f-0", "refundAmount"),
                &[(owner, payer, amount("0.01"))],
                NOW_MS
            )
            .unwrap(),
        Err(PaymentRefusal::AboveCharged(Amount::ZERO))
    );
    office
        .pay(
            &ask("c-1", "chargeAmount"),
            &[(payer, owner, amount("1"))],
            NOW_MS,
        )
        .unwrap()
        .unwrap();
    let owner_start = balance(&world, world.producer);
    // Eight refunds of 0.3 at once against a charge of 1: three fit.
    let outcomes: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8)
            .map(|n| {
                let ask = ask(&format!("f-{}", n + 1), "refundAmount");
                scope.spawn(move || {
                    office
                        .pay(&ask, &[(owner, payer, amount("0.3"))], NOW_MS)
                        .unwrap()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect()
    });
    assert_eq!(outcomes.iter().filter(|outcome| outcome.is_ok()).count(), 3);
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, Ok(_) | Err(PaymentRefusal::AboveCharged(_)))),
        "{outcomes:?}"
    );
    assert_eq!(
        balance(&world, world.producer),
        owner_start.checked_sub(amount("0.9")).unwrap()
    );
    // What is left is refundable exactly, and then nothing.
    assert_eq!(
        office
            .pay(
                &ask("f-9", "refundAmount"),
                &[(owner, payer, amount("0.11"))],
                NOW_MS
            )
            .unwrap(),
        Err(PaymentRefusal::AboveCharged(amount("0.1")))
    );
    office
        .pay(
            &ask("f-10", "refundAmount"),
            &[(owner, payer, amount("0.1"))],
            NOW_MS,
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        office
            .pay(
                &ask("f-11", "refundAmount"),
                &[(owner, payer, amount("0.000000001"))],
                NOW_MS
            )
            .unwrap(),
        Err(PaymentRefusal::AboveCharged(Amount::ZERO))
    );
    books_verify(&world);
}

/// A service's payments (Parlay X) are exactly once whatever arrives at
/// once: the same request under one reference code from 8 threads moves
/// money once and answers all of them; other requests under that code are
/// refused; 8 captures of one reservation never take more than it holds;
/// another service cannot touch it; after a restart the code still
/// answers its first outcome.
#[test]
fn service_payments_are_exactly_once_under_concurrent_retries_and_captures() {
    use backoffice::holds::{HoldError, HoldId};
    use backoffice::send::{PaymentAsk, PaymentRefusal, ReservationChange};
    let world = world();
    let office = &world.backoffice;
    let payer = AccountId::Customer(world.consumer);
    let owner = AccountId::Customer(world.producer);
    let ask = |reference: &str, canonical: &str| PaymentAsk {
        service: world.product,
        owner: world.producer,
        reference: Some(reference.to_owned()),
        operation: "chargeAmount",
        canonical: canonical.to_owned(),
        canonical_uncounted: format!("{canonical} form 1"),
        description: "Ring tone".to_owned(),
        evidence: Vec::new(),
    };
    let start = balance(&world, world.consumer);
    let at_once = |work: &(dyn Fn(usize) -> backoffice::send::PaymentResult + Sync)| {
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..8).map(|n| scope.spawn(move || work(n))).collect();
            threads
                .into_iter()
                .map(|thread| thread.join().unwrap())
                .collect::<Vec<_>>()
        })
    };
    let same = ask("r-1", "chargeAmount 0.5");
    let outcomes = at_once(&|_| {
        office
            .pay(&same, &[(payer, owner, amount("0.5"))], NOW_MS)
            .unwrap()
    });
    let paid: Vec<_> = outcomes
        .iter()
        .map(|outcome| outcome.clone().unwrap())
        .collect();
    assert_eq!(paid.iter().filter(|paid| !paid.repeated).count(), 1);
    assert!(
        paid.windows(2)
            .all(|pair| pair[0].transfers == pair[1].transfers)
    );
    assert_eq!(
        balance(&world, world.consumer),
        start.checked_sub(amount("0.5")).unwrap()
    );
    // Eight different requests under one new code: one is done.
    let outcomes = at_once(&|n| {
        office
            .pay(
                &ask("r-2", &format!("chargeAmount 0.0{n}1")),
                &[(payer, owner, amount(&format!("0.0{n}1")))],
                NOW_MS,
            )
            .unwrap()
    });
    assert_eq!(outcomes.iter().filter(|outcome| outcome.is_ok()).count(), 1);
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, Ok(_) | Err(PaymentRefusal::ReferenceReused(_))))
    );
    // A reservation of 4 charged by 8 threads at once, 0.75 each.
    let reserve = PaymentAsk {
        reference: None,
        operation: "reserveAmount",
        ..ask("", "reserveAmount 4")
    };
    let hold = office
        .reserve(
            &reserve,
            &world.consumer,
            amount("4"),
            NOW_MS + 3_600_000,
            None,
            NOW_MS,
        )
        .unwrap()
        .unwrap()
        .hold
        .unwrap();
    let before = balance(&world, world.consumer);
    let outcomes = at_once(&|n| {
        office
            .change_reservation(
                &ask(&format!("c-{n}"), &format!("chargeReservation {n}")),
                hold,
                ReservationChange::Capture {
                    amount: amount("0.75"),
                },
                NOW_MS + 1,
            )
            .unwrap()
    });
    assert_eq!(outcomes.iter().filter(|outcome| outcome.is_ok()).count(), 5);
    assert!(outcomes.iter().all(|outcome| matches!(
        outcome,
        Ok(_) | Err(PaymentRefusal::Hold(HoldError::BeyondHold { .. }))
    )));
    assert_eq!(
        balance(&world, world.consumer),
        before.checked_sub(amount("3.75")).unwrap()
    );
    // A reservation of 2 grown by 8 threads at once, 1 each, at most 5 in
    // all (the product's maximum): each addition fits alone, three fit
    // together, and the check under the lock refuses the rest.
    let grown = office
        .reserve(
            &reserve,
            &world.consumer,
            amount("2"),
            NOW_MS + 3_600_000,
            None,
            NOW_MS,
        )
        .unwrap()
        .unwrap()
        .hold
        .unwrap();
    let outcomes = at_once(&|n| {
        office
            .change_reservation(
                &ask(&format!("g-{n}"), &format!("reserveAdditionalAmount {n}")),
                grown,
                ReservationChange::Adjust {
                    delta: amount("1"),
                    expires_ms: NOW_MS + 3_600_000,
                    max_total: Some(amount("5")),
                },
                NOW_MS + 1,
            )
            .unwrap()
    });
    assert_eq!(outcomes.iter().filter(|outcome| outcome.is_ok()).count(), 3);
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, Ok(_) | Err(PaymentRefusal::AboveMaximum(..))))
    );
    assert_eq!(office.hold(grown).expect("the hold").held, amount("5"));
    // Another service's reservation is not this one's to charge or end.
    let other = PaymentAsk {
        service: world.component,
        ..ask("o-1", "chargeReservation other")
    };
    for change in [
        ReservationChange::Capture {
            amount: amount("0.25"),
        },
        ReservationChange::Release,
    ] {
        assert_eq!(
            office
                .change_reservation(&other, hold, change, NOW_MS + 2)
                .unwrap(),
            Err(PaymentRefusal::NotTheirs(hold))
        );
    }
    assert_eq!(
        office
            .change_reservation(&other, HoldId(99), ReservationChange::Release, NOW_MS + 2)
            .unwrap(),
        Err(PaymentRefusal::Hold(HoldError::Unknown(HoldId(99))))
    );
    // After a restart the first code still answers its first outcome.
    let World {
        _dir, backoffice, ..
    } = world;
    let first = paid[0].transfers.clone();
    drop(backoffice);
    let office = Backoffice::open(SledStore::open(_dir.path()).unwrap(), PARAMS).unwrap();
    let again = office
        .pay(&same, &[(payer, owner, amount("0.5"))], NOW_MS + 5)
        .unwrap()
        .unwrap();
    assert!(again.repeated);
    assert_eq!(again.transfers, first);
}
