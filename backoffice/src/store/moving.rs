//! `backoffice migrate-store`: a branch kept in sled moved into an empty
//! PostgreSQL database, whole, then both ledgers compared.
//!
//! The sled store reads every record back as typed chunks
//! (`SledStore::export`) on one thread; the PostgreSQL store writes them in
//! one transaction (`PgStore::import`) on another, a few chunks behind. A
//! failure on either side (a record that does not decode, the database
//! gone) rolls the whole transaction back: the database holds all of the
//! branch or none of it. Then, before it says so, it compares the two:
//! every table's rows against the records read, every transfer, every
//! balance, and the database's own check of balances against transfers.

use std::collections::BTreeMap;
use std::sync::mpsc::sync_channel;

use super::{
    AppliedBatch, BatchKey, PeriodKey, PgStore, SeqRange, SledStore, Store, StoreError, Suspense,
};
use crate::funding::{DepositRecord, Reference};
use crate::ledger::Transfer;
use crate::pricing::TacaHash;
use crate::registry::{Customer, Grant, Meter, Product};

/// How a comparison after the commit that found a difference begins: the
/// database then holds the branch, unlike any other failure of the move.
pub const DIFFERS: &str = "the moved branch differs from sled";

/// Chunks read ahead of the database.
const CHUNKS_AHEAD: usize = 4;

/// An itemised record: the readings of an applied batch, in parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemisedRecord {
    /// When the batch arrived, ms since the Unix epoch.
    pub arrived_ms: u64,
    /// The batch.
    pub key: BatchKey,
    /// Which part of its records.
    pub part: u16,
    /// The record (`itemised`).
    pub record: Vec<u8>,
}

/// How itemised records are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemisedTransfers {
    /// A batch's records: when they were written, in how many parts.
    Batch {
        /// The batch.
        key: BatchKey,
        /// When.
        arrived_ms: u64,
        /// How many parts.
        parts: u16,
    },
    /// The transfers FIRST to LAST summed uses of this batch's records.
    Range {
        /// The first transfer.
        first: u64,
        /// The last.
        last: u64,
        /// When the records were written.
        arrived_ms: u64,
        /// The batch.
        key: BatchKey,
    },
}

/// Records of one kind, as a store reads them back for another.
#[derive(Debug)]
pub enum Chunk {
    /// The next number of each kind of ID.
    Serials(Vec<(String, u64)>),
    /// Customers.
    Customers(Vec<Customer>),
    /// TACA modules.
    Tacas(Vec<(TacaHash, Vec<u8>)>),
    /// Products.
    Products(Vec<Product>),
    /// Meters.
    Meters(Vec<Meter>),
    /// Grants.
    Grants(Vec<Grant>),
    /// Applied batches.
    Batches(Vec<(BatchKey, AppliedBatch)>),
    /// The sequence ranges of applied batches.
    SeqRanges(Vec<SeqRange>),
    /// Transfers, by number.
    Transfers(Vec<Transfer>),
    /// Hold events, by number.
    HoldEvents(Vec<crate::holds::HoldEvent>),
    /// Payment requests.
    PaymentRequests(Vec<crate::payments::PaymentRequest>),
    /// Uses per payer, product and month.
    PeriodUses(Vec<(PeriodKey, u64)>),
    /// Uses that moved no money, likewise.
    FreeUses(Vec<(PeriodKey, u64)>),
    /// Readings in suspense.
    Suspense(Vec<Suspense>),
    /// Itemised records.
    Itemised(Vec<ItemisedRecord>),
    /// Their index.
    ItemisedIndex(Vec<ItemisedTransfers>),
    /// Deposits by reference.
    Deposits(Vec<(Reference, DepositRecord)>),
}

impl Chunk {
    /// How many rows of which tables it makes.
    pub fn rows(&self) -> Vec<(&'static str, u64)> {
        let n = |len: usize| len as u64;
        match self {
            Chunk::Serials(rows) => vec![("serials", n(rows.len()))],
            Chunk::Customers(rows) => vec![("customers", n(rows.len()))],
            Chunk::Tacas(rows) => vec![("tacas", n(rows.len()))],
            Chunk::Products(rows) => vec![("products", n(rows.len()))],
            Chunk::Meters(rows) => vec![("meters", n(rows.len()))],
            Chunk::Grants(rows) => vec![("grants", n(rows.len()))],
            Chunk::Batches(rows) => vec![("batches", n(rows.len()))],
            Chunk::SeqRanges(rows) => vec![("seq_ranges", n(rows.len()))],
            Chunk::Transfers(rows) => vec![("transfers", n(rows.len()))],
            Chunk::HoldEvents(rows) => vec![("hold_events", n(rows.len()))],
            Chunk::PaymentRequests(rows) => vec![
                ("payment_requests", n(rows.len())),
                (
                    "payment_evidence",
                    n(rows.iter().map(|request| request.evidence.len()).sum()),
                ),
            ],
            Chunk::PeriodUses(rows) => vec![("period_uses", n(rows.len()))],
            Chunk::FreeUses(rows) => vec![("free_uses", n(rows.len()))],
            Chunk::Suspense(rows) => vec![("suspense", n(rows.len()))],
            Chunk::Itemised(rows) => vec![("itemised", n(rows.len()))],
            Chunk::ItemisedIndex(rows) => {
                let batches = rows
                    .iter()
                    .filter(|row| matches!(row, ItemisedTransfers::Batch { .. }))
                    .count();
                vec![
                    ("itemised_batches", n(batches)),
                    ("itemised_transfers", n(rows.len() - batches)),
                ]
            }
            Chunk::Deposits(rows) => vec![("deposits", n(rows.len()))],
        }
    }
}

/// What a move copied, table by table, and what it compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// Rows per table, as read from sled and found in the database.
    pub tables: Vec<(&'static str, u64)>,
    /// Transfers compared one by one.
    pub transfers: u64,
    /// Balances compared.
    pub balances: u64,
}

/// Moves the branch in `from` into `to`, an empty database, then compares
/// them. `progress` hears the rows of each table as they are written.
pub fn sled_to_postgres(
    from: &SledStore,
    to: &PgStore,
    progress: &mut (dyn FnMut(&'static str, u64) + Send),
) -> Result<Moved, StoreError> {
    let (report, _) = from.verify();
    if !report.is_ok() {
        return Err(StoreError::Corrupt(format!(
            "the sled store has {} problem(s) (see `backoffice verify --data-dir`); the first: {}; \
             nothing was moved",
            report.problem_count,
            report.problems.first().map_or("", String::as_str)
        )));
    }
    let read = std::thread::scope(|scope| {
        let (sender, receiver) = sync_channel::<Result<Option<Chunk>, StoreError>>(CHUNKS_AHEAD);
        let reader = scope.spawn(move || {
            let mut read: BTreeMap<&'static str, u64> = BTreeMap::new();
            let exported = from.export(&mut |chunk| {
                for (table, rows) in chunk.rows() {
                    *read.entry(table).or_default() += rows;
                }
                sender
                    .send(Ok(Some(chunk)))
                    .map_err(|_| StoreError::Unavailable("the database's side stopped".into()))
            });
            match exported {
                // Only this lets the import commit.
                Ok(()) => sender.send(Ok(None)).ok().map(|()| read),
                Err(error) => {
                    // The import then rolls back instead of committing.
                    let _ = sender.send(Err(error));
                    None
                }
            }
        });
        let imported = to.import(receiver, progress);
        let read = reader
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        imported.map(|()| read)
    })?;
    let Some(read) = read else {
        return Err(StoreError::Corrupt("reading the sled store failed".into()));
    };
    compare(from, to, &read)
}

fn compare(
    from: &SledStore,
    to: &PgStore,
    read: &BTreeMap<&'static str, u64>,
) -> Result<Moved, StoreError> {
    let differs = |what: String| {
        Err(StoreError::Corrupt(format!(
            "{DIFFERS}: {what}; the database was written but must not be used (drop it, \
             create it again empty and move again)"
        )))
    };
    let tables = to.table_counts()?;
    for (table, found) in &tables {
        let expected = read.get(table).copied().unwrap_or(0);
        if *found != expected {
            return differs(format!(
                "table {table} holds {found} rows where sled held {expected} records"
            ));
        }
    }
    let (kept, moved) = (from.load_ledger()?, to.load_ledger()?);
    if kept.transfers().len() != moved.transfers().len() {
        return differs(format!(
            "the database holds {} transfers, sled {}",
            moved.transfers().len(),
            kept.transfers().len()
        ));
    }
    for (a, b) in kept.transfers().iter().zip(moved.transfers()) {
        if a != b {
            return differs(format!("transfer {} differs: {a:?} against {b:?}", a.id.0));
        }
    }
    if from.hold_events_from(0)? != to.hold_events_from(0)? {
        return differs("the hold events differ".into());
    }
    let sorted = |mut requests: Vec<crate::payments::PaymentRequest>| {
        requests.sort_by(|a, b| (&a.service, &a.reference).cmp(&(&b.service, &b.reference)));
        requests
    };
    if sorted(from.payment_requests()?) != sorted(to.payment_requests()?) {
        return differs("the payment requests differ".into());
    }
    let mut balances = 0;
    for (account, balance) in kept.balances() {
        if moved.balance(account) != *balance {
            return differs(format!(
                "the balance of {account} is {} in the database, {balance} in sled",
                moved.balance(account)
            ));
        }
        balances += 1;
    }
    if moved.balances().count() != balances {
        return differs("the database has balances of accounts sled has none of".into());
    }
    let (report, _) = to.verify();
    if !report.is_ok() {
        return differs(format!(
            "the database's own check found {} problem(s); the first: {}",
            report.problem_count,
            report.problems.first().map_or("", String::as_str)
        ));
    }
    Ok(Moved {
        tables,
        transfers: kept.transfers().len() as u64,
        balances: balances as u64,
    })
}
