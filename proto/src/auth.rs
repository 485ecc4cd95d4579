//! Upload signatures: a meter signs each `send` body with its secret
//! (HMAC-SHA256), and the backoffice verifies it. Shared here so that both
//! sides compute exactly the same thing.
//!
//! The signed message is `meterd-upload-v1`, the MID, the time and the body,
//! separated by newlines. The signature travels in HTTP headers next to the
//! body (see `docs/protocol.md`), so a signed body is never re-encoded.

use ring::hmac;

use crate::id::Mid;

/// Header carrying the meter's MID.
pub const MID_HEADER: &str = "x-meter-id";
/// Header carrying the signing time, ms since the Unix epoch.
pub const TIME_HEADER: &str = "x-meter-time";
/// Header carrying the signature, lower-case hex.
pub const SIGNATURE_HEADER: &str = "x-meter-signature";
/// Length of a signature in hex digits (HMAC-SHA256).
pub const SIGNATURE_HEX_LEN: usize = 64;
/// Shortest secret accepted, in bytes.
pub const SECRET_BYTES_MIN: usize = 16;

/// Header carrying the backoffice's signature of its answer to a signed
/// call: the meter's secret over the call's own signature and the answer's
/// body (`Secret::sign_answer`).
pub const ANSWER_SIGNATURE_HEADER: &str = "x-backoffice-signature";

const DOMAIN: &[u8] = b"meterd-upload-v1";
const ANSWER_DOMAIN: &[u8] = b"backoffice-answer-v1";

/// A meter's secret, shared with the backoffice that issued it.
#[derive(Clone)]
pub struct Secret(hmac::Key);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a secret or signature is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The secret is too short.
    #[error("a meter secret must have at least {SECRET_BYTES_MIN} bytes")]
    SecretTooShort,
    /// The signature is not lower-case hex of the right length.
    #[error("the signature is not 64 hex digits")]
    MalformedSignature,
    /// The signature does not match.
    #[error("the signature does not verify")]
    Mismatch,
}

impl Secret {
    /// A secret from its bytes (as written in the meter's secret file, without
    /// surrounding whitespace).
    pub fn new(bytes: &[u8]) -> Result<Secret, AuthError> {
        if bytes.len() < SECRET_BYTES_MIN {
            return Err(AuthError::SecretTooShort);
        }
        Ok(Secret(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    fn context(&self, mid: &Mid, time_ms: u64, body: &[u8]) -> hmac::Context {
        let mut context = hmac::Context::with_key(&self.0);
        context.update(DOMAIN);
        context.update(b"\n");
        context.update(mid.as_str().as_bytes());
        context.update(b"\n");
        context.update(time_ms.to_string().as_bytes());
        context.update(b"\n");
        context.update(body);
        context
    }

    /// The signature of `body` sent by `mid` at `time_ms`, as lower-case hex.
    pub fn sign(&self, mid: &Mid, time_ms: u64, body: &[u8]) -> String {
        let tag = self.context(mid, time_ms, body).sign();
        tag.as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    fn answer_context(&self, request_signature: &str, body: &[u8]) -> hmac::Context {
        let mut context = hmac::Context::with_key(&self.0);
        context.update(ANSWER_DOMAIN);
        context.update(b"\n");
        context.update(request_signature.as_bytes());
        context.update(b"\n");
        context.update(body);
        context
    }

    /// The backoffice's signature of `body`, its answer to the call signed
    /// `request_signature`: bound to that call, so that an answer cannot be
    /// replayed to another one.
    pub fn sign_answer(&self, request_signature: &str, body: &[u8]) -> String {
        let tag = self.answer_context(request_signature, body).sign();
        crate::record::hex(tag.as_ref())
    }

    /// Checks the signature of an answer to the call signed
    /// `request_signature`, in constant time.
    pub fn verify_answer(
        &self,
        request_signature: &str,
        body: &[u8],
        signature: &str,
    ) -> Result<(), AuthError> {
        let tag = crate::record::unhex(signature, 32).ok_or(AuthError::MalformedSignature)?;
        let expected = self.answer_context(request_signature, body).sign();
        if equal_in_constant_time(expected.as_ref(), &tag) {
            Ok(())
        } else {
            Err(AuthError::Mismatch)
        }
    }

    /// Checks a signature in constant time.
    pub fn verify(
        &self,
        mid: &Mid,
        time_ms: u64,
        body: &[u8],
        signature: &str,
    ) -> Result<(), AuthError> {
        let tag = crate::record::unhex(signature, 32).ok_or(AuthError::MalformedSignature)?;
        let expected = self.context(mid, time_ms, body).sign();
        if equal_in_constant_time(expected.as_ref(), &tag) {
            Ok(())
        } else {
            Err(AuthError::Mismatch)
        }
    }
}

/// Compares two secrets or tags. Every byte is compared whatever the earlier
/// ones were, so the time taken tells nothing about how much of a forged
/// value was right (only its length).
pub fn equal_in_constant_time(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len()
        && left
            .iter()
            .zip(right)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_verify_only_for_their_own_call_and_body() {
        let secret = Secret::new(b"0123456789abcdef0123456789abcdef").unwrap();
        let other = Secret::new(b"fedcba9876543210fedcba9876543210").unwrap();
        let mid = Mid::parse("B1-M1").unwrap();
        let call = secret.sign(&mid, 1_000, b"<call/>");
        let next_call = secret.sign(&mid, 1_001, b"<call/>");
        let answer = secret.sign_answer(&call, b"<answer/>");
        assert_eq!(answer.len(), SIGNATURE_HEX_LEN);
        assert_eq!(secret.verify_answer(&call, b"<answer/>", &answer), Ok(()));
        assert_eq!(
            secret.verify_answer(&next_call, b"<answer/>", &answer),
            Err(AuthError::Mismatch),
            "an answer replayed to another call"
        );
        assert_eq!(
            secret.verify_answer(&call, b"<answer />", &answer),
            Err(AuthError::Mismatch)
        );
        assert_eq!(
            other.verify_answer(&call, b"<answer/>", &answer),
            Err(AuthError::Mismatch)
        );
        // A call's own signature is not an answer's: the domains differ.
        assert_eq!(
            secret.verify_answer(&call, b"<call/>", &call),
            Err(AuthError::Mismatch)
        );
        assert_eq!(
            secret.verify_answer(&call, b"<answer/>", "zz"),
            Err(AuthError::MalformedSignature)
        );
    }

    #[test]
    fn signatures_verify_and_any_change_breaks_them() {
        let secret = Secret::new(b"0123456789abcdef0123456789abcdef").unwrap();
        let mid = Mid::parse("B1-M1").unwrap();
        let signature = secret.sign(&mid, 1_000, b"<body/>");
        assert_eq!(signature.len(), 64);
        assert_eq!(secret.verify(&mid, 1_000, b"<body/>", &signature), Ok(()));
        assert_eq!(
            secret.verify(&mid, 1_001, b"<body/>", &signature),
            Err(AuthError::Mismatch)
        );
        assert_eq!(
            secret.verify(&mid, 1_000, b"<body />", &signature),
            Err(AuthError::Mismatch)
        );
        let other = Mid::parse("B1-M2").unwrap();
        assert_eq!(
            secret.verify(&other, 1_000, b"<body/>", &signature),
            Err(AuthError::Mismatch)
        );
        let wrong = Secret::new(b"another secret of enough bytes").unwrap();
        assert_eq!(
            wrong.verify(&mid, 1_000, b"<body/>", &signature),
            Err(AuthError::Mismatch)
        );
        assert_eq!(
            secret.verify(&mid, 1_000, b"<body/>", "zz"),
            Err(AuthError::MalformedSignature)
        );
        assert_eq!(
            secret.verify(&mid, 1_000, b"<body/>", &signature.to_uppercase()),
            Err(AuthError::MalformedSignature)
        );
        assert!(Secret::new(b"short").is_err());
        assert!(equal_in_constant_time(b"abc", b"abc"));
        assert!(!equal_in_constant_time(b"abc", b"abd"));
        assert!(!equal_in_constant_time(b"abc", b"ab"));
    }
}
