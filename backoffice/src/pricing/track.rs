//! Write tracking: rewrites a TACA so that the runtime can put one of its
//! instances back into the exact state it had right after instantiation,
//! instead of paying for a new instance on every price (`docs/taca-abi.md`,
//! "How an instance is reused").
//!
//! Everything an instance of an eligible module can change between two calls
//! is then known to the host:
//! - memory bytes: before every store, `memory.fill` and `memory.copy`, the
//!   rewritten code widens a written range, `[low, high)`, kept in two new
//!   exported globals; the host restores that range from a copy of the memory
//!   taken after instantiation;
//! - the memory's size: `memory.grow` is left alone, and an instance whose
//!   memory grew is not reused;
//! - mutable globals: each is exported under a reserved name, so that the host
//!   can set it back.
//!
//! Modules that can change anything else (tables, dropped segments, a second
//! memory) are not eligible and keep a fresh instance per price. The rewrite
//! runs on a module wasmtime has already validated with the runtime's feature
//! set (no threads, so no atomics; one 32-bit memory).

use wasm_encoder::reencode::{self, Reencode};
use wasm_encoder::{
    BlockType, CodeSection, ConstExpr, ExportKind, ExportSection, Function, GlobalSection,
    GlobalType, Instruction, Module, SectionId, ValType,
};
use wasmparser::{Operator, Parser, Payload};

/// Export name of the lowest address written since the last reset.
pub const LOW_EXPORT: &str = "taca-runtime:written-low";
/// Export name of the end (exclusive) of the highest write since the last reset.
pub const HIGH_EXPORT: &str = "taca-runtime:written-high";
/// Prefix of the export names given to the module's mutable globals.
pub const GLOBAL_EXPORT_PREFIX: &str = "taca-runtime:global-";
/// The low mark's value when nothing was written.
pub const LOW_NONE: i32 = -1;
/// The high mark's value when nothing was written.
pub const HIGH_NONE: i32 = 0;

/// A rewritten module and the names the host needs.
#[derive(Debug)]
pub struct Tracked {
    /// The rewritten module.
    pub bytes: Vec<u8>,
    /// Export names of the module's mutable globals, in index order.
    pub globals: Vec<String>,
}

/// Why a module keeps a fresh instance per price.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("instances of this module are not reused: {0}")]
pub struct Ineligible(pub String);

impl From<wasmparser::BinaryReaderError> for Ineligible {
    fn from(error: wasmparser::BinaryReaderError) -> Self {
        Ineligible(error.to_string())
    }
}

/// What the rewrite needs to know before it starts.
struct Shape {
    /// Parameter count of each type.
    type_params: Vec<u32>,
    /// Type of each function defined in the module.
    function_types: Vec<u32>,
    /// Number of globals the module defines.
    globals: u32,
    /// Indices of its mutable globals.
    mutable: Vec<u32>,
}

fn shape(module: &[u8]) -> Result<Shape, Ineligible> {
    let mut shape = Shape {
        type_params: Vec::new(),
        function_types: Vec::new(),
        globals: 0,
        mutable: Vec::new(),
    };
    let mut memories = 0u32;
    for payload in Parser::new(0).parse_all(module) {
        match payload? {
            Payload::TypeSection(types) => {
                for group in types {
                    for sub in group?.into_types() {
                        match &sub.composite_type.inner {
                            wasmparser::CompositeInnerType::Func(func) => {
                                let params = u32::try_from(func.params().len())
                                    .map_err(|_| Ineligible("too many parameters".into()))?;
                                shape.type_params.push(params);
                            }
                            _ => return Err(Ineligible("a non-function type".into())),
                        }
                    }
                }
            }
            Payload::ImportSection(_) => return Err(Ineligible("it imports".into())),
            Payload::FunctionSection(functions) => {
                for function in functions {
                    shape.function_types.push(function?);
                }
            }
            Payload::MemorySection(section) => {
                for memory in section {
                    if memory?.memory64 {
                        return Err(Ineligible("a 64-bit memory".into()));
                    }
                    memories += 1;
                }
            }
            Payload::GlobalSection(globals) => {
                for global in globals {
                    if global?.ty.mutable {
                        shape.mutable.push(shape.globals);
                    }
                    shape.globals += 1;
                }
            }
            Payload::ExportSection(exports) => {
                for export in exports {
                    if export?.name.starts_with("taca-runtime:") {
                        return Err(Ineligible("an export named taca-runtime:".into()));
                    }
                }
            }
            Payload::CodeSectionEntry(body) => {
                let mut operators = body.get_operators_reader()?;
                while !operators.eof() {
                    if let Some(name) = changes_untracked_state(&operators.read()?) {
                        return Err(Ineligible(format!("it uses {name}")));
                    }
                }
            }
            _ => {}
        }
    }
    if memories != 1 {
        return Err(Ineligible(format!("{memories} memories")));
    }
    Ok(shape)
}

/// Operators that change state the host does not restore.
fn changes_untracked_state(operator: &Operator<'_>) -> Option<&'static str> {
    match operator {
        Operator::TableSet { .. } => Some("table.set"),
        Operator::TableGrow { .. } => Some("table.grow"),
        Operator::TableFill { .. } => Some("table.fill"),
        Operator::TableCopy { .. } => Some("table.copy"),
        Operator::TableInit { .. } => Some("table.init"),
        Operator::ElemDrop { .. } => Some("elem.drop"),
        Operator::DataDrop { .. } => Some("data.drop"),
        Operator::MemoryInit { .. } => Some("memory.init"),
        _ => None,
    }
}

/// Where the scratch locals of one function start, and the new globals.
#[derive(Clone, Copy)]
struct Scratch {
    /// The address operand.
    address: u32,
    /// The start, then the end, of the range written.
    mark: u32,
    /// The length operand of `memory.fill`/`memory.copy`.
    length: u32,
    /// Value operands, by type.
    i32: u32,
    i64: u32,
    f32: u32,
    f64: u32,
    v128: u32,
    /// The two globals.
    low: u32,
    high: u32,
}

const SCRATCH_LOCALS: [ValType; 8] = [
    ValType::I32,
    ValType::I32,
    ValType::I32,
    ValType::I32,
    ValType::I64,
    ValType::F32,
    ValType::F64,
    ValType::V128,
];

struct Rewriter {
    shape: Shape,
    /// Index of the next function body.
    function: usize,
    scratch: Option<Scratch>,
    globals_written: bool,
}

impl Rewriter {
    fn low(&self) -> u32 {
        self.shape.globals
    }

    fn high(&self) -> u32 {
        self.shape.globals + 1
    }

    fn add_marks(&mut self, globals: &mut GlobalSection) {
        let mark = GlobalType {
            val_type: ValType::I32,
            mutable: true,
            shared: false,
        };
        globals.global(mark, &ConstExpr::i32_const(LOW_NONE));
        globals.global(mark, &ConstExpr::i32_const(HIGH_NONE));
        self.globals_written = true;
    }
}

/// Position of a section in a module's required order.
fn rank(section: SectionId) -> u8 {
    match section {
        SectionId::Custom => 0,
        SectionId::Type => 1,
        SectionId::Import => 2,
        SectionId::Function => 3,
        SectionId::Table => 4,
        SectionId::Memory => 5,
        SectionId::Tag => 6,
        SectionId::Global => 7,
        SectionId::Export => 8,
        SectionId::Start => 9,
        SectionId::Element => 10,
        SectionId::DataCount => 11,
        SectionId::Code => 12,
        SectionId::Data => 13,
    }
}

/// Emits: widen `[low, high)` by `[start, start + length)`, where `start` is in
/// `scratch.mark` and `length` is pushed by `push_length`.
fn record(f: &mut Function, s: Scratch, push_length: &Instruction<'_>) {
    f.instruction(&Instruction::LocalGet(s.mark));
    f.instruction(&Instruction::GlobalGet(s.low));
    f.instruction(&Instruction::I32LtU);
    f.instruction(&Instruction::If(BlockType::Empty));
    f.instruction(&Instruction::LocalGet(s.mark));
    f.instruction(&Instruction::GlobalSet(s.low));
    f.instruction(&Instruction::End);
    f.instruction(&Instruction::LocalGet(s.mark));
    f.instruction(push_length);
    f.instruction(&Instruction::I32Add);
    f.instruction(&Instruction::LocalTee(s.mark));
    f.instruction(&Instruction::GlobalGet(s.high));
    f.instruction(&Instruction::I32GtU);
    f.instruction(&Instruction::If(BlockType::Empty));
    f.instruction(&Instruction::LocalGet(s.mark));
    f.instruction(&Instruction::GlobalSet(s.high));
    f.instruction(&Instruction::End);
}

/// For a store: its value's scratch local, its width in bytes and its offset.
fn store_shape(operator: &Operator<'_>, s: Scratch) -> Option<(u32, i32, u64)> {
    let (value, width, memarg) = match operator {
        Operator::I32Store { memarg } => (s.i32, 4, memarg),
        Operator::I32Store8 { memarg } => (s.i32, 1, memarg),
        Operator::I32Store16 { memarg } => (s.i32, 2, memarg),
        Operator::I64Store { memarg } => (s.i64, 8, memarg),
        Operator::I64Store8 { memarg } => (s.i64, 1, memarg),
        Operator::I64Store16 { memarg } => (s.i64, 2, memarg),
        Operator::I64Store32 { memarg } => (s.i64, 4, memarg),
        Operator::F32Store { memarg } => (s.f32, 4, memarg),
        Operator::F64Store { memarg } => (s.f64, 8, memarg),
        Operator::V128Store { memarg } => (s.v128, 16, memarg),
        Operator::V128Store8Lane { memarg, .. } => (s.v128, 1, memarg),
        Operator::V128Store16Lane { memarg, .. } => (s.v128, 2, memarg),
        Operator::V128Store32Lane { memarg, .. } => (s.v128, 4, memarg),
        Operator::V128Store64Lane { memarg, .. } => (s.v128, 8, memarg),
        _ => return None,
    };
    Some((value, width, memarg.offset))
}

impl Reencode for Rewriter {
    type Error = Ineligible;

    fn parse_global_section(
        &mut self,
        globals: &mut GlobalSection,
        section: wasmparser::GlobalSectionReader<'_>,
    ) -> Result<(), reencode::Error<Ineligible>> {
        reencode::utils::parse_global_section(self, globals, section)?;
        self.add_marks(globals);
        Ok(())
    }

    fn intersperse_section_hook(
        &mut self,
        module: &mut Module,
        _after: Option<SectionId>,
        before: Option<SectionId>,
    ) -> Result<(), reencode::Error<Ineligible>> {
        // A module without globals gets a section holding only the marks.
        let past_globals = before.is_none_or(|next| rank(next) > rank(SectionId::Global));
        if !self.globals_written && past_globals {
            let mut globals = GlobalSection::new();
            self.add_marks(&mut globals);
            module.section(&globals);
        }
        Ok(())
    }

    fn parse_export_section(
        &mut self,
        exports: &mut ExportSection,
        section: wasmparser::ExportSectionReader<'_>,
    ) -> Result<(), reencode::Error<Ineligible>> {
        reencode::utils::parse_export_section(self, exports, section)?;
        exports.export(LOW_EXPORT, ExportKind::Global, self.low());
        exports.export(HIGH_EXPORT, ExportKind::Global, self.high());
        for &global in &self.shape.mutable {
            exports.export(
                &format!("{GLOBAL_EXPORT_PREFIX}{global}"),
                ExportKind::Global,
                global,
            );
        }
        Ok(())
    }

    fn new_function_with_parsed_locals(
        &mut self,
        body: &wasmparser::FunctionBody<'_>,
    ) -> Result<Function, reencode::Error<Ineligible>> {
        let missing = || reencode::Error::UserError(Ineligible("a body without a type".into()));
        let type_index = *self
            .shape
            .function_types
            .get(self.function)
            .ok_or_else(missing)?;
        let params = *self
            .shape
            .type_params
            .get(type_index as usize)
            .ok_or_else(missing)?;
        self.function += 1;
        let mut locals = Vec::new();
        let mut count = params;
        for pair in body.get_locals_reader()? {
            let (n, ty) = pair?;
            count = count
                .checked_add(n)
                .ok_or_else(|| reencode::Error::UserError(Ineligible("too many locals".into())))?;
            locals.push((n, self.val_type(ty)?));
        }
        let base = count;
        locals.extend(SCRATCH_LOCALS.iter().map(|&ty| (1, ty)));
        self.scratch = Some(Scratch {
            address: base,
            mark: base + 1,
            length: base + 2,
            i32: base + 3,
            i64: base + 4,
            f32: base + 5,
            f64: base + 6,
            v128: base + 7,
            low: self.low(),
            high: self.high(),
        });
        Ok(Function::new(locals))
    }

    fn parse_function_body(
        &mut self,
        code: &mut CodeSection,
        body: wasmparser::FunctionBody<'_>,
    ) -> Result<(), reencode::Error<Ineligible>> {
        let mut f = self.new_function_with_parsed_locals(&body)?;
        let s = self
            .scratch
            .expect("set by new_function_with_parsed_locals");
        let mut operators = body.get_operators_reader()?;
        while !operators.eof() {
            let operator = operators.read()?;
            if let Some((value, width, offset)) = store_shape(&operator, s) {
                // [address, value] -> remember both, mark, then store. The
                // start wraps like i32.add; a store whose address does wrap
                // traps before writing, so its mark only restores more.
                let offset = u32::try_from(offset).map_err(|_| {
                    reencode::Error::UserError(Ineligible("a 64-bit offset".into()))
                })?;
                f.instruction(&Instruction::LocalSet(value));
                f.instruction(&Instruction::LocalTee(s.address));
                f.instruction(&Instruction::I32Const(offset.cast_signed()));
                f.instruction(&Instruction::I32Add);
                f.instruction(&Instruction::LocalSet(s.mark));
                record(&mut f, s, &Instruction::I32Const(width));
                f.instruction(&Instruction::LocalGet(s.address));
                f.instruction(&Instruction::LocalGet(value));
            } else if matches!(
                operator,
                Operator::MemoryFill { .. } | Operator::MemoryCopy { .. }
            ) {
                // [destination, value or source, length]
                f.instruction(&Instruction::LocalSet(s.length));
                f.instruction(&Instruction::LocalSet(s.i32));
                f.instruction(&Instruction::LocalTee(s.address));
                f.instruction(&Instruction::LocalSet(s.mark));
                record(&mut f, s, &Instruction::LocalGet(s.length));
                f.instruction(&Instruction::LocalGet(s.address));
                f.instruction(&Instruction::LocalGet(s.i32));
                f.instruction(&Instruction::LocalGet(s.length));
            }
            f.instruction(&self.instruction(operator)?);
        }
        code.function(&f);
        Ok(())
    }
}

/// Rewrites `module` for reuse, or says why its instances cannot be reused.
pub fn rewrite(module: &[u8]) -> Result<Tracked, Ineligible> {
    let shape = shape(module)?;
    let globals = shape
        .mutable
        .iter()
        .map(|global| format!("{GLOBAL_EXPORT_PREFIX}{global}"))
        .collect();
    let mut rewriter = Rewriter {
        shape,
        function: 0,
        scratch: None,
        globals_written: false,
    };
    let mut out = Module::new();
    rewriter
        .parse_core_module(&mut out, Parser::new(0), module)
        .map_err(|error| match error {
            reencode::Error::UserError(ineligible) => ineligible,
            other => Ineligible(format!("{other:?}")),
        })?;
    Ok(Tracked {
        bytes: out.finish(),
        globals,
    })
}
