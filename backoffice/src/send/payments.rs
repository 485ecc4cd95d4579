//! Payments asked by services (`payments`, Parlay X Payment): charges,
//! refunds and reservations, each under the ledger lock and durable before
//! it is applied, as money is. A request under a reference code the service
//! used before is answered from the store: the same request gets the first
//! outcome again and moves nothing; another request is refused.
//!
//! Who may charge whom (grants, maximum prices, currencies) is decided by
//! the caller before it gets here; this layer keeps the money right.

use proto::{Amount, Cid, Fault, Pid};

use super::{Backoffice, internal, lock};
use crate::holds::{HoldError, HoldId};
use crate::ledger::{AccountId, NewTransfer, TransferKind};
use crate::payments::PaymentRequest;
use crate::store::Store;

/// What a service asks, as kept with its outcome.
#[derive(Debug, Clone)]
pub struct PaymentAsk {
    /// The product whose service asks.
    pub service: Pid,
    /// The product's owner, who is paid (or pays a refund).
    pub owner: Cid,
    /// The service's reference code (unique per service), where the
    /// operation has one.
    pub reference: Option<String>,
    /// The operation (`chargeAmount`, ...).
    pub operation: &'static str,
    /// The request in a canonical form: the same code with another form
    /// is another request.
    pub canonical: String,
    /// The request in canonical form 1, which requests stored before forms
    /// were numbered may have been digested from.
    pub canonical_uncounted: String,
    /// What appears on the bill.
    pub description: String,
    /// Confirmation references given as evidence (checked by the caller),
    /// each used for one request only.
    pub evidence: Vec<String>,
}

/// Why a payment was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentRefusal {
    /// The reference code was used by this service for another request
    /// (the operation it was used for).
    ReferenceReused(String),
    /// An account cannot spend this much now.
    Insufficient(AccountId),
    /// The hold (reservation) refused the change.
    Hold(HoldError),
    /// The reservation is not one this service placed.
    NotTheirs(HoldId),
    /// A confirmation reference was evidence for another request already.
    EvidenceUsed(String),
    /// The reservation would hold more than one use of the product may
    /// cost (the total it would hold, the maximum).
    AboveMaximum(Amount, Amount),
    /// A refund above what this service charged the customer, less what
    /// it refunded them already (that net, never below 0).
    AboveCharged(Amount),
}

/// A payment done, now or by an earlier request with the same code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paid {
    /// The transfers it posted.
    pub transfers: Vec<u64>,
    /// The reservation it placed or charged, if any.
    pub hold: Option<HoldId>,
    /// Answered from an earlier request with the same reference code.
    pub repeated: bool,
}

/// A payment's outcome: done, or refused with nothing changed.
pub type PaymentResult = Result<Paid, PaymentRefusal>;

/// Money to move for a payment: from `debit` to `credit`.
pub type Move = (AccountId, AccountId, Amount);

/// What a service's volume is rated with: the Parlay X rating parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rating {
    /// `unit`.
    pub unit: String,
    /// `contract`.
    pub contract: String,
    /// `service`.
    pub service: String,
    /// `operation`.
    pub operation: String,
}

impl Rating {
    /// The parameters as kept with a reservation: one per line.
    pub fn text(&self) -> String {
        [&self.unit, &self.contract, &self.service, &self.operation]
            .map(String::as_str)
            .join("\n")
    }

    /// The parameters a reservation kept (`text`).
    pub fn of_text(text: &str) -> Option<Rating> {
        let mut lines = text.split('\n');
        let mut next = || lines.next().map(str::to_owned);
        let rating = Rating {
            unit: next()?,
            contract: next()?,
            service: next()?,
            operation: next()?,
        };
        next().is_none().then_some(rating)
    }
}

impl<S: Store> Backoffice<S> {
    /// What `volume` of `product` costs `payer` now, as the product's TACA
    /// prices it with `rating` (a use committed, the payer's metered uses
    /// of the month as its period count); a refusal of the TACA is a
    /// reason, not a fault.
    pub fn rate(
        &self,
        product: &crate::registry::Product,
        payer: &Cid,
        volume: u64,
        rating: &Rating,
        now_ms: u64,
    ) -> Result<Result<Amount, String>, Fault> {
        let busy = || internal(&"every pricing slot stayed busy; try again");
        let module = self
            .store
            .taca_module(&product.taca)
            .map_err(|error| internal(&error))?
            .ok_or_else(|| internal(&format!("the TACA of {} is missing", product.pid)))?;
        let taca = match self.pricing.load(&module) {
            Ok(taca) => taca,
            Err(crate::pricing::ModuleError::SampleFailed(crate::pricing::PricingError::Busy)) => {
                return Err(busy());
            }
            Err(error) => return Ok(Err(error.to_string())),
        };
        let period_uses = self
            .store
            .period_uses(&crate::store::PeriodKey {
                payer: *payer,
                pid: product.pid,
                month: super::month_of(now_ms),
            })
            .map_err(|error| internal(&error))?;
        let input = crate::pricing::PriceInput {
            payer: *payer,
            code: proto::reading::Code::Commit,
            pid: product.pid,
            volume,
            period_uses,
            unit: rating.unit.clone(),
            contract: rating.contract.clone(),
            service: rating.service.clone(),
            operation: rating.operation.clone(),
        };
        match self.pricing.price(&taca, &input) {
            Ok(priced) if priced.amount.is_negative() => {
                Ok(Err(format!("the TACA priced it at {}", priced.amount)))
            }
            Ok(priced) => Ok(Ok(priced.amount)),
            Err(crate::pricing::PricingError::Busy) => Err(busy()),
            Err(error) => Ok(Err(error.to_string())),
        }
    }

    /// The earlier request of the same service under the same code, if
    /// any: its outcome when it was the same request, a refusal when not.
    /// Called under the ledger lock, so that two nodes cannot both find
    /// the code free.
    fn earlier(&self, ask: &PaymentAsk) -> Result<Option<PaymentResult>, Fault> {
        let Some(reference) = &ask.reference else {
            return Ok(None);
        };
        let Some(earlier) = self
            .store
            .payment_request(&ask.service, reference)
            .map_err(|error| internal(&error))?
        else {
            return Ok(None);
        };
        if !earlier.is_repeated_by(ask.operation, &ask.canonical, &ask.canonical_uncounted) {
            return Ok(Some(Err(PaymentRefusal::ReferenceReused(
                earlier.operation,
            ))));
        }
        let hold = earlier.hold_id();
        Ok(Some(Ok(Paid {
            transfers: earlier.transfers,
            hold,
            repeated: true,
        })))
    }

    /// The first of the request's confirmation references that was
    /// evidence for another request, if one was (read under the ledger
    /// lock, like the reference code).
    fn evidence_used(&self, ask: &PaymentAsk) -> Result<Option<PaymentRefusal>, Fault> {
        for reference in &ask.evidence {
            if self
                .store
                .evidence_used(reference)
                .map_err(|error| internal(&error))?
                .is_some()
            {
                return Ok(Some(PaymentRefusal::EvidenceUsed(reference.clone())));
            }
        }
        Ok(None)
    }

    fn request(
        ask: &PaymentAsk,
        digest: String,
        transfers: Vec<u64>,
        hold: Option<HoldId>,
        now_ms: u64,
    ) -> Option<PaymentRequest> {
        let reference = ask.reference.clone()?;
        Some(PaymentRequest {
            service: ask.service,
            reference,
            operation: ask.operation.to_owned(),
            digest,
            description: ask.description.clone(),
            at_ms: now_ms,
            transfers,
            hold: hold.map(|id| id.0),
            evidence: ask.evidence.clone(),
            form: proto::parlayx::CANONICAL_FORM,
        })
    }

    /// Moves money for `ask` (a charge, a refund, a split charge): every
    /// debited account must be able to spend what it pays, all or nothing.
    pub fn pay(
        &self,
        ask: &PaymentAsk,
        moves: &[Move],
        now_ms: u64,
    ) -> Result<PaymentResult, Fault> {
        let digest = crate::payments::digest(&ask.canonical);
        self.still_durable()?;
        let mut ledger = self.ledger_for_write()?;
        let mut holds = lock(&self.holds);
        if let Some(earlier) = self.earlier(ask)? {
            return Ok(earlier);
        }
        if let Some(used) = self.evidence_used(ask)? {
            return Ok(Err(used));
        }
        if let Some(refused) = beyond_charged(&ledger, ask, moves)? {
            return Ok(Err(refused));
        }
        let now_ms = now_ms.max(holds.latest_ms());
        let mut paying: Vec<(AccountId, Amount)> = Vec::new();
        for (debit, _, amount) in moves {
            match paying.iter_mut().find(|(account, _)| account == debit) {
                Some((_, sum)) => *sum = sum.checked_add(*amount).map_err(|e| internal(&e))?,
                None => paying.push((*debit, *amount)),
            }
        }
        for (account, sum) in &paying {
            let spendable = self.spendable(account, ledger.balance(account), &holds, now_ms)?;
            if *sum > spendable {
                return Ok(Err(PaymentRefusal::Insufficient(*account)));
            }
        }
        let reference = ask.reference.clone().unwrap_or_default();
        let transfers: Vec<NewTransfer> = moves
            .iter()
            .filter(|(_, _, amount)| amount.is_positive())
            .map(|(debit, credit, amount)| NewTransfer {
                debit: *debit,
                credit: *credit,
                amount: *amount,
                kind: TransferKind::Payment {
                    pid: ask.service,
                    reference: reference.clone(),
                },
            })
            .collect();
        if transfers.is_empty() {
            return Err(Fault::new(
                proto::FaultCode::InternalError,
                "a payment must move a positive amount",
            ));
        }
        let prepared = ledger
            .prepare(transfers, now_ms)
            .map_err(|error| internal(&error))?;
        let ids: Vec<u64> = prepared.iter().map(|transfer| transfer.id.0).collect();
        let request = Self::request(ask, digest, ids.clone(), None, now_ms);
        self.record_holds(
            &mut ledger,
            &mut holds,
            Vec::new(),
            prepared,
            request.as_ref(),
        )?;
        drop(holds);
        drop(ledger);
        self.durable()?;
        Ok(Ok(Paid {
            transfers: ids,
            hold: None,
            repeated: false,
        }))
    }

    /// Reserves `amount` of `payer`'s money for the service until
    /// `expires_ms` (a hold only the service may charge or release).
    pub fn reserve(
        &self,
        ask: &PaymentAsk,
        payer: &Cid,
        amount: Amount,
        expires_ms: u64,
        rating: Option<String>,
        now_ms: u64,
    ) -> Result<PaymentResult, Fault> {
        let digest = crate::payments::digest(&ask.canonical);
        self.still_durable()?;
        let mut ledger = self.ledger_for_write()?;
        let mut holds = lock(&self.holds);
        if let Some(earlier) = self.earlier(ask)? {
            return Ok(earlier);
        }
        let now_ms = now_ms.max(holds.latest_ms());
        let account = AccountId::Customer(*payer);
        let spendable = self.spendable(&account, ledger.balance(&account), &holds, now_ms)?;
        let event = match holds.prepare_place_by(
            account,
            amount,
            expires_ms,
            &ask.description,
            spendable,
            now_ms,
            Some(ask.service),
            rating,
        ) {
            Ok(event) => event,
            Err(HoldError::Insufficient { account, .. }) => {
                return Ok(Err(PaymentRefusal::Insufficient(account)));
            }
            Err(refused) => return Ok(Err(PaymentRefusal::Hold(refused))),
        };
        let id = event.hold;
        let request = Self::request(ask, digest, Vec::new(), Some(id), now_ms);
        self.record_holds(
            &mut ledger,
            &mut holds,
            vec![event],
            Vec::new(),
            request.as_ref(),
        )?;
        drop(holds);
        drop(ledger);
        self.durable()?;
        Ok(Ok(Paid {
            transfers: Vec::new(),
            hold: Some(id),
            repeated: false,
        }))
    }

    /// Changes reservation `id` of the service: more or less reserved, a
    /// part charged to the product's owner, or released. A release of a
    /// reservation that ended already answers done: the money is back.
    pub fn change_reservation(
        &self,
        ask: &PaymentAsk,
        id: HoldId,
        change: ReservationChange,
        now_ms: u64,
    ) -> Result<PaymentResult, Fault> {
        let digest = crate::payments::digest(&ask.canonical);
        self.still_durable()?;
        let mut ledger = self.ledger_for_write()?;
        let mut holds = lock(&self.holds);
        if let Some(earlier) = self.earlier(ask)? {
            return Ok(earlier);
        }
        let now_ms = now_ms.max(holds.latest_ms());
        let Some(hold) = holds.hold(id).cloned() else {
            return Ok(Err(PaymentRefusal::Hold(HoldError::Unknown(id))));
        };
        if hold.by.as_ref() != Some(&ask.service) {
            return Ok(Err(PaymentRefusal::NotTheirs(id)));
        }
        let mut transfers = Vec::new();
        let event = match change {
            ReservationChange::Adjust {
                delta,
                expires_ms,
                max_total,
            } => {
                // Checked here, under the lock: two additions that each fit
                // alone must not together pass the maximum.
                if let Some(max) = max_total {
                    let total = hold
                        .held
                        .checked_add(delta)
                        .map_err(|error| internal(&error))?;
                    if total > max {
                        return Ok(Err(PaymentRefusal::AboveMaximum(total, max)));
                    }
                }
                let spendable =
                    self.spendable(&hold.account, ledger.balance(&hold.account), &holds, now_ms)?;
                holds.prepare_adjust(id, delta, expires_ms, spendable, now_ms)
            }
            ReservationChange::Capture { amount } => {
                let credit = AccountId::Customer(ask.owner);
                if credit == hold.account {
                    return Ok(Err(PaymentRefusal::Hold(HoldError::SameAccount(id))));
                }
                if let Err(refused) =
                    holds.prepare_capture(id, amount, crate::ledger::TransferId(0), now_ms)
                {
                    return Ok(Err(PaymentRefusal::Hold(refused)));
                }
                transfers = ledger
                    .prepare(
                        vec![NewTransfer {
                            debit: hold.account,
                            credit,
                            amount,
                            kind: TransferKind::Payment {
                                pid: ask.service,
                                reference: ask.reference.clone().unwrap_or_default(),
                            },
                        }],
                        now_ms,
                    )
                    .map_err(|error| internal(&error))?;
                holds.prepare_capture(id, amount, transfers[0].id, now_ms)
            }
            ReservationChange::Release => match holds.prepare_release(id, now_ms) {
                // Released or expired already: the money is back, as asked.
                Err(HoldError::Ended(_)) => {
                    return Ok(Ok(Paid {
                        transfers: Vec::new(),
                        hold: Some(id),
                        repeated: true,
                    }));
                }
                other => other,
            },
        };
        let event = match event {
            Ok(event) => event,
            Err(HoldError::Insufficient { account, .. }) => {
                return Ok(Err(PaymentRefusal::Insufficient(account)));
            }
            Err(refused) => return Ok(Err(PaymentRefusal::Hold(refused))),
        };
        let ids: Vec<u64> = transfers.iter().map(|transfer| transfer.id.0).collect();
        let request = Self::request(ask, digest, ids.clone(), Some(id), now_ms);
        self.record_holds(
            &mut ledger,
            &mut holds,
            vec![event],
            transfers,
            request.as_ref(),
        )?;
        drop(holds);
        drop(ledger);
        self.durable()?;
        Ok(Ok(Paid {
            transfers: ids,
            hold: Some(id),
            repeated: false,
        }))
    }
}

/// What a service does to one of its reservations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationChange {
    /// More or less reserved, until a new expiry.
    Adjust {
        /// The change of the amount reserved.
        delta: Amount,
        /// The new expiry, ms since the Unix epoch.
        expires_ms: u64,
        /// The most the reservation may hold after it, if bounded.
        max_total: Option<Amount>,
    },
    /// Part of it charged to the service's product owner.
    Capture {
        /// How much.
        amount: Amount,
    },
    /// Ended: what was not charged is available again.
    Release,
}

/// Refused when a move from the product's owner (a refund) gives a
/// customer more than this service charged them, less what it refunded
/// them already: a service's credential, stolen or buggy, then cannot move
/// the owner's money to anyone beyond undoing its own charges. Only the
/// service's payments count (`TransferKind::Payment` of its PID), read
/// from the customer's transfers under the ledger lock.
fn beyond_charged(
    ledger: &crate::ledger::Ledger,
    ask: &PaymentAsk,
    moves: &[Move],
) -> Result<Option<PaymentRefusal>, Fault> {
    let owner = AccountId::Customer(ask.owner);
    // What the owner gives each customer in this request, added up.
    let mut given: Vec<(AccountId, Amount)> = Vec::new();
    for (debit, customer, amount) in moves {
        if *debit != owner {
            continue;
        }
        match given.iter_mut().find(|(account, _)| account == customer) {
            Some((_, sum)) => *sum = sum.checked_add(*amount).map_err(|e| internal(&e))?,
            None => given.push((*customer, *amount)),
        }
    }
    for (customer, amount) in &given {
        let mut net = Amount::ZERO;
        for transfer in ledger.transfers_of(*customer) {
            if !matches!(&transfer.kind, TransferKind::Payment { pid, .. } if *pid == ask.service) {
                continue;
            }
            net = if transfer.debit == *customer && transfer.credit == owner {
                net.checked_add(transfer.amount)
            } else if transfer.debit == owner && transfer.credit == *customer {
                net.checked_sub(transfer.amount)
            } else {
                Ok(net)
            }
            .map_err(|error| internal(&error))?;
        }
        if *amount > net {
            return Ok(Some(PaymentRefusal::AboveCharged(net.max(Amount::ZERO))));
        }
    }
    Ok(None)
}
