//! Where money enters the branch: customers' macro-accounts (a card, a bank
//! account). A card processor plugs in here, as an implementation of
//! [`MacroAccounts`]; until one does, [`RecordedByOperator`] stands in: the
//! operator records a deposit that arrived by other means.

use proto::Amount;

use crate::registry::Customer;

/// Why money could not be collected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FundingError {
    /// The macro-account's keeper said no (expired card, no funds, ...).
    #[error("the macro-account declined: {0}")]
    Declined(String),
    /// The processor could not be reached or failed; nothing was collected.
    #[error("the card processor is unavailable: {0}")]
    Unavailable(String),
}

/// Customers' macro-accounts, as a processor sees them.
pub trait MacroAccounts: Send + Sync {
    /// Collects `amount` from `customer`'s macro-account for their
    /// micro-account. `Ok` means the money is the branch's, and carries the
    /// processor's reference; an error means nothing was collected. The
    /// deposit is posted only after `Ok`.
    fn collect(&self, customer: &Customer, amount: Amount) -> Result<String, FundingError>;
}

/// No processor: an operator records a deposit that already arrived (by
/// bank transfer, say), so there is nothing to collect.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordedByOperator;

impl MacroAccounts for RecordedByOperator {
    fn collect(&self, _customer: &Customer, _amount: Amount) -> Result<String, FundingError> {
        Ok("recorded by the operator".to_owned())
    }
}
