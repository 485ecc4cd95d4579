//! The taca-sdk examples, built to wasm once per test run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The built module of example `name` (`flat`, `tiered`, ...).
pub fn module(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // From their own folder, as the SDK documents, so that its
        // `.cargo/config.toml` (the 64 KiB stack) applies.
        let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/../taca-sdk/examples");
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--release",
                "--target",
                "wasm32-unknown-unknown",
            ])
            // Into the examples' own target folder, where it is read below,
            // whatever folder the tests themselves were built in.
            .env_remove("CARGO_TARGET_DIR")
            .current_dir(folder)
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
