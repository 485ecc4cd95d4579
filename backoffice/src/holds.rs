//! Holds: money reserved on an account for a charge not yet taken (a
//! Parlay X reservation, a meter's offline spend limit, a clearing between
//! branches). A hold keeps part of an account's balance from being spent
//! elsewhere until it is captured (in one or several parts, each an
//! ordinary transfer), released, or expires; what it did not capture is
//! then available again, once.
//!
//! The book is a log of events, numbered from 0 and never changed, like the
//! ledger's transfers; a hold's state is what its events add up to. The
//! **available** balance of an account is its balance minus what its live
//! holds have not captured; every new hold, and good standing, use it. A
//! hold past its expiry no longer counts, even before its `Expired` event
//! is written (a sweep writes it, whether or not anyone calls again).
//!
//! Like the ledger, the book checks and numbers events without changing
//! anything (`prepare_*`), so that they can be made durable first, then
//! applies them (`commit`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use proto::Amount;

use crate::ledger::{AccountId, TransferId};

/// A hold's number, in the order holds were placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HoldId(pub u64);

impl fmt::Display for HoldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "H{}", self.0)
    }
}

/// The latest expiry a hold may have (ms since the Unix epoch): every
/// store keeps times as signed 64-bit numbers.
pub const EXPIRY_MAX_MS: u64 = i64::MAX as u64;

/// Longest note kept with a hold (what appears on the bill), in bytes.
pub const NOTE_BYTES_MAX: usize = 500;

/// What happened to a hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldChange {
    /// Placed: `amount` of `account` held until `expires_ms`.
    Placed {
        /// The account whose money is held.
        account: AccountId,
        /// How much.
        amount: Amount,
        /// When it expires, ms since the Unix epoch.
        expires_ms: u64,
        /// What it is for (shown on statements).
        note: String,
        /// The service (product) that placed it, which alone may charge
        /// and release it; `None` for the branch's own holds.
        by: Option<proto::Pid>,
        /// For a reservation by volume: the rating parameters its later
        /// changes are rated with (`parlayx::Rating`'s text).
        rating: Option<String>,
    },
    /// More or less held (`delta`, either sign; never less than was
    /// captured), and a new expiry.
    Adjusted {
        /// The change of the amount held.
        delta: Amount,
        /// When it now expires.
        expires_ms: u64,
    },
    /// Part of it taken by `transfer`, which debits the hold's account.
    Captured {
        /// How much.
        amount: Amount,
        /// The transfer that took it.
        transfer: TransferId,
    },
    /// Ended by whoever placed it.
    Released,
    /// Ended by time.
    Expired,
}

/// One event of the book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldEvent {
    /// Its number: events are numbered from 0, without gaps.
    pub number: u64,
    /// The hold it concerns.
    pub hold: HoldId,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    pub change: HoldChange,
}

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Released at this time.
    Released(u64),
    /// Expired at this time.
    Expired(u64),
}

/// A hold as its events leave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// Its number.
    pub id: HoldId,
    /// The account whose money is held.
    pub account: AccountId,
    /// What it holds in all (captured parts included).
    pub held: Amount,
    /// What was captured of it.
    pub captured: Amount,
    /// When it was placed.
    pub placed_ms: u64,
    /// When it expires (or expired).
    pub expires_ms: u64,
    /// What it is for.
    pub note: String,
    /// The service (product) that placed it, if a service did.
    pub by: Option<proto::Pid>,
    /// For a reservation by volume, its rating parameters.
    pub rating: Option<String>,
    /// How it ended, once it has.
    pub ended: Option<Ending>,
}

impl Hold {
    /// What it still holds: held less captured.
    pub fn remaining(&self) -> Amount {
        self.held
            .checked_sub(self.captured)
            .expect("a hold never captures more than it holds")
    }

    /// Whether it still holds money at `now_ms`: not ended, not expired.
    pub fn live_at(&self, now_ms: u64) -> bool {
        self.ended.is_none() && now_ms < self.expires_ms
    }
}

/// Why a change to a hold was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// No such hold.
    #[error("there is no hold {0}")]
    Unknown(HoldId),
    /// It ended or expired.
    #[error("hold {0} has ended (released, expired or past its expiry)")]
    Ended(HoldId),
    /// An amount that must be positive was not.
    #[error("the amount {0} is not positive")]
    NotPositive(Amount),
    /// More than the account can spend now.
    #[error("{amount} is more than the {available} that can be held on {account} now")]
    Insufficient {
        /// The account.
        account: AccountId,
        /// What was asked.
        amount: Amount,
        /// What could be.
        available: Amount,
    },
    /// A capture larger than what the hold has left, or a reduction below
    /// what was captured.
    #[error("hold {hold} has {remaining} left, less than {asked}")]
    BeyondHold {
        /// The hold.
        hold: HoldId,
        /// What it has left.
        remaining: Amount,
        /// What was asked of it.
        asked: Amount,
    },
    /// An expiry not after the time of the change.
    #[error("the expiry {expires_ms} is not after {now_ms}")]
    ExpiryPast {
        /// The expiry asked.
        expires_ms: u64,
        /// The time of the change.
        now_ms: u64,
    },
    /// A capture paid to the account the hold is on.
    #[error("hold {0} cannot be captured to its own account")]
    SameAccount(HoldId),
    /// A note too long or with control characters.
    #[error("a hold's note has at most {NOTE_BYTES_MAX} bytes of printable text")]
    BadNote,
    /// An amount out of range.
    #[error("an amount is out of range")]
    Range,
    /// An event read back that does not follow from the ones before it.
    #[error("hold event {number}: {reason}")]
    Inconsistent {
        /// The event's number.
        number: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Every hold and the events that made them.
#[derive(Debug, Clone, Default)]
pub struct HoldBook {
    events: Vec<HoldEvent>,
    holds: BTreeMap<HoldId, Hold>,
    /// The holds of each account that have not ended (expired ones too,
    /// until their `Expired` event).
    open: HashMap<AccountId, BTreeSet<HoldId>>,
}

impl HoldBook {
    /// An empty book.
    pub fn new() -> HoldBook {
        HoldBook::default()
    }

    /// A book from events read back from the store, in order; an event
    /// that does not follow from the ones before it is reported.
    pub fn restore(events: Vec<HoldEvent>) -> Result<HoldBook, HoldError> {
        let mut book = HoldBook::new();
        book.append_stored(events)?;
        Ok(book)
    }

    /// Adds events read back from the store (another node's, or all of
    /// them at start), in order from this book's next number; changes
    /// nothing if any is out of order or does not follow.
    pub fn append_stored(&mut self, events: Vec<HoldEvent>) -> Result<(), HoldError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut next = self.clone();
        for event in events {
            next.check_stored(&event)?;
            next.apply(event);
        }
        *self = next;
        Ok(())
    }

    /// The time of the latest event: no decision about holds is taken at
    /// an earlier time (a node whose clock is behind another's would
    /// otherwise still see a hold the other saw expire, and act on it).
    pub fn latest_ms(&self) -> u64 {
        self.events
            .iter()
            .map(|event| event.at_ms)
            .max()
            .unwrap_or(0)
    }

    /// Every event, in order.
    pub fn events(&self) -> &[HoldEvent] {
        &self.events
    }

    /// A hold by number.
    pub fn hold(&self, id: HoldId) -> Option<&Hold> {
        self.holds.get(&id)
    }

    /// Every hold, by number.
    pub fn holds(&self) -> impl Iterator<Item = &Hold> {
        self.holds.values()
    }

    /// What the live holds of `account` have not captured, at `now_ms`.
    pub fn held(&self, account: &AccountId, now_ms: u64) -> Amount {
        self.open
            .get(account)
            .into_iter()
            .flatten()
            .filter_map(|id| self.holds.get(id))
            .filter(|hold| hold.live_at(now_ms))
            .fold(Amount::ZERO, |sum, hold| {
                sum.checked_add(hold.remaining())
                    .expect("what is held is within the balance's range")
            })
    }

    /// `balance` less what is held on `account` at `now_ms`.
    pub fn available(&self, account: &AccountId, balance: Amount, now_ms: u64) -> Amount {
        balance
            .checked_sub(self.held(account, now_ms))
            .expect("available is within the balance's range")
    }

    /// The next event's number and the next hold's.
    fn next_numbers(&self) -> (u64, HoldId) {
        let next_hold = self.holds.keys().next_back().map_or(0, |id| id.0 + 1);
        (self.events.len() as u64, HoldId(next_hold))
    }

    /// A new hold of `amount` on `account`, which can spend `spendable`
    /// now (its available balance and any credit it has).
    pub fn prepare_place(
        &self,
        account: AccountId,
        amount: Amount,
        expires_ms: u64,
        note: &str,
        spendable: Amount,
        now_ms: u64,
    ) -> Result<HoldEvent, HoldError> {
        self.prepare_place_by(
            account, amount, expires_ms, note, spendable, now_ms, None, None,
        )
    }

    /// As `prepare_place`, for the service `by` (which alone may then
    /// charge and release it).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_place_by(
        &self,
        account: AccountId,
        amount: Amount,
        expires_ms: u64,
        note: &str,
        spendable: Amount,
        now_ms: u64,
        by: Option<proto::Pid>,
        rating: Option<String>,
    ) -> Result<HoldEvent, HoldError> {
        if !amount.is_positive() {
            return Err(HoldError::NotPositive(amount));
        }
        if expires_ms <= now_ms {
            return Err(HoldError::ExpiryPast { expires_ms, now_ms });
        }
        if expires_ms > EXPIRY_MAX_MS {
            return Err(HoldError::Range);
        }
        if note.len() > NOTE_BYTES_MAX || note.chars().any(char::is_control) {
            return Err(HoldError::BadNote);
        }
        if amount > spendable {
            return Err(HoldError::Insufficient {
                account,
                amount,
                available: spendable,
            });
        }
        let (number, hold) = self.next_numbers();
        Ok(HoldEvent {
            number,
            hold,
            at_ms: now_ms,
            change: HoldChange::Placed {
                account,
                amount,
                expires_ms,
                note: note.to_owned(),
                by,
                rating,
            },
        })
    }

    fn live(&self, id: HoldId, now_ms: u64) -> Result<&Hold, HoldError> {
        let hold = self.holds.get(&id).ok_or(HoldError::Unknown(id))?;
        if !hold.live_at(now_ms) {
            return Err(HoldError::Ended(id));
        }
        Ok(hold)
    }

    /// More (`delta` positive, within `spendable`) or less (never below
    /// what was captured) held, until `expires_ms`.
    pub fn prepare_adjust(
        &self,
        id: HoldId,
        delta: Amount,
        expires_ms: u64,
        spendable: Amount,
        now_ms: u64,
    ) -> Result<HoldEvent, HoldError> {
        let hold = self.live(id, now_ms)?;
        if expires_ms <= now_ms {
            return Err(HoldError::ExpiryPast { expires_ms, now_ms });
        }
        if expires_ms > EXPIRY_MAX_MS {
            return Err(HoldError::Range);
        }
        if delta.is_positive() && delta > spendable {
            return Err(HoldError::Insufficient {
                account: hold.account,
                amount: delta,
                available: spendable,
            });
        }
        if delta.is_negative() && delta.negated() > hold.remaining() {
            return Err(HoldError::BeyondHold {
                hold: id,
                remaining: hold.remaining(),
                asked: delta.negated(),
            });
        }
        hold.held.checked_add(delta).map_err(|_| HoldError::Range)?;
        Ok(HoldEvent {
            number: self.events.len() as u64,
            hold: id,
            at_ms: now_ms,
            change: HoldChange::Adjusted { delta, expires_ms },
        })
    }

    /// `amount` of the hold taken by `transfer` (which the caller posts in
    /// the same write, debiting the hold's account by `amount`).
    pub fn prepare_capture(
        &self,
        id: HoldId,
        amount: Amount,
        transfer: TransferId,
        now_ms: u64,
    ) -> Result<HoldEvent, HoldError> {
        let hold = self.live(id, now_ms)?;
        if !amount.is_positive() {
            return Err(HoldError::NotPositive(amount));
        }
        if amount > hold.remaining() {
            return Err(HoldError::BeyondHold {
                hold: id,
                remaining: hold.remaining(),
                asked: amount,
            });
        }
        Ok(HoldEvent {
            number: self.events.len() as u64,
            hold: id,
            at_ms: now_ms,
            change: HoldChange::Captured { amount, transfer },
        })
    }

    /// The end of a live hold by whoever placed it.
    pub fn prepare_release(&self, id: HoldId, now_ms: u64) -> Result<HoldEvent, HoldError> {
        self.live(id, now_ms)?;
        Ok(HoldEvent {
            number: self.events.len() as u64,
            hold: id,
            at_ms: now_ms,
            change: HoldChange::Released,
        })
    }

    /// `Expired` events for every hold past its expiry at `now_ms` that
    /// has not ended, dated at its expiry, oldest first.
    pub fn prepare_expiries(&self, now_ms: u64) -> Vec<HoldEvent> {
        let mut due: Vec<&Hold> = self
            .open
            .values()
            .flatten()
            .filter_map(|id| self.holds.get(id))
            .filter(|hold| hold.expires_ms <= now_ms)
            .collect();
        due.sort_by_key(|hold| (hold.expires_ms, hold.id));
        let first = self.events.len() as u64;
        due.into_iter()
            .enumerate()
            .map(|(offset, hold)| HoldEvent {
                number: first + offset as u64,
                hold: hold.id,
                at_ms: hold.expires_ms,
                change: HoldChange::Expired,
            })
            .collect()
    }

    /// Applies events from `prepare_*` on the same book; anything else is
    /// a bug, so it panics.
    pub fn commit(&mut self, events: Vec<HoldEvent>) {
        for event in events {
            if let Err(error) = self.check_stored(&event) {
                panic!("holds: a prepared event does not follow: {error}");
            }
            self.apply(event);
        }
    }

    /// Whether `event` follows from the book as it is.
    fn check_stored(&self, event: &HoldEvent) -> Result<(), HoldError> {
        let wrong = |reason: String| HoldError::Inconsistent {
            number: event.number,
            reason,
        };
        if event.number != self.events.len() as u64 {
            return Err(wrong(format!("expected number {}", self.events.len())));
        }
        if let HoldChange::Placed { amount, note, .. } = &event.change {
            if event.hold != self.next_numbers().1 {
                return Err(wrong(format!("a new hold numbered {}", event.hold)));
            }
            if !amount.is_positive() || note.len() > NOTE_BYTES_MAX {
                return Err(wrong("a placement out of bounds".into()));
            }
            return Ok(());
        }
        let hold = self
            .holds
            .get(&event.hold)
            .ok_or_else(|| wrong(format!("no hold {}", event.hold)))?;
        if hold.ended.is_some() {
            return Err(wrong(format!("hold {} ended before", event.hold)));
        }
        match &event.change {
            HoldChange::Placed { .. } => unreachable!("checked above"),
            HoldChange::Adjusted { delta, .. } => {
                let held = hold
                    .held
                    .checked_add(*delta)
                    .map_err(|_| wrong("out of range".into()))?;
                if held < hold.captured {
                    return Err(wrong("below what was captured".into()));
                }
            }
            HoldChange::Captured { amount, .. } => {
                if !amount.is_positive() || *amount > hold.remaining() {
                    return Err(wrong(format!("a capture of {amount} beyond the hold")));
                }
            }
            HoldChange::Released => {}
            HoldChange::Expired => {
                if event.at_ms < hold.expires_ms {
                    return Err(wrong("expired before its expiry".into()));
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: HoldEvent) {
        let id = event.hold;
        match &event.change {
            HoldChange::Placed {
                account,
                amount,
                expires_ms,
                note,
                by,
                rating,
            } => {
                self.holds.insert(
                    id,
                    Hold {
                        id,
                        account: *account,
                        held: *amount,
                        captured: Amount::ZERO,
                        placed_ms: event.at_ms,
                        expires_ms: *expires_ms,
                        note: note.clone(),
                        by: *by,
                        rating: rating.clone(),
                        ended: None,
                    },
                );
                self.open.entry(*account).or_default().insert(id);
            }
            change => {
                let hold = self.holds.get_mut(&id).expect("checked: the hold exists");
                match change {
                    HoldChange::Adjusted { delta, expires_ms } => {
                        hold.held = hold.held.checked_add(*delta).expect("checked: in range");
                        hold.expires_ms = *expires_ms;
                    }
                    HoldChange::Captured { amount, .. } => {
                        hold.captured = hold
                            .captured
                            .checked_add(*amount)
                            .expect("checked: within the hold");
                    }
                    HoldChange::Released | HoldChange::Expired => {
                        hold.ended = Some(if matches!(change, HoldChange::Released) {
                            Ending::Released(event.at_ms)
                        } else {
                            Ending::Expired(event.at_ms)
                        });
                        let account = hold.account;
                        if let Some(open) = self.open.get_mut(&account) {
                            open.remove(&id);
                            if open.is_empty() {
                                self.open.remove(&account);
                            }
                        }
                    }
                    HoldChange::Placed { .. } => unreachable!("matched above"),
                }
            }
        }
        self.events.push(event);
    }
}
