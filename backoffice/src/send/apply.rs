//! Applying a batch: its priced uses become transfers, staged in the store
//! with its period counts, suspense and itemised records before the ledger
//! takes them; a batch sent again is answered as before. Also suspense
//! priced again, and money moved outside uploads (posts and deposits).

use crate::hashing::Map;
use std::sync::atomic::Ordering;

use proto::reading::{Event, Reading};
use proto::upload::{Outcome, SendAnswer, SendBody, SendRequest, standings_value};
use proto::xmlrpc::Value;
use proto::{Fault, FaultCode, Mid, Payer};

use super::price::{Fate, FreeUses, Lookups, Totals, Use, authorize, extended_uses, minimal_uses};
use super::{
    Backoffice, REPRICE_CHUNK, REPRICE_DATE_TRIES, SIGNATURE_WINDOW_MS, USE_AGE_MAX_MS,
    grant_covers, internal, lock,
};
use crate::ledger::{AccountId, NewTransfer, TransferKind};
use crate::now_ms;
use crate::registry::Grant;
use crate::store::{
    BatchDigest, BatchEffects, BatchKey, PeriodKey, SeqRange, Store, StoreError, Suspense,
};

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

/// Fewest uses in a batch for its itemised records to be built on a
/// thread of their own (below, starting one costs more than it saves).
const ITEMISE_APART_MIN: usize = 1_000;

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
    let mut index: Map<BatchKey, usize> = Map::default();
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

impl<S: Store> Backoffice<S> {
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

    /// Answers a batch id that was applied already: as before when the
    /// readings are the same, fault 205 when they are not (a meter whose
    /// data folder was restored or cloned, or a forged batch).
    pub(super) fn repeated(
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
                .meter_grants(&key.mid)
                .map_err(|error| internal(&error))?,
        );
        let ledger = self.ledger_read();
        let holds = lock(&self.holds);
        // Good standing is decided on what is available: held money is not.
        let standings = self.standings(body, &mut lookups, now_ms, |account| {
            holds.available(account, ledger.balance(account), now_ms)
        })?;
        drop(holds);
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
        let mut periods: Map<PeriodKey, u64> = Map::default();
        let mut totals = Totals::default();
        let mut resolved = Vec::new();
        let mut stored = lock(&self.period_counts);
        let mut grants: Map<Mid, Vec<Grant>> = Map::default();
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
        // keys, which the store refuses. The last one may not be this
        // node's (another node, or this one before a restart): a refusal
        // wrote nothing, so the records are dated a millisecond later and
        // written again.
        let mut floor = posted_ms.max(
            self.repriced_at_ms
                .load(Ordering::Relaxed)
                .saturating_add(1),
        );
        let mut tries = 0;
        let arrived_ms = loop {
            let (arrived_ms, sets) =
                repriced_records(&resolved, outcomes.clone(), &prepared, floor);
            match self.store.resolve_suspense_itemised(
                &resolved,
                &prepared,
                &period_uses,
                &free_uses,
                arrived_ms,
                &sets,
            ) {
                Ok(()) => break arrived_ms,
                Err(StoreError::ItemisedTaken(_)) if tries < REPRICE_DATE_TRIES => {
                    tries += 1;
                    floor = arrived_ms.saturating_add(1);
                }
                // Refused whole: nothing was written.
                Err(error @ StoreError::ItemisedTaken(_)) => return Err(internal(&error)),
                Err(error) => return Err(self.stop_money(&error)),
            }
        };
        self.repriced_at_ms.store(arrived_ms, Ordering::Relaxed);
        self.still_durable()?;
        stored.stored(&period_uses);
        ledger.commit(prepared);
        Ok((resolved.len(), records.len() - resolved.len()))
    }

    pub(super) fn apply(
        &self,
        key: &BatchKey,
        digest: Option<BatchDigest>,
        request: &SendRequest,
        now_ms: u64,
        mut phases: super::Phases,
    ) -> Result<Value, Fault> {
        use super::Phase;
        let started = std::time::Instant::now();
        let mut uses = match &request.body {
            SendBody::Batch(batch) => extended_uses(&batch.readings),
            SendBody::Minimal(events) => minimal_uses(events, now_ms),
        };
        let mut lookups = Lookups::with_grants(
            self.store
                .meter_grants(&key.mid)
                .map_err(|error| internal(&error))?,
        );
        let mut periods: Map<PeriodKey, u64> = Map::default();
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
        phases.mark(Phase::LookingUp);
        let reserved = self.periods_in_use.reserve(priced_in.clone())?;
        phases.mark(Phase::WaitingForPeriods);
        // The counts they start from (where an earlier batch still being
        // posted left them, or read in one step) once reserved.
        let mut bases = self.early_counts(priced_in, &reserved.handed)?;
        let mut periods_early: Map<PeriodKey, u64> = Map::default();
        // Uses this pricing refuses (components whose enclosing use was
        // not charged), given back their chance if it is priced again.
        let mut refused = Vec::new();
        let early = self.price_chains(
            &mut lookups,
            &mut bases,
            &mut periods_early,
            &mut uses,
            &mut refused,
        )?;
        // The next batch of the same payers prices from here while this one
        // is posted and stored (guessing that it will be). Not a batch sent
        // again (a meter's retry): it is answered as a repeat, and counts
        // that include its uses twice would have every later batch of the
        // same payers priced again under the lock.
        if self
            .store
            .applied_batch(key)
            .map_err(|error| internal(&error))?
            .is_none()
        {
            reserved.hand_over(&periods_early, &bases);
        }
        phases.mark(Phase::Pricing);
        let mut ledger = self.ledger_for_write()?;
        phases.mark(Phase::WaitingForLedger);
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
            for at in refused.drain(..) {
                uses[at].refusal = None;
            }
            self.price_chains(
                &mut lookups,
                &mut stored,
                &mut periods,
                &mut uses,
                &mut refused,
            )?
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
        // The itemised records need only the outcomes and the transfers'
        // numbers: a large batch builds them on a second thread while this
        // one works out the standings and the answer.
        let itemise = || itemised_records(key, &request.body, outcomes, &prepared, now_ms);
        let mut answer = || -> Result<Value, Fault> {
            let mut balances: Map<AccountId, proto::Amount> = Map::default();
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
            let holds = lock(&self.holds);
            // Good standing is decided on what is available: held money is not.
            let standings = self.standings(&request.body, &mut lookups, now_ms, |account| {
                let balance = balances
                    .get(account)
                    .copied()
                    .unwrap_or_else(|| ledger.balance(account));
                holds.available(account, balance, now_ms)
            })?;
            drop(holds);
            Ok(match &request.body {
                SendBody::Batch(batch) => SendAnswer {
                    batch_id: batch.id.clone(),
                    outcome: Outcome::Applied,
                    standings,
                    params: self.params,
                }
                .to_value(),
                SendBody::Minimal(_) => standings_value(&standings),
            })
        };
        let (itemised, value) = if uses.len() >= ITEMISE_APART_MIN {
            std::thread::scope(|scope| {
                let itemised = scope.spawn(itemise);
                let value = answer();
                let itemised = itemised
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (itemised, value)
            })
        } else {
            let value = answer();
            (itemise(), value)
        };
        let value = value?;
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
                phases.mark(Phase::UnderLedger);
                // What the store wrote behind (period counts) is folded
                // every few batches, outside the lock, and made durable
                // with this batch.
                self.store
                    .fold_logged()
                    .map_err(|error| self.stop_money(&error))?;
                self.durable()?;
                phases.mark(Phase::Durable);
                phases.count(&self.counters);
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
}
