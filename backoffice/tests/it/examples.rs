//! The taca-sdk examples, built to wasm once per test run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The built module of example `name` (`flat`, `tiered`, ...).
pub fn module(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let manifest = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../taca-sdk/examples/Cargo.toml"
        );
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--release",
                "--target",
                "wasm32-unknown-unknown",
                "--manifest-path",
            ])
            .arg(manifest)
            .status()
            .expect("cargo runs");
        assert!(
            status.success(),
            "building the TACA examples failed (is the wasm32-unknown-unknown target installed?)"
        );
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../taca-sdk/examples/target/wasm32-unknown-unknown/release"
        ))
    });
    let file = dir.join(format!("taca_{}.wasm", name.replace('-', "_")));
    std::fs::read(&file).unwrap_or_else(|error| panic!("{}: {error}", file.display()))
}
