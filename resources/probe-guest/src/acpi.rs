//! ACPI table parsing: the RSDP, the root table (XSDT, or RSDT for ACPI 1.0), table headers
//! and checksums, the MADT's CPUs and IOAPICs, and what ACPI S5 (soft off) needs on a
//! hardware-reduced platform: the FADT's flags, SLEEP_CONTROL_REG and DSDT address, and the
//! DSDT's `\_S5_` (found by `aml`); the DSDT itself ([`find_dsdt`]) for `discovery`, and any
//! table by signature ([`find_table`]: the MCFG for `pci`).
//!
//! All reads go through [`Mem`] and every length is checked against the table that holds it, so
//! a malformed table is an [`AcpiError`], never a fault. Policy (what the boot check requires)
//! lives in `checks::boot`, not here.

use core::fmt;

use crate::aml::{self, AmlError};
use crate::phys::{Mem, MemError, MMIO_HOLE_START};
use crate::text::Escaped;

/// Where the RSDP is searched when the zero page does not say (the BIOS read-only area).
pub const RSDP_SCAN_START: u64 = 0xe0000;
/// End of the RSDP search area (exclusive).
pub const RSDP_SCAN_END: u64 = 0x10_0000;
/// The RSDP's signature.
const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
/// Bytes covered by the ACPI 1.0 RSDP checksum.
const RSDP_V1_LEN: usize = 20;
/// Bytes covered by the extended checksum (ACPI 2.0+ RSDP).
const RSDP_V2_LEN: usize = 36;

/// Size of the common table header.
pub const SDT_HEADER_LEN: u32 = 36;
/// Largest table the probe accepts.
pub const MAX_TABLE_LEN: u32 = 1 << 20;
/// Offset of the first MADT entry (header, local APIC address, flags).
const MADT_ENTRIES_OFFSET: u32 = 44;

/// MADT entry: processor local APIC.
const MADT_LOCAL_APIC: u8 = 0;
/// MADT entry: I/O APIC.
const MADT_IO_APIC: u8 = 1;
/// MADT entry: processor local x2APIC.
const MADT_LOCAL_X2APIC: u8 = 9;
/// Local APIC / x2APIC flags: enabled.
const MADT_ENABLED: u32 = 1 << 0;

/// FADT: the 32-bit DSDT address (u32).
const FADT_DSDT: usize = 40;
/// FADT: the fixed feature flags (u32).
const FADT_FLAGS: usize = 112;
/// FADT: the 64-bit DSDT address (u64, ACPI 2.0+).
const FADT_X_DSDT: usize = 140;
/// FADT: SLEEP_CONTROL_REG, a Generic Address Structure (ACPI 5.0+).
const FADT_SLEEP_CONTROL_REG: usize = 244;
/// The FADT bytes the probe reads: through SLEEP_CONTROL_REG.
pub const FADT_READ_LEN: usize = FADT_SLEEP_CONTROL_REG + GAS_LEN;
/// FADT flag: HW_REDUCED_ACPI (no fixed hardware; sleep through the sleep registers).
pub const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;

/// Size of a Generic Address Structure.
pub const GAS_LEN: usize = 12;
/// GAS address space: system memory.
pub const GAS_SYSTEM_MEMORY: u8 = 0;
/// GAS address space: system I/O.
pub const GAS_SYSTEM_IO: u8 = 1;
/// GAS access size: undefined (legacy reasons).
const GAS_ACCESS_UNDEFINED: u8 = 0;
/// GAS access size: byte.
const GAS_ACCESS_BYTE: u8 = 1;

/// Sleep control register: SLP_EN.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control register: the SLP_TYP field (bits 2..4).
const SLP_TYP_MASK: u8 = 0x1c;
/// Sleep control register: where SLP_TYP starts.
const SLP_TYP_SHIFT: u32 = 2;

/// Most CPUs the probe records.
pub const MAX_CPUS: usize = 256;
/// Most table signatures the probe records for its report.
pub const MAX_TABLES: usize = 32;

/// A table signature.
pub type Signature = [u8; 4];

/// Why the ACPI tables could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiError {
    /// A pointer led outside readable memory.
    Mem(MemError),
    /// No "RSD PTR " on any 16-byte boundary in 0xe0000..0x100000.
    NoRsdp,
    /// `acpi_rsdp_addr` points at something without the RSDP signature.
    RsdpSignature(u64),
    /// The RSDP's checksum (first 20 bytes) is wrong.
    RsdpChecksum(u64),
    /// The RSDP's extended checksum (36 bytes) is wrong.
    RsdpExtendedChecksum(u64),
    /// A revision 2+ RSDP with a length below 36.
    RsdpLength(u64, u32),
    /// The RSDP names neither an XSDT nor an RSDT.
    NoRootTable,
    /// A table's length is below the header size or above the probe's limit.
    TableLength(Signature, u64, u32),
    /// A table's checksum is wrong.
    TableChecksum(Signature, u64),
    /// A table has another signature than the pointer to it promises.
    WrongSignature {
        /// Where the table is.
        addr: u64,
        /// What it should be.
        expected: Signature,
        /// What it is.
        found: Signature,
    },
    /// The root table's length is not the header plus whole entries.
    RootTableEntries(Signature, u32),
    /// No MADT ("APIC") in the root table.
    NoMadt,
    /// A MADT entry is truncated or has the wrong length for its type.
    MadtEntry {
        /// Offset of the entry in the MADT.
        offset: u32,
        /// Its type.
        kind: u8,
        /// Its length field.
        len: u8,
    },
    /// More enabled CPUs than the probe records.
    TooManyCpus,
    /// Two enabled CPUs share an APIC ID.
    DuplicateApicId(u32),
    /// No FADT ("FACP") in the root table.
    NoFadt,
    /// The FADT is too short for a field the probe needs.
    FadtTooShort {
        /// The FADT's length.
        len: u32,
        /// The field.
        field: &'static str,
        /// The length that would cover it.
        need: usize,
    },
    /// The FADT's HW_REDUCED_ACPI flag is clear; these are the flags.
    NotHardwareReduced(u32),
    /// SLEEP_CONTROL_REG's address is 0: the platform has no sleep control register.
    NoSleepControl,
    /// SLEEP_CONTROL_REG is not a register the probe can write a byte to.
    BadSleepControl(Gas, &'static str),
    /// Both X_DSDT and DSDT are 0.
    NoDsdt,
    /// The DSDT's `\_S5_` could not be read.
    Aml(AmlError),
}

impl From<AmlError> for AcpiError {
    fn from(e: AmlError) -> Self {
        Self::Aml(e)
    }
}

impl From<MemError> for AcpiError {
    fn from(e: MemError) -> Self {
        Self::Mem(e)
    }
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Mem(e) => write!(f, "{e}"),
            Self::NoRsdp => write!(f, "no RSDP in 0xe0000..0x100000"),
            Self::RsdpSignature(a) => write!(f, "no RSDP signature at 0x{a:x}"),
            Self::RsdpChecksum(a) => write!(f, "RSDP at 0x{a:x}: bad checksum"),
            Self::RsdpExtendedChecksum(a) => write!(f, "RSDP at 0x{a:x}: bad extended checksum"),
            Self::RsdpLength(a, l) => write!(f, "RSDP at 0x{a:x}: length {l} (expected >= 36)"),
            Self::NoRootTable => write!(f, "RSDP has neither an XSDT nor an RSDT address"),
            Self::TableLength(s, a, l) => {
                write!(f, "{} at 0x{a:x}: bad length {l}", Escaped(&s))
            }
            Self::TableChecksum(s, a) => write!(f, "{} at 0x{a:x}: bad checksum", Escaped(&s)),
            Self::WrongSignature {
                addr,
                expected,
                found,
            } => write!(
                f,
                "expected {} at 0x{addr:x}, found {}",
                Escaped(&expected),
                Escaped(&found)
            ),
            Self::RootTableEntries(s, l) => {
                write!(
                    f,
                    "{}: length {l} is not a whole number of entries",
                    Escaped(&s)
                )
            }
            Self::NoMadt => write!(f, "no MADT (APIC) in the root table"),
            Self::MadtEntry { offset, kind, len } => write!(
                f,
                "MADT entry at offset {offset}: type {kind}, bad length {len}"
            ),
            Self::TooManyCpus => write!(f, "MADT lists more than {MAX_CPUS} enabled CPUs"),
            Self::DuplicateApicId(id) => write!(f, "MADT lists APIC ID {id} twice"),
            Self::NoFadt => write!(f, "no FADT (FACP) in the root table"),
            Self::FadtTooShort { len, field, need } => write!(
                f,
                "FADT length {len} does not cover {field} (needs {need}, ACPI 5.0+)"
            ),
            Self::NotHardwareReduced(flags) => write!(
                f,
                "FADT flags 0x{flags:08x}: HW_REDUCED_ACPI (bit 20) is clear"
            ),
            Self::NoSleepControl => write!(f, "FADT SLEEP_CONTROL_REG address is 0"),
            Self::BadSleepControl(gas, why) => {
                write!(f, "FADT SLEEP_CONTROL_REG {gas}: {why}")
            }
            Self::NoDsdt => write!(f, "FADT has neither an X_DSDT nor a DSDT address"),
            Self::Aml(e) => write!(f, "DSDT: {e}"),
        }
    }
}

/// How the RSDP was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsdpSource {
    /// `acpi_rsdp_addr` in the zero page.
    ZeroPage,
    /// The scan of 0xe0000..0x100000.
    Scan,
}

/// A checked RSDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rsdp {
    /// Where it is.
    pub addr: u64,
    /// How it was found.
    pub source: RsdpSource,
    /// 0 for ACPI 1.0, 2 for 2.0+.
    pub revision: u8,
    /// RSDT address.
    pub rsdt: u32,
    /// XSDT address (0 before revision 2).
    pub xsdt: u64,
}

/// Sum of `len` bytes at `addr`, modulo 256 (0 for a valid ACPI checksum).
fn checksum(mem: &impl Mem, addr: u64, len: u64) -> Result<u8, MemError> {
    let mut sum = 0u8;
    let mut chunk = [0u8; 64];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        let at = addr.checked_add(done).ok_or(MemError { addr, len })?;
        mem.read(at, &mut chunk[..n])?;
        sum = chunk[..n].iter().fold(sum, |s, &b| s.wrapping_add(b));
        done += n as u64;
    }
    Ok(sum)
}

/// Finds and checks the RSDP: at `hint` if non-zero (the zero page's `acpi_rsdp_addr`), else by
/// scanning 0xe0000..0x100000 on 16-byte boundaries.
pub fn find_rsdp(mem: &impl Mem, hint: u64) -> Result<Rsdp, AcpiError> {
    if hint != 0 {
        return parse_rsdp(mem, hint, RsdpSource::ZeroPage);
    }
    let mut sig = [0u8; 8];
    for addr in (RSDP_SCAN_START..RSDP_SCAN_END).step_by(16) {
        mem.read(addr, &mut sig)?;
        if &sig == RSDP_SIGNATURE {
            return parse_rsdp(mem, addr, RsdpSource::Scan);
        }
    }
    Err(AcpiError::NoRsdp)
}

fn parse_rsdp(mem: &impl Mem, addr: u64, source: RsdpSource) -> Result<Rsdp, AcpiError> {
    let mut v1 = [0u8; RSDP_V1_LEN];
    mem.read(addr, &mut v1)?;
    if &v1[..8] != RSDP_SIGNATURE {
        return Err(AcpiError::RsdpSignature(addr));
    }
    if checksum(mem, addr, RSDP_V1_LEN as u64)? != 0 {
        return Err(AcpiError::RsdpChecksum(addr));
    }
    let revision = v1[15];
    let rsdt = u32::from_le_bytes([v1[16], v1[17], v1[18], v1[19]]);
    let mut xsdt = 0;
    if revision >= 2 {
        let mut v2 = [0u8; RSDP_V2_LEN];
        mem.read(addr, &mut v2)?;
        let length = u32::from_le_bytes([v2[20], v2[21], v2[22], v2[23]]);
        if (length as usize) < RSDP_V2_LEN {
            return Err(AcpiError::RsdpLength(addr, length));
        }
        if checksum(mem, addr, RSDP_V2_LEN as u64)? != 0 {
            return Err(AcpiError::RsdpExtendedChecksum(addr));
        }
        let mut x = [0u8; 8];
        x.copy_from_slice(&v2[24..32]);
        xsdt = u64::from_le_bytes(x);
    }
    Ok(Rsdp {
        addr,
        source,
        revision,
        rsdt,
        xsdt,
    })
}

/// A checked table header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdtHeader {
    /// Where the table is.
    pub addr: u64,
    /// Its signature.
    pub signature: Signature,
    /// Its length, header included.
    pub length: u32,
}

/// Reads the table at `addr` and checks its length and checksum.
pub fn read_table(mem: &impl Mem, addr: u64) -> Result<SdtHeader, AcpiError> {
    let mut signature = [0u8; 4];
    mem.read(addr, &mut signature)?;
    let length = mem.read_u32(addr.checked_add(4).ok_or(MemError { addr, len: 8 })?)?;
    if !(SDT_HEADER_LEN..=MAX_TABLE_LEN).contains(&length) {
        return Err(AcpiError::TableLength(signature, addr, length));
    }
    if checksum(mem, addr, u64::from(length))? != 0 {
        return Err(AcpiError::TableChecksum(signature, addr));
    }
    Ok(SdtHeader {
        addr,
        signature,
        length,
    })
}

/// The XSDT or RSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootTable {
    /// Its header.
    pub header: SdtHeader,
    /// 8 for the XSDT, 4 for the RSDT.
    pub entry_size: u32,
}

impl RootTable {
    /// Number of table pointers.
    pub fn entries(&self) -> u32 {
        (self.header.length - SDT_HEADER_LEN) / self.entry_size
    }

    /// Table pointer `i` (< `entries()`).
    pub fn entry(&self, mem: &impl Mem, i: u32) -> Result<u64, AcpiError> {
        let at = self.header.addr + u64::from(SDT_HEADER_LEN + i * self.entry_size);
        Ok(match self.entry_size {
            8 => mem.read_u64(at)?,
            _ => u64::from(mem.read_u32(at)?),
        })
    }
}

/// Reads the root table the RSDP names: the XSDT when revision >= 2 gives one, else the RSDT.
pub fn root_table(mem: &impl Mem, rsdp: &Rsdp) -> Result<RootTable, AcpiError> {
    let (addr, expected, entry_size) = if rsdp.revision >= 2 && rsdp.xsdt != 0 {
        (rsdp.xsdt, *b"XSDT", 8)
    } else if rsdp.rsdt != 0 {
        (u64::from(rsdp.rsdt), *b"RSDT", 4)
    } else {
        return Err(AcpiError::NoRootTable);
    };
    let header = read_table(mem, addr)?;
    if header.signature != expected {
        return Err(AcpiError::WrongSignature {
            addr,
            expected,
            found: header.signature,
        });
    }
    let body = header.length - SDT_HEADER_LEN;
    if body / entry_size * entry_size != body {
        return Err(AcpiError::RootTableEntries(header.signature, header.length));
    }
    Ok(RootTable { header, entry_size })
}

/// The tables the root table lists, each checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tables {
    signatures: [Signature; MAX_TABLES],
    /// Number of tables (may exceed the recorded signatures).
    pub count: usize,
    /// The MADT, if listed.
    pub madt: Option<SdtHeader>,
    /// The FADT, if listed.
    pub fadt: Option<SdtHeader>,
}

impl Tables {
    /// Signatures of the first `MAX_TABLES` tables, in root-table order.
    pub fn signatures(&self) -> &[Signature] {
        &self.signatures[..self.count.min(MAX_TABLES)]
    }
}

/// Reads and checks every table the root table lists.
pub fn tables(mem: &impl Mem, root: &RootTable) -> Result<Tables, AcpiError> {
    let mut tables = Tables {
        signatures: [[0; 4]; MAX_TABLES],
        count: 0,
        madt: None,
        fadt: None,
    };
    for i in 0..root.entries() {
        let header = read_table(mem, root.entry(mem, i)?)?;
        if let Some(slot) = tables.signatures.get_mut(tables.count) {
            *slot = header.signature;
        }
        tables.count += 1;
        if &header.signature == b"APIC" && tables.madt.is_none() {
            tables.madt = Some(header);
        }
        if &header.signature == b"FACP" && tables.fadt.is_none() {
            tables.fadt = Some(header);
        }
    }
    Ok(tables)
}

/// What the MADT says about interrupt controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Madt {
    /// Local APIC address.
    pub lapic_addr: u32,
    apic_ids: [u32; MAX_CPUS],
    cpus: usize,
    /// Local APIC and x2APIC entries without the enabled flag.
    pub disabled_cpus: u32,
    /// Of the enabled CPUs, how many come from x2APIC entries.
    pub x2apic_cpus: u32,
    /// I/O APIC entries.
    pub ioapics: u32,
}

impl Madt {
    /// APIC IDs of the enabled CPUs, in table order.
    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..self.cpus]
    }

    fn add_cpu(&mut self, apic_id: u32) -> Result<(), AcpiError> {
        if self.apic_ids().contains(&apic_id) {
            return Err(AcpiError::DuplicateApicId(apic_id));
        }
        let slot = self
            .apic_ids
            .get_mut(self.cpus)
            .ok_or(AcpiError::TooManyCpus)?;
        *slot = apic_id;
        self.cpus += 1;
        Ok(())
    }
}

/// Parses the MADT whose checked header is `header`.
pub fn parse_madt(mem: &impl Mem, header: &SdtHeader) -> Result<Madt, AcpiError> {
    if header.length < MADT_ENTRIES_OFFSET {
        return Err(AcpiError::TableLength(
            header.signature,
            header.addr,
            header.length,
        ));
    }
    let mut madt = Madt {
        lapic_addr: mem.read_u32(header.addr + 36)?,
        apic_ids: [0; MAX_CPUS],
        cpus: 0,
        disabled_cpus: 0,
        x2apic_cpus: 0,
        ioapics: 0,
    };
    let mut offset = MADT_ENTRIES_OFFSET;
    while offset < header.length {
        let at = header.addr + u64::from(offset);
        let kind = mem.read_u8(at)?;
        let bad = |len| AcpiError::MadtEntry { offset, kind, len };
        if header.length - offset < 2 {
            return Err(bad(0));
        }
        let len = mem.read_u8(at + 1)?;
        if len < 2 || u32::from(len) > header.length - offset {
            return Err(bad(len));
        }
        match kind {
            MADT_LOCAL_APIC => {
                if len != 8 {
                    return Err(bad(len));
                }
                let apic_id = mem.read_u8(at + 3)?;
                if mem.read_u32(at + 4)? & MADT_ENABLED != 0 {
                    madt.add_cpu(u32::from(apic_id))?;
                } else {
                    madt.disabled_cpus += 1;
                }
            }
            MADT_IO_APIC => {
                if len != 12 {
                    return Err(bad(len));
                }
                madt.ioapics += 1;
            }
            MADT_LOCAL_X2APIC => {
                if len != 16 {
                    return Err(bad(len));
                }
                let apic_id = mem.read_u32(at + 4)?;
                if mem.read_u32(at + 8)? & MADT_ENABLED != 0 {
                    madt.add_cpu(apic_id)?;
                    madt.x2apic_cpus += 1;
                } else {
                    madt.disabled_cpus += 1;
                }
            }
            _ => {}
        }
        offset += u32::from(len);
    }
    Ok(madt)
}

/// A Generic Address Structure: where a register is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gas {
    /// Address space ID ([`GAS_SYSTEM_MEMORY`], [`GAS_SYSTEM_IO`], ...).
    pub space_id: u8,
    /// Register bit width.
    pub bit_width: u8,
    /// Register bit offset.
    pub bit_offset: u8,
    /// Access size (0 undefined, 1 byte, 2 word, 3 dword, 4 qword).
    pub access_size: u8,
    /// Address in that space.
    pub address: u64,
}

impl Gas {
    /// Reads a GAS from the first [`GAS_LEN`] bytes of `bytes` (`None` if there are fewer).
    pub fn read(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; GAS_LEN] = bytes.get(..GAS_LEN)?.try_into().ok()?;
        Some(Self {
            space_id: b[0],
            bit_width: b[1],
            bit_offset: b[2],
            access_size: b[3],
            address: u64::from_le_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]),
        })
    }
}

impl fmt::Display for Gas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.space_id {
            GAS_SYSTEM_MEMORY => write!(f, "(SystemMemory")?,
            GAS_SYSTEM_IO => write!(f, "(SystemIO")?,
            id => write!(f, "(address space {id}")?,
        }
        write!(
            f,
            " 0x{:x}, {} bits at bit {}, access size {})",
            self.address, self.bit_width, self.bit_offset, self.access_size
        )
    }
}

/// A sleep control register the probe can write a byte to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepRegister {
    /// An I/O port.
    Io(u16),
    /// A byte of device memory in the 32-bit MMIO hole.
    Memory(u64),
}

impl SleepRegister {
    /// Checks SLEEP_CONTROL_REG: an 8-bit register at bit 0, accessed by byte (or access size
    /// undefined), in SystemIO below 0x10000 or in SystemMemory inside 0xc0000000..4 GiB: the
    /// device window the start code maps uncached, where no Rust object lives (the probe maps
    /// nothing above 4 GiB, and a register in RAM is no register).
    pub fn from_gas(gas: &Gas) -> Result<Self, AcpiError> {
        let bad = |why| Err(AcpiError::BadSleepControl(*gas, why));
        if gas.address == 0 {
            return Err(AcpiError::NoSleepControl);
        }
        if gas.bit_width != 8 || gas.bit_offset != 0 {
            return bad("not an 8-bit register at bit 0");
        }
        if gas.access_size != GAS_ACCESS_UNDEFINED && gas.access_size != GAS_ACCESS_BYTE {
            return bad("access size is not byte");
        }
        match gas.space_id {
            GAS_SYSTEM_IO => match u16::try_from(gas.address) {
                Ok(port) => Ok(Self::Io(port)),
                Err(_) => bad("I/O port above 0xffff"),
            },
            GAS_SYSTEM_MEMORY if (MMIO_HOLE_START..1 << 32).contains(&gas.address) => {
                Ok(Self::Memory(gas.address))
            }
            GAS_SYSTEM_MEMORY => {
                bad("memory outside 0xc0000000..4 GiB, where the probe maps devices")
            }
            _ => bad("address space is neither SystemIO nor SystemMemory"),
        }
    }
}

/// What the FADT says about S5 on a hardware-reduced platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FadtSleep {
    /// SLEEP_CONTROL_REG.
    pub sleep_control: SleepRegister,
    /// The DSDT's address: X_DSDT, or DSDT when X_DSDT is 0.
    pub dsdt: u64,
}

/// Parses the FADT's first bytes: `fadt` holds the table's first `min(length, FADT_READ_LEN)`
/// bytes. Requires HW_REDUCED_ACPI, a usable SLEEP_CONTROL_REG and a DSDT address.
pub fn parse_fadt(fadt: &[u8]) -> Result<FadtSleep, AcpiError> {
    let len = u32::try_from(fadt.len()).unwrap_or(u32::MAX);
    let too_short = |field, need| AcpiError::FadtTooShort { len, field, need };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(fadt.get(at..at + 4)?.try_into().ok()?))
    };
    let flags = u32_at(FADT_FLAGS).ok_or(too_short("Flags", FADT_FLAGS + 4))?;
    if flags & FADT_HW_REDUCED_ACPI == 0 {
        return Err(AcpiError::NotHardwareReduced(flags));
    }
    let gas = Gas::read(fadt.get(FADT_SLEEP_CONTROL_REG..).unwrap_or_default())
        .ok_or(too_short("SLEEP_CONTROL_REG", FADT_READ_LEN))?;
    let sleep_control = SleepRegister::from_gas(&gas)?;
    // Both DSDT fields lie before SLEEP_CONTROL_REG, so they are there.
    let dsdt = fadt_dsdt(fadt)?;
    Ok(FadtSleep {
        sleep_control,
        dsdt,
    })
}

/// The DSDT's address from the FADT's first bytes: X_DSDT, or DSDT when X_DSDT is 0 or the
/// FADT is too short for it (ACPI 1.0).
pub fn fadt_dsdt(fadt: &[u8]) -> Result<u64, AcpiError> {
    let x_dsdt = fadt
        .get(FADT_X_DSDT..FADT_X_DSDT + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    let dsdt = match x_dsdt {
        0 => fadt
            .get(FADT_DSDT..FADT_DSDT + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, |b| u64::from(u32::from_le_bytes(b))),
        x => x,
    };
    if dsdt == 0 {
        return Err(AcpiError::NoDsdt);
    }
    Ok(dsdt)
}

/// Reads and checks the table at `addr`, which the FADT says is the DSDT.
fn read_dsdt(mem: &impl Mem, addr: u64) -> Result<SdtHeader, AcpiError> {
    let dsdt = read_table(mem, addr)?;
    if &dsdt.signature != b"DSDT" {
        return Err(AcpiError::WrongSignature {
            addr: dsdt.addr,
            expected: *b"DSDT",
            found: dsdt.signature,
        });
    }
    Ok(dsdt)
}

/// Finds the DSDT: RSDP (at `rsdp_hint`, else by scanning) → XSDT/RSDT → FADT → X_DSDT/DSDT,
/// every table checksummed on the way. Nothing about sleep states is required here.
pub fn find_dsdt(mem: &impl Mem, rsdp_hint: u64) -> Result<SdtHeader, AcpiError> {
    let rsdp = find_rsdp(mem, rsdp_hint)?;
    let root = root_table(mem, &rsdp)?;
    let fadt = tables(mem, &root)?.fadt.ok_or(AcpiError::NoFadt)?;
    let mut bytes = [0u8; FADT_X_DSDT + 8];
    let n = (fadt.length as usize).min(bytes.len());
    mem.read(fadt.addr, &mut bytes[..n])?;
    read_dsdt(mem, fadt_dsdt(&bytes[..n])?)
}

/// Finds the first table with `signature` that the root table lists: RSDP (at `rsdp_hint`,
/// else by scanning) → XSDT/RSDT → each table in turn, checksummed. `None` when none is listed.
pub fn find_table(
    mem: &impl Mem,
    rsdp_hint: u64,
    signature: Signature,
) -> Result<Option<SdtHeader>, AcpiError> {
    let rsdp = find_rsdp(mem, rsdp_hint)?;
    let root = root_table(mem, &rsdp)?;
    for i in 0..root.entries() {
        let header = read_table(mem, root.entry(mem, i)?)?;
        if header.signature == signature {
            return Ok(Some(header));
        }
    }
    Ok(None)
}

/// The AML of the DSDT (or any definition block) `table`: where it starts and how long it is.
pub fn aml_of(table: &SdtHeader) -> (u64, usize) {
    (
        table.addr + u64::from(SDT_HEADER_LEN),
        (table.length - SDT_HEADER_LEN) as usize,
    )
}

/// The sleep control register value that enters sleep type `slp_typ`: SLP_TYP in bits 2..4
/// (its low 3 bits), and SLP_EN.
pub fn sleep_control_value(slp_typ: u16) -> u8 {
    ((slp_typ << SLP_TYP_SHIFT) as u8 & SLP_TYP_MASK) | SLP_EN
}

/// How to enter ACPI S5 (soft off), from the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S5 {
    /// SLEEP_CONTROL_REG.
    pub sleep_control: SleepRegister,
    /// SLP_TYPa from `\_S5_`.
    pub slp_typ: u16,
}

impl S5 {
    /// The byte to write to the sleep control register.
    pub fn sleep_control_value(&self) -> u8 {
        sleep_control_value(self.slp_typ)
    }
}

/// Finds how to enter S5 the way an OS does on a hardware-reduced ACPI platform: RSDP (at
/// `rsdp_hint`, else by scanning) → XSDT/RSDT → FADT (HW_REDUCED_ACPI, SLEEP_CONTROL_REG,
/// X_DSDT/DSDT) → the DSDT's `\_S5_` package. Every table is checksummed on the way.
pub fn find_s5(mem: &impl Mem, rsdp_hint: u64) -> Result<S5, AcpiError> {
    let rsdp = find_rsdp(mem, rsdp_hint)?;
    let root = root_table(mem, &rsdp)?;
    let fadt = tables(mem, &root)?.fadt.ok_or(AcpiError::NoFadt)?;
    let mut bytes = [0u8; FADT_READ_LEN];
    let n = (fadt.length as usize).min(FADT_READ_LEN);
    mem.read(fadt.addr, &mut bytes[..n])?;
    let sleep = parse_fadt(&bytes[..n])?;
    let dsdt = read_dsdt(mem, sleep.dsdt)?;
    let (aml_start, aml_len) = aml_of(&dsdt);
    let slp_typ = aml::find_s5_in(aml_len, |at, buf: &mut [u8]| {
        mem.read(aml_start + at as u64, buf)
            .map_err(AcpiError::from)
    })?;
    Ok(S5 {
        sleep_control: sleep.sleep_control,
        slp_typ,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phys::TestMem;
    use std::vec::Vec;

    fn fix_checksum(bytes: &mut [u8], at: usize, len: usize) {
        bytes[at] = 0;
        let sum = bytes[..len].iter().fold(0u8, |s, &b| s.wrapping_add(b));
        bytes[at] = sum.wrapping_neg();
    }

    fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(sig);
        t.extend_from_slice(&(36 + body.len() as u32).to_le_bytes());
        t.push(1); // revision
        t.push(0); // checksum
        t.extend_from_slice(b"CGVM  CGVMTEST\x01\0\0\0CGVM\x01\0\0\0");
        t.extend_from_slice(body);
        let len = t.len();
        fix_checksum(&mut t, 9, len);
        t
    }

    fn rsdp(xsdt: u64) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(b"RSD PTR ");
        r.push(0);
        r.extend_from_slice(b"CGVM  ");
        r.push(2);
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(&36u32.to_le_bytes());
        r.extend_from_slice(&xsdt.to_le_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        fix_checksum(&mut r, 8, 20);
        fix_checksum(&mut r, 32, 36);
        r
    }

    fn madt_body(cpus: &[(u8, u32)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        for &(id, flags) in cpus {
            b.extend_from_slice(&[0, 8, id, id]);
            b.extend_from_slice(&flags.to_le_bytes());
        }
        b.extend_from_slice(&[1, 12, 0, 0]);
        b.extend_from_slice(&0xfec0_0000u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b
    }

    /// RSDP at 0xe0000, XSDT at 0xe0040 listing FACP and APIC.
    fn platform(madt: &[u8]) -> TestMem {
        let mut mem = TestMem::new(0xe0000, 0x20000);
        mem.write(0xe0000, &rsdp(0xe0040));
        let mut xsdt_body = Vec::new();
        xsdt_body.extend_from_slice(&0xe0100u64.to_le_bytes());
        xsdt_body.extend_from_slice(&0xe0200u64.to_le_bytes());
        mem.write(0xe0040, &table(b"XSDT", &xsdt_body));
        mem.write(0xe0100, &table(b"FACP", &[0; 20]));
        mem.write(0xe0200, madt);
        mem
    }

    fn parse(mem: &TestMem, hint: u64) -> Result<(Tables, Madt), AcpiError> {
        let rsdp = find_rsdp(mem, hint)?;
        let root = root_table(mem, &rsdp)?;
        let tables = tables(mem, &root)?;
        let madt = parse_madt(mem, &tables.madt.ok_or(AcpiError::NoMadt)?)?;
        Ok((tables, madt))
    }

    #[test]
    fn parses_cgvm_style_tables() {
        let mem = platform(&table(b"APIC", &madt_body(&[(0, 1), (1, 1), (2, 0)])));
        for hint in [0, 0xe0000] {
            let (tables, madt) = parse(&mem, hint).expect("valid tables");
            assert_eq!(tables.signatures(), &[*b"FACP", *b"APIC"]);
            assert_eq!(madt.apic_ids(), &[0, 1]);
            assert_eq!(madt.disabled_cpus, 1);
            assert_eq!(madt.ioapics, 1);
            assert_eq!(madt.lapic_addr, 0xfee0_0000);
        }
        assert_eq!(find_rsdp(&mem, 0).map(|r| r.source), Ok(RsdpSource::Scan));
    }

    #[test]
    fn rejects_bad_checksums_and_pointers() {
        let mut mem = platform(&table(b"APIC", &madt_body(&[(0, 1)])));
        mem.bytes[0x200 + 40] ^= 1;
        assert_eq!(
            parse(&mem, 0),
            Err(AcpiError::TableChecksum(*b"APIC", 0xe0200))
        );
        mem.bytes[1] = b'X';
        assert_eq!(parse(&mem, 0), Err(AcpiError::NoRsdp));
        assert_eq!(parse(&mem, 0xe0000), Err(AcpiError::RsdpSignature(0xe0000)));
        assert!(matches!(parse(&mem, 0x10_0000), Err(AcpiError::Mem(_))));
    }

    #[test]
    fn rejects_duplicate_ids_and_bad_entries() {
        let mem = platform(&table(b"APIC", &madt_body(&[(3, 1), (3, 1)])));
        assert_eq!(parse(&mem, 0), Err(AcpiError::DuplicateApicId(3)));

        let mut body = madt_body(&[(0, 1)]);
        body[9] = 200; // first entry's length runs past the table
        let mem = platform(&table(b"APIC", &body));
        assert!(matches!(parse(&mem, 0), Err(AcpiError::MadtEntry { .. })));

        let mut body = madt_body(&[(0, 1)]);
        body.extend_from_slice(&[9, 16, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        let mem = platform(&table(b"APIC", &body));
        let (_, madt) = parse(&mem, 0).expect("x2APIC entry");
        assert_eq!(madt.apic_ids(), &[0, 7]);
        assert_eq!(madt.x2apic_cpus, 1);
    }

    /// A GAS: space, width, bit offset, access size, address.
    fn gas(space: u8, width: u8, offset: u8, access: u8, address: u64) -> [u8; 12] {
        let mut g = [space, width, offset, access, 0, 0, 0, 0, 0, 0, 0, 0];
        g[4..].copy_from_slice(&address.to_le_bytes());
        g
    }

    /// The body (after the header) of a revision 6 FADT (276 bytes) with these fields.
    fn fadt_body(flags: u32, sleep_control: [u8; 12], x_dsdt: u64, dsdt: u32) -> Vec<u8> {
        let mut b = std::vec![0u8; 276 - 36];
        let at = |offset: usize| offset - 36;
        b[at(40)..at(44)].copy_from_slice(&dsdt.to_le_bytes());
        b[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
        b[at(140)..at(148)].copy_from_slice(&x_dsdt.to_le_bytes());
        b[at(244)..at(256)].copy_from_slice(&sleep_control);
        b
    }

    /// `Name (\_S5_, Package () { 5, 0, 0, 0 })` after a `Name (_S4_, ...)`, as cgvm emits it.
    const S5_AML: &[u8] = b"\x08_S4_\x01\x08\\_S5_\x12\x07\x04\x0a\x05\x00\x00\x00";
    /// The FADT's address in [`s5_platform`].
    const FADT_ADDR: u64 = 0xe0100;
    /// The DSDT's address in [`s5_platform`].
    const DSDT_ADDR: u64 = 0xe0400;
    /// cgvm's flags: HW_REDUCED_ACPI, RESET_REG_SUP, PWR_BUTTON, SLP_BUTTON.
    const HW_REDUCED_FLAGS: u32 = (1 << 20) | (1 << 10) | (1 << 4) | (1 << 5);

    /// The MADT's address in [`s5_platform`].
    const MADT_ADDR: u64 = 0xe0300;

    /// RSDP at 0xe0000, XSDT at 0xe0040 listing `fadt` at 0xe0100 and a MADT at 0xe0300;
    /// `dsdt` at 0xe0400.
    fn s5_platform(fadt: &[u8], dsdt: &[u8]) -> TestMem {
        let mut mem = TestMem::new(0xe0000, 0x20000);
        mem.write(0xe0000, &rsdp(0xe0040));
        let mut xsdt_body = Vec::new();
        xsdt_body.extend_from_slice(&FADT_ADDR.to_le_bytes());
        xsdt_body.extend_from_slice(&MADT_ADDR.to_le_bytes());
        mem.write(0xe0040, &table(b"XSDT", &xsdt_body));
        mem.write(FADT_ADDR, fadt);
        mem.write(MADT_ADDR, &table(b"APIC", &madt_body(&[(0, 1)])));
        mem.write(DSDT_ADDR, dsdt);
        mem
    }

    fn cgvm_fadt() -> Vec<u8> {
        let reg = gas(GAS_SYSTEM_IO, 8, 0, 1, 0x3c0);
        table(b"FACP", &fadt_body(HW_REDUCED_FLAGS, reg, DSDT_ADDR, 0))
    }

    #[test]
    fn finds_s5_through_fadt_and_dsdt() {
        let mem = s5_platform(&cgvm_fadt(), &table(b"DSDT", S5_AML));
        let s5 = find_s5(&mem, 0xe0000).expect("S5");
        assert_eq!(
            s5,
            S5 {
                sleep_control: SleepRegister::Io(0x3c0),
                slp_typ: 5,
            }
        );
        assert_eq!(s5.sleep_control_value(), 0x34);

        // X_DSDT 0: the 32-bit DSDT; a SystemMemory register in the MMIO hole.
        let reg = gas(GAS_SYSTEM_MEMORY, 8, 0, 0, 0xfed0_0004);
        let fadt = table(
            b"FACP",
            &fadt_body(HW_REDUCED_FLAGS, reg, 0, DSDT_ADDR as u32),
        );
        let mem = s5_platform(&fadt, &table(b"DSDT", S5_AML));
        let s5 = find_s5(&mem, 0).expect("S5 via the 32-bit DSDT");
        assert_eq!(s5.sleep_control, SleepRegister::Memory(0xfed0_0004));
        assert_eq!(s5.slp_typ, 5);
    }

    #[test]
    fn s5_needs_a_hardware_reduced_fadt_with_a_sleep_register() {
        let dsdt = table(b"DSDT", S5_AML);
        let io = gas(GAS_SYSTEM_IO, 8, 0, 1, 0x3c0);
        let find = |fadt: &[u8], dsdt: &[u8]| find_s5(&s5_platform(fadt, dsdt), 0);

        let fadt = table(b"FACP", &fadt_body(1 << 10, io, DSDT_ADDR, 0));
        assert_eq!(
            find(&fadt, &dsdt),
            Err(AcpiError::NotHardwareReduced(1 << 10))
        );

        let mut body = fadt_body(HW_REDUCED_FLAGS, io, DSDT_ADDR, 0);
        body.truncate(244 - 36); // an ACPI 3.0-sized FADT
        assert_eq!(
            find(&table(b"FACP", &body), &dsdt),
            Err(AcpiError::FadtTooShort {
                len: 244,
                field: "SLEEP_CONTROL_REG",
                need: 256
            })
        );
        // The 56-byte FADT of `platform`: too short even for the flags.
        assert!(matches!(
            find(&table(b"FACP", &[0; 20]), &dsdt),
            Err(AcpiError::FadtTooShort { len: 56, .. })
        ));

        let none = gas(GAS_SYSTEM_IO, 8, 0, 1, 0);
        let fadt = table(b"FACP", &fadt_body(HW_REDUCED_FLAGS, none, DSDT_ADDR, 0));
        assert_eq!(find(&fadt, &dsdt), Err(AcpiError::NoSleepControl));

        let fadt = table(b"FACP", &fadt_body(HW_REDUCED_FLAGS, io, 0, 0));
        assert_eq!(find(&fadt, &dsdt), Err(AcpiError::NoDsdt));

        // No FADT in the root table: the XSDT's first entry points at the MADT instead.
        let mut mem = s5_platform(&cgvm_fadt(), &dsdt);
        mem.write(0xe0040, &table(b"XSDT", &MADT_ADDR.to_le_bytes()));
        assert_eq!(find_s5(&mem, 0), Err(AcpiError::NoFadt));
    }

    #[test]
    fn s5_needs_a_dsdt_with_s5() {
        let find = |dsdt: &[u8]| find_s5(&s5_platform(&cgvm_fadt(), dsdt), 0);
        assert_eq!(
            find(&table(b"DSDT", b"\x08_S4_\x01")),
            Err(AcpiError::Aml(AmlError::NoS5))
        );
        assert_eq!(
            find(&table(b"DSDT", &S5_AML[..S5_AML.len() - 2])),
            Err(AcpiError::Aml(AmlError::Truncated { offset: 6 }))
        );
        assert_eq!(
            find(&table(b"SSDT", S5_AML)),
            Err(AcpiError::WrongSignature {
                addr: DSDT_ADDR,
                expected: *b"DSDT",
                found: *b"SSDT"
            })
        );
        let mut dsdt = table(b"DSDT", S5_AML);
        dsdt[40] ^= 1;
        assert_eq!(
            find(&dsdt),
            Err(AcpiError::TableChecksum(*b"DSDT", DSDT_ADDR))
        );
    }

    #[test]
    fn reads_and_checks_the_sleep_control_gas() {
        let raw = gas(GAS_SYSTEM_IO, 8, 0, 1, 0x3c0);
        let g = Gas::read(&raw).expect("12 bytes");
        assert_eq!(
            g,
            Gas {
                space_id: 1,
                bit_width: 8,
                bit_offset: 0,
                access_size: 1,
                address: 0x3c0
            }
        );
        assert_eq!(Gas::read(&raw[..11]), None);
        assert_eq!(SleepRegister::from_gas(&g), Ok(SleepRegister::Io(0x3c0)));

        let check = |raw: [u8; 12]| SleepRegister::from_gas(&Gas::read(&raw).expect("GAS"));
        let bad = |raw: [u8; 12], why| {
            assert_eq!(
                check(raw),
                Err(AcpiError::BadSleepControl(
                    Gas::read(&raw).expect("GAS"),
                    why
                ))
            );
        };
        bad(gas(1, 8, 0, 1, 0x1_0000), "I/O port above 0xffff");
        bad(gas(1, 16, 0, 2, 0x3c0), "not an 8-bit register at bit 0");
        bad(gas(1, 8, 1, 1, 0x3c0), "not an 8-bit register at bit 0");
        bad(gas(1, 8, 0, 3, 0x3c0), "access size is not byte");
        bad(
            gas(0, 8, 0, 1, 0x10_0000),
            "memory outside 0xc0000000..4 GiB, where the probe maps devices",
        );
        bad(
            gas(0, 8, 0, 1, 1 << 32),
            "memory outside 0xc0000000..4 GiB, where the probe maps devices",
        );
        bad(
            gas(2, 8, 0, 1, 0xcf8),
            "address space is neither SystemIO nor SystemMemory",
        );
        assert_eq!(
            check(gas(0, 8, 0, 0, 0xffff_ffff)),
            Ok(SleepRegister::Memory(0xffff_ffff))
        );
        assert_eq!(check(gas(0, 8, 0, 1, 0)), Err(AcpiError::NoSleepControl));
    }

    #[test]
    fn sleep_control_value_keeps_the_low_slp_typ_bits() {
        assert_eq!(sleep_control_value(5), 0x34);
        assert_eq!(sleep_control_value(0), 0x20);
        assert_eq!(sleep_control_value(7), 0x3c);
        assert_eq!(sleep_control_value(0x105), 0x34);
        assert_eq!(sleep_control_value(u16::MAX), 0x3c);
    }

    #[test]
    fn fadt_dsdt_prefers_x_dsdt() {
        let mut fadt = std::vec![0u8; FADT_X_DSDT + 8];
        assert_eq!(fadt_dsdt(&fadt), Err(AcpiError::NoDsdt));
        fadt[FADT_DSDT..FADT_DSDT + 4].copy_from_slice(&0xe0100u32.to_le_bytes());
        assert_eq!(fadt_dsdt(&fadt), Ok(0xe0100));
        // An ACPI 1.0 FADT, too short for X_DSDT.
        assert_eq!(fadt_dsdt(&fadt[..FADT_X_DSDT]), Ok(0xe0100));
        fadt[FADT_X_DSDT..].copy_from_slice(&0x1_0000_0000u64.to_le_bytes());
        assert_eq!(fadt_dsdt(&fadt), Ok(0x1_0000_0000));
        assert_eq!(fadt_dsdt(&[]), Err(AcpiError::NoDsdt));
    }
}
