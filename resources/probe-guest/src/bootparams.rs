//! The zero page (`struct boot_params` of the Linux x86 boot protocol): the fields the probe
//! reads, the e820 memory map and its validation, and the command line.
//!
//! Offsets are those of Linux's `arch/x86/include/uapi/asm/bootparam.h`. Fields are copied out
//! of guest memory once, through [`Mem`], so later code works on plain values.

use core::fmt;

use crate::phys::{Mem, MemError};

/// `acpi_rsdp_addr`: u64.
pub const OFF_ACPI_RSDP_ADDR: u64 = 0x070;
/// `ext_cmd_line_ptr`: u32, bits 63:32 of the command line address.
pub const OFF_EXT_CMD_LINE_PTR: u64 = 0x0c8;
/// `e820_entries`: u8.
pub const OFF_E820_ENTRIES: u64 = 0x1e8;
/// `hdr.cmd_line_ptr`: u32.
pub const OFF_CMD_LINE_PTR: u64 = 0x228;
/// `hdr.cmdline_size`: u32.
pub const OFF_CMDLINE_SIZE: u64 = 0x238;
/// `e820_table`: 128 packed entries of 20 bytes.
pub const OFF_E820_TABLE: u64 = 0x2d0;
/// Size of the zero page.
pub const ZERO_PAGE_SIZE: u64 = 0x1000;

/// Capacity of `e820_table`.
pub const E820_MAX_ENTRIES: usize = 128;
/// Size of one packed e820 entry.
const E820_ENTRY_SIZE: u64 = 20;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// Bound on the command line's length (with its NUL) when `cmdline_size` is 0.
pub const CMDLINE_DEFAULT_BOUND: u64 = 4096;

/// 4 GiB.
const GIB_4: u64 = 0x1_0000_0000;
/// The 32-bit MMIO hole, which must hold no RAM.
pub const MMIO_HOLE: (u64, u64) = (0xc000_0000, GIB_4);
/// The EBDA and BIOS area, which must hold no RAM.
pub const LEGACY_HOLE: (u64, u64) = (0x9fc00, 0x10_0000);

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type (1 = RAM, 2 = reserved, 3 = ACPI, ...).
    pub kind: u32,
}

/// The zero-page fields the probe uses.
#[derive(Debug, Clone)]
pub struct BootParams {
    /// Physical address of the ACPI RSDP, or 0.
    pub acpi_rsdp_addr: u64,
    /// Command line address (`cmd_line_ptr` | `ext_cmd_line_ptr` << 32).
    pub cmd_line_ptr: u64,
    /// `cmdline_size` as the VMM set it.
    pub cmdline_size: u32,
    /// `e820_entries` as the VMM set it (may exceed the table's capacity if malformed).
    pub e820_entries: u8,
    /// The first min(`e820_entries`, 128) entries of the table.
    e820: [E820Entry; E820_MAX_ENTRIES],
}

impl BootParams {
    /// Copies the fields out of the zero page at `addr`.
    pub fn read(mem: &impl Mem, addr: u64) -> Result<Self, MemError> {
        let field = |off: u64| addr.checked_add(off).ok_or(MemError { addr, len: off });
        // Whole page readable, so that a bad address fails here, as one error.
        let mut probe = [0u8; 1];
        mem.read(addr, &mut probe)?;
        mem.read(field(ZERO_PAGE_SIZE - 1)?, &mut probe)?;

        let e820_entries = mem.read_u8(field(OFF_E820_ENTRIES)?)?;
        let mut e820 = [E820Entry::default(); E820_MAX_ENTRIES];
        let count = usize::from(e820_entries).min(E820_MAX_ENTRIES);
        for (i, entry) in e820.iter_mut().take(count).enumerate() {
            let at = field(OFF_E820_TABLE + i as u64 * E820_ENTRY_SIZE)?;
            *entry = E820Entry {
                addr: mem.read_u64(at)?,
                size: mem.read_u64(at + 8)?,
                kind: mem.read_u32(at + 16)?,
            };
        }
        let low = u64::from(mem.read_u32(field(OFF_CMD_LINE_PTR)?)?);
        let high = u64::from(mem.read_u32(field(OFF_EXT_CMD_LINE_PTR)?)?);
        Ok(Self {
            acpi_rsdp_addr: mem.read_u64(field(OFF_ACPI_RSDP_ADDR)?)?,
            cmd_line_ptr: low | high << 32,
            cmdline_size: mem.read_u32(field(OFF_CMDLINE_SIZE)?)?,
            e820_entries,
            e820,
        })
    }

    /// The e820 entries that fit in the table.
    pub fn e820_table(&self) -> &[E820Entry] {
        &self.e820[..usize::from(self.e820_entries).min(E820_MAX_ENTRIES)]
    }
}

/// What a well-formed e820 map says about RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Summary {
    /// Number of entries.
    pub entries: usize,
    /// Sum of the RAM entries' sizes.
    pub ram_total: u64,
    /// End of the highest RAM entry below 4 GiB.
    pub ram_top_below_4g: u64,
    /// Sum of the RAM entries' sizes at and above 4 GiB.
    pub ram_above_4g: u64,
}

/// Why an e820 map is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Error {
    /// `e820_entries` is 0 or above 128.
    Count(u8),
    /// Entry `index` has size 0.
    Empty(usize),
    /// Entry `index` wraps around the address space.
    Wraps(usize),
    /// Entry `index` starts before the end of the previous one (unsorted or overlapping).
    Order(usize, E820Entry, E820Entry),
    /// No RAM entry starts at 0.
    NoRamAtZero,
    /// RAM entry overlaps a range that must hold no RAM (named).
    RamIn(E820Entry, &'static str),
}

impl fmt::Display for E820Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n} entries (expected 1..=128)"),
            Self::Empty(i) => write!(f, "entry {i} has size 0"),
            Self::Wraps(i) => write!(f, "entry {i} wraps around the address space"),
            Self::Order(i, prev, cur) => write!(
                f,
                "entry {i} [0x{:x}..0x{:x}) starts before the end of entry {} [0x{:x}..0x{:x}) \
                 (unsorted or overlapping)",
                cur.addr,
                cur.addr.wrapping_add(cur.size),
                i - 1,
                prev.addr,
                prev.addr.wrapping_add(prev.size)
            ),
            Self::NoRamAtZero => write!(f, "no RAM entry starts at 0"),
            Self::RamIn(e, what) => write!(
                f,
                "RAM [0x{:x}..0x{:x}) overlaps the {what}",
                e.addr,
                e.addr.wrapping_add(e.size)
            ),
        }
    }
}

/// Checks the e820 map (`count` as the zero page says, `table` as read) and sums up its RAM.
pub fn summarize_e820(count: u8, table: &[E820Entry]) -> Result<E820Summary, E820Error> {
    if count == 0 || usize::from(count) > E820_MAX_ENTRIES || table.len() != usize::from(count) {
        return Err(E820Error::Count(count));
    }
    let overlaps = |start: u64, end: u64, range: (u64, u64)| start < range.1 && range.0 < end;
    let mut summary = E820Summary {
        entries: table.len(),
        ram_total: 0,
        ram_top_below_4g: 0,
        ram_above_4g: 0,
    };
    let mut prev_end = 0u64;
    let mut ram_at_zero = false;
    for (i, e) in table.iter().enumerate() {
        if e.size == 0 {
            return Err(E820Error::Empty(i));
        }
        let end = e.addr.checked_add(e.size).ok_or(E820Error::Wraps(i))?;
        if i > 0 && e.addr < prev_end {
            return Err(E820Error::Order(i, table[i - 1], *e));
        }
        prev_end = end;
        if e.kind != E820_RAM {
            continue;
        }
        if overlaps(e.addr, end, MMIO_HOLE) {
            return Err(E820Error::RamIn(*e, "MMIO hole 0xc0000000..0x100000000"));
        }
        if overlaps(e.addr, end, LEGACY_HOLE) {
            return Err(E820Error::RamIn(*e, "EBDA/BIOS area 0x9fc00..0x100000"));
        }
        ram_at_zero |= e.addr == 0;
        summary.ram_total += e.size;
        if end <= GIB_4 {
            summary.ram_top_below_4g = summary.ram_top_below_4g.max(end);
        } else {
            summary.ram_above_4g += e.size;
        }
    }
    if !ram_at_zero {
        return Err(E820Error::NoRamAtZero);
    }
    Ok(summary)
}

/// Why the command line could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdlineError {
    /// `cmd_line_ptr` is 0.
    NoPointer,
    /// A byte before the NUL is outside readable memory.
    Unreadable(MemError),
    /// No NUL within the bound (`cmdline_size` + 1, or 4096 if `cmdline_size` is 0).
    NotTerminated {
        /// Bytes searched.
        bound: u64,
    },
    /// Longer than the probe's buffer.
    TooLong {
        /// The probe's buffer size.
        capacity: usize,
    },
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPointer => write!(f, "cmd_line_ptr is 0"),
            Self::Unreadable(e) => write!(f, "{e}"),
            Self::NotTerminated { bound } => write!(f, "no NUL within {bound} bytes"),
            Self::TooLong { capacity } => {
                write!(f, "longer than the probe's {capacity}-byte buffer")
            }
        }
    }
}

/// Copies the NUL-terminated command line into `buf` and returns it (without the NUL).
///
/// `cmdline_size` bounds the search: the NUL may be at index `cmdline_size` at the latest (the
/// boot protocol's field counts the string without its NUL; VMMs that count the NUL too pass as
/// well). A `cmdline_size` of 0 means "unknown": the bound is then 4096 bytes.
pub fn read_cmdline<'b>(
    mem: &impl Mem,
    bp: &BootParams,
    buf: &'b mut [u8],
) -> Result<&'b [u8], CmdlineError> {
    if bp.cmd_line_ptr == 0 {
        return Err(CmdlineError::NoPointer);
    }
    let bound = match bp.cmdline_size {
        0 => CMDLINE_DEFAULT_BOUND,
        n => u64::from(n) + 1,
    };
    for i in 0..bound {
        let byte = mem
            .read_u8(bp.cmd_line_ptr.saturating_add(i))
            .map_err(CmdlineError::Unreadable)?;
        if byte == 0 {
            return Ok(&buf[..i as usize]);
        }
        match buf.get_mut(i as usize) {
            Some(slot) => *slot = byte,
            None => {
                return Err(CmdlineError::TooLong {
                    capacity: buf.len(),
                })
            }
        }
    }
    Err(CmdlineError::NotTerminated { bound })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phys::TestMem;

    const MIB: u64 = 1 << 20;

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820_RAM,
        }
    }

    fn cgvm_map(mem: u64) -> [E820Entry; 2] {
        [ram(0, 0x9fc00), ram(MIB, mem - MIB)]
    }

    #[test]
    fn summarizes_a_small_map() {
        let map = cgvm_map(256 * MIB);
        let s = summarize_e820(2, &map).expect("valid map");
        assert_eq!(s.entries, 2);
        assert_eq!(s.ram_total, 256 * MIB - (0x10_0000 - 0x9fc00));
        assert_eq!(s.ram_top_below_4g, 256 * MIB);
        assert_eq!(s.ram_above_4g, 0);
    }

    #[test]
    fn summarizes_a_map_above_4g() {
        let map = [
            ram(0, 0x9fc00),
            E820Entry {
                addr: 0x9fc00,
                size: 0x400,
                kind: 2,
            },
            ram(MIB, 0xc000_0000 - MIB),
            ram(0x1_0000_0000, 1 << 30),
        ];
        let s = summarize_e820(4, &map).expect("valid map");
        assert_eq!(s.ram_top_below_4g, 0xc000_0000);
        assert_eq!(s.ram_above_4g, 1 << 30);
    }

    #[test]
    fn rejects_malformed_maps() {
        assert_eq!(summarize_e820(0, &[]), Err(E820Error::Count(0)));
        assert_eq!(summarize_e820(200, &[]), Err(E820Error::Count(200)));
        let unsorted = [ram(MIB, MIB), ram(0, 0x9fc00)];
        assert!(matches!(
            summarize_e820(2, &unsorted),
            Err(E820Error::Order(1, _, _))
        ));
        let overlapping = [ram(0, 0x9fc00), ram(0x9f000, 0x100)];
        assert!(matches!(
            summarize_e820(2, &overlapping),
            Err(E820Error::Order(1, _, _))
        ));
        let legacy = [ram(0, 0xa0000)];
        assert!(matches!(
            summarize_e820(1, &legacy),
            Err(E820Error::RamIn(_, _))
        ));
        let hole = [ram(0, 0x9fc00), ram(MIB, 0xc000_0000)];
        assert!(matches!(
            summarize_e820(2, &hole),
            Err(E820Error::RamIn(_, _))
        ));
        let no_zero = [ram(MIB, MIB)];
        assert_eq!(summarize_e820(1, &no_zero), Err(E820Error::NoRamAtZero));
        let empty = [ram(0, 0x9fc00), ram(MIB, 0)];
        assert_eq!(summarize_e820(2, &empty), Err(E820Error::Empty(1)));
        let wraps = [ram(0, 0x9fc00), ram(u64::MAX - 1, 4)];
        assert_eq!(summarize_e820(2, &wraps), Err(E820Error::Wraps(1)));
    }

    fn zero_page(mem: &mut TestMem, cmdline: &[u8], cmdline_size: u32) {
        mem.write(0x7000 + OFF_ACPI_RSDP_ADDR, &0xe0000u64.to_le_bytes());
        mem.write(0x7000 + OFF_E820_ENTRIES, &[2]);
        mem.write(0x7000 + OFF_CMD_LINE_PTR, &0x20000u32.to_le_bytes());
        mem.write(0x7000 + OFF_CMDLINE_SIZE, &cmdline_size.to_le_bytes());
        let mut at = 0x7000 + OFF_E820_TABLE;
        for e in cgvm_map(64 * MIB) {
            mem.write(at, &e.addr.to_le_bytes());
            mem.write(at + 8, &e.size.to_le_bytes());
            mem.write(at + 16, &e.kind.to_le_bytes());
            at += E820_ENTRY_SIZE;
        }
        mem.write(0x20000, cmdline);
    }

    #[test]
    fn reads_zero_page_and_cmdline() {
        let mut mem = TestMem::new(0, 0x30000);
        zero_page(&mut mem, b"probe.tests=boot\0", 17);
        let bp = BootParams::read(&mem, 0x7000).expect("zero page");
        assert_eq!(bp.acpi_rsdp_addr, 0xe0000);
        assert_eq!(bp.cmd_line_ptr, 0x20000);
        assert_eq!(bp.e820_table(), &cgvm_map(64 * MIB));
        let mut buf = [0u8; 64];
        assert_eq!(
            read_cmdline(&mem, &bp, &mut buf),
            Ok(&b"probe.tests=boot"[..])
        );
    }

    #[test]
    fn cmdline_bounds() {
        let mut mem = TestMem::new(0, 0x30000);
        // cmdline_size counts without the NUL (boot protocol): NUL at index cmdline_size is fine.
        zero_page(&mut mem, b"abcd\0", 4);
        let bp = BootParams::read(&mem, 0x7000).expect("zero page");
        let mut buf = [0u8; 64];
        assert_eq!(read_cmdline(&mem, &bp, &mut buf), Ok(&b"abcd"[..]));

        zero_page(&mut mem, b"abcdef\0", 4);
        let bp = BootParams::read(&mem, 0x7000).expect("zero page");
        assert_eq!(
            read_cmdline(&mem, &bp, &mut buf),
            Err(CmdlineError::NotTerminated { bound: 5 })
        );

        zero_page(&mut mem, b"abcdef\0", 0);
        let bp = BootParams::read(&mem, 0x7000).expect("zero page");
        let mut small = [0u8; 3];
        assert_eq!(
            read_cmdline(&mem, &bp, &mut small),
            Err(CmdlineError::TooLong { capacity: 3 })
        );
    }
}
