//! The standings a `send` is answered with: whether each party the batch
//! names is in good standing for the meter that sent it.

use proto::reading::Event;
use proto::upload::{SendBody, Standing};
use proto::{Fault, Payer};

use super::Backoffice;
use super::price::Lookups;
use crate::ledger::{AccountId, in_good_standing};
use crate::store::Store;

/// Every party whose standing the answer reports.
fn parties(body: &SendBody) -> Vec<Payer> {
    // Gathered in a set (a batch names the same few parties thousands of
    // times), then sorted.
    let mut seen: crate::hashing::Set<Payer> = crate::hashing::Set::default();
    match body {
        SendBody::Batch(batch) => {
            for reading in &batch.readings {
                match reading.event {
                    Event::Login(cid) | Event::Logout(cid) => {
                        seen.insert(Payer::Customer(cid));
                    }
                    Event::Query { pid, payer } | Event::Commit { pid, payer } => {
                        seen.insert(Payer::OwnerOf(pid));
                        seen.extend(payer);
                    }
                }
            }
            seen.extend(batch.parties.iter().copied());
        }
        SendBody::Minimal(events) => {
            seen.extend(events.iter().map(|event| match *event {
                Event::Login(cid) | Event::Logout(cid) => Payer::Customer(cid),
                Event::Query { pid, .. } | Event::Commit { pid, .. } => Payer::OwnerOf(pid),
            }));
        }
    }
    let mut parties: Vec<Payer> = seen.into_iter().collect();
    parties.sort_unstable();
    parties
}

impl<S: Store> Backoffice<S> {
    /// The standing of every party the answer reports. A customer is in
    /// good standing for this meter only through a grant live now: a meter
    /// learns nothing of customers who did not grant it (they are all
    /// "deny"), and a revoked grant turns the meter's answers to "deny".
    pub(super) fn standings(
        &self,
        body: &SendBody,
        lookups: &mut Lookups,
        now_ms: u64,
        balance: impl Fn(&AccountId) -> proto::Amount,
    ) -> Result<Vec<Standing>, Fault> {
        let mut standings = Vec::new();
        for party in parties(body) {
            let cid = match party {
                Payer::Customer(cid) if !lookups.granted(cid, now_ms, now_ms, 0) => None,
                Payer::Customer(cid) => Some(cid),
                Payer::OwnerOf(pid) => self
                    .product(&mut lookups.products, pid)?
                    .map(|product| product.owner),
            };
            let terms = match cid {
                Some(cid) => self.customer_terms(lookups, cid)?.map(|terms| (cid, terms)),
                None => None,
            };
            let allowed = terms.is_some_and(|(cid, (credit_limit, denied))| {
                in_good_standing(balance(&AccountId::Customer(cid)), credit_limit, denied)
            });
            standings.push(Standing { party, allowed });
        }
        Ok(standings)
    }
}
