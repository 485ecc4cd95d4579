//! The TACA runtime on real modules: the SDK examples with known answers, a
//! hand-written WAT module, a hostile suite, and determinism.

use std::sync::Arc;

use backoffice::pricing::{
    FUEL_PER_CALL, ModuleError, PARALLEL_JOBS_MIN, PriceInput, Pricing, PricingError,
};
use proto::{Amount, Cid, Code, Pid};

use crate::examples::module;

fn input(code: Code, pid: &str, period_uses: u64) -> PriceInput {
    PriceInput::invocation(
        Cid::parse("B1-C1").unwrap(),
        code,
        Pid::parse(pid).unwrap(),
        period_uses,
    )
}

fn commit(period_uses: u64) -> PriceInput {
    input(Code::Commit, "B1-P7", period_uses)
}

fn amount(text: &str) -> Amount {
    Amount::parse(text).unwrap()
}

fn price(pricing: &Pricing, bytes: &[u8], input: &PriceInput) -> Result<Amount, PricingError> {
    let taca = pricing.load(bytes).expect("module loads");
    pricing.price(&taca, input).map(|priced| priced.amount)
}

#[test]
fn every_example_prices_known_answers() {
    let pricing = Pricing::new();
    let flat = module("flat");
    assert_eq!(price(&pricing, &flat, &commit(0)), Ok(amount("0.25")));
    assert_eq!(
        price(&pricing, &flat, &input(Code::Query, "B1-P7", 0)),
        Ok(Amount::ZERO)
    );

    let free_test = module("free-test");
    assert_eq!(price(&pricing, &free_test, &commit(0)), Ok(amount("0.01")));
    assert_eq!(
        price(&pricing, &free_test, &input(Code::Commit, "B1-P7T", 0)),
        Ok(Amount::ZERO)
    );

    let tiered = module("tiered");
    let tiered_prices: Vec<_> = [0, 9, 10, 99, 100, 5000]
        .iter()
        .map(|&uses| price(&pricing, &tiered, &commit(uses)).unwrap())
        .collect();
    assert_eq!(
        tiered_prices,
        ["0", "0", "0.05", "0.05", "0.02", "0.02"]
            .map(amount)
            .to_vec()
    );

    let per_unit = module("per-unit");
    let mut megabytes = commit(0);
    megabytes.unit = "MB".into();
    megabytes.volume = 1500;
    assert_eq!(price(&pricing, &per_unit, &megabytes), Ok(amount("3")));
    let mut seconds = commit(0);
    seconds.unit = "s".into();
    seconds.volume = 7;
    assert_eq!(price(&pricing, &per_unit, &seconds), Ok(amount("0.0007")));
    let mut unknown = commit(0);
    unknown.unit = "furlong".into();
    assert_eq!(
        price(&pricing, &per_unit, &unknown),
        Err(PricingError::Refused(3))
    );

    let capped = module("capped");
    let capped_prices: Vec<_> = [0, 29, 30, 31, 1000]
        .iter()
        .map(|&uses| price(&pricing, &capped, &commit(uses)).unwrap())
        .collect();
    // 30 uses at 0.30 reach the cap of 9.00; then everything is free.
    assert_eq!(
        capped_prices,
        ["0.3", "0.3", "0", "0", "0"].map(amount).to_vec()
    );
}

#[test]
fn a_module_written_by_hand_from_the_abi_doc_works() {
    let pricing = Pricing::new();
    let bytes = wat::parse_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/flat.wat"
    ))
    .unwrap();
    assert_eq!(price(&pricing, &bytes, &commit(0)), Ok(amount("0.001")));
    assert_eq!(
        price(&pricing, &bytes, &input(Code::Login, "B1-P7", 0)),
        Ok(Amount::ZERO)
    );
}

/// A TACA skeleton around a custom `taca_price` body (and extra items).
fn taca_wat(extra: &str, price_body: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  (memory (export "memory") 1)
  {extra}
  (func (export "taca_abi_version") (result i32) (i32.const 1))
  (func (export "taca_input") (result i32) (i32.const 1024))
  (func (export "taca_price") (param $length i32) (result i64) {price_body}))"#
    );
    wat::parse_str(text).unwrap()
}

fn load_error(bytes: &[u8]) -> ModuleError {
    Pricing::new()
        .load(bytes)
        .expect_err("module must be refused")
}

fn run_error(bytes: &[u8]) -> PricingError {
    let pricing = Pricing::new();
    let taca = pricing.load(bytes).expect("module loads");
    pricing
        .price(&taca, &commit(0))
        .expect_err("pricing must fail")
}

#[test]
fn hostile_modules_are_bounded_and_reported() {
    let endless = taca_wat("", "(loop $again (br $again)) (i64.const 0)");
    assert_eq!(run_error(&endless), PricingError::OutOfFuel);
    let growth = taca_wat(
        "",
        "(loop $again (br_if $again (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) (i64.const 0)",
    );
    assert_eq!(run_error(&growth), PricingError::ResourceLimit);
    let recursion = taca_wat(
        "(func $deeper (param i64) (result i64) (call $deeper (i64.add (local.get 0) (i64.const 1))))",
        "(call $deeper (i64.const 0))",
    );
    assert!(
        matches!(
            run_error(&recursion),
            PricingError::StackOverflow | PricingError::OutOfFuel
        ),
        "recursion is bounded"
    );
    let trap = taca_wat("", "unreachable");
    assert!(matches!(run_error(&trap), PricingError::Trap(_)));
    let divide = taca_wat("", "(i64.div_s (i64.const 1) (i64.const 0))");
    assert!(matches!(run_error(&divide), PricingError::Trap(_)));
    let bad_area = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "taca_abi_version") (result i32) (i32.const 1))
            (func (export "taca_input") (result i32) (i32.const 65000))
            (func (export "taca_price") (param i32) (result i64) (i64.const 0)))"#,
    )
    .unwrap();
    assert_eq!(run_error(&bad_area), PricingError::BadInputArea);
}

#[test]
fn malformed_modules_are_refused_at_load_with_a_clear_message() {
    let wrong_types = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "taca_abi_version") (result i32) (i32.const 1))
            (func (export "taca_input") (result i32) (i32.const 0))
            (func (export "taca_price") (param i64) (result f64) (f64.const 1.5)))"#,
    )
    .unwrap();
    let error = load_error(&wrong_types);
    assert!(
        matches!(
            error,
            ModuleError::WrongExportType {
                name: "taca_price",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("(i32) -> i64"));

    let wasi = wat::parse_str(
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1))"#,
    )
    .unwrap();
    let error = load_error(&wasi);
    assert!(matches!(error, ModuleError::HasImports(_)), "{error}");
    assert!(
        error
            .to_string()
            .contains("wasi_snapshot_preview1::fd_write"),
        "{error}"
    );

    let missing = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
    assert_eq!(
        load_error(&missing),
        ModuleError::MissingExport("taca_abi_version")
    );

    let future = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "taca_abi_version") (result i32) (i32.const 2))
            (func (export "taca_input") (result i32) (i32.const 0))
            (func (export "taca_price") (param i32) (result i64) (i64.const 0)))"#,
    )
    .unwrap();
    assert_eq!(load_error(&future), ModuleError::WrongAbiVersion(2));

    let oversize = vec![0u8; backoffice::pricing::MODULE_BYTES_MAX + 1];
    assert!(matches!(
        load_error(&oversize),
        ModuleError::TooLarge { .. }
    ));
    let garbage = b"\0asm but not really a module at all".to_vec();
    assert!(matches!(load_error(&garbage), ModuleError::Invalid(_)));
    assert!(matches!(load_error(b"hello"), ModuleError::Invalid(_)));

    // Checked on every run: a module that cannot be built must fail the
    // test, not skip the assertion.
    let threads = wat::parse_str(r#"(module (memory (export "memory") 1 1 shared))"#)
        .expect("a shared-memory module in WAT");
    assert!(
        matches!(load_error(&threads), ModuleError::Invalid(_)),
        "shared memory is off"
    );
}

#[test]
fn upload_checks_run_samples_and_refuse_modules_that_fail_them() {
    let pricing = Pricing::new();
    let samples = [commit(0), commit(50)];
    let results = pricing.check(&module("tiered"), &samples).unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[1].as_ref().unwrap().amount, amount("0.05"));
    let endless = taca_wat("", "(loop $again (br $again)) (i64.const 0)");
    let error = pricing.check(&endless, &samples).unwrap_err();
    assert_eq!(
        error,
        backoffice::pricing::CheckError::Module(ModuleError::SampleFailed(PricingError::OutOfFuel))
    );
    assert!(error.to_string().contains("out of fuel"), "{error}");
}

#[test]
fn prices_and_fuel_are_deterministic_alone_or_in_a_batch() {
    let pricing = Pricing::new();
    let tiered = pricing.load(&module("tiered")).unwrap();
    let alone = pricing.price(&tiered, &commit(42)).unwrap();
    assert!(alone.fuel > 0 && alone.fuel < FUEL_PER_CALL);
    assert_eq!(pricing.price_fresh(&tiered, &commit(42)).unwrap(), alone);
    // A module that keeps state in a global would leak it between calls if
    // a reused instance were not reset.
    let counter_wat = taca_wat(
        "(global $calls (mut i64) (i64.const 0))",
        "(global.set $calls (i64.add (global.get $calls) (i64.const 1))) (global.get $calls)",
    );
    let counter = pricing.load(&counter_wat).unwrap();
    for index in 0..5000u64 {
        let priced = pricing.price(&tiered, &commit(index % 200)).unwrap();
        if index % 200 == 42 {
            assert_eq!(
                priced, alone,
                "same input, same price and fuel, call {index}"
            );
        }
        let counted = pricing.price(&counter, &commit(0)).unwrap();
        assert_eq!(
            counted.amount,
            Amount::from_nanos(1),
            "no state survives a call"
        );
    }

    // A batch large enough for `price_many` to spread it over threads,
    // mixing modules and inputs, priced by another `Pricing` one by one:
    // the same amounts and fuel, in the same order.
    let flat = pricing.load(&module("flat")).unwrap();
    let modules = [tiered, flat, counter];
    let jobs: Vec<_> = (0..4 * PARALLEL_JOBS_MIN as u64)
        .map(|index| {
            let taca = Arc::clone(&modules[(index % 3) as usize]);
            (taca, commit(index * 7 % 200))
        })
        .collect();
    if std::thread::available_parallelism().map_or(1, std::num::NonZero::get) < 2 {
        eprintln!("one core: price_many prices this batch on one thread");
    }
    let batch = pricing.price_many(&jobs);
    let solo = Pricing::new();
    let solo_modules = [
        solo.load(&module("tiered")).unwrap(),
        solo.load(&module("flat")).unwrap(),
        solo.load(&counter_wat).unwrap(),
    ];
    assert_eq!(batch.len(), jobs.len());
    for (index, ((_, input), in_batch)) in jobs.iter().zip(&batch).enumerate() {
        let by_itself = solo.price(&solo_modules[index % 3], input).unwrap();
        assert_eq!(
            in_batch.as_ref().unwrap(),
            &by_itself,
            "job {index}: the same price and fuel alone or in a batch"
        );
    }
    // Each worker keeps its instance from one price to the next of the same
    // module: it is still reset between them.
    let counted: Vec<_> = (0..2 * PARALLEL_JOBS_MIN)
        .map(|_| (Arc::clone(&modules[2]), commit(0)))
        .collect();
    for (index, priced) in pricing.price_many(&counted).into_iter().enumerate() {
        assert_eq!(
            priced.unwrap().amount,
            Amount::from_nanos(1),
            "job {index}: no state survives a call"
        );
    }
}

#[test]
fn modules_are_cached_by_content_hash() {
    let pricing = Pricing::new();
    let first = pricing.load(&module("flat")).unwrap();
    let again = pricing.load(&module("flat")).unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    assert_ne!(
        first.hash(),
        pricing.load(&module("tiered")).unwrap().hash()
    );
    assert_eq!(first.hash().to_string().len(), 64);
}

/// Varied inputs, each twice and in an order that revisits earlier ones:
/// periods 1..=40, every code, and `unit` strings of changing length (so a
/// long input is followed by a short one in the same input area).
fn varied_inputs() -> Vec<PriceInput> {
    let codes = [Code::Commit, Code::Query, Code::Login, Code::Logout];
    let mut inputs: Vec<PriceInput> = (1..=40u64)
        .map(|period| {
            let mut input = input(codes[period as usize % codes.len()], "B1-P7", period);
            input.volume = period * 3;
            input.unit = "u".repeat((period as usize * 37) % 120);
            input
        })
        .collect();
    let again: Vec<PriceInput> = inputs.iter().rev().step_by(3).cloned().collect();
    inputs.extend(again);
    inputs.extend(inputs.clone());
    inputs
}

/// Prices every varied input through `price` (a reused instance when the
/// module allows it) and through a fresh instance: amounts, refusals, traps
/// and fuel must all agree.
fn reused_equals_fresh(bytes: &[u8], reused: bool) {
    let pricing = Pricing::new();
    let taca = pricing.load(bytes).expect("module loads");
    assert_eq!(taca.reuses_instances(), reused, "eligibility for reuse");
    for (index, input) in varied_inputs().iter().enumerate() {
        let fresh = pricing.price_fresh(&taca, input);
        let again = pricing.price(&taca, input);
        assert_eq!(again, fresh, "input {index}: {input:?}");
    }
}

#[test]
fn every_example_reuses_instances_with_the_prices_and_fuel_of_fresh_ones() {
    for name in ["flat", "free-test", "tiered", "per-unit", "capped"] {
        reused_equals_fresh(&module(name), true);
    }
    let hand = wat::parse_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/flat.wat"
    ))
    .unwrap();
    reused_equals_fresh(&hand, true);
}

#[test]
fn state_kept_anywhere_does_not_survive_into_the_next_price() {
    // Period uses sit at offset 16 of the input area (address 1024).
    let cases = [
        // A counter in memory.
        "(i32.store (i32.const 4096) (i32.add (i32.load (i32.const 4096)) (i32.const 1)))
         (i64.extend_i32_u (i32.load (i32.const 4096)))",
        // At an address chosen by the input, through a memarg offset.
        "(local $slot i32)
         (local.set $slot (i32.shl (i32.wrap_i64 (i64.load (i32.const 1040))) (i32.const 3)))
         (i64.store offset=8192 (local.get $slot) (i64.add (i64.load offset=8192 (local.get $slot)) (i64.const 7)))
         (i64.load offset=8192 (local.get $slot))",
        // Narrow and floating-point stores.
        "(i64.store8 (i32.const 5000) (i64.add (i64.load8_u (i32.const 5000)) (i64.const 1)))
         (f64.store (i32.const 5008) (f64.add (f64.load (i32.const 5008)) (f64.const 1.5)))
         (i64.add (i64.load8_u (i32.const 5000)) (i64.trunc_f64_u (f64.load (i32.const 5008))))",
        // SIMD stores, whole and one lane.
        "(v128.store offset=12000 (i32.const 0)
           (i32x4.add (v128.load offset=12000 (i32.const 0)) (v128.const i32x4 1 1 1 1)))
         (v128.store8_lane offset=13000 0 (i32.const 0)
           (i8x16.splat (i32.add (i32.load8_u offset=13000 (i32.const 0)) (i32.const 1))))
         (i64.extend_i32_u (i32.add (i32.load offset=12000 (i32.const 0)) (i32.load8_u offset=13000 (i32.const 0))))",
        // memory.fill and memory.copy.
        "(memory.fill (i32.const 20000) (i32.add (i32.load8_u (i32.const 20000)) (i32.const 1)) (i32.const 100))
         (if (i64.eqz (i64.load (i32.const 31000)))
           (then (memory.copy (i32.const 31000) (i32.const 1040) (i32.const 8))))
         (i64.add (i64.load8_u (i32.const 20099)) (i64.mul (i64.load (i32.const 31000)) (i64.const 1000)))",
        // Written, then a trap on odd periods.
        "(i32.store (i32.const 4096) (i32.add (i32.load (i32.const 4096)) (i32.const 1)))
         (if (i64.ne (i64.const 0) (i64.and (i64.load (i32.const 1040)) (i64.const 1))) (then unreachable))
         (i64.extend_i32_u (i32.load (i32.const 4096)))",
        // Written, then out of fuel on every third period.
        "(i32.store (i32.const 4096) (i32.add (i32.load (i32.const 4096)) (i32.const 1)))
         (if (i64.eqz (i64.rem_u (i64.load (i32.const 1040)) (i64.const 3)))
           (then (loop $again (br $again))))
         (i64.extend_i32_u (i32.load (i32.const 4096)))",
        // Reads past the end of this input, where a longer earlier one was.
        "(i64.load (i32.const 1140))",
        // Grows its memory and writes in the new page.
        "(drop (memory.grow (i32.const 1)))
         (i32.store (i32.const 70000) (i32.add (i32.load (i32.const 70000)) (i32.const 1)))
         (i64.extend_i32_u (i32.add (memory.size) (i32.load (i32.const 70000))))",
    ];
    for body in cases {
        reused_equals_fresh(&taca_wat("", body), true);
    }
    // Globals, and a start function whose work is part of the first state.
    let started = taca_wat(
        "(global $calls (mut i64) (i64.const 0))
         (func $init (global.set $calls (i64.const 40)) (i32.store (i32.const 4096) (i32.const 2)))
         (start $init)",
        "(global.set $calls (i64.add (global.get $calls) (i64.const 1)))
         (i32.store (i32.const 4096) (i32.mul (i32.load (i32.const 4096)) (i32.const 3)))
         (if (i64.ne (i64.const 0) (i64.and (i64.load (i32.const 1040)) (i64.const 1))) (then unreachable))
         (i64.add (global.get $calls) (i64.extend_i32_u (i32.load (i32.const 4096))))",
    );
    reused_equals_fresh(&started, true);
    // A module that could change what the marks do not cover is not reused.
    let drops = taca_wat(r#"(data $spare "abc")"#, "(data.drop $spare) (i64.const 5)");
    reused_equals_fresh(&drops, false);
    let table = taca_wat(
        "(table $t 1 funcref) (func $f) (elem declare func $f)",
        "(table.set $t (i32.const 0) (ref.func $f)) (i64.const 5)",
    );
    reused_equals_fresh(&table, false);
}

#[test]
fn more_modules_than_kept_instances_still_price_exactly() {
    use backoffice::pricing::WARM_INSTANCES_MAX;
    let pricing = Pricing::new();
    let tacas: Vec<_> = (0..WARM_INSTANCES_MAX as i64 + 8)
        .map(|n| {
            let body = format!(
                "(i32.store (i32.const 4096) (i32.add (i32.load (i32.const 4096)) (i32.const 1)))
                 (i64.add (i64.const {n}) (i64.extend_i32_u (i32.load (i32.const 4096))))"
            );
            pricing.load(&taca_wat("", &body)).unwrap()
        })
        .collect();
    for round in 0..2 {
        for (n, taca) in tacas.iter().enumerate() {
            assert!(taca.reuses_instances());
            let priced = pricing.price(taca, &commit(round)).unwrap();
            assert_eq!(
                priced.amount,
                Amount::from_nanos(n as i64 + 1),
                "module {n}"
            );
            assert!(pricing.kept_instances() <= WARM_INSTANCES_MAX);
        }
    }
    assert_eq!(pricing.kept_instances(), WARM_INSTANCES_MAX);
}

#[test]
fn stores_with_offsets_past_two_gibibytes_are_tracked_like_any_other() {
    // An offset above i32::MAX: the store traps (memory is far smaller), and
    // the address computed from it must still be handled as unsigned.
    let far = taca_wat(
        "",
        "(i32.store (i32.const 4096) (i32.add (i32.load (i32.const 4096)) (i32.const 1)))
         (if (i64.ne (i64.const 0) (i64.and (i64.load (i32.const 1040)) (i64.const 1)))
           (then (i32.store offset=3000000000 (i32.const 0) (i32.const 7))))
         (i64.extend_i32_u (i32.load (i32.const 4096)))",
    );
    reused_equals_fresh(&far, true);
}

#[test]
fn a_function_at_wasmtimes_locals_limit_is_refused_before_compiling() {
    // 49,995 locals are valid wasm; their rewrite (8 more) would exceed the
    // 50,000 a function may have. The structural limit refuses far sooner,
    // so every accepted module's rewrite compiles.
    let locals = "i32 ".repeat(49_995);
    let bytes = taca_wat(
        &format!("(func $crowded (local {locals}))"),
        "(call $crowded) (i64.const 7)",
    );
    let error = Pricing::new().load(&bytes).unwrap_err();
    assert!(
        matches!(
            error,
            ModuleError::OverLimit {
                limit: "LOCALS_MAX",
                ..
            }
        ),
        "{error}"
    );
}
