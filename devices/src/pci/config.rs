//! The configuration space of one type-0 PCI function: 4 KiB (the 256-byte legacy header and
//! capabilities, then the extended space, which here holds nothing and reads as zero), with a
//! write mask per bit so that the guest changes only what is writable, write-one-to-clear
//! bits, memory BARs whose size masks answer the guest's all-ones sizing, and a builder for the
//! capability list.
//!
//! This type is byte-granular and accepts any offset and length without panicking; the rules on
//! what a guest access may look like (1, 2 or 4 bytes inside one dword) are the root complex's
//! ([`super::root`]).

use super::PciError;

/// Size of a function's configuration space (PCI Express, reached through ECAM).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional (legacy) part, the only part configuration mechanism #1 reaches.
pub const LEGACY_CONFIG_SIZE: usize = 256;
/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Vendor ID register (16 bits).
pub const VENDOR_ID: usize = 0x00;
/// Device ID register (16 bits).
pub const DEVICE_ID: usize = 0x02;
/// Command register (16 bits); see [`command`].
pub const COMMAND: usize = 0x04;
/// Status register (16 bits); see [`status`].
pub const STATUS: usize = 0x06;
/// Revision ID (8 bits).
pub const REVISION_ID: usize = 0x08;
/// Programming interface, the low byte of the class code.
pub const CLASS_PROG_IF: usize = 0x09;
/// Sub-class, the middle byte of the class code.
pub const CLASS_SUBCLASS: usize = 0x0a;
/// Base class, the high byte of the class code.
pub const CLASS_BASE: usize = 0x0b;
/// Cache line size (8 bits, read-write, no effect).
pub const CACHE_LINE_SIZE: usize = 0x0c;
/// Header type (8 bits): 0, single function.
pub const HEADER_TYPE: usize = 0x0e;
/// The first BAR register; BAR `i` is at `BAR0 + 4 * i`.
pub const BAR0: usize = 0x10;
/// Subsystem vendor ID (16 bits).
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Subsystem ID (16 bits).
pub const SUBSYSTEM_ID: usize = 0x2e;
/// Expansion ROM BAR (none here: reads as zero).
pub const ROM_BAR: usize = 0x30;
/// Capabilities pointer (8 bits).
pub const CAPABILITY_POINTER: usize = 0x34;
/// Interrupt line (8 bits, read-write: what the platform routed INTx to).
pub const INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin (8 bits, read-only: 1 = INTA, 0 = none).
pub const INTERRUPT_PIN: usize = 0x3d;
/// Where the capability list starts: the first byte after the type-0 header.
pub const FIRST_CAPABILITY: usize = 0x40;

/// Command register bits.
pub mod command {
    /// I/O space decode (no I/O BARs exist here, so it changes nothing).
    pub const IO_SPACE: u16 = 1 << 0;
    /// Memory space decode: the function's memory BARs answer only while this is set.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// Bus master: the function may write memory (MSI-X messages, DMA).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx disable: the function must not assert its interrupt pin.
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// Every writable command bit.
    pub const WRITABLE: u16 = IO_SPACE | MEMORY_SPACE | BUS_MASTER | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    /// The function's INTx is asserted (read-only).
    pub const INTERRUPT: u16 = 1 << 3;
    /// The function has a capability list (read-only).
    pub const CAPABILITY_LIST: u16 = 1 << 4;
    /// Master data parity error (write one to clear).
    pub const MASTER_DATA_PARITY_ERROR: u16 = 1 << 8;
    /// Signaled target abort (write one to clear).
    pub const SIGNALED_TARGET_ABORT: u16 = 1 << 11;
    /// Received target abort (write one to clear).
    pub const RECEIVED_TARGET_ABORT: u16 = 1 << 12;
    /// Received master abort (write one to clear).
    pub const RECEIVED_MASTER_ABORT: u16 = 1 << 13;
    /// Signaled system error (write one to clear).
    pub const SIGNALED_SYSTEM_ERROR: u16 = 1 << 14;
    /// Detected parity error (write one to clear).
    pub const DETECTED_PARITY_ERROR: u16 = 1 << 15;
    /// The error bits a write of one clears. Nothing here ever sets them (there are no bus
    /// errors in a virtual machine), but they behave as the specification says.
    pub const WRITE_ONE_TO_CLEAR: u16 = MASTER_DATA_PARITY_ERROR
        | SIGNALED_TARGET_ABORT
        | RECEIVED_TARGET_ABORT
        | RECEIVED_MASTER_ABORT
        | SIGNALED_SYSTEM_ERROR
        | DETECTED_PARITY_ERROR;
}

/// The identity of a function, fixed at creation: read-only to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Base class code.
    pub class: u8,
    /// Sub-class code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// The width of a memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// A 32-bit memory BAR: one register, decodes below 4 GiB only.
    Memory32,
    /// A 64-bit memory BAR: two registers (the one named and the next).
    Memory64,
}

/// The window the VMM allocates a BAR in at build time. A guest may later move a 64-bit BAR
/// to either window; a 32-bit BAR only within the 32-bit one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarWindow {
    /// The window below 4 GiB (`PCI_MMIO32_START`).
    Mmio32,
    /// The window above RAM (`pci_mmio64_start`); only for [`BarKind::Memory64`].
    Mmio64,
}

/// What a memory BAR is: its width, size and where it is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// 32- or 64-bit.
    pub kind: BarKind,
    /// Its size in bytes: a power of two, at least 4 KiB (so that a BAR never shares a page
    /// with another, which KVM's memory slots and ioeventfds would not mind but a guest's
    /// page-granular mappings would).
    pub size: u64,
    /// The prefetchable bit the guest reads.
    pub prefetchable: bool,
    /// Where the VMM allocates it.
    pub window: BarWindow,
}

/// Smallest BAR this crate builds.
pub const MIN_BAR_SIZE: u64 = 0x1000;

/// Low bits of a memory BAR register: memory space, 64-bit type, prefetchable.
const BAR_TYPE_64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;
const BAR_FLAG_BITS: u32 = 0xf;

/// A function's configuration space.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    /// Per bit: may the guest change it.
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    /// Per bit: a guest write of one clears it.
    write_one_to_clear: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<BarSpec>; NUM_BARS],
    /// Where the next capability goes, and where the last one is (to link the next).
    next_capability: usize,
    last_capability: Option<usize>,
}

impl ConfigSpace {
    /// A type-0, single-function header with `ids`, no BARs, no capabilities, command 0 and
    /// interrupt pin `interrupt_pin` (0: none, 1: INTA).
    pub fn new(ids: PciIds, interrupt_pin: u8) -> Self {
        let mut c = Self {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            write_one_to_clear: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [None; NUM_BARS],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        c.set_u16(VENDOR_ID, ids.vendor);
        c.set_u16(DEVICE_ID, ids.device);
        c.set_u8(REVISION_ID, ids.revision);
        c.set_u8(CLASS_PROG_IF, ids.prog_if);
        c.set_u8(CLASS_SUBCLASS, ids.subclass);
        c.set_u8(CLASS_BASE, ids.class);
        c.set_u8(HEADER_TYPE, 0);
        c.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, ids.subsystem);
        c.set_u8(INTERRUPT_PIN, interrupt_pin);
        c.set_writable(COMMAND, &command::WRITABLE.to_le_bytes());
        c.write_one_to_clear[STATUS..STATUS + 2]
            .copy_from_slice(&status::WRITE_ONE_TO_CLEAR.to_le_bytes());
        c.set_writable(CACHE_LINE_SIZE, &[0xff]);
        if interrupt_pin != 0 {
            c.set_writable(INTERRUPT_LINE, &[0xff]);
        }
        c
    }

    /// The guest reads `data.len()` bytes at `offset`; bytes past the end read as all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// The guest writes `data` at `offset`: only writable bits change, write-one-to-clear bits
    /// written as one clear, everything else (bytes past the end included) is ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) else {
                return;
            };
            let w = self.writable[o];
            let clear = self.write_one_to_clear[o] & v;
            self.bytes[o] = ((self.bytes[o] & !w) | (v & w)) & !clear;
        }
    }

    /// The byte at `offset` (0xff past the end).
    pub fn u8_at(&self, offset: usize) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    /// The 16-bit value at `offset`.
    pub fn u16_at(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// The 32-bit value at `offset`.
    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// Whether the memory BARs decode (command register bit 1).
    pub fn memory_enabled(&self) -> bool {
        self.command() & command::MEMORY_SPACE != 0
    }

    /// Sets bytes as the device (not the guest) sees fit, whatever the masks say.
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if let Some(b) = offset.checked_add(i).and_then(|o| self.bytes.get_mut(o)) {
                *b = v;
            }
        }
    }

    /// Sets a byte, device side.
    pub fn set_u8(&mut self, offset: usize, v: u8) {
        self.set_bytes(offset, &[v]);
    }

    /// Sets a 16-bit value, device side.
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    /// Sets a 32-bit value, device side.
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    /// Sets the write mask of the bytes at `offset` (a one bit is guest-writable).
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        for (i, &m) in mask.iter().enumerate() {
            if let Some(b) = offset.checked_add(i).and_then(|o| self.writable.get_mut(o)) {
                *b = m;
            }
        }
    }

    /// Declares memory BAR `index`. A 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), PciError> {
        let bad = |reason: &str| PciError::BadBar {
            index,
            reason: reason.to_string(),
        };
        let regs = match spec.kind {
            BarKind::Memory32 => 1,
            BarKind::Memory64 => 2,
        };
        if index + regs > NUM_BARS {
            return Err(bad("past the last BAR register"));
        }
        if (index..index + regs).any(|i| self.bar_register_used(i)) {
            return Err(bad("register already in use"));
        }
        if !spec.size.is_power_of_two() || spec.size < MIN_BAR_SIZE {
            return Err(bad("size is not a power of two of at least 4 KiB"));
        }
        if spec.kind == BarKind::Memory32 {
            if spec.size > 1 << 31 {
                return Err(bad("a 32-bit BAR larger than 2 GiB"));
            }
            if spec.window == BarWindow::Mmio64 {
                return Err(bad("a 32-bit BAR cannot live in the 64-bit window"));
            }
        }
        let mask = !(spec.size - 1);
        let mut flags = if spec.prefetchable {
            BAR_PREFETCHABLE
        } else {
            0
        };
        if spec.kind == BarKind::Memory64 {
            flags |= BAR_TYPE_64;
        }
        let reg = BAR0 + 4 * index;
        self.set_u32(reg, flags);
        self.set_writable(reg, &((mask as u32) & !BAR_FLAG_BITS).to_le_bytes());
        if spec.kind == BarKind::Memory64 {
            self.set_u32(reg + 4, 0);
            self.set_writable(reg + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    /// Whether BAR register `i` belongs to a declared BAR (either half of a 64-bit one).
    fn bar_register_used(&self, i: usize) -> bool {
        self.bars[i].is_some()
            || (i > 0 && matches!(self.bars[i - 1], Some(b) if b.kind == BarKind::Memory64))
    }

    /// The declared BARs: index and what it is.
    pub fn bars(&self) -> impl Iterator<Item = (usize, BarSpec)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b)))
    }

    /// BAR `index`, if declared.
    pub fn bar(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` holds now (what the guest last wrote, or the VMM placed).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar(index)?;
        let reg = BAR0 + 4 * index;
        let low = u64::from(self.u32_at(reg) & !BAR_FLAG_BITS);
        Some(match spec.kind {
            BarKind::Memory32 => low,
            BarKind::Memory64 => low | (u64::from(self.u32_at(reg + 4)) << 32),
        })
    }

    /// Programs BAR `index` with `addr` (the VMM's allocation), as a guest write would, keeping
    /// the flag bits.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(spec) = self.bar(index) else {
            return;
        };
        let reg = BAR0 + 4 * index;
        self.write(reg, &((addr as u32) & !BAR_FLAG_BITS).to_le_bytes());
        if spec.kind == BarKind::Memory64 {
            self.write(reg + 4, &((addr >> 32) as u32).to_le_bytes());
        }
    }

    /// Appends a capability: `body` is the whole structure, its first byte the capability ID
    /// (the second, the next pointer, is filled in here); `writable` is the guest write mask of
    /// the same bytes (shorter: the rest is read-only; the ID and next pointer always are).
    /// Returns the capability's offset. Capabilities are dword-aligned, in the legacy space.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, PciError> {
        if body.len() < 2 {
            return Err(PciError::CapabilityTooShort(body.len()));
        }
        let offset = self.next_capability;
        let end = offset + body.len();
        if end > LEGACY_CONFIG_SIZE {
            return Err(PciError::CapabilitySpaceFull { needed: body.len() });
        }
        self.set_bytes(offset, body);
        self.set_u8(offset + 1, 0);
        let mut mask = writable.to_vec();
        mask.resize(body.len(), 0);
        mask[0] = 0;
        mask[1] = 0;
        self.set_writable(offset, &mask);
        match self.last_capability {
            Some(prev) => self.set_u8(prev + 1, offset as u8),
            None => {
                self.set_u8(CAPABILITY_POINTER, offset as u8);
                let s = self.u16_at(STATUS) | status::CAPABILITY_LIST;
                self.set_u16(STATUS, s);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = end.next_multiple_of(4);
        Ok(offset)
    }

    /// The capabilities, walked as a guest walks them from the capabilities pointer: (offset,
    /// ID). Stops at a pointer outside 0x40..0x100 or after 48 entries (a loop).
    pub fn capabilities(&self) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        if self.u16_at(STATUS) & status::CAPABILITY_LIST == 0 {
            return out;
        }
        let mut ptr = usize::from(self.u8_at(CAPABILITY_POINTER) & !3);
        while (FIRST_CAPABILITY..LEGACY_CONFIG_SIZE).contains(&ptr) && out.len() < 48 {
            out.push((ptr, self.u8_at(ptr)));
            ptr = usize::from(self.u8_at(ptr + 1) & !3);
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const IDS: PciIds = PciIds {
        vendor: 0x1af4,
        device: 0x1044,
        revision: 1,
        class: 0xff,
        subclass: 0,
        prog_if: 0,
        subsystem_vendor: 0x1af4,
        subsystem: 0x44,
    };

    fn bar(kind: BarKind, size: u64) -> BarSpec {
        BarSpec {
            kind,
            size,
            prefetchable: false,
            window: BarWindow::Mmio32,
        }
    }

    /// A function with a 32-bit BAR 0 (64 KiB), a prefetchable 64-bit BAR 2 (8 GiB) and two
    /// capabilities.
    pub(crate) fn sample() -> ConfigSpace {
        let mut c = ConfigSpace::new(IDS, 1);
        c.add_bar(0, bar(BarKind::Memory32, 0x1_0000)).unwrap();
        c.add_bar(
            2,
            BarSpec {
                kind: BarKind::Memory64,
                size: 8 << 30,
                prefetchable: true,
                window: BarWindow::Mmio64,
            },
        )
        .unwrap();
        c.add_capability(&[0x09, 0, 8, 1, 2, 3, 4, 5], &[0, 0, 0, 0xff])
            .unwrap();
        c.add_capability(&[0x11, 0, 0, 0, 0, 0], &[]).unwrap();
        c
    }

    fn read(c: &ConfigSpace, off: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn write(c: &mut ConfigSpace, off: usize, len: usize, v: u32) {
        c.write(off, &v.to_le_bytes()[..len]);
    }

    #[test]
    fn identity_and_header_are_read_only() {
        let mut c = sample();
        let before = c.clone();
        for off in [
            VENDOR_ID,
            DEVICE_ID,
            REVISION_ID,
            CLASS_PROG_IF,
            HEADER_TYPE,
            SUBSYSTEM_VENDOR_ID,
            CAPABILITY_POINTER,
            INTERRUPT_PIN,
            ROM_BAR,
        ] {
            write(&mut c, off & !3, 4, 0xffff_ffff);
            write(&mut c, off & !3, 4, 0);
        }
        for off in (0..0x40)
            .step_by(4)
            .filter(|o| ![4, 0xc, 0x10, 0x18, 0x1c, 0x3c].contains(o))
        {
            assert_eq!(read(&c, off, 4), read(&before, off, 4), "offset {off:#x}");
        }
        assert_eq!(read(&c, VENDOR_ID, 2), 0x1af4);
        assert_eq!(read(&c, DEVICE_ID, 2), 0x1044);
        assert_eq!(read(&c, CLASS_PROG_IF, 3), 0xff_00_00);
        assert_eq!(c.u8_at(INTERRUPT_PIN), 1);
    }

    #[test]
    fn command_line_and_cache_line_round_trip_only_their_bits() {
        let mut c = sample();
        write(&mut c, COMMAND, 2, 0xffff);
        assert_eq!(c.command(), command::WRITABLE);
        assert!(c.memory_enabled());
        write(&mut c, COMMAND, 1, 0);
        assert_eq!(c.command(), command::INTX_DISABLE);
        write(&mut c, INTERRUPT_LINE, 1, 0x0b);
        assert_eq!(c.u8_at(INTERRUPT_LINE), 0x0b);
        write(&mut c, CACHE_LINE_SIZE, 1, 0x10);
        assert_eq!(c.u8_at(CACHE_LINE_SIZE), 0x10);
        // Latency timer, header type and BIST stay.
        write(&mut c, CACHE_LINE_SIZE, 4, 0xffff_ffff);
        assert_eq!(read(&c, CACHE_LINE_SIZE, 4), 0xff);
    }

    #[test]
    fn status_capability_bit_is_read_only_and_error_bits_clear_on_one() {
        let mut c = sample();
        assert_eq!(c.u16_at(STATUS), status::CAPABILITY_LIST);
        c.set_u16(
            STATUS,
            status::CAPABILITY_LIST | status::RECEIVED_MASTER_ABORT | status::INTERRUPT,
        );
        write(&mut c, STATUS, 2, 0);
        assert_eq!(
            c.u16_at(STATUS),
            status::CAPABILITY_LIST | status::RECEIVED_MASTER_ABORT | status::INTERRUPT,
            "zeros change nothing"
        );
        write(&mut c, STATUS, 2, 0xffff);
        assert_eq!(
            c.u16_at(STATUS),
            status::CAPABILITY_LIST | status::INTERRUPT,
            "ones clear only the error bits"
        );
        // A dword write to the command register does not disturb status.
        c.set_u16(
            STATUS,
            status::CAPABILITY_LIST | status::SIGNALED_SYSTEM_ERROR,
        );
        write(&mut c, COMMAND, 4, u32::from(command::MEMORY_SPACE));
        assert_eq!(
            c.u16_at(STATUS),
            status::CAPABILITY_LIST | status::SIGNALED_SYSTEM_ERROR
        );
    }

    #[test]
    fn bar_sizing_32_bit() {
        let mut c = sample();
        write(&mut c, BAR0, 4, 0xffff_ffff);
        assert_eq!(
            read(&c, BAR0, 4),
            0xffff_0000,
            "64 KiB, 32-bit, not prefetchable"
        );
        write(&mut c, BAR0, 4, 0xd000_1234);
        assert_eq!(read(&c, BAR0, 4), 0xd000_0000, "low bits are the size");
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        // Byte writes of the flag byte change nothing there.
        write(&mut c, BAR0, 1, 0xff);
        assert_eq!(read(&c, BAR0, 4), 0xd000_0000);
        // The unused registers stay zero.
        write(&mut c, BAR0 + 4, 4, 0xffff_ffff);
        assert_eq!(read(&c, BAR0 + 4, 4), 0);
        assert_eq!(c.bar_address(1), None);
    }

    #[test]
    fn bar_sizing_64_bit_both_halves() {
        let mut c = sample();
        let lo = BAR0 + 8;
        let hi = BAR0 + 12;
        assert_eq!(read(&c, lo, 4), 0b1100, "64-bit, prefetchable");
        write(&mut c, lo, 4, 0xffff_ffff);
        write(&mut c, hi, 4, 0xffff_ffff);
        let size = (u64::from(read(&c, hi, 4)) << 32) | u64::from(read(&c, lo, 4) & !0xf);
        assert_eq!(
            !size + 1,
            8 << 30,
            "8 GiB: bits 0..32 of the high half are the size"
        );
        assert_eq!(read(&c, lo, 4), 0xc, "below 4 GiB nothing is writable");
        assert_eq!(read(&c, hi, 4), 0xffff_fffe);
        c.set_bar_address(2, 0x12_0000_0000);
        assert_eq!(c.bar_address(2), Some(0x12_0000_0000));
        assert_eq!(read(&c, hi, 4), 0x12);
        // Sizing only the high half (as a guest does after the low one).
        write(&mut c, hi, 4, 0xffff_ffff);
        assert_eq!(read(&c, hi, 4), 0xffff_fffe);
        write(&mut c, hi, 4, 0x12);
        assert_eq!(c.bar_address(2), Some(0x12_0000_0000));
    }

    #[test]
    fn bar_declarations_are_checked() {
        let mut c = ConfigSpace::new(IDS, 0);
        let b32 = bar(BarKind::Memory32, 0x1000);
        let b64 = bar(BarKind::Memory64, 0x1000);
        assert!(
            c.add_bar(5, b64).is_err(),
            "a 64-bit BAR in the last register"
        );
        assert!(c.add_bar(6, b32).is_err());
        assert!(c.add_bar(0, bar(BarKind::Memory32, 0x1800)).is_err());
        assert!(c.add_bar(0, bar(BarKind::Memory32, 0x800)).is_err());
        assert!(c.add_bar(0, bar(BarKind::Memory32, 1 << 32)).is_err());
        let mut high32 = b32;
        high32.window = BarWindow::Mmio64;
        assert!(c.add_bar(0, high32).is_err());
        c.add_bar(0, b64).unwrap();
        assert!(c.add_bar(1, b32).is_err(), "the high half of BAR 0");
        assert!(c.add_bar(0, b32).is_err());
        c.add_bar(2, b32).unwrap();
        assert_eq!(c.bars().map(|(i, _)| i).collect::<Vec<_>>(), [0, 2]);
        // No interrupt pin: the line is read-only.
        write(&mut c, INTERRUPT_LINE, 1, 5);
        assert_eq!(c.u8_at(INTERRUPT_LINE), 0);
    }

    #[test]
    fn capability_chain_walks_and_keeps_pointers_read_only() {
        let mut c = sample();
        assert_eq!(c.u8_at(CAPABILITY_POINTER), 0x40);
        assert_eq!(c.capabilities(), [(0x40, 0x09), (0x48, 0x11)]);
        // The ID and next pointer are read-only; the writable byte is writable.
        write(&mut c, 0x40, 4, 0xffff_ffff);
        assert_eq!(read(&c, 0x40, 4), 0xff_08_48_09);
        assert_eq!(c.capabilities(), [(0x40, 0x09), (0x48, 0x11)]);
        write(&mut c, 0x44, 4, 0xffff_ffff);
        assert_eq!(
            read(&c, 0x44, 4),
            0x05_04_03_02,
            "the rest of the body is read-only"
        );
        // Full capability space.
        let mut c = ConfigSpace::new(IDS, 0);
        for _ in 0..48 {
            c.add_capability(&[9, 0, 4, 0], &[]).unwrap();
        }
        assert!(matches!(
            c.add_capability(&[9, 0, 4, 0], &[]),
            Err(PciError::CapabilitySpaceFull { .. })
        ));
        assert_eq!(c.capabilities().len(), 48);
        assert!(c.add_capability(&[9], &[]).is_err());
    }

    #[test]
    fn every_size_at_every_offset_never_panics_and_keeps_read_only_bits() {
        for len in [1usize, 2, 4, 8] {
            let mut c = sample();
            let ro_before: Vec<u8> = (0..CONFIG_SPACE_SIZE)
                .map(|o| c.bytes[o] & !c.writable[o] & !c.write_one_to_clear[o])
                .collect();
            for off in 0..CONFIG_SPACE_SIZE + 8 {
                let mut d = vec![0u8; len];
                c.read(off, &mut d);
                c.write(off, &vec![0xff; len]);
                c.write(off, &vec![0x5a; len]);
            }
            for (o, &ro) in ro_before.iter().enumerate() {
                assert_eq!(
                    c.bytes[o] & !c.writable[o] & !c.write_one_to_clear[o],
                    ro,
                    "read-only bits at {o:#x} changed by {len}-byte writes"
                );
                // Writable bits hold the last value written.
                assert_eq!(c.bytes[o] & c.writable[o], 0x5a & c.writable[o]);
            }
            let mut d = [0u8; 4];
            c.read(CONFIG_SPACE_SIZE - 2, &mut d);
            assert_eq!(d[2..], [0xff, 0xff], "past the end reads all-ones");
            c.read(usize::MAX, &mut d);
            assert_eq!(d, [0xff; 4]);
            c.write(usize::MAX - 1, &[1, 2, 3, 4]);
        }
    }
}
