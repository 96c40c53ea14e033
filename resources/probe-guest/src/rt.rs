//! What the linker needs that a libc or the standard library would otherwise provide: the
//! memory functions the compiler calls (`memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`) and
//! the `rust_eh_personality` symbol that the precompiled `core` refers to.
//!
//! The memory functions are `rep movsb`/`rep stosb`/`repe cmpsb` in inline assembly, so the
//! compiler cannot turn their bodies back into calls to themselves. They run in ring 3 only.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest` (the ranges must not overlap).
///
/// # Safety
/// `src` must be valid for `n` bytes of reads and `dest` for `n` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; DF is clear (ABI), so the copy goes upward.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the ranges may overlap.
///
/// # Safety
/// `src` must be valid for `n` bytes of reads and `dest` for `n` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src, or past the end of src: an upward copy never reads a byte it has
        // already overwritten.
        // SAFETY: the caller guarantees both ranges.
        return unsafe { memcpy(dest, src, n) };
    }
    // dest overlaps the end of src: copy downward, from the last byte.
    // SAFETY: the caller guarantees both ranges; n > 0 here (dest - src < n), so the last-byte
    // pointers are in range; DF is set for the copy and cleared again, as the ABI requires.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
    }
    dest
}

/// Fills `n` bytes at `dest` with the low byte of `c`.
///
/// # Safety
/// `dest` must be valid for `n` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; DF is clear (ABI).
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Compares `n` bytes: 0 if equal, else the difference of the first differing bytes.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes of reads.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let differ: u8;
    let a_next: *const u8;
    let b_next: *const u8;
    // SAFETY: the caller guarantees both ranges; `repe cmpsb` stops at the first difference,
    // leaving RSI/RDI one past it; DF is clear (ABI).
    unsafe {
        asm!(
            "repe cmpsb",
            "setne {differ}",
            differ = out(reg_byte) differ,
            inout("rcx") n => _,
            inout("rsi") a => a_next,
            inout("rdi") b => b_next,
            options(nostack, readonly)
        );
    }
    if differ == 0 {
        return 0;
    }
    // SAFETY: the differing bytes are the last ones compared, inside both ranges.
    unsafe { i32::from(*a_next.sub(1)) - i32::from(*b_next.sub(1)) }
}

/// `memcmp` for equality only (the compiler emits calls to it).
///
/// # Safety
/// As for [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by the precompiled `core` (built for unwinding); never called with
/// `panic = "abort"`.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
