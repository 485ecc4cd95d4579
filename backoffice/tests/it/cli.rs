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
