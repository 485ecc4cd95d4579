//! WS-Security UsernameToken with a password digest (OASIS Username Token
//! Profile 1.0), how a service authenticates its Parlay X calls: the user
//! name is the service credential's MID, the password its secret, and the
//! digest `Base64(SHA-1(nonce + created + password))` proves it without
//! sending it. A token is accepted once: its creation time must be within
//! `WINDOW_MS` of the backoffice's clock and its nonce unseen in that
//! window. Plain-text passwords are refused.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use base64::Engine as _;
use proto::soap::Element;

/// The WS-Security extension namespace.
pub const WSSE_NS: &str = proto::soap::WSSE_NS;
/// The WS-Security utility namespace (`Created`).
pub const WSU_NS: &str =
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd";
/// The password type of a digest.
pub const DIGEST_TYPE: &str = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordDigest";
/// The password type of a plain-text password (refused).
pub const TEXT_TYPE: &str = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordText";

/// How far a token's creation time may be from the backoffice's clock.
pub const WINDOW_MS: u64 = 5 * 60 * 1000;
/// Nonces remembered (each for `WINDOW_MS` past its token's time): more
/// tokens than this inside one window are refused until some age out.
pub const NONCES_MAX: usize = 1_000_000;
/// Shortest and longest nonce, in bytes.
pub const NONCE_BYTES: std::ops::RangeInclusive<usize> = 8..=64;

/// Why a call's token is refused. Every refusal is the same fault to the
/// caller (nothing tells a guesser which part was wrong); this says it in
/// the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `wsse:Security` header with a `UsernameToken`.
    #[error("no WS-Security UsernameToken")]
    Missing,
    /// A part is missing or malformed.
    #[error("the UsernameToken's {0} is missing or malformed")]
    Malformed(&'static str),
    /// A plain-text password (or another type).
    #[error("only password digests are accepted")]
    NotDigest,
    /// The creation time is outside the window.
    #[error("the token's creation time is more than 5 minutes from the backoffice's clock")]
    Stale,
    /// The nonce was used already inside the window.
    #[error("the token's nonce was used already")]
    Replayed,
    /// Too many tokens inside one window.
    #[error("too many tokens in the last 5 minutes")]
    Busy,
    /// The digest does not match the user's password.
    #[error("the digest does not match")]
    BadDigest,
}

/// A UsernameToken as read from the `Security` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsernameToken {
    /// The user name (a service credential's MID).
    pub username: String,
    /// The digest sent, decoded.
    pub digest: Vec<u8>,
    /// The nonce, decoded.
    pub nonce: Vec<u8>,
    /// The creation time as sent (the digest covers this text).
    pub created: String,
    /// The creation time, ms since the Unix epoch.
    pub created_ms: u64,
}

/// The `wsse:Security` header entry, if the envelope has one.
pub fn security_header(headers: &[Element]) -> Option<&Element> {
    headers.iter().find(|header| header.is(WSSE_NS, "Security"))
}

/// The UsernameToken of the `Security` header.
pub fn username_token(security: &Element) -> Result<UsernameToken, TokenError> {
    let token = security
        .children
        .iter()
        .find(|child| child.is(WSSE_NS, "UsernameToken"))
        .ok_or(TokenError::Missing)?;
    let part = |name: &'static str, namespace: &str| {
        token
            .children
            .iter()
            .find(|child| child.is(namespace, name))
            .ok_or(TokenError::Malformed(name))
    };
    let username = part("Username", WSSE_NS)?.text.trim().to_owned();
    if username.is_empty() || username.len() > 64 {
        return Err(TokenError::Malformed("Username"));
    }
    let password = part("Password", WSSE_NS)?;
    // The profile's default type is PasswordText.
    if password.attribute(None, "Type").map(str::trim) != Some(DIGEST_TYPE) {
        return Err(TokenError::NotDigest);
    }
    let base64 = base64::engine::general_purpose::STANDARD;
    let digest = base64
        .decode(password.text.trim())
        .ok()
        .filter(|digest| digest.len() == 20)
        .ok_or(TokenError::Malformed("Password"))?;
    let nonce = part("Nonce", WSSE_NS)?;
    // Base64Binary is the only encoding the profile defines (and the default).
    if let Some(encoding) = nonce.attribute(None, "EncodingType")
        && !encoding.trim().ends_with("#Base64Binary")
    {
        return Err(TokenError::Malformed("Nonce"));
    }
    let nonce = base64
        .decode(nonce.text.trim())
        .ok()
        .filter(|nonce| NONCE_BYTES.contains(&nonce.len()))
        .ok_or(TokenError::Malformed("Nonce"))?;
    let created = part("Created", WSU_NS)?.text.trim().to_owned();
    let created_ms =
        proto::time::parse_rfc3339_ms(&created).ok_or(TokenError::Malformed("Created"))?;
    Ok(UsernameToken {
        username,
        digest,
        nonce,
        created,
        created_ms,
    })
}

/// `SHA-1(nonce + created + password)`: the digest a token carries.
pub fn digest(nonce: &[u8], created: &str, password: &str) -> [u8; 20] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(nonce);
    context.update(created.as_bytes());
    context.update(password.as_bytes());
    let mut out = [0u8; 20];
    out.copy_from_slice(context.finish().as_ref());
    out
}

impl UsernameToken {
    /// Whether the token's digest is that of `password`, compared in
    /// constant time.
    pub fn proves(&self, password: &str) -> bool {
        let expected = digest(&self.nonce, &self.created, password);
        proto::auth::equal_in_constant_time(&expected, &self.digest)
    }

    /// Checks the creation time against `now_ms`.
    pub fn check_time(&self, now_ms: u64) -> Result<(), TokenError> {
        if self.created_ms.abs_diff(now_ms) > WINDOW_MS {
            return Err(TokenError::Stale);
        }
        Ok(())
    }
}

/// Nonces seen inside the window, per user: a token is accepted once.
#[derive(Default)]
pub struct Nonces {
    inner: Mutex<NonceBook>,
}

#[derive(Default)]
struct NonceBook {
    seen: HashSet<(String, Vec<u8>)>,
    /// In the order remembered, with when each may be forgotten.
    order: VecDeque<(u64, (String, Vec<u8>))>,
}

impl Nonces {
    /// Remembers the token's nonce, or refuses it as a replay; tokens past
    /// the window are forgotten first. Call after the digest verified, so
    /// that strangers cannot fill the book.
    pub fn admit(&self, token: &UsernameToken, now_ms: u64) -> Result<(), TokenError> {
        let mut book = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some((until, _)) = book.order.front() {
            if *until >= now_ms && book.order.len() < NONCES_MAX {
                break;
            }
            if *until >= now_ms {
                // Full of nonces still inside the window: refuse new ones
                // rather than forget one that could be replayed.
                return Err(TokenError::Busy);
            }
            let (_, key) = book.order.pop_front().expect("front exists");
            book.seen.remove(&key);
        }
        let key = (token.username.clone(), token.nonce.clone());
        if book.seen.contains(&key) {
            return Err(TokenError::Replayed);
        }
        book.seen.insert(key.clone());
        book.order.push_back((token.remembered_until(now_ms), key));
        Ok(())
    }
}

impl UsernameToken {
    /// Until when its nonce must be remembered: until the token's time
    /// leaves the window on both sides.
    pub fn remembered_until(&self, now_ms: u64) -> u64 {
        self.created_ms.max(now_ms).saturating_add(WINDOW_MS)
    }

    /// The key its nonce is remembered under in the store: SHA-256 of the
    /// user name, a zero byte and the nonce (a user name holds no zero).
    pub fn nonce_key(&self) -> [u8; 32] {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(self.username.as_bytes());
        context.update(&[0]);
        context.update(&self.nonce);
        let mut key = [0; 32];
        key.copy_from_slice(context.finish().as_ref());
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::soap::{ENVELOPE_NS, Limits, parse_envelope};

    const NOW: u64 = 1_764_547_200_000; // 2025-12-01T00:00:00Z

    fn header(password_type: &str, digest: &str, nonce: &str, created: &str) -> Vec<Element> {
        let text = format!(
            "<s:Envelope xmlns:s=\"{ENVELOPE_NS}\"><s:Header><wsse:Security \
             xmlns:wsse=\"{WSSE_NS}\" s:mustUnderstand=\"1\"><wsse:UsernameToken>\
             <wsse:Username>B1-M2</wsse:Username><wsse:Password Type=\"{password_type}\">{digest}\
             </wsse:Password><wsse:Nonce EncodingType=\"http://docs.oasis-open.org/wss/2004/01/\
             oasis-200401-wss-soap-message-security-1.0#Base64Binary\">{nonce}</wsse:Nonce>\
             <wsu:Created xmlns:wsu=\"{WSU_NS}\">{created}</wsu:Created></wsse:UsernameToken>\
             </wsse:Security></s:Header><s:Body/></s:Envelope>"
        );
        parse_envelope(text.as_bytes(), Limits::PAYMENT)
            .unwrap()
            .headers
    }

    fn signed(password: &str, nonce: &[u8], created: &str) -> Vec<Element> {
        let base64 = base64::engine::general_purpose::STANDARD;
        header(
            DIGEST_TYPE,
            &base64.encode(digest(nonce, created, password)),
            &base64.encode(nonce),
            created,
        )
    }

    fn token(headers: &[Element]) -> Result<UsernameToken, TokenError> {
        username_token(security_header(headers).ok_or(TokenError::Missing)?)
    }

    #[test]
    fn a_digest_proves_the_password_it_was_made_with_and_no_other() {
        // Computed independently (Python's hashlib and base64).
        let base64 = base64::engine::general_purpose::STANDARD;
        let nonce = base64.decode("d36e316282959a9ed4c89851497a717f").unwrap();
        assert_eq!(
            base64.encode(digest(&nonce, "2003-07-16T01:24:32Z", "secret")),
            "4ALa+AEX2WfUvZjj7A/0agWZ3qk="
        );
        let headers = signed("s3cret", b"0123456789abcdef", "2025-12-01T00:00:10+00:00");
        let token = token(&headers).unwrap();
        assert_eq!(token.username, "B1-M2");
        assert!(token.proves("s3cret"));
        assert!(!token.proves("s3cret "));
        assert_eq!(token.check_time(NOW), Ok(()));
        // Created at NOW + 10 s: accepted within 5 minutes either side.
        let created = NOW + 10_000;
        assert_eq!(token.check_time(created + WINDOW_MS), Ok(()));
        assert_eq!(
            token.check_time(created + WINDOW_MS + 1),
            Err(TokenError::Stale)
        );
        assert_eq!(token.check_time(created - WINDOW_MS), Ok(()));
        assert_eq!(
            token.check_time(created - WINDOW_MS - 1),
            Err(TokenError::Stale)
        );
    }

    #[test]
    fn plain_text_short_nonces_and_bad_times_are_refused() {
        let base64 = base64::engine::general_purpose::STANDARD;
        let nonce = base64.encode(b"0123456789abcdef");
        let twenty = base64.encode([0u8; 20]);
        assert_eq!(
            token(&header(TEXT_TYPE, "s3cret", &nonce, "2025-12-01T00:00:00Z")),
            Err(TokenError::NotDigest)
        );
        assert_eq!(
            token(&header(
                DIGEST_TYPE,
                &twenty,
                &base64.encode(b"short"),
                "2025-12-01T00:00:00Z"
            )),
            Err(TokenError::Malformed("Nonce"))
        );
        assert_eq!(
            token(&header(DIGEST_TYPE, &twenty, &nonce, "yesterday")),
            Err(TokenError::Malformed("Created"))
        );
        assert_eq!(
            token(&header(DIGEST_TYPE, "AAAA", &nonce, "2025-12-01T00:00:00Z")),
            Err(TokenError::Malformed("Password"))
        );
        assert!(security_header(&[]).is_none());
    }

    #[test]
    fn a_nonce_is_accepted_once_inside_the_window_per_user() {
        let nonces = Nonces::default();
        let headers = signed("s3cret", b"0123456789abcdef", "2025-12-01T00:00:00Z");
        let first = token(&headers).unwrap();
        assert_eq!(nonces.admit(&first, NOW), Ok(()));
        assert_eq!(nonces.admit(&first, NOW + 1), Err(TokenError::Replayed));
        // Another user's token with the same nonce is another token.
        let other = UsernameToken {
            username: "B1-M3".to_owned(),
            ..first.clone()
        };
        assert_eq!(nonces.admit(&other, NOW + 2), Ok(()));
        // Past the window the nonce is forgotten, and the time check
        // refuses the token anyway.
        assert_eq!(nonces.admit(&first, NOW + WINDOW_MS + 1), Ok(()));
        assert_eq!(
            first.check_time(NOW + WINDOW_MS + 1),
            Err(TokenError::Stale)
        );
    }
}
