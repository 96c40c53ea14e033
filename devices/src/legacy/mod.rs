//! Legacy platform devices: the PC ports and the one MMIO window a Linux guest expects on a
//! minimal x86 machine, each a [`BusDevice`] with offsets relative to the
//! base the VMM inserts it at.
//!
//! | device | bus | base | length | interrupt |
//! |---|---|---|---|---|
//! | [`SerialDevice`] (COM1, 8250/16550A UART) | PIO | 0x3f8 | [`SERIAL_LEN`] = 8 | IRQ 4 ([`SerialDevice::interrupt_event`]) |
//! | [`I8042Device`] (keyboard controller) | PIO | 0x60 | [`I8042_LEN`] = 5 (0x60 data, 0x64 command/status) | IRQ 1 ([`I8042Device::interrupt_event`]) |
//! | [`CmosDevice`] (RTC + NVRAM) | PIO | 0x70 | [`CMOS_LEN`] = 2 | none |
//! | [`ExitDevice`] | PIO | 0xf4 | [`EXIT_DEVICE_LEN`] = 1 | none |
//! | [`AcpiPmDevice`] (sleep control, sleep status, reset) | PIO | 0x3c0 | [`ACPI_PM_LEN`] = 3 | none |
//! | [`PvPanicDevice`] | PIO | 0x505 | [`PVPANIC_LEN`] = 1 | none |
//! | [`BootTimer`] | MMIO | 0xc000_0000 | [`BOOT_TIMER_LEN`] = 4 KiB | none |
//!
//! The addresses themselves live in `boot::layout` (this crate does not depend on `boot`); the
//! lengths are here because they are a property of each device.
//!
//! Access sizes: the port devices are 8-bit ISA devices, so a wider access is split into byte
//! accesses at consecutive offsets, as the ISA bus does (a 2-byte `outw` to 0x70 writes the index
//! to 0x70 and the data to 0x71). The exit device and pvpanic, one byte long, use the low byte of
//! a wider write. A read of a register the model does not implement returns 0; a read of a byte
//! outside every register of a device (for example 0x61..0x63 inside the i8042's 0x60..0x65
//! range) returns 0xff, as an unclaimed port does. Writes nothing handles are dropped with a
//! debug log. No access, whatever its size, offset or value, panics.

use crate::bus::BusDevice;

pub mod acpi_pm;
pub mod boot_timer;
pub mod cmos;
pub mod exit_device;
pub mod i8042;
pub mod irq;
pub mod pvpanic;
pub mod serial;

pub use acpi_pm::{AcpiPmDevice, ACPI_PM_LEN, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP};
pub use boot_timer::{
    BootComplete, BootCompletion, BootTimer, BOOT_COMPLETE_MAGIC, BOOT_TIMER_LEN,
};
pub use cmos::{CmosDevice, CMOS_LEN};
pub use exit_device::{ExitDevice, EXIT_DEVICE_LEN};
pub use i8042::{I8042Device, I8042_LEN};
pub use irq::EventFdTrigger;
pub use pvpanic::{PvPanicDevice, PVPANIC_CAPABILITIES, PVPANIC_LEN};
pub use serial::{SerialDevice, SerialOutput, SharedBuffer, SERIAL_LEN};

/// What a byte outside every register of a device reads as: the value of an unclaimed port.
pub(crate) const UNCLAIMED: u8 = 0xff;

/// A device made of byte-wide registers, as ISA port devices are: an access of N bytes at
/// `offset` touches the registers at `offset`, `offset + 1`, ... in order, which is what a
/// wide `in`/`out` on such hardware does.
pub(crate) trait ByteRegisters: Send {
    /// The value of the register at `offset`.
    fn read_reg(&mut self, offset: u64) -> u8;
    /// Writes the register at `offset`.
    fn write_reg(&mut self, offset: u64, value: u8);
}

impl<T: ByteRegisters> BusDevice for T {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_reg(offset.saturating_add(i as u64));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            self.write_reg(offset.saturating_add(i as u64), b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records writes; reads return the low byte of the offset.
    #[derive(Default)]
    struct Echo(Vec<(u64, u8)>);

    impl ByteRegisters for Echo {
        fn read_reg(&mut self, offset: u64) -> u8 {
            (offset & 0xff) as u8
        }
        fn write_reg(&mut self, offset: u64, value: u8) {
            self.0.push((offset, value));
        }
    }

    #[test]
    fn byte_split_walks_consecutive_offsets_without_overflow() {
        let mut dev = Echo::default();
        let mut data = [0u8; 3];
        dev.read(u64::MAX - 1, &mut data);
        assert_eq!(data, [0xfe, 0xff, 0xff]);
        dev.write(4, &[1, 2]);
        assert_eq!(dev.0, [(4, 1), (5, 2)]);
    }
}
