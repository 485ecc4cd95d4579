//! The status table from the last upload and how `query` reads it.

use std::collections::HashMap;

use proto::Payer;
use proto::upload::MeterParams;

use crate::cache::SavedTable;

/// Upload parameters a meter uses until a backoffice has programmed its own.
pub const DEFAULT_PARAMS: MeterParams = MeterParams {
    flush_readings_max: 10_000,
    flush_interval_s: 3_600,
    status_stale_max_s: 30 * 24 * 3_600,
    unknown_uses_max: 16,
};

/// Most parties whose unconfirmed uses are counted between uploads.
pub const UNKNOWN_PARTIES_MAX: usize = 65_536;

/// What `query` answers for a payer, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// In good standing as of the last upload.
    Allowed,
    /// Not in the table yet: allowed, a bounded number of times.
    AllowedUnconfirmed,
    /// Marked "deny service" by the backoffice.
    Denied,
    /// The table is older than the backoffice allows.
    Stale,
    /// Not in the table, and its unconfirmed uses are used up.
    UnknownOverLimit,
}

impl Verdict {
    /// The boolean `query` returns.
    pub fn allows(self) -> bool {
        matches!(self, Verdict::Allowed | Verdict::AllowedUnconfirmed)
    }
}

/// The status table and the meter's upload parameters.
#[derive(Debug, Clone)]
pub struct StatusTable {
    entries: HashMap<Payer, bool>,
    received_ms: Option<u64>,
    params: MeterParams,
    unknown_uses: HashMap<Payer, u32>,
}

impl Default for StatusTable {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            received_ms: None,
            params: DEFAULT_PARAMS,
            unknown_uses: HashMap::new(),
        }
    }
}

impl StatusTable {
    /// The table as saved after an upload.
    pub fn from_saved(saved: &SavedTable) -> Self {
        let mut table = Self::default();
        table.replace(saved);
        table
    }

    /// Takes the answer of a new upload.
    pub fn replace(&mut self, saved: &SavedTable) {
        self.entries = saved
            .standings
            .iter()
            .map(|standing| (standing.party, standing.allowed))
            .collect();
        self.received_ms = Some(saved.received_ms);
        self.params = saved.params;
        self.unknown_uses.clear();
    }

    /// The parties in the table, at most `limit` of them: the meter asks
    /// for their standing in every upload, so the table stays whole.
    pub fn parties(&self, limit: usize) -> Vec<Payer> {
        let mut parties: Vec<Payer> = self.entries.keys().copied().collect();
        parties.sort();
        parties.truncate(limit);
        parties
    }

    /// The current upload parameters.
    pub fn params(&self) -> MeterParams {
        self.params
    }

    /// When the table arrived, if it ever did.
    pub fn received_ms(&self) -> Option<u64> {
        self.received_ms
    }

    /// The verdict for a use paid by `payer` at `now_ms`. Counts unconfirmed
    /// uses; the second value is true when this use reached the limit of
    /// unconfirmed uses and an early upload should confirm the payer.
    pub fn verdict(&mut self, payer: Payer, now_ms: u64) -> (Verdict, bool) {
        if let Some(received) = self.received_ms {
            let age_s = now_ms.saturating_sub(received) / 1000;
            if age_s > u64::from(self.params.status_stale_max_s) {
                return (Verdict::Stale, true);
            }
        }
        match self.entries.get(&payer) {
            Some(true) => (Verdict::Allowed, false),
            Some(false) => (Verdict::Denied, false),
            None => self.unconfirmed(payer),
        }
    }

    fn unconfirmed(&mut self, payer: Payer) -> (Verdict, bool) {
        let limit = self.params.unknown_uses_max;
        if !self.unknown_uses.contains_key(&payer) && self.unknown_uses.len() >= UNKNOWN_PARTIES_MAX
        {
            return (Verdict::UnknownOverLimit, true);
        }
        let uses = self.unknown_uses.entry(payer).or_insert(0);
        if *uses >= limit {
            return (Verdict::UnknownOverLimit, true);
        }
        *uses += 1;
        (Verdict::AllowedUnconfirmed, *uses == limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::upload::Standing;
    use proto::{Cid, Pid};

    fn saved(received_ms: u64) -> SavedTable {
        SavedTable {
            received_ms,
            standings: vec![
                Standing {
                    party: Payer::Customer(Cid::parse("B1-C1").unwrap()),
                    allowed: true,
                },
                Standing {
                    party: Payer::OwnerOf(Pid::parse("B1-P1").unwrap()),
                    allowed: false,
                },
            ],
            params: MeterParams {
                unknown_uses_max: 2,
                status_stale_max_s: 100,
                ..DEFAULT_PARAMS
            },
        }
    }

    #[test]
    fn table_entries_decide() {
        let mut table = StatusTable::from_saved(&saved(1_000));
        let good = Payer::Customer(Cid::parse("B1-C1").unwrap());
        let denied = Payer::OwnerOf(Pid::parse("B1-P1").unwrap());
        assert_eq!(table.verdict(good, 2_000), (Verdict::Allowed, false));
        assert_eq!(table.verdict(denied, 2_000), (Verdict::Denied, false));
        assert_eq!(table.verdict(good, 1_000 + 101_000), (Verdict::Stale, true));
        assert!(!Verdict::Stale.allows());
    }

    #[test]
    fn unknown_payers_get_a_bounded_number_of_uses() {
        let mut table = StatusTable::from_saved(&saved(1_000));
        let stranger = Payer::Customer(Cid::parse("B1-C9").unwrap());
        assert_eq!(
            table.verdict(stranger, 2_000),
            (Verdict::AllowedUnconfirmed, false)
        );
        assert_eq!(
            table.verdict(stranger, 2_000),
            (Verdict::AllowedUnconfirmed, true)
        );
        assert_eq!(
            table.verdict(stranger, 2_000),
            (Verdict::UnknownOverLimit, true)
        );
        // A new table resets the count.
        table.replace(&saved(3_000));
        assert_eq!(
            table.verdict(stranger, 3_000),
            (Verdict::AllowedUnconfirmed, false)
        );
    }

    #[test]
    fn a_meter_that_never_uploaded_follows_the_default_policy() {
        let mut table = StatusTable::default();
        let stranger = Payer::Customer(Cid::parse("B1-C9").unwrap());
        for _ in 1..DEFAULT_PARAMS.unknown_uses_max {
            assert_eq!(table.verdict(stranger, 0).0, Verdict::AllowedUnconfirmed);
        }
        assert_eq!(
            table.verdict(stranger, 0),
            (Verdict::AllowedUnconfirmed, true)
        );
        assert_eq!(
            table.verdict(stranger, u64::MAX).0,
            Verdict::UnknownOverLimit
        );
    }
}
