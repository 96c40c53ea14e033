//! `cgvm jail` (run as root): the jailed cgvm boots the probe guest from inside its chroot, as
//! the given uid/gid, in its cgroup with the limits set, and a memory.max below what the VM
//! needs ends the run with a clear error instead of a hang.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const NOBODY: &str = "65534";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// None when /sys/fs/cgroup is a cgroup v2 hierarchy offering `controllers`; else why not.
fn cgroup2_lacks(controllers: &[&str]) -> Option<String> {
    let c = c"/sys/fs/cgroup";
    // SAFETY: a zeroed statfs is a valid out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated; statfs writes only into `st`.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type as i64 != 0x6367_7270 {
        return Some("/sys/fs/cgroup is not a cgroup2 mount on this host".into());
    }
    let have = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    let subtree = "/sys/fs/cgroup/cgroup.subtree_control";
    let enabled = std::fs::read_to_string(subtree).unwrap_or_default();
    for c in controllers {
        if !have.split_whitespace().any(|h| h == *c) {
            return Some(format!(
                "the cgroup2 root lacks the {c} controller ({have})"
            ));
        }
        // The jail enables the controller for its cgroups; where the root holds processes
        // (the root of a container's cgroup namespace), the kernel refuses that (EBUSY).
        if !enabled.split_whitespace().any(|e| e == *c) {
            if let Err(e) = std::fs::write(subtree, format!("+{c}")) {
                return Some(format!(
                    "the {c} controller cannot be enabled for child cgroups in {subtree}: {e}"
                ));
            }
        }
    }
    None
}

/// A jail command for the probe guest with `cgvm run` arguments `run_args`.
fn jail_cmd(base: &Path, id: &str, jail_args: &[&str], run_args: &[&str]) -> std::process::Command {
    let mut c = cgvm();
    c.args([
        "jail",
        "--id",
        id,
        "--uid",
        NOBODY,
        "--gid",
        NOBODY,
        "--chroot-base",
    ])
    .arg(base)
    .args(jail_args)
    .arg("--")
    .arg("run")
    .arg("--kernel")
    .arg(probe_elf())
    .args(run_args);
    c
}

/// Removes the jail's cgroup (if a test left it) and the scratch directory.
fn clean_up(id: &str, dir: &Path) {
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup/cgvm").join(id));
    let _ = std::fs::remove_dir_all(dir);
}

/// Spawns `cmd` and reads its stdout lines on a thread.
fn spawn_lines(mut cmd: std::process::Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cgvm jail");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    s.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

#[test]
fn jailed_probe_runs_as_the_given_user_inside_its_chroot_and_cgroup() {
    assert!(is_root(), "the jail tests run as root");
    let dir = scratch("jail-live");
    let id = format!("live-{}", std::process::id());
    let cg_reason = cgroup2_lacks(&["memory", "pids"]);
    let mut jail_args: Vec<&str> = Vec::new();
    if cg_reason.is_none() {
        jail_args.extend([
            "--cgroup",
            "memory.max=536870912",
            "--cgroup",
            "pids.max=64",
        ]);
    } else {
        println!(
            "cgroup assertions skipped: {}",
            cg_reason.as_deref().unwrap_or("")
        );
    }
    let cmd = jail_cmd(
        &dir,
        &id,
        &jail_args,
        &[
            "--console",
            "file:/nowhere/console.log",
            "--cmdline",
            "probe.tests=boot probe.exit=hang",
            "--memory",
            "128",
            "--timeout",
            "60",
        ],
    );
    let (mut child, lines) = spawn_lines(cmd);
    let root = dir.join(&id).join("root");
    let first = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("root line");
    assert!(
        first.starts_with(&format!(
            "cgvm jail: root {}; console {}",
            root.display(),
            root.join("console.log").display()
        )),
        "{first}"
    );
    let second = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("pid line");
    let pid: u32 = second
        .strip_prefix("cgvm jail: pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("expected the pid line, got {second}"));
    let console = root.join("console.log");
    wait_for("the probe's summary", Duration::from_secs(30), || {
        std::fs::read_to_string(&console).is_ok_and(|s| s.contains("probe: 1 passed, 0 failed"))
    });
    assert!(std::fs::read_to_string(&console)
        .expect("console")
        .contains("probe: boot ok"));

    // The live process: its user and group, its root directory, its executable.
    assert_eq!(status_field(pid, "Uid:"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "Gid:"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "Groups:"), "65534");
    // Its main thread runs under the vmm filter, as outside a jail.
    assert_eq!(status_field(pid, "Seccomp:"), "2");
    assert_eq!(status_field(pid, "Seccomp_filters:"), "1");
    let seen = std::fs::metadata(format!("/proc/{pid}/root/.")).expect("its root");
    let jail = std::fs::metadata(&root).expect("the jail root");
    assert_eq!(
        (seen.dev(), seen.ino()),
        (jail.dev(), jail.ino()),
        "/proc/{pid}/root is not the jail"
    );
    assert_eq!(
        dir_listing(&PathBuf::from(format!("/proc/{pid}/root"))),
        dir_listing(&root)
    );
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    assert_eq!(exe, Path::new("/cgvm"), "cgvm runs the jail's copy");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    assert!(environ.is_empty(), "the environment is cleared");

    // Only what the VM needs is in the jail.
    let mut expected = vec![
        "cgvm",
        "console.log",
        "dev",
        "probe-guest.elf",
        "run",
        "tmp",
    ];
    for libdir in ["lib", "lib64", "usr"] {
        if root.join(libdir).exists() {
            expected.push(libdir);
        }
    }
    expected.sort_unstable();
    assert_eq!(dir_listing(&root), expected);
    assert_eq!(dir_listing(&root.join("dev")), ["kvm", "net"]);
    let kvm = std::fs::metadata(root.join("dev/kvm")).expect("dev/kvm");
    assert_eq!(
        (kvm.uid(), kvm.gid(), kvm.mode() & 0o7777),
        (65534, 65534, 0o600)
    );
    assert_eq!(kvm.rdev(), libc::makedev(10, 232));
    let tun = std::fs::metadata(root.join("dev/net/tun")).expect("dev/net/tun");
    assert_eq!(tun.rdev(), libc::makedev(10, 200));

    if cg_reason.is_none() {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let rel = format!("/cgvm/{id}");
        assert!(
            cgroup
                .lines()
                .any(|l| l.starts_with("0::") && l.ends_with(&rel)),
            "{cgroup}"
        );
        let cg = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
        assert_eq!(
            std::fs::read_to_string(cg.join("memory.max"))
                .expect("memory.max")
                .trim(),
            "536870912"
        );
        assert_eq!(
            std::fs::read_to_string(cg.join("pids.max"))
                .expect("pids.max")
                .trim(),
            "64"
        );
    }

    // SAFETY: kill takes integers; `pid` is the jailed cgvm this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let status = wait_with_limit(&mut child, Duration::from_secs(20)).expect("the jail ends");
    assert_eq!(
        status.code(),
        Some(137),
        "the jail reports cgvm's SIGKILL as 128+9"
    );
    if cg_reason.is_none() {
        assert!(
            !Path::new("/sys/fs/cgroup/cgvm").join(&id).exists(),
            "the jail removes its cgroup"
        );
    }
    clean_up(&id, &dir);
}

#[test]
fn jailed_probe_boot_exits_zero_in_a_new_pid_namespace() {
    assert!(is_root(), "the jail tests run as root");
    let dir = scratch("jail-boot");
    let id = format!("boot-{}", std::process::id());
    // A Firecracker filter file (cgvm's own lists) goes into the jail with the kernel.
    let filters = dir.join("filters.json");
    let mut report = cgvm();
    report.args(["seccomp-report", "--firecracker-json"]);
    let r = run_with_limit(report, Duration::from_secs(10));
    assert_eq!(r.status, Some(0), "{}", r.both());
    std::fs::write(&filters, &r.stdout).expect("write the filter file");
    let cmd = jail_cmd(
        &dir,
        &id,
        &["--new-pid-ns", "--resource-limit", "no-file=256"],
        &[
            "--console",
            "tty",
            "--cmdline",
            "probe.tests=boot probe.mem=64",
            "--memory",
            "64",
            "--timeout",
            "30",
            "--seccomp-filter",
            filters.to_str().expect("utf-8"),
        ],
    );
    let r = run_with_limit(cmd, Duration::from_secs(60));
    assert_eq!(r.status, Some(0), "{}", r.both());
    assert!(r.stdout.contains("probe: boot ok"), "{}", r.both());
    assert!(
        r.stdout.contains("probe: 1 passed, 0 failed"),
        "{}",
        r.both()
    );
    assert!(r.stdout.contains("cgvm jail: pid "), "{}", r.both());
    assert!(dir.join(&id).join("root/proc").is_dir());
    assert!(dir.join(&id).join("root/filters.json").is_file());
    clean_up(&id, &dir);
}

#[test]
fn memory_max_below_what_the_guest_needs_ends_the_run_with_a_clear_error() {
    assert!(is_root(), "the jail tests run as root");
    if let Some(why) = cgroup2_lacks(&["memory"]) {
        println!("skipped: {why}");
        return;
    }
    let dir = scratch("jail-oom");
    let id = format!("oom-{}", std::process::id());
    // cgvm does not prefault guest memory; loading a 96 MiB initrd makes it touch 96 MiB.
    let initrd = dir.join("big.initrd");
    std::fs::File::create(&initrd)
        .and_then(|f| f.set_len(96 << 20))
        .expect("initrd");
    let base = dir.join("jails");
    std::fs::create_dir(&base).expect("mkdir");
    let swap = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    let mut jail_args = vec!["--cgroup", "memory.max=16777216"];
    if swap.lines().count() > 1 {
        jail_args.extend(["--cgroup", "memory.swap.max=0"]);
    }
    let mut cmd = jail_cmd(
        &base,
        &id,
        &jail_args,
        &[
            "--console",
            "tty",
            "--cmdline",
            "probe.tests=boot",
            "--memory",
            "256",
            "--timeout",
            "30",
        ],
    );
    cmd.arg("--initrd").arg(&initrd);
    let r = run_with_limit(cmd, Duration::from_secs(60));
    assert_ne!(r.status, Some(0), "{}", r.both());
    assert!(!r.stdout.contains("probe: 1 passed"), "{}", r.both());
    let oom = r.stderr.contains("OOM killer") && r.stderr.contains("memory.max (16777216)");
    let alloc = r.status == Some(125) && r.stderr.contains("cgvm: error");
    assert!(oom || alloc, "no clear error: {}", r.both());
    assert!(!Path::new("/sys/fs/cgroup/cgvm").join(&id).exists());
    clean_up(&id, &dir);
}

#[test]
fn bad_setups_are_refused_before_anything_runs() {
    assert!(is_root(), "the jail tests run as root");
    let dir = scratch("jail-refused");
    let id = "refused";
    // A cgroup root that is not a cgroup2 mount.
    let not_cgroup = dir.join("not-a-cgroup");
    std::fs::create_dir(&not_cgroup).expect("mkdir");
    let cmd = jail_cmd(
        &dir,
        id,
        &[
            "--cgroup",
            "pids.max=64",
            "--cgroup-root",
            not_cgroup.to_str().expect("utf-8"),
        ],
        &["--cmdline", "probe.tests=boot"],
    );
    let r = run_with_limit(cmd, Duration::from_secs(30));
    assert_eq!(r.status, Some(125), "{}", r.both());
    assert!(
        r.stderr.contains("cgroup v2 is not mounted at"),
        "{}",
        r.both()
    );
    assert!(!r.stdout.contains("cgvm jail: pid"), "{}", r.both());

    // The jail root now exists: a second jail with this id is refused.
    let r = run_with_limit(
        jail_cmd(&dir, id, &[], &["--cmdline", "probe.tests=boot"]),
        Duration::from_secs(30),
    );
    assert_eq!(r.status, Some(125), "{}", r.both());
    assert!(r.stderr.contains("already exists"), "{}", r.both());

    // What cannot work in a jail is named.
    let mut c = cgvm();
    c.args(["jail", "--uid", NOBODY, "--gid", NOBODY, "--chroot-base"])
        .arg(&dir)
        .args(["--id", "net", "--", "run", "--kernel"])
        .arg(probe_elf())
        .args(["--net", "user"]);
    let r = run_with_limit(c, Duration::from_secs(30));
    assert_eq!(r.status, Some(125), "{}", r.both());
    assert!(
        r.stderr.contains("passt is not in the jail"),
        "{}",
        r.both()
    );
    clean_up(id, &dir);
}
