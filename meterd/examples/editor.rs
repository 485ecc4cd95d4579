//! A small metered program: an editor with a metered spell checker inside.
//!
//! `cargo run --release -p meterd --example editor -- PRODUCT COMPONENT [USES]`
//!
//! Uses PRODUCT USES times (default 3); every use runs one use of COMPONENT
//! inside it, which the meter charges to PRODUCT's owner, not to whoever
//! uses the editor. The user is whoever the calling shell logged in
//! (`meterd login CID`). Exits 1 when the meter refuses a use.

use std::process::ExitCode;

use meterd::client::Meter;
use proto::Pid;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [product, component] => parse(product, component, "3"),
        [product, component, uses] => parse(product, component, uses),
        _ => None,
    };
    let Some((product, component, uses)) = parsed else {
        eprintln!("usage: editor PRODUCT COMPONENT [USES]   (PIDs like B1-P1; USES a count)");
        return ExitCode::from(64);
    };
    // The socket meterd listens on unless configured otherwise.
    let mut meter = Meter::connect_default();
    for n in 1..=uses {
        let Some(mut edit) = meter.begin(product) else {
            eprintln!("use {n}: the meter refused {product} (no login, denied or no funds)");
            return ExitCode::FAILURE;
        };
        // The spell checker runs inside the editor's use. Dropping a use
        // instead of committing it cancels it: nobody pays.
        let Some(check) = edit.meter().begin(component) else {
            eprintln!("use {n}: the meter refused {component} for {product}'s owner");
            return ExitCode::FAILURE;
        };
        if let Err(error) = check.commit().and_then(|()| edit.commit()) {
            eprintln!("use {n}: the meter did not record it: {error}");
            return ExitCode::FAILURE;
        }
    }
    println!("used {product} {uses} times, with {component} inside each use");
    ExitCode::SUCCESS
}

fn parse(product: &str, component: &str, uses: &str) -> Option<(Pid, Pid, u32)> {
    Some((
        product.parse().ok()?,
        component.parse().ok()?,
        uses.parse().ok()?,
    ))
}
