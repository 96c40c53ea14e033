//! The seccomp policies of the threads this crate starts: the vCPU threads, the VMM thread
//! (the event loop) and the thread that logs passt's messages. Device threads have theirs in
//! `devices`, the API thread in `api`.
//!
//! Thread kinds and their filters:
//! - `vcpu`: KVM_RUN and the exits it hands back (bus accesses, the serial console, a PCI
//!   BAR move or MSI-X route change, a device reset), and the registers for a fault report.
//!   Device activation is not here: the transports leave it to the VMM loop.
//! - `vmm`: the event loop and what it does at run time (starting devices, API actions,
//!   metrics, stopping the machine). Device threads are started by the VMM thread after its
//!   filter is in place, so they run under both filters and the kernel allows a call only if
//!   both do: the VMM's list therefore holds every device kind's list as well.
//! - `passt-log`: reading passt's stderr and logging it.

use devices::seccomp::{self as sc, ArgRule, Policy};
use kvm_bindings::{kvm_ioeventfd, kvm_irq_routing, kvm_regs, kvm_sregs};

/// KVM's ioctl type byte.
const KVMIO: u64 = 0xae;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// An ioctl request number as the kernel's _IOC builds it.
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

/// `KVM_RUN`.
pub const KVM_RUN: u64 = ioc(0, KVMIO, 0x80, 0);
/// `KVM_GET_REGS`.
pub const KVM_GET_REGS: u64 = ioc(IOC_READ, KVMIO, 0x81, std::mem::size_of::<kvm_regs>());
/// `KVM_GET_SREGS`.
pub const KVM_GET_SREGS: u64 = ioc(IOC_READ, KVMIO, 0x83, std::mem::size_of::<kvm_sregs>());
/// `KVM_IOEVENTFD`.
pub const KVM_IOEVENTFD: u64 = ioc(IOC_WRITE, KVMIO, 0x79, std::mem::size_of::<kvm_ioeventfd>());
/// `KVM_SET_GSI_ROUTING`.
pub const KVM_SET_GSI_ROUTING: u64 = ioc(
    IOC_WRITE,
    KVMIO,
    0x6a,
    std::mem::size_of::<kvm_irq_routing>(),
);
/// `TUNSETOFFLOAD` (`_IOW('T', 208, unsigned int)`).
pub const TUNSETOFFLOAD: u64 = ioc(IOC_WRITE, b'T' as u64, 208, 4);
/// `FICLONE` (`_IOW(0x94, 9, int)`).
pub const FICLONE: u64 = ioc(IOC_WRITE, 0x94, 9, 4);

/// What every kind here makes besides what [`Policy::new`] gives every thread: eventfd and file reads and writes
/// (the serial console, the log) and closing descriptors.
const COMMON: &[i64] = &[libc::SYS_read, libc::SYS_write, libc::SYS_close];

/// The vCPU threads' policy.
pub fn vcpu_policy() -> Policy {
    Policy::new("vcpu").allow(COMMON).allow_args(&[ArgRule {
        nr: libc::SYS_ioctl,
        arg: 1,
        values: &[
            (KVM_RUN, "KVM_RUN"),
            // The fault report of a vCPU that stops.
            (KVM_GET_REGS, "KVM_GET_REGS"),
            (KVM_GET_SREGS, "KVM_GET_SREGS"),
            // The guest moves a virtio-pci BAR (the notify ioeventfds follow it) or programs
            // an MSI-X vector (its GSI route changes).
            (KVM_IOEVENTFD, "KVM_IOEVENTFD"),
            (KVM_SET_GSI_ROUTING, "KVM_SET_GSI_ROUTING"),
        ],
    }])
}

/// The VMM thread's own calls, before what starting threads and the device kinds add (see
/// [`vmm_policy`]).
pub fn vmm_own_policy() -> Policy {
    Policy::new("vmm")
        .allow(COMMON)
        .allow(&[
            // The event loop.
            libc::SYS_epoll_wait,
            libc::SYS_epoll_ctl,
            // A device thread's epoll set, made when the device starts.
            libc::SYS_epoll_create1,
            // The timers of a device's rate limiters, and of a new limiter (PATCH).
            libc::SYS_timerfd_create,
            // Starting a device: its eventfds, its descriptors handed to its thread, an
            // io_uring for a disk.
            libc::SYS_eventfd2,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_register,
            // Kicking vCPUs out of KVM_RUN (pause, stop) and waiting for them.
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_tgkill,
            libc::SYS_clock_nanosleep,
            // A drive's new backing file (PATCH /drives): opening it, its size, its overlay
            // (an anonymous file, sized), an unnamed one's name removed.
            libc::SYS_openat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_ftruncate,
            // That, and the vsock and API sockets removed at the end.
            libc::SYS_unlink,
            // Reaping passt with the machine.
            libc::SYS_wait4,
        ])
        .allow_args(&[
            ArgRule {
                nr: libc::SYS_fcntl,
                arg: 1,
                // Descriptors duplicated for a device's thread.
                values: &[(libc::F_DUPFD_CLOEXEC as u64, "F_DUPFD_CLOEXEC")],
            },
            // Stopping passt with the machine: SIGKILL, the one signal it is sent.
            ArgRule {
                nr: libc::SYS_kill,
                arg: 1,
                values: &[(libc::SIGKILL as u64, "SIGKILL")],
            },
            ArgRule {
                nr: libc::SYS_ioctl,
                arg: 1,
                values: &[
                    // The vsock device's sockets, made non-blocking when it starts.
                    (libc::FIONBIO, "FIONBIO"),
                    // A net device's offloads, as its driver negotiated them.
                    (TUNSETOFFLOAD, "TUNSETOFFLOAD"),
                    // An ephemeral drive's overlay, cloned from its image.
                    (FICLONE, "FICLONE"),
                    // The terminal, put back as it was when the run ends.
                    (libc::TCGETS, "TCGETS"),
                    (libc::TCSETS, "TCSETS"),
                ],
            },
        ])
}

/// The VMM thread's policy: its own calls, starting and confining device threads, and every
/// device kind's list (device threads inherit this filter).
pub fn vmm_policy() -> Policy {
    let mut p = vmm_own_policy().merge(&sc::spawn_and_confine());
    for kind in devices::virtio::device_kinds() {
        p = p.merge(&kind.policy());
    }
    p
}

/// The thread that logs what passt writes on its stderr.
pub fn passt_log_policy() -> Policy {
    Policy::new("passt-log").allow(COMMON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(TUNSETOFFLOAD, libc::TUNSETOFFLOAD as u64);
        assert_eq!(FICLONE, libc::FICLONE as u64);
    }

    #[test]
    fn every_policy_compiles_and_the_vmm_holds_every_device_kind() {
        for p in [vcpu_policy(), vmm_policy(), passt_log_policy()] {
            assert!(p.compile().is_ok(), "{}", p.kind);
        }
        let vmm = vmm_policy();
        for kind in devices::virtio::device_kinds() {
            let base = sc::THREAD_BASE.iter().chain(sc::DEVICE_THREAD_BASE);
            assert!(vmm.allows(libc::SYS_mmap) && vmm.allows(libc::SYS_mprotect));
            for &nr in kind.calls.iter().chain(base) {
                assert!(vmm.allows(nr), "{} needs {nr}", kind.name);
            }
        }
        assert!(!vcpu_policy().allows(libc::SYS_clone3));
        assert!(!vcpu_policy().allows(libc::SYS_openat));
    }

    /// An interrupt that goes nowhere.
    struct NoInterrupt;

    impl devices::virtio::VirtioInterrupt for NoInterrupt {
        fn trigger(&self, _: devices::virtio::InterruptReason) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A one-queue activation context over 1 MiB of memory.
    fn context(queues: u16) -> devices::virtio::ActivateContext {
        use virtio_queue::{Queue, QueueT};
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
            .expect("memory");
        let queues = (0..queues)
            .map(|i| {
                let mut q = Queue::new(16).expect("queue");
                let base = 0x10000 * (u32::from(i) + 1);
                q.set_desc_table_address(Some(base), Some(0));
                q.set_avail_ring_address(Some(base + 0x1000), Some(0));
                q.set_used_ring_address(Some(base + 0x2000), Some(0));
                q.set_ready(true);
                devices::virtio::ActiveQueue {
                    index: i,
                    queue: q,
                    notify: vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd"),
                }
            })
            .collect();
        devices::virtio::ActivateContext {
            mem,
            queues,
            interrupt: std::sync::Arc::new(NoInterrupt),
            acked_features: 1 << 32,
            health: devices::virtio::DeviceHealth::new(),
        }
    }

    /// A driver that resets a live device does it from its vCPU thread: stopping the device
    /// thread and dropping what it held must stay inside the vCPU filter (a violation kills
    /// this test process with SIGSYS). Activation runs unconfined here, as on the VMM thread.
    #[test]
    fn a_device_reset_on_a_vcpu_thread_stays_inside_the_vcpu_filter() {
        use devices::rate_limiter::{RateLimiterConfig, TokenBucket};
        use devices::virtio::block::{Block, BlockConfig, Engine};
        use devices::virtio::VirtioDevice;
        let dir = std::env::temp_dir().join(format!("cgvm-vcpu-reset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let limiter = RateLimiterConfig {
            bandwidth: Some(TokenBucket {
                size: 1 << 20,
                one_time_burst: None,
                refill_time_ms: 1000,
            }),
            ops: None,
        };
        let mut live: Vec<Box<dyn VirtioDevice>> = Vec::new();
        let mut rng = devices::virtio::rng::Rng::new(Some(limiter.clone()));
        rng.activate(context(1)).expect("rng");
        live.push(Box::new(rng));
        for (i, engine) in [Engine::Sync, Engine::Uring].into_iter().enumerate() {
            let path = dir.join(format!("disk{i}.img"));
            std::fs::write(&path, vec![0u8; 1 << 20]).expect("image");
            let mut blk = Block::new(BlockConfig {
                path,
                read_only: false,
                ephemeral: false,
                serial: "d".into(),
                engine,
                rate_limiter: Some(limiter.clone()),
            })
            .expect("block");
            blk.activate(context(1)).expect("block");
            live.push(Box::new(blk));
        }
        let mut vsock = devices::virtio::vsock::Vsock::new(3, &dir.join("v.sock")).expect("vsock");
        vsock.activate(context(3)).expect("vsock");
        live.push(Box::new(vsock));
        let vcpu = std::thread::spawn(move || {
            // A violation names itself on stderr before the process dies.
            devices::seccomp::set_log(true);
            devices::seccomp::install_sigsys_reporter().expect("SIGSYS handler");
            devices::seccomp::confine(&vcpu_policy()).expect("the vcpu filter");
            for d in &mut live {
                d.reset();
            }
            // The devices themselves go with the machine, on the VMM thread.
            live
        });
        drop(vcpu.join().expect("the confined thread"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
