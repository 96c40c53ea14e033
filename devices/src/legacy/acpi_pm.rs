//! The hardware-reduced ACPI registers the FADT points at: sleep control (0x3c0), sleep status
//! (0x3c1) and reset (0x3c2), one byte each. S5 (soft off) powers the guest off; a reset
//! register write resets it; S1-S4 are not supported and "wake up" at once.
//!
//! The values here must match the ACPI tables written by `boot::acpi`: the FADT's
//! `SLEEP_CONTROL_REG`/`SLEEP_STATUS_REG` at 0x3c0/0x3c1, `RESET_REG` at 0x3c2 with
//! `RESET_VALUE` [`ACPI_RESET_VALUE`], and the DSDT's `\_S5` package with SLP_TYP
//! [`ACPI_S5_SLP_TYP`].

use super::{ByteRegisters, UNCLAIMED};
use crate::stop::{GuestStop, StopNotifier};

/// Length of the port range (0x3c0..0x3c3).
pub const ACPI_PM_LEN: u64 = 3;

/// The value the FADT's `RESET_VALUE` names.
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// The SLP_TYP of `\_S5` in the DSDT.
pub const ACPI_S5_SLP_TYP: u8 = 5;

const SLEEP_CONTROL_OFFSET: u64 = 0;
const SLEEP_STATUS_OFFSET: u64 = 1;
const RESET_OFFSET: u64 = 2;

/// Sleep control: SLP_EN, and SLP_TYP in bits 2..4.
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// Sleep status: WAK_STS.
const WAK_STS: u8 = 1 << 7;

/// The ACPI sleep and reset registers as a bus device of length [`ACPI_PM_LEN`] at 0x3c0.
pub struct AcpiPmDevice {
    stop: StopNotifier,
    wake_status: bool,
}

impl AcpiPmDevice {
    /// The registers, asking `stop` for [`GuestStop::Poweroff`] on S5 and [`GuestStop::Reset`]
    /// on a reset.
    pub fn new(stop: StopNotifier) -> Self {
        Self {
            stop,
            wake_status: false,
        }
    }

    fn sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            log::debug!("acpi: sleep control write {value:#04x} without SLP_EN ignored");
            return;
        }
        // WAK_STS is what the guest polls after a sleep request: set it at once, so a guest
        // asking for an unsupported state carries on as if it had woken up.
        self.wake_status = true;
        let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if slp_typ == ACPI_S5_SLP_TYP {
            log::info!("guest requested poweroff (ACPI S5)");
            self.stop.request(GuestStop::Poweroff);
        } else {
            log::warn!(
                "guest requested ACPI sleep type {slp_typ}, which is not supported; ignored"
            );
        }
    }
}

impl ByteRegisters for AcpiPmDevice {
    fn read_reg(&mut self, offset: u64) -> u8 {
        match offset {
            SLEEP_STATUS_OFFSET if self.wake_status => WAK_STS,
            SLEEP_CONTROL_OFFSET | SLEEP_STATUS_OFFSET | RESET_OFFSET => 0,
            _ => UNCLAIMED,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u8) {
        match offset {
            SLEEP_CONTROL_OFFSET => self.sleep_control(value),
            SLEEP_STATUS_OFFSET => {
                if value & WAK_STS != 0 {
                    self.wake_status = false;
                }
            }
            RESET_OFFSET if value == ACPI_RESET_VALUE => {
                log::info!("guest requested a reset through the ACPI reset register");
                self.stop.request(GuestStop::Reset);
            }
            _ => log::debug!("acpi: write {value:#04x} at offset {offset:#x} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    fn dev() -> (AcpiPmDevice, StopNotifier) {
        let stop = StopNotifier::new().expect("stop");
        (AcpiPmDevice::new(stop.clone()), stop)
    }

    fn status(d: &mut AcpiPmDevice) -> u8 {
        let mut b = [0u8];
        d.read(SLEEP_STATUS_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn s5_powers_off() {
        let (mut d, stop) = dev();
        assert_eq!(status(&mut d), 0);
        // SLP_TYP 5 without SLP_EN does nothing.
        d.write(SLEEP_CONTROL_OFFSET, &[5 << 2]);
        assert_eq!(stop.reason(), None);
        d.write(SLEEP_CONTROL_OFFSET, &[0x34]);
        assert_eq!(stop.reason(), Some(GuestStop::Poweroff));
        assert_eq!(status(&mut d), WAK_STS);
    }

    #[test]
    fn other_sleep_states_wake_at_once() {
        let (mut d, stop) = dev();
        for typ in [0u8, 1, 2, 3, 4, 6, 7] {
            d.write(SLEEP_CONTROL_OFFSET, &[SLP_EN | (typ << 2)]);
            assert_eq!(status(&mut d), WAK_STS);
            d.write(SLEEP_STATUS_OFFSET, &[0x01]);
            assert_eq!(status(&mut d), WAK_STS, "writing 0 to WAK_STS keeps it");
            d.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
            assert_eq!(status(&mut d), 0, "write 1 clears");
        }
        assert_eq!(stop.reason(), None);
    }

    #[test]
    fn reset_register() {
        let (mut d, stop) = dev();
        d.write(RESET_OFFSET, &[0x02]);
        d.write(RESET_OFFSET, &[0x00]);
        assert_eq!(stop.reason(), None);
        d.write(RESET_OFFSET, &[ACPI_RESET_VALUE]);
        assert_eq!(stop.reason(), Some(GuestStop::Reset));
    }

    #[test]
    fn wide_and_hostile_accesses() {
        let (mut d, stop) = dev();
        let mut b = [0xaau8; 8];
        d.read(0, &mut b);
        assert_eq!(
            b,
            [0, 0, 0, UNCLAIMED, UNCLAIMED, UNCLAIMED, UNCLAIMED, UNCLAIMED]
        );
        d.read(2, &mut b);
        d.read(u64::MAX, &mut b);
        d.read(0, &mut []);
        d.write(3, &[0xff; 8]);
        d.write(u64::MAX, &[0xff; 8]);
        d.write(0, &[]);
        assert_eq!(stop.reason(), None);
        // A 2-byte write at offset 1: status (clear) then reset.
        d.write(SLEEP_STATUS_OFFSET, &[WAK_STS, ACPI_RESET_VALUE]);
        assert_eq!(stop.reason(), Some(GuestStop::Reset));
    }
}
