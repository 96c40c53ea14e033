//! Describing a vCPU that stopped in a way the VMM cannot continue: its registers, the
//! instruction bytes at RIP (found by walking the guest's own page tables) and KVM's detail.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates a guest virtual address to a guest physical one by walking the guest's page
/// tables in `mem` (4-level long mode, or no paging). `None` when unmapped or unsupported.
pub fn translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, gva: u64) -> Option<u64> {
    if sregs.cr0 & CR0_PG == 0 {
        return Some(gva);
    }
    if sregs.efer & EFER_LMA == 0 || sregs.cr4 & CR4_PAE == 0 || sregs.cr4 & CR4_LA57 != 0 {
        return None; // 32-bit paging and 5-level paging are not walked
    }
    let mut table = sregs.cr3 & ADDR_MASK;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (gva >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PTE_P == 0 {
            return None;
        }
        let page_mask = (1u64 << shift) - 1;
        if level == 0 || (level < 3 && entry & PTE_PS != 0) {
            return Some((entry & ADDR_MASK & !page_mask) | (gva & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

/// Up to 15 instruction bytes at the vCPU's RIP (fewer if they cross into unmapped memory).
pub fn instruction_bytes(mem: &GuestMemoryMmap, regs: &kvm_regs, sregs: &kvm_sregs) -> Vec<u8> {
    let rip = sregs.cs.base.wrapping_add(regs.rip);
    let mut out = Vec::with_capacity(15);
    for i in 0..15u64 {
        let Some(pa) = translate(mem, sregs, rip.wrapping_add(i)) else {
            break;
        };
        match mem.read_obj::<u8>(GuestAddress(pa)) {
            Ok(b) => out.push(b),
            Err(_) => break,
        }
    }
    out
}

/// Formats bytes as "0f 0b 90".
pub fn hex_bytes(b: &[u8]) -> String {
    if b.is_empty() {
        return "unavailable".into();
    }
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_4k_2m_and_1g_pages_and_stops_at_holes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 22)]).unwrap();
        let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).unwrap();
        // PML4 at 0x1000; kernel-style high address 0xffffffff81000000 -> 2 MiB page at 0x200000.
        let gva: u64 = 0xffff_ffff_8100_0123;
        w(0x1000 + ((gva >> 39) & 511) * 8, 0x2000 | 3);
        w(0x2000 + ((gva >> 30) & 511) * 8, 0x3000 | 3);
        w(0x3000 + ((gva >> 21) & 511) * 8, 0x20_0000 | 0x83);
        // A 4 KiB mapping: 0x4000_0000_1000 -> 0x5000 through PT at 0x6000.
        let small: u64 = 0x4000_0000_1008;
        w(0x1000 + ((small >> 39) & 511) * 8, 0x7000 | 3);
        w(0x7000 + ((small >> 30) & 511) * 8, 0x8000 | 3);
        w(0x8000 + ((small >> 21) & 511) * 8, 0x6000 | 3);
        w(0x6000 + ((small >> 12) & 511) * 8, 0x5000 | 3);
        // A 1 GiB page for 0x80_0000_0000 -> 0.
        let huge: u64 = 0x80_0000_0042;
        w(0x1000 + ((huge >> 39) & 511) * 8, 0x9000 | 3);
        w(0x9000 + ((huge >> 30) & 511) * 8, 0x83);
        let s = kvm_sregs {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            ..Default::default()
        };
        assert_eq!(translate(&mem, &s, gva), Some(0x20_0123));
        assert_eq!(translate(&mem, &s, small), Some(0x5008));
        assert_eq!(translate(&mem, &s, huge), Some(0x42));
        assert_eq!(translate(&mem, &s, 0x1234_5678_9000), None);
        mem.write_slice(&[0x0f, 0x0b], GuestAddress(0x20_0123))
            .unwrap();
        let r = kvm_regs {
            rip: gva,
            ..Default::default()
        };
        let b = instruction_bytes(&mem, &r, &s);
        assert_eq!(&b[..2], &[0x0f, 0x0b]);
        assert_eq!(b.len(), 15);
        assert_eq!(hex_bytes(&b[..2]), "0f 0b");
        let unpaged = kvm_sregs::default();
        assert_eq!(translate(&mem, &unpaged, 0x1234), Some(0x1234));
    }
}
