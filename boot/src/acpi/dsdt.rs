//! The DSDT: the devices the guest cannot discover by itself, and the S5 (soft-off) sleep type.
//!
//! In ASL, what [`build`] produces is:
//!
//! ```text
//! DefinitionBlock ("", "DSDT", 2, "CGVM  ", "CGVMDSDT", 1)
//! {
//!     Scope (\_SB) {
//!         Device (COM1) {                         // 8250 UART
//!             Name (_HID, EisaId ("PNP0501"))
//!             Name (_UID, 0)
//!             Name (_CRS, ResourceTemplate () {
//!                 IO (Decode16, 0x3F8, 0x3F8, 1, 8)
//!                 Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 4 }
//!             })
//!         }
//!         Device (RTC_) {                         // CMOS RTC, no interrupt
//!             Name (_HID, EisaId ("PNP0B00"))
//!             Name (_CRS, ResourceTemplate () { IO (Decode16, 0x70, 0x70, 1, 2) })
//!         }
//!         Device (KBD_) {                         // i8042 with a PS/2 keyboard
//!             Name (_HID, EisaId ("PNP0303"))
//!             Name (_CRS, ResourceTemplate () {
//!                 IO (Decode16, 0x60, 0x60, 1, 1)
//!                 IO (Decode16, 0x64, 0x64, 1, 1)
//!                 Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 1 }
//!             })
//!         }
//!         Device (PEVT) {                         // pvpanic
//!             Name (_HID, "QEMU0001")
//!             Name (_UID, 0)
//!             Name (_STA, 0x0F)
//!             Name (_CRS, ResourceTemplate () { IO (Decode16, 0x505, 0x505, 1, 1) })
//!         }
//!         Device (MRES) {                         // motherboard resources
//!             Name (_HID, EisaId ("PNP0C02"))
//!             Name (_UID, 0)
//!             Name (_CRS, ResourceTemplate () {
//!                 IO (Decode16, 0xF4, 0xF4, 1, 1)     // exit device
//!                 IO (Decode16, 0x3C0, 0x3C0, 1, 3)   // ACPI sleep control/status, reset
//!                 Memory32Fixed (ReadWrite, 0xC0000000, 0x1000)  // boot timer
//!                 Memory32Fixed (ReadWrite, 0xE0000000, 0x100000)  // ECAM, with PCI only
//!             })
//!         }
//!         Device (VR00) {                         // one per virtio-mmio device: VR00, VR01, …
//!             Name (_HID, "LNRO0005")
//!             Name (_UID, 0)
//!             Name (_CCA, One)
//!             Name (_CRS, ResourceTemplate () {
//!                 Memory32Fixed (ReadWrite, base, size)
//!                 Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { irq }
//!             })
//!         }
//!         Device (PCI0) {                         // with PCI only: the PCIe host bridge
//!             Name (_HID, EisaId ("PNP0A08"))     // PCI Express root bridge…
//!             Name (_CID, EisaId ("PNP0A03"))     // …compatible with a PCI root bridge
//!             Name (_SEG, 0)
//!             Name (_UID, 0)
//!             Name (_BBN, 0)
//!             Name (_CRS, ResourceTemplate () {
//!                 WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
//!                     0, 0, 0, 0, 1)                              // bus 0 only
//!                 IO (Decode16, 0xCF8, 0xCF8, 1, 8)               // configuration mechanism #1
//!                 WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
//!                     0, 0x1000, 0xFFFF, 0, 0xF000)               // I/O BARs
//!                 DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
//!                     ReadWrite, 0, 0xD0000000, 0xDFFFFFFF, 0, 0x10000000)  // 32-bit BARs
//!                 QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
//!                     ReadWrite, 0, mmio64_start, mmio64_start + 64 GiB - 1, 0, 64 GiB)
//!             })
//!             Name (_PRT, Package () {            // slots 1..=31, pins INTA#..INTD#
//!                 Package () { 0x0001FFFF, 0, 0, 17 },  // slot 1 INTA#: GSI 16 + (1 + 0) % 8
//!                 …
//!                 Package () { 0x001FFFFF, 3, 0, 18 },  // slot 31 INTD#: GSI 16 + (31 + 3) % 8
//!             })
//!         }
//!     }
//!     Name (\_S5, Package () { 5, 0, 0, 0 })
//! }
//! ```
//!
//! Interrupts use the Extended Interrupt descriptor, whose number is a GSI; ISA IRQ n is GSI n
//! here (see the MADT's overrides). The keyboard controller has no aux (mouse) port, so there is
//! no `PNP0F13` device; Linux then skips probing for one.
//!
//! `PCI0` has no `_ADR`: a device has a `_HID` or an `_ADR`, not both (ACPI 6.5, section 6.1;
//! iasl warns about both), and Linux takes a root bridge's segment and bus from `_SEG` and
//! `_BBN`. It has no `_OSC` either: the platform keeps control of the PCIe features `_OSC`
//! negotiates (native hotplug, PME, AER, LTR, DPC), which a bus of endpoints without root ports
//! does not have anyway. Linux logs its request and then `acpi PNP0A08:00: _OSC: platform
//! retains control of PCIe features (AE_NOT_FOUND)` at boot, and leaves ASPM off (an `_OSC`
//! that granted nothing would read the same, with `AE_SUPPORT`). MSI and MSI-X do not depend on
//! `_OSC`: only the FADT's "MSI not supported" flag, clear here, would turn them off.
//!
//! The `_PRT` entries name GSIs directly (source 0), which ACPI defines as level-triggered,
//! active-low interrupts.

use acpi_tables::aml::{self, Path};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use super::mcfg::{PCI_FIRST_BUS, PCI_SEGMENT};
use super::{
    pci_intx_gsi, AcpiConfig, PciConfig, VirtioMmioDevice, OEM_ID, OEM_REVISION, PCI_IO_WINDOW_END,
    PCI_IO_WINDOW_START, PCI_SLOTS,
};
use crate::layout;

/// DSDT revision 2: integers are 64-bit.
const DSDT_REVISION: u8 = 2;
/// Length of the common table header.
const HEADER_LEN: u32 = 36;

/// The SLP_TYP value the guest writes to the sleep control register to power off; the VMM's
/// ACPI PM device treats SLP_EN with this SLP_TYP (the byte 0x34) as poweroff.
pub(super) const S5_SLP_TYP: u8 = 5;

/// AML that is already serialized.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// `Name (name, value)`.
fn name(name: &str, value: &dyn Aml) -> aml::Name {
    aml::Name::new(Path::new(name), value)
}

/// `Device (name) { children }`.
fn device(name: &str, children: &[&dyn Aml]) -> Raw {
    Raw(super::to_bytes(&aml::Device::new(
        Path::new(name),
        children.to_vec(),
    )))
}

/// `Name (_CRS, ResourceTemplate () { resources })`.
fn crs(resources: &[&dyn Aml]) -> aml::Name {
    name("_CRS", &aml::ResourceTemplate::new(resources.to_vec()))
}

/// `IO (Decode16, port, port, 1, len)`: a fixed range of `len` ports.
fn io(port: u16, len: u8) -> aml::IO {
    aml::IO::new(port, port, 1, len)
}

/// `Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`.
fn edge_interrupt(gsi: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, gsi)
}

/// COM1, the 8250 UART.
fn com1() -> Raw {
    device(
        "COM1",
        &[
            &name("_HID", &aml::EISAName::new("PNP0501")),
            &name("_UID", &aml::ZERO),
            &crs(&[&io(layout::COM1_PORT, 8), &edge_interrupt(layout::COM1_IRQ)]),
        ],
    )
}

/// The CMOS RTC (index and data ports), without an interrupt: the VMM's RTC raises none (no
/// periodic, alarm or update interrupt; IRQ 8 is not wired). Declaring IRQ 8 anyway would make
/// Linux's rtc-cmos offer alarms and update interrupts that never fire (`hwclock` would wait
/// for an update interrupt in vain); without it (and without legacy PIC IRQs, as in
/// hardware-reduced mode) rtc-cmos runs without alarms and `hwclock` polls.
fn rtc() -> Raw {
    device(
        "RTC_",
        &[
            &name("_HID", &aml::EISAName::new("PNP0B00")),
            &crs(&[&io(layout::CMOS_PORT, 2)]),
        ],
    )
}

/// The i8042 keyboard controller (data port 0x60, command/status port 0x64) and its keyboard
/// interrupt; see the FADT's IAPC_BOOT_ARCH for why it is described.
fn keyboard() -> Raw {
    device(
        "KBD_",
        &[
            &name("_HID", &aml::EISAName::new("PNP0303")),
            &crs(&[
                &io(layout::I8042_PORT, 1),
                &io(I8042_COMMAND_PORT, 1),
                &edge_interrupt(layout::I8042_IRQ),
            ]),
        ],
    )
}

/// The i8042's command/status port.
const I8042_COMMAND_PORT: u16 = layout::I8042_PORT + 4;

/// pvpanic, as QEMU's ISA device: Linux's pvpanic driver matches `QEMU0001` and uses its I/O
/// resource.
fn pvpanic() -> Raw {
    device(
        "PEVT",
        &[
            &name("_HID", &"QEMU0001"),
            &name("_UID", &aml::ZERO),
            // Present, enabled, shown in the UI, functioning.
            &name("_STA", &0x0fu8),
            &crs(&[&io(layout::PVPANIC_PORT, 1)]),
        ],
    )
}

/// Resources of the platform's own devices that no other device object claims, so that the OS
/// never hands them to something else: the exit device, the ACPI registers (sleep control,
/// sleep status, reset: 3 consecutive ports) and the boot timer's MMIO window, which lies in
/// the 32-bit MMIO hole a PCI allocator would otherwise consider free.
///
/// With PCI, also the ECAM region: the PCI Firmware Specification (3.3, section 4.1.2) has the
/// MCFG's regions reserved by a `PNP0C02` device, and Linux does not use ECAM that is
/// reserved neither here nor in e820 ("not reserved in ACPI motherboard resources").
fn motherboard_resources(pci: bool) -> Raw {
    let acpi_ports = layout::ACPI_RESET_PORT - layout::ACPI_SLEEP_CONTROL_PORT + 1;
    let exit = io(layout::EXIT_PORT, 1);
    let acpi = io(layout::ACPI_SLEEP_CONTROL_PORT, acpi_ports as u8);
    let boot_timer = aml::Memory32Fixed::new(true, BOOT_TIMER_BASE, BOOT_TIMER_SIZE);
    let ecam = aml::Memory32Fixed::new(true, ECAM_BASE, ECAM_SIZE);
    let mut resources: Vec<&dyn Aml> = vec![&exit, &acpi, &boot_timer];
    if pci {
        resources.push(&ecam);
    }
    device(
        "MRES",
        &[
            &name("_HID", &aml::EISAName::new("PNP0C02")),
            &name("_UID", &aml::ZERO),
            &crs(&resources),
        ],
    )
}

const BOOT_TIMER_BASE: u32 = layout::BOOT_TIMER_START as u32;
const BOOT_TIMER_SIZE: u32 = layout::BOOT_TIMER_SIZE as u32;
const _: () = assert!(layout::BOOT_TIMER_START + layout::BOOT_TIMER_SIZE <= 1 << 32);
const ECAM_BASE: u32 = layout::PCI_ECAM_START as u32;
const ECAM_SIZE: u32 = layout::PCI_ECAM_SIZE as u32;
const _: () = assert!(layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE <= 1 << 32);
const _: () = assert!(layout::ACPI_SLEEP_CONTROL_PORT < layout::ACPI_RESET_PORT);
const _: () = assert!(layout::ACPI_SLEEP_STATUS_PORT == layout::ACPI_SLEEP_CONTROL_PORT + 1);
const _: () = assert!(layout::ACPI_RESET_PORT == layout::ACPI_SLEEP_CONTROL_PORT + 2);

/// Virtio-mmio device number `index` (< 256, checked by the caller): how Linux's virtio_mmio
/// driver finds devices through ACPI.
fn virtio_mmio(index: usize, d: &VirtioMmioDevice) -> Raw {
    // The caller checked that the window lies below 4 GiB, so both fit in 32 bits.
    let base = d.base as u32;
    let size = d.size as u32;
    device(
        &format!("VR{index:02X}"),
        &[
            &name("_HID", &"LNRO0005"),
            &name("_UID", &(index as u32)),
            // Cache-coherent DMA.
            &name("_CCA", &aml::ONE),
            &crs(&[
                &aml::Memory32Fixed::new(true, base, size),
                &edge_interrupt(d.irq),
            ]),
        ],
    )
}

/// The PCI Express host bridge `PCI0`: segment 0, bus 0, its address windows and the INTx
/// routing of every slot but the bridge's own (0). `pci` is checked by the caller (the 64-bit
/// window ends below 2^64).
fn pci_host_bridge(pci: &PciConfig) -> Raw {
    let mmio64_end = pci.mmio64_start + (layout::PCI_MMIO64_SIZE - 1);
    let crs_ = crs(&[
        &aml::AddressSpace::new_bus_number(
            u16::from(PCI_FIRST_BUS),
            u16::from(layout::PCI_LAST_BUS),
        ),
        &io(layout::PCI_CONFIG_PORT, layout::PCI_CONFIG_PORT_SIZE as u8),
        &aml::AddressSpace::new_io(PCI_IO_WINDOW_START, PCI_IO_WINDOW_END, None),
        // Not "prefetchable": Linux never places a non-prefetchable BAR in a prefetchable
        // window, and the devices decide which kind their BARs are.
        &aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            MMIO32_BASE,
            MMIO32_LAST,
            None,
        ),
        &aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            pci.mmio64_start,
            mmio64_end,
            None,
        ),
    ]);
    device(
        "PCI0",
        &[
            &name("_HID", &aml::EISAName::new("PNP0A08")),
            &name("_CID", &aml::EISAName::new("PNP0A03")),
            &name("_SEG", &PCI_SEGMENT),
            &name("_UID", &aml::ZERO),
            &name("_BBN", &PCI_FIRST_BUS),
            &crs_,
            &name("_PRT", &routing_table()),
        ],
    )
}

const MMIO32_BASE: u32 = layout::PCI_MMIO32_START as u32;
const MMIO32_LAST: u32 = (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32;
const _: () = assert!(layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE <= 1 << 32);
const _: () = assert!(layout::PCI_CONFIG_PORT_SIZE <= u8::MAX as u64);

/// Interrupt pins of a PCI function: INTA#..INTD#, numbered 0..=3 in `_PRT`.
const PCI_INTX_PINS: u8 = 4;

/// The `_PRT` package: `{ 0xSSSSFFFF (slot S, any function), pin, 0, GSI }` for every pin of
/// slots 1..32; source 0 means the last element is the GSI itself.
fn routing_table() -> Raw {
    let entries: Vec<Raw> = (1..PCI_SLOTS)
        .flat_map(|slot| (0..PCI_INTX_PINS).map(move |pin| (slot, pin)))
        .map(|(slot, pin)| {
            let address = (u32::from(slot) << 16) | 0xffff;
            let gsi = pci_intx_gsi(slot, pin);
            Raw(super::to_bytes(&aml::Package::new(vec![
                &address, &pin, &0u8, &gsi,
            ])))
        })
        .collect();
    Raw(super::to_bytes(&aml::Package::new(
        entries.iter().map(|e| e as &dyn Aml).collect(),
    )))
}

/// The DSDT for `cfg` (checked by the caller).
pub(super) fn build(cfg: &AcpiConfig) -> Vec<u8> {
    let mut devices = vec![
        com1(),
        rtc(),
        keyboard(),
        pvpanic(),
        motherboard_resources(cfg.pci.is_some()),
    ];
    for (i, d) in cfg.virtio_mmio_devices.iter().enumerate() {
        devices.push(virtio_mmio(i, d));
    }
    if let Some(pci) = &cfg.pci {
        devices.push(pci_host_bridge(pci));
    }
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();

    let mut body = Vec::new();
    aml::Scope::new(Path::new("\\_SB_"), children).to_aml_bytes(&mut body);
    // SLP_TYPa = 5, SLP_TYPb = 0, two reserved elements.
    name(
        "\\_S5_",
        &aml::Package::new(vec![&S5_SLP_TYP, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        *b"CGVMDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}
