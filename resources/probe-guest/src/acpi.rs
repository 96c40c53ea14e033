//! ACPI table parsing: the RSDP, the root table (XSDT, or RSDT for ACPI 1.0), table headers
//! and checksums, and the MADT's CPUs and IOAPICs.
//!
//! All reads go through [`Mem`] and every length is checked against the table that holds it, so
//! a malformed table is an [`AcpiError`], never a fault. Policy (what the boot check requires)
//! lives in `checks::boot`, not here.

use core::fmt;

use crate::phys::{Mem, MemError};
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
}
