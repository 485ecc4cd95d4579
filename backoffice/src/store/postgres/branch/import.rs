//! Writing a whole branch into an empty database (`backoffice
//! migrate-store`): every chunk in one transaction, so the database holds
//! all of the branch or none of it.

use std::sync::mpsc::Receiver;

use super::{
    Transaction, insert_hold_events, insert_payment_requests, int, json, post, seq_in,
    set_period_uses,
};
use crate::store::StoreError;
use crate::store::moving::{Chunk, ItemisedTransfers};
use crate::store::postgres::PgStore;

/// The tables `migrate-store` fills, as the chunks name them.
pub const TABLES: &[&str] = &[
    "serials",
    "customers",
    "tacas",
    "products",
    "meters",
    "grants",
    "batches",
    "seq_ranges",
    "transfers",
    "hold_events",
    "payment_requests",
    "payment_evidence",
    "period_uses",
    "free_uses",
    "suspense",
    "itemised",
    "itemised_batches",
    "itemised_transfers",
    "deposits",
];

impl PgStore {
    /// Rows in each of [`TABLES`], in order.
    pub fn table_counts(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        self.block(async {
            let client = self.client().await?;
            let mut counts = Vec::with_capacity(TABLES.len());
            for table in TABLES {
                let row = client
                    .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                    .await?;
                counts.push((*table, row.get::<_, i64>(0).unsigned_abs()));
            }
            Ok(counts)
        })
    }

    /// Writes every chunk `chunks` brings, in one transaction committed
    /// only when the sender says it is done (`Ok(None)`); an error it sends,
    /// or a sender gone without saying so (a panic), rolls everything back.
    /// Refuses a database that holds any record in the tables it fills. `progress` hears each chunk's table and
    /// its rows.
    pub fn import(
        &self,
        chunks: Receiver<Result<Option<Chunk>, StoreError>>,
        progress: &mut (dyn FnMut(&'static str, u64) + Send),
    ) -> Result<(), StoreError> {
        self.block(async move {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            // A whole branch may take longer than any one call.
            transaction
                .batch_execute("SET LOCAL statement_timeout = 0")
                .await?;
            // Nodes serving the database meanwhile wait for the tables
            // their batches and registrations write, and catch up after.
            transaction
                .execute(
                    "LOCK TABLE serials, customers, transfers, batches, hold_events, payment_requests \
                     IN EXCLUSIVE MODE",
                    &[],
                )
                .await?;
            let counts: Vec<String> = TABLES
                .iter()
                .chain(&["balances"])
                .map(|table| format!("(SELECT count(*) FROM {table})"))
                .collect();
            let held: i64 = transaction
                .query_one(&format!("SELECT {}", counts.join(" + ")), &[])
                .await?
                .get(0);
            if held != 0 {
                return Err(StoreError::WrongStore(format!(
                    "the database at {} already holds a branch ({held} records): migrate-store \
                     copies into an empty one only",
                    self.shown
                )));
            }
            // Blocking for the next chunk: nothing of this connection is
            // under way meanwhile.
            loop {
                let chunk = match chunks.recv() {
                    Ok(Ok(Some(chunk))) => chunk,
                    Ok(Ok(None)) => break,
                    Ok(Err(error)) => return Err(error),
                    Err(_) => {
                        return Err(StoreError::Corrupt(
                            "reading the sled store stopped before it ended".into(),
                        ));
                    }
                };
                let rows = chunk.rows();
                write(&transaction, chunk).await?;
                for (table, count) in rows {
                    progress(table, count);
                }
            }
            transaction.commit().await?;
            Ok(())
        })
    }
}

async fn write(transaction: &Transaction<'_>, chunk: Chunk) -> Result<(), StoreError> {
    match chunk {
        Chunk::Serials(rows) => {
            let (kinds, next): (Vec<String>, Vec<i64>) = rows
                .into_iter()
                .map(|(kind, next)| Ok((kind, int(next)?)))
                .collect::<Result<Vec<_>, StoreError>>()?
                .into_iter()
                .unzip();
            transaction
                .execute(
                    "INSERT INTO serials (kind, next) SELECT * FROM unnest($1::text[], $2::bigint[])",
                    &[&kinds, &next],
                )
                .await?;
        }
        Chunk::Customers(rows) => {
            let cids: Vec<&str> = rows.iter().map(|c| c.cid.as_str()).collect();
            let emails: Vec<String> = rows.iter().map(|c| c.email.to_lowercase()).collect();
            let records: Vec<String> = rows.iter().map(json).collect();
            transaction
                .execute(
                    "INSERT INTO customers (cid, email, record) \
                     SELECT cid, email, record::jsonb FROM unnest($1::text[], $2::text[], $3::text[]) \
                     AS c (cid, email, record)",
                    &[&cids, &emails, &records],
                )
                .await?;
        }
        Chunk::Tacas(rows) => {
            let hashes: Vec<String> = rows.iter().map(|(hash, _)| hash.to_string()).collect();
            let modules: Vec<&[u8]> = rows.iter().map(|(_, module)| module.as_slice()).collect();
            transaction
                .execute(
                    "INSERT INTO tacas (hash, module) SELECT * FROM unnest($1::text[], $2::bytea[])",
                    &[&hashes, &modules],
                )
                .await?;
        }
        Chunk::Products(rows) => {
            let pids: Vec<&str> = rows.iter().map(|p| p.pid.as_str()).collect();
            let tests: Vec<&str> = rows.iter().map(|p| p.test_pid.as_str()).collect();
            let owners: Vec<&str> = rows.iter().map(|p| p.owner.as_str()).collect();
            let tacas: Vec<String> = rows.iter().map(|p| p.taca.to_string()).collect();
            let records: Vec<String> = rows.iter().map(json).collect();
            transaction
                .execute(
                    "INSERT INTO products (pid, test_pid, owner, taca, record) \
                     SELECT pid, test_pid, owner, taca, record::jsonb \
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                     AS p (pid, test_pid, owner, taca, record)",
                    &[&pids, &tests, &owners, &tacas, &records],
                )
                .await?;
        }
        Chunk::Meters(rows) => {
            let mids: Vec<&str> = rows.iter().map(|m| m.mid.as_str()).collect();
            let owners: Vec<&str> = rows.iter().map(|m| m.owner.as_str()).collect();
            let records: Vec<String> = rows.iter().map(json).collect();
            transaction
                .execute(
                    "INSERT INTO meters (mid, owner, record) \
                     SELECT mid, owner, record::jsonb FROM unnest($1::text[], $2::text[], $3::text[]) \
                     AS m (mid, owner, record)",
                    &[&mids, &owners, &records],
                )
                .await?;
        }
        Chunk::Grants(rows) => {
            let numbers: Vec<i64> = rows.iter().map(|g| int(g.id)).collect::<Result<_, _>>()?;
            let mids: Vec<&str> = rows.iter().map(|g| g.mid.as_str()).collect();
            let cids: Vec<&str> = rows.iter().map(|g| g.cid.as_str()).collect();
            let records: Vec<String> = rows.iter().map(json).collect();
            transaction
                .execute(
                    "INSERT INTO grants (number, mid, cid, record) \
                     SELECT number, mid, cid, record::jsonb \
                     FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) \
                     AS g (number, mid, cid, record)",
                    &[&numbers, &mids, &cids, &records],
                )
                .await?;
        }
        Chunk::Batches(rows) => {
            let mids: Vec<&str> = rows.iter().map(|(key, _)| key.mid.as_str()).collect();
            let ids: Vec<&str> = rows.iter().map(|(key, _)| key.id.as_str()).collect();
            let digests: Vec<Option<&[u8]>> = rows
                .iter()
                .map(|(_, applied)| applied.digest.as_ref().map(|digest| &digest[..]))
                .collect();
            let answers: Vec<&[u8]> = rows
                .iter()
                .map(|(_, applied)| &applied.answer[..])
                .collect();
            transaction
                .execute(
                    "INSERT INTO batches (mid, batch, digest, answer) \
                     SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[])",
                    &[&mids, &ids, &digests, &answers],
                )
                .await?;
        }
        Chunk::SeqRanges(rows) => {
            let mids: Vec<&str> = rows.iter().map(|r| r.mid.as_str()).collect();
            let instances: Vec<&str> = rows.iter().map(|r| r.instance.as_str()).collect();
            let firsts: Vec<i64> = rows.iter().map(|r| seq_in(r.first)).collect();
            let lasts: Vec<i64> = rows.iter().map(|r| seq_in(r.last)).collect();
            transaction
                .execute(
                    "INSERT INTO seq_ranges (mid, instance, first, last) \
                     SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])",
                    &[&mids, &instances, &firsts, &lasts],
                )
                .await?;
        }
        Chunk::Transfers(rows) => post(transaction, &rows).await?,
        Chunk::HoldEvents(rows) => insert_hold_events(transaction, &rows).await?,
        Chunk::PaymentRequests(rows) => insert_payment_requests(transaction, &rows).await?,
        Chunk::PeriodUses(rows) => set_period_uses(transaction, &rows, &[]).await?,
        Chunk::FreeUses(rows) => set_period_uses(transaction, &[], &rows).await?,
        Chunk::Suspense(rows) => {
            let mids: Vec<&str> = rows.iter().map(|s| s.mid.as_str()).collect();
            let batches: Vec<&str> = rows.iter().map(|s| s.batch.as_str()).collect();
            let seqs: Vec<i64> = rows.iter().map(|s| seq_in(s.seq)).collect();
            let records: Vec<String> = rows.iter().map(json).collect();
            transaction
                .execute(
                    "INSERT INTO suspense (mid, batch, seq, record) \
                     SELECT mid, batch, seq, record::jsonb \
                     FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) \
                     AS s (mid, batch, seq, record)",
                    &[&mids, &batches, &seqs, &records],
                )
                .await?;
        }
        Chunk::Itemised(rows) => {
            let arrived: Vec<i64> = rows
                .iter()
                .map(|r| int(r.arrived_ms))
                .collect::<Result<_, _>>()?;
            let mids: Vec<&str> = rows.iter().map(|r| r.key.mid.as_str()).collect();
            let batches: Vec<&str> = rows.iter().map(|r| r.key.id.as_str()).collect();
            let parts: Vec<i32> = rows.iter().map(|r| i32::from(r.part)).collect();
            let records: Vec<&[u8]> = rows.iter().map(|r| &r.record[..]).collect();
            transaction
                .execute(
                    "INSERT INTO itemised (arrived_ms, mid, batch, part, record) \
                     SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::integer[], $5::bytea[])",
                    &[&arrived, &mids, &batches, &parts, &records],
                )
                .await?;
        }
        Chunk::ItemisedIndex(rows) => {
            let (mut batches, mut ranges) = (Vec::new(), Vec::new());
            for row in &rows {
                match row {
                    ItemisedTransfers::Batch { .. } => batches.push(row),
                    ItemisedTransfers::Range { .. } => ranges.push(row),
                }
            }
            let (mut mids, mut ids, mut arrived, mut parts) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for row in batches {
                if let ItemisedTransfers::Batch {
                    key,
                    arrived_ms,
                    parts: count,
                } = row
                {
                    mids.push(key.mid.as_str());
                    ids.push(key.id.as_str());
                    arrived.push(int(*arrived_ms)?);
                    parts.push(i32::from(*count));
                }
            }
            transaction
                .execute(
                    "INSERT INTO itemised_batches (mid, batch, arrived_ms, parts) \
                     SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::integer[])",
                    &[&mids, &ids, &arrived, &parts],
                )
                .await?;
            let (mut firsts, mut lasts, mut arrived, mut mids, mut ids) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for row in ranges {
                if let ItemisedTransfers::Range {
                    first,
                    last,
                    arrived_ms,
                    key,
                } = row
                {
                    firsts.push(int(*first)?);
                    lasts.push(int(*last)?);
                    arrived.push(int(*arrived_ms)?);
                    mids.push(key.mid.as_str());
                    ids.push(key.id.as_str());
                }
            }
            transaction
                .execute(
                    "INSERT INTO itemised_transfers (first, last, arrived_ms, mid, batch) \
                     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[])",
                    &[&firsts, &lasts, &arrived, &mids, &ids],
                )
                .await?;
        }
        Chunk::Deposits(rows) => {
            let references: Vec<&str> = rows.iter().map(|(r, _)| r.as_str()).collect();
            let records: Vec<String> = rows.iter().map(|(_, record)| json(record)).collect();
            transaction
                .execute(
                    "INSERT INTO deposits (reference, record) \
                     SELECT reference, record::jsonb FROM unnest($1::text[], $2::text[]) \
                     AS d (reference, record)",
                    &[&references, &records],
                )
                .await?;
        }
    }
    Ok(())
}
