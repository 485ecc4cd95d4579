//! Issue 14, items 7 to 9: what checking and compiling a module may cost,
//! what fuel means, and `taca check` agreeing with the upload.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backoffice::pricing::guard::{
    CHECK_CPU_SECONDS_MAX, CHECK_MEMORY_BYTES_MAX, CHECK_WALL_MS_MAX, CHECKS_AT_ONCE_MAX, Guard,
    GuardError, checks_running,
};
use backoffice::pricing::{
    CODE_BYTES_MAX, CheckError, FUEL_PER_CALL, FUNCTION_BODY_BYTES_MAX, FUNCTIONS_MAX, LOCALS_MAX,
    LOOPS_MAX, ModuleError, NESTING_DEPTH_MAX, PriceInput, Pricing, PricingError, UPLOAD_SAMPLES,
    hostile, upload_samples,
};

/// Held by every test that runs checks in this process: they count the
/// process's checks (`checks_running`), which another test's would change.
pub static CHECKS_IN_THIS_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    CHECKS_IN_THIS_PROCESS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn guard() -> Guard {
    Guard::new(env!("CARGO_BIN_EXE_backoffice"))
}

fn samples() -> Vec<String> {
    UPLOAD_SAMPLES.map(str::to_owned).to_vec()
}

/// A TACA skeleton around `taca_price`'s body, with `extra` items.
fn taca_wat(extra: &str, price_body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (memory (export "memory") 1)
  {extra}
  (func (export "taca_abi_version") (result i32) (i32.const 1))
  (func (export "taca_input") (result i32) (i32.const 1024))
  (func (export "taca_price") (param $length i32) (result i64) {price_body}))"#
    ))
    .unwrap()
}

fn over_limit(bytes: &[u8]) -> (&'static str, u64, u64, String) {
    match Pricing::new().load(bytes) {
        Err(
            error @ ModuleError::OverLimit {
                limit, seen, max, ..
            },
        ) => (limit, seen, max, error.to_string()),
        other => panic!("expected a structural limit, got {other:?}"),
    }
}

#[test]
fn a_module_over_each_structural_limit_is_refused_naming_the_limit_and_the_value() {
    let _one = one_at_a_time();
    // Functions: one more than the limit, counting the three ABI ones.
    let functions = "(func)".repeat(FUNCTIONS_MAX as usize - 2);
    let (limit, seen, max, text) = over_limit(&taca_wat(&functions, "(i64.const 0)"));
    assert_eq!(
        (limit, seen, max),
        (
            "FUNCTIONS_MAX",
            u64::from(FUNCTIONS_MAX) + 1,
            u64::from(FUNCTIONS_MAX)
        )
    );
    assert!(
        text.contains("functions defined") && text.contains("FUNCTIONS_MAX"),
        "{text}"
    );
    // Exactly at the limit is accepted.
    let functions = "(func)".repeat(FUNCTIONS_MAX as usize - 3);
    Pricing::new()
        .load(&taca_wat(&functions, "(i64.const 0)"))
        .expect("at the limit");

    let nops = "nop ".repeat(FUNCTION_BODY_BYTES_MAX);
    let (limit, seen, max, text) =
        over_limit(&taca_wat(&format!("(func $big {nops})"), "(i64.const 0)"));
    assert_eq!(limit, "FUNCTION_BODY_BYTES_MAX");
    assert!(
        seen > max && max == FUNCTION_BODY_BYTES_MAX as u64,
        "{text}"
    );
    assert!(text.contains("body of function 0"), "{text}");

    let half = "nop ".repeat(FUNCTION_BODY_BYTES_MAX - 100);
    let many = format!("(func {half})").repeat(CODE_BYTES_MAX / FUNCTION_BODY_BYTES_MAX + 1);
    let (limit, seen, max, text) = over_limit(&taca_wat(&many, "(i64.const 0)"));
    assert_eq!(limit, "CODE_BYTES_MAX", "{text}");
    assert!(seen > max && max == CODE_BYTES_MAX as u64, "{text}");

    let depth = NESTING_DEPTH_MAX as usize;
    let nested = |levels: usize| {
        taca_wat(
            &format!("(func {}{})", "(block ".repeat(levels), ")".repeat(levels)),
            "(i64.const 0)",
        )
    };
    let (limit, seen, max, text) = over_limit(&nested(depth + 1));
    assert_eq!(
        (limit, seen, max),
        ("NESTING_DEPTH_MAX", depth as u64 + 1, depth as u64)
    );
    assert!(
        text.contains("nested blocks, loops and ifs in function 0"),
        "{text}"
    );
    Pricing::new().load(&nested(depth)).expect("at the limit");

    let loops = |count: u32| {
        taca_wat(
            &format!("(func {})", "(loop)".repeat(count as usize)),
            "(i64.const 0)",
        )
    };
    let (limit, seen, max, text) = over_limit(&loops(LOOPS_MAX + 1));
    assert_eq!(
        (limit, seen, max),
        ("LOOPS_MAX", u64::from(LOOPS_MAX) + 1, u64::from(LOOPS_MAX))
    );
    assert!(text.contains("loops in function 0"), "{text}");
    Pricing::new()
        .load(&loops(LOOPS_MAX))
        .expect("at the limit");

    let locals = |count: u32| {
        taca_wat(
            &format!("(func (local {}))", "i64 ".repeat(count as usize)),
            "(i64.const 0)",
        )
    };
    let (limit, seen, max, text) = over_limit(&locals(LOCALS_MAX + 1));
    assert_eq!(
        (limit, seen, max),
        (
            "LOCALS_MAX",
            u64::from(LOCALS_MAX) + 1,
            u64::from(LOCALS_MAX)
        )
    );
    assert!(text.contains("locals declared in function 0"), "{text}");
    Pricing::new()
        .load(&locals(LOCALS_MAX))
        .expect("at the limit");

    // The upload says the same, through its process.
    let error = guard()
        .check_blocking(&locals(LOCALS_MAX + 1), &samples())
        .unwrap_err();
    assert!(
        matches!(&error, GuardError::Refused(text) if text.contains("LOCALS_MAX")),
        "{error:?}"
    );
}

/// Each hostile shape just inside the limits is accepted, and its check
/// (compile, the rewrite's compile, the samples) stays inside the bounds
/// of a check. The precise figures are in `docs/taca-abi.md`, measured in
/// a release build by the `taca_check` benchmark. A debug build's
/// compiler is about 20 times slower (nested loops: 64 s of CPU against
/// 3.5 s): there only the issue's shape is checked, within 30 times the
/// bounds.
#[test]
fn hostile_shapes_at_the_limits_are_checked_within_the_bounds() {
    let _one = one_at_a_time();
    let (shapes, guard) = if cfg!(debug_assertions) {
        let slower = 30;
        let guard = guard().with_time_bounds(
            CHECK_CPU_SECONDS_MAX * slower,
            Duration::from_millis(CHECK_WALL_MS_MAX * slower),
        );
        (vec![("nested_loops", hostile::nested_loops())], guard)
    } else {
        (hostile::all(), guard())
    };
    for (name, bytes) in shapes {
        backoffice::pricing::structure(&bytes)
            .unwrap_or_else(|error| panic!("{name} is within the limits: {error}"));
        let started = Instant::now();
        let report = guard
            .check_blocking(&bytes, &samples())
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        eprintln!(
            "{name}: {} bytes, {} ms CPU, {:?} wall",
            bytes.len(),
            report.cpu_ms,
            started.elapsed()
        );
    }
    // Every shape is within the structural limits, in every build.
    for (name, bytes) in hostile::all() {
        backoffice::pricing::structure(&bytes)
            .unwrap_or_else(|error| panic!("{name} is within the limits: {error}"));
    }
}

/// A stand-in for the checking program: a shell script.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie is gone too: it runs nothing.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_check_process_is_capped_killed_at_its_deadline_and_when_its_caller_goes() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    // The limits are in place by the time the child has its module.
    let limits = script(
        dir.path(),
        "limits",
        r#"cat > /dev/null; printf '{"Refused":"%s"}' "$(grep -E 'Max (cpu time|address space)' /proc/self/limits | tr '\n' ';' | tr -s ' ')""#,
    );
    let error = Guard::new(&limits)
        .check_blocking(b"\0asm", &samples())
        .unwrap_err();
    let GuardError::Refused(text) = error else {
        panic!("{error:?}")
    };
    assert!(
        text.contains(&format!(
            "Max cpu time {CHECK_CPU_SECONDS_MAX} {} seconds",
            CHECK_CPU_SECONDS_MAX + 1
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "Max address space {CHECK_MEMORY_BYTES_MAX} {CHECK_MEMORY_BYTES_MAX} bytes"
        )),
        "{text}"
    );

    // Past the deadline the child is killed and the module refused.
    let pid_file = dir.path().join("pid");
    let slow = script(
        dir.path(),
        "slow",
        &format!("echo $$ > {}; exec sleep 30", pid_file.display()),
    );
    let started = Instant::now();
    let error = Guard::new(&slow)
        .with_deadline(Duration::from_millis(300))
        .check_blocking(b"\0asm", &samples())
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(&error, GuardError::Refused(text) if text.contains("took longer than 300 ms")),
        "{error:?}"
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(gone(pid), "the child was killed");

    // The uploader goes away: the future is dropped, the child killed.
    std::fs::remove_file(&pid_file).unwrap();
    let runtime = runtime();
    runtime.block_on(async {
        let check = Guard::new(&slow).check(b"\0asm".to_vec(), samples());
        let outcome = tokio::time::timeout(Duration::from_millis(300), check).await;
        assert!(outcome.is_err(), "still checking when dropped");
    });
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for("the child of a dropped check is killed", || gone(pid));
    wait_for("its turn is given back", || checks_running() == 0);
}

#[test]
fn checks_past_the_limit_at_once_are_answered_busy_and_the_next_one_runs() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let slow = script(dir.path(), "slow", "exec sleep 30");
    let runtime = runtime();
    runtime.block_on(async {
        let running: Vec<_> = (0..CHECKS_AT_ONCE_MAX)
            .map(|_| tokio::spawn(Guard::new(&slow).check(b"\0asm".to_vec(), samples())))
            .collect();
        let started = Instant::now();
        while checks_running() < CHECKS_AT_ONCE_MAX {
            assert!(started.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        let busy = guard()
            .check(taca_wat("", "(i64.const 0)"), samples())
            .await;
        assert_eq!(busy, Err(GuardError::Busy));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "answered at once"
        );
        assert!(GuardError::Busy.to_string().contains("try again"));
        for check in running {
            check.abort();
        }
        let started = Instant::now();
        while checks_running() > 0 {
            assert!(started.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let report = guard()
            .check(taca_wat("", "(i64.const 0)"), samples())
            .await
            .expect("a turn is free again");
        assert_eq!(report.outcomes.len(), UPLOAD_SAMPLES.len());
    });
}

/// 148,000 stores of straight-line code were priced at "1,000,000" fuel
/// while they used about 3.1 million: wasmtime checks fuel only at function
/// entries and loop headers, so code that crosses the budget in its last
/// straight stretch used to return as if within it.
#[test]
fn straight_line_code_past_the_fuel_budget_is_out_of_fuel_and_fuel_is_exact() {
    let pricing = Pricing::new();
    let input = &upload_samples()[0];
    let stores_per_function = 4_000;
    let body = "(i32.store (i32.const 64) (i32.const 7))".repeat(stores_per_function);
    // One function of stores (inside `FUNCTION_BODY_BYTES_MAX`), called
    // `functions` times in a row.
    let module = |functions: usize| {
        let calls = "(call $stores)".repeat(functions);
        taca_wat(
            &format!("(func $stores {body})"),
            &format!("{calls} (i64.const 5)"),
        )
    };
    let fuel = |functions: usize| {
        let taca = pricing.load(&module(functions)).unwrap();
        let reused = pricing.price(&taca, input).map(|priced| priced.fuel);
        assert_eq!(
            reused,
            pricing.price_fresh(&taca, input).map(|priced| priced.fuel)
        );
        reused
    };
    let one = fuel(1).unwrap();
    let per_function = fuel(2).unwrap() - one;
    assert!(per_function >= stores_per_function as u64, "{per_function}");
    let base = one - per_function;
    // The last function's entry is within the budget; its stores cross it,
    // and nothing after them checks.
    let functions = usize::try_from((FUEL_PER_CALL - base) / per_function + 1).unwrap();
    assert!(base + (functions as u64 - 1) * per_function < FUEL_PER_CALL);
    assert!(base + functions as u64 * per_function > FUEL_PER_CALL);
    assert_eq!(fuel(functions), Err(PricingError::OutOfFuel));
    let error = pricing
        .check(&module(functions), &upload_samples())
        .unwrap_err();
    assert_eq!(
        error,
        CheckError::Module(ModuleError::SampleFailed(PricingError::OutOfFuel))
    );
    // One function fewer is within it, and its fuel is what it used.
    assert_eq!(
        fuel(functions - 1),
        Ok(base + (functions as u64 - 1) * per_function)
    );
}

#[test]
fn data_segments_and_table_elements_cost_fuel_at_every_price() {
    let pricing = Pricing::new();
    let input = &upload_samples()[0];
    let bare = taca_wat("", "(i64.const 1)");
    let data = taca_wat(
        &format!("(data (i32.const 2048) \"{}\")", "x".repeat(10_000)),
        "(i64.const 1)",
    );
    let table = taca_wat(
        &format!(
            "(table 10000 funcref) (elem (i32.const 0) {}) (func $f)",
            "$f ".repeat(5_000)
        ),
        "(i64.const 1)",
    );
    let fuel = |bytes: &[u8]| {
        let taca = pricing.load(bytes).unwrap();
        let reused = pricing.price(&taca, input).unwrap().fuel;
        assert_eq!(reused, pricing.price_fresh(&taca, input).unwrap().fuel);
        reused
    };
    let base = fuel(&bare);
    // wasmtime charges data segments as it copies them (a unit a byte and
    // a little per segment); the runtime charges table elements.
    let with_data = fuel(&data);
    assert!(
        (base + 10_000..base + 10_100).contains(&with_data),
        "{with_data}"
    );
    assert_eq!(fuel(&table), base + 5_000);
    // More data than a price's fuel: every price is out of fuel.
    let chunk = "y".repeat(60_000);
    let segments: String = (0..17)
        .map(|index| format!("(data (i32.const {}) \"{chunk}\")", index * 60_000))
        .collect();
    let heavy = wat::parse_str(format!(
        r#"(module (memory (export "memory") 16) {segments}
            (func (export "taca_abi_version") (result i32) (i32.const 1))
            (func (export "taca_input") (result i32) (i32.const 0))
            (func (export "taca_price") (param i32) (result i64) (i64.const 1)))"#
    ))
    .unwrap();
    let error = pricing.check(&heavy, &upload_samples()).unwrap_err();
    assert_eq!(
        error,
        CheckError::Module(ModuleError::SampleFailed(PricingError::OutOfFuel))
    );
}

#[test]
fn a_table_over_its_limit_is_named_as_the_table() {
    let pricing = Pricing::new();
    let grow = taca_wat(
        "(table 1 funcref)",
        "(drop (table.grow (ref.null func) (i32.const 20000))) (i64.const 0)",
    );
    let taca = pricing.load(&grow).unwrap();
    let error = pricing.price(&taca, &upload_samples()[0]).unwrap_err();
    assert_eq!(error, PricingError::TableLimit);
    assert!(
        error.to_string().contains("table") && !error.to_string().contains("memory"),
        "{error}"
    );
    let memory = taca_wat("", "(drop (memory.grow (i32.const 1000))) (i64.const 0)");
    let taca = pricing.load(&memory).unwrap();
    let error = pricing.price(&taca, &upload_samples()[0]).unwrap_err();
    assert_eq!(error, PricingError::ResourceLimit);
    assert!(error.to_string().contains("memory"), "{error}");
}

#[test]
fn a_bad_sample_is_the_callers_error_not_the_modules() {
    let mut long = upload_samples()[0].clone();
    long.unit = "u".repeat(200);
    let error = Pricing::new()
        .check(
            &taca_wat("", "(i64.const 0)"),
            &[upload_samples()[0].clone(), long],
        )
        .unwrap_err();
    assert!(
        matches!(
            error,
            CheckError::BadSample {
                index: 2,
                error: PricingError::InputTooLong("unit")
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("not the module's"), "{error}");
    assert!(PriceInput::parse_sample(&format!("unit={}", "u".repeat(200))).is_err());
}
