//! Device registers in the 32-bit MMIO hole, for the PCI code: the ECAM region and the
//! structures in a device's BARs (virtio-pci common, notify, ISR and device configuration; the
//! MSI-X table and PBA).
//!
//! [`Regs`] is a window of device memory inside 0xc000_0000..4 GiB, which the start code maps
//! identity, user-accessible and uncached (2 MiB pages, PCD|PWT) and where no Rust object
//! lives: the PCI BAR window 0xd000_0000..0xe000_0000 and the ECAM region at 0xe000_0000 lie in
//! it, so nothing needs mapping. Every access is volatile, of the width asked for, naturally
//! aligned and inside the window; an access that is not reads all-ones (as a PCI read nobody
//! answers) and writes nothing. The virtio-mmio transport (`virtio::Mmio`) has its own
//! accessors.

use crate::phys::MMIO_HOLE_START;

/// End of the 32-bit MMIO hole (exclusive).
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// A window of device registers in the MMIO hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regs {
    base: u64,
    len: u64,
}

impl Regs {
    /// The `len` bytes at `base`, if they lie inside 0xc000_0000..4 GiB. Nothing is accessed.
    pub fn new(base: u64, len: u64) -> Option<Self> {
        let end = base.checked_add(len)?;
        (base >= MMIO_HOLE_START && end <= MMIO_HOLE_END).then_some(Self { base, len })
    }

    /// Where it starts.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Its length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The address of `size` bytes at `offset`, if inside and aligned to `size`.
    fn at(&self, offset: u64, size: u64) -> Option<u64> {
        let end = offset.checked_add(size)?;
        let addr = self.base + offset;
        (end <= self.len && addr.is_multiple_of(size)).then_some(addr)
    }

    /// Reads the byte at `offset` (0xff outside).
    pub fn read_u8(&self, offset: u64) -> u8 {
        match self.at(offset, 1) {
            // SAFETY: new() and at() confirmed the byte lies inside 0xc0000000..4 GiB, which
            // the start code maps (identity, user-accessible, uncached) and where no Rust object
            // lives; a volatile access of the device register's width is what a device expects.
            Some(a) => unsafe { (a as *const u8).read_volatile() },
            None => u8::MAX,
        }
    }

    /// Reads the little-endian u16 at `offset` in one access (all-ones outside or unaligned).
    pub fn read_u16(&self, offset: u64) -> u16 {
        match self.at(offset, 2) {
            // SAFETY: as in read_u8; at() also checked the alignment.
            Some(a) => u16::from_le(unsafe { (a as *const u16).read_volatile() }),
            None => u16::MAX,
        }
    }

    /// Reads the little-endian u32 at `offset` in one access (all-ones outside or unaligned).
    pub fn read_u32(&self, offset: u64) -> u32 {
        match self.at(offset, 4) {
            // SAFETY: as in read_u8; at() also checked the alignment.
            Some(a) => u32::from_le(unsafe { (a as *const u32).read_volatile() }),
            None => u32::MAX,
        }
    }

    /// Writes the byte at `offset` (nothing outside).
    pub fn write_u8(&self, offset: u64, value: u8) {
        if let Some(a) = self.at(offset, 1) {
            // SAFETY: as in read_u8. The write goes to a device register, never to memory the
            // compiler knows; what the device then does with guest memory is the DMA pool's
            // business.
            unsafe { (a as *mut u8).write_volatile(value) }
        }
    }

    /// Writes the little-endian u16 at `offset` in one access (nothing outside or unaligned).
    pub fn write_u16(&self, offset: u64, value: u16) {
        if let Some(a) = self.at(offset, 2) {
            // SAFETY: as in write_u8; at() also checked the alignment.
            unsafe { (a as *mut u16).write_volatile(value.to_le()) }
        }
    }

    /// Writes the little-endian u32 at `offset` in one access (nothing outside or unaligned).
    pub fn write_u32(&self, offset: u64, value: u32) {
        if let Some(a) = self.at(offset, 4) {
            // SAFETY: as in write_u8; at() also checked the alignment.
            unsafe { (a as *mut u32).write_volatile(value.to_le()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_stay_in_the_hole() {
        assert!(Regs::new(0xd000_0000, 0x4000).is_some());
        assert!(Regs::new(0xe000_0000, 0x10_0000).is_some());
        assert!(Regs::new(0xffff_f000, 0x1000).is_some());
        assert!(Regs::new(0xffff_f000, 0x1001).is_none(), "past 4 GiB");
        assert!(Regs::new(0xbfff_f000, 0x2000).is_none(), "starts in RAM");
        assert!(Regs::new(0x1_0000_0000, 0x1000).is_none(), "above 4 GiB");
        assert!(Regs::new(u64::MAX, 2).is_none(), "wraps");
        let r = Regs::new(0xd000_0000, 0x4000).unwrap_or_else(|| unreachable!());
        assert_eq!((r.base(), r.len()), (0xd000_0000, 0x4000));
        assert_eq!(r.at(2, 2), Some(0xd000_0002));
        assert_eq!(r.at(2, 4), None, "unaligned");
        assert_eq!(r.at(0x3ffc, 4), Some(0xd000_3ffc));
        assert_eq!(r.at(0x3ffe, 4), None, "past the end");
    }
}
