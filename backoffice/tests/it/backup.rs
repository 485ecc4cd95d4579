//! `backoffice backup`, `restore` and `migrate-store` as an operator runs
//! them: a backup of a running branch while it takes deposits, restored
//! into a new data folder that serves the same balances; a backup killed at
//! any moment leaves a whole backup or none; a branch moved into PostgreSQL
//! serves the same balances from there, and its folder never again alone.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Instant;

use backoffice::ledger::{AccountId, SystemAccount, Transfer, TransferId, TransferKind};
use backoffice::store::{SledStore, Store};
use proto::{Amount, Bid, Cid};

fn backoffice() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_backoffice"));
    for name in [
        "BACKOFFICE_STORE",
        "BACKOFFICE_DATA_DIR",
        "BACKOFFICE_URL",
        "BACKOFFICE_TOKEN_FILE",
    ] {
        command.env_remove(name);
    }
    command
}

/// `backoffice serve` on a sled branch in `data`; the child and its URL.
fn serve(data: &Path) -> (Child, String) {
    serve_on(None, data)
}

/// `backoffice serve` with its data folder `data` and, if given, its
/// branch in PostgreSQL at `store`.
fn serve_on(store: Option<&str>, data: &Path) -> (Child, String) {
    let mut command = backoffice();
    if let Some(url) = store {
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
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let url = first
        .trim()
        .strip_prefix("backoffice listening on ")
        .unwrap_or_else(|| panic!("serve printed {first:?}"))
        .to_owned();
    (child, url)
}

/// An operator command against the backoffice at `url` serving `data`.
fn operator(url: &str, data: &Path, args: &[&str]) -> Output {
    backoffice()
        .arg("--url")
        .arg(url)
        .arg("--token-file")
        .arg(data.join("operator-token"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stop(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_backup_of_a_running_branch_restores_into_one_that_serves_the_same_balances() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (server, url) = serve(&data);
    let mut cids = Vec::new();
    for n in 0..3 {
        let out = stdout(&operator(
            &url,
            &data,
            &["customer", "Someone", &format!("c{n}@example.org")],
        ));
        cids.push(out.trim().trim_start_matches("CID=").to_owned());
    }
    for (n, cid) in cids.iter().enumerate() {
        stdout(&operator(
            &url,
            &data,
            &[
                "deposit",
                cid,
                &format!("1{n}.25"),
                "--reference",
                &format!("d{n}"),
            ],
        ));
    }
    // Deposits go on while a backup is taken; the backup holds each one
    // whole or not at all, and what it holds verifies.
    let depositing = {
        let (url, data, cid) = (url.clone(), data.clone(), cids[0].clone());
        std::thread::spawn(move || {
            for n in 0..20 {
                stdout(&operator(
                    &url,
                    &data,
                    &["deposit", &cid, "0.5", "--reference", &format!("more{n}")],
                ));
            }
        })
    };
    let dest = dir.path().join("backup");
    let out = stdout(&operator(&url, &data, &["backup", dest.to_str().unwrap()]));
    assert!(
        out.contains("backed up into") && out.contains("verified: no problems"),
        "{out}"
    );
    depositing.join().unwrap();
    // A second backup to the same place is refused; the first stays.
    let again = operator(&url, &data, &["backup", dest.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let shown: Vec<String> = cids
        .iter()
        .map(|cid| stdout(&operator(&url, &data, &["show", cid])))
        .collect();
    // A backup taken once the deposits ended holds all of them.
    let whole = dir.path().join("backup-2");
    stdout(&operator(&url, &data, &["backup", whole.to_str().unwrap()]));
    stop(server);

    // Restoring into the data folder that has a store is refused.
    let refused = backoffice()
        .arg("restore")
        .arg(&whole)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("move it aside"));

    let restored = dir.path().join("restored");
    let out = stdout(
        &backoffice()
            .arg("restore")
            .arg(&whole)
            .env("BACKOFFICE_DATA_DIR", &restored)
            .output()
            .unwrap(),
    );
    assert!(
        out.contains("restored into") && out.contains("no problems"),
        "{out}"
    );
    let verified = stdout(
        &backoffice()
            .args(["verify", "--data-dir"])
            .arg(&restored)
            .output()
            .unwrap(),
    );
    assert!(verified.contains("verified: no problems"), "{verified}");
    // The restored branch serves: the same customers, the same balances.
    let (server, url) = serve(&restored);
    for (cid, before) in cids.iter().zip(&shown) {
        assert_eq!(&stdout(&operator(&url, &restored, &["show", cid])), before);
    }
    stop(server);
    // The first backup, taken during the deposits, restores and verifies
    // too, with between none and all of them.
    let during = dir.path().join("during");
    stdout(
        &backoffice()
            .arg("restore")
            .arg(&dest)
            .arg("--data-dir")
            .arg(&during)
            .output()
            .unwrap(),
    );
    let store = SledStore::open(&during.join("store")).unwrap();
    let transfers = store.load_ledger().unwrap().transfers().len();
    assert!((3..=23).contains(&transfers), "{transfers}");
}

#[test]
fn a_backup_killed_at_any_moment_leaves_a_whole_backup_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        // A store big enough that a backup takes a while.
        let store = SledStore::open(&data.join("store")).unwrap();
        let bid = Bid::parse("B1").unwrap();
        store
            .create_customer(&bid, "Payer", "payer@example.org")
            .unwrap();
        let cid = Cid::parse("B1-C1").unwrap();
        for chunk in 0..8u64 {
            let transfers: Vec<Transfer> = (chunk * 5_000..(chunk + 1) * 5_000)
                .map(|id| Transfer {
                    id: TransferId(id),
                    debit: AccountId::System(SystemAccount::Funding),
                    credit: AccountId::Customer(cid),
                    amount: Amount::from_nanos(1_000_000),
                    kind: TransferKind::Deposit,
                    posted_ms: 1,
                })
                .collect();
            store.post_transfers(&transfers).unwrap();
        }
    }
    let run = |dest: &Path| {
        backoffice()
            .arg("backup")
            .arg(dest)
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // How long a whole backup takes here.
    let started = Instant::now();
    let dest = dir.path().join("timed");
    let out = stdout(&run(&dest).wait_with_output().unwrap());
    let whole = started.elapsed();
    assert!(out.contains("40000 transfers"), "{out}");
    let mut killed_whole = 0;
    let mut killed_none = 0;
    for step in 0..8u32 {
        let dest = dir.path().join(format!("backup-{step}"));
        let mut child = run(&dest);
        std::thread::sleep(whole * step / 8);
        child.kill().unwrap();
        child.wait().unwrap();
        if dest.exists() {
            // Whole: it restores and holds every transfer.
            let into = dir.path().join(format!("restored-{step}"));
            let out = stdout(
                &backoffice()
                    .arg("restore")
                    .arg(&dest)
                    .arg("--data-dir")
                    .arg(&into)
                    .output()
                    .unwrap(),
            );
            assert!(out.contains("40000 transfers"), "{out}");
            killed_whole += 1;
        } else {
            killed_none += 1;
            // What it left is never taken for a backup, and the next
            // backup to the same place clears it.
            let partial = dir.path().join(format!("backup-{step}.partial"));
            let refused = backoffice()
                .arg("restore")
                .arg(&partial)
                .arg("--data-dir")
                .arg(dir.path().join("never"))
                .output()
                .unwrap();
            assert_eq!(refused.status.code(), Some(69));
            assert!(!dir.path().join("never/store").exists());
            let out = stdout(&run(&dest).wait_with_output().unwrap());
            assert!(out.contains("40000 transfers"), "{out}");
            assert!(!partial.exists());
        }
    }
    assert!(killed_none > 0, "no kill landed during a backup");
    eprintln!(
        "whole backup {:.0} ms; killed {killed_none} times before it ended, {killed_whole} after",
        whole.as_secs_f64() * 1e3
    );
}

#[test]
fn a_branch_moved_into_postgresql_serves_the_same_balances_and_its_folder_never_alone() {
    let cluster = pgtest::Cluster::start().unwrap();
    let url = cluster.create_database("moved").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (server, address) = serve(&data);
    let mut cids = Vec::new();
    for n in 0..3 {
        let out = stdout(&operator(
            &address,
            &data,
            &["customer", "Someone", &format!("c{n}@example.org")],
        ));
        let cid = out.trim().trim_start_matches("CID=").to_owned();
        stdout(&operator(
            &address,
            &data,
            &[
                "deposit",
                &cid,
                &format!("{n}.75"),
                "--reference",
                &format!("d{n}"),
            ],
        ));
        cids.push(cid);
    }
    let shown: Vec<String> = cids
        .iter()
        .map(|cid| stdout(&operator(&address, &data, &["show", cid])))
        .collect();
    // Not while the backoffice runs.
    let busy = backoffice()
        .args(["migrate-store", "--from"])
        .arg(&data)
        .arg("--to")
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(busy.status.code(), Some(69), "{busy:?}");
    assert!(String::from_utf8_lossy(&busy.stderr).contains("stop the backoffice"));
    stop(server);
    let out = stdout(
        &backoffice()
            .args(["migrate-store", "--from"])
            .arg(&data)
            .env("BACKOFFICE_STORE", &url)
            .output()
            .unwrap(),
    );
    assert!(
        out.contains("customers: 3") && out.contains("transfers: 3") && out.contains("deposits: 3"),
        "{out}"
    );
    assert!(
        out.contains("compared 3 transfers and 4 balances: equal"),
        "{out}"
    );
    assert!(data.join("store.moved-to-postgres").is_dir() && !data.join("store").exists());
    // The folder alone no longer serves (nor starts an empty branch).
    let alone = backoffice()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(alone.status.code(), Some(69), "{alone:?}");
    assert!(String::from_utf8_lossy(&alone.stderr).contains("kept in PostgreSQL"));
    // Even with its marker lost, the folder whose store was set aside does
    // not start an empty branch.
    std::fs::remove_file(data.join("store-location")).unwrap();
    let alone = backoffice()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(alone.status.code(), Some(69), "{alone:?}");
    assert!(String::from_utf8_lossy(&alone.stderr).contains("was moved to PostgreSQL"));
    assert!(!data.join("store").exists());
    // Moving again into the same database is refused: it holds the branch.
    let other = dir.path().join("other");
    let (server, _) = serve(&other);
    stop(server);
    let again = backoffice()
        .args(["migrate-store", "--from"])
        .arg(&other)
        .arg("--to")
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(65), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a branch"));
    // Served from PostgreSQL with the same folder: the same balances.
    let (server, address) = serve_on(Some(&url), &data);
    for (cid, before) in cids.iter().zip(&shown) {
        assert_eq!(&stdout(&operator(&address, &data, &["show", cid])), before);
    }
    let verified = stdout(&operator(&address, &data, &["verify"]));
    assert!(verified.contains("verified: no problems"), "{verified}");
    stop(server);
}
