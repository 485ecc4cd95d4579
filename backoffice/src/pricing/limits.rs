//! The structural limits a module meets before it is compiled (issue 14,
//! item 7): module size alone let a 1 MiB module of 340,000 nested loops
//! keep a core busy for two minutes and take 3.3 GB while compiling. Each
//! limit below is checked by reading the module with `wasmparser`, which is
//! linear in its size and allocates next to nothing, so a module over a
//! limit is refused before any compiler work. Together they bound what one
//! compile can cost (`docs/taca-abi.md`, "Bounds", has the measured worst
//! case).
//!
//! The same reading counts the items of active element segments, which
//! instantiation copies into the table and every price is charged in fuel
//! (wasmtime charges active data segments itself, about one unit a byte).

use wasmparser::{ElementItems, ElementKind, Operator, Parser, Payload};

use super::ModuleError;

/// Most functions a module may define.
pub const FUNCTIONS_MAX: u32 = 2_000;
/// Largest function body, in bytes (locals and code).
pub const FUNCTION_BODY_BYTES_MAX: usize = 32 * 1024;
/// Most bytes of all function bodies together. Straight-line stores (which
/// the write-tracking rewrite makes about twenty instructions each) compile
/// at about 12 ms a KiB: the costliest code per byte we measured.
pub const CODE_BYTES_MAX: usize = 128 * 1024;
/// Most loops in one function: compiling costs the square of a function's
/// loops (21,760 loops in one 64 KiB function took 33 s, whatever their
/// nesting; 1,360 took 0.1 s).
pub const LOOPS_MAX: u32 = 500;
/// Deepest nesting of `block`, `loop`, `if` and `try_table` in a function.
pub const NESTING_DEPTH_MAX: u32 = 256;
/// Most locals a function may declare (its parameters not counted).
pub const LOCALS_MAX: u32 = 2_000;

/// What the structural reading found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Structure {
    /// Functions defined.
    pub functions: u32,
    /// Bytes of all function bodies.
    pub code_bytes: usize,
    /// Fuel charged for instantiation's table copies: one unit per item of
    /// every active element segment, what `table.init` costs when the code
    /// runs it. (wasmtime itself charges active data segments, one unit a
    /// byte, as `memory.init` costs.)
    pub init_fuel: u64,
}

fn over(limit: &'static str, what: String, seen: u64, max: u64) -> ModuleError {
    ModuleError::OverLimit {
        limit,
        what,
        seen,
        max,
    }
}

fn invalid(error: wasmparser::BinaryReaderError) -> ModuleError {
    ModuleError::Invalid(error.to_string())
}

/// Reads `bytes` and checks every structural limit; what it found, or the
/// first limit exceeded (naming it and the value seen).
pub fn check(bytes: &[u8]) -> Result<Structure, ModuleError> {
    let mut found = Structure::default();
    let mut imported_functions = 0u32;
    let mut index = 0u32;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(invalid)? {
            Payload::ImportSection(reader) => {
                // Refused later as imports; counted so that the numbers in
                // messages are the module's function indices.
                for import in reader.into_imports() {
                    if matches!(import.map_err(invalid)?.ty, wasmparser::TypeRef::Func(_)) {
                        imported_functions += 1;
                    }
                }
            }
            Payload::FunctionSection(reader) => {
                if reader.count() > FUNCTIONS_MAX {
                    return Err(over(
                        "FUNCTIONS_MAX",
                        "functions defined".into(),
                        reader.count().into(),
                        FUNCTIONS_MAX.into(),
                    ));
                }
                found.functions = reader.count();
            }
            Payload::CodeSectionStart { count, size, .. } => {
                if count > FUNCTIONS_MAX {
                    return Err(over(
                        "FUNCTIONS_MAX",
                        "function bodies".into(),
                        count.into(),
                        FUNCTIONS_MAX.into(),
                    ));
                }
                let size = size as usize;
                if size > CODE_BYTES_MAX {
                    return Err(over(
                        "CODE_BYTES_MAX",
                        "bytes of code (all function bodies)".into(),
                        size as u64,
                        CODE_BYTES_MAX as u64,
                    ));
                }
                found.code_bytes = size;
            }
            Payload::CodeSectionEntry(body) => {
                check_body(&body, imported_functions + index)?;
                index += 1;
            }
            Payload::ElementSection(reader) => {
                for element in reader {
                    let element = element.map_err(invalid)?;
                    if matches!(element.kind, ElementKind::Active { .. }) {
                        let items = match element.items {
                            ElementItems::Functions(items) => items.count(),
                            ElementItems::Expressions(_, items) => items.count(),
                        };
                        found.init_fuel += u64::from(items);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

/// One function body against the per-function limits.
fn check_body(body: &wasmparser::FunctionBody<'_>, function: u32) -> Result<(), ModuleError> {
    let bytes = body.range().len();
    if bytes > FUNCTION_BODY_BYTES_MAX {
        return Err(over(
            "FUNCTION_BODY_BYTES_MAX",
            format!("bytes in the body of function {function}"),
            bytes as u64,
            FUNCTION_BODY_BYTES_MAX as u64,
        ));
    }
    let mut locals = 0u64;
    let mut reader = body.get_locals_reader().map_err(invalid)?;
    for _ in 0..reader.get_count() {
        let (count, _) = reader.read().map_err(invalid)?;
        locals += u64::from(count);
        if locals > u64::from(LOCALS_MAX) {
            return Err(over(
                "LOCALS_MAX",
                format!("locals declared in function {function} (or more)"),
                locals,
                LOCALS_MAX.into(),
            ));
        }
    }
    let mut operators = wasmparser::OperatorsReader::new(reader.get_binary_reader());
    let mut depth = 0u32;
    let mut loops = 0u32;
    while !operators.eof() {
        let operator = operators.read().map_err(invalid)?;
        if matches!(operator, Operator::Loop { .. }) {
            loops += 1;
            if loops > LOOPS_MAX {
                return Err(over(
                    "LOOPS_MAX",
                    format!("loops in function {function} (or more)"),
                    loops.into(),
                    LOOPS_MAX.into(),
                ));
            }
        }
        match operator {
            Operator::Block { .. }
            | Operator::Loop { .. }
            | Operator::If { .. }
            | Operator::TryTable { .. } => {
                depth += 1;
                if depth > NESTING_DEPTH_MAX {
                    return Err(over(
                        "NESTING_DEPTH_MAX",
                        format!("nested blocks, loops and ifs in function {function} (or more)"),
                        depth.into(),
                        NESTING_DEPTH_MAX.into(),
                    ));
                }
            }
            Operator::End => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}
