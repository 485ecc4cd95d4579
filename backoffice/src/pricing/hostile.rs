//! Hostile modules just inside the structural limits (`limits`), the worst
//! shapes for the compiler we know of: for the tests and for measuring the
//! worst case of one check (`docs/taca-abi.md`, "Bounds"). Each is a valid
//! TACA (it prices everything at 0) with extra functions that are compiled
//! and never called.

use wasm_encoder::{
    BlockType, CodeSection, ExportKind, ExportSection, Function, FunctionSection, Instruction,
    MemArg, MemorySection, MemoryType, Module, TypeSection, ValType,
};

use super::limits::{
    CODE_BYTES_MAX, FUNCTION_BODY_BYTES_MAX, FUNCTIONS_MAX, LOCALS_MAX, LOOPS_MAX,
    NESTING_DEPTH_MAX,
};

/// Room left in each body for its header and the code section's header.
const SLACK: usize = 64;

/// A TACA whose extra functions (type `() -> ()`, or `() -> i32` when
/// `returns`) are `bodies`.
fn taca(bodies: &[Function], returns: bool) -> Vec<u8> {
    let mut types = TypeSection::new();
    types.ty().function([], [ValType::I32]);
    types.ty().function([ValType::I32], [ValType::I64]);
    types.ty().function([], []);
    let extra = if returns { 0 } else { 2 };
    let mut functions = FunctionSection::new();
    functions.function(0).function(0).function(1);
    for _ in bodies {
        functions.function(extra);
    }
    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: 1,
        maximum: Some(1),
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    let mut exports = ExportSection::new();
    exports.export("memory", ExportKind::Memory, 0);
    exports.export("taca_abi_version", ExportKind::Func, 0);
    exports.export("taca_input", ExportKind::Func, 1);
    exports.export("taca_price", ExportKind::Func, 2);
    let mut code = CodeSection::new();
    let constant = |instruction: Instruction<'_>| {
        let mut body = Function::new([]);
        body.instruction(&instruction)
            .instruction(&Instruction::End);
        body
    };
    code.function(&constant(Instruction::I32Const(1)));
    code.function(&constant(Instruction::I32Const(0)));
    code.function(&constant(Instruction::I64Const(0)));
    for body in bodies {
        code.function(body);
    }
    let mut module = Module::new();
    module
        .section(&types)
        .section(&functions)
        .section(&memories)
        .section(&exports)
        .section(&code);
    module.finish()
}

/// How many bodies of `body_bytes` fit in the code limits.
fn bodies_that_fit(body_bytes: usize) -> usize {
    (CODE_BYTES_MAX.saturating_sub(SLACK) / (body_bytes + 4))
        .min(FUNCTIONS_MAX as usize - 3)
        .max(1)
}

/// `LOOPS_MAX` loops in every function, nested `NESTING_DEPTH_MAX` deep, in
/// as many functions as the code may hold (the shape of issue 14's 340,000
/// nested loops, cut to the limits).
pub fn nested_loops() -> Vec<u8> {
    let depth = NESTING_DEPTH_MAX as usize;
    let mut body = Function::new([]);
    let mut left = LOOPS_MAX as usize;
    while left > 0 {
        let nest = depth.min(left);
        for _ in 0..nest {
            body.instruction(&Instruction::Loop(BlockType::Empty));
        }
        for _ in 0..nest {
            body.instruction(&Instruction::End);
        }
        left -= nest;
    }
    body.instruction(&Instruction::End);
    let count = bodies_that_fit(body.byte_len());
    taca(&vec![body; count], false)
}

/// `LOOPS_MAX` loops in every function where each level branches back to
/// an enclosing one (`br_if`): many edges between nested loops.
pub fn branching_loops() -> Vec<u8> {
    let depth = NESTING_DEPTH_MAX as usize;
    let mut body = Function::new([(1, ValType::I32)]);
    let mut left = LOOPS_MAX as usize;
    while left > 0 {
        let nest = depth.min(left);
        for level in 0..nest {
            body.instruction(&Instruction::Loop(BlockType::Empty));
            body.instruction(&Instruction::LocalGet(0));
            body.instruction(&Instruction::BrIf(u32::try_from(level / 2).expect("small")));
        }
        for _ in 0..nest {
            body.instruction(&Instruction::End);
        }
        left -= nest;
    }
    body.instruction(&Instruction::End);
    let count = bodies_that_fit(body.byte_len());
    taca(&vec![body; count], false)
}

/// `FUNCTIONS_MAX` functions, each calling the next (issue 14's 95,000
/// chained functions, cut to the limit).
pub fn chained_calls() -> Vec<u8> {
    let first = 3u32;
    let count = FUNCTIONS_MAX - first;
    let bodies: Vec<Function> = (0..count)
        .map(|index| {
            let mut body = Function::new([]);
            if index + 1 < count {
                body.instruction(&Instruction::Call(first + index + 1));
            }
            body.instruction(&Instruction::End);
            body
        })
        .collect();
    taca(&bodies, false)
}

/// Functions with `LOCALS_MAX` locals, all live at once: each is read onto
/// the stack, then they are summed (register pressure and spills).
pub fn crowded_locals() -> Vec<u8> {
    let locals = LOCALS_MAX;
    let mut body = Function::new([(locals, ValType::I32)]);
    'fill: loop {
        for local in 0..locals {
            body.instruction(&Instruction::LocalGet(local));
        }
        for _ in 1..locals {
            body.instruction(&Instruction::I32Add);
        }
        body.instruction(&Instruction::LocalSet(0));
        if body.byte_len() + 4 * locals as usize > FUNCTION_BODY_BYTES_MAX - SLACK {
            break 'fill;
        }
    }
    body.instruction(&Instruction::LocalGet(0));
    body.instruction(&Instruction::End);
    let count = bodies_that_fit(body.byte_len());
    taca(&vec![body; count], true)
}

/// Straight-line stores filling bodies of almost `FUNCTION_BODY_BYTES_MAX`:
/// the write-tracking rewrite adds about twenty instructions to each.
pub fn stores() -> Vec<u8> {
    let mut body = Function::new([]);
    let memarg = MemArg {
        offset: 0,
        align: 2,
        memory_index: 0,
    };
    while body.byte_len() + 16 < FUNCTION_BODY_BYTES_MAX - SLACK {
        body.instruction(&Instruction::I32Const(64));
        body.instruction(&Instruction::I32Const(7));
        body.instruction(&Instruction::I32Store(memarg));
    }
    body.instruction(&Instruction::End);
    let count = bodies_that_fit(body.byte_len());
    taca(&vec![body; count], false)
}

/// Every hostile shape, by name.
pub fn all() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("nested_loops", nested_loops()),
        ("branching_loops", branching_loops()),
        ("chained_calls", chained_calls()),
        ("crowded_locals", crowded_locals()),
        ("stores", stores()),
    ]
}
