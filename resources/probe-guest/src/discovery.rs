//! Finding the virtio-mmio devices, the two ways a Linux guest can:
//!
//! 1. the kernel command line: one `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` word per
//!    device, parsed as Linux's `vm_cmdline_set` does (size with `memparse`: a C number with an
//!    optional K/M/G/T/P/E suffix; base a C number, `0x` hex, leading `0` octal, else decimal;
//!    irq decimal and non-zero; an optional platform-device id that is ignored);
//! 2. the DSDT: `Device` objects whose `_HID` is the string "LNRO0005", with a `_CRS` buffer
//!    holding a Memory32Fixed descriptor (the register window) and the interrupt(s), as an
//!    Extended Interrupt descriptor or a small IRQ descriptor.
//!
//! The DSDT scan needs no AML interpreter: it looks for DeviceOp (`5B 82`) and, inside each
//! device's package (nested devices skipped), for `Name (_HID, "...")` and `Name (_CRS,
//! Buffer)`:
//!
//! ```text
//! DeviceOp 5B 82, PkgLength, NameString (e.g. "VR00"), TermList:
//!   NameOp 08 "_HID" StringPrefix 0D "LNRO0005" 00
//!   NameOp 08 "_CRS" BufferOp 11 PkgLength BufferSize (integer) bytes:
//!     86 09 00 info base:u32 length:u32          Memory32Fixed
//!     89 len:u16 flags count irq:u32 * count     Extended Interrupt
//!     22/23 mask:u16 [flags]                     IRQ (small)
//!     79 checksum                                End Tag
//! ```
//!
//! Both parsers are pure functions over byte slices ([`parse_cmdline_entry`],
//! [`parse_device`], [`parse_crs`]), unit-tested on the host; [`scan_dsdt`] reads a table in
//! windows so that a large DSDT needs no large buffer. [`find`] runs both, for a check, and
//! reports where they disagree: the checks use devices only when the two lists agree.
//!
//! The virtio-pci devices ([`find_pci`]) are found as an OS finds them: the ECAM region from
//! the ACPI MCFG table (segment 0, bus 0), bus 0 enumerated through it (function 0 of each
//! device, functions 1..7 where the multi-function bit says), each function with vendor 0x1af4
//! read (256 bytes) and parsed (`pci::VirtioFunction`: modern device ID, revision >= 1,
//! capability list, virtio structures, MSI-X). Nothing is written. Without an MCFG there is no
//! PCI for the probe (a problem only when `probe.transport=pci` demands it). [`Found`] is a
//! device on either transport, as the checks take it.

use core::fmt;

use crate::acpi::{self, AcpiError};
use crate::aml;
use crate::checks::{Context, Report};
use crate::cmdline::{self, PciIrq};
use crate::pci::{self, Bdf, ConfigSpace, Ecam, VirtioFunction, VENDOR_VIRTIO};
use crate::phys::{Mem, MemError};
use crate::text::{Escaped, Size};

/// Most devices the probe records (cgvm has 17 interrupt lines for them).
pub const MAX_DEVICES: usize = 32;
/// Most interrupts recorded per device.
pub const MAX_IRQS: usize = 4;
/// The command-line key.
pub const CMDLINE_KEY: &[u8] = b"virtio_mmio.device";
/// The ACPI hardware ID of a virtio-mmio device.
pub const LNRO0005: &[u8] = b"LNRO0005";

/// DeviceOp: ExtOpPrefix 0x5b, 0x82.
const DEVICE_OP: [u8; 2] = [0x5b, 0x82];
/// NameOp.
const NAME_OP: u8 = 0x08;
/// StringPrefix: a NUL-terminated ASCII string follows.
const STRING_PREFIX: u8 = 0x0d;
/// DWordPrefix (an EISA ID for a `_HID`).
const DWORD_PREFIX: u8 = 0x0c;
/// WordPrefix.
const WORD_PREFIX: u8 = 0x0b;
/// BytePrefix.
const BYTE_PREFIX: u8 = 0x0a;
/// ZeroOp.
const ZERO_OP: u8 = 0x00;
/// OneOp.
const ONE_OP: u8 = 0x01;
/// BufferOp.
const BUFFER_OP: u8 = 0x11;
/// Name prefixes: the root, the parent scope.
const ROOT_CHAR: u8 = b'\\';
const PARENT_PREFIX: u8 = b'^';
/// DualNamePrefix: two NameSegs follow.
const DUAL_NAME_PREFIX: u8 = 0x2e;
/// MultiNamePrefix: a count and that many NameSegs follow.
const MULTI_NAME_PREFIX: u8 = 0x2f;

/// Large resource: Memory32Fixed.
const RES_MEMORY32_FIXED: u8 = 0x86;
/// Large resource: Extended Interrupt.
const RES_EXTENDED_IRQ: u8 = 0x89;
/// Small resource item: IRQ format (tag bits 6..3).
const RES_SMALL_IRQ: u8 = 0x04;
/// Small resource item: End Tag.
const RES_SMALL_END: u8 = 0x0f;

/// The DSDT is read in windows this far apart (they overlap by one byte, for DeviceOp).
pub const WINDOW: usize = 512;
/// Most bytes of one device's package that are read; a bigger virtio-mmio device is an error.
pub const DEVICE_MAX: usize = 1024;

/// A set of interrupt numbers (in descriptor order).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Irqs {
    irqs: [u32; MAX_IRQS],
    len: usize,
}

impl Irqs {
    /// No interrupts.
    pub const fn new() -> Self {
        Self {
            irqs: [0; MAX_IRQS],
            len: 0,
        }
    }

    /// One interrupt.
    pub const fn one(irq: u32) -> Self {
        let mut irqs = [0; MAX_IRQS];
        irqs[0] = irq;
        Self { irqs, len: 1 }
    }

    /// The interrupts.
    pub fn as_slice(&self) -> &[u32] {
        &self.irqs[..self.len]
    }

    /// Adds one; false if the set is full.
    fn push(&mut self, irq: u32) -> bool {
        match self.irqs.get_mut(self.len) {
            Some(slot) => {
                *slot = irq;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    /// Whether both hold the same interrupts, in any order.
    pub fn same_set(&self, other: &Self) -> bool {
        self.as_slice().iter().all(|i| other.as_slice().contains(i))
            && other.as_slice().iter().all(|i| self.as_slice().contains(i))
    }
}

impl Default for Irqs {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Irqs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl fmt::Display for Irqs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_slice() {
            [] => write!(f, "no irq"),
            [one] => write!(f, "irq {one}"),
            many => {
                write!(f, "irqs ")?;
                for (i, irq) in many.iter().enumerate() {
                    write!(f, "{}{irq}", if i == 0 { "" } else { "," })?;
                }
                Ok(())
            }
        }
    }
}

/// One virtio-mmio device: its register window and interrupt(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// Guest-physical address of the register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its interrupts (one on the command line).
    pub irqs: Irqs,
}

impl Device {
    /// Whether `other` has the same window and the same set of interrupts.
    pub fn agrees_with(&self, other: &Device) -> bool {
        self.base == other.base && self.size == other.size && self.irqs.same_set(&other.irqs)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:x} ({}) {}", self.base, Size(self.size), self.irqs)
    }
}

/// Up to [`MAX_DEVICES`] devices, in the order found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceList {
    devices: [Device; MAX_DEVICES],
    len: usize,
}

impl DeviceList {
    /// No devices.
    pub const fn new() -> Self {
        Self {
            devices: [Device {
                base: 0,
                size: 0,
                irqs: Irqs::new(),
            }; MAX_DEVICES],
            len: 0,
        }
    }

    /// The devices.
    pub fn as_slice(&self) -> &[Device] {
        &self.devices[..self.len]
    }

    /// Adds one; false if the list is full.
    pub fn push(&mut self, d: Device) -> bool {
        match self.devices.get_mut(self.len) {
            Some(slot) => {
                *slot = d;
                self.len += 1;
                true
            }
            None => false,
        }
    }
}

impl Default for DeviceList {
    fn default() -> Self {
        Self::new()
    }
}

/// Shows a list as "0x... (4 KiB) irq 5, 0x... (4 KiB) irq 6", or "none".
pub struct Listed<'a>(pub &'a [Device]);

impl fmt::Display for Listed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "none");
        }
        for (i, d) in self.0.iter().enumerate() {
            write!(f, "{}{d}", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The command line

/// Why a `virtio_mmio.device=` value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryError {
    /// No size (a C number with an optional K/M/G/T/P/E suffix) at the start, or it overflows.
    Size,
    /// The size is 0.
    ZeroSize,
    /// No `@` after the size.
    NoAt,
    /// No base address after `@`, or it overflows.
    Base,
    /// The window wraps past the end of the address space.
    Wraps,
    /// No `:` after the base.
    NoColon,
    /// No decimal irq after `:`, or it overflows.
    Irq,
    /// The irq is 0.
    ZeroIrq,
    /// Something after `:irq` that is not `:id`.
    Trailing,
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Size => "no size (a number, optionally with K/M/G) at the start",
            Self::ZeroSize => "size 0",
            Self::NoAt => "no '@' after the size",
            Self::Base => "no base address after '@'",
            Self::Wraps => "the window wraps around the address space",
            Self::NoColon => "no ':' after the base address",
            Self::Irq => "no decimal irq after ':'",
            Self::ZeroIrq => "irq 0",
            Self::Trailing => "unexpected text after the irq",
        })
    }
}

/// A number as C's `strtoull` with base 0 reads it: `0x`/`0X` and a hex digit start hex, a
/// leading `0` octal, else decimal. Returns the value and the rest, or `None` if no digit
/// starts `s` or the value overflows.
fn c_number(s: &[u8]) -> Option<(u64, &[u8])> {
    let (radix, digits) = match s {
        [b'0', b'x' | b'X', d, ..] if d.is_ascii_hexdigit() => (16, &s[2..]),
        [b'0', ..] => (8, s),
        _ => (10, s),
    };
    let n = digits
        .iter()
        .take_while(|b| char::from(**b).is_digit(radix))
        .count();
    if n == 0 {
        return None;
    }
    let value = digits[..n].iter().try_fold(0u64, |acc, &b| {
        let d = char::from(b).to_digit(radix)?;
        acc.checked_mul(u64::from(radix))?.checked_add(u64::from(d))
    })?;
    Some((value, &digits[n..]))
}

/// Linux's `memparse`: a C number with an optional binary suffix (K, M, G, T, P, E, either
/// case).
fn memparse(s: &[u8]) -> Option<(u64, &[u8])> {
    let (value, rest) = c_number(s)?;
    let shift = match rest.first().map(u8::to_ascii_uppercase) {
        Some(b'K') => 10,
        Some(b'M') => 20,
        Some(b'G') => 30,
        Some(b'T') => 40,
        Some(b'P') => 50,
        Some(b'E') => 60,
        _ => return Some((value, rest)),
    };
    let scaled = value.checked_mul(1u64 << shift)?;
    Some((scaled, &rest[1..]))
}

/// Decimal digits (at least one) and the rest; `None` on overflow.
fn decimal(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    Some((cmdline::parse_decimal(&s[..n])?, &s[n..]))
}

/// Parses the value of one `virtio_mmio.device=` word: `<size>@<base>:<irq>[:<id>]`.
pub fn parse_cmdline_entry(value: &[u8]) -> Result<Device, EntryError> {
    let (size, rest) = memparse(value).ok_or(EntryError::Size)?;
    if size == 0 {
        return Err(EntryError::ZeroSize);
    }
    let rest = rest.strip_prefix(b"@").ok_or(EntryError::NoAt)?;
    let (base, rest) = c_number(rest).ok_or(EntryError::Base)?;
    if base.checked_add(size - 1).is_none() {
        return Err(EntryError::Wraps);
    }
    let rest = rest.strip_prefix(b":").ok_or(EntryError::NoColon)?;
    let (irq, rest) = decimal(rest).ok_or(EntryError::Irq)?;
    let irq = u32::try_from(irq).map_err(|_| EntryError::Irq)?;
    if irq == 0 {
        return Err(EntryError::ZeroIrq);
    }
    match rest {
        [] => {}
        // The platform device id (`%d`): a decimal number, maybe negative.
        [b':', id @ ..] => {
            let id = id.strip_prefix(b"-").unwrap_or(id);
            if !matches!(decimal(id), Some((_, []))) {
                return Err(EntryError::Trailing);
            }
        }
        _ => return Err(EntryError::Trailing),
    }
    Ok(Device {
        base,
        size,
        irqs: Irqs::one(irq),
    })
}

/// The values of the `virtio_mmio.device=` words of `line`, in order (every one counts, as in
/// Linux: each adds a device).
pub fn cmdline_entries(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline::words(line).filter_map(|w| match cmdline::key_value(w) {
        (CMDLINE_KEY, Some(value)) => Some(value),
        (CMDLINE_KEY, None) => Some(&b""[..]),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------
// The DSDT

/// What is wrong with a `_CRS` buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrsError {
    /// A descriptor runs past the buffer (offset of the descriptor in the buffer).
    Truncated(usize),
    /// A Memory32Fixed descriptor whose length is not 9.
    Memory32Length(u16),
    /// An Extended Interrupt descriptor too short for its interrupt count.
    InterruptLength(u16),
    /// A small IRQ descriptor whose length is not 2 or 3.
    IrqLength(u8),
    /// Two Memory32Fixed descriptors.
    TwoWindows,
    /// No Memory32Fixed descriptor.
    NoWindow,
    /// No interrupt.
    NoInterrupt,
    /// More interrupts than the probe records.
    TooManyInterrupts,
    /// No End Tag.
    NoEndTag,
}

impl fmt::Display for CrsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated(at) => write!(f, "descriptor at byte {at} runs past the buffer"),
            Self::Memory32Length(n) => write!(f, "Memory32Fixed with length {n} (expected 9)"),
            Self::InterruptLength(n) => {
                write!(f, "Extended Interrupt with length {n}, short for its count")
            }
            Self::IrqLength(n) => write!(f, "IRQ descriptor with length {n} (expected 2 or 3)"),
            Self::TwoWindows => write!(f, "two Memory32Fixed descriptors"),
            Self::NoWindow => write!(f, "no Memory32Fixed descriptor"),
            Self::NoInterrupt => write!(f, "no interrupt"),
            Self::TooManyInterrupts => write!(f, "more than {MAX_IRQS} interrupts"),
            Self::NoEndTag => write!(f, "no End Tag"),
        }
    }
}

/// Reads the register window and interrupts from a `_CRS` resource template.
pub fn parse_crs(buf: &[u8]) -> Result<Device, CrsError> {
    let mut window = None;
    let mut irqs = Irqs::new();
    let mut at = 0;
    loop {
        let Some(&tag) = buf.get(at) else {
            return Err(CrsError::NoEndTag);
        };
        if tag & 0x80 == 0 {
            // Small: bits 6..3 item, bits 2..0 length.
            let item = (tag >> 3) & 0x0f;
            let len = usize::from(tag & 0x07);
            let body = buf
                .get(at + 1..at + 1 + len)
                .ok_or(CrsError::Truncated(at))?;
            match item {
                RES_SMALL_END => break,
                RES_SMALL_IRQ => {
                    if !(2..=3).contains(&len) {
                        return Err(CrsError::IrqLength(tag & 0x07));
                    }
                    let mask = u16::from_le_bytes([body[0], body[1]]);
                    for irq in (0..16).filter(|i| mask & (1 << i) != 0) {
                        if !irqs.push(irq) {
                            return Err(CrsError::TooManyInterrupts);
                        }
                    }
                }
                _ => {}
            }
            at += 1 + len;
        } else {
            let head = buf.get(at..at + 3).ok_or(CrsError::Truncated(at))?;
            let len = u16::from_le_bytes([head[1], head[2]]);
            let body = buf
                .get(at + 3..at + 3 + usize::from(len))
                .ok_or(CrsError::Truncated(at))?;
            match tag {
                RES_MEMORY32_FIXED => {
                    if len != 9 {
                        return Err(CrsError::Memory32Length(len));
                    }
                    if window.is_some() {
                        return Err(CrsError::TwoWindows);
                    }
                    let u32_at = |i: usize| {
                        u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]])
                    };
                    window = Some((u64::from(u32_at(1)), u64::from(u32_at(5))));
                }
                RES_EXTENDED_IRQ => {
                    let count = usize::from(*body.get(1).ok_or(CrsError::InterruptLength(len))?);
                    let list = body
                        .get(2..2 + 4 * count)
                        .ok_or(CrsError::InterruptLength(len))?;
                    for irq in list.chunks_exact(4) {
                        if !irqs.push(u32::from_le_bytes([irq[0], irq[1], irq[2], irq[3]])) {
                            return Err(CrsError::TooManyInterrupts);
                        }
                    }
                }
                _ => {}
            }
            at += 3 + usize::from(len);
        }
    }
    let (base, size) = window.ok_or(CrsError::NoWindow)?;
    if irqs.as_slice().is_empty() {
        return Err(CrsError::NoInterrupt);
    }
    Ok(Device { base, size, irqs })
}

/// What is wrong with a virtio-mmio (`LNRO0005`) device in the DSDT. Offsets are of its
/// DeviceOp, from the start of the AML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsdtError {
    /// Its package runs past the AML, or past [`DEVICE_MAX`] bytes.
    Truncated {
        /// Offset of the DeviceOp.
        offset: usize,
        /// Its name.
        name: [u8; 4],
    },
    /// It has no `Name (_CRS, Buffer)`.
    NoCrs {
        /// Offset of the DeviceOp.
        offset: usize,
        /// Its name.
        name: [u8; 4],
    },
    /// `_CRS` is named with something other than a buffer (this opcode).
    CrsNotBuffer {
        /// Offset of the DeviceOp.
        offset: usize,
        /// Its name.
        name: [u8; 4],
        /// The opcode after `_CRS`.
        op: u8,
    },
    /// The `_CRS` buffer is malformed.
    Crs {
        /// Offset of the DeviceOp.
        offset: usize,
        /// Its name.
        name: [u8; 4],
        /// What is wrong.
        error: CrsError,
    },
    /// More virtio-mmio devices than the probe records.
    TooMany,
}

impl DsdtError {
    /// The same error with its offset moved by `base`.
    fn shifted(self, base: usize) -> Self {
        let at = |o: usize| o.saturating_add(base);
        match self {
            Self::Truncated { offset, name } => Self::Truncated {
                offset: at(offset),
                name,
            },
            Self::NoCrs { offset, name } => Self::NoCrs {
                offset: at(offset),
                name,
            },
            Self::CrsNotBuffer { offset, name, op } => Self::CrsNotBuffer {
                offset: at(offset),
                name,
                op,
            },
            Self::Crs {
                offset,
                name,
                error,
            } => Self::Crs {
                offset: at(offset),
                name,
                error,
            },
            Self::TooMany => Self::TooMany,
        }
    }
}

impl fmt::Display for DsdtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |f: &mut fmt::Formatter<'_>, offset: usize, name: &[u8; 4]| {
            write!(
                f,
                "LNRO0005 device {} at AML offset 0x{offset:x}: ",
                Escaped(name)
            )
        };
        match self {
            Self::Truncated { offset, name } => {
                at(f, *offset, name)?;
                write!(f, "package runs past the DSDT (or past {DEVICE_MAX} bytes)")
            }
            Self::NoCrs { offset, name } => {
                at(f, *offset, name)?;
                write!(f, "no Name (_CRS, Buffer)")
            }
            Self::CrsNotBuffer { offset, name, op } => {
                at(f, *offset, name)?;
                write!(f, "_CRS is not a buffer (opcode 0x{op:02x})")
            }
            Self::Crs {
                offset,
                name,
                error,
            } => {
                at(f, *offset, name)?;
                write!(f, "_CRS: {error}")
            }
            Self::TooMany => write!(f, "more than {MAX_DEVICES} LNRO0005 devices"),
        }
    }
}

/// A virtio-mmio device the DSDT names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiDevice {
    /// The last NameSeg of its name (`VR00`).
    pub name: [u8; 4],
    /// Its window and interrupts.
    pub device: Device,
}

/// Reads a NameString at `aml[at..]`: its last NameSeg (`????` for the null name) and where it
/// ends. `None` if it is malformed or truncated.
fn name_string(aml: &[u8], at: usize) -> Option<([u8; 4], usize)> {
    let mut i = at;
    if aml.get(i) == Some(&ROOT_CHAR) {
        i += 1;
    } else {
        while aml.get(i) == Some(&PARENT_PREFIX) {
            i += 1;
        }
    }
    let (count, first) = match *aml.get(i)? {
        0x00 => return Some((*b"????", i + 1)),
        DUAL_NAME_PREFIX => (2, i + 1),
        MULTI_NAME_PREFIX => (usize::from(*aml.get(i + 1)?), i + 2),
        _ => (1, i),
    };
    if count == 0 {
        return None;
    }
    let end = first + 4 * count;
    let segs = aml.get(first..end)?;
    let ok = segs.chunks_exact(4).all(|seg| {
        (seg[0].is_ascii_uppercase() || seg[0] == b'_')
            && seg[1..]
                .iter()
                .all(|&c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
    });
    if !ok {
        return None;
    }
    let last = &segs[segs.len() - 4..];
    Some(([last[0], last[1], last[2], last[3]], end))
}

/// An integer term (ZeroOp, OneOp, BytePrefix, WordPrefix or DWordPrefix) at `aml[at..]`: its
/// value and where it ends.
fn integer(aml: &[u8], at: usize) -> Option<(u32, usize)> {
    let b = |i: usize| aml.get(i).copied().map(u32::from);
    match *aml.get(at)? {
        ZERO_OP => Some((0, at + 1)),
        ONE_OP => Some((1, at + 1)),
        BYTE_PREFIX => Some((b(at + 1)?, at + 2)),
        WORD_PREFIX => Some((b(at + 1)? | b(at + 2)? << 8, at + 3)),
        DWORD_PREFIX => Some((
            b(at + 1)? | b(at + 2)? << 8 | b(at + 3)? << 16 | b(at + 4)? << 24,
            at + 5,
        )),
        _ => None,
    }
}

/// What `Name (_CRS, ...)` holds, as far as the scan can tell.
enum Crs {
    /// A buffer whose initializer is `aml[start..end]` (`end` may lie past the bytes read).
    Buffer { start: usize, end: usize },
    /// A buffer whose PkgLength or BufferSize cannot be read.
    Malformed,
    /// Something else, with this opcode.
    Other(u8),
}

/// Reads `Buffer (BufferSize) { bytes }` from its BufferOp at `aml[at]`: where the initializer
/// bytes are, and where the buffer ends.
fn buffer(aml: &[u8], at: usize) -> (Crs, usize) {
    let pkg = at + 1;
    let Ok((n, pkg_bytes)) = aml::pkg_length(aml, pkg) else {
        return (Crs::Malformed, aml.len());
    };
    let end = pkg + n as usize;
    // BufferSize is an integer term; the initializer bytes follow it.
    match integer(aml, pkg + pkg_bytes) {
        Some((_, start)) if start <= end => (Crs::Buffer { start, end }, end),
        _ => (Crs::Malformed, end.max(pkg + 1)),
    }
}

/// Looks at the bytes from a DeviceOp (`aml[0..2] == 5B 82`), `aml` ending at the end of the
/// AML or [`DEVICE_MAX`] bytes later. `None`: not a device, or not one with `_HID`
/// "LNRO0005". Offsets in errors are from `aml[0]`.
pub fn parse_device(aml: &[u8]) -> Option<Result<AcpiDevice, DsdtError>> {
    if aml.get(..2)? != DEVICE_OP {
        return None;
    }
    let (len, pkg_bytes) = aml::pkg_length(aml, 2).ok()?;
    let end = 2 + len as usize;
    let (name, body) = name_string(aml, 2 + pkg_bytes)?;
    if body > end {
        return None;
    }
    let limit = end.min(aml.len());
    let mut hid: Option<&[u8]> = None;
    let mut crs = None;
    let mut i = body;
    while i < limit {
        if aml[i..limit].starts_with(&DEVICE_OP) {
            // A nested device: its _HID and _CRS are its own.
            match aml::pkg_length(aml, i + 2) {
                Ok((n, _)) if n > 0 => i += 2 + n as usize,
                _ => i += 1,
            }
            continue;
        }
        if aml[i] != NAME_OP {
            i += 1;
            continue;
        }
        let value = i + 5;
        match (aml.get(i + 1..value), aml.get(value)) {
            (Some(b"_HID"), Some(&STRING_PREFIX)) => {
                let text = aml.get(value + 1..limit).unwrap_or_default();
                let n = text.iter().position(|&b| b == 0).unwrap_or(text.len());
                hid = Some(&text[..n]);
                i = value + 1 + n;
            }
            (Some(b"_CRS"), Some(&BUFFER_OP)) => {
                let (found, next) = buffer(aml, value);
                crs = Some(found);
                i = next;
            }
            (Some(b"_CRS"), Some(&op)) => {
                crs = Some(Crs::Other(op));
                i = value;
            }
            _ => i += 1,
        }
    }
    if hid != Some(LNRO0005) {
        return None;
    }
    let offset = 0;
    if end > aml.len() {
        return Some(Err(DsdtError::Truncated { offset, name }));
    }
    let crs_error = |error| DsdtError::Crs {
        offset,
        name,
        error,
    };
    Some(match crs {
        None => Err(DsdtError::NoCrs { offset, name }),
        Some(Crs::Other(op)) => Err(DsdtError::CrsNotBuffer { offset, name, op }),
        Some(Crs::Malformed) => Err(crs_error(CrsError::Truncated(0))),
        Some(Crs::Buffer {
            start,
            end: buf_end,
        }) => match aml.get(start..buf_end) {
            Some(bytes) if buf_end <= end => parse_crs(bytes)
                .map(|device| AcpiDevice { name, device })
                .map_err(crs_error),
            _ => Err(crs_error(CrsError::Truncated(0))),
        },
    })
}

/// Finds every `LNRO0005` device in `len` bytes of AML that `read(offset, buf)` fills `buf`
/// from, and adds it to `out` in AML order. The first malformed one is the error.
pub fn scan_dsdt<E: From<DsdtError>>(
    len: usize,
    mut read: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    out: &mut DeviceList,
) -> Result<(), E> {
    let mut window = [0u8; WINDOW + 1];
    let mut device = [0u8; DEVICE_MAX];
    let mut base = 0;
    while base < len {
        let n = (len - base).min(window.len());
        read(base, &mut window[..n])?;
        for k in 0..n.min(WINDOW) {
            if window[k..n].starts_with(&DEVICE_OP) {
                let at = base + k;
                let m = (len - at).min(DEVICE_MAX);
                read(at, &mut device[..m])?;
                match parse_device(&device[..m]) {
                    Some(Ok(d)) if !out.push(d.device) => return Err(DsdtError::TooMany.into()),
                    Some(Err(e)) => return Err(e.shifted(at).into()),
                    _ => {}
                }
            }
        }
        base += WINDOW;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Both, for a check

/// Why the DSDT's devices could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DsdtReadError {
    Acpi(AcpiError),
    Dsdt(DsdtError),
}

impl From<MemError> for DsdtReadError {
    fn from(e: MemError) -> Self {
        Self::Acpi(AcpiError::Mem(e))
    }
}

impl From<DsdtError> for DsdtReadError {
    fn from(e: DsdtError) -> Self {
        Self::Dsdt(e)
    }
}

impl From<AcpiError> for DsdtReadError {
    fn from(e: AcpiError) -> Self {
        Self::Acpi(e)
    }
}

impl fmt::Display for DsdtReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Acpi(e) => write!(f, "{e}"),
            Self::Dsdt(e) => write!(f, "{e}"),
        }
    }
}

/// The LNRO0005 devices of the guest's DSDT.
fn dsdt_devices(mem: &impl Mem, rsdp_hint: u64) -> Result<DeviceList, DsdtReadError> {
    let dsdt = acpi::find_dsdt(mem, rsdp_hint)?;
    let (start, len) = acpi::aml_of(&dsdt);
    let mut list = DeviceList::new();
    scan_dsdt(
        len,
        |at, buf: &mut [u8]| {
            mem.read(start + at as u64, buf)
                .map_err(DsdtReadError::from)
        },
        &mut list,
    )?;
    Ok(list)
}

/// The devices of the command line `line`, in order, or the first bad entry and why.
pub fn cmdline_devices(line: &[u8]) -> Result<DeviceList, (&[u8], EntryError)> {
    let mut list = DeviceList::new();
    for entry in cmdline_entries(line) {
        let d = parse_cmdline_entry(entry).map_err(|e| (entry, e))?;
        // Past MAX_DEVICES the rest is only checked (the caller counts the entries).
        let _ = list.push(d);
    }
    Ok(list)
}

/// How the two lists differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disagreement {
    /// They name different numbers of devices.
    Count {
        /// Devices on the command line.
        cmdline: usize,
        /// Devices in the DSDT.
        dsdt: usize,
    },
    /// The same base, but another size or another set of interrupts.
    Differ {
        /// The command line's.
        cmdline: Device,
        /// The DSDT's.
        dsdt: Device,
    },
    /// A device the DSDT does not name.
    NotInDsdt(Device),
    /// A device the command line does not name.
    NotInCmdline(Device),
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count { cmdline, dsdt } => write!(
                f,
                "the command line names {cmdline} virtio-mmio devices, the DSDT {dsdt}"
            ),
            Self::Differ { cmdline, dsdt } => write!(
                f,
                "device at 0x{:x}: command line says {cmdline}, DSDT says {dsdt}",
                cmdline.base
            ),
            Self::NotInDsdt(d) => write!(f, "device {d} is on the command line, not in the DSDT"),
            Self::NotInCmdline(d) => {
                write!(f, "device {d} is in the DSDT, not on the command line")
            }
        }
    }
}

/// The first difference between the two lists; `None` when they name the same devices (same
/// windows, same interrupt sets), in any order.
pub fn disagreement(cmdline: &[Device], dsdt: &[Device]) -> Option<Disagreement> {
    for c in cmdline {
        match dsdt.iter().find(|d| d.base == c.base) {
            None => return Some(Disagreement::NotInDsdt(*c)),
            Some(d) if !c.agrees_with(d) => {
                return Some(Disagreement::Differ {
                    cmdline: *c,
                    dsdt: *d,
                })
            }
            Some(_) => {}
        }
    }
    if let Some(d) = dsdt
        .iter()
        .find(|d| !cmdline.iter().any(|c| c.base == d.base))
    {
        return Some(Disagreement::NotInCmdline(*d));
    }
    // Same bases both ways, but one list repeats a device.
    (cmdline.len() != dsdt.len()).then_some(Disagreement::Count {
        cmdline: cmdline.len(),
        dsdt: dsdt.len(),
    })
}

/// Finds the virtio-mmio devices both ways, for a check: the command line's list (in its
/// order) when the DSDT names the same devices; otherwise each problem goes to `report` and the
/// result is `None`.
pub fn find(ctx: &Context<'_>, report: &mut Report) -> Option<DeviceList> {
    let line = ctx.cmdline.unwrap_or_default();
    let entries = cmdline_entries(line).count();
    let from_cmdline = match cmdline_devices(line) {
        Err((entry, e)) => {
            report.fail(format_args!(
                "bad virtio_mmio.device={}: {e}",
                Escaped(entry)
            ));
            None
        }
        Ok(_) if entries > MAX_DEVICES => {
            report.fail(format_args!(
                "{entries} virtio_mmio.device= entries (the probe takes {MAX_DEVICES})"
            ));
            None
        }
        Ok(list) => Some(list),
    };
    let from_dsdt = match dsdt_devices(ctx.mem, ctx.boot_params.acpi_rsdp_addr) {
        Ok(list) => Some(list),
        Err(e) => {
            report.fail(format_args!("DSDT: {e}"));
            None
        }
    };
    let (cmdline, dsdt) = (from_cmdline?, from_dsdt?);
    match disagreement(cmdline.as_slice(), dsdt.as_slice()) {
        None => Some(cmdline),
        Some(diff) => {
            report.fail(format_args!(
                "virtio-mmio devices: the command line and the DSDT disagree: {diff} \
                 (command line: {}; DSDT: {})",
                Listed(cmdline.as_slice()),
                Listed(dsdt.as_slice())
            ));
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-pci

/// A virtio-pci function and the ECAM region it was found through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciDevice {
    /// The configuration space access.
    pub ecam: Ecam,
    /// What its configuration space says.
    pub function: VirtioFunction,
    /// How a driver takes its interrupts (`probe.pci_irq`; set by whoever hands it to a
    /// driver, [`PciIrq::MsixMasked`] as found).
    pub irq: PciIrq,
}

/// Up to [`MAX_DEVICES`] virtio-pci functions, in bus order.
pub type PciList = List<PciDevice>;

/// A fixed-capacity list.
#[derive(Debug, Clone, Copy)]
pub struct List<T: Copy> {
    items: [Option<T>; MAX_DEVICES],
    len: usize,
}

impl<T: Copy> List<T> {
    /// An empty list.
    pub const fn new() -> Self {
        Self {
            items: [None; MAX_DEVICES],
            len: 0,
        }
    }

    /// The items, in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.items[..self.len].iter().flatten()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds one; false if the list is full.
    pub fn push(&mut self, item: T) -> bool {
        match self.items.get_mut(self.len) {
            Some(slot) => {
                *slot = Some(item);
                self.len += 1;
                true
            }
            None => false,
        }
    }
}

impl<T: Copy> Default for List<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Shows virtio-pci functions as "00:01.0 blk, 00:02.0 rng", or "none".
pub struct ListedPci<'a>(pub &'a PciList);

impl fmt::Display for ListedPci<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "none");
        }
        for (i, d) in self.0.iter().enumerate() {
            let func = &d.function;
            write!(
                f,
                "{}{} {}",
                if i == 0 { "" } else { ", " },
                func.bdf,
                func.type_name()
            )?;
        }
        Ok(())
    }
}

/// The ECAM region of segment 0 bus 0 that the MCFG names: `Ok(None)` without an MCFG, an
/// error text for a malformed one or one whose region the probe cannot reach.
pub fn find_ecam(ctx: &Context<'_>) -> Result<Option<Ecam>, EcamError> {
    let mcfg = pci::find_mcfg(ctx.mem, ctx.boot_params.acpi_rsdp_addr).map_err(EcamError::Read)?;
    let Some(mcfg) = mcfg else {
        return Ok(None);
    };
    let e = *mcfg.bus0().ok_or(EcamError::NoBus0)?;
    Ecam::new(e.base, e.first_bus, e.last_bus)
        .map(Some)
        .ok_or(EcamError::Unreachable(e))
}

/// Why the ECAM region cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcamError {
    /// The MCFG (or the tables on the way) could not be read.
    Read(pci::McfgReadError),
    /// No allocation for segment 0 starting at bus 0.
    NoBus0,
    /// The allocation lies outside the MMIO hole below 4 GiB.
    Unreachable(pci::McfgEntry),
}

impl fmt::Display for EcamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(e) => write!(f, "MCFG: {e}"),
            Self::NoBus0 => write!(f, "MCFG: no allocation for segment 0 from bus 0"),
            Self::Unreachable(e) => write!(
                f,
                "MCFG: ECAM {e} lies outside 0xc0000000..4 GiB, where the probe maps devices"
            ),
        }
    }
}

/// Finds the virtio-pci functions of bus 0, for a check (see the module docs). Without an MCFG
/// the list is empty, or, when `required`, that is a problem. Problems go to `report`; `None`
/// then.
pub fn find_pci(ctx: &Context<'_>, report: &mut Report, required: bool) -> Option<PciList> {
    let ecam = match find_ecam(ctx) {
        Ok(Some(ecam)) => ecam,
        Ok(None) if !required => return Some(PciList::new()),
        Ok(None) => {
            report.fail(format_args!(
                "no MCFG in the ACPI tables: no PCI configuration space (probe.transport=pci)"
            ));
            return None;
        }
        Err(e) => {
            report.fail(format_args!("{e}"));
            return None;
        }
    };
    let mut list = PciList::new();
    let mut ok = true;
    let mut overflow = false;
    pci::enumerate(&ecam, 0, |bdf: Bdf, id| {
        if id as u16 != VENDOR_VIRTIO {
            return;
        }
        let cfg = ConfigSpace::read(&ecam, bdf);
        match VirtioFunction::parse(bdf, &cfg) {
            None => {}
            Some(Ok(function)) => {
                overflow |= !list.push(PciDevice {
                    ecam,
                    function,
                    irq: PciIrq::default(),
                })
            }
            Some(Err(e)) => {
                report.fail(format_args!("virtio-pci {bdf}: {e}"));
                ok = false;
            }
        }
    });
    if overflow {
        report.fail(format_args!("more than {MAX_DEVICES} virtio-pci functions"));
    }
    (ok && !overflow).then_some(list)
}

/// A virtio device on either transport, as the checks take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A virtio-mmio window.
    Mmio(Device),
    /// A virtio-pci function.
    Pci(PciDevice),
}

impl Found {
    /// Where it is, short: "0xc0001000" or "00:01.0".
    pub fn at(&self) -> At<'_> {
        At(self)
    }
}

/// Shows a device as "virtio-mmio at 0xc0001000" or "virtio-pci 00:01.0".
impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mmio(d) => write!(f, "virtio-mmio at 0x{:x}", d.base),
            Self::Pci(p) => write!(f, "virtio-pci {}", p.function.bdf),
        }
    }
}

/// Shows where a device is: "0xc0001000" or "00:01.0".
pub struct At<'a>(&'a Found);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Found::Mmio(d) => write!(f, "0x{:x}", d.base),
            Found::Pci(p) => write!(f, "{}", p.function.bdf),
        }
    }
}

/// A check's devices, in order: the virtio-mmio ones (command-line order), then the virtio-pci
/// ones (bus order).
pub type FoundList = List<Found>;

#[cfg(test)]
mod tests;
