//! `cgvm doctor`: what this host offers a VMM (KVM and its kind, TUN, seccomp, io_uring,
//! passt), then a boot of the probe guest built into this binary, with its verdict and the
//! boot timeline.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm::builder::{build, ConsoleIo};
use vmm::config::{ConsoleConfig, VmConfig};
use vmm::outcome::RunOutcome;
use vmm::timeline::Timeline;

/// The probe guest, built by build.rs from resources/probe-guest.
static PROBE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

/// What the host's KVM is.
#[derive(Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// Intel VT-x or AMD-V.
    Hardware(&'static str),
    /// The PVM module: guest ring 0 is emulated.
    Pvm,
    /// KVM works but its kind is unknown.
    Unknown,
}

/// Tells the KVM kind from /sys/module and the CPU flags in /proc/cpuinfo.
pub fn kvm_kind(sys_module: &Path, cpuinfo: &str) -> KvmKind {
    if sys_module.join("kvm_pvm").exists() {
        return KvmKind::Pvm;
    }
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>();
    if flags.contains(&"vmx") || sys_module.join("kvm_intel").exists() {
        KvmKind::Hardware("Intel VT-x")
    } else if flags.contains(&"svm") || sys_module.join("kvm_amd").exists() {
        KvmKind::Hardware("AMD-V")
    } else {
        KvmKind::Unknown
    }
}

struct Report {
    problems: usize,
}

impl Report {
    fn line(&mut self, ok: bool, what: &str, detail: &str) {
        println!("  [{}] {what}: {detail}", if ok { " ok " } else { "FAIL" });
        if !ok {
            self.problems += 1;
        }
    }
    fn note(&self, what: &str, detail: &str) {
        println!("  [note] {what}: {detail}");
    }
}

fn check_kvm(r: &mut Report) -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Err(e) => {
            r.line(
                false,
                "/dev/kvm",
                &format!(
                    "cannot open: {e} (load kvm_intel/kvm_amd, or add this user to the kvm group)"
                ),
            );
            false
        }
        Ok(_) => {
            let api = kvm_ioctls::Kvm::new().map(|k| k.get_api_version());
            match api {
                Ok(12) => {}
                Ok(v) => {
                    r.line(false, "/dev/kvm", &format!("KVM API version {v}, need 12"));
                    return false;
                }
                Err(e) => {
                    r.line(false, "/dev/kvm", &format!("KVM does not answer: {e}"));
                    return false;
                }
            }
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            match kvm_kind(Path::new("/sys/module"), &cpuinfo) {
                KvmKind::Hardware(k) => r.line(
                    true,
                    "/dev/kvm",
                    &format!("KVM API 12 on {k}: any x86_64 guest boots"),
                ),
                KvmKind::Pvm => {
                    r.line(
                        true,
                        "/dev/kvm",
                        "KVM API 12 through the PVM module (no hardware virtualization)",
                    );
                    r.note("PVM", "guest ring-0 code is emulated instruction by instruction: the probe guest runs, a stock Linux kernel stops during early boot; boot Linux on a host with VT-x/AMD-V");
                }
                KvmKind::Unknown => {
                    r.line(true, "/dev/kvm", "KVM API 12 (virtualization kind unknown)")
                }
            }
            true
        }
    }
}

fn check_tun(r: &mut Report) {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => r.line(true, "/dev/net/tun", "can be opened (TAP networking)"),
        Err(e) => r.line(
            false,
            "/dev/net/tun",
            &format!("{e}: TAP networking unavailable (use --net user with passt)"),
        ),
    }
}

fn check_seccomp(r: &mut Report) {
    // SAFETY: PR_GET_SECCOMP takes no pointer arguments.
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    let actions =
        std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    if mode < 0 {
        r.line(
            false,
            "seccomp",
            "not supported by this kernel: device threads cannot be confined",
        );
    } else if !actions.contains("kill_process") {
        r.line(
            false,
            "seccomp",
            "the kernel lacks SECCOMP_RET_KILL_PROCESS",
        );
    } else {
        r.line(
            true,
            "seccomp",
            &format!("filters available (this process: mode {mode})"),
        );
    }
}

fn check_io_uring(r: &mut Report) {
    let mut params = [0u8; 120]; // struct io_uring_params
                                 // SAFETY: io_uring_setup reads/writes the 120-byte params struct we own.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: fd is a new io_uring descriptor we own.
        drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        r.line(true, "io_uring", "available (block engine=uring)");
    } else {
        let e = std::io::Error::last_os_error();
        r.line(
            false,
            "io_uring",
            &format!("io_uring_setup failed: {e} (block devices fall back to engine=sync)"),
        );
    }
}

fn check_passt(r: &mut Report) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("passt").is_file()))
        .unwrap_or(false);
    if found {
        r.line(true, "passt", "installed (rootless networking)");
    } else {
        r.line(
            false,
            "passt",
            "not installed: rootless networking needs it (apt-get install passt)",
        );
    }
}

/// A console that keeps what the guest prints.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn boot_probe(r: &mut Report) {
    // The probe lives in a memfd so nothing is left on disk.
    // SAFETY: memfd_create reads the NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"cgvm-probe".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        r.line(
            false,
            "probe guest",
            &format!("memfd_create: {}", std::io::Error::last_os_error()),
        );
        return;
    }
    // SAFETY: fd is a new descriptor we own.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(memfd);
    if let Err(e) = file.write_all(PROBE_ELF) {
        r.line(
            false,
            "probe guest",
            &format!("cannot stage the probe: {e}"),
        );
        return;
    }
    let config = VmConfig {
        kernel: format!("/proc/self/fd/{}", file.as_raw_fd()).into(),
        cmdline: "probe.tests=boot probe.cpus=2 probe.mem=128".into(),
        vcpus: 2,
        mem_mib: 128,
        console: ConsoleConfig::None,
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let out = Captured::default();
    let timeline = Arc::new(Timeline::new());
    let console = ConsoleIo {
        output: Box::new(out.clone()),
        read_stdin: false,
    };
    let outcome = match build(&config, timeline.clone(), console, Default::default()) {
        Ok(vmm) => vmm.run(),
        Err(e) => {
            r.line(false, "probe guest", &format!("cannot start: {e}"));
            return;
        }
    };
    let text =
        String::from_utf8_lossy(&out.0.lock().unwrap_or_else(|e| e.into_inner())).to_string();
    for l in text.lines().filter(|l| l.starts_with("probe:")) {
        println!("      {}", l.trim_end());
    }
    let passed = outcome == RunOutcome::Guest(devices::stop::GuestStop::ExitDevice(0));
    r.line(passed, "probe guest", &format!("{outcome}"));
    for l in timeline
        .render()
        .lines()
        .filter(|l| !l.contains("monotonic"))
    {
        println!("      {}", l.trim_start_matches("cgvm: "));
    }
}

/// Runs every check; returns 0 when the host can run microVMs with every feature.
pub fn run() -> i32 {
    println!("cgvm doctor: can this host run microVMs?");
    let mut r = Report { problems: 0 };
    let kvm_ok = check_kvm(&mut r);
    check_tun(&mut r);
    check_seccomp(&mut r);
    check_io_uring(&mut r);
    check_passt(&mut r);
    if kvm_ok {
        println!("  booting the built-in probe guest (2 vCPUs, 128 MiB):");
        boot_probe(&mut r);
    }
    if r.problems == 0 {
        println!("cgvm doctor: all checks passed");
        0
    } else {
        println!("cgvm doctor: {} problem(s) found", r.problems);
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_kind_prefers_pvm_then_cpu_flags() {
        let dir = std::env::temp_dir().join(format!("cgvm-doctor-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(
            kvm_kind(&dir, "flags\t: fpu vme vmx sse"),
            KvmKind::Hardware("Intel VT-x")
        );
        assert_eq!(
            kvm_kind(&dir, "flags\t: fpu svm"),
            KvmKind::Hardware("AMD-V")
        );
        assert_eq!(kvm_kind(&dir, "flags\t: fpu sse"), KvmKind::Unknown);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(kvm_kind(&dir, "flags\t: fpu vmx"), KvmKind::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
