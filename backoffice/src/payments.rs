//! Payment requests: what a service (a product's owner, over Parlay X
//! Payment) asked under one of its reference codes, and what it got. A
//! reference code is unique per service: the same code with the same
//! request answers the first outcome again and moves nothing more; the
//! same code with another request is refused. The record is written in the
//! same store write as the transfers and hold events it caused, so a crash
//! leaves both or neither.
//!
//! Only requests that changed something are recorded: a refused request
//! (no money, no grant) changes nothing and may be sent again under its
//! code once the reason is gone.

use proto::Pid;
use serde::{Deserialize, Serialize};

use crate::holds::HoldId;
use crate::ledger::TransferId;

/// Longest reference code, in bytes (stores keep it beside the transfer).
pub const REFERENCE_BYTES_MAX: usize = 255;

/// Longest description kept with a request (what appears on the bill).
pub const DESCRIPTION_BYTES_MAX: usize = crate::holds::NOTE_BYTES_MAX;

/// Why a reference code or description is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Empty where something is needed.
    #[error("is empty")]
    Empty,
    /// Longer than its limit.
    #[error("is longer than {0} bytes")]
    TooLong(usize),
    /// Holds a control character.
    #[error("holds a control character")]
    Control,
}

/// Checks a service's reference code: 1 to `REFERENCE_BYTES_MAX` bytes,
/// no control characters.
pub fn check_reference(reference: &str) -> Result<(), TextError> {
    check_text(reference, REFERENCE_BYTES_MAX)?;
    if reference.is_empty() {
        return Err(TextError::Empty);
    }
    Ok(())
}

/// Checks a description for the bill: at most `DESCRIPTION_BYTES_MAX`
/// bytes, no control characters (may be empty).
pub fn check_description(description: &str) -> Result<(), TextError> {
    check_text(description, DESCRIPTION_BYTES_MAX)
}

fn check_text(text: &str, max: usize) -> Result<(), TextError> {
    if text.len() > max {
        return Err(TextError::TooLong(max));
    }
    if text.chars().any(char::is_control) {
        return Err(TextError::Control);
    }
    Ok(())
}

/// One request of a service under one reference code, and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequest {
    /// The product whose service asked.
    pub service: Pid,
    /// The service's reference code: unique per service.
    pub reference: String,
    /// The operation asked (`chargeAmount`, `chargeReservation`, ...).
    pub operation: String,
    /// SHA-256 of the request's canonical form (lower-case hex): the same
    /// code with another digest is another request.
    pub digest: String,
    /// What appears on the bill.
    pub description: String,
    /// When it was done, ms since the Unix epoch.
    pub at_ms: u64,
    /// The transfers it posted, in order.
    pub transfers: Vec<u64>,
    /// The hold it placed or captured from, if any.
    pub hold: Option<u64>,
    /// The confirmation references it gave as evidence (applied readings,
    /// `<batch>:<seq>`): each is evidence for one request only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<String>,
    /// The canonical form `digest` is of (`proto::parlayx::CANONICAL_FORM`
    /// when written); 0 for requests stored before forms were numbered.
    #[serde(default)]
    pub form: u8,
}

impl PaymentRequest {
    /// The transfers it posted.
    pub fn transfer_ids(&self) -> impl Iterator<Item = TransferId> + '_ {
        self.transfers.iter().copied().map(TransferId)
    }

    /// The hold it concerns, if any.
    pub fn hold_id(&self) -> Option<HoldId> {
        self.hold.map(HoldId)
    }

    /// Whether this stored request is `request` again: the same operation
    /// and the same canonical form. A request stored before forms were
    /// numbered may hold a digest of either form it could have been made
    /// with; one of a form this build does not know is never the same.
    /// `canonical` is the request's form now, `uncounted` its form 1
    /// (`proto::parlayx::Request::canonical_uncounted`).
    pub fn is_repeated_by(&self, operation: &str, canonical: &str, uncounted: &str) -> bool {
        self.operation == operation
            && match self.form {
                0 => self.digest == digest(canonical) || self.digest == digest(uncounted),
                proto::parlayx::CANONICAL_FORM => self.digest == digest(canonical),
                _ => false,
            }
    }

    /// Checks the fields every store relies on.
    pub fn check(&self) -> Result<(), String> {
        check_reference(&self.reference)
            .map_err(|error| format!("payment request reference {error}"))?;
        check_description(&self.description)
            .map_err(|error| format!("payment request description {error}"))?;
        let digest_ok = self.digest.len() == 64
            && self
                .digest
                .bytes()
                .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'));
        if !digest_ok {
            return Err("payment request digest is not 64 lower-case hex digits".to_owned());
        }
        if self.operation.is_empty() || self.operation.len() > 64 {
            return Err("payment request operation is empty or too long".to_owned());
        }
        if self.evidence.len() > proto::parlayx::CONFIRMATION_REFS_MAX
            || self
                .evidence
                .iter()
                .any(|reference| check_reference(reference).is_err())
        {
            return Err("payment request evidence out of bounds".to_owned());
        }
        if self.transfers.is_empty() && self.hold.is_none() {
            return Err(format!(
                "payment request {} of {} changed nothing",
                self.reference, self.service
            ));
        }
        Ok(())
    }
}

/// The SHA-256 of `canonical`, lower-case hex: a request's digest.
pub fn digest(canonical: &str) -> String {
    proto::record::hex(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_bounded_and_printable() {
        assert_eq!(check_reference(""), Err(TextError::Empty));
        assert_eq!(check_reference("order-17"), Ok(()));
        assert_eq!(check_reference(&"x".repeat(255)), Ok(()));
        assert_eq!(
            check_reference(&"x".repeat(256)),
            Err(TextError::TooLong(255))
        );
        assert_eq!(check_reference("a\nb"), Err(TextError::Control));
        assert_eq!(check_description(""), Ok(()));
        assert_eq!(check_description("ring tone \u{e9}t\u{e9}"), Ok(()));
        assert_eq!(check_description("\u{7}"), Err(TextError::Control));
    }

    #[test]
    fn a_retry_matches_the_form_its_request_was_stored_with() {
        let stored = |form: u8, canonical: &str| PaymentRequest {
            service: Pid::parse("B1-P1").unwrap(),
            reference: "r1".to_owned(),
            operation: "chargeAmount".to_owned(),
            digest: digest(canonical),
            description: String::new(),
            at_ms: 1,
            transfers: vec![3],
            hold: None,
            evidence: Vec::new(),
            form,
        };
        let (now, before) = ("form 2", "form 1");
        // Written by this build: only today's form.
        let current = stored(proto::parlayx::CANONICAL_FORM, now);
        assert!(current.is_repeated_by("chargeAmount", now, before));
        assert!(
            !stored(proto::parlayx::CANONICAL_FORM, before).is_repeated_by(
                "chargeAmount",
                now,
                before
            )
        );
        assert!(!current.is_repeated_by("refundAmount", now, before));
        assert!(!current.is_repeated_by("chargeAmount", "another", before));
        // Written before forms were numbered: either form it could have had.
        assert!(stored(0, before).is_repeated_by("chargeAmount", now, before));
        assert!(stored(0, now).is_repeated_by("chargeAmount", now, before));
        assert!(!stored(0, "another").is_repeated_by("chargeAmount", now, before));
        // A form from a later build is never taken for this one's.
        assert!(
            !stored(proto::parlayx::CANONICAL_FORM + 1, now).is_repeated_by(
                "chargeAmount",
                now,
                before
            )
        );
    }

    #[test]
    fn a_request_that_changed_nothing_or_has_a_bad_digest_is_refused() {
        let mut request = PaymentRequest {
            service: Pid::parse("B1-P1").unwrap(),
            reference: "r1".to_owned(),
            operation: "chargeAmount".to_owned(),
            digest: digest("chargeAmount|x"),
            description: String::new(),
            at_ms: 1,
            transfers: vec![3],
            hold: None,
            evidence: Vec::new(),
            form: proto::parlayx::CANONICAL_FORM,
        };
        assert_eq!(request.check(), Ok(()));
        assert_eq!(request.digest.len(), 64);
        assert_ne!(digest("a"), digest("b"));
        request.transfers.clear();
        assert!(request.check().unwrap_err().contains("changed nothing"));
        request.hold = Some(0);
        assert_eq!(request.check(), Ok(()));
        request.digest = "AB".repeat(32);
        assert!(request.check().unwrap_err().contains("hex"));
    }
}
