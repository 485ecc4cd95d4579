//! The web pages' sessions, login throttle and reset links in the branch's
//! database (migration 2), so that every node of a branch shares them: the
//! same rules as the in-memory ones (`web::session`), with times in ms
//! since the Unix epoch and tokens kept as their SHA-256.
//!
//! The pages' calls cannot fail, so a database that does not answer fails
//! closed: a visit gets a session that is not kept (its forms will not
//! pass), logins count as throttled, attempts are refused, reset links
//! are not made or not honoured. Each failure is logged.

use proto::Cid;

use super::{PgStore, StoreError, block_on};
use crate::web::password::random_token;
use crate::web::session::{FAILURE_WINDOW, IDLE_MAX, RESET_VALID, Session};

/// Past sessions, events and links are deleted once in this many writes
/// (with the write), so the tables stay about as large as what is live.
const SWEEP_EVERY: u64 = 64;

/// The web state of a branch in PostgreSQL; cheap to share (it uses the
/// store's connections).
#[derive(Clone)]
pub struct PgSessions {
    pool: deadpool_postgres::Pool,
    handle: tokio::runtime::Handle,
    shown: String,
    writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for PgSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSessions")
            .field("at", &self.shown)
            .finish()
    }
}

impl PgStore {
    /// The web pages' shared state in this store's database.
    pub fn web_sessions(&self) -> PgSessions {
        PgSessions {
            pool: self.pool.clone(),
            handle: self
                .runtime
                .as_ref()
                .expect("the runtime lives as long as the store")
                .handle()
                .clone(),
            shown: self.shown.clone(),
            writes: std::sync::Arc::default(),
        }
    }
}

fn hash(token: &str) -> String {
    proto::record::hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn now_ms() -> i64 {
    i64::try_from(crate::now_ms()).unwrap_or(i64::MAX)
}

fn ms(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

type Transaction<'a> = deadpool_postgres::Transaction<'a>;

/// Takes a transaction-long lock on each of `keys`, in one order
/// everywhere, so that two nodes counting the same keys do not both let an
/// attempt through.
async fn lock_keys(transaction: &Transaction<'_>, keys: &[&str]) -> Result<(), StoreError> {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))",
                &[&key],
            )
            .await?;
    }
    Ok(())
}

async fn recent(transaction: &Transaction<'_>, key: &str, now: i64) -> Result<usize, StoreError> {
    let count: i64 = transaction
        .query_one(
            "SELECT count(*) FROM web_events WHERE key = $1 AND at_ms >= $2",
            &[&key, &(now - ms(FAILURE_WINDOW))],
        )
        .await?
        .get(0);
    Ok(usize::try_from(count).unwrap_or(usize::MAX))
}

impl PgSessions {
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|error| StoreError::Unavailable(format!("{}: {error}", self.shown)))
    }

    /// Runs `work`, again where the database aborted it for a conflict
    /// (`retrying`); a failure is logged and answered `None`.
    fn run<T: Send, F>(&self, what: &str, work: impl FnMut() -> F + Send) -> Option<T>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send,
    {
        match block_on(&self.handle, super::retrying(&self.shown, work)) {
            Ok(value) => Some(value),
            Err(error) => {
                tracing::error!(at = %self.shown, %error, "web sessions: {what} failed");
                None
            }
        }
    }

    /// Whether this write also deletes what is past.
    fn sweep_now(&self) -> bool {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY)
    }

    async fn sweep(&self, client: &deadpool_postgres::Object, now: i64) -> Result<(), StoreError> {
        if self.sweep_now() {
            for (past, kept) in [
                ("DELETE FROM web_sessions WHERE last_seen_ms < $1", IDLE_MAX),
                ("DELETE FROM web_events WHERE at_ms < $1", FAILURE_WINDOW),
                ("DELETE FROM web_resets WHERE made_ms < $1", RESET_VALID),
            ] {
                client.execute(past, &[&(now - ms(kept))]).await?;
            }
        }
        Ok(())
    }

    async fn insert_session(
        &self,
        client: &deadpool_postgres::Object,
        cid: Option<Cid>,
        now: i64,
    ) -> Result<Session, StoreError> {
        let session = Session::new(random_token(), random_token(), cid);
        client
            .execute(
                "INSERT INTO web_sessions (token_hash, csrf, cid, last_seen_ms) VALUES ($1, $2, $3, $4)",
                &[
                    &hash(&session.token),
                    &session.csrf,
                    &cid.as_ref().map(Cid::as_str),
                    &now,
                ],
            )
            .await?;
        self.sweep(client, now).await?;
        Ok(session)
    }

    /// As `Sessions::visit`.
    pub fn visit(&self, token: Option<&str>) -> (Session, bool) {
        let now = now_ms();
        let found = self.run("a visit", || async {
            let client = self.client().await?;
            if let Some(token) = token {
                let row = client
                    .query_opt(
                        "UPDATE web_sessions SET last_seen_ms = $2 \
                         WHERE token_hash = $1 AND last_seen_ms > $3 RETURNING csrf, cid",
                        &[&hash(token), &now, &(now - ms(IDLE_MAX))],
                    )
                    .await?;
                if let Some(row) = row {
                    let cid = row
                        .get::<_, Option<&str>>(1)
                        .and_then(|text| Cid::parse(text).ok());
                    return Ok((Session::new(token.to_owned(), row.get(0), cid), false));
                }
                client
                    .execute(
                        "DELETE FROM web_sessions WHERE token_hash = $1",
                        &[&hash(token)],
                    )
                    .await?;
            }
            Ok((self.insert_session(&client, None, now).await?, true))
        });
        // Not kept: its forms will not pass, and the next page tries again.
        found.unwrap_or_else(|| (Session::new(random_token(), random_token(), None), true))
    }

    /// As `Sessions::log_in`; `None` when it could not be kept.
    pub fn log_in(&self, old_token: &str, cid: Cid) -> Option<Session> {
        let now = now_ms();
        self.run("a login", || async {
            let client = self.client().await?;
            client
                .execute(
                    "DELETE FROM web_sessions WHERE token_hash = $1",
                    &[&hash(old_token)],
                )
                .await?;
            self.insert_session(&client, Some(cid), now).await
        })
    }

    /// As `Sessions::log_out`.
    pub fn log_out(&self, token: &str) {
        self.run("a logout", || async {
            let client = self.client().await?;
            client
                .execute(
                    "DELETE FROM web_sessions WHERE token_hash = $1",
                    &[&hash(token)],
                )
                .await?;
            Ok(())
        });
    }

    /// As `Sessions::log_out_everywhere`.
    pub fn log_out_everywhere(&self, cid: Cid) {
        self.run("a logout everywhere", || async {
            let client = self.client().await?;
            client
                .execute("DELETE FROM web_sessions WHERE cid = $1", &[&cid.as_str()])
                .await?;
            Ok(())
        });
    }

    /// Whether any of `keys` had its most events within the window (true
    /// when the database cannot say).
    pub fn over(&self, keys: &[(&str, usize)]) -> bool {
        let now = now_ms();
        self.run("a throttle check", || async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            for (key, max) in keys {
                if recent(&transaction, key, now).await? >= *max {
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .unwrap_or(true)
    }

    /// Counts one event under every one of `keys` unless one of them had
    /// its most within the window; the id of the event of the last key, or
    /// `None` (nothing counted; also when the database cannot say).
    pub fn count_within(&self, keys: &[(&str, usize)]) -> Option<i64> {
        let now = now_ms();
        self.run("an attempt", || async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            let names: Vec<&str> = keys.iter().map(|(key, _)| *key).collect();
            lock_keys(&transaction, &names).await?;
            for (key, max) in keys {
                if recent(&transaction, key, now).await? >= *max {
                    return Ok(None);
                }
            }
            let mut last = None;
            for key in names {
                let id: i64 = transaction
                    .query_one(
                        "INSERT INTO web_events (key, at_ms) VALUES ($1, $2) RETURNING id",
                        &[&key, &now],
                    )
                    .await?
                    .get(0);
                last = Some(id);
            }
            transaction.commit().await?;
            Ok(last)
        })
        .flatten()
    }

    /// Counts one event under each of `keys`, without a limit.
    pub fn record(&self, keys: &[&str]) {
        let now = now_ms();
        self.run("a failed login", || async {
            let client = self.client().await?;
            for key in keys {
                client
                    .execute(
                        "INSERT INTO web_events (key, at_ms) VALUES ($1, $2)",
                        &[key, &now],
                    )
                    .await?;
            }
            self.sweep(&client, now).await
        });
    }

    /// Forgets every event of `key`, and the event `event` if given.
    pub fn forget(&self, key: &str, event: Option<i64>) {
        self.run("forgetting failures", || async {
            let client = self.client().await?;
            client
                .execute(
                    "DELETE FROM web_events WHERE key = $1 OR id = $2",
                    &[&key, &event.unwrap_or(-1)],
                )
                .await?;
            Ok(())
        });
    }

    /// As `Sessions::new_reset`; `None` when it could not be kept.
    pub fn new_reset(&self, cid: Cid) -> Option<String> {
        let now = now_ms();
        self.run("a reset link", || async {
            let client = self.client().await?;
            let token = random_token();
            client
                .execute(
                    "INSERT INTO web_resets (token_hash, cid, made_ms) VALUES ($1, $2, $3)",
                    &[&hash(&token), &cid.as_str(), &now],
                )
                .await?;
            self.sweep(&client, now).await?;
            Ok(token)
        })
    }

    /// As `Sessions::reset_for`.
    pub fn reset_for(&self, token: &str) -> Option<Cid> {
        let now = now_ms();
        self.run("a reset link", || async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT cid FROM web_resets WHERE token_hash = $1 AND made_ms > $2",
                    &[&hash(token), &(now - ms(RESET_VALID))],
                )
                .await?;
            Ok(row.and_then(|row| Cid::parse(row.get::<_, &str>(0)).ok()))
        })
        .flatten()
    }

    /// As `Sessions::take_reset`: once, across every node.
    pub fn take_reset(&self, token: &str) -> Option<Cid> {
        let now = now_ms();
        self.run("a reset link", || async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            let row = transaction
                .query_opt(
                    "DELETE FROM web_resets WHERE token_hash = $1 RETURNING cid, made_ms",
                    &[&hash(token)],
                )
                .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let made: i64 = row.get(1);
            let cid = Cid::parse(row.get::<_, &str>(0)).ok();
            let Some(cid) = cid.filter(|_| made > now - ms(RESET_VALID)) else {
                transaction.commit().await?;
                return Ok(None);
            };
            transaction
                .execute("DELETE FROM web_resets WHERE cid = $1", &[&cid.as_str()])
                .await?;
            transaction.commit().await?;
            Ok(Some(cid))
        })
        .flatten()
    }

    /// As `Sessions::void_resets`.
    pub fn void_resets(&self, cid: Cid) {
        self.run("voiding reset links", || async {
            let client = self.client().await?;
            client
                .execute("DELETE FROM web_resets WHERE cid = $1", &[&cid.as_str()])
                .await?;
            Ok(())
        });
    }
}
