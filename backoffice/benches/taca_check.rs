//! The worst case of checking an uploaded TACA: each hostile shape at the
//! structural limits (`pricing::hostile`), checked as an upload is (in a
//! capped child process, on the upload's samples), three times, with the
//! child's CPU time; and the in-process load of the same module.
//!
//! `cargo bench -p backoffice --bench taca_check` measures (release; the
//! figures are in `docs/taca-abi.md`). Under `cargo test --all-targets` it
//! smoke-runs the cheapest shape once. With `HOSTILE_DIR` set it also
//! writes the modules there, to time `backoffice taca check` on them.

use std::time::Instant;

use backoffice::pricing::guard::Guard;
use backoffice::pricing::{Pricing, UPLOAD_SAMPLES, hostile};

fn main() {
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let guard = Guard::new(env!("CARGO_BIN_EXE_backoffice"));
    let samples: Vec<String> = UPLOAD_SAMPLES.map(str::to_owned).to_vec();
    let shapes = hostile::all();
    if let Some(dir) = std::env::var_os("HOSTILE_DIR") {
        let dir = std::path::PathBuf::from(dir);
        for (name, bytes) in &shapes {
            std::fs::write(dir.join(format!("{name}.wasm")), bytes)
                .expect("HOSTILE_DIR is writable");
        }
    }
    let (runs, shapes) = if measuring {
        (3, shapes)
    } else {
        let cheapest = shapes
            .into_iter()
            .filter(|(name, _)| *name == "crowded_locals")
            .collect();
        (1, cheapest)
    };
    for (name, bytes) in shapes {
        let cpu_ms: Vec<u64> = (0..runs)
            .map(|_| {
                guard
                    .check_blocking(&bytes, &samples)
                    .unwrap_or_else(|error| panic!("{name}: {error}"))
                    .cpu_ms
            })
            .collect();
        let started = Instant::now();
        Pricing::new()
            .load(&bytes)
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        println!(
            "{name}: {} bytes; check in a child process, CPU ms {cpu_ms:?}; in-process load {:?}",
            bytes.len(),
            started.elapsed()
        );
    }
}
