//! External interrupts, for the virtio-pci modes that watch one arrive (`probe.pci_irq=msix`
//! and `probe.pci_irq=intx-ioapic`, see `virtio::pci`). Everything else in the probe polls with
//! interrupts off.
//!
//! The ring-0 side is in `start`: IDT vectors 32..255 lead to a stub that adds one to
//! [`COUNTS`]`[vector]`; for the vector in [`ACK_VECTOR`] it also reads the byte at
//! [`ACK_ADDR`] (a virtio-pci ISR, which a read acknowledges, so that a level-triggered INTx
//! line drops before the EOI), ORs it into [`ACK_BITS`] and counts the reads that gave 0 in
//! [`ACK_EMPTY`]; then it writes the local APIC's
//! EOI register and returns. Ring 3 turns interrupts on and off with `sti`/`cli` ([`enable`],
//! [`disable`]): with IOPL 3 they run as they are; where the hypervisor runs ring 3 at IOPL 0
//! (PVM) they raise #GP, and the #GP handler sets or clears IF in the frame it returns to.
//!
//! This module also programs the interrupt controllers from ring 3 (their pages are mapped
//! user-accessible and uncached like the rest of the MMIO hole): the local APIC at
//! [`LAPIC_BASE`] (software enable, the spurious vector) and the IOAPIC at [`IOAPIC_BASE`]
//! (redirection entries), at the addresses the MADT of a PC names (cgvm's included). The
//! encodings ([`msi_address`], [`msi_data`], [`redirection_entry`]) are pure and unit-tested.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::mmio::Regs;

/// Interrupts taken, by vector (the ring-0 stub adds one; ring 3 reads, and zeroes a count
/// with interrupts off before it watches that vector).
pub static COUNTS: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];
/// The vector whose handler reads [`ACK_ADDR`] (0: none; vector 0 is an exception).
pub static ACK_VECTOR: AtomicU32 = AtomicU32::new(0);
/// The byte the handler of [`ACK_VECTOR`] reads (0: none).
pub static ACK_ADDR: AtomicU64 = AtomicU64::new(0);
/// What those reads returned, ORed together since [`take_ack_bits`].
pub static ACK_BITS: AtomicU32 = AtomicU32::new(0);
/// How many of those reads returned 0 since [`set_ack`] (the interrupt had no cause left).
pub static ACK_EMPTY: AtomicU32 = AtomicU32::new(0);

/// The local APIC's registers (xAPIC mode, the reset state).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// The IOAPIC's index and data registers.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;

/// Local APIC registers.
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_SVR: u64 = 0xf0;
/// Spurious-interrupt vector register: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// The spurious vector the probe sets (its low four bits must be ones on old APICs).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// IOAPIC registers: the index, the data window; the version register's index, and that of
/// redirection entry 0 (low dword; entry n at 0x10 + 2n).
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOAPIC_VERSION: u32 = 0x01;
const IOAPIC_REDIRECTION: u32 = 0x10;

/// Redirection entry and MSI bits.
const REDIRECTION_LEVEL: u64 = 1 << 15;
const REDIRECTION_MASKED: u64 = 1 << 16;

/// Interrupts taken on `vector` since the start.
pub fn count(vector: u8) -> u32 {
    COUNTS[usize::from(vector)].load(Ordering::Acquire)
}

/// Starts `vector`'s count again from 0. Meant for interrupts off (no handler runs meanwhile);
/// with them on, an interrupt just before the store goes uncounted, never half-counted: the
/// handler runs between two ring-3 instructions.
pub fn reset_count(vector: u8) {
    COUNTS[usize::from(vector)].store(0, Ordering::Release);
}

/// Lets interrupts in (`sti`; see the module docs for PVM).
#[cfg(not(test))]
pub fn enable() {
    // SAFETY: the IDT has a gate for every vector that can arrive, each of which returns to
    // where it interrupted with every register intact; the handlers run on the ring-0 stack,
    // so ring 3's red zone is untouched.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) }
}

/// Keeps interrupts out again (`cli`).
#[cfg(not(test))]
pub fn disable() {
    // SAFETY: only clears IF.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) }
}

/// Host unit tests never turn interrupts on.
#[cfg(test)]
pub fn enable() {}

/// Host unit tests never turn interrupts on.
#[cfg(test)]
pub fn disable() {}

/// Has the handler of `vector` read the byte at `addr` (a virtio-pci ISR) when it runs, and
/// forgets the bits read so far.
pub fn set_ack(vector: u8, addr: u64) {
    ACK_VECTOR.store(0, Ordering::Release);
    ACK_ADDR.store(addr, Ordering::Release);
    ACK_BITS.store(0, Ordering::Release);
    ACK_EMPTY.store(0, Ordering::Release);
    ACK_VECTOR.store(u32::from(vector), Ordering::Release);
}

/// How many of the handler's reads gave 0 since [`set_ack`].
pub fn ack_empty() -> u32 {
    ACK_EMPTY.load(Ordering::Acquire)
}

/// Stops the handler reading anything.
pub fn clear_ack() {
    ACK_VECTOR.store(0, Ordering::Release);
    ACK_ADDR.store(0, Ordering::Release);
}

/// The bits the handler read since the last call (or [`set_ack`]), cleared.
pub fn take_ack_bits() -> u32 {
    ACK_BITS.swap(0, Ordering::AcqRel)
}

/// The local APIC's registers.
fn lapic() -> Option<Regs> {
    Regs::new(LAPIC_BASE, 0x1000)
}

/// The IOAPIC's registers.
fn ioapic() -> Option<Regs> {
    Regs::new(IOAPIC_BASE, 0x20)
}

/// Enables the local APIC in software (SVR bit 8, spurious vector [`SPURIOUS_VECTOR`]) and lets
/// every priority through (TPR 0); its APIC ID. A fixed interrupt is dropped by a disabled
/// APIC.
pub fn lapic_enable() -> u8 {
    let Some(l) = lapic() else {
        return 0;
    };
    l.write_u32(LAPIC_TPR, 0);
    let svr = l.read_u32(LAPIC_SVR);
    l.write_u32(
        LAPIC_SVR,
        (svr & !0xff) | SVR_ENABLE | u32::from(SPURIOUS_VECTOR),
    );
    (l.read_u32(LAPIC_ID) >> 24) as u8
}

/// The local APIC's SVR (to report what an enable left).
pub fn lapic_svr() -> u32 {
    lapic().map_or(0, |l| l.read_u32(LAPIC_SVR))
}

/// Reads IOAPIC register `index`.
fn ioapic_read(index: u32) -> u32 {
    let Some(io) = ioapic() else {
        return u32::MAX;
    };
    io.write_u32(IOREGSEL, index);
    io.read_u32(IOWIN)
}

/// Writes IOAPIC register `index`.
fn ioapic_write(index: u32, value: u32) {
    if let Some(io) = ioapic() {
        io.write_u32(IOREGSEL, index);
        io.write_u32(IOWIN, value);
    }
}

/// The number of the IOAPIC's redirection entries (its version register's bits 16..23, + 1).
pub fn ioapic_entries() -> u32 {
    ((ioapic_read(IOAPIC_VERSION) >> 16) & 0xff) + 1
}

/// Writes redirection entry `gsi` (mask bit first, then the destination, then the low half)
/// and returns what it reads back.
pub fn ioapic_set(gsi: u8, entry: u64) -> u64 {
    let low = IOAPIC_REDIRECTION + 2 * u32::from(gsi);
    // Masked while the halves do not match.
    ioapic_write(low, ioapic_read(low) | REDIRECTION_MASKED as u32);
    ioapic_write(low + 1, (entry >> 32) as u32);
    ioapic_write(low, entry as u32);
    u64::from(ioapic_read(low + 1)) << 32 | u64::from(ioapic_read(low))
}

/// Masks redirection entry `gsi`.
pub fn ioapic_mask(gsi: u8) {
    let low = IOAPIC_REDIRECTION + 2 * u32::from(gsi);
    ioapic_write(low, ioapic_read(low) | REDIRECTION_MASKED as u32);
}

/// An IOAPIC redirection entry: fixed delivery of `vector` to the local APIC with ID `dest`
/// (physical destination mode), active high, edge- or `level`-triggered, masked or not.
pub fn redirection_entry(vector: u8, dest: u8, level: bool, masked: bool) -> u64 {
    let mut e = u64::from(vector) | u64::from(dest) << 56;
    if level {
        e |= REDIRECTION_LEVEL;
    }
    if masked {
        e |= REDIRECTION_MASKED;
    }
    e
}

/// Whether a redirection entry read back is `want` (the read-only delivery status and remote
/// IRR bits, 12 and 14, aside).
pub fn redirection_matches(read: u64, want: u64) -> bool {
    const READ_ONLY: u64 = 1 << 12 | 1 << 14;
    read & !READ_ONLY == want & !READ_ONLY
}

/// The MSI address of the local APIC with ID `dest` (physical destination mode, no
/// redirection hint).
pub fn msi_address(dest: u8) -> u32 {
    LAPIC_BASE as u32 | u32::from(dest) << 12
}

/// The MSI data of fixed, edge-triggered delivery of `vector`.
pub fn msi_data(vector: u8) -> u32 {
    u32::from(vector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(msi_address(0), 0xfee0_0000);
        assert_eq!(msi_address(3), 0xfee0_3000);
        assert_eq!(msi_data(0x41), 0x41);
        assert_eq!(redirection_entry(0x50, 0, true, false), 0x8050);
        assert_eq!(redirection_entry(0x50, 0, true, true), 0x1_8050);
        assert_eq!(
            redirection_entry(0x31, 2, false, false),
            0x0200_0000_0000_0031
        );
        // Delivery status (12) and remote IRR (14) are the IOAPIC's.
        assert!(redirection_matches(0x8050 | 1 << 14, 0x8050));
        assert!(redirection_matches(0x8050 | 1 << 12, 0x8050));
        assert!(!redirection_matches(0x1_8050, 0x8050), "still masked");
        assert!(!redirection_matches(0x8051, 0x8050));
    }

    #[test]
    fn ack_bits_are_taken_once() {
        set_ack(0x50, 0x1234);
        assert_eq!(ACK_VECTOR.load(Ordering::Acquire), 0x50);
        ACK_BITS.fetch_or(1, Ordering::AcqRel);
        assert_eq!(take_ack_bits(), 1);
        assert_eq!(take_ack_bits(), 0);
        ACK_EMPTY.fetch_add(2, Ordering::AcqRel);
        assert_eq!(ack_empty(), 2);
        set_ack(0x50, 0x1234);
        assert_eq!(ack_empty(), 0, "counted again for each set_ack");
        clear_ack();
        assert_eq!(ACK_VECTOR.load(Ordering::Acquire), 0);
        assert_eq!(ACK_ADDR.load(Ordering::Acquire), 0);
        COUNTS[0x50].fetch_add(3, Ordering::AcqRel);
        assert_eq!(count(0x50), 3);
        reset_count(0x50);
        assert_eq!(count(0x50), 0);
    }
}
