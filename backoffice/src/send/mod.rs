//! `send`: applying a meter's upload. Transport-free: the server hands in
//! the body, the signature headers and the time, and gets the answer back.
//!
//! A batch is authenticated (registered MID, HMAC signature, time window, no
//! replay), then applied once: every committed use is priced with its
//! product's TACA and becomes a transfer from the payer to the product's
//! owner; what cannot be priced goes to suspense with its reason. Transfers,
//! period counts, suspense and the batch's digest are stored in one transaction
//! before the in-memory ledger takes the transfers. A batch sent again gets
//! the standings of now, marked "already applied".
//!
//! The steps are in files of their own: `authenticate` (headers, signature,
//! replay, decoding), `price` (who pays, billing periods, prices), `apply`
//! (ledger and store, suspense priced again, deposits) and `standings`.

mod apply;
mod authenticate;
mod holds;
mod payments;
mod price;
mod standings;
#[cfg(test)]
mod tests;

pub use apply::Deposited;
pub use authenticate::{Signed, Verified};
pub use payments::{
    Move, Paid, PaymentAsk, PaymentRefusal, PaymentResult, Rating, ReservationChange,
};
pub use price::{
    CLOCK_SKEW_MS, LATE_AFTER_GRANT_END_MAX_MS, PERIOD_COUNTS_CACHED_MAX, PERIODS_WAIT_MS,
    USE_AGE_MAX_MS, civil_date, grant_covers, month_of,
};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use proto::upload::MeterParams;
use proto::{Fault, FaultCode};

use crate::ledger::{AccountId, Ledger};
use crate::pricing::Pricing;
use crate::store::{LedgerHold, Store, StoreError};
use authenticate::SeenSignatures;
use price::{PeriodCounts, PeriodsInUse};

/// How far a signature's time may be from the backoffice's clock.
pub const SIGNATURE_WINDOW_MS: u64 = 5 * 60 * 1000;
/// Suspended readings priced again between two progress lines.
pub const REPRICE_CHUNK: usize = 10_000;
/// Most times a re-pricing dates its itemised records a millisecond later
/// because records of the same batch are kept at the time it chose.
pub const REPRICE_DATE_TRIES: u32 = 1_000;
/// Signatures remembered to refuse replays (older ones are outside the window).
pub const SEEN_SIGNATURES_MAX: usize = 1_000_000;

/// Upload parameters programmed into meters unless configured otherwise.
pub const DEFAULT_PARAMS: MeterParams = MeterParams {
    flush_readings_max: 10_000,
    flush_interval_s: 3_600,
    status_stale_max_s: 30 * 24 * 3_600,
    unknown_uses_max: 16,
};

/// The backoffice's money path.
pub struct Backoffice<S> {
    store: S,
    pricing: Pricing,
    ledger: Mutex<Ledger>,
    /// The holds (`holds::HoldBook`), kept equal to the store's: locked
    /// only while `ledger` is held (after it).
    holds: Mutex<crate::holds::HoldBook>,
    /// Stored period counts already read, kept equal to the store's: locked
    /// only while `ledger` is held, and updated where the store is.
    period_counts: Mutex<PeriodCounts>,
    /// The billing periods batches are pricing now.
    periods_in_use: PeriodsInUse,
    seen: Mutex<SeenSignatures>,
    params: MeterParams,
    counters: Counters,
    /// Set when a staged batch could not be made durable: the ledger in
    /// memory may then hold what the disk does not, so money operations are
    /// refused until a restart reloads it.
    not_durable: std::sync::atomic::AtomicBool,
    /// Grant codes waiting for a customer's decision.
    device_codes: crate::grants::DeviceCodes,
    /// When the last re-pricing of suspense wrote its itemised records
    /// (ms); the next one writes after it.
    repriced_at_ms: std::sync::atomic::AtomicU64,
}

/// The ledger locked for a money write (`Backoffice::ledger_for_write`):
/// the store's ledger lock is let go of before this node's, so that no
/// other thread of this node takes the store's lock while it is still held.
struct LedgerWrite<'a> {
    /// Held for its drop: declared first, so let go of first.
    _hold: LedgerHold<'a>,
    ledger: MutexGuard<'a, Ledger>,
}

impl std::ops::Deref for LedgerWrite<'_> {
    type Target = Ledger;
    fn deref(&self) -> &Ledger {
        &self.ledger
    }
}

impl std::ops::DerefMut for LedgerWrite<'_> {
    fn deref_mut(&mut self) -> &mut Ledger {
        &mut self.ledger
    }
}

/// What the money path has done since the process started, for `/metrics`.
#[derive(Default)]
pub struct Counters {
    /// Readings in uploads that passed authentication.
    pub readings_received: AtomicU64,
    /// Batches applied.
    pub batches_applied: AtomicU64,
    /// Batches sent again and answered from the store.
    pub batches_repeated: AtomicU64,
    /// Uploads refused (parse, signature, replay, unknown meter).
    pub uploads_refused: AtomicU64,
    /// Readings priced.
    pub prices: AtomicU64,
    /// Fuel the prices used.
    pub pricing_fuel: AtomicU64,
    /// Readings put in suspense.
    pub suspended: AtomicU64,
    /// Batches priced again under the ledger's lock because another batch
    /// of the same payer, product and month was applied while they were
    /// priced.
    pub batches_repriced: AtomicU64,
    /// For the last applied batch: ms between its oldest reading and its
    /// arrival.
    pub upload_lag_ms: AtomicU64,
    /// Where applied batches' time went: nanoseconds in each phase,
    /// summed over all of them (`Phase`).
    pub batch_phase_ns: [AtomicU64; Phase::ALL.len()],
}

/// The phases of an applied batch, in order, for `Counters::batch_phase_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// From the verified body to its application: decoding, the readings
    /// digest, the checks for a replay and a batch applied before.
    Decoding,
    /// Reading the grants, customers, products and TACAs it names.
    LookingUp,
    /// Waiting for another batch of the same payers to finish pricing.
    WaitingForPeriods,
    /// Pricing its uses.
    Pricing,
    /// Waiting for the ledger's lock.
    WaitingForLedger,
    /// Under the ledger's lock: posting, standings, itemised records, the
    /// store's transaction.
    UnderLedger,
    /// Waiting for the store to make it durable.
    Durable,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 7] = [
        Phase::Decoding,
        Phase::LookingUp,
        Phase::WaitingForPeriods,
        Phase::Pricing,
        Phase::WaitingForLedger,
        Phase::UnderLedger,
        Phase::Durable,
    ];

    /// Its name in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Phase::Decoding => "decoding",
            Phase::LookingUp => "looking_up",
            Phase::WaitingForPeriods => "waiting_for_periods",
            Phase::Pricing => "pricing",
            Phase::WaitingForLedger => "waiting_for_ledger",
            Phase::UnderLedger => "under_ledger",
            Phase::Durable => "durable",
        }
    }
}

/// A batch's time so far in each phase.
pub(super) struct Phases {
    last: std::time::Instant,
    ns: [u64; Phase::ALL.len()],
}

impl Phases {
    pub(super) fn start() -> Phases {
        Phases {
            last: std::time::Instant::now(),
            ns: [0; Phase::ALL.len()],
        }
    }

    /// The time since the last mark was spent in `phase`.
    pub(super) fn mark(&mut self, phase: Phase) {
        let now = std::time::Instant::now();
        let spent = u64::try_from(now.duration_since(self.last).as_nanos()).unwrap_or(u64::MAX);
        self.ns[phase as usize] = self.ns[phase as usize].saturating_add(spent);
        self.last = now;
    }

    /// Adds this batch's phases to the counters.
    pub(super) fn count(&self, counters: &Counters) {
        for (total, ns) in counters.batch_phase_ns.iter().zip(self.ns) {
            total.fetch_add(ns, Ordering::Relaxed);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn internal(error: &dyn std::fmt::Display) -> Fault {
    Fault::new(FaultCode::InternalError, error.to_string())
}

impl<S: Store> Backoffice<S> {
    /// The money path over `store`, whose ledger it loads.
    pub fn open(store: S, params: MeterParams) -> Result<Self, StoreError> {
        let ledger = store.load_ledger()?;
        let holds = crate::holds::HoldBook::restore(store.hold_events_from(0)?)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let device_codes = store.device_codes();
        Ok(Self {
            store,
            pricing: Pricing::new(),
            ledger: Mutex::new(ledger),
            holds: Mutex::new(holds),
            period_counts: Mutex::new(PeriodCounts::default()),
            periods_in_use: PeriodsInUse::default(),
            seen: Mutex::new(SeenSignatures::default()),
            params,
            counters: Counters::default(),
            not_durable: std::sync::atomic::AtomicBool::new(false),
            device_codes,
            repriced_at_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Grant codes waiting for customers' decisions.
    pub fn device_codes(&self) -> &crate::grants::DeviceCodes {
        &self.device_codes
    }

    /// How late after a grant ends (revoked or expired) a batch may still
    /// arrive and charge its earlier uses through it: twice the flush
    /// interval the backoffice gives meters. Later, they go to suspense.
    pub fn late_ms(&self) -> u64 {
        (u64::from(self.params.flush_interval_s) * 2 * 1000).min(LATE_AFTER_GRANT_END_MAX_MS)
    }

    /// What the money path has done since it started.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Transfers posted, and the number of accounts with postings.
    pub fn ledger_size(&self) -> (usize, usize) {
        let ledger = self.ledger_read();
        (ledger.transfers().len(), ledger.balances().count())
    }

    /// The store, for the operator's calls.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The balance of `account` now.
    pub fn balance(&self, account: &AccountId) -> proto::Amount {
        self.ledger_read().balance(account)
    }

    /// The transfers that debit or credit `account`, in order.
    pub fn statement(&self, account: &AccountId) -> Vec<crate::ledger::Transfer> {
        self.ledger_read().transfers_of(*account).cloned().collect()
    }

    /// A whole copy of the ledger, for checks (it copies every transfer).
    pub fn ledger(&self) -> Ledger {
        self.ledger_read().clone()
    }

    /// Brings `ledger` up to the store's: the transfers other nodes posted
    /// since (none where this process owns the store).
    fn catch_up(&self, ledger: &mut Ledger) -> Result<(), Fault> {
        if !self.store.shared() {
            return Ok(());
        }
        // The holds' events are read before the transfers: a capture
        // committed between the two reads is then seen as its transfer
        // without its event (the money counted as held and as debited, on
        // the safe side until the next catch-up), never the other way.
        let mut holds = lock(&self.holds);
        let next_event = holds.events().len() as u64;
        let events = self
            .store
            .hold_events_from(next_event)
            .map_err(|error| internal(&error))?;
        let next = ledger.transfers().len() as u64;
        let newer = self
            .store
            .transfers_from(next)
            .map_err(|error| internal(&error))?;
        ledger
            .append_stored(newer)
            .map_err(|error| internal(&error))?;
        holds
            .append_stored(events)
            .map_err(|error| internal(&error))
    }

    /// The ledger, locked, with what other nodes posted: for reads. If the
    /// store cannot be read just now, the ledger as this node last saw it
    /// (and a warning in the log).
    fn ledger_read(&self) -> MutexGuard<'_, Ledger> {
        let mut ledger = lock(&self.ledger);
        if let Err(fault) = self.catch_up(&mut ledger) {
            tracing::warn!(
                "the ledger could not be brought up to the store's: {}",
                fault.message
            );
        }
        ledger
    }

    /// The ledger locked for a money write: where nodes share the store,
    /// with the store's ledger lock held too (until the hold is dropped),
    /// and the ledger and the period counts brought up to the store's.
    fn ledger_for_write(&self) -> Result<LedgerWrite<'_>, Fault> {
        let mut ledger = lock(&self.ledger);
        let hold = self.store.hold_ledger().map_err(|error| internal(&error))?;
        // Where nobody else wrote since this node's last write, its ledger
        // and period counts are the store's (`LedgerHold::others_wrote`).
        if self.store.shared() && hold.others_wrote() {
            self.catch_up(&mut ledger)?;
            // Another node may have counted uses since.
            lock(&self.period_counts).0.clear();
        }
        Ok(LedgerWrite {
            _hold: hold,
            ledger,
        })
    }

    /// False once a staged write could not be made durable: money operations
    /// are refused until a restart (`/health` says so).
    pub fn is_durable(&self) -> bool {
        !self.not_durable.load(Ordering::SeqCst)
    }

    /// Refuses money operations after a failed `sync` (see `not_durable`).
    fn still_durable(&self) -> Result<(), Fault> {
        if self.not_durable.load(Ordering::SeqCst) {
            return Err(internal(
                &"a write could not be made durable; restart the backoffice, which reloads the ledger from disk",
            ));
        }
        Ok(())
    }

    /// Makes everything staged so far durable: one fsync, shared by every
    /// batch staged meanwhile. A failure stops money operations (see
    /// `not_durable`).
    fn durable(&self) -> Result<(), Fault> {
        self.store.sync().map_err(|error| self.stop_money(&error))?;
        // A sync of ours that worked does not make up for an earlier one
        // that failed: sled's log may have a hole before our write.
        self.still_durable()
    }

    /// A write that may have reached sled but not the disk failed: the
    /// store may hold what the ledger in memory does not (or the other way
    /// round), so every money operation stops until a restart reloads it.
    fn stop_money(&self, error: &StoreError) -> Fault {
        // Nothing reached the store: nothing can be out of step with it.
        if let StoreError::Unavailable(_) = error {
            tracing::warn!(%error, "the store is unavailable");
            return internal(error);
        }
        // A store several nodes share is the only authority: every money
        // write first brings the ledger in memory up to it (`catch_up`), so
        // a write whose outcome is unknown puts nothing out of step.
        if self.store.shared() {
            tracing::error!(%error, "a write to the shared store failed; its outcome is read back before the next");
            return internal(error);
        }
        self.not_durable.store(true, Ordering::SeqCst);
        tracing::error!(%error, "a write could not be made durable: refusing money operations until restarted");
        internal(error)
    }
}
