//! The PostgreSQL store's schema on a real, throw-away PostgreSQL cluster
//! (`pgtest`): migrations applied once, in order, under a lock; databases
//! made by a newer backoffice or with other SQL refused; posted transfers
//! never changed; clear errors for a wrong or unreachable database.

use std::process::Command;

use backoffice::store::postgres::{MIGRATIONS, Migrated, Migration};
use backoffice::store::{PgStore, StoreError};
use pgtest::Cluster;

fn cluster() -> Cluster {
    Cluster::start().unwrap_or_else(|error| panic!("a PostgreSQL cluster: {error}"))
}

fn tables(cluster: &Cluster, db: &str) -> Vec<String> {
    cluster
        .psql(
            db,
            "SELECT table_name FROM information_schema.tables \
             WHERE table_schema = 'public' ORDER BY table_name",
        )
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_new_database_gets_every_table_once_and_nodes_starting_together_do_not_race() {
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    // Four nodes start at once on an empty database.
    let versions: Vec<i64> = std::thread::scope(|scope| {
        let nodes: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let store = PgStore::connect(&url).unwrap();
                    store.schema_version().unwrap()
                })
            })
            .collect();
        nodes.into_iter().map(|node| node.join().unwrap()).collect()
    });
    let latest = MIGRATIONS.last().unwrap().version;
    assert_eq!(versions, vec![latest; 4]);
    assert_eq!(
        cluster
            .psql("branch", "SELECT count(*) FROM schema_migrations")
            .unwrap()
            .trim(),
        MIGRATIONS.len().to_string()
    );
    let all = tables(&cluster, "branch");
    for table in [
        "balances",
        "batches",
        "customers",
        "deposits",
        "free_uses",
        "grant_codes",
        "grants",
        "hold_events",
        "itemised",
        "meters",
        "period_uses",
        "products",
        "schema_migrations",
        "seq_ranges",
        "serials",
        "suspense",
        "tacas",
        "transfers",
    ] {
        assert!(all.iter().any(|name| name == table), "{table} in {all:?}");
    }
    // Itemised records are compressed with lz4 (Debian's server has it).
    cluster
        .psql(
            "branch",
            "INSERT INTO itemised (arrived_ms, mid, batch, part, record) \
             VALUES (1, 'B1-M1', 'b1', 0, convert_to(repeat('reading ', 4000), 'UTF8'))",
        )
        .unwrap();
    assert_eq!(
        cluster
            .psql(
                "branch",
                "SELECT pg_column_compression(record) FROM itemised"
            )
            .unwrap()
            .trim(),
        "lz4"
    );
    // The rows every batch updates leave room for updates on their page.
    assert_eq!(
        cluster
            .psql(
                "branch",
                "SELECT string_agg(relname || ' ' || array_to_string(reloptions, ','), '; ' \
                 ORDER BY relname) FROM pg_class \
                 WHERE relname IN ('balances', 'period_uses', 'free_uses')"
            )
            .unwrap()
            .trim(),
        "balances fillfactor=50; free_uses fillfactor=50; period_uses fillfactor=50"
    );
    // Again: nothing to apply.
    let store = PgStore::open(&url).unwrap();
    assert_eq!(
        store.migrate(MIGRATIONS).unwrap(),
        Migrated {
            applied: vec![],
            version: latest
        }
    );
}

/// What a later backoffice would bring: every migration of this one and
/// one step more.
fn upgrade() -> Vec<Migration> {
    let mut steps = MIGRATIONS.to_vec();
    steps.push(Migration {
        version: latest_version() + 1,
        name: "notes",
        sql: "CREATE TABLE notes (id bigint PRIMARY KEY, text text NOT NULL);",
    });
    steps
}

fn latest_version() -> i64 {
    MIGRATIONS.last().unwrap().version
}

static CHANGED: [Migration; 1] = [Migration {
    version: 1,
    name: "branch",
    sql: "CREATE TABLE other (id bigint);",
}];

#[test]
fn an_older_schema_is_upgraded_and_a_newer_or_different_one_is_refused_untouched() {
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    let store = PgStore::connect(&url).unwrap();
    let latest = latest_version();
    assert_eq!(store.schema_version().unwrap(), latest);
    // A later backoffice with one step more upgrades it, keeping the data.
    cluster
        .psql("branch", "INSERT INTO serials VALUES ('C', 7)")
        .unwrap();
    assert_eq!(
        store.migrate(&upgrade()).unwrap(),
        Migrated {
            applied: vec![latest + 1],
            version: latest + 1
        }
    );
    assert!(tables(&cluster, "branch").contains(&"notes".to_owned()));
    assert_eq!(
        cluster
            .psql("branch", "SELECT next FROM serials WHERE kind = 'C'")
            .unwrap()
            .trim(),
        "7"
    );
    // This backoffice knows only its own latest version: it refuses the
    // database and changes nothing.
    let refused = PgStore::connect(&url).unwrap_err();
    assert!(matches!(refused, StoreError::Schema(_)), "{refused:?}");
    let message = refused.to_string();
    assert!(
        message.contains(&format!("version {}", latest + 1))
            && message.contains("newer backoffice"),
        "{message}"
    );
    // A database whose version 1 was other SQL is refused too.
    let other = cluster.create_database("other").unwrap();
    PgStore::open(&other).unwrap().migrate(&CHANGED).unwrap();
    let refused = PgStore::connect(&other).unwrap_err();
    let message = refused.to_string();
    assert!(
        message.contains("migration 1") && message.contains("other SQL"),
        "{message}"
    );
    assert!(!tables(&cluster, "other").contains(&"transfers".to_owned()));
}

#[test]
fn a_database_made_by_the_previous_version_is_upgraded_with_its_branch_kept() {
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    // What the previous backoffice (schema version 1) made and kept.
    PgStore::open(&url)
        .unwrap()
        .migrate(&MIGRATIONS[..1])
        .unwrap();
    cluster
        .psql(
            "branch",
            "INSERT INTO serials VALUES ('C', 2); \
             INSERT INTO customers VALUES ('B1-C1', 'ada@example.org', \
               '{\"cid\":\"B1-C1\",\"name\":\"Ada\",\"email\":\"ada@example.org\",\
                 \"credit_limit\":\"0\",\"denied\":false}'); \
             INSERT INTO transfers (id, debit, credit, amount, kind, posted_ms) \
               VALUES (0, ':funding', 'B1-C1', 12.5, 'deposit', 1); \
             INSERT INTO balances VALUES (':funding', -12.5), ('B1-C1', 12.5);",
        )
        .unwrap();
    assert!(!tables(&cluster, "branch").contains(&"web_sessions".to_owned()));
    // This one upgrades it as it starts.
    let store = PgStore::connect(&url).unwrap();
    assert_eq!(store.schema_version().unwrap(), latest_version());
    for table in ["web_sessions", "web_events", "web_resets", "grant_codes"] {
        assert!(
            tables(&cluster, "branch").contains(&table.to_owned()),
            "{table}"
        );
    }
    use backoffice::store::Store;
    let ledger = store.load_ledger().unwrap();
    assert_eq!(ledger.transfers().len(), 1);
    let cid = proto::Cid::parse("B1-C1").unwrap();
    assert_eq!(
        ledger.balance(&backoffice::ledger::AccountId::Customer(cid)),
        proto::Amount::parse("12.5").unwrap()
    );
    assert_eq!(store.customer(&cid).unwrap().unwrap().name, "Ada");
    let (report, _) = store.verify();
    assert!(report.is_ok(), "{:?}", report.problems);
    // A number written around the store, in no form `tel:` could name.
    cluster
        .psql(
            "branch",
            "UPDATE customers SET record = jsonb_set(record, '{phone}', '\"0151 1234\"') \
             WHERE cid = 'B1-C1'",
        )
        .unwrap();
    let (report, _) = store.verify();
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains("B1-C1 has a telephone number in no valid form")),
        "{:?}",
        report.problems
    );
}

#[test]
fn two_nodes_share_sessions_failed_logins_and_reset_links() {
    use backoffice::web::session::{FAILURES_MAX, Sessions};
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    let (store_a, store_b) = (
        PgStore::connect(&url).unwrap(),
        PgStore::connect(&url).unwrap(),
    );
    let (a, b) = (
        Sessions::shared(store_a.web_sessions()),
        Sessions::shared(store_b.web_sessions()),
    );
    // A visit on A is known on B, with its CSRF token; a login on B is
    // seen on A; a logout on A ends it on B.
    let (visit, new) = a.visit(None);
    assert!(new);
    let (seen, new) = b.visit(Some(&visit.token));
    assert!(!new && seen.csrf == visit.csrf);
    let cid = proto::Cid::parse("B1-C1").unwrap();
    let logged_in = b.log_in(&visit.token, cid);
    assert_ne!(logged_in.token, visit.token);
    assert_eq!(a.visit(Some(&logged_in.token)).0.cid, Some(cid));
    let (old, fresh) = a.visit(Some(&visit.token));
    assert!(
        fresh && old.cid.is_none(),
        "the token from before the login is dead"
    );
    a.log_out(&logged_in.token);
    assert!(b.visit(Some(&logged_in.token)).0.cid.is_none());
    // Tokens are kept only as hashes.
    let kept = cluster
        .psql("branch", "SELECT token_hash FROM web_sessions")
        .unwrap();
    assert!(!kept.contains(&visit.token) && !kept.contains(&logged_in.token));
    // Failed logins count across nodes: guesses spread over both are
    // throttled as on one.
    for n in 0..FAILURES_MAX {
        let node = if n % 2 == 0 { &a } else { &b };
        let attempt = node.reserve_attempt("B1-C2", &format!("10.0.0.{n}"));
        assert!(attempt.is_some(), "attempt {n}");
    }
    assert!(a.reserve_attempt("B1-C2", "10.0.1.1").is_none());
    assert!(b.throttled("b1-c2", "10.0.1.2"));
    // A success gives its attempt back and clears the account.
    let other = b.reserve_attempt("B1-C3", "10.0.2.1").unwrap();
    a.attempt_succeeded("B1-C3", "10.0.2.1", other);
    assert!(!a.throttled("B1-C3", "10.0.2.1"));
    // Reset links: made on A, honoured once, on either node.
    let token = a.new_reset(cid);
    assert_eq!(b.reset_for(&token), Some(cid));
    assert_eq!(b.take_reset(&token), Some(cid));
    assert_eq!(a.take_reset(&token), None);
    let voided = a.new_reset(cid);
    b.void_resets(cid);
    assert_eq!(a.reset_for(&voided), None);
    // Guesses at once on both nodes cannot pass the limit together.
    let results: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2 * FAILURES_MAX)
            .map(|n| {
                let node = if n % 2 == 0 { &a } else { &b };
                scope.spawn(move || {
                    node.reserve_attempt("B1-C9", &format!("10.0.3.{n}"))
                        .is_some()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|ok| **ok).count(), FAILURES_MAX);
}

#[test]
fn a_grant_code_asked_on_one_node_is_decided_on_another_once_and_polled_on_a_third() {
    use backoffice::grants::{CODES_PER_METER_MAX, CodeError, DeviceCodes};
    use proto::grant::{GrantInfo, GrantRequest, PollStatus, Scope};
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    let stores: Vec<PgStore> = (0..3).map(|_| PgStore::connect(&url).unwrap()).collect();
    let nodes: Vec<DeviceCodes> = stores
        .iter()
        .map(|store| DeviceCodes::shared(store.grant_codes()))
        .collect();
    let (mid, cid, owner) = (
        proto::Mid::parse("B1-M1").unwrap(),
        proto::Cid::parse("B1-C4").unwrap(),
        proto::Cid::parse("B1-C9").unwrap(),
    );
    let asked = GrantRequest {
        mid,
        cid,
        label: "build host".into(),
        scope: Scope::User {
            uid: 1000,
            name: "bob".into(),
        },
    };
    let now = 1_000;
    let (device, user) = nodes[0].issue(asked.clone(), owner, now).unwrap();
    // The device code is kept only as a hash.
    let kept = cluster
        .psql("branch", "SELECT device_code_hash FROM grant_codes")
        .unwrap();
    assert!(!kept.contains(&device), "{kept}");
    assert_eq!(
        nodes[2].poll(&mid, &device, now).unwrap(),
        PollStatus::Pending
    );
    assert_eq!(
        nodes[1]
            .pending_for(&user.to_lowercase(), &cid, now)
            .unwrap(),
        Some(asked.clone())
    );
    // The customer approves on two nodes at once (a double click through
    // two balancers): one grant is made.
    let made = std::sync::atomic::AtomicUsize::new(0);
    let grant = GrantInfo {
        cid,
        scope: asked.scope.clone(),
        created_ms: now + 1,
        expires_ms: Some(now + 86_400_000),
    };
    let decided: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|n| {
                let (node, made, grant, user) = (&nodes[n % 2], &made, &grant, &user);
                scope.spawn(move || {
                    let record = |_: &GrantRequest| {
                        made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        Ok::<_, ()>(grant.clone())
                    };
                    match node.decide(user, &cid, now + 1, Some(record)) {
                        Ok(Ok(request)) => {
                            assert_eq!(request.mid, mid);
                            true
                        }
                        Err(CodeError::Unknown) => false,
                        other => panic!("{other:?}"),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(decided.iter().filter(|d| **d).count(), 1, "{decided:?}");
    assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Answered once, on whichever node the meter reaches; another meter
    // with the same device code learns nothing.
    let other_meter = proto::Mid::parse("B1-M2").unwrap();
    assert_eq!(
        nodes[1].poll(&other_meter, &device, now + 2).unwrap(),
        PollStatus::Expired
    );
    assert_eq!(
        nodes[2].poll(&mid, &device, now + 2).unwrap(),
        PollStatus::Approved(grant)
    );
    assert_eq!(
        nodes[0].poll(&mid, &device, now + 2).unwrap(),
        PollStatus::Expired
    );
    // The per-meter limit holds across nodes asked at once.
    let issued: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3 * CODES_PER_METER_MAX)
            .map(|n| {
                let (node, asked) = (&nodes[n % 3], asked.clone());
                scope.spawn(move || match node.issue(asked, owner, now + 3) {
                    Ok(_) => true,
                    Err(CodeError::TooMany) => false,
                    Err(other) => panic!("{other:?}"),
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        issued.iter().filter(|i| **i).count(),
        CODES_PER_METER_MAX,
        "{issued:?}"
    );
    // A backoffice on a PostgreSQL store keeps its codes there.
    let office = backoffice::send::Backoffice::open(
        backoffice::store::AnyStore::Postgres(Box::new(PgStore::connect(&url).unwrap())),
        backoffice::send::DEFAULT_PARAMS,
    )
    .unwrap();
    let third = GrantRequest {
        mid: proto::Mid::parse("B1-M3").unwrap(),
        ..asked.clone()
    };
    let (device, _) = office.device_codes().issue(third, owner, now).unwrap();
    assert_eq!(
        nodes[0]
            .poll(&proto::Mid::parse("B1-M3").unwrap(), &device, now)
            .unwrap(),
        PollStatus::Pending
    );
    drop(office);
    // A database that is gone is an error, not a pending code.
    drop(nodes);
    drop(stores);
    let store = PgStore::connect(&url).unwrap();
    let codes = DeviceCodes::shared(store.grant_codes());
    cluster.stop_immediately().unwrap();
    assert!(matches!(
        codes.poll(&mid, &device, now + 4),
        Err(CodeError::Unavailable(_))
    ));
}

#[test]
fn posted_transfers_cannot_be_changed_or_deleted_even_in_sql() {
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    PgStore::connect(&url).unwrap();
    cluster
        .psql(
            "branch",
            "INSERT INTO transfers (id, debit, credit, amount, kind, posted_ms) \
             VALUES (0, ':funding', 'B1-C1', 10.5, 'deposit', 1)",
        )
        .unwrap();
    for change in [
        "UPDATE transfers SET amount = 1000 WHERE id = 0",
        "DELETE FROM transfers WHERE id = 0",
        "TRUNCATE transfers CASCADE",
    ] {
        let refused = cluster.psql("branch", change).unwrap_err();
        assert!(refused.contains("never changed"), "{change}: {refused}");
    }
    // Nor can money be a float's approximation, or a transfer be negative.
    assert!(
        cluster
            .psql(
                "branch",
                "INSERT INTO transfers (id, debit, credit, amount, kind, posted_ms) \
                 VALUES (1, ':funding', 'B1-C1', -1, 'deposit', 1)"
            )
            .is_err()
    );
    assert_eq!(
        cluster
            .psql("branch", "SELECT amount FROM transfers")
            .unwrap()
            .trim(),
        "10.500000000"
    );
}

#[test]
fn a_wrong_or_unreachable_database_gets_a_clear_error_without_its_password() {
    let refused = PgStore::open("mysql://root@127.0.0.1/branch").unwrap_err();
    assert!(refused.to_string().contains("postgres://"), "{refused}");
    // A port nothing listens on: refused at once, the password never shown.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = std::time::Instant::now();
    let refused =
        PgStore::connect(&format!("postgres://ada:s3cret-pw@127.0.0.1:{port}/branch")).unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    let message = refused.to_string();
    assert!(matches!(refused, StoreError::Unavailable(_)), "{message}");
    assert!(
        message.contains(&format!("127.0.0.1:{port}/branch")),
        "{message}"
    );
    assert!(!message.contains("s3cret"), "{message}");
}

#[test]
fn the_migrate_command_applies_once_and_reads_the_store_from_the_environment() {
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    let migrate = |args: &[&str], env: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_backoffice"));
        command
            .arg("migrate")
            .args(args)
            .env_remove("BACKOFFICE_STORE");
        if let Some(url) = env {
            command.env("BACKOFFICE_STORE", url);
        }
        let output = command.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (code, text) = migrate(&["--store", &url], None);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("applied migration 1 (branch)"), "{text}");
    let (code, text) = migrate(&[], Some(&url));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("nothing to apply"), "{text}");
    let future = format!(
        "INSERT INTO schema_migrations (version, name, sha256) VALUES ({}, 'future', '')",
        latest_version() + 1
    );
    cluster.psql("branch", &future).unwrap();
    let (code, text) = migrate(&["--store", &url], None);
    assert_eq!(code, Some(65), "{text}");
    assert!(text.contains("newer backoffice"), "{text}");
    let (code, text) = migrate(&["--store", &cluster.url("missing")], None);
    assert_eq!(code, Some(69), "{text}");
    assert!(text.contains("missing"), "{text}");
    // `--help` names the variable, never its value.
    for command in ["serve", "migrate"] {
        let help = Command::new(env!("CARGO_BIN_EXE_backoffice"))
            .args([command, "--help"])
            .env(
                "BACKOFFICE_STORE",
                "postgres://ada:s3cret-pw@db.example/branch",
            )
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(text.contains("BACKOFFICE_STORE"), "{text}");
        assert!(!text.contains("s3cret"), "{command} --help: {text}");
    }
}

/// Starts `backoffice serve` on the database at `url` with its own data
/// folder; returns the child once it listens, or its exit code and output
/// if it stopped instead.
fn serve(url: &str, data: &std::path::Path) -> Result<std::process::Child, (Option<i32>, String)> {
    serve_on(Some(url), data)
}

/// `serve`, with the branch in PostgreSQL at `url` or (`None`) in `data`.
fn serve_on(
    url: Option<&str>,
    data: &std::path::Path,
) -> Result<std::process::Child, (Option<i32>, String)> {
    use std::io::BufRead;
    let mut command = Command::new(env!("CARGO_BIN_EXE_backoffice"));
    command.env_remove("BACKOFFICE_STORE");
    if let Some(url) = url {
        command.env("BACKOFFICE_STORE", url);
    }
    let mut child = command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--password-iterations",
            "1000",
        ])
        .arg("--data-dir")
        .arg(data)
        .env("BACKOFFICE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    if first.starts_with("backoffice listening on") {
        return Ok(child);
    }
    let output = child.wait_with_output().unwrap();
    Err((
        output.status.code(),
        first + &String::from_utf8_lossy(&output.stderr),
    ))
}

#[test]
fn a_node_whose_hold_of_the_ledger_ended_writes_nothing_until_it_holds_it_again() {
    use backoffice::ledger::{AccountId, SystemAccount, Transfer, TransferId, TransferKind};
    use backoffice::store::Store;
    use proto::{Amount, Cid};
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    let transfer = |id: u64| Transfer {
        id: TransferId(id),
        debit: AccountId::System(SystemAccount::Funding),
        credit: AccountId::Customer(Cid::parse("B1-C1").unwrap()),
        amount: Amount::from_nanos(1_000),
        kind: TransferKind::Deposit,
        posted_ms: 1,
    };
    let first = PgStore::connect(&url).unwrap();
    let second = PgStore::connect(&url).unwrap();
    let hold = first.hold_ledger().unwrap();
    first.stage_transfers(&[transfer(0)]).unwrap();
    // The hold's session ends under the node (a database restart, a
    // failover, a proxy dropping it) and another node takes the lock.
    let ended = cluster
        .psql(
            "branch",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND pid <> pg_backend_pid()",
        )
        .unwrap();
    assert_eq!(ended.trim(), "1");
    let other = second.hold_ledger().unwrap();
    let refused = first.stage_transfers(&[transfer(1)]).unwrap_err();
    assert!(
        matches!(&refused, StoreError::Unavailable(text) if text.contains("ended under it")),
        "{refused:?}"
    );
    second.stage_transfers(&[transfer(1)]).unwrap();
    assert_eq!(second.transfers_from(1).unwrap().len(), 1);
    drop(other);
    drop(hold);
    // Held again (on a new connection), the first node writes again.
    let again = first.hold_ledger().unwrap();
    assert_eq!(first.transfers_from(0).unwrap().len(), 2);
    first.stage_transfers(&[transfer(2)]).unwrap();
    drop(again);
    assert_eq!(
        cluster
            .psql("branch", "SELECT count(*) FROM transfers")
            .unwrap()
            .trim(),
        "3"
    );
}

#[test]
fn the_ledger_lock_is_held_by_one_node_at_a_time() {
    use backoffice::store::Store;
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    let first = PgStore::connect(&url).unwrap();
    let second = std::sync::Arc::new(PgStore::connect(&url).unwrap());
    let hold = first.hold_ledger().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    let waiting = {
        let second = std::sync::Arc::clone(&second);
        std::thread::spawn(move || {
            let hold = second.hold_ledger().unwrap();
            sender.send(std::time::Instant::now()).unwrap();
            drop(hold);
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        receiver.try_recv().is_err(),
        "taken while the first node held it"
    );
    let released = std::time::Instant::now();
    drop(hold);
    let taken = receiver.recv().unwrap();
    assert!(taken >= released);
    waiting.join().unwrap();
}

#[test]
fn a_node_rereads_the_ledger_only_when_someone_else_wrote_money_since_its_own_last_write() {
    use backoffice::ledger::{AccountId, SystemAccount, Transfer, TransferId, TransferKind};
    use backoffice::store::Store;
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    let (a, b) = (
        PgStore::connect(&url).unwrap(),
        PgStore::connect(&url).unwrap(),
    );
    let deposit = |id: u64| Transfer {
        id: TransferId(id),
        debit: AccountId::System(SystemAccount::Funding),
        credit: AccountId::Customer(proto::Cid::parse("B1-C1").unwrap()),
        amount: proto::Amount::from_nanos(1),
        kind: TransferKind::Deposit,
        posted_ms: 1,
    };
    let write = |store: &PgStore, id: u64| {
        let hold = store.hold_ledger().unwrap();
        let others = hold.others_wrote();
        let written = store
            .stage_transfers(&[deposit(id)])
            .map_err(|error| error.to_string());
        drop(hold);
        (others, written)
    };
    // A node that never wrote knows nothing: it reads.
    assert_eq!(write(&a, 0), (true, Ok(())));
    // Its own write since: nothing to read again.
    assert_eq!(write(&a, 1), (false, Ok(())));
    assert!(
        !a.hold_ledger().unwrap().others_wrote(),
        "a hold without a write"
    );
    // Another node wrote: both read.
    assert_eq!(write(&b, 2), (true, Ok(())));
    assert_eq!(write(&a, 3), (true, Ok(())));
    assert_eq!(write(&a, 4), (false, Ok(())));
    // A write the database refused (a number taken): this node does not
    // know where the ledger stands, so it reads.
    let (others, refused) = write(&a, 4);
    assert!(!others && refused.is_err(), "{refused:?}");
    assert_eq!(write(&a, 5), (true, Ok(())));
    // Period counts written by anyone, even by hand, count as a write.
    assert_eq!(write(&a, 6), (false, Ok(())));
    cluster
        .psql(
            "branch",
            "INSERT INTO period_uses (payer, pid, month, uses) VALUES ('B1-C1', 'B1-P1', 1, 1)",
        )
        .unwrap();
    assert_eq!(write(&a, 7), (true, Ok(())));
    // A database whose history went back and counted up to the same
    // number again (as a restore or a failover to a replica that missed
    // commits would, by other writes): the token tells it apart.
    assert_eq!(write(&a, 8), (false, Ok(())));
    cluster
        .psql(
            "branch",
            "UPDATE ledger_epoch SET token = 'another history'",
        )
        .unwrap();
    assert_eq!(write(&a, 9), (true, Ok(())));
    // And a database that lost committed transfers is not read as the
    // ledger: nothing is decided on it.
    cluster
        .psql(
            "branch",
            "ALTER TABLE transfers DISABLE TRIGGER USER; DELETE FROM transfers WHERE id = 9; \
             ALTER TABLE transfers ENABLE TRIGGER USER",
        )
        .unwrap();
    let lost = a.transfers_from(10).unwrap_err().to_string();
    assert!(
        lost.contains("holds 9 transfers, but 10 were committed"),
        "{lost}"
    );
    assert_eq!(a.transfers_from(9).unwrap().len(), 0);
}

#[test]
fn transactions_aborted_for_a_conflict_are_run_again_under_serializable_isolation() {
    use backoffice::ledger::{AccountId, SystemAccount, Transfer, TransferId, TransferKind};
    use backoffice::store::Store;
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    PgStore::connect(&url).unwrap();
    // As an operator may set it, and as some engines always run.
    cluster
        .psql(
            "postgres",
            "ALTER DATABASE branch SET default_transaction_isolation = 'serializable'",
        )
        .unwrap();
    let store = PgStore::connect(&url).unwrap();
    let bid = proto::Bid::parse("B1").unwrap();
    // Customers made at once from many threads all take the same serial
    // row: under SERIALIZABLE most of them first fail to serialize.
    let cids: Vec<proto::Cid> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8)
            .map(|thread| {
                let (store, bid) = (&store, &bid);
                scope.spawn(move || {
                    (0..10)
                        .map(|n| {
                            store
                                .create_customer(
                                    bid,
                                    "Payer",
                                    &format!("p{thread}-{n}@example.org"),
                                )
                                .unwrap_or_else(|error| {
                                    panic!("thread {thread}, customer {n}: {error}")
                                })
                                .cid
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    let mut unique = cids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        80,
        "every customer made once, each its own CID"
    );
    // Money written at once by two stores (no ledger lock taken here, so
    // the database alone orders them) conflicts on the balance rows.
    let other = PgStore::connect(&url).unwrap();
    let deposit = |id: u64| Transfer {
        id: TransferId(id),
        debit: AccountId::System(SystemAccount::Funding),
        credit: AccountId::Customer(cids[0]),
        amount: proto::Amount::from_nanos(1),
        kind: TransferKind::Deposit,
        posted_ms: 1,
    };
    std::thread::scope(|scope| {
        for (half, store) in [&store, &other].into_iter().enumerate() {
            scope.spawn(move || {
                for n in 0..20u64 {
                    store
                        .stage_transfers(&[deposit(n * 2 + half as u64)])
                        .unwrap();
                }
            });
        }
    });
    let (report, transfers) = store.verify();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(transfers.len(), 40);
}

/// A CA and a certificate it signed for 127.0.0.1 and localhost: (CA PEM,
/// certificate PEM, key PEM).
fn test_pki(name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    (ca.pem(), server.pem(), server_key.serialize_pem())
}

#[test]
fn the_database_is_reached_over_tls_it_verifies_when_the_connection_string_asks() {
    let cluster = cluster();
    cluster.create_database("branch").unwrap();
    let (ca, certificate, key) = test_pki("database");
    cluster.enable_tls(&certificate, &key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trusted = dir.path().join("ca.pem");
    std::fs::write(&trusted, ca).unwrap();
    let stranger = dir.path().join("other-ca.pem");
    std::fs::write(&stranger, test_pki("other").0).unwrap();
    let base = cluster.url("branch");
    let sessions = |ssl: bool| {
        cluster
            .psql(
                "postgres",
                &format!(
                    "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                     WHERE a.application_name = 'backoffice' AND s.ssl = {ssl}"
                ),
            )
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    // Asked for, with the CA that signed the server's certificate: TLS.
    let store = PgStore::connect(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        trusted.display()
    ))
    .unwrap();
    assert!(sessions(true) >= 1, "a TLS session");
    assert_eq!(sessions(false), 0, "and no plain one");
    drop(store);
    // A server whose certificate another CA signed is refused, naming why.
    let refused = PgStore::connect(&format!(
        "{base}?sslmode=require&sslrootcert={}",
        stranger.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("certificate") || refused.contains("TLS"),
        "{refused}"
    );
    assert!(!refused.contains("sslrootcert"), "{refused}");
    // A CA file that holds none is refused before any connection.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let refused = PgStore::connect(&format!(
        "{base}?sslmode=require&sslrootcert={}",
        empty.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(refused.contains("holds no usable certificate"), "{refused}");
    // Not asked for: plain, as before.
    let plain = PgStore::connect(&base).unwrap();
    assert!(sessions(false) >= 1, "a plain session");
    drop(plain);
}

#[test]
fn a_node_that_never_lets_go_of_the_ledger_lock_makes_others_fail_retryably_not_hang() {
    use backoffice::store::Store;
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    let stuck = PgStore::connect(&url).unwrap();
    let other = PgStore::connect(&url)
        .unwrap()
        .with_ledger_lock_wait(std::time::Duration::from_millis(300));
    let hold = stuck.hold_ledger().unwrap();
    let started = std::time::Instant::now();
    let refused = other.hold_ledger().map(drop).unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(refused, StoreError::Unavailable(_)), "{refused:?}");
    assert!(
        refused.to_string().contains("held by another node"),
        "{refused}"
    );
    assert!(
        waited >= std::time::Duration::from_millis(250)
            && waited < std::time::Duration::from_secs(10),
        "{waited:?}"
    );
    // Once it lets go, the other node takes the lock at once.
    drop(hold);
    let taken = other.hold_ledger().unwrap();
    assert!(taken.others_wrote(), "a first hold reads everything");
}

#[test]
fn a_data_folder_remembers_where_its_branch_is_kept() {
    let cluster = cluster();
    let url = cluster.create_database("branch").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let in_pg = dir.path().join("in-postgresql");
    let mut node = serve(&url, &in_pg).expect("serves from PostgreSQL");
    node.kill().unwrap();
    node.wait().unwrap();
    // Started again without --store: refused, never an empty branch.
    let (code, text) = serve_on(None, &in_pg).expect_err("no --store");
    assert_eq!(code, Some(69), "{text}");
    assert!(text.contains("kept in PostgreSQL at 127.0.0.1:"), "{text}");
    assert!(!in_pg.join("store").exists(), "no sled store was made");
    // Nor does an offline check report an empty store as verified.
    let verify = Command::new(env!("CARGO_BIN_EXE_backoffice"))
        .args(["verify", "--data-dir"])
        .arg(&in_pg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&verify.stderr);
    assert_eq!(verify.status.code(), Some(69), "{text}");
    assert!(text.contains("kept in PostgreSQL"), "{text}");
    // A folder with a sled branch is not served from PostgreSQL.
    let in_sled = dir.path().join("in-sled");
    let mut node = serve_on(None, &in_sled).expect("serves from sled");
    node.kill().unwrap();
    node.wait().unwrap();
    let (code, text) = serve(&url, &in_sled).expect_err("--store on a sled folder");
    assert_eq!(code, Some(69), "{text}");
    assert!(text.contains("kept in the data folder"), "{text}");
}
