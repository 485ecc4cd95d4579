//! `backoffice taca check` as a producer runs it.

use std::process::Command;

fn check(module: &std::path::Path, samples: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_backoffice"))
        .args(["taca", "check"])
        .arg(module)
        .args(samples)
        .output()
        .expect("backoffice runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().expect("exit code"), text)
}

#[test]
fn check_prints_prices_and_fuel_for_samples() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiered.wasm");
    std::fs::write(&path, crate::examples::module("tiered")).unwrap();
    let (code, text) = check(
        &path,
        &["code=),uses=0", "code=),uses=50", "code=(,uses=50"],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("accepted"), "{text}");
    assert!(
        text.contains("instances: reused, reset after each price"),
        "{text}"
    );
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("code="))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let prices: Vec<&str> = lines
        .iter()
        .map(|line| line.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(prices, ["0", "0.05", "0"]);
    let fuel: u64 = lines[1].split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(fuel > 0, "{text}");
}

#[test]
fn check_says_when_a_module_needs_a_fresh_instance_per_price() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drops.wasm");
    let bytes = wat::parse_str(
        r#"(module (memory (export "memory") 1) (data $spare "abc")
            (func (export "taca_abi_version") (result i32) (i32.const 1))
            (func (export "taca_input") (result i32) (i32.const 0))
            (func (export "taca_price") (param i32) (result i64) (data.drop $spare) (i64.const 1)))"#,
    )
    .unwrap();
    std::fs::write(&path, bytes).unwrap();
    let (code, text) = check(&path, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("instances: a fresh one per price") && text.contains("data.drop"),
        "{text}"
    );
}

#[test]
fn check_refuses_bad_modules_and_bad_samples_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let looping = dir.path().join("loop.wasm");
    let bytes = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "taca_abi_version") (result i32) (i32.const 1))
            (func (export "taca_input") (result i32) (i32.const 0))
            (func (export "taca_price") (param i32) (result i64) (loop $l (br $l)) (i64.const 0)))"#,
    )
    .unwrap();
    std::fs::write(&looping, bytes).unwrap();
    let (code, text) = check(&looping, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("refused: on a sample input the module failed: out of fuel"),
        "{text}"
    );
    let (code, text) = check(&looping, &["code=x"]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("code must be one of"), "{text}");
    let (code, _) = check(&dir.path().join("missing.wasm"), &[]);
    assert_eq!(code, 64);
}

#[test]
fn check_warns_of_samples_priced_above_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiered.wasm");
    std::fs::write(&path, crate::examples::module("tiered")).unwrap();
    let samples = ["code=),uses=0", "code=),uses=50"];
    let (code, text) = check(&path, &["--max-price", "0.01", samples[0], samples[1]]);
    assert_eq!(code, 0, "{text}");
    let flagged: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("WARNING: above the maximum of 0.01"))
        .collect();
    assert_eq!(flagged.len(), 1, "only the 0.05 sample: {text}");
    assert!(flagged[0].starts_with("code=),uses=50"), "{text}");
    assert!(
        text.contains("1 sample(s) priced above the maximum"),
        "{text}"
    );
    let (_, text) = check(&path, &["--max-price", "0.05", samples[0], samples[1]]);
    assert!(!text.contains("WARNING"), "0.05 is not above 0.05: {text}");
}

/// A module that traps on a query (`code=(`), one of the default samples.
fn traps_on_a_query() -> Vec<u8> {
    wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "taca_abi_version") (result i32) (i32.const 1))
            (func (export "taca_input") (result i32) (i32.const 1024))
            (func (export "taca_price") (param i32) (result i64)
              (if (i32.eq (i32.load (i32.const 1028)) (i32.const 40)) (then unreachable))
              (i64.const 1000)))"#,
    )
    .unwrap()
}

#[test]
fn check_and_the_upload_refuse_a_module_that_traps_on_one_default_sample() {
    use backoffice::pricing::UPLOAD_SAMPLES;
    use backoffice::pricing::guard::{Guard, GuardError};
    let _one = crate::bounds::CHECKS_IN_THIS_PROCESS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("query-trap.wasm");
    std::fs::write(&path, traps_on_a_query()).unwrap();
    let (code, text) = check(&path, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("samples: the 5 an upload is tried on"),
        "{text}"
    );
    let refusal = text
        .lines()
        .find_map(|line| line.strip_prefix("refused: "))
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    assert!(refusal.contains("unreachable"), "{refusal}");
    // The upload's check: the same samples, the same refusal.
    let samples = UPLOAD_SAMPLES.map(str::to_owned).to_vec();
    let upload = Guard::new(env!("CARGO_BIN_EXE_backoffice"))
        .check_blocking(&traps_on_a_query(), &samples)
        .unwrap_err();
    assert_eq!(upload, GuardError::Refused(refusal));
    // With samples of one's own, `taca check` says what the upload tries.
    let (code, text) = check(&path, &["code=)"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("an upload is tried on these 5 instead: code=),uses=0"),
        "{text}"
    );
}

#[test]
fn check_reports_the_fuel_each_sample_used() {
    use backoffice::pricing::{FUEL_PER_CALL, Pricing, upload_samples};
    let dir = tempfile::tempdir().unwrap();
    let module = |stores: usize| {
        let body = "(i32.store (i32.const 64) (i32.const 7))".repeat(stores);
        wat::parse_str(format!(
            r#"(module (memory (export "memory") 1)
                (func (export "taca_abi_version") (result i32) (i32.const 1))
                (func (export "taca_input") (result i32) (i32.const 1024))
                (func $stores {body})
                (func (export "taca_price") (param i32) (result i64)
                  {calls} (i64.const 1)))"#,
            calls = "(call $stores)".repeat(40)
        ))
        .unwrap()
    };
    // 40 calls of 1,000 stores: about 840,000 units, under the budget.
    let bytes = module(1_000);
    let expected: Vec<u64> = Pricing::new()
        .check(&bytes, &upload_samples())
        .unwrap()
        .into_iter()
        .map(|priced| priced.unwrap().fuel)
        .collect();
    assert!(
        expected
            .iter()
            .all(|&fuel| fuel > 800_000 && fuel < FUEL_PER_CALL)
    );
    let path = dir.path().join("stores.wasm");
    std::fs::write(&path, &bytes).unwrap();
    let (code, text) = check(&path, &[]);
    assert_eq!(code, 0, "{text}");
    let shown: Vec<u64> = text
        .lines()
        .filter(|line| line.starts_with("code="))
        .map(|line| line.split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(shown, expected, "{text}");
    // 40 calls of enough stores to cross the budget inside the last call,
    // with nothing after it to stop them: out of fuel, not "1000000".
    let per_store = expected[0] / 40_000;
    let stores = usize::try_from(FUEL_PER_CALL * 2 / (79 * per_store)).unwrap();
    std::fs::write(&path, module(stores)).unwrap();
    let (code, text) = check(&path, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("out of fuel"), "{text}");
    assert!(!text.contains("accepted"), "{text}");
}

/// `backoffice serve` with bad page or mail settings says which and why,
/// and stops before it opens anything.
#[test]
fn serve_refuses_bad_currency_zone_and_mail_settings_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_backoffice"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args(extra)
            .output()
            .expect("backoffice runs");
        (
            output.status.code().expect("exit code"),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, text) = serve(&["--currency", "euro"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("ISO 4217 code of three capital letters"),
        "{text}"
    );
    let (code, text) = serve(&["--time-zone", "Mars/Olympus"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("not a time zone of the IANA database"),
        "{text}"
    );
    let (code, text) = serve(&["--smtp-host", "mail.example.org"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--mail-from"), "{text}");
    let (code, text) = serve(&[
        "--smtp-host",
        "mail.example.org",
        "--smtp-security",
        "plain",
        "--mail-from",
        "noreply@example.org",
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("plain SMTP only to a relay on this machine"),
        "{text}"
    );
    assert!(!data.join("store").exists(), "nothing was opened");
}
