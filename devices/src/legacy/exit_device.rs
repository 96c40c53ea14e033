//! The exit device at port 0xf4: a write of V ends the run with exit status V (the same
//! convention as QEMU's `isa-debug-exit` port, without its `(V << 1) | 1` encoding).

use crate::stop::{GuestStop, StopNotifier};

/// Length of the port range.
pub const EXIT_DEVICE_LEN: u64 = 1;

/// The exit port as a bus device of length [`EXIT_DEVICE_LEN`].
pub struct ExitDevice {
    stop: StopNotifier,
}

impl ExitDevice {
    /// An exit device that asks `stop` for [`GuestStop::ExitDevice`] with the written byte.
    pub fn new(stop: StopNotifier) -> Self {
        Self { stop }
    }
}

impl crate::bus::BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (0, Some(&status)) => {
                log::info!("guest wrote {status} to the exit device");
                self.stop.request(GuestStop::ExitDevice(status));
            }
            _ => log::debug!("exit device: write of {data:x?} at offset {offset:#x} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    #[test]
    fn byte_write_requests_exit_with_that_status() {
        let stop = StopNotifier::new().expect("stop");
        let mut d = ExitDevice::new(stop.clone());
        d.write(0, &[42]);
        assert_eq!(stop.reason(), Some(GuestStop::ExitDevice(42)));
        d.write(0, &[7]);
        assert_eq!(
            stop.reason(),
            Some(GuestStop::ExitDevice(42)),
            "first stop wins"
        );
    }

    #[test]
    fn wide_write_uses_the_low_byte() {
        let stop = StopNotifier::new().expect("stop");
        let mut d = ExitDevice::new(stop.clone());
        d.write(0, &[0x03, 0x01, 0xff, 0xff]);
        assert_eq!(stop.reason(), Some(GuestStop::ExitDevice(3)));
    }

    #[test]
    fn reads_zero_and_odd_writes_are_ignored() {
        let stop = StopNotifier::new().expect("stop");
        let mut d = ExitDevice::new(stop.clone());
        let mut b = [0xaau8; 8];
        d.read(0, &mut b);
        assert_eq!(b, [0; 8]);
        d.read(u64::MAX, &mut b);
        d.read(0, &mut []);
        d.write(0, &[]);
        d.write(1, &[5]);
        d.write(u64::MAX, &[5; 8]);
        assert_eq!(stop.reason(), None);
        d.write(0, &[0]);
        assert_eq!(stop.reason(), Some(GuestStop::ExitDevice(0)));
    }
}
