//! The ACPI tables: how the guest learns about its vCPUs, interrupt controllers, legacy devices,
//! virtio-mmio devices, the PCI Express host bridge (on machines with PCI) and how to power off
//! or reset the machine.
//!
//! The platform is "hardware-reduced" ACPI (FADT flag `HW_REDUCED_ACPI`): there is no PM1 block,
//! no SCI and no GPEs; poweroff goes through the FADT's sleep control register and reset through
//! its reset register, both I/O ports emulated by the `devices` crate.
//!
//! [`create_acpi_tables`] writes, from [`layout::RSDP_START`] up to (at most)
//! [`layout::ACPI_END`], each table 16-byte aligned:
//!
//! | table | contents |
//! |---|---|
//! | RSDP | revision 2, points at the XSDT (always at [`layout::RSDP_START`]) |
//! | DSDT | `\_SB_`: COM1, RTC, i8042, pvpanic, motherboard resources, virtio-mmio, PCI0; `\_S5_` |
//! | FACP (FADT) | hardware-reduced, sleep control/status and reset registers, X_DSDT |
//! | APIC (MADT) | one local APIC per vCPU, the IOAPIC, the LINT1 NMI |
//! | MCFG | with PCI only: the ECAM region of segment 0, bus 0 |
//! | XSDT | FADT, MADT, MCFG (with PCI) |
//!
//! `PCI0`, the PCI Express host bridge, and the MCFG exist only on a machine with PCI; without
//! it ([`AcpiConfig::pci`] is `None`) the tables are those of a virtio-mmio-only machine, byte
//! for byte.
//!
//! Everything is built in host memory first and checked against the space there is; guest memory
//! is written only once it all fits, so a configuration or size error leaves it untouched.

mod dsdt;
mod fadt;
mod madt;
mod mcfg;
#[cfg(test)]
mod tests;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout;

/// The OEM ID in the RSDP and in every table header.
pub const OEM_ID: [u8; 6] = *b"CGVM  ";
/// The OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// Alignment of every table in guest memory (the RSDP needs 16 for the BIOS-area scan).
const TABLE_ALIGN: u64 = 16;

/// Most vCPUs the MADT can describe with (x)APIC entries: APIC IDs 0..=254, 0xff is broadcast.
pub const MAX_CPUS: u8 = 255;
/// Most virtio-mmio devices the DSDT can name (`VR00`..`VRFF`).
pub const MAX_VIRTIO_MMIO_DEVICES: usize = 256;
/// Pins of the in-kernel IOAPIC (KVM's has 24), i.e. the GSIs a device interrupt can use.
pub const IOAPIC_PINS: u32 = 24;

/// First of the IOAPIC pins that PCI INTx interrupts are routed to (see [`pci_intx_gsi`]).
pub const PCI_INTX_GSI_START: u32 = 16;
/// Number of IOAPIC pins PCI INTx interrupts share: GSIs 16..=23.
pub const PCI_INTX_GSI_COUNT: u32 = 8;
/// Number of device slots on a PCI bus (slot 0 is the host bridge's own).
pub const PCI_SLOTS: u8 = 32;
/// First port of the I/O window the host bridge gives to I/O BARs: above every legacy port
/// of [`layout`] (the highest, the configuration ports, end at 0xcff) and those of KVM's
/// in-kernel PIC and PIT.
pub const PCI_IO_WINDOW_START: u16 = 0x1000;
/// Last port of the I/O window for I/O BARs (inclusive).
pub const PCI_IO_WINDOW_END: u16 = 0xffff;

/// The IOAPIC GSI that interrupt pin `pin` (0 = INTA# … 3 = INTD#) of the device in `slot`
/// (0..32) on bus 0 raises: `16 + (slot + pin) % 8`, the usual swizzle, so that the INTA# of
/// consecutive slots lands on different pins. The DSDT's `_PRT` says the same to the guest,
/// and makes these GSIs level-triggered and active-low; the guest programs the IOAPIC so, and
/// KVM's in-kernel IOAPIC ignores the polarity bit: the VMM asserts INTx with level 1 (or a
/// resampling irqfd) like any other line.
///
/// `slot` and `pin` beyond their ranges wrap like the formula; the caller passes real ones.
pub const fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_START + (slot as u32 + pin as u32) % PCI_INTX_GSI_COUNT
}

const _: () = assert!(PCI_INTX_GSI_START + PCI_INTX_GSI_COUNT <= IOAPIC_PINS);
const _: () = assert!(
    layout::PCI_CONFIG_PORT as u64 + layout::PCI_CONFIG_PORT_SIZE <= PCI_IO_WINDOW_START as u64
);

/// What the ACPI tables describe beyond the fixed platform of docs/DESIGN.md.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs: 1 to [`MAX_CPUS`]. vCPU `i` gets APIC ID `i` and ACPI processor UID `i`.
    pub num_cpus: u8,
    /// The virtio-mmio devices, in the order the guest should number them (`VR00`, `VR01`, …).
    pub virtio_mmio_devices: Vec<VirtioMmioDevice>,
    /// The PCI Express host bridge, on a machine with PCI devices: the MCFG table and the
    /// DSDT's `\_SB.PCI0` describe it. `None`: no PCI, and neither exists.
    pub pci: Option<PciConfig>,
}

/// What the ACPI tables say about the PCI Express host bridge beyond the fixed platform of
/// [`layout`]: one segment (0) with one bus (0), configured through ECAM at
/// [`layout::PCI_ECAM_START`] or the ports at [`layout::PCI_CONFIG_PORT`], BARs in the 32-bit
/// window at [`layout::PCI_MMIO32_START`], the 64-bit window below, and the I/O window
/// [`PCI_IO_WINDOW_START`]..=[`PCI_IO_WINDOW_END`]; INTx routed as [`pci_intx_gsi`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciConfig {
    /// Start of the 64-bit BAR window, [`layout::PCI_MMIO64_SIZE`] bytes long: what
    /// [`layout::pci_mmio64_start`] gives for the machine's RAM size. At or above 4 GiB, and
    /// the window must end at or below 2^64.
    pub mmio64_start: u64,
}

/// One virtio-mmio transport, as the DSDT describes it to the guest (`LNRO0005`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest physical address of its register window; the window must lie below 4 GiB.
    pub base: u64,
    /// Size of the register window in bytes (non-zero; virtio-mmio uses 0x200 or more).
    pub size: u64,
    /// Its interrupt: a GSI below [`IOAPIC_PINS`], edge-triggered, active high; on a machine
    /// with PCI, not one of the INTx GSIs ([`PCI_INTX_GSI_START`], 8 of them).
    pub irq: u32,
}

/// Why the ACPI tables could not be created.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is 0 (the MADT needs at least one processor).
    #[error("cannot describe {0} vCPUs: the MADT takes 1 to {MAX_CPUS}")]
    InvalidCpuCount(u8),
    /// More virtio-mmio devices than the DSDT can name.
    #[error("{0} virtio-mmio devices: the DSDT names at most {MAX_VIRTIO_MMIO_DEVICES}")]
    TooManyVirtioMmioDevices(usize),
    /// The 64-bit PCI BAR window does not lie between 4 GiB and the top of the address space.
    #[error(
        "the 64-bit PCI window at {0:#x} (size {size:#x}) does not lie between 4 GiB and 2^64",
        size = layout::PCI_MMIO64_SIZE
    )]
    InvalidPciMmio64Window(u64),
    /// A virtio-mmio device's window or interrupt cannot be described.
    #[error("virtio-mmio device {index} ({base:#x}, size {size:#x}, IRQ {irq}): {reason}")]
    InvalidVirtioMmioDevice {
        /// Its position in [`AcpiConfig::virtio_mmio_devices`].
        index: usize,
        /// Its base address.
        base: u64,
        /// Its window size.
        size: u64,
        /// Its interrupt.
        irq: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The tables do not fit between [`layout::RSDP_START`] and [`layout::ACPI_END`].
    #[error("the ACPI tables do not fit below {limit:#x}: the {table} would end at {end:#x}")]
    TablesTooLarge {
        /// The signature of the first table that did not fit.
        table: &'static str,
        /// Where it would have ended (exclusive).
        end: u64,
        /// The end of the ACPI area (exclusive).
        limit: u64,
    },
    /// Guest memory does not cover the ACPI area.
    #[error("cannot write the {table} table at {addr:#x} to guest memory: {source}")]
    GuestMemory {
        /// The signature of the table.
        table: &'static str,
        /// Where it was to be written.
        addr: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Builds the ACPI tables for `cfg` and writes them into `mem`, the RSDP at
/// [`layout::RSDP_START`] and the other tables after it, below [`layout::ACPI_END`].
///
/// Returns the RSDP's address, for the zero page's `acpi_rsdp_addr` (or PVH's `rsdp_paddr`).
/// The caller reserves [`layout::RSDP_START`]..[`layout::ACPI_END`] in the e820 map. After
/// a configuration or size error nothing has been written.
pub fn create_acpi_tables<M: GuestMemory + ?Sized>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(cfg, layout::RSDP_START, layout::ACPI_END)?;
    for t in &tables.tables {
        mem.write_slice(&t.bytes, t.addr)
            .map_err(|source| AcpiError::GuestMemory {
                table: t.signature,
                addr: t.addr.0,
                source,
            })?;
        log::debug!(
            "acpi: {} at {:#x}, {} bytes",
            t.signature,
            t.addr.0,
            t.bytes.len()
        );
    }
    Ok(tables.rsdp)
}

/// One table, ready to be copied to guest memory.
#[derive(Debug)]
struct PlacedTable {
    signature: &'static str,
    addr: GuestAddress,
    bytes: Vec<u8>,
}

/// All the tables, placed.
#[derive(Debug)]
struct Tables {
    rsdp: GuestAddress,
    tables: Vec<PlacedTable>,
}

/// Hands out aligned, non-overlapping addresses in `[next, limit)`.
struct Area {
    next: u64,
    limit: u64,
}

impl Area {
    /// Reserves `len` bytes for `table`, [`TABLE_ALIGN`]-aligned.
    fn place(&mut self, table: &'static str, len: usize) -> Result<GuestAddress, AcpiError> {
        let too_large = |end| AcpiError::TablesTooLarge {
            table,
            end,
            limit: self.limit,
        };
        let start = self
            .next
            .checked_next_multiple_of(TABLE_ALIGN)
            .ok_or(too_large(u64::MAX))?;
        let end = start.checked_add(len as u64).ok_or(too_large(u64::MAX))?;
        if end > self.limit {
            return Err(too_large(end));
        }
        self.next = end;
        Ok(GuestAddress(start))
    }
}

/// Serializes an `acpi_tables` object.
fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// Checks `cfg`, builds every table and places them in `[start, limit)`, the RSDP at `start`.
fn build_tables(cfg: &AcpiConfig, start: u64, limit: u64) -> Result<Tables, AcpiError> {
    validate(cfg)?;
    let mut area = Area { next: start, limit };
    let mut tables = Vec::new();
    let mut add = |area: &mut Area, signature, bytes: Vec<u8>| {
        let addr = area.place(signature, bytes.len())?;
        tables.push(PlacedTable {
            signature,
            addr,
            bytes,
        });
        Ok::<_, AcpiError>(addr)
    };

    // The RSDP is written last (it needs the XSDT's address) but lives first, at `start`.
    let rsdp_addr = area.place("RSDP", Rsdp::len())?;

    let dsdt = add(&mut area, "DSDT", dsdt::build(cfg))?;
    let fadt = add(&mut area, "FACP", fadt::build(dsdt))?;
    let madt = add(&mut area, "APIC", madt::build(cfg.num_cpus))?;

    // Every table the XSDT lists.
    let mut listed = vec![fadt, madt];
    if cfg.pci.is_some() {
        listed.push(add(&mut area, "MCFG", mcfg::build())?);
    }
    let mut xsdt = XSDT::new(OEM_ID, *b"CGVMXSDT", OEM_REVISION);
    for addr in listed {
        xsdt.add_entry(addr.0);
    }
    let xsdt = add(&mut area, "XSDT", to_bytes(&xsdt))?;

    tables.push(PlacedTable {
        signature: "RSDP",
        addr: rsdp_addr,
        bytes: to_bytes(&Rsdp::new(OEM_ID, xsdt.0)),
    });
    Ok(Tables {
        rsdp: rsdp_addr,
        tables,
    })
}

/// Rejects what the tables cannot describe.
fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    // `num_cpus` is a u8, so the upper bound (255, APIC IDs 0..=254) holds by type.
    if cfg.num_cpus == 0 {
        return Err(AcpiError::InvalidCpuCount(cfg.num_cpus));
    }
    let n = cfg.virtio_mmio_devices.len();
    if n > MAX_VIRTIO_MMIO_DEVICES {
        return Err(AcpiError::TooManyVirtioMmioDevices(n));
    }
    for (index, d) in cfg.virtio_mmio_devices.iter().enumerate() {
        let invalid = |reason| AcpiError::InvalidVirtioMmioDevice {
            index,
            base: d.base,
            size: d.size,
            irq: d.irq,
            reason,
        };
        if d.size == 0 {
            return Err(invalid("its window is empty"));
        }
        // Memory32Fixed: base and length are 32-bit and the window ends at or below 4 GiB.
        match d.base.checked_add(d.size) {
            Some(end) if end <= 1 << 32 => {}
            _ => return Err(invalid("its window does not lie below 4 GiB")),
        }
        if d.irq >= IOAPIC_PINS {
            return Err(invalid("its IRQ is not an IOAPIC pin (0..24)"));
        }
        // The _PRT makes these level-triggered and active-low; the device's edge-triggered,
        // active-high interrupt cannot share one.
        let intx = PCI_INTX_GSI_START..PCI_INTX_GSI_START + PCI_INTX_GSI_COUNT;
        if cfg.pci.is_some() && intx.contains(&d.irq) {
            return Err(invalid("its IRQ is a PCI INTx GSI (16..24)"));
        }
    }
    if let Some(pci) = &cfg.pci {
        // QWordMemory: Range Maximum (start + size - 1) must be representable.
        let fits = pci
            .mmio64_start
            .checked_add(layout::PCI_MMIO64_SIZE - 1)
            .is_some();
        if pci.mmio64_start < layout::MMIO32_END || !fits {
            return Err(AcpiError::InvalidPciMmio64Window(pci.mmio64_start));
        }
    }
    Ok(())
}
