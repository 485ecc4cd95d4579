//! The ledger: double-entry transfers between micro-accounts. The only code
//! that creates postings.
//!
//! Every transfer debits one account and credits another by the same
//! positive `Amount`; its two postings are derived from it and never change.
//! A correction is a new transfer. Balances are running sums of postings, so
//! the sum of all balances is always zero. Transfers are posted in batches,
//! all or nothing: a batch whose any transfer is invalid or would overflow a
//! balance changes nothing.

use crate::hashing::Map;
use std::fmt;

use proto::{Amount, BatchId, Cid, Pid};

/// Accounts the branch itself keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SystemAccount {
    /// Money entering and leaving the system: deposits from customers'
    /// macro-accounts are debited here, withdrawals credited. Its balance is
    /// minus the money customers hold.
    Funding,
}

/// An account: a customer's micro-account or a system account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccountId {
    /// A customer's micro-account.
    Customer(Cid),
    /// A system account.
    System(SystemAccount),
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountId::Customer(cid) => write!(f, "{cid}"),
            AccountId::System(SystemAccount::Funding) => f.write_str("funding"),
        }
    }
}

/// A transfer's number, in posting order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub u64);

/// Why money moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferKind {
    /// A deposit from the customer's macro-account.
    Deposit,
    /// A withdrawal to the customer's macro-account.
    Withdrawal,
    /// Priced uses of a product by one payer, from one uploaded batch.
    Use {
        /// The product used.
        pid: Pid,
        /// The batch that carried the readings.
        batch: BatchId,
        /// How many priced uses of the batch this transfer sums.
        uses: u64,
    },
    /// Undoes (part of) an earlier transfer.
    Correction {
        /// The transfer corrected.
        of: TransferId,
    },
    /// A charge (payer to the product's owner) or refund (the other way)
    /// asked by a service for one of its products (Parlay X Payment), under
    /// the service's reference code (`payments::PaymentRequest`).
    Payment {
        /// The product the service charges for.
        pid: Pid,
        /// The service's reference code of the request.
        reference: String,
    },
}

/// A transfer to post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTransfer {
    /// The account that pays.
    pub debit: AccountId,
    /// The account that is paid.
    pub credit: AccountId,
    /// How much; positive.
    pub amount: Amount,
    /// Why.
    pub kind: TransferKind,
}

/// A posted transfer. Never changed, never removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Its number.
    pub id: TransferId,
    /// The account debited.
    pub debit: AccountId,
    /// The account credited.
    pub credit: AccountId,
    /// The amount, positive.
    pub amount: Amount,
    /// Why.
    pub kind: TransferKind,
    /// When it was posted, ms since the Unix epoch.
    pub posted_ms: u64,
}

impl Transfer {
    /// The transfer's two postings: the debit (negative) and the credit.
    pub fn postings(&self) -> [Posting; 2] {
        [
            Posting {
                transfer: self.id,
                account: self.debit,
                amount: self.amount.negated(),
            },
            Posting {
                transfer: self.id,
                account: self.credit,
                amount: self.amount,
            },
        ]
    }
}

/// One line of an account's statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posting {
    /// The transfer it belongs to.
    pub transfer: TransferId,
    /// The account.
    pub account: AccountId,
    /// Credit (positive) or debit (negative).
    pub amount: Amount,
}

/// Why a batch of transfers was not posted. Nothing of it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// An amount was zero or negative.
    #[error("transfer {index} of the batch: the amount {amount} is not positive")]
    NotPositive {
        /// Position in the batch.
        index: usize,
        /// The amount.
        amount: Amount,
    },
    /// Debit and credit were the same account.
    #[error("transfer {index} of the batch: debit and credit are the same account {account}")]
    SameAccount {
        /// Position in the batch.
        index: usize,
        /// The account.
        account: AccountId,
    },
    /// A balance would leave the ledger's range.
    #[error("transfer {index} of the batch: the balance of {account} would be out of range")]
    Overflow {
        /// Position in the batch.
        index: usize,
        /// The account.
        account: AccountId,
    },
    /// A correction names a transfer that does not exist.
    #[error("transfer {index} of the batch corrects transfer {of}, which does not exist")]
    UnknownTransfer {
        /// Position in the batch.
        index: usize,
        /// The transfer named.
        of: u64,
    },
}

/// Transfers and the balances they add up to.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    transfers: Vec<Transfer>,
    balances: Map<AccountId, Amount>,
    /// The positions of each account's transfers, in order: statements
    /// without a scan of the whole ledger.
    by_account: Map<AccountId, Vec<usize>>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// A ledger from transfers read back from the store, in order. The
    /// balances are recomputed and every invariant checked; a store that
    /// returns anything else is corrupt, so this panics.
    pub fn restore(transfers: Vec<Transfer>) -> Ledger {
        let mut balances: Map<AccountId, Amount> = Map::default();
        let mut by_account: Map<AccountId, Vec<usize>> = Map::default();
        for (position, transfer) in transfers.iter().enumerate() {
            for posting in transfer.postings() {
                let balance = balances.entry(posting.account).or_insert(Amount::ZERO);
                *balance = balance
                    .checked_add(posting.amount)
                    .expect("ledger: restored balance in range");
                by_account
                    .entry(posting.account)
                    .or_default()
                    .push(position);
            }
        }
        let ledger = Ledger {
            transfers,
            balances,
            by_account,
        };
        ledger.verify();
        ledger
    }

    /// The balance of `account` (zero for an account never used).
    pub fn balance(&self, account: &AccountId) -> Amount {
        self.balances.get(account).copied().unwrap_or(Amount::ZERO)
    }

    /// Every transfer, in posting order.
    pub fn transfers(&self) -> &[Transfer] {
        &self.transfers
    }

    /// Every account with a posting, and its balance.
    pub fn balances(&self) -> impl Iterator<Item = (&AccountId, &Amount)> {
        self.balances.iter()
    }

    /// The postings of one account, in order.
    pub fn statement(&self, account: AccountId) -> impl Iterator<Item = Posting> + '_ {
        self.transfers_of(account)
            .flat_map(Transfer::postings)
            .filter(move |posting| posting.account == account)
    }

    /// The transfers that debit or credit `account`, in posting order.
    pub fn transfers_of(&self, account: AccountId) -> impl Iterator<Item = &Transfer> + '_ {
        self.by_account
            .get(&account)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|position| &self.transfers[*position])
    }

    /// Posts `batch` atomically at `posted_ms`; returns the id of its first
    /// transfer.
    pub fn post(
        &mut self,
        batch: Vec<NewTransfer>,
        posted_ms: u64,
    ) -> Result<TransferId, LedgerError> {
        let first = TransferId(self.transfers.len() as u64);
        let prepared = self.prepare(batch, posted_ms)?;
        self.commit(prepared);
        Ok(first)
    }

    /// Checks `batch` and numbers its transfers without changing anything,
    /// so they can be made durable before `commit` applies them.
    pub fn prepare(
        &self,
        batch: Vec<NewTransfer>,
        posted_ms: u64,
    ) -> Result<Vec<Transfer>, LedgerError> {
        let first = self.transfers.len() as u64;
        let mut changed: Map<AccountId, Amount> = Map::default();
        for (index, transfer) in batch.iter().enumerate() {
            self.check(index, transfer)?;
            for (account, delta) in [
                (transfer.debit, transfer.amount.negated()),
                (transfer.credit, transfer.amount),
            ] {
                let current = changed
                    .get(&account)
                    .copied()
                    .unwrap_or_else(|| self.balance(&account));
                let next = current
                    .checked_add(delta)
                    .map_err(|_| LedgerError::Overflow { index, account })?;
                changed.insert(account, next);
            }
        }
        let prepared = batch
            .into_iter()
            .enumerate()
            .map(|(offset, transfer)| Transfer {
                id: TransferId(first + offset as u64),
                debit: transfer.debit,
                credit: transfer.credit,
                amount: transfer.amount,
                kind: transfer.kind,
                posted_ms,
            })
            .collect();
        Ok(prepared)
    }

    /// Adds transfers another node posted, read back from the shared store
    /// in order from this ledger's next number; refuses (changing nothing)
    /// a gap, a number out of order, or a transfer that is not valid.
    pub fn append_stored(&mut self, transfers: Vec<Transfer>) -> Result<(), String> {
        let first = self.transfers.len() as u64;
        for (index, (next, transfer)) in (first..).zip(&transfers).enumerate() {
            if transfer.id.0 != next {
                return Err(format!(
                    "the store's transfer {} came where {next} was expected",
                    transfer.id.0
                ));
            }
            let new = NewTransfer {
                debit: transfer.debit,
                credit: transfer.credit,
                amount: transfer.amount,
                kind: transfer.kind.clone(),
            };
            self.check(index, &new)
                .map_err(|error| format!("the store's transfer {next}: {error}"))?;
        }
        self.commit(transfers);
        Ok(())
    }

    /// Applies transfers from `prepare` on the same ledger state; anything
    /// else is a bug, so it panics.
    pub fn commit(&mut self, prepared: Vec<Transfer>) {
        for transfer in prepared {
            assert_eq!(
                transfer.id.0,
                self.transfers.len() as u64,
                "ledger: prepared transfers committed out of order"
            );
            let position = self.transfers.len();
            for posting in transfer.postings() {
                let balance = self.balances.entry(posting.account).or_insert(Amount::ZERO);
                *balance = balance
                    .checked_add(posting.amount)
                    .expect("ledger: prepared transfer stays in range");
                self.by_account
                    .entry(posting.account)
                    .or_default()
                    .push(position);
            }
            self.transfers.push(transfer);
        }
    }

    fn check(&self, index: usize, transfer: &NewTransfer) -> Result<(), LedgerError> {
        if !transfer.amount.is_positive() {
            return Err(LedgerError::NotPositive {
                index,
                amount: transfer.amount,
            });
        }
        if transfer.debit == transfer.credit {
            return Err(LedgerError::SameAccount {
                index,
                account: transfer.debit,
            });
        }
        if let TransferKind::Correction { of } = transfer.kind
            && of.0 >= self.transfers.len() as u64
        {
            return Err(LedgerError::UnknownTransfer { index, of: of.0 });
        }
        Ok(())
    }

    /// Recomputes every balance from the postings and checks the ledger's
    /// invariants; a failure is a bug, so it panics.
    pub fn verify(&self) {
        let mut sums: Map<AccountId, Amount> = Map::default();
        let mut positions: Map<AccountId, Vec<usize>> = Map::default();
        for (position, transfer) in self.transfers.iter().enumerate() {
            assert_eq!(
                transfer.id.0, position as u64,
                "ledger: transfer ids are dense"
            );
            assert!(
                transfer.amount.is_positive(),
                "ledger: transfer {} not positive",
                transfer.id.0
            );
            assert_ne!(
                transfer.debit, transfer.credit,
                "ledger: transfer {} to itself",
                transfer.id.0
            );
            for posting in transfer.postings() {
                let sum = sums.entry(posting.account).or_insert(Amount::ZERO);
                *sum = sum
                    .checked_add(posting.amount)
                    .expect("ledger: posting sum in range");
                positions.entry(posting.account).or_default().push(position);
            }
        }
        assert_eq!(
            positions, self.by_account,
            "ledger: the index of accounts' transfers differs from the transfers"
        );
        let mut total = Amount::ZERO;
        for (account, balance) in &self.balances {
            let posted = sums.get(account).copied().unwrap_or(Amount::ZERO);
            assert_eq!(
                *balance, posted,
                "ledger: balance of {account} differs from its postings"
            );
            total = total.checked_add(*balance).expect("ledger: total in range");
        }
        assert_eq!(
            sums.len(),
            self.balances.len(),
            "ledger: an account has postings but no balance"
        );
        assert!(total.is_zero(), "ledger: balances sum to {total}, not zero");
    }
}

/// Whether an account may keep using products: its balance stays above its
/// credit limit (0 for prepaid accounts, so a zero balance is not enough) and
/// no operator has marked it "deny service".
pub fn in_good_standing(balance: Amount, credit_limit: Amount, denied: bool) -> bool {
    !denied && balance > credit_limit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(n: u32) -> AccountId {
        AccountId::Customer(Cid::parse(&format!("B1-C{n}")).unwrap())
    }

    const FUNDING: AccountId = AccountId::System(SystemAccount::Funding);

    fn amount(text: &str) -> Amount {
        Amount::parse(text).unwrap()
    }

    #[test]
    fn another_nodes_transfers_are_added_only_in_order_and_valid() {
        let deposit = |n: u64, to: u32, text: &str| Transfer {
            id: TransferId(n),
            debit: FUNDING,
            credit: customer(to),
            amount: amount(text),
            kind: TransferKind::Deposit,
            posted_ms: 1,
        };
        let mut ledger = Ledger::new();
        ledger
            .append_stored(vec![deposit(0, 1, "2"), deposit(1, 2, "3")])
            .unwrap();
        // A gap, a repeat, or an amount that is not positive: refused,
        // nothing of the call added.
        for bad in [
            vec![deposit(2, 1, "1"), deposit(4, 1, "1")],
            vec![deposit(1, 1, "1")],
            vec![deposit(2, 1, "1"), deposit(3, 1, "0")],
        ] {
            assert!(ledger.append_stored(bad).is_err());
            assert_eq!(ledger.transfers().len(), 2);
        }
        ledger.append_stored(vec![deposit(2, 1, "0.5")]).unwrap();
        assert_eq!(ledger.balance(&customer(1)), amount("2.5"));
        assert_eq!(ledger.balance(&FUNDING), amount("-5.5"));
        ledger.verify();
    }

    fn deposit(to: AccountId, how_much: &str) -> NewTransfer {
        NewTransfer {
            debit: FUNDING,
            credit: to,
            amount: amount(how_much),
            kind: TransferKind::Deposit,
        }
    }

    fn use_of(payer: AccountId, owner: AccountId, how_much: &str) -> NewTransfer {
        NewTransfer {
            debit: payer,
            credit: owner,
            amount: amount(how_much),
            kind: TransferKind::Use {
                pid: Pid::parse("B1-P1").unwrap(),
                batch: BatchId::parse("B1-M1:1").unwrap(),
                uses: 1,
            },
        }
    }

    #[test]
    fn uses_move_money_from_payer_to_owner_exactly() {
        let mut ledger = Ledger::new();
        ledger.post(vec![deposit(customer(1), "10")], 0).unwrap();
        ledger
            .post(vec![use_of(customer(1), customer(2), "0.000000001"); 3], 0)
            .unwrap();
        assert_eq!(ledger.balance(&customer(1)), amount("9.999999997"));
        assert_eq!(ledger.balance(&customer(2)), amount("0.000000003"));
        assert_eq!(ledger.balance(&FUNDING), amount("-10"));
        let statement: Vec<Amount> = ledger.statement(customer(1)).map(|p| p.amount).collect();
        assert_eq!(statement.len(), 4);
        ledger.verify();
    }

    #[test]
    fn a_bad_transfer_refuses_the_whole_batch() {
        let mut ledger = Ledger::new();
        ledger.post(vec![deposit(customer(1), "5")], 0).unwrap();
        let before = ledger.clone();
        let mut zero = use_of(customer(1), customer(2), "1");
        zero.amount = Amount::ZERO;
        let batch = vec![use_of(customer(1), customer(2), "1"), zero];
        assert_eq!(
            ledger.post(batch, 0),
            Err(LedgerError::NotPositive {
                index: 1,
                amount: Amount::ZERO
            })
        );
        assert_eq!(ledger.transfers(), before.transfers());
        assert_eq!(ledger.balance(&customer(1)), amount("5"));
        let to_self = use_of(customer(1), customer(1), "1");
        assert!(matches!(
            ledger.post(vec![to_self], 0),
            Err(LedgerError::SameAccount { .. })
        ));
        let huge = amount("999999999999999999");
        let overflow = vec![
            deposit(customer(3), "999999999999999999"),
            NewTransfer {
                amount: huge,
                ..deposit(customer(3), "1")
            },
        ];
        assert!(matches!(
            ledger.post(overflow, 0),
            Err(LedgerError::Overflow { .. })
        ));
        assert_eq!(ledger.transfers().len(), 1);
        ledger.verify();
    }

    #[test]
    fn standing_follows_balance_limit_and_denial() {
        assert!(
            !in_good_standing(Amount::ZERO, Amount::ZERO, false),
            "prepaid needs funds"
        );
        assert!(in_good_standing(amount("0.01"), Amount::ZERO, false));
        assert!(
            !in_good_standing(amount("100"), Amount::ZERO, true),
            "denied"
        );
        assert!(
            in_good_standing(amount("-5"), amount("-10"), false),
            "within credit"
        );
        assert!(!in_good_standing(amount("-10"), amount("-10"), false));
    }
}
