//! Where things live in guest physical memory, and the fixed addresses of the platform.
//! docs/DESIGN.md has the same table for readers; this file is the one the code uses.

/// The boot GDT (Linux 64-bit boot protocol selectors).
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT (empty: the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`); RSI points here at the 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top of the boot stack.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Level-3 page table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four level-2 tables (2 MiB pages) covering 0..4 GiB.
pub const PDE_START: u64 = 0xb000;
/// The PVH `hvm_start_info` structure and its memory map follow it.
pub const PVH_INFO_START: u64 = 0x6000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// The ACPI RSDP; the other tables follow it.
pub const RSDP_START: u64 = 0xe0000;
/// End of the region reserved for ACPI tables (exclusive).
pub const ACPI_END: u64 = 0x10_0000;
/// Start of the EBDA/BIOS area reserved in e820 (0x9fc00..1 MiB).
pub const EBDA_START: u64 = 0x9fc00;
/// Where "high memory" starts: the bzImage protected-mode kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM above this goes to 4 GiB and up.
pub const MMIO32_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (exclusive).
pub const MMIO32_END: u64 = 0x1_0000_0000;
/// Boot timer: the guest writes 123 here when it considers boot complete.
pub const BOOT_TIMER_START: u64 = 0xc000_0000;
/// Size of the boot timer's MMIO window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// The 32-bit window the PCI host bridge gives to BARs (after the virtio-mmio windows, before
/// the ECAM region).
pub const PCI_MMIO32_START: u64 = 0xd000_0000;
/// Size of the 32-bit PCI BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x1000_0000;
/// PCI Express enhanced configuration access (ECAM, the MCFG table's base): 4 KiB per
/// function, 32 devices of 8 functions on bus 0, the only bus.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM region: bus 0 only.
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// The last PCI bus number (bus 0 is the only one).
pub const PCI_LAST_BUS: u8 = 0;
/// Size of the 64-bit PCI BAR window, which starts at [`pci_mmio64_start`].
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// PCI configuration mechanism #1: the address port (0xcf8) and the data ports (0xcfc..0xcff).
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Size of the configuration port range (0xcf8..0xd00).
pub const PCI_CONFIG_PORT_SIZE: u64 = 8;
/// First GSI for MSI routes: above the IOAPIC's 24 pins.
pub const MSI_GSI_START: u32 = 24;

/// Where the 64-bit PCI BAR window starts for a machine with `mem_size` bytes of RAM: the first
/// 1 GiB boundary above both 4 GiB and the end of RAM (RAM above the 32-bit hole starts at
/// 4 GiB).
pub fn pci_mmio64_start(mem_size: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    let ram_end = if mem_size > MMIO32_START {
        MMIO32_END + (mem_size - MMIO32_START)
    } else {
        MMIO32_END
    };
    ram_end.div_ceil(GIB) * GIB
}

/// The in-kernel IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port (the command port is 0x64).
pub const I8042_PORT: u16 = 0x60;
/// i8042 interrupt line.
pub const I8042_IRQ: u32 = 1;
/// CMOS RTC index port (data is 0x71).
pub const CMOS_PORT: u16 = 0x70;
/// Exit device: a one-byte write V ends the run with exit status V.
pub const EXIT_PORT: u16 = 0xf4;
/// ACPI sleep control register (FADT), hardware-reduced ACPI.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// ACPI sleep status register (FADT).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// ACPI reset register (FADT).
pub const ACPI_RESET_PORT: u16 = 0x3c2;
/// Value the guest writes to the reset register.
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// pvpanic port, as QEMU's `pvpanic` ISA device.
pub const PVPANIC_PORT: u16 = 0x505;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_windows_sit_in_the_hole_and_above_ram() {
        const {
            assert!(PCI_MMIO32_START >= BOOT_TIMER_START + 0x10_0000);
            assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE == PCI_ECAM_START);
            assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
        }
        assert_eq!(pci_mmio64_start(256 << 20), 4 << 30);
        assert_eq!(pci_mmio64_start(MMIO32_START), 4 << 30);
        assert_eq!(pci_mmio64_start(MMIO32_START + 1), 5 << 30);
        assert_eq!(pci_mmio64_start(8 << 30), 9 << 30);
    }
}
