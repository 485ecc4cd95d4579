//! `backoffice`: receives meter uploads, prices uses with TACAs and keeps the
//! ledger. This crate grows the server, pricing, ledger, store and web forms;
//! for now it holds the branch's fixed settings.
#![forbid(unsafe_code)]

pub mod audit;
pub mod funding;
pub mod grant_calls;
pub mod grants;
pub mod hashing;
pub mod holds;
pub mod itemised;
pub mod ledger;
pub mod listen;
pub mod operator;
pub mod parlayx;
pub mod payments;
pub mod pricing;
pub mod registry;
pub mod send;
pub mod server;
pub mod store;
pub mod verify;
pub mod web;

use proto::{Amount, Bid};

/// Structured logs to stderr, filtered by `BACKOFFICE_LOG` (default
/// `info`; for example `warn` or `backoffice=debug`).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKOFFICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second call (tests, embedding) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The wall clock in ms since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(std::time::Duration::ZERO);
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The settings every branch has, with their embedded defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchSettings {
    /// This branch's code; every CID, PID and MID it issues starts with it.
    pub bid: Bid,
    /// ISO 4217 code of the one currency this branch keeps accounts in.
    pub currency: String,
    /// Balance an account may reach before it is denied (0: prepaid).
    pub credit_limit_default: Amount,
}

impl Default for BranchSettings {
    fn default() -> Self {
        Self {
            bid: Bid::parse("B1").expect("B1 is a valid branch code"),
            currency: "EUR".to_owned(),
            credit_limit_default: Amount::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_branch_is_prepaid_and_issues_its_own_ids() {
        let settings = BranchSettings::default();
        assert!(settings.credit_limit_default.is_zero());
        let cid = proto::Cid::new(&settings.bid, "1").expect("valid CID");
        assert_eq!(cid.branch(), settings.bid);
        assert_eq!(cid.as_str(), "B1-C1");
    }
}
