//! Reading guest-physical memory that the VMM wrote: the zero page, the command line, ACPI
//! tables.
//!
//! Everything goes through the [`Mem`] trait, so that the parsers can be unit-tested on the host
//! with a byte vector, and so that every read is bounds-checked: a pointer in a VMM-built
//! structure that leads outside readable memory is an error for the check, never a fault.
//! [`PhysMem`] reads the real memory, a byte at a time with volatile reads (no alignment
//! assumption, no reads the compiler could merge or drop).

use core::fmt;

/// Start of the 32-bit MMIO hole: nothing at or above it is read as a guest structure (device
/// windows below 4 GiB, and memory above 4 GiB, which the probe does not map).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the first MiB, which is always RAM in a PC-style guest.
pub const LOW_MEMORY_END: u64 = 0x10_0000;

/// A read outside readable memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemError {
    /// First byte asked for.
    pub addr: u64,
    /// Number of bytes asked for.
    pub len: u64,
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes at 0x{:x} are outside readable memory",
            self.len, self.addr
        )
    }
}

/// Bounds-checked little-endian reads of guest-physical memory.
pub trait Mem {
    /// Fills `out` from `addr`, or fails without reading if any byte is outside readable memory.
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), MemError>;

    /// Reads a byte.
    fn read_u8(&self, addr: u64) -> Result<u8, MemError> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }

    /// Reads a little-endian u32.
    fn read_u32(&self, addr: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian u64.
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Most memory ranges [`PhysMem`] remembers from the e820 map.
const MAX_RANGES: usize = 128;

/// The guest's own physical memory, identity-mapped by the start code.
///
/// Readable: below the MMIO hole, never address 0, and either inside the first MiB or inside one
/// range of the e820 map (of any type: ACPI tables may be in reserved or ACPI ranges).
pub struct PhysMem {
    /// (start, end) of each e820 range, end exclusive; unused slots are (0, 0).
    ranges: [(u64, u64); MAX_RANGES],
    /// Number of used slots.
    count: usize,
    /// Whether everything below the MMIO hole is readable (before the e820 map is known).
    everything_low: bool,
}

impl PhysMem {
    /// Memory as known before the e820 map is read: anything below the MMIO hole. Only for
    /// reading the zero page, which holds the map.
    pub fn bootstrap() -> Self {
        Self {
            ranges: [(0, 0); MAX_RANGES],
            count: 0,
            everything_low: true,
        }
    }

    /// Memory as the e820 map describes it. `ranges` are (address, size) pairs; the map is not
    /// validated here (the boot check does that), only used to bound reads.
    pub fn from_ranges(ranges: impl Iterator<Item = (u64, u64)>) -> Self {
        let mut mem = Self {
            ranges: [(0, 0); MAX_RANGES],
            count: 0,
            everything_low: false,
        };
        for (addr, size) in ranges.take(MAX_RANGES) {
            if let Some(end) = addr.checked_add(size) {
                mem.ranges[mem.count] = (addr, end);
                mem.count += 1;
            }
        }
        mem
    }

    /// Whether `len` bytes at `addr` may be read.
    pub fn is_readable(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        if addr == 0 || end > MMIO_HOLE_START {
            return false;
        }
        self.everything_low
            || end <= LOW_MEMORY_END
            || self.ranges[..self.count]
                .iter()
                .any(|&(start, stop)| start <= addr && end <= stop)
    }
}

impl Mem for PhysMem {
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), MemError> {
        let len = out.len() as u64;
        if !self.is_readable(addr, len) {
            return Err(MemError { addr, len });
        }
        for (i, byte) in out.iter_mut().enumerate() {
            let ptr = (addr + i as u64) as *const u8;
            // SAFETY: is_readable() confirmed the whole range is non-null, below the MMIO hole
            // (so identity-mapped by the start code's page tables, which cover 0..4 GiB) and
            // inside the first MiB or an e820 range (so backed by guest memory, not a device).
            // A byte read has no alignment requirement. Volatile: the VMM wrote this memory
            // outside the compiler's view.
            *byte = unsafe { core::ptr::read_volatile(ptr) };
        }
        Ok(())
    }
}

/// A byte vector standing in for guest memory in unit tests.
#[cfg(test)]
pub struct TestMem {
    /// Guest-physical address of `bytes[0]`.
    pub base: u64,
    /// The memory.
    pub bytes: std::vec::Vec<u8>,
}

#[cfg(test)]
impl TestMem {
    /// `size` zero bytes at `base`.
    pub fn new(base: u64, size: usize) -> Self {
        Self {
            base,
            bytes: std::vec![0; size],
        }
    }

    /// Copies `data` to guest address `addr`.
    pub fn write(&mut self, addr: u64, data: &[u8]) {
        let off = (addr - self.base) as usize;
        self.bytes[off..off + data.len()].copy_from_slice(data);
    }
}

#[cfg(test)]
impl Mem for TestMem {
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), MemError> {
        let err = MemError {
            addr,
            len: out.len() as u64,
        };
        let off = addr.checked_sub(self.base).ok_or(err)? as usize;
        let end = off.checked_add(out.len()).ok_or(err)?;
        let src = self.bytes.get(off..end).ok_or(err)?;
        out.copy_from_slice(src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_allows_low_memory_only() {
        let mem = PhysMem::bootstrap();
        assert!(mem.is_readable(0x7000, 4096));
        assert!(mem.is_readable(0xbfff_f000, 0x1000));
        assert!(!mem.is_readable(0xbfff_f000, 0x1001));
        assert!(!mem.is_readable(0, 1));
        assert!(!mem.is_readable(u64::MAX, 2));
    }

    #[test]
    fn e820_bounds_reads() {
        let mem = PhysMem::from_ranges([(0, 0x9fc00), (0x10_0000, 0xff0_0000)].into_iter());
        assert!(mem.is_readable(0xe0000, 36), "first MiB is always readable");
        assert!(mem.is_readable(0x20000, 100));
        assert!(mem.is_readable(0x100_0000, 0x1000));
        assert!(!mem.is_readable(0xfff_ffff, 2), "crosses the end of RAM");
        assert!(!mem.is_readable(0x2000_0000, 1), "beyond RAM");
        assert!(!mem.is_readable(0xc000_0000, 4), "MMIO hole");
    }
}
