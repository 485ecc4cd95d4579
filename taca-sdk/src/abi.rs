//! The ABI glue (`docs/taca-abi.md`): the input area and the exports that the
//! `taca!` macro generates. The only module of the SDK with `unsafe`.
#![allow(unsafe_code)]

use core::cell::UnsafeCell;

use crate::{Input, Outcome, Refusal, decode, encode_outcome};

/// The ABI version this SDK implements.
pub const ABI_VERSION: i32 = 1;
/// Size of the input area in bytes.
pub const INPUT_BYTES_MAX: usize = 1024;

/// The input area the host writes into.
#[repr(C, align(8))]
pub struct InputArea(UnsafeCell<[u8; INPUT_BYTES_MAX]>);

// A wasm module instance is single-threaded and the host writes the area only
// between calls, so sharing it is sound.
unsafe impl Sync for InputArea {}

/// The one input area of this module.
pub static INPUT: InputArea = InputArea(UnsafeCell::new([0; INPUT_BYTES_MAX]));

/// The address of the input area, as `taca_input` returns it.
pub fn input_address() -> i32 {
    // Addresses in wasm32 linear memory fit in an i32.
    INPUT.0.get() as usize as i32
}

/// Runs `price` on the first `length` bytes of the input area.
pub fn price_input(length: i32, price: fn(&Input<'_>) -> Outcome) -> i64 {
    let Ok(length) = usize::try_from(length) else {
        return encode_outcome(Err(Refusal::BAD_INPUT));
    };
    if length > INPUT_BYTES_MAX {
        return encode_outcome(Err(Refusal::BAD_INPUT));
    }
    // SAFETY: the host wrote the area before this call and does not touch it
    // during it; nothing in the module writes it.
    let area: &[u8; INPUT_BYTES_MAX] = unsafe { &*INPUT.0.get() };
    let bytes = &area[..length];
    encode_outcome(decode(bytes).and_then(|input| price(&input)))
}

/// Generates the ABI exports for a pricing function `fn(&Input) -> Outcome`.
#[macro_export]
macro_rules! taca {
    ($price:path) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn taca_abi_version() -> i32 {
            $crate::abi::ABI_VERSION
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn taca_input() -> i32 {
            $crate::abi::input_address()
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn taca_price(length: i32) -> i64 {
            $crate::abi::price_input(length, $price)
        }
    };
}

/// A panic traps the module: the backoffice reports the reading as trapped.
#[cfg(all(target_arch = "wasm32", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}
