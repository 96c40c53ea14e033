//! vCPUs: their boot state (CPUID, MSRs, registers, LAPIC) and the thread that runs each one.
//!
//! A vCPU thread loops on KVM_RUN and turns port I/O and MMIO exits into bus accesses.
//! Anything it cannot continue from (triple fault, KVM internal or emulation error, failed
//! entry) ends the run with a [`VcpuStop`] that names the exit, the vCPU, RIP and the
//! instruction bytes there. The VMM stops vCPU threads by setting the run's stop flag and
//! kicking them with a signal until they leave KVM_RUN.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use boot::loader::EntryMode;
use devices::bus::Bus;
use devices::stop::StopNotifier;
use kvm_bindings::{kvm_lapic_state, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::fault;
use super::vm::Vm;
use crate::metrics::VcpuExitMetrics;
use crate::timeline::Timeline;

/// LAPIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// KVM_EXIT_INTERNAL_ERROR sub-errors (linux/kvm.h).
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_SIMUL_EX: u32 = 2;
const KVM_INTERNAL_ERROR_DELIVERY_EV: u32 = 3;
/// KVM_SYSTEM_EVENT types.
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {vcpu}: {what} failed: {source}")]
pub struct VcpuError {
    vcpu: u8,
    what: &'static str,
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// A vCPU stop the VMM cannot continue from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuStop {
    /// The vCPU index.
    pub vcpu: u8,
    /// The exit reason, in words ("triple fault", "KVM internal error: emulation failure"...).
    pub reason: String,
    /// RIP at the stop (0 when registers could not be read).
    pub rip: u64,
    /// Instruction bytes at RIP, as hex, or "unavailable".
    pub bytes: String,
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vCPU {} stopped: {} at RIP {:#018x}, instruction bytes: {}",
            self.vcpu, self.reason, self.rip, self.bytes
        )
    }
}

/// What the vCPU threads share with the VMM.
pub struct VcpuShared {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Guest memory (to describe faults).
    pub memory: GuestMemoryMmap,
    /// Stops requested by devices (exit device, poweroff, reset, panic).
    pub guest_stop: StopNotifier,
    /// Stops the vCPUs hit themselves; the first wins.
    pub vcpu_stop: Mutex<Option<VcpuStop>>,
    /// Readable when `vcpu_stop` is set.
    pub vcpu_event: EventFd,
    /// Set by the VMM to end every vCPU loop.
    pub stopping: AtomicBool,
    /// The run's timeline.
    pub timeline: Arc<Timeline>,
    /// Exits by kind, for the metrics file.
    pub exits: Arc<VcpuExitMetrics>,
    /// Pause requests and how many vCPU threads are parked.
    pause: Mutex<PauseState>,
    /// Signalled when `pause` changes.
    pause_changed: Condvar,
}

/// Whether the vCPUs should be parked, and how many are.
#[derive(Debug, Default)]
struct PauseState {
    requested: bool,
    parked: usize,
}

impl VcpuShared {
    /// Shared state over the given buses.
    pub fn new(
        pio: Bus,
        mmio: Bus,
        memory: GuestMemoryMmap,
        guest_stop: StopNotifier,
        timeline: Arc<Timeline>,
        exits: Arc<VcpuExitMetrics>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            pio,
            mmio,
            memory,
            guest_stop,
            vcpu_stop: Mutex::new(None),
            vcpu_event: EventFd::new(EFD_NONBLOCK)?,
            stopping: AtomicBool::new(false),
            timeline,
            exits,
            pause: Mutex::new(PauseState::default()),
            pause_changed: Condvar::new(),
        })
    }

    fn pause_state(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every vCPU thread to park; the caller kicks them out of KVM_RUN and then waits
    /// with [`VcpuShared::wait_parked`].
    pub fn request_pause(&self) {
        self.pause_state().requested = true;
    }

    /// Waits until `count` vCPU threads are parked; false if they were not within `limit`
    /// (a vCPU stuck in the host kernel) or if a stop came first.
    pub fn wait_parked(&self, count: usize, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut st = self.pause_state();
        while st.parked < count && !self.should_stop() {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .pause_changed
                .wait_timeout(st, (deadline - now).min(Duration::from_millis(10)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.parked >= count
    }

    /// Lets parked vCPU threads run again.
    pub fn resume(&self) {
        self.pause_state().requested = false;
        self.pause_changed.notify_all();
    }

    /// Whether a pause is requested.
    pub fn pause_requested(&self) -> bool {
        self.pause_state().requested
    }

    /// Wakes parked vCPU threads so that they see a stop.
    pub fn wake_parked(&self) {
        let _guard = self.pause_state();
        self.pause_changed.notify_all();
    }

    /// Called by a vCPU thread between KVM_RUN calls: parks while a pause is requested.
    fn park_if_paused(&self) {
        let mut st = self.pause_state();
        if !st.requested {
            return;
        }
        st.parked += 1;
        self.pause_changed.notify_all();
        while st.requested && !self.should_stop() {
            st = self
                .pause_changed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.parked -= 1;
        self.pause_changed.notify_all();
    }

    fn should_stop(&self) -> bool {
        self.stopping.load(Ordering::Acquire) || self.guest_stop.reason().is_some()
    }

    fn record_stop(&self, stop: VcpuStop) {
        let mut s = self.vcpu_stop.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_none() {
            *s = Some(stop);
            if let Err(e) = self.vcpu_event.write(1) {
                log::error!("cannot signal the vCPU stop: {e}");
            }
        }
    }
}

/// How the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// Entry mode.
    pub mode: EntryMode,
    /// First instruction.
    pub entry: GuestAddress,
    /// Zero page (Linux64) or hvm_start_info (PVH).
    pub boot_info: GuestAddress,
}

/// Creates vCPU `id` of `count` and gives it its boot state; `boot` is set for vCPU 0 only,
/// the others wait for the guest's INIT/SIPI in the in-kernel LAPIC.
pub fn create_vcpu(
    vm: &Vm,
    id: u8,
    count: u8,
    boot: Option<BootEntry>,
) -> Result<VcpuFd, VcpuError> {
    let err = |what: &'static str| {
        move |e: kvm_ioctls::Error| VcpuError {
            vcpu: id,
            what,
            source: Box::new(e),
        }
    };
    let fd = vm
        .fd
        .create_vcpu(u64::from(id))
        .map_err(err("KVM_CREATE_VCPU"))?;
    let mut cpuid = vm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
    boot::cpuid::configure_cpuid(&mut cpuid, id, count).map_err(|e| VcpuError {
        vcpu: id,
        what: "CPUID setup",
        source: Box::new(e),
    })?;
    fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;

    // Only the MSRs this KVM knows: unknown ones would make KVM_SET_MSRS stop early.
    let supported = vm
        .kvm
        .get_msr_index_list()
        .map_err(err("KVM_GET_MSR_INDEX_LIST"))?;
    let wanted: Vec<_> = boot::regs::boot_msrs()
        .into_iter()
        .filter(|m| supported.as_slice().contains(&m.index))
        .collect();
    let msrs = Msrs::from_entries(&wanted).map_err(|e| VcpuError {
        vcpu: id,
        what: "MSR list",
        source: Box::new(e),
    })?;
    let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if set != wanted.len() {
        log::warn!("vCPU {id}: KVM took {set} of {} boot MSRs", wanted.len());
    }
    fd.set_fpu(&boot::regs::boot_fpu())
        .map_err(err("KVM_SET_FPU"))?;

    let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;

    if let Some(b) = boot {
        let mut sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        boot::regs::configure_sregs(&mut sregs, b.mode);
        fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
        fd.set_regs(&boot::regs::boot_regs(b.mode, b.entry, b.boot_info))
            .map_err(err("KVM_SET_REGS"))?;
    }
    Ok(fd)
}

/// Sets the delivery mode (bits 8-10) of a LAPIC LVT register.
fn set_lvt_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(&lapic.regs[reg..reg + 4]) {
        *d = *s as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (d, s) in lapic.regs[reg..reg + 4].iter_mut().zip(v.to_le_bytes()) {
        *d = s as libc::c_char;
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler; KVM_RUN returns EINTR when the signal arrives.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

/// Starts the thread that runs `fd` as vCPU `id`; it installs `filter` (the `vcpu` seccomp
/// policy) before its first KVM_RUN.
pub fn spawn(
    fd: VcpuFd,
    id: u8,
    shared: Arc<VcpuShared>,
    filter: Option<devices::seccomp::Prepared>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("cgvm-vcpu{id}"))
        .spawn(move || {
            if let Some(f) = filter {
                if let Err(e) = f.install() {
                    shared.record_stop(VcpuStop {
                        vcpu: id,
                        reason: e.to_string(),
                        rip: 0,
                        bytes: "unavailable".into(),
                    });
                    return;
                }
            }
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(fd, id, &shared)));
            if let Err(panic) = result {
                let msg = devices::panic_message(panic.as_ref());
                shared.record_stop(VcpuStop {
                    vcpu: id,
                    reason: format!("the vCPU thread panicked: {msg}"),
                    rip: 0,
                    bytes: "unavailable".into(),
                });
            }
        })
}

fn run(mut fd: VcpuFd, id: u8, shared: &VcpuShared) {
    while !shared.should_stop() {
        shared.park_if_paused();
        if shared.should_stop() {
            break;
        }
        if id == 0 {
            shared.timeline.first_entry();
        }
        let stop = match fd.run() {
            Ok(exit) => handle_exit(exit, id, shared),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                VcpuExitMetrics::inc(&shared.exits.interrupted);
                None
            }
            Err(e) => Some(StopKind::Plain(format!("KVM_RUN failed: {e}"))),
        };
        if let Some(kind) = stop {
            VcpuExitMetrics::inc(&shared.exits.fatal);
            let reason = match kind {
                StopKind::Plain(s) => s,
                StopKind::Internal => internal_error_text(&mut fd),
            };
            shared.record_stop(describe(&fd, id, &shared.memory, reason));
            return;
        }
    }
}

/// What ended a vCPU, before its registers are read.
enum StopKind {
    Plain(String),
    /// KVM_EXIT_INTERNAL_ERROR: the detail is in the kvm_run page.
    Internal,
}

fn handle_exit(exit: VcpuExit<'_>, id: u8, shared: &VcpuShared) -> Option<StopKind> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            VcpuExitMetrics::inc(&shared.exits.io_in);
            shared.pio.read(u64::from(port), data);
            None
        }
        VcpuExit::IoOut(port, data) => {
            VcpuExitMetrics::inc(&shared.exits.io_out);
            shared.pio.write(u64::from(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            VcpuExitMetrics::inc(&shared.exits.mmio_read);
            if !shared.mmio.read(addr, data) {
                log::debug!(
                    "vCPU {id}: read of {} bytes at unclaimed MMIO {addr:#x}",
                    data.len()
                );
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            VcpuExitMetrics::inc(&shared.exits.mmio_write);
            if !shared.mmio.write(addr, data) {
                log::debug!(
                    "vCPU {id}: write of {} bytes at unclaimed MMIO {addr:#x}",
                    data.len()
                );
            }
            None
        }
        VcpuExit::SystemEvent(kind, _) => {
            VcpuExitMetrics::inc(&shared.exits.system_event);
            use devices::stop::GuestStop;
            let s = match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => GuestStop::Poweroff,
                KVM_SYSTEM_EVENT_RESET => GuestStop::Reset,
                KVM_SYSTEM_EVENT_CRASH => GuestStop::Panic,
                other => return Some(StopKind::Plain(format!("unknown system event {other}"))),
            };
            shared.guest_stop.request(s);
            None
        }
        VcpuExit::Shutdown => Some(StopKind::Plain("triple fault (KVM_EXIT_SHUTDOWN)".into())),
        VcpuExit::Hlt => Some(StopKind::Plain("halted (KVM_EXIT_HLT)".into())),
        VcpuExit::FailEntry(reason, cpu) => Some(StopKind::Plain(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, host cpu {cpu})"
        ))),
        VcpuExit::InternalError => Some(StopKind::Internal),
        VcpuExit::Intr => {
            VcpuExitMetrics::inc(&shared.exits.interrupted);
            None
        }
        other => Some(StopKind::Plain(format!("unexpected exit {other:?}"))),
    }
}

/// Reads the registers and instruction bytes of a stopped vCPU.
fn describe(fd: &VcpuFd, id: u8, memory: &GuestMemoryMmap, reason: String) -> VcpuStop {
    let (rip, bytes) = match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => (
            r.rip,
            fault::hex_bytes(&fault::instruction_bytes(memory, &r, &s)),
        ),
        _ => (0, "unavailable (registers unreadable)".into()),
    };
    VcpuStop {
        vcpu: id,
        reason,
        rip,
        bytes,
    }
}

/// The text of a KVM_EXIT_INTERNAL_ERROR, read from the vCPU's kvm_run page.
fn internal_error_text(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR, KVM filled the `internal` member of the exit
    // union; it is plain integers, so reading it is valid whatever KVM wrote.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    internal_error_reason(internal.suberror, &internal.data[..n])
}

/// Formats KVM_EXIT_INTERNAL_ERROR's sub-error and data words.
pub fn internal_error_reason(suberror: u32, data: &[u64]) -> String {
    let what = match suberror {
        KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "cannot deliver an event",
        _ => "unknown sub-error",
    };
    let words: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
    if words.is_empty() {
        format!("KVM internal error, suberror {suberror} ({what})")
    } else {
        format!(
            "KVM internal error, suberror {suberror} ({what}), data [{}]",
            words.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_are_named() {
        let t = internal_error_reason(1, &[0x1, 0xffff_ffff_8100_0000]);
        assert!(t.contains("suberror 1 (emulation failure)"), "{t}");
        assert!(t.contains("0xffffffff81000000"), "{t}");
        assert!(internal_error_reason(3, &[]).contains("cannot deliver an event"));
        assert!(internal_error_reason(99, &[]).contains("unknown sub-error"));
    }

    #[test]
    fn vcpu_stop_reads_as_one_clear_line() {
        let s = VcpuStop {
            vcpu: 1,
            reason: "triple fault".into(),
            rip: 0x1000,
            bytes: "0f 0b".into(),
        };
        assert_eq!(
            s.to_string(),
            "vCPU 1 stopped: triple fault at RIP 0x0000000000001000, instruction bytes: 0f 0b"
        );
    }

    #[test]
    fn lvt_delivery_mode_is_set_without_touching_other_bits() {
        let mut l = kvm_lapic_state::default();
        l.regs[APIC_LVT0] = 0x55u8 as libc::c_char;
        l.regs[APIC_LVT0 + 2] = 0x01;
        set_lvt_mode(&mut l, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(l.regs[APIC_LVT0] as u8, 0x55);
        assert_eq!(l.regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(l.regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
