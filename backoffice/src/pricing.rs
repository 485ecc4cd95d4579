//! The TACA runtime: validates, compiles and runs producers' pricing modules
//! (`docs/taca-abi.md`). The only module that touches wasmtime.
//!
//! One `Engine` with every option set here; each module is compiled once and
//! cached by the SHA-256 of its bytes as an `InstancePre`; every price starts
//! from the state an instance has right after instantiation, with its own fuel
//! and memory limits, so no price depends on any price computed before it.
//!
//! Most modules are rewritten to track their writes (`track`), and their
//! instances are reset to that state after each price and used again; the
//! others get a fresh `Store` and instance (from the pooling allocator) for
//! every price. Both give the same amount and the same fuel
//! (`docs/taca-abi.md`, "How an instance is reused").

pub mod guard;
#[doc(hidden)]
pub mod hostile;
mod limits;
mod track;

pub use limits::{
    CODE_BYTES_MAX, FUNCTION_BODY_BYTES_MAX, FUNCTIONS_MAX, LOCALS_MAX, LOOPS_MAX,
    NESTING_DEPTH_MAX, Structure,
};

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use proto::{Amount, Cid, Code, Pid};
use wasmtime::{
    Config, Engine, Global, Instance, InstanceAllocationStrategy, InstancePre, Linker, Memory,
    Module, ModuleExport, OptLevel, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder, Trap, TypedFunc, Val, ValType,
};

/// The ABI version this runtime runs.
pub const ABI_VERSION: i32 = 1;
/// Largest module accepted, in bytes.
pub const MODULE_BYTES_MAX: usize = 1024 * 1024;
/// Fuel for one price: instantiation (its data and element copies, its start
/// function) and `taca_input` and `taca_price`. A price that used more fails
/// with `OutOfFuel`, even when it got to the end (see `FUEL_GIVEN`).
pub const FUEL_PER_CALL: u64 = 1_000_000;
/// Fuel a price's store starts with: one unit more than `FUEL_PER_CALL`.
/// wasmtime checks fuel only at function entries and loop headers, so
/// straight-line code can run past the budget and return; a store left with
/// no fuel at the end therefore used more than `FUEL_PER_CALL` (wasmtime
/// saturates at 0) and the price fails with `OutOfFuel`, and one left with
/// some used exactly `FUEL_GIVEN` minus that.
const FUEL_GIVEN: u64 = FUEL_PER_CALL + 1;
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
/// Instances that may exist at once for prices in progress.
pub const CONCURRENT_INSTANCES_MAX: u32 = 64;
/// How long a price waits for one of the `CONCURRENT_INSTANCES_MAX` slots
/// before it is answered `Busy` (which refuses its batch retryably: busy
/// is not the TACA's failure, and never sends a use to suspense).
pub const SLOT_WAIT_MS: u64 = 10_000;
/// Instances kept for reuse, over all modules; past it, a module that needs
/// one takes the place of another module's idle one.
pub const WARM_INSTANCES_MAX: usize = 256;
/// Idle instances kept for reuse per module (one per core is enough).
pub const WARM_PER_MODULE_MAX: usize = 4;
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
    /// The hash's 32 bytes.
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The hash with these 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> TacaHash {
        TacaHash(bytes)
    }

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
    /// The module is over one of the structural limits checked before it is
    /// compiled (`limits`).
    #[error("the module has {seen} {what}; at most {max} are accepted ({limit})")]
    OverLimit {
        /// The limit's name, as in `docs/taca-abi.md`.
        limit: &'static str,
        /// What was counted, and where.
        what: String,
        /// The value seen.
        seen: u64,
        /// The limit.
        max: u64,
    },
    /// Checking the module in its own process went over that process's
    /// time or memory (`guard`).
    #[error("{0}")]
    CompileBound(String),
}

/// Why `Pricing::check` did not judge a module: a sample is not a valid
/// input (the caller's error), or the module was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// Sample number `index` (from 1) cannot be given to any module.
    #[error("sample {index} is not a valid input (the sample's error, not the module's): {error}")]
    BadSample {
        /// Which sample, counted from 1.
        index: usize,
        /// Why.
        error: PricingError,
    },
    /// The module was refused.
    #[error("{0}")]
    Module(#[from] ModuleError),
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
    /// The module tried to grow its memory beyond the limit (`memory.grow`
    /// traps rather than returning -1).
    #[error("memory limit exceeded ({MEMORY_BYTES_MAX} bytes of memory)")]
    ResourceLimit,
    /// The module tried to grow its table beyond the limit (`table.grow`
    /// traps rather than returning -1), or declared a larger one.
    #[error("table limit exceeded ({TABLE_ELEMENTS_MAX} elements in 1 table)")]
    TableLimit,
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
    #[error("input field {0} is longer than {RATING_PARAMETER_BYTES_MAX} bytes")]
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

/// The samples an upload is tried on, and `taca check` without samples: in
/// this order, `code=),uses=0`, `code=),uses=10`, `code=),uses=100`,
/// `code=(` and `code=),pid=B1-P1T` (`PriceInput::parse_sample`), each
/// paid by `B1-C1` for `B1-P1` unless it says otherwise.
pub const UPLOAD_SAMPLES: [&str; 5] = [
    "code=),uses=0",
    "code=),uses=10",
    "code=),uses=100",
    "code=(",
    "code=),pid=B1-P1T",
];

/// `UPLOAD_SAMPLES` as inputs.
pub fn upload_samples() -> Vec<PriceInput> {
    UPLOAD_SAMPLES
        .iter()
        .map(|text| PriceInput::parse_sample(text).expect("the upload's samples are valid"))
        .collect()
}

impl PriceInput {
    /// A sample as `taca check` takes it: comma-separated `key=value` pairs
    /// (`code`, `uses`, `volume`, `unit`, `contract`, `service`,
    /// `operation`, `payer`, `pid`); keys left out take a commit of `B1-P1`
    /// paid by `B1-C1`, volume 1, no earlier uses, empty rating parameters.
    /// The result is a valid input (its fields fit the ABI).
    pub fn parse_sample(text: &str) -> Result<PriceInput, String> {
        let mut input = PriceInput::invocation(
            Cid::parse("B1-C1").expect("valid default"),
            Code::Commit,
            Pid::parse("B1-P1").expect("valid default"),
            0,
        );
        for pair in text.split(',').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{key} needs a number, not {value:?}"))
            };
            match key {
                "code" => {
                    input.code = Code::parse(value)
                        .ok_or_else(|| format!("code must be one of {{ }} ( ), not {value:?}"))?
                }
                "uses" => input.period_uses = number()?,
                "volume" => input.volume = number()?,
                "unit" => input.unit = value.to_owned(),
                "contract" => input.contract = value.to_owned(),
                "service" => input.service = value.to_owned(),
                "operation" => input.operation = value.to_owned(),
                "payer" => input.payer = Cid::parse(value).map_err(|error| error.to_string())?,
                "pid" => input.pid = Pid::parse(value).map_err(|error| error.to_string())?,
                _ => return Err(format!("unknown sample key {key:?}")),
            }
        }
        input.encode().map_err(|error| error.to_string())?;
        Ok(input)
    }

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
        self.encode_into(&mut bytes)?;
        Ok(bytes)
    }

    /// Appends the ABI's byte layout to `bytes` (a buffer used again from
    /// one price to the next).
    pub fn encode_into(&self, bytes: &mut Vec<u8>) -> Result<(), PricingError> {
        let start = bytes.len();
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
        debug_assert!(bytes.len() - start <= INPUT_BYTES_MAX);
        Ok(())
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
    /// Present when the module was rewritten to track its writes.
    reuse: Option<Reuse>,
    /// Why it was not, when it was not.
    fresh_because: Option<String>,
    /// Fuel charged for instantiation's copies (`Structure::init_fuel`).
    init_fuel: u64,
}

impl Taca {
    /// The module's hash.
    pub fn hash(&self) -> TacaHash {
        self.hash
    }

    /// Whether its instances are reset and reused rather than made anew.
    pub fn reuses_instances(&self) -> bool {
        self.reuse.is_some()
    }

    /// Why every price of this module needs a fresh instance, if it does.
    pub fn fresh_instance_reason(&self) -> Option<&str> {
        self.fresh_because.as_deref()
    }
}

/// How instances of a rewritten module are found, reset and kept.
struct Reuse {
    low: ModuleExport,
    high: ModuleExport,
    globals: Vec<ModuleExport>,
    /// The state right after instantiation, taken from the first instance.
    base: OnceLock<Base>,
    /// Idle instances, already reset.
    warm: Mutex<Vec<Warm>>,
}

/// An instance's state right after instantiation.
struct Base {
    memory: Snapshot,
    globals: Vec<Val>,
    /// The write marks: a start function's writes are already in them.
    marks: (i32, i32),
    /// Fuel that instantiation used; part of every price's fuel.
    fuel: u64,
}

/// Bytes of memory kept per page of a snapshot.
const SNAPSHOT_PAGE: usize = 4096;

/// A memory as instantiated, keeping only its pages that are not all zeros
/// (a Rust module's 64 KiB stack and most of its data are zeros).
struct Snapshot {
    len: usize,
    /// Page index to contents, for the pages with a non-zero byte.
    pages: std::collections::BTreeMap<usize, Box<[u8]>>,
}

impl Snapshot {
    fn of(memory: &[u8]) -> Snapshot {
        let pages = memory
            .chunks(SNAPSHOT_PAGE)
            .enumerate()
            .filter(|(_, page)| page.iter().any(|&byte| byte != 0))
            .map(|(index, page)| (index, Box::from(page)))
            .collect();
        Snapshot {
            len: memory.len(),
            pages,
        }
    }

    /// Whether `memory` equals the snapshot.
    fn matches(&self, memory: &[u8]) -> bool {
        memory.len() == self.len
            && memory
                .chunks(SNAPSHOT_PAGE)
                .enumerate()
                .all(|(index, page)| match self.pages.get(&index) {
                    Some(kept) => **kept == *page,
                    None => page.iter().all(|&byte| byte == 0),
                })
    }

    /// Puts `range` of `memory` back as it was.
    fn restore(&self, memory: &mut [u8], range: std::ops::Range<usize>) {
        let mut at = range.start;
        while at < range.end {
            let index = at / SNAPSHOT_PAGE;
            let page_start = index * SNAPSHOT_PAGE;
            let end = range.end.min(page_start + SNAPSHOT_PAGE);
            match self.pages.get(&index) {
                Some(kept) => {
                    memory[at..end].copy_from_slice(&kept[at - page_start..end - page_start])
                }
                None => memory[at..end].fill(0),
            }
            at = end;
        }
    }
}

/// What a price uses of an instance: its memory and the two ABI functions.
struct Exports {
    memory: Memory,
    input: TypedFunc<(), i32>,
    price: TypedFunc<i32, i64>,
}

impl Exports {
    fn of(taca: &Taca, instance: &Instance, store: &mut Store<StoreState>) -> Exports {
        let mut export = |index: &ModuleExport| {
            instance
                .get_module_export(&mut *store, index)
                .expect("exports checked at load")
        };
        let memory = export(&taca.memory)
            .into_memory()
            .expect("memory checked at load");
        let input = export(&taca.input)
            .into_func()
            .expect("function checked at load");
        let price = export(&taca.price)
            .into_func()
            .expect("function checked at load");
        Exports {
            memory,
            input: input.typed(&*store).expect("type checked at load"),
            price: price.typed(&*store).expect("type checked at load"),
        }
    }

    /// Calls `taca_input` and writes `bytes` there; returns where.
    fn write_input(
        &self,
        store: &mut Store<StoreState>,
        bytes: &[u8],
    ) -> Result<std::ops::Range<usize>, PricingError> {
        let address = self
            .input
            .call(&mut *store, ())
            .map_err(|error| trap_error(&error))?;
        let start = usize::try_from(address).map_err(|_| PricingError::BadInputArea)?;
        let area = self
            .memory
            .data_mut(&mut *store)
            .get_mut(start..start + INPUT_BYTES_MAX)
            .ok_or(PricingError::BadInputArea)?;
        area[..bytes.len()].copy_from_slice(bytes);
        Ok(start..start + bytes.len())
    }

    /// Calls `taca_price` on an input of `length` bytes: the amount, or the
    /// refusal or trap.
    fn price(&self, store: &mut Store<StoreState>, length: usize) -> Result<Amount, PricingError> {
        let length = i32::try_from(length).expect("input fits i32");
        let result = self
            .price
            .call(&mut *store, length)
            .map_err(|error| trap_error(&error))?;
        if result < 0 {
            return Err(PricingError::Refused(result.unsigned_abs()));
        }
        Ok(Amount::from_nanos(result))
    }
}

/// An instance kept for reuse, with its own store.
struct Warm {
    store: Store<StoreState>,
    exports: Exports,
    low: Global,
    high: Global,
    globals: Vec<Global>,
    /// Counts this instance among the runtime's idle ones while it lives.
    _count: WarmCount,
}

/// One unit of `Pricing::warm_count`, given back on drop.
struct WarmCount(Arc<AtomicUsize>);

impl Drop for WarmCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
    /// Instances kept for reuse (idle or in use), over all modules.
    warm_count: Arc<AtomicUsize>,
    /// Prices in progress at most, so that the pool never runs out under
    /// them: a price waits for a slot rather than failing.
    slots: Slots,
}

/// How many prices a `price_many` worker makes in one slot before it lets
/// the slot go and takes one again.
const PRICES_PER_SLOT: usize = 64;

/// The cores `price_many` spreads a batch over, asked once (std asks the
/// kernel and the cgroup files on every call).
fn parallelism() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}

/// A counting semaphore over the pool's slots for prices in progress.
struct Slots {
    free: Mutex<u32>,
    freed: std::sync::Condvar,
    wait: Mutex<std::time::Duration>,
}

/// One slot, given back when dropped.
pub(crate) struct Slot<'a>(&'a Slots);

impl Slots {
    fn new(count: u32) -> Slots {
        Slots {
            free: Mutex::new(count),
            freed: std::sync::Condvar::new(),
            wait: Mutex::new(std::time::Duration::from_millis(SLOT_WAIT_MS)),
        }
    }

    /// A slot, waiting at most the configured time; `Busy` past it.
    fn take(&self) -> Result<Slot<'_>, PricingError> {
        let wait = *self
            .wait
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let free = self
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (mut free, _) = self
            .freed
            .wait_timeout_while(free, wait, |free| *free == 0)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *free == 0 {
            return Err(PricingError::Busy);
        }
        *free -= 1;
        Ok(Slot(self))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self
            .0
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// The engine configuration, every option chosen here rather than inherited.
/// `slots` sizes the instance pool only; compiled code does not depend on it.
fn config(slots: u32) -> Config {
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
    pool.total_core_instances(slots);
    pool.total_memories(slots);
    pool.total_tables(slots);
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
    pool.table_keep_resident(4096);
    pool.pagemap_scan(wasmtime::Enabled::Auto);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config.memory_reservation(u64::try_from(MEMORY_BYTES_MAX).expect("fits u64"));
    config.memory_guard_size(64 * 1024);
    config
}

/// Fuel used in `store` since it was given `given`; `OutOfFuel` when none is
/// left, which means more than `FUEL_PER_CALL` was used in all (see
/// `FUEL_GIVEN`): straight-line code can run past the budget unchecked.
fn fuel_used(store: &Store<StoreState>, given: u64) -> Result<u64, PricingError> {
    match store.get_fuel().map_err(|error| trap_error(&error))? {
        0 => Err(PricingError::OutOfFuel),
        left => Ok(given - left),
    }
}

/// A new instance of `taca` in `store`; a full pool is `Busy`.
fn instantiate(taca: &Taca, store: &mut Store<StoreState>) -> Result<Instance, PricingError> {
    taca.pre.instantiate(store).map_err(|error| {
        let text = format!("{error:#}");
        if text.contains("maximum concurrent") || text.contains("pooling") && text.contains("limit")
        {
            PricingError::Busy
        } else {
            trap_error(&error)
        }
    })
}

fn trap_error(error: &wasmtime::Error) -> PricingError {
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => PricingError::OutOfFuel,
        Some(Trap::StackOverflow) => PricingError::StackOverflow,
        Some(Trap::AllocationTooLarge) => PricingError::ResourceLimit,
        Some(trap) => PricingError::Trap(trap.to_string()),
        None => {
            let text = format!("{error:#}");
            // StoreLimits' `trap_on_grow_failure` reports this way, naming
            // the memory or the table.
            if text.contains("table") && (text.contains("grow") || text.contains("limit")) {
                PricingError::TableLimit
            } else if text.contains("forcing trap when growing") || text.contains("limit") {
                PricingError::ResourceLimit
            } else {
                PricingError::Trap(text)
            }
        }
    }
}

/// Puts a reused instance back into the state right after instantiation: the
/// bytes written since instantiation (between the rewrite's marks, and where
/// the host wrote the input), the mutable globals, the marks. False when it cannot (the memory
/// grew, say): the instance is then dropped, not reused.
fn reset(warm: &mut Warm, base: &Base, host_write: Option<std::ops::Range<usize>>) -> bool {
    let mark = |global: &Global, store: &mut Store<StoreState>| global.get(store).i32();
    let (Some(low), Some(high)) = (
        mark(&warm.low, &mut warm.store),
        mark(&warm.high, &mut warm.store),
    ) else {
        return false;
    };
    let data = warm.exports.memory.data_mut(&mut warm.store);
    if data.len() != base.memory.len {
        return false;
    }
    // The marks are unsigned addresses; nothing written leaves low > high.
    let (mut low, mut high) = (low as u32 as usize, high as u32 as usize);
    if let Some(range) = host_write {
        low = low.min(range.start);
        high = high.max(range.end);
    }
    let high = high.min(data.len());
    if low < high {
        base.memory.restore(data, low..high);
    }
    for (global, value) in warm.globals.iter().zip(&base.globals) {
        if global.set(&mut warm.store, *value).is_err() {
            return false;
        }
    }
    let (low, high) = base.marks;
    warm.low.set(&mut warm.store, Val::I32(low)).is_ok()
        && warm.high.set(&mut warm.store, Val::I32(high)).is_ok()
}

/// Bitwise equality of two global values (floats compared by their bits).
fn same_value(a: &Val, b: &Val) -> bool {
    match (a, b) {
        (Val::I32(a), Val::I32(b)) => a == b,
        (Val::I64(a), Val::I64(b)) => a == b,
        (Val::F32(a), Val::F32(b)) => a == b,
        (Val::F64(a), Val::F64(b)) => a == b,
        (Val::V128(a), Val::V128(b)) => a.as_u128() == b.as_u128(),
        _ => false,
    }
}

/// What the structural reading of `bytes` finds, or the first structural
/// limit it exceeds (checked by `Pricing::load` before compiling).
pub fn structure(bytes: &[u8]) -> Result<Structure, ModuleError> {
    limits::check(bytes)
}

impl Default for Pricing {
    fn default() -> Self {
        Self::new()
    }
}

impl Pricing {
    /// A runtime with the fixed configuration.
    pub fn new() -> Pricing {
        Pricing::with_pool(
            CONCURRENT_INSTANCES_MAX + u32::try_from(WARM_INSTANCES_MAX).expect("small"),
        )
    }

    /// The same runtime with an instance pool of `slots` (each reserves
    /// `MEMORY_BYTES_MAX` of address space): small for a process that only
    /// checks one module under a memory cap (`guard`).
    pub fn with_pool(slots: u32) -> Pricing {
        let engine = Engine::new(&config(slots)).expect("the engine configuration is valid");
        // No host functions: TACAs import nothing.
        let linker = Linker::new(&engine);
        Pricing {
            engine,
            linker,
            cache: Mutex::new(HashMap::new()),
            warm_count: Arc::new(AtomicUsize::new(0)),
            slots: Slots::new(CONCURRENT_INSTANCES_MAX),
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
        // Bounded work before any compiling: a module over a structural
        // limit never reaches the compiler.
        let structure = limits::check(bytes)?;
        let compile = |bytes: &[u8]| {
            Module::from_binary(&self.engine, bytes)
                .map_err(|error| ModuleError::Invalid(format!("{error:#}")))
        };
        // The producer's module is validated and checked as uploaded; the
        // rewrite (when the module is eligible) is what runs.
        let module = compile(bytes)?;
        let mut taca = self.prepare(hash, &module)?;
        match self.rewritten(hash, bytes) {
            Ok(rewritten) => taca = rewritten,
            Err(reason) => {
                tracing::debug!(%hash, %reason, "a fresh instance per price");
                taca.fresh_because = Some(reason);
            }
        }
        taca.init_fuel = structure.init_fuel;
        let taca = Arc::new(taca);
        self.check_version(&taca)?;
        let mut cache = self.lock_cache();
        if cache.len() >= CACHED_MODULES_MAX {
            cache.clear();
        }
        cache.insert(hash, Arc::clone(&taca));
        Ok(taca)
    }

    /// The module rewritten for reuse (`track`), or why it is not.
    fn rewritten(&self, hash: TacaHash, bytes: &[u8]) -> Result<Taca, String> {
        let tracked = track::rewrite(bytes).map_err(|ineligible| ineligible.0)?;
        let module = Module::from_binary(&self.engine, &tracked.bytes)
            .map_err(|error| format!("the rewritten module does not compile: {error:#}"))?;
        let mut taca = self
            .prepare(hash, &module)
            .map_err(|error| format!("the rewritten module: {error}"))?;
        let export = |name: &str| {
            module
                .get_export_index(name)
                .ok_or_else(|| format!("the rewrite lost {name}"))
        };
        taca.reuse = Some(Reuse {
            low: export(track::LOW_EXPORT)?,
            high: export(track::HIGH_EXPORT)?,
            globals: tracked
                .globals
                .iter()
                .map(|name| export(name))
                .collect::<Result<_, _>>()?,
            base: OnceLock::new(),
            warm: Mutex::new(Vec::new()),
        });
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
            reuse: None,
            fresh_because: None,
            init_fuel: 0,
        })
    }

    /// A store with a price's limits, and `FUEL_GIVEN` less what
    /// instantiation's copies cost.
    fn store(&self, init_fuel: u64) -> Result<Store<StoreState>, PricingError> {
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
            .set_fuel(FUEL_GIVEN.saturating_sub(init_fuel))
            .map_err(|error| trap_error(&error))?;
        Ok(store)
    }

    fn check_version(&self, taca: &Taca) -> Result<(), ModuleError> {
        let _slot = self.slots.take().map_err(ModuleError::SampleFailed)?;
        let mut store = self
            .store(taca.init_fuel)
            .map_err(ModuleError::SampleFailed)?;
        // Through `instantiate`: a full pool is Busy, not the module's fault.
        let instance = instantiate(taca, &mut store).map_err(ModuleError::SampleFailed)?;
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

    /// Prices one reading, in an instance in the state it had right after
    /// instantiation: a reused one when the module allows it, else a new one.
    /// Waits (at most `SLOT_WAIT_MS`) for a slot; `Busy` past that.
    pub fn price(&self, taca: &Taca, input: &PriceInput) -> Result<Priced, PricingError> {
        let _slot = self.slots.take()?;
        let mut kept = None;
        let priced = self.price_in_slot(taca, input, &mut kept);
        self.give_back(taca, kept);
        priced
    }

    /// Prices in a slot the caller holds. `kept` is an instance of `taca`
    /// the caller kept from its last price (taken), and where this price's
    /// instance is left for its next one instead of going back to the pool:
    /// a worker pricing many readings takes the pool's lock once, not twice
    /// per reading.
    fn price_in_slot(
        &self,
        taca: &Taca,
        input: &PriceInput,
        kept: &mut Option<Warm>,
    ) -> Result<Priced, PricingError> {
        match &taca.reuse {
            Some(reuse) => self.price_reused(taca, reuse, input, kept),
            None => self.price_fresh(taca, input),
        }
    }

    /// Puts an instance a caller kept back into its module's idle pool.
    fn give_back(&self, taca: &Taca, kept: Option<Warm>) {
        if let (Some(warm), Some(reuse)) = (kept, &taca.reuse)
            && self.warm_count.load(Ordering::Relaxed) <= WARM_INSTANCES_MAX
        {
            let mut idle = reuse
                .warm
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if idle.len() < WARM_PER_MODULE_MAX {
                idle.push(warm);
            }
        }
    }

    /// Prices one reading in a new store and instance.
    pub fn price_fresh(&self, taca: &Taca, input: &PriceInput) -> Result<Priced, PricingError> {
        let bytes = input.encode()?;
        let mut store = self.store(taca.init_fuel)?;
        let instance = instantiate(taca, &mut store)?;
        let exports = Exports::of(taca, &instance, &mut store);
        exports.write_input(&mut store, &bytes)?;
        let amount = exports.price(&mut store, bytes.len())?;
        let fuel = fuel_used(&store, FUEL_GIVEN)?;
        Ok(Priced { amount, fuel })
    }

    /// Prices one reading in a reused instance of a rewritten module, then
    /// resets the instance (`reset`) and keeps it for the next price.
    fn price_reused(
        &self,
        taca: &Taca,
        reuse: &Reuse,
        input: &PriceInput,
        kept: &mut Option<Warm>,
    ) -> Result<Priced, PricingError> {
        thread_local! {
            /// The input of this thread's last price: its buffer is used
            /// again, not allocated per price.
            static INPUT: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut bytes = INPUT.take();
        bytes.clear();
        input.encode_into(&mut bytes)?;
        let idle = match kept.take() {
            Some(warm) => Some(warm),
            None => reuse
                .warm
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pop(),
        };
        let mut warm = match idle {
            Some(warm) => warm,
            None => self.warm(taca, reuse)?,
        };
        let base = reuse.base.get().expect("set by the first instance");
        // At least 1: `base.fuel` is at most `FUEL_PER_CALL`.
        let budget = FUEL_GIVEN - base.fuel;
        warm.store
            .set_fuel(budget)
            .map_err(|error| trap_error(&error))?;
        let mut host_write = None;
        let outcome = (|| {
            let written = warm.exports.write_input(&mut warm.store, &bytes)?;
            host_write = Some(written);
            let amount = warm.exports.price(&mut warm.store, bytes.len())?;
            let used = fuel_used(&warm.store, budget)?;
            Ok(Priced {
                amount,
                fuel: base.fuel + used,
            })
        })();
        // Over either budget, the instance is dropped after this one price,
        // as a fresh one would be.
        if reset(&mut warm, base, host_write)
            && self.warm_count.load(Ordering::Relaxed) <= WARM_INSTANCES_MAX
        {
            *kept = Some(warm);
        }
        INPUT.set(bytes);
        outcome
    }

    /// A new instance of a rewritten module for reuse. The first one of a
    /// module records the state after instantiation; every later one is
    /// checked against it.
    fn warm(&self, taca: &Taca, reuse: &Reuse) -> Result<Warm, PricingError> {
        if self.warm_count.load(Ordering::Relaxed) >= WARM_INSTANCES_MAX {
            self.evict_idle(taca.hash);
        }
        self.warm_count.fetch_add(1, Ordering::Relaxed);
        let count = WarmCount(Arc::clone(&self.warm_count));
        let mut store = self.store(taca.init_fuel)?;
        let instance = instantiate(taca, &mut store)?;
        // Instantiation that used more than a whole price's fuel (a start
        // function of straight-line code) fails as a fresh price would.
        let fuel = fuel_used(&store, FUEL_GIVEN)?;
        let exports = Exports::of(taca, &instance, &mut store);
        let global = |store: &mut Store<StoreState>, index: &ModuleExport| {
            instance
                .get_module_export(&mut *store, index)
                .and_then(wasmtime::Extern::into_global)
                .expect("the rewrite exports globals")
        };
        let low = global(&mut store, &reuse.low);
        let high = global(&mut store, &reuse.high);
        let globals: Vec<Global> = reuse
            .globals
            .iter()
            .map(|index| global(&mut store, index))
            .collect();
        let values: Vec<Val> = globals.iter().map(|g| g.get(&mut store)).collect();
        let marks = (
            low.get(&mut store).unwrap_i32(),
            high.get(&mut store).unwrap_i32(),
        );
        let base = reuse.base.get_or_init(|| Base {
            memory: Snapshot::of(exports.memory.data(&store)),
            globals: values.clone(),
            marks,
            fuel,
        });
        // Instantiation is deterministic; this guards the assumption.
        let same_globals = values.len() == base.globals.len()
            && values
                .iter()
                .zip(&base.globals)
                .all(|(a, b)| same_value(a, b));
        if base.fuel != fuel
            || base.marks != marks
            || !base.memory.matches(exports.memory.data(&store))
            || !same_globals
        {
            return Err(PricingError::Trap(
                "instantiation is not deterministic".into(),
            ));
        }
        Ok(Warm {
            store,
            exports,
            low,
            high,
            globals,
            _count: count,
        })
    }

    /// Drops one idle instance of a module other than `keep`, to make room.
    fn evict_idle(&self, keep: TacaHash) {
        let cache = self.lock_cache();
        for (hash, other) in cache.iter() {
            let Some(reuse) = other.reuse.as_ref().filter(|_| *hash != keep) else {
                continue;
            };
            let idle = reuse
                .warm
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pop();
            if idle.is_some() {
                return;
            }
        }
    }

    /// Instances kept for reuse right now, idle or pricing.
    pub fn kept_instances(&self) -> usize {
        self.warm_count.load(Ordering::Relaxed)
    }

    /// Prices many readings as [`price`] does, spread over the machine's
    /// cores. Results come back in the order
    /// of `jobs`; since no price depends on another, the order of work does
    /// not change them.
    ///
    /// [`price`]: Pricing::price
    pub fn price_many<T: std::borrow::Borrow<Taca> + Sync>(
        &self,
        jobs: &[(T, PriceInput)],
    ) -> Vec<Result<Priced, PricingError>> {
        self.price_each(jobs.len(), |at| {
            let (taca, input) = &jobs[at];
            (taca.borrow(), input.clone())
        })
    }

    /// Prices `count` readings as [`price_many`] does, the `at`th being
    /// what `job(at)` gives: each input is made where it is priced, so
    /// that a batch of thousands holds no list of them.
    ///
    /// [`price_many`]: Pricing::price_many
    pub fn price_each<'t>(
        &self,
        count: usize,
        job: impl Fn(usize) -> (&'t Taca, PriceInput) + Sync,
    ) -> Vec<Result<Priced, PricingError>> {
        // Once one price found every slot busy past the wait, the batch is
        // refused as a whole: the rest answer Busy at once instead of each
        // waiting its own `SLOT_WAIT_MS`.
        let busy = std::sync::atomic::AtomicBool::new(false);
        // Each worker takes one slot for its whole share and keeps its
        // instance from one price to the next while the TACA stays the same.
        let price_part = |part: std::ops::Range<usize>| -> Vec<Result<Priced, PricingError>> {
            let mut priced = Vec::with_capacity(part.len());
            let mut kept: Option<(&Taca, Warm)> = None;
            // A slot per run of prices, not per price (fewer turns of its
            // lock) nor per share (a price elsewhere waits for one run).
            let mut start = part.start;
            while start < part.end {
                let run = start..part.end.min(start + PRICES_PER_SLOT);
                start = run.end;
                let slot = if busy.load(std::sync::atomic::Ordering::Relaxed) {
                    Err(PricingError::Busy)
                } else {
                    self.slots.take()
                };
                let Ok(slot) = slot else {
                    busy.store(true, std::sync::atomic::Ordering::Relaxed);
                    priced.extend(run.map(|_| Err(PricingError::Busy)));
                    continue;
                };
                for at in run {
                    let (taca, input) = job(at);
                    let mut warm = match kept.take() {
                        Some((held, warm)) if std::ptr::eq(held, taca) => Some(warm),
                        Some((held, warm)) => {
                            self.give_back(held, Some(warm));
                            None
                        }
                        None => None,
                    };
                    priced.push(self.price_in_slot(taca, &input, &mut warm));
                    kept = warm.map(|warm| (taca, warm));
                }
                drop(slot);
            }
            if let Some((held, warm)) = kept {
                self.give_back(held, Some(warm));
            }
            priced
        };
        let price_part = &price_part;
        let threads = parallelism();
        if threads < 2 || count < PARALLEL_JOBS_MIN {
            return price_part(0..count);
        }
        let chunk = count.div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..count)
                .step_by(chunk)
                .map(|first| scope.spawn(move || price_part(first..count.min(first + chunk))))
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

    /// Takes every pricing slot until the answer is dropped, and makes a
    /// price wait `wait` for one: a pool filled by other prices (tests).
    #[cfg(test)]
    pub(crate) fn hold_every_slot(&self, wait: std::time::Duration) -> Vec<Slot<'_>> {
        *self.slots.wait.lock().unwrap() = wait;
        (0..CONCURRENT_INSTANCES_MAX)
            .map(|_| self.slots.take().unwrap())
            .collect()
    }

    /// Creates a store and an instance and drops them: the fixed cost of a
    /// price, for benchmarks.
    pub fn instantiate_only(&self, taca: &Taca) -> Result<(), PricingError> {
        let mut store = self.store(taca.init_fuel)?;
        taca.pre
            .instantiate(&mut store)
            .map_err(|error| trap_error(&error))?;
        Ok(())
    }

    /// What upload validation does: load the module and price every sample;
    /// any failure other than a refusal refuses the module. A sample that is
    /// no valid input is the caller's error, found before the module runs.
    pub fn check(
        &self,
        bytes: &[u8],
        samples: &[PriceInput],
    ) -> Result<Vec<Result<Priced, PricingError>>, CheckError> {
        for (index, sample) in samples.iter().enumerate() {
            sample.encode().map_err(|error| CheckError::BadSample {
                index: index + 1,
                error,
            })?;
        }
        let taca = self.load(bytes)?;
        let mut results = Vec::with_capacity(samples.len());
        for sample in samples {
            match self.price(&taca, sample) {
                Err(PricingError::Refused(code)) => results.push(Err(PricingError::Refused(code))),
                Err(error) => return Err(ModuleError::SampleFailed(error).into()),
                Ok(priced) => results.push(Ok(priced)),
            }
        }
        Ok(results)
    }
}
