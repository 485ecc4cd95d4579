//! The embedded store on sled. Each change is one sled transaction, then
//! made durable by `durable::SledDir::sync` (sled's flush, then an fsync of
//! its log and of every blob file sled wrote for a large value, such as a
//! TACA module: sled fsyncs neither). Once a sync fails, every later one
//! fails until the store is opened again (fail-stop).

use std::path::Path;

pub mod backup;
mod deposits;
mod export;
mod periods;
mod verify;

pub use periods::PERIOD_LOG_FOLD_AFTER;
#[cfg(test)]
pub(crate) use verify::encode_transfer_for_tests;

use proto::record::{Reader, put_str};
use proto::{Amount, BatchId, Bid, Cid, Mid, Pid};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{
    AppliedBatch, BatchDigest, BatchEffects, BatchKey, ItemisedAt, NewProduct, PeriodKey,
    RepricedItems, SeqRange, Store, StoreError, Suspense, SuspenseCursor,
};
use crate::funding::{DepositRecord, Reference};
use crate::ledger::{AccountId, Ledger, SystemAccount, Transfer, TransferId, TransferKind};
use crate::pricing::TacaHash;
use crate::registry::{
    self, Actor, Change, Customer, Grant, Meter, MeterGrants, NewGrant, PreviousSecret, Product,
    Registration, RegistryError,
};
use std::sync::Arc;

/// How long opening waits for another holder of the store's lock to let go.
pub const LOCK_WAIT_MS: u64 = 2_000;
/// Bytes of memory sled may use for its page cache.
pub const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;
const RECORD_VERSION: u8 = 2;
/// The first byte of a block: the consecutive transfers of one batch.
const BLOCK_VERSION: u8 = 3;
/// Why a batch's write was abandoned.
const ALREADY_APPLIED: u8 = 0;
const TRANSFER_TAKEN: u8 = 1;

impl From<durable::SyncError> for StoreError {
    fn from(error: durable::SyncError) -> Self {
        StoreError::Sync(std::io::Error::other(error.to_string()))
    }
}

impl From<durable::OpenError> for StoreError {
    fn from(error: durable::OpenError) -> Self {
        match error {
            durable::OpenError::Locked(dir) => StoreError::Locked(dir),
            durable::OpenError::Storage(error) => StoreError::Storage(error),
            durable::OpenError::Io(error) => StoreError::Sync(error),
        }
    }
}

impl From<TransactionError<RegistryError>> for StoreError {
    /// A registry transaction refused its record, or sled failed under it.
    fn from(error: TransactionError<RegistryError>) -> Self {
        match error {
            TransactionError::Abort(error) => StoreError::Registry(error),
            TransactionError::Storage(error) => StoreError::Storage(error),
        }
    }
}

/// Marks a stored batch record that starts with a digest; records without
/// it are answers alone (an XML answer starts with `<`).
const BATCH_RECORD_DIGEST: u8 = 1;

fn encode_applied(answer: &[u8], digest: Option<&BatchDigest>) -> Vec<u8> {
    match digest {
        Some(digest) => {
            let mut record = Vec::with_capacity(33 + answer.len());
            record.push(BATCH_RECORD_DIGEST);
            record.extend_from_slice(digest);
            record.extend_from_slice(answer);
            record
        }
        None => answer.to_vec(),
    }
}

fn decode_applied(record: &[u8]) -> AppliedBatch {
    match record.first() {
        Some(&BATCH_RECORD_DIGEST) => {
            assert!(record.len() >= 33, "store: applied batch record is corrupt");
            AppliedBatch {
                digest: Some(record[1..33].try_into().expect("32 bytes")),
                answer: record[33..].to_vec(),
            }
        }
        _ => AppliedBatch {
            digest: None,
            answer: record.to_vec(),
        },
    }
}

/// The embedded store on sled.
pub struct SledStore {
    /// Transfers by number: `FIRST` -> one transfer's record, or the block
    /// of consecutive transfers one batch posted, numbered from FIRST (one
    /// record per batch instead of one per transfer: `decode_transfers`).
    transfers: sled::Tree,
    batches: sled::Tree,
    /// Next serial per kind of ID (`C`, `P`, `M`).
    serials: sled::Tree,
    customers: sled::Tree,
    /// CIDs by e-mail address, lower-cased.
    emails: sled::Tree,
    /// Telephone numbers (E.164, `+` and digits) to the CID holding them.
    phones: sled::Tree,
    /// Products by PID; test PIDs map to the same record.
    products: sled::Tree,
    tacas: sled::Tree,
    meters: sled::Tree,
    /// Grants by number.
    grants: sled::Tree,
    /// `m MID number` and `c CID number`: the grants of a meter and of a
    /// customer, in order.
    grant_index: sled::Tree,
    /// The grants of meters read since they last changed, so that a batch
    /// does not decode its meter's grants from sled again. Every change of
    /// a grant goes through this store, which forgets its meter's entry.
    meter_grants: std::sync::Mutex<std::collections::HashMap<Mid, Arc<MeterGrants>>>,
    /// Customers' terms as every batch reads them (payers by the thousand),
    /// so that a batch does not decode its payers' records again; at most
    /// `CUSTOMER_TERMS_CACHED_MAX`. Every change of a customer goes through
    /// this store, which forgets its entry.
    customer_terms: std::sync::Mutex<crate::hashing::Map<Cid, super::CustomerTerms>>,
    /// Counts changes of customers: a read that began before one keeps
    /// nothing it read in `customer_terms`.
    customer_generation: std::sync::atomic::AtomicU64,
    /// `PeriodKey` -> uses counted in that period, as folded from
    /// `period_log_tree` (`periods`).
    period_uses: sled::Tree,
    /// Record number (big-endian u64) -> a batch's period counts, not yet
    /// folded into `period_uses` (`periods`).
    period_log_tree: sled::Tree,
    /// The counts of `period_log_tree`, in memory until folded.
    period_log: periods::PeriodLog,
    /// `PeriodKey` -> uses of that period that moved no money (`free_uses`).
    free_uses: sled::Tree,
    suspense: sled::Tree,
    /// `MID INSTANCE FIRST` -> `LAST`: the sequence numbers applied batches
    /// spanned, per meter instance (`SeqRange`).
    seq_ranges: sled::Tree,
    /// `ARRIVED_MS MID BATCH PART` -> an itemised record (`itemised`): the
    /// readings of applied batches, oldest first, so retention prunes from
    /// the start.
    itemised: sled::Tree,
    /// `b MID BATCH` -> `ARRIVED_MS PARTS`, and `t FIRST` -> `LAST
    /// ARRIVED_MS MID BATCH` (the transfers a batch posted, numbered FIRST
    /// to LAST): how a batch's and a transfer's records are found.
    itemised_index: sled::Tree,
    /// Records in `suspense`, kept as it changes: sled counts a tree by
    /// scanning it, and `/metrics` asks on every scrape.
    suspense_records: std::sync::atomic::AtomicUsize,
    /// Deposits by their reference (`funding::DepositRecord`).
    deposits: sled::Tree,
    /// Event number (big-endian u64) -> the JSON of a hold event
    /// (`store::holds::StoredHoldEvent`), never changed.
    hold_events: sled::Tree,
    /// `payments::PaymentRequest` as JSON under its service's PID, a zero
    /// byte and its reference code.
    payment_requests: sled::Tree,
    /// Confirmation references given as evidence: the reference → the
    /// request's key (`payment_key`). Written with the request.
    payment_evidence: sled::Tree,
    /// WS-Security nonces claimed: digest -> expiry ms (big-endian).
    wsse_nonces: sled::Tree,
    files: durable::SledDir,
    /// Taken shared by every write, exclusively by a backup while it copies
    /// (`backup`).
    gate: std::sync::Arc<parking_lot::RwLock<()>>,
    /// The last backup started.
    backup: std::sync::Mutex<Option<std::sync::Arc<backup::BackupJob>>>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let (db, files) = durable::open(
            dir,
            &durable::Options {
                // Bounds memory; the ledger's history stays on disk.
                cache_bytes: SLED_CACHE_BYTES,
                // sled's own threads may hold a store closed a moment ago
                // (a restart in the same process): wait a little.
                lock_wait: std::time::Duration::from_millis(LOCK_WAIT_MS),
            },
        )?;
        let store = SledStore {
            transfers: db.open_tree("transfers")?,
            batches: db.open_tree("batches")?,
            serials: db.open_tree("serials")?,
            customers: db.open_tree("customers")?,
            emails: db.open_tree("emails")?,
            phones: db.open_tree("phones")?,
            products: db.open_tree("products")?,
            tacas: db.open_tree("tacas")?,
            meters: db.open_tree("meters")?,
            grants: db.open_tree("grants")?,
            grant_index: db.open_tree("grant_index")?,
            meter_grants: std::sync::Mutex::default(),
            customer_terms: std::sync::Mutex::default(),
            customer_generation: std::sync::atomic::AtomicU64::new(0),
            period_uses: db.open_tree("period_uses")?,
            period_log_tree: db.open_tree("period_log")?,
            period_log: periods::PeriodLog::default(),
            free_uses: db.open_tree("free_uses")?,
            suspense_records: std::sync::atomic::AtomicUsize::new(db.open_tree("suspense")?.len()),
            suspense: db.open_tree("suspense")?,
            seq_ranges: db.open_tree("seq_ranges")?,
            deposits: db.open_tree("deposits")?,
            itemised: db.open_tree("itemised")?,
            itemised_index: db.open_tree("itemised_index")?,
            hold_events: db.open_tree("hold_events")?,
            payment_requests: db.open_tree("payment_requests")?,
            payment_evidence: db.open_tree("payment_evidence")?,
            wsse_nonces: db.open_tree("wsse_nonces")?,
            files,
            gate: std::sync::Arc::default(),
            backup: std::sync::Mutex::default(),
        };
        store.fold_period_log_at_open()?;
        Ok(store)
    }

    /// From now on `sync` fails (or works again), as a failing disk would.
    #[cfg(test)]
    pub(crate) fn fail_syncs(&self, fail: bool) {
        self.files.fail_syncs(fail);
    }

    /// Keeps a power-cut image of the store in `image` (tests).
    #[cfg(test)]
    pub(crate) fn keep_image_in(&self, image: &Path) {
        self.files.keep_image_in(image).unwrap();
    }

    /// Inserts a new record under the next serial of `kind`, atomically.
    fn create<T: serde::Serialize>(
        &self,
        kind: &[u8],
        tree: &sled::Tree,
        make: impl Fn(u64) -> Result<(Vec<Vec<u8>>, T), RegistryError>,
    ) -> Result<T, StoreError> {
        let outcome = (&self.serials, tree).transaction(|(serials, records)| {
            let serial = match serials.get(kind)? {
                Some(bytes) => {
                    u64::from_be_bytes(bytes.as_ref().try_into().expect("serials are 8 bytes"))
                }
                None => 1,
            };
            let (keys, record) = make(serial).map_err(ConflictableTransactionError::Abort)?;
            let bytes = serde_json::to_vec(&record).expect("records serialize");
            for key in &keys {
                records.insert(key.as_slice(), bytes.as_slice())?;
            }
            serials.insert(kind, &(serial + 1).to_be_bytes())?;
            Ok(record)
        });
        let record = outcome?;
        self.sync()?;
        Ok(record)
    }

    fn read<T: serde::de::DeserializeOwned>(
        tree: &sled::Tree,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        Ok(tree.get(key)?.map(|bytes| {
            serde_json::from_slice(&bytes).expect("store: registry record is corrupt")
        }))
    }
}

impl Store for SledStore {
    fn verify(&self) -> (crate::verify::Report, Vec<Transfer>) {
        self.verify_records()
    }

    fn load_ledger(&self) -> Result<Ledger, StoreError> {
        let mut transfers = Vec::new();
        for entry in self.transfers.iter() {
            let (key, record) = entry?;
            match decode_transfers(&key, &record) {
                Ok(stored) => transfers.extend(stored),
                Err(why) => panic!("store: transfer record {key:?} {why}"),
            }
        }
        Ok(Ledger::restore(transfers))
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(self.files.sync()?)
    }

    fn fold_logged(&self) -> Result<(), StoreError> {
        if self.period_log.waiting() >= PERIOD_LOG_FOLD_AFTER {
            self.fold_periods(false)?;
        }
        Ok(())
    }

    fn close(&self) -> Result<(), StoreError> {
        // A backup or an export holds the gate for its whole copy: the stop
        // does not wait for it, and the next start folds the log instead.
        match self.gate.try_read() {
            Some(_gate) => self.fold_periods(true)?,
            None => tracing::info!(
                "a backup or an export is running: the period log is folded at the next start"
            ),
        }
        self.sync()
    }

    fn itemised_batch(
        &self,
        key: &BatchKey,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError> {
        self.itemised_records(key)
    }

    fn itemised_batch_of_transfer(&self, id: TransferId) -> Result<Option<ItemisedAt>, StoreError> {
        self.itemised_transfer(id)
    }

    fn itemised_records_at(
        &self,
        at: &ItemisedAt,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError> {
        self.itemised_set(at, None)
    }

    fn resolve_suspense_itemised(
        &self,
        resolved: &[Suspense],
        transfers: &[Transfer],
        period_uses: &[(PeriodKey, u64)],
        free_uses: &[(PeriodKey, u64)],
        arrived_ms: u64,
        sets: &[RepricedItems],
    ) -> Result<(), StoreError> {
        let _writing = self.writing();
        let counts = Counts {
            period_uses,
            free_uses,
        };
        self.resolve(resolved, transfers, counts, arrived_ms, sets)
    }

    fn prune_itemised(&self, before_ms: u64, records_max: usize) -> Result<usize, StoreError> {
        let _writing = self.writing();
        self.prune_itemised_records(before_ms, records_max)
    }

    fn stage_batch(&self, key: &BatchKey, effects: BatchEffects<'_>) -> Result<(), StoreError> {
        self.stage_batch_itemised(key, effects, 0, &[])
    }

    fn stage_batch_itemised(
        &self,
        key: &BatchKey,
        effects: BatchEffects<'_>,
        arrived_ms: u64,
        itemised: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        let _writing = self.writing();
        let batch_key = key.bytes();
        let range: Vec<(TransferId, TransferId)> = effects
            .transfers
            .first()
            .zip(effects.transfers.last())
            .map(|(first, last)| (first.id, last.id))
            .into_iter()
            .collect();
        let itemised = itemised_entries(key, &range, arrived_ms, itemised, true);
        // One record for all the batch's transfers: a sled insert per
        // transfer was the largest part of the batch's write.
        let block = match effects.transfers.first() {
            Some(first) => {
                // A batch applied before is answered as such (checked again
                // in the transaction), before its numbers are found taken.
                if self.batches.contains_key(&batch_key)? {
                    return Err(StoreError::AlreadyApplied(key.id.to_string()));
                }
                self.check_transfers_are_new(first.id)?;
                if effects
                    .transfers
                    .iter()
                    .zip(first.id.0..)
                    .any(|(transfer, number)| transfer.id.0 != number)
                {
                    return Err(StoreError::Corrupt(
                        "a batch's transfers are not numbered one after the other; nothing \
                         was written"
                            .to_owned(),
                    ));
                }
                Some((first.id.0.to_be_bytes(), encode_block(effects.transfers)))
            }
            None => None,
        };
        // One record for all the batch's period counts (`periods`).
        let logged = (!effects.period_uses.is_empty()).then(|| {
            (
                self.period_log.reserve().to_be_bytes(),
                periods::encode(effects.period_uses),
            )
        });
        let free: Vec<(Vec<u8>, u64)> = effects
            .free_uses
            .iter()
            .map(|(period, uses)| (period.bytes(), *uses))
            .collect();
        let suspended: Vec<(Vec<u8>, Vec<u8>)> = effects
            .suspense
            .iter()
            .map(|record| {
                (
                    suspense_key(record),
                    serde_json::to_vec(record).expect("records serialize"),
                )
            })
            .collect();
        let applied = encode_applied(effects.answer, effects.digest.as_ref());
        let range = effects
            .seq_range
            .map(|range| (range.key(), range.last.to_be_bytes()));
        let trees = (
            &self.transfers,
            &self.batches,
            &self.period_log_tree,
            &self.suspense,
            &self.seq_ranges,
            &self.itemised,
            &self.itemised_index,
            &self.free_uses,
        );
        let outcome = trees.transaction(
            |(
                transfer_tree,
                batch_tree,
                log_tree,
                suspense_tree,
                range_tree,
                itemised_tree,
                itemised_index,
                free_tree,
            )| {
                if batch_tree.get(&batch_key)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(ALREADY_APPLIED));
                }
                for (key, record) in &itemised.records {
                    itemised_tree.insert(key.as_slice(), record.as_slice())?;
                }
                for (key, value) in &itemised.index {
                    itemised_index.insert(key.as_slice(), value.as_slice())?;
                }
                if let Some((key, last)) = &range {
                    range_tree.insert(key.as_slice(), last)?;
                }
                if let Some((key, block)) = &block
                    && transfer_tree.insert(key, block.as_slice())?.is_some()
                {
                    return Err(ConflictableTransactionError::Abort(TRANSFER_TAKEN));
                }
                if let Some((number, record)) = &logged {
                    log_tree.insert(number, record.as_slice())?;
                }
                for (key, uses) in &free {
                    add_count(free_tree, key, *uses)?;
                }
                let mut added = 0;
                for (key, record) in &suspended {
                    if suspense_tree
                        .insert(key.as_slice(), record.as_slice())?
                        .is_none()
                    {
                        added += 1;
                    }
                }
                batch_tree.insert(batch_key.as_slice(), applied.as_slice())?;
                Ok(added)
            },
        );
        match outcome {
            Ok(added) => {
                self.suspense_records
                    .fetch_add(added, std::sync::atomic::Ordering::Relaxed);
                if let Some((number, _)) = &logged {
                    self.period_log
                        .logged(u64::from_be_bytes(*number), effects.period_uses);
                }
                Ok(())
            }
            Err(TransactionError::Abort(ALREADY_APPLIED)) => {
                Err(StoreError::AlreadyApplied(key.id.to_string()))
            }
            Err(TransactionError::Abort(_)) => Err(StoreError::Corrupt(
                "a transfer number of the batch is taken; a posted transfer is never overwritten"
                    .to_owned(),
            )),
            Err(TransactionError::Storage(error)) => Err(StoreError::Storage(error)),
        }
    }

    fn hold_events_from(&self, from: u64) -> Result<Vec<crate::holds::HoldEvent>, StoreError> {
        let mut events = Vec::new();
        for entry in self.hold_events.range(from.to_be_bytes()..) {
            let (key, value) = entry?;
            let stored: super::holds::StoredHoldEvent = serde_json::from_slice(&value)
                .map_err(|_| StoreError::Corrupt(format!("the hold event under {key:?}")))?;
            if key.as_ref() != stored.number.to_be_bytes() {
                return Err(StoreError::Corrupt(format!(
                    "hold event {} kept under another number",
                    stored.number
                )));
            }
            events.push(stored.event()?);
        }
        Ok(events)
    }

    fn payment_request(
        &self,
        service: &Pid,
        reference: &str,
    ) -> Result<Option<crate::payments::PaymentRequest>, StoreError> {
        self.payment_requests
            .get(payment_key(service, reference))?
            .map(|value| {
                serde_json::from_slice(&value).map_err(|_| {
                    StoreError::Corrupt(format!("the payment request {reference:?} of {service}"))
                })
            })
            .transpose()
    }

    fn claim_nonce(
        &self,
        digest: &[u8; 32],
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let expiry = |value: &[u8]| {
            <[u8; 8]>::try_from(value)
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("a nonce's expiry".to_owned()))
        };
        loop {
            let old = self.wsse_nonces.get(digest)?;
            if let Some(old) = &old
                && expiry(old)? >= now_ms
            {
                return Ok(false);
            }
            let new = expires_ms.to_be_bytes();
            if self
                .wsse_nonces
                .compare_and_swap(digest, old, Some(&new[..]))?
                .is_ok()
            {
                break;
            }
        }
        // Now and then (one claim in 256, by the digest's first byte), the
        // claims past their window go.
        if digest[0] == 0 {
            for entry in self.wsse_nonces.iter() {
                let (key, value) = entry?;
                if expiry(&value)? < now_ms {
                    self.wsse_nonces.remove(key)?;
                }
            }
        }
        Ok(true)
    }

    fn evidence_used(&self, reference: &str) -> Result<Option<(Pid, String)>, StoreError> {
        let Some(key) = self.payment_evidence.get(reference.as_bytes())? else {
            return Ok(None);
        };
        evidence_record(reference, &key).map(Some)
    }

    fn payment_requests(&self) -> Result<Vec<crate::payments::PaymentRequest>, StoreError> {
        let mut requests = Vec::new();
        for entry in self.payment_requests.iter() {
            let (key, value) = entry?;
            let request: crate::payments::PaymentRequest = serde_json::from_slice(&value)
                .map_err(|_| StoreError::Corrupt(format!("the payment request under {key:?}")))?;
            if key.as_ref() != payment_key(&request.service, &request.reference).as_slice() {
                return Err(StoreError::Corrupt(format!(
                    "payment request {:?} of {} kept under another key",
                    request.reference, request.service
                )));
            }
            requests.push(request);
        }
        Ok(requests)
    }

    fn stage_holds(
        &self,
        events: &[crate::holds::HoldEvent],
        transfers: &[Transfer],
        request: Option<&crate::payments::PaymentRequest>,
    ) -> Result<(), StoreError> {
        let request = request
            .map(|request| -> Result<_, StoreError> {
                request.check().map_err(StoreError::Corrupt)?;
                Ok((
                    payment_key(&request.service, &request.reference),
                    serde_json::to_vec(request).expect("payment requests serialize"),
                    request.evidence.clone(),
                ))
            })
            .transpose()?;
        let _writing = self.writing();
        if let Some(first) = transfers.first() {
            self.check_transfers_are_new(first.id)?;
        }
        let records: Vec<([u8; 8], Vec<u8>)> = events
            .iter()
            .map(|event| {
                let stored = super::holds::StoredHoldEvent::from(event);
                (
                    event.number.to_be_bytes(),
                    serde_json::to_vec(&stored).expect("hold events serialize"),
                )
            })
            .collect();
        let trees = (
            &self.transfers,
            &self.hold_events,
            &self.payment_requests,
            &self.payment_evidence,
        );
        let outcome: Result<(), TransactionError<u64>> =
            trees.transaction(|(transfer_tree, event_tree, request_tree, evidence_tree)| {
                if let Some((key, record, evidence)) = &request {
                    if request_tree
                        .insert(key.as_slice(), record.as_slice())?
                        .is_some()
                    {
                        return Err(ConflictableTransactionError::Abort(REQUEST_TAKEN));
                    }
                    for reference in evidence {
                        if evidence_tree
                            .insert(reference.as_bytes(), key.as_slice())?
                            .is_some()
                        {
                            return Err(ConflictableTransactionError::Abort(EVIDENCE_TAKEN));
                        }
                    }
                }
                for (key, record) in &records {
                    if event_tree.insert(key, record.as_slice())?.is_some() {
                        return Err(ConflictableTransactionError::Abort(u64::from_be_bytes(
                            *key,
                        )));
                    }
                }
                for transfer in transfers {
                    if transfer_tree
                        .insert(&transfer.id.0.to_be_bytes(), encode_transfer(transfer))?
                        .is_some()
                    {
                        return Err(ConflictableTransactionError::Abort(u64::MAX));
                    }
                }
                Ok(())
            });
        match outcome {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(u64::MAX)) => Err(StoreError::Corrupt(
                "a capture's transfer number is taken; a posted transfer is never overwritten"
                    .to_owned(),
            )),
            Err(TransactionError::Abort(EVIDENCE_TAKEN)) => Err(StoreError::Corrupt(
                "a confirmation reference of the payment request was evidence for another \
                 request: nothing was written"
                    .to_owned(),
            )),
            Err(TransactionError::Abort(REQUEST_TAKEN)) => Err(StoreError::Corrupt(
                "the payment request's reference code is taken; a request is never \
                 overwritten: nothing was written"
                    .to_owned(),
            )),
            Err(TransactionError::Abort(number)) => Err(StoreError::Corrupt(format!(
                "hold event {number} exists already; events are never overwritten: nothing \
                 was written"
            ))),
            Err(TransactionError::Storage(error)) => Err(StoreError::Storage(error)),
        }
    }

    fn stage_transfers(&self, transfers: &[Transfer]) -> Result<(), StoreError> {
        let _writing = self.writing();
        if let Some(first) = transfers.first() {
            self.check_transfers_are_new(first.id)?;
        }
        let mut batch = sled::Batch::default();
        for transfer in transfers {
            batch.insert(&transfer.id.0.to_be_bytes(), encode_transfer(transfer));
        }
        Ok(self.transfers.apply_batch(batch)?)
    }

    fn period_uses(&self, key: &PeriodKey) -> Result<u64, StoreError> {
        if let Some(count) = self.period_log.pending(key) {
            return Ok(count);
        }
        Ok(self.period_uses.get(key.bytes())?.map_or(0, |bytes| {
            u64::from_be_bytes(
                bytes
                    .as_ref()
                    .try_into()
                    .expect("store: period count is 8 bytes"),
            )
        }))
    }

    fn free_uses(&self, payer: &Cid, month: u32) -> Result<Vec<(Pid, u64)>, StoreError> {
        let mut prefix = Vec::with_capacity(40);
        put_str(&mut prefix, payer.as_str());
        let mut found = Vec::new();
        for entry in self.free_uses.scan_prefix(&prefix) {
            let (key, value) = entry?;
            let mut fields = Reader::new(&key);
            let parsed = (|| {
                fields.text()?;
                let pid = Pid::parse(fields.text()?).ok()?;
                let of = fields.u32()?;
                let uses = u64::from_be_bytes(value.as_ref().try_into().ok()?);
                fields.is_empty().then_some((pid, of, uses))
            })();
            let (pid, of, uses) =
                parsed.ok_or_else(|| StoreError::Corrupt("a free-use count".to_owned()))?;
            if of == month {
                found.push((pid, uses));
            }
        }
        found.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Ok(found)
    }

    fn resolve_suspense(
        &self,
        resolved: &[Suspense],
        transfers: &[Transfer],
        period_uses: &[(PeriodKey, u64)],
    ) -> Result<(), StoreError> {
        let _writing = self.writing();
        let counts = Counts {
            period_uses,
            free_uses: &[],
        };
        self.resolve(resolved, transfers, counts, 0, &[])
    }

    fn suspense(&self) -> Result<Vec<Suspense>, StoreError> {
        self.suspense
            .iter()
            .values()
            .map(|record| {
                let record = record?;
                Ok(serde_json::from_slice(&record).expect("store: suspense record is corrupt"))
            })
            .collect()
    }

    fn suspense_page(
        &self,
        after: Option<&SuspenseCursor>,
        limit: usize,
    ) -> Result<Vec<Suspense>, StoreError> {
        let start = match after {
            Some(cursor) => std::ops::Bound::Excluded(cursor_key(cursor)),
            None => std::ops::Bound::Unbounded,
        };
        self.suspense
            .range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded))
            .values()
            .take(limit)
            .map(|record| {
                let record = record?;
                Ok(serde_json::from_slice(&record).expect("store: suspense record is corrupt"))
            })
            .collect()
    }

    fn suspense_count(&self) -> Result<usize, StoreError> {
        Ok(self
            .suspense_records
            .load(std::sync::atomic::Ordering::Relaxed))
    }

    fn overlapping_range(&self, range: &SeqRange) -> Result<Option<(u64, u64)>, StoreError> {
        // Stored ranges of one instance never overlap, so the one starting
        // last at or before `range.last` is the only one that can.
        let prefix = range.prefix();
        let mut end = prefix.clone();
        end.extend_from_slice(&range.last.to_be_bytes());
        let Some(entry) = self.seq_ranges.range(prefix.clone()..=end).next_back() else {
            return Ok(None);
        };
        let (key, last) = entry?;
        let first = u64::from_be_bytes(
            key[key.len() - 8..]
                .try_into()
                .expect("store: a range key ends in 8 bytes"),
        );
        let last = u64::from_be_bytes(
            last.as_ref()
                .try_into()
                .expect("store: a range end is 8 bytes"),
        );
        Ok((last >= range.first).then_some((first, last)))
    }

    fn applied_batch(&self, key: &BatchKey) -> Result<Option<AppliedBatch>, StoreError> {
        Ok(self
            .batches
            .get(key.bytes())?
            .map(|record| decode_applied(&record)))
    }

    fn create_customer(&self, bid: &Bid, name: &str, email: &str) -> Result<Customer, StoreError> {
        self.register_customer(
            bid,
            Registration {
                name: name.to_owned(),
                email: email.to_owned(),
                profile: None,
                password: None,
            },
        )
    }

    fn register_customer(
        &self,
        bid: &Bid,
        registration: Registration,
    ) -> Result<Customer, StoreError> {
        let _writing = self.writing();
        registry::check_text("name", &registration.name, registry::NAME_BYTES_MAX)?;
        registry::check_email(&registration.email)?;
        let email_key = registration.email.to_lowercase();
        let outcome = (&self.serials, &self.customers, &self.emails).transaction(
            |(serials, customers, emails)| {
                if emails.get(email_key.as_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(
                        RegistryError::EmailTaken,
                    ));
                }
                let serial = match serials.get(b"C")? {
                    Some(bytes) => {
                        u64::from_be_bytes(bytes.as_ref().try_into().expect("serials are 8 bytes"))
                    }
                    None => 1,
                };
                let cid = registry::customer_id(bid, serial)
                    .map_err(ConflictableTransactionError::Abort)?;
                let customer = Customer {
                    cid,
                    name: registration.name.clone(),
                    email: registration.email.clone(),
                    credit_limit: Amount::ZERO,
                    denied: false,
                    profile: registration.profile.clone(),
                    password: registration.password.clone(),
                    phone: None,
                };
                let bytes = serde_json::to_vec(&customer).expect("records serialize");
                customers.insert(cid.as_str().as_bytes(), bytes)?;
                emails.insert(email_key.as_bytes(), cid.as_str().as_bytes())?;
                serials.insert(b"C", &(serial + 1).to_be_bytes())?;
                Ok(customer)
            },
        );
        let customer = outcome?;
        self.forget_customer_terms(&customer.cid);
        self.sync()?;
        Ok(customer)
    }

    fn customer(&self, cid: &Cid) -> Result<Option<Customer>, StoreError> {
        Self::read(&self.customers, cid.as_str().as_bytes())
    }

    fn customer_terms(
        &self,
        cids: &[Cid],
    ) -> Result<Vec<Option<super::CustomerTerms>>, StoreError> {
        let generation = self
            .customer_generation
            .load(std::sync::atomic::Ordering::Acquire);
        let mut terms: Vec<Option<super::CustomerTerms>> = {
            let cached = self.cached_customer_terms();
            cids.iter().map(|cid| cached.get(cid).copied()).collect()
        };
        // The rest is read without the lock (a batch naming thousands of
        // payers nobody knows keeps nobody else waiting), and only
        // customers that exist are kept: a meter cannot fill the cache
        // with CIDs of its own making.
        let mut found = Vec::new();
        for (cid, known) in cids.iter().zip(terms.iter_mut()) {
            if known.is_some() {
                continue;
            }
            let customer: Option<Customer> = Self::read(&self.customers, cid.as_str().as_bytes())?;
            if let Some(customer) = customer {
                *known = Some(customer.terms());
                found.push((*cid, customer.terms()));
            }
        }
        if !found.is_empty() {
            let mut cached = self.cached_customer_terms();
            // A customer changed since the reads began may have been read
            // before the change: keep none of them this time.
            if self
                .customer_generation
                .load(std::sync::atomic::Ordering::Acquire)
                == generation
            {
                // Bounded: a branch with more payers than this rereads them.
                if cached.len() + found.len() > CUSTOMER_TERMS_CACHED_MAX {
                    cached.clear();
                }
                cached.extend(found.into_iter().take(CUSTOMER_TERMS_CACHED_MAX));
            }
        }
        Ok(terms)
    }

    fn customer_by_email(&self, email: &str) -> Result<Option<Customer>, StoreError> {
        let Some(cid) = self.emails.get(email.to_lowercase().as_bytes())? else {
            return Ok(None);
        };
        Self::read(&self.customers, &cid)
    }

    fn customer_by_phone(&self, phone: &str) -> Result<Option<Customer>, StoreError> {
        let Some(cid) = self.phones.get(phone.as_bytes())? else {
            return Ok(None);
        };
        // The record decides: an index entry left behind (by an older
        // binary that dropped the field) names nobody.
        let customer: Option<Customer> = Self::read(&self.customers, &cid)?;
        Ok(customer.filter(|customer| customer.phone.as_deref() == Some(phone)))
    }

    fn change_customer(
        &self,
        cid: &Cid,
        change: &dyn Fn(&mut Customer),
    ) -> Result<Customer, StoreError> {
        let _writing = self.writing();
        let key = cid.as_str().as_bytes();
        let trees = (&self.customers, &self.emails, &self.phones);
        let outcome = trees.transaction(|(customers, emails, phones)| {
            let abort = ConflictableTransactionError::Abort;
            let Some(old) = customers.get(key)? else {
                return Err(abort(RegistryError::UnknownCustomer(*cid)));
            };
            let old: Customer = serde_json::from_slice(&old).expect("store: customer is corrupt");
            let mut customer = old.clone();
            change(&mut customer);
            customer.cid = old.cid;
            registry::check_text("name", &customer.name, registry::NAME_BYTES_MAX)
                .map_err(abort)?;
            registry::check_email(&customer.email).map_err(abort)?;
            let (old_email, new_email) = (old.email.to_lowercase(), customer.email.to_lowercase());
            if old_email != new_email {
                if emails.get(new_email.as_bytes())?.is_some() {
                    return Err(abort(RegistryError::EmailTaken));
                }
                emails.remove(old_email.as_bytes())?;
                emails.insert(new_email.as_bytes(), key)?;
            }
            if let Some(phone) = &customer.phone {
                registry::check_phone(phone).map_err(abort)?;
            }
            if old.phone != customer.phone {
                if let Some(phone) = &customer.phone
                    && phones.get(phone.as_bytes())?.is_some()
                {
                    return Err(abort(RegistryError::PhoneTaken));
                }
                if let Some(phone) = &old.phone {
                    phones.remove(phone.as_bytes())?;
                }
                if let Some(phone) = &customer.phone {
                    phones.insert(phone.as_bytes(), key)?;
                }
            }
            let bytes = serde_json::to_vec(&customer).expect("records serialize");
            customers.insert(key, bytes.as_slice())?;
            Ok(customer)
        });
        let customer = outcome?;
        self.forget_customer_terms(&customer.cid);
        self.sync()?;
        Ok(customer)
    }

    fn create_product(&self, bid: &Bid, new: NewProduct<'_>) -> Result<Product, StoreError> {
        let _writing = self.writing();
        let NewProduct {
            owner,
            name,
            description,
            terms,
            taca,
            max_price,
        } = new;
        if !max_price.is_positive() {
            return Err(RegistryError::BadMaxPrice(max_price).into());
        }
        registry::check_text("name", name, registry::NAME_BYTES_MAX)?;
        if !description.is_empty() {
            registry::check_text("description", description, registry::TERMS_BYTES_MAX)?;
        }
        registry::check_text("terms", terms, registry::TERMS_BYTES_MAX)?;
        if self.customer(owner)?.is_none() {
            return Err(RegistryError::UnknownCustomer(*owner).into());
        }
        let hash = TacaHash::of(taca);
        self.tacas.insert(hash.to_string().as_bytes(), taca)?;
        self.create(b"P", &self.products, |serial| {
            let (pid, test_pid) = registry::product_ids(bid, serial)?;
            let product = Product {
                pid,
                test_pid,
                owner: *owner,
                name: name.to_owned(),
                description: description.to_owned(),
                terms: terms.to_owned(),
                taca: hash,
                max_price: Some(max_price),
                components: Vec::new(),
            };
            let keys = vec![
                pid.as_str().as_bytes().to_vec(),
                test_pid.as_str().as_bytes().to_vec(),
            ];
            Ok((keys, product))
        })
    }

    fn product(&self, pid: &Pid) -> Result<Option<Product>, StoreError> {
        Self::read(&self.products, pid.as_str().as_bytes())
    }

    fn set_components(
        &self,
        pid: &Pid,
        owner: Option<&Cid>,
        components: &[Pid],
    ) -> Result<Product, StoreError> {
        let _writing = self.writing();
        if components.len() > registry::COMPONENTS_MAX {
            return Err(RegistryError::TooManyComponents(registry::COMPONENTS_MAX).into());
        }
        let mut declared: Vec<Pid> = Vec::with_capacity(components.len());
        for component in components {
            let found = self.product(component)?;
            if found.is_none_or(|found| found.pid != *component) || component == pid {
                return Err(RegistryError::BadComponent(*component).into());
            }
            if !declared.contains(component) {
                declared.push(*component);
            }
        }
        let outcome = self.products.transaction(|products| {
            let unknown =
                || ConflictableTransactionError::Abort(RegistryError::UnknownProduct(*pid));
            let bytes = products.get(pid.as_str().as_bytes())?.ok_or_else(unknown)?;
            let mut product: Product =
                serde_json::from_slice(&bytes).expect("store: product is corrupt");
            if product.pid != *pid || owner.is_some_and(|owner| *owner != product.owner) {
                return Err(unknown());
            }
            product.components = declared.clone();
            let bytes = serde_json::to_vec(&product).expect("records serialize");
            products.insert(product.pid.as_str().as_bytes(), bytes.as_slice())?;
            products.insert(product.test_pid.as_str().as_bytes(), bytes.as_slice())?;
            Ok(product)
        });
        let product = outcome?;
        self.sync()?;
        Ok(product)
    }

    fn taca_module(&self, hash: &TacaHash) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tacas
            .get(hash.to_string().as_bytes())?
            .map(|bytes| bytes.to_vec()))
    }

    fn create_meter_for(
        &self,
        bid: &Bid,
        owner: &Cid,
        service: Option<&Pid>,
    ) -> Result<Meter, StoreError> {
        let _writing = self.writing();
        if self.customer(owner)?.is_none() {
            return Err(RegistryError::UnknownCustomer(*owner).into());
        }
        if self.meters_of(owner)?.len() >= registry::METERS_PER_CUSTOMER_MAX {
            return Err(RegistryError::TooManyMeters(registry::METERS_PER_CUSTOMER_MAX).into());
        }
        let secret_hex = registry::new_meter_secret();
        self.create(b"M", &self.meters, |serial| {
            let mid = registry::meter_id(bid, serial)?;
            let meter = Meter {
                mid,
                owner: *owner,
                secret_hex: secret_hex.clone(),
                previous: None,
                rotated: None,
                revoked: None,
                service: service.cloned(),
            };
            Ok((vec![mid.as_str().as_bytes().to_vec()], meter))
        })
    }

    fn meter(&self, mid: &Mid) -> Result<Option<Meter>, StoreError> {
        Self::read(&self.meters, mid.as_str().as_bytes())
    }

    fn products_of(&self, owner: &Cid) -> Result<Vec<Product>, StoreError> {
        // Each product is stored under its PID and its test PID: keep one.
        let mut products = Vec::new();
        for entry in self.products.iter() {
            let (key, bytes) = entry?;
            let product: Product =
                serde_json::from_slice(&bytes).expect("store: product is corrupt");
            if product.owner == *owner && key.as_ref() == product.pid.as_str().as_bytes() {
                products.push(product);
            }
        }
        products.sort_by_key(|product| serial_of(product.pid.as_str()));
        Ok(products)
    }

    fn create_grant(&self, grant: NewGrant) -> Result<Grant, StoreError> {
        let _writing = self.writing();
        self.create_grant_record(grant)
    }

    fn grants_of_meter(&self, mid: &Mid) -> Result<Vec<Grant>, StoreError> {
        Ok(self.meter_grants(mid)?.all().to_vec())
    }

    fn meter_grants(&self, mid: &Mid) -> Result<Arc<MeterGrants>, StoreError> {
        // Read under the lock: a change committed meanwhile forgets the
        // entry only after this read put it there, never before.
        let mut cached = self.cached_meter_grants();
        if let Some(grants) = cached.get(mid) {
            return Ok(Arc::clone(grants));
        }
        let grants = Arc::new(MeterGrants::new(self.indexed_grants(b'm', mid.as_str())?));
        // Bounded: a branch with more meters than this rereads them.
        if cached.len() >= METER_GRANTS_CACHED_MAX {
            cached.clear();
        }
        cached.insert(*mid, Arc::clone(&grants));
        Ok(grants)
    }

    fn grants_of_customer(&self, cid: &Cid) -> Result<Vec<Grant>, StoreError> {
        self.indexed_grants(b'c', cid.as_str())
    }

    fn revoke_grant(&self, id: u64, payer: Option<&Cid>, at_ms: u64) -> Result<Grant, StoreError> {
        let _writing = self.writing();
        self.revoke_grant_record(id, payer, at_ms)
    }

    fn meters_of(&self, owner: &Cid) -> Result<Vec<Meter>, StoreError> {
        let mut meters = Vec::new();
        for entry in self.meters.iter() {
            let (_, bytes) = entry?;
            let meter: Meter = serde_json::from_slice(&bytes).expect("store: meter is corrupt");
            if meter.owner == *owner {
                meters.push(meter);
            }
        }
        meters.sort_by_key(|meter| serial_of(meter.mid.as_str()));
        Ok(meters)
    }

    fn rotate_meter_secret(
        &self,
        mid: &Mid,
        by: Actor,
        at_ms: u64,
        grace_ms: u64,
    ) -> Result<Meter, StoreError> {
        let _writing = self.writing();
        if grace_ms > registry::ROTATION_GRACE_MS_MAX {
            return Err(RegistryError::GraceTooLong.into());
        }
        let secret_hex = registry::new_meter_secret();
        self.change_meter(mid, by, &|meter| {
            if meter.revoked.is_some() {
                return Err(RegistryError::MeterRevoked(meter.mid));
            }
            let old = std::mem::replace(&mut meter.secret_hex, secret_hex.clone());
            meter.previous = (grace_ms > 0).then(|| PreviousSecret {
                secret_hex: old,
                valid_until_ms: at_ms.saturating_add(grace_ms),
            });
            meter.rotated = Some(Change { at_ms, by });
            Ok(())
        })
    }

    fn revoke_meter(&self, mid: &Mid, by: Actor, at_ms: u64) -> Result<Meter, StoreError> {
        let _writing = self.writing();
        self.change_meter(mid, by, &|meter| {
            if meter.revoked.is_none() {
                meter.revoked = Some(Change { at_ms, by });
                meter.previous = None;
            }
            Ok(())
        })
    }

    fn retire_previous_secret(&self, mid: &Mid, current_hex: &str) -> Result<(), StoreError> {
        let _writing = self.writing();
        let outcome = self.meters.transaction(|meters| {
            let key = mid.as_str().as_bytes();
            let Some(bytes) = meters.get(key)? else {
                return Ok(());
            };
            let mut meter: Meter = serde_json::from_slice(&bytes).expect("store: meter is corrupt");
            if meter.previous.is_some() && meter.secret_hex == current_hex {
                meter.previous = None;
                let bytes = serde_json::to_vec(&meter).expect("records serialize");
                meters.insert(key, bytes.as_slice())?;
            }
            Ok(())
        });
        outcome.map_err(|error: TransactionError<RegistryError>| StoreError::from(error))
    }

    fn deposit(&self, reference: &Reference) -> Result<Option<DepositRecord>, StoreError> {
        self.deposit_record(reference)
    }

    fn begin_deposit(
        &self,
        reference: &Reference,
        intent: &DepositRecord,
    ) -> Result<(DepositRecord, bool), StoreError> {
        let _writing = self.writing();
        self.begin_deposit_record(reference, intent)
    }

    fn deposit_collected(
        &self,
        reference: &Reference,
        processor: &str,
    ) -> Result<DepositRecord, StoreError> {
        let _writing = self.writing();
        self.deposit_collected_record(reference, processor)
    }

    fn stage_deposit(
        &self,
        reference: &Reference,
        transfer: &Transfer,
    ) -> Result<DepositRecord, StoreError> {
        let _writing = self.writing();
        self.stage_deposit_record(reference, transfer)
    }
}

impl SledStore {
    fn grant_index_key(kind: u8, id: &str, number: u64) -> Vec<u8> {
        let mut key = vec![kind];
        put_str(&mut key, id);
        key.extend_from_slice(&number.to_be_bytes());
        key
    }

    fn indexed_grants(&self, kind: u8, id: &str) -> Result<Vec<Grant>, StoreError> {
        let mut prefix = vec![kind];
        put_str(&mut prefix, id);
        let mut grants = Vec::new();
        for key in self.grant_index.scan_prefix(&prefix).keys() {
            let key = key?;
            let number = &key[key.len() - 8..];
            let grant: Grant = Self::read(&self.grants, number)?
                .expect("store: a grant index names a missing grant");
            grants.push(grant);
        }
        Ok(grants)
    }
}

/// Most meters whose grants are kept in memory.
pub const METER_GRANTS_CACHED_MAX: usize = 100_000;

/// Most customers whose terms are kept in memory (about 80 bytes each).
pub const CUSTOMER_TERMS_CACHED_MAX: usize = 100_000;

impl SledStore {
    fn cached_customer_terms(
        &self,
    ) -> std::sync::MutexGuard<'_, crate::hashing::Map<Cid, super::CustomerTerms>> {
        self.customer_terms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// After a customer's record changed: reads in progress keep nothing,
    /// and the entry goes.
    fn forget_customer_terms(&self, cid: &Cid) {
        self.customer_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.cached_customer_terms().remove(cid);
    }

    fn cached_meter_grants(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Mid, Arc<MeterGrants>>> {
        self.meter_grants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Changes meter `mid`'s record as `change` says, in one transaction
    /// on the record as stored (a concurrent upload reads it whole, before
    /// or after), then syncs. `Actor::Owner` finds only their own meters.
    fn change_meter(
        &self,
        mid: &Mid,
        by: Actor,
        change: &dyn Fn(&mut Meter) -> Result<(), RegistryError>,
    ) -> Result<Meter, StoreError> {
        let outcome = self.meters.transaction(|meters| {
            let key = mid.as_str().as_bytes();
            let unknown = || ConflictableTransactionError::Abort(RegistryError::UnknownMeter(*mid));
            let bytes = meters.get(key)?.ok_or_else(unknown)?;
            let mut meter: Meter = serde_json::from_slice(&bytes).expect("store: meter is corrupt");
            if matches!(by, Actor::Owner(owner) if owner != meter.owner) {
                return Err(unknown());
            }
            change(&mut meter).map_err(ConflictableTransactionError::Abort)?;
            let bytes = serde_json::to_vec(&meter).expect("records serialize");
            meters.insert(key, bytes.as_slice())?;
            Ok(meter)
        });
        let meter =
            outcome.map_err(|error: TransactionError<RegistryError>| StoreError::from(error))?;
        self.sync()?;
        Ok(meter)
    }

    /// The `Store` methods on grants, kept apart from the rest.
    fn create_grant_record(&self, new: NewGrant) -> Result<Grant, StoreError> {
        if self.customer(&new.cid)?.is_none() {
            return Err(RegistryError::UnknownCustomer(new.cid).into());
        }
        match self.meter(&new.mid)? {
            None => return Err(RegistryError::UnknownMeter(new.mid).into()),
            Some(meter) if meter.revoked.is_some() => {
                return Err(RegistryError::MeterRevoked(new.mid).into());
            }
            Some(_) => {}
        }
        let of_meter = self.indexed_grants(b'm', new.mid.as_str())?;
        let live = of_meter
            .iter()
            .filter(|grant| grant.is_live_at(new.created_ms))
            .count();
        if live >= registry::GRANTS_PER_METER_MAX {
            return Err(RegistryError::TooManyGrants(registry::GRANTS_PER_METER_MAX).into());
        }
        // A new grant of the same customer for the same users of the same
        // meter replaces the ones before it (they end as it starts).
        let replaced: Vec<u64> = of_meter
            .iter()
            .filter(|old| old.cid == new.cid && old.scope == new.scope && old.revoked_ms.is_none())
            .map(|old| old.id)
            .collect();
        let outcome = (&self.serials, &self.grants, &self.grant_index).transaction(
            |(serials, grants, index)| {
                for old in &replaced {
                    let bytes = grants
                        .get(old.to_be_bytes())?
                        .expect("store: an indexed grant exists");
                    let mut old: Grant =
                        serde_json::from_slice(&bytes).expect("store: grant record is corrupt");
                    if old.revoked_ms.is_none() {
                        old.revoked_ms = Some(new.created_ms.max(old.created_ms));
                        let bytes = serde_json::to_vec(&old).expect("records serialize");
                        grants.insert(&old.id.to_be_bytes(), bytes)?;
                    }
                }
                let number = match serials.get(b"G")? {
                    Some(bytes) => {
                        u64::from_be_bytes(bytes.as_ref().try_into().expect("serials are 8 bytes"))
                    }
                    None => 1,
                };
                let grant = Grant {
                    id: number,
                    mid: new.mid,
                    cid: new.cid,
                    scope: new.scope.clone(),
                    label: new.label.clone(),
                    created_ms: new.created_ms,
                    expires_ms: new.expires_ms,
                    revoked_ms: None,
                };
                let bytes = serde_json::to_vec(&grant).expect("records serialize");
                grants.insert(&number.to_be_bytes(), bytes)?;
                index.insert(
                    Self::grant_index_key(b'm', new.mid.as_str(), number),
                    &[] as &[u8],
                )?;
                index.insert(
                    Self::grant_index_key(b'c', new.cid.as_str(), number),
                    &[] as &[u8],
                )?;
                serials.insert(b"G", &(number + 1).to_be_bytes())?;
                Ok(grant)
            },
        );
        let grant =
            outcome.map_err(|error: TransactionError<RegistryError>| StoreError::from(error))?;
        self.cached_meter_grants().remove(&grant.mid);
        self.sync()?;
        Ok(grant)
    }

    fn revoke_grant_record(
        &self,
        id: u64,
        payer: Option<&Cid>,
        at_ms: u64,
    ) -> Result<Grant, StoreError> {
        let outcome = self.grants.transaction(|grants| {
            let Some(bytes) = grants.get(id.to_be_bytes())? else {
                return Err(ConflictableTransactionError::Abort(
                    RegistryError::UnknownGrant(id),
                ));
            };
            let mut grant: Grant =
                serde_json::from_slice(&bytes).expect("store: grant record is corrupt");
            if payer.is_some_and(|payer| *payer != grant.cid) {
                return Err(ConflictableTransactionError::Abort(
                    RegistryError::UnknownGrant(id),
                ));
            }
            if grant.revoked_ms.is_none() {
                grant.revoked_ms = Some(at_ms.max(grant.created_ms));
                let bytes = serde_json::to_vec(&grant).expect("records serialize");
                grants.insert(&id.to_be_bytes(), bytes)?;
            }
            Ok(grant)
        });
        let grant = outcome?;
        self.cached_meter_grants().remove(&grant.mid);
        self.sync()?;
        Ok(grant)
    }
}

/// An itemised batch's records and index entries, keyed for their trees.
struct ItemisedEntries {
    records: Vec<(Vec<u8>, Vec<u8>)>,
    index: Vec<(Vec<u8>, Vec<u8>)>,
}

fn itemised_batch_index_key(batch_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + batch_key.len());
    key.push(b'b');
    key.extend_from_slice(batch_key);
    key
}

fn itemised_transfer_index_key(first: TransferId) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.push(b't');
    key.extend_from_slice(&first.0.to_be_bytes());
    key
}

/// The keys of a batch's itemised records (`ARRIVED_MS MID BATCH PART`) and
/// of its index entries: one per range of transfers their uses were summed
/// into, and (`batch_index`: the batch's own records, not a re-pricing's)
/// the batch's; nothing without records.
fn itemised_entries(
    key: &BatchKey,
    ranges: &[(TransferId, TransferId)],
    arrived_ms: u64,
    records: &[Vec<u8>],
    batch_index: bool,
) -> ItemisedEntries {
    if records.is_empty() {
        return ItemisedEntries {
            records: Vec::new(),
            index: Vec::new(),
        };
    }
    let batch_key = key.bytes();
    let parts = u16::try_from(records.len()).expect("a batch takes fewer than 65,536 records");
    let mut prefix = arrived_ms.to_be_bytes().to_vec();
    prefix.extend_from_slice(&batch_key);
    let records = records
        .iter()
        .enumerate()
        .map(|(part, record)| {
            let mut key = prefix.clone();
            key.extend_from_slice(&(part as u16).to_be_bytes());
            (key, record.clone())
        })
        .collect();
    let mut located = arrived_ms.to_be_bytes().to_vec();
    located.extend_from_slice(&parts.to_be_bytes());
    let mut index = Vec::with_capacity(1 + ranges.len());
    if batch_index {
        index.push((itemised_batch_index_key(&batch_key), located));
    }
    for (first, last) in ranges {
        let mut value = last.0.to_be_bytes().to_vec();
        value.extend_from_slice(&arrived_ms.to_be_bytes());
        value.extend_from_slice(&batch_key);
        index.push((itemised_transfer_index_key(*first), value));
    }
    ItemisedEntries { records, index }
}

/// The period counts a re-pricing writes: new totals, and free uses to add.
#[derive(Clone, Copy)]
struct Counts<'a> {
    period_uses: &'a [(PeriodKey, u64)],
    free_uses: &'a [(PeriodKey, u64)],
}

/// Adds `uses` to the count at `key` (a big-endian u64; absent: zero).
fn add_count<E>(
    tree: &sled::transaction::TransactionalTree,
    key: &[u8],
    uses: u64,
) -> Result<(), ConflictableTransactionError<E>> {
    let before = tree
        .get(key)?
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
        .map_or(0, u64::from_be_bytes);
    tree.insert(key, &before.saturating_add(uses).to_be_bytes())?;
    Ok(())
}

fn batch_key_of(bytes: &[u8]) -> Option<BatchKey> {
    let mut fields = Reader::new(bytes);
    let key = BatchKey {
        mid: Mid::parse(fields.text()?).ok()?,
        id: BatchId::parse(fields.text()?).ok()?,
    };
    fields.is_empty().then_some(key)
}

/// Why a re-pricing's transaction wrote nothing.
enum Refusal {
    /// A reading it takes out of suspense is no longer there.
    NotInSuspense,
    /// The itemised records of set N would take the key of records kept
    /// already.
    ItemisedTaken(usize),
}

impl SledStore {
    /// `resolve_suspense`, with a re-pricing's itemised records.
    fn resolve(
        &self,
        resolved: &[Suspense],
        transfers: &[Transfer],
        counts: Counts<'_>,
        arrived_ms: u64,
        sets: &[RepricedItems],
    ) -> Result<(), StoreError> {
        let itemised: Vec<ItemisedEntries> = sets
            .iter()
            .map(|set| {
                let ranges: Vec<(TransferId, TransferId)> =
                    set.transfers.iter().map(|id| (*id, *id)).collect();
                itemised_entries(&set.key, &ranges, arrived_ms, &set.records, false)
            })
            .collect();
        if let Some(first) = transfers.first() {
            self.check_transfers_are_new(first.id)?;
        }
        let logged = (!counts.period_uses.is_empty()).then(|| {
            (
                self.period_log.reserve().to_be_bytes(),
                periods::encode(counts.period_uses),
            )
        });
        let trees = (
            &self.transfers,
            &self.period_log_tree,
            &self.suspense,
            &self.itemised,
            &self.itemised_index,
            &self.free_uses,
        );
        let outcome: Result<usize, TransactionError<Refusal>> = trees.transaction(
            |(transfer_tree, log_tree, suspense_tree, itemised_tree, itemised_index, free_tree)| {
                for (set, entries) in itemised.iter().enumerate() {
                    for (key, record) in &entries.records {
                        // Never over another re-pricing's records.
                        if itemised_tree
                            .insert(key.as_slice(), record.as_slice())?
                            .is_some()
                        {
                            return Err(ConflictableTransactionError::Abort(
                                Refusal::ItemisedTaken(set),
                            ));
                        }
                    }
                    for (key, value) in &entries.index {
                        itemised_index.insert(key.as_slice(), value.as_slice())?;
                    }
                }
                for transfer in transfers {
                    transfer_tree
                        .insert(&transfer.id.0.to_be_bytes(), encode_transfer(transfer))?;
                }
                if let Some((number, record)) = &logged {
                    log_tree.insert(number, record.as_slice())?;
                }
                for (period, uses) in counts.free_uses {
                    add_count(free_tree, &period.bytes(), *uses)?;
                }
                let mut removed = 0;
                for record in resolved {
                    if suspense_tree.remove(suspense_key(record))?.is_some() {
                        removed += 1;
                    }
                }
                if removed != resolved.len() {
                    // Priced by someone else meanwhile: posting again would
                    // charge twice. Aborting writes none of it.
                    return Err(ConflictableTransactionError::Abort(Refusal::NotInSuspense));
                }
                Ok(removed)
            },
        );
        match outcome {
            Ok(removed) => {
                self.suspense_records
                    .fetch_sub(removed, std::sync::atomic::Ordering::Relaxed);
                if let Some((number, _)) = &logged {
                    self.period_log
                        .logged(u64::from_be_bytes(*number), counts.period_uses);
                }
                self.sync()
            }
            Err(TransactionError::Abort(Refusal::NotInSuspense)) => Err(StoreError::Corrupt(
                "a reading to take out of suspense is no longer there (priced meanwhile?): \
                 nothing was changed"
                    .to_owned(),
            )),
            Err(TransactionError::Abort(Refusal::ItemisedTaken(set))) => {
                Err(crate::store::itemised_taken(&sets[set].key, arrived_ms))
            }
            Err(TransactionError::Storage(error)) => Err(StoreError::Storage(error)),
        }
    }

    fn itemised_records(
        &self,
        key: &BatchKey,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError> {
        let Some(located) = self
            .itemised_index
            .get(itemised_batch_index_key(&key.bytes()))?
        else {
            return Ok(None);
        };
        if located.len() != 10 {
            return Err(StoreError::Corrupt(format!(
                "the itemised index entry of batch {} of {}",
                key.id, key.mid
            )));
        }
        let at = ItemisedAt {
            key: key.clone(),
            arrived_ms: u64::from_be_bytes(located[..8].try_into().expect("8 bytes")),
        };
        let parts = u16::from_be_bytes([located[8], located[9]]);
        self.itemised_set(&at, Some(parts))
    }

    /// The records written for `at`, checked whole: numbered from 0, of
    /// that batch, `parts` of them when known.
    fn itemised_set(
        &self,
        at: &ItemisedAt,
        parts: Option<u16>,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError> {
        let key = &at.key;
        let corrupt = |what: String| {
            StoreError::Corrupt(format!("{what} of batch {} of {}", key.id, key.mid))
        };
        let mut prefix = at.arrived_ms.to_be_bytes().to_vec();
        prefix.extend_from_slice(&key.bytes());
        let mut records = Vec::new();
        for entry in self.itemised.scan_prefix(&prefix) {
            let (_, bytes) = entry?;
            let record = crate::itemised::decode(&bytes)
                .ok_or_else(|| corrupt(format!("itemised record {}", records.len())))?;
            if usize::from(record.part) != records.len()
                || record.mid != key.mid
                || record.batch != key.id
            {
                return Err(corrupt(format!("itemised record {}", records.len())));
            }
            records.push(record);
        }
        match parts {
            Some(parts) if records.len() != usize::from(parts) => Err(corrupt(format!(
                "{} of {parts} itemised records",
                records.len()
            ))),
            None if records.is_empty() => Ok(None),
            _ => Ok(Some(records)),
        }
    }

    fn itemised_transfer(&self, id: TransferId) -> Result<Option<ItemisedAt>, StoreError> {
        let start = itemised_transfer_index_key(TransferId(0));
        let end = itemised_transfer_index_key(id);
        let Some(entry) = self.itemised_index.range(start..=end).next_back() else {
            return Ok(None);
        };
        let (_, value) = entry?;
        let corrupt =
            || StoreError::Corrupt(format!("the itemised index entry of transfer {}", id.0));
        let last = u64::from_be_bytes(
            value
                .get(..8)
                .ok_or_else(corrupt)?
                .try_into()
                .expect("8 bytes"),
        );
        if last < id.0 {
            return Ok(None);
        }
        let key = value.get(16..).and_then(batch_key_of).ok_or_else(corrupt)?;
        let arrived_ms = u64::from_be_bytes(value[8..16].try_into().expect("8 bytes"));
        Ok(Some(ItemisedAt { key, arrived_ms }))
    }

    fn prune_itemised_records(
        &self,
        before_ms: u64,
        records_max: usize,
    ) -> Result<usize, StoreError> {
        let end = before_ms.to_be_bytes();
        let mut records = Vec::new();
        let mut index = Vec::new();
        for entry in self.itemised.range(..end.as_slice()).take(records_max) {
            let (key, bytes) = entry?;
            records.push(key.to_vec());
            let Some(record) = crate::itemised::decode(&bytes) else {
                continue;
            };
            if record.repriced {
                // A re-pricing's records are found by their transfers only.
                for item in &record.items {
                    if let crate::itemised::Outcome::Priced(priced) = &item.outcome
                        && let Some(transfer) = priced.transfer
                    {
                        index.push(itemised_transfer_index_key(transfer));
                    }
                }
                continue;
            }
            if record.part != 0 || key.len() < 10 {
                continue;
            }
            // The first record of a batch takes its index entries with it.
            index.push(itemised_batch_index_key(&key[8..key.len() - 2]));
            if let Some((first, _)) = record.transfers {
                index.push(itemised_transfer_index_key(first));
            }
        }
        let outcome: Result<(), TransactionError<()>> = (&self.itemised, &self.itemised_index)
            .transaction(|(itemised, itemised_index)| {
                for key in &records {
                    itemised.remove(key.as_slice())?;
                }
                for key in &index {
                    itemised_index.remove(key.as_slice())?;
                }
                Ok(())
            });
        match outcome {
            Ok(()) => Ok(records.len()),
            Err(TransactionError::Abort(())) => unreachable!("nothing aborts this transaction"),
            Err(TransactionError::Storage(error)) => Err(StoreError::Storage(error)),
        }
    }
}

/// The serial number at the end of an ID (`B1-P12` -> 12), for ordering.
fn serial_of(id: &str) -> u64 {
    id.rsplit_once('-')
        .and_then(|(_, tail)| tail.get(1..))
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(u64::MAX)
}

fn put_account(out: &mut Vec<u8>, account: &AccountId) {
    match account {
        AccountId::Customer(cid) => {
            out.push(1);
            put_str(out, cid.as_str());
        }
        AccountId::System(SystemAccount::Funding) => out.push(2),
    }
}

/// Abort code of a write whose payment request's reference is taken.
const REQUEST_TAKEN: u64 = u64::MAX - 1;
/// An evidence record's value (service PID, a zero byte, the request's
/// reference code) read: the service and the code.
fn evidence_record(reference: &str, value: &[u8]) -> Result<(Pid, String), StoreError> {
    let corrupt = || StoreError::Corrupt(format!("the evidence record of {reference:?}"));
    let split = value
        .iter()
        .position(|byte| *byte == 0)
        .ok_or_else(corrupt)?;
    let service = std::str::from_utf8(&value[..split]).map_err(|_| corrupt())?;
    let code = std::str::from_utf8(&value[split + 1..]).map_err(|_| corrupt())?;
    Ok((Pid::parse(service).map_err(|_| corrupt())?, code.to_owned()))
}

impl SledStore {
    /// Every evidence record: the reference, the service, the code.
    pub(crate) fn evidence_records(&self) -> Result<Vec<(String, Pid, String)>, StoreError> {
        let mut records = Vec::new();
        for entry in self.payment_evidence.iter() {
            let (key, value) = entry?;
            let reference = String::from_utf8(key.to_vec())
                .map_err(|_| StoreError::Corrupt("an evidence record's reference".into()))?;
            let (service, code) = evidence_record(&reference, &value)?;
            records.push((reference, service, code));
        }
        Ok(records)
    }
}

/// Abort code of a write whose request gives evidence used already.
const EVIDENCE_TAKEN: u64 = u64::MAX - 2;

/// A payment request's key: the service's PID, a zero byte, the reference.
pub(super) fn payment_key(service: &Pid, reference: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(service.as_str().len() + 1 + reference.len());
    key.extend_from_slice(service.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(reference.as_bytes());
    key
}

/// Record: version, id, debit, credit, amount (nanos, i128), posting time
/// (ms), kind.
fn encode_transfer(transfer: &Transfer) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&transfer.id.0.to_be_bytes());
    put_account(&mut out, &transfer.debit);
    put_account(&mut out, &transfer.credit);
    out.extend_from_slice(&transfer.amount.nanos().to_be_bytes());
    out.extend_from_slice(&transfer.posted_ms.to_be_bytes());
    match &transfer.kind {
        TransferKind::Deposit => out.push(1),
        TransferKind::Withdrawal => out.push(2),
        TransferKind::Use { pid, batch, uses } => {
            out.push(3);
            put_str(&mut out, pid.as_str());
            put_str(&mut out, batch.as_str());
            out.extend_from_slice(&uses.to_be_bytes());
        }
        TransferKind::Correction { of } => {
            out.push(4);
            out.extend_from_slice(&of.0.to_be_bytes());
        }
        TransferKind::Payment { pid, reference } => {
            out.push(5);
            put_str(&mut out, pid.as_str());
            put_str(&mut out, reference);
        }
    }
    out
}

fn suspense_key(record: &Suspense) -> Vec<u8> {
    cursor_key(&SuspenseCursor::of(record))
}

fn cursor_key(cursor: &SuspenseCursor) -> Vec<u8> {
    let mut key = Vec::with_capacity(96);
    put_str(&mut key, cursor.mid.as_str());
    put_str(&mut key, cursor.batch.as_str());
    key.extend_from_slice(&cursor.seq.to_be_bytes());
    key
}

fn read_account(fields: &mut Reader<'_>) -> Option<AccountId> {
    match fields.byte()? {
        1 => Some(AccountId::Customer(Cid::parse(fields.text()?).ok()?)),
        2 => Some(AccountId::System(SystemAccount::Funding)),
        _ => None,
    }
}

fn be_u64_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// One record for consecutive transfers (one batch's): `BLOCK_VERSION`,
/// their count, then each transfer's own record, length first.
fn encode_block(transfers: &[Transfer]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + transfers.len() * 96);
    out.push(BLOCK_VERSION);
    out.extend_from_slice(
        &u32::try_from(transfers.len())
            .expect("a batch's transfers")
            .to_be_bytes(),
    );
    for transfer in transfers {
        let record = encode_transfer(transfer);
        debug_assert_eq!(decode_transfer(&record).as_ref(), Some(transfer));
        out.extend_from_slice(
            &u32::try_from(record.len())
                .expect("a short record")
                .to_be_bytes(),
        );
        out.extend_from_slice(&record);
    }
    out
}

/// The transfers stored under `key`: one transfer's record, or a block of
/// consecutive ones numbered from the key. Refused (with why) when the
/// record does not decode, or a transfer in it is not the number its place
/// says.
pub(super) fn decode_transfers(key: &[u8], record: &[u8]) -> Result<Vec<Transfer>, &'static str> {
    const UNDECODABLE: &str = "does not decode (or an amount is out of range)";
    let first = be_u64_of(key).ok_or("has a key that is not a number")?;
    if record.first() != Some(&BLOCK_VERSION) {
        let transfer = decode_transfer(record).ok_or(UNDECODABLE)?;
        if transfer.id.0 != first {
            return Err("is stored under another number");
        }
        return Ok(vec![transfer]);
    }
    let mut fields = Reader::new(&record[1..]);
    let count = fields.u32().ok_or(UNDECODABLE)? as usize;
    if count == 0 {
        return Err("is an empty block");
    }
    // Never more room than the record could hold (a transfer takes more
    // than 32 bytes), whatever its count says.
    let mut transfers = Vec::with_capacity(count.min(record.len() / 32));
    for expected in first..first.saturating_add(count as u64) {
        let length = fields.u32().ok_or(UNDECODABLE)? as usize;
        let transfer =
            decode_transfer(fields.take(length).ok_or(UNDECODABLE)?).ok_or(UNDECODABLE)?;
        if transfer.id.0 != expected {
            return Err("is stored under another number");
        }
        transfers.push(transfer);
    }
    if transfers.len() != count || !fields.is_empty() {
        return Err(UNDECODABLE);
    }
    Ok(transfers)
}

impl SledStore {
    /// Refuses to write transfers numbered from `first` when the store
    /// holds that number or a later one: a posted transfer is never
    /// overwritten. (A block holds numbers its key does not show, so a
    /// write's own check of its keys is not enough.)
    fn check_transfers_are_new(&self, first: TransferId) -> Result<(), StoreError> {
        let Some((key, record)) = self.transfers.last()? else {
            return Ok(());
        };
        let corrupt = |why: &str| StoreError::Corrupt(format!("the last transfer record {why}"));
        let next = match record.first() {
            // A block's count is enough (`verify` checks the rest).
            Some(&BLOCK_VERSION) => {
                let first = be_u64_of(&key).ok_or_else(|| corrupt("has a bad key"))?;
                let count = Reader::new(&record[1..])
                    .u32()
                    .ok_or_else(|| corrupt("does not decode"))?;
                first.saturating_add(u64::from(count))
            }
            _ => {
                let stored = decode_transfers(&key, &record).map_err(corrupt)?;
                stored.last().map_or(0, |last| last.id.0.saturating_add(1))
            }
        };
        if first.0 < next {
            return Err(StoreError::Corrupt(format!(
                "transfer {} exists already; a posted transfer is never overwritten",
                first.0
            )));
        }
        if first.0 > next {
            return Err(StoreError::Corrupt(format!(
                "transfer {} would leave a gap after {}: the ledger in memory and the store \
                 differ; nothing was written",
                first.0,
                next.saturating_sub(1)
            )));
        }
        Ok(())
    }
}

fn decode_transfer(record: &[u8]) -> Option<Transfer> {
    let mut fields = Reader::new(record);
    if fields.byte()? != RECORD_VERSION {
        return None;
    }
    let id = TransferId(fields.u64()?);
    let debit = read_account(&mut fields)?;
    let credit = read_account(&mut fields)?;
    let nanos = fields.i128()?;
    let amount = Amount::try_from_nanos(nanos).ok()?;
    let posted_ms = fields.u64()?;
    let kind = match fields.byte()? {
        1 => TransferKind::Deposit,
        2 => TransferKind::Withdrawal,
        3 => TransferKind::Use {
            pid: Pid::parse(fields.text()?).ok()?,
            batch: BatchId::parse(fields.text()?).ok()?,
            uses: fields.u64()?,
        },
        4 => TransferKind::Correction {
            of: TransferId(fields.u64()?),
        },
        5 => TransferKind::Payment {
            pid: Pid::parse(fields.text()?).ok()?,
            reference: fields.text()?.to_owned(),
        },
        _ => return None,
    };
    fields.is_empty().then_some(Transfer {
        id,
        debit,
        credit,
        amount,
        kind,
        posted_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::NewTransfer;
    use crate::store::conformance::{Harness, batch, conformance_tests, customer, key};

    /// A sled store in a temporary folder of its own.
    struct SledHarness(tempfile::TempDir);

    impl SledHarness {
        fn new() -> Self {
            SledHarness(tempfile::tempdir().unwrap())
        }
    }

    impl Harness for SledHarness {
        type Store = SledStore;
        fn open(&self) -> SledStore {
            SledStore::open(self.0.path()).unwrap()
        }
        fn damage_an_itemised_record(&self, store: &SledStore) {
            let (key, record) = store.itemised.iter().next().unwrap().unwrap();
            let cut = sled::IVec::from(&record[..record.len() - 1]);
            store.itemised.insert(&key, cut).unwrap();
        }
    }

    conformance_tests!(SledHarness::new());

    /// A meter names payers of its own making by the thousand: none of
    /// them is kept in memory, only customers that exist.
    #[test]
    fn terms_are_kept_only_for_customers_that_exist() {
        let store = SledHarness::new().open();
        let ada = store
            .create_customer(&Bid::parse("B1").unwrap(), "Ada", "ada@example.org")
            .unwrap();
        let mut cids: Vec<Cid> = (1_000..11_000)
            .map(|n| Cid::parse(&format!("B1-C{n}")).unwrap())
            .collect();
        cids.push(ada.cid);
        let terms = store.customer_terms(&cids).unwrap();
        assert_eq!(terms.iter().filter(|terms| terms.is_none()).count(), 10_000);
        assert_eq!(terms.last(), Some(&Some(ada.terms())));
        let cached = store.cached_customer_terms();
        assert_eq!(cached.len(), 1);
        assert_eq!(cached.get(&ada.cid), Some(&ada.terms()));
    }

    /// A batch's period counts are one record of the log, folded into
    /// `period_uses` every few batches (the latest count of each period),
    /// on opening after a crash, and before an export.
    #[test]
    fn period_counts_are_logged_per_batch_and_folded_every_few_batches() {
        let harness = SledHarness::new();
        let store = harness.open();
        let period = |payer: u32| PeriodKey {
            payer: Cid::parse(&format!("B1-C{payer}")).unwrap(),
            pid: Pid::parse("B1-P1").unwrap(),
            month: 202_612,
        };
        let stored = |store: &SledStore, payer: u32| {
            store
                .period_uses
                .get(period(payer).bytes())
                .unwrap()
                .map(|bytes| u64::from_be_bytes(bytes.as_ref().try_into().unwrap()))
        };
        let stage = |store: &SledStore, n: u32| {
            // Payer 1 counts in every batch, payer 1000 + n in batch n only.
            let counts = [(period(1), u64::from(n)), (period(1_000 + n), 1)];
            store
                .apply_batch(&key(n), BatchEffects::counting(&counts))
                .unwrap();
        };
        for n in 1..=20 {
            stage(&store, n);
            assert_eq!(store.period_uses(&period(1)).unwrap(), u64::from(n));
            store.fold_logged().unwrap();
            let waiting = store.period_log.waiting();
            assert_eq!(waiting, n as usize % PERIOD_LOG_FOLD_AFTER, "batch {n}");
            assert_eq!(store.period_log_tree.len(), waiting);
            let folded_up_to = n - n % PERIOD_LOG_FOLD_AFTER as u32;
            assert_eq!(
                stored(&store, 1),
                (folded_up_to > 0).then_some(u64::from(folded_up_to)),
                "batch {n}: what the tree holds"
            );
            assert_eq!(store.period_uses(&period(1)).unwrap(), u64::from(n));
            assert_eq!(store.period_uses(&period(1_000 + n)).unwrap(), 1);
        }
        // Four batches logged and not folded when the power goes.
        assert_eq!(stored(&store, 1), Some(16));
        drop(store);
        let store = harness.open();
        assert_eq!(store.period_log_tree.len(), 0, "folded on opening");
        assert_eq!(store.period_log.waiting(), 0);
        assert_eq!(stored(&store, 1), Some(20));
        for n in 1..=20 {
            assert_eq!(store.period_uses(&period(1_000 + n)).unwrap(), 1);
        }
        assert_eq!(store.period_uses(&period(999)).unwrap(), 0);
        // Logged and not folded: an export has it all the same.
        stage(&store, 21);
        assert_eq!(store.period_log.waiting(), 1);
        let mut exported = Vec::new();
        store
            .export(&mut |chunk| {
                if let crate::store::moving::Chunk::PeriodUses(rows) = chunk {
                    exported.extend(rows);
                }
                Ok(())
            })
            .unwrap();
        assert!(exported.contains(&(period(1), 21)));
        assert!(exported.contains(&(period(1_021), 1)));
        assert_eq!(exported.len(), 22);
        assert_eq!(store.period_log_tree.len(), 0);
        // A clean stop leaves the log empty and the tree whole, but does not
        // wait for a backup holding the gate (the next start folds).
        stage(&store, 22);
        stage(&store, 23);
        assert_eq!(store.period_log_tree.len(), 2);
        let backup = store.gate.write();
        store.close().unwrap();
        assert_eq!(store.period_log_tree.len(), 2, "a backup runs: not folded");
        drop(backup);
        store.close().unwrap();
        assert_eq!(store.period_log_tree.len(), 0, "folded at the stop");
        assert_eq!(store.period_log.waiting(), 0);
        assert_eq!(stored(&store, 1), Some(23));
        assert_eq!(stored(&store, 1_023), Some(1));
    }

    #[test]
    fn a_second_open_of_the_same_folder_is_refused_while_the_first_holds_it() {
        let harness = SledHarness::new();
        let store = harness.open();
        assert!(matches!(
            SledStore::open(harness.0.path()),
            Err(StoreError::Locked(_))
        ));
        drop(store);
        harness.open();
    }

    #[test]
    fn records_round_trip_and_corruption_is_detected() {
        let mut ledger = Ledger::new();
        ledger.post(batch(1, 2, 5), 0).unwrap();
        let correction = NewTransfer {
            debit: customer(2),
            credit: customer(1),
            amount: Amount::from_nanos(5),
            kind: TransferKind::Correction { of: TransferId(1) },
        };
        ledger.post(vec![correction], 0).unwrap();
        for transfer in ledger.transfers() {
            let record = encode_transfer(transfer);
            assert_eq!(decode_transfer(&record).as_ref(), Some(transfer));
            for cut in 0..record.len() {
                assert_eq!(decode_transfer(&record[..cut]), None);
            }
        }
    }

    /// Every change the store acknowledged is in what a power cut leaves
    /// right after it (the image holds each file as of its last fsync),
    /// including a TACA module far above sled's blob threshold, which sled
    /// writes to a file of its own and never fsyncs. A step that answered
    /// before its fsync fails here; a SIGKILL test cannot tell.
    #[test]
    fn every_step_the_store_acknowledged_survives_a_power_cut_right_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (data, image, cut) = (
            dir.path().join("data"),
            dir.path().join("image"),
            dir.path().join("cut"),
        );
        let after_power_cut = || {
            durable::copy_image(&image, &cut).unwrap();
            SledStore::open(&cut).unwrap()
        };
        let bid = Bid::parse("B1").unwrap();
        let store = SledStore::open(&data).unwrap();
        store.keep_image_in(&image);
        let ada = store
            .create_customer(&bid, "Ada", "ada@example.org")
            .unwrap();
        assert_eq!(
            after_power_cut().customer(&ada.cid).unwrap(),
            Some(ada.clone())
        );
        let denied = Customer {
            denied: true,
            ..ada.clone()
        };
        store
            .change_customer(&denied.cid, &|customer| customer.denied = true)
            .unwrap();
        assert_eq!(after_power_cut().customer(&ada.cid).unwrap(), Some(denied));
        let big_module: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
        let product = store
            .create_product(
                &bid,
                NewProduct {
                    owner: &ada.cid,
                    name: "Big",
                    description: "",
                    terms: "1 per use",
                    taca: &big_module,
                    max_price: Amount::parse("1").unwrap(),
                },
            )
            .unwrap();
        assert!(
            std::fs::read_dir(data.join("blobs")).unwrap().count() > 0,
            "the module goes to a blob file (else this test shows less than it says)"
        );
        let restored = after_power_cut();
        assert_eq!(
            restored.product(&product.pid).unwrap(),
            Some(product.clone())
        );
        assert_eq!(
            restored.taca_module(&product.taca).unwrap(),
            Some(big_module.clone())
        );
        drop(restored);
        let small = store
            .create_product(
                &bid,
                NewProduct {
                    owner: &ada.cid,
                    name: "Small",
                    description: "",
                    terms: "1 per use",
                    taca: b"\0asm small",
                    max_price: Amount::parse("1").unwrap(),
                },
            )
            .unwrap();
        let declared = store
            .set_components(&product.pid, None, std::slice::from_ref(&small.pid))
            .unwrap();
        assert_eq!(
            after_power_cut().product(&product.pid).unwrap(),
            Some(declared)
        );
        let meter = store.create_meter(&bid, &ada.cid).unwrap();
        assert_eq!(
            after_power_cut().meter(&meter.mid).unwrap(),
            Some(meter.clone())
        );
        let grant = store
            .create_grant(NewGrant {
                mid: meter.mid,
                cid: ada.cid,
                scope: proto::grant::Scope::Machine,
                label: "laptop".into(),
                created_ms: 1_000,
                expires_ms: None,
            })
            .unwrap();
        assert_eq!(
            after_power_cut().grants_of_meter(&meter.mid).unwrap(),
            vec![grant.clone()]
        );
        store.revoke_grant(grant.id, None, 2_000).unwrap();
        let revoked = after_power_cut().grants_of_meter(&meter.mid).unwrap();
        assert_eq!(revoked[0].revoked_ms, Some(2_000));
        // A meter's new secret and its revocation are durable once answered.
        let rotated = store
            .rotate_meter_secret(&meter.mid, Actor::Operator, 2_500, 1_000)
            .unwrap();
        assert_eq!(
            after_power_cut().meter(&meter.mid).unwrap(),
            Some(rotated.clone())
        );
        let revoked_meter = store
            .revoke_meter(&meter.mid, Actor::Owner(ada.cid), 2_600)
            .unwrap();
        assert_eq!(
            after_power_cut().meter(&meter.mid).unwrap(),
            Some(revoked_meter)
        );
        let mut ledger = Ledger::new();
        let first = ledger.post(batch(1, 2, 100), 0).unwrap();
        let posted = ledger.transfers()[usize::try_from(first.0).unwrap()..].to_vec();
        let held = Suspense {
            mid: meter.mid,
            batch: key(1).id,
            seq: 3,
            pid: product.pid,
            payer: Some(ada.cid.to_string()),
            time_ms: 5,
            reason: "test".into(),
            authorized: true,
            arrived_ms: 6,
        };
        let period = PeriodKey {
            payer: ada.cid,
            pid: product.pid,
            month: 202_612,
        };
        store
            .apply_batch(
                &key(1),
                BatchEffects {
                    transfers: &posted,
                    period_uses: &[(period, 7)],
                    free_uses: &[(period, 2)],
                    suspense: std::slice::from_ref(&held),
                    answer: b"",
                    digest: Some([7; 32]),
                    seq_range: None,
                },
            )
            .unwrap();
        let restored = after_power_cut();
        assert_eq!(
            restored.load_ledger().unwrap().transfers(),
            ledger.transfers()
        );
        assert_eq!(restored.period_uses(&period).unwrap(), 7);
        assert_eq!(
            restored.free_uses(&ada.cid, 202_612).unwrap(),
            vec![(product.pid, 2)]
        );
        assert_eq!(restored.free_uses(&ada.cid, 202_611).unwrap(), vec![]);
        assert_eq!(restored.suspense().unwrap(), vec![held.clone()]);
        assert!(restored.applied_batch(&key(1)).unwrap().is_some());
        drop(restored);
        let deposit = ledger
            .post(
                vec![NewTransfer {
                    debit: AccountId::System(SystemAccount::Funding),
                    credit: customer(1),
                    amount: Amount::from_nanos(5),
                    kind: TransferKind::Deposit,
                }],
                0,
            )
            .unwrap();
        let deposited = ledger.transfers()[usize::try_from(deposit.0).unwrap()..].to_vec();
        store.post_transfers(&deposited).unwrap();
        assert_eq!(
            after_power_cut().load_ledger().unwrap().transfers(),
            ledger.transfers()
        );
        store
            .resolve_suspense(std::slice::from_ref(&held), &[], &[(period, 8)])
            .unwrap();
        let restored = after_power_cut();
        assert_eq!(restored.suspense().unwrap(), Vec::new());
        assert_eq!(restored.period_uses(&period).unwrap(), 8);
        drop(restored);
        // A deposit's three steps, each durable before it is answered.
        use crate::funding::{DepositRecord, DepositState, Reference};
        let reference = Reference::parse("invoice-7").unwrap();
        let intent = DepositRecord {
            cid: ada.cid,
            amount: Amount::from_nanos(5),
            created_ms: 1,
            state: DepositState::Collecting,
        };
        store.begin_deposit(&reference, &intent).unwrap();
        assert_eq!(after_power_cut().deposit(&reference).unwrap(), Some(intent));
        let collected = store.deposit_collected(&reference, "processor-1").unwrap();
        assert_eq!(
            after_power_cut().deposit(&reference).unwrap(),
            Some(collected)
        );
        let next = ledger
            .prepare(
                vec![NewTransfer {
                    debit: AccountId::System(SystemAccount::Funding),
                    credit: AccountId::Customer(ada.cid),
                    amount: Amount::from_nanos(5),
                    kind: TransferKind::Deposit,
                }],
                0,
            )
            .unwrap();
        let posted = store.post_deposit(&reference, &next[0]).unwrap();
        ledger.commit(next);
        let restored = after_power_cut();
        assert_eq!(restored.deposit(&reference).unwrap(), Some(posted));
        assert_eq!(
            restored.load_ledger().unwrap().transfers(),
            ledger.transfers()
        );
    }

    #[test]
    fn batches_stored_before_digests_read_back_without_one() {
        let old = decode_applied(b"<?xml version=\"1.0\"?><methodResponse/>");
        assert_eq!(old.digest, None);
        let new = decode_applied(&encode_applied(b"<answer/>", Some(&[9; 32])));
        assert_eq!(new.digest, Some([9; 32]));
        assert_eq!(new.answer, b"<answer/>");
    }
}
