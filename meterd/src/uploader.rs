//! The uploader: sends waiting readings to the backoffice with `send` and
//! takes its answer (the status table and the upload parameters).
//!
//! It uploads when the cache holds `flushReadingsMax` readings, when the
//! oldest is `flushIntervalS` old, when the status table is half-way to
//! stale, and whenever woken (`flush()`, a full cache, an unconfirmed payer).
//! A batch is fixed in the cache before its first send and resent unchanged,
//! with the same id, until the backoffice confirms it; only then are its
//! readings deleted. A batch refused as a conflict (fault 205: its id was
//! applied before with other readings) is set aside, its readings kept, and
//! uploading goes on. Failures back off exponentially up to
//! `RETRY_DELAY_MAX_MS`, for as long as the backoffice stays down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::upload::{Batch, ReadingsForm, SendAnswer, SendBody, SendRequest};
use proto::{BatchId, FaultCode, Mid};

use crate::backoffice::{Backoffice, BackofficeError};
use crate::batching::batch_end;
use crate::cache::{Cache, PendingBatch, SavedTable};
use crate::context::Contexts;
use crate::meter::{UploadSignals, now_ms};
use crate::standing::StatusTable;

/// Most readings in one batch.
pub const UPLOAD_BATCH_READINGS: usize = 10_000;
/// How long one upload may take before it counts as failed.
pub const UPLOAD_TIMEOUT_MS: u64 = 60_000;
/// First delay after a failed upload.
pub const RETRY_DELAY_MIN_MS: u64 = 1_000;
/// Longest delay between retries.
pub const RETRY_DELAY_MAX_MS: u64 = 300_000;
/// Longest the uploader sleeps before looking at its triggers again.
pub const CHECK_INTERVAL_MAX_MS: u64 = 60_000;
/// When the first waiting reading is held back for its enclosing use, how
/// long until a timed upload looks again.
pub const HOLD_RECHECK_MS: u64 = 5_000;

pub use crate::backoffice::Endpoint;

/// How long readings go as structs after a backoffice refused them packed.
pub const STRUCTS_AFTER_REFUSAL_MS: u64 = 3_600_000;

/// Whether `fault` is how a backoffice that does not read packed readings
/// refuses them: invalid parameters, a batch without a `readings` array.
/// Any other fault is the batch's own and is not hidden by sending it again.
fn refuses_packed_readings(fault: &proto::Fault) -> bool {
    fault.registered() == Some(FaultCode::InvalidParams)
        // Exactly its words: this version's own message for a batch
        // without readings says more, and is the batch's own fault.
        && fault.message == proto::upload::NO_READINGS_ARRAY
}

/// Why an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The backoffice could not be reached or did not answer in time.
    #[error("backoffice unreachable: {0}")]
    Unreachable(String),
    /// The backoffice answered with something other than a valid answer.
    #[error("bad answer from the backoffice: {0}")]
    BadAnswer(String),
    /// The backoffice refused the batch.
    #[error("backoffice refused the upload: {0}")]
    Refused(proto::Fault),
    /// The cache failed.
    #[error("{0}")]
    Cache(String),
}

impl From<BackofficeError> for UploadError {
    fn from(error: BackofficeError) -> Self {
        match error {
            BackofficeError::Unreachable(reason) => UploadError::Unreachable(reason),
            BackofficeError::BadAnswer(reason) => UploadError::BadAnswer(reason),
            BackofficeError::Refused(fault) => UploadError::Refused(fault),
        }
    }
}

/// The uploader's state.
pub struct Uploader {
    cache: Arc<Cache>,
    table: Arc<Mutex<StatusTable>>,
    signals: Arc<UploadSignals>,
    mid: Mid,
    backoffice: Arc<Backoffice>,
    /// The meter's open frames: a component's use waits in the cache while
    /// its enclosing use is open (`batching`).
    contexts: Arc<Mutex<Contexts>>,
    /// Until when (ms since the Unix epoch) the first waiting reading is
    /// held back for its enclosing use: no timed upload before then.
    held_until_ms: std::sync::atomic::AtomicU64,
    /// Until when (ms since the Unix epoch) readings go as structs: set
    /// when a backoffice refused the packed form as one older than it does.
    structs_until_ms: std::sync::atomic::AtomicU64,
}

fn lock(table: &Mutex<StatusTable>) -> std::sync::MutexGuard<'_, StatusTable> {
    table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::cache::CacheError> + Send + 'static,
) -> Result<T, UploadError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| UploadError::Cache(error.to_string()))?
        .map_err(|error| UploadError::Cache(error.to_string()))
}

impl Uploader {
    /// An uploader that sends through `backoffice`.
    pub fn new(
        cache: Arc<Cache>,
        table: Arc<Mutex<StatusTable>>,
        signals: Arc<UploadSignals>,
        backoffice: Arc<Backoffice>,
        contexts: Arc<Mutex<Contexts>>,
    ) -> Uploader {
        Uploader {
            cache,
            table,
            signals,
            contexts,
            held_until_ms: std::sync::atomic::AtomicU64::new(0),
            structs_until_ms: std::sync::atomic::AtomicU64::new(0),
            mid: backoffice.mid(),
            backoffice,
        }
    }

    /// Milliseconds until a timed trigger fires (0: due now).
    async fn due_in_ms(&self) -> u64 {
        let params = lock(&self.table).params();
        let now = now_ms();
        if self.cache.pending() >= u64::from(params.flush_readings_max) {
            return 0;
        }
        let received = lock(&self.table).received_ms();
        let refresh_ms = u64::from(params.status_stale_max_s) * 500;
        let table_due = received.map_or(0, |received| (received + refresh_ms).saturating_sub(now));
        let cache = Arc::clone(&self.cache);
        let oldest = blocking(move || cache.oldest_time_ms())
            .await
            .ok()
            .flatten();
        let interval_ms = u64::from(params.flush_interval_s) * 1000;
        let held_until = self
            .held_until_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let readings_due = oldest.map_or(u64::MAX, |oldest| {
            (oldest + interval_ms).max(held_until).saturating_sub(now)
        });
        table_due.min(readings_due)
    }

    /// Runs until the task is dropped. Dropping it mid-upload is safe: the
    /// batch stays in the cache with its id and is resent on the next start.
    pub async fn run(self) {
        let mut retry_delay_ms = 0u64;
        loop {
            let wait_ms = if retry_delay_ms > 0 {
                retry_delay_ms
            } else {
                self.due_in_ms().await.min(CHECK_INTERVAL_MAX_MS)
            };
            let woken = tokio::select! {
                () = self.signals.wake.notified() => true,
                () = tokio::time::sleep(Duration::from_millis(wait_ms)) => false,
            };
            if !woken && retry_delay_ms == 0 && self.due_in_ms().await > 0 {
                continue;
            }
            // Flushes asked for before this point are answered by this round.
            let serving = self
                .signals
                .flush_tickets
                .load(std::sync::atomic::Ordering::Acquire);
            let outcome = self.upload_all().await;
            let mut report = self.signals.report.borrow().clone();
            report.attempt += 1;
            report.flushes_served = serving;
            match outcome {
                Ok(()) => {
                    retry_delay_ms = 0;
                    report.last_success_ms = Some(now_ms());
                    report.last_error = None;
                }
                Err(error) => {
                    retry_delay_ms =
                        (retry_delay_ms * 2).clamp(RETRY_DELAY_MIN_MS, RETRY_DELAY_MAX_MS);
                    if matches!(&error, UploadError::Refused(fault) if fault.registered() == Some(FaultCode::ClockSkew))
                    {
                        // No retry gets through until someone sets the
                        // clock: say so loudly (`status` shows it too).
                        tracing::error!(%error, "the backoffice refuses this meter's clock: set it");
                    }
                    tracing::warn!(%error, retry_in_ms = retry_delay_ms, "upload failed");
                    report.last_error = Some(error.to_string());
                }
            }
            self.signals.report.send_replace(report);
        }
    }

    /// Uploads until nothing waits; at least one exchange (which refreshes
    /// the status table) even when nothing waits.
    async fn upload_all(&self) -> Result<(), UploadError> {
        loop {
            let cache = Arc::clone(&self.cache);
            let contexts = Arc::clone(&self.contexts);
            let now = now_ms();
            let pending = blocking(move || {
                cache.pending_batch_ending(UPLOAD_BATCH_READINGS, |readings| {
                    let contexts = contexts
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    batch_end(
                        readings,
                        |context, pid| contexts.has_open_query(context, pid),
                        now,
                    )
                })
            })
            .await?;
            if pending.is_none() && self.cache.pending() > 0 {
                // Held back for an enclosing use still open: look again a
                // little later rather than at once.
                self.held_until_ms
                    .store(now + HOLD_RECHECK_MS, std::sync::atomic::Ordering::Relaxed);
            }
            match pending {
                Some(batch) => self.upload_batch(batch).await?,
                None => return self.refresh_table().await,
            }
            if self.cache.pending() == 0 {
                return Ok(());
            }
        }
    }

    async fn upload_batch(&self, batch: PendingBatch) -> Result<(), UploadError> {
        let cache = Arc::clone(&self.cache);
        let fixed = batch.clone();
        let readings = blocking(move || cache.batch_readings(&fixed)).await?;
        let count = readings.len();
        let request = SendRequest {
            mid: self.mid,
            body: SendBody::Batch(Batch {
                id: batch.id.clone(),
                readings,
                parties: self.known_parties(),
            }),
        };
        let saved = match self.exchange(&request, &batch.id).await {
            Ok(saved) => saved,
            Err(UploadError::Refused(fault))
                if fault.registered() == Some(FaultCode::BatchConflict) =>
            {
                let cache = Arc::clone(&self.cache);
                let id = batch.id.clone();
                blocking(move || cache.set_aside_batch(&batch)).await?;
                tracing::error!(
                    batch = %id,
                    readings = count,
                    reason = %fault.message,
                    "the backoffice applied this batch id before with other readings (205); \
                     the batch is set aside and its readings kept in the cache, never uploaded; \
                     later readings upload under a new instance id"
                );
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        let cache = Arc::clone(&self.cache);
        let kept = saved.clone();
        let id = batch.id.clone();
        blocking(move || cache.confirm_batch(&batch, &kept)).await?;
        lock(&self.table).replace(&saved);
        // With many readings waiting this is the upload's progress line.
        tracing::info!(
            batch = %id,
            readings = count,
            remaining = self.cache.pending(),
            "batch uploaded"
        );
        Ok(())
    }

    fn known_parties(&self) -> Vec<proto::Payer> {
        lock(&self.table).parties(proto::upload::BATCH_PARTIES_MAX)
    }

    async fn refresh_table(&self) -> Result<(), UploadError> {
        let id = self.cache.refresh_id(now_ms());
        let request = SendRequest {
            mid: self.mid,
            body: SendBody::Batch(Batch {
                id: id.clone(),
                readings: Vec::new(),
                parties: self.known_parties(),
            }),
        };
        let saved = self.exchange(&request, &id).await?;
        let cache = Arc::clone(&self.cache);
        let kept = saved.clone();
        blocking(move || cache.save_table(&kept)).await?;
        lock(&self.table).replace(&saved);
        Ok(())
    }

    /// Sends one signed request and checks that the answer is for `batch_id`.
    async fn exchange(
        &self,
        request: &SendRequest,
        batch_id: &BatchId,
    ) -> Result<SavedTable, UploadError> {
        let timeout = Duration::from_millis(UPLOAD_TIMEOUT_MS);
        let packed = now_ms()
            >= self
                .structs_until_ms
                .load(std::sync::atomic::Ordering::Relaxed);
        let form = if packed {
            ReadingsForm::Packed
        } else {
            ReadingsForm::Structs
        };
        let send = |form| async move {
            let params = request.to_params_in(form);
            self.backoffice
                .call(proto::upload::SEND_METHOD, &params, timeout)
                .await
        };
        let value = match send(form).await {
            // What a backoffice that does not know the packed form answers
            // (signed, so nobody without the meter's secret can make the
            // meter switch). The same batch goes again at once as structs,
            // and so do all others for an hour (one node of several may be
            // upgraded later than the rest); then packed is tried again.
            Err(BackofficeError::Refused(fault)) if packed && refuses_packed_readings(&fault) => {
                self.structs_until_ms.store(
                    now_ms().saturating_add(STRUCTS_AFTER_REFUSAL_MS),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tracing::warn!(
                    reason = %fault.message,
                    "the backoffice does not read packed readings (a version before them): \
                     sending readings as structs, about 40 times larger, for an hour"
                );
                send(ReadingsForm::Structs).await?
            }
            sent => sent?,
        };
        let answer = SendAnswer::from_value(&value)
            .map_err(|fault| UploadError::BadAnswer(fault.message))?;
        if answer.batch_id != *batch_id {
            return Err(UploadError::BadAnswer(format!(
                "answer for batch {} instead of {batch_id}",
                answer.batch_id
            )));
        }
        Ok(SavedTable {
            received_ms: now_ms(),
            standings: answer.standings,
            params: answer.params,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Fault;

    #[test]
    fn only_the_old_backoffices_refusal_switches_to_structs() {
        let old = Fault::invalid_params(proto::upload::NO_READINGS_ARRAY);
        assert!(refuses_packed_readings(&old));
        for other in [
            Fault::invalid_params("send: batch needs a string batchId"),
            Fault::invalid_params(
                "send: batch needs an array of readings (or packedReadings, base64)",
            ),
            Fault::invalid_params("send: packedReadings is not a packed block: it is empty"),
            Fault::new(
                FaultCode::InvalidReading,
                "send: batch needs an array of readings",
            ),
        ] {
            assert!(!refuses_packed_readings(&other), "{other}");
        }
    }
}
