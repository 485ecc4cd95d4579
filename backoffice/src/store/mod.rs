//! The backoffice's durable store.
//!
//! `Store` is the interface every store implements, and nothing outside this
//! folder knows which one runs: `SledStore` (`sled.rs`) is the embedded
//! default, one process on one disk. A store keeps the registry (customers,
//! products with their TACA modules, meters, grants), every posted transfer,
//! every applied upload batch with the digest of its readings and the
//! sequence numbers it spanned (so that a batch sent again is applied once,
//! and one with other readings refused), suspense, period counts and
//! deposits. `conformance.rs` is the suite every store must pass.

#[cfg(test)]
pub(crate) mod conformance;
pub(crate) mod holds;
pub mod moving;
pub(crate) mod payments;
pub mod postgres;
mod sled;

pub use self::postgres::PgStore;
pub use self::sled::backup;
#[cfg(test)]
pub(crate) use self::sled::encode_transfer_for_tests;
pub use self::sled::{LOCK_WAIT_MS, METER_GRANTS_CACHED_MAX, SLED_CACHE_BYTES, SledStore};

use proto::record::put_str;
use proto::{Amount, BatchId, Bid, Cid, Mid, Pid};

use crate::funding::{DepositRecord, Reference};
use crate::ledger::{Ledger, Transfer, TransferId};
use crate::pricing::TacaHash;
use crate::registry::{
    Actor, Customer, Grant, Meter, MeterGrants, NewGrant, Product, Registration, RegistryError,
};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another backoffice holds the store.
    #[error("another backoffice is already using {0}")]
    Locked(String),
    /// sled failed (disk full, I/O error).
    #[error("storage failed: {0}")]
    Storage(#[from] ::sled::Error),
    /// Making the data durable failed.
    #[error("could not make the store durable: {0}")]
    Sync(#[from] std::io::Error),
    /// A new record was refused.
    #[error("{0}")]
    Registry(#[from] RegistryError),
    /// The batch was applied already (by a concurrent call).
    #[error("batch {0} was applied already")]
    AlreadyApplied(String),
    /// A stored record is not what it should be (corrupt, or out of step).
    #[error("the store is inconsistent: {0}")]
    Corrupt(String),
    /// The database failed or could not be reached (PostgreSQL).
    #[error("the database failed: {0}")]
    Database(String),
    /// Itemised records are kept already under the key a write would give
    /// its own: they are never overwritten, and nothing was written.
    #[error("{0}")]
    ItemisedTaken(String),
    /// The database aborted the transaction for a conflict with another
    /// (a serialization failure or a deadlock): nothing was changed, and
    /// the same call may be made again.
    #[error(
        "the database aborted the change for a conflict with another; nothing was changed: {0}"
    )]
    Conflict(String),
    /// The data folder's branch is kept in another store than the one asked.
    #[error("{0}")]
    WrongStore(String),
    /// The store could not be reached, and nothing was sent to it (no
    /// connection free or to be made in time).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The database's schema is not one this backoffice can use.
    #[error("the database's schema: {0}")]
    Schema(String),
}

/// An upload batch, named by its meter and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// The meter that sent it.
    pub mid: Mid,
    /// The meter's id for it.
    pub id: BatchId,
}

impl BatchKey {
    fn bytes(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(96);
        put_str(&mut key, self.mid.as_str());
        put_str(&mut key, self.id.as_str());
        key
    }
}

/// The billing period a use counts in: a payer, a product, a calendar month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeriodKey {
    /// Who paid.
    pub payer: Cid,
    /// For which product.
    pub pid: Pid,
    /// The month, as `YYYYMM` (UTC).
    pub month: u32,
}

impl PeriodKey {
    fn bytes(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(72);
        put_str(&mut key, self.payer.as_str());
        put_str(&mut key, self.pid.as_str());
        key.extend_from_slice(&self.month.to_be_bytes());
        key
    }
}

/// A reading that could not be priced, kept for operators to see and re-price.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Suspense {
    /// The meter that sent it.
    pub mid: Mid,
    /// The batch that carried it.
    pub batch: BatchId,
    /// Its sequence number in the meter (its position, in Cox's minimal form).
    pub seq: u64,
    /// The product.
    pub pid: Pid,
    /// The payer as the meter designated it, if any.
    pub payer: Option<String>,
    /// When it was used, ms since the Unix epoch.
    pub time_ms: u64,
    /// Why it was not priced.
    pub reason: String,
    /// Its payer could be charged when the batch was applied (a live
    /// grant, or a component inside an authorized use): re-pricing charges
    /// a component's use only when this holds, since the batch that showed
    /// the chain of enclosing uses is not kept.
    #[serde(default)]
    pub authorized: bool,
    /// When its batch arrived, ms since the Unix epoch (0: before this was
    /// kept): a grant made later never charges it.
    #[serde(default)]
    pub arrived_ms: u64,
}

/// Where a page of suspense starts: after the reading with this meter,
/// batch and sequence number. Its text form is `MID BATCH SEQ`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuspenseCursor {
    /// The meter.
    pub mid: Mid,
    /// The batch.
    pub batch: BatchId,
    /// The sequence number.
    pub seq: u64,
}

impl SuspenseCursor {
    /// The cursor of a reading in suspense.
    pub fn of(record: &Suspense) -> SuspenseCursor {
        SuspenseCursor {
            mid: record.mid,
            batch: record.batch.clone(),
            seq: record.seq,
        }
    }

    /// Reads `MID BATCH SEQ`.
    pub fn parse(text: &str) -> Option<SuspenseCursor> {
        let mut parts = text.split_whitespace();
        let cursor = SuspenseCursor {
            mid: Mid::parse(parts.next()?).ok()?,
            batch: BatchId::parse(parts.next()?).ok()?,
            seq: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(cursor)
    }
}

impl std::fmt::Display for SuspenseCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.mid, self.batch, self.seq)
    }
}

/// Everything one applied batch changes, written in one transaction.
#[derive(Debug, Clone, Copy)]
pub struct BatchEffects<'a> {
    /// Transfers already posted to the in-memory ledger.
    pub transfers: &'a [Transfer],
    /// New totals of uses per billing period.
    pub period_uses: &'a [(PeriodKey, u64)],
    /// Uses that moved no money, per billing period: added to the counts
    /// kept for statements (`free_uses`).
    pub free_uses: &'a [(PeriodKey, u64)],
    /// Readings that could not be priced.
    pub suspense: &'a [Suspense],
    /// An answer to keep with the batch; `send` keeps none (empty): it
    /// answers a repeat from the current state, so an applied batch costs
    /// only its key and digest.
    pub answer: &'a [u8],
    /// The digest of the batch's readings, so that the same id sent again
    /// with other readings is told apart from a retry.
    pub digest: Option<BatchDigest>,
    /// The sequence numbers the batch's readings span in their meter
    /// instance, so that no other batch id can bring them again.
    pub seq_range: Option<&'a SeqRange>,
}

#[cfg(test)]
impl<'a> BatchEffects<'a> {
    /// A batch that only counts uses in `period_uses` (tests).
    pub(crate) fn counting(period_uses: &'a [(PeriodKey, u64)]) -> Self {
        BatchEffects {
            transfers: &[],
            period_uses,
            free_uses: &[],
            suspense: &[],
            answer: b"",
            digest: None,
            seq_range: None,
        }
    }
}

/// The sequence numbers a batch's readings span, within one instance of a
/// meter (the part of the batch id before its last `:`, as our meter
/// writes it: `INSTANCE:FIRST_SEQ`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqRange {
    /// The meter.
    pub mid: Mid,
    /// The meter's instance, from the batch id.
    pub instance: String,
    /// The lowest sequence number in the batch.
    pub first: u64,
    /// The highest.
    pub last: u64,
}

impl SeqRange {
    fn prefix(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(64);
        put_str(&mut key, self.mid.as_str());
        put_str(&mut key, &self.instance);
        key
    }

    fn key(&self) -> Vec<u8> {
        let mut key = self.prefix();
        key.extend_from_slice(&self.first.to_be_bytes());
        key
    }
}

/// SHA-256 of a batch's readings in a canonical form (see `send`).
pub type BatchDigest = [u8; 32];

/// An applied batch as stored: the answer kept with it (none since grants:
/// repeats are answered from the current state) and the digest of
/// its readings (`None` for batches stored before digests were kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedBatch {
    /// The digest of the readings applied.
    pub digest: Option<BatchDigest>,
    /// The answer given.
    pub answer: Vec<u8>,
}

/// Where a set of itemised records is: the batch they are of and when
/// they were written (the batch's arrival, or a re-pricing's time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItemisedAt {
    /// The batch.
    pub key: BatchKey,
    /// When the records were written, ms since the Unix epoch.
    pub arrived_ms: u64,
}

/// A re-pricing's itemised records of one batch's uses that were in
/// suspense, and the transfers their priced uses were summed into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepricedItems {
    /// The batch the uses came in.
    pub key: BatchKey,
    /// The transfers the re-pricing posted for them.
    pub transfers: Vec<TransferId>,
    /// `itemised::Encoder::repriced`'s records.
    pub records: Vec<Vec<u8>>,
}

/// Itemised records already kept under the key a write would use: they
/// are never overwritten.
pub(crate) fn itemised_taken(key: &BatchKey, arrived_ms: u64) -> StoreError {
    StoreError::ItemisedTaken(format!(
        "itemised records of batch {} of {} written at {arrived_ms} exist already; \
         records are never overwritten: nothing was changed",
        key.id, key.mid
    ))
}

/// A customer's credit limit and whether an operator denied them.
pub type CustomerTerms = (proto::Amount, bool);

/// What the backoffice keeps durably.
pub trait Store {
    /// Every transfer posted, in order, as a ledger.
    fn load_ledger(&self) -> Result<Ledger, StoreError>;

    /// Whether other nodes write this store too (PostgreSQL): the ledger
    /// in a node's memory is then brought up to the store's
    /// (`transfers_from`) before it is read, and money is written only
    /// under `hold_ledger`.
    fn shared(&self) -> bool {
        false
    }

    /// Where grant codes wait for customers' decisions: in the node's
    /// memory where one process owns the store, in the store where nodes
    /// share it.
    fn device_codes(&self) -> crate::grants::DeviceCodes {
        crate::grants::DeviceCodes::default()
    }

    /// Takes the store's ledger lock for one money write (numbering
    /// transfers, checking standings, writing a batch), until the hold is
    /// dropped: nodes sharing the store take turns. Nothing to take where
    /// one process owns the store.
    fn hold_ledger(&self) -> Result<LedgerHold<'_>, StoreError> {
        Ok(LedgerHold::none())
    }

    /// Folds what the store wrote behind its indexes once enough has
    /// piled up (sled: the period counts of the last batches, see
    /// `sled::periods`). Called after a batch, outside the ledger's lock.
    fn fold_logged(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// At a clean stop, after the server has stopped: folds what the store
    /// wrote behind its indexes (unless a backup holds the store, which a
    /// stop does not wait for) and makes everything durable. What a late
    /// writer logs after this is folded at the next start, as after a crash.
    fn close(&self) -> Result<(), StoreError> {
        self.sync()
    }

    /// Whether, as far as the store can tell now, nobody else wrote money
    /// since this node's last write, so that what the node keeps in memory
    /// (period counts) is the store's. A hint for work done before the
    /// ledger lock, checked again under it (`LedgerHold::others_wrote`);
    /// always true where one process owns the store.
    fn unchanged_since_own_write(&self) -> bool {
        true
    }

    /// The transfers numbered `from` on, in order: what other nodes posted
    /// since this node's ledger last caught up. Empty where one process
    /// owns the store.
    fn transfers_from(&self, from: u64) -> Result<Vec<Transfer>, StoreError> {
        let _ = from;
        Ok(Vec::new())
    }
    /// Checks every record and index the store keeps, reporting (never
    /// panicking on) what is wrong; returns the transfers it read, for a
    /// running branch to compare with its ledger in memory.
    fn verify(&self) -> (crate::verify::Report, Vec<Transfer>);
    /// Records a batch's effects and the batch with its answer, atomically
    /// and durably; `AlreadyApplied` if the batch was applied before.
    fn apply_batch(&self, key: &BatchKey, effects: BatchEffects<'_>) -> Result<(), StoreError> {
        self.stage_batch(key, effects)?;
        self.sync()
    }
    /// Records a batch as `apply_batch` does, atomically and visibly to later
    /// reads, but durable only once a `sync` that starts after it returns.
    fn stage_batch(&self, key: &BatchKey, effects: BatchEffects<'_>) -> Result<(), StoreError>;
    /// Makes every write made before it durable (one fsync for all of them).
    fn sync(&self) -> Result<(), StoreError>;
    /// Stages a batch as `stage_batch` does, with its itemised readings
    /// (`itemised::Encoder`'s records, the batch applied at `arrived_ms`)
    /// in the same transaction: one is never kept without the other.
    fn stage_batch_itemised(
        &self,
        key: &BatchKey,
        effects: BatchEffects<'_>,
        arrived_ms: u64,
        itemised: &[Vec<u8>],
    ) -> Result<(), StoreError>;
    /// The itemised records of an applied batch, in order (`None`: none
    /// kept: applied before they were, or pruned after the retention).
    fn itemised_batch(
        &self,
        key: &BatchKey,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError>;
    /// Where the itemised records that hold the uses summed into transfer
    /// `id` are (its batch's, or a re-pricing's), if they are kept.
    fn itemised_batch_of_transfer(&self, id: TransferId) -> Result<Option<ItemisedAt>, StoreError>;
    /// The itemised records written for `at.key` at `at.arrived_ms`, in
    /// order (`None`: none kept).
    fn itemised_records_at(
        &self,
        at: &ItemisedAt,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError>;
    /// Resolves suspense as `resolve_suspense` does, with the itemised
    /// records of the uses priced (`sets`, one per batch, written at
    /// `arrived_ms`) in the same transaction.
    fn resolve_suspense_itemised(
        &self,
        resolved: &[Suspense],
        transfers: &[Transfer],
        period_uses: &[(PeriodKey, u64)],
        free_uses: &[(PeriodKey, u64)],
        arrived_ms: u64,
        sets: &[RepricedItems],
    ) -> Result<(), StoreError>;
    /// Deletes at most `records_max` itemised records of batches applied
    /// before `before_ms`, oldest first; returns how many it deleted.
    fn prune_itemised(&self, before_ms: u64, records_max: usize) -> Result<usize, StoreError>;
    /// Records transfers made outside uploads (deposits, withdrawals,
    /// corrections), atomically and durably.
    fn post_transfers(&self, transfers: &[Transfer]) -> Result<(), StoreError> {
        self.stage_transfers(transfers)?;
        self.sync()
    }
    /// The hold events numbered `from` on, in order (`holds::HoldBook`).
    fn hold_events_from(&self, from: u64) -> Result<Vec<crate::holds::HoldEvent>, StoreError>;
    /// Records hold events and the transfers their captures post, all or
    /// nothing, as `stage_transfers` does (durable after a `sync` that
    /// starts after it). An event whose number is kept already is refused,
    /// with nothing written: events are never overwritten.
    ///
    /// With `request`, a service's payment request that caused them is
    /// written in the same step; a reference code the service used already
    /// is refused, with nothing written.
    fn stage_holds(
        &self,
        events: &[crate::holds::HoldEvent],
        transfers: &[Transfer],
        request: Option<&crate::payments::PaymentRequest>,
    ) -> Result<(), StoreError>;
    /// The request `service` made under `reference`, if it changed
    /// anything (`payments::PaymentRequest`).
    fn payment_request(
        &self,
        service: &Pid,
        reference: &str,
    ) -> Result<Option<crate::payments::PaymentRequest>, StoreError>;
    /// Every payment request kept, for verify and moving a branch.
    fn payment_requests(&self) -> Result<Vec<crate::payments::PaymentRequest>, StoreError>;
    /// The service and reference code of the request that gave
    /// `reference` as evidence, if one did.
    fn evidence_used(&self, reference: &str) -> Result<Option<(Pid, String)>, StoreError>;
    /// Claims a WS-Security nonce (`digest`: SHA-256 of the user name, a
    /// zero byte and the nonce) until `expires_ms`: true when no claim of
    /// it is live at `now_ms` (and it is now this one's), false when one
    /// is (a replay). Shared by every node of the branch and kept across
    /// restarts; not synced, since a claim lost to a power cut is one the
    /// token's window has mostly run out on by the time the branch is back.
    fn claim_nonce(
        &self,
        digest: &[u8; 32],
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError>;
    /// Records transfers as `post_transfers` does, atomically and visibly
    /// to later reads, but durable only once a `sync` that starts after it
    /// returns (so that the caller can sync after letting go of its locks).
    fn stage_transfers(&self, transfers: &[Transfer]) -> Result<(), StoreError>;
    /// Uses counted so far in a billing period.
    fn period_uses(&self, key: &PeriodKey) -> Result<u64, StoreError>;
    /// Uses counted so far in each of `keys`' billing periods, in order:
    /// one round trip where the store has them (a batch reads up to one per
    /// payer and product).
    fn period_uses_many(&self, keys: &[PeriodKey]) -> Result<Vec<u64>, StoreError> {
        keys.iter().map(|key| self.period_uses(key)).collect()
    }
    /// How many of `payer`'s uses made in `month` (`YYYYMM`) moved no money,
    /// per product (priced at zero, of their own product, or of a test PID),
    /// in PID order.
    fn free_uses(&self, payer: &Cid, month: u32) -> Result<Vec<(Pid, u64)>, StoreError>;
    /// Every reading in suspense.
    fn suspense(&self) -> Result<Vec<Suspense>, StoreError>;
    /// At most `limit` readings in suspense in the store's order (meter,
    /// batch, sequence number), starting after the reading `after` names.
    fn suspense_page(
        &self,
        after: Option<&SuspenseCursor>,
        limit: usize,
    ) -> Result<Vec<Suspense>, StoreError>;
    /// How many readings are in suspense.
    fn suspense_count(&self) -> Result<usize, StoreError>;
    /// Takes re-priced readings out of suspense and records their transfers
    /// and period counts, atomically and durably.
    fn resolve_suspense(
        &self,
        resolved: &[Suspense],
        transfers: &[Transfer],
        period_uses: &[(PeriodKey, u64)],
    ) -> Result<(), StoreError>;
    /// A range of sequence numbers of the same meter instance, applied in an
    /// earlier batch, that `range` overlaps, if any.
    fn overlapping_range(&self, range: &SeqRange) -> Result<Option<(u64, u64)>, StoreError>;
    /// The answer given to an applied batch and its digest, if it was
    /// applied.
    fn applied_batch(&self, key: &BatchKey) -> Result<Option<AppliedBatch>, StoreError>;
    /// Registers a customer under a new CID of branch `bid`.
    fn create_customer(&self, bid: &Bid, name: &str, email: &str) -> Result<Customer, StoreError>;
    /// Registers a customer from the registration form under a new CID;
    /// the e-mail address must be new.
    fn register_customer(
        &self,
        bid: &Bid,
        registration: Registration,
    ) -> Result<Customer, StoreError>;
    /// A customer by CID.
    fn customer(&self, cid: &Cid) -> Result<Option<Customer>, StoreError>;
    /// Customers by CID, in the order asked (`None`: no such customer), in
    /// one round trip where the store has them.
    fn customers(&self, cids: &[Cid]) -> Result<Vec<Option<Customer>>, StoreError> {
        cids.iter().map(|cid| self.customer(cid)).collect()
    }
    /// Each customer's credit limit and deny flag, in the order asked
    /// (`None`: no such customer): what every batch reads of its payers.
    fn customer_terms(&self, cids: &[Cid]) -> Result<Vec<Option<CustomerTerms>>, StoreError> {
        Ok(self
            .customers(cids)?
            .into_iter()
            .map(|customer| customer.as_ref().map(Customer::terms))
            .collect())
    }
    /// A customer by e-mail address (any case).
    fn customer_by_email(&self, email: &str) -> Result<Option<Customer>, StoreError>;
    /// A customer by the telephone number they registered, in the stored
    /// form (`registry::phone_number`).
    fn customer_by_phone(&self, phone: &str) -> Result<Option<Customer>, StoreError>;
    /// Changes the customer `cid` as `change` says, applied to the record
    /// as stored at that moment, atomically (a concurrent change of
    /// another field is never undone: `change` may run again on the newer
    /// record), and durably; answers the record as saved. A changed e-mail
    /// address must be new. The CID cannot change.
    fn change_customer(
        &self,
        cid: &Cid,
        change: &dyn Fn(&mut Customer),
    ) -> Result<Customer, StoreError>;
    /// Registers a product of `owner` under a new PID, with its TACA module
    /// and the most one use may cost.
    fn create_product(&self, bid: &Bid, new: NewProduct<'_>) -> Result<Product, StoreError>;
    /// A product by its PID or its test PID.
    fn product(&self, pid: &Pid) -> Result<Option<Product>, StoreError>;
    /// Declares the components product `pid` uses inside (replacing the
    /// ones declared before): only their uses inside its uses are charged
    /// to its owner. Each must be another registered product's PID; when
    /// `owner` is given, `pid` must be theirs (`UnknownProduct` otherwise).
    fn set_components(
        &self,
        pid: &Pid,
        owner: Option<&Cid>,
        components: &[Pid],
    ) -> Result<Product, StoreError>;
    /// A TACA module by its hash.
    fn taca_module(&self, hash: &TacaHash) -> Result<Option<Vec<u8>>, StoreError>;
    /// Registers a meter of `owner` under a new MID with a new secret.
    fn create_meter(&self, bid: &Bid, owner: &Cid) -> Result<Meter, StoreError> {
        self.create_meter_for(bid, owner, None)
    }
    /// As `create_meter`; with `service`, the credential of that product's
    /// service (whose owner the caller checked is `owner`).
    fn create_meter_for(
        &self,
        bid: &Bid,
        owner: &Cid,
        service: Option<&Pid>,
    ) -> Result<Meter, StoreError>;
    /// A meter by MID.
    fn meter(&self, mid: &Mid) -> Result<Option<Meter>, StoreError>;
    /// The products `owner` registered, in PID order.
    fn products_of(&self, owner: &Cid) -> Result<Vec<Product>, StoreError>;
    /// The meters `owner` registered, in MID order.
    fn meters_of(&self, owner: &Cid) -> Result<Vec<Meter>, StoreError>;
    /// Gives meter `mid` a new secret at `at_ms`, durably, and answers
    /// the record. The secret before it still verifies until `at_ms +
    /// grace_ms` (at most `registry::ROTATION_GRACE_MS_MAX`), or until
    /// an upload signed with the new one (`retire_previous_secret`); a
    /// secret older than that verifies no more. `Actor::Owner` may rotate
    /// only a meter of theirs (`UnknownMeter` otherwise); a revoked meter
    /// is refused (`MeterRevoked`).
    fn rotate_meter_secret(
        &self,
        mid: &Mid,
        by: Actor,
        at_ms: u64,
        grace_ms: u64,
    ) -> Result<Meter, StoreError>;
    /// Revokes meter `mid` at `at_ms`, for good, durably, and answers the
    /// record: no secret of it verifies any more. `Actor::Owner` may revoke
    /// only a meter of theirs (`UnknownMeter` otherwise). Revoking a
    /// revoked meter changes nothing and answers it.
    fn revoke_meter(&self, mid: &Mid, by: Actor, at_ms: u64) -> Result<Meter, StoreError>;
    /// Ends the grace of meter `mid`'s previous secret, once an upload
    /// verified with `current_hex` while it is still the current one. Not
    /// synced: lost to a power cut, the grace merely runs its time.
    fn retire_previous_secret(&self, mid: &Mid, current_hex: &str) -> Result<(), StoreError>;
    /// Records a grant the customer approved, under a new number.
    fn create_grant(&self, grant: NewGrant) -> Result<Grant, StoreError>;
    /// Every grant given to the meter `mid`, live or not, oldest first.
    fn grants_of_meter(&self, mid: &Mid) -> Result<Vec<Grant>, StoreError>;
    /// The same, indexed by customer and shared: what each batch reads
    /// (a store may keep it between batches).
    fn meter_grants(&self, mid: &Mid) -> Result<std::sync::Arc<MeterGrants>, StoreError> {
        Ok(std::sync::Arc::new(MeterGrants::new(
            self.grants_of_meter(mid)?,
        )))
    }
    /// Every grant the customer `cid` gave, live or not, oldest first.
    fn grants_of_customer(&self, cid: &Cid) -> Result<Vec<Grant>, StoreError>;
    /// Revokes grant `id` at `at_ms` (kept, marked revoked); when `payer` is
    /// given, only a grant of that customer (`UnknownGrant` otherwise).
    /// Revoking a revoked grant changes nothing and answers it.
    fn revoke_grant(&self, id: u64, payer: Option<&Cid>, at_ms: u64) -> Result<Grant, StoreError>;
    /// The deposit recorded under `reference`, if any.
    fn deposit(&self, reference: &Reference) -> Result<Option<DepositRecord>, StoreError>;
    /// Records `intent` (a deposit about to be collected) under
    /// `reference`, durably, unless a deposit is recorded under it already;
    /// answers the record stored and whether it is new.
    fn begin_deposit(
        &self,
        reference: &Reference,
        intent: &DepositRecord,
    ) -> Result<(DepositRecord, bool), StoreError>;
    /// Records, durably, that the processor collected the deposit under
    /// `reference` (a deposit past that step is left as it is).
    fn deposit_collected(
        &self,
        reference: &Reference,
        processor: &str,
    ) -> Result<DepositRecord, StoreError>;
    /// Stores the collected deposit's `transfer` and marks it posted, in one
    /// transaction, durably; a deposit posted already is left as it is (the
    /// record answered names its transfer).
    fn post_deposit(
        &self,
        reference: &Reference,
        transfer: &Transfer,
    ) -> Result<DepositRecord, StoreError> {
        let record = self.stage_deposit(reference, transfer)?;
        self.sync()?;
        Ok(record)
    }
    /// Does what `post_deposit` does, durable only once a `sync` that
    /// starts after it returns.
    fn stage_deposit(
        &self,
        reference: &Reference,
        transfer: &Transfer,
    ) -> Result<DepositRecord, StoreError>;
}

/// A new product's fields.
#[derive(Debug, Clone, Copy)]
pub struct NewProduct<'a> {
    /// Who is credited for its uses.
    pub owner: &'a Cid,
    /// Its name.
    pub name: &'a str,
    /// What it is (may be empty).
    pub description: &'a str,
    /// The terms shown to customers.
    pub terms: &'a str,
    /// The TACA module.
    pub taca: &'a [u8],
    /// The most one use may cost; more than 0.
    pub max_price: Amount,
}

impl<'a> NewProduct<'a> {
    /// A product without a description.
    pub fn new(
        owner: &'a Cid,
        name: &'a str,
        terms: &'a str,
        taca: &'a [u8],
        max_price: Amount,
    ) -> Self {
        NewProduct {
            owner,
            name,
            description: "",
            terms,
            taca,
            max_price,
        }
    }
}

/// The file in a data folder that names the PostgreSQL database its branch
/// is kept in (absent: the branch is in the folder itself).
pub const STORE_MARKER: &str = "store-location";

/// The store a branch runs on, chosen at start (`backoffice serve --store`):
/// the embedded sled store in the data folder, or PostgreSQL. The rest of
/// the backoffice sees only `Store`.
pub enum AnyStore {
    /// The embedded default (each boxed: they differ in size, and a branch
    /// has one store for its whole run).
    Sled(Box<SledStore>),
    /// A PostgreSQL database.
    Postgres(Box<PgStore>),
}

/// A node's hold of a store's ledger lock (`Store::hold_ledger`),
/// released when dropped.
#[must_use = "the ledger lock is released when the hold is dropped"]
pub struct LedgerHold<'a> {
    store: Option<&'a PgStore>,
    others_wrote: bool,
}

impl<'a> LedgerHold<'a> {
    /// No lock to take: one process owns the store.
    pub(crate) fn none() -> LedgerHold<'a> {
        LedgerHold {
            store: None,
            others_wrote: false,
        }
    }

    /// The hold of `store`'s lock, just taken; `others_wrote` when money
    /// may have been written by another writer since this node's last
    /// write.
    pub(crate) fn of(store: &'a PgStore, others_wrote: bool) -> LedgerHold<'a> {
        LedgerHold {
            store: Some(store),
            others_wrote,
        }
    }

    /// Whether what this node keeps of the ledger (its transfers, period
    /// counts) must be read again from the store: another node, or a
    /// write whose outcome this node does not know, may have changed it.
    pub fn others_wrote(&self) -> bool {
        self.others_wrote
    }
}

impl Drop for LedgerHold<'_> {
    fn drop(&mut self) {
        if let Some(store) = self.store {
            store.release_ledger();
        }
    }
}

impl AnyStore {
    /// Starts a backup of the embedded store into `dest` (see
    /// [`backup`]); a branch kept in PostgreSQL is backed up with
    /// PostgreSQL's own tools.
    pub fn start_backup(
        &self,
        dest: &std::path::Path,
    ) -> Result<std::sync::Arc<backup::BackupJob>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.start_backup(dest),
            AnyStore::Postgres(_) => Err(StoreError::WrongStore(
                "this branch is kept in PostgreSQL: back it up with PostgreSQL's own tools \
                 (pg_basebackup with WAL archiving, or pg_dump); see docs/postgres.md"
                    .into(),
            )),
        }
    }

    /// Where the web pages keep visits, failed logins and reset links: in
    /// memory for a branch one process owns, in the database where nodes
    /// share it.
    pub fn web_sessions(&self) -> crate::web::session::Sessions {
        match self {
            AnyStore::Sled(_) => crate::web::session::Sessions::default(),
            AnyStore::Postgres(store) => {
                crate::web::session::Sessions::shared(store.web_sessions())
            }
        }
    }

    /// The last backup started, if any.
    pub fn backup_job(&self) -> Option<std::sync::Arc<backup::BackupJob>> {
        match self {
            AnyStore::Sled(store) => store.backup_job(),
            AnyStore::Postgres(_) => None,
        }
    }

    /// Opens the store `store` names: a `postgres://` URL (or key=value
    /// settings), else the sled store in `data_dir`'s `store` folder.
    pub fn open(store: Option<&str>, data_dir: &std::path::Path) -> Result<AnyStore, StoreError> {
        // The data folder says where its branch is, so that a start without
        // `--store` does not begin an empty branch beside one in PostgreSQL,
        // nor one with it hide a branch kept in the folder.
        let marker = data_dir.join(STORE_MARKER);
        let marked = std::fs::read_to_string(&marker).ok();
        let wrong = |message: String| Err(StoreError::WrongStore(message));
        match store {
            Some(url) => {
                if data_dir.join("store").exists() {
                    return wrong(format!(
                        "{} holds a branch kept in the data folder (sled); a PostgreSQL \
                         branch needs a data folder of its own",
                        data_dir.display()
                    ));
                }
                let store = PgStore::connect(url)?;
                let text = format!("postgres {}\n", store.shown());
                if marked.as_deref() != Some(text.as_str()) {
                    durable::write_private(&marker, text.as_bytes()).map_err(StoreError::Sync)?;
                }
                Ok(AnyStore::Postgres(Box::new(store)))
            }
            None => {
                if let Some(at) = marked
                    .as_deref()
                    .and_then(|text| text.strip_prefix("postgres "))
                {
                    return wrong(format!(
                        "the branch of {} is kept in PostgreSQL at {}: start with --store \
                         (or BACKOFFICE_STORE) naming it",
                        data_dir.display(),
                        at.trim()
                    ));
                }
                if data_dir.join("store.moved-to-postgres").exists()
                    && !data_dir.join("store").exists()
                {
                    return wrong(format!(
                        "the branch of {} was moved to PostgreSQL (`migrate-store`): start \
                         with --store (or BACKOFFICE_STORE) naming its database",
                        data_dir.display()
                    ));
                }
                Ok(AnyStore::Sled(Box::new(SledStore::open(
                    &data_dir.join("store"),
                )?)))
            }
        }
    }

    /// What it is and where, for the start-up line (never a password).
    pub fn describe(&self) -> String {
        match self {
            AnyStore::Sled(_) => "sled (the data folder)".to_owned(),
            AnyStore::Postgres(store) => format!("PostgreSQL at {}", store.shown()),
        }
    }
}

impl Store for AnyStore {
    fn load_ledger(&self) -> Result<Ledger, StoreError> {
        match self {
            AnyStore::Sled(store) => store.load_ledger(),
            AnyStore::Postgres(store) => store.load_ledger(),
        }
    }

    fn shared(&self) -> bool {
        match self {
            AnyStore::Sled(store) => store.shared(),
            AnyStore::Postgres(store) => store.shared(),
        }
    }

    fn device_codes(&self) -> crate::grants::DeviceCodes {
        match self {
            AnyStore::Sled(store) => store.device_codes(),
            AnyStore::Postgres(store) => store.device_codes(),
        }
    }

    fn fold_logged(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.fold_logged(),
            AnyStore::Postgres(store) => store.fold_logged(),
        }
    }

    fn close(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.close(),
            AnyStore::Postgres(store) => store.close(),
        }
    }

    fn unchanged_since_own_write(&self) -> bool {
        match self {
            AnyStore::Sled(store) => store.unchanged_since_own_write(),
            AnyStore::Postgres(store) => store.unchanged_since_own_write(),
        }
    }

    fn hold_ledger(&self) -> Result<LedgerHold<'_>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.hold_ledger(),
            AnyStore::Postgres(store) => store.hold_ledger(),
        }
    }

    fn hold_events_from(&self, from: u64) -> Result<Vec<crate::holds::HoldEvent>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.hold_events_from(from),
            AnyStore::Postgres(store) => store.hold_events_from(from),
        }
    }

    fn stage_holds(
        &self,
        events: &[crate::holds::HoldEvent],
        transfers: &[Transfer],
        request: Option<&crate::payments::PaymentRequest>,
    ) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.stage_holds(events, transfers, request),
            AnyStore::Postgres(store) => store.stage_holds(events, transfers, request),
        }
    }

    fn payment_request(
        &self,
        service: &Pid,
        reference: &str,
    ) -> Result<Option<crate::payments::PaymentRequest>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.payment_request(service, reference),
            AnyStore::Postgres(store) => store.payment_request(service, reference),
        }
    }

    fn payment_requests(&self) -> Result<Vec<crate::payments::PaymentRequest>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.payment_requests(),
            AnyStore::Postgres(store) => store.payment_requests(),
        }
    }

    fn evidence_used(&self, reference: &str) -> Result<Option<(Pid, String)>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.evidence_used(reference),
            AnyStore::Postgres(store) => store.evidence_used(reference),
        }
    }

    fn claim_nonce(
        &self,
        digest: &[u8; 32],
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        match self {
            AnyStore::Sled(store) => store.claim_nonce(digest, expires_ms, now_ms),
            AnyStore::Postgres(store) => store.claim_nonce(digest, expires_ms, now_ms),
        }
    }

    fn transfers_from(&self, from: u64) -> Result<Vec<Transfer>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.transfers_from(from),
            AnyStore::Postgres(store) => store.transfers_from(from),
        }
    }

    fn verify(&self) -> (crate::verify::Report, Vec<Transfer>) {
        match self {
            AnyStore::Sled(store) => store.verify(),
            AnyStore::Postgres(store) => store.verify(),
        }
    }

    fn apply_batch(&self, key: &BatchKey, effects: BatchEffects<'_>) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.apply_batch(key, effects),
            AnyStore::Postgres(store) => store.apply_batch(key, effects),
        }
    }

    fn stage_batch(&self, key: &BatchKey, effects: BatchEffects<'_>) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.stage_batch(key, effects),
            AnyStore::Postgres(store) => store.stage_batch(key, effects),
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.sync(),
            AnyStore::Postgres(store) => store.sync(),
        }
    }

    fn stage_batch_itemised(
        &self,
        key: &BatchKey,
        effects: BatchEffects<'_>,
        arrived_ms: u64,
        itemised: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.stage_batch_itemised(key, effects, arrived_ms, itemised),
            AnyStore::Postgres(store) => {
                store.stage_batch_itemised(key, effects, arrived_ms, itemised)
            }
        }
    }

    fn itemised_batch(
        &self,
        key: &BatchKey,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.itemised_batch(key),
            AnyStore::Postgres(store) => store.itemised_batch(key),
        }
    }

    fn itemised_batch_of_transfer(&self, id: TransferId) -> Result<Option<ItemisedAt>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.itemised_batch_of_transfer(id),
            AnyStore::Postgres(store) => store.itemised_batch_of_transfer(id),
        }
    }

    fn itemised_records_at(
        &self,
        at: &ItemisedAt,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.itemised_records_at(at),
            AnyStore::Postgres(store) => store.itemised_records_at(at),
        }
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
        match self {
            AnyStore::Sled(store) => store.resolve_suspense_itemised(
                resolved,
                transfers,
                period_uses,
                free_uses,
                arrived_ms,
                sets,
            ),
            AnyStore::Postgres(store) => store.resolve_suspense_itemised(
                resolved,
                transfers,
                period_uses,
                free_uses,
                arrived_ms,
                sets,
            ),
        }
    }

    fn prune_itemised(&self, before_ms: u64, records_max: usize) -> Result<usize, StoreError> {
        match self {
            AnyStore::Sled(store) => store.prune_itemised(before_ms, records_max),
            AnyStore::Postgres(store) => store.prune_itemised(before_ms, records_max),
        }
    }

    fn post_transfers(&self, transfers: &[Transfer]) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.post_transfers(transfers),
            AnyStore::Postgres(store) => store.post_transfers(transfers),
        }
    }

    fn stage_transfers(&self, transfers: &[Transfer]) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.stage_transfers(transfers),
            AnyStore::Postgres(store) => store.stage_transfers(transfers),
        }
    }

    fn period_uses(&self, key: &PeriodKey) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sled(store) => store.period_uses(key),
            AnyStore::Postgres(store) => store.period_uses(key),
        }
    }

    fn period_uses_many(&self, keys: &[PeriodKey]) -> Result<Vec<u64>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.period_uses_many(keys),
            AnyStore::Postgres(store) => store.period_uses_many(keys),
        }
    }

    fn free_uses(&self, payer: &Cid, month: u32) -> Result<Vec<(Pid, u64)>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.free_uses(payer, month),
            AnyStore::Postgres(store) => store.free_uses(payer, month),
        }
    }

    fn suspense(&self) -> Result<Vec<Suspense>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.suspense(),
            AnyStore::Postgres(store) => store.suspense(),
        }
    }

    fn suspense_page(
        &self,
        after: Option<&SuspenseCursor>,
        limit: usize,
    ) -> Result<Vec<Suspense>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.suspense_page(after, limit),
            AnyStore::Postgres(store) => store.suspense_page(after, limit),
        }
    }

    fn suspense_count(&self) -> Result<usize, StoreError> {
        match self {
            AnyStore::Sled(store) => store.suspense_count(),
            AnyStore::Postgres(store) => store.suspense_count(),
        }
    }

    fn resolve_suspense(
        &self,
        resolved: &[Suspense],
        transfers: &[Transfer],
        period_uses: &[(PeriodKey, u64)],
    ) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.resolve_suspense(resolved, transfers, period_uses),
            AnyStore::Postgres(store) => store.resolve_suspense(resolved, transfers, period_uses),
        }
    }

    fn overlapping_range(&self, range: &SeqRange) -> Result<Option<(u64, u64)>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.overlapping_range(range),
            AnyStore::Postgres(store) => store.overlapping_range(range),
        }
    }

    fn applied_batch(&self, key: &BatchKey) -> Result<Option<AppliedBatch>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.applied_batch(key),
            AnyStore::Postgres(store) => store.applied_batch(key),
        }
    }

    fn create_customer(&self, bid: &Bid, name: &str, email: &str) -> Result<Customer, StoreError> {
        match self {
            AnyStore::Sled(store) => store.create_customer(bid, name, email),
            AnyStore::Postgres(store) => store.create_customer(bid, name, email),
        }
    }

    fn register_customer(
        &self,
        bid: &Bid,
        registration: Registration,
    ) -> Result<Customer, StoreError> {
        match self {
            AnyStore::Sled(store) => store.register_customer(bid, registration),
            AnyStore::Postgres(store) => store.register_customer(bid, registration),
        }
    }

    fn customer(&self, cid: &Cid) -> Result<Option<Customer>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.customer(cid),
            AnyStore::Postgres(store) => store.customer(cid),
        }
    }

    fn customers(&self, cids: &[Cid]) -> Result<Vec<Option<Customer>>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.customers(cids),
            AnyStore::Postgres(store) => store.customers(cids),
        }
    }

    fn customer_terms(&self, cids: &[Cid]) -> Result<Vec<Option<CustomerTerms>>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.customer_terms(cids),
            AnyStore::Postgres(store) => store.customer_terms(cids),
        }
    }

    fn customer_by_email(&self, email: &str) -> Result<Option<Customer>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.customer_by_email(email),
            AnyStore::Postgres(store) => store.customer_by_email(email),
        }
    }

    fn customer_by_phone(&self, phone: &str) -> Result<Option<Customer>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.customer_by_phone(phone),
            AnyStore::Postgres(store) => store.customer_by_phone(phone),
        }
    }

    fn change_customer(
        &self,
        cid: &Cid,
        change: &dyn Fn(&mut Customer),
    ) -> Result<Customer, StoreError> {
        match self {
            AnyStore::Sled(store) => store.change_customer(cid, change),
            AnyStore::Postgres(store) => store.change_customer(cid, change),
        }
    }

    fn create_product(&self, bid: &Bid, new: NewProduct<'_>) -> Result<Product, StoreError> {
        match self {
            AnyStore::Sled(store) => store.create_product(bid, new),
            AnyStore::Postgres(store) => store.create_product(bid, new),
        }
    }

    fn product(&self, pid: &Pid) -> Result<Option<Product>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.product(pid),
            AnyStore::Postgres(store) => store.product(pid),
        }
    }

    fn set_components(
        &self,
        pid: &Pid,
        owner: Option<&Cid>,
        components: &[Pid],
    ) -> Result<Product, StoreError> {
        match self {
            AnyStore::Sled(store) => store.set_components(pid, owner, components),
            AnyStore::Postgres(store) => store.set_components(pid, owner, components),
        }
    }

    fn taca_module(&self, hash: &TacaHash) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.taca_module(hash),
            AnyStore::Postgres(store) => store.taca_module(hash),
        }
    }

    fn create_meter_for(
        &self,
        bid: &Bid,
        owner: &Cid,
        service: Option<&Pid>,
    ) -> Result<Meter, StoreError> {
        match self {
            AnyStore::Sled(store) => store.create_meter_for(bid, owner, service),
            AnyStore::Postgres(store) => store.create_meter_for(bid, owner, service),
        }
    }

    fn meter(&self, mid: &Mid) -> Result<Option<Meter>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.meter(mid),
            AnyStore::Postgres(store) => store.meter(mid),
        }
    }

    fn products_of(&self, owner: &Cid) -> Result<Vec<Product>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.products_of(owner),
            AnyStore::Postgres(store) => store.products_of(owner),
        }
    }

    fn meters_of(&self, owner: &Cid) -> Result<Vec<Meter>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.meters_of(owner),
            AnyStore::Postgres(store) => store.meters_of(owner),
        }
    }

    fn rotate_meter_secret(
        &self,
        mid: &Mid,
        by: Actor,
        at_ms: u64,
        grace_ms: u64,
    ) -> Result<Meter, StoreError> {
        match self {
            AnyStore::Sled(store) => store.rotate_meter_secret(mid, by, at_ms, grace_ms),
            AnyStore::Postgres(store) => store.rotate_meter_secret(mid, by, at_ms, grace_ms),
        }
    }

    fn revoke_meter(&self, mid: &Mid, by: Actor, at_ms: u64) -> Result<Meter, StoreError> {
        match self {
            AnyStore::Sled(store) => store.revoke_meter(mid, by, at_ms),
            AnyStore::Postgres(store) => store.revoke_meter(mid, by, at_ms),
        }
    }

    fn retire_previous_secret(&self, mid: &Mid, current_hex: &str) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(store) => store.retire_previous_secret(mid, current_hex),
            AnyStore::Postgres(store) => store.retire_previous_secret(mid, current_hex),
        }
    }

    fn create_grant(&self, grant: NewGrant) -> Result<Grant, StoreError> {
        match self {
            AnyStore::Sled(store) => store.create_grant(grant),
            AnyStore::Postgres(store) => store.create_grant(grant),
        }
    }

    fn grants_of_meter(&self, mid: &Mid) -> Result<Vec<Grant>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.grants_of_meter(mid),
            AnyStore::Postgres(store) => store.grants_of_meter(mid),
        }
    }

    fn meter_grants(&self, mid: &Mid) -> Result<std::sync::Arc<MeterGrants>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.meter_grants(mid),
            AnyStore::Postgres(store) => store.meter_grants(mid),
        }
    }

    fn grants_of_customer(&self, cid: &Cid) -> Result<Vec<Grant>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.grants_of_customer(cid),
            AnyStore::Postgres(store) => store.grants_of_customer(cid),
        }
    }

    fn revoke_grant(&self, id: u64, payer: Option<&Cid>, at_ms: u64) -> Result<Grant, StoreError> {
        match self {
            AnyStore::Sled(store) => store.revoke_grant(id, payer, at_ms),
            AnyStore::Postgres(store) => store.revoke_grant(id, payer, at_ms),
        }
    }

    fn deposit(&self, reference: &Reference) -> Result<Option<DepositRecord>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.deposit(reference),
            AnyStore::Postgres(store) => store.deposit(reference),
        }
    }

    fn begin_deposit(
        &self,
        reference: &Reference,
        intent: &DepositRecord,
    ) -> Result<(DepositRecord, bool), StoreError> {
        match self {
            AnyStore::Sled(store) => store.begin_deposit(reference, intent),
            AnyStore::Postgres(store) => store.begin_deposit(reference, intent),
        }
    }

    fn deposit_collected(
        &self,
        reference: &Reference,
        processor: &str,
    ) -> Result<DepositRecord, StoreError> {
        match self {
            AnyStore::Sled(store) => store.deposit_collected(reference, processor),
            AnyStore::Postgres(store) => store.deposit_collected(reference, processor),
        }
    }

    fn post_deposit(
        &self,
        reference: &Reference,
        transfer: &Transfer,
    ) -> Result<DepositRecord, StoreError> {
        match self {
            AnyStore::Sled(store) => store.post_deposit(reference, transfer),
            AnyStore::Postgres(store) => store.post_deposit(reference, transfer),
        }
    }

    fn stage_deposit(
        &self,
        reference: &Reference,
        transfer: &Transfer,
    ) -> Result<DepositRecord, StoreError> {
        match self {
            AnyStore::Sled(store) => store.stage_deposit(reference, transfer),
            AnyStore::Postgres(store) => store.stage_deposit(reference, transfer),
        }
    }
}
