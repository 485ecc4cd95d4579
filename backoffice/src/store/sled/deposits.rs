//! Deposits by reference, on sled: the `deposits` tree holds one
//! [`DepositRecord`] per reference, kept forever with the ledger's history
//! (a reference is at most 64 bytes, a record about 150: a branch taking a
//! million deposits keeps about 200 MB for them).
//!
//! The record's last step, `Posted`, is written in the transaction that
//! writes the deposit's transfer, so a deposit is either posted and marked
//! posted, or neither.

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{SledStore, Store, StoreError, encode_transfer};
use crate::funding::{DepositRecord, DepositState, Reference};
use crate::ledger::Transfer;

fn decode(bytes: &[u8]) -> Result<DepositRecord, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|error| StoreError::Corrupt(format!("a deposit record: {error}")))
}

fn encode(record: &DepositRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialize")
}

impl SledStore {
    pub(super) fn deposit_record(
        &self,
        reference: &Reference,
    ) -> Result<Option<DepositRecord>, StoreError> {
        self.deposits
            .get(reference.as_str().as_bytes())?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    pub(super) fn begin_deposit_record(
        &self,
        reference: &Reference,
        intent: &DepositRecord,
    ) -> Result<(DepositRecord, bool), StoreError> {
        let key = reference.as_str().as_bytes();
        let outcome = self
            .deposits
            .compare_and_swap(key, None::<&[u8]>, Some(encode(intent)))?;
        let stored = match outcome {
            Ok(()) => (intent.clone(), true),
            Err(conflict) => {
                let current = conflict.current.ok_or_else(|| {
                    StoreError::Corrupt("a deposit record vanished while it was read".into())
                })?;
                (decode(&current)?, false)
            }
        };
        // Durable before the processor is asked, even when it was there
        // already: another call may have written it without syncing yet.
        self.sync()?;
        Ok(stored)
    }

    pub(super) fn deposit_collected_record(
        &self,
        reference: &Reference,
        processor: &str,
    ) -> Result<DepositRecord, StoreError> {
        let key = reference.as_str().as_bytes();
        let outcome = self.deposits.transaction(|deposits| {
            let Some(bytes) = deposits.get(key)? else {
                return Err(ConflictableTransactionError::Abort(
                    "no deposit record under this reference".to_owned(),
                ));
            };
            let mut record: DepositRecord = serde_json::from_slice(&bytes)
                .map_err(|error| ConflictableTransactionError::Abort(error.to_string()))?;
            if record.state == DepositState::Collecting {
                record.state = DepositState::Collected {
                    processor: processor.to_owned(),
                };
                deposits.insert(key, encode(&record))?;
            }
            Ok(record)
        });
        let record = outcome.map_err(corrupt)?;
        self.sync()?;
        Ok(record)
    }

    pub(super) fn stage_deposit_record(
        &self,
        reference: &Reference,
        transfer: &Transfer,
    ) -> Result<DepositRecord, StoreError> {
        let key = reference.as_str().as_bytes();
        // Not only its own key: a batch's block hides the numbers inside it.
        // A deposit posted before (answered below as posted) is not new.
        if !matches!(
            self.deposit(reference)?,
            Some(DepositRecord {
                state: DepositState::Posted { .. },
                ..
            })
        ) {
            self.check_transfers_are_new(transfer.id)?;
        }
        let transfer_key = transfer.id.0.to_be_bytes();
        let transfer_record = encode_transfer(transfer);
        let outcome = (&self.deposits, &self.transfers).transaction(|(deposits, transfers)| {
            let abort = |why: String| ConflictableTransactionError::Abort(why);
            let bytes = deposits
                .get(key)?
                .ok_or_else(|| abort("no deposit record under this reference".to_owned()))?;
            let mut record: DepositRecord =
                serde_json::from_slice(&bytes).map_err(|error| abort(error.to_string()))?;
            let processor = match &record.state {
                // Posted by an earlier call: nothing is written again.
                DepositState::Posted { .. } => return Ok(record),
                DepositState::Collecting => {
                    return Err(abort("a deposit not collected cannot be posted".to_owned()));
                }
                DepositState::Collected { processor } => processor.clone(),
            };
            if transfers.get(transfer_key)?.is_some() {
                return Err(abort(format!(
                    "transfer {} exists already; a posted transfer is never overwritten",
                    transfer.id.0
                )));
            }
            transfers.insert(&transfer_key, transfer_record.as_slice())?;
            record.state = DepositState::Posted {
                processor,
                transfer: transfer.id.0,
            };
            deposits.insert(key, encode(&record))?;
            Ok(record)
        });
        outcome.map_err(corrupt)
    }
}

fn corrupt(error: TransactionError<String>) -> StoreError {
    match error {
        TransactionError::Abort(why) => StoreError::Corrupt(why),
        TransactionError::Storage(error) => StoreError::Storage(error),
    }
}
