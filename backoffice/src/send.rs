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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use proto::auth::Secret;
use proto::reading::{Event, Reading};
use proto::upload::{
    MeterParams, Outcome, SendAnswer, SendBody, SendRequest, Standing, standings_value,
};
use proto::xmlrpc::{Limits, Value, parse_call};
use proto::{Amount, BatchId, Cid, Code, Fault, FaultCode, Mid, Payer, Pid};

use crate::ledger::{AccountId, Ledger, NewTransfer, TransferKind, in_good_standing};
use crate::now_ms;
use crate::pricing::{PriceInput, Pricing, PricingError};
use crate::registry::{Grant, Product, SecretUsed};
use crate::store::{
    BatchDigest, BatchEffects, BatchKey, LedgerHold, PeriodKey, SeqRange, Store, StoreError,
    Suspense,
};

/// How far a signature's time may be from the backoffice's clock.
pub const SIGNATURE_WINDOW_MS: u64 = 5 * 60 * 1000;
/// Suspended readings priced again between two progress lines.
pub const REPRICE_CHUNK: usize = 10_000;
/// Signatures remembered to refuse replays (older ones are outside the window).
pub const SEEN_SIGNATURES_MAX: usize = 1_000_000;

/// Upload parameters programmed into meters unless configured otherwise.
pub const DEFAULT_PARAMS: MeterParams = MeterParams {
    flush_readings_max: 10_000,
    flush_interval_s: 3_600,
    status_stale_max_s: 30 * 24 * 3_600,
    unknown_uses_max: 16,
};

/// The HTTP headers of an upload.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signed<'a> {
    /// `X-Meter-Id`.
    pub mid: Option<&'a str>,
    /// `X-Meter-Time`.
    pub time: Option<&'a str>,
    /// `X-Meter-Signature`.
    pub signature: Option<&'a str>,
}

/// Signature headers that verified a body with the secret of the meter
/// they name (`Backoffice::verify`).
#[derive(Debug)]
pub struct Verified<'a> {
    /// The meter whose secret signed the body.
    pub mid: Mid,
    /// `X-Meter-Time`.
    pub time_ms: u64,
    /// `X-Meter-Signature`, hex.
    pub signature: &'a str,
    /// The secret that verified it, which signs the answer.
    pub secret: Secret,
}

impl Verified<'_> {
    /// Refuses a body that names another meter than the one that signed it.
    pub fn names(&self, mid: &Mid) -> Result<(), Fault> {
        if *mid != self.mid {
            return Err(Fault::new(
                FaultCode::BadSignature,
                "the X-Meter-Id header names another meter than the request",
            ));
        }
        Ok(())
    }
}

/// Signatures seen within the window, oldest first.
#[derive(Default)]
struct SeenSignatures {
    order: VecDeque<(u64, String)>,
    set: HashSet<String>,
}

impl SeenSignatures {
    /// False when `signature` was seen already; remembers it otherwise.
    fn admit(&mut self, signature: &str, time_ms: u64, now_ms: u64) -> bool {
        while let Some((time, _)) = self.order.front() {
            let expired = now_ms.saturating_sub(*time) > 2 * SIGNATURE_WINDOW_MS;
            if !expired && self.order.len() < SEEN_SIGNATURES_MAX {
                break;
            }
            let (_, old) = self.order.pop_front().expect("front exists");
            self.set.remove(&old);
        }
        if !self.set.insert(signature.to_owned()) {
            return false;
        }
        self.order.push_back((time_ms, signature.to_owned()));
        true
    }
}

/// The backoffice's money path.
pub struct Backoffice<S> {
    store: S,
    pricing: Pricing,
    ledger: Mutex<Ledger>,
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

/// A deposit made, or found made, under its reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deposited {
    /// The deposit's reference.
    pub reference: crate::funding::Reference,
    /// Its transfer.
    pub transfer: crate::ledger::Transfer,
    /// The processor's reference for the collection.
    pub processor: String,
    /// The reference was used before: this call completed or repeated it.
    pub repeated: bool,
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
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An upload signed at `time_ms`, further than the window from `now_ms`:
/// says by how much and which way, so that the meter's owner can set its
/// clock (a meter's retries would never get through).
fn clock_skew(time_ms: u64, now_ms: u64) -> Fault {
    let off_s = time_ms.abs_diff(now_ms) / 1000;
    let way = if time_ms > now_ms {
        "ahead of"
    } else {
        "behind"
    };
    Fault::new(
        FaultCode::ClockSkew,
        format!(
            "the meter's clock is {off_s} s {way} the backoffice's (signed at {}, received at {}); \
             at most {} s is accepted: set the meter's clock; nothing was applied",
            proto::time::utc_text(time_ms),
            proto::time::utc_text(now_ms),
            SIGNATURE_WINDOW_MS / 1000
        ),
    )
}

/// Every pricing slot stayed busy past `SLOT_WAIT_MS`: the batch is
/// refused as a whole, retryably (busy is no TACA's failure, and never
/// sends a use to suspense).
fn pricing_busy() -> Fault {
    internal(&"every pricing slot stayed busy; nothing was applied: send the batch again")
}

fn internal(error: &dyn std::fmt::Display) -> Fault {
    Fault::new(FaultCode::InternalError, error.to_string())
}

/// What one batch looks up, kept for the batch so each is read once.
#[derive(Default)]
struct Lookups {
    /// Shared, not cloned, by every reading of the product.
    products: HashMap<Pid, Option<std::sync::Arc<Product>>>,
    /// What decides each customer's standing: credit limit and deny flag
    /// (`None`: no such customer).
    customers: HashMap<Cid, Option<(proto::Amount, bool)>>,
    tacas: HashMap<crate::pricing::TacaHash, std::sync::Arc<crate::pricing::Taca>>,
    /// Every grant given to the sending meter, live or not, by customer.
    grants: HashMap<Cid, Vec<Grant>>,
}

impl Lookups {
    /// Keeps the sending meter's grants, by customer.
    fn with_grants(grants: Vec<Grant>) -> Lookups {
        let mut by_customer: HashMap<Cid, Vec<Grant>> = HashMap::new();
        for grant in grants {
            by_customer.entry(grant.cid).or_default().push(grant);
        }
        Lookups {
            grants: by_customer,
            ..Lookups::default()
        }
    }

    /// True when a use by `cid` at `use_ms`, in a batch that arrived at
    /// `arrived_ms`, may be charged through a grant of the sending meter.
    fn granted(&self, cid: Cid, use_ms: u64, arrived_ms: u64, late_ms: u64) -> bool {
        self.grants.get(&cid).is_some_and(|grants| {
            grants
                .iter()
                .any(|grant| grant_covers(grant, use_ms, arrived_ms, late_ms))
        })
    }
}

/// The longest a batch may arrive after its grant ended and still charge
/// its earlier uses through it, whatever the flush interval.
pub const LATE_AFTER_GRANT_END_MAX_MS: u64 = 24 * 3600 * 1000;

/// How far the meter's clock may be behind the backoffice's when a grant
/// starts: uses stamped this much before the grant's approval still count.
pub const CLOCK_SKEW_MS: u64 = SIGNATURE_WINDOW_MS;

/// Oldest a use may be when its batch arrives (62 days: two billing
/// months, longer than a meter is expected to stay offline): an older one
/// goes to suspense, so that a meter cannot date uses into a past month
/// whose free tier is unspent.
pub const USE_AGE_MAX_MS: u64 = 62 * 24 * 3600 * 1000;

/// May a use at `use_ms` (the meter's clock), in a batch that arrived at
/// `arrived_ms` (the backoffice's), be charged through `grant`? The grant
/// must be live at the use's time (give or take `CLOCK_SKEW_MS` at its
/// start, the meter's clock against ours), must have existed when the
/// batch arrived (both by our clock: a grant made later never reaches
/// back), and a batch arriving
/// more than `late_ms` after the grant ended (revoked or expired) charges
/// nothing through it: a meter cannot backdate uses past a revocation.
pub fn grant_covers(grant: &Grant, use_ms: u64, arrived_ms: u64, late_ms: u64) -> bool {
    let end = [grant.expires_ms, grant.revoked_ms]
        .into_iter()
        .flatten()
        .min();
    grant.created_ms.saturating_sub(CLOCK_SKEW_MS) <= use_ms
        && grant.created_ms <= arrived_ms
        && end.is_none_or(|end| use_ms < end && arrived_ms < end.saturating_add(late_ms))
}

/// Most period counts kept in memory; past it the cache starts again empty.
pub const PERIOD_COUNTS_CACHED_MAX: usize = 1_000_000;

/// Period counts as stored, so that a batch reads each from sled only once
/// per process instead of once per batch.
#[derive(Default)]
struct PeriodCounts(HashMap<PeriodKey, u64>);

impl PeriodCounts {
    /// Records counts that are now stored.
    fn stored(&mut self, counts: &[(PeriodKey, u64)]) {
        if self.0.len() + counts.len() > PERIOD_COUNTS_CACHED_MAX {
            self.0.clear();
        }
        self.0.extend(counts.iter().copied());
    }
}

/// Longest a batch waits for the billing periods it prices to be free of
/// other batches' pricing; past it the batch is refused retryably.
pub const PERIODS_WAIT_MS: u64 = 60_000;

/// The billing periods (payer, product, month) that batches are pricing
/// now: a batch prices, outside the ledger's lock, only periods that no
/// other batch is pricing, so that two batches never price the same
/// payer's uses of a product from the same count (which would price one of
/// them again under the lock, see `counts_unchanged`). Batches of
/// different payers price at once; those of the same payer one after the
/// other.
#[derive(Default)]
struct PeriodsInUse {
    held: Mutex<HashSet<PeriodKey>>,
    freed: std::sync::Condvar,
}

/// Periods reserved by one batch, freed when dropped.
struct Reserved<'a> {
    from: &'a PeriodsInUse,
    keys: Vec<PeriodKey>,
}

impl PeriodsInUse {
    /// Waits (at most `PERIODS_WAIT_MS`) until no other batch prices any
    /// of `keys`, then reserves them all at once (so no two batches can
    /// each wait for the other).
    fn reserve(&self, keys: HashSet<PeriodKey>) -> Result<Reserved<'_>, Fault> {
        let held = lock(&self.held);
        let (mut held, _) = self
            .freed
            .wait_timeout_while(
                held,
                std::time::Duration::from_millis(PERIODS_WAIT_MS),
                |held| keys.iter().any(|key| held.contains(key)),
            )
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if keys.iter().any(|key| held.contains(key)) {
            return Err(internal(
                &"other batches of the same payers stayed in pricing; nothing was applied: send the batch again",
            ));
        }
        held.extend(keys.iter().copied());
        Ok(Reserved {
            from: self,
            keys: keys.into_iter().collect(),
        })
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.from.held);
        for key in &self.keys {
            held.remove(key);
        }
        drop(held);
        self.from.freed.notify_all();
    }
}

/// A committed use, with its payer resolved, ready to price.
#[derive(Clone)]
struct Use {
    seq: u64,
    pid: Pid,
    payer: Option<Payer>,
    time_ms: u64,
    /// The context it was used in (`None`: Cox's form, one context).
    context: Option<proto::Context>,
    /// Why its payer may not be charged (`None`: they may be: a customer
    /// through a grant for the sending meter, or the owner of a product that
    /// declared it a component and whose use encloses it and is itself
    /// authorized; see `authorize`).
    refusal: Option<String>,
    /// For a component's use: the index (in the batch's uses) of the use
    /// that encloses it, which must itself be charged for it to be.
    enclosing: Option<usize>,
}

/// A use ready to price: its TACA, its product's owner and its place in
/// the payer's billing period known.
struct Job {
    taca: std::sync::Arc<crate::pricing::Taca>,
    owner: Cid,
    period: PeriodKey,
    count: u64,
    /// The most one use may cost (`None`: a product stored before maximums).
    max_price: Option<Amount>,
}

impl Job {
    fn input(&self, count: u64) -> PriceInput {
        PriceInput::invocation(self.period.payer, Code::Commit, self.period.pid, count)
    }
}

/// What became of one use.
enum Fate {
    /// Priced; a zero amount or a use of one's own product moves no money.
    Priced {
        payer: Cid,
        owner: Cid,
        amount: Amount,
        /// What the price cost and what the TACA was given, kept with the
        /// batch's itemised readings (`itemised`).
        fuel: u64,
        taca: crate::pricing::TacaHash,
        period_uses: u64,
    },
    /// The product's test PID: free (`payer`: who used it; `None` only
    /// while a use waits for its price).
    Free { payer: Option<Cid> },
    /// Not priced, for this reason: it goes to suspense.
    Suspense(String),
}

/// Priced uses summed into one transfer per payer, owner, product and
/// batch: a statement line like a card's, and one record to store instead
/// of one per reading.
#[derive(Default)]
struct Totals {
    index: HashMap<(Cid, Cid, Pid, BatchId), usize>,
    transfers: Vec<NewTransfer>,
}

impl Totals {
    /// Adds a priced use; returns the index of the transfer its amount was
    /// summed into (`None`: it moves no money).
    fn add_at(
        &mut self,
        payer: Cid,
        owner: Cid,
        pid: Pid,
        batch: &BatchId,
        amount: Amount,
    ) -> Result<Option<usize>, Fault> {
        if !amount.is_positive() || payer == owner {
            return Ok(None);
        }
        let at = match self.index.entry((payer, owner, pid, batch.clone())) {
            std::collections::hash_map::Entry::Occupied(entry) => {
                let transfer = &mut self.transfers[*entry.get()];
                transfer.amount = transfer
                    .amount
                    .checked_add(amount)
                    .map_err(|error| internal(&error))?;
                if let TransferKind::Use { uses, .. } = &mut transfer.kind {
                    *uses += 1;
                }
                *entry.get()
            }
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(self.transfers.len());
                self.transfers.push(NewTransfer {
                    debit: AccountId::Customer(payer),
                    credit: AccountId::Customer(owner),
                    amount,
                    kind: TransferKind::Use {
                        pid,
                        batch: batch.clone(),
                        uses: 1,
                    },
                });
                self.transfers.len() - 1
            }
        };
        Ok(Some(at))
    }
}

/// Uses that moved no money (priced at zero, of one's own product, or of a
/// product's test PID), counted per payer, product and month of use, so
/// that statements say how many uses were free and not only those charged.
#[derive(Default)]
struct FreeUses(HashMap<PeriodKey, u64>);

impl FreeUses {
    fn count(&mut self, payer: Option<Cid>, pid: Pid, time_ms: u64) {
        if let Some(payer) = payer {
            let period = PeriodKey {
                payer,
                pid,
                month: month_of(time_ms),
            };
            *self.0.entry(period).or_insert(0) += 1;
        }
    }

    /// What to add to the stored counts.
    fn added(self) -> Vec<(PeriodKey, u64)> {
        self.0.into_iter().collect()
    }
}

/// The month (`YYYYMM`, UTC) of a time in ms since the Unix epoch.
pub fn month_of(time_ms: u64) -> u32 {
    let (year, month, _) = civil_date(time_ms);
    u32::try_from(year * 100 + i64::from(month)).unwrap_or(u32::MAX)
}

pub use proto::time::civil_date;

/// Resolves Cox's minimal form: nesting within the batch decides the payer,
/// as the meter does for the extended form.
fn minimal_uses(events: &[Event], time_ms: u64) -> Vec<Use> {
    enum Frame {
        Login(Cid),
        Query { pid: Pid, payer: Payer },
    }
    let inside = |frame: &Frame| match *frame {
        Frame::Login(cid) => Payer::Customer(cid),
        Frame::Query { pid, .. } => Payer::OwnerOf(pid),
    };
    let mut stack: Vec<Frame> = Vec::new();
    let mut uses = Vec::new();
    for (index, event) in events.iter().enumerate() {
        match *event {
            Event::Login(cid) => stack.push(Frame::Login(cid)),
            Event::Logout(cid) => {
                let login = stack
                    .iter()
                    .rposition(|frame| matches!(frame, Frame::Login(open) if *open == cid));
                if let Some(at) = login {
                    stack.truncate(at);
                }
            }
            Event::Query { pid, .. } => {
                if let Some(payer) = stack.last().map(inside) {
                    stack.push(Frame::Query { pid, payer });
                }
            }
            Event::Commit { pid, .. } => {
                let open = stack.iter().rposition(
                    |frame| matches!(frame, Frame::Query { pid: open, .. } if *open == pid),
                );
                let payer = open.map(|at| {
                    let payer = match stack[at] {
                        Frame::Query { payer, .. } => payer,
                        Frame::Login(_) => unreachable!("only a query matches"),
                    };
                    stack.truncate(at);
                    payer
                });
                uses.push(Use {
                    seq: index as u64,
                    pid,
                    payer,
                    time_ms,
                    context: None,
                    refusal: None,
                    enclosing: None,
                });
            }
        }
    }
    uses
}

fn extended_uses(readings: &[Reading]) -> Vec<Use> {
    readings
        .iter()
        .filter_map(|reading| match reading.event {
            Event::Commit { pid, payer } => Some(Use {
                seq: reading.seq,
                pid,
                payer,
                time_ms: reading.time_ms,
                context: Some(reading.context.clone()),
                refusal: None,
                enclosing: None,
            }),
            _ => None,
        })
        .collect()
}

/// Decides which uses of one batch, arrived at `arrived_ms`, may be
/// charged to their payer, and why not the others.
///
/// A customer pays only through a grant they gave the sending meter (see
/// `grant_covers`). A component's use is charged to the owner of the
/// product it was used in only when that owner declared it a component of
/// that product, and, later in the same batch and context, a use of that
/// product (not of its free test PID) is itself authorized: the chain of
/// enclosing uses must end at a granted customer. (An inner use is
/// committed before the use that encloses it, so one pass from the end
/// decides every link.) A use stamped after the batch arrived, beyond the
/// signature window, is refused.
fn authorize(uses: &mut [Use], lookups: &Lookups, arrived_ms: u64, late_ms: u64) {
    // The next commit of each product in each context, as the pass goes
    // from the end: the use that encloses a component committed before it.
    let mut next_commit: HashMap<(Option<&proto::Context>, Pid), usize> = HashMap::new();
    let mut order: Vec<usize> = (0..uses.len()).collect();
    order.sort_by_key(|&index| uses[index].seq);
    let mut decided: Vec<Option<String>> = vec![None; uses.len()];
    let mut enclosing: Vec<Option<usize>> = vec![None; uses.len()];
    for &index in order.iter().rev() {
        let usage = &uses[index];
        let refusal = if usage.time_ms > arrived_ms.saturating_add(SIGNATURE_WINDOW_MS) {
            Some(format!(
                "from the future: used at {} ms, after the batch arrived at {arrived_ms} ms",
                usage.time_ms
            ))
        } else if usage.time_ms < arrived_ms.saturating_sub(USE_AGE_MAX_MS) {
            Some(format!(
                "too old: used at {} ms, more than {} days before the batch arrived at {arrived_ms} ms",
                usage.time_ms,
                USE_AGE_MAX_MS / (24 * 3600 * 1000)
            ))
        } else {
            match usage.payer {
                Some(Payer::Customer(cid)) => {
                    (!lookups.granted(cid, usage.time_ms, arrived_ms, late_ms)).then(|| {
                        format!(
                            "no grant: {cid} has no live grant for this meter at the use's time"
                        )
                    })
                }
                Some(Payer::OwnerOf(product)) => {
                    let next = next_commit.get(&(usage.context.as_ref(), product)).copied();
                    enclosing[index] = next;
                    let enclosing_refused = next.is_none_or(|at| decided[at].is_some());
                    component_refusal(lookups, usage, product, enclosing_refused)
                }
                None => Some("nobody would pay: no enclosing login or query".to_owned()),
            }
        };
        next_commit.insert((usage.context.as_ref(), usage.pid), index);
        decided[index] = refusal;
    }
    for ((usage, refusal), enclosing) in uses.iter_mut().zip(decided).zip(enclosing) {
        usage.refusal = refusal;
        usage.enclosing = enclosing;
    }
}

/// Why the owner of `enclosing` may not be charged for `usage`, if not.
fn component_refusal(
    lookups: &Lookups,
    usage: &Use,
    enclosing: Pid,
    enclosing_refused: bool,
) -> Option<String> {
    let Some(Some(product)) = lookups.products.get(&enclosing) else {
        return Some(format!("unknown enclosing product {enclosing}"));
    };
    if product.pid != enclosing {
        return Some(format!(
            "no grant: components are not charged inside a use of the test PID {enclosing}"
        ));
    }
    let Some(Some(component)) = lookups.products.get(&usage.pid) else {
        return Some(format!("unknown PID {}", usage.pid));
    };
    if !product.components.contains(&component.pid) {
        return Some(format!(
            "no grant: {} did not declare {} a component of {enclosing}",
            product.owner, component.pid
        ));
    }
    if enclosing_refused {
        return Some(format!(
            "no grant: not inside an authorized use of {enclosing} in the same batch and context"
        ));
    }
    None
}

/// The sequence numbers a batch's readings span in their meter instance:
/// the instance is the batch id up to its last `:` when what follows is the
/// first sequence number, as our meter writes ids; `None` for other ids
/// and for batches without readings.
fn seq_range_of(key: &BatchKey, readings: &[Reading]) -> Option<SeqRange> {
    let (instance, first) = key.id.as_str().rsplit_once(':')?;
    let first: u64 = first.parse().ok()?;
    let low = readings.iter().map(|reading| reading.seq).min()?;
    let high = readings.iter().map(|reading| reading.seq).max()?;
    (low == first).then(|| SeqRange {
        mid: key.mid,
        instance: instance.to_owned(),
        first: low,
        last: high,
    })
}

/// The itemised records of a batch applied at `arrived_ms` (`itemised`):
/// every reading in order, each commit with its outcome (in the order of
/// the batch's uses) and the number of the transfer it was summed into.
fn itemised_records(
    key: &BatchKey,
    body: &SendBody,
    outcomes: Vec<(crate::itemised::Outcome, Option<usize>)>,
    prepared: &[crate::ledger::Transfer],
    arrived_ms: u64,
) -> Vec<Vec<u8>> {
    use crate::itemised::{Encoder, MINIMAL_CONTEXT, Outcome};
    let range = prepared.first().zip(prepared.last());
    let mut encoder = Encoder::new(
        key.mid,
        key.id.clone(),
        arrived_ms,
        range.map(|(first, last)| (first.id, last.id)),
    );
    let mut outcomes = outcomes.into_iter().map(|(outcome, at)| match outcome {
        Outcome::Priced(mut priced) => {
            priced.transfer = at.map(|at| prepared[at].id);
            Outcome::Priced(priced)
        }
        other => other,
    });
    let mut push = |reading: &Reading| {
        let outcome = match reading.event {
            Event::Commit { .. } => outcomes
                .next()
                .expect("send: every commit of a batch has an outcome"),
            _ => Outcome::NotPriced,
        };
        encoder.push(reading, &outcome);
    };
    match body {
        SendBody::Batch(batch) => batch.readings.iter().for_each(&mut push),
        SendBody::Minimal(events) => {
            let context = proto::Context::parse(MINIMAL_CONTEXT).expect("a valid context");
            for (index, event) in events.iter().enumerate() {
                push(&Reading {
                    seq: index as u64,
                    time_ms: arrived_ms,
                    context: context.clone(),
                    event: *event,
                });
            }
        }
    }
    encoder.finish()
}

/// The itemised records of uses priced again out of suspense at
/// `posted_ms`, one set per batch they came in, and when they are written:
/// after every such batch arrived, so that they never share a key with the
/// batch's own records.
fn repriced_records(
    resolved: &[Suspense],
    outcomes: Vec<(crate::itemised::Outcome, Option<usize>)>,
    prepared: &[crate::ledger::Transfer],
    posted_ms: u64,
) -> (u64, Vec<crate::store::RepricedItems>) {
    use crate::itemised::{Encoder, Outcome};
    let arrived_ms = resolved
        .iter()
        .map(|record| record.arrived_ms.saturating_add(1))
        .fold(posted_ms, u64::max);
    let context = proto::Context::parse("suspense").expect("a valid context");
    let mut index: HashMap<BatchKey, usize> = HashMap::new();
    let mut sets: Vec<(BatchKey, Encoder, Vec<crate::ledger::TransferId>)> = Vec::new();
    for (record, (outcome, at)) in resolved.iter().zip(outcomes) {
        let key = BatchKey {
            mid: record.mid,
            id: record.batch.clone(),
        };
        let set = *index.entry(key.clone()).or_insert_with(|| {
            let encoder = Encoder::repriced(key.mid, key.id.clone(), arrived_ms);
            sets.push((key, encoder, Vec::new()));
            sets.len() - 1
        });
        let (_, encoder, transfers) = &mut sets[set];
        let outcome = match outcome {
            Outcome::Priced(mut priced) => {
                priced.transfer = at.map(|at| prepared[at].id);
                if let Some(id) = priced.transfer
                    && !transfers.contains(&id)
                {
                    transfers.push(id);
                }
                Outcome::Priced(priced)
            }
            other => other,
        };
        let reading = Reading {
            seq: record.seq,
            time_ms: record.time_ms,
            context: context.clone(),
            event: Event::Commit {
                pid: record.pid,
                payer: record
                    .payer
                    .as_deref()
                    .and_then(|text| Payer::parse(text).ok()),
            },
        };
        encoder.push(&reading, &outcome);
    }
    let sets = sets
        .into_iter()
        .map(|(key, encoder, transfers)| crate::store::RepricedItems {
            key,
            transfers,
            records: encoder.finish(),
        })
        .collect();
    (arrived_ms, sets)
}

/// Every party whose standing the answer reports.
fn parties(body: &SendBody) -> Vec<Payer> {
    let mut parties: Vec<Payer> = match body {
        SendBody::Batch(batch) => batch
            .readings
            .iter()
            .flat_map(|reading| match reading.event {
                Event::Login(cid) | Event::Logout(cid) => vec![Payer::Customer(cid)],
                Event::Query { pid, payer } | Event::Commit { pid, payer } => {
                    let mut parties = vec![Payer::OwnerOf(pid)];
                    parties.extend(payer);
                    parties
                }
            })
            .chain(batch.parties.iter().copied())
            .collect(),
        SendBody::Minimal(events) => events
            .iter()
            .map(|event| match *event {
                Event::Login(cid) | Event::Logout(cid) => Payer::Customer(cid),
                Event::Query { pid, .. } | Event::Commit { pid, .. } => Payer::OwnerOf(pid),
            })
            .collect(),
    };
    parties.sort();
    parties.dedup();
    parties
}

impl<S: Store> Backoffice<S> {
    /// The money path over `store`, whose ledger it loads.
    pub fn open(store: S, params: MeterParams) -> Result<Self, StoreError> {
        let ledger = store.load_ledger()?;
        let device_codes = store.device_codes();
        Ok(Self {
            store,
            pricing: Pricing::new(),
            ledger: Mutex::new(ledger),
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
        let next = ledger.transfers().len() as u64;
        let newer = self
            .store
            .transfers_from(next)
            .map_err(|error| internal(&error))?;
        ledger
            .append_stored(newer)
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

    /// Posts transfers made outside uploads (a deposit from a customer's
    /// macro-account, a withdrawal, a correction): durable first, then in the
    /// ledger. Returns the posted transfers.
    pub fn post(&self, transfers: Vec<NewTransfer>) -> Result<Vec<crate::ledger::Transfer>, Fault> {
        self.still_durable()?;
        let mut ledger = self.ledger_for_write()?;
        let prepared = ledger
            .prepare(transfers, now_ms())
            .map_err(|error| Fault::invalid_params(&error))?;
        // Staged under the lock (transfers reach the store in ledger order),
        // made durable after it, as batches are: the fsync keeps nobody
        // waiting for the ledger.
        self.store
            .stage_transfers(&prepared)
            .map_err(|error| self.stop_money(&error))?;
        ledger.commit(prepared.clone());
        drop(ledger);
        self.durable()?;
        Ok(prepared)
    }

    /// Funds `customer`'s micro-account from their macro-account under a
    /// new random reference (see [`Backoffice::deposit_once`]); a caller
    /// that may retry chooses its reference and calls that instead.
    pub fn deposit(
        &self,
        funding: &dyn crate::funding::MacroAccounts,
        customer: &crate::registry::Customer,
        amount: proto::Amount,
    ) -> Result<crate::ledger::Transfer, Fault> {
        let reference = crate::funding::Reference::random();
        self.deposit_once(funding, customer, amount, &reference)
            .map(|deposited| deposited.transfer)
    }

    /// Funds `customer`'s micro-account from their macro-account, once per
    /// `reference`: the deposit is recorded (durably) before the processor
    /// is asked, the processor's answer is recorded, then the deposit is
    /// posted in the transaction that marks it posted. A call with a
    /// reference already used completes what an earlier call began (asking
    /// the processor again only under the same idempotency key, when it
    /// cannot know whether that call collected) and answers as it did; with
    /// another customer or amount it is refused (304). Nothing is posted
    /// when collection fails.
    pub fn deposit_once(
        &self,
        funding: &dyn crate::funding::MacroAccounts,
        customer: &crate::registry::Customer,
        amount: proto::Amount,
        reference: &crate::funding::Reference,
    ) -> Result<Deposited, Fault> {
        use crate::funding::{DepositRecord, DepositState};
        self.still_durable()?;
        if !amount.is_positive() {
            return Err(Fault::new(
                FaultCode::InvalidParams,
                format!("a deposit must be positive, not {amount}"),
            ));
        }
        let intent = DepositRecord {
            cid: customer.cid,
            amount,
            created_ms: now_ms(),
            state: DepositState::Collecting,
        };
        let (mut record, new) = self
            .store
            .begin_deposit(reference, &intent)
            .map_err(|error| self.stop_money(&error))?;
        self.still_durable()?;
        if record.cid != customer.cid || record.amount != amount {
            return Err(Fault::new(
                FaultCode::RecordRefused,
                "this deposit reference was used for another customer or amount: a retry repeats the deposit it names, a new deposit needs a new reference",
            ));
        }
        if record.state == DepositState::Collecting {
            // Asked again under the same key after a crash or a failed
            // sync: the processor answers as it did, collecting nothing more.
            let key = reference.idempotency_key(&customer.cid);
            let processor = funding
                .collect(customer, amount, &key)
                .map_err(|error| Fault::new(FaultCode::RecordRefused, error.to_string()))?;
            record = self
                .store
                .deposit_collected(reference, &processor)
                .map_err(|error| self.stop_money(&error))?;
            self.still_durable()?;
        }
        if let DepositState::Collected { .. } = record.state {
            let mut ledger = self.ledger_for_write()?;
            self.still_durable()?;
            let prepared = ledger
                .prepare(
                    vec![NewTransfer {
                        debit: AccountId::System(crate::ledger::SystemAccount::Funding),
                        credit: AccountId::Customer(customer.cid),
                        amount,
                        kind: TransferKind::Deposit,
                    }],
                    now_ms(),
                )
                .map_err(|error| Fault::invalid_params(&error))?;
            let ours = prepared[0].id.0;
            record = self
                .store
                .stage_deposit(reference, &prepared[0])
                .map_err(|error| self.stop_money(&error))?;
            let posted_now =
                matches!(record.state, DepositState::Posted { transfer, .. } if transfer == ours);
            if posted_now {
                ledger.commit(prepared);
            }
            drop(ledger);
            // Durable (and no earlier sync failed) before it is answered.
            self.durable()?;
            if posted_now {
                tracing::info!(cid = %customer.cid, %amount, %reference, "deposit posted");
            }
        }
        let DepositState::Posted {
            processor,
            transfer,
        } = record.state
        else {
            return Err(internal(&"a deposit was collected but is not posted"));
        };
        let transfer = usize::try_from(transfer)
            .ok()
            .and_then(|position| self.ledger_read().transfers().get(position).cloned())
            .ok_or_else(|| internal(&"a posted deposit's transfer is not in the ledger"))?;
        Ok(Deposited {
            reference: reference.clone(),
            transfer,
            processor,
            repeated: !new,
        })
    }

    /// Answers one upload at `now_ms`.
    pub fn send(&self, body: &[u8], signed: Signed<'_>, now_ms: u64) -> Result<Value, Fault> {
        let outcome = self
            .verify(signed, body, now_ms)
            .and_then(|verified| self.send_counted(body, verified, now_ms));
        self.count_refused(outcome)
    }

    /// Answers one upload at `now_ms` whose signature `verify` checked.
    pub(crate) fn send_verified(
        &self,
        body: &[u8],
        verified: Verified<'_>,
        now_ms: u64,
    ) -> Result<Value, Fault> {
        let outcome = self.send_counted(body, verified, now_ms);
        self.count_refused(outcome)
    }

    fn count_refused(&self, outcome: Result<Value, Fault>) -> Result<Value, Fault> {
        outcome.map_err(|fault| self.refused(fault))
    }

    /// Counts and logs a refused meter call (`uploads_refused`).
    pub(crate) fn refused(&self, fault: Fault) -> Fault {
        if fault.code != FaultCode::InternalError.code() {
            self.counters
                .uploads_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(code = fault.code, fault = %fault.message, "upload refused");
        fault
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

    /// The signature is over the raw body and was verified before this:
    /// nothing of the body is decoded for someone who cannot sign it.
    fn send_counted(
        &self,
        body: &[u8],
        verified: Verified<'_>,
        now_ms: u64,
    ) -> Result<Value, Fault> {
        self.still_durable()?;
        let request = match SendRequest::decode_extended(body, Limits::BACKOFFICE) {
            Some(request) => request,
            None => {
                let call = parse_call(body, Limits::BACKOFFICE).map_err(Fault::from)?;
                if call.name != proto::upload::SEND_METHOD {
                    return Err(Fault::method_not_found(&call.name));
                }
                SendRequest::from_call(&call)?
            }
        };
        verified.names(&request.mid)?;
        if let SendBody::Minimal(_) = &request.body
            && let Some(answer) = self.minimal_resent(&request, &verified, now_ms)?
        {
            return Ok(answer);
        }
        let signature = self.admit(&verified, now_ms)?;
        let readings = match &request.body {
            SendBody::Batch(batch) => batch.readings.len(),
            SendBody::Minimal(events) => events.len(),
        };
        self.counters
            .readings_received
            .fetch_add(readings as u64, Ordering::Relaxed);
        let id = match &request.body {
            SendBody::Batch(batch) => batch.id.clone(),
            // Cox's form has no batch id: its signature names it.
            SendBody::Minimal(_) => {
                BatchId::parse(&format!("sig:{}", &signature[..32])).expect("hex is a valid id")
            }
        };
        let key = BatchKey {
            mid: request.mid,
            id,
        };
        let digest = match &request.body {
            SendBody::Batch(batch) => Some(proto::upload::readings_digest(&batch.readings)),
            // Cox's form is named by its signature, which covers the body.
            SendBody::Minimal(_) => None,
        };
        if let Some(applied) = self
            .store
            .applied_batch(&key)
            .map_err(|error| internal(&error))?
        {
            return self.repeated(&key, digest.as_ref(), applied, &request.body, now_ms);
        }
        self.apply(&key, digest, &request, now_ms)
    }

    /// Answers a batch id that was applied already: as before when the
    /// readings are the same, fault 205 when they are not (a meter whose
    /// data folder was restored or cloned, or a forged batch).
    fn repeated(
        &self,
        key: &BatchKey,
        digest: Option<&BatchDigest>,
        applied: crate::store::AppliedBatch,
        body: &SendBody,
        now_ms: u64,
    ) -> Result<Value, Fault> {
        // The first send may still be on its way to disk.
        self.durable()?;
        if let (Some(sent), Some(kept)) = (digest, applied.digest.as_ref())
            && sent != kept
        {
            tracing::error!(mid = %key.mid, batch = %key.id, "batch id sent again with other readings: refused");
            return Err(Fault::new(
                FaultCode::BatchConflict,
                format!(
                    "batch {} of {} was applied with other readings; nothing was applied",
                    key.id, key.mid
                ),
            ));
        }
        self.counters
            .batches_repeated
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(mid = %key.mid, batch = %key.id, "batch sent again: answered as before");
        // The same outcome and batch id, with the standings and parameters
        // as they are now (the meter files them as fresh): nothing of the
        // first answer needs keeping.
        let mut lookups = Lookups::with_grants(
            self.store
                .grants_of_meter(&key.mid)
                .map_err(|error| internal(&error))?,
        );
        let ledger = self.ledger_read();
        let standings = self.standings(body, &mut lookups, now_ms, |account| {
            ledger.balance(account)
        })?;
        Ok(match body {
            SendBody::Batch(batch) => SendAnswer {
                batch_id: batch.id.clone(),
                outcome: Outcome::AlreadyApplied,
                standings,
                params: self.params,
            }
            .to_value(),
            SendBody::Minimal(_) => standings_value(&standings),
        })
    }

    /// Cox's form has no batch id: it is named by its signature. The very
    /// same signed body sent again (a client whose answer was lost) gets
    /// the stored answer, even outside the signature window, instead of a
    /// replay fault; it is applied once. `None` when it was not applied.
    fn minimal_resent(
        &self,
        request: &SendRequest,
        verified: &Verified<'_>,
        now_ms: u64,
    ) -> Result<Option<Value>, Fault> {
        // Only the meter's own signature of this very body (verified
        // already) names the batch.
        let key = BatchKey {
            mid: request.mid,
            id: BatchId::parse(&format!("sig:{}", &verified.signature[..32]))
                .expect("hex is a valid id"),
        };
        let Some(applied) = self
            .store
            .applied_batch(&key)
            .map_err(|error| internal(&error))?
        else {
            return Ok(None);
        };
        self.repeated(&key, None, applied, &request.body, now_ms)
            .map(Some)
    }

    /// Checks what the signature headers say before the body is read: the
    /// meter is registered here and not revoked, the time is a number and a
    /// signature of the right form is there. Enough to refuse most
    /// strangers without reading a byte of what they send; `verify` checks
    /// the rest.
    pub fn check_signed_headers(&self, signed: Signed<'_>) -> Result<Mid, Fault> {
        self.signer(signed).map(|signer| signer.0)
    }

    /// The registered, unrevoked meter the headers name, with their time
    /// and signature.
    fn signer<'a>(
        &self,
        signed: Signed<'a>,
    ) -> Result<(Mid, crate::registry::Meter, u64, &'a str), Fault> {
        let bad = |why: &str| Fault::new(FaultCode::BadSignature, why.to_owned());
        let mid = signed
            .mid
            .ok_or_else(|| bad("the X-Meter-Id header is missing"))?;
        let mid = Mid::parse(mid).map_err(|_| bad("the X-Meter-Id header is not a meter id"))?;
        let meter = self
            .store
            .meter(&mid)
            .map_err(|error| internal(&error))?
            .ok_or_else(|| {
                Fault::new(
                    FaultCode::UnknownMeter,
                    format!("{mid} is not registered here"),
                )
            })?;
        if let Some(revoked) = &meter.revoked {
            return Err(Fault::new(
                FaultCode::MeterRevoked,
                format!(
                    "meter {mid} was revoked by {} at {}; nothing was applied. \
                     Register a new meter (a new MID and secret) to upload again",
                    revoked.by,
                    proto::time::utc_text(revoked.at_ms)
                ),
            ));
        }
        let time_ms: u64 = signed
            .time
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| bad("the X-Meter-Time header is missing or not a number"))?;
        let signature = signed
            .signature
            .filter(|signature| {
                signature.len() == proto::auth::SIGNATURE_HEX_LEN
                    && signature.bytes().all(|byte| byte.is_ascii_hexdigit())
            })
            .ok_or_else(|| bad("the X-Meter-Signature header is missing or not a signature"))?;
        Ok((mid, meter, time_ms, signature))
    }

    /// Checks that the signature headers verify `body` with the secret of
    /// the registered meter they name (or, inside the grace after a
    /// rotation, the one before it: the record is read once, so a rotation
    /// committing meanwhile is seen whole or not at all), before anything
    /// of `body` is decoded. A revoked meter is refused with 210 before any
    /// signature is looked at. The caller still checks that the body names
    /// the same meter (`Verified::names`) and, for a new request, the time
    /// window and replays (`admit`).
    pub fn verify<'a>(
        &self,
        signed: Signed<'a>,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Verified<'a>, Fault> {
        let (mid, meter, time_ms, signature) = self.signer(signed)?;
        let mut refusal = None;
        for (secret_hex, used) in meter.secrets_at(now_ms) {
            let secret = Secret::new(secret_hex.as_bytes()).map_err(|error| internal(&error))?;
            match secret.verify(&mid, time_ms, body, signature) {
                Ok(()) => {
                    if used == SecretUsed::Current && meter.previous.is_some() {
                        // The meter has the new secret: the old one is done.
                        self.store
                            .retire_previous_secret(&mid, &meter.secret_hex)
                            .map_err(|error| internal(&error))?;
                        tracing::info!(%mid, "the previous secret verifies no more: the meter signs with the new one");
                    }
                    return Ok(Verified {
                        mid,
                        time_ms,
                        signature,
                        secret,
                    });
                }
                Err(error) => {
                    refusal.get_or_insert(error);
                }
            }
        }
        let mut why = refusal.map_or_else(
            || "no secret of this meter verifies".to_owned(),
            |error| error.to_string(),
        );
        if let Some(rotated) = &meter.rotated {
            why.push_str(&format!(
                "; this meter's secret was rotated by {} at {}: put the new secret in meterd's \
                 secret file",
                rotated.by,
                proto::time::utc_text(rotated.at_ms)
            ));
        }
        Err(Fault::new(FaultCode::BadSignature, why))
    }

    /// Admits a verified request made now: its time is within the window
    /// and its signature was never seen before. Returns the signature.
    pub fn admit(&self, verified: &Verified<'_>, now_ms: u64) -> Result<String, Fault> {
        if verified.time_ms.abs_diff(now_ms) > SIGNATURE_WINDOW_MS {
            return Err(clock_skew(verified.time_ms, now_ms));
        }
        if !lock(&self.seen).admit(verified.signature, verified.time_ms, now_ms) {
            return Err(Fault::new(
                FaultCode::Replay,
                "this signature was used already",
            ));
        }
        Ok(verified.signature.to_owned())
    }

    fn product(
        &self,
        cache: &mut HashMap<Pid, Option<std::sync::Arc<Product>>>,
        pid: Pid,
    ) -> Result<Option<std::sync::Arc<Product>>, Fault> {
        if let Some(product) = cache.get(&pid) {
            return Ok(product.clone());
        }
        let product = self
            .store
            .product(&pid)
            .map_err(|error| internal(&error))?
            .map(std::sync::Arc::new);
        cache.insert(pid, product.clone());
        Ok(product)
    }

    fn payer_cid(
        &self,
        lookups: &mut Lookups,
        payer: Option<Payer>,
    ) -> Result<Result<Cid, String>, Fault> {
        Ok(match payer {
            None => Err("nobody would pay: no enclosing login or query".to_owned()),
            Some(Payer::Customer(cid)) => {
                if self.customer_terms(lookups, cid)?.is_some() {
                    Ok(cid)
                } else {
                    Err(format!("unknown customer {cid}"))
                }
            }
            Some(Payer::OwnerOf(pid)) => match self.product(&mut lookups.products, pid)? {
                Some(product) => Ok(product.owner),
                None => Err(format!("unknown enclosing product {pid}")),
            },
        })
    }

    /// The compiled TACA of `product`, read and compiled once per batch.
    fn taca(
        &self,
        lookups: &mut Lookups,
        product: &Product,
    ) -> Result<Result<std::sync::Arc<crate::pricing::Taca>, String>, Fault> {
        if let Some(taca) = lookups.tacas.get(&product.taca) {
            return Ok(Ok(std::sync::Arc::clone(taca)));
        }
        let module = self
            .store
            .taca_module(&product.taca)
            .map_err(|error| internal(&error))?
            .ok_or_else(|| {
                internal(&format!(
                    "the TACA of {} is missing from the store",
                    product.pid
                ))
            })?;
        Ok(match self.pricing.load(&module) {
            Ok(taca) => {
                lookups
                    .tacas
                    .insert(product.taca, std::sync::Arc::clone(&taca));
                Ok(taca)
            }
            Err(crate::pricing::ModuleError::SampleFailed(PricingError::Busy)) => {
                return Err(pricing_busy());
            }
            Err(error) => Err(error.to_string()),
        })
    }

    /// Reads what `plan` needs of the store for `uses` into `lookups`:
    /// payers, products and their modules.
    fn look_up(&self, lookups: &mut Lookups, uses: &[Use]) -> Result<(), Fault> {
        // The payers first, all in one read (a batch may name thousands).
        let mut payers: Vec<Cid> = Vec::new();
        let mut seen: HashSet<Cid> = HashSet::new();
        for usage in uses {
            if let Some(Payer::Customer(cid)) = usage.payer
                && !lookups.customers.contains_key(&cid)
                && seen.insert(cid)
            {
                payers.push(cid);
            }
        }
        let found = self
            .store
            .customers(&payers)
            .map_err(|error| internal(&error))?;
        for (cid, customer) in payers.into_iter().zip(found) {
            let terms = customer.map(|customer| (customer.credit_limit, customer.denied));
            lookups.customers.insert(cid, terms);
        }
        for usage in uses {
            if let Some(product) = self.product(&mut lookups.products, usage.pid)? {
                self.taca(lookups, &product)?.ok();
            }
            self.payer_cid(lookups, usage.payer)?.ok();
        }
        Ok(())
    }

    /// Resolves one use up to its price: `Ok(Ok(Err(payer)))` for the free
    /// test PID, `Ok(Err(reason))` when it belongs in suspense, `Err` when the
    /// store failed. Counts the use in its period, to be undone if its price
    /// fails.
    fn plan(
        &self,
        lookups: &mut Lookups,
        stored: &mut PeriodCounts,
        periods: &mut HashMap<PeriodKey, u64>,
        usage: &Use,
    ) -> Result<Result<Result<Job, Cid>, String>, Fault> {
        if let Some(refusal) = &usage.refusal {
            return Ok(Err(refusal.clone()));
        }
        let Some(product) = self.product(&mut lookups.products, usage.pid)? else {
            return Ok(Err(format!("unknown PID {}", usage.pid)));
        };
        let payer = match self.payer_cid(lookups, usage.payer)? {
            Ok(cid) => cid,
            Err(reason) => return Ok(Err(reason)),
        };
        if usage.pid == product.test_pid {
            return Ok(Ok(Err(payer))); // The test PID is free.
        }
        if product.max_price.is_none() {
            return Ok(Err(format!(
                "{} declares no maximum price per use (registered before maximums existed): \
                 register it again",
                product.pid
            )));
        }
        let period = PeriodKey {
            payer,
            pid: product.pid,
            month: month_of(usage.time_ms),
        };
        let taca = match self.taca(lookups, &product)? {
            Ok(taca) => taca,
            Err(reason) => return Ok(Err(reason)),
        };
        let count = match periods.get(&period).or_else(|| stored.0.get(&period)) {
            Some(count) => *count,
            None => {
                let count = self
                    .store
                    .period_uses(&period)
                    .map_err(|error| internal(&error))?;
                stored.stored(&[(period, count)]);
                count
            }
        };
        periods.insert(period, count + 1);
        Ok(Ok(Ok(Job {
            taca,
            owner: product.owner,
            period,
            count,
            max_price: product.max_price,
        })))
    }

    /// The billing periods pricing `uses` may count in (a superset: a
    /// component refused while pricing counts in none).
    fn periods_of(&self, lookups: &mut Lookups, uses: &[Use]) -> Result<HashSet<PeriodKey>, Fault> {
        let mut keys = HashSet::new();
        for usage in uses {
            if usage.refusal.is_some() {
                continue;
            }
            let Some(product) = self.product(&mut lookups.products, usage.pid)? else {
                continue;
            };
            if usage.pid == product.test_pid {
                continue;
            }
            if let Ok(payer) = self.payer_cid(lookups, usage.payer)? {
                keys.insert(PeriodKey {
                    payer,
                    pid: product.pid,
                    month: month_of(usage.time_ms),
                });
            }
        }
        Ok(keys)
    }

    /// Reads the stored counts of `periods` into `counts`, in one step.
    fn read_counts(
        &self,
        counts: &mut PeriodCounts,
        periods: impl IntoIterator<Item = PeriodKey>,
    ) -> Result<(), Fault> {
        let periods: Vec<PeriodKey> = periods.into_iter().collect();
        let read = self
            .store
            .period_uses_many(&periods)
            .map_err(|error| internal(&error))?;
        let read: Vec<(PeriodKey, u64)> = periods.into_iter().zip(read).collect();
        counts.stored(&read);
        Ok(())
    }

    /// The counts of `periods` a batch prices with before the ledger is
    /// locked: those this node keeps in memory where nobody else wrote
    /// since its last write (and no other batch is using them just now),
    /// the rest read from the store. Only a starting point: under the lock
    /// `counts_unchanged` checks them against the store's.
    fn early_counts(
        &self,
        periods: impl IntoIterator<Item = PeriodKey>,
    ) -> Result<PeriodCounts, Fault> {
        let mut counts = PeriodCounts::default();
        let mut missing: Vec<PeriodKey> = periods.into_iter().collect();
        if self.store.unchanged_since_own_write()
            && let Ok(kept) = self.period_counts.try_lock()
        {
            missing.retain(|period| match kept.0.get(period) {
                Some(count) => {
                    counts.0.insert(*period, *count);
                    false
                }
                None => true,
            });
        }
        self.read_counts(&mut counts, missing)?;
        Ok(counts)
    }

    /// Whether every period count a batch was priced with (`bases`, read
    /// before the ledger was locked) is still the stored one; called with
    /// the ledger locked.
    fn counts_unchanged(
        &self,
        stored: &mut PeriodCounts,
        bases: &PeriodCounts,
    ) -> Result<bool, Fault> {
        let missing: Vec<PeriodKey> = bases
            .0
            .keys()
            .filter(|period| !stored.0.contains_key(period))
            .copied()
            .collect();
        self.read_counts(stored, missing)?;
        for (period, base) in &bases.0 {
            let now = match stored.0.get(period) {
                Some(count) => *count,
                None => {
                    let count = self
                        .store
                        .period_uses(period)
                        .map_err(|error| internal(&error))?;
                    stored.stored(&[(*period, count)]);
                    count
                }
            };
            if now != *base {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Prices `uses` as `price_uses` does, then refuses every component
    /// whose enclosing use was not charged (its price failed, or went above
    /// the maximum) and prices again from the start, until no more change:
    /// a producer pays for a component only inside a use that was charged.
    fn price_chains(
        &self,
        lookups: &mut Lookups,
        stored: &mut PeriodCounts,
        periods: &mut HashMap<PeriodKey, u64>,
        uses: &mut [Use],
    ) -> Result<Vec<Fate>, Fault> {
        loop {
            let fates = self.price_uses(lookups, stored, periods, uses)?;
            let mut changed = false;
            for index in 0..uses.len() {
                let Some(at) = uses[index].enclosing else {
                    continue;
                };
                if uses[index].refusal.is_none() && !matches!(fates[at], Fate::Priced { .. }) {
                    uses[index].refusal = Some(format!(
                        "no grant: its enclosing use of {} (seq {}) was not charged",
                        uses[at].pid, uses[at].seq
                    ));
                    changed = true;
                }
            }
            if !changed {
                return Ok(fates);
            }
            periods.clear();
        }
    }

    /// Prices `uses` in order, as if one after the other: the prices
    /// themselves run on all cores, each in an instance as instantiated.
    fn price_uses(
        &self,
        lookups: &mut Lookups,
        stored: &mut PeriodCounts,
        periods: &mut HashMap<PeriodKey, u64>,
        uses: &[Use],
    ) -> Result<Vec<Fate>, Fault> {
        let mut fates = Vec::with_capacity(uses.len());
        let mut jobs = Vec::new();
        for usage in uses {
            match self.plan(lookups, stored, periods, usage)? {
                Err(reason) => fates.push(Fate::Suspense(reason)),
                Ok(Err(payer)) => fates.push(Fate::Free { payer: Some(payer) }),
                Ok(Ok(job)) => {
                    jobs.push((fates.len(), job));
                    fates.push(Fate::Free { payer: None }); // Replaced by its price below.
                }
            }
        }
        let work: Vec<_> = jobs
            .iter()
            .map(|(_, job)| (std::sync::Arc::clone(&job.taca), job.input(job.count)))
            .collect();
        let results = self.pricing.price_many(&work);
        // A use whose price fails does not count in its period, so the later
        // uses of that period were priced one too high: price them again.
        let mut failed: HashMap<PeriodKey, u64> = HashMap::new();
        for ((index, job), result) in jobs.into_iter().zip(results) {
            let shift = failed.get(&job.period).copied().unwrap_or(0);
            let result = if shift == 0 {
                result
            } else {
                self.pricing.price(&job.taca, &job.input(job.count - shift))
            };
            // Every slot busy past the wait is this server's state, not the
            // TACA's failure: nothing is applied, and the meter retries.
            if matches!(result, Err(PricingError::Busy)) {
                return Err(pricing_busy());
            }
            let result = result
                .map_err(|error| error.to_string())
                .and_then(|priced| match job.max_price {
                    Some(max) if priced.amount > max => Err(format!(
                        "price {} above the product's maximum of {max} per use",
                        priced.amount
                    )),
                    _ => Ok(priced),
                });
            fates[index] = match result {
                Ok(priced) => {
                    self.counters.prices.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .pricing_fuel
                        .fetch_add(priced.fuel, Ordering::Relaxed);
                    Fate::Priced {
                        payer: job.period.payer,
                        owner: job.owner,
                        amount: priced.amount,
                        fuel: priced.fuel,
                        taca: job.taca.hash(),
                        period_uses: job.count - shift,
                    }
                }
                Err(reason) => {
                    *failed.entry(job.period).or_insert(0) += 1;
                    Fate::Suspense(reason)
                }
            };
        }
        for (period, shift) in failed {
            if let Some(count) = periods.get_mut(&period) {
                *count -= shift;
            }
        }
        Ok(fates)
    }

    /// Prices every reading in suspense again (after a product or customer
    /// was registered, say). What prices now is posted and leaves suspense;
    /// the rest stays. Returns how many were priced and how many remain.
    pub fn reprice_suspense(&self) -> Result<(usize, usize), Fault> {
        self.still_durable()?;
        // Read under the ledger's lock: two re-pricings at once would
        // otherwise both price (and post) the same readings.
        let mut ledger = self.ledger_for_write()?;
        let records = self.store.suspense().map_err(|error| internal(&error))?;
        let mut lookups = Lookups::default();
        let mut periods: HashMap<PeriodKey, u64> = HashMap::new();
        let mut totals = Totals::default();
        let mut resolved = Vec::new();
        let mut stored = lock(&self.period_counts);
        let mut grants: HashMap<Mid, Vec<Grant>> = HashMap::new();
        let mut uses: Vec<Use> = Vec::with_capacity(records.len());
        for record in &records {
            let payer = record
                .payer
                .as_deref()
                .and_then(|text| Payer::parse(text).ok());
            // The same rules as when the batch came: a customer through a
            // grant that covered the use when its batch arrived, a
            // component only where the chain was shown then.
            let late_ms = self.late_ms();
            let refusal = match payer {
                // Put in suspense before grants existed: decided under other
                // rules, so never charged by re-pricing; for an operator.
                _ if record.arrived_ms == 0 => Some(format!(
                    "kept from before grants, for an operator to decide: {}",
                    record.reason
                )),
                _ if record.time_ms > record.arrived_ms.saturating_add(SIGNATURE_WINDOW_MS) => {
                    Some("from the future: used after its batch arrived".to_owned())
                }
                _ if record.time_ms < record.arrived_ms.saturating_sub(USE_AGE_MAX_MS) => {
                    Some("too old: used long before its batch arrived".to_owned())
                }
                Some(Payer::Customer(cid)) => {
                    let of_meter = match grants.entry(record.mid) {
                        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                        std::collections::hash_map::Entry::Vacant(entry) => entry.insert(
                            self.store
                                .grants_of_meter(&record.mid)
                                .map_err(|error| internal(&error))?,
                        ),
                    };
                    let covered = of_meter.iter().any(|grant| {
                        grant.cid == cid
                            && grant_covers(grant, record.time_ms, record.arrived_ms, late_ms)
                    });
                    (!covered).then(|| record.reason.clone())
                }
                Some(Payer::OwnerOf(_)) if record.authorized => None,
                Some(Payer::OwnerOf(_)) | None => Some(record.reason.clone()),
            };
            uses.push(Use {
                seq: record.seq,
                pid: record.pid,
                payer,
                time_ms: record.time_ms,
                context: None,
                refusal,
                enclosing: None,
            });
        }
        // In chunks, in order (the period counts carry over), with a
        // progress line per chunk: suspense may hold millions of readings.
        let mut fates = Vec::with_capacity(uses.len());
        for (done, chunk) in uses.chunks(REPRICE_CHUNK).enumerate() {
            fates.extend(self.price_uses(&mut lookups, &mut stored, &mut periods, chunk)?);
            if uses.len() > REPRICE_CHUNK {
                tracing::info!(
                    priced = (done * REPRICE_CHUNK + chunk.len()),
                    of = uses.len(),
                    "re-pricing suspense"
                );
            }
        }
        // What became of each use priced now, kept itemised with the
        // transfers it was summed into (`itemised`).
        let mut outcomes: Vec<(crate::itemised::Outcome, Option<usize>)> = Vec::new();
        let mut free = FreeUses::default();
        for (record, fate) in records.iter().zip(fates) {
            let outcome = match fate {
                Fate::Suspense(_) => continue,
                Fate::Free { payer } => {
                    free.count(payer, record.pid, record.time_ms);
                    (crate::itemised::Outcome::Free, None)
                }
                Fate::Priced {
                    payer,
                    owner,
                    amount,
                    fuel,
                    taca,
                    period_uses,
                } => {
                    let at = totals.add_at(payer, owner, record.pid, &record.batch, amount)?;
                    if at.is_none() {
                        free.count(Some(payer), record.pid, record.time_ms);
                    }
                    let priced = crate::itemised::PricedUse {
                        payer,
                        owner,
                        amount,
                        fuel,
                        taca,
                        period_uses,
                        transfer: None,
                    };
                    (crate::itemised::Outcome::Priced(priced), at)
                }
            };
            outcomes.push(outcome);
            resolved.push(record.clone());
        }
        let transfers = totals.transfers;
        let posted_ms = now_ms();
        let prepared = ledger
            .prepare(transfers, posted_ms)
            .map_err(|error| internal(&error))?;
        let period_uses: Vec<(PeriodKey, u64)> = periods.into_iter().collect();
        let free_uses = free.added();
        // Each re-pricing's records get a time of their own, after the
        // last one's: two in one millisecond would otherwise take the same
        // keys, which the store refuses.
        let after = self.repriced_at_ms.load(Ordering::Relaxed);
        let (arrived_ms, sets) = repriced_records(
            &resolved,
            outcomes,
            &prepared,
            posted_ms.max(after.saturating_add(1)),
        );
        self.store
            .resolve_suspense_itemised(
                &resolved,
                &prepared,
                &period_uses,
                &free_uses,
                arrived_ms,
                &sets,
            )
            .map_err(|error| self.stop_money(&error))?;
        self.repriced_at_ms.store(arrived_ms, Ordering::Relaxed);
        self.still_durable()?;
        stored.stored(&period_uses);
        ledger.commit(prepared);
        Ok((resolved.len(), records.len() - resolved.len()))
    }

    fn apply(
        &self,
        key: &BatchKey,
        digest: Option<BatchDigest>,
        request: &SendRequest,
        now_ms: u64,
    ) -> Result<Value, Fault> {
        let started = std::time::Instant::now();
        let mut uses = match &request.body {
            SendBody::Batch(batch) => extended_uses(&batch.readings),
            SendBody::Minimal(events) => minimal_uses(events, now_ms),
        };
        let mut lookups = Lookups::with_grants(
            self.store
                .grants_of_meter(&key.mid)
                .map_err(|error| internal(&error))?,
        );
        let mut periods: HashMap<PeriodKey, u64> = HashMap::new();
        let mut totals = Totals::default();
        let mut suspense = Vec::new();
        // Customers, products and modules are read before the books are
        // locked, so that another meter's batch is not kept waiting for them.
        self.look_up(&mut lookups, &uses)?;
        authorize(&mut uses, &lookups, now_ms, self.late_ms());
        let seq_range = match &request.body {
            SendBody::Batch(batch) => seq_range_of(key, &batch.readings),
            SendBody::Minimal(_) => None,
        };
        // Priced before the books are locked, so that one meter's TACA
        // calls keep no other batch or deposit waiting: the billing periods
        // it counts in are reserved first (a batch of the same payers waits
        // for them), and under the lock the counts it was priced with are
        // checked (re-pricing, which does not reserve, may have moved them):
        // if any moved, the batch is priced again there.
        let priced_in = self.periods_of(&mut lookups, &uses)?;
        let reserved = self.periods_in_use.reserve(priced_in.clone())?;
        let unpriced = uses.clone();
        // The counts they start from, read in one step once reserved.
        let mut bases = self.early_counts(priced_in)?;
        let mut periods_early: HashMap<PeriodKey, u64> = HashMap::new();
        let early = self.price_chains(&mut lookups, &mut bases, &mut periods_early, &mut uses)?;
        let mut ledger = self.ledger_for_write()?;
        // Under the lock, where batches are staged one at a time: a batch
        // id that came meanwhile is a repeat, and readings that another
        // batch id of the same meter instance brought are refused.
        if let Some(applied) = self
            .store
            .applied_batch(key)
            .map_err(|error| internal(&error))?
        {
            drop(ledger);
            return self.repeated(key, digest.as_ref(), applied, &request.body, now_ms);
        }
        if let Some(range) = &seq_range
            && let Some((first, last)) = self
                .store
                .overlapping_range(range)
                .map_err(|error| internal(&error))?
        {
            tracing::error!(mid = %key.mid, batch = %key.id, first, last, "readings sent again under another batch id: refused");
            return Err(Fault::new(
                FaultCode::BatchConflict,
                format!(
                    "batch {} of {} brings readings {first} to {last} of its meter instance \
                     again, applied before in another batch; nothing was applied",
                    key.id, key.mid
                ),
            ));
        }
        let mut stored = lock(&self.period_counts);
        let fates = if self.counts_unchanged(&mut stored, &bases)? {
            periods = periods_early;
            early
        } else {
            self.counters
                .batches_repriced
                .fetch_add(1, Ordering::Relaxed);
            uses = unpriced;
            self.price_chains(&mut lookups, &mut stored, &mut periods, &mut uses)?
        };
        // What became of each use, for the batch's itemised readings, with
        // the index of the transfer it was summed into.
        let mut outcomes: Vec<(crate::itemised::Outcome, Option<usize>)> =
            Vec::with_capacity(uses.len());
        let mut free = FreeUses::default();
        for (usage, fate) in uses.iter().zip(fates) {
            match fate {
                Fate::Free { payer } => {
                    free.count(payer, usage.pid, usage.time_ms);
                    outcomes.push((crate::itemised::Outcome::Free, None));
                }
                Fate::Priced {
                    payer,
                    owner,
                    amount,
                    fuel,
                    taca,
                    period_uses,
                } => {
                    let at = totals.add_at(payer, owner, usage.pid, &key.id, amount)?;
                    if at.is_none() {
                        free.count(Some(payer), usage.pid, usage.time_ms);
                    }
                    let priced = crate::itemised::PricedUse {
                        payer,
                        owner,
                        amount,
                        fuel,
                        taca,
                        period_uses,
                        transfer: None,
                    };
                    outcomes.push((crate::itemised::Outcome::Priced(priced), at));
                }
                Fate::Suspense(reason) => {
                    outcomes.push((crate::itemised::Outcome::Suspense(reason.clone()), None));
                    suspense.push(Suspense {
                        mid: key.mid,
                        batch: key.id.clone(),
                        seq: usage.seq,
                        pid: usage.pid,
                        payer: usage.payer.map(|payer| payer.to_string()),
                        time_ms: usage.time_ms,
                        reason,
                        authorized: usage.refusal.is_none(),
                        arrived_ms: now_ms,
                    });
                }
            }
        }
        let transfers = totals.transfers;
        let prepared = ledger
            .prepare(transfers, now_ms)
            .map_err(|error| internal(&error))?;
        let mut balances: HashMap<AccountId, proto::Amount> = HashMap::new();
        for transfer in &prepared {
            for posting in transfer.postings() {
                let balance = balances
                    .entry(posting.account)
                    .or_insert_with(|| ledger.balance(&posting.account));
                *balance = balance
                    .checked_add(posting.amount)
                    .map_err(|error| internal(&error))?;
            }
        }
        let standings = self.standings(&request.body, &mut lookups, now_ms, |account| {
            balances
                .get(account)
                .copied()
                .unwrap_or_else(|| ledger.balance(account))
        })?;
        let value = match &request.body {
            SendBody::Batch(batch) => SendAnswer {
                batch_id: batch.id.clone(),
                outcome: Outcome::Applied,
                standings,
                params: self.params,
            }
            .to_value(),
            SendBody::Minimal(_) => standings_value(&standings),
        };
        if uses.is_empty()
            && let SendBody::Batch(batch) = &request.body
            && batch.readings.is_empty()
        {
            // A refresh of the status table changes nothing: nothing to
            // apply once, so nothing is stored (any local user can ask for
            // one with `meterd flush`).
            return Ok(value);
        }
        let period_uses: Vec<(PeriodKey, u64)> = periods.into_iter().collect();
        let free_uses = free.added();
        let effects = BatchEffects {
            transfers: &prepared,
            period_uses: &period_uses,
            free_uses: &free_uses,
            suspense: &suspense,
            answer: b"",
            digest,
            seq_range: seq_range.as_ref(),
        };
        let transfer_count = prepared.len();
        let itemised = itemised_records(key, &request.body, outcomes, &prepared, now_ms);
        // Staged under the lock (so batches reach the store in the order they
        // reach the ledger), made durable after it: the fsync is shared with
        // the other meters' batches instead of keeping them waiting.
        match self
            .store
            .stage_batch_itemised(key, effects, now_ms, &itemised)
        {
            Ok(()) => {
                stored.stored(&period_uses);
                drop(stored);
                ledger.commit(prepared);
                drop(ledger);
                drop(reserved);
                self.durable()?;
                let oldest = uses
                    .iter()
                    .map(|usage| usage.time_ms)
                    .min()
                    .unwrap_or(now_ms);
                let counters = &self.counters;
                counters.batches_applied.fetch_add(1, Ordering::Relaxed);
                counters
                    .suspended
                    .fetch_add(suspense.len() as u64, Ordering::Relaxed);
                counters
                    .upload_lag_ms
                    .store(now_ms.saturating_sub(oldest), Ordering::Relaxed);
                tracing::info!(
                    mid = %key.mid,
                    batch = %key.id,
                    uses = uses.len(),
                    transfers = transfer_count,
                    suspense = suspense.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "batch applied"
                );
                Ok(value)
            }
            Err(StoreError::AlreadyApplied(_)) => {
                drop(stored);
                drop(ledger);
                let applied = self
                    .store
                    .applied_batch(key)
                    .map_err(|error| internal(&error))?
                    .expect("an applied batch has an answer");
                self.repeated(key, digest.as_ref(), applied, &request.body, now_ms)
            }
            // The batch may or may not be stored (a database can commit and
            // lose the answer): the ledger in memory may be out of step.
            Err(error) => Err(self.stop_money(&error)),
        }
    }

    /// A customer's credit limit and deny flag, read once per batch; `None`
    /// when there is no such customer.
    fn customer_terms(
        &self,
        lookups: &mut Lookups,
        cid: Cid,
    ) -> Result<Option<(proto::Amount, bool)>, Fault> {
        if let Some(terms) = lookups.customers.get(&cid) {
            return Ok(*terms);
        }
        let terms = self
            .store
            .customer(&cid)
            .map_err(|error| internal(&error))?
            .map(|customer| (customer.credit_limit, customer.denied));
        lookups.customers.insert(cid, terms);
        Ok(terms)
    }

    /// The standing of every party the answer reports. A customer is in
    /// good standing for this meter only through a grant live now: a meter
    /// learns nothing of customers who did not grant it (they are all
    /// "deny"), and a revoked grant turns the meter's answers to "deny".
    fn standings(
        &self,
        body: &SendBody,
        lookups: &mut Lookups,
        now_ms: u64,
        balance: impl Fn(&AccountId) -> proto::Amount,
    ) -> Result<Vec<Standing>, Fault> {
        let mut standings = Vec::new();
        for party in parties(body) {
            let cid = match party {
                Payer::Customer(cid) if !lookups.granted(cid, now_ms, now_ms, 0) => None,
                Payer::Customer(cid) => Some(cid),
                Payer::OwnerOf(pid) => self
                    .product(&mut lookups.products, pid)?
                    .map(|product| product.owner),
            };
            let terms = match cid {
                Some(cid) => self.customer_terms(lookups, cid)?.map(|terms| (cid, terms)),
                None => None,
            };
            let allowed = terms.is_some_and(|(cid, (credit_limit, denied))| {
                in_good_standing(balance(&AccountId::Customer(cid)), credit_limit, denied)
            });
            standings.push(Standing { party, allowed });
        }
        Ok(standings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_utc_calendar_months() {
        assert_eq!(month_of(0), 197_001);
        assert_eq!(month_of(951_782_400_000), 200_002, "2000-02-29");
        assert_eq!(month_of(951_868_800_000), 200_003, "2000-03-01");
        assert_eq!(month_of(1_798_761_599_000), 202_612, "2026-12-31 23:59:59");
        assert_eq!(month_of(1_798_761_600_000), 202_701, "2027-01-01");
    }

    fn cid(n: u32) -> Cid {
        Cid::parse(&format!("B1-C{n}")).unwrap()
    }

    fn pid(n: u32) -> Pid {
        Pid::parse(&format!("B1-P{n}")).unwrap()
    }

    #[test]
    fn coxs_minimal_form_nests_within_the_batch() {
        let events = [
            Event::Login(cid(1)),
            Event::Query {
                pid: pid(1),
                payer: None,
            },
            Event::Query {
                pid: pid(2),
                payer: None,
            },
            Event::Commit {
                pid: pid(2),
                payer: None,
            },
            Event::Commit {
                pid: pid(1),
                payer: None,
            },
            Event::Logout(cid(1)),
            Event::Query {
                pid: pid(3),
                payer: None,
            },
            Event::Commit {
                pid: pid(3),
                payer: None,
            },
        ];
        let uses = minimal_uses(&events, 0);
        let resolved: Vec<(Pid, Option<Payer>)> =
            uses.iter().map(|usage| (usage.pid, usage.payer)).collect();
        assert_eq!(
            resolved,
            vec![
                (pid(2), Some(Payer::OwnerOf(pid(1)))),
                (pid(1), Some(Payer::Customer(cid(1)))),
                (pid(3), None),
            ]
        );
    }

    #[test]
    fn replayed_signatures_are_refused_and_old_ones_forgotten() {
        let mut seen = SeenSignatures::default();
        assert!(seen.admit("a", 1_000, 1_000));
        assert!(!seen.admit("a", 1_000, 2_000));
        assert!(seen.admit("b", 2_000, 2_000));
        let later = 1_000 + 2 * SIGNATURE_WINDOW_MS + 1;
        assert!(seen.admit("c", later, later));
        assert!(
            seen.admit("a", later, later),
            "forgotten once outside twice the window"
        );
    }

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
    fn a_deposit_retried_after_a_crash_between_collection_and_posting_is_collected_and_posted_once()
    {
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
}
