//! Decoding and authenticating a meter's `send` call: the signature
//! headers, the meter's secret, the time window and replays, then the body.

use std::collections::VecDeque;

use crate::hashing::Set;
use std::sync::atomic::Ordering;

use proto::auth::Secret;
use proto::upload::{SendBody, SendRequest};
use proto::xmlrpc::{Limits, Value, parse_call};
use proto::{BatchId, Fault, FaultCode, Mid};

use super::{Backoffice, SEEN_SIGNATURES_MAX, SIGNATURE_WINDOW_MS, internal, lock};
use crate::registry::SecretUsed;
use crate::store::{BatchKey, Store};

/// The HTTP headers of an upload.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signed<'a> {
    /// `X-Meter-Id`.
    pub mid: Option<&'a str>,
    /// `X-Meter-Time`.
    pub time: Option<&'a str>,
    /// `X-Meter-Signature`.
    pub signature: Option<&'a str>,
}

/// Signature headers that verified a body with the secret of the meter
/// they name (`Backoffice::verify`).
#[derive(Debug)]
pub struct Verified<'a> {
    /// The meter whose secret signed the body.
    pub mid: Mid,
    /// `X-Meter-Time`.
    pub time_ms: u64,
    /// `X-Meter-Signature`, hex.
    pub signature: &'a str,
    /// The secret that verified it, which signs the answer.
    pub secret: Secret,
    /// The product whose service this credential is (it may make grant
    /// calls, never upload).
    pub service: Option<proto::Pid>,
}

impl Verified<'_> {
    /// Refuses a body that names another meter than the one that signed it.
    pub fn names(&self, mid: &Mid) -> Result<(), Fault> {
        if *mid != self.mid {
            return Err(Fault::new(
                FaultCode::BadSignature,
                "the X-Meter-Id header names another meter than the request",
            ));
        }
        Ok(())
    }
}

/// Signatures seen within the window, oldest first.
#[derive(Default)]
pub(super) struct SeenSignatures {
    order: VecDeque<(u64, String)>,
    set: Set<String>,
}

impl SeenSignatures {
    /// False when `signature` was seen already; remembers it otherwise.
    fn admit(&mut self, signature: &str, time_ms: u64, now_ms: u64) -> bool {
        while let Some((time, _)) = self.order.front() {
            let expired = now_ms.saturating_sub(*time) > 2 * SIGNATURE_WINDOW_MS;
            if !expired && self.order.len() < SEEN_SIGNATURES_MAX {
                break;
            }
            let (_, old) = self.order.pop_front().expect("front exists");
            self.set.remove(&old);
        }
        if !self.set.insert(signature.to_owned()) {
            return false;
        }
        self.order.push_back((time_ms, signature.to_owned()));
        true
    }
}

/// An upload signed at `time_ms`, further than the window from `now_ms`:
/// says by how much and which way, so that the meter's owner can set its
/// clock (a meter's retries would never get through).
fn clock_skew(time_ms: u64, now_ms: u64) -> Fault {
    let off_s = time_ms.abs_diff(now_ms) / 1000;
    let way = if time_ms > now_ms {
        "ahead of"
    } else {
        "behind"
    };
    Fault::new(
        FaultCode::ClockSkew,
        format!(
            "the meter's clock is {off_s} s {way} the backoffice's (signed at {}, received at {}); \
             at most {} s is accepted: set the meter's clock; nothing was applied",
            proto::time::utc_text(time_ms),
            proto::time::utc_text(now_ms),
            SIGNATURE_WINDOW_MS / 1000
        ),
    )
}

impl<S: Store> Backoffice<S> {
    /// Answers one upload at `now_ms`.
    pub fn send(&self, body: &[u8], signed: Signed<'_>, now_ms: u64) -> Result<Value, Fault> {
        let outcome = self
            .verify(signed, body, now_ms)
            .and_then(|verified| self.send_counted(body, verified, now_ms));
        self.count_refused(outcome)
    }

    /// Answers one upload at `now_ms` whose signature `verify` checked.
    pub(crate) fn send_verified(
        &self,
        body: &[u8],
        verified: Verified<'_>,
        now_ms: u64,
    ) -> Result<Value, Fault> {
        if let Some(pid) = &verified.service {
            return Err(self.refused(Fault::new(
                FaultCode::Unauthorized,
                format!(
                    "{} is the service credential of {pid}: it charges over Parlay X \
                     Payment and asks grants, and uploads nothing",
                    verified.mid
                ),
            )));
        }
        let outcome = self.send_counted(body, verified, now_ms);
        self.count_refused(outcome)
    }

    fn count_refused(&self, outcome: Result<Value, Fault>) -> Result<Value, Fault> {
        outcome.map_err(|fault| self.refused(fault))
    }

    /// Counts and logs a refused meter call (`uploads_refused`).
    pub(crate) fn refused(&self, fault: Fault) -> Fault {
        if fault.code != FaultCode::InternalError.code() {
            self.counters
                .uploads_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(code = fault.code, fault = %fault.message, "upload refused");
        fault
    }

    /// The signature is over the raw body and was verified before this:
    /// nothing of the body is decoded for someone who cannot sign it.
    fn send_counted(
        &self,
        body: &[u8],
        verified: Verified<'_>,
        now_ms: u64,
    ) -> Result<Value, Fault> {
        let mut phases = super::Phases::start();
        self.still_durable()?;
        let request = match SendRequest::decode_extended(body, Limits::BACKOFFICE) {
            Some(request) => request,
            None => {
                let call = parse_call(body, Limits::BACKOFFICE).map_err(Fault::from)?;
                if call.name != proto::upload::SEND_METHOD {
                    return Err(Fault::method_not_found(&call.name));
                }
                SendRequest::from_call(&call)?
            }
        };
        verified.names(&request.mid)?;
        if let SendBody::Minimal(_) = &request.body
            && let Some(answer) = self.minimal_resent(&request, &verified, now_ms)?
        {
            return Ok(answer);
        }
        let signature = self.admit(&verified, now_ms)?;
        let readings = match &request.body {
            SendBody::Batch(batch) => batch.readings.len(),
            SendBody::Minimal(events) => events.len(),
        };
        self.counters
            .readings_received
            .fetch_add(readings as u64, Ordering::Relaxed);
        let id = match &request.body {
            SendBody::Batch(batch) => batch.id.clone(),
            // Cox's form has no batch id: its signature names it.
            SendBody::Minimal(_) => {
                BatchId::parse(&format!("sig:{}", &signature[..32])).expect("hex is a valid id")
            }
        };
        let key = BatchKey {
            mid: request.mid,
            id,
        };
        let digest = match &request.body {
            SendBody::Batch(batch) => Some(proto::upload::readings_digest(&batch.readings)),
            // Cox's form is named by its signature, which covers the body.
            SendBody::Minimal(_) => None,
        };
        if let Some(applied) = self
            .store
            .applied_batch(&key)
            .map_err(|error| internal(&error))?
        {
            return self.repeated(&key, digest.as_ref(), applied, &request.body, now_ms);
        }
        phases.mark(super::Phase::Decoding);
        self.apply(&key, digest, &request, now_ms, phases)
    }

    /// Cox's form has no batch id: it is named by its signature. The very
    /// same signed body sent again (a client whose answer was lost) gets
    /// the stored answer, even outside the signature window, instead of a
    /// replay fault; it is applied once. `None` when it was not applied.
    fn minimal_resent(
        &self,
        request: &SendRequest,
        verified: &Verified<'_>,
        now_ms: u64,
    ) -> Result<Option<Value>, Fault> {
        // Only the meter's own signature of this very body (verified
        // already) names the batch.
        let key = BatchKey {
            mid: request.mid,
            id: BatchId::parse(&format!("sig:{}", &verified.signature[..32]))
                .expect("hex is a valid id"),
        };
        let Some(applied) = self
            .store
            .applied_batch(&key)
            .map_err(|error| internal(&error))?
        else {
            return Ok(None);
        };
        self.repeated(&key, None, applied, &request.body, now_ms)
            .map(Some)
    }

    /// Checks what the signature headers say before the body is read: the
    /// meter is registered here and not revoked, the time is a number and a
    /// signature of the right form is there. Enough to refuse most
    /// strangers without reading a byte of what they send; `verify` checks
    /// the rest.
    pub fn check_signed_headers(&self, signed: Signed<'_>) -> Result<Mid, Fault> {
        self.signer(signed).map(|signer| signer.0)
    }

    /// The registered, unrevoked meter the headers name, with their time
    /// and signature.
    fn signer<'a>(
        &self,
        signed: Signed<'a>,
    ) -> Result<(Mid, crate::registry::Meter, u64, &'a str), Fault> {
        let bad = |why: &str| Fault::new(FaultCode::BadSignature, why.to_owned());
        let mid = signed
            .mid
            .ok_or_else(|| bad("the X-Meter-Id header is missing"))?;
        let mid = Mid::parse(mid).map_err(|_| bad("the X-Meter-Id header is not a meter id"))?;
        let meter = self
            .store
            .meter(&mid)
            .map_err(|error| internal(&error))?
            .ok_or_else(|| {
                Fault::new(
                    FaultCode::UnknownMeter,
                    format!("{mid} is not registered here"),
                )
            })?;
        if let Some(revoked) = &meter.revoked {
            return Err(Fault::new(
                FaultCode::MeterRevoked,
                format!(
                    "meter {mid} was revoked by {} at {}; nothing was applied. \
                     Register a new meter (a new MID and secret) to upload again",
                    revoked.by,
                    proto::time::utc_text(revoked.at_ms)
                ),
            ));
        }
        let time_ms: u64 = signed
            .time
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| bad("the X-Meter-Time header is missing or not a number"))?;
        let signature = signed
            .signature
            .filter(|signature| {
                signature.len() == proto::auth::SIGNATURE_HEX_LEN
                    && signature.bytes().all(|byte| byte.is_ascii_hexdigit())
            })
            .ok_or_else(|| bad("the X-Meter-Signature header is missing or not a signature"))?;
        Ok((mid, meter, time_ms, signature))
    }

    /// Checks that the signature headers verify `body` with the secret of
    /// the registered meter they name (or, inside the grace after a
    /// rotation, the one before it: the record is read once, so a rotation
    /// committing meanwhile is seen whole or not at all), before anything
    /// of `body` is decoded. A revoked meter is refused with 210 before any
    /// signature is looked at. The caller still checks that the body names
    /// the same meter (`Verified::names`) and, for a new request, the time
    /// window and replays (`admit`).
    pub fn verify<'a>(
        &self,
        signed: Signed<'a>,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Verified<'a>, Fault> {
        let (mid, meter, time_ms, signature) = self.signer(signed)?;
        let mut refusal = None;
        for (secret_hex, used) in meter.secrets_at(now_ms) {
            let secret = Secret::new(secret_hex.as_bytes()).map_err(|error| internal(&error))?;
            match secret.verify(&mid, time_ms, body, signature) {
                Ok(()) => {
                    if used == SecretUsed::Current && meter.previous.is_some() {
                        // The meter has the new secret: the old one is done.
                        self.store
                            .retire_previous_secret(&mid, &meter.secret_hex)
                            .map_err(|error| internal(&error))?;
                        tracing::info!(%mid, "the previous secret verifies no more: the meter signs with the new one");
                    }
                    return Ok(Verified {
                        mid,
                        time_ms,
                        signature,
                        secret,
                        service: meter.service,
                    });
                }
                Err(error) => {
                    refusal.get_or_insert(error);
                }
            }
        }
        let mut why = refusal.map_or_else(
            || "no secret of this meter verifies".to_owned(),
            |error| error.to_string(),
        );
        if let Some(rotated) = &meter.rotated {
            why.push_str(&format!(
                "; this meter's secret was rotated by {} at {}: put the new secret in meterd's \
                 secret file",
                rotated.by,
                proto::time::utc_text(rotated.at_ms)
            ));
        }
        Err(Fault::new(FaultCode::BadSignature, why))
    }

    /// Admits a verified request made now: its time is within the window
    /// and its signature was never seen before. Returns the signature.
    pub fn admit(&self, verified: &Verified<'_>, now_ms: u64) -> Result<String, Fault> {
        if verified.time_ms.abs_diff(now_ms) > SIGNATURE_WINDOW_MS {
            return Err(clock_skew(verified.time_ms, now_ms));
        }
        if !lock(&self.seen).admit(verified.signature, verified.time_ms, now_ms) {
            return Err(Fault::new(
                FaultCode::Replay,
                "this signature was used already",
            ));
        }
        Ok(verified.signature.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replayed_signatures_are_refused_and_old_ones_forgotten() {
        let mut seen = SeenSignatures::default();
        assert!(seen.admit("a", 1_000, 1_000));
        assert!(!seen.admit("a", 1_000, 2_000));
        assert!(seen.admit("b", 2_000, 2_000));
        let later = 1_000 + 2 * SIGNATURE_WINDOW_MS + 1;
        assert!(seen.admit("c", later, later));
        assert!(
            seen.admit("a", later, later),
            "forgotten once outside twice the window"
        );
    }
}
