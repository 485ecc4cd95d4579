//! Grant codes in the branch's database (migration 3), so that every node
//! of a branch shares them: the same rules as the in-memory ones
//! (`grants::DeviceCodes`), with times in ms since the Unix epoch and
//! device codes kept as their SHA-256.
//!
//! Issuing takes a transaction-long lock, so the branch's limits (per
//! meter, per owner, in all) hold across nodes. Deciding marks the code
//! `deciding` before the grant is made and `approved` after, so two
//! approvals on two nodes cannot both make a grant; a node that dies
//! between the two leaves the code `deciding` until it expires (the grant
//! it made stands; the meter is told the code expired and asks again).
//! A poll that finds a decision deletes the code in the same statement:
//! it is answered once.

use proto::grant::{GrantInfo, GrantRequest, PollStatus, Scope};
use proto::{Cid, Mid};

use super::{PgStore, StoreError, block_on};
use crate::grants::{CODES_MAX, CODES_PER_METER_MAX, CODES_PER_OWNER_MAX, CodeError};

/// Issuing codes takes this lock for its transaction (the bytes of
/// "backcode").
const ISSUE_LOCK: i64 = 0x6261_636b_636f_6465;

/// The grant codes of a branch in PostgreSQL; cheap to share (it uses the
/// store's connections).
#[derive(Clone)]
pub struct PgCodes {
    pool: deadpool_postgres::Pool,
    handle: tokio::runtime::Handle,
    shown: String,
}

impl std::fmt::Debug for PgCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCodes").field("at", &self.shown).finish()
    }
}

impl PgStore {
    /// The grant codes kept in this store's database.
    pub fn grant_codes(&self) -> PgCodes {
        PgCodes {
            pool: self.pool.clone(),
            handle: self
                .runtime
                .as_ref()
                .expect("the runtime lives as long as the store")
                .handle()
                .clone(),
            shown: self.shown.clone(),
        }
    }
}

fn hash(code: &str) -> String {
    proto::record::hex(ring::digest::digest(&ring::digest::SHA256, code.as_bytes()).as_ref())
}

fn db(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn count(n: i64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A request read back; a row that does not parse is reported, not used.
fn request(mid: &str, cid: &str, label: String, scope: &str) -> Result<GrantRequest, StoreError> {
    let damaged = |what: String| StoreError::Corrupt(format!("grant_codes: {what}"));
    Ok(GrantRequest {
        mid: Mid::parse(mid).map_err(|error| damaged(format!("meter {mid:?}: {error}")))?,
        cid: Cid::parse(cid).map_err(|error| damaged(format!("customer {cid:?}: {error}")))?,
        label,
        scope: scope
            .parse::<Scope>()
            .map_err(|error| damaged(format!("scope: {error}")))?,
    })
}

impl PgCodes {
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|error| StoreError::Unavailable(format!("{}: {error}", self.shown)))
    }

    /// Runs `work`, again where the database aborted it for a conflict
    /// (`retrying`); a failure is logged and answered as the code's error.
    fn run<T: Send, F>(&self, what: &str, work: impl FnMut() -> F + Send) -> Result<T, CodeError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send,
    {
        block_on(&self.handle, super::retrying(&self.shown, work)).map_err(|error| {
            tracing::error!(at = %self.shown, %error, "grant codes: {what} failed");
            CodeError::Unavailable(error.to_string())
        })
    }

    /// As `DeviceCodes::issue`, with `make_user_code` for new user codes.
    pub fn issue(
        &self,
        request: &GrantRequest,
        owner: Cid,
        device_code: &str,
        now_ms: u64,
        expires_ms: u64,
        make_user_code: impl Fn() -> String + Send + Sync,
    ) -> Result<String, CodeError> {
        let issued = self.run("issuing a code", || async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            transaction
                .execute("SELECT pg_advisory_xact_lock($1)", &[&ISSUE_LOCK])
                .await?;
            transaction
                .execute(
                    "DELETE FROM grant_codes WHERE expires_ms <= $1",
                    &[&db(now_ms)],
                )
                .await?;
            let row = transaction
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE mid = $1), \
                     count(*) FILTER (WHERE owner = $2) FROM grant_codes",
                    &[&request.mid.as_str(), &owner.as_str()],
                )
                .await?;
            if count(row.get(0)) >= CODES_MAX
                || count(row.get(1)) >= CODES_PER_METER_MAX
                || count(row.get(2)) >= CODES_PER_OWNER_MAX
            {
                return Ok(None);
            }
            let user_code = loop {
                let candidate = make_user_code();
                let inserted = transaction
                    .execute(
                        "INSERT INTO grant_codes (user_code, device_code_hash, mid, cid, owner, \
                         label, scope, expires_ms, state) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending') \
                         ON CONFLICT (user_code) DO NOTHING",
                        &[
                            &candidate,
                            &hash(device_code),
                            &request.mid.as_str(),
                            &request.cid.as_str(),
                            &owner.as_str(),
                            &request.label,
                            &request.scope.to_string(),
                            &db(expires_ms),
                        ],
                    )
                    .await?;
                if inserted == 1 {
                    break candidate;
                }
            };
            transaction.commit().await?;
            Ok(Some(user_code))
        })?;
        issued.ok_or(CodeError::TooMany)
    }

    /// As `DeviceCodes::poll`.
    pub fn poll(&self, mid: &Mid, device_code: &str, now_ms: u64) -> Result<PollStatus, CodeError> {
        self.run("a poll", || async {
            let client = self.client().await?;
            let key = hash(device_code);
            let decided = client
                .query_opt(
                    "DELETE FROM grant_codes WHERE device_code_hash = $1 AND mid = $2 \
                     AND expires_ms > $3 AND state IN ('approved', 'denied') \
                     RETURNING state, mid, cid, label, scope, granted_ms, grant_expires_ms",
                    &[&key, &mid.as_str(), &db(now_ms)],
                )
                .await?;
            let Some(row) = decided else {
                let pending = client
                    .query_opt(
                        "SELECT 1 FROM grant_codes WHERE device_code_hash = $1 AND mid = $2 \
                         AND expires_ms > $3",
                        &[&key, &mid.as_str(), &db(now_ms)],
                    )
                    .await?;
                return Ok(match pending {
                    Some(_) => PollStatus::Pending,
                    None => PollStatus::Expired,
                });
            };
            if row.get::<_, &str>(0) == "denied" {
                return Ok(PollStatus::Denied);
            }
            let asked = request(row.get(1), row.get(2), row.get(3), row.get(4))?;
            let granted_ms: Option<i64> = row.get(5);
            let grant_expires_ms: Option<i64> = row.get(6);
            let ms = |value: i64| u64::try_from(value).unwrap_or(0);
            Ok(PollStatus::Approved(GrantInfo {
                cid: asked.cid,
                scope: asked.scope,
                created_ms: granted_ms.map_or(0, ms),
                expires_ms: grant_expires_ms.map(ms),
            }))
        })
    }

    /// As `DeviceCodes::pending_for` (`user_code` normalized).
    pub fn pending_for(
        &self,
        user_code: &str,
        cid: &Cid,
        now_ms: u64,
    ) -> Result<Option<GrantRequest>, CodeError> {
        self.run("reading a code", || async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT mid, cid, label, scope FROM grant_codes WHERE user_code = $1 \
                     AND cid = $2 AND state = 'pending' AND expires_ms > $3",
                    &[&user_code, &cid.as_str(), &db(now_ms)],
                )
                .await?;
            row.map(|row| request(row.get(0), row.get(1), row.get(2), row.get(3)))
                .transpose()
        })
    }

    /// Takes a pending code of `cid` for a decision: `deciding` when the
    /// customer approves (the grant is made next), `denied` when they
    /// refuse. `None` when no such code is pending.
    pub fn take_for_decision(
        &self,
        user_code: &str,
        cid: &Cid,
        now_ms: u64,
        approve: bool,
    ) -> Result<Option<GrantRequest>, CodeError> {
        let state = if approve { "deciding" } else { "denied" };
        self.run("deciding a code", || async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "UPDATE grant_codes SET state = $4 WHERE user_code = $1 AND cid = $2 \
                     AND state = 'pending' AND expires_ms > $3 \
                     RETURNING mid, cid, label, scope",
                    &[&user_code, &cid.as_str(), &db(now_ms), &state],
                )
                .await?;
            row.map(|row| request(row.get(0), row.get(1), row.get(2), row.get(3)))
                .transpose()
        })
    }

    /// Ends a decision `take_for_decision` began: the grant made, or
    /// `None` when it could not be made (the code is pending again).
    pub fn finish_decision(
        &self,
        user_code: &str,
        grant: Option<&GrantInfo>,
    ) -> Result<(), CodeError> {
        self.run("recording a decision", || async {
            let client = self.client().await?;
            match grant {
                Some(grant) => {
                    client
                        .execute(
                            "UPDATE grant_codes SET state = 'approved', granted_ms = $2, \
                             grant_expires_ms = $3 WHERE user_code = $1 AND state = 'deciding'",
                            &[&user_code, &db(grant.created_ms), &grant.expires_ms.map(db)],
                        )
                        .await?
                }
                None => {
                    client
                        .execute(
                            "UPDATE grant_codes SET state = 'pending' \
                             WHERE user_code = $1 AND state = 'deciding'",
                            &[&user_code],
                        )
                        .await?
                }
            };
            Ok(())
        })
    }
}
