//! Device codes for grants, after RFC 8628: a meter asks for a code in a
//! signed call, the customer enters the short user code on the web pages
//! while logged in, sees the meter and approves or refuses, and the meter
//! learns the outcome by polling. Where one process owns the branch (sled),
//! codes live in its memory: a pending code lost in a restart costs the
//! customer a new `meterd grant`, nothing more. Where nodes share a
//! PostgreSQL store, codes live in its database (`store::postgres::codes`),
//! so that the meter, the customer's browser and the meter's polls may
//! reach different nodes. The grants themselves are durable, in the store.

use std::collections::HashMap;
use std::sync::Mutex;

use proto::grant::{GrantInfo, GrantRequest, PollStatus};
use proto::{Cid, Mid};

/// How long a device code may be entered, in ms.
pub const CODE_VALID_MS: u64 = 10 * 60 * 1000;
/// Seconds a meter waits between two polls.
pub const POLL_INTERVAL_S: u64 = 5;
/// Most codes pending in the branch at once.
pub const CODES_MAX: usize = 10_000;
/// Most codes pending for one meter at once.
pub const CODES_PER_METER_MAX: usize = 5;
/// Most codes pending for the meters of one owner at once, so that nobody
/// fills the branch's allowance with meters of their own.
pub const CODES_PER_OWNER_MAX: usize = 10;
/// The letters of user codes: no vowels (no words), none easily confused.
pub const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
/// Letters in a user code (shown as two groups of four): 20^8, about 2.6e10.
pub const USER_CODE_LETTERS: usize = 8;

/// Why a code was not issued or not approved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// Too many codes pending, for this meter or for the branch.
    #[error("too many grant codes are pending; wait until they expire or are used")]
    TooMany,
    /// No pending code matches (unknown, expired, used, or another
    /// customer's: these are told apart to nobody).
    #[error("this code is unknown, used or expired; ask the meter for a new one")]
    Unknown,
    /// The database that keeps the codes failed; nothing was decided.
    #[error("grant codes cannot be reached: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone)]
enum State {
    Pending,
    Approved(GrantInfo),
    Denied,
}

#[derive(Debug, Clone)]
struct Code {
    device_code: String,
    request: GrantRequest,
    /// Who registered the meter that asked.
    owner: Cid,
    expires_ms: u64,
    state: State,
}

#[derive(Default)]
struct Codes {
    /// By normalized user code.
    by_user: HashMap<String, Code>,
    /// User codes by device code.
    by_device: HashMap<String, String>,
}

impl Codes {
    fn forget_expired(&mut self, now_ms: u64) {
        let by_device = &mut self.by_device;
        self.by_user.retain(|_, code| {
            let keep = code.expires_ms > now_ms;
            if !keep {
                by_device.remove(&code.device_code);
            }
            keep
        });
    }

    fn remove(&mut self, user_code: &str) {
        if let Some(code) = self.by_user.remove(user_code) {
            self.by_device.remove(&code.device_code);
        }
    }
}

/// The pending device codes of the branch.
pub struct DeviceCodes {
    codes: Mutex<Codes>,
    /// Where nodes share the branch: the codes in its database (`codes`
    /// is then unused).
    shared: Option<crate::store::postgres::codes::PgCodes>,
    /// How long a code may be entered, in ms (`CODE_VALID_MS` unless the
    /// operator set another).
    valid_ms: std::sync::atomic::AtomicU64,
}

impl Default for DeviceCodes {
    fn default() -> Self {
        DeviceCodes {
            codes: Mutex::default(),
            shared: None,
            valid_ms: std::sync::atomic::AtomicU64::new(CODE_VALID_MS),
        }
    }
}

/// The shortest and longest lifetimes an operator may give codes, in ms.
pub const CODE_VALID_MS_RANGE: std::ops::RangeInclusive<u64> = 1_000..=3_600_000;

/// A code as the customer types it: letters only, upper case.
pub fn normalize(typed: &str) -> String {
    typed
        .chars()
        .filter(char::is_ascii_alphabetic)
        .map(|c| c.to_ascii_uppercase())
        .take(USER_CODE_LETTERS + 1)
        .collect()
}

/// A user code shown as `XXXX-XXXX`.
pub fn display(user_code: &str) -> String {
    let (first, second) = user_code.split_at(user_code.len() / 2);
    format!("{first}-{second}")
}

fn random_user_code() -> String {
    use ring::rand::SecureRandom;
    let mut code = String::with_capacity(USER_CODE_LETTERS);
    let rng = ring::rand::SystemRandom::new();
    while code.len() < USER_CODE_LETTERS {
        let mut byte = [0u8; 1];
        rng.fill(&mut byte)
            .expect("the system random generator works");
        // 240 = 12 * 20: reject the rest so every letter is equally likely.
        if byte[0] < 240 {
            code.push(char::from(
                USER_CODE_ALPHABET[usize::from(byte[0]) % USER_CODE_ALPHABET.len()],
            ));
        }
    }
    code
}

fn lock(codes: &Mutex<Codes>) -> std::sync::MutexGuard<'_, Codes> {
    codes
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DeviceCodes {
    /// Codes kept in the branch's database, shared by every node.
    pub fn shared(codes: crate::store::postgres::codes::PgCodes) -> DeviceCodes {
        DeviceCodes {
            shared: Some(codes),
            ..DeviceCodes::default()
        }
    }

    /// How long a code may be entered, in ms.
    pub fn valid_ms(&self) -> u64 {
        self.valid_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets how long new codes may be entered (within
    /// `CODE_VALID_MS_RANGE`); false, and nothing changed, outside it.
    pub fn set_valid_ms(&self, valid_ms: u64) -> bool {
        let fine = CODE_VALID_MS_RANGE.contains(&valid_ms);
        if fine {
            self.valid_ms
                .store(valid_ms, std::sync::atomic::Ordering::Relaxed);
        }
        fine
    }

    /// Issues a code for `request` from a meter of `owner`: `(device code,
    /// user code)`, both new.
    pub fn issue(
        &self,
        request: GrantRequest,
        owner: Cid,
        now_ms: u64,
    ) -> Result<(String, String), CodeError> {
        if let Some(shared) = &self.shared {
            let device_code = crate::registry::new_meter_secret();
            let expires_ms = now_ms.saturating_add(self.valid_ms());
            let user_code = shared.issue(
                &request,
                owner,
                &device_code,
                now_ms,
                expires_ms,
                random_user_code,
            )?;
            return Ok((device_code, user_code));
        }
        let mut codes = lock(&self.codes);
        codes.forget_expired(now_ms);
        let of_meter = codes
            .by_user
            .values()
            .filter(|code| code.request.mid == request.mid)
            .count();
        let of_owner = codes
            .by_user
            .values()
            .filter(|code| code.owner == owner)
            .count();
        if codes.by_user.len() >= CODES_MAX
            || of_meter >= CODES_PER_METER_MAX
            || of_owner >= CODES_PER_OWNER_MAX
        {
            return Err(CodeError::TooMany);
        }
        let user_code = loop {
            let candidate = random_user_code();
            if !codes.by_user.contains_key(&candidate) {
                break candidate;
            }
        };
        let device_code = crate::registry::new_meter_secret();
        codes
            .by_device
            .insert(device_code.clone(), user_code.clone());
        codes.by_user.insert(
            user_code.clone(),
            Code {
                device_code: device_code.clone(),
                request,
                owner,
                expires_ms: now_ms + self.valid_ms(),
                state: State::Pending,
            },
        );
        Ok((device_code, user_code))
    }

    /// Where the code `device_code` of meter `mid` stands. An approval or a
    /// refusal is answered once; the code is then gone.
    pub fn poll(&self, mid: &Mid, device_code: &str, now_ms: u64) -> Result<PollStatus, CodeError> {
        if let Some(shared) = &self.shared {
            return shared.poll(mid, device_code, now_ms);
        }
        let mut codes = lock(&self.codes);
        codes.forget_expired(now_ms);
        let Some(user_code) = codes.by_device.get(device_code).cloned() else {
            return Ok(PollStatus::Expired);
        };
        let code = &codes.by_user[&user_code];
        if code.request.mid != *mid {
            return Ok(PollStatus::Expired);
        }
        let status = match &code.state {
            State::Pending => return Ok(PollStatus::Pending),
            State::Approved(grant) => PollStatus::Approved(grant.clone()),
            State::Denied => PollStatus::Denied,
        };
        codes.remove(&user_code);
        Ok(status)
    }

    /// The request behind a pending `user_code`, when `cid` may decide it
    /// (it asks for `cid`'s grant).
    pub fn pending_for(
        &self,
        user_code: &str,
        cid: &Cid,
        now_ms: u64,
    ) -> Result<Option<GrantRequest>, CodeError> {
        let user_code = normalize(user_code);
        if let Some(shared) = &self.shared {
            return shared.pending_for(&user_code, cid, now_ms);
        }
        let mut codes = lock(&self.codes);
        codes.forget_expired(now_ms);
        Ok(codes.by_user.get(&user_code).and_then(|code| {
            (matches!(code.state, State::Pending) && code.request.cid == *cid)
                .then(|| code.request.clone())
        }))
    }

    /// Decides a pending code as `cid`: `record` makes the grant durable
    /// (approval) and answers it for the meter; `None` refuses. A code is
    /// decided once.
    pub fn decide<E>(
        &self,
        user_code: &str,
        cid: &Cid,
        now_ms: u64,
        record: Option<impl FnOnce(&GrantRequest) -> Result<GrantInfo, E>>,
    ) -> Result<Result<GrantRequest, E>, CodeError> {
        let user_code = normalize(user_code);
        if let Some(shared) = &self.shared {
            let request = shared
                .take_for_decision(&user_code, cid, now_ms, record.is_some())?
                .ok_or(CodeError::Unknown)?;
            let Some(record) = record else {
                return Ok(Ok(request));
            };
            // The code is `deciding`: no other node can decide it meanwhile.
            return match record(&request) {
                Ok(grant) => {
                    // The grant stands even where this is not recorded: the
                    // meter then hears the code expired and asks again.
                    if let Err(error) = shared.finish_decision(&user_code, Some(&grant)) {
                        tracing::warn!(mid = %request.mid, %error, "a grant was made but its code could not be marked approved");
                    }
                    Ok(Ok(request))
                }
                Err(error) => {
                    // Best effort: a code left `deciding` expires unused.
                    let _ = shared.finish_decision(&user_code, None);
                    Ok(Err(error))
                }
            };
        }
        let mut codes = lock(&self.codes);
        codes.forget_expired(now_ms);
        let code = codes
            .by_user
            .get_mut(&user_code)
            .filter(|code| matches!(code.state, State::Pending) && code.request.cid == *cid)
            .ok_or(CodeError::Unknown)?;
        // Recorded under the lock, so two approvals of one code cannot both
        // make a grant.
        match record {
            Some(record) => match record(&code.request) {
                Ok(grant) => code.state = State::Approved(grant),
                Err(error) => return Ok(Err(error)),
            },
            None => code.state = State::Denied,
        }
        Ok(Ok(code.request.clone()))
    }
}

/// The rules every keeper of codes follows, each run on empty codes: in
/// memory here, in PostgreSQL by the store's tests.
#[cfg(test)]
pub(crate) mod rules {
    use super::*;
    use proto::grant::Scope;

    fn request(mid: &str, cid: &str) -> GrantRequest {
        GrantRequest {
            mid: mid.parse().unwrap(),
            cid: cid.parse().unwrap(),
            label: "host".into(),
            scope: Scope::Machine,
        }
    }

    fn owner() -> Cid {
        "B1-C9".parse().unwrap()
    }

    fn info(cid: Cid) -> GrantInfo {
        GrantInfo {
            cid,
            scope: Scope::Machine,
            created_ms: 1,
            expires_ms: None,
        }
    }

    /// A rule, run on empty codes.
    pub(crate) type Rule = fn(&DeviceCodes);

    /// Each rule by name.
    pub(crate) const RULES: &[(&str, Rule)] = &[
        ("approved once, answered once", approved_once_answered_once),
        ("expiry, refusals, limits", expiry_refusals_and_limits),
        (
            "one owner cannot take every code",
            one_owner_cannot_take_every_code,
        ),
        ("lifetime set by the operator", lifetime_set_by_the_operator),
    ];

    #[test]
    fn codes_in_memory_follow_the_rules() {
        for (name, rule) in RULES {
            eprintln!("rule: {name}");
            rule(&DeviceCodes::default());
        }
    }

    fn approved_once_answered_once(codes: &DeviceCodes) {
        let mid: Mid = "B1-M1".parse().unwrap();
        let bob: Cid = "B1-C4".parse().unwrap();
        let eve: Cid = "B1-C5".parse().unwrap();
        let (device, user) = codes.issue(request("B1-M1", "B1-C4"), owner(), 0).unwrap();
        assert_eq!(user.len(), USER_CODE_LETTERS);
        assert!(user.bytes().all(|b| USER_CODE_ALPHABET.contains(&b)));
        let typed = display(&user).to_lowercase();
        assert_eq!(codes.poll(&mid, &device, 1).unwrap(), PollStatus::Pending);
        assert!(
            codes.pending_for(&typed, &eve, 1).unwrap().is_none(),
            "not Eve's"
        );
        let approve = |cid: &Cid| {
            codes.decide(
                &typed,
                cid,
                2,
                Some(|r: &GrantRequest| Ok::<_, ()>(info(r.cid))),
            )
        };
        assert_eq!(approve(&eve).unwrap_err(), CodeError::Unknown);
        // A grant that cannot be made leaves the code to decide again.
        let failing = Some(|_: &GrantRequest| Err::<GrantInfo, _>("disk full"));
        assert_eq!(codes.decide(&typed, &bob, 2, failing), Ok(Err("disk full")));
        assert_eq!(codes.poll(&mid, &device, 2).unwrap(), PollStatus::Pending);
        assert!(codes.pending_for(&typed, &bob, 1).unwrap().is_some());
        approve(&bob).unwrap().unwrap();
        assert_eq!(approve(&bob).unwrap_err(), CodeError::Unknown, "used");
        let other: Mid = "B1-M2".parse().unwrap();
        assert_eq!(codes.poll(&other, &device, 3).unwrap(), PollStatus::Expired);
        assert_eq!(
            codes.poll(&mid, &device, 3).unwrap(),
            PollStatus::Approved(info(bob))
        );
        assert_eq!(
            codes.poll(&mid, &device, 4).unwrap(),
            PollStatus::Expired,
            "once"
        );
    }

    fn expiry_refusals_and_limits(codes: &DeviceCodes) {
        let mid: Mid = "B1-M1".parse().unwrap();
        let bob: Cid = "B1-C4".parse().unwrap();
        let (device, user) = codes.issue(request("B1-M1", "B1-C4"), owner(), 0).unwrap();
        let refuse = None::<fn(&GrantRequest) -> Result<GrantInfo, ()>>;
        codes.decide(&user, &bob, 1, refuse).unwrap().unwrap();
        assert_eq!(codes.poll(&mid, &device, 2).unwrap(), PollStatus::Denied);
        let (device, user) = codes.issue(request("B1-M1", "B1-C4"), owner(), 0).unwrap();
        let late = CODE_VALID_MS;
        assert!(codes.pending_for(&user, &bob, late).unwrap().is_none());
        assert_eq!(
            codes.poll(&mid, &device, late).unwrap(),
            PollStatus::Expired
        );
        for _ in 0..CODES_PER_METER_MAX {
            codes
                .issue(request("B1-M1", "B1-C4"), owner(), late)
                .unwrap();
        }
        assert_eq!(
            codes.issue(request("B1-M1", "B1-C4"), owner(), late),
            Err(CodeError::TooMany)
        );
        assert!(
            codes
                .issue(request("B1-M2", "B1-C4"), owner(), late)
                .is_ok()
        );
        assert!(
            codes
                .issue(request("B1-M1", "B1-C4"), owner(), 2 * late)
                .is_ok()
        );
    }

    fn one_owner_cannot_take_every_code(codes: &DeviceCodes) {
        for meter in 0..CODES_PER_OWNER_MAX {
            let mid = format!("B1-M{}", 1 + meter / CODES_PER_METER_MAX);
            codes.issue(request(&mid, "B1-C4"), owner(), 0).unwrap();
        }
        assert_eq!(
            codes.issue(request("B1-M99", "B1-C4"), owner(), 0),
            Err(CodeError::TooMany)
        );
        let someone_else: Cid = "B1-C10".parse().unwrap();
        assert!(
            codes
                .issue(request("B1-M50", "B1-C4"), someone_else, 0)
                .is_ok()
        );
    }

    fn lifetime_set_by_the_operator(codes: &DeviceCodes) {
        assert_eq!(codes.valid_ms(), CODE_VALID_MS);
        assert!(!codes.set_valid_ms(0) && !codes.set_valid_ms(3_600_001));
        assert_eq!(codes.valid_ms(), CODE_VALID_MS, "unchanged");
        assert!(codes.set_valid_ms(2_000));
        let mid: Mid = "B1-M1".parse().unwrap();
        let (device, _) = codes.issue(request("B1-M1", "B1-C4"), owner(), 0).unwrap();
        assert_eq!(
            codes.poll(&mid, &device, 1_999).unwrap(),
            PollStatus::Pending
        );
        assert_eq!(
            codes.poll(&mid, &device, 2_000).unwrap(),
            PollStatus::Expired
        );
    }
}
