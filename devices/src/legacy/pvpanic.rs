//! pvpanic, as QEMU's ISA `pvpanic` device (`QEMU0001` in the DSDT) at port 0x505: the guest
//! kernel writes bit 0 when it panics, which ends the run, and bit 1 when it is about to boot a
//! crash kernel, which is only logged.

use crate::stop::{GuestStop, StopNotifier};

/// Length of the port range.
pub const PVPANIC_LEN: u64 = 1;

/// Event bit: the guest kernel panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: the guest loaded a crash kernel and is about to kexec into it.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// What a read returns: the events this device understands.
pub const PVPANIC_CAPABILITIES: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

/// The pvpanic port as a bus device of length [`PVPANIC_LEN`].
pub struct PvPanicDevice {
    stop: StopNotifier,
}

impl PvPanicDevice {
    /// A pvpanic device that asks `stop` for [`GuestStop::Panic`] when the guest panics.
    pub fn new(stop: StopNotifier) -> Self {
        Self { stop }
    }
}

impl crate::bus::BusDevice for PvPanicDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = PVPANIC_CAPABILITIES;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = match (offset, data.first()) {
            (0, Some(&v)) => v,
            _ => {
                log::debug!("pvpanic: write of {data:x?} at offset {offset:#x} ignored");
                return;
            }
        };
        if value & PVPANIC_CRASH_LOADED != 0 {
            log::warn!("guest kernel is loading a crash kernel (pvpanic crash-loaded)");
        }
        if value & PVPANIC_PANICKED != 0 {
            log::error!("guest kernel panicked (pvpanic)");
            self.stop.request(GuestStop::Panic);
        }
        if value & !PVPANIC_CAPABILITIES != 0 {
            log::debug!("pvpanic: unknown event bits in {value:#04x} ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    fn dev() -> (PvPanicDevice, StopNotifier) {
        let stop = StopNotifier::new().expect("stop");
        (PvPanicDevice::new(stop.clone()), stop)
    }

    #[test]
    fn reads_capabilities() {
        let (mut d, _) = dev();
        let mut b = [0xaau8; 1];
        d.read(0, &mut b);
        assert_eq!(b, [0b11]);
        let mut w = [0xaau8; 8];
        d.read(0, &mut w);
        assert_eq!(w, [0b11, 0, 0, 0, 0, 0, 0, 0]);
        d.read(1, &mut w);
        assert_eq!(w, [0; 8]);
        d.read(u64::MAX, &mut w);
        d.read(0, &mut []);
    }

    #[test]
    fn panic_bit_stops_the_guest() {
        let (mut d, stop) = dev();
        d.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(stop.reason(), Some(GuestStop::Panic));
    }

    #[test]
    fn crash_loaded_and_junk_do_not_stop() {
        let (mut d, stop) = dev();
        d.write(0, &[PVPANIC_CRASH_LOADED]);
        d.write(0, &[0xfc]);
        d.write(0, &[0]);
        d.write(0, &[]);
        d.write(1, &[PVPANIC_PANICKED]);
        d.write(u64::MAX, &[0xff; 8]);
        assert_eq!(stop.reason(), None);
        // A wider write uses its low byte.
        d.write(0, &[0x03, 0, 0, 0]);
        assert_eq!(stop.reason(), Some(GuestStop::Panic));
    }
}
