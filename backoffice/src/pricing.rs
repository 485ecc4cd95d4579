//! The TACA runtime: validates, compiles and runs producers' pricing modules
//! (`docs/taca-abi.md`). The only module that touches wasmtime.
//!
//! One `Engine` with every option set here; each module is compiled once and
//! cached by the SHA-256 of its bytes as an `InstancePre`; every price is
//! computed in a fresh `Store` and a fresh instance (from the pooling
//! allocator), with its own fuel and memory limits, so no price depends on any
//! price computed before it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use proto::{Amount, Cid, Code, Pid};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module, ModuleExport,
    OptLevel, PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder, Trap, TypedFunc,
    ValType,
};

/// The ABI version this runtime runs.
pub const ABI_VERSION: i32 = 1;
/// Largest module accepted, in bytes.
pub const MODULE_BYTES_MAX: usize = 1024 * 1024;
/// Fuel for one price: instantiation, start function and `taca_price`.
pub const FUEL_PER_CALL: u64 = 1_000_000;
/// Largest linear memory, in bytes (256 pages).
pub const MEMORY_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most table elements.
pub const TABLE_ELEMENTS_MAX: usize = 10_000;
/// Deepest wasm stack, in bytes.
pub const STACK_BYTES_MAX: usize = 512 * 1024;
/// Size of the input area, in bytes.
pub const INPUT_BYTES_MAX: usize = 1024;
/// Longest Parlay X rating parameter, in bytes.
pub const RATING_PARAMETER_BYTES_MAX: usize = 128;
/// Instances that may exist at once (one per concurrent price).
pub const CONCURRENT_INSTANCES_MAX: u32 = 64;
/// Bytes of each memory and table slot reset with memset, not madvise: enough
/// for a Rust module's default layout (1 MiB of stack, then its data).
pub const KEEP_RESIDENT_BYTES: usize = 2 * 1024 * 1024;
/// Fewer prices than this are not worth a thread.
pub const PARALLEL_JOBS_MIN: usize = 256;
/// Compiled modules kept in memory.
pub const CACHED_MODULES_MAX: usize = 4096;

/// The SHA-256 of a module's bytes, which names it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TacaHash([u8; 32]);

impl TacaHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> TacaHash {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(digest.as_ref());
        TacaHash(hash)
    }
}

impl TacaHash {
    /// Parses the lower-case hex form that `Display` prints.
    pub fn parse_hex(text: &str) -> Option<TacaHash> {
        let bytes = proto::record::unhex(text, 32)?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes);
        Some(TacaHash(hash))
    }
}

impl serde::Serialize for TacaHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TacaHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        TacaHash::parse_hex(&text).ok_or_else(|| serde::de::Error::custom("not a SHA-256 in hex"))
    }
}

impl fmt::Display for TacaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&proto::record::hex(&self.0))
    }
}

impl fmt::Debug for TacaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TacaHash({self})")
    }
}

/// Why a module is refused. The messages are for producers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    /// The module is too large.
    #[error("the module has {len} bytes; at most {MODULE_BYTES_MAX} are accepted")]
    TooLarge {
        /// Its size.
        len: usize,
    },
    /// The bytes are not a valid WebAssembly core module (or use a feature
    /// that is off: threads, relaxed SIMD, 64-bit memories...).
    #[error("not a valid WebAssembly module for this runtime: {0}")]
    Invalid(String),
    /// The module imports something; TACAs import nothing.
    #[error("the module imports {0}; a TACA must import nothing (no WASI, no host functions)")]
    HasImports(String),
    /// A required export is missing.
    #[error("the module does not export {0}")]
    MissingExport(&'static str),
    /// An export has the wrong type.
    #[error("the export {name} must be {expected}")]
    WrongExportType {
        /// The export.
        name: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// The module implements another ABI version.
    #[error(
        "the module implements TACA ABI version {0}; this backoffice runs version {ABI_VERSION}"
    )]
    WrongAbiVersion(i32),
    /// The module failed on a sample input.
    #[error("on a sample input the module failed: {0}")]
    SampleFailed(PricingError),
}

/// Why a reading could not be priced. Each is bounded in cost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// The TACA declined to price it (ABI refusal code).
    #[error("the TACA refused to price it (refusal code {0})")]
    Refused(u64),
    /// The call ran out of fuel (an endless loop, or simply too much work).
    #[error("out of fuel after {FUEL_PER_CALL} units")]
    OutOfFuel,
    /// The module tried to grow memory or tables beyond the limits.
    #[error("memory or table limit exceeded ({MEMORY_BYTES_MAX} bytes of memory)")]
    ResourceLimit,
    /// Recursion too deep.
    #[error("wasm stack exhausted ({STACK_BYTES_MAX} bytes)")]
    StackOverflow,
    /// Any other trap (unreachable, division by zero, out-of-bounds access).
    #[error("trapped: {0}")]
    Trap(String),
    /// The module's input area is not inside its memory.
    #[error("taca_input points outside the module's memory")]
    BadInputArea,
    /// An input field is too long for the ABI.
    #[error("input field {0} is too long")]
    InputTooLong(&'static str),
    /// The price is beyond what the ledger holds.
    #[error("the price is out of range")]
    OutOfRange,
    /// Too many prices are being computed at once.
    #[error("all {CONCURRENT_INSTANCES_MAX} pricing slots are busy")]
    Busy,
}

/// What a TACA is asked to price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceInput {
    /// Who pays.
    pub payer: Cid,
    /// What happened.
    pub code: Code,
    /// The product priced.
    pub pid: Pid,
    /// Units consumed; 1 for an invocation.
    pub volume: u64,
    /// The payer's uses of this PID earlier in the billing period.
    pub period_uses: u64,
    /// Parlay X `unit`.
    pub unit: String,
    /// Parlay X `contract`.
    pub contract: String,
    /// Parlay X `service`.
    pub service: String,
    /// Parlay X `operation`.
    pub operation: String,
}

impl PriceInput {
    /// A plain invocation: volume 1, no rating parameters.
    pub fn invocation(payer: Cid, code: Code, pid: Pid, period_uses: u64) -> PriceInput {
        PriceInput {
            payer,
            code,
            pid,
            volume: 1,
            period_uses,
            unit: String::new(),
            contract: String::new(),
            service: String::new(),
            operation: String::new(),
        }
    }

    /// The ABI's byte layout.
    pub fn encode(&self) -> Result<Vec<u8>, PricingError> {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&u32::from(self.code.as_char()).to_le_bytes());
        bytes.extend_from_slice(&self.volume.to_le_bytes());
        bytes.extend_from_slice(&self.period_uses.to_le_bytes());
        let texts = [
            ("payer", self.payer.as_str()),
            ("PID", self.pid.as_str()),
            ("unit", self.unit.as_str()),
            ("contract", self.contract.as_str()),
            ("service", self.service.as_str()),
            ("operation", self.operation.as_str()),
        ];
        for (name, text) in texts {
            if text.len() > RATING_PARAMETER_BYTES_MAX {
                return Err(PricingError::InputTooLong(name));
            }
            let len = u16::try_from(text.len()).expect("at most 128 bytes");
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(text.as_bytes());
        }
        debug_assert!(bytes.len() <= INPUT_BYTES_MAX);
        Ok(bytes)
    }
}

/// A priced reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priced {
    /// The amount due.
    pub amount: Amount,
    /// Fuel the call used (instantiation included).
    pub fuel: u64,
}

struct StoreState {
    limits: StoreLimits,
}

/// A validated, compiled module.
pub struct Taca {
    hash: TacaHash,
    pre: InstancePre<StoreState>,
    memory: ModuleExport,
    input: ModuleExport,
    price: ModuleExport,
}

impl Taca {
    /// The module's hash.
    pub fn hash(&self) -> TacaHash {
        self.hash
    }
}

impl fmt::Debug for Taca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Taca({})", self.hash)
    }
}

/// The runtime: an engine and the cache of compiled modules.
pub struct Pricing {
    engine: Engine,
    linker: Linker<StoreState>,
    cache: Mutex<HashMap<TacaHash, Arc<Taca>>>,
}

/// The engine configuration, every option chosen here rather than inherited.
fn config() -> Config {
    let mut config = Config::new();
    // Bounded work per call, counted in instructions: deterministic, unlike time.
    config.consume_fuel(true);
    config.epoch_interruption(false);
    // Deterministic floating point: one NaN bit pattern everywhere.
    config.cranelift_nan_canonicalization(true);
    config.cranelift_opt_level(OptLevel::Speed);
    // Features that bring nondeterminism or shared state stay off. Threads,
    // GC, exceptions, async and parallel compilation are not even compiled
    // in (wasmtime's cargo features are off).
    config.wasm_relaxed_simd(false);
    config.wasm_memory64(false);
    config.wasm_multi_memory(false);
    config.wasm_gc(false);
    // What rustc's wasm32 output uses.
    config.wasm_simd(true);
    config.wasm_bulk_memory(true);
    config.wasm_multi_value(true);
    config.wasm_tail_call(true);
    config.wasm_extended_const(true);
    config.max_wasm_stack(STACK_BYTES_MAX);
    config.debug_info(false);
    config.wasm_backtrace_max_frames(None);
    config.native_unwind_info(true);
    // Instances come from a pool. TACAs are tiny: copying their data segments
    // into a fresh memory (measured 4.1 us per price) beats mapping a
    // copy-on-write image (4.6 us), whose page faults cost more than the copy.
    config.memory_init_cow(false);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_core_instances(CONCURRENT_INSTANCES_MAX);
    pool.total_memories(CONCURRENT_INSTANCES_MAX);
    pool.total_tables(CONCURRENT_INSTANCES_MAX);
    pool.max_memories_per_module(1);
    pool.max_tables_per_module(1);
    pool.max_memory_size(MEMORY_BYTES_MAX);
    pool.table_elements(TABLE_ELEMENTS_MAX);
    // A few warm slots per engine: module affinity keeps reusing them.
    pool.max_unused_warm_slots(4);
    // Reset memories and tables with memset instead of madvise: a price
    // touches a few pages, and page faults would cost more than it. With
    // PAGEMAP_SCAN (Linux 6.7+, used when present) only the pages the price
    // wrote are reset: 4.1 us per price against 9.2 us with a 64 KiB memset
    // and madvise for the rest (docs/benchmarks.md).
    pool.linear_memory_keep_resident(KEEP_RESIDENT_BYTES);
    pool.table_keep_resident(KEEP_RESIDENT_BYTES);
    pool.pagemap_scan(wasmtime::Enabled::Auto);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config.memory_reservation(u64::try_from(MEMORY_BYTES_MAX).expect("fits u64"));
    config.memory_guard_size(64 * 1024);
    config
}

fn trap_error(error: &wasmtime::Error) -> PricingError {
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => PricingError::OutOfFuel,
        Some(Trap::StackOverflow) => PricingError::StackOverflow,
        Some(Trap::AllocationTooLarge) => PricingError::ResourceLimit,
        Some(trap) => PricingError::Trap(trap.to_string()),
        None => {
            let text = format!("{error:#}");
            // StoreLimits' `trap_on_grow_failure` reports this way.
            if text.contains("forcing trap when growing") || text.contains("limit") {
                PricingError::ResourceLimit
            } else {
                PricingError::Trap(text)
            }
        }
    }
}

impl Default for Pricing {
    fn default() -> Self {
        Self::new()
    }
}

impl Pricing {
    /// A runtime with the fixed configuration.
    pub fn new() -> Pricing {
        let engine = Engine::new(&config()).expect("the engine configuration is valid");
        // No host functions: TACAs import nothing.
        let linker = Linker::new(&engine);
        Pricing {
            engine,
            linker,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Validates and compiles `bytes`, or returns the cached module with the
    /// same hash.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Taca>, ModuleError> {
        if bytes.len() > MODULE_BYTES_MAX {
            return Err(ModuleError::TooLarge { len: bytes.len() });
        }
        let hash = TacaHash::of(bytes);
        if let Some(taca) = self.lock_cache().get(&hash) {
            return Ok(Arc::clone(taca));
        }
        let module = Module::from_binary(&self.engine, bytes)
            .map_err(|error| ModuleError::Invalid(format!("{error:#}")))?;
        let taca = Arc::new(self.prepare(hash, &module)?);
        self.check_version(&taca)?;
        let mut cache = self.lock_cache();
        if cache.len() >= CACHED_MODULES_MAX {
            cache.clear();
        }
        cache.insert(hash, Arc::clone(&taca));
        Ok(taca)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<TacaHash, Arc<Taca>>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn prepare(&self, hash: TacaHash, module: &Module) -> Result<Taca, ModuleError> {
        if let Some(import) = module.imports().next() {
            return Err(ModuleError::HasImports(format!(
                "{}::{}",
                import.module(),
                import.name()
            )));
        }
        let export = |name: &'static str| {
            module
                .get_export_index(name)
                .ok_or(ModuleError::MissingExport(name))
        };
        let memory = export("memory")?;
        export("taca_abi_version")?;
        let input = export("taca_input")?;
        let price = export("taca_price")?;
        let types: HashMap<&str, wasmtime::ExternType> =
            module.exports().map(|e| (e.name(), e.ty())).collect();
        let func_type = |name: &'static str,
                         params: &[ValType],
                         results: &[ValType],
                         expected: &'static str| {
            let wrong = ModuleError::WrongExportType { name, expected };
            let Some(wasmtime::ExternType::Func(ty)) = types.get(name) else {
                return Err(wrong);
            };
            let same = |found: &mut dyn ExactSizeIterator<Item = ValType>, wanted: &[ValType]| {
                found.len() == wanted.len() && found.zip(wanted).all(|(a, b)| ValType::eq(&a, b))
            };
            if same(&mut ty.params(), params) && same(&mut ty.results(), results) {
                Ok(())
            } else {
                Err(wrong)
            }
        };
        if !matches!(types.get("memory"), Some(wasmtime::ExternType::Memory(_))) {
            return Err(ModuleError::WrongExportType {
                name: "memory",
                expected: "a memory",
            });
        }
        func_type(
            "taca_abi_version",
            &[],
            &[ValType::I32],
            "a function () -> i32",
        )?;
        func_type("taca_input", &[], &[ValType::I32], "a function () -> i32")?;
        func_type(
            "taca_price",
            &[ValType::I32],
            &[ValType::I64],
            "a function (i32) -> i64",
        )?;
        let pre = self
            .linker
            .instantiate_pre(module)
            .map_err(|error| ModuleError::Invalid(format!("{error:#}")))?;
        Ok(Taca {
            hash,
            pre,
            memory,
            input,
            price,
        })
    }

    fn store(&self) -> Result<Store<StoreState>, PricingError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(MEMORY_BYTES_MAX)
            .table_elements(TABLE_ELEMENTS_MAX)
            .instances(1)
            .tables(1)
            .memories(1)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(&self.engine, StoreState { limits });
        store.limiter(|state| &mut state.limits);
        store
            .set_fuel(FUEL_PER_CALL)
            .map_err(|error| trap_error(&error))?;
        Ok(store)
    }

    fn check_version(&self, taca: &Taca) -> Result<(), ModuleError> {
        let mut store = self.store().map_err(ModuleError::SampleFailed)?;
        let instance = taca
            .pre
            .instantiate(&mut store)
            .map_err(|error| ModuleError::SampleFailed(trap_error(&error)))?;
        let version: TypedFunc<(), i32> =
            instance
                .get_typed_func(&mut store, "taca_abi_version")
                .map_err(|_| ModuleError::MissingExport("taca_abi_version"))?;
        match version.call(&mut store, ()) {
            Ok(ABI_VERSION) => Ok(()),
            Ok(other) => Err(ModuleError::WrongAbiVersion(other)),
            Err(error) => Err(ModuleError::SampleFailed(trap_error(&error))),
        }
    }

    /// Prices one reading in a fresh instance.
    pub fn price(&self, taca: &Taca, input: &PriceInput) -> Result<Priced, PricingError> {
        let bytes = input.encode()?;
        let mut store = self.store()?;
        let instance = taca.pre.instantiate(&mut store).map_err(|error| {
            let text = format!("{error:#}");
            if text.contains("maximum concurrent")
                || text.contains("pooling") && text.contains("limit")
            {
                PricingError::Busy
            } else {
                trap_error(&error)
            }
        })?;
        let extern_of = |store: &mut Store<StoreState>, export: &ModuleExport| {
            instance
                .get_module_export(&mut *store, export)
                .expect("exports checked at load")
        };
        let memory = extern_of(&mut store, &taca.memory)
            .into_memory()
            .expect("memory checked at load");
        let input_fn = extern_of(&mut store, &taca.input)
            .into_func()
            .expect("function checked at load")
            .typed::<(), i32>(&store)
            .expect("type checked at load");
        let price_fn = extern_of(&mut store, &taca.price)
            .into_func()
            .expect("function checked at load")
            .typed::<i32, i64>(&store)
            .expect("type checked at load");
        let address = input_fn
            .call(&mut store, ())
            .map_err(|error| trap_error(&error))?;
        let start = usize::try_from(address).map_err(|_| PricingError::BadInputArea)?;
        let area = memory
            .data_mut(&mut store)
            .get_mut(start..start + INPUT_BYTES_MAX)
            .ok_or(PricingError::BadInputArea)?;
        area[..bytes.len()].copy_from_slice(&bytes);
        let length = i32::try_from(bytes.len()).expect("input fits i32");
        let result = price_fn
            .call(&mut store, length)
            .map_err(|error| trap_error(&error))?;
        let fuel = FUEL_PER_CALL - store.get_fuel().map_err(|error| trap_error(&error))?;
        if result < 0 {
            return Err(PricingError::Refused(result.unsigned_abs()));
        }
        Ok(Priced {
            amount: Amount::from_nanos(result),
            fuel,
        })
    }

    /// Prices many readings, each in its own fresh instance as [`price`]
    /// does, spread over the machine's cores. Results come back in the order
    /// of `jobs`; since no price depends on another, the order of work does
    /// not change them.
    ///
    /// [`price`]: Pricing::price
    pub fn price_many(
        &self,
        jobs: &[(Arc<Taca>, PriceInput)],
    ) -> Vec<Result<Priced, PricingError>> {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        if threads < 2 || jobs.len() < PARALLEL_JOBS_MIN {
            return jobs
                .iter()
                .map(|(taca, input)| self.price(taca, input))
                .collect();
        }
        let chunk = jobs.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = jobs
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|(taca, input)| self.price(taca, input))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| match worker.join() {
                    Ok(results) => results,
                    Err(panic) => std::panic::resume_unwind(panic),
                })
                .collect()
        })
    }

    /// Creates a store and an instance and drops them: the fixed cost of a
    /// price, for benchmarks.
    pub fn instantiate_only(&self, taca: &Taca) -> Result<(), PricingError> {
        let mut store = self.store()?;
        taca.pre
            .instantiate(&mut store)
            .map_err(|error| trap_error(&error))?;
        Ok(())
    }

    /// What upload validation does: load the module and price every sample;
    /// any failure other than a refusal refuses the module.
    pub fn check(
        &self,
        bytes: &[u8],
        samples: &[PriceInput],
    ) -> Result<Vec<Result<Priced, PricingError>>, ModuleError> {
        let taca = self.load(bytes)?;
        let mut results = Vec::with_capacity(samples.len());
        for sample in samples {
            match self.price(&taca, sample) {
                Err(PricingError::Refused(code)) => results.push(Err(PricingError::Refused(code))),
                Err(error) => return Err(ModuleError::SampleFailed(error)),
                Ok(priced) => results.push(Ok(priced)),
            }
        }
        Ok(results)
    }
}
