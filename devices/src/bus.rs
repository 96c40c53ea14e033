//! The I/O bus: a map from guest address ranges (port I/O or MMIO) to devices.
//!
//! vCPU threads look an exit's address up here and call the device with the offset inside its
//! range. Virtio queue notifications never come this way (they are ioeventfds); what does is
//! register traffic: legacy ports, virtio-mmio configuration, the boot timer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes on the bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` inside this device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` inside this device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else owns it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a device could not be inserted on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero.
    #[error("bus range at {0:#x} has length zero")]
    EmptyRange(u64),
    /// The range wraps around the end of the address space.
    #[error("bus range at {base:#x} with length {len:#x} wraps the address space")]
    Wraps {
        /// First address of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap {
        /// First address of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
        /// First address of the range already there.
        other: u64,
    },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address space of devices: one for port I/O, one for MMIO.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange(base));
        }
        let end = base
            .checked_add(len - 1)
            .ok_or(BusError::Wraps { base, len })?;
        if let Some((&other, e)) = self.ranges.range(..=end).next_back() {
            if other + (e.len - 1) >= base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Finds the device whose range holds the whole access `[addr, addr + size)`.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let last = offset.checked_add((size as u64).max(1) - 1)?;
        (last < entry.len).then_some((offset, &entry.device))
    }

    /// A guest read. Returns false (and leaves `data` as all ones) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A guest write. Returns false when nothing is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on past a poisoned lock: a device whose previous user panicked is
/// still the best answer we have, and panics abort the process in release builds anyway.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(Vec<u8>);
    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn scratch(len: usize) -> SharedDevice {
        Arc::new(Mutex::new(Scratch(vec![0; len])))
    }

    #[test]
    fn routes_by_offset_and_rejects_overlaps() {
        let mut bus = Bus::new();
        bus.insert(scratch(8), 0x3f8, 8).unwrap();
        bus.insert(scratch(2), 0x60, 2).unwrap();
        assert_eq!(
            bus.insert(scratch(4), 0x3fc, 4),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 4,
                other: 0x3f8
            })
        );
        assert_eq!(
            bus.insert(scratch(0x10), 0x3f0, 0x10),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 0x10,
                other: 0x3f8
            })
        );
        assert_eq!(
            bus.insert(scratch(1), 0x10, 0),
            Err(BusError::EmptyRange(0x10))
        );
        assert!(matches!(
            bus.insert(scratch(1), u64::MAX, 2),
            Err(BusError::Wraps { .. })
        ));
        assert!(bus.write(0x3fa, &[0xab, 0xcd]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [0xab, 0xcd]);
    }

    #[test]
    fn access_past_a_range_end_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(scratch(8), 0x3f8, 8).unwrap();
        let mut b = [0u8; 4];
        assert!(
            !bus.read(0x3fe, &mut b),
            "a 4-byte read at 0x3fe crosses 0x400"
        );
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.read(0x10, &mut b[..1]));
    }
}
