//! The vCPU state at the kernel's first instruction: GDT and identity page tables in guest
//! memory, and the register, segment, FPU and MSR values the boot vCPU gets.
//!
//! Values follow the Linux x86 64-bit boot protocol (long mode, flat `__BOOT_CS` = 0x10 and
//! `__BOOT_DS` = 0x18, RSI = zero page) or, for a PVH entry, 32-bit protected mode with
//! paging off and EBX = `hvm_start_info`.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;
use crate::loader::EntryMode;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits: present, writable, large page.
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;

/// Selector of the boot code segment (Linux's `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment (Linux's `__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the boot TSS.
pub const BOOT_TSS: u16 = 0x20;

/// MSR numbers set at boot.
mod msr_index {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// A GDT descriptor from its flags (bits 8-15 access byte, 20-23 flags), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT for an entry mode: null, null, code at 0x10, data at 0x18, TSS at 0x20.
fn gdt(mode: EntryMode) -> [u64; 5] {
    let code = match mode {
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit, present, exec/read
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),     // 32-bit, 4 KiB granular
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data: read/write, 4 KiB granular
        gdt_entry(0x008b, 0, 0xfffff), // busy 32/64-bit TSS
    ]
}

/// The `kvm_segment` a GDT entry describes, for selector `sel`.
fn segment(entry: u64, sel: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: sel,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Why the boot structures could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the boot {what} to guest memory: {source}")]
pub struct RegsError {
    what: &'static str,
    source: vm_memory::GuestMemoryError,
}

/// Writes the GDT, an empty IDT and, for long mode, page tables identity-mapping the first
/// 4 GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), RegsError> {
    let e = |what| move |source| RegsError { what, source };
    for (i, d) in gdt(mode).iter().enumerate() {
        mem.write_obj(*d, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(e("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(e("IDT"))?;
    if mode == EntryMode::Linux64 {
        mem.write_obj(
            layout::PDPTE_START | PTE_P | PTE_RW,
            GuestAddress(layout::PML4_START),
        )
        .map_err(e("page tables"))?;
        for gib in 0..4u64 {
            let pd = layout::PDE_START + gib * 0x1000;
            mem.write_obj(
                pd | PTE_P | PTE_RW,
                GuestAddress(layout::PDPTE_START + gib * 8),
            )
            .map_err(e("page tables"))?;
            let mut table = [0u64; 512];
            for (i, pte) in table.iter_mut().enumerate() {
                *pte = ((gib << 30) + ((i as u64) << 21)) | PTE_P | PTE_RW | PTE_PS;
            }
            let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_le_bytes()).collect();
            mem.write_slice(&bytes, GuestAddress(pd))
                .map_err(e("page tables"))?;
        }
    }
    Ok(())
}

/// Sets segments, descriptor tables, control registers and EFER for the entry mode, keeping
/// what KVM put in the other fields (APIC base, interrupt bitmap).
pub fn configure_sregs(sregs: &mut kvm_sregs, mode: EntryMode) {
    let table = gdt(mode);
    let code = segment(table[2], BOOT_CS);
    let data = segment(table[3], BOOT_DS);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(table[4], BOOT_TSS);
    match mode {
        EntryMode::Linux64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// General-purpose registers at the entry: RIP, a stack, and the boot-info pointer (RSI for
/// the zero page, EBX for PVH's start info).
pub fn boot_regs(mode: EntryMode, entry: GuestAddress, boot_info: GuestAddress) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => r.rsi = boot_info.0,
        EntryMode::Pvh => r.rbx = boot_info.0,
    }
    r
}

/// The FPU as after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with: syscall MSRs cleared, fast strings on, MTRRs enabled with
/// write-back as the default type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    use msr_index::*;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(IA32_SYSENTER_CS, 0),
        e(IA32_SYSENTER_ESP, 0),
        e(IA32_SYSENTER_EIP, 0),
        e(STAR, 0),
        e(CSTAR, 0),
        e(KERNEL_GS_BASE, 0),
        e(SYSCALL_MASK, 0),
        e(LSTAR, 0),
        e(IA32_MISC_ENABLE, 1), // fast string operations
        e(IA32_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let t = gdt(EntryMode::Linux64);
        assert_eq!(t[2], 0x00af_9b00_0000_ffff);
        assert_eq!(t[3], 0x00cf_9300_0000_ffff);
        let cs = segment(t[2], BOOT_CS);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.present, cs.s, cs.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(t[3], BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tss = segment(t[4], BOOT_TSS);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
        let pvh_cs = segment(gdt(EntryMode::Pvh)[2], BOOT_CS);
        assert_eq!((pvh_cs.l, pvh_cs.db), (0, 1));
    }

    #[test]
    fn page_tables_identity_map_4gib_with_2mib_pages() {
        let m = mem();
        write_boot_tables(&m, EntryMode::Linux64).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
        // Walk a few addresses the way the MMU would.
        for va in [0u64, 0x1234_5678, 0xc000_0000, 0xfee0_0000, 0xffff_ffff] {
            let pdpte: u64 = m
                .read_obj(GuestAddress(layout::PDPTE_START + ((va >> 30) & 511) * 8))
                .unwrap();
            assert_eq!(pdpte & 3, 3);
            let pde: u64 = m
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "2 MiB page, present, writable");
            assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);
        }
        let gdt0: u64 = m
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 16))
            .unwrap();
        assert_eq!(gdt0, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn sregs_and_regs_follow_the_boot_protocol() {
        let mut s = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        configure_sregs(&mut s, EntryMode::Linux64);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, layout::PML4_START);
        assert_eq!(s.apic_base, 0xfee0_0900, "kept");
        let r = boot_regs(
            EntryMode::Linux64,
            GuestAddress(0x100_0000),
            GuestAddress(0x7000),
        );
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, 0x7000, 2));

        configure_sregs(&mut s, EntryMode::Pvh);
        assert_eq!((s.cr0 & CR0_PG, s.efer, s.cs.l, s.cs.db), (0, 0, 0, 1));
        let r = boot_regs(
            EntryMode::Pvh,
            GuestAddress(0x100_0000),
            GuestAddress(0x6000),
        );
        assert_eq!((r.rbx, r.rsi), (0x6000, 0));
    }

    #[test]
    fn fpu_and_msrs_have_their_reset_values() {
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
        let m = boot_msrs();
        let mtrr = m
            .iter()
            .find(|e| e.index == msr_index::IA32_MTRR_DEF_TYPE)
            .unwrap();
        assert_eq!(mtrr.data, 0x806);
    }
}
