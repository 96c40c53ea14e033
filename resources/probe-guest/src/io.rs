//! x86 port I/O, used from ring 3 (the start code grants IOPL 3).
//!
//! Only the device modules call these (`serial`, `cmos`, `exit`, `keyboard`, `tsc` for the PIT,
//! and `pci` for configuration mechanism #1 at 0xcf8/0xcfc); each wraps the ports of one device
//! in safe functions.
//!
//! Keep to the register forms (`in al, dx` / `out dx, al`, and the 16/32-bit `dx` forms): where
//! ring 3 cannot do port I/O (PVM), the start code's #GP handler emulates exactly these.

use core::arch::asm;

/// Writes `value` to I/O port `port`.
///
/// # Safety
/// The write must not make a device change memory that Rust code relies on (for example, start a
/// DMA transfer into it). Port writes to COM1, the CMOS RTC, the exit device, the i8042 and the
/// ACPI sleep control register are always fine.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no memory; the caller vouches for the device-side effect.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from I/O port `port`.
///
/// # Safety
/// As for [`outb`]: reads can have side effects on a device (a UART's receive buffer).
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` touches no memory; the caller vouches for the device-side effect.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes the 32-bit `value` to I/O port `port`.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: `out` touches no memory; the caller vouches for the device-side effect.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads 32 bits from I/O port `port`.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: `in` touches no memory; the caller vouches for the device-side effect.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}
