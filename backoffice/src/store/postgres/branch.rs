//! `Store` on PostgreSQL: each change one transaction, durable when it
//! commits (so `sync` has nothing left to do). Read-modify-write steps lock
//! the rows they change (`FOR UPDATE`); IDs come from `serials` rows,
//! locked by the `UPDATE` that takes the next number.

use std::collections::HashMap;

use proto::{Amount, BatchId, Bid, Cid, Mid, Pid};
use tokio_postgres::error::SqlState;

mod import;

use super::PgStore;
use crate::funding::{DepositRecord, DepositState, Reference};
use crate::ledger::{AccountId, Ledger, SystemAccount, Transfer, TransferId, TransferKind};
use crate::pricing::TacaHash;
use crate::registry::{
    self, Actor, Change, Customer, Grant, Meter, NewGrant, PreviousSecret, Product, Registration,
    RegistryError,
};
use crate::store::{
    AppliedBatch, BatchEffects, BatchKey, ItemisedAt, NewProduct, PeriodKey, RepricedItems,
    SeqRange, Store, StoreError, Suspense, SuspenseCursor,
};

type Transaction<'a> = deadpool_postgres::Transaction<'a>;

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        match error.code() {
            Some(&SqlState::T_R_SERIALIZATION_FAILURE | &SqlState::T_R_DEADLOCK_DETECTED) => {
                StoreError::Conflict(error.to_string())
            }
            _ => StoreError::Database(match error.as_db_error() {
                // The server's own words: "db error" alone says nothing.
                Some(db) => format!("{} ({})", db.message(), db.code().code()),
                None => error.to_string(),
            }),
        }
    }
}

/// A number the store keeps in a bigint (IDs, times, counts).
fn int(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{n} does not fit a bigint")))
}

fn uint(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{n} is negative")))
}

/// A sequence number (any u64) as a bigint in the same order: the sign bit
/// flipped.
fn seq_in(seq: u64) -> i64 {
    i64::from_be_bytes((seq ^ (1 << 63)).to_be_bytes())
}

fn seq_out(stored: i64) -> u64 {
    u64::from_be_bytes(stored.to_be_bytes()) ^ (1 << 63)
}

fn account_text(account: &AccountId) -> String {
    match account {
        AccountId::Customer(cid) => cid.as_str().to_owned(),
        AccountId::System(SystemAccount::Funding) => ":funding".to_owned(),
    }
}

fn account_of(text: &str) -> Result<AccountId, StoreError> {
    match text {
        ":funding" => Ok(AccountId::System(SystemAccount::Funding)),
        cid => Cid::parse(cid)
            .map(AccountId::Customer)
            .map_err(|_| StoreError::Corrupt(format!("an account named {cid:?}"))),
    }
}

fn amount_of(text: &str) -> Result<Amount, StoreError> {
    Amount::parse(text).map_err(|_| StoreError::Corrupt(format!("the amount {text:?}")))
}

fn json<T: serde::Serialize>(record: &T) -> String {
    serde_json::to_string(record).expect("records serialize")
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("{what}: {error}")))
}

fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// The serial number at the end of an ID (`B1-P12` -> 12), for ordering.
fn serial_of(id: &str) -> u64 {
    id.rsplit_once('-')
        .and_then(|(_, tail)| tail.get(1..))
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Takes the next number of `kind` (from 1), locking its row until the
/// transaction ends.
async fn next_serial(transaction: &Transaction<'_>, kind: &str) -> Result<u64, StoreError> {
    let row = transaction
        .query_one(
            &transaction
                .prepare_cached(
                    "INSERT INTO serials (kind, next) VALUES ($1, 2) \
             ON CONFLICT (kind) DO UPDATE SET next = serials.next + 1 \
             RETURNING next - 1",
                )
                .await?,
            &[&kind],
        )
        .await?;
    uint(row.get(0))
}

/// Writes `transfers` and moves the balances they change: one statement
/// for the transfers and one for the balances, whatever their number (a
/// batch posts up to one transfer per payer, owner and product).
async fn post(transaction: &Transaction<'_>, transfers: &[Transfer]) -> Result<(), StoreError> {
    if transfers.is_empty() {
        return Ok(());
    }
    let count = transfers.len();
    let mut ids = Vec::with_capacity(count);
    let mut debits = Vec::with_capacity(count);
    let mut credits = Vec::with_capacity(count);
    let mut amounts = Vec::with_capacity(count);
    let mut kinds = Vec::with_capacity(count);
    let mut pids: Vec<Option<String>> = Vec::with_capacity(count);
    let mut batches: Vec<Option<String>> = Vec::with_capacity(count);
    let mut uses: Vec<Option<i64>> = Vec::with_capacity(count);
    let mut corrects: Vec<Option<i64>> = Vec::with_capacity(count);
    let mut references: Vec<Option<&str>> = Vec::with_capacity(count);
    let mut posted = Vec::with_capacity(count);
    let mut moved: HashMap<AccountId, Amount> = HashMap::new();
    for transfer in transfers {
        let (kind, pid, batch, used, corrected) = match &transfer.kind {
            TransferKind::Deposit => ("deposit", None, None, None, None),
            TransferKind::Withdrawal => ("withdrawal", None, None, None, None),
            TransferKind::Use { pid, batch, uses } => (
                "use",
                Some(pid.as_str().to_owned()),
                Some(batch.as_str().to_owned()),
                Some(int(*uses)?),
                None,
            ),
            TransferKind::Correction { of } => ("correction", None, None, None, Some(int(of.0)?)),
            TransferKind::Payment { pid, .. } => {
                ("payment", Some(pid.as_str().to_owned()), None, None, None)
            }
        };
        references.push(match &transfer.kind {
            TransferKind::Payment { reference, .. } => Some(reference.as_str()),
            _ => None,
        });
        ids.push(int(transfer.id.0)?);
        debits.push(account_text(&transfer.debit));
        credits.push(account_text(&transfer.credit));
        amounts.push(transfer.amount.to_string());
        kinds.push(kind);
        pids.push(pid);
        batches.push(batch);
        uses.push(used);
        corrects.push(corrected);
        posted.push(int(transfer.posted_ms)?);
        for posting in transfer.postings() {
            let balance = moved.entry(posting.account).or_insert(Amount::ZERO);
            *balance = balance
                .checked_add(posting.amount)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        }
    }
    let result = transaction
        .execute(
            &transaction.prepare_cached("INSERT INTO transfers (id, debit, credit, amount, kind, pid, batch, uses, corrects, posted_ms, reference) \
             SELECT id, debit, credit, amount::numeric, kind, pid, batch, uses, corrects, posted_ms, reference \
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                         $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::text[]) \
                  AS t (id, debit, credit, amount, kind, pid, batch, uses, corrects, posted_ms, reference)").await?,
            &[
                &ids, &debits, &credits, &amounts, &kinds, &pids, &batches, &uses, &corrects,
                &posted, &references,
            ],
        )
        .await;
    match result {
        Err(error) if is_unique_violation(&error) => {
            return Err(StoreError::Corrupt(format!(
                "a transfer numbered {}..={} exists already; a posted transfer is never overwritten",
                transfers[0].id.0,
                transfers[count - 1].id.0
            )));
        }
        other => other?,
    };
    // In account order, so that concurrent writers lock rows in one order.
    let mut moved: Vec<(AccountId, Amount)> = moved.into_iter().collect();
    moved.sort();
    let accounts: Vec<String> = moved
        .iter()
        .map(|(account, _)| account_text(account))
        .collect();
    let amounts: Vec<String> = moved.iter().map(|(_, amount)| amount.to_string()).collect();
    transaction
        .execute(
            &transaction.prepare_cached("INSERT INTO balances (account, balance) \
             SELECT account, amount::numeric FROM unnest($1::text[], $2::text[]) AS m (account, amount) \
             ON CONFLICT (account) DO UPDATE SET balance = balances.balance + excluded.balance").await?,
            &[&accounts, &amounts],
        )
        .await?;
    Ok(())
}

/// Payers, PIDs, months and counts, as `unnest` takes them.
type PeriodColumns = (Vec<String>, Vec<String>, Vec<i32>, Vec<i64>);

/// The columns of period counts, in key order (so that concurrent writers
/// lock rows in one order).
fn period_columns(counts: &[(PeriodKey, u64)]) -> Result<PeriodColumns, StoreError> {
    let mut sorted: Vec<&(PeriodKey, u64)> = counts.iter().collect();
    sorted.sort_by(|(a, _), (b, _)| {
        (a.payer.as_str(), a.pid.as_str(), a.month).cmp(&(
            b.payer.as_str(),
            b.pid.as_str(),
            b.month,
        ))
    });
    let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (key, uses) in sorted {
        columns.0.push(key.payer.as_str().to_owned());
        columns.1.push(key.pid.as_str().to_owned());
        columns.2.push(
            i32::try_from(key.month)
                .map_err(|_| StoreError::Corrupt(format!("the month {}", key.month)))?,
        );
        columns.3.push(int(*uses)?);
    }
    Ok(columns)
}

async fn set_period_uses(
    transaction: &Transaction<'_>,
    period_uses: &[(PeriodKey, u64)],
    free_uses: &[(PeriodKey, u64)],
) -> Result<(), StoreError> {
    if !period_uses.is_empty() {
        let (payers, pids, months, uses) = period_columns(period_uses)?;
        transaction
            .execute(
                &transaction
                    .prepare_cached(
                        "INSERT INTO period_uses (payer, pid, month, uses) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::bigint[]) \
                 ON CONFLICT (payer, pid, month) DO UPDATE SET uses = excluded.uses",
                    )
                    .await?,
                &[&payers, &pids, &months, &uses],
            )
            .await?;
    }
    if !free_uses.is_empty() {
        let (payers, pids, months, uses) = period_columns(free_uses)?;
        transaction
            .execute(
                &transaction.prepare_cached("INSERT INTO free_uses (payer, pid, month, uses) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::bigint[]) \
                 ON CONFLICT (payer, pid, month) DO UPDATE SET uses = free_uses.uses + excluded.uses").await?,
                &[&payers, &pids, &months, &uses],
            )
            .await?;
    }
    Ok(())
}

/// Writes one set of itemised records of `key` at `arrived_ms`, indexed by
/// the batch (`batch_index`) and by each range of transfers.
async fn write_itemised(
    transaction: &Transaction<'_>,
    key: &BatchKey,
    ranges: &[(TransferId, TransferId)],
    arrived_ms: u64,
    records: &[Vec<u8>],
    batch_index: bool,
) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let parts = u16::try_from(records.len()).expect("a batch takes fewer than 65,536 records");
    let (mid, batch, arrived) = (key.mid.as_str(), key.id.as_str(), int(arrived_ms)?);
    let numbers: Vec<i32> = (0..i32::from(parts)).collect();
    transaction
        .execute(
            &transaction.prepare_cached("INSERT INTO itemised (arrived_ms, mid, batch, part, record) \
             SELECT $1, $2, $3, part, record FROM unnest($4::integer[], $5::bytea[]) AS r (part, record)").await?,
            &[&arrived, &mid, &batch, &numbers, &records],
        )
        .await
        .map_err(|error| {
            if is_unique_violation(&error) {
                crate::store::itemised_taken(key, arrived_ms)
            } else {
                error.into()
            }
        })?;
    if batch_index {
        transaction
            .execute(
                &transaction.prepare_cached("INSERT INTO itemised_batches (mid, batch, arrived_ms, parts) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (mid, batch) DO UPDATE SET arrived_ms = excluded.arrived_ms, parts = excluded.parts").await?,
                &[&mid, &batch, &arrived, &i32::from(parts)],
            )
            .await?;
    }
    if !ranges.is_empty() {
        let firsts: Vec<i64> = ranges
            .iter()
            .map(|(first, _)| int(first.0))
            .collect::<Result<_, _>>()?;
        let lasts: Vec<i64> = ranges
            .iter()
            .map(|(_, last)| int(last.0))
            .collect::<Result<_, _>>()?;
        transaction
            .execute(
                &transaction.prepare_cached("INSERT INTO itemised_transfers (first, last, arrived_ms, mid, batch) \
                 SELECT first, last, $3, $4, $5 FROM unnest($1::bigint[], $2::bigint[]) AS r (first, last) \
                 ON CONFLICT (first) DO UPDATE SET last = excluded.last, arrived_ms = excluded.arrived_ms, \
                 mid = excluded.mid, batch = excluded.batch").await?,
                &[&firsts, &lasts, &arrived, &mid, &batch],
            )
            .await?;
    }
    Ok(())
}

/// The error that failed a transaction's statements sent at once: once one
/// fails, the database answers every later one "current transaction is
/// aborted" (25P02), which says nothing of the cause (a conflict to retry,
/// a transfer number taken).
fn first_cause<const N: usize>(results: [Result<(), StoreError>; N]) -> Result<(), StoreError> {
    let mut aborted = None;
    for result in results {
        match result {
            Ok(()) => {}
            Err(StoreError::Database(message)) if message.ends_with(ABORTED) => {
                aborted.get_or_insert(StoreError::Database(message));
            }
            Err(cause) => return Err(cause),
        }
    }
    aborted.map_or(Ok(()), Err)
}

/// How the message of a statement refused in an aborted transaction ends
/// (its SQLSTATE, as `From<tokio_postgres::Error>` writes it).
const ABORTED: &str = "(25P02)";

/// Records the range of readings of a meter instance a batch brought.
async fn write_seq_range(
    transaction: &Transaction<'_>,
    seq_range: Option<&SeqRange>,
) -> Result<(), StoreError> {
    if let Some(range) = seq_range {
        transaction
            .execute(
                &transaction.prepare_cached("INSERT INTO seq_ranges (mid, instance, first, last) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (mid, instance, first) DO UPDATE SET last = excluded.last").await?,
                &[
                    &range.mid.as_str(),
                    &range.instance,
                    &seq_in(range.first),
                    &seq_in(range.last),
                ],
            )
            .await?;
    }
    Ok(())
}

/// Writes a batch's readings in suspense.
async fn write_suspense(
    transaction: &Transaction<'_>,
    suspense: &[Suspense],
) -> Result<(), StoreError> {
    if !suspense.is_empty() {
        // One row per reading: a reading named twice keeps its last
        // record (as a second write of the same key would).
        let mut last: HashMap<(Mid, &str, u64), usize> = HashMap::new();
        for (at, record) in suspense.iter().enumerate() {
            last.insert((record.mid, record.batch.as_str(), record.seq), at);
        }
        let mut kept: Vec<usize> = last.into_values().collect();
        kept.sort_unstable();
        let suspense: Vec<&Suspense> = kept.into_iter().map(|at| &suspense[at]).collect();
        let mids: Vec<&str> = suspense.iter().map(|record| record.mid.as_str()).collect();
        let batches: Vec<&str> = suspense
            .iter()
            .map(|record| record.batch.as_str())
            .collect();
        let seqs: Vec<i64> = suspense.iter().map(|record| seq_in(record.seq)).collect();
        let records: Vec<String> = suspense.iter().map(json).collect();
        transaction
            .execute(
                &transaction.prepare_cached("INSERT INTO suspense (mid, batch, seq, record) \
                 SELECT mid, batch, seq, record::jsonb \
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS s (mid, batch, seq, record) \
                 ON CONFLICT (mid, batch, seq) DO UPDATE SET record = excluded.record").await?,
                &[&mids, &batches, &seqs, &records],
            )
            .await?;
    }
    Ok(())
}

/// Writes hold events (`store::holds::StoredHoldEvent` in columns), all in
/// one statement; a number kept already is refused, never overwritten.
/// Writes payment requests (`payments::PaymentRequest`); a reference code
/// its service used already is refused, with the transaction to roll back.
pub(super) async fn insert_payment_requests(
    transaction: &Transaction<'_>,
    requests: &[crate::payments::PaymentRequest],
) -> Result<(), StoreError> {
    for request in requests {
        let transfers = request
            .transfers
            .iter()
            .map(|id| int(*id))
            .collect::<Result<Vec<i64>, StoreError>>()?;
        let hold = request.hold.map(int).transpose()?;
        let written = transaction
            .execute(
                &transaction
                    .prepare_cached(
                        "INSERT INTO payment_requests (service, reference, operation, digest, \
                         description, at_ms, transfers, hold, evidence, form) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    )
                    .await?,
                &[
                    &request.service.as_str(),
                    &request.reference,
                    &request.operation,
                    &request.digest,
                    &request.description,
                    &int(request.at_ms)?,
                    &transfers,
                    &hold,
                    &request.evidence,
                    &i16::from(request.form),
                ],
            )
            .await;
        match written {
            Err(error) if is_unique_violation(&error) => {
                return Err(StoreError::Corrupt(
                    "the payment request's reference code is taken; a request is never \
                     overwritten: nothing was written"
                        .to_owned(),
                ));
            }
            other => other?,
        };
        if request.evidence.is_empty() {
            continue;
        }
        let written = transaction
            .execute(
                &transaction
                    .prepare_cached(
                        "INSERT INTO payment_evidence (reference, service, request) \
                         SELECT unnest($1::text[]), $2, $3",
                    )
                    .await?,
                &[
                    &request.evidence,
                    &request.service.as_str(),
                    &request.reference,
                ],
            )
            .await;
        match written {
            Err(error) if is_unique_violation(&error) => {
                return Err(StoreError::Corrupt(
                    "a confirmation reference of the payment request was evidence for another \
                     request: nothing was written"
                        .to_owned(),
                ));
            }
            other => other?,
        };
    }
    Ok(())
}

/// A payment request as a row of `payment_requests` holds it.
fn payment_request_of(
    row: &tokio_postgres::Row,
) -> Result<crate::payments::PaymentRequest, StoreError> {
    let service: &str = row.get(0);
    let reference: String = row.get(1);
    let corrupt = || StoreError::Corrupt(format!("the payment request {reference:?} of {service}"));
    let request = crate::payments::PaymentRequest {
        service: Pid::parse(service).map_err(|_| corrupt())?,
        reference: reference.clone(),
        operation: row.get(2),
        digest: row.get(3),
        description: row.get(4),
        at_ms: uint(row.get(5))?,
        transfers: row
            .get::<_, Vec<i64>>(6)
            .into_iter()
            .map(uint)
            .collect::<Result<_, _>>()?,
        hold: row.get::<_, Option<i64>>(7).map(uint).transpose()?,
        evidence: row.get(8),
        form: u8::try_from(row.get::<_, i16>(9)).map_err(|_| corrupt())?,
    };
    request.check().map_err(|_| corrupt())?;
    Ok(request)
}

const PAYMENT_REQUEST_COLUMNS: &str =
    "service, reference, operation, digest, description, at_ms, transfers, hold, evidence, form";

pub(super) async fn insert_hold_events(
    transaction: &Transaction<'_>,
    events: &[crate::holds::HoldEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let stored: Vec<crate::store::holds::StoredHoldEvent> = events.iter().map(Into::into).collect();
    let column = |pick: &dyn Fn(&crate::store::holds::StoredHoldEvent) -> Option<u64>| {
        stored
            .iter()
            .map(|event| pick(event).map(int).transpose())
            .collect::<Result<Vec<Option<i64>>, StoreError>>()
    };
    let numbers = column(&|event| Some(event.number))?;
    let holds = column(&|event| Some(event.hold))?;
    let times = column(&|event| Some(event.at_ms))?;
    let expiries = column(&|event| event.expires_ms)?;
    let captures = column(&|event| event.transfer)?;
    let kinds: Vec<&str> = stored.iter().map(|event| event.kind.as_str()).collect();
    let accounts: Vec<Option<&str>> = stored
        .iter()
        .map(|event| event.account.as_deref())
        .collect();
    let amounts: Vec<Option<&str>> = stored.iter().map(|event| event.amount.as_deref()).collect();
    let notes: Vec<Option<&str>> = stored.iter().map(|event| event.note.as_deref()).collect();
    let placers: Vec<Option<&str>> = stored.iter().map(|event| event.by.as_deref()).collect();
    let ratings: Vec<Option<&str>> = stored.iter().map(|event| event.rating.as_deref()).collect();
    let written = transaction
        .execute(
            &transaction
                .prepare_cached(
                    "INSERT INTO hold_events (number, hold, at_ms, kind, account, amount, \
                     expires_ms, note, transfer, placed_by, rating) \
                     SELECT number, hold, at_ms, kind, account, amount::numeric, expires_ms, \
                     note, transfer, placed_by, rating FROM unnest($1::bigint[], $2::bigint[], \
                     $3::bigint[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[], \
                     $9::bigint[], $10::text[], $11::text[]) AS e (number, hold, at_ms, kind, \
                     account, amount, expires_ms, note, transfer, placed_by, rating)",
                )
                .await?,
            &[
                &numbers, &holds, &times, &kinds, &accounts, &amounts, &expiries, &notes,
                &captures, &placers, &ratings,
            ],
        )
        .await;
    match written {
        Err(error) if is_unique_violation(&error) => {
            return Err(StoreError::Corrupt(
                "a hold event's number exists already; events are never overwritten: \
                 nothing was written"
                    .to_owned(),
            ));
        }
        other => other?,
    };
    Ok(())
}

fn not_in_suspense() -> StoreError {
    StoreError::Corrupt(
        "a reading to take out of suspense is no longer there (priced meanwhile?): nothing was changed"
            .to_owned(),
    )
}

fn registry_error(error: RegistryError) -> StoreError {
    StoreError::Registry(error)
}

impl PgStore {
    /// Every posted transfer, in order.
    fn transfers(&self) -> Result<Vec<Transfer>, StoreError> {
        self.transfers_numbered_from(0)
    }

    /// The transfers numbered `from` on, in order.
    fn transfers_numbered_from(&self, from: u64) -> Result<Vec<Transfer>, StoreError> {
        let from = int(from)?;
        self.block(async {
            let client = self.client().await?;
            // Fewer transfers than the caller saw committed: the database's
            // history went back (a restore, a failover to a replica that
            // missed commits). Nothing is decided on it.
            let next: i64 = client
                .query_one(
                    &client
                        .prepare_cached("SELECT coalesce(max(id) + 1, 0) FROM transfers")
                        .await?,
                    &[],
                )
                .await?
                .get(0);
            if next < from {
                return Err(StoreError::Corrupt(format!(
                    "{}: the database holds {next} transfers, but {from} were committed here \
                     before: was it restored, or failed over to a replica that missed \
                     commits? Nothing is written until an operator has looked",
                    self.shown
                )));
            }
            let rows = client
                .query(
                    &client.prepare_cached("SELECT id, debit, credit, amount::text, kind, pid, batch, uses, corrects, posted_ms, reference \
                     FROM transfers WHERE id >= $1 ORDER BY id").await?,
                    &[&from],
                )
                .await?;
            let mut transfers = Vec::with_capacity(rows.len());
            for row in &rows {
                let kind: &str = row.get(4);
                let corrupt = || StoreError::Corrupt(format!("transfer {}", row.get::<_, i64>(0)));
                let kind = match kind {
                    "deposit" => TransferKind::Deposit,
                    "withdrawal" => TransferKind::Withdrawal,
                    "use" => TransferKind::Use {
                        pid: Pid::parse(row.get::<_, Option<&str>>(5).ok_or_else(corrupt)?)
                            .map_err(|_| corrupt())?,
                        batch: BatchId::parse(row.get::<_, Option<&str>>(6).ok_or_else(corrupt)?)
                            .map_err(|_| corrupt())?,
                        uses: uint(row.get::<_, Option<i64>>(7).ok_or_else(corrupt)?)?,
                    },
                    "correction" => TransferKind::Correction {
                        of: TransferId(uint(row.get::<_, Option<i64>>(8).ok_or_else(corrupt)?)?),
                    },
                    "payment" => TransferKind::Payment {
                        pid: Pid::parse(row.get::<_, Option<&str>>(5).ok_or_else(corrupt)?)
                            .map_err(|_| corrupt())?,
                        reference: row
                            .get::<_, Option<&str>>(10)
                            .ok_or_else(corrupt)?
                            .to_owned(),
                    },
                    _ => return Err(corrupt()),
                };
                transfers.push(Transfer {
                    id: TransferId(uint(row.get(0))?),
                    debit: account_of(row.get(1))?,
                    credit: account_of(row.get(2))?,
                    amount: amount_of(row.get(3))?,
                    kind,
                    posted_ms: uint(row.get(9))?,
                });
            }
            Ok(transfers)
        })
    }

    /// Checks the balances kept against `sums` (the transfers' own), and
    /// that every record reads.
    async fn verify_rows(
        &self,
        sums: &HashMap<AccountId, Amount>,
        report: &mut crate::verify::Report,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached("SELECT account, balance::text FROM balances")
                    .await?,
                &[],
            )
            .await?;
        let mut kept: HashMap<AccountId, Amount> = HashMap::new();
        for row in &rows {
            match (account_of(row.get(0)), amount_of(row.get(1))) {
                (Ok(account), Ok(balance)) => {
                    kept.insert(account, balance);
                }
                _ => report.problem(format!(
                    "the balance row of {:?} does not read",
                    row.get::<_, &str>(0)
                )),
            }
        }
        for (account, sum) in sums {
            let balance = kept.get(account).copied().unwrap_or(Amount::ZERO);
            if balance != *sum {
                report.problem(format!(
                    "the balance kept for {account} is {balance}; its transfers add up to {sum}"
                ));
            }
        }
        for (account, balance) in &kept {
            if !sums.contains_key(account) && !balance.is_zero() {
                report.problem(format!(
                    "a balance of {balance} is kept for {account}, which no transfer moved"
                ));
            }
        }
        report.checked("balances kept", kept.len() as u64);
        for (table, what) in [
            ("customers", "customer records"),
            ("products", "product records"),
            ("meters", "meter records"),
            ("grants", "grant records"),
            ("suspense", "readings in suspense"),
            ("deposits", "deposits by reference"),
        ] {
            let rows = client
                .query(format!("SELECT record::text FROM {table}").as_str(), &[])
                .await?;
            let mut count = 0;
            for row in &rows {
                count += 1;
                let text: &str = row.get(0);
                let read = match table {
                    "customers" => from_json::<Customer>(text, what).and_then(|customer| {
                        match &customer.phone {
                            Some(phone) if registry::check_phone(phone).is_err() => {
                                Err(StoreError::Corrupt(format!(
                                    "customer {} has a telephone number in no valid form",
                                    customer.cid
                                )))
                            }
                            _ => Ok(()),
                        }
                    }),
                    "products" => from_json::<Product>(text, what).map(drop),
                    "meters" => from_json::<Meter>(text, what).map(drop),
                    "grants" => from_json::<Grant>(text, what).map(drop),
                    "suspense" => from_json::<Suspense>(text, what).map(drop),
                    _ => from_json::<DepositRecord>(text, what).map(drop),
                };
                if let Err(error) = read {
                    report.problem(error.to_string());
                }
            }
            report.checked(what, count);
        }
        Ok(())
    }

    async fn customer_in(
        client: &impl deadpool_postgres::GenericClient,
        cid: &Cid,
    ) -> Result<Option<Customer>, StoreError> {
        let row = client
            .query_opt(
                &client
                    .prepare_cached("SELECT record::text FROM customers WHERE cid = $1")
                    .await?,
                &[&cid.as_str()],
            )
            .await?;
        row.map(|row| from_json(row.get(0), "a customer record"))
            .transpose()
    }

    async fn meter_in(
        client: &impl deadpool_postgres::GenericClient,
        mid: &Mid,
        lock: bool,
    ) -> Result<Option<Meter>, StoreError> {
        let sql = if lock {
            "SELECT record::text FROM meters WHERE mid = $1 FOR UPDATE"
        } else {
            "SELECT record::text FROM meters WHERE mid = $1"
        };
        let row = client.query_opt(sql, &[&mid.as_str()]).await?;
        row.map(|row| from_json(row.get(0), "a meter record"))
            .transpose()
    }

    async fn grants_where(&self, column: &str, id: &str) -> Result<Vec<Grant>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT record::text FROM grants WHERE {column} = $1 ORDER BY number");
        let rows = client.query(sql.as_str(), &[&id]).await?;
        rows.iter()
            .map(|row| from_json(row.get(0), "a grant record"))
            .collect()
    }

    /// Changes meter `mid`'s record as stored, under its row lock.
    fn change_meter(
        &self,
        mid: &Mid,
        by: Actor,
        change: &(dyn Fn(&mut Meter) -> Result<(), RegistryError> + Sync),
    ) -> Result<Meter, StoreError> {
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            let unknown = || registry_error(RegistryError::UnknownMeter(*mid));
            let mut meter = Self::meter_in(&transaction, mid, true)
                .await?
                .ok_or_else(unknown)?;
            if matches!(by, Actor::Owner(owner) if owner != meter.owner) {
                return Err(unknown());
            }
            change(&mut meter).map_err(registry_error)?;
            transaction
                .execute(
                    &transaction
                        .prepare_cached(
                            "UPDATE meters SET record = ($2::text)::jsonb WHERE mid = $1",
                        )
                        .await?,
                    &[&mid.as_str(), &json(&meter)],
                )
                .await?;
            transaction.commit().await?;
            Ok(meter)
        })
    }

    async fn itemised_set_in(
        &self,
        at: &ItemisedAt,
        parts: Option<u16>,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError> {
        let key = &at.key;
        let corrupt = |what: String| {
            StoreError::Corrupt(format!("{what} of batch {} of {}", key.id, key.mid))
        };
        let client = self.client().await?;
        let rows = client
            .query(
                &client.prepare_cached("SELECT record FROM itemised WHERE arrived_ms = $1 AND mid = $2 AND batch = $3 ORDER BY part").await?,
                &[&int(at.arrived_ms)?, &key.mid.as_str(), &key.id.as_str()],
            )
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let bytes: &[u8] = row.get(0);
            let record = crate::itemised::decode(bytes)
                .ok_or_else(|| corrupt(format!("itemised record {}", records.len())))?;
            if usize::from(record.part) != records.len()
                || record.mid != key.mid
                || record.batch != key.id
            {
                return Err(corrupt(format!("itemised record {}", records.len())));
            }
            records.push(record);
        }
        match parts {
            Some(parts) if records.len() != usize::from(parts) => Err(corrupt(format!(
                "{} of {parts} itemised records",
                records.len()
            ))),
            None if records.is_empty() => Ok(None),
            _ => Ok(Some(records)),
        }
    }

    async fn deposit_in(
        transaction: &Transaction<'_>,
        reference: &Reference,
    ) -> Result<DepositRecord, StoreError> {
        let row = transaction
            .query_opt(
                &transaction
                    .prepare_cached(
                        "SELECT record::text FROM deposits WHERE reference = $1 FOR UPDATE",
                    )
                    .await?,
                &[&reference.as_str()],
            )
            .await?
            .ok_or_else(|| StoreError::Corrupt("no deposit record under this reference".into()))?;
        from_json(row.get(0), "a deposit record")
    }

    async fn resolve_in(
        &self,
        resolved: &[Suspense],
        transfers: &[Transfer],
        period_uses: &[(PeriodKey, u64)],
        free_uses: &[(PeriodKey, u64)],
        arrived_ms: u64,
        sets: &[RepricedItems],
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        self.still_holding(&transaction).await?;
        for set in sets {
            let ranges: Vec<(TransferId, TransferId)> =
                set.transfers.iter().map(|id| (*id, *id)).collect();
            write_itemised(
                &transaction,
                &set.key,
                &ranges,
                arrived_ms,
                &set.records,
                false,
            )
            .await?;
        }
        post(&transaction, transfers).await?;
        set_period_uses(&transaction, period_uses, free_uses).await?;
        let mut removed = 0;
        for record in resolved {
            removed += transaction
                .execute(
                    &transaction
                        .prepare_cached(
                            "DELETE FROM suspense WHERE mid = $1 AND batch = $2 AND seq = $3",
                        )
                        .await?,
                    &[
                        &record.mid.as_str(),
                        &record.batch.as_str(),
                        &seq_in(record.seq),
                    ],
                )
                .await?;
        }
        if removed != resolved.len() as u64 {
            // Priced by someone else meanwhile: posting again would charge
            // twice. Dropping the transaction rolls it all back.
            return Err(not_in_suspense());
        }
        self.commit_money(transaction).await?;
        Ok(())
    }
}

impl PgStore {
    /// Every evidence record: the reference, the service, the code.
    fn evidence_records(&self) -> Result<Vec<(String, Pid, String)>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT reference, service, request FROM payment_evidence ORDER BY reference",
                    &[],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    let reference: String = row.get(0);
                    let service: &str = row.get(1);
                    let service = Pid::parse(service).map_err(|_| {
                        StoreError::Corrupt(format!("the evidence record of {reference:?}"))
                    })?;
                    Ok((reference, service, row.get(2)))
                })
                .collect()
        })
    }
}

impl Store for PgStore {
    fn load_ledger(&self) -> Result<Ledger, StoreError> {
        Ok(Ledger::restore(self.transfers()?))
    }

    fn shared(&self) -> bool {
        true
    }

    fn device_codes(&self) -> crate::grants::DeviceCodes {
        crate::grants::DeviceCodes::shared(self.grant_codes())
    }

    fn unchanged_since_own_write(&self) -> bool {
        self.epoch_unchanged()
    }

    fn hold_ledger(&self) -> Result<crate::store::LedgerHold<'_>, StoreError> {
        let others_wrote = self.hold_ledger_lock()?;
        Ok(crate::store::LedgerHold::of(self, others_wrote))
    }

    fn transfers_from(&self, from: u64) -> Result<Vec<Transfer>, StoreError> {
        self.transfers_numbered_from(from)
    }

    fn verify(&self) -> (crate::verify::Report, Vec<Transfer>) {
        let mut report = crate::verify::Report::default();
        let transfers = match self.transfers() {
            Ok(transfers) => transfers,
            Err(error) => {
                report.problem(format!("the transfers cannot be read: {error}"));
                return (report, Vec::new());
            }
        };
        let sums = crate::verify::check_transfers(&transfers, &mut report);
        if let Err(error) = self.block(self.verify_rows(&sums, &mut report)) {
            report.problem(format!("the store cannot be read: {error}"));
        }
        let holds = crate::store::holds::check_hold_events(
            self.hold_events_from(0),
            &transfers,
            &mut report,
        );
        crate::store::payments::check_payment_requests(
            self.payment_requests(),
            &transfers,
            crate::store::payments::PaymentChecks {
                evidence_used: &|reference| self.evidence_used(reference),
                evidence_kept: Some(self.evidence_records()),
                holds: &holds,
                owner_of: &|pid| {
                    self.product(pid)
                        .map(|product| product.map(|product| product.owner))
                },
            },
            &mut report,
        );
        (report, transfers)
    }

    fn stage_batch(&self, key: &BatchKey, effects: BatchEffects<'_>) -> Result<(), StoreError> {
        self.stage_batch_itemised(key, effects, 0, &[])
    }

    fn sync(&self) -> Result<(), StoreError> {
        // Every change was durable when its transaction committed.
        Ok(())
    }

    fn stage_batch_itemised(
        &self,
        key: &BatchKey,
        effects: BatchEffects<'_>,
        arrived_ms: u64,
        itemised: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            self.still_holding(&transaction).await?;
            let digest: Option<&[u8]> = effects.digest.as_ref().map(|digest| &digest[..]);
            let inserted = transaction
                .execute(
                    &transaction.prepare_cached("INSERT INTO batches (mid, batch, digest, answer) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (mid, batch) DO NOTHING").await?,
                    &[&key.mid.as_str(), &key.id.as_str(), &digest, &effects.answer],
                )
                .await?;
            if inserted == 0 {
                return Err(StoreError::AlreadyApplied(key.id.to_string()));
            }
            let range: Vec<(TransferId, TransferId)> = effects
                .transfers
                .first()
                .zip(effects.transfers.last())
                .map(|(first, last)| (first.id, last.id))
                .into_iter()
                .collect();
            // The rest touches other tables and depends on nothing read
            // back: sent at once (tokio-postgres pipelines the statements
            // of one connection), so the database works through them while
            // the next one's rows are being encoded.
            let written = tokio::join!(
                write_itemised(&transaction, key, &range, arrived_ms, itemised, true),
                write_seq_range(&transaction, effects.seq_range),
                post(&transaction, effects.transfers),
                set_period_uses(&transaction, effects.period_uses, effects.free_uses),
                write_suspense(&transaction, effects.suspense),
            );
            first_cause([written.0, written.1, written.2, written.3, written.4])?;
            self.commit_money(transaction).await?;
            Ok(())
        })
    }

    fn itemised_batch(
        &self,
        key: &BatchKey,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let Some(row) = client
                .query_opt(
                    &client.prepare_cached("SELECT arrived_ms, parts FROM itemised_batches WHERE mid = $1 AND batch = $2").await?,
                    &[&key.mid.as_str(), &key.id.as_str()],
                )
                .await?
            else {
                return Ok(None);
            };
            drop(client);
            let at = ItemisedAt {
                key: key.clone(),
                arrived_ms: uint(row.get(0))?,
            };
            let parts = u16::try_from(row.get::<_, i32>(1)).map_err(|_| {
                StoreError::Corrupt(format!(
                    "the itemised index entry of batch {} of {}",
                    key.id, key.mid
                ))
            })?;
            self.itemised_set_in(&at, Some(parts)).await
        })
    }

    fn itemised_batch_of_transfer(&self, id: TransferId) -> Result<Option<ItemisedAt>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let Some(row) = client
                .query_opt(
                    &client
                        .prepare_cached(
                            "SELECT last, arrived_ms, mid, batch FROM itemised_transfers \
                     WHERE first <= $1 ORDER BY first DESC LIMIT 1",
                        )
                        .await?,
                    &[&int(id.0)?],
                )
                .await?
            else {
                return Ok(None);
            };
            if uint(row.get(0))? < id.0 {
                return Ok(None);
            }
            let corrupt =
                || StoreError::Corrupt(format!("the itemised index entry of transfer {}", id.0));
            let key = BatchKey {
                mid: Mid::parse(row.get(2)).map_err(|_| corrupt())?,
                id: BatchId::parse(row.get(3)).map_err(|_| corrupt())?,
            };
            Ok(Some(ItemisedAt {
                key,
                arrived_ms: uint(row.get(1))?,
            }))
        })
    }

    fn itemised_records_at(
        &self,
        at: &ItemisedAt,
    ) -> Result<Option<Vec<crate::itemised::Record>>, StoreError> {
        self.block(self.itemised_set_in(at, None))
    }

    fn resolve_suspense_itemised(
        &self,
        resolved: &[Suspense],
        transfers: &[Transfer],
        period_uses: &[(PeriodKey, u64)],
        free_uses: &[(PeriodKey, u64)],
        arrived_ms: u64,
        sets: &[RepricedItems],
    ) -> Result<(), StoreError> {
        self.block_retrying(|| {
            self.resolve_in(
                resolved,
                transfers,
                period_uses,
                free_uses,
                arrived_ms,
                sets,
            )
        })
    }

    fn prune_itemised(&self, before_ms: u64, records_max: usize) -> Result<usize, StoreError> {
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            let rows = transaction
                .query(
                    &transaction.prepare_cached("SELECT arrived_ms, mid, batch, part, record FROM itemised WHERE arrived_ms < $1 \
                     ORDER BY arrived_ms, mid, batch, part LIMIT $2 FOR UPDATE").await?,
                    &[&int(before_ms)?, &int(records_max as u64)?],
                )
                .await?;
            for row in &rows {
                let (arrived, mid, batch, part): (i64, &str, &str, i32) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                transaction
                    .execute(
                        &transaction.prepare_cached("DELETE FROM itemised WHERE arrived_ms = $1 AND mid = $2 AND batch = $3 AND part = $4").await?,
                        &[&arrived, &mid, &batch, &part],
                    )
                    .await?;
                let Some(record) = crate::itemised::decode(row.get(4)) else {
                    continue;
                };
                let mut firsts: Vec<u64> = Vec::new();
                if record.repriced {
                    // A re-pricing's records are found by their transfers only.
                    for item in &record.items {
                        if let crate::itemised::Outcome::Priced(priced) = &item.outcome
                            && let Some(transfer) = priced.transfer
                        {
                            firsts.push(transfer.0);
                        }
                    }
                } else if record.part == 0 {
                    // The first record of a batch takes its index entries with it.
                    transaction
                        .execute(
                            &transaction.prepare_cached("DELETE FROM itemised_batches WHERE mid = $1 AND batch = $2").await?,
                            &[&mid, &batch],
                        )
                        .await?;
                    if let Some((first, _)) = record.transfers {
                        firsts.push(first.0);
                    }
                }
                for first in firsts {
                    transaction
                        .execute(
                            &transaction.prepare_cached("DELETE FROM itemised_transfers WHERE first = $1").await?,
                            &[&int(first)?],
                        )
                        .await?;
                }
            }
            transaction.commit().await?;
            Ok(rows.len())
        })
    }

    fn hold_events_from(&self, from: u64) -> Result<Vec<crate::holds::HoldEvent>, StoreError> {
        let from = int(from)?;
        self.block(async {
            let client = self.client().await?;
            // Fewer events than the caller saw committed: the database's
            // history went back (as for transfers).
            let next: i64 = client
                .query_one(
                    &client
                        .prepare_cached("SELECT coalesce(max(number) + 1, 0) FROM hold_events")
                        .await?,
                    &[],
                )
                .await?
                .get(0);
            if next < from {
                return Err(StoreError::Corrupt(format!(
                    "{}: the database holds {next} hold events, but {from} were committed \
                     here before: was it restored, or failed over to a replica that missed \
                     commits? Nothing is written until an operator has looked",
                    self.shown
                )));
            }
            let rows = client
                .query(
                    &client
                        .prepare_cached(
                            "SELECT number, hold, at_ms, kind, account, amount::text, expires_ms, \
                             note, transfer, placed_by, rating FROM hold_events \
                             WHERE number >= $1 \
                             ORDER BY number",
                        )
                        .await?,
                    &[&from],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    let number: i64 = row.get(0);
                    let damaged = || StoreError::Corrupt(format!("hold event {number}"));
                    let unsigned = |value: i64| uint(value).map_err(|_| damaged());
                    crate::store::holds::StoredHoldEvent {
                        number: unsigned(number)?,
                        hold: unsigned(row.get(1))?,
                        at_ms: unsigned(row.get(2))?,
                        kind: row.get(3),
                        account: row.get(4),
                        amount: row.get(5),
                        expires_ms: row.get::<_, Option<i64>>(6).map(unsigned).transpose()?,
                        note: row.get(7),
                        transfer: row.get::<_, Option<i64>>(8).map(unsigned).transpose()?,
                        by: row.get(9),
                        rating: row.get(10),
                    }
                    .event()
                })
                .collect()
        })
    }

    fn payment_request(
        &self,
        service: &Pid,
        reference: &str,
    ) -> Result<Option<crate::payments::PaymentRequest>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &client
                        .prepare_cached(&format!(
                            "SELECT {PAYMENT_REQUEST_COLUMNS} FROM payment_requests \
                             WHERE service = $1 AND reference = $2"
                        ))
                        .await?,
                    &[&service.as_str(), &reference],
                )
                .await?;
            row.as_ref().map(payment_request_of).transpose()
        })
    }

    fn claim_nonce(
        &self,
        digest: &[u8; 32],
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let (expires, now) = (
            i64::try_from(expires_ms).unwrap_or(i64::MAX),
            i64::try_from(now_ms).unwrap_or(i64::MAX),
        );
        self.block(async {
            let client = self.client().await?;
            // A live claim stays; an expired one is taken over.
            let claimed = client
                .execute(
                    &client
                        .prepare_cached(
                            "INSERT INTO wsse_nonces (digest, expires_ms) VALUES ($1, $2) \
                             ON CONFLICT (digest) DO UPDATE SET expires_ms = EXCLUDED.expires_ms \
                             WHERE wsse_nonces.expires_ms < $3",
                        )
                        .await?,
                    &[&&digest[..], &expires, &now],
                )
                .await?;
            // Now and then (one claim in 256), the claims past their window go.
            if digest[0] == 0 {
                client
                    .execute("DELETE FROM wsse_nonces WHERE expires_ms < $1", &[&now])
                    .await?;
            }
            Ok(claimed == 1)
        })
    }

    fn evidence_used(&self, reference: &str) -> Result<Option<(Pid, String)>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &client
                        .prepare_cached(
                            "SELECT service, request FROM payment_evidence WHERE reference = $1",
                        )
                        .await?,
                    &[&reference],
                )
                .await?;
            row.map(|row| {
                let service: &str = row.get(0);
                Pid::parse(service)
                    .map(|pid| (pid, row.get(1)))
                    .map_err(|_| {
                        StoreError::Corrupt(format!("the evidence record of {reference:?}"))
                    })
            })
            .transpose()
        })
    }

    fn payment_requests(&self) -> Result<Vec<crate::payments::PaymentRequest>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {PAYMENT_REQUEST_COLUMNS} FROM payment_requests \
                         ORDER BY service, reference"
                    ),
                    &[],
                )
                .await?;
            rows.iter().map(payment_request_of).collect()
        })
    }

    fn stage_holds(
        &self,
        events: &[crate::holds::HoldEvent],
        transfers: &[Transfer],
        request: Option<&crate::payments::PaymentRequest>,
    ) -> Result<(), StoreError> {
        if let Some(request) = request {
            request.check().map_err(StoreError::Corrupt)?;
        }
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            self.still_holding(&transaction).await?;
            // The transfers first: a capture's event names its transfer.
            post(&transaction, transfers).await?;
            insert_hold_events(&transaction, events).await?;
            if let Some(request) = request {
                insert_payment_requests(&transaction, std::slice::from_ref(request)).await?;
            }
            self.commit_money(transaction).await?;
            Ok(())
        })
    }

    fn stage_transfers(&self, transfers: &[Transfer]) -> Result<(), StoreError> {
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            self.still_holding(&transaction).await?;
            post(&transaction, transfers).await?;
            self.commit_money(transaction).await?;
            Ok(())
        })
    }

    fn period_uses(&self, key: &PeriodKey) -> Result<u64, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &client.prepare_cached("SELECT uses FROM period_uses WHERE payer = $1 AND pid = $2 AND month = $3").await?,
                    &[
                        &key.payer.as_str(),
                        &key.pid.as_str(),
                        &i32::try_from(key.month).unwrap_or(i32::MAX),
                    ],
                )
                .await?;
            row.map_or(Ok(0), |row| uint(row.get(0)))
        })
    }

    fn period_uses_many(&self, keys: &[PeriodKey]) -> Result<Vec<u64>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let payers: Vec<&str> = keys.iter().map(|key| key.payer.as_str()).collect();
        let pids: Vec<&str> = keys.iter().map(|key| key.pid.as_str()).collect();
        let months: Vec<i32> = keys
            .iter()
            .map(|key| i32::try_from(key.month).unwrap_or(i32::MAX))
            .collect();
        self.block(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    &client.prepare_cached("SELECT coalesce(p.uses, 0) \
                     FROM unnest($1::text[], $2::text[], $3::integer[]) WITH ORDINALITY AS k (payer, pid, month, at) \
                     LEFT JOIN period_uses p ON (p.payer, p.pid, p.month) = (k.payer, k.pid, k.month) \
                     ORDER BY k.at").await?,
                    &[&payers, &pids, &months],
                )
                .await?;
            rows.iter().map(|row| uint(row.get(0))).collect()
        })
    }

    fn free_uses(&self, payer: &Cid, month: u32) -> Result<Vec<(Pid, u64)>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    &client
                        .prepare_cached(
                            "SELECT pid, uses FROM free_uses WHERE payer = $1 AND month = $2",
                        )
                        .await?,
                    &[&payer.as_str(), &i32::try_from(month).unwrap_or(i32::MAX)],
                )
                .await?;
            let mut found = Vec::with_capacity(rows.len());
            for row in &rows {
                let pid = Pid::parse(row.get(0))
                    .map_err(|_| StoreError::Corrupt("a free-use count".to_owned()))?;
                found.push((pid, uint(row.get(1))?));
            }
            found.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            Ok(found)
        })
    }

    fn suspense(&self) -> Result<Vec<Suspense>, StoreError> {
        self.suspense_page(None, usize::MAX)
    }

    fn suspense_page(
        &self,
        after: Option<&SuspenseCursor>,
        limit: usize,
    ) -> Result<Vec<Suspense>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = match after {
                None => {
                    client
                        .query(
                            &client.prepare_cached("SELECT record::text FROM suspense ORDER BY mid, batch, seq LIMIT $1").await?,
                            &[&limit],
                        )
                        .await?
                }
                Some(cursor) => client
                    .query(
                        &client.prepare_cached("SELECT record::text FROM suspense WHERE (mid, batch, seq) > ($1, $2, $3) \
                             ORDER BY mid, batch, seq LIMIT $4").await?,
                        &[
                            &cursor.mid.as_str(),
                            &cursor.batch.as_str(),
                            &seq_in(cursor.seq),
                            &limit,
                        ],
                    )
                    .await?,
            };
            rows.iter()
                .map(|row| from_json(row.get(0), "a suspense record"))
                .collect()
        })
    }

    fn suspense_count(&self) -> Result<usize, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    &client
                        .prepare_cached("SELECT count(*) FROM suspense")
                        .await?,
                    &[],
                )
                .await?;
            Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(usize::MAX))
        })
    }

    fn resolve_suspense(
        &self,
        resolved: &[Suspense],
        transfers: &[Transfer],
        period_uses: &[(PeriodKey, u64)],
    ) -> Result<(), StoreError> {
        self.block_retrying(|| self.resolve_in(resolved, transfers, period_uses, &[], 0, &[]))
    }

    fn overlapping_range(&self, range: &SeqRange) -> Result<Option<(u64, u64)>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            // Stored ranges of one instance never overlap, so the one
            // starting last at or before `range.last` is the only one that can.
            let row = client
                .query_opt(
                    &client.prepare_cached("SELECT first, last FROM seq_ranges WHERE mid = $1 AND instance = $2 AND first <= $3 \
                     ORDER BY first DESC LIMIT 1").await?,
                    &[&range.mid.as_str(), &range.instance, &seq_in(range.last)],
                )
                .await?;
            Ok(row.and_then(|row| {
                let (first, last) = (seq_out(row.get(0)), seq_out(row.get(1)));
                (last >= range.first).then_some((first, last))
            }))
        })
    }

    fn applied_batch(&self, key: &BatchKey) -> Result<Option<AppliedBatch>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &client
                        .prepare_cached(
                            "SELECT digest, answer FROM batches WHERE mid = $1 AND batch = $2",
                        )
                        .await?,
                    &[&key.mid.as_str(), &key.id.as_str()],
                )
                .await?;
            row.map(|row| {
                let digest = match row.get::<_, Option<&[u8]>>(0) {
                    None => None,
                    Some(bytes) => Some(bytes.try_into().map_err(|_| {
                        StoreError::Corrupt(format!("the digest of batch {}", key.id))
                    })?),
                };
                Ok(AppliedBatch {
                    digest,
                    answer: row.get::<_, &[u8]>(1).to_vec(),
                })
            })
            .transpose()
        })
    }

    fn create_customer(&self, bid: &Bid, name: &str, email: &str) -> Result<Customer, StoreError> {
        self.register_customer(
            bid,
            Registration {
                name: name.to_owned(),
                email: email.to_owned(),
                profile: None,
                password: None,
            },
        )
    }

    fn register_customer(
        &self,
        bid: &Bid,
        registration: Registration,
    ) -> Result<Customer, StoreError> {
        registry::check_text("name", &registration.name, registry::NAME_BYTES_MAX)?;
        registry::check_email(&registration.email)?;
        let email_key = registration.email.to_lowercase();
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            let taken = transaction
                .query_opt(&transaction.prepare_cached("SELECT 1 FROM customers WHERE email = $1").await?, &[&email_key])
                .await?;
            if taken.is_some() {
                return Err(registry_error(RegistryError::EmailTaken));
            }
            let serial = next_serial(&transaction, "C").await?;
            let cid = registry::customer_id(bid, serial)?;
            let customer = Customer {
                cid,
                name: registration.name.clone(),
                email: registration.email.clone(),
                credit_limit: Amount::ZERO,
                denied: false,
                profile: registration.profile.clone(),
                password: registration.password.clone(),
                phone: None,
            };
            let inserted = transaction
                .execute(
                    &transaction.prepare_cached("INSERT INTO customers (cid, email, record) VALUES ($1, $2, ($3::text)::jsonb)").await?,
                    &[&cid.as_str(), &email_key, &json(&customer)],
                )
                .await;
            match inserted {
                Err(error) if is_unique_violation(&error) => {
                    return Err(registry_error(RegistryError::EmailTaken));
                }
                other => other?,
            };
            transaction.commit().await?;
            Ok(customer)
        })
    }

    fn customer(&self, cid: &Cid) -> Result<Option<Customer>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            Self::customer_in(&client, cid).await
        })
    }

    fn customers(&self, cids: &[Cid]) -> Result<Vec<Option<Customer>>, StoreError> {
        if cids.is_empty() {
            return Ok(Vec::new());
        }
        let asked: Vec<&str> = cids.iter().map(Cid::as_str).collect();
        self.block(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    &client
                        .prepare_cached(
                            "SELECT c.record::text \
                     FROM unnest($1::text[]) WITH ORDINALITY AS k (cid, at) \
                     LEFT JOIN customers c ON c.cid = k.cid ORDER BY k.at",
                        )
                        .await?,
                    &[&asked],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    row.get::<_, Option<&str>>(0)
                        .map(|text| from_json(text, "a customer record"))
                        .transpose()
                })
                .collect()
        })
    }

    fn customer_by_email(&self, email: &str) -> Result<Option<Customer>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &client
                        .prepare_cached("SELECT record::text FROM customers WHERE email = $1")
                        .await?,
                    &[&email.to_lowercase()],
                )
                .await?;
            row.map(|row| from_json(row.get(0), "a customer record"))
                .transpose()
        })
    }

    fn customer_by_phone(&self, phone: &str) -> Result<Option<Customer>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &client
                        .prepare_cached(
                            "SELECT record::text FROM customers \
                             WHERE record ? 'phone' AND record ->> 'phone' = $1",
                        )
                        .await?,
                    &[&phone],
                )
                .await?;
            row.map(|row| from_json(row.get(0), "a customer record"))
                .transpose()
        })
    }

    fn change_customer(
        &self,
        cid: &Cid,
        change: &dyn Fn(&mut Customer),
    ) -> Result<Customer, StoreError> {
        // Read and changed under the row's lock: a concurrent change waits,
        // then applies to this one's result (never to a stale copy).
        let mut client = self.block(self.client())?;
        let transaction = self.block(client.transaction())?;
        let row = self.block(transaction.query_opt(
            "SELECT record::text FROM customers WHERE cid = $1 FOR UPDATE",
            &[&cid.as_str()],
        ))?;
        let Some(row) = row else {
            return Err(registry_error(RegistryError::UnknownCustomer(*cid)));
        };
        let old: Customer = from_json(row.get(0), "a customer record")?;
        let mut customer = old.clone();
        change(&mut customer);
        customer.cid = old.cid;
        registry::check_text("name", &customer.name, registry::NAME_BYTES_MAX)?;
        registry::check_email(&customer.email)?;
        let new_email = customer.email.to_lowercase();
        if new_email != old.email.to_lowercase() {
            let taken = self.block(
                transaction.query_opt("SELECT 1 FROM customers WHERE email = $1", &[&new_email]),
            )?;
            if taken.is_some() {
                return Err(registry_error(RegistryError::EmailTaken));
            }
        }
        if let Some(phone) = &customer.phone {
            registry::check_phone(phone)?;
            if old.phone.as_ref() != Some(phone) {
                let taken = self.block(transaction.query_opt(
                    "SELECT 1 FROM customers WHERE record ? 'phone' AND record ->> 'phone' = $1",
                    &[phone],
                ))?;
                if taken.is_some() {
                    return Err(registry_error(RegistryError::PhoneTaken));
                }
            }
        }
        let updated = self.block(transaction.execute(
            "UPDATE customers SET email = $2, record = ($3::text)::jsonb WHERE cid = $1",
            &[&cid.as_str(), &new_email, &json(&customer)],
        ));
        match updated {
            Err(error) if is_unique_violation(&error) => {
                let on_phone = error
                    .as_db_error()
                    .and_then(|error| error.constraint())
                    .is_some_and(|constraint| constraint == "customers_phone");
                return Err(registry_error(if on_phone {
                    RegistryError::PhoneTaken
                } else {
                    RegistryError::EmailTaken
                }));
            }
            other => other?,
        };
        self.block(transaction.commit())?;
        Ok(customer)
    }

    fn create_product(&self, bid: &Bid, new: NewProduct<'_>) -> Result<Product, StoreError> {
        let NewProduct {
            owner,
            name,
            description,
            terms,
            taca,
            max_price,
        } = new;
        if !max_price.is_positive() {
            return Err(RegistryError::BadMaxPrice(max_price).into());
        }
        registry::check_text("name", name, registry::NAME_BYTES_MAX)?;
        if !description.is_empty() {
            registry::check_text("description", description, registry::TERMS_BYTES_MAX)?;
        }
        registry::check_text("terms", terms, registry::TERMS_BYTES_MAX)?;
        let hash = TacaHash::of(taca);
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            if Self::customer_in(&transaction, owner).await?.is_none() {
                return Err(RegistryError::UnknownCustomer(*owner).into());
            }
            transaction
                .execute(
                    &transaction.prepare_cached("INSERT INTO tacas (hash, module) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING").await?,
                    &[&hash.to_string(), &taca],
                )
                .await?;
            let serial = next_serial(&transaction, "P").await?;
            let (pid, test_pid) = registry::product_ids(bid, serial)?;
            let product = Product {
                pid,
                test_pid,
                owner: *owner,
                name: name.to_owned(),
                description: description.to_owned(),
                terms: terms.to_owned(),
                taca: hash,
                max_price: Some(max_price),
                components: Vec::new(),
            };
            transaction
                .execute(
                    &transaction.prepare_cached("INSERT INTO products (pid, test_pid, owner, taca, record) \
                     VALUES ($1, $2, $3, $4, ($5::text)::jsonb)").await?,
                    &[
                        &pid.as_str(),
                        &test_pid.as_str(),
                        &owner.as_str(),
                        &hash.to_string(),
                        &json(&product),
                    ],
                )
                .await?;
            transaction.commit().await?;
            Ok(product)
        })
    }

    fn product(&self, pid: &Pid) -> Result<Option<Product>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &client
                        .prepare_cached(
                            "SELECT record::text FROM products WHERE pid = $1 OR test_pid = $1",
                        )
                        .await?,
                    &[&pid.as_str()],
                )
                .await?;
            row.map(|row| from_json(row.get(0), "a product record"))
                .transpose()
        })
    }

    fn set_components(
        &self,
        pid: &Pid,
        owner: Option<&Cid>,
        components: &[Pid],
    ) -> Result<Product, StoreError> {
        if components.len() > registry::COMPONENTS_MAX {
            return Err(RegistryError::TooManyComponents(registry::COMPONENTS_MAX).into());
        }
        let mut declared: Vec<Pid> = Vec::with_capacity(components.len());
        for component in components {
            let found = self.product(component)?;
            if found.is_none_or(|found| found.pid != *component) || component == pid {
                return Err(RegistryError::BadComponent(*component).into());
            }
            if !declared.contains(component) {
                declared.push(*component);
            }
        }
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            let unknown = || registry_error(RegistryError::UnknownProduct(*pid));
            let row = transaction
                .query_opt(
                    &transaction
                        .prepare_cached(
                            "SELECT record::text FROM products WHERE pid = $1 FOR UPDATE",
                        )
                        .await?,
                    &[&pid.as_str()],
                )
                .await?
                .ok_or_else(unknown)?;
            let mut product: Product = from_json(row.get(0), "a product record")?;
            if owner.is_some_and(|owner| *owner != product.owner) {
                return Err(unknown());
            }
            product.components = declared.clone();
            transaction
                .execute(
                    &transaction
                        .prepare_cached(
                            "UPDATE products SET record = ($2::text)::jsonb WHERE pid = $1",
                        )
                        .await?,
                    &[&pid.as_str(), &json(&product)],
                )
                .await?;
            transaction.commit().await?;
            Ok(product)
        })
    }

    fn taca_module(&self, hash: &TacaHash) -> Result<Option<Vec<u8>>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &client
                        .prepare_cached("SELECT module FROM tacas WHERE hash = $1")
                        .await?,
                    &[&hash.to_string()],
                )
                .await?;
            Ok(row.map(|row| row.get::<_, Vec<u8>>(0)))
        })
    }

    fn create_meter_for(
        &self,
        bid: &Bid,
        owner: &Cid,
        service: Option<&Pid>,
    ) -> Result<Meter, StoreError> {
        let secret_hex = registry::new_meter_secret();
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            // The owner's row is locked: two meters made at once are counted
            // one after the other against the limit.
            let known = transaction
                .query_opt(
                    &transaction.prepare_cached("SELECT 1 FROM customers WHERE cid = $1 FOR UPDATE").await?,
                    &[&owner.as_str()],
                )
                .await?;
            if known.is_none() {
                return Err(RegistryError::UnknownCustomer(*owner).into());
            }
            let count: i64 = transaction
                .query_one(
                    &transaction.prepare_cached("SELECT count(*) FROM meters WHERE owner = $1").await?,
                    &[&owner.as_str()],
                )
                .await?
                .get(0);
            if uint(count)? >= registry::METERS_PER_CUSTOMER_MAX as u64 {
                return Err(RegistryError::TooManyMeters(registry::METERS_PER_CUSTOMER_MAX).into());
            }
            let serial = next_serial(&transaction, "M").await?;
            let mid = registry::meter_id(bid, serial)?;
            let meter = Meter {
                mid,
                owner: *owner,
                secret_hex: secret_hex.clone(),
                previous: None,
                rotated: None,
                revoked: None,
                service: service.cloned(),
            };
            transaction
                .execute(
                    &transaction.prepare_cached("INSERT INTO meters (mid, owner, record) VALUES ($1, $2, ($3::text)::jsonb)").await?,
                    &[&mid.as_str(), &owner.as_str(), &json(&meter)],
                )
                .await?;
            transaction.commit().await?;
            Ok(meter)
        })
    }

    fn meter(&self, mid: &Mid) -> Result<Option<Meter>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            Self::meter_in(&client, mid, false).await
        })
    }

    fn products_of(&self, owner: &Cid) -> Result<Vec<Product>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    &client
                        .prepare_cached("SELECT record::text FROM products WHERE owner = $1")
                        .await?,
                    &[&owner.as_str()],
                )
                .await?;
            let mut products: Vec<Product> = rows
                .iter()
                .map(|row| from_json(row.get(0), "a product record"))
                .collect::<Result<_, _>>()?;
            products.sort_by_key(|product| serial_of(product.pid.as_str()));
            Ok(products)
        })
    }

    fn meters_of(&self, owner: &Cid) -> Result<Vec<Meter>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    &client
                        .prepare_cached("SELECT record::text FROM meters WHERE owner = $1")
                        .await?,
                    &[&owner.as_str()],
                )
                .await?;
            let mut meters: Vec<Meter> = rows
                .iter()
                .map(|row| from_json(row.get(0), "a meter record"))
                .collect::<Result<_, _>>()?;
            meters.sort_by_key(|meter| serial_of(meter.mid.as_str()));
            Ok(meters)
        })
    }

    fn rotate_meter_secret(
        &self,
        mid: &Mid,
        by: Actor,
        at_ms: u64,
        grace_ms: u64,
    ) -> Result<Meter, StoreError> {
        if grace_ms > registry::ROTATION_GRACE_MS_MAX {
            return Err(RegistryError::GraceTooLong.into());
        }
        let secret_hex = registry::new_meter_secret();
        self.change_meter(mid, by, &|meter| {
            if meter.revoked.is_some() {
                return Err(RegistryError::MeterRevoked(meter.mid));
            }
            let old = std::mem::replace(&mut meter.secret_hex, secret_hex.clone());
            meter.previous = (grace_ms > 0).then(|| PreviousSecret {
                secret_hex: old,
                valid_until_ms: at_ms.saturating_add(grace_ms),
            });
            meter.rotated = Some(Change { at_ms, by });
            Ok(())
        })
    }

    fn revoke_meter(&self, mid: &Mid, by: Actor, at_ms: u64) -> Result<Meter, StoreError> {
        self.change_meter(mid, by, &|meter| {
            if meter.revoked.is_none() {
                meter.revoked = Some(Change { at_ms, by });
                meter.previous = None;
            }
            Ok(())
        })
    }

    fn retire_previous_secret(&self, mid: &Mid, current_hex: &str) -> Result<(), StoreError> {
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            let Some(mut meter) = Self::meter_in(&transaction, mid, true).await? else {
                return Ok(());
            };
            if meter.previous.is_some() && meter.secret_hex == current_hex {
                meter.previous = None;
                transaction
                    .execute(
                        &transaction
                            .prepare_cached(
                                "UPDATE meters SET record = ($2::text)::jsonb WHERE mid = $1",
                            )
                            .await?,
                        &[&mid.as_str(), &json(&meter)],
                    )
                    .await?;
            }
            transaction.commit().await?;
            Ok(())
        })
    }

    fn create_grant(&self, new: NewGrant) -> Result<Grant, StoreError> {
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            if Self::customer_in(&transaction, &new.cid).await?.is_none() {
                return Err(RegistryError::UnknownCustomer(new.cid).into());
            }
            // The meter's row is locked: its grants change one at a time.
            match Self::meter_in(&transaction, &new.mid, true).await? {
                None => return Err(RegistryError::UnknownMeter(new.mid).into()),
                Some(meter) if meter.revoked.is_some() => {
                    return Err(RegistryError::MeterRevoked(new.mid).into());
                }
                Some(_) => {}
            }
            let rows = transaction
                .query(
                    &transaction.prepare_cached("SELECT record::text FROM grants WHERE mid = $1 ORDER BY number").await?,
                    &[&new.mid.as_str()],
                )
                .await?;
            let of_meter: Vec<Grant> = rows
                .iter()
                .map(|row| from_json(row.get(0), "a grant record"))
                .collect::<Result<_, _>>()?;
            let live = of_meter
                .iter()
                .filter(|grant| grant.is_live_at(new.created_ms))
                .count();
            if live >= registry::GRANTS_PER_METER_MAX {
                return Err(RegistryError::TooManyGrants(registry::GRANTS_PER_METER_MAX).into());
            }
            // A new grant of the same customer for the same users of the
            // same meter replaces the ones before it (they end as it starts).
            for old in of_meter.iter().filter(|old| {
                old.cid == new.cid && old.scope == new.scope && old.revoked_ms.is_none()
            }) {
                let mut old = old.clone();
                old.revoked_ms = Some(new.created_ms.max(old.created_ms));
                transaction
                    .execute(
                        &transaction.prepare_cached("UPDATE grants SET record = ($2::text)::jsonb WHERE number = $1").await?,
                        &[&int(old.id)?, &json(&old)],
                    )
                    .await?;
            }
            let number = next_serial(&transaction, "G").await?;
            let grant = Grant {
                id: number,
                mid: new.mid,
                cid: new.cid,
                scope: new.scope.clone(),
                label: new.label.clone(),
                created_ms: new.created_ms,
                expires_ms: new.expires_ms,
                revoked_ms: None,
            };
            transaction
                .execute(
                    &transaction.prepare_cached("INSERT INTO grants (number, mid, cid, record) VALUES ($1, $2, $3, ($4::text)::jsonb)").await?,
                    &[
                        &int(number)?,
                        &new.mid.as_str(),
                        &new.cid.as_str(),
                        &json(&grant),
                    ],
                )
                .await?;
            transaction.commit().await?;
            Ok(grant)
        })
    }

    fn grants_of_meter(&self, mid: &Mid) -> Result<Vec<Grant>, StoreError> {
        self.block(self.grants_where("mid", mid.as_str()))
    }

    fn grants_of_customer(&self, cid: &Cid) -> Result<Vec<Grant>, StoreError> {
        self.block(self.grants_where("cid", cid.as_str()))
    }

    fn revoke_grant(&self, id: u64, payer: Option<&Cid>, at_ms: u64) -> Result<Grant, StoreError> {
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            let unknown = || registry_error(RegistryError::UnknownGrant(id));
            let row = transaction
                .query_opt(
                    &transaction
                        .prepare_cached(
                            "SELECT record::text FROM grants WHERE number = $1 FOR UPDATE",
                        )
                        .await?,
                    &[&int(id)?],
                )
                .await?
                .ok_or_else(unknown)?;
            let mut grant: Grant = from_json(row.get(0), "a grant record")?;
            if payer.is_some_and(|payer| *payer != grant.cid) {
                return Err(unknown());
            }
            if grant.revoked_ms.is_none() {
                grant.revoked_ms = Some(at_ms.max(grant.created_ms));
                transaction
                    .execute(
                        &transaction
                            .prepare_cached(
                                "UPDATE grants SET record = ($2::text)::jsonb WHERE number = $1",
                            )
                            .await?,
                        &[&int(id)?, &json(&grant)],
                    )
                    .await?;
            }
            transaction.commit().await?;
            Ok(grant)
        })
    }

    fn deposit(&self, reference: &Reference) -> Result<Option<DepositRecord>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &client
                        .prepare_cached("SELECT record::text FROM deposits WHERE reference = $1")
                        .await?,
                    &[&reference.as_str()],
                )
                .await?;
            row.map(|row| from_json(row.get(0), "a deposit record"))
                .transpose()
        })
    }

    fn begin_deposit(
        &self,
        reference: &Reference,
        intent: &DepositRecord,
    ) -> Result<(DepositRecord, bool), StoreError> {
        self.block(async {
            let client = self.client().await?;
            let inserted = client
                .execute(
                    &client.prepare_cached("INSERT INTO deposits (reference, record) VALUES ($1, ($2::text)::jsonb) \
                     ON CONFLICT (reference) DO NOTHING").await?,
                    &[&reference.as_str(), &json(intent)],
                )
                .await?;
            if inserted == 1 {
                return Ok((intent.clone(), true));
            }
            let row = client
                .query_one(
                    &client.prepare_cached("SELECT record::text FROM deposits WHERE reference = $1").await?,
                    &[&reference.as_str()],
                )
                .await?;
            Ok((from_json(row.get(0), "a deposit record")?, false))
        })
    }

    fn deposit_collected(
        &self,
        reference: &Reference,
        processor: &str,
    ) -> Result<DepositRecord, StoreError> {
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            let mut record = Self::deposit_in(&transaction, reference).await?;
            if record.state == DepositState::Collecting {
                record.state = DepositState::Collected {
                    processor: processor.to_owned(),
                };
                transaction
                    .execute(
                        &transaction.prepare_cached("UPDATE deposits SET record = ($2::text)::jsonb WHERE reference = $1").await?,
                        &[&reference.as_str(), &json(&record)],
                    )
                    .await?;
            }
            transaction.commit().await?;
            Ok(record)
        })
    }

    fn stage_deposit(
        &self,
        reference: &Reference,
        transfer: &Transfer,
    ) -> Result<DepositRecord, StoreError> {
        self.block_retrying(|| async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            self.still_holding(&transaction).await?;
            let mut record = Self::deposit_in(&transaction, reference).await?;
            let processor = match &record.state {
                DepositState::Posted { .. } => return Ok(record),
                DepositState::Collecting => {
                    return Err(StoreError::Corrupt(
                        "a deposit not collected cannot be posted".to_owned(),
                    ));
                }
                DepositState::Collected { processor } => processor.clone(),
            };
            post(&transaction, std::slice::from_ref(transfer)).await?;
            record.state = DepositState::Posted {
                processor,
                transfer: transfer.id.0,
            };
            transaction
                .execute(
                    &transaction
                        .prepare_cached(
                            "UPDATE deposits SET record = ($2::text)::jsonb WHERE reference = $1",
                        )
                        .await?,
                    &[&reference.as_str(), &json(&record)],
                )
                .await?;
            self.commit_money(transaction).await?;
            Ok(record)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_of_a_failed_pipeline_is_reported_not_the_aborted_statements_after_it() {
        let aborted = || {
            Err(StoreError::Database(format!(
                "current transaction is aborted, commands ignored until end of transaction block {ABORTED}"
            )))
        };
        let conflict = Err(StoreError::Conflict("could not serialize access".into()));
        let result = first_cause([Ok(()), aborted(), conflict, aborted()]);
        assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");
        let result = first_cause([aborted(), Ok(())]);
        assert!(matches!(result, Err(StoreError::Database(_))), "{result:?}");
        assert!(first_cause([Ok(()), Ok(())]).is_ok());
    }
}
