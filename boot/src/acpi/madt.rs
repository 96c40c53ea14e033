//! The MADT (signature `APIC`): local APICs, the IOAPIC and the LINT1 NMI.
//!
//! Built on `acpi_tables::sdt::Sdt` (which keeps length and checksum right) rather than
//! `acpi_tables::madt::MADT`, which can neither set the MADT flags nor express the x86 Interrupt
//! Source Override and Local APIC NMI structures. The structures' layouts are those of the ACPI
//! specification, section 5.2.12.

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION};
use crate::layout;

/// MADT revision 5 (ACPI 6.2-6.4): every structure used here is unchanged since ACPI 1.0, and
/// 5 is the newest revision every consumer (Linux, iasl) knows.
const MADT_REVISION: u8 = 5;
/// Length of the MADT header: the common table header, the local APIC address and the flags.
const MADT_HEADER_LEN: u32 = 44;

/// MADT flags bit 0, PCAT_COMPAT: the platform also has dual 8259 PICs, which the OS must mask
/// before it uses the APICs. True: KVM_CREATE_IRQCHIP creates a pair of 8259s next to the
/// IOAPIC (and KVM routes GSIs 0-15 to both). Linux in hardware-reduced mode does not use the
/// 8259s either way; an OS that does learns they exist instead of having to probe for them.
pub(super) const PCAT_COMPAT: u32 = 1;

/// The IOAPIC's ID. 0: the value KVM's in-kernel IOAPIC has in its ID register after reset (an
/// OS that cross-checks the register against the MADT finds them equal). IOAPIC IDs need not
/// differ from local APIC IDs: only the pre-Pentium 4 serial APIC bus shared one ID space, and
/// neither KVM nor ACPI requires it. QEMU and Firecracker use 0 too.
pub(super) const IOAPIC_ID: u8 = 0;

/// Local APIC NMI "all processors" processor UID.
pub(super) const ALL_PROCESSORS: u8 = 0xff;

/// Structure types (ACPI 6.5, table 5.21).
pub(super) const TYPE_LOCAL_APIC: u8 = 0;
pub(super) const TYPE_IO_APIC: u8 = 1;
pub(super) const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
pub(super) const TYPE_LOCAL_APIC_NMI: u8 = 4;

/// Local APIC flags bit 0: the processor is usable.
const LOCAL_APIC_ENABLED: u32 = 1;
/// MPS INTI flags: polarity and trigger mode "conform to the bus" (ISA: active high, edge).
const MPS_INTI_CONFORMS: u16 = 0;

/// Interrupt Source Overrides, as (ISA IRQ, GSI) pairs: none.
///
/// Without an override ACPI identity-maps ISA IRQ n to GSI n, and that is what the VMM gives
/// the guest: it keeps KVM's default GSI routing, which sends GSI n (0-15) to IOAPIC pin n and
/// 8259 pin n. The in-kernel PIT raises GSI 0, so the timer arrives on IOAPIC pin 0, not pin 2
/// as on real PCs. (QEMU gets pin 2 by installing its own routing, GSI 0 -> IOAPIC pin 2, and
/// then declares IRQ 0 -> GSI 2 here.) Declaring `(0, 2)` with KVM's default routing would
/// send the OS to a pin the timer never raises; add it here if the VMM ever routes GSI 0 to
/// pin 2. IRQ 9 needs no override either: a hardware-reduced platform has no SCI.
const ISA_OVERRIDES: &[(u8, u32)] = &[];

/// Processor Local APIC structure (type 0, 8 bytes).
fn local_apic(processor_uid: u8, apic_id: u8) -> [u8; 8] {
    let f = LOCAL_APIC_ENABLED.to_le_bytes();
    [
        TYPE_LOCAL_APIC,
        8,
        processor_uid,
        apic_id,
        f[0],
        f[1],
        f[2],
        f[3],
    ]
}

/// I/O APIC structure (type 1, 12 bytes).
fn io_apic(id: u8, address: u32, gsi_base: u32) -> [u8; 12] {
    let mut s = [0u8; 12];
    s[0] = TYPE_IO_APIC;
    s[1] = 12;
    s[2] = id;
    // s[3] reserved
    s[4..8].copy_from_slice(&address.to_le_bytes());
    s[8..12].copy_from_slice(&gsi_base.to_le_bytes());
    s
}

/// Interrupt Source Override structure (type 2, 10 bytes): ISA IRQ `irq` arrives on `gsi`.
fn interrupt_source_override(irq: u8, gsi: u32) -> [u8; 10] {
    let mut s = [0u8; 10];
    s[0] = TYPE_INTERRUPT_SOURCE_OVERRIDE;
    s[1] = 10;
    s[2] = 0; // bus: ISA
    s[3] = irq;
    s[4..8].copy_from_slice(&gsi.to_le_bytes());
    s[8..10].copy_from_slice(&MPS_INTI_CONFORMS.to_le_bytes());
    s
}

/// Local APIC NMI structure (type 4, 6 bytes).
fn local_apic_nmi(processor_uid: u8, lint: u8) -> [u8; 6] {
    let f = MPS_INTI_CONFORMS.to_le_bytes();
    [TYPE_LOCAL_APIC_NMI, 6, processor_uid, f[0], f[1], lint]
}

/// The local APIC base address, as the MADT's 32-bit field.
const LAPIC_ADDRESS: u32 = layout::LAPIC_START as u32;
/// The IOAPIC base address, as the structure's 32-bit field.
const IOAPIC_ADDRESS: u32 = layout::IOAPIC_START as u32;
const _: () = assert!(layout::LAPIC_START <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_START <= u32::MAX as u64);

/// The MADT for `num_cpus` vCPUs (1..=255, checked by the caller): vCPU `i` has processor UID
/// `i` and APIC ID `i`, as the VMM numbers its vCPUs (KVM_CREATE_VCPU id = APIC ID).
pub(super) fn build(num_cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        *b"CGVMAPIC",
        OEM_REVISION,
    );
    madt.write_u32(36, LAPIC_ADDRESS);
    madt.write_u32(40, PCAT_COMPAT);
    for i in 0..num_cpus {
        madt.append_slice(&local_apic(i, i));
    }
    madt.append_slice(&io_apic(IOAPIC_ID, IOAPIC_ADDRESS, 0));
    for &(irq, gsi) in ISA_OVERRIDES {
        madt.append_slice(&interrupt_source_override(irq, gsi));
    }
    // LINT1 of every local APIC is wired to NMI, as on PCs.
    madt.append_slice(&local_apic_nmi(ALL_PROCESSORS, 1));
    madt.as_slice().to_vec()
}
