//! The boot information a kernel reads at entry: the command line, the e820 memory map, the
//! Linux zero page (`struct boot_params`) and, for PVH entries, `hvm_start_info`.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;
use crate::loader::LoadedInitrd;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// `type_of_loader`: "undefined" bootloader id, what VMMs without an assigned id use.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags`: the kernel may use the heap up to `heap_end_ptr`.
const CAN_USE_HEAP: u8 = 0x80;
/// Magic of `hvm_start_info`.
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Most e820 entries that fit in the zero page.
const E820_MAX: usize = 128;

/// Why boot information could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// The command line is too long.
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The largest we accept (or the kernel accepts).
        max: usize,
    },
    /// The command line has a NUL byte or is not ASCII.
    #[error("kernel command line must be printable ASCII without NUL bytes")]
    CmdlineInvalid,
    /// A guest memory write failed (memory too small for the boot structures).
    #[error("cannot write {what} to guest memory: {source}")]
    Memory {
        /// The structure.
        what: &'static str,
        /// The underlying error.
        source: vm_memory::GuestMemoryError,
    },
}

/// One range of the guest's physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The guest RAM ranges for `mem_size` bytes of memory: up to the MMIO hole, and the rest
/// above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_size.min(layout::MMIO32_START);
    let mut v = vec![(GuestAddress(0), low)];
    if mem_size > low {
        v.push((GuestAddress(layout::MMIO32_END), mem_size - low));
    }
    v
}

/// The e820 map for `mem_size` bytes of RAM: low RAM below the EBDA, the BIOS area (where
/// the ACPI tables live) reserved, RAM from 1 MiB to the MMIO hole, RAM above 4 GiB; in
/// address order.
///
/// `pci`: the machine has the PCI host bridge, whose ECAM region
/// ([`layout::PCI_ECAM_START`], [`layout::PCI_ECAM_SIZE`]) is then reserved too: Linux uses
/// the MCFG's ECAM only where it finds it reserved, in e820 (older kernels, and early, before
/// ACPI is up) or in the ACPI motherboard resources. The BAR windows stay out of the map:
/// Linux may clip reserved ranges out of the host bridge's windows.
pub fn e820_map(mem_size: u64, pci: bool) -> Vec<E820Entry> {
    let mut v = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(mem_size) {
        let s = start.raw_value().max(layout::HIMEM_START);
        let e = start.raw_value() + len;
        if e > s {
            v.push(E820Entry {
                addr: s,
                size: e - s,
                kind: E820_RAM,
            });
        }
    }
    if pci {
        // In the 32-bit hole: after the low RAM, before the RAM at 4 GiB.
        let at = v.partition_point(|e| e.addr < layout::PCI_ECAM_START);
        v.insert(
            at,
            E820Entry {
                addr: layout::PCI_ECAM_START,
                size: layout::PCI_ECAM_SIZE,
                kind: E820_RESERVED,
            },
        );
    }
    v
}

const _: () = assert!(layout::PCI_ECAM_START >= layout::MMIO32_START);
const _: () = assert!(layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE <= layout::MMIO32_END);

/// Writes the NUL-terminated command line at [`layout::CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), ParamsError> {
    if cmdline
        .bytes()
        .any(|b| !(0x20..0x7f).contains(&b) && b != b'\t' && b != b'\n')
    {
        return Err(ParamsError::CmdlineInvalid);
    }
    let max = max.min(layout::CMDLINE_MAX_SIZE);
    if cmdline.len() + 1 > max {
        return Err(ParamsError::CmdlineTooLong {
            len: cmdline.len(),
            max: max - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|source| ParamsError::Memory {
            what: "the command line",
            source,
        })
}

/// Fills and writes the zero page for the Linux 64-bit boot protocol; its e820 map is
/// [`e820_map`]`(mem_size, pci)`.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    setup: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
    rsdp: Option<GuestAddress>,
    mem_size: u64,
    pci: bool,
) -> Result<(), ParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = setup {
        params.hdr = hdr;
    } else {
        // An ELF kernel has no setup header; give it the fields a bootloader owns.
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr.raw_value() as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    if let Some(r) = rsdp {
        params.acpi_rsdp_addr = r.raw_value();
    }
    let map = e820_map(mem_size, pci);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter().take(E820_MAX)) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len().min(E820_MAX) as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|source| ParamsError::Memory {
            what: "the zero page",
            source,
        })
}

/// `hvm_start_info` as bytes guest memory can take.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: hvm_start_info is repr(C) plain data made of integers; any byte pattern is valid.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: hvm_memmap_table_entry is repr(C) plain data made of integers.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: hvm_modlist_entry is repr(C) plain data made of integers.
unsafe impl ByteValued for ModlistEntry {}

/// Writes `hvm_start_info`, the initrd as its one module and the memory map
/// ([`e820_map`]`(mem_size, pci)`), for a PVH entry. Returns the address the vCPU gets in EBX.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<LoadedInitrd>,
    rsdp: Option<GuestAddress>,
    mem_size: u64,
    pci: bool,
) -> Result<GuestAddress, ParamsError> {
    let err = |source| ParamsError::Memory {
        what: "the PVH start info",
        source,
    };
    let start = GuestAddress(layout::PVH_INFO_START);
    let modlist = start.unchecked_add(std::mem::size_of::<StartInfo>() as u64);
    let memmap = modlist.unchecked_add(std::mem::size_of::<ModlistEntry>() as u64);
    let map = e820_map(mem_size, pci);
    let mut info = hvm_start_info {
        magic: HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: memmap.raw_value(),
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp.map_or(0, |r| r.raw_value()),
        ..Default::default()
    };
    if let Some(i) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist.raw_value();
        let m = hvm_modlist_entry {
            paddr: i.addr.raw_value(),
            size: i.size,
            ..Default::default()
        };
        mem.write_obj(ModlistEntry(m), modlist).map_err(err)?;
    }
    for (n, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = memmap.unchecked_add((n * std::mem::size_of::<MemmapEntry>()) as u64);
        mem.write_obj(MemmapEntry(entry), at).map_err(err)?;
    }
    mem.write_obj(StartInfo(info), start).map_err(err)?;
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        let r: Vec<(GuestAddress, usize)> = ram_ranges(size)
            .into_iter()
            .map(|(a, l)| (a, l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&r).unwrap()
    }

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn e820_for_small_memory_has_low_ram_bios_hole_and_high_ram() {
        let m = e820_map(256 << 20, false);
        assert_eq!(
            m,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x60400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (256 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
            ]
        );
        assert_eq!(ram_total(&m), (256 << 20) - 0x60400);
    }

    #[test]
    fn e820_above_the_mmio_hole_continues_at_4gib() {
        let size = 5u64 << 30;
        let m = e820_map(size, false);
        let last = m.last().unwrap();
        assert_eq!(last.addr, 4 << 30);
        assert_eq!(last.size, 2 << 30);
        for e in m.iter().filter(|e| e.kind == E820_RAM) {
            let end = e.addr + e.size;
            assert!(
                end <= layout::MMIO32_START || e.addr >= layout::MMIO32_END,
                "{e:?}"
            );
        }
        assert_eq!(ram_total(&m), size - 0x60400);
        assert_eq!(ram_ranges(size).len(), 2);
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_rsdp_and_e820() {
        let g = mem(128 << 20);
        write_cmdline(&g, "console=ttyS0 quiet", 2048).unwrap();
        let initrd = LoadedInitrd {
            addr: GuestAddress(0x700_0000),
            size: 0x1234,
        };
        write_zero_page(
            &g,
            None,
            20,
            Some(initrd),
            Some(GuestAddress(0xe0000)),
            128 << 20,
            false,
        )
        .unwrap();
        let p: boot_params = g.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, 0x10_0000);
        let mut s = [0u8; 20];
        g.read_slice(&mut s, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&s, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn cmdline_limits_are_enforced() {
        let g = mem(16 << 20);
        let long = "a".repeat(3000);
        let e = write_cmdline(&g, &long, 2048).unwrap_err();
        assert!(
            matches!(
                e,
                ParamsError::CmdlineTooLong {
                    len: 3000,
                    max: 2047
                }
            ),
            "{e}"
        );
        assert!(write_cmdline(&g, "bad\0nul", 2048).is_err());
        assert!(write_cmdline(&g, &"b".repeat(2047), 2048).is_ok());
    }

    #[test]
    fn pvh_start_info_lists_memory_and_the_initrd() {
        let g = mem(64 << 20);
        let i = LoadedInitrd {
            addr: GuestAddress(0x300_0000),
            size: 99,
        };
        let rsdp = Some(GuestAddress(0xe0000));
        let at = write_pvh_start_info(&g, Some(i), rsdp, 64 << 20, false).unwrap();
        let info: StartInfo = g.read_obj(at).unwrap();
        let info = info.0;
        assert_eq!(info.magic, HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        let m: ModlistEntry = g.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.0.paddr, m.0.size), (0x300_0000, 99));
        let e: MemmapEntry = g.read_obj(GuestAddress(info.memmap_paddr + 48)).unwrap();
        assert_eq!((e.0.addr, e.0.type_), (0x10_0000, E820_RAM));
        assert!(info.memmap_paddr + 72 <= layout::ZERO_PAGE_START);
    }

    const ECAM: E820Entry = E820Entry {
        addr: 0xe000_0000,
        size: 0x10_0000,
        kind: E820_RESERVED,
    };

    /// The map of a 5 GiB machine without PCI, as it was before PCI existed.
    fn map_5g_without_pci() -> Vec<E820Entry> {
        vec![
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM,
            },
            E820Entry {
                addr: 0x9fc00,
                size: 0x60400,
                kind: E820_RESERVED,
            },
            E820Entry {
                addr: 0x10_0000,
                size: 0xc000_0000 - 0x10_0000,
                kind: E820_RAM,
            },
            E820Entry {
                addr: 4 << 30,
                size: (5 << 30) - 0xc000_0000,
                kind: E820_RAM,
            },
        ]
    }

    #[test]
    fn e820_without_pci_has_no_ecam_entry() {
        assert_eq!(e820_map(5 << 30, false), map_5g_without_pci());
        for size in [16u64 << 20, 256 << 20, 3 << 30, 0xc000_0000, 5 << 30] {
            let m = e820_map(size, false);
            assert!(
                m.iter().all(
                    |e| e.addr + e.size <= layout::MMIO32_START || e.addr >= layout::MMIO32_END
                ),
                "{size:#x}: {m:?}"
            );
        }
    }

    #[test]
    fn e820_with_pci_reserves_the_ecam_region_in_address_order() {
        let mut want = map_5g_without_pci();
        want.insert(3, ECAM);
        assert_eq!(e820_map(5 << 30, true), want);

        for size in [
            16u64 << 20,
            256 << 20,
            3 << 30,
            0xc000_0000,
            5 << 30,
            64 << 30,
        ] {
            let with = e820_map(size, true);
            let mut without = e820_map(size, false);
            // The same map plus one entry: the ECAM region, reserved.
            let at = with.iter().position(|e| *e == ECAM).unwrap();
            without.insert(at, ECAM);
            assert_eq!(with, without, "{size:#x}");
            assert_eq!(with.iter().filter(|e| **e == ECAM).count(), 1);
            assert_eq!(ram_total(&with), ram_total(&e820_map(size, false)));
            for w in with.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{size:#x}: {w:?}");
            }
        }
    }

    #[test]
    fn zero_page_and_pvh_start_info_carry_the_ecam_entry_with_pci() {
        let g = mem(128 << 20);
        let rsdp = Some(GuestAddress(0xe0000));
        write_zero_page(&g, None, 1, None, rsdp, 128 << 20, true).unwrap();
        let p: boot_params = g.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!(p.e820_entries, 4);
        let e = p.e820_table[3];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (0xe000_0000, 0x10_0000, E820_RESERVED)
        );

        let at = write_pvh_start_info(&g, None, rsdp, 128 << 20, true).unwrap();
        let info: StartInfo = g.read_obj(at).unwrap();
        assert_eq!(info.0.memmap_entries, 4);
        let e: MemmapEntry = g
            .read_obj(GuestAddress(info.0.memmap_paddr + 3 * 24))
            .unwrap();
        assert_eq!(
            (e.0.addr, e.0.size, e.0.type_),
            (0xe000_0000, 0x10_0000, E820_RESERVED)
        );
    }
}
