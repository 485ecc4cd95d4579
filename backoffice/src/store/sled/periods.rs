//! Period counts, written behind.
//!
//! A batch of 10,000 readings moves the counts of up to one billing
//! period per payer and product: a thousand sled inserts in the batch's
//! transaction were the largest part of it. Instead, the transaction
//! writes the batch's counts as one record of `period_log` (key: a
//! sequence number, big-endian), and this store keeps them in memory
//! (`PeriodLog::pending`) until they are folded into `period_uses`: every
//! `PERIOD_LOG_FOLD_AFTER` records, by `Store::fold_logged`, which the
//! send path calls after a batch, outside the ledger's lock. A fold writes
//! the latest count of every period logged and removes the records, in
//! one transaction, so that a period touched by every batch is written
//! once per fold instead of once per batch.
//!
//! Reads look at the pending counts first. Opening the store folds what a
//! crash left in the log (in sequence order, latest count wins) before
//! anything reads it; a backup copies the log with the rest and its
//! restore folds it on opening. Export and verification fold first.
//!
//! Records are logged one at a time (batches stage under the ledger's
//! lock, one after the other), so sequence order is the order in which
//! they were written.

use std::sync::Mutex;

use proto::record::Reader;
use proto::{Cid, Pid};
use sled::Transactional;
use sled::transaction::TransactionError;

use super::SledStore;
use crate::hashing::Map;
use crate::store::{PeriodKey, StoreError};

/// Records logged after which the next `fold_logged` folds them.
pub const PERIOD_LOG_FOLD_AFTER: usize = 8;

/// The counts logged and not yet folded.
#[derive(Default)]
pub(super) struct PeriodLog {
    state: Mutex<LogState>,
    /// Held by a fold for its whole length: one at a time.
    folding: Mutex<()>,
}

#[derive(Default)]
struct LogState {
    /// The number of the next record.
    next: u64,
    /// The latest count logged of each period, with the number of the
    /// record that logged it.
    pending: Map<PeriodKey, (u64, u64)>,
    /// The records logged and not folded.
    records: Vec<u64>,
}

fn state(log: &PeriodLog) -> std::sync::MutexGuard<'_, LogState> {
    log.state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PeriodLog {
    /// The number for a new record.
    pub(super) fn reserve(&self) -> u64 {
        let mut state = state(self);
        let number = state.next;
        state.next += 1;
        number
    }

    /// Record `number`, with `counts`, is written.
    pub(super) fn logged(&self, number: u64, counts: &[(PeriodKey, u64)]) {
        let mut state = state(self);
        for (period, count) in counts {
            let entry = state.pending.entry(*period).or_insert((*count, number));
            if entry.1 <= number {
                *entry = (*count, number);
            }
        }
        state.records.push(number);
    }

    /// The count of `period` logged and not yet folded, if any.
    pub(super) fn pending(&self, period: &PeriodKey) -> Option<u64> {
        state(self).pending.get(period).map(|(count, _)| *count)
    }

    /// Records waiting to be folded.
    pub(super) fn waiting(&self) -> usize {
        state(self).records.len()
    }
}

/// A record of `period_log`: the number of counts (u32), then each
/// period's key (as in `period_uses`) and count (u64), all big-endian.
pub(super) fn encode(counts: &[(PeriodKey, u64)]) -> Vec<u8> {
    let mut record = Vec::with_capacity(4 + counts.len() * 48);
    let count = u32::try_from(counts.len()).expect("a batch counts in few periods");
    record.extend_from_slice(&count.to_be_bytes());
    for (period, uses) in counts {
        record.extend_from_slice(&period.bytes());
        record.extend_from_slice(&uses.to_be_bytes());
    }
    record
}

/// Reads a record `encode` wrote; `None` when it is not one.
pub(super) fn decode(record: &[u8]) -> Option<Vec<(PeriodKey, u64)>> {
    let mut fields = Reader::new(record);
    let count = fields.u32()?;
    // Each count takes at least 16 bytes: never sized past the record.
    let mut counts = Vec::with_capacity((count as usize).min(record.len() / 16));
    for _ in 0..count {
        let payer = Cid::parse(fields.text()?).ok()?;
        let pid = Pid::parse(fields.text()?).ok()?;
        let month = fields.u32()?;
        let uses = fields.u64()?;
        counts.push((PeriodKey { payer, pid, month }, uses));
    }
    fields.is_empty().then_some(counts)
}

impl SledStore {
    /// Folds every record logged into `period_uses`, in one transaction.
    /// `gated`: the caller holds the write gate already (export).
    pub(super) fn fold_periods(&self, gated: bool) -> Result<(), StoreError> {
        // The gate before `folding`, as export takes them: a fold waiting
        // for the gate then holds nothing an export under the gate needs.
        let _writing = (!gated).then(|| self.writing());
        let _one = self
            .period_log
            .folding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (counts, records) = {
            let state = state(&self.period_log);
            if state.records.is_empty() {
                return Ok(());
            }
            let counts: Vec<(Vec<u8>, u64)> = state
                .pending
                .iter()
                .map(|(period, (count, _))| (period.bytes(), *count))
                .collect();
            (counts, state.records.clone())
        };
        (&self.period_uses, &self.period_log_tree)
            .transaction(|(period_tree, log_tree)| {
                for (key, count) in &counts {
                    period_tree.insert(key.as_slice(), &count.to_be_bytes())?;
                }
                for number in &records {
                    log_tree.remove(&number.to_be_bytes())?;
                }
                Ok(())
            })
            .map_err(|error: TransactionError<()>| match error {
                TransactionError::Storage(error) => StoreError::Storage(error),
                TransactionError::Abort(()) => StoreError::Corrupt("a fold aborted".to_owned()),
            })?;
        // Counts logged meanwhile (by records not folded) stay pending.
        let mut state = state(&self.period_log);
        state
            .pending
            .retain(|_, (_, number)| !records.contains(number));
        state.records.retain(|number| !records.contains(number));
        Ok(())
    }

    /// At opening: folds what the log holds (a crash before its fold, or
    /// a restored backup), latest record last, and numbers new records
    /// after the last one.
    pub(super) fn fold_period_log_at_open(&self) -> Result<(), StoreError> {
        let mut last = None;
        let mut state = state(&self.period_log);
        for entry in self.period_log_tree.iter() {
            let (key, value) = entry?;
            let number = <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt(format!("period log key {key:?}")))?;
            let counts = decode(&value).ok_or_else(|| {
                StoreError::Corrupt(format!("period log record {number} does not decode"))
            })?;
            for (period, count) in counts {
                state.pending.insert(period, (count, number));
            }
            state.records.push(number);
            last = Some(number);
        }
        state.next = last.map_or(0, |last| last + 1);
        drop(state);
        self.fold_periods(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn period(payer: &str, month: u32) -> PeriodKey {
        PeriodKey {
            payer: Cid::parse(payer).unwrap(),
            pid: Pid::parse("B1-P1").unwrap(),
            month,
        }
    }

    #[test]
    fn a_record_reads_back_and_nothing_else_does() {
        let counts = vec![
            (period("B1-C1", 202_612), 7),
            (period("B1-C22", 202_701), 1),
        ];
        let record = encode(&counts);
        assert_eq!(decode(&record), Some(counts));
        assert_eq!(decode(&encode(&[])), Some(vec![]));
        for cut in 0..record.len() {
            assert_eq!(decode(&record[..cut]), None, "cut at {cut}");
        }
        let mut longer = record.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None, "a byte too many");
        let mut huge = record;
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&huge), None, "more counts than bytes");
    }

    #[test]
    fn the_latest_record_of_a_period_wins_in_whatever_order_they_are_logged() {
        let log = PeriodLog::default();
        let (first, second) = (log.reserve(), log.reserve());
        log.logged(second, &[(period("B1-C1", 202_612), 9)]);
        log.logged(first, &[(period("B1-C1", 202_612), 4)]);
        assert_eq!(log.pending(&period("B1-C1", 202_612)), Some(9));
        assert_eq!(log.pending(&period("B1-C2", 202_612)), None);
        assert_eq!(log.waiting(), 2);
    }
}
