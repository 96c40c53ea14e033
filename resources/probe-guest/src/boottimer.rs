//! The boot timer, cgvm's (and Firecracker's) "boot complete" marker at MMIO 0xc000_0000: the
//! guest writes the byte 123 at offset 0; a 4-byte read at offset 0 returns the microseconds
//! from VMM start to that write, or 0 before it.

/// Guest-physical (= virtual, identity map) address of the boot timer.
pub const BOOT_TIMER_ADDR: u64 = 0xc000_0000;
/// The byte that marks boot complete.
pub const BOOT_COMPLETE: u8 = 123;

/// Reads the boot timer: 0 before boot complete, else µs from VMM start to boot complete.
pub fn read() -> u32 {
    // SAFETY: the boot timer page is identity-mapped, user-accessible and uncached by the start
    // code's page tables; it is device memory that Rust has no reference to, and the read is an
    // aligned 4-byte volatile access as the device expects.
    unsafe { core::ptr::read_volatile(BOOT_TIMER_ADDR as *const u32) }
}

/// Marks boot complete.
pub fn mark_boot_complete() {
    // SAFETY: as for `read`; a 1-byte volatile write to device memory.
    unsafe { core::ptr::write_volatile(BOOT_TIMER_ADDR as *mut u8, BOOT_COMPLETE) }
}
