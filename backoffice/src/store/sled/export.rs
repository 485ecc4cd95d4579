//! Everything the sled store keeps, read back as typed records in chunks
//! (`store::moving::Chunk`), for `backoffice migrate-store`. A record that
//! does not decode stops the export: a branch is moved whole or not at all.

use proto::record::Reader;
use proto::{BatchId, Cid, Mid, Pid};

use super::{SledStore, StoreError, decode_applied, decode_transfers};
use crate::funding::{DepositRecord, Reference};
use crate::pricing::TacaHash;
use crate::registry::{Customer, Grant, Meter, Product};
use crate::store::moving::{Chunk, ItemisedRecord, ItemisedTransfers};
use crate::store::{BatchKey, PeriodKey, SeqRange, Suspense};

/// Records per chunk.
const CHUNK: usize = 2_000;

fn corrupt(tree: &str, key: &[u8], what: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "{tree}: the record at {:?} {what}",
        String::from_utf8_lossy(key)
            .chars()
            .take(80)
            .collect::<String>()
    ))
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn batch_key(fields: &mut Reader<'_>) -> Option<BatchKey> {
    let mid = Mid::parse(fields.text()?).ok()?;
    let id = BatchId::parse(fields.text()?).ok()?;
    Some(BatchKey { mid, id })
}

/// Reads `tree` in order, decodes each record with `decode`, and hands
/// them to `each` in chunks made by `make`.
fn chunks<T, Records: IntoIterator<Item = T>>(
    tree: &sled::Tree,
    decode: impl Fn(&[u8], &[u8]) -> Result<Records, StoreError>,
    make: impl Fn(Vec<T>) -> Chunk,
    each: &mut dyn FnMut(Chunk) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut chunk = Vec::with_capacity(CHUNK);
    for entry in tree.iter() {
        let (key, value) = entry?;
        for record in decode(&key, &value)? {
            chunk.push(record);
            if chunk.len() == CHUNK {
                each(make(std::mem::replace(
                    &mut chunk,
                    Vec::with_capacity(CHUNK),
                )))?;
            }
        }
    }
    if !chunk.is_empty() {
        each(make(chunk))?;
    }
    Ok(())
}

fn json<T: serde::de::DeserializeOwned>(
    tree: &str,
    key: &[u8],
    value: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|_| corrupt(tree, key, "does not decode"))
}

impl SledStore {
    /// Hands every record to `each`, in chunks, in an order a store with
    /// references between its tables can take them in: serials, customers,
    /// modules, products, meters, grants, applied batches and their
    /// sequence ranges, transfers (by number), period and free-use counts,
    /// suspense, itemised records and their index, deposits.
    pub fn export(
        &self,
        each: &mut dyn FnMut(Chunk) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _quiet = self.gate.write();
        // The period counts logged behind `period_uses` first (`periods`).
        self.fold_periods(true)?;
        chunks(
            &self.serials,
            |key, value| {
                let kind = std::str::from_utf8(key)
                    .map_err(|_| corrupt("serials", key, "is not a kind"))?;
                let next =
                    be_u64(value).ok_or_else(|| corrupt("serials", key, "is not 8 bytes"))?;
                Ok(Some((kind.to_owned(), next)))
            },
            Chunk::Serials,
            each,
        )?;
        chunks(
            &self.customers,
            |key, value| json::<Customer>("customers", key, value).map(Some),
            Chunk::Customers,
            each,
        )?;
        chunks(
            &self.tacas,
            |key, value| {
                let text =
                    std::str::from_utf8(key).map_err(|_| corrupt("tacas", key, "is not a hash"))?;
                let hash = TacaHash::parse_hex(text)
                    .ok_or_else(|| corrupt("tacas", key, "is not a hash"))?;
                Ok(Some((hash, value.to_vec())))
            },
            Chunk::Tacas,
            each,
        )?;
        // Each product is kept under its PID and its test PID: once.
        chunks(
            &self.products,
            |key, value| {
                let product: Product = json("products", key, value)?;
                Ok((product.pid.as_str().as_bytes() == key).then_some(product))
            },
            Chunk::Products,
            each,
        )?;
        chunks(
            &self.meters,
            |key, value| json::<Meter>("meters", key, value).map(Some),
            Chunk::Meters,
            each,
        )?;
        chunks(
            &self.grants,
            |key, value| json::<Grant>("grants", key, value).map(Some),
            Chunk::Grants,
            each,
        )?;
        chunks(
            &self.batches,
            |key, value| {
                let parsed = batch_key(&mut Reader::new(key))
                    .ok_or_else(|| corrupt("batches", key, "has a key that does not decode"))?;
                Ok(Some((parsed, decode_applied(value))))
            },
            Chunk::Batches,
            each,
        )?;
        chunks(
            &self.seq_ranges,
            |key, value| {
                let bad = || corrupt("seq_ranges", key, "does not decode");
                let at = key.len().checked_sub(8).ok_or_else(bad)?;
                let mut fields = Reader::new(&key[..at]);
                let mid = fields
                    .text()
                    .and_then(|text| Mid::parse(text).ok())
                    .ok_or_else(bad)?;
                let instance = fields.text().ok_or_else(bad)?.to_owned();
                Ok(Some(SeqRange {
                    mid,
                    instance,
                    first: be_u64(&key[at..]).ok_or_else(bad)?,
                    last: be_u64(value).ok_or_else(bad)?,
                }))
            },
            Chunk::SeqRanges,
            each,
        )?;
        chunks(
            &self.transfers,
            |key, value| decode_transfers(key, value).map_err(|why| corrupt("transfers", key, why)),
            Chunk::Transfers,
            each,
        )?;
        chunks(
            &self.hold_events,
            |key, value| {
                let stored: crate::store::holds::StoredHoldEvent = json("hold_events", key, value)?;
                if be_u64(key) != Some(stored.number) {
                    return Err(corrupt(
                        "hold_events",
                        key,
                        "is stored under another number",
                    ));
                }
                Ok(Some(stored.event()?))
            },
            Chunk::HoldEvents,
            each,
        )?;
        chunks(
            &self.payment_requests,
            |key, value| {
                let request: crate::payments::PaymentRequest =
                    json("payment_requests", key, value)?;
                if key != super::payment_key(&request.service, &request.reference).as_slice() {
                    return Err(corrupt(
                        "payment_requests",
                        key,
                        "is stored under another key",
                    ));
                }
                Ok(Some(request))
            },
            Chunk::PaymentRequests,
            each,
        )?;
        let counts = |tree: &'static str| {
            move |key: &[u8], value: &[u8]| {
                let bad = || corrupt(tree, key, "does not decode");
                let mut fields = Reader::new(key);
                let payer = fields
                    .text()
                    .and_then(|text| Cid::parse(text).ok())
                    .ok_or_else(bad)?;
                let pid = fields
                    .text()
                    .and_then(|text| Pid::parse(text).ok())
                    .ok_or_else(bad)?;
                let month = fields.u32().ok_or_else(bad)?;
                Ok(Some((
                    PeriodKey { payer, pid, month },
                    be_u64(value).ok_or_else(bad)?,
                )))
            }
        };
        chunks(
            &self.period_uses,
            counts("period_uses"),
            Chunk::PeriodUses,
            each,
        )?;
        chunks(&self.free_uses, counts("free_uses"), Chunk::FreeUses, each)?;
        chunks(
            &self.suspense,
            |key, value| json::<Suspense>("suspense", key, value).map(Some),
            Chunk::Suspense,
            each,
        )?;
        chunks(
            &self.itemised,
            |key, value| {
                let bad = || corrupt("itemised", key, "has a key that does not decode");
                let arrived_ms = key.get(..8).and_then(be_u64).ok_or_else(bad)?;
                let rest = key.get(8..key.len().saturating_sub(2)).ok_or_else(bad)?;
                let mut fields = Reader::new(rest);
                let batch = batch_key(&mut fields)
                    .filter(|_| fields.is_empty())
                    .ok_or_else(bad)?;
                let part = key
                    .get(key.len() - 2..)
                    .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
                    .ok_or_else(bad)?;
                Ok(Some(ItemisedRecord {
                    arrived_ms,
                    key: batch,
                    part,
                    record: value.to_vec(),
                }))
            },
            Chunk::Itemised,
            each,
        )?;
        chunks(
            &self.itemised_index,
            |key, value| {
                let bad = || corrupt("itemised_index", key, "does not decode");
                match key.first() {
                    Some(b'b') => {
                        let mut fields = Reader::new(&key[1..]);
                        let batch = batch_key(&mut fields).ok_or_else(bad)?;
                        let arrived_ms = value.get(..8).and_then(be_u64).ok_or_else(bad)?;
                        let parts = value
                            .get(8..10)
                            .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
                            .ok_or_else(bad)?;
                        Ok(Some(ItemisedTransfers::Batch {
                            key: batch,
                            arrived_ms,
                            parts,
                        }))
                    }
                    Some(b't') => {
                        let first = key.get(1..).and_then(be_u64).ok_or_else(bad)?;
                        let last = value.get(..8).and_then(be_u64).ok_or_else(bad)?;
                        let arrived_ms = value.get(8..16).and_then(be_u64).ok_or_else(bad)?;
                        let mut fields = Reader::new(value.get(16..).ok_or_else(bad)?);
                        let batch = batch_key(&mut fields).ok_or_else(bad)?;
                        Ok(Some(ItemisedTransfers::Range {
                            first,
                            last,
                            arrived_ms,
                            key: batch,
                        }))
                    }
                    _ => Err(bad()),
                }
            },
            Chunk::ItemisedIndex,
            each,
        )?;
        chunks(
            &self.deposits,
            |key, value| {
                let reference = std::str::from_utf8(key)
                    .ok()
                    .and_then(|text| Reference::parse(text).ok())
                    .ok_or_else(|| corrupt("deposits", key, "is not under a reference"))?;
                Ok(Some((
                    reference,
                    json::<DepositRecord>("deposits", key, value)?,
                )))
            },
            Chunk::Deposits,
            each,
        )?;
        Ok(())
    }
}
