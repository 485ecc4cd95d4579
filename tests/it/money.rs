//! The whole money path with the real binaries: a backoffice, a meter
//! registered with it, a metered program with a nested component, and exact
//! balances and standings afterwards.

use std::process::Command;

use proto::FaultCode;
use proto::xmlrpc::Value;

use crate::support::{
    Backoffice, Lcg, MeterdSetup, grant_by_password, kill_test_seed, months_since, now_ms,
    operator_call, s, workspace_binary,
};
use crate::web::PASSWORD;

use crate::examples;

#[test]
fn uses_through_meterd_become_exact_balances_and_standings() {
    uses_through_meterd(None);
}

/// The same money path with the branch in PostgreSQL (a throw-away
/// cluster), checked by `ledger.verify` against the balances it keeps.
#[test]
fn uses_through_meterd_become_exact_balances_and_standings_in_postgresql() {
    let cluster = pgtest::Cluster::start().unwrap();
    let url = cluster.create_database("branch").unwrap();
    uses_through_meterd(Some(&url));
}

fn uses_through_meterd(store: Option<&str>) {
    let started_ms = now_ms();
    let dir = tempfile::tempdir().unwrap();
    let office = match store {
        None => Backoffice::start(dir.path()),
        Some(url) => {
            Backoffice::start_with(dir.path(), "127.0.0.1:0", &[("BACKOFFICE_STORE", url)])
        }
    };

    let consumer = office.text(
        "customer.create",
        &[s("Ada"), s("ada@example.org"), s(PASSWORD)],
        "CID",
    );
    let producer = office.text("customer.create", &[s("Bob"), s("bob@example.org")], "CID");
    let maker = office.text(
        "customer.create",
        &[s("Carol"), s("carol@example.org")],
        "CID",
    );
    let flat = Value::Base64(examples::module("flat"));
    let tiered = Value::Base64(examples::module("tiered"));
    let product = office.text(
        "product.create",
        &[
            s(&producer),
            s("Editor"),
            s("0.25 per use"),
            flat,
            s("0.25"),
        ],
        "PID",
    );
    let component = office.text(
        "product.create",
        &[
            s(&maker),
            s("Spell"),
            s("10 free, then 0.05"),
            tiered,
            s("0.05"),
        ],
        "PID",
    );
    // Bob builds Carol's spell checker into his editor.
    office
        .call("product.components", &[s(&product), s(&component)])
        .unwrap();
    let (mid, secret) = office.meter(&consumer);
    office
        .call("account.deposit", &[s(&consumer), s("10")])
        .unwrap();

    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, &secret).unwrap();
    let setup = MeterdSetup {
        dir: dir.path().to_owned(),
        backoffice: Some((office.address, mid.parse().unwrap(), secret_file)),
    };
    let meterd = setup.start();
    let socket = meterd.socket.display().to_string();
    grant_by_password(&meterd.socket, &consumer, PASSWORD);
    let status = Command::new(env!("CARGO_BIN_EXE_metered-demo"))
        .args([&socket, &consumer, &product, &component, "2", "5"])
        .status()
        .unwrap();
    assert!(status.success());
    let cli = |args: &[&str]| {
        Command::new(workspace_binary("meterd", "meterd"))
            .arg("--socket")
            .arg(&meterd.socket)
            .args(args)
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(cli(&["flush"]), Some(0), "the upload is accepted");
    let balance = |cid: &str| office.text("customer.show", &[s(cid)], "balance");
    // Ten uses of the editor at 0.25; the ten component uses inside it are
    // the first ten of the month, free under the tiered terms, and would
    // have been Bob's to pay.
    assert_eq!(balance(&consumer), "7.5");
    assert_eq!(balance(&producer), "2.5");
    assert_eq!(balance(&maker), "0");
    // Those ten free uses are on Bob's side, per month of use.
    let free: u64 = months_since(started_ms)
        .into_iter()
        .map(|month| format!("{}-{:02}", month / 100, month % 100))
        .flat_map(|month| {
            let free = office.call("account.freeUses", &[s(&producer), s(&month)]);
            free.unwrap().as_array().unwrap().to_vec()
        })
        .map(|line| {
            assert_eq!(
                line.member("pid").and_then(Value::as_str),
                Some(&*component)
            );
            line.member("uses")
                .and_then(Value::as_str)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(free, 10);

    // The operator's view: Prometheus metrics and the health page.
    let mut visitor = crate::web::Visitor::new(office.address);
    let metrics = visitor.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let value = |name: &str| -> u64 {
        metrics
            .body
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {}", metrics.body))
            .parse()
            .unwrap()
    };
    assert!(value("backoffice_batches_applied_total") >= 1);
    // The demo's uses: 10 commits of the editor and 10 of the component
    // (queries never committed are not uploaded), and the logins.
    assert!(
        value("backoffice_readings_received_total") >= 20,
        "{}",
        metrics.body
    );
    assert_eq!(value("backoffice_prices_total"), 20);
    assert!(value("backoffice_pricing_fuel_total") > 0);
    assert_eq!(value("backoffice_suspense_readings"), 0);
    assert!(metrics.body.contains("\nbackoffice_upload_lag_seconds "));
    // Where the batches' time went, by phase: every phase named, and the
    // whole of it more than nothing.
    let phases: Vec<f64> = [
        "decoding",
        "looking_up",
        "waiting_for_periods",
        "pricing",
        "waiting_for_ledger",
        "under_ledger",
        "durable",
    ]
    .iter()
    .map(|phase| {
        let name = format!("backoffice_batch_phase_seconds_total{{phase=\"{phase}\"}} ");
        metrics
            .body
            .lines()
            .find_map(|line| line.strip_prefix(&name))
            .unwrap_or_else(|| panic!("{name} in {}", metrics.body))
            .parse()
            .unwrap()
    })
    .collect();
    assert!(phases.iter().sum::<f64>() > 0.0, "{phases:?}");
    assert!(phases[3] > 0.0, "pricing took time: {phases:?}");
    let health = visitor.get("/health");
    assert_eq!(health.status, 200);
    assert!(health.body.starts_with("ok\n"), "{}", health.body);

    // Statements come in pages: from a transfer number, at most so many.
    let all = office.call("account.statement", &[s(&consumer)]).unwrap();
    let all = all.as_array().unwrap();
    assert!(all.len() >= 2, "a deposit and uses: {all:?}");
    let transfer = |line: &Value| {
        line.member("transfer")
            .and_then(Value::as_str)
            .unwrap()
            .to_owned()
    };
    let second = transfer(&all[1]);
    let page = office
        .call("account.statement", &[s(&consumer), s(&second), s("1")])
        .unwrap();
    let page = page.as_array().unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(transfer(&page[0]), second);
    let bad = office.call("account.statement", &[s(&consumer), s("-3")]);
    assert_eq!(
        bad.unwrap_err().registered(),
        Some(FaultCode::InvalidParams)
    );
    let none = office.call("suspense.list", &[s(""), s("5")]).unwrap();
    assert_eq!(none.as_array().map(<[Value]>::len), Some(0));
    let bad = office.call("suspense.list", &[s("B1-M1 nonsense")]);
    assert_eq!(
        bad.unwrap_err().registered(),
        Some(FaultCode::InvalidParams)
    );

    // Denied: the next upload tells the meter, and query answers false.
    office
        .call("account.deny", &[s(&consumer), Value::Bool(true)])
        .unwrap();
    assert_eq!(cli(&["flush"]), Some(0));
    let query_in_session = |product: &str| {
        let meterd = workspace_binary("meterd", "meterd");
        let script = format!(
            "M='{} --socket {}'; $M login {consumer}; $M query {product}; code=$?; $M cancel {product}; $M logout {consumer}; exit $code",
            meterd.display(),
            socket
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(query_in_session(&product), Some(1), "denied");
    office
        .call("account.deny", &[s(&consumer), Value::Bool(false)])
        .unwrap();
    assert_eq!(cli(&["flush"]), Some(0));
    assert_eq!(query_in_session(&product), Some(0), "allowed again");

    // Ada revokes the meter's grant: its later uses of hers go to
    // suspense, and after the next upload `query` answers false for her.
    let grants = office.call("grant.list", &[s(&consumer)]).unwrap();
    let grants = grants.as_array().unwrap();
    assert_eq!(grants.len(), 1, "{grants:?}");
    let number = grants[0].member("grant").and_then(Value::as_str).unwrap();
    office.call("grant.revoke", &[s(number)]).unwrap();
    let paid_before = balance(&consumer);
    let status = Command::new(env!("CARGO_BIN_EXE_metered-demo"))
        .args([&socket, &consumer, &product, &component, "1", "1"])
        .status()
        .unwrap();
    assert!(status.success(), "the meter does not know yet");
    assert_eq!(cli(&["flush"]), Some(0));
    assert_eq!(balance(&consumer), paid_before, "nothing charged after");
    let suspense = office.call("suspense.list", &[]).unwrap();
    let reasons: Vec<&str> = suspense
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|record| record.member("reason").and_then(Value::as_str))
        .collect();
    assert!(
        !reasons.is_empty() && reasons.iter().all(|reason| reason.starts_with("no grant")),
        "{reasons:?}"
    );
    assert_eq!(query_in_session(&product), Some(1), "revoked");

    // Operator calls need the token.
    let refused = operator_call(office.address, "wrong", "customer.show", &[s(&consumer)]);
    assert_eq!(
        refused.unwrap_err().registered(),
        Some(FaultCode::Unauthorized)
    );

    // The books verify: the store's records, and its transfers against the
    // ledger in memory (and, in PostgreSQL, the balances it keeps).
    let verified = office.call("ledger.verify", &[]).unwrap();
    assert_eq!(
        verified.member("ok"),
        Some(&Value::Bool(true)),
        "{verified:?}"
    );
    let checked = verified.member("checked").and_then(Value::as_str).unwrap();
    assert_eq!(
        checked.contains("balances kept"),
        store.is_some(),
        "the store asked for is the one that ran: {checked}"
    );
}

/// Commits uses of `product` until `stop`, flushing every 25; returns how
/// many were acknowledged and whether one was in flight when it stopped.
fn commit_until(
    socket: std::path::PathBuf,
    consumer: proto::Cid,
    product: proto::Pid,
    stop: &std::sync::atomic::AtomicBool,
    progress: &std::sync::atomic::AtomicU64,
) -> (u64, u64) {
    let mut meter = meterd::client::Meter::connect(socket);
    meter.login(consumer).expect("login");
    let (mut acknowledged, mut unsure) = (0, 0);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        // Until an upload confirms the customer, the meter allows only a few
        // unconfirmed uses (and refuses while the backoffice is down): wait
        // for an upload then.
        if !meter.try_query(product).expect("query answered") {
            let _ = meter.flush();
            continue;
        }
        match meter.commit(product) {
            Ok(()) => {
                acknowledged += 1;
                progress.store(acknowledged, std::sync::atomic::Ordering::Relaxed);
            }
            Err(_) => unsure += 1,
        }
        if acknowledged % 25 == 0 {
            // Uploads fail while the backoffice is down; they are retried.
            let _ = meter.flush();
        }
    }
    (acknowledged, unsure)
}

#[test]
fn sigkill_of_the_backoffice_during_uploads_applies_every_batch_once() {
    sigkill_during_uploads(
        "sigkill_of_the_backoffice_during_uploads_applies_every_batch_once",
        None,
    );
}

/// PostgreSQL itself crashes (`pg_ctl stop -m immediate`) during uploads
/// and comes back; the backoffice, which stops taking money once a write
/// fails, is restarted as its supervisor would. Nothing acknowledged is
/// lost and nothing is charged twice.
#[test]
fn postgresql_crashing_during_uploads_loses_and_doubles_nothing() {
    let cluster = pgtest::Cluster::start().unwrap();
    let url = cluster.create_database("branch").unwrap();
    sigkill_during_uploads_with(
        "postgresql_crashing_during_uploads_loses_and_doubles_nothing",
        Some(&url),
        Some(&cluster),
    );
}

/// The same kills with the branch in PostgreSQL: each killed node's
/// transaction is rolled back with its connection, and the next node
/// claims the database as soon as the dead one's connection is gone.
#[test]
fn sigkill_of_the_backoffice_in_postgresql_during_uploads_applies_every_batch_once() {
    let cluster = pgtest::Cluster::start().unwrap();
    let url = cluster.create_database("branch").unwrap();
    sigkill_during_uploads(
        "sigkill_of_the_backoffice_in_postgresql_during_uploads_applies_every_batch_once",
        Some(&url),
    );
}

fn sigkill_during_uploads(test: &str, store: Option<&str>) {
    sigkill_during_uploads_with(test, store, None);
}

/// Kills the backoffice `ROUNDS` times during uploads; with `database`,
/// crashes the database first each time.
fn sigkill_during_uploads_with(
    test: &str,
    store: Option<&str>,
    database: Option<&pgtest::Cluster>,
) {
    const ROUNDS: u32 = 8;
    let dir = tempfile::tempdir().unwrap();
    let mut random = Lcg(kill_test_seed(test));
    let envs: Vec<(&str, &str)> = store
        .map(|url| ("BACKOFFICE_STORE", url))
        .into_iter()
        .collect();
    // The backoffice picks its port (port 0) and says which; each restart
    // listens there again, since meterd was told that address. (A port
    // reserved here and freed before the backoffice bound it could be
    // taken in between; a killed listener's port is rebound at once.)
    let mut office = Backoffice::start_with(dir.path(), "127.0.0.1:0", &envs);
    let listen = office.address.to_string();
    let consumer = office.text(
        "customer.create",
        &[s("Ada"), s("ada@example.org"), s(PASSWORD)],
        "CID",
    );
    let producer = office.text("customer.create", &[s("Bob"), s("bob@example.org")], "CID");
    let flat = Value::Base64(examples::module("flat"));
    let product = office.text(
        "product.create",
        &[
            s(&producer),
            s("Editor"),
            s("0.25 per use"),
            flat,
            s("0.25"),
        ],
        "PID",
    );
    let (mid, secret) = office.meter(&consumer);
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, &secret).unwrap();
    office
        .call("account.deposit", &[s(&consumer), s("100000")])
        .unwrap();
    let setup = MeterdSetup {
        dir: dir.path().to_owned(),
        backoffice: Some((office.address, mid.parse().unwrap(), secret_file)),
    };
    let meterd = setup.start();
    grant_by_password(&meterd.socket, &consumer, PASSWORD);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let progress = std::sync::atomic::AtomicU64::new(0);
    let (consumer_id, product_id) = (consumer.parse().unwrap(), product.parse().unwrap());
    let (acknowledged, unsure) = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            commit_until(
                meterd.socket.clone(),
                consumer_id,
                product_id,
                &stop,
                &progress,
            )
        });
        for _ in 0..ROUNDS {
            std::thread::sleep(std::time::Duration::from_millis(150 + random.below(200)));
            if let Some(cluster) = database {
                cluster.stop_immediately().expect("crash the database");
                std::thread::sleep(std::time::Duration::from_millis(random.below(300)));
                cluster.restart().expect("the database recovers");
            }
            office.running.child.kill().expect("SIGKILL the backoffice");
            office.running.child.wait().unwrap();
            // Its store must open again with every invariant holding.
            office = Backoffice::start_with(dir.path(), &listen, &envs);
        }
        // On a loaded machine the kills may have left no upload time to
        // confirm the customer: with the backoffice up, let the uses go on
        // until there are enough to mean something (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while progress.load(std::sync::atomic::Ordering::Relaxed) <= 60
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        client.join().expect("client thread")
    });
    assert!(
        acknowledged > 50,
        "too few uses to mean much: {acknowledged}"
    );
    let flush = || {
        Command::new(workspace_binary("meterd", "meterd"))
            .arg("--socket")
            .arg(&meterd.socket)
            .arg("flush")
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(flush(), Some(0), "the last upload");
    let balance = |cid: &str| -> proto::Amount {
        office
            .text("customer.show", &[s(cid)], "balance")
            .parse()
            .unwrap()
    };
    let earned = balance(&producer);
    let uploaded = u64::try_from(earned.nanos() / 250_000_000).unwrap();
    assert_eq!(earned.nanos() % 250_000_000, 0, "whole uses only: {earned}");
    assert!(
        (acknowledged..=acknowledged + unsure).contains(&uploaded),
        "{uploaded} uses charged for {acknowledged} acknowledged (+{unsure} unsure)"
    );
    let paid = proto::Amount::from_units(100_000)
        .unwrap()
        .checked_sub(balance(&consumer))
        .unwrap();
    assert_eq!(paid, earned, "every transfer balanced");
    // Every use charged is kept itemised with its batch, whatever the
    // kills interrupted, and prices again to what was charged.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut months: Vec<String> = [now_ms - 15 * 60 * 1000, now_ms]
        .iter()
        .map(|&ms| {
            let (year, month, _) = proto::time::civil_date(ms);
            format!("{year:04}-{month:02}")
        })
        .collect();
    months.dedup();
    let mut priced = 0;
    for month in &months {
        // (A month the test only touched the start of may have no uses.)
        let report = match office.call("audit.month", &[s(&consumer), s(month)]) {
            Err(fault) if fault.code == proto::FaultCode::NotFound.code() && months.len() > 1 => {
                continue;
            }
            other => other.unwrap(),
        };
        assert_eq!(
            report.member("confirmed"),
            Some(&proto::xmlrpc::Value::Bool(true)),
            "{report:?}"
        );
        priced += report
            .member("priced")
            .and_then(proto::xmlrpc::Value::as_str)
            .unwrap()
            .parse::<u64>()
            .unwrap();
    }
    assert_eq!(
        priced, uploaded,
        "every use charged is kept and priced again"
    );
    println!(
        "{ROUNDS} kills of the backoffice: {acknowledged} uses acknowledged, {uploaded} charged once each"
    );
}

/// Two `backoffice serve` processes on one PostgreSQL database, each with
/// a meter uploading to it: node A is killed with SIGKILL during uploads and
/// its meter is pointed at node B, which gets the batch A was applying (or
/// had applied without answering); then PostgreSQL itself is stopped with
/// `pg_ctl stop -m immediate` during uploads and restarted, with both
/// meters on B and nobody restarted. Nothing acknowledged is lost, nothing
/// is charged twice, and both nodes (A started again) show one ledger that
/// verifies.
#[test]
fn two_nodes_on_one_database_survive_a_killed_node_and_a_crashed_database() {
    let test = "two_nodes_on_one_database_survive_a_killed_node_and_a_crashed_database";
    let mut random = Lcg(kill_test_seed(test));
    let cluster = pgtest::Cluster::start().unwrap();
    let url = cluster.create_database("branch").unwrap();
    let envs = [("BACKOFFICE_STORE", url.as_str())];
    let dir = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let node_a = Backoffice::start_with(&dir_a, "127.0.0.1:0", &envs);
    let node_b = Backoffice::start_with(&dir_b, "127.0.0.1:0", &envs);
    // Registered on A, seen by B: one branch.
    let producer = node_a.text("customer.create", &[s("Bob"), s("bob@example.org")], "CID");
    let product = node_b.text(
        "product.create",
        &[
            s(&producer),
            s("Editor"),
            s("0.25 per use"),
            Value::Base64(examples::module("flat")),
            s("0.25"),
        ],
        "PID",
    );
    let mut payers = Vec::new();
    for (n, (name, email)) in [("Ada", "ada@example.org"), ("Cy", "cy@example.org")]
        .into_iter()
        .enumerate()
    {
        let office = if n == 0 { &node_a } else { &node_b };
        let cid = office.text("customer.create", &[s(name), s(email), s(PASSWORD)], "CID");
        let (mid, secret) = office.meter(&cid);
        let meter_dir = dir.path().join(format!("meter-{n}"));
        std::fs::create_dir_all(&meter_dir).unwrap();
        let secret_file = meter_dir.join("secret");
        std::fs::write(&secret_file, &secret).unwrap();
        office
            .call("account.deposit", &[s(&cid), s("100000")])
            .unwrap();
        payers.push((
            cid,
            mid.parse::<proto::Mid>().unwrap(),
            meter_dir,
            secret_file,
        ));
    }
    let setup = |n: usize, at: std::net::SocketAddr| MeterdSetup {
        dir: payers[n].2.clone(),
        backoffice: Some((at, payers[n].1, payers[n].3.clone())),
    };
    let mut meter_a = setup(0, node_a.address).start();
    let meter_b = setup(1, node_b.address).start();
    grant_by_password(&meter_a.socket, &payers[0].0, PASSWORD);
    grant_by_password(&meter_b.socket, &payers[1].0, PASSWORD);
    let product_id: proto::Pid = product.parse().unwrap();
    let cids: Vec<proto::Cid> = payers.iter().map(|p| p.0.parse().unwrap()).collect();
    // Both meters use the product until `stop`; `during` runs meanwhile.
    let run = |sockets: [&std::path::Path; 2], during: &mut dyn FnMut()| {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let progress = [
            std::sync::atomic::AtomicU64::new(0),
            std::sync::atomic::AtomicU64::new(0),
        ];
        std::thread::scope(|scope| {
            let clients: Vec<_> = (0..2)
                .map(|n| {
                    let (socket, stop, progress) = (sockets[n].to_owned(), &stop, &progress[n]);
                    let cid = cids[n];
                    scope.spawn(move || commit_until(socket, cid, product_id, stop, progress))
                })
                .collect();
            during();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while progress
                .iter()
                .any(|p| p.load(std::sync::atomic::Ordering::Relaxed) <= 30)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            clients
                .into_iter()
                .map(|client| client.join().expect("client thread"))
                .collect::<Vec<(u64, u64)>>()
        })
    };
    // 1. Node A dies with SIGKILL during uploads.
    let mut node_a = Some(node_a);
    let first = run([&meter_a.socket, &meter_b.socket], &mut || {
        std::thread::sleep(std::time::Duration::from_millis(300 + random.below(400)));
        let mut killed = node_a.take().unwrap();
        killed.running.child.kill().expect("SIGKILL node A");
        killed.running.child.wait().unwrap();
    });
    // Its meter now uploads to B: what it had not seen acknowledged
    // (the batch A died in, applied or not) goes to B under the same ids.
    drop(meter_a);
    meter_a = setup(0, node_b.address).start();
    // 2. PostgreSQL crashes during uploads to B and comes back; no node is
    // restarted.
    let second = run([&meter_a.socket, &meter_b.socket], &mut || {
        std::thread::sleep(std::time::Duration::from_millis(300 + random.below(400)));
        cluster.stop_immediately().expect("crash the database");
        std::thread::sleep(std::time::Duration::from_millis(random.below(300)));
        cluster.restart().expect("the database recovers");
    });
    for meter in [&meter_a, &meter_b] {
        let flushed = Command::new(workspace_binary("meterd", "meterd"))
            .arg("--socket")
            .arg(&meter.socket)
            .arg("flush")
            .status()
            .unwrap();
        assert!(
            flushed.success(),
            "the last upload of {}",
            meter.socket.display()
        );
    }
    // Node A again, on its own data folder: the same ledger as B.
    let node_a = Backoffice::start_with(&dir_a, "127.0.0.1:0", &envs);
    let balance = |office: &Backoffice, cid: &str| -> proto::Amount {
        office
            .text("customer.show", &[s(cid)], "balance")
            .parse()
            .unwrap()
    };
    let mut charged_total = 0u64;
    for (n, (cid, ..)) in payers.iter().enumerate() {
        let acknowledged = first[n].0 + second[n].0;
        let unsure = first[n].1 + second[n].1;
        let paid = proto::Amount::from_units(100_000)
            .unwrap()
            .checked_sub(balance(&node_b, cid))
            .unwrap();
        assert_eq!(paid.nanos() % 250_000_000, 0, "whole uses only: {paid}");
        let charged = u64::try_from(paid.nanos() / 250_000_000).unwrap();
        assert!(
            (acknowledged..=acknowledged + unsure).contains(&charged),
            "{cid}: {charged} uses charged for {acknowledged} acknowledged (+{unsure} unsure)"
        );
        assert_eq!(balance(&node_a, cid), balance(&node_b, cid));
        charged_total += charged;
    }
    let earned = balance(&node_b, &producer);
    assert_eq!(earned.nanos(), i128::from(charged_total) * 250_000_000);
    assert_eq!(balance(&node_a, &producer), earned);
    for office in [&node_a, &node_b] {
        let report = office.call("ledger.verify", &[]).unwrap();
        assert_eq!(report.member("ok"), Some(&Value::Bool(true)), "{report:?}");
    }
    println!(
        "two nodes: {charged_total} uses charged once each ({:?} then {:?} acknowledged, unsure)",
        first, second
    );
}

#[test]
fn the_operator_commands_drive_a_running_backoffice() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let token_file = dir.path().join("backoffice").join("operator-token");
    let run = |args: &[&str]| {
        let output = Command::new(workspace_binary("backoffice", "backoffice"))
            .arg("--url")
            .arg(format!("http://{}/RPC2", office.address))
            .arg("--token-file")
            .arg(&token_file)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.code(), text)
    };
    let (code, text) = run(&["customer", "Ada", "ada@example.org"]);
    assert_eq!((code, text.trim()), (Some(0), "CID=B1-C1"));
    let (code, text) = run(&["deposit", "B1-C1", "5.5"]);
    assert_eq!(code, Some(0));
    assert!(text.contains("balance=5.5"), "{text}");
    assert!(text.contains("deposit reference "), "{text}");
    // A deposit run again with its reference is made once.
    for _ in 0..2 {
        let (code, text) = run(&["deposit", "B1-C1", "1", "--reference", "inv-7"]);
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains("balance=6.5"), "{text}");
        assert!(text.contains("reference=inv-7"), "{text}");
    }
    let (code, text) = run(&["deposit", "B1-C1", "2", "--reference", "inv-7"]);
    assert_eq!(
        code,
        Some(2),
        "another amount under a used reference: {text}"
    );
    let (code, text) = run(&["deposit", "B1-C1", "1", "--reference", "no spaces"]);
    assert_eq!(code, Some(64), "{text}");
    let (_, text) = run(&["credit-limit", "B1-C1", "-10"]);
    assert!(text.contains("creditLimit=-10"), "{text}");
    let (_, text) = run(&["deny", "B1-C1"]);
    assert!(text.contains("denied=true"), "{text}");
    let (_, text) = run(&["allow", "B1-C1"]);
    assert!(text.contains("denied=false"), "{text}");
    let (_, text) = run(&["statement", "B1-C1"]);
    assert!(text.contains("amount=5.5 what=deposit"), "{text}");
    assert_eq!(text.matches("what=deposit").count(), 2, "{text}");
    // No uses yet, so none free; a month that is not one is refused.
    let (code, text) = run(&["free-uses", "B1-C1", "--month", "2026-11"]);
    assert_eq!((code, text.trim()), (Some(0), ""), "{text}");
    let (code, text) = run(&["free-uses", "B1-C1", "--month", "2026-13"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("YYYY-MM"), "{text}");
    let (code, text) = run(&["customer", "Eve", "not-an-address"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("not an e-mail address"), "{text}");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"not a module").unwrap();
    let (code, text) = run(&[
        "product",
        "B1-C1",
        "Broken",
        "terms",
        garbage.to_str().unwrap(),
        "--max-price",
        "1",
    ]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("not a valid WebAssembly module"), "{text}");
    let (code, text) = run(&["show", "B1-C99"]);
    assert_eq!(code, Some(2), "{text}");
    // A product needs its maximum price per use.
    let (code, text) = run(&["product", "B1-C1", "Editor", "terms", "x.wasm"]);
    assert_eq!(code, Some(2), "clap refuses: {text}");
    assert!(text.contains("--max-price"), "{text}");
    // Grants: none yet; an unknown number cannot be revoked.
    let (code, text) = run(&["grants", "B1-C1"]);
    assert_eq!((code, text.trim()), (Some(0), ""));
    let (code, text) = run(&["revoke", "99"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("no grant 99"), "{text}");
    // Without --token-file, BACKOFFICE_DATA_DIR (which `serve` reads too)
    // finds the token of the backoffice started on that folder.
    let output = Command::new(workspace_binary("backoffice", "backoffice"))
        .arg("--url")
        .arg(format!("http://{}/RPC2", office.address))
        .env("BACKOFFICE_DATA_DIR", dir.path().join("backoffice"))
        .env_remove("BACKOFFICE_TOKEN_FILE")
        .args(["show", "B1-C1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("CID=B1-C1"));
    // A meter's secret goes straight to a file meterd can read, never to
    // the screen.
    let secret_file = dir.path().join("meter.secret");
    let (code, text) = run(&[
        "meter",
        "B1-C1",
        "--secret-file",
        secret_file.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{text}");
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    assert_eq!(secret.len(), 64, "{secret}");
    assert!(!text.contains(&secret), "{text}");
    assert!(text.starts_with("MID=B1-M"), "{text}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // An existing file is never overwritten, and no meter is made then.
    let (code, text) = run(&[
        "meter",
        "B1-C1",
        "--secret-file",
        secret_file.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(64), "{text}");
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);
    std::fs::write(dir.path().join("wrong-token"), "wrong").unwrap();
    let output = Command::new(workspace_binary("backoffice", "backoffice"))
        .arg("--url")
        .arg(format!("http://{}/RPC2", office.address))
        .arg("--token-file")
        .arg(dir.path().join("wrong-token"))
        .args(["show", "B1-C1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("operator token"));
    // The books check out, on the running branch and, once it is stopped,
    // on its data folder.
    let (code, text) = run(&["verify"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(" transfers=2 accounts=2 "), "{text}");
    assert!(text.contains("deposits by reference=2"), "{text}");
    assert!(text.contains("verified: no problems"), "{text}");
    let data = dir.path().join("backoffice");
    let offline = || {
        Command::new(workspace_binary("backoffice", "backoffice"))
            .arg("verify")
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap()
    };
    let output = offline();
    assert_eq!(output.status.code(), Some(69), "the store is in use");
    drop(office);
    let output = offline();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains(" transfers=2 "), "{text}");
}

/// A component used in a child process of the program that uses the
/// product (a helper it runs) is charged to the product's owner: the meter
/// records its commit where the product's use is.
#[test]
fn a_component_used_in_a_child_process_is_charged_to_the_products_owner() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let consumer = office.text(
        "customer.create",
        &[s("Ada"), s("ada@example.org"), s(PASSWORD)],
        "CID",
    );
    let producer = office.text("customer.create", &[s("Bob"), s("bob@example.org")], "CID");
    let maker = office.text(
        "customer.create",
        &[s("Carol"), s("carol@example.org")],
        "CID",
    );
    let flat = || Value::Base64(examples::module("flat"));
    let product = office.text(
        "product.create",
        &[s(&producer), s("Editor"), s("0.25"), flat(), s("0.25")],
        "PID",
    );
    let component = office.text(
        "product.create",
        &[s(&maker), s("Helper"), s("0.25"), flat(), s("0.25")],
        "PID",
    );
    office
        .call("product.components", &[s(&product), s(&component)])
        .unwrap();
    office
        .call("account.deposit", &[s(&consumer), s("10")])
        .unwrap();
    office
        .call("account.deposit", &[s(&producer), s("10")])
        .unwrap();
    let (mid, secret) = office.meter(&consumer);
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, &secret).unwrap();
    let setup = MeterdSetup {
        dir: dir.path().to_owned(),
        backoffice: Some((office.address, mid.parse().unwrap(), secret_file)),
    };
    let meterd = setup.start();
    grant_by_password(&meterd.socket, &consumer, PASSWORD);
    let meter = format!(
        "{} --socket {}",
        workspace_binary("meterd", "meterd").display(),
        meterd.socket.display()
    );
    // The shell uses the editor; a child shell, the helper inside it.
    let script = format!(
        "set -e; M='{meter}'; $M login {consumer}; $M query {product}; \
         sh -c \"$M query {component} && $M commit {component}\"; \
         $M commit {product}; $M logout {consumer}; $M flush"
    );
    let status = Command::new("sh").arg("-c").arg(&script).status().unwrap();
    assert!(status.success());
    let balance = |cid: &str| office.text("customer.show", &[s(cid)], "balance");
    assert_eq!(balance(&consumer), "9.75");
    assert_eq!(
        balance(&producer),
        "10",
        "0.25 for the editor, 0.25 for its helper"
    );
    assert_eq!(balance(&maker), "0.25");
    let suspense = office.call("suspense.list", &[]).unwrap();
    assert_eq!(
        suspense.as_array().map(<[Value]>::len),
        Some(0),
        "{suspense:?}"
    );
}

/// The operator rotates a meter's secret and revokes the meter with the
/// command line, while the real meterd records and uploads uses: inside the
/// grace the running meterd goes on with its old secret; once the old one
/// is refused, its readings wait on the meter, and once its secret file
/// is replaced (no restart needed) every one of them is charged, once;
/// after the revocation uploads are refused with 210 and nothing more is
/// charged.
#[test]
fn the_operator_rotates_and_revokes_a_meter_and_meterd_loses_no_reading() {
    let dir = tempfile::tempdir().unwrap();
    let office = Backoffice::start(dir.path());
    let token_file = dir.path().join("backoffice").join("operator-token");
    let run = |args: &[&str]| {
        let output = Command::new(workspace_binary("backoffice", "backoffice"))
            .arg("--url")
            .arg(format!("http://{}/RPC2", office.address))
            .arg("--token-file")
            .arg(&token_file)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.code(), text)
    };
    let consumer = office.text(
        "customer.create",
        &[s("Ada"), s("ada@example.org"), s(PASSWORD)],
        "CID",
    );
    let producer = office.text("customer.create", &[s("Bob"), s("bob@example.org")], "CID");
    let product = office.text(
        "product.create",
        &[
            s(&producer),
            s("Editor"),
            s("0.25 per use"),
            Value::Base64(examples::module("flat")),
            s("0.25"),
        ],
        "PID",
    );
    let spell = office.text(
        "product.create",
        &[
            s(&producer),
            s("Spell"),
            s("0.25 per use"),
            Value::Base64(examples::module("flat")),
            s("0.25"),
        ],
        "PID",
    );
    office
        .call("account.deposit", &[s(&consumer), s("10")])
        .unwrap();
    let secret_file = dir.path().join("secret");
    let path = |file: &std::path::Path| file.to_str().unwrap().to_owned();
    let (code, text) = run(&["meter", &consumer, "--secret-file", &path(&secret_file)]);
    assert_eq!(code, Some(0), "{text}");
    let mid = text
        .trim()
        .strip_prefix("MID=")
        .and_then(|rest| rest.split_whitespace().next())
        .expect("MID=")
        .to_owned();
    let setup = MeterdSetup {
        dir: dir.path().to_owned(),
        backoffice: Some((office.address, mid.parse().unwrap(), secret_file.clone())),
    };
    let meterd = setup.start();
    grant_by_password(&meterd.socket, &consumer, PASSWORD);
    let meterd_cli = |socket: &std::path::Path, args: &[&str]| {
        let output = Command::new(workspace_binary("meterd", "meterd"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    // Its component's uses go to suspense (not declared): Ada pays 0.5 a run.
    let use_twice = |socket: &std::path::Path| {
        let status = Command::new(env!("CARGO_BIN_EXE_metered-demo"))
            .args([
                socket.to_str().unwrap(),
                &consumer,
                &product,
                &spell,
                "1",
                "2",
            ])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let balance = || office.text("customer.show", &[s(&consumer)], "balance");
    use_twice(&meterd.socket);
    assert_eq!(meterd_cli(&meterd.socket, &["flush"]).0, Some(0));
    assert_eq!(balance(), "9.5");

    // Rotated with the default grace: the running meterd, still signing
    // with the old secret, goes on uploading. The new secret goes to a new
    // file, never to the screen.
    let second_file = dir.path().join("secret.2");
    let (code, text) = run(&[
        "meter",
        "rotate",
        &mid,
        "--secret-file",
        &path(&second_file),
    ]);
    assert_eq!(code, Some(0), "{text}");
    let second = std::fs::read_to_string(&second_file).unwrap();
    assert_eq!(second.len(), 64);
    assert!(!text.contains(&second), "{text}");
    assert_ne!(second, std::fs::read_to_string(&secret_file).unwrap());
    use_twice(&meterd.socket);
    assert_eq!(meterd_cli(&meterd.socket, &["flush"]).0, Some(0));
    assert_eq!(balance(), "9");
    // An existing file is never overwritten, and no new secret is made then.
    let before = office.call("meter.show", &[s(&mid)]).unwrap();
    let (code, text) = run(&[
        "meter",
        "rotate",
        &mid,
        "--secret-file",
        &path(&second_file),
    ]);
    assert_eq!(code, Some(64), "{text}");
    assert_eq!(office.call("meter.show", &[s(&mid)]).unwrap(), before);
    // The new file moved over meterd's: the running meterd signs with it
    // from its next call on, which ends the old secret's grace early.
    let grace = |member: &str| {
        let shown = office.call("meter.show", &[s(&mid)]).unwrap();
        shown
            .member(member)
            .and_then(Value::as_str)
            .unwrap()
            .to_owned()
    };
    assert_ne!(grace("previousValidUntilMs"), "");
    std::fs::rename(&second_file, &secret_file).unwrap();
    use_twice(&meterd.socket);
    assert_eq!(meterd_cli(&meterd.socket, &["flush"]).0, Some(0));
    assert_eq!(balance(), "8.5");
    assert_eq!(grace("previousValidUntilMs"), "", "the grace is over");

    // Rotated again without a grace (a leaked secret): the old secret is
    // refused; the readings wait on the meter, which says why.
    let third_file = dir.path().join("secret.3");
    let (code, text) = run(&[
        "meter",
        "rotate",
        &mid,
        "--grace-hours",
        "0",
        "--secret-file",
        &path(&third_file),
    ]);
    assert_eq!(code, Some(0), "{text}");
    use_twice(&meterd.socket);
    assert_ne!(meterd_cli(&meterd.socket, &["flush"]).0, Some(0));
    let (_, status) = meterd_cli(&meterd.socket, &["status"]);
    assert!(status.contains("202"), "{status}");
    assert!(status.contains("rotated by the operator"), "{status}");
    assert_eq!(balance(), "8.5");
    // The new secret file moved over the old one, with the old one's
    // modification time (as `cp -p` or a restored backup would leave it):
    // the running meterd reads it again when its signature is refused, and
    // the waiting readings are charged, once.
    let modified = std::fs::metadata(&secret_file).unwrap().modified().unwrap();
    std::fs::rename(&third_file, &secret_file).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&secret_file)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    assert_eq!(meterd_cli(&meterd.socket, &["flush"]).0, Some(0));
    assert_eq!(balance(), "8");
    // A restart reads the file too, and loses nothing.
    drop(meterd);
    let meterd = setup.start();
    use_twice(&meterd.socket);
    assert_eq!(meterd_cli(&meterd.socket, &["flush"]).0, Some(0));
    assert_eq!(balance(), "7.5");

    // Revoked: recorded with who and when; every later upload is refused
    // with 210 and charges nothing; it cannot be rotated any more.
    let (code, revoked) = run(&["meter", "revoke", &mid]);
    assert_eq!(code, Some(0), "{revoked}");
    assert!(revoked.contains("revokedBy=operator"), "{revoked}");
    assert!(!revoked.contains("revokedMs= "), "{revoked}");
    use_twice(&meterd.socket);
    assert_ne!(meterd_cli(&meterd.socket, &["flush"]).0, Some(0));
    let (_, status) = meterd_cli(&meterd.socket, &["status"]);
    assert!(status.contains("210"), "{status}");
    assert_eq!(balance(), "7.5");
    let (code, text) = run(&["meter", "rotate", &mid]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("revoked"), "{text}");
    let (code, text) = run(&["meter", "revoke", "B1-M99"]);
    assert_eq!(code, Some(2), "{text}");
    // Revoking again changes nothing; the uses charged before stay charged.
    let (code, again) = run(&["meter", "revoke", &mid]);
    assert_eq!((code, again), (Some(0), revoked));
    let (code, text) = run(&["verify"]);
    assert_eq!(code, Some(0), "{text}");
}
