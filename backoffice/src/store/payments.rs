//! Payment requests as both stores keep them (`payments::PaymentRequest`):
//! sled the JSON under the service's PID and the reference code,
//! PostgreSQL the same fields in `payment_requests` (migration 8). Both
//! verify them the same way here.

use std::collections::HashMap;

use super::StoreError;
use crate::ledger::{Transfer, TransferKind};
use crate::payments::PaymentRequest;

/// Who used a piece of evidence, and under which reference code.
type EvidenceLookup<'a> = &'a dyn Fn(&str) -> Result<Option<(proto::Pid, String)>, StoreError>;

/// Checks payment requests read back (or why they could not be read)
/// against the transfers: each request well formed, its transfers
/// payments of its service under its reference, and every payment
/// transfer posted by exactly one request.
pub(crate) fn check_payment_requests(
    requests: Result<Vec<PaymentRequest>, StoreError>,
    transfers: &[Transfer],
    evidence_used: EvidenceLookup<'_>,
    report: &mut crate::verify::Report,
) {
    let requests = match requests {
        Ok(requests) => requests,
        Err(error) => {
            report.problem(format!("the payment requests cannot be read: {error}"));
            return;
        }
    };
    report.checked("payment requests", requests.len() as u64);
    let mut posted_by: HashMap<u64, usize> = HashMap::new();
    let mut evidence_of: HashMap<&str, usize> = HashMap::new();
    for request in &requests {
        let named = format!(
            "payment request {:?} of {}",
            request.reference, request.service
        );
        if let Err(problem) = request.check() {
            report.problem(format!("{named}: {problem}"));
        }
        for reference in &request.evidence {
            *evidence_of.entry(reference.as_str()).or_default() += 1;
            match evidence_used(reference) {
                Ok(Some((service, code)))
                    if service == request.service && code == request.reference => {}
                Ok(_) => report.problem(format!(
                    "{named}: its evidence {reference:?} is not recorded as its own"
                )),
                Err(error) => report.problem(format!("{named}: {error}")),
            }
        }
        for id in &request.transfers {
            *posted_by.entry(*id).or_default() += 1;
            let Some(transfer) = usize::try_from(*id).ok().and_then(|at| transfers.get(at)) else {
                report.problem(format!("{named}: its transfer {id} does not exist"));
                continue;
            };
            match &transfer.kind {
                TransferKind::Payment { pid, reference }
                    if *pid == request.service && *reference == request.reference => {}
                _ => report.problem(format!(
                    "{named}: its transfer {id} is not a payment under this reference"
                )),
            }
        }
    }
    for (reference, count) in evidence_of {
        if count > 1 {
            report.problem(format!(
                "confirmation reference {reference:?} is evidence for {count} requests"
            ));
        }
    }
    for transfer in transfers {
        if matches!(transfer.kind, TransferKind::Payment { .. }) {
            match posted_by.get(&transfer.id.0) {
                Some(1) => {}
                Some(_) => report.problem(format!(
                    "transfer {}: named by more than one payment request",
                    transfer.id.0
                )),
                None => report.problem(format!(
                    "transfer {}: a payment no payment request names",
                    transfer.id.0
                )),
            }
        }
    }
}
