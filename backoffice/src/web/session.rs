//! Visits, sessions and login throttling: kept in memory for a branch one
//! process serves (a restart logs everyone out and forgets failed attempts,
//! which loses nothing of value), in the branch's database when several
//! nodes share it (`store::postgres::web`), so that each node knows every
//! session and counts every attempt.
//!
//! Every visitor gets a session cookie on their first page; the session
//! holds the CSRF token its forms carry and, after a login, the CID. A login
//! replaces the session's token so a token planted before the login is
//! useless after it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::Cid;

use super::password::random_token;

/// The session cookie's name.
pub const COOKIE: &str = "bo_session";
/// How long a session lasts after its last page.
pub const IDLE_MAX: Duration = Duration::from_secs(2 * 3600);
/// Sessions kept at most; the oldest anonymous ones go first.
pub const SESSIONS_MAX: usize = 100_000;
/// Failed logins allowed per account, and per address, within the window.
pub const FAILURES_MAX: usize = 9;
/// Per-address allowance (many people may share an address).
pub const ADDRESS_FAILURES_MAX: usize = 30;
/// The window failed logins are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Keys whose failures are remembered at most.
pub const THROTTLE_KEYS_MAX: usize = 100_000;
/// Registrations accepted from one address within the window.
pub const REGISTRATIONS_MAX: usize = 20;
/// Reset mails sent to one account within the window: more would only fill
/// the outbox and the customer's mailbox.
pub const RESET_MAILS_MAX: usize = 5;
/// Changes to a new telephone number an account may make within the
/// window: "Another account has this telephone number" must not let one
/// account try every number (`docs/security.md`).
pub const PHONE_CHANGES_MAX: usize = 5;
/// How long a password reset link works.
pub const RESET_VALID: Duration = Duration::from_secs(3600);
/// Reset links outstanding at most.
pub const RESETS_MAX: usize = 10_000;

/// One visitor's session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The cookie's value.
    pub token: String,
    /// The token every form of this session carries.
    pub csrf: String,
    /// The customer, once logged in.
    pub cid: Option<Cid>,
    last_seen: Instant,
}

impl Session {
    /// A session seen now.
    pub(crate) fn new(token: String, csrf: String, cid: Option<Cid>) -> Session {
        Session {
            token,
            csrf,
            cid,
            last_seen: Instant::now(),
        }
    }
}

/// A login attempt reserved by [`Sessions::reserve_attempt`], to give back
/// when it succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt(AttemptAt);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptAt {
    Memory(Instant),
    Shared(Option<i64>),
}

/// Sessions, failed logins and reset links.
#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
    resets: Mutex<HashMap<String, (Cid, Instant)>>,
    /// Where several nodes keep them instead (`None`: in this memory).
    shared: Option<crate::store::postgres::web::PgSessions>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sessions {
    /// Sessions kept in the branch's database, shared by every node.
    pub fn shared(store: crate::store::postgres::web::PgSessions) -> Sessions {
        Sessions {
            shared: Some(store),
            ..Sessions::default()
        }
    }

    /// The live session with this cookie value, touched; or a new anonymous
    /// one (the caller sets its cookie).
    pub fn visit(&self, token: Option<&str>) -> (Session, bool) {
        if let Some(shared) = &self.shared {
            return shared.visit(token);
        }
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        if let Some(session) = token.and_then(|token| sessions.get_mut(token))
            && now.duration_since(session.last_seen) < IDLE_MAX
        {
            session.last_seen = now;
            return (session.clone(), false);
        }
        if let Some(token) = token {
            sessions.remove(token);
        }
        let session = Session {
            token: random_token(),
            csrf: random_token(),
            cid: None,
            last_seen: now,
        };
        make_room(&mut sessions, now);
        sessions.insert(session.token.clone(), session.clone());
        (session, true)
    }

    /// Logs `cid` in: the visit gets a new token, a new CSRF token and the
    /// CID.
    pub fn log_in(&self, old_token: &str, cid: Cid) -> Session {
        if let Some(shared) = &self.shared {
            // Not kept: the visitor is not logged in (fail closed).
            return shared
                .log_in(old_token, cid)
                .unwrap_or_else(|| Session::new(random_token(), random_token(), None));
        }
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        sessions.remove(old_token);
        let session = Session {
            token: random_token(),
            csrf: random_token(),
            cid: Some(cid),
            last_seen: now,
        };
        make_room(&mut sessions, now);
        sessions.insert(session.token.clone(), session.clone());
        session
    }

    /// Ends a session.
    pub fn log_out(&self, token: &str) {
        if let Some(shared) = &self.shared {
            return shared.log_out(token);
        }
        lock(&self.sessions).remove(token);
    }

    /// Ends every session of `cid` (after a password reset).
    pub fn log_out_everywhere(&self, cid: Cid) {
        if let Some(shared) = &self.shared {
            return shared.log_out_everywhere(cid);
        }
        lock(&self.sessions).retain(|_, session| session.cid != Some(cid));
    }

    /// Whether logins for these keys are refused for now.
    pub fn throttled(&self, account: &str, address: &str) -> bool {
        if let Some(shared) = &self.shared {
            return shared.over(&[
                (&account_key(account), FAILURES_MAX),
                (&address_key(address), ADDRESS_FAILURES_MAX),
            ]);
        }
        let now = Instant::now();
        let mut failures = lock(&self.failures);
        let mut recent = |key: &str| {
            failures.get_mut(key).map_or(0, |times| {
                while times
                    .front()
                    .is_some_and(|time| now.duration_since(*time) > FAILURE_WINDOW)
                {
                    times.pop_front();
                }
                times.len()
            })
        };
        recent(&account_key(account)) >= FAILURES_MAX
            || recent(&address_key(address)) >= ADDRESS_FAILURES_MAX
    }

    /// Counts a registration from `address`: false (and not counted) once
    /// the address made [`REGISTRATIONS_MAX`] within the window. Each one
    /// costs a password derivation, so they are bounded like failed logins.
    pub fn may_register(&self, address: &str) -> bool {
        self.within_allowance(format!("register:{address}"), REGISTRATIONS_MAX)
    }

    /// Counts a reset mail to `cid`: false (and not counted) once the
    /// account was sent [`RESET_MAILS_MAX`] within the window.
    pub fn may_mail_reset(&self, cid: Cid) -> bool {
        self.within_allowance(format!("reset:{cid}"), RESET_MAILS_MAX)
    }

    /// Counts a change of `cid`'s telephone number to a new one: false (and
    /// not counted) once the account made [`PHONE_CHANGES_MAX`] within the
    /// window, whether or not they were taken.
    pub fn may_change_phone(&self, cid: Cid) -> bool {
        self.within_allowance(format!("phone:{cid}"), PHONE_CHANGES_MAX)
    }

    /// Counts one more event under `key` unless `max` happened within the
    /// window already.
    fn within_allowance(&self, key: String, max: usize) -> bool {
        if let Some(shared) = &self.shared {
            return shared.count_within(&[(&key, max)]).is_some();
        }
        let now = Instant::now();
        let mut failures = lock(&self.failures);
        make_throttle_room(&mut failures, now);
        let times = failures.entry(key).or_default();
        while times
            .front()
            .is_some_and(|time| now.duration_since(*time) > FAILURE_WINDOW)
        {
            times.pop_front();
        }
        if times.len() >= max {
            return false;
        }
        times.push_back(now);
        true
    }

    /// Reserves one login attempt for `account` from `address` before its
    /// password is hashed: counted as a failure now (so parallel guesses
    /// cannot all be checked before the first is counted), refused
    /// (`None`, nothing counted) once either allowance is used. A success
    /// gives it back with [`Sessions::attempt_succeeded`]. This also bounds
    /// the hashing an address can queue to its allowance per window.
    pub fn reserve_attempt(&self, account: &str, address: &str) -> Option<Attempt> {
        if let Some(shared) = &self.shared {
            // The address's event last: its id is the one given back.
            return shared
                .count_within(&[
                    (&account_key(account), FAILURES_MAX),
                    (&address_key(address), ADDRESS_FAILURES_MAX),
                ])
                .map(|event| Attempt(AttemptAt::Shared(Some(event))));
        }
        let now = Instant::now();
        let mut failures = lock(&self.failures);
        make_throttle_room(&mut failures, now);
        let keys = [
            (account_key(account), FAILURES_MAX),
            (address_key(address), ADDRESS_FAILURES_MAX),
        ];
        for (key, max) in &keys {
            if let Some(times) = failures.get_mut(key) {
                while times
                    .front()
                    .is_some_and(|time| now.duration_since(*time) > FAILURE_WINDOW)
                {
                    times.pop_front();
                }
                if times.len() >= *max {
                    return None;
                }
            }
        }
        for (key, _) in keys {
            failures.entry(key).or_default().push_back(now);
        }
        Some(Attempt(AttemptAt::Memory(now)))
    }

    /// The attempt reserved at `at` logged in: the account's failures are
    /// forgotten, and the attempt no longer counts against the address.
    pub fn attempt_succeeded(&self, account: &str, address: &str, attempt: Attempt) {
        let at = match attempt.0 {
            AttemptAt::Memory(at) => at,
            AttemptAt::Shared(event) => {
                if let Some(shared) = &self.shared {
                    shared.forget(&account_key(account), event);
                }
                return;
            }
        };
        let mut failures = lock(&self.failures);
        failures.remove(&account_key(account));
        if let Some(times) = failures.get_mut(&address_key(address))
            && let Some(position) = times.iter().position(|time| *time == at)
        {
            times.remove(position);
        }
    }

    /// Counts a failed login against the account and the address.
    pub fn failed(&self, account: &str, address: &str) {
        if let Some(shared) = &self.shared {
            return shared.record(&[&account_key(account), &address_key(address)]);
        }
        let now = Instant::now();
        let mut failures = lock(&self.failures);
        make_throttle_room(&mut failures, now);
        for key in [account_key(account), address_key(address)] {
            let times = failures.entry(key).or_default();
            times.push_back(now);
            if times.len() > ADDRESS_FAILURES_MAX {
                times.pop_front();
            }
        }
    }

    /// Forgets an account's failures after a successful login.
    pub fn succeeded(&self, account: &str) {
        if let Some(shared) = &self.shared {
            return shared.forget(&account_key(account), None);
        }
        lock(&self.failures).remove(&account_key(account));
    }

    /// A new one-time reset token for `cid`.
    pub fn new_reset(&self, cid: Cid) -> String {
        if let Some(shared) = &self.shared {
            // Not kept: the link mailed will not work (fail closed).
            return shared.new_reset(cid).unwrap_or_else(random_token);
        }
        let now = Instant::now();
        let mut resets = lock(&self.resets);
        resets.retain(|_, (_, made)| now.duration_since(*made) < RESET_VALID);
        if resets.len() >= RESETS_MAX {
            resets.clear();
        }
        let token = random_token();
        resets.insert(token.clone(), (cid, now));
        token
    }

    /// The customer a live reset token is for, without using it up.
    pub fn reset_for(&self, token: &str) -> Option<Cid> {
        if let Some(shared) = &self.shared {
            return shared.reset_for(token);
        }
        let resets = lock(&self.resets);
        resets
            .get(token)
            .filter(|(_, made)| made.elapsed() < RESET_VALID)
            .map(|(cid, _)| *cid)
    }

    /// Uses up a reset token: the customer it was for, once. Every other
    /// link outstanding for that customer dies with it.
    pub fn take_reset(&self, token: &str) -> Option<Cid> {
        if let Some(shared) = &self.shared {
            return shared.take_reset(token);
        }
        let mut resets = lock(&self.resets);
        let cid = resets
            .remove(token)
            .filter(|(_, made)| made.elapsed() < RESET_VALID)
            .map(|(cid, _)| cid)?;
        resets.retain(|_, (other, _)| *other != cid);
        Some(cid)
    }

    /// Voids every reset link outstanding for `cid` (they logged in: a
    /// link mailed before is of no more use to them, only to whoever may
    /// read their mail).
    pub fn void_resets(&self, cid: Cid) {
        if let Some(shared) = &self.shared {
            return shared.void_resets(cid);
        }
        lock(&self.resets).retain(|_, (other, _)| *other != cid);
    }
}

/// Keeps the throttle's memory bounded: forgets what is out of the window,
/// and everything if that is not enough.
fn make_throttle_room(failures: &mut HashMap<String, VecDeque<Instant>>, now: Instant) {
    if failures.len() >= THROTTLE_KEYS_MAX {
        failures.retain(|_, times| {
            times
                .back()
                .is_some_and(|time| now.duration_since(*time) <= FAILURE_WINDOW)
        });
        if failures.len() >= THROTTLE_KEYS_MAX {
            failures.clear();
        }
    }
}

fn account_key(account: &str) -> String {
    format!("account:{}", account.trim().to_lowercase())
}

fn address_key(address: &str) -> String {
    format!("address:{address}")
}

fn make_room(sessions: &mut HashMap<String, Session>, now: Instant) {
    if sessions.len() < SESSIONS_MAX {
        return;
    }
    sessions.retain(|_, session| now.duration_since(session.last_seen) < IDLE_MAX);
    if sessions.len() >= SESSIONS_MAX {
        // Still full of live sessions: drop the oldest anonymous visits.
        let mut anonymous: Vec<(Instant, String)> = sessions
            .values()
            .filter(|session| session.cid.is_none())
            .map(|session| (session.last_seen, session.token.clone()))
            .collect();
        anonymous.sort();
        for (_, token) in anonymous.into_iter().take(SESSIONS_MAX / 10 + 1) {
            sessions.remove(&token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_replaces_the_token_and_logout_ends_it() {
        let sessions = Sessions::default();
        let (visit, new) = sessions.visit(None);
        assert!(new);
        assert_eq!(sessions.visit(Some(&visit.token)).0.csrf, visit.csrf);
        let cid = Cid::parse("B1-C1").unwrap();
        let logged_in = sessions.log_in(&visit.token, cid);
        assert_ne!(logged_in.token, visit.token);
        assert_ne!(logged_in.csrf, visit.csrf);
        let (old, fresh) = sessions.visit(Some(&visit.token));
        assert!(fresh && old.cid.is_none(), "the old token is dead");
        assert_eq!(sessions.visit(Some(&logged_in.token)).0.cid, Some(cid));
        sessions.log_out(&logged_in.token);
        assert!(sessions.visit(Some(&logged_in.token)).0.cid.is_none());
    }

    #[test]
    fn the_tenth_failure_in_a_row_is_throttled_and_success_clears_it() {
        let sessions = Sessions::default();
        for _ in 0..FAILURES_MAX {
            assert!(!sessions.throttled("B1-C1", "127.0.0.1"));
            sessions.failed("B1-C1", "127.0.0.1");
        }
        assert!(sessions.throttled("b1-c1", "127.0.0.2"), "per account");
        assert!(
            !sessions.throttled("B1-C2", "127.0.0.1"),
            "address allows more"
        );
        sessions.succeeded("B1-C1");
        assert!(!sessions.throttled("B1-C1", "127.0.0.1"));
    }

    #[test]
    fn registrations_per_address_are_bounded() {
        let sessions = Sessions::default();
        for _ in 0..REGISTRATIONS_MAX {
            assert!(sessions.may_register("127.0.0.1"));
        }
        assert!(!sessions.may_register("127.0.0.1"));
        assert!(sessions.may_register("127.0.0.2"));
        let (ada, bob) = (Cid::parse("B1-C1").unwrap(), Cid::parse("B1-C2").unwrap());
        for _ in 0..RESET_MAILS_MAX {
            assert!(sessions.may_mail_reset(ada));
        }
        assert!(!sessions.may_mail_reset(ada));
        assert!(sessions.may_mail_reset(bob));
    }

    #[test]
    fn a_reset_token_works_once() {
        let sessions = Sessions::default();
        let cid = Cid::parse("B1-C3").unwrap();
        let token = sessions.new_reset(cid);
        assert_eq!(sessions.reset_for(&token), Some(cid));
        assert_eq!(sessions.take_reset(&token), Some(cid));
        assert_eq!(sessions.take_reset(&token), None);
        assert_eq!(sessions.reset_for("nonsense"), None);
    }
}
