//! Where money enters the branch: customers' macro-accounts (a card, a bank
//! account). A card processor plugs in here, as an implementation of
//! [`MacroAccounts`]; until one does, [`RecordedByOperator`] stands in: the
//! operator records a deposit that arrived by other means.
//!
//! Every deposit has a [`Reference`] its client chooses, and a
//! [`DepositRecord`] kept under it forever (it is part of the ledger's
//! history: one small record per deposit). The record goes through
//! [`DepositState::Collecting`] (written before the processor is asked),
//! [`DepositState::Collected`] (the processor's answer) and
//! [`DepositState::Posted`] (written in the transaction that stores the
//! deposit's transfer), so a deposit retried with its reference completes
//! what the first attempt began instead of doing it again.

use proto::{Amount, Cid};

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
    ///
    /// `idempotency_key` names the deposit (see [`Reference::idempotency_key`]):
    /// the backoffice asks again with the same key when it cannot know
    /// whether an earlier call collected (it crashed, or its disk failed,
    /// before it recorded the answer). An implementation must honour it as
    /// card processors' idempotency keys work: a second call with a key
    /// already used collects nothing and answers as the first did. It never
    /// uses two keys for one deposit.
    fn collect(
        &self,
        customer: &Customer,
        amount: Amount,
        idempotency_key: &str,
    ) -> Result<String, FundingError>;
}

/// No processor: an operator records a deposit that already arrived (by
/// bank transfer, say), so there is nothing to collect.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordedByOperator;

impl MacroAccounts for RecordedByOperator {
    fn collect(
        &self,
        _customer: &Customer,
        _amount: Amount,
        _idempotency_key: &str,
    ) -> Result<String, FundingError> {
        Ok("recorded by the operator".to_owned())
    }
}

/// Longest deposit reference, in bytes.
pub const REFERENCE_LEN_MAX: usize = 64;

/// A deposit's reference, chosen by its client: 1 to [`REFERENCE_LEN_MAX`]
/// ASCII letters, digits, `-`, `_`, `.` and `:`. A deposit sent again with
/// its reference is made once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference(String);

/// Why a reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a deposit reference is 1 to {REFERENCE_LEN_MAX} letters, digits, '-', '_', '.' or ':'")]
pub struct BadReference;

impl Reference {
    /// Checks `text` (see [`Reference`]).
    pub fn parse(text: &str) -> Result<Reference, BadReference> {
        let allowed = |byte: u8| byte.is_ascii_alphanumeric() || b"-_.:".contains(&byte);
        if text.is_empty() || text.len() > REFERENCE_LEN_MAX || !text.bytes().all(allowed) {
            return Err(BadReference);
        }
        Ok(Reference(text.to_owned()))
    }

    /// A new random reference (128 bits, 32 hex digits), for a client that
    /// chose none: shown so that the deposit can be retried with it.
    pub fn random() -> Reference {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system random generator works");
        Reference(proto::record::hex(&bytes))
    }

    /// The reference.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key the processor is asked with: the customer's branch and the
    /// reference (`B1:REF`), so that branches sharing a processor never
    /// share a key.
    pub fn idempotency_key(&self, cid: &Cid) -> String {
        format!("{}:{}", cid.branch(), self.0)
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How far a deposit has come.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DepositState {
    /// Recorded before the processor was asked: it may or may not have
    /// collected. A retry asks it again with the same key.
    Collecting,
    /// The processor collected; the deposit is not posted yet.
    Collected {
        /// The processor's reference for the collection.
        processor: String,
    },
    /// Posted as transfer `transfer`, in the transaction that wrote it.
    Posted {
        /// The processor's reference for the collection.
        processor: String,
        /// The deposit's transfer.
        transfer: u64,
    },
}

/// A deposit as stored under its reference.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DepositRecord {
    /// The customer credited.
    pub cid: Cid,
    /// How much.
    pub amount: Amount,
    /// When it was first asked for, ms since the Unix epoch.
    pub created_ms: u64,
    /// How far it has come.
    #[serde(flatten)]
    pub state: DepositState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_bounded_and_plain() {
        for good in ["a", "invoice-2024.07:3", &"x".repeat(REFERENCE_LEN_MAX)] {
            assert_eq!(Reference::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            " a",
            "a b",
            "é",
            "a/b",
            "<x>",
            &"x".repeat(REFERENCE_LEN_MAX + 1),
        ] {
            assert_eq!(Reference::parse(bad), Err(BadReference), "{bad:?}");
        }
        let random = Reference::random();
        assert_eq!(Reference::parse(random.as_str()), Ok(random.clone()));
        assert_ne!(random, Reference::random());
        let cid = Cid::parse("B1-C4").unwrap();
        assert_eq!(
            Reference::parse("r1").unwrap().idempotency_key(&cid),
            "B1:r1"
        );
    }

    #[test]
    fn deposit_records_round_trip() {
        let record = DepositRecord {
            cid: Cid::parse("B1-C4").unwrap(),
            amount: Amount::parse("10.5").unwrap(),
            created_ms: 7,
            state: DepositState::Posted {
                processor: "auth-1".into(),
                transfer: 3,
            },
        };
        let bytes = serde_json::to_vec(&record).unwrap();
        assert_eq!(
            serde_json::from_slice::<DepositRecord>(&bytes).unwrap(),
            record
        );
    }
}
