//! The KVM VM: guest memory registered with KVM, the in-kernel interrupt controller (PIC,
//! IOAPIC, per-vCPU LAPIC) and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Address of the three pages KVM needs for the real-mode TSS on Intel hosts (inside the
/// 32-bit MMIO hole, below the IOAPIC).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    /// The KVM API is not the stable one.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The step.
        what: &'static str,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory {
        /// The size.
        mib: u64,
        /// Why.
        reason: String,
    },
}

/// A created VM with its memory.
pub struct Vm {
    /// The /dev/kvm handle.
    pub kvm: Kvm,
    /// The VM's fd (shared with the GSI routing table, which vCPU threads change).
    pub fd: std::sync::Arc<VmFd>,
    /// Guest memory.
    pub memory: GuestMemoryMmap,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

impl Vm {
    /// Opens KVM, creates the VM, allocates `mem_size` bytes of guest memory laid out by
    /// `ranges`, and creates the in-kernel irqchip and PIT.
    pub fn new(ranges: &[(vm_memory::GuestAddress, u64)]) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mib = ranges.iter().map(|r| r.1).sum::<u64>() >> 20;
        let r: Vec<_> = ranges.iter().map(|(a, l)| (*a, *l as usize)).collect();
        let memory = GuestMemoryMmap::from_ranges(&r).map_err(|e| VmError::Memory {
            mib,
            reason: e.to_string(),
        })?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Memory {
                    mib,
                    reason: e.to_string(),
                })?;
            let kr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which the returned Vm
            // keeps for as long as the VM fd exists; slots do not overlap.
            unsafe { fd.set_user_memory_region(kr) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Self {
            kvm,
            fd: std::sync::Arc::new(fd),
            memory,
        })
    }
}
