//! Checking the books: what `backoffice verify` and the operator's
//! `ledger.verify` report. The store checks its own records and indexes
//! (`SledStore::verify`, the only code here that reads sled); a running
//! branch also compares its ledger in memory with the store. Nothing here
//! panics on a corrupt record: every finding is a line of the report.

use std::collections::HashMap;

use proto::Amount;

use crate::ledger::{AccountId, Ledger, Transfer};
use crate::send::Backoffice;
use crate::store::{SledStore, Store, StoreError};

/// Problems a report lists at most; the rest are counted.
pub const PROBLEMS_KEPT: usize = 100;

/// What was checked, with counts, and what was found wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// What was checked, and how many of each.
    pub checked: Vec<(&'static str, u64)>,
    /// The first [`PROBLEMS_KEPT`] problems, in the order found.
    pub problems: Vec<String>,
    /// Every problem found.
    pub problem_count: u64,
}

impl Report {
    /// Notes that `count` records of `what` were checked.
    pub fn checked(&mut self, what: &'static str, count: u64) {
        self.checked.push((what, count));
    }

    /// Notes a problem.
    pub fn problem(&mut self, problem: impl Into<String>) {
        self.problem_count += 1;
        if self.problems.len() < PROBLEMS_KEPT {
            self.problems.push(problem.into());
        }
    }

    /// True when nothing was found wrong.
    pub fn is_ok(&self) -> bool {
        self.problem_count == 0
    }

    /// `transfers=12 accounts=3 ...`.
    pub fn summary(&self) -> String {
        self.checked
            .iter()
            .map(|(what, count)| format!("{what}={count}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Checks the ledger's invariants on `transfers` as read from the store, in
/// key order: ids dense from 0, every amount positive and in range, debit
/// and credit distinct, corrections of earlier transfers, every running
/// balance in range, the balances summing to zero. Answers the balances.
pub fn check_transfers(transfers: &[Transfer], report: &mut Report) -> HashMap<AccountId, Amount> {
    let mut balances: HashMap<AccountId, Amount> = HashMap::new();
    for (position, transfer) in transfers.iter().enumerate() {
        let id = transfer.id.0;
        if id != position as u64 {
            report.problem(format!(
                "transfer ids are not dense: transfer {id} is number {position} in order"
            ));
        }
        if !transfer.amount.is_positive() {
            report.problem(format!(
                "transfer {id}: the amount {} is not positive",
                transfer.amount
            ));
        }
        if transfer.debit == transfer.credit {
            report.problem(format!(
                "transfer {id}: debit and credit are the same account"
            ));
        }
        if let crate::ledger::TransferKind::Correction { of } = transfer.kind
            && of.0 >= id
        {
            report.problem(format!("transfer {id} corrects a later transfer {}", of.0));
        }
        for posting in transfer.postings() {
            let balance = balances.entry(posting.account).or_insert(Amount::ZERO);
            match balance.checked_add(posting.amount) {
                Ok(sum) => *balance = sum,
                Err(_) => report.problem(format!(
                    "transfer {id}: the balance of {} leaves the ledger's range",
                    posting.account
                )),
            }
        }
    }
    let mut total = Amount::ZERO;
    for balance in balances.values() {
        match total.checked_add(*balance) {
            Ok(sum) => total = sum,
            Err(_) => report.problem("the sum of all balances leaves the ledger's range"),
        }
    }
    if !total.is_zero() {
        report.problem(format!("the balances sum to {total}, not zero"));
    }
    report.checked("transfers", transfers.len() as u64);
    report.checked("accounts", balances.len() as u64);
    balances
}

/// Compares the ledger in memory with the transfers in the store and the
/// balances they add up to: the store may hold more (staged since), never
/// other or fewer.
pub fn compare_ledger(ledger: &Ledger, stored: &[Transfer], report: &mut Report) {
    let in_memory = ledger.transfers();
    if in_memory.len() > stored.len() {
        report.problem(format!(
            "the ledger in memory has {} transfers, the store {}",
            in_memory.len(),
            stored.len()
        ));
    }
    for (ours, theirs) in in_memory.iter().zip(stored) {
        if ours != theirs {
            report.problem(format!(
                "transfer {} differs between the ledger in memory and the store",
                ours.id.0
            ));
        }
    }
    let prefix = &stored[..in_memory.len().min(stored.len())];
    let mut sums: HashMap<AccountId, Amount> = HashMap::new();
    for transfer in prefix {
        for posting in transfer.postings() {
            let sum = sums.entry(posting.account).or_insert(Amount::ZERO);
            *sum = sum.checked_add(posting.amount).unwrap_or(*sum);
        }
    }
    let mut accounts = 0u64;
    for (account, balance) in ledger.balances() {
        accounts += 1;
        let posted = sums.get(account).copied().unwrap_or(Amount::ZERO);
        if *balance != posted {
            report.problem(format!(
                "the balance of {account} in memory is {balance}, its postings in the store sum to {posted}"
            ));
        }
    }
    if accounts != sums.len() as u64 {
        report.problem("an account has postings in the store but no balance in memory");
    }
    report.checked("balances in memory", accounts);
}

/// Checks a stopped branch's store in `dir` (the `store` folder of its
/// data folder). Fails only when the store cannot be opened (another
/// backoffice holds it, say).
pub fn offline(dir: &std::path::Path) -> Result<Report, StoreError> {
    let store = SledStore::open(dir)?;
    Ok(store.verify().0)
}

/// Checks a running branch: its store, and its ledger in memory against
/// the store. The ledger is copied first (under its lock, briefly), then
/// the store read without holding it.
pub fn running<S: Store>(backoffice: &Backoffice<S>) -> Report {
    let ledger = backoffice.ledger();
    let (mut report, stored) = backoffice.store().verify();
    compare_ledger(&ledger, &stored, &mut report);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::funding::{RecordedByOperator, Reference};
    use crate::ledger::{NewTransfer, SystemAccount, TransferKind};
    use crate::send::DEFAULT_PARAMS;
    use crate::store::Store;

    #[test]
    fn a_running_branch_finds_a_store_that_differs_from_its_ledger_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let bid = proto::Bid::parse("B1").unwrap();
        let ada = store
            .create_customer(&bid, "Ada", "ada@example.org")
            .unwrap();
        let backoffice = Backoffice::open(store, DEFAULT_PARAMS).unwrap();
        let reference = Reference::parse("first").unwrap();
        backoffice
            .deposit_once(
                &RecordedByOperator,
                &ada,
                Amount::from_units(3).unwrap(),
                &reference,
            )
            .unwrap();
        let posted = backoffice
            .post(vec![NewTransfer {
                debit: AccountId::System(SystemAccount::Funding),
                credit: AccountId::Customer(ada.cid),
                amount: Amount::from_units(4).unwrap(),
                kind: TransferKind::Deposit,
            }])
            .unwrap();
        let report = running(&backoffice);
        assert!(report.is_ok(), "{:?}", report.problems);
        assert!(
            report.summary().contains("balances in memory=2"),
            "{}",
            report.summary()
        );
        // The second deposit has no reference to compare with: only the
        // ledger in memory shows its amount was changed on disk.
        let mut changed = posted[0].clone();
        changed.amount = Amount::from_units(40).unwrap();
        let record = crate::store::encode_transfer_for_tests(&changed);
        backoffice
            .store()
            .tamper("transfers", &1u64.to_be_bytes(), Some(&record));
        let (offline_view, _) = backoffice.store().verify();
        assert!(
            offline_view.is_ok(),
            "the store alone cannot tell: {:?}",
            offline_view.problems
        );
        let report = running(&backoffice);
        assert!(!report.is_ok());
        assert!(
            report.problems.iter().any(|problem| problem
                == "transfer 1 differs between the ledger in memory and the store"),
            "{:?}",
            report.problems
        );
        assert!(
            report.problems.iter().any(|problem| problem
                == "the balance of B1-C1 in memory is 7, its postings in the store sum to 43"),
            "{:?}",
            report.problems
        );
        assert_eq!(
            backoffice
                .store()
                .deposit(&reference)
                .unwrap()
                .map(|record| record.amount),
            Some(Amount::from_units(3).unwrap())
        );
    }
}
