//! Every thread of a running VMM is confined, under its own kind's filter: the probe guest
//! with every device cgvm has (a disk on each I/O engine, an entropy device, a vsock, a tap
//! in a network namespace and a passt interface), on virtio-pci and on virtio-mmio, and the
//! API thread of `cgvm serve`. Each thread's `Seccomp:` and `Seccomp_filters:` lines are read
//! from /proc/<pid>/task/*/status.
//!
//! The main (VMM) thread, the vCPU threads, passt's log thread and the API thread each
//! install their own filter: one filter, mode 2. The VMM thread activates the devices (the
//! vCPUs only pass the guest's register writes on) after it installed its filter, so the
//! device threads it starts carry its filter and their own: two. With `--no-seccomp` no
//! thread has a filter.
//!
//! A device thread lives from the guest driver's DRIVER_OK to the device's reset, and each
//! probe check resets its device when done. The waiting loop of `probe.exit=hang` starts the
//! disks again, so their threads are there at the end; the vsock thread is there while its
//! check waits for the test's connection; the entropy and network checks are short, so they
//! are run many times over while a sampler reads the threads without pause. The probe's `net`
//! check drives only the first network interface, so each run sees one network thread: the
//! tap's on PCI (the tap is eth0), passt's on MMIO (passt is eth0).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::api::*;
use common::netns::NetNs;
use common::vsock::{connect, echo};
use common::*;

const TAP_MAC: &str = "02:00:00:00:00:05";
const USER_MAC: &str = "02:00:00:00:00:06";

/// One thread as /proc shows it.
#[derive(Debug, Clone)]
struct Thread {
    tid: u32,
    name: String,
    /// The `Seccomp:` line: 0 none, 2 filter mode.
    mode: u32,
    /// The `Seccomp_filters:` line: how many filters the thread carries.
    filters: u32,
}

/// Thread `tid` of `pid`; None when it ended meanwhile.
fn read_thread(pid: u32, tid: u32) -> Option<Thread> {
    let dir = PathBuf::from(format!("/proc/{pid}/task/{tid}"));
    let name = std::fs::read_to_string(dir.join("comm")).ok()?;
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let field = |key: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(Thread {
        tid,
        name: name.trim().to_string(),
        mode: field("Seccomp:")?,
        filters: field("Seccomp_filters:")?,
    })
}

/// The threads of `pid` now, by thread id.
fn snapshot(pid: u32) -> Vec<Thread> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut v: Vec<Thread> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter_map(|tid| read_thread(pid, tid))
        .collect();
    v.sort_by_key(|t| t.tid);
    v
}

fn count(threads: &[Thread], prefix: &str) -> usize {
    threads
        .iter()
        .filter(|t| t.name.starts_with(prefix))
        .count()
}

/// Whether `threads` has `n` threads named `prefix`*, each with its own filter installed (a
/// device thread started a moment ago may not have installed it yet).
fn settled(threads: &[Thread], prefix: &str, n: usize) -> bool {
    let named: Vec<_> = threads
        .iter()
        .filter(|t| t.name.starts_with(prefix))
        .collect();
    named.len() == n && named.iter().all(|t| t.filters >= 2)
}

/// Reads the threads of a process over and over on a thread of its own and keeps every
/// thread it saw: its latest name (a new thread has its parent's name until it names itself)
/// and the highest mode and filter count (they only grow).
struct Sampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<u32, Thread>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeMap::<u32, Thread>::new()));
        let (s, t) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let now = snapshot(pid);
                let mut all = t.lock().unwrap_or_else(|e| e.into_inner());
                for th in now {
                    all.entry(th.tid)
                        .and_modify(|o| {
                            o.name.clone_from(&th.name);
                            o.mode = o.mode.max(th.mode);
                            o.filters = o.filters.max(th.filters);
                        })
                        .or_insert(th);
                }
                drop(all);
                std::thread::yield_now();
            }
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Whether a thread named `prefix`* was seen carrying `filters` filters.
    fn saw(&self, prefix: &str, filters: u32) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.values()
            .any(|t| t.name.starts_with(prefix) && t.filters == filters)
    }

    /// Stops sampling; every thread seen.
    fn finish(mut self) -> Vec<Thread> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the sampler");
        }
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.values().cloned().collect()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The kernel's own workers in the process, which run no code of ours: KVM's NX huge page
/// recovery thread (made by the first KVM_RUN on recent kernels, with the vCPU's filter; at
/// VM creation, before any filter, on older ones) and io_uring's workers.
fn kernel_worker(t: &Thread) -> bool {
    t.name.starts_with("kvm-") || t.name.starts_with("iou-")
}

/// The filter count thread `t` of process `pid` must carry under filters; None for a kernel
/// worker, and for a device thread seen before it named itself.
fn expected_filters(pid: u32, t: &Thread) -> Option<u32> {
    let n = t.name.as_str();
    if t.tid == pid {
        assert_eq!(n, "cgvm", "the main thread: {t:?}");
        return Some(1);
    }
    if n.starts_with("cgvm-virtio-") {
        return Some(2);
    }
    if n.starts_with("cgvm-vcpu") || n == "cgvm-passt-log" || n == "cgvm-api" {
        return Some(1);
    }
    if kernel_worker(t) {
        return None;
    }
    // A device thread seen only before it named itself has the VMM's name and filter.
    assert_eq!(n, "cgvm", "a thread of an unknown kind: {t:?}");
    None
}

/// Every thread in `threads` (of `pid`) runs in filter mode with the filters of its kind.
fn assert_confined(pid: u32, threads: &[Thread]) {
    for t in threads {
        if t.name.starts_with("kvm-") {
            continue;
        }
        // io_uring's workers take the filters of the device thread that made them.
        assert_eq!(t.mode, 2, "{t:?} is not under a filter: {threads:#?}");
        if let Some(f) = expected_filters(pid, t) {
            assert_eq!(
                t.filters, f,
                "{t:?} carries the wrong filters: {threads:#?}"
            );
        }
    }
}

/// A disk image of 8 MiB.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create the image");
    f.set_len(8 << 20).expect("size the image");
    p
}

/// The threads a machine with every device showed on `transport`: all the sampler saw
/// during the run, and those there once the probe waits.
struct EveryDevice {
    pid: u32,
    seen: Vec<Thread>,
    at_end: Vec<Thread>,
}

/// A child killed and reaped when dropped, on every path (a failed assertion included).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = wait_with_limit(&mut self.0, Duration::from_secs(30));
    }
}

/// Fails with the machine's stderr and console if it ended.
fn assert_running(child: &mut KillOnDrop, dir: &Path, what: &str) {
    if let Ok(Some(st)) = child.0.try_wait() {
        panic!(
            "cgvm ended ({st}) {what}\n--- stderr\n{}\n--- console\n{}",
            std::fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("console.txt")).unwrap_or_default()
        );
    }
}

/// Boots the probe with every device on `transport`, its checks run while the threads are
/// sampled.
fn every_device_on(transport: &str) -> EveryDevice {
    let d = scratch(&format!("seccomp-threads-{transport}"));
    let ns = NetNs::new();
    ns.tap("tapt", Some("10.0.2.2/24"), &[]);
    // passt needs a routable interface in the namespace to take its addresses from: a tap
    // nobody attaches to, with the default route.
    ns.tap("tapr", Some("10.9.0.2/24"), &[]);
    ns.ip(&["route", "add", "default", "via", "10.9.0.1", "dev", "tapr"]);
    let sync = image(&d, "sync.img");
    let uring = image(&d, "uring.img");
    let uds = d.join("v.sock");
    let tap = format!("tap:tapt,mac={TAP_MAC}");
    let user = format!("user,mac={USER_MAC}");
    // The net check drives eth0.
    let (eth0, eth1, net) = if transport == "pci" {
        (&tap, &user, "arp")
    } else {
        (&user, &tap, "dhcp")
    };
    let mut checks = String::from("boot,");
    if transport == "pci" {
        checks.push_str("pci,");
    }
    checks.push_str("blk,");
    checks.push_str(&"rng,".repeat(60));
    checks.push_str(&"net,".repeat(30));
    checks.push_str("vsock");
    let n_checks = checks.split(',').count();
    let console = d.join("console.txt");
    let child = ns
        .command(Path::new(env!("CARGO_BIN_EXE_cgvm")))
        .args([
            "run",
            "--kernel",
            probe_elf().to_str().expect("utf-8"),
            "--cpus",
            "2",
            "--memory",
            "128",
            "--timeout",
            "120",
            "--transport",
            transport,
            "--console",
            &format!("file:{}", console.display()),
            "--disk",
            &format!("{},engine=sync,id=s", sync.display()),
            // persist: an ephemeral disk's sparse overlay would use the sync engine.
            "--disk",
            &format!("{},persist,engine=uring,id=u", uring.display()),
            "--rng",
            "--vsock",
            &format!("3,uds={}", uds.display()),
            "--net",
            eth0,
            "--net",
            eth1,
            "--cmdline",
            &format!(
                "probe.tests={checks} probe.transport={transport} probe.blk_id=s,u \
                 probe.net={net} probe.exit=hang"
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("stderr.txt")).expect("stderr file"))
        .spawn()
        .expect("spawn cgvm");
    let mut child = KillOnDrop(child);
    let pid = child.0.id();
    let sampler = Sampler::start(pid);
    // The vsock check waits for a host connection to guest port 52: its thread is there
    // until the test has connected and the echo is done.
    let start = Instant::now();
    while !sampler.saw("cgvm-virtio-vs", 2) {
        assert_running(&mut child, &d, "before its vsock thread started");
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{transport}: no vsock thread after 90 s: {}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut s = connect(&uds, 52);
    let payload: Vec<u8> = (0..9000u32).map(|i| (i * 7 + 3) as u8).collect();
    echo(&mut s, &payload);
    drop(s);
    let text = wait_for_text(&console, "probe: waiting", Duration::from_secs(90));
    assert!(
        text.contains(&format!("probe: {n_checks} passed, 0 failed")),
        "{transport}: {text}"
    );
    // The waiting loop starts both disks again.
    let start = Instant::now();
    let at_end = loop {
        let now = snapshot(pid);
        if settled(&now, "cgvm-virtio-blk", 2) {
            break now;
        }
        assert_running(&mut child, &d, "while its disks were started again");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{transport}: the disks' threads did not come back: {now:#?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let seen = sampler.finish();
    drop(child);
    drop(ns);
    EveryDevice { pid, seen, at_end }
}

/// The device threads the sampler saw: each in filter mode, none with more than its two
/// filters, and a thread of each transient kind with both. A thread seen only with one
/// filter was seen as it started, before it installed its own: it shows nothing.
fn assert_device_threads(transport: &str, seen: &[Thread]) {
    let report = format!("{transport}: {seen:#?}");
    for t in seen {
        if t.name.starts_with("cgvm-virtio-") || t.name.starts_with("iou-") {
            assert_eq!(t.mode, 2, "{t:?} is not under a filter: {report}");
            assert!(t.filters <= 2, "{t:?} has too many filters: {report}");
        }
    }
    for name in ["cgvm-virtio-rng", "cgvm-virtio-net", "cgvm-virtio-vs"] {
        assert!(
            seen.iter()
                .any(|t| t.name.starts_with(name) && t.filters == 2),
            "no {name}* seen with its own filter and the VMM's: {report}"
        );
    }
}

/// Every thread kind of a machine with every device is there and confined as it should be.
fn check_every_device(transport: &str) {
    let r = every_device_on(transport);
    assert_device_threads(transport, &r.seen);
    // The threads that live as long as the machine, and both disks at once.
    assert_confined(r.pid, &r.at_end);
    let report = format!("{transport}: {:#?}", r.at_end);
    assert!(r.at_end.iter().any(|t| t.tid == r.pid), "{report}");
    for name in [
        "cgvm-vcpu0",
        "cgvm-vcpu1",
        "cgvm-passt-log",
        "cgvm-virtio-blk",
    ] {
        let want = if name == "cgvm-virtio-blk" { 2 } else { 1 };
        assert_eq!(count(&r.at_end, name), want, "{name}: {report}");
    }
}

#[test]
fn every_thread_runs_under_its_filter_on_virtio_pci() {
    if passt_missing() {
        return;
    }
    check_every_device("pci");
}

#[test]
fn every_thread_runs_under_its_filter_on_virtio_mmio() {
    if passt_missing() {
        return;
    }
    check_every_device("mmio");
}

/// A Firecracker config file: the probe (waiting when done), a disk and an entropy device.
fn config_file(d: &Path) -> PathBuf {
    let disk = d.join("root.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).expect("write the image");
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": probe_elf(),
            "boot_args": "probe.tests=boot,blk,rng probe.exit=hang probe.blk_id=rootfs",
        },
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": disk,
            "is_root_device": false,
            "is_read_only": false,
        }],
        "entropy": {},
        "machine-config": { "vcpu_count": 2, "mem_size_mib": 64 },
    });
    let p = d.join("vm.json");
    std::fs::write(&p, cfg.to_string()).expect("write the config");
    p
}

/// `cgvm serve` boots the probe with `extra` flags; the threads once it waits, with the API
/// thread having answered requests.
fn serve_and_read_threads(name: &str, extra: &[&str]) -> (u32, Vec<Thread>) {
    let d = scratch(name);
    let cfg = config_file(&d);
    let mut args = vec!["--config-file", cfg.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    let s = Served::serve(&d, &args);
    let text = wait_for_text(&s.stdout, "probe: waiting", Duration::from_secs(60));
    assert!(text.contains("probe: 3 passed, 0 failed"), "{text}");
    // The API thread answers under its filter.
    assert_eq!(s.call("GET", "/", None).json()["state"], "Running");
    let pid = s.child.as_ref().expect("running").id();
    let start = Instant::now();
    let confined = !extra.contains(&"--no-seccomp");
    let threads = loop {
        let now = snapshot(pid);
        let ready = if confined {
            settled(&now, "cgvm-virtio-blk", 1)
        } else {
            count(&now, "cgvm-virtio-blk") == 1
        };
        if ready {
            break now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the disk's thread did not come back: {now:#?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(s.call("GET", "/machine-config", None).status, 200);
    (pid, threads)
}

#[test]
fn the_api_thread_runs_under_its_filter() {
    let (pid, threads) = serve_and_read_threads("seccomp-threads-serve", &[]);
    assert_confined(pid, &threads);
    for name in ["cgvm-api", "cgvm-vcpu0", "cgvm-vcpu1", "cgvm-virtio-blk"] {
        assert_eq!(count(&threads, name), 1, "one {name}: {threads:#?}");
    }
    let api = threads
        .iter()
        .find(|t| t.name == "cgvm-api")
        .expect("the API thread");
    assert_eq!((api.mode, api.filters), (2, 1), "{threads:#?}");
}

#[test]
fn no_seccomp_leaves_every_thread_unconfined() {
    let (_, threads) = serve_and_read_threads("seccomp-threads-off", &["--no-seccomp"]);
    for name in ["cgvm-api", "cgvm-vcpu0", "cgvm-virtio-blk"] {
        assert_eq!(count(&threads, name), 1, "one {name}: {threads:#?}");
    }
    for t in &threads {
        assert_eq!(
            (t.mode, t.filters),
            (0, 0),
            "{t:?} is under a filter with --no-seccomp: {threads:#?}"
        );
    }
}
