//! The store checks its own records and indexes, for `crate::verify`:
//! every record decodes, every key names its record, every index entry
//! points at a record that points back, every reference between records
//! names one that exists. It reads everything once and never panics.

use std::collections::{HashMap, HashSet};

use proto::record::Reader;
use proto::{BatchId, Cid, Mid, Pid};

use super::{SledStore, decode_transfers, serial_of, suspense_key};
use crate::funding::{DepositRecord, DepositState, Reference};
use crate::ledger::{AccountId, SystemAccount, Transfer, TransferKind};
use crate::pricing::TacaHash;
use crate::registry::{Customer, Grant, Meter, Product};
use crate::verify::{Report, check_transfers};

/// Reads every entry of a tree; a read error is a problem and ends the scan.
fn entries(tree: &sled::Tree, name: &str, report: &mut Report) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut all = Vec::new();
    for entry in tree.iter() {
        match entry {
            Ok((key, value)) => all.push((key.to_vec(), value.to_vec())),
            Err(error) => {
                report.problem(format!("{name}: cannot be read: {error}"));
                break;
            }
        }
    }
    all
}

fn shown(key: &[u8]) -> String {
    String::from_utf8_lossy(key).chars().take(80).collect()
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

impl SledStore {
    /// Checks every record and index; answers the report and the transfers
    /// that decoded, in order (for a comparison with the ledger in memory).
    pub fn verify_records(&self) -> (Report, Vec<Transfer>) {
        let mut report = Report::default();
        // The period counts logged behind `period_uses` first (`periods`).
        if let Err(error) = self.fold_periods(false) {
            report.problem(format!("period_log: cannot be folded: {error}"));
        }
        let serials = self.verify_serials(&mut report);
        let customers = self.verify_customers(&serials, &mut report);
        let products = self.verify_products(&customers, &serials, &mut report);
        self.verify_meters_and_grants(&customers, &serials, &mut report);
        let batches = self.verify_batches(&mut report);
        let transfers = self.verify_transfers(&customers, &products, &batches, &mut report);
        self.verify_periods(&customers, &products, &mut report);
        self.verify_suspense(&mut report);
        self.verify_deposits(&customers, &transfers, &mut report);
        let holds = crate::store::holds::check_hold_events(
            crate::store::Store::hold_events_from(self, 0),
            &transfers,
            &mut report,
        );
        crate::store::payments::check_payment_requests(
            crate::store::Store::payment_requests(self),
            &transfers,
            crate::store::payments::PaymentChecks {
                evidence_used: &|reference| crate::store::Store::evidence_used(self, reference),
                evidence_kept: Some(self.evidence_records()),
                holds: &holds,
                owner_of: &|pid| {
                    crate::store::Store::product(self, pid)
                        .map(|product| product.map(|product| product.owner))
                },
            },
            &mut report,
        );
        (report, transfers)
    }

    fn verify_serials(&self, report: &mut Report) -> HashMap<u8, u64> {
        let mut next = HashMap::new();
        for (key, value) in entries(&self.serials, "serials", report) {
            match (key.as_slice(), be_u64(&value)) {
                ([kind], Some(serial)) => {
                    next.insert(*kind, serial);
                }
                _ => report.problem(format!("serials: a bad entry {:?}", shown(&key))),
            }
        }
        report.checked("serials", next.len() as u64);
        next
    }

    /// An issued ID's serial must be below the next one of its kind.
    fn check_serial(serials: &HashMap<u8, u64>, kind: u8, id: &str, report: &mut Report) {
        let next = serials.get(&kind).copied().unwrap_or(1);
        if serial_of(id) >= next {
            report.problem(format!(
                "{id} is not below the next serial {next} of its kind: it could be issued again"
            ));
        }
    }

    fn verify_customers(
        &self,
        serials: &HashMap<u8, u64>,
        report: &mut Report,
    ) -> HashMap<Cid, Customer> {
        let mut customers = HashMap::new();
        for (key, value) in entries(&self.customers, "customers", report) {
            let Ok(customer) = serde_json::from_slice::<Customer>(&value) else {
                report.problem(format!(
                    "customer {}: the record does not decode",
                    shown(&key)
                ));
                continue;
            };
            if key != customer.cid.as_str().as_bytes() {
                report.problem(format!(
                    "customer record under {} is {}",
                    shown(&key),
                    customer.cid
                ));
                continue;
            }
            Self::check_serial(serials, b'C', customer.cid.as_str(), report);
            customers.insert(customer.cid, customer);
        }
        report.checked("customers", customers.len() as u64);
        // The e-mail index, both ways.
        let emails = entries(&self.emails, "emails", report);
        let mut indexed: HashSet<Cid> = HashSet::new();
        for (key, value) in &emails {
            let named = std::str::from_utf8(value)
                .ok()
                .and_then(|cid| Cid::parse(cid).ok());
            match named.and_then(|cid| customers.get(&cid)) {
                Some(customer) if customer.email.to_lowercase().as_bytes() == key.as_slice() => {
                    indexed.insert(customer.cid);
                }
                Some(customer) => report.problem(format!(
                    "the e-mail index entry {} names {}, whose address is another",
                    shown(key),
                    customer.cid
                )),
                None => report.problem(format!(
                    "the e-mail index entry {} names no customer",
                    shown(key)
                )),
            }
        }
        for cid in customers.keys() {
            if !indexed.contains(cid) {
                report.problem(format!("customer {cid} is missing from the e-mail index"));
            }
        }
        report.checked("e-mail index entries", emails.len() as u64);
        // The telephone index, both ways.
        let phones = entries(&self.phones, "phones", report);
        let mut numbered: HashSet<Cid> = HashSet::new();
        for (key, value) in &phones {
            let named = std::str::from_utf8(value)
                .ok()
                .and_then(|cid| Cid::parse(cid).ok());
            match named.and_then(|cid| customers.get(&cid)) {
                Some(customer) if customer.phone.as_deref().map(str::as_bytes) == Some(key) => {
                    numbered.insert(customer.cid);
                }
                Some(customer) => report.problem(format!(
                    "the telephone index entry {} names {}, whose number is another",
                    shown(key),
                    customer.cid
                )),
                None => report.problem(format!(
                    "the telephone index entry {} names no customer",
                    shown(key)
                )),
            }
        }
        for customer in customers.values() {
            if let Some(phone) = &customer.phone {
                if crate::registry::check_phone(phone).is_err() {
                    report.problem(format!(
                        "customer {} has a telephone number in no valid form",
                        customer.cid
                    ));
                }
                if !numbered.contains(&customer.cid) {
                    report.problem(format!(
                        "customer {} is missing from the telephone index",
                        customer.cid
                    ));
                }
            }
        }
        report.checked("telephone index entries", phones.len() as u64);
        customers
    }

    fn verify_products(
        &self,
        customers: &HashMap<Cid, Customer>,
        serials: &HashMap<u8, u64>,
        report: &mut Report,
    ) -> HashSet<Pid> {
        let mut records: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut products: Vec<Product> = Vec::new();
        for (key, value) in entries(&self.products, "products", report) {
            let Ok(product) = serde_json::from_slice::<Product>(&value) else {
                report.problem(format!(
                    "product {}: the record does not decode",
                    shown(&key)
                ));
                continue;
            };
            if key == product.pid.as_str().as_bytes() {
                products.push(product);
            } else if key != product.test_pid.as_str().as_bytes() {
                report.problem(format!(
                    "product record under {} is {}",
                    shown(&key),
                    product.pid
                ));
            }
            records.insert(key, value);
        }
        let known: HashSet<Pid> = products.iter().map(|product| product.pid).collect();
        let mut tacas = 0u64;
        for (key, module) in entries(&self.tacas, "tacas", report) {
            tacas += 1;
            if TacaHash::of(&module).to_string().as_bytes() != key.as_slice() {
                report.problem(format!(
                    "TACA module {}: its bytes do not have this hash",
                    shown(&key)
                ));
            }
        }
        for product in &products {
            let pid = product.pid;
            Self::check_serial(serials, b'P', pid.as_str(), report);
            if records.get(product.test_pid.as_str().as_bytes())
                != records.get(pid.as_str().as_bytes())
            {
                report.problem(format!(
                    "product {pid}: its test PID {} names another record",
                    product.test_pid
                ));
            }
            if !customers.contains_key(&product.owner) {
                report.problem(format!(
                    "product {pid}: its owner {} is not a customer",
                    product.owner
                ));
            }
            if !matches!(self.tacas.contains_key(product.taca.to_string()), Ok(true)) {
                report.problem(format!("product {pid}: its TACA module is missing"));
            }
            for component in &product.components {
                if !known.contains(component) {
                    report.problem(format!(
                        "product {pid}: its component {component} is not a product"
                    ));
                }
            }
        }
        report.checked("products", products.len() as u64);
        report.checked("TACA modules", tacas);
        known
    }

    fn verify_meters_and_grants(
        &self,
        customers: &HashMap<Cid, Customer>,
        serials: &HashMap<u8, u64>,
        report: &mut Report,
    ) {
        let mut meters: HashSet<Mid> = HashSet::new();
        for (key, value) in entries(&self.meters, "meters", report) {
            let Ok(meter) = serde_json::from_slice::<Meter>(&value) else {
                report.problem(format!("meter {}: the record does not decode", shown(&key)));
                continue;
            };
            if key != meter.mid.as_str().as_bytes() {
                report.problem(format!(
                    "meter record under {} is {}",
                    shown(&key),
                    meter.mid
                ));
                continue;
            }
            Self::check_serial(serials, b'M', meter.mid.as_str(), report);
            if !customers.contains_key(&meter.owner) {
                report.problem(format!(
                    "meter {}: its owner {} is not a customer",
                    meter.mid, meter.owner
                ));
            }
            meters.insert(meter.mid);
        }
        report.checked("meters", meters.len() as u64);
        let mut grants: HashMap<u64, Grant> = HashMap::new();
        let next_grant = serials.get(&b'G').copied().unwrap_or(1);
        for (key, value) in entries(&self.grants, "grants", report) {
            let Ok(grant) = serde_json::from_slice::<Grant>(&value) else {
                report.problem(format!("a grant record does not decode (key {key:?})"));
                continue;
            };
            if be_u64(&key) != Some(grant.id) {
                report.problem(format!("grant {} is stored under another number", grant.id));
                continue;
            }
            if grant.id >= next_grant {
                report.problem(format!(
                    "grant {} is not below the next number {next_grant}",
                    grant.id
                ));
            }
            if !meters.contains(&grant.mid) {
                report.problem(format!(
                    "grant {}: meter {} is not registered",
                    grant.id, grant.mid
                ));
            }
            if !customers.contains_key(&grant.cid) {
                report.problem(format!(
                    "grant {}: {} is not a customer",
                    grant.id, grant.cid
                ));
            }
            grants.insert(grant.id, grant);
        }
        report.checked("grants", grants.len() as u64);
        // The grant index: `m MID number` and `c CID number` for each grant.
        let mut index: HashSet<Vec<u8>> = HashSet::new();
        for (key, _) in entries(&self.grant_index, "grant_index", report) {
            let number = key.len().checked_sub(8).and_then(|at| be_u64(&key[at..]));
            let expected = number.and_then(|number| grants.get(&number)).map(|grant| {
                [
                    Self::grant_index_key(b'm', grant.mid.as_str(), grant.id),
                    Self::grant_index_key(b'c', grant.cid.as_str(), grant.id),
                ]
            });
            match expected {
                Some(keys) if keys.contains(&key) => {}
                Some(_) => report.problem(format!(
                    "a grant index entry names grant {} under another meter or customer",
                    number.unwrap_or_default()
                )),
                None => report.problem("a grant index entry names no grant"),
            }
            index.insert(key);
        }
        for grant in grants.values() {
            for (kind, id) in [(b'm', grant.mid.as_str()), (b'c', grant.cid.as_str())] {
                if !index.contains(&Self::grant_index_key(kind, id, grant.id)) {
                    report.problem(format!(
                        "grant {} is missing from the index of {id}",
                        grant.id
                    ));
                }
            }
        }
        report.checked("grant index entries", index.len() as u64);
    }

    /// The ids of applied batches.
    fn verify_batches(&self, report: &mut Report) -> HashSet<BatchId> {
        let mut ids = HashSet::new();
        let mut count = 0u64;
        for (key, value) in entries(&self.batches, "batches", report) {
            count += 1;
            let mut fields = Reader::new(&key);
            let parsed = (|| {
                let mid = Mid::parse(fields.text()?).ok()?;
                let id = BatchId::parse(fields.text()?).ok()?;
                fields.is_empty().then_some((mid, id))
            })();
            let Some((_, id)) = parsed else {
                report.problem(format!(
                    "an applied batch's key does not decode ({})",
                    shown(&key)
                ));
                continue;
            };
            if value.first() == Some(&super::BATCH_RECORD_DIGEST) && value.len() < 33 {
                report.problem(format!("applied batch {id}: its record is cut short"));
            }
            ids.insert(id);
        }
        report.checked("applied batches", count);
        // Ranges of sequence numbers, per meter instance, never overlap.
        let mut ranges = 0u64;
        let mut previous: Option<(Vec<u8>, u64)> = None;
        for (key, value) in entries(&self.seq_ranges, "seq_ranges", report) {
            ranges += 1;
            let split = key.len().checked_sub(8);
            let (Some(at), Some(last)) = (split, be_u64(&value)) else {
                report.problem("a range of sequence numbers does not decode");
                continue;
            };
            let (prefix, first) = (key[..at].to_vec(), be_u64(&key[at..]).unwrap_or_default());
            if last < first {
                report.problem(format!(
                    "a range of sequence numbers ends ({last}) before it starts ({first})"
                ));
            }
            if let Some((before, before_last)) = &previous
                && *before == prefix
                && *before_last >= first
            {
                report.problem(format!(
                    "two applied ranges of sequence numbers of one meter instance overlap at {first}"
                ));
            }
            previous = Some((prefix, last));
        }
        report.checked("sequence ranges", ranges);
        ids
    }

    fn verify_transfers(
        &self,
        customers: &HashMap<Cid, Customer>,
        products: &HashSet<Pid>,
        batches: &HashSet<BatchId>,
        report: &mut Report,
    ) -> Vec<Transfer> {
        let mut transfers = Vec::new();
        let stored = entries(&self.transfers, "transfers", report)
            .into_iter()
            .filter_map(|(key, value)| match decode_transfers(&key, &value) {
                Ok(stored) => Some(stored),
                Err(why) => {
                    report.problem(format!(
                        "transfer record {}: {why}",
                        be_u64(&key).map_or_else(|| shown(&key), |id| id.to_string())
                    ));
                    None
                }
            })
            .collect::<Vec<_>>();
        for transfer in stored.into_iter().flatten() {
            let id = transfer.id.0;
            for account in [transfer.debit, transfer.credit] {
                if let AccountId::Customer(cid) = account
                    && !customers.contains_key(&cid)
                {
                    report.problem(format!("transfer {id}: {cid} is not a customer"));
                }
            }
            match &transfer.kind {
                TransferKind::Use { pid, batch, .. } => {
                    if !products.contains(pid) {
                        report.problem(format!("transfer {id}: {pid} is not a product"));
                    }
                    if !batches.contains(batch) {
                        report.problem(format!(
                            "transfer {id}: its batch {batch} is not an applied batch"
                        ));
                    }
                }
                TransferKind::Payment { pid, .. } if !products.contains(pid) => {
                    report.problem(format!("transfer {id}: {pid} is not a product"));
                }
                TransferKind::Deposit
                    if transfer.debit != AccountId::System(SystemAccount::Funding) =>
                {
                    report.problem(format!("transfer {id}: a deposit not from funding"));
                }
                _ => {}
            }
            transfers.push(transfer);
        }
        check_transfers(&transfers, report);
        transfers
    }

    fn verify_periods(
        &self,
        customers: &HashMap<Cid, Customer>,
        products: &HashSet<Pid>,
        report: &mut Report,
    ) {
        let trees = [
            (
                &self.period_uses,
                "period_uses",
                "period count",
                "period counts",
            ),
            (
                &self.free_uses,
                "free_uses",
                "free-use count",
                "free-use counts",
            ),
        ];
        for (tree, name, what, counted) in trees {
            let mut count = 0u64;
            for (key, value) in entries(tree, name, report) {
                count += 1;
                let mut fields = Reader::new(&key);
                let parsed = (|| {
                    let payer = Cid::parse(fields.text()?).ok()?;
                    let pid = Pid::parse(fields.text()?).ok()?;
                    let month = fields.u32()?;
                    fields.is_empty().then_some((payer, pid, month))
                })();
                let Some((payer, pid, month)) = parsed else {
                    report.problem(format!("a {what}'s key does not decode"));
                    continue;
                };
                if be_u64(&value).is_none() {
                    report.problem(format!(
                        "the {what} of {payer} for {pid} in {month} is not 8 bytes"
                    ));
                }
                if !(1..=12).contains(&(month % 100)) {
                    report.problem(format!(
                        "a {what} of {payer} for {pid} has the month {month}"
                    ));
                }
                if !customers.contains_key(&payer) {
                    report.problem(format!("a {what} names {payer}, not a customer"));
                }
                // Free uses may be of a product's test PID, which the
                // products tree indexes beside its PID.
                let known = products.contains(&pid)
                    || (name == "free_uses"
                        && matches!(self.products.contains_key(pid.as_str()), Ok(true)));
                if !known {
                    report.problem(format!("a {what} names {pid}, not a product"));
                }
            }
            report.checked(counted, count);
        }
    }

    fn verify_suspense(&self, report: &mut Report) {
        let mut count = 0u64;
        for (key, value) in entries(&self.suspense, "suspense", report) {
            count += 1;
            match serde_json::from_slice::<super::Suspense>(&value) {
                Ok(record) if suspense_key(&record) == key => {}
                Ok(record) => report.problem(format!(
                    "a reading in suspense ({} {} {}) is stored under another key",
                    record.mid, record.batch, record.seq
                )),
                Err(_) => report.problem("a reading in suspense does not decode"),
            }
        }
        let counter = self
            .suspense_records
            .load(std::sync::atomic::Ordering::Relaxed) as u64;
        if counter != count {
            report.problem(format!(
                "the suspense counter says {counter}, the tree holds {count} (on a running branch a batch applied meanwhile can do this: run again)"
            ));
        }
        report.checked("readings in suspense", count);
    }

    fn verify_deposits(
        &self,
        customers: &HashMap<Cid, Customer>,
        transfers: &[Transfer],
        report: &mut Report,
    ) {
        let mut count = 0u64;
        let mut posted: HashSet<u64> = HashSet::new();
        for (key, value) in entries(&self.deposits, "deposits", report) {
            count += 1;
            let reference = std::str::from_utf8(&key)
                .ok()
                .and_then(|text| Reference::parse(text).ok());
            let Some(reference) = reference else {
                report.problem("a deposit is stored under a key that is not a reference");
                continue;
            };
            let Ok(record) = serde_json::from_slice::<DepositRecord>(&value) else {
                report.problem(format!("deposit {reference}: the record does not decode"));
                continue;
            };
            if !customers.contains_key(&record.cid) {
                report.problem(format!(
                    "deposit {reference}: {} is not a customer",
                    record.cid
                ));
            }
            if !record.amount.is_positive() {
                report.problem(format!("deposit {reference}: the amount is not positive"));
            }
            let DepositState::Posted { transfer, .. } = record.state else {
                continue;
            };
            if !posted.insert(transfer) {
                report.problem(format!(
                    "deposit {reference}: transfer {transfer} is another deposit's"
                ));
            }
            let found = usize::try_from(transfer)
                .ok()
                .and_then(|position| transfers.get(position))
                .filter(|found| found.id.0 == transfer);
            match found {
                Some(found)
                    if found.kind == TransferKind::Deposit
                        && found.debit == AccountId::System(SystemAccount::Funding)
                        && found.credit == AccountId::Customer(record.cid)
                        && found.amount == record.amount => {}
                Some(_) => report.problem(format!(
                    "deposit {reference}: transfer {transfer} is not a deposit of {} to {}",
                    record.amount, record.cid
                )),
                None => report.problem(format!(
                    "deposit {reference}: its transfer {transfer} is missing"
                )),
            }
        }
        report.checked("deposits by reference", count);
    }
}

/// A transfer's record as the store writes it, for tests that tamper.
#[cfg(test)]
pub(crate) fn encode_transfer_for_tests(transfer: &Transfer) -> Vec<u8> {
    super::encode_transfer(transfer)
}

impl SledStore {
    /// Writes (or with `None` removes) an entry of tree `tree` straight
    /// into sled, past every check: corruption, for tests of `verify`.
    #[cfg(test)]
    pub(crate) fn tamper(&self, tree: &str, key: &[u8], value: Option<&[u8]>) {
        let tree = self.files.db().open_tree(tree).unwrap();
        match value {
            Some(value) => tree.insert(key, value).unwrap(),
            None => tree.remove(key).unwrap(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::funding::{DepositRecord, DepositState, Reference};
    use crate::ledger::{Ledger, NewTransfer};
    use crate::registry::NewGrant;
    use crate::store::{BatchEffects, BatchKey, NewProduct, PeriodKey, SeqRange, Store, Suspense};
    use proto::{Amount, Bid};

    /// A store with a record in every tree: customers, a product, a meter,
    /// a grant, an applied batch with a use, a period count, a reading in
    /// suspense, a sequence range and a deposit by reference.
    fn filled(dir: &std::path::Path) -> (SledStore, Vec<Transfer>) {
        let store = SledStore::open(dir).unwrap();
        let bid = Bid::parse("B1").unwrap();
        let ada = store
            .create_customer(&bid, "Ada", "Ada@example.org")
            .unwrap();
        let bob = store
            .create_customer(&bid, "Bob", "bob@example.org")
            .unwrap();
        let product = store
            .create_product(
                &bid,
                NewProduct::new(
                    &ada.cid,
                    "Editor",
                    "flat",
                    b"\0asm module",
                    Amount::from_units(1).unwrap(),
                ),
            )
            .unwrap();
        let meter = store.create_meter(&bid, &bob.cid).unwrap();
        store
            .create_grant(NewGrant {
                mid: meter.mid,
                cid: bob.cid,
                scope: proto::grant::Scope::Machine,
                label: "laptop".into(),
                created_ms: 1,
                expires_ms: None,
            })
            .unwrap();
        let mut ledger = Ledger::new();
        let batch = BatchId::parse(&format!("{}:1", meter.mid)).unwrap();
        ledger
            .post(
                vec![
                    NewTransfer {
                        debit: AccountId::System(SystemAccount::Funding),
                        credit: AccountId::Customer(bob.cid),
                        amount: Amount::from_units(5).unwrap(),
                        kind: TransferKind::Deposit,
                    },
                    NewTransfer {
                        debit: AccountId::Customer(bob.cid),
                        credit: AccountId::Customer(ada.cid),
                        amount: Amount::parse("0.003").unwrap(),
                        kind: TransferKind::Use {
                            pid: product.pid,
                            batch: batch.clone(),
                            uses: 3,
                        },
                    },
                ],
                1,
            )
            .unwrap();
        let suspended = Suspense {
            mid: meter.mid,
            batch: batch.clone(),
            seq: 4,
            pid: product.pid,
            payer: None,
            time_ms: 1,
            reason: "no grant".into(),
            authorized: false,
            arrived_ms: 1,
        };
        let range = SeqRange {
            mid: meter.mid,
            instance: meter.mid.to_string(),
            first: 1,
            last: 4,
        };
        store
            .apply_batch(
                &BatchKey {
                    mid: meter.mid,
                    id: batch,
                },
                BatchEffects {
                    transfers: ledger.transfers(),
                    period_uses: &[(
                        PeriodKey {
                            payer: bob.cid,
                            pid: product.pid,
                            month: 202511,
                        },
                        3,
                    )],
                    free_uses: &[],
                    suspense: &[suspended],
                    answer: b"",
                    digest: Some([1; 32]),
                    seq_range: Some(&range),
                },
            )
            .unwrap();
        let reference = Reference::parse("inv-1").unwrap();
        let amount = Amount::from_units(2).unwrap();
        let intent = DepositRecord {
            cid: ada.cid,
            amount,
            created_ms: 1,
            state: DepositState::Collecting,
        };
        store.begin_deposit(&reference, &intent).unwrap();
        store.deposit_collected(&reference, "auth-1").unwrap();
        let prepared = ledger
            .prepare(
                vec![NewTransfer {
                    debit: AccountId::System(SystemAccount::Funding),
                    credit: AccountId::Customer(ada.cid),
                    amount,
                    kind: TransferKind::Deposit,
                }],
                2,
            )
            .unwrap();
        store.post_deposit(&reference, &prepared[0]).unwrap();
        ledger.commit(prepared);
        (store, ledger.transfers().to_vec())
    }

    fn problems(store: &SledStore) -> Vec<String> {
        let (report, _) = store.verify_records();
        assert_eq!(report.problem_count, report.problems.len() as u64);
        report.problems
    }

    fn found(store: &SledStore, needle: &str) {
        let problems = problems(store);
        assert!(
            problems.iter().any(|problem| problem.contains(needle)),
            "{needle:?} not in {problems:?}"
        );
    }

    #[test]
    fn a_clean_store_verifies_and_corrupted_records_and_indexes_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let (store, transfers) = filled(dir.path());
        let (report, read) = store.verify_records();
        assert!(report.is_ok(), "{:?}", report.problems);
        assert_eq!(read, transfers);
        let summary = report.summary();
        for counted in [
            "transfers=3",
            "accounts=3",
            "customers=2",
            "e-mail index entries=2",
            "products=1",
            "TACA modules=1",
            "meters=1",
            "grants=1",
            "grant index entries=2",
            "applied batches=1",
            "sequence ranges=1",
            "period counts=1",
            "readings in suspense=1",
            "deposits by reference=1",
        ] {
            assert!(summary.contains(counted), "{counted} in {summary}");
        }
        let key = |id: u64| id.to_be_bytes();
        let deposit = super::super::encode_transfer(&transfers[2]);
        // A deposit's amount changed on disk: positive and in range, but
        // its deposit record says otherwise.
        let mut changed = transfers[2].clone();
        changed.amount = Amount::from_units(2_000).unwrap();
        store.tamper(
            "transfers",
            &key(2),
            Some(&super::super::encode_transfer(&changed)),
        );
        found(
            &store,
            "deposit inv-1: transfer 2 is not a deposit of 2 to B1-C1",
        );
        // Negative, or not a record at all.
        changed.amount = Amount::from_units(-2).unwrap();
        store.tamper(
            "transfers",
            &key(2),
            Some(&super::super::encode_transfer(&changed)),
        );
        found(&store, "transfer 2: the amount -2 is not positive");
        store.tamper("transfers", &key(2), Some(b"\x02garbage"));
        found(&store, "transfer record 2: does not decode");
        store.tamper("transfers", &key(2), Some(&deposit));
        // A hole in the transfer numbers: the batch's block lost its last
        // transfer, or a record of it stored a second time on its own.
        let block = super::super::encode_block(&transfers[..2]);
        store.tamper(
            "transfers",
            &key(0),
            Some(&super::super::encode_block(&transfers[..1])),
        );
        found(&store, "transfer ids are not dense");
        store.tamper("transfers", &key(0), Some(&block));
        store.tamper(
            "transfers",
            &key(1),
            Some(&super::super::encode_transfer(&transfers[1])),
        );
        found(&store, "transfer ids are not dense");
        store.tamper("transfers", &key(1), None);
        assert_eq!(problems(&store), Vec::<String>::new());
        // The batch's block (transfers 0 and 1 under key 0): a transfer in
        // it renumbered, the block cut short, a count it does not hold.
        let mut renumbered = transfers[1].clone();
        renumbered.id = crate::ledger::TransferId(5);
        store.tamper(
            "transfers",
            &key(0),
            Some(&super::super::encode_block(&[
                transfers[0].clone(),
                renumbered,
            ])),
        );
        found(&store, "transfer record 0: is stored under another number");
        store.tamper("transfers", &key(0), Some(&block[..block.len() - 1]));
        found(&store, "transfer record 0: does not decode");
        let mut miscounted = block.clone();
        miscounted[1..5].copy_from_slice(&3u32.to_be_bytes());
        store.tamper("transfers", &key(0), Some(&miscounted));
        found(&store, "transfer record 0: does not decode");
        store.tamper("transfers", &key(0), Some(&[3, 0, 0, 0, 0]));
        found(&store, "transfer record 0: is an empty block");
        store.tamper("transfers", &key(0), Some(&block));
        assert_eq!(problems(&store), Vec::<String>::new());
        // A transfer numbered inside the block (or before the last one) is
        // never written over it, though no record has its number as key.
        let inside = transfers[1].clone();
        assert!(matches!(
            store.stage_transfers(std::slice::from_ref(&inside)),
            Err(crate::store::StoreError::Corrupt(why)) if why.contains("transfer 1 exists already")
        ));
        // Nor one that would leave a gap.
        let mut later = inside.clone();
        later.id = crate::ledger::TransferId(9);
        assert!(matches!(
            store.stage_transfers(&[later]),
            Err(crate::store::StoreError::Corrupt(why)) if why.contains("would leave a gap after 2")
        ));
        // Nor a deposit's transfer.
        let second = Reference::parse("inv-2").unwrap();
        store
            .begin_deposit(
                &second,
                &DepositRecord {
                    cid: "B1-C1".parse().unwrap(),
                    amount: Amount::from_units(1).unwrap(),
                    created_ms: 3,
                    state: DepositState::Collecting,
                },
            )
            .unwrap();
        store.deposit_collected(&second, "auth-2").unwrap();
        assert!(matches!(
            store.stage_deposit(&second, &inside),
            Err(crate::store::StoreError::Corrupt(why)) if why.contains("transfer 1 exists already")
        ));
        store.tamper("deposits", b"inv-2", None);
        assert_eq!(problems(&store), Vec::<String>::new());
        // Indexes: an e-mail entry deleted, a grant index entry deleted.
        store.tamper("emails", b"ada@example.org", None);
        found(&store, "customer B1-C1 is missing from the e-mail index");
        store.tamper("emails", b"ada@example.org", Some(b"B1-C2"));
        found(&store, "names B1-C2, whose address is another");
        store.tamper("emails", b"ada@example.org", Some(b"B1-C1"));
        // The telephone index: a number set, then its entry deleted or
        // pointing at another customer.
        let ada: Cid = "B1-C1".parse().unwrap();
        store
            .change_customer(&ada, &|customer| {
                customer.phone = Some("+4915112345678".into());
            })
            .unwrap();
        let (report, _) = store.verify_records();
        assert!(report.is_ok(), "{:?}", report.problems);
        assert!(report.summary().contains("telephone index entries=1"));
        store.tamper("phones", b"+4915112345678", None);
        found(&store, "customer B1-C1 is missing from the telephone index");
        store.tamper("phones", b"+4915112345678", Some(b"B1-C2"));
        found(&store, "names B1-C2, whose number is another");
        store.tamper("phones", b"+4915112345678", Some(b"B1-C1"));
        let index_key = SledStore::grant_index_key(b'c', "B1-C2", 1);
        store.tamper("grant_index", &index_key, None);
        found(&store, "grant 1 is missing from the index of B1-C2");
        store.tamper("grant_index", &index_key, Some(b""));
        // A TACA module whose bytes changed.
        let hash = TacaHash::of(b"\0asm module").to_string();
        store.tamper("tacas", hash.as_bytes(), Some(b"\0asm modulE"));
        found(&store, "its bytes do not have this hash");
        store.tamper("tacas", hash.as_bytes(), Some(b"\0asm module"));
        // A use of a batch that was never applied.
        let mut batch_key = Vec::new();
        proto::record::put_str(&mut batch_key, "B1-M1");
        proto::record::put_str(&mut batch_key, "B1-M1:1");
        let applied = self::entries(&store.batches, "batches", &mut Report::default());
        assert_eq!(applied.len(), 1);
        store.tamper("batches", &batch_key, None);
        found(&store, "its batch B1-M1:1 is not an applied batch");
        store.tamper("batches", &batch_key, Some(&applied[0].1));
        // A customer record that does not decode: reported, never a panic.
        store.tamper("customers", b"B1-C2", Some(b"{not json"));
        found(&store, "customer B1-C2: the record does not decode");
        store.tamper("customers", b"B1-C2", None);
        found(
            &store,
            "the e-mail index entry bob@example.org names no customer",
        );
        drop(store);
        let report = crate::verify::offline(dir.path()).unwrap();
        assert!(!report.is_ok());
    }
}
