//! Planning and pricing a batch's uses: who may be charged for each
//! (grants, components), the billing periods they count in, and their
//! prices.

use crate::hashing::{Map, Set};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use proto::reading::{Event, Reading};
use proto::{Amount, BatchId, Cid, Code, Fault, Payer, Pid};

use super::{Backoffice, SIGNATURE_WINDOW_MS, internal, lock};
use crate::ledger::{AccountId, NewTransfer, TransferKind};
use crate::pricing::{PriceInput, PricingError};
use crate::registry::{Grant, MeterGrants, Product};
use crate::store::{PeriodKey, Store};

/// Every pricing slot stayed busy past `SLOT_WAIT_MS`: the batch is
/// refused as a whole, retryably (busy is no TACA's failure, and never
/// sends a use to suspense).
fn pricing_busy() -> Fault {
    internal(&"every pricing slot stayed busy; nothing was applied: send the batch again")
}

/// What one batch looks up, kept for the batch so each is read once.
#[derive(Default)]
pub(super) struct Lookups {
    /// Shared, not cloned, by every reading of the product.
    pub(super) products: Map<Pid, Option<std::sync::Arc<Product>>>,
    /// What decides each customer's standing: credit limit and deny flag
    /// (`None`: no such customer).
    customers: Map<Cid, Option<(proto::Amount, bool)>>,
    /// Each TACA's place in `taca_list`: jobs name their TACA by that
    /// place, so that no reference count turns over per reading.
    tacas: Map<crate::pricing::TacaHash, usize>,
    taca_list: Vec<std::sync::Arc<crate::pricing::Taca>>,
    /// Every grant given to the sending meter, live or not, by customer.
    grants: std::sync::Arc<MeterGrants>,
    /// The product last asked for: a batch's uses are mostly of a few
    /// products, one after the other.
    recent_product: Option<(Pid, Option<ProductFacts>)>,
    /// The UTC day (since the epoch) last asked for, and its month.
    recent_day: Option<(u64, u32)>,
    /// The TACA last asked for, and its place in `taca_list`.
    recent_taca: Option<(crate::pricing::TacaHash, usize)>,
}

impl Lookups {
    /// Keeps the sending meter's grants, by customer.
    pub(super) fn with_grants(grants: std::sync::Arc<MeterGrants>) -> Lookups {
        Lookups {
            grants,
            ..Lookups::default()
        }
    }

    /// The month (`month_of`) of `time_ms`, worked out once per day of
    /// the batch's uses.
    fn month_of(&mut self, time_ms: u64) -> u32 {
        const DAY_MS: u64 = 24 * 3600 * 1000;
        let day = time_ms / DAY_MS;
        match self.recent_day {
            Some((recent, month)) if recent == day => month,
            _ => {
                let month = month_of(time_ms);
                self.recent_day = Some((day, month));
                month
            }
        }
    }

    /// True when a use by `cid` at `use_ms`, in a batch that arrived at
    /// `arrived_ms`, may be charged through a grant of the sending meter.
    pub(super) fn granted(&self, cid: Cid, use_ms: u64, arrived_ms: u64, late_ms: u64) -> bool {
        self.grants
            .of(&cid)
            .any(|grant| grant_covers(grant, use_ms, arrived_ms, late_ms))
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
pub(super) struct PeriodCounts(pub(super) Map<PeriodKey, u64>);

impl PeriodCounts {
    /// Records counts that are now stored.
    pub(super) fn stored(&mut self, counts: &[(PeriodKey, u64)]) {
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
///
/// A batch that has priced hands its periods over with the counts it
/// reached (`Reserved::hand_over`): the next batch of the same payers
/// prices from those while the first is still being posted and stored,
/// instead of waiting for it to be durable. That is only a guess: when
/// the first is not posted after all (a repeat, a conflict, a failed
/// store) or is priced again under the lock, the counts the second priced
/// with are not the stored ones, and `counts_unchanged` prices it again
/// under the lock.
#[derive(Default)]
pub(super) struct PeriodsInUse {
    held: Mutex<HeldPeriods>,
    freed: std::sync::Condvar,
}

#[derive(Default)]
struct HeldPeriods {
    /// Numbers the batches that reserve, to tell their entries apart.
    next_holder: u64,
    periods: Map<PeriodKey, Held>,
}

/// A period some batch holds.
#[derive(Clone, Copy)]
struct Held {
    holder: u64,
    /// `None` while the holder prices it; then the count it reached.
    handed_over_at: Option<u64>,
}

/// Periods reserved by one batch, freed when dropped.
pub(super) struct Reserved<'a> {
    from: &'a PeriodsInUse,
    holder: u64,
    keys: Vec<PeriodKey>,
    /// Counts handed over by an earlier batch still being posted.
    pub(super) handed: Map<PeriodKey, u64>,
}

impl PeriodsInUse {
    /// Waits (at most `PERIODS_WAIT_MS`) until no other batch prices any
    /// of `keys`, then reserves them all at once (so no two batches can
    /// each wait for the other).
    pub(super) fn reserve(&self, keys: Set<PeriodKey>) -> Result<Reserved<'_>, Fault> {
        let being_priced = |held: &HeldPeriods| {
            keys.iter().any(|key| {
                held.periods
                    .get(key)
                    .is_some_and(|entry| entry.handed_over_at.is_none())
            })
        };
        let held = lock(&self.held);
        let (mut held, _) = self
            .freed
            .wait_timeout_while(
                held,
                std::time::Duration::from_millis(PERIODS_WAIT_MS),
                |held| being_priced(held),
            )
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if being_priced(&held) {
            return Err(internal(
                &"other batches of the same payers stayed in pricing; nothing was applied: send the batch again",
            ));
        }
        held.next_holder += 1;
        let holder = held.next_holder;
        let mut handed = Map::default();
        for key in &keys {
            let mine = Held {
                holder,
                handed_over_at: None,
            };
            if let Some(count) = held
                .periods
                .insert(*key, mine)
                .and_then(|entry| entry.handed_over_at)
            {
                handed.insert(*key, count);
            }
        }
        Ok(Reserved {
            from: self,
            holder,
            keys: keys.into_iter().collect(),
            handed,
        })
    }
}

impl Reserved<'_> {
    /// Lets the next batch of the same payers price from where this one's
    /// pricing left each period: `reached` where it counted uses, `bases`
    /// (what it started from) elsewhere.
    pub(super) fn hand_over(&self, reached: &Map<PeriodKey, u64>, bases: &PeriodCounts) {
        let mut held = lock(&self.from.held);
        for key in &self.keys {
            let count = reached.get(key).or_else(|| bases.0.get(key)).copied();
            match held.periods.get_mut(key) {
                Some(entry) if entry.holder == self.holder => match count {
                    Some(count) => entry.handed_over_at = Some(count),
                    None => {
                        held.periods.remove(key);
                    }
                },
                _ => {}
            }
        }
        drop(held);
        self.from.freed.notify_all();
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.from.held);
        for key in &self.keys {
            // A later batch that took the period over keeps it.
            if held
                .periods
                .get(key)
                .is_some_and(|entry| entry.holder == self.holder)
            {
                held.periods.remove(key);
            }
        }
        drop(held);
        self.from.freed.notify_all();
    }
}

/// A committed use, with its payer resolved, ready to price.
#[derive(Clone)]
pub(super) struct Use {
    pub(super) seq: u64,
    pub(super) pid: Pid,
    pub(super) payer: Option<Payer>,
    pub(super) time_ms: u64,
    /// The context it was used in, numbered within its batch (`None`:
    /// Cox's form, one context). A number, not the name: uses are built,
    /// cloned and dropped for every reading of every batch.
    pub(super) context: Option<u32>,
    /// Why its payer may not be charged (`None`: they may be: a customer
    /// through a grant for the sending meter, or the owner of a product that
    /// declared it a component and whose use encloses it and is itself
    /// authorized; see `authorize`).
    pub(super) refusal: Option<String>,
    /// For a component's use: the index (in the batch's uses) of the use
    /// that encloses it, which must itself be charged for it to be.
    pub(super) enclosing: Option<usize>,
}

/// What pricing needs of a product, copied out of the batch's lookups
/// (cloning the shared product per reading costs more than the copy).
#[derive(Clone, Copy)]
struct ProductFacts {
    pid: Pid,
    test_pid: Pid,
    owner: Cid,
    taca: crate::pricing::TacaHash,
    max_price: Option<Amount>,
}

impl ProductFacts {
    fn of(product: &Product) -> ProductFacts {
        ProductFacts {
            pid: product.pid,
            test_pid: product.test_pid,
            owner: product.owner,
            taca: product.taca,
            max_price: product.max_price,
        }
    }
}

/// A use ready to price: its TACA, its product's owner and its place in
/// the payer's billing period known.
struct Job {
    /// Its place in `Lookups::taca_list`.
    taca: usize,
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
pub(super) enum Fate {
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
pub(super) struct Totals {
    /// By payer, owner, product and the batch's place in `batches`.
    index: Map<(Cid, Cid, Pid, u32), usize>,
    /// The batches summed, numbered: a batch's uses come one after the
    /// other, so its ID is hashed once, not once per use.
    batches: Map<BatchId, u32>,
    last_batch: Option<(BatchId, u32)>,
    pub(super) transfers: Vec<NewTransfer>,
}

impl Totals {
    /// Adds a priced use; returns the index of the transfer its amount was
    /// summed into (`None`: it moves no money).
    pub(super) fn add_at(
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
        let number = match &self.last_batch {
            Some((last, number)) if last == batch => *number,
            _ => {
                let next = u32::try_from(self.batches.len()).map_err(|error| internal(&error))?;
                let number = *self.batches.entry(batch.clone()).or_insert(next);
                self.last_batch = Some((batch.clone(), number));
                number
            }
        };
        let at = match self.index.entry((payer, owner, pid, number)) {
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
pub(super) struct FreeUses(Map<PeriodKey, u64>);

impl FreeUses {
    pub(super) fn count(&mut self, payer: Option<Cid>, pid: Pid, time_ms: u64) {
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
    pub(super) fn added(self) -> Vec<(PeriodKey, u64)> {
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
pub(super) fn minimal_uses(events: &[Event], time_ms: u64) -> Vec<Use> {
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

pub(super) fn extended_uses(readings: &[Reading]) -> Vec<Use> {
    let mut contexts: Map<&str, u32> = Map::default();
    let commits = readings
        .iter()
        .filter(|reading| matches!(reading.event, Event::Commit { .. }))
        .count();
    let mut uses = Vec::with_capacity(commits);
    uses.extend(readings.iter().filter_map(|reading| match reading.event {
        Event::Commit { pid, payer } => Some(Use {
            seq: reading.seq,
            pid,
            payer,
            time_ms: reading.time_ms,
            context: Some({
                let next = u32::try_from(contexts.len()).expect("a batch has few readings");
                *contexts.entry(reading.context.as_str()).or_insert(next)
            }),
            refusal: None,
            enclosing: None,
        }),
        _ => None,
    }));
    uses
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
pub(super) fn authorize(uses: &mut [Use], lookups: &Lookups, arrived_ms: u64, late_ms: u64) {
    // The next commit of each product in each context, as the pass goes
    // from the end: the use that encloses a component committed before it.
    let mut next_commit: Map<(Option<u32>, Pid), usize> = Map::default();
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
                    let next = next_commit.get(&(usage.context, product)).copied();
                    enclosing[index] = next;
                    let enclosing_refused = next.is_none_or(|at| decided[at].is_some());
                    component_refusal(lookups, usage, product, enclosing_refused)
                }
                None => Some("nobody would pay: no enclosing login or query".to_owned()),
            }
        };
        next_commit.insert((usage.context, usage.pid), index);
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

impl<S: Store> Backoffice<S> {
    pub(super) fn product(
        &self,
        cache: &mut Map<Pid, Option<std::sync::Arc<Product>>>,
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

    /// What pricing needs of the product of `pid` (`None`: no such
    /// product), read once per batch.
    fn product_facts(
        &self,
        lookups: &mut Lookups,
        pid: Pid,
    ) -> Result<Option<ProductFacts>, Fault> {
        if let Some((recent, facts)) = lookups.recent_product
            && recent == pid
        {
            return Ok(facts);
        }
        let facts = match lookups.products.get(&pid) {
            Some(product) => product.as_deref().map(ProductFacts::of),
            None => self
                .product(&mut lookups.products, pid)?
                .as_deref()
                .map(ProductFacts::of),
        };
        lookups.recent_product = Some((pid, facts));
        Ok(facts)
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
            Some(Payer::OwnerOf(pid)) => match self.product_facts(lookups, pid)? {
                Some(product) => Ok(product.owner),
                None => Err(format!("unknown enclosing product {pid}")),
            },
        })
    }

    /// The place in `lookups.taca_list` of the compiled TACA of `product`,
    /// read and compiled once per batch.
    fn taca(
        &self,
        lookups: &mut Lookups,
        product: &ProductFacts,
    ) -> Result<Result<usize, String>, Fault> {
        if let Some((hash, at)) = lookups.recent_taca
            && hash == product.taca
        {
            return Ok(Ok(at));
        }
        if let Some(at) = lookups.tacas.get(&product.taca) {
            lookups.recent_taca = Some((product.taca, *at));
            return Ok(Ok(*at));
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
                let at = lookups.taca_list.len();
                lookups.taca_list.push(taca);
                lookups.tacas.insert(product.taca, at);
                Ok(at)
            }
            Err(crate::pricing::ModuleError::SampleFailed(PricingError::Busy)) => {
                return Err(pricing_busy());
            }
            Err(error) => Err(error.to_string()),
        })
    }

    /// Reads what `plan` needs of the store for `uses` into `lookups`:
    /// payers, products and their modules.
    pub(super) fn look_up(&self, lookups: &mut Lookups, uses: &[Use]) -> Result<(), Fault> {
        // The payers first, all in one read (a batch may name thousands).
        let mut payers: Vec<Cid> = Vec::new();
        let mut seen: Set<Cid> = Set::default();
        for usage in uses {
            if let Some(Payer::Customer(cid)) = usage.payer
                && seen.insert(cid)
            {
                payers.push(cid);
            }
        }
        payers.retain(|cid| !lookups.customers.contains_key(cid));
        let found = self
            .store
            .customer_terms(&payers)
            .map_err(|error| internal(&error))?;
        for (cid, terms) in payers.into_iter().zip(found) {
            lookups.customers.insert(cid, terms);
        }
        // Then each product, its TACA and each owner paying for a
        // component once (a batch names few).
        let mut last_pid = None;
        for usage in uses {
            if last_pid != Some(usage.pid)
                && !lookups.products.contains_key(&usage.pid)
                && let Some(product) = self.product_facts(lookups, usage.pid)?
            {
                self.taca(lookups, &product)?.ok();
            }
            last_pid = Some(usage.pid);
            if let Some(Payer::OwnerOf(_)) = usage.payer {
                self.payer_cid(lookups, usage.payer)?.ok();
            }
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
        periods: &mut Map<PeriodKey, u64>,
        usage: &Use,
    ) -> Result<Result<Result<Job, Cid>, String>, Fault> {
        if let Some(refusal) = &usage.refusal {
            return Ok(Err(refusal.clone()));
        }
        let Some(product) = self.product_facts(lookups, usage.pid)? else {
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
            month: lookups.month_of(usage.time_ms),
        };
        let taca = match self.taca(lookups, &product)? {
            Ok(taca) => taca,
            Err(reason) => return Ok(Err(reason)),
        };
        // Mostly a period counted already in this batch: one look.
        let count = if let Some(counted) = periods.get_mut(&period) {
            *counted += 1;
            *counted - 1
        } else {
            let count = match stored.0.get(&period) {
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
            count
        };
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
    pub(super) fn periods_of(
        &self,
        lookups: &mut Lookups,
        uses: &[Use],
    ) -> Result<Set<PeriodKey>, Fault> {
        let mut keys = Set::default();
        for usage in uses {
            if usage.refusal.is_some() {
                continue;
            }
            let Some(product) = self.product_facts(lookups, usage.pid)? else {
                continue;
            };
            if usage.pid == product.test_pid {
                continue;
            }
            if let Ok(payer) = self.payer_cid(lookups, usage.payer)? {
                keys.insert(PeriodKey {
                    payer,
                    pid: product.pid,
                    month: lookups.month_of(usage.time_ms),
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
    pub(super) fn early_counts(
        &self,
        periods: impl IntoIterator<Item = PeriodKey>,
        handed: &Map<PeriodKey, u64>,
    ) -> Result<PeriodCounts, Fault> {
        let mut counts = PeriodCounts::default();
        let mut missing: Vec<PeriodKey> = periods
            .into_iter()
            .filter(|period| match handed.get(period) {
                Some(count) => {
                    counts.0.insert(*period, *count);
                    false
                }
                None => true,
            })
            .collect();
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
    pub(super) fn counts_unchanged(
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
    /// The uses it refused are added to `refused`, so that pricing again
    /// can start from the uses as they were.
    pub(super) fn price_chains(
        &self,
        lookups: &mut Lookups,
        stored: &mut PeriodCounts,
        periods: &mut Map<PeriodKey, u64>,
        uses: &mut [Use],
        refused: &mut Vec<usize>,
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
                    refused.push(index);
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
    pub(super) fn price_uses(
        &self,
        lookups: &mut Lookups,
        stored: &mut PeriodCounts,
        periods: &mut Map<PeriodKey, u64>,
        uses: &[Use],
    ) -> Result<Vec<Fate>, Fault> {
        let mut fates = Vec::with_capacity(uses.len());
        let mut jobs = Vec::with_capacity(uses.len());
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

        let results = self.pricing.price_each(jobs.len(), |at| {
            let job = &jobs[at].1;
            (&*lookups.taca_list[job.taca], job.input(job.count))
        });
        // A use whose price fails does not count in its period, so the later
        // uses of that period were priced one too high: price them again.
        let mut failed: Map<PeriodKey, u64> = Map::default();
        // Counted once per batch: counters both cores share would turn
        // over between them for every reading.
        let (mut prices, mut fuel) = (0u64, 0u64);
        for ((index, job), result) in jobs.into_iter().zip(results) {
            let shift = failed.get(&job.period).copied().unwrap_or(0);
            let result = if shift == 0 {
                result
            } else {
                self.pricing
                    .price(&lookups.taca_list[job.taca], &job.input(job.count - shift))
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
                    prices += 1;
                    fuel = fuel.saturating_add(priced.fuel);
                    Fate::Priced {
                        payer: job.period.payer,
                        owner: job.owner,
                        amount: priced.amount,
                        fuel: priced.fuel,
                        taca: lookups.taca_list[job.taca].hash(),
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
        self.counters.prices.fetch_add(prices, Ordering::Relaxed);
        self.counters
            .pricing_fuel
            .fetch_add(fuel, Ordering::Relaxed);
        Ok(fates)
    }

    /// A customer's credit limit and deny flag, read once per batch; `None`
    /// when there is no such customer.
    pub(super) fn customer_terms(
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
            .map(|customer| customer.terms());
        lookups.customers.insert(cid, terms);
        Ok(terms)
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

    #[test]
    fn a_batch_works_out_months_once_a_day_and_they_change_at_midnight() {
        let mut lookups = Lookups::default();
        assert_eq!(lookups.month_of(1_798_761_599_000), 202_612);
        assert_eq!(lookups.month_of(1_798_761_600_000), 202_701, "the next day");
        assert_eq!(
            lookups.month_of(1_798_761_599_999),
            202_612,
            "the day before"
        );
        assert_eq!(lookups.month_of(951_782_400_000), 200_002);
        assert_eq!(lookups.month_of(951_868_799_999), 200_002, "the same day");
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

    fn period(n: u32) -> PeriodKey {
        PeriodKey {
            payer: cid(n),
            pid: pid(1),
            month: 202_612,
        }
    }

    fn keys(periods: &[PeriodKey]) -> Set<PeriodKey> {
        periods.iter().copied().collect()
    }

    /// A batch that has priced lets the next one of the same payers price
    /// from the counts it reached; one still pricing keeps it waiting; a
    /// batch that ends before handing over leaves nothing to price from.
    #[test]
    fn a_batch_that_has_priced_hands_its_counts_to_the_next_of_the_same_payers() {
        let in_use = PeriodsInUse::default();
        let first = in_use.reserve(keys(&[period(1), period(2)])).unwrap();
        assert!(first.handed.is_empty());
        // Period 1 counted to 7 from 4; period 2 counted nothing: its base.
        let reached: Map<PeriodKey, u64> = [(period(1), 7)].into_iter().collect();
        let mut bases = PeriodCounts::default();
        bases.stored(&[(period(1), 4), (period(2), 9)]);
        first.hand_over(&reached, &bases);
        let second = in_use
            .reserve(keys(&[period(1), period(2), period(3)]))
            .unwrap();
        let mut handed: Vec<(PeriodKey, u64)> =
            second.handed.iter().map(|(k, v)| (*k, *v)).collect();
        handed.sort_by_key(|(key, _)| key.payer.to_string());
        assert_eq!(handed, vec![(period(1), 7), (period(2), 9)]);
        // The first batch ends (posted or not): the second keeps its periods.
        drop(first);
        std::thread::scope(|scope| {
            let (done, finished) = std::sync::mpsc::channel();
            let in_use = &in_use;
            scope.spawn(move || {
                let third = in_use.reserve(keys(&[period(3)])).unwrap();
                done.send(third.handed.get(&period(3)).copied()).unwrap();
            });
            // Still pricing: the third waits.
            assert!(
                finished
                    .recv_timeout(std::time::Duration::from_millis(200))
                    .is_err()
            );
            let reached: Map<PeriodKey, u64> = [(period(3), 1)].into_iter().collect();
            second.hand_over(&reached, &PeriodCounts::default());
            let handed = finished.recv_timeout(std::time::Duration::from_secs(10));
            assert_eq!(handed, Ok(Some(1)));
        });
        drop(second);
        // Ended without handing over (refused while pricing): the next
        // batch reads the stored counts.
        let failed = in_use.reserve(keys(&[period(4)])).unwrap();
        drop(failed);
        let next = in_use.reserve(keys(&[period(4)])).unwrap();
        assert!(next.handed.is_empty());
        assert!(lock(&in_use.held).periods.len() == 1);
        drop(next);
        assert!(lock(&in_use.held).periods.is_empty());
    }
}
