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

/// An evidence record: the reference, the service, the request's code.
pub(crate) type EvidenceRecord = (String, proto::Pid, String);

/// What payment requests are checked against besides the transfers.
pub(crate) struct PaymentChecks<'a> {
    /// Who used a piece of evidence.
    pub evidence_used: EvidenceLookup<'a>,
    /// Every evidence record the store keeps (reference, service, code),
    /// where the store can list them: each must be a request's own.
    pub evidence_kept: Option<Result<Vec<EvidenceRecord>, StoreError>>,
    /// The holds placed, and by which service (`holds::check_hold_events`).
    pub holds: &'a super::holds::HoldsPlaced,
    /// A product's owner.
    pub owner_of: &'a dyn Fn(&proto::Pid) -> Result<Option<proto::Cid>, StoreError>,
}

/// Checks payment requests read back (or why they could not be read)
/// against the transfers: each request well formed, its transfers
/// payments of its service under its reference, and every payment
/// transfer posted by exactly one request.
pub(crate) fn check_payment_requests(
    requests: Result<Vec<PaymentRequest>, StoreError>,
    transfers: &[Transfer],
    checks: PaymentChecks<'_>,
    report: &mut crate::verify::Report,
) {
    let PaymentChecks {
        evidence_used,
        evidence_kept,
        holds,
        owner_of,
    } = checks;
    let mut owners: HashMap<proto::Pid, Option<proto::Cid>> = HashMap::new();
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
        let owner = match owners.get(&request.service) {
            Some(owner) => *owner,
            None => {
                let owner = match owner_of(&request.service) {
                    Ok(owner) => owner,
                    Err(error) => {
                        report.problem(format!("{named}: its product cannot be read: {error}"));
                        None
                    }
                };
                owners.insert(request.service, owner);
                owner
            }
        };
        if owner.is_none() {
            report.problem(format!("{named}: no product {} asked it", request.service));
        }
        if let Some(hold) = request.hold {
            match holds.get(&hold) {
                Some(Some(by)) if *by == request.service => {}
                Some(_) => report.problem(format!(
                    "{named}: hold {hold} was not placed by its service"
                )),
                None => report.problem(format!("{named}: hold {hold} was never placed")),
            }
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
            // A service moves money between its product's owner and a
            // customer, never between two others.
            if let Some(owner) = owner {
                let owner = crate::ledger::AccountId::Customer(owner);
                if transfer.debit != owner && transfer.credit != owner {
                    report.problem(format!(
                        "{named}: its transfer {id} neither pays nor is paid by the product's owner"
                    ));
                }
            }
        }
    }
    match evidence_kept {
        None => {}
        Some(Err(error)) => {
            report.problem(format!("the evidence records cannot be read: {error}"));
        }
        Some(Ok(kept)) => {
            report.checked("evidence records", kept.len() as u64);
            let given: std::collections::HashSet<(&proto::Pid, &str, &str)> = requests
                .iter()
                .flat_map(|request| {
                    request.evidence.iter().map(|reference| {
                        (
                            &request.service,
                            request.reference.as_str(),
                            reference.as_str(),
                        )
                    })
                })
                .collect();
            for (reference, service, code) in &kept {
                if !given.contains(&(service, code.as_str(), reference.as_str())) {
                    report.problem(format!(
                        "evidence record {reference:?} names request {code:?} of {service}, \
                         which does not give it"
                    ));
                }
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

#[cfg(test)]
mod tests {
    use proto::{Amount, Cid, Pid};

    use super::*;
    use crate::ledger::{AccountId, TransferId};

    fn pid(n: u32) -> Pid {
        Pid::parse(&format!("B1-P{n}")).unwrap()
    }

    fn customer(n: u32) -> AccountId {
        AccountId::Customer(Cid::parse(&format!("B1-C{n}")).unwrap())
    }

    /// A payment of 1 from `debit` to `credit` under P1's `reference`.
    fn payment(id: u64, debit: AccountId, credit: AccountId, reference: &str) -> Transfer {
        Transfer {
            id: TransferId(id),
            debit,
            credit,
            amount: Amount::from_units(1).unwrap(),
            kind: TransferKind::Payment {
                pid: pid(1),
                reference: reference.into(),
            },
            posted_ms: 1,
        }
    }

    fn request(reference: &str, transfers: Vec<u64>, hold: Option<u64>) -> PaymentRequest {
        PaymentRequest {
            service: pid(1),
            reference: reference.into(),
            operation: "chargeAmount".into(),
            digest: "0".repeat(64),
            description: "Tone".into(),
            at_ms: 1,
            transfers,
            hold,
            evidence: Vec::new(),
            form: proto::parlayx::CANONICAL_FORM,
        }
    }

    /// The problems found in `requests` with these transfers, holds and
    /// evidence records; P1 is owned by C1.
    fn problems(
        requests: Vec<PaymentRequest>,
        transfers: &[Transfer],
        holds: &[(u64, Option<Pid>)],
        kept: Vec<(String, Pid, String)>,
    ) -> Vec<String> {
        let holds: super::super::holds::HoldsPlaced = holds.iter().cloned().collect();
        let used: HashMap<String, (Pid, String)> = kept
            .iter()
            .map(|(reference, service, code)| (reference.clone(), (*service, code.clone())))
            .collect();
        let mut report = crate::verify::Report::default();
        check_payment_requests(
            Ok(requests),
            transfers,
            PaymentChecks {
                evidence_used: &|reference| Ok(used.get(reference).cloned()),
                evidence_kept: Some(Ok(kept.clone())),
                holds: &holds,
                owner_of: &|service| Ok((*service == pid(1)).then(|| Cid::parse("B1-C1").unwrap())),
            },
            &mut report,
        );
        report.problems
    }

    #[test]
    fn a_request_moves_money_of_its_owner_from_holds_of_its_service_with_evidence_of_its_own() {
        let transfers = [
            payment(0, customer(2), customer(1), "r-1"),
            payment(1, customer(1), customer(3), "r-2"),
        ];
        let mut with_evidence = request("r-1", vec![0], Some(0));
        with_evidence.evidence = vec!["B1-M1:b:1".into()];
        let good = vec![with_evidence.clone(), request("r-2", vec![1], None)];
        let kept = vec![("B1-M1:b:1".to_owned(), pid(1), "r-1".to_owned())];
        let placed = [(0, Some(pid(1)))];
        assert_eq!(
            problems(good.clone(), &transfers, &placed, kept.clone()),
            Vec::<String>::new()
        );
        // Between two customers, neither the product's owner.
        let elsewhere = [
            payment(0, customer(2), customer(3), "r-1"),
            transfers[1].clone(),
        ];
        let found = problems(good.clone(), &elsewhere, &placed, kept.clone());
        assert!(
            found
                .iter()
                .any(|problem| problem.contains("neither pays nor is paid by")),
            "{found:?}"
        );
        // A hold another service placed, or the branch, or nobody.
        for placed in [vec![(0, Some(pid(2)))], vec![(0, None)], vec![]] {
            let found = problems(good.clone(), &transfers, &placed, kept.clone());
            assert!(
                found.iter().any(|problem| problem.contains("hold 0")),
                "{placed:?}: {found:?}"
            );
        }
        // An evidence record its request does not give.
        let mut stray = kept.clone();
        stray.push(("B1-M1:b:2".to_owned(), pid(1), "r-2".to_owned()));
        let found = problems(good.clone(), &transfers, &placed, stray);
        assert!(
            found
                .iter()
                .any(|problem| problem.contains("\"B1-M1:b:2\" names request \"r-2\"")),
            "{found:?}"
        );
        // A request of a product that does not exist.
        let mut unknown = request("r-9", vec![], Some(0));
        unknown.service = pid(9);
        let mut requests = good;
        requests.push(unknown);
        let found = problems(requests, &transfers, &[(0, Some(pid(9)))], kept);
        assert!(
            found
                .iter()
                .any(|problem| problem.contains("no product B1-P9")),
            "{found:?}"
        );
    }
}
