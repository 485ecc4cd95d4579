//! Hold events as both stores keep them (`holds::HoldEvent`): one record
//! per event, numbered, never changed. sled keeps the JSON of
//! [`StoredHoldEvent`] under the event's number; PostgreSQL the same fields
//! in columns of `hold_events` (migration 7).

use proto::{Amount, Cid};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::holds::{HoldChange, HoldEvent, HoldId};
use crate::ledger::{AccountId, SystemAccount, TransferId};

/// An event's fields, each kind filling those it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredHoldEvent {
    pub number: u64,
    pub hold: u64,
    pub at_ms: u64,
    /// `placed`, `adjusted`, `captured`, `released` or `expired`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Exact decimal text; for `adjusted`, signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<u64>,
    /// For `placed`: the service (PID) that placed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// For `placed`: a reservation by volume's rating parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rating: Option<String>,
}

/// An account as stores name it: the CID, or `:funding`.
pub(crate) fn account_text(account: &AccountId) -> String {
    match account {
        AccountId::Customer(cid) => cid.as_str().to_owned(),
        AccountId::System(SystemAccount::Funding) => ":funding".to_owned(),
    }
}

/// The account `account_text` named.
pub(crate) fn account_of(text: &str) -> Result<AccountId, StoreError> {
    match text {
        ":funding" => Ok(AccountId::System(SystemAccount::Funding)),
        cid => Cid::parse(cid)
            .map(AccountId::Customer)
            .map_err(|_| StoreError::Corrupt(format!("an account named {cid:?}"))),
    }
}

impl From<&HoldEvent> for StoredHoldEvent {
    fn from(event: &HoldEvent) -> Self {
        let mut stored = StoredHoldEvent {
            number: event.number,
            hold: event.hold.0,
            at_ms: event.at_ms,
            kind: String::new(),
            account: None,
            amount: None,
            expires_ms: None,
            note: None,
            transfer: None,
            by: None,
            rating: None,
        };
        stored.kind = match &event.change {
            HoldChange::Placed {
                account,
                amount,
                expires_ms,
                note,
                by,
                rating,
            } => {
                stored.by = by.as_ref().map(|pid| pid.as_str().to_owned());
                stored.rating.clone_from(rating);
                stored.account = Some(account_text(account));
                stored.amount = Some(amount.to_string());
                stored.expires_ms = Some(*expires_ms);
                stored.note = Some(note.clone());
                "placed"
            }
            HoldChange::Adjusted { delta, expires_ms } => {
                stored.amount = Some(delta.to_string());
                stored.expires_ms = Some(*expires_ms);
                "adjusted"
            }
            HoldChange::Captured { amount, transfer } => {
                stored.amount = Some(amount.to_string());
                stored.transfer = Some(transfer.0);
                "captured"
            }
            HoldChange::Released => "released",
            HoldChange::Expired => "expired",
        }
        .to_owned();
        stored
    }
}

impl StoredHoldEvent {
    /// The event it records; a record that is not one is reported.
    pub(crate) fn event(self) -> Result<HoldEvent, StoreError> {
        let number = self.number;
        let damaged = |what: &str| StoreError::Corrupt(format!("hold event {number}: {what}"));
        let amount = || -> Result<Amount, StoreError> {
            Amount::parse(self.amount.as_deref().ok_or_else(|| damaged("no amount"))?)
                .map_err(|_| damaged("an amount that does not parse"))
        };
        let expires_ms = || self.expires_ms.ok_or_else(|| damaged("no expiry"));
        let change = match self.kind.as_str() {
            "placed" => HoldChange::Placed {
                account: account_of(
                    self.account
                        .as_deref()
                        .ok_or_else(|| damaged("no account"))?,
                )?,
                amount: amount()?,
                expires_ms: expires_ms()?,
                note: self.note.clone().unwrap_or_default(),
                by: self
                    .by
                    .as_deref()
                    .map(proto::Pid::parse)
                    .transpose()
                    .map_err(|_| damaged("a service that is not a PID"))?,
                rating: self.rating.clone(),
            },
            "adjusted" => HoldChange::Adjusted {
                delta: amount()?,
                expires_ms: expires_ms()?,
            },
            "captured" => HoldChange::Captured {
                amount: amount()?,
                transfer: TransferId(self.transfer.ok_or_else(|| damaged("no transfer"))?),
            },
            "released" => HoldChange::Released,
            "expired" => HoldChange::Expired,
            _ => return Err(damaged("an unknown kind")),
        };
        Ok(HoldEvent {
            number,
            hold: HoldId(self.hold),
            at_ms: self.at_ms,
            change,
        })
    }
}

/// Checks hold events read back (`events`, or why they could not be read)
/// against the transfers: they follow one another as the book requires,
/// and each capture names a transfer that debits the hold's account by the
/// amount captured.
pub(crate) fn check_hold_events(
    events: Result<Vec<HoldEvent>, StoreError>,
    transfers: &[crate::ledger::Transfer],
    report: &mut crate::verify::Report,
) -> HoldsPlaced {
    let mut placed = HoldsPlaced::new();
    let events = match events {
        Ok(events) => events,
        Err(error) => {
            report.problem(format!("the hold events cannot be read: {error}"));
            return placed;
        }
    };
    report.checked("hold events", events.len() as u64);
    let book = match crate::holds::HoldBook::restore(events) {
        Ok(book) => book,
        Err(error) => {
            report.problem(format!("hold events: {error}"));
            return placed;
        }
    };
    for event in book.events() {
        if let HoldChange::Placed { by, .. } = &event.change {
            placed.insert(event.hold.0, *by);
        }
    }
    for event in book.events() {
        let HoldChange::Captured { amount, transfer } = &event.change else {
            continue;
        };
        let account = book.hold(event.hold).map(|hold| hold.account);
        let posted = usize::try_from(transfer.0)
            .ok()
            .and_then(|at| transfers.get(at));
        match posted {
            Some(posted) if Some(posted.debit) == account && posted.amount == *amount => {}
            Some(_) => report.problem(format!(
                "hold event {}: transfer {} does not take {amount} from hold {}'s account",
                event.number, transfer.0, event.hold
            )),
            None => report.problem(format!(
                "hold event {}: a capture by transfer {}, which does not exist",
                event.number, transfer.0
            )),
        }
    }
    placed
}

/// The holds the events place, each with the service that placed it
/// (`None`: the branch's own), for checking what names them.
pub(crate) type HoldsPlaced = std::collections::HashMap<u64, Option<proto::Pid>>;
