//! What the branch knows about its customers, products and meters: the
//! records the store keeps, and the rules for new ones.

use proto::{Amount, Bid, Cid, Mid, Pid};
use serde::{Deserialize, Serialize};

use crate::pricing::TacaHash;

/// Bytes of randomness in a meter's secret.
pub const METER_SECRET_BYTES: usize = 32;
/// Longest customer or product name, in bytes.
pub const NAME_BYTES_MAX: usize = 200;
/// Longest product terms text, in bytes.
pub const TERMS_BYTES_MAX: usize = 10_000;
/// Most components one product may declare.
pub const COMPONENTS_MAX: usize = 100;
/// Most meters one customer may register.
pub const METERS_PER_CUSTOMER_MAX: usize = 100;
/// Most live grants one meter holds; a new grant of the same customer and
/// users replaces the one before it.
pub const GRANTS_PER_METER_MAX: usize = 1_000;

/// A customer's micro-account and what decides its standing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    /// The customer's ID.
    pub cid: Cid,
    /// The name to show.
    pub name: String,
    /// Where statements and reset links go.
    pub email: String,
    /// The lowest balance still in good standing is just above this (0:
    /// prepaid).
    pub credit_limit: Amount,
    /// Marked "deny service" by an operator.
    pub denied: bool,
    /// What the customer gave on the registration form (none for customers
    /// an operator created).
    #[serde(default)]
    pub profile: Option<Profile>,
    /// The password for the web pages (none: no web session possible).
    #[serde(default)]
    pub password: Option<PasswordHash>,
    /// A telephone number the customer registered, as an E.164 global
    /// number (`+` and 7 to 15 digits, `phone_number`), by which a Parlay X
    /// service may name them (`tel:+...`). Unique in the branch; not
    /// verified (a charge by number still needs the holder's grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

impl Customer {
    /// What every batch reads of a payer: the credit limit and whether an
    /// operator denied them.
    pub fn terms(&self) -> crate::store::CustomerTerms {
        (self.credit_limit, self.denied)
    }
}

/// Cox's registration fields beyond the name and e-mail address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Mr, Ms, Dr, ... (may be empty).
    pub salutation: String,
    /// First name.
    pub first_name: String,
    /// Middle name (may be empty).
    pub middle_name: String,
    /// Last name.
    pub last_name: String,
    /// Street and number.
    pub street: String,
    /// City.
    pub city: String,
    /// State or region (may be empty).
    pub state: String,
    /// Postal code.
    pub zip_code: String,
    /// Country.
    pub country: String,
    /// The company keeping the macro-account (a card issuer, a bank).
    pub macroaccount_co: String,
    /// The macro-account's number there, masked: only its last four
    /// letters or digits are kept (`mask_account`), since no funding
    /// adapter needs more.
    pub macroaccount_id: String,
    /// The macro-account's expiry month, 1 to 12.
    pub expiration_month: u8,
    /// The macro-account's expiry year.
    pub expiration_year: u16,
    /// The IANA time zone the customer's pages show times in (empty: the
    /// branch's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub time_zone: String,
}

/// A stored password: PBKDF2-HMAC-SHA256 with its own salt and count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordHash {
    /// Always `pbkdf2-sha256` for now; stored so it can change.
    pub algorithm: String,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// The salt, hex.
    pub salt_hex: String,
    /// The derived key, hex.
    pub hash_hex: String,
}

/// A new customer's record, before it has a CID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The name to show.
    pub name: String,
    /// The e-mail address; unique in the branch.
    pub email: String,
    /// The registration form's other fields.
    pub profile: Option<Profile>,
    /// The web password.
    pub password: Option<PasswordHash>,
}

/// A product under one TACA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// The PID to code into `query` and `commit`.
    pub pid: Pid,
    /// The free test PID: the PID with `T` appended.
    pub test_pid: Pid,
    /// Who is credited for its uses and pays for components inside it.
    pub owner: Cid,
    /// The name to show.
    pub name: String,
    /// What it is, for customers (may be empty).
    #[serde(default)]
    pub description: String,
    /// The terms shown to customers.
    pub terms: String,
    /// The pricing module.
    pub taca: TacaHash,
    /// The most one use may cost, declared at registration and shown with
    /// the terms; a TACA price above it is refused (the use goes to
    /// suspense). `None` only for products stored before maximums existed.
    #[serde(default)]
    pub max_price: Option<Amount>,
    /// The products its owner declared it uses inside (components): only
    /// their uses inside this product's uses are charged to its owner.
    #[serde(default)]
    pub components: Vec<Pid>,
}

/// A customer's authorization for one meter to charge them (see
/// `docs/security.md`). Never deleted: revoking sets `revoked_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Its number in the branch, for revoking.
    pub id: u64,
    /// The meter that may charge.
    pub mid: Mid,
    /// The customer who pays.
    pub cid: Cid,
    /// The local users of the meter's machine it is for.
    pub scope: proto::grant::Scope,
    /// The machine's label as the meter sent it.
    pub label: String,
    /// When the customer approved it, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it expires, if it does.
    pub expires_ms: Option<u64>,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
}

/// A meter's grants, live or not, with their places by customer: what
/// every batch of the meter is authorized by. Shared, not copied, by the
/// batches of the meter while its grants stay the same.
#[derive(Debug, Default)]
pub struct MeterGrants {
    grants: Vec<Grant>,
    by_customer: crate::hashing::Map<Cid, Vec<u32>>,
}

impl MeterGrants {
    /// `grants`, indexed by customer.
    pub fn new(grants: Vec<Grant>) -> MeterGrants {
        let mut by_customer: crate::hashing::Map<Cid, Vec<u32>> = Default::default();
        for (at, grant) in grants.iter().enumerate() {
            let at = u32::try_from(at).unwrap_or(u32::MAX);
            by_customer.entry(grant.cid).or_default().push(at);
        }
        MeterGrants {
            grants,
            by_customer,
        }
    }

    /// Every grant, oldest first.
    pub fn all(&self) -> &[Grant] {
        &self.grants
    }

    /// The grants `cid` gave.
    pub fn of(&self, cid: &Cid) -> impl Iterator<Item = &Grant> {
        self.by_customer
            .get(cid)
            .into_iter()
            .flatten()
            .filter_map(|at| self.grants.get(*at as usize))
    }
}

impl Grant {
    /// True when a use at `time_ms` may be charged through this grant.
    pub fn is_live_at(&self, time_ms: u64) -> bool {
        self.created_ms <= time_ms
            && self.expires_ms.is_none_or(|expires| time_ms < expires)
            && self.revoked_ms.is_none_or(|revoked| time_ms < revoked)
    }

    /// The grant as the meter is told of it.
    pub fn info(&self) -> proto::grant::GrantInfo {
        proto::grant::GrantInfo {
            cid: self.cid,
            scope: self.scope.clone(),
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
        }
    }
}

/// A grant before it has a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGrant {
    /// The meter that may charge.
    pub mid: Mid,
    /// The customer who pays.
    pub cid: Cid,
    /// The local users it is for.
    pub scope: proto::grant::Scope,
    /// The machine's label.
    pub label: String,
    /// When it was approved.
    pub created_ms: u64,
    /// When it expires, if it does.
    pub expires_ms: Option<u64>,
}

/// How long the secret before a rotation still verifies, unless the owner
/// or operator asks otherwise: a day, time to give meterd the new secret
/// file and restart it; an upload signed with the new secret ends it
/// sooner.
pub const ROTATION_GRACE_MS_DEFAULT: u64 = 24 * 3600 * 1000;
/// The longest grace an operator may give the secret before a rotation.
pub const ROTATION_GRACE_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// A registered meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    /// The meter's ID.
    pub mid: Mid,
    /// Who registered it.
    pub owner: Cid,
    /// The HMAC secret it signs uploads with, lower-case hex.
    pub secret_hex: String,
    /// The secret before the last rotation, while it still verifies.
    #[serde(default)]
    pub previous: Option<PreviousSecret>,
    /// The last rotation of its secret: when, and by whom.
    #[serde(default)]
    pub rotated: Option<Change>,
    /// Its revocation, for good: every later upload and grant call of this
    /// MID is refused (fault 210). Never undone: the owner registers a new
    /// meter, under a new MID.
    #[serde(default)]
    pub revoked: Option<Change>,
    /// For a service's credential (Parlay X Payment): the product it
    /// charges for. Such a meter answers SOAP payment calls and grant
    /// calls, never uploads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Pid>,
}

/// A meter's secret before its last rotation, and until when it verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousSecret {
    /// The secret, lower-case hex.
    pub secret_hex: String,
    /// It verifies uploads signed before this time (ms since the Unix
    /// epoch, the backoffice's clock), unless an upload signed with the
    /// new secret came first.
    pub valid_until_ms: u64,
}

/// Who changed a meter's record, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Who.
    pub by: Actor,
}

/// Who may rotate or revoke a meter's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Actor {
    /// The operator, with the operator token.
    Operator,
    /// The customer who registered the meter, on the web pages.
    Owner(Cid),
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Operator => f.write_str("the operator"),
            Actor::Owner(cid) => write!(f, "its owner {cid}"),
        }
    }
}

/// Which of a meter's secrets an upload verified with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretUsed {
    /// The current one.
    Current,
    /// The one before the last rotation, inside its grace.
    Previous,
}

impl Meter {
    /// The secrets that verify an upload arriving at `now_ms`: the current
    /// one, then the previous one while its grace lasts. None once revoked.
    pub fn secrets_at(&self, now_ms: u64) -> Vec<(&str, SecretUsed)> {
        if self.revoked.is_some() {
            return Vec::new();
        }
        let mut secrets = vec![(self.secret_hex.as_str(), SecretUsed::Current)];
        if let Some(previous) = &self.previous
            && now_ms < previous.valid_until_ms
        {
            secrets.push((previous.secret_hex.as_str(), SecretUsed::Previous));
        }
        secrets
    }
}

/// Why a new record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A text field is empty or too long.
    #[error("{field} must be 1 to {max} bytes")]
    BadText {
        /// The field.
        field: &'static str,
        /// Its limit.
        max: usize,
    },
    /// The e-mail address is not one.
    #[error("not an e-mail address")]
    BadEmail,
    /// Another customer has this e-mail address.
    #[error("this e-mail address is already registered")]
    EmailTaken,
    /// The telephone number is not a global number.
    #[error("not a telephone number in international form (+ and 7 to 15 digits)")]
    BadPhone,
    /// Another customer has this telephone number.
    #[error("this telephone number is already registered")]
    PhoneTaken,
    /// No such customer.
    #[error("no customer {0}")]
    UnknownCustomer(Cid),
    /// No such product.
    #[error("no product {0}")]
    UnknownProduct(Pid),
    /// No such meter.
    #[error("no meter {0}")]
    UnknownMeter(Mid),
    /// The meter was revoked: its secret can no longer change, and no
    /// grant can be made for it.
    #[error("meter {0} was revoked")]
    MeterRevoked(Mid),
    /// A grace for the previous secret longer than allowed.
    #[error("the old secret may stay valid at most {} hours", ROTATION_GRACE_MS_MAX / 3_600_000)]
    GraceTooLong,
    /// No such grant (or not the customer's own).
    #[error("no grant {0}")]
    UnknownGrant(u64),
    /// A declared component that is not another registered product's PID.
    #[error("{0} is not another registered product's PID")]
    BadComponent(Pid),
    /// The customer has registered the most meters allowed.
    #[error("a customer registers at most {0} meters")]
    TooManyMeters(usize),
    /// The meter holds the most live grants allowed.
    #[error("a meter holds at most {0} live grants")]
    TooManyGrants(usize),
    /// Too many components declared.
    #[error("a product declares at most {0} components")]
    TooManyComponents(usize),
    /// A maximum price per use that is not positive.
    #[error("the maximum price per use must be more than 0, not {0}")]
    BadMaxPrice(Amount),
    /// The serial space of this branch is used up.
    #[error("no more IDs of this kind can be issued")]
    SerialsExhausted,
}

/// Checks a text field: present, bounded, no control characters.
/// A card or account number as it is kept and shown: `**** ` and its last
/// four letters or digits (all masked when it has four or fewer). Masking a
/// masked number gives it back.
pub fn mask_account(number: &str) -> String {
    let already = number.strip_prefix("****").is_some_and(|rest| {
        rest.is_empty()
            || rest.strip_prefix(' ').is_some_and(|last| {
                last.len() == 4 && last.chars().all(|c| c.is_ascii_alphanumeric())
            })
    });
    if already {
        return number.to_owned();
    }
    let kept: Vec<char> = number.chars().filter(char::is_ascii_alphanumeric).collect();
    if kept.len() <= 4 {
        return "****".to_owned();
    }
    let last: String = kept[kept.len() - 4..].iter().collect();
    format!("**** {last}")
}

pub fn check_text(field: &'static str, text: &str, max: usize) -> Result<(), RegistryError> {
    let fine = !text.trim().is_empty() && text.len() <= max && !text.chars().any(char::is_control);
    if fine {
        Ok(())
    } else {
        Err(RegistryError::BadText { field, max })
    }
}

/// A plausible e-mail address: one `@` with text on both sides, a dot in
/// the domain, no spaces, at most 254 bytes.
pub fn check_email(email: &str) -> Result<(), RegistryError> {
    let Some((local, domain)) = email.split_once('@') else {
        return Err(RegistryError::BadEmail);
    };
    let fine = !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        // No display-name or list syntax: `x<victim@example.org>` would be
        // another address to a mail library, and `a@b.org,c@d.org` two.
        && !email.contains(['<', '>', '"', ',', ';', '(', ')', '[', ']', '\\']);
    if fine {
        Ok(())
    } else {
        Err(RegistryError::BadEmail)
    }
}

/// Fewest and most digits of a telephone number (E.164 allows at most 15,
/// country code included; the shortest national numbers have 4 after a
/// 3-digit code).
pub const PHONE_DIGITS: std::ops::RangeInclusive<usize> = 7..=15;

/// `typed` as an E.164 global number, `+` and its digits only: the form
/// stored and looked up. Takes what people type and what RFC 3966's
/// global numbers carry: a leading `+`, digits, and the visual separators
/// space, `-`, `.`, `(`, `)`. A number without `+` (local: which country?),
/// a first digit 0, letters, or another character is refused.
pub fn phone_number(typed: &str) -> Result<String, RegistryError> {
    let rest = typed
        .trim()
        .strip_prefix('+')
        .ok_or(RegistryError::BadPhone)?;
    let mut number = String::from("+");
    for c in rest.chars() {
        match c {
            '0'..='9' => number.push(c),
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return Err(RegistryError::BadPhone),
        }
    }
    let digits = number.len() - 1;
    if !PHONE_DIGITS.contains(&digits) || number.as_bytes()[1] == b'0' {
        return Err(RegistryError::BadPhone);
    }
    Ok(number)
}

/// Checks a stored telephone number is in the form `phone_number` makes.
pub fn check_phone(phone: &str) -> Result<(), RegistryError> {
    match phone_number(phone) {
        Ok(number) if number == phone => Ok(()),
        _ => Err(RegistryError::BadPhone),
    }
}

/// The IDs a branch issues for serial number `serial`.
pub fn customer_id(bid: &Bid, serial: u64) -> Result<Cid, RegistryError> {
    Cid::new(bid, &serial.to_string()).map_err(|_| RegistryError::SerialsExhausted)
}

/// The PID and test PID for serial number `serial`.
pub fn product_ids(bid: &Bid, serial: u64) -> Result<(Pid, Pid), RegistryError> {
    let pid = Pid::new(bid, &serial.to_string()).map_err(|_| RegistryError::SerialsExhausted)?;
    let test_pid =
        Pid::new(bid, &format!("{serial}T")).map_err(|_| RegistryError::SerialsExhausted)?;
    Ok((pid, test_pid))
}

/// The MID for serial number `serial`.
pub fn meter_id(bid: &Bid, serial: u64) -> Result<Mid, RegistryError> {
    Mid::new(bid, &serial.to_string()).map_err(|_| RegistryError::SerialsExhausted)
}

/// A new random meter secret, as lower-case hex.
pub fn new_meter_secret() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; METER_SECRET_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator works");
    proto::record::hex(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telephone_numbers_are_kept_as_global_numbers_and_nothing_else_passes() {
        for (typed, kept) in [
            ("+49 151 1234 5678", "+4915112345678"),
            ("+1 (212) 555-0100", "+12125550100"),
            (" +44.20.7946.0958 ", "+442079460958"),
            ("+1234567", "+1234567"),
        ] {
            assert_eq!(phone_number(typed).unwrap(), kept, "{typed}");
            check_phone(kept).unwrap();
        }
        for bad in [
            "",
            "+",
            "0151 1234 5678",
            "+0151 1234",
            "+123456",
            "+1234567890123456",
            "+49 151 CALL NOW",
            "+49151;ext=1",
            "+49\u{0}151",
            "++49151123456",
        ] {
            assert!(phone_number(bad).is_err(), "{bad:?}");
        }
        assert!(check_phone("+49 151 1234 5678").is_err(), "not stored form");
    }

    #[test]
    fn account_numbers_keep_their_last_four_and_masking_twice_changes_nothing() {
        assert_eq!(mask_account("4000-1234-5678"), "**** 5678");
        assert_eq!(mask_account("DE89 3704 0044 0532 0130 00"), "**** 3000");
        assert_eq!(mask_account("1234"), "****");
        assert_eq!(mask_account(""), "****");
        assert_eq!(mask_account("****<b>"), "****", "not a masked number");
        for number in ["4000-1234-5678", "1234", "DE89 3704"] {
            let masked = mask_account(number);
            assert_eq!(mask_account(&masked), masked);
        }
    }

    #[test]
    fn texts_and_emails_are_checked() {
        assert!(check_text("name", "Ada Lovelace", NAME_BYTES_MAX).is_ok());
        assert!(check_text("name", "  ", NAME_BYTES_MAX).is_err());
        assert!(check_text("name", "a\u{0}b", NAME_BYTES_MAX).is_err());
        assert!(check_text("name", &"x".repeat(201), NAME_BYTES_MAX).is_err());
        assert!(check_email("ada@example.org").is_ok());
        for bad in [
            "ada",
            "@example.org",
            "ada@",
            "ada@org",
            "a b@example.org",
            "ada@@example.org",
            "ada@.org",
            "x<victim@example.org>",
            "\"Ada\" <ada@example.org>",
            "ada@example.org,eve@example.org",
            "ada@example.org;eve@example.org",
            "ada(x)@example.org",
        ] {
            assert_eq!(check_email(bad), Err(RegistryError::BadEmail), "{bad}");
        }
    }

    #[test]
    fn ids_carry_the_branch_and_test_pids_end_in_t() {
        let bid = Bid::parse("EU2").unwrap();
        assert_eq!(customer_id(&bid, 42).unwrap().as_str(), "EU2-C42");
        let (pid, test_pid) = product_ids(&bid, 7).unwrap();
        assert_eq!((pid.as_str(), test_pid.as_str()), ("EU2-P7", "EU2-P7T"));
        assert_eq!(meter_id(&bid, 3).unwrap().as_str(), "EU2-M3");
        assert!(
            product_ids(&bid, 9_999_999_999_999_999_999).is_ok(),
            "19 digits and T fit"
        );
        assert_eq!(
            product_ids(&bid, u64::MAX),
            Err(RegistryError::SerialsExhausted)
        );
    }

    #[test]
    fn meter_secrets_are_random_and_long_enough_to_sign() {
        let (one, two) = (new_meter_secret(), new_meter_secret());
        assert_eq!(one.len(), METER_SECRET_BYTES * 2);
        assert_ne!(one, two);
        assert!(proto::auth::Secret::new(one.as_bytes()).is_ok());
    }
}
