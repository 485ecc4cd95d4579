//! `audit`: prices the kept readings of applied batches again (`itemised`)
//! with the stored TACA modules, the same pricing code and the period
//! counts each TACA was given, and confirms every amount: each use's price
//! and fuel, each transfer as the sum of its uses, each batch's readings
//! against the digest kept when it was applied. Names the first that
//! differs.

use std::collections::HashMap;
use std::sync::Arc;

use proto::reading::Event;
use proto::{Amount, Cid, Code, Pid};

use crate::itemised::{Outcome, Record};
use crate::ledger::{AccountId, Ledger, TransferId, TransferKind};
use crate::pricing::{PriceInput, Pricing, PricingError, Taca, TacaHash};
use crate::send::month_of;
use crate::store::{BatchKey, ItemisedAt, Store, StoreError};

/// What to audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One applied batch.
    Batch(BatchKey),
    /// The batch that posted this transfer (every use in it is priced again).
    Transfer(TransferId),
    /// Every batch that posted a use transfer of this customer (as payer or
    /// owner) in this month (`YYYYMM`, UTC, as statements have it).
    Month {
        /// The customer.
        cid: Cid,
        /// The month.
        month: u32,
    },
}

/// What an audit checked, and the first difference it found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Batches whose readings were priced again.
    pub batches: usize,
    /// Readings read back.
    pub readings: usize,
    /// Uses priced again.
    pub priced: usize,
    /// Transfers compared with the sums of their uses.
    pub transfers: usize,
    /// The first difference; `None` when every amount was confirmed.
    pub difference: Option<String>,
}

impl Report {
    /// One line saying what was checked and how it came out.
    pub fn summary(&self) -> String {
        let checked = format!(
            "{} batches, {} readings, {} uses priced again, {} transfers",
            self.batches, self.readings, self.priced, self.transfers
        );
        match &self.difference {
            None => format!("confirmed: {checked}; every amount is as posted"),
            Some(difference) => format!("DIFFERS: {difference} (checked {checked})"),
        }
    }
}

/// Why an audit could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// There is nothing to audit: no such transfer or batch, or its
    /// readings are not kept (applied before they were, or pruned).
    #[error("{0}")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Audits `scope` against `store` and `ledger` (the store's, loaded), with
/// `pricing`.
pub fn audit<S: Store>(
    store: &S,
    ledger: &Ledger,
    pricing: &Pricing,
    scope: &Scope,
) -> Result<Report, AuditError> {
    // Record sets to audit: a batch's own (`None`), or where a transfer's
    // uses are kept (its batch's records, or a re-pricing's).
    let mut keys: Vec<(BatchKey, Option<ItemisedAt>)> = Vec::new();
    let mut of_transfer = |id: TransferId| -> Result<(), AuditError> {
        let at = store.itemised_batch_of_transfer(id)?.ok_or_else(|| {
            AuditError::NotFound(format!(
                "the readings of transfer {} are not kept (applied before itemised readings \
                 were, or older than the retention)",
                id.0
            ))
        })?;
        let set = (at.key.clone(), Some(at));
        if !keys.contains(&set) {
            keys.push(set);
        }
        Ok(())
    };
    match scope {
        Scope::Batch(key) => keys.push((key.clone(), None)),
        Scope::Transfer(id) => {
            let transfer = usize::try_from(id.0)
                .ok()
                .and_then(|at| ledger.transfers().get(at))
                .ok_or_else(|| AuditError::NotFound(format!("no transfer {}", id.0)))?;
            if !matches!(transfer.kind, TransferKind::Use { .. }) {
                return Err(AuditError::NotFound(format!(
                    "transfer {} is not a use: no readings to price",
                    id.0
                )));
            }
            of_transfer(*id)?;
        }
        Scope::Month { cid, month } => {
            let uses: Vec<TransferId> = ledger
                .transfers_of(AccountId::Customer(*cid))
                .filter(|transfer| {
                    matches!(transfer.kind, TransferKind::Use { .. })
                        && month_of(transfer.posted_ms) == *month
                })
                .map(|transfer| transfer.id)
                .collect();
            if uses.is_empty() {
                return Err(AuditError::NotFound(format!(
                    "{cid} has no use transfers in {}-{:02}",
                    month / 100,
                    month % 100
                )));
            }
            for id in uses {
                of_transfer(id)?;
            }
        }
    }
    let mut report = Report::default();
    let mut tacas: HashMap<TacaHash, Result<Arc<Taca>, String>> = HashMap::new();
    for (key, at) in &keys {
        let records = match at {
            None => store.itemised_batch(key)?,
            Some(at) => store.itemised_records_at(at)?,
        };
        let records = records.ok_or_else(|| {
            AuditError::NotFound(format!(
                "the readings of batch {} of {} are not kept",
                key.id, key.mid
            ))
        })?;
        report.batches += 1;
        if let Some(difference) = audit_batch(
            store,
            ledger,
            pricing,
            key,
            &records,
            &mut tacas,
            &mut report,
        )? {
            report.difference = Some(difference);
            break;
        }
    }
    Ok(report)
}

/// What a transfer's uses add up to.
struct Sum {
    payer: Cid,
    owner: Cid,
    pid: Pid,
    amount: Amount,
    uses: u64,
}

/// Audits one batch's records; the first difference, if any.
fn audit_batch<S: Store>(
    store: &S,
    ledger: &Ledger,
    pricing: &Pricing,
    key: &BatchKey,
    records: &[Record],
    tacas: &mut HashMap<TacaHash, Result<Arc<Taca>, String>>,
    report: &mut Report,
) -> Result<Option<String>, AuditError> {
    let repriced = records.first().is_some_and(|record| record.repriced);
    let batch = match records.first() {
        Some(record) if repriced => format!(
            "the uses of batch {} of {} priced again at {} ms",
            key.id, key.mid, record.arrived_ms
        ),
        _ => format!("batch {} of {}", key.id, key.mid),
    };
    let items: Vec<_> = records.iter().flat_map(|record| &record.items).collect();
    report.readings += items.len();
    // The readings kept are the readings applied (a re-pricing keeps only
    // the uses it priced).
    let Some(applied) = store.applied_batch(key)? else {
        return Ok(Some(format!(
            "{batch} has readings kept but was never applied"
        )));
    };
    if let Some(digest) = applied.digest
        && !repriced
    {
        let readings: Vec<_> = items.iter().map(|item| item.reading.clone()).collect();
        if proto::upload::readings_digest(&readings) != digest {
            return Ok(Some(format!(
                "the readings kept of {batch} are not those applied (their digest differs)"
            )));
        }
    }
    // Every priced use again, with the period count its TACA was given.
    let mut jobs = Vec::new();
    let mut periods: HashMap<(Cid, Pid, u32), u64> = HashMap::new();
    for item in &items {
        let Outcome::Priced(priced) = &item.outcome else {
            continue;
        };
        let Event::Commit { pid, .. } = item.reading.event else {
            return Ok(Some(format!(
                "{batch}, reading {}: priced, but not a commit",
                item.reading.seq
            )));
        };
        let period = (priced.payer, pid, month_of(item.reading.time_ms));
        if let Some(previous) = periods.insert(period, priced.period_uses)
            && priced.period_uses != previous + 1
        {
            return Ok(Some(format!(
                "{batch}, reading {}: priced as use {} of {pid} in the month by {}, after use {previous}",
                item.reading.seq, priced.period_uses, priced.payer
            )));
        }
        let taca = match tacas.entry(priced.taca) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(load(store, pricing, priced.taca)?)
            }
        };
        let taca = match taca {
            Ok(taca) => Arc::clone(taca),
            Err(why) => {
                return Ok(Some(format!(
                    "{batch}, reading {}: {why}",
                    item.reading.seq
                )));
            }
        };
        let input = PriceInput::invocation(priced.payer, Code::Commit, pid, priced.period_uses);
        jobs.push((taca, input));
    }
    let results = pricing.price_many(&jobs);
    let priced_items = items.iter().filter_map(|item| match &item.outcome {
        Outcome::Priced(priced) => Some((item, priced)),
        _ => None,
    });
    let mut sums: HashMap<TransferId, Sum> = HashMap::new();
    for (((item, priced), result), (taca, input)) in priced_items.zip(results).zip(&jobs) {
        let result = match result {
            Err(PricingError::Busy) => pricing.price(taca, input),
            other => other,
        };
        let seq = item.reading.seq;
        match result {
            Ok(again) if again.amount == priced.amount && again.fuel == priced.fuel => {}
            Ok(again) => {
                return Ok(Some(format!(
                    "{batch}, reading {seq}{}: stored price {} (fuel {}), the TACA gives {} (fuel {})",
                    priced
                        .transfer
                        .map_or(String::new(), |id| format!(" (transfer {})", id.0)),
                    priced.amount,
                    priced.fuel,
                    again.amount,
                    again.fuel
                )));
            }
            Err(error) => {
                return Ok(Some(format!(
                    "{batch}, reading {seq}: stored price {}, the TACA now fails: {error}",
                    priced.amount
                )));
            }
        }
        report.priced += 1;
        let Some(transfer) = priced.transfer else {
            continue;
        };
        let pid = input.pid;
        let sum = sums.entry(transfer).or_insert(Sum {
            payer: priced.payer,
            owner: priced.owner,
            pid,
            amount: Amount::ZERO,
            uses: 0,
        });
        if (sum.payer, sum.owner, sum.pid) != (priced.payer, priced.owner, pid) {
            return Ok(Some(format!(
                "{batch}, reading {seq}: summed into transfer {} with uses of other parties",
                transfer.0
            )));
        }
        sum.amount = match sum.amount.checked_add(priced.amount) {
            Ok(amount) => amount,
            Err(_) => return Ok(Some(format!("{batch}: transfer {} overflows", transfer.0))),
        };
        sum.uses += 1;
    }
    // Every transfer the batch posted is the sum of its uses.
    let range = records.first().and_then(|record| record.transfers);
    let ids: Vec<TransferId> = match range {
        Some((first, last)) => (first.0..=last.0).map(TransferId).collect(),
        // A re-pricing's transfers are those its uses name.
        None if repriced => {
            let mut ids: Vec<TransferId> = sums.keys().copied().collect();
            ids.sort_unstable();
            ids
        }
        None => Vec::new(),
    };
    if let Some(stray) = sums.keys().find(|id| !ids.contains(id)) {
        return Ok(Some(format!(
            "{batch}: uses are summed into transfer {}, which the batch did not post",
            stray.0
        )));
    }
    for id in ids {
        report.transfers += 1;
        let Some(transfer) = usize::try_from(id.0)
            .ok()
            .and_then(|at| ledger.transfers().get(at))
        else {
            return Ok(Some(format!(
                "{batch}: transfer {} is not in the ledger",
                id.0
            )));
        };
        let Some(sum) = sums.get(&id) else {
            return Ok(Some(format!(
                "{batch}: transfer {} has no uses behind it",
                id.0
            )));
        };
        let expected = TransferKind::Use {
            pid: sum.pid,
            batch: key.id.clone(),
            uses: sum.uses,
        };
        if transfer.amount != sum.amount
            || transfer.kind != expected
            || transfer.debit != AccountId::Customer(sum.payer)
            || transfer.credit != AccountId::Customer(sum.owner)
        {
            return Ok(Some(format!(
                "transfer {}: posted {} for {}, its {} uses of {} in {batch} add up to {}",
                id.0,
                transfer.amount,
                crate::web::pages::describe(transfer, ""),
                sum.uses,
                sum.pid,
                sum.amount
            )));
        }
    }
    Ok(None)
}

/// The compiled module `hash` names, or why it cannot price.
fn load<S: Store>(
    store: &S,
    pricing: &Pricing,
    hash: TacaHash,
) -> Result<Result<Arc<Taca>, String>, AuditError> {
    let Some(module) = store.taca_module(&hash)? else {
        return Ok(Err(format!(
            "the TACA module {hash} is missing from the store"
        )));
    };
    if TacaHash::of(&module) != hash {
        return Ok(Err(format!(
            "the stored TACA module {hash} is not the module of that hash (changed since)"
        )));
    }
    Ok(pricing
        .load(&module)
        .map_err(|error| format!("the TACA module {hash} no longer loads: {error}")))
}
