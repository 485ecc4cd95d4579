//! Passwords: PBKDF2-HMAC-SHA256 from `ring`, a random salt per customer,
//! the algorithm and iteration count stored with the hash, constant-time
//! verification.

use std::num::NonZeroU32;

use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, pbkdf2};

use crate::registry::PasswordHash;

/// The algorithm name stored with every hash.
pub const ALGORITHM: &str = "pbkdf2-sha256";
/// The least iteration count for real use (OWASP's figure for
/// PBKDF2-HMAC-SHA256). Lower counts are for tests only.
pub const ITERATIONS_MIN: u32 = 600_000;
/// Bytes of salt.
pub const SALT_BYTES: usize = 16;
/// Shortest password accepted.
pub const LENGTH_MIN: usize = 10;
/// Longest password accepted, in bytes (PBKDF2 hashes it on every round).
pub const LENGTH_MAX: usize = 256;

/// 32 random bytes as hex: session tokens, reset tokens, CSRF tokens.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator works");
    proto::record::hex(&bytes)
}

/// Hashes `password` with a new salt.
pub fn hash(password: &str, iterations: NonZeroU32) -> PasswordHash {
    let mut salt = [0u8; SALT_BYTES];
    SystemRandom::new()
        .fill(&mut salt)
        .expect("the system random generator works");
    let mut out = [0u8; digest::SHA256_OUTPUT_LEN];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        &salt,
        password.as_bytes(),
        &mut out,
    );
    PasswordHash {
        algorithm: ALGORITHM.to_owned(),
        iterations: iterations.get(),
        salt_hex: proto::record::hex(&salt),
        hash_hex: proto::record::hex(&out),
    }
}

/// Whether `password` matches `stored`; the comparison takes the same time
/// wherever the first difference is. A record in an unknown form never
/// matches.
pub fn verify(password: &str, stored: &PasswordHash) -> bool {
    let (Some(salt), Some(expected), Some(iterations)) = (
        proto::record::unhex(&stored.salt_hex, SALT_BYTES),
        proto::record::unhex(&stored.hash_hex, digest::SHA256_OUTPUT_LEN),
        NonZeroU32::new(stored.iterations),
    ) else {
        return false;
    };
    stored.algorithm == ALGORITHM
        && pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            password.as_bytes(),
            &expected,
        )
        .is_ok()
}

/// Spends the time a verification would, for logins of unknown accounts,
/// so that timing does not tell whether an account exists.
pub fn verify_nothing(password: &str, iterations: NonZeroU32) {
    let mut out = [0u8; digest::SHA256_OUTPUT_LEN];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        &[0u8; SALT_BYTES],
        password.as_bytes(),
        &mut out,
    );
}

/// The most common passwords (`common-passwords.txt`, lower case), read
/// once.
fn common_passwords() -> &'static std::collections::HashSet<&'static str> {
    static COMMON: std::sync::OnceLock<std::collections::HashSet<&'static str>> =
        std::sync::OnceLock::new();
    COMMON.get_or_init(|| {
        include_str!("common-passwords.txt")
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect()
    })
}

/// Whether `password` is one of the most common passwords, or one with
/// only digits and symbols around one of them (`password123456`).
fn is_common(password: &str) -> bool {
    let lower = password.to_lowercase();
    let core = lower.trim_matches(|c: char| !c.is_alphabetic());
    let common = common_passwords();
    common.contains(lower.as_str()) || (core.chars().count() >= 4 && common.contains(core))
}

/// What the forms say of a new password.
pub const RULE: &str =
    "at least 10 characters; not a common password, your name or your e-mail address";

/// Why a password is too weak, if it is. As NIST SP 800-63B advises:
/// length, and a check against passwords known to be common, not rules
/// of composition (a long passphrase of letters only is good). At least 10
/// characters (at most 256 bytes); not among the 10,000 most common
/// passwords, nor one of them with only digits or symbols around it; not
/// containing the customer's name or e-mail address; at least 5 different
/// characters.
pub fn weakness(password: &str, personal: &[&str]) -> Option<&'static str> {
    let length = password.chars().count();
    if length < LENGTH_MIN {
        return Some("The password must have at least 10 characters.");
    }
    if password.len() > LENGTH_MAX {
        return Some("The password must have at most 256 bytes.");
    }
    if is_common(password) {
        return Some(
            "The password is one of the most common passwords (or one with digits around it): \
             choose another, for example a few unrelated words.",
        );
    }
    let lower = password.to_lowercase();
    if personal
        .iter()
        .any(|word| word.chars().count() >= 3 && lower.contains(&word.to_lowercase()))
    {
        return Some("The password must not contain your name or e-mail address.");
    }
    if password
        .chars()
        .collect::<std::collections::HashSet<_>>()
        .len()
        < 5
    {
        return Some("The password must use at least 5 different characters.");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn few() -> NonZeroU32 {
        NonZeroU32::new(1_000).unwrap()
    }

    #[test]
    fn a_password_verifies_and_others_do_not() {
        let stored = hash("correct horse 42", few());
        assert_eq!(stored.algorithm, ALGORITHM);
        assert_eq!(stored.iterations, 1_000);
        assert!(verify("correct horse 42", &stored));
        assert!(!verify("correct horse 43", &stored));
        assert!(!verify("", &stored));
        let again = hash("correct horse 42", few());
        assert_ne!(stored.salt_hex, again.salt_hex, "a salt per hash");
        assert_ne!(stored.hash_hex, again.hash_hex);
    }

    #[test]
    fn damaged_or_foreign_records_never_match() {
        let stored = hash("correct horse 42", few());
        for broken in [
            PasswordHash {
                algorithm: "md5".into(),
                ..stored.clone()
            },
            PasswordHash {
                iterations: 0,
                ..stored.clone()
            },
            PasswordHash {
                salt_hex: "zz".into(),
                ..stored.clone()
            },
            PasswordHash {
                iterations: 999,
                ..stored.clone()
            },
        ] {
            assert!(!verify("correct horse 42", &broken), "{broken:?}");
        }
    }

    #[test]
    fn weak_passwords_are_named() {
        assert!(weakness("short1", &[]).unwrap().contains("at least 10"));
        assert!(weakness("1234567890", &[]).unwrap().contains("common"));
        assert!(weakness("ada-lovelace-1815", &["Ada", "Lovelace"]).is_some());
        assert!(weakness("aaaaaaaaa1", &[]).is_some());
        assert!(weakness("tulip-Otter-93", &["Ada", "ada@example.org"]).is_none());
    }

    /// Length and a list of common passwords, not composition: a long
    /// passphrase of letters only is accepted; common passwords are not,
    /// whatever their case or the digits and symbols put around them.
    #[test]
    fn common_passwords_are_refused_and_letters_only_passphrases_accepted() {
        for common in [
            "password123456",
            "Password123456",
            "qwertyuiop",
            "1q2w3e4r5t",
            "!!dragon2024!!",
            "MANCHESTER",
        ] {
            assert!(
                weakness(common, &[]).is_some_and(|why| why.contains("common")),
                "{common}"
            );
        }
        for passphrase in [
            "tulipotterlantern",
            "Quiet Harbour Lanterns",
            "onlyletterslong",
        ] {
            assert_eq!(weakness(passphrase, &[]), None, "{passphrase}");
        }
        // The list is the whole shipped one, comments left out.
        assert_eq!(common_passwords().len(), 10_000);
        assert!(!common_passwords().iter().any(|line| line.starts_with('#')));
    }
}
