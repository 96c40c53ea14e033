//! The CPUID table each vCPU gets: KVM's supported table with this vCPU's APIC ID and the
//! machine's topology (one thread per core, all cores in one package), the hypervisor bit
//! set and the performance-monitoring leaf hidden.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Topology level types of leaves 0xB and 0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Why the CPUID table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The vCPU count is out of range.
    #[error("vCPU {vcpu} of {count}: the count must be 1 to 255 and the index below it")]
    BadTopology {
        /// This vCPU's index.
        vcpu: u8,
        /// The number of vCPUs.
        count: u8,
    },
    /// The table is full.
    #[error("the CPUID table has no room for the topology leaves")]
    TableFull,
}

/// Bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `cpuid` (as returned by KVM_GET_SUPPORTED_CPUID) for vCPU `vcpu` of `count`.
pub fn configure_cpuid(cpuid: &mut CpuId, vcpu: u8, count: u8) -> Result<(), CpuidError> {
    if count == 0 || vcpu >= count {
        return Err(CpuidError::BadTopology { vcpu, count });
    }
    let apic_id = u32::from(vcpu);
    let n = u32::from(count);
    let mut max_leaf = 0;
    for e in cpuid.as_mut_slice() {
        match e.function {
            0 => max_leaf = e.eax,
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (n.min(255) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if n > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Deterministic cache parameters: cores per package, and which cache is shared.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((n - 1) << 26) | (sharing << 14);
            }
            0xa => {
                // No virtual PMU: the guest must not program counters we do not provide.
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            _ => {}
        }
    }
    // Rebuild the extended topology leaves for our topology.
    let mut entries: Vec<kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .filter(|e| e.function != 0xb && e.function != 0x1f)
        .copied()
        .collect();
    for leaf in [0xb, 0x1f] {
        if leaf > max_leaf {
            continue;
        }
        let topo = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
            function: leaf,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx: ecx | index,
            edx: apic_id,
            ..Default::default()
        };
        entries.push(topo(0, 0, 1, LEVEL_SMT << 8));
        entries.push(topo(1, bits_for(n), n, LEVEL_CORE << 8));
        entries.push(topo(2, 0, 0, 0));
    }
    *cpuid = CpuId::from_entries(&entries).map_err(|_| CpuidError::TableFull)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_like() -> CpuId {
        let e = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            e(1, 0, 0x000a_06a6, 0x0010_0800, 0x7ffa_3203, 0x178b_fbff),
            e(4, 0, 0x0000_0121, 0, 0, 0),
            e(4, 3, 0x0000_0163, 0, 0, 0),
            e(0xa, 0, 0x0704_3004, 0, 0, 0),
            e(0xb, 0, 1, 2, 0x100, 7),
            e(0xb, 1, 7, 64, 0x201, 7),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut c = host_like();
        configure_cpuid(&mut c, 3, 4).unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let mut c = host_like();
        configure_cpuid(&mut c, 0, 1).unwrap();
        assert_eq!(find(&c, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_n_single_thread_cores() {
        let mut c = host_like();
        configure_cpuid(&mut c, 5, 6).unwrap();
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        let end = find(&c, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
        assert_eq!(find(&c, 0x1f, 1).ebx, 6);
        assert_eq!(find(&c, 4, 0).eax >> 26, 5);
        assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 5, "L3 shared by all");
        assert_eq!((find(&c, 4, 0).eax >> 14) & 0xfff, 0, "L1 private");
        assert_eq!(find(&c, 0xa, 0).eax, 0, "PMU hidden");
    }

    #[test]
    fn bad_topology_is_refused() {
        let mut c = host_like();
        assert!(configure_cpuid(&mut c, 0, 0).is_err());
        assert!(configure_cpuid(&mut c, 2, 2).is_err());
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(32), 5);
        assert_eq!(bits_for(33), 6);
    }
}
