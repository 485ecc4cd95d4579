//! libmeter: the meter's client library for C (`include/meter.h`) and every
//! language that calls C. Each function wraps one call of
//! `meterd::client::Meter`, so C programs get the Rust client's behaviour:
//! one kept-alive connection per handle, a reconnect after the meter
//! restarts, the socket owner check, and `query` failing closed.
//!
//! Every exported function checks its pointers, never unwinds into C (a
//! panic becomes `METER_ERR_INTERNAL`), and keeps the outcome of its call
//! in the handle for `meter_last_status`, `meter_fault_code` and
//! `meter_last_error`.

// The one crate of the workspace that must dereference pointers C gives it.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};

use meterd::client::{ClientError, Meter};
use proto::{Cid, Context, Pid};

/// The call succeeded (or answered "no").
pub const METER_OK: c_int = 0;
/// A NULL handle, or a text that is not UTF-8 or not a valid id.
pub const METER_ERR_ARGUMENT: c_int = -1;
/// No meter answered at the socket.
pub const METER_ERR_UNAVAILABLE: c_int = -2;
/// The socket's owner is not trusted; nothing was sent.
pub const METER_ERR_UNTRUSTED: c_int = -3;
/// The meter's answer was not a valid answer.
pub const METER_ERR_PROTOCOL: c_int = -4;
/// The meter refused the call (`meter_fault_code`).
pub const METER_ERR_FAULT: c_int = -5;
/// The library failed inside.
pub const METER_ERR_INTERNAL: c_int = -6;

/// A handle: the Rust client and the outcome of its last call.
pub struct MeterHandle {
    meter: Meter,
    status: c_int,
    fault: c_int,
    error: CString,
}

impl MeterHandle {
    fn succeeded(&mut self) {
        self.status = METER_OK;
        self.fault = 0;
        self.error = CString::default();
    }

    fn failed(&mut self, status: c_int, fault: c_int, message: &str) -> c_int {
        self.status = status;
        self.fault = fault;
        // A message never holds a NUL; if one did, C would see it cut there.
        let cut = message.split('\0').next().unwrap_or_default();
        self.error = CString::new(cut).unwrap_or_default();
        status
    }

    fn client_error(&mut self, error: &ClientError) -> c_int {
        let (status, fault) = match error {
            ClientError::Unavailable { .. } => (METER_ERR_UNAVAILABLE, 0),
            ClientError::Untrusted(_) => (METER_ERR_UNTRUSTED, 0),
            ClientError::Protocol(_) => (METER_ERR_PROTOCOL, 0),
            ClientError::Fault(fault) => (METER_ERR_FAULT, fault.code),
        };
        self.failed(status, fault, &error.to_string())
    }

    /// The outcome of a call answering nothing, as a status.
    fn done(&mut self, outcome: Result<(), ClientError>) -> c_int {
        match outcome {
            Ok(()) => {
                self.succeeded();
                METER_OK
            }
            Err(error) => self.client_error(&error),
        }
    }

    /// The outcome of a call answering yes or no: 1, 0 or an error.
    fn answered(&mut self, outcome: Result<bool, ClientError>) -> c_int {
        match outcome {
            Ok(answer) => {
                self.succeeded();
                c_int::from(answer)
            }
            Err(error) => self.client_error(&error),
        }
    }
}

/// The text at `text`, or why it is not UTF-8 (`what` names it).
///
/// # Safety
/// `text` is NULL or points to a NUL-terminated string.
unsafe fn text<'a>(text: *const c_char, what: &str) -> Result<&'a str, String> {
    if text.is_null() {
        return Err(format!("the {what} is NULL"));
    }
    // SAFETY: not NULL, and the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(text) }
        .to_str()
        .map_err(|_| format!("the {what} is not UTF-8"))
}

/// Runs `work` on the handle at `m`, turning a NULL handle into
/// `METER_ERR_ARGUMENT` and a panic into `METER_ERR_INTERNAL`.
///
/// # Safety
/// `m` is NULL or a handle from `meter_connect` not yet freed, used by
/// one thread at a time.
unsafe fn with_handle(m: *mut MeterHandle, work: impl FnOnce(&mut MeterHandle) -> c_int) -> c_int {
    // SAFETY: the caller promises a live handle or NULL.
    let Some(handle) = (unsafe { m.as_mut() }) else {
        return METER_ERR_ARGUMENT;
    };
    match catch_unwind(AssertUnwindSafe(|| work(&mut *handle))) {
        Ok(status) => status,
        Err(_) => {
            // The call may have stopped between its request and its answer:
            // a new connection, so that no later call reads that answer.
            handle.meter.disconnect();
            handle.failed(METER_ERR_INTERNAL, 0, "the meter library failed inside")
        }
    }
}

/// Parses the id at `text` with `parse`, or records why not.
///
/// # Safety
/// As `text`.
unsafe fn id<T>(
    handle: &mut MeterHandle,
    raw: *const c_char,
    what: &str,
    parse: impl FnOnce(&str) -> Result<T, proto::IdError>,
) -> Result<T, c_int> {
    // SAFETY: passed on from the caller.
    let parsed =
        unsafe { text(raw, what) }.and_then(|text| parse(text).map_err(|error| error.to_string()));
    parsed.map_err(|message| handle.failed(METER_ERR_ARGUMENT, 0, &message))
}

/// Runs `call` on the handle at `m` with the id at `raw` parsed by
/// `parse`, or answers why it could not be.
///
/// # Safety
/// As `with_handle` and `text`.
unsafe fn with_id<T>(
    m: *mut MeterHandle,
    raw: *const c_char,
    what: &str,
    parse: impl FnOnce(&str) -> Result<T, proto::IdError>,
    call: impl FnOnce(&mut MeterHandle, T) -> c_int,
) -> c_int {
    // SAFETY: passed on from the caller.
    unsafe {
        with_handle(m, |handle| match id(handle, raw, what, parse) {
            Ok(parsed) => call(handle, parsed),
            Err(status) => status,
        })
    }
}

/// See `meter.h`.
///
/// # Safety
/// `socket_path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_connect(socket_path: *const c_char) -> *mut MeterHandle {
    let meter = if socket_path.is_null() {
        catch_unwind(Meter::connect_default)
    } else {
        // SAFETY: not NULL, NUL-terminated as the caller promises.
        match unsafe { text(socket_path, "socket path") } {
            Ok(path) => catch_unwind(|| Meter::connect(path)),
            Err(_) => return std::ptr::null_mut(),
        }
    };
    match meter {
        Ok(meter) => Box::into_raw(Box::new(MeterHandle {
            meter,
            status: METER_OK,
            fault: 0,
            error: CString::default(),
        })),
        Err(_) => std::ptr::null_mut(),
    }
}

/// See `meter.h`.
///
/// # Safety
/// `m` is NULL or a handle from `meter_connect`, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_free(m: *mut MeterHandle) {
    if !m.is_null() {
        // SAFETY: made by `Box::into_raw` in `meter_connect`, freed once.
        drop(unsafe { Box::from_raw(m) });
    }
}

/// See `meter.h`.
///
/// # Safety
/// `m` as `with_handle`; `context` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_set_context(m: *mut MeterHandle, context: *const c_char) -> c_int {
    // SAFETY: passed on from the caller.
    unsafe {
        with_handle(m, |handle| {
            if context.is_null() {
                handle.meter.set_context(None);
                handle.succeeded();
                return METER_OK;
            }
            match id(handle, context, "context", Context::parse) {
                Ok(context) => {
                    handle.meter.set_context(Some(context));
                    handle.succeeded();
                    METER_OK
                }
                Err(status) => status,
            }
        })
    }
}

/// See `meter.h`.
///
/// # Safety
/// `m` as `with_handle`; `cid` a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_login(m: *mut MeterHandle, cid: *const c_char) -> c_int {
    // SAFETY: passed on from the caller.
    unsafe {
        with_id(m, cid, "CID", Cid::parse, |handle, cid| {
            let outcome = handle.meter.login(cid);
            handle.done(outcome)
        })
    }
}

/// See `meter.h`.
///
/// # Safety
/// `m` as `with_handle`; `cid` a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_logout(m: *mut MeterHandle, cid: *const c_char) -> c_int {
    // SAFETY: passed on from the caller.
    unsafe {
        with_id(m, cid, "CID", Cid::parse, |handle, cid| {
            let outcome = handle.meter.logout(cid);
            handle.answered(outcome)
        })
    }
}

/// See `meter.h`: 1 only when the meter said yes.
///
/// # Safety
/// `m` as `with_handle`; `pid` a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_query(m: *mut MeterHandle, pid: *const c_char) -> c_int {
    // SAFETY: passed on from the caller.
    let answer = unsafe {
        with_id(m, pid, "PID", Pid::parse, |handle, pid| {
            let outcome = handle.meter.try_query(pid);
            handle.answered(outcome)
        })
    };
    // Fail closed: an error is a no.
    c_int::from(answer == 1)
}

/// See `meter.h`.
///
/// # Safety
/// `m` as `with_handle`; `pid` a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_commit(m: *mut MeterHandle, pid: *const c_char) -> c_int {
    // SAFETY: passed on from the caller.
    unsafe {
        with_id(m, pid, "PID", Pid::parse, |handle, pid| {
            let outcome = handle.meter.commit(pid);
            handle.done(outcome)
        })
    }
}

/// See `meter.h`.
///
/// # Safety
/// `m` as `with_handle`; `pid` a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_cancel(m: *mut MeterHandle, pid: *const c_char) -> c_int {
    // SAFETY: passed on from the caller.
    unsafe {
        with_id(m, pid, "PID", Pid::parse, |handle, pid| {
            let outcome = handle.meter.cancel(pid);
            handle.answered(outcome)
        })
    }
}

/// See `meter.h`.
///
/// # Safety
/// `m` as `with_handle`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_flush(m: *mut MeterHandle) -> c_int {
    // SAFETY: passed on from the caller.
    unsafe {
        with_handle(m, |handle| {
            let outcome = handle.meter.flush();
            handle.answered(outcome)
        })
    }
}

/// See `meter.h`.
///
/// # Safety
/// `m` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_last_status(m: *const MeterHandle) -> c_int {
    // SAFETY: the caller promises a live handle or NULL.
    unsafe { m.as_ref() }.map_or(METER_ERR_ARGUMENT, |handle| handle.status)
}

/// See `meter.h`.
///
/// # Safety
/// `m` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_fault_code(m: *const MeterHandle) -> c_int {
    // SAFETY: the caller promises a live handle or NULL.
    unsafe { m.as_ref() }.map_or(0, |handle| handle.fault)
}

/// See `meter.h`.
///
/// # Safety
/// `m` is NULL or a live handle; the text lives until its next call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meter_last_error(m: *const MeterHandle) -> *const c_char {
    static NULL_HANDLE: &CStr = c"the meter handle is NULL";
    // SAFETY: the caller promises a live handle or NULL.
    match unsafe { m.as_ref() } {
        Some(handle) => handle.error.as_ptr(),
        None => NULL_HANDLE.as_ptr(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes in `meter.h` are the ones the library returns.
    #[test]
    fn the_header_defines_the_codes_the_library_returns() {
        let header = include_str!("../include/meter.h");
        let defined = |name: &str| -> c_int {
            let line = header
                .lines()
                .find(|line| line.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("meter.h defines {name}"));
            line.rsplit(' ')
                .next()
                .unwrap()
                .trim_matches(|c| c == '(' || c == ')')
                .parse()
                .unwrap()
        };
        for (name, value) in [
            ("METER_OK", METER_OK),
            ("METER_ERR_ARGUMENT", METER_ERR_ARGUMENT),
            ("METER_ERR_UNAVAILABLE", METER_ERR_UNAVAILABLE),
            ("METER_ERR_UNTRUSTED", METER_ERR_UNTRUSTED),
            ("METER_ERR_PROTOCOL", METER_ERR_PROTOCOL),
            ("METER_ERR_FAULT", METER_ERR_FAULT),
            ("METER_ERR_INTERNAL", METER_ERR_INTERNAL),
        ] {
            assert_eq!(defined(name), value, "{name}");
        }
        // Every function the library exports is declared, and no other.
        let source = include_str!("lib.rs");
        let exported: Vec<&str> = source
            .split("pub unsafe extern \"C\" fn ")
            .skip(1)
            .map(|rest| rest.split('(').next().unwrap())
            .collect();
        assert_eq!(exported.len(), 12);
        // Declarations: lines of code (not comments) ending a prototype.
        let declarations: Vec<&str> = header
            .lines()
            .filter(|line| !line.starts_with([' ', '/', '*', '#']) && line.ends_with(");"))
            .collect();
        for name in &exported {
            assert!(
                declarations
                    .iter()
                    .any(|line| line.contains(&format!("{name}("))),
                "meter.h declares {name}"
            );
        }
        assert_eq!(
            declarations.len(),
            exported.len(),
            "meter.h declares only what is exported: {declarations:?}"
        );
    }

    #[test]
    fn bad_arguments_and_a_missing_meter_are_errors_and_query_fails_closed() {
        let dir = std::env::temp_dir().join(format!("meter-c-test-{}", std::process::id()));
        let path = CString::new(dir.join("no.sock").display().to_string()).unwrap();
        // SAFETY: valid strings, a handle used by this thread and freed once.
        unsafe {
            let m = meter_connect(path.as_ptr());
            assert!(!m.is_null());
            assert_eq!(meter_login(m, c"not a cid".as_ptr()), METER_ERR_ARGUMENT);
            let said = CStr::from_ptr(meter_last_error(m)).to_str().unwrap();
            assert!(said.contains("CID"), "{said}");
            assert_eq!(meter_commit(m, std::ptr::null()), METER_ERR_ARGUMENT);
            assert_eq!(meter_query(m, c"B1-P7".as_ptr()), 0);
            assert_eq!(meter_last_status(m), METER_ERR_UNAVAILABLE);
            let said = CStr::from_ptr(meter_last_error(m)).to_str().unwrap();
            assert!(said.contains("no meter at"), "{said}");
            assert_eq!(meter_set_context(m, c"thread:1".as_ptr()), METER_OK);
            assert_eq!(meter_last_error(m).read(), 0, "empty after a success");
            assert_eq!(meter_set_context(m, c"a b".as_ptr()), METER_ERR_ARGUMENT);
            assert_eq!(meter_flush(m), METER_ERR_UNAVAILABLE);
            assert_eq!(meter_fault_code(m), 0);
            meter_free(m);
            assert_eq!(meter_flush(std::ptr::null_mut()), METER_ERR_ARGUMENT);
            assert_eq!(meter_query(std::ptr::null_mut(), c"B1-P7".as_ptr()), 0);
            assert_eq!(meter_last_status(std::ptr::null()), METER_ERR_ARGUMENT);
            assert!(!meter_last_error(std::ptr::null()).is_null());
            meter_free(std::ptr::null_mut());
        }
    }
}
