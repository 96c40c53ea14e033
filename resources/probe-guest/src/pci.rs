//! PCI as the probe sees it: the configuration space of bus 0, reached two ways (ECAM, the
//! memory-mapped region the ACPI MCFG table names, and configuration mechanism #1, ports
//! 0xcf8/0xcfc), and what it says: header fields, BARs, the capability list, virtio-pci's
//! vendor-specific capabilities (virtio 1.2, 4.1.4) and MSI-X.
//!
//! The parsers are pure functions over a 256-byte snapshot ([`ConfigSpace`]) or over a
//! [`ConfigAccess`] (the BAR sizing procedure), unit-tested on the host with a fake
//! configuration space; a hostile or broken device gives an error here, never a fault or a
//! loop. Policy (what the `pci` check requires) lives in `checks::pci`; the virtio-pci transport
//! in `virtio::pci`; finding the devices for the checks in `discovery`.
//!
//! ```text
//! CF8 address: 1 (enable) | reserved 30:24 | bus 23:16 | device 15:11 | function 10:8 | reg 7:2 | 00
//! ECAM offset: bus << 20 | device << 15 | function << 12 | register (0..4096)
//! MCFG: header (36), reserved (8), then per entry: base u64, segment u16, first bus, last bus,
//!       reserved u32 (16 bytes)
//! virtio cap (id 0x09): id, next, cap_len, cfg_type, bar, id, pad[2], offset u32, length u32
//!       [NOTIFY: notify_off_multiplier u32; PCI_CFG: pci_cfg_data[4]]
//! MSI-X cap (id 0x11): id, next, message control u16 (table size - 1 in 10:0, function mask
//!       14, enable 15), table offset|BIR u32, PBA offset|BIR u32
//! ```

use core::fmt;

use crate::acpi::{self, AcpiError};
use crate::io;
use crate::mmio::Regs;
use crate::phys::{Mem, MemError};

#[cfg(test)]
mod tests;

/// Bytes of configuration space that mechanism #1 reaches (and that the probe reads).
pub const CONFIG_SPACE_LEN: usize = 256;
/// Devices on a bus.
pub const DEVICES: u8 = 32;
/// Functions of a device.
pub const FUNCTIONS: u8 = 8;

/// Header: vendor ID (u16).
pub const VENDOR_ID: u16 = 0x00;
/// Header: command (u16).
pub const COMMAND: u16 = 0x04;
/// Header: status (u16).
pub const STATUS: u16 = 0x06;
/// Header: the first BAR.
pub const BAR0: u16 = 0x10;
/// Header: the capabilities pointer (u8).
pub const CAP_PTR: u16 = 0x34;
/// Header: the interrupt line (u8).
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Header: the interrupt pin (u8).
pub const INTERRUPT_PIN: u16 = 0x3d;

/// Command: I/O space decode.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command: memory space decode.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master (the device may do DMA).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: the capabilities pointer is valid.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Header type: the device has functions beyond 0.
pub const HEADER_MULTI_FUNCTION: u8 = 0x80;

/// Capability ID: vendor-specific (virtio's structures).
pub const CAP_VENDOR: u8 = 0x09;
/// Capability ID: MSI-X.
pub const CAP_MSIX: u8 = 0x11;
/// Lowest offset a capability may have (past the header).
pub const CAP_MIN_OFFSET: u8 = 0x40;
/// Most capabilities a list can hold (one per dword past the header).
pub const MAX_CAPS: usize = (CONFIG_SPACE_LEN - CAP_MIN_OFFSET as usize) / 4;

/// The virtio vendor ID (Red Hat, Inc.).
pub const VENDOR_VIRTIO: u16 = 0x1af4;
/// Device ID of a modern (non-transitional) virtio device: this plus the virtio device type.
pub const DEVICE_VIRTIO_MODERN: u16 = 0x1040;
/// Past the last modern virtio device ID.
pub const DEVICE_VIRTIO_END: u16 = 0x1080;
/// Transitional virtio device IDs start here (0x1000..0x1040).
pub const DEVICE_VIRTIO_TRANSITIONAL: u16 = 0x1000;

/// virtio cfg_type: common configuration.
pub const VIRTIO_CAP_COMMON: u8 = 1;
/// virtio cfg_type: notifications.
pub const VIRTIO_CAP_NOTIFY: u8 = 2;
/// virtio cfg_type: ISR status.
pub const VIRTIO_CAP_ISR: u8 = 3;
/// virtio cfg_type: device-specific configuration.
pub const VIRTIO_CAP_DEVICE: u8 = 4;
/// virtio cfg_type: the PCI configuration access window.
pub const VIRTIO_CAP_PCI_CFG: u8 = 5;
/// A virtio capability's bytes (notify and PCI_CFG have four more).
const VIRTIO_CAP_LEN: u8 = 16;
/// Highest BAR index a virtio capability may name (others are reserved: ignored).
const MAX_BAR: u8 = 5;

/// MSI-X message control: enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// MSI-X message control: function mask (no vector may send; pending bits collect instead).
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes of an MSI-X table entry.
pub const MSIX_ENTRY_LEN: u64 = 16;
/// Bytes of the MSI-X capability.
const MSIX_CAP_LEN: usize = 12;

/// Configuration mechanism #1: the address port.
pub const CF8_ADDRESS_PORT: u16 = 0xcf8;
/// Configuration mechanism #1: the data port.
pub const CF8_DATA_PORT: u16 = 0xcfc;
/// Configuration mechanism #1: the enable bit of the address.
const CF8_ENABLE: u32 = 1 << 31;

/// Bytes of ECAM space per bus.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Addresses

/// A function's address: bus, device (0..32), function (0..8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device, below 32.
    pub dev: u8,
    /// Function, below 8.
    pub func: u8,
}

impl Bdf {
    /// The address, if `dev` and `func` are in range.
    #[cfg(test)]
    pub const fn new(bus: u8, dev: u8, func: u8) -> Option<Self> {
        if dev < DEVICES && func < FUNCTIONS {
            Some(Self { bus, dev, func })
        } else {
            None
        }
    }

    /// Every function of bus `bus`, in order (device-major).
    pub fn all_on(bus: u8) -> impl Iterator<Item = Bdf> {
        (0..DEVICES).flat_map(move |dev| (0..FUNCTIONS).map(move |func| Bdf { bus, dev, func }))
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// The mechanism #1 address (for port 0xcf8) of the dword at `offset` of `bdf`'s
/// configuration space; `None` unless `offset` is a dword offset below 256 and `bdf` valid.
pub fn cf8_address(bdf: Bdf, offset: u16) -> Option<u32> {
    if usize::from(offset) >= CONFIG_SPACE_LEN
        || !offset.is_multiple_of(4)
        || bdf.dev >= DEVICES
        || bdf.func >= FUNCTIONS
    {
        return None;
    }
    Some(
        CF8_ENABLE
            | u32::from(bdf.bus) << 16
            | u32::from(bdf.dev) << 11
            | u32::from(bdf.func) << 8
            | u32::from(offset),
    )
}

/// The offset in an ECAM region (whose first bus is `first_bus`) of byte `offset` (below 4096)
/// of `bdf`'s configuration space; `None` when the bus is below `first_bus` or `offset` or
/// `bdf` is out of range.
pub fn ecam_offset(first_bus: u8, bdf: Bdf, offset: u16) -> Option<u64> {
    let bus = bdf.bus.checked_sub(first_bus)?;
    if offset >= 4096 || bdf.dev >= DEVICES || bdf.func >= FUNCTIONS {
        return None;
    }
    Some(
        u64::from(bus) << 20
            | u64::from(bdf.dev) << 15
            | u64::from(bdf.func) << 12
            | u64::from(offset),
    )
}

// ---------------------------------------------------------------------------------------------
// Access

/// Dword access to configuration space. A read nobody answers is all-ones.
pub trait ConfigAccess {
    /// Reads the dword at `offset` (a multiple of 4 below 256) of `bdf`.
    fn read_u32(&self, bdf: Bdf, offset: u16) -> u32;
    /// Writes the dword at `offset` (a multiple of 4 below 256) of `bdf`.
    fn write_u32(&self, bdf: Bdf, offset: u16, value: u32);
}

/// The ECAM region of buses `first_bus..=last_bus` (1 MiB each), in the MMIO hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ecam {
    regs: Regs,
    first_bus: u8,
    last_bus: u8,
}

impl Ecam {
    /// The region at `base` for buses `first_bus..=last_bus`, if that lies in the MMIO hole.
    pub fn new(base: u64, first_bus: u8, last_bus: u8) -> Option<Self> {
        let buses = u64::from(last_bus.checked_sub(first_bus)?) + 1;
        let regs = Regs::new(base, buses * ECAM_BUS_SIZE)?;
        Some(Self {
            regs,
            first_bus,
            last_bus,
        })
    }

    /// Its base address.
    pub fn base(&self) -> u64 {
        self.regs.base()
    }

    fn offset(&self, bdf: Bdf, offset: u16) -> Option<u64> {
        if bdf.bus > self.last_bus || usize::from(offset) >= CONFIG_SPACE_LEN {
            return None;
        }
        ecam_offset(self.first_bus, bdf, offset)
    }
}

impl ConfigAccess for Ecam {
    fn read_u32(&self, bdf: Bdf, offset: u16) -> u32 {
        match self.offset(bdf, offset) {
            Some(o) => self.regs.read_u32(o),
            None => u32::MAX,
        }
    }

    fn write_u32(&self, bdf: Bdf, offset: u16, value: u32) {
        if let Some(o) = self.offset(bdf, offset) {
            self.regs.write_u32(o, value);
        }
    }
}

/// Configuration mechanism #1: the address to port 0xcf8, the dword from/to port 0xcfc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortIo;

impl ConfigAccess for PortIo {
    fn read_u32(&self, bdf: Bdf, offset: u16) -> u32 {
        let Some(address) = cf8_address(bdf, offset) else {
            return u32::MAX;
        };
        // SAFETY: the configuration ports only select and read a configuration register; a read
        // has no effect on memory.
        unsafe {
            io::outl(CF8_ADDRESS_PORT, address);
            io::inl(CF8_DATA_PORT)
        }
    }

    fn write_u32(&self, bdf: Bdf, offset: u16, value: u32) {
        let Some(address) = cf8_address(bdf, offset) else {
            return;
        };
        // SAFETY: the probe writes configuration registers only to size BARs (memory decode
        // off) and to set up its own drivers; no device is pointed at memory Rust code uses.
        unsafe {
            io::outl(CF8_ADDRESS_PORT, address);
            io::outl(CF8_DATA_PORT, value);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The header

/// A function's first 256 bytes of configuration space, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSpace(pub [u8; CONFIG_SPACE_LEN]);

impl ConfigSpace {
    /// Reads `bdf`'s 256 bytes, a dword at a time.
    pub fn read(c: &impl ConfigAccess, bdf: Bdf) -> Self {
        let mut bytes = [0u8; CONFIG_SPACE_LEN];
        for (i, dword) in bytes.chunks_exact_mut(4).enumerate() {
            dword.copy_from_slice(&c.read_u32(bdf, (i * 4) as u16).to_le_bytes());
        }
        Self(bytes)
    }

    /// The byte at `offset` (0xff past the end).
    pub fn u8(&self, offset: usize) -> u8 {
        self.0.get(offset).copied().unwrap_or(u8::MAX)
    }

    /// The little-endian u16 at `offset`.
    pub fn u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.u8(offset), self.u8(offset + 1)])
    }

    /// The little-endian u32 at `offset`.
    pub fn u32(&self, offset: usize) -> u32 {
        u32::from(self.u16(offset)) | u32::from(self.u16(offset + 2)) << 16
    }

    /// Vendor ID (0xffff: no function).
    pub fn vendor(&self) -> u16 {
        self.u16(0)
    }

    /// Device ID.
    pub fn device(&self) -> u16 {
        self.u16(2)
    }

    /// Command register.
    pub fn command(&self) -> u16 {
        self.u16(usize::from(COMMAND))
    }

    /// Status register.
    pub fn status(&self) -> u16 {
        self.u16(usize::from(STATUS))
    }

    /// Revision ID.
    pub fn revision(&self) -> u8 {
        self.u8(0x08)
    }

    /// Class code: (base class, subclass, programming interface).
    pub fn class(&self) -> (u8, u8, u8) {
        (self.u8(0x0b), self.u8(0x0a), self.u8(0x09))
    }

    /// Header layout (0: a device; 1: a PCI-to-PCI bridge), without the multi-function bit.
    pub fn header_layout(&self) -> u8 {
        self.u8(0x0e) & !HEADER_MULTI_FUNCTION
    }

    /// Whether the header type's multi-function bit is set.
    pub fn multi_function(&self) -> bool {
        self.u8(0x0e) & HEADER_MULTI_FUNCTION != 0
    }

    /// BAR register `i` (0..6) as read.
    pub fn bar_raw(&self, i: usize) -> u32 {
        self.u32(usize::from(BAR0) + 4 * i)
    }

    /// The first offset at which two snapshots differ.
    pub fn first_difference(&self, other: &Self) -> Option<usize> {
        self.0.iter().zip(other.0.iter()).position(|(a, b)| a != b)
    }
}

// ---------------------------------------------------------------------------------------------
// BARs

/// What a BAR register says, before sizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bar {
    /// Reads 0: not implemented, or no address assigned.
    #[default]
    Empty,
    /// An I/O BAR at this port.
    Io(u32),
    /// A 32-bit memory BAR at this address.
    Mem32 {
        /// Base address.
        base: u64,
        /// Prefetchable.
        prefetchable: bool,
    },
    /// A 64-bit memory BAR at this address (the next register holds the upper half).
    Mem64 {
        /// Base address.
        base: u64,
        /// Prefetchable.
        prefetchable: bool,
    },
    /// The upper half of the 64-bit BAR before it.
    Upper,
    /// A memory BAR of a reserved type (1, "below 1 MiB", or 3), or a 64-bit BAR in the last
    /// register: this raw value.
    Bad(u32),
}

impl Bar {
    /// A memory BAR's base address.
    pub fn memory_base(&self) -> Option<u64> {
        match *self {
            Self::Mem32 { base, .. } | Self::Mem64 { base, .. } => Some(base),
            _ => None,
        }
    }
}

impl fmt::Display for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Empty => write!(f, "empty"),
            Self::Io(port) => write!(f, "I/O 0x{port:x}"),
            Self::Mem32 { base, .. } => write!(f, "32-bit memory at 0x{base:x}"),
            Self::Mem64 { base, .. } => write!(f, "64-bit memory at 0x{base:x}"),
            Self::Upper => write!(f, "upper half"),
            Self::Bad(raw) => write!(f, "reserved type (raw 0x{raw:08x})"),
        }
    }
}

/// Decodes the six BAR registers of a type 0 header.
pub fn decode_bars(cfg: &ConfigSpace) -> [Bar; 6] {
    let mut bars = [Bar::Empty; 6];
    let mut i = 0;
    while i < 6 {
        let raw = cfg.bar_raw(i);
        let prefetchable = raw & 0x8 != 0;
        let base = u64::from(raw & !0xf);
        let mut next = i + 1;
        bars[i] = if raw == 0 {
            Bar::Empty
        } else if raw & 1 != 0 {
            Bar::Io(raw & !0x3)
        } else {
            match (raw >> 1) & 0x3 {
                0 => Bar::Mem32 { base, prefetchable },
                2 if i < 5 => {
                    bars[i + 1] = Bar::Upper;
                    next = i + 2;
                    Bar::Mem64 {
                        base: u64::from(cfg.bar_raw(i + 1)) << 32 | base,
                        prefetchable,
                    }
                }
                _ => Bar::Bad(raw),
            }
        };
        i = next;
    }
    bars
}

/// Why a BAR's size cannot be read from its mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// No address bit is writable: not implemented.
    Unimplemented,
    /// The writable bits are not one run from the top: this mask.
    NotContiguous(u64),
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Unimplemented => write!(f, "no writable address bits"),
            Self::NotContiguous(mask) => write!(
                f,
                "address mask 0x{mask:x} is not contiguous (size not a power of two)"
            ),
        }
    }
}

/// The size a memory BAR decodes, from what its register reads after all-ones were written:
/// `low`, and `high` (the upper register) for a 64-bit BAR. The size is the lowest writable
/// address bit; the writable bits must run from there to the top.
pub fn memory_bar_size(low: u32, high: Option<u32>) -> Result<u64, SizeError> {
    let low_mask = u64::from(low & !0xf);
    let mask = match high {
        Some(h) => u64::from(h) << 32 | low_mask,
        // A 32-bit BAR: the bits above 4 GiB do not exist; count them as fixed.
        None => 0xffff_ffff_0000_0000 | low_mask,
    };
    let size = (!mask).wrapping_add(1);
    if size == 0 || (high.is_none() && low_mask == 0) {
        return Err(SizeError::Unimplemented);
    }
    if !size.is_power_of_two() || mask != !(size - 1) {
        return Err(SizeError::NotContiguous(mask));
    }
    Ok(size)
}

/// The size an I/O BAR decodes, from what it reads after all-ones were written (the upper 16
/// bits may read 0: 64 KiB of ports).
pub fn io_bar_size(low: u32) -> Result<u64, SizeError> {
    let mut mask = low & !0x3;
    if mask == 0 {
        return Err(SizeError::Unimplemented);
    }
    if mask & 0xffff_0000 == 0 {
        mask |= 0xffff_0000;
    }
    let size = (!mask).wrapping_add(1);
    if !size.is_power_of_two() || mask != !(size - 1) {
        return Err(SizeError::NotContiguous(u64::from(mask)));
    }
    Ok(u64::from(size))
}

/// What sizing one BAR found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizedBar {
    /// The BAR as decoded before sizing.
    pub bar: Bar,
    /// Its size, or why there is none.
    pub size: Result<u64, SizeError>,
    /// What the register(s) read after all-ones were written (low, high).
    pub mask: (u32, u32),
    /// The value(s) written back did not read back: (register offset, written, read).
    pub not_restored: Option<(u16, u32, u32)>,
}

/// What [`size_bars`] found: the six BARs' sizes, and whether the command register came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSizes {
    /// One per BAR register (an `Upper` half repeats nothing: size Unimplemented).
    pub bars: [SizedBar; 6],
    /// The command register before.
    pub command: u16,
    /// The command register read back after it was restored, if it differs.
    pub command_not_restored: Option<u16>,
}

/// Sizes the BARs of `bdf` (whose header `cfg` was read) as firmware does: I/O and memory
/// decode off in the command register, all-ones written to each BAR register (both halves of
/// a 64-bit BAR), the mask read, the original value written back and read back, then the
/// command register restored and read back.
pub fn size_bars(c: &impl ConfigAccess, bdf: Bdf, cfg: &ConfigSpace) -> BarSizes {
    let command = cfg.command();
    let dword = c.read_u32(bdf, COMMAND);
    // The status half is written as 0: its error bits are write-1-to-clear.
    let without_status = dword & 0xffff;
    c.write_u32(
        bdf,
        COMMAND,
        without_status & !u32::from(COMMAND_IO | COMMAND_MEMORY),
    );
    let bars = decode_bars(cfg);
    let mut sized = [SizedBar {
        bar: Bar::Empty,
        size: Err(SizeError::Unimplemented),
        mask: (0, 0),
        not_restored: None,
    }; 6];
    for (i, bar) in bars.iter().enumerate() {
        sized[i].bar = *bar;
        if *bar == Bar::Upper {
            continue;
        }
        let reg = BAR0 + 4 * i as u16;
        let wide = matches!(bar, Bar::Mem64 { .. });
        let original = (cfg.bar_raw(i), if wide { cfg.bar_raw(i + 1) } else { 0 });
        c.write_u32(bdf, reg, u32::MAX);
        if wide {
            c.write_u32(bdf, reg + 4, u32::MAX);
        }
        let low = c.read_u32(bdf, reg);
        let high = if wide { c.read_u32(bdf, reg + 4) } else { 0 };
        c.write_u32(bdf, reg, original.0);
        if wide {
            c.write_u32(bdf, reg + 4, original.1);
        }
        sized[i].mask = (low, high);
        sized[i].size = match bar {
            Bar::Io(_) => io_bar_size(low),
            Bar::Mem64 { .. } => memory_bar_size(low, Some(high)),
            // An empty register is sized as a 32-bit memory BAR would be (it may be an I/O
            // BAR without a port, which sizing reveals).
            Bar::Empty if low & 1 != 0 => io_bar_size(low),
            _ => memory_bar_size(low, None),
        };
        let back = c.read_u32(bdf, reg);
        if back != original.0 {
            sized[i].not_restored = Some((reg, original.0, back));
        } else if wide {
            let back = c.read_u32(bdf, reg + 4);
            if back != original.1 {
                sized[i].not_restored = Some((reg + 4, original.1, back));
            }
        }
    }
    c.write_u32(bdf, COMMAND, without_status);
    let after = c.read_u32(bdf, COMMAND) as u16;
    BarSizes {
        bars: sized,
        command,
        command_not_restored: (after != command).then_some(after),
    }
}

// ---------------------------------------------------------------------------------------------
// Capabilities

/// A capability in the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Its offset in configuration space.
    pub offset: u8,
    /// Its ID.
    pub id: u8,
}

/// What is wrong with a capability list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapError {
    /// The pointer at offset `from` (0x34, or a capability's next field) is `to`: below 0x40,
    /// past 0xfc or not a multiple of 4.
    Pointer {
        /// Where the pointer is.
        from: u8,
        /// Its value.
        to: u8,
    },
    /// The pointer at `from` leads back to the capability at `to`: a loop.
    Loop {
        /// Where the pointer is.
        from: u8,
        /// The capability seen before.
        to: u8,
    },
}

impl fmt::Display for CapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Pointer { from, to } => write!(
                f,
                "capability pointer at 0x{from:02x} is 0x{to:02x} (expected 0, or a multiple of \
                 4 in 0x40..=0xfc)"
            ),
            Self::Loop { from, to } => write!(
                f,
                "capability pointer at 0x{from:02x} leads back to 0x{to:02x} (a loop)"
            ),
        }
    }
}

/// The capabilities of a function, in list order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    list: [Cap; MAX_CAPS],
    len: usize,
}

impl Caps {
    /// The capabilities.
    pub fn as_slice(&self) -> &[Cap] {
        &self.list[..self.len]
    }
}

/// Walks the capability list (none unless the status register says there is one): every
/// pointer a multiple of 4 in 0x40..=0xfc, no capability visited twice. A broken list is an
/// error, whatever the capabilities before it.
pub fn capabilities(cfg: &ConfigSpace) -> Result<Caps, CapError> {
    let mut caps = Caps {
        list: [Cap { offset: 0, id: 0 }; MAX_CAPS],
        len: 0,
    };
    if cfg.status() & STATUS_CAP_LIST == 0 {
        return Ok(caps);
    }
    let mut seen = 0u64;
    let mut from = CAP_PTR as u8;
    let mut ptr = cfg.u8(usize::from(CAP_PTR));
    while ptr != 0 {
        if !(CAP_MIN_OFFSET..=0xfc).contains(&ptr) || !ptr.is_multiple_of(4) {
            return Err(CapError::Pointer { from, to: ptr });
        }
        let bit = 1u64 << (ptr / 4);
        if seen & bit != 0 {
            return Err(CapError::Loop { from, to: ptr });
        }
        seen |= bit;
        // At most one entry per dword from 0x40: the list cannot overflow.
        if let Some(slot) = caps.list.get_mut(caps.len) {
            *slot = Cap {
                offset: ptr,
                id: cfg.u8(usize::from(ptr)),
            };
            caps.len += 1;
        }
        from = ptr + 1;
        ptr = cfg.u8(usize::from(from));
    }
    Ok(caps)
}

// ---------------------------------------------------------------------------------------------
// virtio-pci capabilities

/// A structure in a BAR: which BAR, where in it, how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// The BAR (0..=5).
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u32,
    /// Length.
    pub length: u32,
}

impl Region {
    /// Its end in the BAR (offset + length, without overflow).
    pub fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.length)
    }

    /// Whether it shares a byte with `other` (same BAR, overlapping ranges).
    pub fn overlaps(&self, other: &Region) -> bool {
        self.bar == other.bar
            && u64::from(self.offset) < other.end()
            && u64::from(other.offset) < self.end()
            && self.length != 0
            && other.length != 0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BAR{} 0x{:x}..0x{:x}", self.bar, self.offset, self.end())
    }
}

/// A virtio vendor-specific capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCap {
    /// Its offset in configuration space.
    pub at: u8,
    /// cfg_type (1 common, 2 notify, 3 ISR, 4 device, 5 PCI_CFG, ...).
    pub cfg_type: u8,
    /// The structure it points at (for PCI_CFG: the window's initial values).
    pub region: Region,
    /// NOTIFY only: notify_off_multiplier (0 for other types).
    pub notify_mult: u32,
}

/// What is wrong with a virtio capability or the set of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioCapError {
    /// cap_len is below what the type needs.
    Short {
        /// The capability's offset.
        at: u8,
        /// Its cap_len.
        len: u8,
        /// What its type needs.
        need: u8,
    },
    /// The capability runs past the 256 bytes.
    PastEnd {
        /// The capability's offset.
        at: u8,
        /// Its cap_len.
        len: u8,
    },
    /// No usable capability of this cfg_type.
    Missing(u8),
}

/// A virtio cfg_type's name.
pub fn cfg_type_name(cfg_type: u8) -> &'static str {
    match cfg_type {
        VIRTIO_CAP_COMMON => "COMMON_CFG",
        VIRTIO_CAP_NOTIFY => "NOTIFY_CFG",
        VIRTIO_CAP_ISR => "ISR_CFG",
        VIRTIO_CAP_DEVICE => "DEVICE_CFG",
        VIRTIO_CAP_PCI_CFG => "PCI_CFG",
        8 => "SHARED_MEMORY_CFG",
        9 => "VENDOR_CFG",
        _ => "reserved cfg_type",
    }
}

impl fmt::Display for VirtioCapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Short { at, len, need } => write!(
                f,
                "virtio capability at 0x{at:02x}: cap_len {len}, expected at least {need}"
            ),
            Self::PastEnd { at, len } => write!(
                f,
                "virtio capability at 0x{at:02x}: cap_len {len} runs past configuration space"
            ),
            Self::Missing(t) => write!(f, "no {} capability", cfg_type_name(t)),
        }
    }
}

/// Reads the virtio capability at `at` (whose ID is [`CAP_VENDOR`]).
pub fn virtio_cap(cfg: &ConfigSpace, at: u8) -> Result<VirtioCap, VirtioCapError> {
    let base = usize::from(at);
    let len = cfg.u8(base + 2);
    let cfg_type = cfg.u8(base + 3);
    let need = match cfg_type {
        VIRTIO_CAP_NOTIFY | VIRTIO_CAP_PCI_CFG => VIRTIO_CAP_LEN + 4,
        _ => VIRTIO_CAP_LEN,
    };
    if len < need {
        return Err(VirtioCapError::Short { at, len, need });
    }
    if base + usize::from(len) > CONFIG_SPACE_LEN {
        return Err(VirtioCapError::PastEnd { at, len });
    }
    Ok(VirtioCap {
        at,
        cfg_type,
        region: Region {
            bar: cfg.u8(base + 4),
            offset: cfg.u32(base + 8),
            length: cfg.u32(base + 12),
        },
        notify_mult: if cfg_type == VIRTIO_CAP_NOTIFY {
            cfg.u32(base + 16)
        } else {
            0
        },
    })
}

/// Where a virtio-pci device's structures are: the first usable capability of each type
/// (virtio 1.2, 4.1.4: a BAR index above 5 is reserved, such a capability is skipped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioLayout {
    /// Common configuration.
    pub common: Region,
    /// Notifications.
    pub notify: Region,
    /// notify_off_multiplier.
    pub notify_mult: u32,
    /// ISR status.
    pub isr: Region,
    /// Device-specific configuration (a device type without one may have none).
    pub device: Option<Region>,
    /// The PCI_CFG capability's offset in configuration space.
    pub pci_cfg: Option<u8>,
}

/// Collects the virtio capabilities of `caps`; any malformed one is an error, and COMMON,
/// NOTIFY and ISR must be there.
pub fn virtio_layout(cfg: &ConfigSpace, caps: &Caps) -> Result<VirtioLayout, VirtioCapError> {
    let mut common = None;
    let mut notify = None;
    let mut isr = None;
    let mut device = None;
    let mut pci_cfg = None;
    for cap in caps.as_slice().iter().filter(|c| c.id == CAP_VENDOR) {
        let v = virtio_cap(cfg, cap.offset)?;
        if v.cfg_type == VIRTIO_CAP_PCI_CFG {
            pci_cfg = pci_cfg.or(Some(v.at));
            continue;
        }
        if v.region.bar > MAX_BAR {
            continue;
        }
        let slot = match v.cfg_type {
            VIRTIO_CAP_COMMON => &mut common,
            VIRTIO_CAP_NOTIFY => &mut notify,
            VIRTIO_CAP_ISR => &mut isr,
            VIRTIO_CAP_DEVICE => &mut device,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(v);
        }
    }
    let common = common.ok_or(VirtioCapError::Missing(VIRTIO_CAP_COMMON))?;
    let notify = notify.ok_or(VirtioCapError::Missing(VIRTIO_CAP_NOTIFY))?;
    let isr = isr.ok_or(VirtioCapError::Missing(VIRTIO_CAP_ISR))?;
    Ok(VirtioLayout {
        common: common.region,
        notify: notify.region,
        notify_mult: notify.notify_mult,
        isr: isr.region,
        device: device.map(|d| d.region),
        pci_cfg,
    })
}

// ---------------------------------------------------------------------------------------------
// MSI-X

/// An MSI-X capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msix {
    /// Its offset in configuration space.
    pub at: u8,
    /// Message control as read.
    pub control: u16,
    /// Entries in the table.
    pub table_size: u16,
    /// The table: BIR, offset, entries × 16 bytes.
    pub table: Region,
    /// The pending bit array: BIR, offset, one bit per entry in u64s.
    pub pba: Region,
}

/// The MSI-X capability runs past configuration space (its offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixPastEnd(pub u8);

impl fmt::Display for MsixPastEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MSI-X capability at 0x{:02x} runs past configuration space",
            self.0
        )
    }
}

/// Reads the MSI-X capability at `at` (whose ID is [`CAP_MSIX`]).
pub fn msix(cfg: &ConfigSpace, at: u8) -> Result<Msix, MsixPastEnd> {
    let base = usize::from(at);
    if base + MSIX_CAP_LEN > CONFIG_SPACE_LEN {
        return Err(MsixPastEnd(at));
    }
    let control = cfg.u16(base + 2);
    let table_size = (control & 0x7ff) + 1;
    let table = cfg.u32(base + 4);
    let pba = cfg.u32(base + 8);
    Ok(Msix {
        at,
        control,
        table_size,
        table: Region {
            bar: (table & 0x7) as u8,
            offset: table & !0x7,
            length: u32::from(table_size) * MSIX_ENTRY_LEN as u32,
        },
        pba: Region {
            bar: (pba & 0x7) as u8,
            offset: pba & !0x7,
            length: u32::from(table_size).div_ceil(64) * 8,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// virtio-pci functions

/// A virtio device type's name (`None`: a type the probe does not know).
pub fn virtio_type_name(device_type: u16) -> Option<&'static str> {
    Some(match device_type {
        1 => "net",
        2 => "blk",
        3 => "console",
        4 => "rng",
        5 => "balloon",
        8 => "scsi",
        9 => "9p",
        16 => "gpu",
        18 => "input",
        19 => "vsock",
        20 => "crypto",
        23 => "iommu",
        24 => "mem",
        26 => "fs",
        27 => "pmem",
        _ => return None,
    })
}

/// Whether a virtio device type has a device-specific configuration (rng has none).
pub fn virtio_type_has_config(device_type: u16) -> bool {
    !matches!(device_type, 4)
}

/// Why a virtio function cannot be driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioPciError {
    /// A transitional device ID (0x1000..0x1040): legacy interface, not spoken here.
    Transitional(u16),
    /// A modern device ID with revision 0.
    Revision0,
    /// Not a type 0 header: this layout.
    HeaderLayout(u8),
    /// The capability list is broken.
    Caps(CapError),
    /// A virtio capability is malformed or missing.
    Virtio(VirtioCapError),
    /// The MSI-X capability is malformed.
    Msix(MsixPastEnd),
}

impl fmt::Display for VirtioPciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Transitional(id) => write!(
                f,
                "device ID 0x{id:04x} is a transitional (legacy) virtio device; the probe drives \
                 modern ones (0x1040 + type)"
            ),
            Self::Revision0 => write!(f, "revision 0 (a modern virtio device has revision >= 1)"),
            Self::HeaderLayout(l) => write!(f, "header layout {l} (expected 0)"),
            Self::Caps(e) => write!(f, "{e}"),
            Self::Virtio(e) => write!(f, "{e}"),
            Self::Msix(e) => write!(f, "{e}"),
        }
    }
}

/// A virtio-pci function, as its configuration space describes it (nothing written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioFunction {
    /// Where it is.
    pub bdf: Bdf,
    /// PCI device ID.
    pub device_id: u16,
    /// The virtio device type (device ID - 0x1040).
    pub device_type: u16,
    /// Its BARs as assigned.
    pub bars: [Bar; 6],
    /// Its virtio structures.
    pub layout: VirtioLayout,
    /// Its MSI-X capability.
    pub msix: Option<Msix>,
    /// The interrupt line register (what the firmware routed INTx to; on cgvm the GSI).
    pub interrupt_line: u8,
    /// The interrupt pin register (0 none, 1..=4 INTA..INTD).
    pub interrupt_pin: u8,
}

impl VirtioFunction {
    /// The function at `bdf` whose configuration space is `cfg`, if it is a virtio device
    /// (vendor 0x1af4, device ID 0x1000..0x1080): `None` for another device.
    pub fn parse(bdf: Bdf, cfg: &ConfigSpace) -> Option<Result<Self, VirtioPciError>> {
        let device_id = cfg.device();
        if cfg.vendor() != VENDOR_VIRTIO
            || !(DEVICE_VIRTIO_TRANSITIONAL..DEVICE_VIRTIO_END).contains(&device_id)
        {
            return None;
        }
        Some(Self::parse_virtio(bdf, cfg, device_id))
    }

    fn parse_virtio(bdf: Bdf, cfg: &ConfigSpace, device_id: u16) -> Result<Self, VirtioPciError> {
        if device_id < DEVICE_VIRTIO_MODERN {
            return Err(VirtioPciError::Transitional(device_id));
        }
        if cfg.revision() == 0 {
            return Err(VirtioPciError::Revision0);
        }
        if cfg.header_layout() != 0 {
            return Err(VirtioPciError::HeaderLayout(cfg.header_layout()));
        }
        let caps = capabilities(cfg).map_err(VirtioPciError::Caps)?;
        let layout = virtio_layout(cfg, &caps).map_err(VirtioPciError::Virtio)?;
        let msix = match caps.as_slice().iter().find(|c| c.id == CAP_MSIX) {
            Some(c) => Some(msix(cfg, c.offset).map_err(VirtioPciError::Msix)?),
            None => None,
        };
        Ok(Self {
            bdf,
            device_id,
            device_type: device_id - DEVICE_VIRTIO_MODERN,
            bars: decode_bars(cfg),
            layout,
            msix,
            interrupt_line: cfg.u8(usize::from(INTERRUPT_LINE)),
            interrupt_pin: cfg.u8(usize::from(INTERRUPT_PIN)),
        })
    }

    /// The type's name ("blk"), or "virtio".
    pub fn type_name(&self) -> &'static str {
        virtio_type_name(self.device_type).unwrap_or("virtio")
    }

    /// The guest-physical address of `region`: its BAR must be a memory BAR.
    pub fn address(&self, region: &Region) -> Option<u64> {
        self.bars
            .get(usize::from(region.bar))?
            .memory_base()?
            .checked_add(u64::from(region.offset))
    }

    /// `region` as a register window (`None`: its BAR is no memory BAR, or it does not lie in
    /// the MMIO hole below 4 GiB).
    pub fn regs(&self, region: &Region) -> Option<Regs> {
        Regs::new(self.address(region)?, u64::from(region.length))
    }
}

/// The virtio device type of a modern virtio-pci device ID.
pub fn modern_virtio_type(vendor: u16, device: u16) -> Option<u16> {
    (vendor == VENDOR_VIRTIO && (DEVICE_VIRTIO_MODERN..DEVICE_VIRTIO_END).contains(&device))
        .then(|| device - DEVICE_VIRTIO_MODERN)
}

// ---------------------------------------------------------------------------------------------
// Enumeration

/// The functions present on bus `bus`, found as an OS finds them: function 0 of each device
/// (vendor ID not 0xffff), then functions 1..7 of a device whose function 0 has the
/// multi-function bit. `found` gets each one's address and first dword (vendor and device ID).
pub fn enumerate(c: &impl ConfigAccess, bus: u8, mut found: impl FnMut(Bdf, u32)) {
    for dev in 0..DEVICES {
        let f0 = Bdf { bus, dev, func: 0 };
        let id = c.read_u32(f0, VENDOR_ID);
        if id as u16 == u16::MAX {
            continue;
        }
        found(f0, id);
        let header = (c.read_u32(f0, 0x0c) >> 16) as u8;
        if header & HEADER_MULTI_FUNCTION == 0 {
            continue;
        }
        for func in 1..FUNCTIONS {
            let bdf = Bdf { bus, dev, func };
            let id = c.read_u32(bdf, VENDOR_ID);
            if id as u16 != u16::MAX {
                found(bdf, id);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MCFG

/// One MCFG allocation: an ECAM region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct McfgEntry {
    /// Base address (of bus 0's configuration space, even when the first bus is not 0).
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First bus decoded.
    pub first_bus: u8,
    /// Last bus decoded.
    pub last_bus: u8,
}

impl fmt::Display for McfgEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0x{:x} segment {} buses {}..={}",
            self.base, self.segment, self.first_bus, self.last_bus
        )
    }
}

/// Offset of the first MCFG entry (header, 8 reserved bytes).
pub const MCFG_ENTRIES: usize = 44;
/// Bytes of an MCFG entry.
pub const MCFG_ENTRY_LEN: usize = 16;
/// Most MCFG entries the probe reads.
pub const MAX_MCFG_ENTRIES: usize = 8;

/// The MCFG's allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mcfg {
    entries: [McfgEntry; MAX_MCFG_ENTRIES],
    len: usize,
}

impl Mcfg {
    /// The allocations, in table order.
    pub fn entries(&self) -> &[McfgEntry] {
        &self.entries[..self.len]
    }

    /// The allocation that decodes segment 0, bus 0.
    pub fn bus0(&self) -> Option<&McfgEntry> {
        self.entries()
            .iter()
            .find(|e| e.segment == 0 && e.first_bus == 0)
    }
}

/// What is wrong with an MCFG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McfgError {
    /// The length is not the header plus whole entries.
    Length(usize),
    /// No entries.
    Empty,
    /// More entries than the probe reads.
    TooMany(usize),
    /// An entry whose last bus is below its first.
    Buses(McfgEntry),
}

impl fmt::Display for McfgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Length(n) => write!(
                f,
                "MCFG length {n} is not {MCFG_ENTRIES} + 16 bytes per allocation"
            ),
            Self::Empty => write!(f, "MCFG has no allocation"),
            Self::TooMany(n) => write!(
                f,
                "MCFG has {n} allocations (the probe reads {MAX_MCFG_ENTRIES})"
            ),
            Self::Buses(e) => write!(f, "MCFG allocation {e}: last bus below first"),
        }
    }
}

/// Parses a whole MCFG table (header included; its checksum is the caller's business).
pub fn parse_mcfg(table: &[u8]) -> Result<Mcfg, McfgError> {
    let body = table
        .len()
        .checked_sub(MCFG_ENTRIES)
        .filter(|n| n.is_multiple_of(MCFG_ENTRY_LEN))
        .ok_or(McfgError::Length(table.len()))?;
    let n = body / MCFG_ENTRY_LEN;
    if n == 0 {
        return Err(McfgError::Empty);
    }
    if n > MAX_MCFG_ENTRIES {
        return Err(McfgError::TooMany(n));
    }
    let mut mcfg = Mcfg {
        entries: [McfgEntry::default(); MAX_MCFG_ENTRIES],
        len: n,
    };
    for (slot, e) in mcfg
        .entries
        .iter_mut()
        .zip(table[MCFG_ENTRIES..].chunks_exact(MCFG_ENTRY_LEN))
    {
        let mut base = [0u8; 8];
        base.copy_from_slice(&e[..8]);
        *slot = McfgEntry {
            base: u64::from_le_bytes(base),
            segment: u16::from_le_bytes([e[8], e[9]]),
            first_bus: e[10],
            last_bus: e[11],
        };
        if slot.last_bus < slot.first_bus {
            return Err(McfgError::Buses(*slot));
        }
    }
    Ok(mcfg)
}

/// Why the MCFG could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McfgReadError {
    /// The ACPI tables could not be walked.
    Acpi(AcpiError),
    /// The MCFG is malformed.
    Mcfg(McfgError),
}

impl From<AcpiError> for McfgReadError {
    fn from(e: AcpiError) -> Self {
        Self::Acpi(e)
    }
}

impl From<MemError> for McfgReadError {
    fn from(e: MemError) -> Self {
        Self::Acpi(AcpiError::Mem(e))
    }
}

impl fmt::Display for McfgReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Acpi(e) => write!(f, "{e}"),
            Self::Mcfg(e) => write!(f, "{e}"),
        }
    }
}

/// Finds the MCFG (RSDP → XSDT/RSDT → "MCFG", every table checksummed) and parses it; `None`
/// when the root table lists none.
pub fn find_mcfg(mem: &impl Mem, rsdp_hint: u64) -> Result<Option<Mcfg>, McfgReadError> {
    let Some(header) = acpi::find_table(mem, rsdp_hint, *b"MCFG")? else {
        return Ok(None);
    };
    let mut bytes = [0u8; MCFG_ENTRIES + MCFG_ENTRY_LEN * (MAX_MCFG_ENTRIES + 1)];
    let n = (header.length as usize).min(bytes.len());
    mem.read(header.addr, &mut bytes[..n])?;
    if header.length as usize > bytes.len() {
        // Only to report how many.
        let entries = (header.length as usize).saturating_sub(MCFG_ENTRIES) / MCFG_ENTRY_LEN;
        return Err(McfgReadError::Mcfg(McfgError::TooMany(entries)));
    }
    parse_mcfg(&bytes[..n])
        .map(Some)
        .map_err(McfgReadError::Mcfg)
}
