//! Grants: which local users may log in as which customer.
//!
//! A customer authorizes this meter to charge them with a **grant**, made
//! at the backoffice by the device authorization pattern (RFC 8628: the
//! meter asks for a short user code, the customer enters it on the web pages
//! and approves) or with the customer's password. A grant is bound to the
//! local user who asked for it (`Scope::User`, by uid, from the socket's peer
//! credentials), or, made by root where the customer allowed it, to every
//! user of the machine (`Scope::Machine`). `login(CID)` is allowed only to a
//! uid that a live grant of CID admits.
//!
//! This module keeps the grants the meter holds (a copy of the cache's, for
//! answering `login` from memory) and the device requests waiting for the
//! customer's answer, bounded in number and in time.

use std::collections::HashMap;
use std::path::Path;

use proto::grant::{GrantInfo, LABEL_BYTES_MAX, Scope, USER_NAME_BYTES_MAX};
use proto::{Cid, Fault, FaultCode};

/// Most device requests waiting at once on one meter.
pub const REQUESTS_MAX: usize = 16;
/// Most device requests waiting at once for one local user.
pub const REQUESTS_PER_UID_MAX: usize = 4;
/// Longest a device request is kept, whatever the backoffice says.
pub const REQUEST_LIFETIME_MAX_S: u64 = 30 * 60;
/// Shortest interval between two polls of one device request.
pub const POLL_INTERVAL_MIN_S: u64 = 1;
/// Longest interval between two polls of one device request.
pub const POLL_INTERVAL_MAX_S: u64 = 60;
/// What a "slow down" answer (fault 208) adds to the interval (RFC 8628).
pub const SLOW_DOWN_S: u64 = 5;

/// True when `grant` lets local user `uid` log in as `cid` at `now_ms`.
pub fn admits(grant: &GrantInfo, cid: Cid, uid: u32, now_ms: u64) -> bool {
    grant.cid == cid
        && grant.scope.admits(uid)
        && grant.expires_ms.is_none_or(|expires| now_ms < expires)
}

/// The grants the meter holds.
#[derive(Debug, Default)]
pub struct Held {
    grants: Vec<GrantInfo>,
}

impl Held {
    /// The grants read from the cache.
    pub fn new(grants: Vec<GrantInfo>) -> Held {
        Held { grants }
    }

    /// True when a live grant lets `uid` log in as `cid`.
    pub fn admits(&self, cid: Cid, uid: u32, now_ms: u64) -> bool {
        self.grants
            .iter()
            .any(|grant| admits(grant, cid, uid, now_ms))
    }

    /// Keeps a new grant (as the cache does: it replaces one of the same
    /// customer and scope, and expired grants are dropped).
    pub fn insert(&mut self, grant: GrantInfo, now_ms: u64) {
        let same = |held: &GrantInfo| {
            held.cid == grant.cid
                && match (&held.scope, &grant.scope) {
                    (Scope::User { uid: a, .. }, Scope::User { uid: b, .. }) => a == b,
                    (Scope::Machine, Scope::Machine) => true,
                    _ => false,
                }
        };
        self.grants
            .retain(|held| !same(held) && held.expires_ms.is_none_or(|expires| now_ms < expires));
        self.grants.push(grant);
    }

    /// The grants `uid` may see: those that admit it (every grant, for root).
    pub fn visible_to(&self, uid: u32) -> Vec<GrantInfo> {
        let mut grants: Vec<GrantInfo> = self
            .grants
            .iter()
            .filter(|grant| uid == 0 || grant.scope.admits(uid))
            .cloned()
            .collect();
        grants.sort_by_key(|grant| (grant.cid, grant.created_ms));
        grants
    }

    /// Live grants held.
    pub fn live(&self, now_ms: u64) -> usize {
        self.grants
            .iter()
            .filter(|grant| grant.expires_ms.is_none_or(|expires| now_ms < expires))
            .count()
    }
}

/// A device request waiting for the customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The local user who asked; only they may wait on it.
    pub uid: u32,
    /// The customer asked.
    pub cid: Cid,
    /// The scope asked for.
    pub scope: Scope,
    /// The backoffice's handle for polling; never shown to local callers.
    pub device_code: String,
    /// Seconds between polls.
    pub interval_s: u64,
    /// When the request expires, ms since the Unix epoch.
    pub expires_ms: u64,
    /// The earliest time of the next poll.
    pub next_poll_ms: u64,
}

/// What a waiter should do next with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Poll the backoffice now with this device code.
    Poll(String),
    /// Nothing to do before this time (ms since the Unix epoch).
    WaitUntil(u64),
    /// The request expired (and is forgotten).
    Expired,
}

/// The device requests waiting, by their local handle.
#[derive(Debug, Default)]
pub struct Requests {
    waiting: HashMap<String, Request>,
}

impl Requests {
    fn prune(&mut self, now_ms: u64) {
        self.waiting
            .retain(|_, request| now_ms < request.expires_ms);
    }

    /// Fails when a new request of `uid` would pass the bounds.
    pub fn check_room(&mut self, uid: u32, now_ms: u64) -> Result<(), Fault> {
        self.prune(now_ms);
        let of_uid = self
            .waiting
            .values()
            .filter(|request| request.uid == uid)
            .count();
        if self.waiting.len() >= REQUESTS_MAX || of_uid >= REQUESTS_PER_UID_MAX {
            return Err(Fault::new(
                FaultCode::TooManyAttempts,
                format!(
                    "too many grant requests waiting on this meter (at most {REQUESTS_MAX}, \
                     {REQUESTS_PER_UID_MAX} per user); finish or wait out the others"
                ),
            ));
        }
        Ok(())
    }

    /// Keeps a new request under `handle`.
    pub fn insert(&mut self, handle: String, request: Request, now_ms: u64) -> Result<(), Fault> {
        self.check_room(request.uid, now_ms)?;
        self.waiting.insert(handle, request);
        Ok(())
    }

    /// What `uid` waiting on `handle` should do at `now_ms`; claims the poll
    /// when it is due, so that concurrent waiters never poll early.
    pub fn next(&mut self, handle: &str, uid: u32, now_ms: u64) -> Result<Next, Fault> {
        let request = self
            .waiting
            .get_mut(handle)
            .filter(|request| request.uid == uid)
            .ok_or_else(|| {
                Fault::invalid_params(
                    "no grant request of yours waits under that handle (it was answered, \
                     expired, or never made); run `meterd grant CID` again",
                )
            })?;
        if now_ms >= request.expires_ms {
            self.waiting.remove(handle);
            return Ok(Next::Expired);
        }
        if now_ms < request.next_poll_ms {
            return Ok(Next::WaitUntil(request.next_poll_ms));
        }
        request.next_poll_ms = now_ms + request.interval_s * 1000;
        Ok(Next::Poll(request.device_code.clone()))
    }

    /// The request under `handle`, if it still waits.
    pub fn get(&self, handle: &str) -> Option<&Request> {
        self.waiting.get(handle)
    }

    /// The backoffice asked us to slow down.
    pub fn slow_down(&mut self, handle: &str) {
        if let Some(request) = self.waiting.get_mut(handle) {
            request.interval_s = (request.interval_s + SLOW_DOWN_S).min(POLL_INTERVAL_MAX_S);
            request.next_poll_ms += SLOW_DOWN_S * 1000;
        }
    }

    /// Forgets a request (answered, refused or expired).
    pub fn remove(&mut self, handle: &str) -> Option<Request> {
        self.waiting.remove(handle)
    }
}

/// Checks the grant the backoffice answered against what was asked: the
/// same customer, and the scope asked for, or (a machine-wide grant asked
/// for, the customer allowed less) the asking user alone.
pub fn check_answer(asked_cid: Cid, asked: &Scope, uid: u32, got: &GrantInfo) -> Result<(), Fault> {
    let scope_ok = got.scope == *asked
        || matches!((asked, &got.scope), (Scope::Machine, Scope::User { uid: granted, .. }) if *granted == uid);
    if got.cid != asked_cid || !scope_ok {
        return Err(Fault::new(
            FaultCode::GrantFailed,
            format!(
                "the backoffice answered a grant of {} for {} instead of {asked_cid} for {asked}; \
                 nothing was kept",
                got.cid, got.scope
            ),
        ));
    }
    Ok(())
}

/// The scope a grant asked for by `uid` gets: the user alone, or, for root
/// asking for it, every user of the machine.
pub fn scope_for(uid: u32, machine_wide: bool, etc: &Path) -> Result<Scope, Fault> {
    if machine_wide {
        if uid != 0 {
            return Err(Fault::invalid_params(
                "only root may ask for a machine-wide grant; ask without it for your own user",
            ));
        }
        return Ok(Scope::Machine);
    }
    Ok(Scope::User {
        uid,
        name: user_name(etc, uid),
    })
}

/// The login name of `uid` from `ETC/passwd`, or empty when there is none
/// or it is not a plain name (a scope carries only `A-Za-z0-9._-`).
pub fn user_name(etc: &Path, uid: u32) -> String {
    let Ok(passwd) = std::fs::read_to_string(etc.join("passwd")) else {
        return String::new();
    };
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let listed: u32 = fields.nth(1)?.parse().ok()?;
            (listed == uid).then(|| name.to_owned())
        })
        .filter(|name| {
            name.len() <= USER_NAME_BYTES_MAX
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        .unwrap_or_default()
}

/// The machine's label shown to the customer: its host name (from
/// `PROC/sys/kernel/hostname`), without control characters, at most
/// `LABEL_BYTES_MAX` bytes; `meterd` when there is none.
pub fn machine_label(proc_root: &Path) -> String {
    let name = std::fs::read_to_string(proc_root.join("sys/kernel/hostname")).unwrap_or_default();
    let mut label = String::new();
    for character in name.trim().chars().filter(|c| !c.is_control()) {
        if label.len() + character.len_utf8() > LABEL_BYTES_MAX {
            break;
        }
        label.push(character);
    }
    if label.is_empty() {
        label.push_str("meterd");
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(n: u32) -> Cid {
        Cid::parse(&format!("B1-C{n}")).unwrap()
    }

    fn user(uid: u32) -> Scope {
        Scope::User {
            uid,
            name: String::new(),
        }
    }

    fn grant(cid: Cid, scope: Scope, expires_ms: Option<u64>) -> GrantInfo {
        GrantInfo {
            cid,
            scope,
            created_ms: 1,
            expires_ms,
        }
    }

    #[test]
    fn a_grant_admits_its_customer_its_users_and_only_while_live() {
        let mut held = Held::default();
        assert!(!held.admits(cid(4), 1000, 10));
        held.insert(grant(cid(4), user(1000), Some(100)), 10);
        assert!(held.admits(cid(4), 1000, 99));
        assert!(!held.admits(cid(4), 1000, 100), "expired");
        assert!(!held.admits(cid(4), 1001, 50), "another user");
        assert!(!held.admits(cid(5), 1000, 50), "another customer");
        held.insert(grant(cid(5), Scope::Machine, None), 10);
        assert!(held.admits(cid(5), 1001, u64::MAX - 1));
        assert!(held.admits(cid(5), 0, 50));
        // A renewal replaces the grant of the same customer and user.
        held.insert(grant(cid(4), user(1000), None), 200);
        assert!(held.admits(cid(4), 1000, 1_000));
        assert_eq!(held.live(1_000), 2);
        assert_eq!(held.visible_to(1001).len(), 1, "only the machine-wide one");
        assert_eq!(held.visible_to(0).len(), 2, "root sees every grant");
    }

    fn request(uid: u32, expires_ms: u64) -> Request {
        Request {
            uid,
            cid: cid(4),
            scope: user(uid),
            device_code: format!("device-{uid}"),
            interval_s: 2,
            expires_ms,
            next_poll_ms: 0,
        }
    }

    #[test]
    fn requests_are_bounded_expire_and_belong_to_their_user() {
        let mut requests = Requests::default();
        for n in 0..REQUESTS_PER_UID_MAX {
            requests
                .insert(format!("h{n}"), request(1000, 1_000), 0)
                .unwrap();
        }
        let fault = requests
            .insert("more".into(), request(1000, 1_000), 0)
            .unwrap_err();
        assert_eq!(fault.registered(), Some(FaultCode::TooManyAttempts));
        // Another user still has room, up to the meter's bound.
        for n in REQUESTS_PER_UID_MAX..REQUESTS_MAX {
            let uid = 2000 + u32::try_from(n).unwrap();
            requests
                .insert(format!("h{n}"), request(uid, 1_000), 0)
                .unwrap();
        }
        assert!(requests.check_room(1, 0).is_err(), "the meter is full");
        // Expired requests make room.
        assert!(requests.check_room(1, 1_000).is_ok());
        assert!(requests.waiting.is_empty());

        requests
            .insert("h".into(), request(1000, 10_000), 0)
            .unwrap();
        assert!(requests.next("h", 1001, 0).is_err(), "not the user's");
        assert!(requests.next("nope", 1000, 0).is_err());
        assert_eq!(
            requests.next("h", 1000, 0).unwrap(),
            Next::Poll("device-1000".into())
        );
        assert_eq!(
            requests.next("h", 1000, 1).unwrap(),
            Next::WaitUntil(2_000),
            "the next poll waits for the interval"
        );
        requests.slow_down("h");
        assert_eq!(
            requests.next("h", 1000, 2_000).unwrap(),
            Next::WaitUntil(7_000)
        );
        assert_eq!(
            requests.next("h", 1000, 7_000).unwrap(),
            Next::Poll("device-1000".into())
        );
        assert_eq!(requests.next("h", 1000, 10_000).unwrap(), Next::Expired);
        assert!(
            requests.get("h").is_none(),
            "an expired request is forgotten"
        );
    }

    #[test]
    fn answers_must_be_what_was_asked_or_narrower() {
        let asked = user(1000);
        assert!(check_answer(cid(4), &asked, 1000, &grant(cid(4), user(1000), None)).is_ok());
        for got in [
            grant(cid(5), user(1000), None),
            grant(cid(4), user(1001), None),
            grant(cid(4), Scope::Machine, None),
        ] {
            let fault = check_answer(cid(4), &asked, 1000, &got).unwrap_err();
            assert_eq!(fault.registered(), Some(FaultCode::GrantFailed));
        }
        // Root asked for the machine; the customer allowed root alone.
        assert!(check_answer(cid(4), &Scope::Machine, 0, &grant(cid(4), user(0), None)).is_ok());
        assert!(check_answer(cid(4), &Scope::Machine, 0, &grant(cid(4), user(7), None)).is_err());
    }

    #[test]
    fn scopes_names_and_labels() {
        let etc = tempfile::tempdir().unwrap();
        std::fs::write(
            etc.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\nodd name:x:1001:1::/:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(
            scope_for(1000, false, etc.path()).unwrap(),
            Scope::User {
                uid: 1000,
                name: "bob".into()
            }
        );
        assert_eq!(user_name(etc.path(), 1001), "", "not a plain name");
        assert_eq!(user_name(etc.path(), 4242), "");
        assert_eq!(scope_for(0, true, etc.path()).unwrap(), Scope::Machine);
        let fault = scope_for(1000, true, etc.path()).unwrap_err();
        assert_eq!(fault.registered(), Some(FaultCode::InvalidParams));
        assert!(fault.message.contains("only root"));

        let proc_root = tempfile::tempdir().unwrap();
        assert_eq!(machine_label(proc_root.path()), "meterd");
        std::fs::create_dir_all(proc_root.path().join("sys/kernel")).unwrap();
        let long = format!("lap\u{7}top{}\n", "é".repeat(80));
        std::fs::write(proc_root.path().join("sys/kernel/hostname"), long).unwrap();
        let label = machine_label(proc_root.path());
        assert!(label.starts_with("laptopé") && label.len() <= LABEL_BYTES_MAX);
    }
}
