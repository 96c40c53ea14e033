//! The FADT (signature `FACP`): a hardware-reduced ACPI platform whose sleep control, sleep
//! status and reset registers are the I/O ports of [`layout`].

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use vm_memory::GuestAddress;

use super::{to_bytes, OEM_ID, OEM_REVISION};
use crate::layout;

/// Identifies the hypervisor to the guest (FADT "Hypervisor Vendor Identity", ACPI 6.0+).
pub(super) const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"CGVM    ";

/// IAPC_BOOT_ARCH bit 1: the motherboard contains an 8042 (or equivalent) keyboard controller.
pub(super) const IAPC_8042: u16 = 1 << 1;
/// IAPC_BOOT_ARCH bit 2: it is not safe to probe for VGA hardware.
pub(super) const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

/// IA-PC boot architecture flags.
///
/// - "8042" is set: the i8042 at 0x60/0x64 (IRQ 1) is a keyboard controller with a PS/2
///   keyboard behind it, modelled so that Linux's i8042 and atkbd drivers probe it quickly, and
///   the VMM asks the guest for a graceful shutdown by typing Ctrl-Alt-Del on it; the guest
///   must bind its driver for that to work. Linux takes the controller from the DSDT's
///   `PNP0303` device when there is one, and only probes the ports itself when this flag is
///   set, so flag and device say the same thing. (Its reset line, 0xfe to port 0x64, works
///   either way: Linux's keyboard-controller reboot fallback writes it unconditionally.)
/// - "VGA not present": there is no VGA, and the VGA port range overlaps our ACPI registers
///   (0x3c0..0x3c2), which must never be probed as VGA registers.
/// - "Legacy devices" is clear: the legacy devices (COM1, RTC, keyboard) are described in the
///   DSDT, and the flag only makes 32-bit kernels look for a PnP BIOS, which there is none of.
/// - "CMOS RTC not present" is clear: the RTC at 0x70 exists (`PNP0B00` in the DSDT).
/// - "MSI not supported" and "PCIe ASPM controls" are clear: there is no PCI yet.
const IAPC_BOOT_ARCH: u16 = IAPC_8042 | IAPC_VGA_NOT_PRESENT;

/// An 8-bit register in I/O space at `port`.
fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// The FADT, revision 6 (as `acpi_tables` lays it out), pointing at the DSDT at `dsdt`.
pub(super) fn build(dsdt: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"CGVMFACP", OEM_REVISION)
        // X_DSDT only; the 32-bit DSDT field stays 0 as ACPI 6 requires when X_DSDT is set.
        .dsdt_64(dsdt.0)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power/sleep buttons (there are no buttons at all).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // No FACS: optional on hardware-reduced platforms (FIRMWARE_CTRL and X_FIRMWARE_CTRL are 0),
    // there is no firmware waking vector or global lock to share.
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io_register(layout::ACPI_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    // Linux powers off by writing ((SLP_TYP << 2) & 0x1c) | 0x20 (SLP_EN) here, SLP_TYP from
    // the DSDT's \_S5_ (5): 0x34. It needs both registers non-zero to offer S5 at all.
    fadt.sleep_control_reg = io_register(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    to_bytes(&fadt.finalize())
}
