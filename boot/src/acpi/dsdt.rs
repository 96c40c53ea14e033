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
//!     }
//!     Name (\_S5, Package () { 5, 0, 0, 0 })
//! }
//! ```
//!
//! Interrupts use the Extended Interrupt descriptor, whose number is a GSI; ISA IRQ n is GSI n
//! here (see the MADT's overrides). The keyboard controller has no aux (mouse) port, so there is
//! no `PNP0F13` device; Linux then skips probing for one.

use acpi_tables::aml::{self, Path};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use super::{AcpiConfig, VirtioMmioDevice, OEM_ID, OEM_REVISION};
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
fn motherboard_resources() -> Raw {
    let acpi_ports = layout::ACPI_RESET_PORT - layout::ACPI_SLEEP_CONTROL_PORT + 1;
    device(
        "MRES",
        &[
            &name("_HID", &aml::EISAName::new("PNP0C02")),
            &name("_UID", &aml::ZERO),
            &crs(&[
                &io(layout::EXIT_PORT, 1),
                &io(layout::ACPI_SLEEP_CONTROL_PORT, acpi_ports as u8),
                &aml::Memory32Fixed::new(true, BOOT_TIMER_BASE, BOOT_TIMER_SIZE),
            ]),
        ],
    )
}

const BOOT_TIMER_BASE: u32 = layout::BOOT_TIMER_START as u32;
const BOOT_TIMER_SIZE: u32 = layout::BOOT_TIMER_SIZE as u32;
const _: () = assert!(layout::BOOT_TIMER_START + layout::BOOT_TIMER_SIZE <= 1 << 32);
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

/// The DSDT for `cfg` (checked by the caller).
pub(super) fn build(cfg: &AcpiConfig) -> Vec<u8> {
    let mut devices = vec![
        com1(),
        rtc(),
        keyboard(),
        pvpanic(),
        motherboard_resources(),
    ];
    for (i, d) in cfg.virtio_mmio_devices.iter().enumerate() {
        devices.push(virtio_mmio(i, d));
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
