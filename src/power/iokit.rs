//! IOKit's power assertions. Compiled only for Apple targets (scripts/check-apple
//! type-checks it), written against `<IOKit/pwr_mgt/IOPMLib.h>` and
//! `<CoreFoundation/CFString.h>`.

use std::ffi::{c_char, c_void, CString};

use super::{AssertionId, Power, PowerError};

type CFStringRef = *const c_void;
type IOReturn = i32;

/// `kCFStringEncodingUTF8`.
const CF_STRING_ENCODING_UTF8: u32 = 0x0800_0100;
/// `kIOPMAssertionLevelOn`.
const ASSERTION_LEVEL_ON: u32 = 255;
/// `kIOPMAssertionTypePreventUserIdleSystemSleep`: what `caffeinate -i` takes.
const PREVENT_USER_IDLE_SYSTEM_SLEEP: &str = "PreventUserIdleSystemSleep";
/// `kIOReturnSuccess`.
const IO_RETURN_SUCCESS: IOReturn = 0;

#[link(name = "CoreFoundation", kind = "framework")]
extern "C" {
    fn CFStringCreateWithCString(
        alloc: *const c_void,
        c_str: *const c_char,
        encoding: u32,
    ) -> CFStringRef;
    fn CFRelease(cf: *const c_void);
}

#[link(name = "IOKit", kind = "framework")]
extern "C" {
    fn IOPMAssertionCreateWithName(
        assertion_type: CFStringRef,
        level: u32,
        name: CFStringRef,
        id: *mut u32,
    ) -> IOReturn;
    fn IOPMAssertionRelease(id: u32) -> IOReturn;
}

/// An owned CFString, released on drop.
struct CfString(CFStringRef);

impl CfString {
    fn new(s: &str) -> Option<CfString> {
        let c = CString::new(s.replace('\0', "")).ok()?;
        // SAFETY: a NUL-terminated UTF-8 string that outlives the call; a null
        // allocator is the default allocator.
        let r = unsafe {
            CFStringCreateWithCString(std::ptr::null(), c.as_ptr(), CF_STRING_ENCODING_UTF8)
        };
        (!r.is_null()).then_some(CfString(r))
    }
}

impl Drop for CfString {
    fn drop(&mut self) {
        // SAFETY: created by CFStringCreateWithCString (a +1 reference), released once.
        unsafe { CFRelease(self.0) }
    }
}

pub struct IoKit;

impl Power for IoKit {
    fn prevent_idle_sleep(&self, name: &str) -> Result<AssertionId, PowerError> {
        let failed = |code| PowerError::Failed {
            call: "IOPMAssertionCreateWithName",
            code,
        };
        let kind = CfString::new(PREVENT_USER_IDLE_SYSTEM_SLEEP).ok_or(failed(-1))?;
        let name = CfString::new(name).ok_or(failed(-1))?;
        let mut id: u32 = 0;
        // SAFETY: two live CFStrings and a pointer to a live u32; IOKit copies
        // the strings, so they may be released after the call.
        let rc =
            unsafe { IOPMAssertionCreateWithName(kind.0, ASSERTION_LEVEL_ON, name.0, &mut id) };
        if rc == IO_RETURN_SUCCESS {
            Ok(id)
        } else {
            Err(failed(rc))
        }
    }

    fn release(&self, id: AssertionId) {
        // SAFETY: an id IOPMAssertionCreateWithName returned, released once.
        let rc = unsafe { IOPMAssertionRelease(id) };
        if rc != IO_RETURN_SUCCESS {
            tracing::warn!(target: "tensorlink::power", "IOPMAssertionRelease({id}) failed with IOReturn {rc:#x}");
        }
    }
}
