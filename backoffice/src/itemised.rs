//! Itemised readings: every reading of an applied batch, with what became
//! of it (its payer, price, fuel, TACA and the transfer it was summed
//! into, or why it was not charged), kept so that a statement line can be
//! traced to the uses behind it and every amount priced again (`audit`).
//!
//! A batch's readings are kept in one or more records of at most
//! [`RECORD_BYTES_TARGET`] bytes (well under sled's blob threshold), written
//! in the same transaction as the batch's transfers (`store`). A record is
//! binary: a version byte, then varints; the IDs, contexts and reasons it
//! names are written once each in a table at its start and referred to by
//! number, so a priced use costs about 25 bytes. Layout: version (1), MID
//! and batch id (one-byte length each), then varints: arrival ms, part
//! number, first transfer + 1 (0: none) and the count after it, the
//! strings (length, UTF-8), the TACA hashes (32 bytes each), the readings:
//! seq and time as zigzag deltas from the reading before, context, code
//! (one byte), ID, payer + 1 (0: none), outcome (0 not priced, 1 free, 2
//! suspense: reason; 3 priced: payer, owner, price in nanos (zigzag),
//! fuel, TACA, period count, transfer + 1). Records are kept for a
//! retention (`--itemised-retention-days`, default 400 days) and pruned in
//! bounded steps (`prune`).

use proto::reading::{Event, Reading};
use proto::{Amount, BatchId, Cid, Code, Context, Mid, Payer, Pid};

use crate::ledger::TransferId;
use crate::pricing::TacaHash;

/// The encoding's version, the first byte of every record.
pub const RECORD_VERSION: u8 = 1;
/// A record is closed once it passes this many bytes (one reading more at
/// most: a reading takes at most a few hundred bytes, so every record stays
/// well below sled's blob threshold of about 128 KiB).
pub const RECORD_BYTES_TARGET: usize = 64 * 1024;
/// Longest reason kept for a reading that was not charged, in bytes.
pub const REASON_BYTES_MAX: usize = 500;
/// Default days records are kept: 400, more than 13 months (a year of
/// disputes after a month's statement).
pub const RETENTION_DAYS_DEFAULT: u64 = 400;

/// Records deleted in one step of pruning (one transaction).
pub const PRUNE_STEP_RECORDS: usize = 1_000;
/// How often a running backoffice prunes.
pub const PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Deletes the records of batches applied more than `retention_ms` before
/// `now_ms`, in steps of at most [`PRUNE_STEP_RECORDS`] records, pausing
/// `pause` between steps so that batches are not kept waiting; returns how
/// many it deleted.
pub fn prune<S: crate::store::Store>(
    store: &S,
    retention_ms: u64,
    now_ms: u64,
    pause: std::time::Duration,
) -> Result<usize, crate::store::StoreError> {
    let before_ms = now_ms.saturating_sub(retention_ms);
    let mut deleted = 0;
    loop {
        let step = store.prune_itemised(before_ms, PRUNE_STEP_RECORDS)?;
        deleted += step;
        if step < PRUNE_STEP_RECORDS {
            return Ok(deleted);
        }
        std::thread::sleep(pause);
    }
}

/// A use that was priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedUse {
    /// Who was charged (for a component, the enclosing product's owner).
    pub payer: Cid,
    /// Who was credited: the product's owner.
    pub owner: Cid,
    /// The price the TACA gave.
    pub amount: Amount,
    /// The fuel its call used.
    pub fuel: u64,
    /// The TACA module that priced it.
    pub taca: TacaHash,
    /// The payer's earlier uses of the product in the month, as the TACA
    /// was given them.
    pub period_uses: u64,
    /// The transfer it was summed into; `None` when it moved no money (a
    /// zero price, or a producer using their own product).
    pub transfer: Option<TransferId>,
}

/// What became of a reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A login, logout or query: recorded, never priced.
    NotPriced,
    /// A use of a product's test PID: free.
    Free,
    /// Not charged; kept in suspense for this reason.
    Suspense(String),
    /// Priced.
    Priced(PricedUse),
}

/// One reading of an applied batch and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The reading as the meter sent it (in Cox's minimal form: its
    /// position as seq, the batch's arrival as its time, context `batch`).
    pub reading: Reading,
    /// What became of it.
    pub outcome: Outcome,
}

/// The context given to readings of Cox's minimal form, which has none.
pub const MINIMAL_CONTEXT: &str = "batch";

/// One stored record: part of a batch's readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The meter that sent the batch.
    pub mid: Mid,
    /// The batch.
    pub batch: BatchId,
    /// When the batch was applied, ms since the Unix epoch.
    pub arrived_ms: u64,
    /// This record's number within the batch, from 0.
    pub part: u16,
    /// The batch's transfers: the first and last number (`None`: none, or
    /// a re-pricing's record, whose transfers are those its uses name).
    pub transfers: Option<(TransferId, TransferId)>,
    /// Uses of the batch that were in suspense, priced when suspense was
    /// priced again at `arrived_ms` (not the batch's readings as applied).
    pub repriced: bool,
    /// The readings.
    pub items: Vec<Item>,
}

/// One use summed into a statement line, from a batch's kept readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineItem {
    /// The meter that sent it.
    pub mid: Mid,
    /// The batch that carried it.
    pub batch: BatchId,
    /// The reading.
    pub reading: Reading,
    /// Its price, fuel, TACA and period count.
    pub priced: PricedUse,
}

/// The uses summed into transfer `id`, in the order of their batch; `None`
/// when they are not kept (a transfer that is not a use, one applied
/// before readings were kept, or pruned after the retention). At most a
/// batch's readings (`BATCH_READINGS_MAX`).
pub fn items_of_transfer<S: crate::store::Store>(
    store: &S,
    id: TransferId,
) -> Result<Option<Vec<LineItem>>, crate::store::StoreError> {
    let Some(at) = store.itemised_batch_of_transfer(id)? else {
        return Ok(None);
    };
    let Some(records) = store.itemised_records_at(&at)? else {
        return Ok(None);
    };
    let key = at.key;
    Ok(Some(
        records
            .into_iter()
            .flat_map(|record| record.items)
            .filter_map(|item| match item.outcome {
                Outcome::Priced(priced) if priced.transfer == Some(id) => Some(LineItem {
                    mid: key.mid,
                    batch: key.id.clone(),
                    reading: item.reading,
                    priced,
                }),
                _ => None,
            })
            .collect(),
    ))
}

fn put_varint(out: &mut Vec<u8>, mut value: u128) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn zigzag(value: i128) -> u128 {
    ((value << 1) ^ (value >> 127)) as u128
}

fn unzigzag(value: u128) -> i128 {
    ((value >> 1) as i128) ^ -((value & 1) as i128)
}

/// Reads a record's fields; `None` at any inconsistency.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Option<u128> {
        let mut value: u128 = 0;
        for shift in (0..19).map(|index| index * 7) {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            value |= u128::from(byte & 0x7f).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn u64(&mut self) -> Option<u64> {
        u64::try_from(self.varint()?).ok()
    }

    fn count(&mut self) -> Option<usize> {
        usize::try_from(self.varint()?).ok()
    }

    fn bytes(&mut self, count: usize) -> Option<&'a [u8]> {
        if self.0.len() < count {
            return None;
        }
        let (head, rest) = self.0.split_at(count);
        self.0 = rest;
        Some(head)
    }

    fn text(&mut self) -> Option<&'a str> {
        let len = self.count()?;
        std::str::from_utf8(self.bytes(len)?).ok()
    }
}

/// Builds the records of one batch.
pub struct Encoder {
    mid: Mid,
    batch: BatchId,
    arrived_ms: u64,
    transfers: Option<(TransferId, TransferId)>,
    repriced: bool,
    records: Vec<Vec<u8>>,
    part: Part,
    /// One reading's item as it is written (kept: one allocation, not one
    /// per reading).
    item: Vec<u8>,
}

/// The record being written: its tables and its items so far.
#[derive(Default)]
struct Part {
    strings: Vec<String>,
    string_index: crate::hashing::Map<String, u32>,
    hashes: Vec<TacaHash>,
    items: Vec<u8>,
    count: usize,
    previous_seq: u64,
    previous_time: u64,
    table_bytes: usize,
    /// For each field (`Field`), the string it named last, + 1 (0: none):
    /// consecutive readings mostly repeat their context, product and
    /// owner, and a comparison is cheaper than a hash lookup.
    recent: [u32; FIELDS],
}

/// The fields that name a string, each remembering the last it named.
#[derive(Clone, Copy)]
enum Field {
    Context,
    Id,
    Payer,
    PricedPayer,
    Owner,
    Reason,
}

const FIELDS: usize = 6;

impl Part {
    /// `string` for `field`, looked up only when it names another string
    /// than the last time.
    fn string_in(&mut self, field: Field, text: &str) -> u128 {
        let recent = self.recent[field as usize];
        if let Some(index) = recent.checked_sub(1)
            && self.strings[index as usize] == text
        {
            return u128::from(index);
        }
        let index = self.string(text);
        self.recent[field as usize] = u32::try_from(index).expect("a record has few strings") + 1;
        index
    }

    fn string(&mut self, text: &str) -> u128 {
        if let Some(&index) = self.string_index.get(text) {
            return u128::from(index);
        }
        let index = u32::try_from(self.strings.len()).expect("a record has few strings");
        self.strings.push(text.to_owned());
        self.string_index.insert(text.to_owned(), index);
        self.table_bytes += text.len() + 2;
        u128::from(index)
    }

    fn hash(&mut self, hash: TacaHash) -> u128 {
        let index = match self.hashes.iter().position(|known| *known == hash) {
            Some(index) => index,
            None => {
                self.hashes.push(hash);
                self.table_bytes += 32;
                self.hashes.len() - 1
            }
        };
        index as u128
    }

    fn bytes(&self) -> usize {
        self.items.len() + self.table_bytes
    }
}

impl Encoder {
    /// The records of batch `batch` of meter `mid`, applied at `arrived_ms`,
    /// whose transfers are numbered `transfers` (first and last).
    pub fn new(
        mid: Mid,
        batch: BatchId,
        arrived_ms: u64,
        transfers: Option<(TransferId, TransferId)>,
    ) -> Encoder {
        Encoder {
            mid,
            batch,
            arrived_ms,
            transfers,
            repriced: false,
            records: Vec::new(),
            part: Part::default(),
            item: Vec::with_capacity(64),
        }
    }

    /// The records of uses of batch `batch` of meter `mid` that were in
    /// suspense and were priced again at `arrived_ms`.
    pub fn repriced(mid: Mid, batch: BatchId, arrived_ms: u64) -> Encoder {
        Encoder {
            repriced: true,
            ..Encoder::new(mid, batch, arrived_ms, None)
        }
    }

    /// Adds the next reading and what became of it.
    pub fn push(&mut self, reading: &Reading, outcome: &Outcome) {
        let part = &mut self.part;
        let item = &mut self.item;
        item.clear();
        put_varint(
            item,
            zigzag(i128::from(reading.seq) - i128::from(part.previous_seq)),
        );
        put_varint(
            item,
            zigzag(i128::from(reading.time_ms) - i128::from(part.previous_time)),
        );
        part.previous_seq = reading.seq;
        part.previous_time = reading.time_ms;
        let context = part.string_in(Field::Context, reading.context.as_str());
        put_varint(item, context);
        item.push(reading.event.code().as_char() as u8);
        let id = part.string_in(Field::Id, reading.event.id_str());
        put_varint(item, id);
        match reading.event.payer() {
            None => put_varint(item, 0),
            Some(payer) => {
                let payer = part.string_in(Field::Payer, payer.as_str());
                put_varint(item, payer + 1);
            }
        }
        match outcome {
            Outcome::NotPriced => item.push(0),
            Outcome::Free => item.push(1),
            Outcome::Suspense(reason) => {
                item.push(2);
                let mut end = reason.len().min(REASON_BYTES_MAX);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                let reason = part.string_in(Field::Reason, &reason[..end]);
                put_varint(item, reason);
            }
            Outcome::Priced(priced) => {
                item.push(3);
                let payer = part.string_in(Field::PricedPayer, priced.payer.as_str());
                put_varint(item, payer);
                let owner = part.string_in(Field::Owner, priced.owner.as_str());
                put_varint(item, owner);
                put_varint(item, zigzag(priced.amount.nanos()));
                put_varint(item, u128::from(priced.fuel));
                let taca = part.hash(priced.taca);
                put_varint(item, taca);
                put_varint(item, u128::from(priced.period_uses));
                put_varint(
                    item,
                    priced
                        .transfer
                        .map_or(0, |transfer| u128::from(transfer.0) + 1),
                );
            }
        }
        part.items.extend_from_slice(item);
        part.count += 1;
        if part.bytes() >= RECORD_BYTES_TARGET {
            self.close_part();
        }
    }

    fn close_part(&mut self) {
        let part = std::mem::take(&mut self.part);
        let mut out = Vec::with_capacity(part.bytes() + 128);
        out.push(RECORD_VERSION);
        proto::record::put_str(&mut out, self.mid.as_str());
        proto::record::put_str(&mut out, self.batch.as_str());
        put_varint(&mut out, u128::from(self.arrived_ms));
        put_varint(&mut out, self.records.len() as u128);
        put_varint(&mut out, u128::from(self.repriced));
        match self.transfers {
            None => put_varint(&mut out, 0),
            Some((first, last)) => {
                put_varint(&mut out, u128::from(first.0) + 1);
                put_varint(&mut out, u128::from(last.0 - first.0));
            }
        }
        put_varint(&mut out, part.strings.len() as u128);
        for text in &part.strings {
            put_varint(&mut out, text.len() as u128);
            out.extend_from_slice(text.as_bytes());
        }
        put_varint(&mut out, part.hashes.len() as u128);
        for hash in &part.hashes {
            out.extend_from_slice(&hash.bytes());
        }
        put_varint(&mut out, part.count as u128);
        out.extend_from_slice(&part.items);
        self.records.push(out);
    }

    /// The records, in order; none for a batch without readings.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        if self.part.count > 0 {
            self.close_part();
        }
        self.records
    }
}

/// Reads a record; `None` when it is corrupt or of another version.
pub fn decode(record: &[u8]) -> Option<Record> {
    let (&version, rest) = record.split_first()?;
    if version != RECORD_VERSION {
        return None;
    }
    let mut header = proto::record::Reader::new(rest);
    let mid = Mid::parse(header.text()?).ok()?;
    let batch = BatchId::parse(header.text()?).ok()?;
    let consumed = 1 + 2 + mid.as_str().len() + batch.as_str().len();
    let mut fields = Fields(&record[consumed..]);
    let arrived_ms = fields.u64()?;
    let part = u16::try_from(fields.varint()?).ok()?;
    let repriced = match fields.varint()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let transfers = match fields.u64()? {
        0 => None,
        first => {
            let first = first - 1;
            let last = first.checked_add(fields.u64()?)?;
            Some((TransferId(first), TransferId(last)))
        }
    };
    let string_count = fields.count()?;
    let mut strings = Vec::with_capacity(string_count.min(record.len()));
    for _ in 0..string_count {
        strings.push(fields.text()?);
    }
    let hash_count = fields.count()?;
    let mut hashes = Vec::with_capacity(hash_count.min(record.len() / 32));
    for _ in 0..hash_count {
        hashes.push(TacaHash::from_bytes(fields.bytes(32)?.try_into().ok()?));
    }
    let string =
        |fields: &mut Fields<'_>| -> Option<&str> { strings.get(fields.count()?).copied() };
    let count = fields.count()?;
    let mut items = Vec::with_capacity(count.min(record.len()));
    let (mut seq, mut time_ms) = (0u64, 0u64);
    for _ in 0..count {
        seq = u64::try_from(i128::from(seq) + unzigzag(fields.varint()?)).ok()?;
        time_ms = u64::try_from(i128::from(time_ms) + unzigzag(fields.varint()?)).ok()?;
        let context = Context::parse(string(&mut fields)?).ok()?;
        let code = Code::from_char(char::from(*fields.bytes(1)?.first()?))?;
        let id = string(&mut fields)?;
        let payer = match fields.count()? {
            0 => None,
            index => Some(Payer::parse(strings.get(index - 1)?).ok()?),
        };
        let event = match code {
            Code::Login if payer.is_none() => Event::Login(Cid::parse(id).ok()?),
            Code::Logout if payer.is_none() => Event::Logout(Cid::parse(id).ok()?),
            Code::Query => Event::Query {
                pid: Pid::parse(id).ok()?,
                payer,
            },
            Code::Commit => Event::Commit {
                pid: Pid::parse(id).ok()?,
                payer,
            },
            _ => return None,
        };
        let outcome = match fields.bytes(1)?[0] {
            0 => Outcome::NotPriced,
            1 => Outcome::Free,
            2 => Outcome::Suspense(string(&mut fields)?.to_owned()),
            3 => Outcome::Priced(PricedUse {
                payer: Cid::parse(string(&mut fields)?).ok()?,
                owner: Cid::parse(string(&mut fields)?).ok()?,
                amount: Amount::try_from_nanos(unzigzag(fields.varint()?)).ok()?,
                fuel: fields.u64()?,
                taca: *hashes.get(fields.count()?)?,
                period_uses: fields.u64()?,
                transfer: match fields.u64()? {
                    0 => None,
                    id => Some(TransferId(id - 1)),
                },
            }),
            _ => return None,
        };
        if code != Code::Commit && outcome != Outcome::NotPriced {
            return None;
        }
        items.push(Item {
            reading: Reading {
                seq,
                time_ms,
                context,
                event,
            },
            outcome,
        });
    }
    fields.0.is_empty().then_some(Record {
        mid,
        batch,
        arrived_ms,
        part,
        transfers,
        repriced,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seq: u64, event: Event) -> Reading {
        Reading {
            seq,
            time_ms: 1_764_000_000_000 + seq * 7,
            context: Context::parse("pid:4242").unwrap(),
            event,
        }
    }

    fn sample(count: u64) -> Vec<Item> {
        let cid = Cid::parse("B1-C7").unwrap();
        let owner = Cid::parse("B1-C1").unwrap();
        let pid = Pid::parse("B1-P1").unwrap();
        (0..count)
            .map(|seq| match seq % 4 {
                0 => Item {
                    reading: reading(seq, Event::Login(cid)),
                    outcome: Outcome::NotPriced,
                },
                1 => Item {
                    reading: reading(
                        seq,
                        Event::Commit {
                            pid,
                            payer: Some(Payer::Customer(cid)),
                        },
                    ),
                    outcome: Outcome::Priced(PricedUse {
                        payer: cid,
                        owner,
                        amount: Amount::from_nanos(1_000_000 + seq as i64),
                        fuel: 1234 + seq,
                        taca: TacaHash::of(b"module"),
                        period_uses: seq / 4,
                        transfer: Some(TransferId(40 + seq % 3)),
                    }),
                },
                2 => Item {
                    reading: reading(
                        seq,
                        Event::Commit {
                            pid,
                            payer: Some(Payer::OwnerOf(pid)),
                        },
                    ),
                    outcome: Outcome::Suspense("no grant: \u{e9}".repeat(200)),
                },
                _ => Item {
                    reading: reading(seq, Event::Commit { pid, payer: None }),
                    outcome: Outcome::Free,
                },
            })
            .collect()
    }

    fn encode(items: &[Item]) -> Vec<Vec<u8>> {
        let mut encoder = Encoder::new(
            Mid::parse("B1-M1").unwrap(),
            BatchId::parse("abc:1").unwrap(),
            1_764_000_001_000,
            Some((TransferId(40), TransferId(42))),
        );
        for item in items {
            encoder.push(&item.reading, &item.outcome);
        }
        encoder.finish()
    }

    #[test]
    fn a_priced_use_takes_about_25_bytes() {
        // As the send benchmark's batches: 10,000 priced uses by 1,000
        // payers, each summed into their payer's transfer.
        let owner = Cid::parse("B1-C1").unwrap();
        let pid = Pid::parse("B1-P1").unwrap();
        let items: Vec<Item> = (0..10_000u64)
            .map(|seq| {
                let payer = Cid::parse(&format!("B1-C{}", 2 + seq % 1000)).unwrap();
                Item {
                    reading: reading(
                        seq,
                        Event::Commit {
                            pid,
                            payer: Some(Payer::Customer(payer)),
                        },
                    ),
                    outcome: Outcome::Priced(PricedUse {
                        payer,
                        owner,
                        amount: Amount::from_nanos(250_000_000),
                        fuel: 2_345,
                        taca: TacaHash::of(b"flat"),
                        period_uses: seq / 1000,
                        transfer: Some(TransferId(1_000_000 + seq % 1000)),
                    }),
                }
            })
            .collect();
        let records = encode(&items);
        let total: usize = records.iter().map(Vec::len).sum();
        assert!(records.len() <= 5, "{} records", records.len());
        assert!(total <= 10_000 * 30, "{total} bytes for 10,000 uses");
    }

    #[test]
    fn records_round_trip_split_below_the_target_and_detect_corruption() {
        let items = sample(50_000);
        let records = encode(&items);
        assert!(records.len() > 1, "50,000 readings take several records");
        let mut decoded = Vec::new();
        for (part, record) in records.iter().enumerate() {
            assert!(
                record.len() < RECORD_BYTES_TARGET + 1024,
                "{}",
                record.len()
            );
            let record = decode(record).unwrap();
            assert_eq!(usize::from(record.part), part);
            assert_eq!(record.transfers, Some((TransferId(40), TransferId(42))));
            decoded.extend(record.items);
        }
        // Reasons are cut at a character boundary.
        let Outcome::Suspense(reason) = &decoded[2].outcome else {
            panic!("{:?}", decoded[2]);
        };
        assert!(reason.len() <= REASON_BYTES_MAX && reason.starts_with("no grant"));
        let cut: Vec<Item> = items
            .into_iter()
            .map(|item| match item.outcome {
                Outcome::Suspense(reason) => {
                    let mut end = REASON_BYTES_MAX;
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    Item {
                        outcome: Outcome::Suspense(reason[..end].to_owned()),
                        ..item
                    }
                }
                _ => item,
            })
            .collect();
        assert_eq!(decoded, cut);
        let total: usize = records.iter().map(Vec::len).sum();
        assert!(total / 50_000 < 16, "{} bytes per reading", total / 50_000);
        let small = &encode(&sample(8))[0];
        for end in 0..small.len() {
            assert_eq!(decode(&small[..end]), None, "cut at {end}");
        }
        let mut longer = small.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
    }
}
