//! A forbidden system call is fatal in every thread kind. Test builds of cgvm carry a hook
//! (the devices crate's `test-hooks` feature): `CGVM_TEST_SECCOMP_VIOLATION=<kind>` makes a
//! thread of that kind call something its filter forbids right after installing it. For each
//! kind the machine is given what starts such a thread (a disk of the right engine, a tap in
//! a network namespace, passt, a vsock, an entropy device, the API socket) and the probe
//! guest the check that activates the device; the process must die of SIGSYS, and with
//! `--seccomp-log` first name the kind and the call. Without `--seccomp-log` it dies of SIGSYS
//! without a word; with `--no-seccomp` the hook never fires and the run ends normally.

mod common;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::netns::NetNs;
use common::*;

const MAC: &str = "02:00:00:00:00:05";

/// The calls the hook makes: the first of these the kind's filter forbids.
const HOOK_CALLS: [&str; 3] = ["getppid", "uname", "acct"];

/// How one machine ended.
struct Died {
    status: ExitStatus,
    stderr: String,
    console: String,
}

impl Died {
    fn both(&self) -> String {
        format!(
            "{:?}\n--- stderr\n{}\n--- console\n{}",
            self.status, self.stderr, self.console
        )
    }
}

/// A disk image of 8 MiB in `dir`.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create the image");
    f.set_len(8 << 20).expect("size the image");
    p
}

/// Runs `cgvm ARGS` (inside `ns` when given) with the hook set to `kind` (None: unset), its
/// console in `dir`, and waits for it (90 s at most).
fn run_cgvm(ns: Option<&NetNs>, dir: &Path, kind: Option<&str>, args: &[String]) -> Died {
    let bin = Path::new(env!("CARGO_BIN_EXE_cgvm"));
    let mut cmd = match ns {
        Some(ns) => ns.command(bin),
        None => Command::new(bin),
    };
    let stderr = dir.join("stderr.txt");
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    match kind {
        Some(k) => cmd.env("CGVM_TEST_SECCOMP_VIOLATION", k),
        None => cmd.env_remove("CGVM_TEST_SECCOMP_VIOLATION"),
    };
    // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits: no
    // core file for the SIGSYS the test provokes.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn cgvm");
    let status = wait_with_limit(&mut child, Duration::from_secs(90));
    let console = std::fs::read_to_string(dir.join("console.txt")).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr).unwrap_or_default();
    let Some(status) = status else {
        panic!("cgvm still running after 90 s\n--- stderr\n{stderr}\n--- console\n{console}");
    };
    Died {
        status,
        stderr,
        console,
    }
}

/// `run --kernel PROBE --console file:DIR/console.txt --cmdline CMDLINE` with `extra`.
fn run_args(dir: &Path, transport: &str, cmdline: &str, extra: &[String]) -> Vec<String> {
    let mut v = probe_run_args(&dir.join("console.txt"));
    v.extend([
        "--transport".to_string(),
        transport.to_string(),
        "--cmdline".to_string(),
        format!("{cmdline} probe.transport={transport}"),
    ]);
    v.extend_from_slice(extra);
    v
}

/// The process died of SIGSYS after the `--seccomp-log` line naming `kind` and a call the
/// hook makes; nothing else was reported as forbidden.
fn assert_killed_as(kind: &str, d: &Died) {
    assert_eq!(
        d.status.signal(),
        Some(libc::SIGSYS),
        "{kind}: not killed by SIGSYS: {}",
        d.both()
    );
    let lines: Vec<&str> = d
        .stderr
        .lines()
        .filter(|l| l.starts_with("cgvm: seccomp: "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{kind}: expected one seccomp report: {}",
        d.both()
    );
    let line = lines[0];
    assert!(
        line.contains(&format!("a thread of kind '{kind}' made system call ")),
        "{kind}: another thread kind was stopped: {}",
        d.both()
    );
    let call = line
        .split("made system call ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_default();
    assert!(
        HOOK_CALLS.contains(&call),
        "{kind}: the report names {call:?}, not a call of the hook: {}",
        d.both()
    );
    assert!(
        line.ends_with("which its filter forbids; the process stops"),
        "{kind}: {}",
        d.both()
    );
}

/// A device kind: the hook fires in the device thread the guest's `check` (with the probe's
/// `options`) starts, on both transports; the guest ran up to the check, which never
/// finished. `devices` gives the device options for a run whose scratch directory it gets.
fn device_kind_is_fatal(
    kind: &str,
    check: &str,
    options: &str,
    devices: impl Fn(&Path) -> Vec<String>,
    ns: Option<&NetNs>,
) {
    for transport in ["mmio", "pci"] {
        let d = scratch(&format!("seccomp-kill-{kind}-{transport}"));
        let mut extra = devices(&d);
        extra.push("--seccomp-log".into());
        let cmdline = format!("probe.tests=boot,{check} {options}");
        let args = run_args(&d, transport, &cmdline, &extra);
        let died = run_cgvm(ns, &d, Some(kind), &args);
        assert_killed_as(kind, &died);
        assert!(
            died.console.contains("probe: boot ok"),
            "{kind} on {transport}: the guest did not run: {}",
            died.both()
        );
        assert!(
            !died.console.contains(&format!("probe: {check} ok"))
                && !died.console.contains("passed"),
            "{kind} on {transport}: the check finished: {}",
            died.both()
        );
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_forbidden_call_in_the_vmm_thread_is_fatal() {
    let d = scratch("seccomp-kill-vmm");
    let args = run_args(&d, "mmio", "probe.tests=boot", &strings(&["--seccomp-log"]));
    let died = run_cgvm(None, &d, Some("vmm"), &args);
    assert_killed_as("vmm", &died);
}

#[test]
fn a_forbidden_call_in_a_vcpu_thread_is_fatal() {
    let d = scratch("seccomp-kill-vcpu");
    let args = run_args(&d, "mmio", "probe.tests=boot", &strings(&["--seccomp-log"]));
    let died = run_cgvm(None, &d, Some("vcpu"), &args);
    assert_killed_as("vcpu", &died);
    // The vCPU confines itself before it first enters the guest.
    assert!(
        !died.console.contains("probe: started"),
        "the guest ran: {}",
        died.both()
    );
}

#[test]
fn a_forbidden_call_in_the_api_thread_is_fatal() {
    let d = scratch("seccomp-kill-api");
    let sock = d.join("api.sock");
    let args = strings(&[
        "serve",
        "--api-sock",
        sock.to_str().expect("utf-8"),
        "--seccomp-log",
    ]);
    let died = run_cgvm(None, &d, Some("api"), &args);
    assert_killed_as("api", &died);
}

#[test]
fn a_forbidden_call_in_the_passt_log_thread_is_fatal() {
    if passt_missing() {
        return;
    }
    let d = scratch("seccomp-kill-passt-log");
    let args = run_args(
        &d,
        "mmio",
        "probe.tests=boot",
        &strings(&["--net", &format!("user,mac={MAC}"), "--seccomp-log"]),
    );
    let died = run_cgvm(None, &d, Some("passt-log"), &args);
    assert_killed_as("passt-log", &died);
}

#[test]
fn a_forbidden_call_in_a_sync_disk_thread_is_fatal() {
    device_kind_is_fatal(
        "virtio-blk-sync",
        "blk",
        "",
        |d| {
            let disk = image(d, "sync.img");
            strings(&["--disk", &format!("{},engine=sync", disk.display())])
        },
        None,
    );
}

#[test]
fn a_forbidden_call_in_a_uring_disk_thread_is_fatal() {
    device_kind_is_fatal(
        "virtio-blk-uring",
        "blk",
        "",
        |d| {
            // persist: an ephemeral disk's sparse overlay would use the sync engine.
            let disk = image(d, "uring.img");
            strings(&[
                "--disk",
                &format!("{},persist,engine=uring", disk.display()),
            ])
        },
        None,
    );
}

#[test]
fn a_forbidden_call_in_a_tap_net_thread_is_fatal() {
    let ns = NetNs::new();
    ns.tap("tapk", Some("10.0.2.2/24"), &[]);
    device_kind_is_fatal(
        "virtio-net-tap",
        "net",
        "",
        |_| strings(&["--net", &format!("tap:tapk,mac={MAC}")]),
        Some(&ns),
    );
}

#[test]
fn a_forbidden_call_in_a_passt_net_thread_is_fatal() {
    if passt_missing() {
        return;
    }
    device_kind_is_fatal(
        "virtio-net-passt",
        "net",
        "probe.net=dhcp",
        |_| strings(&["--net", &format!("user,mac={MAC}")]),
        None,
    );
}

#[test]
fn a_forbidden_call_in_the_vsock_thread_is_fatal() {
    // A machine killed by a signal leaves its socket behind: one per run.
    device_kind_is_fatal(
        "virtio-vsock",
        "vsock",
        "",
        |d| strings(&["--vsock", &format!("3,uds={}", d.join("v.sock").display())]),
        None,
    );
}

#[test]
fn a_forbidden_call_in_the_entropy_thread_is_fatal() {
    device_kind_is_fatal("virtio-rng", "rng", "", |_| strings(&["--rng"]), None);
}

#[test]
fn without_seccomp_log_a_forbidden_call_kills_without_a_report() {
    let d = scratch("seccomp-kill-silent");
    let args = run_args(&d, "mmio", "probe.tests=boot,rng", &strings(&["--rng"]));
    let died = run_cgvm(None, &d, Some("virtio-rng"), &args);
    assert_eq!(
        died.status.signal(),
        Some(libc::SIGSYS),
        "not killed by SIGSYS: {}",
        died.both()
    );
    assert!(
        !died.stderr.contains("cgvm: seccomp: "),
        "a report without --seccomp-log: {}",
        died.both()
    );
    assert!(
        died.console.contains("probe: boot ok") && !died.console.contains("probe: rng ok"),
        "{}",
        died.both()
    );
}

#[test]
fn with_no_seccomp_the_hook_never_fires() {
    // Every kind this machine has, asked for one after the other: with no filter installed,
    // the hook (which runs right after a filter is installed) never runs.
    for kind in ["virtio-rng", "vcpu", "vmm"] {
        let d = scratch(&format!("seccomp-kill-off-{kind}"));
        let args = run_args(
            &d,
            "mmio",
            "probe.tests=boot,rng",
            &strings(&["--rng", "--no-seccomp"]),
        );
        let r = run_cgvm(None, &d, Some(kind), &args);
        assert_eq!(r.status.code(), Some(0), "{kind}: {}", r.both());
        assert!(
            r.console.contains("probe: 2 passed, 0 failed"),
            "{kind}: {}",
            r.both()
        );
        assert!(
            !r.stderr.contains("cgvm: seccomp: "),
            "{kind}: {}",
            r.both()
        );
    }
}
