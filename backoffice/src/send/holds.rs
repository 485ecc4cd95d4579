//! The backoffice's holds (`crate::holds`): placed, adjusted, captured,
//! released and expired under the ledger's lock, each change durable
//! before it is applied in memory, as money is. A refusal (`HoldError`)
//! changes nothing; a failure of the store is a fault, as for batches.

use proto::{Amount, Fault};

use super::{Backoffice, internal, lock};
use crate::holds::{Hold, HoldError, HoldEvent, HoldId};
use crate::ledger::{AccountId, NewTransfer, Transfer, TransferKind};
use crate::store::Store;

/// A hold change's outcome: done, or refused with nothing changed.
pub type HoldResult<T> = Result<T, HoldError>;

impl<S: Store> Backoffice<S> {
    /// A hold, as this node knows it (caught up where nodes share the
    /// store).
    pub fn hold(&self, id: HoldId) -> Option<Hold> {
        let _ledger = self.ledger_read();
        lock(&self.holds).hold(id).cloned()
    }

    /// The balance of `account` less what its live holds keep, at `now_ms`.
    pub fn available(&self, account: &AccountId, now_ms: u64) -> Amount {
        let ledger = self.ledger_read();
        let holds = lock(&self.holds);
        holds.available(
            account,
            ledger.balance(account),
            now_ms.max(holds.latest_ms()),
        )
    }

    /// What `account` can spend now: its available balance, down to its
    /// credit limit where it is a customer not denied (the lowest balance
    /// in good standing is just above the limit, which is 0 for a prepaid
    /// account, below 0 with credit); a denied customer can spend nothing.
    pub(super) fn spendable(
        &self,
        account: &AccountId,
        balance: Amount,
        holds: &crate::holds::HoldBook,
        now_ms: u64,
    ) -> Result<Amount, Fault> {
        let available = holds.available(account, balance, now_ms);
        let AccountId::Customer(cid) = account else {
            return Ok(available);
        };
        let customer = self.store.customer(cid).map_err(|error| internal(&error))?;
        Ok(match customer {
            Some(customer) if !customer.denied => available
                .checked_sub(customer.credit_limit)
                .map_err(|error| internal(&error))?,
            _ => Amount::ZERO.min(available),
        })
    }

    /// Writes `events` (with the transfers of their captures) and applies
    /// them, under the ledger lock the caller holds.
    pub(super) fn record_holds(
        &self,
        ledger: &mut crate::ledger::Ledger,
        holds: &mut crate::holds::HoldBook,
        events: Vec<HoldEvent>,
        transfers: Vec<Transfer>,
        request: Option<&crate::payments::PaymentRequest>,
    ) -> Result<(), Fault> {
        if events.is_empty() && transfers.is_empty() {
            return Ok(());
        }
        self.store
            .stage_holds(&events, &transfers, request)
            .map_err(|error| self.stop_money(&error))?;
        ledger.commit(transfers);
        holds.commit(events);
        Ok(())
    }

    /// Holds `amount` of `account` until `expires_ms`, for `note`.
    pub fn place_hold(
        &self,
        account: AccountId,
        amount: Amount,
        expires_ms: u64,
        note: &str,
        now_ms: u64,
    ) -> Result<HoldResult<Hold>, Fault> {
        self.still_durable()?;
        let mut ledger = self.ledger_for_write()?;
        let mut holds = lock(&self.holds);
        let now_ms = now_ms.max(holds.latest_ms());
        let spendable = self.spendable(&account, ledger.balance(&account), &holds, now_ms)?;
        let event = match holds.prepare_place(account, amount, expires_ms, note, spendable, now_ms)
        {
            Ok(event) => event,
            Err(refused) => return Ok(Err(refused)),
        };
        let id = event.hold;
        self.record_holds(&mut ledger, &mut holds, vec![event], Vec::new(), None)?;
        let hold = holds.hold(id).cloned().expect("just placed");
        drop(holds);
        drop(ledger);
        self.durable()?;
        Ok(Ok(hold))
    }

    /// More (within what the account can spend) or less (not below what
    /// was captured) held by `id`, until `expires_ms`.
    pub fn adjust_hold(
        &self,
        id: HoldId,
        delta: Amount,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<HoldResult<Hold>, Fault> {
        self.still_durable()?;
        let mut ledger = self.ledger_for_write()?;
        let mut holds = lock(&self.holds);
        let now_ms = now_ms.max(holds.latest_ms());
        let Some(account) = holds.hold(id).map(|hold| hold.account) else {
            return Ok(Err(HoldError::Unknown(id)));
        };
        let spendable = self.spendable(&account, ledger.balance(&account), &holds, now_ms)?;
        let event = match holds.prepare_adjust(id, delta, expires_ms, spendable, now_ms) {
            Ok(event) => event,
            Err(refused) => return Ok(Err(refused)),
        };
        self.record_holds(&mut ledger, &mut holds, vec![event], Vec::new(), None)?;
        let hold = holds.hold(id).cloned().expect("just adjusted");
        drop(holds);
        drop(ledger);
        self.durable()?;
        Ok(Ok(hold))
    }

    /// Takes `amount` of hold `id` by a transfer of `kind` from the hold's
    /// account to `credit`; the transfer and the capture are one write.
    pub fn capture_hold(
        &self,
        id: HoldId,
        amount: Amount,
        credit: AccountId,
        kind: TransferKind,
        now_ms: u64,
    ) -> Result<HoldResult<Transfer>, Fault> {
        self.still_durable()?;
        let mut ledger = self.ledger_for_write()?;
        let mut holds = lock(&self.holds);
        let now_ms = now_ms.max(holds.latest_ms());
        let Some(account) = holds.hold(id).map(|hold| hold.account) else {
            return Ok(Err(HoldError::Unknown(id)));
        };
        if credit == account {
            return Ok(Err(HoldError::SameAccount(id)));
        }
        let transfer = NewTransfer {
            debit: account,
            credit,
            amount,
            kind,
        };
        // Checked before the ledger: an amount beyond the hold, or a hold
        // that ended, is a refusal, not a fault.
        if let Err(refused) =
            holds.prepare_capture(id, amount, crate::ledger::TransferId(0), now_ms)
        {
            return Ok(Err(refused));
        }
        let prepared = ledger
            .prepare(vec![transfer], now_ms)
            .map_err(|error| internal(&error))?;
        let event = holds
            .prepare_capture(id, amount, prepared[0].id, now_ms)
            .map_err(|error| internal(&error))?;
        let posted = prepared[0].clone();
        self.record_holds(&mut ledger, &mut holds, vec![event], prepared, None)?;
        drop(holds);
        drop(ledger);
        self.durable()?;
        Ok(Ok(posted))
    }

    /// Ends hold `id`: what it did not capture is available again.
    pub fn release_hold(&self, id: HoldId, now_ms: u64) -> Result<HoldResult<Hold>, Fault> {
        self.still_durable()?;
        let mut ledger = self.ledger_for_write()?;
        let mut holds = lock(&self.holds);
        let now_ms = now_ms.max(holds.latest_ms());
        let event = match holds.prepare_release(id, now_ms) {
            Ok(event) => event,
            Err(refused) => return Ok(Err(refused)),
        };
        self.record_holds(&mut ledger, &mut holds, vec![event], Vec::new(), None)?;
        let hold = holds.hold(id).cloned().expect("just released");
        drop(holds);
        drop(ledger);
        self.durable()?;
        Ok(Ok(hold))
    }

    /// Writes the expiry of every hold past its time at `now_ms` (they
    /// already hold nothing); returns how many. Run by a sweep, whether or
    /// not anyone calls.
    pub fn expire_holds(&self, now_ms: u64) -> Result<usize, Fault> {
        {
            // Caught up (where nodes share the store) without the lock.
            let _ledger = self.ledger_read();
            if lock(&self.holds).prepare_expiries(now_ms).is_empty() {
                return Ok(0);
            }
        }
        self.still_durable()?;
        let mut ledger = self.ledger_for_write()?;
        let mut holds = lock(&self.holds);
        let due = holds.prepare_expiries(now_ms);
        let count = due.len();
        self.record_holds(&mut ledger, &mut holds, due, Vec::new(), None)?;
        drop(holds);
        drop(ledger);
        self.durable()?;
        Ok(count)
    }
}
